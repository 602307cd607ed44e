//! Prometheus metrics (`GET /metrics`, OpenMetrics text), built with prometheus-client.
//!
//! Invocation counts and latency histograms are recorded as invocations finish. What other
//! parts of the supervisor already count (the pool's state and restarts, the per-function
//! cgroup usage ledger) is copied into the registry when it is scraped, so there is one
//! source for each number.

use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use wasmbox_protocol::ModuleSource;

use crate::usage::FunctionUsage;

/// The content type of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FunctionOutcome {
    function: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Phase {
    phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FunctionLabel {
    function: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Source {
    source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkerState {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Pool {
    pool: &'static str,
}

pub struct Metrics {
    /// Held while a scrape copies counters in and encodes, so two scrapes never add the
    /// same difference twice.
    registry: Mutex<Registry>,
    invocations: Family<FunctionOutcome, Counter>,
    duration: Family<Phase, Histogram>,
    module_loads: Family<Source, Counter>,
    workers: Family<WorkerState, Gauge>,
    queued: Gauge,
    restarts: Counter,
    oom_kills: Counter,
    tenant_switches: Counter,
    zygote_restarts: Counter,
    exits: Family<Reason, Counter>,
    cpu_seconds: Family<FunctionLabel, Counter<f64, AtomicU64>>,
    memory_peak: Family<FunctionLabel, Gauge>,
    function_oom_kills: Family<FunctionLabel, Counter>,
    cold_starts: Counter,
    ready: Gauge,
    memory_utilization: Gauge<f64, AtomicU64>,
    memory_working_set: Gauge,
    memory_limit: Gauge,
    sessions: Gauge,
    connections: Family<Pool, Gauge>,
    buffered: Gauge,
    buffers_refused: Counter,
    client_timeouts: Family<Phase, Counter>,
    log_lines_dropped: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("wasmbox");
        let invocations = Family::<FunctionOutcome, Counter>::default();
        registry.register(
            "invocations",
            "Invocations by function and outcome (the error kind, or ok)",
            invocations.clone(),
        );
        // 50 us to about 100 s, doubling.
        let duration =
            Family::<Phase, Histogram>::new_with_constructor(|| Histogram::new(exponential_buckets(50e-6, 2.0, 22)));
        registry.register(
            "invocation_duration_seconds",
            "Invocation latency by phase: queue (waiting for a worker), exec (the guest, in the worker), \
             total (request received to response ready)",
            duration.clone(),
        );
        let module_loads = Family::<Source, Counter>::default();
        registry.register(
            "module_loads",
            "Where the worker found the module it ran: memory (warm), artifact (precompiled cache hit), \
             compiled (cache miss: a cold start that compiled)",
            module_loads.clone(),
        );
        let workers = Family::<WorkerState, Gauge>::default();
        registry.register(
            "workers",
            "Worker processes by state: configured, live, idle, busy, spare (idle and bound to no tenant yet)",
            workers.clone(),
        );
        let queued = Gauge::default();
        registry.register("queue_depth", "Requests waiting for a free worker", queued.clone());
        let restarts = Counter::default();
        registry.register("worker_restarts", "Worker processes replaced, for any reason", restarts.clone());
        let oom_kills = Counter::default();
        registry.register("worker_oom_kills", "Workers the kernel OOM-killed", oom_kills.clone());
        let tenant_switches = Counter::default();
        registry.register(
            "tenant_switches",
            "Requests whose tenant no idle worker served: given a spare, or a slot recycled into a fresh process",
            tenant_switches.clone(),
        );
        let zygote_restarts = Counter::default();
        registry.register(
            "zygote_restarts",
            "Times the zygote (the process workers are forked from) was started again after it died",
            zygote_restarts.clone(),
        );
        let exits = Family::<Reason, Counter>::default();
        registry.register(
            "worker_exits",
            "Workers that ended while the pool ran (each then replaced), by reason: crash, oom_kill, seccomp, \
             timeout_kill, recycle, discarded, tenant_switch",
            exits.clone(),
        );
        let cpu_seconds = Family::<FunctionLabel, Counter<f64, AtomicU64>>::default();
        registry.register(
            "function_cpu_seconds",
            "CPU time of invocations by function, from the worker cgroups",
            cpu_seconds.clone(),
        );
        let memory_peak = Family::<FunctionLabel, Gauge>::default();
        registry.register(
            "function_memory_peak_bytes",
            "Highest memory peak of one invocation by function, from the worker cgroups",
            memory_peak.clone(),
        );
        let function_oom_kills = Family::<FunctionLabel, Counter>::default();
        registry.register(
            "function_oom_kills",
            "Invocations whose worker the kernel OOM-killed, by function",
            function_oom_kills.clone(),
        );
        let cold_starts = Counter::default();
        registry.register(
            "cold_starts",
            "Invocations whose module was not in the worker's memory (loaded from an artifact or compiled)",
            cold_starts.clone(),
        );
        let ready = Gauge::default();
        registry.register("ready", "1 while /ready answers 200, else 0", ready.clone());
        let memory_utilization = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "memory_utilization_ratio",
            "Mean memory utilization of the supervisor's cgroup over the readiness window (0-1)",
            memory_utilization.clone(),
        );
        let memory_working_set = Gauge::default();
        registry.register(
            "memory_working_set_bytes",
            "Working set of the supervisor's cgroup (supervisor and workers) at the last sample",
            memory_working_set.clone(),
        );
        let memory_limit = Gauge::default();
        registry.register(
            "memory_limit_bytes",
            "Memory limit of the supervisor's cgroup (the host's memory without one)",
            memory_limit.clone(),
        );
        let sessions = Gauge::default();
        registry.register("sessions", "Stateful sessions held (WASMBOX_SESSION_MAX is the limit)", sessions.clone());
        let connections = Family::<Pool, Gauge>::default();
        registry.register(
            "http_connections",
            "Open client connections: main (WASMBOX_MAX_CONNECTIONS) and reserve (health endpoints only)",
            connections.clone(),
        );
        let buffered = Gauge::default();
        registry.register(
            "buffered_bytes",
            "Bytes held for clients: request bodies, session state, unsent responses (WASMBOX_MAX_BUFFERED_BYTES)",
            buffered.clone(),
        );
        let buffers_refused = Counter::default();
        registry.register(
            "buffers_refused",
            "Requests answered 503 overloaded because the bytes held for clients stayed at their limit",
            buffers_refused.clone(),
        );
        let client_timeouts = Family::<Phase, Counter>::default();
        registry.register(
            "client_timeouts",
            "Clients cut off for being too slow: phase body (408) or response (connection closed)",
            client_timeouts.clone(),
        );
        let log_lines_dropped = Counter::default();
        registry.register(
            "log_lines_dropped",
            "Log lines dropped because stderr did not take them (the log buffer stayed full)",
            log_lines_dropped.clone(),
        );
        Metrics {
            registry: Mutex::new(registry),
            log_lines_dropped,
            connections,
            buffered,
            buffers_refused,
            client_timeouts,
            sessions,
            cold_starts,
            ready,
            memory_utilization,
            memory_working_set,
            memory_limit,
            invocations,
            duration,
            module_loads,
            workers,
            queued,
            restarts,
            oom_kills,
            tenant_switches,
            zygote_restarts,
            exits,
            cpu_seconds,
            memory_peak,
            function_oom_kills,
        }
    }

    /// One finished invocation of a function that exists. `outcome` is "ok" or the error
    /// kind of the answer; `exec` and `source` are known when a worker ran it.
    pub fn record_invocation(
        &self,
        function: &str,
        outcome: &str,
        queue: Duration,
        exec: Option<Duration>,
        total: Duration,
        source: Option<ModuleSource>,
    ) {
        self.invocations.get_or_create(&FunctionOutcome { function: function.into(), outcome: outcome.into() }).inc();
        self.duration.get_or_create(&Phase { phase: "queue" }).observe(queue.as_secs_f64());
        if let Some(exec) = exec {
            self.duration.get_or_create(&Phase { phase: "exec" }).observe(exec.as_secs_f64());
        }
        self.duration.get_or_create(&Phase { phase: "total" }).observe(total.as_secs_f64());
        if let Some(source) = source {
            self.module_loads.get_or_create(&Source { source: source.as_str() }).inc();
            if source != ModuleSource::Memory {
                self.cold_starts.inc();
            }
        }
    }

    /// The number of sessions the store holds, as of the next scrape.
    pub fn set_sessions(&self, count: usize) {
        self.sessions.set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// The registry as OpenMetrics text, after copying in the pool's state and the usage
    /// ledger's totals.
    pub fn encode<'a>(
        &self,
        usage: impl IntoIterator<Item = (&'a String, &'a FunctionUsage)>,
        readiness: &crate::Readiness,
    ) -> Result<String, std::fmt::Error> {
        let pool = &readiness.pool;
        let registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        let gauge = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
        let bytes = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.ready.set(i64::from(readiness.ready));
        if let Some(m) = readiness.load.memory_utilization {
            self.memory_utilization.set(m);
        }
        if let Some(m) = readiness.load.memory {
            self.memory_working_set.set(bytes(m.working_set_bytes));
            self.memory_limit.set(bytes(m.limit_bytes));
        }
        for (state, value) in [
            ("configured", pool.configured),
            ("live", pool.live),
            ("idle", pool.idle),
            ("busy", pool.busy),
            ("spare", pool.spares),
        ] {
            self.workers.get_or_create(&WorkerState { state }).set(gauge(value));
        }
        self.queued.set(gauge(pool.queued));
        let http = &readiness.http;
        self.connections.get_or_create(&Pool { pool: "main" }).set(gauge(http.open_connections));
        self.connections.get_or_create(&Pool { pool: "reserve" }).set(gauge(http.reserve_connections));
        self.buffered.set(bytes(readiness.buffers.used_bytes));
        catch_up(&self.buffers_refused, readiness.buffers.refused);
        catch_up(&self.log_lines_dropped, crate::logwriter::dropped_total());
        catch_up(&self.client_timeouts.get_or_create(&Phase { phase: "body" }), http.body_timeouts);
        catch_up(&self.client_timeouts.get_or_create(&Phase { phase: "response" }), http.response_timeouts);
        catch_up(&self.restarts, pool.restarts);
        catch_up(&self.oom_kills, pool.oom_kills);
        catch_up(&self.tenant_switches, pool.tenant_switches);
        catch_up(&self.zygote_restarts, pool.zygote_restarts);
        for (reason, total) in pool.exits.by_reason() {
            catch_up(&self.exits.get_or_create(&Reason { reason }), total);
        }
        for (name, used) in usage {
            let function = FunctionLabel { function: name.clone() };
            let cpu = self.cpu_seconds.get_or_create(&function);
            let behind = used.cpu_seconds - cpu.get();
            if behind > 0.0 {
                cpu.inc_by(behind);
            }
            self.memory_peak
                .get_or_create(&function)
                .set(i64::try_from(used.memory_peak_bytes_max).unwrap_or(i64::MAX));
            catch_up(&self.function_oom_kills.get_or_create(&function), used.oom_kills);
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry)?;
        Ok(out)
    }
}

/// Advances a counter to a total kept elsewhere (which only grows).
fn catch_up(counter: &Counter, total: u64) {
    let behind = total.saturating_sub(counter.get());
    if behind > 0 {
        counter.inc_by(behind);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(restarts: u64) -> crate::pool::PoolStatus {
        crate::pool::PoolStatus {
            configured: 2,
            live: 2,
            idle: 1,
            busy: 1,
            queued: 3,
            draining: false,
            restarts,
            oom_kills: 1,
            spares: 1,
            tenant_switches: 4,
            zygote_restarts: 2,
            exec_spawns: 0,
            exits: crate::pool::WorkerExits { crash: 2, recycle: 1, ..Default::default() },
        }
    }

    #[test]
    fn invocations_latency_pool_and_usage_are_exposed() {
        let m = Metrics::new();
        let ms = Duration::from_millis;
        m.record_invocation("hello", "ok", ms(0), Some(ms(1)), ms(2), Some(ModuleSource::Compiled));
        m.record_invocation("hello", "ok", ms(0), Some(ms(1)), ms(2), Some(ModuleSource::Memory));
        m.record_invocation("hello", "timeout", ms(5), None, ms(9), None);
        let usage = [(
            "hello".to_string(),
            FunctionUsage {
                tenant: "hello".into(),
                invocations: 2,
                cpu_seconds: 0.25,
                memory_peak_bytes_max: 4096,
                oom_kills: 0,
            },
        )];
        let readiness = crate::Readiness {
            ready: false,
            reasons: vec!["memory"],
            pool: pool(4),
            load: crate::readiness::LoadState {
                overloaded: true,
                reasons: vec!["memory"],
                memory_utilization: Some(0.95),
                memory: Some(crate::readiness::MemoryReading { working_set_bytes: 950, limit_bytes: 1000 }),
                ..Default::default()
            },
            http: crate::http::ConnectionStats {
                open_connections: 7,
                max_connections: 8,
                reserve_connections: 1,
                max_reserve_connections: 2,
                limit_reached: 0,
                reserve_accepted: 3,
                body_timeouts: 4,
                response_timeouts: 5,
            },
            buffers: crate::BufferStats { used_bytes: 1234, max_bytes: 4096, refused: 6 },
        };
        m.set_sessions(3);
        let text = m.encode(usage.iter().map(|(k, v)| (k, v)), &readiness).unwrap();
        for line in [
            "wasmbox_invocations_total{function=\"hello\",outcome=\"ok\"} 2",
            "wasmbox_invocations_total{function=\"hello\",outcome=\"timeout\"} 1",
            "wasmbox_invocation_duration_seconds_count{phase=\"total\"} 3",
            "wasmbox_invocation_duration_seconds_count{phase=\"exec\"} 2",
            "wasmbox_module_loads_total{source=\"compiled\"} 1",
            "wasmbox_module_loads_total{source=\"memory\"} 1",
            "wasmbox_workers{state=\"busy\"} 1",
            "wasmbox_workers{state=\"spare\"} 1",
            "wasmbox_tenant_switches_total 4",
            "wasmbox_zygote_restarts_total 2",
            "wasmbox_queue_depth 3",
            "wasmbox_http_connections{pool=\"main\"} 7",
            "wasmbox_http_connections{pool=\"reserve\"} 1",
            "wasmbox_buffered_bytes 1234",
            "wasmbox_buffers_refused_total 6",
            "wasmbox_client_timeouts_total{phase=\"body\"} 4",
            "wasmbox_client_timeouts_total{phase=\"response\"} 5",
            "wasmbox_worker_restarts_total 4",
            "wasmbox_worker_oom_kills_total 1",
            "wasmbox_worker_exits_total{reason=\"crash\"} 2",
            "wasmbox_worker_exits_total{reason=\"recycle\"} 1",
            "wasmbox_worker_exits_total{reason=\"seccomp\"} 0",
            "wasmbox_function_cpu_seconds_total{function=\"hello\"} 0.25",
            "wasmbox_function_memory_peak_bytes{function=\"hello\"} 4096",
            "wasmbox_cold_starts_total 1",
            "wasmbox_ready 0",
            "wasmbox_sessions 3",
            "wasmbox_memory_utilization_ratio 0.95",
            "wasmbox_memory_working_set_bytes 950",
            "wasmbox_memory_limit_bytes 1000",
            // Process-wide (other tests may drop lines): only that it is there.
            "wasmbox_log_lines_dropped_total ",
            "# EOF",
        ] {
            assert!(text.contains(line), "missing {line:?} in:\n{text}");
        }
        // A second scrape copies only what changed: counters never count twice.
        let readiness = crate::Readiness { pool: pool(5), ..readiness };
        let text = m.encode(usage.iter().map(|(k, v)| (k, v)), &readiness).unwrap();
        assert!(text.contains("wasmbox_worker_restarts_total 5"), "{text}");
        assert!(text.contains("wasmbox_function_cpu_seconds_total{function=\"hello\"} 0.25"), "{text}");
    }
}
