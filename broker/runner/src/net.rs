//! The guest NIC's host side. The broker creates the tap in the host's
//! network namespace and hands the runner its fd (the jail has no network
//! of its own, so libkrun cannot open a tap by name). libkrun's virtio-net
//! takes frames over a datagram socket, so the runner gives it one end of a
//! socket pair and relays frames between the other end and the tap,
//! removing and adding the tap's virtio-net header (no offloads are
//! negotiated, so the header carries nothing).

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{recv, send, socketpair, AddressFamily, MsgFlags, SockFlag, SockType};

/// Largest frame plus header moved in one piece.
const FRAME_BUF: usize = 65_562;

nix::ioctl_read!(tun_get_vnet_hdr_sz, b'T', 215, libc::c_int);

/// The size of the virtio-net header the tap puts before every frame.
pub fn tap_header_len(tap: &OwnedFd) -> io::Result<usize> {
    let mut size: libc::c_int = 0;
    // SAFETY: TUNGETVNETHDRSZ writes one c_int through the pointer, which
    // points at a live local; the fd is owned and open.
    unsafe { tun_get_vnet_hdr_sz(tap.as_raw_fd(), &mut size) }.map_err(io::Error::from)?;
    usize::try_from(size)
        .ok()
        .filter(|s| (10..=64).contains(s))
        .ok_or_else(|| io::Error::other(format!("the tap's header size {size} is not 10-64")))
}

/// One relay between a tap (or anything that reads and writes whole frames
/// with a `header_len` prefix) and libkrun's datagram socket.
pub struct Relay {
    tap: OwnedFd,
    header_len: usize,
    ours: OwnedFd,
}

impl Relay {
    /// Makes the socket pair; returns the relay and libkrun's end.
    pub fn new(tap: OwnedFd, header_len: usize) -> io::Result<(Self, OwnedFd)> {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::Datagram,
            None,
            SockFlag::SOCK_CLOEXEC,
        )?;
        Ok((
            Self {
                tap,
                header_len,
                ours,
            },
            theirs,
        ))
    }

    /// Moves frames both ways until either side is gone. A frame that
    /// cannot be delivered at once is dropped, as a NIC would.
    pub fn run(self) {
        let mut buf = vec![0u8; FRAME_BUF];
        let h = self.header_len;
        loop {
            let (from_tap, from_guest) = {
                let mut fds = [
                    PollFd::new(self.tap.as_fd(), PollFlags::POLLIN),
                    PollFd::new(self.ours.as_fd(), PollFlags::POLLIN),
                ];
                match poll(&mut fds, PollTimeout::NONE) {
                    Ok(_) => {}
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(_) => return,
                }
                let flags = |f: &PollFd| f.revents().unwrap_or(PollFlags::empty());
                let (t, g) = (flags(&fds[0]), flags(&fds[1]));
                if (t | g).intersects(PollFlags::POLLERR | PollFlags::POLLNVAL) {
                    return;
                }
                (
                    t.intersects(PollFlags::POLLIN | PollFlags::POLLHUP),
                    g.intersects(PollFlags::POLLIN | PollFlags::POLLHUP),
                )
            };
            if from_tap {
                match nix::unistd::read(&self.tap, &mut buf) {
                    Ok(0) => return,
                    Ok(n) if n > h => {
                        let _ = send(self.ours.as_raw_fd(), &buf[h..n], MsgFlags::MSG_DONTWAIT);
                    }
                    Ok(_) => {}
                    Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => {}
                    Err(_) => return,
                }
            }
            if from_guest {
                match recv(self.ours.as_raw_fd(), &mut buf[h..], MsgFlags::MSG_DONTWAIT) {
                    Ok(0) => return,
                    Ok(n) => {
                        buf[..h].fill(0);
                        let _ = nix::unistd::write(&self.tap, &buf[..h + n]);
                    }
                    Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => {}
                    Err(_) => return,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_lose_the_tap_header_one_way_and_gain_a_zero_header_the_other() {
        // A datagram pair stands in for the tap: whole frames per read.
        let (tap_inner, tap_outer) = socketpair(
            AddressFamily::Unix,
            SockType::Datagram,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        let (relay, krun_end) = Relay::new(tap_inner, 10).unwrap();
        let t = std::thread::spawn(move || relay.run());
        // Host → guest: header stripped.
        let mut framed = vec![7u8; 10];
        framed.extend_from_slice(b"ethernet frame");
        send(tap_outer.as_raw_fd(), &framed, MsgFlags::empty()).unwrap();
        let mut buf = [0u8; 100];
        let n = recv(krun_end.as_raw_fd(), &mut buf, MsgFlags::empty()).unwrap();
        assert_eq!(&buf[..n], b"ethernet frame");
        // Guest → host: a zeroed header added.
        send(krun_end.as_raw_fd(), b"reply", MsgFlags::empty()).unwrap();
        let n = recv(tap_outer.as_raw_fd(), &mut buf, MsgFlags::empty()).unwrap();
        assert_eq!(&buf[..n], b"\0\0\0\0\0\0\0\0\0\0reply");
        // A runt shorter than the header is dropped, not forwarded: the
        // guest's next datagram is the frame after it.
        send(tap_outer.as_raw_fd(), &[1u8; 4], MsgFlags::empty()).unwrap();
        let mut framed = vec![0u8; 10];
        framed.extend_from_slice(b"after the runt");
        send(tap_outer.as_raw_fd(), &framed, MsgFlags::empty()).unwrap();
        let n = recv(krun_end.as_raw_fd(), &mut buf, MsgFlags::empty()).unwrap();
        assert_eq!(&buf[..n], b"after the runt");
        // The relay thread ends with the process.
        drop(t);
    }
}
