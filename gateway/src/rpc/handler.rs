//! The HTTP side of `POST /api/v1/rpc`: reads the body under its limits
//! (`crate::body`), answers single requests, batches and notifications, and
//! picks the HTTP status: a single request's error status, 200 for a batch,
//! 204 when nothing needs an answer. The caller's identity was put in the
//! request by `crate::guard`.

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response as HttpResponse};
use axum::{Extension, Json};
use serde_json::Value;

use super::call;
use super::framing::{self, Payload, Response};
use crate::auth::Identity;
use crate::state::AppState;

/// `POST /api/v1/rpc`.
pub async fn rpc(
    State(state): State<AppState>,
    Extension(identity): Extension<Identity>,
    headers: HeaderMap,
    body: Body,
) -> HttpResponse {
    let payload = match crate::body::read(&state, &headers, body)
        .await
        .and_then(|bytes| framing::parse_body(&bytes, state.limits().max_batch))
    {
        Ok(payload) => payload,
        Err(err) => {
            state.metrics().error(err.code().code());
            let request = crate::obs::request::current();
            tracing::info!(
                request_id = %request.id,
                client = %request.client,
                code = err.code().code(),
                error = %err,
                "rpc request refused"
            );
            return single(Response {
                id: Value::Null,
                outcome: Err(err),
            });
        }
    };
    match payload {
        Payload::Single(value) => match answer(&state, &identity, value).await {
            Some(response) => single(response),
            None => StatusCode::NO_CONTENT.into_response(),
        },
        Payload::Batch(values) => {
            // Elements run one after another, in order, so a batch that
            // starts a sandbox and then uses it behaves as written.
            let mut responses = Vec::with_capacity(values.len());
            for value in values {
                if let Some(response) = answer(&state, &identity, value).await {
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
async fn answer(state: &AppState, identity: &Identity, value: Value) -> Option<Response> {
    match framing::parse_call(value) {
        Err(rejected) => {
            state.metrics().error(rejected.error.code().code());
            Some(Response {
                id: rejected.id,
                outcome: Err(rejected.error),
            })
        }
        Ok(call) => {
            let id = call.id.clone();
            let outcome = call::run(state, identity, call).await;
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
    let mut http = (status, Json(response.to_json())).into_response();
    crate::error::close_after_unread_body(&mut http);
    if let Err(err) = &response.outcome {
        if let Some(secs) = err.retry_after_secs() {
            if let Ok(value) = axum::http::HeaderValue::from_str(&secs.to_string()) {
                http.headers_mut()
                    .insert(axum::http::header::RETRY_AFTER, value);
            }
        }
    }
    http
}
