//! REPL sessions (`Repl` requests): one interpreter per language per VM,
//! started lazily on the first cell (or ahead of it by `Warm`, in a warm-pool
//! VM), kept between cells; cells of one language run one at a time (a mutex
//! per language; a second call waits).
//!
//! A warm interpreter serves the first cell only if that cell asks for the
//! env, workdir and user it was started with; otherwise it is killed and a
//! new one started as for any first cell, so warming never changes what a
//! cell sees. A warm interpreter that died before its first cell is replaced
//! without a note: no state of the sandbox's was lost.
//!
//! # The control channel
//!
//! The interpreter runs a small driver ([`python`]: `driver.py`, [`node`]:
//! `driver.js`, embedded in the agent) in its own process group, with stdin
//! `/dev/null` and its real fds 1 and 2 as pipes the agent reads into ordered
//! output lines ([`crate::output`]). Cells and their results never travel
//! through those: the driver gets three extra pipes (see [`spawn`]):
//!
//! - fd 3, agent → driver: `cell <id> <len>\n` then `<len>` bytes of code;
//! - fd 4, driver → agent: one event per line: `ready` once started,
//!   `done <id> ok|error|interrupted` after a cell, `sync <seq>` (below);
//! - fd 5, agent → driver: `<seq>\n`, the answer to `sync <seq>`.
//!
//! The drivers move these to close-on-exec descriptors at once (Python: dup
//! to fd >= 100 and close 3-5; Node: reopen through `/proc/self/fd`), so
//! programs started by user code do not inherit them, and keep them in a
//! closure. User output is never scanned for anything: printing text that
//! looks like the protocol is just output.
//!
//! Order across stdout and stderr: two pipes do not say which was written
//! first, so when a cell's output switches from one stream to the other the
//! driver first sends `sync <seq>` and waits (bounded) for the agent, which
//! drains both pipes and answers `<seq>`. Output written by the driver's
//! streams is thus in order; bytes written to the fds by other means (child
//! processes) are ordered only as well as the agent happens to read them.
//! Before reporting `done` the driver flushes; the agent then drains the
//! pipes without blocking. Output written between cells (background threads,
//! timers) is picked up at the start of the next cell. The messages are
//! plain text lines rather than JSON: nothing in them needs more, and the
//! agent needs no JSON parser.
//!
//! # Timeouts and death
//!
//! See [`cell`]: SIGINT to the process group at the timeout; if the driver
//! reports the cell within [`GRACE`], TIMEOUT with state kept; otherwise the
//! group is killed, TIMEOUT with `state_lost` (also when the interpreter dies
//! of the SIGINT itself). An interpreter exiting during a cell gives ERROR
//! with `state_lost` and a stderr line saying so; one that exited between
//! cells is noticed by the next call, which starts a new one and says so
//! (`state_lost`, stderr line). Each of these cases adds one `moat: ...`
//! stderr line, after the cell's output (the between-cells one before it),
//! not counted against the output cap.
//!
//! Worst case for one call, not counting the wait for an earlier call of the
//! same language: [`START_TIMEOUT`] (only when an interpreter is started) +
//! the cell's timeout + [`GRACE`] + [`KILL_WAIT`] + a few milliseconds.

mod cell;
mod node;
mod pipes;
mod python;
mod session;
mod spawn;
mod spec;
#[cfg(test)]
mod tests;

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use moat_proto::agent::{OutputLine, Repl, ReplResult, ReplStatus, Stream, Warm, WarmResult};

use crate::error::Result;
use crate::exec::MAX_LINES;
use crate::output::Collector;
use cell::CellEnd;
use session::Session;
use spec::ReplSpec;

/// How long an interpreter may take to start and report `ready`. Under
/// QEMU TCG a bare `node -e 0` took 4 s warm and 6 s cold, more on a busy
/// host; Python about 1-4 s.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long after SIGINT the driver may take to report the cell.
pub const GRACE: Duration = Duration::from_secs(2);
/// How long to wait for a killed interpreter to be gone.
pub const KILL_WAIT: Duration = Duration::from_secs(1);

/// A language's interpreter and driver.
#[derive(Debug)]
pub struct Flavor {
    /// The wire name: "python" or "nodejs".
    pub name: &'static str,
    /// Programs tried in order, looked up in the request's PATH.
    pub programs: &'static [&'static str],
    /// Arguments before the driver source (passed as the last argument).
    pub args: &'static [&'static str],
    /// The driver's source.
    pub driver: &'static str,
    /// The `Failure` message when none of `programs` is found.
    pub missing: &'static str,
}

/// The sessions of one VM, one slot per language.
#[derive(Debug)]
pub struct Registry {
    python: Mutex<Option<Session>>,
    nodejs: Mutex<Option<Session>>,
}

static REGISTRY: Registry = Registry::new();

/// Runs one cell in this VM's session for its language.
pub fn run(req: &Repl) -> Result<ReplResult> {
    REGISTRY.run(req)
}

/// Starts the interpreters `req` names ahead of their first cell.
pub fn warm(req: &Warm) -> Result<WarmResult> {
    REGISTRY.warm(req)
}

impl Registry {
    /// No sessions yet.
    pub const fn new() -> Self {
        Registry {
            python: Mutex::new(None),
            nodejs: Mutex::new(None),
        }
    }

    fn slot(&self, flavor: &Flavor) -> MutexGuard<'_, Option<Session>> {
        let slot = match flavor.name {
            "nodejs" => &self.nodejs,
            _ => &self.python,
        };
        slot.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `req`, waiting for an earlier cell of the same language first.
    /// `Err` when the request is refused or the interpreter cannot start.
    pub fn run(&self, req: &Repl) -> Result<ReplResult> {
        let spec = ReplSpec::parse(req)?;
        let mut slot = self.slot(spec.flavor);
        run_in(&mut slot, &spec)
    }

    /// Starts an interpreter for each language of `req` that has none yet,
    /// with `req`'s env, workdir and user. `Err` names the first that could
    /// not start (those before it keep running).
    pub fn warm(&self, req: &Warm) -> Result<WarmResult> {
        if req.languages.len() > 2 {
            return Err(crate::error::AgentError::BadRequest(format!(
                "warm: {} languages given; there are two (python, nodejs)",
                req.languages.len()
            )));
        }
        let mut started = Vec::new();
        for language in &req.languages {
            let as_repl = Repl {
                language: language.clone(),
                env: req.env.clone(),
                workdir: req.workdir.clone(),
                user: req.user.clone(),
                ..Repl::default()
            };
            let spec = ReplSpec::parse(&as_repl)?;
            let mut slot = self.slot(spec.flavor);
            if slot.is_none() {
                let (mut session, _startup) = Session::start(&spec)?;
                session.warm_for = Some(spec.start_params());
                *slot = Some(session);
            }
            started.push(spec.flavor.name.to_owned());
        }
        Ok(WarmResult { started })
    }
}

fn note(text: String) -> OutputLine {
    OutputLine {
        stream: Stream::Stderr as i32,
        text: text.into_bytes(),
    }
}

fn describe_timeout(t: Option<Duration>) -> String {
    match t {
        Some(t) if t.subsec_millis() == 0 => format!("{} s", t.as_secs()),
        Some(t) => format!("{} ms", t.as_millis()),
        None => "no".to_owned(),
    }
}

/// One call against the slot of its language.
fn run_in(slot: &mut Option<Session>, spec: &ReplSpec<'_>) -> Result<ReplResult> {
    let name = spec.flavor.name;
    let mut before = Vec::new();
    let mut state_lost = false;
    if let Some(warm_for) = slot.as_mut().and_then(|s| s.warm_for.take()) {
        let dead = slot.as_mut().and_then(Session::exited_between_cells);
        if dead.is_some() || warm_for != spec.start_params() {
            // Dropping the session kills it.
            *slot = None;
        }
    }
    if let Some(status) = slot.as_mut().and_then(Session::exited_between_cells) {
        *slot = None;
        state_lost = true;
        before.push(note(format!(
            "moat: the {name} interpreter exited since the last cell ({status}); a new one was \
             started, so earlier state (variables, imports) is gone"
        )));
    }
    let session = match slot {
        Some(session) => session,
        None => {
            let (session, startup) = Session::start(spec)?;
            before.extend(startup);
            slot.insert(session)
        }
    };
    let mut out = Collector::new(spec.cap, MAX_LINES);
    let end = session.run_cell(spec.code, spec.timeout, &mut out);
    let (lines, dropped_bytes) = out.finish();
    let timeout = describe_timeout(spec.timeout);
    let loses_state = end.loses_state();
    let (status, after) = match end {
        CellEnd::Finished(status) => (status, None),
        CellEnd::Interrupted => (
            ReplStatus::Timeout,
            Some(format!(
                "moat: the cell ran past its {timeout} timeout and was interrupted; the {name} \
                 session's state is kept"
            )),
        ),
        CellEnd::Killed => (
            ReplStatus::Timeout,
            Some(format!(
                "moat: the cell ran past its {timeout} timeout and did not stop when \
                 interrupted; the {name} interpreter was killed and its state (variables, \
                 imports) was lost"
            )),
        ),
        CellEnd::Died(how) => (
            ReplStatus::Error,
            Some(format!(
                "moat: the {name} interpreter exited during the cell ({how}); its state \
                 (variables, imports) was lost and the next cell starts a new one"
            )),
        ),
        CellEnd::DiedOnInterrupt(how) => (
            ReplStatus::Timeout,
            Some(format!(
                "moat: the cell ran past its {timeout} timeout and the {name} interpreter exited \
                 when interrupted ({how}); its state (variables, imports) was lost"
            )),
        ),
        CellEnd::Broken(why) => (
            ReplStatus::Error,
            Some(format!(
                "moat: the {name} session stopped working ({why}); the interpreter was killed \
                 and its state (variables, imports) was lost"
            )),
        ),
    };
    if loses_state {
        *slot = None;
        state_lost = true;
    }
    let mut output = before;
    output.extend(lines);
    output.extend(after.map(note));
    Ok(ReplResult {
        status: status as i32,
        output,
        dropped_bytes,
        state_lost,
    })
}
