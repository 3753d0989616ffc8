//! Where the files a VM needs appear to the VM process: inside the jail they
//! sit at fixed paths (`/boot/...`, `/disk/image`, `/vm/...`); unjailed they
//! keep their host paths. The broker itself always uses host paths.

use std::path::{Path, PathBuf};

/// The VM's writable disk, in its VM directory.
pub const WRITABLE_DISK: &str = "rw.ext4";
/// The agent channel's socket the VMM serves, in its VM directory.
pub const AGENT_SOCKET: &str = "agent.sock";
/// The serial console's socket the VMM serves, in its VM directory.
pub const CONSOLE_SOCKET: &str = "console.sock";

/// One file or directory: its host path and its path inside the jail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    pub host: PathBuf,
    pub inside: PathBuf,
    pub writable: bool,
}

/// The VM's files as the VM process sees them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailLayout {
    pub kernel: Placed,
    pub initramfs: Placed,
    pub image: Placed,
    /// The per-VM directory (writable disk, agent socket).
    pub vm_dir: Placed,
}

fn placed(host: PathBuf, inside: &str, writable: bool, jailed: bool) -> Placed {
    Placed {
        inside: if jailed {
            PathBuf::from(inside)
        } else {
            host.clone()
        },
        host,
        writable,
    }
}

impl JailLayout {
    pub fn jailed(kernel: PathBuf, initramfs: PathBuf, image: PathBuf, vm_dir: PathBuf) -> Self {
        Self::new(kernel, initramfs, image, vm_dir, true)
    }

    pub fn unjailed(kernel: PathBuf, initramfs: PathBuf, image: PathBuf, vm_dir: PathBuf) -> Self {
        Self::new(kernel, initramfs, image, vm_dir, false)
    }

    fn new(
        kernel: PathBuf,
        initramfs: PathBuf,
        image: PathBuf,
        vm_dir: PathBuf,
        jailed: bool,
    ) -> Self {
        Self {
            kernel: placed(kernel, "/boot/vmlinux", false, jailed),
            initramfs: placed(initramfs, "/boot/initramfs.cpio", false, jailed),
            image: placed(image, "/disk/image", false, jailed),
            vm_dir: placed(vm_dir, "/vm", true, jailed),
        }
    }

    /// A file inside the VM directory, as the VM process sees it.
    pub fn in_vm_dir(&self, name: &str) -> PathBuf {
        self.vm_dir.inside.join(name)
    }

    /// Everything to bind into the jail.
    pub fn binds(&self) -> [&Placed; 4] {
        [&self.kernel, &self.initramfs, &self.image, &self.vm_dir]
    }

    /// The host path of a file inside the VM directory.
    pub fn host_vm_file(&self, name: &str) -> PathBuf {
        Path::new(&self.vm_dir.host).join(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jailed_paths_are_fixed_and_unjailed_paths_are_the_host_ones() {
        let j = JailLayout::jailed(
            "/k/v".into(),
            "/k/i".into(),
            "/i/b".into(),
            "/s/vms/3".into(),
        );
        assert_eq!(j.in_vm_dir("agent.sock"), PathBuf::from("/vm/agent.sock"));
        assert_eq!(
            j.host_vm_file("agent.sock"),
            PathBuf::from("/s/vms/3/agent.sock")
        );
        assert_eq!(j.image.inside, PathBuf::from("/disk/image"));
        let u = JailLayout::unjailed(
            "/k/v".into(),
            "/k/i".into(),
            "/i/b".into(),
            "/s/vms/3".into(),
        );
        assert_eq!(
            u.in_vm_dir("agent.sock"),
            PathBuf::from("/s/vms/3/agent.sock")
        );
        assert_eq!(u.kernel.inside, PathBuf::from("/k/v"));
    }
}
