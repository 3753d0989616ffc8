//! Image benchmark, with baselines measured in the same run:
//! - import of the Python default image (OCI layout, 1 uncompressed layer)
//!   into a fresh store: unpack throughput and boot-disk (unpack + erofs)
//!   throughput in MB/s, next to GNU tar extracting the same layer plus
//!   mkfs.erofs on the result (what the work costs without moat's checks);
//! - pull of the same image (gzip layer) from a loopback registry into a
//!   fresh store, next to `skopeo copy` of it to an OCI directory (download
//!   and verify only).
//!
//! Usage (root, after `make setup`): `moat-bench-images [RUNS]`; prints a
//! table and writes `target/bench-images.json`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use moat_e2e::registry::{push, Auth, Format, Registry};
use moat_e2e::stats::percentile;
use moat_e2e::{bin_dir, build_dir};
use serde_json::json;

struct Row {
    name: String,
    unit: &'static str,
    values: Vec<f64>,
}

fn row(name: &str, unit: &'static str, mut values: Vec<f64>) -> Row {
    values.sort_by(|a, b| a.total_cmp(b));
    Row {
        name: name.into(),
        unit,
        values,
    }
}

/// A broker config whose store is `store` (nothing else is used).
fn config(dir: &Path, store: &Path, registry: Option<&str>) -> PathBuf {
    let build = build_dir();
    let mut text = format!(
        "socket = \"{d}/run/broker.sock\"\ngateway_uid = 65534\ngateway_gid = 65534\nstate_dir = \"{d}/state\"\n\
         [boot]\nkernel = \"{k}\"\nagent = \"{a}\"\n[images]\ndefault = \"base\"\nstore = \"{s}\"\n\
         [images.local]\nbase = \"{b}\"\n",
        d = dir.display(),
        k = build.join("vmlinux").display(),
        a = build.join("moat-agent").display(),
        s = store.display(),
        b = build.join("base.erofs").display(),
    );
    if let Some(host) = registry {
        text.push_str(&format!("[registries.\"{host}\"]\ninsecure_http = true\n"));
    }
    let path = dir.join("broker.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// (bytes, unpack ms, mkfs ms) from the CLI's "boot disk:" line.
fn disk_line(out: &str) -> (f64, f64, f64) {
    let line = out
        .lines()
        .find(|l| l.starts_with("boot disk:"))
        .unwrap_or_else(|| panic!("no boot disk line in {out}"));
    let num_before = |marker: &str| -> f64 {
        let i = line.find(marker).expect(marker);
        line[..i]
            .split_whitespace()
            .last()
            .and_then(|w| w.parse().ok())
            .expect("number")
    };
    let mib = num_before(" MiB unpacked");
    let unpack_ms = line
        .split("unpacked in ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("unpack ms");
    let mkfs_ms = line
        .split("mkfs ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("mkfs ms");
    (mib * 1048576.0, unpack_ms, mkfs_ms)
}

fn main() {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(5);
    let cache = std::env::var("MOAT_CACHE").unwrap_or_else(|_| "/var/cache/moat".into());
    let layout = PathBuf::from(&cache).join("images/python.oci");
    assert!(
        layout.join("index.json").exists(),
        "{} missing: run `make setup` first",
        layout.display()
    );
    let moat = bin_dir().join("moat");
    let layer = std::fs::read_dir(layout.join("blobs/sha256"))
        .expect("blobs")
        .flatten()
        .max_by_key(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
        .expect("a layer")
        .path();

    let (mut unpack_mbs, mut disk_mbs, mut import_s) = (Vec::new(), Vec::new(), Vec::new());
    let (mut tar_s, mut tar_mbs) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        // moat import.
        let work = tempfile::tempdir().expect("tempdir");
        let cfg = config(work.path(), &work.path().join("store"), None);
        let t = Instant::now();
        let out = run(Command::new(&moat)
            .args(["image", "import"])
            .arg(&layout)
            .args(["--tag", "bench/python", "--broker-config"])
            .arg(&cfg));
        import_s.push(t.elapsed().as_secs_f64());
        let (bytes, unpack_ms, mkfs_ms) = disk_line(&out);
        unpack_mbs.push(bytes / 1e6 / (unpack_ms / 1000.0));
        disk_mbs.push(bytes / 1e6 / ((unpack_ms + mkfs_ms) / 1000.0));
        // Baseline: GNU tar + mkfs.erofs on the same layer.
        let root = work.path().join("tar-root");
        std::fs::create_dir(&root).expect("mkdir");
        let t = Instant::now();
        run(Command::new("tar")
            .args(["--numeric-owner", "-xf"])
            .arg(&layer)
            .arg("-C")
            .arg(&root));
        run(Command::new("mkfs.erofs")
            .arg("--quiet")
            .arg(work.path().join("tar.erofs"))
            .arg(&root));
        let secs = t.elapsed().as_secs_f64();
        tar_s.push(secs);
        tar_mbs.push(bytes / 1e6 / secs);
    }

    // Pulls from a loopback registry (skopeo gzips the layer on push).
    let registry = Registry::start(Auth::None);
    push(
        &layout,
        "latest",
        &registry,
        "bench/python:latest",
        Format::Oci,
    );
    let image = format!("{}/bench/python:latest", registry.host());
    let (mut pull_s, mut skopeo_s) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let work = tempfile::tempdir().expect("tempdir");
        let cfg = config(
            work.path(),
            &work.path().join("store"),
            Some(&registry.host()),
        );
        let t = Instant::now();
        run(Command::new(&moat)
            .args(["image", "pull", &image, "--broker-config"])
            .arg(&cfg));
        pull_s.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        run(Command::new("skopeo")
            .args(["--insecure-policy", "copy", "--src-tls-verify=false"])
            .arg(format!("docker://{image}"))
            .arg(format!(
                "oci:{}:latest",
                work.path().join("skopeo").display()
            )));
        skopeo_s.push(t.elapsed().as_secs_f64());
    }

    let rows = vec![
        row("import: unpack (moat)", "MB/s", unpack_mbs),
        row("import: unpack + erofs (moat)", "MB/s", disk_mbs),
        row("baseline: tar -x + mkfs.erofs", "MB/s", tar_mbs),
        row("import: whole command (moat)", "s", import_s),
        row("baseline: tar -x + mkfs.erofs", "s", tar_s),
        row("pull + boot disk (moat)", "s", pull_s),
        row("baseline: skopeo copy (download only)", "s", skopeo_s),
    ];
    let mut json_rows = Vec::new();
    for r in &rows {
        let (median, p99) = (percentile(&r.values, 0.5), percentile(&r.values, 0.99));
        println!(
            "{:<40} n={:<3} median={:>9.2} {}  p99={:>9.2} {}",
            r.name,
            r.values.len(),
            median,
            r.unit,
            p99,
            r.unit
        );
        json_rows.push(json!({"name": r.name, "unit": r.unit, "median": median, "p99": p99, "values": r.values}));
    }
    let out = PathBuf::from("target/bench-images.json");
    std::fs::write(
        &out,
        serde_json::to_vec_pretty(&json!({"rows": json_rows})).unwrap_or_default(),
    )
    .expect("write json");
    println!("wrote {}", out.display());
}
