//! The layer's byte stream: decompression (`Compression`), the count of
//! decompressed bytes against what is left of the total limit (so a bomb of
//! padding, empty headers or zeros stops as soon as it crosses the limit,
//! with at most one read buffer more in memory), and the blame for a read
//! error: over the limit, the caller's reader failing (the host), or a
//! corrupt archive (the image).

use std::cell::Cell;
use std::io::{self, Read};

use super::error::Fault;
use super::Compression;

/// The largest zstd window accepted (2^27 = 128 MiB, zstd's own default
/// limit): bounds the decoder's memory whatever the frame header asks for.
const ZSTD_WINDOW_LOG_MAX: u32 = 27;

/// What the readers observed; shared with the driver.
#[derive(Debug, Default)]
pub(super) struct Observed {
    /// Decompressed bytes read so far.
    pub(super) bytes: Cell<u64>,
    over_limit: Cell<bool>,
    source_failed: Cell<bool>,
}

impl Observed {
    /// Decides whose fault a read error is; other faults pass unchanged.
    /// `allowance` is what was left of the total limit for this layer.
    pub(super) fn classify(&self, fault: Fault, allowance: u64, limit: u64) -> Fault {
        let Fault::Read(source) = fault else {
            return fault;
        };
        if self.over_limit.get() {
            Fault::Limit(format!(
                "the decompressed layers go over the {limit}-byte total limit ({allowance} bytes were left for this layer)"
            ))
        } else if self.source_failed.get() {
            Fault::Host {
                op: "reading the layer".into(),
                source,
            }
        } else {
            Fault::Image(format!("the archive is corrupt: {source}"))
        }
    }
}

/// The caller's reader; marks its errors as the host's.
struct Source<'a, R> {
    inner: R,
    observed: &'a Observed,
}

impl<R: Read> Read for Source<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner
            .read(buf)
            .inspect_err(|_| self.observed.source_failed.set(true))
    }
}

/// The decompressed stream, counted; fails once past `allowance`.
struct Counted<'a, R> {
    inner: R,
    observed: &'a Observed,
    allowance: u64,
}

impl<R: Read> Read for Counted<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let total = self.observed.bytes.get().saturating_add(n as u64);
        self.observed.bytes.set(total);
        if total > self.allowance {
            self.observed.over_limit.set(true);
            return Err(io::Error::other(
                "over the total size limit for image layers",
            ));
        }
        Ok(n)
    }
}

/// The decompressed, counted stream of `layer`.
pub(super) fn open<'a, R: Read + 'a>(
    layer: R,
    compression: Compression,
    observed: &'a Observed,
    allowance: u64,
) -> Result<Box<dyn Read + 'a>, Fault> {
    let source = Source {
        inner: layer,
        observed,
    };
    let decompressed: Box<dyn Read + 'a> = match compression {
        Compression::None => Box::new(source),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(source)),
        Compression::Zstd => {
            let mut decoder =
                zstd::stream::read::Decoder::new(source).map_err(|source| Fault::Host {
                    op: "starting the zstd decoder".into(),
                    source,
                })?;
            decoder
                .window_log_max(ZSTD_WINDOW_LOG_MAX)
                .map_err(|source| Fault::Host {
                    op: "limiting the zstd window".into(),
                    source,
                })?;
            Box::new(decoder)
        }
    };
    Ok(Box::new(Counted {
        inner: decompressed,
        observed,
        allowance,
    }))
}
