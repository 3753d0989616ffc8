//! Where a sandbox's NIC sits: its tap name, MAC and /30 are all derived
//! from its slot, so two running sandboxes never share any of them and
//! nothing about them comes from the caller.

use std::net::Ipv4Addr;

use super::firewall::Ipv4Net;

/// One sandbox's link: the host side and the guest side of a /30.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicAddressing {
    /// Host tap device: `<prefix><slot>`.
    pub ifname: String,
    /// The guest NIC's MAC (QEMU's locally administered prefix).
    pub mac: String,
    pub host_addr: Ipv4Addr,
    pub guest_addr: Ipv4Addr,
    /// Always 30.
    pub prefix_len: u8,
}

/// Addresses each /30 holds.
const BLOCK: u32 = 4;

/// How many sandboxes `subnet` has room for.
pub fn capacity(subnet: &Ipv4Net) -> u64 {
    (1u64 << (32 - u32::from(subnet.prefix))) / u64::from(BLOCK)
}

/// The link of slot `slot`, or `None` when the subnet has no room for it.
pub fn for_slot(subnet: &Ipv4Net, iface_prefix: &str, slot: u32) -> Option<NicAddressing> {
    if u64::from(slot) >= capacity(subnet) {
        return None;
    }
    let base = u32::from(subnet.addr).checked_add(slot.checked_mul(BLOCK)?)?;
    Some(NicAddressing {
        ifname: format!("{iface_prefix}{slot}"),
        mac: format!("52:54:00:6d:{:02x}:{:02x}", (slot >> 8) & 0xff, slot & 0xff),
        host_addr: Ipv4Addr::from(base + 1),
        guest_addr: Ipv4Addr::from(base + 2),
        prefix_len: 30,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_get_disjoint_blocks() {
        let net: Ipv4Net = "10.213.0.0/16".parse().unwrap();
        assert_eq!(capacity(&net), 16384);
        let a = for_slot(&net, "mtap", 0).unwrap();
        assert_eq!(a.ifname, "mtap0");
        assert_eq!(a.host_addr, Ipv4Addr::new(10, 213, 0, 1));
        assert_eq!(a.guest_addr, Ipv4Addr::new(10, 213, 0, 2));
        let b = for_slot(&net, "mtap", 300).unwrap();
        assert_eq!(b.host_addr, Ipv4Addr::new(10, 213, 4, 177));
        assert_eq!(b.mac, "52:54:00:6d:01:2c");
        assert!(for_slot(&net, "mtap", 16384).is_none());
        let small: Ipv4Net = "172.31.5.0/24".parse().unwrap();
        assert_eq!(
            for_slot(&small, "t", 63).unwrap().guest_addr,
            Ipv4Addr::new(172, 31, 5, 254)
        );
        assert!(for_slot(&small, "t", 64).is_none());
    }
}
