//! Compiled-module cache: in memory per worker (LRU by content hash) and on disk as
//! precompiled artifacts shared by all workers and restarts.
//!
//! Artifacts are native code, so only files this program wrote are ever loaded: the cache
//! directory must belong to this uid and be closed to other users, and each artifact must
//! be a regular file owned by this uid and writable by nobody else.

use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};

use nix::fcntl::OFlag;
use std::path::{Path, PathBuf};

use std::sync::Arc;

use sha2::{Digest, Sha256};
use wasmbox_protocol::{ModuleRef, ModuleSource};

use crate::engine::{ArtifactFile, Engine, EngineError, ModuleKind};
use crate::session::{Layout, instrument};

/// Why a module could not be made ready.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error("{0}")]
    Invalid(String),
    #[error("module file changed since the supervisor hashed it")]
    Changed,
    #[error("module reference has a malformed hash")]
    BadHash,
    #[error("module file {path} is larger than {limit} bytes")]
    TooLarge { path: PathBuf, limit: u64 },
    #[error("cannot read module file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Errors setting up the artifact directory.
#[derive(Debug, thiserror::Error)]
pub enum CacheDirError {
    #[error("cannot create cache directory {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "cache directory {path} is not owned by uid {uid} or is writable by others; refusing to load native code from it"
    )]
    Untrusted { path: PathBuf, uid: u32 },
}

/// A module ready to instantiate; a session module comes with its [`Layout`].
#[derive(Clone)]
pub struct Prepared<M> {
    pub module: M,
    pub layout: Option<Arc<Layout>>,
}

struct Entry<M> {
    module: Prepared<M>,
    last_used: u64,
    /// Run by the engine's interpreter: a native artifact passed later takes its place.
    interpreted: bool,
}

pub struct ModuleCache<E: Engine> {
    engine: E,
    artifact_dir: Option<PathBuf>,
    /// The artifact directory, opened once: every artifact is reached relative to it.
    artifact_fd: Option<OwnedFd>,
    capacity: usize,
    max_module_bytes: u64,
    /// By [`wasmbox_protocol::module_key`]: a module and its session form are two entries.
    entries: HashMap<String, Entry<E::Module>>,
    /// Modules that failed to compile, so a broken module is not recompiled per request.
    invalid: HashMap<String, String>,
    clock: u64,
    /// The last `get` found the module in memory (whatever its source says).
    last_hit: bool,
}

impl<E: Engine> ModuleCache<E> {
    /// `cache_dir`: root of the artifact cache; artifacts of this engine version go in a
    /// subdirectory named after it, so no version ever sees another's files.
    pub fn new(
        engine: E,
        cache_dir: Option<&Path>,
        capacity: usize,
        max_module_bytes: u64,
    ) -> Result<Self, CacheDirError> {
        Self::new_owned(engine, cache_dir, None, capacity, max_module_bytes)
    }

    /// Like [`ModuleCache::new`], for a worker that will run as `owner` (`uid`, `gid`):
    /// the engine's artifact directory gets a name of its own for that uid and belongs to
    /// it, while the root stays with the current user. Artifacts are native code, so a
    /// directory anyone else can write to is refused.
    pub fn new_owned(
        engine: E,
        cache_dir: Option<&Path>,
        owner: Option<(u32, u32)>,
        capacity: usize,
        max_module_bytes: u64,
    ) -> Result<Self, CacheDirError> {
        let artifact_dir = match (cache_dir, engine.artifact_extension()) {
            (Some(root), Some(_)) => {
                let euid = nix::unistd::geteuid().as_raw();
                let owner = owner.filter(|&(uid, _)| uid != euid);
                let name = match owner {
                    Some((uid, _)) => format!("{}-{}-uid{uid}", engine.name(), engine.version()),
                    None => format!("{}-{}", engine.name(), engine.version()),
                };
                let dir = root.join(name);
                create_private_dir(root, None)?;
                create_private_dir(&dir, owner)?;
                Some(dir)
            }
            _ => None,
        };
        let artifact_fd = match &artifact_dir {
            Some(dir) => {
                let flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
                let fd = nix::fcntl::open(dir, flags, nix::sys::stat::Mode::empty())
                    .map_err(|e| CacheDirError::Create { path: dir.clone(), source: e.into() })?;
                Some(fd)
            }
            None => None,
        };
        Ok(ModuleCache {
            engine,
            artifact_dir,
            artifact_fd,
            capacity: capacity.max(1),
            max_module_bytes,
            entries: HashMap::new(),
            invalid: HashMap::new(),
            clock: 0,
            last_hit: false,
        })
    }

    pub fn engine(&self) -> &E {
        &self.engine
    }

    pub fn artifact_dir(&self) -> Option<&Path> {
        self.artifact_dir.as_deref()
    }

    /// Makes the artifact directory (or `/` without one) the working directory and refers
    /// to artifacts relative to it from then on, so a worker that drops to an unprivileged
    /// user keeps reaching it even when its parents are closed to that user.
    pub fn enter_artifact_dir(&mut self) -> std::io::Result<()> {
        match &self.artifact_fd {
            // The directory as it was checked, whatever its path leads to now.
            Some(dir) => {
                nix::unistd::fchdir(dir)?;
                self.artifact_dir = Some(PathBuf::from("."));
            }
            None => std::env::set_current_dir("/")?,
        }
        Ok(())
    }

    /// Returns the module ready to run, and where it came from. `file`: the module file
    /// opened by the supervisor; without it the module is read from `module.path`.
    /// `artifact`: its precompiled artifact, made by the supervisor's compiler, loaded
    /// before anything else is tried.
    pub fn get(
        &mut self,
        module: &ModuleRef,
        file: Option<fs::File>,
        artifact: Option<fs::File>,
        kind: ModuleKind,
    ) -> Result<(Prepared<E::Module>, ModuleSource), PrepareError> {
        if !is_sha256_hex(&module.sha256) {
            return Err(PrepareError::BadHash);
        }
        let key = wasmbox_protocol::module_key(&module.sha256, kind == ModuleKind::Session);
        self.clock += 1;
        self.last_hit = false;
        if let Some(entry) = self.entries.get_mut(&key) {
            entry.last_used = self.clock;
            if !entry.interpreted || artifact.is_none() {
                self.last_hit = true;
                let source = if entry.interpreted { ModuleSource::Interpreted } else { ModuleSource::Memory };
                return Ok((entry.module.clone(), source));
            }
            // The trusted compiler's artifact is ready: load it in the interpreted one's place.
        }
        if let Some(message) = self.invalid.get(&key) {
            return Err(PrepareError::Invalid(message.clone()));
        }
        let (compiled, source) = match self.load_or_compile(module, file, artifact, kind) {
            Ok(found) => found,
            Err(PrepareError::Invalid(message)) => {
                if self.invalid.len() >= self.capacity {
                    self.invalid.clear();
                }
                self.invalid.insert(key, message.clone());
                return Err(PrepareError::Invalid(message));
            }
            Err(e) => return Err(e),
        };
        self.insert(key, compiled.clone(), source == ModuleSource::Interpreted);
        Ok((compiled, source))
    }

    /// Whether [`ModuleCache::get`] would find `module` in memory and load nothing (with
    /// `artifact` passed, an interpreted module is loaded from it instead).
    pub fn holds(&self, module: &ModuleRef, kind: ModuleKind, artifact: bool) -> bool {
        let key = wasmbox_protocol::module_key(&module.sha256, kind == ModuleKind::Session);
        self.entries.get(&key).is_some_and(|entry| !entry.interpreted || !artifact)
    }

    /// Whether the last [`ModuleCache::get`] found its module in memory, loading nothing.
    pub fn last_hit(&self) -> bool {
        self.last_hit
    }

    fn insert(&mut self, hash: String, module: Prepared<E::Module>, interpreted: bool) {
        if self.entries.len() >= self.capacity && !self.entries.contains_key(&hash) {
            if let Some(oldest) = self.entries.iter().min_by_key(|(_, e)| e.last_used).map(|(k, _)| k.clone()) {
                self.entries.remove(&oldest);
            }
        }
        self.entries.insert(hash, Entry { module, last_used: self.clock, interpreted });
    }

    fn load_or_compile(
        &self,
        module: &ModuleRef,
        file: Option<fs::File>,
        passed: Option<fs::File>,
        kind: ModuleKind,
    ) -> Result<(Prepared<E::Module>, ModuleSource), PrepareError> {
        if kind == ModuleKind::Session {
            return self.load_or_compile_session(module, file, passed);
        }
        let command = |m| Prepared { module: m, layout: None };
        if let Some(m) = passed.and_then(|artifact| self.load_passed(artifact, kind)) {
            return Ok((command(m), ModuleSource::Artifact));
        }
        let artifact = self.artifact_name(&module.sha256, kind);
        if let Some(m) = artifact.as_deref().and_then(|name| self.load_trusted(name, kind)) {
            return Ok((command(m), ModuleSource::Artifact));
        }
        let wasm = read_module(&module.path, file, self.max_module_bytes)?;
        if sha256_hex(&wasm) != module.sha256 {
            return Err(PrepareError::Changed);
        }
        let (m, source) = self.compile_cached(&wasm, artifact.as_deref(), kind)?;
        Ok((command(m), source))
    }

    /// A session module: the Wasm is always read, as its layout (globals, initial memory
    /// image) comes from the original bytes; the rewritten module is what gets compiled,
    /// and its artifact is cached beside the command form's.
    fn load_or_compile_session(
        &self,
        module: &ModuleRef,
        file: Option<fs::File>,
        passed: Option<fs::File>,
    ) -> Result<(Prepared<E::Module>, ModuleSource), PrepareError> {
        let wasm = read_module(&module.path, file, self.max_module_bytes)?;
        if sha256_hex(&wasm) != module.sha256 {
            return Err(PrepareError::Changed);
        }
        let instrument::Instrumented { wasm, layout } =
            instrument::instrument(&wasm).map_err(|e| PrepareError::Invalid(e.to_string()))?;
        let layout = Some(Arc::new(layout));
        if let Some(m) = passed.and_then(|artifact| self.load_passed(artifact, ModuleKind::Session)) {
            return Ok((Prepared { module: m, layout }, ModuleSource::Artifact));
        }
        let artifact = self.artifact_name(&module.sha256, ModuleKind::Session);
        if let Some(m) = artifact.as_deref().and_then(|name| self.load_trusted(name, ModuleKind::Session)) {
            return Ok((Prepared { module: m, layout }, ModuleSource::Artifact));
        }
        let (m, source) = self.compile_cached(&wasm, artifact.as_deref(), ModuleKind::Session)?;
        Ok((Prepared { module: m, layout }, source))
    }

    /// Loads an artifact the supervisor passed; one the engine refuses is logged and the
    /// module compiled instead (the supervisor's record said it was this module's, so a
    /// refusal means another engine build, never someone else's code being run).
    fn load_passed(&self, artifact: fs::File, kind: ModuleKind) -> Option<E::Module> {
        match self.engine.load_passed_artifact(artifact, kind) {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::warn!(error = %e, "the artifact the supervisor passed is not usable; compiling");
                None
            }
        }
    }

    /// The artifact file `name` in the artifact directory (which exists when a name does).
    fn artifact_file<'a>(&'a self, name: &'a str, path: &'a Path) -> Option<ArtifactFile<'a>> {
        Some(ArtifactFile { dir: self.artifact_fd.as_ref()?.as_fd(), name, path })
    }

    /// Loads artifact `name` if it is one this program wrote; an artifact the engine
    /// refuses is deleted (and rebuilt by the caller).
    fn load_trusted(&self, name: &str, kind: ModuleKind) -> Option<E::Module> {
        let path = self.artifact_dir.as_ref()?.join(name);
        let artifact = self.artifact_file(name, &path)?;
        if !is_trusted_artifact(&artifact) {
            return None;
        }
        match self.engine.load_artifact(&artifact, kind) {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::info!(artifact = %path.display(), error = %e, "discarding unusable artifact");
                let _ = nix::unistd::unlinkat(artifact.dir, name, nix::unistd::UnlinkatFlags::NoRemoveDir);
                None
            }
        }
    }

    /// Compiles `wasm`, through the artifact `artifact` (a name in the artifact directory)
    /// when there is a cache.
    fn compile_cached(
        &self,
        wasm: &[u8],
        artifact: Option<&str>,
        kind: ModuleKind,
    ) -> Result<(E::Module, ModuleSource), PrepareError> {
        if let Some(name) = artifact {
            match self.precompile_to(wasm, name, kind) {
                Ok(m) => return Ok((m, ModuleSource::Compiled)),
                Err(EngineError::InvalidModule(message)) => return Err(PrepareError::Invalid(message)),
                Err(e) => tracing::warn!(error = %e, "precompiling to the cache failed; compiling in memory"),
            }
        }
        match self.engine.compile(wasm, kind) {
            Ok(m) => Ok((m, self.engine.memory_source())),
            Err(e) => Err(PrepareError::Invalid(match e {
                EngineError::InvalidModule(message) => message,
                other => other.to_string(),
            })),
        }
    }

    /// Writes the artifact under a unique temporary name and renames it into place, so a
    /// concurrent reader sees either no artifact or a whole one.
    fn precompile_to(&self, wasm: &[u8], name: &str, kind: ModuleKind) -> Result<E::Module, EngineError> {
        let dir = self.artifact_dir.clone().unwrap_or_default();
        let path = dir.join(name);
        // The extension stays last: some engines (WasmEdge's compiler) pick the output
        // format from it.
        let (stem, ext) = name.rsplit_once('.').unwrap_or((name, ""));
        let tmp_name = format!("{stem}.tmp-{}.{ext}", std::process::id());
        let tmp_path = dir.join(&tmp_name);
        let (Some(tmp), Some(target)) = (self.artifact_file(&tmp_name, &tmp_path), self.artifact_file(name, &path))
        else {
            return Err(EngineError::Unsupported("artifacts without a cache directory"));
        };
        let result = self.engine.precompile(wasm, kind, &tmp).and_then(|()| {
            nix::fcntl::renameat(tmp.dir, tmp.name, target.dir, target.name)
                .map_err(|e| EngineError::Io { path: path.clone(), source: e.into() })
        });
        if result.is_err() {
            let _ = nix::unistd::unlinkat(tmp.dir, tmp.name, nix::unistd::UnlinkatFlags::NoRemoveDir);
        }
        result?;
        self.engine.load_artifact(&target, kind)
    }

    /// The artifact's file name in the artifact directory.
    fn artifact_name(&self, hash: &str, kind: ModuleKind) -> Option<String> {
        let ext = self.engine.artifact_extension()?;
        self.artifact_fd.as_ref()?;
        Some(match kind {
            ModuleKind::Command => format!("{hash}.{ext}"),
            ModuleKind::Session => format!("{hash}.session.{ext}"),
        })
    }
}

/// Lowercase hex SHA-256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    let mut out = String::with_capacity(64);
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn read_module(path: &Path, file: Option<fs::File>, limit: u64) -> Result<Vec<u8>, PrepareError> {
    let read_err = |source| PrepareError::Read { path: path.into(), source };
    let file = match file {
        Some(file) => file,
        None => fs::File::open(path).map_err(read_err)?,
    };
    let mut wasm = Vec::new();
    file.take(limit + 1).read_to_end(&mut wasm).map_err(read_err)?;
    if wasm.len() as u64 > limit {
        return Err(PrepareError::TooLarge { path: path.into(), limit });
    }
    Ok(wasm)
}

/// Creates `path` (mode 0700) if needed and checks that it belongs to the current user, or
/// to `owner`, to whom a directory this process just created is handed over.
fn create_private_dir(path: &Path, owner: Option<(u32, u32)>) -> Result<(), CacheDirError> {
    let create_err = |source| CacheDirError::Create { path: path.into(), source };
    fs::DirBuilder::new().recursive(true).mode(0o700).create(path).map_err(create_err)?;
    let euid = nix::unistd::geteuid().as_raw();
    let mut uid = euid;
    if let Some((owner_uid, owner_gid)) = owner {
        uid = owner_uid;
        let meta = fs::symlink_metadata(path).map_err(create_err)?;
        if meta.is_dir() && meta.uid() == euid {
            std::os::unix::fs::lchown(path, Some(owner_uid), Some(owner_gid)).map_err(create_err)?;
        }
    }
    let meta = fs::symlink_metadata(path).map_err(create_err)?;
    if !meta.is_dir() || meta.uid() != uid || meta.mode() & 0o022 != 0 {
        return Err(CacheDirError::Untrusted { path: path.into(), uid });
    }
    Ok(())
}

/// A regular file (not a link) owned by this uid and writable by nobody else.
fn is_trusted_artifact(artifact: &ArtifactFile<'_>) -> bool {
    use nix::sys::stat::{FileStat, SFlag};
    let at = nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW;
    match nix::sys::stat::fstatat(artifact.dir, artifact.name, at) {
        Ok(FileStat { st_mode, st_uid, .. }) => {
            SFlag::from_bits_truncate(st_mode & SFlag::S_IFMT.bits()) == SFlag::S_IFREG
                && st_uid == nix::unistd::geteuid().as_raw()
                && st_mode & 0o022 == 0
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::wasmtime::WasmtimeEngine;
    use std::os::unix::fs::PermissionsExt;

    fn module_file(dir: &Path, wat: &str) -> ModuleRef {
        let wasm = wat::parse_str(wat).unwrap();
        let path = dir.join("m.wasm");
        fs::write(&path, &wasm).unwrap();
        ModuleRef { path, sha256: sha256_hex(&wasm) }
    }

    #[test]
    fn memory_then_artifact_then_compile() {
        let tmp = tempfile::tempdir().unwrap();
        let m = module_file(tmp.path(), r#"(module (func (export "_start")))"#);
        let cache_dir = tmp.path().join("cache");
        let mut a = ModuleCache::new(WasmtimeEngine::new(false).unwrap(), Some(&cache_dir), 4, 1 << 20).unwrap();
        assert_eq!(a.get(&m, None, None, ModuleKind::Command).unwrap().1, ModuleSource::Compiled);
        assert_eq!(a.get(&m, None, None, ModuleKind::Command).unwrap().1, ModuleSource::Memory);
        // A second worker finds the artifact the first one wrote.
        let mut b = ModuleCache::new(WasmtimeEngine::new(false).unwrap(), Some(&cache_dir), 4, 1 << 20).unwrap();
        assert_eq!(b.get(&m, None, None, ModuleKind::Command).unwrap().1, ModuleSource::Artifact);
        let artifact = b.artifact_dir().unwrap().join(b.artifact_name(&m.sha256, ModuleKind::Command).unwrap());
        assert_eq!(fs::metadata(&artifact).unwrap().mode() & 0o077, 0, "artifact must be owner-only");
        // An artifact others can write is never loaded.
        fs::set_permissions(&artifact, fs::Permissions::from_mode(0o666)).unwrap();
        let mut c = ModuleCache::new(WasmtimeEngine::new(false).unwrap(), Some(&cache_dir), 4, 1 << 20).unwrap();
        assert_eq!(c.get(&m, None, None, ModuleKind::Command).unwrap().1, ModuleSource::Compiled);
    }

    #[test]
    fn changed_file_and_bad_hash_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let mut m = module_file(tmp.path(), r#"(module (func (export "_start")))"#);
        let mut cache = ModuleCache::new(WasmtimeEngine::new(false).unwrap(), None, 4, 1 << 20).unwrap();
        let good = m.sha256.clone();
        m.sha256 = "0".repeat(64);
        assert!(matches!(cache.get(&m, None, None, ModuleKind::Command), Err(PrepareError::Changed)));
        m.sha256 = "../../etc/passwd".into();
        assert!(matches!(cache.get(&m, None, None, ModuleKind::Command), Err(PrepareError::BadHash)));
        m.sha256 = good;
        assert!(cache.get(&m, None, None, ModuleKind::Command).is_ok());
    }

    #[test]
    fn lru_evicts_least_recently_used() {
        let tmp = tempfile::tempdir().unwrap();
        let mut cache = ModuleCache::new(WasmtimeEngine::new(false).unwrap(), None, 2, 1 << 20).unwrap();
        let refs: Vec<ModuleRef> = (0..3)
            .map(|i| {
                let dir = tmp.path().join(i.to_string());
                fs::create_dir(&dir).unwrap();
                module_file(&dir, &format!(r#"(module (func (export "_start")) (func (export "f{i}")))"#))
            })
            .collect();
        cache.get(&refs[0], None, None, ModuleKind::Command).unwrap();
        cache.get(&refs[1], None, None, ModuleKind::Command).unwrap();
        cache.get(&refs[0], None, None, ModuleKind::Command).unwrap();
        cache.get(&refs[2], None, None, ModuleKind::Command).unwrap(); // evicts 1
        assert_eq!(cache.get(&refs[0], None, None, ModuleKind::Command).unwrap().1, ModuleSource::Memory);
        assert_eq!(cache.get(&refs[1], None, None, ModuleKind::Command).unwrap().1, ModuleSource::Compiled);
    }
}
