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

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use serde_json::json;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::error::ApiError;
use super::request::{self, AdminRequest};
use super::routes::{json_response, read_body};
use crate::App;
use crate::service::admin;

/// Serves one request under `/admin`: the caller is authorized first, then the request is
/// parsed and executed.
pub async fn route(
    app: &Arc<App>,
    req: Request<Incoming>,
    request_id: &str,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let path = req.uri().path().to_owned();
    authorize(app, req.headers(), &path)?;
    let engine = || app.pool.engine().map(|(engine, version)| json!({"name": engine, "version": version}));
    match request::admin(req.method(), &path)? {
        AdminRequest::List => {
            let functions: Vec<serde_json::Value> = admin::list(app)
                .await?
                .into_iter()
                .map(|(name, described)| match described {
                    Ok(info) => serde_json::to_value(info).unwrap_or_default(),
                    Err(e) => {
                        let e = ApiError::from(e);
                        json!({"name": name.as_str(), "error": e.kind(), "message": e.to_string()})
                    }
                })
                .collect();
            Ok(json_response(StatusCode::OK, &json!({"functions": functions, "engine": engine()})))
        }
        AdminRequest::Describe(name) => {
            let info = admin::describe(app, &name).await?;
            Ok(json_response(StatusCode::OK, &serde_json::to_value(info).unwrap_or_default()))
        }
        AdminRequest::Upload(name) => {
            let (parts, body) = req.into_parts();
            let upload = read_body(app, &parts, body, app.config.max_module_bytes).await?;
            let uploaded = admin::upload(app, &name, upload.bytes.clone(), request_id).await?;
            let status = if uploaded.replaced { StatusCode::OK } else { StatusCode::CREATED };
            let mut body = serde_json::to_value(&uploaded).unwrap_or_default();
            body["engine"] = engine().unwrap_or_default();
            Ok(json_response(status, &body))
        }
        AdminRequest::Delete(name) => {
            admin::delete(app, &name, request_id).await?;
            let mut response = Response::new(Full::new(Bytes::new()));
            *response.status_mut() = StatusCode::NO_CONTENT;
            Ok(response)
        }
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
}
