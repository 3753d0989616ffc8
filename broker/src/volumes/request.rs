//! `host:container[:ro|:rw]` parsed into its parts, each checked lexically.

use std::path::{Component, Path, PathBuf};

use super::VolumeError;

/// Longest accepted volume string.
pub const MAX_VOLUME_LEN: usize = 4096;

/// Guest paths a volume may not cover: the agent's own files and the
/// kernel's filesystems.
const RESERVED: [&str; 4] = ["/proc", "/sys", "/dev", "/.sandbox"];

/// One lexically valid volume request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeRequest {
    /// Relative (to the namespace's volume directory) or absolute (under an
    /// allowed root); never with `..`.
    pub host: PathBuf,
    /// Absolute guest path, normalised, not `/` or a reserved path.
    pub container: String,
    pub read_only: bool,
}

pub fn parse_volume(v: &str) -> Result<VolumeRequest, VolumeError> {
    let err = |reason: String| VolumeError::new(v, reason);
    if v.len() > MAX_VOLUME_LEN || v.contains('\0') {
        return Err(err(format!(
            "must be under {MAX_VOLUME_LEN} bytes without NUL bytes"
        )));
    }
    let parts: Vec<&str> = v.split(':').collect();
    let (host, container, mode) = match parts.as_slice() {
        [h, c] => (*h, *c, None),
        [h, c, m] => (*h, *c, Some(*m)),
        _ => {
            return Err(err(
                "use host:container or host:container:ro (paths cannot contain ':')".into(),
            ))
        }
    };
    let read_only = match mode {
        None | Some("rw") => false,
        Some("ro") => true,
        Some(m) => return Err(err(format!("mode {m:?} is not \"ro\" or \"rw\""))),
    };
    if host.is_empty() {
        return Err(err("the host path is empty".into()));
    }
    let host = PathBuf::from(host);
    if host
        .components()
        .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
    {
        return Err(err(
            "the host path contains '.' or '..'; name the directory directly".into(),
        ));
    }
    let container = check_container(container).map_err(err)?;
    Ok(VolumeRequest {
        host,
        container,
        read_only,
    })
}

fn check_container(c: &str) -> Result<String, String> {
    if !c.starts_with('/') {
        return Err(format!("the container path {c:?} must be absolute"));
    }
    let p = Path::new(c);
    if p.components()
        .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
    {
        return Err(format!(
            "the container path {c:?} must not contain '.' or '..'"
        ));
    }
    let normal: PathBuf = p.components().collect();
    let s = normal.to_string_lossy().into_owned();
    if s == "/" {
        return Err("the container path cannot be /".into());
    }
    if let Some(r) = RESERVED.iter().find(|r| normal.starts_with(r)) {
        return Err(format!(
            "the container path {s:?} lies under {r}, which the sandbox needs"
        ));
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_absolute_and_modes() {
        let v = parse_volume("data:/data").unwrap();
        assert_eq!(v.host, PathBuf::from("data"));
        assert_eq!(v.container, "/data");
        assert!(!v.read_only);
        let v = parse_volume("/srv/shared/x:/mnt/x/:ro").unwrap();
        assert_eq!(v.host, PathBuf::from("/srv/shared/x"));
        assert_eq!(v.container, "/mnt/x");
        assert!(v.read_only);
        assert!(!parse_volume("a/b:/c:rw").unwrap().read_only);
    }

    #[test]
    fn bad_shapes_are_refused_with_the_reason() {
        for (v, why) in [
            ("data", "host:container"),
            ("a:b:c:d", "host:container"),
            (":/data", "empty"),
            ("data:/data:rx", "mode"),
            ("../etc:/data", "'..'"),
            ("a/../../etc:/data", "'..'"),
            ("/srv/../etc:/data", "'..'"),
            ("./a:/data", "'.'"),
            ("data:relative", "absolute"),
            ("data:/a/../b", "'..'"),
            ("data:/", "cannot be /"),
            ("data:/proc/x", "/proc"),
            ("data:/.sandbox", "/.sandbox"),
            ("da\0ta:/x", "NUL"),
        ] {
            let e = parse_volume(v).unwrap_err();
            assert!(e.to_string().contains(why), "{v:?}: {e}");
        }
        let long = format!("{}:/x", "a".repeat(MAX_VOLUME_LEN));
        assert!(parse_volume(&long).is_err());
    }
}
