//! Which hardening layers the workers get (see `wasmbox_worker::harden` for what each
//! does inside the worker). Every layer is on by default where the kernel and the
//! supervisor's privileges allow it, and switchable with its `WASMBOX_WORKER_*` setting;
//! the supervisor logs one line at startup saying which are active, and refuses a worker
//! whose hello does not report every layer asked of it.

use std::fmt;

use crate::config::{Config, ConfigError, SeccompMode};

/// The unprivileged user workers switch to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

/// Default first uid of the per-slot range (`WASMBOX_WORKER_UID_BASE`): far above login
/// users, system users and the subordinate ranges rootless containers are usually given.
pub const DEFAULT_UID_BASE: u32 = 2_000_000;

/// Which unprivileged uid each process runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkerUsers {
    /// Worker slot `n` runs as `base + n`, compiler slot `m` as `base + workers + m` (gid
    /// the same number): no two slots can signal, trace or read each other.
    PerSlot { base: u32, workers: u32, compilers: u32 },
    /// Every worker and compiler as one user (`WASMBOX_WORKER_USER`).
    Shared(WorkerUser),
}

impl WorkerUsers {
    /// (uid, gid) of worker slot `slot`.
    pub fn worker(&self, slot: usize) -> (u32, u32) {
        match self {
            WorkerUsers::PerSlot { base, .. } => {
                let id = base.saturating_add(slot as u32);
                (id, id)
            }
            WorkerUsers::Shared(u) => (u.uid, u.gid),
        }
    }

    /// (uid, gid) of compiler slot `index`.
    pub fn compiler(&self, index: usize) -> (u32, u32) {
        match self {
            WorkerUsers::PerSlot { base, workers, .. } => {
                let id = base.saturating_add(*workers).saturating_add(index as u32);
                (id, id)
            }
            WorkerUsers::Shared(u) => (u.uid, u.gid),
        }
    }
}

/// Resource limits of each worker process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rlimits {
    pub nofile: u64,
    pub fsize_bytes: u64,
    /// Per user, so only set when workers run as their own user.
    pub nproc: Option<u64>,
}

/// The layers workers get, and those that are off or unavailable, with why.
#[derive(Debug, Clone)]
pub struct WorkerHardening {
    pub close_fds: bool,
    pub rlimits: Option<Rlimits>,
    pub user: Option<WorkerUsers>,
    pub netns: bool,
    pub no_new_privs: bool,
    pub seccomp: SeccompMode,
    pub test_hooks: bool,
    /// Layers not applied: (layer, reason).
    pub skipped: Vec<(&'static str, String)>,
}

impl WorkerHardening {
    /// Resolves the settings against what this host and process allow.
    pub fn resolve(config: &Config) -> Result<Self, ConfigError> {
        let mut skipped = Vec::new();
        let mut off = |layer: &'static str, setting: &str| skipped.push((layer, format!("{setting}=false")));
        if !config.worker_close_fds {
            off("close_fds", "WASMBOX_WORKER_CLOSE_FDS");
        }
        if !config.worker_no_new_privs {
            off("no_new_privs", "WASMBOX_WORKER_NO_NEW_PRIVS");
        }
        if !config.worker_rlimits {
            off("rlimits", "WASMBOX_WORKER_RLIMITS");
        }
        let root = nix::unistd::geteuid().is_root();
        // A user named explicitly must be one the layer means: never root, whether or not
        // this process could switch to it.
        let named = match config.worker_user.as_deref().map(str::trim) {
            Some(spec) if !spec.is_empty() => Some(refuse_root(lookup_user(spec)?)?),
            _ => None,
        };
        if named.is_some() && config.worker_uid_base.is_some() {
            return Err(ConfigError(
                "WASMBOX_WORKER_USER (one user for all workers) and WASMBOX_WORKER_UID_BASE (a uid per slot) \
                 exclude each other; set one"
                    .into(),
            ));
        }
        let (workers, compilers) = (config.worker_count() as u32, config.compiler_count() as u32);
        let user = match config.worker_user.as_deref().map(str::trim) {
            Some("") => {
                skipped.push(("user", "WASMBOX_WORKER_USER is empty: workers run as the supervisor's user".into()));
                None
            }
            _ if !root => {
                skipped.push(("user", "not started as root: workers run as the supervisor's user".into()));
                None
            }
            Some(_) => named.map(WorkerUsers::Shared),
            None => {
                let base = config.worker_uid_base.unwrap_or(DEFAULT_UID_BASE);
                let last = u64::from(base) + u64::from(workers) + u64::from(compilers);
                if base == 0 || last >= u64::from(u32::MAX) {
                    return Err(ConfigError(format!(
                        "WASMBOX_WORKER_UID_BASE={base}: the range of {} uids must start above 0 and end below {}",
                        workers + compilers,
                        u32::MAX
                    )));
                }
                Some(WorkerUsers::PerSlot { base, workers, compilers })
            }
        };
        let netns = if !config.worker_netns {
            skipped.push(("netns", "WASMBOX_WORKER_NETNS=false".into()));
            false
        } else {
            match probe_netns() {
                Ok(()) => true,
                Err(reason) => {
                    skipped.push(("netns", format!("not permitted here ({reason})")));
                    false
                }
            }
        };
        let mut seccomp = config.worker_seccomp;
        if seccomp == SeccompMode::Off {
            skipped.push(("seccomp", "WASMBOX_WORKER_SECCOMP=off".into()));
        } else if let Err(reason) = probe_seccomp() {
            skipped.push(("seccomp", format!("not available ({reason})")));
            seccomp = SeccompMode::Off;
        }
        if seccomp != SeccompMode::Off && !config.worker_no_new_privs {
            return Err(ConfigError(
                "WASMBOX_WORKER_SECCOMP needs WASMBOX_WORKER_NO_NEW_PRIVS (set WASMBOX_WORKER_SECCOMP=off to run without both)"
                    .into(),
            ));
        }
        if config.test_hooks && !cfg!(any(debug_assertions, feature = "test-hooks")) {
            return Err(ConfigError(
                "WASMBOX_TEST_HOOKS exists only in debug builds and builds with the test-hooks feature".into(),
            ));
        }
        let rlimits = config.worker_rlimits.then(|| Rlimits {
            nofile: config.worker_nofile,
            fsize_bytes: config.worker_fsize_mb.saturating_mul(1 << 20),
            // Threads count against the uid: one slot's pids.max with a uid per slot, every
            // worker's and compiler's with one shared user.
            nproc: user.as_ref().map(|u| match u {
                WorkerUsers::PerSlot { .. } => config.pids_max + 64,
                WorkerUsers::Shared(_) => u64::from(workers + compilers).saturating_mul(config.pids_max) + 64,
            }),
        });
        Ok(WorkerHardening {
            close_fds: config.worker_close_fds,
            rlimits,
            user,
            netns,
            no_new_privs: config.worker_no_new_privs,
            seccomp,
            test_hooks: config.test_hooks,
            skipped,
        })
    }

    /// Flags for `wasmbox-worker`, but the user (per slot: [`WorkerUsers`]).
    pub fn worker_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if self.close_fds {
            args.push("--close-fds".into());
        }
        if self.netns {
            args.push("--netns".into());
        }
        if let Some(r) = &self.rlimits {
            args.extend(["--rlimits".into(), format!("--nofile={}", r.nofile), format!("--fsize={}", r.fsize_bytes)]);
            if let Some(nproc) = r.nproc {
                args.push(format!("--nproc={nproc}"));
            }
        }
        if self.no_new_privs {
            args.push("--no-new-privs".into());
        }
        args.push(format!("--seccomp={}", self.seccomp.flag()));
        if self.test_hooks {
            args.push("--test-hooks".into());
        }
        args
    }

    /// The layer names a worker's hello must report (protocol `HARDENING_LAYERS`).
    pub fn expected_layers(&self) -> Vec<&'static str> {
        let mut layers = vec!["pdeathsig", "non_dumpable"];
        let on = [
            ("close_fds", self.close_fds),
            ("rlimits", self.rlimits.is_some()),
            ("netns", self.netns),
            ("user", self.user.is_some()),
            ("no_new_privs", self.no_new_privs),
            ("seccomp", self.seccomp != SeccompMode::Off),
        ];
        layers.extend(on.iter().filter(|(_, on)| *on).map(|(name, _)| *name));
        layers
    }
}

/// The startup log line: `active: ...; skipped: layer (why), ...`.
impl fmt::Display for WorkerHardening {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut active = vec!["pdeathsig".to_string(), "non_dumpable".to_string()];
        if self.close_fds {
            active.push("close_fds".into());
        }
        if let Some(r) = &self.rlimits {
            let nproc = r.nproc.map(|n| format!(" nproc={n}")).unwrap_or_default();
            active.push(format!("rlimits(core=0 nofile={} fsize={}MiB{nproc})", r.nofile, r.fsize_bytes >> 20));
        }
        match &self.user {
            Some(WorkerUsers::PerSlot { base, workers, compilers }) => {
                let last = base + workers + compilers - 1;
                active.push(format!("user=uid per slot({base}..={last}: {workers} workers, {compilers} compilers)"));
            }
            Some(WorkerUsers::Shared(u)) => active.push(format!("user={}({}:{}, shared)", u.name, u.uid, u.gid)),
            None => {}
        }
        if self.netns {
            active.push("netns".into());
        }
        if self.no_new_privs {
            active.push("no_new_privs".into());
        }
        if self.seccomp != SeccompMode::Off {
            active.push(format!("seccomp={}", self.seccomp.flag()));
        }
        if self.test_hooks {
            active.push("TEST_HOOKS".into());
        }
        write!(f, "active: {}", active.join(" "))?;
        if !self.skipped.is_empty() {
            let skipped: Vec<String> = self.skipped.iter().map(|(l, why)| format!("{l} ({why})")).collect();
            write!(f, "; skipped: {}", skipped.join(", "))?;
        }
        Ok(())
    }
}

/// The unprivileged-user layer with uid 0 or gid 0 would be no layer at all, and saying
/// nothing would let an operator believe workers are confined: refuse it.
fn refuse_root(user: WorkerUser) -> Result<WorkerUser, ConfigError> {
    if user.uid == 0 || user.gid == 0 {
        return Err(ConfigError(format!(
            "WASMBOX_WORKER_USER names {}({}:{}): workers must not run as root or group 0; set an unprivileged user, \
             or an empty value to run workers as the supervisor's own user (reported as a skipped layer)",
            user.name, user.uid, user.gid
        )));
    }
    Ok(user)
}

/// `name`, `uid` or `uid:gid`.
fn lookup_user(spec: &str) -> Result<WorkerUser, ConfigError> {
    let bad = |why: String| ConfigError(format!("WASMBOX_WORKER_USER={spec:?}: {why}"));
    let (user_part, gid_part) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let user = match user_part.parse::<u32>() {
        Ok(uid) => nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
            .map_err(|e| bad(e.to_string()))?
            .map(|u| (u.name, u.uid.as_raw(), u.gid.as_raw()))
            .unwrap_or_else(|| (uid.to_string(), uid, uid)),
        Err(_) => nix::unistd::User::from_name(user_part)
            .map_err(|e| bad(e.to_string()))?
            .map(|u| (u.name, u.uid.as_raw(), u.gid.as_raw()))
            .ok_or_else(|| bad("no such user".into()))?,
    };
    let gid = match gid_part {
        Some(g) => g.parse::<u32>().map_err(|_| bad(format!("{g:?} is not a numeric gid")))?,
        None => user.2,
    };
    Ok(WorkerUser { name: user.0, uid: user.1, gid })
}

/// Whether this process may create a network namespace (tried on a short-lived thread:
/// namespaces belong to threads, so the supervisor's own stay untouched).
fn probe_netns() -> Result<(), String> {
    std::thread::spawn(|| nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET))
        .join()
        .map_err(|_| "probe thread panicked".to_string())?
        .map_err(|e| e.desc().to_string())
}

/// Whether the kernel has seccomp filters for this architecture.
fn probe_seccomp() -> Result<(), String> {
    if !matches!(std::env::consts::ARCH, "x86_64" | "aarch64") {
        return Err(format!("no allow-list for {}", std::env::consts::ARCH));
    }
    let status = std::fs::read_to_string("/proc/self/status").map_err(|e| e.to_string())?;
    if !status.lines().any(|l| l.starts_with("Seccomp:")) {
        return Err("kernel built without CONFIG_SECCOMP".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn resolve(args: &[&str]) -> Result<WorkerHardening, ConfigError> {
        let config = Config::try_parse_from(std::iter::once("wasmbox").chain(args.iter().copied())).expect("parse");
        WorkerHardening::resolve(&config)
    }

    #[test]
    fn every_layer_is_on_by_default_and_switchable() {
        let all = resolve(&[]).expect("defaults");
        assert!(all.close_fds && all.no_new_privs && all.rlimits.is_some());
        let none = resolve(&[
            "--worker-close-fds=false",
            "--worker-rlimits=false",
            "--worker-user=",
            "--worker-netns=false",
            "--worker-no-new-privs=false",
            "--worker-seccomp=off",
        ])
        .expect("all off");
        assert_eq!(none.expected_layers(), vec!["pdeathsig", "non_dumpable"]);
        assert_eq!(none.worker_args(), vec!["--seccomp=off".to_string()]);
        let line = none.to_string();
        for layer in ["close_fds", "rlimits", "user", "netns", "no_new_privs", "seccomp"] {
            assert!(line.contains(&format!("{layer} (")), "{layer} missing from {line}");
        }
    }

    #[test]
    fn seccomp_without_no_new_privs_is_refused() {
        let err = resolve(&["--worker-no-new-privs=false"]).expect_err("must refuse");
        assert!(err.to_string().contains("WASMBOX_WORKER_NO_NEW_PRIVS"), "{err}");
    }

    #[test]
    fn root_as_the_worker_user_is_refused() {
        for spec in ["0", "root", "0:0", "nobody:0", "root:65534"] {
            let err = resolve(&[&format!("--worker-user={spec}")]).expect_err(spec);
            assert!(err.to_string().contains("must not run as root or group 0"), "{spec}: {err}");
        }
        // Empty keeps the supervisor's user, and says so.
        let same = resolve(&["--worker-user="]).expect("empty");
        assert!(same.user.is_none());
        assert!(same.to_string().contains("user (WASMBOX_WORKER_USER is empty"), "{same}");
    }

    /// As root, every worker slot and compiler slot has a uid of its own, from the base.
    #[test]
    fn each_slot_gets_its_own_uid() {
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let h = resolve(&["--workers=3", "--compilers=2", "--worker-uid-base=50000"]).expect("range");
        let users = h.user.clone().expect("user layer on");
        let ids: Vec<(u32, u32)> = (0..3).map(|i| users.worker(i)).chain((0..2).map(|i| users.compiler(i))).collect();
        assert_eq!(ids, [(50000, 50000), (50001, 50001), (50002, 50002), (50003, 50003), (50004, 50004)]);
        assert!(h.to_string().contains("uid per slot(50000..=50004"), "{h}");
        assert_eq!(h.rlimits.and_then(|r| r.nproc), Some(resolve(&[]).unwrap().rlimits.unwrap().nproc.unwrap()));
        let shared = resolve(&["--worker-user=nobody"]).expect("one user");
        assert!(matches!(shared.user, Some(WorkerUsers::Shared(_))));
        let both = resolve(&["--worker-user=nobody", "--worker-uid-base=50000"]).expect_err("both");
        assert!(both.to_string().contains("exclude each other"), "{both}");
        assert!(resolve(&["--worker-uid-base=0"]).is_err());
        assert!(resolve(&[&format!("--worker-uid-base={}", u32::MAX - 2)]).is_err());
    }

    #[test]
    fn users_resolve_by_name_and_number() {
        let nobody = lookup_user("nobody").expect("nobody exists");
        assert_ne!(nobody.uid, 0);
        assert_eq!(lookup_user(&nobody.uid.to_string()).expect("by uid"), nobody);
        assert_eq!(lookup_user(&format!("{}:123", nobody.uid)).expect("uid:gid").gid, 123);
        assert!(lookup_user("no-such-user-wasmbox").is_err());
        assert!(lookup_user("nobody:x").is_err());
    }
}
