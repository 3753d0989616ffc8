//! The JSON-RPC 2.0 endpoint (`POST /api/v1/rpc`): [`handler`] speaks HTTP,
//! [`framing`] checks envelopes and batches, [`methods`] knows the method
//! names, [`params`] turns params into typed broker requests, [`call`] runs
//! one call against the broker, and [`results`] shapes what it returns.

pub mod call;
pub mod framing;
pub mod handler;
pub mod methods;
pub mod params;
pub mod results;
