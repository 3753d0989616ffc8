//! Foundation benchmark: `sandbox.start` latency (request to response, a fresh
//! sandbox each time), `sandbox.command.run` round trip for `true`, the first
//! `sandbox.repl.run` of a sandbox (interpreter start) and warm `print(1)`
//! round trips for Python and Node, and the VM process's peak RSS — each over
//! repeated runs, printed as median and p99.
//!
//! Usage (root, after `make setup`): `moat-bench-foundation [RUNS]`

use std::time::{Duration, Instant};

use moat_e2e::stats::report;
use moat_e2e::{peak_rss_kib, Options, Server};
use serde_json::json;

fn main() {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10);
    let s = Server::start();
    let mut start_ms = Vec::new();
    let mut rss_mib = Vec::new();
    for i in 0..runs {
        let name = format!("bench-{i}");
        let t = Instant::now();
        s.start_sandbox(&name, json!({"memory": 512}));
        start_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        let r = s.run(&name, "true", &[]);
        assert_eq!(r["exit_code"], 0);
        if let Some((pid, _)) = s.vm_pids().first() {
            if let Some(kib) = peak_rss_kib(*pid) {
                rss_mib.push(kib as f64 / 1024.0);
            }
        }
        s.stop_sandbox(&name);
    }
    // The same starts without the jail (the development switch), for what
    // the jail costs.
    let mut unjailed_ms = Vec::new();
    {
        let u = Server::start_with(Options {
            unjailed: true,
            ..Options::default()
        });
        for i in 0..runs {
            let name = format!("bench-unjailed-{i}");
            let t = Instant::now();
            u.start_sandbox(&name, json!({"memory": 512}));
            unjailed_ms.push(t.elapsed().as_secs_f64() * 1000.0);
            u.stop_sandbox(&name);
        }
    }
    s.start_sandbox("bench-rt", json!({}));
    // Warm up the guest's page cache for `true`.
    for _ in 0..3 {
        s.run("bench-rt", "true", &[]);
    }
    let mut rt_ms = Vec::new();
    for _ in 0..100 {
        let t = Instant::now();
        let r = s.run("bench-rt", "true", &[]);
        rt_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(r["exit_code"], 0);
    }
    std::thread::sleep(Duration::from_millis(100));
    s.stop_sandbox("bench-rt");

    let mut repl_figures = Vec::new();
    for (image, language, code) in [
        ("microsandbox/python", "python", "print(1)"),
        ("microsandbox/node", "nodejs", "console.log(1)"),
    ] {
        let mut first_ms = Vec::new();
        let mut warm_ms = Vec::new();
        for i in 0..runs.div_ceil(2).max(2) {
            let name = format!("bench-{language}-{i}");
            s.start_sandbox(&name, json!({"image": image}));
            let t = Instant::now();
            let r = s.repl(&name, language, code);
            first_ms.push(t.elapsed().as_secs_f64() * 1000.0);
            assert_eq!(r["status"], "success", "{r}");
            if i == 0 {
                for _ in 0..100 {
                    let t = Instant::now();
                    let r = s.repl(&name, language, code);
                    warm_ms.push(t.elapsed().as_secs_f64() * 1000.0);
                    assert_eq!(r["output"][0]["text"], "1");
                }
            }
            s.stop_sandbox(&name);
        }
        repl_figures.push((language, first_ms, warm_ms));
    }
    println!("moat foundation benchmark ({runs} runs; QEMU accel as chosen by the broker)");
    report("sandbox.start (request -> response)", "ms", start_ms);
    report(
        "sandbox.start without the jail (dev switch)",
        "ms",
        unjailed_ms,
    );
    report("command.run `true` round trip", "ms", rt_ms);
    report("VM process peak RSS (VmHWM) after `true`", "MiB", rss_mib);
    for (language, first, warm) in repl_figures {
        report(
            &format!("first repl.run ({language}, cold interpreter)"),
            "ms",
            first,
        );
        report(&format!("warm repl.run print(1) ({language})"), "ms", warm);
    }
}
