//! Hardening of the worker process before it runs any tenant code.
//!
//! A function that escaped the Wasm sandbox would find itself in this process; each layer
//! here takes something away from it. The supervisor decides which layers apply (on by
//! default where the kernel allows, each switchable) and passes them as flags; the worker
//! applies every one it was given or refuses to start, and reports the applied layers in
//! its hello. In order:
//!
//! 1. `close_fds`: every descriptor but stdin/stdout/stderr and the supervisor socket is
//!    closed as the first thing `main` does (the environment was already cleared at spawn).
//! 2. `netns`: a new network namespace with only a loopback interface, down: no network.
//!    Done before any thread exists, because namespaces belong to threads.
//! 3. (engine and artifact cache set up; the artifact directory becomes the working
//!    directory, so nothing below needs a path to it.)
//! 4. `rlimits`: RLIMIT_CORE 0, RLIMIT_NOFILE, RLIMIT_FSIZE (SIGXFSZ ignored, so an
//!    oversized write fails with EFBIG instead of killing the worker), RLIMIT_NPROC when
//!    running as an unprivileged user.
//! 5. `user`: supplementary groups dropped, then gid and uid set to an unprivileged user;
//!    checked by trying to get root back.
//! 6. `pdeathsig`: PR_SET_PDEATHSIG again (a credential change clears it), then the parent
//!    is checked to still be the supervisor.
//! 7. `no_new_privs`: PR_SET_NO_NEW_PRIVS.
//! 8. `seccomp`: a seccomp-bpf allow-list of what the worker needs from here on (see
//!    [`allowed_syscalls`]); anything else kills the whole worker with SIGSYS.

use std::collections::BTreeMap;
use std::os::fd::RawFd;

use nix::sys::resource::{Resource, setrlimit};
use nix::sys::signal::{SigHandler, Signal, signal};
use nix::unistd::{Gid, Uid};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule, TargetArch,
};

/// How the seccomp filter treats a syscall outside the allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SeccompMode {
    /// No filter.
    Off,
    /// Kill the worker with SIGSYS.
    Enforce,
    /// Allow, but have the kernel log the syscall (audit log / dmesg): for finding out what
    /// a new engine or kernel needs before enforcing.
    Log,
}

/// The hardening flags of `wasmbox-worker` (all off unless the supervisor passes them).
#[derive(Debug, Clone, clap::Args)]
pub struct HardeningArgs {
    /// Close every inherited descriptor except stdio and the supervisor socket.
    #[arg(long)]
    pub close_fds: bool,
    /// Enter a new, empty network namespace.
    #[arg(long)]
    pub netns: bool,
    /// Apply resource limits (core 0, open files, file size, processes).
    #[arg(long)]
    pub rlimits: bool,
    /// RLIMIT_NOFILE with --rlimits.
    #[arg(long, default_value_t = 1024)]
    pub nofile: u64,
    /// RLIMIT_FSIZE in bytes with --rlimits.
    #[arg(long, default_value_t = 4 << 30)]
    pub fsize: u64,
    /// RLIMIT_NPROC with --rlimits (counted per user, so only meaningful with --user).
    #[arg(long)]
    pub nproc: Option<u64>,
    /// Run as this unprivileged `uid:gid` once initialized.
    #[arg(long, value_parser = parse_user)]
    pub user: Option<(u32, u32)>,
    /// Set PR_SET_NO_NEW_PRIVS.
    #[arg(long)]
    pub no_new_privs: bool,
    /// Install the seccomp allow-list.
    #[arg(long, value_enum, default_value_t = SeccompMode::Off)]
    pub seccomp: SeccompMode,
    /// Test hooks (debug builds only): a host function that makes a forbidden syscall.
    #[arg(long, hide = true)]
    pub test_hooks: bool,
}

fn parse_user(s: &str) -> Result<(u32, u32), String> {
    let (uid, gid) = s.split_once(':').ok_or_else(|| format!("{s:?} is not uid:gid"))?;
    let num = |v: &str| v.parse::<u32>().map_err(|_| format!("{v:?} is not a numeric id"));
    Ok((num(uid)?, num(gid)?))
}

/// A layer that could not be applied; the worker does not start without it.
#[derive(Debug, thiserror::Error)]
#[error("hardening layer {layer} failed: {reason}")]
pub struct HardeningError {
    pub layer: &'static str,
    pub reason: String,
}

fn fail(layer: &'static str) -> impl FnOnce(nix::errno::Errno) -> HardeningError {
    move |e| HardeningError { layer, reason: e.desc().to_string() }
}

/// Layers applied so far, by their protocol names.
#[derive(Debug, Default)]
pub struct Applied(pub Vec<String>);

impl Applied {
    fn add(&mut self, layer: &str) {
        self.0.push(layer.to_string());
    }
}

/// Closes every descriptor from 3 up except `keep` (the supervisor socket).
pub fn close_inherited_fds(keep: RawFd, applied: &mut Applied) -> Result<(), HardeningError> {
    let close = |first: u32, last: u32| -> Result<(), HardeningError> {
        if first > last {
            return Ok(());
        }
        // SAFETY: close_range only closes descriptors; at this point (the start of `main`)
        // nothing in this process owns any descriptor above stderr except the socket,
        // which is excluded from the ranges.
        let rc = unsafe { nix::libc::syscall(nix::libc::SYS_close_range, first, last, 0u32) };
        if rc == 0 { Ok(()) } else { Err(fail("close_fds")(nix::errno::Errno::last())) }
    };
    let keep =
        u32::try_from(keep).map_err(|_| HardeningError { layer: "close_fds", reason: "bad socket fd".into() })?;
    if keep >= 3 {
        close(3, keep - 1)?;
    }
    close(keep.max(2) + 1, u32::MAX)?;
    applied.add("close_fds");
    Ok(())
}

/// Enters a new network namespace (before any other thread exists).
pub fn enter_network_namespace(applied: &mut Applied) -> Result<(), HardeningError> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).map_err(fail("netns"))?;
    applied.add("netns");
    Ok(())
}

/// Applies layers 4 to 8 (see the module docs). `supervisor` is the pid the worker's
/// parent must still be.
pub fn lock_down(
    args: &HardeningArgs,
    supervisor: nix::unistd::Pid,
    applied: &mut Applied,
) -> Result<(), HardeningError> {
    if args.rlimits {
        let set = |r: Resource, v: u64| setrlimit(r, v, v).map_err(fail("rlimits"));
        set(Resource::RLIMIT_CORE, 0)?;
        set(Resource::RLIMIT_NOFILE, args.nofile)?;
        set(Resource::RLIMIT_FSIZE, args.fsize)?;
        if let Some(nproc) = args.nproc {
            set(Resource::RLIMIT_NPROC, nproc)?;
        }
        // SAFETY: ignoring a signal installs no handler code.
        unsafe { signal(Signal::SIGXFSZ, SigHandler::SigIgn) }.map_err(fail("rlimits"))?;
        applied.add("rlimits");
    }
    if let Some((uid, gid)) = args.user {
        become_user(uid, gid)?;
        applied.add("user");
    }
    // Always, and again after the credential change above, which clears it.
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(fail("pdeathsig"))?;
    if nix::unistd::getppid() != supervisor {
        return Err(HardeningError { layer: "pdeathsig", reason: "the supervisor exited during startup".into() });
    }
    applied.add("pdeathsig");
    if args.no_new_privs {
        nix::sys::prctl::set_no_new_privs().map_err(fail("no_new_privs"))?;
        applied.add("no_new_privs");
    }
    if args.seccomp != SeccompMode::Off {
        let programs = seccomp_programs(args.seccomp).map_err(|reason| HardeningError { layer: "seccomp", reason })?;
        for program in &programs {
            seccompiler::apply_filter_all_threads(program)
                .map_err(|e| HardeningError { layer: "seccomp", reason: e.to_string() })?;
        }
        applied.add("seccomp");
    }
    Ok(())
}

/// Drops every supplementary group and becomes `uid`:`gid` for good (real, effective and
/// saved ids), checking that root cannot be regained.
pub fn become_user(uid: u32, gid: u32) -> Result<(), HardeningError> {
    let (uid, gid) = (Uid::from_raw(uid), Gid::from_raw(gid));
    nix::unistd::setgroups(&[]).map_err(fail("user"))?;
    nix::unistd::setresgid(gid, gid, gid).map_err(fail("user"))?;
    nix::unistd::setresuid(uid, uid, uid).map_err(fail("user"))?;
    if !uid.is_root() && nix::unistd::setuid(Uid::from_raw(0)).is_ok() {
        return Err(HardeningError { layer: "user", reason: "root could be regained".into() });
    }
    Ok(())
}

/// Compiles the allow-list for this architecture.
/// `PAGEMAP_SCAN` (`_IOWR('f', 16, struct pm_scan_arg)`, Linux 6.7): Wasmtime's instance
/// pool asks the kernel which pages of a guest's memory the guest wrote, to reset only
/// those between invocations. Issued on the `/proc/self/pagemap` descriptor the engine
/// opened before hardening; the request cannot name another process.
const PAGEMAP_SCAN: u64 = (3 << 30) | (96 << 16) | ((b'f' as u64) << 8) | 16;

pub fn seccomp_programs(mode: SeccompMode) -> Result<Vec<BpfProgram>, String> {
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(|e| e.to_string())?;
    let mismatch = match mode {
        SeccompMode::Log => SeccompAction::Log,
        _ => SeccompAction::KillProcess,
    };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for nr in allowed_syscalls() {
        rules.insert(nr, Vec::new());
    }
    let arg = |index: u8, op: SeccompCmpOp, value: u64| {
        SeccompCondition::new(index, SeccompCmpArgLen::Qword, op, value).map_err(|e| e.to_string())
    };
    let one = |c: SeccompCondition| SeccompRule::new(vec![c]).map_err(|e| e.to_string());
    use nix::libc;
    // Threads only: a new process would escape nothing the cgroup does not already bound,
    // but there is no reason to allow one.
    let thread = libc::CLONE_THREAD as u64;
    rules.insert(libc::SYS_clone, vec![one(arg(0, SeccompCmpOp::MaskedEq(thread), thread)?)?]);
    // Signals only to this process's own threads (abort, runtime wakeups).
    let pid = u64::from(std::process::id());
    rules.insert(libc::SYS_tgkill, vec![one(arg(0, SeccompCmpOp::Eq, pid)?)?]);
    // Reading limits (thread stack size), never setting them.
    rules.insert(libc::SYS_prlimit64, vec![one(arg(2, SeccompCmpOp::Eq, 0)?)?]);
    // Unix socket pairs (async runtime wakeups); no other socket can be created.
    rules.insert(libc::SYS_socketpair, vec![one(arg(0, SeccompCmpOp::Eq, libc::AF_UNIX as u64)?)?]);
    let prctl_ops = [libc::PR_SET_NAME, libc::PR_GET_NAME, libc::PR_SET_VMA, libc::PR_GET_DUMPABLE];
    rules.insert(
        libc::SYS_prctl,
        prctl_ops.iter().map(|&op| one(arg(0, SeccompCmpOp::Eq, op as u64)?)).collect::<Result<_, _>>()?,
    );
    // The request type is c_ulong on glibc and c_int on musl: hence the casts.
    #[allow(clippy::unnecessary_cast)]
    let ioctls = [
        libc::FIONBIO as u64,
        libc::FIOCLEX as u64,
        libc::FIONCLEX as u64,
        libc::TCGETS as u64,
        libc::TIOCGWINSZ as u64,
        PAGEMAP_SCAN,
    ];
    rules.insert(
        libc::SYS_ioctl,
        ioctls.iter().map(|&op| one(arg(1, SeccompCmpOp::Eq, op)?)).collect::<Result<_, _>>()?,
    );
    // clone3 cannot be filtered by its flags (they sit behind a pointer). It is allowed
    // here, and a second filter makes it fail with ENOSYS, so the C library falls back to
    // clone, which is filtered above. Stacked filters: the most restrictive answer wins.
    rules.insert(libc::SYS_clone3, Vec::new());
    let main = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, arch).map_err(|e| e.to_string())?;
    let clone3 = SeccompFilter::new(
        [(libc::SYS_clone3, Vec::new())].into_iter().collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )
    .map_err(|e| e.to_string())?;
    let compile = |f: SeccompFilter| -> Result<BpfProgram, String> {
        f.try_into().map_err(|e: seccompiler::BackendError| e.to_string())
    };
    // Installed in this order: the main filter last, so installing needs nothing it forbids.
    Ok(vec![compile(clone3)?, compile(main)?])
}

/// Syscalls allowed without conditions once the worker is initialized: memory and thread
/// management of the engine, the supervisor socket, clocks, and the file operations WASI
/// performs inside preopened directories (through descriptors, never new paths outside).
pub fn allowed_syscalls() -> Vec<i64> {
    use nix::libc::*;
    let mut list = vec![
        // Process and threads.
        SYS_exit,
        SYS_exit_group,
        SYS_getpid,
        SYS_gettid,
        SYS_getuid,
        SYS_geteuid,
        SYS_getgid,
        SYS_getegid,
        SYS_getppid,
        SYS_set_robust_list,
        SYS_get_robust_list,
        SYS_set_tid_address,
        SYS_rseq,
        SYS_futex,
        SYS_sched_yield,
        SYS_sched_getaffinity,
        SYS_restart_syscall,
        SYS_getrandom,
        SYS_uname,
        SYS_sysinfo,
        // Memory.
        SYS_brk,
        SYS_mmap,
        SYS_munmap,
        SYS_mprotect,
        SYS_mremap,
        SYS_madvise,
        SYS_memfd_create,
        SYS_membarrier,
        // Signals (the engine turns faults in guest code into traps).
        SYS_rt_sigaction,
        SYS_rt_sigprocmask,
        SYS_rt_sigreturn,
        SYS_sigaltstack,
        // Time.
        SYS_clock_gettime,
        SYS_clock_getres,
        SYS_clock_nanosleep,
        SYS_nanosleep,
        SYS_gettimeofday,
        // Descriptors and I/O.
        SYS_read,
        SYS_write,
        SYS_readv,
        SYS_writev,
        SYS_pread64,
        SYS_pwrite64,
        SYS_preadv,
        SYS_pwritev,
        SYS_lseek,
        SYS_close,
        SYS_fcntl,
        SYS_dup,
        SYS_dup3,
        SYS_ftruncate,
        SYS_fallocate,
        SYS_fsync,
        SYS_fdatasync,
        SYS_fadvise64,
        SYS_sendto,
        SYS_recvfrom,
        SYS_sendmsg,
        SYS_recvmsg,
        SYS_ppoll,
        SYS_epoll_create1,
        SYS_epoll_ctl,
        SYS_epoll_pwait,
        SYS_epoll_pwait2,
        // WasmEdge's poll_oneoff waits on timer descriptors.
        SYS_timerfd_create,
        SYS_timerfd_settime,
        SYS_timerfd_gettime,
        SYS_eventfd2,
        SYS_pipe2,
        // Files, relative to open directories (WASI) or the artifact directory.
        SYS_openat,
        SYS_openat2,
        SYS_newfstatat,
        SYS_fstat,
        SYS_statx,
        SYS_fstatfs,
        SYS_getdents64,
        SYS_readlinkat,
        SYS_mkdirat,
        SYS_unlinkat,
        SYS_renameat,
        SYS_renameat2,
        SYS_linkat,
        SYS_symlinkat,
        SYS_utimensat,
        SYS_faccessat,
        SYS_faccessat2,
        SYS_fchdir,
        SYS_getcwd,
        SYS_fchmod,
    ];
    #[cfg(target_arch = "x86_64")]
    list.extend([
        SYS_arch_prctl,
        SYS_poll,
        SYS_epoll_wait,
        SYS_open,
        SYS_stat,
        SYS_lstat,
        SYS_access,
        SYS_mkdir,
        SYS_rename,
        SYS_unlink,
        SYS_readlink,
        SYS_dup2,
        SYS_time,
    ]);
    list
}

/// Test hook (debug builds with `--test-hooks` only): a syscall the allow-list forbids.
pub fn forbidden_syscall() -> i64 {
    // SAFETY: PTRACE_TRACEME takes no pointers; under the filter the call never returns.
    unsafe { nix::libc::ptrace(nix::libc::PTRACE_TRACEME, 0, 0, 0) }
}
