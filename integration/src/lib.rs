//! Test harness: builds the real binaries and example functions, starts `wasmbox` on an
//! ephemeral loopback port with its own functions directory, and talks HTTP to it.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

pub mod container;
pub mod load;
pub mod nginx;

/// Root of the repository.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("integration/ has a parent").to_path_buf()
}

/// `target/debug` (or whichever profile built this test).
fn target_profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/all-<hash>
    exe.parent().and_then(Path::parent).expect("test binary lives in target/<profile>/deps").to_path_buf()
}

static BUILT: OnceLock<Result<(PathBuf, PathBuf), String>> = OnceLock::new();

/// Builds (once per test run) the supervisor and worker binaries and the example
/// functions, so `cargo test` alone always tests the current code.
pub fn built() -> (PathBuf, PathBuf) {
    let built = BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let root = repo_root();
        let profile_dir = target_profile_dir();
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let mut build = Command::new(&cargo);
        // The whole workspace, as `make test` builds it, so dependencies are shared with that
        // build (a subset of packages can unify other features and rebuild them); with the
        // fault-injection hooks some tests need (a release build has them only by feature).
        build.current_dir(&root).args([
            "build",
            "--bins",
            "--workspace",
            "--features",
            "wasmbox-supervisor/test-hooks,wasmbox-worker/test-hooks",
        ]);
        if cfg!(feature = "wasmedge-bundled") {
            build.args(["--features", "wasmbox-worker/wasmedge-bundled"]);
        } else if cfg!(feature = "wasmedge") {
            build.args(["--features", "wasmbox-worker/wasmedge"]);
        }
        if release {
            build.arg("--release");
        }
        let status = build.status().map_err(|e| format!("running cargo build: {e}"))?;
        if !status.success() {
            return Err(format!("cargo build of the binaries failed: {status}"));
        }
        let status = Command::new(root.join("scripts/build-functions"))
            .arg(root.join("target/test-functions"))
            .status()
            .map_err(|e| format!("running scripts/build-functions: {e}"))?;
        if !status.success() {
            return Err(format!("scripts/build-functions failed: {status}"));
        }
        Ok((profile_dir.join("wasmbox"), profile_dir.join("wasmbox-worker")))
    });
    match built {
        Ok(paths) => paths.clone(),
        Err(e) => panic!("{e}"),
    }
}

/// Path of a built example function.
pub fn function_wasm(name: &str) -> PathBuf {
    built();
    repo_root().join("target/test-functions").join(format!("{name}.wasm"))
}

/// The engine tests run on unless they choose one: `WASMBOX_TEST_ENGINE` from the test's
/// environment (to run any test against WasmEdge), else Wasmtime.
pub fn test_engine() -> String {
    std::env::var("WASMBOX_TEST_ENGINE").ok().filter(|e| !e.is_empty()).unwrap_or_else(|| "wasmtime".into())
}

/// Whether `engine` stops a command at its deadline itself (the worker serves on), or the
/// supervisor kills the worker then (WasmEdge's plain native code, its default).
pub fn engine_stops_commands(engine: &str) -> bool {
    engine != "wasmedge"
}

/// The module source the first call of a never-compiled module reports on `engine`:
/// WasmEdge interprets it while the trusted compiler builds its artifact; other engines
/// wait for the compile.
pub fn first_call_source(engine: &str) -> &'static str {
    if engine == "wasmedge" { "interpreted" } else { "compiled" }
}

/// The `wasmbox` command with a clean environment: the built worker, the test engine, the
/// shared artifact cache (each can be overridden with `.env`).
pub fn wasmbox_command() -> Command {
    let (wasmbox, worker) = built();
    let mut cmd = Command::new(wasmbox);
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("WASMBOX_WORKER_BIN", worker)
        .env("WASMBOX_ENGINE", test_engine())
        .env("WASMBOX_CACHE_DIR", shared_cache_dir());
    cmd
}

/// Lowercase hex SHA-256 of a file: the name the module cache gives its artifacts.
pub fn sha256_file(path: &Path) -> String {
    use sha2::Digest;
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Artifact cache shared by all tests in a run, so each module compiles once.
fn shared_cache_dir() -> PathBuf {
    repo_root().join("target/test-cache")
}

/// A cgroup parent name no other supervisor of this test run uses.
pub fn unique_cgroup_parent() -> String {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("wasmbox-test-{}-{n}", std::process::id())
}

/// Why cgroup tests cannot run here, if they cannot: they need root and a writable cgroup
/// file system. Where this is `None` the tests run with WASMBOX_CGROUPS=required, so a
/// host that should support them but does not fails loudly instead of skipping.
pub fn cgroup_skip_reason() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not running as root".into());
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let cgroup_mounts: Vec<&str> = mounts
        .lines()
        .filter(|l| l.split(" - ").nth(1).is_some_and(|t| t.starts_with("cgroup ") || t.starts_with("cgroup2 ")))
        .collect();
    if cgroup_mounts.is_empty() {
        return Some("no cgroup file system is mounted".into());
    }
    if cgroup_mounts.iter().all(|l| l.split_whitespace().nth(5).is_some_and(|o| o.split(',').any(|o| o == "ro"))) {
        return Some("cgroup file systems are mounted read-only".into());
    }
    None
}

/// Prints why a cgroup test is skipped and returns true when it must be.
pub fn skip_without_cgroups(test: &str) -> bool {
    match cgroup_skip_reason() {
        Some(reason) => {
            eprintln!("SKIPPED {test}: {reason}");
            true
        }
        None => false,
    }
}

/// Where [`Builder::inherit`] puts its file in the supervisor.
pub const INHERITED_FD: i32 = 9;

/// How to start a supervisor.
pub struct Builder {
    workers: usize,
    env: Vec<(String, String)>,
    functions: Vec<(String, Vec<u8>)>,
    files: Vec<(String, Vec<u8>)>,
    inherited: Option<std::fs::File>,
    cgroup_procs: Vec<PathBuf>,
    run_as: Option<(u32, u32)>,
    tenant: Option<String>,
}

impl Builder {
    /// Starts the supervisor inside the cgroups whose `cgroup.procs` files are given (it
    /// joins them before it runs), as a container runtime would place it.
    pub fn in_cgroups(mut self, procs: Vec<PathBuf>) -> Self {
        self.cgroup_procs = procs;
        self
    }

    /// Starts the supervisor as `uid`:`gid` (the test runs as root), as an unprivileged
    /// container would: its directories (functions, state, a cache of its own) belong to it.
    pub fn run_as(mut self, uid: u32, gid: u32) -> Self {
        self.run_as = Some((uid, gid));
        self
    }

    /// Makes every function installed with [`Builder::function`] or [`Builder::module`]
    /// part of one tenant (`tenant = ...` at the top of its `name.toml`), so they share
    /// workers as one customer's functions do.
    pub fn tenant(mut self, tenant: &str) -> Self {
        self.tenant = Some(tenant.into());
        self
    }

    pub fn workers(mut self, n: usize) -> Self {
        self.workers = n;
        self
    }

    /// Runs the workers on `engine` (WASMBOX_ENGINE).
    pub fn engine(self, engine: &str) -> Self {
        self.default_engine().env("WASMBOX_ENGINE", engine)
    }

    /// Leaves the engine to the supervisor's default (or to the variables the test sets).
    pub fn default_engine(mut self) -> Self {
        self.env.retain(|(k, _)| k != "WASMBOX_ENGINE");
        self
    }

    pub fn env(mut self, key: &str, value: impl ToString) -> Self {
        self.env.push((key.into(), value.to_string()));
        self
    }

    /// Installs an example function under its own name.
    pub fn function(self, name: &str) -> Self {
        let bytes = std::fs::read(function_wasm(name)).expect("built example function");
        self.module(name, bytes)
    }

    /// Installs arbitrary module bytes as `name.wasm`.
    pub fn module(mut self, name: &str, bytes: Vec<u8>) -> Self {
        self.functions.push((name.into(), bytes));
        self
    }

    /// Starts the supervisor with `file` open at descriptor [`INHERITED_FD`] without
    /// close-on-exec, as a careless parent process would leave it.
    pub fn inherit(mut self, file: std::fs::File) -> Self {
        self.inherited = Some(file);
        self
    }

    /// Writes any file (a `name.toml`, preopen contents) relative to the functions dir.
    pub fn file(mut self, path: &str, contents: impl Into<Vec<u8>>) -> Self {
        self.files.push((path.into(), contents.into()));
        self
    }

    /// Starts the supervisor and waits until it listens.
    pub fn start(self) -> Result<Supervisor> {
        self.spawn(true)
    }

    /// Starts the supervisor without waiting for anything: for tests of what happens
    /// while it is still starting. `addr` stays unset.
    pub fn start_unready(self) -> Result<Supervisor> {
        self.spawn(false)
    }

    fn spawn(self, wait_listening: bool) -> Result<Supervisor> {
        let (wasmbox, worker) = built();
        let dir = tempfile::tempdir()?;
        let functions = dir.path().join("functions");
        std::fs::create_dir(&functions)?;
        for (name, bytes) in &self.functions {
            std::fs::write(functions.join(format!("{name}.wasm")), bytes)?;
        }
        for (path, bytes) in &self.files {
            let path = functions.join(path);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(path, bytes)?;
        }
        if let Some(tenant) = &self.tenant {
            for (name, _) in &self.functions {
                let config = functions.join(format!("{name}.toml"));
                let rest = std::fs::read_to_string(&config).unwrap_or_default();
                std::fs::write(&config, format!("tenant = {tenant:?}\n{rest}"))?;
            }
        }
        // Each supervisor gets its own cgroup parent: a shared one would be refused as in use.
        let cgroup_parent = self
            .env
            .iter()
            .rev()
            .find(|(k, _)| k == "WASMBOX_CGROUP_PARENT")
            .map(|(_, v)| v.clone())
            .unwrap_or_else(unique_cgroup_parent);
        let mut cmd = if self.cgroup_procs.is_empty() {
            Command::new(&wasmbox)
        } else {
            // The shell joins the cgroups, then becomes the supervisor (same pid).
            let mut c = Command::new("/bin/sh");
            c.arg("-c").arg("for f in \"$@\"; do echo $$ > \"$f\" || exit 1; done; exec \"$0\"");
            c.arg(&wasmbox).args(&self.cgroup_procs);
            c
        };
        cmd.env_clear()
            .env("WASMBOX_CGROUP_PARENT", &cgroup_parent)
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("WASMBOX_LISTEN", "127.0.0.1:0")
            .env("WASMBOX_FUNCTIONS_DIR", &functions)
            .env("WASMBOX_CACHE_DIR", shared_cache_dir())
            // Each supervisor has a state directory of its own (they are locked while in use).
            .env("WASMBOX_STATE_DIR", dir.path().join("state"))
            .env("WASMBOX_WORKER_BIN", &worker)
            .env("WASMBOX_WORKERS", self.workers.to_string())
            .env("LOG_LEVEL", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        if let Some((uid, gid)) = self.run_as {
            use std::os::unix::process::CommandExt;
            let cache = dir.path().join("cache");
            std::fs::create_dir(&cache)?;
            cmd.env("WASMBOX_CACHE_DIR", &cache);
            for entry in walk(dir.path()) {
                std::os::unix::fs::lchown(&entry, Some(uid), Some(gid))?;
            }
            cmd.uid(uid).gid(gid);
        }
        if let Some(file) = &self.inherited {
            use std::os::fd::AsRawFd;
            use std::os::unix::process::CommandExt;
            let fd = file.as_raw_fd();
            // SAFETY: dup2 is async-signal-safe and only touches descriptors; `fd` stays
            // open in the parent until the spawn returns. dup2 to a new number clears
            // close-on-exec on the copy, which is the point.
            unsafe {
                cmd.pre_exec(move || {
                    if nix::libc::dup2(fd, INHERITED_FD) == -1 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn().with_context(|| format!("starting {}", wasmbox.display()))?;
        let stderr = child.stderr.take().context("stderr pipe")?;
        let logs = Arc::new(Mutex::new(String::new()));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let thread_logs = logs.clone();
        let health_addr = Arc::new(Mutex::new(None));
        let thread_health = health_addr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                // "health endpoints on http://ADDR" comes before "listening on".
                if let Some(addr) = line
                    .split("health endpoints on http://")
                    .nth(1)
                    .and_then(|s| s.split(|c: char| c == '"' || c.is_whitespace()).next())
                {
                    *thread_health.lock().unwrap_or_else(|p| p.into_inner()) = addr.parse::<SocketAddr>().ok();
                }
                // "listening on http://ADDR", in the text and the JSON log formats alike.
                if let Some(addr) = line
                    .split("listening on http://")
                    .nth(1)
                    .and_then(|s| s.split(|c: char| c == '"' || c.is_whitespace()).next())
                {
                    let _ = addr_tx.send(addr.to_string());
                }
                let mut l = thread_logs.lock().unwrap_or_else(|p| p.into_inner());
                l.push_str(&line);
                l.push('\n');
            }
        });
        let mut supervisor =
            Supervisor { child, addr: "127.0.0.1:0".parse()?, health_addr, logs, dir, exited: None, cgroup_parent };
        if !wait_listening {
            return Ok(supervisor);
        }
        match addr_rx.recv_timeout(Duration::from_secs(60)) {
            Ok(addr) => supervisor.addr = addr.parse().context("listen address in log")?,
            Err(_) => bail!("supervisor did not start listening; logs:\n{}", supervisor.logs()),
        }
        Ok(supervisor)
    }
}

/// A running `wasmbox` process, killed when dropped.
pub struct Supervisor {
    child: Child,
    pub addr: SocketAddr,
    health_addr: Arc<Mutex<Option<SocketAddr>>>,
    logs: Arc<Mutex<String>>,
    dir: tempfile::TempDir,
    exited: Option<ExitStatus>,
    /// WASMBOX_CGROUP_PARENT it was started with.
    pub cgroup_parent: String,
}

/// A response, fully read.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.text()))
    }

    /// The `error` kind of a JSON error body.
    pub fn kind(&self) -> String {
        self.json()["error"].as_str().unwrap_or_default().to_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// An HTTP client for one supervisor; cheap to clone into tasks.
#[derive(Debug, Clone)]
pub struct Client {
    pub addr: SocketAddr,
}

impl Client {
    /// Sends one request on a fresh connection and reads the whole response.
    pub async fn request(&self, method: Method, path: &str, headers: &[(&str, &str)], body: Bytes) -> Result<Reply> {
        let stream = tokio::net::TcpStream::connect(self.addr).await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let mut req = Request::builder().method(method).uri(path).header("host", self.addr.to_string());
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let response = sender.send_request(req.body(Full::new(body))?).await?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(Reply { status: parts.status, headers: parts.headers, body })
    }

    pub async fn get(&self, path: &str) -> Result<Reply> {
        self.request(Method::GET, path, &[], Bytes::new()).await
    }

    /// Calls `path` until it runs native code, not the interpreter (a module whose first
    /// calls WasmEdge interprets while its artifact compiles), within 60 s; the reply that did.
    pub async fn until_native(&self, path: &str) -> Result<Reply> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let r = self.get(path).await?;
            if r.header("x-wasmbox-module-source") != Some("interpreted") {
                return Ok(r);
            }
            anyhow::ensure!(std::time::Instant::now() < deadline, "{path} still interpreted after 60 s");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    pub async fn post(&self, path: &str, body: impl Into<Bytes>) -> Result<Reply> {
        self.request(Method::POST, path, &[], body.into()).await
    }
}

impl Supervisor {
    pub fn client(&self) -> Client {
        Client { addr: self.addr }
    }

    /// [`Client::until_native`] on this supervisor.
    pub async fn until_native(&self, path: &str) -> Result<Reply> {
        self.client().until_native(path).await
    }

    /// A supervisor with two workers, on the engine `WASMBOX_TEST_ENGINE` names if the
    /// test's environment has it (to run any test against WasmEdge), else the default.
    pub fn builder() -> Builder {
        let builder = Builder {
            workers: 2,
            env: Vec::new(),
            functions: Vec::new(),
            files: Vec::new(),
            inherited: None,
            cgroup_procs: Vec::new(),
            run_as: None,
            tenant: None,
        };
        match std::env::var("WASMBOX_TEST_ENGINE") {
            Ok(engine) if !engine.is_empty() => builder.engine(&engine),
            _ => builder,
        }
    }

    /// The WASMBOX_HEALTH_LISTEN address, when it was set.
    pub fn health_addr(&self) -> Option<SocketAddr> {
        *self.health_addr.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn functions_dir(&self) -> PathBuf {
        self.dir.path().join("functions")
    }

    /// WASMBOX_STATE_DIR unless the test set its own.
    pub fn default_state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The logs once every one of `needles` is in them: a line the supervisor wrote before
    /// answering reaches the test through a pipe a thread reads, a moment later.
    pub async fn logs_with(&self, needles: &[&str], within: Duration) -> Result<String> {
        let deadline = Instant::now() + within;
        loop {
            let logs = self.logs();
            if needles.iter().all(|n| logs.contains(n)) {
                return Ok(logs);
            }
            ensure!(Instant::now() < deadline, "the log never had all of {needles:?}:\n{logs}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub async fn request(&self, method: Method, path: &str, headers: &[(&str, &str)], body: Bytes) -> Result<Reply> {
        self.client().request(method, path, headers, body).await
    }

    pub async fn get(&self, path: &str) -> Result<Reply> {
        self.client().get(path).await
    }

    pub async fn post(&self, path: &str, body: impl Into<Bytes>) -> Result<Reply> {
        self.client().post(path, body).await
    }

    /// PIDs of this supervisor's worker processes (its live children but compile
    /// processes and the zygote).
    pub fn worker_pids(&self) -> Vec<i32> {
        children_of(self.pid()).into_iter().filter(|&pid| !is_compile_process(pid) && !is_zygote(pid)).collect()
    }

    /// PID of this supervisor's zygote, if one runs.
    pub fn zygote_pid(&self) -> Option<i32> {
        children_of(self.pid()).into_iter().find(|&pid| is_zygote(pid))
    }

    /// PIDs of this supervisor's compile processes (`wasmbox-worker --compile-artifact`).
    pub fn compile_pids(&self) -> Vec<i32> {
        children_of(self.pid()).into_iter().filter(|&pid| is_compile_process(pid)).collect()
    }

    /// Waits until /ready reports every slot live and `n` worker processes exist.
    pub async fn wait_pool_full(&self, n: usize, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let ready = self.get("/ready").await?;
            let live = ready.json()["pool"]["live"].as_u64().unwrap_or(0) as usize;
            if live == n && self.worker_pids().len() == n {
                return Ok(());
            }
            ensure!(Instant::now() < deadline, "pool not back to {n} workers within {within:?}: {}", ready.text());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) -> Result<()> {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), signal)?;
        Ok(())
    }

    /// Waits for the supervisor to exit.
    pub async fn wait_exit(&mut self, within: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait()? {
                self.exited = Some(status);
                return Ok(status);
            }
            ensure!(Instant::now() < deadline, "supervisor still running after {within:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Supervisor {
    /// Stops the supervisor the way an operator would (SIGTERM, so it removes its cgroups),
    /// SIGKILL after 5 s; then removes any cgroup it could not, as its next start would.
    fn drop(&mut self) {
        if self.exited.is_none() {
            let _ = self.signal(nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        remove_cgroups_named(&self.cgroup_parent);
    }
}

/// `root` and everything under it, not following links.
fn walk(root: &Path) -> Vec<PathBuf> {
    let mut out = vec![root.to_path_buf()];
    let mut i = 0;
    while i < out.len() {
        let dir = out[i].clone();
        i += 1;
        if std::fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir()) {
            out.extend(std::fs::read_dir(&dir).into_iter().flatten().flatten().map(|e| e.path()));
        }
    }
    out
}

/// Removes every cgroup directory named `name` (and the `worker-<n>`/`supervisor` cgroups
/// in it) in the mounted hierarchies, waiting briefly for their processes to go.
pub fn remove_cgroups_named(name: &str) {
    fn find(dir: &Path, name: &str, depth: usize, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() && !path.is_symlink() {
                if entry.file_name() == name {
                    out.push(path.clone());
                } else if depth > 0 {
                    find(&path, name, depth - 1, out);
                }
            }
        }
    }
    let mut found = Vec::new();
    find(Path::new("/sys/fs/cgroup"), name, 4, &mut found);
    for parent in found {
        let children: Vec<PathBuf> = std::fs::read_dir(&parent)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_dir())
            .collect();
        for dir in children.iter().chain(std::iter::once(&parent)) {
            let deadline = Instant::now() + Duration::from_secs(5);
            while std::fs::remove_dir(dir).is_err() && dir.exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// `/proc/<pid>/status` as field name to value (empty once the process is gone).
pub fn proc_status(pid: i32) -> std::collections::HashMap<String, String> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once(':').map(|(k, v)| (k.to_string(), v.trim().to_string())))
        .collect()
}

/// Whether `pid` runs `wasmbox-worker --compile-artifact`.
pub fn is_compile_process(pid: i32) -> bool {
    has_arg(pid, "--compile-artifact")
}

/// Whether `pid` is a zygote (its workers, forked from it, rename themselves).
pub fn is_zygote(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "wasmbox-zygote")
}

/// Whether `pid`'s command line has `arg`.
fn has_arg(pid: i32, arg: &str) -> bool {
    procfs::process::Process::new(pid).and_then(|p| p.cmdline()).is_ok_and(|args| args.iter().any(|a| a == arg))
}

/// Live (non-zombie) children of `pid`.
pub fn children_of(pid: i32) -> Vec<i32> {
    let Ok(all) = procfs::process::all_processes() else { return Vec::new() };
    all.filter_map(Result::ok)
        .filter_map(|p| p.stat().ok())
        .filter(|s| s.ppid == pid && s.state != 'Z' && s.state != 'X')
        .map(|s| s.pid)
        .collect()
}

/// Whether `pid` is still a running (non-zombie) process started at `start_time`.
pub fn is_running(pid: i32, start_time: u64) -> bool {
    procfs::process::Process::new(pid)
        .and_then(|p| p.stat())
        .map(|s| s.starttime == start_time && s.state != 'Z' && s.state != 'X')
        .unwrap_or(false)
}

/// Kernel start time of a process, to tell it apart from a later process with its PID.
pub fn start_time(pid: i32) -> Option<u64> {
    procfs::process::Process::new(pid).and_then(|p| p.stat()).map(|s| s.starttime).ok()
}

/// CPU time (user + system, in clock ticks) a process has used.
pub fn cpu_ticks(pid: i32) -> u64 {
    procfs::process::Process::new(pid).and_then(|p| p.stat()).map(|s| s.utime + s.stime).unwrap_or(0)
}

/// Waits until `count` of `pids` have each used at least 5 clock ticks (50 ms) of CPU since
/// this call: proof that they are executing a guest, not just momentarily runnable.
/// Returns the busy ones.
pub async fn wait_busy(pids: &[i32], count: usize, within: Duration) -> Result<Vec<i32>> {
    let baseline: Vec<(i32, u64)> = pids.iter().map(|&p| (p, cpu_ticks(p))).collect();
    let deadline = Instant::now() + within;
    loop {
        let busy: Vec<i32> = baseline.iter().filter(|(p, t)| cpu_ticks(*p) >= t + 5).map(|(p, _)| *p).collect();
        if busy.len() >= count {
            return Ok(busy);
        }
        ensure!(Instant::now() < deadline, "{count} of {pids:?} never got busy");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits for all `procs` (pid, start time) to be gone.
pub async fn wait_gone(procs: &[(i32, u64)], within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let left: Vec<i32> = procs.iter().filter(|(p, t)| is_running(*p, *t)).map(|(p, _)| *p).collect();
        if left.is_empty() {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "processes still running after {within:?}: {left:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A module whose host-side memory (16 tables of 2^20 function references, 8 bytes each:
/// 128 MiB outside linear memory) passes any small Memory-Request's engine limit: only the
/// kernel's memory limit (the worker's cgroup) stops it.
pub fn table_hog() -> Vec<u8> {
    let tables: String = (0..16).map(|i| format!("(table $t{i} 0 funcref)\n")).collect();
    let grows: String =
        (0..16).map(|i| format!("(drop (table.grow $t{i} (ref.null func) (i32.const 1048576)))\n")).collect();
    wat::parse_str(format!("(module {tables} (func (export \"_start\") {grows}))")).expect("valid wat")
}
