//! Gateway reliability, on the real stack: a gateway killed with SIGKILL
//! under load is started again by its supervisor while the broker and the
//! sandboxes keep running (calls fail only while it is down, the guest does
//! not reboot); hundreds of idle connections (after a keep-alive request,
//! or silent from the start) cost a bounded amount of memory, do not stop
//! it answering, and are closed after `timeouts.header_read_secs`; and a
//! SIGTERM to the gateway lets an in-flight command finish, refuses new
//! connections meanwhile, and then (a clean gateway exit) stops the whole
//! stack with status 1.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use moat_e2e::{free_port, Options, Server};
use serde_json::{json, Value};

fn signal(pid: i32, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).expect("kill");
}

fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|st| {
        !st.lines()
            .any(|l| l.starts_with("State:") && l.contains('Z'))
    })
}

/// Resident memory (VmRSS) of a process, KiB.
fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/pid/status");
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

/// What one client call saw.
#[derive(Debug)]
enum Outcome {
    /// A result listing the sandbox; `false` when it said `running: false`
    /// (the broker reports a sandbox whose entry another call holds locked
    /// that way instead of waiting).
    Ok(bool),
    /// No HTTP answer (refused, reset, closed).
    Connection(String),
    /// An HTTP answer that is not a result.
    Http(u16, Value),
}

/// One `sandbox.metrics.get` on a fresh connection (no pooling, so a
/// connection to a dead gateway is never reused by the client).
fn metrics_call(url: &str, name: &str) -> Outcome {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_idle_connections(0)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into();
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": "sandbox.metrics.get",
                      "params": {"namespace": "default", "sandbox": name}});
    match agent.post(format!("{url}/api/v1/rpc")).send_json(&body) {
        Err(e) => Outcome::Connection(e.to_string()),
        Ok(mut resp) => {
            let status = resp.status().as_u16();
            let value: Value = resp.body_mut().read_json().unwrap_or(Value::Null);
            let listed = &value["result"]["sandboxes"][0];
            if status == 200 && listed["name"] == name {
                Outcome::Ok(listed["running"] == true)
            } else {
                Outcome::Http(status, value)
            }
        }
    }
}

#[test]
fn a_killed_gateway_is_restarted_and_the_sandboxes_keep_running() {
    // The clients poll as fast as they can: no per-key rate limit here.
    let s = Server::start_with(Options {
        gateway_toml: "[limits]\nrequests_per_sec = 1000000.0\nburst = 1000000\n".into(),
        ..Default::default()
    });
    s.start_sandbox("steady", json!({}));
    let boot = s.boot_id("steady");
    let broker = s.broker_pid().expect("broker pid");
    let old_gateway = s.gateway_pid().expect("gateway pid");

    let stop = AtomicBool::new(false);
    // (sent, answered, outcome) of every call.
    let calls: Mutex<Vec<(Instant, Instant, Outcome)>> = Mutex::new(Vec::new());
    let (killed_at, back_at) = std::thread::scope(|t| {
        for _ in 0..4 {
            t.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    let sent = Instant::now();
                    let outcome = metrics_call(&s.url, "steady");
                    let failed = !matches!(outcome, Outcome::Ok(_));
                    calls.lock().unwrap().push((sent, Instant::now(), outcome));
                    if failed {
                        // Do not spin on refused connections.
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
            });
        }
        wait_for("calls succeeding", Duration::from_secs(30), || {
            calls.lock().unwrap().len() >= 20
        });
        let killed_at = Instant::now();
        signal(old_gateway, nix::sys::signal::Signal::SIGKILL);
        // Back: a new gateway process answers.
        wait_for("a new gateway answering", Duration::from_secs(60), || {
            s.gateway_pid().is_some_and(|pid| pid != old_gateway)
                && matches!(s.get("/api/v1/health"), Ok((200, _)))
        });
        let back_at = Instant::now();
        // Keep polling a while on the new gateway.
        let enough = calls.lock().unwrap().len() + 100;
        wait_for("calls after the restart", Duration::from_secs(60), || {
            calls.lock().unwrap().len() >= enough
        });
        stop.store(true, Ordering::Relaxed);
        (killed_at, back_at)
    });

    let calls = calls.into_inner().unwrap();
    let mut failed = 0;
    let mut first_failure: Option<Instant> = None;
    let mut first_success_after_kill: Option<Instant> = None;
    for (sent, answered, outcome) in &calls {
        match outcome {
            Outcome::Ok(_) => {
                if *sent > killed_at {
                    first_success_after_kill =
                        Some(first_success_after_kill.map_or(*answered, |t| t.min(*answered)));
                }
            }
            failure => {
                failed += 1;
                first_failure = Some(first_failure.map_or(*sent, |t| t.min(*sent)));
                // Failures only while the gateway was down: a connection
                // error or a 503, and never for a call sent once it was back
                // or answered before it was killed.
                assert!(
                    *answered >= killed_at && *sent < back_at,
                    "a call failed outside the gateway's downtime: {failure:?}\n{}",
                    s.log_text()
                );
                if let Outcome::Http(status, body) = failure {
                    assert_eq!(*status, 503, "{body}");
                }
            }
        }
    }
    let mut kinds = std::collections::BTreeMap::<String, usize>::new();
    for (_, _, outcome) in &calls {
        let kind = match outcome {
            Outcome::Ok(_) => continue,
            Outcome::Connection(e) => {
                format!("no answer: {}", e.chars().take(60).collect::<String>())
            }
            Outcome::Http(status, _) => format!("HTTP {status}"),
        };
        *kinds.entry(kind).or_default() += 1;
    }
    let not_running = calls
        .iter()
        .filter(|(.., o)| matches!(o, Outcome::Ok(false)))
        .count();
    println!(
        "failures by kind: {kinds:?}; answers saying running: false (entry busy in the broker): {not_running}"
    );
    let after_back = calls.iter().filter(|(sent, ..)| *sent >= back_at).count();
    assert!(after_back >= 100, "{after_back} calls after the restart");
    assert!(
        failed > 0,
        "the gateway was down for a while: some call must have failed"
    );
    let downtime = first_success_after_kill.expect("calls succeed again") - killed_at;
    println!(
        "gateway SIGKILL: {} calls, {failed} failed; downtime (kill to first success) {downtime:?}; \
         health back after {:?}",
        calls.len(),
        back_at - killed_at
    );

    // The broker was not restarted, the guest did not reboot.
    assert_eq!(s.broker_pid(), Some(broker), "the broker kept running");
    assert_eq!(s.boot_id("steady"), boot, "the sandbox did not reboot");
    let log = s.log_text();
    assert!(
        log.contains("gateway exited (signal: 9 (SIGKILL)); starting it again"),
        "{log}"
    );
    assert!(log.contains("moat: gateway back at"), "{log}");
    s.stop_sandbox("steady");
    s.assert_no_leftovers();
}

/// Opens a connection, sends one keep-alive request and reads its whole
/// answer, leaving the connection open and idle.
fn keep_alive_after_one_request(port: u16) -> TcpStream {
    let mut c = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    c.write_all(b"GET /api/v1/health HTTP/1.1\r\nhost: moat\r\n\r\n")
        .expect("send");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&got).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            assert!(text.starts_with("HTTP/1.1 200"), "{text}");
            let length: usize = text[..end]
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .expect("content-length");
            if got.len() >= end + 4 + length {
                return c;
            }
        }
        let n = c.read(&mut buf).expect("read the answer");
        assert!(n > 0, "closed before answering: {text}");
        got.extend_from_slice(&buf[..n]);
    }
}

/// Whether the server has closed `c` (EOF or reset); waits up to `limit`.
fn closed_by_server(c: &mut TcpStream, limit: Duration) -> bool {
    c.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 64];
    match c.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

/// Memory per idle connection allowed, KiB. An idle hyper connection holds
/// its read and write buffers (8 KiB to start), the connection state and a
/// task; a handful of KiB each in practice. 128 KiB is an order of
/// magnitude over that, so a leak or a buffer kept per connection shows,
/// while allocator noise does not: 500 connections may add under 64 MiB.
const KIB_PER_IDLE_CONNECTION: u64 = 128;
const IDLE_CONNECTIONS: usize = 500;
const HEADER_READ_SECS: u64 = 20;

#[test]
fn idle_connections_cost_bounded_memory_and_are_closed_after_the_header_deadline() {
    let s = Server::start_with(Options {
        gateway_toml: format!("[timeouts]\nheader_read_secs = {HEADER_READ_SECS}\n"),
        ..Default::default()
    });
    let port = s.port();
    let gateway = s.gateway_pid().expect("gateway pid");
    // Warm up: the first requests allocate what every request needs.
    for _ in 0..20 {
        assert!(matches!(s.get("/api/v1/health"), Ok((200, _))));
    }
    let baseline = rss_kib(gateway);

    let opened = Instant::now();
    let mut connections: Vec<TcpStream> = (0..IDLE_CONNECTIONS / 2)
        .map(|_| keep_alive_after_one_request(port))
        .collect();
    let silent_opened = Instant::now();
    connections.extend(
        (0..IDLE_CONNECTIONS / 2)
            .map(|_| TcpStream::connect(("127.0.0.1", port)).expect("connect")),
    );
    let open_took = opened.elapsed();
    // The gateway accepted them all (none was closed yet).
    std::thread::sleep(Duration::from_millis(500));
    let with = rss_kib(gateway);
    // It still answers, over a new connection, while they are open.
    assert_eq!(
        s.get("/api/v1/health").expect("health"),
        (200, json!({"message": "Service is healthy"}))
    );
    let listed = s.ok("sandbox.metrics.get", json!({"namespace": "*"}));
    assert!(listed["sandboxes"].is_array(), "{listed}");
    assert!(
        silent_opened.elapsed() < Duration::from_secs(HEADER_READ_SECS),
        "the measurement must happen while every connection is open (took {:?})",
        silent_opened.elapsed()
    );
    let added = with.saturating_sub(baseline);
    let bound = KIB_PER_IDLE_CONNECTION * IDLE_CONNECTIONS as u64;

    // Every one of them is closed by the gateway after the header-read
    // deadline: the keep-alive ones (no next request) and the silent ones.
    let patience = Duration::from_secs(HEADER_READ_SECS + 30);
    for (i, c) in connections.iter_mut().enumerate() {
        let left = patience
            .saturating_sub(opened.elapsed())
            .max(Duration::from_millis(100));
        assert!(
            closed_by_server(c, left),
            "connection {i} ({}) still open {:?} after opening",
            if i < IDLE_CONNECTIONS / 2 {
                "keep-alive"
            } else {
                "silent"
            },
            opened.elapsed()
        );
    }
    let all_closed = opened.elapsed();
    drop(connections);
    std::thread::sleep(Duration::from_millis(500));
    let after = rss_kib(gateway);
    println!(
        "{IDLE_CONNECTIONS} idle connections (half after a keep-alive request, half silent), \
         opened in {open_took:?}: gateway VmRSS {baseline} KiB before, {with} KiB with them \
         (+{added} KiB, {:.1} KiB each; bound {bound} KiB), {after} KiB after; all closed by the \
         gateway {all_closed:?} after the first was opened (header_read_secs = {HEADER_READ_SECS})",
        added as f64 / IDLE_CONNECTIONS as f64
    );
    assert!(
        added < bound,
        "{IDLE_CONNECTIONS} idle connections added {added} KiB to the gateway's RSS (bound {bound} KiB)"
    );
    assert!(matches!(s.get("/api/v1/health"), Ok((200, _))));
    assert_eq!(
        s.gateway_pid(),
        Some(gateway),
        "the same gateway throughout"
    );
}

#[test]
fn sigterm_to_the_gateway_finishes_the_call_in_flight_then_the_stack_stops() {
    let metrics_port = free_port();
    let mut s = Server::start_with(Options {
        gateway_toml: format!("[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n"),
        ..Default::default()
    });
    s.start_sandbox("sleeper", json!({}));
    let gateway = s.gateway_pid().expect("gateway pid");
    let broker = s.broker_pid().expect("broker pid");
    let broker_calls_in_flight = || -> u64 {
        let mut text = String::new();
        let Ok(mut c) = TcpStream::connect(("127.0.0.1", metrics_port)) else {
            return 0;
        };
        let _ = c.write_all(b"GET /metrics HTTP/1.1\r\nhost: m\r\nconnection: close\r\n\r\n");
        let _ = c.read_to_string(&mut text);
        text.lines()
            .find_map(|l| l.strip_prefix("moat_gateway_broker_calls_in_flight "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    let port = s.port();

    let (reply, took, refused_in_flight, drained) = std::thread::scope(|t| {
        let command = t.spawn(|| {
            let started = Instant::now();
            let reply = s.rpc(
                "sandbox.command.run",
                json!({"sandbox": "sleeper", "namespace": "default",
                       "command": "sleep", "args": ["3"]}),
            );
            (reply, started.elapsed())
        });
        // The command is with the broker (the scrape's own call ended).
        wait_for("the command in flight", Duration::from_secs(30), || {
            broker_calls_in_flight() >= 1
        });
        let term_at = Instant::now();
        signal(gateway, nix::sys::signal::Signal::SIGTERM);
        // Draining: new connections are refused while the call runs.
        wait_for(
            "connections refused",
            Duration::from_secs(10),
            || match TcpStream::connect(("127.0.0.1", port)) {
                Err(e) => e.kind() == std::io::ErrorKind::ConnectionRefused,
                Ok(c) => {
                    let _ = c.shutdown(Shutdown::Both);
                    false
                }
            },
        );
        let refused_in_flight = !command.is_finished();
        let (reply, took) = command.join().unwrap();
        wait_for("the gateway exited", Duration::from_secs(40), || {
            !alive(gateway)
        });
        (reply, took, refused_in_flight, term_at.elapsed())
    });
    let result = reply
        .get("result")
        .unwrap_or_else(|| panic!("the call in flight failed: {reply}\n{}", s.log_text()));
    assert_eq!(result["exit_code"], 0, "{reply}");
    assert_eq!(result["success"], true, "{reply}");
    assert!(
        refused_in_flight,
        "new connections must be refused while the call is still in flight"
    );

    // A clean gateway exit (status 0) was not asked for by the supervisor:
    // it stops the broker (which stops the sandboxes) and exits with 1.
    let status = s
        .wait_exit(Duration::from_secs(90))
        .unwrap_or_else(|| panic!("the supervisor kept running:\n{}", s.log_text()));
    assert_eq!(status.code(), Some(1), "{status}");
    assert!(!alive(broker), "the broker was stopped");
    let log = s.log_text();
    assert!(
        log.contains("moat: gateway exited (exit status: 0) without this supervisor asking; stopping the broker"),
        "{log}"
    );
    assert!(!log.contains("starting it again"), "{log}");
    println!(
        "gateway SIGTERM during `sleep 3`: the call took {took:?} and succeeded; gateway gone \
         {drained:?} after SIGTERM; supervisor exit {status}"
    );
    s.assert_no_leftovers();
}
