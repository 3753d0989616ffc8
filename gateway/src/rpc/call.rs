//! Runs one well-formed JSON-RPC call: method lookup, params, the broker
//! call with its deadline, the result, and the call's one log line.

use std::time::Instant;

use moat_proto::broker::SandboxRef;
use serde_json::Value;

use super::framing::Call;
use super::methods::Method;
use super::params::{self, Action};
use super::results;
use crate::error::{ErrorCode, RpcError};
use crate::state::AppState;

/// Runs `call` and logs method, target, outcome and duration.
pub async fn run(state: &AppState, call: Call) -> Result<Value, RpcError> {
    let started = Instant::now();
    let method = Method::lookup(&call.method);
    let action = method
        .clone()
        .and_then(|method| params::parse(method, call.params));
    let target = action.as_ref().ok().and_then(Action::target).cloned();
    let outcome = match action {
        Ok(action) => execute(state, action).await,
        Err(err) => Err(err),
    };
    log(
        &call.method,
        method.ok(),
        target.as_ref(),
        call.id.is_none(),
        &outcome,
        started,
    );
    outcome
}

async fn execute(state: &AppState, action: Action) -> Result<Value, RpcError> {
    let broker = state.broker();
    let deadlines = state.deadlines();
    let name = action
        .target()
        .map(|target| target.name.clone())
        .unwrap_or_default();
    match action {
        Action::Start(request) => {
            broker.start_sandbox(request, deadlines.start).await?;
            Ok(results::started(&name))
        }
        Action::Stop(request) => {
            broker.stop_sandbox(request, deadlines.stop).await?;
            Ok(results::stopped(&name))
        }
        Action::RunCommand(run) => {
            let deadline = deadlines.command(run.request.timeout_secs);
            let reply = broker.run_command(run.request.clone(), deadline).await?;
            Ok(results::command(&run, reply))
        }
    }
}

fn log(
    requested: &str,
    method: Option<Method>,
    target: Option<&SandboxRef>,
    notification: bool,
    outcome: &Result<Value, RpcError>,
    started: Instant,
) {
    // An unknown method name is the caller's text: log a bounded, escaped
    // prefix of it.
    let method: String = match method {
        Some(method) => method.name().to_owned(),
        None => format!("{:?}", requested.chars().take(64).collect::<String>()),
    };
    let namespace = target.map(|t| t.namespace.as_str());
    let sandbox = target.map(|t| t.name.as_str());
    let duration_ms = started.elapsed().as_millis() as u64;
    match outcome {
        Ok(_) => tracing::info!(
            %method, namespace, sandbox, notification, outcome = "ok", duration_ms,
            "rpc call"
        ),
        Err(err) if matches!(err.code(), ErrorCode::Internal | ErrorCode::Server) => {
            tracing::warn!(
                %method, namespace, sandbox, notification, outcome = "error",
                code = err.code().code(), error = %err, duration_ms,
                "rpc call"
            )
        }
        Err(err) => tracing::info!(
            %method, namespace, sandbox, notification, outcome = "error",
            code = err.code().code(), error = %err, duration_ms,
            "rpc call"
        ),
    }
}
