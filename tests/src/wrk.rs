//! HTTP load for the benchmark: `wrk` runs and their figures, the CPU time
//! the servers and wrk spent per request during a run, and nginx serving a
//! small static file on loopback as the baseline a gateway request is
//! compared with (both installed by `packaging/dev/setup.sh`).

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
    /// Requests answered in the run.
    pub requests: u64,
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
        requests: out
            .lines()
            .find(|l| l.contains(" requests in "))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse().ok())
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

/// CPU time (user + system, all threads) a process has used so far, in
/// microseconds, from `/proc/<pid>/stat`; `None` once it is gone.
pub fn process_cpu_us(pid: i32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold
    // spaces: state is field 3, utime 14 and stime 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (per_sec > 0).then(|| ticks * 1e6 / per_sec as f64)
}

/// CPU time used by waited-for children so far (wrk, once it exited), in
/// microseconds.
fn children_cpu_us() -> f64 {
    let usage = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN)
        .expect("getrusage");
    let us = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 * 1e6 + t.tv_usec() as f64;
    us(usage.user_time()) + us(usage.system_time())
}

/// Microseconds of CPU per request, by process, over one wrk run: the
/// named server processes, and `wrk` itself. Unlike requests per second,
/// this does not drop when other tenants of a shared host take CPU time.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CpuPerRequest(pub Vec<(String, f64)>);

impl CpuPerRequest {
    /// The servers' figures added up (everything but wrk).
    pub fn servers(&self) -> f64 {
        self.0
            .iter()
            .filter(|(n, _)| n != "wrk")
            .map(|(_, us)| us)
            .sum()
    }
}

/// Runs `load` (one wrk run) and measures the CPU each of `servers`
/// (name, pid) and wrk spent per request answered.
pub fn cpu_per_request(
    servers: &[(&str, i32)],
    load: impl FnOnce() -> Load,
) -> (Load, CpuPerRequest) {
    let cpu_of = |name: &str, pid: i32| {
        process_cpu_us(pid).unwrap_or_else(|| panic!("{name} ({pid}) is gone"))
    };
    let before: Vec<f64> = servers
        .iter()
        .map(|(name, pid)| cpu_of(name, *pid))
        .collect();
    let wrk_before = children_cpu_us();
    let load = load();
    let wrk_us = children_cpu_us() - wrk_before;
    assert!(load.requests > 0, "no requests were answered");
    let requests = load.requests as f64;
    let mut cpu: Vec<(String, f64)> = servers
        .iter()
        .zip(before)
        .map(|((name, pid), before)| (name.to_string(), (cpu_of(name, *pid) - before) / requests))
        .collect();
    cpu.push(("wrk".to_string(), wrk_us / requests));
    (load, CpuPerRequest(cpu))
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
    /// The serving process (one worker, no master).
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

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
        assert_eq!(l.requests, 1000);
        assert_eq!(duration_ms("1.5s"), 1500.0);
        assert!(duration_ms("bogus").is_nan());
        let bad = parse("Non-2xx or 3xx responses: 12\nRequests/sec: 5\n");
        assert_eq!(bad.non_2xx, 12);
    }

    #[test]
    fn a_process_cpu_time_is_read_and_grows_while_it_works() {
        let me = std::process::id() as i32;
        let before = process_cpu_us(me).expect("this process's CPU time");
        let started = Instant::now();
        let mut x = 0u64;
        while started.elapsed() < Duration::from_millis(100) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        let after = process_cpu_us(me).expect("this process's CPU time");
        assert!(after - before >= 50_000.0, "{before} -> {after}");
        assert_eq!(process_cpu_us(i32::MAX), None, "no such process");
        let cpu = CpuPerRequest(vec![
            ("moat-gateway".into(), 80.0),
            ("moat-broker".into(), 10.0),
            ("wrk".into(), 30.0),
        ]);
        assert_eq!(cpu.servers(), 90.0);
    }
}
