//! An invocation's limits: what the request asked for, resolved against the function's
//! config and the server's settings. How they are asked for (headers) is HTTP's business;
//! what they resolve to is decided here.

use crate::cgroup::MIN_CPU_QUOTA_MILLIS;
use crate::config::LimitDefaults;
use crate::registry::FunctionLimits;

/// Which limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    CpuQuota,
    Memory,
    Timeout,
}

/// What a request asked for; `None`: the default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Requested {
    pub cpu_quota_millis: Option<u64>,
    pub memory_mb: Option<u64>,
    pub timeout_ms: Option<u64>,
}

/// Limits for one invocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvocationLimits {
    pub cpu_quota_millis: u64,
    pub memory_mb: u64,
    pub timeout_ms: u64,
}

impl InvocationLimits {
    pub fn memory_bytes(&self) -> u64 {
        self.memory_mb << 20
    }

    /// What the worker's cgroup enforces (travels beside the worker's message).
    pub fn for_cgroup(&self) -> crate::pool::Limits {
        crate::pool::Limits { cpu_quota_millis: self.cpu_quota_millis, memory_request_bytes: self.memory_bytes() }
    }
}

/// A requested limit the server does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct LimitError {
    pub limit: Limit,
    pub reason: String,
}

/// Resolves each limit: the request's, else the function's default, else the server's;
/// then checks it against the tighter of the function's and the server's maximum.
pub fn resolve(
    requested: Requested,
    function: &FunctionLimits,
    server: &LimitDefaults,
) -> Result<InvocationLimits, LimitError> {
    let one = |limit, asked: Option<u64>, fn_default: Option<u64>, default: u64, fn_max: Option<u64>, max: u64| {
        let max = fn_max.map_or(max, |m: u64| m.min(max));
        match asked {
            Some(value) if value > max => {
                Err(LimitError { limit, reason: format!("{value} exceeds the maximum of {max}") })
            }
            Some(value) => Ok(value),
            None => Ok(fn_default.unwrap_or(default).min(max)),
        }
    };
    let cpu_quota_millis = one(
        Limit::CpuQuota,
        requested.cpu_quota_millis,
        function.cpu_quota,
        server.default_cpu_quota,
        function.max_cpu_quota,
        server.max_cpu_quota,
    )?;
    if cpu_quota_millis < MIN_CPU_QUOTA_MILLIS {
        return Err(LimitError {
            limit: Limit::CpuQuota,
            reason: format!("{cpu_quota_millis} is below the minimum of {MIN_CPU_QUOTA_MILLIS} millicores"),
        });
    }
    Ok(InvocationLimits {
        cpu_quota_millis,
        memory_mb: one(
            Limit::Memory,
            requested.memory_mb,
            function.memory_mb,
            server.default_memory_mb,
            function.max_memory_mb,
            server.max_memory_mb,
        )?,
        timeout_ms: one(
            Limit::Timeout,
            requested.timeout_ms,
            function.timeout_ms,
            server.default_timeout_ms,
            function.max_timeout_ms,
            server.max_timeout_ms,
        )?,
    })
}
