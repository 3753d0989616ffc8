//! The runner's command line, parsed into a typed [`VmConfig`] and checked
//! before libkrun is touched. The broker's libkrun backend
//! (`broker/src/vmm/libkrun.rs`) writes it; every path is as the runner sees
//! it inside the jail.
//!
//! ```text
//! moat-vmm --cpus N --memory-mib N --kernel PATH --initramfs PATH
//!   --cmdline TEXT --console-socket PATH --agent-vsock PORT:PATH
//!   [--disk ID:PATH:ro|rw]... [--net-fd N --mac MAC]
//! ```
//!
//! No host directory sharing: libkrun's virtio-fs on Linux needs
//! CAP_SETUID to keep guest owners, which a jailed runner never has, so
//! the broker runs sandboxes with volumes on QEMU (9p, mapped-xattr).

use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};

use crate::error::RunnerError;

/// What `moat-vmm --help` prints.
pub const USAGE: &str = "\
moat-vmm: runs one sandbox's microVM on libkrun (hardware KVM only).
moat-broker starts it through moat-jailer; it is not meant to be run by hand.

usage: moat-vmm --cpus N --memory-mib N --kernel PATH --initramfs PATH
         --cmdline TEXT --console-socket PATH --agent-vsock PORT:PATH
         [--disk ID:PATH:ro|rw]... [--net-fd N --mac MAC]

  --console-socket  served for the broker; the guest starts once it connects
  --agent-vsock     libkrun serves vsock PORT as the Unix socket PATH
  --disk            a virtio-blk disk whose serial is ID
  --net-fd, --mac   a tap passed as fd N; frames are relayed to libkrun

exit status: the guest's own (0 after a power-off), 70 when the guest
kernel panicked, 2 for a bad command line, 3 when set-up failed.
";

/// Longest kernel command line libkrun's x86 boot protocol takes, with room
/// for the words libkrun appends (one `virtio_mmio.device=` per device).
pub const MAX_CMDLINE: usize = 1536;
/// libkrun takes the vCPU count as a u8.
pub const MAX_CPUS: u32 = 64;
pub const MIN_MEMORY_MIB: u32 = 64;
/// A virtio-blk serial (`GET_ID`) holds 20 bytes.
pub const MAX_DISK_ID: usize = 20;
pub const MAX_DISKS: usize = 4;

/// One virtio-blk disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// The guest sees it as the disk's serial (`/sys/block/vdX/serial`).
    pub id: String,
    pub path: PathBuf,
    pub read_only: bool,
}

/// A virtio-net device on a tap the runner was handed as an fd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nic {
    pub tap_fd: i32,
    pub mac: [u8; 6],
}

/// Everything one VM is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    pub cpus: u32,
    pub memory_mib: u32,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub cmdline: String,
    pub console_socket: PathBuf,
    pub agent_port: u32,
    pub agent_socket: PathBuf,
    pub disks: Vec<Disk>,
    pub nic: Option<Nic>,
}

fn invalid(msg: impl Into<String>) -> RunnerError {
    RunnerError::Usage(msg.into())
}

fn text(flag: &str, v: Option<OsString>) -> Result<String, RunnerError> {
    v.and_then(|v| v.into_string().ok())
        .ok_or_else(|| invalid(format!("{flag} needs a UTF-8 value")))
}

fn number(flag: &str, v: Option<OsString>) -> Result<u32, RunnerError> {
    text(flag, v)?
        .parse()
        .map_err(|_| invalid(format!("{flag} needs a number")))
}

fn path(flag: &str, p: &str) -> Result<PathBuf, RunnerError> {
    let p = PathBuf::from(p);
    if !p.is_absolute() || p.components().any(|c| c == Component::ParentDir) {
        return Err(invalid(format!(
            "{flag} {} must be absolute without '..'",
            p.display()
        )));
    }
    Ok(p)
}

/// `NAME:PATH:ro|rw`.
fn named_path(flag: &str, v: Option<OsString>) -> Result<(String, PathBuf, bool), RunnerError> {
    let v = text(flag, v)?;
    let usage = || invalid(format!("{flag} needs NAME:PATH:ro|rw, got {v:?}"));
    let (name, rest) = v.split_once(':').ok_or_else(usage)?;
    let (p, mode) = rest.rsplit_once(':').ok_or_else(usage)?;
    let read_only = match mode {
        "ro" => true,
        "rw" => false,
        _ => return Err(usage()),
    };
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(invalid(format!(
            "{flag}: name {name:?} must be letters, digits, '-' or '_'"
        )));
    }
    Ok((name.to_owned(), path(flag, p)?, read_only))
}

fn mac(v: &str) -> Result<[u8; 6], RunnerError> {
    let bad = || invalid(format!("--mac {v:?}: use six hex bytes, 52:54:00:12:34:56"));
    let mut out = [0u8; 6];
    let mut parts = v.split(':');
    for byte in &mut out {
        let p = parts.next().ok_or_else(bad)?;
        if p.len() != 2 {
            return Err(bad());
        }
        *byte = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() || out[0] & 1 == 1 {
        return Err(bad());
    }
    Ok(out)
}

impl VmConfig {
    /// Parses the arguments after the program name, then [`Self::validate`]s.
    pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Self, RunnerError> {
        let mut it = args.into_iter();
        let mut c = VmConfig {
            cpus: 0,
            memory_mib: 0,
            kernel: PathBuf::new(),
            initramfs: PathBuf::new(),
            cmdline: String::new(),
            console_socket: PathBuf::new(),
            agent_port: 0,
            agent_socket: PathBuf::new(),
            disks: Vec::new(),
            nic: None,
        };
        let mut net_fd = None;
        let mut nic_mac = None;
        while let Some(flag) = it.next() {
            let flag = flag.to_string_lossy().into_owned();
            match flag.as_str() {
                "--cpus" => c.cpus = number(&flag, it.next())?,
                "--memory-mib" => c.memory_mib = number(&flag, it.next())?,
                "--kernel" => c.kernel = path(&flag, &text(&flag, it.next())?)?,
                "--initramfs" => c.initramfs = path(&flag, &text(&flag, it.next())?)?,
                "--cmdline" => c.cmdline = text(&flag, it.next())?,
                "--console-socket" => c.console_socket = path(&flag, &text(&flag, it.next())?)?,
                "--agent-vsock" => {
                    let v = text(&flag, it.next())?;
                    let (port, p) = v
                        .split_once(':')
                        .ok_or_else(|| invalid("--agent-vsock needs PORT:PATH"))?;
                    c.agent_port = port
                        .parse()
                        .map_err(|_| invalid("--agent-vsock: the port is not a number"))?;
                    c.agent_socket = path(&flag, p)?;
                }
                "--disk" => {
                    let (id, path, read_only) = named_path(&flag, it.next())?;
                    c.disks.push(Disk {
                        id,
                        path,
                        read_only,
                    });
                }
                "--net-fd" => {
                    let fd = number(&flag, it.next())?;
                    net_fd = Some(
                        i32::try_from(fd)
                            .ok()
                            .filter(|fd| *fd >= 3)
                            .ok_or_else(|| invalid("--net-fd: fd numbers start at 3"))?,
                    );
                }
                "--mac" => nic_mac = Some(mac(&text(&flag, it.next())?)?),
                other => {
                    return Err(invalid(format!(
                        "unknown argument {other:?} (see the module docs of moat-vmm)"
                    )))
                }
            }
        }
        c.nic = match (net_fd, nic_mac) {
            (Some(tap_fd), Some(mac)) => Some(Nic { tap_fd, mac }),
            (None, None) => None,
            _ => return Err(invalid("--net-fd and --mac go together")),
        };
        c.validate()?;
        Ok(c)
    }

    /// Checks what parsing alone cannot.
    pub fn validate(&self) -> Result<(), RunnerError> {
        if self.cpus == 0 || self.cpus > MAX_CPUS {
            return Err(invalid(format!("--cpus must be 1-{MAX_CPUS}")));
        }
        if self.memory_mib < MIN_MEMORY_MIB {
            return Err(invalid(format!(
                "--memory-mib must be at least {MIN_MEMORY_MIB}"
            )));
        }
        for (flag, p) in [
            ("--kernel", &self.kernel),
            ("--initramfs", &self.initramfs),
            ("--console-socket", &self.console_socket),
            ("--agent-vsock", &self.agent_socket),
        ] {
            if p.as_os_str().is_empty() {
                return Err(invalid(format!("{flag} is required")));
            }
        }
        if self.agent_port == 0 {
            return Err(invalid("--agent-vsock: the port must not be 0"));
        }
        if self.cmdline.is_empty() || self.cmdline.len() > MAX_CMDLINE {
            return Err(invalid(format!(
                "--cmdline must be 1-{MAX_CMDLINE} bytes (libkrun appends its device words)"
            )));
        }
        if self.cmdline.contains('\0') || self.cmdline.split_whitespace().any(|w| w == "--") {
            return Err(invalid(
                "--cmdline holds a NUL or a \"--\" (libkrun appends words after ours)",
            ));
        }
        if self.disks.len() > MAX_DISKS {
            return Err(invalid(format!("at most {MAX_DISKS} disks")));
        }
        for d in &self.disks {
            if d.id.len() > MAX_DISK_ID {
                return Err(invalid(format!(
                    "--disk id {:?} is longer than a virtio-blk serial ({MAX_DISK_ID} bytes)",
                    d.id
                )));
            }
        }
        let mut names: Vec<&str> = self.disks.iter().map(|d| d.id.as_str()).collect();
        names.sort_unstable();
        if names.windows(2).any(|w| w[0] == w[1]) {
            return Err(invalid("two --disk with the same id"));
        }
        Ok(())
    }

    /// Paths the runner opens, for error messages.
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        [self.kernel.as_path(), self.initramfs.as_path()]
            .into_iter()
            .chain(self.disks.iter().map(|d| d.path.as_path()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &[&str]) -> Vec<OsString> {
        s.iter().map(OsString::from).collect()
    }

    fn base() -> Vec<&'static str> {
        vec![
            "--cpus",
            "2",
            "--memory-mib",
            "512",
            "--kernel",
            "/boot/vmlinux",
            "--initramfs",
            "/boot/initramfs.cpio",
            "--cmdline",
            "console=ttyS0 panic=5",
            "--console-socket",
            "/vm/console.sock",
            "--agent-vsock",
            "1024:/vm/agent.sock",
            "--disk",
            "moat-image:/disk/image:ro",
            "--disk",
            "moat-rw:/vm/rw.ext4:rw",
        ]
    }

    #[test]
    fn a_full_command_line_parses() {
        let mut a = base();
        a.extend(["--net-fd", "3", "--mac", "52:54:00:6d:00:01"]);
        let c = VmConfig::parse(args(&a)).unwrap();
        assert_eq!((c.cpus, c.memory_mib, c.agent_port), (2, 512, 1024));
        assert_eq!(c.agent_socket, PathBuf::from("/vm/agent.sock"));
        assert_eq!(
            c.disks[0],
            Disk {
                id: "moat-image".into(),
                path: "/disk/image".into(),
                read_only: true
            }
        );
        assert!(!c.disks[1].read_only);
        assert_eq!(
            c.nic,
            Some(Nic {
                tap_fd: 3,
                mac: [0x52, 0x54, 0, 0x6d, 0, 1]
            })
        );
        assert_eq!(c.files().count(), 4);
    }

    #[test]
    fn bad_input_is_refused_with_the_reason() {
        let cases: &[(&[&str], &str)] = &[
            (&["--cpus", "0"], "--cpus"),
            (&["--cpus", "65"], "--cpus"),
            (&["--memory-mib", "32"], "--memory-mib"),
            (&["--kernel", "boot/vmlinux"], "absolute"),
            (&["--kernel", "/boot/../etc/shadow"], "'..'"),
            (&["--cmdline", "a -- b"], "\"--\""),
            (&["--disk", "moat-image:/disk/image"], "NAME:PATH:ro|rw"),
            (&["--disk", "a b:/x:ro"], "letters"),
            (&["--disk", "abcdefghijklmnopqrstu:/x:ro"], "serial"),
            (&["--disk", "moat-rw:/x:ro"], "same id"),
            (&["--agent-vsock", "0:/vm/a.sock"], "port"),
            (&["--net-fd", "3"], "go together"),
            (
                &["--net-fd", "2", "--mac", "52:54:00:00:00:01"],
                "start at 3",
            ),
            (&["--net-fd", "3", "--mac", "53:54:00:00:00:01"], "--mac"),
            (&["--mac", "52:54:00:00:00"], "--mac"),
            (&["--frobnicate"], "unknown argument"),
            (&["--share", "moatvol:/vol:rw"], "unknown argument"),
        ];
        for (extra, want) in cases {
            let mut a = base();
            a.extend(extra.iter());
            let err = VmConfig::parse(args(&a)).unwrap_err().to_string();
            assert!(err.contains(want), "{extra:?}: {err}");
        }
        let err = VmConfig::parse(args(&["--cpus", "1", "--memory-mib", "128"]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("--kernel is required"), "{err}");
        let long = "x".repeat(MAX_CMDLINE + 1);
        let mut a = base();
        a.extend(["--cmdline", &long]);
        assert!(VmConfig::parse(args(&a))
            .unwrap_err()
            .to_string()
            .contains("--cmdline"));
    }
}
