//! Lists a directory by fd with `getdents64`, the only way the unpacker reads
//! directories, so no walk ever goes through a path string. (nix's `dir`
//! module is not among the workspace's nix features.)

use std::os::fd::{AsRawFd, BorrowedFd};

use nix::errno::Errno;
use nix::unistd::{lseek, Whence};

/// Bytes asked of the kernel per `getdents64` call.
const BUFFER: usize = 32 * 1024;
/// Offset of `d_reclen` and of `d_name` in a `struct linux_dirent64`.
const RECLEN_AT: usize = 16;
const NAME_AT: usize = 19;

/// The names in directory `dir` (without `.` and `..`), read from its start.
pub(super) fn names(dir: BorrowedFd<'_>) -> nix::Result<Vec<Vec<u8>>> {
    lseek(dir, 0, Whence::SeekSet)?;
    let mut buf = vec![0u8; BUFFER];
    let mut names = Vec::new();
    loop {
        // SAFETY: `dir` is an open fd for the whole call, and `buf` is a live,
        // writable allocation of exactly `buf.len()` bytes that the kernel
        // fills with at most that many bytes.
        let got = unsafe {
            libc::syscall(
                libc::SYS_getdents64,
                dir.as_raw_fd(),
                buf.as_mut_ptr().cast::<libc::c_void>(),
                buf.len(),
            )
        };
        let got = usize::try_from(Errno::result(got)?).map_err(|_| Errno::EIO)?;
        if got == 0 {
            return Ok(names);
        }
        let mut records = buf.get(..got).ok_or(Errno::EIO)?;
        while !records.is_empty() {
            let reclen = records
                .get(RECLEN_AT..RECLEN_AT + 2)
                .map(|b| usize::from(u16::from_ne_bytes([b[0], b[1]])))
                .ok_or(Errno::EIO)?;
            let record = records.get(..reclen).ok_or(Errno::EIO)?;
            let name = record.get(NAME_AT..).ok_or(Errno::EIO)?;
            let name = &name[..name.iter().position(|b| *b == 0).unwrap_or(name.len())];
            if name != b"." && name != b".." {
                names.push(name.to_vec());
            }
            records = &records[reclen..];
        }
    }
}
