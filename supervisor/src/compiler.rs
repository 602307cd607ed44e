//! The trusted compiler: native code a worker loads is never written by a process that
//! ran tenant code.
//!
//! A module is compiled in a fresh compile process (`wasmbox-worker --compile-artifact`),
//! one per module, in a `compiler-<n>` cgroup of its own with the compile memory
//! allowance, under the worker's hardening, as the compiler slot's own uid, into a private
//! staging directory. The supervisor then copies the artifact into the store, a directory
//! only it can read or write, keyed by engine version, tenant and module, records its
//! SHA-256 beside it, and passes it to workers as a descriptor: workers have no path to the
//! store at all. An artifact is loaded only when the supervisor's record says it is that
//! tenant's compile of that module and its bytes still have the recorded digest, so a
//! corrupt file, or one copied from another tenant's directory, is never run.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::fcntl::OFlag;
use nix::sys::signal::Signal;
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use wasmbox_protocol::{CompileReport, ModuleRef};

use crate::cgroup::{SlotCgroup, SlotRequest};
use crate::pool::describe_exit;
use crate::pool::spawn::Spawner;

/// The form of a module an artifact holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Command,
    /// The rewritten module sessions run.
    Session,
}

impl Kind {
    fn arg(self) -> &'static str {
        match self {
            Kind::Command => "command",
            Kind::Session => "session",
        }
    }

    /// The module's key in the worker's cache and in the store.
    fn key(self, sha256: &str) -> String {
        wasmbox_protocol::module_key(sha256, self == Kind::Session)
    }
}

/// How compile processes are started.
#[derive(Debug, Clone)]
pub struct CompilerConfig {
    pub binary: PathBuf,
    pub engine: String,
    pub max_module_bytes: u64,
    /// Largest artifact the supervisor copies into the store.
    pub max_artifact_bytes: u64,
    pub log_filter: String,
    pub log_json: bool,
    /// Hardening flags (as for workers) without the user.
    pub hardening_args: Vec<String>,
    /// Engine flags (`Config::engine_args`).
    pub engine_args: Vec<String>,
    /// The uid and gid of each compiler slot (`None`: the supervisor's own).
    pub users: Vec<Option<(u32, u32)>>,
    /// The cgroup of each compiler slot (empty without cgroups).
    pub cgroups: Vec<Arc<SlotCgroup>>,
    pub timeout: Duration,
    /// Memory a compile may use (the cgroup limit beyond its headroom).
    pub memory_bytes: u64,
    /// CPU a compile may use, in millicores.
    pub cpu_quota_millis: u64,
    /// `<cache>/artifacts`: the store (supervisor only).
    pub store: PathBuf,
    /// `<cache>/staging`: compile processes' private output directories.
    pub staging: PathBuf,
}

impl CompilerConfig {
    /// Compile processes as `config` and `hardening` have them (the same hardening as
    /// workers, a uid per compiler slot), in `cgroups` (one per slot, or none).
    pub fn new(
        config: &crate::config::Config,
        hardening: &crate::hardening::WorkerHardening,
        binary: PathBuf,
        cgroups: Vec<Arc<SlotCgroup>>,
    ) -> Result<Self, crate::config::ConfigError> {
        let cache = config.resolved_cache_dir();
        let slots = config.compiler_count();
        // Native code is a few times the size of its module; a generous bound still keeps
        // a hostile compile from filling the store, and (as its RLIMIT_FSIZE) the disk.
        let max_artifact_bytes = config.max_module_bytes.saturating_mul(32).clamp(64 << 20, 2 << 30);
        let hardening_args = hardening
            .worker_args()
            .into_iter()
            .map(|arg| match arg.strip_prefix("--fsize=").and_then(|n| n.parse::<u64>().ok()) {
                Some(fsize) => format!("--fsize={}", fsize.min(max_artifact_bytes)),
                None => arg,
            })
            .collect();
        Ok(CompilerConfig {
            binary,
            engine: config.engine()?.name().into(),
            max_module_bytes: config.max_module_bytes,
            max_artifact_bytes,
            log_filter: crate::worker_log_filter(),
            log_json: config.log_format == crate::config::LogFormat::Json,
            hardening_args,
            engine_args: config.engine_args(),
            users: (0..slots).map(|i| hardening.user.as_ref().map(|u| u.compiler(i))).collect(),
            cgroups,
            timeout: Duration::from_millis(config.compile_timeout_ms),
            memory_bytes: config.cgroup_compile_memory_mb.saturating_mul(1 << 20),
            cpu_quota_millis: crate::config::Config::cpus().saturating_mul(1000),
            store: cache.join("artifacts"),
            staging: cache.join("staging"),
        })
    }
}

/// Why a module has no artifact.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    #[error("{0}")]
    Invalid(String),
    #[error("the module file changed since it was hashed")]
    Changed,
    #[error("compiling took longer than {timeout_ms} ms")]
    Timeout { timeout_ms: u64 },
    /// The compile process ended without a report (killed, crashed).
    #[error("the compile process {0}")]
    Died(String),
    /// The supervisor's side failed (files, spawning).
    #[error("{0}")]
    Internal(String),
}

/// A verified artifact: where it is and what it was when its bytes were checked. It is
/// opened only when a worker needs it, so the supervisor holds no descriptor per module.
#[derive(Debug)]
pub struct Artifact {
    path: PathBuf,
    stamp: Stamp,
    /// Set when the file no longer matched what was verified: the next lookup checks the
    /// store again.
    spoiled: AtomicBool,
}

/// What identifies a file's content without reading it: a write changes its size or its
/// ctime (which no caller can set).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    ctime: (i64, i64),
    mtime: (i64, i64),
}

impl Stamp {
    fn of(meta: &std::fs::Metadata) -> Stamp {
        Stamp {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            ctime: (meta.ctime(), meta.ctime_nsec()),
            mtime: (meta.mtime(), meta.mtime_nsec()),
        }
    }
}

impl Artifact {
    /// A descriptor for a worker, if the file still is what was verified (the same inode,
    /// size and change time); otherwise the artifact is marked spoiled and `None` (the
    /// worker compiles in memory this once, and the next lookup checks the store again).
    pub fn for_worker(&self) -> Option<OwnedFd> {
        let opened = open_private(&self.path);
        match opened {
            Ok(file) if file.metadata().is_ok_and(|m| Stamp::of(&m) == self.stamp) => Some(OwnedFd::from(file)),
            _ => {
                tracing::warn!(path = %self.path.display(), "an artifact in the store changed after it was verified; not passed to workers");
                self.spoiled.store(true, Ordering::Relaxed);
                None
            }
        }
    }
}

/// The record beside each artifact in the store.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Record {
    tenant: String,
    module_sha256: String,
    kind: String,
    engine: String,
    version: String,
    artifact_sha256: String,
    size: u64,
}

impl Record {
    /// What an artifact of `tenant`'s `module` in form `kind` for this engine version must
    /// be recorded as; the digest and size are the artifact's own.
    fn of(tenant: &str, module: &ModuleRef, kind: Kind, engine: String, version: String) -> Record {
        Record {
            tenant: tenant.to_owned(),
            module_sha256: module.sha256.clone(),
            kind: kind.arg().to_owned(),
            engine,
            version,
            artifact_sha256: String::new(),
            size: 0,
        }
    }
}

/// Compiles counted for operators.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct CompilerStats {
    pub compiles: u64,
    pub failures: u64,
    pub refused_artifacts: u64,
    /// Compiles started in the background (their modules interpreted meanwhile) and not
    /// finished yet.
    pub compiling_in_background: u64,
}

type Tenants = HashMap<String, HashMap<String, Arc<Artifact>>>;
/// One gate per (tenant, module key) being compiled.
type Gates = HashMap<(String, String), Arc<tokio::sync::Mutex<()>>>;

pub struct Compiler {
    config: CompilerConfig,
    spawner: Spawner,
    slots: tokio::sync::Semaphore,
    free: Mutex<Vec<usize>>,
    /// By tenant, then module key: looked up with borrowed strings on every invocation.
    records: Mutex<Tenants>,
    /// One compile per (tenant, module key) at a time; later callers wait for it.
    inflight: Mutex<Gates>,
    /// Module keys that failed to compile as invalid: the same bytes fail the same way.
    invalid: Mutex<HashMap<String, String>>,
    /// (engine, version) of the artifacts, from the first worker or compile.
    version: Mutex<Option<(String, String)>>,
    /// The engine keeps no artifacts: workers compile in memory.
    unsupported: AtomicBool,
    compiles: AtomicU64,
    failures: AtomicU64,
    refused: AtomicU64,
    background: Arc<AtomicU64>,
}

/// Counts a background compile until it ends, however it ends.
struct Running(Arc<AtomicU64>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Verified artifacts remembered.
const MAX_RECORDS: usize = 16 << 10;
/// Invalid modules remembered.
const MAX_INVALID: usize = 1024;
/// Largest report a compile process may print.
const MAX_REPORT_BYTES: u64 = 64 << 10;

impl Compiler {
    /// Prepares the store and staging directories (owner-only, removing staging leftovers).
    pub fn new(config: CompilerConfig, spawner: Spawner) -> io::Result<Compiler> {
        // Supervisors may share a cache directory: each stages under its own pid, and
        // removes only what supervisors that are gone left behind.
        let own = config.staging.join(std::process::id().to_string());
        for dir in [&config.store, &config.staging] {
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
            let meta = std::fs::symlink_metadata(dir)?;
            if !meta.is_dir() || meta.uid() != nix::unistd::geteuid().as_raw() || meta.mode() & 0o077 != 0 {
                return Err(io::Error::other(format!(
                    "{} must be a directory of the supervisor's own user, closed to others",
                    dir.display()
                )));
            }
        }
        if let Ok(entries) = std::fs::read_dir(&config.staging) {
            for entry in entries.flatten() {
                let pid = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok());
                let gone = pid.is_none_or(|pid| {
                    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) == Err(nix::errno::Errno::ESRCH)
                });
                if gone || pid == Some(std::process::id() as i32) {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        std::fs::DirBuilder::new().mode(0o700).create(&own)?;
        let config = CompilerConfig { staging: own, ..config };
        let n = config.users.len().max(1);
        Ok(Compiler {
            slots: tokio::sync::Semaphore::new(n),
            free: Mutex::new((0..n).rev().collect()),
            records: Mutex::new(HashMap::new()),
            inflight: Mutex::new(HashMap::new()),
            invalid: Mutex::new(HashMap::new()),
            version: Mutex::new(None),
            unsupported: AtomicBool::new(false),
            compiles: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            background: Arc::new(AtomicU64::new(0)),
            config,
            spawner,
        })
    }

    /// The engine and version workers run (from their hello): artifacts of other versions
    /// are in other directories and never looked at.
    pub fn set_engine(&self, engine: &str, version: &str) {
        *lock(&self.version) = Some((engine.to_owned(), version.to_owned()));
    }

    pub fn stats(&self) -> CompilerStats {
        CompilerStats {
            compiles: self.compiles.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            refused_artifacts: self.refused.load(Ordering::Relaxed),
            compiling_in_background: self.background.load(Ordering::Relaxed),
        }
    }

    /// The artifact of `tenant`'s `module` in form `kind`: recorded, found in the store and
    /// verified, or compiled now (the flag). `None` when the engine keeps no artifacts.
    pub async fn artifact(
        &self,
        tenant: &str,
        module: &ModuleRef,
        kind: Kind,
    ) -> Result<(Option<Arc<Artifact>>, bool), CompileError> {
        match self.known(tenant, module, kind) {
            Some(known) => Ok((known, false)),
            None => self.prepare(tenant, module, kind).await,
        }
    }

    /// What is known without looking at the store: `Some(None)` when the engine keeps no
    /// artifacts, `Some(artifact)` when one is recorded.
    fn known(&self, tenant: &str, module: &ModuleRef, kind: Kind) -> Option<Option<Arc<Artifact>>> {
        if self.unsupported.load(Ordering::Relaxed) {
            return Some(None);
        }
        self.recorded(tenant, &kind.key(&module.sha256)).map(Some)
    }

    /// Whether invocations run a module's first calls in the engine's interpreter rather
    /// than wait for its native code (WasmEdge, whose LLVM compile takes about a second).
    pub fn interprets_first(&self) -> bool {
        self.config.engine == "wasmedge"
    }

    /// Like [`Compiler::artifact`], but a module that has no artifact yet is compiled in
    /// the background (once) and `None` returned at once: the worker interprets it
    /// meanwhile, and invocations after the compile get the artifact.
    pub async fn artifact_or_later(
        self: &Arc<Self>,
        tenant: &str,
        module: &ModuleRef,
        kind: Kind,
    ) -> Result<(Option<Arc<Artifact>>, bool), CompileError> {
        if let Some(known) = self.known(tenant, module, kind) {
            return Ok((known, false));
        }
        let key = kind.key(&module.sha256);
        if let Some(message) = lock(&self.invalid).get(&key) {
            return Err(CompileError::Invalid(message.clone()));
        }
        let compiling = lock(&self.inflight).contains_key(&(tenant.to_owned(), key.clone()));
        if !compiling {
            if let Some(found) = self.stored(tenant, module, kind).await {
                return Ok((Some(found), false));
            }
            let (this, tenant, module) = (self.clone(), tenant.to_owned(), module.clone());
            self.background.fetch_add(1, Ordering::Relaxed);
            let running = Running(self.background.clone());
            tokio::spawn(async move {
                let _running = running;
                // The store was just looked in. Failures are counted and logged by the
                // compile; an invalid module is remembered and refused from then on.
                let _ = this.prepare_from(&tenant, &module, kind, false).await;
            });
        }
        Ok((None, false))
    }

    /// Like [`Compiler::artifact`] but always checks the module (an engine without
    /// artifacts still validates it); the flag says whether it was compiled now.
    pub async fn prepare(
        &self,
        tenant: &str,
        module: &ModuleRef,
        kind: Kind,
    ) -> Result<(Option<Arc<Artifact>>, bool), CompileError> {
        self.prepare_from(tenant, module, kind, true).await
    }

    /// [`Compiler::prepare`], looking in the store first or not (a caller that just did).
    async fn prepare_from(
        &self,
        tenant: &str,
        module: &ModuleRef,
        kind: Kind,
        look_in_store: bool,
    ) -> Result<(Option<Arc<Artifact>>, bool), CompileError> {
        let key = kind.key(&module.sha256);
        if let Some(message) = lock(&self.invalid).get(&key) {
            return Err(CompileError::Invalid(message.clone()));
        }
        let gate = Gate::enter(self, tenant, &key);
        let result = {
            let _one = gate.gate.lock().await;
            match self.recorded(tenant, &key) {
                Some(found) => Ok((Some(found), false)),
                None => match if look_in_store { self.stored(tenant, module, kind).await } else { None } {
                    Some(found) => Ok((Some(found), false)),
                    None => self.compile(tenant, module, kind).await,
                },
            }
        };
        drop(gate);
        result
    }

    fn recorded(&self, tenant: &str, key: &str) -> Option<Arc<Artifact>> {
        let mut records = lock(&self.records);
        let per_tenant = records.get_mut(tenant)?;
        match per_tenant.get(key) {
            Some(a) if !a.spoiled.load(Ordering::Relaxed) => Some(a.clone()),
            Some(_) => {
                per_tenant.remove(key);
                None
            }
            None => None,
        }
    }

    fn record(&self, tenant: &str, key: String, artifact: Arc<Artifact>) {
        let mut records = lock(&self.records);
        // Bounded: past it the records start over (the store verifies them again).
        if records.values().map(HashMap::len).sum::<usize>() >= MAX_RECORDS {
            records.clear();
        }
        records.entry(tenant.to_owned()).or_default().insert(key, artifact);
    }

    /// `<store>/<engine>-<version>/<tenant>/<key>.<ext>`, and its record beside it.
    fn paths(&self, engine: &str, version: &str, tenant: &str, key: &str, ext: &str) -> (PathBuf, PathBuf) {
        let dir = self.config.store.join(format!("{engine}-{version}")).join(tenant);
        let stem = key.replace('+', ".");
        (dir.join(format!("{stem}.{ext}")), dir.join(format!("{stem}.{ext}.json")))
    }

    fn extension(&self) -> &'static str {
        if self.config.engine == "wasmedge" { "so" } else { "cwasm" }
    }

    /// An artifact a previous run stored, if its record names this tenant, module, kind
    /// and engine version and its bytes have the recorded digest.
    async fn stored(&self, tenant: &str, module: &ModuleRef, kind: Kind) -> Option<Arc<Artifact>> {
        let (engine, version) = lock(&self.version).clone()?;
        let key = kind.key(&module.sha256);
        let (path, record_path) = self.paths(&engine, &version, tenant, &key, self.extension());
        let expected = Record::of(tenant, module, kind, engine, version);
        let max = self.config.max_artifact_bytes;
        let found =
            tokio::task::spawn_blocking(move || verify_stored(&path, &record_path, &expected, max)).await.ok()?;
        match found {
            Ok(Some(artifact)) => {
                let artifact = Arc::new(artifact);
                self.record(tenant, key, artifact.clone());
                Some(artifact)
            }
            Ok(None) => None,
            Err(reason) => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(tenant, module = %module.sha256, %reason, "refusing a stored artifact; compiling again");
                None
            }
        }
    }

    /// Compiles in a compile process; the flag is false when the store already held the
    /// very same artifact (a caller that could not look first, not knowing the version).
    async fn compile(
        &self,
        tenant: &str,
        module: &ModuleRef,
        kind: Kind,
    ) -> Result<(Option<Arc<Artifact>>, bool), CompileError> {
        let _permit = self.slots.acquire().await.map_err(|_| CompileError::Internal("compiler closed".into()))?;
        let Some(slot) = lock(&self.free).pop().map(|slot| Slot { compiler: self, slot }) else {
            return Err(CompileError::Internal("no free compiler slot".into()));
        };
        let started = std::time::Instant::now();
        let result = self.compile_in(slot.slot, tenant, module, kind).await;
        drop(slot);
        self.compiles.fetch_add(1, Ordering::Relaxed);
        match &result {
            Ok(_) => tracing::info!(
                tenant,
                module = %module.sha256,
                kind = kind.arg(),
                ms = started.elapsed().as_millis() as u64,
                "module compiled"
            ),
            Err(CompileError::Invalid(_)) => {}
            Err(e) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(tenant, module = %module.sha256, error = %e, "compiling a module failed");
            }
        }
        result
    }

    async fn compile_in(
        &self,
        slot: usize,
        tenant: &str,
        module: &ModuleRef,
        kind: Kind,
    ) -> Result<(Option<Arc<Artifact>>, bool), CompileError> {
        let internal = |what: &str| {
            let what = what.to_owned();
            move |e: io::Error| CompileError::Internal(format!("{what}: {e}"))
        };
        let staging = self.config.staging.join(uuid::Uuid::new_v4().simple().to_string());
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&staging)
            .map_err(internal("cannot create a staging directory"))?;
        let cleanup = Cleanup(staging.clone());
        let user = self.config.users.get(slot).copied().flatten();
        if let Some((uid, gid)) = user {
            std::os::unix::fs::lchown(&staging, Some(uid), Some(gid)).map_err(internal("cannot hand over staging"))?;
        }
        let flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let dir: OwnedFd = nix::fcntl::open(&staging, flags, nix::sys::stat::Mode::empty())
            .map_err(|e| CompileError::Internal(format!("cannot open staging: {e}")))?;
        let input = crate::registry::files::open_regular(&module.path).map_err(|_| CompileError::Changed)?;
        let cgroup = self.config.cgroups.get(slot).cloned();
        if let Some(cg) = &cgroup {
            let request = SlotRequest {
                cpu_quota_millis: self.config.cpu_quota_millis,
                memory_request_bytes: 0,
                io_bytes: self.config.max_module_bytes,
            };
            cg.prepare(&request, self.config.memory_bytes).map_err(|e| CompileError::Internal(e.to_string()))?;
        }
        let placement = cgroup.as_ref().map(|cg| cg.placement_fds()).unwrap_or_default();
        let launch = Launch { config: self.config.clone(), sha256: module.sha256.clone(), kind, user, placement };
        let dir_fd = dir.as_raw_fd();
        let mut child = self
            .spawner
            .run(move || launch.spawn(input, dir_fd))
            .await
            .map_err(|e| CompileError::Internal(format!("cannot start the compile process: {e}")))?;
        let mut stdout = child.stdout.take().ok_or_else(|| CompileError::Internal("no stdout".into()))?;
        let mut report = Vec::new();
        let waited = tokio::time::timeout(self.config.timeout, async {
            let read = (&mut stdout).take(MAX_REPORT_BYTES).read_to_end(&mut report).await;
            let status = child.wait().await;
            (read, status)
        })
        .await;
        // Whatever the process left behind in its cgroup goes with it.
        if let Some(cg) = &cgroup {
            let _ = cg.kill_all();
        }
        let status = match waited {
            Ok((_, Ok(status))) => status,
            Ok((_, Err(e))) => return Err(CompileError::Internal(format!("waiting for the compile process: {e}"))),
            Err(_) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                return Err(CompileError::Timeout { timeout_ms: self.config.timeout.as_millis() as u64 });
            }
        };
        let report: Option<CompileReport> =
            report.split(|b| *b == b'\n').next().and_then(|line| serde_json::from_slice(line).ok());
        let report = match report {
            Some(r) if status.success() => r,
            _ if std::os::unix::process::ExitStatusExt::signal(&status) == Some(Signal::SIGSYS as i32) => {
                return Err(CompileError::Died("was killed by its seccomp filter (SIGSYS)".into()));
            }
            _ => return Err(CompileError::Died(describe_exit(status))),
        };
        let (engine, version, file) = match report {
            CompileReport::Compiled { engine, version, file } => (engine, version, file),
            CompileReport::Invalid { message } => {
                let mut invalid = lock(&self.invalid);
                if invalid.len() >= MAX_INVALID {
                    invalid.clear();
                }
                invalid.insert(kind.key(&module.sha256), message.clone());
                return Err(CompileError::Invalid(message));
            }
            CompileReport::Changed => return Err(CompileError::Changed),
            CompileReport::Failed { message } => return Err(CompileError::Died(format!("failed: {message}"))),
            CompileReport::Unsupported { .. } => {
                self.unsupported.store(true, Ordering::Relaxed);
                return Ok((None, true));
            }
        };
        if engine != self.config.engine || file != format!("artifact.{}", self.extension()) {
            return Err(CompileError::Died(format!("reported an unexpected artifact ({engine}, {file:?})")));
        }
        {
            let mut known = lock(&self.version);
            match known.as_ref() {
                Some((e, v)) if *e != engine || *v != version => {
                    return Err(CompileError::Died(format!(
                        "compiled for {engine} {version}, but the workers run {e} {v}"
                    )));
                }
                Some(_) => {}
                None => *known = Some((engine.clone(), version.clone())),
            }
        }
        let key = kind.key(&module.sha256);
        let (path, record_path) = self.paths(&engine, &version, tenant, &key, self.extension());
        let record = Record::of(tenant, module, kind, engine, version);
        let max = self.config.max_artifact_bytes;
        let installed = tokio::task::spawn_blocking(move || install(dir, &file, max, &path, &record_path, record))
            .await
            .map_err(|e| CompileError::Internal(format!("install task: {e}")))?
            .map_err(|e| CompileError::Internal(format!("cannot install the artifact: {e}")))?;
        drop(cleanup);
        let (installed, fresh) = installed;
        let installed = Arc::new(installed);
        self.record(tenant, key, installed.clone());
        Ok((Some(installed), fresh))
    }
}

/// A compiler slot in use; given back when dropped, also when the request that waited for
/// the compile went away (its future dropped) halfway.
struct Slot<'a> {
    compiler: &'a Compiler,
    slot: usize,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        lock(&self.compiler.free).push(self.slot);
    }
}

/// This caller's hold on the gate of one (tenant, module key); the last one out removes it
/// from the map, also when its request went away halfway.
struct Gate<'a> {
    compiler: &'a Compiler,
    key: (String, String),
    gate: Arc<tokio::sync::Mutex<()>>,
}

impl<'a> Gate<'a> {
    fn enter(compiler: &'a Compiler, tenant: &str, key: &str) -> Self {
        let key = (tenant.to_owned(), key.to_owned());
        let gate = lock(&compiler.inflight).entry(key.clone()).or_default().clone();
        Gate { compiler, key, gate }
    }
}

impl Drop for Gate<'_> {
    fn drop(&mut self) {
        let mut inflight = lock(&self.compiler.inflight);
        // This one and the map's: nobody else waits.
        if Arc::strong_count(&self.gate) == 2 {
            inflight.remove(&self.key);
        }
    }
}

/// Removes a staging directory when dropped.
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What the spawner thread needs to start one compile process.
struct Launch {
    config: CompilerConfig,
    sha256: String,
    kind: Kind,
    user: Option<(u32, u32)>,
    placement: Vec<RawFd>,
}

impl Launch {
    fn spawn(self, input: File, dir_fd: RawFd) -> io::Result<tokio::process::Child> {
        use crate::pool::spawn::WORKER_SOCKET_FD;
        let supervisor_pid = nix::unistd::getpid();
        let mut cmd = tokio::process::Command::new(&self.config.binary);
        cmd.arg("--compile-artifact")
            .arg(&self.sha256)
            .arg("--compile-kind")
            .arg(self.kind.arg())
            .arg("--socket-fd")
            .arg(WORKER_SOCKET_FD.to_string())
            .arg("--engine")
            .arg(&self.config.engine)
            .arg("--max-module-bytes")
            .arg(self.config.max_module_bytes.to_string())
            .arg("--log")
            .arg(&self.config.log_filter);
        if self.config.log_json {
            cmd.arg("--log-json");
        }
        cmd.args(&self.config.engine_args).args(&self.config.hardening_args);
        if let Some((uid, gid)) = self.user {
            cmd.arg(format!("--user={uid}:{gid}"));
        }
        cmd.env_clear()
            .stdin(Stdio::from(input))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .process_group(0)
            .kill_on_drop(true);
        crate::pool::spawn::confine_child(&mut cmd, self.placement, supervisor_pid, dir_fd);
        cmd.spawn()
    }
}

/// Copies the compile process's output into the store (a file of the supervisor's own,
/// owner-only, written under a temporary name and renamed) with its record; returns the
/// installed artifact held open, and false when the store held the same bytes already.
fn install(
    staging: OwnedFd,
    file: &str,
    max: u64,
    path: &Path,
    record_path: &Path,
    mut record: Record,
) -> io::Result<(Artifact, bool)> {
    let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
    let output = File::from(nix::fcntl::openat(&staging, file, flags, nix::sys::stat::Mode::empty())?);
    let meta = output.metadata()?;
    if !meta.file_type().is_file() || meta.len() > max {
        return Err(io::Error::other(format!("the output is not a regular file of at most {max} bytes")));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    output.take(max + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(io::Error::other(format!("the output is larger than {max} bytes")));
    }
    record.artifact_sha256 = hex(&Sha256::digest(&bytes));
    record.size = bytes.len() as u64;
    // The same compile of the same module is there already (compiles are deterministic):
    // keep it.
    let expected = Record { artifact_sha256: String::new(), size: 0, ..record.clone() };
    if let Ok(Some(same)) = verify_stored(path, record_path, &expected, max) {
        let stored: Option<Record> = std::fs::read(record_path).ok().and_then(|j| serde_json::from_slice(&j).ok());
        if stored.as_ref() == Some(&record) {
            return Ok((same, false));
        }
    }
    let dir = path.parent().ok_or_else(|| io::Error::other("artifact path has no parent"))?;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    // Readable by others: a worker reads its passed descriptor, and an engine that takes
    // paths only (libwasmedge) opens it again as /proc/self/fd/N, which checks the file's
    // mode. Nobody reaches it by path: every directory above it is the supervisor's, 0700.
    write_atomically(path, &bytes, 0o644)?;
    let json = serde_json::to_vec(&record).map_err(io::Error::other)?;
    write_atomically(record_path, &json, 0o600)?;
    let stamp = Stamp::of(&open_private(path)?.metadata()?);
    Ok((Artifact { path: path.to_path_buf(), stamp, spoiled: AtomicBool::new(false) }, true))
}

/// The stored artifact at `path` if its record matches `expected` (all but digest and
/// size) and its bytes the record's digest; `Ok(None)` when there is none; `Err` when one
/// is there but must not be loaded.
fn verify_stored(path: &Path, record_path: &Path, expected: &Record, max: u64) -> Result<Option<Artifact>, String> {
    let record = match open_private(record_path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("record: {e}")),
    };
    let mut json = Vec::new();
    record.take(64 << 10).read_to_end(&mut json).map_err(|e| format!("record: {e}"))?;
    let record: Record = serde_json::from_slice(&json).map_err(|e| format!("record: {e}"))?;
    let same = Record { artifact_sha256: String::new(), size: 0, ..record.clone() };
    if same != *expected {
        return Err(format!("the record is for another artifact: {record:?}"));
    }
    let file = open_private(path).map_err(|e| format!("artifact: {e}"))?;
    let meta = file.metadata().map_err(|e| format!("artifact: {e}"))?;
    if meta.len() != record.size || meta.len() > max {
        return Err(format!("artifact is {} bytes, the record says {}", meta.len(), record.size));
    }
    let mut hasher = Sha256::new();
    let mut reader = &file;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = reader.read(&mut buf).map_err(|e| format!("artifact: {e}"))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    if hex(&hasher.finalize()) != record.artifact_sha256 {
        return Err("the artifact's bytes do not have the recorded digest".into());
    }
    // An artifact stored owner-only (by an earlier version) must be readable by the
    // workers' engines, which may open their descriptor again by its /proc path.
    if meta.mode() & 0o777 != 0o644 {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(0o644)).map_err(|e| format!("artifact: {e}"))?;
    }
    let meta = file.metadata().map_err(|e| format!("artifact: {e}"))?;
    Ok(Some(Artifact { path: path.to_path_buf(), stamp: Stamp::of(&meta), spoiled: AtomicBool::new(false) }))
}

/// Opens a store file: a regular file (not a link) of the supervisor's own that nobody else
/// can write.
fn open_private(path: &Path) -> io::Result<File> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.file_type().is_file() || meta.uid() != nix::unistd::geteuid().as_raw() || meta.mode() & 0o022 != 0 {
        return Err(io::Error::other("not a regular file of the supervisor's that only it can write"));
    }
    Ok(file)
}

fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", uuid::Uuid::new_v4().simple()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record {
        Record {
            tenant: "a".into(),
            module_sha256: "0".repeat(64),
            kind: "command".into(),
            engine: "wasmtime".into(),
            version: "v".into(),
            artifact_sha256: String::new(),
            size: 0,
        }
    }

    /// The record decides: another tenant's record, changed bytes or a file of the wrong
    /// size is refused; the right one is verified and held open.
    #[test]
    fn stored_artifacts_are_loaded_only_as_recorded() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::set_permissions(tmp.path(), std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
        let (path, rec) = (tmp.path().join("x.cwasm"), tmp.path().join("x.cwasm.json"));
        assert!(matches!(verify_stored(&path, &rec, &record(), 1 << 20), Ok(None)), "nothing stored");
        let staging = tmp.path().join("staging");
        std::fs::create_dir(&staging).unwrap();
        std::fs::write(staging.join("artifact.cwasm"), b"native code").unwrap();
        let dir: OwnedFd =
            nix::fcntl::open(&staging, OFlag::O_PATH | OFlag::O_DIRECTORY, nix::sys::stat::Mode::empty()).unwrap();
        let (installed, fresh) = install(dir, "artifact.cwasm", 1 << 20, &path, &rec, record()).unwrap();
        assert!(fresh);
        assert!(installed.for_worker().is_some());
        assert!(verify_stored(&path, &rec, &record(), 1 << 20).unwrap().is_some());
        let other = Record { tenant: "b".into(), ..record() };
        assert!(verify_stored(&path, &rec, &other, 1 << 20).unwrap_err().contains("another artifact"));
        std::thread::sleep(Duration::from_millis(20)); // past the coarse timestamp clock
        std::fs::write(&path, b"native cod3").unwrap();
        assert!(verify_stored(&path, &rec, &record(), 1 << 20).unwrap_err().contains("digest"));
        assert!(installed.for_worker().is_none(), "a changed file is not passed on");
        std::fs::write(&path, b"longer native code").unwrap();
        assert!(verify_stored(&path, &rec, &record(), 1 << 20).unwrap_err().contains("bytes"));
    }
}
