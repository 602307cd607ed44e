//! Makes the cdylib a WASI reactor: links wasi-libc's `crt1-reactor.o` (from the toolchain's
//! self-contained wasi-libc), whose `_initialize` runs the startup code (`__wasi_init_tp`,
//! `__wasm_call_ctors`) once. Rust up to at least 1.95 links no startup object into a
//! wasm32-wasip1 cdylib: without this the module has no `_initialize`, and wasm-ld instead wraps
//! every export in a "command export" that runs the constructors before each call and the
//! destructors after it. (rust-lang/rust#161421 makes rustc link crt1-reactor.o into cdylibs
//! itself; on a toolchain with it, linking fails with a duplicate `_initialize`: delete this file.)
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("wasi") {
        return;
    }
    let target = std::env::var("TARGET").unwrap();
    let rustc = std::env::var("RUSTC").unwrap();
    let out = Command::new(&rustc)
        .args(["--print", "target-libdir", "--target", &target])
        .output()
        .unwrap_or_else(|e| panic!("running {rustc}: {e}"));
    assert!(out.status.success(), "{rustc} --print target-libdir failed");
    let libdir = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
    let crt = libdir.join("self-contained/crt1-reactor.o");
    assert!(crt.is_file(), "{} is missing (is the {target} target installed?)", crt.display());
    println!("cargo::rustc-link-arg-cdylib={}", crt.display());
}
