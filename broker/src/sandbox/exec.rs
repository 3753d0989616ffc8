//! `RunCommand` and `RunRepl`: check a request against the limits, build the
//! guest's Exec/Repl (environment and working directory from the sandbox's
//! definition, then the call's overrides), call the agent and turn its result
//! into the gRPC reply. The agent's answer is bounded by the frame cap and by
//! a deadline of the call's timeout plus a margin.

use std::sync::Arc;
use std::time::Duration;

use moat_proto::agent::{self, guest_message, host_message, Exec, Repl};
use moat_proto::broker::{OutputLine, ReplStatus, RunCommandReply, RunReplReply, Stream};

use crate::agent::{unexpected, AgentClient, AgentError};
use crate::config::Limits;
use crate::error::BrokerError;

use super::spec::{check_env, check_path, SandboxSpec, MAX_ENVS};
use super::vm::ExitWatch;

/// Environment every command starts from; the sandbox's envs override it.
const BASE_ENV: [&str; 3] = [
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME=/root",
    "LANG=C.UTF-8",
];
/// Most arguments per command.
pub const MAX_ARGS: usize = 4096;
/// Extra time past a command's timeout before the broker gives up on the
/// agent (the kill and the drain of escaped pipes take well under this).
const COMMAND_MARGIN: Duration = Duration::from_secs(15);
/// Extra time past a cell's timeout: the agent may first have to start the
/// interpreter (up to 30 s under TCG on a busy host), then interrupt (2 s
/// grace), kill and reap (1 s).
const REPL_MARGIN: Duration = Duration::from_secs(40);

/// A command as the gateway asked for it (not yet checked).
#[derive(Debug, Clone, Default)]
pub struct CommandRequest {
    pub command: String,
    pub args: Vec<String>,
    pub timeout_secs: Option<u32>,
    /// Added to the sandbox's envs for this call.
    pub envs: Vec<String>,
    /// Replaces the sandbox's workdir for this call.
    pub workdir: Option<String>,
}

/// Per-language turns for REPL cells in one sandbox.
#[derive(Debug, Clone, Default)]
pub struct ReplSessions {
    python: Arc<tokio::sync::Mutex<()>>,
    nodejs: Arc<tokio::sync::Mutex<()>>,
}

impl ReplSessions {
    fn turn(&self, language: &str) -> Arc<tokio::sync::Mutex<()>> {
        match language {
            "python" => self.python.clone(),
            _ => self.nodejs.clone(),
        }
    }
}

/// A REPL cell as the gateway asked for it (not yet checked).
#[derive(Debug, Clone)]
pub struct ReplRequest {
    pub language: String,
    pub code: String,
    pub timeout_secs: Option<u32>,
}

fn check_timeout(timeout_secs: Option<u32>, limits: &Limits) -> Result<u32, BrokerError> {
    let timeout = timeout_secs.unwrap_or(limits.default_command_timeout_secs);
    if timeout == 0 || timeout > limits.max_command_timeout_secs {
        return Err(BrokerError::InvalidArgument(format!(
            "timeout {timeout} s is outside the allowed range 1..={} s",
            limits.max_command_timeout_secs
        )));
    }
    Ok(timeout)
}

impl ReplRequest {
    /// Returns (session language, timeout secs).
    fn check(&self, limits: &Limits) -> Result<(&'static str, u32), BrokerError> {
        let bad = |m: String| Err(BrokerError::InvalidArgument(m));
        let Some(language) = moat_proto::languages::session_language(&self.language) else {
            return bad(format!(
                "language {:?} is not supported; use one of: {}",
                self.language.chars().take(32).collect::<String>(),
                moat_proto::languages::accepted()
            ));
        };
        if self.code.len() > limits.max_code_bytes as usize {
            return bad(format!(
                "code is {} bytes; the limit is {} bytes",
                self.code.len(),
                limits.max_code_bytes
            ));
        }
        Ok((language, check_timeout(self.timeout_secs, limits)?))
    }
}

impl CommandRequest {
    fn check(&self, limits: &Limits) -> Result<u32, BrokerError> {
        let bad = |m: String| Err(BrokerError::InvalidArgument(m));
        if self.command.is_empty() {
            return bad("command cannot be empty".into());
        }
        if self.command.contains('\0') || self.args.iter().any(|a| a.contains('\0')) {
            return bad("command and args cannot contain NUL bytes".into());
        }
        if self.args.len() > MAX_ARGS {
            return bad(format!(
                "{} args given; the limit is {MAX_ARGS}",
                self.args.len()
            ));
        }
        let size = self.command.len()
            + self.args.iter().map(String::len).sum::<usize>()
            + self.envs.iter().map(String::len).sum::<usize>();
        if size > limits.max_request_bytes as usize {
            return bad(format!(
                "command, args and envs total {size} bytes; the limit is {}",
                limits.max_request_bytes
            ));
        }
        if self.envs.len() > MAX_ENVS {
            return bad(format!(
                "{} envs given; the limit is {MAX_ENVS}",
                self.envs.len()
            ));
        }
        for e in &self.envs {
            check_env(e).map_err(|e| BrokerError::InvalidArgument(e.to_string()))?;
        }
        if let Some(w) = &self.workdir {
            check_path("workdir", w).map_err(|e| BrokerError::InvalidArgument(e.to_string()))?;
        }
        check_timeout(self.timeout_secs, limits)
    }
}

/// The environment a process in the sandbox sees: base, then the sandbox's
/// envs, then the call's (a later key replaces an earlier one).
pub fn command_env(spec: &SandboxSpec, call_envs: &[String]) -> Vec<String> {
    let all: Vec<&str> = BASE_ENV
        .iter()
        .copied()
        .chain(spec.envs.iter().map(String::as_str))
        .chain(call_envs.iter().map(String::as_str))
        .collect();
    // Each key keeps its last value, at the place of that last occurrence
    // (linear: the lists can be long).
    let key = |e: &str| e.split('=').next().unwrap_or_default().to_owned();
    let last: std::collections::HashMap<String, usize> =
        all.iter().enumerate().map(|(i, e)| (key(e), i)).collect();
    all.iter()
        .enumerate()
        .filter(|(i, e)| last.get(&key(e)) == Some(i))
        .map(|(_, e)| (*e).to_owned())
        .collect()
}

pub async fn run(
    limits: &Limits,
    agent: &AgentClient,
    spec: &SandboxSpec,
    exit: &ExitWatch,
    req: CommandRequest,
) -> Result<RunCommandReply, BrokerError> {
    let timeout_secs = req.check(limits)?;
    let exec = Exec {
        program: req.command,
        args: req.args,
        env: command_env(spec, &req.envs),
        workdir: req
            .workdir
            .or_else(|| spec.workdir.clone())
            .unwrap_or_else(|| "/".into()),
        timeout_ms: u64::from(timeout_secs) * 1000,
        max_output_bytes: limits.max_output_bytes,
        user: spec.user.clone().unwrap_or_default(),
    };
    let wait = Duration::from_secs(u64::from(timeout_secs)) + COMMAND_MARGIN;
    let reply = call(agent, exit, host_message::Body::Exec(exec), wait, "command").await?;
    match reply.body {
        Some(guest_message::Body::Exec(r)) => Ok(to_reply(r)),
        _ => Err(BrokerError::Failed(unexpected(&reply).to_string())),
    }
}

pub async fn run_repl(
    limits: &Limits,
    agent: &AgentClient,
    spec: &SandboxSpec,
    exit: &ExitWatch,
    sessions: &ReplSessions,
    req: ReplRequest,
) -> Result<RunReplReply, BrokerError> {
    let (language, timeout_secs) = req.check(limits)?;
    let session = sessions.turn(language);
    let repl = Repl {
        language: language.to_string(),
        code: req.code,
        timeout_ms: u64::from(timeout_secs) * 1000,
        max_output_bytes: limits.max_output_bytes,
        env: command_env(spec, &[]),
        workdir: spec.workdir.clone().unwrap_or_else(|| "/".into()),
        user: spec.user.clone().unwrap_or_default(),
    };
    // One cell per language at a time: the agent runs them in turn, so the
    // deadline starts when this cell's turn comes.
    let _turn = session.lock().await;
    let wait = Duration::from_secs(u64::from(timeout_secs)) + REPL_MARGIN;
    let reply = call(agent, exit, host_message::Body::Repl(repl), wait, "code").await?;
    let r = match reply.body {
        Some(guest_message::Body::Repl(r)) => r,
        _ => return Err(BrokerError::Failed(unexpected(&reply).to_string())),
    };
    let status = match agent::ReplStatus::try_from(r.status) {
        Ok(agent::ReplStatus::Success) => ReplStatus::Success,
        Ok(agent::ReplStatus::Timeout) => ReplStatus::Timeout,
        _ => ReplStatus::Error,
    };
    Ok(RunReplReply {
        status: status as i32,
        language: language.to_string(),
        output: to_lines(r.output),
        dropped_bytes: r.dropped_bytes,
        state_lost: r.state_lost,
    })
}

/// Sends one request and waits for it up to its timeout plus the margin;
/// failures say whether the VM itself is gone.
async fn call(
    agent: &AgentClient,
    exit: &ExitWatch,
    body: host_message::Body,
    wait: Duration,
    what: &str,
) -> Result<agent::GuestMessage, BrokerError> {
    agent.call(body, wait).await.map_err(|e| {
        let vm_state = exit.borrow().clone();
        match (e, vm_state) {
            (_, Some(status)) => BrokerError::Failed(format!(
                "the sandbox's VM is gone ({status}); stop the sandbox and start it again"
            )),
            (AgentError::Timeout(_), None) => BrokerError::Failed(format!(
                "the guest agent stopped answering: it did not report the {what}'s end within {wait:?} (its timeout plus a margin); if this repeats the sandbox is wedged: stop it and start it again"
            )),
            (AgentError::Refused(m), None) => BrokerError::Failed(m),
            (e, None) => BrokerError::Failed(format!("{what} execution failed: {e}")),
        }
    })
}

fn to_lines(lines: Vec<agent::OutputLine>) -> Vec<OutputLine> {
    lines
        .into_iter()
        .map(|l| OutputLine {
            stream: match agent::Stream::try_from(l.stream) {
                Ok(agent::Stream::Stderr) => Stream::Stderr as i32,
                _ => Stream::Stdout as i32,
            },
            text: String::from_utf8_lossy(&l.text).into_owned(),
        })
        .collect()
}

fn to_reply(r: agent::ExecResult) -> RunCommandReply {
    RunCommandReply {
        exit_code: r.exit_code,
        output: to_lines(r.output),
        timed_out: r.timed_out,
        dropped_bytes: r.dropped_bytes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(cmd: &str, timeout: Option<u32>) -> CommandRequest {
        CommandRequest {
            command: cmd.into(),
            timeout_secs: timeout,
            ..Default::default()
        }
    }

    #[test]
    fn timeouts_and_sizes_are_checked() {
        let l = Limits::default();
        assert_eq!(req("ls", None).check(&l).unwrap(), 30);
        assert!(req("ls", Some(0)).check(&l).is_err());
        let e = req("ls", Some(l.max_command_timeout_secs + 1))
            .check(&l)
            .unwrap_err();
        assert!(e.to_string().contains("timeout"), "{e}");
        assert!(req("", None).check(&l).is_err());
        assert!(req("a\0b", None).check(&l).is_err());
        let big = CommandRequest {
            command: "x".into(),
            args: vec!["y".repeat(300 << 10)],
            ..Default::default()
        };
        assert!(big.check(&l).unwrap_err().to_string().contains("limit"));
        let bad_env = CommandRequest {
            command: "x".into(),
            envs: vec!["1=2".into()],
            ..Default::default()
        };
        assert!(bad_env
            .check(&l)
            .unwrap_err()
            .to_string()
            .contains("env key"));
        let bad_dir = CommandRequest {
            command: "x".into(),
            workdir: Some("rel".into()),
            ..Default::default()
        };
        assert!(bad_dir
            .check(&l)
            .unwrap_err()
            .to_string()
            .contains("workdir"));
    }

    #[test]
    fn repl_languages_and_code_size_are_checked() {
        let l = Limits::default();
        let r = |lang: &str, code: &str| ReplRequest {
            language: lang.into(),
            code: code.into(),
            timeout_secs: None,
        };
        assert_eq!(r("python", "1").check(&l).unwrap(), ("python", 30));
        assert_eq!(r("node", "1").check(&l).unwrap().0, "nodejs");
        assert_eq!(r("javascript", "1").check(&l).unwrap().0, "nodejs");
        let e = r("ruby", "1").check(&l).unwrap_err().to_string();
        assert!(e.contains("ruby") && e.contains("python"), "{e}");
        let too_big = "x".repeat(l.max_code_bytes as usize + 1);
        let e = r("python", &too_big).check(&l).unwrap_err().to_string();
        assert!(e.contains("limit"), "{e}");
    }

    #[test]
    fn sandbox_envs_override_the_base() {
        let spec = SandboxSpec {
            image_name: "base".into(),
            image: super::super::spec::ImageSource::Local("/x".into()),
            memory_mib: 512,
            cpus: 1,
            envs: vec!["PATH=/opt/bin".into(), "A=1".into(), "A=2".into()],
            workdir: None,
            shell: "/bin/sh".into(),
            scripts: Default::default(),
            exec: None,
            user: None,
            volumes: Vec::new(),
            volume_strings: Vec::new(),
            scope: crate::network::firewall::Scope::None,
            ports: Vec::new(),
            depends_on: Vec::new(),
        };
        let env = command_env(&spec, &["B=call".into()]);
        assert!(env.contains(&"B=call".to_string()));
        assert!(env.contains(&"PATH=/opt/bin".to_string()));
        assert!(env.contains(&"A=2".to_string()) && !env.contains(&"A=1".to_string()));
        assert!(env.contains(&"HOME=/root".to_string()));
    }

    #[test]
    fn guest_bytes_become_lossy_text_and_streams_map() {
        let r = to_reply(agent::ExecResult {
            exit_code: 3,
            output: vec![
                agent::OutputLine {
                    stream: agent::Stream::Stderr as i32,
                    text: b"bad \xff".to_vec(),
                },
                agent::OutputLine {
                    stream: 99,
                    text: b"weird".to_vec(),
                },
            ],
            timed_out: false,
            dropped_bytes: 0,
        });
        assert_eq!(r.output[0].stream, Stream::Stderr as i32);
        assert_eq!(r.output[0].text, "bad \u{fffd}");
        assert_eq!(r.output[1].stream, Stream::Stdout as i32);
    }
}
