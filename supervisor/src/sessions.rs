//! The session store: every session's committed snapshot as a file under
//! `WASMBOX_STATE_DIR/sessions/{function}/{id}.snap`, an in-memory index of them, and the
//! per-session lock that applies messages one at a time in arrival order.
//!
//! A snapshot is replaced by writing a temporary file beside it, syncing it, renaming it
//! over the old one and syncing the directory: after a crash at any moment the file is the
//! old state or the new one, whole. The state directory is locked (`flock`) by the one
//! supervisor that uses it, so two processes never interleave their writes.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::registry::FunctionName;

/// Settings of the session store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionLimits {
    /// Sessions the server holds at most (over all functions).
    pub max_sessions: usize,
    /// Bytes of snapshots the state directory holds at most (over all functions).
    pub max_total_bytes: u64,
    /// What each function may hold unless its `name.toml` says otherwise.
    pub per_function: Quota,
    /// Largest snapshot, in bytes: imported, or produced by a message.
    pub max_snapshot_bytes: u64,
    /// Sessions without a message for this long are deleted; `None`: never.
    pub idle: Option<Duration>,
}

/// What one function's sessions may hold: so one tenant cannot take every session or the
/// whole state directory from the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    pub max_sessions: usize,
    pub max_bytes: u64,
}

/// A limit a new session or a new state would pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum QuotaError {
    /// `scope` is "server" or "function".
    #[error("the {scope}'s maximum of {max} sessions is reached")]
    Sessions { scope: &'static str, max: usize },
    #[error("the {scope}'s {limit} bytes of session state would be passed")]
    Bytes { scope: &'static str, limit: u64 },
}

/// Sessions and stored bytes, counted per function and in total.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub sessions: usize,
    pub bytes: u64,
}

/// Errors of the store itself (not of a request).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot use state directory {path}")]
    Dir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "state directory {path} is in use by another wasmbox process (it holds {lock}); each supervisor needs a state directory of its own"
    )]
    Locked { path: PathBuf, lock: PathBuf },
    /// Session snapshots are tenants' state, restored into their instances: a directory
    /// someone else owns or may write to could hand one tenant another's state.
    #[error(
        "state directory {path} is {problem}; refusing to keep sessions there (it must be a directory owned by uid {uid}, not writable by group or others: point WASMBOX_STATE_DIR at a directory of this user, e.g. a new subdirectory it creates)"
    )]
    Untrusted { path: PathBuf, uid: u32, problem: String },
}

/// One session in the index.
#[derive(Debug)]
pub struct Session {
    pub function: FunctionName,
    pub id: String,
    /// Held while a message, an export, an import or a delete works on the session; tokio's
    /// mutex is fair, so waiting messages go in the order they arrived.
    pub lock: Arc<tokio::sync::Mutex<()>>,
    /// Set (under `lock`) when the session is deleted or expires: a message that was waiting
    /// for the lock finds it gone.
    pub deleted: AtomicBool,
    /// Last message or import, in milliseconds since the Unix epoch.
    last_used_ms: AtomicU64,
    /// Size of the committed snapshot.
    pub snapshot_bytes: AtomicU64,
}

impl Session {
    pub fn touch(&self) {
        self.last_used_ms.store(now_ms(), Ordering::Relaxed);
    }

    pub fn last_used_ms(&self) -> u64 {
        self.last_used_ms.load(Ordering::Relaxed)
    }

    fn idle_for(&self, now_ms: u64) -> Duration {
        Duration::from_millis(now_ms.saturating_sub(self.last_used_ms()))
    }
}

/// Ids of expired sessions remembered, so a late message hears "expired", not "not found".
const EXPIRED_REMEMBERED: usize = 65_536;

/// What a lookup found.
#[derive(Debug)]
pub enum Lookup {
    Found(Arc<Session>),
    Expired,
    Missing,
}

pub struct SessionStore {
    dir: PathBuf,
    limits: SessionLimits,
    index: Mutex<Index>,
    /// Keeps the state directory's lock for the store's lifetime.
    _lock: nix::fcntl::Flock<File>,
}

#[derive(Default)]
struct Index {
    sessions: HashMap<String, Arc<Session>>,
    /// Sessions (existing, and being created or imported: counted before they exist) and
    /// their committed bytes, per function and in total.
    per_function: HashMap<FunctionName, Usage>,
    total: Usage,
    expired: HashSet<String>,
    expired_order: VecDeque<String>,
}

impl Index {
    fn usage(&mut self, function: &FunctionName) -> &mut Usage {
        self.per_function.entry(function.clone()).or_default()
    }

    /// Counts one more session of `function`, if the limits allow it.
    fn add_session(&mut self, function: &FunctionName, max_total: usize, quota: Quota) -> Result<(), QuotaError> {
        if self.total.sessions >= max_total {
            return Err(QuotaError::Sessions { scope: "server", max: max_total });
        }
        if self.usage(function).sessions >= quota.max_sessions {
            return Err(QuotaError::Sessions { scope: "function", max: quota.max_sessions });
        }
        self.total.sessions += 1;
        self.usage(function).sessions += 1;
        Ok(())
    }

    fn remove_session(&mut self, function: &FunctionName, bytes: u64) {
        self.total.sessions = self.total.sessions.saturating_sub(1);
        self.total.bytes = self.total.bytes.saturating_sub(bytes);
        let usage = self.usage(function);
        usage.sessions = usage.sessions.saturating_sub(1);
        usage.bytes = usage.bytes.saturating_sub(bytes);
        if *usage == Usage::default() {
            self.per_function.remove(function);
        }
    }

    /// Moves `function`'s stored bytes from `old` to `new`, if growing stays within limits.
    fn resize(
        &mut self,
        function: &FunctionName,
        old: u64,
        new: u64,
        max_total: u64,
        quota: Quota,
    ) -> Result<(), QuotaError> {
        if new > old {
            let grow = new - old;
            if self.total.bytes.saturating_add(grow) > max_total {
                return Err(QuotaError::Bytes { scope: "server", limit: max_total });
            }
            if self.usage(function).bytes.saturating_add(grow) > quota.max_bytes {
                return Err(QuotaError::Bytes { scope: "function", limit: quota.max_bytes });
            }
        }
        self.apply_resize(function, old, new);
        Ok(())
    }

    /// Moves `function`'s stored bytes from `old` to `new`, whatever the limits.
    fn apply_resize(&mut self, function: &FunctionName, old: u64, new: u64) {
        self.total.bytes = self.total.bytes.saturating_sub(old).saturating_add(new);
        let usage = self.usage(function);
        usage.bytes = usage.bytes.saturating_sub(old).saturating_add(new);
    }

    fn remember_expired(&mut self, id: String) {
        if self.expired.len() >= EXPIRED_REMEMBERED {
            if let Some(oldest) = self.expired_order.pop_front() {
                self.expired.remove(&oldest);
            }
        }
        if self.expired.insert(id.clone()) {
            self.expired_order.push_back(id);
        }
    }
}

/// A place counted against the session limits (the server's and the function's) for a
/// session being created or imported; given back when dropped unless
/// [`SessionStore::insert`] turned it into a session.
pub struct Reservation<'a> {
    store: &'a SessionStore,
    function: FunctionName,
    used: bool,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if !self.used {
            self.store.lock_index().remove_session(&self.function, 0);
        }
    }
}

/// Bytes counted against the byte limits for a state about to be written: dropped without
/// [`Growth::keep`] (the write failed), they are given back.
pub struct Growth<'a> {
    store: &'a SessionStore,
    function: FunctionName,
    old: u64,
    new: u64,
    kept: bool,
}

impl Growth<'_> {
    pub fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for Growth<'_> {
    fn drop(&mut self) {
        if !self.kept {
            self.store.lock_index().apply_resize(&self.function, self.new, self.old);
        }
    }
}

/// A new session id: a version 4 UUID (122 bits from the OS's CSPRNG), as 32 lowercase hex
/// digits. Knowing one id tells nothing about another.
pub fn new_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// How logs name a session: a session id is a bearer credential (whoever knows it may send
/// messages, export and delete), so logs carry the first 12 hex digits of its SHA-256
/// instead; enough to follow one session through the log, useless to reach it.
pub fn log_id(id: &str) -> String {
    let mut hash = crate::registry::sha256_hex(id.as_bytes());
    hash.truncate(12);
    hash
}

/// Whether `id` has the shape of a session id (so it can name a file).
pub fn valid_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl SessionStore {
    /// Opens (creating it) the store under `state_dir`, locks it, removes temporary files
    /// a crash left behind, and indexes every session found.
    pub fn open(state_dir: &Path, limits: SessionLimits) -> Result<Self, StoreError> {
        let dir_err = |source| StoreError::Dir { path: state_dir.to_path_buf(), source };
        fs::DirBuilder::new().recursive(true).mode(0o700).create(state_dir).map_err(dir_err)?;
        check_private_dir(state_dir)?;
        let lock_path = state_dir.join("lock");
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(dir_err)?;
        let lock = match nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(locked) => locked,
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                return Err(StoreError::Locked { path: state_dir.to_path_buf(), lock: lock_path });
            }
            Err((_, e)) => return Err(dir_err(e.into())),
        };
        let dir = state_dir.join("sessions");
        fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir).map_err(dir_err)?;
        let mut index = Index::default();
        for function_dir in fs::read_dir(&dir).map_err(dir_err)?.flatten() {
            let Some(function) = function_dir.file_name().to_str().and_then(|n| FunctionName::parse(n).ok()) else {
                continue;
            };
            let Ok(entries) = fs::read_dir(function_dir.path()) else { continue };
            for entry in entries.flatten() {
                let name = entry.file_name();
                let Some(name) = name.to_str() else { continue };
                if name.starts_with('.') && name.ends_with(".tmp") {
                    let _ = fs::remove_file(entry.path());
                    continue;
                }
                let Some(id) = name.strip_suffix(".snap").filter(|id| valid_id(id)) else { continue };
                let Ok(meta) = entry.metadata() else { continue };
                let modified = meta.modified().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok());
                let session = Session {
                    function: function.clone(),
                    id: id.to_owned(),
                    lock: Arc::new(tokio::sync::Mutex::new(())),
                    deleted: AtomicBool::new(false),
                    last_used_ms: AtomicU64::new(modified.map_or_else(now_ms, |d| d.as_millis() as u64)),
                    snapshot_bytes: AtomicU64::new(meta.len()),
                };
                // What is on disk counts as it is, even past limits lowered since: those
                // only stop it from growing.
                index.total.sessions += 1;
                index.total.bytes += meta.len();
                let usage = index.usage(&function);
                usage.sessions += 1;
                usage.bytes += meta.len();
                index.sessions.insert(id.to_owned(), Arc::new(session));
            }
        }
        Ok(SessionStore { dir, limits, index: Mutex::new(index), _lock: lock })
    }

    pub fn limits(&self) -> SessionLimits {
        self.limits
    }

    /// The quota of a function: its `name.toml`'s, else the server's default.
    pub fn quota(&self, config: &crate::registry::FunctionConfig) -> Quota {
        let default = self.limits.per_function;
        Quota {
            max_sessions: config.session_max_sessions.unwrap_or(default.max_sessions),
            max_bytes: config.session_max_stored_bytes.unwrap_or(default.max_bytes),
        }
    }

    /// Number of sessions held.
    pub fn count(&self) -> usize {
        self.lock_index().sessions.len()
    }

    fn lock_index(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Finds session `id` of `function`. A session idle past the expiry is reported as
    /// expired (and removed by the next sweep) even before the sweep ran.
    pub fn lookup(&self, function: &FunctionName, id: &str) -> Lookup {
        let index = self.lock_index();
        match index.sessions.get(id) {
            Some(s) if &s.function == function => {
                if self.limits.idle.is_some_and(|idle| s.idle_for(now_ms()) > idle) {
                    Lookup::Expired
                } else {
                    Lookup::Found(s.clone())
                }
            }
            Some(_) => Lookup::Missing,
            None if index.expired.contains(id) => Lookup::Expired,
            None => Lookup::Missing,
        }
    }

    /// The index entry of `id` when it is a session of `function` that expired but was not
    /// swept yet: an import of that id must replace it, not revive its stale entry.
    pub fn expired_entry(&self, function: &FunctionName, id: &str) -> Option<Arc<Session>> {
        let index = self.lock_index();
        let idle = self.limits.idle?;
        index.sessions.get(id).filter(|s| &s.function == function && s.idle_for(now_ms()) > idle).cloned()
    }

    /// Sessions and stored bytes of `function` (existing and reserved).
    pub fn usage(&self, function: &FunctionName) -> Usage {
        self.lock_index().per_function.get(function).copied().unwrap_or_default()
    }

    /// Sessions and stored bytes over all functions.
    pub fn total(&self) -> Usage {
        self.lock_index().total
    }

    /// Counts a new session of `function` against the server's and the function's limits,
    /// or says which is reached.
    pub fn reserve(&self, function: &FunctionName, quota: Quota) -> Result<Reservation<'_>, QuotaError> {
        self.lock_index().add_session(function, self.limits.max_sessions, quota)?;
        Ok(Reservation { store: self, function: function.clone(), used: false })
    }

    /// Counts a state of `new` bytes replacing one of `old` bytes (0 for a new session)
    /// against the byte limits, before it is written; growing past one is refused.
    pub fn grow(&self, function: &FunctionName, old: u64, new: u64, quota: Quota) -> Result<Growth<'_>, QuotaError> {
        self.lock_index().resize(function, old, new, self.limits.max_total_bytes, quota)?;
        Ok(Growth { store: self, function: function.clone(), old, new, kept: false })
    }

    /// Adds a session whose snapshot was just written; uses the reservation. When a
    /// concurrent import of the same id got there first, that entry stays (the file holds
    /// whichever import wrote last) and the reservation is given back.
    pub fn insert(
        &self,
        mut reservation: Reservation<'_>,
        function: &FunctionName,
        id: &str,
        bytes: u64,
    ) -> Arc<Session> {
        let mut index = self.lock_index();
        if let Some(existing) = index.sessions.get(id).filter(|s| !s.deleted.load(Ordering::Relaxed)).cloned() {
            // The bytes were counted for this insert's own state, which the file holds no
            // longer than the other import's.
            index.apply_resize(function, bytes, 0);
            drop(index);
            drop(reservation); // gives back its session: it locks the index
            return existing;
        }
        let session = Arc::new(Session {
            function: function.clone(),
            id: id.to_owned(),
            lock: Arc::new(tokio::sync::Mutex::new(())),
            deleted: AtomicBool::new(false),
            last_used_ms: AtomicU64::new(now_ms()),
            snapshot_bytes: AtomicU64::new(bytes),
        });
        reservation.used = true;
        index.expired.remove(id);
        index.sessions.insert(id.to_owned(), session.clone());
        session
    }

    /// Whether `id` names a session of a function other than `function`.
    pub fn exists_elsewhere(&self, function: &FunctionName, id: &str) -> bool {
        self.lock_index().sessions.get(id).is_some_and(|s| &s.function != function)
    }

    /// Path of the committed snapshot of `id`.
    pub fn path(&self, function: &FunctionName, id: &str) -> PathBuf {
        self.dir.join(function.as_str()).join(format!("{id}.snap"))
    }

    /// Reads the committed snapshot.
    pub async fn read(&self, session: &Session) -> io::Result<bytes::Bytes> {
        tokio::fs::read(self.path(&session.function, &session.id)).await.map(bytes::Bytes::from)
    }

    /// Replaces the snapshot of `id` atomically and durably (temp file, fsync, rename,
    /// fsync of the directory).
    pub async fn write(&self, function: &FunctionName, id: &str, bytes: bytes::Bytes) -> io::Result<()> {
        let path = self.path(function, id);
        let tmp = path.with_file_name(format!(".{id}.{}.tmp", uuid::Uuid::new_v4().simple()));
        tokio::task::spawn_blocking(move || {
            let dir = path.parent().unwrap_or(Path::new("."));
            fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
            let result = (|| {
                let mut file = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
                file.write_all(&bytes)?;
                file.sync_all()?;
                fs::rename(&tmp, &path)?;
                File::open(dir)?.sync_all()
            })();
            if result.is_err() {
                let _ = fs::remove_file(&tmp);
            }
            result
        })
        .await
        .map_err(io::Error::other)?
    }

    /// Deletes a session: the caller holds its lock.
    pub async fn remove(&self, session: &Session) -> io::Result<()> {
        session.deleted.store(true, Ordering::Relaxed);
        {
            let mut index = self.lock_index();
            if index.sessions.get(&session.id).is_some_and(|s| std::ptr::eq(&**s, session)) {
                index.sessions.remove(&session.id);
                index.remove_session(&session.function, session.snapshot_bytes.load(Ordering::Relaxed));
            }
        }
        match tokio::fs::remove_file(self.path(&session.function, &session.id)).await {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Deletes every session idle past the expiry; returns how many. A session busy with a
    /// message is not idle and is left alone.
    pub async fn sweep(&self) -> usize {
        let Some(idle) = self.limits.idle else { return 0 };
        let now = now_ms();
        let stale: Vec<Arc<Session>> =
            self.lock_index().sessions.values().filter(|s| s.idle_for(now) > idle).cloned().collect();
        let mut removed = 0;
        for session in stale {
            let Ok(_guard) = session.lock.try_lock() else { continue };
            if session.deleted.load(Ordering::Relaxed) || session.idle_for(now_ms()) <= idle {
                continue;
            }
            match self.remove(&session).await {
                Ok(()) => {
                    removed += 1;
                    self.lock_index().remember_expired(session.id.clone());
                    tracing::info!(function = %session.function, session = %log_id(&session.id), "session expired");
                }
                Err(e) => tracing::warn!(session = %log_id(&session.id), error = %e, "cannot delete expired session"),
            }
        }
        removed
    }

    /// Sweeps for expired sessions forever, at a fraction of the idle time.
    pub async fn sweep_forever(self: Arc<Self>) {
        let Some(idle) = self.limits.idle else { return };
        let every = (idle / 4).clamp(Duration::from_millis(100), Duration::from_secs(60));
        loop {
            tokio::time::sleep(every).await;
            self.sweep().await;
        }
    }
}

/// Refuses a state directory that is a symbolic link, not a directory, owned by another
/// user or writable by group or others (the same rule as the artifact cache's). A
/// predictable default such as `/tmp/wasmbox-state-<uid>` that another local user created
/// first is refused here rather than trusted.
fn check_private_dir(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::MetadataExt;
    let uid = nix::unistd::geteuid().as_raw();
    let meta = fs::symlink_metadata(path).map_err(|source| StoreError::Dir { path: path.to_path_buf(), source })?;
    let problem = if meta.file_type().is_symlink() {
        Some("a symbolic link".to_string())
    } else if !meta.is_dir() {
        Some("not a directory".to_string())
    } else if meta.uid() != uid {
        Some(format!("owned by uid {}", meta.uid()))
    } else if meta.mode() & 0o022 != 0 {
        Some(format!("writable by group or others (mode {:o})", meta.mode() & 0o7777))
    } else {
        None
    };
    match problem {
        Some(problem) => Err(StoreError::Untrusted { path: path.to_path_buf(), uid, problem }),
        None => Ok(()),
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn limits() -> SessionLimits {
        SessionLimits {
            max_sessions: 10,
            max_total_bytes: 1000,
            per_function: Quota { max_sessions: 3, max_bytes: 500 },
            max_snapshot_bytes: 1 << 20,
            idle: None,
        }
    }

    fn name(s: &str) -> FunctionName {
        FunctionName::parse(s).unwrap()
    }

    #[test]
    fn sessions_and_bytes_are_counted_per_function_and_in_total() {
        let tmp = tempfile::tempdir().unwrap();
        let store = SessionStore::open(&tmp.path().join("state"), limits()).unwrap();
        let quota = store.limits().per_function;
        let (a, b) = (name("a"), name("b"));
        // Three of a's sessions; the fourth passes its function's limit, not the server's.
        let held: Vec<_> = (0..3).map(|_| store.reserve(&a, quota).unwrap()).collect();
        assert_eq!(store.reserve(&a, quota).err(), Some(QuotaError::Sessions { scope: "function", max: 3 }));
        let roomy = Quota { max_sessions: 100, max_bytes: 10_000 };
        let more: Vec<_> = (0..7).map(|_| store.reserve(&b, roomy).unwrap()).collect();
        assert_eq!(store.reserve(&b, roomy).err(), Some(QuotaError::Sessions { scope: "server", max: 10 }));
        drop(more);
        drop(held);
        assert_eq!((store.usage(&a), store.total()), (Usage::default(), Usage::default()));

        // Bytes: growing past the function's quota or the server's total is refused, a
        // write that fails gives its bytes back, shrinking always works.
        store.grow(&a, 0, 400, quota).unwrap().keep();
        assert_eq!(store.grow(&a, 400, 501, quota).err(), Some(QuotaError::Bytes { scope: "function", limit: 500 }));
        let failed = store.grow(&a, 400, 500, quota).unwrap();
        drop(failed);
        assert_eq!(store.usage(&a).bytes, 400);
        store.grow(&b, 0, 600, roomy).unwrap().keep();
        assert_eq!(store.grow(&b, 600, 601, roomy).err(), Some(QuotaError::Bytes { scope: "server", limit: 1000 }));
        store.grow(&a, 400, 10, quota).unwrap().keep();
        assert_eq!((store.usage(&a).bytes, store.total().bytes), (10, 610));
    }

    fn refused(dir: &Path) -> String {
        match SessionStore::open(dir, limits()) {
            Err(e @ StoreError::Untrusted { .. }) => e.to_string(),
            Err(e) => panic!("{}: expected untrusted, got {e}", dir.display()),
            Ok(_) => panic!("{}: an untrusted state directory was accepted", dir.display()),
        }
    }

    #[test]
    fn state_directories_others_control_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let open = tmp.path().join("open");
        fs::create_dir(&open).unwrap();
        fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).unwrap();
        assert!(refused(&open).contains("writable by group or others"));

        let target = tmp.path().join("target");
        fs::create_dir(&target).unwrap();
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(refused(&link).contains("symbolic link"));

        let file = tmp.path().join("file");
        fs::write(&file, b"x").unwrap();
        assert!(matches!(
            SessionStore::open(&file, limits()),
            Err(StoreError::Dir { .. } | StoreError::Untrusted { .. })
        ));

        if nix::unistd::geteuid().is_root() {
            // As another local user would have made it first (a predictable /tmp default).
            let foreign = tmp.path().join("foreign");
            fs::create_dir(&foreign).unwrap();
            fs::set_permissions(&foreign, fs::Permissions::from_mode(0o700)).unwrap();
            std::os::unix::fs::chown(&foreign, Some(65534), Some(65534)).unwrap();
            assert!(refused(&foreign).contains("owned by uid 65534"));
        } else {
            eprintln!("SKIPPED the foreign-owner case: needs root to chown");
        }

        // A fresh directory is created private and accepted.
        let fresh = tmp.path().join("fresh").join("state");
        SessionStore::open(&fresh, limits()).unwrap();
        assert_eq!(fs::metadata(&fresh).unwrap().permissions().mode() & 0o777, 0o700);
    }
}
