//! Multi-platform images: single-platform images built into one layout,
//! listed with their `platform` in an OCI image index blob written by hand
//! (umoci cannot write one), and `index.json` pointing the tag at it.

use std::fs;
use std::path::Path;

use serde_json::json;

use super::image::{busybox_rootfs, ImageBuilder, Platform};
use super::layout::{Descriptor, Layout, INDEX};

/// What [`build_index`] wrote.
#[derive(Debug, Clone)]
pub struct BuiltIndex {
    /// The index blob `index.json` points the tag at.
    pub index: Descriptor,
    /// Each platform's image manifest, in the order given.
    pub manifests: Vec<(Platform, Descriptor)>,
}

/// Builds each image (with its own [`ImageBuilder::platform`]) into `layout`
/// and tags an index of them as `tag`; `index.json` lists only `tag`.
pub fn build_index(layout: &Path, tag: &str, images: &[ImageBuilder]) -> BuiltIndex {
    let mut manifests = Vec::new();
    for (i, image) in images.iter().enumerate() {
        let part = format!("{tag}-platform{i}");
        let built = image.build(layout, &part);
        manifests.push((built.platform, built.manifest));
        Layout::open(layout).remove_ref(&part);
    }
    let body = json!({
        "schemaVersion": 2,
        "mediaType": INDEX,
        "manifests": manifests.iter().map(|(platform, manifest)| {
            let mut entry = manifest.to_json();
            entry["platform"] = json!({"architecture": platform.architecture, "os": platform.os});
            entry
        }).collect::<Vec<_>>(),
    });
    let layout = Layout::open(layout);
    let index = layout.write_json(INDEX, &body);
    layout.set_ref(tag, &index);
    BuiltIndex { index, manifests }
}

/// The standard two-platform test index: linux/amd64 is a bootable busybox
/// image whose `/platform` reads `amd64\n`; linux/arm64 holds only
/// `/platform` reading `arm64\n` (never run, only resolved).
pub fn two_platform_index(layout: &Path, tag: &str) -> BuiltIndex {
    let trees = tempfile::tempdir().expect("temp dir for platform trees");
    let amd64 = trees.path().join("amd64");
    let arm64 = trees.path().join("arm64");
    busybox_rootfs(&amd64);
    fs::create_dir(&arm64).expect("create arm64 tree");
    fs::write(amd64.join("platform"), "amd64\n").expect("write /platform");
    fs::write(arm64.join("platform"), "arm64\n").expect("write /platform");
    let path = "/usr/sbin:/usr/bin:/sbin:/bin";
    build_index(
        layout,
        tag,
        &[
            ImageBuilder::new().dir(&amd64).env("PATH", path),
            ImageBuilder::new()
                .dir(&arm64)
                .env("PATH", path)
                .platform("linux", "arm64"),
        ],
    )
}
