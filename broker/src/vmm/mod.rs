//! VM backends. A backend turns a [`VmSpec`] (kernel, initramfs, disks, agent
//! socket, size) into a [`LaunchPlan`]: the program and arguments of the one
//! process that runs this VM. The jail then spawns that process; backends
//! never spawn anything themselves. Two backends: QEMU `microvm`
//! (`qemu.rs`) and the libkrun runner `moat-vmm` (`libkrun.rs`, the runner
//! itself is the crate in `broker/runner/`); `select.rs` picks one.

pub mod accel;
mod libkrun;
mod qemu;
pub mod select;

use std::ffi::OsString;
use std::path::PathBuf;

pub use accel::{detect_accel, Accel};
pub use libkrun::Libkrun;
pub use qemu::Qemu;
pub use select::{choose_backend, Backend};

/// Everything one VM needs, as paths inside the VM's view of the host.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    /// Read-only root image (erofs/ext4), guest serial `moat-image`.
    pub image_disk: PathBuf,
    /// Per-sandbox writable disk (ext4), guest serial `moat-rw`.
    pub writable_disk: PathBuf,
    /// Unix socket the VMM listens on for the agent channel.
    pub agent_socket: PathBuf,
    /// Unix socket the VMM serves the serial console on. The VMM waits for
    /// the broker to connect before the guest runs (no output is lost), and
    /// drops output while no broker is connected (a broker restart never
    /// blocks or kills the VM).
    pub console_socket: PathBuf,
    pub memory_mib: u32,
    pub cpus: u32,
    /// Guest hostname (a validated sandbox name).
    pub hostname: String,
    /// `pids.max` of the guest's workload cgroup (`limits.guest_pids_max`).
    pub guest_pids_max: u32,
    /// Let the agent honour `moat-test-hook` commands (test suites only).
    pub test_hooks: bool,
    /// Throttling the VMM applies to each guest disk.
    pub disk_io: crate::disk::DiskIo,
    /// The NIC, backed by a tap the VM process holds as an fd.
    pub nic: Option<VmNic>,
    /// Host directories shared with the guest (9p on QEMU).
    pub shares: Vec<VmShare>,
}

/// The VMMs a broker runs sandboxes on: its chosen backend, and the one
/// for sandboxes with volumes (QEMU in both cases when QEMU was chosen;
/// QEMU with KVM next to libkrun, whose Linux virtio-fs cannot keep guest
/// owners without CAP_SETUID).
#[derive(Debug, Clone)]
pub struct Backends {
    pub primary: std::sync::Arc<dyn Vmm>,
    pub with_volumes: std::sync::Arc<dyn Vmm>,
}

impl Backends {
    /// One backend for every sandbox.
    pub fn single(vmm: std::sync::Arc<dyn Vmm>) -> Self {
        Self {
            primary: vmm.clone(),
            with_volumes: vmm,
        }
    }

    /// The backend a sandbox runs on.
    pub fn for_sandbox(&self, has_volumes: bool) -> &dyn Vmm {
        if has_volumes {
            self.with_volumes.as_ref()
        } else {
            self.primary.as_ref()
        }
    }

    /// For logs and health: the primary, and the volumes' one if different.
    pub fn describe(&self) -> String {
        let primary = self.primary.describe();
        let volumes = self.with_volumes.describe();
        if primary == volumes {
            primary
        } else {
            format!("{primary}; sandboxes with volumes: {volumes}")
        }
    }
}

/// A virtio-net device on a tap fd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmNic {
    /// The tap's fd number in the VM process.
    pub tap_fd: usize,
    pub mac: String,
}

/// A directory shared into the guest under `tag`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmShare {
    /// The directory as the VM process sees it.
    pub path: PathBuf,
    /// The guest's mount tag (`moat0`, ...).
    pub tag: String,
    pub read_only: bool,
}

/// The VM process to spawn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchPlan {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    /// The jailer's seccomp allow-list for this VMM (`--seccomp`).
    pub seccomp: &'static str,
}

/// A VM backend: one process per VM.
pub trait Vmm: Send + Sync + std::fmt::Debug {
    /// Short description for logs and health ("qemu-microvm (tcg: ...)").
    fn describe(&self) -> String;
    /// Supplementary groups the VM process needs (e.g. the owner of /dev/kvm).
    fn extra_groups(&self) -> Vec<u32>;
    /// Device nodes the VM process needs inside its jail.
    fn devices(&self) -> Vec<&'static str>;
    /// The command line that runs `spec`.
    fn launch_plan(&self, spec: &VmSpec) -> LaunchPlan;
}

/// Guest kernel command line shared by all backends, then the backend's
/// own words (how a panic ends, which channel and share filesystem).
pub fn kernel_cmdline(spec: &VmSpec, backend_words: &[&str]) -> String {
    // reboot=t: a guest reboot exits the VMM at once. No "--": both VMMs
    // append virtio_mmio device words after ours.
    let mut line = format!(
        "console=ttyS0 reboot=t quiet loglevel=4 MOAT_HOSTNAME={} MOAT_PIDS_MAX={}",
        spec.hostname, spec.guest_pids_max
    );
    if spec.test_hooks {
        line.push_str(" MOAT_TEST_HOOKS=1");
    }
    for w in backend_words {
        line.push(' ');
        line.push_str(w);
    }
    line
}

/// A spec as the broker makes one for a jailed VM, for backends' tests.
#[cfg(test)]
pub(crate) fn sample_spec() -> VmSpec {
    VmSpec {
        kernel: "/boot/vmlinux".into(),
        initramfs: "/boot/initramfs.cpio".into(),
        image_disk: "/disk/image".into(),
        writable_disk: "/vm/rw.ext4".into(),
        agent_socket: "/vm/agent.sock".into(),
        console_socket: "/vm/console.sock".into(),
        memory_mib: 512,
        cpus: 2,
        hostname: "sb1".into(),
        guest_pids_max: 4096,
        test_hooks: false,
        disk_io: crate::disk::DiskIo::default(),
        nic: None,
        shares: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn sandboxes_with_volumes_go_to_the_volumes_backend() {
        let libkrun: Arc<dyn Vmm> = Arc::new(Libkrun {
            runner: "/usr/bin/moat-vmm".into(),
            reason: "hardware KVM".into(),
            kvm_gid: None,
        });
        let qemu: Arc<dyn Vmm> = Arc::new(Qemu {
            binary: "/usr/bin/qemu-system-x86_64".into(),
            accel: Accel::Kvm,
            reason: "hardware KVM".into(),
            kvm_gid: None,
        });
        let b = Backends {
            primary: libkrun,
            with_volumes: qemu.clone(),
        };
        assert!(b.for_sandbox(false).describe().starts_with("libkrun"));
        assert!(b.for_sandbox(true).describe().starts_with("qemu-microvm"));
        assert!(
            b.describe()
                .contains("; sandboxes with volumes: qemu-microvm"),
            "{}",
            b.describe()
        );
        let single = Backends::single(qemu);
        assert!(single.for_sandbox(true).describe().starts_with("qemu"));
        assert!(!single.describe().contains("volumes"));
    }
}
