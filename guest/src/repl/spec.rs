//! Validating a `Repl` request: the language, sizes, `KEY=VALUE` env, and the
//! output cap and timeout after defaults and clamping.

use std::path::PathBuf;
use std::time::Duration;

use moat_proto::agent::Repl;

use super::node::NODE;
use super::python::PYTHON;
use super::Flavor;
use crate::error::{AgentError, Result};
use crate::exec::{
    parse_env, workdir_path, DEFAULT_MAX_OUTPUT, HARD_MAX_OUTPUT, MAX_ARGS, MAX_REQUEST_BYTES,
};

/// Largest cell accepted.
pub const MAX_CODE_BYTES: usize = 8 << 20;

/// A validated request.
#[derive(Debug)]
pub struct ReplSpec<'a> {
    pub flavor: &'static Flavor,
    pub code: &'a str,
    /// Used only when the interpreter starts.
    pub env: Vec<(&'a str, &'a str)>,
    /// Absolute; "/" when the request left it empty. Used only at start.
    pub workdir: PathBuf,
    pub timeout: Option<Duration>,
    /// Output bytes to keep.
    pub cap: u64,
    /// Who the interpreter runs as (see `crate::user`). Used only at start.
    pub user: &'a str,
}

/// What an interpreter is started with; a warm interpreter serves a
/// sandbox only when its first cell asks for exactly these.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartParams {
    env: Vec<(String, String)>,
    workdir: PathBuf,
    user: String,
}

impl ReplSpec<'_> {
    /// The parts of the request used when the interpreter starts.
    pub fn start_params(&self) -> StartParams {
        StartParams {
            env: self
                .env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            workdir: self.workdir.clone(),
            user: self.user.to_owned(),
        }
    }
}

fn bad(msg: impl Into<String>) -> AgentError {
    AgentError::BadRequest(msg.into())
}

/// The flavor for a language name (the broker normalises aliases; the common
/// ones are accepted here too).
pub fn flavor(language: &str) -> Option<&'static Flavor> {
    match language {
        "python" | "python3" => Some(&PYTHON),
        "nodejs" | "node" | "javascript" => Some(&NODE),
        _ => None,
    }
}

impl<'a> ReplSpec<'a> {
    /// Validates `req`; `Err(BadRequest)` for what we refuse to run.
    pub fn parse(req: &'a Repl) -> Result<Self> {
        let flavor = flavor(&req.language).ok_or_else(|| {
            bad(format!(
                "repl: unsupported language {:?}; use \"python\" or \"nodejs\"",
                req.language
            ))
        })?;
        if req.code.len() > MAX_CODE_BYTES {
            return Err(bad(format!(
                "repl: cell of {} bytes (limit {MAX_CODE_BYTES})",
                req.code.len()
            )));
        }
        if req.env.len() > MAX_ARGS {
            return Err(bad(format!(
                "repl: {} env entries (limit {MAX_ARGS})",
                req.env.len()
            )));
        }
        let total: usize = req.workdir.len() + req.env.iter().map(String::len).sum::<usize>();
        if total > MAX_REQUEST_BYTES {
            return Err(bad(format!(
                "repl: env and workdir of {total} bytes (limit {MAX_REQUEST_BYTES})"
            )));
        }
        if req.workdir.contains('\0') || req.env.iter().any(|e| e.contains('\0')) {
            return Err(bad("repl: env and workdir must not contain NUL"));
        }
        let env = parse_env("repl", &req.env)?;
        let cap = match req.max_output_bytes {
            0 => DEFAULT_MAX_OUTPUT,
            n => n.min(HARD_MAX_OUTPUT),
        };
        Ok(ReplSpec {
            flavor,
            code: &req.code,
            env,
            workdir: workdir_path(&req.workdir),
            timeout: (req.timeout_ms > 0).then(|| Duration::from_millis(req.timeout_ms)),
            cap,
            user: &req.user,
        })
    }
}
