//! `GET /api/v1/health`: 200 `{"message":"Service is healthy"}` while the
//! broker answers its `Health` call, 503 with the cause otherwise.

use axum::extract::State;
use axum::http::StatusCode;
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
            tracing::warn!(error = %err, "health: broker not answering");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({ "message": "Service is unhealthy", "error": err.message() })),
            )
                .into_response()
        }
    }
}
