//! Host directories a sandbox asks to mount (`config.volumes`): the request
//! syntax (`request`) and where on the host each one may come from
//! (`resolve`). Every host side is resolved beneath its root with `openat2`
//! (no `..`, no symlinks, no magic links), relative paths beneath the
//! namespace's own volume directory, absolute ones beneath a root the
//! operator allows.

mod namespace_dir;
mod request;
mod resolve;

pub use namespace_dir::prepare_namespace_dir;
pub use request::{parse_volume, VolumeRequest};
pub use resolve::{resolve_volume, ResolvedVolume};

/// Why a volume was refused; the message says what to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("volume {volume:?}: {reason}")]
pub struct VolumeError {
    pub volume: String,
    pub reason: String,
}

impl VolumeError {
    fn new(volume: &str, reason: impl Into<String>) -> Self {
        Self {
            volume: volume.to_owned(),
            reason: reason.into(),
        }
    }
}
