//! The warm pool, with real VMs: a pooled start gives a sandbox that cannot
//! be told from a cold one (same image content, its config applied, its own
//! writable layer, hostname, machine id and randomness), with the Python
//! interpreter already running for its first cell; the pool refills; a pool
//! VM that dies is replaced and never handed out; stop destroys the VM;
//! configs a pool cannot serve boot cold; a restarted broker sweeps the old
//! pool and fills a new one while re-adopting claimed sandboxes. Every other
//! suite runs without a pool.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use moat_e2e::{Options, Server};
use serde_json::{json, Value};

const PY: &str = "microsandbox/python";

fn pooled(count: u32, lifecycle: &str) -> Options {
    Options {
        broker_toml: format!(
            "[pool]\nbudget_mib = 8192\n[[pool.entries]]\nimage = \"{PY}\"\ncount = {count}\nwarm = [\"python\"]\n"
        ),
        gateway_toml: "[metrics]\non_public_listener = true\n".into(),
        lifecycle_toml: lifecycle.into(),
        ..Default::default()
    }
}

fn pool_metrics(s: &Server) -> BTreeMap<String, f64> {
    s.pool_metrics()
}

fn metric(s: &Server, name: &str) -> f64 {
    pool_metrics(s).get(name).copied().unwrap_or(-1.0)
}

fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn wait_ready(s: &Server, n: f64) {
    s.wait_pool_ready(n, Duration::from_secs(240));
}

fn sh(s: &Server, name: &str, script: &str) -> Vec<String> {
    let r = s.run(name, "sh", &["-c", script]);
    assert_eq!(r["exit_code"], 0, "{script}: {r}");
    Server::stdout_lines(&r)
}

/// Whether the broker logged that `name` was served by a pool VM.
fn claimed(s: &Server, name: &str) -> bool {
    let quoted = format!("sandbox=\"{name}\"");
    let plain = format!("sandbox={name} ");
    s.log_text().lines().map(moat_e2e::strip_ansi).any(|l| {
        l.contains("claimed a VM from the warm pool") && (l.contains(&quoted) || l.contains(&plain))
    })
}

/// What a sandbox shows of itself that must not depend on how it started.
const SELF_PORTRAIT: &str = "ls /; id; env | grep -v '^HOSTNAME=' | sort; pwd; \
    ls /.sandbox/scripts; grep -v '^proc\\|^sysfs' /proc/mounts | cut -d' ' -f2,3 | sort; \
    sha256sum /usr/local/bin/python3* /usr/bin/python3* 2>/dev/null | sort";

#[test]
fn a_pooled_start_is_a_fresh_sandbox_with_its_own_config_and_identity() {
    let s = Server::start_with(pooled(2, ""));
    wait_ready(&s, 2.0);
    let config = json!({
        "image": PY,
        "envs": ["GREETING=hi"],
        "workdir": "/tmp",
        "scripts": {"start": "echo started > /tmp/bg"},
    });
    s.start_sandbox("first", config.clone());
    assert!(claimed(&s, "first"), "first came from the pool");
    s.start_sandbox("second", json!({"image": PY}));
    assert!(claimed(&s, "second"), "second came from the pool");
    let m = pool_metrics(&s);
    assert_eq!(m["hits_total"], 2.0, "{m:?}");
    assert_eq!(m["misses_total"], 0.0, "{m:?}");

    // The config is applied at claim: hostname, envs, workdir, scripts and
    // the background process.
    assert_eq!(sh(&s, "first", "hostname"), ["first"]);
    assert_eq!(sh(&s, "first", "echo $GREETING; pwd"), ["hi", "/tmp"]);
    wait_for("the start script ran", Duration::from_secs(30), || {
        s.run("first", "cat", &["/tmp/bg"])["exit_code"] == 0
    });
    // The warm interpreter was started without GREETING and in /: the
    // first cell gets one started with the sandbox's env and workdir.
    let r = s.repl(
        "first",
        "python",
        "import os; print(os.environ.get('GREETING'), os.getcwd())",
    );
    assert_eq!(r["output"][0]["text"], "hi /tmp", "{r}");

    // Identity and randomness are the sandbox's own.
    let id = |n: &str| {
        sh(
            &s,
            n,
            "cat /etc/machine-id; hostname; od -An -tx1 -N16 /dev/urandom",
        )
    };
    let (a, b) = (id("first"), id("second"));
    assert_eq!(a[0].len(), 32, "{a:?}");
    assert!(a[0].bytes().all(|c| c.is_ascii_hexdigit()), "{a:?}");
    assert_ne!(a[0], b[0], "machine ids differ");
    assert_eq!(b[1], "second");
    assert_ne!(a[2], b[2], "random bytes differ");
    let seed = |n: &str| {
        s.repl(n, "python", "import random; print(random.getrandbits(64))")["output"][0]["text"]
            .clone()
    };
    assert_ne!(
        seed("first"),
        seed("second"),
        "Python's random seeds differ"
    );

    // Each writable layer is the sandbox's own.
    sh(&s, "second", "echo mine > /root/marker");
    assert_eq!(
        s.run("first", "cat", &["/root/marker"])["exit_code"],
        1,
        "a sibling's file is not visible"
    );

    // A cold sandbox with the same config (another size: no pool serves
    // it) looks the same from inside.
    let mut cold = config.clone();
    cold["memory"] = json!(640);
    s.start_sandbox("cold", cold);
    assert!(!claimed(&s, "cold"), "cold booted cold");
    wait_for("the cold start script ran", Duration::from_secs(30), || {
        s.run("cold", "cat", &["/tmp/bg"])["exit_code"] == 0
    });
    assert_eq!(
        sh(&s, "cold", SELF_PORTRAIT),
        sh(&s, "first", SELF_PORTRAIT)
    );
    assert_eq!(
        sh(&s, "cold", "hostname; cat /etc/machine-id | wc -c"),
        ["cold", "33"]
    );

    // The pool refills behind the claims.
    wait_ready(&s, 2.0);
    let m = pool_metrics(&s);
    assert!(m["refills_total"] >= 4.0, "{m:?}");
    assert!(m["refill_seconds_total"] > 0.0, "{m:?}");
}

#[test]
fn a_first_cell_in_a_pooled_sandbox_runs_in_the_warm_interpreter() {
    let s = Server::start_with(pooled(1, ""));
    wait_ready(&s, 1.0);
    let t = Instant::now();
    s.start_sandbox("warm", json!({"image": PY}));
    let r = s.repl(
        "warm",
        "python",
        "import os\nst = open('/proc/self/stat').read().rsplit(')', 1)[1].split()\n\
         up = float(open('/proc/uptime').read().split()[0])\n\
         print(up - int(st[19]) / os.sysconf('SC_CLK_TCK'))",
    );
    let since_start = t.elapsed().as_secs_f64();
    let age: f64 = r["output"][0]["text"]
        .as_str()
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("{r}"));
    // The interpreter is older than the sandbox: it was started in the pool.
    assert!(
        age > since_start,
        "interpreter age {age} s, sandbox.start was called {since_start} s ago"
    );
}

#[test]
fn a_dead_pool_vm_is_never_handed_out_and_is_replaced() {
    let s = Server::start_with(pooled(2, ""));
    wait_ready(&s, 2.0);
    let before = s.vm_pids();
    assert_eq!(before.len(), 2, "{before:?}");
    for (pid, _) in &before {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .expect("kill -9 a pool VM");
    }
    // At once: the pool holds two dead VMs; neither may be handed out.
    s.start_sandbox("after", json!({"image": PY}));
    assert_eq!(s.run("after", "true", &[])["exit_code"], 0);
    let now: Vec<i32> = s.vm_pids().into_iter().map(|(p, _)| p).collect();
    assert!(
        before.iter().all(|(p, _)| !now.contains(p)),
        "killed VMs are gone: {before:?} vs {now:?}"
    );
    assert!(!claimed(&s, "after"), "the dead VMs were not claimed");
    // Both are replaced.
    wait_ready(&s, 2.0);
    let m = pool_metrics(&s);
    assert!(m["failures_total"] >= 2.0, "{m:?}");
    s.start_sandbox("next", json!({"image": PY}));
    assert!(claimed(&s, "next"));
    assert_eq!(s.run("next", "true", &[])["exit_code"], 0);
}

#[test]
fn stop_destroys_a_pooled_vm_and_unservable_configs_boot_cold() {
    let s = Server::start_with(pooled(1, ""));
    wait_ready(&s, 1.0);
    let pool_vm: Vec<i32> = s.vm_pids().into_iter().map(|(p, _)| p).collect();
    s.start_sandbox("used", json!({"image": PY}));
    assert!(claimed(&s, "used"));
    s.stop_sandbox("used");
    wait_for("the claimed VM is gone", Duration::from_secs(20), || {
        let now: Vec<i32> = s.vm_pids().into_iter().map(|(p, _)| p).collect();
        pool_vm.iter().all(|p| !now.contains(p))
    });

    // A NIC (scope, ports), volumes, another image, size or cpus: each
    // boots cold, with a ready pool VM there to be (wrongly) taken.
    let hits = metric(&s, "hits_total");
    for (name, config) in [
        ("with-scope", json!({"image": PY, "scope": "group"})),
        ("with-ports", json!({"image": PY, "ports": ["8123:8000"]})),
        (
            "with-volume",
            json!({"image": PY, "volumes": ["pooltest:/data"]}),
        ),
        ("other-image", json!({})),
        ("other-size", json!({"image": PY, "memory": 640})),
        ("other-cpus", json!({"image": PY, "cpus": 2})),
    ] {
        wait_ready(&s, 1.0);
        s.start_sandbox(name, config);
        assert!(!claimed(&s, name), "{name} booted cold");
        assert_eq!(s.run(name, "true", &[])["exit_code"], 0, "{name}");
        s.stop_sandbox(name);
    }
    assert_eq!(metric(&s, "hits_total"), hits);
    drop(s);
}

#[test]
fn a_restarted_broker_keeps_claimed_sandboxes_and_fills_a_new_pool() {
    let s = Server::start_with(pooled(1, "stop_sandboxes_on_shutdown = false"));
    wait_ready(&s, 1.0);
    s.start_sandbox("kept", json!({"image": PY}));
    assert!(claimed(&s, "kept"));
    wait_ready(&s, 1.0);
    let boot_id = s.boot_id("kept");
    let pool_vms: Vec<i32> = s.vm_pids().into_iter().map(|(p, _)| p).collect();
    assert_eq!(pool_vms.len(), 2, "the claimed VM and a new pool VM");
    let broker = s.broker_pid().expect("broker");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(broker),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill -9 the broker");
    wait_for("the broker is back", Duration::from_secs(120), || {
        s.broker_pid().is_some_and(|p| p != broker)
            && matches!(s.get("/api/v1/health"), Ok((200, _)))
    });
    // The claimed sandbox was re-adopted: same boot.
    assert_eq!(s.boot_id("kept"), boot_id);
    // The old pool VM was swept (it belonged to no record); a new one boots.
    wait_ready(&s, 1.0);
    let now: Vec<i32> = s.vm_pids().into_iter().map(|(p, _)| p).collect();
    assert_eq!(now.len(), 2, "{now:?}");
    let m: Value = json!(pool_metrics(&s));
    assert_eq!(m["hits_total"], 0.0, "counters start again: {m}");
    s.start_sandbox("after-restart", json!({"image": PY}));
    assert!(claimed(&s, "after-restart"));
    s.stop_sandbox("after-restart");
    s.stop_sandbox("kept");
}
