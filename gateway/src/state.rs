//! [`AppState`]: what every handler shares — the broker client, the
//! JSON-RPC limits and the broker call deadlines. Later issues add the key
//! verifier and rate limiter here.

use crate::broker::Broker;
use crate::config::{Config, Deadlines, RpcLimits};

/// Shared handler state; cheap to clone.
#[derive(Debug, Clone)]
pub struct AppState {
    broker: Broker,
    limits: RpcLimits,
    deadlines: Deadlines,
}

impl AppState {
    /// State from its parts.
    pub fn new(broker: Broker, limits: RpcLimits, deadlines: Deadlines) -> Self {
        AppState {
            broker,
            limits,
            deadlines,
        }
    }

    /// State for `config`, with a lazily connecting broker client (call
    /// inside a Tokio runtime).
    pub fn from_config(config: &Config) -> Self {
        AppState::new(
            Broker::connect_lazy(&config.broker_socket),
            config.limits,
            config.deadlines,
        )
    }

    /// The broker client.
    pub fn broker(&self) -> &Broker {
        &self.broker
    }

    /// Limits on `POST /api/v1/rpc`.
    pub fn limits(&self) -> RpcLimits {
        self.limits
    }

    /// Deadlines for broker calls.
    pub fn deadlines(&self) -> Deadlines {
        self.deadlines
    }
}
