//! Applies one member onto the tree, the way containerd lays layers out: an
//! entry replaces whatever is at its path (a directory with everything in
//! it), except that a directory entry for an existing directory only updates
//! its metadata; whiteouts go to `whiteout.rs`; hard links must point at a
//! regular file already in the tree, reached without any symbolic link (a
//! hard link's own header metadata is not applied: it shares its target's
//! inode, whose metadata came with the target's entry).
//! An entry for the root itself (`.`, `./`) is ignored: the root keeps the
//! private owner and mode the caller gave it while it holds the image.

use std::io::Read;
use std::os::fd::AsFd;

use super::error::{shown, Fault};
use super::fsops::{is_dir, is_file, kind_of, Dir, Fs};
use super::member::{Kind, Member};
use super::path::TreePath;
use super::whiteout::{self, Seen, Whiteout};

/// Applies `member`, reading a file's contents from `data`.
pub(super) fn apply(
    fs: &Fs,
    seen: &mut Seen,
    member: &Member,
    data: &mut dyn Read,
) -> Result<(), Fault> {
    let path = TreePath::parse(&member.path).map_err(Fault::Image)?;
    let Some(name) = path.name() else {
        return match member.kind {
            Kind::Dir => {
                tracing::debug!(
                    "ignoring the entry for the root directory; the root stays private"
                );
                Ok(())
            }
            _ => Err(Fault::Image(
                "it names the root directory but is not a directory".into(),
            )),
        };
    };
    whiteout::check_parents(path.parent())?;
    if let Some(w) = Whiteout::parse(name)? {
        return whiteout::apply(fs, seen, path.parent(), w);
    }
    let Some(parent) = fs.open_dir(path.parent(), true)? else {
        return Err(Fault::host(
            "making its parent directories",
            nix::errno::Errno::ENOENT,
        ));
    };
    let existing = fs.lstat(&parent, name)?;
    match &member.kind {
        Kind::Dir => {
            let dir = match existing {
                Some(st) if is_dir(&st) => fs.open_child(&parent, name)?,
                Some(_) => {
                    fs.remove(&parent, name)?;
                    fs.make_dir(&parent, name)?
                }
                None => fs.make_dir(&parent, name)?,
            };
            fs.set_meta(dir.as_fd(), &member.meta)?;
        }
        Kind::File { size } => {
            clear(fs, &parent, name, existing.is_some())?;
            let file = fs.create_file(&parent, name, data, *size)?;
            fs.set_meta(file.as_fd(), &member.meta)?;
        }
        Kind::Symlink { target } => {
            clear(fs, &parent, name, existing.is_some())?;
            fs.make_symlink(&parent, name, target)?;
            fs.set_symlink_meta(&parent, name, &member.meta)?;
        }
        Kind::HardLink { target } => {
            let about = format!("its hard link target {}", shown(target));
            let (target_dir, target_name) = link_target(fs, target).map_err(|f| f.about(&about))?;
            clear(fs, &parent, name, existing.is_some())?;
            if !fs.hard_link(&target_dir, target_name, &parent, name)? {
                return Err(Fault::Image(format!(
                    "{about} was removed by this very entry (it replaced a directory holding it)"
                )));
            }
        }
        Kind::Fifo => {
            clear(fs, &parent, name, existing.is_some())?;
            let fifo = fs.make_fifo(&parent, name)?;
            fs.set_meta(fifo.as_fd(), &member.meta)?;
        }
    }
    seen.insert(&parent, name);
    Ok(())
}

/// Removes what is at `name` before something else takes its place.
fn clear(fs: &Fs, parent: &Dir, name: &[u8], exists: bool) -> Result<(), Fault> {
    if exists {
        fs.remove(parent, name)?;
    }
    Ok(())
}

/// Finds a hard link's target: a regular file already in the tree.
fn link_target<'t>(fs: &Fs, target: &'t [u8]) -> Result<(Dir, &'t [u8]), Fault> {
    let path = TreePath::parse(target).map_err(Fault::Image)?;
    let Some(name) = path.name() else {
        return Err(Fault::Image("it is the root directory".into()));
    };
    let missing = || {
        Fault::Image(
            "it does not exist (a hard link must point at a regular file an earlier entry made)"
                .into(),
        )
    };
    let dir = fs.open_dir(path.parent(), false)?.ok_or_else(missing)?;
    match fs.lstat(&dir, name)? {
        None => Err(missing()),
        Some(st) if is_file(&st) => Ok((dir, name)),
        Some(st) => Err(Fault::Image(format!(
            "it is {}, not a regular file",
            kind_of(&st)
        ))),
    }
}
