//! The broker's networking state: the firewall it installed at start, the
//! upstream resolvers, and which sandboxes of each namespace are on the
//! network (for `group` peers and their names). [`Networking::attach`] gives
//! one sandbox its tap, rules, resolver and published ports;
//! [`SandboxNetwork::detach`] takes all of it back.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::addressing::{self, NicAddressing};
use super::dns::{DnsLimits, DnsResponder, PeerLookup};
use super::firewall::{Firewall, FirewallConfig, SandboxNic, Scope};
use super::ports::{PortError, PortLimits, PublishedPort};
use super::tap;
use crate::config::NetworkConfig;

/// Why networking could not be set up, at broker start or for a sandbox.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error(transparent)]
    Conntrack(#[from] super::conntrack::ConntrackError),
    #[error("networking config: {0}")]
    Config(String),
    #[error("cannot enable IPv4 forwarding (/proc/sys/net/ipv4/ip_forward): {0}")]
    Forwarding(std::io::Error),
    #[error("firewall: {0}")]
    Firewall(#[from] super::firewall::FirewallError),
    #[error(transparent)]
    Tap(#[from] tap::TapError),
    #[error("DNS responder on {addr}: {source}")]
    Dns {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// The caller's fault (a port in use): reported as invalid params.
    #[error(transparent)]
    Port(#[from] PortError),
    #[error("slot {0} has no address in network.subnet")]
    NoAddress(u32),
}

impl NetworkError {
    /// Whether the caller can fix this by changing the request.
    pub fn is_caller_error(&self) -> bool {
        matches!(self, Self::Port(PortError::InUse { .. }))
    }
}

/// `config.ports` entry: a host port forwarded to a guest port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct PortMapping {
    pub host: u16,
    pub container: u16,
}

#[derive(Debug, Clone)]
struct Member {
    guest_addr: Ipv4Addr,
    ifname: String,
    scope: Scope,
}

type Registry = Arc<Mutex<BTreeMap<String, BTreeMap<String, Member>>>>;

/// Networking for the whole broker.
#[derive(Debug)]
pub struct Networking {
    cfg: NetworkConfig,
    firewall: Option<Arc<Firewall>>,
    upstreams: Vec<SocketAddr>,
    members: Registry,
    /// Held while a sandbox's registration and firewall elements change,
    /// so a peer pair is never added for a sandbox being taken down.
    changes: tokio::sync::Mutex<()>,
    /// Whether this broker owns IPv4 forwarding (turned it on, now or in an
    /// earlier run) and turns it off again at shutdown.
    owns_forwarding: Option<std::path::PathBuf>,
}

/// One sandbox's network: released by [`SandboxNetwork::detach`].
#[derive(Debug)]
pub struct SandboxNetwork {
    pub nic: NicAddressing,
    pub scope: Scope,
    pub ports: Vec<PortMapping>,
    namespace: String,
    name: String,
    tap: Option<OwnedFd>,
    _dns: Option<DnsResponder>,
    _published: Vec<PublishedPort>,
    /// Whether its firewall elements were added (and must be removed).
    in_firewall: bool,
}

impl SandboxNetwork {
    /// Not yet registered, firewalled or served.
    fn new(
        nic: NicAddressing,
        scope: Scope,
        ports: &[PortMapping],
        namespace: &str,
        name: &str,
        tap: Option<OwnedFd>,
    ) -> Self {
        Self {
            nic,
            scope,
            ports: ports.to_vec(),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            tap,
            _dns: None,
            _published: Vec::new(),
            in_firewall: false,
        }
    }

    /// What the firewall knows of this sandbox.
    fn firewall_nic(&self) -> SandboxNic {
        SandboxNic {
            ifname: self.nic.ifname.clone(),
            host_addr: self.nic.host_addr,
            guest_addr: self.nic.guest_addr,
            scope: self.scope,
        }
    }

    /// The tap fd, for the VM process (once).
    pub fn take_tap(&mut self) -> Option<OwnedFd> {
        self.tap.take()
    }

    /// Whether the guest may resolve names (a resolver runs for it).
    pub fn has_resolver(&self) -> bool {
        self.scope >= Scope::Group
    }
}

struct Peers {
    members: Registry,
    namespace: String,
    asking: String,
}

impl PeerLookup for Peers {
    fn lookup(&self, name: &str) -> Option<Ipv4Addr> {
        let members = self.members.lock().unwrap_or_else(|p| p.into_inner());
        let ns = members.get(&self.namespace)?;
        let me = ns.get(&self.asking)?;
        if me.scope < Scope::Group {
            return None;
        }
        // Names reach us lowercased; sandbox names keep their case.
        let peer = ns
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, m)| m)?;
        (peer.scope >= Scope::Group).then_some(peer.guest_addr)
    }
}

impl std::fmt::Debug for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Peers({}/{})", self.namespace, self.asking)
    }
}

const FORWARDING: &str = "/proc/sys/net/ipv4/ip_forward";

/// Turns on IPv4 forwarding. Returns whether moat owns it: it was off, or
/// `marker` says an earlier run of this broker turned it on (a restart must
/// keep the guard). Ownership is recorded in `marker`.
fn enable_forwarding(marker: &std::path::Path) -> Result<bool, NetworkError> {
    let now = std::fs::read_to_string(FORWARDING).map_err(NetworkError::Forwarding)?;
    if now.trim() == "1" {
        return Ok(marker.exists());
    }
    if let Some(dir) = marker.parent() {
        std::fs::create_dir_all(dir).map_err(NetworkError::Forwarding)?;
    }
    std::fs::write(marker, b"moat-broker turned on net.ipv4.ip_forward\n")
        .map_err(NetworkError::Forwarding)?;
    std::fs::write(FORWARDING, b"1").map_err(NetworkError::Forwarding)?;
    Ok(true)
}

impl Networking {
    /// Installs the firewall and turns on forwarding when the config lets
    /// any sandbox have a NIC; otherwise networking stays off.
    pub fn start(cfg: &NetworkConfig, state_dir: &std::path::Path) -> Result<Self, NetworkError> {
        let mut upstreams = cfg.dns_upstreams.clone();
        if upstreams.is_empty() {
            upstreams = std::fs::read_to_string("/etc/resolv.conf")
                .map(|t| super::nameservers(&t))
                .unwrap_or_default();
        }
        let marker = state_dir.join("network/ip_forward-enabled-by-moat");
        let mut owns_forwarding = None;
        let firewall = if cfg.enabled() {
            if !cfg.conntrack.is_file() {
                return Err(NetworkError::Config(format!(
                    "{} is missing: install conntrack (conntrack-tools), or turn networking off with max_scope = \"none\" and max_ports = 0",
                    cfg.conntrack.display()
                )));
            }
            let owned = enable_forwarding(&marker)?;
            let guard = owned && cfg.guard_forwarding;
            if guard {
                owns_forwarding = Some(marker);
            }
            let fw = Firewall::new(
                cfg.nft.clone(),
                FirewallConfig {
                    table: cfg.table.clone(),
                    iface_prefix: cfg.iface_prefix.clone(),
                    subnet: cfg.subnet,
                    allowed_private: cfg.allowed_private.clone(),
                    max_connections: cfg.max_connections,
                    egress_bytes_per_sec: cfg.egress_bytes_per_sec,
                    ingress_bytes_per_sec: cfg.ingress_bytes_per_sec,
                    guard_forwarding: guard,
                },
            );
            fw.install()?;
            tracing::info!(
                table = %cfg.table,
                subnet = %cfg.subnet,
                max_scope = %cfg.max_scope,
                upstreams = ?upstreams,
                guard_forwarding = guard,
                "guest networking on"
            );
            Some(Arc::new(fw))
        } else {
            tracing::info!("guest networking off (network.max_scope = \"none\", max_ports = 0)");
            None
        };
        Ok(Self {
            cfg: cfg.clone(),
            firewall,
            upstreams,
            members: Arc::default(),
            changes: tokio::sync::Mutex::new(()),
            owns_forwarding,
        })
    }

    /// Removes the firewall table (broker shutdown) and, when this broker
    /// turned IPv4 forwarding on, turns it off again.
    pub fn shutdown(&self) {
        if let Some(fw) = &self.firewall {
            if let Err(e) = fw.uninstall() {
                tracing::error!(error = %e, "removing the firewall table");
            }
        }
        if let Some(marker) = &self.owns_forwarding {
            match std::fs::write(FORWARDING, b"0") {
                Ok(()) => {
                    let _ = std::fs::remove_file(marker);
                    tracing::info!("IPv4 forwarding turned off again");
                }
                Err(e) => tracing::error!(error = %e, "turning IPv4 forwarding off"),
            }
        }
    }

    /// Gives a sandbox its NIC: tap, firewall elements, group pairs, DNS
    /// responder, published ports. Undoes everything on failure.
    pub async fn attach(
        &self,
        namespace: &str,
        name: &str,
        slot: u32,
        scope: Scope,
        ports: &[PortMapping],
    ) -> Result<SandboxNetwork, NetworkError> {
        let nic = addressing::for_slot(&self.cfg.subnet, &self.cfg.iface_prefix, slot)
            .ok_or(NetworkError::NoAddress(slot))?;
        // Flows an earlier holder of this address left must not carry over.
        let conntrack = self.cfg.conntrack.clone();
        let guest = nic.guest_addr;
        tokio::task::spawn_blocking(move || super::conntrack::forget(&conntrack, guest))
            .await
            .map_err(|e| NetworkError::Config(format!("conntrack task: {e}")))??;
        let tap_fd = tap::create(&nic)?;
        self.fill(SandboxNetwork::new(
            nic,
            scope,
            ports,
            namespace,
            name,
            Some(tap_fd),
        ))
        .await
    }

    /// Takes back the network of a re-adopted VM, whose tap still exists
    /// (its VM process holds it): firewall elements, group pairs, DNS
    /// responder and published ports, as `attach` made them.
    pub async fn adopt(
        &self,
        namespace: &str,
        name: &str,
        slot: u32,
        scope: Scope,
        ports: &[PortMapping],
    ) -> Result<SandboxNetwork, NetworkError> {
        let nic = addressing::for_slot(&self.cfg.subnet, &self.cfg.iface_prefix, slot)
            .ok_or(NetworkError::NoAddress(slot))?;
        if !std::path::Path::new("/sys/class/net")
            .join(&nic.ifname)
            .exists()
        {
            return Err(NetworkError::Config(format!(
                "tap {} of the re-adopted VM is gone",
                nic.ifname
            )));
        }
        self.fill(SandboxNetwork::new(
            nic, scope, ports, namespace, name, None,
        ))
        .await
    }

    /// Registers, firewalls and serves `net`; undoes it all on failure.
    async fn fill(&self, mut net: SandboxNetwork) -> Result<SandboxNetwork, NetworkError> {
        let filled = {
            let _changes = self.changes.lock().await;
            self.register(&mut net).await
        };
        let filled = match filled {
            Ok(()) => self.serve(&mut net).await,
            Err(e) => Err(e),
        };
        match filled {
            Ok(()) => Ok(net),
            Err(e) => {
                if let Err(cleanup) = net.detach(self).await {
                    tracing::error!(%cleanup, "network cleanup after a failed attach");
                }
                Err(e)
            }
        }
    }

    /// Registers the sandbox and adds its firewall elements and group
    /// pairs (caller holds `changes`).
    async fn register(&self, net: &mut SandboxNetwork) -> Result<(), NetworkError> {
        let fw_nic = net.firewall_nic();
        // Peers to pair with, and the registration, under one lock so two
        // concurrent starts in a namespace see each other.
        let peers: Vec<String> = {
            let mut members = self.members.lock().unwrap_or_else(|p| p.into_inner());
            let ns = members.entry(net.namespace.clone()).or_default();
            let peers = if net.scope >= Scope::Group {
                ns.iter()
                    .filter(|(n, m)| **n != net.name && m.scope >= Scope::Group)
                    .map(|(_, m)| m.ifname.clone())
                    .collect()
            } else {
                Vec::new()
            };
            ns.insert(
                net.name.clone(),
                Member {
                    guest_addr: net.nic.guest_addr,
                    ifname: net.nic.ifname.clone(),
                    scope: net.scope,
                },
            );
            peers
        };
        if let Some(fw) = &self.firewall {
            let fw = fw.clone();
            let me = net.nic.ifname.clone();
            net.in_firewall = true;
            tokio::task::spawn_blocking(move || {
                fw.add(&fw_nic)?;
                for p in &peers {
                    fw.allow_pair(&me, p)?;
                }
                Ok::<(), super::firewall::FirewallError>(())
            })
            .await
            .map_err(|e| NetworkError::Config(format!("firewall task: {e}")))??;
        }
        Ok(())
    }

    /// Starts the sandbox's DNS responder and published ports.
    async fn serve(&self, net: &mut SandboxNetwork) -> Result<(), NetworkError> {
        if net.has_resolver() {
            let addr = SocketAddr::new(net.nic.host_addr.into(), 53);
            let peers = Arc::new(Peers {
                members: self.members.clone(),
                namespace: net.namespace.clone(),
                asking: net.name.clone(),
            });
            let forward = net.scope >= Scope::Public;
            let dns = DnsResponder::bind(
                addr,
                Some(net.nic.ifname.as_str()),
                peers,
                self.upstreams.clone(),
                forward,
                DnsLimits {
                    upstream_timeout: Duration::from_secs(3),
                    max_in_flight: 64,
                },
            )
            .await
            .map_err(|source| NetworkError::Dns { addr, source })?;
            net._dns = Some(dns);
        }
        for p in &net.ports {
            let bind = SocketAddr::new(self.cfg.port_bind_address, p.host);
            let target = SocketAddr::new(net.nic.guest_addr.into(), p.container);
            let published = PublishedPort::publish(
                bind,
                target,
                PortLimits {
                    max_connections: self.cfg.max_port_connections as usize,
                    connect_timeout: Duration::from_secs(5),
                },
            )
            .await?;
            net._published.push(published);
        }
        Ok(())
    }

    /// The nameserver the guest should use, when it has one.
    pub fn nameservers(&self, net: &SandboxNetwork) -> Vec<String> {
        if net.has_resolver() {
            vec![net.nic.host_addr.to_string()]
        } else {
            Vec::new()
        }
    }
}

impl SandboxNetwork {
    /// Releases the sandbox's ports, resolver, rules, registration and
    /// connection-tracking entries. The tap disappears with the last fd
    /// (the VM process's). An error means something may be left: the caller
    /// keeps the slot.
    pub async fn detach(mut self, networking: &Networking) -> Result<(), NetworkError> {
        self._published.clear();
        self._dns = None;
        self.tap = None;
        let _changes = networking.changes.lock().await;
        {
            let mut members = networking.members.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(ns) = members.get_mut(&self.namespace) {
                if ns
                    .get(&self.name)
                    .is_some_and(|m| m.ifname == self.nic.ifname)
                {
                    ns.remove(&self.name);
                }
                if ns.is_empty() {
                    members.remove(&self.namespace);
                }
            }
        }
        if self.in_firewall {
            if let Some(fw) = networking.firewall.clone() {
                let nic = self.firewall_nic();
                tokio::task::spawn_blocking(move || fw.remove(&nic))
                    .await
                    .map_err(|e| NetworkError::Config(format!("firewall task: {e}")))??;
            }
        }
        let conntrack = networking.cfg.conntrack.clone();
        let guest = self.nic.guest_addr;
        tokio::task::spawn_blocking(move || super::conntrack::forget(&conntrack, guest))
            .await
            .map_err(|e| NetworkError::Config(format!("conntrack task: {e}")))??;
        Ok(())
    }
}
