//! Stateful sessions end to end: the `counter` example (a Rust reactor keeping a map of
//! keys to values in its heap) driven through `/sessions/...` on real supervisors.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use nix::sys::signal::Signal;
use wasmbox_integration::{Builder, Client, Reply, Supervisor, function_wasm, wait_busy};

fn counter() -> Builder {
    Supervisor::builder().function("counter")
}

/// Creates a session of `function`; returns its id.
pub async fn create(c: &Client, function: &str) -> anyhow::Result<String> {
    let r = c.post(&format!("/sessions/{function}"), Bytes::new()).await?;
    anyhow::ensure!(r.status == StatusCode::CREATED, "create: {} {}", r.status, r.text());
    let id = r.json()["id"].as_str().unwrap_or_default().to_owned();
    assert_eq!(id.len(), 32, "{}", r.text());
    assert_eq!(r.header("location"), Some(format!("/sessions/{function}/{id}").as_str()));
    Ok(id)
}

pub async fn send(c: &Client, function: &str, id: &str, message: &str) -> anyhow::Result<Reply> {
    c.post(&format!("/sessions/{function}/{id}"), message.to_owned()).await
}

/// Sends `message` and expects 200; returns the reply without its newline.
pub async fn ok(c: &Client, function: &str, id: &str, message: &str) -> anyhow::Result<String> {
    let r = send(c, function, id, message).await?;
    anyhow::ensure!(r.status == StatusCode::OK, "{message:?}: {} {}", r.status, r.text());
    Ok(r.text().trim_end().to_owned())
}

/// The counter module with a custom section appended: a different module (another hash)
/// with the same code.
fn other_counter_module() -> Vec<u8> {
    let mut bytes = std::fs::read(function_wasm("counter")).unwrap();
    // Custom section (id 0): size, name "other", one payload byte.
    bytes.extend_from_slice(&[0, 7, 5, b'o', b't', b'h', b'e', b'r', 1]);
    bytes
}

#[tokio::test]
async fn a_thousand_messages_give_the_right_count_in_order() -> anyhow::Result<()> {
    let s = counter().workers(2).start()?;
    let c = s.client();
    let id = create(&c, "counter").await?;
    // One client: every reply is the count so far, in order.
    for i in 1..=500 {
        assert_eq!(ok(&c, "counter", &id, "incr n").await?, i.to_string());
    }
    // Eight concurrent clients: messages are applied one at a time, so every one of them
    // saw a different state and none was lost.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (c, id) = (c.clone(), id.clone());
        tasks.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            for _ in 0..63 {
                seen.push(ok(&c, "counter", &id, "incr n").await?.parse::<u64>()?);
            }
            anyhow::Ok(seen)
        }));
    }
    let mut seen = Vec::new();
    for t in tasks {
        seen.extend(t.await??);
    }
    seen.sort_unstable();
    assert_eq!(seen, (501..=1004).collect::<Vec<u64>>());
    assert_eq!(ok(&c, "counter", &id, "get n").await?, "1004");
    Ok(())
}

#[tokio::test]
async fn failed_messages_leave_the_session_at_its_previous_state() -> anyhow::Result<()> {
    let s = counter().start()?;
    let c = s.client();
    let id = create(&c, "counter").await?;
    ok(&c, "counter", &id, "incr a 2").await?;
    let before = c.get(&format!("/sessions/counter/{id}/snapshot")).await?.body;
    // A trap after the increment happened in memory.
    let r = send(&c, "counter", &id, "trap a").await?;
    assert_eq!((r.status, r.kind().as_str()), (StatusCode::INTERNAL_SERVER_ERROR, "trap"), "{}", r.text());
    assert!(r.json()["stderr"].as_str().unwrap().contains("trap requested"));
    // A deadline.
    let r =
        c.request(Method::POST, &format!("/sessions/counter/{id}"), &[("Timeout-Ms", "300")], "spin a".into()).await?;
    assert_eq!((r.status, r.kind().as_str()), (StatusCode::GATEWAY_TIMEOUT, "deadline_exceeded"), "{}", r.text());
    // The memory limit.
    let r = c
        .request(Method::POST, &format!("/sessions/counter/{id}"), &[("Memory-Request", "32")], "grow 64".into())
        .await?;
    assert_eq!((r.status, r.kind().as_str()), (StatusCode::INSUFFICIENT_STORAGE, "memory_limit_exceeded"));
    // proc_exit with a code (an unknown command exits 2).
    let r = send(&c, "counter", &id, "bogus").await?;
    assert_eq!((r.status, r.kind().as_str()), (StatusCode::INTERNAL_SERVER_ERROR, "nonzero_exit"));
    assert_eq!(r.json()["exit_code"], 2);
    // Nothing of it was committed: the stored state is byte for byte what it was.
    assert_eq!(c.get(&format!("/sessions/counter/{id}/snapshot")).await?.body, before);
    assert_eq!(ok(&c, "counter", &id, "get a").await?, "2");
    assert_eq!(ok(&c, "counter", &id, "incr a").await?, "3");
    Ok(())
}

#[tokio::test]
async fn a_worker_killed_during_a_message_fails_it_and_the_session_goes_on() -> anyhow::Result<()> {
    let s = counter().workers(2).start()?;
    s.wait_pool_full(2, Duration::from_secs(10)).await?;
    let c = s.client();
    let id = create(&c, "counter").await?;
    assert_eq!(ok(&c, "counter", &id, "incr a").await?, "1");
    let pids = s.worker_pids();
    let path = format!("/sessions/counter/{id}");
    let spin = c.request(Method::POST, &path, &[("Timeout-Ms", "20000")], "spin a".into());
    let killer = async {
        let pid = wait_busy(&pids, 1, Duration::from_secs(10)).await?[0];
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL)?;
        anyhow::Ok(())
    };
    let (r, killed) = tokio::join!(spin, killer);
    killed?;
    let r = r?;
    assert_eq!((r.status, r.kind().as_str()), (StatusCode::BAD_GATEWAY, "worker_died"), "{}", r.text());
    assert_eq!(ok(&c, "counter", &id, "get a").await?, "1");
    assert_eq!(ok(&c, "counter", &id, "incr a").await?, "2");
    Ok(())
}

#[tokio::test]
async fn sessions_survive_a_supervisor_restart() -> anyhow::Result<()> {
    let state = tempfile::tempdir()?;
    let start = || counter().env("WASMBOX_STATE_DIR", state.path().display()).start();
    let mut s = start()?;
    let c = s.client();
    let (a, b) = (create(&c, "counter").await?, create(&c, "counter").await?);
    for _ in 0..3 {
        ok(&c, "counter", &a, "incr x").await?;
    }
    ok(&c, "counter", &b, "set y 42").await?;
    // The state directory belongs to one supervisor at a time.
    let mut second = counter().env("WASMBOX_STATE_DIR", state.path().display()).start_unready()?;
    let status = second.wait_exit(Duration::from_secs(30)).await?;
    assert!(!status.success());
    assert!(second.logs().contains("in use by another wasmbox process"), "{}", second.logs());
    s.signal(Signal::SIGTERM)?;
    s.wait_exit(Duration::from_secs(30)).await?;
    drop(s);
    let s = start()?;
    let c = s.client();
    assert_eq!(ok(&c, "counter", &a, "incr x").await?, "4");
    assert_eq!(ok(&c, "counter", &b, "keys").await?, "y=42");
    Ok(())
}

#[tokio::test]
async fn an_exported_session_continues_in_another_supervisor() -> anyhow::Result<()> {
    let one = counter().start()?;
    let two = counter().start()?;
    let (c1, c2) = (one.client(), two.client());
    let id = create(&c1, "counter").await?;
    for _ in 0..3 {
        ok(&c1, "counter", &id, "incr n").await?;
    }
    let export = c1.get(&format!("/sessions/counter/{id}/snapshot")).await?;
    assert_eq!(export.status, StatusCode::OK);
    assert_eq!(export.header("content-type"), Some("application/vnd.wasmbox.snapshot"));
    assert_eq!(&export.body[..8], b"WBXSNAP\0");
    let path = format!("/sessions/counter/{id}/snapshot");
    let r = c2.request(Method::PUT, &path, &[], export.body.clone()).await?;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    assert_eq!(ok(&c2, "counter", &id, "incr n").await?, "4");
    // The two are separate sessions from here on.
    assert_eq!(ok(&c1, "counter", &id, "get n").await?, "3");
    // Importing over an existing session replaces its state.
    let r = c2.request(Method::PUT, &path, &[], export.body).await?;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(ok(&c2, "counter", &id, "get n").await?, "3");
    Ok(())
}

#[tokio::test]
async fn bad_snapshots_are_refused_and_change_nothing() -> anyhow::Result<()> {
    let s =
        counter().module("other", other_counter_module()).env("WASMBOX_SESSION_MAX_SNAPSHOT_BYTES", 1 << 20).start()?;
    let c = s.client();
    let id = create(&c, "counter").await?;
    ok(&c, "counter", &id, "incr n 7").await?;
    let path = format!("/sessions/counter/{id}/snapshot");
    let good = c.get(&path).await?.body;
    let other_id = create(&c, "other").await?;
    let foreign = c.get(&format!("/sessions/other/{other_id}/snapshot")).await?.body;

    let mut flipped = good.to_vec();
    flipped[good.len() / 2] ^= 0x10;
    // Right module and checksum, but no globals: only restoring it shows it does not fit.
    let sha = wasmbox_integration::sha256_file(&function_wasm("counter"));
    let mut hash = [0u8; 32];
    for (i, b) in hash.iter_mut().enumerate() {
        *b = u8::from_str_radix(&sha[2 * i..2 * i + 2], 16)?;
    }
    let misfit = wasmbox_protocol::snapshot::Writer::new(hash, 17).finish();
    let oversized = vec![7u8; (1 << 20) + 1];
    let cases: [(&str, Vec<u8>, StatusCode, &str); 6] = [
        ("another module's", foreign.to_vec(), StatusCode::UNPROCESSABLE_ENTITY, "snapshot_invalid"),
        ("truncated", good[..good.len() - 100].to_vec(), StatusCode::UNPROCESSABLE_ENTITY, "snapshot_invalid"),
        ("bit-flipped", flipped, StatusCode::UNPROCESSABLE_ENTITY, "snapshot_invalid"),
        ("garbage", b"not a snapshot".to_vec(), StatusCode::UNPROCESSABLE_ENTITY, "snapshot_invalid"),
        ("misfit", misfit, StatusCode::UNPROCESSABLE_ENTITY, "snapshot_invalid"),
        ("oversized", oversized, StatusCode::PAYLOAD_TOO_LARGE, "snapshot_too_large"),
    ];
    let fresh = "0123456789abcdef0123456789abcdef";
    for (what, bytes, status, kind) in cases {
        let bytes = Bytes::from(bytes);
        for target in [&path, &format!("/sessions/counter/{fresh}/snapshot")] {
            let r = c.request(Method::PUT, target, &[], bytes.clone()).await?;
            assert_eq!((r.status, r.kind().as_str()), (status, kind), "{what} into {target}: {}", r.text());
        }
        // Nothing changed: the session holds the same bytes and answers from them; the
        // new id was not created.
        assert_eq!(c.get(&path).await?.body, good, "{what}");
        assert_eq!(c.get(&format!("/sessions/counter/{fresh}")).await?.kind(), "session_not_found");
    }
    assert_eq!(ok(&c, "counter", &id, "get n").await?, "7");
    Ok(())
}

#[tokio::test]
async fn two_sessions_progress_at_the_same_time() -> anyhow::Result<()> {
    let s = counter().workers(2).start()?;
    let c = s.client();
    let (a, b) = (create(&c, "counter").await?, create(&c, "counter").await?);
    // A's message holds one worker for 3 s (then hits its deadline); B goes on meanwhile.
    let slow = {
        let c = c.clone();
        let path = format!("/sessions/counter/{a}");
        tokio::spawn(async move { c.request(Method::POST, &path, &[("Timeout-Ms", "3000")], "spin a".into()).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    for i in 1..=20 {
        assert_eq!(ok(&c, "counter", &b, "incr b").await?, i.to_string());
    }
    let took = started.elapsed();
    assert!(!slow.is_finished(), "B's 20 messages ran while A's was still running ({took:?})");
    assert_eq!(slow.await??.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(ok(&c, "counter", &a, "get a").await?, "0");
    Ok(())
}

#[tokio::test]
async fn session_limits_are_enforced_with_typed_errors() -> anyhow::Result<()> {
    let s = counter()
        .env("WASMBOX_SESSION_MAX", 2)
        .env("WASMBOX_SESSION_MAX_SNAPSHOT_BYTES", 1 << 20)
        .env("WASMBOX_SESSION_IDLE_SECS", 2)
        .start()?;
    let c = s.client();
    let a = create(&c, "counter").await?;
    let b = create(&c, "counter").await?;
    let r = c.post("/sessions/counter", Bytes::new()).await?;
    assert_eq!((r.status, r.kind().as_str()), (StatusCode::INSUFFICIENT_STORAGE, "session_limit"), "{}", r.text());
    assert_eq!((r.json()["max_sessions"].as_u64(), r.json()["scope"].as_str()), (Some(2), Some("server")));
    assert!(c.get("/metrics").await?.text().contains("wasmbox_sessions 2\n"));
    // A state larger than the snapshot limit is not committed.
    let r = send(&c, "counter", &a, "fill 4").await?;
    assert_eq!((r.status, r.kind().as_str()), (StatusCode::INSUFFICIENT_STORAGE, "session_state_too_large"));
    assert_eq!(ok(&c, "counter", &a, "touch").await?, "0", "the ballast was rolled back");
    // Deleting frees a place.
    let r = c.request(Method::DELETE, &format!("/sessions/counter/{b}"), &[], Bytes::new()).await?;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert_eq!(send(&c, "counter", &b, "get x").await?.kind(), "session_not_found");
    let fresh = create(&c, "counter").await?;
    // Idle sessions expire: `a` is kept busy, `fresh` is left alone.
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        ok(&c, "counter", &a, "incr k").await?;
    }
    let r = send(&c, "counter", &fresh, "get k").await?;
    assert_eq!((r.status, r.kind().as_str()), (StatusCode::GONE, "session_expired"), "{}", r.text());
    let file = s.default_state_dir().join("sessions/counter").join(format!("{fresh}.snap"));
    wait_until(|| !file.exists(), Duration::from_secs(5)).await?;
    assert_eq!(ok(&c, "counter", &a, "get k").await?, "6");
    Ok(())
}

async fn wait_until(done: impl Fn() -> bool, within: Duration) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + within;
    while !done() {
        anyhow::ensure!(std::time::Instant::now() < deadline, "condition not reached within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

#[tokio::test]
async fn the_api_answers_mistakes_with_typed_errors() -> anyhow::Result<()> {
    let s = counter()
        .function("hello")
        .module("counter-other", std::fs::read(function_wasm("counter"))?)
        .file("counter-other.toml", "[session]\nhandler = \"other\"\n")
        .start()?;
    let c = s.client();
    let id = create(&c, "counter").await?;
    let cases: [(Method, String, StatusCode, &str); 7] = [
        (Method::POST, "/sessions/nope".into(), StatusCode::NOT_FOUND, "function_not_found"),
        (Method::POST, "/sessions/hello".into(), StatusCode::UNPROCESSABLE_ENTITY, "invalid_module"),
        (Method::POST, format!("/sessions/counter/{}", "f".repeat(32)), StatusCode::NOT_FOUND, "session_not_found"),
        (Method::POST, "/sessions/counter/../../etc".into(), StatusCode::NOT_FOUND, "not_found"),
        (Method::POST, "/sessions/counter/short".into(), StatusCode::NOT_FOUND, "session_not_found"),
        (Method::PATCH, format!("/sessions/counter/{id}"), StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
        (Method::GET, "/sessions/counter".into(), StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
    ];
    for (method, path, status, kind) in cases {
        let r = c.request(method.clone(), &path, &[], Bytes::new()).await?;
        assert_eq!((r.status, r.kind().as_str()), (status, kind), "{method} {path}: {}", r.text());
    }
    // A session of one function is not reachable through another's path.
    assert_eq!(send(&c, "counter-other", &id, "get n").await?.kind(), "session_not_found");
    // The configured handler gets every message of counter-other's sessions; a state made
    // by `handle` (same module, so its snapshot imports) is what it reads.
    let other = create(&c, "counter-other").await?;
    assert_eq!(ok(&c, "counter-other", &other, "incr count 4").await?, "other:0");
    ok(&c, "counter", &id, "incr count 4").await?;
    let state = c.get(&format!("/sessions/counter/{id}/snapshot")).await?.body;
    let r = c.request(Method::PUT, &format!("/sessions/counter-other/{other}/snapshot"), &[], state).await?;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(ok(&c, "counter-other", &other, "whatever").await?, "other:4");
    // What the server knows of a session.
    let info = c.get(&format!("/sessions/counter/{id}")).await?;
    assert_eq!(info.status, StatusCode::OK);
    assert_eq!(info.json()["id"], id.as_str());
    assert!(info.json()["snapshot_bytes"].as_u64().unwrap() > 0);
    Ok(())
}

#[tokio::test]
async fn a_replaced_module_is_a_conflict_until_the_session_moves_on() -> anyhow::Result<()> {
    let s = counter().start()?;
    let c = s.client();
    let id = create(&c, "counter").await?;
    ok(&c, "counter", &id, "incr n").await?;
    let functions = s.functions_dir();
    replace(&functions.join("counter.wasm"), &other_counter_module())?;
    let r = send(&c, "counter", &id, "incr n").await?;
    assert_eq!((r.status, r.kind().as_str()), (StatusCode::CONFLICT, "session_module_changed"), "{}", r.text());
    // New sessions are of the new module.
    let fresh = create(&c, "counter").await?;
    assert_eq!(ok(&c, "counter", &fresh, "incr n").await?, "1");
    Ok(())
}

fn replace(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(tmp, path)
}

/// A state directory that another user made first (the predictable `/tmp` default), or
/// that anyone may write to, is refused at startup with the reason, never trusted.
#[tokio::test]
async fn a_state_directory_others_control_is_refused() -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir()?;
    let open = tmp.path().join("open");
    std::fs::create_dir(&open)?;
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777))?;
    let mut cases = vec![(open, "writable by group or others")];
    if nix::unistd::geteuid().is_root() {
        let foreign = tmp.path().join("foreign");
        std::fs::create_dir(&foreign)?;
        std::fs::set_permissions(&foreign, std::fs::Permissions::from_mode(0o700))?;
        std::os::unix::fs::chown(&foreign, Some(65534), Some(65534))?;
        cases.push((foreign, "owned by uid 65534"));
    }
    for (dir, why) in cases {
        let err = counter().env("WASMBOX_STATE_DIR", dir.display()).start().err().expect("started on an untrusted dir");
        let err = format!("{err:#}");
        assert!(err.contains(why) && err.contains("WASMBOX_STATE_DIR"), "{}: {err}", dir.display());
        assert!(!dir.join("sessions").exists(), "nothing written into {}", dir.display());
    }
    Ok(())
}

/// An import into the id of a session that expired but was not swept yet makes a live
/// session (201), which the next sweep leaves alone; it used to revive the stale entry,
/// which was still expired and was deleted by the sweep.
#[tokio::test]
async fn an_import_into_an_expired_session_makes_a_live_one() -> anyhow::Result<()> {
    let s = counter().env("WASMBOX_SESSION_IDLE_SECS", 1).start()?;
    let c = s.client();
    let id = create(&c, "counter").await?;
    assert_eq!(ok(&c, "counter", &id, "incr n").await?, "1");
    let snapshot = c.get(&format!("/sessions/counter/{id}/snapshot")).await?;
    assert_eq!(snapshot.status, StatusCode::OK);
    // Expired (the lookup says so at once, whether or not the sweep ran yet); asked without
    // a message, which would keep it alive.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while c.get(&format!("/sessions/counter/{id}")).await?.status != StatusCode::GONE {
        anyhow::ensure!(std::time::Instant::now() < deadline, "the session never expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = c.request(Method::PUT, &format!("/sessions/counter/{id}/snapshot"), &[], snapshot.body.clone()).await?;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    let info = c.get(&format!("/sessions/counter/{id}")).await?;
    assert_eq!(info.status, StatusCode::OK, "{}", info.text());
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as u64;
    assert!(info.json()["expires_unix_ms"].as_u64().is_some_and(|t| t > now_ms), "{}", info.text());
    // In use, it stays across sweeps (every 250 ms here), with the imported state.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(ok(&c, "counter", &id, "get n").await?, "1");
    }
    Ok(())
}

/// Session ids are bearer credentials: the log names a session by a short hash of its id.
#[tokio::test]
async fn session_ids_stay_out_of_the_log() -> anyhow::Result<()> {
    let s = counter().start()?;
    let c = s.client();
    let id = create(&c, "counter").await?;
    ok(&c, "counter", &id, "incr n").await?;
    let r = c.request(Method::DELETE, &format!("/sessions/counter/{id}"), &[], Bytes::new()).await?;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    use sha2::Digest;
    let short: String = sha2::Sha256::digest(id.as_bytes()).iter().take(6).map(|b| format!("{b:02x}")).collect();
    let logs = s.logs_with(&["session deleted"], Duration::from_secs(10)).await?;
    assert!(!logs.contains(&id), "the id is in the log:\n{logs}");
    assert!(logs.matches(&short).count() >= 3, "create, message and delete name {short}:\n{logs}");
    Ok(())
}

/// Per-function quotas: one function cannot take every session or all the stored bytes
/// from the others. Its own limits (name.toml) and the server's defaults both apply, with
/// the scope in the error; a message whose state would pass a byte limit changes nothing.
#[tokio::test]
async fn session_quotas_per_function_and_for_the_state_directory() -> anyhow::Result<()> {
    let other = std::fs::read(function_wasm("counter"))?;
    let s = counter()
        .module("other", other)
        .file("counter.toml", "[session]\nmax_sessions = 2\nmax_stored_bytes = 600000\n")
        .env("WASMBOX_SESSION_MAX", 6)
        .env("WASMBOX_SESSION_MAX_PER_FUNCTION", 3)
        .start()?;
    let c = s.client();
    // counter: its own limit of 2 sessions.
    let a = create(&c, "counter").await?;
    let _b = create(&c, "counter").await?;
    let r = c.post("/sessions/counter", Bytes::new()).await?;
    assert_eq!((r.status, r.kind().as_str()), (StatusCode::INSUFFICIENT_STORAGE, "session_limit"), "{}", r.text());
    assert_eq!((r.json()["scope"].as_str(), r.json()["max_sessions"].as_u64()), (Some("function"), Some(2)));
    // other: the server's per-function default (3), unaffected by counter being full.
    let others: Vec<String> =
        [create(&c, "other").await?, create(&c, "other").await?, create(&c, "other").await?].into();
    let r = c.post("/sessions/other", Bytes::new()).await?;
    assert_eq!((r.json()["scope"].as_str(), r.json()["max_sessions"].as_u64()), (Some("function"), Some(3)));
    // A new function would still get one, up to the server's total of 6... which is
    // reached now (2 + 3 = 5, plus one import below).
    let snapshot = c.get(&format!("/sessions/other/{}/snapshot", others[0])).await?.body;
    let fresh_id = "0123456789abcdef0123456789abcdef";
    let r = c.request(Method::PUT, &format!("/sessions/other/{fresh_id}/snapshot"), &[], snapshot).await?;
    assert_eq!(r.json()["scope"].as_str(), Some("function"), "an import counts too: {}", r.text());

    // Stored bytes: counter may keep 600,000 bytes of snapshots. A 2 MiB ballast encodes
    // larger: refused, nothing committed.
    let r = send(&c, "counter", &a, "fill 2").await?;
    assert_eq!(
        (r.status, r.kind().as_str()),
        (StatusCode::INSUFFICIENT_STORAGE, "session_storage_full"),
        "{}",
        r.text()
    );
    assert_eq!((r.json()["scope"].as_str(), r.json()["limit_bytes"].as_u64()), (Some("function"), Some(600_000)));
    assert_eq!(ok(&c, "counter", &a, "touch").await?, "0", "the ballast was not committed");
    // A small state still fits; deleting gives the place back.
    assert_eq!(ok(&c, "counter", &a, "incr n").await?, "1");
    let r = c.request(Method::DELETE, &format!("/sessions/counter/{a}"), &[], Bytes::new()).await?;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    create(&c, "counter").await?;
    Ok(())
}

/// The state directory's total: whatever each function may hold, all of them together stay
/// within WASMBOX_SESSION_MAX_TOTAL_BYTES.
#[tokio::test]
async fn the_state_directory_has_a_total_byte_budget() -> anyhow::Result<()> {
    let s = counter().env("WASMBOX_SESSION_MAX_TOTAL_BYTES", 1_500_000).start()?;
    let c = s.client();
    let a = create(&c, "counter").await?;
    let b = create(&c, "counter").await?;
    assert_eq!(ok(&c, "counter", &a, "fill 2").await?, "filled 2");
    let used: u64 = c.get(&format!("/sessions/counter/{a}")).await?.json()["snapshot_bytes"].as_u64().unwrap_or(0);
    assert!(used > 750_000, "a 2 MiB ballast encodes to {used} bytes");
    let r = send(&c, "counter", &b, "fill 2").await?;
    assert_eq!(
        (r.status, r.kind().as_str()),
        (StatusCode::INSUFFICIENT_STORAGE, "session_storage_full"),
        "{}",
        r.text()
    );
    assert_eq!((r.json()["scope"].as_str(), r.json()["limit_bytes"].as_u64()), (Some("server"), Some(1_500_000)));
    assert_eq!(ok(&c, "counter", &b, "touch").await?, "0");
    // Deleting a gives its bytes back: now b's state fits.
    let r = c.request(Method::DELETE, &format!("/sessions/counter/{a}"), &[], Bytes::new()).await?;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert_eq!(ok(&c, "counter", &b, "fill 2").await?, "filled 2");
    Ok(())
}

/// A message is admitted (a worker, or a place in the queue) before its session's state is
/// read: with the pool busy and the queue full it is refused without touching the state
/// (here a corrupt file, which reading would report).
#[tokio::test]
async fn a_message_takes_its_queue_place_before_its_state_is_read() -> anyhow::Result<()> {
    // One tenant, so the busy function and the session share the one worker.
    let s = counter().workers(1).function("cpu-spin").tenant("t").env("WASMBOX_QUEUE_DEPTH", 1).start()?;
    let c = s.client();
    let id = create(&c, "counter").await?;
    let file = s.default_state_dir().join("sessions/counter").join(format!("{id}.snap"));
    std::fs::write(&file, b"not a snapshot")?;
    // The one worker busy for a while, the one queue place taken.
    let busy: Vec<_> = (0..2)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move { c.get("/cpu-spin?arg=3000").await })
        })
        .collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while s.get("/ready").await?.json()["pool"]["queued"] != 1 {
        anyhow::ensure!(std::time::Instant::now() < deadline, "the queue never filled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = send(&c, "counter", &id, "get n").await?;
    assert_eq!((r.status, r.kind().as_str()), (StatusCode::TOO_MANY_REQUESTS, "queue_full"), "{}", r.text());
    for t in busy {
        assert_eq!(t.await??.status, StatusCode::OK);
    }
    // With a worker free, the state is read: and it is corrupt.
    let r = send(&c, "counter", &id, "get n").await?;
    assert_eq!((r.status, r.kind().as_str()), (StatusCode::INTERNAL_SERVER_ERROR, "session_corrupt"), "{}", r.text());
    Ok(())
}
