//! Talking to a test registry with skopeo: pushing an image or index from an
//! OCI layout (`skopeo copy --all`, OCI or Docker v2 schema 2 manifests) and
//! inspecting what the registry serves. Both run with `--insecure-policy`
//! (no dependence on the host's policy.json) and without TLS. skopeo 1.9
//! gzips uncompressed layers on the way to a registry (even with
//! `--preserve-digests`); [`super::upload`] pushes them as they are.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

use super::{try_run, Registry};

/// The manifest format the registry receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// OCI manifests and indexes, as built.
    Oci,
    /// Docker v2 schema 2 manifests and manifest lists (`--format v2s2`).
    Docker,
}

/// Pushes `tag` of `layout` to `registry` as `dest` (`name:tag`) with the
/// registry's own credentials; returns the digest of what was pushed (the
/// index for a multi-platform image): the built digest for [`Format::Oci`]
/// unless a layer was uncompressed. Panics with skopeo's error.
pub fn push(layout: &Path, tag: &str, registry: &Registry, dest: &str, format: Format) -> String {
    try_push(layout, tag, registry, dest, format, registry.credentials())
        .unwrap_or_else(|e| panic!("{e}"))
}

/// [`push`] with explicit credentials (`None`: anonymous); `Err` carries
/// skopeo's error output.
pub fn try_push(
    layout: &Path,
    tag: &str,
    registry: &Registry,
    dest: &str,
    format: Format,
    creds: Option<(&str, &str)>,
) -> Result<String, String> {
    let work = tempfile::tempdir().expect("temp dir for the digest file");
    let digest_file = work.path().join("digest");
    let mut copy = Command::new("skopeo");
    copy.args([
        "--insecure-policy",
        "copy",
        "--all",
        "--dest-tls-verify=false",
    ])
    .arg("--format")
    .arg(match format {
        Format::Oci => "oci",
        Format::Docker => "v2s2",
    })
    .arg("--digestfile")
    .arg(&digest_file);
    match creds {
        Some((user, password)) => copy.arg(format!("--dest-creds={user}:{password}")),
        None => copy.arg("--dest-no-creds"),
    };
    copy.arg(format!("oci:{}:{tag}", layout.display()))
        .arg(format!("docker://{}/{dest}", registry.host()));
    try_run(&mut copy, "skopeo copy")?;
    std::fs::read_to_string(&digest_file)
        .map(|d| d.trim().to_string())
        .map_err(|e| format!("skopeo wrote no digest file: {e}"))
}

/// `skopeo inspect` of `reference` (`name:tag` or `name@digest`) on
/// `registry` with `creds` (`None`: anonymous) and extra `args` such as
/// `--raw` (the manifest as served) or `--config`; the output as JSON.
pub fn inspect(
    registry: &Registry,
    creds: Option<(&str, &str)>,
    reference: &str,
    args: &[&str],
) -> Result<Value, String> {
    let mut cmd = Command::new("skopeo");
    cmd.args(["--insecure-policy", "inspect", "--tls-verify=false"]);
    match creds {
        Some((user, password)) => cmd.arg(format!("--creds={user}:{password}")),
        None => cmd.arg("--no-creds"),
    };
    cmd.args(args)
        .arg(format!("docker://{}/{reference}", registry.host()));
    let out = try_run(&mut cmd, "skopeo inspect")?;
    serde_json::from_str(&out).map_err(|e| format!("skopeo inspect printed no JSON: {e}\n{out}"))
}
