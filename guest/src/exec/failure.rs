//! Results for commands that could not be started: exit code 127 (not
//! found) or 126 (anything else) and one `moat: ...` line on stderr.

use std::io;
use std::path::Path;

use moat_proto::agent::{ExecResult, OutputLine, Stream};

/// The result for a command that could not be started: `code` and one
/// stderr line.
fn not_started(code: i32, message: String) -> ExecResult {
    ExecResult {
        exit_code: code,
        output: vec![OutputLine {
            stream: Stream::Stderr as i32,
            text: message.into_bytes(),
        }],
        timed_out: false,
        dropped_bytes: 0,
    }
}

/// Text of `err` with its errno, e.g. "No such file or directory (os error 2)".
fn describe(err: &io::Error) -> String {
    match err.raw_os_error() {
        Some(_) => err.to_string(),
        // Errors made up in `resolve` carry no errno; show the usual text.
        None => io::Error::from_raw_os_error(match err.kind() {
            io::ErrorKind::NotFound => libc::ENOENT,
            _ => libc::EACCES,
        })
        .to_string(),
    }
}

/// `program` could not be executed: 127 if not found, else 126.
pub fn cannot_run(program: &str, err: &io::Error) -> ExecResult {
    let (code, hint) = match err.kind() {
        io::ErrorKind::NotFound => (127, "; check the command name and PATH"),
        io::ErrorKind::PermissionDenied => (126, "; check that it is an executable file"),
        _ => (126, ""),
    };
    let err = describe(err);
    not_started(code, format!("moat: cannot run {program:?}: {err}{hint}"))
}

/// The working directory is unusable: 126.
pub fn bad_workdir(dir: &Path, err: &io::Error) -> ExecResult {
    let err = describe(err);
    not_started(
        126,
        format!(
            "moat: cannot use working directory {:?}: {err}",
            dir.display().to_string()
        ),
    )
}
