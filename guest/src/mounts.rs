//! The sandbox's volumes: the host directories shared into the VM over
//! virtio-9p (`Setup.mounts`). Checks each request again in the guest
//! (absolute, normalised path outside `/`, `/proc`, `/sys`, `/dev` and
//! `/.sandbox`; tag of 1-31 `[a-z0-9]`), creates the mount point, mounts
//! the share (nosuid, nodev; read-only on request) and, for a writable
//! volume of a sandbox that runs as a non-root user, hands the volume's root
//! to that user. The filesystem root is a parameter so the mount-point code
//! can be tested against a temporary directory.

use std::fs::{self, DirBuilder};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Component, Path, PathBuf};

use nix::fcntl::{OFlag, OpenHow, ResolveFlag};

use moat_proto::agent::Mount;
use nix::mount::{mount, MsFlags};

use crate::error::{AgentError, Context, Result};
use crate::log::log;
use crate::user::Identity;

/// Filesystem type of the shares.
pub const FSTYPE: &str = "9p";
/// Longest tag QEMU accepts for a 9p `mount_tag`.
pub const MAX_TAG: usize = 31;
/// Longest accepted mount path, in bytes (PATH_MAX less the NUL).
pub const MAX_PATH: usize = 4095;
/// Guest trees a volume must never cover (nor anything below them).
pub const FORBIDDEN: [&str; 4] = ["/proc", "/sys", "/dev", "/.sandbox"];

/// Mount options of every share: virtio transport, the 9P2000.L dialect
/// (Linux semantics), 500 kB messages, and permission checks done by the
/// guest kernel (`access=client`), which with the host's
/// `security_model=mapped-xattr` keeps the guest's owners and modes.
pub fn options() -> &'static str {
    "trans=virtio,version=9p2000.L,msize=512000,access=client"
}

/// Mount flags for a share.
pub fn flags(read_only: bool) -> MsFlags {
    let base = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    if read_only {
        base | MsFlags::MS_RDONLY
    } else {
        base
    }
}

/// How error messages name a mount.
fn describe(m: &Mount) -> String {
    format!("volume {:?} at {:?}", m.tag, m.path)
}

fn bad(m: &Mount, reason: impl std::fmt::Display) -> AgentError {
    AgentError::BadRequest(format!("setup: {}: {reason}", describe(m)))
}

/// Why `tag` is not a valid 9p tag, if it is not.
pub fn tag_problem(tag: &str) -> Option<String> {
    if tag.is_empty() || tag.len() > MAX_TAG {
        return Some(format!("the tag must be 1-{MAX_TAG} characters"));
    }
    if !tag
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        return Some("the tag may only hold lowercase letters and digits".into());
    }
    None
}

/// Why `path` is not an acceptable mount point, if it is not: it must be
/// absolute and normalised (no empty, `.` or `..` component, no trailing
/// `/`), not `/`, and not one of [`FORBIDDEN`] or below one.
pub fn path_problem(path: &str) -> Option<String> {
    if path.contains('\0') {
        return Some("the path contains a NUL".into());
    }
    if path.len() > MAX_PATH {
        return Some(format!("the path is over {MAX_PATH} bytes"));
    }
    let Some(rest) = path.strip_prefix('/') else {
        return Some("the path is not absolute".into());
    };
    if rest.is_empty() {
        return Some("a volume cannot be mounted on /".into());
    }
    if rest
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Some("the path is not normalised (empty, '.' or '..' component)".into());
    }
    FORBIDDEN
        .iter()
        .find(|f| path == **f || path.strip_prefix(**f).is_some_and(|r| r.starts_with('/')))
        .map(|f| format!("a volume cannot be mounted on or under {f}"))
}

/// Checks one mount request.
pub fn check(m: &Mount) -> Result<()> {
    if let Some(reason) = tag_problem(&m.tag) {
        return Err(bad(m, reason));
    }
    if let Some(reason) = path_problem(&m.path) {
        return Err(bad(m, reason));
    }
    Ok(())
}

/// Checks every mount request; two volumes on the same path are refused
/// too (the second would hide the first).
pub fn check_all(mounts: &[Mount]) -> Result<()> {
    for (i, m) in mounts.iter().enumerate() {
        check(m)?;
        if mounts[..i].iter().any(|o| o.path == m.path) {
            return Err(bad(m, "another volume is mounted on the same path"));
        }
    }
    Ok(())
}

/// Whether mounting `mounts` for `user` needs the user's identity (some
/// volume is writable and the user is not the default).
pub fn needs_owner(mounts: &[Mount], user: &str) -> bool {
    !user.is_empty() && mounts.iter().any(|m| !m.read_only)
}

/// Creates the mount point of `m` under `root` (`mkdir -p`, mode 0755) and
/// returns it with every symlink resolved, after checking that the resolved
/// path is still acceptable (a symlink in the image cannot redirect a volume
/// onto `/proc` or `/.sandbox`) and is a directory.
pub fn mount_point(root: &Path, m: &Mount) -> Result<PathBuf> {
    let what = || format!("setup: {}: create the mount point", describe(m));
    let target = root.join(m.path.trim_start_matches('/'));
    DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(&target)
        .ctx(what)?;
    let real_root = fs::canonicalize(root).ctx(|| format!("resolve {}", root.display()))?;
    let real = fs::canonicalize(&target).ctx(what)?;
    let inside = real
        .strip_prefix(&real_root)
        .map_err(|_| bad(m, "the path resolves outside the root filesystem"))?;
    let mut resolved = String::new();
    for c in inside.components() {
        match c {
            Component::Normal(name) => {
                let name = name
                    .to_str()
                    .ok_or_else(|| bad(m, "the resolved path is not UTF-8"))?;
                resolved.push('/');
                resolved.push_str(name);
            }
            _ => return Err(bad(m, "the resolved path is not normalised")),
        }
    }
    if resolved.is_empty() {
        resolved.push('/');
    }
    if resolved != m.path {
        if let Some(reason) = path_problem(&resolved) {
            return Err(bad(
                m,
                format!("the path resolves to {resolved:?}: {reason}"),
            ));
        }
    }
    let meta = fs::metadata(&real).ctx(what)?;
    if !meta.is_dir() {
        return Err(bad(m, "the path exists and is not a directory"));
    }
    Ok(real)
}

/// Opens the checked mount point `real` again without following any
/// symlink (`openat2`, `RESOLVE_NO_SYMLINKS`): if something swapped a
/// component for a link since the check (a peer sharing a parent volume),
/// this fails instead of mounting elsewhere. `flags` adds to
/// `O_DIRECTORY | O_CLOEXEC`.
fn pin(m: &Mount, real: &Path, flags: OFlag) -> Result<OwnedFd> {
    let how = OpenHow::new()
        .flags(OFlag::O_DIRECTORY | OFlag::O_CLOEXEC | flags)
        .resolve(ResolveFlag::RESOLVE_NO_SYMLINKS | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    nix::fcntl::openat2(nix::fcntl::AT_FDCWD, real, how)
        .map_err(|e| bad(m, format!("the mount point changed under us ({e})")))
}

/// The fd's magic link, to mount onto exactly the pinned directory.
fn fd_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// Mounts one volume under `root` and, when `owner` is given and the
/// volume is writable, gives its root directory to `owner`.
pub fn mount_one(
    root: &Path,
    m: &Mount,
    owner: Option<&Identity>,
    shares: &mut Vec<String>,
) -> Result<()> {
    check(m)?;
    let target = mount_point(root, m)?;
    let pinned = pin(m, &target, OFlag::O_PATH)?;
    let at = fd_path(&pinned);
    if m.subdir.is_empty() {
        mount(
            Some(m.tag.as_str()),
            &at,
            Some(FSTYPE),
            flags(m.read_only),
            Some(options()),
        )
        .ctx(|| format!("setup: {}: mount 9p", describe(m)))?;
    } else {
        if m.subdir.len() > 4 || !m.subdir.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad(m, "the share's subdirectory must be 1-4 digits"));
        }
        let share = root.join(SHARES).join(&m.tag);
        if !shares.contains(&m.tag) {
            DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&share)
                .ctx(|| format!("setup: {}: create the share's mount point", describe(m)))?;
            let share_dir = pin(m, &share, OFlag::O_PATH)?;
            mount(
                Some(m.tag.as_str()),
                &fd_path(&share_dir),
                Some(FSTYPE),
                flags(false),
                Some(options()),
            )
            .ctx(|| format!("setup: {}: mount 9p", describe(m)))?;
            shares.push(m.tag.clone());
        }
        let source = pin(m, &share.join(&m.subdir), OFlag::O_PATH)?;
        mount(
            Some(&fd_path(&source)),
            &at,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .ctx(|| format!("setup: {}: bind the volume", describe(m)))?;
        // The new mount is on top of the pinned directory: reach it by path,
        // again without following links.
        let mounted = pin(m, &target, OFlag::O_PATH)?;
        mount(
            None::<&str>,
            &fd_path(&mounted),
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | flags(m.read_only),
            None::<&str>,
        )
        .ctx(|| format!("setup: {}: set the volume's mount flags", describe(m)))?;
    }
    drop(pinned);
    if let (Some(id), false) = (owner, m.read_only) {
        let root_dir = pin(m, &target, OFlag::O_RDONLY)?;
        nix::unistd::fchown(
            &root_dir,
            Some(nix::unistd::Uid::from_raw(id.uid)),
            Some(nix::unistd::Gid::from_raw(id.gid)),
        )
        .ctx(|| {
            format!(
                "setup: {}: chown the volume to {}:{}",
                describe(m),
                id.uid,
                id.gid
            )
        })?;
    }
    log!(
        "mounted volume {} at {}{}",
        m.tag,
        target.display(),
        if m.read_only { " (read-only)" } else { "" }
    );
    Ok(())
}

/// Where shares holding several volumes are mounted (under the agent's
/// own directory, which no volume may cover).
const SHARES: &str = ".sandbox/volumes";

/// Mounts every volume under `root`, in order; stops at the first failure.
pub fn mount_all(root: &Path, mounts: &[Mount], owner: Option<&Identity>) -> Result<()> {
    check_all(mounts)?;
    let mut shares = Vec::new();
    for m in mounts {
        mount_one(root, m, owner, &mut shares)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    fn m(tag: &str, path: &str) -> Mount {
        Mount {
            tag: tag.into(),
            path: path.into(),
            read_only: false,
            subdir: String::new(),
        }
    }

    #[test]
    fn the_option_string_is_fixed() {
        assert_eq!(
            options(),
            "trans=virtio,version=9p2000.L,msize=512000,access=client"
        );
        assert_eq!(flags(false), MsFlags::MS_NOSUID | MsFlags::MS_NODEV);
        assert_eq!(
            flags(true),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_RDONLY
        );
    }

    #[test]
    fn tags_are_short_lowercase_alphanumerics() {
        for good in ["moat0", "a", "0", &"a".repeat(31)] {
            assert_eq!(tag_problem(good), None, "{good:?}");
        }
        for bad in [
            "",
            &"a".repeat(32),
            "Moat0",
            "moat-0",
            "moat 0",
            "mo\0at",
            "é",
        ] {
            assert!(tag_problem(bad).is_some(), "{bad:?}");
        }
    }

    #[test]
    fn paths_must_be_absolute_normalised_and_outside_the_system_trees() {
        for good in [
            "/data",
            "/home/app/work",
            "/procfs",
            "/devices",
            "/.sandboxes",
            "/a.b",
        ] {
            assert_eq!(path_problem(good), None, "{good:?}");
        }
        for bad in [
            "",
            "/",
            "data",
            "./data",
            "/data/",
            "//data",
            "/a//b",
            "/a/./b",
            "/a/../b",
            "/..",
            "/proc",
            "/proc/1",
            "/sys",
            "/sys/class",
            "/dev",
            "/dev/shm",
            "/.sandbox",
            "/.sandbox/scripts",
            "/a\0b",
        ] {
            assert!(path_problem(bad).is_some(), "{bad:?}");
        }
        assert!(path_problem(&format!("/{}", "a".repeat(MAX_PATH))).is_some());
    }

    #[test]
    fn errors_name_the_mount_and_the_reason() {
        let err = check(&m("moat0", "/proc/x")).expect_err("refused");
        let text = err.to_string();
        assert!(matches!(err, AgentError::BadRequest(_)), "{text}");
        assert!(text.contains("\"moat0\""), "{text}");
        assert!(text.contains("\"/proc/x\""), "{text}");
        assert!(text.contains("under /proc"), "{text}");
        let err = check(&m("Bad", "/data")).expect_err("refused");
        assert!(err.to_string().contains("lowercase"), "{err}");
    }

    #[test]
    fn duplicate_paths_are_refused() {
        check_all(&[m("moat0", "/a"), m("moat1", "/b")]).expect("fine");
        let err = check_all(&[m("moat0", "/a"), m("moat1", "/a")]).expect_err("dup");
        assert!(err.to_string().contains("same path"), "{err}");
    }

    #[test]
    fn owner_is_needed_only_for_writable_volumes_of_a_named_user() {
        let ro = Mount {
            read_only: true,
            ..m("moat0", "/a")
        };
        assert!(!needs_owner(&[m("moat0", "/a")], ""));
        assert!(!needs_owner(std::slice::from_ref(&ro), "app"));
        assert!(!needs_owner(&[], "app"));
        assert!(needs_owner(&[ro, m("moat1", "/b")], "app"));
    }

    #[test]
    fn mount_points_are_created_with_mode_0755() {
        let root = tempfile::tempdir().expect("tempdir");
        let real = mount_point(root.path(), &m("moat0", "/srv/data/x")).expect("created");
        let expected = fs::canonicalize(root.path())
            .expect("canonicalize")
            .join("srv/data/x");
        assert_eq!(real, expected);
        for dir in ["srv", "srv/data", "srv/data/x"] {
            let mode = fs::metadata(root.path().join(dir))
                .expect("stat")
                .permissions()
                .mode();
            // The umask may only take bits away.
            assert_eq!(mode & 0o7022, 0, "{dir}: {mode:o}");
            assert_eq!(mode & 0o700, 0o700, "{dir}: {mode:o}");
        }
        // An existing directory is fine too.
        mount_point(root.path(), &m("moat0", "/srv/data/x")).expect("exists");
    }

    #[test]
    fn symlinks_cannot_redirect_a_volume() {
        let base = tempfile::tempdir().expect("tempdir");
        let root = base.path().join("root");
        fs::create_dir_all(root.join(".sandbox/scripts")).expect("mkdir");
        fs::create_dir_all(root.join("real")).expect("mkdir");
        fs::create_dir_all(base.path().join("outside")).expect("mkdir");
        symlink("../outside", root.join("out")).expect("symlink");
        symlink(".sandbox", root.join("evil")).expect("symlink");
        symlink(&root, root.join("top")).expect("symlink");
        symlink("real", root.join("fine")).expect("symlink");
        let err = mount_point(&root, &m("moat0", "/out/x")).expect_err("outside");
        assert!(err.to_string().contains("outside the root"), "{err}");
        let err = mount_point(&root, &m("moat0", "/evil/x")).expect_err("sandbox");
        assert!(err.to_string().contains("\"/.sandbox/x\""), "{err}");
        let err = mount_point(&root, &m("moat0", "/top")).expect_err("root");
        assert!(err.to_string().contains("on /"), "{err}");
        let real = mount_point(&root, &m("moat0", "/fine")).expect("fine");
        assert!(real.ends_with("real"), "{}", real.display());
    }

    #[test]
    fn a_file_is_not_a_mount_point() {
        let root = tempfile::tempdir().expect("tempdir");
        fs::write(root.path().join("file"), "x").expect("write");
        let err = mount_point(root.path(), &m("moat0", "/file")).expect_err("file");
        // mkdir -p fails on the existing file first.
        assert!(err.to_string().contains("/file"), "{err}");
    }
}
