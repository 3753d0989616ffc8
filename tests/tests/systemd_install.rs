//! The Debian package under real systemd: a fresh Debian 12 root booted
//! with `systemd-nspawn --boot` (systemd as its PID 1), the package
//! installed with dpkg, both services started by its maintainer scripts,
//! the API reached over TLS through nginx with the shipped site, a sandbox
//! started and run through the proxy, a broker restart that keeps it
//! running, a clean stop, and removal and purge that keep the state.
//!
//! One adaptation to the test host, and only one: on a cgroup-v1 host
//! nspawn mounts the controller hierarchies read-only in the container
//! (it cannot delegate v1 controllers), so the host's memory, cpu, cpuacct,
//! pids and blkio hierarchies are bound writable at `/cgroup-host` and the
//! broker is pointed there (`[cgroups] root`, plus a `ReadWritePaths=`
//! drop-in) under a cgroup parent of this test's own.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const CONTROLLERS: [&str; 5] = ["memory", "cpu", "cpuacct", "pids", "blkio"];

fn top() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Runs a host command that must succeed; its stdout.
fn host(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A booted container and everything it made on the host.
struct Container {
    root: tempfile::TempDir,
    nspawn: Child,
    /// The container's PID 1 (systemd), as the host sees it.
    leader: u32,
    log: PathBuf,
    cgroup_parent: String,
}

/// The pid of the process named `systemd` below `ancestor`, if it runs yet.
fn systemd_below(ancestor: u32) -> Option<u32> {
    let mut parents = std::collections::HashMap::new();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let Some(Ok(ppid)) = stat[close + 2..].split(' ').nth(1).map(str::parse::<u32>) else {
            continue;
        };
        parents.insert(pid, (ppid, stat[open + 1..close].to_string()));
    }
    let descends = |mut p: u32| {
        while let Some((pp, _)) = parents.get(&p) {
            if *pp == ancestor {
                return true;
            }
            p = *pp;
        }
        false
    };
    parents
        .iter()
        .find(|(pid, (_, comm))| comm == "systemd" && descends(**pid))
        .map(|(pid, _)| *pid)
}

impl Container {
    fn boot(tar: &Path, cgroup_parent: &str) -> Container {
        let root = tempfile::tempdir().unwrap();
        host(
            Command::new("tar")
                .arg("-xf")
                .arg(tar)
                .arg("-C")
                .arg(root.path()),
        );
        let log = std::env::temp_dir().join(format!("moat-nspawn-{}.log", std::process::id()));
        let console = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new("systemd-nspawn");
        cmd.arg("-D")
            .arg(root.path())
            .args([
                "--boot",
                "--private-network",
                "--register=no",
                "--keep-unit",
            ])
            .arg(format!("--machine=moat-test-{}", std::process::id()))
            .args(["--bind=/dev/kvm", "--bind=/dev/net/tun"]);
        for c in CONTROLLERS {
            cmd.arg(format!("--bind=/sys/fs/cgroup/{c}:/cgroup-host/{c}"));
        }
        let nspawn = cmd
            .stdin(Stdio::null())
            .stdout(console.try_clone().unwrap())
            .stderr(console)
            .spawn()
            .expect("systemd-nspawn (make setup installs systemd-container)");
        let mut c = Container {
            root,
            nspawn,
            leader: 0,
            log,
            cgroup_parent: cgroup_parent.to_string(),
        };
        let start = Instant::now();
        let booted = |c: &Container| {
            c.leader != 0
                && matches!(
                    c.run("systemctl is-system-running").0.as_str(),
                    "running" | "degraded"
                )
        };
        while !booted(&c) {
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "the container did not finish booting: {}",
                moat_e2e::strip_ansi(&std::fs::read_to_string(&c.log).unwrap_or_default())
            );
            std::thread::sleep(Duration::from_millis(500));
            if c.leader == 0 {
                c.leader = systemd_below(c.nspawn.id()).unwrap_or(0);
            }
        }
        c
    }

    /// Runs `script` with `sh -c` inside the container: (stdout, success,
    /// stderr).
    fn run(&self, script: &str) -> (String, bool, String) {
        let out = Command::new("nsenter")
            .args(["-t", &self.leader.to_string(), "-a", "sh", "-c", script])
            .output()
            .expect("nsenter");
        (
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Runs `script` inside the container; it must succeed. Its stdout.
    fn exec(&self, script: &str) -> String {
        let (text, ok, stderr) = self.run(script);
        assert!(
            ok,
            "in the container: {script}\n{text}\n{stderr}\njournal:\n{}",
            self.journal()
        );
        text
    }

    fn journal(&self) -> String {
        self.run("journalctl -u moat-broker -u moat-gateway --no-pager | tail -40")
            .0
    }

    fn path(&self, p: &str) -> PathBuf {
        self.root.path().join(p.trim_start_matches('/'))
    }

    /// One JSON-RPC call through nginx over TLS, with `key`.
    fn rpc(&self, key: &str, method: &str, params: Value) -> Value {
        let body = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
        std::fs::write(self.path("/var/tmp/request.json"), body.to_string()).unwrap();
        let out = self.exec(&format!(
            "curl -sS --cacert /etc/ssl/moat/fullchain.pem \
             --resolve sandbox.example.com:443:127.0.0.1 \
             -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' \
             --data-binary @/var/tmp/request.json https://sandbox.example.com/api/v1/rpc"
        ));
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
    }

    fn ok(&self, key: &str, method: &str, params: Value) -> Value {
        let r = self.rpc(key, method, params.clone());
        r.get("result")
            .cloned()
            .unwrap_or_else(|| panic!("{method} {params}: {r}\n{}", self.journal()))
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if self.leader != 0 {
            let _ = self.run("systemctl poweroff");
        }
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            if matches!(self.nspawn.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
        // The broker's cgroups live in the host's hierarchies.
        for c in CONTROLLERS {
            let dir = Path::new("/sys/fs/cgroup")
                .join(c)
                .join(&self.cgroup_parent);
            if let Ok(entries) = std::fs::read_dir(&dir) {
                for e in entries.flatten() {
                    if e.path().is_dir() {
                        let _ = std::fs::remove_dir(e.path());
                    }
                }
            }
            let _ = std::fs::remove_dir(&dir);
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

#[test]
fn the_package_runs_under_systemd_behind_nginx_and_stops_and_removes_cleanly() {
    let deb = host(&mut Command::new(top().join("packaging/deb/build.sh")));
    let tar = host(&mut Command::new(
        top().join("tests/fixtures/systemd-root.sh"),
    ));
    let parent = format!("moat-systemd-test-{}", std::process::id());
    let c = Container::boot(Path::new(&tar), &parent);
    std::fs::copy(&deb, c.path("/var/tmp/moat.deb")).unwrap();

    // Install: the maintainer scripts make the user, directories and
    // secret, enable both units and start them.
    c.exec("dpkg -i /var/tmp/moat.deb");
    assert_eq!(
        c.exec("systemctl is-enabled moat-broker moat-gateway"),
        "enabled\nenabled"
    );
    // The one host adaptation (see the module doc).
    c.exec(&format!(
        "printf '\\n[cgroups]\\nroot = \"/cgroup-host\"\\nparent = \"{parent}\"\\n' >> /etc/moat/broker.toml && \
         mkdir -p /etc/systemd/system/moat-broker.service.d && \
         printf '[Service]\\nReadWritePaths=/cgroup-host\\n' > /etc/systemd/system/moat-broker.service.d/cgroup-host.conf && \
         systemctl daemon-reload && systemctl restart moat-broker moat-gateway"
    ));
    let start = Instant::now();
    while c
        .exec("curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:5555/api/v1/health || true")
        != "200"
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the gateway never became healthy:\n{}",
            c.journal()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(
        c.exec("systemctl is-active moat-broker moat-gateway"),
        "active\nactive"
    );
    // The gateway runs as the unprivileged user, the broker as root.
    assert_eq!(
        c.exec("stat -c %U /proc/$(systemctl show -p MainPID --value moat-gateway)"),
        "moat"
    );

    // nginx with the shipped site and a test certificate.
    c.exec(
        "mkdir -p /etc/ssl/moat && \
         openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=sandbox.example.com \
           -addext subjectAltName=DNS:sandbox.example.com \
           -keyout /etc/ssl/moat/privkey.pem -out /etc/ssl/moat/fullchain.pem 2>/dev/null && \
         cp /usr/share/doc/moat/examples/nginx-moat.conf /etc/nginx/sites-available/moat && \
         ln -sf ../sites-available/moat /etc/nginx/sites-enabled/moat && \
         nginx -t 2>/dev/null && systemctl reload-or-restart nginx",
    );
    let health = c.exec(
        "curl -sS --cacert /etc/ssl/moat/fullchain.pem \
         --resolve sandbox.example.com:443:127.0.0.1 https://sandbox.example.com/api/v1/health",
    );
    assert_eq!(health, r#"{"message":"Service is healthy"}"#);

    // A key, a sandbox and a command, all through the proxy.
    let key = c.exec("moat server keygen --namespace default --expire 1d 2>/dev/null");
    assert!(key.len() > 100, "{key}");
    let sb = json!({"sandbox": "s1", "namespace": "default"});
    c.ok(
        &key,
        "sandbox.start",
        json!({"sandbox": "s1", "namespace": "default", "config": {"image": "base"}}),
    );
    let boot_id = |c: &Container| {
        let r = c.ok(
            &key,
            "sandbox.command.run",
            json!({"sandbox": "s1", "namespace": "default",
                   "command": "cat", "args": ["/proc/sys/kernel/random/boot_id"]}),
        );
        assert_eq!(r["success"], json!(true), "{r}");
        r["output"][0]["text"].as_str().unwrap().to_string()
    };
    let first = boot_id(&c);
    assert_eq!(first.len(), 36, "{first}");
    let journal = c.exec("journalctl -u moat-broker --no-pager");
    assert!(journal.contains("sandbox started"), "{journal}");

    // A broker restart by systemd keeps the VM (KillMode=process) and the
    // new broker re-adopts it: same guest boot.
    c.exec("systemctl restart moat-broker");
    let start = Instant::now();
    let again = loop {
        let r = c.rpc(
            &key,
            "sandbox.command.run",
            json!({"sandbox": "s1", "namespace": "default",
                   "command": "cat", "args": ["/proc/sys/kernel/random/boot_id"]}),
        );
        if let Some(text) = r["result"]["output"][0]["text"].as_str() {
            break text.to_string();
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no answer after the broker restart: {r}\n{}",
            c.journal()
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(again, first, "the VM was rebooted by the restart");

    // A clean stop: the sandbox, then both services, and nothing left.
    c.ok(&key, "sandbox.stop", sb);
    c.exec("systemctl stop moat-gateway moat-broker");
    for unit in ["moat-gateway", "moat-broker"] {
        let state = c.exec(&format!(
            "systemctl show -p ActiveState --value {unit}; systemctl show -p Result --value {unit}"
        ));
        assert_eq!(state, "inactive\nsuccess", "{unit}: {}", c.journal());
    }
    assert_eq!(
        c.exec("cat /proc/[0-9]*/comm | grep -c -E '^(qemu-system|moat-jailer|moat-vmm|libkrun VM)' || true"),
        "0",
        "a VM or jailer process is left"
    );

    // Removal stops and disables, keeps configs and state; purge drops the
    // configs and keeps the state and the secret.
    c.exec("dpkg -r moat");
    assert!(!c.path("/usr/bin/moat-broker").exists());
    assert!(c.path("/etc/moat/broker.toml").exists());
    assert!(c.path("/var/lib/moat/sandboxes/default/s1.record").exists());
    c.exec("dpkg -P moat");
    assert!(!c.path("/etc/moat/broker.toml").exists());
    assert!(c.path("/var/lib/moat/sandboxes/default/s1.record").exists());
    assert!(c.path("/etc/moat/gateway.secret").exists());
}
