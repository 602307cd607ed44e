// With the `wasmedge` feature, records where libwasmedge was found as the binaries' run
// path, so the worker starts without LD_LIBRARY_PATH: the supervisor starts workers with an
// empty environment, and WasmEdge's installer puts the library under ~/.wasmedge or
// WASMEDGE_DIR, outside the loader's default directories. The search order is
// wasmedge-sys's own, so the run path names the library the build linked against.

use std::path::{Path, PathBuf};

fn main() {
    // Also read by benchmarks/harness/build.rs (include!), which links libwasmedge too.
    println!("cargo:rerun-if-changed=build.rs");
    for var in ["WASMEDGE_LIB_DIR", "WASMEDGE_DIR", "WASMEDGE_BUILD_DIR", "HOME", "DOCS_RS"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    // DOCS_RS: wasmedge-sys type-checks against bundled bindings and nothing links.
    if std::env::var_os("CARGO_FEATURE_WASMEDGE").is_none() || std::env::var_os("DOCS_RS").is_some() {
        return;
    }
    if let Some(dir) = candidates().into_iter().find(|dir| dir.join("libwasmedge.so").exists()) {
        // The system's own directories are on the loader's path already.
        if !["/usr/lib", "/usr/lib64", "/lib", "/lib64"].iter().any(|d| Path::new(d) == dir) {
            println!("cargo:rustc-link-arg=-Wl,-rpath,{}", dir.display());
        }
    }
}

fn candidates() -> Vec<PathBuf> {
    let env = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    let mut dirs = Vec::new();
    dirs.extend(env("WASMEDGE_LIB_DIR"));
    if let Some(root) = env("WASMEDGE_DIR") {
        dirs.extend([root.join("lib64"), root.join("lib")]);
    }
    if let Some(build) = env("WASMEDGE_BUILD_DIR") {
        dirs.extend([build.join("lib64/api"), build.join("lib/api")]);
    }
    if let Some(home) = env("HOME") {
        dirs.extend([home.join(".wasmedge/lib64"), home.join(".wasmedge/lib")]);
    }
    dirs.extend([PathBuf::from("/usr/local/lib64"), PathBuf::from("/usr/local/lib")]);
    if let Some(home) = env("HOME") {
        dirs.extend([home.join(".local/lib64"), home.join(".local/lib")]);
    }
    dirs
}
