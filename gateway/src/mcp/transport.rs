//! MCP's streamable HTTP transport at `/mcp`:
//!
//! - `POST`: one JSON-RPC message (or, for 2025-03-26 clients, a batch).
//!   Requests get `application/json` answers; notifications and client
//!   responses alone get `202 Accepted` with no body. `initialize` opens a
//!   session and returns its `Mcp-Session-Id`; every other message must
//!   carry it (missing: 400; unknown, expired or another key's: 404). A
//!   `MCP-Protocol-Version` header naming a version we do not speak: 400.
//! - `GET`: 405 (this server sends no server-initiated messages).
//! - `DELETE`: ends the session named by `Mcp-Session-Id` (204).
//!
//! `Origin`, authentication and per-key limits were checked by
//! `crate::guard` before these handlers run. A single request's answer is
//! HTTP 200 unless it is an auth error (401/403) or a refusal at the
//! gateway's bound on broker calls (503 + `Retry-After`).

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde_json::Value;

use super::{protocol, SUPPORTED_VERSIONS};
use crate::auth::Identity;
use crate::error::{ErrorCode, RpcError};
use crate::rpc::framing::{self, Call, Response as RpcResponse};
use crate::state::AppState;

/// The session header.
pub const SESSION_HEADER: &str = "mcp-session-id";
/// The protocol version header (2025-06-18 and later).
pub const VERSION_HEADER: &str = "mcp-protocol-version";

/// One message of a POST body, classified.
enum Message {
    Request(Call),
    Notification(Call),
    /// A response from the client, or an envelope we could not read as a
    /// request (answered with an error when it had a readable id).
    Other(Option<RpcResponse>),
}

fn classify(value: Value) -> Message {
    let is_response = value.get("method").is_none()
        && (value.get("result").is_some() || value.get("error").is_some());
    if is_response {
        return Message::Other(None);
    }
    match framing::parse_call(value) {
        Ok(call) if call.id.is_some() => Message::Request(call),
        Ok(call) => Message::Notification(call),
        Err(rejected) => Message::Other(Some(RpcResponse {
            id: rejected.id,
            outcome: Err(rejected.error),
        })),
    }
}

/// A transport-level failure: its status, and a JSON-RPC error with no id.
fn transport_error(status: StatusCode, message: impl Into<String>) -> Response {
    RpcError::transport(status, message).into_response()
}

/// `POST /mcp`.
pub async fn post(
    State(state): State<AppState>,
    Extension(identity): Extension<Identity>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let bytes = match crate::body::read(&state, &headers, body).await {
        Ok(bytes) => bytes,
        Err(err) if err.status() == StatusCode::OK => {
            return transport_error(StatusCode::BAD_REQUEST, err.message())
        }
        Err(err) => return err.into_response(),
    };
    let value: Value = match serde_json::from_slice(&bytes) {
        Ok(value) => value,
        Err(e) => {
            let err = RpcError::parse_error(format!("parse error: invalid JSON: {e}"));
            let mut response = err.into_response();
            *response.status_mut() = StatusCode::BAD_REQUEST;
            return response;
        }
    };
    let (values, batch) = match value {
        Value::Array(items) if items.is_empty() => {
            return transport_error(StatusCode::BAD_REQUEST, "invalid request: empty batch")
        }
        Value::Array(items) if items.len() > state.limits().max_batch => {
            return transport_error(
                StatusCode::BAD_REQUEST,
                format!(
                    "invalid request: batch over the limit of {}",
                    state.limits().max_batch
                ),
            )
        }
        Value::Array(items) => (items, true),
        other => (vec![other], false),
    };
    let messages: Vec<Message> = values.into_iter().map(classify).collect();

    // initialize opens a session; it must come alone.
    let initialize = messages
        .iter()
        .any(|m| matches!(m, Message::Request(c) if c.method == "initialize"));
    if initialize {
        let [Message::Request(call)] = messages.as_slice() else {
            return transport_error(
                StatusCode::BAD_REQUEST,
                "invalid request: initialize must be sent alone, not in a batch",
            );
        };
        return open_session(&state, &identity, call);
    }

    let Some(session_id) = headers.get(SESSION_HEADER).and_then(|v| v.to_str().ok()) else {
        return transport_error(
            StatusCode::BAD_REQUEST,
            "missing Mcp-Session-Id header: send initialize first and echo the session id it returns",
        );
    };
    let Some(version) = state.sessions().touch(session_id, &identity.key_id) else {
        return transport_error(
            StatusCode::NOT_FOUND,
            "unknown or expired MCP session: send initialize again to start a new one",
        );
    };
    if let Some(requested) = headers.get(VERSION_HEADER) {
        let requested = requested.to_str().unwrap_or_default();
        if !SUPPORTED_VERSIONS.contains(&requested) {
            let shown: String = requested.chars().take(32).collect();
            return transport_error(
                StatusCode::BAD_REQUEST,
                format!(
                    "unsupported MCP-Protocol-Version {shown:?}; supported: {}",
                    SUPPORTED_VERSIONS.join(", ")
                ),
            );
        }
    }

    let mut responses = Vec::new();
    for message in messages {
        match message {
            Message::Request(call) => {
                let id = call.id.clone().unwrap_or(Value::Null);
                let outcome = protocol::handle(&state, &identity, version, call).await;
                if let Err(err) = &outcome {
                    state.metrics().error(err.code().code());
                }
                responses.push(RpcResponse { id, outcome });
            }
            Message::Notification(call) => {
                tracing::debug!(method = %call.method.chars().take(64).collect::<String>(), "mcp notification");
            }
            Message::Other(Some(response)) => responses.push(response),
            Message::Other(None) => {}
        }
    }
    if responses.is_empty() {
        return StatusCode::ACCEPTED.into_response();
    }
    if batch {
        let body: Vec<Value> = responses.iter().map(RpcResponse::to_json).collect();
        return (StatusCode::OK, Json(Value::Array(body))).into_response();
    }
    let response = &responses[0];
    // Auth failures keep their HTTP status (403 for a namespace the key does
    // not cover), as on /api/v1/rpc, and so do refusals to retry (503 +
    // `Retry-After` at the gateway's bound on broker calls); everything else
    // is a 200 answer.
    let (status, retry_after) = match &response.outcome {
        Err(err) if err.code() == ErrorCode::Auth => (err.status(), None),
        Err(err) if err.retry_after_secs().is_some() => (err.status(), err.retry_after_secs()),
        _ => (StatusCode::OK, None),
    };
    let mut http = (status, Json(response.to_json())).into_response();
    if let Some(value) = retry_after.and_then(|s| HeaderValue::from_str(&s.to_string()).ok()) {
        http.headers_mut().insert(header::RETRY_AFTER, value);
    }
    http
}

fn open_session(state: &AppState, identity: &Identity, call: &Call) -> Response {
    let id = call.id.clone().unwrap_or(Value::Null);
    let version = match protocol::initialize_version(call.params.as_ref()) {
        Ok(version) => version,
        Err(err) => {
            let body = RpcResponse {
                id,
                outcome: Err(err),
            }
            .to_json();
            return (StatusCode::OK, Json(body)).into_response();
        }
    };
    let session = match state.sessions().create(&identity.key_id, version) {
        Ok(session) => session,
        Err(err) => {
            let body = RpcResponse {
                id,
                outcome: Err(err),
            }
            .to_json();
            return (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
        }
    };
    let request = crate::obs::request::current();
    tracing::info!(
        request_id = %request.id,
        client = %request.client,
        key_id = %identity.key_id,
        version,
        "mcp session opened"
    );
    let body = RpcResponse {
        id,
        outcome: Ok(protocol::initialize_result(version)),
    }
    .to_json();
    let mut response = (StatusCode::OK, Json(body)).into_response();
    if let Ok(value) = HeaderValue::from_str(&session) {
        response.headers_mut().insert(SESSION_HEADER, value);
    }
    response
}

/// `GET /mcp`: no server-initiated stream here.
pub async fn get() -> Response {
    let mut response = transport_error(
        StatusCode::METHOD_NOT_ALLOWED,
        "this server does not open an SSE stream on GET; POST messages to /mcp",
    );
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("POST, DELETE"));
    response
}

/// `DELETE /mcp`: ends the session.
pub async fn delete(
    State(state): State<AppState>,
    Extension(identity): Extension<Identity>,
    headers: HeaderMap,
) -> Response {
    let Some(session_id) = headers.get(SESSION_HEADER).and_then(|v| v.to_str().ok()) else {
        return transport_error(StatusCode::BAD_REQUEST, "missing Mcp-Session-Id header");
    };
    if state.sessions().remove(session_id, &identity.key_id) {
        let request = crate::obs::request::current();
        tracing::info!(
            request_id = %request.id,
            client = %request.client,
            key_id = %identity.key_id,
            "mcp session ended by the client"
        );
        StatusCode::NO_CONTENT.into_response()
    } else {
        transport_error(StatusCode::NOT_FOUND, "unknown or expired MCP session")
    }
}
