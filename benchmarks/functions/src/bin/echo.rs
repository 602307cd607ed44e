//! Copies stdin to stdout unchanged.
use std::io::Write;

fn main() {
    let input = wasmbox_functions::stdin_bytes();
    std::io::stdout().write_all(&input).unwrap_or_else(|e| wasmbox_functions::fail(&format!("{e}")));
}
