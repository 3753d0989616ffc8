//! `moat-gateway`'s command line: a config file and the few fields an
//! operator (or `moat server start`) sets per run. Flags (or their
//! `MOAT_GATEWAY_*` variables) win over the file, the file over defaults.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

use super::{Config, ConfigError};

/// What `--help` adds below the options: the man-page sections.
const GATEWAY_MANUAL: &str = "\
DESCRIPTION:
  Runs unprivileged (normally the systemd unit moat-gateway.service, user
  moat) behind a TLS reverse proxy. Serves JSON-RPC 2.0 at /api/v1/rpc, MCP
  at /mcp and GET /api/v1/health; every request needs a Bearer API key
  (moat server keygen) unless --dev. Holds no privilege: it can do only what
  its keys allow, through the broker's socket.

FILES:
  /etc/moat/gateway.toml   configuration; every key: docs/configuration.md
  /etc/moat/gateway.secret key-signing secret (32 bytes hex, mode 0600)
  /etc/moat/revoked-keys   revoked key ids, re-read every few seconds
  /run/moat/broker.sock    the broker

ENVIRONMENT:
  MOAT_LOG  what to log, in tracing's filter syntax: a level (error, warn,
            info, debug, trace) or target=level pairs; default info. An
            invalid filter stops the gateway at start with exit status 1.

SIGNALS:
  SIGTERM, SIGINT  stop accepting connections and finish requests in flight
                   within timeouts.shutdown_grace_secs

EXIT STATUS:
  0 after a clean shutdown; 1 when the config or the secret is invalid (the
  message names the file, line or key, and the reason) or the listener
  cannot be bound.

SEE ALSO:
  moat(1), moat-broker(8); /usr/share/doc/moat/gateway.md";

/// Command line of `moat-gateway`.
#[derive(Debug, Clone, Default, Parser)]
#[command(
    name = "moat-gateway",
    version,
    about = "moat's internet-facing JSON-RPC/MCP server; reaches the broker over a Unix socket",
    after_long_help = GATEWAY_MANUAL
)]
pub struct Args {
    /// TOML config file (every field, with its default: docs/gateway.md).
    #[arg(long, env = "MOAT_GATEWAY_CONFIG")]
    pub config: Option<PathBuf>,

    /// Address to listen on (default 127.0.0.1:5555).
    #[arg(long, env = "MOAT_GATEWAY_LISTEN")]
    pub listen: Option<SocketAddr>,

    /// Unix socket of moat-broker's gRPC service.
    #[arg(long, env = "MOAT_GATEWAY_BROKER_SOCKET")]
    pub broker_socket: Option<PathBuf>,

    /// Development mode: no authentication, loopback listen addresses only.
    #[arg(long)]
    pub dev: bool,

    /// Largest accepted request body, in bytes (larger: HTTP 413).
    #[arg(long, env = "MOAT_GATEWAY_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<usize>,

    /// Most requests accepted in one JSON-RPC batch.
    #[arg(long, env = "MOAT_GATEWAY_MAX_BATCH")]
    pub max_batch: Option<usize>,

    /// Log one JSON object per line.
    #[arg(long)]
    pub log_json: bool,

    /// Serve Prometheus `/metrics` on this address.
    #[arg(long, env = "MOAT_GATEWAY_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
}

impl Args {
    /// The configuration these arguments describe: the file (if any) with
    /// the flags applied. Not yet validated.
    pub fn into_config(self) -> Result<Config, ConfigError> {
        let mut config = match &self.config {
            Some(path) => Config::load(path)?,
            None => Config::default(),
        };
        if let Some(listen) = self.listen {
            config.listen = listen;
        }
        if let Some(socket) = self.broker_socket {
            config.broker_socket = socket;
        }
        if let Some(bytes) = self.max_body_bytes {
            config.limits.max_body_bytes = bytes;
        }
        if let Some(batch) = self.max_batch {
            config.limits.max_batch = batch;
        }
        if self.log_json {
            config.log.json = true;
        }
        if let Some(metrics) = self.metrics_listen {
            config.metrics.listen = Some(metrics);
        }
        config.dev = self.dev;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_flags_is_the_default_config() {
        let args = Args::try_parse_from(["moat-gateway"]).unwrap();
        assert_eq!(args.into_config().unwrap(), Config::default());
    }

    #[test]
    fn flags_win_over_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("g.toml");
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:7000\"\n[limits]\nmax_batch = 9\nmax_body_bytes = 10\n",
        )
        .unwrap();
        let args = Args::try_parse_from([
            "moat-gateway",
            "--config",
            file.to_str().unwrap(),
            "--dev",
            "--max-batch",
            "3",
            "--broker-socket",
            "/tmp/b.sock",
        ])
        .unwrap();
        let config = args.into_config().unwrap();
        assert!(config.dev);
        assert_eq!(config.listen, "127.0.0.1:7000".parse().unwrap());
        assert_eq!(config.limits.max_batch, 3);
        assert_eq!(config.limits.max_body_bytes, 10);
        assert_eq!(config.broker_socket, PathBuf::from("/tmp/b.sock"));
    }

    #[test]
    fn a_missing_config_file_is_an_error_naming_it() {
        let args =
            Args::try_parse_from(["moat-gateway", "--config", "/nonexistent/g.toml"]).unwrap();
        let err = args.into_config().unwrap_err();
        assert!(err.to_string().contains("/nonexistent/g.toml"), "{err}");
    }
}
