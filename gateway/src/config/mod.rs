//! The gateway's configuration: [`Config`] is the typed whole (read from a
//! TOML file, `--config`, with `deny_unknown_fields`), [`args::Args`] the
//! command line that may override a few fields, and [`Config::validate`]
//! the one place that decides whether it may run. Every limit is a named
//! field here with its default; `docs/gateway.md` lists them all.

pub mod args;
pub mod net;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use args::Args;
pub use net::IpNet;

/// Default listen address (the contract's `127.0.0.1:5555`).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:5555";
/// Default broker socket.
pub const DEFAULT_BROKER_SOCKET: &str = "/run/moat/broker.sock";
/// Default gateway config file (read by `moat server` when present).
pub const DEFAULT_CONFIG_FILE: &str = "/etc/moat/gateway.toml";
/// Default signing secret file.
pub const DEFAULT_SECRET_FILE: &str = "/etc/moat/gateway.secret";
/// Default revocation list file.
pub const DEFAULT_REVOCATION_FILE: &str = "/etc/moat/revoked-keys";
/// Default request body limit: 1 MiB.
pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;
/// Default number of requests in one JSON-RPC batch.
pub const DEFAULT_MAX_BATCH: usize = 64;
/// Default age up to which a `sandbox.metrics.get` answer is given again:
/// half the broker's CPU sampling interval.
pub const DEFAULT_METRICS_MAX_AGE_MS: u64 = 500;
/// Largest accepted `timeouts.metrics_max_age_ms`.
pub const MAX_METRICS_MAX_AGE_MS: u64 = 60_000;
/// Default bound on broker calls in flight (all keys together).
pub const DEFAULT_MAX_BROKER_CALLS: usize = 256;
/// Largest accepted `limits.max_broker_calls` (a sanity ceiling: far more
/// than one broker serves usefully at once).
pub const MAX_MAX_BROKER_CALLS: usize = 65_536;

/// The gateway's typed configuration (the TOML file's shape).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// TCP address to listen on.
    pub listen: SocketAddr,
    /// Also listen on this Unix socket (for a reverse proxy on the host).
    pub unix_socket: Option<PathBuf>,
    /// Mode of the Unix socket (its group is the gateway's group).
    pub unix_socket_mode: u32,
    /// Unix socket of moat-broker's gRPC service.
    pub broker_socket: PathBuf,
    /// Development mode: no keys, loopback only. Only from the command line.
    #[serde(skip)]
    pub dev: bool,
    pub auth: AuthConfig,
    pub limits: Limits,
    pub timeouts: Timeouts,
    pub http: HttpConfig,
    pub log: LogConfig,
    pub metrics: MetricsConfig,
}

/// API keys: where the secret and the revocation list live.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// 32-byte HS256 secret (hex), mode 0600, owned by the gateway's user.
    /// Created at first start when missing.
    pub secret_file: PathBuf,
    /// Revoked key ids, one per line (`moat server revoke` appends).
    pub revocation_file: PathBuf,
    /// How often the revocation file's mtime is checked, in seconds.
    pub revocation_poll_secs: u64,
}

/// Limits on what one request, one key and the whole gateway may use.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest request body in bytes (over: HTTP 413).
    pub max_body_bytes: usize,
    /// Deepest JSON nesting accepted (arrays and objects).
    pub max_json_depth: usize,
    /// Most requests in one JSON-RPC batch.
    pub max_batch: usize,
    /// Requests one key may have in flight at once (over: HTTP 429).
    pub max_concurrent_per_key: u32,
    /// Sustained requests per second per key (token bucket refill rate).
    pub requests_per_sec: f64,
    /// Token bucket size: requests one key may send in a burst.
    pub burst: u32,
    /// Cap on `config.memory` (MiB); the broker applies its own cap too.
    pub max_memory_mib: Option<u32>,
    /// Cap on `config.cpus`.
    pub max_cpus: Option<u32>,
    /// Cap on `timeout` of `sandbox.command.run` / `sandbox.repl.run` (s).
    pub max_timeout_secs: Option<u32>,
    /// Open TCP/Unix connections at once, per listener (more wait in the
    /// kernel's backlog until one closes).
    pub max_connections: usize,
    /// Broker calls in flight at once, all keys together (sandbox
    /// operations, health checks, the metrics scrape's question). One more
    /// is refused at once (HTTP 503, `-32000`, `Retry-After: 1`), never
    /// queued.
    pub max_broker_calls: usize,
    /// MCP sessions alive at once (all keys).
    pub max_mcp_sessions: usize,
    /// MCP sessions one key may hold (the oldest is dropped beyond this).
    pub max_mcp_sessions_per_key: usize,
}

/// Deadlines: for broker calls, slow clients, idle sessions, shutdown.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// Broker `Health` (and the metrics scrape's broker question).
    pub health_secs: u64,
    /// How long after its broker call was sent a `sandbox.metrics.get`
    /// answer may be given again to the same question (0: only to requests
    /// that joined the call). A start or stop through this gateway makes
    /// the next answer fresh.
    pub metrics_max_age_ms: u64,
    /// `StartSandbox` (boots included).
    pub start_secs: u64,
    /// `StopSandbox`.
    pub stop_secs: u64,
    /// Command timeout assumed when a caller gives none.
    pub command_default_secs: u64,
    /// Added to a command's timeout for the broker deadline (more than the
    /// broker's own margin, so its answer arrives first).
    pub command_margin_secs: u64,
    /// A client must send its request headers within this (else the
    /// connection is closed).
    pub header_read_secs: u64,
    /// A client must send its whole body within this (else HTTP 408).
    pub body_read_secs: u64,
    /// An MCP session unused for this long ends.
    pub mcp_session_idle_secs: u64,
    /// After SIGINT/SIGTERM, how long in-flight requests may take.
    pub shutdown_grace_secs: u64,
}

/// HTTP-level policy: browsers, proxies.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Origins allowed to call from a browser (CORS). Empty: CORS off.
    pub cors_allowed_origins: Vec<String>,
    /// Origins accepted in an `Origin` header besides the CORS ones
    /// (requests without `Origin` are not browsers and are accepted).
    pub allowed_origins: Vec<String>,
    /// Peers (IPs or CIDRs) whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<String>,
}

/// Logging.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// One JSON object per line instead of text.
    pub json: bool,
}

/// The Prometheus endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Serve `GET /metrics` on this separate address.
    pub listen: Option<SocketAddr>,
    /// Also serve `GET /metrics` on the public listener (off by default).
    pub on_public_listener: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 5555)),
            unix_socket: None,
            unix_socket_mode: 0o660,
            broker_socket: PathBuf::from(DEFAULT_BROKER_SOCKET),
            dev: false,
            auth: AuthConfig::default(),
            limits: Limits::default(),
            timeouts: Timeouts::default(),
            http: HttpConfig::default(),
            log: LogConfig::default(),
            metrics: MetricsConfig::default(),
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            secret_file: PathBuf::from(DEFAULT_SECRET_FILE),
            revocation_file: PathBuf::from(DEFAULT_REVOCATION_FILE),
            revocation_poll_secs: 2,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            max_json_depth: 32,
            max_batch: DEFAULT_MAX_BATCH,
            max_concurrent_per_key: 32,
            requests_per_sec: 50.0,
            burst: 100,
            max_memory_mib: None,
            max_cpus: None,
            max_timeout_secs: None,
            max_connections: 1024,
            max_broker_calls: DEFAULT_MAX_BROKER_CALLS,
            max_mcp_sessions: 4096,
            max_mcp_sessions_per_key: 64,
        }
    }
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            health_secs: 5,
            metrics_max_age_ms: DEFAULT_METRICS_MAX_AGE_MS,
            start_secs: 120,
            stop_secs: 60,
            command_default_secs: 30,
            command_margin_secs: 90,
            header_read_secs: 10,
            body_read_secs: 30,
            mcp_session_idle_secs: 3600,
            shutdown_grace_secs: 30,
        }
    }
}

/// How long the gateway waits for each kind of broker call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadlines {
    /// `Health`.
    pub health: Duration,
    /// `StartSandbox` (image pulls and boots included).
    pub start: Duration,
    /// `StopSandbox`.
    pub stop: Duration,
    /// The command timeout assumed when the caller gives none.
    pub command_default_timeout: Duration,
    /// Added to a command's timeout to get the `RunCommand` deadline.
    pub command_margin: Duration,
}

impl Default for Deadlines {
    fn default() -> Self {
        Timeouts::default().deadlines()
    }
}

impl Deadlines {
    /// The `RunCommand` deadline for a command with `timeout_secs` (or the
    /// default timeout when the caller gave none).
    pub fn command(&self, timeout_secs: Option<u32>) -> Duration {
        let timeout = timeout_secs
            .map(|s| Duration::from_secs(u64::from(s)))
            .unwrap_or(self.command_default_timeout);
        timeout.saturating_add(self.command_margin)
    }
}

impl Timeouts {
    /// How long a metrics answer may be given again (`metrics_max_age_ms`).
    pub fn metrics_max_age(&self) -> Duration {
        Duration::from_millis(self.metrics_max_age_ms)
    }

    /// The broker call deadlines.
    pub fn deadlines(&self) -> Deadlines {
        Deadlines {
            health: Duration::from_secs(self.health_secs),
            start: Duration::from_secs(self.start_secs),
            stop: Duration::from_secs(self.stop_secs),
            command_default_timeout: Duration::from_secs(self.command_default_secs),
            command_margin: Duration::from_secs(self.command_margin_secs),
        }
    }
}

/// Why a configuration could not be read or may not run.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the gateway config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid gateway config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error(
        "--dev disables authentication, so it may only listen on a loopback address \
         (127.0.0.1, ::1); got {listen}"
    )]
    DevNotLoopback { listen: SocketAddr },
    #[error("broker_socket cannot be empty")]
    EmptyBrokerSocket,
    #[error("{field} must be greater than zero")]
    Zero { field: &'static str },
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

impl Config {
    /// Parses a TOML config (unknown fields are errors).
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }

    /// Reads and parses a TOML config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// The broker call deadlines.
    pub fn deadlines(&self) -> Deadlines {
        self.timeouts.deadlines()
    }

    /// Trusted proxies, parsed (call after [`Config::validate`]).
    pub fn trusted_proxies(&self) -> Vec<IpNet> {
        self.http
            .trusted_proxies
            .iter()
            .filter_map(|p| p.parse().ok())
            .collect()
    }

    /// Checks that this configuration may run.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.dev && !self.listen.ip().to_canonical().is_loopback() {
            return Err(ConfigError::DevNotLoopback {
                listen: self.listen,
            });
        }
        if self.broker_socket.as_os_str().is_empty() {
            return Err(ConfigError::EmptyBrokerSocket);
        }
        let l = &self.limits;
        let t = &self.timeouts;
        let nonzero: [(&'static str, u64); 18] = [
            ("limits.max_body_bytes", l.max_body_bytes as u64),
            ("limits.max_json_depth", l.max_json_depth as u64),
            ("limits.max_batch", l.max_batch as u64),
            (
                "limits.max_concurrent_per_key",
                u64::from(l.max_concurrent_per_key),
            ),
            ("limits.burst", u64::from(l.burst)),
            ("limits.max_connections", l.max_connections as u64),
            ("limits.max_broker_calls", l.max_broker_calls as u64),
            ("limits.max_mcp_sessions", l.max_mcp_sessions as u64),
            (
                "limits.max_mcp_sessions_per_key",
                l.max_mcp_sessions_per_key as u64,
            ),
            ("timeouts.health_secs", t.health_secs),
            ("timeouts.start_secs", t.start_secs),
            ("timeouts.stop_secs", t.stop_secs),
            ("timeouts.command_default_secs", t.command_default_secs),
            ("timeouts.header_read_secs", t.header_read_secs),
            ("timeouts.body_read_secs", t.body_read_secs),
            ("timeouts.mcp_session_idle_secs", t.mcp_session_idle_secs),
            ("auth.revocation_poll_secs", self.auth.revocation_poll_secs),
            (
                "limits.max_memory_mib / max_cpus / max_timeout_secs",
                [l.max_memory_mib, l.max_cpus, l.max_timeout_secs]
                    .iter()
                    .all(|v| *v != Some(0)) as u64,
            ),
        ];
        for (field, value) in nonzero {
            if value == 0 {
                return Err(ConfigError::Zero { field });
            }
        }
        if !(l.requests_per_sec.is_finite() && l.requests_per_sec > 0.0) {
            return Err(ConfigError::Invalid {
                field: "limits.requests_per_sec",
                message: format!("must be a positive number; got {}", l.requests_per_sec),
            });
        }
        for (field, value, max, hint) in [
            (
                "limits.max_broker_calls",
                l.max_broker_calls as u64,
                MAX_MAX_BROKER_CALLS as u64,
                "lower it",
            ),
            (
                "timeouts.metrics_max_age_ms",
                t.metrics_max_age_ms,
                MAX_METRICS_MAX_AGE_MS,
                "lower it (a minute at most), or 0 to ask the broker every time",
            ),
        ] {
            if value > max {
                return Err(ConfigError::Invalid {
                    field,
                    message: format!("at most {max}; got {value}: {hint}"),
                });
            }
        }
        if l.max_json_depth > 128 {
            return Err(ConfigError::Invalid {
                field: "limits.max_json_depth",
                message: format!(
                    "at most 128 (the JSON parser's own bound); got {}",
                    l.max_json_depth
                ),
            });
        }
        if self.unix_socket_mode & !0o777 != 0 {
            return Err(ConfigError::Invalid {
                field: "unix_socket_mode",
                message: format!("{:o} is not a permission mode", self.unix_socket_mode),
            });
        }
        for proxy in &self.http.trusted_proxies {
            proxy
                .parse::<IpNet>()
                .map_err(|message| ConfigError::Invalid {
                    field: "http.trusted_proxies",
                    message,
                })?;
        }
        for origin in self
            .http
            .cors_allowed_origins
            .iter()
            .chain(&self.http.allowed_origins)
        {
            if origin == "*" || !(origin.starts_with("http://") || origin.starts_with("https://")) {
                return Err(ConfigError::Invalid {
                    field: "http.allowed_origins / http.cors_allowed_origins",
                    message: format!(
                        "{origin:?} is not an origin; write scheme://host[:port], e.g. https://app.example.com (no wildcards)"
                    ),
                });
            }
        }
        if !self.dev {
            for (field, path) in [
                ("auth.secret_file", &self.auth.secret_file),
                ("auth.revocation_file", &self.auth.revocation_file),
            ] {
                if !path.is_absolute() {
                    return Err(ConfigError::Invalid {
                        field,
                        message: format!("must be an absolute path; got {}", path.display()),
                    });
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev() -> Config {
        Config {
            dev: true,
            ..Config::default()
        }
    }

    #[test]
    fn an_empty_file_is_the_defaults() {
        let config = Config::parse("", Path::new("x.toml")).unwrap();
        assert_eq!(config, Config::default());
        assert!(config.validate().is_ok());
    }

    #[test]
    fn every_section_parses() {
        let text = r#"
listen = "0.0.0.0:8080"
unix_socket = "/run/moat/gateway.sock"
broker_socket = "/tmp/b.sock"
[auth]
secret_file = "/etc/moat/s"
revocation_file = "/etc/moat/r"
revocation_poll_secs = 1
[limits]
max_body_bytes = 2048
max_json_depth = 8
max_batch = 3
max_concurrent_per_key = 2
requests_per_sec = 0.5
burst = 4
max_memory_mib = 1024
max_cpus = 2
max_timeout_secs = 60
[timeouts]
start_secs = 9
header_read_secs = 3
metrics_max_age_ms = 0
[http]
cors_allowed_origins = ["https://app.example.com"]
trusted_proxies = ["127.0.0.1", "10.0.0.0/8", "::1"]
[log]
json = true
[metrics]
listen = "127.0.0.1:9555"
"#;
        let config = Config::parse(text, Path::new("g.toml")).unwrap();
        assert_eq!(config.listen, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(config.limits.max_batch, 3);
        assert_eq!(config.limits.max_memory_mib, Some(1024));
        assert_eq!(config.limits.requests_per_sec, 0.5);
        assert_eq!(config.deadlines().start, Duration::from_secs(9));
        assert_eq!(config.timeouts.stop_secs, 60, "unset fields keep defaults");
        assert_eq!(config.timeouts.metrics_max_age(), Duration::ZERO);
        assert!(config.log.json);
        assert_eq!(config.trusted_proxies().len(), 3);
        assert!(config.validate().is_ok());
    }

    #[test]
    fn unknown_fields_are_refused_naming_them() {
        let err = Config::parse("[limits]\nmax_bodyy = 1\n", Path::new("g.toml")).unwrap_err();
        assert!(err.to_string().contains("max_bodyy"), "{err}");
        let err = Config::parse("dev = true\n", Path::new("g.toml")).unwrap_err();
        assert!(err.to_string().contains("dev"), "{err}");
    }

    #[test]
    fn dev_refuses_non_loopback_addresses() {
        for listen in ["0.0.0.0:5555", "192.0.2.1:5555", "[::]:5555"] {
            let config = Config {
                listen: listen.parse().unwrap(),
                ..dev()
            };
            let err = config.validate().unwrap_err();
            assert!(
                matches!(err, ConfigError::DevNotLoopback { .. }),
                "{listen}"
            );
        }
        for listen in ["127.0.0.1:1", "[::1]:5555", "[::ffff:127.0.0.1]:5555"] {
            let config = Config {
                listen: listen.parse().unwrap(),
                ..dev()
            };
            assert!(config.validate().is_ok(), "{listen}");
        }
        // With keys, any address.
        let config = Config {
            listen: "0.0.0.0:5555".parse().unwrap(),
            ..Config::default()
        };
        assert!(config.validate().is_ok());
    }

    #[test]
    fn zero_and_bad_values_are_refused() {
        let mut config = dev();
        config.limits.max_batch = 0;
        assert!(matches!(
            config.validate(),
            Err(ConfigError::Zero {
                field: "limits.max_batch"
            })
        ));
        let mut config = dev();
        config.limits.requests_per_sec = f64::NAN;
        assert!(config.validate().is_err());
        let mut config = dev();
        config.limits.max_cpus = Some(0);
        assert!(config.validate().is_err());
        let mut config = dev();
        config.http.trusted_proxies = vec!["10.0.0.0/33".into()];
        assert!(config.validate().is_err());
        let mut config = dev();
        config.http.cors_allowed_origins = vec!["*".into()];
        assert!(config.validate().is_err());
        let mut config = Config::default();
        config.auth.secret_file = PathBuf::from("relative");
        assert!(config.validate().is_err());
        let mut config = dev();
        config.timeouts.metrics_max_age_ms = MAX_METRICS_MAX_AGE_MS + 1;
        let err = config.validate().unwrap_err().to_string();
        assert!(
            err.contains("timeouts.metrics_max_age_ms") && err.contains("60000"),
            "{err}"
        );
        let mut config = dev();
        config.broker_socket = PathBuf::new();
        assert!(matches!(
            config.validate(),
            Err(ConfigError::EmptyBrokerSocket)
        ));
    }

    #[test]
    fn command_deadline_is_timeout_plus_margin() {
        let d = Deadlines::default();
        assert_eq!(d.command(Some(5)), Duration::from_secs(95));
        assert_eq!(d.command(None), Duration::from_secs(120));
    }
}
