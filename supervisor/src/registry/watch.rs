//! Change notification for the functions directory, so a lookup need not `stat` a
//! function's files on every request.
//!
//! One inotify watch on the directory. A lookup first reads what the kernel queued (one
//! non-blocking `read`, which fails with `EAGAIN` when nothing changed): the kernel queues
//! an event before the call that changed a file returns, so a change made before a
//! request arrived is always seen by it. An entry is trusted without a `stat` only where
//! the watch is sure to see its changes: a regular file named in the directory itself (not
//! a symbolic link, no second hard link, on the directory's own filesystem), in a
//! directory on a local filesystem. Anything the watch cannot attribute (an event on
//! another name, a queue overflow, the directory itself moved or deleted) makes every
//! entry untrusted, and each is checked with a `stat` on its next lookup as before.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::path::Path;

use nix::errno::Errno;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

use super::FunctionName;

/// What one drain of the queue found.
#[derive(Debug, Default, PartialEq, Eq)]
pub enum Changed {
    #[default]
    Nothing,
    /// These functions' files changed.
    Some(HashSet<FunctionName>),
    /// Anything may have changed.
    All,
}

impl Changed {
    fn add(&mut self, name: FunctionName) {
        match self {
            Changed::Nothing => *self = Changed::Some(HashSet::from([name])),
            Changed::Some(names) if names.len() < MAX_NAMED => {
                names.insert(name);
            }
            Changed::Some(_) => *self = Changed::All,
            Changed::All => {}
        }
    }
}

/// Names collected in one drain before it counts as "everything changed".
const MAX_NAMED: usize = 256;
/// Reads of the queue in one drain (4 KiB each): a directory changing faster than
/// lookups drain it makes every entry untrusted instead of holding a request up.
const MAX_READS: usize = 16;

/// The inotify watch on a functions directory.
#[derive(Debug)]
pub struct Watch {
    inotify: Inotify,
    /// The directory's filesystem: files elsewhere (a bind mount) are not trusted.
    dev: u64,
    /// Set once the directory itself went away: from then on nothing is trusted.
    lost: bool,
}

/// Filesystems whose files can change without this kernel knowing (changes made by another
/// host), by `statfs` magic number: NFS, SMB/CIFS, FUSE, 9p, Ceph, AFS, Lustre, GPFS.
const REMOTE_FILESYSTEMS: [i64; 10] = [
    0x6969,
    0x517b,
    0xff53_4d42,
    0xfe53_4d42,
    0x6573_5546,
    0x0102_1997,
    0x00c3_6400,
    0x5346_414f,
    0x0bd0_0bd0,
    0x4750_4653,
];

impl Watch {
    /// Watches `dir`; `Err` says why its entries must be checked with a `stat` instead.
    pub fn new(dir: &Path) -> Result<Watch, String> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(dir).map_err(|e| format!("cannot stat it: {e}"))?;
        let fs = nix::sys::statfs::statfs(dir).map_err(|e| format!("cannot statfs it: {e}"))?;
        #[allow(clippy::unnecessary_cast, clippy::useless_conversion)]
        let magic = fs.filesystem_type().0 as i64;
        if REMOTE_FILESYSTEMS.contains(&magic) {
            return Err(format!("it is on a network or user-space filesystem (type {magic:#x})"));
        }
        let inotify =
            Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).map_err(|e| format!("inotify_init1: {e}"))?;
        let flags = AddWatchFlags::IN_CREATE
            | AddWatchFlags::IN_DELETE
            | AddWatchFlags::IN_MODIFY
            | AddWatchFlags::IN_ATTRIB
            | AddWatchFlags::IN_CLOSE_WRITE
            | AddWatchFlags::IN_MOVED_FROM
            | AddWatchFlags::IN_MOVED_TO
            | AddWatchFlags::IN_DELETE_SELF
            | AddWatchFlags::IN_MOVE_SELF
            | AddWatchFlags::IN_ONLYDIR;
        inotify.add_watch(dir, flags).map_err(|e| format!("inotify_add_watch: {e}"))?;
        Ok(Watch { inotify, dev: meta.dev(), lost: false })
    }

    /// Whether changes to the file `meta` (from `symlink_metadata` of a path in the
    /// directory) always reach this watch.
    pub fn covers(&self, meta: &std::fs::Metadata) -> bool {
        use std::os::unix::fs::MetadataExt;
        !self.lost && meta.file_type().is_file() && meta.nlink() == 1 && meta.dev() == self.dev
    }

    /// Whether the watch still works (the directory was not moved or deleted).
    pub fn active(&self) -> bool {
        !self.lost
    }

    /// Reads what the kernel queued since the last call.
    pub fn drain(&mut self) -> Changed {
        if self.lost {
            return Changed::All;
        }
        let mut changed = Changed::Nothing;
        for _ in 0..MAX_READS {
            let events = match self.inotify.read_events() {
                Ok(events) => events,
                Err(Errno::EAGAIN) => return changed,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "reading the functions directory's change queue failed; checking files on every lookup");
                    self.lost = true;
                    return Changed::All;
                }
            };
            for event in events {
                let gone = AddWatchFlags::IN_DELETE_SELF | AddWatchFlags::IN_MOVE_SELF | AddWatchFlags::IN_IGNORED;
                if event.mask.intersects(gone) {
                    tracing::warn!("the functions directory was moved or deleted; checking files on every lookup");
                    self.lost = true;
                    return Changed::All;
                }
                match event.name.as_deref().and_then(function_of) {
                    Some(name) if !event.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) => changed.add(name),
                    _ => changed = Changed::All,
                }
            }
        }
        // Still more queued: the directory is busier than lookups; trust nothing for now.
        Changed::All
    }
}

/// The function a file of the directory belongs to: `name.wasm` or `name.toml`.
fn function_of(file: &OsStr) -> Option<FunctionName> {
    let file = file.to_str()?;
    let stem = file.strip_suffix(".wasm").or_else(|| file.strip_suffix(".toml"))?;
    FunctionName::parse(stem).ok()
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;

    fn name(s: &str) -> FunctionName {
        FunctionName::parse(s).unwrap()
    }

    #[test]
    fn changes_are_seen_before_the_call_that_made_them_returns() {
        let dir = tempfile::tempdir().unwrap();
        let mut watch = Watch::new(dir.path()).unwrap();
        assert_eq!(watch.drain(), Changed::Nothing);
        std::fs::write(dir.path().join("f.wasm"), b"x").unwrap();
        assert_eq!(watch.drain(), Changed::Some(HashSet::from([name("f")])), "no wait: queued by the write itself");
        assert_eq!(watch.drain(), Changed::Nothing);
        std::fs::write(dir.path().join("g.toml"), b"").unwrap();
        std::fs::rename(dir.path().join("g.toml"), dir.path().join("h.toml")).unwrap();
        assert_eq!(watch.drain(), Changed::Some(HashSet::from([name("g"), name("h")])));
        // A name that is no function's file (a temporary, a Kubernetes `..data` swap).
        std::fs::write(dir.path().join("..data_tmp"), b"").unwrap();
        assert_eq!(watch.drain(), Changed::All);
        // The flag is on the descriptor: a worker never inherits it.
        let flags = nix::fcntl::fcntl(watch.inotify.as_fd(), nix::fcntl::FcntlArg::F_GETFD).unwrap();
        assert_ne!(flags & nix::libc::FD_CLOEXEC, 0);
    }

    #[test]
    fn a_busy_directory_and_a_lost_one_trust_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut watch = Watch::new(dir.path()).unwrap();
        for i in 0..(MAX_NAMED + 1) {
            std::fs::write(dir.path().join(format!("f{i}.wasm")), b"x").unwrap();
        }
        assert_eq!(watch.drain(), Changed::All);
        let inner = dir.path().join("functions");
        std::fs::create_dir(&inner).unwrap();
        let mut watch = Watch::new(&inner).unwrap();
        std::fs::rename(&inner, dir.path().join("elsewhere")).unwrap();
        assert_eq!(watch.drain(), Changed::All);
        assert!(!watch.active());
        assert_eq!(watch.drain(), Changed::All, "and stays so");
    }

    #[test]
    fn only_plain_files_of_the_directory_are_covered() {
        let dir = tempfile::tempdir().unwrap();
        let watch = Watch::new(dir.path()).unwrap();
        let file = dir.path().join("f.wasm");
        std::fs::write(&file, b"x").unwrap();
        assert!(watch.covers(&std::fs::symlink_metadata(&file).unwrap()));
        std::os::unix::fs::symlink(&file, dir.path().join("l.wasm")).unwrap();
        assert!(!watch.covers(&std::fs::symlink_metadata(dir.path().join("l.wasm")).unwrap()), "a link");
        std::fs::hard_link(&file, dir.path().join("h.wasm")).unwrap();
        assert!(!watch.covers(&std::fs::symlink_metadata(&file).unwrap()), "a second name elsewhere");
    }
}
