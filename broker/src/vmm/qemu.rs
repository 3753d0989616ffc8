//! QEMU `microvm` backend: no PCI, no ACPI, virtio-mmio devices only; the
//! serial console on stdout; the agent channel on a virtio-serial port bridged
//! to a Unix socket; QEMU's own seccomp sandbox on.

use std::ffi::OsString;
use std::path::PathBuf;

use super::{kernel_cmdline, Accel, LaunchPlan, VmSpec, Vmm};

/// QEMU `microvm` backend.
#[derive(Debug, Clone)]
pub struct Qemu {
    pub binary: PathBuf,
    pub accel: Accel,
    pub reason: String,
    /// Group owning /dev/kvm (KVM only).
    pub kvm_gid: Option<u32>,
}

impl Vmm for Qemu {
    fn describe(&self) -> String {
        match self.accel {
            Accel::Kvm => format!("qemu-microvm (kvm: {})", self.reason),
            Accel::Tcg => format!("qemu-microvm ({})", self.reason),
        }
    }

    fn extra_groups(&self) -> Vec<u32> {
        match self.accel {
            Accel::Kvm => self.kvm_gid.into_iter().collect(),
            Accel::Tcg => Vec::new(),
        }
    }

    fn devices(&self) -> Vec<&'static str> {
        let mut d = vec!["null", "zero", "random", "urandom"];
        if self.accel == Accel::Kvm {
            d.push("kvm");
        }
        d
    }

    fn launch_plan(&self, spec: &VmSpec) -> LaunchPlan {
        let (accel, cpu) = match self.accel {
            Accel::Kvm => ("kvm", "host"),
            Accel::Tcg => ("tcg", "max"),
        };
        let mut args: Vec<OsString> = Vec::new();
        let mut push = |parts: &[&str]| args.extend(parts.iter().map(OsString::from));
        push(&["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"]);
        push(&[
            "-M",
            &format!("microvm,accel={accel},acpi=off,auto-kernel-cmdline=on,isa-serial=on,rtc=on"),
            "-cpu",
            cpu,
            "-m",
            &format!("{}M", spec.memory_mib),
            "-smp",
            &spec.cpus.to_string(),
        ]);
        push(&[
            "-chardev",
            "stdio,id=console,signal=off",
            "-serial",
            "chardev:console",
        ]);
        push(&["-append", &kernel_cmdline(spec)]);
        // Paths go into QEMU's comma-separated option syntax: a ',' in a path
        // would be read as an option separator, so it is doubled.
        let path = |p: &PathBuf| p.to_string_lossy().replace(',', ",,");
        push(&[
            "-kernel",
            &path(&spec.kernel),
            "-initrd",
            &path(&spec.initramfs),
        ]);
        let throttle = throttling(&spec.disk_io);
        push(&[
            "-drive",
            &format!(
                "id=image,file={},format=raw,if=none,readonly=on{throttle}",
                path(&spec.image_disk)
            ),
            "-device",
            "virtio-blk-device,drive=image,serial=moat-image",
            "-drive",
            &format!(
                "id=rw,file={},format=raw,if=none,discard=unmap{throttle}",
                path(&spec.writable_disk)
            ),
            "-device",
            "virtio-blk-device,drive=rw,serial=moat-rw",
        ]);
        push(&[
            "-device",
            "virtio-serial-device,max_ports=2",
            "-chardev",
            &format!(
                "socket,id=agent,path={},server=on,wait=off",
                path(&spec.agent_socket)
            ),
            "-device",
            &format!(
                "virtserialport,chardev=agent,name={}",
                moat_proto::agent::PORT_NAME
            ),
        ]);
        push(&[
            "-sandbox",
            "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        ]);
        LaunchPlan {
            program: self.binary.clone(),
            args,
        }
    }
}

/// `-drive` options capping a disk's throughput and operation rate.
fn throttling(io: &crate::disk::DiskIo) -> String {
    [
        ("bps-read", io.read_bps),
        ("bps-write", io.write_bps),
        ("iops-read", io.read_iops),
        ("iops-write", io.write_iops),
    ]
    .iter()
    .filter(|(_, v)| *v > 0)
    .map(|(k, v)| format!(",throttling.{k}={v}"))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> VmSpec {
        VmSpec {
            kernel: "/k/vmlinux".into(),
            initramfs: "/k/initramfs".into(),
            image_disk: "/img/a,b.erofs".into(),
            writable_disk: "/vm/0/rw.ext4".into(),
            agent_socket: "/vm/0/agent.sock".into(),
            memory_mib: 512,
            cpus: 2,
            hostname: "sb1".into(),
            test_hooks: false,
            disk_io: crate::disk::DiskIo {
                read_bps: 1000,
                write_bps: 0,
                read_iops: 0,
                write_iops: 7,
            },
        }
    }

    #[test]
    fn plan_has_devices_and_escapes_commas() {
        let q = Qemu {
            binary: "/usr/bin/qemu-system-x86_64".into(),
            accel: Accel::Tcg,
            reason: "test".into(),
            kvm_gid: None,
        };
        let plan = q.launch_plan(&spec());
        let args: Vec<String> = plan
            .args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let joined = args.join(" ");
        assert!(joined.contains("microvm,accel=tcg"), "{joined}");
        assert!(
            joined.contains("file=/img/a,,b.erofs,format=raw,if=none,readonly=on"),
            "{joined}"
        );
        assert!(joined.contains("serial=moat-image") && joined.contains("serial=moat-rw"));
        assert_eq!(
            joined
                .matches(",throttling.bps-read=1000,throttling.iops-write=7 ")
                .count(),
            2,
            "both disks throttled, uncapped directions left out: {joined}"
        );
        assert!(joined.contains("name=moat.agent"));
        assert!(joined.contains("-m 512M") && joined.contains("-smp 2"));
        let append = &args[args.iter().position(|a| a == "-append").unwrap() + 1];
        assert!(
            append.contains("MOAT_HOSTNAME=sb1") && !append.contains("--"),
            "{append}"
        );
        assert!(q.extra_groups().is_empty());
    }

    #[test]
    fn kvm_plan_uses_host_cpu_and_kvm_group() {
        let q = Qemu {
            binary: "/q".into(),
            accel: Accel::Kvm,
            reason: "hw".into(),
            kvm_gid: Some(108),
        };
        let joined: Vec<String> = q
            .launch_plan(&spec())
            .args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert!(joined.iter().any(|a| a.contains("accel=kvm")));
        assert!(joined.iter().any(|a| a == "host"));
        assert_eq!(q.extra_groups(), vec![108]);
    }
}
