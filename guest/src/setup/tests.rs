//! Setup against a temporary root: the order of the steps and the checks
//! before them (with a [`Machine`] that records mounts and the NIC), scripts,
//! the background process and its bounded log.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use moat_proto::agent::{Mount, Network, Script, Setup};

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
        mounts: Vec::new(),
        network: None,
        identity: None,
    }
}

/// Records the VM steps, noting whether the scripts existed by then.
struct Recorder {
    root: PathBuf,
    steps: Vec<String>,
    fail_mount: bool,
}

impl Recorder {
    fn new(root: &Path) -> Self {
        Recorder {
            root: root.to_owned(),
            steps: Vec::new(),
            fail_mount: false,
        }
    }

    fn scripts_exist(&self) -> bool {
        self.root.join("scripts").exists()
    }
}

impl Machine for Recorder {
    fn identity(&mut self, id: &crate::identity::Checked) -> Result<()> {
        self.steps.push(format!(
            "identity {} {} scripts={}",
            id.hostname,
            id.machine_id,
            self.scripts_exist()
        ));
        Ok(())
    }

    fn mount(&mut self, mounts: &[Mount], owner: Option<&Identity>) -> Result<()> {
        let owner = owner.map(|o| format!(" owner {}:{}", o.uid, o.gid));
        let paths: Vec<&str> = mounts.iter().map(|m| m.path.as_str()).collect();
        self.steps.push(format!(
            "mount {}{} scripts={}",
            paths.join(","),
            owner.unwrap_or_default(),
            self.scripts_exist()
        ));
        if self.fail_mount {
            return Err(AgentError::Unavailable("mount failed".into()));
        }
        Ok(())
    }

    fn network(&mut self, cfg: &netconf::Config) -> Result<()> {
        self.steps.push(format!(
            "network {}/{} scripts={}",
            cfg.address,
            cfg.prefix_len,
            self.scripts_exist()
        ));
        Ok(())
    }
}

/// Runs `req` with a recorder that must see no VM step.
fn run_plain(root: &Path, req: &Setup) -> Result<SetupResult> {
    let mut rec = Recorder::new(root);
    let res = run_in(root, req, &mut rec);
    assert!(rec.steps.is_empty(), "{:?}", rec.steps);
    res
}

fn volume(tag: &str, path: &str, read_only: bool) -> Mount {
    Mount {
        tag: tag.into(),
        path: path.into(),
        read_only,
        subdir: String::new(),
    }
}

fn network() -> Network {
    Network {
        mac: "52:54:00:6d:00:03".into(),
        address: "10.213.0.2".into(),
        prefix_len: 30,
        gateway: "10.213.0.1".into(),
        nameservers: vec!["10.213.0.1".into()],
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
    let res = run_plain(root.path(), &req).expect("setup");
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
    run_plain(root.path(), &req).expect("setup again");
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
        let res = run_plain(root.path(), &req);
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
    let res = run_plain(root.path(), &req).expect("setup");
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
    let res = run_plain(root.path(), &req).expect("setup");
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
    run_plain(root.path(), &req).expect("setup");
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
    let res = run_plain(root.path(), &req);
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

#[test]
fn identity_then_mounts_then_network_then_scripts_and_nothing_in_the_background() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut req = setup(vec![script("build.sh", "true")], "");
    req.mounts = vec![
        volume("moat0", "/data", false),
        volume("moat1", "/ref", true),
    ];
    req.network = Some(network());
    req.identity = Some(Box::new(moat_proto::agent::Identity {
        hostname: "sb-1".into(),
        entropy: vec![9; 32],
        machine_id: "0123456789abcdef0123456789abcdef".into(),
    }));
    let mut rec = Recorder::new(root.path());
    let res = run_in(root.path(), &req, &mut rec).expect("setup");
    assert_eq!(res.background_pid, 0);
    assert_eq!(
        rec.steps,
        [
            "identity sb-1 0123456789abcdef0123456789abcdef scripts=false",
            "mount /data,/ref scripts=false",
            "network 10.213.0.2/30 scripts=false"
        ]
    );
    assert!(root.path().join("scripts/build.sh").exists());
    assert!(!root.path().join("logs").exists());
}

#[test]
fn only_mounts_and_network_succeed_without_a_background_process() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut req = setup(vec![], "");
    req.mounts = vec![volume("moat0", "/data", false)];
    let mut rec = Recorder::new(root.path());
    let res = run_in(root.path(), &req, &mut rec).expect("mounts only");
    assert_eq!(res.background_pid, 0);
    assert_eq!(rec.steps, ["mount /data scripts=false"]);

    let mut req = setup(vec![], "");
    req.network = Some(Network {
        gateway: String::new(),
        nameservers: Vec::new(),
        ..network()
    });
    let mut rec = Recorder::new(root.path());
    let res = run_in(root.path(), &req, &mut rec).expect("network only");
    assert_eq!(res.background_pid, 0);
    assert_eq!(rec.steps, ["network 10.213.0.2/30 scripts=true"]);
    assert!(!root.path().join("logs").exists());
}

#[test]
fn a_bad_request_changes_nothing() {
    let root = tempfile::tempdir().expect("tempdir");
    let cases: Vec<(Setup, &str)> = vec![
        (
            Setup {
                mounts: vec![
                    volume("moat0", "/data", false),
                    volume("moat1", "/proc/x", false),
                ],
                ..setup(vec![script("a", "true")], "true")
            },
            "under /proc",
        ),
        (
            Setup {
                mounts: vec![volume("Moat0", "/data", false)],
                ..setup(vec![], "")
            },
            "lowercase",
        ),
        (
            Setup {
                mounts: vec![volume("moat0", "/data", false)],
                network: Some(Network {
                    address: "10.213.0.300".into(),
                    ..network()
                }),
                ..setup(vec![], "")
            },
            "not an IPv4 address",
        ),
        (
            Setup {
                mounts: vec![volume("moat0", "/data", false)],
                identity: Some(Box::new(moat_proto::agent::Identity {
                    hostname: "sb-1".into(),
                    entropy: vec![9; 32],
                    machine_id: "not-hex".into(),
                })),
                ..setup(vec![script("a", "true")], "true")
            },
            "machine_id",
        ),
        (
            Setup {
                mounts: vec![volume("moat0", "/data", false)],
                network: Some(network()),
                ..setup(vec![script("..", "true")], "")
            },
            "invalid script name",
        ),
    ];
    for (req, needle) in cases {
        let res = run_plain(root.path(), &req);
        assert!(
            matches!(&res, Err(AgentError::BadRequest(m)) if m.contains(needle)),
            "{needle:?}: {res:?}"
        );
    }
    assert!(!root.path().join("scripts").exists());
}

#[test]
fn a_failed_mount_stops_the_request() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut req = setup(vec![script("start", "true")], "");
    req.mounts = vec![volume("moat0", "/data", false)];
    req.network = Some(network());
    let mut rec = Recorder::new(root.path());
    rec.fail_mount = true;
    let res = run_in(root.path(), &req, &mut rec);
    assert!(matches!(res, Err(AgentError::Unavailable(_))), "{res:?}");
    assert_eq!(rec.steps, ["mount /data scripts=false"]);
    assert!(!root.path().join("scripts").exists());
}

#[test]
fn writable_volumes_go_to_the_sandbox_user() {
    let root = tempfile::tempdir().expect("tempdir");
    // uid:gid pairs resolve without the account files.
    let mut req = setup(vec![], "");
    req.user = "4242:4243".into();
    req.mounts = vec![volume("moat0", "/data", false)];
    let mut rec = Recorder::new(root.path());
    run_in(root.path(), &req, &mut rec).expect("setup");
    assert_eq!(rec.steps, ["mount /data owner 4242:4243 scripts=false"]);
    // Read-only volumes need no owner, so the user is not even looked up.
    req.user = "no-such-user-here".into();
    req.mounts = vec![volume("moat0", "/data", true)];
    let mut rec = Recorder::new(root.path());
    run_in(root.path(), &req, &mut rec).expect("setup");
    assert_eq!(rec.steps, ["mount /data scripts=true"]);
    // Root owns nothing new.
    req.user = "0:0".into();
    req.mounts = vec![volume("moat0", "/data", false)];
    let mut rec = Recorder::new(root.path());
    run_in(root.path(), &req, &mut rec).expect("setup");
    assert_eq!(rec.steps, ["mount /data scripts=true"]);
}
