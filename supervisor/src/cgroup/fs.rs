//! The seam between cgroup logic and the kernel.
//!
//! Everything the cgroup code does to files (reading stats, writing limits) is plain file I/O
//! on paths built from [`CgroupFs::root`], so it runs unchanged against a fixture directory.
//! What only the kernel does (control files that appear on `mkdir`, `rmdir` of a directory
//! that looks full of files, killing member processes) goes through this trait.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// File-system operations on a cgroup hierarchy.
pub trait CgroupFs: Send + Sync + fmt::Debug {
    /// Where the host's `/` is: `/` on a real system, a fixture directory in tests. Paths
    /// read from `/proc/self/mountinfo` are resolved under it.
    fn root(&self) -> &Path;

    /// This process's PID as the hierarchy shows it.
    fn own_pid(&self) -> u32;

    /// Creates one cgroup directory (its parent exists); the kernel adds the control files.
    fn create_cgroup(&self, dir: &Path) -> io::Result<()>;

    /// Removes one empty cgroup directory.
    fn remove_cgroup(&self, dir: &Path) -> io::Result<()>;

    /// Sends SIGKILL to one process.
    fn kill(&self, pid: u32) -> io::Result<()>;

    /// Moves a process (all its threads) into the cgroup at `dir`.
    fn move_process(&self, dir: &Path, pid: u32) -> io::Result<()> {
        std::fs::write(dir.join("cgroup.procs"), pid.to_string())
    }

    /// v2: enables (`+name`) or disables (`-name`) controllers for the children of `dir`.
    fn change_subtree_control(&self, dir: &Path, change: &str) -> io::Result<()> {
        std::fs::write(dir.join("cgroup.subtree_control"), change)
    }

    /// A host path (as mountinfo writes it) under [`CgroupFs::root`].
    fn resolve(&self, host_path: &Path) -> PathBuf {
        match host_path.strip_prefix("/") {
            Ok(relative) => self.root().join(relative),
            Err(_) => self.root().join(host_path),
        }
    }
}

/// The running kernel's cgroup file systems.
#[derive(Debug, Default)]
pub struct KernelFs;

impl CgroupFs for KernelFs {
    fn root(&self) -> &Path {
        Path::new("/")
    }

    fn own_pid(&self) -> u32 {
        std::process::id()
    }

    fn create_cgroup(&self, dir: &Path) -> io::Result<()> {
        std::fs::create_dir(dir)
    }

    fn remove_cgroup(&self, dir: &Path) -> io::Result<()> {
        std::fs::remove_dir(dir)
    }

    fn kill(&self, pid: u32) -> io::Result<()> {
        let pid = i32::try_from(pid).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
pub mod fixture {
    //! A directory that looks like a host's `/proc/self` and `/sys/fs/cgroup`, for unit tests
    //! of both layouts without root.

    use super::*;
    use std::sync::Mutex;

    /// Which kernel layout the fixture imitates.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Kind {
        /// cgroup v1 hybrid: cpu, cpuacct, memory, pids mounted separately, a cgroup2 mount
        /// without controllers beside them (this project's CI host).
        V1Hybrid,
        /// cgroup v2 unified at /sys/fs/cgroup, as on most Kubernetes nodes.
        V2,
    }

    /// A fixture host root in a temporary directory.
    #[derive(Debug)]
    pub struct FixtureFs {
        pub dir: tempfile::TempDir,
        pub kind: Kind,
        pub pid: u32,
        /// PIDs passed to [`CgroupFs::kill`].
        pub killed: Mutex<Vec<u32>>,
    }

    pub const V1_CONTROLLERS: [&str; 4] = ["cpu", "cpuacct", "memory", "pids"];

    impl FixtureFs {
        /// A host where this process sits in `own` (v1: in the memory hierarchy only; the
        /// other controllers keep it at the root, as on the CI host).
        pub fn new(kind: Kind, own: &str) -> Self {
            let fs = FixtureFs { dir: tempfile::tempdir().unwrap(), kind, pid: 4242, killed: Mutex::new(Vec::new()) };
            let proc_self = fs.dir.path().join("proc/self");
            std::fs::create_dir_all(&proc_self).unwrap();
            match kind {
                Kind::V1Hybrid => {
                    let mut mountinfo =
                        String::from("24 1 0:22 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n");
                    let mut cgroup = String::new();
                    for (i, c) in V1_CONTROLLERS.iter().enumerate() {
                        mountinfo.push_str(&format!(
                            "{} 24 0:{} / /sys/fs/cgroup/{c} rw,relatime - cgroup cgroup rw,{c}\n",
                            30 + i,
                            40 + i
                        ));
                        let path = if *c == "memory" { own } else { "/" };
                        cgroup.push_str(&format!("{}:{c}:{path}\n", 10 - i));
                        fs.make_cgroup(&fs.dir.path().join(format!("sys/fs/cgroup/{c}")), c);
                        if *c == "memory" && own != "/" {
                            fs.make_dirs(&format!("sys/fs/cgroup/memory{own}"), c);
                        }
                    }
                    mountinfo.push_str("40 24 0:50 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n");
                    cgroup.push_str("0::/\n");
                    std::fs::create_dir_all(fs.dir.path().join("sys/fs/cgroup/unified")).unwrap();
                    std::fs::write(fs.dir.path().join("sys/fs/cgroup/unified/cgroup.controllers"), "").unwrap();
                    std::fs::write(proc_self.join("mountinfo"), mountinfo).unwrap();
                    std::fs::write(proc_self.join("cgroup"), cgroup).unwrap();
                    let own_dir = fs.dir.path().join(format!("sys/fs/cgroup/memory{}", own.trim_end_matches('/')));
                    std::fs::write(own_dir.join("cgroup.procs"), format!("{}\n", fs.pid)).unwrap();
                }
                Kind::V2 => {
                    std::fs::write(
                        proc_self.join("mountinfo"),
                        "30 1 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n",
                    )
                    .unwrap();
                    std::fs::write(proc_self.join("cgroup"), format!("0::{own}\n")).unwrap();
                    let root = fs.dir.path().join("sys/fs/cgroup");
                    std::fs::create_dir_all(&root).unwrap();
                    std::fs::write(root.join("cgroup.controllers"), "cpuset cpu io memory pids\n").unwrap();
                    std::fs::write(root.join("cgroup.subtree_control"), "cpu memory pids\n").unwrap();
                    std::fs::write(root.join("cgroup.procs"), "1\n").unwrap();
                    let mut dir = root.clone();
                    for part in own.split('/').filter(|p| !p.is_empty()) {
                        dir.push(part);
                        fs.make_cgroup(&dir, "");
                    }
                    std::fs::write(dir.join("cgroup.procs"), format!("{}\n", fs.pid)).unwrap();
                }
            }
            fs
        }

        fn make_dirs(&self, relative: &str, controller: &str) {
            let mut dir = self.dir.path().to_path_buf();
            for part in relative.split('/').filter(|p| !p.is_empty()) {
                dir.push(part);
                if !dir.exists() {
                    self.make_cgroup(&dir, controller);
                }
            }
        }

        /// Writes the control files the kernel would create in a new cgroup.
        fn make_cgroup(&self, dir: &Path, v1_controller: &str) {
            std::fs::create_dir_all(dir).unwrap();
            let write = |name: &str, value: &str| std::fs::write(dir.join(name), value).unwrap();
            write("cgroup.procs", "");
            if self.kind == Kind::V1Hybrid {
                write("tasks", "");
            }
            match self.kind {
                Kind::V1Hybrid => match v1_controller {
                    "cpu" => {
                        write("cpu.cfs_period_us", "100000\n");
                        write("cpu.cfs_quota_us", "-1\n");
                        write("cpu.stat", "nr_periods 0\nnr_throttled 0\nthrottled_time 0\n");
                    }
                    "cpuacct" => write("cpuacct.usage", "0\n"),
                    "memory" => {
                        write("memory.limit_in_bytes", "9223372036854771712\n");
                        write("memory.usage_in_bytes", "0\n");
                        write("memory.max_usage_in_bytes", "0\n");
                        write("memory.oom_control", "oom_kill_disable 0\nunder_oom 0\noom_kill 0\n");
                        write("memory.swappiness", "60\n");
                    }
                    "pids" => {
                        write("pids.max", "max\n");
                        write("pids.current", "0\n");
                    }
                    _ => {}
                },
                Kind::V2 => {
                    // What a child may enable: what its parent enabled for its children.
                    let available = dir
                        .parent()
                        .and_then(|p| std::fs::read_to_string(p.join("cgroup.subtree_control")).ok())
                        .unwrap_or_default();
                    write("cgroup.controllers", &available);
                    write("cgroup.subtree_control", "");
                    write("cgroup.type", "domain\n");
                    write("cgroup.kill", "");
                    write("cpu.stat", "usage_usec 0\nuser_usec 0\nsystem_usec 0\n");
                    let has = |c: &str| available.split_whitespace().any(|a| a == c);
                    if has("cpu") {
                        write("cpu.max", "max 100000\n");
                    }
                    if has("memory") {
                        write("memory.max", "max\n");
                        write("memory.current", "0\n");
                        write("memory.peak", "0\n");
                        write("memory.swap.max", "max\n");
                        write("memory.events", "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n");
                    }
                    if has("pids") {
                        write("pids.max", "max\n");
                        write("pids.current", "0\n");
                    }
                }
            }
        }

        pub fn path(&self, relative: &str) -> PathBuf {
            self.dir.path().join(relative.trim_start_matches('/'))
        }

        pub fn read(&self, relative: &str) -> String {
            std::fs::read_to_string(self.path(relative)).unwrap_or_else(|e| panic!("{relative}: {e}"))
        }

        pub fn write(&self, relative: &str, value: &str) {
            std::fs::write(self.path(relative), value).unwrap();
        }
    }

    impl CgroupFs for FixtureFs {
        fn root(&self) -> &Path {
            self.dir.path()
        }

        fn own_pid(&self) -> u32 {
            self.pid
        }

        fn create_cgroup(&self, dir: &Path) -> io::Result<()> {
            if dir.exists() {
                return Err(io::ErrorKind::AlreadyExists.into());
            }
            let controller = match self.kind {
                Kind::V1Hybrid => V1_CONTROLLERS
                    .iter()
                    .find(|c| dir.starts_with(self.dir.path().join(format!("sys/fs/cgroup/{c}"))))
                    .copied()
                    .unwrap_or(""),
                Kind::V2 => "",
            };
            self.make_cgroup(dir, controller);
            Ok(())
        }

        fn remove_cgroup(&self, dir: &Path) -> io::Result<()> {
            let procs = std::fs::read_to_string(dir.join("cgroup.procs"))?;
            if !procs.trim().is_empty() {
                return Err(io::Error::from_raw_os_error(nix::libc::EBUSY));
            }
            if std::fs::read_dir(dir)?.flatten().any(|e| e.path().is_dir()) {
                return Err(io::Error::from_raw_os_error(nix::libc::EBUSY));
            }
            std::fs::remove_dir_all(dir)
        }

        fn kill(&self, pid: u32) -> io::Result<()> {
            self.killed.lock().unwrap().push(pid);
            self.remove_pid_everywhere(pid);
            Ok(())
        }

        fn move_process(&self, dir: &Path, pid: u32) -> io::Result<()> {
            if !dir.join("cgroup.procs").exists() {
                return Err(io::ErrorKind::NotFound.into());
            }
            self.remove_pid_everywhere(pid);
            let procs = dir.join("cgroup.procs");
            let mut text = std::fs::read_to_string(&procs)?;
            text.push_str(&format!("{pid}\n"));
            std::fs::write(procs, text)
        }

        fn change_subtree_control(&self, dir: &Path, change: &str) -> io::Result<()> {
            let file = dir.join("cgroup.subtree_control");
            let mut enabled: Vec<String> =
                std::fs::read_to_string(&file)?.split_whitespace().map(str::to_owned).collect();
            // Like the kernel's cgroup.controllers: what the parent enables now.
            let available = dir
                .parent()
                .and_then(|p| std::fs::read_to_string(p.join("cgroup.subtree_control")).ok())
                .unwrap_or_default();
            let is_root = !dir.join("cgroup.type").exists();
            for item in change.split_whitespace() {
                let (sign, name) = item.split_at(1);
                match sign {
                    "+" => {
                        if !is_root && !available.split_whitespace().any(|a| a == name) {
                            return Err(io::Error::from_raw_os_error(nix::libc::ENOENT));
                        }
                        // The kernel's "no internal processes" rule.
                        if !is_root && !std::fs::read_to_string(dir.join("cgroup.procs"))?.trim().is_empty() {
                            return Err(io::Error::from_raw_os_error(nix::libc::EBUSY));
                        }
                        if !enabled.iter().any(|e| e == name) {
                            enabled.push(name.to_owned());
                        }
                    }
                    "-" => enabled.retain(|e| e != name),
                    _ => return Err(io::Error::from_raw_os_error(nix::libc::EINVAL)),
                }
            }
            std::fs::write(file, enabled.join(" "))
        }
    }

    impl FixtureFs {
        fn remove_pid_everywhere(&self, pid: u32) {
            fn walk(dir: &Path, pid: u32) {
                let procs = dir.join("cgroup.procs");
                if let Ok(text) = std::fs::read_to_string(&procs) {
                    let kept: String =
                        text.lines().filter(|l| l.trim() != pid.to_string()).map(|l| format!("{l}\n")).collect();
                    std::fs::write(&procs, kept).unwrap();
                }
                for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                    if entry.path().is_dir() {
                        walk(&entry.path(), pid);
                    }
                }
            }
            walk(&self.dir.path().join("sys/fs/cgroup"), pid);
        }

        /// Puts a (pretend) process into the cgroup at `relative`.
        pub fn add_process(&self, relative: &str, pid: u32) {
            self.move_process(&self.path(relative), pid).unwrap();
        }
    }
}
