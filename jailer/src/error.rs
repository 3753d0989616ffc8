//! Errors of the jail sequence, named by the step that failed.

/// A failed jail step; the VM is not started.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("invalid jail spec: {0}")]
    Spec(String),
    #[error("{step}: {source}")]
    Step {
        step: &'static str,
        source: std::io::Error,
    },
}

impl JailError {
    pub fn step(step: &'static str) -> impl FnOnce(std::io::Error) -> JailError {
        move |source| JailError::Step { step, source }
    }

    pub fn errno(step: &'static str) -> impl FnOnce(nix::errno::Errno) -> JailError {
        move |e| JailError::Step {
            step,
            source: std::io::Error::from(e),
        }
    }
}
