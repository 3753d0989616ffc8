//! OCI image layout primitives written by hand: content-addressed blobs
//! under `blobs/sha256/`, and the tag references in `index.json`
//! (`org.opencontainers.image.ref.name`). Used where umoci cannot help: raw
//! (hostile) layers, multi-platform indexes, and reading images back for the
//! `docker save` export.

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

pub const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const LAYER_TAR_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// A content descriptor: what a manifest, index or `index.json` points at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    pub media_type: String,
    /// `sha256:<hex>`.
    pub digest: String,
    pub size: u64,
}

impl Descriptor {
    /// The descriptor as OCI JSON (`mediaType`, `digest`, `size`).
    pub fn to_json(&self) -> Value {
        json!({"mediaType": self.media_type, "digest": self.digest, "size": self.size})
    }

    /// Reads a descriptor from OCI JSON.
    pub fn from_json(v: &Value) -> Descriptor {
        Descriptor {
            media_type: v["mediaType"].as_str().unwrap_or_default().to_string(),
            digest: v["digest"].as_str().expect("descriptor digest").to_string(),
            size: v["size"].as_u64().expect("descriptor size"),
        }
    }
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// An OCI image layout directory (made by `umoci init`).
#[derive(Debug, Clone)]
pub struct Layout {
    dir: PathBuf,
}

impl Layout {
    /// Opens an existing layout; panics when `dir/oci-layout` is missing.
    pub fn open(dir: &Path) -> Layout {
        assert!(
            dir.join("oci-layout").is_file(),
            "{} is not an OCI image layout",
            dir.display()
        );
        Layout {
            dir: dir.to_path_buf(),
        }
    }

    /// Writes `bytes` as a blob and returns its descriptor.
    pub fn write_blob(&self, media_type: &str, bytes: &[u8]) -> Descriptor {
        let digest = sha256_digest(bytes);
        let path = self.blob_path(&digest);
        fs::create_dir_all(path.parent().expect("blob dir")).expect("create blobs/sha256");
        fs::write(&path, bytes).unwrap_or_else(|e| panic!("write blob {}: {e}", path.display()));
        Descriptor {
            media_type: media_type.to_string(),
            digest,
            size: bytes.len() as u64,
        }
    }

    /// Serialises `value` and writes it as a blob.
    pub fn write_json(&self, media_type: &str, value: &Value) -> Descriptor {
        self.write_blob(
            media_type,
            &serde_json::to_vec(value).expect("serialise JSON blob"),
        )
    }

    pub fn read_blob(&self, digest: &str) -> Vec<u8> {
        let path = self.blob_path(digest);
        fs::read(&path).unwrap_or_else(|e| panic!("read blob {}: {e}", path.display()))
    }

    pub fn read_json(&self, digest: &str) -> Value {
        serde_json::from_slice(&self.read_blob(digest))
            .unwrap_or_else(|e| panic!("blob {digest} is not JSON: {e}"))
    }

    /// The descriptor `index.json` lists under `tag`.
    pub fn resolve(&self, tag: &str) -> Descriptor {
        let index = self.index_json();
        let entry = index["manifests"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m["annotations"][REF_NAME] == tag)
            .unwrap_or_else(|| panic!("no tag {tag:?} in {}/index.json", self.dir.display()));
        Descriptor::from_json(entry)
    }

    /// Points `tag` at `target` in `index.json`, replacing any previous entry.
    pub fn set_ref(&self, tag: &str, target: &Descriptor) {
        let mut entry = target.to_json();
        entry["annotations"] = json!({ REF_NAME: tag });
        self.edit_refs(tag, Some(entry));
    }

    /// Drops `tag` from `index.json` (its blobs stay).
    pub fn remove_ref(&self, tag: &str) {
        self.edit_refs(tag, None);
    }

    fn edit_refs(&self, tag: &str, entry: Option<Value>) {
        let mut index = self.index_json();
        let manifests = index["manifests"]
            .as_array_mut()
            .expect("index.json has a manifests array");
        manifests.retain(|m| m["annotations"][REF_NAME] != tag);
        manifests.extend(entry);
        let path = self.dir.join("index.json");
        fs::write(
            &path,
            serde_json::to_vec(&index).expect("serialise index.json"),
        )
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }

    fn index_json(&self) -> Value {
        let path = self.dir.join("index.json");
        let text = fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        serde_json::from_slice(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest
            .strip_prefix("sha256:")
            .unwrap_or_else(|| panic!("digest {digest:?} is not sha256"));
        self.dir.join("blobs/sha256").join(hex)
    }
}
