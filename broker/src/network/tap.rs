//! Creates a sandbox's tap device in the host's network namespace and gives
//! it the host side of the sandbox's /30. The tap is not persistent: it
//! lives exactly as long as some process holds its fd (the VM process after
//! launch), so a crashed VM can never leave an interface behind.

use std::fs::OpenOptions;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};

use super::addressing::NicAddressing;

/// Why a tap could not be made.
#[derive(Debug, thiserror::Error)]
#[error("tap {ifname}: {step}: {source}")]
pub struct TapError {
    pub ifname: String,
    pub step: &'static str,
    pub source: std::io::Error,
}

// From <linux/if_tun.h>.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
/// Fail if the interface already exists (never attach to a tap someone
/// else made persistent).
const IFF_TUN_EXCL: libc::c_short = 0x8000u16 as libc::c_short;

fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: `ifreq` is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes().take(15)) {
        *dst = src as libc::c_char;
    }
    req
}

fn sockaddr(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size (16 bytes) and
    // sockaddr is plain data; this is the documented way to pass an IPv4
    // address through `ifreq`.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

/// Opens a new tap named `nic.ifname`, addresses it and brings it up.
/// Returns the tap's fd (close-on-exec) for the VM process.
pub fn create(nic: &NicAddressing) -> Result<OwnedFd, TapError> {
    let fail = |step: &'static str| {
        let ifname = nic.ifname.clone();
        move |source: std::io::Error| TapError {
            ifname,
            step,
            source,
        }
    };
    if nic.ifname.is_empty() || nic.ifname.len() > 15 {
        return Err(fail("name")(std::io::Error::from_raw_os_error(
            libc::EINVAL,
        )));
    }
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open("/dev/net/tun")
        .map_err(fail("open /dev/net/tun"))?;
    let mut req = ifreq(&nic.ifname);
    req.ifr_ifru.ifru_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_TUN_EXCL;
    // SAFETY: `tun` is an open /dev/net/tun fd and `req` a valid ifreq that
    // outlives the call; TUNSETIFF reads the name and flags and writes back
    // the name.
    let rc = unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, &mut req) };
    if rc < 0 {
        return Err(fail("TUNSETIFF")(std::io::Error::last_os_error()));
    }
    let tun = OwnedFd::from(tun);

    let ipv6 = std::path::Path::new("/proc/sys/net/ipv6/conf")
        .join(&nic.ifname)
        .join("disable_ipv6");
    // Absent when the host has no IPv6; nothing to disable then.
    if ipv6.exists() {
        std::fs::write(&ipv6, b"1").map_err(fail("disable IPv6"))?;
    }

    // Answer ARP only for the tap's own address: the guest learns nothing
    // about the host's other addresses.
    let arp = std::path::Path::new("/proc/sys/net/ipv4/conf")
        .join(&nic.ifname)
        .join("arp_ignore");
    std::fs::write(&arp, b"1").map_err(fail("arp_ignore"))?;

    let sock: OwnedFd = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| fail("socket")(e.into()))?;
    let set = |request: libc::c_ulong, req: &libc::ifreq, step: &'static str| {
        // SAFETY: `sock` is an open AF_INET socket and `req` a valid ifreq
        // naming our tap; the SIOCS* requests only read it.
        let rc = unsafe { libc::ioctl(sock.as_raw_fd(), request, req) };
        if rc < 0 {
            Err(fail(step)(std::io::Error::last_os_error()))
        } else {
            Ok(())
        }
    };
    let mut req = ifreq(&nic.ifname);
    req.ifr_ifru.ifru_addr = sockaddr(nic.host_addr);
    set(libc::SIOCSIFADDR, &req, "SIOCSIFADDR")?;
    let mask = u32::MAX
        .checked_shl(32 - u32::from(nic.prefix_len))
        .unwrap_or(0);
    let mut req = ifreq(&nic.ifname);
    req.ifr_ifru.ifru_netmask = sockaddr(Ipv4Addr::from(mask));
    set(libc::SIOCSIFNETMASK, &req, "SIOCSIFNETMASK")?;
    let mut req = ifreq(&nic.ifname);
    // SAFETY: as above; SIOCGIFFLAGS writes only `ifr_flags`.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) };
    if rc < 0 {
        return Err(fail("SIOCGIFFLAGS")(std::io::Error::last_os_error()));
    }
    // SAFETY: SIOCGIFFLAGS succeeded, so the union holds `ifru_flags`.
    unsafe {
        req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    }
    set(libc::SIOCSIFFLAGS, &req, "bring up")?;
    Ok(tun)
}
