//! The four servers under test, each started as its own process on a loopback port.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;

/// Which server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum Mode {
    /// (a) WasmBox: supervisor and pre-forked worker pool, cgroups on where the host allows.
    WasmBox,
    /// (b) the same engine and module cache in one process, on a thread pool.
    InProcess,
    /// (c) a fresh worker process per request.
    SpawnPerRequest,
    /// (d) hyper without Wasm.
    PlainHttp,
}

impl Mode {
    pub const ALL: [Mode; 4] = [Mode::WasmBox, Mode::InProcess, Mode::SpawnPerRequest, Mode::PlainHttp];

    pub fn letter(self) -> char {
        match self {
            Mode::WasmBox => 'a',
            Mode::InProcess => 'b',
            Mode::SpawnPerRequest => 'c',
            Mode::PlainHttp => 'd',
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            Mode::WasmBox => "(a) WasmBox",
            Mode::InProcess => "(b) in-process",
            Mode::SpawnPerRequest => "(c) spawn per request",
            Mode::PlainHttp => "(d) plain hyper",
        }
    }

    pub fn parse(letter: char) -> Option<Mode> {
        Mode::ALL.into_iter().find(|m| m.letter() == letter)
    }
}

/// Where the binaries and inputs are.
#[derive(Debug, Clone)]
pub struct Setup {
    pub wasmbox: PathBuf,
    pub worker: PathBuf,
    /// This harness's own binary (it runs the comparison servers).
    pub harness: PathBuf,
    pub functions: PathBuf,
    /// Artifact cache shared by every mode (each engine/user keeps its own subdirectory).
    pub cache_dir: PathBuf,
    /// Workers of (a) and threads of (b): the same parallelism for both.
    pub workers: usize,
    /// Engine of (a), (b) and (c).
    pub engine: String,
}

impl Setup {
    /// This harness as comparison server `subcommand` (mode b or c), with what both share.
    fn wasm_server(&self, subcommand: &str) -> Command {
        let mut cmd = Command::new(&self.harness);
        cmd.arg(subcommand)
            .arg("--functions")
            .arg(&self.functions)
            .arg("--cache-dir")
            .arg(&self.cache_dir)
            .arg("--engine")
            .arg(&self.engine);
        cmd
    }
}

/// A running server, stopped when dropped.
#[derive(Debug)]
pub struct Server {
    pub mode: Mode,
    pub addr: SocketAddr,
    child: Child,
    /// The server's stdout and stderr, removed when it stops.
    log: PathBuf,
    /// WasmBox's session state directory (its own: a supervisor locks it), removed when it stops.
    state_dir: Option<PathBuf>,
}

fn next_server_number() -> usize {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

impl Server {
    pub fn start(mode: Mode, setup: &Setup) -> anyhow::Result<Server> {
        Server::start_with_env(mode, setup, &[])
    }

    /// Like [`Server::start`], with extra environment for the server process.
    pub fn start_with_env(mode: Mode, setup: &Setup, env: &[(&str, &str)]) -> anyhow::Result<Server> {
        let number = next_server_number();
        let scratch = |what: &str| {
            std::env::temp_dir().join(format!("wasmbox-bench-{}-{}-{number}{what}", std::process::id(), mode.letter()))
        };
        let mut cmd;
        let mut state_dir = None;
        match mode {
            Mode::WasmBox => {
                cmd = Command::new(&setup.wasmbox);
                cmd.env("WASMBOX_LISTEN", "127.0.0.1:0")
                    .env("WASMBOX_FUNCTIONS_DIR", &setup.functions)
                    .env("WASMBOX_CACHE_DIR", &setup.cache_dir)
                    .env("WASMBOX_WORKER_BIN", &setup.worker)
                    .env("WASMBOX_WORKERS", setup.workers.to_string())
                    .env("WASMBOX_ENGINE", &setup.engine)
                    .env("WASMBOX_CGROUP_PARENT", format!("wasmbox-bench-{}-{number}", std::process::id()));
                // Not the per-user default: two supervisors of one run (or a run and a
                // supervisor someone else started) would contend for its lock.
                let dir = scratch("-state");
                cmd.env("WASMBOX_STATE_DIR", &dir);
                state_dir = Some(dir);
            }
            Mode::InProcess => {
                cmd = setup.wasm_server("serve-inproc");
                cmd.arg("--threads").arg(setup.workers.to_string());
            }
            Mode::SpawnPerRequest => {
                cmd = setup.wasm_server("serve-spawn");
                cmd.arg("--worker").arg(&setup.worker);
            }
            Mode::PlainHttp => {
                cmd = Command::new(&setup.harness);
                cmd.arg("serve-plain");
            }
        }
        cmd.envs(env.iter().copied());
        // Output goes to a file, as a container runtime would keep it: draining a pipe from
        // here would cost the harness CPU per log line and could stall the server on a full
        // pipe. The supervisor logs "listening on ... addr=A"; the comparison servers print
        // "listening on A".
        let log_path = scratch(".log");
        let log = std::fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", mode.title()))?;
        let mut server = Server { mode, addr: "127.0.0.1:0".parse()?, child, log: log_path, state_dir };
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let text = std::fs::read_to_string(&server.log).unwrap_or_default();
            if let Some(addr) = text.lines().find_map(listen_address) {
                server.addr = addr;
                return Ok(server);
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                let tail: Vec<&str> = text.lines().rev().take(40).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                anyhow::bail!("{} exited ({status}) before listening:\n{}", mode.title(), tail.join("\n"));
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "{} did not start listening within 60 s (log: {})",
                mode.title(),
                server.log.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Stops the server (SIGTERM, so WasmBox removes its cgroups; SIGKILL after 10 s).
    pub fn stop(mut self) {
        self.terminate();
    }

    fn terminate(&mut self) {
        use nix::sys::signal::{Signal, kill};
        let pid = nix::unistd::Pid::from_raw(self.pid());
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        let _ = kill(pid, Signal::SIGTERM);
        for _ in 0..100 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.terminate();
        let _ = std::fs::remove_file(&self.log);
        if let Some(dir) = &self.state_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn listen_address(line: &str) -> Option<SocketAddr> {
    if !line.contains("listening on") {
        return None;
    }
    if let Some(rest) = line.split("addr=").nth(1) {
        return rest.split_whitespace().next()?.parse().ok();
    }
    line.split("listening on ").nth(1)?.split_whitespace().next()?.trim_start_matches("http://").parse().ok()
}

/// The binary `name` next to this harness (cargo puts a workspace's binaries together).
pub fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe()?;
    let dir = me.parent().context("harness binary has no directory")?;
    // Test binaries live one level down, in deps/.
    let candidates = [dir.join(name), dir.parent().map(|p| p.join(name)).unwrap_or_default()];
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .with_context(|| format!("{name} not found next to {} (build it: cargo build --bins)", me.display()))
}

/// Resident memory of process `pid`, in KiB (0 if it is gone).
pub fn rss_kib(pid: i32) -> u64 {
    procfs::process::Process::new(pid).and_then(|p| p.status()).ok().and_then(|s| s.vmrss).unwrap_or(0)
}

/// CPU time (user + system) used so far by a server process, µs: `own` is the process's
/// own plus that of the children it has waited for (the spawn-per-request processes),
/// `children` that of its live children (WasmBox's workers).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuUse {
    pub own_us: u64,
    pub children_us: u64,
}

impl CpuUse {
    pub fn of(pid: i32) -> CpuUse {
        let ticks_us = |t: u64| t.saturating_mul(1_000_000) / procfs::ticks_per_second().max(1);
        let stat = |pid: i32| procfs::process::Process::new(pid).and_then(|p| p.stat()).ok();
        let own = stat(pid).map(|s| s.utime + s.stime + s.cutime.max(0) as u64 + s.cstime.max(0) as u64);
        let children: u64 = children(pid)
            .into_iter()
            .filter_map(stat)
            .map(|s| s.utime + s.stime + s.cutime.max(0) as u64 + s.cstime.max(0) as u64)
            .sum();
        CpuUse { own_us: ticks_us(own.unwrap_or(0)), children_us: ticks_us(children) }
    }

    /// What was used between `earlier` and `self` (a child that exited in between takes
    /// its share with it, so this never goes below zero).
    pub fn since(self, earlier: CpuUse) -> CpuUse {
        CpuUse {
            own_us: self.own_us.saturating_sub(earlier.own_us),
            children_us: self.children_us.saturating_sub(earlier.children_us),
        }
    }

    pub fn add(&mut self, other: CpuUse) {
        self.own_us += other.own_us;
        self.children_us += other.children_us;
    }
}

/// Memory only `pid` maps (private clean and dirty pages, from smaps_rollup), KiB: what the
/// process costs on top of what it shares with its siblings (the binary's code, the page
/// cache of a module file), so what one more worker adds.
pub fn private_kib(pid: i32) -> u64 {
    let Ok(rollup) = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")) else { return 0 };
    rollup
        .lines()
        .filter(|l| l.starts_with("Private_Clean:") || l.starts_with("Private_Dirty:"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}

/// The live children of `pid` (of any of its threads: WasmBox forks from a thread of its own).
/// The worker processes among `pid`'s children: neither its zygote nor a compile process.
pub fn children(pid: i32) -> Vec<i32> {
    all_children(pid).into_iter().filter(|&c| !is_zygote(c) && !is_compile_process(c)).collect()
}

/// `pid`'s zygote (the process WasmBox forks workers from), if it has one.
pub fn zygote(pid: i32) -> Option<i32> {
    all_children(pid).into_iter().find(|&c| is_zygote(c))
}

fn is_zygote(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "wasmbox-zygote")
}

fn is_compile_process(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| c.split(|b| *b == 0).any(|a| a == b"--compile-artifact"))
}

/// Every live child of `pid`.
fn all_children(pid: i32) -> Vec<i32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    let mut out: Vec<i32> = tasks
        .filter_map(Result::ok)
        .flat_map(|t| {
            std::fs::read_to_string(t.path().join("children"))
                .unwrap_or_default()
                .split_whitespace()
                .filter_map(|s| s.parse().ok())
                .collect::<Vec<i32>>()
        })
        .filter(|&child| {
            // A killed child stays listed as a zombie until it is reaped.
            std::fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X')))
                .unwrap_or(false)
        })
        .collect();
    out.sort_unstable();
    out
}

/// A path as given, or made absolute against the working directory.
pub fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_listening_lines_are_understood() {
        let supervisor =
            "2026-11-21T14:51:47Z  INFO wasmbox_supervisor: listening on http://127.0.0.1:18123 addr=127.0.0.1:18123";
        assert_eq!(listen_address(supervisor), Some("127.0.0.1:18123".parse().unwrap()));
        assert_eq!(listen_address("listening on 127.0.0.1:40001"), Some("127.0.0.1:40001".parse().unwrap()));
        assert_eq!(listen_address("starting worker pool"), None);
    }
}
