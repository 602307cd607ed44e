//! WASI coverage test function: calls every function of `wasi_snapshot_preview1` (all 46) at
//! least once with valid arguments and prints one line per call, `<function> <errno>` (the
//! WASI errno, 0 = success), then `done <count>` (distinct functions called) and ends with
//! `proc_exit(0)`. An error return is recorded, never fatal: some engines legitimately answer
//! ENOTSUP, EBADF, ENOTSOCK or EINVAL. `proc_exit` cannot report back, so its line,
//! `proc_exit 0`, is printed just before `done`; if the guest itself forgot a function it
//! prints `missing <names>` and exits 1 instead.
//!
//! The file calls work in `cov-dir` inside a writable preopen `/scratch` (leftovers of an
//! earlier run are removed first, and `cov-dir` is removed at the end). Without that preopen
//! every call is still made, on fd 3, and its errno printed. The socket calls go to the
//! preopen, stdin and stdout, which are no sockets: an error is the expected answer there.
#[cfg(target_os = "wasi")]
fn main() {
    guest::main()
}

#[cfg(not(target_os = "wasi"))]
fn main() {
    eprintln!("wasi-coverage is a wasm32-wasip1 guest");
    std::process::exit(2)
}

#[cfg(target_os = "wasi")]
mod guest {
    use std::collections::BTreeSet;
    use std::io::Write;
    use wasi::{Errno, Rights};

    const ALL: [&str; 46] = [
        "args_get",
        "args_sizes_get",
        "environ_get",
        "environ_sizes_get",
        "clock_res_get",
        "clock_time_get",
        "fd_advise",
        "fd_allocate",
        "fd_close",
        "fd_datasync",
        "fd_fdstat_get",
        "fd_fdstat_set_flags",
        "fd_fdstat_set_rights",
        "fd_filestat_get",
        "fd_filestat_set_size",
        "fd_filestat_set_times",
        "fd_pread",
        "fd_prestat_get",
        "fd_prestat_dir_name",
        "fd_pwrite",
        "fd_read",
        "fd_readdir",
        "fd_renumber",
        "fd_seek",
        "fd_sync",
        "fd_tell",
        "fd_write",
        "path_create_directory",
        "path_filestat_get",
        "path_filestat_set_times",
        "path_link",
        "path_open",
        "path_readlink",
        "path_remove_directory",
        "path_rename",
        "path_symlink",
        "path_unlink_file",
        "poll_oneoff",
        "proc_exit",
        "proc_raise",
        "sched_yield",
        "random_get",
        "sock_accept",
        "sock_recv",
        "sock_send",
        "sock_shutdown",
    ];

    /// Stands in for a descriptor that could not be opened: its calls then answer EBADF.
    const NO_FD: u32 = u32::MAX;
    const FOLLOW: wasi::Lookupflags = wasi::LOOKUPFLAGS_SYMLINK_FOLLOW;
    const NOW: wasi::Fstflags = wasi::FSTFLAGS_ATIM_NOW | wasi::FSTFLAGS_MTIM_NOW;
    const FILE_RIGHTS: Rights = wasi::RIGHTS_FD_DATASYNC
        | wasi::RIGHTS_FD_READ
        | wasi::RIGHTS_FD_SEEK
        | wasi::RIGHTS_FD_FDSTAT_SET_FLAGS
        | wasi::RIGHTS_FD_SYNC
        | wasi::RIGHTS_FD_TELL
        | wasi::RIGHTS_FD_WRITE
        | wasi::RIGHTS_FD_ADVISE
        | wasi::RIGHTS_FD_ALLOCATE
        | wasi::RIGHTS_FD_FILESTAT_GET
        | wasi::RIGHTS_FD_FILESTAT_SET_SIZE
        | wasi::RIGHTS_FD_FILESTAT_SET_TIMES
        | wasi::RIGHTS_POLL_FD_READWRITE;
    /// For `cov-dir` itself: reading its entries, nothing that would mean writing to it.
    const DIR_RIGHTS: Rights = wasi::RIGHTS_FD_READDIR | wasi::RIGHTS_FD_FILESTAT_GET | wasi::RIGHTS_PATH_OPEN;
    /// What the run leaves in `cov-dir` before its final unlinks (`link.txt` is renamed).
    const FILES: [&str; 4] = ["cov-dir/file.txt", "cov-dir/renamed.txt", "cov-dir/sym.txt", "cov-dir/second.txt"];

    /// The functions called so far.
    struct Calls(BTreeSet<&'static str>);

    impl Calls {
        /// Prints `<name> <errno>` and remembers `name`; the call's value if it succeeded.
        fn record<T>(&mut self, name: &'static str, result: Result<T, Errno>) -> Option<T> {
            println!("{name} {}", result.as_ref().err().map_or(0, Errno::raw));
            self.0.insert(name);
            result.ok()
        }
    }

    fn iov(buf: &mut [u8]) -> wasi::Iovec {
        wasi::Iovec { buf: buf.as_mut_ptr(), buf_len: buf.len() }
    }

    fn ciov(buf: &[u8]) -> wasi::Ciovec {
        wasi::Ciovec { buf: buf.as_ptr(), buf_len: buf.len() }
    }

    pub fn main() {
        let mut calls = Calls(BTreeSet::new());
        let scratch = find_scratch();
        if scratch.is_none() {
            eprintln!("wasi-coverage: no /scratch preopen, using fd 3");
        }
        let dir = scratch.unwrap_or(3);
        process(&mut calls);
        preopen(&mut calls, dir);
        files(&mut calls, dir);
        poll(&mut calls);
        sockets(&mut calls, dir);

        // proc_exit never returns, so it is counted here and called last, below.
        calls.0.insert("proc_exit");
        let missing: Vec<&str> = ALL.into_iter().filter(|name| !calls.0.contains(name)).collect();
        if !missing.is_empty() {
            println!("missing {}", missing.join(" "));
            std::process::exit(1);
        }
        println!("proc_exit 0");
        println!("done {}", calls.0.len());
        let _ = std::io::stdout().flush();
        // SAFETY: a plain call; it ends the process.
        unsafe { wasi::proc_exit(0) }
    }

    /// The preopen named `/scratch` (some hosts drop the slash): fd 3 upwards until EBADF.
    fn find_scratch() -> Option<u32> {
        for fd in 3..1024 {
            // SAFETY: plain calls; `name` is exactly as long as the host said.
            unsafe {
                match wasi::fd_prestat_get(fd) {
                    Err(e) if e == wasi::ERRNO_BADF => return None,
                    Err(_) => continue,
                    Ok(prestat) if prestat.tag == wasi::PREOPENTYPE_DIR.raw() => {
                        let mut name = vec![0u8; prestat.u.dir.pr_name_len];
                        let named = wasi::fd_prestat_dir_name(fd, name.as_mut_ptr(), name.len()).is_ok();
                        if named && (name == b"/scratch" || name == b"scratch") {
                            return Some(fd);
                        }
                    }
                    Ok(_) => continue,
                }
            }
        }
        None
    }

    /// Arguments, environment, clocks, randomness, scheduling and a harmless signal.
    fn process(calls: &mut Calls) {
        // SAFETY: every pointer points into a live buffer of the length the host reported.
        unsafe {
            let (argc, size) = calls.record("args_sizes_get", wasi::args_sizes_get()).unwrap_or((0, 0));
            let mut argv = vec![std::ptr::null_mut::<u8>(); argc];
            let mut buf = vec![0u8; size];
            calls.record("args_get", wasi::args_get(argv.as_mut_ptr(), buf.as_mut_ptr()));

            let (count, size) = calls.record("environ_sizes_get", wasi::environ_sizes_get()).unwrap_or((0, 0));
            let mut environ = vec![std::ptr::null_mut::<u8>(); count];
            let mut buf = vec![0u8; size];
            calls.record("environ_get", wasi::environ_get(environ.as_mut_ptr(), buf.as_mut_ptr()));

            for clock in [
                wasi::CLOCKID_REALTIME,
                wasi::CLOCKID_MONOTONIC,
                wasi::CLOCKID_PROCESS_CPUTIME_ID,
                wasi::CLOCKID_THREAD_CPUTIME_ID,
            ] {
                calls.record("clock_res_get", wasi::clock_res_get(clock));
                calls.record("clock_time_get", wasi::clock_time_get(clock, 1));
            }

            let mut bytes = [0u8; 32];
            calls.record("random_get", wasi::random_get(bytes.as_mut_ptr(), bytes.len()));
            calls.record("sched_yield", wasi::sched_yield());
            // Signal 0 (SIGNONE) kills nothing wherever it is taken as a real signal.
            calls.record("proc_raise", wasi::proc_raise(wasi::SIGNAL_NONE));
        }
    }

    fn preopen(calls: &mut Calls, dir: u32) {
        // SAFETY: `name` is as long as the host reported (empty if it reported nothing).
        unsafe {
            let prestat = calls.record("fd_prestat_get", wasi::fd_prestat_get(dir));
            let len = prestat.filter(|p| p.tag == wasi::PREOPENTYPE_DIR.raw()).map_or(0, |p| p.u.dir.pr_name_len);
            let mut name = vec![0u8; len];
            calls.record("fd_prestat_dir_name", wasi::fd_prestat_dir_name(dir, name.as_mut_ptr(), name.len()));
        }
    }

    /// Everything on files, directories and links, in `cov-dir` under `dir`.
    fn files(calls: &mut Calls, dir: u32) {
        // SAFETY: every pointer points into a live local buffer of the length passed.
        unsafe {
            // An earlier run's leftovers; errors (nothing there) are expected and not recorded.
            for path in FILES.iter().chain(&["cov-dir/link.txt"]) {
                let _ = wasi::path_unlink_file(dir, path);
            }
            let _ = wasi::path_remove_directory(dir, "cov-dir");

            calls.record("path_create_directory", wasi::path_create_directory(dir, "cov-dir"));
            let oflags = wasi::OFLAGS_CREAT | wasi::OFLAGS_TRUNC;
            let opened = wasi::path_open(dir, FOLLOW, "cov-dir/file.txt", oflags, FILE_RIGHTS, 0, 0);
            let file = calls.record("path_open", opened).unwrap_or(NO_FD);
            calls.record("fd_write", wasi::fd_write(file, &[ciov(b"hello, coverage\n")]));
            calls.record("fd_pwrite", wasi::fd_pwrite(file, &[ciov(b"HELLO")], 0));
            calls.record("fd_seek", wasi::fd_seek(file, 0, wasi::WHENCE_SET));
            let mut buf = [0u8; 16];
            calls.record("fd_read", wasi::fd_read(file, &[iov(&mut buf)]));
            calls.record("fd_tell", wasi::fd_tell(file));
            calls.record("fd_seek", wasi::fd_seek(file, -2, wasi::WHENCE_CUR));
            calls.record("fd_seek", wasi::fd_seek(file, 0, wasi::WHENCE_END));
            calls.record("fd_pread", wasi::fd_pread(file, &[iov(&mut buf)], 0));
            calls.record("fd_advise", wasi::fd_advise(file, 0, 0, wasi::ADVICE_NORMAL));
            calls.record("fd_allocate", wasi::fd_allocate(file, 0, 4096));
            calls.record("fd_datasync", wasi::fd_datasync(file));
            calls.record("fd_sync", wasi::fd_sync(file));
            let stat = calls.record("fd_fdstat_get", wasi::fd_fdstat_get(file));
            calls.record("fd_fdstat_set_flags", wasi::fd_fdstat_set_flags(file, wasi::FDFLAGS_APPEND));
            calls.record("fd_write", wasi::fd_write(file, &[ciov(b"appended\n")]));
            calls.record("fd_fdstat_set_flags", wasi::fd_fdstat_set_flags(file, 0));
            // The rights it already has: dropping none, so the calls below keep theirs.
            let (base, inheriting) = stat.map_or((FILE_RIGHTS, 0), |s| (s.fs_rights_base, s.fs_rights_inheriting));
            calls.record("fd_fdstat_set_rights", wasi::fd_fdstat_set_rights(file, base, inheriting));
            calls.record("fd_filestat_get", wasi::fd_filestat_get(file));
            calls.record("fd_filestat_set_size", wasi::fd_filestat_set_size(file, 10));
            calls.record("fd_filestat_set_times", wasi::fd_filestat_set_times(file, 0, 0, NOW));

            calls.record("path_filestat_get", wasi::path_filestat_get(dir, FOLLOW, "cov-dir/file.txt"));
            let set_times = wasi::path_filestat_set_times(dir, FOLLOW, "cov-dir/file.txt", 0, 0, NOW);
            calls.record("path_filestat_set_times", set_times);
            calls.record("path_link", wasi::path_link(dir, 0, "cov-dir/file.txt", dir, "cov-dir/link.txt"));
            // A relative target, resolved from the link's own directory: cov-dir/file.txt.
            calls.record("path_symlink", wasi::path_symlink("file.txt", dir, "cov-dir/sym.txt"));
            let mut target = [0u8; 64];
            let read_link = wasi::path_readlink(dir, "cov-dir/sym.txt", target.as_mut_ptr(), target.len());
            calls.record("path_readlink", read_link);
            calls.record("path_rename", wasi::path_rename(dir, "cov-dir/link.txt", dir, "cov-dir/renamed.txt"));

            let opened = wasi::path_open(dir, FOLLOW, "cov-dir", wasi::OFLAGS_DIRECTORY, DIR_RIGHTS, FILE_RIGHTS, 0);
            let sub = calls.record("path_open", opened).unwrap_or(NO_FD);
            let mut entries = vec![0u8; 4096];
            calls.record("fd_readdir", wasi::fd_readdir(sub, entries.as_mut_ptr(), entries.len(), 0));
            calls.record("fd_close", wasi::fd_close(sub));

            // Renumber a second file onto `file`: `file` then names second.txt, `second` is gone.
            let opened = wasi::path_open(dir, FOLLOW, "cov-dir/second.txt", oflags, FILE_RIGHTS, 0, 0);
            let second = calls.record("path_open", opened).unwrap_or(NO_FD);
            if calls.record("fd_renumber", wasi::fd_renumber(second, file)).is_none() && second != NO_FD {
                let _ = wasi::fd_close(second);
            }
            calls.record("fd_close", wasi::fd_close(file));

            for path in FILES {
                calls.record("path_unlink_file", wasi::path_unlink_file(dir, path));
            }
            calls.record("path_remove_directory", wasi::path_remove_directory(dir, "cov-dir"));
        }
    }

    /// A 1 ms relative timeout on the monotonic clock and readiness of stdin, together.
    fn poll(calls: &mut Calls) {
        let timeout =
            wasi::SubscriptionClock { id: wasi::CLOCKID_MONOTONIC, timeout: 1_000_000, precision: 0, flags: 0 };
        let stdin = wasi::SubscriptionFdReadwrite { file_descriptor: wasi::FD_STDIN };
        let subscriptions = [
            wasi::Subscription {
                userdata: 1,
                u: wasi::SubscriptionU { tag: wasi::EVENTTYPE_CLOCK.raw(), u: wasi::SubscriptionUU { clock: timeout } },
            },
            wasi::Subscription {
                userdata: 2,
                u: wasi::SubscriptionU {
                    tag: wasi::EVENTTYPE_FD_READ.raw(),
                    u: wasi::SubscriptionUU { fd_read: stdin },
                },
            },
        ];
        // SAFETY: an all-zero `Event` is valid (errno 0, event type CLOCK); `events` has room
        // for one event per subscription.
        unsafe {
            let mut events = [std::mem::zeroed::<wasi::Event>(); 2];
            let polled = wasi::poll_oneoff(subscriptions.as_ptr(), events.as_mut_ptr(), subscriptions.len());
            if let Some(n) = calls.record("poll_oneoff", polled) {
                eprintln!("wasi-coverage: poll_oneoff returned {n} event(s)");
            }
        }
    }

    /// The socket calls, on descriptors that are no sockets.
    fn sockets(calls: &mut Calls, dir: u32) {
        // SAFETY: every pointer points into a live local buffer of the length passed.
        unsafe {
            if let Some(fd) = calls.record("sock_accept", wasi::sock_accept(dir, 0)) {
                let _ = wasi::fd_close(fd);
            }
            let mut buf = [0u8; 16];
            calls.record("sock_recv", wasi::sock_recv(wasi::FD_STDIN, &[iov(&mut buf)], 0));
            // An empty message: were stdout a socket, it would get nothing to show.
            calls.record("sock_send", wasi::sock_send(wasi::FD_STDOUT, &[ciov(b"")], 0));
            // Stdin's read side, so stdout stays usable for the report even on a socket.
            calls.record("sock_shutdown", wasi::sock_shutdown(wasi::FD_STDIN, wasi::SDFLAGS_RD));
        }
    }
}
