//! The broker's nftables policy for sandbox NICs.
//!
//! This module owns exactly one nftables table, `inet <table>` (default
//! `inet moat`), and nothing else on the host: it never touches other
//! tables, sysctls or links. [`Firewall::install`] replaces the whole table
//! in one transaction (so a table left behind by a crashed broker is
//! swapped out atomically), [`Firewall::add`] / [`Firewall::remove`] /
//! [`Firewall::allow_pair`] only add or delete set elements, and
//! [`Firewall::uninstall`] deletes the table. Every call is one `nft -f -`
//! run (absolute path, empty environment, script on stdin); every string
//! that reaches the script is either generated here or validated first
//! (interface names must match `^[a-z0-9]{1,15}$` and start with the
//! configured prefix).
//!
//! # The rules, in prose
//!
//! A sandbox's tap is `<iface_prefix><slot>` (default `mtap<N>`) in the
//! host's network namespace; "a tap" below means any interface matching
//! `<iface_prefix>*`.
//!
//! * **IPv6** from or to a tap is dropped (input, forward and output).
//! * **Anti-spoofing**: an IPv4 packet arriving from a tap is dropped
//!   unless its source is that sandbox's guest address (set `guest_addr`
//!   of `ifname . ipv4_addr`), both for the host (input) and forwarding.
//! * **The host itself** (input hook) is closed to taps, whatever the
//!   scope: only replies to connections the host opened (ct state
//!   established/related, e.g. the broker's port forwarding into the
//!   guest) and, for sandboxes with a resolver (scope `group` or wider),
//!   UDP/TCP port 53 to the tap's own host-side address (set
//!   `resolver_addr`) are accepted.
//! * **Forwarding out of a tap**, for new connections, by scope:
//!   `none` nothing; `group` only to peers; `public` peers plus any
//!   destination outside [`BLOCKED_RANGES`] and the moat subnet, except
//!   that a destination in the operator's `allowed_private` list is always
//!   allowed (the allow list wins); `any` everything the host routes
//!   (the host's own addresses are input, so still closed).
//! * **Forwarding into a tap**: nothing new, except from a group peer:
//!   the pair `(from . to)` must be in set `peers` and both taps must be of
//!   scope `group` or wider. Replies (established/related) pass.
//!   Consequently published ports must be served by a proxy on the host
//!   (output path), never by DNAT into the tap.
//! * **Limits** (each omitted when 0): at most `max_connections`
//!   connections forwarded from one tap at once (`ct count` in the dynamic
//!   set `conn_count` keyed by iifname, counted when the connection is
//!   admitted), and at most `egress_bytes_per_sec` forwarded out of /
//!   `ingress_bytes_per_sec` forwarded into one tap (`limit rate over`
//!   in the dynamic sets `egress_rate` / `ingress_rate` keyed by
//!   iifname / oifname; the bucket holds one second plus 64 KiB so a GSO
//!   super-packet always fits).
//! * **Masquerade**: traffic from the moat subnet leaving through an
//!   interface that is not a tap is source-NATed (postrouting, `srcnat`).
//! * **Forward guard** (`guard_forwarding`, set when the broker turned on
//!   IPv4 forwarding itself): forwarded IPv4 that involves no tap is
//!   dropped, so enabling forwarding does not make the host a router for
//!   anything else.
//!
//! The filter chains hook at priority -10 (before the usual priority-0
//! filter chains) and NAT at `srcnat` (100). A drop here is final, but an
//! accept here only ends this table's say: nftables runs every base chain
//! of every table on a hook, so a drop in another table (iptables-nft,
//! firewalld, ufw, Docker's `FORWARD` policy DROP, ...) still drops moat
//! traffic. Operators running such firewalls must allow `<prefix>*`
//! themselves.

use std::collections::BTreeSet;
use std::fmt;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::str::FromStr;

/// How far a sandbox's traffic may go (ordered from narrowest to widest).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// The NIC only carries published ports: nothing is forwarded.
    None,
    /// Peers only: sandboxes of the same namespace of scope group or wider.
    Group,
    /// Peers plus the internet (minus private ranges unless allowed).
    Public,
    /// Everything the host can route to (never the host itself).
    Any,
}

impl Scope {
    /// Its name in configs and on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::None => "none",
            Scope::Group => "group",
            Scope::Public => "public",
            Scope::Any => "any",
        }
    }

    /// Whether a sandbox of this scope may have peers and a resolver.
    pub fn has_peers(self) -> bool {
        self >= Scope::Group
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Config files name a scope or a network as a string; parsed on load.
macro_rules! deserialize_from_str {
    ($t:ty) => {
        impl<'de> serde::Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = String::deserialize(d)?;
                text.parse().map_err(|e| match e {
                    FirewallError::Invalid(reason) => serde::de::Error::custom(reason),
                    other => serde::de::Error::custom(other),
                })
            }
        }
    };
}

deserialize_from_str!(Scope);
deserialize_from_str!(Ipv4Net);

impl FromStr for Scope {
    type Err = FirewallError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(Scope::None),
            "group" => Ok(Scope::Group),
            "public" => Ok(Scope::Public),
            "any" => Ok(Scope::Any),
            _ => Err(FirewallError::Invalid(format!(
                "scope {s:?}: use \"none\", \"group\", \"public\" or \"any\""
            ))),
        }
    }
}

/// An IPv4 network `addr/prefix` whose host bits are zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ipv4Net {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Ipv4Net {
    /// `addr/prefix`, refused when the prefix exceeds 32 or host bits are set.
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Result<Self, FirewallError> {
        let net = Ipv4Net { addr, prefix };
        net.validate()?;
        Ok(net)
    }

    /// The netmask as a number (`/0` is 0).
    fn mask(self) -> u32 {
        match self.prefix {
            0 => 0,
            p => u32::MAX << (32 - u32::from(p.min(32))),
        }
    }

    /// Whether `ip` lies in this network.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.addr)
    }

    fn validate(&self) -> Result<(), FirewallError> {
        if self.prefix > 32 {
            return Err(FirewallError::Invalid(format!(
                "{}/{}: prefix length above 32",
                self.addr, self.prefix
            )));
        }
        let net = Ipv4Addr::from(u32::from(self.addr) & self.mask());
        if net != self.addr {
            return Err(FirewallError::Invalid(format!(
                "{}/{}: host bits are set (the network is {net}/{})",
                self.addr, self.prefix, self.prefix
            )));
        }
        Ok(())
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Ipv4Net {
    type Err = FirewallError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| FirewallError::Invalid(format!("{s:?}: {why}"));
        let (addr, prefix) = s
            .split_once('/')
            .ok_or_else(|| bad("expected a.b.c.d/len"))?;
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|_| bad("not an IPv4 address before the '/'"))?;
        if prefix.is_empty() || prefix.len() > 2 || !prefix.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad("the prefix length must be a number from 0 to 32"));
        }
        let prefix: u8 = prefix
            .parse()
            .map_err(|_| bad("the prefix length must be a number from 0 to 32"))?;
        Ipv4Net::new(addr, prefix)
    }
}

const fn net(a: u8, b: u8, c: u8, d: u8, prefix: u8) -> Ipv4Net {
    Ipv4Net {
        addr: Ipv4Addr::new(a, b, c, d),
        prefix,
    }
}

/// Destinations no sandbox reaches, whatever its scope (`any` included),
/// unless listed in `allowed_private`: link-local (cloud metadata at
/// 169.254.169.254) and Azure's WireServer.
pub const NEVER_RANGES: [Ipv4Net; 2] = [net(169, 254, 0, 0, 16), net(168, 63, 129, 16, 32)];

/// Destinations a `public` sandbox may not reach unless they are in
/// `allowed_private` (the moat subnet is blocked too).
pub const BLOCKED_RANGES: [Ipv4Net; 12] = [
    net(0, 0, 0, 0, 8),
    net(10, 0, 0, 0, 8),
    net(100, 64, 0, 0, 10),
    net(127, 0, 0, 0, 8),
    net(169, 254, 0, 0, 16),
    net(172, 16, 0, 0, 12),
    net(192, 0, 0, 0, 24),
    net(192, 168, 0, 0, 16),
    net(198, 18, 0, 0, 15),
    net(224, 0, 0, 0, 4),
    net(240, 0, 0, 0, 4),
    net(168, 63, 129, 16, 32),
];

/// DNS queries one sandbox may send its resolver per second (burst 50).
const DNS_QUERIES_PER_SEC: u32 = 100;

/// Highest byte rate the kernel's limit expression takes without
/// overflowing (it multiplies by 10^9 ns).
pub const MAX_BYTES_PER_SEC: u64 = 10_000_000_000;

/// Extra bucket room for byte limits: a GSO super-packet (up to 64 KiB)
/// must fit, or a low rate would drop such packets forever.
const RATE_BURST_BYTES: u64 = 65_536;

/// Sets holding per-tap elements.
const SET_GUEST_ADDR: &str = "guest_addr";
const SET_RESOLVER_ADDR: &str = "resolver_addr";
const SET_SCOPE_GROUP: &str = "scope_group";
const SET_SCOPE_PUBLIC: &str = "scope_public";
const SET_SCOPE_ANY: &str = "scope_any";
const SET_PEERS: &str = "peers";
/// Sets filled by `install` only.
const SET_BLOCKED: &str = "blocked_dst";
const SET_NEVER: &str = "never_dst";
const SET_ALLOWED: &str = "allowed_dst";
/// Dynamic sets filled by the kernel.
const SET_CONN_COUNT: &str = "conn_count";
const SET_EGRESS_RATE: &str = "egress_rate";
const SET_DNS_RATE: &str = "dns_rate";
const SET_INGRESS_RATE: &str = "ingress_rate";

/// One part of a set element's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyKind {
    Ifname,
    Addr,
}

/// The per-tap sets and the shape of their keys.
const TAP_SETS: [(&str, &[KeyKind]); 6] = [
    (SET_GUEST_ADDR, &[KeyKind::Ifname, KeyKind::Addr]),
    (SET_RESOLVER_ADDR, &[KeyKind::Ifname, KeyKind::Addr]),
    (SET_SCOPE_GROUP, &[KeyKind::Ifname]),
    (SET_SCOPE_PUBLIC, &[KeyKind::Ifname]),
    (SET_SCOPE_ANY, &[KeyKind::Ifname]),
    (SET_PEERS, &[KeyKind::Ifname, KeyKind::Ifname]),
];

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    /// A name, address or setting that may not go into the ruleset.
    #[error("invalid firewall input: {0}")]
    Invalid(String),
    /// nft could not be started or fed.
    #[error("running {path}: {source}")]
    Spawn {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// nft ran and failed; `stderr` is what it said.
    #[error("nft {action} failed ({status}): {stderr}")]
    Nft {
        action: String,
        status: ExitStatus,
        stderr: String,
    },
    /// nft's output could not be understood.
    #[error("unexpected output from nft {action}: {detail}")]
    Output { action: String, detail: String },
}

/// The operator's settings for the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirewallConfig {
    /// The table is `inet <table>`.
    pub table: String,
    /// Taps are named `<iface_prefix><slot>`.
    pub iface_prefix: String,
    /// The subnet all sandboxes' /30s come from.
    pub subnet: Ipv4Net,
    /// Private destinations `public` sandboxes may reach anyway.
    pub allowed_private: Vec<Ipv4Net>,
    /// Connections forwarded from one tap at once (0: unlimited).
    pub max_connections: u32,
    /// Bytes per second forwarded out of one tap (0: unlimited).
    pub egress_bytes_per_sec: u64,
    /// Bytes per second forwarded into one tap (0: unlimited).
    pub ingress_bytes_per_sec: u64,
    /// Drop forwarded IPv4 that involves no tap.
    pub guard_forwarding: bool,
}

/// One sandbox's NIC, as the firewall sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxNic {
    pub ifname: String,
    /// The tap's (host-side) address: the sandbox's resolver.
    pub host_addr: Ipv4Addr,
    /// The only source address accepted from the tap.
    pub guest_addr: Ipv4Addr,
    pub scope: Scope,
}

/// A set element key part, validated before it is rendered.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum KeyPart {
    Ifname(String),
    Addr(Ipv4Addr),
}

/// A per-tap set element: `set` is one of [`TAP_SETS`].
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Element {
    set: &'static str,
    key: Vec<KeyPart>,
}

impl Element {
    fn new(set: &'static str, key: Vec<KeyPart>) -> Self {
        Element { set, key }
    }

    /// The key as nft text (`"mtap1" . 10.213.0.6`).
    fn key_text(&self) -> String {
        self.key
            .iter()
            .map(|k| match k {
                KeyPart::Ifname(n) => format!("\"{n}\""),
                KeyPart::Addr(a) => a.to_string(),
            })
            .collect::<Vec<_>>()
            .join(" . ")
    }

    fn names(&self, ifname: &str) -> bool {
        self.key
            .iter()
            .any(|k| matches!(k, KeyPart::Ifname(n) if n == ifname))
    }
}

/// The broker's nftables table. Every method blocks on `nft`; async
/// callers use `spawn_blocking`.
#[derive(Debug, Clone)]
pub struct Firewall {
    nft: PathBuf,
    cfg: FirewallConfig,
}

impl Firewall {
    /// `nft` is the absolute path of the nft binary.
    pub fn new(nft: PathBuf, cfg: FirewallConfig) -> Self {
        Firewall { nft, cfg }
    }

    pub fn config(&self) -> &FirewallConfig {
        &self.cfg
    }

    /// Checks everything of the config that goes into nft text; `install`
    /// runs it first.
    pub fn validate(&self) -> Result<(), FirewallError> {
        let cfg = &self.cfg;
        if !self.nft.is_absolute() {
            return Err(FirewallError::Invalid(format!(
                "nft path {:?} is not absolute",
                self.nft
            )));
        }
        let t = cfg.table.as_bytes();
        if t.is_empty()
            || t.len() > 32
            || !(t[0].is_ascii_alphabetic() || t[0] == b'_')
            || !t.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'_')
        {
            return Err(FirewallError::Invalid(format!(
                "table {:?}: use 1-32 letters, digits and '_', not starting with a digit",
                cfg.table
            )));
        }
        let p = cfg.iface_prefix.as_bytes();
        if p.is_empty()
            || p.len() > 14
            || !p
                .iter()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        {
            return Err(FirewallError::Invalid(format!(
                "iface_prefix {:?}: use 1-14 lowercase letters and digits",
                cfg.iface_prefix
            )));
        }
        cfg.subnet.validate()?;
        if cfg.subnet.prefix > 30 {
            return Err(FirewallError::Invalid(format!(
                "subnet {}: it must hold at least one /30",
                cfg.subnet
            )));
        }
        for n in &cfg.allowed_private {
            n.validate()?;
        }
        for (what, v) in [
            ("egress_bytes_per_sec", cfg.egress_bytes_per_sec),
            ("ingress_bytes_per_sec", cfg.ingress_bytes_per_sec),
        ] {
            if v > MAX_BYTES_PER_SEC {
                return Err(FirewallError::Invalid(format!(
                    "{what} {v}: at most {MAX_BYTES_PER_SEC} (or 0 for unlimited)"
                )));
            }
        }
        Ok(())
    }

    /// Refuses a tap name that is not ours or not safe to quote.
    fn check_ifname(&self, name: &str) -> Result<(), FirewallError> {
        let ok = !name.is_empty()
            && name.len() <= 15
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
            && name.starts_with(&self.cfg.iface_prefix);
        if ok {
            Ok(())
        } else {
            Err(FirewallError::Invalid(format!(
                "interface name {name:?}: expected {:?} followed by lowercase letters or digits, 15 bytes at most",
                self.cfg.iface_prefix
            )))
        }
    }

    /// The whole table as nft text. Pure: it embeds the config as given;
    /// `install` validates first.
    pub fn ruleset(&self) -> String {
        let cfg = &self.cfg;
        let tap = format!("\"{}*\"", cfg.iface_prefix);
        let mut blocked: Vec<String> = BLOCKED_RANGES.iter().map(|n| n.to_string()).collect();
        blocked.push(cfg.subnet.to_string());
        let allowed: Vec<String> = cfg.allowed_private.iter().map(|n| n.to_string()).collect();
        let never: Vec<String> = NEVER_RANGES.iter().map(|n| n.to_string()).collect();

        let mut out = String::new();
        let mut line = |depth: usize, text: &str| {
            for _ in 0..depth {
                out.push('\t');
            }
            out.push_str(text);
            out.push('\n');
        };
        line(0, &format!("table inet {} {{", cfg.table));

        // Per-tap sets (filled by add / allow_pair).
        line(
            1,
            &format!("set {SET_GUEST_ADDR} {{ type ifname . ipv4_addr; }}"),
        );
        line(
            1,
            &format!("set {SET_RESOLVER_ADDR} {{ type ifname . ipv4_addr; }}"),
        );
        line(1, &format!("set {SET_SCOPE_GROUP} {{ type ifname; }}"));
        line(1, &format!("set {SET_SCOPE_PUBLIC} {{ type ifname; }}"));
        line(1, &format!("set {SET_SCOPE_ANY} {{ type ifname; }}"));
        line(1, &format!("set {SET_PEERS} {{ type ifname . ifname; }}"));
        // Destination lists (overlaps, e.g. the subnet inside 10/8, merge).
        line(
            1,
            &format!(
                "set {SET_BLOCKED} {{ type ipv4_addr; flags interval; auto-merge; elements = {{ {} }} }}",
                blocked.join(", ")
            ),
        );
        line(
            1,
            &format!(
                "set {SET_NEVER} {{ type ipv4_addr; flags interval; auto-merge; elements = {{ {} }} }}",
                never.join(", ")
            ),
        );
        line(
            1,
            &format!("set {SET_DNS_RATE} {{ type ifname; size 65535; flags dynamic,timeout; timeout 1m; }}"),
        );
        if allowed.is_empty() {
            line(
                1,
                &format!("set {SET_ALLOWED} {{ type ipv4_addr; flags interval; auto-merge; }}"),
            );
        } else {
            line(
                1,
                &format!(
                    "set {SET_ALLOWED} {{ type ipv4_addr; flags interval; auto-merge; elements = {{ {} }} }}",
                    allowed.join(", ")
                ),
            );
        }
        // Kernel-filled meters.
        if cfg.max_connections > 0 {
            line(
                1,
                &format!("set {SET_CONN_COUNT} {{ type ifname; size 65535; flags dynamic; }}"),
            );
        }
        if cfg.egress_bytes_per_sec > 0 {
            line(
                1,
                &format!(
                    "set {SET_EGRESS_RATE} {{ type ifname; size 65535; flags dynamic,timeout; timeout 1m; }}"
                ),
            );
        }
        if cfg.ingress_bytes_per_sec > 0 {
            line(
                1,
                &format!(
                    "set {SET_INGRESS_RATE} {{ type ifname; size 65535; flags dynamic,timeout; timeout 1m; }}"
                ),
            );
        }

        // To the host itself.
        line(1, "chain input {");
        line(2, "type filter hook input priority -10; policy accept;");
        line(2, &format!("iifname {tap} goto tap_input"));
        line(1, "}");
        line(1, "chain tap_input {");
        line(2, "meta nfproto ipv6 drop");
        line(2, &format!("iifname . ip saddr != @{SET_GUEST_ADDR} drop"));
        // "related" only for ICMP errors: an expectation a conntrack helper
        // (set up by another table) opened is no way in or out.
        line(2, "ct state established accept");
        line(2, "ct state related meta l4proto { icmp } accept");
        // DNS: UDP only (the responder serves nothing else), rate-limited.
        line(
            2,
            &format!(
                "iifname . ip daddr @{SET_RESOLVER_ADDR} udp dport 53 update @{SET_DNS_RATE} {{ iifname limit rate over {DNS_QUERIES_PER_SEC}/second burst 50 packets }} drop"
            ),
        );
        line(
            2,
            &format!("iifname . ip daddr @{SET_RESOLVER_ADDR} udp dport 53 accept"),
        );
        line(2, "drop");
        line(1, "}");

        // From the host itself: only IPv6 is refused.
        line(1, "chain output {");
        line(2, "type filter hook output priority -10; policy accept;");
        line(2, &format!("oifname {tap} meta nfproto ipv6 drop"));
        // The host's multicast and broadcast chatter (mDNS, ...) stays out.
        line(2, &format!("oifname {tap} ip daddr 224.0.0.0/4 drop"));
        line(2, &format!("oifname {tap} ip daddr 255.255.255.255 drop"));
        line(1, "}");

        // Forwarded.
        line(1, "chain forward {");
        line(2, "type filter hook forward priority -10; policy accept;");
        line(2, &format!("iifname {tap} goto tap_forward"));
        line(2, &format!("oifname {tap} goto tap_forward"));
        if cfg.guard_forwarding {
            line(2, "meta nfproto ipv4 drop");
        }
        line(1, "}");
        line(1, "chain tap_forward {");
        line(2, "meta nfproto ipv6 drop");
        line(
            2,
            &format!("iifname {tap} iifname . ip saddr != @{SET_GUEST_ADDR} drop"),
        );
        if cfg.egress_bytes_per_sec > 0 {
            line(
                2,
                &format!(
                    "iifname {tap} update @{SET_EGRESS_RATE} {{ iifname limit rate over {} bytes/second burst {RATE_BURST_BYTES} bytes }} drop",
                    cfg.egress_bytes_per_sec
                ),
            );
        }
        if cfg.ingress_bytes_per_sec > 0 {
            line(
                2,
                &format!(
                    "oifname {tap} update @{SET_INGRESS_RATE} {{ oifname limit rate over {} bytes/second burst {RATE_BURST_BYTES} bytes }} drop",
                    cfg.ingress_bytes_per_sec
                ),
            );
        }
        // "related" only for ICMP errors: an expectation a conntrack helper
        // (set up by another table) opened is no way in or out.
        line(2, "ct state established accept");
        line(2, "ct state related meta l4proto { icmp } accept");
        line(2, "ct state != new drop");
        line(2, &format!("oifname {tap} goto new_to_tap"));
        line(2, "goto new_from_tap");
        line(1, "}");
        // New connection into a tap (from a tap or from outside).
        line(1, "chain new_to_tap {");
        line(
            2,
            &format!(
                "iifname @{SET_SCOPE_GROUP} oifname @{SET_SCOPE_GROUP} iifname . oifname @{SET_PEERS} goto admit"
            ),
        );
        line(2, "drop");
        line(1, "}");
        // New connection from a tap to a non-tap interface.
        line(1, "chain new_from_tap {");
        line(2, &format!("ip daddr @{SET_ALLOWED} goto allowed_from_tap"));
        line(2, &format!("ip daddr @{SET_NEVER} drop"));
        line(2, "goto allowed_from_tap");
        line(1, "}");
        line(1, "chain allowed_from_tap {");
        line(2, &format!("iifname @{SET_SCOPE_ANY} goto admit"));
        line(
            2,
            &format!("iifname @{SET_SCOPE_PUBLIC} ip daddr @{SET_ALLOWED} goto admit"),
        );
        line(
            2,
            &format!("iifname @{SET_SCOPE_PUBLIC} ip daddr != @{SET_BLOCKED} goto admit"),
        );
        line(2, "drop");
        line(1, "}");
        // An allowed new connection, counted against its source tap.
        line(1, "chain admit {");
        if cfg.max_connections > 0 {
            line(
                2,
                &format!(
                    "add @{SET_CONN_COUNT} {{ iifname ct count over {} }} drop",
                    cfg.max_connections
                ),
            );
        }
        line(2, "accept");
        line(1, "}");

        line(1, "chain postrouting {");
        line(
            2,
            "type nat hook postrouting priority srcnat; policy accept;",
        );
        line(
            2,
            &format!("ip saddr {} oifname != {tap} masquerade", cfg.subnet),
        );
        line(1, "}");
        line(0, "}");
        out
    }

    /// Creates or replaces the table, atomically.
    pub fn install(&self) -> Result<(), FirewallError> {
        self.validate()?;
        let script = format!("{}{}", self.delete_table_script(), self.ruleset());
        self.nft_script("install", &script, false)
    }

    /// Like `install` but in nft's check mode: the kernel validates the
    /// transaction and nothing is applied.
    pub fn check(&self) -> Result<(), FirewallError> {
        self.validate()?;
        let script = format!("{}{}", self.delete_table_script(), self.ruleset());
        self.nft_script("check", &script, true)
    }

    /// Deletes the table; a missing table is fine.
    pub fn uninstall(&self) -> Result<(), FirewallError> {
        self.validate()?;
        self.nft_script("uninstall", &self.delete_table_script(), false)
    }

    /// Adds a sandbox's elements: its guest address, and by scope its
    /// resolver address and scope sets. Scope memberships it had before
    /// are replaced.
    ///
    /// Whatever an earlier holder of the same tap name left (peer pairs
    /// naming it, an old address) is deleted in the same transaction, so a
    /// reused slot starts with nothing it did not ask for.
    pub fn add(&self, nic: &SandboxNic) -> Result<(), FirewallError> {
        let add = self.add_script(nic)?;
        let listing = self.nft_args("list", &["-j", "list", "table", "inet", &self.cfg.table])?;
        let listed = self.parse_listing(&listing)?;
        let mut script = self.remove_script(nic, &listed)?;
        script.push_str(&add);
        self.nft_script("add", &script, false)
    }

    /// Removes a sandbox's elements and every peer pair naming it.
    /// Idempotent: missing elements (or a missing table) are not an error.
    pub fn remove(&self, nic: &SandboxNic) -> Result<(), FirewallError> {
        self.validate()?;
        self.check_ifname(&nic.ifname)?;
        let listing = match self.nft_args("list", &["-j", "list", "table", "inet", &self.cfg.table])
        {
            Ok(out) => out,
            Err(FirewallError::Nft { ref stderr, .. })
                if stderr.contains("No such file or directory") =>
            {
                tracing::debug!(ifname = %nic.ifname, "firewall table is gone; nothing to remove");
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let listed = self.parse_listing(&listing)?;
        let script = self.remove_script(nic, &listed)?;
        self.nft_script("remove", &script, false)
    }

    /// Lets `a` and `b` open connections to each other.
    pub fn allow_pair(&self, a: &str, b: &str) -> Result<(), FirewallError> {
        self.validate()?;
        self.check_ifname(a)?;
        self.check_ifname(b)?;
        if a == b {
            return Err(FirewallError::Invalid(format!(
                "peer pair {a:?} . {b:?}: a sandbox is not its own peer"
            )));
        }
        let script = format!(
            "add element inet {} {SET_PEERS} {{ \"{a}\" . \"{b}\", \"{b}\" . \"{a}\" }}\n",
            self.cfg.table
        );
        self.nft_script("allow_pair", &script, false)
    }

    /// `table` (creates it if missing) then `delete table`.
    fn delete_table_script(&self) -> String {
        format!(
            "table inet {t}\ndelete table inet {t}\n",
            t = self.cfg.table
        )
    }

    /// The elements `nic` has by its scope.
    fn elements_of(&self, nic: &SandboxNic) -> Vec<Element> {
        let name = || KeyPart::Ifname(nic.ifname.clone());
        let mut els = vec![Element::new(
            SET_GUEST_ADDR,
            vec![name(), KeyPart::Addr(nic.guest_addr)],
        )];
        if nic.scope.has_peers() {
            els.push(Element::new(
                SET_RESOLVER_ADDR,
                vec![name(), KeyPart::Addr(nic.host_addr)],
            ));
            els.push(Element::new(SET_SCOPE_GROUP, vec![name()]));
        }
        match nic.scope {
            Scope::Public => els.push(Element::new(SET_SCOPE_PUBLIC, vec![name()])),
            Scope::Any => els.push(Element::new(SET_SCOPE_ANY, vec![name()])),
            Scope::None | Scope::Group => {}
        }
        els
    }

    /// Script that deletes `el` whether or not it exists: `add` is a no-op
    /// for an existing element and `delete` then removes it.
    fn delete_element_text(&self, el: &Element) -> String {
        let t = &self.cfg.table;
        let k = el.key_text();
        format!(
            "add element inet {t} {s} {{ {k} }}\ndelete element inet {t} {s} {{ {k} }}\n",
            s = el.set
        )
    }

    fn add_script(&self, nic: &SandboxNic) -> Result<String, FirewallError> {
        self.validate()?;
        self.check_ifname(&nic.ifname)?;
        for (what, a) in [("guest", nic.guest_addr), ("host", nic.host_addr)] {
            if !self.cfg.subnet.contains(a) {
                return Err(FirewallError::Invalid(format!(
                    "{}: {what} address {a} is outside the moat subnet {}",
                    nic.ifname, self.cfg.subnet
                )));
            }
        }
        if nic.guest_addr == nic.host_addr {
            return Err(FirewallError::Invalid(format!(
                "{}: guest and host address are both {}",
                nic.ifname, nic.guest_addr
            )));
        }
        let mut script = String::new();
        // Drop scope memberships of an earlier add under this name.
        for set in [SET_SCOPE_GROUP, SET_SCOPE_PUBLIC, SET_SCOPE_ANY] {
            script.push_str(&self.delete_element_text(&Element::new(
                set,
                vec![KeyPart::Ifname(nic.ifname.clone())],
            )));
        }
        for el in self.elements_of(nic) {
            script.push_str(&format!(
                "add element inet {} {} {{ {} }}\n",
                self.cfg.table,
                el.set,
                el.key_text()
            ));
        }
        Ok(script)
    }

    /// Deletes what `nic` would have plus whatever `listed` names it.
    fn remove_script(&self, nic: &SandboxNic, listed: &[Element]) -> Result<String, FirewallError> {
        self.check_ifname(&nic.ifname)?;
        let mut doomed: BTreeSet<Element> = BTreeSet::new();
        for set in [SET_SCOPE_GROUP, SET_SCOPE_PUBLIC, SET_SCOPE_ANY] {
            doomed.insert(Element::new(set, vec![KeyPart::Ifname(nic.ifname.clone())]));
        }
        doomed.insert(Element::new(
            SET_GUEST_ADDR,
            vec![
                KeyPart::Ifname(nic.ifname.clone()),
                KeyPart::Addr(nic.guest_addr),
            ],
        ));
        doomed.insert(Element::new(
            SET_RESOLVER_ADDR,
            vec![
                KeyPart::Ifname(nic.ifname.clone()),
                KeyPart::Addr(nic.host_addr),
            ],
        ));
        doomed.extend(listed.iter().filter(|e| e.names(&nic.ifname)).cloned());
        Ok(doomed.iter().map(|e| self.delete_element_text(e)).collect())
    }

    /// The per-tap elements in `nft -j list table` output. Elements that
    /// fail validation are skipped (with a warning): they cannot have been
    /// added by us and are never echoed back into a script.
    fn parse_listing(&self, json: &str) -> Result<Vec<Element>, FirewallError> {
        let bad = |detail: String| FirewallError::Output {
            action: "list".into(),
            detail,
        };
        let doc: serde_json::Value =
            serde_json::from_str(json).map_err(|e| bad(format!("not JSON: {e}")))?;
        let items = doc
            .get("nftables")
            .and_then(|v| v.as_array())
            .ok_or_else(|| bad("no \"nftables\" array".into()))?;
        let mut out = Vec::new();
        for item in items {
            let Some(set) = item.get("set") else { continue };
            let Some(name) = set.get("name").and_then(|n| n.as_str()) else {
                continue;
            };
            let Some(&(set_name, kinds)) = TAP_SETS.iter().find(|(n, _)| *n == name) else {
                continue;
            };
            let elems = match set.get("elem") {
                None => continue,
                Some(serde_json::Value::Array(a)) => a.iter().collect::<Vec<_>>(),
                Some(one) => vec![one],
            };
            for raw in elems {
                match self.parse_element(raw, kinds) {
                    Some(key) => out.push(Element::new(set_name, key)),
                    None => {
                        tracing::warn!(set = set_name, element = %raw, "ignoring unexpected element in the firewall table")
                    }
                }
            }
        }
        Ok(out)
    }

    fn parse_element(&self, raw: &serde_json::Value, kinds: &[KeyKind]) -> Option<Vec<KeyPart>> {
        use serde_json::Value;
        // `{"elem": {"val": ...}}` wraps elements that carry timeouts etc.
        let mut v = raw;
        while let Some(inner) = v.get("elem").and_then(|e| e.get("val")) {
            v = inner;
        }
        let parts: Vec<&str> = match v {
            Value::String(s) => vec![s.as_str()],
            Value::Object(m) => m
                .get("concat")?
                .as_array()?
                .iter()
                .map(|p| p.as_str())
                .collect::<Option<Vec<_>>>()?,
            _ => return None,
        };
        if parts.len() != kinds.len() {
            return None;
        }
        parts
            .iter()
            .zip(kinds)
            .map(|(p, k)| match k {
                KeyKind::Ifname => self
                    .check_ifname(p)
                    .ok()
                    .map(|()| KeyPart::Ifname((*p).to_string())),
                KeyKind::Addr => p.parse().ok().map(KeyPart::Addr),
            })
            .collect()
    }

    /// Runs `nft -f -` (or `nft -c -f -`) with `script` on stdin.
    fn nft_script(&self, action: &str, script: &str, check: bool) -> Result<(), FirewallError> {
        let args: &[&str] = if check {
            &["-c", "-f", "-"]
        } else {
            &["-f", "-"]
        };
        self.run(action, args, Some(script)).map(|_| ())
    }

    /// Runs nft with `args` and no input; returns its stdout.
    fn nft_args(&self, action: &str, args: &[&str]) -> Result<String, FirewallError> {
        self.run(action, args, None)
    }

    fn run(
        &self,
        action: &str,
        args: &[&str],
        script: Option<&str>,
    ) -> Result<String, FirewallError> {
        if !self.nft.is_absolute() {
            return Err(FirewallError::Invalid(format!(
                "nft path {:?} is not absolute",
                self.nft
            )));
        }
        let spawn_err = |source| FirewallError::Spawn {
            path: self.nft.clone(),
            source,
        };
        let mut child = Command::new(&self.nft)
            .env_clear()
            .args(args)
            .stdin(if script.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(spawn_err)?;
        if let Some(script) = script {
            // nft reads all of a file before it prints anything, so
            // writing first cannot deadlock on a full stdout pipe.
            let written = match child.stdin.take() {
                Some(mut stdin) => stdin.write_all(script.as_bytes()),
                None => Ok(()),
            };
            if let Err(e) = written {
                let _ = child.kill();
                let _ = child.wait();
                return Err(spawn_err(e));
            }
        }
        let out = child.wait_with_output().map_err(spawn_err)?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
            tracing::debug!(action, script = script.unwrap_or(""), %stderr, "nft failed");
            return Err(FirewallError::Nft {
                action: action.to_string(),
                status: out.status,
                stderr,
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn cfg() -> FirewallConfig {
        FirewallConfig {
            table: "moat".into(),
            iface_prefix: "mtap".into(),
            subnet: "10.213.0.0/16".parse().unwrap(),
            allowed_private: vec![],
            max_connections: 0,
            egress_bytes_per_sec: 0,
            ingress_bytes_per_sec: 0,
            guard_forwarding: false,
        }
    }

    fn full_cfg() -> FirewallConfig {
        FirewallConfig {
            allowed_private: vec![
                "192.168.7.0/24".parse().unwrap(),
                "10.1.2.3/32".parse().unwrap(),
                "10.1.0.0/16".parse().unwrap(),
            ],
            max_connections: 512,
            egress_bytes_per_sec: 12_500_000,
            ingress_bytes_per_sec: 25_000_000,
            guard_forwarding: true,
            ..cfg()
        }
    }

    fn fw(cfg: FirewallConfig) -> Firewall {
        // A path that does not exist: a test that reached nft would fail
        // with Spawn, not Invalid.
        Firewall::new(PathBuf::from("/nonexistent/nft"), cfg)
    }

    fn nic(slot: u32, scope: Scope) -> SandboxNic {
        SandboxNic {
            ifname: format!("mtap{slot}"),
            host_addr: Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 213, 0, 1)) + 4 * slot),
            guest_addr: Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 213, 0, 2)) + 4 * slot),
            scope,
        }
    }

    #[test]
    fn scope_parses_displays_and_orders() {
        for s in [Scope::None, Scope::Group, Scope::Public, Scope::Any] {
            assert_eq!(s.to_string().parse::<Scope>().unwrap(), s);
        }
        assert_eq!("public".parse::<Scope>().unwrap(), Scope::Public);
        assert!("Public".parse::<Scope>().is_err());
        assert!("".parse::<Scope>().is_err());
        assert!(Scope::None < Scope::Group && Scope::Group < Scope::Public);
        assert!(Scope::Public < Scope::Any);
        assert!(!Scope::None.has_peers() && Scope::Group.has_peers() && Scope::Any.has_peers());
    }

    #[test]
    fn ipv4net_parses_and_validates() {
        let n: Ipv4Net = "10.213.0.0/16".parse().unwrap();
        assert_eq!(n.addr, Ipv4Addr::new(10, 213, 0, 0));
        assert_eq!(n.prefix, 16);
        assert_eq!(n.to_string(), "10.213.0.0/16");
        assert!(n.contains(Ipv4Addr::new(10, 213, 255, 1)));
        assert!(!n.contains(Ipv4Addr::new(10, 214, 0, 1)));
        assert_eq!("0.0.0.0/0".parse::<Ipv4Net>().unwrap().prefix, 0);
        assert!("0.0.0.0/0"
            .parse::<Ipv4Net>()
            .unwrap()
            .contains(Ipv4Addr::BROADCAST));
        assert_eq!(
            "1.2.3.4/32".parse::<Ipv4Net>().unwrap().to_string(),
            "1.2.3.4/32"
        );
        for bad in [
            "10.213.0.1/16",
            "10.0.0.0/33",
            "10.0.0.0",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "10.0.0.0/008",
            "10.0.0/8",
            "10.0.0.0/8 ",
            "::/0",
            "10.0.0.0/8\"; flush ruleset",
        ] {
            assert!(bad.parse::<Ipv4Net>().is_err(), "{bad} parsed");
        }
        let e = "10.213.0.1/16".parse::<Ipv4Net>().unwrap_err().to_string();
        assert!(e.contains("10.213.0.0/16"), "{e}");
        assert!(Ipv4Net::new(Ipv4Addr::new(192, 168, 1, 0), 23).is_err());
    }

    #[test]
    fn ruleset_has_blocked_ranges_subnet_and_hooks() {
        let r = fw(cfg()).ruleset();
        for n in BLOCKED_RANGES {
            assert!(r.contains(&n.to_string()), "{n} missing");
        }
        for s in [
            "0.0.0.0/8",
            "100.64.0.0/10",
            "169.254.0.0/16",
            "172.16.0.0/12",
            "192.0.0.0/24",
            "198.18.0.0/15",
            "240.0.0.0/4",
        ] {
            assert!(r.contains(s), "{s} missing");
        }
        assert!(r.starts_with("table inet moat {\n"));
        assert!(r.contains("elements = { 0.0.0.0/8, 10.0.0.0/8,"));
        assert!(r.contains(", 240.0.0.0/4, 168.63.129.16/32, 10.213.0.0/16 }"));
        assert!(r.contains("ip saddr 10.213.0.0/16 oifname != \"mtap*\" masquerade"));
        assert!(r.contains("type nat hook postrouting priority srcnat;"));
        for hook in ["input", "output", "forward"] {
            assert!(r.contains(&format!(
                "type filter hook {hook} priority -10; policy accept;"
            )));
        }
        assert!(r.contains("iifname . ip saddr != @guest_addr drop"));
        assert!(r.contains("iifname \"mtap*\" iifname . ip saddr != @guest_addr drop"));
        assert!(r.contains("iifname . ip daddr @resolver_addr udp dport 53 accept"));
        assert!(r.contains("limit rate over 100/second burst 50 packets } drop"));
        assert!(!r.contains("tcp dport 53"), "the responder serves UDP only");
        assert!(
            r.contains("ip daddr @never_dst drop"),
            "metadata is never reachable"
        );
        assert!(r.contains("oifname \"mtap*\" ip daddr 224.0.0.0/4 drop"));
        assert!(r.contains("oifname \"mtap*\" meta nfproto ipv6 drop"));
        assert!(r.contains("iifname . oifname @peers goto admit"));
        assert!(r.contains("iifname @scope_public ip daddr @allowed_dst goto admit"));
        assert!(r.contains("iifname @scope_public ip daddr != @blocked_dst goto admit"));
        assert!(r.contains("iifname @scope_any goto admit"));
        // Braces balance.
        assert_eq!(r.matches('{').count(), r.matches('}').count());
    }

    #[test]
    fn ruleset_omits_zero_limits_and_empty_allow_list() {
        let r = fw(cfg()).ruleset();
        assert!(!r.contains("ct count"));
        assert!(!r.contains("bytes/second"));
        assert!(!r.contains("conn_count"));
        assert!(!r.contains("egress_rate"));
        assert!(!r.contains("ingress_rate"));
        assert!(!r.contains("meta nfproto ipv4 drop"), "guard is off");
        assert!(r.contains("set allowed_dst { type ipv4_addr; flags interval; auto-merge; }"));
        assert!(r.contains("chain admit {\n\t\taccept\n\t}"));
    }

    #[test]
    fn ruleset_has_limits_allow_list_and_guard_when_set() {
        let r = fw(full_cfg()).ruleset();
        assert!(r.contains("elements = { 192.168.7.0/24, 10.1.2.3/32, 10.1.0.0/16 }"));
        assert!(r.contains("add @conn_count { iifname ct count over 512 } drop"));
        assert!(r.contains(
            "iifname \"mtap*\" update @egress_rate { iifname limit rate over 12500000 bytes/second burst 65536 bytes } drop"
        ));
        assert!(r.contains(
            "oifname \"mtap*\" update @ingress_rate { oifname limit rate over 25000000 bytes/second burst 65536 bytes } drop"
        ));
        assert!(r.contains("set conn_count { type ifname; size 65535; flags dynamic; }"));
        // The guard is the last rule of the forward base chain.
        assert!(r.contains("goto tap_forward\n\t\tmeta nfproto ipv4 drop\n\t}"));
        // Limits come before the established accept (they cover all bytes).
        let limit = r.find("update @egress_rate").unwrap();
        let est = r.find("chain tap_forward").unwrap();
        assert!(limit > est);
        assert!(limit < est + r[est..].find("ct state established").unwrap());
    }

    #[test]
    fn ruleset_follows_names_from_config() {
        let r = fw(FirewallConfig {
            table: "moat_test".into(),
            iface_prefix: "xt".into(),
            subnet: "172.31.0.0/24".parse().unwrap(),
            ..cfg()
        })
        .ruleset();
        assert!(r.starts_with("table inet moat_test {"));
        assert!(r.contains("iifname \"xt*\" goto tap_input"));
        assert!(r.contains("240.0.0.0/4, 168.63.129.16/32, 172.31.0.0/24 }"));
        assert!(!r.contains("mtap"));
    }

    #[test]
    fn ifnames_are_validated() {
        let f = fw(cfg());
        for ok in ["mtap0", "mtap16383", "mtapabcdefghijk", "mtap"] {
            assert!(f.check_ifname(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "eth0",
            "MTAP0",
            "mtap-1",
            "mtap 1",
            "mtap0\"",
            "mtap0\" } ; flush ruleset ; {\"",
            "mtapabcdefghijkl",
            "xmtap0",
            "mtap0\n",
            "mtap*",
        ] {
            assert!(
                matches!(f.check_ifname(bad), Err(FirewallError::Invalid(_))),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn methods_refuse_bad_input_before_running_nft() {
        let f = fw(cfg());
        let mut n = nic(1, Scope::Public);
        n.ifname = "eth0".into();
        assert!(matches!(f.add(&n), Err(FirewallError::Invalid(_))));
        assert!(matches!(f.remove(&n), Err(FirewallError::Invalid(_))));
        assert!(matches!(
            f.allow_pair("mtap1", "eth0"),
            Err(FirewallError::Invalid(_))
        ));
        assert!(matches!(
            f.allow_pair("mtap\"", "mtap1"),
            Err(FirewallError::Invalid(_))
        ));
        assert!(matches!(
            f.allow_pair("mtap1", "mtap1"),
            Err(FirewallError::Invalid(_))
        ));
        let mut n = nic(1, Scope::Public);
        n.guest_addr = Ipv4Addr::new(8, 8, 8, 8);
        assert!(matches!(f.add(&n), Err(FirewallError::Invalid(_))));
        let mut n = nic(1, Scope::Public);
        n.guest_addr = n.host_addr;
        assert!(matches!(f.add(&n), Err(FirewallError::Invalid(_))));
        // A valid call does reach nft, which does not exist here.
        assert!(matches!(
            f.allow_pair("mtap1", "mtap2"),
            Err(FirewallError::Spawn { .. })
        ));
    }

    #[test]
    fn config_is_validated() {
        assert!(fw(cfg()).validate().is_ok());
        assert!(fw(full_cfg()).validate().is_ok());
        let bad = [
            FirewallConfig {
                table: "".into(),
                ..cfg()
            },
            FirewallConfig {
                table: "1moat".into(),
                ..cfg()
            },
            FirewallConfig {
                table: "mo at".into(),
                ..cfg()
            },
            FirewallConfig {
                table: "moat;flush".into(),
                ..cfg()
            },
            FirewallConfig {
                table: "m".repeat(33),
                ..cfg()
            },
            FirewallConfig {
                iface_prefix: "".into(),
                ..cfg()
            },
            FirewallConfig {
                iface_prefix: "Tap".into(),
                ..cfg()
            },
            FirewallConfig {
                iface_prefix: "m*".into(),
                ..cfg()
            },
            FirewallConfig {
                iface_prefix: "a".repeat(15),
                ..cfg()
            },
            FirewallConfig {
                subnet: Ipv4Net {
                    addr: Ipv4Addr::new(10, 213, 0, 1),
                    prefix: 16,
                },
                ..cfg()
            },
            FirewallConfig {
                subnet: "10.213.0.0/31".parse().unwrap(),
                ..cfg()
            },
            FirewallConfig {
                allowed_private: vec![Ipv4Net {
                    addr: Ipv4Addr::new(10, 0, 0, 0),
                    prefix: 40,
                }],
                ..cfg()
            },
            FirewallConfig {
                egress_bytes_per_sec: MAX_BYTES_PER_SEC + 1,
                ..cfg()
            },
            FirewallConfig {
                ingress_bytes_per_sec: u64::MAX,
                ..cfg()
            },
        ];
        for c in bad {
            assert!(
                matches!(fw(c.clone()).validate(), Err(FirewallError::Invalid(_))),
                "{c:?} accepted"
            );
            assert!(matches!(fw(c).install(), Err(FirewallError::Invalid(_))));
        }
        let rel = Firewall::new(PathBuf::from("nft"), cfg());
        assert!(matches!(rel.validate(), Err(FirewallError::Invalid(_))));
        assert!(matches!(
            rel.allow_pair("mtap1", "mtap2"),
            Err(FirewallError::Invalid(_))
        ));
    }

    #[test]
    fn add_script_sets_elements_by_scope() {
        let f = fw(cfg());
        let s = f.add_script(&nic(1, Scope::None)).unwrap();
        assert!(s.contains("add element inet moat guest_addr { \"mtap1\" . 10.213.0.6 }\n"));
        assert!(!s.contains("add element inet moat resolver_addr"));
        assert!(!s.contains("delete element inet moat guest_addr"));
        // Earlier scope memberships are cleared first, whatever the scope.
        for set in ["scope_group", "scope_public", "scope_any"] {
            assert!(s.contains(&format!("delete element inet moat {set} {{ \"mtap1\" }}")));
        }
        assert!(
            s.rfind("delete element").unwrap()
                < s.find("add element inet moat guest_addr").unwrap()
        );

        let g = f.add_script(&nic(2, Scope::Group)).unwrap();
        assert!(g.contains("add element inet moat resolver_addr { \"mtap2\" . 10.213.0.9 }\n"));
        assert!(g.ends_with("add element inet moat scope_group { \"mtap2\" }\n"));
        let p = f.add_script(&nic(3, Scope::Public)).unwrap();
        assert!(p.ends_with(
            "add element inet moat scope_group { \"mtap3\" }\nadd element inet moat scope_public { \"mtap3\" }\n"
        ));
        let a = f.add_script(&nic(4, Scope::Any)).unwrap();
        assert!(a.ends_with("add element inet moat scope_any { \"mtap4\" }\n"));
        // Only the clearing add (followed by its delete) names scope_public.
        assert_eq!(a.matches("add element inet moat scope_public").count(), 1);
    }

    #[test]
    fn remove_script_covers_listed_pairs_and_skips_junk() {
        let f = fw(cfg());
        let listing = r#"{"nftables": [
            {"metainfo": {"version": "1.0.6"}},
            {"table": {"family": "inet", "name": "moat", "handle": 1}},
            {"set": {"family": "inet", "name": "guest_addr", "table": "moat", "type": ["ifname", "ipv4_addr"],
                     "elem": [{"concat": ["mtap1", "10.213.0.99"]}, {"concat": ["mtap2", "10.213.0.10"]}]}},
            {"set": {"family": "inet", "name": "scope_group", "table": "moat", "type": "ifname", "elem": ["mtap1", "mtap2"]}},
            {"set": {"family": "inet", "name": "peers", "table": "moat", "type": ["ifname", "ifname"],
                     "elem": [{"concat": ["mtap1", "mtap2"]}, {"concat": ["mtap2", "mtap1"]},
                              {"concat": ["mtap2", "mtap3"]}, {"elem": {"val": {"concat": ["mtap3", "mtap1"]}}},
                              {"concat": ["mtap1", "evil\" }; flush ruleset; {\""]}, {"concat": ["mtap1"]}]}},
            {"set": {"family": "inet", "name": "blocked_dst", "table": "moat", "type": "ipv4_addr",
                     "elem": [{"prefix": {"addr": "10.0.0.0", "len": 8}}]}},
            {"chain": {"family": "inet", "table": "moat", "name": "input"}}
        ]}"#;
        let listed = f.parse_listing(listing).unwrap();
        assert_eq!(listed.len(), 8, "{listed:?}");
        let s = f.remove_script(&nic(1, Scope::Group), &listed).unwrap();
        let del = |set: &str, key: &str| format!("delete element inet moat {set} {{ {key} }}\n");
        let add = |set: &str, key: &str| format!("add element inet moat {set} {{ {key} }}\n");
        for (set, key) in [
            ("guest_addr", "\"mtap1\" . 10.213.0.6"),
            ("guest_addr", "\"mtap1\" . 10.213.0.99"),
            ("resolver_addr", "\"mtap1\" . 10.213.0.5"),
            ("scope_group", "\"mtap1\""),
            ("scope_public", "\"mtap1\""),
            ("scope_any", "\"mtap1\""),
            ("peers", "\"mtap1\" . \"mtap2\""),
            ("peers", "\"mtap2\" . \"mtap1\""),
            ("peers", "\"mtap3\" . \"mtap1\""),
        ] {
            // Each delete is preceded by an add of the same element.
            assert!(
                s.contains(&(add(set, key) + &del(set, key))),
                "{set} {key}\n{s}"
            );
        }
        assert!(!s.contains("mtap2\" . \"mtap3"));
        assert!(!s.contains("10.213.0.10"));
        assert!(!s.contains("evil"));
        assert!(!s.contains("10.0.0.0"));
        assert_eq!(s.matches("delete element").count(), 9);
        assert!(f.parse_listing("not json").is_err());
        assert!(f.parse_listing("{}").is_err());
    }

    /// Root-only tests: run `body` on a fresh thread inside a private
    /// network namespace, so the host's ruleset is never touched.
    fn in_private_netns(body: impl FnOnce(&Path) + Send + 'static) {
        let nft = PathBuf::from("/usr/sbin/nft");
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipping: not root");
            return;
        }
        if !nft.exists() {
            eprintln!("skipping: {} missing", nft.display());
            return;
        }
        let handle = std::thread::spawn(move || {
            if let Err(e) = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET) {
                eprintln!("skipping: unshare(CLONE_NEWNET): {e}");
                return;
            }
            body(&nft);
        });
        if let Err(panic) = handle.join() {
            std::panic::resume_unwind(panic);
        }
    }

    /// Elements of per-tap set `set`, as nft text keys.
    fn set_keys(f: &Firewall, set: &str) -> Vec<String> {
        let json = f
            .nft_args("test", &["-j", "list", "table", "inet", &f.cfg.table])
            .unwrap();
        let mut keys: Vec<String> = f
            .parse_listing(&json)
            .unwrap()
            .into_iter()
            .filter(|e| e.set == set)
            .map(|e| e.key_text())
            .collect();
        keys.sort();
        keys
    }

    fn list_table(f: &Firewall) -> String {
        f.nft_args("test", &["list", "table", "inet", &f.cfg.table])
            .unwrap()
    }

    #[test]
    fn kernel_accepts_full_ruleset_in_check_mode() {
        in_private_netns(|nft| {
            for c in [cfg(), full_cfg()] {
                let f = Firewall::new(nft.to_path_buf(), c);
                f.check().unwrap();
            }
            let over = Firewall::new(
                nft.to_path_buf(),
                FirewallConfig {
                    allowed_private: vec!["0.0.0.0/0".parse().unwrap()],
                    egress_bytes_per_sec: MAX_BYTES_PER_SEC,
                    ingress_bytes_per_sec: 1,
                    max_connections: u32::MAX,
                    ..full_cfg()
                },
            );
            over.check().unwrap();
            // Check mode applied nothing.
            let tables = over.nft_args("test", &["list", "tables"]).unwrap();
            assert!(!tables.contains("moat"), "{tables}");
        });
    }

    #[test]
    fn lifecycle_in_private_netns() {
        in_private_netns(|nft| {
            let f = Firewall::new(nft.to_path_buf(), full_cfg());
            // Removing from / uninstalling a missing table is fine.
            f.uninstall().unwrap();
            f.remove(&nic(0, Scope::Public)).unwrap();

            f.install().unwrap();
            let a = nic(0, Scope::Public);
            let b = nic(1, Scope::Group);
            let c = nic(2, Scope::None);
            f.add(&a).unwrap();
            f.add(&b).unwrap();
            f.add(&c).unwrap();
            f.add(&a).unwrap(); // again: no error
            f.allow_pair("mtap0", "mtap1").unwrap();
            f.allow_pair("mtap1", "mtap0").unwrap(); // again
            f.allow_pair("mtap1", "mtap2").unwrap();

            let text = list_table(&f);
            assert!(text.contains("\"mtap0\" . 10.213.0.2"), "{text}");
            assert!(text.contains("\"mtap0\" . \"mtap1\""), "{text}");
            assert!(text.contains("ct count over 512"), "{text}");
            assert!(text.contains("192.168.7.0/24"), "{text}");
            assert_eq!(
                set_keys(&f, "guest_addr"),
                [
                    "\"mtap0\" . 10.213.0.2",
                    "\"mtap1\" . 10.213.0.6",
                    "\"mtap2\" . 10.213.0.10"
                ]
            );
            assert_eq!(
                set_keys(&f, "resolver_addr"),
                ["\"mtap0\" . 10.213.0.1", "\"mtap1\" . 10.213.0.5"]
            );
            assert_eq!(set_keys(&f, "scope_group"), ["\"mtap0\"", "\"mtap1\""]);
            assert_eq!(set_keys(&f, "scope_public"), ["\"mtap0\""]);
            assert!(set_keys(&f, "scope_any").is_empty());
            assert_eq!(set_keys(&f, "peers").len(), 4);

            // Re-adding with another scope replaces the memberships.
            f.add(&SandboxNic {
                scope: Scope::Any,
                ..b.clone()
            })
            .unwrap();
            assert_eq!(set_keys(&f, "scope_any"), ["\"mtap1\""]);
            assert_eq!(set_keys(&f, "scope_public"), ["\"mtap0\""]);
            f.add(&b).unwrap();
            assert!(set_keys(&f, "scope_any").is_empty());
            // A re-add starts without the pairs an earlier holder of the
            // name had.
            assert!(set_keys(&f, "peers").iter().all(|k| !k.contains("mtap1")));
            f.allow_pair("mtap1", "mtap2").unwrap();

            // Remove a: its elements and pairs go, the rest stays.
            f.remove(&a).unwrap();
            assert_eq!(
                set_keys(&f, "guest_addr"),
                ["\"mtap1\" . 10.213.0.6", "\"mtap2\" . 10.213.0.10"]
            );
            assert_eq!(set_keys(&f, "resolver_addr"), ["\"mtap1\" . 10.213.0.5"]);
            assert_eq!(set_keys(&f, "scope_group"), ["\"mtap1\""]);
            assert!(set_keys(&f, "scope_public").is_empty());
            assert_eq!(
                set_keys(&f, "peers"),
                ["\"mtap1\" . \"mtap2\"", "\"mtap2\" . \"mtap1\""]
            );
            assert!(!list_table(&f).contains("mtap0\""));
            f.remove(&a).unwrap(); // idempotent
            f.remove(&c).unwrap();
            assert!(set_keys(&f, "peers").is_empty());
            assert_eq!(set_keys(&f, "guest_addr"), ["\"mtap1\" . 10.213.0.6"]);

            // Install again: the table is replaced, elements are gone.
            f.install().unwrap();
            assert!(set_keys(&f, "guest_addr").is_empty());
            assert!(!list_table(&f).contains("\"mtap1\""));
            // A config change takes effect on reinstall.
            let g = Firewall::new(nft.to_path_buf(), cfg());
            g.install().unwrap();
            let text = list_table(&g);
            assert!(!text.contains("ct count"), "{text}");
            assert!(!text.contains("192.168.7.0/24"), "{text}");

            g.uninstall().unwrap();
            g.uninstall().unwrap();
            let tables = g.nft_args("test", &["list", "tables"]).unwrap();
            assert!(!tables.contains("moat"), "{tables}");
            // nft errors carry its stderr.
            match g.add(&b) {
                Err(FirewallError::Nft { stderr, .. }) => assert!(!stderr.is_empty()),
                other => panic!("add without a table: {other:?}"),
            }
        });
    }
}
