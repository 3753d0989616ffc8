//! libkrun backend: each VM is one `moat-vmm` runner process (crate
//! `broker/runner/`) that links libkrun and enters the VM itself. Same
//! kernel, initramfs, disks, console socket and jail as QEMU; the
//! differences, each forced by libkrun:
//!
//! - the agent channel is vsock port [`VSOCK_PORT`], which libkrun serves
//!   as the Unix socket `agent.sock` (the guest is told by
//!   `MOAT_AGENT_VSOCK`); the broker connects to it exactly as to QEMU's;
//! - no volumes: libkrun's virtio-fs on Linux keeps guest owners only with
//!   CAP_SETUID (which a jailed runner never has) and would store guest
//!   modes, setuid bits included, on host files; so a libkrun broker runs
//!   sandboxes with volumes on QEMU with KVM (9p, mapped-xattr; see
//!   [`super::Backends`]);
//! - the NIC's tap reaches libkrun through the runner's frame relay;
//! - libkrun has no per-disk throttling: the cgroup's I/O limits on the
//!   host devices are the only disk caps;
//! - a kernel panic must not read as a clean exit (libkrun exits 0 when the
//!   guest reboots): `panic=5` keeps a panicking guest alive for five
//!   seconds, and the runner, which watches the console, exits with 70.

use std::ffi::OsString;
use std::path::PathBuf;

use moat_proto::agent::{VSOCK_PORT, VSOCK_VAR};

use super::{kernel_cmdline, LaunchPlan, VmSpec, Vmm};

/// The libkrun backend.
#[derive(Debug, Clone)]
pub struct Libkrun {
    /// The `moat-vmm` runner (host path; the jailer execs it through an fd).
    pub runner: PathBuf,
    pub reason: String,
    /// Group owning /dev/kvm.
    pub kvm_gid: Option<u32>,
}

impl Vmm for Libkrun {
    fn describe(&self) -> String {
        format!("libkrun ({})", self.reason)
    }

    fn extra_groups(&self) -> Vec<u32> {
        self.kvm_gid.into_iter().collect()
    }

    fn devices(&self) -> Vec<&'static str> {
        vec!["null", "zero", "random", "urandom", "kvm"]
    }

    fn launch_plan(&self, spec: &VmSpec) -> LaunchPlan {
        // Backends::for_sandbox never gives this backend a share.
        debug_assert!(spec.shares.is_empty(), "libkrun has no volume shares");
        let vsock = format!("{VSOCK_VAR}={VSOCK_PORT}");
        let cmdline = kernel_cmdline(spec, &["panic=5", &vsock]);
        let mut args: Vec<OsString> = Vec::new();
        let mut push = |flag: &str, value: OsString| {
            args.push(flag.into());
            args.push(value);
        };
        let with_prefix = |prefix: &str, p: &PathBuf, suffix: &str| {
            let mut v = OsString::from(prefix);
            v.push(p);
            v.push(suffix);
            v
        };
        push("--cpus", spec.cpus.to_string().into());
        push("--memory-mib", spec.memory_mib.to_string().into());
        push("--kernel", spec.kernel.clone().into());
        push("--initramfs", spec.initramfs.clone().into());
        push("--cmdline", cmdline.into());
        push("--console-socket", spec.console_socket.clone().into());
        push(
            "--agent-vsock",
            with_prefix(&format!("{VSOCK_PORT}:"), &spec.agent_socket, ""),
        );
        push(
            "--disk",
            with_prefix("moat-image:", &spec.image_disk, ":ro"),
        );
        push(
            "--disk",
            with_prefix("moat-rw:", &spec.writable_disk, ":rw"),
        );
        if let Some(nic) = &spec.nic {
            push("--net-fd", nic.tap_fd.to_string().into());
            push("--mac", nic.mac.clone().into());
        }
        LaunchPlan {
            program: self.runner.clone(),
            args,
            seccomp: "libkrun",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> VmSpec {
        VmSpec {
            test_hooks: true,
            nic: Some(crate::vmm::VmNic {
                tap_fd: 3,
                mac: "52:54:00:6d:00:01".into(),
            }),
            ..crate::vmm::sample_spec()
        }
    }

    fn backend() -> Libkrun {
        Libkrun {
            runner: "/usr/lib/moat/moat-vmm".into(),
            reason: "hardware KVM".into(),
            kvm_gid: Some(108),
        }
    }

    #[test]
    fn the_runner_gets_every_device_of_the_spec() {
        let plan = backend().launch_plan(&spec());
        assert_eq!(plan.program, PathBuf::from("/usr/lib/moat/moat-vmm"));
        let args: Vec<String> = plan
            .args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let joined = args.join(" ");
        for want in [
            "--cpus 2 --memory-mib 512",
            "--kernel /boot/vmlinux --initramfs /boot/initramfs.cpio",
            "--console-socket /vm/console.sock",
            "--agent-vsock 1024:/vm/agent.sock",
            "--disk moat-image:/disk/image:ro --disk moat-rw:/vm/rw.ext4:rw",
            "--net-fd 3 --mac 52:54:00:6d:00:01",
        ] {
            assert!(joined.contains(want), "{want}: {joined}");
        }
        let cmdline = &args[args.iter().position(|a| a == "--cmdline").unwrap() + 1];
        for word in [
            "MOAT_HOSTNAME=sb1",
            "MOAT_PIDS_MAX=4096",
            "MOAT_TEST_HOOKS=1",
            "MOAT_AGENT_VSOCK=1024",
            "panic=5",
        ] {
            assert!(cmdline.split(' ').any(|w| w == word), "{word}: {cmdline}");
        }
        assert!(!cmdline.contains("panic=-1") && !cmdline.contains("--"));
    }

    #[test]
    fn the_runner_needs_kvm_and_its_own_filter() {
        let b = backend();
        assert!(b.devices().contains(&"kvm"));
        assert_eq!(b.extra_groups(), vec![108]);
        assert_eq!(b.launch_plan(&spec()).seccomp, "libkrun");
        let mut s = spec();
        s.nic = None;
        let joined = b
            .launch_plan(&s)
            .args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ");
        assert!(!joined.contains("--net-fd"));
    }
}
