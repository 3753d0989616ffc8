//! The gateway's configuration: [`Args`] is what the command line (or the
//! `MOAT_GATEWAY_*` environment) says, [`Config`] the typed result, and
//! [`Config::validate`] the one place that decides whether it may run.
//! Every limit is a named field here with its default.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

/// Default listen address (the contract's `127.0.0.1:5555`).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:5555";
/// Default broker socket.
pub const DEFAULT_BROKER_SOCKET: &str = "/run/moat/broker.sock";
/// Default request body limit: 1 MiB.
pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;
/// Default number of requests in one JSON-RPC batch.
pub const DEFAULT_MAX_BATCH: usize = 64;

/// Command line of `moat-gateway`.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "moat-gateway",
    version,
    about = "moat's internet-facing JSON-RPC server; reaches the broker over a Unix socket"
)]
pub struct Args {
    /// Address to listen on.
    #[arg(long, env = "MOAT_GATEWAY_LISTEN", default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,

    /// Unix socket of moat-broker's gRPC service.
    #[arg(long, env = "MOAT_GATEWAY_BROKER_SOCKET", default_value = DEFAULT_BROKER_SOCKET)]
    pub broker_socket: PathBuf,

    /// Development mode: no authentication, loopback listen addresses only.
    /// Required in this build (API keys are not implemented yet).
    #[arg(long)]
    pub dev: bool,

    /// Largest accepted request body, in bytes (larger: HTTP 413).
    #[arg(long, env = "MOAT_GATEWAY_MAX_BODY_BYTES", default_value_t = DEFAULT_MAX_BODY_BYTES)]
    pub max_body_bytes: usize,

    /// Most requests accepted in one JSON-RPC batch.
    #[arg(long, env = "MOAT_GATEWAY_MAX_BATCH", default_value_t = DEFAULT_MAX_BATCH)]
    pub max_batch: usize,

    /// How long to wait for the broker to start a sandbox, in seconds.
    #[arg(long, env = "MOAT_GATEWAY_START_DEADLINE_SECS", default_value_t = 120)]
    pub start_deadline_secs: u64,

    /// How long to wait for the broker to stop a sandbox, in seconds.
    #[arg(long, env = "MOAT_GATEWAY_STOP_DEADLINE_SECS", default_value_t = 60)]
    pub stop_deadline_secs: u64,

    /// Command timeout assumed when a caller gives none (the broker applies
    /// its own default and cap), in seconds.
    #[arg(long, env = "MOAT_GATEWAY_COMMAND_TIMEOUT_SECS", default_value_t = 30)]
    pub command_timeout_secs: u64,

    /// Extra time allowed past a command's timeout before giving up on the
    /// broker, in seconds.
    #[arg(long, env = "MOAT_GATEWAY_COMMAND_MARGIN_SECS", default_value_t = 10)]
    pub command_margin_secs: u64,

    /// After SIGINT/SIGTERM, how long in-flight requests may take to finish
    /// before the gateway exits anyway, in seconds.
    #[arg(long, env = "MOAT_GATEWAY_SHUTDOWN_GRACE_SECS", default_value_t = 30)]
    pub shutdown_grace_secs: u64,
}

/// Limits on the JSON-RPC endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RpcLimits {
    /// Largest request body in bytes.
    pub max_body_bytes: usize,
    /// Most requests in one batch.
    pub max_batch: usize,
}

impl Default for RpcLimits {
    fn default() -> Self {
        RpcLimits {
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            max_batch: DEFAULT_MAX_BATCH,
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
        Deadlines {
            health: Duration::from_secs(5),
            start: Duration::from_secs(120),
            stop: Duration::from_secs(60),
            command_default_timeout: Duration::from_secs(30),
            command_margin: Duration::from_secs(10),
        }
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

/// The gateway's typed configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub listen: SocketAddr,
    pub broker_socket: PathBuf,
    /// No authentication; loopback only.
    pub dev: bool,
    pub limits: RpcLimits,
    pub deadlines: Deadlines,
    /// Bound on draining in-flight requests at shutdown.
    pub shutdown_grace: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 5555)),
            broker_socket: PathBuf::from(DEFAULT_BROKER_SOCKET),
            dev: false,
            limits: RpcLimits::default(),
            deadlines: Deadlines::default(),
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

/// Why a configuration may not run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("API keys are not implemented yet: run with --dev (loopback only)")]
    KeysNotImplemented,
    #[error(
        "--dev disables authentication, so it may only listen on a loopback address \
         (127.0.0.1, ::1); got {listen}"
    )]
    DevNotLoopback { listen: SocketAddr },
    #[error("--broker-socket cannot be empty")]
    EmptyBrokerSocket,
    #[error("{field} must be greater than zero")]
    Zero { field: &'static str },
}

impl From<Args> for Config {
    fn from(args: Args) -> Self {
        Config {
            listen: args.listen,
            broker_socket: args.broker_socket,
            dev: args.dev,
            limits: RpcLimits {
                max_body_bytes: args.max_body_bytes,
                max_batch: args.max_batch,
            },
            deadlines: Deadlines {
                start: Duration::from_secs(args.start_deadline_secs),
                stop: Duration::from_secs(args.stop_deadline_secs),
                command_default_timeout: Duration::from_secs(args.command_timeout_secs),
                command_margin: Duration::from_secs(args.command_margin_secs),
                ..Deadlines::default()
            },
            shutdown_grace: Duration::from_secs(args.shutdown_grace_secs),
        }
    }
}

impl Config {
    /// Checks that this configuration may run.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.dev {
            return Err(ConfigError::KeysNotImplemented);
        }
        if !self.listen.ip().to_canonical().is_loopback() {
            return Err(ConfigError::DevNotLoopback {
                listen: self.listen,
            });
        }
        if self.broker_socket.as_os_str().is_empty() {
            return Err(ConfigError::EmptyBrokerSocket);
        }
        let nonzero = [
            ("--max-body-bytes", self.limits.max_body_bytes as u128),
            ("--max-batch", self.limits.max_batch as u128),
            ("--start-deadline-secs", self.deadlines.start.as_millis()),
            ("--stop-deadline-secs", self.deadlines.stop.as_millis()),
            (
                "--command-timeout-secs",
                self.deadlines.command_default_timeout.as_millis(),
            ),
            ("health deadline", self.deadlines.health.as_millis()),
        ];
        for (field, value) in nonzero {
            if value == 0 {
                return Err(ConfigError::Zero { field });
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
    fn defaults_parse_from_an_empty_command_line() {
        let args = Args::try_parse_from(["moat-gateway", "--dev"]).unwrap();
        let config = Config::from(args);
        assert_eq!(config, dev());
        assert_eq!(config.validate(), Ok(()));
    }

    #[test]
    fn flags_set_their_fields() {
        let args = Args::try_parse_from([
            "moat-gateway",
            "--dev",
            "--listen",
            "[::1]:7000",
            "--broker-socket",
            "/tmp/b.sock",
            "--max-body-bytes",
            "2048",
            "--max-batch",
            "3",
            "--start-deadline-secs",
            "9",
        ])
        .unwrap();
        let config = Config::from(args);
        assert_eq!(config.listen, "[::1]:7000".parse().unwrap());
        assert_eq!(config.broker_socket, PathBuf::from("/tmp/b.sock"));
        assert_eq!(config.limits.max_body_bytes, 2048);
        assert_eq!(config.limits.max_batch, 3);
        assert_eq!(config.deadlines.start, Duration::from_secs(9));
        assert_eq!(config.validate(), Ok(()));
    }

    #[test]
    fn without_dev_keys_are_required() {
        let err = Config::default().validate().unwrap_err();
        assert_eq!(err, ConfigError::KeysNotImplemented);
        assert_eq!(
            err.to_string(),
            "API keys are not implemented yet: run with --dev (loopback only)"
        );
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
            assert!(err.to_string().contains("loopback"), "{err}");
        }
        for listen in [
            "127.0.0.1:1",
            "127.8.0.1:5555",
            "[::1]:5555",
            "[::ffff:127.0.0.1]:5555",
        ] {
            let config = Config {
                listen: listen.parse().unwrap(),
                ..dev()
            };
            assert_eq!(config.validate(), Ok(()), "{listen}");
        }
    }

    #[test]
    fn zero_limits_are_refused() {
        let config = Config {
            limits: RpcLimits {
                max_batch: 0,
                ..RpcLimits::default()
            },
            ..dev()
        };
        assert_eq!(
            config.validate(),
            Err(ConfigError::Zero {
                field: "--max-batch"
            })
        );
        let config = Config {
            limits: RpcLimits {
                max_body_bytes: 0,
                ..RpcLimits::default()
            },
            ..dev()
        };
        assert!(config.validate().is_err());
        let config = Config {
            deadlines: Deadlines {
                start: Duration::ZERO,
                ..Deadlines::default()
            },
            ..dev()
        };
        assert!(config.validate().is_err());
    }

    #[test]
    fn empty_broker_socket_is_refused() {
        let config = Config {
            broker_socket: PathBuf::new(),
            ..dev()
        };
        assert_eq!(config.validate(), Err(ConfigError::EmptyBrokerSocket));
    }

    #[test]
    fn command_deadline_is_timeout_plus_margin() {
        let d = Deadlines::default();
        assert_eq!(d.command(Some(5)), Duration::from_secs(15));
        assert_eq!(d.command(None), Duration::from_secs(40));
    }
}
