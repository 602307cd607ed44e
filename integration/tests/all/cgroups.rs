//! Per-worker cgroups on the real kernel (as root; skipped with a printed reason elsewhere):
//! placement, CPU and memory limits per invocation, accounting, OOM kills, pids, cleanup,
//! and the off switch.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use nix::sys::signal::Signal;
use wasmbox_integration::{Supervisor, skip_without_cgroups};

fn required() -> wasmbox_integration::Builder {
    Supervisor::builder().env("WASMBOX_CGROUPS", "required")
}

/// The parent cgroup directories the supervisor reports on /stats.
async fn parents(s: &Supervisor) -> anyhow::Result<Vec<PathBuf>> {
    let stats = s.get("/stats").await?.json();
    let dirs = stats["cgroups"]["parents"]
        .as_array()
        .ok_or_else(|| anyhow::anyhow!("no cgroups in /stats: {stats}"))?
        .iter()
        .filter_map(|p| p.as_str().map(PathBuf::from))
        .collect();
    Ok(dirs)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn slot_of(worker_header: &str) -> usize {
    worker_header.split('.').next().and_then(|s| s.parse().ok()).expect("worker header is slot.generation")
}

/// The directory of `parents` that carries `file` (v1: one hierarchy per controller).
fn dir_with(parents: &[PathBuf], slot: usize, file: &str) -> PathBuf {
    parents
        .iter()
        .map(|p| p.join(format!("worker-{slot}")))
        .find(|d| d.join(file).exists())
        .unwrap_or_else(|| panic!("no worker-{slot} cgroup has {file}"))
}

/// CPU time the kernel accounted to a cgroup (v1 cpuacct.usage, v2 cpu.stat usage_usec).
fn kernel_cpu(parents: &[PathBuf], slot: usize) -> Duration {
    for p in parents {
        let dir = p.join(format!("worker-{slot}"));
        if let Ok(ns) = std::fs::read_to_string(dir.join("cpuacct.usage")) {
            return Duration::from_nanos(ns.trim().parse().expect("cpuacct.usage"));
        }
        if let Ok(stat) = std::fs::read_to_string(dir.join("cpu.stat")) {
            if let Some(us) = stat.lines().find_map(|l| l.strip_prefix("usage_usec ")) {
                return Duration::from_micros(us.trim().parse().expect("usage_usec"));
            }
        }
    }
    panic!("no CPU accounting for worker-{slot}")
}

#[tokio::test]
async fn every_worker_is_confined_to_its_own_cgroup_from_its_start() -> anyhow::Result<()> {
    if skip_without_cgroups("every_worker_is_confined_to_its_own_cgroup_from_its_start") {
        return Ok(());
    }
    let s = required().workers(3).function("hello").start()?;
    s.wait_pool_full(3, Duration::from_secs(30)).await?;
    let parents = parents(&s).await?;
    assert!(!parents.is_empty());
    let mut slots_seen = Vec::new();
    for pid in s.worker_pids() {
        let membership = read(Path::new(&format!("/proc/{pid}/cgroup")));
        let slot = membership
            .lines()
            .filter_map(|l| l.rsplit('/').next())
            .find_map(|last| last.strip_prefix("worker-"))
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or_else(|| panic!("worker {pid} is in no worker cgroup:\n{membership}"));
        slots_seen.push(slot);
        for parent in &parents {
            let dir = parent.join(format!("worker-{slot}"));
            let procs = read(&dir.join("cgroup.procs"));
            assert_eq!(procs.split_whitespace().collect::<Vec<_>>(), [pid.to_string()], "{}", dir.display());
        }
        // Everything the worker ever ran was accounted inside its cgroup (created empty at
        // start): had it run unconfined first, its own CPU time would exceed the cgroup's.
        let stat = procfs::process::Process::new(pid)?.stat()?;
        let own = Duration::from_millis((stat.utime + stat.stime) * 1000 / procfs::ticks_per_second());
        let accounted = kernel_cpu(&parents, slot);
        assert!(accounted + Duration::from_millis(10) >= own, "worker {pid}: cgroup {accounted:?} < process {own:?}");
    }
    slots_seen.sort_unstable();
    assert_eq!(slots_seen, [0, 1, 2], "one cgroup per slot");
    let hello = s.get("/hello").await?;
    assert_eq!(hello.status, StatusCode::OK);
    assert!(s.logs().contains("cgroups: v"), "startup logs the layout:\n{}", s.logs());
    Ok(())
}

/// One `cpu-spin` for 1 s of wall time at `millicores`: the CPU time the response header
/// reports, the wall time of the whole request (a window that contains the one the
/// supervisor measured the CPU time over), the slot's kernel CPU counter after it, and how
/// often the kernel throttled the slot's cgroup so far.
struct Spin {
    cpu: Duration,
    window: Duration,
    kernel_cpu: Duration,
    throttled: u64,
}

async fn spin(s: &Supervisor, millicores: &str) -> anyhow::Result<Spin> {
    let parents = parents(s).await?;
    let sent = std::time::Instant::now();
    let r = s.request(Method::GET, "/cpu-spin?arg=1000", &[("cpu_quota", millicores)], Bytes::new()).await?;
    let window = sent.elapsed();
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let cpu = Duration::from_micros(r.header("x-wasmbox-cpu-time-us").expect("cpu time header").parse()?);
    let slot = slot_of(r.header("x-wasmbox-worker").expect("worker header"));
    Ok(Spin { cpu, window, kernel_cpu: kernel_cpu(&parents, slot), throttled: throttled(&parents, slot) })
}

/// Periods in which the kernel throttled a slot's cgroup (cpu.stat `nr_throttled`, v1 and v2).
fn throttled(parents: &[PathBuf], slot: usize) -> u64 {
    parents
        .iter()
        .filter_map(|p| std::fs::read_to_string(p.join(format!("worker-{slot}")).join("cpu.stat")).ok())
        .find_map(|stat| stat.lines().find_map(|l| l.strip_prefix("nr_throttled ")).and_then(|n| n.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no cpu.stat nr_throttled for worker-{slot}"))
}

/// The CFS bandwidth period the supervisor sets (`cgroup::CPU_PERIOD_US`).
const CPU_PERIOD: Duration = Duration::from_millis(100);

/// What the kernel guarantees, whatever else the machine is doing: a cgroup with a quota of
/// q CPUs gets at most q x period of CPU in each period, so within a window of W it uses at
/// most q x (W + two periods) (the window may cut two periods, each of which may have spent
/// its whole quota inside the window), plus a little accounting granularity. Without that quota the same spin uses more than that bound, and
/// the kernel reports that it throttled the quota-limited run.
#[tokio::test]
async fn cpu_quota_bounds_cpu_time_by_what_the_kernel_guarantees() -> anyhow::Result<()> {
    if skip_without_cgroups("cpu_quota_bounds_cpu_time_by_what_the_kernel_guarantees") {
        return Ok(());
    }
    let s = required().workers(1).function("cpu-spin").start()?;
    s.get("/cpu-spin?arg=1").await?; // compile outside the measurement
    let kernel_before = kernel_cpu(&parents(&s).await?, 0);
    let limited = spin(&s, "250").await?;
    let bound = (limited.window + 2 * CPU_PERIOD).mul_f64(0.25) + Duration::from_millis(10);
    let throttled_before = limited.throttled;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let unlimited = spin(&s, &(cpus * 1000).to_string()).await?;
    eprintln!(
        "cpu_quota 250: {:?} of CPU in {:?} (bound {bound:?}); no quota: {:?} in {:?}; throttled periods {throttled_before} then {}",
        limited.cpu, limited.window, unlimited.cpu, unlimited.window, unlimited.throttled
    );
    assert!(
        limited.cpu <= bound,
        "cpu_quota 250 used {:?} of CPU in {:?}: above {bound:?}",
        limited.cpu,
        limited.window
    );
    assert!(throttled_before >= 1, "the kernel never throttled the cpu_quota 250 run");
    // The header is the kernel's own counter over the invocation.
    let kernel_delta = limited.kernel_cpu - kernel_before;
    assert!(
        kernel_delta >= limited.cpu && kernel_delta <= limited.cpu + Duration::from_millis(20),
        "kernel counter moved {kernel_delta:?}, header says {:?}",
        limited.cpu
    );
    let unlimited_bound = (unlimited.window + 2 * CPU_PERIOD).mul_f64(0.25) + Duration::from_millis(10);
    assert!(
        unlimited.cpu > unlimited_bound,
        "without the quota the spin used only {:?} in {:?}, within what a quarter CPU allows ({unlimited_bound:?})",
        unlimited.cpu,
        unlimited.window
    );
    Ok(())
}

#[tokio::test]
async fn memory_over_the_cgroup_limit_is_oom_killed_and_the_pool_recovers() -> anyhow::Result<()> {
    if skip_without_cgroups("memory_over_the_cgroup_limit_is_oom_killed_and_the_pool_recovers") {
        return Ok(());
    }
    let s = required()
        .workers(1)
        .env("WASMBOX_CGROUP_MEMORY_HEADROOM_MB", 16)
        .env("WASMBOX_MAX_OUTPUT_BYTES", 1 << 20)
        .function("alloc")
        .function("hello")
        .module("table-hog", wasmbox_integration::table_hog())
        .start()?;

    // Linear memory past Memory-Request: the engine refuses, the worker stays.
    let r = s.request(Method::GET, "/alloc?arg=64", &[("Memory-Request", "32")], Bytes::new()).await?;
    assert_eq!((r.status, r.kind().as_str()), (StatusCode::INSUFFICIENT_STORAGE, "memory_limit_exceeded"));
    let worker = r.header("x-wasmbox-worker").map(str::to_owned);
    let limit: u64 = r.header("x-wasmbox-memory-limit-bytes").expect("limit header").parse()?;
    assert!(limit >= 32 << 20, "kernel limit {limit} covers Memory-Request");
    let ok = s.request(Method::GET, "/alloc?arg=16", &[("Memory-Request", "32")], Bytes::new()).await?;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text());
    assert_eq!(ok.header("x-wasmbox-worker").map(str::to_owned), worker, "same worker reused");
    let peak: u64 = ok.header("x-wasmbox-memory-peak-bytes").expect("peak header").parse()?;
    assert!(peak >= 16 << 20, "peak {peak} includes the 16 MiB the guest touched");

    // Host-side memory past the kernel limit: OOM-killed, reported as such.
    let r = s.request(Method::GET, "/table-hog", &[("Memory-Request", "1")], Bytes::new()).await?;
    assert_eq!((r.status, r.kind().as_str()), (StatusCode::INSUFFICIENT_STORAGE, "oom_killed"), "{}", r.text());
    assert_eq!(r.json()["memory_request_mb"], 1);
    assert!(r.json()["cgroup_memory_limit_bytes"].as_u64().is_some_and(|l| l < 128 << 20), "{}", r.text());

    // The pool replaced the worker and counted the kill.
    s.wait_pool_full(1, Duration::from_secs(30)).await?;
    let hello = s.get("/hello").await?;
    assert_eq!(hello.status, StatusCode::OK);
    assert_ne!(hello.header("x-wasmbox-worker").map(str::to_owned), worker, "a new worker");
    let stats = s.get("/stats").await?.json();
    assert_eq!(stats["pool"]["oom_kills"], 1, "{stats}");
    assert_eq!(stats["functions"]["table-hog"]["oom_kills"], 1, "{stats}");
    Ok(())
}

#[tokio::test]
async fn pids_max_is_written_to_every_worker_cgroup() -> anyhow::Result<()> {
    if skip_without_cgroups("pids_max_is_written_to_every_worker_cgroup") {
        return Ok(());
    }
    let s = required().workers(2).env("WASMBOX_PIDS_MAX", 37).function("hello").start()?;
    let parents = parents(&s).await?;
    for slot in 0..2 {
        let dir = dir_with(&parents, slot, "pids.max");
        assert_eq!(read(&dir.join("pids.max")).trim(), "37", "{}", dir.display());
    }
    assert_eq!(s.get("/hello").await?.status, StatusCode::OK);
    Ok(())
}

#[tokio::test]
async fn cgroups_are_removed_at_shutdown_and_after_a_crash() -> anyhow::Result<()> {
    if skip_without_cgroups("cgroups_are_removed_at_shutdown_and_after_a_crash") {
        return Ok(());
    }
    // Graceful: nothing remains.
    let mut s = required().workers(2).function("hello").start()?;
    let dirs = parents(&s).await?;
    assert!(dirs.iter().all(|d| d.join("worker-1").is_dir()));
    s.signal(Signal::SIGTERM)?;
    let status = s.wait_exit(Duration::from_secs(20)).await?;
    assert!(status.success(), "{status:?}\n{}", s.logs());
    for d in &dirs {
        assert!(!d.exists(), "{} left after graceful shutdown", d.display());
    }

    // SIGKILL: the cgroups stay; the next start with the same parent removes them, and its
    // own shutdown leaves nothing.
    let parent = wasmbox_integration::unique_cgroup_parent();
    let mut crashed = required().workers(2).env("WASMBOX_CGROUP_PARENT", &parent).function("hello").start()?;
    let dirs = parents(&crashed).await?;
    crashed.signal(Signal::SIGKILL)?;
    let _ = crashed.wait_exit(Duration::from_secs(20)).await?;
    assert!(dirs.iter().all(|d| d.join("worker-0").is_dir()), "a killed supervisor cannot clean up");
    let mut next = required().workers(1).env("WASMBOX_CGROUP_PARENT", &parent).function("hello").start()?;
    assert!(next.logs().contains("left by a previous run"), "{}", next.logs());
    assert!(dirs.iter().all(|d| !d.join("worker-1").exists()), "leftover worker-1 removed");
    assert_eq!(next.get("/hello").await?.status, StatusCode::OK);
    next.signal(Signal::SIGTERM)?;
    let status = next.wait_exit(Duration::from_secs(20)).await?;
    assert!(status.success(), "{status:?}\n{}", next.logs());
    for d in &dirs {
        assert!(!d.exists(), "{} left after the restart's shutdown", d.display());
    }
    Ok(())
}

/// Every directory named `name` in any mounted cgroup hierarchy, up to a few levels deep.
pub(crate) fn cgroup_dirs_named(name: &str) -> Vec<PathBuf> {
    fn walk(dir: &Path, name: &str, depth: usize, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if !path.is_dir() {
                continue;
            }
            if entry.file_name() == name {
                out.push(path.clone());
            }
            if depth > 0 {
                walk(&path, name, depth - 1, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(Path::new("/sys/fs/cgroup"), name, 4, &mut out);
    out
}

#[tokio::test]
async fn off_and_enable_cgroups_false_touch_no_cgroup() -> anyhow::Result<()> {
    if skip_without_cgroups("off_and_enable_cgroups_false_touch_no_cgroup") {
        return Ok(());
    }
    let supervisor_cgroup = read(Path::new("/proc/self/cgroup"));
    for (key, value) in [("WASMBOX_CGROUPS", "off"), ("ENABLE_CGROUPS", "false")] {
        let s = Supervisor::builder().workers(1).env(key, value).function("hello").start()?;
        let r = s.get("/hello").await?;
        assert_eq!(r.status, StatusCode::OK);
        for header in ["x-wasmbox-cpu-time-us", "x-wasmbox-memory-peak-bytes", "x-wasmbox-memory-limit-bytes"] {
            assert!(r.header(header).is_none(), "{key}={value}: {header} without cgroups");
        }
        assert!(s.get("/stats").await?.json()["cgroups"].is_null());
        assert!(cgroup_dirs_named(&s.cgroup_parent).is_empty(), "{key}={value} created a cgroup");
        // Workers stay where the supervisor is (the test harness's cgroups).
        for pid in s.worker_pids() {
            assert_eq!(read(Path::new(&format!("/proc/{pid}/cgroup"))), supervisor_cgroup, "{key}={value}");
        }
        assert!(s.logs().contains("cgroups: off"), "{}", s.logs());
    }
    Ok(())
}
