//! Per-worker cgroups: the kernel enforces each invocation's CPU, memory and pids limits on
//! everything its worker process uses, and accounts the CPU time and peak memory it used.
//!
//! The tree, per hierarchy (v1: one per controller; v2: one):
//!
//! ```text
//! <supervisor's own cgroup>/<WASMBOX_CGROUP_PARENT, default "wasmbox">/
//!     worker-0/  worker-1/ ...   one per pool slot, reused by every worker of that slot
//!     supervisor/                v2 only, when the supervisor had to leave its own cgroup
//! ```
//!
//! A worker enters its slot's cgroup between fork and exec (see [`place_in_child`]), so no
//! instruction of the worker binary runs unconfined. Before each invocation the supervisor
//! rewrites the slot's limits (only those that changed) and resets the memory peak; after
//! it, reads the CPU-time delta and the peak. Limit files go through cgroups-rs; the
//! counters read on every invocation are kept open and read with `pread`, which keeps the
//! per-invocation cost to a few system calls.

pub mod fs;
pub mod layout;
mod slot;

use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use self::fs::CgroupFs;
use self::layout::{Hierarchy, Layout, Version};
pub use self::slot::{Accounting, Checkpoint, SlotCgroup, SlotRequest, place_in_child};
use crate::error_chain;

/// CFS bandwidth period; `cpu_quota` millicores become `millicores x 100 us` per period.
pub const CPU_PERIOD_US: u64 = 100_000;
/// The kernel refuses quotas under 1 ms per period: 10 millicores.
pub const MIN_CPU_QUOTA_MILLIS: u64 = 10;

/// `WASMBOX_CGROUPS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupMode {
    /// Use cgroups where they are writable; otherwise warn once and run without them.
    Auto,
    /// Refuse to start without cgroups, naming what is missing.
    Required,
    /// Never touch a cgroup file.
    Off,
}

/// Settings from the configuration.
#[derive(Debug, Clone)]
pub struct CgroupSettings {
    pub mode: CgroupMode,
    /// Relative: under the supervisor's own cgroup. Absolute: from the hierarchy root.
    pub parent: String,
    pub pids_max: u64,
    /// Added to every invocation's memory limit (see [`SlotRequest`]).
    pub memory_headroom_bytes: u64,
    /// `compiler-<n>` cgroups for the compile processes, beside the workers' slots.
    pub compilers: usize,
}

/// Why cgroups cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cannot detect the cgroup layout: {0}")]
    Detect(String),
    #[error("cgroup controllers not available to this process: {missing} ({hint})")]
    Missing { missing: String, hint: String },
    #[error("{path} is not writable: {source}")]
    NotWritable {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "cgroup {path} is in use by another wasmbox supervisor; give each supervisor its own \
         WASMBOX_CGROUP_PARENT"
    )]
    ParentInUse { path: PathBuf },
    #[error("invalid WASMBOX_CGROUP_PARENT {0:?}: use names of letters, digits, '.', '_' and '-' separated by '/'")]
    InvalidParent(String),
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{action} {path}: {source}")]
    Controller {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: cgroups_rs::fs::error::Error,
    },
}

impl CgroupError {
    fn io(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> CgroupError {
        let path = path.to_path_buf();
        move |source| CgroupError::Io { action, path, source }
    }

    /// Whether `auto` mode should fall back to running without cgroups.
    fn means_unavailable(&self) -> bool {
        !matches!(self, CgroupError::ParentInUse { .. } | CgroupError::InvalidParent(_))
    }
}

/// One hierarchy's parent cgroup for this supervisor.
#[derive(Debug)]
struct Parent {
    hierarchy: Hierarchy,
    dir: PathBuf,
    /// Namespace-view path of the parent cgroup.
    path: String,
    /// Directories this run created (outermost first), removed at teardown.
    created: Vec<PathBuf>,
    /// Held for the supervisor's lifetime: a second supervisor on the same parent would
    /// remove this one's worker cgroups as "leftovers".
    _lock: File,
}

/// v2: what was changed outside the parent so that it could have controllers.
#[derive(Debug, Default)]
struct V2Changes {
    /// `(cgroup dir, controllers this run enabled in its subtree_control)`, outermost first.
    enabled: Vec<(PathBuf, Vec<&'static str>)>,
    /// The supervisor's original cgroup, when it moved itself into `<parent>/supervisor`.
    moved_from: Option<PathBuf>,
}

/// The supervisor's cgroups: parent and one child per worker slot.
#[derive(Debug)]
pub struct Cgroups {
    fs: Arc<dyn CgroupFs>,
    layout: Layout,
    parents: Vec<Parent>,
    slots: Vec<Arc<SlotCgroup>>,
    compilers: Vec<Arc<SlotCgroup>>,
    v2: V2Changes,
    leftovers_removed: usize,
}

const SUPERVISOR_LEAF: &str = "supervisor";

impl Cgroups {
    /// Sets up the tree for `slots` workers according to `settings.mode`. `Ok(None)` means
    /// run without cgroups (mode off, or auto on a host where they are unusable; a warning
    /// says why).
    pub fn setup(
        fs: Arc<dyn CgroupFs>,
        settings: &CgroupSettings,
        slots: usize,
    ) -> Result<Option<Cgroups>, CgroupError> {
        if settings.mode == CgroupMode::Off {
            tracing::info!("cgroups: off (WASMBOX_CGROUPS=off); workers run without kernel limits");
            return Ok(None);
        }
        let relative = validate_parent(&settings.parent)?;
        match Self::build(fs, settings, &relative, slots) {
            Ok(cgroups) => {
                cgroups.log();
                Ok(Some(cgroups))
            }
            Err(e) if settings.mode == CgroupMode::Auto && e.means_unavailable() => {
                tracing::warn!(
                    error = %error_chain(&e),
                    "cgroups unavailable: workers run without kernel CPU, memory and pids limits \
                     (the engine still caps linear memory and time); set WASMBOX_CGROUPS=required \
                     to refuse to start instead, or off to silence this"
                );
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    fn build(
        fs: Arc<dyn CgroupFs>,
        settings: &CgroupSettings,
        relative: &str,
        slots: usize,
    ) -> Result<Cgroups, CgroupError> {
        let layout = Layout::detect(fs.as_ref())?;
        let missing = layout.missing();
        let all_missing = layout.hierarchies.iter().all(|h| h.controllers.is_empty());
        if all_missing || (settings.mode == CgroupMode::Required && !missing.is_empty()) {
            let hint = match layout.version {
                Version::V1 => "mount the v1 cpu, cpuacct, memory and pids controllers".to_string(),
                Version::V2 => format!(
                    "enable them in the cgroup.subtree_control of the parent of {} (cgroup delegation)",
                    layout.hierarchies.first().map(|h| h.own.as_str()).unwrap_or("/")
                ),
            };
            let missing = if all_missing { "all".to_string() } else { missing.join(", ") };
            return Err(CgroupError::Missing { missing, hint });
        }
        let mut cgroups = Cgroups {
            fs,
            layout: layout.clone(),
            parents: Vec::new(),
            slots: Vec::new(),
            compilers: Vec::new(),
            v2: V2Changes::default(),
            leftovers_removed: 0,
        };
        // Anything created before a failure is removed again.
        match cgroups.build_tree(settings, relative, slots) {
            Ok(()) => Ok(cgroups),
            Err(e) => {
                cgroups.teardown();
                Err(e)
            }
        }
    }

    fn build_tree(&mut self, settings: &CgroupSettings, relative: &str, slots: usize) -> Result<(), CgroupError> {
        for hierarchy in self.layout.hierarchies.iter().filter(|h| !h.controllers.is_empty()) {
            let path = if relative.starts_with('/') {
                relative.to_string()
            } else {
                format!("{}/{relative}", hierarchy.own.trim_end_matches('/'))
            };
            let dir = hierarchy.dir_of(&path);
            let created = self.create_all(&dir)?;
            let lock = lock_dir(&dir)?;
            self.parents.push(Parent { hierarchy: hierarchy.clone(), dir, path, created, _lock: lock });
        }
        self.remove_leftovers()?;
        if self.layout.version == Version::V2 {
            self.delegate_v2()?;
        }
        for index in 0..slots {
            let slot = self.create_leaf(&format!("worker-{index}"), index, settings)?;
            self.slots.push(Arc::new(slot));
        }
        for index in 0..settings.compilers {
            let slot = self.create_leaf(&format!("compiler-{index}"), index, settings)?;
            self.compilers.push(Arc::new(slot));
        }
        Ok(())
    }

    /// Creates the leaf `name` under the parent in every hierarchy.
    fn create_leaf(&self, name: &str, index: usize, settings: &CgroupSettings) -> Result<SlotCgroup, CgroupError> {
        let mut dirs = Vec::new();
        for parent in &self.parents {
            let dir = parent.dir.join(name);
            self.fs.create_cgroup(&dir).map_err(CgroupError::io("cannot create cgroup", &dir))?;
            dirs.push((parent.hierarchy.clone(), dir, format!("{}/{name}", parent.path.trim_end_matches('/'))));
        }
        SlotCgroup::open(index, self.layout.version, dirs, settings)
    }

    /// Creates `dir` and missing ancestors; returns what it created, outermost first.
    fn create_all(&self, dir: &Path) -> Result<Vec<PathBuf>, CgroupError> {
        let mut missing = Vec::new();
        let mut cursor = dir.to_path_buf();
        while !cursor.exists() {
            missing.push(cursor.clone());
            if !cursor.pop() {
                break;
            }
        }
        missing.reverse();
        let mut created = Vec::new();
        for d in missing {
            match self.fs.create_cgroup(&d) {
                Ok(()) => created.push(d),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(source) if is_permission(&source) => {
                    for c in created.iter().rev() {
                        let _ = self.fs.remove_cgroup(c);
                    }
                    return Err(CgroupError::NotWritable { path: d, source });
                }
                Err(source) => return Err(CgroupError::Io { action: "cannot create cgroup", path: d, source }),
            }
        }
        Ok(created)
    }

    /// Removes `worker-<n>` (and v2 `supervisor`) cgroups a previous run left behind, killing
    /// any process still in them. Nothing else under the parent is touched.
    fn remove_leftovers(&mut self) -> Result<(), CgroupError> {
        let own_pid = self.fs.own_pid();
        for parent in &self.parents {
            let entries = std::fs::read_dir(&parent.dir).map_err(CgroupError::io("cannot list", &parent.dir))?;
            let mut names: Vec<String> = entries
                .flatten()
                .filter(|e| e.path().is_dir())
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| is_worker_dir(n) || n == SUPERVISOR_LEAF)
                .collect();
            names.sort();
            for name in names {
                let dir = parent.dir.join(&name);
                if read_pids(&dir).contains(&own_pid) {
                    continue;
                }
                empty_and_remove(self.fs.as_ref(), &dir, Duration::from_secs(5))?;
                tracing::info!(cgroup = %dir.display(), "removed cgroup left by a previous run");
                self.leftovers_removed += 1;
            }
        }
        Ok(())
    }

    /// v2's "no internal processes" rule: a cgroup whose children have controllers holds no
    /// processes. When the parent sits under the supervisor's own (non-root) cgroup, as with
    /// delegation inside a container, the supervisor first moves itself into
    /// `<parent>/supervisor`, then enables the controllers on the way down.
    fn delegate_v2(&mut self) -> Result<(), CgroupError> {
        let Some(parent) = self.parents.first() else { return Ok(()) };
        let hierarchy = parent.hierarchy.clone();
        let wanted = hierarchy.controllers.clone();
        let own_dir = hierarchy.own_dir();
        let parent_dir = parent.dir.clone();
        // Cgroups that need the controllers in subtree_control: from the highest one this
        // run may change (own, or the mount root for an absolute parent) down to the parent.
        let mut chain = Vec::new();
        let mut cursor = parent_dir.clone();
        loop {
            chain.push(cursor.clone());
            if cursor == own_dir || cursor == hierarchy.mount || !cursor.pop() {
                break;
            }
        }
        chain.reverse();
        let needs = |dir: &Path| -> Vec<&'static str> {
            let enabled = std::fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap_or_default();
            wanted.iter().copied().filter(|c| !enabled.split_whitespace().any(|e| e == *c)).collect()
        };
        let own_is_root = !own_dir.join("cgroup.type").exists();
        let own_pid = self.fs.own_pid();
        if chain.first() == Some(&own_dir)
            && !own_is_root
            && !needs(&own_dir).is_empty()
            && read_pids(&own_dir).contains(&own_pid)
        {
            let leaf = parent_dir.join(SUPERVISOR_LEAF);
            self.fs.create_cgroup(&leaf).map_err(CgroupError::io("cannot create cgroup", &leaf))?;
            self.fs.move_process(&leaf, own_pid).map_err(CgroupError::io("cannot move the supervisor into", &leaf))?;
            self.v2.moved_from = Some(own_dir.clone());
            tracing::info!(from = %own_dir.display(), to = %leaf.display(), "moved the supervisor into a leaf cgroup so its workers' cgroups can have controllers");
        }
        for dir in chain {
            let add = needs(&dir);
            if add.is_empty() {
                continue;
            }
            let line = add.iter().map(|c| format!("+{c}")).collect::<Vec<_>>().join(" ");
            let file = dir.join("cgroup.subtree_control");
            self.fs.change_subtree_control(&dir, &line).map_err(|source| {
                let busy = source.raw_os_error() == Some(nix::libc::EBUSY);
                if busy {
                    CgroupError::Missing {
                        missing: add.join(", "),
                        hint: format!(
                            "{} holds other processes ({:?}), so its children cannot have controllers; \
                             run wasmbox as the container's main process or set WASMBOX_CGROUP_PARENT \
                             to a delegated cgroup",
                            dir.display(),
                            read_pids(&dir)
                        ),
                    }
                } else {
                    CgroupError::Io { action: "cannot enable controllers in", path: file.clone(), source }
                }
            })?;
            self.v2.enabled.push((dir, add));
        }
        Ok(())
    }

    fn log(&self) {
        let controllers: Vec<String> =
            self.parents.iter().map(|p| format!("{}={}", p.hierarchy.controllers.join(","), p.dir.display())).collect();
        let missing = self.layout.missing();
        tracing::info!(
            version = %self.layout.version,
            hybrid = self.layout.hybrid,
            writable = true,
            slots = self.slots.len(),
            leftovers_removed = self.leftovers_removed,
            pids_max = self.slots.first().and_then(|s| s.pids_max()).unwrap_or(0),
            "cgroups: {} {}{}",
            self.layout.version,
            controllers.join(" "),
            if missing.is_empty() { String::new() } else { format!(" (missing: {})", missing.join(", ")) }
        );
        if !missing.is_empty() {
            tracing::warn!(missing = %missing.join(", "), "cgroups: some controllers are unavailable; their limits are not enforced");
        }
    }

    pub fn slot(&self, index: usize) -> Option<&Arc<SlotCgroup>> {
        self.slots.get(index)
    }

    /// The cgroup of compile process slot `index`.
    pub fn compiler(&self, index: usize) -> Option<&Arc<SlotCgroup>> {
        self.compilers.get(index)
    }

    pub fn version(&self) -> Version {
        self.layout.version
    }

    /// Parent cgroup directories, one per hierarchy.
    pub fn parent_dirs(&self) -> Vec<PathBuf> {
        self.parents.iter().map(|p| p.dir.clone()).collect()
    }

    /// A summary for status endpoints.
    pub fn describe(&self) -> Description {
        Description {
            version: self.layout.version.to_string(),
            controllers: self.parents.iter().flat_map(|p| p.hierarchy.controllers.iter().copied()).collect(),
            parents: self.parent_dirs().iter().map(|d| d.display().to_string()).collect(),
        }
    }

    /// Removes every cgroup this supervisor created and undoes its v2 changes. Workers must
    /// be gone; any process still inside is killed. Idempotent.
    pub fn teardown(&mut self) {
        let compilers = std::mem::take(&mut self.compilers);
        for slot in std::mem::take(&mut self.slots).into_iter().chain(compilers) {
            for dir in slot.dirs() {
                if let Err(e) = empty_and_remove(self.fs.as_ref(), dir, Duration::from_secs(5)) {
                    tracing::warn!(error = %error_chain(&e), "cannot remove worker cgroup");
                }
            }
        }
        for (dir, added) in self.v2.enabled.drain(..).rev() {
            let line = added.iter().map(|c| format!("-{c}")).collect::<Vec<_>>().join(" ");
            if let Err(e) = self.fs.change_subtree_control(&dir, &line) {
                tracing::warn!(cgroup = %dir.display(), error = %e, "cannot disable controllers");
            }
        }
        if let Some(own) = self.v2.moved_from.take() {
            match self.fs.move_process(&own, self.fs.own_pid()) {
                Ok(()) => {
                    if let Some(parent) = self.parents.first() {
                        let leaf = parent.dir.join(SUPERVISOR_LEAF);
                        if let Err(e) = self.fs.remove_cgroup(&leaf) {
                            tracing::warn!(cgroup = %leaf.display(), error = %e, "cannot remove cgroup");
                        }
                    }
                }
                Err(e) => tracing::warn!(cgroup = %own.display(), error = %e, "cannot move the supervisor back"),
            }
        }
        for parent in std::mem::take(&mut self.parents) {
            // The parent goes when this run created it or it only held leftovers of ours.
            let mut remove: Vec<PathBuf> = parent.created.clone();
            if remove.is_empty() && self.leftovers_removed > 0 {
                remove.push(parent.dir.clone());
            }
            for dir in remove.iter().rev() {
                if let Err(e) = remove_with_retry(self.fs.as_ref(), dir, Duration::from_secs(2)) {
                    tracing::warn!(cgroup = %dir.display(), error = %e, "cannot remove cgroup");
                }
            }
        }
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// What `/stats` shows about cgroups.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Description {
    pub version: String,
    pub controllers: Vec<&'static str>,
    pub parents: Vec<String>,
}

fn validate_parent(parent: &str) -> Result<String, CgroupError> {
    let invalid = || CgroupError::InvalidParent(parent.to_string());
    let absolute = parent.starts_with('/');
    let parts: Vec<&str> = parent.split('/').filter(|p| !p.is_empty()).collect();
    if parts.is_empty() || parent.len() > 255 {
        return Err(invalid());
    }
    for part in &parts {
        let ok_chars = part.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !ok_chars || *part == "." || *part == ".." || is_worker_dir(part) || *part == SUPERVISOR_LEAF {
            return Err(invalid());
        }
    }
    let joined = parts.join("/");
    Ok(if absolute { format!("/{joined}") } else { joined })
}

/// `worker-<n>` or `compiler-<n>`: the leaves this program creates under its parent.
fn is_worker_dir(name: &str) -> bool {
    let numbered = |n: &str| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit());
    name.strip_prefix("worker-").is_some_and(numbered) || name.strip_prefix("compiler-").is_some_and(numbered)
}

fn is_permission(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::PermissionDenied || e.raw_os_error() == Some(nix::libc::EROFS)
}

fn lock_dir(dir: &Path) -> Result<File, CgroupError> {
    let file = File::open(dir).map_err(CgroupError::io("cannot open", dir))?;
    // SAFETY: flock on a descriptor this function owns; no memory is involved.
    let rc = unsafe { nix::libc::flock(file.as_raw_fd(), nix::libc::LOCK_EX | nix::libc::LOCK_NB) };
    if rc == 0 {
        return Ok(file);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(nix::libc::EWOULDBLOCK) {
        return Err(CgroupError::ParentInUse { path: dir.to_path_buf() });
    }
    Err(CgroupError::Io { action: "cannot lock", path: dir.to_path_buf(), source: e })
}

/// PIDs listed in a cgroup's `cgroup.procs`.
pub fn read_pids(dir: &Path) -> Vec<u32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Kills every process in `dir` (v2: `cgroup.kill` where the kernel has it), waits until
/// it is empty, removes it.
fn empty_and_remove(fs: &dyn CgroupFs, dir: &Path, within: Duration) -> Result<(), CgroupError> {
    if !dir.exists() {
        return Ok(());
    }
    let deadline = Instant::now() + within;
    let mut pause = Duration::from_millis(2);
    loop {
        let pids = read_pids(dir);
        if pids.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            return Err(CgroupError::Io {
                action: "processes would not leave",
                path: dir.to_path_buf(),
                source: io::Error::from_raw_os_error(nix::libc::EBUSY),
            });
        }
        let kill_file = dir.join("cgroup.kill");
        if !(kill_file.exists() && std::fs::write(&kill_file, "1").is_ok()) {
            for pid in pids {
                fs.kill(pid).map_err(CgroupError::io("cannot kill a process in", dir))?;
            }
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
    }
    remove_with_retry(fs, dir, deadline.saturating_duration_since(Instant::now()))
}

/// `rmdir` can fail with EBUSY for a moment after the last process left.
fn remove_with_retry(fs: &dyn CgroupFs, dir: &Path, within: Duration) -> Result<(), CgroupError> {
    let deadline = Instant::now() + within;
    let mut pause = Duration::from_millis(2);
    loop {
        match fs.remove_cgroup(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() < deadline && e.raw_os_error() == Some(nix::libc::EBUSY) => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(100));
            }
            Err(source) => {
                return Err(CgroupError::Io { action: "cannot remove cgroup", path: dir.to_path_buf(), source });
            }
        }
    }
}

impl fmt::Display for Description {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} [{}] {}", self.version, self.controllers.join(","), self.parents.join(" "))
    }
}

#[cfg(test)]
mod tests;
