//! `RunCommand`: checks a command request against the limits, builds the
//! guest Exec (environment and working directory from the sandbox's
//! definition), calls the agent and turns its result into the gRPC reply.

use std::time::Duration;

use moat_proto::agent::{self, guest_message, host_message, Exec};
use moat_proto::broker::{OutputLine, RunCommandReply, Stream};

use crate::agent::{unexpected, AgentClient, AgentError};
use crate::config::Limits;
use crate::error::BrokerError;

use super::spec::SandboxSpec;
use super::vm::ExitWatch;

/// Environment every command starts from; the sandbox's envs override it.
const BASE_ENV: [&str; 3] = [
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME=/root",
    "LANG=C.UTF-8",
];
/// Most arguments per command.
pub const MAX_ARGS: usize = 4096;
/// Extra time past the command's timeout before the broker gives up on the agent.
const AGENT_MARGIN: Duration = Duration::from_secs(15);

/// A command as the gateway asked for it (not yet checked).
#[derive(Debug, Clone)]
pub struct CommandRequest {
    pub command: String,
    pub args: Vec<String>,
    pub timeout_secs: Option<u32>,
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
        let size = self.command.len() + self.args.iter().map(String::len).sum::<usize>();
        if size > limits.max_request_bytes as usize {
            return bad(format!(
                "command and args total {size} bytes; the limit is {}",
                limits.max_request_bytes
            ));
        }
        let timeout = self
            .timeout_secs
            .unwrap_or(limits.default_command_timeout_secs);
        if timeout == 0 || timeout > limits.max_command_timeout_secs {
            return bad(format!(
                "timeout {timeout} s is outside the allowed range 1..={} s",
                limits.max_command_timeout_secs
            ));
        }
        Ok(timeout)
    }
}

/// The environment a command sees: base, then the sandbox's envs (a later
/// key replaces an earlier one).
pub fn command_env(spec: &SandboxSpec) -> Vec<String> {
    let mut env: Vec<String> = Vec::new();
    for e in BASE_ENV
        .iter()
        .map(|s| s.to_string())
        .chain(spec.envs.iter().cloned())
    {
        let key = e.split('=').next().unwrap_or_default().to_string();
        env.retain(|x| x.split('=').next() != Some(key.as_str()));
        env.push(e);
    }
    env
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
        env: command_env(spec),
        workdir: spec.workdir.clone().unwrap_or_else(|| "/".into()),
        timeout_ms: u64::from(timeout_secs) * 1000,
        max_output_bytes: limits.max_output_bytes,
    };
    let wait = Duration::from_secs(u64::from(timeout_secs)) + AGENT_MARGIN;
    let reply = agent
        .call(host_message::Body::Exec(exec), wait)
        .await
        .map_err(|e| {
            let vm_state = exit.borrow().clone();
            match (e, vm_state) {
                (_, Some(status)) => BrokerError::Failed(format!(
                    "the sandbox's VM is gone ({status}); stop the sandbox and start it again"
                )),
                (AgentError::Timeout(_), None) => BrokerError::Failed(format!(
                    "the guest agent did not report the command's end within {wait:?}"
                )),
                (e, None) => BrokerError::Failed(format!("command execution failed: {e}")),
            }
        })?;
    let result = match reply.body {
        Some(guest_message::Body::Exec(r)) => r,
        _ => return Err(BrokerError::Failed(unexpected(&reply).to_string())),
    };
    Ok(to_reply(result))
}

fn to_reply(r: agent::ExecResult) -> RunCommandReply {
    let output = r
        .output
        .into_iter()
        .map(|l| OutputLine {
            stream: match agent::Stream::try_from(l.stream) {
                Ok(agent::Stream::Stderr) => Stream::Stderr as i32,
                _ => Stream::Stdout as i32,
            },
            text: String::from_utf8_lossy(&l.text).into_owned(),
        })
        .collect();
    RunCommandReply {
        exit_code: r.exit_code,
        output,
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
            args: vec![],
            timeout_secs: timeout,
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
            timeout_secs: None,
        };
        assert!(big.check(&l).unwrap_err().to_string().contains("limit"));
    }

    #[test]
    fn sandbox_envs_override_the_base() {
        let spec = SandboxSpec {
            image_name: "base".into(),
            image_disk: "/x".into(),
            memory_mib: 512,
            cpus: 1,
            envs: vec!["PATH=/opt/bin".into(), "A=1".into(), "A=2".into()],
            workdir: None,
            shell: "/bin/sh".into(),
        };
        let env = command_env(&spec);
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
