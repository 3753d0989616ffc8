//! Boot disks: an image's layers applied in order (by the unpacker, into a
//! private staging tree) and packed with `mkfs.erofs` into the read-only
//! disk every sandbox of that image boots from. Built once per platform
//! manifest digest, shared, never copied per sandbox; a second builder
//! (thread or process) waits on the work lock and finds the disk done.

use std::fs::{self, File};
use std::io::{BufReader, Read};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use super::digest::{Digest, HashingReader};
use super::error::ImageError;
use super::manifest::LayerRef;
use super::store::Store;
use super::unpack::{Compression, UnpackLimits, Unpacker};

/// Figures from one build, for logs and the benchmark.
#[derive(Debug, Clone, Copy, Default)]
pub struct BuildStats {
    /// Uncompressed tar bytes applied.
    pub bytes: u64,
    pub entries: u64,
    pub unpack_ms: u64,
    pub mkfs_ms: u64,
}

/// Returns the boot disk of `manifest`, building it from the stored layers
/// if it does not exist yet. Blocking (run it on a blocking thread).
pub fn ensure_disk(
    store: &Store,
    image: &str,
    manifest: &Digest,
    layers: &[LayerRef],
    diff_ids: &[Digest],
    limits: &UnpackLimits,
) -> Result<(PathBuf, Option<BuildStats>), ImageError> {
    let disk = store.disk_path(manifest);
    if disk.is_file() {
        return Ok((disk, None));
    }
    let _work = store.lock_work(&format!("disk-{}", manifest.hex()))?;
    if disk.is_file() {
        return Ok((disk, None));
    }
    let stats = build(store, image, manifest, layers, diff_ids, limits)?;
    Ok((disk, Some(stats)))
}

fn build(
    store: &Store,
    image: &str,
    manifest: &Digest,
    layers: &[LayerRef],
    diff_ids: &[Digest],
    limits: &UnpackLimits,
) -> Result<BuildStats, ImageError> {
    let bad = |reason: String| ImageError::BootDisk {
        image: image.to_owned(),
        reason,
    };
    let staging = store.staging_dir()?;
    let rootfs = staging.path().join("rootfs");
    fs::DirBuilder::new()
        .mode(0o755)
        .create(&rootfs)
        .map_err(|e| ImageError::store(&rootfs, e))?;
    let started = Instant::now();
    let mut unpacker =
        Unpacker::new(&rootfs, limits.clone()).map_err(|error| ImageError::Unpack {
            image: image.to_owned(),
            error,
        })?;
    if diff_ids.len() != layers.len() {
        return Err(ImageError::Invalid {
            image: image.to_owned(),
            reason: format!(
                "the config lists {} uncompressed layer digests (rootfs.diff_ids) for {} layers",
                diff_ids.len(),
                layers.len()
            ),
        });
    }
    for (i, layer) in layers.iter().enumerate() {
        let path = store.blob_path(&layer.digest);
        let file = File::open(&path).map_err(|e| ImageError::store(&path, e))?;
        let raw = BufReader::with_capacity(1 << 20, file);
        let name = format!("{} ({}/{})", layer.digest.short(), i + 1, layers.len());
        let decompressed: Box<dyn Read> = match layer.compression {
            Compression::None => Box::new(raw),
            Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(raw)),
            Compression::Zstd => {
                Box::new(zstd::stream::read::Decoder::with_buffer(raw).map_err(|e| {
                    ImageError::Layer {
                        image: image.to_owned(),
                        layer: layer.digest.to_string(),
                        reason: format!("zstd: {e}"),
                    }
                })?)
            }
        };
        let mut hashing = HashingReader::new(decompressed);
        unpacker
            .apply_layer(&mut hashing, Compression::None, &name)
            .map_err(|error| ImageError::Unpack {
                image: image.to_owned(),
                error,
            })?;
        // Whatever the tar reader left unread still counts for the digest.
        std::io::copy(&mut hashing, &mut std::io::sink()).map_err(|e| ImageError::Layer {
            image: image.to_owned(),
            layer: layer.digest.to_string(),
            reason: format!("reading past the end of the archive: {e}"),
        })?;
        let (diff_id, _) = hashing.finish();
        if diff_id != diff_ids[i] {
            return Err(ImageError::Layer {
                image: image.to_owned(),
                layer: layer.digest.to_string(),
                reason: format!(
                    "uncompressed content has digest {diff_id}, but the image config says {}",
                    diff_ids[i]
                ),
            });
        }
    }
    let totals = unpacker.totals();
    let unpack_ms = started.elapsed().as_millis() as u64;
    let mkfs_started = Instant::now();
    let out = staging.path().join("disk.erofs");
    let run = Command::new("mkfs.erofs")
        .arg("--quiet")
        .arg(&out)
        .arg(&rootfs)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .output()
        .map_err(|e| bad(format!("cannot run mkfs.erofs (install erofs-utils): {e}")))?;
    if !run.status.success() {
        return Err(bad(format!(
            "mkfs.erofs failed: {}",
            String::from_utf8_lossy(&run.stderr).trim()
        )));
    }
    let mkfs_ms = mkfs_started.elapsed().as_millis() as u64;
    let disk = store.disk_path(manifest);
    fs::set_permissions(&out, fs::Permissions::from_mode(0o644))
        .and_then(|_| File::open(&out)?.sync_all())
        .and_then(|_| fs::rename(&out, &disk))
        .map_err(|e| ImageError::store(&disk, e))?;
    if let Some(dir) = disk.parent() {
        let _ = File::open(dir).and_then(|f| f.sync_all());
    }
    let stats = BuildStats {
        bytes: totals.bytes,
        entries: totals.entries,
        unpack_ms,
        mkfs_ms,
    };
    tracing::info!(image, manifest = %manifest.short(), bytes = stats.bytes, entries = stats.entries,
        unpack_ms, mkfs_ms, "boot disk built");
    Ok(stats)
}
