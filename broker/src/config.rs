//! Broker configuration: parsed from TOML into typed structs (unknown fields
//! are errors), then checked by [`BrokerConfig::validate`]. Every limit the
//! broker enforces is a named field here with its default.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::network::firewall::{Ipv4Net, Scope};

mod lifecycle;
mod pool;
pub use lifecycle::{LifecycleConfig, NamespaceLifetimes};
pub use pool::{PoolConfig, PoolEntry, WARM_LANGUAGES};

/// Errors loading or checking the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config {path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// The whole broker configuration (`/etc/moat/broker.toml`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// gRPC socket the gateway connects to. Its directory is made 0750 and
    /// the socket 0660, both group `gateway_gid`.
    pub socket: PathBuf,
    /// Operator socket (`moat sandbox ls|rm`): mode 0600, root peers only.
    /// Default: `admin.sock` beside `socket`.
    pub admin_socket: Option<PathBuf>,
    /// The gateway's user by name (e.g. "moat", made by the package's
    /// sysusers.d entry): sets `gateway_uid` and `gateway_gid` from the
    /// user database when the config is loaded. Give either this or both ids.
    pub gateway_user: Option<String>,
    /// The only uid allowed to talk to the broker (checked with SO_PEERCRED).
    pub gateway_uid: u32,
    /// Group owning the socket and its directory.
    pub gateway_gid: u32,
    /// Broker state: per-VM directories (writable disks, agent sockets) and
    /// the generated initramfs.
    pub state_dir: PathBuf,
    pub boot: BootConfig,
    pub images: ImagesConfig,
    pub vmm: VmmConfig,
    pub limits: Limits,
    pub sandbox_ids: IdRange,
    pub cgroups: CgroupConfig,
    pub testing: TestingConfig,
    pub jail: JailConfig,
    pub volumes: VolumesConfig,
    pub network: NetworkConfig,
    pub lifecycle: LifecycleConfig,
    pub pool: PoolConfig,
    /// Per registry host (`"ghcr.io"`, `"127.0.0.1:5000"`): plain HTTP
    /// allowed, credentials.
    pub registries: BTreeMap<String, crate::images::registry::RegistryConfig>,
}

/// Where volume host paths may come from (`config.volumes`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VolumesConfig {
    /// Holds one directory per namespace; a relative host path is resolved
    /// inside its namespace's directory.
    pub dir: PathBuf,
    /// Absolute host paths are accepted only beneath these directories
    /// (none by default).
    pub allowed_roots: Vec<PathBuf>,
    /// Most volumes per sandbox.
    pub max_volumes: u32,
    /// Who owns what sandboxes write into volumes: the VM process of a
    /// sandbox with volumes runs as this uid/gid (never root; outside
    /// `sandbox_ids`), so files appear on the host owned by it.
    pub owner_uid: u32,
    pub owner_gid: u32,
}

/// Guest networking (`config.scope`, `config.ports`): see docs/networking.md.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkConfig {
    /// Scope of a sandbox whose config names none: "none", "group",
    /// "public" or "any".
    pub default_scope: Scope,
    /// Widest scope a caller may ask for.
    pub max_scope: Scope,
    /// Each sandbox with a NIC gets a /30 of this subnet, by slot; it must
    /// hold 4 addresses per `sandbox_ids.count`.
    pub subnet: Ipv4Net,
    /// Tap devices are named `<iface_prefix><slot>` (1-8 of [a-z0-9]).
    pub iface_prefix: String,
    /// The broker's nftables table (`inet <table>`).
    pub table: String,
    /// The nft binary.
    pub nft: PathBuf,
    /// The conntrack binary (conntrack-tools): a reused slot's old flows are
    /// deleted with it.
    pub conntrack: PathBuf,
    /// Private ranges (CIDR) that `public` sandboxes may reach anyway.
    pub allowed_private: Vec<Ipv4Net>,
    /// Upstream resolvers (`ip` or `ip:port`) for sandboxes that may reach
    /// the internet; empty: the `nameserver`s of the host's
    /// /etc/resolv.conf, read at broker start.
    #[serde(deserialize_with = "upstreams")]
    pub dns_upstreams: Vec<std::net::SocketAddr>,
    /// Connections forwarded from one sandbox at once.
    pub max_connections: u32,
    /// Bytes per second one sandbox may send / receive through the host
    /// (0: unlimited).
    pub egress_bytes_per_sec: u64,
    pub ingress_bytes_per_sec: u64,
    /// When the broker had to turn on IPv4 forwarding, drop forwarded
    /// traffic that involves none of its taps (the host stays no router).
    pub guard_forwarding: bool,
    /// Address published ports listen on.
    pub port_bind_address: std::net::IpAddr,
    /// Host ports a sandbox may publish: `port_min..=port_max` (default
    /// 8000-8999). Choose a range no local service uses: a published port
    /// takes any free port in it.
    pub port_min: u16,
    pub port_max: u16,
    /// Most published ports per sandbox.
    pub max_ports: u32,
    /// Connections one published port carries at once.
    pub max_port_connections: u32,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            default_scope: Scope::None,
            max_scope: Scope::Public,
            subnet: Ipv4Net {
                addr: std::net::Ipv4Addr::new(10, 213, 0, 0),
                prefix: 16,
            },
            iface_prefix: "mtap".into(),
            table: "moat".into(),
            nft: PathBuf::from("/usr/sbin/nft"),
            conntrack: PathBuf::from("/usr/sbin/conntrack"),
            allowed_private: Vec::new(),
            dns_upstreams: Vec::new(),
            max_connections: 512,
            egress_bytes_per_sec: 64 << 20,
            ingress_bytes_per_sec: 64 << 20,
            guard_forwarding: true,
            port_bind_address: std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            port_min: 8000,
            port_max: 8999,
            max_ports: 16,
            max_port_connections: 256,
        }
    }
}

impl Default for VolumesConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("/var/lib/moat/volumes"),
            allowed_roots: Vec::new(),
            max_volumes: 16,
            owner_uid: 1_899_999_999,
            owner_gid: 1_899_999_999,
        }
    }
}

/// How VM processes are confined.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JailConfig {
    /// The `moat-jailer` binary; default: next to `moat-broker`.
    pub jailer: Option<PathBuf>,
    /// DEVELOPMENT ONLY: run VM processes without namespaces, pivot_root,
    /// rlimits or the seccomp filter (uid, cgroup and no_new_privs remain).
    /// Logged loudly at start and at every sandbox start.
    pub development_unjailed: bool,
}

/// Switches for the project's own test suites; all off in production.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TestingConfig {
    /// Lets guest agents honour `moat-test-hook` commands that make them
    /// misbehave on purpose (oversized frames, garbage, stalls).
    pub agent_hooks: bool,
}

/// What every VM boots.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BootConfig {
    /// PVH-enabled ELF guest kernel (`packaging/kernel/build.sh`).
    pub kernel: PathBuf,
    /// Static `moat-agent` binary; the broker packs it into the initramfs as `/init`.
    pub agent: PathBuf,
}

/// Images: the OCI store and how it fills, plus operator-provided disks.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImagesConfig {
    /// Image used when `config.image` is absent (a `[images.local]` name or
    /// an OCI reference).
    pub default: String,
    /// Prebuilt boot disks by name (erofs or ext4 files), used as they are;
    /// looked up before the store.
    pub local: BTreeMap<String, PathBuf>,
    /// The OCI image store (blobs, names, boot disks).
    pub store: PathBuf,
    /// Pull an image missing from the store when a sandbox asks for it.
    pub pull_on_start: bool,
    /// How long a pull during `sandbox.start` may take.
    pub pull_timeout_secs: u32,
    /// Layers downloaded at once per pull.
    pub concurrent_downloads: u32,
    /// Pulls running at once; more wait their turn.
    pub concurrent_pulls: u32,
    /// Registries a `sandbox.start` may pull from (`"docker.io"`,
    /// `"ghcr.io"`, ...); empty: any. `moat image pull` is not limited.
    pub allowed_registries: Vec<String>,
    pub max_layers: u32,
    /// Largest compressed layer.
    pub max_layer_bytes: u64,
    /// Largest image, uncompressed (all layers' tar streams).
    pub max_image_bytes: u64,
    /// Largest single file in an image.
    pub max_file_bytes: u64,
    /// Most tar entries in an image (all layers).
    pub max_entries: u64,
}

impl ImagesConfig {
    pub fn limits(&self) -> crate::images::ImageLimits {
        crate::images::ImageLimits {
            allowed_registries: self.allowed_registries.clone(),
            concurrent_pulls: self.concurrent_pulls as usize,
            max_layers: self.max_layers as usize,
            max_layer_bytes: self.max_layer_bytes,
            concurrent_downloads: self.concurrent_downloads as usize,
            unpack: crate::images::unpack::UnpackLimits {
                max_total_bytes: self.max_image_bytes,
                max_file_bytes: self.max_file_bytes,
                max_entries: self.max_entries,
            },
        }
    }
}

/// VM backend settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VmmConfig {
    /// `auto` (libkrun where /dev/kvm is hardware KVM, else QEMU),
    /// `libkrun` or `qemu`.
    pub backend: String,
    /// QEMU's accelerator: `auto` (KVM when the host has hardware
    /// virtualisation, else TCG), `kvm` or `tcg`.
    pub accel: String,
    /// The QEMU binary.
    pub qemu: PathBuf,
    /// The libkrun runner `moat-vmm`; default: next to `moat-broker`.
    pub runner: Option<PathBuf>,
}

/// Limits on what a request may ask for, and bounds on how long things take.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub default_memory_mib: u32,
    pub max_memory_mib: u32,
    pub default_cpus: u32,
    pub max_cpus: u32,
    /// Most sandboxes running at once on this broker.
    pub max_sandboxes: u32,
    /// Most sandboxes running at once in one namespace.
    pub max_sandboxes_per_namespace: u32,
    /// Size of each sandbox's writable disk (its disk quota).
    pub writable_disk_mib: u32,
    /// Disk throughput caps per sandbox, bytes per second (0: no cap),
    /// applied by the VMM to every guest disk and by the cgroup's I/O
    /// controller on the host devices holding them.
    pub disk_read_bps: u64,
    pub disk_write_bps: u64,
    /// Disk operation-rate caps per sandbox, per second (0: no cap).
    pub disk_read_iops: u64,
    pub disk_write_iops: u64,
    /// Host memory the VMM process itself needs on top of guest RAM; the
    /// cgroup memory limit is guest RAM + this.
    pub vmm_overhead_mib: u32,
    /// Most processes/threads in a VM process's cgroup.
    pub vmm_pids_max: u32,
    /// Most processes/threads the sandbox's own code may have inside the
    /// guest (its workload cgroup's `pids.max`); the guest agent keeps
    /// the rest of the guest's pids, so a fork bomb cannot starve it.
    pub guest_pids_max: u32,
    /// How long a guest may take to answer after its VM process starts.
    pub boot_timeout_secs: u32,
    /// How long a graceful stop may take before the VM process is killed.
    pub stop_timeout_secs: u32,
    pub default_command_timeout_secs: u32,
    pub max_command_timeout_secs: u32,
    /// Output kept per command; more is dropped and counted.
    pub max_output_bytes: u64,
    /// Largest frame accepted from a guest agent.
    pub max_agent_frame_bytes: u32,
    /// Longest `command` + `args` + `envs` accepted, in bytes.
    pub max_request_bytes: u32,
    /// Largest REPL cell accepted, in bytes.
    pub max_code_bytes: u32,
    /// Most `command.run`/`repl.run` calls in flight per sandbox; more are
    /// refused (`-32000`) until one finishes.
    pub max_calls_per_sandbox: u32,
    /// Most sandbox starts in progress at once (image pulls and boots);
    /// more are refused (`-32000`, retry shortly) rather than queued.
    pub max_starts_in_progress: u32,
    /// Most `scripts` entries per sandbox; their total size counts against
    /// `max_request_bytes`.
    pub max_scripts: u32,
    /// Output of the background `exec`/`start` process kept in the guest
    /// (`/.sandbox/logs/background.log`).
    pub background_log_bytes: u64,
}

/// Each running sandbox gets a unique uid/gid `base + slot`, slot < count.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdRange {
    pub base: u32,
    pub count: u32,
}

/// Where sandbox cgroups live.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CgroupConfig {
    /// Mount point of the cgroup filesystem(s).
    pub root: PathBuf,
    /// Sub-directory (v2) or per-controller sub-directory (v1) for moat.
    pub parent: String,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            socket: PathBuf::from("/run/moat/broker.sock"),
            admin_socket: None,
            gateway_user: None,
            gateway_uid: 0,
            gateway_gid: 0,
            state_dir: PathBuf::from("/var/lib/moat"),
            boot: BootConfig::default(),
            images: ImagesConfig::default(),
            vmm: VmmConfig::default(),
            limits: Limits::default(),
            sandbox_ids: IdRange::default(),
            cgroups: CgroupConfig::default(),
            testing: TestingConfig::default(),
            jail: JailConfig::default(),
            volumes: VolumesConfig::default(),
            network: NetworkConfig::default(),
            lifecycle: LifecycleConfig::default(),
            pool: PoolConfig::default(),
            registries: BTreeMap::new(),
        }
    }
}

impl Default for BootConfig {
    fn default() -> Self {
        Self {
            kernel: PathBuf::from("/usr/lib/moat/vmlinux"),
            agent: PathBuf::from("/usr/lib/moat/moat-agent"),
        }
    }
}

impl Default for ImagesConfig {
    fn default() -> Self {
        Self {
            default: "base".into(),
            local: BTreeMap::new(),
            store: PathBuf::from("/var/lib/moat/images"),
            pull_on_start: true,
            pull_timeout_secs: 900,
            concurrent_downloads: 3,
            concurrent_pulls: 2,
            allowed_registries: Vec::new(),
            max_layers: 128,
            max_layer_bytes: 4 << 30,
            max_image_bytes: 8 << 30,
            max_file_bytes: 4 << 30,
            max_entries: 1_000_000,
        }
    }
}

impl Default for VmmConfig {
    fn default() -> Self {
        Self {
            backend: "auto".into(),
            accel: "auto".into(),
            qemu: PathBuf::from("/usr/bin/qemu-system-x86_64"),
            runner: None,
        }
    }
}

/// Whether `p` is absolute and has no `..` component.
fn absolute_without_dotdot(p: &std::path::Path) -> bool {
    p.is_absolute() && !p.components().any(|c| c == std::path::Component::ParentDir)
}

/// Bounds of `limits.guest_pids_max`: enough for a shell pipeline, and
/// below the guest kernel's `pid_max` so the agent always has pids left.
pub const GUEST_PIDS_MIN: u32 = 16;
pub const GUEST_PIDS_MAX: u32 = 32_000;

impl Default for Limits {
    fn default() -> Self {
        Self {
            default_memory_mib: 512,
            max_memory_mib: 4096,
            default_cpus: 1,
            max_cpus: 4,
            max_sandboxes: 32,
            max_sandboxes_per_namespace: 16,
            writable_disk_mib: 1024,
            disk_read_bps: 256 << 20,
            disk_write_bps: 256 << 20,
            disk_read_iops: 10_000,
            disk_write_iops: 10_000,
            vmm_overhead_mib: 256,
            vmm_pids_max: 256,
            guest_pids_max: 4096,
            boot_timeout_secs: 60,
            stop_timeout_secs: 10,
            default_command_timeout_secs: 30,
            max_command_timeout_secs: 3600,
            max_output_bytes: 1 << 20,
            max_agent_frame_bytes: 16 << 20,
            max_request_bytes: 256 << 10,
            max_code_bytes: 1 << 20,
            max_calls_per_sandbox: 16,
            max_starts_in_progress: 8,
            max_scripts: 32,
            background_log_bytes: 1 << 20,
        }
    }
}

impl Default for IdRange {
    fn default() -> Self {
        Self {
            base: 1_900_000_000,
            count: 4096,
        }
    }
}

impl Default for CgroupConfig {
    fn default() -> Self {
        Self {
            root: PathBuf::from("/sys/fs/cgroup"),
            parent: "moat".into(),
        }
    }
}

/// `dns_upstreams` entries: `ip` (port 53) or `ip:port`.
fn upstreams<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Vec<std::net::SocketAddr>, D::Error> {
    Vec::<String>::deserialize(d)?
        .iter()
        .map(|u| {
            crate::network::parse_upstream(u).ok_or_else(|| {
                serde::de::Error::custom(format!("{u:?}: give an IP address or ip:port"))
            })
        })
        .collect()
}

impl NetworkConfig {
    /// Whether this server gives any sandbox a NIC.
    pub fn enabled(&self) -> bool {
        self.max_scope != Scope::None || self.max_ports > 0
    }

    fn validate(&self, ids: &IdRange) -> Result<(), String> {
        let (default, max) = (self.default_scope, self.max_scope);
        if default > max {
            return Err(format!(
                "network.default_scope {default} is wider than network.max_scope {max}"
            ));
        }
        let subnet = self.subnet;
        if crate::network::addressing::capacity(&subnet) < u64::from(ids.count) {
            return Err(format!(
                "network.subnet {subnet} has room for {} sandboxes but sandbox_ids.count is {}: use a larger subnet (4 addresses per sandbox) or fewer ids",
                crate::network::addressing::capacity(&subnet),
                ids.count
            ));
        }
        let max_slot_len = ids.count.saturating_sub(1).to_string().len();
        if self.iface_prefix.is_empty()
            || self.iface_prefix.len() + max_slot_len > 15
            || !self
                .iface_prefix
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
            || !self.iface_prefix.as_bytes()[0].is_ascii_lowercase()
        {
            return Err(format!(
                "network.iface_prefix {:?}: use lowercase letters and digits, starting with a letter, short enough that prefix + slot number fits 15 bytes",
                self.iface_prefix
            ));
        }
        if self.table.is_empty()
            || self.table.len() > 32
            || !self
                .table
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            return Err(format!(
                "network.table {:?}: use 1-32 letters, digits or '_'",
                self.table
            ));
        }
        if !self.nft.is_absolute() {
            return Err(format!(
                "network.nft {:?} must be an absolute path",
                self.nft
            ));
        }
        if self.port_min == 0 || self.port_min > self.port_max {
            return Err(format!(
                "network.port_min {} and port_max {} must form a range of ports above 0",
                self.port_min, self.port_max
            ));
        }
        if self.max_connections == 0 || self.max_port_connections == 0 {
            return Err("network.max_connections and max_port_connections must be above 0".into());
        }
        Ok(())
    }
}

impl Limits {
    /// Why a VM of `memory_mib` and `cpus` is refused (a request's or a
    /// pool entry's), or `None`.
    pub fn size_problem(&self, memory_mib: u32, cpus: u32) -> Option<String> {
        if memory_mib < 64 || memory_mib > self.max_memory_mib {
            return Some(format!(
                "memory {memory_mib} MiB is outside the allowed range 64..={} MiB",
                self.max_memory_mib
            ));
        }
        if cpus == 0 || cpus > self.max_cpus {
            return Some(format!(
                "cpus {cpus} is outside the allowed range 1..={}",
                self.max_cpus
            ));
        }
        None
    }

    /// The disk caps as one value.
    pub fn disk_io(&self) -> crate::disk::DiskIo {
        crate::disk::DiskIo {
            read_bps: self.disk_read_bps,
            write_bps: self.disk_write_bps,
            read_iops: self.disk_read_iops,
            write_iops: self.disk_write_iops,
        }
    }
}

impl BrokerConfig {
    /// Reads and parses a TOML file (does not validate).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config = Self::parse(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })?;
        config
            .resolve_gateway_user()
            .map_err(|m| ConfigError::Invalid(format!("{}: {m}", path.display())))?;
        Ok(config)
    }

    /// Fills `gateway_uid`/`gateway_gid` from `gateway_user`, if set.
    fn resolve_gateway_user(&mut self) -> Result<(), String> {
        let Some(name) = &self.gateway_user else {
            return Ok(());
        };
        if self.gateway_uid != 0 || self.gateway_gid != 0 {
            return Err("give gateway_user or gateway_uid/gateway_gid, not both".into());
        }
        let user = nix::unistd::User::from_name(name)
            .map_err(|e| format!("gateway_user {name:?}: {e}"))?
            .ok_or_else(|| {
                format!(
                    "gateway_user {name:?} does not exist: create it (systemd-sysusers, or useradd --system {name}) or set gateway_uid and gateway_gid"
                )
            })?;
        self.gateway_uid = user.uid.as_raw();
        self.gateway_gid = user.gid.as_raw();
        Ok(())
    }

    /// Parses TOML text (does not validate).
    pub fn parse(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    /// Where the operator socket is.
    pub fn admin_socket(&self) -> PathBuf {
        self.admin_socket.clone().unwrap_or_else(|| {
            self.socket
                .parent()
                .map(|d| d.join("admin.sock"))
                .unwrap_or_else(|| PathBuf::from("/run/moat/admin.sock"))
        })
    }

    /// Checks values against each other and against what the code can do.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        let l = &self.limits;
        if !self.socket.is_absolute() || self.socket.parent().is_none() {
            return bad(format!("socket {:?} must be an absolute path", self.socket));
        }
        if self.socket.as_os_str().len() > 100 {
            return bad(format!(
                "socket path {:?} is too long for a Unix socket",
                self.socket
            ));
        }
        let admin = self.admin_socket();
        if !admin.is_absolute() || admin.as_os_str().len() > 100 || admin == self.socket {
            return bad(format!(
                "admin_socket {admin:?} must be an absolute path under 100 bytes, other than socket"
            ));
        }
        if !self.state_dir.is_absolute() {
            return bad(format!("state_dir {:?} must be absolute", self.state_dir));
        }
        self.lifecycle.validate().map_err(ConfigError::Invalid)?;
        self.pool
            .validate(&self.limits, self.sandbox_ids.count)
            .map_err(ConfigError::Invalid)?;
        if let Some(socket_dir) = self.socket.parent() {
            if self.state_dir.starts_with(socket_dir) {
                return bad(format!(
                    "state_dir {:?} lies inside the socket's directory {:?}, which is made 0750 for the gateway's group: VM processes could not reach their files; use separate directories",
                    self.state_dir, socket_dir
                ));
            }
        }
        if self.state_dir.as_os_str().len() > 80 {
            return bad(format!(
                "state_dir {:?} is too long: per-VM sockets live under it (keep it under 80 bytes)",
                self.state_dir
            ));
        }
        if self.gateway_uid == 0 {
            return bad("gateway_uid must be an unprivileged uid, not 0".into());
        }
        for (name, v) in [
            ("default_memory_mib", l.default_memory_mib),
            ("max_memory_mib", l.max_memory_mib),
            ("default_cpus", l.default_cpus),
            ("max_cpus", l.max_cpus),
            ("max_sandboxes", l.max_sandboxes),
            ("max_sandboxes_per_namespace", l.max_sandboxes_per_namespace),
            ("writable_disk_mib", l.writable_disk_mib),
            ("vmm_pids_max", l.vmm_pids_max),
            ("boot_timeout_secs", l.boot_timeout_secs),
            ("stop_timeout_secs", l.stop_timeout_secs),
            (
                "default_command_timeout_secs",
                l.default_command_timeout_secs,
            ),
            ("max_command_timeout_secs", l.max_command_timeout_secs),
            ("max_agent_frame_bytes", l.max_agent_frame_bytes),
            ("max_request_bytes", l.max_request_bytes),
            ("max_code_bytes", l.max_code_bytes),
            ("max_calls_per_sandbox", l.max_calls_per_sandbox),
            ("max_starts_in_progress", l.max_starts_in_progress),
        ] {
            if v == 0 {
                return bad(format!("limits.{name} must be greater than 0"));
            }
        }
        if !(GUEST_PIDS_MIN..=GUEST_PIDS_MAX).contains(&l.guest_pids_max) {
            return bad(format!(
                "limits.guest_pids_max must be between {GUEST_PIDS_MIN} and {GUEST_PIDS_MAX} (the guest kernel's pid range)"
            ));
        }
        if l.default_memory_mib > l.max_memory_mib {
            return bad("limits.default_memory_mib exceeds limits.max_memory_mib".into());
        }
        if l.default_memory_mib < 64 {
            return bad("limits.default_memory_mib must be at least 64".into());
        }
        if l.default_cpus > l.max_cpus {
            return bad("limits.default_cpus exceeds limits.max_cpus".into());
        }
        if l.default_command_timeout_secs > l.max_command_timeout_secs {
            return bad(
                "limits.default_command_timeout_secs exceeds limits.max_command_timeout_secs"
                    .into(),
            );
        }
        if l.max_output_bytes == 0 || l.max_output_bytes >= u64::from(l.max_agent_frame_bytes) {
            return bad(
                "limits.max_output_bytes must be above 0 and below limits.max_agent_frame_bytes"
                    .into(),
            );
        }
        if l.max_code_bytes >= l.max_agent_frame_bytes / 2 {
            return bad(
                "limits.max_code_bytes must be below half of limits.max_agent_frame_bytes".into(),
            );
        }
        if self.sandbox_ids.count == 0 || self.sandbox_ids.base < 1000 {
            return bad("sandbox_ids: base must be >= 1000 and count > 0".into());
        }
        if self
            .sandbox_ids
            .base
            .checked_add(self.sandbox_ids.count)
            .is_none_or(|end| end == u32::MAX)
        {
            return bad("sandbox_ids: base + count overflows the uid space".into());
        }
        let ids = self.sandbox_ids.base..self.sandbox_ids.base + self.sandbox_ids.count;
        if ids.contains(&self.gateway_uid) {
            return bad("gateway_uid lies inside the sandbox_ids range".into());
        }
        if !matches!(self.vmm.backend.as_str(), "auto" | "libkrun" | "qemu") {
            return bad(format!(
                "vmm.backend {:?}: use \"auto\", \"libkrun\" or \"qemu\"",
                self.vmm.backend
            ));
        }
        if let Some(runner) = &self.vmm.runner {
            if !absolute_without_dotdot(runner) {
                return bad(format!(
                    "vmm.runner {runner:?} must be an absolute path without '..'"
                ));
            }
        }
        if !matches!(self.vmm.accel.as_str(), "auto" | "kvm" | "tcg") {
            return bad(format!(
                "vmm.accel {:?}: use \"auto\", \"kvm\" or \"tcg\"",
                self.vmm.accel
            ));
        }
        let qemu = &self.vmm.qemu;
        if !absolute_without_dotdot(qemu) {
            return bad(format!(
                "vmm.qemu {qemu:?} must be an absolute path without '..'"
            ));
        }
        if !self.jail.development_unjailed && !qemu.starts_with("/usr") {
            return bad(format!(
                "vmm.qemu {qemu:?} is outside /usr, the only host directory a jailed VM process sees; install QEMU under /usr"
            ));
        }
        for (what, p) in std::iter::once(("volumes.dir", &self.volumes.dir)).chain(
            self.volumes
                .allowed_roots
                .iter()
                .map(|r| ("volumes.allowed_roots", r)),
        ) {
            if !absolute_without_dotdot(p) {
                return bad(format!(
                    "{what} {p:?} must be an absolute path without '..'"
                ));
            }
            if p == Path::new("/") {
                return bad(format!("{what} cannot be /: it would share the whole host"));
            }
        }
        for root in &self.volumes.allowed_roots {
            for (what, other) in [
                ("state_dir", &self.state_dir),
                ("volumes.dir", &self.volumes.dir),
                ("images.store", &self.images.store),
            ] {
                if root.starts_with(other) || other.starts_with(root) {
                    return bad(format!(
                        "volumes.allowed_roots entry {root:?} overlaps {what} {other:?}: sandboxes could mount moat's own state; use a separate directory"
                    ));
                }
            }
        }
        let v = &self.volumes;
        if v.owner_uid == 0 || v.owner_gid == 0 {
            return bad("volumes.owner_uid and owner_gid must not be 0: files sandboxes write never belong to root".into());
        }
        if ids.contains(&v.owner_uid) || v.owner_uid == self.gateway_uid {
            return bad(
                "volumes.owner_uid must be outside sandbox_ids and differ from gateway_uid".into(),
            );
        }
        self.network
            .validate(&self.sandbox_ids)
            .map_err(ConfigError::Invalid)?;
        if !self.images.local.contains_key(&self.images.default)
            && crate::images::Reference::parse(&self.images.default).is_err()
        {
            return bad(format!(
                "images.default {:?} is neither listed in [images.local] nor an image reference",
                self.images.default
            ));
        }
        if !self.images.store.is_absolute() {
            return bad(format!(
                "images.store {:?} must be an absolute path",
                self.images.store
            ));
        }
        for (name, v) in [
            (
                "images.pull_timeout_secs",
                u64::from(self.images.pull_timeout_secs),
            ),
            (
                "images.concurrent_downloads",
                u64::from(self.images.concurrent_downloads),
            ),
            (
                "images.concurrent_pulls",
                u64::from(self.images.concurrent_pulls),
            ),
            ("images.max_layers", u64::from(self.images.max_layers)),
            ("images.max_layer_bytes", self.images.max_layer_bytes),
            ("images.max_image_bytes", self.images.max_image_bytes),
            ("images.max_file_bytes", self.images.max_file_bytes),
            ("images.max_entries", self.images.max_entries),
        ] {
            if v == 0 {
                return bad(format!("{name} must be greater than 0"));
            }
        }
        for (host, r) in &self.registries {
            if r.username.is_some() != r.password_file.is_some() {
                return bad(format!(
                    "registries.\"{host}\": set both username and password_file, or neither"
                ));
            }
            if r.password_file.as_ref().is_some_and(|p| !p.is_absolute()) {
                return bad(format!(
                    "registries.\"{host}\".password_file must be an absolute path"
                ));
            }
        }
        if self.cgroups.parent.is_empty()
            || self
                .cgroups
                .parent
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == "..")
        {
            return bad(format!(
                "cgroups.parent {:?} must be a relative path without '.' or '..'",
                self.cgroups.parent
            ));
        }
        if self.jail.jailer.as_ref().is_some_and(|p| !p.is_absolute()) {
            return bad("jail.jailer must be an absolute path".into());
        }
        for (what, p) in [
            ("boot.kernel", &self.boot.kernel),
            ("boot.agent", &self.boot.agent),
        ] {
            if !p.is_absolute() {
                return bad(format!("{what} {p:?} must be an absolute path"));
            }
        }
        for (name, p) in &self.images.local {
            if !p.is_absolute() {
                return bad(format!(
                    "images.local.{name} {p:?} must be an absolute path"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> BrokerConfig {
        BrokerConfig::parse(
            r#"
            gateway_uid = 999
            gateway_gid = 999
            [images]
            default = "base"
            [images.local]
            base = "/var/lib/moat/images/base.erofs"
            "#,
        )
        .expect("parse")
    }

    #[test]
    fn defaults_with_images_validate() {
        valid().validate().expect("valid");
    }

    #[test]
    fn gateway_user_is_resolved_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("broker.toml");
        // Every Linux user database has root; resolution is what is tested
        // here (validate() refuses uid 0 separately).
        std::fs::write(&file, "gateway_user = \"root\"\n").unwrap();
        let c = BrokerConfig::load(&file).unwrap();
        assert_eq!((c.gateway_uid, c.gateway_gid), (0, 0));
        std::fs::write(&file, "gateway_user = \"no-such-user-moat\"\n").unwrap();
        let err = BrokerConfig::load(&file).unwrap_err().to_string();
        assert!(
            err.contains("does not exist") && err.contains("broker.toml"),
            "{err}"
        );
        std::fs::write(&file, "gateway_user = \"root\"\ngateway_uid = 5\n").unwrap();
        let err = BrokerConfig::load(&file).unwrap_err().to_string();
        assert!(err.contains("not both"), "{err}");
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err = BrokerConfig::parse("gateway_uid = 1\nbogus = 2\n").unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");
        let err = BrokerConfig::parse("[limits]\nmax_memry_mib = 2\n").unwrap_err();
        assert!(err.to_string().contains("max_memry_mib"), "{err}");
    }

    #[test]
    fn validate_names_the_bad_field() {
        let mut c = valid();
        c.gateway_uid = 0;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("gateway_uid"));

        let mut c = valid();
        c.limits.default_memory_mib = 8192;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("default_memory_mib"));

        for pids in [0, GUEST_PIDS_MIN - 1, GUEST_PIDS_MAX + 1] {
            let mut c = valid();
            c.limits.guest_pids_max = pids;
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains("limits.guest_pids_max"), "{err}");
        }

        let mut c = valid();
        c.images.default = "Not A Reference".into();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("images.default"));

        let mut c = valid();
        c.cgroups.parent = "../escape".into();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("cgroups.parent"));

        let mut c = valid();
        c.gateway_uid = c.sandbox_ids.base + 1;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("sandbox_ids"));

        let mut c = valid();
        c.socket = "/run/moat/broker.sock".into();
        c.state_dir = "/run/moat/state".into();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("socket's directory"));

        let mut c = valid();
        c.vmm.qemu = "/opt/qemu/bin/qemu-system-x86_64".into();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("outside /usr"));
        c.jail.development_unjailed = true;
        c.validate().unwrap();

        let mut c = valid();
        c.volumes.allowed_roots = vec!["/".into()];
        assert!(c.validate().unwrap_err().to_string().contains("whole host"));
        c.volumes.allowed_roots = vec!["srv/shared".into()];
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("volumes.allowed_roots"));

        let mut c = valid();
        c.vmm.accel = "hvf".into();
        assert!(c.validate().unwrap_err().to_string().contains("accel"));

        let mut c = valid();
        c.vmm.backend = "firecracker".into();
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("vmm.backend") && err.contains("libkrun"),
            "{err}"
        );
        let mut c = valid();
        c.vmm.runner = Some("moat-vmm".into());
        assert!(c.validate().unwrap_err().to_string().contains("vmm.runner"));

        let mut c = valid();
        c.limits.max_output_bytes = u64::from(c.limits.max_agent_frame_bytes);
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("max_output_bytes"));
    }
}
