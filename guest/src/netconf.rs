//! The sandbox's NIC (`Setup.network`): checks the static IPv4
//! configuration the host sends, finds the interface by its MAC in sysfs,
//! gives it its address and netmask, brings it up and adds the default
//! route (ioctls on an `AF_INET` datagram socket, as [`crate::host`] does
//! for `lo`), then writes `/etc/resolv.conf` and `/etc/hosts`. The sysfs
//! and `/etc` directories are parameters of the inner functions so tests
//! can use a temporary tree; the text of both files is rendered by pure
//! functions.

use std::ffi::CString;
use std::fs::{self, DirBuilder, OpenOptions, Permissions};
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use moat_proto::agent::Network;
use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};

use crate::error::{AgentError, Context, Result};
use crate::log::log;

/// Where the kernel lists network interfaces.
pub const SYS_NET: &str = "/sys/class/net";
/// Where resolv.conf and hosts are written.
pub const ETC: &str = "/etc";
/// How long to wait for the NIC to show up in sysfs (virtio-net is probed
/// before init runs, so this is only slack).
pub const NIC_WAIT: Duration = Duration::from_secs(2);
const POLL_INTERVAL: Duration = Duration::from_millis(10);
/// Most nameservers accepted (resolvers use the first three).
pub const MAX_NAMESERVERS: usize = 16;
/// Resolver options written after the nameservers.
pub const RESOLV_OPTIONS: &str = "options timeout:2 attempts:2";

/// A checked `Network` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Lowercase, `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    pub address: Ipv4Addr,
    /// 1..=32.
    pub prefix_len: u32,
    pub gateway: Option<Ipv4Addr>,
    pub nameservers: Vec<Ipv4Addr>,
}

impl Config {
    /// The netmask of [`Config::prefix_len`].
    pub fn netmask(&self) -> Ipv4Addr {
        netmask(self.prefix_len).unwrap_or(Ipv4Addr::BROADCAST)
    }
}

fn bad(msg: impl std::fmt::Display) -> AgentError {
    AgentError::BadRequest(format!("setup: network: {msg}"))
}

/// The netmask of a prefix length in 1..=32, `None` outside it.
pub fn netmask(prefix_len: u32) -> Option<Ipv4Addr> {
    if !(1..=32).contains(&prefix_len) {
        return None;
    }
    Some(Ipv4Addr::from(u32::MAX << (32 - prefix_len)))
}

/// `mac` in lowercase if it is six colon-separated pairs of hex digits.
pub fn normalise_mac(mac: &str) -> Option<String> {
    let parts: Vec<&str> = mac.split(':').collect();
    let ok = parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()));
    ok.then(|| mac.to_ascii_lowercase())
}

/// Parses one address field; `what` names it in the error.
fn parse_addr(what: &str, text: &str) -> Result<Ipv4Addr> {
    let addr: Ipv4Addr = text
        .parse()
        .map_err(|_| bad(format!("{what} {text:?} is not an IPv4 address")))?;
    if addr.is_unspecified() || addr.is_multicast() || addr.is_broadcast() {
        return Err(bad(format!(
            "{what} {addr} is not a unicast address (0.0.0.0, multicast or broadcast)"
        )));
    }
    Ok(addr)
}

/// Whether `addr` is the network or broadcast address of its subnet (only
/// meaningful up to /30; /31 and /32 have neither).
fn is_subnet_edge(addr: Ipv4Addr, prefix_len: u32, mask: Ipv4Addr) -> bool {
    let (a, m) = (u32::from(addr), u32::from(mask));
    prefix_len <= 30 && (a & !m == 0 || a & !m == !m)
}

/// Checks a `Network` request: a valid MAC, unicast addresses, a prefix of
/// 1..=32, a gateway inside the subnet other than the address itself, and
/// at most [`MAX_NAMESERVERS`] nameservers.
pub fn parse(net: &Network) -> Result<Config> {
    let mac = normalise_mac(&net.mac).ok_or_else(|| {
        bad(format!(
            "MAC {:?} is not six colon-separated hex pairs",
            net.mac
        ))
    })?;
    let address = parse_addr("address", &net.address)?;
    if address.is_loopback() {
        return Err(bad(format!("address {address} is a loopback address")));
    }
    let mask = netmask(net.prefix_len)
        .ok_or_else(|| bad(format!("prefix length {} is not in 1..=32", net.prefix_len)))?;
    let prefix_len = net.prefix_len;
    if is_subnet_edge(address, prefix_len, mask) {
        return Err(bad(format!(
            "address {address} is the network or broadcast address of its /{prefix_len}"
        )));
    }
    let gateway = if net.gateway.is_empty() {
        None
    } else {
        let gw = parse_addr("gateway", &net.gateway)?;
        let m = u32::from(mask);
        if gw == address {
            return Err(bad(format!("gateway {gw} is the sandbox's own address")));
        }
        if u32::from(gw) & m != u32::from(address) & m || is_subnet_edge(gw, prefix_len, mask) {
            return Err(bad(format!(
                "gateway {gw} is not a host of {address}/{prefix_len}"
            )));
        }
        Some(gw)
    };
    if net.nameservers.len() > MAX_NAMESERVERS {
        return Err(bad(format!(
            "{} nameservers (limit {MAX_NAMESERVERS})",
            net.nameservers.len()
        )));
    }
    let nameservers = net
        .nameservers
        .iter()
        .map(|n| parse_addr("nameserver", n))
        .collect::<Result<Vec<_>>>()?;
    Ok(Config {
        mac,
        address,
        prefix_len,
        gateway,
        nameservers,
    })
}

/// Text of /etc/resolv.conf: one `nameserver` line each, then
/// [`RESOLV_OPTIONS`]; with no nameservers, only a comment.
pub fn resolv_conf(nameservers: &[Ipv4Addr]) -> String {
    if nameservers.is_empty() {
        return "# This sandbox has no DNS resolver (moat configured no nameservers).\n".into();
    }
    let mut text: String = nameservers
        .iter()
        .map(|n| format!("nameserver {n}\n"))
        .collect();
    text.push_str(RESOLV_OPTIONS);
    text.push('\n');
    text
}

/// Whether `name` can go into /etc/hosts as a hostname.
fn hosts_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Text of /etc/hosts: localhost for IPv4 and IPv6, then `address hostname`
/// (left out when the hostname is empty or not a plain name).
pub fn hosts(address: Ipv4Addr, hostname: &str) -> String {
    let mut text = String::from("127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n");
    if hosts_name_ok(hostname) {
        text.push_str(&format!("{address} {hostname}\n"));
    }
    text
}

/// Reads a sysfs attribute, trimmed; `None` when it cannot be read.
fn read_attr(path: &Path) -> Option<String> {
    fs::read_to_string(path).ok().map(|s| s.trim().to_owned())
}

/// The interface under `sys_net` (e.g. `/sys/class/net`) whose `address`
/// is `mac` (compared case-insensitively). Two matches are a configuration
/// error.
pub fn find_interface(sys_net: &Path, mac: &str) -> Result<Option<String>> {
    let mut found: Option<String> = None;
    for name in crate::discover::entries(sys_net)? {
        let Some(addr) = read_attr(&sys_net.join(&name).join("address")) else {
            continue;
        };
        if !addr.eq_ignore_ascii_case(mac) {
            continue;
        }
        if let Some(first) = &found {
            return Err(AgentError::Config(format!(
                "setup: network: interfaces {first} and {name} both have MAC {mac}"
            )));
        }
        found = Some(name);
    }
    Ok(found)
}

/// [`find_interface`], waiting up to `wait` for the interface to appear.
fn wait_interface(sys_net: &Path, mac: &str, wait: Duration) -> Result<String> {
    let deadline = Instant::now() + wait;
    loop {
        if let Some(name) = find_interface(sys_net, mac)? {
            return Ok(name);
        }
        if Instant::now() >= deadline {
            let seen = crate::discover::entries(sys_net)?.join(", ");
            return Err(AgentError::Missing(format!(
                "setup: network: no interface with MAC {mac} in {} (found: {seen})",
                sys_net.display()
            )));
        }
        thread::sleep(POLL_INTERVAL);
    }
}

/// Writes `dir/name` atomically: a temporary file in `dir` (removed first
/// if left over, then created exclusively, so a symlink there is never
/// followed), mode 0644, renamed over `name` (which replaces a symlink
/// rather than writing through it).
fn write_atomic(dir: &Path, name: &str, content: &str) -> Result<()> {
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}~moat-tmp"));
    let what = || format!("write {}", path.display());
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).ctx(what),
    }
    let written = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)?;
        file.write_all(content.as_bytes())?;
        // The mode given to open() is filtered by the umask.
        file.set_permissions(Permissions::from_mode(0o644))?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, &path)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written.ctx(what)
}

/// Writes `etc/resolv.conf` and `etc/hosts` for `cfg` (creating `etc`
/// with mode 0755 if the image has none).
pub fn write_etc(etc: &Path, cfg: &Config, hostname: &str) -> Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(etc)
        .ctx(|| format!("create {}", etc.display()))?;
    write_atomic(etc, "resolv.conf", &resolv_conf(&cfg.nameservers))?;
    write_atomic(etc, "hosts", &hosts(cfg.address, hostname))
}

/// A `sockaddr` holding the `sockaddr_in` of `addr` (port 0).
fn sockaddr(addr: Ipv4Addr) -> libc::sockaddr {
    // sockaddr_in after the family: port (2 bytes), address (4 bytes, the
    // octets in network order), zero padding.
    let mut sa_data = [0 as libc::c_char; 14];
    for (dst, src) in sa_data[2..6].iter_mut().zip(addr.octets()) {
        *dst = src as libc::c_char;
    }
    libc::sockaddr {
        sa_family: libc::AF_INET as libc::sa_family_t,
        sa_data,
    }
}

/// An all-zero `ifreq` naming `ifname`.
fn ifreq(ifname: &str) -> Result<libc::ifreq> {
    let bytes = ifname.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(AgentError::Config(format!(
            "setup: network: bad interface name {ifname:?}"
        )));
    }
    // SAFETY: `ifreq` is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    Ok(req)
}

/// Sets an address-type field of `ifname` with `request` (SIOCSIFADDR,
/// SIOCSIFNETMASK).
fn set_addr(
    sock: &OwnedFd,
    ifname: &str,
    request: libc::c_ulong,
    name: &str,
    addr: Ipv4Addr,
) -> Result<()> {
    let mut req = ifreq(ifname)?;
    // SIOCSIFNETMASK reads `ifru_netmask`, which shares the storage.
    req.ifr_ifru.ifru_addr = sockaddr(addr);
    // SAFETY: `sock` is an open socket and `req` a valid, NUL-terminated
    // `ifreq` that outlives the call; these requests only read `req`.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), request as _, &req) };
    nix::errno::Errno::result(rc).ctx(|| format!("setup: network: {name} {ifname} {addr}"))?;
    Ok(())
}

/// Brings `ifname` up (SIOCGIFFLAGS, then SIOCSIFFLAGS with IFF_UP and
/// IFF_RUNNING added).
pub(crate) fn link_up(sock: &OwnedFd, ifname: &str) -> Result<()> {
    let mut req = ifreq(ifname)?;
    // SAFETY: `sock` is an open socket and `req` a valid, NUL-terminated
    // `ifreq` that outlives the call; SIOCGIFFLAGS only writes `ifr_flags`.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) };
    nix::errno::Errno::result(rc).ctx(|| format!("SIOCGIFFLAGS {ifname}"))?;
    // SAFETY: SIOCGIFFLAGS succeeded, so the union holds `ifru_flags`.
    unsafe {
        req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    }
    // SAFETY: as above; SIOCSIFFLAGS only reads `req`.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) };
    nix::errno::Errno::result(rc).ctx(|| format!("SIOCSIFFLAGS {ifname} up"))?;
    Ok(())
}

/// Adds the default route (0.0.0.0/0) via `gateway` on `ifname`.
fn default_route(sock: &OwnedFd, ifname: &str, gateway: Ipv4Addr) -> Result<()> {
    let what = || format!("setup: network: SIOCADDRT default via {gateway} dev {ifname}");
    let dev = CString::new(ifname)
        .map_err(|_| AgentError::Config(format!("{}: NUL in the name", what())))?;
    // SAFETY: `rtentry` is plain old data (integers, sockaddrs and a
    // pointer, for which null is valid); all-zero is a valid value.
    let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
    rt.rt_dst = sockaddr(Ipv4Addr::UNSPECIFIED);
    rt.rt_genmask = sockaddr(Ipv4Addr::UNSPECIFIED);
    rt.rt_gateway = sockaddr(gateway);
    rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    // The kernel only reads the name (strncpy_from_user).
    rt.rt_dev = dev.as_ptr().cast_mut();
    // SAFETY: `sock` is an open socket, `rt` a valid `rtentry` whose
    // `rt_dev` points to `dev`, a NUL-terminated string alive until the
    // end of this function; SIOCADDRT only reads them.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCADDRT, &rt) };
    nix::errno::Errno::result(rc).ctx(what)?;
    Ok(())
}

/// Configures the NIC `ifname` for `cfg`: address, netmask, up, default
/// route.
fn configure_link(ifname: &str, cfg: &Config) -> Result<()> {
    let sock: OwnedFd = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .ctx(|| "setup: network: socket for the interface ioctls")?;
    set_addr(&sock, ifname, libc::SIOCSIFADDR, "SIOCSIFADDR", cfg.address)?;
    set_addr(
        &sock,
        ifname,
        libc::SIOCSIFNETMASK,
        "SIOCSIFNETMASK",
        cfg.netmask(),
    )?;
    link_up(&sock, ifname)?;
    if let Some(gw) = cfg.gateway {
        default_route(&sock, ifname, gw)?;
    }
    Ok(())
}

/// Configures the sandbox's NIC in the VM: finds it in [`SYS_NET`], sets it
/// up, then writes resolv.conf and hosts in [`ETC`].
pub fn apply(cfg: &Config) -> Result<()> {
    let ifname = wait_interface(Path::new(SYS_NET), &cfg.mac, NIC_WAIT)?;
    configure_link(&ifname, cfg)?;
    let hostname = nix::unistd::gethostname().ctx(|| "setup: network: gethostname")?;
    let hostname = hostname.to_str().unwrap_or_default();
    write_etc(Path::new(ETC), cfg, hostname)?;
    log!(
        "configured {ifname} ({}): {}/{}{}, {} nameserver(s)",
        cfg.mac,
        cfg.address,
        cfg.prefix_len,
        cfg.gateway.map(|g| format!(" via {g}")).unwrap_or_default(),
        cfg.nameservers.len()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn net() -> Network {
        Network {
            mac: "52:54:00:6D:00:03".into(),
            address: "10.213.0.2".into(),
            prefix_len: 30,
            gateway: "10.213.0.1".into(),
            nameservers: vec!["10.213.0.1".into(), "1.1.1.1".into()],
        }
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().expect("ip")
    }

    #[test]
    fn netmasks_follow_the_prefix() {
        assert_eq!(netmask(0), None);
        assert_eq!(netmask(33), None);
        assert_eq!(netmask(1), Some(ip("128.0.0.0")));
        assert_eq!(netmask(8), Some(ip("255.0.0.0")));
        assert_eq!(netmask(20), Some(ip("255.255.240.0")));
        assert_eq!(netmask(30), Some(ip("255.255.255.252")));
        assert_eq!(netmask(32), Some(ip("255.255.255.255")));
    }

    #[test]
    fn a_good_request_parses() {
        let cfg = parse(&net()).expect("parse");
        assert_eq!(
            cfg,
            Config {
                mac: "52:54:00:6d:00:03".into(),
                address: ip("10.213.0.2"),
                prefix_len: 30,
                gateway: Some(ip("10.213.0.1")),
                nameservers: vec![ip("10.213.0.1"), ip("1.1.1.1")],
            }
        );
        assert_eq!(cfg.netmask(), ip("255.255.255.252"));
        let mut n = net();
        n.gateway.clear();
        n.nameservers.clear();
        let cfg = parse(&n).expect("parse");
        assert_eq!((cfg.gateway, cfg.nameservers.len()), (None, 0));
        // Point-to-point and host routes have no network/broadcast address.
        for (addr, prefix, gw) in [("10.0.0.0", 31, "10.0.0.1"), ("10.0.0.7", 32, "")] {
            let n = Network {
                address: addr.into(),
                prefix_len: prefix,
                gateway: gw.into(),
                ..net()
            };
            parse(&n).expect(addr);
        }
    }

    #[test]
    fn bad_requests_are_refused_with_a_reason() {
        let cases: Vec<(Network, &str)> = vec![
            (
                Network {
                    mac: "52:54:00:6d:00".into(),
                    ..net()
                },
                "MAC",
            ),
            (
                Network {
                    mac: "52-54-00-6d-00-03".into(),
                    ..net()
                },
                "MAC",
            ),
            (
                Network {
                    mac: "52:54:00:6d:00:0g".into(),
                    ..net()
                },
                "MAC",
            ),
            (
                Network {
                    address: "10.213.0".into(),
                    ..net()
                },
                "not an IPv4",
            ),
            (
                Network {
                    address: " 10.213.0.2".into(),
                    ..net()
                },
                "not an IPv4",
            ),
            (
                Network {
                    address: "::1".into(),
                    ..net()
                },
                "not an IPv4",
            ),
            (
                Network {
                    address: "0.0.0.0".into(),
                    ..net()
                },
                "unicast",
            ),
            (
                Network {
                    address: "224.0.0.1".into(),
                    ..net()
                },
                "unicast",
            ),
            (
                Network {
                    address: "127.0.0.2".into(),
                    ..net()
                },
                "loopback",
            ),
            (
                Network {
                    address: "10.213.0.3".into(),
                    ..net()
                },
                "broadcast address",
            ),
            (
                Network {
                    address: "10.213.0.0".into(),
                    ..net()
                },
                "network or",
            ),
            (
                Network {
                    prefix_len: 0,
                    ..net()
                },
                "1..=32",
            ),
            (
                Network {
                    prefix_len: 33,
                    ..net()
                },
                "1..=32",
            ),
            (
                Network {
                    gateway: "10.213.0.5".into(),
                    ..net()
                },
                "not a host of",
            ),
            (
                Network {
                    gateway: "10.213.0.3".into(),
                    ..net()
                },
                "not a host of",
            ),
            (
                Network {
                    gateway: "10.213.0.2".into(),
                    ..net()
                },
                "own address",
            ),
            (
                Network {
                    gateway: "gw".into(),
                    ..net()
                },
                "gateway \"gw\"",
            ),
            (
                Network {
                    nameservers: vec!["1.1.1.1".into(), "dns".into()],
                    ..net()
                },
                "nameserver \"dns\"",
            ),
            (
                Network {
                    nameservers: vec!["1.1.1.1".into(); 17],
                    ..net()
                },
                "17 nameservers",
            ),
        ];
        for (n, needle) in cases {
            let err = parse(&n).expect_err(needle);
            assert!(matches!(err, AgentError::BadRequest(_)), "{err}");
            let text = err.to_string();
            assert!(text.starts_with("setup: network: "), "{text}");
            assert!(text.contains(needle), "{needle:?} not in {text:?}");
        }
    }

    #[test]
    fn resolv_conf_lists_the_nameservers() {
        assert_eq!(
            resolv_conf(&[ip("10.213.0.1"), ip("1.1.1.1")]),
            "nameserver 10.213.0.1\nnameserver 1.1.1.1\noptions timeout:2 attempts:2\n"
        );
        let none = resolv_conf(&[]);
        assert!(none.starts_with('#'), "{none}");
        assert!(none.contains("no DNS resolver"), "{none}");
        assert_eq!(none.lines().count(), 1);
    }

    #[test]
    fn hosts_names_localhost_and_the_sandbox() {
        assert_eq!(
            hosts(ip("10.213.0.2"), "box-1"),
            "127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n\
             10.213.0.2 box-1\n"
        );
        for odd in ["", "a b", "a\nb", "a#b"] {
            assert_eq!(
                hosts(ip("10.213.0.2"), odd),
                "127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n",
                "{odd:?}"
            );
        }
    }

    #[test]
    fn the_interface_is_found_by_its_mac() {
        let sys = tempfile::tempdir().expect("tempdir");
        let add = |name: &str, mac: Option<&str>| {
            let dir = sys.path().join(name);
            fs::create_dir_all(&dir).expect("mkdir");
            if let Some(mac) = mac {
                fs::write(dir.join("address"), format!("{mac}\n")).expect("write");
            }
        };
        assert_eq!(
            find_interface(sys.path(), "52:54:00:6d:00:03").expect("find"),
            None
        );
        add("lo", Some("00:00:00:00:00:00"));
        add("bonding_masters", None);
        add("eth0", Some("52:54:00:6d:00:03"));
        add("eth1", Some("52:54:00:6d:00:04"));
        assert_eq!(
            find_interface(sys.path(), "52:54:00:6D:00:03").expect("find"),
            Some("eth0".into())
        );
        assert_eq!(
            find_interface(sys.path(), "52:54:00:6d:00:04").expect("find"),
            Some("eth1".into())
        );
        assert_eq!(
            find_interface(sys.path(), "52:54:00:6d:00:05").expect("find"),
            None
        );
        let err =
            wait_interface(sys.path(), "52:54:00:6d:00:05", Duration::ZERO).expect_err("missing");
        assert!(
            err.to_string()
                .contains("found: bonding_masters, eth0, eth1, lo"),
            "{err}"
        );
        add("eth2", Some("52:54:00:6D:00:03"));
        let err = find_interface(sys.path(), "52:54:00:6d:00:03").expect_err("two");
        assert!(err.to_string().contains("eth0 and eth2"), "{err}");
        // A missing sysfs directory holds no interface.
        assert_eq!(
            find_interface(&sys.path().join("nope"), "52:54:00:6d:00:03").expect("find"),
            None
        );
    }

    #[test]
    fn etc_files_are_written_as_regular_0644_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let etc = dir.path().join("etc");
        fs::create_dir(&etc).expect("mkdir");
        let elsewhere = dir.path().join("stub-resolv.conf");
        fs::write(&elsewhere, "nameserver 127.0.0.53\n").expect("write");
        symlink(&elsewhere, etc.join("resolv.conf")).expect("symlink");
        // A leftover temporary symlink is not followed either.
        symlink(&elsewhere, etc.join(".hosts~moat-tmp")).expect("symlink");
        let cfg = parse(&net()).expect("parse");
        write_etc(&etc, &cfg, "sbx").expect("write");
        for name in ["resolv.conf", "hosts"] {
            let meta = fs::symlink_metadata(etc.join(name)).expect("stat");
            assert!(meta.file_type().is_file(), "{name}");
            assert_eq!(meta.permissions().mode() & 0o7777, 0o644, "{name}");
        }
        assert_eq!(
            fs::read_to_string(etc.join("resolv.conf")).expect("read"),
            resolv_conf(&cfg.nameservers)
        );
        assert_eq!(
            fs::read_to_string(etc.join("hosts")).expect("read"),
            hosts(cfg.address, "sbx")
        );
        assert_eq!(
            fs::read_to_string(&elsewhere).expect("read"),
            "nameserver 127.0.0.53\n"
        );
        let mut names: Vec<String> = fs::read_dir(&etc)
            .expect("readdir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["hosts", "resolv.conf"]);
        // A missing /etc is created.
        let fresh = dir.path().join("fresh/etc");
        write_etc(&fresh, &cfg, "sbx").expect("write");
        assert!(fresh.join("hosts").is_file());
    }

    #[test]
    fn sockaddrs_hold_a_sockaddr_in() {
        assert_eq!(
            std::mem::size_of::<libc::sockaddr>(),
            std::mem::size_of::<libc::sockaddr_in>()
        );
        assert_eq!(std::mem::offset_of!(libc::sockaddr_in, sin_addr), 4);
        let sa = sockaddr(ip("10.213.0.2"));
        assert_eq!(sa.sa_family, libc::AF_INET as libc::sa_family_t);
        let bytes: Vec<u8> = sa.sa_data.iter().map(|b| *b as u8).collect();
        assert_eq!(bytes, [0, 0, 10, 213, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn interface_names_must_fit_an_ifreq() {
        assert!(ifreq("eth0").is_ok());
        assert!(ifreq(&"e".repeat(15)).is_ok());
        assert!(ifreq(&"e".repeat(16)).is_err());
        assert!(ifreq("").is_err());
    }
}
