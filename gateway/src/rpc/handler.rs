//! The HTTP side of `POST /api/v1/rpc`: reads the body under its size limit
//! (HTTP 413 over it), answers single requests, batches and notifications,
//! and picks the HTTP status: a single request's error status, 200 for a
//! batch, 204 when nothing needs an answer.

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response as HttpResponse};
use axum::Json;

use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde_json::Value;

use super::call;
use super::framing::{self, Payload, Response};
use crate::error::RpcError;
use crate::state::AppState;

/// `POST /api/v1/rpc`.
pub async fn rpc(State(state): State<AppState>, headers: HeaderMap, body: Body) -> HttpResponse {
    let limits = state.limits();
    let bytes = match read_body(&headers, body, limits.max_body_bytes).await {
        Ok(bytes) => bytes,
        Err(err) => {
            tracing::info!(code = err.code().code(), error = %err, "rpc request refused");
            return single(Response {
                id: Value::Null,
                outcome: Err(err),
            });
        }
    };
    let payload = match framing::parse_body(&bytes, limits.max_batch) {
        Ok(payload) => payload,
        Err(err) => {
            tracing::info!(code = err.code().code(), error = %err, "rpc request refused");
            return single(Response {
                id: Value::Null,
                outcome: Err(err),
            });
        }
    };
    match payload {
        Payload::Single(value) => match answer(&state, value).await {
            Some(response) => single(response),
            None => StatusCode::NO_CONTENT.into_response(),
        },
        Payload::Batch(values) => {
            // Elements run one after another, in order, so a batch that
            // starts a sandbox and then uses it behaves as written.
            let mut responses = Vec::with_capacity(values.len());
            for value in values {
                if let Some(response) = answer(&state, value).await {
                    responses.push(response.to_json());
                }
            }
            if responses.is_empty() {
                StatusCode::NO_CONTENT.into_response()
            } else {
                (StatusCode::OK, Json(Value::Array(responses))).into_response()
            }
        }
    }
}

/// Handles one batch element or single request; `None` for a notification.
async fn answer(state: &AppState, value: Value) -> Option<Response> {
    match framing::parse_call(value) {
        Err(rejected) => Some(Response {
            id: rejected.id,
            outcome: Err(rejected.error),
        }),
        Ok(call) => {
            let id = call.id.clone();
            let outcome = call::run(state, call).await;
            id.map(|id| Response { id, outcome })
        }
    }
}

/// A response to a single request: the error's own HTTP status, else 200.
fn single(response: Response) -> HttpResponse {
    let status = match &response.outcome {
        Ok(_) => StatusCode::OK,
        Err(err) => err.status(),
    };
    (status, Json(response.to_json())).into_response()
}

/// Reads the whole body, refusing more than `limit` bytes.
async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, RpcError> {
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
