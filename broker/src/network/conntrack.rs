//! Forgets the kernel's connection-tracking entries of a guest address.
//! Slots (and so tap names and addresses) are reused; without this, flows
//! an earlier sandbox opened would stay "established" and carry the next
//! sandbox of that slot past its own scope. Run before a NIC is given out
//! and after its VM is gone, with the `conntrack` tool (conntrack-tools).

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};

/// Why the entries could not be deleted.
#[derive(Debug, thiserror::Error)]
pub enum ConntrackError {
    #[error("cannot run {path}: {source}")]
    Spawn {
        path: String,
        source: std::io::Error,
    },
    #[error("conntrack -D for {addr} failed: {stderr}")]
    Failed { addr: Ipv4Addr, stderr: String },
}

/// Deletes every entry whose original source or destination is `addr`.
pub fn forget(conntrack: &Path, addr: Ipv4Addr) -> Result<(), ConntrackError> {
    for direction in ["--orig-src", "--orig-dst"] {
        let out = Command::new(conntrack)
            .args(["-D", "-f", "ipv4", direction, &addr.to_string()])
            .env_clear()
            .stdin(Stdio::null())
            .output()
            .map_err(|source| ConntrackError::Spawn {
                path: conntrack.display().to_string(),
                source,
            })?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        // Exit status 1 with this message means "nothing to delete".
        if !out.status.success() && !stderr.contains("flow entries have been deleted") {
            return Err(ConntrackError::Failed {
                addr,
                stderr: stderr.trim().to_owned(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_tool_is_an_error_naming_it() {
        let e = forget(
            Path::new("/nonexistent/conntrack"),
            Ipv4Addr::new(10, 0, 0, 2),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("/nonexistent/conntrack"), "{e}");
    }

    /// In a private network namespace (root only): a UDP flow's entry is
    /// there, and gone after `forget`.
    #[test]
    fn entries_of_an_address_are_deleted() {
        let tool = Path::new("/usr/sbin/conntrack");
        if !nix::unistd::geteuid().is_root() || !tool.exists() {
            eprintln!("skipped: needs root and conntrack");
            return;
        }
        std::thread::spawn(move || {
            if nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).is_err() {
                eprintln!("skipped: no network namespaces");
                return;
            }
            let up = Command::new("ip").args(["link", "set", "lo", "up"]).status();
            assert!(up.is_ok_and(|s| s.success()));
            // A conntrack-tracked flow needs a rule that looks at state.
            let nft = Command::new("/usr/sbin/nft")
                .args(["add table inet t; add chain inet t c { type filter hook output priority 0; ct state new accept; }"])
                .status();
            if !nft.is_ok_and(|s| s.success()) {
                eprintln!("skipped: no nft");
                return;
            }
            let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            sock.send_to(b"x", "127.0.0.2:9").unwrap();
            let list = || {
                let out = Command::new(tool)
                    .args(["-L", "-f", "ipv4", "--orig-dst", "127.0.0.2"])
                    .output()
                    .unwrap();
                String::from_utf8_lossy(&out.stdout).into_owned()
            };
            assert!(list().contains("dport=9"), "flow tracked: {}", list());
            forget(tool, Ipv4Addr::new(127, 0, 0, 2)).unwrap();
            assert!(!list().contains("dport=9"), "flow forgotten: {}", list());
            forget(tool, Ipv4Addr::new(127, 0, 0, 2)).unwrap();
        })
        .join()
        .unwrap();
    }
}
