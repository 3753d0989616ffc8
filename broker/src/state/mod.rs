//! The broker's durable state: one [`SandboxRecord`] per sandbox under
//! `<state_dir>/sandboxes/<namespace>/<name>.record`, each written
//! atomically (`atomic.rs`), so a crash at any instant leaves either the old
//! record or the new one, never a torn one. Records are read back once, at
//! broker start, to keep definitions and re-adopt running VMs; every field is
//! re-validated then, as if a stranger had written it.

mod atomic;

use std::path::{Path, PathBuf};

use moat_proto::state::{SandboxRecord, RECORD_FORMAT};
use prost::Message;

/// Largest record file read back (definitions are capped far below this).
const MAX_RECORD_BYTES: u64 = 16 << 20;
const SUFFIX: &str = "record";

/// Why the state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("sandbox state {path}: {source}{hint}", hint = hint(source))]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("sandbox state {path} is unreadable: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

fn hint(e: &std::io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => {
            "; the state directory's filesystem is full: free space there (nothing was changed)"
        }
        Some(libc::EROFS) => "; the state directory's filesystem is read-only",
        _ => "",
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The record files of every sandbox.
#[derive(Debug)]
pub struct StateStore {
    dir: PathBuf,
}

impl StateStore {
    /// Opens (creating, root-only) `<state_dir>/sandboxes`.
    pub fn open(state_dir: &Path) -> Result<Self, StateError> {
        let dir = state_dir.join("sandboxes");
        atomic::private_dir(&dir).map_err(io(&dir))?;
        Ok(Self { dir })
    }

    /// Where the records live.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, namespace: &str, name: &str) -> PathBuf {
        self.dir.join(namespace).join(format!("{name}.{SUFFIX}"))
    }

    /// Writes `record` durably, replacing the sandbox's previous one. On any
    /// error the previous record is untouched.
    pub fn save(&self, record: &SandboxRecord) -> Result<(), StateError> {
        check_names(&record.namespace, &record.name).map_err(|reason| StateError::Corrupt {
            path: self.dir.clone(),
            reason,
        })?;
        let ns_dir = self.dir.join(&record.namespace);
        if !ns_dir.is_dir() {
            atomic::private_dir(&ns_dir).map_err(io(&ns_dir))?;
            // The new directory's own entry must be durable too.
            atomic::sync_dir(&self.dir).map_err(io(&self.dir))?;
        }
        let path = self.path(&record.namespace, &record.name);
        let mut record = record.clone();
        record.format = RECORD_FORMAT;
        atomic::replace(&path, &record.encode_to_vec()).map_err(io(&path))
    }

    /// Forgets a sandbox (durably); a missing record is not an error.
    pub fn remove(&self, namespace: &str, name: &str) -> Result<(), StateError> {
        if check_names(namespace, name).is_err() {
            return Ok(());
        }
        let path = self.path(namespace, name);
        match std::fs::remove_file(&path) {
            Ok(()) => atomic::sync_dir(&self.dir.join(namespace)).map_err(io(&path)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// Every record, sorted by namespace and name, and the records set
    /// aside: a file whose content cannot be used is renamed `*.unreadable`
    /// (kept for the operator, never read again); leftover temporary files
    /// of interrupted writes are deleted. An I/O error (a directory or file
    /// that cannot be read) is an error: guessing would make the broker
    /// clean up VMs whose records it merely failed to read.
    pub fn load_all(&self) -> Result<(Vec<SandboxRecord>, Vec<StateError>), StateError> {
        let mut records = Vec::new();
        let mut problems = Vec::new();
        let namespaces = match std::fs::read_dir(&self.dir) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((records, problems)),
            Err(e) => return Err(io(&self.dir)(e)),
        };
        for ns in namespaces {
            let ns = ns.map_err(io(&self.dir))?;
            let ns_name = ns.file_name().to_string_lossy().into_owned();
            if !ns.file_type().map_err(io(&ns.path()))?.is_dir() {
                continue;
            }
            let ns_path = ns.path();
            let files = std::fs::read_dir(&ns_path).map_err(io(&ns_path))?;
            for f in files {
                let f = f.map_err(io(&ns_path))?;
                let path = f.path();
                let file_name = f.file_name().to_string_lossy().into_owned();
                if atomic::is_temporary(&file_name) {
                    let _ = std::fs::remove_file(&path);
                    continue;
                }
                let Some(name) = file_name.strip_suffix(&format!(".{SUFFIX}")) else {
                    continue;
                };
                match read_record(&path, &ns_name, name) {
                    Ok(r) => records.push(r),
                    Err(e @ StateError::Corrupt { .. }) => {
                        let aside = path.with_extension("unreadable");
                        let _ = std::fs::rename(&path, &aside);
                        problems.push(e);
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        records.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        Ok((records, problems))
    }
}

fn check_names(namespace: &str, name: &str) -> Result<(), String> {
    moat_proto::names::validate_name("namespace", namespace).map_err(|e| e.to_string())?;
    moat_proto::names::validate_name("sandbox name", name).map_err(|e| e.to_string())
}

fn read_record(path: &Path, namespace: &str, name: &str) -> Result<SandboxRecord, StateError> {
    use std::io::Read;
    let corrupt = |reason: String| StateError::Corrupt {
        path: path.to_owned(),
        reason,
    };
    check_names(namespace, name).map_err(corrupt)?;
    let f = std::fs::File::open(path).map_err(io(path))?;
    let mut bytes = Vec::new();
    f.take(MAX_RECORD_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io(path))?;
    if bytes.len() as u64 > MAX_RECORD_BYTES {
        return Err(corrupt(format!("over {MAX_RECORD_BYTES} bytes")));
    }
    let r = SandboxRecord::decode(bytes.as_slice()).map_err(|e| corrupt(e.to_string()))?;
    if r.format != RECORD_FORMAT {
        return Err(corrupt(format!(
            "record format {} (this broker reads {RECORD_FORMAT})",
            r.format
        )));
    }
    if r.namespace != namespace || r.name != name {
        return Err(corrupt(format!(
            "names {}/{} inside do not match the file's place",
            r.namespace, r.name
        )));
    }
    if r.config.is_none() {
        return Err(corrupt("no definition".into()));
    }
    Ok(r)
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use moat_proto::broker::SandboxConfig;
    use moat_proto::state::VmRecord;

    fn record(ns: &str, name: &str) -> SandboxRecord {
        SandboxRecord {
            namespace: ns.into(),
            name: name.into(),
            config: Some(SandboxConfig {
                image: Some("python".into()),
                ..Default::default()
            }),
            vm: Some(VmRecord {
                slot: 3,
                pid: 42,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn saved_records_load_back_and_removal_is_durable() {
        let t = tempfile::tempdir().unwrap();
        let s = StateStore::open(t.path()).unwrap();
        s.save(&record("b", "two")).unwrap();
        s.save(&record("a", "one")).unwrap();
        let mut changed = record("a", "one");
        changed.vm = None;
        s.save(&changed).unwrap();
        let (all, problems) = s.load_all().unwrap();
        assert!(problems.is_empty());
        assert_eq!(all.len(), 2);
        assert_eq!(
            (all[0].namespace.as_str(), all[0].vm.is_none()),
            ("a", true)
        );
        assert_eq!(all[1].vm.as_ref().unwrap().pid, 42);
        assert_eq!(all[1].format, RECORD_FORMAT);
        s.remove("a", "one").unwrap();
        s.remove("a", "one").unwrap();
        assert_eq!(s.load_all().unwrap().0.len(), 1);
    }

    #[test]
    fn unusable_files_are_set_aside_and_reported() {
        let t = tempfile::tempdir().unwrap();
        let s = StateStore::open(t.path()).unwrap();
        s.save(&record("a", "good")).unwrap();
        let ns = s.dir().join("a");
        std::fs::write(ns.join("junk.record"), b"\xff\xff\xff").unwrap();
        // A record copied to another name is not believed.
        std::fs::copy(ns.join("good.record"), ns.join("other.record")).unwrap();
        std::fs::write(ns.join(".good.record.tmp-1-2"), b"partial").unwrap();
        std::fs::create_dir(s.dir().join("..bad")).unwrap();
        std::fs::write(s.dir().join("..bad").join("x.record"), b"").unwrap();
        let (all, problems) = s.load_all().unwrap();
        assert_eq!(all.len(), 1, "{all:?}");
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(ns.join("junk.unreadable").exists());
        assert!(!ns.join(".good.record.tmp-1-2").exists());
        // Set aside: the next start does not complain again.
        assert!(s.load_all().unwrap().1.is_empty());
    }

    #[test]
    fn names_that_are_not_names_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let s = StateStore::open(t.path()).unwrap();
        assert!(s.save(&record("..", "x")).is_err());
        assert!(s.save(&record("a", "../x")).is_err());
    }
}
