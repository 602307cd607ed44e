//! Why the pool could not give a worker, start one, or finish an invocation; and why
//! workers ended, as counted for operators.

use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

/// Why a worker could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("cannot start worker binary {binary}")]
    Spawn {
        binary: String,
        #[source]
        source: std::io::Error,
    },
    #[error("worker {binary} did not complete its handshake: {detail}")]
    Handshake { binary: String, detail: String },
    #[error(
        "worker binary {binary} speaks protocol {theirs} but this supervisor speaks {ours}; \
         install wasmbox and wasmbox-worker from the same build"
    )]
    ProtocolMismatch { binary: String, theirs: u32, ours: u32 },
}

/// Why no worker could be had.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AcquireError {
    #[error("queue is full ({depth} requests waiting)")]
    QueueFull { depth: usize },
    #[error("shutting down")]
    ShuttingDown,
}

/// Why an invocation produced no result.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvokeFailure {
    #[error("worker died during the invocation: {detail}")]
    WorkerDied { detail: String },
    #[error("function ran past its deadline and grace period; worker killed")]
    HardDeadline,
    #[error("shutting down")]
    ShuttingDown,
    /// The kernel OOM-killed the worker: it went past its cgroup memory limit.
    #[error("worker was killed by the kernel for exceeding its memory limit")]
    OomKilled { limit_bytes: Option<u64> },
    /// The worker's cgroup limits could not be written; the invocation did not run.
    #[error("cannot apply the invocation's limits: {0}")]
    Limits(String),
    /// The worker made a syscall outside its seccomp allow-list and the kernel killed it.
    #[error("worker was killed by its seccomp filter (SIGSYS)")]
    SeccompViolation,
    /// The module file could not be opened for a worker that needs it; nothing was sent.
    #[error("cannot open the module file {0}")]
    ModuleUnreadable(String),
}

/// Why a worker process ended while the pool was running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitReason {
    /// It died on its own: a crash, a signal from outside, an unexpected exit.
    Crash,
    /// The kernel killed it at its cgroup's memory limit.
    OomKill,
    /// The kernel killed it for a syscall outside the seccomp allow-list.
    Seccomp,
    /// The supervisor killed it at an invocation's hard deadline.
    TimeoutKill,
    /// It served `WASMBOX_WORKER_MAX_INVOCATIONS` and was replaced.
    Recycle,
    /// The supervisor stopped it for another reason (a protocol error, an exchange
    /// abandoned halfway).
    Discarded,
    /// It served another tenant than the one its slot must run now (or a spare was
    /// wanted): replaced by a fresh process.
    TenantSwitch,
}

/// Worker exits counted by [`ExitReason`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct WorkerExits {
    pub crash: u64,
    pub oom_kill: u64,
    pub seccomp: u64,
    pub timeout_kill: u64,
    pub recycle: u64,
    pub discarded: u64,
    pub tenant_switch: u64,
}

impl WorkerExits {
    pub(super) fn count(&mut self, reason: ExitReason) {
        let n = match reason {
            ExitReason::Crash => &mut self.crash,
            ExitReason::OomKill => &mut self.oom_kill,
            ExitReason::Seccomp => &mut self.seccomp,
            ExitReason::TimeoutKill => &mut self.timeout_kill,
            ExitReason::Recycle => &mut self.recycle,
            ExitReason::Discarded => &mut self.discarded,
            ExitReason::TenantSwitch => &mut self.tenant_switch,
        };
        *n += 1;
    }

    /// (label, count) for every reason.
    pub fn by_reason(&self) -> [(&'static str, u64); 7] {
        [
            ("crash", self.crash),
            ("oom_kill", self.oom_kill),
            ("seccomp", self.seccomp),
            ("timeout_kill", self.timeout_kill),
            ("recycle", self.recycle),
            ("discarded", self.discarded),
            ("tenant_switch", self.tenant_switch),
        ]
    }
}

/// "exited with status 1", "killed by signal 9 (SIGKILL)".
pub fn describe_exit(status: ExitStatus) -> String {
    if let Some(code) = status.code() {
        return format!("exited with status {code}");
    }
    match status.signal() {
        Some(sig) => match nix::sys::signal::Signal::try_from(sig) {
            Ok(name) => format!("killed by signal {sig} ({name})"),
            Err(_) => format!("killed by signal {sig}"),
        },
        None => "ended".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_descriptions_name_the_signal() {
        assert_eq!(describe_exit(ExitStatus::from_raw(9)), "killed by signal 9 (SIGKILL)");
        assert_eq!(describe_exit(ExitStatus::from_raw(1 << 8)), "exited with status 1");
    }
}
