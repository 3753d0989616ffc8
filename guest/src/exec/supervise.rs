//! Watching a spawned command: reading stdout and stderr as they arrive,
//! noticing its exit (pidfd, or polling without one), killing its process
//! group and its workload group at the timeout, and draining the pipes for
//! a bounded time after the exit in case an escaped grandchild keeps them
//! open.

use std::io::{self, Read};
use std::os::fd::AsFd;
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, ChildStderr, ChildStdout, ExitStatus};
use std::time::{Duration, Instant};

use moat_proto::agent::{ExecResult, Stream};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use super::{DRAIN_AFTER_EXIT, MAX_LINES};
use crate::fd::pidfd_open;
use crate::output::Collector;
use crate::workload::Group;

/// Exit-status polling interval when pidfds are unavailable.
const TICK: Duration = Duration::from_millis(10);
const READ_CHUNK: usize = 64 * 1024;

/// Reads one chunk from a ready pipe. `false` once the pipe is finished.
fn pump(pipe: &mut impl Read, stream: Stream, out: &mut Collector, buf: &mut [u8]) -> bool {
    loop {
        match pipe.read(buf) {
            Ok(0) => return false,
            Ok(n) => {
                out.push(stream, &buf[..n]);
                return true;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return false,
        }
    }
}

fn until(deadline: Instant, now: Instant) -> Duration {
    deadline.saturating_duration_since(now)
}

/// Collects output until the command is done, enforcing the timeout: at
/// the deadline its process group is killed, and its workload group
/// (everything it started, wherever it moved) when it has one.
pub fn supervise(
    mut child: Child,
    timeout: Option<Duration>,
    cap: u64,
    group: Option<&Group>,
) -> ExecResult {
    let start = Instant::now();
    let deadline = timeout.and_then(|t| start.checked_add(t));
    let pid = child.id();
    let pidfd = pidfd_open(pid);
    let mut stdout: Option<ChildStdout> = child.stdout.take();
    let mut stderr: Option<ChildStderr> = child.stderr.take();
    let mut out = Collector::new(cap, MAX_LINES);
    let mut buf = vec![0u8; READ_CHUNK];
    let mut status: Option<ExitStatus> = None;
    let mut drain_until: Option<Instant> = None;
    let mut timed_out = false;

    loop {
        if status.is_none() {
            match child.try_wait() {
                Ok(Some(st)) => {
                    status = Some(st);
                    drain_until = Some(Instant::now() + DRAIN_AFTER_EXIT);
                }
                Ok(None) => {}
                // Not ours to wait for any more (cannot happen for our own
                // child); report it as killed rather than hang.
                Err(_) => {
                    status = Some(ExitStatus::from_raw(libc::SIGKILL));
                    drain_until = Some(Instant::now());
                }
            }
        }
        let now = Instant::now();
        if status.is_some() && stdout.is_none() && stderr.is_none() {
            break;
        }
        if drain_until.is_some_and(|d| now >= d) {
            break;
        }
        if status.is_none() && !timed_out && deadline.is_some_and(|d| now >= d) {
            // The group id is the child's pid (process_group(0)); it is not
            // reaped yet, so the id cannot have been reused.
            if let Ok(pgid) = i32::try_from(pid) {
                let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
            }
            if let Some(group) = group {
                group.kill();
            }
            timed_out = true;
        }

        // Sleep until a pipe is readable, the child exits, or a deadline.
        let mut wait: Option<Duration> = None;
        let mut shorten = |d: Duration| wait = Some(wait.map_or(d, |w| w.min(d)));
        if let Some(d) = drain_until {
            shorten(until(d, now));
        }
        if status.is_none() {
            if let (Some(d), false) = (deadline, timed_out) {
                shorten(until(d, now));
            }
            if pidfd.is_none() {
                shorten(TICK);
            }
        }
        let timeout = match wait {
            // Round up so we do not wake a hair before the deadline.
            Some(d) => {
                PollTimeout::try_from(d + Duration::from_micros(999)).unwrap_or(PollTimeout::MAX)
            }
            None => PollTimeout::NONE,
        };
        let (out_ready, err_ready) = {
            let mut which = Vec::with_capacity(3);
            let mut fds = Vec::with_capacity(3);
            if let Some(p) = &stdout {
                which.push(Some(Stream::Stdout));
                fds.push(PollFd::new(p.as_fd(), PollFlags::POLLIN));
            }
            if let Some(p) = &stderr {
                which.push(Some(Stream::Stderr));
                fds.push(PollFd::new(p.as_fd(), PollFlags::POLLIN));
            }
            if let (Some(fd), None) = (&pidfd, status) {
                which.push(None);
                fds.push(PollFd::new(fd.as_fd(), PollFlags::POLLIN));
            }
            match poll(&mut fds, timeout) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                // Cannot poll: stop reading output, and do not spin.
                Err(_) => {
                    stdout = None;
                    stderr = None;
                    std::thread::sleep(TICK);
                    continue;
                }
            }
            let is_ready = |s: Stream| {
                which
                    .iter()
                    .zip(&fds)
                    .any(|(w, fd)| *w == Some(s) && fd.revents().is_some_and(|r| !r.is_empty()))
            };
            (is_ready(Stream::Stdout), is_ready(Stream::Stderr))
        };
        // Read stdout and stderr in a fixed order when both are ready: the
        // pipes themselves do not tell which was written first.
        if out_ready {
            if let Some(p) = stdout.as_mut() {
                if !pump(p, Stream::Stdout, &mut out, &mut buf) {
                    out.close(Stream::Stdout);
                    stdout = None;
                }
            }
        }
        if err_ready {
            if let Some(p) = stderr.as_mut() {
                if !pump(p, Stream::Stderr, &mut out, &mut buf) {
                    out.close(Stream::Stderr);
                    stderr = None;
                }
            }
        }
    }
    drop(stdout);
    drop(stderr);

    let (output, dropped_bytes) = out.finish();
    let exit_code = match (timed_out, status) {
        (true, _) => 128 + libc::SIGKILL,
        (false, Some(st)) => st
            .code()
            .or_else(|| st.signal().map(|s| 128 + s))
            .unwrap_or(128),
        (false, None) => 128 + libc::SIGKILL,
    };
    ExecResult {
        exit_code,
        output,
        timed_out,
        dropped_bytes,
    }
}
