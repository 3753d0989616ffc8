//! One interpreter process: starting it and waiting for its driver's `ready`,
//! noticing its exit (pidfd, or polling without one), interrupting it, and
//! killing its whole process group. The group is signalled only while its
//! leader is unreaped, so the id cannot have been reused.

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, ExitStatus};
use std::thread;
use std::time::{Duration, Instant};

use moat_proto::agent::{OutputLine, Stream};
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use super::pipes::{Event, Pipes};
use super::spawn;
use super::spec::{ReplSpec, StartParams};
use super::{KILL_WAIT, START_TIMEOUT};
use crate::error::{AgentError, Result};
use crate::fd;
use crate::output::Collector;
use crate::workload::Group;

/// Exit polling interval when pidfds are unavailable.
const TICK: Duration = Duration::from_millis(10);
/// After the driver's control channel closes, how long to wait for the
/// interpreter's exit before calling the session broken.
const CLOSE_TO_EXIT: Duration = Duration::from_millis(500);
/// Output kept from an interpreter's start-up.
const STARTUP_OUTPUT: u64 = 64 * 1024;

/// What [`Session::wait_for`] woke up for.
#[derive(Debug)]
pub enum Wake {
    Event(Event),
    Deadline,
    Exited,
    Broken(String),
}

/// A running interpreter.
#[derive(Debug)]
pub struct Session {
    /// `None` once reaped (or handed to a reaper thread).
    child: Option<Child>,
    /// The interpreter's pid, which is also its process group id.
    pub(super) pid: Pid,
    pidfd: Option<OwnedFd>,
    pub(super) pipes: Pipes,
    pub(super) next_id: u64,
    /// Its workload group; removed (once empty) after the session.
    group: Option<Group>,
    /// Set for an interpreter started by `Warm` until its first cell: what
    /// it was started with.
    pub(super) warm_for: Option<StartParams>,
}

/// SIGKILL to the interpreter's process group, and to its workload group
/// (which also holds what left the process group).
fn kill_tree(pgid: Pid, group: Option<&Group>) {
    let _ = killpg(pgid, Signal::SIGKILL);
    if let Some(g) = group {
        g.kill();
    }
}

/// "exit status 3", "killed by SIGKILL".
pub fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(sig)) => match Signal::try_from(sig) {
            Ok(s) => format!("killed by {s}"),
            Err(_) => format!("killed by signal {sig}"),
        },
        (None, None) => "unknown status".to_owned(),
    }
}

fn stderr_text(lines: &[OutputLine]) -> String {
    let text: Vec<String> = lines
        .iter()
        .filter(|l| l.stream == Stream::Stderr as i32)
        .map(|l| String::from_utf8_lossy(&l.text).into_owned())
        .collect();
    let text = text.join("\n");
    let tail: String = text.chars().rev().take(2000).collect();
    tail.chars().rev().collect()
}

impl Session {
    /// Starts the flavor's interpreter with the request's env and workdir
    /// and waits for its driver to be ready. Returns the session and what
    /// the interpreter printed while starting.
    pub fn start(spec: &ReplSpec<'_>) -> Result<(Session, Vec<OutputLine>)> {
        let name = spec.flavor.name;
        let program = spawn::find(spec)?;
        let shown = program.display().to_string();
        if !spec.workdir.is_dir() {
            return Err(AgentError::Unavailable(format!(
                "cannot start the {name} interpreter: working directory {:?} is not a directory",
                spec.workdir.display().to_string()
            )));
        }
        let spawned = spawn::spawn(spec, &program).map_err(|e| {
            AgentError::Unavailable(format!("cannot start the {name} interpreter {shown}: {e}"))
        })?;
        let mut child = spawned.child;
        let group = spawned.group;
        let pid = Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
        let pidfd = fd::pidfd_open(child.id());
        let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
        let pipes = Pipes::new(
            stdout,
            stderr,
            spawned.requests,
            spawned.events,
            spawned.acks,
        );
        let pipes = match pipes {
            Ok(pipes) => pipes,
            Err(e) => {
                kill_tree(pid, group.as_ref());
                let _ = child.wait();
                return Err(AgentError::Unavailable(format!(
                    "cannot start the {name} interpreter {shown}: {e}"
                )));
            }
        };
        let mut session = Session {
            child: Some(child),
            pid,
            pidfd,
            pipes,
            next_id: 1,
            group,
            warm_for: None,
        };
        let mut out = Collector::new(STARTUP_OUTPUT, 1000);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match session.wait_for(Some(deadline), &mut out) {
                Wake::Event(Event::Ready) => break,
                Wake::Event(_) => {}
                Wake::Exited => {
                    let how = session.reap();
                    session.pipes.drain(&mut out);
                    let (lines, _) = out.finish();
                    return Err(AgentError::Unavailable(format!(
                        "the {name} interpreter {shown} exited while starting ({how}): {}",
                        stderr_text(&lines)
                    )));
                }
                Wake::Deadline => {
                    return Err(AgentError::Unavailable(format!(
                        "the {name} interpreter {shown} did not start within {} s",
                        START_TIMEOUT.as_secs()
                    )));
                }
                Wake::Broken(why) => {
                    return Err(AgentError::Unavailable(format!(
                        "the {name} interpreter {shown} failed to start its REPL driver: {why}"
                    )));
                }
            }
        }
        let (lines, _) = out.finish();
        Ok((session, lines))
    }

    /// Whether the interpreter has exited (without reaping it).
    fn has_exited(&self) -> bool {
        if self.child.is_none() {
            return true;
        }
        let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
        match waitid(Id::Pid(self.pid), flags) {
            Ok(WaitStatus::StillAlive) | Err(Errno::EINTR) => false,
            Ok(_) | Err(_) => true,
        }
    }

    /// Waits up to `limit` for the interpreter to exit; `true` if it did.
    fn wait_exit(&self, limit: Duration) -> bool {
        let until = Instant::now() + limit;
        loop {
            if self.has_exited() {
                return true;
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            match &self.pidfd {
                Some(pidfd) => {
                    let mut fds = [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
                    let timeout = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
                    if poll(&mut fds, timeout).is_err() {
                        thread::sleep(TICK.min(left));
                    }
                }
                None => thread::sleep(TICK.min(left)),
            }
        }
    }

    /// If the interpreter exited while no cell was running, reaps it and
    /// says how it ended.
    pub fn exited_between_cells(&mut self) -> Option<String> {
        self.has_exited().then(|| self.reap())
    }

    /// Reaps an exited interpreter (killing what is left of its group
    /// first) and says how it ended.
    pub fn reap(&mut self) -> String {
        let Some(mut child) = self.child.take() else {
            return "already gone".to_owned();
        };
        // The leader is a zombie at worst, so the group id is still ours.
        self.kill_group();
        match child.wait() {
            Ok(status) => describe(status),
            Err(e) => format!("status unknown: {e}"),
        }
    }

    fn kill_group(&self) {
        kill_tree(self.pid, self.group.as_ref());
    }

    /// Sends SIGINT to the interpreter's process group.
    pub fn interrupt(&self) {
        if self.child.is_some() {
            let _ = killpg(self.pid, Signal::SIGINT);
        }
    }

    /// Kills the whole process group and reaps the interpreter (waiting at
    /// most [`KILL_WAIT`]; after that a thread reaps it whenever it goes).
    pub fn kill(&mut self) {
        if self.child.is_none() {
            return;
        }
        self.kill_group();
        if self.wait_exit(KILL_WAIT) {
            self.reap();
        } else if let Some(mut child) = self.child.take() {
            let reaper = thread::Builder::new()
                .name("repl-reaper".to_owned())
                .spawn(move || {
                    let _ = child.wait();
                });
            drop(reaper);
        }
    }

    /// Handles output, syncs and request writes until an event arrives, the
    /// interpreter exits, the channel breaks, or `deadline` passes.
    pub fn wait_for(&mut self, deadline: Option<Instant>, out: &mut Collector) -> Wake {
        loop {
            if let Some(event) = self.pipes.next_event() {
                return Wake::Event(event);
            }
            if self.has_exited() {
                // What it said before going comes first.
                self.pipes.read_pending(out);
                if let Some(event) = self.pipes.next_event() {
                    return Wake::Event(event);
                }
                return Wake::Exited;
            }
            if let Some(why) = self.pipes.broken() {
                let why = why.to_owned();
                // A dying interpreter closes its pipes before it is a zombie.
                if self.wait_exit(CLOSE_TO_EXIT) {
                    return Wake::Exited;
                }
                return Wake::Broken(why);
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return Wake::Deadline;
            }
            let mut timeout = deadline.map(|d| d - now);
            if self.pidfd.is_none() {
                timeout = Some(timeout.map_or(TICK, |t| t.min(TICK)));
            }
            let pidfd = self.pidfd.as_ref().map(|fd| fd.as_fd());
            self.pipes.wait(timeout, pidfd, out);
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.kill();
    }
}
