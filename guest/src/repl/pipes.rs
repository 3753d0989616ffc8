//! The agent's ends of a session's pipes: the interpreter's stdout and
//! stderr (read into a [`Collector`]), the request pipe (written without
//! blocking from an outbox), the event pipe (parsed into [`Event`]s; `sync`
//! requests are answered here, after draining stdout and stderr) and the ack
//! pipe. All our ends are non-blocking; [`Pipes::wait`] sleeps in `poll`.

use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd};
use std::process::{ChildStderr, ChildStdout};
use std::time::Duration;

use moat_proto::agent::Stream;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::fd::{read_nonblocking, set_nonblocking, ReadOutcome};
use crate::output::Collector;

const READ_CHUNK: usize = 64 * 1024;
/// Longest event line accepted from the driver.
const MAX_EVENT_LINE: usize = 4096;
/// Reads of one pipe per drain or wakeup, so that a process writing without
/// pause cannot keep the agent from looking at its deadlines.
const MAX_READS: usize = 64;

/// How the driver says a cell ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DoneStatus {
    Ok,
    Error,
    /// `KeyboardInterrupt` / interrupted script: after our SIGINT, or raised
    /// by the code itself.
    Interrupted,
}

/// An event from the driver (syncs are handled inside [`Pipes`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Ready,
    Done { id: u64, status: DoneStatus },
}

enum Line {
    Event(Event),
    Sync(u64),
}

fn parse(line: &[u8]) -> Option<Line> {
    let text = std::str::from_utf8(line).ok()?;
    let words: Vec<&str> = text.split(' ').collect();
    match words.as_slice() {
        ["ready"] => Some(Line::Event(Event::Ready)),
        ["sync", seq] => seq.parse().ok().map(Line::Sync),
        ["done", id, status] => {
            let status = match *status {
                "ok" => DoneStatus::Ok,
                "error" => DoneStatus::Error,
                "interrupted" => DoneStatus::Interrupted,
                _ => return None,
            };
            let id = id.parse().ok()?;
            Some(Line::Event(Event::Done { id, status }))
        }
        _ => None,
    }
}

/// The pipes of one session.
#[derive(Debug)]
pub struct Pipes {
    stdout: Option<ChildStdout>,
    stderr: Option<ChildStderr>,
    requests: File,
    outbox: Vec<u8>,
    events: Option<File>,
    inbox: Vec<u8>,
    queue: VecDeque<Event>,
    broken: Option<String>,
    acks: File,
    buf: Vec<u8>,
}

impl Pipes {
    /// Takes the agent's ends (the control ends already non-blocking).
    pub fn new(
        stdout: Option<ChildStdout>,
        stderr: Option<ChildStderr>,
        requests: File,
        events: File,
        acks: File,
    ) -> std::io::Result<Self> {
        if let Some(p) = &stdout {
            set_nonblocking(p)?;
        }
        if let Some(p) = &stderr {
            set_nonblocking(p)?;
        }
        Ok(Pipes {
            stdout,
            stderr,
            requests,
            outbox: Vec::new(),
            events: Some(events),
            inbox: Vec::new(),
            queue: VecDeque::new(),
            broken: None,
            acks,
            buf: vec![0; READ_CHUNK],
        })
    }

    /// Queues bytes for the request pipe and writes what fits now.
    pub fn send(&mut self, bytes: &[u8]) {
        self.outbox.extend_from_slice(bytes);
        self.flush_outbox();
    }

    fn flush_outbox(&mut self) {
        while !self.outbox.is_empty() {
            match self.requests.write(&self.outbox) {
                Ok(n) => {
                    self.outbox.drain(..n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                // The driver is gone; its exit is noticed elsewhere.
                Err(_) => self.outbox.clear(),
            }
        }
    }

    /// Our ends of the control pipes, for tests that look for leaks.
    #[cfg(test)]
    pub fn control_files(&self) -> Vec<&File> {
        [Some(&self.requests), self.events.as_ref(), Some(&self.acks)]
            .into_iter()
            .flatten()
            .collect()
    }

    /// The next event received, if any.
    pub fn next_event(&mut self) -> Option<Event> {
        self.queue.pop_front()
    }

    /// Why the event channel cannot be used any more, if so.
    pub fn broken(&self) -> Option<&str> {
        self.broken.as_deref()
    }

    /// Reads what stdout and stderr hold right now (bounded).
    pub fn drain(&mut self, out: &mut Collector) {
        for _ in 0..MAX_READS {
            if !read_stdout(&mut self.stdout, &mut self.buf, out) {
                break;
            }
        }
        for _ in 0..MAX_READS {
            if !read_stderr(&mut self.stderr, &mut self.buf, out) {
                break;
            }
        }
    }

    /// Reads events already in the pipe without waiting (e.g. a `done`
    /// written just before the interpreter exited).
    pub fn read_pending(&mut self, out: &mut Collector) {
        self.read_events(out);
    }

    fn read_events(&mut self, out: &mut Collector) {
        let mut closed = false;
        if let Some(events) = self.events.as_mut() {
            for _ in 0..MAX_READS {
                match read_nonblocking(events, &mut self.buf) {
                    ReadOutcome::Data(n) => self.inbox.extend_from_slice(&self.buf[..n]),
                    ReadOutcome::Empty => break,
                    ReadOutcome::Closed => {
                        closed = true;
                        break;
                    }
                }
            }
        }
        while let Some(pos) = self.inbox.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.inbox.drain(..=pos).take(pos).collect();
            match parse(&line) {
                Some(Line::Event(event)) => self.queue.push_back(event),
                Some(Line::Sync(seq)) => {
                    self.drain(out);
                    // A full ack pipe means the driver stopped waiting for
                    // acks; it bounds its own wait, so dropping one is fine.
                    let _ = self.acks.write(format!("{seq}\n").as_bytes());
                }
                None => {
                    let shown: String = String::from_utf8_lossy(&line).chars().take(80).collect();
                    self.fail(format!("unexpected control message {shown:?}"));
                }
            }
        }
        if self.inbox.len() > MAX_EVENT_LINE {
            self.fail(format!(
                "control message longer than {MAX_EVENT_LINE} bytes"
            ));
        }
        if closed && self.broken.is_none() {
            self.fail("the driver closed its control channel".to_owned());
        }
    }

    fn fail(&mut self, why: String) {
        self.events = None;
        self.inbox.clear();
        self.broken.get_or_insert(why);
    }

    /// Sleeps until output or an event arrives, the request pipe can take
    /// more, `pidfd` becomes readable, or `timeout` passes; then handles
    /// what is ready.
    pub fn wait(
        &mut self,
        timeout: Option<Duration>,
        pidfd: Option<BorrowedFd<'_>>,
        out: &mut Collector,
    ) {
        #[derive(Clone, Copy, PartialEq)]
        enum Which {
            Out,
            Err,
            Events,
            Requests,
            Pid,
        }
        let timeout = match timeout {
            // Round up so we do not wake a hair before a deadline.
            Some(d) => {
                PollTimeout::try_from(d + Duration::from_micros(999)).unwrap_or(PollTimeout::MAX)
            }
            None => PollTimeout::NONE,
        };
        let mut ready: Vec<Which> = Vec::with_capacity(5);
        {
            let mut which = Vec::with_capacity(5);
            let mut fds = Vec::with_capacity(5);
            if let Some(p) = &self.stdout {
                which.push(Which::Out);
                fds.push(PollFd::new(p.as_fd(), PollFlags::POLLIN));
            }
            if let Some(p) = &self.stderr {
                which.push(Which::Err);
                fds.push(PollFd::new(p.as_fd(), PollFlags::POLLIN));
            }
            if let Some(p) = &self.events {
                which.push(Which::Events);
                fds.push(PollFd::new(p.as_fd(), PollFlags::POLLIN));
            }
            if !self.outbox.is_empty() {
                which.push(Which::Requests);
                fds.push(PollFd::new(self.requests.as_fd(), PollFlags::POLLOUT));
            }
            if let Some(p) = pidfd {
                which.push(Which::Pid);
                fds.push(PollFd::new(p, PollFlags::POLLIN));
            }
            match poll(&mut fds, timeout) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => return,
                Err(_) => {
                    // Cannot poll: do not spin; the caller's deadlines and
                    // exit checks still run.
                    std::thread::sleep(Duration::from_millis(10));
                    return;
                }
            }
            for (w, fd) in which.iter().zip(&fds) {
                if fd.revents().is_some_and(|r| !r.is_empty()) {
                    ready.push(*w);
                }
            }
        }
        // stdout before stderr when both are ready: the pipes do not say
        // which was written first (syncs make that rare for cell output).
        if ready.contains(&Which::Out) {
            read_stdout(&mut self.stdout, &mut self.buf, out);
        }
        if ready.contains(&Which::Err) {
            read_stderr(&mut self.stderr, &mut self.buf, out);
        }
        if ready.contains(&Which::Events) {
            self.read_events(out);
        }
        if ready.contains(&Which::Requests) {
            self.flush_outbox();
        }
    }
}

/// One non-blocking read of stdout; `false` when there was nothing.
fn read_stdout(pipe: &mut Option<ChildStdout>, buf: &mut [u8], out: &mut Collector) -> bool {
    let Some(p) = pipe.as_mut() else {
        return false;
    };
    match read_nonblocking(p, buf) {
        ReadOutcome::Data(n) => {
            out.push(Stream::Stdout, &buf[..n]);
            true
        }
        ReadOutcome::Empty => false,
        ReadOutcome::Closed => {
            out.close(Stream::Stdout);
            *pipe = None;
            false
        }
    }
}

/// One non-blocking read of stderr; `false` when there was nothing.
fn read_stderr(pipe: &mut Option<ChildStderr>, buf: &mut [u8], out: &mut Collector) -> bool {
    let Some(p) = pipe.as_mut() else {
        return false;
    };
    match read_nonblocking(p, buf) {
        ReadOutcome::Data(n) => {
            out.push(Stream::Stderr, &buf[..n]);
            true
        }
        ReadOutcome::Empty => false,
        ReadOutcome::Closed => {
            out.close(Stream::Stderr);
            *pipe = None;
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_lines_parse_strictly() {
        assert!(matches!(parse(b"ready"), Some(Line::Event(Event::Ready))));
        assert!(matches!(parse(b"sync 12"), Some(Line::Sync(12))));
        assert!(matches!(
            parse(b"done 7 interrupted"),
            Some(Line::Event(Event::Done {
                id: 7,
                status: DoneStatus::Interrupted
            }))
        ));
        for bad in [
            &b"done 7 maybe"[..],
            b"done x ok",
            b"sync",
            b"ready now",
            b"",
            b"\xff",
        ] {
            assert!(parse(bad).is_none(), "{bad:?}");
        }
    }
}
