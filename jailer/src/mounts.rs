//! The jail's root: a fresh tmpfs holding only what the VMM needs —
//! read-only binds of the host's `/usr` (and the merged-/usr symlinks), the
//! files and directories the spec names, a few device nodes (on a read-only
//! `/dev` tmpfs of their own: the root is nodev) and a `/proc`
//! for the new PID namespace — then `pivot_root` into it, the old root
//! detached and the new root made read-only.

use std::fs;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::stat::{makedev, mknod, Mode, SFlag};

use crate::error::JailError;
use crate::spec::{Bind, FdBind, JailSpec, DEVICES};

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

// From <linux/mount.h> and <fcntl.h>.
const OPEN_TREE_CLONE: libc::c_uint = 1;
const AT_EMPTY_PATH: libc::c_uint = 0x1000;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
const AT_RECURSIVE: libc::c_uint = 0x8000;
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;
const MOUNT_ATTR_NOEXEC: u64 = 0x8;
const MS_PRIVATE: u64 = 1 << 18;

/// `struct mount_attr` of <linux/mount.h>.
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// Before the new mount namespace exists: turns each volume fd the broker
/// passed into a detached copy of its mount (`open_tree(OPEN_TREE_CLONE)`),
/// which — unlike the fd's own mount, which belongs to the host's namespace —
/// can be attached inside the jail. The broker's fds are closed.
pub fn detach_volumes(spec: &JailSpec) -> Result<Vec<(OwnedFd, FdBind)>, JailError> {
    let mut out = Vec::with_capacity(spec.fd_binds.len());
    for b in &spec.fd_binds {
        // SAFETY: open_tree with an fd this process owns, an empty C string
        // and integer flags; it returns a new fd or -1.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_open_tree,
                b.fd,
                c"".as_ptr(),
                OPEN_TREE_CLONE | AT_EMPTY_PATH | libc::O_CLOEXEC as libc::c_uint,
            )
        };
        if fd < 0 {
            return Err(JailError::step("clone a volume's mount")(
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: open_tree returned a new fd that nothing else owns.
        let tree = unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) };
        // SAFETY: closing the broker's fd number, used by nothing else now.
        unsafe { libc::close(b.fd) };
        out.push((tree, b.clone()));
    }
    Ok(out)
}

/// Attaches a detached volume mount at its place in the jail root and
/// applies the bind flags (read-only unless writable; never suid, dev or
/// exec). The volume was resolved by the broker beneath its root; the jail
/// never looks it up by path.
fn attach_volume(root: &Path, tree: OwnedFd, b: FdBind) -> Result<(), JailError> {
    // On the detached tree, recursively and before it is attached: private
    // propagation (mounts the host makes later under the directory never
    // appear in the jail) and the flags (read-only for `:ro`).
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_NOSUID
            | MOUNT_ATTR_NODEV
            | MOUNT_ATTR_NOEXEC
            | if b.writable { 0 } else { MOUNT_ATTR_RDONLY },
        attr_clr: 0,
        propagation: MS_PRIVATE,
        userns_fd: 0,
    };
    // SAFETY: mount_setattr on a detached-tree fd we own, an empty C string,
    // and a pointer to a live `mount_attr` of the size passed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            AT_EMPTY_PATH | AT_RECURSIVE,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if r < 0 {
        return Err(JailError::step("set a volume's mount attributes")(
            std::io::Error::last_os_error(),
        ));
    }
    let target = inside(root, &b.dst);
    fs::create_dir_all(&target).map_err(JailError::step("create a volume mount point"))?;
    let c_target = std::ffi::CString::new(target.as_os_str().as_encoded_bytes())
        .map_err(|_| JailError::Spec("volume target contains NUL".into()))?;
    // SAFETY: move_mount from a detached-tree fd we own to a NUL-terminated
    // absolute path; integer flags.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            c_target.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if r < 0 {
        return Err(JailError::step("attach a volume")(
            std::io::Error::last_os_error(),
        ));
    }
    drop(tree);
    let mut flags = MsFlags::MS_BIND
        | MsFlags::MS_REMOUNT
        | MsFlags::MS_NOSUID
        | MsFlags::MS_NODEV
        | MsFlags::MS_NOEXEC;
    if !b.writable {
        flags |= MsFlags::MS_RDONLY;
    }
    mount(NONE, &target, NONE, flags, NONE).map_err(JailError::errno("remount a volume"))?;
    Ok(())
}

pub fn enter_root(spec: &JailSpec, volumes: Vec<(OwnedFd, FdBind)>) -> Result<(), JailError> {
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
    for (tree, b) in volumes {
        attach_volume(root, tree, b)?;
    }
    // /dev is a tmpfs of its own: the root is mounted nodev, which would
    // make every device node in it unusable (EACCES on /dev/kvm). It holds
    // only the nodes named by --dev and is made read-only once they exist.
    let dev = root.join("dev");
    fs::create_dir_all(&dev).map_err(JailError::step("create /dev"))?;
    mount(
        Some("tmpfs"),
        &dev,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("mode=0755,size=16k,nr_inodes=16"),
    )
    .map_err(JailError::errno("mount /dev"))?;
    for name in &spec.devices {
        if let Some((_, major, minor)) = DEVICES.iter().find(|(n, _, _)| n == name) {
            mknod(
                &dev.join(name),
                SFlag::S_IFCHR,
                Mode::from_bits_truncate(0o666),
                makedev(*major, *minor),
            )
            .map_err(JailError::errno("create a device node"))?;
            // Explicitly, not through the umask: every jailed uid uses them.
            fs::set_permissions(dev.join(name), fs::Permissions::from_mode(0o666))
                .map_err(JailError::step("set a device node's mode"))?;
        }
    }
    mount(
        NONE,
        &dev,
        NONE,
        MsFlags::MS_BIND
            | MsFlags::MS_REMOUNT
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NOEXEC,
        NONE,
    )
    .map_err(JailError::errno("make /dev read-only"))?;
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
