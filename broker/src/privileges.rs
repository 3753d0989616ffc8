//! The broker's own capabilities. Right after start-up it keeps only the ones
//! listed in [`KEPT`] — in its effective, permitted and bounding sets, so
//! nothing it (or a program it runs) does later can get the others back —
//! and clears its inheritable and ambient sets. `moat-jailer`, which the
//! broker execs as root, inherits exactly this set and drops all of it before
//! the VMM runs.

use caps::{CapSet, Capability, CapsHashSet};

/// Each capability the broker keeps, and why.
pub const KEPT: [(Capability, &str); 11] = [
    (
        Capability::CAP_SYS_ADMIN,
        "moat-jailer: unshare namespaces, mount the jail root, pivot_root",
    ),
    (
        Capability::CAP_SETUID,
        "moat-jailer: run each VM process as its sandbox's own uid",
    ),
    (
        Capability::CAP_SETGID,
        "moat-jailer: its gid and (empty) groups",
    ),
    (
        Capability::CAP_SETPCAP,
        "moat-jailer: empty the VM process's capability bounding set",
    ),
    (
        Capability::CAP_MKNOD,
        "moat-jailer: null/zero/random/urandom (and kvm) nodes in the jail's /dev",
    ),
    (
        Capability::CAP_CHOWN,
        "give each VM's directory and disk to its uid, the socket to the gateway's group",
    ),
    (
        Capability::CAP_DAC_OVERRIDE,
        "reach into VM directories owned by sandbox uids (bind mounts, clean-up)",
    ),
    (
        Capability::CAP_FOWNER,
        "remove and re-mode files owned by sandbox uids",
    ),
    (
        Capability::CAP_KILL,
        "stop VM processes that run under sandbox uids",
    ),
    (
        Capability::CAP_NET_ADMIN,
        "guest networking: create and address tap devices, install the nftables rules (nft inherits it)",
    ),
    (
        Capability::CAP_NET_BIND_SERVICE,
        "each sandbox's DNS responder on port 53 of its tap address",
    ),
];

/// Errors restricting the broker's capabilities.
#[derive(Debug, thiserror::Error)]
#[error("cannot restrict the broker's capabilities ({step}): {source}")]
pub struct PrivilegeError {
    step: &'static str,
    source: caps::errors::CapsError,
}

fn step(step: &'static str) -> impl FnOnce(caps::errors::CapsError) -> PrivilegeError {
    move |source| PrivilegeError { step, source }
}

/// Drops every capability not in [`KEPT`], for good.
pub fn restrict() -> Result<(), PrivilegeError> {
    let keep: CapsHashSet = KEPT.iter().map(|(c, _)| *c).collect();
    for cap in caps::all() {
        if !keep.contains(&cap)
            && caps::has_cap(None, CapSet::Bounding, cap).map_err(step("read bounding"))?
        {
            caps::drop(None, CapSet::Bounding, cap).map_err(step("bounding set"))?;
        }
    }
    caps::set(None, CapSet::Inheritable, &CapsHashSet::new()).map_err(step("inheritable set"))?;
    caps::clear(None, CapSet::Ambient).map_err(step("ambient set"))?;
    caps::set(None, CapSet::Effective, &keep).map_err(step("effective set"))?;
    caps::set(None, CapSet::Permitted, &keep).map_err(step("permitted set"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_systemd_unit_bounds_the_broker_to_exactly_these() {
        let unit = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../packaging/systemd/moat-broker.service"),
        )
        .unwrap();
        let line = unit
            .lines()
            .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
            .expect("CapabilityBoundingSet in the unit");
        let mut in_unit: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
        let mut kept: Vec<String> = KEPT.iter().map(|(c, _)| c.to_string()).collect();
        in_unit.sort();
        kept.sort();
        assert_eq!(in_unit, kept);
    }

    #[test]
    fn every_kept_capability_is_explained_once() {
        let set: CapsHashSet = KEPT.iter().map(|(c, _)| *c).collect();
        assert_eq!(set.len(), KEPT.len());
        assert!(KEPT.iter().all(|(_, why)| why.len() > 10));
        assert!(!set.contains(&Capability::CAP_SYS_MODULE));
        assert!(!set.contains(&Capability::CAP_SYS_PTRACE));
        assert!(!set.contains(&Capability::CAP_NET_RAW));
        assert!(!set.contains(&Capability::CAP_SYS_RAWIO));
    }
}
