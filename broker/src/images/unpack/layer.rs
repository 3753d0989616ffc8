//! One layer, header by header: decompress and count (`stream.rs`), read the
//! tar headers raw (the tar crate's own handling of long names and PAX
//! headers would buffer them whatever their size), gather each member
//! (`member.rs`), check the entry and file-size limits, and apply it
//! (`apply.rs`), then read the stream to its end. The first fault stops the
//! layer; the error names the layer and the entry.

use std::io::Read;

use super::apply;
use super::error::{shown, Fault, UnpackError};
use super::fsops::Fs;
use super::member::{self, Extensions, Kind};
use super::stream::{self, Observed};
use super::whiteout::Seen;
use super::{Compression, LayerStats, UnpackLimits};

/// Applies `layer` onto `fs`, given the totals of the layers before it.
pub(super) fn apply<R: Read>(
    fs: &Fs,
    limits: &UnpackLimits,
    before: LayerStats,
    layer: R,
    compression: Compression,
    layer_name: &str,
) -> Result<LayerStats, UnpackError> {
    let observed = Observed::default();
    let allowance = limits.max_total_bytes.saturating_sub(before.bytes);
    // The entry errors are about: the last member's path, quoted.
    let mut last: Option<String> = None;
    let fail = |fault: Fault, entry: &str| {
        observed
            .classify(fault, allowance, limits.max_total_bytes)
            .into_error(layer_name, entry)
    };
    let between = |last: &Option<String>| match last {
        Some(path) => format!("after {path}"),
        None => "(before the first entry)".to_string(),
    };

    let reader = stream::open(layer, compression, &observed, allowance)
        .map_err(|f| fail(f, &between(&last)))?;
    let mut archive = tar::Archive::new(reader);
    let entries = archive
        .entries()
        .map_err(|e| fail(Fault::Read(e), &between(&last)))?
        .raw(true);
    let mut seen = Seen::default();
    let mut extensions = Extensions::default();
    let mut count: u64 = 0;
    for raw in entries {
        let mut raw = raw.map_err(|e| fail(Fault::Read(e), &between(&last)))?;
        if extensions
            .absorb(&mut raw)
            .map_err(|f| fail(f, &between(&last)))?
        {
            continue;
        }
        count += 1;
        let too_many = (before.entries.saturating_add(count) > limits.max_entries).then(|| {
            Fault::Limit(format!(
                "the layers have more than the {} entries allowed",
                limits.max_entries
            ))
        });
        if raw.header().entry_type().is_pax_global_extensions() {
            if let Some(fault) = too_many {
                return Err(fail(fault, &between(&last)));
            }
            if !extensions.is_empty() {
                return Err(fail(
                    Fault::Image("extension headers precede a PAX global header".into()),
                    &between(&last),
                ));
            }
            tracing::debug!(layer = layer_name, "ignoring a PAX global header");
            continue;
        }
        let (path, member) = member::assemble(raw.header(), std::mem::take(&mut extensions));
        let entry = shown(&path);
        if let Some(fault) = too_many {
            return Err(fail(fault, &entry));
        }
        let member = member.map_err(|f| fail(f, &entry))?;
        if let Kind::File { size } = member.kind {
            if size > limits.max_file_bytes {
                return Err(fail(
                    Fault::Limit(format!(
                        "the file is {size} bytes, over the {}-byte limit per file",
                        limits.max_file_bytes
                    )),
                    &entry,
                ));
            }
        }
        apply::apply(fs, &mut seen, &member, &mut raw).map_err(|f| fail(f, &entry))?;
        last = Some(entry);
    }
    if !extensions.is_empty() {
        return Err(fail(
            Fault::Image("the archive ends with extension headers and no entry for them".into()),
            &between(&last),
        ));
    }
    // Read what follows the end-of-archive blocks too (counted, so padding
    // cannot be a bomb either), so the caller's reader reaches its end and a
    // digest-checking reader sees the whole blob.
    std::io::copy(&mut archive.into_inner(), &mut std::io::sink())
        .map_err(|e| fail(Fault::Read(e), &between(&last)))?;
    Ok(LayerStats {
        entries: count,
        bytes: observed.bytes.get(),
    })
}
