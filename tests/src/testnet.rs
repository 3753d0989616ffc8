//! Test hosts in network namespaces of their own, reached from the host
//! through a veth pair: one stands for "the internet" (198.51.100.2, a
//! documentation range moat does not block), one for a cloud metadata
//! service (169.254.169.254). Each serves HTTP on port 80 with a marker
//! page, and optionally DNS on port 53. Everything is removed on drop.

use std::fs;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static HOSTS: AtomicU32 = AtomicU32::new(0);

/// One test host.
pub struct TestHost {
    pub netns: String,
    host_if: String,
    pub addr: String,
    servers: Vec<Child>,
    _dir: tempfile::TempDir,
    /// The page its HTTP server answers with.
    pub marker: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A tiny DNS server answering A queries for `names` (python, no deps).
const DNS_SERVER: &str = r#"
import socket, struct, sys
addr, names = sys.argv[1], dict(a.split("=") for a in sys.argv[2:])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((addr, 53))
while True:
    q, peer = s.recvfrom(512)
    i, labels = 12, []
    while q[i]:
        labels.append(q[i+1:i+1+q[i]].decode().lower()); i += 1 + q[i]
    name, qtype = ".".join(labels), struct.unpack(">H", q[i+1:i+3])[0]
    question = q[12:i+5]
    ip = names.get(name)
    if ip and qtype == 1:
        hdr = q[:2] + b"\x81\x80\x00\x01\x00\x01\x00\x00\x00\x00"
        ans = b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x05\x00\x04" + socket.inet_aton(ip)
        s.sendto(hdr + question + ans, peer)
    else:
        s.sendto(q[:2] + b"\x81\x83\x00\x01\x00\x00\x00\x00\x00\x00" + question, peer)
"#;

impl TestHost {
    /// A host at `addr`/`prefix` whose host-side veth is `host_addr`.
    pub fn start(role: &str, addr: &str, host_addr: &str, prefix: u8) -> Self {
        let n = HOSTS.fetch_add(1, Ordering::SeqCst);
        let id = format!("{}{}", std::process::id() % 100000, n);
        let netns = format!("moat-t-{role}-{id}");
        let host_if = format!("mt{id}h");
        let ns_if = format!("mt{id}n");
        let _ = Command::new("ip").args(["netns", "del", &netns]).output();
        ip(&["netns", "add", &netns]);
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
        ]);
        ip(&["link", "set", &ns_if, "netns", &netns]);
        ip(&[
            "addr",
            "add",
            &format!("{host_addr}/{prefix}"),
            "dev",
            &host_if,
        ]);
        ip(&["link", "set", &host_if, "up"]);
        let inns = |args: &[&str]| {
            let mut a = vec!["netns", "exec", netns.as_str(), "ip"];
            a.extend(args);
            ip(&a);
        };
        inns(&["addr", "add", &format!("{addr}/{prefix}"), "dev", &ns_if]);
        inns(&["link", "set", &ns_if, "up"]);
        inns(&["link", "set", "lo", "up"]);
        inns(&["route", "add", "default", "via", host_addr]);
        let dir = tempfile::tempdir().expect("tempdir");
        let marker = format!("moat test host {role} {id}");
        fs::write(dir.path().join("index.html"), &marker).expect("page");
        let http = Command::new("ip")
            .args([
                "netns",
                "exec",
                &netns,
                "/usr/bin/python3",
                "-m",
                "http.server",
                "80",
                "--bind",
                addr,
            ])
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("http server");
        let host = Self {
            netns,
            host_if,
            addr: addr.to_string(),
            servers: vec![http],
            _dir: dir,
            marker,
        };
        host.wait_http();
        host
    }

    /// Also answer DNS: `names` are `name=ip`.
    pub fn serve_dns(&mut self, names: &[&str]) {
        let script = self._dir.path().join("dns.py");
        fs::write(&script, DNS_SERVER).expect("dns script");
        let mut args = vec![
            "netns".to_string(),
            "exec".into(),
            self.netns.clone(),
            "/usr/bin/python3".into(),
        ];
        args.push(script.display().to_string());
        args.push(self.addr.clone());
        args.extend(names.iter().map(|s| s.to_string()));
        let child = Command::new("ip")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("dns server");
        self.servers.push(child);
        std::thread::sleep(Duration::from_millis(500));
    }

    /// Runs `args` (a long-lived server) inside the host's namespace until
    /// the host is dropped.
    pub fn spawn_in(&mut self, args: &[&str]) {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.netns])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("server in the test host");
        self.servers.push(child);
        std::thread::sleep(Duration::from_millis(500));
    }

    /// The host itself reaches the server (so a guest failing to is policy).
    fn wait_http(&self) {
        let start = Instant::now();
        loop {
            let out = Command::new("curl")
                .args(["-s", "-m", "2", &format!("http://{}/", self.addr)])
                .output();
            if let Ok(o) = out {
                if String::from_utf8_lossy(&o.stdout).contains(&self.marker) {
                    return;
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "test host {} never served HTTP",
                self.addr
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        for s in &mut self.servers {
            let _ = s.kill();
            let _ = s.wait();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .output();
    }
}
