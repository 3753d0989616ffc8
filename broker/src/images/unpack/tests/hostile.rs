//! Hostile and malformed layers: each is refused with a message naming the
//! layer, the entry and the reason, and nothing is written outside the root.

use std::fs;

use super::*;

/// Asserts the message names the layer and the entry, blames the image and
/// says `reason`.
fn assert_refusal(message: &str, layer: &str, entry: &str, reason: &str) {
    assert!(
        message.contains(&format!("image layer {layer}")),
        "{message}"
    );
    assert!(message.contains(entry), "no entry {entry:?} in: {message}");
    assert!(message.contains(reason), "no {reason:?} in: {message}");
    assert!(message.contains("the image is at fault"), "{message}");
}

#[test]
fn dot_dot_anywhere_is_refused() {
    for name in [&b"../outside/evil"[..], b"a/../../outside/evil", b"a/b/.."] {
        let mut w = World::new();
        let err = w.refuse(Layer::new().raw(b'0', name, b"", b"evil").finish());
        assert_refusal(&err, "layer-1", &String::from_utf8_lossy(name), "`..`");
        w.assert_outside_untouched();
    }
}

#[test]
fn absolute_paths_are_refused() {
    let mut w = World::new();
    let err = w.refuse(Layer::new().raw(b'0', b"/etc/evil", b"", b"x").finish());
    assert_refusal(&err, "layer-1", "\"/etc/evil\"", "absolute");
    let mut w = World::new();
    let err = w.refuse(
        Layer::new()
            .pax(&[("path", b"/etc/evil")])
            .file("innocent", 0o644, "x")
            .finish(),
    );
    assert_refusal(&err, "layer-1", "/etc/evil", "absolute");
}

#[test]
fn a_symlink_planted_by_a_lower_layer_is_never_a_parent() {
    let mut w = World::new();
    let target = w.outside.to_str().expect("utf-8").to_string();
    w.apply(
        Layer::new()
            .symlink("abs", &target)
            .symlink("rel", "../outside")
            .finish(),
    )
    .expect("links are fine as such");
    for path in ["abs/evil", "rel/evil", "rel/deeper/evil"] {
        let mut again = World::new();
        again
            .apply(
                Layer::new()
                    .symlink("abs", &target)
                    .symlink("rel", "../outside")
                    .finish(),
            )
            .expect("lower");
        let err = again.refuse(Layer::new().file(path, 0o644, "evil").finish());
        assert_refusal(&err, "layer-2", path, "symbolic link");
        assert!(err.contains("strict rule"), "{err}");
        again.assert_outside_untouched();
    }
    let err = w.refuse(Layer::new().file("abs/evil", 0o644, "evil").finish());
    assert_refusal(
        &err,
        "layer-2",
        "abs/evil",
        "its parent \"abs\" is a symbolic link",
    );
    w.assert_outside_untouched();
}

#[test]
fn a_symlink_pointing_inside_the_root_is_not_a_parent_either() {
    let mut w = World::new();
    let err = w.refuse(
        Layer::new()
            .dir("real", 0o755)
            .symlink("inner", "real")
            .file("inner/f", 0o644, "x")
            .finish(),
    );
    assert_refusal(
        &err,
        "layer-1",
        "inner/f",
        "even one pointing inside the image",
    );
    assert!(w.list("real").is_empty());
}

#[test]
fn whiteouts_through_a_symlink_are_refused() {
    let mut w = World::new();
    fs::write(w.outside.join("precious"), b"keep").expect("precious");
    w.apply(Layer::new().symlink("rel", "../outside").finish())
        .expect("lower");
    let err = w.refuse(Layer::new().file("rel/.wh.precious", 0o644, "").finish());
    assert_refusal(&err, "layer-2", "rel/.wh.precious", "symbolic link");
    assert_eq!(
        fs::read(w.outside.join("precious")).expect("still there"),
        b"keep"
    );
}

#[test]
fn hard_links_must_point_at_a_regular_file_in_the_tree() {
    let cases: [(&[u8], &str); 6] = [
        (b"/etc/passwd", "absolute"),
        (b"../outside/x", "`..`"),
        (b"missing", "does not exist"),
        (b"link/file", "symbolic link"),
        (b"dir", "is a directory, not a regular file"),
        (b"link", "is a symbolic link, not a regular file"),
    ];
    for (target, reason) in cases {
        let mut w = World::new();
        w.apply(
            Layer::new()
                .file("dir/file", 0o644, "f")
                .symlink("link", "dir")
                .finish(),
        )
        .expect("lower");
        let err = w.refuse(Layer::new().raw(b'1', b"hl", target, b"").finish());
        assert_refusal(&err, "layer-2", "\"hl\"", reason);
        assert!(err.contains("hard link target"), "{err}");
        assert!(!w.exists("hl"));
        w.assert_outside_untouched();
    }
}

#[test]
fn a_hard_link_may_not_replace_its_own_target() {
    let mut w = World::new();
    w.apply(Layer::new().file("d/f", 0o644, "f").finish())
        .expect("lower");
    let err = w.refuse(Layer::new().raw(b'1', b"d", b"d/f", b"").finish());
    assert_refusal(&err, "layer-2", "\"d\"", "was removed by this very entry");
}

#[test]
fn device_nodes_sparse_files_and_unknown_types_are_refused() {
    let cases: [(u8, &str); 6] = [
        (b'3', "a character device node"),
        (b'4', "a block device node"),
        (b'S', "GNU sparse file"),
        (b'V', "'V' (a GNU volume label) is not supported"),
        (b'Z', "'Z' (unknown) is not supported"),
        (b'X', "'X' (a Solaris extended header)"),
    ];
    for (kind, reason) in cases {
        let mut w = World::new();
        let err = w.refuse(Layer::new().raw(kind, b"dev/thing", b"", b"").finish());
        assert_refusal(&err, "layer-1", "dev/thing", reason);
        assert!(!w.exists("dev/thing"));
    }
    let mut w = World::new();
    let err = w.refuse(
        Layer::new()
            .pax(&[("GNU.sparse.major", b"1")])
            .file("s", 0o644, "")
            .finish(),
    );
    assert_refusal(&err, "layer-1", "\"s\"", "sparse");
}

#[test]
fn names_with_nul_or_over_4096_bytes_are_refused() {
    let mut w = World::new();
    let err = w.refuse(
        Layer::new()
            .pax(&[("path", b"a\0b")])
            .file("x", 0o644, "")
            .finish(),
    );
    assert_refusal(&err, "layer-1", "a\\0b", "NUL");
    let mut w = World::new();
    let long = "d/".repeat(2048) + "f";
    let err = w.refuse(
        Layer::new()
            .pax(&[("path", long.as_bytes())])
            .file("x", 0o644, "")
            .finish(),
    );
    assert_refusal(&err, "layer-1", "d/d/d", "4097 bytes long");
    let mut w = World::new();
    let err = w.refuse(
        Layer::new()
            .pax(&[("path", b"ok"), ("linkpath", b"a\0b")])
            .symlink("s", "t")
            .finish(),
    );
    assert_refusal(&err, "layer-1", "\"ok\"", "NUL");
}

#[test]
fn a_file_is_not_a_parent_directory() {
    let mut w = World::new();
    w.apply(Layer::new().file("f", 0o644, "file").finish())
        .expect("lower");
    let err = w.refuse(Layer::new().file("f/inner", 0o644, "x").finish());
    assert_refusal(
        &err,
        "layer-2",
        "f/inner",
        "its parent \"f\" is not a directory",
    );
}

#[test]
fn whiteout_names_are_not_directories() {
    let mut w = World::new();
    let err = w.refuse(Layer::new().file("a/.wh.b/c", 0o644, "").finish());
    assert_refusal(&err, "layer-1", "a/.wh.b/c", "whiteout name");
    let mut w = World::new();
    let err = w.refuse(Layer::new().raw(b'0', b"a/.wh..", b"", b"").finish());
    assert_refusal(&err, "layer-1", "a/.wh..", "names no removable entry");
}

#[test]
fn malformed_archives_are_refused() {
    // Truncated inside a file's data.
    let mut layer = Layer::new().file("f", 0o644, &"x".repeat(2000)).finish();
    layer.truncate(1024);
    let mut w = World::new();
    let err = w.refuse(layer);
    assert_refusal(&err, "layer-1", "\"f\"", "ends inside this file's data");
    // A header with a bad checksum.
    let mut layer = Layer::new().file("f", 0o644, "x").finish();
    layer[0] ^= 1;
    let err = World::new().refuse(layer);
    assert_refusal(&err, "layer-1", "before the first entry", "checksum");
    // Extension headers with no entry after them.
    let mut builder = tar::Builder::new(Vec::new());
    builder
        .append_pax_extensions([("path", &b"x"[..])])
        .expect("pax");
    let mut layer = builder.into_inner().expect("tar");
    layer.extend_from_slice(&[0u8; 1024]);
    let err = World::new().refuse(layer);
    assert_refusal(
        &err,
        "layer-1",
        "before the first entry",
        "no entry for them",
    );
    // A malformed PAX record.
    let mut h = header(EntryType::XHeader, 0o644, 7);
    h.set_path("pax").expect("path");
    h.set_cksum();
    let mut builder = tar::Builder::new(Vec::new());
    builder.append(&h, &b"9 a=b\nx"[..]).expect("pax");
    let mut hf = header(EntryType::Regular, 0o644, 0);
    builder
        .append_data(&mut hf, "after", &b""[..])
        .expect("file");
    let err = World::new().refuse(builder.into_inner().expect("tar"));
    assert_refusal(&err, "layer-1", "\"after\"", "PAX record");
    // Corrupt gzip.
    let mut w = World::new();
    let err = w
        .unpacker
        .apply_layer(
            &[0x1f, 0x8b, 0, 0, 0, 0][..],
            Compression::Gzip,
            "sha256:bad",
        )
        .expect_err("corrupt")
        .to_string();
    assert_refusal(&err, "sha256:bad", "before the first entry", "corrupt");
}

#[test]
fn pax_sizes_that_disagree_with_the_header_are_refused() {
    let mut w = World::new();
    let err = w.refuse(
        Layer::new()
            .pax(&[("size", b"5")])
            .file("f", 0o644, "abc")
            .finish(),
    );
    assert_refusal(&err, "layer-1", "\"f\"", "PAX size record says 5 bytes");
}

#[test]
fn a_failing_reader_is_the_hosts_fault() {
    struct Broken;
    impl std::io::Read for Broken {
        fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
            Err(std::io::Error::other("disk on fire"))
        }
    }
    let mut w = World::new();
    let err = w
        .unpacker
        .apply_layer(Broken, Compression::None, "sha256:x")
        .expect_err("fails");
    assert!(matches!(err, UnpackError::Host { .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains("reading the layer failed on the host: disk on fire"),
        "{err}"
    );
}
