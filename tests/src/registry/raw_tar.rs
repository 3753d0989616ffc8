//! Layer tarballs written entry by entry with the names and link targets
//! stored verbatim: `..` components, absolute paths, links through links,
//! device nodes, whiteouts and opaque markers all go in exactly as given
//! (the `tar` crate's path setters and umoci would refuse or rewrite them).
//! Every entry is ustar, owned by 0:0, mtime 0.

use tar::{EntryType, Header};

/// Builds an uncompressed layer tarball; see [`crate::registry::ImageBuilder::raw_layer`].
pub struct RawTar {
    builder: tar::Builder<Vec<u8>>,
}

impl Default for RawTar {
    fn default() -> Self {
        Self::new()
    }
}

impl RawTar {
    pub fn new() -> RawTar {
        RawTar {
            builder: tar::Builder::new(Vec::new()),
        }
    }

    /// A regular file.
    pub fn file(self, path: &str, mode: u32, data: &[u8]) -> RawTar {
        self.entry(path, EntryType::Regular, mode, "", data)
    }

    pub fn dir(self, path: &str, mode: u32) -> RawTar {
        self.entry(path, EntryType::Directory, mode, "", &[])
    }

    pub fn symlink(self, path: &str, target: &str) -> RawTar {
        self.entry(path, EntryType::Symlink, 0o777, target, &[])
    }

    /// A hard link to `target` (a path inside the archive, as tar stores it).
    pub fn hardlink(self, path: &str, target: &str) -> RawTar {
        self.entry(path, EntryType::Link, 0o644, target, &[])
    }

    pub fn char_device(self, path: &str, major: u32, minor: u32) -> RawTar {
        self.device(path, EntryType::Char, major, minor)
    }

    pub fn block_device(self, path: &str, major: u32, minor: u32) -> RawTar {
        self.device(path, EntryType::Block, major, minor)
    }

    /// The OCI whiteout for `dir/name`: an empty file `dir/.wh.name`.
    pub fn whiteout(self, path: &str) -> RawTar {
        let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
        let marker = if dir.is_empty() {
            format!(".wh.{name}")
        } else {
            format!("{dir}/.wh.{name}")
        };
        self.file(&marker, 0o644, &[])
    }

    /// The opaque-directory marker: an empty file `dir/.wh..wh..opq`.
    pub fn opaque(self, dir: &str) -> RawTar {
        self.file(
            &format!("{}/.wh..wh..opq", dir.trim_end_matches('/')),
            0o644,
            &[],
        )
    }

    /// The tarball, with its two terminating zero blocks.
    pub fn finish(self) -> Vec<u8> {
        self.builder.into_inner().expect("finish tarball")
    }

    fn device(mut self, path: &str, kind: EntryType, major: u32, minor: u32) -> RawTar {
        let mut header = header(path, kind, 0o600, "", 0);
        header.set_device_major(major).expect("device major");
        header.set_device_minor(minor).expect("device minor");
        header.set_cksum();
        self.builder
            .append(&header, &[][..])
            .expect("append device entry");
        self
    }

    fn entry(mut self, path: &str, kind: EntryType, mode: u32, link: &str, data: &[u8]) -> RawTar {
        let header = header(path, kind, mode, link, data.len() as u64);
        self.builder
            .append(&header, data)
            .unwrap_or_else(|e| panic!("append {path:?}: {e}"));
        self
    }
}

/// A ustar header whose name and link name are copied byte for byte.
fn header(path: &str, kind: EntryType, mode: u32, link: &str, size: u64) -> Header {
    let mut header = Header::new_ustar();
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_size(size);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    let ustar = header.as_ustar_mut().expect("ustar header");
    copy_field(&mut ustar.name, path);
    copy_field(&mut ustar.linkname, link);
    header.set_cksum();
    header
}

fn copy_field(field: &mut [u8; 100], value: &str) {
    assert!(
        value.len() <= field.len(),
        "tar name {value:?} is longer than {} bytes",
        field.len()
    );
    field[..value.len()].copy_from_slice(value.as_bytes());
}
