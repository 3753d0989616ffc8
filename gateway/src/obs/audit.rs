//! The audit line: one log event (target `moat_gateway::audit`) per sandbox
//! operation, from JSON-RPC or MCP, with the request id, client address,
//! key id, namespace, sandbox, method, outcome, error code and duration.
//! Also feeds the call counters.

use std::time::Instant;

use serde_json::Value;

use crate::error::{ErrorCode, RpcError};
use crate::state::AppState;

/// What one operation was.
pub struct Operation<'a> {
    /// `jsonrpc` or `mcp`.
    pub via: &'static str,
    pub key_id: &'a str,
    /// Wire method name (or a bounded, escaped form of an unknown one).
    pub method: &'a str,
    pub namespace: Option<&'a str>,
    pub sandbox: Option<&'a str>,
    pub notification: bool,
    pub started: Instant,
}

/// Logs the audit line for `op` and counts it.
pub fn record(state: &AppState, op: &Operation<'_>, outcome: &Result<Value, RpcError>) {
    let duration_ms = op.started.elapsed().as_millis() as u64;
    let code = outcome.as_ref().err().map(|e| e.code().code());
    state
        .metrics()
        .rpc_call(op.via, op.method, code, op.started.elapsed());
    let (key_id, method, via) = (op.key_id, op.method, op.via);
    let (namespace, sandbox, notification) = (op.namespace, op.sandbox, op.notification);
    let request = super::request::current();
    let (request_id, client) = (request.id, request.client);
    match outcome {
        Ok(_) => tracing::info!(
            target: "moat_gateway::audit",
            %request_id, %client, via, key_id, %method, namespace, sandbox, notification,
            outcome = "ok", duration_ms, "sandbox operation"
        ),
        Err(err) if matches!(err.code(), ErrorCode::Internal | ErrorCode::Server) => {
            tracing::warn!(
                target: "moat_gateway::audit",
                %request_id, %client, via, key_id, %method, namespace, sandbox, notification, outcome = "error",
                code = err.code().code(), error = %err, duration_ms, "sandbox operation"
            )
        }
        Err(err) => tracing::info!(
            target: "moat_gateway::audit",
            %request_id, %client, via, key_id, %method, namespace, sandbox, notification, outcome = "error",
            code = err.code().code(), error = %err, duration_ms, "sandbox operation"
        ),
    }
}
