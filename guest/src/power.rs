//! Powering the VM off: `sync()` then `reboot(RB_AUTOBOOT)`. The broker runs
//! QEMU with `-no-reboot` and the guest with `reboot=t`, so a reboot makes the
//! VMM exit at once (microvm without ACPI has no power-off).
//!
//! Rebooting is only ever done once [`arm`] was called, which PID 1 does at
//! start: a stray call in a test or a host-side run just exits the process.

use std::sync::atomic::{AtomicBool, Ordering};

use nix::sys::reboot::{reboot, RebootMode};

use crate::log::log;

static ARMED: AtomicBool = AtomicBool::new(false);

/// Allows [`power_off`] to really reboot. Called by PID 1 before it forks, so
/// the server process inherits it.
pub fn arm() {
    ARMED.store(true, Ordering::SeqCst);
}

/// Syncs the disks and reboots the VM (which makes the VMM exit).
/// Never returns. If the reboot is refused, the process exits instead (as PID
/// 1 this panics the kernel, which `panic=-1` turns into a reboot).
pub fn power_off(reason: &str) -> ! {
    log!("powering off: {reason}");
    nix::unistd::sync();
    if ARMED.load(Ordering::SeqCst) {
        // `reboot` only returns on failure.
        let Err(e) = reboot(RebootMode::RB_AUTOBOOT);
        log!("reboot failed: {e}");
    } else {
        log!("not running as the VM's init; exiting instead of rebooting");
    }
    std::process::exit(1)
}
