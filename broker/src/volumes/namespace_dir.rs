//! Creates what a namespace's relative volumes need before they are
//! resolved: the namespace's own directory under `volumes.dir` and a missing
//! top-level volume directory in it (`data` of `data:/data`), each owned by
//! the volume owner, mode 0700. Every step works on directory fds with
//! `O_NOFOLLOW`; deeper paths are never created (the caller makes them).

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Component, Path};

use nix::errno::Errno;
use nix::fcntl::{openat, OFlag};
use nix::sys::stat::{mkdirat, Mode};

use super::{parse_volume, VolumeError};
use crate::config::VolumesConfig;

fn open_dir(parent: &impl AsFd, name: &Path) -> nix::Result<OwnedFd> {
    openat(
        parent,
        name,
        OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_RDONLY,
        Mode::empty(),
    )
}

/// `mkdirat` + `fchown` when the directory is new; an existing entry is
/// left alone (resolution checks it later).
fn make_owned(parent: &impl AsFd, name: &Path, cfg: &VolumesConfig) -> nix::Result<()> {
    match mkdirat(parent, name, Mode::from_bits_truncate(0o700)) {
        Ok(()) => {
            let fd = open_dir(parent, name)?;
            nix::unistd::fchown(
                &fd,
                Some(nix::unistd::Uid::from_raw(cfg.owner_uid)),
                Some(nix::unistd::Gid::from_raw(cfg.owner_gid)),
            )
        }
        Err(Errno::EEXIST) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Prepares `namespace`'s volume directory for `volumes` (the config's
/// strings; absolute ones are skipped).
pub fn prepare_namespace_dir(
    cfg: &VolumesConfig,
    namespace: &str,
    volumes: &[String],
) -> Result<(), VolumeError> {
    let fail = |v: &str, what: String| VolumeError::new(v, what);
    let first = volumes.first().map(String::as_str).unwrap_or_default();
    // Nothing is created for a request the spec check would refuse anyway.
    if volumes.len() > cfg.max_volumes as usize {
        return Err(fail(
            first,
            format!(
                "{} volumes given; the limit is {}",
                volumes.len(),
                cfg.max_volumes
            ),
        ));
    }
    if namespace.is_empty() || namespace.contains('/') || namespace.starts_with('.') {
        return Err(fail(
            first,
            format!("namespace {namespace:?} cannot have a volume directory"),
        ));
    }
    std::fs::create_dir_all(&cfg.dir).map_err(|e| {
        fail(
            first,
            format!("volumes.dir {} cannot be created: {e}", cfg.dir.display()),
        )
    })?;
    let root = nix::fcntl::open(
        &cfg.dir,
        OFlag::O_DIRECTORY | OFlag::O_CLOEXEC | OFlag::O_RDONLY,
        Mode::empty(),
    )
    .map_err(|e| fail(first, format!("volumes.dir cannot be opened: {e}")))?;
    make_owned(&root, Path::new(namespace), cfg).map_err(|e| {
        fail(
            first,
            format!("namespace {namespace}'s volume directory cannot be created: {e}"),
        )
    })?;
    let ns = open_dir(&root, Path::new(namespace)).map_err(|e| {
        fail(
            first,
            format!("namespace {namespace}'s volume directory cannot be opened: {e}"),
        )
    })?;
    for v in volumes {
        let Ok(req) = parse_volume(v) else { continue };
        let mut parts = req.host.components();
        if let (Some(Component::Normal(name)), None) = (parts.next(), parts.next()) {
            make_owned(&ns, Path::new(name), cfg)
                .map_err(|e| fail(v, format!("cannot create its directory: {e}")))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};

    use super::*;

    fn cfg(dir: &Path) -> VolumesConfig {
        VolumesConfig {
            dir: dir.join("volumes"),
            owner_uid: nix::unistd::geteuid().as_raw(),
            owner_gid: nix::unistd::getegid().as_raw(),
            ..Default::default()
        }
    }

    #[test]
    fn creates_the_namespace_and_top_level_directories_only() {
        let tmp = tempfile::tempdir().unwrap();
        let c = cfg(tmp.path());
        prepare_namespace_dir(
            &c,
            "team",
            &["data:/data".into(), "a/b:/ab".into(), "/abs:/x".into()],
        )
        .unwrap();
        let data = c.dir.join("team/data");
        let meta = std::fs::metadata(&data).unwrap();
        assert!(meta.is_dir());
        assert_eq!(meta.permissions().mode() & 0o777, 0o700);
        assert_eq!(meta.uid(), c.owner_uid);
        assert!(!c.dir.join("team/a").exists(), "deeper paths are not made");
        // Again: existing directories are fine.
        prepare_namespace_dir(&c, "team", &["data:/data".into()]).unwrap();
        // Over the limit: refused before anything is made.
        let many: Vec<String> = (0..=c.max_volumes).map(|i| format!("v{i}:/v{i}")).collect();
        assert!(prepare_namespace_dir(&c, "other", &many).is_err());
        assert!(!c.dir.join("other").exists());
    }

    #[test]
    fn symlinks_are_not_followed_and_bad_namespaces_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let c = cfg(tmp.path());
        std::fs::create_dir_all(&c.dir).unwrap();
        let outside = tmp.path().join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        symlink(&outside, c.dir.join("evil")).unwrap();
        assert!(prepare_namespace_dir(&c, "evil", &["x:/x".into()]).is_err());
        assert!(!outside.join("x").exists());
        std::fs::create_dir_all(c.dir.join("ok")).unwrap();
        symlink(&outside, c.dir.join("ok/link")).unwrap();
        prepare_namespace_dir(&c, "ok", &["link:/l".into()]).unwrap();
        assert!(std::fs::read_dir(&outside).unwrap().next().is_none());
        assert!(prepare_namespace_dir(&c, "../x", &["x:/x".into()]).is_err());
    }
}
