//! Foundation: one sandbox end to end over HTTP — gateway → broker → QEMU
//! microVM → guest agent — and what must hold when things go wrong.

use std::io::{Read, Write};
use std::process::Command;
use std::time::Duration;

use moat_e2e::{build_dir, cgroup_limits, lines_of, Options, Server};
use serde_json::{json, Value};

fn kernel_release() -> String {
    std::fs::read_to_string(build_dir().join("kernel.release"))
        .expect("build/kernel.release (written by setup)")
        .trim()
        .to_string()
}

#[test]
fn command_round_trip_errors_timeout_and_clean_stop() {
    let s = Server::start();
    let (status, body) = s.get("/api/v1/health").unwrap();
    assert_eq!(
        (status, body),
        (200, json!({"message": "Service is healthy"}))
    );

    s.start_sandbox(
        "e2e-one",
        json!({"envs": ["GREETING=hello world"], "workdir": "/tmp", "memory": 256}),
    );

    // Its own process, uid and cgroup: guest RAM + VMM overhead, one CPU.
    let pids = s.vm_pids();
    assert_eq!(pids.len(), 1, "{pids:?}");
    assert!(pids[0].1 >= s.uid_base && pids[0].1 < s.uid_base + s.uid_count);
    assert_eq!(cgroup_limits(pids[0].0), ((256 + 256) << 20, 1.0));
    let guest_mem = s.run("e2e-one", "sh", &["-c", "grep MemTotal /proc/meminfo"]);
    let kib: u64 = Server::stdout_lines(&guest_mem)[0]
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        kib > 200 << 10 && kib <= 256 << 10,
        "guest RAM {kib} KiB for memory=256"
    );

    // The guest's kernel, not the host's.
    let r = s.run("e2e-one", "uname", &["-r"]);
    assert_eq!(r["exit_code"], 0, "{r}");
    assert_eq!(r["success"], true);
    assert_eq!(Server::stdout_lines(&r), vec![kernel_release()]);
    assert_ne!(
        kernel_release(),
        nix::sys::utsname::uname()
            .unwrap()
            .release()
            .to_string_lossy()
    );

    // Ordered stdout/stderr lines, exit code 3. The pauses make the order
    // between the two pipes a fact of the program, not of scheduling.
    let r = s.run(
        "e2e-one",
        "sh",
        &["-c", "echo out1; sleep 0.3; echo err1 >&2; sleep 0.3; echo out2; sleep 0.3; echo err2 >&2; exit 3"],
    );
    assert_eq!(r["exit_code"], 3, "{r}");
    assert_eq!(r["success"], false);
    assert_eq!(r["command"], "sh");
    assert_eq!(
        r["output"],
        json!([
            {"stream": "stdout", "text": "out1"},
            {"stream": "stderr", "text": "err1"},
            {"stream": "stdout", "text": "out2"},
            {"stream": "stderr", "text": "err2"},
        ])
    );
    assert!(r["error"].as_str().unwrap().contains("err1"), "{r}");

    // Env and workdir from the sandbox config; argv without a shell.
    let r = s.run("e2e-one", "sh", &["-c", "echo \"$GREETING\"; pwd"]);
    assert_eq!(Server::stdout_lines(&r), vec!["hello world", "/tmp"]);
    let r = s.run("e2e-one", "echo", &["$GREETING", "a;b"]);
    assert_eq!(
        Server::stdout_lines(&r),
        vec!["$GREETING a;b"],
        "no shell expansion"
    );

    // A missing program is a result, not a crash.
    let r = s.run("e2e-one", "no-such-program", &[]);
    assert_eq!(r["exit_code"], 127, "{r}");
    assert!(
        r["error"].as_str().unwrap().contains("no-such-program"),
        "{r}"
    );

    // Past its timeout the whole process group is killed.
    let started = std::time::Instant::now();
    let r = s.ok(
        "sandbox.command.run",
        json!({"sandbox": "e2e-one", "namespace": "default", "command": "sh",
               "args": ["-c", "sleep 100 & echo started; sleep 100"], "timeout": 2}),
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(r["success"], false, "{r}");
    assert_eq!(r["exit_code"], 137, "{r}");
    assert_eq!(Server::stdout_lines(&r), vec!["started"]);
    assert!(r["error"].as_str().unwrap().contains("timed out"), "{r}");
    // ...and the sandbox is still usable, with no sleeper left behind.
    let r = s.run(
        "e2e-one",
        "sh",
        &["-c", "ps -o comm | grep -c '^sleep$' || true"],
    );
    assert_eq!(Server::stdout_lines(&r), vec!["0"], "{r}");

    // Same config again: nothing restarted. Different config: refused.
    let pids = s.vm_pids();
    assert_eq!(pids.len(), 1, "{pids:?}");
    s.start_sandbox(
        "e2e-one",
        json!({"envs": ["GREETING=hello world"], "workdir": "/tmp", "memory": 256}),
    );
    assert_eq!(s.vm_pids(), pids);
    let (code, msg) = s.err(
        "sandbox.start",
        json!({"sandbox": "e2e-one", "namespace": "default", "config": {"memory": 300}}),
    );
    assert_eq!(code, -32602, "{msg}");
    assert!(msg.contains("stop it first"), "{msg}");

    s.stop_sandbox("e2e-one");
    s.assert_no_leftovers();
    let (code, _) = s.err(
        "sandbox.command.run",
        json!({"sandbox": "e2e-one", "namespace": "default", "command": "true"}),
    );
    assert_eq!(code, -32003);
    let (code, _) = s.err(
        "sandbox.stop",
        json!({"sandbox": "e2e-one", "namespace": "default"}),
    );
    assert_eq!(code, -32003);

    // The definition stays: start without config boots it again, fresh.
    assert_eq!(
        s.ok(
            "sandbox.start",
            json!({"sandbox": "e2e-one", "namespace": "default"})
        ),
        json!("Sandbox e2e-one started successfully")
    );
    let r = s.run("e2e-one", "sh", &["-c", "echo \"$GREETING\""]);
    assert_eq!(Server::stdout_lines(&r), vec!["hello world"]);
    s.stop_sandbox("e2e-one");
    s.assert_no_leftovers();
}

#[test]
fn two_sandboxes_run_at_once_and_cannot_see_each_other() {
    let s = Server::start();
    std::thread::scope(|t| {
        t.spawn(|| s.start_sandbox("iso-a", json!({})));
        t.spawn(|| s.start_sandbox("iso-b", json!({})));
    });
    let pids = s.vm_pids();
    assert_eq!(pids.len(), 2, "{pids:?}");
    assert_ne!(pids[0].1, pids[1].1, "each VM process has its own uid");

    let r = s.run(
        "iso-a",
        "sh",
        &["-c", "echo secret-a > /root/secret && cat /root/secret"],
    );
    assert_eq!(Server::stdout_lines(&r), vec!["secret-a"]);
    let r = s.run("iso-b", "cat", &["/root/secret"]);
    assert_ne!(r["exit_code"], 0, "{r}");
    let r = s.run(
        "iso-b",
        "sh",
        &[
            "-c",
            "grep -r secret-a / --exclude-dir=proc --exclude-dir=sys -l 2>/dev/null; echo done",
        ],
    );
    assert_eq!(Server::stdout_lines(&r), vec!["done"], "{r}");
    assert_eq!(
        s.run("iso-b", "hostname", &[])["output"][0]["text"],
        "iso-b"
    );

    std::thread::scope(|t| {
        t.spawn(|| s.stop_sandbox("iso-a"));
        t.spawn(|| s.stop_sandbox("iso-b"));
    });
    s.assert_no_leftovers();
}

#[test]
fn concurrent_starts_of_one_name_make_one_vm() {
    let s = Server::start();
    std::thread::scope(|t| {
        for _ in 0..3 {
            t.spawn(|| s.start_sandbox("same", json!({})));
        }
    });
    assert_eq!(s.vm_pids().len(), 1, "{:?}", s.vm_pids());
    s.stop_sandbox("same");
    s.assert_no_leftovers();
}

#[test]
fn bad_requests_get_the_contract_codes() {
    let s = Server::start();
    let (code, msg) = s.err("sandbox.nope", json!({}));
    assert_eq!(code, -32601, "{msg}");
    let (code, msg) = s.err(
        "sandbox.start",
        json!({"sandbox": "bad/name", "namespace": "default"}),
    );
    assert_eq!(code, -32602, "{msg}");
    assert!(msg.contains("letters, digits"), "{msg}");
    let (code, msg) = s.err(
        "sandbox.start",
        json!({"sandbox": "a", "namespace": "default", "config": {"memory": 1_000_000}}),
    );
    assert_eq!(code, -32602, "{msg}");
    assert!(msg.contains("memory"), "{msg}");
    let (code, msg) = s.err(
        "sandbox.start",
        json!({"sandbox": "a", "namespace": "default", "config": {"image": "nope:1"}}),
    );
    assert_eq!(code, -32602, "{msg}");
    assert!(msg.contains("nope:1"), "{msg}");
    let (code, msg) = s.err(
        "sandbox.start",
        json!({"sandbox": "a", "namespace": "default", "config": {"ports": ["80:80"]}}),
    );
    assert_eq!(code, -32602, "{msg}");
    let (code, msg) = s.err(
        "sandbox.start",
        json!({"sandbox": "never-defined", "namespace": "default"}),
    );
    assert_eq!(code, -32003, "{msg}");
    let (code, msg) = s.err(
        "sandbox.command.run",
        json!({"sandbox": "ghost", "namespace": "default", "command": "true"}),
    );
    assert_eq!(code, -32003, "{msg}");
    let (code, msg) = s.err(
        "sandbox.stop",
        json!({"sandbox": "ghost", "namespace": "default"}),
    );
    assert_eq!(code, -32003, "{msg}");
    // Nothing was started by any of that.
    s.assert_no_leftovers();
}

#[test]
fn a_guest_that_fails_to_boot_is_reported_and_leaves_nothing() {
    // An "image" that is not a filesystem: the agent cannot mount its root.
    let junk = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(junk.path(), vec![0x5au8; 4 << 20]).unwrap();
    std::fs::set_permissions(
        junk.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    let s = Server::start_with(Options {
        extra_images: vec![("broken".into(), junk.path().to_owned())],
        ..Options::default()
    });
    let (code, msg) = s.err(
        "sandbox.start",
        json!({"sandbox": "bad-boot", "namespace": "default", "config": {"image": "broken"}}),
    );
    assert_eq!(code, -32603, "{msg}");
    assert!(msg.contains("failed to start"), "{msg}");
    assert!(
        msg.contains("console:") && msg.contains("moat-agent"),
        "console excerpt missing: {msg}"
    );
    s.assert_no_leftovers();
    // The server still works afterwards.
    s.start_sandbox("good", json!({}));
    s.stop_sandbox("good");
    s.assert_no_leftovers();
}

#[test]
fn boot_timeout_is_enforced_and_leaves_nothing() {
    let s = Server::start_with(Options {
        boot_timeout_secs: 1,
        ..Options::default()
    });
    let (code, msg) = s.err(
        "sandbox.start",
        json!({"sandbox": "slow", "namespace": "default", "config": {}}),
    );
    assert_eq!(code, -32603, "{msg}");
    assert!(msg.contains("did not come up within"), "{msg}");
    s.assert_no_leftovers();
}

#[test]
fn broker_refuses_a_peer_that_is_not_the_gateway() {
    let s = Server::start();
    // This test runs as root, not as the gateway's uid.
    let mut conn = std::os::unix::net::UnixStream::connect(&s.socket).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let _ = conn.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
    let mut buf = [0u8; 64];
    let n = conn.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "the broker answered a foreign peer: {:?}", &buf[..n]);
    let start = std::time::Instant::now();
    while !s.log_text().contains("refused broker connection")
        && start.elapsed() < Duration::from_secs(5)
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        s.log_text().contains("refused broker connection"),
        "{}",
        s.log_text()
    );
    // The gateway itself is still served.
    assert_eq!(s.get("/api/v1/health").unwrap().0, 200);
}

#[test]
fn output_lines_keep_their_text_and_streams() {
    let s = Server::start();
    s.start_sandbox("lines", json!({}));
    let r: Value = s.run("lines", "sh", &["-c", "printf 'a\\n\\nno-newline'"]);
    assert_eq!(lines_of(&r, "stdout"), vec!["a", "", "no-newline"]);
    s.stop_sandbox("lines");
    s.assert_no_leftovers();
}

#[test]
fn server_runs_the_gateway_unprivileged_and_stops_everything_on_sigterm() {
    let mut s = Server::start();
    let daemons = s.daemons();
    let moat_uid = nix::unistd::User::from_name("moat")
        .unwrap()
        .unwrap()
        .uid
        .as_raw();
    let find = |name: &str| daemons.iter().find(|d| d.2 == name).cloned();
    let broker = find("moat-broker").unwrap_or_else(|| panic!("{daemons:?}"));
    let gateway = find("moat-gateway").unwrap_or_else(|| panic!("{daemons:?}"));
    assert_eq!(broker.1, 0, "broker runs as root");
    assert_eq!(gateway.1, moat_uid, "gateway dropped to the moat user");

    s.start_sandbox("left-running", json!({}));
    assert_eq!(s.vm_pids().len(), 1);
    let status = s
        .terminate(Duration::from_secs(60))
        .expect("supervisor exits after SIGTERM");
    assert!(status.success(), "{status}");
    for (pid, _, name) in [broker, gateway] {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists() || is_zombie(pid),
            "{name} still running"
        );
    }
    s.assert_no_leftovers();
    assert!(!s.socket.exists(), "broker socket left behind");
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(true)
}

#[test]
fn logs_follow_moat_log_and_have_no_colour_codes_off_a_terminal() {
    // The harness logs to a file, as the journal is: not a terminal.
    let s = Server::start();
    let log = s.log_text();
    for daemon in ["moat_broker", "moat_gateway"] {
        assert!(
            log.lines()
                .any(|l| l.contains(" INFO ") && l.contains(daemon)),
            "no info line from {daemon} at MOAT_LOG=info:\n{log}"
        );
    }
    assert!(
        !log.contains('\x1b'),
        "colour codes in a log that is not a terminal:\n{log}"
    );
    drop(s);

    let quiet = Server::start_with(Options {
        log_filter: "warn".into(),
        ..Options::default()
    });
    quiet.start_sandbox("quiet", json!({}));
    quiet.stop_sandbox("quiet");
    let log = quiet.log_text();
    let info: Vec<&str> = log.lines().filter(|l| l.contains(" INFO ")).collect();
    assert!(info.is_empty(), "info lines at MOAT_LOG=warn: {info:#?}");
}

#[test]
fn an_invalid_moat_log_stops_the_daemons_with_a_clear_error() {
    for daemon in ["moat-broker", "moat-gateway"] {
        let out = Command::new(moat_e2e::bin_dir().join(daemon))
            .env("MOAT_LOG", "moat=loud")
            .env("MOAT_BROKER_CONFIG", "/nonexistent/broker.toml")
            .output()
            .expect("run the daemon");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{daemon}: {stderr}");
        assert!(
            stderr.contains("MOAT_LOG=\"moat=loud\" is not a log filter"),
            "{daemon}: {stderr}"
        );
    }
}
