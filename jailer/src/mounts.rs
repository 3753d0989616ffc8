//! The jail's root: a fresh tmpfs holding only what the VMM needs —
//! read-only binds of the host's `/usr` (and the merged-/usr symlinks), the
//! files and directories the spec names, a few device nodes and a `/proc`
//! for the new PID namespace — then `pivot_root` into it, the old root
//! detached and the new root made read-only.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::stat::{makedev, mknod, Mode, SFlag};

use crate::error::JailError;
use crate::spec::{Bind, JailSpec, DEVICES};

const NONE: Option<&str> = None;

/// Host paths every VMM process gets read-only.
const SYSTEM_DIRS: [&str; 1] = ["/usr"];
/// Top-level names that are symlinks into /usr on merged-/usr hosts.
const USR_LINKS: [&str; 4] = ["/lib", "/lib64", "/bin", "/sbin"];

fn inside(root: &Path, p: &Path) -> PathBuf {
    root.join(p.strip_prefix("/").unwrap_or(p))
}

fn bind_mount(root: &Path, b: &Bind) -> Result<(), JailError> {
    let target = inside(root, &b.dst);
    let meta = fs::metadata(&b.src).map_err(JailError::step("stat a bind source"))?;
    if let Some(parent) = target.parent() {
        fs::create_dir_all(parent).map_err(JailError::step("create a bind target"))?;
    }
    if meta.is_dir() {
        fs::create_dir_all(&target).map_err(JailError::step("create a bind target"))?;
    } else {
        fs::write(&target, b"").map_err(JailError::step("create a bind target"))?;
    }
    mount(Some(&b.src), &target, NONE, MsFlags::MS_BIND, NONE)
        .map_err(JailError::errno("bind mount"))?;
    let mut flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    if !b.writable {
        flags |= MsFlags::MS_RDONLY;
    }
    if !meta.is_dir() || b.writable {
        flags |= MsFlags::MS_NOEXEC;
    }
    mount(NONE, &target, NONE, flags, NONE).map_err(JailError::errno("remount a bind"))?;
    Ok(())
}

pub fn enter_root(spec: &JailSpec) -> Result<(), JailError> {
    let root = &spec.root;
    // Nothing we mount propagates back to the host.
    mount(NONE, "/", NONE, MsFlags::MS_REC | MsFlags::MS_PRIVATE, NONE)
        .map_err(JailError::errno("make mounts private"))?;
    mount(
        Some("tmpfs"),
        root,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755,size=1m"),
    )
    .map_err(JailError::errno("mount the jail root"))?;

    for dir in SYSTEM_DIRS {
        bind_mount(
            root,
            &Bind {
                src: dir.into(),
                dst: dir.into(),
                writable: false,
            },
        )?;
    }
    for link in USR_LINKS {
        if let Ok(target) = fs::read_link(link) {
            symlink(&target, inside(root, Path::new(link)))
                .map_err(JailError::step("recreate /usr links"))?;
        }
    }
    for b in &spec.binds {
        bind_mount(root, b)?;
    }
    let dev = root.join("dev");
    fs::create_dir_all(&dev).map_err(JailError::step("create /dev"))?;
    for name in &spec.devices {
        if let Some((_, major, minor)) = DEVICES.iter().find(|(n, _, _)| n == name) {
            mknod(
                &dev.join(name),
                SFlag::S_IFCHR,
                Mode::from_bits_truncate(0o666),
                makedev(*major, *minor),
            )
            .map_err(JailError::errno("create a device node"))?;
        }
    }
    let proc_dir = root.join("proc");
    fs::create_dir_all(&proc_dir).map_err(JailError::step("create /proc"))?;
    mount(
        Some("proc"),
        &proc_dir,
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("hidepid=2"),
    )
    .map_err(JailError::errno("mount /proc"))?;

    let old = root.join(".old-root");
    fs::create_dir_all(&old).map_err(JailError::step("create the old-root mount point"))?;
    nix::unistd::pivot_root(root, &old).map_err(JailError::errno("pivot_root"))?;
    std::env::set_current_dir("/").map_err(JailError::step("chdir /"))?;
    umount2("/.old-root", MntFlags::MNT_DETACH).map_err(JailError::errno("detach the old root"))?;
    fs::remove_dir("/.old-root").map_err(JailError::step("remove the old-root mount point"))?;
    mount(
        NONE,
        "/",
        NONE,
        MsFlags::MS_BIND
            | MsFlags::MS_REMOUNT
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV,
        NONE,
    )
    .map_err(JailError::errno("make the jail root read-only"))?;
    Ok(())
}
