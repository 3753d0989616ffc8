//! moat-gateway: the unprivileged, internet-facing server. It speaks the
//! microsandbox API (JSON-RPC 2.0 over HTTP and MCP, as `contract.md`
//! settles them), authenticates every request with an API key confined to
//! namespaces, and reaches the privileged broker only through the gRPC
//! service in `broker.proto`, over a Unix socket.
//!
//! - [`app`]: the routers; [`serve`]: the accept loop; [`state`]: what
//!   handlers share; [`config`]: typed config and its validation.
//! - [`guard`]: Origin, key, rate and concurrency checks in front of the
//!   API; [`auth`]: keys, secret, revocation, identities; [`limits`]:
//!   limiters and caps; [`body`]: reading request bodies.
//! - [`rpc`]: the JSON-RPC endpoint; [`mcp`]: the MCP endpoint;
//!   [`health`]: the health endpoint.
//! - [`broker`]: the gRPC client; [`coalesce`]: identical reads sharing
//!   one broker call and, for metrics, its answer briefly; [`error`]: the
//!   one wire error type; [`obs`]: request ids and contexts, audit lines,
//!   Prometheus metrics.

pub mod app;
pub mod auth;
pub mod body;
pub mod broker;
pub mod coalesce;
pub mod config;
pub mod dial_backoff;
pub mod error;
pub mod guard;
pub mod health;
pub mod limits;
pub mod mcp;
pub mod obs;
pub mod rpc;
pub mod serve;
pub mod state;

pub use app::{app, metrics_app};
pub use state::AppState;
