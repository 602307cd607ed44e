//! Turning request parts into validated invocation inputs: function name, argv from the
//! query string, and per-invocation limits from the `cpu_quota`, `Memory-Request` and
//! `Timeout-Ms` headers. Nothing here touches the filesystem.

use http::HeaderMap;

use super::error::ApiError;
use crate::cgroup::MIN_CPU_QUOTA_MILLIS;
use crate::config::LimitDefaults;
use crate::registry::{FunctionLimits, FunctionName};

/// Most `arg` parameters per request, and their total size.
pub const MAX_ARGS: usize = 1024;
pub const MAX_ARGS_BYTES: usize = 64 * 1024;

/// Limit headers, spelled as the original WasmBox interface spells them (matched
/// case-insensitively).
pub const CPU_QUOTA: &str = "cpu_quota";
pub const MEMORY_REQUEST: &str = "Memory-Request";
pub const TIMEOUT_MS: &str = "Timeout-Ms";

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

/// Limits for one invocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvocationLimits {
    pub cpu_quota_millis: u64,
    pub memory_mb: u64,
    pub timeout_ms: u64,
}

/// Resolves each limit: the header, else the function's default, else the server's; then
/// checks it against the tighter of the function's and the server's maximum.
pub fn limits(
    headers: &HeaderMap,
    function: &FunctionLimits,
    server: &LimitDefaults,
) -> Result<InvocationLimits, ApiError> {
    let one = |header: &'static str, fn_default: Option<u64>, default: u64, fn_max: Option<u64>, max: u64| {
        let max = fn_max.map_or(max, |m| m.min(max));
        match header_number(headers, header)? {
            Some(value) if value > max => {
                Err(ApiError::InvalidHeader { header, reason: format!("{value} exceeds the maximum of {max}") })
            }
            Some(value) => Ok(value),
            None => Ok(fn_default.unwrap_or(default).min(max)),
        }
    };
    let cpu_quota_millis =
        one(CPU_QUOTA, function.cpu_quota, server.default_cpu_quota, function.max_cpu_quota, server.max_cpu_quota)?;
    if cpu_quota_millis < MIN_CPU_QUOTA_MILLIS {
        return Err(ApiError::InvalidHeader {
            header: CPU_QUOTA,
            reason: format!("{cpu_quota_millis} is below the minimum of {MIN_CPU_QUOTA_MILLIS} millicores"),
        });
    }
    Ok(InvocationLimits {
        cpu_quota_millis,
        memory_mb: one(
            MEMORY_REQUEST,
            function.memory_mb,
            server.default_memory_mb,
            function.max_memory_mb,
            server.max_memory_mb,
        )?,
        timeout_ms: one(
            TIMEOUT_MS,
            function.timeout_ms,
            server.default_timeout_ms,
            function.max_timeout_ms,
            server.max_timeout_ms,
        )?,
    })
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
