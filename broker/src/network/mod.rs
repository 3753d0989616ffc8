//! Guest networking: each sandbox with a NIC gets a tap device on the host
//! (`tap`), an address pair from the operator's subnet (`addressing`), the
//! nftables rules that enforce its scope (`firewall`), a DNS responder on
//! its host-side address (`dns`) and its published ports (`ports`).

pub mod addressing;
pub mod conntrack;
pub mod dns;
pub mod firewall;
mod manager;
pub mod ports;
pub mod tap;

pub use manager::{NetworkError, Networking, PortMapping, SandboxNetwork};

use std::net::{IpAddr, SocketAddr};

/// An upstream resolver as configured: `ip` (port 53) or `ip:port`.
pub fn parse_upstream(s: &str) -> Option<SocketAddr> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(SocketAddr::new(ip, 53));
    }
    s.parse::<SocketAddr>().ok()
}

/// The `nameserver` lines of a resolv.conf text, in order.
pub fn nameservers(resolv_conf: &str) -> Vec<SocketAddr> {
    resolv_conf
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some("nameserver"))
                .then(|| words.next())
                .flatten()
        })
        .filter_map(parse_upstream)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstreams_and_resolv_conf() {
        assert_eq!(parse_upstream("9.9.9.9"), "9.9.9.9:53".parse().ok());
        assert_eq!(
            parse_upstream("127.0.0.1:5353"),
            "127.0.0.1:5353".parse().ok()
        );
        assert_eq!(parse_upstream("dns.example"), None);
        let text = "# x\nsearch a\nnameserver 10.0.0.2\nnameserver   ::1\nnameserver bogus\noptions ndots:1\n";
        assert_eq!(
            nameservers(text),
            vec![
                "10.0.0.2:53".parse::<SocketAddr>().unwrap(),
                "[::1]:53".parse().unwrap()
            ]
        );
    }
}
