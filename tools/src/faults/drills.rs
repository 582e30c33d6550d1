//! The drills. Each runs the real server, the mirror and clients as processes, injects
//! its fault, checks every client's full history ([`history::check`]) and the module's
//! log against the authority's, and fails if its fault did not happen (a drill that
//! injected nothing proved nothing).

use super::history::{self, Authority};
use super::rig::{wait_until, ClientProc, Feeder, MirrorProc, Result, Rig};
use super::{DrillError, FaultKind, FaultPlan, Proxy};
use crate::api::identity_arg;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// How a drill runs: seeded, and short (CI) or full.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub seed: u64,
    pub short: bool,
}

impl Settings {
    fn pick(&self, short: u64, full: u64) -> u64 {
        if self.short {
            short
        } else {
            full
        }
    }

    fn rng(&self, salt: u64) -> rand::rngs::StdRng {
        rand::rngs::StdRng::seed_from_u64(self.seed ^ salt.wrapping_mul(0x2545_f491_4f6c_dd1d))
    }
}

/// What one run of one drill found.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct DrillRun {
    pub drill: String,
    pub seed: u64,
    pub pass: bool,
    /// Events applied by all clients (re-offers included).
    pub events: u64,
    /// Faults that really happened (kills mid-work, proxy faults that touched a live
    /// connection, pauses, republishes, expiries...).
    pub faults: u64,
    pub faults_by_kind: BTreeMap<String, u64>,
    pub reoffers: u64,
    /// Longest time from the end of a fault to convergence (or to the asserted state).
    pub worst_recovery_ms: u64,
    pub secs: f64,
    pub problems: Vec<String>,
    pub details: Value,
}

impl DrillRun {
    fn fault(&mut self, kind: &str, n: u64) {
        *self.faults_by_kind.entry(kind.to_string()).or_default() += n;
        self.faults += n;
    }

    fn recovered(&mut self, d: Duration) {
        self.worst_recovery_ms = self.worst_recovery_ms.max(d.as_millis() as u64);
    }
}

type DrillFn = fn(&mut Rig, &Settings, &mut DrillRun) -> Result<()>;

/// Every drill, in priority order.
pub const DRILLS: &[(&str, DrillFn)] = &[
    ("server_kill", server_kill),
    ("client_kill", client_kill),
    ("mirror_kill", mirror_kill),
    ("network_client", network_client),
    ("network_mirror", network_mirror),
    ("server_pause", server_pause),
    ("retention_overtakes", retention_overtakes),
    ("authority_divergence", authority_divergence),
    ("reconnect_storm", reconnect_storm),
    ("grant_expiry_storm", grant_expiry_storm),
    ("module_republish", module_republish),
];

pub fn names() -> Vec<&'static str> {
    DRILLS.iter().map(|(n, _)| *n).collect()
}

/// Runs drill `name` once. Errors become problems; no fault at all is a problem.
pub fn run(rig: &mut Rig, name: &str, settings: &Settings) -> DrillRun {
    let mut out = DrillRun { drill: name.to_string(), seed: settings.seed, ..DrillRun::default() };
    let started = Instant::now();
    match DRILLS.iter().find(|(n, _)| *n == name) {
        None => out.problems.push(format!("unknown_drill: {name} (drills: {})", names().join(", "))),
        Some((_, drill)) => {
            if let Err(e) = drill(rig, settings, &mut out) {
                out.problems.push(format!("{}: {e}", e.code()));
            }
        }
    }
    if out.faults == 0 {
        out.problems.push("no_fault_injected: the drill's fault did not happen, so it proved nothing".into());
    }
    out.secs = (started.elapsed().as_secs_f64() * 10.0).round() / 10.0;
    out.pass = out.problems.is_empty();
    out
}

/// One drill run's database, authority and processes.
struct Scene {
    db: String,
    /// The mirror's input, fed over time.
    input: PathBuf,
    lines: Vec<Vec<u8>>,
    authority: Authority,
    clients: Vec<ClientProc>,
    mirror: Option<MirrorProc>,
    /// Re-offers one restart of one stream may bring (see [`Scene::finish`]).
    reoffer_bound: u64,
}

/// Events the module holds in database `db`, over every stream.
fn module_total(rig: &Rig, db: &str) -> u64 {
    rig.module_heads(db).map(|h| h.values().sum()).unwrap_or(0)
}

/// Events one pump applies per stream before it checkpoints (client/src/sync
/// `APPLY_PER_PUMP`), twice: what a kill can at most make a restart apply again.
const REOFFER_BOUND: u64 = 2 * 2_048;

impl Scene {
    fn new(rig: &Rig, label: &str, events: u64, seed: u64) -> Result<Scene> {
        let db = rig.database(label)?;
        let lines = Rig::authority_lines(events, seed)?;
        let full = rig.dir.join(format!("{db}.authority.jsonl"));
        Feeder::all_at_once(&full, &lines)?;
        let authority = Authority::from_jsonl(&full)?;
        let input = rig.dir.join(format!("{db}.input.jsonl"));
        Ok(Scene { db, input, lines, authority, clients: Vec::new(), mirror: None, reoffer_bound: REOFFER_BOUND })
    }

    fn heads(&self) -> BTreeMap<String, u64> {
        Rig::streams().into_iter().map(|s| (s.clone(), self.authority.head(&s))).collect()
    }

    /// Starts `n` client processes at `url`, each its own identity.
    fn clients(&mut self, rig: &Rig, url: &str, n: usize, ttl_secs: u64) -> Result<()> {
        for _ in 0..n {
            let (who, token) = rig.reader(&self.db, ttl_secs)?;
            let mut c = rig.client(url, &self.db, &format!("c{}", self.clients.len()), &token, &who.identity);
            rig.spawn_client(&mut c)?;
            self.clients.push(c);
        }
        Ok(())
    }

    fn mirror(&mut self, rig: &Rig, url: &str) -> Result<()> {
        self.mirror_batched(rig, url, None)
    }

    /// [`Scene::mirror`] with `--batch-ms` (`None`: the mirror's default).
    fn mirror_batched(&mut self, rig: &Rig, url: &str, batch_ms: Option<u64>) -> Result<()> {
        let mut m = rig.mirror(url, &self.db, &self.input, &format!("{}-mirror", self.db));
        m.batch_ms = batch_ms;
        rig.spawn_mirror(&mut m)?;
        self.mirror = Some(m);
        Ok(())
    }

    fn module_total(&self, rig: &Rig) -> u64 {
        module_total(rig, &self.db)
    }

    /// Waits until the module holds the whole authority log and every client process
    /// has applied it; returns how long that took.
    fn converge(&mut self, rig: &Rig, limit: Duration) -> Result<Duration> {
        let heads = self.heads();
        let total = self.authority.total();
        let started = Instant::now();
        let (db, mirror) = (&self.db, &mut self.mirror);
        wait_until("the module to hold the authority's log", limit, || {
            // A mirror that gave up will not get there: say why now.
            if let Some(status) = mirror.as_mut().and_then(MirrorProc::failed) {
                let output = mirror.as_ref().map(MirrorProc::output).unwrap_or_default();
                let tail: Vec<&str> = output.lines().rev().take(8).collect();
                return Err(DrillError::Process(format!("the mirror exited ({status}) before the module held the authority's log: {}", tail.into_iter().rev().collect::<Vec<_>>().join(" / "))));
            }
            Ok(module_total(rig, db) >= total)
        })?;
        let left = limit.saturating_sub(started.elapsed());
        let clients = &mut self.clients;
        let reached = wait_until("every client to reach the authority's head", left, || {
            for c in clients.iter_mut() {
                if !c.alive() {
                    return Err(DrillError::Process(format!("a client exited early: {}", std::fs::read_to_string(c.logs.last().unwrap().with_extension("err")).unwrap_or_default().trim())));
                }
            }
            Ok(clients.iter_mut().all(|c| c.at(&heads)))
        });
        if let Err(DrillError::Timeout { what, secs }) = reached {
            // Name what the clients left behind say about themselves (a refused corrupt
            // segment, a server behind the checkpoint...).
            let said: BTreeSet<String> = clients.iter_mut().filter_map(|c| if c.at(&heads) { None } else { c.health() }).filter_map(|h| h["last_error"].as_str().filter(|e| !e.is_empty()).map(str::to_string)).collect();
            let what = if said.is_empty() { what } else { format!("{what}; the clients behind report: {}", said.into_iter().collect::<Vec<_>>().join(" | ")) };
            return Err(DrillError::Timeout { what, secs });
        }
        reached?;
        let took = started.elapsed();
        // Acks follow durable checkpoints, so every client's ack reaches the head too
        // (an ack the server lost must be sent again: docs/DURABILITY.md).
        let db = self.db.clone();
        let mut behind = Vec::new();
        let acked = wait_until("every client's ack to reach the head", Duration::from_secs(20), || {
            let acks = rig.acks(&db)?;
            behind = self.clients.iter().flat_map(|c| heads.iter().map(move |(s, h)| (c, s, *h))).filter(|(c, s, h)| {
                !acks.iter().any(|(g, st, seq)| g.contains(&c.identity) && st == *s && seq == h)
            }).map(|(c, s, h)| format!("{} {s} (head {h})", &c.identity[..12])).collect();
            Ok(behind.is_empty())
        });
        if acked.is_err() {
            return Err(DrillError::Process(format!("acks behind the head: {}", behind.join(", "))));
        }
        Ok(took)
    }

    /// Stops everything, then checks every client's history and the module's log.
    fn finish(&mut self, rig: &Rig, run: &mut DrillRun, converge: bool) -> Result<()> {
        if let Some(m) = self.mirror.as_mut() {
            m.stop(Duration::from_secs(10));
            // What the mirror found lost (acknowledged, then gone after a server crash)
            // and published again, from each run's summary.
            let lost: u64 = m.output().lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).filter_map(|v| v["lost_and_republished"].as_u64()).sum();
            run.details["mirror_lost_and_republished"] = json!(lost);
        }
        for c in self.clients.iter_mut() {
            c.stop(Duration::from_secs(10));
        }
        let streams = Rig::streams();
        let mut worst = 0;
        for (i, c) in self.clients.iter().enumerate() {
            let r = history::check(&self.authority, &c.logs, &streams, converge, self.reoffer_bound)?;
            run.events += r.applied;
            run.reoffers += r.reoffered;
            worst = worst.max(r.worst_reoffer);
            run.problems.extend(r.problems.iter().map(|p| format!("client {i}: {p}")));
        }
        run.details["worst_reoffer_per_restart"] = json!(worst);
        run.details["clients"] = json!(self.clients.len());
        run.details["authority_events"] = json!(self.authority.total());
        self.check_module(rig, run)
    }

    /// The module's log, with its chain recomputed from the stored segments, equals the
    /// authority's (from the stream's floor: retention may have trimmed below it).
    fn check_module(&self, rig: &Rig, run: &mut DrillRun) -> Result<()> {
        let module = crate::parity::module_log(&rig.api, &self.db, &rig.owner.token, &Rig::streams())?;
        for (stream, entries) in module {
            let expected = self.authority.streams.get(&stream).map(Vec::as_slice).unwrap_or_default();
            let first = entries.first().map_or(1, |e| e.seq);
            if entries.last().map_or(0, |e| e.seq) != expected.len() as u64 {
                run.problems.push(format!("module: {stream} ends at {:?}, the authority at {}", entries.last().map(|e| e.seq), expected.len()));
            }
            for (i, e) in entries.iter().enumerate() {
                let want = expected.get((first - 1) as usize + i);
                let ok = e.seq == first + i as u64 && want.is_some_and(|w| w.payload_hash == e.payload_hash && Some(&w.chain_hash) == e.chain_hash.as_ref());
                if !ok {
                    run.problems.push(format!("module: {stream} seq {} differs from the authority's", e.seq));
                    break;
                }
            }
        }
        Ok(())
    }
}

/// A file's modification time (`None` while it does not exist).
fn mtime(path: &std::path::Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn feed_secs(s: &Settings) -> Duration {
    Duration::from_secs(s.pick(4, 10))
}

fn converge_limit(s: &Settings) -> Duration {
    Duration::from_secs(s.pick(90, 180))
}

/// A half-open connection is found by the SDK's idle timeout: a ping after 30 s of
/// silence, given up 30 s later (spacetimedb-sdk 1.2.0 websocket.rs), so at most 90 s.
const HALF_OPEN_DETECTION: Duration = Duration::from_secs(90);

/// The mirror gives up a call after 10 s over the SDK (`SDK_CALL_TIMEOUT` in
/// `mirror/publisher.rs`) and 30 s over HTTP (`mirror::REQUEST_TIMEOUT`), then reconciles
/// and republishes: it catches up within a minute of the last fault.
const MIRROR_RECOVERY: Duration = Duration::from_secs(60);

/// 1. The server is killed (-9) several times while the mirror publishes, and restarted
///    on the same data dir. Kills that land while the module is behind the authority count.
fn server_kill(rig: &mut Rig, s: &Settings, run: &mut DrillRun) -> Result<()> {
    let mut scene = Scene::new(rig, "server-kill", s.pick(6_000, 20_000), s.seed)?;
    let mut feeder = Feeder::start(&scene.input, scene.lines.clone(), feed_secs(s))?;
    let url = rig.url();
    scene.mirror(rig, &url)?;
    scene.clients(rig, &url, 2, 3600)?;
    let mut rng = s.rng(1);
    let kills = s.pick(2, 4);
    let mut last_restart = Instant::now();
    for _ in 0..kills {
        std::thread::sleep(Duration::from_millis(rng.gen_range(600..1_800)));
        let mid_publish = scene.module_total(rig) < scene.authority.total();
        rig.server.kill9();
        rig.server.restart(&rig.engine, crate::server::Lifetime::TiedToThisProcess, Duration::from_secs(60))?;
        last_restart = Instant::now();
        if mid_publish {
            run.fault("server_kill_mid_publish", 1);
        } else {
            run.details["kills_after_publish"] = json!(run.details["kills_after_publish"].as_u64().unwrap_or(0) + 1);
        }
    }
    feeder.join()?;
    scene.converge(rig, converge_limit(s))?;
    run.recovered(last_restart.elapsed());
    scene.finish(rig, run, true)
}

/// 2. Each client is killed (-9) while it applies a replay (its log is growing and it is
///    not at the head), several times, and restarted from its checkpoint.
fn client_kill(rig: &mut Rig, s: &Settings, run: &mut DrillRun) -> Result<()> {
    let mut scene = Scene::new(rig, "client-kill", s.pick(9_000, 30_000), s.seed)?;
    Feeder::all_at_once(&scene.input, &scene.lines)?;
    let url = rig.url();
    scene.mirror(rig, &url)?;
    let total = scene.authority.total();
    wait_until("the mirror to publish the log", converge_limit(s), || Ok(scene.module_total(rig) >= total))?;
    scene.clients(rig, &url, 2, 3600)?;
    let heads = scene.heads();
    let mut rng = s.rng(2);
    let rounds = s.pick(2, 4);
    for round in 0..rounds {
        for c in scene.clients.iter_mut() {
            // Kill once this incarnation has applied a seeded share of what is left;
            // every other kill waits for the next checkpoint write and kills right after
            // it, where a checkpoint ahead of the handler's output would show as a gap.
            let threshold = rng.gen_range(20..(total / (4 * rounds)).max(21));
            let after_checkpoint = round % 2 == 1;
            let mut killed = false;
            let started = Instant::now();
            let mut seen = mtime(&c.checkpoint);
            while started.elapsed() < Duration::from_secs(30) {
                if c.at(&heads) || !c.alive() {
                    break;
                }
                let written = mtime(&c.checkpoint);
                let fresh = written != seen;
                seen = written;
                if c.applied_now() >= threshold && (!after_checkpoint || fresh) {
                    c.kill9();
                    killed = true;
                    break;
                }
                std::thread::sleep(Duration::from_micros(500));
            }
            if killed {
                run.fault(if after_checkpoint { "client_kill_after_checkpoint_write" } else { "client_kill_mid_apply" }, 1);
                rig.spawn_client(c)?;
                run.details["last_kill_round"] = json!(round);
            } else if !c.alive() {
                rig.spawn_client(c)?;
            }
        }
    }
    let took = scene.converge(rig, converge_limit(s))?;
    run.recovered(took);
    scene.finish(rig, run, true)
}

/// 3. The mirror is killed (-9) while it publishes batches (the module is behind the
///    authority), several times, and restarted on the same state dir.
fn mirror_kill(rig: &mut Rig, s: &Settings, run: &mut DrillRun) -> Result<()> {
    let mut scene = Scene::new(rig, "mirror-kill", s.pick(4_000, 15_000), s.seed)?;
    let mut feeder = Feeder::start(&scene.input, scene.lines.clone(), feed_secs(s))?;
    let url = rig.url();
    // The mirror publishes through a proxy that caps its bandwidth below the feed's rate,
    // so it always holds events it has read and the module has not committed: a kill
    // then lands with a batch on the wire, and a cursor that ran ahead of the module's
    // acknowledgements would skip those events after the restart.
    let proxy = Proxy::start(rig.server_addr(), FaultPlan::new(s.seed, &[FaultKind::Bandwidth], u64::MAX).with_bandwidth_kib(96, 192))
        .map_err(|e| DrillError::Io { what: "starting the proxy".into(), source: e })?;
    scene.mirror(rig, &proxy.url())?;
    scene.clients(rig, &url, 2, 3600)?;
    let mut rng = s.rng(3);
    let mut last = Instant::now();
    for _ in 0..s.pick(2, 4) {
        std::thread::sleep(Duration::from_millis(rng.gen_range(400..1_500)));
        // Right after the mirror wrote its cursor, while it is behind: a cursor that ran
        // ahead of what the module durably holds would skip events after the restart.
        let cursor = scene.mirror.as_ref().expect("started").state.join("cursor.json");
        let seen = mtime(&cursor);
        let _ = wait_until("a cursor write", Duration::from_secs(5), || Ok(mtime(&cursor) != seen));
        let behind = scene.module_total(rig) < scene.authority.total();
        let m = scene.mirror.as_mut().expect("started");
        if behind && m.running() {
            m.kill9();
            run.fault("mirror_kill_mid_batch", 1);
            rig.spawn_mirror(m)?;
            last = Instant::now();
        }
    }
    feeder.join()?;
    scene.converge(rig, converge_limit(s))?;
    run.recovered(last.elapsed());
    let capped = proxy.counters().faults(FaultKind::Bandwidth);
    run.fault("mirror_bandwidth_capped", capped);
    if capped == 0 {
        run.problems.push("no_fault_injected: the mirror's connections were not capped".into());
    }
    scene.finish(rig, run, true)
}

/// The proxy's per-kind phases: for each kind, a plan of only that kind, and a drop of
/// every open connection so that the processes reconnect into it.
fn network_phases(proxy: &Proxy, s: &Settings, phase: Duration, faulted: u64) {
    for (i, kind) in FaultKind::ALL.into_iter().enumerate() {
        proxy.set_plan(FaultPlan::new(s.seed.wrapping_add(i as u64), &[kind], faulted).with_cut_after_ms(200, phase.as_millis() as u64 / 2));
        if i > 0 {
            proxy.cut_all(FaultKind::Drop);
        }
        std::thread::sleep(phase);
    }
    proxy.set_plan(FaultPlan::clean());
}

fn count_proxy(run: &mut DrillRun, proxy: &Proxy, prefix: &str) {
    let counters = proxy.counters();
    for kind in FaultKind::ALL {
        let n = counters.faults(kind);
        run.fault(&format!("{prefix}{}", kind.name()), n);
        if n == 0 {
            run.problems.push(format!("no_fault_injected: no {} fault touched a live connection", kind.name()));
        }
    }
    run.details["proxy_connections"] = json!(counters.connections.load(std::sync::atomic::Ordering::Relaxed));
    run.details["proxy_bytes"] = json!(counters.bytes());
}

/// 4a. Clients reach the server through the proxy, which applies each fault kind in
/// turn while the mirror publishes.
fn network_client(rig: &mut Rig, s: &Settings, run: &mut DrillRun) -> Result<()> {
    let mut scene = Scene::new(rig, "net-client", s.pick(3_000, 12_000), s.seed)?;
    let proxy = Proxy::start(rig.server_addr(), FaultPlan::clean()).map_err(|e| DrillError::Io { what: "starting the proxy".into(), source: e })?;
    let phase = Duration::from_millis(s.pick(1_500, 4_000));
    let mut feeder = Feeder::start(&scene.input, scene.lines.clone(), phase * 6)?;
    scene.mirror(rig, &rig.url())?;
    scene.clients(rig, &proxy.url(), 2, 3600)?;
    network_phases(&proxy, s, phase, 2);
    let done = Instant::now();
    feeder.join()?;
    let converged = scene.converge(rig, converge_limit(s) + HALF_OPEN_DETECTION);
    count_proxy(run, &proxy, "client_");
    converged?;
    run.recovered(done.elapsed());
    if done.elapsed() > HALF_OPEN_DETECTION + Duration::from_secs(20) {
        run.problems.push(format!("converged {} s after the last fault (bound {} s)", done.elapsed().as_secs(), (HALF_OPEN_DETECTION + Duration::from_secs(20)).as_secs()));
    }
    scene.finish(rig, run, true)
}

/// 4b. The mirror reaches the server through the proxy, each fault kind in turn.
fn network_mirror(rig: &mut Rig, s: &Settings, run: &mut DrillRun) -> Result<()> {
    let mut scene = Scene::new(rig, "net-mirror", s.pick(3_000, 12_000), s.seed)?;
    let proxy = Proxy::start(rig.server_addr(), FaultPlan::clean()).map_err(|e| DrillError::Io { what: "starting the proxy".into(), source: e })?;
    let phase = Duration::from_millis(s.pick(1_500, 4_000));
    let mut feeder = Feeder::start(&scene.input, scene.lines.clone(), phase * 6)?;
    scene.mirror(rig, &proxy.url())?;
    scene.clients(rig, &rig.url(), 2, 3600)?;
    network_phases(&proxy, s, phase, 4);
    let done = Instant::now();
    feeder.join()?;
    let converged = scene.converge(rig, converge_limit(s) + HALF_OPEN_DETECTION);
    count_proxy(run, &proxy, "mirror_");
    converged?;
    run.recovered(done.elapsed());
    if done.elapsed() > MIRROR_RECOVERY {
        run.problems.push(format!("converged {} s after the last fault (bound {} s)", done.elapsed().as_secs(), (MIRROR_RECOVERY).as_secs()));
    }
    scene.finish(rig, run, true)
}

/// 5. The server is paused (SIGSTOP) for longer than the SDK's timeouts (its idle
///    timeout gives up a silent connection after at most 90 s; the client's handshake
///    timeout is 15 s, the mirror's call timeout 30 s) while everything runs, then resumed.
///    Every client must have lost its session during the pause (the timeouts really fired)
///    and everything converges after the resume.
fn server_pause(rig: &mut Rig, s: &Settings, run: &mut DrillRun) -> Result<()> {
    let mut scene = Scene::new(rig, "pause", s.pick(2_000, 8_000), s.seed)?;
    let mut feeder = Feeder::start(&scene.input, scene.lines.clone(), feed_secs(s))?;
    let url = rig.url();
    scene.mirror(rig, &url)?;
    scene.clients(rig, &url, 2, 3600)?;
    std::thread::sleep(feed_secs(s) / 3);
    let pause = HALF_OPEN_DETECTION + Duration::from_secs(5);
    rig.server.pause();
    std::thread::sleep(pause);
    rig.server.resume();
    run.fault("server_pause", 1);
    let timed_out: usize = scene.clients.iter().map(ClientProc::sessions_ended).filter(|n| *n > 0).count();
    run.fault("client_sessions_timed_out", timed_out as u64);
    if timed_out < scene.clients.len() {
        run.problems.push(format!("only {timed_out} of {} clients gave up their session during a {} s pause", scene.clients.len(), pause.as_secs()));
    }
    run.details["pause_secs"] = json!(pause.as_secs());
    let resumed = Instant::now();
    feeder.join()?;
    scene.converge(rig, converge_limit(s))?;
    run.recovered(resumed.elapsed());
    scene.finish(rig, run, true)
}

/// 6. Retention overtakes a live client: it follows the stream, loses its connection
///    (the proxy closes every attempt at once) while the mirror publishes far past the
///    retention limit and the sweep trims past its cursor; back online it is told to
///    rebootstrap (with its cursor, the new floor and the head), then converges.
fn retention_overtakes(rig: &mut Rig, s: &Settings, run: &mut DrillRun) -> Result<()> {
    let mut scene = Scene::new(rig, "retention", s.pick(4_000, 12_000), s.seed)?;
    let keep = s.pick(300, 600);
    for stream in Rig::streams() {
        rig.api.call(&scene.db, "create_stream", json!([stream, keep, 0]), &rig.owner.token)?;
    }
    let proxy = Proxy::start(rig.server_addr(), FaultPlan::clean()).map_err(|e| DrillError::Io { what: "starting the proxy".into(), source: e })?;
    scene.clients(rig, &proxy.url(), 1, 3600)?;
    // The first fifth, followed live.
    let first = scene.lines.len() / 5;
    Feeder::all_at_once(&scene.input, &scene.lines[..first])?;
    scene.mirror(rig, &rig.url())?;
    wait_until("the client to follow the first events", converge_limit(s), || Ok(scene.clients[0].applied_now() >= first as u64))?;
    // Offline: every connection attempt is closed at once.
    proxy.set_plan(FaultPlan::new(s.seed, &[FaultKind::Drop], u64::MAX).with_cut_after_ms(0, 0));
    proxy.cut_all(FaultKind::Drop);
    let cursor = scene.clients[0].heads_now();
    Feeder::all_at_once(&scene.input, &scene.lines)?;
    let total = scene.authority.total();
    wait_until("the module to hold the authority's log", converge_limit(s), || Ok(scene.module_total(rig) >= total))?;
    wait_until("retention to trim past the client's cursor", converge_limit(s), || {
        let rows = crate::inspect::streams(&rig.api, &scene.db, &rig.owner.token)?;
        Ok(rows.iter().all(|r| r.oldest_seq > cursor.get(&r.stream_id).copied().unwrap_or(0) + 1))
    })?;
    let back = Instant::now();
    proxy.set_plan(FaultPlan::clean());
    scene.converge(rig, converge_limit(s))?;
    run.recovered(back.elapsed());
    run.details["offline_connection_drops"] = json!(proxy.counters().faults(FaultKind::Drop));
    scene.finish(rig, run, true)?;
    // The rebootstrap lines: the client's cursor, a floor above it, the head above that.
    let mut told = 0;
    for log in &scene.clients[0].logs {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let mut last: BTreeMap<String, u64> = BTreeMap::new();
        for line in text.lines() {
            let Ok(v) = serde_json::from_str::<Value>(line) else { continue };
            if let Some(r) = v.get("rebootstrap") {
                told += 1;
                let stream = r["stream_id"].as_str().unwrap_or_default().to_string();
                let (req, floor, head) = (r["requested"].as_u64().unwrap_or(0), r["oldest_available"].as_u64().unwrap_or(0), r["head"].as_u64().unwrap_or(0));
                let applied = last.get(&stream).copied();
                if applied.is_some_and(|a| a != req) || floor <= req || head < floor || r["reason"] != "stale_cursor" {
                    run.problems.push(format!("rebootstrap with wrong numbers: {r} (last applied {applied:?})"));
                }
                run.details["rebootstraps"].as_array_mut().map(|a| a.push(r.clone())).unwrap_or_else(|| run.details["rebootstraps"] = json!([r]));
            } else if let (Some(st), Some(seq)) = (v["stream_id"].as_str(), v["seq"].as_u64()) {
                last.insert(st.to_string(), seq);
            }
        }
    }
    run.fault("retention_rebootstrap", told);
    run.details["retain_max_events"] = json!(keep);
    Ok(())
}

/// 7. An event the module already holds is changed at the source: a mirror that reads
///    the log again (a fresh state dir, as after losing its disk) names it,
///    `authority_divergence` with the stream and seq, and publishes nothing over it.
fn authority_divergence(rig: &mut Rig, s: &Settings, run: &mut DrillRun) -> Result<()> {
    let mut scene = Scene::new(rig, "divergence", s.pick(1_500, 6_000), s.seed)?;
    Feeder::all_at_once(&scene.input, &scene.lines)?;
    let url = rig.url();
    scene.clients(rig, &url, 2, 3600)?;
    let mut first = rig.mirror(&url, &scene.db, &scene.input, &format!("{}-m1", scene.db));
    first.follow = false;
    rig.spawn_mirror(&mut first)?;
    let status = first.wait(converge_limit(s))?;
    if !status.success() {
        return Err(DrillError::Process(format!("the first mirror run failed ({status}): {}", first.output().trim())));
    }
    scene.converge(rig, converge_limit(s))?;
    // Change one event's payload in the authority's log.
    let mut rng = s.rng(7);
    let index = rng.gen_range(0..scene.lines.len() - 3);
    let original: Value = serde_json::from_slice(&scene.lines[index]).map_err(|e| DrillError::Process(e.to_string()))?;
    let mut changed = original.clone();
    changed["payload"]["changed_at_source"] = json!(true);
    let mut lines = scene.lines.clone();
    lines[index] = format!("{changed}\n").into_bytes();
    let changed_input = rig.dir.join(format!("{}.changed.jsonl", scene.db));
    Feeder::all_at_once(&changed_input, &lines)?;
    let stream = crate::mirror::mapping::topic_to_stream(original["topic"].as_str().unwrap_or_default()).unwrap_or_default();
    let seq = original["seq"].as_str().unwrap_or_default().to_string();
    let mut second = rig.mirror(&url, &scene.db, &changed_input, &format!("{}-m2", scene.db));
    second.follow = false;
    rig.spawn_mirror(&mut second)?;
    let started = Instant::now();
    let status = second.wait(converge_limit(s))?;
    let output = second.output();
    let named = output.lines().find(|l| l.contains("authority_divergence") && l.contains(&stream) && l.contains(&seq));
    run.details["changed"] = json!({ "stream": stream, "seq": seq });
    match named {
        Some(line) if !status.success() => {
            run.fault("authority_divergence_detected", 1);
            run.recovered(started.elapsed());
            run.details["named"] = json!(line.chars().take(400).collect::<String>());
        }
        _ => run.problems.push(format!("the changed event ({stream} seq {seq}) was not named as authority_divergence (exit {status}): {}", output.chars().take(600).collect::<String>())),
    }
    // Clients and module keep the original history.
    scene.finish(rig, run, true)
}

/// 8. Many clients, connected through the proxy, are all dropped at once while the
///    mirror publishes, and the server stays unreachable for a few seconds (the proxy
///    closes every attempt): the herd that comes back when it returns. All resume with no
///    loss, and the reconnect rate once it is back stays bounded thanks to the backoff's
///    jitter.
fn reconnect_storm(rig: &mut Rig, s: &Settings, run: &mut DrillRun) -> Result<()> {
    let n = s.pick(50, 100) as usize;
    let mut scene = Scene::new(rig, "storm", s.pick(1_500, 6_000), s.seed)?;
    let proxy = Proxy::start(rig.server_addr(), FaultPlan::clean()).map_err(|e| DrillError::Io { what: "starting the proxy".into(), source: e })?;
    let purl = proxy.url();
    scene.clients(rig, &purl, n, 3600)?;
    wait_until("every client to connect", Duration::from_secs(120), || Ok(proxy.open_connections() >= n as u64))?;
    let mut feeder = Feeder::start(&scene.input, scene.lines.clone(), feed_secs(s))?;
    scene.mirror(rig, &rig.url())?;
    wait_until("every client to apply events", Duration::from_secs(60), || Ok(scene.clients.iter_mut().all(|c| c.applied_now() > 0)))?;
    // The outage: every open connection dropped, every attempt closed at once.
    let storm = Instant::now();
    proxy.set_plan(FaultPlan::new(s.seed, &[FaultKind::Drop], u64::MAX).with_cut_after_ms(0, 0));
    let open = proxy.cut_all(FaultKind::Drop);
    std::thread::sleep(STORM_OUTAGE);
    let refused = proxy.counters().faults(FaultKind::Drop).saturating_sub(open);
    let back = Instant::now();
    proxy.set_plan(FaultPlan::clean());
    let clients = &mut scene.clients;
    let accepted_since_back = || proxy.accept_times().into_iter().filter(|t| *t >= back).count();
    wait_until("every client to reconnect", Duration::from_secs(60), || {
        if let Some(dead) = clients.iter_mut().position(|c| !c.alive()) {
            return Err(DrillError::Process(format!("client {dead} exited after the storm")));
        }
        Ok(proxy.open_connections() >= n as u64 && accepted_since_back() >= n)
    })?;
    let reconnected = back.elapsed();
    let after: Vec<Duration> = proxy.accept_times().iter().filter(|t| **t >= back).map(|t| t.duration_since(back)).collect();
    let worst_100ms = after.iter().map(|t| after.iter().filter(|u| **u >= *t && **u < *t + Duration::from_millis(100)).count()).max().unwrap_or(0);
    feeder.join()?;
    let took = scene.converge(rig, converge_limit(s))?;
    run.recovered(back.elapsed().min(took + reconnected));
    run.fault("storm_dropped", open);
    run.fault("storm_attempts_refused", refused);
    if open < n as u64 {
        run.problems.push(format!("the storm dropped {open} connections, not all {n} clients"));
    }
    // Every client must have tried during the outage, or the herd never formed.
    if refused < n as u64 {
        run.problems.push(format!("{refused} attempts refused during the {} ms outage, fewer than the {n} clients", STORM_OUTAGE.as_millis()));
    }
    // After 4 s of refusals each client's next attempt is drawn from [0, 2 s] or [0, 4 s]
    // (full jitter): about 5% of the herd per 100 ms (4 and 6 of 50 measured). Without
    // jitter every client comes back on the same schedule, spread only by when each
    // noticed the drop: 18 and 37 of 50 in the worst 100 ms with a build that drew no
    // jitter (docs/RELIABILITY.md).
    let bound = (n as f64 * 0.25).ceil() as usize;
    if worst_100ms > bound {
        run.problems.push(format!("{worst_100ms} reconnects within 100 ms of the server's return (bound {bound} for {n} clients)"));
    }
    run.details["storm"] = json!({ "clients": n, "open_at_storm": open, "outage_ms": STORM_OUTAGE.as_millis() as u64, "attempts_refused": refused, "all_back_ms": reconnected.as_millis() as u64, "worst_reconnects_per_100ms": worst_100ms, "bound_per_100ms": bound, "storm_to_back_ms": back.duration_since(storm).as_millis() as u64 });
    scene.finish(rig, run, true)
}

/// How long the reconnect storm keeps the server unreachable: long enough that every
/// client fails a few attempts and its backoff ceiling reaches seconds.
const STORM_OUTAGE: Duration = Duration::from_secs(4);

/// 9. Many clients whose leases end in the same second; half renewed just before. The
///    renewed half are not interrupted; the others stop (`forbidden`) within the bound.
fn grant_expiry_storm(rig: &mut Rig, s: &Settings, run: &mut DrillRun) -> Result<()> {
    let n = s.pick(40, 100) as usize;
    let mut scene = Scene::new(rig, "expiry", s.pick(3_000, 8_000), s.seed)?;
    let url = rig.url();
    // Leases ending together: each grant's ttl is counted to the same whole second.
    let lease_secs = s.pick(20, 40);
    let expiry_at = std::time::SystemTime::now() + Duration::from_secs(lease_secs);
    let expiry_unix = expiry_at.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()) + 1;
    let mut ids = Vec::new();
    for i in 0..n {
        let reader = rig.api.new_identity()?;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        for st in Rig::streams() {
            rig.api.call(&scene.db, "grant", json!([identity_arg(&reader.identity), st, ["subscribe", "ack"], expiry_unix - now]), &rig.owner.token)?;
        }
        let token = rig.dir.join(format!("{}-e{i}.token", scene.db));
        std::fs::write(&token, &reader.token).map_err(|e| DrillError::Io { what: "writing a token".into(), source: e })?;
        let mut c = rig.client(&url, &scene.db, &format!("e{i}"), &token, &reader.identity);
        rig.spawn_client(&mut c)?;
        scene.clients.push(c);
        ids.push(reader);
    }
    // Timestamps come as `[micros]`.
    let expires: Vec<i64> = rig.api.sql(&scene.db, "SELECT expires_at FROM stream_grant", &rig.owner.token)?.rows.iter().filter_map(|r| r.first().and_then(|v| v[0].as_i64())).collect();
    if expires.len() != n * Rig::streams().len() {
        return Err(DrillError::Process(format!("{} grants, {} expected", expires.len(), n * Rig::streams().len())));
    }
    let (first_expiry, last_expiry) = (*expires.iter().min().unwrap_or(&0), *expires.iter().max().unwrap_or(&0));
    let spread_ms = (last_expiry - first_expiry) / 1000;
    let mut feeder = Feeder::start(&scene.input, scene.lines.clone(), Duration::from_secs(lease_secs + 6))?;
    // At the mirror's default 50 ms batching, 3 streams make about 60 commits a second;
    // fanned out to 100 subscribers that is over what the server evaluates on 2 cores
    // (about 5,000 subscriber-commits a second, docs/BENCHMARKS.md), it falls behind, and
    // every client hears of its grant's delete only after that backlog (17 s measured).
    // Batching at 250 ms keeps the server live, so the bound measures the lease.
    scene.mirror_batched(rig, &url, Some(250))?;
    // Renew the even half two seconds before the common expiry.
    let until = |t: u64| Duration::from_secs(t).saturating_sub(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default());
    std::thread::sleep(until(expiry_unix - 2));
    for reader in ids.iter().step_by(2) {
        for st in Rig::streams() {
            rig.api.call(&scene.db, "grant", json!([identity_arg(&reader.identity), st, ["subscribe", "ack"], 3600]), &rig.owner.token)?;
        }
    }
    std::thread::sleep(until(expiry_unix));
    let expired_at = Instant::now();
    // The expired half: every stream forbidden in the health file.
    // The server ends delivery within 250 ms of `expires_at` (docs/SECURITY.md); the
    // rest is each client hearing of the grant's delete and writing its health file
    // (every 500 ms), with 40–100 client processes on the machine: 2.3 s measured alone,
    // 3.1 s beside another drill on 2 cores.
    let bound = Duration::from_millis(5_000);
    let mut stopped_after = Vec::new();
    let mut pending: Vec<usize> = (0..n).filter(|i| i % 2 == 1).collect();
    while !pending.is_empty() && expired_at.elapsed() < bound + Duration::from_secs(10) {
        pending.retain(|&i| {
            let forbidden = scene.clients[i].health().is_some_and(|h| h["streams"].as_array().is_some_and(|a| !a.is_empty() && a.iter().all(|st| st["state"] == "forbidden")));
            if forbidden {
                // Measured from the last lease's end (all end within `spread_ms`).
                let now = crate::faults::rig::unix_micros();
                stopped_after.push(Duration::from_micros((now - last_expiry).max(0) as u64));
            }
            !forbidden
        });
        std::thread::sleep(Duration::from_millis(20));
    }
    let heads_at_bound = rig.module_heads(&scene.db)?;
    let worst_stop = stopped_after.iter().max().copied().unwrap_or_default();
    run.fault("leases_expired", stopped_after.len() as u64);
    run.fault("leases_renewed", (n as u64).div_ceil(2));
    if !pending.is_empty() {
        run.problems.push(format!("{} expired clients never reported forbidden", pending.len()));
    }
    if worst_stop > bound {
        run.problems.push(format!("an expired client stopped {} ms after expiry (bound {} ms)", worst_stop.as_millis(), bound.as_millis()));
    }
    run.recovered(worst_stop);
    feeder.join()?;
    // The renewed half converge; nothing interrupted them (one connection each).
    let heads = scene.heads();
    let total = scene.authority.total();
    wait_until("the module to hold the authority's log", converge_limit(s), || Ok(scene.module_total(rig) >= total))?;
    let renewed: Vec<usize> = (0..n).filter(|i| i % 2 == 0).collect();
    wait_until("every renewed client to reach the head", converge_limit(s), || Ok(renewed.iter().all(|&i| scene.clients[i].at(&heads))))?;
    for &i in &renewed {
        let ended = scene.clients[i].sessions_ended();
        if ended != 0 {
            run.problems.push(format!("renewed client {i}'s session ended {ended} times"));
        }
    }
    // The expired half applied nothing the module got after the bound.
    for i in (0..n).filter(|i| i % 2 == 1) {
        for (st, seq) in scene.clients[i].heads_now() {
            if seq > heads_at_bound.get(&st).copied().unwrap_or(0) {
                run.problems.push(format!("expired client {i} applied {st} seq {seq}, published after its lease ended"));
            }
        }
    }
    run.details["expiry"] = json!({ "clients": n, "grant_expiry_spread_ms": spread_ms, "worst_stop_ms": worst_stop.as_millis() as u64, "bound_ms": bound.as_millis() as u64 });
    // Histories: all must be right; only the renewed half must reach the head.
    let streams = Rig::streams();
    for (i, c) in scene.clients.iter_mut().enumerate() {
        c.stop(Duration::from_secs(10));
        let r = history::check(&scene.authority, &c.logs, &streams, i % 2 == 0, REOFFER_BOUND)?;
        run.events += r.applied;
        run.problems.extend(r.problems.iter().map(|p| format!("client {i}: {p}")));
    }
    scene.clients.clear();
    scene.finish(rig, run, true)
}

/// 10. The module is republished (same schema, then an additive change when the
///     `bench/module-next` fixture exists) with clients connected and the mirror running.
fn module_republish(rig: &mut Rig, s: &Settings, run: &mut DrillRun) -> Result<()> {
    // Built before the traffic starts: a cargo build between the updates could outlast it.
    let additive = match additive_wasm() {
        Some(Ok(wasm)) => Some(wasm),
        Some(Err(e)) => return Err(DrillError::Process(format!("building the additive module: {e}"))),
        None => {
            run.details["additive"] = json!("skipped: bench/module-next is not in this checkout");
            None
        }
    };
    let mut scene = Scene::new(rig, "republish", s.pick(3_000, 10_000), s.seed)?;
    let total = scene.authority.total();
    let feed = feed_secs(s) * 2;
    let mut feeder = Feeder::start(&scene.input, scene.lines.clone(), feed)?;
    let url = rig.url();
    scene.mirror(rig, &url)?;
    scene.clients(rig, &url, 2, 3600)?;
    let updates: Vec<(&str, Vec<u8>)> = std::iter::once(("republish_same_schema", rig.wasm.clone())).chain(additive.map(|w| ("republish_additive_schema", w))).collect();
    // The updates are spread over the feed: at a third and two thirds of it.
    let started = Instant::now();
    let mut last = started;
    let mut at_update = Vec::new();
    for (i, (kind, wasm)) in updates.iter().enumerate() {
        let due = feed / (updates.len() as u32 + 1) * (i as u32 + 1);
        std::thread::sleep(due.saturating_sub(started.elapsed()));
        rig.api.publish_module(&scene.db, wasm, &rig.owner.token, false)?;
        last = Instant::now();
        // The update must land while the mirror still has events to publish, or it
        // tested nothing: the module's head then must still be short of the authority's.
        let held = scene.module_total(rig);
        at_update.push(json!({ "update": kind, "module_events": held, "authority_events": total }));
        if held >= total {
            run.problems.push(format!("no_fault_injected: {kind} landed after the mirror had published everything ({held} of {total} events)"));
        } else {
            run.fault(kind, 1);
        }
    }
    run.details["updates"] = json!(at_update);
    feeder.join()?;
    scene.converge(rig, converge_limit(s))?;
    let recovery = last.elapsed();
    run.recovered(recovery);
    // SpacetimeDB 1.2.0 closes no connection on an update (the clients' subscriptions go
    // on; the server swaps the row-level security rules), so delivery must simply go on.
    if recovery > REPUBLISH_RECOVERY {
        run.problems.push(format!("converged {} s after the last update (bound {} s)", recovery.as_secs(), REPUBLISH_RECOVERY.as_secs()));
    }
    scene.finish(rig, run, true)
}

/// Longest time from the last module update to convergence in `module_republish`.
const REPUBLISH_RECOVERY: Duration = Duration::from_secs(15);

/// The module plus one table and reducer (`bench/module-next`), if that fixture exists.
fn additive_wasm() -> Option<std::result::Result<Vec<u8>, String>> {
    let root = crate::paths::workspace_root();
    if !root.join("bench/module-next/Cargo.toml").exists() {
        return None;
    }
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target"));
    let out = std::process::Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .current_dir(&root)
        .args(["build", "--quiet", "--release", "-p", "khala-module-next", "--target", crate::engine::WASM_TARGET, "--target-dir"])
        .arg(&target)
        .output();
    Some(match out {
        Ok(o) if o.status.success() => std::fs::read(target.join(crate::engine::WASM_TARGET).join("release").join("khala_module_next.wasm")).map_err(|e| e.to_string()),
        Ok(o) => Err(String::from_utf8_lossy(&o.stderr).chars().take(600).collect()),
        Err(e) => Err(e.to_string()),
    })
}
