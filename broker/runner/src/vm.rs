//! The libkrun calls: one context configured from a [`VmConfig`], then
//! `krun_start_enter`, which turns the calling thread into the VMM and, on
//! success, never returns (the process exits when the guest stops).
//!
//! Implicit devices are off: no implicit console (ours is a serial port on
//! a pipe, see `console.rs`), no implicit vsock and no TSI (the guest gets
//! no network but the NIC the broker gave it). The agent channel is one
//! vsock port that libkrun serves as a Unix socket in the VM directory.
//! No virtio-fs: see `args.rs`.

use std::ffi::CString;
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::args::VmConfig;
use crate::error::RunnerError;

/// libkrun's kernel format for a plain ELF `vmlinux` (our PVH-capable one).
const KERNEL_FORMAT_ELF: u32 = 1;
/// libkrun's disk format for a raw image.
const DISK_FORMAT_RAW: u32 = 0;
/// libkrun's sync modes: flushes ignored (read-only disks) or honoured.
const SYNC_NONE: u32 = 0;
const SYNC_FULL: u32 = 2;
/// Log level warnings, no colours, and RUST_LOG ignored.
const LOG_LEVEL_WARN: u32 = 2;
const LOG_STYLE_NEVER: u32 = 2;
const LOG_OPTION_NO_ENV: u32 = 1;

fn check(call: &'static str, r: i32) -> Result<(), RunnerError> {
    if r < 0 {
        Err(RunnerError::Krun { call, errno: -r })
    } else {
        Ok(())
    }
}

fn c_text(s: &str) -> Result<CString, RunnerError> {
    CString::new(s).map_err(|_| RunnerError::Usage(format!("{s:?} holds a NUL")))
}

fn c_path(p: &Path) -> Result<CString, RunnerError> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| RunnerError::Usage(format!("{} holds a NUL", p.display())))
}

/// The host-side fds the VM's devices use; libkrun takes ownership of both
/// (it wraps them in its own `File`/`OwnedFd`), so they are handed over
/// as raw fds and never closed here.
pub struct DeviceFds {
    /// Write end of the console pipe (the serial port's output).
    pub console_out: RawFd,
    /// libkrun's end of the NIC relay's socket pair.
    pub net: Option<RawFd>,
}

/// Creates and configures a libkrun context; returns its id.
pub fn configure(c: &VmConfig, fds: &DeviceFds) -> Result<u32, RunnerError> {
    let kernel = c_path(&c.kernel)?;
    let initramfs = c_path(&c.initramfs)?;
    let cmdline = c_text(&c.cmdline)?;
    let agent_socket = c_path(&c.agent_socket)?;
    let cpus = u8::try_from(c.cpus).map_err(|_| RunnerError::Usage("--cpus too large".into()))?;
    // SAFETY: krun_init_log takes plain integers; fd 2 is our stderr.
    check("krun_init_log", unsafe {
        krun::krun_init_log(2, LOG_LEVEL_WARN, LOG_STYLE_NEVER, LOG_OPTION_NO_ENV)
    })?;
    let ctx = krun::krun_create_ctx();
    check("krun_create_ctx", ctx)?;
    let ctx = ctx as u32;
    check(
        "krun_set_vm_config",
        krun::krun_set_vm_config(ctx, cpus, c.memory_mib),
    )?;
    check(
        "krun_disable_implicit_console",
        krun::krun_disable_implicit_console(ctx),
    )?;
    check(
        "krun_disable_implicit_vsock",
        krun::krun_disable_implicit_vsock(ctx),
    )?;
    // SAFETY: plain integers; console_out is an open pipe end released to
    // libkrun (`into_raw_fd`), which owns and closes it from now on.
    check("krun_add_serial_console_default", unsafe {
        krun::krun_add_serial_console_default(ctx, -1, fds.console_out)
    })?;
    // tsi_features 0: a vsock device without TSI (no socket hijacking).
    check("krun_add_vsock", krun::krun_add_vsock(ctx, 0))?;
    // SAFETY: agent_socket is a valid NUL-terminated string that outlives
    // the call (libkrun copies it).
    check("krun_add_vsock_port2", unsafe {
        krun::krun_add_vsock_port2(ctx, c.agent_port, agent_socket.as_ptr(), true)
    })?;
    for d in &c.disks {
        let id = c_text(&d.id)?;
        let path = c_path(&d.path)?;
        let sync = if d.read_only { SYNC_NONE } else { SYNC_FULL };
        // SAFETY: both strings are valid and NUL-terminated for the call;
        // libkrun copies them.
        check("krun_add_disk3", unsafe {
            krun::krun_add_disk3(
                ctx,
                id.as_ptr(),
                path.as_ptr(),
                DISK_FORMAT_RAW,
                d.read_only,
                false,
                sync,
            )
        })?;
    }
    if let (Some(nic), Some(fd)) = (&c.nic, fds.net) {
        // SAFETY: the MAC pointer covers the six bytes libkrun reads; fd is
        // a datagram socket released to libkrun (`into_raw_fd`), which owns
        // it from now on; no path is passed.
        check("krun_add_net_unixgram", unsafe {
            krun::krun_add_net_unixgram(ctx, std::ptr::null(), fd, nic.mac.as_ptr(), 0, 0)
        })?;
    }
    // SAFETY: the three strings are valid and NUL-terminated for the call;
    // libkrun copies them.
    check("krun_set_kernel", unsafe {
        krun::krun_set_kernel(
            ctx,
            kernel.as_ptr(),
            KERNEL_FORMAT_ELF,
            initramfs.as_ptr(),
            cmdline.as_ptr(),
        )
    })?;
    Ok(ctx)
}

/// Runs the guest; returns only if libkrun could not start it.
pub fn start(ctx: u32) -> RunnerError {
    let r = krun::krun_start_enter(ctx);
    RunnerError::Krun {
        call: "krun_start_enter",
        errno: if r < 0 { -r } else { libc::EIO },
    }
}
