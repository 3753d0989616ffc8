//! Validating an `Exec` request (sizes, NULs, `KEY=VALUE` env) and finding
//! its program in the request's own PATH, like `execvp`.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use moat_proto::agent::Exec;

use super::{DEFAULT_MAX_OUTPUT, DEFAULT_PATH, HARD_MAX_OUTPUT, MAX_ARGS, MAX_REQUEST_BYTES};
use crate::error::{AgentError, Result};

/// A validated request.
#[derive(Debug)]
pub struct Spec<'a> {
    /// As requested (becomes `argv[0]`).
    pub program: &'a str,
    pub args: &'a [String],
    /// `KEY=VALUE` entries split at the first '='.
    pub env: Vec<(&'a str, &'a str)>,
    /// Absolute; "/" when the request left it empty.
    pub workdir: PathBuf,
    pub timeout: Option<Duration>,
    /// Output bytes to keep, after defaults and clamping.
    pub cap: u64,
}

fn bad(msg: impl Into<String>) -> AgentError {
    AgentError::BadRequest(msg.into())
}

impl<'a> Spec<'a> {
    /// Validates `req`; `Err(BadRequest)` for what we refuse to run.
    pub fn parse(req: &'a Exec) -> Result<Self> {
        if req.program.is_empty() {
            return Err(bad("exec: empty program"));
        }
        if req.args.len() > MAX_ARGS {
            return Err(bad(format!(
                "exec: {} args (limit {MAX_ARGS})",
                req.args.len()
            )));
        }
        if req.env.len() > MAX_ARGS {
            return Err(bad(format!(
                "exec: {} env entries (limit {MAX_ARGS})",
                req.env.len()
            )));
        }
        let total: usize = [&req.program, &req.workdir]
            .into_iter()
            .chain(&req.args)
            .chain(&req.env)
            .map(String::len)
            .sum();
        if total > MAX_REQUEST_BYTES {
            return Err(bad(format!(
                "exec: request of {total} bytes (limit {MAX_REQUEST_BYTES})"
            )));
        }
        let all = [&req.program, &req.workdir]
            .into_iter()
            .chain(&req.args)
            .chain(&req.env);
        if all.clone().any(|s| s.contains('\0')) {
            return Err(bad(
                "exec: program, args, env and workdir must not contain NUL",
            ));
        }
        let env = parse_env("exec", &req.env)?;
        let workdir = workdir_path(&req.workdir);
        let cap = match req.max_output_bytes {
            0 => DEFAULT_MAX_OUTPUT,
            n => n.min(HARD_MAX_OUTPUT),
        };
        let timeout = (req.timeout_ms > 0).then(|| Duration::from_millis(req.timeout_ms));
        Ok(Spec {
            program: &req.program,
            args: &req.args,
            env,
            workdir,
            timeout,
            cap,
        })
    }

    /// PATH of the request's environment (the last definition wins, as for
    /// the child).
    pub fn path_var(&self) -> &'a str {
        path_of(&self.env)
    }
}

/// Splits `KEY=VALUE` entries at the first '='; `what` names the request
/// kind in the error.
pub fn parse_env<'a>(what: &str, entries: &'a [String]) -> Result<Vec<(&'a str, &'a str)>> {
    let mut env = Vec::with_capacity(entries.len());
    for entry in entries {
        match entry.split_once('=') {
            Some((key, value)) if !key.is_empty() => env.push((key, value)),
            _ => return Err(bad(format!("{what}: env entry {entry:?} is not KEY=VALUE"))),
        }
    }
    Ok(env)
}

/// PATH of a parsed environment (the last definition wins, as for the
/// child), or [`DEFAULT_PATH`].
pub fn path_of<'a>(env: &[(&'a str, &'a str)]) -> &'a str {
    env.iter()
        .rev()
        .find(|(k, _)| *k == "PATH")
        .map_or(DEFAULT_PATH, |(_, v)| v)
}

/// A request's working directory as an absolute path ("/" when empty).
pub fn workdir_path(workdir: &str) -> PathBuf {
    Path::new("/").join(if workdir.is_empty() { "/" } else { workdir })
}

/// Finds `program` like `execvp`: as given if it has a '/', otherwise in the
/// first PATH directory holding an executable file of that name. Relative
/// PATH entries (and an empty one, meaning ".") count from `workdir`.
pub fn resolve(program: &str, path_var: &str, workdir: &Path) -> io::Result<PathBuf> {
    if program.contains('/') {
        return Ok(PathBuf::from(program));
    }
    let mut saw_unusable = false;
    for dir in path_var.split(':') {
        let dir = if dir.is_empty() { "." } else { dir };
        let candidate = workdir.join(dir).join(program);
        match fs::metadata(&candidate) {
            Ok(meta) if meta.is_file() && meta.permissions().mode() & 0o111 != 0 => {
                return Ok(candidate)
            }
            Ok(_) => saw_unusable = true,
            Err(_) => {}
        }
    }
    Err(if saw_unusable {
        io::Error::from(io::ErrorKind::PermissionDenied)
    } else {
        io::Error::from(io::ErrorKind::NotFound)
    })
}
