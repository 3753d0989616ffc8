//! A sandbox's root image made ready to boot: an operator-provided disk as
//! it is, or an OCI image from the store (pulled if missing and allowed,
//! within `pull_timeout_secs`) with its config applied to the sandbox's
//! definition the way the contract says: image Env first (the sandbox's
//! envs override it), the image's WorkingDir unless the sandbox sets one,
//! and its Entrypoint + Cmd as the background process when the sandbox has
//! neither `exec` nor a `start` script.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::error::BrokerError;
use crate::images::manifest::RuntimeConfig;
use crate::images::{ImageError, Progress, ReadyImage};

use super::spec::{check_env, check_path, ImageSource, SandboxSpec, MAX_ENVS};
use super::vm::LaunchContext;
use crate::config::Limits;

/// What `boot` needs of the image; holds the store's shared lock (when the
/// image came from the store) until the VM has started.
pub struct PreparedImage {
    pub disk: PathBuf,
    pub effective: SandboxSpec,
    /// The image's config (OCI images only), recorded so a re-adopted VM
    /// gets the same effective definition without the image.
    pub runtime: Option<RuntimeConfig>,
    _ready: Option<ReadyImage>,
}

/// The image config as recorded in the sandbox's state.
pub fn to_record(c: &RuntimeConfig) -> moat_proto::state::ImageRuntime {
    moat_proto::state::ImageRuntime {
        env: c.env.clone(),
        working_dir: c.working_dir.clone(),
        user: c.user.clone(),
        entrypoint: c.entrypoint.clone(),
        cmd: c.cmd.clone(),
    }
}

/// The image config back from a record (checked again by [`apply_config`]).
pub fn from_record(r: &moat_proto::state::ImageRuntime) -> RuntimeConfig {
    RuntimeConfig {
        env: r.env.clone(),
        working_dir: r.working_dir.clone(),
        user: r.user.clone(),
        entrypoint: r.entrypoint.clone(),
        cmd: r.cmd.clone(),
        diff_ids: Vec::new(),
    }
}

pub fn image_error(e: ImageError) -> BrokerError {
    if e.is_caller_error() {
        BrokerError::InvalidArgument(e.to_string())
    } else {
        BrokerError::Failed(e.to_string())
    }
}

pub async fn prepare(
    ctx: &LaunchContext,
    sandbox: &str,
    spec: &SandboxSpec,
) -> Result<PreparedImage, BrokerError> {
    let r = match &spec.image {
        ImageSource::Local(disk) => {
            return Ok(PreparedImage {
                disk: disk.clone(),
                effective: spec.clone(),
                runtime: None,
                _ready: None,
            })
        }
        ImageSource::Oci(r) => r,
    };
    let images = &ctx.config.images;
    let limit = Duration::from_secs(u64::from(images.pull_timeout_secs));
    let name = sandbox.to_owned();
    let progress: crate::images::ProgressFn = Arc::new(move |p| match p {
        Progress::Resolved {
            manifest,
            layers,
            bytes,
        } => {
            tracing::info!(sandbox = %name, manifest = %manifest.short(), layers, bytes, "pulling image")
        }
        Progress::BuildingDisk => tracing::info!(sandbox = %name, "building the image's boot disk"),
        _ => {}
    });
    let ready = tokio::time::timeout(limit, ctx.images.ready(r, images.pull_on_start, progress))
        .await
        .map_err(|_| {
            BrokerError::Failed(format!(
                "image {r}: not ready after {limit:?} (images.pull_timeout_secs); the pull goes on in the background only if another start asks for it again"
            ))
        })?
        .map_err(image_error)?;
    let effective = apply_config(spec, &ready.config, &ctx.config.limits)
        .map_err(|reason| BrokerError::Failed(format!("image {r}: {reason}")))?;
    Ok(PreparedImage {
        disk: ready.disk.clone(),
        effective,
        runtime: Some(ready.config.clone()),
        _ready: Some(ready),
    })
}

/// The definition with the image's config applied.
pub fn apply_config(
    spec: &SandboxSpec,
    image: &RuntimeConfig,
    limits: &Limits,
) -> Result<SandboxSpec, String> {
    let mut out = spec.clone();
    // The image's lists are held to the same caps as a request's.
    if image.env.len() > MAX_ENVS {
        return Err(format!(
            "its Env has {} entries; the limit is {MAX_ENVS}",
            image.env.len()
        ));
    }
    let bytes = |v: &[String]| v.iter().map(String::len).sum::<usize>();
    let max = limits.max_request_bytes as usize;
    if bytes(&image.env) > max || bytes(&image.entrypoint) + bytes(&image.cmd) > max {
        return Err(format!(
            "its Env or Entrypoint + Cmd are over {max} bytes (limits.max_request_bytes)"
        ));
    }
    let mut envs: Vec<String> = Vec::new();
    let mut skipped = 0;
    for e in &image.env {
        match check_env(e) {
            Ok(()) => envs.push(e.clone()),
            Err(_) => skipped += 1,
        }
    }
    if skipped > 0 {
        tracing::warn!(skipped, "malformed image Env entries skipped");
    }
    envs.extend(spec.envs.iter().cloned());
    out.envs = envs;
    if out.workdir.is_none() {
        if let Some(w) = &image.working_dir {
            out.workdir = Some(check_path("the image's WorkingDir", w).map_err(|e| e.0)?);
        }
    }
    if let Some(user) = &image.user {
        let ok = user.len() <= 256
            && user.split(':').count() <= 2
            && user
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-:".contains(&b));
        if !ok {
            return Err(format!(
                "its User {user:?} is not a user name or uid, optionally with :group"
            ));
        }
        out.user = Some(user.clone());
    }
    if out.exec.is_none() && !out.scripts.contains_key("start") {
        let argv: Vec<&String> = image.entrypoint.iter().chain(image.cmd.iter()).collect();
        if !argv.is_empty() {
            if argv.iter().any(|a| a.contains('\0')) {
                return Err("Entrypoint/Cmd contain a NUL byte".into());
            }
            out.exec = Some(
                argv.iter()
                    .map(|a| shell_quote(a))
                    .collect::<Vec<_>>()
                    .join(" "),
            );
        }
    }
    Ok(out)
}

/// Quotes one word for `sh -c`.
fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-=:,+@%".contains(&b))
    {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> SandboxSpec {
        SandboxSpec {
            image_name: "x".into(),
            image: ImageSource::Local("/x".into()),
            memory_mib: 512,
            cpus: 1,
            envs: vec!["A=sandbox".into()],
            workdir: None,
            shell: "/bin/sh".into(),
            scripts: Default::default(),
            exec: None,
            user: None,
            volumes: Vec::new(),
            volume_strings: Vec::new(),
            scope: crate::network::firewall::Scope::None,
            ports: Vec::new(),
            depends_on: Vec::new(),
        }
    }

    fn image() -> RuntimeConfig {
        RuntimeConfig {
            env: vec![
                "PATH=/usr/local/bin:/usr/bin".into(),
                "A=image".into(),
                "bad key=x".into(),
            ],
            working_dir: Some("/app".into()),
            user: Some("www-data:www-data".into()),
            entrypoint: vec!["/docker-entrypoint.sh".into()],
            cmd: vec!["nginx".into(), "-g".into(), "daemon off;".into()],
            diff_ids: vec![],
        }
    }

    #[test]
    fn image_env_first_workdir_default_and_entrypoint_as_exec() {
        let e = apply_config(&spec(), &image(), &Limits::default()).unwrap();
        assert_eq!(
            e.envs,
            vec!["PATH=/usr/local/bin:/usr/bin", "A=image", "A=sandbox"]
        );
        assert_eq!(e.workdir.as_deref(), Some("/app"));
        assert_eq!(
            e.exec.as_deref(),
            Some("/docker-entrypoint.sh nginx -g 'daemon off;'")
        );
    }

    #[test]
    fn the_sandbox_config_wins() {
        let mut s = spec();
        s.workdir = Some("/work".into());
        s.scripts.insert("start".into(), "echo".into());
        let e = apply_config(&s, &image(), &Limits::default()).unwrap();
        assert_eq!(e.workdir.as_deref(), Some("/work"));
        assert_eq!(e.exec, None, "the start script runs instead");
        let mut bad = image();
        bad.working_dir = Some("relative/dir".into());
        assert!(apply_config(&spec(), &bad, &Limits::default())
            .unwrap_err()
            .contains("WorkingDir"));
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        let mut huge = image();
        huge.env = (0..MAX_ENVS + 1).map(|i| format!("K{i}=")).collect();
        let e = apply_config(&spec(), &huge, &Limits::default()).unwrap_err();
        assert!(e.contains("Env has 257 entries"), "{e}");
    }
}
