//! Resource-aware readiness: whether this replica should get more traffic.
//!
//! A sampler takes one [`Sample`] every `WASMBOX_READY_INTERVAL_MS`: the memory utilization
//! of the supervisor's cgroup (the container: the supervisor and all its workers) and the
//! number of requests waiting for a worker. `/ready` answers 503 while the mean over the
//! last `WASMBOX_READY_WINDOW_MS` of either is above its threshold
//! (`WASMBOX_READY_MEMORY_PERCENT`, `WASMBOX_READY_QUEUE_THRESHOLD`), so a load balancer
//! or Kubernetes stops routing to a replica that stays overloaded, while a spike shorter
//! than the window does not flap it; it answers 200 again once the means fall back below.
//! Draining and having no live worker make it 503 at once.
//!
//! Memory utilization is the working set (usage minus inactive file cache, what the kubelet
//! evicts on) over the cgroup's limit, or over the host's memory where the cgroup has no
//! limit. Without a memory cgroup to read, the host's `/proc/meminfo` is used.

use std::collections::VecDeque;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;

use crate::cgroup::fs::CgroupFs;
use crate::cgroup::layout::{Layout, Version};

/// v1's "no limit" is a page-rounded `i64::MAX`; anything this large means unlimited.
const V1_UNLIMITED: u64 = 1 << 62;

/// Where the memory figures come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemorySource {
    /// The supervisor's memory cgroup.
    Cgroup { dir: PathBuf, version: Version, meminfo: PathBuf },
    /// The whole host (`/proc/meminfo`).
    Host { meminfo: PathBuf },
}

/// One reading of memory: bytes in use and the bytes that count as 100%.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MemoryReading {
    pub working_set_bytes: u64,
    pub limit_bytes: u64,
}

impl MemoryReading {
    pub fn utilization(&self) -> f64 {
        if self.limit_bytes == 0 { 0.0 } else { self.working_set_bytes as f64 / self.limit_bytes as f64 }
    }
}

impl MemorySource {
    /// The supervisor's own memory cgroup as the host lays it out, read before the
    /// supervisor moves itself anywhere; the host's figures where there is none.
    pub fn detect(fs: &dyn CgroupFs) -> MemorySource {
        let meminfo = fs.root().join("proc/meminfo");
        match Layout::detect(fs) {
            Ok(layout) => match layout.hierarchy_of("memory") {
                Some(h) => MemorySource::Cgroup { dir: h.own_dir(), version: layout.version, meminfo },
                None => MemorySource::Host { meminfo },
            },
            Err(_) => MemorySource::Host { meminfo },
        }
    }

    pub fn describe(&self) -> String {
        match self {
            MemorySource::Cgroup { dir, version, .. } => format!("cgroup {version} {}", dir.display()),
            MemorySource::Host { .. } => "host /proc/meminfo".into(),
        }
    }

    pub fn read(&self) -> Result<MemoryReading, String> {
        match self {
            MemorySource::Host { meminfo } => read_meminfo(meminfo),
            MemorySource::Cgroup { dir, version, meminfo } => {
                let (usage_file, limit_file, inactive_key) = match version {
                    Version::V1 => ("memory.usage_in_bytes", "memory.limit_in_bytes", "total_inactive_file"),
                    Version::V2 => ("memory.current", "memory.max", "inactive_file"),
                };
                let usage = read_number(&dir.join(usage_file))?;
                let limit = match read_text(&dir.join(limit_file))?.trim() {
                    "max" => None,
                    text => Some(text.parse::<u64>().map_err(|e| format!("{limit_file}: {e}"))?),
                }
                .filter(|&l| l < V1_UNLIMITED);
                let stat = read_text(&dir.join("memory.stat")).unwrap_or_default();
                let inactive = stat_value(&stat, inactive_key).unwrap_or(0);
                let host_total = read_meminfo(meminfo).map(|m| m.limit_bytes).ok();
                let limit_bytes = match (limit, host_total) {
                    (Some(l), Some(h)) => l.min(h),
                    (Some(l), None) => l,
                    (None, Some(h)) => h,
                    (None, None) => return Err("the cgroup has no memory limit and the host total is unknown".into()),
                };
                Ok(MemoryReading { working_set_bytes: usage.saturating_sub(inactive), limit_bytes })
            }
        }
    }
}

fn read_text(path: &Path) -> Result<String, String> {
    fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))
}

fn read_number(path: &Path) -> Result<u64, String> {
    read_text(path)?.trim().parse().map_err(|e| format!("{}: {e}", path.display()))
}

fn stat_value(stat: &str, key: &str) -> Option<u64> {
    stat.lines().find_map(|line| {
        let (k, v) = line.split_once(' ')?;
        if k == key { v.trim().parse().ok() } else { None }
    })
}

/// Host memory: MemTotal minus MemAvailable in use, of MemTotal.
fn read_meminfo(path: &Path) -> Result<MemoryReading, String> {
    let text = read_text(path)?;
    let kib = |key: &str| {
        text.lines().find_map(|line| {
            let rest = line.strip_prefix(key)?.strip_prefix(':')?;
            rest.split_whitespace().next()?.parse::<u64>().ok().map(|v| v.saturating_mul(1024))
        })
    };
    let total = kib("MemTotal").ok_or("no MemTotal in /proc/meminfo")?;
    let available = kib("MemAvailable").ok_or("no MemAvailable in /proc/meminfo")?;
    Ok(MemoryReading { working_set_bytes: total.saturating_sub(available), limit_bytes: total })
}

/// The thresholds and the window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReadinessSettings {
    pub interval: Duration,
    pub window: Duration,
    /// Memory utilization (0..=1) above which the replica is overloaded.
    pub memory_threshold: f64,
    /// Mean waiting requests at or above which the replica is overloaded.
    pub queue_threshold: usize,
}

impl ReadinessSettings {
    /// Samples the window holds.
    fn capacity(&self) -> usize {
        let interval = self.interval.as_millis().max(1);
        (self.window.as_millis().div_ceil(interval) as usize).max(1)
    }
}

/// One sampling moment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub memory_utilization: Option<f64>,
    pub queued: usize,
}

/// What `/ready` reports about load.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LoadState {
    pub overloaded: bool,
    /// Why, when overloaded: "memory", "queue" or both.
    pub reasons: Vec<&'static str>,
    /// Mean memory utilization over the window (0..1), when known.
    pub memory_utilization: Option<f64>,
    pub memory_threshold: f64,
    /// Mean waiting requests over the window.
    pub queue_mean: f64,
    pub queue_threshold: usize,
    pub samples: usize,
    /// The latest reading.
    pub memory: Option<MemoryReading>,
}

/// The window of samples and the verdict on it.
#[derive(Debug)]
pub struct Readiness {
    settings: ReadinessSettings,
    window: Mutex<VecDeque<Sample>>,
    state: Mutex<LoadState>,
}

impl Readiness {
    pub fn new(settings: ReadinessSettings) -> Readiness {
        let state = LoadState {
            memory_threshold: settings.memory_threshold,
            queue_threshold: settings.queue_threshold,
            ..LoadState::default()
        };
        Readiness { settings, window: Mutex::new(VecDeque::new()), state: Mutex::new(state) }
    }

    pub fn settings(&self) -> &ReadinessSettings {
        &self.settings
    }

    /// Adds a sample, drops those older than the window, and decides again.
    pub fn record(&self, sample: Sample, memory: Option<MemoryReading>) -> LoadState {
        let mut window = self.window.lock().unwrap_or_else(|p| p.into_inner());
        window.push_back(sample);
        while window.len() > self.settings.capacity() {
            window.pop_front();
        }
        let n = window.len() as f64;
        let memory_values: Vec<f64> = window.iter().filter_map(|s| s.memory_utilization).collect();
        let memory_mean =
            (!memory_values.is_empty()).then(|| memory_values.iter().sum::<f64>() / memory_values.len() as f64);
        let queue_mean = window.iter().map(|s| s.queued as f64).sum::<f64>() / n;
        let mut reasons = Vec::new();
        if memory_mean.is_some_and(|m| m > self.settings.memory_threshold) {
            reasons.push("memory");
        }
        if queue_mean >= self.settings.queue_threshold as f64 {
            reasons.push("queue");
        }
        let state = LoadState {
            overloaded: !reasons.is_empty(),
            reasons,
            memory_utilization: memory_mean,
            memory_threshold: self.settings.memory_threshold,
            queue_mean,
            queue_threshold: self.settings.queue_threshold,
            samples: window.len(),
            memory,
        };
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = state.clone();
        state
    }

    pub fn state(&self) -> LoadState {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Takes one sample right away (reading files on the calling thread): the first verdict
/// exists before the server listens.
pub fn sample_now(readiness: &Readiness, source: &MemorySource, queued: usize) -> LoadState {
    let memory = source.read().ok();
    readiness.record(Sample { memory_utilization: memory.map(|m| m.utilization()), queued }, memory)
}

/// Samples until the pool closes: memory from `source` (on the blocking pool: it reads
/// files), the queue from `queued`. Logs each change of verdict.
pub async fn sample_forever(
    readiness: std::sync::Arc<Readiness>,
    source: MemorySource,
    queued: impl Fn() -> usize + Send + 'static,
) {
    let source = std::sync::Arc::new(source);
    let mut ticker = tokio::time::interval(readiness.settings().interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut was_overloaded = readiness.state().overloaded;
    let mut warned = false;
    // The first tick is immediate, but the caller took that sample already.
    ticker.tick().await;
    loop {
        ticker.tick().await;
        let reader = source.clone();
        let memory = match tokio::task::spawn_blocking(move || reader.read()).await {
            Ok(Ok(reading)) => Some(reading),
            Ok(Err(e)) => {
                if !warned {
                    tracing::warn!(source = %source.describe(), error = %e, "cannot read memory use; readiness follows the queue only");
                    warned = true;
                }
                None
            }
            Err(_) => None,
        };
        let state =
            readiness.record(Sample { memory_utilization: memory.map(|m| m.utilization()), queued: queued() }, memory);
        if state.overloaded != was_overloaded {
            was_overloaded = state.overloaded;
            if state.overloaded {
                tracing::warn!(reasons = ?state.reasons, memory = ?state.memory_utilization, queue = state.queue_mean,
                    "overloaded: /ready answers 503 until load falls");
            } else {
                tracing::info!(memory = ?state.memory_utilization, queue = state.queue_mean, "load fell: /ready answers 200 again");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroup::fs::fixture::{FixtureFs, Kind};

    fn settings() -> ReadinessSettings {
        ReadinessSettings {
            interval: Duration::from_millis(100),
            window: Duration::from_millis(400),
            memory_threshold: 0.8,
            queue_threshold: 4,
        }
    }

    fn sample(memory: f64, queued: usize) -> Sample {
        Sample { memory_utilization: Some(memory), queued }
    }

    #[test]
    fn a_spike_shorter_than_the_window_does_not_flip_it_but_sustained_load_does() {
        let r = Readiness::new(settings());
        assert_eq!(settings().capacity(), 4);
        for _ in 0..4 {
            assert!(!r.record(sample(0.5, 0), None).overloaded);
        }
        // One sample at 100% and a queue of 10: means 0.625 and 2.5, still under.
        let s = r.record(sample(1.0, 10), None);
        assert!(!s.overloaded, "{s:?}");
        // Sustained: the window fills with high samples.
        let mut s = r.record(sample(1.0, 0), None);
        s = if s.overloaded { s } else { r.record(sample(1.0, 0), None) };
        assert!(s.overloaded && s.reasons == ["memory"], "{s:?}");
        // Load falls: ready again once the mean drops below.
        let mut flipped_back = None;
        for i in 0..4 {
            if !r.record(sample(0.1, 0), None).overloaded {
                flipped_back = Some(i);
                break;
            }
        }
        assert!(flipped_back.is_some(), "{:?}", r.state());
    }

    #[test]
    fn queue_mean_at_the_threshold_is_overloaded() {
        let r = Readiness::new(settings());
        for _ in 0..4 {
            r.record(Sample { memory_utilization: None, queued: 4 }, None);
        }
        let s = r.state();
        assert!(s.overloaded && s.reasons == ["queue"] && s.memory_utilization.is_none(), "{s:?}");
        assert_eq!(s.samples, 4);
    }

    fn write(path: &Path, text: &str) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    }

    const MEMINFO: &str = "MemTotal:        1000000 kB\nMemFree:  1 kB\nMemAvailable:     250000 kB\n";

    #[test]
    fn v1_cgroup_working_set_over_its_limit() {
        let fs = FixtureFs::new(Kind::V1Hybrid, "/kubepods/pod1");
        write(&fs.dir.path().join("proc/meminfo"), MEMINFO);
        let source = MemorySource::detect(&fs);
        let MemorySource::Cgroup { dir, version: Version::V1, .. } = &source else { panic!("{source:?}") };
        assert!(dir.ends_with("memory/kubepods/pod1"), "{}", dir.display());
        write(&dir.join("memory.usage_in_bytes"), "600\n");
        write(&dir.join("memory.limit_in_bytes"), "1000\n");
        write(&dir.join("memory.stat"), "cache 500\ntotal_inactive_file 100\ninactive_file 7\n");
        let m = source.read().unwrap();
        assert_eq!(m, MemoryReading { working_set_bytes: 500, limit_bytes: 1000 });
        assert!((m.utilization() - 0.5).abs() < 1e-9);
        // No limit (v1's huge number): the host's total is 100%.
        write(&dir.join("memory.limit_in_bytes"), "9223372036854771712\n");
        assert_eq!(source.read().unwrap().limit_bytes, 1_000_000 * 1024);
    }

    #[test]
    fn v2_cgroup_and_host_fallback() {
        // Where the parent did not enable the memory controller there is no cgroup to read.
        let fs = FixtureFs::new(Kind::V2, "/kubepods.slice/pod2");
        assert!(matches!(MemorySource::detect(&fs), MemorySource::Host { .. }));

        let fs = FixtureFs::new(Kind::V2, "/pod2");
        write(&fs.dir.path().join("proc/meminfo"), MEMINFO);
        let source = MemorySource::detect(&fs);
        let MemorySource::Cgroup { dir, version: Version::V2, .. } = &source else { panic!("{source:?}") };
        write(&dir.join("memory.current"), "900\n");
        write(&dir.join("memory.max"), "max\n");
        write(&dir.join("memory.stat"), "anon 800\ninactive_file 100\n");
        assert_eq!(source.read().unwrap(), MemoryReading { working_set_bytes: 800, limit_bytes: 1_024_000_000 });
        write(&dir.join("memory.max"), "1600\n");
        assert_eq!(source.read().unwrap().utilization(), 0.5);
        // A missing file is an error the sampler reports, not a panic or a zero.
        fs::remove_file(dir.join("memory.current")).unwrap();
        assert!(source.read().unwrap_err().contains("memory.current"));

        let host = MemorySource::Host { meminfo: fs.dir.path().join("proc/meminfo") };
        let m = host.read().unwrap();
        assert_eq!((m.working_set_bytes, m.limit_bytes), (750_000 * 1024, 1_000_000 * 1024));
    }
}
