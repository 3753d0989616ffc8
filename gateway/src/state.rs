//! [`AppState`]: what every handler shares — the configuration, the broker
//! client (which holds the gateway-wide bound on calls in flight), the
//! authenticator, the per-key limiters, the MCP sessions and the
//! metrics. Built once from a validated [`Config`]; cheap to clone.

use std::sync::Arc;
use std::time::Duration;

use crate::auth::revocation::Revocations;
use crate::auth::secret::{self, SecretError};
use crate::auth::{Authenticator, Verifier};
use crate::broker::Broker;
use crate::config::{Config, Deadlines, IpNet, Limits};
use crate::limits::concurrency::ConcurrencyLimiter;
use crate::limits::rate::RateLimiter;
use crate::mcp::session::Sessions;
use crate::obs::metrics::Metrics;

/// Shared handler state.
#[derive(Debug, Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: Config,
    broker: Broker,
    authenticator: Authenticator,
    rate: RateLimiter,
    concurrency: ConcurrencyLimiter,
    sessions: Sessions,
    metrics: Metrics,
    trusted_proxies: Vec<IpNet>,
}

/// Why the state could not be built.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(transparent)]
    Secret(#[from] SecretError),
}

impl AppState {
    /// State for `config` with the given authenticator and a lazily
    /// connecting broker client (call inside a Tokio runtime).
    pub fn new(config: Config, authenticator: Authenticator) -> Self {
        let limits = &config.limits;
        let inner = Inner {
            broker: Broker::connect_lazy(
                &config.broker_socket,
                limits.max_broker_calls,
                config.timeouts.metrics_max_age(),
            ),
            authenticator,
            rate: RateLimiter::new(limits.requests_per_sec, limits.burst),
            concurrency: ConcurrencyLimiter::new(limits.max_concurrent_per_key),
            sessions: Sessions::new(
                limits.max_mcp_sessions,
                limits.max_mcp_sessions_per_key,
                Duration::from_secs(config.timeouts.mcp_session_idle_secs),
            ),
            metrics: Metrics::default(),
            trusted_proxies: config.trusted_proxies(),
            config,
        };
        AppState {
            inner: Arc::new(inner),
        }
    }

    /// State for a validated `config`: in `--dev` mode no keys; otherwise
    /// the signing secret is created if missing (mode 0600, owned by this
    /// process's user) and loaded, with the revocation list beside it.
    pub fn from_config(config: &Config) -> Result<Self, StateError> {
        let authenticator = if config.dev {
            Authenticator::Dev
        } else {
            let auth = &config.auth;
            if secret::ensure(&auth.secret_file, None)? {
                tracing::info!(path = %auth.secret_file.display(), "created a new signing secret");
            }
            let secret = secret::load(&auth.secret_file)?;
            let revocations = Revocations::new(
                &auth.revocation_file,
                Duration::from_secs(auth.revocation_poll_secs),
            );
            Authenticator::Keys(Verifier::new(&secret, revocations))
        };
        Ok(AppState::new(config.clone(), authenticator))
    }

    /// The whole configuration.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The broker client.
    pub fn broker(&self) -> &Broker {
        &self.inner.broker
    }

    /// Request limits.
    pub fn limits(&self) -> &Limits {
        &self.inner.config.limits
    }

    /// Deadlines for broker calls.
    pub fn deadlines(&self) -> Deadlines {
        self.inner.config.deadlines()
    }

    /// Turns headers into identities.
    pub fn authenticator(&self) -> &Authenticator {
        &self.inner.authenticator
    }

    /// Per-key token buckets.
    pub fn rate(&self) -> &RateLimiter {
        &self.inner.rate
    }

    /// Per-key in-flight limits.
    pub fn concurrency(&self) -> &ConcurrencyLimiter {
        &self.inner.concurrency
    }

    /// Live MCP sessions.
    pub fn sessions(&self) -> &Sessions {
        &self.inner.sessions
    }

    /// Counters for `/metrics`.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Peers whose `X-Forwarded-For` is believed.
    pub fn trusted_proxies(&self) -> &[IpNet] {
        &self.inner.trusted_proxies
    }

    /// Whether a browser `Origin` may call: one the config allows (for CORS
    /// or explicitly).
    pub fn origin_allowed(&self, origin: &str) -> bool {
        let http = &self.inner.config.http;
        http.allowed_origins
            .iter()
            .chain(&http.cors_allowed_origins)
            .any(|allowed| allowed.eq_ignore_ascii_case(origin))
    }
}
