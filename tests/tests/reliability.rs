//! Reliability: the broker's durable state, and VMs that survive the broker.
//! A broker killed with SIGKILL (mid-start, mid-command, with sandboxes
//! running) is started again by its supervisor and re-adopts what runs
//! (the guests do not reboot: same boot id, uptime going on); a start it was
//! in the middle of is cleaned; a broker stopped with SIGTERM leaves the VMs
//! (and their firewall table) for the next one, and removes the table when
//! none runs; a VM process killed under a sandbox is reported and
//! cleaned. Real processes and VMs throughout.

use std::time::{Duration, Instant};

use moat_e2e::{Options, Server};
use serde_json::{json, Value};

/// A server whose broker leaves VMs running when it stops (the product
/// default; the harness normally stops them).
fn leaving_vms() -> Options {
    Options {
        lifecycle_toml: "stop_sandboxes_on_shutdown = false".into(),
        ..Default::default()
    }
}

/// Seconds since the guest booted.
fn uptime(s: &Server, name: &str) -> f64 {
    s.first_line(name, "cat", &["/proc/uptime"])
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .expect("uptime")
}

fn kill9(pid: i32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill -9");
}

fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_broker_answers(s: &Server) {
    wait_for("health answered again", Duration::from_secs(120), || {
        matches!(s.get("/api/v1/health"), Ok((200, _)))
    });
}

fn metrics_of(s: &Server, name: &str) -> Value {
    let m = s.ok(
        "sandbox.metrics.get",
        json!({"namespace": "default", "sandbox": name}),
    );
    m["sandboxes"]
        .as_array()
        .and_then(|a| a.first().cloned())
        .unwrap_or_else(|| panic!("no metrics for {name}: {m}"))
}

#[test]
fn broker_killed_mid_start_and_mid_command_readopts_what_runs() {
    let s = Server::start_with(leaving_vms());
    let names = ["keep-a", "keep-b", "keep-c"];
    for n in names {
        s.start_sandbox(n, json!({}));
    }
    let before: Vec<(String, f64)> = names
        .iter()
        .map(|n| (s.boot_id(n), uptime(&s, n)))
        .collect();
    let old_broker = s.broker_pid().expect("broker pid");

    let (command, start) = std::thread::scope(|t| {
        let command = t.spawn(|| {
            s.rpc(
                "sandbox.command.run",
                json!({"sandbox": "keep-a", "namespace": "default", "command": "sleep", "args": ["30"]}),
            )
        });
        let start = t.spawn(|| {
            s.rpc(
                "sandbox.start",
                json!({"sandbox": "half", "namespace": "default", "config": {}}),
            )
        });
        // The fourth VM process exists: its start is under way.
        wait_for(
            "the half-started VM process",
            Duration::from_secs(60),
            || s.vm_pids().len() >= 4,
        );
        std::thread::sleep(Duration::from_millis(100));
        kill9(old_broker);
        (command.join().unwrap(), start.join().unwrap())
    });
    // Both calls in flight fail, saying why, instead of hanging.
    for (what, reply) in [("command", &command), ("start", &start)] {
        let e = &reply["error"];
        assert_eq!(e["code"], -32000, "{what}: {reply}");
        assert!(
            e["message"].as_str().unwrap_or_default().contains("broker"),
            "{what}: {reply}"
        );
    }

    wait_broker_answers(&s);
    assert_ne!(s.broker_pid(), Some(old_broker), "a new broker runs");
    for (n, (id, up)) in names.iter().zip(&before) {
        assert_eq!(&s.boot_id(n), id, "{n} did not reboot");
        assert!(uptime(&s, n) > *up, "{n}'s uptime goes on");
        assert_eq!(metrics_of(&s, n)["running"], true, "{n}");
    }
    // The half-started sandbox was cleaned, its definition kept.
    wait_for(
        "only the re-adopted VMs run",
        Duration::from_secs(10),
        || s.vm_pids().len() == 3,
    );
    let half = metrics_of(&s, "half");
    assert_eq!(half["running"], false, "{half}");
    let log = s.log_text();
    assert_eq!(
        log.matches("re-adopted a running sandbox").count(),
        3,
        "{log}"
    );
    assert!(log.contains("its start was interrupted"), "{log}");

    // The stored definition starts again without a config.
    s.ok(
        "sandbox.start",
        json!({"sandbox": "half", "namespace": "default"}),
    );
    assert_eq!(s.first_line("half", "echo", &["back"]), "back");
    for n in names.iter().chain(["half"].iter()) {
        s.stop_sandbox(n);
    }
    s.assert_no_leftovers();
}

#[test]
fn broker_sigterm_leaves_vms_for_the_next_broker() {
    let mut s = Server::start_with(leaving_vms());
    s.start_sandbox("stay", json!({"envs": ["MARK=kept"]}));
    s.start_sandbox("gone", json!({}));
    s.stop_sandbox("gone");
    s.run("stay", "sh", &["-c", "echo data > /tmp/f"]);
    let id = s.boot_id("stay");
    let vms = s.vm_pids();
    assert_eq!(vms.len(), 1);

    let st = s
        .terminate(Duration::from_secs(60))
        .expect("stack stopped on SIGTERM");
    assert!(st.success(), "{st}");
    assert_eq!(s.vm_pids(), vms, "the VM outlives the broker");
    let log = s.log_text();
    assert!(
        log.contains("leaving the running sandboxes for the next broker"),
        "{log}"
    );
    assert!(
        firewall_table_exists(&s),
        "the VM's firewall rules stay for the next broker"
    );

    s.restart();
    assert_eq!(s.boot_id("stay"), id);
    assert_eq!(s.first_line("stay", "cat", &["/tmp/f"]), "data");
    // The definition (with its envs) came back with it.
    assert_eq!(s.first_line("stay", "sh", &["-c", "echo $MARK"]), "kept");
    // A stopped sandbox's definition is kept too.
    assert_eq!(metrics_of(&s, "gone")["running"], false);
    s.ok(
        "sandbox.start",
        json!({"sandbox": "gone", "namespace": "default"}),
    );
    s.stop_sandbox("gone");
    s.stop_sandbox("stay");
    s.assert_no_leftovers();
}

/// Whether the server's broker's nftables table is installed.
fn firewall_table_exists(s: &Server) -> bool {
    std::process::Command::new("nft")
        .args(["list", "table", "inet", &s.net_table])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("run nft")
        .success()
}

#[test]
fn a_broker_leaving_no_running_sandbox_removes_its_firewall_table() {
    // Its drop rule for forwarded traffic that is none of its taps' would
    // otherwise outlive it, with nothing left for it to guard.
    let mut s = Server::start_with(leaving_vms());
    s.start_sandbox("brief", json!({"scope": "public"}));
    s.stop_sandbox("brief");
    assert!(firewall_table_exists(&s), "installed while the broker runs");
    let st = s
        .terminate(Duration::from_secs(60))
        .expect("stack stopped on SIGTERM");
    assert!(st.success(), "{st}");
    let log = s.log_text();
    assert!(
        !log.contains("leaving the running sandboxes for the next broker"),
        "{log}"
    );
    assert!(
        !firewall_table_exists(&s),
        "no table left behind by a broker with nothing running:\n{log}"
    );
}

#[test]
fn a_killed_vm_process_is_reported_and_cleaned() {
    let s = Server::start();
    s.start_sandbox("victim", json!({}));
    let vms = s.vm_pids();
    assert_eq!(vms.len(), 1);
    kill9(vms[0].0);
    wait_for("metrics show it stopped", Duration::from_secs(10), || {
        metrics_of(&s, "victim")["running"] == false
    });
    let (code, message) = s.err(
        "sandbox.command.run",
        json!({"sandbox": "victim", "namespace": "default", "command": "true"}),
    );
    // The operation failed (-32603), saying how and what to do.
    assert_eq!(code, -32603, "{message}");
    assert!(
        message.contains("SIGKILL") && message.contains("stop the sandbox"),
        "{message}"
    );
    // The operator's log says so, with the console's last lines; a stop
    // the broker asked for is not reported.
    let log = s.log_text();
    let reported: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("VM ended without a stop request"))
        .collect();
    assert_eq!(reported.len(), 1, "{log}");
    assert!(
        reported[0].contains("SIGKILL") && reported[0].contains("moat-agent: "),
        "{}",
        reported[0]
    );
    s.stop_sandbox("victim");
    s.assert_no_leftovers();
    s.start_sandbox("victim", json!({}));
    assert_eq!(s.first_line("victim", "echo", &["again"]), "again");
    s.stop_sandbox("victim");
    assert_eq!(
        s.log_text()
            .matches("VM ended without a stop request")
            .count(),
        1
    );
    s.assert_no_leftovers();
}

/// `moat sandbox ls --json`, as (namespace/name, object).
fn listed(s: &Server) -> Vec<(String, Value)> {
    let (ok, out, err) = s.sandbox_cli(&["ls", "--json"]);
    assert!(ok, "{err}");
    out.lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).expect("json line");
            (
                format!(
                    "{}/{}",
                    v["namespace"].as_str().unwrap(),
                    v["name"].as_str().unwrap()
                ),
                v,
            )
        })
        .collect()
}

fn listed_one(s: &Server, key: &str) -> Option<Value> {
    listed(s)
        .into_iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v)
}

fn start_in(s: &Server, namespace: &str, name: &str) {
    s.ok(
        "sandbox.start",
        json!({"sandbox": name, "namespace": namespace, "config": {}}),
    );
}

#[test]
fn idle_and_old_sandboxes_are_stopped_and_the_operator_can_list_and_remove() {
    let s = Server::start_with(Options {
        lifecycle_toml: "check_interval_secs = 1\nidle_timeout_secs = 3\nstopped_retention_secs = 0\n[lifecycle.namespaces.busy]\nidle_timeout_secs = 0\nmax_lifetime_secs = 6\n".into(),
        ..Default::default()
    });
    s.start_sandbox("idle", json!({}));
    start_in(&s, "busy", "old");
    // Metrics polling is not use: the idle one is stopped anyway.
    wait_for("the idle sandbox stopped", Duration::from_secs(30), || {
        metrics_of(&s, "idle")["running"] == false
    });
    let idle = listed_one(&s, "default/idle").expect("idle is listed");
    assert_eq!(idle["running"], false, "{idle}");
    assert!(
        idle["stop_reason"]
            .as_str()
            .unwrap()
            .contains("idle for 3s"),
        "{idle}"
    );
    // The busy namespace has no idle limit but a maximum lifetime: kept
    // busy, it is stopped all the same.
    let old = || listed_one(&s, "busy/old").expect("old is listed");
    assert_eq!(old()["running"], true);
    wait_for("the old sandbox stopped", Duration::from_secs(30), || {
        let _ = s.rpc(
            "sandbox.command.run",
            json!({"sandbox": "old", "namespace": "busy", "command": "true"}),
        );
        std::thread::sleep(Duration::from_millis(500));
        old()["running"] == false
    });
    assert!(
        old()["stop_reason"]
            .as_str()
            .unwrap()
            .contains("maximum lifetime of 6s"),
        "{}",
        old()
    );

    // Removal by the operator.
    let (ok, out, err) = s.sandbox_cli(&["rm", "default/idle"]);
    assert!(ok, "{err}");
    assert!(out.contains("removed default/idle"), "{out}");
    assert!(listed_one(&s, "default/idle").is_none());
    assert!(!s.state_dir.join("sandboxes/default/idle.record").exists());
    let (code, _) = s.err(
        "sandbox.start",
        json!({"sandbox": "idle", "namespace": "default"}),
    );
    assert_eq!(code, -32003, "a removed definition is gone");
    // A running one needs --stop.
    s.start_sandbox("runner", json!({}));
    let (ok, _, err) = s.sandbox_cli(&["rm", "default/runner"]);
    assert!(!ok && err.contains("is running"), "{err}");
    let (ok, _, err) = s.sandbox_cli(&["rm", "default/nope"]);
    assert!(!ok && err.contains("not defined"), "{err}");
    let (ok, out, err) = s.sandbox_cli(&["rm", "default/runner", "--stop"]);
    assert!(ok && out.contains("stopped first"), "{out}{err}");
    let (ok, _, err) = s.sandbox_cli(&["rm", "busy/old"]);
    assert!(ok, "{err}");
    assert!(listed(&s).is_empty());
    s.assert_no_leftovers();
    let log = s.log_text();
    assert_eq!(log.matches("sandbox stopped").count(), 2, "{log}");
}

#[test]
fn stopped_definitions_expire_and_a_namespace_keeps_a_bounded_number() {
    let s = Server::start_with(Options {
        lifecycle_toml: "check_interval_secs = 1\nstopped_retention_secs = 0\nmax_definitions_per_namespace = 2\n".into(),
        ..Default::default()
    });
    for n in ["first", "second"] {
        s.start_sandbox(n, json!({}));
        s.stop_sandbox(n);
        std::thread::sleep(Duration::from_millis(20));
    }
    s.start_sandbox("third", json!({}));
    let names: Vec<String> = listed(&s).into_iter().map(|(k, _)| k).collect();
    assert_eq!(
        names,
        ["default/second", "default/third"],
        "the longest-stopped one made room"
    );
    // With all of them running, no room is made.
    s.ok(
        "sandbox.start",
        json!({"sandbox": "second", "namespace": "default"}),
    );
    let (code, msg) = s.err(
        "sandbox.start",
        json!({"sandbox": "fourth", "namespace": "default", "config": {}}),
    );
    assert_eq!(code, -32000, "{msg}");
    assert!(msg.contains("max_definitions_per_namespace"), "{msg}");
    s.stop_sandbox("second");
    s.stop_sandbox("third");
    s.assert_no_leftovers();

    // Retention: a server that keeps stopped definitions for 2 s.
    let r = Server::start_with(Options {
        lifecycle_toml: "check_interval_secs = 1\nstopped_retention_secs = 2\n".into(),
        ..Default::default()
    });
    r.start_sandbox("brief", json!({}));
    r.stop_sandbox("brief");
    assert!(listed_one(&r, "default/brief").is_some());
    wait_for("the definition expired", Duration::from_secs(20), || {
        listed_one(&r, "default/brief").is_none()
    });
    assert!(!r.state_dir.join("sandboxes/default/brief.record").exists());
    assert!(r
        .log_text()
        .contains("stopped longer than lifecycle.stopped_retention_secs"));
}

#[test]
fn a_full_state_disk_refuses_starts_clearly_and_loses_nothing() {
    let mut s = Server::start_with(leaving_vms());
    // The broker's whole state on a small tmpfs (mounted while it is down).
    s.terminate(Duration::from_secs(60)).expect("stopped");
    std::fs::remove_dir_all(&s.state_dir).unwrap();
    std::fs::create_dir(&s.state_dir).unwrap();
    let mount = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64m,mode=0711", "tmpfs"])
        .arg(&s.state_dir)
        .status()
        .unwrap();
    assert!(mount.success());
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _unmount = Unmount(s.state_dir.clone());
    s.restart();
    s.start_sandbox("before", json!({"envs": ["K=v"]}));
    let id = s.boot_id("before");
    // Fill it up.
    let filler = s.state_dir.join("filler");
    let _ = std::process::Command::new("dd")
        .args(["if=/dev/zero", "bs=1M", "count=100"])
        .arg(format!("of={}", filler.display()))
        .stderr(std::process::Stdio::null())
        .status();
    let (code, msg) = s.err(
        "sandbox.start",
        json!({"sandbox": "after", "namespace": "default", "config": {}}),
    );
    assert_eq!(code, -32603, "{msg}");
    assert!(msg.contains("full") && msg.contains("free space"), "{msg}");
    // What runs and what was stored are intact.
    assert_eq!(s.first_line("before", "sh", &["-c", "echo $K"]), "v");
    assert!(listed_one(&s, "default/after").is_none());
    assert_eq!(
        listed_one(&s, "default/before").expect("listed")["running"],
        true
    );
    // With space again, starts work, and a restart still finds everything.
    std::fs::remove_file(&filler).unwrap();
    s.start_sandbox("after", json!({}));
    s.stop_sandbox("after");
    s.terminate(Duration::from_secs(60)).expect("stopped");
    s.restart();
    assert_eq!(s.boot_id("before"), id);
    assert_eq!(s.first_line("before", "sh", &["-c", "echo $K"]), "v");
    assert_eq!(metrics_of(&s, "after")["running"], false);
    s.stop_sandbox("before");
    s.assert_no_leftovers();
}

#[test]
fn a_hung_agent_fails_calls_within_their_timeout_and_stop_still_works() {
    let s = Server::start_with(Options {
        agent_test_hooks: true,
        ..Default::default()
    });
    s.start_sandbox("wedged", json!({}));
    // The agent stops reading its channel for good.
    let (code, msg) = s.err(
        "sandbox.command.run",
        json!({"sandbox": "wedged", "namespace": "default", "command": "moat-test-hook", "args": ["hang"], "timeout": 1}),
    );
    assert_eq!(code, -32603, "{msg}");
    assert!(msg.contains("stopped answering"), "{msg}");
    for (method, params) in [
        (
            "sandbox.command.run",
            json!({"sandbox": "wedged", "namespace": "default", "command": "true", "timeout": 1}),
        ),
        (
            "sandbox.repl.run",
            json!({"sandbox": "wedged", "namespace": "default", "language": "python", "code": "1", "timeout": 1}),
        ),
    ] {
        let t = Instant::now();
        let (code, msg) = s.err(method, params);
        assert_eq!(code, -32603, "{method}: {msg}");
        assert!(msg.contains("stopped answering"), "{method}: {msg}");
        // Timeout (1 s) plus the broker's margin (15 s for commands, 40 s
        // for cells, which may start an interpreter), never an endless wait.
        assert!(t.elapsed() < Duration::from_secs(60), "{:?}", t.elapsed());
        println!("{method} on a hung agent failed after {:?}", t.elapsed());
    }
    assert_eq!(
        metrics_of(&s, "wedged")["running"],
        true,
        "the VM itself runs"
    );
    s.stop_sandbox("wedged");
    s.assert_no_leftovers();
}

#[test]
fn a_killed_agent_fails_calls_clearly_and_stop_still_works() {
    let s = Server::start();
    s.start_sandbox("headless", json!({}));
    // Root in the guest kills the agent's server process (the one in the
    // `moat-agent` cgroup); the call that does it loses its answer.
    let kill = json!({"sandbox": "headless", "namespace": "default", "command": "sh",
        "args": ["-c", "kill -9 $(cat /sys/fs/cgroup/moat-agent/cgroup.procs)"], "timeout": 5});
    let t = Instant::now();
    let (code, msg) = s.err("sandbox.command.run", kill);
    assert_eq!(code, -32603, "{msg}");
    println!("the killing call failed after {:?}: {msg}", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(25), "{:?}", t.elapsed());
    // PID 1 powers the VM off when its server dies: later calls say the VM
    // ended and what to do, at once.
    wait_for("metrics show it stopped", Duration::from_secs(10), || {
        metrics_of(&s, "headless")["running"] == false
    });
    let t = Instant::now();
    let (code, msg) = s.err(
        "sandbox.command.run",
        json!({"sandbox": "headless", "namespace": "default", "command": "true", "timeout": 1}),
    );
    assert_eq!(code, -32603, "{msg}");
    assert!(msg.contains("stop the sandbox"), "{msg}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    // The operator's log names the cause from the guest's console.
    let log = s.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("VM ended without a stop request")
                && l.contains("agent server killed by SIGKILL")),
        "{log}"
    );
    s.stop_sandbox("headless");
    s.assert_no_leftovers();
    s.start_sandbox("headless", json!({}));
    assert_eq!(s.first_line("headless", "echo", &["back"]), "back");
    s.stop_sandbox("headless");
    s.assert_no_leftovers();
}

/// Open fds and resident memory (KiB) of a process.
fn fds_and_rss(pid: i32) -> (usize, u64) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|rd| rd.count())
        .unwrap_or(0);
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0);
    (fds, rss)
}

#[test]
fn churn_leaves_nothing_behind() {
    const CYCLES: usize = 200;
    const WORKERS: usize = 4;
    let s = Server::start_with(Options {
        max_sandboxes: 8,
        ..Default::default()
    });
    let broker = s.broker_pid().expect("broker");
    let cycle = |worker: usize, i: usize| {
        let namespace = ["churn-a", "churn-b"][i % 2];
        let name = format!("w{worker}");
        // Every other cycle with a NIC (tap, firewall elements, resolver).
        let scope = if i % 4 < 2 { "none" } else { "group" };
        s.ok(
            "sandbox.start",
            json!({"sandbox": name, "namespace": namespace, "config": {"scope": scope}}),
        );
        let r = s.ok(
            "sandbox.command.run",
            json!({"sandbox": name, "namespace": namespace, "command": "echo", "args": [format!("{worker}-{i}")]}),
        );
        assert_eq!(
            Server::stdout_lines(&r),
            vec![format!("{worker}-{i}")],
            "{r}"
        );
        s.ok(
            "sandbox.stop",
            json!({"sandbox": name, "namespace": namespace}),
        );
    };
    // Warm-up (first use of every code path), then the baseline.
    for w in 0..WORKERS {
        cycle(w, w);
    }
    let (fds0, rss0) = fds_and_rss(broker);
    let started = Instant::now();
    std::thread::scope(|t| {
        for w in 0..WORKERS {
            let cycle = &cycle;
            t.spawn(move || {
                for i in 0..CYCLES / WORKERS {
                    cycle(w, i);
                }
            });
        }
    });
    let elapsed = started.elapsed();
    // The last stop's process may still be being reaped.
    s.assert_no_leftovers();
    assert_eq!(
        s.jail_dirs(),
        Vec::<std::path::PathBuf>::new(),
        "jail roots left"
    );
    assert_eq!(s.taps(), Vec::<String>::new(), "taps left");
    let (fds1, rss1) = fds_and_rss(broker);
    println!(
        "churn: {CYCLES} start/run/stop cycles, {WORKERS} at a time, in {:.1} s ({:.1} cycles/min); broker fds {fds0} -> {fds1}, RSS {rss0} KiB -> {rss1} KiB",
        elapsed.as_secs_f64(),
        CYCLES as f64 * 60.0 / elapsed.as_secs_f64()
    );
    assert!(fds1 <= fds0 + 4, "broker fds grew: {fds0} -> {fds1}");
    assert!(
        rss1 <= rss0 + 32 * 1024,
        "broker RSS grew by more than 32 MiB: {rss0} -> {rss1} KiB"
    );
    assert_eq!(s.broker_pid(), Some(broker), "the broker never restarted");
}

#[test]
fn a_stop_interrupted_by_a_broker_crash_is_finished() {
    let s = Server::start_with(Options {
        agent_test_hooks: true,
        lifecycle_toml: "stop_sandboxes_on_shutdown = false".into(),
        ..Default::default()
    });
    s.start_sandbox("halting", json!({}));
    s.start_sandbox("bystander", json!({}));
    let id = s.boot_id("bystander");
    std::thread::scope(|t| {
        // A hung agent makes the stop wait limits.stop_timeout_secs (10 s)
        // before it kills the VM: the broker dies in that window.
        t.spawn(|| {
            s.rpc(
                "sandbox.command.run",
                json!({"sandbox": "halting", "namespace": "default", "command": "moat-test-hook", "args": ["hang"], "timeout": 1}),
            )
        });
        std::thread::sleep(Duration::from_millis(500));
        let stop = t.spawn(|| {
            s.rpc(
                "sandbox.stop",
                json!({"sandbox": "halting", "namespace": "default"}),
            )
        });
        std::thread::sleep(Duration::from_secs(2));
        kill9(s.broker_pid().expect("broker"));
        let reply = stop.join().unwrap();
        assert_eq!(reply["error"]["code"], -32000, "{reply}");
    });
    wait_broker_answers(&s);
    assert!(
        s.log_text().contains("its stop was interrupted"),
        "{}",
        s.log_text()
    );
    assert_eq!(metrics_of(&s, "halting")["running"], false);
    wait_for("one VM left", Duration::from_secs(10), || {
        s.vm_pids().len() == 1
    });
    assert_eq!(s.boot_id("bystander"), id);
    s.stop_sandbox("bystander");
    s.assert_no_leftovers();
}
