//! Finding the VM's devices through sysfs: the two virtio-blk disks by their
//! `serial` and the agent's virtio-serial port by its `name`. Every function
//! takes the sysfs and /dev roots as parameters so tests can use a fake tree.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use crate::error::{AgentError, Context, Result};

/// Serial of the read-only erofs image disk (the sandbox's root filesystem).
pub const IMAGE_SERIAL: &str = "moat-image";
/// Serial of the per-sandbox writable ext4 disk.
pub const RW_SERIAL: &str = "moat-rw";

/// How long to wait for the disks (virtio-mmio block devices are probed
/// before init runs, so this is only slack).
pub const DISK_WAIT: Duration = Duration::from_secs(5);
/// How long to wait for the agent port (virtio-serial ports are announced by
/// the host after the driver is up, asynchronously).
pub const PORT_WAIT: Duration = Duration::from_secs(10);
const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Device nodes of the two disks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disks {
    /// The read-only image (erofs).
    pub image: PathBuf,
    /// The writable disk (ext4).
    pub rw: PathBuf,
}

/// Reads a sysfs attribute, without the trailing newline / NUL padding.
/// `Ok(None)` when the attribute does not exist.
fn read_attr(path: &Path) -> Result<Option<String>> {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let trimmed = text.trim_end_matches(|c: char| c == '\0' || c.is_whitespace());
            Ok(Some(trimmed.to_owned()))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).ctx(|| format!("read {}", path.display())),
    }
}

/// Entries of `dir` (sorted by name); a missing directory is empty.
pub(crate) fn entries(dir: &Path) -> Result<Vec<String>> {
    let iter = match fs::read_dir(dir) {
        Ok(iter) => iter,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).ctx(|| format!("list {}", dir.display())),
    };
    let mut names = Vec::new();
    for entry in iter {
        let entry = entry.ctx(|| format!("list {}", dir.display()))?;
        if let Some(name) = entry.file_name().to_str() {
            names.push(name.to_owned());
        }
    }
    names.sort();
    Ok(names)
}

/// The `/dev` node of the virtio disk (`vd*`) whose serial is `serial`, once
/// both its sysfs entry and its device node exist. Two disks with the same
/// serial are a configuration error.
pub fn find_disk(sys: &Path, dev: &Path, serial: &str) -> Result<Option<PathBuf>> {
    let block = sys.join("block");
    let mut found: Option<String> = None;
    for name in entries(&block)? {
        if !name.starts_with("vd") {
            continue;
        }
        if read_attr(&block.join(&name).join("serial"))?.as_deref() == Some(serial) {
            if let Some(first) = &found {
                return Err(AgentError::Config(format!(
                    "disks {first} and {name} both have serial {serial:?}"
                )));
            }
            found = Some(name);
        }
    }
    Ok(found
        .map(|name| dev.join(name))
        .filter(|node| node.exists()))
}

/// Both disks, or `None` while either is still missing.
pub fn find_disks(sys: &Path, dev: &Path) -> Result<Option<Disks>> {
    let Some(image) = find_disk(sys, dev, IMAGE_SERIAL)? else {
        return Ok(None);
    };
    let Some(rw) = find_disk(sys, dev, RW_SERIAL)? else {
        return Ok(None);
    };
    if image == rw {
        return Err(AgentError::Config(format!(
            "image and writable disk are the same device {}",
            image.display()
        )));
    }
    Ok(Some(Disks { image, rw }))
}

/// The `/dev` node of the virtio-serial port called `name` (matched against
/// `<sys>/class/virtio-ports/*/name`), once the node exists.
pub fn find_port(sys: &Path, dev: &Path, name: &str) -> Result<Option<PathBuf>> {
    let ports = sys.join("class").join("virtio-ports");
    for port in entries(&ports)? {
        if read_attr(&ports.join(&port).join("name"))?.as_deref() == Some(name) {
            let node = dev.join(&port);
            return Ok(node.exists().then_some(node));
        }
    }
    Ok(None)
}

/// One-line summary of `names` with an attribute each, for error messages.
fn describe(dir: &Path, attr: &str, keep: impl Fn(&str) -> bool) -> String {
    let names = match entries(dir) {
        Ok(names) => names,
        Err(e) => return e.to_string(),
    };
    let found: Vec<String> = names
        .into_iter()
        .filter(|n| keep(n))
        .map(|n| match read_attr(&dir.join(&n).join(attr)) {
            Ok(Some(value)) => format!("{n} ({attr} {value:?})"),
            _ => format!("{n} (no {attr})"),
        })
        .collect();
    if found.is_empty() {
        "nothing".to_owned()
    } else {
        found.join(", ")
    }
}

/// What virtio disks exist, with their serials (for "disk missing" errors).
pub fn describe_disks(sys: &Path) -> String {
    describe(&sys.join("block"), "serial", |n| n.starts_with("vd"))
}

/// What virtio-serial ports exist, with their names.
pub fn describe_ports(sys: &Path) -> String {
    describe(&sys.join("class").join("virtio-ports"), "name", |_| true)
}

/// Calls `probe` until it yields a value, an error, or `limit` passes.
/// `what` names the awaited thing in the timeout error.
pub fn wait_for<T>(
    what: &str,
    limit: Duration,
    mut probe: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let start = Instant::now();
    loop {
        if let Some(found) = probe()? {
            return Ok(found);
        }
        if start.elapsed() >= limit {
            return Err(AgentError::Missing(format!(
                "{what} did not appear within {} s",
                limit.as_secs_f32()
            )));
        }
        thread::sleep(POLL_INTERVAL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake `/sys` + `/dev` pair in a temp dir.
    struct Tree {
        dir: tempfile::TempDir,
    }

    impl Tree {
        fn new() -> Self {
            let dir = tempfile::tempdir().expect("tempdir");
            fs::create_dir_all(dir.path().join("sys/block")).expect("mkdir");
            fs::create_dir_all(dir.path().join("dev")).expect("mkdir");
            Tree { dir }
        }
        fn sys(&self) -> PathBuf {
            self.dir.path().join("sys")
        }
        fn dev(&self) -> PathBuf {
            self.dir.path().join("dev")
        }
        fn disk(&self, name: &str, serial: Option<&[u8]>, node: bool) {
            let d = self.sys().join("block").join(name);
            fs::create_dir_all(&d).expect("mkdir");
            if let Some(serial) = serial {
                fs::write(d.join("serial"), serial).expect("write serial");
            }
            if node {
                fs::write(self.dev().join(name), b"").expect("node");
            }
        }
        fn port(&self, dir: &str, name: &str, node: bool) {
            let d = self.sys().join("class/virtio-ports").join(dir);
            fs::create_dir_all(&d).expect("mkdir");
            fs::write(d.join("name"), format!("{name}\n")).expect("write name");
            if node {
                fs::write(self.dev().join(dir), b"").expect("node");
            }
        }
    }

    #[test]
    fn disks_are_found_by_serial_not_order() {
        let t = Tree::new();
        t.disk("vda", Some(b"moat-rw\n"), true);
        t.disk("vdb", Some(b"something-else\n"), true);
        // virtio-blk pads serials with NULs up to 20 bytes.
        t.disk("vdc", Some(b"moat-image\0\0\0\0\0\0\0\0\0\0\n"), true);
        t.disk("sda", Some(b"moat-image\n"), true); // not a virtio disk
        let disks = find_disks(&t.sys(), &t.dev()).expect("ok").expect("found");
        assert_eq!(disks.image, t.dev().join("vdc"));
        assert_eq!(disks.rw, t.dev().join("vda"));
    }

    #[test]
    fn disk_is_missing_until_serial_and_node_exist() {
        let t = Tree::new();
        t.disk("vda", Some(b"moat-image\n"), true);
        assert_eq!(find_disks(&t.sys(), &t.dev()).expect("ok"), None);
        t.disk("vdb", None, false); // no serial attribute yet
        assert_eq!(find_disk(&t.sys(), &t.dev(), RW_SERIAL).expect("ok"), None);
        t.disk("vdb", Some(b"moat-rw\n"), false); // sysfs entry but no node
        assert_eq!(find_disk(&t.sys(), &t.dev(), RW_SERIAL).expect("ok"), None);
        fs::write(t.dev().join("vdb"), b"").expect("node");
        assert_eq!(
            find_disk(&t.sys(), &t.dev(), RW_SERIAL).expect("ok"),
            Some(t.dev().join("vdb"))
        );
    }

    #[test]
    fn duplicate_serial_is_a_config_error() {
        let t = Tree::new();
        t.disk("vda", Some(b"moat-rw\n"), true);
        t.disk("vdb", Some(b"moat-rw\n"), true);
        let err = find_disk(&t.sys(), &t.dev(), RW_SERIAL).expect_err("duplicate");
        assert!(matches!(err, AgentError::Config(_)), "{err}");
        assert!(err.to_string().contains("vda and vdb"), "{err}");
    }

    #[test]
    fn missing_sys_block_means_not_yet() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(
            find_disks(&dir.path().join("sys"), &dir.path().join("dev")).expect("ok"),
            None
        );
    }

    #[test]
    fn port_is_found_by_name_not_number() {
        let t = Tree::new();
        t.port("vport1p0", "org.qemu.guest_agent.0", true);
        t.port("vport2p1", "moat.agent", true);
        t.port("vport2p2", "moat.agent.other", true);
        assert_eq!(
            find_port(&t.sys(), &t.dev(), "moat.agent").expect("ok"),
            Some(t.dev().join("vport2p1"))
        );
        assert_eq!(find_port(&t.sys(), &t.dev(), "nope").expect("ok"), None);
    }

    #[test]
    fn port_without_node_is_not_ready() {
        let t = Tree::new();
        t.port("vport1p1", "moat.agent", false);
        assert_eq!(
            find_port(&t.sys(), &t.dev(), "moat.agent").expect("ok"),
            None
        );
    }

    #[test]
    fn inventory_names_what_was_found() {
        let t = Tree::new();
        assert_eq!(describe_disks(&t.sys()), "nothing");
        t.disk("vda", Some(b"moat-rw\n"), true);
        t.disk("vdb", None, true);
        t.port("vport1p1", "other", true);
        assert_eq!(
            describe_disks(&t.sys()),
            r#"vda (serial "moat-rw"), vdb (no serial)"#
        );
        assert_eq!(describe_ports(&t.sys()), r#"vport1p1 (name "other")"#);
    }

    #[test]
    fn wait_for_polls_until_found_and_times_out() {
        let mut calls = 0;
        let got = wait_for("thing", Duration::from_secs(5), || {
            calls += 1;
            Ok((calls == 3).then_some(calls))
        })
        .expect("found");
        assert_eq!(got, 3);

        let start = Instant::now();
        let err = wait_for::<()>("the moat.agent port", Duration::from_millis(50), || {
            Ok(None)
        })
        .expect_err("times out");
        assert!(start.elapsed() >= Duration::from_millis(50));
        assert!(
            err.to_string()
                .contains("the moat.agent port did not appear"),
            "{err}"
        );
    }
}
