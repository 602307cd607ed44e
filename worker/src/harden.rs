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
//!    checked by trying to get root back. (A serving worker's engine warms up after this,
//!    as that user, before the rest: [`limit_and_become_user`], then [`seal`].)
//! 6. `pdeathsig`: PR_SET_PDEATHSIG again (a credential change clears it), then the parent
//!    is checked to still be the supervisor.
//! 7. `no_new_privs`: PR_SET_NO_NEW_PRIVS; and always PR_SET_DUMPABLE 0, so processes of
//!    the same uid cannot ptrace the worker or read its `/proc/<pid>/mem` and `environ`
//!    (a uid change already clears it; a worker that keeps the supervisor's uid, as in
//!    the unprivileged image, needs it set).
//! 8. `seccomp`: a seccomp-bpf allow-list of what the worker needs from here on (see
//!    [`allowed_syscalls`] and [`seccomp_programs`]); anything else kills the whole worker
//!    with SIGSYS.
//!
//! What seccomp can and cannot say about paths: it sees a system call's numbers, never the
//! strings behind its pointers. The filter therefore allows path calls only relative to a
//! descriptor (never `AT_FDCWD`, none of the legacy path calls), which is how WASI reaches
//! preopened directories and how the worker reaches its artifact directory; it cannot
//! refuse an absolute path given together with some open descriptor. That case is bounded
//! by the worker's uid and the file system's permissions.

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
    /// Test hooks (debug builds and the test-hooks feature only): a host function that
    /// makes a forbidden syscall, a compile that hangs on a marked module.
    #[arg(long, hide = true)]
    pub test_hooks: bool,
}

/// Whether this build has the test hooks at all (`--test-hooks` is ignored otherwise).
pub const TEST_HOOKS_BUILT: bool = cfg!(any(debug_assertions, feature = "test-hooks"));

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
#[derive(Debug, Default, Clone)]
pub struct Applied(pub Vec<String>);

impl Applied {
    fn add(&mut self, layer: &str) {
        self.0.push(layer.to_string());
    }
}

/// Closes every descriptor from 3 up except those in `keep` (the supervisor socket; in a
/// worker forked by the zygote also the engine's pagemap).
pub fn close_inherited_fds(keep: &[RawFd], applied: &mut Applied) -> Result<(), HardeningError> {
    for (first, last) in ranges_to_close(keep)? {
        // SAFETY: close_range only closes descriptors; at this point (the start of `main`,
        // or of a worker the zygote forked) nothing in this process owns any descriptor
        // above stderr but those in `keep`, which are outside the ranges.
        let rc = unsafe { nix::libc::syscall(nix::libc::SYS_close_range, first, last, 0u32) };
        if rc != 0 {
            return Err(fail("close_fds")(nix::errno::Errno::last()));
        }
    }
    applied.add("close_fds");
    Ok(())
}

/// The inclusive ranges from 3 to the largest descriptor number that leave out `keep`.
fn ranges_to_close(keep: &[RawFd]) -> Result<Vec<(u32, u32)>, HardeningError> {
    let mut keep = keep
        .iter()
        .map(|&fd| u32::try_from(fd).map_err(|_| HardeningError { layer: "close_fds", reason: format!("bad fd {fd}") }))
        .collect::<Result<Vec<u32>, _>>()?;
    keep.sort_unstable();
    let (mut ranges, mut next) = (Vec::new(), 3u32);
    for fd in keep {
        if fd < next {
            continue;
        }
        if fd > next {
            ranges.push((next, fd - 1));
        }
        next = fd.saturating_add(1);
    }
    ranges.push((next, u32::MAX));
    Ok(ranges)
}

/// Enters a new network namespace (before any other thread exists).
pub fn enter_network_namespace(applied: &mut Applied) -> Result<(), HardeningError> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).map_err(fail("netns"))?;
    applied.add("netns");
    Ok(())
}

/// Runs, before the worker is locked down, what glibc's allocator does by path once per
/// process: the first time a thread's arena gives memory back to the kernel it reads
/// `/proc/sys/vm/overcommit_memory` (`check_may_shrink_heap`, then cached). Left to chance,
/// that happens on some compile thread after the seccomp filter is in place, which then
/// kills the worker. A thread of its own allocates blocks below the mmap threshold (so they
/// come from its arena's heap) and frees them all: the heap's top passes the trim
/// threshold and is given back.
///
/// The zygote primes itself once; glibc caches what it read in its own memory, so a worker
/// forked from it inherits that and this returns at once.
pub fn prime_allocator() -> std::io::Result<()> {
    if ALLOCATOR_PRIMED.load(std::sync::atomic::Ordering::Relaxed) {
        return Ok(());
    }
    let primer = std::thread::Builder::new().name("wasmbox-prime".into()).spawn(|| {
        let blocks: Vec<Vec<u8>> = (0..64).map(|i| vec![i as u8; 96 << 10]).collect();
        drop(std::hint::black_box(blocks));
    })?;
    primer.join().map_err(|_| std::io::Error::other("allocator primer panicked"))?;
    ALLOCATOR_PRIMED.store(true, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

/// Set once [`prime_allocator`] has run in this process (or in the zygote it was forked from).
static ALLOCATOR_PRIMED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Applies layers 4 to 8 (see the module docs). `supervisor` is the pid the worker's
/// parent must still be.
pub fn lock_down(
    args: &HardeningArgs,
    supervisor: nix::unistd::Pid,
    paths: PathPolicy,
    applied: &mut Applied,
) -> Result<(), HardeningError> {
    limit_and_become_user(args, applied)?;
    seal(args, supervisor, paths, applied)
}

/// Layers 4 and 5: resource limits, then the unprivileged user. A serving worker applies
/// them before its engine's warm-up starts the engine's threads: a credential change is
/// made by every thread of the process (glibc signals each one and waits), which costs
/// milliseconds while threads are still starting.
pub fn limit_and_become_user(args: &HardeningArgs, applied: &mut Applied) -> Result<(), HardeningError> {
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
    Ok(())
}

/// Layers 6 to 8: the parent-death signal (again: a credential change clears it), no
/// new privileges, non-dumpable, and the seccomp filter last.
pub fn seal(
    args: &HardeningArgs,
    supervisor: nix::unistd::Pid,
    paths: PathPolicy,
    applied: &mut Applied,
) -> Result<(), HardeningError> {
    // Always, and again after the credential change above, which clears it.
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(fail("pdeathsig"))?;
    if nix::unistd::getppid() != supervisor {
        return Err(HardeningError { layer: "pdeathsig", reason: "the supervisor exited during startup".into() });
    }
    applied.add("pdeathsig");
    nix::sys::prctl::set_dumpable(false).map_err(fail("dumpable"))?;
    applied.add("non_dumpable");
    if args.no_new_privs {
        nix::sys::prctl::set_no_new_privs().map_err(fail("no_new_privs"))?;
        applied.add("no_new_privs");
    }
    if args.seccomp != SeccompMode::Off {
        let programs =
            prepared_programs(args.seccomp, paths).map_err(|reason| HardeningError { layer: "seccomp", reason })?;
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

/// `PAGEMAP_SCAN` (`_IOWR('f', 16, struct pm_scan_arg)`, Linux 6.7): Wasmtime's instance
/// pool asks the kernel which pages of a guest's memory the guest wrote, to reset only
/// those between invocations. Issued on the `/proc/self/pagemap` descriptor the engine
/// opened before hardening; the request cannot name another process.
const PAGEMAP_SCAN: u64 = (3 << 30) | (96 << 16) | ((b'f' as u64) << 8) | 16;

/// How an engine reaches files once the worker is locked down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathPolicy {
    /// Only relative to descriptors it holds (preopens, the artifact directory): every
    /// path call with `AT_FDCWD` is refused, but for one: opening a directory as a path
    /// handle (`O_PATH | O_DIRECTORY`, how wasmtime-wasi turns a preopen's descriptor,
    /// made the working directory for a moment, into a directory of its own). A path
    /// handle gives no read, write or listing by itself.
    DescriptorsOnly,
    /// Also relative to the working directory (the artifact directory) and by absolute
    /// paths, with the legacy path calls: libwasmedge takes paths only, for its
    /// ahead-of-time compiler's output, the native artifacts it loads (`dlopen`) and
    /// preopens (`/proc/self/fd/N/.`), and uses glibc's `access`, `rename`, `unlink`.
    Ambient,
}

/// The path system calls (all but the legacy ones) and which of their arguments are
/// directory descriptors that must not be `AT_FDCWD` under [`PathPolicy::DescriptorsOnly`].
fn path_syscalls() -> Vec<(i64, &'static [u8])> {
    use nix::libc::*;
    vec![
        (SYS_openat, &[0]),
        (SYS_openat2, &[0]),
        (SYS_newfstatat, &[0]),
        (SYS_statx, &[0]),
        (SYS_readlinkat, &[0]),
        (SYS_mkdirat, &[0]),
        (SYS_unlinkat, &[0]),
        (SYS_renameat, &[0, 2]),
        (SYS_renameat2, &[0, 2]),
        (SYS_linkat, &[0, 2]),
        (SYS_symlinkat, &[1]),
        (SYS_utimensat, &[0]),
        (SYS_faccessat, &[0]),
        (SYS_faccessat2, &[0]),
    ]
}

/// The path calls that take paths only, never a directory descriptor (x86_64 has them;
/// newer architectures only have the `*at` forms).
fn legacy_path_syscalls() -> Vec<i64> {
    #[cfg(target_arch = "x86_64")]
    {
        use nix::libc::*;
        vec![
            SYS_open,
            SYS_creat,
            SYS_stat,
            SYS_lstat,
            SYS_access,
            SYS_mkdir,
            SYS_rmdir,
            SYS_rename,
            SYS_unlink,
            SYS_link,
            SYS_symlink,
            SYS_readlink,
            SYS_chmod,
            SYS_utimes,
        ]
    }
    #[cfg(not(target_arch = "x86_64"))]
    Vec::new()
}

/// The `fcntl` commands the worker and WASI use: descriptor and status flags (WASI's
/// `fd_fdstat_set_flags`), duplication, memfd seals, pipe sizes. Not allowed: `F_SETOWN`,
/// `F_SETOWN_EX` and `F_SETSIG` (with `O_ASYNC` they would signal any process of the same
/// uid), leases, directory notifications, locks.
fn fcntl_commands() -> Vec<u64> {
    use nix::libc::*;
    [F_DUPFD, F_DUPFD_CLOEXEC, F_GETFD, F_SETFD, F_GETFL, F_SETFL, F_GETPIPE_SZ, F_ADD_SEALS, F_GET_SEALS]
        .iter()
        .map(|&c| c as u64)
        .collect()
}

/// Compiles the allow-list for this architecture.
/// The filters for `mode` and `paths`, built once per process: the zygote builds them for
/// every path policy before it forks, so a forked worker only installs them.
fn prepared_programs(mode: SeccompMode, paths: PathPolicy) -> Result<Vec<BpfProgram>, String> {
    type Prepared = Vec<((SeccompMode, PathPolicy), Vec<BpfProgram>)>;
    static PREPARED: std::sync::Mutex<Prepared> = std::sync::Mutex::new(Vec::new());
    let mut prepared = PREPARED.lock().unwrap_or_else(|p| p.into_inner());
    let mut programs = match prepared.iter().find(|(key, _)| *key == (mode, paths)) {
        Some((_, programs)) => programs.clone(),
        None => {
            let programs = allow_list_programs(mode, paths)?;
            prepared.push(((mode, paths), programs.clone()));
            programs
        }
    };
    // Before the main filter, which forbids installing filters.
    programs.insert(programs.len() - 1, own_signals_program(mode)?);
    Ok(programs)
}

/// A filter that kills the process on `tgkill` to any other process: the one rule that
/// names this process, so it is built by each process for itself.
fn own_signals_program(mode: SeccompMode) -> Result<BpfProgram, String> {
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(|e| e.to_string())?;
    let action = if mode == SeccompMode::Log { SeccompAction::Log } else { SeccompAction::KillProcess };
    let pid = u64::from(std::process::id());
    let other = SeccompCondition::new(0, SeccompCmpArgLen::Qword, SeccompCmpOp::Ne, pid).map_err(|e| e.to_string())?;
    let rule = SeccompRule::new(vec![other]).map_err(|e| e.to_string())?;
    let filter = SeccompFilter::new(
        [(nix::libc::SYS_tgkill, vec![rule])].into_iter().collect(),
        SeccompAction::Allow,
        action,
        arch,
    )
    .map_err(|e| e.to_string())?;
    filter.try_into().map_err(|e: seccompiler::BackendError| e.to_string())
}

/// Builds the workers' seccomp filters for `mode` ahead of time (see [`prepared_programs`]).
pub fn prepare_seccomp(mode: SeccompMode) -> Result<(), String> {
    if mode != SeccompMode::Off {
        for paths in [PathPolicy::DescriptorsOnly, PathPolicy::Ambient] {
            prepared_programs(mode, paths)?;
        }
    }
    Ok(())
}

/// The workers' seccomp filters for `mode` and `paths`, in the order they are installed.
pub fn seccomp_programs(mode: SeccompMode, paths: PathPolicy) -> Result<Vec<BpfProgram>, String> {
    let mut programs = allow_list_programs(mode, paths)?;
    programs.insert(programs.len() - 1, own_signals_program(mode)?);
    Ok(programs)
}

/// The filters that name no process: the allow-list and the `clone3` fallback.
fn allow_list_programs(mode: SeccompMode, paths: PathPolicy) -> Result<Vec<BpfProgram>, String> {
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
    // Descriptors and flags are C ints: only their low 32 bits mean anything.
    let int = |index: u8, op: SeccompCmpOp, value: u64| {
        SeccompCondition::new(index, SeccompCmpArgLen::Dword, op, value).map_err(|e| e.to_string())
    };
    let one = |c: SeccompCondition| SeccompRule::new(vec![c]).map_err(|e| e.to_string());
    use nix::libc;
    let at_fdcwd = u64::from(libc::AT_FDCWD as u32);
    for (nr, dirfds) in path_syscalls() {
        let allowed = match paths {
            PathPolicy::Ambient => Vec::new(),
            PathPolicy::DescriptorsOnly => {
                let conditions =
                    dirfds.iter().map(|&i| int(i, SeccompCmpOp::Ne, at_fdcwd)).collect::<Result<Vec<_>, _>>()?;
                vec![SeccompRule::new(conditions).map_err(|e| e.to_string())?]
            }
        };
        rules.insert(nr, allowed);
    }
    if paths == PathPolicy::Ambient {
        // glibc implements access(), rename(), unlink()... with the legacy calls where the
        // architecture has them, and libwasmedge (with its LLVM) uses those functions.
        for nr in legacy_path_syscalls() {
            rules.insert(nr, Vec::new());
        }
    }
    if paths == PathPolicy::DescriptorsOnly {
        // openat(AT_FDCWD, ".", O_RDONLY | O_CLOEXEC | O_PATH | O_DIRECTORY): a preopen.
        let handle = (libc::O_RDONLY | libc::O_CLOEXEC | libc::O_PATH | libc::O_DIRECTORY) as u32;
        let rule =
            SeccompRule::new(vec![int(0, SeccompCmpOp::Eq, at_fdcwd)?, int(2, SeccompCmpOp::Eq, u64::from(handle))?])
                .map_err(|e| e.to_string())?;
        rules.entry(libc::SYS_openat).or_default().push(rule);
    }
    rules.insert(
        libc::SYS_fcntl,
        fcntl_commands().into_iter().map(|cmd| one(int(1, SeccompCmpOp::Eq, cmd)?)).collect::<Result<_, _>>()?,
    );
    // Threads only: a new process would escape nothing the cgroup does not already bound,
    // but there is no reason to allow one.
    let thread = libc::CLONE_THREAD as u64;
    rules.insert(libc::SYS_clone, vec![one(arg(0, SeccompCmpOp::MaskedEq(thread), thread)?)?]);
    // Signals to this process's own threads only (abort, runtime wakeups): allowed here,
    // and limited to this process by [`own_signals_program`], which is built in each
    // process (this filter is built once in the zygote, whose pid is not its workers').
    rules.insert(libc::SYS_tgkill, Vec::new());
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

/// The zygote's filter (see `crate::zygote`): everything a worker's setup needs stays
/// allowed, calls none ever makes kill the process. Inherited by every forked worker,
/// beneath its own allow-list.
pub fn install_zygote_filter() -> Result<(), String> {
    use nix::libc;
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(|e| e.to_string())?;
    let denied = [
        libc::SYS_ptrace,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_mount,
        libc::SYS_umount2,
        libc::SYS_pivot_root,
        libc::SYS_chroot,
        libc::SYS_move_mount,
        libc::SYS_open_tree,
        libc::SYS_fsopen,
        libc::SYS_fsmount,
        libc::SYS_init_module,
        libc::SYS_finit_module,
        libc::SYS_delete_module,
        libc::SYS_kexec_load,
        libc::SYS_kexec_file_load,
        libc::SYS_reboot,
        libc::SYS_bpf,
        libc::SYS_perf_event_open,
        libc::SYS_keyctl,
        libc::SYS_add_key,
        libc::SYS_request_key,
        libc::SYS_swapon,
        libc::SYS_swapoff,
        libc::SYS_acct,
        libc::SYS_settimeofday,
        libc::SYS_clock_settime,
        libc::SYS_open_by_handle_at,
        libc::SYS_name_to_handle_at,
        libc::SYS_userfaultfd,
        libc::SYS_io_uring_setup,
        libc::SYS_setns,
        libc::SYS_quotactl,
    ];
    let rules = denied.iter().map(|&nr| (nr, Vec::new())).collect();
    let filter =
        SeccompFilter::new(rules, SeccompAction::Allow, SeccompAction::KillProcess, arch).map_err(|e| e.to_string())?;
    let program: BpfProgram = filter.try_into().map_err(|e: seccompiler::BackendError| e.to_string())?;
    seccompiler::apply_filter(&program).map_err(|e| e.to_string())
}

/// Syscalls allowed without conditions once the worker is initialized: memory and thread
/// management of the engine, the supervisor socket, clocks, and the file operations WASI
/// performs on descriptors (path calls, `fcntl` and a few others have conditions, see
/// [`seccomp_programs`]).
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
        // Wasmtime's WASI appends with pwritev2(RWF_APPEND) (a descriptor with the append flag).
        SYS_preadv2,
        SYS_pwritev2,
        SYS_lseek,
        SYS_close,
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
        // WASI's sock_accept and sock_shutdown (WasmEdge makes the call on the descriptor);
        // they act only on sockets the worker already holds: none but the supervisor's.
        SYS_accept,
        SYS_accept4,
        SYS_shutdown,
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
        // On descriptors only (path calls are in `path_syscalls`).
        SYS_fstat,
        SYS_fstatfs,
        SYS_getdents64,
        SYS_fchdir,
        SYS_getcwd,
        SYS_fchmod,
    ];
    // The legacy path calls of x86_64 (open, stat, unlink, rename...) are not here: they
    // take paths only, never a descriptor to resolve them against (see
    // `legacy_path_syscalls`, allowed only with `PathPolicy::Ambient`).
    #[cfg(target_arch = "x86_64")]
    list.extend([SYS_arch_prctl, SYS_poll, SYS_epoll_wait, SYS_dup2, SYS_time]);
    list
}

/// Test hook (debug builds with `--test-hooks` only): a syscall the allow-list forbids.
pub fn forbidden_syscall() -> i64 {
    // SAFETY: PTRACE_TRACEME takes no pointers; under the filter the call never returns.
    unsafe { nix::libc::ptrace(nix::libc::PTRACE_TRACEME, 0, 0, 0) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::libc;
    use nix::sys::wait::{WaitStatus, waitpid};
    use std::ffi::CString;
    use std::os::fd::AsRawFd;

    #[test]
    fn descriptors_to_keep_are_left_out_of_the_ranges_closed() {
        let all = |keep: &[RawFd]| ranges_to_close(keep).unwrap();
        assert_eq!(all(&[3]), vec![(4, u32::MAX)]);
        assert_eq!(all(&[]), vec![(3, u32::MAX)]);
        assert_eq!(all(&[7, 3]), vec![(4, 6), (8, u32::MAX)]);
        assert_eq!(all(&[5, 6, 1]), vec![(3, 4), (7, u32::MAX)]);
        assert_eq!(all(&[4, 4]), vec![(3, 3), (5, u32::MAX)]);
        assert!(ranges_to_close(&[-1]).is_err());
    }

    /// What one system call did under the filter, in a forked child (a filter is for life).
    #[derive(Debug, PartialEq, Eq)]
    enum Verdict {
        Allowed,
        /// Returned an error the kernel chose (not the filter).
        Failed(i32),
        Killed,
    }

    fn under_filter(paths: PathPolicy, call: impl FnOnce() -> i64) -> Verdict {
        let programs = seccomp_programs(SeccompMode::Enforce, paths).unwrap();
        // SAFETY: the child only installs the prebuilt filters and makes raw system calls
        // (no allocation, no locks) before _exit.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                for program in &programs {
                    if seccompiler::apply_filter(program).is_err() {
                        // SAFETY: ends the child at once.
                        unsafe { libc::_exit(100) };
                    }
                }
                let rc = call();
                let code = if rc >= 0 { 0 } else { nix::errno::Errno::last_raw().clamp(1, 99) };
                // SAFETY: ends the child without running the parent's destructors.
                unsafe { libc::_exit(code) }
            }
            nix::unistd::ForkResult::Parent { child } => match waitpid(child, None).unwrap() {
                WaitStatus::Exited(_, 0) => Verdict::Allowed,
                WaitStatus::Exited(_, 100) => panic!("the filter could not be installed"),
                WaitStatus::Exited(_, errno) => Verdict::Failed(errno),
                WaitStatus::Signaled(_, Signal::SIGSYS, _) => Verdict::Killed,
                other => panic!("unexpected {other:?}"),
            },
        }
    }

    /// A named system call to make in the child.
    type Case = (&'static str, Box<dyn FnOnce() -> i64>);

    fn c(s: &str) -> CString {
        CString::new(s).unwrap()
    }

    #[test]
    fn path_calls_need_a_descriptor_fcntl_is_narrow_and_wasi_calls_work() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("file"), b"x").unwrap();
        let dir = std::fs::File::open(tmp.path()).unwrap();
        let file = std::fs::OpenOptions::new().read(true).write(true).open(tmp.path().join("file")).unwrap();
        let (d, f) = (dir.as_raw_fd() as i64, file.as_raw_fd() as i64);
        let cwd = libc::AT_FDCWD as i64;
        let (abs, name, other, link) = (c("/etc/hostname"), c("file"), c("renamed"), c("link"));
        let (abs, name, other, link) = (abs.as_ptr(), name.as_ptr(), other.as_ptr(), link.as_ptr());
        let (dot, sub) = (c("."), c("sub"));
        let (dot, sub) = (dot.as_ptr(), sub.as_ptr());
        let mut statbuf = [0u8; 256];
        let st = statbuf.as_mut_ptr();
        let o_path_dir = (libc::O_RDONLY | libc::O_CLOEXEC | libc::O_PATH | libc::O_DIRECTORY) as i64;
        let pid = i64::from(std::process::id());
        let sys = |nr: i64, a: [i64; 5]| {
            // SAFETY: raw system calls on descriptors and on pointers to the C strings and
            // buffers above, which outlive the forked child's use of them.
            unsafe { libc::syscall(nr, a[0], a[1], a[2], a[3], a[4]) }
        };
        let forbidden: Vec<Case> = vec![
            ("openat AT_FDCWD", Box::new(move || sys(libc::SYS_openat, [cwd, abs as i64, 0, 0, 0]))),
            (
                "openat AT_FDCWD O_RDONLY|O_DIRECTORY",
                Box::new(move || sys(libc::SYS_openat, [cwd, dot as i64, libc::O_DIRECTORY as i64, 0, 0])),
            ),
            ("newfstatat AT_FDCWD", Box::new(move || sys(libc::SYS_newfstatat, [cwd, abs as i64, st as i64, 0, 0]))),
            ("statx AT_FDCWD", Box::new(move || sys(libc::SYS_statx, [cwd, abs as i64, 0, 0x7ff, st as i64]))),
            ("unlinkat AT_FDCWD", Box::new(move || sys(libc::SYS_unlinkat, [cwd, name as i64, 0, 0, 0]))),
            ("mkdirat AT_FDCWD", Box::new(move || sys(libc::SYS_mkdirat, [cwd, sub as i64, 0o700, 0, 0]))),
            ("renameat to AT_FDCWD", Box::new(move || sys(libc::SYS_renameat, [d, name as i64, cwd, other as i64, 0]))),
            (
                "renameat2 from AT_FDCWD",
                Box::new(move || sys(libc::SYS_renameat2, [cwd, name as i64, d, other as i64, 0])),
            ),
            ("linkat from AT_FDCWD", Box::new(move || sys(libc::SYS_linkat, [cwd, name as i64, d, link as i64, 0]))),
            ("symlinkat at AT_FDCWD", Box::new(move || sys(libc::SYS_symlinkat, [abs as i64, cwd, link as i64, 0, 0]))),
            ("readlinkat AT_FDCWD", Box::new(move || sys(libc::SYS_readlinkat, [cwd, abs as i64, st as i64, 64, 0]))),
            ("faccessat AT_FDCWD", Box::new(move || sys(libc::SYS_faccessat, [cwd, abs as i64, 0, 0, 0]))),
            ("utimensat AT_FDCWD", Box::new(move || sys(libc::SYS_utimensat, [cwd, abs as i64, 0, 0, 0]))),
            ("fcntl F_SETOWN", Box::new(move || sys(libc::SYS_fcntl, [f, libc::F_SETOWN as i64, pid, 0, 0]))),
            // F_SETOWN_EX and F_SETSIG (15 and 10 in <fcntl.h>; libc has no constants for them).
            ("fcntl F_SETOWN_EX", Box::new(move || sys(libc::SYS_fcntl, [f, 15, st as i64, 0, 0]))),
            ("fcntl F_SETSIG", Box::new(move || sys(libc::SYS_fcntl, [f, 10, 9, 0, 0]))),
            ("fcntl F_SETLEASE", Box::new(move || sys(libc::SYS_fcntl, [f, libc::F_SETLEASE as i64, 1, 0, 0]))),
            ("fcntl F_NOTIFY", Box::new(move || sys(libc::SYS_fcntl, [d, libc::F_NOTIFY as i64, 1, 0, 0]))),
            ("fcntl F_SETLK", Box::new(move || sys(libc::SYS_fcntl, [f, libc::F_SETLK as i64, st as i64, 0, 0]))),
            (
                "prctl PR_SET_DUMPABLE",
                Box::new(move || sys(libc::SYS_prctl, [libc::PR_SET_DUMPABLE as i64, 1, 0, 0, 0])),
            ),
            (
                "socket AF_INET",
                Box::new(move || sys(libc::SYS_socket, [libc::AF_INET as i64, libc::SOCK_STREAM as i64, 0, 0, 0])),
            ),
            ("kill", Box::new(move || sys(libc::SYS_kill, [1, 0, 0, 0, 0]))),
            ("ptrace", Box::new(move || sys(libc::SYS_ptrace, [libc::PTRACE_TRACEME as i64, 0, 0, 0, 0]))),
            #[cfg(target_arch = "x86_64")]
            ("open", Box::new(move || sys(libc::SYS_open, [abs as i64, 0, 0, 0, 0]))),
            #[cfg(target_arch = "x86_64")]
            ("stat", Box::new(move || sys(libc::SYS_stat, [abs as i64, st as i64, 0, 0, 0]))),
            #[cfg(target_arch = "x86_64")]
            ("lstat", Box::new(move || sys(libc::SYS_lstat, [abs as i64, st as i64, 0, 0, 0]))),
            #[cfg(target_arch = "x86_64")]
            ("unlink", Box::new(move || sys(libc::SYS_unlink, [abs as i64, 0, 0, 0, 0]))),
            #[cfg(target_arch = "x86_64")]
            ("rename", Box::new(move || sys(libc::SYS_rename, [abs as i64, abs as i64, 0, 0, 0]))),
            #[cfg(target_arch = "x86_64")]
            ("access", Box::new(move || sys(libc::SYS_access, [abs as i64, 0, 0, 0, 0]))),
            #[cfg(target_arch = "x86_64")]
            ("mkdir", Box::new(move || sys(libc::SYS_mkdir, [abs as i64, 0, 0, 0, 0]))),
            #[cfg(target_arch = "x86_64")]
            ("readlink", Box::new(move || sys(libc::SYS_readlink, [abs as i64, st as i64, 64, 0, 0]))),
        ];
        for (what, call) in forbidden {
            assert_eq!(under_filter(PathPolicy::DescriptorsOnly, call), Verdict::Killed, "{what}");
        }
        let iov = [libc::iovec { iov_base: statbuf.as_ptr() as *mut libc::c_void, iov_len: 1 }];
        let iov = iov.as_ptr() as i64;
        let allowed: Vec<Case> = vec![
            ("openat on a descriptor", Box::new(move || sys(libc::SYS_openat, [d, name as i64, 0, 0, 0]))),
            (
                "openat2 on a descriptor",
                Box::new(move || {
                    // struct open_how { u64 flags; u64 mode; u64 resolve; }
                    let how: [u64; 3] = [0, 0, libc::RESOLVE_BENEATH];
                    sys(libc::SYS_openat2, [d, name as i64, how.as_ptr() as i64, 24, 0])
                }),
            ),
            (
                "a preopen: openat(AT_FDCWD, \".\", O_PATH|O_DIRECTORY)",
                Box::new(move || sys(libc::SYS_openat, [cwd, dot as i64, o_path_dir, 0, 0])),
            ),
            (
                "newfstatat on a descriptor",
                Box::new(move || sys(libc::SYS_newfstatat, [d, name as i64, st as i64, 0, 0])),
            ),
            (
                "statx of a descriptor",
                Box::new(move || {
                    let empty = b"\0";
                    sys(libc::SYS_statx, [f, empty.as_ptr() as i64, libc::AT_EMPTY_PATH as i64, 0x7ff, st as i64])
                }),
            ),
            ("fstat", Box::new(move || sys(libc::SYS_fstat, [f, st as i64, 0, 0, 0]))),
            ("mkdirat on a descriptor", Box::new(move || sys(libc::SYS_mkdirat, [d, sub as i64, 0o700, 0, 0]))),
            (
                "renameat between descriptors",
                Box::new(move || sys(libc::SYS_renameat, [d, name as i64, d, other as i64, 0])),
            ),
            (
                "symlinkat on a descriptor",
                Box::new(move || sys(libc::SYS_symlinkat, [name as i64, d, link as i64, 0, 0])),
            ),
            ("fcntl F_GETFL", Box::new(move || sys(libc::SYS_fcntl, [f, libc::F_GETFL as i64, 0, 0, 0]))),
            (
                "fcntl F_SETFL O_APPEND",
                Box::new(move || sys(libc::SYS_fcntl, [f, libc::F_SETFL as i64, libc::O_APPEND as i64, 0, 0])),
            ),
            (
                "fcntl F_GETFD/F_SETFD",
                Box::new(move || sys(libc::SYS_fcntl, [f, libc::F_SETFD as i64, libc::FD_CLOEXEC as i64, 0, 0])),
            ),
            (
                "fcntl F_DUPFD_CLOEXEC",
                Box::new(move || sys(libc::SYS_fcntl, [f, libc::F_DUPFD_CLOEXEC as i64, 0, 0, 0])),
            ),
            (
                "prctl PR_GET_DUMPABLE",
                Box::new(move || sys(libc::SYS_prctl, [libc::PR_GET_DUMPABLE as i64, 0, 0, 0, 0])),
            ),
        ];
        for (what, call) in allowed {
            assert_eq!(under_filter(PathPolicy::DescriptorsOnly, call), Verdict::Allowed, "{what}");
        }
        // Wasmtime's append: let through (the file system may still refuse the flag).
        let append = move || sys(libc::SYS_pwritev2, [f, iov, 1, 0, libc::RWF_APPEND as i64]);
        assert_ne!(under_filter(PathPolicy::DescriptorsOnly, append), Verdict::Killed, "pwritev2 RWF_APPEND");
        // With ambient paths (WasmEdge), path calls by AT_FDCWD and the legacy ones are
        // allowed; fcntl's signal commands and everything else stay forbidden.
        assert_eq!(
            under_filter(PathPolicy::Ambient, move || sys(libc::SYS_openat, [cwd, abs as i64, 0, 0, 0])),
            Verdict::Allowed
        );
        #[cfg(target_arch = "x86_64")]
        assert_eq!(
            under_filter(PathPolicy::Ambient, move || sys(libc::SYS_open, [abs as i64, 0, 0, 0, 0])),
            Verdict::Allowed
        );
        let setown = move || sys(libc::SYS_fcntl, [f, libc::F_SETOWN as i64, pid, 0, 0]);
        assert_eq!(under_filter(PathPolicy::Ambient, setown), Verdict::Killed);
    }
}
