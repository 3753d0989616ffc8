//! The background process's log: a thread drains its output pipe for as
//! long as anything holds the write end, appending to the log file until
//! `cap` bytes were written; then one line `[moat: output truncated at N
//! bytes]` and nothing more, while still draining so that the process never
//! blocks on a full pipe. Write errors (disk full) are ignored: the drain
//! must go on.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::thread;

use crate::log::log;

const READ_CHUNK: usize = 64 * 1024;

/// The bounded log file.
#[derive(Debug)]
pub struct LogSink<W> {
    out: W,
    cap: u64,
    written: u64,
    truncated: bool,
    ends_line: bool,
}

impl<W: Write> LogSink<W> {
    /// Appends to `out` at most `cap` bytes of output.
    pub fn new(out: W, cap: u64) -> Self {
        LogSink {
            out,
            cap,
            written: 0,
            truncated: false,
            ends_line: true,
        }
    }

    /// Accounts bytes read from the process.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.truncated || bytes.is_empty() {
            return;
        }
        let room = usize::try_from(self.cap - self.written).unwrap_or(usize::MAX);
        let keep = &bytes[..bytes.len().min(room)];
        if !keep.is_empty() {
            let _ = self.out.write_all(keep);
            self.written += keep.len() as u64;
            self.ends_line = keep.ends_with(b"\n");
        }
        if keep.len() < bytes.len() {
            self.truncated = true;
            let newline = if self.ends_line { "" } else { "\n" };
            let _ = writeln!(
                self.out,
                "{newline}[moat: output truncated at {} bytes]",
                self.cap
            );
        }
        let _ = self.out.flush();
    }

    /// The writer, for tests.
    #[cfg(test)]
    pub fn into_inner(self) -> W {
        self.out
    }
}

/// Copies everything from `reader` into `sink` until end-of-file.
pub fn drain<W: Write>(mut reader: impl Read, sink: &mut LogSink<W>) {
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        match reader.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => sink.push(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                log!("reading the background process's output failed: {e}");
                return;
            }
        }
    }
}

/// Drains `pipe` into `sink` on a thread of its own.
pub fn spawn_drain(pipe: OwnedFd, mut sink: LogSink<File>) {
    let spawned = thread::Builder::new()
        .name("background-log".to_owned())
        .spawn(move || drain(File::from(pipe), &mut sink));
    if let Err(e) = spawned {
        log!("cannot start the background log thread: {e}");
    }
}
