//! The zygote: one `wasmbox-worker --zygote` per pool, the fork server new workers come
//! from (see the worker's `zygote` module). A respawn or a tenant switch is then a fork
//! of a process that has loaded and relocated the worker binary and its engine library,
//! instead of an exec.
//!
//! The zygote forks with `CLONE_PARENT`: its workers are the supervisor's children, so the
//! slot tasks reap, kill and read the exit status of a forked worker as of one they
//! started by exec ([`Forked`], through a pidfd). If the zygote dies it is started again on
//! the next spawn (counted in `restarts`), and a spawn it cannot serve falls back to exec,
//! so the pool keeps serving either way.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::sys::wait::{WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::io::unix::AsyncFd;
use wasmbox_protocol::{ForkRequest, FromWorker, PROTOCOL_VERSION, ToWorker};

use super::connection::Connection;
use super::spawn::{Process, Spawned, Spawner, WorkerLaunch, spawn_worker};

/// How long a fork request may take before the zygote counts as broken.
const FORK_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Zygote {
    launch: Arc<WorkerLaunch>,
    spawner: Spawner,
    running: tokio::sync::Mutex<Option<Running>>,
    starts: AtomicU64,
}

struct Running {
    process: Process,
    conn: Connection,
}

impl Zygote {
    pub fn new(launch: Arc<WorkerLaunch>, spawner: Spawner) -> Self {
        Zygote { launch, spawner, running: tokio::sync::Mutex::new(None), starts: AtomicU64::new(0) }
    }

    /// Times the zygote was started again after the first.
    pub fn restarts(&self) -> u64 {
        self.starts.load(Ordering::Relaxed).saturating_sub(1)
    }

    /// Forks the worker of `slot` (running as `user`, entering the cgroups whose
    /// placement descriptors are `placement`). A zygote that does not answer is
    /// replaced and asked once more.
    pub async fn fork(&self, slot: usize, user: Option<(u32, u32)>, placement: &[RawFd]) -> io::Result<Spawned> {
        let mut running = self.running.lock().await;
        let mut last = io::Error::other("zygote not started");
        for _ in 0..2 {
            if running.is_none() {
                match self.start().await {
                    Ok(r) => *running = Some(r),
                    Err(e) => {
                        last = e;
                        continue;
                    }
                }
            }
            let Some(zygote) = running.as_mut() else { continue };
            match fork_in(zygote, slot, user, placement).await {
                Ok(spawned) => return Ok(spawned),
                Err(e) => {
                    tracing::warn!(error = %e, "the zygote failed; starting a new one");
                    if let Some(mut broken) = running.take() {
                        let _ = broken.process.start_kill();
                        let _ = broken.process.wait().await;
                    }
                    last = e;
                }
            }
        }
        Err(last)
    }

    /// Stops the zygote (at shutdown).
    pub async fn stop(&self) {
        if let Some(mut running) = self.running.lock().await.take() {
            let _ = running.process.start_kill();
            let _ = running.process.wait().await;
        }
    }

    async fn start(&self) -> io::Result<Running> {
        let launch = self.launch.clone();
        let Spawned { mut child, socket } = self.spawner.run(move || spawn_worker(&launch, None, Vec::new())).await?;
        let mut conn = Connection::new(socket, 0)?;
        let hello = tokio::time::timeout(Duration::from_secs(30), conn.recv()).await;
        match hello {
            Ok(Ok((FromWorker::Hello(h), _))) if h.protocol == PROTOCOL_VERSION => {
                self.starts.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(pid = h.pid, "zygote ready");
                Ok(Running { process: child, conn })
            }
            other => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                Err(io::Error::other(format!("the zygote did not start: {other:?}")))
            }
        }
    }
}

async fn fork_in(
    zygote: &mut Running,
    slot: usize,
    user: Option<(u32, u32)>,
    placement: &[RawFd],
) -> io::Result<Spawned> {
    let (ours, theirs) = UnixStream::pair()?;
    let mut fds = vec![OwnedFd::from(theirs)];
    for &fd in placement {
        // SAFETY: the placement descriptors are the slot cgroup's open files, alive for
        // this call; they are duplicated, not taken.
        fds.push(unsafe { BorrowedFd::borrow_raw(fd) }.try_clone_to_owned()?);
    }
    let request = ToWorker::Fork(ForkRequest { slot, user, placement_fds: placement.len() as u32 });
    let answer = tokio::time::timeout(FORK_TIMEOUT, async {
        zygote.conn.send_with_fds(&request, &[], &fds).await?;
        zygote.conn.recv().await
    })
    .await
    .map_err(|_| io::Error::other("the zygote did not answer"))?
    .map_err(|e| io::Error::other(e.to_string()))?;
    drop(fds);
    match answer {
        (FromWorker::Forked { pid }, _) => {
            let child = Forked::adopt(pid)?;
            ours.set_nonblocking(true)?;
            Ok(Spawned { child: Process::Forked(child), socket: ours })
        }
        (other, _) => Err(io::Error::other(format!("the zygote answered {other:?}"))),
    }
}

/// A worker the zygote forked: a child of the supervisor, watched through a pidfd.
pub struct Forked {
    pid: Pid,
    pidfd: AsyncFd<OwnedFd>,
    status: Option<ExitStatus>,
}

impl Forked {
    fn adopt(pid: u32) -> io::Result<Forked> {
        let pid = Pid::from_raw(i32::try_from(pid).map_err(|_| io::Error::other("bad pid"))?);
        // SAFETY: pidfd_open(2) takes a pid and flags and returns a new descriptor. The pid
        // is our own unreaped child, so it cannot name another process.
        let fd = unsafe { nix::libc::syscall(nix::libc::SYS_pidfd_open, pid.as_raw(), 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel just returned this descriptor to us.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        // SAFETY: the AsyncFd owns the OwnedFd, which stays open and the same for its life.
        let pidfd = unsafe { AsyncFd::register(fd) }.map_err(|e| io::Error::other(e.to_string()))?;
        Ok(Forked { pid, pidfd, status: None })
    }

    pub(super) async fn wait(&mut self) -> io::Result<ExitStatus> {
        loop {
            if let Some(status) = self.status {
                return Ok(status);
            }
            if let Some(status) = self.try_reap()? {
                return Ok(status);
            }
            // Readable once the process has exited.
            let mut ready = self.pidfd.readable().await?;
            ready.clear_ready();
        }
    }

    fn try_reap(&mut self) -> io::Result<Option<ExitStatus>> {
        let raw = match nix::sys::wait::waitpid(self.pid, Some(WaitPidFlag::WNOHANG)).map_err(io::Error::from)? {
            WaitStatus::Exited(_, code) => (code & 0xff) << 8,
            WaitStatus::Signaled(_, signal, core) => signal as i32 | if core { 0x80 } else { 0 },
            _ => return Ok(None),
        };
        let status = ExitStatus::from_raw(raw);
        self.status = Some(status);
        Ok(Some(status))
    }

    pub(super) fn start_kill(&mut self) -> io::Result<()> {
        if self.status.is_some() {
            return Ok(());
        }
        // SAFETY: pidfd_send_signal(2) on our own pidfd: it reaches exactly this process.
        let rc = unsafe {
            nix::libc::syscall(
                nix::libc::SYS_pidfd_send_signal,
                self.pidfd.as_fd().as_raw_fd(),
                Signal::SIGKILL as i32,
                std::ptr::null::<u8>(),
                0,
            )
        };
        if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
    }
}

impl Drop for Forked {
    /// As `kill_on_drop` for exec'd workers: a worker nobody waits for is killed and reaped.
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.start_kill();
            let pid = self.pid;
            let _ = std::thread::Builder::new().name("wasmbox-reap".into()).spawn(move || {
                let _ = nix::sys::wait::waitpid(pid, None);
            });
        }
    }
}
