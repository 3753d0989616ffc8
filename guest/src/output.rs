//! Turning a command's stdout/stderr bytes into ordered `OutputLine`s under a
//! byte cap. Lines are emitted when they complete (newline seen, or their
//! stream ends), so the order across streams is the order the agent saw the
//! bytes arrive. The first `cap` bytes (newlines included) are kept; every
//! byte after that is counted in `dropped` and discarded, so
//! `kept + dropped` is always the total the command wrote. A line cut by the
//! cap is emitted truncated.

use moat_proto::agent::{OutputLine, Stream};

/// Collects output lines for one command.
#[derive(Debug)]
pub struct Collector {
    cap: u64,
    max_lines: usize,
    kept: u64,
    dropped: u64,
    lines: Vec<OutputLine>,
    /// Bytes of the current unfinished line of stdout (0) and stderr (1).
    partial: [Vec<u8>; 2],
}

fn slot(stream: Stream) -> usize {
    usize::from(stream == Stream::Stderr)
}

impl Collector {
    /// Keeps at most `cap` bytes in at most about `max_lines` lines (the line
    /// bound keeps the reply frame small even for output of empty lines).
    pub fn new(cap: u64, max_lines: usize) -> Self {
        Collector {
            cap,
            max_lines,
            kept: 0,
            dropped: 0,
            lines: Vec::new(),
            partial: [Vec::new(), Vec::new()],
        }
    }

    fn budget(&self) -> u64 {
        if self.lines.len() >= self.max_lines {
            0
        } else {
            self.cap.saturating_sub(self.kept)
        }
    }

    fn emit(&mut self, stream: Stream) {
        let text = std::mem::take(&mut self.partial[slot(stream)]);
        self.lines.push(OutputLine {
            stream: stream as i32,
            text,
        });
    }

    /// Accounts `bytes` just read from `stream`.
    pub fn push(&mut self, stream: Stream, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let (segment, newline) = match bytes.iter().position(|&b| b == b'\n') {
                Some(i) => (&bytes[..i], true),
                None => (bytes, false),
            };
            bytes = &bytes[segment.len() + usize::from(newline)..];

            let room = usize::try_from(self.budget()).unwrap_or(usize::MAX);
            let keep = segment.len().min(room);
            self.partial[slot(stream)].extend_from_slice(&segment[..keep]);
            self.kept += keep as u64;
            self.dropped += (segment.len() - keep) as u64;
            if newline {
                if self.budget() > 0 {
                    self.kept += 1;
                    self.emit(stream);
                } else {
                    self.dropped += 1;
                    // A line truncated by the cap still shows what was kept.
                    if !self.partial[slot(stream)].is_empty() {
                        self.emit(stream);
                    }
                }
            }
        }
    }

    /// The stream ended: a last line without a newline is still a line.
    pub fn close(&mut self, stream: Stream) {
        if !self.partial[slot(stream)].is_empty() {
            self.emit(stream);
        }
    }

    /// All lines (unfinished ones included) and the dropped byte count.
    pub fn finish(mut self) -> (Vec<OutputLine>, u64) {
        self.close(Stream::Stdout);
        self.close(Stream::Stderr);
        (self.lines, self.dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(lines: &[OutputLine]) -> Vec<(i32, String)> {
        lines
            .iter()
            .map(|l| (l.stream, String::from_utf8_lossy(&l.text).into_owned()))
            .collect()
    }

    const OUT: i32 = Stream::Stdout as i32;
    const ERR: i32 = Stream::Stderr as i32;

    #[test]
    fn lines_split_across_reads_and_streams_keep_completion_order() {
        let mut c = Collector::new(1 << 20, 1000);
        c.push(Stream::Stdout, b"hel");
        c.push(Stream::Stderr, b"oops\nwa");
        c.push(Stream::Stdout, b"lo\n\nnext");
        c.push(Stream::Stderr, b"rn\n");
        c.close(Stream::Stdout);
        let (lines, dropped) = c.finish();
        assert_eq!(
            texts(&lines),
            vec![
                (ERR, "oops".into()),
                (OUT, "hello".into()),
                (OUT, "".into()),
                (ERR, "warn".into()),
                (OUT, "next".into()),
            ]
        );
        assert_eq!(dropped, 0);
    }

    #[test]
    fn cap_keeps_first_bytes_and_counts_the_rest() {
        let mut c = Collector::new(8, 1000);
        c.push(Stream::Stdout, b"abc\ndefgh\nij\n");
        let (lines, dropped) = c.finish();
        // "abc\n" (4) + "defg" (4) kept; "h\n" + "ij\n" dropped.
        assert_eq!(
            texts(&lines),
            vec![(OUT, "abc".into()), (OUT, "defg".into())]
        );
        assert_eq!(dropped, 5);
    }

    #[test]
    fn line_bound_drops_everything_after_it() {
        let mut c = Collector::new(1 << 20, 2);
        c.push(Stream::Stdout, b"\n\n\n\nxyz");
        let (lines, dropped) = c.finish();
        assert_eq!(lines.len(), 2);
        assert_eq!(dropped, 5);
    }

    #[test]
    fn raw_bytes_are_preserved() {
        let mut c = Collector::new(100, 100);
        c.push(Stream::Stderr, &[0xff, 0x00, b'\r', b'\n']);
        let (lines, _) = c.finish();
        assert_eq!(lines[0].text, vec![0xff, 0x00, b'\r']);
        assert_eq!(lines[0].stream, ERR);
    }
}
