//! The gateway's one wire error, [`RpcError`]: a JSON-RPC error code, the
//! HTTP status that carries it and a message for humans, plus
//! [`from_status`], the single place where a broker `tonic::Status` becomes
//! such an error. Every failure a client can see goes through this type, so
//! there is no path to an opaque HTTP 500.

use std::error::Error as _;
use std::path::Path;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use tonic::Code;

/// The JSON-RPC error codes of the wire contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// `-32700`: the body is not JSON.
    ParseError,
    /// `-32600`: not a valid JSON-RPC request (or the body is too large).
    InvalidRequest,
    /// `-32601`: no such method (or not served by this build).
    MethodNotFound,
    /// `-32602`: bad params: names, unknown fields, values over limits.
    InvalidParams,
    /// `-32603`: the operation failed.
    Internal,
    /// `-32000`: the server is overloaded, shutting down or unreachable.
    Server,
    /// `-32002`: authentication or authorization failed.
    Auth,
    /// `-32003`: the named sandbox does not exist.
    NotFound,
}

impl ErrorCode {
    /// The number sent as `error.code`.
    pub fn code(self) -> i32 {
        match self {
            ErrorCode::ParseError => -32700,
            ErrorCode::InvalidRequest => -32600,
            ErrorCode::MethodNotFound => -32601,
            ErrorCode::InvalidParams => -32602,
            ErrorCode::Internal => -32603,
            ErrorCode::Server => -32000,
            ErrorCode::Auth => -32002,
            ErrorCode::NotFound => -32003,
        }
    }
}

/// A failure as the client sees it: JSON-RPC code, HTTP status (used when
/// the error answers a single request) and message.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct RpcError {
    code: ErrorCode,
    status: StatusCode,
    message: String,
    data: Option<Value>,
    retry_after_secs: Option<u64>,
}

impl RpcError {
    fn new(code: ErrorCode, status: StatusCode, message: impl Into<String>) -> Self {
        RpcError {
            code,
            status,
            message: message.into(),
            data: None,
            retry_after_secs: None,
        }
    }

    /// `-32700`, HTTP 200.
    pub fn parse_error(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::ParseError, StatusCode::OK, message)
    }

    /// `-32600`, HTTP 200.
    pub fn invalid_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidRequest, StatusCode::OK, message)
    }

    /// `-32600`, HTTP 413: the body is larger than `limit` bytes.
    pub fn body_too_large(limit: usize) -> Self {
        Self::new(
            ErrorCode::InvalidRequest,
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body is larger than the limit of {limit} bytes"),
        )
    }

    /// `-32601`, HTTP 200.
    pub fn method_not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::MethodNotFound, StatusCode::OK, message)
    }

    /// `-32602`, HTTP 200.
    pub fn invalid_params(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidParams, StatusCode::OK, message)
    }

    /// `-32603`, HTTP 200.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, StatusCode::OK, message)
    }

    /// `-32003`, HTTP 200.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, StatusCode::OK, message)
    }

    /// `-32000`, HTTP 503: the broker cannot be reached or is shutting down.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Server, StatusCode::SERVICE_UNAVAILABLE, message)
    }

    /// `-32000`, HTTP 200: the broker is out of capacity.
    pub fn overloaded(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Server, StatusCode::OK, message)
    }

    /// `-32002`, HTTP 401: no valid credentials.
    pub fn unauthenticated(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Auth, StatusCode::UNAUTHORIZED, message)
    }

    /// `-32002`, HTTP 403: valid credentials that do not cover the request.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Auth, StatusCode::FORBIDDEN, message)
    }

    /// `-32000`, HTTP 429 with `Retry-After`: over the key's rate or
    /// concurrency limit.
    pub fn rate_limited(message: impl Into<String>, retry_after_secs: u64) -> Self {
        let mut err = Self::new(ErrorCode::Server, StatusCode::TOO_MANY_REQUESTS, message);
        err.retry_after_secs = Some(retry_after_secs);
        err
    }

    /// `-32000`, HTTP 503 with `Retry-After: 1`: the gateway already has
    /// `max` broker calls in flight (`limits.max_broker_calls`, all keys
    /// together). Nothing was done; the same call may simply be sent again.
    pub fn at_capacity(max: usize) -> Self {
        let mut err = Self::new(
            ErrorCode::Server,
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the server is at its limit of {max} calls in flight; retry after a second"),
        );
        err.retry_after_secs = Some(1);
        err
    }

    /// `-32600`, HTTP 408: the client did not send its body in time.
    pub fn body_timeout(secs: u64) -> Self {
        Self::new(
            ErrorCode::InvalidRequest,
            StatusCode::REQUEST_TIMEOUT,
            format!("the request body was not received within {secs} s"),
        )
    }

    /// `-32600` with an HTTP status of the caller's choosing (MCP transport
    /// errors: 400, 404, 405, 406).
    pub fn transport(status: StatusCode, message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidRequest, status, message)
    }

    /// The `Retry-After` seconds of a refusal made before any work was
    /// done (429 over a key's rate or concurrency, 503 at the gateway's
    /// bound on broker calls): the caller may send the same request again.
    pub fn retry_after_secs(&self) -> Option<u64> {
        self.retry_after_secs
    }

    /// Attaches structured detail, sent as `error.data`.
    pub fn with_data(mut self, data: Value) -> Self {
        self.data = Some(data);
        self
    }

    /// The JSON-RPC error code.
    pub fn code(&self) -> ErrorCode {
        self.code
    }

    /// The HTTP status for a response made of this error alone.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The human-readable message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The JSON-RPC `error` object.
    pub fn to_json(&self) -> Value {
        let mut error = json!({ "code": self.code.code(), "message": self.message });
        if let (Some(data), Value::Object(map)) = (&self.data, &mut error) {
            map.insert("data".to_owned(), data.clone());
        }
        error
    }
}

impl IntoResponse for RpcError {
    /// A response made of this error alone: its HTTP status, a JSON-RPC
    /// error object with `id: null`, and `Retry-After` on a refusal.
    fn into_response(self) -> Response {
        let body = json!({"jsonrpc": "2.0", "error": self.to_json(), "id": null});
        let mut response = (self.status, Json(body)).into_response();
        close_after_unread_body(&mut response);
        if let Some(secs) = self.retry_after_secs {
            if let Ok(value) = HeaderValue::from_str(&secs.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, value);
            }
        }
        response
    }
}

/// A 413 leaves the request body unread, so the connection cannot carry
/// another request: say so, and clients open a fresh one instead of
/// reusing it.
pub fn close_after_unread_body(response: &mut Response) {
    if response.status() == StatusCode::PAYLOAD_TOO_LARGE {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
}

/// Maps a broker call's `tonic::Status` to the wire error. `broker_socket`
/// names the socket in messages about an unreachable broker.
pub fn from_status(status: &tonic::Status, broker_socket: &Path) -> RpcError {
    let broker_message = || {
        if status.message().is_empty() {
            format!("the broker failed without a message ({})", status.code())
        } else {
            status.message().to_owned()
        }
    };
    match status.code() {
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
            RpcError::invalid_params(broker_message())
        }
        Code::NotFound => RpcError::not_found(broker_message()),
        Code::Unavailable if is_transport_failure(status) => RpcError::unavailable(format!(
            "broker unreachable at {}: {}; is moat-broker running?",
            broker_socket.display(),
            connection_cause(status)
        )),
        // The connection broke while the call was in flight (the broker
        // crashed or restarted): whatever the code, it is the broker being
        // away, and the call's effect is unknown.
        _ if is_transport_failure(status) => RpcError::unavailable(format!(
            "the connection to the broker broke during the call ({}): it restarted or stopped; the call may or may not have taken effect: check with sandbox.metrics.get, then retry",
            connection_cause(status)
        )),
        Code::Unavailable => RpcError::unavailable(format!(
            "broker unavailable (shutting down or restarting): {}; retry later",
            broker_message()
        )),
        Code::ResourceExhausted => RpcError::overloaded(broker_message()),
        Code::Unauthenticated => RpcError::unauthenticated(broker_message()),
        Code::PermissionDenied => RpcError::forbidden(broker_message()),
        Code::DeadlineExceeded => RpcError::internal("timed out waiting for the broker"),
        Code::Cancelled if is_client_timeout(status) => {
            RpcError::internal("timed out waiting for the broker")
        }
        _ => RpcError::internal(broker_message()),
    }
}

/// True when the status was made on this side because no connection to the
/// broker could be made or kept (as opposed to one the broker sent).
fn is_transport_failure(status: &tonic::Status) -> bool {
    let mut source = status.source();
    while let Some(err) = source {
        if err.is::<tonic::ConnectError>()
            || err.is::<tonic::transport::Error>()
            || err.is::<std::io::Error>()
        {
            return true;
        }
        source = err.source();
    }
    false
}

/// True when tonic's client-side `grpc-timeout` enforcement ended the call.
fn is_client_timeout(status: &tonic::Status) -> bool {
    let mut source = status.source();
    while let Some(err) = source {
        if err.is::<tonic::TimeoutExpired>() {
            return true;
        }
        source = err.source();
    }
    false
}

/// What went wrong with the connection: the status message (tonic puts
/// the connect error's text there), else the innermost source's text.
fn connection_cause(status: &tonic::Status) -> String {
    if !status.message().is_empty() {
        return status.message().to_owned();
    }
    let mut cause = None;
    let mut source = status.source();
    while let Some(err) = source {
        cause = Some(err.to_string());
        source = err.source();
    }
    cause.unwrap_or_else(|| "connection failed".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOCKET: &str = "/run/moat/broker.sock";

    fn map(status: tonic::Status) -> RpcError {
        from_status(&status, Path::new(SOCKET))
    }

    #[test]
    fn invalid_argument_like_codes_are_invalid_params() {
        for code in [
            Code::InvalidArgument,
            Code::FailedPrecondition,
            Code::OutOfRange,
        ] {
            let err = map(tonic::Status::new(
                code,
                "memory 9999 is over the cap of 4096",
            ));
            assert_eq!(err.code(), ErrorCode::InvalidParams, "{code:?}");
            assert_eq!(err.code().code(), -32602);
            assert_eq!(err.status(), StatusCode::OK);
            assert_eq!(err.message(), "memory 9999 is over the cap of 4096");
        }
    }

    #[test]
    fn not_found_is_32003() {
        let err = map(tonic::Status::not_found("sandbox default/x is not running"));
        assert_eq!(err.code().code(), -32003);
        assert_eq!(err.status(), StatusCode::OK);
        assert_eq!(err.message(), "sandbox default/x is not running");
    }

    #[test]
    fn unavailable_from_broker_is_503_and_says_shutting_down() {
        let err = map(tonic::Status::unavailable("broker is shutting down"));
        assert_eq!(err.code().code(), -32000);
        assert_eq!(err.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(err.message().contains("shutting down"), "{}", err.message());
        assert!(err.message().contains("broker is shutting down"));
    }

    #[test]
    fn connection_failure_is_503_naming_the_socket() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file or directory");
        let status = tonic::Status::from_error(Box::new(tonic::ConnectError(Box::new(io))));
        assert_eq!(status.code(), Code::Unavailable);
        let err = map(status);
        assert_eq!(err.code().code(), -32000);
        assert_eq!(err.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            err.message()
                .starts_with("broker unreachable at /run/moat/broker.sock: "),
            "{}",
            err.message()
        );
        assert!(err.message().contains("No such file or directory"));
    }

    #[test]
    fn resource_exhausted_is_32000_with_http_200() {
        let err = map(tonic::Status::resource_exhausted(
            "64 sandboxes running; the cap is 64",
        ));
        assert_eq!(err.code().code(), -32000);
        assert_eq!(err.status(), StatusCode::OK);
        assert_eq!(err.message(), "64 sandboxes running; the cap is 64");
    }

    #[test]
    fn auth_codes_are_32002_with_401_and_403() {
        let err = map(tonic::Status::unauthenticated("no key"));
        assert_eq!(
            (err.code().code(), err.status()),
            (-32002, StatusCode::UNAUTHORIZED)
        );
        let err = map(tonic::Status::permission_denied("namespace other"));
        assert_eq!(
            (err.code().code(), err.status()),
            (-32002, StatusCode::FORBIDDEN)
        );
    }

    #[test]
    fn deadlines_say_timed_out_waiting_for_the_broker() {
        let err = map(tonic::Status::deadline_exceeded("deadline"));
        assert_eq!(err.code().code(), -32603);
        assert_eq!(err.status(), StatusCode::OK);
        assert_eq!(err.message(), "timed out waiting for the broker");

        let status = tonic::Status::from_error(Box::new(tonic::TimeoutExpired(())));
        assert_eq!(status.code(), Code::Cancelled);
        assert_eq!(map(status).message(), "timed out waiting for the broker");
    }

    #[test]
    fn everything_else_is_32603_with_the_broker_message() {
        for code in [
            Code::Internal,
            Code::Unknown,
            Code::Aborted,
            Code::Unimplemented,
        ] {
            let err = map(tonic::Status::new(code, "image pull failed: 404"));
            assert_eq!(err.code().code(), -32603, "{code:?}");
            assert_eq!(err.status(), StatusCode::OK);
            assert_eq!(err.message(), "image pull failed: 404");
        }
        let err = map(tonic::Status::internal(""));
        assert!(
            err.message().contains("without a message"),
            "{}",
            err.message()
        );
    }

    #[test]
    fn error_object_carries_code_message_and_optional_data() {
        let err = RpcError::invalid_params("bad");
        assert_eq!(err.to_json(), json!({"code": -32602, "message": "bad"}));
        let err = err.with_data(json!({"field": "x"}));
        assert_eq!(
            err.to_json(),
            json!({"code": -32602, "message": "bad", "data": {"field": "x"}})
        );
    }

    #[test]
    fn rate_limited_is_429_with_retry_after() {
        let response = RpcError::rate_limited("slow down", 3).into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "3");
        let response = RpcError::unauthenticated("no").into_response();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert!(response.headers().get(header::RETRY_AFTER).is_none());
    }

    #[test]
    fn at_capacity_is_503_with_retry_after_one_naming_the_limit() {
        let err = RpcError::at_capacity(256);
        assert_eq!(err.code().code(), -32000);
        assert_eq!(err.retry_after_secs(), Some(1));
        assert!(
            err.message()
                .contains("at its limit of 256 calls in flight")
                && err.message().contains("retry after a second"),
            "{}",
            err.message()
        );
        let response = err.into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
    }

    #[test]
    fn body_too_large_closes_the_connection() {
        let response = RpcError::body_too_large(1024).into_response();
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(response.headers().get(header::CONNECTION).unwrap(), "close");
        let response = RpcError::invalid_request("x".to_owned()).into_response();
        assert!(response.headers().get(header::CONNECTION).is_none());
    }

    #[test]
    fn body_too_large_is_413_and_names_the_limit() {
        let err = RpcError::body_too_large(1024);
        assert_eq!(err.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(err.code().code(), -32600);
        assert!(err.message().contains("1024 bytes"));
    }
}
