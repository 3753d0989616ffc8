//! Small file-descriptor helpers shared by [`crate::exec`], [`crate::repl`]
//! and [`crate::setup`]: pidfds, close-on-exec pipes, non-blocking mode, and
//! non-blocking reads that stop at "nothing more for now".

use std::io::{self, Read};
use std::os::fd::{AsFd, FromRawFd, OwnedFd};

use nix::fcntl::{fcntl, FcntlArg, OFlag};

/// Opens a pidfd for `pid` (readable once it exits), if the kernel has them.
pub fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    let pid = libc::pid_t::try_from(pid).ok()?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; it
    // touches no memory of ours.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let fd = i32::try_from(fd).ok().filter(|fd| *fd >= 0)?;
    // SAFETY: `fd` was just returned by pidfd_open, is open and owned by no
    // one else.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A pipe whose both ends are close-on-exec: `(read, write)`.
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(io::Error::from)
}

/// Puts `fd` in non-blocking mode (its open file description, that is: only
/// our end of a pipe).
pub fn set_nonblocking(fd: impl AsFd) -> io::Result<()> {
    let flags = fcntl(fd.as_fd(), FcntlArg::F_GETFL).map_err(io::Error::from)?;
    let flags = OFlag::from_bits_retain(flags) | OFlag::O_NONBLOCK;
    fcntl(fd.as_fd(), FcntlArg::F_SETFL(flags)).map_err(io::Error::from)?;
    Ok(())
}

/// What one non-blocking read found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadOutcome {
    /// This many bytes were read into the buffer.
    Data(usize),
    /// Nothing to read right now.
    Empty,
    /// End of stream, or an error that ends it.
    Closed,
}

/// Reads once from a non-blocking reader, retrying on `EINTR`.
pub fn read_nonblocking(reader: &mut impl Read, buf: &mut [u8]) -> ReadOutcome {
    loop {
        match reader.read(buf) {
            Ok(0) => return ReadOutcome::Closed,
            Ok(n) => return ReadOutcome::Data(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return ReadOutcome::Empty,
            Err(_) => return ReadOutcome::Closed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::io::Write;

    #[test]
    fn nonblocking_pipe_reports_empty_data_and_closed() {
        let (r, w) = pipe().expect("pipe");
        set_nonblocking(&r).expect("nonblocking");
        let mut r = File::from(r);
        let mut w = File::from(w);
        let mut buf = [0u8; 8];
        assert_eq!(read_nonblocking(&mut r, &mut buf), ReadOutcome::Empty);
        w.write_all(b"abc").expect("write");
        assert_eq!(read_nonblocking(&mut r, &mut buf), ReadOutcome::Data(3));
        drop(w);
        assert_eq!(read_nonblocking(&mut r, &mut buf), ReadOutcome::Closed);
    }
}
