//! The filesystem operations, all relative to an fd of the root: parent
//! directories are opened with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS
//! | RESOLVE_NO_MAGICLINKS)`, and the last component is touched only with
//! `*at` calls that do not follow it (`O_NOFOLLOW`, `AT_SYMLINK_NOFOLLOW`, no
//! `AT_SYMLINK_FOLLOW`); contents, owner, mode, xattrs and times are set
//! through the fd of what was just created. Recursive removal walks with fds
//! (`dirents.rs`), never with path strings.
//!
//! Two rules hold for every change made inside a directory (`modify`):
//! - the directory's access and modification times are put back afterwards,
//!   so a directory keeps the mtime its own entry gave it whatever order the
//!   archive lists things in;
//! - when the process is not root (unit tests), a directory that denies its
//!   owner write or search permission (a read-only `0555` directory from the
//!   image) is opened up for that one operation and restored. Root has
//!   `CAP_DAC_OVERRIDE` and never needs this.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::{openat, openat2, AtFlags, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{
    fchmod, fstat, fstatat, futimens, mkdirat, mknodat, utimensat, FileStat, Mode, SFlag,
    UtimensatFlags,
};
use nix::sys::time::TimeSpec;
use nix::unistd::{fchown, fchownat, linkat, symlinkat, unlinkat, Gid, Uid, UnlinkatFlags};

use super::dirents;
use super::error::{shown, Fault};
use super::member::Meta;
use super::path::joined;
use super::xattrs;

/// Mode of directories made because an entry needed them as parents.
const IMPLICIT_DIR_MODE: u32 = 0o755;
/// How often an `openat2` racing a rename (`EAGAIN`) is retried.
const RETRIES: usize = 8;
/// Size of the buffer file contents are copied through.
const COPY_BUFFER: usize = 128 * 1024;

/// An open directory in the tree, with its inode number.
#[derive(Debug)]
pub(super) struct Dir {
    fd: OwnedFd,
    pub(super) ino: u64,
}

impl Dir {
    fn new(fd: OwnedFd) -> Result<Dir, Fault> {
        let st = fstat(&fd).map_err(|e| Fault::host("inspecting a directory", e))?;
        Ok(Dir { fd, ino: st.st_ino })
    }
}

/// Whether `st` describes a directory / a regular file.
pub(super) fn is_dir(st: &FileStat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFDIR
}
pub(super) fn is_file(st: &FileStat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFREG
}

/// The kind of file `st` describes, for messages.
pub(super) fn kind_of(st: &FileStat) -> &'static str {
    match st.st_mode & libc::S_IFMT {
        libc::S_IFDIR => "a directory",
        libc::S_IFREG => "a regular file",
        libc::S_IFLNK => "a symbolic link",
        libc::S_IFIFO => "a FIFO",
        _ => "a special file",
    }
}

fn how() -> OpenHow {
    OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
        .resolve(
            ResolveFlag::RESOLVE_BENEATH
                | ResolveFlag::RESOLVE_NO_SYMLINKS
                | ResolveFlag::RESOLVE_NO_MAGICLINKS,
        )
}

/// `openat2` beneath `dir`, following nothing, retrying a racing rename.
fn open_beneath(dir: BorrowedFd<'_>, path: &[u8]) -> nix::Result<OwnedFd> {
    let mut attempt = 0;
    loop {
        match openat2(dir, path, how()) {
            Err(Errno::EAGAIN) if attempt < RETRIES => attempt += 1,
            other => return other,
        }
    }
}

/// The unpack root and what may be done in it.
#[derive(Debug)]
pub(super) struct Fs {
    root: OwnedFd,
    /// Running as root: owners are set, permissions never get in the way.
    privileged: bool,
}

impl Fs {
    pub(super) fn new(root: OwnedFd, privileged: bool) -> Fs {
        Fs { root, privileged }
    }

    fn root(&self) -> BorrowedFd<'_> {
        self.root.as_fd()
    }

    /// Runs `op`, a change inside `dir`; see the module docs for the two
    /// rules. The outer error is a host failure around `op`; the inner one is
    /// `op`'s own, for the caller to interpret.
    fn modify<T>(
        &self,
        dir: &Dir,
        mut op: impl FnMut() -> nix::Result<T>,
    ) -> Result<nix::Result<T>, Fault> {
        let st = fstat(&dir.fd).map_err(|e| Fault::host("inspecting a directory", e))?;
        let result = match op() {
            Err(Errno::EACCES) if !self.privileged => {
                let mode = Mode::from_bits_truncate(st.st_mode & 0o7777);
                fchmod(&dir.fd, mode | Mode::S_IRWXU)
                    .map_err(|e| Fault::host("opening up a read-only directory", e))?;
                let result = op();
                fchmod(&dir.fd, mode)
                    .map_err(|e| Fault::host("restoring a directory's mode", e))?;
                result
            }
            result => result,
        };
        let atime = TimeSpec::new(st.st_atime, st.st_atime_nsec);
        let mtime = TimeSpec::new(st.st_mtime, st.st_mtime_nsec);
        futimens(&dir.fd, &atime, &mtime)
            .map_err(|e| Fault::host("restoring a directory's times", e))?;
        Ok(result)
    }

    /// Opens the directory at `components` beneath the root. Missing
    /// directories are made (mode 0755, owned by this process) when `create`,
    /// else the answer is `None`. A component that is a symbolic link (even
    /// one pointing inside the root) or not a directory is refused.
    pub(super) fn open_dir(
        &self,
        components: &[&[u8]],
        create: bool,
    ) -> Result<Option<Dir>, Fault> {
        let path = if components.is_empty() {
            b".".to_vec()
        } else {
            joined(components)
        };
        match open_beneath(self.root(), &path) {
            Ok(fd) => return Dir::new(fd).map(Some),
            Err(Errno::ENOENT | Errno::ELOOP | Errno::ENOTDIR | Errno::EXDEV) => {}
            Err(e @ (Errno::ENOSYS | Errno::E2BIG)) => {
                return Err(Fault::host(
                    "resolving a path with openat2 (Linux 5.6 or later is needed)",
                    e,
                ))
            }
            Err(e) => {
                return Err(Fault::host(
                    format!("opening directory {}", shown(&path)),
                    e,
                ))
            }
        }
        // One component at a time: to make what is missing, or to say which
        // component is in the way.
        let mut dir = Dir::new(self.root.try_clone().map_err(|e| Fault::Host {
            op: "duplicating the root fd".into(),
            source: e,
        })?)?;
        for (i, name) in components.iter().enumerate() {
            let here = || shown(&joined(&components[..=i]));
            let fd = match open_beneath(dir.fd.as_fd(), name) {
                Ok(fd) => fd,
                Err(Errno::ENOENT) if !create => return Ok(None),
                Err(Errno::ENOENT) => self.make_implicit_dir(&dir, name)?,
                Err(Errno::ELOOP) => {
                    return Err(Fault::Image(format!(
                        "its parent {} is a symbolic link; moat never resolves a symbolic link as a parent directory, even one pointing inside the image (the strict rule)",
                        here()
                    )))
                }
                Err(Errno::ENOTDIR) => {
                    return Err(Fault::Image(format!(
                        "its parent {} is not a directory",
                        here()
                    )))
                }
                Err(e) => return Err(Fault::host(format!("opening directory {}", here()), e)),
            };
            dir = Dir::new(fd)?;
        }
        Ok(Some(dir))
    }

    fn make_implicit_dir(&self, parent: &Dir, name: &[u8]) -> Result<OwnedFd, Fault> {
        let mode = Mode::from_bits_truncate(IMPLICIT_DIR_MODE);
        match self.modify(parent, || mkdirat(&parent.fd, name, mode))? {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(Fault::host("making a parent directory", e)),
        }
        let fd = open_beneath(parent.fd.as_fd(), name)
            .map_err(|e| Fault::host("opening a parent directory just made", e))?;
        fchmod(&fd, mode).map_err(|e| Fault::host("setting a parent directory's mode", e))?;
        Ok(fd)
    }

    /// What `name` in `dir` is, without following it; `None` if absent.
    pub(super) fn lstat(&self, dir: &Dir, name: &[u8]) -> Result<Option<FileStat>, Fault> {
        match fstatat(&dir.fd, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(st)),
            Err(Errno::ENOENT) => Ok(None),
            Err(e) => Err(Fault::host("inspecting an existing entry", e)),
        }
    }

    /// Opens `name` in `dir`, which must be a directory (not a symlink).
    pub(super) fn open_child(&self, dir: &Dir, name: &[u8]) -> Result<Dir, Fault> {
        let fd = openat(
            &dir.fd,
            name,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| Fault::host("opening a directory", e))?;
        Dir::new(fd)
    }

    /// The names in `dir`.
    pub(super) fn names(&self, dir: &Dir) -> Result<Vec<Vec<u8>>, Fault> {
        dirents::names(dir.fd.as_fd()).map_err(|e| Fault::host("listing a directory", e))
    }

    /// Removes `name` from `dir` whatever it is (a directory with everything
    /// in it); nothing to do if it is absent.
    pub(super) fn remove(&self, dir: &Dir, name: &[u8]) -> Result<(), Fault> {
        match self.modify(dir, || unlinkat(&dir.fd, name, UnlinkatFlags::NoRemoveDir))? {
            Ok(()) | Err(Errno::ENOENT) => return Ok(()),
            Err(Errno::EISDIR) => {}
            Err(e) => return Err(Fault::host("removing an entry", e)),
        }
        let child = self.open_child(dir, name)?;
        for grandchild in self.names(&child)? {
            self.remove(&child, &grandchild)?;
        }
        drop(child);
        match self.modify(dir, || unlinkat(&dir.fd, name, UnlinkatFlags::RemoveDir))? {
            Ok(()) | Err(Errno::ENOENT) => Ok(()),
            Err(e) => Err(Fault::host("removing a directory", e)),
        }
    }

    /// Creates regular file `name` in `dir` (mode 0600 until `set_meta`)
    /// with `size` bytes from `data`.
    pub(super) fn create_file(
        &self,
        dir: &Dir,
        name: &[u8],
        data: &mut dyn Read,
        size: u64,
    ) -> Result<OwnedFd, Fault> {
        let flags =
            OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let fd = self
            .modify(dir, || {
                openat(&dir.fd, name, flags, Mode::S_IRUSR | Mode::S_IWUSR)
            })?
            .map_err(|e| Fault::host("creating a file", e))?;
        let mut file = File::from(fd);
        let mut buf = vec![
            0u8;
            COPY_BUFFER
                .min(usize::try_from(size).unwrap_or(COPY_BUFFER))
                .max(1)
        ];
        let mut written = 0u64;
        loop {
            let n = data.read(&mut buf).map_err(Fault::Read)?;
            if n == 0 {
                break;
            }
            file.write_all(&buf[..n]).map_err(|source| Fault::Host {
                op: "writing a file".into(),
                source,
            })?;
            written += n as u64;
        }
        if written != size {
            return Err(Fault::Image(format!(
                "the archive ends inside this file's data ({written} of {size} bytes)"
            )));
        }
        Ok(OwnedFd::from(file))
    }

    /// Makes directory `name` in `dir` (mode 0700 until `set_meta`).
    pub(super) fn make_dir(&self, dir: &Dir, name: &[u8]) -> Result<Dir, Fault> {
        self.modify(dir, || mkdirat(&dir.fd, name, Mode::S_IRWXU))?
            .map_err(|e| Fault::host("making a directory", e))?;
        self.open_child(dir, name)
    }

    /// Makes symbolic link `name` in `dir` pointing at `target`, verbatim.
    pub(super) fn make_symlink(&self, dir: &Dir, name: &[u8], target: &[u8]) -> Result<(), Fault> {
        self.modify(dir, || symlinkat(target, &dir.fd, name))?
            .map_err(|e| Fault::host("making a symbolic link", e))
    }

    /// Makes FIFO `name` in `dir` (mode 0600 until `set_meta`) and opens it
    /// (non-blocking, so no writer is waited for).
    pub(super) fn make_fifo(&self, dir: &Dir, name: &[u8]) -> Result<OwnedFd, Fault> {
        let mode = Mode::S_IRUSR | Mode::S_IWUSR;
        self.modify(dir, || mknodat(&dir.fd, name, SFlag::S_IFIFO, mode, 0))?
            .map_err(|e| Fault::host("making a FIFO", e))?;
        openat(
            &dir.fd,
            name,
            OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| Fault::host("opening a FIFO just made", e))
    }

    /// Makes `name` in `dir` a hard link to `target_name` in `target_dir`
    /// (which the caller checked is a regular file). `Ok(false)`: the
    /// target is gone.
    pub(super) fn hard_link(
        &self,
        target_dir: &Dir,
        target_name: &[u8],
        dir: &Dir,
        name: &[u8],
    ) -> Result<bool, Fault> {
        match self.modify(dir, || {
            linkat(&target_dir.fd, target_name, &dir.fd, name, AtFlags::empty())
        })? {
            Ok(()) => Ok(true),
            Err(Errno::ENOENT) => Ok(false),
            Err(e) => Err(Fault::host("making a hard link", e)),
        }
    }

    /// Sets owner (when root), mode, xattrs and times on `fd`, in that order:
    /// `fchown` clears setuid bits and file capabilities, so it comes first.
    pub(super) fn set_meta(&self, fd: BorrowedFd<'_>, meta: &Meta) -> Result<(), Fault> {
        if self.privileged {
            fchown(
                fd,
                Some(Uid::from_raw(meta.uid)),
                Some(Gid::from_raw(meta.gid)),
            )
            .map_err(|e| Fault::host("setting the owner", e))?;
        }
        fchmod(fd, Mode::from_bits_truncate(meta.mode))
            .map_err(|e| Fault::host("setting the mode", e))?;
        xattrs::apply(fd, &meta.xattrs)?;
        futimens(fd, &meta.mtime, &meta.mtime).map_err(|e| Fault::host("setting the times", e))
    }

    /// Sets owner (when root) and times on symbolic link `name` in `dir`,
    /// without following it. Symbolic links have no mode of their own, and
    /// their xattrs are skipped (Linux refuses `user.*` on them).
    pub(super) fn set_symlink_meta(
        &self,
        dir: &Dir,
        name: &[u8],
        meta: &Meta,
    ) -> Result<(), Fault> {
        if self.privileged {
            fchownat(
                &dir.fd,
                name,
                Some(Uid::from_raw(meta.uid)),
                Some(Gid::from_raw(meta.gid)),
                AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .map_err(|e| Fault::host("setting a symbolic link's owner", e))?;
        }
        if !meta.xattrs.is_empty() {
            tracing::debug!(
                count = meta.xattrs.len(),
                "skipping xattrs on a symbolic link"
            );
        }
        utimensat(
            &dir.fd,
            name,
            &meta.mtime,
            &meta.mtime,
            UtimensatFlags::NoFollowSymlink,
        )
        .map_err(|e| Fault::host("setting a symbolic link's times", e))
    }
}

impl AsFd for Dir {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
