//! The function registry: maps a function name to its module (path + content hash) and
//! its config, straight from the functions directory.
//!
//! A lookup checks the module and its config for changes; only when the file identity or
//! timestamps changed is the module re-read and re-hashed. So a module dropped into the
//! directory, or replaced, is served on the next request without a restart, and a deleted
//! one stops being served and leaves the cache. The check is a read of the directory's
//! inotify queue ([`watch`]) where the watch is sure to see every change of the files, and
//! otherwise (and at least every [`REVERIFY`]) a `stat` of both files.

pub mod files;
pub mod function_config;
pub mod name;
pub mod overlap;
pub mod watch;

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use sha2::{Digest, Sha256};
use wasmbox_protocol::{ModuleRef, Preopen};

pub use function_config::{FunctionConfig, FunctionLimits};
pub use name::{FunctionName, NameError};

/// Why a function could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("no function named {0}")]
    NotFound(FunctionName),
    #[error("module of {name} is {size} bytes, more than the limit of {limit}")]
    ModuleTooLarge { name: FunctionName, size: u64, limit: u64 },
    /// The reason is for the operator's log: it can name host paths and config values.
    #[error("config of {name} is invalid: {message}")]
    InvalidConfig { name: FunctionName, message: String },
    #[error("cannot read {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Why the files of an invocation could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot open module {path}")]
    Module {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Preopen(#[from] files::PreopenError),
}

/// A function ready to be dispatched.
#[derive(Debug)]
pub struct Function {
    pub name: FunctionName,
    pub module: ModuleRef,
    pub module_size: u64,
    /// A WebAssembly component (the Component Model's binary layer), not a core module.
    pub component: bool,
    /// A component that exports `wasi:http/incoming-handler` (a `wasi:http/proxy`): it
    /// serves HTTP requests, not command invocations.
    pub http_handler: bool,
    pub config: FunctionConfig,
    stamps: Stamps,
}

impl Function {
    /// The tenant the function belongs to: its config's `tenant`, else its own name.
    pub fn tenant(&self) -> &str {
        self.config.tenant.as_deref().unwrap_or(self.name.as_str())
    }

    /// The preopened directories a worker gets with an invocation of this function, in the
    /// order of `Invocation::preopens`: each a path handle, opened without following any
    /// symbolic link and only if it is still the directory the config was checked with.
    /// (The module file is opened by the pool, only for a worker that does not have the
    /// module in memory.)
    pub fn open_files(&self) -> Result<Vec<OwnedFd>, OpenError> {
        let config = &self.config;
        // The module file and its artifact may go beside them.
        if config.preopens.len() + 2 > wasmbox_protocol::MAX_PASSED_FDS {
            let err =
                io::Error::other(format!("at most {} preopened directories", wasmbox_protocol::MAX_PASSED_FDS - 2));
            return Err(OpenError::Module { path: self.module.path.clone(), source: err });
        }
        let mut fds = Vec::with_capacity(config.preopens.len());
        for (preopen, id) in config.preopens.iter().zip(&config.preopen_ids) {
            fds.push(files::open_preopen(&preopen.host, *id)?);
        }
        Ok(fds)
    }
}

/// What identifies a version of a file without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamps {
    module: Stamp,
    config: Option<Stamp>,
}

impl Stamp {
    fn of(meta: &fs::Metadata) -> Self {
        Stamp {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            ctime_ns: i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
        }
    }
}

/// How long a refused config is answered from memory before it is checked again.
const RECHECK_FAILED: std::time::Duration = std::time::Duration::from_secs(2);

#[derive(Debug)]
struct Failed {
    stamps: Stamps,
    message: String,
    at: std::time::Instant,
}

/// Every function config's preopens, for the overlap rules, with the stamp each config had
/// when it was read: only configs that changed are parsed again.
type PreopenIndex = HashMap<FunctionName, (Stamp, Vec<Preopen>)>;

/// How long an entry the watch covers is served without a `stat` at most: a bound on what
/// any change the watch could miss costs.
pub const REVERIFY: std::time::Duration = std::time::Duration::from_secs(2);

/// A function as last loaded, and until when it is served without a `stat`.
struct Cached {
    function: Arc<Function>,
    trusted_until: Option<Instant>,
}

pub struct Registry {
    dir: PathBuf,
    max_module_bytes: u64,
    protected: overlap::Protected,
    functions: Mutex<HashMap<FunctionName, Cached>>,
    /// `None`: every lookup stats the files (the reason was logged at start).
    watch: Option<Mutex<watch::Watch>>,
    /// Counts drains of the watch that found changes: an entry checked with a `stat` is
    /// trusted only if none came in meanwhile.
    changes: AtomicU64,
    /// Lookups that checked the files with a `stat`.
    checks: AtomicU64,
    /// Configs that failed to load. Until the files change, and for at most
    /// [`RECHECK_FAILED`] (the directories a config names can change too), the same error
    /// is answered without parsing the config again; the reason is logged when it changes.
    failed: Mutex<HashMap<FunctionName, Failed>>,
    preopen_index: Arc<Mutex<PreopenIndex>>,
}

impl Registry {
    /// `dir` is made absolute so workers (another cwd some day) get absolute paths.
    pub fn new(dir: &Path, max_module_bytes: u64) -> io::Result<Self> {
        let dir = std::path::absolute(dir)?;
        let protected = overlap::Protected { functions: canonical_or_absolute(&dir), private: Vec::new() };
        let watch = match watch::Watch::new(&dir) {
            Ok(watch) => Some(Mutex::new(watch)),
            Err(reason) => {
                tracing::info!(dir = %dir.display(), %reason, "functions directory not watched: every lookup checks the files");
                None
            }
        };
        Ok(Registry {
            dir,
            max_module_bytes,
            protected,
            functions: Mutex::new(HashMap::new()),
            watch,
            changes: AtomicU64::new(0),
            checks: AtomicU64::new(0),
            failed: Mutex::new(HashMap::new()),
            preopen_index: Arc::new(Mutex::new(HashMap::new())),
        })
    }

    /// Directories of the server's own that no preopen may expose (the artifact cache, the
    /// state directory), by a name for the messages.
    pub fn protect(mut self, dirs: &[(&'static str, &Path)]) -> Self {
        self.protected.private.extend(dirs.iter().map(|(label, dir)| (*label, canonical_or_absolute(dir))));
        self
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<FunctionName, Cached>> {
        self.functions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many lookups checked the files with a `stat` (the others trusted the watch).
    pub fn file_checks(&self) -> u64 {
        self.checks.load(Ordering::Relaxed)
    }

    /// Whether the directory's changes reach this registry without a `stat` per lookup.
    pub fn watched(&self) -> bool {
        self.watch.as_ref().is_some_and(|w| w.lock().unwrap_or_else(|p| p.into_inner()).active())
    }

    /// `name` as cached, if no change to its files can have happened since it was last
    /// checked (see [`watch`]), with the count of changes seen so far (for
    /// [`Registry::checked`]).
    fn trusted(&self, name: &FunctionName) -> (Option<Arc<Function>>, u64) {
        let Some(watch) = &self.watch else { return (None, 0) };
        let mut functions = self.lock();
        let changed = watch.lock().unwrap_or_else(|p| p.into_inner()).drain();
        if changed != watch::Changed::Nothing {
            self.changes.fetch_add(1, Ordering::Relaxed);
        }
        match changed {
            watch::Changed::Nothing => {}
            watch::Changed::Some(names) => {
                for changed in names {
                    if let Some(cached) = functions.get_mut(&changed) {
                        cached.trusted_until = None;
                    }
                }
            }
            watch::Changed::All => functions.values_mut().for_each(|c| c.trusted_until = None),
        }
        let changes = self.changes.load(Ordering::Relaxed);
        let found = functions
            .get(name)
            .filter(|c| c.trusted_until.is_some_and(|until| Instant::now() < until))
            .map(|c| c.function.clone());
        (found, changes)
    }

    /// Until when an entry whose files were just checked is trusted: only if the watch
    /// covers them and saw no change since `changes` was read.
    fn trust(&self, covered: bool, changes: u64) -> Option<Instant> {
        (covered && self.watch.is_some() && self.changes.load(Ordering::Relaxed) == changes)
            .then(|| Instant::now() + REVERIFY)
    }

    fn failed(&self) -> std::sync::MutexGuard<'_, HashMap<FunctionName, Failed>> {
        self.failed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Resolves a function, re-reading its files only when they changed.
    pub async fn lookup(&self, name: &FunctionName) -> Result<Arc<Function>, RegistryError> {
        let (trusted, changes) = self.trusted(name);
        if let Some(found) = trusted {
            return Ok(found);
        }
        self.checks.fetch_add(1, Ordering::Relaxed);
        let (module_path, config_path) = self.paths(name);
        let checked = {
            let watch = self.watch.as_ref().map(|w| w.lock().unwrap_or_else(|p| p.into_inner()));
            current_stamps(&module_path, &config_path, watch.as_deref())
        };
        let (stamps, covered) = match checked {
            Ok(Some(checked)) => checked,
            Ok(None) => {
                self.lock().remove(name);
                self.failed().remove(name);
                return Err(RegistryError::NotFound(name.clone()));
            }
            Err(e) => return Err(e),
        };
        if let Some(cached) = self.lock().get_mut(name).filter(|c| c.function.stamps == stamps) {
            cached.trusted_until = self.trust(covered, changes);
            return Ok(cached.function.clone());
        }
        if let Some(failed) = self.failed().get(name).filter(|f| f.stamps == stamps && f.at.elapsed() < RECHECK_FAILED)
        {
            return Err(RegistryError::InvalidConfig { name: name.clone(), message: failed.message.clone() });
        }
        if stamps.module.size > self.max_module_bytes {
            return Err(RegistryError::ModuleTooLarge {
                name: name.clone(),
                size: stamps.module.size,
                limit: self.max_module_bytes,
            });
        }
        let job = Load {
            name: name.clone(),
            dir: self.dir.clone(),
            module_path,
            config_path,
            stamps,
            limit: self.max_module_bytes,
            protected: self.protected.clone(),
            index: self.preopen_index.clone(),
        };
        let loaded = tokio::task::spawn_blocking(move || job.run())
            .await
            .map_err(|e| RegistryError::Io { path: self.dir.clone(), source: io::Error::other(e) })?;
        match loaded {
            Ok(loaded) => {
                let loaded = Arc::new(loaded);
                self.failed().remove(name);
                let trusted_until = self.trust(covered, changes);
                self.lock().insert(name.clone(), Cached { function: loaded.clone(), trusted_until });
                Ok(loaded)
            }
            Err(RegistryError::InvalidConfig { name, message }) => {
                self.lock().remove(&name);
                let failed = Failed { stamps, message: message.clone(), at: std::time::Instant::now() };
                let before = self.failed().insert(name.clone(), failed);
                // Once per reason and version of the files, however often it is asked for.
                if before.is_none_or(|b| b.stamps != stamps || b.message != message) {
                    tracing::warn!(function = %name, reason = %message, "function config refused");
                }
                Err(RegistryError::InvalidConfig { name, message })
            }
            Err(e) => Err(e),
        }
    }

    /// Forgets a function so the next lookup re-reads it (its file changed under a worker).
    pub fn invalidate(&self, name: &FunctionName) {
        self.lock().remove(name);
        self.failed().remove(name);
    }

    /// Number of functions currently known.
    pub fn cached(&self) -> usize {
        self.lock().len()
    }

    fn paths(&self, name: &FunctionName) -> (PathBuf, PathBuf) {
        (self.dir.join(format!("{name}.wasm")), self.dir.join(format!("{name}.toml")))
    }
}

/// The canonical form of `path`, or its absolute form while it does not exist yet.
fn canonical_or_absolute(path: &Path) -> PathBuf {
    path.canonicalize().or_else(|_| std::path::absolute(path)).unwrap_or_else(|_| path.to_path_buf())
}

/// Stats module and config; `None` when there is no module (a file, following links).
/// With them, whether `watch` sees every change of both (see [`watch::Watch::covers`]).
fn current_stamps(
    module: &Path,
    config: &Path,
    watch: Option<&watch::Watch>,
) -> Result<Option<(Stamps, bool)>, RegistryError> {
    let mut covered = watch.is_some();
    // `lstat` first: a link is followed, but the watch does not see its target change.
    let mut stat = |path: &Path| -> io::Result<fs::Metadata> {
        let meta = fs::symlink_metadata(path)?;
        covered &= watch.is_some_and(|w| w.covers(&meta));
        if meta.file_type().is_symlink() { fs::metadata(path) } else { Ok(meta) }
    };
    let module_meta = match stat(module) {
        Ok(meta) if meta.is_file() => Stamp::of(&meta),
        Ok(_) => return Ok(None),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(RegistryError::Io { path: module.into(), source }),
    };
    let config_meta = match stat(config) {
        Ok(meta) => Some(Stamp::of(&meta)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(source) => return Err(RegistryError::Io { path: config.into(), source }),
    };
    Ok(Some((Stamps { module: module_meta, config: config_meta }, covered)))
}

/// Loading one function, on the blocking pool.
struct Load {
    name: FunctionName,
    dir: PathBuf,
    module_path: PathBuf,
    config_path: PathBuf,
    stamps: Stamps,
    limit: u64,
    protected: overlap::Protected,
    index: Arc<Mutex<PreopenIndex>>,
}

impl Load {
    fn run(self) -> Result<Function, RegistryError> {
        let name = self.name;
        let invalid = |message: String| RegistryError::InvalidConfig { name: name.clone(), message };
        let config = match self.stamps.config {
            None => FunctionConfig::default(),
            Some(_) => {
                let config = read_config(&self.config_path, &self.dir).map_err(invalid)?;
                if !config.preopens.is_empty() {
                    let mut index = self.index.lock().unwrap_or_else(|p| p.into_inner());
                    refresh_preopen_index(&self.dir, &mut index);
                    let others = index
                        .iter()
                        .filter(|(other, _)| **other != name)
                        .flat_map(|(other, (_, preopens))| preopens.iter().map(move |p| (other.as_str(), p)));
                    overlap::check(&config.preopens, &self.protected, others).map_err(invalid)?;
                    // This config as just read and checked: the index must not wait for the
                    // next scan to know it.
                    if let Some(stamp) = self.stamps.config {
                        index.insert(name.clone(), (stamp, config.preopens.clone()));
                    }
                }
                config
            }
        };
        let bytes = read_bounded(&self.module_path, self.limit)?;
        if bytes.len() as u64 > self.limit {
            return Err(RegistryError::ModuleTooLarge { name, size: bytes.len() as u64, limit: self.limit });
        }
        let sha256 = sha256_hex(&bytes);
        Ok(Function {
            name,
            module: ModuleRef { path: self.module_path, sha256 },
            module_size: bytes.len() as u64,
            component: is_component(&bytes),
            http_handler: is_component(&bytes) && exports_http_handler(&bytes),
            config,
            stamps: self.stamps,
        })
    }
}

/// Whether `wasm` is a component: the binary's header after the magic says version 0x0d,
/// layer 1 (a core module is version 1, layer 0).
pub fn is_component(wasm: &[u8]) -> bool {
    wasm.len() >= 8 && wasm[..4] == *b"\0asm" && wasm[6..8] == [1, 0]
}

/// Whether a component exports `wasi:http/incoming-handler@0.2.*` at its top level: a walk
/// over the sections (nested modules and components skipped), no validation; the engine
/// validates when it compiles.
pub fn exports_http_handler(wasm: &[u8]) -> bool {
    use wasmparser::{Parser, Payload};
    let mut depth = 0usize;
    for payload in Parser::new(0).parse_all(wasm) {
        let Ok(payload) = payload else { return false };
        match payload {
            Payload::ModuleSection { .. } | Payload::ComponentSection { .. } => depth += 1,
            Payload::End(_) if depth > 0 => depth -= 1,
            Payload::ComponentExportSection(exports) if depth == 0 => {
                for export in exports.into_iter().flatten() {
                    let name = export.name.name;
                    if name.strip_prefix("wasi:http/incoming-handler@0.2.").is_some() {
                        return true;
                    }
                }
            }
            _ => {}
        }
    }
    false
}

/// Reads and parses one `name.toml` (a regular file, at most `MAX_CONFIG_BYTES`).
fn read_config(path: &Path, dir: &Path) -> Result<FunctionConfig, String> {
    let limit = function_config::MAX_CONFIG_BYTES;
    let text = read_bounded(path, limit).map_err(|e| match e {
        RegistryError::Io { source, .. } => format!("cannot read it: {source}"),
        other => other.to_string(),
    })?;
    // Never parse a cut-off prefix: it can be valid TOML that drops the rest.
    if text.len() as u64 > limit {
        return Err(format!("larger than the limit of {limit} bytes"));
    }
    let text = String::from_utf8(text).map_err(|_| "not UTF-8".to_string())?;
    function_config::parse(&text, dir)
}

/// Brings `index` up to date with the configs in `dir`: changed ones are parsed again
/// (one that does not parse counts as having no preopens: it is refused on its own
/// lookup), deleted ones dropped.
fn refresh_preopen_index(dir: &Path, index: &mut PreopenIndex) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    let mut seen = std::collections::HashSet::new();
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(name) =
            file_name.to_str().and_then(|n| n.strip_suffix(".toml")).and_then(|n| FunctionName::parse(n).ok())
        else {
            continue;
        };
        let Ok(meta) = fs::metadata(entry.path()) else { continue };
        let stamp = Stamp::of(&meta);
        seen.insert(name.clone());
        if index.get(&name).is_some_and(|(at, _)| *at == stamp) {
            continue;
        }
        let preopens = read_config(&entry.path(), dir).map(|c| c.preopens).unwrap_or_default();
        index.insert(name, (stamp, preopens));
    }
    index.retain(|name, _| seen.contains(name));
}

/// Reads at most `limit + 1` bytes of a regular file, so an oversized file is detected
/// without reading it all (and a FIFO is refused instead of waited on).
fn read_bounded(path: &Path, limit: u64) -> Result<Vec<u8>, RegistryError> {
    let io_err = |source| RegistryError::Io { path: path.into(), source };
    let mut out = Vec::new();
    files::open_regular(path).map_err(io_err)?.take(limit + 1).read_to_end(&mut out).map_err(io_err)?;
    Ok(out)
}

/// Lowercase hex SHA-256: the module hash everywhere (cache key, artifact name).
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> FunctionName {
        FunctionName::parse(s).unwrap()
    }

    #[test]
    fn components_and_their_http_handler_export_are_told_apart() {
        let module = wat::parse_str("(module)").unwrap();
        assert!(!is_component(&module) && !exports_http_handler(&module));
        let handler =
            wat::parse_str(r#"(component (instance $i) (export "wasi:http/incoming-handler@0.2.4" (instance $i)))"#)
                .unwrap();
        assert!(is_component(&handler) && exports_http_handler(&handler));
        let command =
            wat::parse_str(r#"(component (instance $i) (export "wasi:cli/run@0.2.0" (instance $i)))"#).unwrap();
        assert!(is_component(&command) && !exports_http_handler(&command));
        // Only the top level counts: a handler nested in a component is not its export.
        let nested = wat::parse_str(
            r#"(component (component (instance $i) (export "wasi:http/incoming-handler@0.2.4" (instance $i))))"#,
        )
        .unwrap();
        assert!(is_component(&nested) && !exports_http_handler(&nested));
        let later =
            wat::parse_str(r#"(component (instance $i) (export "wasi:http/incoming-handler@0.3.0" (instance $i)))"#)
                .unwrap();
        assert!(!exports_http_handler(&later), "WASI 0.3 is not served");
        assert!(!is_component(b"\0asm") && !is_component(b"junk at all"));
    }

    #[tokio::test]
    async fn lookup_follows_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::new(dir.path(), 1024).unwrap();
        assert!(matches!(reg.lookup(&name("f")).await, Err(RegistryError::NotFound(_))));

        fs::write(dir.path().join("f.wasm"), b"one").unwrap();
        let first = reg.lookup(&name("f")).await.unwrap();
        assert_eq!(first.module.sha256, sha256_hex(b"one"));
        // Unchanged file: the same entry, not re-read.
        assert!(Arc::ptr_eq(&first, &reg.lookup(&name("f")).await.unwrap()));

        // Replaced by rename, as deployments do: new content, new hash.
        fs::write(dir.path().join("f.tmp"), b"two").unwrap();
        fs::rename(dir.path().join("f.tmp"), dir.path().join("f.wasm")).unwrap();
        let second = reg.lookup(&name("f")).await.unwrap();
        assert_eq!(second.module.sha256, sha256_hex(b"two"));

        // A config appearing is picked up too.
        fs::write(dir.path().join("f.toml"), "args = [\"x\"]").unwrap();
        assert_eq!(reg.lookup(&name("f")).await.unwrap().config.default_args, ["x"]);

        fs::remove_file(dir.path().join("f.wasm")).unwrap();
        assert!(matches!(reg.lookup(&name("f")).await, Err(RegistryError::NotFound(_))));
        assert_eq!(reg.cached(), 0, "deleted functions leave the cache");
    }

    #[tokio::test]
    async fn a_watched_directory_is_not_stat_per_lookup_and_still_misses_no_change() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::new(dir.path(), 1024).unwrap();
        assert!(reg.watched());
        fs::write(dir.path().join("f.wasm"), b"one").unwrap();
        reg.lookup(&name("f")).await.unwrap();
        let checks = reg.file_checks();
        for _ in 0..100 {
            reg.lookup(&name("f")).await.unwrap();
        }
        assert_eq!(reg.file_checks(), checks, "no stat while nothing changed");
        // Every way a deployment changes a function is seen by the very next lookup.
        fs::write(dir.path().join("f.wasm"), b"two").unwrap();
        assert_eq!(reg.lookup(&name("f")).await.unwrap().module.sha256, sha256_hex(b"two"), "written in place");
        fs::write(dir.path().join("f.tmp"), b"three").unwrap();
        fs::rename(dir.path().join("f.tmp"), dir.path().join("f.wasm")).unwrap();
        assert_eq!(reg.lookup(&name("f")).await.unwrap().module.sha256, sha256_hex(b"three"), "renamed over");
        fs::write(dir.path().join("f.toml"), "args = [\"y\"]").unwrap();
        assert_eq!(reg.lookup(&name("f")).await.unwrap().config.default_args, ["y"], "a config added");
        fs::remove_file(dir.path().join("f.toml")).unwrap();
        assert!(reg.lookup(&name("f")).await.unwrap().config.default_args.is_empty(), "and removed");
        fs::remove_file(dir.path().join("f.wasm")).unwrap();
        assert!(matches!(reg.lookup(&name("f")).await, Err(RegistryError::NotFound(_))), "deleted");
    }

    #[tokio::test]
    async fn files_the_watch_cannot_see_change_are_checked_on_every_lookup() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        let reg = Registry::new(dir.path(), 1024).unwrap();
        // A link to a file outside (how Kubernetes mounts a config map), and a file with a
        // second name outside: a change there makes no event in the functions directory.
        let target = elsewhere.path().join("target.wasm");
        fs::write(&target, b"one").unwrap();
        std::os::unix::fs::symlink(&target, dir.path().join("linked.wasm")).unwrap();
        fs::write(dir.path().join("twice.wasm"), b"one").unwrap();
        fs::hard_link(dir.path().join("twice.wasm"), elsewhere.path().join("other-name.wasm")).unwrap();
        for f in ["linked", "twice"] {
            assert_eq!(reg.lookup(&name(f)).await.unwrap().module.sha256, sha256_hex(b"one"));
        }
        fs::write(elsewhere.path().join("new.wasm"), b"two").unwrap();
        fs::rename(elsewhere.path().join("new.wasm"), &target).unwrap();
        fs::write(elsewhere.path().join("other-name.wasm"), b"two").unwrap();
        for f in ["linked", "twice"] {
            assert_eq!(reg.lookup(&name(f)).await.unwrap().module.sha256, sha256_hex(b"two"), "{f}");
        }
    }

    #[tokio::test]
    async fn oversized_module_and_bad_config_are_typed_errors() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::new(dir.path(), 4).unwrap();
        fs::write(dir.path().join("big.wasm"), b"12345").unwrap();
        assert!(matches!(reg.lookup(&name("big")).await, Err(RegistryError::ModuleTooLarge { size: 5, .. })));
        fs::write(dir.path().join("ok.wasm"), b"1").unwrap();
        fs::write(dir.path().join("ok.toml"), "nonsense = true").unwrap();
        assert!(matches!(reg.lookup(&name("ok")).await, Err(RegistryError::InvalidConfig { .. })));
        // Over the size cap: refused, even when the part within the cap is a valid config.
        let mut big = "args = []\n".to_string();
        while big.len() as u64 <= function_config::MAX_CONFIG_BYTES {
            big.push_str("# padding padding padding padding padding padding padding padding\n");
        }
        fs::write(dir.path().join("ok.toml"), big).unwrap();
        let err = reg.lookup(&name("ok")).await.unwrap_err();
        assert!(matches!(&err, RegistryError::InvalidConfig { message, .. } if message.contains("limit")), "{err:?}");
    }
}
