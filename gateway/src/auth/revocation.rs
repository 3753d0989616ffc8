//! The revocation list: a text file of key ids, one per line (`#` starts a
//! comment), appended to by `moat server revoke`. The gateway re-reads it
//! without a restart: at most once per poll interval a request stats the
//! file, and reloads it when its mtime or size changed. A missing file is an
//! empty list; a file that exists but cannot be read keeps the last list
//! read (and says so in the log).

use std::collections::HashSet;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use super::claims::validate_key_id;

/// The revoked key ids, refreshed from their file.
#[derive(Debug)]
pub struct Revocations {
    path: PathBuf,
    poll: Duration,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    checked: Option<Instant>,
    stamp: Option<(SystemTime, u64)>,
    ids: HashSet<String>,
}

impl Revocations {
    /// The list kept in `path`, checked for changes at most every `poll`.
    pub fn new(path: impl Into<PathBuf>, poll: Duration) -> Self {
        Revocations {
            path: path.into(),
            poll,
            state: Mutex::new(State {
                checked: None,
                stamp: None,
                ids: HashSet::new(),
            }),
        }
    }

    /// The file this list is read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether `key_id` is revoked (re-reading the file when it changed).
    pub fn is_revoked(&self, key_id: &str) -> bool {
        let mut state = match self.state.lock() {
            Ok(state) => state,
            Err(poisoned) => poisoned.into_inner(),
        };
        if state.checked.is_none_or(|t| t.elapsed() >= self.poll) {
            state.checked = Some(Instant::now());
            self.refresh(&mut state);
        }
        state.ids.contains(key_id)
    }

    fn refresh(&self, state: &mut State) {
        let stamp = match fs::metadata(&self.path) {
            Ok(meta) => (
                meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                meta.len(),
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                state.stamp = None;
                state.ids.clear();
                return;
            }
            Err(e) => {
                tracing::error!(path = %self.path.display(), error = %e,
                    "cannot stat the revocation list; keeping the last one read");
                return;
            }
        };
        if state.stamp == Some(stamp) {
            return;
        }
        match fs::read_to_string(&self.path) {
            Ok(text) => {
                state.ids = parse(&text);
                state.stamp = Some(stamp);
                tracing::info!(path = %self.path.display(), revoked = state.ids.len(),
                    "revocation list loaded");
            }
            Err(e) => tracing::error!(path = %self.path.display(), error = %e,
                "cannot read the revocation list; keeping the last one read"),
        }
    }
}

/// Key ids in a revocation file's text.
pub fn parse(text: &str) -> HashSet<String> {
    text.lines()
        .map(|line| line.split('#').next().unwrap_or_default().trim())
        .filter(|id| !id.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Appends `key_id` to the revocation file at `path` (created 0644: key ids
/// are not secret, and the gateway's user must read it).
pub fn append(path: &Path, key_id: &str, note: &str) -> Result<(), std::io::Error> {
    validate_key_id(key_id)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent)?;
    }
    let mut file = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o644)
        .open(path)?;
    let note: String = note.chars().filter(|c| !c.is_control()).collect();
    file.write_all(format!("{key_id} # {note}\n").as_bytes())?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_skips_comments_and_blanks() {
        let ids = parse("a1 # revoked 2026\n\n# note\n  b2  \n");
        assert_eq!(ids, ["a1".to_owned(), "b2".to_owned()].into());
    }

    #[test]
    fn changes_are_picked_up_without_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("revoked");
        let list = Revocations::new(&path, Duration::ZERO);
        assert!(!list.is_revoked("k1"), "missing file: nothing revoked");
        append(&path, "k1", "test").unwrap();
        assert!(list.is_revoked("k1"));
        assert!(!list.is_revoked("k2"));
        append(&path, "k2", "test\nwith newline").unwrap();
        assert!(list.is_revoked("k2"));
        assert_eq!(fs::read_to_string(&path).unwrap().lines().count(), 2);
        fs::remove_file(&path).unwrap();
        assert!(!list.is_revoked("k1"));
        assert!(append(&path, "bad id", "x").is_err());
    }

    #[test]
    fn polling_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("revoked");
        let list = Revocations::new(&path, Duration::from_secs(3600));
        assert!(!list.is_revoked("k1"));
        append(&path, "k1", "x").unwrap();
        assert!(
            !list.is_revoked("k1"),
            "not re-read within the poll interval"
        );
    }
}
