//! The `wasmbox compile` and `wasmbox invoke` subcommands, run as a user would.

use std::io::Write;
use std::process::{Output, Stdio};

use http::StatusCode;
use wasmbox_integration::{Supervisor, function_wasm, repo_root, sha256_file, wasmbox_command};

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `wasmbox invoke ARGS` in the example functions directory with `stdin`.
fn invoke(args: &[&str], stdin: &[u8]) -> anyhow::Result<Output> {
    let mut child = wasmbox_command()
        .arg("invoke")
        .args(args)
        .env("WASMBOX_FUNCTIONS_DIR", repo_root().join("target/test-functions"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child.stdin.take().unwrap().write_all(stdin)?;
    Ok(child.wait_with_output()?)
}

#[tokio::test]
async fn compile_fills_the_cache_a_server_then_loads_from() -> anyhow::Result<()> {
    let cache = tempfile::tempdir()?;
    let bad = cache.path().join("bad.wasm");
    std::fs::write(&bad, b"\0asm\x01\0\0\0\x01\xff")?;
    let hello = function_wasm("hello");
    let out = wasmbox_command()
        .env("WASMBOX_CACHE_DIR", cache.path().join("c"))
        .arg("compile")
        .arg(&hello)
        .arg(&bad)
        .output()?;
    assert_eq!(out.status.code(), Some(1), "one module failed: {}", text(&out.stderr));
    let hash = sha256_file(&hello);
    assert!(text(&out.stdout).contains(&format!("compiled {hash}")), "{}", text(&out.stdout));
    assert!(text(&out.stderr).contains("bad.wasm"), "{}", text(&out.stderr));

    // A server on that cache loads the artifact on its very first invocation.
    let s = Supervisor::builder()
        .workers(1)
        .function("hello")
        .env("WASMBOX_CACHE_DIR", cache.path().join("c").display())
        .start()?;
    let r = s.get("/hello").await?;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("x-wasmbox-module-source"), Some("artifact"), "precompiled by `wasmbox compile`");

    // Again: nothing to do, success.
    let out = wasmbox_command().env("WASMBOX_CACHE_DIR", cache.path().join("c")).arg("compile").arg(&hello).output()?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("already compiled"), "{}", text(&out.stdout));
    Ok(())
}

#[test]
fn invoke_runs_a_function_once_with_its_config() -> anyhow::Result<()> {
    let out = invoke(&["echo"], b"round trip")?;
    assert_eq!((out.status.code(), text(&out.stdout).as_str()), (Some(0), "round trip"), "{}", text(&out.stderr));

    // args-env.toml: default args and environment.
    let out = invoke(&["args-env"], b"")?;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(json["args"], serde_json::json!(["args-env", "--greeting"]));
    assert_eq!(json["env"]["GREETING"], "hello from args-env.toml");
    // Arguments on the command line replace the config's, hyphens and all.
    let out = invoke(&["args-env", "-x", "y"], b"")?;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(json["args"], serde_json::json!(["args-env", "-x", "y"]));

    // fs.toml: a preopened directory.
    let out = invoke(&["fs"], b"")?;
    assert!(text(&out.stdout).contains("readme.txt"), "{} {}", text(&out.stdout), text(&out.stderr));

    // The guest's exit code is the command's; a trap is 125.
    assert_eq!(invoke(&["exit-code", "7"], b"")?.status.code(), Some(7));
    assert_eq!(invoke(&["trap"], b"")?.status.code(), Some(125));

    let out = invoke(&["nope"], b"")?;
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("no function named nope"), "{}", text(&out.stderr));
    let out = invoke(&["../etc/passwd"], b"")?;
    assert_eq!(out.status.code(), Some(1));
    Ok(())
}
