//! Finds a volume's host directory beneath its root, following no symlink
//! and no `..`: the relative part is opened with `openat2` and
//! `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS` from an fd
//! of the root, so a symlink a guest planted in a shared directory (or a
//! rename racing the check) cannot lead anywhere else. The result is that
//! directory's fd; whatever uses the volume later goes through it, never
//! through the path again.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::Mode;

use super::{VolumeError, VolumeRequest};
use crate::config::VolumesConfig;

/// How often a resolution racing a rename (`EAGAIN`) is retried.
const RETRIES: usize = 8;

/// A volume whose host directory was found and opened.
#[derive(Debug)]
pub struct ResolvedVolume {
    /// `O_PATH` fd of the host directory.
    pub dir: OwnedFd,
    /// The path it was found at (for logs; never reopened).
    pub host: PathBuf,
    pub container: String,
    pub read_only: bool,
}

/// Where a request's host side lives: its root and the part beneath it.
fn root_of<'a>(
    req: &'a VolumeRequest,
    namespace: &str,
    cfg: &'a VolumesConfig,
) -> Result<(PathBuf, &'a Path, String), String> {
    if req.host.is_relative() {
        if namespace.is_empty() || namespace.contains('/') || namespace.starts_with('.') {
            return Err(format!(
                "namespace {namespace:?} cannot have a volume directory"
            ));
        }
        return Ok((
            cfg.dir.join(namespace),
            &req.host,
            format!("namespace {namespace}'s volume directory"),
        ));
    }
    if cfg.allowed_roots.is_empty() {
        return Err(
            "absolute host paths are not allowed on this server; give a path relative to the namespace's volume directory"
                .into(),
        );
    }
    for root in &cfg.allowed_roots {
        if let Ok(rel) = req.host.strip_prefix(root) {
            return Ok((root.clone(), rel, root.display().to_string()));
        }
    }
    let roots: Vec<String> = cfg
        .allowed_roots
        .iter()
        .map(|r| r.display().to_string())
        .collect();
    Err(format!(
        "{} is outside the roots this server allows ({})",
        req.host.display(),
        roots.join(", ")
    ))
}

pub fn resolve_volume(
    original: &str,
    req: &VolumeRequest,
    namespace: &str,
    cfg: &VolumesConfig,
) -> Result<ResolvedVolume, VolumeError> {
    let err = |reason: String| VolumeError::new(original, reason);
    let (root, rel, root_name) = root_of(req, namespace, cfg).map_err(err)?;
    // The root itself is the operator's: it may be a symlink.
    let root_fd = nix::fcntl::open(
        &root,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| match e {
        Errno::ENOENT => err(format!(
            "{root_name} does not exist; ask the operator to create it"
        )),
        e => err(format!("{root_name} cannot be opened: {e}")),
    })?;
    let rel = if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    };
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
        .resolve(
            ResolveFlag::RESOLVE_BENEATH
                | ResolveFlag::RESOLVE_NO_SYMLINKS
                | ResolveFlag::RESOLVE_NO_MAGICLINKS,
        );
    let mut attempt = 0;
    let dir = loop {
        match nix::fcntl::openat2(&root_fd, rel, how) {
            Err(Errno::EAGAIN) if attempt < RETRIES => attempt += 1,
            Ok(fd) => break fd,
            Err(e) => {
                let shown = rel.display();
                return Err(err(match e {
                    Errno::ELOOP => format!(
                        "{shown} passes through a symbolic link in {root_name}; volumes must name real directories"
                    ),
                    Errno::EXDEV => format!("{shown} escapes {root_name}"),
                    Errno::ENOENT => format!(
                        "{shown} does not exist in {root_name}; create the directory first"
                    ),
                    Errno::ENOTDIR => format!(
                        "{shown} in {root_name} is not a directory; volumes share directories"
                    ),
                    Errno::ENOSYS | Errno::E2BIG => "this kernel lacks openat2 (Linux 5.6 or later), which moat needs to resolve volumes safely".into(),
                    e => format!("{shown} in {root_name} cannot be opened: {e}"),
                }));
            }
        }
    };
    Ok(ResolvedVolume {
        dir,
        host: root.join(rel),
        container: req.container.clone(),
        read_only: req.read_only,
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::super::parse_volume;
    use super::*;

    struct Tree {
        _tmp: tempfile::TempDir,
        cfg: VolumesConfig,
        shared: PathBuf,
    }

    /// volumes/default/{data/sub, file, escape -> /etc, hop -> data,
    /// data/up -> ..}; shared/{x, link -> /etc}.
    fn tree() -> Tree {
        let tmp = tempfile::tempdir().unwrap();
        let ns = tmp.path().join("volumes/default");
        std::fs::create_dir_all(ns.join("data/sub")).unwrap();
        std::fs::write(ns.join("file"), b"").unwrap();
        symlink("/etc", ns.join("escape")).unwrap();
        symlink("data", ns.join("hop")).unwrap();
        symlink("..", ns.join("data/up")).unwrap();
        let shared = tmp.path().join("shared");
        std::fs::create_dir_all(shared.join("x")).unwrap();
        symlink("/etc", shared.join("link")).unwrap();
        Tree {
            cfg: VolumesConfig {
                dir: tmp.path().join("volumes"),
                allowed_roots: vec![shared.clone()],
                max_volumes: 8,
                ..Default::default()
            },
            shared,
            _tmp: tmp,
        }
    }

    fn resolve(t: &Tree, v: &str) -> Result<ResolvedVolume, VolumeError> {
        resolve_volume(v, &parse_volume(v)?, "default", &t.cfg)
    }

    #[test]
    fn directories_beneath_their_root_resolve() {
        let t = tree();
        let r = resolve(&t, "data/sub:/sub:ro").unwrap();
        assert!(r.host.ends_with("volumes/default/data/sub"));
        assert!(r.read_only);
        let abs = format!("{}:/x", t.shared.join("x").display());
        assert_eq!(resolve(&t, &abs).unwrap().host, t.shared.join("x"));
        let whole = format!("{}:/all", t.shared.display());
        assert!(resolve(&t, &whole).is_ok());
    }

    #[test]
    fn symlinks_escapes_and_non_directories_are_refused() {
        let t = tree();
        for (v, why) in [
            ("escape:/d", "symbolic link"),
            ("hop/sub:/d", "symbolic link"),
            ("data/up:/d", "symbolic link"),
            ("file:/d", "not a directory"),
            ("missing:/d", "does not exist"),
            ("/etc:/d", "outside the roots"),
        ] {
            let e = resolve(&t, v).unwrap_err();
            assert!(e.reason.contains(why), "{v}: {e}");
        }
        let planted = format!("{}:/d", t.shared.join("link").display());
        assert!(resolve(&t, &planted)
            .unwrap_err()
            .reason
            .contains("symbolic link"));
        let outside_prefix = format!("{}-other:/d", t.shared.display());
        assert!(resolve(&t, &outside_prefix)
            .unwrap_err()
            .reason
            .contains("outside the roots"));
    }

    #[test]
    fn absolute_paths_need_an_allowed_root_and_namespaces_their_directory() {
        let mut t = tree();
        t.cfg.allowed_roots.clear();
        let v = format!("{}:/x", t.shared.join("x").display());
        assert!(resolve(&t, &v)
            .unwrap_err()
            .reason
            .contains("not allowed on this server"));
        let e = resolve_volume(
            "data:/d",
            &parse_volume("data:/d").unwrap(),
            "other",
            &t.cfg,
        )
        .unwrap_err();
        assert!(e.reason.contains("ask the operator"), "{e}");
    }
}
