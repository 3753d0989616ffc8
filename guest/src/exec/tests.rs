//! Tests of command execution against real processes on the build host
//! (`sh`, `sleep`, `setsid`, `yes`, `head`, `env`, `printf`, `pwd`).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use moat_proto::agent::{Exec, ExecResult, Stream};
use nix::sys::signal::Signal;
use nix::unistd::Pid;

use super::*;
use crate::error::AgentError;

const PATH: &str = "PATH=/usr/local/bin:/usr/bin:/bin";

fn req(program: &str, args: &[&str]) -> Exec {
    Exec {
        program: program.to_owned(),
        args: args.iter().map(|s| (*s).to_owned()).collect(),
        env: vec![PATH.to_owned()],
        ..Exec::default()
    }
}

fn sh(script: &str) -> Exec {
    req("sh", &["-c", script])
}

fn lines(r: &ExecResult) -> Vec<(&'static str, String)> {
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

fn run_ok(r: &Exec) -> ExecResult {
    run(r).expect("request accepted")
}

/// Whether `pid` is gone or a zombie (dead, waiting for its reaper).
fn dead(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X')),
    }
}

fn eventually_dead(pid: i32) -> bool {
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        if dead(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[test]
fn stdout_and_stderr_lines_in_arrival_order_with_exit_code() {
    let r = run_ok(&sh(
        "echo out1; sleep 0.1; echo err1 >&2; sleep 0.1; echo out2; sleep 0.1; \
         printf 'err2-partial' >&2; exit 3",
    ));
    assert_eq!(
        lines(&r),
        vec![
            ("out", "out1".into()),
            ("err", "err1".into()),
            ("out", "out2".into()),
            ("err", "err2-partial".into()),
        ]
    );
    assert_eq!(r.exit_code, 3);
    assert!(!r.timed_out);
    assert_eq!(r.dropped_bytes, 0);
}

#[test]
fn partial_last_line_is_emitted() {
    let r = run_ok(&req("printf", &["a\\n\\nb"]));
    assert_eq!(
        lines(&r),
        vec![("out", "a".into()), ("out", "".into()), ("out", "b".into())]
    );
    assert_eq!(r.exit_code, 0);
}

#[test]
fn timeout_kills_the_whole_process_group() {
    let mut r = sh("sleep 30 & echo $!; wait");
    r.timeout_ms = 300;
    let start = Instant::now();
    let res = run_ok(&r);
    let took = start.elapsed();
    assert!(res.timed_out);
    assert_eq!(res.exit_code, 137);
    assert!(took >= Duration::from_millis(300), "{took:?}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    let out = lines(&res);
    assert_eq!(out.len(), 1, "{out:?}");
    let pid: i32 = out[0].1.parse().expect("background pid");
    assert!(
        eventually_dead(pid),
        "background sleep {pid} survived the timeout"
    );
}

#[test]
fn escaped_grandchild_holding_the_pipes_does_not_hang() {
    // `setsid` leaves the process group; the sleep keeps stdout open.
    let mut r = sh("setsid sleep 30 & echo $!; sleep 30");
    r.timeout_ms = 200;
    let start = Instant::now();
    let res = run_ok(&r);
    let took = start.elapsed();
    let out = lines(&res);
    let pid: i32 = out
        .first()
        .and_then(|(_, p)| p.parse().ok())
        .expect("pid line");
    let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
    assert!(res.timed_out);
    assert_eq!(res.exit_code, 137);
    assert!(took < Duration::from_secs(2), "took {took:?}");

    // Same without a timeout: the command exits, the grandchild lingers.
    let start = Instant::now();
    let res = run_ok(&sh("setsid sleep 30 & echo $!; echo bye"));
    let took = start.elapsed();
    let out = lines(&res);
    let pid: i32 = out
        .first()
        .and_then(|(_, p)| p.parse().ok())
        .expect("pid line");
    let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
    assert_eq!(out.get(1), Some(&("out", "bye".to_owned())));
    assert_eq!(res.exit_code, 0);
    assert!(!res.timed_out);
    assert!(took < Duration::from_secs(2), "took {took:?}");
}

#[test]
fn output_cap_keeps_the_first_bytes_and_counts_the_rest() {
    let mut r = sh("yes hello | head -n 10000; echo tail >&2");
    r.max_output_bytes = 1000;
    let res = run_ok(&r);
    assert_eq!(res.exit_code, 0);
    // 10000 * "hello\n" + "tail\n" = 60005 bytes, 1000 kept.
    assert_eq!(res.dropped_bytes, 60_005 - 1000);
    let kept: usize = res.output.iter().map(|l| l.text.len()).sum::<usize>();
    // 166 full lines (with newline) + "hell" truncated.
    assert_eq!(res.output.len(), 167);
    assert_eq!(kept + 166, 1000);
    assert_eq!(res.output[0].text, b"hello");
    assert_eq!(res.output[166].text, b"hell");
    assert!(res.output.iter().all(|l| l.stream == Stream::Stdout as i32));
}

#[test]
fn default_cap_applies_when_zero() {
    let res = run_ok(&sh("head -c 1100000 /dev/zero"));
    assert_eq!(res.dropped_bytes, 1_100_000 - DEFAULT_MAX_OUTPUT);
}

#[test]
fn missing_program_is_127_with_a_reason() {
    let res = run_ok(&req("definitely-not-a-command-moat", &[]));
    assert_eq!(res.exit_code, 127);
    assert_eq!(
        lines(&res),
        vec![(
            "err",
            "moat: cannot run \"definitely-not-a-command-moat\": No such file or directory \
             (os error 2); check the command name and PATH"
                .into()
        )]
    );
    let res = run_ok(&req("/nonexistent/prog", &[]));
    assert_eq!(res.exit_code, 127);
    // PATH comes from the request's env: without /bin, no `sh`.
    let mut r = sh("true");
    r.env = vec!["PATH=/nonexistent".to_owned()];
    assert_eq!(run_ok(&r).exit_code, 127);
}

#[test]
fn non_executable_file_is_126() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("script");
    fs::write(&file, "#!/bin/sh\necho hi\n").expect("write");
    fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).expect("chmod");
    let res = run_ok(&req(file.to_str().expect("utf-8"), &[]));
    assert_eq!(res.exit_code, 126, "{:?}", lines(&res));
    assert!(
        lines(&res)[0].1.contains("Permission denied"),
        "{:?}",
        lines(&res)
    );
    // Same through PATH lookup.
    let mut r = req("script", &[]);
    r.env = vec![format!("PATH={}", dir.path().display())];
    assert_eq!(run_ok(&r).exit_code, 126);
}

#[test]
fn env_path_and_workdir_are_applied() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bin = dir.path().join("bin");
    fs::create_dir(&bin).expect("mkdir");
    let tool = bin.join("mytool");
    fs::write(
        &tool,
        "#!/bin/sh\necho \"mytool in $(pwd) FOO=$FOO HOME=${HOME-unset}\"\n",
    )
    .expect("write");
    fs::set_permissions(&tool, fs::Permissions::from_mode(0o755)).expect("chmod");
    let r = Exec {
        program: "mytool".into(),
        env: vec![
            format!("PATH={}:/usr/bin:/bin", bin.display()),
            "FOO=bar baz".into(),
        ],
        workdir: dir.path().to_string_lossy().into_owned(),
        ..Exec::default()
    };
    let res = run_ok(&r);
    assert_eq!(
        lines(&res),
        vec![(
            "out",
            format!("mytool in {} FOO=bar baz HOME=unset", dir.path().display())
        )]
    );
    assert_eq!(res.exit_code, 0);
    // Empty workdir means "/".
    assert_eq!(lines(&run_ok(&req("pwd", &[]))), vec![("out", "/".into())]);
}

#[test]
fn only_the_requested_environment_is_passed() {
    let res = run_ok(&req("env", &[]));
    assert_eq!(lines(&res), vec![("out", PATH.into())]);
}

#[test]
fn bad_workdir_is_reported_not_run() {
    let mut r = req("true", &[]);
    r.workdir = "/nonexistent/dir".into();
    let res = run_ok(&r);
    assert_eq!(res.exit_code, 126);
    assert_eq!(
        lines(&res),
        vec![(
            "err",
            "moat: cannot use working directory \"/nonexistent/dir\": \
             No such file or directory (os error 2)"
                .into()
        )]
    );
}

#[test]
fn killed_by_signal_is_128_plus_signal() {
    let res = run_ok(&sh("kill -TERM $$"));
    assert_eq!(res.exit_code, 128 + 15);
    assert!(!res.timed_out);
}

#[test]
fn absurd_or_malformed_requests_are_refused() {
    let many: Vec<&str> = vec!["x"; MAX_ARGS + 1];
    assert!(matches!(
        run(&req("true", &many)),
        Err(AgentError::BadRequest(_))
    ));
    let mut r = req("true", &[]);
    r.env = vec!["x=1".to_owned(); MAX_ARGS + 1];
    assert!(matches!(run(&r), Err(AgentError::BadRequest(_))));
    let big = "y".repeat(MAX_REQUEST_BYTES + 1);
    assert!(matches!(
        run(&req("true", &[&big])),
        Err(AgentError::BadRequest(_))
    ));
    let mut r = req("true", &[]);
    r.env = vec!["NOEQUALS".to_owned()];
    assert!(matches!(run(&r), Err(AgentError::BadRequest(_))));
    assert!(matches!(run(&req("", &[])), Err(AgentError::BadRequest(_))));
    assert!(matches!(
        run(&req("tr\0ue", &[])),
        Err(AgentError::BadRequest(_))
    ));
}

#[test]
fn commands_run_as_the_requested_user_when_root() {
    if !nix::unistd::geteuid().is_root() {
        return; // switching users needs root (the agent is root in the VM)
    }
    let mut r = sh("id -u; id -g; echo $HOME");
    r.user = "nobody".into();
    r.env.push("HOME=/root".into());
    let res = run_ok(&r);
    let out: Vec<String> = lines(&res).into_iter().map(|(_, l)| l).collect();
    assert_eq!(out, vec!["65534", "65534", "/nonexistent"], "{res:?}");
    r.user = "no-such-user".into();
    let err = super::run(&r).unwrap_err().to_string();
    assert!(err.contains("/etc/passwd"), "{err}");
}
