//! Module management (the admin API's work): publish an uploaded module once the trusted
//! compiler has validated and compiled it, delete one, and describe what the functions
//! directory and the artifact store hold. The functions directory stays a source of its
//! own (a mounted volume): files that appear in it are served and listed the same way.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use wasmbox_protocol::ModuleRef;

use super::ServiceError;
use crate::App;
use crate::compiler::CompileError;
use crate::registry::{FunctionName, RegistryError, sha256_hex};

/// Staged uploads: a name no function can have (names start with a letter or digit).
const STAGING_PREFIX: &str = ".upload-";

/// A module that was published.
#[derive(Debug, serde::Serialize)]
pub struct Uploaded {
    pub name: String,
    pub sha256: String,
    pub size: usize,
    pub replaced: bool,
    /// `compiled` now, or its `artifact` was in the store already.
    pub module_source: &'static str,
}

/// Publishes `wasm` as function `name`. It is written under a hidden staging name in the
/// functions directory, then the trusted compiler validates and compiles it for the
/// function's tenant without running it. Only then is it renamed over `{name}.wasm`:
/// invocations see the old module or the new one, never a partial or an invalid one.
/// Uploads and deletions are serialized.
pub async fn upload(app: &App, name: &FunctionName, wasm: Bytes, request_id: &str) -> Result<Uploaded, ServiceError> {
    if !wasm.starts_with(b"\0asm") {
        return Err(CompileError::Invalid("not a WebAssembly binary (it does not start with \\0asm)".into()).into());
    }
    super::invoke::runnable(app.engine, name, crate::registry::is_component(&wasm), crate::compiler::Kind::Command)?;
    let sha256 = sha256_hex(&wasm);
    let _one_at_a_time = app.admin.lock().await;
    let dir = app.registry.dir().to_path_buf();
    let staged = dir.join(format!("{STAGING_PREFIX}{}.part", uuid::Uuid::new_v4().simple()));
    let target = dir.join(format!("{name}.wasm"));
    let write = {
        let (staged, wasm) = (staged.clone(), wasm.clone());
        tokio::task::spawn_blocking(move || write_new(&staged, &wasm))
    };
    write.await.map_err(|e| ServiceError::Internal(format!("staging task failed: {e}")))?.map_err(|e| {
        tracing::error!(dir = %dir.display(), error = %e, "cannot stage an upload in the functions directory");
        ServiceError::Internal("cannot write to the functions directory".into())
    })?;
    let module_source = match prepare(app, name, &staged, &sha256).await {
        Ok(source) => source,
        Err(e) => {
            let _ = std::fs::remove_file(&staged);
            tracing::info!(request_id, function = %name, %sha256, error = %e, "upload refused");
            return Err(e);
        }
    };
    let replaced = target.exists();
    let publish = {
        let (staged, target, dir) = (staged.clone(), target.clone(), dir.clone());
        tokio::task::spawn_blocking(move || {
            std::fs::rename(&staged, &target)?;
            std::fs::File::open(&dir)?.sync_all()
        })
    };
    if let Err(e) = publish.await.map_err(std::io::Error::other).and_then(|r| r) {
        let _ = std::fs::remove_file(&staged);
        tracing::error!(function = %name, error = %e, "cannot move an upload into place");
        return Err(ServiceError::Internal("cannot move the module into place".into()));
    }
    app.registry.invalidate(name);
    tracing::info!(request_id, function = %name, %sha256, size = wasm.len(), replaced, "module uploaded");
    Ok(Uploaded { name: name.to_string(), sha256, size: wasm.len(), replaced, module_source })
}

/// Has the trusted compiler validate and compile the staged module for the function's
/// tenant (the one its config names when the function exists, else the function itself),
/// without running it; returns whether it was compiled now or its artifact was there.
async fn prepare(app: &App, name: &FunctionName, staged: &Path, sha256: &str) -> Result<&'static str, ServiceError> {
    let tenant = match app.registry.lookup(name).await {
        Ok(function) => function.tenant().to_owned(),
        Err(_) => name.to_string(),
    };
    let module = ModuleRef { path: staged.to_path_buf(), sha256: sha256.to_owned() };
    let (_, compiled) = app.compiler.prepare(&tenant, &module, crate::compiler::Kind::Command).await?;
    Ok(if compiled { "compiled" } else { "artifact" })
}

/// Creates `path` (it must not exist), writes and syncs it.
fn write_new(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o644).open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// Removes the module `name` and its config.
pub async fn delete(app: &App, name: &FunctionName, request_id: &str) -> Result<(), ServiceError> {
    let _one_at_a_time = app.admin.lock().await;
    let dir = app.registry.dir().to_path_buf();
    let module = dir.join(format!("{name}.wasm"));
    let config = dir.join(format!("{name}.toml"));
    match std::fs::remove_file(&module) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(RegistryError::NotFound(name.clone()).into());
        }
        Err(e) => {
            tracing::error!(path = %module.display(), error = %e, "cannot delete a module");
            return Err(ServiceError::Internal("cannot delete the module".into()));
        }
    }
    let _ = std::fs::remove_file(&config);
    app.registry.invalidate(name);
    tracing::info!(request_id, function = %name, "module deleted");
    Ok(())
}

/// One function as the admin API lists it.
#[derive(Debug, serde::Serialize)]
pub struct FunctionInfo {
    pub name: String,
    pub tenant: String,
    pub sha256: String,
    pub size: u64,
    /// Whether it has a `name.toml`.
    pub config: bool,
    /// Where the artifact store holds a compile of it (`<engine>-<version>/<tenant>`).
    pub artifacts: Vec<String>,
}

/// Every function in the functions directory: its description, or why there is none.
pub async fn list(app: &App) -> Result<Vec<(FunctionName, Result<FunctionInfo, ServiceError>)>, ServiceError> {
    let dir = app.registry.dir().to_path_buf();
    let names = tokio::task::spawn_blocking(move || function_names(&dir))
        .await
        .map_err(|e| ServiceError::Internal(format!("listing task failed: {e}")))?;
    let artifacts = artifacts(app).await;
    let mut functions = Vec::with_capacity(names.len());
    for name in names {
        match describe_with(app, &name, &artifacts).await {
            // Deleted between the listing and the read.
            Err(ServiceError::Registry(RegistryError::NotFound(_))) => {}
            other => functions.push((name, other)),
        }
    }
    Ok(functions)
}

/// One function's description.
pub async fn describe(app: &App, name: &FunctionName) -> Result<FunctionInfo, ServiceError> {
    describe_with(app, name, &artifacts(app).await).await
}

async fn describe_with(app: &App, name: &FunctionName, artifacts: &Artifacts) -> Result<FunctionInfo, ServiceError> {
    let function = match app.registry.lookup(name).await {
        Ok(function) => function,
        // The operator holding the admin token may see why a config was refused; anonymous
        // callers of the function only learn that it was.
        Err(RegistryError::InvalidConfig { message, .. }) => return Err(ServiceError::ConfigRefused(message)),
        Err(e) => return Err(e.into()),
    };
    let config = app.registry.dir().join(format!("{name}.toml")).exists();
    Ok(FunctionInfo {
        name: name.to_string(),
        tenant: function.tenant().to_owned(),
        sha256: function.module.sha256.clone(),
        size: function.module_size,
        config,
        artifacts: artifacts.get(&function.module.sha256).cloned().unwrap_or_default(),
    })
}

/// The valid function names with a module in `dir`, sorted.
fn function_names(dir: &Path) -> Vec<FunctionName> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut names: Vec<FunctionName> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.strip_suffix(".wasm").and_then(|n| FunctionName::parse(n).ok()))
        .collect();
    names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    names
}

/// Module hash to where the artifact store holds a compile of it
/// (`<engine>-<version>/<tenant>`).
type Artifacts = BTreeMap<String, Vec<String>>;

async fn artifacts(app: &App) -> Artifacts {
    let root = app.config.resolved_cache_dir().join("artifacts");
    tokio::task::spawn_blocking(move || scan_artifacts(&root)).await.unwrap_or_default()
}

/// Lists `<root>/<engine>-<version>/<tenant>/<sha256>[.session].<ext>` with its record.
fn scan_artifacts(root: &Path) -> Artifacts {
    let mut found = Artifacts::new();
    let subdirs = |dir: &Path| -> Vec<(String, PathBuf)> {
        let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
        entries
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
            .collect()
    };
    for (engine, engine_dir) in subdirs(root) {
        for (tenant, tenant_dir) in subdirs(&engine_dir) {
            let Ok(files) = std::fs::read_dir(&tenant_dir) else { continue };
            let names: Vec<String> = files.filter_map(|f| f.ok()?.file_name().into_string().ok()).collect();
            for name in &names {
                let Some((hash, ext)) = name.split_once('.') else { continue };
                let recorded = names.contains(&format!("{name}.json"));
                if hash.len() == 64 && !ext.contains("tmp") && !ext.ends_with(".json") && recorded {
                    found.entry(hash.to_owned()).or_default().push(format!("{engine}/{tenant}"));
                }
            }
        }
    }
    found
}

/// Removes uploads a previous run left staged (it stopped between staging and publishing).
pub fn remove_stale_uploads(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.filter_map(|e| e.ok()) {
        let path: PathBuf = entry.path();
        if entry.file_name().to_str().is_some_and(|n| n.starts_with(STAGING_PREFIX) && n.ends_with(".part")) {
            match std::fs::remove_file(&path) {
                Ok(()) => tracing::info!(path = %path.display(), "removed an upload a previous run left staged"),
                Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot remove a stale staged upload"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listing_skips_staged_uploads_and_invalid_names() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["b.wasm", "a.wasm", ".upload-1.part", "-x.wasm", "c.toml", "d.wasm.tmp"] {
            std::fs::write(dir.path().join(f), b"x").unwrap();
        }
        let names: Vec<String> = function_names(dir.path()).iter().map(|n| n.to_string()).collect();
        assert_eq!(names, ["a", "b"]);
        remove_stale_uploads(dir.path());
        assert!(!dir.path().join(".upload-1.part").exists());
        assert!(dir.path().join("a.wasm").exists());
    }

    #[test]
    fn artifacts_are_found_per_engine_and_tenant() {
        let root = tempfile::tempdir().unwrap();
        let hash = "a".repeat(64);
        for (dir, file, record) in [
            ("wasmtime-48/acme", format!("{hash}.cwasm"), true),
            ("wasmtime-48/hello", format!("{hash}.session.cwasm"), true),
            ("wasmtime-48/other", format!("{hash}.cwasm"), false),
            ("wasmedge-0.17.1/acme", format!("{hash}.tmp-12.so"), true),
        ] {
            let dir = root.path().join(dir);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(&file), b"").unwrap();
            if record {
                std::fs::write(dir.join(format!("{file}.json")), b"{}").unwrap();
            }
        }
        let mut found = scan_artifacts(root.path()).remove(&hash).unwrap();
        found.sort();
        assert_eq!(found, ["wasmtime-48/acme", "wasmtime-48/hello"], "only recorded artifacts count");
    }
}
