//! Property tests for everything the supervisor parses from outside: function names, the
//! limit headers and the query string of a request, and a function's `name.toml`. No input
//! makes them panic, every refusal is a typed error, and what they accept keeps their
//! documented rules.
//!
//! Each property runs `ProptestConfig::default()` cases (256), which the `PROPTEST_CASES`
//! environment variable overrides for a longer run by hand (see the README).

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use http::{HeaderMap, HeaderName, HeaderValue};
use proptest::collection::vec;
use proptest::prelude::*;

use crate::cgroup::MIN_CPU_QUOTA_MILLIS;
use crate::config::LimitDefaults;
use crate::http::error::ApiError;
use crate::http::request::{
    CPU_QUOTA, InvocationLimits, MAX_ARGS, MAX_ARGS_BYTES, MEMORY_REQUEST, TIMEOUT_MS, function_name, limits,
    query_args,
};
use crate::registry::function_config::{self, FunctionConfig};
use crate::registry::name::MAX_NAME_LEN;
use crate::registry::{FunctionLimits, FunctionName, NameError};

// ---------------------------------------------------------------------------------------
// Function names
// ---------------------------------------------------------------------------------------

/// Strings around the valid alphabet: path separators, dots, NUL, non-ASCII, lengths on both
/// sides of the limit; plus names drawn from the documented rule itself and any string.
fn raw_name() -> BoxedStrategy<String> {
    prop_oneof![
        any::<String>(),
        "[A-Za-z0-9._-]{0,70}",
        "[A-Za-z0-9][A-Za-z0-9._-]{0,63}",
        r"[a-z./\\\x00%é ]{0,8}",
        vec(prop::sample::select(vec!["a", "Z", "9", ".", "..", "/", "-", "_", "\0", "%2F", "é", " "]), 0..20)
            .prop_map(|parts| parts.concat()),
    ]
    .boxed()
}

/// The rule from `name.rs`'s docs, `[A-Za-z0-9][A-Za-z0-9._-]{0,63}`, written out
/// independently, with the error the validator is documented to give first.
fn name_rule(raw: &str) -> Result<(), NameError> {
    let alnum = |c: char| c.is_ascii_alphanumeric();
    let mut chars = raw.chars();
    let first = chars.next().ok_or(NameError::Empty)?;
    if raw.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong);
    }
    if !alnum(first) {
        return Err(NameError::BadStart);
    }
    if !chars.all(|c| alnum(c) || matches!(c, '.' | '_' | '-')) {
        return Err(NameError::BadCharacter);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::default())]

    #[test]
    fn function_names_follow_the_documented_rule(raw in raw_name()) {
        let parsed = FunctionName::parse(&raw);
        prop_assert_eq!(parsed.as_ref().map(|_| ()).map_err(Clone::clone), name_rule(&raw));
        let Ok(name) = parsed else { return Ok(()) };

        // What the rule is for: the name is one plain path component, so joining it to the
        // functions directory can never leave it or name a hidden file. `..` is never a
        // component; inside a name (`a..b`) the documented rule allows it, and there it is
        // just part of a file name.
        prop_assert!(!raw.contains('/') && !raw.contains('\\') && !raw.contains('\0'));
        prop_assert!(!raw.starts_with('.') && raw != "..");
        let components: Vec<_> = Path::new(&raw).components().collect();
        prop_assert_eq!(components, vec![Component::Normal(raw.as_ref())]);
        let base = Path::new("/functions");
        let joined = base.join(name.as_str());
        prop_assert_eq!(joined.parent(), Some(base));
        let module = base.join(format!("{name}.wasm"));
        prop_assert_eq!(module.parent(), Some(base));

        // Accepted names round trip unchanged.
        prop_assert_eq!(name.as_str(), raw.as_str());
        prop_assert_eq!(name.to_string(), raw.clone());
        prop_assert_eq!(FunctionName::parse(name.as_str()), Ok(name.clone()));
    }

    #[test]
    fn request_paths_name_a_function_or_are_refused(raw in raw_name(), slash in any::<bool>()) {
        let path = if slash { format!("/{raw}") } else { raw.clone() };
        match function_name(&path) {
            Ok(name) => {
                prop_assert_eq!(name.as_str(), path.strip_prefix('/').unwrap_or(&path));
                prop_assert!(!name.as_str().contains('/'));
            }
            Err(e) => prop_assert!(matches!(e, ApiError::InvalidFunctionName(_)), "{:?}", e),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Limit headers and query arguments
// ---------------------------------------------------------------------------------------

/// Bytes a `HeaderValue` may hold, which is what hyper hands the supervisor: visible ASCII,
/// space, tab and any byte >= 0x80 (so not necessarily UTF-8).
fn header_byte() -> BoxedStrategy<u8> {
    prop_oneof![Just(b'\t'), 0x20u8..=0x7e, 0x80u8..=0xff].boxed()
}

/// Header values that are numbers, almost numbers, or noise.
fn header_value() -> BoxedStrategy<Vec<u8>> {
    let ws = prop::sample::select(vec!["", " ", "\t", "  \t "]);
    let sign = prop::sample::select(vec!["", "", "+", "-", "--", "0x"]);
    let digits = prop_oneof![
        any::<u64>().prop_map(|n| n.to_string()),
        (0u64..20_000).prop_map(|n| n.to_string()),
        "[0-9]{1,30}",
        Just(u64::MAX.to_string()),
        Just("18446744073709551616".to_string()),
        Just("0".to_string()),
        Just("000000000000000000000000000250".to_string()),
        Just("1e3".to_string()),
        Just("1.5".to_string()),
        Just("1_000".to_string()),
        Just("５".to_string()),
        Just("٣".to_string()),
    ];
    let number = (ws.clone(), sign, digits, ws).prop_map(|(a, s, d, b)| format!("{a}{s}{d}{b}").into_bytes());
    prop_oneof![4 => number, 1 => vec(header_byte(), 0..40)]
        .prop_filter_map("only bytes a HeaderValue can hold", |bytes| {
            // Non-ASCII digits (`５`) and such are UTF-8 and so also valid header bytes.
            HeaderValue::from_bytes(&bytes).ok().map(|_| bytes)
        })
        .boxed()
}

/// Each limit header absent, once or repeated, with its name in any case.
fn limit_headers() -> BoxedStrategy<Vec<(String, Vec<u8>)>> {
    let name = prop::sample::select(vec![
        CPU_QUOTA,
        "CPU_QUOTA",
        "Cpu_Quota",
        MEMORY_REQUEST,
        "memory-request",
        "MEMORY-REQUEST",
        TIMEOUT_MS,
        "timeout-ms",
        "TIMEOUT-MS",
        "cpu-quota",
        "x-other",
    ]);
    vec((name.prop_map(str::to_string), header_value()), 0..6).boxed()
}

fn header_map(pairs: &[(String, Vec<u8>)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        let name = HeaderName::from_bytes(name.as_bytes()).expect("test header names are valid");
        map.append(name, HeaderValue::from_bytes(value).expect("strategy keeps only valid values"));
    }
    map
}

fn opt_limit() -> BoxedStrategy<Option<u64>> {
    prop_oneof![Just(None), (1u64..20_000).prop_map(Some), any::<u64>().prop_map(Some)].boxed()
}

/// Any numbers at all, as a misconfigured server or function might have.
fn any_limits() -> BoxedStrategy<(FunctionLimits, LimitDefaults)> {
    (vec(opt_limit(), 6), vec(prop_oneof![0u64..20_000, any::<u64>()], 6))
        .prop_map(|(f, s)| {
            let function = FunctionLimits {
                cpu_quota: f[0],
                max_cpu_quota: f[1],
                memory_mb: f[2],
                max_memory_mb: f[3],
                timeout_ms: f[4],
                max_timeout_ms: f[5],
            };
            let server = LimitDefaults {
                default_cpu_quota: s[0],
                max_cpu_quota: s[1],
                default_memory_mb: s[2],
                max_memory_mb: s[3],
                default_timeout_ms: s[4],
                max_timeout_ms: s[5],
            };
            (function, server)
        })
        .boxed()
}

/// Limits as `Config::validate` and `function_config::parse` let them through: every value
/// at least 1, each default at most its maximum, the server's CPU default at least the
/// minimum quota.
fn valid_limits() -> BoxedStrategy<(FunctionLimits, LimitDefaults)> {
    fn pair(min: u64) -> impl Strategy<Value = (u64, u64)> {
        prop_oneof![(min..20_000u64, 0u64..20_000), (min..u64::MAX / 2, 0u64..u64::MAX / 2)]
            .prop_map(|(default, extra)| (default, default + extra))
    }
    fn opt_pair() -> impl Strategy<Value = (Option<u64>, Option<u64>)> {
        (pair(1), any::<bool>(), any::<bool>())
            .prop_map(|((d, m), has_d, has_m)| (has_d.then_some(d), has_m.then_some(m)))
    }
    ((pair(MIN_CPU_QUOTA_MILLIS), pair(1), pair(1)), (opt_pair(), opt_pair(), opt_pair()))
        .prop_map(|(((dc, mc), (dm, mm), (dt, mt)), ((fc, fmc), (fm, fmm), (ft, fmt)))| {
            let server = LimitDefaults {
                default_cpu_quota: dc,
                max_cpu_quota: mc,
                default_memory_mb: dm,
                max_memory_mb: mm,
                default_timeout_ms: dt,
                max_timeout_ms: mt,
            };
            let function = FunctionLimits {
                cpu_quota: fc,
                max_cpu_quota: fmc,
                memory_mb: fm,
                max_memory_mb: fmm,
                timeout_ms: ft,
                max_timeout_ms: fmt,
            };
            (function, server)
        })
        .boxed()
}

/// The documented syntax of one limit header, written out independently: absent, or given
/// once as a positive decimal integer (blanks around it allowed) that fits 64 bits.
fn expected_syntax(pairs: &[(String, Vec<u8>)], header: &str) -> Result<Option<u64>, ()> {
    let values: Vec<&[u8]> =
        pairs.iter().filter(|(n, _)| n.eq_ignore_ascii_case(header)).map(|(_, v)| v.as_slice()).collect();
    match values.as_slice() {
        [] => Ok(None),
        [value] => {
            let text = std::str::from_utf8(value).map_err(drop)?.trim_matches([' ', '\t']);
            if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
                return Err(());
            }
            match text.parse::<u64>() {
                Ok(n) if n >= 1 => Ok(Some(n)),
                _ => Err(()),
            }
        }
        _ => Err(()),
    }
}

/// The documented resolution of one limit: a value asked for within the tighter maximum
/// is taken as is; absent, the function's default or else the server's applies, capped at
/// that maximum; anything else is refused.
fn expected_bound(
    asked: Option<u64>,
    fn_default: Option<u64>,
    default: u64,
    fn_max: Option<u64>,
    max: u64,
) -> Result<u64, ()> {
    let cap = fn_max.map_or(max, |m| m.min(max));
    match asked {
        None => Ok(fn_default.unwrap_or(default).min(cap)),
        Some(n) if n <= cap => Ok(n),
        Some(_) => Err(()),
    }
}

/// Every header's syntax is checked first (cpu, memory, timeout), then each value against
/// its bounds in the same order.
fn expected_limits(
    pairs: &[(String, Vec<u8>)],
    f: &FunctionLimits,
    s: &LimitDefaults,
) -> Result<InvocationLimits, &'static str> {
    let cpu = expected_syntax(pairs, CPU_QUOTA).map_err(|()| CPU_QUOTA)?;
    let memory = expected_syntax(pairs, MEMORY_REQUEST).map_err(|()| MEMORY_REQUEST)?;
    let timeout = expected_syntax(pairs, TIMEOUT_MS).map_err(|()| TIMEOUT_MS)?;
    let cpu = expected_bound(cpu, f.cpu_quota, s.default_cpu_quota, f.max_cpu_quota, s.max_cpu_quota)
        .map_err(|()| CPU_QUOTA)?;
    if cpu < MIN_CPU_QUOTA_MILLIS {
        return Err(CPU_QUOTA);
    }
    let memory = expected_bound(memory, f.memory_mb, s.default_memory_mb, f.max_memory_mb, s.max_memory_mb)
        .map_err(|()| MEMORY_REQUEST)?;
    let timeout = expected_bound(timeout, f.timeout_ms, s.default_timeout_ms, f.max_timeout_ms, s.max_timeout_ms)
        .map_err(|()| TIMEOUT_MS)?;
    Ok(InvocationLimits { cpu_quota_millis: cpu, memory_mb: memory, timeout_ms: timeout })
}

fn check_limits(pairs: &[(String, Vec<u8>)], f: &FunctionLimits, s: &LimitDefaults) -> Result<(), TestCaseError> {
    let got = limits(&header_map(pairs), f, s);
    match (&got, expected_limits(pairs, f, s)) {
        (Ok(got), Ok(want)) => prop_assert_eq!(got, &want),
        (Err(ApiError::InvalidHeader { header, reason }), Err(want)) => {
            prop_assert_eq!(*header, want);
            prop_assert!(!reason.is_empty());
        }
        (got, want) => prop_assert!(false, "limits gave {:?}, expected {:?}", got, want),
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::default())]

    #[test]
    fn limit_headers_never_panic_and_errors_name_the_header(
        pairs in limit_headers(),
        (function, server) in any_limits(),
    ) {
        check_limits(&pairs, &function, &server)?;
    }

    #[test]
    fn accepted_limits_are_within_the_documented_bounds(
        pairs in limit_headers(),
        (function, server) in valid_limits(),
    ) {
        check_limits(&pairs, &function, &server)?;
        if let Ok(l) = limits(&header_map(&pairs), &function, &server) {
            let cap = |f: Option<u64>, s: u64| f.map_or(s, |f| f.min(s));
            prop_assert!(l.cpu_quota_millis >= MIN_CPU_QUOTA_MILLIS);
            prop_assert!(l.cpu_quota_millis <= cap(function.max_cpu_quota, server.max_cpu_quota));
            prop_assert!(l.memory_mb >= 1 && l.memory_mb <= cap(function.max_memory_mb, server.max_memory_mb));
            prop_assert!(l.timeout_ms >= 1 && l.timeout_ms <= cap(function.max_timeout_ms, server.max_timeout_ms));
        }
    }

    #[test]
    fn query_args_are_bounded_and_never_panic(query in query(), present in any::<bool>()) {
        let query = present.then_some(query.as_str());
        match query_args(query) {
            Ok(None) => {
                let has_arg = query.is_some_and(|q| form_urlencoded::parse(q.as_bytes()).any(|(k, _)| k == "arg"));
                prop_assert!(!has_arg);
            }
            Ok(Some(args)) => {
                prop_assert!(!args.is_empty() && args.len() <= MAX_ARGS);
                prop_assert!(args.iter().map(String::len).sum::<usize>() <= MAX_ARGS_BYTES);
                prop_assert!(args.iter().all(|a| !a.contains('\0')));
            }
            Err(e) => prop_assert!(matches!(e, ApiError::InvalidQuery(_)), "{:?}", e),
        }
    }
}

/// Query strings: noise, `arg=` pairs with percent escapes (NUL, invalid UTF-8, '+'), and
/// enough repeats to reach the count and size limits.
fn query() -> BoxedStrategy<String> {
    let value = prop_oneof![
        "[a-z0-9 %+=&]{0,12}",
        Just("%00".to_string()),
        Just("%FF%FE".to_string()),
        Just("%2F..%2F".to_string()),
        Just("%".to_string()),
        Just("%G1".to_string()),
        "x{0,300}",
    ];
    let key = prop::sample::select(vec!["arg", "ARG", "arg[]", "x", "", "a%72g"]);
    let pair = (key, value).prop_map(|(k, v)| format!("{k}={v}"));
    prop_oneof![
        any::<String>(),
        vec(pair, 0..8).prop_map(|p| p.join("&")),
        (MAX_ARGS - 2..MAX_ARGS + 3).prop_map(|n| vec!["arg=x"; n].join("&")),
        (200usize..280).prop_map(|n| vec![format!("arg={}", "y".repeat(256)); n].join("&")),
    ]
    .boxed()
}

// ---------------------------------------------------------------------------------------
// Function configs
// ---------------------------------------------------------------------------------------

/// A functions directory with one subdirectory (`data`) and one plain file (`file`).
fn functions_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::create_dir(dir.path().join("data")).expect("data dir");
    std::fs::write(dir.path().join("file"), b"x").expect("plain file");
    dir
}

/// A TOML string literal for `s` (basic string, escaped as TOML requires).
fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

/// TOML values of every kind, right and wrong for any key.
fn toml_value() -> BoxedStrategy<String> {
    let leaf = prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        (0i64..5).prop_map(|n| n.to_string()),
        Just("-1".to_string()),
        Just("18446744073709551615".to_string()),
        Just("9223372036854775808".to_string()),
        Just("1.5".to_string()),
        Just("nan".to_string()),
        Just("inf".to_string()),
        Just("true".to_string()),
        Just("1979-05-27T07:32:00Z".to_string()),
        ".{0,10}".prop_map(|s| toml_str(&s)),
        Just("\"a\\u0000b\"".to_string()),
        Just("\"\"".to_string()),
        Just("'data'".to_string()),
        Just("\"/\"".to_string()),
        Just("\"..\"".to_string()),
        Just("\"file\"".to_string()),
        Just("\"missing\"".to_string()),
    ];
    leaf.prop_recursive(3, 12, 4, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..4).prop_map(|v| format!("[{}]", v.join(", "))),
            vec(("[a-z_]{1,10}", inner), 0..3).prop_map(|kv| {
                let body: Vec<String> = kv.into_iter().map(|(k, v)| format!("{k} = {v}")).collect();
                format!("{{ {} }}", body.join(", "))
            }),
        ]
    })
    .boxed()
}

/// Documents built from the real keys and sections, with values mostly of the right type
/// (so the checks after TOML parsing are reached) and sometimes of any type; plus lines in
/// any order, unknown keys, duplicates and deep nesting.
fn toml_document() -> BoxedStrategy<String> {
    let kv = |key: BoxedStrategy<String>, value: BoxedStrategy<String>| {
        (key, value).prop_map(|(k, v)| format!("{k} = {v}")).boxed()
    };
    let keys = |names: &[&'static str]| prop::sample::select(names.to_vec()).prop_map(str::to_string).boxed();
    let string = prop_oneof![
        4 => ".{0,10}".prop_map(|s| toml_str(&s)),
        1 => Just("\"\"".to_string()),
        1 => Just("\"a\\u0000b\"".to_string()),
        1 => toml_value(),
    ]
    .boxed();
    let number = prop_oneof![
        3 => (0u64..5).prop_map(|n| n.to_string()),
        3 => (1u64..100_000).prop_map(|n| n.to_string()),
        1 => Just(i64::MAX.to_string()),
        1 => Just("-1".to_string()),
        1 => toml_value(),
    ]
    .boxed();
    let host = prop_oneof![
        4 => prop::sample::select(vec!["data", "./data", "data/", "file", "missing", "/", "..", "", "a\\u0000b"])
            .prop_map(|h| format!("\"{h}\"")),
        1 => toml_value(),
    ]
    .boxed();
    let boolean = prop_oneof![3 => any::<bool>().prop_map(|b| b.to_string()), 1 => toml_value()].boxed();
    let args = prop_oneof![
        3 => vec(string.clone(), 0..4).prop_map(|v| format!("[{}]", v.join(", "))),
        1 => toml_value(),
    ]
    .boxed();
    let env_key = prop_oneof![
        4 => "[A-Z_]{1,8}".prop_map(|k| toml_str(&k)),
        1 => Just("\"\"".to_string()),
        1 => Just("\"A=B\"".to_string()),
        1 => Just("\"A\\u0000\"".to_string()),
    ]
    .boxed();
    let limit_key = keys(&[
        "cpu_quota",
        "max_cpu_quota",
        "memory_mb",
        "max_memory_mb",
        "timeout_ms",
        "max_timeout_ms",
        "max_nothing",
    ]);
    let top = prop_oneof![
        4 => kv(Just("args".to_string()).boxed(), args),
        1 => kv(keys(&["env", "limits", "preopen", "unknown"]), toml_value()),
    ];
    // Each key at most once per table, so most documents get past TOML itself.
    let some = |p: f64, line: BoxedStrategy<String>| prop::option::weighted(p, line);
    let preopen = (
        some(0.9, kv(Just("host".to_string()).boxed(), host)),
        some(0.9, kv(Just("guest".to_string()).boxed(), string.clone())),
        some(0.5, kv(Just("read_only".to_string()).boxed(), boolean)),
        some(0.1, kv(Just("extra".to_string()).boxed(), toml_value())),
    )
        .prop_map(|(a, b, c, d)| {
            let lines: Vec<String> = [a, b, c, d].into_iter().flatten().collect();
            format!("[[preopen]]\n{}", lines.join("\n"))
        });
    let limit_number = number.clone();
    let limit_lines = prop::sample::subsequence(
        vec!["cpu_quota", "max_cpu_quota", "memory_mb", "max_memory_mb", "timeout_ms", "max_timeout_ms", "max_nothing"],
        0..=4,
    )
    .prop_flat_map(move |names| {
        let values = vec(limit_number.clone(), names.len());
        (Just(names), values)
            .prop_map(|(names, values)| names.iter().zip(values).map(|(k, v)| format!("{k} = {v}")).collect::<Vec<_>>())
    });
    let sectioned = (
        vec(top, 0..2),
        prop::option::of(vec(kv(env_key.clone(), string.clone()), 0..4)),
        prop::option::of(limit_lines),
        vec(preopen, 0..2),
    )
        .prop_map(|(top, env, limits, preopens)| {
            let mut doc = top.join("\n");
            if let Some(env) = env {
                doc.push_str(&format!("\n[env]\n{}", env.join("\n")));
            }
            if let Some(limits) = limits {
                doc.push_str(&format!("\n[limits]\n{}", limits.join("\n")));
            }
            for p in preopens {
                doc.push_str(&format!("\n{p}"));
            }
            doc
        });
    let line = prop_oneof![
        4 => kv(keys(&["args", "env", "limits", "preopen", "unknown"]), toml_value()),
        1 => keys(&["[limits]", "[env]", "[[preopen]]", "[[limits]]", "[preopen]"]),
        4 => kv(limit_key, number),
        4 => kv(keys(&["host", "guest", "read_only", "extra"]), toml_value()),
        4 => kv(env_key, string),
        1 => (1usize..3000).prop_map(|depth| format!("args = {}{}", "[".repeat(depth), "]".repeat(depth))),
        1 => (1usize..3000).prop_map(|depth| format!("args = {}1{}", "{a=".repeat(depth), "}".repeat(depth))),
    ];
    let shuffled = vec(line, 0..8).prop_map(|lines| lines.join("\n"));
    prop_oneof![2 => sectioned, 1 => shuffled].boxed()
}

/// What every config that parses must satisfy.
fn check_config(result: &Result<FunctionConfig, String>) -> Result<(), TestCaseError> {
    let config = match result {
        Ok(config) => config,
        Err(message) => {
            prop_assert!(!message.is_empty());
            return Ok(());
        }
    };
    prop_assert!(config.default_args.iter().all(|a| !a.contains('\0')));
    for (key, value) in &config.env {
        prop_assert!(!key.is_empty() && !key.contains(['=', '\0']) && !value.contains('\0'), "{:?}", key);
    }
    for p in &config.preopens {
        prop_assert!(!p.guest.is_empty() && !p.guest.contains('\0'));
        prop_assert!(p.host.is_absolute() && p.host.is_dir(), "{:?}", p.host);
    }
    let l = &config.limits;
    for (default, max) in
        [(l.cpu_quota, l.max_cpu_quota), (l.memory_mb, l.max_memory_mb), (l.timeout_ms, l.max_timeout_ms)]
    {
        prop_assert!(default != Some(0) && max != Some(0));
        if let (Some(d), Some(m)) = (default, max) {
            prop_assert!(d <= m);
        }
    }
    Ok(())
}

/// A config that must be accepted, as it would be written for `name.toml`.
#[derive(Debug, Clone, serde::Serialize)]
struct ValidConfig {
    args: Vec<String>,
    env: BTreeMap<String, String>,
    preopen: Vec<ValidPreopen>,
    limits: BTreeMap<&'static str, u64>,
}

#[derive(Debug, Clone, serde::Serialize)]
struct ValidPreopen {
    host: PathBuf,
    guest: String,
    read_only: bool,
}

fn no_nul() -> BoxedStrategy<String> {
    prop_oneof!["[^\\x00]{0,12}", "[a-z/ ]{0,8}"].boxed()
}

fn valid_config() -> BoxedStrategy<ValidConfig> {
    let env_key = "[^=\\x00]{1,10}";
    // A default and a maximum, each present or not, the default at most the maximum. TOML
    // integers are i64, so that is as large as a config value can be written.
    let limit_pair = (1u64..=i64::MAX as u64, 0u64..1000, any::<bool>(), any::<bool>()).prop_map(
        |(default, extra, has_default, has_max)| {
            let max = default.saturating_add(extra).min(i64::MAX as u64);
            (has_default.then_some(default), has_max.then_some(max))
        },
    );
    let preopen = (any::<bool>(), "[^\\x00]{1,10}", any::<bool>()).prop_map(|(relative, guest, read_only)| {
        ValidPreopen {
            // The test puts the real directory in place of "ABSOLUTE"; `relative` keeps "data".
            host: PathBuf::from(if relative { "data" } else { "ABSOLUTE" }),
            guest,
            read_only,
        }
    });
    (
        vec(no_nul(), 0..4),
        vec((env_key, no_nul()), 0..4),
        vec(preopen, 0..3),
        [limit_pair.clone(), limit_pair.clone(), limit_pair],
    )
        .prop_map(|(args, env, preopen, pairs)| {
            let mut limits = BTreeMap::new();
            let names =
                [("cpu_quota", "max_cpu_quota"), ("memory_mb", "max_memory_mb"), ("timeout_ms", "max_timeout_ms")];
            for ((default_name, max_name), (default, max)) in names.into_iter().zip(pairs) {
                limits.extend(default.map(|d| (default_name, d)));
                limits.extend(max.map(|m| (max_name, m)));
            }
            ValidConfig { args, env: env.into_iter().collect(), preopen, limits }
        })
        .boxed()
}

proptest! {
    #![proptest_config(ProptestConfig::default())]

    #[test]
    fn function_config_never_panics_on_any_text(text in prop_oneof![any::<String>(), "\\PC{0,200}"]) {
        let dir = functions_dir();
        check_config(&function_config::parse(&text, dir.path()))?;
    }

    #[test]
    fn function_config_never_panics_on_toml_like_documents(text in toml_document()) {
        let dir = functions_dir();
        check_config(&function_config::parse(&text, dir.path()))?;
    }

    #[test]
    fn valid_function_configs_are_accepted_as_written(mut config in valid_config()) {
        let dir = functions_dir();
        let data = dir.path().join("data").canonicalize().expect("data dir");
        for p in &mut config.preopen {
            if p.host != Path::new("data") {
                p.host = data.clone();
            }
        }
        let text = toml::to_string(&config).expect("a valid config serializes");
        let parsed = function_config::parse(&text, dir.path());
        check_config(&parsed)?;
        let parsed = parsed.map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        prop_assert_eq!(&parsed.default_args, &config.args);
        prop_assert_eq!(parsed.env, config.env.into_iter().collect::<Vec<_>>());
        prop_assert_eq!(parsed.preopens.len(), config.preopen.len());
        for (got, want) in parsed.preopens.iter().zip(&config.preopen) {
            prop_assert_eq!(&got.host, &data);
            prop_assert_eq!(&got.guest, &want.guest);
            prop_assert_eq!(got.read_only, want.read_only);
        }
        let l = parsed.limits;
        let want = |name: &str| config.limits.get(name).copied();
        prop_assert_eq!(
            [l.cpu_quota, l.max_cpu_quota, l.memory_mb, l.max_memory_mb, l.timeout_ms, l.max_timeout_ms],
            ["cpu_quota", "max_cpu_quota", "memory_mb", "max_memory_mb", "timeout_ms", "max_timeout_ms"].map(want)
        );
    }
}
