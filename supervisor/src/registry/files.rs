//! Opening a function's files without being steered by what tenants can write: module and
//! config files only when they are regular files (a FIFO would block the opening thread
//! forever), preopened directories without following any symbolic link and only when they
//! are still the directory the config named when it was loaded.

use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path};

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::Mode;

/// What identifies a directory on the host, whatever its path: device and inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirId {
    pub dev: u64,
    pub ino: u64,
}

impl DirId {
    pub fn of(meta: &std::fs::Metadata) -> Self {
        DirId { dev: meta.dev(), ino: meta.ino() }
    }
}

/// Opens `path` for reading only if it is a regular file. The open itself does not block
/// (`O_NONBLOCK`: a FIFO opens at once instead of waiting for a writer) and the type is
/// checked on the open descriptor, so a file swapped for a FIFO or a device between a
/// `stat` and the open is refused, not waited on. Symbolic links are followed (Kubernetes
/// mounts config maps as links); what they lead to must be a regular file.
pub fn open_regular(path: &Path) -> io::Result<File> {
    let fd = nix::fcntl::open(path, OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC, Mode::empty())?;
    let file = File::from(fd);
    if !file.metadata()?.file_type().is_file() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{} is not a regular file", path.display())));
    }
    // Reads of a regular file never block anyway; clear the flag so nothing downstream
    // (the worker reads through this descriptor) sees an unusual file status.
    nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_SETFL(OFlag::O_RDONLY))?;
    Ok(file)
}

/// Why a preopened directory could not be opened for an invocation.
#[derive(Debug, thiserror::Error)]
pub enum PreopenError {
    /// A component of the path is now a symbolic link, or the directory is another one
    /// than when the config was loaded: something renamed or replaced it.
    #[error("preopen {path} is no longer the directory its config named ({why})")]
    Changed { path: String, why: &'static str },
    #[error("cannot open preopen {path}")]
    Open {
        path: String,
        #[source]
        source: io::Error,
    },
}

/// Opens the preopened directory at the canonical (symlink-free) absolute `path` as a path
/// handle, refusing any symbolic link in any component (`openat2` with
/// `RESOLVE_NO_SYMLINKS`, or one component at a time with `O_NOFOLLOW` where the kernel
/// has no `openat2`), then checks it is the directory `expected` identifies.
pub fn open_preopen(path: &Path, expected: DirId) -> Result<OwnedFd, PreopenError> {
    let shown = || path.display().to_string();
    let flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
    let how =
        OpenHow::new().flags(flags).resolve(ResolveFlag::RESOLVE_NO_SYMLINKS | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let opened = match nix::fcntl::openat2(nix::fcntl::AT_FDCWD, path, how) {
        Err(Errno::ENOSYS) => open_without_links(path),
        other => other,
    };
    let dir = match opened {
        Ok(dir) => dir,
        Err(Errno::ELOOP) => {
            return Err(PreopenError::Changed { path: shown(), why: "a symbolic link is in its path" });
        }
        // O_DIRECTORY on something that is no longer a directory.
        Err(Errno::ENOTDIR) => {
            return Err(PreopenError::Changed { path: shown(), why: "a component is not a directory" });
        }
        Err(Errno::ENOENT) => return Err(PreopenError::Changed { path: shown(), why: "it no longer exists" }),
        Err(e) => return Err(PreopenError::Open { path: shown(), source: e.into() }),
    };
    let stat = nix::sys::stat::fstat(&dir).map_err(|e| PreopenError::Open { path: shown(), source: e.into() })?;
    if (DirId { dev: stat.st_dev, ino: stat.st_ino }) != expected {
        return Err(PreopenError::Changed { path: shown(), why: "it was replaced by another directory" });
    }
    Ok(dir)
}

/// `RESOLVE_NO_SYMLINKS` by hand: from `/`, each component opened relative to the one
/// before with `O_NOFOLLOW` (a link fails with `ELOOP`, or `ENOTDIR` for `O_PATH`).
fn open_without_links(path: &Path) -> nix::Result<OwnedFd> {
    let flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let mut dir = nix::fcntl::open("/", flags, Mode::empty())?;
    for component in path.components() {
        match component {
            Component::RootDir => {}
            Component::Normal(name) => dir = nix::fcntl::openat(&dir, name, flags, Mode::empty())?,
            // A canonical path has neither; refuse rather than interpret one.
            _ => return Err(Errno::EINVAL),
        }
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(path: &Path) -> DirId {
        DirId::of(&std::fs::metadata(path).unwrap())
    }

    #[test]
    fn only_regular_files_open_and_a_fifo_does_not_block() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("f.toml");
        std::fs::write(&file, b"x = 1").unwrap();
        assert!(open_regular(&file).is_ok());
        let fifo = tmp.path().join("fifo.toml");
        nix::unistd::mkfifo(&fifo, Mode::from_bits_truncate(0o600)).unwrap();
        // Without O_NONBLOCK this open would wait for a writer forever.
        let err = open_regular(&fifo).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{err}");
        assert_eq!(open_regular(tmp.path()).unwrap_err().kind(), io::ErrorKind::InvalidInput);
        // A link to a regular file is fine (config maps are mounted that way).
        let link = tmp.path().join("link.toml");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert!(open_regular(&link).is_ok());
    }

    #[test]
    fn a_preopen_swapped_for_a_link_or_another_directory_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().canonicalize().unwrap();
        let data = root.join("data");
        std::fs::create_dir(&data).unwrap();
        let expected = id(&data);
        assert!(open_preopen(&data, expected).is_ok());
        assert!(open_without_links(&data).is_ok());

        // Renamed away and replaced by a link to /: never followed.
        std::fs::rename(&data, root.join("moved")).unwrap();
        std::os::unix::fs::symlink("/", &data).unwrap();
        assert!(matches!(open_preopen(&data, expected), Err(PreopenError::Changed { .. })));
        assert!(matches!(open_without_links(&data), Err(Errno::ELOOP | Errno::ENOTDIR)));

        // Replaced by a fresh directory of the same name: another inode.
        std::fs::remove_file(&data).unwrap();
        std::fs::create_dir(&data).unwrap();
        assert!(matches!(open_preopen(&data, expected), Err(PreopenError::Changed { .. })));

        // A link higher up the path counts as much as the last component.
        let real = root.join("real");
        std::fs::create_dir_all(real.join("inner")).unwrap();
        std::os::unix::fs::symlink(&real, root.join("via")).unwrap();
        let inner = id(&real.join("inner"));
        assert!(open_preopen(&real.join("inner"), inner).is_ok());
        assert!(matches!(open_preopen(&root.join("via/inner"), inner), Err(PreopenError::Changed { .. })));
        assert!(open_without_links(&root.join("via/inner")).is_err());

        let gone = root.join("gone");
        assert!(matches!(open_preopen(&gone, expected), Err(PreopenError::Changed { .. })));
    }
}
