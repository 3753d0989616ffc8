//! Running one `Exec` request: argv without a shell, in its own process
//! group, with exactly the request's environment. This module owns the
//! limits and the spawn itself; [`request`] validates and resolves the
//! program, [`failure`] shapes "could not start" results, and [`supervise`]
//! collects output and enforces the timeout. Spawn failures are results
//! (126/127 with a stderr line), not errors; only malformed or absurd requests
//! are refused with an error.

mod failure;
mod request;
mod supervise;
#[cfg(test)]
mod tests;

use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use moat_proto::agent::{Exec, ExecResult};

use crate::error::Result;
use failure::{bad_workdir, cannot_run};
use request::Spec;
pub use request::{parse_env, path_of, resolve, workdir_path};

/// Output kept when the request says 0.
pub const DEFAULT_MAX_OUTPUT: u64 = 1 << 20;
/// Upper bound on kept output whatever the request says (replies must fit a
/// 16 MiB frame).
pub const HARD_MAX_OUTPUT: u64 = 8 << 20;
/// Upper bound on output lines (each costs a few bytes of framing).
pub const MAX_LINES: usize = 256 * 1024;
/// Most arguments / environment entries a request may carry.
pub const MAX_ARGS: usize = 4096;
/// Most bytes of program, args, env and workdir together.
pub const MAX_REQUEST_BYTES: usize = 2 << 20;
/// PATH used when the request's environment has none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// How long to keep reading after the command exited or was killed, in case
/// something that escaped its process group still holds the pipes open.
pub const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(200);

/// Runs the request to completion. `Err` only for requests refused outright.
pub fn run(req: &Exec) -> Result<ExecResult> {
    let spec = Spec::parse(req)?;
    match fs::metadata(&spec.workdir) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => {
            let err = io::Error::from_raw_os_error(libc::ENOTDIR);
            return Ok(bad_workdir(&spec.workdir, &err));
        }
        Err(err) => return Ok(bad_workdir(&spec.workdir, &err)),
    }
    let resolved = match resolve(spec.program, spec.path_var(), &spec.workdir) {
        Ok(path) => path,
        Err(err) => return Ok(cannot_run(spec.program, &err)),
    };
    let identity = crate::user::resolve(&req.user)?;
    let mut cmd = Command::new(&resolved);
    cmd.arg0(spec.program)
        .args(spec.args)
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
    let group = crate::workload::group_for("cmd");
    let procs_fd = group.as_ref().map(crate::workload::Group::procs_fd);
    // SAFETY: the closure only makes raw write/open/close calls (entering
    // the workload group) and raw setgroups/setgid/setuid calls on data
    // built before the fork; the group's descriptor outlives the spawn.
    unsafe {
        cmd.pre_exec(move || {
            crate::workload::enter_in_child(procs_fd)?;
            match &identity {
                Some(id) => crate::user::switch_in_child(id),
                None => Ok(()),
            }
        });
    }
    let child = match cmd.spawn() {
        Ok(child) => child,
        Err(err) => return Ok(cannot_run(spec.program, &err)),
    };
    Ok(supervise::supervise(
        child,
        spec.timeout,
        spec.cap,
        group.as_ref(),
    ))
}
