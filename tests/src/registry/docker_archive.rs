//! `docker save`-style tarballs made from an image in an OCI layout:
//! `<diff_id hex>/layer.tar` per layer (uncompressed), the config as
//! `<config hex>.json`, `manifest.json` and `repositories`, in the order
//! `docker save` writes them. The legacy per-layer v1 files (`VERSION`,
//! `json`) are left out; `docker load` and other importers go by
//! `manifest.json`.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use flate2::read::GzDecoder;
use serde_json::{json, Value};
use tar::Header;

use super::layout::{Layout, LAYER_TAR, LAYER_TAR_GZIP, MANIFEST};

/// Writes the image `tag` of `layout` to `out` as `docker save` would for
/// `repo_tag` (`name:tag`). Hostile layers are copied byte for byte
/// (gzip blobs are decompressed).
pub fn docker_archive(layout: &Path, tag: &str, repo_tag: &str, out: &Path) {
    let layout = Layout::open(layout);
    let target = layout.resolve(tag);
    assert_eq!(
        target.media_type, MANIFEST,
        "{tag:?} is not a single-platform image; docker save has no index form"
    );
    let manifest = layout.read_json(&target.digest);
    let config_digest = manifest["config"]["digest"]
        .as_str()
        .expect("config digest");
    let config = layout.read_json(config_digest);
    let diff_ids = config["rootfs"]["diff_ids"].as_array().expect("diff_ids");
    let layers = manifest["layers"].as_array().expect("manifest layers");
    assert_eq!(diff_ids.len(), layers.len(), "one diff_id per layer");

    let file = File::create(out).unwrap_or_else(|e| panic!("create {}: {e}", out.display()));
    let mut tar = tar::Builder::new(file);
    let mut layer_paths: Vec<String> = Vec::new();
    for (layer, diff_id) in layers.iter().zip(diff_ids) {
        let id = hex_of(diff_id.as_str().expect("diff_id"));
        let path = format!("{id}/layer.tar");
        if !layer_paths.contains(&path) {
            append(&mut tar, &path, &uncompressed(&layout, layer));
        }
        layer_paths.push(path);
    }
    let config_path = format!("{}.json", hex_of(config_digest));
    append(&mut tar, &config_path, &layout.read_blob(config_digest));
    let docker_manifest = json!([{
        "Config": config_path,
        "RepoTags": [repo_tag],
        "Layers": layer_paths,
    }]);
    append(
        &mut tar,
        "manifest.json",
        docker_manifest.to_string().as_bytes(),
    );
    let (name, name_tag) = split_repo_tag(repo_tag);
    let top = layer_paths.last().map(|p| p.trim_end_matches("/layer.tar"));
    let repositories = json!({ name: { name_tag: top } });
    append(
        &mut tar,
        "repositories",
        repositories.to_string().as_bytes(),
    );
    tar.into_inner().expect("finish docker archive");
}

fn uncompressed(layout: &Layout, layer: &Value) -> Vec<u8> {
    let blob = layout.read_blob(layer["digest"].as_str().expect("layer digest"));
    match layer["mediaType"].as_str().unwrap_or_default() {
        LAYER_TAR => blob,
        LAYER_TAR_GZIP => {
            let mut tar = Vec::new();
            GzDecoder::new(&blob[..])
                .read_to_end(&mut tar)
                .expect("gunzip layer");
            tar
        }
        other => panic!("docker archive: unsupported layer media type {other:?}"),
    }
}

fn append(tar: &mut tar::Builder<File>, path: &str, data: &[u8]) {
    let mut header = Header::new_ustar();
    header.set_size(data.len() as u64);
    header.set_mode(0o644);
    header.set_mtime(0);
    tar.append_data(&mut header, path, data)
        .unwrap_or_else(|e| panic!("docker archive: append {path}: {e}"));
}

fn hex_of(digest: &str) -> &str {
    digest
        .strip_prefix("sha256:")
        .unwrap_or_else(|| panic!("digest {digest:?} is not sha256"))
}

/// `host:5000/name:tag` -> (`host:5000/name`, `tag`); no tag means `latest`.
fn split_repo_tag(repo_tag: &str) -> (&str, &str) {
    match repo_tag.rsplit_once(':') {
        Some((name, tag)) if !tag.contains('/') => (name, tag),
        _ => (repo_tag, "latest"),
    }
}
