//! What can go wrong with an image, each variant naming the image (and the
//! layer, where there is one) and saying what to do.

use super::reference::ReferenceError;
use super::unpack::UnpackError;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    /// The registry has no such image (or tag).
    #[error("image {image} not found in its registry: {detail}")]
    NotFound { image: String, detail: String },
    /// Talking to the registry failed (network, status, auth).
    #[error("image {image}: registry {registry}: {reason}")]
    Registry {
        image: String,
        registry: String,
        reason: String,
    },
    /// A manifest, index or config the image's publisher got wrong (or a
    /// registry tampered with): bad JSON, media type, digest, platform.
    #[error("image {image}: {reason}")]
    Invalid { image: String, reason: String },
    /// A layer that cannot be used: download, digest, size or contents.
    #[error("image {image}: layer {layer}: {reason}")]
    Layer {
        image: String,
        layer: String,
        reason: String,
    },
    /// (The unpack error is shown, not chained: it already says it all.)
    #[error("image {image}: {error}")]
    Unpack { image: String, error: UnpackError },
    /// The local store (disk full, permissions, corrupt metadata).
    #[error("image store {path}: {reason}")]
    Store { path: String, reason: String },
    /// Building the boot disk.
    #[error("image {image}: building its boot disk failed: {reason}")]
    BootDisk { image: String, reason: String },
}

impl ImageError {
    /// Whether the caller asked for something unusable (a bad or unknown
    /// reference) rather than the operation failing.
    pub fn is_caller_error(&self) -> bool {
        matches!(self, Self::Reference(_) | Self::NotFound { .. })
    }

    pub(crate) fn store(path: &std::path::Path, e: impl std::fmt::Display) -> Self {
        Self::Store {
            path: path.display().to_string(),
            reason: e.to_string(),
        }
    }
}
