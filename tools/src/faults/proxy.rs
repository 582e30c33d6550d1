//! A loopback TCP proxy that injects faults per connection ([`FaultPlan`]) or to every
//! open connection at once ([`Proxy::cut_all`]), and counts what it really did: a fault
//! is counted only when it touched a live connection (a delay when a delayed chunk was
//! forwarded, a drop when an open connection was closed), so a drill can assert it.

use super::plan::{ConnFault, FaultKind, FaultPlan};
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;

const CHUNK: usize = 16 * 1024;

/// What the proxy did, for the drill's assertions.
#[derive(Debug, Default)]
pub struct FaultCounters {
    pub connections: AtomicU64,
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
    faults: [AtomicU64; 6],
}

impl FaultCounters {
    fn hit(&self, kind: FaultKind) {
        self.faults[Self::slot(kind)].fetch_add(1, Ordering::Relaxed);
    }

    fn slot(kind: FaultKind) -> usize {
        FaultKind::ALL.iter().position(|k| *k == kind).unwrap_or(0)
    }

    pub fn faults(&self, kind: FaultKind) -> u64 {
        self.faults[Self::slot(kind)].load(Ordering::Relaxed)
    }

    pub fn total_faults(&self) -> u64 {
        FaultKind::ALL.iter().map(|k| self.faults(*k)).sum()
    }

    /// Faults injected by kind (kinds never injected left out).
    pub fn by_kind(&self) -> BTreeMap<&'static str, u64> {
        FaultKind::ALL.iter().map(|k| (k.name(), self.faults(*k))).filter(|(_, n)| *n > 0).collect()
    }

    pub fn bytes(&self) -> u64 {
        self.bytes_up.load(Ordering::Relaxed) + self.bytes_down.load(Ordering::Relaxed)
    }
}

struct Shared {
    upstream: SocketAddr,
    plan: Mutex<FaultPlan>,
    /// Index of the next connection under the current plan.
    next: AtomicU64,
    counters: Arc<FaultCounters>,
    /// Cuts every open connection at once.
    storm: broadcast::Sender<FaultKind>,
    open: AtomicU64,
    /// When each connection was accepted (for reconnect rates).
    accepted: Mutex<Vec<std::time::Instant>>,
}

/// A running proxy; dropping it stops it and closes every connection.
pub struct Proxy {
    port: u16,
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `upstream` under `plan`.
    pub fn start(upstream: SocketAddr, plan: FaultPlan) -> std::io::Result<Proxy> {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().thread_name("khala-fault-proxy").build()?;
        let listener = runtime.block_on(TcpListener::bind("127.0.0.1:0"))?;
        let port = listener.local_addr()?.port();
        let (storm, _) = broadcast::channel(16);
        let shared = Arc::new(Shared { upstream, plan: Mutex::new(plan), next: AtomicU64::new(0), counters: Arc::default(), storm, open: AtomicU64::new(0), accepted: Mutex::default() });
        let accept_shared = shared.clone();
        runtime.spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else { continue };
                if let Ok(mut a) = accept_shared.accepted.lock() {
                    a.push(std::time::Instant::now());
                }
                let index = accept_shared.next.fetch_add(1, Ordering::Relaxed);
                let fault = accept_shared.plan.lock().map(|p| p.fault_for(index)).unwrap_or_default();
                accept_shared.counters.connections.fetch_add(1, Ordering::Relaxed);
                let shared = accept_shared.clone();
                tokio::spawn(async move {
                    shared.open.fetch_add(1, Ordering::Relaxed);
                    serve(client, fault, &shared).await;
                    shared.open.fetch_sub(1, Ordering::Relaxed);
                });
            }
        });
        Ok(Proxy { port, shared, runtime: Some(runtime) })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        crate::server::url_for(self.port)
    }

    pub fn counters(&self) -> Arc<FaultCounters> {
        self.shared.counters.clone()
    }

    /// Connections open through the proxy right now.
    pub fn open_connections(&self) -> u64 {
        self.shared.open.load(Ordering::Relaxed)
    }

    /// When each connection so far was accepted, in order.
    pub fn accept_times(&self) -> Vec<std::time::Instant> {
        self.shared.accepted.lock().map(|a| a.clone()).unwrap_or_default()
    }

    /// Replaces the plan; connection indexes start again from 0 under it.
    pub fn set_plan(&self, plan: FaultPlan) {
        if let Ok(mut p) = self.shared.plan.lock() {
            *p = plan;
            self.shared.next.store(0, Ordering::Relaxed);
        }
    }

    /// Cuts every open connection now with `kind` (drop, reset or blackhole). Returns how
    /// many connections were open (each cut is counted by the connection that took it).
    pub fn cut_all(&self, kind: FaultKind) -> u64 {
        let open = self.open_connections();
        let _ = self.shared.storm.send(kind);
        open
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

async fn serve(mut client: TcpStream, fault: ConnFault, shared: &Shared) {
    let counters = &shared.counters;
    let mut storm = shared.storm.subscribe();
    if let Some((FaultKind::Blackhole, after)) = fault.cut {
        if after.is_zero() {
            counters.hit(FaultKind::Blackhole);
            swallow(&mut client).await;
            return;
        }
    }
    let Ok(mut server) = TcpStream::connect(shared.upstream).await else { return };
    let _ = (client.set_nodelay(true), server.set_nodelay(true));
    let cut = {
        let (cr, cw) = client.split();
        let (sr, sw) = server.split();
        let mut rng = rand::rngs::StdRng::seed_from_u64(fault.jitter_seed);
        let mut rng2 = rand::rngs::StdRng::seed_from_u64(fault.jitter_seed.rotate_left(17));
        let slowed = std::sync::atomic::AtomicBool::new(false);
        let up = pump(cr, sw, &fault, &mut rng, &counters.bytes_up, counters, &slowed);
        let down = pump(sr, cw, &fault, &mut rng2, &counters.bytes_down, counters, &slowed);
        let timer = async {
            match fault.cut {
                Some((kind, after)) => {
                    tokio::time::sleep(after).await;
                    kind
                }
                None => std::future::pending().await,
            }
        };
        let stormed = async {
            loop {
                match storm.recv().await {
                    Ok(kind) => return kind,
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => std::future::pending::<()>().await,
                }
            }
        };
        tokio::select! {
            _ = async { tokio::join!(up, down) } => None,
            kind = timer => Some(kind),
            kind = stormed => Some(kind),
        }
    };
    let Some(kind) = cut else { return };
    counters.hit(kind);
    match kind {
        FaultKind::Reset => {
            // SO_LINGER 0 does not block on close (it only blocks with a positive time):
            // the close sends RST at once.
            #[allow(deprecated)]
            let _ = client.set_linger(Some(Duration::ZERO));
            drop(client);
        }
        FaultKind::Blackhole => swallow(&mut client).await,
        _ => {
            let _ = client.shutdown().await;
            let _ = server.shutdown().await;
        }
    }
}

/// Forwards one direction until EOF or an error, with the connection's fault, and
/// counts delay/jitter/bandwidth once per connection when a slowed chunk went through.
async fn pump(
    mut from: tokio::net::tcp::ReadHalf<'_>,
    mut to: tokio::net::tcp::WriteHalf<'_>,
    fault: &ConnFault,
    rng: &mut rand::rngs::StdRng,
    bytes: &AtomicU64,
    counters: &FaultCounters,
    slowed: &std::sync::atomic::AtomicBool,
) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut wait = fault.delay;
        if !fault.jitter.is_zero() {
            wait += Duration::from_micros(rng.gen_range(0..=fault.jitter.as_micros() as u64));
        }
        if let Some(rate) = fault.bytes_per_sec {
            wait += Duration::from_secs_f64(n as f64 / rate.max(1) as f64);
        }
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
            if !slowed.swap(true, Ordering::Relaxed) {
                if let Some(kind) = fault.kind().filter(|k| !k.cuts()) {
                    counters.hit(kind);
                }
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
        bytes.fetch_add(n as u64, Ordering::Relaxed);
    }
    let _ = to.shutdown().await;
}

/// Keeps the connection open and forwards nothing: reads and discards until the client
/// gives up (EOF or error).
async fn swallow(client: &mut TcpStream) {
    let mut buf = vec![0u8; CHUNK];
    while let Ok(n) = client.read(&mut buf).await {
        if n == 0 {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpStream as StdStream;
    use std::time::Instant;

    /// A local echo server on a free port.
    fn echo() -> SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = conn.read(&mut buf) {
                        if n == 0 || conn.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }

    fn connect(proxy: &Proxy) -> StdStream {
        let s = StdStream::connect(("127.0.0.1", proxy.port())).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s
    }

    fn round_trip(s: &mut StdStream, bytes: &[u8]) -> std::io::Result<Vec<u8>> {
        s.write_all(bytes)?;
        let mut back = vec![0u8; bytes.len()];
        s.read_exact(&mut back)?;
        Ok(back)
    }

    fn only(kind: FaultKind, after_ms: u64) -> FaultPlan {
        FaultPlan::new(1, &[kind], 1).with_cut_after_ms(after_ms, after_ms)
    }

    #[test]
    fn a_clean_connection_forwards_and_counts_bytes_and_no_fault() {
        let proxy = Proxy::start(echo(), FaultPlan::clean()).unwrap();
        let mut s = connect(&proxy);
        assert_eq!(round_trip(&mut s, b"hello").unwrap(), b"hello");
        // The count follows the write that delivered the bytes.
        let deadline = Instant::now() + Duration::from_secs(2);
        while proxy.counters().bytes() < 10 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(proxy.counters().bytes(), 10);
        assert_eq!(proxy.counters().total_faults(), 0);
    }

    #[test]
    fn delay_slows_each_chunk_and_is_counted() {
        let proxy = Proxy::start(echo(), FaultPlan::new(3, &[FaultKind::Delay], 1)).unwrap();
        let delay = FaultPlan::new(3, &[FaultKind::Delay], 1).fault_for(0).delay;
        let mut s = connect(&proxy);
        let started = Instant::now();
        round_trip(&mut s, b"x").unwrap();
        assert!(started.elapsed() >= delay * 2, "{:?} < 2 × {delay:?}", started.elapsed());
        assert_eq!(proxy.counters().faults(FaultKind::Delay), 1);
        // The second connection is past the plan's faulted count: clean.
        let mut t = connect(&proxy);
        round_trip(&mut t, b"y").unwrap();
        assert_eq!(proxy.counters().total_faults(), 1);
    }

    #[test]
    fn bandwidth_caps_throughput() {
        let plan = FaultPlan::new(5, &[FaultKind::Bandwidth], 1);
        let rate = plan.fault_for(0).bytes_per_sec.unwrap();
        let proxy = Proxy::start(echo(), plan).unwrap();
        let mut s = connect(&proxy);
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let data = vec![7u8; rate as usize / 2];
        let started = Instant::now();
        assert_eq!(round_trip(&mut s, &data).unwrap(), data);
        // Half a second's worth through the cap (the two directions overlap).
        assert!(started.elapsed() >= Duration::from_millis(450), "{:?}", started.elapsed());
        assert_eq!(proxy.counters().faults(FaultKind::Bandwidth), 1);
    }

    #[test]
    fn drop_closes_the_connection_after_its_delay() {
        let proxy = Proxy::start(echo(), only(FaultKind::Drop, 200)).unwrap();
        let mut s = connect(&proxy);
        assert_eq!(round_trip(&mut s, b"a").unwrap(), b"a");
        let mut buf = [0u8; 8];
        assert_eq!(s.read(&mut buf).unwrap(), 0, "EOF after the drop");
        assert_eq!(proxy.counters().faults(FaultKind::Drop), 1);
    }

    #[test]
    fn reset_sends_a_reset() {
        let proxy = Proxy::start(echo(), only(FaultKind::Reset, 200)).unwrap();
        let mut s = connect(&proxy);
        assert_eq!(round_trip(&mut s, b"a").unwrap(), b"a");
        std::thread::sleep(Duration::from_millis(400));
        let mut buf = [0u8; 8];
        let err = s.read(&mut buf).expect_err("a reset, not EOF");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
        assert_eq!(proxy.counters().faults(FaultKind::Reset), 1);
    }

    #[test]
    fn blackhole_keeps_the_connection_open_and_forwards_nothing() {
        let proxy = Proxy::start(echo(), only(FaultKind::Blackhole, 200)).unwrap();
        let plan_fault = FaultPlan::new(1, &[FaultKind::Blackhole], 1).with_cut_after_ms(200, 200).fault_for(0);
        let mut s = connect(&proxy);
        s.set_read_timeout(Some(Duration::from_millis(800))).unwrap();
        if plan_fault.cut == Some((FaultKind::Blackhole, Duration::from_millis(200))) {
            assert_eq!(round_trip(&mut s, b"a").unwrap(), b"a");
            std::thread::sleep(Duration::from_millis(300));
        }
        s.write_all(b"lost").unwrap();
        let mut buf = [0u8; 8];
        let err = s.read(&mut buf).expect_err("no answer and no close");
        assert!(matches!(err.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut), "{err:?}");
        assert_eq!(proxy.counters().faults(FaultKind::Blackhole), 1);
        assert_eq!(proxy.open_connections(), 1, "the connection is still open");
    }

    #[test]
    fn cut_all_cuts_every_open_connection_at_once() {
        let proxy = Proxy::start(echo(), FaultPlan::clean()).unwrap();
        let mut conns: Vec<_> = (0..20).map(|_| connect(&proxy)).collect();
        for c in conns.iter_mut() {
            round_trip(c, b"z").unwrap();
        }
        assert_eq!(proxy.cut_all(FaultKind::Drop), 20);
        for c in conns.iter_mut() {
            let mut buf = [0u8; 1];
            assert_eq!(c.read(&mut buf).unwrap(), 0);
        }
        assert_eq!(proxy.counters().faults(FaultKind::Drop), 20);
    }
}
