//! Spawns a VM process confined. Normally through `moat-jailer` (crate
//! `jailer/`), which runs the documented sequence — fds, environment,
//! cgroups, namespaces, pivot_root into a per-VM root, rlimits, capability
//! bounding set, ids, no_new_privs, seccomp — and execs the VMM. The
//! operator may instead set `[jail] development_unjailed = true`, which keeps
//! only the uid/gid/cgroup/no_new_privs steps (`unjailed.rs`) and is logged
//! loudly at every start.
//!
//! [`JailLayout`] says where each host file appears inside the jail, so the
//! backend's launch plan names paths the VM process can actually open.

mod jailer;
mod layout;
mod passed_fds;
mod unjailed;

use std::os::fd::OwnedFd;
use std::path::PathBuf;

use tokio::process::Child;

use crate::vmm::LaunchPlan;
pub use layout::{JailLayout, AGENT_SOCKET, CONSOLE_SOCKET, WRITABLE_DISK};

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

/// How VM processes are confined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JailMode {
    /// Through the `moat-jailer` binary at this path (the default).
    Jailer(PathBuf),
    /// Development only: uid, cgroup and no_new_privs, no namespaces,
    /// pivot_root or seccomp.
    Unjailed,
}

/// Who the VM process runs as, what it may use, and where.
#[derive(Debug, Clone)]
pub struct JailSpec {
    pub uid: u32,
    pub gid: u32,
    pub extra_groups: Vec<u32>,
    /// `cgroup.procs` files to join.
    pub cgroup_procs: Vec<PathBuf>,
    /// The VM's directory on the host (disk, sockets).
    pub dir: PathBuf,
    /// Empty directory the jail's root is built on.
    pub root: PathBuf,
    /// What the VM process sees, and from where.
    pub layout: JailLayout,
    /// Device nodes to create (`null`, `urandom`, `kvm`, ...).
    pub devices: Vec<&'static str>,
    pub hostname: String,
    pub rlimit_nofile: u64,
    pub rlimit_fsize: u64,
    pub rlimit_nproc: u64,
    /// Whether the first passed fd is a tap the VMM keeps (fd 3).
    pub keeps_tap: bool,
    /// Volume directories, passed as fds after the tap, bound at these
    /// paths inside the jail (writable or not).
    pub volume_binds: Vec<(PathBuf, bool)>,
}

impl JailSpec {
    /// The spec must describe an unprivileged, contained process.
    pub fn validate(&self, plan: &LaunchPlan) -> Result<(), JailError> {
        let bad = |m: &str| Err(JailError::Invalid(m.to_string()));
        if self.uid == 0 || self.gid == 0 {
            return bad("a VM process never runs as uid or gid 0");
        }
        if self.extra_groups.contains(&0) {
            return bad("a VM process never gets group 0");
        }
        if !plan.program.is_absolute() || !self.dir.is_absolute() || !self.root.is_absolute() {
            return bad("program and directories must be absolute paths");
        }
        if self.cgroup_procs.is_empty() {
            return bad("a VM process always runs in its own cgroup");
        }
        Ok(())
    }

    /// How many fds the VM process is given (at 3, 4, ...).
    pub fn passed_fd_count(&self) -> usize {
        usize::from(self.keeps_tap) + self.volume_binds.len()
    }
}

/// Spawns `plan` under `spec`, handing it `fds` (the tap first, then the
/// volume directories, as `spec` describes) at 3, 4, ... Must be called from
/// an async task (a runtime worker thread): the parent-death signal follows
/// the thread that forked.
pub fn spawn(
    plan: &LaunchPlan,
    spec: &JailSpec,
    mode: &JailMode,
    fds: Vec<OwnedFd>,
) -> Result<Child, JailError> {
    spec.validate(plan)?;
    if fds.len() != spec.passed_fd_count() {
        return Err(JailError::Invalid(format!(
            "{} fds given for {} passed fds",
            fds.len(),
            spec.passed_fd_count()
        )));
    }
    match mode {
        JailMode::Jailer(jailer) => jailer::spawn(jailer, plan, spec, fds),
        JailMode::Unjailed => unjailed::spawn(plan, spec, fds),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn plan() -> LaunchPlan {
        LaunchPlan {
            program: "/usr/bin/qemu".into(),
            args: vec![],
            seccomp: "qemu",
        }
    }

    pub(super) fn spec() -> JailSpec {
        JailSpec {
            uid: 1_900_000_000,
            gid: 1_900_000_000,
            extra_groups: vec![],
            cgroup_procs: vec!["/sys/fs/cgroup/moat/0/cgroup.procs".into()],
            dir: "/var/lib/moat/vms/0".into(),
            root: "/var/lib/moat/jails/0".into(),
            layout: JailLayout::jailed(
                "/k/vmlinux".into(),
                "/k/initramfs".into(),
                "/img/base.erofs".into(),
                "/var/lib/moat/vms/0".into(),
            ),
            devices: vec!["null", "urandom"],
            hostname: "sb".into(),
            rlimit_nofile: 1024,
            rlimit_fsize: 1 << 30,
            rlimit_nproc: 256,
            keeps_tap: false,
            volume_binds: Vec::new(),
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
