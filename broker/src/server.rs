//! The broker's Unix sockets. The gateway's: created in a 0750 directory,
//! mode 0660, both owned by the gateway's group. The operator's (admin):
//! mode 0600, root's. On both, every connection's peer credentials
//! (SO_PEERCRED) are checked, and a peer whose uid is not the one allowed
//! (the gateway's uid; root) is logged and dropped before it can send a byte
//! of gRPC.

use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::Path;

use tokio::net::{UnixListener, UnixStream};
use tokio_stream::wrappers::UnixListenerStream;
use tokio_stream::{Stream, StreamExt};

/// Errors creating the socket.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(std::path::PathBuf),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SocketError + '_ {
    move |source| SocketError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Binds the broker socket with its directory and permissions.
pub fn bind(path: &Path, gid: u32) -> Result<UnixListener, SocketError> {
    let dir = path
        .parent()
        .ok_or_else(|| SocketError::NotASocket(path.to_owned()))?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o750)
        .create(dir)
        .map_err(io(dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750)).map_err(io(dir))?;
    std::os::unix::fs::chown(dir, Some(0), Some(gid)).map_err(io(dir))?;
    bind_socket(path, 0o660, gid)
}

/// Binds the operator socket: mode 0600, root's (its directory is created
/// 0700 when missing, left as it is otherwise).
pub fn bind_admin(path: &Path) -> Result<UnixListener, SocketError> {
    let dir = path
        .parent()
        .ok_or_else(|| SocketError::NotASocket(path.to_owned()))?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(dir))?;
    bind_socket(path, 0o600, 0)
}

fn bind_socket(path: &Path, mode: u32, gid: u32) -> Result<UnixListener, SocketError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path).map_err(io(path))?,
        Ok(_) => return Err(SocketError::NotASocket(path.to_owned())),
        Err(_) => {}
    }
    let listener = UnixListener::bind(path).map_err(io(path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io(path))?;
    std::os::unix::fs::chown(path, Some(0), Some(gid)).map_err(io(path))?;
    Ok(listener)
}

/// Accepted connections whose peer is `allowed_uid`; others are logged and
/// closed. Accept errors are logged and skipped (the server keeps serving).
pub fn authorized_connections(
    listener: UnixListener,
    allowed_uid: u32,
) -> impl Stream<Item = Result<UnixStream, std::io::Error>> {
    UnixListenerStream::new(listener).filter_map(move |conn| match conn {
        Ok(stream) => match stream.peer_cred() {
            Ok(cred) if cred.uid() == allowed_uid => Some(Ok(stream)),
            Ok(cred) => {
                tracing::warn!(
                    peer_uid = cred.uid(),
                    peer_gid = cred.gid(),
                    peer_pid = cred.pid(),
                    allowed_uid,
                    "refused broker connection from a peer that is not the allowed uid"
                );
                None
            }
            Err(e) => {
                tracing::warn!(error = %e, "refused broker connection: cannot read peer credentials");
                None
            }
        },
        Err(e) => {
            tracing::warn!(error = %e, "accept on the broker socket failed");
            None
        }
    })
}
