//! Builds the `moat-jailer` command line from a [`JailSpec`] and spawns it.
//! The broker side only sets a new session (the VM must outlive a broker
//! restart, so there is no parent-death signal); the jailer does everything
//! else (see `jailer/src/sequence.rs`).

use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::Stdio;

use tokio::process::{Child, Command};

use super::{JailError, JailSpec};
use crate::vmm::LaunchPlan;

/// The jailer's arguments for `plan` under `spec`.
pub fn args(plan: &LaunchPlan, spec: &JailSpec) -> Vec<OsString> {
    let mut a: Vec<OsString> = Vec::new();
    let mut push = |k: &str, v: OsString| {
        a.push(k.into());
        a.push(v);
    };
    push("--uid", spec.uid.to_string().into());
    push("--gid", spec.gid.to_string().into());
    for g in &spec.extra_groups {
        push("--group", g.to_string().into());
    }
    for p in &spec.cgroup_procs {
        push("--cgroup-procs", p.into());
    }
    push("--root", spec.root.clone().into());
    for b in spec.layout.binds() {
        let mut v = OsString::from(&b.host);
        v.push(":");
        v.push(&b.inside);
        push(if b.writable { "--rw" } else { "--ro" }, v);
    }
    for d in &spec.devices {
        push("--dev", (*d).into());
    }
    push("--nofile", spec.rlimit_nofile.to_string().into());
    push("--fsize", spec.rlimit_fsize.to_string().into());
    push("--nproc", spec.rlimit_nproc.to_string().into());
    push("--hostname", spec.hostname.clone().into());
    let mut fd = 3;
    if spec.keeps_tap {
        push("--keep-fd", fd.to_string().into());
        fd += 1;
    }
    for (inside, writable) in &spec.volume_binds {
        let mut v = OsString::from(format!("{fd}:"));
        v.push(inside);
        v.push(if *writable { ":rw" } else { ":ro" });
        push("--bind-fd", v);
        fd += 1;
    }
    push("--seccomp", plan.seccomp.into());
    a.push("--".into());
    a.push(plan.program.clone().into());
    a.extend(plan.args.iter().cloned());
    a
}

pub fn spawn(
    jailer: &Path,
    plan: &LaunchPlan,
    spec: &JailSpec,
    fds: Vec<OwnedFd>,
) -> Result<Child, JailError> {
    let placement = super::passed_fds::Placement::new(&fds);
    let mut cmd = Command::new(jailer);
    cmd.args(args(plan, spec))
        .env_clear()
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(false);
    // SAFETY: runs in the forked child before exec; only async-signal-safe
    // raw syscalls with integer arguments.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            placement.place()
        });
    }
    let child = cmd.spawn().map_err(|source| JailError::Spawn {
        program: jailer.to_owned(),
        source,
    });
    // The child has its copies now (or failed): ours close here.
    drop(fds);
    child
}

#[cfg(test)]
mod tests {
    use super::super::tests::{plan, spec};
    use super::*;

    #[test]
    fn arguments_carry_every_part_of_the_spec() {
        let a: Vec<String> = args(&plan(), &spec())
            .into_iter()
            .map(|s| s.to_string_lossy().into_owned())
            .collect();
        let joined = a.join(" ");
        assert!(
            joined.starts_with("--uid 1900000000 --gid 1900000000"),
            "{joined}"
        );
        assert!(
            joined.contains("--ro /img/base.erofs:/disk/image"),
            "{joined}"
        );
        assert!(joined.contains("--rw /var/lib/moat/vms/0:/vm"), "{joined}");
        assert!(joined.contains("--cgroup-procs /sys/fs/cgroup/moat/0/cgroup.procs"));
        assert!(joined.contains("--dev null --dev urandom"));
        assert!(
            joined.ends_with("--seccomp qemu -- /usr/bin/qemu"),
            "{joined}"
        );
        assert!(!joined.contains("-fd"), "{joined}");
        let mut s = spec();
        s.keeps_tap = true;
        s.volume_binds = vec![("/vol/0".into(), false), ("/vol/1".into(), true)];
        let joined = args(&plan(), &s)
            .into_iter()
            .map(|s| s.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ");
        assert!(
            joined.contains("--keep-fd 3 --bind-fd 4:/vol/0:ro --bind-fd 5:/vol/1:rw --"),
            "{joined}"
        );
    }
}
