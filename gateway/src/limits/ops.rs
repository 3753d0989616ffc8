//! The operator's caps on what a sandbox operation may ask for: memory,
//! vCPUs, command/cell timeout. Over a cap is `-32602` naming the value and
//! the cap (never silently lowered); the broker enforces its own caps too.

use crate::config::Limits;
use crate::error::RpcError;
use crate::rpc::params::Action;

/// Checks `action` against the caps in `limits`.
pub fn check(action: &Action, limits: &Limits) -> Result<(), RpcError> {
    let over = |what: &str, value: u32, cap: u32, unit: &str| {
        RpcError::invalid_params(format!(
            "{what} {value}{unit} is over this server's limit of {cap}{unit}; ask for at most {cap}"
        ))
    };
    match action {
        Action::Start(request) => {
            if let Some(config) = &request.config {
                if let (Some(v), Some(cap)) = (config.memory_mib, limits.max_memory_mib) {
                    if v > cap {
                        return Err(over("config.memory", v, cap, " MiB"));
                    }
                }
                if let (Some(v), Some(cap)) = (config.cpus, limits.max_cpus) {
                    if v > cap {
                        return Err(over("config.cpus", v, cap, ""));
                    }
                }
            }
        }
        Action::RunCommand(run) => {
            if let (Some(v), Some(cap)) = (run.request.timeout_secs, limits.max_timeout_secs) {
                if v > cap {
                    return Err(over("timeout", v, cap, " s"));
                }
            }
        }
        Action::RunRepl(run) => {
            if let (Some(v), Some(cap)) = (run.request.timeout_secs, limits.max_timeout_secs) {
                if v > cap {
                    return Err(over("timeout", v, cap, " s"));
                }
            }
        }
        Action::Stop(_) | Action::Metrics(_) => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rpc::methods::Method;
    use crate::rpc::params::parse;
    use serde_json::json;

    fn limits() -> Limits {
        Limits {
            max_memory_mib: Some(1024),
            max_cpus: Some(2),
            max_timeout_secs: Some(60),
            ..Limits::default()
        }
    }

    #[test]
    fn over_the_caps_is_invalid_params() {
        let start = |config| {
            parse(
                Method::SandboxStart,
                Some(json!({"sandbox": "a", "namespace": "b", "config": config})),
            )
            .unwrap()
        };
        assert!(check(&start(json!({"memory": 1024, "cpus": 2})), &limits()).is_ok());
        let err = check(&start(json!({"memory": 2048})), &limits()).unwrap_err();
        assert_eq!(err.code().code(), -32602);
        assert!(
            err.message().contains("config.memory 2048 MiB"),
            "{}",
            err.message()
        );
        assert!(check(&start(json!({"cpus": 3})), &limits()).is_err());
        assert!(check(&start(json!({"memory": 99999})), &Limits::default()).is_ok());
        let run = parse(
            Method::SandboxCommandRun,
            Some(json!({"sandbox": "a", "namespace": "b", "command": "x", "timeout": 61})),
        )
        .unwrap();
        assert!(check(&run, &limits())
            .unwrap_err()
            .message()
            .contains("timeout 61 s"));
        let repl = parse(
            Method::SandboxReplRun,
            Some(json!({"sandbox": "a", "namespace": "b", "language": "python", "code": "1", "timeout": 600})),
        )
        .unwrap();
        assert!(check(&repl, &limits()).is_err());
    }
}
