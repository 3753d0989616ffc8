//! Guest networking end to end, against test hosts in network namespaces
//! this suite creates (never any other address): `scope` none / group /
//! public, the metadata address and the host's own services out of reach,
//! DNS through the broker's responder, published ports, and `depends_on`.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use moat_e2e::testnet::TestHost;
use moat_e2e::{Options, Server};
use serde_json::{json, Value};

const PY: &str = "microsandbox/python";

/// Python in the guest: fetch a URL, print the body or the error class.
fn fetch(url: &str) -> String {
    format!(
        "import urllib.request,sys\ntry:\n    print(urllib.request.urlopen({url:?}, timeout=4).read().decode())\nexcept Exception as e:\n    print('FAILED', type(e).__name__, e)"
    )
}

fn stdout(r: &Value) -> String {
    Server::stdout_lines(r).join("\n")
}

fn py(s: &Server, ns: &str, name: &str, code: &str) -> String {
    let r = s.ok(
        "sandbox.command.run",
        json!({"sandbox": name, "namespace": ns, "command": "python3", "args": ["-c", code], "timeout": 60}),
    );
    stdout(&r)
}

fn start(s: &Server, ns: &str, name: &str, config: Value) {
    s.ok(
        "sandbox.start",
        json!({"sandbox": name, "namespace": ns, "config": config}),
    );
}

fn stop(s: &Server, ns: &str, name: &str) {
    s.ok("sandbox.stop", json!({"sandbox": name, "namespace": ns}));
}

fn metrics(s: &Server, ns: &str, name: &str) -> Value {
    s.ok(
        "sandbox.metrics.get",
        json!({"namespace": ns, "sandbox": name}),
    )["sandboxes"][0]
        .clone()
}

#[test]
fn public_reaches_the_internet_but_not_metadata_the_host_or_private_ranges() {
    let mut internet = TestHost::start("inet", "198.51.100.2", "198.51.100.1", 25);
    internet.serve_dns(&["www.example.test=198.51.100.2"]);
    let metadata = TestHost::start("meta", "169.254.169.254", "169.254.169.1", 24);
    let private = TestHost::start("priv", "192.168.213.2", "192.168.213.1", 24);
    let s = Server::start_with(Options {
        network_toml: "dns_upstreams = [\"198.51.100.2\"]\n".into(),
        ..Options::default()
    });
    start(
        &s,
        "default",
        "web",
        json!({"image": PY, "scope": "public"}),
    );
    let m = metrics(&s, "default", "web");
    assert_eq!(m["scope"], "public");
    let guest = m["address"].as_str().expect("address").to_string();

    let out = py(&s, "default", "web", &fetch("http://198.51.100.2/"));
    assert_eq!(out, internet.marker, "the internet is reachable");
    let out = py(&s, "default", "web", &fetch("http://www.example.test/"));
    assert_eq!(
        out, internet.marker,
        "names resolve through the broker's DNS"
    );
    let resolv = stdout(&s.run("web", "cat", &["/etc/resolv.conf"]));
    assert!(resolv.contains("nameserver 10."), "{resolv}");

    for (url, what) in [
        ("http://169.254.169.254/".to_string(), "metadata"),
        ("http://192.168.213.2/".to_string(), "private range"),
    ] {
        let out = py(&s, "default", "web", &fetch(&url));
        assert!(out.starts_with("FAILED"), "{what} reached: {out}");
    }
    // Both hosts answered the host itself when they started (TestHost
    // waits for that), so the failures above are the guest's policy.

    // The host's own services: the gateway's port on every host address.
    let port = s.url.rsplit(':').next().unwrap().to_string();
    let host_side = {
        let mut octets: Vec<u8> = guest.split('.').map(|o| o.parse().unwrap()).collect();
        octets[3] -= 1;
        octets
            .iter()
            .map(u8::to_string)
            .collect::<Vec<_>>()
            .join(".")
    };
    for addr in [host_side.as_str(), "192.0.2.2", "127.0.0.1", "198.51.100.1"] {
        let out = py(
            &s,
            "default",
            "web",
            &fetch(&format!("http://{addr}:{port}/api/v1/health")),
        );
        assert!(
            out.starts_with("FAILED"),
            "host service reached via {addr}: {out}"
        );
    }

    // Scope wider than the operator allows.
    let (code, message) = s.err(
        "sandbox.start",
        json!({"sandbox": "wide", "namespace": "default", "config": {"scope": "any"}}),
    );
    assert_eq!(code, -32602, "{message}");
    assert!(message.contains("at most public"), "{message}");
    stop(&s, "default", "web");
    s.assert_no_leftovers();
    drop((internet, metadata, private));
}

#[test]
fn none_has_no_nic_and_group_reaches_only_its_namespace_by_name() {
    let internet = TestHost::start("inet", "203.0.113.2", "203.0.113.1", 25);
    let s = Server::start_with(Options::default());
    start(&s, "default", "loner", json!({"image": PY}));
    let r = s.run("loner", "cat", &["/proc/net/dev"]);
    let nics: Vec<String> = stdout(&r)
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next())
        .map(|n| n.trim().to_string())
        .filter(|n| n != "lo")
        .collect();
    assert!(
        nics.iter()
            .all(|n| !n.starts_with("eth") && !n.starts_with("en")),
        "scope none: no NIC, found {nics:?}"
    );
    assert_eq!(metrics(&s, "default", "loner")["scope"], "none");
    stop(&s, "default", "loner");

    let server = "import http.server,socketserver\nclass H(http.server.BaseHTTPRequestHandler):\n    def do_GET(self):\n        self.send_response(200); self.end_headers(); self.wfile.write(b'hello from b')\nsocketserver.TCPServer(('0.0.0.0', 8000), H).serve_forever()";
    let mut scripts = serde_json::Map::new();
    scripts.insert(
        "start".into(),
        json!(format!("#!/usr/bin/env python3\n{server}\n")),
    );
    start(
        &s,
        "na",
        "b",
        json!({"image": PY, "scope": "group", "scripts": scripts}),
    );
    start(&s, "na", "a", json!({"image": PY, "scope": "group"}));
    start(&s, "nb", "c", json!({"image": PY, "scope": "group"}));
    let b_addr = metrics(&s, "na", "b")["address"]
        .as_str()
        .unwrap()
        .to_string();

    let deadline = Instant::now() + Duration::from_secs(30);
    let out = loop {
        let out = py(&s, "na", "a", &fetch("http://b:8000/"));
        if !out.starts_with("FAILED") || Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(out, "hello from b", "a reaches b by name");
    let out = py(&s, "nb", "c", &fetch("http://b:8000/"));
    assert!(
        out.starts_with("FAILED"),
        "another namespace resolves b: {out}"
    );
    let out = py(&s, "nb", "c", &fetch(&format!("http://{b_addr}:8000/")));
    assert!(
        out.starts_with("FAILED"),
        "another namespace reaches b: {out}"
    );
    let out = py(&s, "na", "a", &fetch("http://198.51.100.2/"));
    assert!(
        out.starts_with("FAILED"),
        "group reaches the internet: {out}"
    );
    for (ns, name) in [("na", "a"), ("na", "b"), ("nb", "c")] {
        stop(&s, ns, name);
    }
    s.assert_no_leftovers();
    drop(internet);
}

#[test]
fn published_ports_forward_refuse_conflicts_and_are_released() {
    let s = Server::start_with(Options::default());
    // 8080 as in the reference's example when it is free; else another
    // port of the default range (8000-8999).
    let port = std::iter::once(8080)
        .chain(8000..9000)
        .find(|p| TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .expect("a free port in 8000-8999");
    start(
        &s,
        "default",
        "srv",
        json!({"image": PY, "ports": [format!("{port}:8000")],
               "exec": "cd /tmp && echo published > index.html && python3 -m http.server 8000"}),
    );
    assert_eq!(
        metrics(&s, "default", "srv")["ports"],
        json!([format!("{port}:8000")])
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = std::process::Command::new("curl")
            .args([
                "-s",
                "-m",
                "3",
                &format!("http://127.0.0.1:{port}/index.html"),
            ])
            .output()
            .unwrap();
        if String::from_utf8_lossy(&out.stdout).trim() == "published" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "port {port} never served the guest's page"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let (code, message) = s.err(
        "sandbox.start",
        json!({"sandbox": "srv2", "namespace": "default",
               "config": {"ports": [format!("{port}:8000")]}}),
    );
    assert_eq!(code, -32602, "{message}");
    assert!(message.contains(&port.to_string()), "{message}");
    let (code, message) = s.err(
        "sandbox.start",
        json!({"sandbox": "srv3", "namespace": "default", "config": {"ports": ["80:8000"]}}),
    );
    assert_eq!(code, -32602, "{message}");
    assert!(message.contains("outside the range"), "{message}");
    stop(&s, "default", "srv");
    TcpListener::bind(("127.0.0.1", port)).expect("the port is free after stop");
    s.assert_no_leftovers();
}

#[test]
fn depends_on_starts_a_chain_in_order_and_refuses_cycles() {
    let s = Server::start_with(Options::default());
    start(&s, "default", "c", json!({}));
    stop(&s, "default", "c");
    start(&s, "default", "b", json!({"depends_on": ["c"]}));
    stop(&s, "default", "b");
    stop(&s, "default", "c");
    start(&s, "default", "a", json!({"depends_on": ["b"]}));
    let at = |n: &str| {
        let m = metrics(&s, "default", n);
        assert_eq!(m["running"], true, "{n}: {m}");
        m["started_at_ms"].as_u64().unwrap()
    };
    let (a, b, c) = (at("a"), at("b"), at("c"));
    assert!(c < b && b < a, "c {c} < b {b} < a {a}");

    let (code, message) = s.err(
        "sandbox.start",
        json!({"sandbox": "d", "namespace": "default", "config": {"depends_on": ["nope"]}}),
    );
    assert_eq!(code, -32602, "{message}");
    assert!(
        message.contains("nope") && message.contains("not defined"),
        "{message}"
    );
    for n in ["a", "b", "c"] {
        stop(&s, "default", n);
    }
    let (code, message) = s.err(
        "sandbox.start",
        json!({"sandbox": "c", "namespace": "default", "config": {"depends_on": ["a"]}}),
    );
    assert_eq!(code, -32602, "{message}");
    assert!(
        message.contains("cycle") && message.contains("c -> a -> b -> c"),
        "{message}"
    );
    let (code, message) = s.err(
        "sandbox.start",
        json!({"sandbox": "self", "namespace": "default", "config": {"depends_on": ["self"]}}),
    );
    assert_eq!(code, -32602, "{message}");
    assert!(message.contains("cycle"), "{message}");
    assert!(s.vm_pids().is_empty());
    s.assert_no_leftovers();
}

/// A test-host server: port 9000 sends 4 MiB per connection, port 9002
/// holds each connection open until the client closes it.
const LIMIT_SERVERS: &str = r#"
import socket, threading, sys, time
addr = sys.argv[1]
def serve(port, handle):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, port)); s.listen(128)
    while True:
        c, _ = s.accept()
        threading.Thread(target=handle, args=(c,), daemon=True).start()
def send(c):
    try: c.sendall(b"x" * (4 << 20))
    finally: c.close()
def hold(c):
    c.recv(1); c.close()
threading.Thread(target=serve, args=(9002, hold), daemon=True).start()
serve(9000, send)
"#;

#[test]
fn connection_and_byte_limits_hold_per_sandbox() {
    let mut host = TestHost::start("lim", "198.51.100.130", "198.51.100.129", 25);
    let script = server_script(LIMIT_SERVERS);
    host.spawn_in(&[
        "/usr/bin/python3",
        &script.1.display().to_string(),
        "198.51.100.130",
    ]);
    let s = Server::start_with(Options {
        network_toml: "max_connections = 3\ningress_bytes_per_sec = 1048576\n".into(),
        ..Options::default()
    });
    start(
        &s,
        "default",
        "lim",
        json!({"image": PY, "scope": "public"}),
    );
    let out = py(
        &s,
        "default",
        "lim",
        "import socket\nok = []\nfor i in range(6):\n    try:\n        ok.append(socket.create_connection(('198.51.100.130', 9002), timeout=3))\n    except Exception as e:\n        pass\nprint(len(ok))",
    );
    assert_eq!(out, "3", "connections forwarded at once are capped at 3");
    let out = py(
        &s,
        "default",
        "lim",
        "import socket, time\ns = socket.create_connection(('198.51.100.130', 9000), timeout=30)\nt = time.time(); n = 0\nwhile True:\n    b = s.recv(65536)\n    if not b: break\n    n += len(b)\nprint(n, round(time.time() - t, 2))",
    );
    let mut parts = out.split_whitespace();
    let bytes: u64 = parts.next().and_then(|v| v.parse().ok()).expect(&out);
    let secs: f64 = parts.next().and_then(|v| v.parse().ok()).expect(&out);
    assert_eq!(bytes, 4 << 20, "{out}");
    assert!(secs >= 2.5, "4 MiB at 1 MiB/s took only {secs} s");
    stop(&s, "default", "lim");
    s.assert_no_leftovers();
    drop(script);
}

/// Writes `text` to a script file that lives as long as the returned guard.
fn server_script(text: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("server.py");
    std::fs::write(&path, text).expect("script");
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    (dir, path)
}

/// UDP echo on port 7 (for the slot-reuse test).
const UDP_ECHO: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 7))
while True:
    data, peer = s.recvfrom(2048)
    s.sendto(data, peer)
"#;

/// Guest: send "ping" from UDP port 5353 to the echo server, print the
/// answer or "timeout".
fn udp_ping(host: &str) -> String {
    format!(
        "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.bind(('0.0.0.0', 5353)); s.settimeout(3)\ns.sendto(b'ping', ({host:?}, 7))\ntry:\n    print(s.recvfrom(100)[0].decode())\nexcept socket.timeout:\n    print('timeout')"
    )
}

#[test]
fn a_reused_slot_inherits_no_flows_of_the_sandbox_before() {
    let mut host = TestHost::start("reuse", "203.0.113.130", "203.0.113.129", 25);
    let script = server_script(UDP_ECHO);
    host.spawn_in(&[
        "/usr/bin/python3",
        &script.1.display().to_string(),
        "203.0.113.130",
    ]);
    let s = Server::start_with(Options::default());
    start(
        &s,
        "default",
        "first",
        json!({"image": PY, "scope": "public"}),
    );
    let first_addr = metrics(&s, "default", "first")["address"].clone();
    assert_eq!(
        py(&s, "default", "first", &udp_ping("203.0.113.130")),
        "ping"
    );
    stop(&s, "default", "first");
    // Same slot, so same tap and address; a narrower scope.
    start(
        &s,
        "default",
        "second",
        json!({"image": PY, "scope": "group"}),
    );
    assert_eq!(metrics(&s, "default", "second")["address"], first_addr);
    assert_eq!(
        py(&s, "default", "second", &udp_ping("203.0.113.130")),
        "timeout",
        "the first sandbox's flow carried the second past its scope"
    );
    stop(&s, "default", "second");
    s.assert_no_leftovers();
    drop(script);
}
