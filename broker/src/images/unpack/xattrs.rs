//! Extended attributes from PAX `SCHILY.xattr.*` records, set through the
//! fd of what was just created: `user.*`, `trusted.*` and
//! `security.capability` are applied; any other namespace is skipped. A host
//! filesystem without xattr support (`ENOTSUP`), or one that does not permit
//! the attribute on this kind of file (`EPERM`, e.g. `user.*` on a FIFO), is
//! skipped with a debug line, never failing the layer.

use std::ffi::CString;
use std::os::fd::{AsRawFd, BorrowedFd};

use nix::errno::Errno;

use super::error::Fault;
use super::member::Xattr;

/// Whether an attribute with this name is applied.
fn wanted(name: &[u8]) -> bool {
    name.starts_with(b"user.") || name.starts_with(b"trusted.") || name == b"security.capability"
}

/// Sets the wanted `xattrs` on `fd`. Call it after `fchown` (which clears
/// `security.capability`) and after writing the contents.
pub(super) fn apply(fd: BorrowedFd<'_>, xattrs: &[Xattr]) -> Result<(), Fault> {
    for xattr in xattrs {
        let shown = String::from_utf8_lossy(&xattr.name);
        if !wanted(&xattr.name) {
            tracing::debug!(xattr = %shown, "skipping an xattr outside user.*, trusted.* and security.capability");
            continue;
        }
        let name = CString::new(xattr.name.as_slice())
            .map_err(|_| Fault::Image(format!("xattr {shown:?} has a NUL byte in its name")))?;
        // SAFETY: `fd` is open for the whole call; `name` is a NUL-terminated
        // string and `value` a live slice whose pointer and length are passed
        // together; the kernel only reads them.
        let rc = unsafe {
            libc::fsetxattr(
                fd.as_raw_fd(),
                name.as_ptr(),
                xattr.value.as_ptr().cast::<libc::c_void>(),
                xattr.value.len(),
                0,
            )
        };
        match Errno::result(rc) {
            Ok(_) => {}
            Err(errno @ (Errno::ENOTSUP | Errno::EPERM)) => {
                tracing::debug!(xattr = %shown, %errno, "the host filesystem does not take this xattr here; skipped");
            }
            Err(errno @ (Errno::ENOSPC | Errno::EDQUOT | Errno::EIO | Errno::ENOMEM)) => {
                return Err(Fault::host(format!("setting xattr {shown:?}"), errno));
            }
            Err(errno) => {
                return Err(Fault::Image(format!(
                    "xattr {shown:?} ({} bytes) cannot be set: {errno}",
                    xattr.value.len()
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::wanted;

    #[test]
    fn namespaces() {
        assert!(wanted(b"user.mime_type"));
        assert!(wanted(b"trusted.overlay.opaque"));
        assert!(wanted(b"security.capability"));
        assert!(!wanted(b"security.selinux"));
        assert!(!wanted(b"system.posix_acl_access"));
    }
}
