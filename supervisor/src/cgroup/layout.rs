//! Which cgroup layout the host has, where this process sits in it, and which controllers
//! WasmBox can use. Read from `/proc/self/mountinfo` and `/proc/self/cgroup` under the
//! [`CgroupFs`] root.

use std::fmt;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use procfs::FromBufRead;
use procfs::process::MountInfos;

use super::CgroupError;
use super::fs::CgroupFs;

/// The controllers WasmBox uses. On v1 `cpuacct` carries CPU time; on v2 `cpu.stat` does.
pub const WANTED_V1: [&str; 4] = ["cpu", "cpuacct", "memory", "pids"];
pub const WANTED_V2: [&str; 3] = ["cpu", "memory", "pids"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Version::V1 => "v1",
            Version::V2 => "v2",
        })
    }
}

/// One mounted hierarchy: v1 has one per controller (or per co-mounted set), v2 has one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hierarchy {
    /// Controllers of this hierarchy that WasmBox uses (v2: those available to this process's
    /// cgroup, i.e. enabled in its parent's `cgroup.subtree_control`, or all at the root).
    pub controllers: Vec<&'static str>,
    /// Mount point, resolved under the fs root.
    pub mount: PathBuf,
    /// This process's cgroup as `/proc/self/cgroup` names it (namespace view).
    pub own: String,
    /// The cgroup path the mount shows at its mount point (mountinfo's root field).
    pub mount_root: String,
}

impl Hierarchy {
    /// Directory of the cgroup at `path` (namespace view, absolute).
    pub fn dir_of(&self, path: &str) -> PathBuf {
        let relative = path.strip_prefix(self.mount_root.trim_end_matches('/')).unwrap_or(path);
        let mut dir = self.mount.clone();
        for part in relative.split('/').filter(|p| !p.is_empty()) {
            dir.push(part);
        }
        dir
    }

    pub fn own_dir(&self) -> PathBuf {
        self.dir_of(&self.own)
    }
}

/// What the host offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub version: Version,
    pub hierarchies: Vec<Hierarchy>,
    /// v1 only: a cgroup2 hierarchy is mounted too (a hybrid host); it carries no
    /// controllers WasmBox uses.
    pub hybrid: bool,
}

impl Layout {
    /// Reads the layout. v1 wins when any wanted controller is on a v1 hierarchy (a hybrid
    /// host binds controllers there); otherwise the cgroup2 mount is used.
    pub fn detect(fs: &dyn CgroupFs) -> Result<Layout, CgroupError> {
        let mountinfo = read_proc(fs, "proc/self/mountinfo")?;
        let mounts = MountInfos::from_buf_read(BufReader::new(mountinfo.as_bytes()))
            .map_err(|e| CgroupError::Detect(format!("cannot parse /proc/self/mountinfo: {e}")))?;
        let membership = Membership::parse(&read_proc(fs, "proc/self/cgroup")?);

        let mut v1 = Vec::new();
        let mut cgroup2 = None;
        for mount in mounts.iter() {
            match mount.fs_type.as_str() {
                "cgroup" => {
                    let controllers: Vec<&'static str> =
                        WANTED_V1.iter().copied().filter(|c| mount.super_options.contains_key(*c)).collect();
                    if controllers.is_empty() || v1.iter().any(|h: &Hierarchy| h.controllers == controllers) {
                        continue;
                    }
                    let Some(own) = membership.v1_path(controllers[0]) else { continue };
                    v1.push(Hierarchy {
                        controllers,
                        mount: fs.resolve(&mount.mount_point),
                        own: own.to_owned(),
                        mount_root: mount.root.clone(),
                    });
                }
                "cgroup2" if cgroup2.is_none() => cgroup2 = Some(mount),
                _ => {}
            }
        }
        if !v1.is_empty() {
            return Ok(Layout { version: Version::V1, hierarchies: v1, hybrid: cgroup2.is_some() });
        }
        let Some(mount) = cgroup2 else {
            return Err(CgroupError::Detect("no cgroup file system is mounted".into()));
        };
        let own = membership
            .v2_path()
            .ok_or_else(|| CgroupError::Detect("/proc/self/cgroup has no cgroup2 entry".into()))?
            .to_owned();
        let mut hierarchy = Hierarchy {
            controllers: Vec::new(),
            mount: fs.resolve(&mount.mount_point),
            own,
            mount_root: mount.root.clone(),
        };
        let available = std::fs::read_to_string(hierarchy.own_dir().join("cgroup.controllers")).unwrap_or_default();
        hierarchy.controllers =
            WANTED_V2.iter().copied().filter(|c| available.split_whitespace().any(|a| a == *c)).collect();
        Ok(Layout { version: Version::V2, hierarchies: vec![hierarchy], hybrid: false })
    }

    /// Wanted controllers that no hierarchy offers.
    pub fn missing(&self) -> Vec<&'static str> {
        let wanted: &[&'static str] = match self.version {
            Version::V1 => &WANTED_V1,
            Version::V2 => &WANTED_V2,
        };
        wanted.iter().copied().filter(|c| !self.hierarchies.iter().any(|h| h.controllers.contains(c))).collect()
    }

    pub fn hierarchy_of(&self, controller: &str) -> Option<&Hierarchy> {
        self.hierarchies.iter().find(|h| h.controllers.contains(&controller))
    }
}

/// Parsed `/proc/<pid>/cgroup`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Membership {
    /// (controllers, path); v2's line has no controllers.
    entries: Vec<(Vec<String>, String)>,
}

impl Membership {
    pub fn parse(text: &str) -> Membership {
        let entries = text
            .lines()
            .filter_map(|line| {
                let mut parts = line.splitn(3, ':');
                let _id = parts.next()?;
                let controllers = parts.next()?;
                let path = parts.next()?;
                let controllers =
                    controllers.split(',').filter(|c| !c.is_empty()).map(str::to_owned).collect::<Vec<_>>();
                Some((controllers, path.to_owned()))
            })
            .collect();
        Membership { entries }
    }

    pub fn v1_path(&self, controller: &str) -> Option<&str> {
        self.entries.iter().find(|(cs, _)| cs.iter().any(|c| c == controller)).map(|(_, p)| p.as_str())
    }

    pub fn v2_path(&self) -> Option<&str> {
        self.entries.iter().find(|(cs, _)| cs.is_empty()).map(|(_, p)| p.as_str())
    }

    /// The path of `hierarchy`'s cgroup this membership names.
    pub fn path_in(&self, version: Version, hierarchy: &Hierarchy) -> Option<&str> {
        match version {
            Version::V1 => self.v1_path(hierarchy.controllers.first()?),
            Version::V2 => self.v2_path(),
        }
    }
}

fn read_proc(fs: &dyn CgroupFs, relative: &str) -> Result<String, CgroupError> {
    let path = fs.root().join(relative);
    std::fs::read_to_string(&path).map_err(|e| CgroupError::Detect(format!("cannot read {}: {e}", display(&path))))
}

fn display(path: &Path) -> String {
    path.display().to_string()
}

#[cfg(test)]
mod tests {
    use super::super::fs::fixture::{FixtureFs, Kind};
    use super::*;

    #[test]
    fn v1_hybrid_host_uses_v1_hierarchies_with_per_controller_paths() {
        let fs = FixtureFs::new(Kind::V1Hybrid, "/process_api/abc");
        let layout = Layout::detect(&fs).unwrap();
        assert_eq!(layout.version, Version::V1);
        assert!(layout.hybrid);
        assert!(layout.missing().is_empty(), "{:?}", layout.missing());
        let memory = layout.hierarchy_of("memory").unwrap();
        assert_eq!(memory.own, "/process_api/abc");
        assert_eq!(memory.own_dir(), fs.path("sys/fs/cgroup/memory/process_api/abc"));
        assert_eq!(layout.hierarchy_of("cpu").unwrap().own_dir(), fs.path("sys/fs/cgroup/cpu"));
    }

    #[test]
    fn v2_host_offers_what_the_parent_enabled() {
        let fs = FixtureFs::new(Kind::V2, "/kubepods/pod1/ctr");
        let layout = Layout::detect(&fs).unwrap();
        assert_eq!(layout.version, Version::V2);
        let h = &layout.hierarchies[0];
        assert_eq!(h.own_dir(), fs.path("sys/fs/cgroup/kubepods/pod1/ctr"));
        // The fixture's intermediate cgroups enable nothing for their children.
        assert_eq!(layout.missing(), ["cpu", "memory", "pids"]);
    }

    #[test]
    fn co_mounted_v1_controllers_and_container_mount_roots_resolve() {
        let fs = FixtureFs::new(Kind::V1Hybrid, "/");
        std::fs::write(
            fs.path("proc/self/mountinfo"),
            "35 24 0:31 /docker/abc /sys/fs/cgroup/cpu,cpuacct ro,nosuid - cgroup cgroup rw,cpu,cpuacct\n\
             36 24 0:32 /docker/abc /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n",
        )
        .unwrap();
        std::fs::write(fs.path("proc/self/cgroup"), "4:cpu,cpuacct:/docker/abc\n3:memory:/docker/abc\n").unwrap();
        let layout = Layout::detect(&fs).unwrap();
        assert_eq!(layout.hierarchies.len(), 2);
        assert_eq!(layout.hierarchies[0].controllers, ["cpu", "cpuacct"]);
        assert_eq!(layout.hierarchies[0].own_dir(), fs.path("sys/fs/cgroup/cpu,cpuacct"));
        assert_eq!(layout.hierarchies[1].dir_of("/docker/abc/wasmbox"), fs.path("sys/fs/cgroup/memory/wasmbox"));
        assert_eq!(layout.missing(), ["pids"]);
    }

    #[test]
    fn no_cgroup_mounts_is_a_detection_error() {
        let fs = FixtureFs::new(Kind::V2, "/");
        std::fs::write(fs.path("proc/self/mountinfo"), "1 0 8:1 / / rw - ext4 /dev/sda1 rw\n").unwrap();
        assert!(matches!(Layout::detect(&fs), Err(CgroupError::Detect(m)) if m.contains("no cgroup")));
    }

    #[test]
    fn membership_parses_both_versions() {
        let m = Membership::parse("12:pids:/a\n4:cpu,cpuacct:/b\n0::/c\n");
        assert_eq!(m.v1_path("cpuacct"), Some("/b"));
        assert_eq!(m.v1_path("pids"), Some("/a"));
        assert_eq!(m.v2_path(), Some("/c"));
        assert_eq!(m.v1_path("memory"), None);
    }
}
