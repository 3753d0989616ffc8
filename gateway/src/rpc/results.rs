//! The `result` values of the served methods, shaped as `contract.md` says:
//! the start/stop strings, and the `sandbox.command.run` object with its
//! output lines (or stdout text), joined stderr, and moat's own stderr lines
//! for a timeout or dropped output.

use moat_proto::broker::{
    GetMetricsReply, OutputLine, ReplStatus, RunCommandReply, RunReplReply, Stream,
};
use serde_json::{json, Value};

use super::params::{OutputFormat, RunCommand, RunRepl};

/// Exit code reported for a command killed at its timeout (128 + SIGKILL).
pub const TIMED_OUT_EXIT_CODE: i32 = 137;

/// `sandbox.start`'s result.
pub fn started(name: &str) -> Value {
    Value::String(format!("Sandbox {name} started successfully"))
}

/// `sandbox.stop`'s result.
pub fn stopped(name: &str) -> Value {
    Value::String(format!("Sandbox {name} stopped successfully"))
}

/// `sandbox.metrics.get`'s result: `{"sandboxes": [...]}`, `null` where the
/// broker does not know a value.
pub fn metrics(reply: GetMetricsReply) -> Value {
    let sandboxes: Vec<Value> = reply
        .sandboxes
        .into_iter()
        .map(|s| {
            json!({
                "namespace": s.namespace,
                "name": s.name,
                "running": s.running,
                "cpu_usage": s.cpu_usage,
                "memory_usage": s.memory_usage_mib,
                "disk_usage": s.disk_usage_bytes,
                "scope": s.scope,
                "ports": s.ports,
                "volumes": s.volumes,
                "address": s.address,
                "started_at_ms": s.started_at_ms,
            })
        })
        .collect();
    json!({ "sandboxes": sandboxes })
}

/// Output lines as (is_stderr, text), with moat's own notes appended.
struct Lines(Vec<(bool, String)>);

impl Lines {
    fn new(output: Vec<OutputLine>, dropped_bytes: u64) -> Self {
        let mut lines: Vec<(bool, String)> = output
            .into_iter()
            .map(|line| (line.stream() == Stream::Stderr, line.text))
            .collect();
        if dropped_bytes > 0 {
            lines.push((
                true,
                format!("moat: output over the limit was cut: {dropped_bytes} bytes dropped"),
            ));
        }
        Self(lines)
    }

    fn note(&mut self, text: String) {
        self.0.push((true, text));
    }

    fn has_stderr(&self) -> bool {
        self.0.iter().any(|(is_stderr, _)| *is_stderr)
    }

    /// All stderr text joined with newlines.
    fn error(&self) -> String {
        self.0
            .iter()
            .filter(|(is_stderr, _)| *is_stderr)
            .map(|(_, text)| text.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// `output` in the requested format.
    fn output(self, format: OutputFormat) -> Value {
        match format {
            OutputFormat::Json => Value::Array(
                self.0
                    .into_iter()
                    .map(|(is_stderr, text)| {
                        let stream = if is_stderr { "stderr" } else { "stdout" };
                        json!({ "stream": stream, "text": text })
                    })
                    .collect(),
            ),
            OutputFormat::Text => Value::String(
                self.0
                    .iter()
                    .filter(|(is_stderr, _)| !*is_stderr)
                    .map(|(_, text)| format!("{text}\n"))
                    .collect(),
            ),
        }
    }
}

/// `sandbox.command.run`'s result for `run`, from the broker's `reply`.
pub fn command(run: &RunCommand, reply: RunCommandReply) -> Value {
    let mut lines = Lines::new(reply.output, reply.dropped_bytes);
    if reply.timed_out {
        lines.note(match run.request.timeout_secs {
            Some(secs) => format!("moat: command timed out after {secs} s and was killed"),
            None => "moat: command timed out (the default timeout) and was killed".to_owned(),
        });
    }
    let exit_code = if reply.timed_out {
        TIMED_OUT_EXIT_CODE
    } else {
        reply.exit_code
    };
    let error = lines.error();
    json!({
        "command": run.request.command,
        "args": run.request.args,
        "exit_code": exit_code,
        "success": exit_code == 0 && !reply.timed_out,
        "output": lines.output(run.output_format),
        "error": error,
    })
}

/// `sandbox.repl.run`'s result for `run`, from the broker's `reply`.
pub fn repl(run: &RunRepl, reply: RunReplReply) -> Value {
    let repl_status = reply.status();
    let mut lines = Lines::new(reply.output, reply.dropped_bytes);
    let status = match repl_status {
        ReplStatus::Success => "success",
        ReplStatus::Timeout => "timeout",
        ReplStatus::Error | ReplStatus::Unspecified => "error",
    };
    if repl_status == ReplStatus::Timeout {
        lines.note(match run.request.timeout_secs {
            Some(secs) => format!("moat: execution timed out after {secs} s and was interrupted"),
            None => {
                "moat: execution timed out (the default timeout) and was interrupted".to_owned()
            }
        });
    }
    if reply.state_lost {
        lines.note(
            "moat: the interpreter was restarted; variables, imports and functions from earlier calls are gone"
                .to_owned(),
        );
    }
    let has_error = status != "success" || lines.has_stderr();
    let error = lines.error();
    json!({
        "status": status,
        "language": reply.language,
        "output": lines.output(run.output_format),
        "error": error,
        "has_error": has_error,
        "state_lost": reply.state_lost,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use moat_proto::broker::{OutputLine, RunCommandRequest};

    fn run(format: OutputFormat, timeout_secs: Option<u32>) -> RunCommand {
        RunCommand {
            request: RunCommandRequest {
                sandbox: None,
                command: "sh".to_owned(),
                args: vec!["-c".to_owned(), "x".to_owned()],
                timeout_secs,
                envs: vec![],
                workdir: None,
                caller: None,
            },
            output_format: format,
        }
    }

    fn line(stream: Stream, text: &str) -> OutputLine {
        OutputLine {
            stream: stream as i32,
            text: text.to_owned(),
        }
    }

    fn reply(exit_code: i32) -> RunCommandReply {
        RunCommandReply {
            exit_code,
            output: vec![
                line(Stream::Stdout, "one"),
                line(Stream::Stderr, "warn a"),
                line(Stream::Stdout, "two"),
                line(Stream::Stderr, "warn b"),
            ],
            timed_out: false,
            dropped_bytes: 0,
        }
    }

    #[test]
    fn metrics_shape_with_nulls_for_unknown() {
        use moat_proto::broker::SandboxMetrics;
        let reply = GetMetricsReply {
            sandboxes: vec![
                SandboxMetrics {
                    namespace: "a".into(),
                    name: "x".into(),
                    running: true,
                    cpu_usage: Some(15.5),
                    memory_usage_mib: Some(256.0),
                    disk_usage_bytes: Some(1_048_576),
                    scope: "public".into(),
                    ports: vec!["8080:8000".into()],
                    volumes: vec!["data:/data".into()],
                    started_at_ms: Some(1_700_000_000_000),
                    address: Some("10.213.0.2".into()),
                },
                SandboxMetrics {
                    namespace: "a".into(),
                    name: "y".into(),
                    running: false,
                    cpu_usage: None,
                    memory_usage_mib: None,
                    disk_usage_bytes: None,
                    scope: "none".into(),
                    ..Default::default()
                },
            ],
        };
        assert_eq!(
            metrics(reply),
            json!({"sandboxes": [
                {"namespace": "a", "name": "x", "running": true, "cpu_usage": 15.5,
                 "memory_usage": 256.0, "disk_usage": 1_048_576, "scope": "public",
                 "ports": ["8080:8000"], "volumes": ["data:/data"], "address": "10.213.0.2",
                 "started_at_ms": 1_700_000_000_000u64},
                {"namespace": "a", "name": "y", "running": false, "cpu_usage": null,
                 "memory_usage": null, "disk_usage": null, "scope": "none", "ports": [],
                 "volumes": [], "address": null, "started_at_ms": null},
            ]})
        );
        assert_eq!(
            metrics(GetMetricsReply::default()),
            json!({"sandboxes": []})
        );
    }

    #[test]
    fn start_and_stop_strings() {
        assert_eq!(started("py"), json!("Sandbox py started successfully"));
        assert_eq!(stopped("py"), json!("Sandbox py stopped successfully"));
    }

    #[test]
    fn json_output_keeps_every_line_in_order() {
        let result = command(&run(OutputFormat::Json, None), reply(0));
        assert_eq!(
            result,
            json!({
                "command": "sh", "args": ["-c", "x"], "exit_code": 0, "success": true,
                "output": [
                    {"stream": "stdout", "text": "one"},
                    {"stream": "stderr", "text": "warn a"},
                    {"stream": "stdout", "text": "two"},
                    {"stream": "stderr", "text": "warn b"},
                ],
                "error": "warn a\nwarn b",
            })
        );
    }

    #[test]
    fn nonzero_exit_is_not_success() {
        let result = command(&run(OutputFormat::Json, None), reply(2));
        assert_eq!(result["exit_code"], json!(2));
        assert_eq!(result["success"], json!(false));
    }

    #[test]
    fn text_output_is_stdout_lines_each_with_newline() {
        let result = command(&run(OutputFormat::Text, None), reply(0));
        assert_eq!(result["output"], json!("one\ntwo\n"));
        assert_eq!(result["error"], json!("warn a\nwarn b"));

        let empty = RunCommandReply::default();
        let result = command(&run(OutputFormat::Text, None), empty);
        assert_eq!(result["output"], json!(""));
        assert_eq!(result["error"], json!(""));
    }

    #[test]
    fn timed_out_is_a_result_with_137_and_a_final_stderr_line() {
        let mut r = reply(0);
        r.timed_out = true;
        let result = command(&run(OutputFormat::Json, Some(5)), r);
        assert_eq!(result["exit_code"], json!(137));
        assert_eq!(result["success"], json!(false));
        let output = result["output"].as_array().unwrap();
        assert_eq!(
            output.last().unwrap(),
            &json!({"stream": "stderr", "text": "moat: command timed out after 5 s and was killed"})
        );
        assert_eq!(
            result["error"],
            json!("warn a\nwarn b\nmoat: command timed out after 5 s and was killed")
        );
    }

    #[test]
    fn dropped_bytes_add_a_final_stderr_line() {
        let mut r = reply(0);
        r.dropped_bytes = 4096;
        let result = command(&run(OutputFormat::Json, None), r);
        assert_eq!(result["success"], json!(true));
        let last = result["output"].as_array().unwrap().last().unwrap().clone();
        assert_eq!(last["stream"], json!("stderr"));
        assert!(last["text"]
            .as_str()
            .unwrap()
            .contains("4096 bytes dropped"));
        assert!(result["error"]
            .as_str()
            .unwrap()
            .ends_with("4096 bytes dropped"));

        let mut r = reply(0);
        r.dropped_bytes = 10;
        let result = command(&run(OutputFormat::Text, None), r);
        assert_eq!(result["output"], json!("one\ntwo\n"));
        assert!(result["error"]
            .as_str()
            .unwrap()
            .contains("10 bytes dropped"));
    }

    #[test]
    fn unspecified_stream_counts_as_stdout() {
        let r = RunCommandReply {
            output: vec![line(Stream::Unspecified, "x")],
            ..RunCommandReply::default()
        };
        let result = command(&run(OutputFormat::Json, None), r);
        assert_eq!(result["output"], json!([{"stream": "stdout", "text": "x"}]));
    }

    fn repl_run(timeout_secs: Option<u32>) -> RunRepl {
        RunRepl {
            request: moat_proto::broker::RunReplRequest {
                sandbox: None,
                language: "python".to_owned(),
                code: "x".to_owned(),
                timeout_secs,
                caller: None,
            },
            output_format: OutputFormat::Json,
        }
    }

    fn repl_reply(status: ReplStatus, state_lost: bool) -> RunReplReply {
        RunReplReply {
            status: status as i32,
            language: "python".to_owned(),
            output: vec![line(Stream::Stdout, "hi")],
            dropped_bytes: 0,
            state_lost,
        }
    }

    #[test]
    fn repl_success_without_stderr_has_no_error() {
        let v = repl(&repl_run(None), repl_reply(ReplStatus::Success, false));
        assert_eq!(v["status"], "success");
        assert_eq!(v["has_error"], false);
        assert_eq!(v["error"], "");
        assert_eq!(v["language"], "python");
        assert_eq!(v["output"], json!([{"stream": "stdout", "text": "hi"}]));
    }

    #[test]
    fn repl_timeout_with_lost_state_says_both() {
        let v = repl(&repl_run(Some(2)), repl_reply(ReplStatus::Timeout, true));
        assert_eq!(v["status"], "timeout");
        assert_eq!(v["has_error"], true);
        assert_eq!(v["state_lost"], true);
        let error = v["error"].as_str().unwrap();
        assert!(error.contains("timed out after 2 s"), "{error}");
        assert!(error.contains("restarted"), "{error}");
    }

    #[test]
    fn repl_success_with_stderr_has_error() {
        let mut reply = repl_reply(ReplStatus::Success, false);
        reply.output.push(line(Stream::Stderr, "warning"));
        let v = repl(&repl_run(None), reply);
        assert_eq!(v["status"], "success");
        assert_eq!(v["has_error"], true);
        assert_eq!(v["error"], "warning");
    }
}
