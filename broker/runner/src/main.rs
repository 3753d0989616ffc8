//! `moat-vmm`: runs one sandbox's microVM on libkrun. The broker's libkrun
//! backend launches it through `moat-jailer`, so it starts confined (own
//! namespaces, pivot_root, unprivileged uid, no capabilities, the
//! `libkrun` seccomp allow-list) with the tap, if any, as an fd.
//!
//! Sequence: parse and check the command line (`args.rs`); bind the
//! console socket and wait for the broker (`console.rs`); start the NIC
//! relay (`net.rs`); configure libkrun and enter the VM (`vm.rs`).
//!
//! Exit status: the guest's own end (0 after a power-off the guest asked
//! for), 70 when the guest kernel panicked, 2 for a bad command line, 3
//! when a setup step failed (the reason is on stderr).

mod args;
mod console;
mod error;
mod net;
mod vm;

use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};

use args::VmConfig;
use error::RunnerError;

fn run() -> RunnerError {
    if std::env::args_os().any(|a| a == "--help" || a == "-h") {
        print!("{}", args::USAGE);
        std::process::exit(0);
    }
    let config = match VmConfig::parse(std::env::args_os().skip(1)) {
        Ok(c) => c,
        Err(e) => return e,
    };
    for f in config.files() {
        if let Err(e) = std::fs::metadata(f) {
            return RunnerError::Usage(format!("{}: {e}", f.display()));
        }
    }
    let (mut console, console_out) = match console::Console::bind(&config.console_socket) {
        Ok(c) => c,
        Err(e) => return RunnerError::Console(e),
    };
    if let Err(e) = console.wait_for_broker() {
        return RunnerError::Console(e);
    }
    let net = match &config.nic {
        Some(nic) => {
            // SAFETY: the jailer passed exactly this fd number open (the
            // broker's tap); nothing else in this process owns it.
            let tap = unsafe { OwnedFd::from_raw_fd(nic.tap_fd) };
            let relay = net::tap_header_len(&tap).and_then(|h| net::Relay::new(tap, h));
            match relay {
                Ok((relay, krun_end)) => {
                    std::thread::spawn(move || relay.run());
                    Some(krun_end)
                }
                Err(e) => return RunnerError::Network(e),
            }
        }
        None => None,
    };
    // libkrun owns these from here (it closes them itself).
    let fds = vm::DeviceFds {
        console_out: console_out.into_raw_fd(),
        net: net.map(IntoRawFd::into_raw_fd),
    };
    let ctx = match vm::configure(&config, &fds) {
        Ok(ctx) => ctx,
        Err(e) => return e,
    };
    std::thread::spawn(move || {
        if console.relay() == console::RelayEnd::GuestPanicked {
            eprintln!("moat-vmm: the guest kernel panicked; the VM is ended");
            std::process::exit(error::status::GUEST_PANIC);
        }
    });
    vm::start(ctx)
}

fn main() {
    let err = run();
    eprintln!("moat-vmm: {err}");
    std::process::exit(err.exit_status());
}
