//! Packaging: the systemd units in `packaging/systemd/` pass
//! `systemd-analyze verify` against this host's systemd, and their
//! `systemd-analyze security` exposure stays within the targets (gateway
//! "OK" at 2.0 or less; the broker, root by its job, at most 5.0). The
//! units are checked in a scratch root holding the host's systemd units and
//! the release binaries at the paths the units name.

use std::path::{Path, PathBuf};
use std::process::Command;

use moat_e2e::bin_dir;

const UNITS: [&str; 2] = ["moat-broker.service", "moat-gateway.service"];

fn packaging() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging")
}

/// A root with the host's system units, ours, and our binaries in /usr/bin.
fn unit_root() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    for d in ["usr/bin", "usr/lib/systemd", "etc/systemd/system"] {
        std::fs::create_dir_all(r.join(d)).unwrap();
    }
    let copied = Command::new("cp")
        .args(["-a", "/usr/lib/systemd/system"])
        .arg(r.join("usr/lib/systemd/"))
        .status()
        .unwrap();
    assert!(copied.success());
    for bin in ["moat-broker", "moat-gateway"] {
        std::fs::copy(bin_dir().join(bin), r.join("usr/bin").join(bin)).unwrap();
    }
    for unit in UNITS {
        std::fs::copy(
            packaging().join("systemd").join(unit),
            r.join("etc/systemd/system").join(unit),
        )
        .unwrap();
    }
    root
}

#[test]
fn units_verify_cleanly() {
    let root = unit_root();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", root.path().display()))
        .args(UNITS)
        .output()
        .expect("systemd-analyze (package systemd)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(text.trim().is_empty(), "warnings: {text}");
}

/// The "Overall exposure level" of a unit.
fn exposure(root: &Path, unit: &str) -> f64 {
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true"])
        .arg(format!("--root={}", root.display()))
        .arg(unit)
        .output()
        .expect("systemd-analyze");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.split("Overall exposure level for ").nth(1))
        .and_then(|rest| rest.split(": ").nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level for {unit}: {text}"))
}

#[test]
fn unit_exposure_is_within_the_targets() {
    let root = unit_root();
    let gateway = exposure(root.path(), "moat-gateway.service");
    let broker = exposure(root.path(), "moat-broker.service");
    println!(
        "systemd-analyze security: moat-gateway.service {gateway}, moat-broker.service {broker}"
    );
    assert!(gateway <= 2.0, "gateway exposure {gateway}");
    assert!(broker <= 5.0, "broker exposure {broker}");
}

#[test]
fn sysusers_and_tmpfiles_make_the_user_and_directories() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    std::fs::create_dir_all(r.join("etc")).unwrap();
    let st = Command::new("systemd-sysusers")
        .arg(format!("--root={}", r.display()))
        .arg(packaging().join("sysusers.d/moat.conf"))
        .status()
        .expect("systemd-sysusers");
    assert!(st.success());
    let passwd = std::fs::read_to_string(r.join("etc/passwd")).unwrap();
    let moat = passwd
        .lines()
        .find(|l| l.starts_with("moat:"))
        .unwrap_or_else(|| panic!("{passwd}"));
    assert!(moat.ends_with(":/nonexistent:/usr/sbin/nologin"), "{moat}");
    let gid: u32 = moat.split(':').nth(3).unwrap().parse().unwrap();
    assert!(std::fs::read_to_string(r.join("etc/group"))
        .unwrap()
        .lines()
        .any(|l| l.starts_with("moat:")));

    let st = Command::new("systemd-tmpfiles")
        .arg(format!("--root={}", r.display()))
        .arg("--create")
        .arg(packaging().join("tmpfiles.d/moat.conf"))
        .status()
        .expect("systemd-tmpfiles");
    assert!(st.success());
    use std::os::unix::fs::MetadataExt;
    for (dir, mode, group) in [
        ("run/moat", 0o750, gid),
        ("var/lib/moat", 0o711, 0),
        ("var/cache/moat", 0o700, 0),
    ] {
        let m = std::fs::metadata(r.join(dir)).unwrap();
        assert_eq!(
            (m.mode() & 0o7777, m.uid(), m.gid()),
            (mode, 0, group),
            "{dir}"
        );
    }
}

#[test]
fn config_check_names_the_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let gateway = dir.path().join("gateway.toml");
    std::fs::write(&gateway, "[limits]\nmax_batch = 10\nmax_bach = 2\n").unwrap();
    let broker = moat_e2e::build_dir().join("broker.toml");
    let run = |gateway: &Path| {
        Command::new(bin_dir().join("moat"))
            .args(["config", "check", "--broker-config"])
            .arg(&broker)
            .arg("--gateway-config")
            .arg(gateway)
            .output()
            .unwrap()
    };
    let out = run(&gateway);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&gateway.display().to_string())
            && stderr.contains("line 3")
            && stderr.contains("unknown field `max_bach`"),
        "{stderr}"
    );
    // A value the gateway refuses names its key.
    std::fs::write(&gateway, "[limits]\nmax_batch = 0\n").unwrap();
    let out = run(&gateway);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("max_batch"),
        "{stderr}"
    );
    std::fs::write(&gateway, "[limits]\nmax_batch = 10\n").unwrap();
    let out = run(&gateway);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.matches(": ok").count(), 2, "{stdout}");
}

#[test]
fn make_install_places_everything_and_keeps_edited_configs() {
    let dest = tempfile::tempdir().unwrap();
    let repo = packaging().join("..");
    let install = || {
        let out = Command::new("make")
            .arg("-C")
            .arg(&repo)
            .args(["-s", "install", "PREFIX=/usr/local"])
            .arg(format!("DESTDIR={}", dest.path().display()))
            .output()
            .expect("make");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    install();
    let d = dest.path();
    for f in [
        "usr/local/bin/moat",
        "usr/local/bin/moat-broker",
        "usr/local/bin/moat-gateway",
        "usr/local/bin/moat-jailer",
        "usr/local/lib/moat/vmlinux",
        "usr/local/lib/moat/moat-agent",
        "usr/local/lib/moat/images/base.erofs",
        "usr/local/lib/sysusers.d/moat.conf",
        "usr/local/lib/tmpfiles.d/moat.conf",
        "usr/local/share/doc/moat/reliability.md",
    ] {
        assert!(d.join(f).is_file(), "{f} not installed");
    }
    let unit = std::fs::read_to_string(d.join("usr/local/lib/systemd/system/moat-broker.service"))
        .unwrap();
    assert!(unit.contains("ExecStart=/usr/local/bin/moat-broker --config /etc/moat/broker.toml"));
    let broker_toml = d.join("etc/moat/broker.toml");
    let config = std::fs::read_to_string(&broker_toml).unwrap();
    assert!(
        config.contains("kernel = \"/usr/local/lib/moat/vmlinux\""),
        "{config}"
    );
    // The installed configs pass the check the daemons run.
    let out = Command::new(bin_dir().join("moat"))
        .args(["config", "check", "--broker-config"])
        .arg(&broker_toml)
        .arg("--gateway-config")
        .arg(d.join("etc/moat/gateway.toml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // An upgrade keeps the operator's edits.
    std::fs::write(&broker_toml, format!("{config}\n# edited\n")).unwrap();
    let said = install();
    assert!(said.contains("keeping"), "{said}");
    assert!(std::fs::read_to_string(&broker_toml)
        .unwrap()
        .ends_with("# edited\n"));
}

/// Runs a command in `root` (chroot); panics with its output on failure.
fn in_root(root: &Path, args: &[&str]) -> String {
    let out = Command::new("chroot")
        .arg(root)
        .args(args)
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .output()
        .expect("chroot");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{args:?}: {text}");
    text
}

#[test]
fn the_package_installs_upgrades_and_removes_in_a_fresh_debian_root() {
    // The package, built from this workspace.
    let out = Command::new(packaging().join("deb/build.sh"))
        .output()
        .expect("build the package");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deb = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    // A fresh Debian 12 root: the cached bookworm rootfs set-up built for
    // the default Python image (no systemd in it, so the maintainer scripts
    // take their fallbacks and start nothing).
    let rootfs = std::fs::read_dir("/var/cache/moat/images")
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("python-"))
                && p.extension().is_some_and(|e| e == "tar")
        })
        .max_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .expect("a cached Debian rootfs (make setup)");
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let st = Command::new("tar")
        .arg("-xf")
        .arg(&rootfs)
        .arg("-C")
        .arg(r)
        .status()
        .unwrap();
    assert!(st.success());
    // A root directory as on a real system; the package must not change it.
    std::fs::set_permissions(r, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    // The device nodes every real system has.
    for (node, minor) in [("null", "3"), ("urandom", "9")] {
        let _ = std::fs::remove_file(r.join("dev").join(node));
        let st = Command::new("mknod")
            .arg(r.join("dev").join(node))
            .args(["c", "1", minor])
            .status()
            .unwrap();
        assert!(st.success());
    }
    std::fs::copy(&deb, r.join("tmp/moat.deb")).unwrap();
    let install = || in_root(r, &["dpkg", "--force-depends", "-i", "/tmp/moat.deb"]);
    install();

    use std::os::unix::fs::MetadataExt;
    for f in [
        "usr/bin/moat-broker",
        "usr/lib/moat/vmlinux",
        "etc/moat/broker.toml",
    ] {
        assert!(r.join(f).is_file(), "{f}");
    }
    let passwd = std::fs::read_to_string(r.join("etc/passwd")).unwrap();
    let moat_uid: u32 = passwd
        .lines()
        .find(|l| l.starts_with("moat:"))
        .and_then(|l| l.split(':').nth(2))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no moat user: {passwd}"));
    let secret = std::fs::metadata(r.join("etc/moat/gateway.secret")).unwrap();
    assert_eq!(
        (secret.mode() & 0o777, secret.uid(), secret.len()),
        (0o600, moat_uid, 65)
    );
    // The format the gateway reads: 32 bytes as 64 hex digits and a newline.
    let text = std::fs::read_to_string(r.join("etc/moat/gateway.secret")).unwrap();
    assert!(
        text.ends_with('\n') && text.trim_end().chars().all(|c| c.is_ascii_hexdigit()),
        "{text:?}"
    );
    let run_moat = std::fs::metadata(r.join("run/moat")).unwrap();
    assert_eq!(run_moat.mode() & 0o777, 0o750);
    assert_eq!(
        std::fs::metadata(r).unwrap().mode() & 0o777,
        0o755,
        "/ untouched"
    );

    // An upgrade (the same package again) keeps an edited config and the
    // secret.
    let broker_toml = r.join("etc/moat/broker.toml");
    let edited = format!(
        "{}\n# operator's edit\n",
        std::fs::read_to_string(&broker_toml).unwrap()
    );
    std::fs::write(&broker_toml, &edited).unwrap();
    let secret_bytes = std::fs::read(r.join("etc/moat/gateway.secret")).unwrap();
    install();
    assert_eq!(std::fs::read_to_string(&broker_toml).unwrap(), edited);
    assert_eq!(
        std::fs::read(r.join("etc/moat/gateway.secret")).unwrap(),
        secret_bytes
    );

    // State the broker wrote survives removal and purge.
    std::fs::create_dir_all(r.join("var/lib/moat/sandboxes/default")).unwrap();
    std::fs::write(r.join("var/lib/moat/sandboxes/default/kept.record"), b"x").unwrap();
    in_root(r, &["dpkg", "-r", "moat"]);
    assert!(!r.join("usr/bin/moat-broker").exists());
    assert_eq!(
        std::fs::read_to_string(&broker_toml).unwrap(),
        edited,
        "remove keeps configs"
    );
    in_root(r, &["dpkg", "-P", "moat"]);
    assert!(!broker_toml.exists(), "purge drops the configs");
    assert!(r
        .join("var/lib/moat/sandboxes/default/kept.record")
        .exists());
    assert!(
        r.join("etc/moat/gateway.secret").exists(),
        "the secret is kept"
    );
}
