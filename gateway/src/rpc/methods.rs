//! The JSON-RPC method names moat knows, which of them this build serves,
//! and the `-32601` answers for the rest.

use crate::error::RpcError;

/// A known method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    SandboxStart,
    SandboxStop,
    SandboxCommandRun,
    SandboxMetricsGet,
    SandboxReplRun,
}

impl Method {
    /// Every known method, served or not.
    pub const ALL: [Method; 5] = [
        Method::SandboxStart,
        Method::SandboxStop,
        Method::SandboxCommandRun,
        Method::SandboxMetricsGet,
        Method::SandboxReplRun,
    ];

    /// The wire name.
    pub fn name(self) -> &'static str {
        match self {
            Method::SandboxStart => "sandbox.start",
            Method::SandboxStop => "sandbox.stop",
            Method::SandboxCommandRun => "sandbox.command.run",
            Method::SandboxMetricsGet => "sandbox.metrics.get",
            Method::SandboxReplRun => "sandbox.repl.run",
        }
    }

    /// Whether this build answers the method.
    pub fn is_served(self) -> bool {
        true
    }

    /// The `-32601` answer for a known method this build does not serve.
    pub fn not_available(self) -> RpcError {
        RpcError::method_not_found(format!(
            "{} is not available in this moat build yet",
            self.name()
        ))
    }

    /// Looks up a method the client asked for: `-32601` when it is unknown
    /// (naming the ones available) or not served by this build yet.
    pub fn lookup(name: &str) -> Result<Method, RpcError> {
        match Method::ALL.into_iter().find(|m| m.name() == name) {
            Some(method) if method.is_served() => Ok(method),
            Some(method) => Err(method.not_available()),
            None => {
                let available: Vec<&str> = Method::ALL
                    .into_iter()
                    .filter(|m| m.is_served())
                    .map(Method::name)
                    .collect();
                let shown: String = name.chars().take(64).collect();
                Err(RpcError::method_not_found(format!(
                    "method not found: {shown:?}; available methods: {}",
                    available.join(", ")
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;

    #[test]
    fn served_methods_are_found() {
        assert_eq!(Method::lookup("sandbox.start"), Ok(Method::SandboxStart));
        assert_eq!(Method::lookup("sandbox.stop"), Ok(Method::SandboxStop));
        assert_eq!(
            Method::lookup("sandbox.command.run"),
            Ok(Method::SandboxCommandRun)
        );
        assert_eq!(
            Method::lookup("sandbox.repl.run"),
            Ok(Method::SandboxReplRun)
        );
    }

    #[test]
    fn every_method_is_served() {
        assert_eq!(
            Method::lookup("sandbox.metrics.get"),
            Ok(Method::SandboxMetricsGet)
        );
        assert!(Method::ALL.iter().all(|m| m.is_served()));
    }

    #[test]
    fn unknown_method_names_it_and_lists_available() {
        let err = Method::lookup("sandbox.explode").unwrap_err();
        assert_eq!(err.code(), ErrorCode::MethodNotFound);
        assert_eq!(
            err.message(),
            "method not found: \"sandbox.explode\"; available methods: \
             sandbox.start, sandbox.stop, sandbox.command.run, sandbox.metrics.get, sandbox.repl.run"
        );
    }
}
