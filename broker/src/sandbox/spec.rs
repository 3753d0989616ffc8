//! A sandbox's validated definition: `sandbox.start`'s config checked field
//! by field against the operator's limits. Nothing reaches a VM that did not
//! pass through [`SandboxSpec::from_config`].

use std::collections::BTreeMap;
use std::path::PathBuf;

use moat_proto::broker::SandboxConfig;

use crate::config::{ImagesConfig, Limits, VolumesConfig};
use crate::images::Reference;
use crate::volumes::{parse_volume, resolve_volume};

/// Most `envs` entries.
pub const MAX_ENVS: usize = 256;
/// Longest path accepted for `workdir` and `shell`.
pub const MAX_PATH_LEN: usize = 4096;

/// A checked sandbox definition. Two starts with equal specs are the same
/// sandbox (a second start of a running one changes nothing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxSpec {
    /// As the caller (or the server default) named it.
    pub image_name: String,
    pub image: ImageSource,
    pub memory_mib: u32,
    pub cpus: u32,
    /// `KEY=VALUE`, in order; later entries override earlier ones.
    pub envs: Vec<String>,
    pub workdir: Option<String>,
    pub shell: String,
    /// Written to `/.sandbox/scripts/<name>` in the guest.
    pub scripts: BTreeMap<String, String>,
    /// Launched in the background once the sandbox is ready (`shell -c`).
    pub exec: Option<String>,
    /// Who everything runs as in the guest (the image's `User`; root when
    /// None). Never set by the caller.
    pub user: Option<String>,
}

/// Where a sandbox's root image comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    /// An operator-provided disk from `[images.local]`.
    Local(PathBuf),
    /// An OCI image: from the store, pulled if missing and allowed.
    Oci(Reference),
}

/// Why a config was refused; the message says what to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SpecError(pub String);

fn refuse<T>(msg: String) -> Result<T, SpecError> {
    Err(SpecError(msg))
}

impl SandboxSpec {
    pub fn from_config(
        c: &SandboxConfig,
        namespace: &str,
        limits: &Limits,
        images: &ImagesConfig,
        volumes: &VolumesConfig,
    ) -> Result<Self, SpecError> {
        let image_name = c.image.clone().unwrap_or_else(|| images.default.clone());
        let image = match images.local.get(&image_name) {
            Some(disk) => ImageSource::Local(disk.clone()),
            None => ImageSource::Oci(
                Reference::parse(&image_name).map_err(|e| SpecError(e.to_string()))?,
            ),
        };
        let memory_mib = c.memory_mib.unwrap_or(limits.default_memory_mib);
        if memory_mib < 64 || memory_mib > limits.max_memory_mib {
            return refuse(format!(
                "memory {memory_mib} MiB is outside the allowed range 64..={} MiB",
                limits.max_memory_mib
            ));
        }
        let cpus = c.cpus.unwrap_or(limits.default_cpus);
        if cpus == 0 || cpus > limits.max_cpus {
            return refuse(format!(
                "cpus {cpus} is outside the allowed range 1..={}",
                limits.max_cpus
            ));
        }
        check_volumes(&c.volumes, namespace, volumes)?;
        if !c.ports.is_empty() {
            return refuse("ports need guest networking, which this moat build does not provide yet; remove config.ports".into());
        }
        if !c.depends_on.is_empty() {
            return refuse("depends_on is not supported by this moat build yet; start the other sandboxes first and remove config.depends_on".into());
        }
        if c.scripts.len() > limits.max_scripts as usize {
            return refuse(format!(
                "{} scripts given; the limit is {}",
                c.scripts.len(),
                limits.max_scripts
            ));
        }
        for name in c.scripts.keys() {
            check_script_name(name)?;
        }
        let script_bytes: usize = c
            .scripts
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>()
            + c.exec.as_ref().map_or(0, String::len);
        if script_bytes > limits.max_request_bytes as usize {
            return refuse(format!(
                "scripts and exec total {script_bytes} bytes; the limit is {}",
                limits.max_request_bytes
            ));
        }
        if c.scripts
            .values()
            .chain(c.exec.iter())
            .any(|v| v.contains('\0'))
        {
            return refuse("scripts and exec cannot contain NUL bytes".into());
        }
        if c.exec.as_ref().is_some_and(|e| e.trim().is_empty()) {
            return refuse("exec cannot be empty; omit it to run no background command".into());
        }
        if c.envs.len() > MAX_ENVS {
            return refuse(format!(
                "{} envs given; the limit is {MAX_ENVS}",
                c.envs.len()
            ));
        }
        let total: usize = c.envs.iter().map(String::len).sum();
        if total > limits.max_request_bytes as usize {
            return refuse(format!(
                "envs total {total} bytes; the limit is {}",
                limits.max_request_bytes
            ));
        }
        for e in &c.envs {
            check_env(e)?;
        }
        let workdir = match &c.workdir {
            Some(w) => Some(check_path("workdir", w)?),
            None => None,
        };
        let shell = check_path("shell", c.shell.as_deref().unwrap_or("/bin/sh"))?;
        Ok(Self {
            image_name,
            image,
            memory_mib,
            cpus,
            envs: c.envs.clone(),
            workdir,
            shell,
            scripts: c
                .scripts
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            exec: c.exec.clone(),
            user: None,
        })
    }
}

/// Every volume is parsed and its host directory resolved beneath its root
/// (see `crate::volumes`), so a bad one is refused with its own reason.
/// Mounting them needs the shared-directory device, which this build does
/// not have yet: valid volumes are refused after that, saying so.
fn check_volumes(
    requested: &[String],
    namespace: &str,
    cfg: &VolumesConfig,
) -> Result<(), SpecError> {
    if requested.is_empty() {
        return Ok(());
    }
    if requested.len() > cfg.max_volumes as usize {
        return refuse(format!(
            "{} volumes given; the limit is {}",
            requested.len(),
            cfg.max_volumes
        ));
    }
    let mut seen = std::collections::BTreeSet::new();
    for v in requested {
        let req = parse_volume(v).map_err(|e| SpecError(e.to_string()))?;
        if !seen.insert(req.container.clone()) {
            return refuse(format!(
                "two volumes are mounted at {}; give each its own container path",
                req.container
            ));
        }
        resolve_volume(v, &req, namespace, cfg).map_err(|e| SpecError(e.to_string()))?;
    }
    refuse(
        "the volumes are valid, but mounting volumes is not supported by this moat build yet; remove config.volumes"
            .into(),
    )
}

/// A script name becomes a file name in the guest: `[A-Za-z0-9._-]`, at
/// most 64 bytes, not `.` or `..`.
pub fn check_script_name(name: &str) -> Result<(), SpecError> {
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if name.is_empty() || name.len() > 64 || !ok_chars || name == "." || name == ".." {
        return refuse(format!(
            "script name {name:?} must be 1-64 characters of letters, digits, '.', '_' and '-' (not \".\" or \"..\")"
        ));
    }
    Ok(())
}

/// `KEY=VALUE` with a POSIX-style key and no NUL.
pub fn check_env(e: &str) -> Result<(), SpecError> {
    let Some((key, _)) = e.split_once('=') else {
        return refuse(format!("env {e:?} must have the form KEY=VALUE"));
    };
    let mut chars = key.chars();
    let ok_start = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if !ok_start || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return refuse(format!(
            "env key {key:?} must start with a letter or '_' and contain only letters, digits and '_'"
        ));
    }
    if e.contains('\0') {
        return refuse(format!("env {key:?} contains a NUL byte"));
    }
    Ok(())
}

/// An absolute guest path without NUL, `.` or `..` components.
pub fn check_path(what: &str, p: &str) -> Result<String, SpecError> {
    if !p.starts_with('/') {
        return refuse(format!("{what} {p:?} must be an absolute path"));
    }
    if p.len() > MAX_PATH_LEN || p.contains('\0') {
        return refuse(format!(
            "{what} must be under {MAX_PATH_LEN} bytes without NUL bytes"
        ));
    }
    if p.split('/').any(|c| c == "." || c == "..") {
        return refuse(format!(
            "{what} {p:?} must not contain '.' or '..' components"
        ));
    }
    Ok(p.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn images() -> ImagesConfig {
        let mut i = ImagesConfig::default();
        i.local.insert("base".into(), "/img/base.erofs".into());
        i
    }

    fn spec(c: SandboxConfig) -> Result<SandboxSpec, SpecError> {
        SandboxSpec::from_config(
            &c,
            "default",
            &Limits::default(),
            &images(),
            &VolumesConfig::default(),
        )
    }

    #[test]
    fn defaults_fill_absent_fields() {
        let s = spec(SandboxConfig::default()).unwrap();
        assert_eq!(
            (s.memory_mib, s.cpus, s.shell.as_str()),
            (512, 1, "/bin/sh")
        );
        assert_eq!(
            s.image,
            ImageSource::Local(PathBuf::from("/img/base.erofs"))
        );
    }

    #[test]
    fn values_over_limits_are_refused_not_lowered() {
        let e = spec(SandboxConfig {
            memory_mib: Some(1 << 20),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.0.contains("memory") && e.0.contains("4096"), "{e}");
        let e = spec(SandboxConfig {
            cpus: Some(64),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.0.contains("cpus"), "{e}");
        let e = spec(SandboxConfig {
            cpus: Some(0),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.0.contains("cpus"), "{e}");
    }

    #[test]
    fn images_are_local_disks_or_oci_references() {
        let s = spec(SandboxConfig {
            image: Some("python:3.12".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            s.image,
            ImageSource::Oci(Reference::parse("docker.io/library/python:3.12").unwrap())
        );
        let e = spec(SandboxConfig {
            image: Some("Python:3.12:x".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.0.contains("Python:3.12:x"), "{e}");
    }

    #[test]
    fn unsupported_fields_are_refused_with_the_field_name() {
        let e = spec(SandboxConfig {
            ports: vec!["8080:80".into()],
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.0.contains("ports"), "{e}");
        let e = spec(SandboxConfig {
            volumes: vec!["a:/b".into()],
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.0.contains("volume"), "{e}");
    }

    #[test]
    fn volumes_are_resolved_then_refused_until_mounting_exists() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("default/data")).unwrap();
        let cfg = VolumesConfig {
            dir: tmp.path().to_owned(),
            allowed_roots: Vec::new(),
            max_volumes: 2,
        };
        let with = |volumes: &[&str]| {
            SandboxSpec::from_config(
                &SandboxConfig {
                    volumes: volumes.iter().map(|v| v.to_string()).collect(),
                    ..Default::default()
                },
                "default",
                &Limits::default(),
                &images(),
                &cfg,
            )
            .unwrap_err()
            .0
        };
        assert!(with(&["data:/d"]).contains("not supported by this moat build yet"));
        assert!(with(&["../x:/d"]).contains("'..'"));
        assert!(with(&["data:/d", "data:/d:ro"]).contains("two volumes"));
        assert!(with(&["data:/a", "data:/b", "data:/c"]).contains("limit is 2"));
    }

    #[test]
    fn scripts_and_exec_are_checked() {
        let mut c = SandboxConfig {
            exec: Some("python3 -m http.server".into()),
            ..Default::default()
        };
        c.scripts.insert("start".into(), "echo hi".into());
        let s = spec(c).unwrap();
        assert_eq!(s.scripts.get("start").map(String::as_str), Some("echo hi"));
        assert_eq!(s.exec.as_deref(), Some("python3 -m http.server"));
        for bad in ["", ".", "..", "a/b", "x y", &"n".repeat(65)] {
            let mut c = SandboxConfig::default();
            c.scripts.insert(bad.into(), "true".into());
            assert!(spec(c).unwrap_err().0.contains("script name"), "{bad:?}");
        }
        let e = spec(SandboxConfig {
            exec: Some("  ".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.0.contains("exec"), "{e}");
        let mut c = SandboxConfig::default();
        c.scripts.insert("big".into(), "x".repeat(300 << 10));
        assert!(spec(c).unwrap_err().0.contains("limit"));
    }

    #[test]
    fn envs_and_paths_are_checked() {
        assert!(check_env("A_1=x=y").is_ok());
        assert!(check_env("=x").is_err());
        assert!(check_env("1A=x").is_err());
        assert!(check_env("NOVALUE").is_err());
        assert!(check_env("A-B=1").is_err());
        assert!(check_path("workdir", "/work/dir").is_ok());
        assert!(check_path("workdir", "relative").is_err());
        assert!(check_path("workdir", "/a/../b").is_err());
        assert!(check_path("workdir", "/a\0b").is_err());
    }
}
