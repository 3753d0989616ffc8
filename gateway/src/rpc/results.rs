//! The `result` values of the served methods, shaped as `contract.md` says:
//! the start/stop strings, and the `sandbox.command.run` object with its
//! output lines (or stdout text), joined stderr, and moat's own stderr lines
//! for a timeout or dropped output.

use moat_proto::broker::{RunCommandReply, Stream};
use serde_json::{json, Value};

use super::params::{OutputFormat, RunCommand};

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

/// `sandbox.command.run`'s result for `run`, from the broker's `reply`.
pub fn command(run: &RunCommand, reply: RunCommandReply) -> Value {
    let mut lines: Vec<(bool, String)> = reply
        .output
        .into_iter()
        .map(|line| (line.stream() == Stream::Stderr, line.text))
        .collect();
    if reply.dropped_bytes > 0 {
        lines.push((
            true,
            format!(
                "moat: output over the limit was cut: {} bytes dropped",
                reply.dropped_bytes
            ),
        ));
    }
    if reply.timed_out {
        let line = match run.request.timeout_secs {
            Some(secs) => format!("moat: command timed out after {secs} s and was killed"),
            None => "moat: command timed out (the default timeout) and was killed".to_owned(),
        };
        lines.push((true, line));
    }
    let exit_code = if reply.timed_out {
        TIMED_OUT_EXIT_CODE
    } else {
        reply.exit_code
    };
    let error = lines
        .iter()
        .filter(|(is_stderr, _)| *is_stderr)
        .map(|(_, text)| text.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    let output = match run.output_format {
        OutputFormat::Json => Value::Array(
            lines
                .into_iter()
                .map(|(is_stderr, text)| {
                    let stream = if is_stderr { "stderr" } else { "stdout" };
                    json!({ "stream": stream, "text": text })
                })
                .collect(),
        ),
        OutputFormat::Text => Value::String(
            lines
                .iter()
                .filter(|(is_stderr, _)| !*is_stderr)
                .map(|(_, text)| format!("{text}\n"))
                .collect(),
        ),
    };
    json!({
        "command": run.request.command,
        "args": run.request.args,
        "exit_code": exit_code,
        "success": exit_code == 0 && !reply.timed_out,
        "output": output,
        "error": error,
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
}
