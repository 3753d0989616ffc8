//! Cgroups for VM processes: one cgroup per sandbox under the configured
//! parent, with memory (no swap), CPU quota, pids and (where the host has
//! the controller and the disks sit on a block device) I/O limits. Supports cgroup
//! v2 (a delegated subtree, as on systemd hosts) and v1 (one directory per
//! controller). Everything goes through paths under a root directory, so the
//! unit tests run against fake cgroupfs trees in a temp dir.

mod blockio;
mod v1;
mod v2;

pub use blockio::{backing_devices, BlockDevice};

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::disk::DiskIo;

/// Errors from cgroup setup and teardown.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no usable cgroup hierarchy under {root}: need cgroup v2 with the memory controller, or v1 with memory, cpu and pids mounted")]
    NoHierarchy { root: PathBuf },
    #[error("cgroup {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("cgroup {path} still has processes after kill; left in place")]
    Busy { path: PathBuf },
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Writes `value` to a cgroup control file.
pub(crate) fn write_file(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::write(path, value).map_err(io_err(path))
}

/// Limits applied to one sandbox's cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CgroupLimits {
    /// Hard memory limit (guest RAM + VMM overhead); swap is disabled.
    pub memory_bytes: u64,
    /// CPU bandwidth in units of one CPU (quota = cpus x period).
    pub cpus: u32,
    /// Most tasks (processes + threads).
    pub pids_max: u32,
    /// Disk bandwidth and IOPS caps on the manager's I/O devices.
    pub io: DiskIo,
}

/// Period of the CFS bandwidth controller, microseconds.
pub const CPU_PERIOD_US: u64 = 100_000;

/// Which cgroup layout the host has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hierarchy {
    /// Unified hierarchy: one directory per cgroup.
    V2,
    /// Legacy: one directory per controller (memory, cpu, cpuacct, pids).
    V1,
}

/// Creates and removes sandbox cgroups under `root/<parent>`.
#[derive(Debug, Clone)]
pub struct CgroupManager {
    root: PathBuf,
    parent: String,
    hierarchy: Hierarchy,
    /// Host block devices the I/O limits apply to (empty: no I/O limits).
    io_devices: Vec<BlockDevice>,
}

/// One sandbox's cgroup: a directory (v2) or one per controller (v1).
#[derive(Debug, Clone)]
pub struct Cgroup {
    hierarchy: Hierarchy,
    dirs: Vec<PathBuf>,
}

impl CgroupManager {
    /// Detects the hierarchy under `root` (normally `/sys/fs/cgroup`).
    pub fn detect(root: &Path, parent: &str) -> Result<Self, CgroupError> {
        let hierarchy = if v2::usable(root) {
            Hierarchy::V2
        } else if v1::usable(root) {
            Hierarchy::V1
        } else {
            return Err(CgroupError::NoHierarchy {
                root: root.to_owned(),
            });
        };
        Ok(Self {
            root: root.to_owned(),
            parent: parent.to_owned(),
            hierarchy,
            io_devices: Vec::new(),
        })
    }

    pub fn hierarchy(&self) -> &Hierarchy {
        &self.hierarchy
    }

    /// Whether this host's hierarchy has an I/O controller moat can use.
    pub fn io_controller(&self) -> bool {
        match self.hierarchy {
            Hierarchy::V2 => v2::has_io(&self.root),
            Hierarchy::V1 => v1::has_blkio(&self.root),
        }
    }

    /// Applies I/O limits to `devices` from now on (only when the host has
    /// an I/O controller).
    pub fn with_io_devices(mut self, devices: Vec<BlockDevice>) -> Self {
        if self.io_controller() {
            self.io_devices = devices;
        }
        self
    }

    pub fn io_devices(&self) -> &[BlockDevice] {
        &self.io_devices
    }

    /// Creates (or reuses an empty leftover of) the cgroup `name` and applies
    /// `limits`. `name` must be a single path component.
    pub fn create(&self, name: &str, limits: &CgroupLimits) -> Result<Cgroup, CgroupError> {
        debug_assert!(!name.contains('/') && name != ".." && name != ".");
        let dirs = match self.hierarchy {
            Hierarchy::V2 => vec![v2::create(
                &self.root,
                &self.parent,
                name,
                !self.io_devices.is_empty(),
            )?],
            Hierarchy::V1 => v1::create(&self.root, &self.parent, name)?,
        };
        let cgroup = Cgroup {
            hierarchy: self.hierarchy.clone(),
            dirs,
        };
        let applied = match self.hierarchy {
            Hierarchy::V2 => v2::apply(&cgroup.dirs[0], limits, &self.io_devices),
            Hierarchy::V1 => v1::apply(&cgroup.dirs, limits, &self.io_devices),
        };
        if let Err(e) = applied {
            let _ = cgroup.remove();
            return Err(e);
        }
        Ok(cgroup)
    }
}

impl CgroupManager {
    /// The existing cgroup `name` under the parent (a re-adopted VM's).
    pub fn existing(&self, name: &str) -> Option<Cgroup> {
        self.leftovers()
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, cg)| cg)
    }

    /// Cgroups left under the parent by an earlier broker run (by name).
    pub fn leftovers(&self) -> Vec<(String, Cgroup)> {
        let parents: Vec<PathBuf> = match self.hierarchy {
            Hierarchy::V2 => vec![self.root.join(&self.parent)],
            Hierarchy::V1 => v1::parent_dirs(&self.root, &self.parent),
        };
        let mut found: Vec<(String, Cgroup)> = Vec::new();
        for parent in parents {
            let Ok(read) = fs::read_dir(&parent) else {
                continue;
            };
            for entry in read.flatten() {
                if !entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    continue;
                }
                let name = entry.file_name().to_string_lossy().into_owned();
                match found.iter_mut().find(|(n, _)| *n == name) {
                    Some((_, cg)) => cg.dirs.push(entry.path()),
                    None => found.push((
                        name,
                        Cgroup {
                            hierarchy: self.hierarchy.clone(),
                            dirs: vec![entry.path()],
                        },
                    )),
                }
            }
        }
        found
    }
}

impl Cgroup {
    /// The `cgroup.procs` files a process must join (one per directory).
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.join("cgroup.procs")).collect()
    }

    /// The directories of this cgroup.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Pids currently in the cgroup (union over directories).
    pub fn pids(&self) -> Vec<i32> {
        let mut pids: Vec<i32> = self
            .procs_files()
            .iter()
            .filter_map(|f| fs::read_to_string(f).ok())
            .flat_map(|s| {
                s.lines()
                    .filter_map(|l| l.trim().parse().ok())
                    .collect::<Vec<i32>>()
            })
            .collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// SIGKILLs every process in the cgroup.
    pub fn kill_all(&self) {
        if self.hierarchy == Hierarchy::V2 {
            let kill = self.dirs[0].join("cgroup.kill");
            if kill.exists() && write_file(&kill, "1").is_ok() {
                return;
            }
        }
        for pid in self.pids() {
            if pid > 0 {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }

    /// Kills what is left and removes the directories, waiting briefly for
    /// dying processes to leave.
    pub fn remove(&self) -> Result<(), CgroupError> {
        for attempt in 0..50 {
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(20));
            }
            if !self.pids().is_empty() {
                self.kill_all();
                continue;
            }
            let mut busy = None;
            for dir in &self.dirs {
                match fs::remove_dir(dir) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => busy = Some(dir.clone()),
                    // A fake (test) tree holds plain files: remove them too.
                    Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) && !is_cgroupfs(dir) => {
                        fs::remove_dir_all(dir).map_err(io_err(dir))?
                    }
                    Err(e) => return Err(io_err(dir)(e)),
                }
            }
            if busy.is_none() {
                return Ok(());
            }
        }
        Err(CgroupError::Busy {
            path: self.dirs[0].clone(),
        })
    }

    /// Memory charged to the cgroup, bytes (None when unreadable).
    pub fn memory_bytes(&self) -> Option<u64> {
        let file = match self.hierarchy {
            Hierarchy::V2 => self.dirs[0].join("memory.current"),
            Hierarchy::V1 => self.dirs.first()?.join("memory.usage_in_bytes"),
        };
        fs::read_to_string(file).ok()?.trim().parse().ok()
    }

    /// CPU time used by the cgroup's processes so far, nanoseconds.
    pub fn cpu_usage_ns(&self) -> Option<u64> {
        match self.hierarchy {
            Hierarchy::V2 => {
                let stat = fs::read_to_string(self.dirs[0].join("cpu.stat")).ok()?;
                let usec: u64 = stat
                    .lines()
                    .find_map(|l| l.strip_prefix("usage_usec "))?
                    .trim()
                    .parse()
                    .ok()?;
                Some(usec * 1000)
            }
            Hierarchy::V1 => self
                .dirs
                .iter()
                .find_map(|d| fs::read_to_string(d.join("cpuacct.usage")).ok())?
                .trim()
                .parse()
                .ok(),
        }
    }
}

/// True when `dir` is on a real cgroup filesystem (whose control files
/// cannot and need not be unlinked).
fn is_cgroupfs(dir: &Path) -> bool {
    nix::sys::statfs::statfs(dir)
        .map(|s| {
            let t = s.filesystem_type();
            t == nix::sys::statfs::CGROUP_SUPER_MAGIC || t == nix::sys::statfs::CGROUP2_SUPER_MAGIC
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn touch(path: &Path, content: &str) {
        if let Some(p) = path.parent() {
            fs::create_dir_all(p).unwrap();
        }
        fs::write(path, content).unwrap();
    }

    const LIMITS: CgroupLimits = CgroupLimits {
        memory_bytes: 768 << 20,
        cpus: 2,
        pids_max: 64,
        io: DiskIo {
            read_bps: 1000,
            write_bps: 2000,
            read_iops: 0,
            write_iops: 30,
        },
    };

    const VDA: BlockDevice = BlockDevice {
        major: 254,
        minor: 0,
    };

    #[test]
    fn detects_nothing_in_an_empty_tree() {
        let t = tempfile::tempdir().unwrap();
        assert!(matches!(
            CgroupManager::detect(t.path(), "moat"),
            Err(CgroupError::NoHierarchy { .. })
        ));
    }

    #[test]
    fn v2_tree_gets_limits_and_enables_controllers() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        touch(
            &root.join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        );
        touch(&root.join("cgroup.subtree_control"), "");
        let m = CgroupManager::detect(root, "moat")
            .unwrap()
            .with_io_devices(vec![VDA]);
        assert_eq!(m.hierarchy(), &Hierarchy::V2);
        assert_eq!(m.io_devices(), &[VDA]);
        // A fake tree has no kernel to create control files: pre-create them
        // the way the kernel would once the directory exists.
        let dir = root.join("moat/sb1");
        for f in [
            "memory.max",
            "memory.swap.max",
            "cpu.max",
            "pids.max",
            "io.max",
            "cgroup.procs",
        ] {
            touch(&dir.join(f), "");
        }
        touch(&root.join("moat/cgroup.subtree_control"), "");
        let cg = m.create("sb1", &LIMITS).unwrap();
        let read = |f: &str| fs::read_to_string(dir.join(f)).unwrap();
        assert_eq!(read("memory.max"), (768u64 << 20).to_string());
        assert_eq!(read("memory.swap.max"), "0");
        assert_eq!(read("cpu.max"), "200000 100000");
        assert_eq!(read("pids.max"), "64");
        assert_eq!(
            read("io.max"),
            "254:0 rbps=1000 wbps=2000 riops=max wiops=30"
        );
        assert_eq!(
            fs::read_to_string(root.join("moat/cgroup.subtree_control")).unwrap(),
            "+cpu +memory +pids +io"
        );
        assert_eq!(cg.procs_files(), vec![dir.join("cgroup.procs")]);
        cg.remove().unwrap();
        assert!(!dir.exists());
    }

    #[test]
    fn v1_tree_gets_limits_in_each_controller() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        for c in ["memory", "cpu", "cpuacct", "pids", "blkio"] {
            fs::create_dir_all(root.join(c)).unwrap();
        }
        touch(&root.join("memory/memory.limit_in_bytes"), "");
        touch(&root.join("blkio/blkio.throttle.read_bps_device"), "");
        let m = CgroupManager::detect(root, "moat")
            .unwrap()
            .with_io_devices(vec![VDA]);
        assert_eq!(m.hierarchy(), &Hierarchy::V1);
        for (c, files) in [
            (
                "memory",
                &[
                    "memory.limit_in_bytes",
                    "memory.memsw.limit_in_bytes",
                    "memory.swappiness",
                ][..],
            ),
            ("cpu", &["cpu.cfs_period_us", "cpu.cfs_quota_us"][..]),
            ("pids", &["pids.max"][..]),
            (
                "blkio",
                &[
                    "blkio.throttle.read_bps_device",
                    "blkio.throttle.write_bps_device",
                    "blkio.throttle.write_iops_device",
                ][..],
            ),
        ] {
            for f in files {
                touch(&root.join(c).join("moat/sb1").join(f), "");
            }
        }
        let cg = m.create("sb1", &LIMITS).unwrap();
        let read = |p: &str| fs::read_to_string(root.join(p)).unwrap();
        assert_eq!(
            read("memory/moat/sb1/memory.limit_in_bytes"),
            (768u64 << 20).to_string()
        );
        assert_eq!(
            read("memory/moat/sb1/memory.memsw.limit_in_bytes"),
            (768u64 << 20).to_string()
        );
        assert_eq!(read("memory/moat/sb1/memory.swappiness"), "0");
        assert_eq!(read("cpu/moat/sb1/cpu.cfs_quota_us"), "200000");
        assert_eq!(read("cpu/moat/sb1/cpu.cfs_period_us"), "100000");
        assert_eq!(read("pids/moat/sb1/pids.max"), "64");
        assert_eq!(
            read("blkio/moat/sb1/blkio.throttle.write_bps_device"),
            "254:0 2000"
        );
        assert_eq!(
            read("blkio/moat/sb1/blkio.throttle.write_iops_device"),
            "254:0 30"
        );
        assert_eq!(cg.dirs().len(), 5);
        cg.remove().unwrap();
        assert!(!root.join("memory/moat/sb1").exists());
    }

    #[test]
    fn v1_comounted_cpu_cpuacct_is_one_directory() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        for c in ["memory", "cpu,cpuacct", "pids"] {
            fs::create_dir_all(root.join(c)).unwrap();
        }
        std::os::unix::fs::symlink("cpu,cpuacct", root.join("cpu")).unwrap();
        std::os::unix::fs::symlink("cpu,cpuacct", root.join("cpuacct")).unwrap();
        touch(&root.join("memory/memory.limit_in_bytes"), "");
        touch(&root.join("memory/moat/x/memory.limit_in_bytes"), "");
        let m = CgroupManager::detect(root, "moat").unwrap();
        let cg = m.create("x", &LIMITS).unwrap();
        assert_eq!(cg.dirs().len(), 3, "{:?}", cg.dirs());
    }

    #[test]
    fn failed_limit_removes_the_cgroup() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        touch(&root.join("cgroup.controllers"), "cpu memory pids\n");
        touch(&root.join("cgroup.subtree_control"), "");
        let m = CgroupManager::detect(root, "moat").unwrap();
        // memory.max missing: writing it creates a plain file in the fake
        // tree, so make the directory read-only to force a failure instead.
        fs::create_dir_all(root.join("moat/sb2")).unwrap();
        touch(&root.join("moat/cgroup.subtree_control"), "");
        let dir = root.join("moat/sb2");
        fs::create_dir(dir.join("memory.max")).unwrap();
        let err = m.create("sb2", &LIMITS).unwrap_err();
        assert!(err.to_string().contains("memory.max"), "{err}");
        assert!(!dir.exists());
    }
}
