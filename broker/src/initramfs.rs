//! Builds the initramfs every VM boots: a `newc` cpio archive holding the
//! static `moat-agent` as `/init`, `/dev/console` (so PID 1 has a console
//! before devtmpfs is mounted) and the directories init mounts onto. The
//! broker writes it once at start-up from the configured agent binary, so the
//! agent inside a VM always matches the broker's protocol.

use std::io::{self, Write};

/// One entry of the archive.
enum Entry<'a> {
    Dir {
        path: &'a str,
        mode: u32,
    },
    File {
        path: &'a str,
        mode: u32,
        data: &'a [u8],
    },
    CharDev {
        path: &'a str,
        mode: u32,
        major: u32,
        minor: u32,
    },
}

/// Writes the initramfs for `agent` (the bytes of the static agent binary).
pub fn write_initramfs<W: Write>(out: &mut W, agent: &[u8]) -> io::Result<()> {
    let entries = [
        Entry::Dir {
            path: "dev",
            mode: 0o755,
        },
        Entry::CharDev {
            path: "dev/console",
            mode: 0o600,
            major: 5,
            minor: 1,
        },
        Entry::Dir {
            path: "proc",
            mode: 0o555,
        },
        Entry::Dir {
            path: "sys",
            mode: 0o555,
        },
        Entry::Dir {
            path: "mnt",
            mode: 0o755,
        },
        Entry::Dir {
            path: "tmp",
            mode: 0o1777,
        },
        Entry::File {
            path: "init",
            mode: 0o755,
            data: agent,
        },
    ];
    let mut w = CpioWriter { out, ino: 1 };
    for e in &entries {
        match e {
            Entry::Dir { path, mode } => w.entry(path, libc::S_IFDIR | mode, 2, (0, 0), &[])?,
            Entry::File { path, mode, data } => {
                w.entry(path, libc::S_IFREG | mode, 1, (0, 0), data)?
            }
            Entry::CharDev {
                path,
                mode,
                major,
                minor,
            } => w.entry(path, libc::S_IFCHR | mode, 1, (*major, *minor), &[])?,
        }
    }
    w.entry("TRAILER!!!", 0, 1, (0, 0), &[])
}

struct CpioWriter<'w, W: Write> {
    out: &'w mut W,
    ino: u32,
}

impl<W: Write> CpioWriter<'_, W> {
    fn entry(
        &mut self,
        path: &str,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> io::Result<()> {
        let size = u32::try_from(data.len())
            .map_err(|_| io::Error::other("initramfs entry over 4 GiB"))?;
        let name_len = path.len() + 1; // with NUL
        let header = format!(
            "070701{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}",
            self.ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev.0, rdev.1, name_len, 0
        );
        self.ino += 1;
        self.out.write_all(header.as_bytes())?;
        self.out.write_all(path.as_bytes())?;
        self.out.write_all(&[0])?;
        pad(self.out, 110 + name_len)?;
        self.out.write_all(data)?;
        pad(self.out, data.len())
    }
}

/// newc pads header+name and data to 4-byte boundaries.
fn pad<W: Write>(out: &mut W, len: usize) -> io::Result<()> {
    let rem = (4 - len % 4) % 4;
    out.write_all(&[0u8; 3][..rem])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_lists_entries_for_cpio() {
        let mut buf = Vec::new();
        write_initramfs(&mut buf, b"#!agent-bytes").unwrap();
        assert!(buf.starts_with(b"070701"));
        assert_eq!(buf.len() % 4, 0);
        // Ask the real cpio tool when it is there; the format check above
        // stands either way.
        if let Ok(mut child) = std::process::Command::new("cpio")
            .args(["-t", "-v"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
        {
            child.stdin.take().unwrap().write_all(&buf).unwrap();
            let out = child.wait_with_output().unwrap();
            let listing = String::from_utf8_lossy(&out.stdout);
            assert!(listing.contains("init"), "{listing}");
            assert!(
                listing
                    .lines()
                    .any(|l| l.starts_with('c') && l.contains("dev/console")),
                "{listing}"
            );
            assert!(
                listing
                    .lines()
                    .any(|l| l.starts_with("-rwxr-xr-x") && l.contains(" 13 ")),
                "{listing}"
            );
        }
    }
}
