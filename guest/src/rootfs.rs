//! Building the sandbox's root filesystem and switching into it:
//! the early pseudo filesystems, the erofs image + ext4 writable disk under an
//! overlay, moving /dev /proc /sys across, and the final `switch_root`.

use std::fs::{self, OpenOptions};
use std::os::unix::fs::{symlink, MetadataExt};
use std::path::Path;

use nix::mount::{mount, MsFlags};
use nix::unistd::{chdir, chroot, dup2_stderr, dup2_stdin, dup2_stdout};

use crate::discover::Disks;
use crate::error::{AgentError, Context, Result};
use crate::initramfs;
use crate::log::log;

/// Where the read-only image is mounted.
pub const RO: &str = "/mnt/ro";
/// Where the writable disk is mounted.
pub const RW: &str = "/mnt/rw";
/// Where the overlay (the future `/`) is assembled.
pub const NEW_ROOT: &str = "/mnt/root";

const NONE: Option<&str> = None;

fn mkdir_p(path: &str) -> Result<()> {
    fs::create_dir_all(path).ctx(|| format!("create {path}"))
}

fn mount_fs(
    src: &str,
    target: &str,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<()> {
    mkdir_p(target)?;
    mount(Some(src), target, Some(fstype), flags, data)
        .ctx(|| format!("mount {fstype} {src} on {target}"))
}

/// Mounts /proc, /sys and /dev in the initramfs, and gives PID 1 a console
/// on fds 0-2 if the kernel could not (initramfs without /dev/console).
pub fn mount_early() -> Result<()> {
    let hard = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount_fs("proc", "/proc", "proc", hard, None)?;
    mount_fs("sysfs", "/sys", "sysfs", hard, None)?;
    mount_fs(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    )?;
    ensure_console();
    Ok(())
}

/// If fd 2 is closed, opens /dev/console onto fds 0, 1 and 2.
fn ensure_console() {
    if Path::new("/proc/self/fd/2").exists() {
        return;
    }
    let Ok(console) = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
    else {
        return;
    };
    // Failures leave the agent without a console, which it survives.
    let _ = dup2_stdin(&console);
    let _ = dup2_stdout(&console);
    let _ = dup2_stderr(&console);
    log!("no console on fds 0-2 at start; opened /dev/console");
}

/// Mounts the image (erofs, read-only) and the writable disk (ext4), and
/// assembles the overlay at [`NEW_ROOT`].
pub fn mount_root(disks: &Disks) -> Result<()> {
    let image = disks.image.to_string_lossy();
    let rw = disks.rw.to_string_lossy();
    mount_image(&image)?;
    mount_fs(&rw, RW, "ext4", MsFlags::MS_NOATIME, None)?;
    let upper = format!("{RW}/upper");
    let work = format!("{RW}/work");
    mkdir_p(&upper)?;
    mkdir_p(&work)?;
    let opts = format!("lowerdir={RO},upperdir={upper},workdir={work}");
    mount_fs(
        "overlay",
        NEW_ROOT,
        "overlay",
        MsFlags::empty(),
        Some(&opts),
    )
}

/// Mounts the image read-only: erofs (the normal case), else ext4 (`noload`:
/// never replay a journal on a read-only disk).
fn mount_image(image: &str) -> Result<()> {
    mkdir_p(RO)?;
    let erofs = mount(Some(image), RO, Some("erofs"), MsFlags::MS_RDONLY, NONE);
    let Err(erofs_err) = erofs else {
        return Ok(());
    };
    match mount(
        Some(image),
        RO,
        Some("ext4"),
        MsFlags::MS_RDONLY,
        Some("noload"),
    ) {
        Ok(()) => {
            log!("image {image} is not erofs ({erofs_err}); mounted it as ext4");
            Ok(())
        }
        Err(ext4_err) => Err(AgentError::Config(format!(
            "cannot mount the image disk {image} on {RO}: as erofs: {erofs_err}; \
             as ext4: {ext4_err}"
        ))),
    }
}

/// Moves /dev, /proc and /sys into the new root, adds /dev/pts, /dev/shm and
/// the /dev/fd links, frees the initramfs and makes [`NEW_ROOT`] the root.
pub fn switch_root() -> Result<()> {
    for dir in ["/dev", "/proc", "/sys"] {
        let target = format!("{NEW_ROOT}{dir}");
        mkdir_p(&target)?;
        mount(Some(dir), target.as_str(), NONE, MsFlags::MS_MOVE, NONE)
            .ctx(|| format!("move {dir} to {target}"))?;
    }
    let dev = format!("{NEW_ROOT}/dev");
    mount_fs(
        "devpts",
        &format!("{dev}/pts"),
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )?;
    mount_fs(
        "tmpfs",
        &format!("{dev}/shm"),
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )?;
    for (link, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        // devtmpfs does not create these; an existing entry is kept.
        let _ = symlink(target, format!("{dev}/{link}"));
    }

    free_initramfs();

    chdir(NEW_ROOT).ctx(|| format!("chdir {NEW_ROOT}"))?;
    mount(Some("."), "/", NONE, MsFlags::MS_MOVE, NONE).ctx(|| format!("move {NEW_ROOT} to /"))?;
    chroot(".").ctx(|| "chroot into the new root")?;
    chdir("/").ctx(|| "chdir / in the new root")
}

/// Deletes the initramfs's files (they sit in RAM), if `/` is one.
fn free_initramfs() {
    let root = Path::new("/");
    if !initramfs::is_initramfs(root) {
        log!("/ is not an initramfs; not freeing it");
        return;
    }
    match fs::symlink_metadata(root) {
        Ok(meta) => {
            let removed = initramfs::delete_contents(root, meta.dev());
            log!("freed the initramfs ({removed} entries)");
        }
        Err(e) => log!("cannot stat /, not freeing the initramfs: {e}"),
    }
}
