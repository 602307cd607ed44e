//! One worker slot's cgroup: placement of a new worker, per-invocation limits, accounting
//! and OOM-kill events.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use cgroups_rs::fs::cpu::CpuController;
use cgroups_rs::fs::memory::MemController;
use cgroups_rs::fs::pid::PidController;
use cgroups_rs::fs::{Controller, MaxValue};

use super::layout::{Hierarchy, Membership, Version};
use super::{CPU_PERIOD_US, CgroupError, CgroupSettings, MIN_CPU_QUOTA_MILLIS};

/// What one invocation asks of its worker's cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotRequest {
    pub cpu_quota_millis: u64,
    /// `Memory-Request`: what the engine lets linear memory grow to.
    pub memory_request_bytes: u64,
    /// Host-side buffers this invocation may fill: stdin plus the stdout and stderr caps.
    pub io_bytes: u64,
}

/// Counter values taken just before an invocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint {
    cpu_usage_ns: Option<u64>,
    /// Where the CPU time is read: the worker process's CPU clock, else the cgroup's file.
    cpu_pid: Option<u32>,
    pub memory_limit_bytes: Option<u64>,
}

/// What one invocation used, from the kernel's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct Accounting {
    /// CPU time (user + system) of the worker during the invocation.
    pub cpu_time: Option<Duration>,
    /// Highest memory use of the worker during the invocation (its resident baseline
    /// included). `None` where the kernel cannot reset the peak (v2 before Linux 6.12).
    pub memory_peak_bytes: Option<u64>,
    /// The kernel memory limit the invocation ran under.
    pub memory_limit_bytes: Option<u64>,
}

#[derive(Debug, Default)]
struct Applied {
    cpu_quota_us: Option<u64>,
    memory_limit: Option<u64>,
}

/// A slot's cgroup (one directory per hierarchy), with the counters it reads per invocation
/// kept open.
#[derive(Debug)]
pub struct SlotCgroup {
    pub index: usize,
    version: Version,
    /// `(hierarchy, directory, namespace-view path)`.
    dirs: Vec<(Hierarchy, PathBuf, String)>,
    /// Opened for writing: what a new worker writes "0" into to enter the slot (see
    /// [`place_in_child`]).
    placement: Vec<File>,
    cpu: Option<CpuController>,
    memory: Option<MemController>,
    pids: Option<PidController>,
    /// v1 `cpuacct.usage` (ns); v2 `cpu.stat` (`usage_usec`).
    cpu_usage: Option<File>,
    /// v1 `memory.usage_in_bytes`; v2 `memory.current`.
    memory_current: Option<File>,
    /// v1 `memory.max_usage_in_bytes`; v2 `memory.peak`, when resettable.
    memory_peak: Option<File>,
    /// v1 `memory.oom_control`; v2 `memory.events`: both carry `oom_kill N`.
    memory_events: Option<PathBuf>,
    memory_headroom: u64,
    /// v2 `cgroup.kill` (Linux 5.14+), opened for writing.
    kill: Option<File>,
    applied: Mutex<Applied>,
    oom_kills_seen: AtomicU64,
}

impl SlotCgroup {
    pub(super) fn open(
        index: usize,
        version: Version,
        dirs: Vec<(Hierarchy, PathBuf, String)>,
        settings: &CgroupSettings,
    ) -> Result<SlotCgroup, CgroupError> {
        let v2 = version == Version::V2;
        let dir_for = |controller: &str| {
            dirs.iter().find(|(h, _, _)| h.controllers.contains(&controller)).map(|(_, d, _)| d.clone())
        };
        let open = |dir: &Path, name: &str, write: bool| -> Result<File, CgroupError> {
            let path = dir.join(name);
            OpenOptions::new()
                .read(name != PLACEMENT_V1 && name != PLACEMENT_V2)
                .write(write)
                .open(&path)
                .map_err(CgroupError::io(if write { "cannot open for writing" } else { "cannot open" }, &path))
        };
        let placement_file = if v2 { PLACEMENT_V2 } else { PLACEMENT_V1 };
        let placement = dirs.iter().map(|(_, d, _)| open(d, placement_file, true)).collect::<Result<Vec<_>, _>>()?;

        let cpu = dir_for("cpu").map(|d| CpuController::new(d, PathBuf::new(), v2));
        if let Some(cpu) = &cpu {
            if v2 {
                cpu.set_cfs_quota_and_period(None, Some(CPU_PERIOD_US))
            } else {
                cpu.set_cfs_period(CPU_PERIOD_US)
            }
            .map_err(controller_err("cannot set the CPU period of", cpu.path()))?;
        }
        let pids = dir_for("pids").map(|d| PidController::new(d, PathBuf::new(), v2));
        if let Some(pids) = &pids {
            let max = i64::try_from(settings.pids_max).unwrap_or(i64::MAX);
            pids.set_pid_max(MaxValue::Value(max)).map_err(controller_err("cannot set pids.max in", pids.path()))?;
        }
        let memory_dir = dir_for("memory");
        let memory = memory_dir.clone().map(|d| MemController::new(d, PathBuf::new(), v2));
        let (mut memory_current, mut memory_peak, mut memory_events) = (None, None, None);
        if let Some(dir) = &memory_dir {
            // Without swap accounting the limit is the limit; where swap exists it would let
            // a worker page its way past it.
            if v2 {
                let _ = std::fs::write(dir.join("memory.swap.max"), "0");
            } else {
                let _ = std::fs::write(dir.join("memory.swappiness"), "0");
            }
            memory_current = Some(open(dir, if v2 { "memory.current" } else { "memory.usage_in_bytes" }, false)?);
            let peak_name = if v2 { "memory.peak" } else { "memory.max_usage_in_bytes" };
            // v2's memory.peak resets per open file (Linux 6.12+); older kernels refuse the
            // write, and then no per-invocation peak can be had.
            memory_peak = open(dir, peak_name, true).ok().filter(|f| reset_peak(f).is_ok());
            if memory_peak.is_none() {
                tracing::debug!(cgroup = %dir.display(), "memory peak is not resettable here; no per-invocation peak");
            }
            memory_events = Some(dir.join(if v2 { "memory.events" } else { "memory.oom_control" }));
        }
        let cpu_usage = match version {
            Version::V1 => dir_for("cpuacct").map(|d| open(&d, "cpuacct.usage", false)).transpose()?,
            Version::V2 => dirs.first().map(|(_, d, _)| open(d, "cpu.stat", false)).transpose()?,
        };
        let kill = if v2 { dirs.first().and_then(|(_, d, _)| open(d, "cgroup.kill", true).ok()) } else { None };
        let slot = SlotCgroup {
            kill,
            index,
            version,
            dirs,
            placement,
            cpu,
            memory,
            pids,
            cpu_usage,
            memory_current,
            memory_peak,
            memory_events,
            memory_headroom: settings.memory_headroom_bytes,
            applied: Mutex::new(Applied::default()),
            oom_kills_seen: AtomicU64::new(0),
        };
        slot.oom_kills_seen.store(slot.oom_kills().unwrap_or(0), Ordering::Relaxed);
        Ok(slot)
    }

    /// Kills every process in the slot's cgroup at once, without the worker's (or its
    /// engine's) cooperation: v2 `cgroup.kill` where the kernel has it, otherwise SIGKILL
    /// to each process listed in the cgroup. Returns how it was done, for the log.
    pub fn kill_all(&self) -> std::io::Result<&'static str> {
        if let Some(file) = &self.kill {
            file.write_all_at(b"1", 0)?;
            return Ok("cgroup.kill");
        }
        let Some((_, dir, _)) = self.dirs.first() else { return Ok("nothing") };
        let procs = std::fs::read_to_string(dir.join("cgroup.procs"))?;
        for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL) {
                Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok("SIGKILL to each process in the cgroup")
    }

    /// Directories of this slot's cgroup, one per hierarchy.
    pub fn dirs(&self) -> impl Iterator<Item = &Path> {
        self.dirs.iter().map(|(_, d, _)| d.as_path())
    }

    /// Descriptors of the files a new worker writes itself into (see [`place_in_child`]).
    pub fn placement_fds(&self) -> Vec<RawFd> {
        self.placement.iter().map(AsRawFd::as_raw_fd).collect()
    }

    /// Checks a worker's own view of its cgroups (its `/proc/self/cgroup`) against this slot.
    pub fn verify_membership(&self, proc_self_cgroup: &str) -> Result<(), String> {
        let membership = Membership::parse(proc_self_cgroup);
        for (hierarchy, _, expected) in &self.dirs {
            let actual = membership.path_in(self.version, hierarchy);
            if actual != Some(expected.as_str()) {
                return Err(format!(
                    "worker is in {} cgroup {:?}, expected {expected:?}",
                    hierarchy.controllers.join(","),
                    actual.unwrap_or("(none)")
                ));
            }
        }
        Ok(())
    }

    /// Rewrites the limits for the next invocation (only those that changed), resets the
    /// memory peak and takes the counters' starting values.
    ///
    /// Memory limit = what the worker holds now (its measured baseline: runtime, engine,
    /// compiled modules) + `Memory-Request` + this invocation's I/O buffers + the configured
    /// headroom (compilation and engine bookkeeping), rounded up to a MiB. Linear memory is
    /// capped at exactly `Memory-Request` by the engine; the kernel limit bounds everything
    /// else the worker might allocate on the guest's behalf.
    ///
    /// `compile_allowance` is added while the worker may still compile the module; once it
    /// reports the module ready, [`SlotCgroup::tighten`] drops it before the guest runs.
    pub fn prepare(&self, request: &SlotRequest, compile_allowance: u64) -> Result<Checkpoint, CgroupError> {
        self.prepare_with(request, compile_allowance, None)
    }

    /// [`SlotCgroup::prepare`] for an invocation of worker `pid`, the slot's one process:
    /// its CPU time is read from the kernel's CPU clock of that process (one system call,
    /// the same count of its threads' run time that the cgroup's counter sums) instead of
    /// the cgroup's counter file (a file read, twice per invocation).
    pub fn prepare_for(
        &self,
        request: &SlotRequest,
        compile_allowance: u64,
        pid: u32,
    ) -> Result<Checkpoint, CgroupError> {
        self.prepare_with(request, compile_allowance, Some(pid))
    }

    fn prepare_with(
        &self,
        request: &SlotRequest,
        compile_allowance: u64,
        cpu_pid: Option<u32>,
    ) -> Result<Checkpoint, CgroupError> {
        let mut applied = self.applied.lock().unwrap_or_else(|p| p.into_inner());
        let memory_limit = self.apply_memory(&mut applied, request, compile_allowance)?;
        if let Some(cpu) = &self.cpu {
            let quota = request.cpu_quota_millis.max(MIN_CPU_QUOTA_MILLIS).saturating_mul(CPU_PERIOD_US / 1000);
            if applied.cpu_quota_us != Some(quota) {
                let q = i64::try_from(quota).unwrap_or(i64::MAX);
                match self.version {
                    Version::V1 => cpu.set_cfs_quota(q),
                    Version::V2 => cpu.set_cfs_quota_and_period(Some(q), Some(CPU_PERIOD_US)),
                }
                .map_err(controller_err("cannot set the CPU quota of", cpu.path()))?;
                applied.cpu_quota_us = Some(quota);
            }
        }
        drop(applied);
        if let Some(peak) = &self.memory_peak {
            reset_peak(peak).map_err(self.read_err("memory peak reset"))?;
        }
        // A worker that just died has no clock (its exchange will say why it died): the
        // cgroup's counter then, as whenever the clock cannot be read.
        let from_process = cpu_pid.and_then(|pid| process_cpu_ns(pid).ok().map(|ns| (pid, ns)));
        let (cpu_usage_ns, cpu_pid) = match from_process {
            Some((pid, ns)) => (Some(ns), Some(pid)),
            None => (self.cpu_usage_ns().map_err(self.read_err("CPU usage"))?, None),
        };
        Ok(Checkpoint { cpu_usage_ns, cpu_pid, memory_limit_bytes: memory_limit })
    }

    /// Sets the memory limit for running the guest (no compile allowance), measured from
    /// what the worker holds now that the module is ready.
    pub fn tighten(&self, request: &SlotRequest, checkpoint: &mut Checkpoint) -> Result<(), CgroupError> {
        let mut applied = self.applied.lock().unwrap_or_else(|p| p.into_inner());
        checkpoint.memory_limit_bytes = self.apply_memory(&mut applied, request, 0)?;
        Ok(())
    }

    fn apply_memory(
        &self,
        applied: &mut Applied,
        request: &SlotRequest,
        allowance: u64,
    ) -> Result<Option<u64>, CgroupError> {
        let Some(memory) = &self.memory else { return Ok(None) };
        let held = self.memory_current.as_ref().map(read_u64).transpose().map_err(self.read_err("memory usage"))?;
        let limit = round_up_mib(
            held.unwrap_or(0)
                .saturating_add(request.memory_request_bytes)
                .saturating_add(request.io_bytes)
                .saturating_add(self.memory_headroom)
                .saturating_add(allowance),
        );
        if applied.memory_limit != Some(limit) {
            memory
                .set_limit(i64::try_from(limit).unwrap_or(i64::MAX))
                .map_err(controller_err("cannot set the memory limit of", memory.path()))?;
            applied.memory_limit = Some(limit);
        }
        Ok(Some(limit))
    }

    /// What the invocation that started at `checkpoint` used.
    pub fn finish(&self, checkpoint: &Checkpoint) -> Accounting {
        let now = match checkpoint.cpu_pid {
            Some(pid) => process_cpu_ns(pid).ok(),
            None => self.cpu_usage_ns().ok().flatten(),
        };
        let cpu_time = match (checkpoint.cpu_usage_ns, now) {
            (Some(before), Some(after)) => Some(Duration::from_nanos(after.saturating_sub(before))),
            _ => None,
        };
        let memory_peak_bytes = self.memory_peak.as_ref().and_then(|f| read_u64(f).ok());
        Accounting { cpu_time, memory_peak_bytes, memory_limit_bytes: checkpoint.memory_limit_bytes }
    }

    fn cpu_usage_ns(&self) -> io::Result<Option<u64>> {
        let Some(file) = &self.cpu_usage else { return Ok(None) };
        match self.version {
            Version::V1 => read_u64(file).map(Some),
            Version::V2 => {
                let text = read_text(file)?;
                Ok(flat_keyed(&text, "usage_usec").map(|us| us.saturating_mul(1000)))
            }
        }
    }

    /// The kernel's count of OOM kills in this cgroup, over all workers it held.
    pub fn oom_kills(&self) -> Option<u64> {
        let text = std::fs::read_to_string(self.memory_events.as_ref()?).ok()?;
        flat_keyed(&text, "oom_kill")
    }

    /// OOM kills since the last call (or since the slot was set up).
    pub fn new_oom_kills(&self) -> u64 {
        let Some(now) = self.oom_kills() else { return 0 };
        let before = self.oom_kills_seen.swap(now, Ordering::Relaxed);
        now.saturating_sub(before)
    }

    /// `pids.max` as the kernel reports it.
    pub fn pids_max(&self) -> Option<u64> {
        match self.pids.as_ref()?.get_pid_max().ok()? {
            MaxValue::Value(v) => u64::try_from(v).ok(),
            MaxValue::Max => None,
        }
    }

    fn read_err(&self, what: &'static str) -> impl FnOnce(io::Error) -> CgroupError + '_ {
        move |source| CgroupError::Io {
            action: what,
            path: self.dirs.first().map(|(_, d, _)| d.clone()).unwrap_or_default(),
            source,
        }
    }
}

/// Runs in a new worker (a forked child before exec, or a child of the zygote) while it is
/// still single-threaded: writes "0", the writer itself, into each of its slot's cgroups.
///
/// On v1 the file is `tasks`, which moves the writing thread: in a single-threaded process
/// that is the whole process, and the kernel then skips the global lock every
/// `cgroup.procs` write takes (`cgroup_threadgroup_rwsem`), whose write side waits for an
/// RCU grace period, several milliseconds per hierarchy. On v2 `cgroup.procs` is the only
/// way in (`cgroup.threads` needs threaded mode).
///
/// # Safety
/// Only async-signal-safe calls (`write`) on descriptors the parent keeps open.
pub fn place_in_child(fds: &[RawFd]) -> io::Result<()> {
    for &fd in fds {
        // SAFETY: `fd` is an open descriptor owned by the parent's `SlotCgroup`, inherited
        // across fork; the buffer is a static byte string.
        let rc = unsafe { nix::libc::write(fd, b"0".as_ptr().cast(), 1) };
        if rc != 1 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The v1 and v2 files a worker enters a slot's cgroup through (see [`place_in_child`]).
const PLACEMENT_V1: &str = "tasks";
const PLACEMENT_V2: &str = "cgroup.procs";

/// The CPU time process `pid` (all its threads) has used, from the kernel's CPU clock of
/// that process: `clock_gettime` with the clock id `clock_getcpuclockid(3)` returns, made
/// here (`(!pid << 3) | CPUCLOCK_SCHED`, the kernel's encoding) because glibc's checks
/// it with another system call each time.
pub fn process_cpu_ns(pid: u32) -> io::Result<u64> {
    let pid = i32::try_from(pid).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    const CPUCLOCK_SCHED: i32 = 2;
    let clock: nix::libc::clockid_t = (!pid << 3) | CPUCLOCK_SCHED;
    let mut ts = nix::libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; the kernel validates the clock id.
    if unsafe { nix::libc::clock_gettime(clock, &mut ts) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
    Ok(secs.saturating_mul(1_000_000_000).saturating_add(nanos))
}

fn reset_peak(file: &File) -> io::Result<()> {
    file.write_at(b"0\n", 0).map(|_| ())
}

fn read_text(file: &File) -> io::Result<String> {
    let mut buf = [0u8; 4096];
    let n = file.read_at(&mut buf, 0)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

fn read_u64(file: &File) -> io::Result<u64> {
    let mut buf = [0u8; 64];
    let n = file.read_at(&mut buf, 0)?;
    parse_u64(&buf[..n]).ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "not a number"))
}

/// A decimal counter as cgroup files write it (`max` counts as none).
pub fn parse_u64(bytes: &[u8]) -> Option<u64> {
    std::str::from_utf8(bytes).ok()?.trim().parse().ok()
}

/// The value of `key` in a flat-keyed file (`cpu.stat`, `memory.events`, `memory.oom_control`).
pub fn flat_keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let mut parts = line.split_whitespace();
        (parts.next()? == key).then(|| parts.next()?.parse().ok()).flatten()
    })
}

fn round_up_mib(bytes: u64) -> u64 {
    bytes.div_ceil(1 << 20).saturating_mul(1 << 20)
}

fn controller_err(
    action: &'static str,
    path: &Path,
) -> impl FnOnce(cgroups_rs::fs::error::Error) -> CgroupError + use<> {
    let path = path.to_path_buf();
    move |source| CgroupError::Controller { action, path, source }
}
