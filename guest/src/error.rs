//! The crate's error type, plus a small `ctx` helper that attaches "what we
//! were doing" to `nix` and `std::io` errors so console messages name the step.

use std::io;

use moat_proto::frame::FrameError;

/// Everything that can go wrong in the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A system call failed.
    #[error("{what}: {source}")]
    Sys {
        what: String,
        #[source]
        source: nix::Error,
    },
    /// A file or device operation failed.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    /// A device the VM must have did not show up in time.
    #[error("{0}")]
    Missing(String),
    /// The host configured the VM inconsistently (e.g. two disks, one serial).
    #[error("{0}")]
    Config(String),
    /// The agent channel failed.
    #[error("agent channel: {0}")]
    Frame(#[from] FrameError),
    /// The host asked for something we refuse to do (answered with `Failure`).
    #[error("{0}")]
    BadRequest(String),
    /// The request is fine but this sandbox cannot serve it, e.g. its image
    /// has no interpreter for the language (answered with `Failure`).
    #[error("{0}")]
    Unavailable(String),
}

/// Shorthand for this crate's results.
pub type Result<T, E = AgentError> = std::result::Result<T, E>;

/// Attaches a description of the failed step to an error.
pub trait Context<T> {
    /// Wraps the error with `what` (evaluated only on failure).
    fn ctx<S: Into<String>>(self, what: impl FnOnce() -> S) -> Result<T>;
}

impl<T> Context<T> for std::result::Result<T, nix::Error> {
    fn ctx<S: Into<String>>(self, what: impl FnOnce() -> S) -> Result<T> {
        self.map_err(|source| AgentError::Sys {
            what: what().into(),
            source,
        })
    }
}

impl<T> Context<T> for std::result::Result<T, io::Error> {
    fn ctx<S: Into<String>>(self, what: impl FnOnce() -> S) -> Result<T> {
        self.map_err(|source| AgentError::Io {
            what: what().into(),
            source,
        })
    }
}
