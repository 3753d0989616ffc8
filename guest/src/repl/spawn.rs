//! Starting an interpreter: finding it in the request's PATH, and spawning it
//! in its own process group and workload group with stdin `/dev/null`,
//! stdout/stderr piped, and the three control pipes on fds 3, 4 and 5.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use super::spec::ReplSpec;
use crate::error::{AgentError, Result};
use crate::exec::{path_of, resolve};
use crate::fd;
use crate::workload::{self, Group};

/// The control fds as the driver sees them: requests, events, acks.
pub const CONTROL_FDS: [RawFd; 3] = [3, 4, 5];
/// Lowest fd for the temporary copies made while moving the control fds.
const TEMP_FD_BASE: RawFd = 10;

/// A started interpreter and the agent's ends of its control pipes.
#[derive(Debug)]
pub struct Spawned {
    pub child: Child,
    /// Write end of fd 3.
    pub requests: File,
    /// Read end of fd 4.
    pub events: File,
    /// Write end of fd 5.
    pub acks: File,
    /// The session's workload group, when the guest has the layout.
    pub group: Option<Group>,
}

/// Finds the flavor's interpreter in the request's PATH.
pub fn find(spec: &ReplSpec<'_>) -> Result<PathBuf> {
    let path_var = path_of(&spec.env);
    spec.flavor
        .programs
        .iter()
        .find_map(|program| resolve(program, path_var, &spec.workdir).ok())
        .ok_or_else(|| AgentError::Unavailable(spec.flavor.missing.to_owned()))
}

/// Puts `fds` on [`CONTROL_FDS`] in a freshly forked child. Only
/// async-signal-safe calls: it runs between fork and exec.
fn install_control_fds(fds: [RawFd; 3]) -> io::Result<()> {
    // Copy all three out of the way first, so that moving one cannot
    // clobber another that happens to sit on 3, 4 or 5.
    let mut temp = [0; 3];
    for (slot, fd) in temp.iter_mut().zip(fds) {
        // SAFETY: fcntl(F_DUPFD) duplicates an fd we hold open; no memory is
        // involved.
        let copy = unsafe { libc::fcntl(fd, libc::F_DUPFD, TEMP_FD_BASE) };
        if copy < 0 {
            return Err(io::Error::last_os_error());
        }
        *slot = copy;
    }
    for (copy, target) in temp.into_iter().zip(CONTROL_FDS) {
        // SAFETY: dup2 onto a fixed descriptor number of this (child)
        // process; the new fd is not close-on-exec, which is the point.
        if unsafe { libc::dup2(copy, target) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `copy` is our own temporary duplicate, used nowhere else.
        unsafe { libc::close(copy) };
    }
    Ok(())
}

/// Spawns the interpreter at `program` running the flavor's driver.
pub fn spawn(spec: &ReplSpec<'_>, program: &PathBuf) -> io::Result<Spawned> {
    let (req_read, req_write) = fd::pipe()?;
    let (ev_read, ev_write) = fd::pipe()?;
    let (ack_read, ack_write) = fd::pipe()?;
    let child_ends = [
        req_read.as_raw_fd(),
        ev_write.as_raw_fd(),
        ack_read.as_raw_fd(),
    ];
    let identity = crate::user::resolve(spec.user).map_err(|e| io::Error::other(e.to_string()))?;
    let mut cmd = Command::new(program);
    cmd.args(spec.flavor.args)
        .arg(spec.flavor.driver)
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| {
            (
                OsStr::new(k),
                OsStr::new(crate::user::env_value(k, v, identity.as_ref())),
            )
        }))
        .current_dir(&spec.workdir)
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let group = workload::group_for("repl");
    let procs_fd = group.as_ref().map(Group::procs_fd);
    // SAFETY: the closure only calls write, open, fcntl, dup2, close and the
    // raw setgroups/setgid/setuid of the identity switch (async-signal-safe)
    // and allocates nothing; the descriptors it uses are the pipe ends and
    // the group held in the locals above, which stay open until after
    // `spawn` returns.
    unsafe {
        cmd.pre_exec(move || {
            workload::enter_in_child(procs_fd)?;
            install_control_fds(child_ends)?;
            match &identity {
                Some(id) => crate::user::switch_in_child(id),
                None => Ok(()),
            }
        });
    }
    // Only our ends (separate open file descriptions from the child's).
    for end in [&req_write, &ev_read, &ack_write] {
        fd::set_nonblocking(end)?;
    }
    let child = cmd.spawn()?;
    // The child has its copies; ours would keep the pipes from reporting
    // end-of-file.
    drop((req_read, ev_write, ack_read));
    Ok(Spawned {
        child,
        requests: File::from(req_write),
        events: File::from(ev_read),
        acks: File::from(ack_write),
        group,
    })
}
