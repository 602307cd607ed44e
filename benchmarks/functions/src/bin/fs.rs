//! Filesystem access through preopened directories:
//! `fs cat PATH`, `fs ls DIR`, `fs write PATH` (stdin becomes the file).
use std::io::Write;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (op, path) = match (args.get(1), args.get(2)) {
        (Some(op), Some(path)) => (op.as_str(), path.as_str()),
        _ => wasmbox_functions::fail("usage: fs cat|ls|write PATH"),
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
        other => wasmbox_functions::fail(&format!("unknown operation {other}")),
    };
    if let Err(e) = result {
        wasmbox_functions::fail(&format!("{op} {path}: {e}"));
    }
}
