//! The five MCP tools. Each maps onto a JSON-RPC method: its arguments are
//! that method's params (same names, same checks), so `tools/call` parses
//! them with `rpc::params` and runs them with `rpc::call`. Bad arguments
//! and unknown tools are JSON-RPC `-32602` (a key that does not cover the
//! namespace: `-32002`, as on `/api/v1/rpc`); a call refused before it
//! reached the broker because the gateway is at `limits.max_broker_calls`
//! is JSON-RPC `-32000` (HTTP 503 + `Retry-After`, like the per-key limits
//! in `crate::guard`); a failed sandbox operation is a result with
//! `isError: true` and a message saying what to do.

use std::time::Instant;

use serde_json::{json, Map, Value};

use super::has_structured_output;
use crate::auth::Identity;
use crate::error::{ErrorCode, RpcError};
use crate::obs::audit::{self, Operation};
use crate::rpc::call;
use crate::rpc::methods::Method;
use crate::rpc::params;
use crate::state::AppState;

/// A tool: its name, the method it maps to, and its descriptions.
struct Tool {
    name: &'static str,
    method: Method,
    title: &'static str,
    description: &'static str,
}

const TOOLS: [Tool; 5] = [
    Tool {
        name: "sandbox_start",
        method: Method::SandboxStart,
        title: "Start a sandbox",
        description:
            "Start a sandbox (a microVM) so code and commands can run in it. With `config`, \
            the sandbox is defined (or redefined) with it first; without, a previously defined \
            sandbox of that name starts. Use image \"microsandbox/python\" for Python or \
            \"microsandbox/node\" for Node.js. Returns once the sandbox is ready.",
    },
    Tool {
        name: "sandbox_stop",
        method: Method::SandboxStop,
        title: "Stop a sandbox",
        description: "Stop a running sandbox and free its resources. Its definition is kept, so \
            sandbox_start without config starts it afresh.",
    },
    Tool {
        name: "sandbox_run_code",
        method: Method::SandboxReplRun,
        title: "Run code in a sandbox",
        description: "Run Python or JavaScript code in a running sandbox's interpreter session. \
            Variables, imports and functions persist between calls (per language). Output \
            lines come back in order with their stream (stdout/stderr).",
    },
    Tool {
        name: "sandbox_run_command",
        method: Method::SandboxCommandRun,
        title: "Run a command in a sandbox",
        description: "Run one program in a running sandbox: `command` with `args`, directly \
            (no shell; use command \"sh\" with args [\"-c\", \"...\"] for shell syntax). \
            Returns the exit code and output lines.",
    },
    Tool {
        name: "sandbox_get_metrics",
        method: Method::SandboxMetricsGet,
        title: "Get sandbox metrics",
        description: "List sandboxes with their state and usage: running, CPU percent, memory \
            MiB, disk bytes (null when unknown). namespace \"*\" means every namespace your \
            key covers; `sandbox` narrows to one.",
    },
];

fn name_schema(what: &str) -> Value {
    json!({
        "type": "string",
        "description": format!("{what}: 1-63 characters, letters, digits, '-' and '_', starting with a letter or digit"),
        "pattern": "^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$"
    })
}

fn strings(description: &str) -> Value {
    json!({"type": "array", "items": {"type": "string"}, "description": description})
}

fn timeout() -> Value {
    json!({"type": "integer", "minimum": 1, "description": "Seconds before the run is stopped (operator default and cap apply)"})
}

fn output_lines() -> Value {
    json!({
        "type": "array",
        "description": "Every stdout and stderr line in the order produced",
        "items": {
            "type": "object",
            "properties": {
                "stream": {"type": "string", "enum": ["stdout", "stderr"]},
                "text": {"type": "string"}
            },
            "required": ["stream", "text"]
        }
    })
}

fn input_schema(method: Method) -> Value {
    let (properties, required): (Value, &[&str]) = match method {
        Method::SandboxStart => (
            json!({
                "sandbox": name_schema("Sandbox name"),
                "namespace": name_schema("Namespace"),
                "config": {
                    "type": "object",
                    "description": "Sandbox configuration; omit to start a previously defined sandbox",
                    "additionalProperties": false,
                    "properties": {
                        "image": {"type": "string", "description": "Image, e.g. microsandbox/python, microsandbox/node"},
                        "memory": {"type": "integer", "minimum": 1, "description": "Guest RAM in MiB (default 512)"},
                        "cpus": {"type": "integer", "minimum": 1, "description": "vCPUs (default 1)"},
                        "volumes": strings("host:container[:ro] mounts"),
                        "ports": strings("host:container port forwards"),
                        "envs": strings("KEY=VALUE environment variables"),
                        "depends_on": strings("Sandboxes of the same namespace to start first"),
                        "workdir": {"type": "string", "description": "Working directory"},
                        "shell": {"type": "string", "description": "Shell for scripts (default /bin/sh)"},
                        "scripts": {"type": "object", "additionalProperties": {"type": "string"}, "description": "Named scripts"},
                        "exec": {"type": "string", "description": "Command launched in the background at start"},
                        "scope": {"type": "string", "enum": ["none", "group", "public", "any"], "description": "Network reach: none, group (same-namespace sandboxes by name), public (the internet, no private ranges), any; default and maximum set by the operator"}
                    }
                }
            }),
            &["sandbox", "namespace"],
        ),
        Method::SandboxStop => (
            json!({"sandbox": name_schema("Sandbox name"), "namespace": name_schema("Namespace")}),
            &["sandbox", "namespace"],
        ),
        Method::SandboxReplRun => (
            json!({
                "sandbox": name_schema("Sandbox name (already started)"),
                "namespace": name_schema("Namespace"),
                "language": {"type": "string", "enum": ["python", "nodejs", "node", "javascript"]},
                "code": {"type": "string", "description": "Code to run (a whole cell)"},
                "timeout": timeout()
            }),
            &["sandbox", "namespace", "language", "code"],
        ),
        Method::SandboxCommandRun => (
            json!({
                "sandbox": name_schema("Sandbox name (already started)"),
                "namespace": name_schema("Namespace"),
                "command": {"type": "string", "description": "Program to run (looked up in PATH)"},
                "args": strings("Arguments"),
                "timeout": timeout(),
                "envs": strings("KEY=VALUE variables for this run only"),
                "workdir": {"type": "string", "description": "Working directory for this run"}
            }),
            &["sandbox", "namespace", "command"],
        ),
        Method::SandboxMetricsGet => (
            json!({
                "namespace": {"type": "string", "description": "Namespace, or \"*\" for every namespace your key covers"},
                "sandbox": name_schema("Only this sandbox")
            }),
            &["namespace"],
        ),
    };
    json!({
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": false
    })
}

fn output_schema(method: Method) -> Value {
    match method {
        Method::SandboxStart | Method::SandboxStop => json!({
            "type": "object",
            "properties": {"message": {"type": "string"}},
            "required": ["message"]
        }),
        Method::SandboxReplRun => json!({
            "type": "object",
            "properties": {
                "status": {"type": "string", "enum": ["success", "error", "timeout"]},
                "language": {"type": "string"},
                "output": output_lines(),
                "error": {"type": "string", "description": "All stderr text"},
                "has_error": {"type": "boolean"},
                "state_lost": {"type": "boolean", "description": "The interpreter was restarted; earlier state is gone"}
            },
            "required": ["status", "language", "output", "error", "has_error"]
        }),
        Method::SandboxCommandRun => json!({
            "type": "object",
            "properties": {
                "command": {"type": "string"},
                "args": {"type": "array", "items": {"type": "string"}},
                "exit_code": {"type": "integer"},
                "success": {"type": "boolean"},
                "output": output_lines(),
                "error": {"type": "string", "description": "All stderr text"}
            },
            "required": ["command", "args", "exit_code", "success", "output", "error"]
        }),
        Method::SandboxMetricsGet => json!({
            "type": "object",
            "properties": {
                "sandboxes": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "namespace": {"type": "string"},
                            "name": {"type": "string"},
                            "running": {"type": "boolean"},
                            "cpu_usage": {"type": ["number", "null"], "description": "Percent of one CPU"},
                            "memory_usage": {"type": ["number", "null"], "description": "MiB"},
                            "disk_usage": {"type": ["integer", "null"], "description": "Bytes"},
                            "scope": {"type": "string", "description": "Network scope"},
                            "ports": {"type": "array", "items": {"type": "string"}, "description": "Published host:container ports"},
                            "volumes": {"type": "array", "items": {"type": "string"}, "description": "host:container[:ro] volumes"},
                            "address": {"type": ["string", "null"], "description": "Guest IPv4 address"},
                            "started_at_ms": {"type": ["integer", "null"], "description": "When the running VM became ready (Unix ms)"}
                        },
                        "required": ["namespace", "name", "running", "cpu_usage", "memory_usage", "disk_usage"]
                    }
                }
            },
            "required": ["sandboxes"]
        }),
    }
}

fn annotations(method: Method) -> Value {
    let (read_only, destructive, idempotent) = match method {
        Method::SandboxStart => (false, false, true),
        Method::SandboxStop => (false, true, false),
        Method::SandboxReplRun | Method::SandboxCommandRun => (false, true, false),
        Method::SandboxMetricsGet => (true, false, true),
    };
    json!({
        "readOnlyHint": read_only,
        "destructiveHint": destructive,
        "idempotentHint": idempotent,
        "openWorldHint": false
    })
}

/// `tools/list`'s result for a session speaking `version`.
pub fn list(version: &str) -> Value {
    let structured = has_structured_output(version);
    let tools: Vec<Value> = TOOLS
        .iter()
        .map(|tool| {
            let mut t = Map::new();
            t.insert("name".into(), json!(tool.name));
            if structured {
                t.insert("title".into(), json!(tool.title));
            }
            t.insert("description".into(), json!(tool.description));
            t.insert("inputSchema".into(), input_schema(tool.method));
            if structured {
                t.insert("outputSchema".into(), output_schema(tool.method));
            }
            if version >= "2025-03-26" {
                t.insert("annotations".into(), annotations(tool.method));
            }
            Value::Object(t)
        })
        .collect();
    json!({ "tools": tools })
}

/// `tools/call`.
pub async fn call(
    state: &AppState,
    identity: &Identity,
    version: &str,
    params: Option<Value>,
) -> Result<Value, RpcError> {
    let invalid = |m: String| RpcError::invalid_params(m);
    let Some(Value::Object(mut params)) = params else {
        return Err(invalid(
            "tools/call needs params {\"name\": tool, \"arguments\": {...}}".to_owned(),
        ));
    };
    let name = match params.remove("name") {
        Some(Value::String(name)) => name,
        _ => {
            return Err(invalid(
                "tools/call: \"name\" must be a tool name".to_owned(),
            ))
        }
    };
    let Some(tool) = TOOLS.iter().find(|t| t.name == name) else {
        let shown: String = name.chars().take(64).collect();
        return Err(invalid(format!(
            "unknown tool {shown:?}; tools: {}",
            TOOLS.map(|t| t.name).join(", ")
        )));
    };
    let arguments = match params.remove("arguments") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(arguments)) => arguments,
        Some(_) => return Err(invalid(format!("{name}: \"arguments\" must be an object"))),
    };
    let schema = input_schema(tool.method);
    let allowed = schema["properties"].as_object();
    if let Some(unknown) = arguments
        .keys()
        .find(|k| !allowed.is_some_and(|props| props.contains_key(*k)))
    {
        return Err(invalid(format!("{name}: unknown argument {unknown:?}")));
    }
    let started = Instant::now();
    let action = params::parse(tool.method, Some(Value::Object(arguments)))
        .map_err(|e| invalid(format!("{name}: {}", e.message())))?;
    call::authorize(state, identity, &action)?;
    let outcome = call::perform(state, identity, action.clone()).await;
    audit::record(
        state,
        &Operation {
            via: "mcp",
            key_id: &identity.key_id,
            method: tool.method.name(),
            namespace: Some(action.namespace()),
            sandbox: action.target().map(|t| t.name.as_str()),
            notification: false,
            started,
        },
        &outcome,
    );
    Ok(match outcome {
        Ok(result) => success(result, has_structured_output(version)),
        // A refusal made before any work (the gateway's bound on broker
        // calls): nothing happened, so it is the request that failed, as
        // for the per-key limits, not the tool.
        Err(err) if err.retry_after_secs().is_some() => return Err(err),
        Err(err) => failure(tool.name, &err),
    })
}

fn success(result: Value, structured: bool) -> Value {
    let (text, object) = match result {
        Value::String(message) => (message.clone(), json!({ "message": message })),
        other => (other.to_string(), other),
    };
    let mut out = json!({
        "content": [{"type": "text", "text": text}],
        "isError": false
    });
    if structured {
        out["structuredContent"] = object;
    }
    out
}

fn failure(tool: &str, err: &RpcError) -> Value {
    let hint = match err.code() {
        ErrorCode::NotFound => {
            "Start it with sandbox_start (with a config if it was never defined)."
        }
        ErrorCode::Server => "The server is busy or restarting; retry in a little while.",
        ErrorCode::InvalidParams => "Change the arguments and try again.",
        _ => "",
    };
    let message = err.message().trim_end();
    let sep = if hint.is_empty() {
        ""
    } else if message.ends_with('.') {
        " "
    } else {
        ". "
    };
    json!({
        "content": [{
            "type": "text",
            "text": format!("{tool} failed (error {}): {message}{sep}{hint}", err.code().code())
        }],
        "isError": true
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn five_tools_with_schemas_per_version() {
        let new = list("2025-11-25");
        let tools = new["tools"].as_array().unwrap();
        let names: Vec<&str> = tools.iter().map(|t| t["name"].as_str().unwrap()).collect();
        assert_eq!(
            names,
            [
                "sandbox_start",
                "sandbox_stop",
                "sandbox_run_code",
                "sandbox_run_command",
                "sandbox_get_metrics"
            ]
        );
        for t in tools {
            assert_eq!(t["inputSchema"]["type"], "object");
            assert_eq!(t["outputSchema"]["type"], "object");
            assert!(t["title"].is_string());
        }
        let old = list("2024-11-05");
        for t in old["tools"].as_array().unwrap() {
            assert!(t.get("outputSchema").is_none());
            assert!(t.get("title").is_none());
            assert!(t.get("annotations").is_none());
            assert_eq!(t["inputSchema"]["type"], "object");
        }
        let mid = list("2025-03-26");
        assert!(mid["tools"][0].get("annotations").is_some());
        assert!(mid["tools"][0].get("outputSchema").is_none());
    }

    #[test]
    fn tool_arguments_mirror_the_jsonrpc_params() {
        // Every schema property is a field the method's params accept:
        // a call with all of them parses (values of the right type).
        let run = json!({"sandbox": "a", "namespace": "b", "command": "ls", "args": ["-l"],
                         "timeout": 5, "envs": ["A=1"], "workdir": "/"});
        assert!(params::parse(Method::SandboxCommandRun, Some(run.clone())).is_ok());
        let props = input_schema(Method::SandboxCommandRun)["properties"].clone();
        assert_eq!(
            props.as_object().unwrap().len(),
            run.as_object().unwrap().len()
        );
        let code = json!({"sandbox": "a", "namespace": "b", "language": "python", "code": "1", "timeout": 1});
        assert!(params::parse(Method::SandboxReplRun, Some(code)).is_ok());
    }

    #[test]
    fn results_are_text_plus_structured_content() {
        let r = success(json!("Sandbox a started successfully"), true);
        assert_eq!(r["content"][0]["text"], "Sandbox a started successfully");
        assert_eq!(
            r["structuredContent"]["message"],
            "Sandbox a started successfully"
        );
        assert_eq!(r["isError"], false);
        let r = success(json!({"sandboxes": []}), false);
        assert!(r.get("structuredContent").is_none());
        assert_eq!(r["content"][0]["text"], "{\"sandboxes\":[]}");
        let r = failure(
            "sandbox_stop",
            &RpcError::not_found("sandbox default/x is not running"),
        );
        assert_eq!(r["isError"], true);
        let text = r["content"][0]["text"].as_str().unwrap();
        assert!(
            text.contains("-32003") && text.contains("sandbox_start"),
            "{text}"
        );
    }
}
