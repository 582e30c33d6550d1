//! The Redis Streams baseline of `khala bench all`: Debian's `redis-server`, started
//! privately on a free loopback port with its data in a temp dir, fed the same 256 B
//! random payloads with XADD (pipelined, one pipeline per batch; and unpipelined, one
//! command per round trip) and read back with XRANGE.
//!
//! Persistence is on, as close to the engine's commit log as Redis gets: an append-only
//! file fsynced once a second (`appendonly yes`, `appendfsync everysec`), no RDB
//! snapshots, no `MAXLEN` (every event is retained, like Khala with no retention policy).

use anyhow::Context;
use rand::RngCore;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The Debian package that has `redis-server`, named when it is missing.
pub const PACKAGE: &str = "redis-server";

/// A private `redis-server`, killed and waited for when dropped (and killed by the kernel
/// when this process dies: `PR_SET_PDEATHSIG`).
pub struct RedisServer {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

/// `redis-server` on `PATH` or in Debian's places, if installed.
pub fn find_binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")]).map(|d| d.join("redis-server")).find(|p| p.is_file())
}

impl RedisServer {
    /// Starts `binary` on a free loopback port and waits until it answers PING.
    pub fn start(binary: &Path) -> anyhow::Result<RedisServer> {
        let dir = tempfile::Builder::new().prefix("khala-bench-redis-").tempdir()?;
        let port = khala_tools::server::free_port()?;
        let mut command = Command::new(binary);
        command
            .args(["--bind", "127.0.0.1", "--port", &port.to_string(), "--protected-mode", "yes"])
            .args(["--save", "", "--appendonly", "yes", "--appendfsync", "everysec", "--daemonize", "no"])
            .arg("--dir")
            .arg(dir.path())
            .arg("--logfile")
            .arg(dir.path().join("redis.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent. The bench
        // forks from its main thread, which lives as long as the process.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().with_context(|| format!("starting {}", binary.display()))?;
        let mut server = RedisServer { child, port, dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = server.child.try_wait()? {
                anyhow::bail!("redis-server exited ({status}) before answering:\n{}", khala_tools::server::log_tail(&server.dir.path().join("redis.log"), 2000));
            }
            if let Ok(mut con) = server.client()?.get_connection() {
                if redis::cmd("PING").query::<String>(&mut con).is_ok() {
                    return Ok(server);
                }
            }
            anyhow::ensure!(Instant::now() < deadline, "redis-server did not answer on port {port} within 20 s");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn client(&self) -> anyhow::Result<redis::Client> {
        Ok(redis::Client::open(format!("redis://127.0.0.1:{}/", self.port))?)
    }

    /// `redis-server --version`'s `v=` field.
    pub fn version(binary: &Path) -> String {
        let out = Command::new(binary).arg("--version").output().map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
        out.split_whitespace().find_map(|w| w.strip_prefix("v=")).unwrap_or("unknown").to_string()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Events held (across all streams) when a slice ended, and events/s over that slice,
/// recorded by whichever writer thread closes the slice.
struct Curve {
    every: u64,
    committed: u64,
    slice_start: Instant,
    slice_events: u64,
    points: Vec<(u64, f64)>,
}

/// A run's rate, and its rate per slice of `every` events (empty when `every` is 0).
pub struct RedisRate {
    pub events_per_sec: f64,
    pub curve: Vec<(u64, f64)>,
}

/// XADDs `events` events of `payload_bytes` random bytes, split evenly over `streams`
/// streams with one connection (and one thread) each. With `pipeline > 1`, each round
/// trip is one pipeline of that many XADDs; with 1, one XADD per round trip.
pub fn xadd(client: &redis::Client, label: &str, events: u64, streams: u64, pipeline: u64, payload_bytes: usize, every: u64) -> anyhow::Result<RedisRate> {
    let per_stream = events / streams;
    let progress = khala_tools::progress::bar(per_stream * streams, label);
    let curve = Mutex::new(Curve { every, committed: 0, slice_start: Instant::now(), slice_events: 0, points: Vec::new() });
    let done = AtomicU64::new(0);
    let mut connections = (0..streams).map(|_| client.get_connection()).collect::<Result<Vec<_>, _>>()?;
    let started = Instant::now();
    curve.lock().expect("curve lock").slice_start = started;
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let handles: Vec<_> = connections
            .iter_mut()
            .enumerate()
            .map(|(s, con)| {
                let (progress, curve, done) = (progress.clone(), &curve, &done);
                scope.spawn(move || -> anyhow::Result<()> {
                    let key = format!("bench.pub.{s}");
                    let mut rng = rand::thread_rng();
                    let mut sent = 0;
                    while sent < per_stream {
                        let n = pipeline.min(per_stream - sent);
                        let mut pipe = redis::pipe();
                        for _ in 0..n {
                            let mut payload = vec![0u8; payload_bytes];
                            rng.fill_bytes(&mut payload);
                            pipe.cmd("XADD").arg(&key).arg("*").arg("p").arg(payload).ignore();
                        }
                        pipe.query::<()>(con).with_context(|| format!("XADD on {key}"))?;
                        sent += n;
                        done.fetch_add(n, Ordering::Relaxed);
                        progress.inc(n);
                        let mut c = curve.lock().expect("curve lock");
                        c.committed += n;
                        c.slice_events += n;
                        if c.every > 0 && c.slice_events >= c.every {
                            let point = (c.committed, (c.slice_events as f64 / c.slice_start.elapsed().as_secs_f64()).round());
                            c.points.push(point);
                            (c.slice_start, c.slice_events) = (Instant::now(), 0);
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join().expect("XADD thread")?;
        }
        Ok(())
    })?;
    let events_per_sec = done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
    progress.finish_and_clear();
    let mut con = client.get_connection()?;
    let held: u64 = (0..streams).map(|s| redis::cmd("XLEN").arg(format!("bench.pub.{s}")).query::<u64>(&mut con)).sum::<Result<u64, _>>()?;
    anyhow::ensure!(held >= per_stream * streams, "Redis holds {held} events after {} XADDs", per_stream * streams);
    Ok(RedisRate { events_per_sec, curve: curve.into_inner().expect("curve lock").points })
}

/// Reads `streams` streams back from the start with XRANGE, `count` entries per call,
/// checks every entry's payload length and the total, and returns events per second.
pub fn xrange(client: &redis::Client, streams: u64, count: u64, payload_bytes: usize, expected: u64) -> anyhow::Result<f64> {
    /// One XRANGE entry: its id and its field-value pairs.
    type StreamEntry = (String, Vec<(String, Vec<u8>)>);
    let progress = khala_tools::progress::bar(expected, "Redis XRANGE replay");
    let mut con = client.get_connection()?;
    let started = Instant::now();
    let mut read = 0u64;
    for s in 0..streams {
        let key = format!("bench.pub.{s}");
        let mut from = "-".to_string();
        loop {
            let entries: Vec<StreamEntry> = redis::cmd("XRANGE").arg(&key).arg(&from).arg("+").arg("COUNT").arg(count).query(&mut con)?;
            let Some((last, _)) = entries.last() else { break };
            from = format!("({last}");
            for (id, fields) in &entries {
                anyhow::ensure!(fields.len() == 1 && fields[0].1.len() == payload_bytes, "entry {id} of {key} is not one {payload_bytes} B payload");
            }
            read += entries.len() as u64;
            progress.inc(entries.len() as u64);
        }
    }
    let events_per_sec = read as f64 / started.elapsed().as_secs_f64();
    progress.finish_and_clear();
    anyhow::ensure!(read == expected, "XRANGE read {read} events, not {expected}");
    Ok(events_per_sec)
}
