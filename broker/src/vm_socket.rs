//! Connecting to the Unix sockets a VM process serves (agent channel,
//! console). They live in the VM's directory, which the VM process owns and
//! can change: a VMM taken over by its guest could put a symlink there, to
//! another sandbox's socket or to the broker's own. So the socket is opened
//! `O_PATH|O_NOFOLLOW`, must be a socket owned by the VM's uid, and is
//! connected to through that fd (`/proc/self/fd/N`), never by its path again.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use tokio::net::UnixStream;

/// Connects to the socket at `path` if it is a socket owned by `uid`.
pub async fn connect_owned(path: &Path, uid: u32) -> std::io::Result<UnixStream> {
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "path contains NUL"))?;
    // SAFETY: open with a NUL-terminated path and integer flags; the result
    // is checked before use.
    let fd = unsafe {
        libc::open(
            c_path.as_ptr(),
            libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: open returned a new fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let meta = std::fs::File::from(fd.try_clone()?).metadata()?;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    if !meta.file_type().is_socket() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{} is not a socket", path.display()),
        ));
    }
    if meta.uid() != uid {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "{} belongs to uid {}, not the VM's uid {uid}",
                path.display(),
                meta.uid()
            ),
        ));
    }
    UnixStream::connect(format!("/proc/self/fd/{}", fd.as_raw_fd())).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connects_to_an_owned_socket_and_refuses_symlinks_and_strangers() {
        let t = tempfile::tempdir().unwrap();
        let sock = t.path().join("agent.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let me = nix::unistd::geteuid().as_raw();
        assert!(connect_owned(&sock, me).await.is_ok());
        let err = connect_owned(&sock, me + 1).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied, "{err}");
        let link = t.path().join("link.sock");
        std::os::unix::fs::symlink(&sock, &link).unwrap();
        assert!(
            connect_owned(&link, me).await.is_err(),
            "symlinks are not followed"
        );
        let file = t.path().join("plain");
        std::fs::write(&file, b"").unwrap();
        let err = connect_owned(&file, me).await.unwrap_err();
        assert!(err.to_string().contains("not a socket"), "{err}");
    }
}
