//! OCI whiteouts. `.wh.NAME` removes NAME (whatever it is, a directory with
//! everything in it) from the same directory; `.wh..wh..opq` makes its
//! directory opaque: everything lower layers put there goes, while what this
//! layer adds there stays, whether the tar lists it before or after the
//! marker. Whiteouts apply to lower layers only, so an entry this layer
//! already made is kept (`Seen` remembers them), and whiteout files never
//! appear in the tree.

use std::collections::{HashMap, HashSet};

use super::error::{shown, Fault};
use super::fsops::{is_dir, Dir, Fs};

const PREFIX: &[u8] = b".wh.";
const OPAQUE: &[u8] = b".wh..wh..opq";

/// What a whiteout entry asks for.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Whiteout<'a> {
    /// Remove this name from the directory.
    Remove(&'a [u8]),
    /// Hide what lower layers put in the directory.
    Opaque,
}

impl<'a> Whiteout<'a> {
    /// The whiteout an entry named `name` is, if it is one.
    pub(super) fn parse(name: &'a [u8]) -> Result<Option<Whiteout<'a>>, Fault> {
        if name == OPAQUE {
            return Ok(Some(Whiteout::Opaque));
        }
        match name.strip_prefix(PREFIX) {
            None => Ok(None),
            Some(b"" | b"." | b"..") => Err(Fault::Image(
                "it is a whiteout that names no removable entry".into(),
            )),
            Some(target) => Ok(Some(Whiteout::Remove(target))),
        }
    }
}

/// Refuses a path whose directories include a whiteout name: whiteouts are
/// files, never directories, and never appear in the tree.
pub(super) fn check_parents(parents: &[&[u8]]) -> Result<(), Fault> {
    match parents.iter().find(|p| p.starts_with(PREFIX)) {
        Some(p) => Err(Fault::Image(format!(
            "its parent directory {} has a whiteout name",
            shown(p)
        ))),
        None => Ok(()),
    }
}

/// The entries this layer made or updated, by (parent directory inode, name).
/// Memory: one name (at most 255 bytes) per entry, and entries are limited.
#[derive(Debug, Default)]
pub(super) struct Seen(HashMap<u64, HashSet<Box<[u8]>>>);

impl Seen {
    pub(super) fn insert(&mut self, dir: &Dir, name: &[u8]) {
        self.0.entry(dir.ino).or_default().insert(name.into());
    }

    fn contains(&self, dir: &Dir, name: &[u8]) -> bool {
        self.0
            .get(&dir.ino)
            .is_some_and(|names| names.contains(name))
    }
}

/// Applies `whiteout`, found in the directory at `parents`. A missing
/// directory has nothing to hide.
pub(super) fn apply(
    fs: &Fs,
    seen: &Seen,
    parents: &[&[u8]],
    whiteout: Whiteout<'_>,
) -> Result<(), Fault> {
    let Some(dir) = fs.open_dir(parents, false)? else {
        tracing::debug!("whiteout in a directory that does not exist; nothing to hide");
        return Ok(());
    };
    match whiteout {
        Whiteout::Remove(name) if seen.contains(&dir, name) => {
            tracing::debug!("whiteout for an entry of the same layer; kept, as whiteouts only hide lower layers");
            Ok(())
        }
        Whiteout::Remove(name) => fs.remove(&dir, name),
        Whiteout::Opaque => prune(fs, seen, &dir).map(|_| ()),
    }
}

/// Removes from `dir`, recursively, everything this layer did not make,
/// keeping the directories that lead to something it made. Returns whether
/// anything was kept.
fn prune(fs: &Fs, seen: &Seen, dir: &Dir) -> Result<bool, Fault> {
    let mut kept = false;
    for name in fs.names(dir)? {
        let is_subdir = fs.lstat(dir, &name)?.as_ref().is_some_and(is_dir);
        if seen.contains(dir, &name) {
            kept = true;
            if is_subdir {
                prune(fs, seen, &fs.open_child(dir, &name)?)?;
            }
        } else if is_subdir && prune(fs, seen, &fs.open_child(dir, &name)?)? {
            kept = true;
        } else {
            fs.remove(dir, &name)?;
        }
    }
    Ok(kept)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(
            Whiteout::parse(b".wh..wh..opq").ok().flatten(),
            Some(Whiteout::Opaque)
        );
        assert_eq!(
            Whiteout::parse(b".wh.etc").ok().flatten(),
            Some(Whiteout::Remove(b"etc"))
        );
        assert_eq!(Whiteout::parse(b"etc").ok().flatten(), None);
        for bad in [&b".wh."[..], b".wh..", b".wh..."] {
            assert!(Whiteout::parse(bad).is_err(), "{bad:?}");
        }
        assert!(check_parents(&[b"a", b".wh.b"]).is_err());
        assert!(check_parents(&[b"a", b"b"]).is_ok());
    }
}
