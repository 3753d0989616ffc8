//! REPL tests against the build host's real interpreters: `python3` (the
//! real binary behind any pyenv shim) and `node` (or the directory named by
//! `MOAT_TEST_NODE_DIR`, e.g. to try Node 18). Each test has its own
//! [`Registry`], so sessions die with it.

mod node;
mod python;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;

use moat_proto::agent::{Repl, ReplResult, ReplStatus, Stream};

use super::Registry;
use crate::error::AgentError;

/// PATH for the interpreters under test.
fn test_path() -> &'static str {
    static PATH: OnceLock<String> = OnceLock::new();
    PATH.get_or_init(|| {
        let python = Command::new("python3")
            .args(["-c", "import sys; print(sys.executable)"])
            .output()
            .expect("python3 on the build host");
        let python = String::from_utf8(python.stdout).expect("utf-8");
        let python_dir = Path::new(python.trim())
            .parent()
            .expect("python3 directory")
            .display()
            .to_string();
        let node_dir = std::env::var("MOAT_TEST_NODE_DIR").unwrap_or_else(|_| "/usr/bin".into());
        format!("{node_dir}:{python_dir}:/usr/local/bin:/usr/bin:/bin")
    })
}

fn request(language: &str, code: &str, timeout_ms: u64) -> Repl {
    Repl {
        language: language.into(),
        code: code.into(),
        timeout_ms,
        max_output_bytes: 0,
        env: vec![
            format!("PATH={}", test_path()),
            "HOME=/root".into(),
            "LANG=C.UTF-8".into(),
        ],
        workdir: String::new(),
        user: String::new(),
    }
}

/// Runs one cell that must be accepted (no timeout unless given).
fn run(reg: &Registry, language: &str, code: &str) -> ReplResult {
    run_timeout(reg, language, code, 0)
}

fn run_timeout(reg: &Registry, language: &str, code: &str, timeout_ms: u64) -> ReplResult {
    reg.run(&request(language, code, timeout_ms))
        .unwrap_or_else(|e| panic!("cell {code:?} refused: {e}"))
}

fn status(r: &ReplResult) -> ReplStatus {
    ReplStatus::try_from(r.status).expect("a known status")
}

fn lines(r: &ReplResult) -> Vec<(&'static str, String)> {
    r.output
        .iter()
        .map(|l| {
            let stream = if l.stream == Stream::Stderr as i32 {
                "err"
            } else {
                "out"
            };
            (stream, String::from_utf8_lossy(&l.text).into_owned())
        })
        .collect()
}

fn stream_text(r: &ReplResult, stream: Stream) -> String {
    r.output
        .iter()
        .filter(|l| l.stream == stream as i32)
        .map(|l| String::from_utf8_lossy(&l.text).into_owned())
        .collect::<Vec<_>>()
        .join("\n")
}

fn stdout(r: &ReplResult) -> String {
    stream_text(r, Stream::Stdout)
}

fn stderr(r: &ReplResult) -> String {
    stream_text(r, Stream::Stderr)
}

/// Asserts success with exactly these stdout lines and no stderr.
fn assert_ok(r: &ReplResult, out: &[&str]) {
    let expected: Vec<(&str, String)> = out.iter().map(|l| ("out", (*l).to_owned())).collect();
    assert_eq!(lines(r), expected, "{r:?}");
    assert_eq!(status(r), ReplStatus::Success, "{r:?}");
    assert!(!r.state_lost);
    assert_eq!(r.dropped_bytes, 0);
}

/// Inodes of the session's three control pipes (for inheritance checks).
fn control_pipes(reg: &Registry, language: &str) -> Vec<String> {
    let slot = match language {
        "nodejs" => reg.nodejs.lock(),
        _ => reg.python.lock(),
    }
    .expect("slot");
    let session = slot.as_ref().expect("a running session");
    session
        .pipes
        .control_files()
        .iter()
        .map(|f| format!("pipe:[{}]", f.metadata().expect("fstat").ino()))
        .collect()
}

/// A missing interpreter is a request-level failure naming the fix.
fn assert_missing(language: &str, expected: &str) {
    let reg = Registry::new();
    let mut req = request(language, "1", 0);
    req.env = vec!["PATH=/nonexistent".into()];
    match reg.run(&req) {
        Err(AgentError::Unavailable(msg)) => assert!(msg.contains(expected), "{msg}"),
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

#[test]
fn unknown_language_is_refused() {
    let reg = Registry::new();
    let res = reg.run(&request("cobol", "DISPLAY 'HI'", 0));
    assert!(matches!(res, Err(AgentError::BadRequest(_))), "{res:?}");
}

#[test]
fn bad_workdir_is_a_failure() {
    let reg = Registry::new();
    let mut req = request("python", "1", 0);
    req.workdir = "/nonexistent/dir".into();
    let res = reg.run(&req);
    assert!(
        matches!(&res, Err(AgentError::Unavailable(m)) if m.contains("working directory")),
        "{res:?}"
    );
}

/// A cell much larger than a pipe's buffer goes through whole.
fn assert_large_cell(language: &str, print: &str) {
    let reg = Registry::new();
    let code = format!("s = '{}'\n{print}", "ab".repeat(1 << 20));
    let code = if language == "nodejs" {
        format!("var {code}")
    } else {
        code
    };
    assert_ok(&run(&reg, language, &code), &["2097152"]);
}

#[test]
fn large_cells_are_delivered_whole() {
    assert_large_cell("python", "print(len(s))");
    assert_large_cell("nodejs", "console.log(s.length)");
}

fn warm_request(languages: &[&str], env: Vec<String>) -> moat_proto::agent::Warm {
    moat_proto::agent::Warm {
        languages: languages.iter().map(|l| (*l).to_owned()).collect(),
        env,
        workdir: String::new(),
        user: String::new(),
    }
}

/// The pid of the warm Python interpreter `reg` holds.
fn warm_python_pid(reg: &Registry) -> String {
    let slot = reg.slot(&super::python::PYTHON);
    let session = slot.as_ref().expect("a warm session");
    session.pid.as_raw().to_string()
}

/// The pid of the interpreter a cell runs in.
fn interpreter_pid(reg: &Registry) -> String {
    stdout(&run(reg, "python", "import os; print(os.getpid())"))
}

#[test]
fn a_warm_interpreter_serves_a_first_cell_that_asks_for_what_it_was_started_with() {
    let reg = Registry::new();
    let env = request("python", "", 0).env;
    let started = reg.warm(&warm_request(&["python"], env)).expect("warm");
    assert_eq!(started.started, ["python"]);
    let warm_pid = warm_python_pid(&reg);
    let first = run(&reg, "python", "import os; print(os.getpid())");
    assert_ok(&first, &[&warm_pid]);
    assert!(!first.state_lost);
}

#[test]
fn a_warm_interpreter_started_with_other_env_is_replaced_at_the_first_cell() {
    let reg = Registry::new();
    let mut env = request("python", "", 0).env;
    env.push("FLAVOUR=pool".into());
    reg.warm(&warm_request(&["python"], env)).expect("warm");
    let warm_pid = warm_python_pid(&reg);
    let first = run(
        &reg,
        "python",
        "import os; print(os.getpid()); print(os.environ.get('FLAVOUR'))",
    );
    assert_eq!(status(&first), ReplStatus::Success, "{first:?}");
    let out = stdout(&first);
    assert!(!out.contains(&warm_pid), "{out}");
    assert!(out.ends_with("None"), "{out}");
    assert!(!first.state_lost, "nothing of the sandbox's was lost");
    assert_eq!(
        interpreter_pid(&reg),
        out.lines().next().unwrap_or_default()
    );
}

#[test]
fn a_warm_interpreter_that_died_is_replaced_without_a_note() {
    let reg = Registry::new();
    reg.warm(&warm_request(&["python"], request("python", "", 0).env))
        .expect("warm");
    {
        let slot = reg.slot(&super::python::PYTHON);
        let pid = slot.as_ref().expect("a warm session").pid;
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).expect("kill");
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    let first = run(&reg, "python", "print(6 * 7)");
    assert_ok(&first, &["42"]);
    assert!(!first.state_lost);
}

#[test]
fn warming_an_unknown_language_or_too_many_is_refused() {
    let reg = Registry::new();
    let env = request("python", "", 0).env;
    let err = reg
        .warm(&warm_request(&["cobol"], env.clone()))
        .expect_err("cobol");
    assert!(matches!(err, AgentError::BadRequest(_)), "{err}");
    let err = reg
        .warm(&warm_request(&["python", "nodejs", "python"], env))
        .expect_err("three");
    assert!(err.to_string().contains("two"), "{err}");
}
