//! Filesystem access through preopened directories:
//! `fs cat PATH`, `fs ls DIR`, `fs write PATH` (stdin becomes the file), `fs mv FROM TO`,
//! `fs ln TARGET LINK` (a symbolic link; what hostile tenants try inside a writable preopen).
use std::io::Write;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (op, path) = match (args.get(1), args.get(2)) {
        (Some(op), Some(path)) => (op.as_str(), path.as_str()),
        _ => wasmbox_functions::fail("usage: fs cat|ls|write PATH | fs mv FROM TO | fs ln TARGET LINK"),
    };
    let result = match op {
        "cat" => std::fs::read(path).and_then(|bytes| std::io::stdout().write_all(&bytes)),
        "ls" => std::fs::read_dir(path).map(|entries| {
            let mut names: Vec<String> =
                entries.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect();
            names.sort();
            for name in names {
                println!("{name}");
            }
        }),
        "write" => std::fs::write(path, wasmbox_functions::stdin_bytes()).map(|()| println!("wrote {path}")),
        "mv" => std::fs::rename(path, second(&args)).map(|()| println!("moved {path}")),
        "ln" => symlink(path, second(&args)).map(|()| println!("linked {path}")),
        other => wasmbox_functions::fail(&format!("unknown operation {other}")),
    };
    if let Err(e) = result {
        wasmbox_functions::fail(&format!("{op} {path}: {e}"));
    }
}

fn second(args: &[String]) -> &str {
    args.get(3).map(String::as_str).unwrap_or_else(|| wasmbox_functions::fail("mv and ln take two paths"))
}

/// WASI `path_symlink` on the preopen `link` lies in (std's wrapper is not stable yet):
/// the target is stored as given, absolute or not.
#[cfg(target_os = "wasi")]
fn symlink(target: &str, link: &str) -> std::io::Result<()> {
    let not_found = || std::io::Error::new(std::io::ErrorKind::NotFound, "no preopen holds the link path");
    for fd in 3..64u32 {
        // SAFETY: plain WASI calls on descriptor numbers; a non-preopen answers an error.
        let Ok(wasi::Prestat { tag: 0, u }) = (unsafe { wasi::fd_prestat_get(fd) }) else { continue };
        // SAFETY: `u.dir` is the variant of tag 0 (a directory).
        let len = unsafe { u.dir.pr_name_len };
        let mut name = vec![0u8; len];
        // SAFETY: `name` has the length the host reported.
        if unsafe { wasi::fd_prestat_dir_name(fd, name.as_mut_ptr(), len) }.is_err() {
            continue;
        }
        // Engines differ on the leading '/' of preopen names.
        let prefix = format!("{}/", String::from_utf8_lossy(&name).trim_matches('/'));
        let Some(relative) = link.trim_start_matches('/').strip_prefix(&prefix) else { continue };
        // SAFETY: a plain WASI call.
        return unsafe { wasi::path_symlink(target, fd, relative) }
            .map_err(|e| std::io::Error::from_raw_os_error(i32::from(e.raw())));
    }
    Err(not_found())
}

#[cfg(not(target_os = "wasi"))]
fn symlink(target: &str, link: &str) -> std::io::Result<()> {
    std::os::unix::fs::symlink(target, link)
}
