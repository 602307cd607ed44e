//! Which preopened directories may coexist. A guest can rename, replace and link anything
//! inside a writable preopen, so nothing another function relies on may live there, and no
//! preopen may expose the directories the server keeps for itself.
//!
//! The rules, on canonical paths, component-wise:
//! - no preopen contains (or is) the functions directory, the artifact cache or the state
//!   directory: modules, configs (their env), native code and other tenants' sessions;
//! - no preopen lies inside the artifact cache or the state directory (a subdirectory of
//!   the functions directory, such as the documented `host = "data"`, is fine: modules and
//!   configs are only ever read from its top level);
//! - a writable preopen and any other preopen, of this function or another, are not nested
//!   in either direction. The same directory named twice is allowed: neither side can
//!   rename the directory itself from inside it.

use std::path::{Path, PathBuf};

use wasmbox_protocol::Preopen;

/// The server's own directories, canonical.
#[derive(Debug, Clone, Default)]
pub struct Protected {
    pub functions: PathBuf,
    /// The artifact cache and the state directory, named for the messages.
    pub private: Vec<(&'static str, PathBuf)>,
}

/// Checks `own` (one function's preopens) against the server's directories and against
/// `others` (every other function's preopens). The error says which rule and which paths.
pub fn check<'a>(
    own: &[Preopen],
    protected: &Protected,
    others: impl IntoIterator<Item = (&'a str, &'a Preopen)>,
) -> Result<(), String> {
    let shown = |p: &Path| p.display().to_string();
    let mut all_dirs = vec![("functions", protected.functions.as_path())];
    all_dirs.extend(protected.private.iter().map(|(label, p)| (*label, p.as_path())));
    for p in own {
        let host = p.host.as_path();
        for (label, dir) in &all_dirs {
            if dir.starts_with(host) {
                return Err(format!("preopen {} contains the {label} directory {}", shown(host), shown(dir)));
            }
        }
        for (label, dir) in &protected.private {
            if host.starts_with(dir) {
                return Err(format!("preopen {} is inside the {label} directory {}", shown(host), shown(dir)));
            }
        }
    }
    let nested = |a: &Path, b: &Path| a != b && (a.starts_with(b) || b.starts_with(a));
    for (i, p) in own.iter().enumerate() {
        for (j, q) in own.iter().enumerate() {
            if i < j && (!p.read_only || !q.read_only) && nested(&p.host, &q.host) {
                return Err(format!(
                    "preopens {} and {} are nested and one of them is writable",
                    shown(&p.host),
                    shown(&q.host)
                ));
            }
        }
    }
    for (function, q) in others {
        for p in own {
            if (!p.read_only || !q.read_only) && nested(&p.host, &q.host) {
                return Err(format!(
                    "preopen {} and function {function}'s preopen {} are nested and one of them is writable",
                    shown(&p.host),
                    shown(&q.host)
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pre(host: &str, read_only: bool) -> Preopen {
        Preopen { host: host.into(), guest: "/g".into(), read_only }
    }

    fn protected() -> Protected {
        Protected {
            functions: "/srv/functions".into(),
            private: vec![("cache", "/var/cache/wasmbox".into()), ("state", "/var/lib/wasmbox".into())],
        }
    }

    #[test]
    fn server_directories_are_never_exposed() {
        let p = protected();
        for (own, needle) in [
            (pre("/", true), "contains the functions"),
            (pre("/srv", true), "contains the functions"),
            (pre("/srv/functions", true), "contains the functions"),
            (pre("/var", true), "contains the cache"),
            (pre("/var/lib/wasmbox", true), "contains the state"),
            (pre("/var/lib/wasmbox/sessions", true), "inside the state"),
            (pre("/var/cache/wasmbox/x", false), "inside the cache"),
        ] {
            let err = check(std::slice::from_ref(&own), &p, []).unwrap_err();
            assert!(err.contains(needle), "{own:?}: {err}");
        }
        // Data beside the modules is the documented pattern.
        check(&[pre("/srv/functions/data", true), pre("/srv/functions/scratch", false)], &p, []).unwrap();
        // Prefixes are by component: /srv/functions-data is not inside /srv/functions.
        check(&[pre("/srv/functions-data", false)], &p, []).unwrap();
    }

    #[test]
    fn nothing_lives_inside_a_writable_preopen() {
        let p = protected();
        let writable = pre("/data/a", false);
        let inside = pre("/data/a/b", true);
        // Across functions, in both directions.
        let err = check(std::slice::from_ref(&inside), &p, [("other", &writable)]).unwrap_err();
        assert!(err.contains("function other's preopen /data/a"), "{err}");
        assert!(check(std::slice::from_ref(&writable), &p, [("other", &inside)]).is_err());
        // A writable preopen inside a read-only one (the reader sees what the writer makes).
        assert!(check(&[pre("/data", true)], &p, [("other", &writable)]).is_err());
        // Within one function.
        assert!(check(&[writable.clone(), inside.clone()], &p, []).is_err());
        // Read-only ones may nest; the same directory twice is allowed; siblings are fine.
        check(&[pre("/data", true), pre("/data/a/b", true)], &p, []).unwrap();
        check(std::slice::from_ref(&writable), &p, [("other", &pre("/data/a", false))]).unwrap();
        check(std::slice::from_ref(&writable), &p, [("other", &pre("/data/ab", false))]).unwrap();
    }
}
