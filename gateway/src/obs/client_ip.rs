//! The client's address: the TCP peer, unless that peer is a trusted proxy
//! (or the connection came over the Unix socket, which only the local proxy
//! reaches), in which case `X-Forwarded-For` is read from the right,
//! skipping trusted proxies; the first untrusted address is the client.

use std::net::{IpAddr, SocketAddr};

use axum::http::HeaderMap;

use crate::config::IpNet;

/// How the connection reached the gateway (put in each request's
/// extensions by the server loop).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    Tcp(SocketAddr),
    Unix,
}

/// The client address of a request, `None` when unknown (Unix socket
/// without a forwarded address).
pub fn client_ip(peer: Option<Peer>, headers: &HeaderMap, trusted: &[IpNet]) -> Option<IpAddr> {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|net| net.contains(ip));
    let direct = match peer {
        Some(Peer::Tcp(addr)) => {
            let ip = addr.ip().to_canonical();
            if !is_trusted(ip) {
                return Some(ip);
            }
            Some(ip)
        }
        Some(Peer::Unix) => None,
        // No connection information (requests driven in-process).
        None => return None,
    };
    let forwarded: Vec<IpAddr> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|part| part.trim().parse::<IpAddr>().ok())
        .map(|ip| ip.to_canonical())
        .collect();
    forwarded
        .iter()
        .rev()
        .find(|ip| !is_trusted(**ip))
        .or(forwarded.first())
        .copied()
        .or(direct)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(xff: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_str(xff).unwrap());
        h
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn tcp(ip: &str) -> Option<Peer> {
        Some(Peer::Tcp(SocketAddr::new(ip.parse().unwrap(), 1234)))
    }

    #[test]
    fn untrusted_peers_are_the_client_whatever_they_forward() {
        let ip = client_ip(tcp("192.0.2.7"), &headers("1.2.3.4"), &nets(&["127.0.0.1"]));
        assert_eq!(ip, Some("192.0.2.7".parse().unwrap()));
    }

    #[test]
    fn trusted_proxies_forward_the_rightmost_untrusted_address() {
        let trusted = nets(&["127.0.0.1", "10.0.0.0/8"]);
        let ip = client_ip(
            tcp("127.0.0.1"),
            &headers("6.6.6.6, 1.2.3.4, 10.0.0.2"),
            &trusted,
        );
        assert_eq!(
            ip,
            Some("1.2.3.4".parse().unwrap()),
            "spoofed left part ignored"
        );
        let ip = client_ip(tcp("127.0.0.1"), &HeaderMap::new(), &trusted);
        assert_eq!(ip, Some("127.0.0.1".parse().unwrap()));
        let ip = client_ip(tcp("127.0.0.1"), &headers("10.0.0.3"), &trusted);
        assert_eq!(ip, Some("10.0.0.3".parse().unwrap()));
    }

    #[test]
    fn unix_socket_peers_are_the_proxy() {
        let ip = client_ip(Some(Peer::Unix), &headers("1.2.3.4"), &[]);
        assert_eq!(ip, Some("1.2.3.4".parse().unwrap()));
        assert_eq!(client_ip(Some(Peer::Unix), &HeaderMap::new(), &[]), None);
    }
}
