//! Preopened directories against tenants who rearrange them: a function with a writable
//! preopen must not be able to hand another function any other directory (the host's `/`
//! least of all), and no preopen may expose the server's own directories.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::Result;
use bytes::Bytes;
use http::{Method, StatusCode};
use wasmbox_integration::{Reply, Supervisor};

/// How long a log line may take to reach the test.
const WAIT: std::time::Duration = std::time::Duration::from_secs(10);

fn writable(path: &Path) -> Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777))?;
    Ok(())
}

/// A refused config: 422, the function named, no host path or config value in the answer.
fn assert_refused(r: &Reply, hidden: &[&str]) {
    assert_eq!(
        (r.status, r.kind().as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, "invalid_function_config"),
        "{}",
        r.text()
    );
    for needle in hidden {
        assert!(!r.text().contains(needle), "the answer names {needle:?}: {}", r.text());
    }
}

/// The attack as a tenant would run it: function `writer` has a writable preopen that
/// contains function `reader`'s preopen. The writer renames the reader's directory away and
/// puts a symbolic link to `/` in its place, so that the reader's next invocation would be
/// given the host's root. The configuration is refused, and the reader never sees `/`.
#[tokio::test]
async fn a_writable_preopen_cannot_swap_another_functions_preopen_for_the_host_root() -> Result<()> {
    let s = Supervisor::builder()
        .function("fs")
        .file("writer.toml", "[[preopen]]\nhost = \"shared\"\nguest = \"/shared\"\nread_only = false\n")
        .file("shared/victim/own.txt", "the reader's data\n")
        .start()?;
    let functions = s.functions_dir();
    for name in ["writer", "reader"] {
        std::fs::copy(functions.join("fs.wasm"), functions.join(format!("{name}.wasm")))?;
    }
    writable(&functions.join("shared"))?;
    let r = s.get("/writer?arg=ls&arg=/shared").await?;
    assert_eq!((r.status, r.text().as_str()), (StatusCode::OK, "victim\n"), "{}", r.text());

    // The reader's config arrives while the writer is being served.
    std::fs::write(functions.join("reader.toml"), "[[preopen]]\nhost = \"shared/victim\"\nguest = \"/victim\"\n")?;
    let shared = functions.join("shared").canonicalize()?;
    let r = s.get("/reader?arg=ls&arg=/victim").await?;
    assert_refused(&r, &[&shared.display().to_string(), "shared/victim"]);
    s.logs_with(&["function config refused", "are nested and one of them is writable"], WAIT).await?;

    // The swap itself, through the writer's WASI preopen.
    let r = s.get("/writer?arg=mv&arg=/shared/victim&arg=/shared/moved").await?;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    // A relative target that climbs out of the preopen to the host's root: Wasmtime lets a
    // guest create it (following it is refused inside WASI; the host would follow it).
    let up = "../".repeat(shared.components().count() + 2);
    let linked = s.get(&format!("/writer?arg=ln&arg={up}&arg=/shared/victim")).await?;
    eprintln!("writer's symlink to the host's root: {} {}", linked.status, linked.text());
    if linked.status == StatusCode::OK {
        let link = functions.join("shared/victim");
        assert!(std::fs::symlink_metadata(&link)?.file_type().is_symlink());
        assert_eq!(link.canonicalize()?, Path::new("/"), "the host would take the link to /");
    }
    for _ in 0..3 {
        let r = s.get("/reader?arg=ls&arg=/victim").await?;
        assert_refused(&r, &["proc", "etc"]);
    }
    // Nothing of the host's root reached the writer either: its view is its own directory.
    let r = s.get("/writer?arg=ls&arg=/shared/victim").await?;
    assert!(!r.text().contains("proc\n") && !r.text().contains("etc\n"), "{}", r.text());
    assert_eq!(s.get("/writer?arg=ls&arg=/shared").await?.status, StatusCode::OK);
    Ok(())
}

/// Whatever replaces a preopened directory of a served function (a link, another
/// directory), the next invocation is not given it blindly: the open follows no link and
/// checks the directory's identity, and on a change the config is checked again against
/// the rules as the directories are now. A link to `/` fails those checks; an ordinary
/// directory put in its place by the operator passes them.
#[tokio::test]
async fn a_replaced_preopen_is_checked_again_and_a_link_to_the_root_is_refused() -> Result<()> {
    let s = Supervisor::builder()
        .function("fs")
        .file("fs.toml", "[[preopen]]\nhost = \"data\"\nguest = \"/data\"\n")
        .file("data/note.txt", "original\n")
        .start()?;
    let functions = s.functions_dir();
    let r = s.get("/fs?arg=cat&arg=/data/note.txt").await?;
    assert_eq!((r.status, r.text().as_str()), (StatusCode::OK, "original\n"), "{}", s.logs());

    std::fs::rename(functions.join("data"), functions.join("data.old"))?;
    std::os::unix::fs::symlink("/", functions.join("data"))?;
    let r = s.get("/fs?arg=ls&arg=/data").await?;
    assert_refused(&r, &["proc\n", "etc\n"]);
    s.logs_with(&["preopened directory changed; checking the config again", "contains the functions directory"], WAIT)
        .await?;

    // The operator puts a new directory in place (a deploy that swaps data directories).
    std::fs::remove_file(functions.join("data"))?;
    std::fs::create_dir(functions.join("data"))?;
    std::fs::write(functions.join("data/fresh.txt"), "new\n")?;
    // A refused config is answered from memory for up to 2 s before it is checked again.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let r = s.get("/fs?arg=ls&arg=/data").await?;
        if r.status == StatusCode::OK {
            assert_eq!(r.text(), "fresh.txt\n");
            break;
        }
        assert_refused(&r, &[]);
        assert!(std::time::Instant::now() < deadline, "the new directory was never accepted: {}", s.logs());
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    Ok(())
}

/// No preopen may expose the functions directory (modules, and configs with their env),
/// the artifact cache (native code workers load) or the state directory (every tenant's
/// session state), nor lie inside the last two.
#[tokio::test]
async fn preopens_of_the_servers_own_directories_are_refused() -> Result<()> {
    let cache = tempfile::tempdir()?;
    let s = Supervisor::builder()
        .function("fs")
        .function("hello")
        .env("WASMBOX_CACHE_DIR", cache.path().display())
        .start()?;
    assert_eq!(s.get("/hello").await?.status, StatusCode::OK, "the cache is in use");
    let functions = s.functions_dir();
    let state = s.default_state_dir().canonicalize()?;
    let cache_dir = cache.path().canonicalize()?;
    let cases = [
        (".".to_string(), true),
        ("..".to_string(), true),
        (state.display().to_string(), true),
        (state.join("sessions").display().to_string(), true),
        (cache_dir.display().to_string(), false),
        ("/".to_string(), true),
    ];
    for (i, (host, read_only)) in cases.iter().enumerate() {
        let name = format!("fs{i}");
        std::fs::copy(functions.join("fs.wasm"), functions.join(format!("{name}.wasm")))?;
        std::fs::write(
            functions.join(format!("{name}.toml")),
            format!("[[preopen]]\nhost = {host:?}\nguest = \"/x\"\nread_only = {read_only}\n"),
        )?;
        let r = s.request(Method::GET, &format!("/{name}?arg=ls&arg=/x"), &[], Bytes::new()).await?;
        let path_shown: &[&str] = if host.len() > 2 { &[host.as_str()] } else { &[] };
        assert_refused(&r, path_shown);
    }
    assert_eq!(s.get("/hello").await?.status, StatusCode::OK);
    Ok(())
}
