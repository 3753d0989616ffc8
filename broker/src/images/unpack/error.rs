//! `UnpackError`, the unpacker's public error, and `Fault`, what went wrong
//! inside one layer before the driver (`layer.rs`) adds the layer's and the
//! entry's names to it.

use std::io;
use std::path::PathBuf;

use nix::errno::Errno;

/// Why a layer could not be applied. Every variant but `Root` and `Host` is
/// the image's fault; the messages say so.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// The directory to unpack into cannot be used (the caller's or the
    /// host's problem, not the image's).
    #[error("cannot unpack image layers into {}: {reason}", root.display())]
    Root { root: PathBuf, reason: String },
    /// The layer breaks a rule (malformed or hostile archive).
    #[error(
        "image layer {layer}, entry {entry}: {reason}; the image is at fault (malformed or hostile), so it is refused"
    )]
    Refused {
        layer: String,
        entry: String,
        reason: String,
    },
    /// The layer goes over one of this server's limits.
    #[error(
        "image layer {layer}, entry {entry}: {reason}; the image is at fault (too big for this server's image limits), so it is refused"
    )]
    Limit {
        layer: String,
        entry: String,
        reason: String,
    },
    /// A filesystem operation failed for a reason that is not the image's
    /// (no space, too many open files, an I/O error reading the blob...).
    #[error("image layer {layer}, entry {entry}: {op} failed on the host: {source}")]
    Host {
        layer: String,
        entry: String,
        op: String,
        #[source]
        source: io::Error,
    },
}

/// A failure inside one layer, not yet tied to the layer's and entry's names.
#[derive(Debug)]
pub(super) enum Fault {
    /// The archive breaks a rule; the text says which.
    Image(String),
    /// The archive goes over a limit; the text says which.
    Limit(String),
    /// A host operation failed.
    Host { op: String, source: io::Error },
    /// Reading the archive failed; `stream.rs` decides whose fault that is.
    Read(io::Error),
}

impl Fault {
    /// A host failure of `op` with `errno`.
    pub(super) fn host(op: impl Into<String>, errno: Errno) -> Fault {
        Fault::Host {
            op: op.into(),
            source: io::Error::from(errno),
        }
    }

    /// Puts `what` in front of an `Image` reason (other faults unchanged).
    pub(super) fn about(self, what: &str) -> Fault {
        match self {
            Fault::Image(reason) => Fault::Image(format!("{what}: {reason}")),
            other => other,
        }
    }

    /// The public error, naming the layer and the entry (already quoted for
    /// display). `Read` faults must have been classified before.
    pub(super) fn into_error(self, layer: &str, entry: &str) -> UnpackError {
        let (layer, entry) = (layer.to_string(), entry.to_string());
        match self {
            Fault::Image(reason) => UnpackError::Refused {
                layer,
                entry,
                reason,
            },
            Fault::Limit(reason) => UnpackError::Limit {
                layer,
                entry,
                reason,
            },
            Fault::Host { op, source } => UnpackError::Host {
                layer,
                entry,
                op,
                source,
            },
            Fault::Read(source) => UnpackError::Refused {
                layer,
                entry,
                reason: format!("the archive cannot be read: {source}"),
            },
        }
    }
}

/// How an entry path (hostile bytes) is shown in messages: quoted, escaped,
/// and cut short when long.
pub(super) fn shown(path: &[u8]) -> String {
    const MAX: usize = 200;
    let text = String::from_utf8_lossy(path);
    if text.chars().count() > MAX {
        let cut: String = text.chars().take(MAX).collect();
        format!("{cut:?}... ({} bytes)", path.len())
    } else {
        format!("{text:?}")
    }
}
