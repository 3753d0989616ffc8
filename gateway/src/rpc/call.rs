//! Runs one well-formed JSON-RPC call: method lookup, params, the caller's
//! namespace check and the operator's caps, the broker call with its
//! deadline (the caller's identity attached), the result, and the call's
//! audit line. [`execute`] is shared with the MCP tools.

use std::time::Instant;

use moat_proto::broker::GetMetricsRequest;
use serde_json::Value;

use super::framing::Call;
use super::methods::Method;
use super::params::{self, Action};
use super::results;
use crate::auth::{Identity, Namespaces};
use crate::error::RpcError;
use crate::limits::ops;
use crate::obs::audit::{self, Operation};
use crate::state::AppState;

/// Runs `call` for `identity` and writes its audit line.
pub async fn run(state: &AppState, identity: &Identity, call: Call) -> Result<Value, RpcError> {
    let started = Instant::now();
    let method = Method::lookup(&call.method);
    let action = method
        .clone()
        .and_then(|method| params::parse(method, call.params));
    let outcome = match &action {
        Ok(action) => execute(state, identity, action.clone()).await,
        Err(err) => Err(err.clone()),
    };
    // An unknown method name is the caller's text: log a bounded, escaped
    // prefix of it.
    let method_name = match method {
        Ok(method) => method.name().to_owned(),
        Err(_) => format!("{:?}", call.method.chars().take(64).collect::<String>()),
    };
    let action = action.ok();
    audit::record(
        state,
        &Operation {
            via: "jsonrpc",
            key_id: &identity.key_id,
            method: &method_name,
            namespace: action.as_ref().map(Action::namespace),
            sandbox: action
                .as_ref()
                .and_then(Action::target)
                .map(|t| t.name.as_str()),
            notification: call.id.is_none(),
            started,
        },
        &outcome,
    );
    outcome
}

/// Checks `action` against the caller's namespaces and the operator's caps,
/// then runs it on the broker with the caller attached.
pub async fn execute(
    state: &AppState,
    identity: &Identity,
    action: Action,
) -> Result<Value, RpcError> {
    authorize(state, identity, &action)?;
    perform(state, identity, action).await
}

/// The checks made before anything reaches the broker: the caller's key
/// covers the namespace (HTTP 403 otherwise), and the operator's caps.
pub fn authorize(state: &AppState, identity: &Identity, action: &Action) -> Result<(), RpcError> {
    match action {
        Action::Metrics(query) => {
            if let Some(ns) = &query.namespace {
                identity.check(ns)?;
            }
        }
        other => identity.check(other.namespace())?,
    }
    ops::check(action, state.limits())
}

/// Runs an authorized `action` on the broker.
pub async fn perform(
    state: &AppState,
    identity: &Identity,
    action: Action,
) -> Result<Value, RpcError> {
    let broker = state.broker();
    let deadlines = state.deadlines();
    let caller = Some(identity.caller());
    let name = action
        .target()
        .map(|target| target.name.clone())
        .unwrap_or_default();
    match action {
        Action::Start(mut request) => {
            request.caller = caller;
            broker.start_sandbox(request, deadlines.start).await?;
            Ok(results::started(&name))
        }
        Action::Stop(mut request) => {
            request.caller = caller;
            broker.stop_sandbox(request, deadlines.stop).await?;
            Ok(results::stopped(&name))
        }
        Action::RunCommand(mut run) => {
            run.request.caller = caller;
            let deadline = deadlines.command(run.request.timeout_secs);
            let reply = broker.run_command(run.request.clone(), deadline).await?;
            Ok(results::command(&run, reply))
        }
        Action::RunRepl(mut run) => {
            run.request.caller = caller;
            let deadline = deadlines.command(run.request.timeout_secs);
            let reply = broker.run_repl(run.request.clone(), deadline).await?;
            Ok(results::repl(&run, reply))
        }
        Action::Metrics(query) => {
            let (namespaces, all_namespaces) = match (&query.namespace, &*identity.namespaces) {
                (Some(ns), _) => (vec![ns.clone()], false),
                (None, Namespaces::All) => (Vec::new(), true),
                (None, Namespaces::Only(set)) => (set.iter().cloned().collect(), false),
            };
            let request = GetMetricsRequest {
                namespaces,
                all_namespaces,
                sandbox: query.sandbox,
                caller,
            };
            let reply = broker.get_metrics(request, deadlines.health).await?;
            Ok(results::metrics(reply))
        }
    }
}
