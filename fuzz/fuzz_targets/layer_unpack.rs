//! Fuzzes the OCI layer unpacker: the input is an uncompressed layer,
//! applied to a fresh directory with small limits, then applied again on
//! top of itself (so replacements, whiteouts, opaque directories and links
//! meet what an earlier layer made). Errors are expected; the invariants are
//! that nothing panics and nothing is written beside the root: a sentinel
//! sibling directory stays empty and the temporary directory holds only the
//! two.

#![no_main]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use libfuzzer_sys::fuzz_target;
use moat_broker::images::unpack::{Compression, UnpackLimits, Unpacker};

static RUNS: AtomicU64 = AtomicU64::new(0);

fuzz_target!(|data: &[u8]| {
    let run = RUNS.fetch_add(1, Ordering::Relaxed);
    // tmpfs when there is one: a disk filesystem is a hundred times slower.
    let shm = Path::new("/dev/shm");
    let tmp = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    let base = tmp.join(format!(
        "moat-fuzz-layer-unpack-{}-{run}",
        std::process::id()
    ));
    let root = base.join("root");
    let outside = base.join("outside");
    fs::create_dir_all(&root).expect("root");
    fs::set_permissions(&root, fs::Permissions::from_mode(0o700)).expect("chmod root");
    fs::create_dir(&outside).expect("sentinel");

    let limits = UnpackLimits {
        max_total_bytes: 16 << 20,
        max_file_bytes: 4 << 20,
        max_entries: 4096,
    };
    let mut unpacker = Unpacker::new(&root, limits).expect("fresh root");
    if unpacker
        .apply_layer(data, Compression::None, "fuzz-1")
        .is_ok()
    {
        let _ = unpacker.apply_layer(data, Compression::None, "fuzz-2");
    }

    let outside_entries = fs::read_dir(&outside).expect("sentinel").count();
    assert_eq!(outside_entries, 0, "the unpacker wrote outside its root");
    let mut beside: Vec<_> = fs::read_dir(&base)
        .expect("base")
        .map(|e| e.expect("entry").file_name())
        .collect();
    beside.sort();
    assert_eq!(
        beside,
        ["outside", "root"],
        "the unpacker wrote beside its root"
    );
    fs::remove_dir_all(&base).expect("cleanup");
});
