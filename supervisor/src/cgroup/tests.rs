//! Both layouts against fixture roots, and (as root, where a writable v1 or v2 hierarchy
//! exists) placement on the real kernel.

use std::sync::Arc;

use super::fs::fixture::{FixtureFs, Kind};
use super::fs::{CgroupFs, KernelFs};
use super::*;

fn settings(mode: CgroupMode) -> CgroupSettings {
    CgroupSettings { mode, parent: "wasmbox".into(), pids_max: 48, memory_headroom_bytes: 32 << 20, compilers: 0 }
}

fn setup(fs: &Arc<FixtureFs>, mode: CgroupMode, slots: usize) -> Result<Option<Cgroups>, CgroupError> {
    Cgroups::setup(fs.clone() as Arc<dyn CgroupFs>, &settings(mode), slots)
}

fn listing(fs: &FixtureFs) -> Vec<String> {
    fn walk(dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            out.push(format!("{} {}", e.path().display(), std::fs::read_to_string(e.path()).unwrap_or_default()));
            if e.path().is_dir() {
                walk(&e.path(), out);
            }
        }
    }
    let mut out = Vec::new();
    walk(fs.dir.path(), &mut out);
    out.sort();
    out
}

/// What a SIGKILLed supervisor leaves: its cgroups, without its locks.
fn crash(mut cgroups: Cgroups) {
    cgroups.parents.clear();
    cgroups.slots.clear();
    cgroups.compilers.clear();
    cgroups.v2 = V2Changes::default();
}

const V1_OWN_MEMORY: &str = "/process_api/abc";

#[test]
fn v1_creates_parent_and_slots_in_every_hierarchy_and_removes_them() {
    let fs = Arc::new(FixtureFs::new(Kind::V1Hybrid, V1_OWN_MEMORY));
    let mut cgroups = setup(&fs, CgroupMode::Required, 2).unwrap().unwrap();
    assert_eq!(cgroups.version(), Version::V1);
    for base in ["cpu", "cpuacct", "memory/process_api/abc", "pids"] {
        for slot in ["worker-0", "worker-1"] {
            assert!(fs.path(&format!("sys/fs/cgroup/{base}/wasmbox/{slot}")).is_dir(), "{base}/{slot}");
        }
    }
    assert_eq!(fs.read("sys/fs/cgroup/pids/wasmbox/worker-1/pids.max").trim(), "48");
    assert_eq!(fs.read("sys/fs/cgroup/cpu/wasmbox/worker-0/cpu.cfs_period_us").trim(), "100000");
    let slot = cgroups.slot(1).unwrap().clone();
    assert_eq!(slot.pids_max(), Some(48));
    assert_eq!(slot.placement_fds().len(), 4);
    slot.verify_membership(
        "9:pids:/wasmbox/worker-1\n4:memory:/process_api/abc/wasmbox/worker-1\n2:cpuacct:/wasmbox/worker-1\n1:cpu:/wasmbox/worker-1\n0::/\n",
    )
    .unwrap();
    let err = slot.verify_membership("9:pids:/\n4:memory:/process_api/abc\n2:cpuacct:/\n1:cpu:/\n").unwrap_err();
    assert!(err.contains("expected"), "{err}");

    cgroups.teardown();
    for base in ["cpu", "cpuacct", "memory/process_api/abc", "pids"] {
        assert!(!fs.path(&format!("sys/fs/cgroup/{base}/wasmbox")).exists(), "{base}");
    }
    assert!(fs.path("sys/fs/cgroup/memory/process_api/abc").is_dir(), "the supervisor's own cgroup stays");
}

#[test]
fn v1_limits_follow_each_invocation_and_accounting_reads_deltas() {
    let fs = Arc::new(FixtureFs::new(Kind::V1Hybrid, "/"));
    let cgroups = setup(&fs, CgroupMode::Required, 1).unwrap().unwrap();
    let slot = cgroups.slot(0).unwrap();
    let dir = |c: &str| format!("sys/fs/cgroup/{c}/wasmbox/worker-0");
    // The worker holds 10 MiB + a bit before the invocation.
    fs.write(&format!("{}/memory.usage_in_bytes", dir("memory")), &format!("{}\n", (10 << 20) + 5));
    fs.write(&format!("{}/cpuacct.usage", dir("cpuacct")), "1000000000\n");
    fs.write(&format!("{}/memory.max_usage_in_bytes", dir("memory")), "999999999\n");
    let request = SlotRequest { cpu_quota_millis: 250, memory_request_bytes: 64 << 20, io_bytes: 1 << 20 };
    let checkpoint = slot.prepare(&request, 0).unwrap();
    assert_eq!(fs.read(&format!("{}/cpu.cfs_quota_us", dir("cpu"))).trim(), "25000");
    // held (rounded up) + request + io + headroom: 11 + 64 + 1 + 32 MiB.
    let expected_limit: u64 = (11 + 64 + 1 + 32) << 20;
    assert_eq!(fs.read(&format!("{}/memory.limit_in_bytes", dir("memory"))).trim(), expected_limit.to_string());
    assert_eq!(checkpoint.memory_limit_bytes, Some(expected_limit));
    // pwrite at offset 0; the fixture's plain file keeps the old tail, the kernel resets.
    assert!(fs.read(&format!("{}/memory.max_usage_in_bytes", dir("memory"))).starts_with("0\n"), "peak reset");

    fs.write(&format!("{}/cpuacct.usage", dir("cpuacct")), "1250000000\n");
    fs.write(&format!("{}/memory.max_usage_in_bytes", dir("memory")), "83886080\n");
    let used = slot.finish(&checkpoint);
    assert_eq!(used.cpu_time, Some(Duration::from_millis(250)));
    assert_eq!(used.memory_peak_bytes, Some(80 << 20));
    assert_eq!(used.memory_limit_bytes, Some(expected_limit));

    // A cold start gets the compile allowance until the module is ready.
    let mut cold = slot.prepare(&request, 512 << 20).unwrap();
    assert_eq!(cold.memory_limit_bytes, Some(expected_limit + (512 << 20)));
    fs.write(&format!("{}/memory.usage_in_bytes", dir("memory")), &format!("{}\n", 30 << 20));
    slot.tighten(&request, &mut cold).unwrap();
    let tight: u64 = (30 + 64 + 1 + 32) << 20;
    assert_eq!(cold.memory_limit_bytes, Some(tight));
    assert_eq!(fs.read(&format!("{}/memory.limit_in_bytes", dir("memory"))).trim(), tight.to_string());
    fs.write(&format!("{}/memory.usage_in_bytes", dir("memory")), &format!("{}\n", (10 << 20) + 5));

    // Unchanged limits are not rewritten; a quota under the kernel's minimum is raised to it.
    fs.write(&format!("{}/cpu.cfs_quota_us", dir("cpu")), "sentinel");
    slot.prepare(&request, 0).unwrap();
    assert_eq!(fs.read(&format!("{}/cpu.cfs_quota_us", dir("cpu"))), "sentinel");
    slot.prepare(&SlotRequest { cpu_quota_millis: 1, ..request }, 0).unwrap();
    assert_eq!(fs.read(&format!("{}/cpu.cfs_quota_us", dir("cpu"))).trim(), "1000");
}

#[test]
fn v1_oom_kills_are_counted_once() {
    let fs = Arc::new(FixtureFs::new(Kind::V1Hybrid, "/"));
    let cgroups = setup(&fs, CgroupMode::Required, 1).unwrap().unwrap();
    let slot = cgroups.slot(0).unwrap();
    assert_eq!(slot.new_oom_kills(), 0);
    fs.write(
        "sys/fs/cgroup/memory/wasmbox/worker-0/memory.oom_control",
        "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n",
    );
    assert_eq!(slot.new_oom_kills(), 1);
    assert_eq!(slot.new_oom_kills(), 0);
    assert_eq!(slot.oom_kills(), Some(1));
}

#[test]
fn leftovers_of_a_crashed_run_are_removed_and_nothing_else() {
    let fs = Arc::new(FixtureFs::new(Kind::V1Hybrid, "/"));
    // A crash: nothing is torn down (the kernel drops the lock), a worker is still alive.
    crash(setup(&fs, CgroupMode::Required, 3).unwrap().unwrap());
    fs.add_process("sys/fs/cgroup/memory/wasmbox/worker-2", 999);
    std::fs::create_dir(fs.path("sys/fs/cgroup/memory/wasmbox/not-ours")).unwrap();
    let mut cgroups = setup(&fs, CgroupMode::Required, 1).unwrap().unwrap();
    assert!(fs.killed.lock().unwrap().contains(&999));
    assert!(fs.path("sys/fs/cgroup/memory/wasmbox/worker-0").is_dir());
    for gone in ["worker-1", "worker-2"] {
        assert!(!fs.path(&format!("sys/fs/cgroup/cpu/wasmbox/{gone}")).exists(), "{gone}");
    }
    assert!(fs.path("sys/fs/cgroup/memory/wasmbox/not-ours").is_dir());
    cgroups.teardown();
    assert!(!fs.path("sys/fs/cgroup/cpu/wasmbox").exists(), "a parent that only held leftovers is removed");
    assert!(fs.path("sys/fs/cgroup/memory/wasmbox/not-ours").is_dir(), "a parent with foreign cgroups stays");
}

#[test]
fn a_parent_in_use_by_another_supervisor_is_refused_in_every_mode() {
    let fs = Arc::new(FixtureFs::new(Kind::V1Hybrid, "/"));
    let _first = setup(&fs, CgroupMode::Auto, 1).unwrap().unwrap();
    for mode in [CgroupMode::Auto, CgroupMode::Required] {
        let err = setup(&fs, mode, 1).unwrap_err();
        assert!(matches!(err, CgroupError::ParentInUse { .. }), "{err}");
        assert!(err.to_string().contains("WASMBOX_CGROUP_PARENT"));
    }
    assert!(fs.path("sys/fs/cgroup/pids/wasmbox/worker-0").is_dir(), "the first supervisor's cgroups are intact");
}

#[test]
fn off_touches_nothing() {
    let fs = Arc::new(FixtureFs::new(Kind::V1Hybrid, "/"));
    let before = listing(&fs);
    assert!(setup(&fs, CgroupMode::Off, 4).unwrap().is_none());
    assert_eq!(listing(&fs), before);
}

#[test]
fn missing_controllers_fail_required_and_auto_runs_without() {
    let fs = Arc::new(FixtureFs::new(Kind::V1Hybrid, "/"));
    std::fs::write(
        fs.path("proc/self/mountinfo"),
        "30 24 0:40 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n31 24 0:41 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n",
    )
    .unwrap();
    let err = setup(&fs, CgroupMode::Required, 1).unwrap_err();
    assert!(err.to_string().contains("cpuacct, pids"), "{err}");
    assert!(!fs.path("sys/fs/cgroup/cpu/wasmbox").exists(), "nothing is left after a refusal");
    // auto uses what there is.
    let cgroups = setup(&fs, CgroupMode::Auto, 1).unwrap().unwrap();
    assert_eq!(cgroups.describe().controllers, ["cpu", "memory"]);

    let none = Arc::new(FixtureFs::new(Kind::V2, "/a/b"));
    assert!(setup(&none, CgroupMode::Auto, 1).unwrap().is_none());
    let err = setup(&none, CgroupMode::Required, 1).unwrap_err();
    assert!(err.to_string().contains("subtree_control"), "{err}");
}

#[test]
fn invalid_parents_are_refused() {
    for bad in ["", "/", "..", "a/../b", "a b", "worker-1", "x/supervisor", "a\nb"] {
        let s = CgroupSettings { parent: bad.into(), ..settings(CgroupMode::Auto) };
        let fs = Arc::new(FixtureFs::new(Kind::V1Hybrid, "/"));
        let err = Cgroups::setup(fs as Arc<dyn CgroupFs>, &s, 1).unwrap_err();
        assert!(matches!(err, CgroupError::InvalidParent(_)), "{bad:?}: {err}");
    }
    assert_eq!(validate_parent("/system.slice/wasmbox").unwrap(), "/system.slice/wasmbox");
    assert_eq!(validate_parent("a//b/").unwrap(), "a/b");
}

#[test]
fn v2_at_the_root_enables_controllers_for_the_parent() {
    let fs = Arc::new(FixtureFs::new(Kind::V2, "/"));
    let mut cgroups = setup(&fs, CgroupMode::Required, 2).unwrap().unwrap();
    assert_eq!(fs.read("sys/fs/cgroup/wasmbox/cgroup.subtree_control"), "cpu memory pids");
    assert_eq!(fs.read("sys/fs/cgroup/wasmbox/worker-1/pids.max").trim(), "48");
    assert!(!fs.path("sys/fs/cgroup/wasmbox/supervisor").exists(), "the root may hold processes");
    let slot = cgroups.slot(0).unwrap().clone();
    slot.verify_membership("0::/wasmbox/worker-0\n").unwrap();

    let dir = "sys/fs/cgroup/wasmbox/worker-0";
    fs.write(&format!("{dir}/memory.current"), "1048576\n");
    fs.write(&format!("{dir}/cpu.stat"), "usage_usec 5000\nuser_usec 4000\nsystem_usec 1000\n");
    let request = SlotRequest { cpu_quota_millis: 1500, memory_request_bytes: 16 << 20, io_bytes: 0 };
    let checkpoint = slot.prepare(&request, 0).unwrap();
    assert_eq!(fs.read(&format!("{dir}/cpu.max")).trim(), "150000 100000");
    assert_eq!(fs.read(&format!("{dir}/memory.max")).trim(), ((1 + 16 + 32) << 20).to_string());
    assert_eq!(fs.read(&format!("{dir}/memory.swap.max")).trim(), "0");
    fs.write(&format!("{dir}/cpu.stat"), "usage_usec 305000\nuser_usec 300000\nsystem_usec 5000\n");
    fs.write(&format!("{dir}/memory.peak"), "20971520\n");
    let used = slot.finish(&checkpoint);
    assert_eq!(used.cpu_time, Some(Duration::from_millis(300)));
    assert_eq!(used.memory_peak_bytes, Some(20 << 20));

    fs.write(&format!("{dir}/memory.events"), "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\noom_group_kill 0\n");
    assert_eq!(slot.new_oom_kills(), 1);

    cgroups.teardown();
    assert!(!fs.path("sys/fs/cgroup/wasmbox").exists());
}

#[test]
fn v2_in_a_container_moves_the_supervisor_into_a_leaf_and_back() {
    let fs = Arc::new(FixtureFs::new(Kind::V2, "/ctr"));
    let own = "sys/fs/cgroup/ctr";
    let mut cgroups = setup(&fs, CgroupMode::Required, 1).unwrap().unwrap();
    assert_eq!(fs.read(&format!("{own}/cgroup.procs")).trim(), "");
    assert_eq!(fs.read(&format!("{own}/wasmbox/supervisor/cgroup.procs")).trim(), fs.pid.to_string());
    assert_eq!(fs.read(&format!("{own}/cgroup.subtree_control")), "cpu memory pids");
    assert_eq!(fs.read(&format!("{own}/wasmbox/cgroup.subtree_control")), "cpu memory pids");
    assert!(fs.path(&format!("{own}/wasmbox/worker-0/memory.max")).exists());
    cgroups.slot(0).unwrap().verify_membership("0::/ctr/wasmbox/worker-0\n").unwrap();

    cgroups.teardown();
    assert_eq!(fs.read(&format!("{own}/cgroup.procs")).trim(), fs.pid.to_string());
    assert_eq!(fs.read(&format!("{own}/cgroup.subtree_control")), "");
    assert!(!fs.path(&format!("{own}/wasmbox")).exists());
}

#[test]
fn v2_refuses_with_a_hint_when_other_processes_share_the_cgroup() {
    let fs = Arc::new(FixtureFs::new(Kind::V2, "/ctr"));
    fs.add_process("sys/fs/cgroup/ctr", 1);
    let err = setup(&fs, CgroupMode::Required, 1).unwrap_err();
    assert!(err.to_string().contains("holds other processes"), "{err}");
    // Refused setups leave the supervisor where it was and remove what they created.
    assert!(fs.read("sys/fs/cgroup/ctr/cgroup.procs").contains(&fs.pid.to_string()));
    assert!(!fs.path("sys/fs/cgroup/ctr/wasmbox").exists());
}

#[test]
fn flat_keyed_files_parse() {
    assert_eq!(slot::flat_keyed("usage_usec 12\nuser_usec 3\n", "user_usec"), Some(3));
    assert_eq!(slot::flat_keyed("oom_kill_disable 0\nunder_oom 0\noom_kill 7\n", "oom_kill"), Some(7));
    assert_eq!(slot::flat_keyed("oom 2\n", "oom_kill"), None);
    assert_eq!(slot::parse_u64(b"123\n"), Some(123));
    assert_eq!(slot::parse_u64(b"max\n"), None);
}

/// Real kernel: a process started with [`place_in_child`] is in its slot's cgroups when its
/// own code begins: `cat` reads its membership as its first act.
#[test]
fn kernel_places_a_child_before_exec() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root to create cgroups");
        return;
    }
    let settings =
        CgroupSettings { parent: format!("wasmbox-unit-{}", std::process::id()), ..settings(CgroupMode::Auto) };
    let Some(mut cgroups) = Cgroups::setup(Arc::new(KernelFs), &settings, 1).unwrap() else {
        eprintln!("skipped: no writable cgroup hierarchy on this host");
        return;
    };
    let slot = cgroups.slot(0).unwrap().clone();
    let fds = slot.placement_fds();
    let mut cmd = std::process::Command::new("cat");
    cmd.arg("/proc/self/cgroup");
    // SAFETY: the closure only calls `place_in_child`, which makes async-signal-safe writes.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || place_in_child(&fds));
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success());
    let membership = String::from_utf8(out.stdout).unwrap();
    slot.verify_membership(&membership).unwrap_or_else(|e| panic!("{e}\n{membership}"));
    assert_eq!(slot.pids_max(), Some(48));
    let dirs: Vec<PathBuf> = cgroups.parent_dirs();
    cgroups.teardown();
    for dir in dirs {
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
}

#[test]
fn v2_kills_a_slot_through_cgroup_kill() {
    let fs = Arc::new(FixtureFs::new(Kind::V2, "/"));
    let cgroups = setup(&fs, CgroupMode::Required, 1).unwrap().unwrap();
    let slot = cgroups.slot(0).unwrap();
    assert_eq!(slot.kill_all().unwrap(), "cgroup.kill");
    let kill_file = slot.dirs().next().unwrap().join("cgroup.kill");
    assert_eq!(std::fs::read_to_string(kill_file).unwrap(), "1");
}

/// Compile processes get `compiler-<n>` leaves beside the workers' on both layouts, with
/// the same limits machinery; teardown removes them, and a later start removes a crashed
/// run's.
#[test]
fn compiler_leaves_exist_on_v1_and_v2_and_go_with_the_tree() {
    for (kind, own, base) in [
        (Kind::V1Hybrid, V1_OWN_MEMORY, "sys/fs/cgroup/memory/process_api/abc/wasmbox"),
        (Kind::V2, "/", "sys/fs/cgroup/wasmbox"),
    ] {
        let fs = Arc::new(FixtureFs::new(kind, own));
        let with_compilers = CgroupSettings { compilers: 2, ..settings(CgroupMode::Required) };
        let cgroups = Cgroups::setup(fs.clone() as Arc<dyn CgroupFs>, &with_compilers, 1).unwrap().unwrap();
        for leaf in ["worker-0", "compiler-0", "compiler-1"] {
            assert!(fs.path(&format!("{base}/{leaf}")).is_dir(), "{kind:?}: {leaf}");
        }
        let compiler = cgroups.compiler(1).unwrap().clone();
        assert!(cgroups.compiler(2).is_none());
        let request = SlotRequest { cpu_quota_millis: 2000, memory_request_bytes: 0, io_bytes: 1 << 20 };
        compiler.prepare(&request, 256 << 20).unwrap();
        let limit = if kind == Kind::V2 { "memory.max" } else { "memory.limit_in_bytes" };
        assert_eq!(fs.read(&format!("{base}/compiler-1/{limit}")).trim(), ((1 + 32 + 256) << 20).to_string());
        crash(cgroups);
        assert!(fs.path(&format!("{base}/compiler-1")).is_dir(), "{kind:?}: a crash leaves it");
        // The next start finds the leftovers and removes them.
        let mut again =
            Cgroups::setup(fs.clone() as Arc<dyn CgroupFs>, &settings(CgroupMode::Required), 1).unwrap().unwrap();
        assert!(!fs.path(&format!("{base}/compiler-1")).exists(), "{kind:?}: leftover compiler cgroup removed");
        again.teardown();
        assert!(!fs.path(base).exists(), "{kind:?}");
    }
}

/// The CPU clock of another process counts what it ran, from the kernel: a child that
/// spins for a while has used CPU time, at most the wall time it was given.
#[test]
fn a_worker_process_cpu_clock_counts_its_run_time() {
    use super::slot::process_cpu_ns;
    let started = std::time::Instant::now();
    let mut child = std::process::Command::new("sh")
        .args(["-c", "end=$(($(date +%s) + 25)); while [ $(date +%s) -lt $end ]; do :; done"])
        .spawn()
        .unwrap();
    let pid = child.id();
    let first = process_cpu_ns(pid).unwrap();
    let deadline = started + Duration::from_secs(30);
    let mut last = first;
    // Until it has run 100 ms of CPU (generous: a loaded machine gives it less per second).
    while last < first + 100_000_000 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        last = process_cpu_ns(pid).unwrap();
    }
    let elapsed = started.elapsed();
    let _ = child.kill();
    let _ = child.wait();
    assert!(last >= first + 100_000_000, "a spinning child used CPU time ({first} -> {last} ns)");
    assert!(u128::from(last) <= elapsed.as_nanos(), "one thread runs at most the wall time: {last} ns in {elapsed:?}");
    assert!(process_cpu_ns(pid).is_err(), "a reaped process has no clock");
}
