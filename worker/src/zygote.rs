//! Zygote mode (`wasmbox-worker --zygote`): a fork server for workers.
//!
//! The supervisor starts one zygote per engine. It has loaded and relocated the worker
//! binary and its engine library and set up what every worker shares, then waits for
//! `Fork` requests on its socket. For each it forks (single-threaded: the zygote's only
//! other thread, glibc's allocator probe at start-up, is joined before it serves) with
//! `CLONE_PARENT`, so the new worker is the supervisor's child, not
//! the zygote's: the supervisor reaps it, reads its exit status and kills it exactly as a
//! worker it started itself. The child enters its slot's cgroups before anything else,
//! then becomes an ordinary worker (its own hardening, its own uid); the zygote answers
//! `Forked { pid }`.
//!
//! The zygote is sandboxed: no new privileges, not dumpable, every capability but the
//! three its children need to drop into their sandbox (setuid, setgid, and sys_admin for
//! the network namespace) removed from its bounding, effective and permitted sets, and a
//! seccomp filter that kills it on calls no worker setup makes (ptrace, mount, module
//! loading, bpf, kexec, ...). Its children inherit all of it and add their own filter.

use std::io::BufWriter;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use wasmbox_protocol::{FrameError, FromWorker, Hello, PROTOCOL_VERSION, ToWorker, read_frame, write_frame};

use crate::fdpass::FdReader;
use crate::{WorkerArgs, WorkerError, harden};

/// What a forked child does: the worker's own entry point with the request's slot and user.
pub type Become = fn(WorkerArgs, harden::Applied) -> Result<(), WorkerError>;

/// Serves fork requests on `socket` until it closes. `args` are the zygote's own (the
/// settings every worker shares); `applied` the layers `main` applied (closing fds).
pub fn serve(
    args: WorkerArgs,
    socket: UnixStream,
    applied: harden::Applied,
    become_worker: Become,
) -> Result<(), WorkerError> {
    // What every worker would otherwise do for itself at start, done once here and
    // inherited by each fork: glibc's one-time allocator probe (a thread, joined before
    // the first fork) and the seccomp filters, built.
    harden::prime_allocator().map_err(WorkerError::WorkDir)?;
    harden::prepare_seccomp(args.hardening.seccomp)
        .map_err(|reason| WorkerError::Hardening(harden::HardeningError { layer: "seccomp", reason }))?;
    let pagemap = prepare_engine(&args)?;
    sandbox(&args.hardening)?;
    let _ = nix::sys::prctl::set_name(c"wasmbox-zygote");
    let supervisor = args.supervisor_pid.unwrap_or_else(nix::unistd::getppid);
    let mut reader = FdReader::new(socket.try_clone().map_err(|e| WorkerError::Protocol(FrameError::Io(e)))?);
    let mut writer = BufWriter::new(socket);
    let hello = FromWorker::Hello(Hello {
        protocol: PROTOCOL_VERSION,
        worker_version: env!("CARGO_PKG_VERSION").into(),
        engine: args.engine.clone(),
        engine_version: String::new(),
        pid: std::process::id(),
        cgroup: args.initial_cgroup.clone(),
        hardening: vec!["zygote".into()],
        deadlines: Default::default(),
    });
    write_frame(&mut writer, &hello, &[])?;
    loop {
        let Some((message, _)) = read_frame::<_, ToWorker>(&mut reader, 0)? else {
            return Ok(());
        };
        let ToWorker::Fork(request) = message else {
            return Err(FrameError::Unexpected("a zygote only forks").into());
        };
        let count = 1 + usize::try_from(request.placement_fds).unwrap_or(usize::MAX);
        let mut fds = reader.take_fds(count).map_err(|e| {
            tracing::error!(error = %e, "descriptor count mismatch");
            WorkerError::Protocol(FrameError::Unexpected("descriptors do not match the fork request"))
        })?;
        let placement: Vec<OwnedFd> = fds.split_off(1);
        let worker_socket = fds.pop().ok_or(WorkerError::Protocol(FrameError::Unexpected("no worker socket")))?;
        let child_args = WorkerArgs {
            slot: request.slot,
            hardening: harden::HardeningArgs { user: request.user, ..args.hardening.clone() },
            zygote: false,
            ..args.clone()
        };
        // SAFETY: raw clone with fork semantics. The zygote is single-threaded (its one
        // start-up thread is joined; the engine is not created here), so no lock is held by another
        // thread in the child; the child only runs this program's own code from here.
        let pid = unsafe {
            nix::libc::syscall(
                nix::libc::SYS_clone,
                (nix::libc::CLONE_PARENT | nix::libc::SIGCHLD) as nix::libc::c_ulong,
                0usize,
                0usize,
                0usize,
                0usize,
            )
        };
        match pid {
            -1 => {
                let e = std::io::Error::last_os_error();
                tracing::error!(error = %e, "cannot fork a worker");
                return Err(WorkerError::Protocol(FrameError::Io(e)));
            }
            0 => {
                let inherited = Inherited {
                    socket: worker_socket,
                    placement: &placement,
                    pagemap,
                    zygote_fds: socket_fds(&reader, &writer),
                };
                let code = child(child_args, supervisor, inherited, applied.clone(), become_worker);
                std::process::exit(code);
            }
            pid => {
                drop((worker_socket, placement));
                write_frame(&mut writer, &FromWorker::Forked { pid: pid as u32 }, &[])?;
            }
        }
    }
}

/// The zygote's own socket descriptors (the child closes them).
fn socket_fds(reader: &FdReader, writer: &BufWriter<UnixStream>) -> [RawFd; 2] {
    [reader.raw_fd(), writer.get_ref().as_raw_fd()]
}

/// What a new worker has from the zygote: its socket, its slot's cgroup placement files,
/// the engine's pagemap descriptor (to be made its own), and the zygote's socket (to close).
struct Inherited<'a> {
    socket: OwnedFd,
    placement: &'a [OwnedFd],
    pagemap: Option<RawFd>,
    zygote_fds: [RawFd; 2],
}

/// In the new process: cgroups first, then the worker's start as `main` does it.
fn child(
    mut args: WorkerArgs,
    supervisor: nix::unistd::Pid,
    inherited: Inherited<'_>,
    applied: harden::Applied,
    become_worker: Become,
) -> i32 {
    let Inherited { socket, placement, pagemap, zygote_fds } = inherited;
    // First: from here on everything this process does is confined and accounted.
    for fd in placement {
        if nix::unistd::write(fd, b"0").is_err() {
            return 120;
        }
    }
    // Then the engine's view of its own memory: the pagemap descriptor still reads the
    // zygote's.
    if let Some(fd) = pagemap {
        if own_pagemap(fd).is_err() {
            return 124;
        }
    }
    if nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL).is_err()
        || nix::unistd::getppid() != supervisor
    {
        return 121;
    }
    args.initial_cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    // What `ps` shows: a worker of its slot, not a zygote.
    let _ = nix::sys::prctl::set_name(c"wasmbox-worker");
    retitle(&format!("wasmbox-worker --slot {} (forked by the zygote)", args.slot));
    args.supervisor_pid = Some(supervisor);
    // The worker's socket at its usual number; nothing else of the zygote's survives.
    for fd in zygote_fds {
        let _ = nix::unistd::close(fd);
    }
    let target = crate::DEFAULT_SOCKET_FD;
    if socket.as_raw_fd() != target {
        // SAFETY: dup2 onto the worker's fixed socket number; `socket` is ours.
        if unsafe { nix::libc::dup2(socket.as_raw_fd(), target) } == -1 {
            return 122;
        }
        // Its old number goes below with everything else this process inherited.
        let _ = nix::unistd::close(socket.as_raw_fd());
    }
    // The socket lives on at `target`, owned by the worker from here.
    std::mem::forget(socket);
    // The layers are the child's own: closing what it inherited is one (the zygote's
    // sockets are closed above either way).
    let _ = applied;
    let mut applied = harden::Applied::default();
    let keep: &[RawFd] = match pagemap {
        Some(fd) => &[target, fd],
        None => &[target],
    };
    if args.hardening.close_fds && harden::close_inherited_fds(keep, &mut applied).is_err() {
        return 123;
    }
    if !args.hardening.close_fds {
        for fd in placement {
            let _ = nix::unistd::close(fd.as_raw_fd());
        }
    }
    args.socket_fd = target;
    match become_worker(args, applied) {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!(error = %anyhow::Error::from(e), "forked worker stopped");
            1
        }
    }
}

/// The engine the zygote made before its first fork (see [`prepare_engine`]).
static PREPARED: std::sync::Mutex<Option<crate::engine::wasmtime::Unstarted>> = std::sync::Mutex::new(None);

/// The WasmEdge engine the zygote made (contexts only: WasmEdge starts no thread until
/// a function is invoked asynchronously).
#[cfg(feature = "wasmedge")]
static PREPARED_WASMEDGE: std::sync::Mutex<Option<crate::engine::wasmedge::WasmEdgeEngine>> =
    std::sync::Mutex::new(None);

/// In a WasmEdge worker the zygote forked: the engine it inherited (once).
#[cfg(feature = "wasmedge")]
pub fn take_prepared_wasmedge() -> Option<crate::engine::wasmedge::WasmEdgeEngine> {
    PREPARED_WASMEDGE.lock().unwrap_or_else(|p| p.into_inner()).take()
}

/// In a worker the zygote forked: the engine it inherited, to start (once).
pub fn take_prepared_engine() -> Option<crate::engine::wasmtime::Unstarted> {
    PREPARED.lock().unwrap_or_else(|p| p.into_inner()).take()
}

/// Creates the serving engine every worker of a Wasmtime zygote starts from (no thread is
/// started; see [`crate::engine::wasmtime::Unstarted`]). Returns the descriptor of the
/// pagemap the engine opened, which each child replaces with its own. Any other
/// descriptor the engine held would be shared with, or closed under, every child, so the
/// zygote refuses to start with one.
///
/// Not done as an unprivileged user without the seccomp filter: such a child must be
/// dumpable for a moment to open its own pagemap (see [`own_pagemap`]), and only the
/// filter keeps the other workers of that same uid from attaching to it then.
fn prepare_engine(args: &WorkerArgs) -> Result<Option<RawFd>, WorkerError> {
    #[cfg(feature = "wasmedge")]
    if args.engine == "wasmedge" {
        let before = open_fds().map_err(WorkerError::WorkDir)?;
        let engine =
            crate::engine::wasmedge::WasmEdgeEngine::new(args.wasmedge_deadlines()).map_err(WorkerError::Engine)?;
        if let Some((fd, target)) = open_fds().map_err(WorkerError::WorkDir)?.into_iter().find(|n| !before.contains(n))
        {
            return Err(WorkerError::Engine(anyhow::anyhow!(
                "the engine holds descriptor {fd} ({target}), which forked workers cannot keep"
            )));
        }
        // Forking needs a single-threaded zygote.
        let threads = std::fs::read_dir("/proc/self/task").map_err(WorkerError::WorkDir)?.count();
        if threads != 1 {
            return Err(WorkerError::Engine(anyhow::anyhow!("the engine started {} threads", threads - 1)));
        }
        *PREPARED_WASMEDGE.lock().unwrap_or_else(|p| p.into_inner()) = Some(engine);
        return Ok(None);
    }
    if args.engine != "wasmtime"
        || (!nix::unistd::geteuid().is_root() && args.hardening.seccomp == harden::SeccompMode::Off)
    {
        return Ok(None);
    }
    let before = open_fds().map_err(WorkerError::WorkDir)?;
    let test_hooks = crate::harden::TEST_HOOKS_BUILT && args.hardening.test_hooks;
    let unstarted = crate::engine::wasmtime::WasmtimeEngine::unstarted(test_hooks).map_err(WorkerError::Engine)?;
    let own = format!("/proc/{}/pagemap", std::process::id());
    let mut pagemap = None;
    for (fd, target) in open_fds().map_err(WorkerError::WorkDir)? {
        if before.iter().any(|(old, _)| *old == fd) {
            continue;
        }
        if target == own && pagemap.is_none() {
            pagemap = Some(fd);
        } else {
            return Err(WorkerError::Engine(anyhow::anyhow!(
                "the engine holds descriptor {fd} ({target}), which forked workers cannot keep"
            )));
        }
    }
    *PREPARED.lock().unwrap_or_else(|p| p.into_inner()) = Some(unstarted);
    Ok(pagemap)
}

/// This process's open descriptors and what each refers to (`/proc/self/fd`), without the
/// one listing them.
fn open_fds() -> std::io::Result<Vec<(RawFd, String)>> {
    let mut fds = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let entry = entry?;
        let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse::<RawFd>().ok()) else { continue };
        // The directory being read is gone by the time its own entry is looked up.
        let Ok(target) = std::fs::read_link(entry.path()) else { continue };
        if target.to_string_lossy().ends_with(&format!("{}/fd", std::process::id())) {
            continue;
        }
        fds.push((fd, target.to_string_lossy().into_owned()));
    }
    Ok(fds)
}

/// In a new worker: opens its own `/proc/self/pagemap` in place of the zygote's at `fd`
/// (the engine's process-wide descriptor keeps its number), as Wasmtime's own fork
/// handler does, and checks the result names this process.
///
/// The child is not dumpable (inherited from the zygote), so its `/proc` files belong to
/// root: as root it opens its pagemap directly; as an unprivileged user it becomes
/// dumpable for the one `open` and not dumpable again right after. Only a process of the
/// same uid that may call `ptrace` could attach in that moment: not the other workers or
/// compile processes (their seccomp filter has no `ptrace`; without the filter the engine
/// is not made in the zygote at all), and the supervisor's own uid can trace the
/// supervisor anyway.
fn own_pagemap(fd: RawFd) -> std::io::Result<()> {
    let mine = match std::fs::File::open("/proc/self/pagemap") {
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            nix::sys::prctl::set_dumpable(true)?;
            let opened = std::fs::File::open("/proc/self/pagemap");
            nix::sys::prctl::set_dumpable(false)?;
            opened?
        }
        other => other?,
    };
    // SAFETY: dup3 onto `fd`, the engine's pagemap descriptor inherited from the zygote;
    // it atomically replaces what `fd` refers to and leaves `mine` to be closed.
    if unsafe { nix::libc::dup3(mine.as_raw_fd(), fd, nix::libc::O_CLOEXEC) } == -1 {
        return Err(std::io::Error::last_os_error());
    }
    drop(mine);
    let target = std::fs::read_link(format!("/proc/self/fd/{fd}"))?;
    if target != std::path::Path::new(&format!("/proc/{}/pagemap", std::process::id())) {
        return Err(std::io::Error::other(format!("pagemap descriptor {fd} is {}", target.display())));
    }
    Ok(())
}

/// Capabilities the zygote keeps for its children: switching uid and gid, and entering a
/// new network namespace.
/// (capability(7) numbers: CAP_SETGID 6, CAP_SETUID 7, CAP_SYS_ADMIN 21.)
const KEEP: [u32; 3] = [6, 7, 21];

/// The zygote's own sandbox (see the module docs). Its workers inherit it, so the parts
/// an operator switched off for workers (no new privileges, seccomp) stay off here too;
/// the capabilities are dropped where there are any (root).
fn sandbox(layers: &harden::HardeningArgs) -> Result<(), WorkerError> {
    let fail = |reason: String| WorkerError::Hardening(harden::HardeningError { layer: "zygote", reason });
    if layers.no_new_privs {
        nix::sys::prctl::set_no_new_privs().map_err(|e| fail(format!("no_new_privs: {e}")))?;
    }
    nix::sys::prctl::set_dumpable(false).map_err(|e| fail(format!("dumpable: {e}")))?;
    if nix::unistd::geteuid().is_root() {
        let last = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .unwrap_or(40);
        for cap in (0..=last).filter(|c| !KEEP.contains(c)) {
            // SAFETY: prctl(PR_CAPBSET_DROP) takes a capability number and changes only
            // this process's bounding set.
            if unsafe { nix::libc::prctl(nix::libc::PR_CAPBSET_DROP, cap as nix::libc::c_ulong, 0, 0, 0) } != 0 {
                return Err(fail(format!("dropping capability {cap}: {}", std::io::Error::last_os_error())));
            }
        }
        let bits = KEEP.iter().fold(0u64, |acc, c| acc | 1 << c);
        let header = CapHeader { version: LINUX_CAPABILITY_VERSION_3, pid: 0 };
        let data = [
            CapData { effective: bits as u32, permitted: bits as u32, inheritable: 0 },
            CapData { effective: (bits >> 32) as u32, permitted: (bits >> 32) as u32, inheritable: 0 },
        ];
        // SAFETY: capset with a version-3 header and two data words, as capset(2) says.
        if unsafe { nix::libc::syscall(nix::libc::SYS_capset, &header, data.as_ptr()) } != 0 {
            return Err(fail(format!("capset: {}", std::io::Error::last_os_error())));
        }
    }
    if layers.seccomp != harden::SeccompMode::Off {
        harden::install_zygote_filter().map_err(|e| fail(format!("seccomp: {e}")))?;
    }
    Ok(())
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Rewrites this process's command line as `ps` and `/proc/<pid>/cmdline` show it, within
/// the bytes the original one used (the kernel reads it from this process's own memory,
/// between `arg_start` and `arg_end` of `/proc/self/stat`). Nothing reads `argv` after
/// this point; the arguments were parsed before the fork.
fn retitle(title: &str) {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else { return };
    // Fields after the command name (which may hold spaces) at its closing parenthesis.
    let Some(rest) = stat.rsplit_once(')').map(|(_, rest)| rest) else { return };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // arg_start and arg_end are fields 48 and 49; `rest` starts at field 3.
    let (Some(start), Some(end)) =
        (fields.get(45).and_then(|f| f.parse::<usize>().ok()), fields.get(46).and_then(|f| f.parse::<usize>().ok()))
    else {
        return;
    };
    if end <= start {
        return;
    }
    let len = end - start;
    let bytes = title.as_bytes();
    let n = bytes.len().min(len - 1);
    // SAFETY: [start, end) is this process's own argument area (mapped, writable: the
    // initial stack), which nothing refers to any more; it is overwritten in place and
    // NUL-padded, never extended.
    unsafe {
        let area = std::slice::from_raw_parts_mut(start as *mut u8, len);
        area[..n].copy_from_slice(&bytes[..n]);
        area[n..].fill(0);
    }
}
