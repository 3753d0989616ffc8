//! The libkrun backend, on any host: the broker picks its backend from the
//! host's facts and says why; an explicit `backend = "libkrun"` that cannot
//! work stops the broker at start with the reason; and the jailed
//! `moat-vmm` runner, launched exactly as the broker launches it, boots our
//! kernel far enough to print its banner. On this project's machines
//! `/dev/kvm` is kvm-pvm, where a stock kernel runs only under instruction
//! emulation: the banner takes about a second, user space is never reached.
//! On a hardware-KVM host the whole e2e suite runs on libkrun with
//! `MOAT_VMM=libkrun make test`.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use moat_broker::cgroups::{CgroupLimits, CgroupManager};
use moat_broker::console::ConsoleLog;
use moat_broker::jail::{
    self, JailLayout, JailMode, JailSpec, AGENT_SOCKET, CONSOLE_SOCKET, WRITABLE_DISK,
};
use moat_broker::vmm::accel::HostFacts;
use moat_broker::vmm::select::kvm_unusable;
use moat_broker::vmm::{Libkrun, VmSpec, Vmm};
use moat_e2e::{bin_dir, build_dir, Server};

/// Why libkrun cannot run here, or `None` on a hardware-KVM host.
fn libkrun_unusable() -> Option<&'static str> {
    kvm_unusable(&HostFacts::read(Path::new("/")))
}

#[test]
fn the_broker_says_which_backend_it_chose_and_why() {
    if moat_e2e::vmm_backend() != "auto" {
        eprintln!("skipped: MOAT_VMM pins the backend");
        return;
    }
    let s = Server::start();
    let log = s.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("VM backend chosen"))
        .unwrap_or_else(|| panic!("no backend line:\n{log}"));
    match libkrun_unusable() {
        Some(why) => {
            assert!(line.contains("qemu-microvm"), "{line}");
            assert!(line.contains(&format!("libkrun not used: {why}")), "{line}");
        }
        None => assert!(line.contains("libkrun (hardware KVM)"), "{line}"),
    }
    // Whatever was chosen runs sandboxes.
    s.start_sandbox("chosen", serde_json::json!({}));
    assert_eq!(s.first_line("chosen", "echo", &["ok"]), "ok");
    s.stop_sandbox("chosen");
}

#[test]
fn an_explicit_libkrun_that_cannot_work_stops_the_broker_with_the_reason() {
    let Some(why) = libkrun_unusable() else {
        eprintln!("skipped: this host has hardware KVM, where libkrun works");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let build = build_dir();
    let state = dir.path().join("state");
    let config = dir.path().join("broker.toml");
    fs::write(
        &config,
        format!(
            "socket = \"{}\"\ngateway_uid = 65534\ngateway_gid = 65534\nstate_dir = \"{}\"\n\
             [boot]\nkernel = \"{}\"\nagent = \"{}\"\n[images]\ndefault = \"base\"\n\
             [images.local]\nbase = \"{}\"\n[vmm]\nbackend = \"libkrun\"\n",
            dir.path().join("run/broker.sock").display(),
            state.display(),
            build.join("vmlinux").display(),
            build.join("moat-agent").display(),
            build.join("base.erofs").display(),
        ),
    )
    .unwrap();
    let started = Instant::now();
    let out = Command::new(bin_dir().join("moat-broker"))
        .arg("--config")
        .arg(&config)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert!(
        stderr.contains("vmm.backend = \"libkrun\" cannot work here")
            && stderr.contains(why)
            && stderr.contains("backend = \"qemu\""),
        "{stderr}"
    );
    assert!(!state.exists(), "nothing was touched before the refusal");
}

/// Removes the test's cgroup (and its parent) however the test ends.
struct CgroupGuard {
    cgroup: moat_broker::cgroups::Cgroup,
}

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        self.cgroup.kill_all();
        let _ = self.cgroup.remove();
        for d in self.cgroup.dirs() {
            if let Some(parent) = d.parent() {
                let _ = fs::remove_dir(parent);
            }
        }
    }
}

/// A line of `/proc/<pid>/status`, without its label.
fn status_field(pid: i32, field: &str) -> String {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(|v| v.trim().to_string())
        .unwrap_or_default()
}

#[test]
fn the_jailed_runner_boots_our_kernel_to_its_banner() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let build = build_dir();
        let bins = bin_dir();
        let dir = tempfile::Builder::new()
            .prefix("moat-krun.")
            .tempdir_in("/tmp")
            .unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let uid = 1_899_990_000 + std::process::id() % 5000;
        let vm_dir = dir.path().join("vm");
        let root = dir.path().join("root");
        fs::create_dir(&vm_dir).unwrap();
        fs::create_dir(&root).unwrap();
        fs::set_permissions(&root, fs::Permissions::from_mode(0o700)).unwrap();
        let initramfs = dir.path().join("initramfs.cpio");
        let agent = fs::read(build.join("moat-agent")).unwrap();
        moat_broker::initramfs::write_initramfs(&mut fs::File::create(&initramfs).unwrap(), &agent)
            .unwrap();
        let rw = vm_dir.join(WRITABLE_DISK);
        fs::File::create(&rw).unwrap().set_len(64 << 20).unwrap();
        for p in [&vm_dir, &rw] {
            std::os::unix::fs::chown(p, Some(uid), Some(uid)).unwrap();
        }

        let layout = JailLayout::jailed(
            build.join("vmlinux"),
            initramfs,
            build.join("base.erofs"),
            vm_dir.clone(),
        );
        let spec = VmSpec {
            kernel: layout.kernel.inside.clone(),
            initramfs: layout.initramfs.inside.clone(),
            image_disk: layout.image.inside.clone(),
            writable_disk: layout.in_vm_dir(WRITABLE_DISK),
            agent_socket: layout.in_vm_dir(AGENT_SOCKET),
            console_socket: layout.in_vm_dir(CONSOLE_SOCKET),
            memory_mib: 256,
            cpus: 1,
            hostname: "smoke".into(),
            guest_pids_max: 4096,
            test_hooks: false,
            disk_io: Default::default(),
            nic: None,
            shares: Vec::new(),
        };
        let kvm_gid = fs::metadata("/dev/kvm")
            .map(|m| std::os::unix::fs::MetadataExt::gid(&m))
            .ok()
            .filter(|gid| *gid != 0);
        let backend = Libkrun {
            runner: bins.join("moat-vmm"),
            reason: "smoke test".into(),
            kvm_gid,
        };
        let mut plan = backend.launch_plan(&spec);
        // The broker's command line is quiet; let the banner through.
        let at = plan.args.iter().position(|a| a == "--cmdline").unwrap() + 1;
        // ignore_loglevel first: earlycon replays the log buffer as it starts.
        plan.args[at].push(" ignore_loglevel earlycon=uart8250,io,0x3f8");

        let cgroups = CgroupManager::detect(
            Path::new("/sys/fs/cgroup"),
            &format!("moat-e2e-krun-{}", std::process::id()),
        )
        .unwrap();
        let cgroup = CgroupGuard {
            cgroup: cgroups
                .create(
                    "vm-0",
                    &CgroupLimits {
                        memory_bytes: 512 << 20,
                        cpus: 1,
                        pids_max: 256,
                        io: Default::default(),
                    },
                )
                .unwrap(),
        };
        let jail_spec = JailSpec {
            uid,
            gid: uid,
            extra_groups: backend.extra_groups(),
            cgroup_procs: cgroup.cgroup.procs_files(),
            dir: vm_dir.clone(),
            root,
            layout,
            devices: backend.devices(),
            hostname: "moat-vm-smoke".into(),
            rlimit_nofile: 1024,
            rlimit_fsize: 64 << 20,
            rlimit_nproc: 256,
            keeps_tap: false,
            volume_binds: Vec::new(),
        };
        let started = Instant::now();
        let mut child = jail::spawn(
            &plan,
            &jail_spec,
            &JailMode::Jailer(bins.join("moat-jailer")),
            Vec::new(),
        )
        .unwrap();
        let console = ConsoleLog::new(1 << 20);
        if let Some(err) = child.stderr.take() {
            tokio::spawn(console.clone().follow(err));
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        console
            .attach(&vm_dir.join(CONSOLE_SOCKET), uid, deadline)
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", console.tail(40)));
        let attached = started.elapsed();
        let mut banner = None;
        while started.elapsed() < Duration::from_secs(90) {
            let text = console.tail(400);
            if banner.is_none() && text.contains("Linux version") {
                banner = Some(started.elapsed());
            }
            // The command line follows the banner, libkrun's device words
            // after ours.
            if text.contains("Command line:") && text.contains("virtio_mmio.device=") {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("the runner ended with {status}:\n{}", console.tail(40));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let banner = banner.unwrap_or_else(|| panic!("no banner:\n{}", console.tail(40)));
        let text = console.tail(400);
        assert!(
            text.contains("MOAT_AGENT_VSOCK=1024") && text.contains("MOAT_HOSTNAME=smoke"),
            "our command line reached the kernel:\n{text}"
        );

        // The runner is confined as the broker's VMs are: the sandbox uid,
        // no capabilities, no_new_privs, the libkrun seccomp filter.
        let pids = cgroup.cgroup.pids();
        let runner = pids
            .iter()
            .copied()
            .find(|p| {
                fs::read_to_string(format!("/proc/{p}/comm"))
                    .is_ok_and(|c| c.trim_end() != "moat-jailer")
            })
            .unwrap_or_else(|| panic!("no runner among {pids:?}"));
        let uids = status_field(runner, "Uid");
        assert!(
            uids.split_whitespace().all(|u| u == uid.to_string()),
            "{uids}"
        );
        assert_eq!(status_field(runner, "CapEff"), "0000000000000000");
        assert_eq!(status_field(runner, "CapBnd"), "0000000000000000");
        assert_eq!(status_field(runner, "NoNewPrivs"), "1");
        assert_eq!(status_field(runner, "Seccomp"), "2");
        let rss = status_field(runner, "VmRSS");
        println!(
            "runner: console attached {attached:?} after spawn, banner at {banner:?}, RSS {rss}"
        );
        drop(cgroup);
        let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .expect("the runner ends when its cgroup is killed")
            .unwrap();
        assert!(!status.success(), "{status}");
    });
}
