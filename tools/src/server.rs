//! Running a local `spacetimedb-standalone` on 127.0.0.1: start, wait until it answers,
//! find one Khala started earlier, stop it, and kill -9 / restart it for crash tests.
//!
//! Khala only ever signals a process whose pid it wrote itself and whose command line
//! still names this data dir, and it only writes inside a data dir it created (marked by
//! [`MARKER`]).

use crate::engine::Engine;
use crate::error::{Result, ToolError};
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The file that marks a directory as a Khala server data dir.
pub const MARKER: &str = ".khala-server";

/// A directory Khala owns: server data, keys, pid file, log, owner token, env file.
#[derive(Debug, Clone)]
pub struct ServerDir {
    pub root: PathBuf,
}

impl ServerDir {
    /// Opens `root`, creating it if missing. A non-empty directory without the marker is
    /// refused: Khala never writes into (or deletes from) what it did not create.
    pub fn open_or_create(root: &Path) -> Result<ServerDir> {
        let io = |what: &str, e| ToolError::io(format!("{what} {}", root.display()), e);
        if root.exists() {
            if !root.is_dir() {
                return Err(ToolError::ForeignDataDir { path: root.into(), found: "a file, not a directory".into() });
            }
            if !root.join(MARKER).exists() {
                let entries: Vec<String> = fs::read_dir(root)
                    .map_err(|e| io("reading", e))?
                    .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
                    .collect();
                if !entries.is_empty() {
                    let mut found = entries.into_iter().take(5).collect::<Vec<_>>().join(", ");
                    found.insert_str(0, "for example ");
                    return Err(ToolError::ForeignDataDir { path: root.into(), found });
                }
            }
        }
        fs::create_dir_all(root.join("keys")).map_err(|e| io("creating", e))?;
        fs::write(root.join(MARKER), "This directory holds a SpacetimeDB server run by Khala.\n").map_err(|e| io("writing the marker in", e))?;
        Ok(ServerDir { root: root.into() })
    }

    pub fn stdb_dir(&self) -> PathBuf {
        self.root.join("stdb")
    }
    pub fn pid_file(&self) -> PathBuf {
        self.root.join("server.pid")
    }
    pub fn log_file(&self) -> PathBuf {
        self.root.join("server.log")
    }
    pub fn token_file(&self) -> PathBuf {
        self.root.join("owner.token")
    }
    /// The runtime mirror identity's token (a publisher, not the owner).
    pub fn mirror_token_file(&self) -> PathBuf {
        self.root.join("mirror.token")
    }
    pub fn env_file(&self) -> PathBuf {
        self.root.join("khala.env")
    }
    fn public_key(&self) -> PathBuf {
        self.root.join("keys").join("id_ecdsa.pub")
    }
    fn private_key(&self) -> PathBuf {
        self.root.join("keys").join("id_ecdsa")
    }
}

/// Whether the server process outlives the process that started it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifetime {
    /// `khala up`: the server keeps running after the command exits.
    Detached,
    /// Tests: the server gets SIGKILL when this process dies, however it dies.
    TiedToThisProcess,
}

/// A running server that this process started or found.
#[derive(Debug)]
pub struct ServerProcess {
    pub dir: ServerDir,
    pub port: u16,
    pub pid: u32,
    child: Option<Child>,
}

pub fn url_for(port: u16) -> String {
    format!("http://127.0.0.1:{port}")
}

/// Whether something answers `/v1/ping` at `url`.
pub fn answers(url: &str) -> bool {
    let client = reqwest::blocking::Client::builder().timeout(Duration::from_secs(2)).build();
    client.is_ok_and(|c| c.get(format!("{url}/v1/ping")).send().is_ok_and(|r| r.status().is_success()))
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| ToolError::io("finding a free port", e))?;
    listener.local_addr().map(|a| a.port()).map_err(|e| ToolError::io("finding a free port", e))
}

fn port_is_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// The last `max` bytes of a log file, for error messages.
pub fn log_tail(path: &Path, max: u64) -> String {
    let Ok(mut file) = fs::File::open(path) else { return String::new() };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut text = String::new();
    let _ = file.read_to_string(&mut text);
    text
}

/// Spawns `command` from one long-lived thread. `PR_SET_PDEATHSIG` fires when the
/// *thread* that forked the child ends, so children tied to this process must be forked
/// by a thread that lives as long as the process.
fn spawn_tied(mut command: Command) -> std::io::Result<Child> {
    type Request = (Command, mpsc::Sender<std::io::Result<Child>>);
    static SPAWNER: OnceLock<std::sync::Mutex<mpsc::Sender<Request>>> = OnceLock::new();
    let sender = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("khala-server-spawner".into())
            .spawn(move || {
                for (mut command, reply) in rx {
                    let _ = reply.send(command.spawn());
                }
            })
            .expect("spawning a thread");
        std::sync::Mutex::new(tx)
    });
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let (tx, rx) = mpsc::channel();
    sender.lock().map_err(|_| std::io::Error::other("spawner lock poisoned"))?.send((command, tx)).map_err(std::io::Error::other)?;
    rx.recv().map_err(std::io::Error::other)?
}

impl ServerProcess {
    /// Starts a server on a free loopback port (see [`ServerProcess::start`]). A free port
    /// can be taken again before the server binds it (another test's server, or a
    /// connection's ephemeral port): then it tries another one, five times at most.
    pub fn start_on_a_free_port(engine: &Engine, dir: &ServerDir, lifetime: Lifetime, timeout: Duration) -> Result<ServerProcess> {
        let mut attempts = 0;
        loop {
            match ServerProcess::start(engine, dir, free_port()?, lifetime, timeout) {
                Err(ToolError::PortInUse { port }) if attempts < 5 => {
                    log::debug!("port {port} was taken before the server could bind it; trying another");
                    attempts += 1;
                }
                started => return started,
            }
        }
    }

    /// Starts a server on `127.0.0.1:port` with its data in `dir`, and waits until it
    /// answers (at most `timeout`).
    pub fn start(engine: &Engine, dir: &ServerDir, port: u16, lifetime: Lifetime, timeout: Duration) -> Result<ServerProcess> {
        if !port_is_free(port) {
            return Err(ToolError::PortInUse { port });
        }
        let log_path = dir.log_file();
        let log = fs::OpenOptions::new().create(true).append(true).open(&log_path).map_err(|e| ToolError::io("opening the server log", e))?;
        let log_err = log.try_clone().map_err(|e| ToolError::io("opening the server log", e))?;
        let mut command = Command::new(&engine.standalone);
        command
            .arg("start")
            .arg("--data-dir")
            .arg(dir.stdb_dir())
            .args(["--listen-addr", &format!("127.0.0.1:{port}")])
            .arg("--jwt-pub-key-path")
            .arg(dir.public_key())
            .arg("--jwt-priv-key-path")
            .arg(dir.private_key())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        let child = match lifetime {
            Lifetime::Detached => {
                // A server that outlives `khala up` must not keep the descriptors it was
                // started with (a lock file held by whoever ran `khala up`, a pipe a
                // caller waits on to close): mark all but stdio close-on-exec in the child
                // (CLOSE_RANGE_CLOEXEC; on kernels without it, nothing changes).
                // SAFETY: close_range is a raw syscall, async-signal-safe.
                unsafe {
                    command.pre_exec(|| {
                        const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
                        libc::syscall(libc::SYS_close_range, 3 as libc::c_uint, libc::c_uint::MAX, CLOSE_RANGE_CLOEXEC);
                        Ok(())
                    });
                }
                command.process_group(0).spawn()
            }
            Lifetime::TiedToThisProcess => spawn_tied(command),
        }
        .map_err(|e| ToolError::io(format!("starting {}", engine.standalone.display()), e))?;
        let mut server = ServerProcess { dir: dir.clone(), port, pid: child.id(), child: Some(child) };
        server.wait_ready(timeout)?;
        fs::write(dir.pid_file(), format!("{} {}\n", server.pid, port)).map_err(|e| ToolError::io("writing the pid file", e))?;
        Ok(server)
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let url = self.url();
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(ToolError::ServerExited {
                        status: status.to_string(),
                        log: self.dir.log_file(),
                        tail: log_tail(&self.dir.log_file(), 2000),
                    });
                }
            }
            if answers(&url) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.kill9();
                return Err(ToolError::ServerUnresponsive { url, secs: timeout.as_secs(), log: self.dir.log_file() });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The server recorded in `dir`'s pid file, if that process is still a
    /// `spacetimedb-standalone` using this data dir and answers on its port.
    pub fn find(dir: &ServerDir) -> Option<ServerProcess> {
        let text = fs::read_to_string(dir.pid_file()).ok()?;
        let mut words = text.split_whitespace();
        let pid: u32 = words.next()?.parse().ok()?;
        let port: u16 = words.next()?.parse().ok()?;
        if !is_our_server(pid, dir) {
            return None;
        }
        Some(ServerProcess { dir: dir.clone(), port, pid, child: None })
    }

    pub fn url(&self) -> String {
        url_for(self.port)
    }

    /// SIGKILL, as a crash would. The data dir is kept.
    pub fn kill9(&mut self) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid as i32), nix::sys::signal::Signal::SIGKILL);
        self.reap(Duration::from_secs(10));
    }

    /// SIGSTOP: the process stops answering while its sockets stay open (a hung
    /// server, for the drills). [`ServerProcess::resume`] undoes it.
    pub fn pause(&self) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid as i32), nix::sys::signal::Signal::SIGSTOP);
    }

    /// SIGCONT after [`ServerProcess::pause`].
    pub fn resume(&self) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid as i32), nix::sys::signal::Signal::SIGCONT);
    }

    /// SIGTERM, then SIGKILL if it has not exited after `grace`.
    pub fn stop(&mut self, grace: Duration) {
        let pid = nix::unistd::Pid::from_raw(self.pid as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        if !self.reap(grace) {
            self.kill9();
        }
        let _ = fs::remove_file(self.dir.pid_file());
    }

    /// Waits until the process is gone. Returns whether it went within `timeout`.
    fn reap(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let gone = match self.child.as_mut() {
                Some(child) => child.try_wait().map(|s| s.is_some()).unwrap_or(true),
                None => !Path::new(&format!("/proc/{}", self.pid)).exists() || is_zombie(self.pid),
            };
            if gone {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the server again on the same data dir and port (after `kill9` or `stop`).
    pub fn restart(&mut self, engine: &Engine, lifetime: Lifetime, timeout: Duration) -> Result<()> {
        let started = ServerProcess::start(engine, &self.dir, self.port, lifetime, timeout)?;
        *self = started;
        Ok(())
    }
}

fn is_zombie(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')))
}

/// Whether `pid` is a live `spacetimedb-standalone` whose command line names `dir`.
fn is_our_server(pid: u32, dir: &ServerDir) -> bool {
    let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else { return false };
    let args: Vec<String> = cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
    let stdb = dir.stdb_dir().to_string_lossy().into_owned();
    !is_zombie(pid)
        && args.first().is_some_and(|a| a.ends_with(crate::engine::STANDALONE))
        && args.contains(&stdb)
}
