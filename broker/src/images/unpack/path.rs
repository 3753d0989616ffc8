//! Entry paths: checks a path from the archive (hostile bytes) and splits it
//! into components that are safe to hand to `*at` calls one at a time or to
//! `openat2` beneath the root: never absolute, never `..`, no NUL, no empty
//! or `.` components (`./usr//bin/` is `usr/bin`), at most 4096 bytes in all
//! and 255 per component.

/// Longest path accepted, in bytes (Linux's `PATH_MAX`).
pub(super) const MAX_PATH: usize = 4096;
/// Longest component accepted, in bytes (Linux's `NAME_MAX`).
const MAX_NAME: usize = 255;
/// Deepest path accepted: work on a tree keeps an fd per level, so depth
/// is bounded well below the open-files limit.
const MAX_DEPTH: usize = 256;

/// A checked path beneath the root; no components means the root itself.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct TreePath<'a> {
    components: Vec<&'a [u8]>,
}

impl<'a> TreePath<'a> {
    /// Checks `raw`; the error says what is wrong with it.
    pub(super) fn parse(raw: &'a [u8]) -> Result<TreePath<'a>, String> {
        if raw.is_empty() {
            return Err("the path is empty".into());
        }
        if raw.len() > MAX_PATH {
            return Err(format!(
                "the path is {} bytes long, over the {MAX_PATH}-byte limit",
                raw.len()
            ));
        }
        if raw.contains(&0) {
            return Err("the path contains a NUL byte".into());
        }
        if raw[0] == b'/' {
            return Err(
                "the path is absolute; layer paths must be relative to the image root".into(),
            );
        }
        let mut components = Vec::new();
        for part in raw.split(|b| *b == b'/') {
            match part {
                b"" | b"." => {}
                b".." => {
                    return Err(
                        "the path has a `..` component, which could climb out of the image root"
                            .into(),
                    )
                }
                name if name.len() > MAX_NAME => {
                    return Err(format!(
                        "a path component is {} bytes long, over the {MAX_NAME}-byte limit",
                        name.len()
                    ))
                }
                name => components.push(name),
            }
        }
        if components.len() > MAX_DEPTH {
            return Err(format!(
                "the path is {} directories deep, over the {MAX_DEPTH}-level limit",
                components.len()
            ));
        }
        Ok(TreePath { components })
    }

    /// The directories leading to the entry (empty: the root).
    pub(super) fn parent(&self) -> &[&'a [u8]] {
        match self.components.split_last() {
            Some((_, parent)) => parent,
            None => &[],
        }
    }

    /// The entry's own name; `None` when the path is the root itself.
    pub(super) fn name(&self) -> Option<&'a [u8]> {
        self.components.last().copied()
    }
}

/// `components` joined with `/`, for messages and `openat2`.
pub(super) fn joined(components: &[&[u8]]) -> Vec<u8> {
    components.join(&b'/')
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deepest path accepted: work on a tree keeps an fd per level, so depth
    /// is bounded well below the open-files limit.
    const MAX_DEPTH: usize = 256;

    fn parts(raw: &[u8]) -> Vec<Vec<u8>> {
        let p = TreePath::parse(raw).expect("valid");
        let mut all: Vec<Vec<u8>> = p.parent().iter().map(|c| c.to_vec()).collect();
        all.extend(p.name().map(<[u8]>::to_vec));
        all
    }

    #[test]
    fn normalises_dots_and_slashes() {
        assert_eq!(parts(b"./usr/bin"), parts(b"usr/bin"));
        assert_eq!(
            parts(b"usr//./bin/"),
            vec![b"usr".to_vec(), b"bin".to_vec()]
        );
        assert!(TreePath::parse(b"./").expect("root").name().is_none());
        assert!(TreePath::parse(b".").expect("root").name().is_none());
    }

    #[test]
    fn depth_is_bounded() {
        let ok = "a/".repeat(MAX_DEPTH);
        assert!(TreePath::parse(ok.as_bytes()).is_ok());
        let deep = "a/".repeat(MAX_DEPTH + 1);
        let err = TreePath::parse(deep.as_bytes()).expect_err("too deep");
        assert!(err.contains("deep"), "{err}");
    }

    #[test]
    fn refuses_what_could_escape_or_confuse() {
        for (raw, says) in [
            (&b""[..], "empty"),
            (b"/etc/passwd", "absolute"),
            (b"a/../../etc", "`..`"),
            (b"..", "`..`"),
            (b"a\0b", "NUL"),
        ] {
            let err = TreePath::parse(raw).expect_err("refused");
            assert!(err.contains(says), "{raw:?}: {err}");
        }
        let long = vec![b'a'; MAX_PATH + 1];
        assert!(TreePath::parse(&long).expect_err("long").contains("4096"));
        let name = vec![b'a'; MAX_NAME + 1];
        assert!(TreePath::parse(&name).expect_err("long").contains("255"));
    }
}
