//! A sandbox's validated definition: `sandbox.start`'s config checked field
//! by field against the operator's limits. Nothing reaches a VM that did not
//! pass through [`SandboxSpec::from_config`].

use std::collections::BTreeMap;
use std::path::PathBuf;

use moat_proto::broker::SandboxConfig;

use crate::config::{ImagesConfig, Limits, NetworkConfig, VolumesConfig};
use crate::images::Reference;
use crate::network::firewall::Scope;
use crate::network::PortMapping;
use crate::volumes::{parse_volume, resolve_volume, VolumeRequest};

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
    /// Host directories shared into the guest, checked lexically (resolved
    /// again, to fds, at every launch).
    pub volumes: Vec<VolumeRequest>,
    /// As the caller wrote them (for metrics).
    pub volume_strings: Vec<String>,
    pub scope: Scope,
    pub ports: Vec<PortMapping>,
    /// Sandboxes of the same namespace started before this one.
    pub depends_on: Vec<String>,
}

/// What `from_config` checks against: the operator's settings.
#[derive(Debug, Clone, Copy)]
pub struct SpecLimits<'a> {
    pub limits: &'a Limits,
    pub images: &'a ImagesConfig,
    pub volumes: &'a VolumesConfig,
    pub network: &'a NetworkConfig,
}

impl<'a> SpecLimits<'a> {
    /// The checks the broker's config sets.
    pub fn of(cfg: &'a crate::config::BrokerConfig) -> Self {
        Self {
            limits: &cfg.limits,
            images: &cfg.images,
            volumes: &cfg.volumes,
            network: &cfg.network,
        }
    }
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
        checks: SpecLimits<'_>,
    ) -> Result<Self, SpecError> {
        let SpecLimits {
            limits,
            images,
            volumes,
            network,
        } = checks;
        let image_name = c.image.clone().unwrap_or_else(|| images.default.clone());
        let image = match images.local.get(&image_name) {
            Some(disk) => ImageSource::Local(disk.clone()),
            None => ImageSource::Oci(
                Reference::parse(&image_name).map_err(|e| SpecError(e.to_string()))?,
            ),
        };
        let memory_mib = c.memory_mib.unwrap_or(limits.default_memory_mib);
        let cpus = c.cpus.unwrap_or(limits.default_cpus);
        if let Some(problem) = limits.size_problem(memory_mib, cpus) {
            return refuse(problem);
        }
        let parsed_volumes = check_volumes(&c.volumes, namespace, volumes)?;
        let scope = check_scope(c.scope.as_deref(), network)?;
        let ports = check_ports(&c.ports, network)?;
        let depends_on = check_depends_on(&c.depends_on)?;
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
            volumes: parsed_volumes,
            volume_strings: c.volumes.clone(),
            scope,
            ports,
            depends_on,
        })
    }

    /// Whether the sandbox gets a NIC: a scope wider than `none`, or ports
    /// to carry.
    pub fn has_nic(&self) -> bool {
        self.scope > Scope::None || !self.ports.is_empty()
    }
}

fn check_scope(asked: Option<&str>, cfg: &NetworkConfig) -> Result<Scope, SpecError> {
    let max = cfg.max_scope;
    let scope = match asked {
        None => cfg.default_scope,
        Some(s) => s.parse::<Scope>().map_err(|_| {
            SpecError(format!(
                "scope {s:?} is not one of \"none\", \"group\", \"public\", \"any\""
            ))
        })?,
    };
    if scope > max {
        return refuse(format!(
            "scope {scope} is wider than this server allows (at most {max}); ask for {max} or narrower"
        ));
    }
    Ok(scope)
}

/// `host:container` port pairs: numbers, host ports in the operator's
/// range, no host port twice.
fn check_ports(requested: &[String], cfg: &NetworkConfig) -> Result<Vec<PortMapping>, SpecError> {
    if requested.len() > cfg.max_ports as usize {
        return refuse(format!(
            "{} ports given; this server allows {} per sandbox",
            requested.len(),
            cfg.max_ports
        ));
    }
    let mut out: Vec<PortMapping> = Vec::with_capacity(requested.len());
    for p in requested {
        let bad = || {
            SpecError(format!(
                "port {p:?}: use host:container with two port numbers 1-65535, e.g. \"8080:8000\""
            ))
        };
        let (h, c) = p.split_once(':').ok_or_else(bad)?;
        let number = |s: &str| {
            (!s.is_empty() && s.len() <= 5 && s.bytes().all(|b| b.is_ascii_digit()))
                .then(|| s.parse::<u16>().ok())
                .flatten()
                .filter(|n| *n > 0)
        };
        let (host, container) = (number(h).ok_or_else(bad)?, number(c).ok_or_else(bad)?);
        if host < cfg.port_min || host > cfg.port_max {
            return refuse(format!(
                "port {p:?}: host port {host} is outside the range this server allows ({}-{}); choose a host port in it",
                cfg.port_min, cfg.port_max
            ));
        }
        if out.iter().any(|m| m.host == host) {
            return refuse(format!("port {p:?}: host port {host} is given twice"));
        }
        out.push(PortMapping { host, container });
    }
    Ok(out)
}

/// Names of sandboxes in the same namespace; each a valid name, no repeats.
fn check_depends_on(names: &[String]) -> Result<Vec<String>, SpecError> {
    const MAX_DEPENDENCIES: usize = 32;
    if names.len() > MAX_DEPENDENCIES {
        return refuse(format!(
            "{} dependencies given; the limit is {MAX_DEPENDENCIES}",
            names.len()
        ));
    }
    let mut out: Vec<String> = Vec::with_capacity(names.len());
    for n in names {
        moat_proto::names::validate_name("depends_on entry", n)
            .map_err(|e| SpecError(e.to_string()))?;
        if !out.contains(n) {
            out.push(n.clone());
        }
    }
    Ok(out)
}

/// Every volume is parsed and its host directory resolved beneath its root
/// (see `crate::volumes`), so a bad one is refused with its own reason.
fn check_volumes(
    requested: &[String],
    namespace: &str,
    cfg: &VolumesConfig,
) -> Result<Vec<VolumeRequest>, SpecError> {
    if requested.is_empty() {
        return Ok(Vec::new());
    }
    if requested.len() > cfg.max_volumes as usize {
        return refuse(format!(
            "{} volumes given; the limit is {}",
            requested.len(),
            cfg.max_volumes
        ));
    }
    let mut seen = std::collections::BTreeSet::new();
    let mut out = Vec::with_capacity(requested.len());
    for v in requested {
        let req = parse_volume(v).map_err(|e| SpecError(e.to_string()))?;
        if !seen.insert(req.container.clone()) {
            return refuse(format!(
                "two volumes are mounted at {}; give each its own container path",
                req.container
            ));
        }
        resolve_volume(v, &req, namespace, cfg).map_err(|e| SpecError(e.to_string()))?;
        out.push(req);
    }
    Ok(out)
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

    fn spec_with(
        c: SandboxConfig,
        volumes: &VolumesConfig,
        network: &NetworkConfig,
    ) -> Result<SandboxSpec, SpecError> {
        SandboxSpec::from_config(
            &c,
            "default",
            SpecLimits {
                limits: &Limits::default(),
                images: &images(),
                volumes,
                network,
            },
        )
    }

    fn spec(c: SandboxConfig) -> Result<SandboxSpec, SpecError> {
        spec_with(c, &VolumesConfig::default(), &NetworkConfig::default())
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
    fn scope_defaults_and_is_capped_by_the_operator() {
        let s = spec(SandboxConfig::default()).unwrap();
        assert_eq!(s.scope, Scope::None);
        assert!(!s.has_nic());
        let s = spec(SandboxConfig {
            scope: Some("group".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(s.scope, Scope::Group);
        assert!(s.has_nic());
        let e = spec(SandboxConfig {
            scope: Some("any".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.0.contains("at most public"), "{e}");
        let e = spec(SandboxConfig {
            scope: Some("world".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.0.contains("\"world\""), "{e}");
    }

    #[test]
    fn ports_are_pairs_in_the_operator_range() {
        let s = spec(SandboxConfig {
            ports: vec!["8080:8000".into(), "8999:9000".into()],
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            s.ports,
            vec![
                PortMapping {
                    host: 8080,
                    container: 8000
                },
                PortMapping {
                    host: 8999,
                    container: 9000
                }
            ]
        );
        assert!(s.has_nic(), "ports need a NIC even with scope none");
        for (p, why) in [
            ("8080", "host:container"),
            ("a:b", "host:container"),
            ("0:80", "host:container"),
            ("70000:80", "host:container"),
            ("+80:80", "host:container"),
            ("80:80", "outside the range"),
            ("9000:80", "outside the range"),
        ] {
            let e = spec(SandboxConfig {
                ports: vec![p.into()],
                ..Default::default()
            })
            .unwrap_err();
            assert!(e.0.contains(why), "{p}: {e}");
        }
        let e = spec(SandboxConfig {
            ports: vec!["8080:1".into(), "8080:2".into()],
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.0.contains("twice"), "{e}");
    }

    #[test]
    fn depends_on_names_are_checked_and_deduplicated() {
        let s = spec(SandboxConfig {
            depends_on: vec!["db".into(), "cache".into(), "db".into()],
            ..Default::default()
        })
        .unwrap();
        assert_eq!(s.depends_on, vec!["db".to_string(), "cache".to_string()]);
        assert!(spec(SandboxConfig {
            depends_on: vec!["../x".into()],
            ..Default::default()
        })
        .is_err());
    }

    #[test]
    fn volumes_are_resolved_and_checked() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("default/data")).unwrap();
        let cfg = VolumesConfig {
            dir: tmp.path().to_owned(),
            max_volumes: 2,
            ..Default::default()
        };
        let with = |volumes: &[&str]| {
            spec_with(
                SandboxConfig {
                    volumes: volumes.iter().map(|v| v.to_string()).collect(),
                    ..Default::default()
                },
                &cfg,
                &NetworkConfig::default(),
            )
        };
        let s = with(&["data:/d:ro"]).unwrap();
        assert_eq!(s.volumes.len(), 1);
        assert!(s.volumes[0].read_only);
        assert_eq!(s.volume_strings, vec!["data:/d:ro".to_string()]);
        assert!(with(&["../x:/d"]).unwrap_err().0.contains("'..'"));
        assert!(with(&["data:/d", "data:/d:ro"])
            .unwrap_err()
            .0
            .contains("two volumes"));
        assert!(with(&["data:/a", "data:/b", "data:/c"])
            .unwrap_err()
            .0
            .contains("limit is 2"));
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
