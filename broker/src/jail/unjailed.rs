//! Development only (`[jail] development_unjailed = true`): the VM process
//! runs with its own uid/gid, in its cgroup, with `no_new_privs` and
//! inherited fds closed, but without namespaces, pivot_root, rlimits or our
//! seccomp filter. The privileged steps run between `fork` and `exec`, where
//! only async-signal-safe raw syscalls are allowed.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::process::Stdio;

use tokio::process::{Child, Command};

use super::{JailError, JailSpec};
use crate::vmm::LaunchPlan;

pub fn spawn(plan: &LaunchPlan, spec: &JailSpec, passed: Vec<OwnedFd>) -> Result<Child, JailError> {
    let placement = super::passed_fds::Placement::new(&passed);
    let procs: Vec<File> = spec
        .cgroup_procs
        .iter()
        .map(|p| {
            OpenOptions::new()
                .write(true)
                .open(p)
                .map_err(|source| JailError::Cgroup {
                    path: p.clone(),
                    source,
                })
        })
        .collect::<Result<_, _>>()?;
    let fds: Vec<RawFd> = procs.iter().map(|f| f.as_raw_fd()).collect();
    let (uid, gid) = (spec.uid, spec.gid);
    let groups: Vec<libc::gid_t> = spec.extra_groups.clone();

    let mut cmd = Command::new(&plan.program);
    cmd.args(&plan.args)
        .env_clear()
        .current_dir(&spec.dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(false);
    // SAFETY: the closure runs in the forked child before exec and calls only
    // async-signal-safe raw syscalls on memory captured before the fork (no
    // allocation, no locks). `fds` stay open in the parent until `spawn`
    // returns, so they are valid in the child.
    unsafe {
        cmd.pre_exec(move || {
            child_steps(&fds, uid, gid, &groups)?;
            placement.place()
        });
    }
    let child = cmd.spawn().map_err(|source| JailError::Spawn {
        program: plan.program.clone(),
        source,
    })?;
    drop(procs);
    drop(passed);
    Ok(child)
}

fn check(ret: libc::c_long) -> std::io::Result<()> {
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// In the child: new session, cgroups, fds, ids, no_new_privs (no death
/// signal: VMs outlive a broker restart and are re-adopted).
fn child_steps(fds: &[RawFd], uid: u32, gid: u32, groups: &[libc::gid_t]) -> std::io::Result<()> {
    // SAFETY (whole function): raw syscalls with plain integer arguments or
    // pointers to memory owned by this closure; valid in a forked child.
    unsafe {
        check(libc::setsid() as libc::c_long)?;
        for fd in fds {
            let n = libc::write(*fd, b"0".as_ptr().cast(), 1);
            check(n as libc::c_long)?;
        }
        // CLOSE_RANGE_CLOEXEC (4): fds above stderr close at exec.
        check(libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 4u32))?;
        check(libc::setgroups(groups.len(), groups.as_ptr()) as libc::c_long)?;
        check(libc::setresgid(gid, gid, gid) as libc::c_long)?;
        check(libc::setresuid(uid, uid, uid) as libc::c_long)?;
        check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) as libc::c_long)?;
    }
    Ok(())
}
