//! Setup against a temporary root: scripts, the background process and its
//! bounded log.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use moat_proto::agent::{Script, Setup};

use super::log::LogSink;
use super::*;

fn script(name: &str, content: &str) -> Script {
    Script {
        name: name.into(),
        content: content.into(),
    }
}

fn setup(scripts: Vec<Script>, exec: &str) -> Setup {
    Setup {
        scripts,
        shell: "/bin/sh".into(),
        env: vec!["PATH=/usr/bin:/bin".into()],
        workdir: String::new(),
        exec: exec.into(),
        log_max_bytes: 0,
        user: String::new(),
    }
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).expect("stat").permissions().mode() & 0o7777
}

/// Waits until the log holds `needle` (the background process is async).
fn log_with(root: &Path, needle: &str) -> String {
    let path = root.join("logs/background.log");
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let text = fs::read_to_string(&path).unwrap_or_default();
        if text.contains(needle) || Instant::now() > until {
            return text;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn scripts_are_written_executable_with_a_shebang() {
    let root = tempfile::tempdir().expect("tempdir");
    let req = setup(
        vec![
            script("build.sh", "echo building\n"),
            script("run", "#!/usr/bin/env python3\nprint('hi')\n"),
            script(".hidden_1-x", "true"),
        ],
        "",
    );
    let res = run_in(root.path(), &req).expect("setup");
    assert_eq!(res.background_pid, 0);
    let dir = root.path().join("scripts");
    assert_eq!(mode(&dir), 0o755);
    assert_eq!(
        fs::read_to_string(dir.join("build.sh")).expect("read"),
        "#!/bin/sh\necho building\n"
    );
    assert_eq!(
        fs::read_to_string(dir.join("run")).expect("read"),
        "#!/usr/bin/env python3\nprint('hi')\n"
    );
    for name in ["build.sh", "run", ".hidden_1-x"] {
        assert_eq!(mode(&dir.join(name)), 0o755, "{name}");
    }
    let mut names: Vec<String> = fs::read_dir(&dir)
        .expect("readdir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, [".hidden_1-x", "build.sh", "run"]);
    // No background process, so no log either.
    assert!(!root.path().join("logs").exists());
    // Rewriting replaces the content.
    let req = setup(vec![script("run", "echo two")], "");
    run_in(root.path(), &req).expect("setup again");
    assert_eq!(
        fs::read_to_string(dir.join("run")).expect("read"),
        "#!/bin/sh\necho two"
    );
}

#[test]
fn invalid_names_are_refused_before_writing_anything() {
    let root = tempfile::tempdir().expect("tempdir");
    for name in ["", ".", "..", "a/b", "../x", "x y", "caf\u{e9}", "a~b"] {
        let req = setup(vec![script("ok", "true"), script(name, "true")], "");
        let res = run_in(root.path(), &req);
        assert!(
            matches!(&res, Err(AgentError::BadRequest(m)) if m.contains("invalid script name")),
            "{name:?}: {res:?}"
        );
    }
    assert!(!root.path().join("scripts").exists());
}

#[test]
fn exec_runs_in_the_background_in_its_own_session_with_output_logged() {
    let root = tempfile::tempdir().expect("tempdir");
    let work = tempfile::tempdir().expect("tempdir");
    let mut req = setup(
        vec![script("start", "echo not me")],
        "echo out; echo err >&2; echo \"FOO=$FOO in $(pwd)\"; \
         echo \"sid=$(cut -d' ' -f6 /proc/$$/stat) pid=$$ stdin=$(readlink /proc/$$/fd/0)\"; \
         echo finished",
    );
    req.env.push("FOO=bar".into());
    req.workdir = work.path().display().to_string();
    let res = run_in(root.path(), &req).expect("setup");
    let pid = res.background_pid;
    assert!(pid > 0);
    let log = log_with(root.path(), "finished");
    assert!(log.starts_with("out\nerr\n"), "{log}");
    assert!(
        log.contains(&format!("FOO=bar in {}\n", work.path().display())),
        "{log}"
    );
    assert!(
        log.contains(&format!("sid={pid} pid={pid} stdin=/dev/null\n")),
        "{log}"
    );
    assert!(!log.contains("not me"), "{log}");
    assert_eq!(mode(&root.path().join("logs")), 0o755);
}

#[test]
fn the_start_script_runs_when_there_is_no_exec() {
    let root = tempfile::tempdir().expect("tempdir");
    let req = setup(vec![script("start", "echo \"started as $0\"")], "");
    let res = run_in(root.path(), &req).expect("setup");
    assert!(res.background_pid > 0);
    let expected = format!("started as {}", root.path().join("scripts/start").display());
    let log = log_with(root.path(), &expected);
    assert_eq!(log, format!("{expected}\n"));
}

#[test]
fn the_log_is_bounded_and_the_process_never_blocks() {
    let root = tempfile::tempdir().expect("tempdir");
    let done = root.path().join("done");
    // 200 kB is more than a pipe holds: the process finishes only if the
    // output keeps being drained after the cap.
    let mut req = setup(
        vec![],
        &format!(
            "head -c 200000 /dev/zero | tr '\\0' x; echo; echo finished > {}",
            done.display()
        ),
    );
    req.log_max_bytes = 1000;
    run_in(root.path(), &req).expect("setup");
    let until = Instant::now() + Duration::from_secs(10);
    while !done.exists() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(done.exists(), "the background process blocked");
    let log = log_with(root.path(), "truncated");
    assert_eq!(
        log,
        format!(
            "{}\n[moat: output truncated at 1000 bytes]\n",
            "x".repeat(1000)
        )
    );
}

#[test]
fn a_missing_shell_is_a_failure() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut req = setup(vec![script("a", "true")], "true");
    req.shell = "/nonexistent/sh".into();
    let res = run_in(root.path(), &req);
    assert!(matches!(res, Err(AgentError::Unavailable(_))), "{res:?}");
}

#[test]
fn log_sink_cuts_at_the_cap_once() {
    let mut sink = LogSink::new(Vec::new(), 10);
    sink.push(b"12345\n");
    sink.push(b"6789");
    sink.push(b"abc\n");
    sink.push(b"more\n");
    assert_eq!(
        String::from_utf8(sink.into_inner()).expect("utf-8"),
        "12345\n6789\n[moat: output truncated at 10 bytes]\n"
    );
    let mut sink = LogSink::new(Vec::new(), 4);
    sink.push(b"abc\n");
    sink.push(b"d");
    assert_eq!(
        String::from_utf8(sink.into_inner()).expect("utf-8"),
        "abc\n[moat: output truncated at 4 bytes]\n"
    );
    let mut sink = LogSink::new(Vec::new(), 4);
    sink.push(b"abcd");
    assert_eq!(sink.into_inner(), b"abcd");
}
