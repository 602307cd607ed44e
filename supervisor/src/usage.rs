//! Per-function resource usage from the cgroup accounting, kept for operators (`/stats`)
//! and metrics.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use crate::cgroup::Accounting;
use crate::registry::FunctionName;

/// Totals for one function since the supervisor started.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct FunctionUsage {
    /// The tenant the function belonged to at its latest invocation.
    pub tenant: String,
    /// Invocations with cgroup accounting.
    pub invocations: u64,
    pub cpu_seconds: f64,
    /// Highest per-invocation memory peak seen.
    pub memory_peak_bytes_max: u64,
    /// Invocations whose worker the kernel OOM-killed.
    pub oom_kills: u64,
}

/// Usage by function. Only functions that exist in the registry reach it, so it is as
/// bounded as the functions directory.
#[derive(Debug, Default)]
pub struct UsageLedger {
    functions: Mutex<HashMap<String, FunctionUsage>>,
}

impl UsageLedger {
    fn with(&self, name: &FunctionName, tenant: &str, update: impl FnOnce(&mut FunctionUsage)) {
        let mut functions = self.functions.lock().unwrap_or_else(|p| p.into_inner());
        let usage = match functions.get_mut(name.as_str()) {
            Some(usage) => usage,
            None => functions.entry(name.to_string()).or_default(),
        };
        if usage.tenant != tenant {
            usage.tenant = tenant.to_owned();
        }
        update(usage);
    }

    pub fn record(&self, name: &FunctionName, tenant: &str, used: &Accounting) {
        self.with(name, tenant, |u| {
            u.invocations += 1;
            u.cpu_seconds += used.cpu_time.map_or(0.0, |d| d.as_secs_f64());
            u.memory_peak_bytes_max = u.memory_peak_bytes_max.max(used.memory_peak_bytes.unwrap_or(0));
        });
    }

    pub fn record_oom_kill(&self, name: &FunctionName, tenant: &str) {
        self.with(name, tenant, |u| u.oom_kills += 1);
    }

    pub fn snapshot(&self) -> BTreeMap<String, FunctionUsage> {
        let functions = self.functions.lock().unwrap_or_else(|p| p.into_inner());
        functions.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn totals_add_up_per_function() {
        let ledger = UsageLedger::default();
        let a = FunctionName::parse("a").unwrap();
        let used = |ms, peak| Accounting {
            cpu_time: Some(Duration::from_millis(ms)),
            memory_peak_bytes: Some(peak),
            memory_limit_bytes: None,
        };
        ledger.record(&a, "a", &used(250, 10));
        ledger.record(&a, "acme", &used(500, 30));
        ledger.record_oom_kill(&a, "acme");
        let snapshot = ledger.snapshot();
        let usage = &snapshot["a"];
        assert_eq!(usage.tenant, "acme");
        assert_eq!(usage.invocations, 2);
        assert!((usage.cpu_seconds - 0.75).abs() < 1e-9);
        assert_eq!(usage.memory_peak_bytes_max, 30);
        assert_eq!(usage.oom_kills, 1);
    }
}
