//! cgroup v2: `root/<parent>/<name>` with memory.max, memory.swap.max,
//! cpu.max, pids.max and (when the io controller is available) io.max. The parent must be delegated to the broker (systemd
//! `Delegate=yes`); the broker enables the controllers it needs in the
//! parent's `cgroup.subtree_control`.

use std::fs;
use std::path::{Path, PathBuf};

use super::blockio::{v2_lines, BlockDevice};
use super::{io_err, write_file, CgroupError, CgroupLimits, CPU_PERIOD_US};

/// Controllers moat needs, in the order written to subtree_control.
const CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];

/// v2 is usable when the root lists the memory controller.
pub(super) fn usable(root: &Path) -> bool {
    fs::read_to_string(root.join("cgroup.controllers"))
        .map(|s| s.split_whitespace().any(|c| c == "memory"))
        .unwrap_or(false)
}

/// Whether the root offers the io controller.
pub(super) fn has_io(root: &Path) -> bool {
    fs::read_to_string(root.join("cgroup.controllers"))
        .map(|s| s.split_whitespace().any(|c| c == "io"))
        .unwrap_or(false)
}

pub(super) fn create(
    root: &Path,
    parent: &str,
    name: &str,
    with_io: bool,
) -> Result<PathBuf, CgroupError> {
    let parent_dir = root.join(parent);
    fs::create_dir_all(&parent_dir).map_err(io_err(&parent_dir))?;
    let control = parent_dir.join("cgroup.subtree_control");
    let enabled = fs::read_to_string(&control).unwrap_or_default();
    let missing: Vec<String> = CONTROLLERS
        .iter()
        .chain(with_io.then_some(&"io"))
        .filter(|c| !enabled.split_whitespace().any(|e| e == **c))
        .map(|c| format!("+{c}"))
        .collect();
    if !missing.is_empty() {
        write_file(&control, &missing.join(" "))?;
    }
    let dir = parent_dir.join(name);
    match fs::create_dir(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_err(&dir)(e)),
    }
    Ok(dir)
}

pub(super) fn apply(
    dir: &Path,
    limits: &CgroupLimits,
    io_devices: &[BlockDevice],
) -> Result<(), CgroupError> {
    write_file(&dir.join("memory.max"), &limits.memory_bytes.to_string())?;
    let swap = dir.join("memory.swap.max");
    if swap.exists() {
        write_file(&swap, "0")?;
    }
    let quota = u64::from(limits.cpus) * CPU_PERIOD_US;
    write_file(&dir.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?;
    write_file(&dir.join("pids.max"), &limits.pids_max.to_string())?;
    // The kernel takes one device per write.
    for line in v2_lines(io_devices, &limits.io) {
        write_file(&dir.join("io.max"), &line)?;
    }
    Ok(())
}
