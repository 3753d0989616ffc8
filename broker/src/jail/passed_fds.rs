//! Puts the fds a VM process is given at 3, 4, ... in the forked child,
//! between fork and exec (async-signal-safe: raw `fcntl`/`dup2` on numbers
//! captured before the fork, no allocation).

use std::os::fd::{AsRawFd, OwnedFd, RawFd};

/// Most fds passed to one VM process (a tap and the volumes).
const MAX_PASSED: usize = 64;

/// The parent's fd numbers, in the order they go to 3, 4, ...
#[derive(Debug, Clone, Copy)]
pub struct Placement {
    sources: [RawFd; MAX_PASSED],
    count: usize,
}

impl Placement {
    /// Captures `fds`' numbers; they must stay open until the child is
    /// spawned. More than [`MAX_PASSED`] are cut (the spec check refuses
    /// that many volumes long before).
    pub fn new(fds: &[OwnedFd]) -> Self {
        let mut sources = [-1; MAX_PASSED];
        for (slot, fd) in sources.iter_mut().zip(fds) {
            *slot = fd.as_raw_fd();
        }
        Self {
            sources,
            count: fds.len().min(MAX_PASSED),
        }
    }

    /// In the child: copies every source above the targets first (so no
    /// `dup2` overwrites a source not yet moved), then onto 3, 4, ...;
    /// `dup2` leaves the targets open across exec.
    pub fn place(&self) -> std::io::Result<()> {
        let mut high = [-1; MAX_PASSED];
        let min = 3 + self.count as libc::c_int;
        for (copy, source) in high.iter_mut().zip(&self.sources).take(self.count) {
            // SAFETY: fcntl on an fd number open in this (forked) process.
            let fd = unsafe { libc::fcntl(*source, libc::F_DUPFD_CLOEXEC, min) };
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            *copy = fd;
        }
        for (i, fd) in high.iter().take(self.count).enumerate() {
            // SAFETY: dup2 between fd numbers of this process.
            if unsafe { libc::dup2(*fd, 3 + i as libc::c_int) } < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }
}
