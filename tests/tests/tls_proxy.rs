//! The shipped nginx site (`packaging/nginx/moat.conf`) in front of a real
//! gateway, with a test certificate: health, JSON-RPC sandbox calls and an
//! MCP session over HTTPS, and the client address the proxy forwards
//! reaching the gateway's logs because the gateway trusts the proxy.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use moat_e2e::{free_port, strip_ansi, Options, Server};
use serde_json::{json, Value};

struct Nginx(Child);

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A self-signed certificate for 127.0.0.1: (cert, key).
fn certificate(dir: &Path) -> (String, String) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let st = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args([
            "-subj",
            "/CN=moat-test",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(Stdio::null())
        .status()
        .expect("openssl");
    assert!(st.success());
    (cert.display().to_string(), key.display().to_string())
}

/// nginx in the foreground running the shipped site, rewritten only for
/// its port, certificate and upstream.
fn nginx(dir: &Path, port: u16, upstream: u16, cert: &str, key: &str) -> Nginx {
    let site = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/nginx/moat.conf"),
    )
    .unwrap()
    .replace(
        "listen 443 ssl http2;",
        &format!("listen 127.0.0.1:{port} ssl http2;"),
    )
    .replace("/etc/ssl/moat/fullchain.pem", cert)
    .replace("/etc/ssl/moat/privkey.pem", key)
    .replace(
        "http://127.0.0.1:5555",
        &format!("http://127.0.0.1:{upstream}"),
    );
    let d = dir.display();
    let conf = format!(
        "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\nevents {{}}\nhttp {{\n  access_log {d}/access.log;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n{site}\n}}\n"
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf).unwrap();
    let child = Command::new("nginx")
        .arg("-c")
        .arg(&path)
        .arg("-p")
        .arg(dir)
        .stderr(Stdio::null())
        .spawn()
        .expect("nginx (package nginx)");
    let n = Nginx(child);
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "nginx did not listen: {}",
            std::fs::read_to_string(dir.join("error.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    n
}

/// One HTTPS request with curl: (status, headers, body).
fn https(
    port: u16,
    cert: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&Value>,
) -> (u16, String, String) {
    let mut c = Command::new("curl");
    c.args([
        "-sS",
        "--http2",
        "-i",
        "--max-time",
        "120",
        "--cacert",
        cert,
        "-X",
        method,
    ]);
    for (k, v) in headers {
        c.arg("-H").arg(format!("{k}: {v}"));
    }
    if let Some(b) = body {
        c.args(["-H", "content-type: application/json", "--data-binary"])
            .arg(b.to_string());
    }
    let out = c
        .arg(format!("https://127.0.0.1:{port}{path}"))
        .output()
        .expect("curl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head.to_lowercase(), body.to_owned())
}

fn rpc(port: u16, cert: &str, method: &str, params: Value) -> Value {
    let (status, _, body) = https(
        port,
        cert,
        "POST",
        "/api/v1/rpc",
        &[("x-forwarded-for", "203.0.113.7")],
        Some(&json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params})),
    );
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

#[test]
fn the_shipped_nginx_site_serves_the_api_over_tls() {
    let s = Server::start_with(Options {
        gateway_toml: "[http]\ntrusted_proxies = [\"127.0.0.1/32\"]\n".into(),
        ..Default::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = certificate(dir.path());
    let port = free_port();
    let _nginx = nginx(dir.path(), port, s.port(), &cert, &key);

    let (status, _, body) = https(port, &cert, "GET", "/api/v1/health", &[], None);
    assert_eq!(status, 200, "{body}");

    let r = rpc(
        port,
        &cert,
        "sandbox.start",
        json!({"sandbox": "tls", "namespace": "default", "config": {}}),
    );
    assert!(r.get("result").is_some(), "{r}");
    let r = rpc(
        port,
        &cert,
        "sandbox.command.run",
        json!({"sandbox": "tls", "namespace": "default", "command": "echo", "args": ["through nginx"]}),
    );
    assert_eq!(
        Server::stdout_lines(&r["result"]),
        vec!["through nginx"],
        "{r}"
    );

    // MCP through the proxy: a session, then a tool call.
    let accept = ("accept", "application/json, text/event-stream");
    let (status, head, body) = https(
        port,
        &cert,
        "POST",
        "/mcp",
        &[accept],
        Some(&json!({"jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "tls", "version": "0"}}})),
    );
    assert_eq!(status, 200, "{body}");
    let session = head
        .lines()
        .find_map(|l| l.strip_prefix("mcp-session-id:"))
        .map(|v| v.trim().to_owned())
        .expect("mcp-session-id");
    let (status, _, body) = https(
        port,
        &cert,
        "POST",
        "/mcp",
        &[
            accept,
            ("mcp-session-id", &session),
            ("mcp-protocol-version", "2025-06-18"),
        ],
        Some(&json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
            "params": {"name": "sandbox_run_command",
                       "arguments": {"sandbox": "tls", "namespace": "default", "command": "echo", "args": ["mcp via tls"]}}})),
    );
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("mcp via tls"), "{body}");

    let r = rpc(
        port,
        &cert,
        "sandbox.stop",
        json!({"sandbox": "tls", "namespace": "default"}),
    );
    assert!(r.get("result").is_some(), "{r}");
    // The client address nginx forwarded, believed because the gateway
    // trusts the proxy.
    let log = strip_ansi(&s.log_text());
    assert!(log.contains("client=203.0.113.7 "), "{log}");
    s.assert_no_leftovers();
}
