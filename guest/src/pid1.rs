//! PID 1: runs the boot sequence (mounts, root switch, hostname, loopback,
//! workload cgroups, the agent channel: a virtio-serial port, or vsock when
//! the kernel command line says `MOAT_AGENT_VSOCK`), forks the channel server, then reaps
//! every process until the server exits, and powers the VM off. Any failure powers off too, after
//! a `FATAL:` line on the console explaining why.

use std::env;
use std::path::{Path, PathBuf};
use std::time::Instant;

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};

use moat_proto::agent::{PORT_NAME, VSOCK_VAR};

use crate::channel;
use crate::discover::{self, DISK_WAIT, IMAGE_SERIAL, PORT_WAIT, RW_SERIAL};
use crate::error::{AgentError, Result};
use crate::host;
use crate::log::log;
use crate::power::{self, power_off};
use crate::rootfs;
use crate::workload;

/// Environment variable (from the kernel command line) naming the VM.
pub const HOSTNAME_VAR: &str = "MOAT_HOSTNAME";

/// The whole life of PID 1. Never returns.
pub fn run() -> ! {
    power::arm();
    let start = Instant::now();
    log!("starting, version {}", env!("CARGO_PKG_VERSION"));
    let channel = match boot() {
        Ok(channel) => channel,
        Err(e) => fatal(&e),
    };
    let on = match &channel {
        Channel::Port(port) => port.display().to_string(),
        Channel::Vsock(port) => format!("vsock port {port}"),
    };
    log!(
        "boot done in {} ms; serving on {on}",
        start.elapsed().as_millis()
    );
    // SAFETY: PID 1 has not started any thread (nothing in `boot` does), so
    // the child may run arbitrary code, including spawning threads.
    match unsafe { fork() } {
        Ok(ForkResult::Child) => serve(&channel),
        Ok(ForkResult::Parent { child }) => reap(child),
        Err(e) => fatal(&AgentError::Sys {
            what: "fork the agent server".to_owned(),
            source: e,
        }),
    }
}

fn fatal(e: &AgentError) -> ! {
    log!("FATAL: {e}");
    power_off("boot failed")
}

/// Where the agent channel is.
enum Channel {
    /// A virtio-serial port's device node (QEMU).
    Port(PathBuf),
    /// A vsock port to listen on (libkrun).
    Vsock(u32),
}

/// The vsock port from `MOAT_AGENT_VSOCK`, when the VMM asked for vsock.
fn vsock_port() -> Result<Option<u32>> {
    match env::var(VSOCK_VAR) {
        Err(_) => Ok(None),
        Ok(v) => match v.parse::<u32>() {
            Ok(port) if port > 0 => Ok(Some(port)),
            _ => Err(AgentError::Config(format!(
                "{VSOCK_VAR}={v:?} is not a vsock port number"
            ))),
        },
    }
}

/// Boot steps up to the agent channel.
fn boot() -> Result<Channel> {
    rootfs::mount_early()?;
    log!("mounted /proc, /sys, /dev");

    let (sys, dev) = (Path::new("/sys"), Path::new("/dev"));
    let disks = discover::wait_for(
        &format!("virtio disks with serials {IMAGE_SERIAL:?} and {RW_SERIAL:?}"),
        DISK_WAIT,
        || discover::find_disks(sys, dev),
    )
    .map_err(|e| with_inventory(e, &discover::describe_disks(sys)))?;
    log!(
        "image disk {}, writable disk {}",
        disks.image.display(),
        disks.rw.display()
    );
    rootfs::mount_root(&disks)?;
    log!("overlay root assembled at {}", rootfs::NEW_ROOT);
    rootfs::switch_root()?;
    log!("switched root");

    match env::var(HOSTNAME_VAR) {
        Ok(name) => match host::set_hostname(&name) {
            Ok(()) => log!("hostname {name}"),
            Err(e) => log!("hostname not set: {e}"),
        },
        Err(_) => log!("no {HOSTNAME_VAR}; hostname left as is"),
    }
    match host::loopback_up() {
        Ok(()) => log!("loopback up"),
        Err(e) => log!("loopback not up: {e}"),
    }
    workload::set_up();

    if let Some(port) = vsock_port()? {
        return Ok(Channel::Vsock(port));
    }
    discover::wait_for(
        &format!("virtio-serial port {PORT_NAME:?}"),
        PORT_WAIT,
        || discover::find_port(sys, dev, PORT_NAME),
    )
    .map(Channel::Port)
    .map_err(|e| with_inventory(e, &discover::describe_ports(sys)))
}

/// Adds what was found to a "device missing" error, for the console.
fn with_inventory(e: AgentError, inventory: &str) -> AgentError {
    match e {
        AgentError::Missing(msg) => AgentError::Missing(format!("{msg}; found: {inventory}")),
        other => other,
    }
}

/// The server process: serves the channel until it fails.
fn serve(channel: &Channel) -> ! {
    if let Some(layout) = workload::active() {
        if let Err(e) = layout.join_agent() {
            log!("the agent server stays outside its cgroup: {e}");
        }
    }
    let shutdown = Box::new(|| power_off("shutdown requested by the host"));
    let served = match channel {
        Channel::Port(port) => channel::serve_port(port, shutdown),
        Channel::Vsock(port) => channel::serve_vsock(*port, shutdown),
    };
    match served {
        Ok(()) => log!("agent server stopped"),
        Err(e) => log!("FATAL: agent server: {e}"),
    }
    std::process::exit(1)
}

/// Reaps every child (orphans are re-parented to PID 1) until the server
/// exits, then powers off.
fn reap(server: Pid) -> ! {
    loop {
        match waitpid(None::<Pid>, None) {
            Ok(WaitStatus::Exited(pid, code)) if pid == server => {
                power_off(&format!("agent server exited with status {code}"))
            }
            Ok(WaitStatus::Signaled(pid, signal, _)) if pid == server => {
                power_off(&format!("agent server killed by {signal}"))
            }
            Ok(_) | Err(Errno::EINTR) => {}
            Err(Errno::ECHILD) => power_off("no processes left"),
            Err(e) => {
                log!("waitpid: {e}");
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
    }
}
