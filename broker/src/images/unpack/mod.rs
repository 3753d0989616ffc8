//! The OCI layer unpacker: applies image layers (tar streams, plain, gzip or
//! zstd) one after another onto a directory with the OCI image-spec rules,
//! as containerd lays an image out: later entries replace earlier ones,
//! `.wh.NAME` whiteouts remove, `.wh..wh..opq` makes a directory opaque.
//!
//! Every byte of a layer is hostile and the broker is root, so:
//! - all filesystem work is relative to an fd of the root: parents are
//!   resolved with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
//!   RESOLVE_NO_MAGICLINKS)` and the last component is only touched with
//!   `*at` calls that do not follow it. A symbolic link the image planted is
//!   never followed on the host, and an entry whose parent is one is refused,
//!   even when the link points inside the image (the strict rule);
//! - absolute paths, `..`, device nodes, unknown entry types, malformed
//!   headers and hard links to anything but a regular file already in the
//!   tree are refused, naming the layer and the entry (`UnpackError`);
//! - sizes are capped (`UnpackLimits`): the bytes of the decompressed tar
//!   streams (headers and padding included, so a bomb of zeros or of empty
//!   headers stops at the limit), each file, the number of entries; extension
//!   headers are buffered only up to small caps.
//!
//! Owners are set only when the process is root (checked once, in
//! `Unpacker::new`); otherwise (unit tests) `chown` is skipped. Directory
//! modes are set at once; a non-root process gets through read-only
//! directories by opening them up for one operation (`fsops.rs`). Every
//! change inside a directory puts its times back, so directories keep the
//! mtime their entries give them. The root's own metadata is never changed
//! (an entry for `.` is ignored): it stays as private as the caller made it,
//! since the tree holds the image's setuid files. When a layer fails, the
//! caller throws the whole root away; the `Unpacker` refuses further layers.
//!
//! Files:
//! - `mod.rs`: the public API and the `Unpacker`;
//! - `error.rs`: `UnpackError`, and `Fault` (a failure before it is named);
//! - `stream.rs`: decompression, the byte count, blame for read errors;
//! - `layer.rs`: one layer, header by header, with the limits;
//! - `member.rs` (with `pax.rs`): raw headers to a `Member` (path, kind, metadata);
//! - `path.rs`: entry path checks;
//! - `apply.rs`: one member onto the tree (replacement rules, hard links);
//! - `whiteout.rs`: whiteouts and opaque directories;
//! - `fsops.rs`: the fd-relative filesystem operations;
//! - `dirents.rs`: listing a directory by fd (`getdents64`);
//! - `xattrs.rs`: extended attributes from PAX records.

mod apply;
mod dirents;
mod error;
mod fsops;
mod layer;
mod member;
mod path;
mod pax;
mod stream;
mod whiteout;
mod xattrs;

#[cfg(test)]
mod tests;

use std::io::Read;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

pub use error::UnpackError;
use fsops::Fs;

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// Recognises gzip and zstd by their magic bytes; anything else is taken
    /// as an uncompressed tar.
    pub fn detect(first_bytes: &[u8]) -> Compression {
        if first_bytes.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if first_bytes.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }
}

/// Caps on what the layers of one image may unpack to (totals across layers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnpackLimits {
    /// Bytes of the decompressed tar streams (headers and padding included).
    pub max_total_bytes: u64,
    /// Bytes of one regular file.
    pub max_file_bytes: u64,
    /// Archive members (extension headers belong to their member).
    pub max_entries: u64,
}

impl Default for UnpackLimits {
    fn default() -> Self {
        UnpackLimits {
            max_total_bytes: 8 << 30,
            max_file_bytes: 4 << 30,
            max_entries: 1_000_000,
        }
    }
}

/// What a layer (or all layers so far) amounted to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LayerStats {
    /// Archive members read (whiteouts and PAX global headers included).
    pub entries: u64,
    /// Bytes of the decompressed tar stream read.
    pub bytes: u64,
}

/// Applies the layers of one image, in order, onto one directory.
#[derive(Debug)]
pub struct Unpacker {
    fs: Fs,
    root: PathBuf,
    limits: UnpackLimits,
    totals: LayerStats,
    /// A layer failed: the tree is half-made, so no further layer goes on it.
    failed: bool,
}

impl Unpacker {
    /// `root` must be an existing, empty directory (the caller makes it,
    /// private, 0700 root-owned).
    pub fn new(root: &Path, limits: UnpackLimits) -> Result<Self, UnpackError> {
        let err = |reason: String| UnpackError::Root {
            root: root.to_path_buf(),
            reason,
        };
        let fd = nix::fcntl::open(
            root,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| err(format!("it cannot be opened as a directory: {e}")))?;
        let names =
            dirents::names(fd.as_fd()).map_err(|e| err(format!("it cannot be listed: {e}")))?;
        if !names.is_empty() {
            return Err(err(format!(
                "it is not empty ({} entries); layers go into a fresh directory",
                names.len()
            )));
        }
        Ok(Unpacker {
            fs: Fs::new(fd, nix::unistd::geteuid().is_root()),
            root: root.to_path_buf(),
            limits,
            totals: LayerStats::default(),
            failed: false,
        })
    }

    /// Applies one layer (a tar stream, compressed as given) on top of what
    /// earlier calls applied.
    pub fn apply_layer<R: Read>(
        &mut self,
        layer: R,
        compression: Compression,
        layer_name: &str,
    ) -> Result<LayerStats, UnpackError> {
        if self.failed {
            return Err(UnpackError::Root {
                root: self.root.clone(),
                reason: format!(
                    "an earlier layer failed, so layer {layer_name} cannot go on top; start again in a fresh directory"
                ),
            });
        }
        self.failed = true;
        let stats = layer::apply(
            &self.fs,
            &self.limits,
            self.totals,
            layer,
            compression,
            layer_name,
        )?;
        self.failed = false;
        self.totals.entries += stats.entries;
        self.totals.bytes += stats.bytes;
        Ok(stats)
    }

    /// Totals so far (limits are on the totals across all layers).
    pub fn totals(&self) -> LayerStats {
        self.totals
    }
}
