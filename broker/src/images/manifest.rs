//! Manifests, indexes and image configs, OCI and Docker v2 alike, parsed
//! with `oci-spec` after a size cap, and checked: schema version 2, known
//! media types, well-formed digests, sizes within limits, the platform.

use oci_spec::image::{Descriptor, ImageConfiguration, ImageIndex, ImageManifest};

use super::digest::Digest;
use super::unpack::Compression;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

/// The `Accept` header for manifest requests: all four, or registries
/// answer 404 for the kinds not listed.
pub const ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json";

/// Largest manifest, index or config accepted.
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;

/// A fetched top-level document.
#[derive(Debug)]
pub enum TopLevel {
    Index(Box<ImageIndex>),
    Manifest(Box<ImageManifest>),
}

/// A layer to fetch and apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerRef {
    pub digest: Digest,
    pub size: u64,
    pub compression: Compression,
}

/// What a manifest says, checked.
#[derive(Debug, Clone)]
pub struct ManifestInfo {
    pub config: Digest,
    pub config_size: u64,
    pub layers: Vec<LayerRef>,
}

/// An untrusted string as messages show it: at most 100 characters,
/// control characters escaped.
fn shown(s: &str) -> String {
    let cut: String = s.chars().take(100).flat_map(char::escape_default).collect();
    if s.chars().count() > 100 {
        format!("{cut}…")
    } else {
        cut
    }
}

/// The OCI architecture name of this host.
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// Parses a manifest or an index. `content_type` is the registry's header
/// (the document's own `mediaType` wins when present).
pub fn parse_top(bytes: &[u8], content_type: Option<&str>) -> Result<TopLevel, String> {
    if bytes.len() > MAX_MANIFEST_BYTES {
        return Err(format!("manifest is over {MAX_MANIFEST_BYTES} bytes"));
    }
    let v: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| format!("manifest is not JSON: {e}"))?;
    if v.get("schemaVersion").and_then(|s| s.as_u64()) != Some(2) {
        return Err(
            "only schema version 2 manifests are supported (schema 1 is long deprecated)".into(),
        );
    }
    let media = v
        .get("mediaType")
        .and_then(|m| m.as_str())
        .or(content_type.map(|c| c.split(';').next().unwrap_or(c).trim()))
        .unwrap_or("");
    let is_index = match media {
        OCI_INDEX | DOCKER_LIST => true,
        OCI_MANIFEST | DOCKER_MANIFEST => false,
        "" | "application/json" => v.get("manifests").is_some(),
        other => return Err(format!("unsupported manifest media type {}", shown(other))),
    };
    if is_index {
        serde_json::from_value(v)
            .map(|i| TopLevel::Index(Box::new(i)))
            .map_err(|e| format!("malformed image index: {e}"))
    } else {
        serde_json::from_value(v)
            .map(|m| TopLevel::Manifest(Box::new(m)))
            .map_err(|e| format!("malformed image manifest: {e}"))
    }
}

fn digest_of(d: &Descriptor) -> Result<Digest, String> {
    Digest::parse(d.digest().as_ref()).map_err(|e| e.to_string())
}

/// The manifest for linux on this host's architecture.
pub fn select_platform(index: &ImageIndex) -> Result<(Digest, u64), String> {
    let arch = host_arch();
    let mut seen = Vec::new();
    for m in index.manifests() {
        let Some(p) = m.platform() else {
            seen.push("(no platform)".to_owned());
            continue;
        };
        let (os, a) = (p.os().to_string(), p.architecture().to_string());
        if os == "linux" && a == arch {
            return Ok((digest_of(m)?, m.size()));
        }
        seen.push(format!("{}/{}", shown(&os), shown(&a)));
    }
    Err(format!(
        "no linux/{arch} manifest in the image index (it has: {})",
        if seen.is_empty() {
            "nothing".to_owned()
        } else {
            seen.join(", ")
        }
    ))
}

/// Checks a manifest's config and layers.
pub fn manifest_info(m: &ImageManifest, max_layers: usize) -> Result<ManifestInfo, String> {
    let config = m.config();
    let ct = config.media_type().to_string();
    if ct != OCI_CONFIG && ct != DOCKER_CONFIG {
        return Err(format!(
            "config media type {} is not an image config (is this an artifact rather than a container image?)",
            shown(&ct)
        ));
    }
    if m.layers().len() > max_layers {
        return Err(format!(
            "{} layers; the limit is {max_layers}",
            m.layers().len()
        ));
    }
    let mut layers = Vec::new();
    for l in m.layers() {
        let digest = digest_of(l)?;
        let media = l.media_type().to_string();
        let compression = match media.as_str() {
            "application/vnd.oci.image.layer.v1.tar" => Compression::None,
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip" => Compression::Gzip,
            "application/vnd.oci.image.layer.v1.tar+zstd" => Compression::Zstd,
            other if other.contains("nondistributable") || other.contains("foreign") => {
                return Err(format!(
                    "layer {} has media type {}: foreign/non-distributable layers are not supported",
                    digest.short(),
                    shown(other)
                ))
            }
            other => {
                return Err(format!(
                    "layer {} has unsupported media type {}",
                    digest.short(),
                    shown(other)
                ))
            }
        };
        layers.push(LayerRef {
            digest,
            size: l.size(),
            compression,
        });
    }
    Ok(ManifestInfo {
        config: digest_of(config)?,
        config_size: config.size(),
        layers,
    })
}

/// What the image's config asks of the sandbox.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuntimeConfig {
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    /// sha256 of each uncompressed layer, in order.
    pub diff_ids: Vec<Digest>,
}

/// Parses and checks an image config against the platform.
pub fn parse_config(bytes: &[u8]) -> Result<RuntimeConfig, String> {
    if bytes.len() > MAX_MANIFEST_BYTES {
        return Err(format!("image config is over {MAX_MANIFEST_BYTES} bytes"));
    }
    let c: ImageConfiguration =
        serde_json::from_slice(bytes).map_err(|e| format!("malformed image config: {e}"))?;
    let (os, arch) = (c.os().to_string(), c.architecture().to_string());
    if os != "linux" || arch != host_arch() {
        return Err(format!(
            "the image is for {}/{}; this host runs linux/{}",
            shown(&os),
            shown(&arch),
            host_arch()
        ));
    }
    let diff_ids = c
        .rootfs()
        .diff_ids()
        .iter()
        .map(|d| Digest::parse(d).map_err(|e| format!("config rootfs.diff_ids: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    let cfg = c.config().clone().unwrap_or_default();
    Ok(RuntimeConfig {
        env: cfg.env().clone().unwrap_or_default(),
        working_dir: cfg.working_dir().clone().filter(|w| !w.is_empty()),
        user: cfg.user().clone().filter(|u| !u.is_empty()),
        entrypoint: cfg.entrypoint().clone().unwrap_or_default(),
        cmd: cfg.cmd().clone().unwrap_or_default(),
        diff_ids,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    fn manifest(media: &str, config_media: &str, layer_media: &str) -> Vec<u8> {
        serde_json::json!({
            "schemaVersion": 2,
            "mediaType": media,
            "config": {"mediaType": config_media, "digest": D1, "size": 10},
            "layers": [{"mediaType": layer_media, "digest": D2, "size": 20}]
        })
        .to_string()
        .into_bytes()
    }

    #[test]
    fn oci_and_docker_manifests_parse_with_their_layer_compression() {
        for (media, config, layer, comp) in [
            (
                OCI_MANIFEST,
                OCI_CONFIG,
                "application/vnd.oci.image.layer.v1.tar+gzip",
                Compression::Gzip,
            ),
            (
                OCI_MANIFEST,
                OCI_CONFIG,
                "application/vnd.oci.image.layer.v1.tar+zstd",
                Compression::Zstd,
            ),
            (
                OCI_MANIFEST,
                OCI_CONFIG,
                "application/vnd.oci.image.layer.v1.tar",
                Compression::None,
            ),
            (
                DOCKER_MANIFEST,
                DOCKER_CONFIG,
                "application/vnd.docker.image.rootfs.diff.tar.gzip",
                Compression::Gzip,
            ),
        ] {
            let TopLevel::Manifest(m) = parse_top(&manifest(media, config, layer), None).unwrap()
            else {
                panic!("not a manifest");
            };
            let info = manifest_info(&m, 10).unwrap();
            assert_eq!(info.config.to_string(), D1);
            assert_eq!(info.layers[0].compression, comp);
            assert_eq!(info.layers[0].size, 20);
        }
    }

    #[test]
    fn bad_documents_are_refused_with_the_reason() {
        let m = manifest(
            OCI_MANIFEST,
            "application/vnd.example.artifact",
            "application/vnd.oci.image.layer.v1.tar",
        );
        let TopLevel::Manifest(m) = parse_top(&m, None).unwrap() else {
            panic!()
        };
        assert!(manifest_info(&m, 10).unwrap_err().contains("artifact"));
        let m = manifest(
            OCI_MANIFEST,
            OCI_CONFIG,
            "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
        );
        let TopLevel::Manifest(m) = parse_top(&m, None).unwrap() else {
            panic!()
        };
        assert!(manifest_info(&m, 10).unwrap_err().contains("foreign"));
        let m = manifest(OCI_MANIFEST, OCI_CONFIG, "text/plain");
        let TopLevel::Manifest(m) = parse_top(&m, None).unwrap() else {
            panic!()
        };
        assert!(manifest_info(&m, 10).unwrap_err().contains("text/plain"));
        assert!(manifest_info(&m, 0).unwrap_err().contains("limit"));
        assert!(parse_top(br#"{"schemaVersion":1}"#, None)
            .unwrap_err()
            .contains("schema"));
        assert!(parse_top(b"nope", None).unwrap_err().contains("JSON"));
        let big = vec![b' '; MAX_MANIFEST_BYTES + 1];
        assert!(parse_top(&big, None).is_err());
    }

    #[test]
    fn an_index_yields_the_host_platform() {
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {"mediaType": OCI_MANIFEST, "digest": D1, "size": 5, "platform": {"os": "linux", "architecture": "riscv64"}},
                {"mediaType": OCI_MANIFEST, "digest": D2, "size": 6, "platform": {"os": "linux", "architecture": host_arch()}}
            ]
        });
        let TopLevel::Index(i) = parse_top(index.to_string().as_bytes(), None).unwrap() else {
            panic!()
        };
        assert_eq!(
            select_platform(&i).unwrap(),
            (Digest::parse(D2).unwrap(), 6)
        );
        let only_other = serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{"mediaType": OCI_MANIFEST, "digest": D1, "size": 5, "platform": {"os": "linux", "architecture": "riscv64"}}]
        });
        let TopLevel::Index(i) = parse_top(only_other.to_string().as_bytes(), None).unwrap() else {
            panic!()
        };
        let e = select_platform(&i).unwrap_err();
        assert!(
            e.contains("linux/riscv64") && e.contains(host_arch()),
            "{e}"
        );
    }

    #[test]
    fn configs_give_env_workdir_user_and_command() {
        let c = serde_json::json!({
            "architecture": host_arch(), "os": "linux",
            "config": {"Env": ["PATH=/usr/bin", "A=1"], "WorkingDir": "/app", "User": "1000:1000",
                       "Entrypoint": ["/bin/sh", "-c"], "Cmd": ["echo hi"]},
            "rootfs": {"type": "layers", "diff_ids": [D1]}
        });
        let r = parse_config(c.to_string().as_bytes()).unwrap();
        assert_eq!(r.env, vec!["PATH=/usr/bin", "A=1"]);
        assert_eq!(r.working_dir.as_deref(), Some("/app"));
        assert_eq!(r.user.as_deref(), Some("1000:1000"));
        assert_eq!(r.entrypoint, vec!["/bin/sh", "-c"]);
        assert_eq!(r.cmd, vec!["echo hi"]);
        assert_eq!(r.diff_ids, vec![Digest::parse(D1).unwrap()]);
        let other = serde_json::json!({"architecture": "riscv64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}});
        assert!(parse_config(other.to_string().as_bytes())
            .unwrap_err()
            .contains("riscv64"));
    }
}
