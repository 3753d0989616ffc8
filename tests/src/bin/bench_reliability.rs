//! Reliability benchmark: after `kill -9` of the broker, how long until every
//! running sandbox answers `command.run` again (the supervisor starts a new
//! broker, which re-adopts the VMs), with the broker's own recovery time
//! from its log; next to the baseline of starting the same sandboxes cold
//! (what a restart that lost them would cost), measured in the same run.
//! Then start → run → stop churn cycles per minute at 4 concurrent clients.
//!
//! Usage (root, after `make setup`): `moat-bench-reliability [RUNS] [SANDBOXES]`

use std::time::{Duration, Instant};

use moat_e2e::stats::report;
use moat_e2e::{strip_ansi, Options, Server};
use serde_json::json;

const WORKERS: usize = 4;

fn answers(s: &Server, name: &str) -> bool {
    let r = s.rpc(
        "sandbox.command.run",
        json!({"sandbox": name, "namespace": "default", "command": "true"}),
    );
    r.get("result").is_some()
}

/// Runs `job(i)` for `i in 0..n` on [`WORKERS`] threads.
fn in_parallel(n: usize, job: impl Fn(usize) + Sync) {
    std::thread::scope(|t| {
        for w in 0..WORKERS {
            let job = &job;
            t.spawn(move || {
                let mut i = w;
                while i < n {
                    job(i);
                    i += WORKERS;
                }
            });
        }
    });
}

/// The `ms=` of the last "state recovered" line in the server log.
fn recovery_ms(log: &str) -> Option<f64> {
    let line = log.lines().rev().find(|l| l.contains("state recovered"))?;
    strip_ansi(line)
        .split_whitespace()
        .find_map(|w| w.strip_prefix("ms="))
        .and_then(|v| v.parse().ok())
}

fn main() {
    let mut args = std::env::args().skip(1);
    let runs: usize = args.next().and_then(|v| v.parse().ok()).unwrap_or(3);
    let count: usize = args.next().and_then(|v| v.parse().ok()).unwrap_or(10);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("moat reliability benchmark: {runs} runs, {count} sandboxes; load {load}");
    let s = Server::start_with(Options {
        max_sandboxes: count as u32 + 2,
        lifecycle_toml: "stop_sandboxes_on_shutdown = false".into(),
        limits_toml: format!("max_sandboxes_per_namespace = {}", count + 2),
        ..Default::default()
    });
    let names: Vec<String> = (0..count).map(|i| format!("r{i}")).collect();

    let mut cold = Vec::new();
    let mut adopt = Vec::new();
    let mut broker_ms = Vec::new();
    for run in 0..runs {
        let t = Instant::now();
        in_parallel(count, |i| s.start_sandbox(&names[i], json!({})));
        cold.push(t.elapsed().as_secs_f64() * 1000.0);

        let broker = s.broker_pid().expect("broker pid");
        let t = Instant::now();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(broker),
            nix::sys::signal::Signal::SIGKILL,
        )
        .expect("kill the broker");
        in_parallel(count, |i| {
            while !answers(&s, &names[i]) {
                assert!(t.elapsed() < Duration::from_secs(300), "not back in 5 min");
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        adopt.push(t.elapsed().as_secs_f64() * 1000.0);
        if let Some(ms) = recovery_ms(&s.log_text()) {
            broker_ms.push(ms);
        }
        assert_eq!(s.vm_pids().len(), count, "run {run}: every VM kept");
        in_parallel(count, |i| s.stop_sandbox(&names[i]));
    }
    println!();
    let cold_ms = report(
        &format!("cold start of {count} sandboxes ({WORKERS} at once)"),
        "ms",
        cold,
    );
    let adopt_ms = report(
        &format!("kill -9 broker -> {count} sandboxes answer"),
        "ms",
        adopt,
    );
    let broker_recovery = report("  of which the broker's state recovery", "ms", broker_ms);
    println!(
        "{:<44} {:.2}x the cold start",
        "re-adoption / cold start",
        adopt_ms / cold_ms
    );

    let cycles = 40;
    let mut per_cycle = Vec::new();
    let lock = std::sync::Mutex::new(&mut per_cycle);
    let t = Instant::now();
    in_parallel(cycles, |i| {
        let name = format!("c{}", i % WORKERS);
        let c = Instant::now();
        s.start_sandbox(&name, json!({}));
        s.run(&name, "true", &[]);
        s.stop_sandbox(&name);
        if let Ok(mut v) = lock.lock() {
            v.push(c.elapsed().as_secs_f64() * 1000.0);
        }
    });
    let per_min = cycles as f64 * 60.0 / t.elapsed().as_secs_f64();
    report("churn cycle (start, run true, stop)", "ms", per_cycle);
    println!("{:<44} {per_min:.1}", "churn cycles per minute (4 clients)");
    s.assert_no_leftovers();
    println!(
        "{}",
        json!({
            "cold_start_ms": cold_ms,
            "readoption_ms": adopt_ms,
            "broker_recovery_ms": broker_recovery,
            "churn_cycles_per_min": per_min,
            "sandboxes": count,
            "load": load.trim(),
        })
    );
}
