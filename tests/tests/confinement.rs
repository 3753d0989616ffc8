//! Confinement of VM processes, read from the host's /proc while a sandbox
//! runs: ids, capabilities, no_new_privs, seccomp, the jail root and the
//! namespaces.

use std::fs;
use std::path::Path;

use moat_e2e::{cgroup_limits, Server};
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
        let other_disks = fs::read_dir(Path::new(&root).join("vm")).unwrap().count();
        assert_eq!(other_disks, 2, "only its own disk and socket");
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
    // SETUID, SETPCAP, SYS_ADMIN, MKNOD.
    let broker = s
        .daemons()
        .into_iter()
        .find(|d| d.2 == "moat-broker")
        .expect("broker process");
    for cap in ["CapEff:", "CapPrm:", "CapBnd:"] {
        assert_eq!(
            status_field(broker.0, cap),
            "00000000082001eb",
            "broker {cap}"
        );
    }
    assert_eq!(status_field(broker.0, "CapInh:"), "0000000000000000");
    s.stop_sandbox("jail-a");
    s.stop_sandbox("jail-b");
    s.assert_no_leftovers();
}
