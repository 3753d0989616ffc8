//! Archive members: turns the raw tar headers of one member (its GNU
//! long-name and long-link headers, its PAX header, then its own header) into
//! a `Member`: the path, what kind of thing it is, and its metadata.
//!
//! The tar crate is used in raw mode, so extension headers arrive here and
//! are read into memory only up to small caps (a hostile size cannot make
//! the broker buffer gigabytes). Device nodes, sparse files and unknown
//! entry types are refused here, naming the type.

use std::io::Read;

/// Most xattrs one entry may carry (bounds the work per PAX header).
const MAX_XATTRS: usize = 64;

use nix::sys::time::TimeSpec;
use tar::Header;

use super::error::Fault;
use super::path::MAX_PATH;
use super::pax;

/// Largest PAX extended header read, in bytes (its xattrs included).
const MAX_PAX_BYTES: u64 = 1 << 20;
/// PAX records whose key starts with this carry an extended attribute.
const XATTR_PREFIX: &[u8] = b"SCHILY.xattr.";

/// One extended attribute from a PAX record.
#[derive(Debug)]
pub(super) struct Xattr {
    pub(super) name: Vec<u8>,
    pub(super) value: Vec<u8>,
}

/// Ownership, permissions, times and xattrs of a member.
#[derive(Debug)]
pub(super) struct Meta {
    /// Permission bits, setuid/setgid/sticky included (`0o7777` at most).
    pub(super) mode: u32,
    pub(super) uid: u32,
    pub(super) gid: u32,
    /// Used as both the access and modification time.
    pub(super) mtime: TimeSpec,
    pub(super) xattrs: Vec<Xattr>,
}

/// What a member makes.
#[derive(Debug)]
pub(super) enum Kind {
    File {
        size: u64,
    },
    Dir,
    /// The target is stored as given, never resolved on the host.
    Symlink {
        target: Vec<u8>,
    },
    /// The target is a path in the tree, checked like an entry path.
    HardLink {
        target: Vec<u8>,
    },
    Fifo,
}

/// One archive member, ready to be applied.
#[derive(Debug)]
pub(super) struct Member {
    pub(super) path: Vec<u8>,
    pub(super) kind: Kind,
    pub(super) meta: Meta,
}

/// Extension headers read so far for the member that follows them.
#[derive(Debug, Default)]
pub(super) struct Extensions {
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
    pax: Option<Vec<u8>>,
}

impl Extensions {
    /// Whether no extension header is waiting for its member.
    pub(super) fn is_empty(&self) -> bool {
        self.long_name.is_none() && self.long_link.is_none() && self.pax.is_none()
    }

    /// If `entry` is an extension header (GNU `L` or `K`, PAX `x`), reads it
    /// into `self` and returns true.
    pub(super) fn absorb<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<bool, Fault> {
        let (slot, what, cap) = match entry.header().entry_type().as_byte() {
            b'L' => (
                &mut self.long_name,
                "GNU long-name header",
                MAX_PATH as u64 + 1,
            ),
            b'K' => (
                &mut self.long_link,
                "GNU long-link header",
                MAX_PATH as u64 + 1,
            ),
            b'x' => (&mut self.pax, "PAX extended header", MAX_PAX_BYTES),
            _ => return Ok(false),
        };
        if slot.is_some() {
            return Err(Fault::Image(format!("two {what}s precede one entry")));
        }
        let size = entry.size();
        if size > cap {
            return Err(Fault::Image(format!(
                "a {what} of {size} bytes (at most {cap} accepted)"
            )));
        }
        let mut data = Vec::with_capacity(size as usize);
        entry.read_to_end(&mut data).map_err(Fault::Read)?;
        if (data.len() as u64) < size {
            return Err(Fault::Image(format!("the archive ends inside a {what}")));
        }
        *slot = Some(data);
        Ok(true)
    }
}

/// What the PAX header says about a member.
#[derive(Default)]
struct Pax {
    path: Option<Vec<u8>>,
    linkpath: Option<Vec<u8>>,
    size: Option<u64>,
    uid: Option<u64>,
    gid: Option<u64>,
    mtime: Option<TimeSpec>,
    xattrs: Vec<Xattr>,
}

impl Pax {
    fn parse(data: &[u8]) -> Result<Pax, String> {
        let mut pax = Pax::default();
        for (key, value) in pax::records(data)? {
            let number = |what: &str| -> Result<u64, String> {
                std::str::from_utf8(value)
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| format!("its PAX {what} record is not a number"))
            };
            // An empty value removes a keyword's meaning (POSIX); ignore it.
            match key {
                _ if value.is_empty() && !key.starts_with(XATTR_PREFIX) => {}
                b"path" => pax.path = Some(value.to_vec()),
                b"linkpath" => pax.linkpath = Some(value.to_vec()),
                b"size" => pax.size = Some(number("size")?),
                b"uid" => pax.uid = Some(number("uid")?),
                b"gid" => pax.gid = Some(number("gid")?),
                b"mtime" => pax.mtime = Some(pax_time(value)?),
                _ if key.starts_with(b"GNU.sparse.") => {
                    return Err(
                        "it is a GNU sparse file (PAX format); sparse files are not supported"
                            .into(),
                    )
                }
                _ => {
                    if let Some(name) = key.strip_prefix(XATTR_PREFIX) {
                        if name.is_empty() || name.contains(&0) {
                            return Err(
                                "it has an xattr with an empty name or a NUL byte in its name"
                                    .into(),
                            );
                        }
                        if pax.xattrs.len() >= MAX_XATTRS {
                            return Err(format!(
                                "it has more than {MAX_XATTRS} xattrs; the limit is {MAX_XATTRS}"
                            ));
                        }
                        pax.xattrs.retain(|x| x.name != name);
                        pax.xattrs.push(Xattr {
                            name: name.to_vec(),
                            value: value.to_vec(),
                        });
                    }
                    // Other records (atime, uname, comments...) do not matter here.
                }
            }
        }
        Ok(pax)
    }
}

/// A PAX time: seconds since the epoch, maybe negative, maybe with a fraction.
fn pax_time(value: &[u8]) -> Result<TimeSpec, String> {
    let bad = || "its PAX mtime record is not a time".to_string();
    let text = std::str::from_utf8(value).map_err(|_| bad())?;
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    let negative = whole.starts_with('-');
    let seconds: i64 = whole.parse().map_err(|_| bad())?;
    if !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let digits: String = fraction
        .chars()
        .chain("000000000".chars())
        .take(9)
        .collect();
    let nanos: i64 = digits.parse().map_err(|_| bad())?;
    // "-1.5" is one and a half seconds before the epoch.
    let (seconds, nanos) = if negative && nanos > 0 {
        (seconds.saturating_sub(1), 1_000_000_000 - nanos)
    } else {
        (seconds, nanos)
    };
    Ok(TimeSpec::new(seconds, nanos))
}

/// GNU long names and links end with a NUL that is not part of the name.
fn without_trailing_nuls(mut bytes: Vec<u8>) -> Vec<u8> {
    while bytes.last() == Some(&0) {
        bytes.pop();
    }
    bytes
}

/// An owner id from the archive, checked to be a real one (not -1).
fn owner_id(id: u64, what: &str) -> Result<u32, Fault> {
    u32::try_from(id)
        .ok()
        .filter(|id| *id != u32::MAX)
        .ok_or_else(|| Fault::Image(format!("its {what} {id} is not a valid id")))
}

/// Builds the member a non-extension `header` describes, with the extension
/// headers that preceded it. Returns the member's path even when the rest
/// fails, for the error message.
pub(super) fn assemble(header: &Header, ext: Extensions) -> (Vec<u8>, Result<Member, Fault>) {
    let fallback_path = || match &ext.long_name {
        Some(name) => without_trailing_nuls(name.clone()),
        None => header.path_bytes().into_owned(),
    };
    let pax = match ext.pax.as_deref().map(Pax::parse).transpose() {
        Ok(pax) => pax.unwrap_or_default(),
        Err(reason) => return (fallback_path(), Err(Fault::Image(reason))),
    };
    let path = match &pax.path {
        Some(path) => path.clone(),
        None => fallback_path(),
    };
    let link = match (&pax.linkpath, ext.long_link) {
        (Some(link), _) => Some(link.clone()),
        (None, Some(link)) => Some(without_trailing_nuls(link)),
        (None, None) => header.link_name_bytes().map(|l| l.into_owned()),
    };
    let member = build(header, &path, link, pax);
    (path, member)
}

fn build(header: &Header, path: &[u8], link: Option<Vec<u8>>, pax: Pax) -> Result<Member, Fault> {
    let field = |what: &str, e: std::io::Error| {
        Fault::Image(format!("its header's {what} field is invalid: {e}"))
    };
    let header_size = header.entry_size().map_err(|e| field("size", e))?;
    if let Some(size) = pax.size.filter(|s| *s != header_size) {
        return Err(Fault::Image(format!(
            "its PAX size record says {size} bytes but its header says {header_size}; sizes only a PAX record can hold are not supported"
        )));
    }
    let link_target = |what: &str| -> Result<Vec<u8>, Fault> {
        match &link {
            Some(target) if !target.is_empty() => Ok(target.clone()),
            _ => Err(Fault::Image(format!("it is a {what} without a target"))),
        }
    };
    let kind = match header.entry_type().as_byte() {
        b'0' | b'7' => Kind::File { size: header_size },
        // Old (pre-POSIX) archives mark directories with a trailing slash.
        b'\0' if path.ends_with(b"/") => Kind::Dir,
        b'\0' => Kind::File { size: header_size },
        b'5' => Kind::Dir,
        b'6' => Kind::Fifo,
        b'1' => Kind::HardLink {
            target: link_target("hard link")?,
        },
        b'2' => {
            let target = link_target("symbolic link")?;
            if target.contains(&0) || target.len() >= MAX_PATH {
                return Err(Fault::Image(
                    "it is a symbolic link whose target has a NUL byte or is 4096 bytes or longer"
                        .into(),
                ));
            }
            Kind::Symlink { target }
        }
        b'3' | b'4' => {
            let what = if header.entry_type().as_byte() == b'3' {
                "a character device"
            } else {
                "a block device"
            };
            return Err(Fault::Image(format!(
                "it is {what} node; device nodes are not allowed in images"
            )));
        }
        b'S' => {
            return Err(Fault::Image(
                "it is a GNU sparse file; sparse files are not supported".into(),
            ))
        }
        other => {
            let name = match other {
                b'V' => "a GNU volume label",
                b'M' => "a GNU multi-volume continuation",
                b'N' => "an old GNU long-name entry",
                b'D' => "a GNU dump directory",
                b'X' => "a Solaris extended header",
                _ => "unknown",
            };
            return Err(Fault::Image(format!(
                "its entry type {:?} ({name}) is not supported",
                char::from(other)
            )));
        }
    };
    let mode = header.mode().map_err(|e| field("mode", e))? & 0o7777;
    let uid = match pax.uid {
        Some(uid) => uid,
        None => header.uid().map_err(|e| field("uid", e))?,
    };
    let gid = match pax.gid {
        Some(gid) => gid,
        None => header.gid().map_err(|e| field("gid", e))?,
    };
    let mtime = match pax.mtime {
        Some(mtime) => mtime,
        None => {
            let secs = header.mtime().map_err(|e| field("mtime", e))?;
            TimeSpec::new(i64::try_from(secs).unwrap_or(i64::MAX), 0)
        }
    };
    Ok(Member {
        path: path.to_vec(),
        kind,
        meta: Meta {
            mode,
            uid: owner_id(uid, "uid")?,
            gid: owner_id(gid, "gid")?,
            mtime,
            xattrs: pax.xattrs,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_times() {
        let t = pax_time(b"1700000000.25").expect("valid");
        assert_eq!((t.tv_sec(), t.tv_nsec()), (1_700_000_000, 250_000_000));
        let t = pax_time(b"-1.5").expect("valid");
        assert_eq!((t.tv_sec(), t.tv_nsec()), (-2, 500_000_000));
        let t = pax_time(b"12").expect("valid");
        assert_eq!((t.tv_sec(), t.tv_nsec()), (12, 0));
        assert!(pax_time(b"1.2x").is_err());
        assert!(pax_time(b"soon").is_err());
    }

    #[test]
    fn owner_ids_must_be_real() {
        assert_eq!(owner_id(1000, "uid").expect("valid"), 1000);
        assert!(owner_id(u64::from(u32::MAX), "uid").is_err());
        assert!(owner_id(1 << 40, "gid").is_err());
    }
}
