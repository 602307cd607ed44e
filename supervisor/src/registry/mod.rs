//! The function registry: maps a function name to its module (path + content hash) and
//! its config, straight from the functions directory.
//!
//! Every lookup stats the module and its config (a microsecond on a local disk); only when
//! the file identity or timestamps changed is the module re-read and re-hashed. So a module
//! dropped into the directory, or replaced, is served on the next request without a
//! restart, and a deleted one stops being served and leaves the cache.

pub mod function_config;
pub mod name;

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};
use wasmbox_protocol::ModuleRef;

pub use function_config::{FunctionConfig, FunctionLimits};
pub use name::{FunctionName, NameError};

/// Why a function could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("no function named {0}")]
    NotFound(FunctionName),
    #[error("module of {name} is {size} bytes, more than the limit of {limit}")]
    ModuleTooLarge { name: FunctionName, size: u64, limit: u64 },
    #[error("config of {name} is invalid: {message}")]
    InvalidConfig { name: FunctionName, message: String },
    #[error("cannot read {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A function ready to be dispatched.
#[derive(Debug)]
pub struct Function {
    pub name: FunctionName,
    pub module: ModuleRef,
    pub module_size: u64,
    pub config: FunctionConfig,
    stamps: Stamps,
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

pub struct Registry {
    dir: PathBuf,
    max_module_bytes: u64,
    functions: Mutex<HashMap<FunctionName, Arc<Function>>>,
}

impl Registry {
    /// `dir` is made absolute so workers (another cwd some day) get absolute paths.
    pub fn new(dir: &Path, max_module_bytes: u64) -> io::Result<Self> {
        let dir = std::path::absolute(dir)?;
        Ok(Registry { dir, max_module_bytes, functions: Mutex::new(HashMap::new()) })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<FunctionName, Arc<Function>>> {
        self.functions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Resolves a function, re-reading its files only when they changed.
    pub async fn lookup(&self, name: &FunctionName) -> Result<Arc<Function>, RegistryError> {
        let (module_path, config_path) = self.paths(name);
        let stamps = match current_stamps(&module_path, &config_path) {
            Ok(Some(stamps)) => stamps,
            Ok(None) => {
                self.lock().remove(name);
                return Err(RegistryError::NotFound(name.clone()));
            }
            Err(e) => return Err(e),
        };
        if let Some(found) = self.lock().get(name).filter(|f| f.stamps == stamps) {
            return Ok(found.clone());
        }
        if stamps.module.size > self.max_module_bytes {
            return Err(RegistryError::ModuleTooLarge {
                name: name.clone(),
                size: stamps.module.size,
                limit: self.max_module_bytes,
            });
        }
        let (name_owned, base, limit) = (name.clone(), self.dir.clone(), self.max_module_bytes);
        let loaded =
            tokio::task::spawn_blocking(move || load(name_owned, &base, module_path, config_path, stamps, limit))
                .await
                .map_err(|e| RegistryError::Io { path: self.dir.clone(), source: io::Error::other(e) })??;
        let loaded = Arc::new(loaded);
        self.lock().insert(name.clone(), loaded.clone());
        Ok(loaded)
    }

    /// Forgets a function so the next lookup re-reads it (its file changed under a worker).
    pub fn invalidate(&self, name: &FunctionName) {
        self.lock().remove(name);
    }

    /// Number of functions currently known.
    pub fn cached(&self) -> usize {
        self.lock().len()
    }

    fn paths(&self, name: &FunctionName) -> (PathBuf, PathBuf) {
        (self.dir.join(format!("{name}.wasm")), self.dir.join(format!("{name}.toml")))
    }
}

/// Stats module and config; `None` when there is no module (a file, following links).
fn current_stamps(module: &Path, config: &Path) -> Result<Option<Stamps>, RegistryError> {
    let module = match fs::metadata(module) {
        Ok(meta) if meta.is_file() => Stamp::of(&meta),
        Ok(_) => return Ok(None),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(RegistryError::Io { path: module.into(), source }),
    };
    let config = match fs::metadata(config) {
        Ok(meta) => Some(Stamp::of(&meta)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(source) => return Err(RegistryError::Io { path: config.into(), source }),
    };
    Ok(Some(Stamps { module, config }))
}

fn load(
    name: FunctionName,
    base: &Path,
    module_path: PathBuf,
    config_path: PathBuf,
    stamps: Stamps,
    limit: u64,
) -> Result<Function, RegistryError> {
    let config = match stamps.config {
        None => FunctionConfig::default(),
        Some(_) => {
            let text = read_bounded(&config_path, function_config::MAX_CONFIG_BYTES)?;
            // Never parse a cut-off prefix: it can be valid TOML that drops the rest.
            if text.len() as u64 > function_config::MAX_CONFIG_BYTES {
                let message = format!("larger than the limit of {} bytes", function_config::MAX_CONFIG_BYTES);
                return Err(RegistryError::InvalidConfig { name, message });
            }
            let text = String::from_utf8(text)
                .map_err(|_| RegistryError::InvalidConfig { name: name.clone(), message: "not UTF-8".into() })?;
            function_config::parse(&text, base)
                .map_err(|message| RegistryError::InvalidConfig { name: name.clone(), message })?
        }
    };
    let bytes = read_bounded(&module_path, limit)?;
    if bytes.len() as u64 > limit {
        return Err(RegistryError::ModuleTooLarge { name, size: bytes.len() as u64, limit });
    }
    let sha256 = sha256_hex(&bytes);
    Ok(Function {
        name,
        module: ModuleRef { path: module_path, sha256 },
        module_size: bytes.len() as u64,
        config,
        stamps,
    })
}

/// Reads at most `limit + 1` bytes, so an oversized file is detected without reading it all.
fn read_bounded(path: &Path, limit: u64) -> Result<Vec<u8>, RegistryError> {
    let io_err = |source| RegistryError::Io { path: path.into(), source };
    let mut out = Vec::new();
    fs::File::open(path).map_err(io_err)?.take(limit + 1).read_to_end(&mut out).map_err(io_err)?;
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
