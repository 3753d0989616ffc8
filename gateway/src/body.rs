//! Reading a request body for `/api/v1/rpc` and `/mcp`: at most
//! `limits.max_body_bytes` (HTTP 413 beyond, checked against
//! `Content-Length` first), within `timeouts.body_read_secs` (HTTP 408 for
//! a client that trickles), and nested at most `limits.max_json_depth`.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap};
use http_body_util::{BodyExt, LengthLimitError, Limited};

use crate::error::RpcError;
use crate::limits::depth;
use crate::state::AppState;

/// Reads and pre-checks a JSON request body.
pub async fn read(state: &AppState, headers: &HeaderMap, body: Body) -> Result<Bytes, RpcError> {
    let limit = state.limits().max_body_bytes;
    let secs = state.config().timeouts.body_read_secs;
    let bytes = match tokio::time::timeout(
        Duration::from_secs(secs),
        read_limited(headers, body, limit),
    )
    .await
    {
        Ok(result) => result?,
        Err(_elapsed) => return Err(RpcError::body_timeout(secs)),
    };
    let max_depth = state.limits().max_json_depth;
    if depth::exceeds(&bytes, max_depth) {
        return Err(RpcError::invalid_request(format!(
            "invalid request: JSON nested deeper than {max_depth} levels"
        )));
    }
    Ok(bytes)
}

/// Reads the whole body, refusing more than `limit` bytes.
async fn read_limited(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, RpcError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(RpcError::body_too_large(limit));
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(err) if err.downcast_ref::<LengthLimitError>().is_some() => {
            Err(RpcError::body_too_large(limit))
        }
        Err(err) => Err(RpcError::invalid_request(format!(
            "invalid request: could not read the request body: {err}"
        ))),
    }
}
