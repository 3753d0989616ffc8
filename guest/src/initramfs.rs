//! Freeing the initramfs before switching root, like busybox `switch_root`:
//! its files live in RAM and would otherwise stay there, unreachable, for the
//! VM's lifetime. Deletion never leaves the initramfs's own filesystem and
//! never follows symbolic links.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use nix::sys::statfs::{statfs, FsType, TMPFS_MAGIC};

/// `RAMFS_MAGIC` from `<linux/magic.h>` (not exported by libc).
const RAMFS_MAGIC: FsType = FsType(0x8584_58f6);

/// Whether `root` is an initramfs (ramfs or tmpfs), i.e. safe to empty.
pub fn is_initramfs(root: &Path) -> bool {
    match statfs(root) {
        Ok(st) => {
            let kind = st.filesystem_type();
            kind == RAMFS_MAGIC || kind == TMPFS_MAGIC
        }
        Err(_) => false,
    }
}

/// Deletes everything under `dir` that is on the device `dev`, skipping (and
/// not descending into) anything on another filesystem, e.g. mount points.
/// Best effort: entries that cannot be removed are left. Returns how many
/// entries were removed.
pub fn delete_contents(dir: &Path, dev: u64) -> usize {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        // `symlink_metadata` does not follow links: a link is removed, never
        // its target.
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.dev() != dev {
            continue;
        }
        if meta.is_dir() {
            removed += delete_contents(&path, dev);
            if fs::remove_dir(&path).is_ok() {
                removed += 1;
            }
        } else if fs::remove_file(&path).is_ok() {
            removed += 1;
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deletes_tree_but_not_symlink_targets() {
        let root = tempfile::tempdir().expect("tempdir");
        let outside = tempfile::tempdir().expect("tempdir");
        let precious = outside.path().join("precious");
        fs::write(&precious, b"keep me").expect("write");
        let r = root.path();
        fs::write(r.join("init"), b"binary").expect("write");
        fs::create_dir_all(r.join("a/b/c")).expect("mkdir");
        fs::write(r.join("a/b/c/file"), b"x").expect("write");
        std::os::unix::fs::symlink(&precious, r.join("a/link")).expect("symlink");
        std::os::unix::fs::symlink(outside.path(), r.join("dirlink")).expect("symlink");

        let dev = fs::metadata(r).expect("stat").dev();
        // init, a, a/b, a/b/c, a/b/c/file, a/link, dirlink
        assert_eq!(delete_contents(r, dev), 7);
        assert_eq!(fs::read_dir(r).expect("list").count(), 0);
        assert_eq!(fs::read(&precious).expect("still there"), b"keep me");
    }

    #[test]
    fn other_devices_are_left_alone() {
        let root = tempfile::tempdir().expect("tempdir");
        fs::write(root.path().join("file"), b"x").expect("write");
        fs::create_dir(root.path().join("dir")).expect("mkdir");
        let dev = fs::metadata(root.path()).expect("stat").dev();
        assert_eq!(delete_contents(root.path(), dev.wrapping_add(1)), 0);
        assert!(root.path().join("file").exists());
        assert!(root.path().join("dir").exists());
    }

    #[test]
    fn proc_and_missing_paths_are_not_an_initramfs() {
        assert!(!is_initramfs(Path::new("/proc")));
        assert!(!is_initramfs(Path::new("/nonexistent/moat")));
    }
}
