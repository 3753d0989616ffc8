//! Unit tests of the unpacker: layers are built with the tar crate (hostile
//! ones with hand-written headers) and applied to a temporary directory next
//! to a sentinel directory that must stay empty. They pass as root (owners
//! are checked then) and as an ordinary user.

mod hostile;
mod layout;
mod limits;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::PathBuf;

use tar::{EntryType, Header};

use super::{Compression, LayerStats, UnpackError, UnpackLimits, Unpacker};

/// The mtime every test entry gets unless it says otherwise.
const MTIME: u64 = 1_600_000_000;

/// A temporary directory with the unpack root and a sentinel beside it.
struct World {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    outside: PathBuf,
    unpacker: Unpacker,
    layers: usize,
}

impl World {
    fn new() -> World {
        World::with_limits(&UnpackLimits::default())
    }

    fn with_limits(limits: &UnpackLimits) -> World {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("root");
        let outside = tmp.path().join("outside");
        fs::create_dir(&root).expect("root");
        fs::set_permissions(&root, fs::Permissions::from_mode(0o700)).expect("chmod");
        fs::create_dir(&outside).expect("outside");
        let unpacker = Unpacker::new(&root, limits.clone()).expect("unpacker");
        World {
            _tmp: tmp,
            root,
            outside,
            unpacker,
            layers: 0,
        }
    }

    /// Applies an uncompressed layer named `layer-<n>`.
    fn apply(&mut self, layer: Vec<u8>) -> Result<LayerStats, UnpackError> {
        self.layers += 1;
        let name = format!("layer-{}", self.layers);
        self.unpacker
            .apply_layer(layer.as_slice(), Compression::None, &name)
    }

    /// Applies a layer that must fail; returns the message.
    fn refuse(&mut self, layer: Vec<u8>) -> String {
        match self.apply(layer) {
            Ok(stats) => panic!("layer accepted: {stats:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn at(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    fn exists(&self, rel: &str) -> bool {
        fs::symlink_metadata(self.at(rel)).is_ok()
    }

    fn read(&self, rel: &str) -> String {
        fs::read_to_string(self.at(rel)).expect("read")
    }

    fn mode(&self, rel: &str) -> u32 {
        fs::symlink_metadata(self.at(rel)).expect("stat").mode() & 0o7777
    }

    /// The names in a directory of the tree, sorted.
    fn list(&self, rel: &str) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(self.at(rel))
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// Nothing was written beside the root.
    fn assert_outside_untouched(&self) {
        let found: Vec<_> = fs::read_dir(&self.outside).expect("outside").collect();
        assert!(found.is_empty(), "written outside the root: {found:?}");
        let siblings: Vec<String> = fs::read_dir(self.root.parent().expect("parent"))
            .expect("tmp")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(siblings.len(), 2, "{siblings:?}");
    }
}

fn running_as_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A layer being written.
struct Layer(tar::Builder<Vec<u8>>);

fn header(kind: EntryType, mode: u32, size: u64) -> Header {
    let mut h = Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(MTIME);
    h.set_uid(0);
    h.set_gid(0);
    h
}

impl Layer {
    fn new() -> Layer {
        Layer(tar::Builder::new(Vec::new()))
    }

    fn entry(mut self, mut h: Header, path: &str, data: &[u8]) -> Layer {
        self.0.append_data(&mut h, path, data).expect("append");
        self
    }

    fn file(self, path: &str, mode: u32, data: &str) -> Layer {
        let h = header(EntryType::Regular, mode, data.len() as u64);
        self.entry(h, path, data.as_bytes())
    }

    fn owned_file(self, path: &str, mode: u32, uid: u64, gid: u64) -> Layer {
        let mut h = header(EntryType::Regular, mode, 0);
        h.set_uid(uid);
        h.set_gid(gid);
        self.entry(h, path, b"")
    }

    fn dir(self, path: &str, mode: u32) -> Layer {
        self.entry(header(EntryType::Directory, mode, 0), path, b"")
    }

    fn dir_at(self, path: &str, mode: u32, mtime: u64) -> Layer {
        let mut h = header(EntryType::Directory, mode, 0);
        h.set_mtime(mtime);
        self.entry(h, path, b"")
    }

    fn fifo(self, path: &str, mode: u32) -> Layer {
        self.entry(header(EntryType::Fifo, mode, 0), path, b"")
    }

    fn link(mut self, kind: EntryType, path: &str, target: &str) -> Layer {
        let mut h = header(kind, 0o777, 0);
        self.0.append_link(&mut h, path, target).expect("link");
        self
    }

    fn symlink(self, path: &str, target: &str) -> Layer {
        self.link(EntryType::Symlink, path, target)
    }

    fn hardlink(self, path: &str, target: &str) -> Layer {
        self.link(EntryType::Link, path, target)
    }

    fn pax(mut self, records: &[(&str, &[u8])]) -> Layer {
        self.0
            .append_pax_extensions(records.iter().copied())
            .expect("pax");
        self
    }

    /// An entry with the name and link name written into the header as is
    /// (no checks), for what the tar crate refuses to write.
    fn raw(mut self, kind: u8, name: &[u8], link: &[u8], data: &[u8]) -> Layer {
        let mut h = header(EntryType::new(kind), 0o644, data.len() as u64);
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
        h.set_cksum();
        self.0.append(&h, data).expect("append raw");
        self
    }

    fn finish(self) -> Vec<u8> {
        self.0.into_inner().expect("finish")
    }
}
