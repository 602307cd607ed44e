//! The module management API, on only when `WASMBOX_ADMIN_TOKEN` is set:
//!
//! - `PUT /admin/functions/{name}`: the body is a `.wasm` module (at most
//!   `WASMBOX_MAX_MODULE_BYTES`). It is written under a hidden staging name in the functions
//!   directory, then a worker from the pool validates and compiles it (writing the engine
//!   artifact to the cache, under the worker's own limits and sandbox) without running it.
//!   Only then is it renamed over `{name}.wasm`: invocations see the old module or the new
//!   one, never a partial or an invalid one. 201 when new, 200 when it replaced one.
//! - `DELETE /admin/functions/{name}`: removes the module and its config; 204.
//! - `GET /admin/functions[/{name}]`: name, SHA-256, size, config, artifacts in the cache.
//!
//! Every request needs `Authorization: Bearer <token>`, compared in constant time (over
//! SHA-256 digests, so neither content nor length leaks through timing). Uploads and
//! deletions are serialized; the functions directory stays a source of its own (a mounted
//! volume): files that appear in it are served and listed the same way.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use wasmbox_protocol::ModuleRef;

use super::error::ApiError;
use super::routes::{json_response, read_body, registry_error};
use crate::App;
use crate::registry::{FunctionName, sha256_hex};

/// The path prefix of the API.
pub const PREFIX: &str = "/admin";
const FUNCTIONS: &str = "/admin/functions";
/// Staged uploads: a name no function can have (names start with a letter or digit).
const STAGING_PREFIX: &str = ".upload-";

/// Serves one request under [`PREFIX`].
pub async fn route(
    app: &Arc<App>,
    req: Request<Incoming>,
    request_id: &str,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let path = req.uri().path().to_owned();
    authorize(app, req.headers(), &path)?;
    let name = match path.strip_prefix(FUNCTIONS) {
        Some("") | Some("/") => None,
        Some(rest) if rest.starts_with('/') => {
            Some(FunctionName::parse(&rest[1..]).map_err(|e| ApiError::InvalidFunctionName(e.to_string()))?)
        }
        _ => return Err(ApiError::RouteNotFound(path)),
    };
    match (req.method().clone(), name) {
        (Method::GET, None) => list(app).await,
        (Method::GET, Some(name)) => {
            let entry = describe(app, &name, &artifacts(app).await).await?;
            Ok(json_response(StatusCode::OK, &entry))
        }
        (Method::PUT, Some(name)) => upload(app, req, name, request_id).await,
        (Method::DELETE, Some(name)) => delete(app, name, request_id).await,
        (other, None) => Err(ApiError::MethodNotAllowed { method: other.to_string(), allow: "GET" }),
        (other, Some(_)) => Err(ApiError::MethodNotAllowed { method: other.to_string(), allow: "GET, PUT, DELETE" }),
    }
}

/// 404 while the API is off (it does not exist then), 401 without the right token.
fn authorize(app: &App, headers: &HeaderMap, path: &str) -> Result<(), ApiError> {
    let Some(token) = app.config.admin_token() else {
        return Err(ApiError::RouteNotFound(format!("{path} (the admin API is off: set WASMBOX_ADMIN_TOKEN)")));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, credentials)| credentials.trim());
    match given {
        None => Err(ApiError::Unauthorized("an Authorization: Bearer token is required")),
        Some(given) if token_matches(given, token) => Ok(()),
        Some(_) => Err(ApiError::Unauthorized("the bearer token is not the admin token")),
    }
}

/// Constant-time in the content and the length of both.
fn token_matches(given: &str, token: &str) -> bool {
    let (a, b) = (Sha256::digest(given.as_bytes()), Sha256::digest(token.as_bytes()));
    bool::from(a.as_slice().ct_eq(b.as_slice()))
}

async fn upload(
    app: &Arc<App>,
    req: Request<Incoming>,
    name: FunctionName,
    request_id: &str,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let (parts, body) = req.into_parts();
    let upload = read_body(app, &parts, body, app.config.max_module_bytes).await?;
    let wasm = upload.bytes.clone();
    if !wasm.starts_with(b"\0asm") {
        return Err(ApiError::InvalidModule("not a WebAssembly binary (it does not start with \\0asm)".into()));
    }
    let sha256 = sha256_hex(&wasm);
    let _one_at_a_time = app.admin.lock().await;
    let dir = app.registry.dir().to_path_buf();
    let staged = dir.join(format!("{STAGING_PREFIX}{}.part", uuid::Uuid::new_v4().simple()));
    let target = dir.join(format!("{name}.wasm"));
    let write = {
        let (staged, wasm) = (staged.clone(), wasm.clone());
        tokio::task::spawn_blocking(move || write_new(&staged, &wasm))
    };
    write.await.map_err(|e| ApiError::Internal(format!("staging task failed: {e}")))?.map_err(|e| {
        tracing::error!(dir = %dir.display(), error = %e, "cannot stage an upload in the functions directory");
        ApiError::Internal("cannot write to the functions directory".into())
    })?;
    let prepared = prepare(app, &name, &staged, &sha256).await;
    let source = match prepared {
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
        return Err(ApiError::Internal("cannot move the module into place".into()));
    }
    app.registry.invalidate(&name);
    tracing::info!(request_id, function = %name, %sha256, size = wasm.len(), replaced, "module uploaded");
    let status = if replaced { StatusCode::OK } else { StatusCode::CREATED };
    let body = json!({
        "name": name.as_str(),
        "sha256": sha256,
        "size": wasm.len(),
        "replaced": replaced,
        "module_source": source,
        "engine": app.pool.engine().map(|(engine, version)| json!({"name": engine, "version": version})),
    });
    Ok(json_response(status, &body))
}

/// Has the trusted compiler validate and compile the staged module for the function's
/// tenant (the one its config names when the function exists, else the function itself),
/// without running it; returns whether it was compiled now or its artifact was there.
async fn prepare(app: &Arc<App>, name: &FunctionName, staged: &Path, sha256: &str) -> Result<&'static str, ApiError> {
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

async fn delete(app: &Arc<App>, name: FunctionName, request_id: &str) -> Result<Response<Full<Bytes>>, ApiError> {
    let _one_at_a_time = app.admin.lock().await;
    let dir = app.registry.dir().to_path_buf();
    let module = dir.join(format!("{name}.wasm"));
    let config = dir.join(format!("{name}.toml"));
    match std::fs::remove_file(&module) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(ApiError::FunctionNotFound(name.to_string())),
        Err(e) => {
            tracing::error!(path = %module.display(), error = %e, "cannot delete a module");
            return Err(ApiError::Internal("cannot delete the module".into()));
        }
    }
    let _ = std::fs::remove_file(&config);
    app.registry.invalidate(&name);
    tracing::info!(request_id, function = %name, "module deleted");
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::NO_CONTENT;
    Ok(response)
}

async fn list(app: &Arc<App>) -> Result<Response<Full<Bytes>>, ApiError> {
    let dir = app.registry.dir().to_path_buf();
    let names = tokio::task::spawn_blocking(move || function_names(&dir))
        .await
        .map_err(|e| ApiError::Internal(format!("listing task failed: {e}")))?;
    let artifacts = artifacts(app).await;
    let mut functions = Vec::with_capacity(names.len());
    for name in names {
        match describe(app, &name, &artifacts).await {
            Ok(entry) => functions.push(entry),
            // Deleted between the listing and the read.
            Err(ApiError::FunctionNotFound(_)) => {}
            Err(e) => functions.push(json!({"name": name.as_str(), "error": e.kind(), "message": e.to_string()})),
        }
    }
    let engine = app.pool.engine().map(|(engine, version)| json!({"name": engine, "version": version}));
    Ok(json_response(StatusCode::OK, &json!({"functions": functions, "engine": engine})))
}

async fn describe(app: &Arc<App>, name: &FunctionName, artifacts: &Artifacts) -> Result<Value, ApiError> {
    let function = match app.registry.lookup(name).await {
        Ok(function) => function,
        // The operator holding the admin token may see why a config was refused; anonymous
        // callers of the function only learn that it was.
        Err(crate::registry::RegistryError::InvalidConfig { message, .. }) => {
            return Err(ApiError::InvalidFunctionConfig(message));
        }
        Err(e) => return Err(registry_error(e)),
    };
    let config = app.registry.dir().join(format!("{name}.toml")).exists();
    Ok(json!({
        "name": name.as_str(),
        "tenant": function.tenant(),
        "sha256": function.module.sha256,
        "size": function.module_size,
        "config": config,
        "artifacts": artifacts.get(&function.module.sha256).cloned().unwrap_or_default(),
    }))
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

async fn artifacts(app: &Arc<App>) -> Artifacts {
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

/// The header a 401 carries.
pub fn www_authenticate() -> HeaderValue {
    HeaderValue::from_static("Bearer realm=\"wasmbox-admin\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_match_only_exactly() {
        let token = "s3cret-token-0123456789";
        assert!(token_matches(token, token));
        assert!(!token_matches("s3cret-token-012345678", token));
        assert!(!token_matches("s3cret-token-01234567890", token));
        assert!(!token_matches("", token));
        assert!(!token_matches("S3CRET-TOKEN-0123456789", token));
    }

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
