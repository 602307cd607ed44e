//! Hostile test function: tries to leave its preopened directories and to write through a
//! read-only one, and prints one line per attempt, `<attempt>: refused (<error>)` or
//! `<attempt>: ALLOWED <what it got>`. Exits 0 either way, so the caller judges the lines.
//!
//! It expects a read-only preopen `/data` and a writable one `/scratch` (see the
//! integration test `hostile.rs`), and tries both through the standard library (wasi-libc
//! resolves the path against the preopens) and through raw `path_open` on the preopen's
//! descriptor, which bypasses any normalisation in wasi-libc.
#[cfg(target_os = "wasi")]
fn main() {
    guest::main()
}

#[cfg(not(target_os = "wasi"))]
fn main() {
    eprintln!("escape is a wasm32-wasip1 guest");
    std::process::exit(2)
}

#[cfg(target_os = "wasi")]
mod guest {
    use std::io::{Read, Write};

    mod raw {
        #[link(wasm_import_module = "wasi_snapshot_preview1")]
        unsafe extern "C" {
            pub fn path_open(
                fd: u32,
                dirflags: u32,
                path: *const u8,
                path_len: usize,
                oflags: u32,
                rights_base: u64,
                rights_inheriting: u64,
                fdflags: u32,
                opened: *mut u32,
            ) -> u32;
            pub fn path_symlink(old: *const u8, old_len: usize, fd: u32, new: *const u8, new_len: usize) -> u32;
            pub fn path_unlink_file(fd: u32, path: *const u8, path_len: usize) -> u32;
            pub fn fd_prestat_get(fd: u32, prestat: *mut u32) -> u32;
            pub fn fd_prestat_dir_name(fd: u32, path: *mut u8, len: usize) -> u32;
        }
    }

    const LOOKUP_SYMLINK_FOLLOW: u32 = 1;
    const O_CREAT: u32 = 1;
    const O_TRUNC: u32 = 8;
    const RIGHT_FD_READ: u64 = 1 << 1;
    const RIGHT_FD_WRITE: u64 = 1 << 6;

    /// The descriptor of the preopen the guest sees as `name`.
    /// The name the host gives descriptor `fd` as a preopen, if it is one.
    fn preopen_name(fd: u32) -> Option<Vec<u8>> {
        let mut prestat = [0u32; 2];
        // SAFETY: `prestat` is 8 writable bytes, the size of a WASI `prestat`.
        if unsafe { raw::fd_prestat_get(fd, prestat.as_mut_ptr()) } != 0 {
            return None;
        }
        let mut buf = vec![0u8; prestat[1] as usize];
        // SAFETY: `buf` has exactly the length the host reported for the name.
        let errno = unsafe { raw::fd_prestat_dir_name(fd, buf.as_mut_ptr(), buf.len()) };
        (errno == 0).then_some(buf)
    }

    /// The preopen named `name` ("/data"); some hosts (WasmEdge) drop the leading slash.
    fn preopen_fd(name: &str) -> Option<u32> {
        let bare = name.trim_start_matches('/');
        (3..64).find(|&fd| preopen_name(fd).is_some_and(|n| n == name.as_bytes() || n == bare.as_bytes()))
    }

    fn preopen_names() -> Vec<(u32, String)> {
        (3..64).filter_map(|fd| preopen_name(fd).map(|n| (fd, String::from_utf8_lossy(&n).into_owned()))).collect()
    }

    /// `path_open` relative to a preopen's descriptor; the opened descriptor or the errno.
    fn open_at(dir: u32, path: &str, oflags: u32, rights: u64) -> Result<u32, u32> {
        let mut fd = 0u32;
        // SAFETY: `path` is valid for `path.len()` bytes and `fd` is writable.
        let errno = unsafe {
            raw::path_open(dir, LOOKUP_SYMLINK_FOLLOW, path.as_ptr(), path.len(), oflags, rights, rights, 0, &mut fd)
        };
        if errno == 0 { Ok(fd) } else { Err(errno) }
    }

    fn report(attempt: &str, result: Result<String, String>) {
        match result {
            Ok(got) => println!("{attempt}: ALLOWED {got}"),
            Err(e) => println!("{attempt}: refused ({e})"),
        }
    }

    fn io<T>(r: std::io::Result<T>) -> Result<T, String> {
        r.map_err(|e| format!("{e}"))
    }

    /// Reads what a raw descriptor yields, to show an escape's loot in the output.
    fn drain(fd: u32) -> String {
        use std::os::fd::FromRawFd;
        // SAFETY: `fd` was just returned by `path_open` and is owned by nobody else.
        let mut file = unsafe { std::fs::File::from_raw_fd(fd as i32) };
        let mut text = String::new();
        match file.read_to_string(&mut text) {
            Ok(_) => format!("read {text:?}"),
            Err(e) => format!("opened fd {fd} ({e})"),
        }
    }

    pub fn main() {
        // Controls: what the preopens are for works, so a refusal below is a refusal.
        report(
            "control std read /data/readme.txt",
            io(std::fs::read_to_string("/data/readme.txt")).map(|t| format!("read {t:?}")),
        );
        report(
            "control std write /scratch/ok.txt",
            io(std::fs::write("/scratch/ok.txt", "ok")).map(|()| "wrote".into()),
        );
        let _ = std::fs::remove_file("/scratch/ok.txt");

        // Through the standard library: wasi-libc maps each path onto a preopen, or refuses.
        for path in [
            "/data/../secret.txt",
            "/data/../../secret.txt",
            "../secret.txt",
            "/secret.txt",
            "/etc/passwd",
            "/proc/self/environ",
            "/data/link-out",
            "/data/link-abs",
            "/data/link-dir/secret.txt",
            "/scratch/../data/../../secret.txt",
        ] {
            report(&format!("std read {path}"), io(std::fs::read_to_string(path)).map(|t| format!("read {t:?}")));
        }
        report("std ls /data/..", io(std::fs::read_dir("/data/..")).map(|d| format!("{} entries", d.count())));
        report("std ls /", io(std::fs::read_dir("/")).map(|d| format!("{} entries", d.count())));

        // Writing through the read-only preopen.
        report(
            "std overwrite /data/readme.txt",
            io(std::fs::OpenOptions::new().write(true).truncate(true).open("/data/readme.txt"))
                .and_then(|mut f| io(f.write_all(b"defaced")).map(|()| "wrote".to_string())),
        );
        report(
            "std append /data/readme.txt",
            io(std::fs::OpenOptions::new().append(true).open("/data/readme.txt"))
                .and_then(|mut f| io(f.write_all(b"defaced")).map(|()| "wrote".to_string())),
        );
        report("std create /data/new.txt", io(std::fs::write("/data/new.txt", "new")).map(|()| "created".into()));
        report("std remove /data/readme.txt", io(std::fs::remove_file("/data/readme.txt")).map(|()| "removed".into()));
        report(
            "std rename /data/readme.txt",
            io(std::fs::rename("/data/readme.txt", "/data/moved.txt")).map(|()| "renamed".into()),
        );
        report("std mkdir /data/newdir", io(std::fs::create_dir("/data/newdir")).map(|()| "created".into()));

        // Raw path_open on the preopen descriptors: no wasi-libc path handling in between.
        let (Some(data), Some(scratch)) = (preopen_fd("/data"), preopen_fd("/scratch")) else {
            println!("raw: preopens /data and /scratch not found among {:?}", preopen_names());
            return;
        };
        report(
            "control raw read data:readme.txt",
            open_at(data, "readme.txt", 0, RIGHT_FD_READ).map(drain).map_err(errno),
        );
        for path in [
            "..",
            "../secret.txt",
            "../../secret.txt",
            "/etc/passwd",
            "link-out",
            "link-abs",
            "link-dir/secret.txt",
            "sub/../../secret.txt",
            "./../secret.txt",
        ] {
            report(&format!("raw read data:{path}"), open_at(data, path, 0, RIGHT_FD_READ).map(drain).map_err(errno));
        }
        report(
            "raw read scratch:../data/readme.txt",
            open_at(scratch, "../data/readme.txt", 0, RIGHT_FD_READ).map(drain).map_err(errno),
        );
        // A symlink the guest makes itself in its writable preopen, pointing out of it: making
        // it may be allowed, following it must not be. Removed again either way.
        let (target, link) = ("../../secret.txt", "evil");
        // SAFETY: both strings are valid for their lengths.
        let made = unsafe { raw::path_symlink(target.as_ptr(), target.len(), scratch, link.as_ptr(), link.len()) };
        println!("make symlink scratch:evil -> {target}: {}", if made == 0 { "made".into() } else { errno(made) });
        report("raw read own symlink scratch:evil", open_at(scratch, link, 0, RIGHT_FD_READ).map(drain).map_err(errno));
        report(
            "std read own symlink /scratch/evil",
            io(std::fs::read_to_string("/scratch/evil")).map(|t| format!("read {t:?}")),
        );
        if made == 0 {
            // SAFETY: `link` is valid for its length.
            unsafe { raw::path_unlink_file(scratch, link.as_ptr(), link.len()) };
        }

        for (path, oflags) in [("readme.txt", O_TRUNC), ("readme.txt", 0), ("new.txt", O_CREAT)] {
            report(
                &format!("raw write data:{path} oflags={oflags}"),
                open_at(data, path, oflags, RIGHT_FD_WRITE).map(drain).map_err(errno),
            );
        }
    }

    fn errno(n: u32) -> String {
        format!("errno {n}")
    }
}
