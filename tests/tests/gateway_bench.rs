//! The gateway benchmark (`make bench-gateway`; ignored by `cargo test`):
//! wrk on loopback against `GET /api/v1/health` and an authenticated
//! `sandbox.metrics.get` (broker running, no VM), with the per-key rate and
//! concurrency limits raised out of the way. Prints requests/s and latency
//! percentiles; fails only if a request is answered with an error.

use std::process::Command;

use moat_e2e::{Options, Server};

/// (requests/s, p50, p99, non-2xx count) from wrk's `--latency` output.
fn parse(out: &str) -> (f64, String, String, u64) {
    let field = |prefix: &str| {
        out.lines()
            .find(|l| l.trim_start().starts_with(prefix))
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap_or("?")
            .to_string()
    };
    let rps = field("Requests/sec:").parse().unwrap_or(0.0);
    let non2xx = out
        .lines()
        .find(|l| l.contains("Non-2xx or 3xx responses:"))
        .and_then(|l| l.rsplit(':').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    (rps, field("50%"), field("99%"), non2xx)
}

fn wrk(name: &str, url: &str, script: Option<&std::path::Path>, secs: u32) {
    let mut cmd = Command::new("wrk");
    cmd.args(["-t2", "-c16", &format!("-d{secs}s"), "--latency"]);
    if let Some(script) = script {
        cmd.arg("-s").arg(script);
    }
    let out = cmd
        .arg(url)
        .output()
        .expect("wrk (installed by packaging/dev/setup.sh)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "wrk failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (rps, p50, p99, non2xx) = parse(&text);
    println!("{name:<44} {rps:>10.0} req/s   p50 {p50:>9}   p99 {p99:>9}");
    assert_eq!(non2xx, 0, "{name}: error answers under load:\n{text}");
}

#[test]
#[ignore = "benchmark: run with `make bench-gateway`"]
fn bench_gateway() {
    let secs: u32 = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let s = Server::start_with(Options {
        keys: true,
        gateway_toml: "[limits]\nrequests_per_sec = 1000000000.0\nburst = 1000000000\nmax_concurrent_per_key = 10000\n".into(),
        ..Options::default()
    });
    let key = s.keygen(&["*"], "1h");
    let script = s.dir.path().join("metrics.lua");
    std::fs::write(
        &script,
        format!(
            "wrk.method = \"POST\"\n\
             wrk.body = '{{\"jsonrpc\":\"2.0\",\"method\":\"sandbox.metrics.get\",\"params\":{{\"namespace\":\"*\"}},\"id\":1}}'\n\
             wrk.headers[\"Content-Type\"] = \"application/json\"\n\
             wrk.headers[\"Authorization\"] = \"Bearer {}\"\n",
            key.token
        ),
    )
    .unwrap();
    println!(
        "wrk -t2 -c16 -d{secs}s on loopback, {} cores",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    wrk(
        "GET /api/v1/health (broker Health call)",
        &format!("{}/api/v1/health", s.url),
        None,
        secs,
    );
    wrk(
        "POST sandbox.metrics.get (JWT + broker)",
        &format!("{}/api/v1/rpc", s.url),
        Some(&script),
        secs,
    );
}
