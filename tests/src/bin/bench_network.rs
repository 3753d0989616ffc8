//! Networking benchmark: guest → test-host TCP throughput (MB/s) and
//! connection set-up latency, measured inside a `public` sandbox against a
//! test host in a network namespace of its own (198.51.100.2; never any
//! other address), and what a NIC adds to `sandbox.start` (scope none vs
//! public, alternating, same server). Throughput is measured with the
//! per-sandbox byte limits off and at the default (64 MiB/s).
//!
//! Usage (root, after `make setup`): `moat-bench-network [RUNS]`

use std::time::Instant;

use moat_e2e::testnet::TestHost;
use moat_e2e::{Options, Server};
use serde_json::json;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn report(name: &str, unit: &str, mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let median = percentile(&v, 0.5);
    println!(
        "{name:<44} n={:<3} median={:>9.2} {unit}  p99={:>9.2} {unit}",
        v.len(),
        median,
        percentile(&v, 0.99),
    );
    median
}

/// A TCP server that, per connection, sends 64 MiB then closes (port 9000),
/// and one that accepts and closes at once (port 9001).
const SERVERS: &str = r#"
import socket, threading, sys
addr = sys.argv[1]
def serve(port, handle):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, port)); s.listen(128)
    while True:
        c, _ = s.accept()
        threading.Thread(target=handle, args=(c,), daemon=True).start()
chunk = b"x" * (1 << 20)
def send(c):
    try:
        for _ in range(64): c.sendall(chunk)
    finally: c.close()
threading.Thread(target=serve, args=(9001, lambda c: c.close()), daemon=True).start()
serve(9000, send)
"#;

/// Guest side: download from port 9000 `n` times, and time `n` connects
/// to port 9001; prints "MBPS x" and "CONNECT_MS y" lines.
const CLIENT: &str = r#"
import socket, time, sys
host, n = sys.argv[1], int(sys.argv[2])
for _ in range(n):
    s = socket.create_connection((host, 9000)); t = time.perf_counter(); total = 0
    while True:
        b = s.recv(1 << 20)
        if not b: break
        total += len(b)
    dt = time.perf_counter() - t; s.close()
    print("MBPS", total / dt / 1e6)
for _ in range(n * 10):
    t = time.perf_counter(); s = socket.create_connection((host, 9001)); dt = time.perf_counter() - t; s.close()
    print("CONNECT_MS", dt * 1000)
"#;

fn measure(s: &Server, name: &str, runs: usize) -> (Vec<f64>, Vec<f64>) {
    s.start_sandbox(
        name,
        json!({"image": "microsandbox/python", "scope": "public"}),
    );
    let r = s.ok(
        "sandbox.command.run",
        json!({"sandbox": name, "namespace": "default", "command": "python3",
               "args": ["-c", CLIENT, "198.51.100.2", runs.to_string()], "timeout": 600}),
    );
    let (mut mbps, mut connect) = (Vec::new(), Vec::new());
    for line in Server::stdout_lines(&r) {
        let mut w = line.split_whitespace();
        match (w.next(), w.next().and_then(|v| v.parse::<f64>().ok())) {
            (Some("MBPS"), Some(v)) => mbps.push(v),
            (Some("CONNECT_MS"), Some(v)) => connect.push(v),
            _ => {}
        }
    }
    assert!(!mbps.is_empty(), "no figures: {r}");
    s.stop_sandbox(name);
    (mbps, connect)
}

fn main() {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10);
    let mut host = TestHost::start("bench", "198.51.100.2", "198.51.100.1", 24);
    let script = std::env::temp_dir().join(format!("moat-bench-net-{}.py", std::process::id()));
    std::fs::write(&script, SERVERS).expect("server script");
    host.spawn_in(&[
        "/usr/bin/python3",
        &script.display().to_string(),
        "198.51.100.2",
    ]);

    // The host's own figure, for scale.
    let out = std::process::Command::new("python3")
        .args(["-c", CLIENT, "198.51.100.2", &runs.to_string()])
        .output()
        .expect("host client");
    let host_mbps: Vec<f64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("MBPS ").and_then(|v| v.parse().ok()))
        .collect();
    let host_connect: Vec<f64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("CONNECT_MS ").and_then(|v| v.parse().ok()))
        .collect();

    let unlimited = Server::start_with(Options {
        network_toml: "egress_bytes_per_sec = 0\ningress_bytes_per_sec = 0\n".into(),
        ..Options::default()
    });
    let (mbps, connect) = measure(&unlimited, "net-raw", runs);
    let capped = Server::start_with(Options::default());
    let (mbps_capped, _) = measure(&capped, "net-capped", runs);

    println!("networking (QEMU TCG, tap + nftables, guest python client, 64 MiB per download)");
    let h = report("host -> test host download", "MB/s", host_mbps);
    let g = report("guest -> test host download (no byte limit)", "MB/s", mbps);
    report(
        "guest download at the default 64 MiB/s limit",
        "MB/s",
        mbps_capped,
    );
    let hc = report("host connect to test host", "ms", host_connect);
    let gc = report("guest connect to test host", "ms", connect);
    println!(
        "ratio guest/host throughput: {:.3}; connect latency guest/host: {:.1}x",
        g / h,
        gc / hc
    );

    let mut none_ms = Vec::new();
    let mut nic_ms = Vec::new();
    for i in 0..runs {
        for (scope, out) in [("none", &mut none_ms), ("public", &mut nic_ms)] {
            let name = format!("start-{scope}-{i}");
            let t = Instant::now();
            unlimited.start_sandbox(&name, json!({"scope": scope}));
            out.push(t.elapsed().as_secs_f64() * 1000.0);
            unlimited.stop_sandbox(&name);
        }
    }
    let a = report("sandbox.start, scope none (no NIC)", "ms", none_ms);
    let b = report(
        "sandbox.start, scope public (tap, rules, DNS)",
        "ms",
        nic_ms,
    );
    println!(
        "networking adds {:.0} ms to a start (median difference)",
        b - a
    );
    let _ = std::fs::remove_file(&script);
}
