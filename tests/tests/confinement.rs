//! Confinement of VM processes, read from the host's /proc while a sandbox
//! runs: ids, capabilities, no_new_privs, seccomp, the jail root and the
//! namespaces; a probe run in a real sandbox's jail; a VM process killed
//! by SIGSYS.

use std::fs;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use moat_e2e::{cgroup_limits, Options, Server};
use serde_json::json;

fn status_field(pid: i32, key: &str) -> String {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_else(|| panic!("{key} missing"))
        .trim()
        .to_string()
}

fn ns(pid: &str, kind: &str) -> String {
    fs::read_link(format!("/proc/{pid}/ns/{kind}"))
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default()
}

#[test]
fn vm_processes_are_jailed() {
    let s = Server::start();
    s.start_sandbox("jail-a", json!({"memory": 256, "cpus": 2}));
    s.start_sandbox("jail-b", json!({}));
    let vms = s.vm_pids();
    assert_eq!(vms.len(), 2, "{vms:?}");
    assert_ne!(vms[0].1, vms[1].1, "each VM has its own uid");
    for (pid, uid) in &vms {
        let pid = *pid;
        let uids: Vec<u32> = status_field(pid, "Uid:")
            .split_whitespace()
            .map(|v| v.parse().unwrap())
            .collect();
        let gids: Vec<u32> = status_field(pid, "Gid:")
            .split_whitespace()
            .map(|v| v.parse().unwrap())
            .collect();
        assert!(uids.iter().all(|u| u == uid), "{uids:?}");
        assert!(gids.iter().all(|g| *g != 0), "{gids:?}");
        assert_eq!(
            status_field(pid, "Groups:"),
            "",
            "no supplementary groups under TCG"
        );
        for cap in ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"] {
            assert_eq!(status_field(pid, cap), "0000000000000000", "{cap}");
        }
        assert_eq!(status_field(pid, "NoNewPrivs:"), "1");
        assert_eq!(status_field(pid, "Seccomp:"), "2");
        // Its root is the jail: only what the VM needs is there.
        let root = format!("/proc/{pid}/root");
        for present in [
            "disk/image",
            "boot/vmlinux",
            "boot/initramfs.cpio",
            "vm/rw.ext4",
            "usr/bin",
            "dev/null",
        ] {
            assert!(
                Path::new(&root).join(present).exists(),
                "{present} missing in the jail"
            );
        }
        for absent in [
            "etc/passwd",
            "root",
            "home",
            "var/lib/moat",
            "dev/sda",
            "dev/vda",
            "sys",
        ] {
            assert!(
                !Path::new(&root).join(absent).exists(),
                "{absent} visible in the jail"
            );
        }
        let mut own: Vec<String> = fs::read_dir(Path::new(&root).join("vm"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        own.sort();
        assert_eq!(
            own,
            ["agent.sock", "console.sock", "rw.ext4"],
            "only its own disk and sockets"
        );
        // Namespaces differ from the host's (the broker's).
        for kind in ["mnt", "pid", "net", "ipc", "uts"] {
            assert_ne!(
                ns(&pid.to_string(), kind),
                ns("self", kind),
                "{kind} namespace shared"
            );
        }
        // Its network namespace has nothing but an (unconfigured) loopback.
        let net = fs::read_to_string(format!("/proc/{pid}/net/dev")).unwrap();
        let ifaces: Vec<&str> = net
            .lines()
            .skip(2)
            .filter_map(|l| l.split(':').next())
            .map(str::trim)
            .collect();
        assert_eq!(ifaces, vec!["lo"], "{net}");
        // PID 1 of its own PID namespace.
        let nspid = status_field(pid, "NSpid:");
        assert!(
            nspid.ends_with(" 1") || nspid.ends_with("\t1"),
            "NSpid {nspid}"
        );
        // rlimits.
        let limits = fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
        assert!(
            limits
                .lines()
                .any(|l| l.starts_with("Max open files") && l.contains("1024")),
            "{limits}"
        );
        assert!(
            limits
                .lines()
                .any(|l| l.starts_with("Max core file size") && l.contains(" 0 ")),
            "{limits}"
        );
    }
    let a = vms
        .iter()
        .map(|(p, _)| cgroup_limits(*p))
        .collect::<Vec<_>>();
    assert!(a.contains(&((256 + 256) << 20, 2.0)), "{a:?}");
    assert!(a.contains(&((512 + 256) << 20, 1.0)), "{a:?}");
    // The broker itself keeps only its documented capabilities
    // (broker/src/privileges.rs): CHOWN, DAC_OVERRIDE, FOWNER, KILL, SETGID,
    // SETUID, SETPCAP, SYS_ADMIN, MKNOD, NET_BIND_SERVICE, NET_ADMIN.
    let broker = s
        .daemons()
        .into_iter()
        .find(|d| d.2 == "moat-broker")
        .expect("broker process");
    for cap in ["CapEff:", "CapPrm:", "CapBnd:"] {
        assert_eq!(
            status_field(broker.0, cap),
            "00000000082015eb",
            "broker {cap}"
        );
    }
    assert_eq!(status_field(broker.0, "CapInh:"), "0000000000000000");
    s.stop_sandbox("jail-a");
    s.stop_sandbox("jail-b");
    s.assert_no_leftovers();
}

/// The jailer command line that launched VM process `pid` (its parent is
/// the jailer's waiting half, which keeps the original argv), and the
/// jailer binary itself.
fn jail_command(pid: i32) -> (PathBuf, Vec<String>) {
    let ppid: i32 = status_field(pid, "PPid:").parse().unwrap();
    let exe = fs::read_link(format!("/proc/{ppid}/exe")).unwrap();
    let raw = fs::read(format!("/proc/{ppid}/cmdline")).unwrap();
    let args = raw
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .skip(1)
        .map(|a| String::from_utf8(a.to_vec()).unwrap())
        .collect();
    (exe, args)
}

/// The value of `flag` in a jailer command line whose value ends with
/// `suffix`.
fn flag_value(args: &[String], flag: &str, suffix: &str) -> String {
    args.windows(2)
        .find(|w| w[0] == flag && w[1].ends_with(suffix))
        .map(|w| w[1].clone())
        .unwrap_or_else(|| panic!("{flag} …{suffix} missing in {args:?}"))
}

/// Runs the probe through the same jailer with the jail arguments of a real
/// sandbox (its uid, binds, devices, rlimits; namespaces and seccomp are
/// the jailer's own), with a fresh root and outside the sandbox's cgroup.
struct Probe {
    jailer: PathBuf,
    args: Vec<String>,
    bin_dir: tempfile::TempDir,
    root: tempfile::TempDir,
}

impl Probe {
    fn for_vm(pid: i32) -> Self {
        let (jailer, args) = jail_command(pid);
        let bin_dir = tempfile::tempdir().unwrap();
        fs::set_permissions(bin_dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let probe = bin_dir.path().join("moat-jail-probe");
        fs::copy(env!("CARGO_BIN_EXE_moat-jail-probe"), &probe).unwrap();
        fs::set_permissions(&probe, fs::Permissions::from_mode(0o755)).unwrap();
        Self {
            jailer,
            args,
            bin_dir,
            root: tempfile::tempdir().unwrap(),
        }
    }

    fn run(&self, probe_args: &[&str]) -> (std::process::ExitStatus, Vec<String>) {
        let mut args: Vec<String> = Vec::new();
        let mut it = self.args.iter();
        while let Some(a) = it.next() {
            match a.as_str() {
                "--" => break,
                "--root" => {
                    it.next();
                    args.push(a.clone());
                    args.push(self.root.path().display().to_string());
                }
                _ => args.push(a.clone()),
            }
        }
        // The jailer opens the program on the host and execs it through
        // that fd: the probe need not be visible inside the jail.
        args.push("--".into());
        args.push(
            self.bin_dir
                .path()
                .join("moat-jail-probe")
                .display()
                .to_string(),
        );
        args.extend(probe_args.iter().map(|a| a.to_string()));
        let out = Command::new(&self.jailer)
            .args(&args)
            .env_clear()
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let lines = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect();
        eprintln!(
            "probe {probe_args:?}: {:?}\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status, lines)
    }
}

fn outcome<'a>(lines: &'a [String], check: &str) -> &'a str {
    lines
        .iter()
        .find_map(|l| l.strip_prefix(check)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("{check} not reported: {lines:?}"))
}

#[test]
fn a_compromised_vmm_reaches_nothing_and_a_forbidden_syscall_kills_it() {
    let s = Server::start();
    s.start_sandbox("victim", json!({}));
    let victim = s.vm_pids();
    assert_eq!(victim.len(), 1);
    let victim_pid = victim[0].0;
    s.start_sandbox("attacker", json!({}));
    let attacker_pid = s
        .vm_pids()
        .into_iter()
        .find(|(p, _)| *p != victim_pid)
        .expect("attacker VM")
        .0;
    let victim_dir = flag_value(&jail_command(victim_pid).1, "--rw", ":/vm");
    let victim_disk = format!("{}/rw.ext4", victim_dir.trim_end_matches(":/vm"));
    assert!(Path::new(&victim_disk).exists(), "{victim_disk}");
    let probe = Probe::for_vm(attacker_pid);

    // Files: its own disk opens (so the probe really runs with the
    // attacker's binds); nothing else does.
    let (status, lines) = probe.run(&["files", &victim_disk, &victim_pid.to_string()]);
    assert!(status.success(), "{status:?}");
    assert!(outcome(&lines, "own-disk").starts_with("reached"));
    for check in [
        "other-disk",
        "other-disk-via-proc",
        "host:/etc/shadow",
        "host:/etc/passwd",
        "host:/root",
        "host:/var/lib/moat",
        "host:/run/moat",
        "host:/sys/kernel",
        "host:/dev/sda",
        "host:/dev/vda",
        "host:/dev/mem",
        "write:/usr",
        "write:/disk/image",
        "write:/boot/vmlinux",
        "write:/dev",
    ] {
        assert!(
            outcome(&lines, check).starts_with("denied"),
            "{check}: {lines:?}"
        );
    }
    // The device nodes it was given work (the jail's root is nodev, its
    // /dev is not).
    assert!(
        outcome(&lines, "dev:/dev/null").starts_with("reached"),
        "{lines:?}"
    );
    // Alone in its PID namespace.
    assert_eq!(outcome(&lines, "processes"), "reached 1");

    // Network: a datagram to a host listener on loopback and to a host
    // abstract socket never arrives; the only interface is loopback.
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_nonblocking(true).unwrap();
    let port = udp.local_addr().unwrap().port();
    let name = format!("moat-probe-{}", std::process::id());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let unix = std::os::unix::net::UnixDatagram::bind_addr(&addr).unwrap();
    unix.set_nonblocking(true).unwrap();
    let (status, lines) = probe.run(&["net", &port.to_string(), &name]);
    assert!(outcome(&lines, "abstract-unix").starts_with("denied"));
    assert_eq!(outcome(&lines, "interfaces"), "reached lo");
    // An AF_INET socket is outside the allow-list (AF_UNIX only).
    assert_eq!(status.signal(), Some(libc::SIGSYS), "{status:?}");
    assert!(
        lines.last().is_some_and(|l| l.starts_with("about-to-udp")),
        "{lines:?}"
    );
    let mut buf = [0u8; 64];
    assert!(
        udp.recv_from(&mut buf).is_err(),
        "datagram reached the host"
    );
    assert!(
        unix.recv_from(&mut buf).is_err(),
        "datagram reached the host"
    );

    // No new namespaces: clone3 is answered ENOSYS (its flags cannot be
    // checked), clone with CLONE_NEWUSER kills.
    let (status, lines) = probe.run(&["namespaces"]);
    assert!(
        outcome(&lines, "clone3").contains("os error 38"),
        "{lines:?}"
    );
    assert_eq!(status.signal(), Some(libc::SIGSYS), "{status:?}");
    assert!(
        lines
            .last()
            .is_some_and(|l| l.starts_with("about-to-clone-newuser")),
        "{lines:?}"
    );

    // Outside the allow-list: killed by SIGSYS before the call returns.
    let gateway_port = s.url.rsplit(':').next().unwrap().to_string();
    for mode in [
        vec!["connect", gateway_port.as_str()],
        vec!["tap-persist"],
        vec!["forbidden"],
    ] {
        let (status, lines) = probe.run(&mode);
        assert_eq!(status.signal(), Some(libc::SIGSYS), "{mode:?}: {status:?}");
        assert_eq!(lines.len(), 1, "the call returned: {lines:?}");
        assert!(lines[0].starts_with("about-to-"), "{lines:?}");
    }

    // Both real sandboxes are untouched.
    for name in ["victim", "attacker"] {
        let r = s.run(name, "echo", &["alive"]);
        assert_eq!(Server::stdout_lines(&r), vec!["alive"], "{name}");
    }
    s.stop_sandbox("victim");
    s.stop_sandbox("attacker");
    s.assert_no_leftovers();
}

/// A copy of the probe under /usr (the only host directory a jailed VM
/// process sees), removed on drop.
struct ProbeAsVmm(PathBuf);

impl ProbeAsVmm {
    fn install() -> Self {
        let dir = PathBuf::from(format!(
            "/usr/local/libexec/moat-e2e-{}",
            std::process::id()
        ));
        fs::create_dir_all(&dir).unwrap();
        let bin = dir.join("moat-jail-probe");
        fs::copy(env!("CARGO_BIN_EXE_moat-jail-probe"), &bin).unwrap();
        fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).unwrap();
        Self(dir)
    }
}

impl Drop for ProbeAsVmm {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[test]
fn a_vm_process_killed_by_seccomp_is_logged_and_reported() {
    let probe = ProbeAsVmm::install();
    let s = Server::start_with(Options {
        vmm_program: Some(probe.0.join("moat-jail-probe")),
        ..Options::default()
    });
    // The "VMM" makes a call outside the allow-list as soon as it runs.
    let (code, message) = s.err(
        "sandbox.start",
        json!({"sandbox": "doomed", "namespace": "default", "config": {}}),
    );
    assert_eq!(code, -32603, "{message}");
    assert!(message.contains("SIGSYS"), "{message}");
    assert!(message.contains("seccomp allow-list"), "{message}");
    let log = s.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("killed by SIGSYS"))
        .unwrap_or_else(|| panic!("not logged:\n{log}"));
    assert!(line.contains("ERROR") && line.contains("doomed"), "{line}");
    s.assert_no_leftovers();
}

#[test]
fn volume_paths_are_resolved_beneath_their_roots() {
    let tmp = tempfile::tempdir().unwrap();
    let volumes = tmp.path().join("volumes");
    let ns = volumes.join("default");
    fs::create_dir_all(ns.join("data")).unwrap();
    std::os::unix::fs::symlink("/etc", ns.join("planted")).unwrap();
    std::os::unix::fs::symlink("../..", ns.join("data/up")).unwrap();
    let shared = tmp.path().join("shared");
    fs::create_dir_all(shared.join("x")).unwrap();
    std::os::unix::fs::symlink("/root", shared.join("link")).unwrap();
    let s = Server::start_with(Options {
        volumes_toml: format!(
            "dir = \"{}\"\nallowed_roots = [\"{}\"]\n",
            volumes.display(),
            shared.display()
        ),
        ..Options::default()
    });
    let start = |volume: &str| {
        s.err(
            "sandbox.start",
            json!({"sandbox": "vol", "namespace": "default",
                   "config": {"volumes": [volume]}}),
        )
    };
    let shared_link = format!("{}:/d", shared.join("link").display());
    let shared_up = format!("{}/../../etc:/d", shared.display());
    for (volume, why) in [
        ("../../etc:/d", "'..'"),
        ("data/../../../etc:/d", "'..'"),
        (shared_up.as_str(), "'..'"),
        ("/etc:/d", "outside the roots"),
        ("planted:/d", "symbolic link"),
        ("data/up:/d", "symbolic link"),
        ("data/up/etc:/d", "symbolic link"),
        (shared_link.as_str(), "symbolic link"),
        ("missing/deeper:/d", "does not exist"),
        ("data:/proc", "/proc"),
    ] {
        let (code, message) = start(volume);
        assert_eq!(code, -32602, "{volume}: {message}");
        assert!(message.contains(why), "{volume}: {message}");
    }
    assert!(s.vm_pids().is_empty());
    s.assert_no_leftovers();
}
