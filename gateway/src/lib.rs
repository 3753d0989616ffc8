//! moat-gateway: the unprivileged, internet-facing server. It speaks the
//! microsandbox API (JSON-RPC 2.0 over HTTP, as `contract.md` settles it)
//! and reaches the privileged broker only through the gRPC service in
//! `broker.proto`, over a Unix socket.
//!
//! - [`app`]: the router; [`state`]: what handlers share.
//! - [`rpc`]: the JSON-RPC endpoint; [`health`]: the health endpoint.
//! - [`broker`]: the gRPC client; [`error`]: the one wire error type.
//! - [`config`]: command line, typed config and its validation.

pub mod app;
pub mod broker;
pub mod config;
pub mod error;
pub mod health;
pub mod rpc;
pub mod state;

pub use app::app;
pub use state::AppState;
