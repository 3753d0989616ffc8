//! The HS256 signing secret: 32 random bytes, kept hex-encoded in a file of
//! mode 0600 owned by the gateway's user. [`ensure`] creates it when missing
//! (the gateway at start, or `moat server start` as root on its behalf);
//! [`load`] reads it and refuses a file others may read. The secret is never
//! printed, logged or passed on a command line.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Length of the secret in bytes.
pub const SECRET_LEN: usize = 32;

/// The signing secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub(crate) [u8; SECRET_LEN]);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// The raw bytes (for signing and verifying).
    pub fn bytes(&self) -> &[u8; SECRET_LEN] {
        &self.0
    }
}

/// Why the secret could not be made or read.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("secret file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "secret file {path} has mode {mode:o}: it must not be readable by group or others \
         (chmod 600 {path})"
    )]
    TooOpen { path: PathBuf, mode: u32 },
    #[error("secret file {path} does not hold {SECRET_LEN} hex-encoded bytes")]
    Malformed { path: PathBuf },
    #[error("cannot get random bytes: {0}")]
    Random(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SecretError + '_ {
    move |source| SecretError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Creates the secret file if it does not exist (mode 0600; owned by
/// `owner` when given, which needs root). An existing file is left as it is,
/// except that it is given to `owner`. Returns whether it was created.
pub fn ensure(path: &Path, owner: Option<(u32, u32)>) -> Result<bool, SecretError> {
    let created = match fs::symlink_metadata(path) {
        Ok(_) => false,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                fs::create_dir_all(parent).map_err(io(path))?;
            }
            let mut bytes = [0u8; SECRET_LEN];
            getrandom::fill(&mut bytes).map_err(|e| SecretError::Random(e.to_string()))?;
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(io(path))?;
            file.write_all(format!("{}\n", hex(&bytes)).as_bytes())
                .and_then(|()| file.sync_all())
                .map_err(io(path))?;
            true
        }
        Err(e) => return Err(io(path)(e)),
    };
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(io(path))?;
    }
    Ok(created)
}

/// Reads the secret, refusing a file that group or others may read.
pub fn load(path: &Path) -> Result<Secret, SecretError> {
    let meta = fs::metadata(path).map_err(io(path))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(SecretError::TooOpen {
            path: path.to_owned(),
            mode,
        });
    }
    let text = fs::read_to_string(path).map_err(io(path))?;
    parse(text.trim()).ok_or_else(|| SecretError::Malformed {
        path: path.to_owned(),
    })
}

fn parse(text: &str) -> Option<Secret> {
    if text.len() != SECRET_LEN * 2 || !text.is_ascii() {
        return None;
    }
    let mut bytes = [0u8; SECRET_LEN];
    for (i, byte) in bytes.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(Secret(bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ensure_creates_once_with_0600_and_load_reads_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/gateway.secret");
        assert!(ensure(&path, None).unwrap());
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let first = load(&path).unwrap();
        assert!(!ensure(&path, None).unwrap(), "an existing secret is kept");
        assert_eq!(load(&path).unwrap(), first);
        assert_ne!(first.bytes(), &[0u8; SECRET_LEN]);
        assert_eq!(format!("{first:?}"), "Secret(..)");
    }

    #[test]
    fn open_or_malformed_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        ensure(&path, None).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        let err = load(&path).unwrap_err();
        assert!(matches!(err, SecretError::TooOpen { .. }), "{err}");
        fs::write(&path, "abcd\n").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(load(&path), Err(SecretError::Malformed { .. })));
        assert!(matches!(
            load(&dir.path().join("missing")),
            Err(SecretError::Io { .. })
        ));
    }

    #[test]
    fn hex_round_trip() {
        let bytes = [0xab; SECRET_LEN];
        assert_eq!(parse(&hex(&bytes)), Some(Secret(bytes)));
        assert_eq!(parse(&"zz".repeat(SECRET_LEN)), None);
    }
}
