//! `Images`: what the broker and the CLI use. It resolves a reference to a
//! boot disk (store first; pull when allowed), pulls (manifest or index,
//! platform choice, config, layers downloaded concurrently and bounded,
//! boot disk, then the name — in that order, so a crash never leaves a name
//! pointing at something missing), and dedupes concurrent work: pulls of
//! one name inside this process share one pull; blob downloads and disk
//! builds are serialised by work locks across processes.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use futures_util::stream::{self, TryStreamExt};

use super::bootdisk::{ensure_disk, BuildStats};
use super::digest::Digest;
use super::error::ImageError;
use super::manifest::{
    manifest_info, parse_config, parse_top, select_platform, LayerRef, ManifestInfo, RuntimeConfig,
    TopLevel, MAX_MANIFEST_BYTES,
};
use super::reference::Reference;
use super::registry::{RegistryClient, RegistryConfig};
use super::store::{Lock, RefRecord, Store};
use super::unpack::UnpackLimits;

/// Operator limits on images.
#[derive(Debug, Clone)]
pub struct ImageLimits {
    /// Registries `sandbox.start` may pull from (empty: any). Operator
    /// pulls and imports are not limited by it.
    pub allowed_registries: Vec<String>,
    /// Pulls running at once in this process; more wait their turn.
    pub concurrent_pulls: usize,
    pub max_layers: usize,
    /// Compressed size of one layer.
    pub max_layer_bytes: u64,
    pub concurrent_downloads: usize,
    pub unpack: UnpackLimits,
}

/// What a pull reports as it goes (the CLI draws it; the broker logs).
#[derive(Debug, Clone)]
pub enum Progress {
    Resolved {
        manifest: Digest,
        layers: usize,
        bytes: u64,
    },
    LayerBytes {
        layer: Digest,
        have: u64,
        size: u64,
    },
    LayerDone {
        layer: Digest,
        cached: bool,
    },
    BuildingDisk,
    Done {
        stats: Option<BuildStats>,
    },
}

pub type ProgressFn = Arc<dyn Fn(Progress) + Send + Sync>;

/// An image ready to boot; holds the store's shared lock (so `gc` cannot
/// remove the disk) until dropped.
#[derive(Debug)]
pub struct ReadyImage {
    pub disk: PathBuf,
    pub config: RuntimeConfig,
    pub record: RefRecord,
    _lock: Lock,
}

pub struct Images {
    store: Store,
    client: RegistryClient,
    limits: ImageLimits,
    /// One pull per name at a time in this process.
    inflight: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// `concurrent_pulls` permits.
    pulls: tokio::sync::Semaphore,
}

/// A per-name pull gate; the map entry goes when the last holder drops.
struct Gate<'a>(
    Arc<tokio::sync::Mutex<()>>,
    &'a Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    String,
);

impl Drop for Gate<'_> {
    fn drop(&mut self) {
        if let Ok(mut map) = self.1.lock() {
            // Ours and the map's: nobody else waits on it.
            if Arc::strong_count(&self.0) <= 2 {
                map.remove(&self.2);
            }
        }
    }
}

impl std::fmt::Debug for Images {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Images")
            .field("store", &self.store)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

fn blocking_err(e: tokio::task::JoinError) -> ImageError {
    ImageError::Store {
        path: "worker".into(),
        reason: e.to_string(),
    }
}

impl Images {
    pub fn new(
        store: Store,
        registries: BTreeMap<String, RegistryConfig>,
        limits: ImageLimits,
    ) -> Result<Self, ImageError> {
        Ok(Self {
            store,
            client: RegistryClient::new(registries)?,
            limits: limits.clone(),
            inflight: Mutex::new(HashMap::new()),
            pulls: tokio::sync::Semaphore::new(limits.concurrent_pulls.max(1)),
        })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn limits(&self) -> &ImageLimits {
        &self.limits
    }

    async fn shared_lock(&self) -> Result<Lock, ImageError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.lock_shared())
            .await
            .map_err(blocking_err)?
    }

    /// The image for `r`, from the store, or pulled when `pull` allows.
    pub async fn ready(
        &self,
        r: &Reference,
        pull: bool,
        progress: ProgressFn,
    ) -> Result<ReadyImage, ImageError> {
        let name = r.to_string();
        if self.store.get_ref(&name)?.is_none() {
            if !pull {
                return Err(ImageError::NotFound {
                    image: name,
                    detail: "it is not in the local store and this server does not pull images; ask the operator to `moat image pull` or import it".into(),
                });
            }
            let allowed = &self.limits.allowed_registries;
            if !allowed.is_empty() && !allowed.contains(&r.registry) {
                return Err(ImageError::NotFound {
                    image: name,
                    detail: format!(
                        "it is not in the local store, and this server pulls only from {}",
                        allowed.join(", ")
                    ),
                });
            }
            // Another start may be pulling it: wait for that one, then use
            // its result rather than pulling again.
            let gate = self.gate(&name)?;
            let _turn = gate.0.lock().await;
            if self.store.get_ref(&name)?.is_none() {
                self.pull_locked(r, progress.clone()).await?;
            }
        }
        let lock = self.shared_lock().await?;
        let record = self
            .store
            .get_ref(&name)?
            .ok_or_else(|| ImageError::NotFound {
                image: name.clone(),
                detail: "it was removed from the store while starting".into(),
            })?;
        self.ready_record(record, lock, progress).await
    }

    /// Makes sure the disk of a stored image exists (rebuilding it from the
    /// blobs if it went missing).
    async fn ready_record(
        &self,
        record: RefRecord,
        lock: Lock,
        progress: ProgressFn,
    ) -> Result<ReadyImage, ImageError> {
        let manifest = record.manifest_digest()?;
        let bytes = self.store.read_blob(&manifest, MAX_MANIFEST_BYTES)?;
        let info = self.checked_manifest(&record.name, &bytes)?;
        let config_bytes = self.store.read_blob(&info.config, MAX_MANIFEST_BYTES)?;
        let config = parse_config(&config_bytes).map_err(|reason| ImageError::Invalid {
            image: record.name.clone(),
            reason,
        })?;
        let disk = self
            .disk(&record.name, &manifest, &info, &config, progress)
            .await?;
        Ok(ReadyImage {
            disk,
            config,
            record,
            _lock: lock,
        })
    }

    async fn disk(
        &self,
        image: &str,
        manifest: &Digest,
        info: &ManifestInfo,
        config: &RuntimeConfig,
        progress: ProgressFn,
    ) -> Result<PathBuf, ImageError> {
        if self.store.disk_path(manifest).is_file() {
            return Ok(self.store.disk_path(manifest));
        }
        progress(Progress::BuildingDisk);
        let (store, image, manifest, layers, diff_ids, limits) = (
            self.store.clone(),
            image.to_owned(),
            manifest.clone(),
            info.layers.clone(),
            config.diff_ids.clone(),
            self.limits.unpack.clone(),
        );
        let (disk, stats) = tokio::task::spawn_blocking(move || {
            // Its own shared lock: if the start waiting for it gives up,
            // the build still keeps gc away until it is done.
            let _lock = store.lock_shared()?;
            ensure_disk(&store, &image, &manifest, &layers, &diff_ids, &limits)
        })
        .await
        .map_err(blocking_err)??;
        progress(Progress::Done { stats });
        Ok(disk)
    }

    fn checked_manifest(&self, image: &str, bytes: &[u8]) -> Result<ManifestInfo, ImageError> {
        let invalid = |reason: String| ImageError::Invalid {
            image: image.to_owned(),
            reason,
        };
        let TopLevel::Manifest(m) = parse_top(bytes, None).map_err(invalid)? else {
            return Err(invalid("expected an image manifest, found an index".into()));
        };
        let info = manifest_info(&m, self.limits.max_layers).map_err(invalid)?;
        // Before anything is fetched: the whole image, compressed, within
        // the uncompressed cap (so a failed pull leaves at most that much).
        let total = info
            .layers
            .iter()
            .try_fold(0u64, |sum, l| sum.checked_add(l.size))
            .filter(|t| *t <= self.limits.unpack.max_total_bytes);
        if total.is_none() {
            return Err(invalid(format!(
                "its layers add up to more than {} bytes (images.max_image_bytes)",
                self.limits.unpack.max_total_bytes
            )));
        }
        for l in &info.layers {
            if l.size > self.limits.max_layer_bytes {
                return Err(ImageError::Layer {
                    image: image.to_owned(),
                    layer: l.digest.to_string(),
                    reason: format!(
                        "{} bytes compressed; the limit is {} (max_layer_bytes)",
                        l.size, self.limits.max_layer_bytes
                    ),
                });
            }
        }
        Ok(info)
    }

    /// Pulls `r` from its registry and points its name at it.
    pub async fn pull(&self, r: &Reference, progress: ProgressFn) -> Result<RefRecord, ImageError> {
        let gate = self.gate(&r.to_string())?;
        let _turn = gate.0.lock().await;
        self.pull_locked(r, progress).await
    }

    /// The per-name gate (shared by everyone pulling that name now).
    fn gate(&self, name: &str) -> Result<Gate<'_>, ImageError> {
        let mut map = self.inflight.lock().map_err(|_| ImageError::Store {
            path: "pulls".into(),
            reason: "lock poisoned".into(),
        })?;
        let lock = map.entry(name.to_owned()).or_default().clone();
        Ok(Gate(lock, &self.inflight, name.to_owned()))
    }

    async fn pull_locked(
        &self,
        r: &Reference,
        progress: ProgressFn,
    ) -> Result<RefRecord, ImageError> {
        let name = r.to_string();
        let _permit = self.pulls.acquire().await.map_err(|e| ImageError::Store {
            path: "pulls".into(),
            reason: e.to_string(),
        })?;
        let _lock = self.shared_lock().await?;
        let invalid = |reason: String| ImageError::Invalid {
            image: name.clone(),
            reason,
        };
        let (top, content_type) = self.client.manifest(r, &r.manifest_reference()).await?;
        let (index, manifest_bytes) =
            match parse_top(&top, content_type.as_deref()).map_err(invalid)? {
                TopLevel::Manifest(_) => (None, top),
                TopLevel::Index(index) => {
                    let (digest, size) = select_platform(&index).map_err(invalid)?;
                    if size > MAX_MANIFEST_BYTES as u64 {
                        return Err(invalid(format!("manifest {digest} is {size} bytes")));
                    }
                    let index_digest = self.store.write_blob(&top)?;
                    let (bytes, _) = self.client.manifest(r, &digest.to_string()).await?;
                    (Some(index_digest), bytes)
                }
            };
        let info = self.checked_manifest(&name, &manifest_bytes)?;
        let manifest = self.store.write_blob(&manifest_bytes)?;
        let total: u64 = info.layers.iter().map(|l| l.size).sum();
        progress(Progress::Resolved {
            manifest: manifest.clone(),
            layers: info.layers.len(),
            bytes: total,
        });
        // The config: small, fetched like a layer, then parsed and checked.
        if info.config_size > MAX_MANIFEST_BYTES as u64 {
            return Err(invalid(format!("config is {} bytes", info.config_size)));
        }
        self.fetch_blob(r, &info.config, info.config_size, None)
            .await?;
        let config_bytes = self.store.read_blob(&info.config, MAX_MANIFEST_BYTES)?;
        let config = parse_config(&config_bytes).map_err(invalid)?;
        if config.diff_ids.len() != info.layers.len() {
            return Err(invalid(format!(
                "the config lists {} layers, the manifest {}",
                config.diff_ids.len(),
                info.layers.len()
            )));
        }
        stream::iter(info.layers.iter().map(Ok::<&LayerRef, ImageError>))
            .try_for_each_concurrent(self.limits.concurrent_downloads.max(1), |l| {
                let progress = progress.clone();
                async move {
                    let cached = self.store.has_blob(&l.digest);
                    self.fetch_blob(r, &l.digest, l.size, Some(progress.clone()))
                        .await?;
                    progress(Progress::LayerDone {
                        layer: l.digest.clone(),
                        cached,
                    });
                    Ok(())
                }
            })
            .await?;
        self.disk(&name, &manifest, &info, &config, progress.clone())
            .await?;
        let record = self.store.record(RefRecord {
            name: name.clone(),
            manifest: manifest.to_string(),
            index: index.map(|d| d.to_string()),
            config: info.config.to_string(),
            layers: info.layers.iter().map(|l| l.digest.to_string()).collect(),
            size: total,
            created: 0,
        });
        self.store.set_ref(&record)?;
        tracing::info!(image = %name, manifest = %manifest.short(), layers = info.layers.len(), bytes = total, "image pulled");
        Ok(record)
    }

    /// Makes sure blob `d` is in the store: downloads it under its work
    /// lock (another process may be fetching it: then this waits and finds
    /// it there), resuming a partial download.
    async fn fetch_blob(
        &self,
        r: &Reference,
        d: &Digest,
        size: u64,
        progress: Option<ProgressFn>,
    ) -> Result<(), ImageError> {
        if self.store.has_blob(d) {
            return Ok(());
        }
        let store = self.store.clone();
        let key = format!("blob-{}", d.hex());
        let _work = tokio::task::spawn_blocking(move || store.lock_work(&key))
            .await
            .map_err(blocking_err)??;
        if self.store.has_blob(d) {
            return Ok(());
        }
        let partial = self.store.partial_path(d);
        let layer = d.clone();
        let report = move |have: u64| {
            if let Some(p) = &progress {
                p(Progress::LayerBytes {
                    layer: layer.clone(),
                    have,
                    size,
                });
            }
        };
        self.client
            .blob_to_file(r, d, size, &partial, &report)
            .await?;
        let (store, d) = (self.store.clone(), d.clone());
        tokio::task::spawn_blocking(move || store.commit_partial(&d))
            .await
            .map_err(blocking_err)?
    }

    /// Imports an OCI layout directory or a `docker save` tarball under
    /// `tag` (or the name the archive carries). Blocking.
    pub fn import_path(
        &self,
        path: &std::path::Path,
        tag: Option<&str>,
        replace: bool,
        progress: ProgressFn,
    ) -> Result<RefRecord, ImageError> {
        let _lock = self.store.lock_shared()?;
        let meta = std::fs::symlink_metadata(path).map_err(|e| ImageError::store(path, e))?;
        let imported = if meta.is_dir() {
            super::import::from_layout(&self.store, path, tag, self.limits.max_layer_bytes)?
        } else {
            super::import::from_docker_archive(&self.store, path, tag, self.limits.max_layer_bytes)?
        };
        let name = imported.name.clone();
        let info = self.checked_manifest(&name, &imported.manifest_bytes)?;
        let manifest = self.store.write_blob(&imported.manifest_bytes)?;
        if let Some(existing) = self.store.get_ref(&name)? {
            if existing.manifest != manifest.to_string() && !replace {
                return Err(ImageError::Invalid {
                    image: name,
                    reason: format!(
                        "the store already has this name for another image ({}); pass --force to replace it",
                        existing.manifest
                    ),
                });
            }
        }
        let config_bytes = self.store.read_blob(&info.config, MAX_MANIFEST_BYTES)?;
        let config = parse_config(&config_bytes).map_err(|reason| ImageError::Invalid {
            image: name.clone(),
            reason,
        })?;
        for l in &info.layers {
            if !self.store.has_blob(&l.digest) {
                return Err(ImageError::Layer {
                    image: name.clone(),
                    layer: l.digest.to_string(),
                    reason: "missing from the archive".into(),
                });
            }
        }
        let total = info.layers.iter().map(|l| l.size).sum();
        progress(Progress::Resolved {
            manifest: manifest.clone(),
            layers: info.layers.len(),
            bytes: total,
        });
        progress(Progress::BuildingDisk);
        let (_, stats) = ensure_disk(
            &self.store,
            &name,
            &manifest,
            &info.layers,
            &config.diff_ids,
            &self.limits.unpack,
        )?;
        progress(Progress::Done { stats });
        let record = self.store.record(RefRecord {
            name: name.clone(),
            manifest: manifest.to_string(),
            index: imported.index.map(|d| d.to_string()),
            config: info.config.to_string(),
            layers: info.layers.iter().map(|l| l.digest.to_string()).collect(),
            size: total,
            created: 0,
        });
        self.store.set_ref(&record)?;
        tracing::info!(image = %name, manifest = %manifest.short(), "image imported");
        Ok(record)
    }

    /// Removes a name (its blobs and disk go with the next `gc`, which this
    /// runs). Returns false when there was no such name.
    pub fn remove(&self, name: &str) -> Result<bool, ImageError> {
        let canonical = Reference::parse(name)?.to_string();
        let removed = self.store.remove_ref(&canonical)?;
        if removed {
            self.store.gc()?;
        }
        Ok(removed)
    }

    /// Every stored image.
    pub fn list(&self) -> Result<Vec<RefRecord>, ImageError> {
        self.store.list_refs()
    }
}
