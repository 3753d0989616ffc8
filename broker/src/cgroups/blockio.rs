//! The cgroup I/O limits: which host block devices hold the sandbox's disk
//! files (found through sysfs, partitions mapped to their whole disk, which
//! is where the kernel throttles), and the control-file lines for v1
//! (`blkio.throttle.*_device`) and v2 (`io.max`).

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::disk::DiskIo;

/// A block device by number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct BlockDevice {
    pub major: u32,
    pub minor: u32,
}

impl std::fmt::Display for BlockDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.major, self.minor)
    }
}

/// The whole-disk block devices holding `paths`, looked up under `sys`
/// (normally `/sys`). A path on a filesystem without a block device (tmpfs,
/// overlay, network) contributes nothing and is returned in the second list.
pub fn backing_devices<'a>(
    paths: impl IntoIterator<Item = &'a Path>,
    sys: &Path,
) -> (Vec<BlockDevice>, Vec<&'a Path>) {
    let mut devices = Vec::new();
    let mut without = Vec::new();
    for path in paths {
        let found = fs::metadata(path)
            .ok()
            .and_then(|m| whole_disk(m.dev(), sys));
        match found {
            Some(d) if !devices.contains(&d) => devices.push(d),
            Some(_) => {}
            None => without.push(path),
        }
    }
    devices.sort();
    (devices, without)
}

fn whole_disk(dev: u64, sys: &Path) -> Option<BlockDevice> {
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    if major == 0 {
        return None; // anonymous: tmpfs, overlay, btrfs subvolumes, ...
    }
    let node = sys.join(format!("dev/block/{major}:{minor}"));
    let node = fs::canonicalize(node).ok()?;
    let disk = if node.join("partition").exists() {
        node.parent()?.to_path_buf()
    } else {
        node
    };
    parse_dev(fs::read_to_string(disk.join("dev")).ok()?.trim())
}

fn parse_dev(s: &str) -> Option<BlockDevice> {
    let (major, minor) = s.split_once(':')?;
    Some(BlockDevice {
        major: major.parse().ok()?,
        minor: minor.parse().ok()?,
    })
}

/// v1: `(file, "MAJ:MIN value")` for each capped direction and device.
pub fn v1_lines(devices: &[BlockDevice], io: &DiskIo) -> Vec<(&'static str, String)> {
    let mut lines = Vec::new();
    for d in devices {
        for (file, value) in [
            ("blkio.throttle.read_bps_device", io.read_bps),
            ("blkio.throttle.write_bps_device", io.write_bps),
            ("blkio.throttle.read_iops_device", io.read_iops),
            ("blkio.throttle.write_iops_device", io.write_iops),
        ] {
            if value > 0 {
                lines.push((file, format!("{d} {value}")));
            }
        }
    }
    lines
}

/// v2: one `io.max` line per device.
pub fn v2_lines(devices: &[BlockDevice], io: &DiskIo) -> Vec<String> {
    let v = |n: u64| {
        if n == 0 {
            "max".to_string()
        } else {
            n.to_string()
        }
    };
    devices
        .iter()
        .map(|d| {
            format!(
                "{d} rbps={} wbps={} riops={} wiops={}",
                v(io.read_bps),
                v(io.write_bps),
                v(io.read_iops),
                v(io.write_iops)
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const IO: DiskIo = DiskIo {
        read_bps: 100,
        write_bps: 200,
        read_iops: 0,
        write_iops: 50,
    };

    #[test]
    fn partitions_map_to_their_disk_and_virtual_filesystems_to_nothing() {
        let t = tempfile::tempdir().unwrap();
        let sys = t.path();
        let disk = sys.join("devices/virtual/block/vda");
        fs::create_dir_all(disk.join("vda1")).unwrap();
        fs::write(disk.join("dev"), "254:0\n").unwrap();
        fs::write(disk.join("vda1/dev"), "254:1\n").unwrap();
        fs::write(disk.join("vda1/partition"), "1\n").unwrap();
        fs::create_dir_all(sys.join("dev/block")).unwrap();
        std::os::unix::fs::symlink(disk.join("vda1"), sys.join("dev/block/254:1")).unwrap();
        std::os::unix::fs::symlink(&disk, sys.join("dev/block/254:0")).unwrap();
        let whole = BlockDevice {
            major: 254,
            minor: 0,
        };
        assert_eq!(whole_disk(libc::makedev(254, 1), sys), Some(whole));
        assert_eq!(whole_disk(libc::makedev(254, 0), sys), Some(whole));
        assert_eq!(whole_disk(libc::makedev(0, 42), sys), None);
        assert_eq!(whole_disk(libc::makedev(8, 0), sys), None);
    }

    #[test]
    fn this_hosts_proc_is_not_on_a_block_device() {
        let (devices, without) = backing_devices([Path::new("/proc/self")], Path::new("/sys"));
        assert!(devices.is_empty());
        assert_eq!(without, vec![Path::new("/proc/self")]);
    }

    #[test]
    fn control_lines_name_each_device_and_skip_uncapped_directions() {
        let d = [BlockDevice { major: 8, minor: 0 }];
        assert_eq!(
            v1_lines(&d, &IO),
            vec![
                ("blkio.throttle.read_bps_device", "8:0 100".to_string()),
                ("blkio.throttle.write_bps_device", "8:0 200".to_string()),
                ("blkio.throttle.write_iops_device", "8:0 50".to_string()),
            ]
        );
        assert_eq!(
            v2_lines(&d, &IO),
            vec!["8:0 rbps=100 wbps=200 riops=max wiops=50".to_string()]
        );
        assert!(v1_lines(&d, &DiskIo::default()).is_empty());
    }
}
