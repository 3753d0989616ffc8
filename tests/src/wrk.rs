//! HTTP load for the benchmark: `wrk` runs and their figures, and nginx
//! serving a small static file on loopback as the baseline a gateway
//! request is compared with (both installed by `packaging/dev/setup.sh`).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// What one wrk run measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Load {
    pub requests_per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub non_2xx: u64,
}

/// A wrk duration ("850.00us", "1.23ms", "1.02s", "2.00m") in ms.
pub fn duration_ms(text: &str) -> f64 {
    let split = text
        .find(|c: char| c.is_ascii_alphabetic())
        .unwrap_or(text.len());
    let (n, unit) = text.split_at(split);
    let n: f64 = n.parse().unwrap_or(f64::NAN);
    match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        "m" => n * 60_000.0,
        _ => f64::NAN,
    }
}

/// The figures of wrk's `--latency` output.
pub fn parse(out: &str) -> Load {
    let field = |prefix: &str| {
        out.lines()
            .find(|l| l.trim_start().starts_with(prefix))
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap_or("?")
            .to_string()
    };
    Load {
        requests_per_sec: field("Requests/sec:").parse().unwrap_or(0.0),
        p50_ms: duration_ms(&field("50%")),
        p99_ms: duration_ms(&field("99%")),
        non_2xx: out
            .lines()
            .find(|l| l.contains("Non-2xx or 3xx responses:"))
            .and_then(|l| l.rsplit(':').next())
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0),
    }
}

/// `wrk -t2 -c<connections> -d<secs>s --latency` against `url`, with a
/// Lua `script` for non-GET requests; every answer must be a 2xx.
pub fn run(url: &str, script: Option<&Path>, connections: u32, secs: u32) -> Load {
    let (load, text) = run_any(url, script, connections, secs);
    assert_eq!(load.non_2xx, 0, "error answers under load:\n{text}");
    load
}

/// [`run`] for answers of any status; also wrk's output.
pub fn run_any(url: &str, script: Option<&Path>, connections: u32, secs: u32) -> (Load, String) {
    let mut cmd = Command::new("wrk");
    cmd.args([
        "-t2",
        &format!("-c{connections}"),
        &format!("-d{secs}s"),
        "--latency",
    ]);
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
    (parse(&text), text.into_owned())
}

/// nginx in the foreground serving one small file at `/index.html`,
/// stopped on drop.
pub struct StaticNginx {
    child: Child,
    pub url: String,
    _dir: tempfile::TempDir,
}

impl StaticNginx {
    pub fn start(port: u16) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path().display();
        std::fs::write(
            dir.path().join("index.html"),
            r#"{"message":"Service is healthy"}"#,
        )
        .expect("write the file");
        let conf = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
             error_log {d}/error.log warn;\nevents {{}}\nhttp {{\n  access_log off;\n\
             client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n\
             scgi_temp_path {d}/scgi;\n  server {{\n    listen 127.0.0.1:{port};\n\
             root {d};\n  }}\n}}\n"
        );
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf).expect("write nginx.conf");
        let child = Command::new("nginx")
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx (installed by packaging/dev/setup.sh)");
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "nginx did not listen"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            child,
            url: format!("http://127.0.0.1:{port}/index.html"),
            _dir: dir,
        }
    }
}

impl Drop for StaticNginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_output_is_read_in_milliseconds() {
        let out = "Running 1s test\n  Latency Distribution\n     50%  850.00us\n     75%    1.00ms\n     90%    1.20ms\n     99%    2.50ms\n  1000 requests in 1.00s\nRequests/sec:   9999.50\nTransfer/sec:      1.00MB\n";
        let l = parse(out);
        assert_eq!(l.requests_per_sec, 9999.5);
        assert!((l.p50_ms - 0.85).abs() < 1e-9);
        assert_eq!(l.p99_ms, 2.5);
        assert_eq!(l.non_2xx, 0);
        assert_eq!(duration_ms("1.5s"), 1500.0);
        assert!(duration_ms("bogus").is_nan());
        let bad = parse("Non-2xx or 3xx responses: 12\nRequests/sec: 5\n");
        assert_eq!(bad.non_2xx, 12);
    }
}
