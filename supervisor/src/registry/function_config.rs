//! `name.toml` beside a module: environment, default args, preopened directories and
//! per-function limits. Parsed strictly: an unknown key is an error, not a silent no-op.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use wasmbox_protocol::Preopen;

use super::files::DirId;

/// Largest config file read.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// The file as written by an operator.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    /// The tenant this function belongs to (default: the function's own name). Functions
    /// of one tenant may share worker processes; different tenants never do.
    tenant: Option<String>,
    /// argv[1..] when the request passes no `arg` query parameters.
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default, rename = "preopen")]
    preopens: Vec<PreopenFile>,
    #[serde(default)]
    limits: FunctionLimits,
    #[serde(default)]
    session: SessionFile,
}

/// `[session]`: how the sessions API drives this function.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SessionFile {
    /// The exported function each message is delivered to (default `handle`).
    handler: Option<String>,
    /// Sessions this function may hold (default WASMBOX_SESSION_MAX_PER_FUNCTION).
    max_sessions: Option<usize>,
    /// Bytes of snapshots its sessions may hold (default
    /// WASMBOX_SESSION_MAX_BYTES_PER_FUNCTION).
    max_stored_bytes: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PreopenFile {
    /// Host directory, absolute or relative to the functions directory.
    host: PathBuf,
    /// Path the guest sees.
    guest: String,
    /// Read-only unless stated otherwise.
    #[serde(default = "read_only_default")]
    read_only: bool,
}

fn read_only_default() -> bool {
    true
}

/// Per-function defaults and maxima; each falls back to the server-wide setting, and a
/// function can only tighten a server-wide maximum, never widen it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionLimits {
    pub cpu_quota: Option<u64>,
    pub max_cpu_quota: Option<u64>,
    pub memory_mb: Option<u64>,
    pub max_memory_mb: Option<u64>,
    pub timeout_ms: Option<u64>,
    pub max_timeout_ms: Option<u64>,
}

/// A function's resolved configuration.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FunctionConfig {
    /// `tenant`, validated like a function name (`None`: the function is its own tenant).
    pub tenant: Option<String>,
    pub default_args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Host paths canonical (no symbolic link, no `..`), as resolved when the file was read.
    pub preopens: Vec<Preopen>,
    /// Which directory each preopen was then, by device and inode: an invocation opens it
    /// only if it still is that directory (see [`super::files::open_preopen`]).
    pub preopen_ids: Vec<DirId>,
    pub limits: FunctionLimits,
    /// `[session] handler`: the export a session message calls (`None`: `handle`).
    pub session_handler: Option<String>,
    /// `[session] max_sessions` and `max_stored_bytes` (`None`: the server's default).
    pub session_max_sessions: Option<usize>,
    pub session_max_stored_bytes: Option<u64>,
}

/// Parses and resolves a config file's text; `base` resolves relative preopen paths.
pub fn parse(text: &str, base: &Path) -> Result<FunctionConfig, String> {
    let file: ConfigFile = toml::from_str(text).map_err(|e| e.message().to_owned())?;
    if let Some(tenant) = &file.tenant {
        super::FunctionName::parse(tenant)
            .map_err(|e| format!("tenant {tenant:?}: {}", e.to_string().replace("function name", "a tenant name")))?;
    }
    for arg in &file.args {
        if arg.contains('\0') {
            return Err("args must not contain NUL".into());
        }
    }
    for (key, value) in &file.env {
        if key.is_empty() || key.contains(['=', '\0']) {
            return Err(format!("env key {key:?} must be non-empty, without '=' or NUL"));
        }
        if value.contains('\0') {
            return Err(format!("env value of {key:?} must not contain NUL"));
        }
    }
    let mut preopens = Vec::with_capacity(file.preopens.len());
    let mut preopen_ids = Vec::with_capacity(file.preopens.len());
    for p in file.preopens {
        if p.guest.is_empty() || p.guest.contains('\0') {
            return Err("preopen guest path must be non-empty, without NUL".into());
        }
        let host = if p.host.is_absolute() { p.host.clone() } else { base.join(&p.host) };
        let host = host.canonicalize().map_err(|e| format!("preopen host directory {}: {e}", p.host.display()))?;
        if host.to_str().is_none() {
            return Err(format!("preopen host path {} is not valid UTF-8", host.display()));
        }
        let meta = std::fs::metadata(&host).map_err(|e| format!("preopen host directory {}: {e}", host.display()))?;
        if !meta.is_dir() {
            return Err(format!("preopen host path {} is not a directory", p.host.display()));
        }
        preopen_ids.push(DirId::of(&meta));
        preopens.push(Preopen { host, guest: p.guest, read_only: p.read_only });
    }
    let l = file.limits;
    for (name, default, max) in [
        ("cpu_quota", l.cpu_quota, l.max_cpu_quota),
        ("memory_mb", l.memory_mb, l.max_memory_mb),
        ("timeout_ms", l.timeout_ms, l.max_timeout_ms),
    ] {
        if default == Some(0) || max == Some(0) {
            return Err(format!("limits.{name} must be at least 1"));
        }
        if let (Some(d), Some(m)) = (default, max) {
            if d > m {
                return Err(format!("limits.{name} = {d} exceeds limits.max_{name} = {m}"));
            }
        }
    }
    if let Some(handler) = &file.session.handler {
        let ok = !handler.is_empty()
            && handler.len() <= 256
            && handler.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'$'));
        if !ok {
            return Err(format!(
                "session.handler {handler:?} must be an export name of 1 to 256 letters, digits, '_', '-', '.', '$'"
            ));
        }
    }
    if file.session.max_sessions == Some(0) || file.session.max_stored_bytes == Some(0) {
        return Err("session.max_sessions and session.max_stored_bytes must be at least 1".into());
    }
    Ok(FunctionConfig {
        tenant: file.tenant,
        session_max_sessions: file.session.max_sessions,
        session_max_stored_bytes: file.session.max_stored_bytes,
        default_args: file.args,
        env: file.env.into_iter().collect(),
        preopens,
        preopen_ids,
        limits: l,
        session_handler: file.session.handler,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_config_resolves_relative_preopens() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("data")).unwrap();
        let text = r#"
            tenant = "acme"
            args = ["--fast"]
            [env]
            GREETING = "hi"
            [[preopen]]
            host = "data"
            guest = "/data"
            [[preopen]]
            host = "data"
            guest = "/scratch"
            read_only = false
            [limits]
            memory_mb = 32
            max_memory_mb = 64
            [session]
            handler = "on_message"
        "#;
        let c = parse(text, dir.path()).unwrap();
        assert_eq!(c.tenant.as_deref(), Some("acme"));
        assert_eq!(c.default_args, ["--fast"]);
        assert_eq!(c.env, [("GREETING".to_string(), "hi".to_string())]);
        let data = dir.path().join("data").canonicalize().unwrap();
        assert_eq!(c.preopens[0], Preopen { host: data.clone(), guest: "/data".into(), read_only: true });
        assert!(!c.preopens[1].read_only);
        assert_eq!(c.limits.memory_mb, Some(32));
        assert_eq!(c.session_handler.as_deref(), Some("on_message"));
    }

    #[test]
    fn mistakes_are_errors_that_say_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            ("unknown = 1", "unknown"),
            ("tenant = \"../etc\"", "tenant \"../etc\": a tenant name must start"),
            ("tenant = \"\"", "tenant \"\": a tenant name is empty"),
            ("[[preopen]]\nhost = \"missing\"\nguest = \"/m\"", "missing"),
            ("[env]\n\"A=B\" = \"x\"", "A=B"),
            ("[env]\nA = \"x\\u0000\"", "env value of \"A\""),
            ("[limits]\nmemory_mb = 10\nmax_memory_mb = 5", "exceeds"),
            ("[limits]\ntimeout_ms = 0", "at least 1"),
            ("args = \"not a list\"", "sequence"),
            ("[session]\nhandler = \"a b\"", "session.handler"),
            ("[session]\nhandlr = \"x\"", "handlr"),
        ];
        for (text, needle) in cases {
            let err = parse(text, dir.path()).unwrap_err();
            assert!(err.contains(needle), "{text:?} gave {err:?}");
        }
    }
}
