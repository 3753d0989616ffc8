//! Typed params for each served method, and their conversion into an
//! [`Action`]: the broker's gRPC request plus what the result needs. Unknown
//! fields, wrong types, missing fields and bad values are `-32602` with a
//! message naming the field; the broker checks everything again and owns the
//! operator's caps.

use std::collections::HashMap;

use moat_proto::broker::{
    RunCommandRequest, RunReplRequest, SandboxConfig, SandboxRef, StartSandboxRequest,
    StopSandboxRequest,
};
use moat_proto::names::validate_name;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::methods::Method;
use crate::error::RpcError;

/// A validated request, ready for the broker.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Start(StartSandboxRequest),
    Stop(StopSandboxRequest),
    RunCommand(RunCommand),
    RunRepl(RunRepl),
    Metrics(MetricsQuery),
}

/// `sandbox.metrics.get`: which namespaces and sandbox to report. The
/// caller's key decides what `*` means (`rpc::call`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsQuery {
    /// `None` for `*`: every namespace the key covers.
    pub namespace: Option<String>,
    /// Only this sandbox.
    pub sandbox: Option<String>,
}

/// `sandbox.repl.run`: the broker request and how to shape its result.
#[derive(Debug, Clone, PartialEq)]
pub struct RunRepl {
    pub request: RunReplRequest,
    pub output_format: OutputFormat,
}

/// `sandbox.command.run`: the broker request and how to shape its result.
#[derive(Debug, Clone, PartialEq)]
pub struct RunCommand {
    pub request: RunCommandRequest,
    pub output_format: OutputFormat,
}

/// How `sandbox.command.run` returns `output`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    /// A list of `{"stream", "text"}` lines (what the microsandbox SDKs parse).
    #[default]
    Json,
    /// The stdout text as one string (the reference's shape).
    Text,
}

impl Action {
    /// The sandbox the action is about.
    pub fn target(&self) -> Option<&SandboxRef> {
        match self {
            Action::Start(r) => r.sandbox.as_ref(),
            Action::Stop(r) => r.sandbox.as_ref(),
            Action::RunCommand(r) => r.request.sandbox.as_ref(),
            Action::RunRepl(r) => r.request.sandbox.as_ref(),
            Action::Metrics(_) => None,
        }
    }

    /// The namespace the action is about (`*` for metrics of all).
    pub fn namespace(&self) -> &str {
        match self {
            Action::Metrics(q) => q.namespace.as_deref().unwrap_or("*"),
            other => other
                .target()
                .map(|t| t.namespace.as_str())
                .unwrap_or_default(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StartParams {
    sandbox: String,
    namespace: String,
    config: Option<StartConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StartConfig {
    image: Option<String>,
    memory: Option<u32>,
    cpus: Option<u32>,
    volumes: Option<Vec<String>>,
    ports: Option<Vec<String>>,
    envs: Option<Vec<String>>,
    depends_on: Option<Vec<String>>,
    workdir: Option<String>,
    shell: Option<String>,
    scripts: Option<HashMap<String, String>>,
    exec: Option<String>,
    /// moat extension: network scope ("none", "group", "public", "any").
    scope: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StopParams {
    sandbox: String,
    namespace: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CommandRunParams {
    sandbox: String,
    namespace: String,
    command: String,
    args: Option<Vec<String>>,
    timeout: Option<u32>,
    output_format: Option<OutputFormat>,
    /// moat extension: `KEY=VALUE` entries added to the sandbox's envs for this call.
    envs: Option<Vec<String>>,
    /// moat extension: working directory for this call.
    workdir: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MetricsParams {
    namespace: String,
    sandbox: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplRunParams {
    sandbox: String,
    namespace: String,
    language: String,
    code: String,
    timeout: Option<u32>,
    output_format: Option<OutputFormat>,
}

/// Parses and checks the params of a served method.
pub fn parse(method: Method, params: Option<Value>) -> Result<Action, RpcError> {
    let invalid = |message: String| {
        RpcError::invalid_params(format!("invalid params for {}: {message}", method.name()))
    };
    let params = match params {
        None => Value::Object(Map::new()),
        Some(object @ Value::Object(_)) => object,
        Some(_) => {
            return Err(invalid(
                "params must be an object with named fields, not an array".to_owned(),
            ))
        }
    };
    match method {
        Method::SandboxStart => {
            let p: StartParams = deserialize(params).map_err(invalid)?;
            let sandbox = sandbox_ref(&p.namespace, &p.sandbox).map_err(invalid)?;
            let config = p.config.map(start_config).transpose().map_err(invalid)?;
            Ok(Action::Start(StartSandboxRequest {
                sandbox: Some(sandbox),
                config,
                caller: None,
            }))
        }
        Method::SandboxStop => {
            let p: StopParams = deserialize(params).map_err(invalid)?;
            let sandbox = sandbox_ref(&p.namespace, &p.sandbox).map_err(invalid)?;
            Ok(Action::Stop(StopSandboxRequest {
                sandbox: Some(sandbox),
                caller: None,
            }))
        }
        Method::SandboxCommandRun => {
            let p: CommandRunParams = deserialize(params).map_err(invalid)?;
            let sandbox = sandbox_ref(&p.namespace, &p.sandbox).map_err(invalid)?;
            if p.command.is_empty() {
                return Err(invalid("command cannot be empty".to_owned()));
            }
            check_timeout(p.timeout).map_err(invalid)?;
            let envs = p.envs.unwrap_or_default();
            check_envs("envs", &envs).map_err(invalid)?;
            Ok(Action::RunCommand(RunCommand {
                request: RunCommandRequest {
                    sandbox: Some(sandbox),
                    command: p.command,
                    args: p.args.unwrap_or_default(),
                    timeout_secs: p.timeout,
                    envs,
                    workdir: p.workdir,
                    caller: None,
                },
                output_format: p.output_format.unwrap_or_default(),
            }))
        }
        Method::SandboxReplRun => {
            let p: ReplRunParams = deserialize(params).map_err(invalid)?;
            let sandbox = sandbox_ref(&p.namespace, &p.sandbox).map_err(invalid)?;
            let Some(language) = moat_proto::languages::session_language(&p.language) else {
                return Err(invalid(format!(
                    "language {:?} is not supported; use one of: {}",
                    shorten(&p.language),
                    moat_proto::languages::accepted()
                )));
            };
            check_timeout(p.timeout).map_err(invalid)?;
            Ok(Action::RunRepl(RunRepl {
                request: RunReplRequest {
                    sandbox: Some(sandbox),
                    language: language.to_owned(),
                    code: p.code,
                    timeout_secs: p.timeout,
                    caller: None,
                },
                output_format: p.output_format.unwrap_or_default(),
            }))
        }
        Method::SandboxMetricsGet => {
            let p: MetricsParams = deserialize(params).map_err(invalid)?;
            let namespace = if p.namespace == "*" {
                None
            } else {
                validate_name("namespace", &p.namespace)
                    .map_err(|e| invalid(format!("{e} (or \"*\" for every namespace)")))?;
                Some(p.namespace)
            };
            if let Some(name) = &p.sandbox {
                validate_name("sandbox name", name).map_err(|e| invalid(e.to_string()))?;
            }
            Ok(Action::Metrics(MetricsQuery {
                namespace,
                sandbox: p.sandbox,
            }))
        }
    }
}

/// Deserializes params, naming the field at fault (`config.memory: ...`).
fn deserialize<T: DeserializeOwned>(params: Value) -> Result<T, String> {
    serde_path_to_error::deserialize(params).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        if path.is_empty() || path == "." {
            inner.to_string()
        } else {
            format!("{path}: {inner}")
        }
    })
}

fn sandbox_ref(namespace: &str, sandbox: &str) -> Result<SandboxRef, String> {
    validate_name("sandbox name", sandbox).map_err(|e| e.to_string())?;
    validate_name("namespace", namespace).map_err(|e| e.to_string())?;
    Ok(SandboxRef {
        namespace: namespace.to_owned(),
        name: sandbox.to_owned(),
    })
}

fn start_config(c: StartConfig) -> Result<SandboxConfig, String> {
    if c.memory == Some(0) {
        return Err("config.memory must be a positive integer (MiB)".to_owned());
    }
    if c.cpus == Some(0) {
        return Err("config.cpus must be a positive integer".to_owned());
    }
    let envs = c.envs.unwrap_or_default();
    check_envs("config.envs", &envs)?;
    let depends_on = c.depends_on.unwrap_or_default();
    for (i, name) in depends_on.iter().enumerate() {
        validate_name("sandbox name", name).map_err(|e| format!("config.depends_on[{i}]: {e}"))?;
    }
    Ok(SandboxConfig {
        image: c.image,
        memory_mib: c.memory,
        cpus: c.cpus,
        volumes: c.volumes.unwrap_or_default(),
        ports: c.ports.unwrap_or_default(),
        envs,
        depends_on,
        workdir: c.workdir,
        shell: c.shell,
        scripts: c.scripts.unwrap_or_default(),
        exec: c.exec,
        scope: c.scope,
    })
}

fn check_timeout(timeout: Option<u32>) -> Result<(), String> {
    if timeout == Some(0) {
        return Err("timeout must be a positive integer (seconds)".to_owned());
    }
    Ok(())
}

fn check_envs(field: &str, envs: &[String]) -> Result<(), String> {
    for (i, env) in envs.iter().enumerate() {
        if !matches!(env.split_once('='), Some((key, _)) if !key.is_empty()) {
            return Err(format!(
                "{field}[{i}] must be KEY=VALUE with a non-empty KEY; got {:?}",
                shorten(env)
            ));
        }
    }
    Ok(())
}

/// At most 64 characters of a caller's value, for messages.
fn shorten(value: &str) -> String {
    const SHOWN: usize = 64;
    if value.chars().count() <= SHOWN {
        value.to_owned()
    } else {
        let head: String = value.chars().take(SHOWN).collect();
        format!("{head}...")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;
    use serde_json::json;

    fn message(method: Method, params: Value) -> String {
        let err = parse(method, Some(params)).unwrap_err();
        assert_eq!(err.code(), ErrorCode::InvalidParams, "{}", err.message());
        err.message().to_owned()
    }

    #[test]
    fn start_with_full_config_becomes_the_grpc_request() {
        let action = parse(
            Method::SandboxStart,
            Some(json!({
                "sandbox": "py", "namespace": "default",
                "config": {
                    "image": "microsandbox/python", "memory": 1024, "cpus": 2,
                    "volumes": ["data:/data:ro"], "ports": [], "envs": ["DEBUG=true", "EMPTY="],
                    "depends_on": ["db"], "workdir": "/workspace", "shell": "/bin/bash", "scope": "group",
                    "scripts": {"start": "python app.py"}, "exec": null
                }
            })),
        )
        .unwrap();
        let Action::Start(req) = action else {
            panic!("not a start")
        };
        let sandbox = req.sandbox.unwrap();
        assert_eq!(
            (sandbox.namespace.as_str(), sandbox.name.as_str()),
            ("default", "py")
        );
        let config = req.config.unwrap();
        assert_eq!(config.image.as_deref(), Some("microsandbox/python"));
        assert_eq!(config.memory_mib, Some(1024));
        assert_eq!(config.cpus, Some(2));
        assert_eq!(config.envs, vec!["DEBUG=true", "EMPTY="]);
        assert_eq!(config.depends_on, vec!["db"]);
        assert_eq!(config.scope.as_deref(), Some("group"));
        assert_eq!(
            config.scripts.get("start").map(String::as_str),
            Some("python app.py")
        );
        assert_eq!(config.exec, None);
    }

    #[test]
    fn start_without_config_has_no_config() {
        let action = parse(
            Method::SandboxStart,
            Some(json!({"sandbox": "py", "namespace": "default"})),
        )
        .unwrap();
        assert!(matches!(
            action,
            Action::Start(StartSandboxRequest { config: None, .. })
        ));
    }

    #[test]
    fn unknown_fields_are_named() {
        let msg = message(
            Method::SandboxStart,
            json!({"sandbox": "a", "namespace": "b", "config": {"imgae": "x"}}),
        );
        assert!(
            msg.starts_with("invalid params for sandbox.start: "),
            "{msg}"
        );
        assert!(msg.contains("unknown field `imgae`"), "{msg}");
        let msg = message(
            Method::SandboxStop,
            json!({"sandbox": "a", "namespace": "b", "force": true}),
        );
        assert!(msg.contains("unknown field `force`"), "{msg}");
    }

    #[test]
    fn wrong_types_name_the_field() {
        let msg = message(
            Method::SandboxStart,
            json!({"sandbox": "a", "namespace": "b", "config": {"memory": "1G"}}),
        );
        assert!(msg.contains("config.memory"), "{msg}");
        let msg = message(
            Method::SandboxStart,
            json!({"sandbox": "a", "namespace": "b", "config": {"cpus": -1}}),
        );
        assert!(msg.contains("config.cpus"), "{msg}");
        let msg = message(
            Method::SandboxCommandRun,
            json!({"sandbox": "a", "namespace": "b", "command": "ls", "args": "-la"}),
        );
        assert!(msg.contains("args"), "{msg}");
    }

    #[test]
    fn missing_fields_are_named() {
        let msg = message(Method::SandboxStop, json!({"sandbox": "a"}));
        assert_eq!(
            msg,
            "invalid params for sandbox.stop: missing field `namespace`"
        );
        let err = parse(Method::SandboxStart, None).unwrap_err();
        assert!(
            err.message().contains("missing field `sandbox`"),
            "{}",
            err.message()
        );
    }

    #[test]
    fn array_params_are_refused() {
        let msg = message(Method::SandboxStop, json!(["a", "b"]));
        assert!(msg.contains("must be an object"), "{msg}");
    }

    #[test]
    fn names_are_validated() {
        let msg = message(
            Method::SandboxStop,
            json!({"sandbox": "a/b", "namespace": "x"}),
        );
        assert!(
            msg.starts_with("invalid params for sandbox.stop: sandbox name"),
            "{msg}"
        );
        let msg = message(
            Method::SandboxStop,
            json!({"sandbox": "a", "namespace": ""}),
        );
        assert!(msg.contains("namespace cannot be empty"), "{msg}");
        let msg = message(
            Method::SandboxStart,
            json!({"sandbox": "a", "namespace": "x", "config": {"depends_on": ["../etc"]}}),
        );
        assert!(msg.contains("config.depends_on[0]"), "{msg}");
    }

    #[test]
    fn config_values_are_checked() {
        for (config, needle) in [
            (json!({"memory": 0}), "config.memory"),
            (json!({"cpus": 0}), "config.cpus"),
            (json!({"memory": 1.5}), "config.memory"),
            (json!({"envs": ["NOEQUALS"]}), "config.envs[0]"),
            (json!({"envs": ["A=1", "=value"]}), "config.envs[1]"),
        ] {
            let msg = message(
                Method::SandboxStart,
                json!({"sandbox": "a", "namespace": "b", "config": config}),
            );
            assert!(msg.contains(needle), "{needle}: {msg}");
        }
    }

    #[test]
    fn command_run_params() {
        let action = parse(
            Method::SandboxCommandRun,
            Some(json!({
                "sandbox": "a", "namespace": "b", "command": "ls", "args": ["-la"],
                "timeout": 5, "output_format": "text"
            })),
        )
        .unwrap();
        let Action::RunCommand(run) = action else {
            panic!("not a command")
        };
        assert_eq!(run.request.command, "ls");
        assert_eq!(run.request.args, vec!["-la"]);
        assert_eq!(run.request.timeout_secs, Some(5));
        assert_eq!(run.output_format, OutputFormat::Text);

        let action = parse(
            Method::SandboxCommandRun,
            Some(json!({"sandbox": "a", "namespace": "b", "command": "ls"})),
        )
        .unwrap();
        let Action::RunCommand(run) = action else {
            panic!("not a command")
        };
        assert!(run.request.args.is_empty());
        assert_eq!(run.request.timeout_secs, None);
        assert_eq!(run.output_format, OutputFormat::Json);
    }

    #[test]
    fn metrics_params() {
        let q = |params: Value| match parse(Method::SandboxMetricsGet, Some(params)) {
            Ok(Action::Metrics(q)) => q,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            q(json!({"namespace": "*"})),
            MetricsQuery {
                namespace: None,
                sandbox: None
            }
        );
        assert_eq!(
            q(json!({"namespace": "a", "sandbox": "x"})),
            MetricsQuery {
                namespace: Some("a".into()),
                sandbox: Some("x".into())
            }
        );
        let msg = message(Method::SandboxMetricsGet, json!({"namespace": "a*"}));
        assert!(msg.contains("namespace"), "{msg}");
        let msg = message(
            Method::SandboxMetricsGet,
            json!({"namespace": "*", "sandbox": "*"}),
        );
        assert!(msg.contains("sandbox name"), "{msg}");
        let msg = message(Method::SandboxMetricsGet, json!({}));
        assert!(msg.contains("missing field `namespace`"), "{msg}");
        let msg = message(Method::SandboxMetricsGet, json!({"namespace": "a", "x": 1}));
        assert!(msg.contains("unknown field `x`"), "{msg}");
    }

    #[test]
    fn command_run_values_are_checked() {
        let base = |extra: Value| {
            let mut p = json!({"sandbox": "a", "namespace": "b", "command": "ls"});
            if let (Value::Object(p), Value::Object(extra)) = (&mut p, extra) {
                p.extend(extra);
            }
            p
        };
        let msg = message(Method::SandboxCommandRun, base(json!({"command": ""})));
        assert!(msg.contains("command cannot be empty"), "{msg}");
        let msg = message(Method::SandboxCommandRun, base(json!({"timeout": 0})));
        assert!(msg.contains("timeout must be a positive integer"), "{msg}");
        let msg = message(
            Method::SandboxCommandRun,
            base(json!({"output_format": "xml"})),
        );
        assert!(msg.contains("output_format"), "{msg}");
    }
}
