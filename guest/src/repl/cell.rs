//! Running one cell in a session: send it, collect output, answer syncs,
//! and enforce the timeout. At the deadline the process group gets SIGINT;
//! a `done` within [`GRACE`] means the cell was interrupted and the state is
//! kept; no `done` by then means the group is killed and the state lost.

use std::time::{Duration, Instant};

use moat_proto::agent::ReplStatus;

use super::pipes::{DoneStatus, Event};
use super::session::{Session, Wake};
use super::GRACE;
use crate::output::Collector;

/// How a cell ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CellEnd {
    /// The driver reported it before any timeout.
    Finished(ReplStatus),
    /// Interrupted at the timeout; the driver reported it within the grace.
    Interrupted,
    /// Still running after the grace: the interpreter was killed.
    Killed,
    /// The interpreter exited during the cell (how).
    Died(String),
    /// The interpreter exited after the timeout's SIGINT (how).
    DiedOnInterrupt(String),
    /// The control channel failed (why); the interpreter was killed.
    Broken(String),
}

impl CellEnd {
    /// Whether the session is gone (the next cell starts a new one).
    pub fn loses_state(&self) -> bool {
        matches!(
            self,
            CellEnd::Killed | CellEnd::Died(_) | CellEnd::DiedOnInterrupt(_) | CellEnd::Broken(_)
        )
    }
}

impl Session {
    /// Runs `code` to its end, or to the timeout.
    pub fn run_cell(
        &mut self,
        code: &str,
        timeout: Option<Duration>,
        out: &mut Collector,
    ) -> CellEnd {
        // What background activity printed since the last cell comes first.
        self.pipes.drain(out);
        let id = self.next_id;
        self.next_id += 1;
        self.pipes
            .send(format!("cell {id} {}\n", code.len()).as_bytes());
        self.pipes.send(code.as_bytes());
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        let mut grace: Option<Instant> = None;
        loop {
            match self.wait_for(grace.or(deadline), out) {
                Wake::Event(Event::Done { id: done, status }) if done == id => {
                    // The driver flushed before saying so: what the cell
                    // wrote is in the pipes now.
                    self.pipes.drain(out);
                    if grace.is_some() {
                        return CellEnd::Interrupted;
                    }
                    return CellEnd::Finished(match status {
                        DoneStatus::Ok => ReplStatus::Success,
                        DoneStatus::Error | DoneStatus::Interrupted => ReplStatus::Error,
                    });
                }
                // A stale `done` or a repeated `ready`: nothing to do.
                Wake::Event(_) => {}
                Wake::Deadline if grace.is_none() => {
                    self.interrupt();
                    grace = Some(Instant::now() + GRACE);
                }
                Wake::Deadline => {
                    self.kill();
                    self.pipes.drain(out);
                    return CellEnd::Killed;
                }
                Wake::Exited => {
                    let how = self.reap();
                    self.pipes.drain(out);
                    if grace.is_some() {
                        return CellEnd::DiedOnInterrupt(how);
                    }
                    return CellEnd::Died(how);
                }
                Wake::Broken(why) => {
                    self.kill();
                    self.pipes.drain(out);
                    return CellEnd::Broken(why);
                }
            }
        }
    }
}
