//! Per-sandbox writable disks: a sparse file formatted as ext4 by `mkfs.ext4`
//! on the host (formatting never mounts anything). The host never mounts a
//! filesystem a guest has written to; the file is deleted when the sandbox
//! stops. Its size is the sandbox's disk quota.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Bandwidth and operation-rate caps on a sandbox's disks, each per second
/// and per direction; 0 means no cap. Enforced twice: by the VMM's block
/// throttling (every guest I/O) and by the cgroup's I/O controller on the
/// host devices holding the disk files (where the host has one).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiskIo {
    pub read_bps: u64,
    pub write_bps: u64,
    pub read_iops: u64,
    pub write_iops: u64,
}

impl DiskIo {
    pub fn is_unlimited(&self) -> bool {
        *self == Self::default()
    }
}

/// Errors creating a writable disk.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cannot create writable disk {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("mkfs.ext4 failed for {path}: {detail}")]
    Mkfs { path: PathBuf, detail: String },
}

/// Creates `path` (must not exist) as an empty ext4 filesystem of `size_mib`
/// MiB, owned by `uid:gid`, mode 0600.
pub async fn create_writable_disk(
    path: &Path,
    size_mib: u32,
    uid: u32,
    gid: u32,
) -> Result<(), DiskError> {
    let create_err = |source| DiskError::Create {
        path: path.to_owned(),
        source,
    };
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(create_err)?;
    file.set_len(u64::from(size_mib) << 20)
        .map_err(create_err)?;
    std::os::unix::fs::fchown(&file, Some(uid), Some(gid)).map_err(create_err)?;
    drop(file);
    let out = tokio::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-m", "0", "-L", "moat-rw"])
        .args([
            "-E",
            "lazy_itable_init=1,lazy_journal_init=1,root_owner=0:0,nodiscard",
        ])
        .arg(path)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| DiskError::Mkfs {
            path: path.to_owned(),
            detail: format!("cannot run mkfs.ext4 (install e2fsprogs): {e}"),
        })?;
    if !out.status.success() {
        return Err(DiskError::Mkfs {
            path: path.to_owned(),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn makes_a_sparse_ext4_file_and_refuses_existing_paths() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("rw.ext4");
        let me = nix::unistd::getuid().as_raw();
        let g = nix::unistd::getgid().as_raw();
        create_writable_disk(&p, 64, me, g).await.unwrap();
        let meta = std::fs::metadata(&p).unwrap();
        assert_eq!(meta.len(), 64 << 20);
        assert!(
            std::os::unix::fs::MetadataExt::blocks(&meta) * 512 < 16 << 20,
            "not sparse"
        );
        // ext4 superblock magic 0xEF53 at offset 1024 + 56.
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(&bytes[1080..1082], &[0x53, 0xEF]);
        assert!(create_writable_disk(&p, 64, me, g).await.is_err());
    }
}
