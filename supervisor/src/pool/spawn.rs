//! Starting worker processes.
//!
//! All forks happen on one dedicated, long-lived thread. PR_SET_PDEATHSIG fires when the
//! *thread* that forked a child exits, not the process; forking from a tokio blocking-pool
//! thread (which exits when idle) would kill healthy workers. This thread lives as long as
//! the supervisor, so workers die exactly when the supervisor does, also on SIGKILL.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::mpsc;

use nix::sys::signal::Signal;
use tokio::sync::oneshot;

/// The fd number a worker finds its socket at.
pub const WORKER_SOCKET_FD: RawFd = 3;

/// How workers are launched.
#[derive(Debug, Clone)]
pub struct WorkerLaunch {
    pub binary: PathBuf,
    pub engine: String,
    pub cache_dir: Option<PathBuf>,
    pub module_cache_entries: usize,
    pub max_module_bytes: u64,
    pub log_filter: String,
    /// Whether workers log JSON lines (LOG_FORMAT=json) or text, as the supervisor does:
    /// they share its stderr.
    pub log_json: bool,
    /// Engine flags (`Config::engine_args`).
    pub engine_args: Vec<String>,
    /// Hardening flags for `wasmbox-worker` (see `crate::hardening`).
    pub hardening_args: Vec<String>,
    /// Layers a worker's hello must report.
    pub hardening_layers: Vec<&'static str>,
    /// The (uid, gid) each slot's workers switch to, by slot (empty: no switch).
    pub users: Vec<(u32, u32)>,
}

/// A started worker process and the supervisor's end of its socket.
pub struct Spawned {
    pub child: Process,
    pub socket: UnixStream,
}

/// A child process of the supervisor: started by exec, or forked by the zygote (then
/// adopted through a pidfd; it is the supervisor's child all the same, thanks to
/// `CLONE_PARENT`, so only the supervisor reaps it and its pid cannot be reused before).
pub enum Process {
    Exec(tokio::process::Child),
    Forked(super::zygote::Forked),
    /// A worker simulated in the supervisor's own process (the pool's tests).
    #[cfg(test)]
    Simulated(super::tests::Simulated),
}

impl Process {
    /// Waits for the process to end and reaps it.
    pub async fn wait(&mut self) -> io::Result<std::process::ExitStatus> {
        match self {
            Process::Exec(child) => child.wait().await,
            Process::Forked(child) => child.wait().await,
            #[cfg(test)]
            Process::Simulated(child) => child.wait().await,
        }
    }

    /// Sends SIGKILL (nothing if it was reaped already).
    pub fn start_kill(&mut self) -> io::Result<()> {
        match self {
            Process::Exec(child) => child.start_kill(),
            Process::Forked(child) => child.start_kill(),
            #[cfg(test)]
            Process::Simulated(child) => child.start_kill(),
        }
    }
}

/// How the pool starts the worker of a slot. The pool checks what it started (handshake,
/// cgroup, hardening, engine) the same way whoever started it.
pub trait Launch: Send + Sync + 'static {
    /// Starts the worker of `slot`, which enters the cgroups whose placement descriptors
    /// are `placement` before it runs any code.
    fn launch(&self, slot: usize, placement: Vec<RawFd>) -> BoxFuture<'_, io::Result<Spawned>>;

    /// Counters for `/stats`.
    fn counts(&self) -> LaunchCounts {
        LaunchCounts::default()
    }

    /// Stops whatever the launcher keeps running besides the workers (at shutdown).
    fn stop(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// How workers were started, for operators.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LaunchCounts {
    /// Times the zygote was started again after the first.
    pub zygote_restarts: u64,
    /// Workers started by exec because the zygote could not fork them.
    pub exec_spawns: u64,
}

/// Workers forked by the zygote (`WASMBOX_ZYGOTE`), or started by exec when there is none
/// or it cannot fork one.
pub struct ProcessLauncher {
    launch: std::sync::Arc<WorkerLaunch>,
    spawner: Spawner,
    zygote: Option<super::zygote::Zygote>,
    exec_spawns: std::sync::atomic::AtomicU64,
}

impl ProcessLauncher {
    pub fn new(launch: WorkerLaunch, spawner: Spawner, zygote: bool) -> Self {
        let launch = std::sync::Arc::new(launch);
        let zygote = zygote.then(|| super::zygote::Zygote::new(launch.clone(), spawner.clone()));
        ProcessLauncher { launch, spawner, zygote, exec_spawns: Default::default() }
    }
}

impl Launch for ProcessLauncher {
    fn launch(&self, slot: usize, placement: Vec<RawFd>) -> BoxFuture<'_, io::Result<Spawned>> {
        Box::pin(async move {
            if let Some(zygote) = &self.zygote {
                let user = self.launch.users.get(slot).copied();
                match zygote.fork(slot, user, &placement).await {
                    Ok(spawned) => return Ok(spawned),
                    Err(e) => {
                        tracing::warn!(slot, error = %e, "the zygote cannot fork this worker; starting it by exec");
                        self.exec_spawns.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            }
            self.spawner.spawn(self.launch.clone(), slot, placement).await
        })
    }

    fn counts(&self) -> LaunchCounts {
        LaunchCounts {
            zygote_restarts: self.zygote.as_ref().map_or(0, super::zygote::Zygote::restarts),
            exec_spawns: self.exec_spawns.load(std::sync::atomic::Ordering::Relaxed),
        }
    }

    fn stop(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if let Some(zygote) = &self.zygote {
                zygote.stop().await;
            }
        })
    }
}

/// Something to run on the spawner thread (it forks).
type Job = Box<dyn FnOnce() + Send>;

/// Handle to the spawner thread.
#[derive(Clone)]
pub struct Spawner {
    jobs: mpsc::Sender<Job>,
}

impl Spawner {
    pub fn start(runtime: tokio::runtime::Handle) -> io::Result<Self> {
        let (jobs, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new().name("wasmbox-spawner".into()).spawn(move || {
            // tokio's child reaping needs the runtime context of the thread that spawns.
            let _guard = runtime.enter();
            for job in rx {
                job();
            }
        })?;
        Ok(Spawner { jobs })
    }

    /// Runs `start` on the spawner thread, so what it forks has that thread as the one
    /// whose exit its parent-death signal waits for.
    pub async fn run<T: Send + 'static>(
        &self,
        start: impl FnOnce() -> io::Result<T> + Send + 'static,
    ) -> io::Result<T> {
        let (reply, rx) = oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = reply.send(start());
        });
        self.jobs.send(job).map_err(|_| io::Error::other("spawner thread is gone"))?;
        rx.await.map_err(|_| io::Error::other("spawner thread is gone"))?
    }

    /// Starts the worker for `slot`; with `placement` (the slot's open placement files,
    /// see `cgroup::place_in_child`) it enters its cgroups between fork and exec.
    pub async fn spawn(
        &self,
        launch: std::sync::Arc<WorkerLaunch>,
        slot: usize,
        placement: Vec<RawFd>,
    ) -> io::Result<Spawned> {
        self.run(move || spawn_worker(&launch, Some(slot), placement)).await
    }
}

/// Starts the worker for `slot` by exec; `None`: the zygote (no slot, no user, no cgroup
/// of its own: its children place themselves).
pub(super) fn spawn_worker(launch: &WorkerLaunch, slot: Option<usize>, placement: Vec<RawFd>) -> io::Result<Spawned> {
    let (parent_end, child_end) = UnixStream::pair()?;
    let child_fd = child_end.as_raw_fd();
    let supervisor_pid = nix::unistd::getpid();

    let mut cmd = tokio::process::Command::new(&launch.binary);
    cmd.arg("--socket-fd").arg(WORKER_SOCKET_FD.to_string());
    match slot {
        Some(slot) => cmd.arg("--slot").arg(slot.to_string()),
        None => cmd.arg("--zygote"),
    };
    cmd.arg("--engine")
        .arg(&launch.engine)
        .arg("--module-cache-entries")
        .arg(launch.module_cache_entries.to_string())
        .arg("--max-module-bytes")
        .arg(launch.max_module_bytes.to_string())
        .arg("--log")
        .arg(&launch.log_filter);
    if launch.log_json {
        cmd.arg("--log-json");
    }
    if let Some(dir) = &launch.cache_dir {
        cmd.arg("--cache-dir").arg(dir);
    }
    cmd.args(&launch.engine_args).args(&launch.hardening_args);
    if let Some((uid, gid)) = slot.and_then(|slot| launch.users.get(slot)) {
        cmd.arg(format!("--user={uid}:{gid}"));
    }
    // The worker needs nothing from the supervisor's environment; guests get only the env
    // their function declares.
    cmd.env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        // Own process group: a Ctrl-C on the terminal reaches the supervisor, which drains
        // and then stops its workers, instead of killing workers mid-invocation.
        .process_group(0)
        .kill_on_drop(true);
    confine_child(&mut cmd, placement, supervisor_pid, child_fd);
    let child = cmd.spawn().map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", launch.binary.display())))?;
    drop(child_end);
    parent_end.set_nonblocking(true)?;
    Ok(Spawned { child: Process::Exec(child), socket: parent_end })
}

/// What every child the supervisor execs does between fork and exec: enter its cgroups
/// (`placement`, the slot's open placement files) first, set its parent-death signal, check
/// the supervisor is still its parent, and put `fd` at [`WORKER_SOCKET_FD`] (the socket of a
/// worker, the staging directory of a compile process).
pub(crate) fn confine_child(
    cmd: &mut tokio::process::Command,
    placement: Vec<RawFd>,
    supervisor_pid: nix::unistd::Pid,
    fd: RawFd,
) {
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe system calls (write, prctl, getppid, dup2, fcntl) on values it owns
    // (the placement list was allocated by the parent before fork); it allocates nothing
    // and takes no locks.
    unsafe {
        cmd.pre_exec(move || {
            // First: from here on everything this process does is confined and accounted.
            crate::cgroup::place_in_child(&placement)?;
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(io::Error::from)?;
            // The supervisor may have died between fork and prctl; then nobody would kill us.
            if nix::unistd::getppid() != supervisor_pid {
                return Err(io::Error::other("supervisor exited during spawn"));
            }
            if fd == WORKER_SOCKET_FD {
                // dup2 onto itself keeps FD_CLOEXEC; clear it so the descriptor survives exec.
                if nix::libc::fcntl(fd, nix::libc::F_SETFD, 0) == -1 {
                    return Err(io::Error::last_os_error());
                }
            } else if nix::libc::dup2(fd, WORKER_SOCKET_FD) == -1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}
