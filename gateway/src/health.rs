//! `GET /api/v1/health`: 200 `{"message":"Service is healthy"}` while the
//! broker answers its `Health` call, 503 with the cause otherwise (with
//! `Retry-After` when the gateway is at its bound on broker calls, which
//! health checks count against too).

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::state::AppState;

/// `GET /api/v1/health`.
pub async fn health(State(state): State<AppState>) -> Response {
    match state.broker().health(state.deadlines().health).await {
        Ok(reply) => {
            tracing::debug!(
                broker_version = %reply.version,
                vmm = %reply.vmm,
                running = reply.running_sandboxes,
                "health: broker answered"
            );
            (
                StatusCode::OK,
                Json(json!({ "message": "Service is healthy" })),
            )
                .into_response()
        }
        Err(err) => {
            let request = crate::obs::request::current();
            tracing::warn!(
                request_id = %request.id,
                client = %request.client,
                error = %err,
                "health: broker not answering"
            );
            let mut response = (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({ "message": "Service is unhealthy", "error": err.message() })),
            )
                .into_response();
            if let Some(value) = err
                .retry_after_secs()
                .and_then(|s| HeaderValue::from_str(&s.to_string()).ok())
            {
                response.headers_mut().insert(header::RETRY_AFTER, value);
            }
            response
        }
    }
}
