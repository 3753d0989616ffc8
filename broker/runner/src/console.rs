//! The guest's serial console, served on a Unix socket the way the QEMU
//! backend serves it: the runner waits for the broker's first connection
//! before the guest runs (no boot output is lost), then forwards what the
//! guest prints to whoever is connected, dropping output while nobody is (a
//! broker restart never blocks the guest). A later connection replaces the
//! earlier one (a restarted broker re-attaching).
//!
//! The panic watch reads raw console bytes, so guest root writing the
//! panic line to `/dev/console` ends its own VM with the panic status; it
//! could end its VM anyway (`reboot`), and nothing else is affected.
//!
//! It also watches for a kernel panic: libkrun exits 0 when the guest
//! reboots, and a panicking guest reboots, so [`Console::relay`] reports a
//! panic line (after forwarding what follows it for a moment) and the
//! runner ends the process itself with `status::GUEST_PANIC`.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

/// What the kernel prints first when it panics.
const PANIC_LINE: &[u8] = b"Kernel panic - not syncing";
/// How long output after the panic line is still forwarded (the reason and
/// the stack) before the runner exits.
const PANIC_DRAIN: Duration = Duration::from_millis(500);
/// Most output kept for a broker that is slow to read (the oldest is
/// dropped first).
const PENDING_MAX: usize = 256 * 1024;

/// Finds the panic line in output that arrives in arbitrary chunks.
#[derive(Debug, Default)]
pub struct PanicWatch {
    tail: Vec<u8>,
}

impl PanicWatch {
    /// Feeds one chunk; true once the panic line has been seen.
    pub fn feed(&mut self, chunk: &[u8]) -> bool {
        self.tail.extend_from_slice(chunk);
        let found = self.tail.windows(PANIC_LINE.len()).any(|w| w == PANIC_LINE);
        let keep = PANIC_LINE.len() - 1;
        if self.tail.len() > keep {
            self.tail.drain(..self.tail.len() - keep);
        }
        found
    }
}

/// Why [`Console::relay`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayEnd {
    /// The pipe closed: the VM is gone.
    Closed,
    /// The guest kernel panicked; its message has been forwarded.
    GuestPanicked,
}

/// The console socket and the pipe libkrun writes the guest's output to.
pub struct Console {
    listener: UnixListener,
    output: std::fs::File,
    client: Option<UnixStream>,
}

impl Console {
    /// Binds `socket` and makes the pipe; returns the pipe's write end for
    /// libkrun's serial device.
    pub fn bind(socket: &Path) -> io::Result<(Self, OwnedFd)> {
        let listener = UnixListener::bind(socket)?;
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        Ok((
            Self {
                listener,
                output: std::fs::File::from(read),
                client: None,
            },
            write,
        ))
    }

    /// Blocks until the broker connects (it does right after spawning us).
    pub fn wait_for_broker(&mut self) -> io::Result<()> {
        let (client, _) = self.listener.accept()?;
        client.set_nonblocking(true)?;
        self.client = Some(client);
        self.listener.set_nonblocking(true)
    }

    /// Forwards the guest's output until the pipe closes (the VM ended) or
    /// a panic was seen and what followed it forwarded. Output the broker
    /// is slow to take waits in a bounded buffer ([`PENDING_MAX`]); beyond
    /// it, it is dropped: the guest never waits for the broker.
    pub fn relay(mut self) -> RelayEnd {
        let mut watch = PanicWatch::default();
        let mut panicked_at: Option<Instant> = None;
        let mut buf = vec![0u8; 16 * 1024];
        let mut pending: Vec<u8> = Vec::new();
        loop {
            if panicked_at.is_some_and(|t| t.elapsed() >= PANIC_DRAIN) {
                self.flush_at_end(&pending);
                return RelayEnd::GuestPanicked;
            }
            let (out_ready, client_waiting, client_state) = {
                let client_events = if pending.is_empty() {
                    PollFlags::empty()
                } else {
                    PollFlags::POLLOUT
                };
                let mut fds = vec![
                    PollFd::new(self.output.as_fd(), PollFlags::POLLIN),
                    PollFd::new(self.listener.as_fd(), PollFlags::POLLIN),
                ];
                if let Some(c) = &self.client {
                    fds.push(PollFd::new(c.as_fd(), client_events));
                }
                let timeout = if panicked_at.is_some() {
                    PollTimeout::from(50u16)
                } else {
                    PollTimeout::NONE
                };
                match poll(&mut fds, timeout) {
                    Ok(_) => {}
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(_) => return RelayEnd::Closed,
                }
                let has =
                    |f: &PollFd, flags: PollFlags| f.revents().is_some_and(|r| r.intersects(flags));
                let readable = PollFlags::POLLIN | PollFlags::POLLHUP;
                (
                    has(&fds[0], readable),
                    has(&fds[1], readable),
                    fds.get(2).and_then(PollFd::revents),
                )
            };
            match client_state {
                // The broker went away (reported whatever we asked for).
                Some(r) if r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR) => {
                    self.client = None;
                    pending.clear();
                }
                Some(r) if r.contains(PollFlags::POLLOUT) => self.send(&mut pending, &[]),
                _ => {}
            }
            if client_waiting {
                match self.listener.accept() {
                    Ok((c, _)) => {
                        if c.set_nonblocking(true).is_ok() {
                            self.client = Some(c);
                            pending.clear();
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    // Out of fds, say: do not spin on a listener that stays
                    // readable.
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
            if !out_ready {
                continue;
            }
            let n = match self.output.read(&mut buf) {
                Ok(0) => {
                    self.flush_at_end(&pending);
                    return match panicked_at {
                        Some(_) => RelayEnd::GuestPanicked,
                        None => RelayEnd::Closed,
                    };
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return RelayEnd::Closed,
            };
            if watch.feed(&buf[..n]) && panicked_at.is_none() {
                panicked_at = Some(Instant::now());
            }
            self.send(&mut pending, &buf[..n]);
        }
    }

    /// The VM has ended: what is still pending goes to the broker, waiting
    /// for it at most a second.
    fn flush_at_end(&mut self, pending: &[u8]) {
        if let Some(c) = self.client.as_mut() {
            if !pending.is_empty()
                && c.set_nonblocking(false).is_ok()
                && c.set_write_timeout(Some(Duration::from_secs(1))).is_ok()
            {
                let _ = c.write_all(pending);
            }
        }
    }

    /// Writes what is pending, then `chunk`, to the broker without
    /// blocking; keeps what it would not take (up to [`PENDING_MAX`]).
    fn send(&mut self, pending: &mut Vec<u8>, chunk: &[u8]) {
        let Some(c) = self.client.as_mut() else {
            pending.clear();
            return;
        };
        pending.extend_from_slice(chunk);
        while !pending.is_empty() {
            match c.write(pending) {
                Ok(0) => break,
                Ok(n) => {
                    pending.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.client = None;
                    pending.clear();
                    return;
                }
            }
        }
        if pending.len() > PENDING_MAX {
            let excess = pending.len() - PENDING_MAX;
            pending.drain(..excess);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A console whose broker has attached, its relay running: the temp
    /// dir, the socket, the broker's end, the guest's end and the relay.
    fn attached() -> (
        tempfile::TempDir,
        std::path::PathBuf,
        UnixStream,
        std::fs::File,
        std::thread::JoinHandle<RelayEnd>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("console.sock");
        let (mut console, write_end) = Console::bind(&sock).unwrap();
        let broker = std::thread::spawn({
            let sock = sock.clone();
            move || UnixStream::connect(sock).unwrap()
        });
        console.wait_for_broker().unwrap();
        let broker = broker.join().unwrap();
        let relay = std::thread::spawn(move || console.relay());
        (dir, sock, broker, std::fs::File::from(write_end), relay)
    }

    #[test]
    fn the_panic_line_is_found_across_chunks() {
        let mut w = PanicWatch::default();
        assert!(!w.feed(b"[    0.000000] Linux version 6.1\n[ 1.2] Kernel pa"));
        assert!(w.feed(b"nic - not syncing: Attempted to kill init!\n"));
        let mut w = PanicWatch::default();
        for b in b"xx Kernel panic - not syncing: VFS" {
            if w.feed(&[*b]) {
                return;
            }
        }
        panic!("byte-by-byte feed missed the line");
    }

    #[test]
    fn ordinary_output_is_not_a_panic() {
        let mut w = PanicWatch::default();
        assert!(!w.feed(b"moat-agent: Kernel panics are reported\n"));
        assert!(!w.feed(&vec![b'k'; 100_000]));
        assert!(w.tail.len() < PANIC_LINE.len());
    }

    #[test]
    fn output_reaches_the_connected_broker_and_is_dropped_without_one() {
        let (_dir, sock, mut broker, mut guest, relay) = attached();
        guest.write_all(b"hello from the guest\n").unwrap();
        let mut got = vec![0u8; 21];
        broker.read_exact(&mut got).unwrap();
        assert_eq!(got, b"hello from the guest\n");
        // The broker goes away; the guest's writes never block.
        drop(broker);
        for _ in 0..200 {
            guest.write_all(&[b'x'; 1024]).unwrap();
        }
        // A new broker attaches and sees what comes next.
        let mut again = UnixStream::connect(&sock).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        guest.write_all(b"after\n").unwrap();
        again
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        // It may first get the tail of what was still in the pipe.
        let mut got = Vec::new();
        while !got.ends_with(b"after\n") {
            let mut b = [0u8; 1];
            again.read_exact(&mut b).unwrap();
            got.push(b[0]);
        }
        assert!(got[..got.len() - 6].iter().all(|b| *b == b'x'));
        drop(guest);
        assert_eq!(relay.join().unwrap(), RelayEnd::Closed);
    }

    #[test]
    fn a_broker_that_does_not_read_never_blocks_the_guest_and_gets_the_latest_output() {
        let (_dir, _sock, mut broker, mut guest, relay) = attached();
        let started = Instant::now();
        for i in 0..1024u32 {
            let mut line = format!("line {i:08}").into_bytes();
            line.resize(1023, b'.');
            line.push(b'\n');
            guest.write_all(&line).unwrap();
        }
        guest.write_all(b"the end\n").unwrap();
        assert!(started.elapsed() < Duration::from_secs(5));
        // Now the broker reads; at the VM's end what is pending is flushed.
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            broker.read_to_end(&mut got).unwrap();
            got
        });
        std::thread::sleep(Duration::from_millis(100));
        drop(guest);
        assert_eq!(relay.join().unwrap(), RelayEnd::Closed);
        let got = reader.join().unwrap();
        // Bounded (the socket's buffer plus PENDING_MAX), the newest kept.
        assert!(got.len() < 1024 * 1024, "{}", got.len());
        assert!(got.ends_with(b"the end\n"));
    }

    #[test]
    fn a_panic_is_reported_after_its_message_is_forwarded() {
        let started = Instant::now();
        let (_dir, _sock, mut broker, mut guest, relay) = attached();
        guest
            .write_all(b"Kernel panic - not syncing: Attempted to kill init!\n")
            .unwrap();
        std::thread::sleep(Duration::from_millis(100));
        guest.write_all(b"CPU: 0 PID: 1 Comm: init\n").unwrap();
        // The guest keeps its pipe open (a panicking kernel spins): the
        // relay still ends, after the drain time.
        assert_eq!(relay.join().unwrap(), RelayEnd::GuestPanicked);
        assert!(started.elapsed() >= PANIC_DRAIN);
        broker
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut got = String::new();
        let _ = broker.read_to_string(&mut got);
        assert!(
            got.contains("Kernel panic") && got.contains("Comm: init"),
            "{got}"
        );
        drop(guest);
    }
}
