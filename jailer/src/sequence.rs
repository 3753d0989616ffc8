//! The jail sequence, always in this order (each step assumes the ones
//! before it):
//!
//! 1. validate the spec (`spec.rs`, before this function runs);
//! 2. close every inherited fd above stderr except the passed ones (3, 4,
//!    ...: `--keep-fd`, `--bind-fd`); open the VMM program as an fd (it is
//!    exec'd through that fd, so it need not be visible inside the jail:
//!    the `moat-vmm` runner can live outside `/usr`; the fd is
//!    close-on-exec, so the program must be an ELF binary, not a `#!`
//!    script); clear the
//!    environment; umask 022, so
//!    the jail's directories are traversable by the sandbox's uid whatever
//!    umask the broker runs with (systemd gives it 077);
//! 3. join the sandbox's cgroups (memory, CPU, pids limits apply from here);
//!    turn the volume fds into detached mounts (they must be cloned while
//!    still in the host's mount namespace);
//! 4. new mount, PID, IPC, UTS and network namespaces;
//! 5. fork: the child is PID 1 of the new PID namespace; the parent drops to
//!    the sandbox's ids, waits for it and exits with its status (it does not
//!    die with the broker: VMs survive broker restarts and are re-adopted);
//! 6. child: build the jail root (tmpfs, read-only binds of what the VMM
//!    needs, device nodes, /proc) and `pivot_root` into it; hostname;
//! 7. rlimits (open files, file size, processes, no core dumps);
//! 8. drop every capability from the bounding set, then supplementary
//!    groups, gid and uid (real, effective, saved); clear ambient caps;
//! 9. `no_new_privs`; parent-death SIGKILL (the VM dies with its waiter);
//! 10. umask 077 (what the VMM creates, its sockets, is its own); seccomp
//!     filters (the `--seccomp` profile's allow-list, compiled from
//!     `seccomp/*.json`);
//! 11. exec the VMM through its fd (`execveat(AT_EMPTY_PATH)`) with an
//!     empty environment.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;

use nix::fcntl::{open, AtFlags, OFlag};
use nix::sched::{unshare, CloneFlags};
use nix::sys::stat::{umask, Mode};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult};

use crate::error::JailError;
use crate::spec::JailSpec;
use crate::{mounts, privileges, seccomp};

/// Runs the sequence; returns only on failure (the success path execs).
pub fn run(spec: &JailSpec) -> JailError {
    match steps(spec) {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

fn steps(spec: &JailSpec) -> Result<std::convert::Infallible, JailError> {
    // Step 2.
    let first_closed = 3 + (spec.keep_fds.len() + spec.fd_binds.len()) as u32;
    // SAFETY: close_range with plain integer arguments; fds 0-2 and the
    // passed fds (validated to be exactly 3..first_closed) stay.
    let r = unsafe { libc::syscall(libc::SYS_close_range, first_closed, u32::MAX, 0u32) };
    if r < 0 {
        return Err(JailError::step("close inherited fds")(
            std::io::Error::last_os_error(),
        ));
    }
    let program = CString::new(spec.program.as_os_str().as_bytes())
        .map_err(|_| JailError::Spec("program contains NUL".into()))?;
    // Opened here, in the host's mount namespace; exec'd in step 11.
    let program_fd = open(
        &spec.program,
        OFlag::O_PATH | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(JailError::errno("open the VMM program"))?;
    let mut argv = vec![program.clone()];
    for a in &spec.args {
        argv.push(
            CString::new(a.as_bytes())
                .map_err(|_| JailError::Spec("argument contains NUL".into()))?,
        );
    }
    let cap_last = privileges::last_cap()?;
    let filters = seccomp::filters(spec.seccomp);
    umask(Mode::from_bits_truncate(0o022));

    // Step 3.
    for procs in &spec.cgroup_procs {
        std::fs::write(procs, b"0").map_err(JailError::step("join cgroup"))?;
    }
    let volumes = mounts::detach_volumes(spec)?;
    // Step 4.
    unshare(
        CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWPID
            | CloneFlags::CLONE_NEWIPC
            | CloneFlags::CLONE_NEWUTS
            | CloneFlags::CLONE_NEWNET,
    )
    .map_err(JailError::errno("unshare namespaces"))?;
    // Step 5.
    // SAFETY: the jailer is single-threaded, so fork is safe; the child only
    // runs this function's remaining steps and then execs.
    match unsafe { fork() }.map_err(JailError::errno("fork into the PID namespace"))? {
        ForkResult::Parent { child } => {
            // Only the VM process holds the passed fds (a tap lives exactly
            // as long as its last holder).
            for fd in &spec.keep_fds {
                // SAFETY: closing an fd number this process owns.
                unsafe { libc::close(*fd) };
            }
            drop(volumes);
            drop(program_fd);
            // This waiter outlives the broker on purpose: a restarted
            // broker re-adopts it (by pid, start time and cgroup). The VM
            // process dies with it (its parent-death signal, step 9).
            privileges::drop_ids(spec)?;
            privileges::no_new_privs()?;
            loop {
                match waitpid(child, None) {
                    Ok(WaitStatus::Exited(_, code)) => std::process::exit(code),
                    Ok(WaitStatus::Signaled(_, sig, _)) => privileges::die_by(sig),
                    Ok(_) => continue,
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => return Err(JailError::errno("wait for the VM process")(e)),
                }
            }
        }
        ForkResult::Child => {}
    }
    // Step 6.
    mounts::enter_root(spec, volumes)?;
    nix::unistd::sethostname(&spec.hostname).map_err(JailError::errno("sethostname"))?;
    // Step 7.
    privileges::set_rlimits(spec)?;
    // Step 8.
    privileges::drop_bounding_set(cap_last)?;
    privileges::drop_ids(spec)?;
    // Step 9.
    privileges::no_new_privs()?;
    privileges::die_with_parent()?;
    // Step 10.
    umask(Mode::from_bits_truncate(0o077));
    seccomp::install(&filters)?;
    // Step 11.
    let env: [CString; 0] = [];
    let err = nix::unistd::execveat(&program_fd, c"", &argv, &env, AtFlags::AT_EMPTY_PATH)
        .map_err(JailError::errno("exec the VMM"));
    match err {
        Err(e) => Err(e),
        Ok(never) => match never {},
    }
}
