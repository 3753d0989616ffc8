//! Reliability: the broker's durable state, and VMs that survive the broker.
//! A broker killed with SIGKILL (mid-start, mid-command, with sandboxes
//! running) is started again by its supervisor and re-adopts what runs
//! (the guests do not reboot: same boot id, uptime going on); a start it was
//! in the middle of is cleaned; a broker stopped with SIGTERM leaves the VMs
//! for the next one; a VM process killed under a sandbox is reported and
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

fn first_line(s: &Server, name: &str, command: &str, args: &[&str]) -> String {
    let r = s.run(name, command, args);
    Server::stdout_lines(&r)
        .into_iter()
        .next()
        .unwrap_or_else(|| panic!("{command} printed nothing in {name}: {r}"))
}

/// The guest kernel's boot id: the same only if the guest did not reboot.
fn boot_id(s: &Server, name: &str) -> String {
    first_line(s, name, "cat", &["/proc/sys/kernel/random/boot_id"])
}

/// Seconds since the guest booted.
fn uptime(s: &Server, name: &str) -> f64 {
    first_line(s, name, "cat", &["/proc/uptime"])
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
        .map(|n| (boot_id(&s, n), uptime(&s, n)))
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
        assert_eq!(&boot_id(&s, n), id, "{n} did not reboot");
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
    assert_eq!(first_line(&s, "half", "echo", &["back"]), "back");
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
    let id = boot_id(&s, "stay");
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

    s.restart();
    assert_eq!(boot_id(&s, "stay"), id);
    assert_eq!(first_line(&s, "stay", "cat", &["/tmp/f"]), "data");
    // The definition (with its envs) came back with it.
    assert_eq!(first_line(&s, "stay", "sh", &["-c", "echo $MARK"]), "kept");
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
    s.stop_sandbox("victim");
    s.assert_no_leftovers();
    s.start_sandbox("victim", json!({}));
    assert_eq!(first_line(&s, "victim", "echo", &["again"]), "again");
    s.stop_sandbox("victim");
    s.assert_no_leftovers();
}
