//! The benchmark's baseline: a VM booted the way moat boots one, without
//! moat. QEMU runs the broker's own launch plan (same kernel, initramfs,
//! image, devices and command line) unjailed, without a cgroup, a gateway
//! or a broker, and the agent protocol is spoken directly on the raw
//! channel socket. What moat adds on top of this is what the benchmark
//! measures.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use moat_broker::jail::{AGENT_SOCKET, CONSOLE_SOCKET, WRITABLE_DISK};
use moat_broker::vmm::accel::HostFacts;
use moat_broker::vmm::{detect_accel, Qemu, VmSpec, Vmm};
use moat_proto::agent::{
    guest_message, host_message, Exec, GuestMessage, Hello, HostMessage, PROTOCOL_VERSION,
};
use moat_proto::frame;

const MAX_FRAME: usize = 16 << 20;

/// Files a bare VM boots from, made once and reused by every boot.
pub struct BareImage {
    dir: tempfile::TempDir,
    kernel: PathBuf,
    image: PathBuf,
}

impl BareImage {
    /// The initramfs for `build/moat-agent` and a formatted writable disk
    /// template of `disk_mib`.
    pub fn prepare(build: &Path, image: &Path, disk_mib: u32) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("moat-bare.")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let agent = std::fs::read(build.join("moat-agent")).expect("build/moat-agent");
        let mut cpio = std::fs::File::create(dir.path().join("initramfs.cpio")).expect("cpio");
        moat_broker::initramfs::write_initramfs(&mut cpio, &agent).expect("initramfs");
        let template = dir.path().join("rw.template");
        std::fs::File::create(&template)
            .and_then(|f| f.set_len(u64::from(disk_mib) << 20))
            .expect("disk file");
        let ok = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-m", "0"])
            .arg(&template)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "mkfs.ext4 failed");
        Self {
            dir,
            kernel: build.join("vmlinux"),
            image: image.to_path_buf(),
        }
    }
}

/// One bare VM, killed on drop.
pub struct BareVm {
    child: Child,
    agent: UnixStream,
    _console: UnixStream,
    next_id: u64,
    /// QEMU spawned → first byte of the agent's first reply.
    pub boot: Duration,
    _dir: tempfile::TempDir,
}

fn connect(path: &Path, deadline: Instant) -> UnixStream {
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return s,
            Err(e) if Instant::now() > deadline => panic!("{}: {e}", path.display()),
            Err(_) => std::thread::sleep(Duration::from_millis(2)),
        }
    }
}

impl BareVm {
    /// Boots one VM of `memory_mib` from `files` and waits for its agent.
    pub fn boot(files: &BareImage, memory_mib: u32) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("moat-bare-vm.")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let rw = dir.path().join(WRITABLE_DISK);
        // A sparse copy, as the broker makes a sparse disk per sandbox.
        let ok = Command::new("cp")
            .arg("--sparse=always")
            .arg(files.dir.path().join("rw.template"))
            .arg(&rw)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "copy the writable disk");
        let spec = VmSpec {
            kernel: files.kernel.clone(),
            initramfs: files.dir.path().join("initramfs.cpio"),
            image_disk: files.image.clone(),
            writable_disk: rw,
            agent_socket: dir.path().join(AGENT_SOCKET),
            console_socket: dir.path().join(CONSOLE_SOCKET),
            memory_mib,
            cpus: 1,
            hostname: "bare".into(),
            guest_pids_max: 4096,
            test_hooks: false,
            disk_io: Default::default(),
            nic: None,
            shares: Vec::new(),
        };
        let (accel, reason) =
            detect_accel("auto", &HostFacts::read(Path::new("/"))).expect("accelerator");
        let qemu = Qemu {
            binary: "/usr/bin/qemu-system-x86_64".into(),
            accel,
            reason,
            kvm_gid: None,
        };
        let plan = qemu.launch_plan(&spec);
        let started = Instant::now();
        let child = Command::new(&plan.program)
            .args(&plan.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn qemu");
        let deadline = started + Duration::from_secs(60);
        // QEMU waits for the console's reader before the guest runs.
        let console = connect(&spec.console_socket, deadline);
        let agent = connect(&spec.agent_socket, deadline);
        let mut vm = Self {
            child,
            agent,
            _console: console,
            next_id: 1,
            boot: Duration::ZERO,
            _dir: dir,
        };
        vm.send(host_message::Body::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
        }));
        let mut first = [0u8; 1];
        vm.agent
            .set_read_timeout(Some(Duration::from_secs(60)))
            .expect("timeout");
        vm.agent
            .read_exact(&mut first)
            .expect("the agent's first byte");
        vm.boot = started.elapsed();
        // The rest of that reply.
        let mut rest = [0u8; 3];
        vm.agent.read_exact(&mut rest).expect("frame header");
        let len = frame::body_len([first[0], rest[0], rest[1], rest[2]], MAX_FRAME)
            .expect("frame length");
        let mut body = vec![0u8; len];
        vm.agent.read_exact(&mut body).expect("frame body");
        vm
    }

    fn send(&mut self, body: host_message::Body) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let msg = HostMessage {
            id,
            body: Some(body),
        };
        let bytes = frame::encode(&msg, MAX_FRAME).expect("encode");
        self.agent.write_all(&bytes).expect("write to the agent");
        id
    }

    fn reply(&mut self, id: u64) -> GuestMessage {
        let msg: GuestMessage = frame::read(&mut self.agent, MAX_FRAME)
            .expect("read a frame")
            .expect("the agent closed the channel");
        assert_eq!(msg.id, id, "one request at a time");
        msg
    }

    /// One `Hello` round trip: the raw channel plus the agent's dispatch.
    pub fn hello(&mut self) -> Duration {
        let t = Instant::now();
        let id = self.send(host_message::Body::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
        }));
        let r = self.reply(id);
        assert!(matches!(r.body, Some(guest_message::Body::Hello(_))));
        t.elapsed()
    }

    /// Runs `program` in the guest as the broker would; returns the round
    /// trip (channel, fork/exec, wait, reply).
    pub fn exec(&mut self, program: &str, args: &[&str]) -> Duration {
        let t = Instant::now();
        let id = self.send(host_message::Body::Exec(Exec {
            program: program.into(),
            args: args.iter().map(|a| a.to_string()).collect(),
            env: vec!["PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin".into()],
            workdir: String::new(),
            timeout_ms: 30_000,
            max_output_bytes: 1 << 20,
            user: String::new(),
        }));
        let r = self.reply(id);
        match r.body {
            Some(guest_message::Body::Exec(e)) => assert_eq!(e.exit_code, 0, "{e:?}"),
            other => panic!("exec {program}: {other:?}"),
        }
        t.elapsed()
    }
}

impl Drop for BareVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
