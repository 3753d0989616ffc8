//! QEMU `microvm` backend: no PCI, no ACPI, virtio-mmio devices only; the
//! serial console and the agent channel (a virtio-serial port) each on a Unix
//! socket QEMU serves, so the VM does not depend on the broker that started
//! it staying alive; QEMU's own seccomp sandbox on.

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
        // Paths go into QEMU's comma-separated option syntax: a ',' in a path
        // would be read as an option separator, so it is doubled.
        let path = |p: &PathBuf| p.to_string_lossy().replace(',', ",,");
        // wait=on: QEMU accepts the broker's connection before the guest
        // runs; while no broker is connected the console output is dropped.
        push(&[
            "-chardev",
            &format!(
                "socket,id=console,path={},server=on,wait=on",
                path(&spec.console_socket)
            ),
            "-serial",
            "chardev:console",
        ]);
        // panic=-1: a kernel panic reboots at once, and QEMU reports a
        // reboot (-no-reboot) the way the broker reads any unasked exit.
        push(&["-append", &kernel_cmdline(spec, &["panic=-1"])]);
        push(&[
            "-kernel",
            &path(&spec.kernel),
            "-initrd",
            &path(&spec.initramfs),
        ]);
        // microvm has 8 virtio-mmio transports on IRQs 5-12; IRQ 8 is the
        // RTC's and cannot be shared, so transport 3 stays empty and each
        // device names its transport.
        let mut transports = TRANSPORTS.iter();
        let mut bus = || {
            transports
                .next()
                .map(|t| format!(",bus=virtio-mmio-bus.{t}"))
                .unwrap_or_default()
        };
        // Disk errors (a full host filesystem) go to the guest as I/O
        // errors (werror/rerror=report) instead of pausing the whole VM,
        // which would leave its agent silent.
        let throttle = throttling(&spec.disk_io);
        push(&[
            "-drive",
            &format!(
                "id=image,file={},format=raw,if=none,readonly=on{throttle}",
                path(&spec.image_disk)
            ),
            "-device",
            &format!("virtio-blk-device,drive=image,serial=moat-image{}", bus()),
            "-drive",
            &format!(
                "id=rw,file={},format=raw,if=none,discard=unmap,werror=report,rerror=report{throttle}",
                path(&spec.writable_disk)
            ),
            "-device",
            &format!("virtio-blk-device,drive=rw,serial=moat-rw{}", bus()),
        ]);
        push(&[
            "-device",
            &format!("virtio-serial-device,max_ports=2{}", bus()),
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
        if let Some(nic) = &spec.nic {
            push(&[
                "-netdev",
                &format!("tap,id=net0,fd={}", nic.tap_fd),
                "-device",
                &format!("virtio-net-device,netdev=net0,mac={}{}", nic.mac, bus()),
            ]);
        }
        // mapped-xattr: the guest's owners and modes live in xattrs; host
        // files keep QEMU's uid and modes 0600/0700 (never setuid), and guest
        // symlinks are plain files on the host. multidevs=remap: a share may
        // span several host filesystems (one bind per volume).
        for (i, share) in spec.shares.iter().enumerate() {
            push(&[
                "-fsdev",
                &format!(
                    "local,id=fs{i},path={},security_model=mapped-xattr,multidevs=remap{}",
                    path(&share.path),
                    if share.read_only { ",readonly=on" } else { "" }
                ),
                "-device",
                &format!(
                    "virtio-9p-device,fsdev=fs{i},mount_tag={}{}",
                    share.tag,
                    bus()
                ),
            ]);
        }
        push(&[
            "-sandbox",
            "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        ]);
        LaunchPlan {
            program: self.binary.clone(),
            args,
            seccomp: "qemu",
        }
    }
}

/// The virtio-mmio transports devices go on, in order (3 = IRQ 8, the RTC's,
/// is skipped): at most seven devices.
const TRANSPORTS: [u8; 7] = [7, 6, 5, 4, 2, 1, 0];

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
            // A ',' in a path must be doubled in QEMU's option syntax.
            image_disk: "/img/a,b.erofs".into(),
            console_socket: "/vm/0/console.sock".into(),
            disk_io: crate::disk::DiskIo {
                read_bps: 1000,
                write_bps: 0,
                read_iops: 0,
                write_iops: 7,
            },
            ..crate::vmm::sample_spec()
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
        assert!(
            joined.contains("serial=moat-image,bus=virtio-mmio-bus.7")
                && joined.contains("serial=moat-rw,bus=virtio-mmio-bus.6"),
            "{joined}"
        );
        assert_eq!(
            joined
                .matches(",throttling.bps-read=1000,throttling.iops-write=7 ")
                .count(),
            2,
            "both disks throttled, uncapped directions left out: {joined}"
        );
        assert!(joined.contains("name=moat.agent"));
        assert!(
            joined.contains(
                "-chardev socket,id=console,path=/vm/0/console.sock,server=on,wait=on -serial chardev:console"
            ),
            "{joined}"
        );
        assert!(joined.contains("-m 512M") && joined.contains("-smp 2"));
        let append = &args[args.iter().position(|a| a == "-append").unwrap() + 1];
        assert!(
            append.contains("MOAT_HOSTNAME=sb1 MOAT_PIDS_MAX=4096") && !append.contains("--"),
            "{append}"
        );
        assert!(q.extra_groups().is_empty());
    }

    #[test]
    fn nic_and_shares_become_devices() {
        let q = Qemu {
            binary: "/q".into(),
            accel: Accel::Tcg,
            reason: "t".into(),
            kvm_gid: None,
        };
        let mut s = spec();
        s.nic = Some(crate::vmm::VmNic {
            tap_fd: 3,
            mac: "52:54:00:6d:00:01".into(),
        });
        s.shares = vec![
            crate::vmm::VmShare {
                path: "/vol/0".into(),
                tag: "moat0".into(),
                read_only: true,
            },
            crate::vmm::VmShare {
                path: "/vol/1".into(),
                tag: "moat1".into(),
                read_only: false,
            },
        ];
        let joined = q
            .launch_plan(&s)
            .args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ");
        assert!(joined.contains("-netdev tap,id=net0,fd=3 -device virtio-net-device,netdev=net0,mac=52:54:00:6d:00:01"), "{joined}");
        assert!(joined.contains("-fsdev local,id=fs0,path=/vol/0,security_model=mapped-xattr,multidevs=remap,readonly=on -device virtio-9p-device,fsdev=fs0,mount_tag=moat0"), "{joined}");
        assert!(
            joined.contains("path=/vol/1,security_model=mapped-xattr,multidevs=remap -device"),
            "{joined}"
        );
        assert!(
            !joined.contains("virtio-mmio-bus.3"),
            "IRQ 8 is the RTC's: {joined}"
        );
        assert!(
            joined.contains("mac=52:54:00:6d:00:01,bus=virtio-mmio-bus.4"),
            "{joined}"
        );
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
