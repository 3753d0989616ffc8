//! Limits that keep the gateway up and fair: per-key request [`rate`]
//! (token bucket → HTTP 429 + `Retry-After`), per-key [`concurrency`], the
//! gateway-wide bound on [`broker_calls`] in flight (HTTP 503 +
//! `Retry-After`), JSON nesting [`depth`], and the operator's caps on
//! sandbox [`ops`] (memory, cpus, timeout). Body size and batch length are
//! checked where the body is read and framed (`rpc::handler`,
//! `rpc::framing`); connections are bounded by `crate::serve`.

pub mod broker_calls;
pub mod concurrency;
pub mod depth;
pub mod ops;
pub mod rate;
