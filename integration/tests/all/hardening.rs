//! Worker hardening, checked from the kernel's side: /proc of the real worker processes.

use std::collections::HashMap;
use std::time::Duration;

use wasmbox_integration::{INHERITED_FD, Supervisor};

/// Fields of /proc/<pid>/status.
fn status(pid: i32) -> HashMap<String, String> {
    wasmbox_integration::proc_status(pid)
}

/// The soft limit of one line of /proc/<pid>/limits ("Max open files" ...).
fn limit(pid: i32, name: &str) -> String {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap_or_default();
    let line = limits.lines().find(|l| l.starts_with(name)).unwrap_or_default();
    line[name.len()..].split_whitespace().next().unwrap_or_default().to_string()
}

/// Interfaces of the process's network namespace (from its own /proc/<pid>/net/dev).
fn interfaces(pid: i32) -> Vec<String> {
    let dev = std::fs::read_to_string(format!("/proc/{pid}/net/dev")).unwrap_or_default();
    dev.lines().skip(2).filter_map(|l| l.split(':').next()).map(|s| s.trim().to_string()).collect()
}

/// Where each of the process's descriptors points.
fn fd_targets(pid: i32) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return Vec::new() };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|p| p.display().to_string())
        .collect()
}

fn netns(pid: i32) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/net")).map(|p| p.display().to_string()).unwrap_or_default()
}

fn running_as_root() -> bool {
    nix::unistd::geteuid().is_root()
}

async fn one_worker(s: &Supervisor) -> anyhow::Result<i32> {
    s.wait_pool_full(1, Duration::from_secs(10)).await?;
    let reply = s.post("/hello", "").await?;
    anyhow::ensure!(reply.status == 200, "hello: {} {}", reply.status, reply.text());
    Ok(s.worker_pids()[0])
}

#[tokio::test]
async fn every_layer_is_active_from_the_kernels_view() -> anyhow::Result<()> {
    let leaked = tempfile::NamedTempFile::new()?;
    let leaked_path = leaked.path().display().to_string();
    let s = Supervisor::builder().workers(1).function("hello").inherit(leaked.reopen()?).start()?;
    let pid = one_worker(&s).await?;
    // The supervisor itself did inherit the descriptor; its worker must not have.
    let supervisor_fds = fd_targets(s.pid());
    assert!(supervisor_fds.contains(&leaked_path), "test setup: supervisor lacks fd {INHERITED_FD}");
    let worker_fds = fd_targets(pid);
    assert!(!worker_fds.contains(&leaked_path), "worker inherited {leaked_path}: {worker_fds:?}");

    let st = status(pid);
    assert_eq!(st["NoNewPrivs"], "1");
    assert_eq!(st["Seccomp"], "2", "filter mode");
    if running_as_root() {
        let uid: Vec<&str> = st["Uid"].split_whitespace().collect();
        assert!(uid.iter().all(|u| *u != "0"), "worker uids {uid:?}");
        // Slot 0's uid: the first of the per-slot range (WASMBOX_WORKER_UID_BASE's default).
        assert_eq!(uid, vec!["2000000"; 4], "real, effective, saved and fs uid are all the slot's");
        assert_eq!(st["Groups"], "", "no supplementary groups");
        // A new network namespace with nothing but loopback, and loopback down.
        assert_ne!(netns(pid), netns(s.pid()));
        assert_eq!(interfaces(pid), vec!["lo".to_string()]);
    }
    assert_eq!(limit(pid, "Max core file size"), "0");
    assert_eq!(limit(pid, "Max open files"), "1024");
    assert_eq!(limit(pid, "Max file size"), (4096u64 << 20).to_string());
    if running_as_root() {
        assert_ne!(limit(pid, "Max processes"), "unlimited");
    }
    let logs = s.logs();
    let line = logs.lines().find(|l| l.contains("worker hardening:")).expect("one startup line about hardening");
    for layer in ["close_fds", "rlimits", "no_new_privs", "seccomp=enforce", "pdeathsig"] {
        assert!(line.contains(layer), "{layer} not in {line}");
    }
    Ok(())
}

#[tokio::test]
async fn each_layer_switches_off() -> anyhow::Result<()> {
    let leaked = tempfile::NamedTempFile::new()?;
    let leaked_path = leaked.path().display().to_string();
    let s = Supervisor::builder()
        .workers(1)
        .function("hello")
        .inherit(leaked.reopen()?)
        .env("WASMBOX_WORKER_CLOSE_FDS", "false")
        .env("WASMBOX_WORKER_RLIMITS", "false")
        .env("WASMBOX_WORKER_USER", "")
        .env("WASMBOX_WORKER_NETNS", "false")
        .env("WASMBOX_WORKER_NO_NEW_PRIVS", "false")
        .env("WASMBOX_WORKER_SECCOMP", "off")
        .start()?;
    let pid = one_worker(&s).await?;
    // The same observations as above, now showing each layer absent: the checks can fail.
    assert!(fd_targets(pid).contains(&leaked_path), "without close_fds the descriptor is inherited");
    let st = status(pid);
    assert_eq!(st["NoNewPrivs"], "0");
    assert_eq!(st["Seccomp"], "0");
    assert_eq!(netns(pid), netns(s.pid()));
    assert_eq!(st["Uid"].split_whitespace().next(), Some(nix::unistd::geteuid().to_string().as_str()));
    assert_ne!(limit(pid, "Max open files"), "1024");
    let logs = s.logs();
    let line = logs.lines().find(|l| l.contains("worker hardening:")).expect("hardening line");
    assert!(line.contains("skipped:"), "{line}");
    for setting in ["WASMBOX_WORKER_CLOSE_FDS=false", "WASMBOX_WORKER_NETNS=false", "WASMBOX_WORKER_SECCOMP=off"] {
        assert!(line.contains(setting), "{setting} not in {line}");
    }
    Ok(())
}

/// Calls the test-only host function that makes a syscall the allow-list forbids.
const FORBIDDEN: &str = r#"(module
  (import "wasmbox_test" "forbidden_syscall" (func $forbidden (result i64)))
  (memory (export "memory") 1)
  (func (export "_start") (drop (call $forbidden))))"#;

#[tokio::test]
async fn a_forbidden_syscall_kills_the_worker_with_sigsys_and_answers_502() -> anyhow::Result<()> {
    // The test hook is a host function of the Wasmtime engine; the filter is the same for
    // both engines.
    let s = Supervisor::builder()
        .engine("wasmtime")
        .workers(1)
        .env("WASMBOX_TEST_HOOKS", "1")
        .function("hello")
        .module("forbidden", wat::parse_str(FORBIDDEN)?)
        .start()?;
    let before = one_worker(&s).await?;
    let reply = s.post("/forbidden", "").await?;
    assert_eq!(reply.status, 502, "{}", reply.text());
    assert_eq!(reply.kind(), "seccomp_violation");
    s.wait_pool_full(1, Duration::from_secs(10)).await?;
    let after = s.worker_pids();
    assert_ne!(after, vec![before], "the killed worker was replaced");
    let hello = s.post("/hello", "").await?;
    assert_eq!(hello.status, 200);
    assert!(s.logs().contains("SIGSYS"), "the worker's death is logged with its signal");
    Ok(())
}

#[tokio::test]
async fn without_test_hooks_the_hook_does_not_exist() -> anyhow::Result<()> {
    let s = Supervisor::builder().workers(1).module("forbidden", wat::parse_str(FORBIDDEN)?).start()?;
    let reply = s.post("/forbidden", "").await?;
    assert_eq!(reply.status, 422, "{}", reply.text());
    assert_eq!(reply.kind(), "invalid_module");
    Ok(())
}

#[tokio::test]
async fn preopens_stay_reachable_behind_parents_closed_to_the_worker_user() -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    // The functions directory lives in a 0700 temporary directory owned by the test's
    // user: a worker running as nobody could not resolve any path in it.
    let s = Supervisor::builder()
        .workers(1)
        .function("fs")
        .file(
            "fs.toml",
            "args = [\"cat\", \"/data/note.txt\"]\n[[preopen]]\nhost = \"data\"\nguest = \"/data\"\nread_only = true\n",
        )
        .file("data/note.txt", "reachable through the supervisor's descriptor\n")
        .start()?;
    let parent = s.functions_dir().parent().expect("temp dir").to_path_buf();
    std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(0o700))?;
    let reply = s.post("/fs", "").await?;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.text(), "reachable through the supervisor's descriptor\n");
    Ok(())
}

/// Sleeps for a minute inside one host call (WASI poll_oneoff on a monotonic clock): the
/// engine's deadline (an epoch check in guest code) cannot fire until the call returns.
const SLEEP_IN_HOST: &str = r#"(module
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start")
    ;; subscription at 0: userdata 0, tag 0 (clock), clock id 1 (monotonic), 60 s, relative
    (i32.store8 (i32.const 8) (i32.const 0))
    (i32.store (i32.const 16) (i32.const 1))
    (i64.store (i32.const 24) (i64.const 60000000000))
    (drop (call $poll (i32.const 0) (i32.const 64) (i32.const 1) (i32.const 128)))))"#;

#[tokio::test]
async fn a_function_stuck_in_a_host_call_is_killed_by_the_supervisor() -> anyhow::Result<()> {
    for cgroups in ["off", "auto"] {
        let s = Supervisor::builder()
            .workers(1)
            .env("WASMBOX_CGROUPS", cgroups)
            .env("WASMBOX_KILL_GRACE_MS", 300)
            .function("hello")
            .module("sleeper", wat::parse_str(SLEEP_IN_HOST)?)
            .start()?;
        let before = one_worker(&s).await?;
        // Compile first, so the deadline below measures the guest alone.
        let warm = s.request(http::Method::POST, "/sleeper", &[("Timeout-Ms", "50")], "".into()).await?;
        assert_eq!(warm.status, 504, "{}", warm.text());
        s.wait_pool_full(1, Duration::from_secs(10)).await?;
        let started = std::time::Instant::now();
        let reply = s.request(http::Method::POST, "/sleeper", &[("Timeout-Ms", "200")], "".into()).await?;
        let took = started.elapsed();
        assert_eq!(reply.status, 504, "{}", reply.text());
        assert_eq!(reply.kind(), "deadline_exceeded");
        assert_eq!(reply.json()["worker_killed"], true, "{}", reply.text());
        // Deadline 200 ms + grace 300 ms (none where the kill is how deadlines are kept),
        // and nowhere near the guest's 60 s sleep.
        let engine_stops = wasmbox_integration::engine_stops_commands(&wasmbox_integration::test_engine());
        let least = Duration::from_millis(if engine_stops { 450 } else { 190 });
        assert!(took >= least && took < Duration::from_secs(5), "{cgroups}: {took:?}");
        s.wait_pool_full(1, Duration::from_secs(10)).await?;
        assert_ne!(s.worker_pids(), vec![before], "{cgroups}: worker replaced");
        assert_eq!(s.post("/hello", "").await?.status, 200);
    }
    Ok(())
}

/// A module that failed to prepare is not in the worker's cache, so the supervisor must not
/// count it there: with one cache entry, recording it pushed out the module the worker
/// really held, which then looked cold and kept the compile allowance (60 s more on the
/// hard deadline, 1 GiB more memory) while the worker ran it from memory.
#[tokio::test]
async fn a_module_that_failed_to_prepare_does_not_make_a_cached_one_look_cold() -> anyhow::Result<()> {
    let s = Supervisor::builder()
        .workers(1)
        .env("WASMBOX_WORKER_MODULE_CACHE", 1)
        .function("alloc")
        .function("counter")
        .start()?;
    let warm = s.get("/alloc?arg=1&arg=0").await?;
    assert_eq!(warm.status, 200, "{}", warm.text());
    // A reactor is no command module: 422 from the worker.
    let r = s.get("/counter").await?;
    assert_eq!(
        (r.status, r.kind().as_str()),
        (http::StatusCode::UNPROCESSABLE_ENTITY, "invalid_module"),
        "{}",
        r.text()
    );
    // Held for 30 s in a host call (sleep): only the supervisor's hard deadline stops it.
    let started = std::time::Instant::now();
    let r = s.request(http::Method::GET, "/alloc?arg=1&arg=30000", &[("Timeout-Ms", "500")], "".into()).await?;
    let took = started.elapsed();
    assert_eq!((r.status.as_u16(), r.kind().as_str()), (504, "deadline_exceeded"), "{}", r.text());
    assert_eq!(r.json()["worker_killed"], true, "{}", r.text());
    // Timeout 500 ms + the default grace of 1 s, far from the compile allowance.
    assert!(took < Duration::from_secs(10), "killed after {took:?}");
    Ok(())
}

/// `WASMBOX_WORKER_USER` naming root (or group 0) would leave the unprivileged-user layer
/// out without a word: the supervisor refuses to start and says why.
#[tokio::test]
async fn root_as_the_worker_user_is_refused_at_startup() -> anyhow::Result<()> {
    for user in ["0", "root", "nobody:0"] {
        let err = Supervisor::builder().env("WASMBOX_WORKER_USER", user).start().err().expect("started");
        let err = format!("{err:#}");
        assert!(
            err.contains("WASMBOX_WORKER_USER") && err.contains("must not run as root or group 0"),
            "{user}: {err}"
        );
    }
    Ok(())
}

/// Workers are not dumpable, also where they keep the supervisor's uid (an unprivileged
/// supervisor, as in the container image): a process of that uid cannot ptrace them or
/// read their /proc/<pid>/mem and environ, so an escaped guest cannot reach the supervisor
/// through a sibling that way, nor a sibling through it. The kernel shows it: the /proc
/// files of a non-dumpable process belong to root.
#[tokio::test]
async fn workers_are_not_dumpable_even_as_the_supervisors_own_user() -> anyhow::Result<()> {
    if !running_as_root() {
        eprintln!(
            "SKIPPED workers_are_not_dumpable_even_as_the_supervisors_own_user: needs root to start a supervisor as another user"
        );
        return Ok(());
    }
    use std::os::unix::fs::MetadataExt;
    let s = Supervisor::builder().workers(1).run_as(65534, 65534).function("hello").start()?;
    let worker = one_worker(&s).await?;
    assert_eq!(status(worker)["Uid"].split_whitespace().next(), Some("65534"), "the worker keeps the supervisor's uid");
    let supervisor = std::fs::metadata(format!("/proc/{}/environ", s.pid()))?;
    assert_eq!(supervisor.uid(), 65534, "the supervisor itself is an ordinary process of its user");
    for file in ["environ", "mem", "maps"] {
        let meta = std::fs::metadata(format!("/proc/{worker}/{file}"))?;
        assert_eq!(meta.uid(), 0, "/proc/{worker}/{file} belongs to uid {}: the worker is dumpable", meta.uid());
    }
    assert!(s.logs().contains("non_dumpable"), "{}", s.logs());
    Ok(())
}
