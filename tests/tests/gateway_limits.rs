//! Gateway limits and observability against the real stack with API keys
//! (no VM): an oversized body gets 413, a flood from one key gets 429 with
//! `Retry-After` while another key is still served, `/metrics` on its own
//! address, the Unix-socket listener behind a "proxy" with
//! `X-Forwarded-For`, audit lines, and slow clients being cut off.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use moat_e2e::{free_port, Options, Server};
use serde_json::{json, Value};

fn metrics_call() -> Value {
    json!({"jsonrpc": "2.0", "method": "sandbox.metrics.get", "params": {"namespace": "default"}, "id": 1})
}

#[test]
fn oversized_body_is_413_and_a_flood_from_one_key_is_429() {
    let s = Server::start_with(Options {
        keys: true,
        gateway_toml: "[limits]\nmax_body_bytes = 65536\nrequests_per_sec = 1.0\nburst = 5\n"
            .into(),
        ..Options::default()
    });
    let a = s.keygen(&["default"], "1h");
    let b = s.keygen(&["default"], "1h");

    let big = json!({"jsonrpc": "2.0", "method": "sandbox.metrics.get", "id": 1,
                     "params": {"namespace": "default", "pad": "x".repeat(100_000)}});
    let (status, v) = s.post_as(&a.token, &big);
    assert_eq!(status, 413, "{v}");
    assert_eq!(v["error"]["code"], -32600);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("65536 bytes"),
        "{v}"
    );

    // The 413 used one of key a's 5 tokens; the rest go, then 429.
    let mut statuses = Vec::new();
    for _ in 0..6 {
        statuses.push(s.post_as(&a.token, &metrics_call()).0);
    }
    assert_eq!(&statuses[..4], &[200, 200, 200, 200], "{statuses:?}");
    assert_eq!(statuses[5], 429, "{statuses:?}");
    let auth = format!("Bearer {}", a.token);
    let r = s.request(
        "POST",
        "/api/v1/rpc",
        &[("authorization", &auth)],
        Some(&metrics_call().to_string()),
    );
    assert_eq!(r.status, 429);
    let retry: u64 = r
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry), "{retry}");
    assert_eq!(r.json()["error"]["code"], -32000);
    assert_eq!(r.json()["jsonrpc"], "2.0");

    // Key b is still served.
    assert_eq!(s.post_as(&b.token, &metrics_call()).0, 200);
    // And a recovers after Retry-After.
    std::thread::sleep(Duration::from_secs(retry));
    assert_eq!(s.post_as(&a.token, &metrics_call()).0, 200);
}

#[test]
fn metrics_unix_socket_forwarded_for_audit_and_slow_clients() {
    let metrics_port = free_port();
    let socket_dir = tempfile::Builder::new()
        .prefix("moat-gw-sock.")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::set_permissions(
        socket_dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let socket = socket_dir.path().join("gateway.sock");
    let s = Server::start_with(Options {
        keys: true,
        gateway_toml: format!(
            "unix_socket = \"{}\"\nunix_socket_mode = 438\n[timeouts]\nheader_read_secs = 2\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n",
            socket.display()
        ),
        ..Options::default()
    });
    let key = s.keygen(&["default"], "1h");
    assert_eq!(s.post_as(&key.token, &metrics_call()).0, 200);

    // The Unix socket, as a reverse proxy would use it.
    let body = metrics_call().to_string();
    let mut stream = UnixStream::connect(&socket).expect("gateway unix socket");
    write!(
        stream,
        "POST /api/v1/rpc HTTP/1.1\r\nHost: moat\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\n\
         X-Forwarded-For: 203.0.113.9\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        key.token,
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let request_id = answer
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("x-request-id:")
                .map(|v| v.trim().to_owned())
        })
        .unwrap_or_else(|| panic!("no X-Request-Id: {answer}"));
    assert_eq!(request_id.len(), 16, "{answer}");
    assert!(answer.contains("\"sandboxes\""), "{answer}");

    // Over TCP from an untrusted peer, X-Forwarded-For is ignored.
    let auth = format!("Bearer {}", key.token);
    s.request(
        "POST",
        "/api/v1/rpc",
        &[
            ("authorization", &auth),
            ("x-forwarded-for", "198.51.100.66"),
        ],
        Some(&body),
    );

    // Audit lines name the request (as its answer did), the client, the
    // key and the method.
    let start = Instant::now();
    let log = loop {
        let log = s.log_text();
        if log.contains("203.0.113.9") || start.elapsed() > Duration::from_secs(5) {
            break log;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let audit: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("moat_gateway::audit"))
        .collect();
    assert!(
        audit.iter().any(|l| l.contains("203.0.113.9")
            && l.contains(&format!("request_id={request_id}"))
            && l.contains(&key.id)
            && l.contains("sandbox.metrics.get")),
        "no audit line names the request {request_id}, its client, key and method: {audit:#?}"
    );
    assert!(
        !log.contains("198.51.100.66"),
        "a forwarded address from an untrusted peer was believed"
    );

    // /metrics on its own address, not on the public one.
    let mut m = TcpStream::connect(("127.0.0.1", metrics_port)).unwrap();
    write!(
        m,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    m.read_to_string(&mut text).unwrap();
    for needle in [
        "moat_gateway_http_requests_total{route=\"/api/v1/rpc\",status=\"200\"}",
        "moat_gateway_sandbox_operations_total{via=\"jsonrpc\",method=\"sandbox.metrics.get\",outcome=\"ok\"}",
        "moat_gateway_http_request_duration_seconds_bucket",
        "moat_sandboxes_running 0",
        "moat_gateway_broker_up 1",
    ] {
        assert!(text.contains(needle), "{needle} not in:\n{text}");
    }
    assert_eq!(s.request("GET", "/metrics", &[], None).status, 404);

    // A client that never finishes its headers is disconnected.
    let mut slow = TcpStream::connect(s.url.trim_start_matches("http://")).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    slow.write_all(b"POST /api/v1/rpc HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    let _ = slow.read_to_end(&mut buf);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(8),
        "{waited:?}"
    );
}
