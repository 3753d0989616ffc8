//! Per-VM identity and basic networking: the hostname (from `MOAT_HOSTNAME`)
//! and bringing the loopback interface up.

use std::os::fd::OwnedFd;

use moat_proto::names::validate_name;
use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};

use crate::error::{AgentError, Context, Result};

/// Sets the hostname after checking it against the wire contract's name
/// rule (1-63 of `[A-Za-z0-9_-]`, starting with a letter or digit), which is
/// also what the broker puts there.
pub fn set_hostname(name: &str) -> Result<()> {
    validate_name("MOAT_HOSTNAME", name).map_err(|e| AgentError::Config(e.to_string()))?;
    nix::unistd::sethostname(name).ctx(|| format!("sethostname {name:?}"))
}

/// Brings `lo` up (the kernel then gives it 127.0.0.1 and ::1).
pub fn loopback_up() -> Result<()> {
    let sock: OwnedFd = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .ctx(|| "socket for SIOCSIFFLAGS")?;
    crate::netconf::link_up(&sock, "lo")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_hostnames_are_refused_before_any_syscall() {
        for bad in ["", "a.b", "a b", "-lead", "é", &"a".repeat(64)] {
            let err = set_hostname(bad).expect_err(bad);
            assert!(matches!(err, AgentError::Config(_)), "{bad:?}: {err}");
            assert!(err.to_string().contains("MOAT_HOSTNAME"), "{err}");
        }
    }
}
