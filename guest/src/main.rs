//! `moat-agent`: the `/init` of every moat sandbox VM (static binary in the
//! initramfs). As PID 1 it builds the sandbox's root filesystem, then serves
//! the broker's requests over the `moat.agent` virtio-serial port.
//!
//! Modules: [`pid1`] boot sequence and reaper; [`rootfs`] mounts and root
//! switch; [`initramfs`] freeing it; [`discover`] sysfs device lookup;
//! [`host`] hostname and loopback; [`identity`] a sandbox's hostname,
//! machine id and entropy; [`channel`] the framed request server;
//! [`exec`] running commands; [`repl`] REPL sessions; [`setup`] the setup
//! request (volumes, NIC, scripts, the background process); [`mounts`] 9p
//! volumes; [`netconf`] the sandbox NIC, resolv.conf and hosts; [`testhook`]
//! gated protocol misbehaviour for tests; [`output`] output lines and caps;
//! [`fd`] descriptor helpers; [`power`] power-off; [`log`] console lines;
//! [`error`] the error type.

mod channel;
mod discover;
mod error;
mod exec;
mod fd;
mod host;
mod identity;
mod initramfs;
mod log;
mod mounts;
mod netconf;
mod output;
mod pid1;
mod power;
mod repl;
mod rootfs;
mod setup;
mod testhook;
mod user;
mod workload;

use crate::log::log;

fn main() {
    std::panic::set_hook(Box::new(|info| {
        log!("panic: {info}");
        if std::process::id() == 1 {
            power::power_off("the agent panicked");
        }
    }));
    if std::process::id() != 1 {
        log!("must run as PID 1 (the VM's /init); refusing to run on a host");
        std::process::exit(2);
    }
    pid1::run()
}
