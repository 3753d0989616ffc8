//! The local image store, content-addressed and crash-safe:
//!
//! ```text
//! <root>/blobs/sha256/<hex>   verified blobs (manifests, configs, layers)
//! <root>/disks/<hex>.erofs    boot disk per platform manifest digest
//! <root>/refs/<hex>.json      one per image name (hex = sha256 of the name)
//! <root>/tmp/                 partial downloads (resumed), unpack staging,
//!                             lock files
//! <root>/lock                 shared by pulls/imports/starts, exclusive for gc
//! ```
//!
//! Everything becomes visible by `rename` after `fsync`, in dependency
//! order (blobs, then the disk, then the ref), so a crash leaves either the
//! old state or the new one, plus leftovers in `tmp/` that the next pull
//! resumes and `gc` clears. Names in the store come from validated digests
//! only, never from image content.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use super::digest::Digest;
use super::error::ImageError;

/// How old an abandoned partial download must be before `gc` removes it.
const PARTIAL_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

/// What a name points at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefRecord {
    /// The fully qualified reference (`docker.io/library/python:3.12`), or
    /// the name given at import.
    pub name: String,
    /// The platform manifest the boot disk is built from.
    pub manifest: String,
    /// The index the manifest was chosen from, when there was one.
    pub index: Option<String>,
    pub config: String,
    pub layers: Vec<String>,
    /// Compressed bytes of all layers.
    pub size: u64,
    /// Seconds since the epoch when the name was (re)pointed.
    pub created: u64,
}

impl RefRecord {
    pub fn manifest_digest(&self) -> Result<Digest, ImageError> {
        Digest::parse(&self.manifest).map_err(|e| ImageError::Store {
            path: self.name.clone(),
            reason: e.to_string(),
        })
    }

    /// Every blob the record needs.
    fn blobs(&self) -> impl Iterator<Item = &String> {
        std::iter::once(&self.manifest)
            .chain(self.index.iter())
            .chain(std::iter::once(&self.config))
            .chain(self.layers.iter())
    }
}

/// What `gc` removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GcReport {
    pub blobs: u64,
    pub disks: u64,
    pub temporaries: u64,
    pub bytes: u64,
}

/// An flock held until dropped.
#[derive(Debug)]
pub struct Lock(#[allow(dead_code)] Flock<File>);

#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Store {
    /// Opens (creating if needed) the store at `root`. Directories are
    /// 0700: only root reaches image content; the jailer binds a disk into a
    /// jail as root.
    pub fn open(root: &Path) -> Result<Self, ImageError> {
        for d in ["blobs/sha256", "disks", "refs", "tmp"] {
            let p = root.join(d);
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&p)
                .map_err(|e| ImageError::store(&p, e))?;
        }
        Ok(Self {
            root: root.to_owned(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(d.hex())
    }

    pub fn has_blob(&self, d: &Digest) -> bool {
        self.blob_path(d).is_file()
    }

    /// Reads a small blob (manifest, config), checking its digest again.
    pub fn read_blob(&self, d: &Digest, max: usize) -> Result<Vec<u8>, ImageError> {
        let p = self.blob_path(d);
        let f = File::open(&p).map_err(|e| ImageError::store(&p, e))?;
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut std::io::Read::take(f, max as u64 + 1), &mut bytes)
            .map_err(|e| ImageError::store(&p, e))?;
        if bytes.len() > max {
            return Err(ImageError::store(&p, format!("blob is over {max} bytes")));
        }
        if Digest::of(&bytes) != *d {
            return Err(ImageError::store(
                &p,
                "blob does not match its digest (corrupt store: run `moat image rm` and pull again)",
            ));
        }
        Ok(bytes)
    }

    /// Stores a small blob whose bytes are in memory.
    pub fn write_blob(&self, bytes: &[u8]) -> Result<Digest, ImageError> {
        let d = Digest::of(bytes);
        if !self.has_blob(&d) {
            self.write_atomic(&self.blob_path(&d), bytes, 0o644)?;
        }
        Ok(d)
    }

    /// Where a download of `d` accumulates (kept across failures so the
    /// next attempt resumes).
    pub fn partial_path(&self, d: &Digest) -> PathBuf {
        self.root.join("tmp").join(format!("{}.partial", d.hex()))
    }

    /// Moves a complete, verified download into the blobs.
    pub fn commit_partial(&self, d: &Digest) -> Result<(), ImageError> {
        let from = self.partial_path(d);
        let to = self.blob_path(d);
        File::open(&from)
            .and_then(|f| f.sync_all())
            .map_err(|e| ImageError::store(&from, e))?;
        fs::rename(&from, &to).map_err(|e| ImageError::store(&to, e))?;
        sync_dir(to.parent().unwrap_or(&self.root))
    }

    /// Writes `bytes` to `path` via a temp file, fsync and rename.
    fn write_atomic(&self, path: &Path, bytes: &[u8], mode: u32) -> Result<(), ImageError> {
        let tmp = self.temp_path("write");
        let result = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
            fs::rename(&tmp, path)
        })();
        if let Err(e) = result {
            let _ = fs::remove_file(&tmp);
            return Err(ImageError::store(path, e));
        }
        sync_dir(path.parent().unwrap_or(&self.root))
    }

    /// A fresh path under `tmp/` (not created).
    pub fn temp_path(&self, what: &str) -> PathBuf {
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.root.join("tmp").join(format!(
            "{what}-{}-{n}-{}",
            std::process::id(),
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0)
        ))
    }

    pub fn disk_path(&self, manifest: &Digest) -> PathBuf {
        self.root
            .join("disks")
            .join(format!("{}.erofs", manifest.hex()))
    }

    fn ref_path(&self, name: &str) -> PathBuf {
        self.root
            .join("refs")
            .join(format!("{}.json", Digest::of(name.as_bytes()).hex()))
    }

    /// Points `record.name` at its image (the blobs and disk must exist).
    pub fn set_ref(&self, record: &RefRecord) -> Result<(), ImageError> {
        let bytes =
            serde_json::to_vec_pretty(record).map_err(|e| ImageError::store(&self.root, e))?;
        self.write_atomic(&self.ref_path(&record.name), &bytes, 0o600)
    }

    pub fn get_ref(&self, name: &str) -> Result<Option<RefRecord>, ImageError> {
        let p = self.ref_path(name);
        match fs::read(&p) {
            Ok(bytes) => {
                let r: RefRecord =
                    serde_json::from_slice(&bytes).map_err(|e| ImageError::store(&p, e))?;
                if r.name != name {
                    return Err(ImageError::store(&p, "ref file names another image"));
                }
                Ok(Some(r))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ImageError::store(&p, e)),
        }
    }

    /// Every name, sorted.
    pub fn list_refs(&self) -> Result<Vec<RefRecord>, ImageError> {
        let dir = self.root.join("refs");
        let mut out = Vec::new();
        for e in fs::read_dir(&dir).map_err(|e| ImageError::store(&dir, e))? {
            let e = e.map_err(|e| ImageError::store(&dir, e))?;
            if e.path().extension().is_some_and(|x| x == "json") {
                let bytes = fs::read(e.path()).map_err(|err| ImageError::store(&e.path(), err))?;
                let r: RefRecord = serde_json::from_slice(&bytes)
                    .map_err(|err| ImageError::store(&e.path(), err))?;
                out.push(r);
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Removes a name; its blobs go at the next `gc`.
    pub fn remove_ref(&self, name: &str) -> Result<bool, ImageError> {
        let p = self.ref_path(name);
        match fs::remove_file(&p) {
            Ok(()) => sync_dir(&self.root.join("refs")).map(|_| true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(ImageError::store(&p, e)),
        }
    }

    fn open_lock_file(path: &Path) -> Result<File, ImageError> {
        OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| ImageError::store(path, e))
    }

    fn lock_file(&self, path: &Path, arg: FlockArg) -> Result<Lock, ImageError> {
        Flock::lock(Self::open_lock_file(path)?, arg)
            .map(Lock)
            .map_err(|(_, e)| ImageError::store(path, e))
    }

    /// Held by anything that reads or adds content (blocks while `gc` runs).
    pub fn lock_shared(&self) -> Result<Lock, ImageError> {
        self.lock_file(&self.root.join("lock"), FlockArg::LockShared)
    }

    /// Held by `gc` (blocks until no pull, import or start is using the
    /// store).
    pub fn lock_exclusive(&self) -> Result<Lock, ImageError> {
        self.lock_file(&self.root.join("lock"), FlockArg::LockExclusive)
    }

    /// `lock_exclusive` if nobody holds the store, else None.
    pub fn try_lock_exclusive(&self) -> Result<Option<Lock>, ImageError> {
        let path = self.root.join("lock");
        match Flock::lock(
            Self::open_lock_file(&path)?,
            FlockArg::LockExclusiveNonblock,
        ) {
            Ok(l) => Ok(Some(Lock(l))),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
            Err((_, e)) => Err(ImageError::store(&path, e)),
        }
    }

    /// Serialises work on one key (a blob download, a disk build) across
    /// threads and processes: the second comes in after the first finished
    /// and finds the work done.
    pub fn lock_work(&self, key: &str) -> Result<Lock, ImageError> {
        debug_assert!(key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
        self.lock_file(
            &self.root.join("tmp").join(format!("{key}.lock")),
            FlockArg::LockExclusive,
        )
    }

    /// Removes everything no name needs: blobs, disks, stale temporaries.
    /// Takes the exclusive lock itself (waits for running pulls).
    pub fn gc(&self) -> Result<GcReport, ImageError> {
        let _lock = self.lock_exclusive()?;
        self.gc_locked()
    }

    /// `gc` when the caller holds the exclusive lock.
    pub fn gc_locked(&self) -> Result<GcReport, ImageError> {
        let refs = self.list_refs()?;
        let live_blobs: std::collections::BTreeSet<String> = refs
            .iter()
            .flat_map(|r| r.blobs())
            .filter_map(|d| Digest::parse(d).ok())
            .map(|d| d.hex().to_owned())
            .collect();
        let live_disks: std::collections::BTreeSet<String> = refs
            .iter()
            .filter_map(|r| Digest::parse(&r.manifest).ok())
            .map(|d| format!("{}.erofs", d.hex()))
            .collect();
        let mut report = GcReport::default();
        let sweep = |dir: PathBuf,
                     keep: &dyn Fn(&str, &fs::Metadata) -> bool,
                     count: &mut u64,
                     bytes: &mut u64|
         -> Result<(), ImageError> {
            for e in fs::read_dir(&dir).map_err(|e| ImageError::store(&dir, e))? {
                let e = e.map_err(|e| ImageError::store(&dir, e))?;
                let name = e.file_name().to_string_lossy().into_owned();
                let meta = e
                    .metadata()
                    .map_err(|err| ImageError::store(&e.path(), err))?;
                if keep(&name, &meta) {
                    continue;
                }
                let size = meta.len();
                let removed = if meta.is_dir() {
                    fs::remove_dir_all(e.path())
                } else {
                    fs::remove_file(e.path())
                };
                // One stuck entry (too deep, busy) must not stop the rest.
                if let Err(err) = removed {
                    tracing::warn!(path = %e.path().display(), %err, "gc could not remove an entry");
                    continue;
                }
                *count += 1;
                *bytes += size;
            }
            Ok(())
        };
        let (mut blobs, mut disks, mut temps, mut bytes) = (0, 0, 0, 0);
        sweep(
            self.root.join("blobs/sha256"),
            &|n, _| live_blobs.contains(n),
            &mut blobs,
            &mut bytes,
        )?;
        sweep(
            self.root.join("disks"),
            &|n, _| live_disks.contains(n),
            &mut disks,
            &mut bytes,
        )?;
        let now = SystemTime::now();
        sweep(
            self.root.join("tmp"),
            &|n, m| {
                // Lock files are tiny and may be held; partial downloads are
                // resume data for a while.
                n.ends_with(".lock")
                    || (n.ends_with(".partial")
                        && m.modified()
                            .ok()
                            .and_then(|t| now.duration_since(t).ok())
                            .is_some_and(|age| age < PARTIAL_MAX_AGE))
            },
            &mut temps,
            &mut bytes,
        )?;
        report.blobs = blobs;
        report.disks = disks;
        report.temporaries = temps;
        report.bytes = bytes;
        Ok(report)
    }

    /// Clears what a crashed run left in `tmp/` (staging trees, half-written
    /// disks), when nobody else is using the store right now.
    pub fn recover(&self) -> Result<(), ImageError> {
        if let Some(_lock) = self.try_lock_exclusive()? {
            let tmp = self.root.join("tmp");
            for e in fs::read_dir(&tmp)
                .map_err(|e| ImageError::store(&tmp, e))?
                .flatten()
            {
                let n = e.file_name().to_string_lossy().into_owned();
                if n.ends_with(".lock") || n.ends_with(".partial") {
                    continue;
                }
                let p = e.path();
                let _ = if p.is_dir() {
                    fs::remove_dir_all(&p)
                } else {
                    fs::remove_file(&p)
                };
            }
        }
        Ok(())
    }

    /// A new private staging directory under `tmp/`, removed on drop.
    pub fn staging_dir(&self) -> Result<StagingDir, ImageError> {
        let p = self.temp_path("unpack");
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&p)
            .map_err(|e| ImageError::store(&p, e))?;
        Ok(StagingDir(p))
    }

    /// Stamps a record's time.
    pub fn record(&self, mut r: RefRecord) -> RefRecord {
        r.created = now_secs();
        r
    }
}

/// A directory removed (with everything in it) when dropped.
#[derive(Debug)]
pub struct StagingDir(PathBuf);

impl StagingDir {
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for StagingDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn sync_dir(dir: &Path) -> Result<(), ImageError> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| ImageError::store(dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(store: &Store, name: &str, layer: &[u8]) -> RefRecord {
        let manifest = store
            .write_blob(format!("manifest of {name}").as_bytes())
            .unwrap();
        let config = store.write_blob(b"{}").unwrap();
        let layer = store.write_blob(layer).unwrap();
        fs::write(store.disk_path(&manifest), b"disk").unwrap();
        store.record(RefRecord {
            name: name.into(),
            manifest: manifest.to_string(),
            index: None,
            config: config.to_string(),
            layers: vec![layer.to_string()],
            size: 1,
            created: 0,
        })
    }

    #[test]
    fn refs_round_trip_and_list_sorted() {
        let t = tempfile::tempdir().unwrap();
        let s = Store::open(t.path()).unwrap();
        let b = record(&s, "docker.io/library/b:1", b"lb");
        let a = record(&s, "docker.io/library/a:1", b"la");
        s.set_ref(&b).unwrap();
        s.set_ref(&a).unwrap();
        assert_eq!(s.get_ref("docker.io/library/a:1").unwrap(), Some(a.clone()));
        assert_eq!(s.get_ref("nope").unwrap(), None);
        let names: Vec<String> = s.list_refs().unwrap().into_iter().map(|r| r.name).collect();
        assert_eq!(
            names,
            vec!["docker.io/library/a:1", "docker.io/library/b:1"]
        );
        assert!(s.remove_ref("docker.io/library/a:1").unwrap());
        assert!(!s.remove_ref("docker.io/library/a:1").unwrap());
    }

    #[test]
    fn blobs_are_checked_when_read() {
        let t = tempfile::tempdir().unwrap();
        let s = Store::open(t.path()).unwrap();
        let d = s.write_blob(b"hello").unwrap();
        assert_eq!(s.read_blob(&d, 100).unwrap(), b"hello");
        assert!(s.read_blob(&d, 2).is_err());
        fs::write(s.blob_path(&d), b"tampered").unwrap();
        assert!(s
            .read_blob(&d, 100)
            .unwrap_err()
            .to_string()
            .contains("digest"));
    }

    #[test]
    fn gc_keeps_what_names_need_and_shared_layers() {
        let t = tempfile::tempdir().unwrap();
        let s = Store::open(t.path()).unwrap();
        let a = record(&s, "a", b"shared");
        let b = record(&s, "b", b"shared");
        s.set_ref(&a).unwrap();
        s.set_ref(&b).unwrap();
        let orphan = s.write_blob(b"orphan").unwrap();
        let stale = s.staging_dir().unwrap();
        let stale_path = stale.path().to_owned();
        std::mem::forget(stale);
        fs::write(s.partial_path(&orphan), b"part").unwrap();
        let r = s.gc().unwrap();
        assert_eq!((r.blobs, r.disks, r.temporaries), (1, 0, 1), "{r:?}");
        assert!(!s.has_blob(&orphan));
        assert!(!stale_path.exists());
        assert!(
            s.partial_path(&orphan).exists(),
            "recent partials are resume data"
        );
        s.remove_ref("a").unwrap();
        let r = s.gc().unwrap();
        // a's manifest and disk go; the shared layer and config stay for b.
        assert_eq!((r.blobs, r.disks), (1, 1), "{r:?}");
        assert!(s.has_blob(&Digest::parse(&b.layers[0]).unwrap()));
        assert!(s.disk_path(&Digest::parse(&b.manifest).unwrap()).exists());
    }

    #[test]
    fn exclusive_lock_waits_for_shared_holders() {
        let t = tempfile::tempdir().unwrap();
        let s = Store::open(t.path()).unwrap();
        let shared = s.lock_shared().unwrap();
        assert!(s.try_lock_exclusive().unwrap().is_none());
        drop(shared);
        assert!(s.try_lock_exclusive().unwrap().is_some());
    }
}
