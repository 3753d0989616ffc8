//! MCP messages once the transport has found the session: `initialize`
//! (version negotiation, capabilities), `ping`, and dispatch to tools and
//! prompts. Notifications need no answer; unknown methods are `-32601`.

use serde_json::{json, Value};

use super::{negotiate, prompts, tools};
use crate::auth::Identity;
use crate::error::RpcError;
use crate::rpc::framing::Call;
use crate::state::AppState;

/// Methods this server answers.
pub const METHODS: [&str; 7] = [
    "initialize",
    "ping",
    "tools/list",
    "tools/call",
    "prompts/list",
    "prompts/get",
    "notifications/initialized",
];

/// The version an `initialize` request's params ask for, negotiated.
pub fn initialize_version(params: Option<&Value>) -> Result<&'static str, RpcError> {
    match params.and_then(|p| p.get("protocolVersion")) {
        Some(Value::String(requested)) => Ok(negotiate(requested)),
        _ => Err(RpcError::invalid_params(
            "initialize: params.protocolVersion must be a string such as \"2025-11-25\"",
        )),
    }
}

/// `initialize`'s result for `version`.
pub fn initialize_result(version: &str) -> Value {
    let mut info = json!({"name": "moat", "version": env!("CARGO_PKG_VERSION")});
    if super::has_structured_output(version) {
        info["title"] = json!("moat sandboxes");
    }
    json!({
        "protocolVersion": version,
        "capabilities": {
            "tools": {"listChanged": false},
            "prompts": {"listChanged": false}
        },
        "serverInfo": info,
        "instructions": "Run untrusted code in isolated microVM sandboxes. Start a sandbox with \
            sandbox_start (image microsandbox/python or microsandbox/node), run code with \
            sandbox_run_code or programs with sandbox_run_command, and stop it with sandbox_stop \
            when done. Sandboxes live in namespaces; your API key covers some of them."
    })
}

/// Answers one request (not `initialize`, which the transport handles) in a
/// session speaking `version`.
pub async fn handle(
    state: &AppState,
    identity: &Identity,
    version: &str,
    call: Call,
) -> Result<Value, RpcError> {
    match call.method.as_str() {
        "ping" => Ok(json!({})),
        "tools/list" => Ok(tools::list(version)),
        "tools/call" => tools::call(state, identity, version, call.params).await,
        "prompts/list" => Ok(prompts::list(version)),
        "prompts/get" => prompts::get(call.params),
        "initialize" => Err(RpcError::invalid_request(
            "initialize may only be sent once, to open a session (without Mcp-Session-Id)",
        )),
        other => {
            let shown: String = other.chars().take(64).collect();
            Err(RpcError::method_not_found(format!(
                "method not found: {shown:?}; this server answers {}",
                METHODS[..6].join(", ")
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initialize_negotiates() {
        let v = initialize_version(Some(&json!({"protocolVersion": "2024-11-05"}))).unwrap();
        assert_eq!(v, "2024-11-05");
        let v = initialize_version(Some(&json!({"protocolVersion": "2030-01-01"}))).unwrap();
        assert_eq!(v, "2025-11-25");
        assert!(initialize_version(Some(&json!({}))).is_err());
        assert!(initialize_version(None).is_err());
        let r = initialize_result("2025-06-18");
        assert_eq!(r["protocolVersion"], "2025-06-18");
        assert_eq!(r["capabilities"]["tools"]["listChanged"], false);
        assert_eq!(r["serverInfo"]["name"], "moat");
    }
}
