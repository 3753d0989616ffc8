//! Spawns a VM process in its jail. The steps run in a fixed order, each
//! documented below; the privileged ones run in the child between `fork` and
//! `exec`, where only async-signal-safe raw syscalls are allowed:
//!
//! 1. validate the spec (unprivileged uid/gid, absolute paths);
//! 2. open the cgroup `cgroup.procs` files in the parent (fds, not paths,
//!    reach the child);
//! 3. empty environment, stdin `/dev/null`, stdout/stderr piped to the
//!    console log, working directory the VM's own directory;
//! 4. child: new session (terminal signals aimed at the operator's shell do
//!    not reach the VM), join the cgroups by writing `0` to each fd;
//! 5. child: mark every inherited fd above 2 close-on-exec (`close_range`);
//! 6. child: drop supplementary groups, then gid, then uid (real, effective
//!    and saved) to the sandbox's own ids; capabilities go with uid 0;
//! 7. child: `no_new_privs`; parent-death signal SIGKILL (set after the uid
//!    change, which clears it), so a VM never outlives its broker;
//! 8. exec the VMM.
//!
//! Namespaces, pivot_root, rlimits and the seccomp filter extend this
//! sequence in the confinement work; QEMU's own `-sandbox` filter is on.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::process::Stdio;

use tokio::process::{Child, Command};

use crate::vmm::LaunchPlan;

/// Errors setting up a jail.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("jail spec invalid: {0}")]
    Invalid(String),
    #[error("cannot open cgroup file {path}: {source}")]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the VM process {program}: {source}")]
    Spawn {
        program: PathBuf,
        source: std::io::Error,
    },
}

/// Who and where the VM process runs.
#[derive(Debug, Clone)]
pub struct JailSpec {
    pub uid: u32,
    pub gid: u32,
    pub extra_groups: Vec<u32>,
    /// `cgroup.procs` files to join.
    pub cgroup_procs: Vec<PathBuf>,
    /// The VM's directory: its working directory.
    pub dir: PathBuf,
}

impl JailSpec {
    /// Step 1: the spec must describe an unprivileged, contained process.
    pub fn validate(&self, plan: &LaunchPlan) -> Result<(), JailError> {
        let bad = |m: &str| Err(JailError::Invalid(m.to_string()));
        if self.uid == 0 || self.gid == 0 {
            return bad("a VM process never runs as uid or gid 0");
        }
        if self.extra_groups.contains(&0) {
            return bad("a VM process never gets group 0");
        }
        if !plan.program.is_absolute() || !self.dir.is_absolute() {
            return bad("program and directory must be absolute paths");
        }
        if self.cgroup_procs.is_empty() {
            return bad("a VM process always runs in its own cgroup");
        }
        Ok(())
    }
}

/// Spawns `plan` under `spec` (steps 1-8). Must be called from an async
/// task (a runtime worker thread): the parent-death signal follows the thread
/// that forked.
pub fn spawn(plan: &LaunchPlan, spec: &JailSpec) -> Result<Child, JailError> {
    spec.validate(plan)?;
    // Step 2.
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

    // Step 3.
    let mut cmd = Command::new(&plan.program);
    cmd.args(&plan.args)
        .env_clear()
        .current_dir(&spec.dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // SAFETY: the closure runs in the forked child before exec and calls only
    // async-signal-safe raw syscalls on memory captured before the fork (no
    // allocation, no locks). `fds` stay open in the parent until `spawn`
    // returns, so they are valid in the child.
    unsafe {
        cmd.pre_exec(move || child_steps(&fds, uid, gid, &groups));
    }
    let child = cmd.spawn().map_err(|source| JailError::Spawn {
        program: plan.program.clone(),
        source,
    })?;
    drop(procs);
    Ok(child)
}

fn check(ret: libc::c_long) -> std::io::Result<()> {
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Steps 4-7, in the child. Errors abort the spawn (the parent sees them).
fn child_steps(fds: &[RawFd], uid: u32, gid: u32, groups: &[libc::gid_t]) -> std::io::Result<()> {
    // SAFETY (whole function): raw syscalls with plain integer arguments or
    // pointers to memory owned by this closure; valid in a forked child.
    unsafe {
        // Step 4.
        check(libc::setsid() as libc::c_long)?;
        for fd in fds {
            let n = libc::write(*fd, b"0".as_ptr().cast(), 1);
            check(n as libc::c_long)?;
        }
        // Step 5: CLOSE_RANGE_CLOEXEC (4) keeps stdio and the fds above
        // until exec, then closes them.
        check(libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 4u32))?;
        // Step 6.
        check(libc::setgroups(groups.len(), groups.as_ptr()) as libc::c_long)?;
        check(libc::setresgid(gid, gid, gid) as libc::c_long)?;
        check(libc::setresuid(uid, uid, uid) as libc::c_long)?;
        // Step 7.
        check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) as libc::c_long)?;
        check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) as libc::c_long)?;
        if libc::getppid() == 1 {
            // The broker died between fork and here.
            libc::_exit(1);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> LaunchPlan {
        LaunchPlan {
            program: "/usr/bin/qemu".into(),
            args: vec![],
        }
    }

    fn spec() -> JailSpec {
        JailSpec {
            uid: 1_900_000_000,
            gid: 1_900_000_000,
            extra_groups: vec![],
            cgroup_procs: vec!["/sys/fs/cgroup/moat/0/cgroup.procs".into()],
            dir: "/var/lib/moat/vms/0".into(),
        }
    }

    #[test]
    fn refuses_root_and_missing_cgroup() {
        spec().validate(&plan()).unwrap();
        let mut s = spec();
        s.uid = 0;
        assert!(s.validate(&plan()).is_err());
        let mut s = spec();
        s.extra_groups = vec![0];
        assert!(s.validate(&plan()).is_err());
        let mut s = spec();
        s.cgroup_procs.clear();
        assert!(s
            .validate(&plan())
            .unwrap_err()
            .to_string()
            .contains("cgroup"));
        let mut s = spec();
        s.dir = "relative".into();
        assert!(s.validate(&plan()).is_err());
    }
}
