//! What a well-formed image turns into: kinds, metadata, replacement,
//! whiteouts, opaque directories, compression.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt};

use super::*;

#[test]
fn files_dirs_links_and_fifos_keep_their_metadata() {
    let mut w = World::new();
    let layer = Layer::new()
        .dir("usr/", 0o755)
        .file("usr/bin/tool", 0o4755, "#!/bin/sh\n")
        .owned_file("usr/bin/owned", 0o2750, 1234, 5678)
        .dir_at("usr/bin/", 0o711, MTIME - 100)
        .symlink("usr/bin/sh", "/bin/busybox")
        .symlink("usr/bin/up", "../../../outside")
        .hardlink("usr/bin/tool2", "usr/bin/tool")
        .fifo("run/initctl", 0o620)
        .dir("tmp", 0o1777)
        .finish();
    let stats = w.apply(layer).expect("applied");
    assert_eq!(stats.entries, 9);
    assert_eq!(w.unpacker.totals(), stats);

    assert_eq!(w.read("usr/bin/tool"), "#!/bin/sh\n");
    assert_eq!(w.mode("usr/bin/tool"), 0o4755);
    assert_eq!(w.mode("usr/bin"), 0o711);
    assert_eq!(w.mode("tmp"), 0o1777);
    assert_eq!(w.mode("run"), 0o755, "parent made for an entry");
    assert_eq!(w.mode("run/initctl"), 0o620);
    assert!(fs::symlink_metadata(w.at("run/initctl"))
        .expect("fifo")
        .file_type()
        .is_fifo());
    // Symlink targets are stored verbatim, never resolved.
    assert_eq!(
        fs::read_link(w.at("usr/bin/sh")).expect("link").to_str(),
        Some("/bin/busybox")
    );
    assert_eq!(
        fs::read_link(w.at("usr/bin/up")).expect("link").to_str(),
        Some("../../../outside")
    );
    let tool = fs::metadata(w.at("usr/bin/tool")).expect("tool");
    let tool2 = fs::metadata(w.at("usr/bin/tool2")).expect("tool2");
    assert_eq!(tool.ino(), tool2.ino());
    assert_eq!(tool.mtime(), MTIME as i64);
    // The directory keeps its own mtime though entries were added after it.
    assert_eq!(
        fs::metadata(w.at("usr/bin")).expect("dir").mtime(),
        MTIME as i64 - 100
    );
    assert_eq!(
        fs::symlink_metadata(w.at("usr/bin/sh"))
            .expect("link")
            .mtime(),
        MTIME as i64
    );
    if running_as_root() {
        let owned = fs::metadata(w.at("usr/bin/owned")).expect("owned");
        assert_eq!((owned.uid(), owned.gid()), (1234, 5678));
        // chown comes before chmod, so the setgid bit survives it.
        assert_eq!(owned.mode() & 0o7777, 0o2750);
    }
    w.assert_outside_untouched();
}

#[test]
fn leading_dot_slash_and_the_root_entry() {
    let mut w = World::new();
    let layer = Layer::new()
        .dir("./", 0o755)
        .file("./etc/hostname", 0o644, "box\n")
        .finish();
    w.apply(layer).expect("applied");
    assert_eq!(w.read("etc/hostname"), "box\n");
    // The root keeps the private mode the caller gave it.
    assert_eq!(fs::metadata(&w.root).expect("root").mode() & 0o7777, 0o700);
    let refused = w.refuse(Layer::new().raw(b'0', b"./", b"", b"").finish());
    assert!(refused.contains("names the root directory"), "{refused}");
}

#[test]
fn later_layers_replace_earlier_entries() {
    let mut w = World::new();
    let lower = Layer::new()
        .file("a", 0o644, "one")
        .file("d/x", 0o644, "x")
        .file("d/sub/y", 0o644, "y")
        .symlink("s", "../outside/victim")
        .symlink("sd", "../outside")
        .finish();
    w.apply(lower).expect("lower");
    let upper = Layer::new()
        .file("a", 0o600, "two")
        .file("d", 0o644, "now a file")
        .file("s", 0o644, "not through the link")
        .dir("sd", 0o755)
        .finish();
    w.apply(upper).expect("upper");
    assert_eq!(w.read("a"), "two");
    assert_eq!(w.mode("a"), 0o600);
    assert_eq!(w.read("d"), "now a file");
    assert_eq!(w.read("s"), "not through the link");
    assert!(fs::symlink_metadata(w.at("sd")).expect("sd").is_dir());
    w.assert_outside_untouched();
}

#[test]
fn a_file_replaced_by_a_directory_entry() {
    let mut w = World::new();
    w.apply(Layer::new().file("x", 0o644, "file").finish())
        .expect("lower");
    w.apply(
        Layer::new()
            .dir("x", 0o750)
            .file("x/y", 0o644, "y")
            .finish(),
    )
    .expect("upper");
    assert_eq!(w.mode("x"), 0o750);
    assert_eq!(w.list("x"), ["y"]);
}

#[test]
fn a_directory_entry_for_an_existing_directory_updates_it() {
    let mut w = World::new();
    w.apply(
        Layer::new()
            .dir("d", 0o755)
            .file("d/keep", 0o644, "k")
            .finish(),
    )
    .expect("lower");
    w.apply(Layer::new().dir_at("d", 0o700, MTIME + 5).finish())
        .expect("upper");
    assert_eq!(w.read("d/keep"), "k");
    assert_eq!(w.mode("d"), 0o700);
    assert_eq!(
        fs::metadata(w.at("d")).expect("d").mtime(),
        MTIME as i64 + 5
    );
}

#[test]
fn whiteouts_remove_lower_files_and_directory_trees() {
    let mut w = World::new();
    let lower = Layer::new()
        .file("etc/a", 0o644, "a")
        .file("etc/b", 0o644, "b")
        .file("var/cache/x/y", 0o644, "y")
        .symlink("etc/link", "a")
        .finish();
    w.apply(lower).expect("lower");
    let upper = Layer::new()
        .file("etc/.wh.a", 0o644, "")
        .file("etc/.wh.link", 0o644, "")
        .file("var/.wh.cache", 0o644, "")
        .file("nowhere/.wh.thing", 0o644, "")
        .finish();
    w.apply(upper).expect("upper");
    assert_eq!(w.list("etc"), ["b"]);
    assert!(w.list("var").is_empty());
    assert!(!w.exists("nowhere"), "a whiteout makes no directory");
}

#[test]
fn whiteouts_do_not_hide_entries_of_their_own_layer() {
    let mut w = World::new();
    w.apply(Layer::new().file("a", 0o644, "lower").finish())
        .expect("lower");
    let upper = Layer::new()
        .file("a", 0o644, "upper")
        .file(".wh.a", 0o644, "")
        .finish();
    w.apply(upper).expect("upper");
    assert_eq!(w.read("a"), "upper");
    assert_eq!(w.list(""), ["a"]);
}

fn lower_for_opaque() -> Vec<u8> {
    Layer::new()
        .file("d/lower", 0o644, "l")
        .file("d/sub/deep", 0o644, "l")
        .file("d/mixed/old", 0o644, "l")
        .file("e/untouched", 0o644, "l")
        .finish()
}

#[test]
fn an_opaque_directory_hides_lower_entries_but_keeps_its_layers_own() {
    for marker_first in [true, false] {
        let mut w = World::new();
        w.apply(lower_for_opaque()).expect("lower");
        let mut upper = Layer::new().dir("d", 0o755);
        if marker_first {
            upper = upper.file("d/.wh..wh..opq", 0o644, "");
        }
        upper = upper
            .file("d/new", 0o644, "n")
            .file("d/mixed/fresh", 0o644, "n");
        if !marker_first {
            upper = upper.file("d/.wh..wh..opq", 0o644, "");
        }
        w.apply(upper.finish()).expect("upper");
        assert_eq!(
            w.list("d"),
            ["mixed", "new"],
            "marker first: {marker_first}"
        );
        assert_eq!(w.list("d/mixed"), ["fresh"], "marker first: {marker_first}");
        assert_eq!(w.list("e"), ["untouched"]);
    }
}

#[test]
fn read_only_directories_still_take_entries() {
    let mut w = World::new();
    let lower = Layer::new()
        .dir("ro", 0o555)
        .file("ro/a", 0o444, "a")
        .file("ro/sub/b", 0o644, "b")
        .dir("ro/sub", 0o500)
        .finish();
    w.apply(lower).expect("lower");
    let upper = Layer::new()
        .file("ro/c", 0o644, "c")
        .file("ro/.wh.a", 0o644, "")
        .file("ro/.wh.sub", 0o644, "")
        .finish();
    w.apply(upper).expect("upper");
    assert_eq!(w.list("ro"), ["c"]);
    assert_eq!(w.mode("ro"), 0o555);
}

fn small_layer() -> Vec<u8> {
    Layer::new()
        .file("hello", 0o644, "hello, world\n")
        .dir("empty", 0o755)
        .finish()
}

#[test]
fn gzip_zstd_and_detection() {
    let tar = small_layer();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&tar).expect("gzip");
    let gz = gz.finish().expect("gzip");
    let zst = zstd::encode_all(tar.as_slice(), 3).expect("zstd");
    assert_eq!(Compression::detect(&gz[..4]), Compression::Gzip);
    assert_eq!(Compression::detect(&zst[..4]), Compression::Zstd);
    assert_eq!(Compression::detect(&tar[..4]), Compression::None);
    assert_eq!(Compression::detect(&[]), Compression::None);
    for blob in [tar, gz, zst] {
        let mut w = World::new();
        let compression = Compression::detect(&blob);
        let stats = w
            .unpacker
            .apply_layer(blob.as_slice(), compression, "sha256:test")
            .expect("applied");
        assert_eq!(stats.entries, 2);
        assert_eq!(w.read("hello"), "hello, world\n");
        assert!(fs::metadata(w.at("empty")).expect("dir").is_dir());
    }
}

#[test]
fn totals_add_up_across_layers() {
    let mut w = World::new();
    let first = w.apply(small_layer()).expect("first");
    let second = w
        .apply(Layer::new().file("more", 0o644, "m").finish())
        .expect("second");
    assert_eq!(first.entries, 2);
    assert_eq!(second.entries, 1);
    assert!(first.bytes >= 3 * 512);
    assert_eq!(
        w.unpacker.totals(),
        LayerStats {
            entries: 3,
            bytes: first.bytes + second.bytes
        }
    );
}

/// Whether the filesystem under `dir` takes `user.*` xattrs.
fn user_xattrs_supported(dir: &std::path::Path) -> bool {
    let probe = dir.join("xattr-probe");
    fs::write(&probe, b"").expect("probe");
    let name = std::ffi::CString::new("user.probe").expect("name");
    let path = std::ffi::CString::new(probe.to_str().expect("utf-8")).expect("path");
    // SAFETY: both strings are NUL-terminated and live for the call; the
    // value pointer and length describe a live one-byte slice.
    let rc = unsafe { libc::setxattr(path.as_ptr(), name.as_ptr(), b"1".as_ptr().cast(), 1, 0) };
    fs::remove_file(&probe).expect("remove probe");
    rc == 0
}

fn get_xattr(path: &std::path::Path, name: &str) -> Option<Vec<u8>> {
    let name = std::ffi::CString::new(name).expect("name");
    let path = std::ffi::CString::new(path.to_str().expect("utf-8")).expect("path");
    let mut buf = vec![0u8; 256];
    // SAFETY: both strings are NUL-terminated and live for the call; `buf`
    // is a live, writable buffer of the length passed.
    let n = unsafe {
        libc::lgetxattr(
            path.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    let n = usize::try_from(n).ok()?;
    buf.truncate(n);
    Some(buf)
}

#[test]
fn pax_xattrs_are_applied_where_supported() {
    let mut w = World::new();
    let supported = user_xattrs_supported(w.root.parent().expect("tmp"));
    let layer = Layer::new()
        .pax(&[
            ("SCHILY.xattr.user.mime", b"text/plain\n"),
            (
                "SCHILY.xattr.security.selinux",
                b"system_u:object_r:bin_t:s0",
            ),
        ])
        .file("note", 0o644, "n")
        .pax(&[("SCHILY.xattr.user.dir", b"yes")])
        .dir("d", 0o755)
        .pax(&[("SCHILY.xattr.user.fifo", b"no")])
        .fifo("p", 0o644)
        .finish();
    w.apply(layer).expect("applied whatever the host supports");
    if supported {
        assert_eq!(
            get_xattr(&w.at("note"), "user.mime").as_deref(),
            Some(&b"text/plain\n"[..])
        );
        assert_eq!(
            get_xattr(&w.at("d"), "user.dir").as_deref(),
            Some(&b"yes"[..])
        );
    }
    assert_eq!(get_xattr(&w.at("note"), "security.selinux"), None);
    assert_eq!(get_xattr(&w.at("p"), "user.fifo"), None);
}

#[test]
fn pax_paths_owners_and_times_override_the_header() {
    let mut w = World::new();
    let long = format!("{}/file", "x".repeat(200));
    let layer = Layer::new()
        .pax(&[
            ("path", long.as_bytes()),
            ("mtime", b"1700000000.5"),
            ("uid", b"4242"),
            ("gid", b"4343"),
        ])
        .file("short", 0o644, "pax")
        .finish();
    w.apply(layer).expect("applied");
    assert_eq!(w.read(&long), "pax");
    assert!(!w.exists("short"));
    let meta = fs::metadata(w.at(&long)).expect("meta");
    assert_eq!(
        (meta.mtime(), meta.mtime_nsec()),
        (1_700_000_000, 500_000_000)
    );
    if running_as_root() {
        assert_eq!((meta.uid(), meta.gid()), (4242, 4343));
    }
}

#[test]
fn the_root_must_be_an_empty_directory() {
    let tmp = tempfile::tempdir().expect("tmp");
    fs::write(tmp.path().join("file"), b"x").expect("file");
    let err = Unpacker::new(tmp.path(), UnpackLimits::default()).expect_err("not empty");
    assert!(err.to_string().contains("not empty"), "{err}");
    let err = Unpacker::new(&tmp.path().join("file"), UnpackLimits::default()).expect_err("file");
    assert!(err.to_string().contains("cannot be opened"), "{err}");
}

#[test]
fn no_layer_goes_on_top_of_a_failed_one() {
    let mut w = World::new();
    w.refuse(Layer::new().raw(b'0', b"/etc/x", b"", b"").finish());
    let err = w.refuse(small_layer());
    assert!(err.contains("an earlier layer failed"), "{err}");
}

#[test]
fn file_capabilities_survive_the_owner_change() {
    // VFS_CAP_REVISION_2 with the effective bit, permitting CAP_DAC_OVERRIDE
    // and CAP_FOWNER (0x0a: a newline byte inside the PAX value).
    let cap: [u8; 20] = [
        1, 0, 0, 2, 0x0a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    let mut w = World::new();
    let layer = Layer::new()
        .pax(&[
            ("SCHILY.xattr.security.capability", &cap[..]),
            ("uid", b"1000"),
        ])
        .file("usr/bin/ping", 0o755, "elf")
        .finish();
    w.apply(layer).expect("applied");
    if running_as_root() {
        assert_eq!(
            get_xattr(&w.at("usr/bin/ping"), "security.capability").as_deref(),
            Some(&cap[..])
        );
        assert_eq!(
            fs::metadata(w.at("usr/bin/ping")).expect("ping").uid(),
            1000
        );
    }
}
