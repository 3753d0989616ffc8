//! The limits: decompression bombs, per-file size, entry count, totals
//! across layers, extension-header caps.

use std::io::Write;
use std::time::{Duration, Instant};

use super::*;

/// One compressed member / frame holding 1 MiB of zeros.
fn zeros(compression: Compression) -> Vec<u8> {
    compress(&vec![0u8; 1 << 20], compression)
}

fn compress(data: &[u8], compression: Compression) -> Vec<u8> {
    match compression {
        Compression::Gzip => {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
            gz.write_all(data).expect("gzip");
            gz.finish().expect("gzip")
        }
        Compression::Zstd => zstd::encode_all(data, 3).expect("zstd"),
        Compression::None => data.to_vec(),
    }
}

/// A 1 GiB decompression bomb: one header claiming a 1 GiB entry of type
/// `kind`, then 1 GiB of zeros, as concatenated gzip members or zstd frames
/// (about 1 MiB compressed).
fn bomb(kind: EntryType, compression: Compression) -> Vec<u8> {
    let mut h = header(kind, 0o644, 1 << 30);
    h.set_path("bomb").expect("path");
    h.set_cksum();
    let mut out = compress(h.as_bytes(), compression);
    let chunk = zeros(compression);
    for _ in 0..1024 {
        out.extend_from_slice(&chunk);
    }
    out
}

fn max_rss_bytes() -> u64 {
    let usage = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF)
        .expect("getrusage");
    u64::try_from(usage.max_rss()).unwrap_or(0) * 1024
}

#[test]
fn decompression_bombs_stop_at_the_total_limit_quickly_and_in_bounded_memory() {
    let limits = UnpackLimits {
        max_total_bytes: 16 << 20,
        ..UnpackLimits::default()
    };
    for compression in [Compression::Gzip, Compression::Zstd] {
        // A huge file, and the same size of padding in a header that is
        // skipped, not unpacked.
        for kind in [EntryType::Regular, EntryType::XGlobalHeader] {
            let blob = bomb(kind, compression);
            assert!(blob.len() < 8 << 20, "{} bytes", blob.len());
            let mut w = World::with_limits(&limits);
            let started = Instant::now();
            let err = w
                .unpacker
                .apply_layer(blob.as_slice(), compression, "sha256:bomb")
                .expect_err("bomb refused");
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "{:?}",
                started.elapsed()
            );
            assert!(matches!(err, UnpackError::Limit { .. }), "{err:?}");
            let message = err.to_string();
            assert!(message.contains("16777216-byte total limit"), "{message}");
            assert!(message.contains("image layer sha256:bomb"), "{message}");
            assert!(message.contains("the image is at fault"), "{message}");
        }
    }
    // Nothing near the 1 GiB the bombs expand to was ever held in memory.
    assert!(
        max_rss_bytes() < 512 << 20,
        "max RSS {} bytes",
        max_rss_bytes()
    );
}

#[test]
fn the_total_limit_spans_layers() {
    let limits = UnpackLimits {
        max_total_bytes: 8 * 1024,
        ..UnpackLimits::default()
    };
    let mut w = World::with_limits(&limits);
    let first = w
        .apply(Layer::new().file("a", 0o644, &"a".repeat(1000)).finish())
        .expect("fits");
    assert!(first.bytes <= 8 * 1024);
    let err = w.refuse(Layer::new().file("b", 0o644, &"b".repeat(6000)).finish());
    assert!(err.contains("8192-byte total limit"), "{err}");
    assert!(
        err.contains(&format!("{} bytes were left", 8 * 1024 - first.bytes)),
        "{err}"
    );
}

#[test]
fn a_file_over_the_per_file_limit_is_refused_before_its_data_is_read() {
    let limits = UnpackLimits {
        max_file_bytes: 1000,
        ..UnpackLimits::default()
    };
    let mut w = World::with_limits(&limits);
    w.apply(Layer::new().file("ok", 0o644, &"x".repeat(1000)).finish())
        .expect("at the limit");
    let err = w.refuse(Layer::new().file("big", 0o644, &"x".repeat(1001)).finish());
    assert!(
        err.contains("\"big\": the file is 1001 bytes, over the 1000-byte limit per file"),
        "{err}"
    );
    // A header claiming 1 GiB with no data behind it: refused on the header.
    let mut w = World::with_limits(&limits);
    let mut h = header(EntryType::Regular, 0o644, 1 << 30);
    h.set_path("huge").expect("path");
    h.set_cksum();
    let err = w.refuse(h.as_bytes().to_vec());
    assert!(
        err.contains("1073741824 bytes, over the 1000-byte limit"),
        "{err}"
    );
    assert!(!w.exists("huge"));
}

#[test]
fn the_entry_limit_spans_layers() {
    let limits = UnpackLimits {
        max_entries: 10,
        ..UnpackLimits::default()
    };
    let layer = |n: usize| {
        let mut l = Layer::new();
        for i in 0..n {
            l = l.file(&format!("f{i}"), 0o644, "");
        }
        l.finish()
    };
    let err = World::with_limits(&limits).refuse(layer(11));
    assert!(err.contains("more than the 10 entries allowed"), "{err}");
    let mut w = World::with_limits(&limits);
    w.apply(layer(6)).expect("first");
    let err = w.refuse(layer(5));
    assert!(err.contains("more than the 10 entries allowed"), "{err}");
}

#[test]
fn extension_headers_are_capped() {
    let mut w = World::new();
    let huge = vec![b'c'; 2 << 20];
    let err = w.refuse(
        Layer::new()
            .pax(&[("comment", huge.as_slice())])
            .file("f", 0o644, "")
            .finish(),
    );
    assert!(err.contains("PAX extended header of"), "{err}");
    assert!(err.contains("at most 1048576 accepted"), "{err}");
    let mut w = World::new();
    let long = "n".repeat(5000);
    let err = w.refuse(Layer::new().file(&long, 0o644, "").finish());
    assert!(err.contains("GNU long-name header of 5001 bytes"), "{err}");
}

#[test]
fn the_stream_is_read_to_its_end_and_trailing_padding_counts() {
    /// Reports whether it was read until its end.
    struct Tracked<'a> {
        data: &'a [u8],
        at_end: &'a std::cell::Cell<bool>,
    }
    impl std::io::Read for Tracked<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.data.read(buf)?;
            if n == 0 {
                self.at_end.set(true);
            }
            Ok(n)
        }
    }
    let mut layer = Layer::new().file("f", 0o644, "x").finish();
    layer.extend_from_slice(&[0u8; 10 * 1024]);
    let at_end = std::cell::Cell::new(false);
    let mut w = World::new();
    let reader = Tracked {
        data: &layer,
        at_end: &at_end,
    };
    let stats = w
        .unpacker
        .apply_layer(reader, Compression::None, "padded")
        .expect("applied");
    assert!(at_end.get(), "the layer was not read to its end");
    assert_eq!(stats.bytes, layer.len() as u64);

    let limits = UnpackLimits {
        max_total_bytes: 8 * 1024,
        ..UnpackLimits::default()
    };
    let err = World::with_limits(&limits).refuse(layer);
    assert!(err.contains("after \"f\""), "{err}");
    assert!(err.contains("8192-byte total limit"), "{err}");
}
