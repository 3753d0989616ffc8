//! Observability: the per-request context, its id and the client's address
//! ([`request`], [`client_ip`]), the Prometheus counters and the `/metrics`
//! endpoint ([`metrics`]), and the audit line per sandbox operation
//! ([`audit`]).

pub mod audit;
pub mod client_ip;
pub mod metrics;
pub mod request;
