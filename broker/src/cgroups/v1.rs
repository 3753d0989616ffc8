//! cgroup v1: one directory per controller (`root/memory/<parent>/<name>`,
//! `root/cpu/...`, `root/cpuacct/...`, `root/pids/...`, `root/blkio/...`). Co-mounted
//! controllers (`cpu,cpuacct` with `cpu` and `cpuacct` symlinks) resolve to
//! one directory, which is used once.

use std::fs;
use std::path::{Path, PathBuf};

use super::blockio::{v1_lines, BlockDevice};
use super::{io_err, write_file, CgroupError, CgroupLimits, CPU_PERIOD_US};

/// Controllers moat uses; the first (memory) is the one read for usage.
const CONTROLLERS: [&str; 5] = ["memory", "cpu", "cpuacct", "pids", "blkio"];

/// Controllers used when present: cpuacct for metrics, blkio for I/O limits.
const OPTIONAL: [&str; 2] = ["cpuacct", "blkio"];

/// Whether the blkio controller with throttling is mounted.
pub(super) fn has_blkio(root: &Path) -> bool {
    root.join("blkio/blkio.throttle.read_bps_device").exists()
}

/// v1 is usable when the memory controller is mounted under root.
pub(super) fn usable(root: &Path) -> bool {
    root.join("memory/memory.limit_in_bytes").exists()
        && root.join("cpu").is_dir()
        && root.join("pids").is_dir()
}

/// The parent directory under each distinct controller mount.
pub(super) fn parent_dirs(root: &Path, parent: &str) -> Vec<PathBuf> {
    let mut mounts: Vec<PathBuf> = Vec::new();
    let mut dirs = Vec::new();
    for controller in CONTROLLERS {
        let Ok(real) = fs::canonicalize(root.join(controller)) else {
            continue;
        };
        if !mounts.contains(&real) {
            mounts.push(real);
            dirs.push(root.join(controller).join(parent));
        }
    }
    dirs
}

pub(super) fn create(root: &Path, parent: &str, name: &str) -> Result<Vec<PathBuf>, CgroupError> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    let mut mounts: Vec<PathBuf> = Vec::new();
    for controller in CONTROLLERS {
        let mount = root.join(controller);
        if !mount.is_dir() {
            if OPTIONAL.contains(&controller) {
                continue;
            }
            return Err(CgroupError::NoHierarchy {
                root: root.to_owned(),
            });
        }
        let real = fs::canonicalize(&mount).map_err(io_err(&mount))?;
        if mounts.contains(&real) {
            continue;
        }
        mounts.push(real);
        let dir = mount.join(parent).join(name);
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        dirs.push(dir);
    }
    Ok(dirs)
}

pub(super) fn apply(
    dirs: &[PathBuf],
    limits: &CgroupLimits,
    io_devices: &[BlockDevice],
) -> Result<(), CgroupError> {
    for dir in dirs {
        let has = |f: &str| dir.join(f).exists();
        if has("memory.limit_in_bytes") {
            let bytes = limits.memory_bytes.to_string();
            write_file(&dir.join("memory.limit_in_bytes"), &bytes)?;
            // Without swap accounting the file is absent and there is no
            // swap to limit for this cgroup's accounting either.
            if has("memory.memsw.limit_in_bytes") {
                write_file(&dir.join("memory.memsw.limit_in_bytes"), &bytes)?;
            }
            write_file(&dir.join("memory.swappiness"), "0")?;
        }
        if has("cpu.cfs_quota_us") {
            write_file(&dir.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
            let quota = u64::from(limits.cpus) * CPU_PERIOD_US;
            write_file(&dir.join("cpu.cfs_quota_us"), &quota.to_string())?;
        }
        if has("pids.max") {
            write_file(&dir.join("pids.max"), &limits.pids_max.to_string())?;
        }
        if has("blkio.throttle.read_bps_device") {
            for (file, line) in v1_lines(io_devices, &limits.io) {
                write_file(&dir.join(file), &line)?;
            }
        }
    }
    if !dirs
        .iter()
        .any(|d| d.join("memory.limit_in_bytes").exists())
    {
        return Err(CgroupError::Io {
            path: dirs.first().cloned().unwrap_or_default(),
            source: std::io::Error::other(
                "memory.limit_in_bytes missing: memory controller not usable",
            ),
        });
    }
    Ok(())
}
