//! Images without a registry: an OCI image layout directory (`oci-layout`,
//! `index.json`, `blobs/sha256/…`) or a `docker save` tarball
//! (`manifest.json` with Config, RepoTags and Layers). Every blob is hashed
//! as it is copied into the store (a layout's file names are claims, not
//! facts); a tarball's entries are matched by name and never extracted, and
//! its in-archive symlinks (older `docker save` dedupes layers that way) are
//! resolved as names inside the archive only.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};

use oci_spec::image::ImageIndex;
use serde::Deserialize;

use super::digest::{Digest, HashingReader};
use super::error::ImageError;
use super::manifest::{parse_top, select_platform, TopLevel, MAX_MANIFEST_BYTES, OCI_MANIFEST};
use super::reference::Reference;
use super::store::Store;
use super::unpack::Compression;

/// What an import found: the name to store it under and the blobs to use.
pub struct Imported {
    pub name: String,
    pub index: Option<Digest>,
    pub manifest_bytes: Vec<u8>,
}

fn invalid(path: &Path, reason: impl Into<String>) -> ImageError {
    ImageError::Invalid {
        image: path.display().to_string(),
        reason: reason.into(),
    }
}

/// Copies `reader` into the store as a blob, hashing it on the way; checks
/// the digest when one is expected. Returns (digest, size).
pub fn copy_blob(
    store: &Store,
    reader: impl Read,
    expected: Option<&Digest>,
    max: u64,
) -> Result<(Digest, u64), ImageError> {
    let tmp = store.temp_path("import");
    let result = (|| -> Result<(Digest, u64), ImageError> {
        let mut out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)
            .map_err(|e| ImageError::store(&tmp, e))?;
        let mut hashing = HashingReader::new(reader.take(max + 1));
        io::copy(&mut hashing, &mut out).map_err(|e| ImageError::store(&tmp, e))?;
        out.flush()
            .and_then(|_| out.sync_all())
            .map_err(|e| ImageError::store(&tmp, e))?;
        let (digest, size) = hashing.finish();
        if size > max {
            return Err(ImageError::store(
                &tmp,
                format!("blob is over the {max}-byte limit"),
            ));
        }
        if let Some(e) = expected {
            if *e != digest {
                return Err(ImageError::Invalid {
                    image: "import".into(),
                    reason: format!("blob named {e} has content {digest}"),
                });
            }
        }
        let dest = store.blob_path(&digest);
        fs::rename(&tmp, &dest).map_err(|e| ImageError::store(&tmp, e))?;
        if let Some(dir) = dest.parent() {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| ImageError::store(dir, e))?;
        }
        Ok((digest, size))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// The name to store an import under: `--tag`, else what the archive says.
fn name_for(given: Option<&str>, found: Option<&str>, source: &Path) -> Result<String, ImageError> {
    let raw = given.or(found).ok_or_else(|| {
        invalid(
            source,
            "the archive names no image: give one with --tag NAME",
        )
    })?;
    Ok(Reference::parse(raw)?.to_string())
}

// ---- OCI image layout ----------------------------------------------------

fn layout_blob(dir: &Path, d: &Digest) -> PathBuf {
    dir.join("blobs/sha256").join(d.hex())
}

/// Opens a file of the layout without following a symlink at the last
/// component.
fn open_nofollow(p: &Path) -> io::Result<File> {
    // O_NONBLOCK: a FIFO planted in a layout must not hang the import.
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(p)?;
    if !f.metadata()?.is_file() {
        return Err(io::Error::other("not a regular file"));
    }
    Ok(f)
}

fn read_small(p: &Path) -> Result<Vec<u8>, ImageError> {
    let f = open_nofollow(p).map_err(|e| ImageError::store(p, e))?;
    let mut bytes = Vec::new();
    f.take(MAX_MANIFEST_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| ImageError::store(p, e))?;
    if bytes.len() > MAX_MANIFEST_BYTES {
        return Err(invalid(p, "file is over 4 MiB"));
    }
    Ok(bytes)
}

/// Reads an OCI layout: picks the manifest (by `tag`'s ref.name when the
/// layout has several), copies every blob it needs into the store.
pub fn from_layout(
    store: &Store,
    dir: &Path,
    tag: Option<&str>,
    max_layer_bytes: u64,
) -> Result<Imported, ImageError> {
    let marker = read_small(&dir.join("oci-layout"))?;
    let v: serde_json::Value =
        serde_json::from_slice(&marker).map_err(|e| invalid(dir, format!("oci-layout: {e}")))?;
    if v.get("imageLayoutVersion").and_then(|x| x.as_str()) != Some("1.0.0") {
        return Err(invalid(dir, "oci-layout must say imageLayoutVersion 1.0.0"));
    }
    let index: ImageIndex = serde_json::from_slice(&read_small(&dir.join("index.json"))?)
        .map_err(|e| invalid(dir, format!("index.json: {e}")))?;
    const REF_NAME: &str = "org.opencontainers.image.ref.name";
    let ref_name = |d: &oci_spec::image::Descriptor| {
        d.annotations()
            .as_ref()
            .and_then(|a| a.get(REF_NAME).cloned())
    };
    let chosen = match index.manifests().as_slice() {
        [] => return Err(invalid(dir, "index.json lists no manifests")),
        [one] => one.clone(),
        many => {
            let want = tag.map(|t| {
                Reference::parse(t)
                    .ok()
                    .and_then(|r| r.tag)
                    .unwrap_or_else(|| t.to_owned())
            });
            let names: Vec<String> = many.iter().filter_map(ref_name).collect();
            many.iter()
                .find(|d| {
                    let n = ref_name(d);
                    n.is_some() && (n.as_deref() == tag || n == want)
                })
                .cloned()
                .ok_or_else(|| {
                    invalid(
                        dir,
                        format!(
                            "the layout holds {} images ({}); choose one with --tag",
                            many.len(),
                            names.join(", ")
                        ),
                    )
                })?
        }
    };
    let found_name = ref_name(&chosen).filter(|n| n.contains('/') || n.contains(':'));
    let name = name_for(tag, found_name.as_deref(), dir)?;
    let top_digest =
        Digest::parse(chosen.digest().as_ref()).map_err(|e| invalid(dir, e.to_string()))?;
    let top = read_small(&layout_blob(dir, &top_digest))?;
    if Digest::of(&top) != top_digest {
        return Err(invalid(
            dir,
            format!("blob {top_digest} does not match its digest"),
        ));
    }
    let (index_digest, manifest_bytes) = match parse_top(&top, None).map_err(|r| invalid(dir, r))? {
        TopLevel::Manifest(_) => (None, top),
        TopLevel::Index(i) => {
            let (d, _) = select_platform(&i).map_err(|r| invalid(dir, r))?;
            let bytes = read_small(&layout_blob(dir, &d))?;
            if Digest::of(&bytes) != d {
                return Err(invalid(dir, format!("blob {d} does not match its digest")));
            }
            (Some(store.write_blob(&top)?), bytes)
        }
    };
    // Config and layers, hashed on the way in.
    let TopLevel::Manifest(m) = parse_top(&manifest_bytes, None).map_err(|r| invalid(dir, r))?
    else {
        return Err(invalid(dir, "expected a manifest"));
    };
    let descriptors = std::iter::once(m.config()).chain(m.layers().iter());
    for d in descriptors {
        let digest = Digest::parse(d.digest().as_ref()).map_err(|e| invalid(dir, e.to_string()))?;
        if store.has_blob(&digest) {
            continue;
        }
        let p = layout_blob(dir, &digest);
        let f = open_nofollow(&p).map_err(|e| ImageError::store(&p, e))?;
        copy_blob(store, f, Some(&digest), max_layer_bytes)?;
    }
    Ok(Imported {
        name,
        index: index_digest,
        manifest_bytes,
    })
}

// ---- docker save tarball ---------------------------------------------------

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct SaveEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// An archive member name, normalised (`./a//b` → `a/b`); None if it
/// escapes or is absolute.
fn member(name: &Path) -> Option<String> {
    let mut parts: Vec<String> = Vec::new();
    for c in name.components() {
        match c {
            Component::Normal(p) => parts.push(p.to_str()?.to_owned()),
            Component::CurDir => {}
            Component::ParentDir => {
                parts.pop()?;
            }
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(parts.join("/"))
}

fn open_archive(path: &Path) -> Result<tar::Archive<File>, ImageError> {
    let f = open_nofollow(path).map_err(|e| ImageError::store(path, e))?;
    Ok(tar::Archive::new(f))
}

/// Reads a `docker save` tarball in two passes (the manifest may come
/// last): names first, then the referenced members streamed into blobs.
pub fn from_docker_archive(
    store: &Store,
    path: &Path,
    tag: Option<&str>,
    max_layer_bytes: u64,
) -> Result<Imported, ImageError> {
    let bad = |reason: String| invalid(path, reason);
    let mut manifest_json = None;
    let mut links: BTreeMap<String, String> = BTreeMap::new();
    for entry in open_archive(path)?
        .entries()
        .map_err(|e| bad(e.to_string()))?
    {
        let mut entry = entry.map_err(|e| bad(format!("malformed archive: {e}")))?;
        let raw = entry.path().map_err(|e| bad(e.to_string()))?.into_owned();
        let Some(name) = member(&raw) else { continue };
        match entry.header().entry_type() {
            tar::EntryType::Regular if name == "manifest.json" => {
                let mut bytes = Vec::new();
                (&mut entry)
                    .take(MAX_MANIFEST_BYTES as u64 + 1)
                    .read_to_end(&mut bytes)
                    .map_err(|e| bad(e.to_string()))?;
                if bytes.len() > MAX_MANIFEST_BYTES {
                    return Err(bad("manifest.json is over 4 MiB".into()));
                }
                manifest_json = Some(bytes);
            }
            tar::EntryType::Symlink => {
                if let Ok(Some(target)) = entry.link_name() {
                    let parent = Path::new(&name).parent().unwrap_or(Path::new(""));
                    if let Some(t) = member(&parent.join(target)) {
                        links.insert(name, t);
                    }
                }
            }
            _ => {}
        }
    }
    let manifest_json = manifest_json.ok_or_else(|| {
        bad(
            "no manifest.json: not a `docker save` tarball (an OCI layout must be a directory)"
                .into(),
        )
    })?;
    let entries: Vec<SaveEntry> =
        serde_json::from_slice(&manifest_json).map_err(|e| bad(format!("manifest.json: {e}")))?;
    let chosen = match entries.as_slice() {
        [] => return Err(bad("manifest.json lists no images".into())),
        [one] => one,
        many => {
            let want = tag
                .and_then(|t| Reference::parse(t).ok())
                .map(|r| r.to_string());
            many.iter()
                .find(|e| {
                    e.repo_tags.iter().flatten().any(|t| {
                        Some(t.as_str()) == tag
                            || Reference::parse(t).ok().map(|r| r.to_string()) == want
                    })
                })
                .ok_or_else(|| {
                    bad(format!(
                        "the archive holds {} images; choose one with --tag",
                        many.len()
                    ))
                })?
        }
    };
    let found = chosen.repo_tags.as_ref().and_then(|t| t.first()).cloned();
    let name = name_for(tag, found.as_deref(), path)?;
    // Resolve in-archive symlinks (bounded, so a loop ends).
    let resolve = |n: &str| -> Result<String, ImageError> {
        let mut cur =
            member(Path::new(n)).ok_or_else(|| bad(format!("member {n:?} escapes the archive")))?;
        for _ in 0..16 {
            match links.get(&cur) {
                Some(t) => cur = t.clone(),
                None => return Ok(cur),
            }
        }
        Err(bad(format!("member {n:?}: symlink loop")))
    };
    let config_member = resolve(&chosen.config)?;
    let layer_members: Vec<String> = chosen
        .layers
        .iter()
        .map(|l| resolve(l))
        .collect::<Result<_, _>>()?;
    let wanted: BTreeSet<&String> = std::iter::once(&config_member)
        .chain(layer_members.iter())
        .collect();
    let mut stored: BTreeMap<String, (Digest, u64, Compression)> = BTreeMap::new();
    for entry in open_archive(path)?
        .entries()
        .map_err(|e| bad(e.to_string()))?
    {
        let mut entry = entry.map_err(|e| bad(format!("malformed archive: {e}")))?;
        if entry.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let raw = entry.path().map_err(|e| bad(e.to_string()))?.into_owned();
        let Some(name) = member(&raw) else { continue };
        if !wanted.contains(&name) || stored.contains_key(&name) {
            continue;
        }
        let mut head = [0u8; 8];
        let n = read_up_to(&mut entry, &mut head).map_err(|e| bad(e.to_string()))?;
        let compression = Compression::detect(&head[..n]);
        let reader = io::Cursor::new(head[..n].to_vec()).chain(&mut entry);
        let (digest, size) = copy_blob(store, reader, None, max_layer_bytes)?;
        stored.insert(name, (digest, size, compression));
    }
    let get = |m: &String| {
        stored
            .get(m)
            .cloned()
            .ok_or_else(|| bad(format!("member {m} named by manifest.json is missing")))
    };
    let (config_digest, config_size, _) = get(&config_member)?;
    let layers: Vec<serde_json::Value> = layer_members
        .iter()
        .map(|m| {
            let (d, size, c) = get(m)?;
            let media = match c {
                Compression::None => "application/vnd.oci.image.layer.v1.tar",
                Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
                Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
            };
            Ok(serde_json::json!({"mediaType": media, "digest": d.to_string(), "size": size}))
        })
        .collect::<Result<_, ImageError>>()?;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest.to_string(),
            "size": config_size,
        },
        "layers": layers,
    });
    Ok(Imported {
        name,
        index: None,
        manifest_bytes: serde_json::to_vec(&manifest).map_err(|e| bad(e.to_string()))?,
    })
}

fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_member_names_stay_inside() {
        assert_eq!(
            member(Path::new("./a//b/layer.tar")).as_deref(),
            Some("a/b/layer.tar")
        );
        assert_eq!(member(Path::new("a/../b")).as_deref(), Some("b"));
        assert_eq!(member(Path::new("../x")), None);
        assert_eq!(member(Path::new("/etc/passwd")), None);
    }
}
