//! Networking benchmark: guest ↔ test-host TCP throughput (MB/s) and
//! connect+close cycle time from a `public` sandbox to a test host in a
//! network namespace of its own (198.51.100.2; never any other address),
//! timed by the test host's clock, next to the host's own figures; with the
//! per-sandbox byte limits off and at the default (64 MiB/s; 256 MiB
//! transfers, since nftables admits one second's worth at once); and what a NIC
//! adds to `sandbox.start` (scope none vs public, alternating, same server).
//!
//! Usage (root, after `make setup`): `moat-bench-network [RUNS]`

use std::time::Instant;

use moat_e2e::stats::report;
use moat_e2e::testnet::TestHost;
use moat_e2e::{strip_ansi, Options, Server};
use serde_json::json;

/// Test-host servers, timed with the host's clock (a TCG guest's clock can
/// be coarse): 9000 sinks an upload, 9003 sends 64 MiB, 9001 accepts and
/// closes. Each appends "UPLOAD|DOWNLOAD bytes secs" or "ACCEPT t" lines to
/// the results file.
const SERVERS: &str = r#"
import socket, threading, sys, time
addr, out = sys.argv[1], sys.argv[2]
lock = threading.Lock()
def record(line):
    with lock:
        with open(out, "a") as f: f.write(line + "\n")
def serve(port, handle):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, port)); s.listen(128)
    while True:
        c, _ = s.accept()
        threading.Thread(target=handle, args=(c,), daemon=True).start()
def sink(c):
    n, t0 = 0, None
    while True:
        b = c.recv(1 << 20)
        if not b: break
        if t0 is None: t0 = time.perf_counter()
        n += len(b)
    record("UPLOAD %d %f" % (n, time.perf_counter() - (t0 or time.perf_counter())))
    c.close()
chunk = b"x" * (1 << 20)
def source(c):
    mib = int(c.recv(8).decode().strip())
    t0 = time.perf_counter()
    for _ in range(mib): c.sendall(chunk)
    c.shutdown(socket.SHUT_WR)
    c.recv(1)
    record("DOWNLOAD %d %f" % (mib << 20, time.perf_counter() - t0))
    c.close()
def accept(c):
    record("ACCEPT %f" % time.perf_counter()); c.close()
threading.Thread(target=serve, args=(9001, accept), daemon=True).start()
threading.Thread(target=serve, args=(9003, source), daemon=True).start()
serve(9000, sink)
"#;

/// Client (guest or host): `n` uploads and downloads of MIB MiB each, then
/// `10n` sequential connect+close cycles.
const CLIENT: &str = r#"
import socket, sys, time
host, n, mib = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
chunk = b"y" * (1 << 20)
for _ in range(n):
    s = socket.create_connection((host, 9000))
    for _ in range(mib): s.sendall(chunk)
    s.shutdown(socket.SHUT_WR); s.recv(1); s.close()
    time.sleep(1.2)
for _ in range(n):
    s = socket.create_connection((host, 9003))
    s.sendall(b"%-8d" % mib)
    while s.recv(1 << 20): pass
    s.close()
    time.sleep(0.2)
for _ in range(n * 10):
    s = socket.create_connection((host, 9001)); s.recv(1); s.close()
print("done")
"#;

/// Figures the test host recorded since the last call: (upload MB/s,
/// download MB/s, connect cycle ms).
fn take_results(path: &std::path::Path) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let _ = std::fs::write(path, "");
    let (mut up, mut down, mut accepts) = (Vec::new(), Vec::new(), Vec::new());
    for line in text.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        match w.as_slice() {
            ["UPLOAD", n, secs] | ["DOWNLOAD", n, secs] => {
                let (n, secs): (f64, f64) = (n.parse().unwrap_or(0.0), secs.parse().unwrap_or(0.0));
                if secs > 0.0 {
                    let v = n / secs / 1e6;
                    if w[0] == "UPLOAD" {
                        up.push(v)
                    } else {
                        down.push(v)
                    }
                }
            }
            ["ACCEPT", t] => accepts.push(t.parse::<f64>().unwrap_or(0.0)),
            _ => {}
        }
    }
    let cycles = accepts.windows(2).map(|w| (w[1] - w[0]) * 1000.0).collect();
    (up, down, cycles)
}

fn measure(
    s: &Server,
    name: &str,
    runs: usize,
    mib: u32,
    results: &std::path::Path,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    s.start_sandbox(
        name,
        json!({"image": "microsandbox/python", "scope": "public"}),
    );
    let _ = take_results(results);
    let r = s.ok(
        "sandbox.command.run",
        json!({"sandbox": name, "namespace": "default", "command": "python3",
               "args": ["-c", CLIENT, "198.51.100.2", runs.to_string(), mib.to_string()], "timeout": 600}),
    );
    assert_eq!(Server::stdout_lines(&r), vec!["done".to_string()], "{r}");
    s.stop_sandbox(name);
    take_results(results)
}

fn main() {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10);
    let mut host = TestHost::start("bench", "198.51.100.2", "198.51.100.1", 24);
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let script = dir.path().join("servers.py");
    let results = dir.path().join("results");
    std::fs::write(&script, SERVERS).expect("server script");
    host.spawn_in(&[
        "/usr/bin/python3",
        &script.display().to_string(),
        "198.51.100.2",
        &results.display().to_string(),
    ]);

    // The host's own figures, for scale.
    let out = std::process::Command::new("python3")
        .args(["-c", CLIENT, "198.51.100.2", &runs.to_string(), "64"])
        .output()
        .expect("host client");
    assert!(String::from_utf8_lossy(&out.stdout).contains("done"));
    let (host_up, host_down, host_cycle) = take_results(&results);

    let unlimited = Server::start_with(Options {
        network_toml: "egress_bytes_per_sec = 0\ningress_bytes_per_sec = 0\n".into(),
        ..Options::default()
    });
    let (up, down, cycle) = measure(&unlimited, "net-raw", runs, 64, &results);
    let capped = Server::start_with(Options::default());
    // nftables byte limits admit one second's worth at once, then the rate:
    // 256 MiB at 64 MiB/s is 64 MiB free and 3 s limited (~89 MB/s overall).
    let (up_capped, down_capped, _) = measure(&capped, "net-capped", runs, 256, &results);

    println!("networking (QEMU TCG, tap + nftables; 64 MiB transfers timed by the test host)");
    let hu = report("host -> test host upload", "MB/s", host_up);
    report("test host -> host download", "MB/s", host_down);
    let gu = report("guest -> test host upload (no byte limit)", "MB/s", up);
    report("test host -> guest download (no byte limit)", "MB/s", down);
    report(
        "guest upload, 256 MiB at the 64 MiB/s default",
        "MB/s",
        up_capped,
    );
    report(
        "guest download, 256 MiB at the 64 MiB/s default",
        "MB/s",
        down_capped,
    );
    let hc = report("host connect+close cycle", "ms", host_cycle);
    let gc = report("guest connect+close cycle", "ms", cycle);
    println!(
        "ratio guest/host upload: {:.3}; connect cycle guest/host: {:.1}x",
        gu / hu,
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
    // The broker's own measure of the network set-up (tap, nft, DNS, ports).
    let attach_ms: Vec<f64> = unlimited
        .log_text()
        .lines()
        .filter(|l| l.contains("network attached") && l.contains("start-public"))
        .map(strip_ansi)
        .filter_map(|l| {
            let at = l.find("attach_us=")? + "attach_us=".len();
            let digits: String = l[at..].chars().take_while(char::is_ascii_digit).collect();
            digits.parse::<f64>().ok().map(|us| us / 1000.0)
        })
        .collect();
    report(
        "network set-up inside sandbox.start (broker)",
        "ms",
        attach_ms,
    );
}
