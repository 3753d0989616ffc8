//! `config.volumes` end to end: host directories shared into real VMs over
//! virtio-9p, read-only enforced, files owned by the configured volume
//! owner, and symlinks a guest plants leading nowhere on the host.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};

use moat_e2e::{Options, Server};
use serde_json::json;

fn stdout(r: &serde_json::Value) -> String {
    Server::stdout_lines(r).join("\n")
}

fn sh(s: &Server, name: &str, script: &str) -> serde_json::Value {
    s.run(name, "/bin/sh", &["-c", script])
}

#[test]
fn volumes_share_both_ways_read_only_and_owned_by_the_volume_owner() {
    let s = Server::start_with(Options::default());
    let ns_dir = s.dir.path().join("volumes/default");
    let owner = s.uid_base + s.uid_count;
    s.start_sandbox("vols", json!({"volumes": ["data:/data", "seed:/seed:ro"]}));
    // Both top-level directories were created for the namespace.
    for d in ["data", "seed"] {
        let m = fs::metadata(ns_dir.join(d)).unwrap();
        assert_eq!(
            (m.uid(), m.permissions().mode() & 0o777),
            (owner, 0o700),
            "{d}"
        );
    }
    fs::write(ns_dir.join("seed/hello.txt"), "from the host\n").unwrap();
    fs::write(ns_dir.join("data/h.txt"), "host wrote\n").unwrap();

    let r = sh(&s, "vols", "cat /seed/hello.txt /data/h.txt");
    assert_eq!(stdout(&r), "from the host\nhost wrote", "{r}");

    // Read-only in the guest.
    let r = sh(
        &s,
        "vols",
        "echo x > /seed/new 2>&1; echo rc=$?; grep ' /seed ' /proc/mounts",
    );
    let out = stdout(&r);
    assert!(out.contains("rc=1") || out.contains("rc=2"), "{out}");
    // 9p (sandboxes with volumes run on QEMU on either broker backend).
    assert!(out.contains(" 9p ") && out.contains("ro,"), "{out}");
    assert!(!ns_dir.join("seed/new").exists());

    // Guest writes land on the host, owned by the volume owner, never setuid.
    let r = sh(
        &s,
        "vols",
        "echo guest wrote > /data/g.txt && chmod 4755 /data/g.txt && mkdir /data/sub && ls -ln /data/g.txt",
    );
    assert!(
        stdout(&r).starts_with("-rwsr-xr-x"),
        "guest sees its own mode: {r}"
    );
    let g = ns_dir.join("data/g.txt");
    assert_eq!(fs::read_to_string(&g).unwrap(), "guest wrote\n");
    let m = fs::metadata(&g).unwrap();
    assert_eq!(m.uid(), owner, "owned by volume.owner_uid");
    assert_eq!(
        m.mode() & 0o7000,
        0,
        "no setuid/setgid/sticky on the host: {:o}",
        m.mode()
    );
    assert!(fs::metadata(ns_dir.join("data/sub")).unwrap().is_dir());
    assert_ne!(m.uid(), 0);

    // A second sandbox mounting the same directory sees the first's files.
    s.stop_sandbox("vols");
    s.start_sandbox("vols2", json!({"volumes": ["data:/mnt/data:ro"]}));
    let r = sh(&s, "vols2", "cat /mnt/data/g.txt");
    assert_eq!(stdout(&r), "guest wrote", "{r}");
    let metrics = s.ok(
        "sandbox.metrics.get",
        json!({"namespace": "default", "sandbox": "vols2"}),
    );
    assert_eq!(
        metrics["sandboxes"][0]["volumes"],
        json!(["data:/mnt/data:ro"])
    );
    s.stop_sandbox("vols2");
    s.assert_no_leftovers();
}

#[test]
fn symlinks_planted_by_a_guest_lead_nowhere_on_the_host() {
    let s = Server::start_with(Options::default());
    let ns_dir = s.dir.path().join("volumes/default");
    s.start_sandbox("planter", json!({"volumes": ["shared:/shared"]}));
    // A file only the host has: links the guest plants toward it must not
    // reach it.
    let secret_dir = tempfile::tempdir_in("/tmp").unwrap();
    let secret = secret_dir.path().join("secret");
    fs::write(&secret, "host secret").unwrap();
    fs::set_permissions(secret_dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o644)).unwrap();
    let r = sh(
        &s,
        "planter",
        &format!(
            "ln -s {0} /shared/escape && ln -s ../../../../../..{0} /shared/up && ln -s /etc /shared/etc; cat /shared/escape /shared/up 2>&1; cat /shared/etc/hostname",
            secret.display()
        ),
    );
    let out = stdout(&r);
    assert!(!out.contains("host secret"), "{r}");
    let guest_hostname = stdout(&s.run("planter", "cat", &["/etc/hostname"]));
    assert!(
        out.ends_with(&guest_hostname),
        "the guest's /etc, not the host's: {r}"
    );
    // On the host they are plain files, never symlinks.
    for link in ["escape", "up", "etc"] {
        let m = fs::symlink_metadata(ns_dir.join("shared").join(link)).unwrap();
        assert!(!m.file_type().is_symlink(), "{link} is a host symlink");
    }
    // Another sandbox cannot use them to reach the host's /etc.
    for volume in ["shared/escape:/x", "shared/up:/x", "shared/etc:/x"] {
        let (code, message) = s.err(
            "sandbox.start",
            json!({"sandbox": "thief", "namespace": "default", "config": {"volumes": [volume]}}),
        );
        assert_eq!(code, -32602, "{volume}: {message}");
        assert!(message.contains("not a directory"), "{volume}: {message}");
    }
    // A symlink planted on the host side is refused too.
    std::os::unix::fs::symlink("/etc", ns_dir.join("hostlink")).unwrap();
    let (code, message) = s.err(
        "sandbox.start",
        json!({"sandbox": "thief", "namespace": "default", "config": {"volumes": ["hostlink:/x"]}}),
    );
    assert_eq!(code, -32602, "{message}");
    assert!(message.contains("symbolic link"), "{message}");
    s.stop_sandbox("planter");
    s.assert_no_leftovers();
}
