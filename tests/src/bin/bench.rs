//! `moat-bench` (`make bench`): moat's speed next to baselines measured in
//! the same run, each figure a median and p99 of repeated runs, printed as
//! a table and written as JSON.
//!
//! - Boot: a bare QEMU boot of the same kernel, initramfs and image to the
//!   agent's first byte without moat (`bare_vm.rs`) vs `sandbox.start` cold
//!   over HTTP, as a ratio; the same start without the jail.
//! - Calls: the raw agent channel round trip (`Hello`) and a raw `Exec` of
//!   `true` on the bare VM vs `command.run true` over HTTP; warm
//!   `repl.run print(1)` (Python, Node).
//! - First code: `sandbox.start` + first `repl.run print(1)`, cold.
//! - Warm pool: `sandbox.start` served from the pool, and with its first
//!   `repl.run print(1)` (Python, Node), every run a pool hit.
//! - Memory: an idle sandbox's VM process RSS and cgroup usage; the broker's
//!   and the gateway's RSS.
//! - Throughput: start → `true` → stop cycles per minute with 4 clients.
//! - Gateway: requests/s and p99 of `GET /api/v1/health` and an
//!   authenticated `sandbox.metrics.get` (answers kept the default 500 ms,
//!   and not kept) under wrk, next to nginx serving a small static file on
//!   the same machine at the same concurrency, each with the CPU time per
//!   request of every process involved (gateway, broker, nginx, wrk); and
//!   an unknown path (404 from the HTTP stack and request middleware
//!   alone), the ceiling of anything the gateway answers. The rows run in
//!   rounds (`--runs`, at most 5), every row once per round; figures are
//!   medians over the rounds, ratios medians of the rounds' ratios.
//!
//! Usage (root, after `make setup`):
//! `moat-bench [--runs N] [--http-secs N] [--json FILE] [--only SECTIONS]`
//! (default 10 runs, 10 s per wrk run, `target/moat-bench.json`, every
//! section; `--only pool,gateway` runs those: boot, calls, memory,
//! interpreters, churn, jail, pool, gateway).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use moat_e2e::bare_vm::{BareImage, BareVm};
use moat_e2e::stats::{summarise, Summary};
use moat_e2e::wrk::{self, StaticNginx};
use moat_e2e::{build_dir, free_port, Options, Server};
use serde_json::{json, Value};

/// Every figure of the run, by name, for the JSON file.
#[derive(Default)]
struct Figures(BTreeMap<String, Value>);

impl Figures {
    fn add(&mut self, name: &str, unit: &str, v: Vec<f64>) -> Summary {
        let s = summarise(name, unit, v);
        self.0.insert(
            name.to_string(),
            json!({"unit": unit, "n": s.n, "median": s.median, "p99": s.p99, "min": s.min}),
        );
        s
    }

    fn ratio(&mut self, name: &str, value: f64) {
        println!("{name:<52} {value:.2}x");
        self.0.insert(name.to_string(), json!({"ratio": value}));
    }

    fn value(&mut self, name: &str, unit: &str, value: f64) {
        println!("{name:<52} {value:.1} {unit}");
        self.0
            .insert(name.to_string(), json!({"unit": unit, "value": value}));
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn rss_mib(pid: i32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

struct Args {
    runs: usize,
    http_secs: u32,
    json: PathBuf,
    /// Empty: every section.
    sections: Vec<String>,
}

/// The sections `--only` picks from, in the order they run.
const SECTIONS: [&str; 8] = [
    "boot",
    "calls",
    "memory",
    "interpreters",
    "churn",
    "jail",
    "pool",
    "gateway",
];

fn args() -> Args {
    let mut a = Args {
        runs: 10,
        http_secs: 10,
        json: PathBuf::from("target/moat-bench.json"),
        sections: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--runs" => a.runs = it.next().and_then(|v| v.parse().ok()).expect("--runs N"),
            "--http-secs" => {
                a.http_secs = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--http-secs N")
            }
            "--json" => a.json = it.next().map(PathBuf::from).expect("--json FILE"),
            "--only" => {
                let list = it.next().expect("--only SECTION[,SECTION...]");
                for section in list.split(',') {
                    assert!(
                        SECTIONS.contains(&section),
                        "--only: unknown section {section:?}; choose from {}",
                        SECTIONS.join(", ")
                    );
                    a.sections.push(section.to_owned());
                }
            }
            other => panic!(
                "unknown argument {other:?}: moat-bench [--runs N] [--http-secs N] [--json FILE] [--only {}]",
                SECTIONS.join(",")
            ),
        }
    }
    a.runs = a.runs.max(2);
    a
}

/// Starts served by the warm pool: the start alone, and with its first
/// cell, for Python and Node, each from a pool of one VM that is refilled
/// (and waited for) between runs, so every start is a hit.
fn pool(f: &mut Figures, runs: usize) {
    let s = Server::start_with(Options {
        broker_toml: "[pool]\nbudget_mib = 4096\n\
            [[pool.entries]]\nimage = \"microsandbox/python\"\ncount = 1\nwarm = [\"python\"]\n\
            [[pool.entries]]\nimage = \"microsandbox/node\"\ncount = 1\nwarm = [\"nodejs\"]\n"
            .into(),
        gateway_toml: "[metrics]\non_public_listener = true\n".into(),
        ..Options::default()
    });
    let ready_wait = Duration::from_secs(300);
    for (image, language, code) in [
        ("microsandbox/python", "python", "print(1)"),
        ("microsandbox/node", "nodejs", "console.log(1)"),
    ] {
        let mut start_ms = Vec::new();
        let mut first_ms = Vec::new();
        for i in 0..runs {
            for with_cell in [false, true] {
                s.wait_pool_ready(2.0, ready_wait);
                let hits = s.pool_metrics().get("hits_total").copied().unwrap_or(0.0);
                let name = format!("pooled-{language}-{i}-{with_cell}");
                let t = Instant::now();
                s.start_sandbox(&name, json!({"image": image}));
                if with_cell {
                    let r = s.repl(&name, language, code);
                    first_ms.push(ms(t.elapsed()));
                    assert_eq!(r["output"][0]["text"], "1", "{r}");
                } else {
                    start_ms.push(ms(t.elapsed()));
                }
                let now = s.pool_metrics().get("hits_total").copied().unwrap_or(0.0);
                assert_eq!(now, hits + 1.0, "{name} was served by the pool");
                s.stop_sandbox(&name);
            }
        }
        f.add(
            &format!("sandbox.start from the warm pool ({language})"),
            "ms",
            start_ms,
        );
        f.add(
            &format!("sandbox.start + first repl.run ({language}), pooled"),
            "ms",
            first_ms,
        );
    }
    let m = s.pool_metrics();
    if let (Some(n), Some(secs)) = (m.get("refills_total"), m.get("refill_seconds_total")) {
        if *n > 0.0 {
            f.value(
                "pool VM boot + warm-up (mean of refills)",
                "ms",
                secs / n * 1000.0,
            );
        }
    }
}

/// wrk connections in every gateway row (and nginx's).
const CONNECTIONS: u32 = 16;

/// A stack with keys whose per-key limits stay out of wrk's way, and
/// `gateway_toml` added to its gateway config.
fn bench_server(gateway_toml: &str) -> Server {
    Server::start_with(Options {
        keys: true,
        gateway_toml: format!(
            "[limits]\nrequests_per_sec = 1000000000.0\nburst = 1000000000\n\
             max_concurrent_per_key = 10000\n{gateway_toml}"
        ),
        ..Options::default()
    })
}

/// A wrk script asking `s` for `sandbox.metrics.get` of every namespace
/// with a key of its own.
fn metrics_script(s: &Server) -> PathBuf {
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
    .expect("write the wrk script");
    script
}

/// `s`'s gateway and broker, whose CPU time each row reads.
fn processes(s: &Server) -> [(&'static str, i32); 2] {
    [
        ("moat-gateway", s.gateway_pid().expect("the gateway runs")),
        ("moat-broker", s.broker_pid().expect("the broker runs")),
    ]
}

/// Gateway requests under wrk next to nginx's static file, same load, in
/// `rounds` rounds (every row once per round, so a shared host's slow
/// spells touch every row alike); each row's figures are medians over the
/// rounds, each ratio the median of the rounds' ratios.
fn gateway(f: &mut Figures, secs: u32, rounds: usize) {
    let s = bench_server("");
    let script = metrics_script(&s);
    // The same question with no answer kept: every request that does not
    // join a call in flight asks the broker.
    let fresh = bench_server("[timeouts]\nmetrics_max_age_ms = 0\n");
    let fresh_script = metrics_script(&fresh);
    let nginx = StaticNginx::start(free_port());
    let moat = processes(&s);
    let rpc = format!("{}/api/v1/rpc", s.url);
    let fresh_rpc = format!("{}/api/v1/rpc", fresh.url);
    type Run<'a> = Box<dyn Fn() -> (wrk::Load, wrk::CpuPerRequest) + 'a>;
    let rows: [(&str, Run); 5] = [
        (
            "nginx static file (baseline)",
            Box::new(|| {
                wrk::cpu_per_request(&[("nginx", nginx.pid())], || {
                    wrk::run(&nginx.url, None, CONNECTIONS, secs)
                })
            }),
        ),
        (
            "GET /api/v1/health (broker Health call)",
            Box::new(|| {
                wrk::cpu_per_request(&moat, || {
                    wrk::run(&format!("{}/api/v1/health", s.url), None, CONNECTIONS, secs)
                })
            }),
        ),
        (
            "POST sandbox.metrics.get (key + broker, answers kept 500 ms)",
            Box::new(|| {
                wrk::cpu_per_request(&moat, || wrk::run(&rpc, Some(&script), CONNECTIONS, secs))
            }),
        ),
        (
            "POST sandbox.metrics.get (answers not kept)",
            Box::new(|| {
                wrk::cpu_per_request(&processes(&fresh), || {
                    wrk::run(&fresh_rpc, Some(&fresh_script), CONNECTIONS, secs)
                })
            }),
        ),
        // The ceiling of anything the gateway answers here: its HTTP stack
        // and request middleware alone (no key, no handler, no broker).
        (
            "GET unknown path (404: HTTP stack + middleware)",
            Box::new(|| {
                wrk::cpu_per_request(&moat, || {
                    let (load, text) =
                        wrk::run_any(&format!("{}/nope", s.url), None, CONNECTIONS, secs);
                    assert!(
                        load.non_2xx > 0 && text.contains("Requests/sec"),
                        "unknown paths are answered 404:\n{text}"
                    );
                    load
                })
            }),
        ),
    ];
    let mut samples: Vec<Vec<(wrk::Load, wrk::CpuPerRequest)>> = vec![Vec::new(); rows.len()];
    for round in 1..=rounds {
        println!("gateway round {round} of {rounds}");
        for (i, (_, run)) in rows.iter().enumerate() {
            samples[i].push(run());
        }
    }
    let median = |v: Vec<f64>| Summary::of(v).median;
    // One row: the load's figures, and the CPU each process spent per
    // request (steady where requests/s is not: a shared host's other
    // tenants take CPU time from the run, not from each request).
    for ((name, _), runs) in rows.iter().zip(&samples) {
        let of = |pick: fn(&wrk::Load) -> f64| median(runs.iter().map(|(l, _)| pick(l)).collect());
        let (rps, p50, p99) = (
            of(|l| l.requests_per_sec),
            of(|l| l.p50_ms),
            of(|l| l.p99_ms),
        );
        let cpu: Vec<(String, f64)> = runs[0]
            .1
             .0
            .iter()
            .enumerate()
            .map(|(k, (process, _))| {
                let us = median(runs.iter().map(|(_, c)| c.0[k].1).collect());
                (process.clone(), us)
            })
            .collect();
        let shown: Vec<String> = cpu.iter().map(|(p, us)| format!("{p} {us:.0}")).collect();
        println!(
            "{name:<52} {rps:>9.0} req/s  p50={p50:>7.2} ms  p99={p99:>7.2} ms  CPU us/request: {}",
            shown.join(", ")
        );
        let cpu_json: serde_json::Map<String, Value> =
            cpu.into_iter().map(|(p, us)| (p, json!(us))).collect();
        f.0.insert(
            name.to_string(),
            json!({"rounds": runs.len(), "requests_per_sec": rps, "p50_ms": p50,
                   "p99_ms": p99, "cpu_us_per_request": cpu_json}),
        );
    }
    // Each ratio against the nginx run of the same round.
    let ratio = |f: &mut Figures,
                 name: &str,
                 row: usize,
                 of: fn(&wrk::Load, &wrk::CpuPerRequest) -> f64| {
        let per_round = samples[row]
            .iter()
            .zip(&samples[0])
            .map(|((l, c), (bl, bc))| of(l, c) / of(bl, bc))
            .collect();
        f.ratio(name, median(per_round));
    };
    let rps = |l: &wrk::Load, _: &wrk::CpuPerRequest| l.requests_per_sec;
    let server_cpu = |_: &wrk::Load, c: &wrk::CpuPerRequest| c.servers();
    ratio(f, "unknown path req/s / nginx req/s", 4, rps);
    ratio(f, "health req/s / nginx req/s", 1, rps);
    ratio(f, "metrics.get req/s / nginx req/s", 2, rps);
    ratio(
        f,
        "metrics.get, answers not kept, req/s / nginx req/s",
        3,
        rps,
    );
    ratio(
        f,
        "unknown path server CPU per request / nginx's",
        4,
        server_cpu,
    );
    ratio(
        f,
        "metrics.get server CPU per request / nginx's",
        2,
        server_cpu,
    );
}

fn main() {
    let Args {
        runs,
        http_secs,
        json: json_path,
        sections,
    } = args();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "moat benchmark: {runs} runs; load {}; backend as the broker chooses (MOAT_VMM={})",
        load.trim(),
        moat_e2e::vmm_backend()
    );
    let mut f = Figures::default();
    let build = build_dir();
    let want = |section: &str| sections.is_empty() || sections.iter().any(|s| s == section);
    let bare_files = (want("boot") || want("calls"))
        .then(|| BareImage::prepare(&build, &build.join("base.erofs"), 1024));
    if ["boot", "calls", "memory", "interpreters", "churn"]
        .iter()
        .any(|s| want(s))
    {
        let s = Server::start();
        if let Some(bare) = &bare_files {
            if want("boot") {
                boot_section(&mut f, &s, bare, runs);
            }
            if want("calls") {
                calls_section(&mut f, &s, bare);
            }
        }
        if want("memory") {
            memory_section(&mut f, &s);
        }
        if want("interpreters") {
            interpreters_section(&mut f, &s, runs);
        }
        if want("churn") {
            churn_section(&mut f, &s, runs);
        }
    }
    if want("jail") {
        jail_section(&mut f, runs);
    }
    if want("pool") {
        pool(&mut f, runs);
    }
    if want("gateway") {
        gateway(&mut f, http_secs, runs.clamp(1, 5));
    }

    let doc = json!({
        "runs": runs,
        "load_before": load.trim(),
        "load_after": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "backend": moat_e2e::vmm_backend(),
        "figures": f.0,
    });
    if let Some(dir) = json_path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    std::fs::write(
        &json_path,
        serde_json::to_string_pretty(&doc).unwrap_or_default(),
    )
    .expect("write the JSON report");
    println!("JSON: {}", json_path.display());
}

/// Cold starts against the bare VM, interleaved so both see the same
/// machine.
fn boot_section(f: &mut Figures, s: &Server, bare_files: &BareImage, runs: usize) {
    // Baseline: the bare VM, interleaved with moat's cold starts so both
    // see the same machine.
    let mut bare_ms = Vec::new();
    let mut cold_ms = Vec::new();
    for i in 0..runs {
        bare_ms.push(ms(BareVm::boot(bare_files, 512).boot));
        let name = format!("cold-{i}");
        let t = Instant::now();
        s.start_sandbox(&name, json!({"memory": 512}));
        cold_ms.push(ms(t.elapsed()));
        s.stop_sandbox(&name);
    }
    let bare = f.add(
        "bare QEMU boot -> agent first byte (baseline)",
        "ms",
        bare_ms,
    );
    let cold = f.add("sandbox.start cold (HTTP)", "ms", cold_ms);
    f.ratio(
        "sandbox.start cold / bare boot (median)",
        cold.median / bare.median,
    );
}

/// Raw channel and guest fork/exec on the bare VM, next to command.run.
fn calls_section(f: &mut Figures, s: &Server, bare_files: &BareImage) {
    let mut vm = BareVm::boot(bare_files, 512);
    for _ in 0..5 {
        vm.exec("true", &[]);
    }
    let hello = f.add(
        "raw agent channel round trip (Hello)",
        "ms",
        (0..200).map(|_| ms(vm.hello())).collect(),
    );
    let exec = f.add(
        "raw Exec `true` round trip (channel + fork/exec)",
        "ms",
        (0..200).map(|_| ms(vm.exec("true", &[]))).collect(),
    );
    drop(vm);
    s.start_sandbox("calls", json!({}));
    for _ in 0..5 {
        s.run("calls", "true", &[]);
    }
    let rt = f.add(
        "command.run `true` round trip (HTTP)",
        "ms",
        (0..200)
            .map(|_| {
                let t = Instant::now();
                let r = s.run("calls", "true", &[]);
                assert_eq!(r["exit_code"], 0);
                ms(t.elapsed())
            })
            .collect(),
    );
    s.stop_sandbox("calls");
    f.ratio(
        "command.run true / raw Exec true (median)",
        rt.median / exec.median,
    );
    f.ratio(
        "raw Exec true / raw Hello (median)",
        exec.median / hello.median,
    );
}

/// Memory of an idle sandbox and of the daemons.
fn memory_section(f: &mut Figures, s: &Server) {
    const GUEST_MIB: u64 = 512;
    s.start_sandbox("idle", json!({"memory": GUEST_MIB}));
    s.run("idle", "true", &[]);
    std::thread::sleep(Duration::from_secs(5));
    let metrics = s.ok(
        "sandbox.metrics.get",
        json!({"sandbox": "idle", "namespace": "default"}),
    );
    if let Some((pid, _)) = s.vm_pids().first() {
        f.value("idle sandbox: VM process RSS", "MiB", rss_mib(*pid));
        if let Some((total, guest)) = rss_split_kib(*pid, GUEST_MIB) {
            f.value(
                "idle sandbox: VM process RSS beyond guest RAM",
                "MiB",
                (total - guest) as f64 / 1024.0,
            );
            f.value(
                "idle sandbox: guest RAM resident",
                "MiB",
                guest as f64 / 1024.0,
            );
        }
    }
    if let Some(mem) = metrics["sandboxes"][0]["memory_usage"].as_f64() {
        f.value("idle sandbox: cgroup memory (metrics.get)", "MiB", mem);
    }
    if let Some(pid) = s.broker_pid() {
        f.value("broker RSS", "MiB", rss_mib(pid));
    }
    if let Some(pid) = s.gateway_pid() {
        f.value("gateway RSS", "MiB", rss_mib(pid));
    }
    s.stop_sandbox("idle");
}

/// A VM process's resident memory, KiB, in total and in its guest RAM
/// (the largest mapping at least `guest_mib` long), from `smaps`.
fn rss_split_kib(pid: i32, guest_mib: u64) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let field = |l: &str, name: &str| {
        l.strip_prefix(name)
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
    };
    let (mut total, mut guest, mut size, mut largest) = (0, 0, 0, 0);
    for l in text.lines() {
        if let Some(v) = field(l, "Size:") {
            size = v;
        } else if let Some(v) = field(l, "Rss:") {
            total += v;
            if size >= guest_mib * 1024 && size > largest {
                largest = size;
                guest = v;
            }
        }
    }
    (largest > 0).then_some((total, guest))
}

/// Interpreters: warm cells, and a start plus its first cell.
fn interpreters_section(f: &mut Figures, s: &Server, runs: usize) {
    for (image, language, code, want) in [
        ("microsandbox/python", "python", "print(1)", "1"),
        ("microsandbox/node", "nodejs", "console.log(1)", "1"),
    ] {
        let mut first_ms = Vec::new();
        for i in 0..runs.div_ceil(2).max(2) {
            let name = format!("first-{language}-{i}");
            let t = Instant::now();
            s.start_sandbox(&name, json!({"image": image}));
            let r = s.repl(&name, language, code);
            first_ms.push(ms(t.elapsed()));
            assert_eq!(r["status"], "success", "{r}");
            if i == 0 {
                let warm = (0..100)
                    .map(|_| {
                        let t = Instant::now();
                        let r = s.repl(&name, language, code);
                        assert_eq!(r["output"][0]["text"], want, "{r}");
                        ms(t.elapsed())
                    })
                    .collect();
                f.add(&format!("warm repl.run ({language})"), "ms", warm);
            }
            s.stop_sandbox(&name);
        }
        f.add(
            &format!("sandbox.start + first repl.run ({language}), cold"),
            "ms",
            first_ms,
        );
    }
}

/// Starts per minute with 4 clients.
fn churn_section(f: &mut Figures, s: &Server, runs: usize) {
    let cycles = (runs * 2).max(8);
    let started = Instant::now();
    std::thread::scope(|scope| {
        for c in 0..4 {
            let s = &s;
            scope.spawn(move || {
                for i in (c..cycles).step_by(4) {
                    let name = format!("churn-{i}");
                    s.start_sandbox(&name, json!({}));
                    s.run(&name, "true", &[]);
                    s.stop_sandbox(&name);
                }
            });
        }
    });
    f.value(
        "start -> true -> stop cycles per minute (4 clients)",
        "/min",
        cycles as f64 / started.elapsed().as_secs_f64() * 60.0,
    );
}

/// The cost of the jail.
fn jail_section(f: &mut Figures, runs: usize) {
    let u = Server::start_with(Options {
        unjailed: true,
        ..Options::default()
    });
    let unjailed = (0..runs)
        .map(|i| {
            let name = format!("unjailed-{i}");
            let t = Instant::now();
            u.start_sandbox(&name, json!({"memory": 512}));
            let d = ms(t.elapsed());
            u.stop_sandbox(&name);
            d
        })
        .collect();
    f.add(
        "sandbox.start cold without the jail (dev switch)",
        "ms",
        unjailed,
    );
    drop(u);
}
