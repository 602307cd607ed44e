//! Turning request parts into a typed request ([`Parsed`]): which operation, on what, with
//! which inputs (function name, argv from the query string, per-invocation limits from the
//! `cpu_quota`, `Memory-Request` and `Timeout-Ms` headers). Nothing here touches the
//! filesystem or the server's state; bodies are read later, by the operation that needs one.

use http::{HeaderMap, Method};

use super::error::ApiError;
use crate::config::LimitDefaults;
use crate::limits::{Limit, Requested};
use crate::registry::{FunctionLimits, FunctionName};

/// Most `arg` parameters per request, and their total size.
pub const MAX_ARGS: usize = 1024;
pub const MAX_ARGS_BYTES: usize = 64 * 1024;

/// Limit headers, spelled as the original WasmBox interface spells them (matched
/// case-insensitively).
pub const CPU_QUOTA: &str = "cpu_quota";
pub const MEMORY_REQUEST: &str = "Memory-Request";
pub const TIMEOUT_MS: &str = "Timeout-Ms";

/// What a request asks for.
#[derive(Debug)]
pub enum Parsed {
    /// `/healthz`, `/ready`, `/metrics` (served on both listeners).
    Probe(Probe),
    /// `GET /stats`.
    Stats,
    /// `POST /{function}` (body = stdin) or `GET /{function}` (no stdin).
    Invoke(InvokeRequest),
    /// Under `/sessions`.
    Session(SessionRequest),
    /// Under `/admin`; parsed further only once the caller is authorized (an anonymous
    /// caller learns nothing of the API's routes).
    Admin,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    Healthz,
    Ready,
    Metrics,
}

/// A request for `/{function}[/{rest}]`: a command invocation, or a request for a
/// `wasi:http` component; which one is known once the function is.
#[derive(Debug)]
pub struct InvokeRequest {
    pub name: FunctionName,
    /// The path below the function's mount (`/{rest}`), if any.
    pub rest: Option<String>,
    pub limits: Requested,
}

impl InvokeRequest {
    /// What a command invocation takes from the request: argv[1..] from `?arg=` (`None`:
    /// the function's default arguments), and whether the body is stdin (POST; GET runs
    /// it with none). Anything else (a path below the function, another method) is
    /// refused as before components existed.
    pub fn command(
        &self,
        method: &Method,
        path: &str,
        query: Option<&str>,
    ) -> Result<(Option<Vec<String>>, bool), ApiError> {
        if self.rest.is_some() {
            return Err(ApiError::InvalidFunctionName(format!(
                "{path}: a path below a function is served only for wasi:http components"
            )));
        }
        let with_body = match *method {
            Method::POST => true,
            Method::GET => false,
            ref other => return Err(ApiError::MethodNotAllowed { method: other.to_string(), allow: "GET, POST" }),
        };
        Ok((query_args(query)?, with_body))
    }
}

/// A session operation (`/sessions/{function}[/{id}[/snapshot]]`).
#[derive(Debug)]
pub enum SessionRequest {
    Create { name: FunctionName, limits: Requested },
    Message { name: FunctionName, id: String, limits: Requested },
    Info { name: FunctionName, id: String },
    Delete { name: FunctionName, id: String },
    Export { name: FunctionName, id: String },
    Import { name: FunctionName, id: String, limits: Requested },
}

/// A module management operation (`/admin/functions[/{name}]`).
#[derive(Debug)]
pub enum AdminRequest {
    List,
    Describe(FunctionName),
    Upload(FunctionName),
    Delete(FunctionName),
}

pub const SESSIONS_PREFIX: &str = "/sessions";
pub const ADMIN_PREFIX: &str = "/admin";
const ADMIN_FUNCTIONS: &str = "/admin/functions";

/// Parses a request on the main listener.
pub fn parse(method: &Method, path: &str, headers: &HeaderMap) -> Result<Parsed, ApiError> {
    if let Some(probe) = probe(method, path) {
        return probe.map(Parsed::Probe);
    }
    match path {
        "/stats" => {
            only_get(method)?;
            Ok(Parsed::Stats)
        }
        "/" => Err(ApiError::RouteNotFound("/".into())),
        _ if path == ADMIN_PREFIX || path.starts_with("/admin/") => Ok(Parsed::Admin),
        _ if path == SESSIONS_PREFIX || path.starts_with("/sessions/") => {
            session(method, path, headers).map(Parsed::Session)
        }
        _ => {
            // `/{function}` or `/{function}/{rest...}`: the name is checked as sent.
            let (mount, rest) = match path.get(1..).and_then(|p| p.find('/')) {
                Some(i) => (&path[..=i], Some(path[i + 1..].to_owned())),
                None => (path, None),
            };
            let name = function_name(mount)?;
            Ok(Parsed::Invoke(InvokeRequest { name, rest, limits: requested_limits(headers)? }))
        }
    }
}

/// A probe path (`None`: not one), or why its method is refused.
pub fn probe(method: &Method, path: &str) -> Option<Result<Probe, ApiError>> {
    let probe = match path {
        "/healthz" => Probe::Healthz,
        "/ready" => Probe::Ready,
        "/metrics" => Probe::Metrics,
        _ => return None,
    };
    Some(only_get(method).map(|()| probe))
}

fn only_get(method: &Method) -> Result<(), ApiError> {
    if method == Method::GET {
        Ok(())
    } else {
        Err(ApiError::MethodNotAllowed { method: method.to_string(), allow: "GET" })
    }
}

fn session(method: &Method, path: &str, headers: &HeaderMap) -> Result<SessionRequest, ApiError> {
    let rest = path.strip_prefix(SESSIONS_PREFIX).unwrap_or_default();
    let parts: Vec<&str> = rest.strip_prefix('/').map(|r| r.split('/').collect()).unwrap_or_default();
    let name = |raw: &str| FunctionName::parse(raw).map_err(|e| ApiError::InvalidFunctionName(e.to_string()));
    let refused = |allow| Err(ApiError::MethodNotAllowed { method: method.to_string(), allow });
    match parts.as_slice() {
        [function] => {
            let name = name(function)?;
            match *method {
                Method::POST => Ok(SessionRequest::Create { name, limits: requested_limits(headers)? }),
                _ => refused("POST"),
            }
        }
        [function, id] => {
            let (name, id) = (name(function)?, (*id).to_owned());
            match *method {
                Method::POST => Ok(SessionRequest::Message { name, id, limits: requested_limits(headers)? }),
                Method::GET => Ok(SessionRequest::Info { name, id }),
                Method::DELETE => Ok(SessionRequest::Delete { name, id }),
                _ => refused("POST, GET, DELETE"),
            }
        }
        [function, id, "snapshot"] => {
            let (name, id) = (name(function)?, (*id).to_owned());
            match *method {
                Method::GET => Ok(SessionRequest::Export { name, id }),
                Method::PUT => Ok(SessionRequest::Import { name, id, limits: requested_limits(headers)? }),
                _ => refused("GET, PUT"),
            }
        }
        _ => Err(ApiError::RouteNotFound(path.to_owned())),
    }
}

/// Parses a request under [`ADMIN_PREFIX`] (its caller authorized).
pub fn admin(method: &Method, path: &str) -> Result<AdminRequest, ApiError> {
    let name = match path.strip_prefix(ADMIN_FUNCTIONS) {
        Some("") | Some("/") => None,
        Some(rest) if rest.starts_with('/') => {
            Some(FunctionName::parse(&rest[1..]).map_err(|e| ApiError::InvalidFunctionName(e.to_string()))?)
        }
        _ => return Err(ApiError::RouteNotFound(path.to_owned())),
    };
    match (method, name) {
        (&Method::GET, None) => Ok(AdminRequest::List),
        (&Method::GET, Some(name)) => Ok(AdminRequest::Describe(name)),
        (&Method::PUT, Some(name)) => Ok(AdminRequest::Upload(name)),
        (&Method::DELETE, Some(name)) => Ok(AdminRequest::Delete(name)),
        (other, None) => Err(ApiError::MethodNotAllowed { method: other.to_string(), allow: "GET" }),
        (other, Some(_)) => Err(ApiError::MethodNotAllowed { method: other.to_string(), allow: "GET, PUT, DELETE" }),
    }
}

/// The function named by a request path `/{name}`. The raw path is checked as sent:
/// percent-encoded bytes (`%2F`, `%00`) are not decoded first, so they are simply invalid.
pub fn function_name(path: &str) -> Result<FunctionName, ApiError> {
    let raw = path.strip_prefix('/').unwrap_or(path);
    FunctionName::parse(raw).map_err(|e| ApiError::InvalidFunctionName(e.to_string()))
}

/// argv[1..] from repeated `arg` query parameters, percent-decoded. Other parameters are
/// ignored so tooling may add cache-busters.
pub fn query_args(query: Option<&str>) -> Result<Option<Vec<String>>, ApiError> {
    let Some(query) = query else { return Ok(None) };
    let mut args = Vec::new();
    let mut total = 0usize;
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        if key != "arg" {
            continue;
        }
        if value.contains('\0') {
            return Err(ApiError::InvalidQuery("arg values must not contain NUL".into()));
        }
        total += value.len();
        if args.len() == MAX_ARGS || total > MAX_ARGS_BYTES {
            return Err(ApiError::InvalidQuery(format!("at most {MAX_ARGS} args of {MAX_ARGS_BYTES} bytes in total")));
        }
        args.push(value.into_owned());
    }
    Ok(if args.is_empty() { None } else { Some(args) })
}

pub use crate::limits::InvocationLimits;

/// The limits a request asks for in its `cpu_quota`, `Memory-Request` and `Timeout-Ms`
/// headers (each a positive integer, given at most once).
pub fn requested_limits(headers: &HeaderMap) -> Result<Requested, ApiError> {
    Ok(Requested {
        cpu_quota_millis: header_number(headers, CPU_QUOTA)?,
        memory_mb: header_number(headers, MEMORY_REQUEST)?,
        timeout_ms: header_number(headers, TIMEOUT_MS)?,
    })
}

/// The header a limit is asked for with.
pub fn limit_header(limit: Limit) -> &'static str {
    match limit {
        Limit::CpuQuota => CPU_QUOTA,
        Limit::Memory => MEMORY_REQUEST,
        Limit::Timeout => TIMEOUT_MS,
    }
}

/// The headers' limits resolved against the function's and the server's (what the
/// invocation path does, in one call).
pub fn limits(
    headers: &HeaderMap,
    function: &FunctionLimits,
    server: &LimitDefaults,
) -> Result<InvocationLimits, ApiError> {
    Ok(crate::limits::resolve(requested_limits(headers)?, function, server)?)
}

/// A positive decimal integer header; absent is `None`; anything else names the header.
fn header_number(headers: &HeaderMap, name: &'static str) -> Result<Option<u64>, ApiError> {
    let mut values = headers.get_all(name).iter();
    let Some(value) = values.next() else { return Ok(None) };
    let invalid = |reason: &str| ApiError::InvalidHeader { header: name, reason: reason.into() };
    if values.next().is_some() {
        return Err(invalid("must be given once"));
    }
    let text = value.to_str().map_err(|_| invalid("must be a positive integer"))?.trim();
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid("must be a positive integer"));
    }
    match text.parse::<u64>() {
        Ok(0) => Err(invalid("must be at least 1")),
        Ok(n) => Ok(Some(n)),
        Err(_) => Err(invalid("is too large")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn server() -> LimitDefaults {
        LimitDefaults {
            default_cpu_quota: 1000,
            max_cpu_quota: 2000,
            default_memory_mb: 128,
            max_memory_mb: 512,
            default_timeout_ms: 1000,
            max_timeout_ms: 5000,
        }
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn defaults_apply_without_headers_and_function_defaults_win() {
        let l = limits(&HeaderMap::new(), &FunctionLimits::default(), &server()).unwrap();
        assert_eq!(l, InvocationLimits { cpu_quota_millis: 1000, memory_mb: 128, timeout_ms: 1000 });
        let f = FunctionLimits { memory_mb: Some(64), ..Default::default() };
        assert_eq!(limits(&HeaderMap::new(), &f, &server()).unwrap().memory_mb, 64);
    }

    #[test]
    fn headers_are_case_insensitive_and_bounded() {
        let h = headers(&[("cpu_quota", "250"), ("memory-request", "64"), ("TIMEOUT-MS", "200")]);
        let l = limits(&h, &FunctionLimits::default(), &server()).unwrap();
        assert_eq!(l, InvocationLimits { cpu_quota_millis: 250, memory_mb: 64, timeout_ms: 200 });
        let f = FunctionLimits { max_memory_mb: Some(32), ..Default::default() };
        let err = limits(&h, &f, &server()).unwrap_err();
        assert!(matches!(err, ApiError::InvalidHeader { header: "Memory-Request", .. }), "{err:?}");
    }

    #[test]
    fn bad_values_name_the_header() {
        for (header, value) in [
            ("cpu_quota", "abc"),
            ("cpu_quota", "0"),
            ("cpu_quota", "9"),
            ("cpu_quota", "-5"),
            ("cpu_quota", "2001"),
            ("memory-request", "1.5"),
            ("memory-request", "99999999999999999999999"),
            ("timeout-ms", ""),
            ("timeout-ms", "5001"),
        ] {
            let err = limits(&headers(&[(header, value)]), &FunctionLimits::default(), &server()).unwrap_err();
            let ApiError::InvalidHeader { header: named, .. } = err else { panic!("{err:?}") };
            assert_eq!(named.to_ascii_lowercase(), header, "{value}");
        }
        let twice = headers(&[("timeout-ms", "1"), ("timeout-ms", "2")]);
        assert!(limits(&twice, &FunctionLimits::default(), &server()).is_err());
    }

    #[test]
    fn args_come_from_repeated_arg_parameters() {
        assert_eq!(query_args(None).unwrap(), None);
        assert_eq!(query_args(Some("x=1")).unwrap(), None);
        assert_eq!(query_args(Some("arg=a%20b&arg=%2Fc&other=1&arg=")).unwrap().unwrap(), ["a b", "/c", ""]);
        assert!(query_args(Some("arg=%00")).is_err());
        let many = vec!["arg=x"; MAX_ARGS + 1].join("&");
        assert!(query_args(Some(&many)).is_err());
    }

    #[test]
    fn paths_with_anything_but_a_name_are_refused() {
        assert_eq!(function_name("/hello").unwrap().as_str(), "hello");
        for bad in ["/", "/../etc/passwd", "//etc/passwd", "/a/b", "/a%2Fb", "/%2e%2e", "/a%00", "/.x"] {
            assert!(matches!(function_name(bad), Err(ApiError::InvalidFunctionName(_))), "{bad}");
        }
    }
}
