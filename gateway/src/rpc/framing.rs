//! JSON-RPC 2.0 framing: turning a request body into single calls or a
//! batch, checking each envelope (`jsonrpc`, `method`, `id`, `params`),
//! telling requests from notifications, and writing response objects. It
//! knows nothing about methods; `rpc::call` does.

use serde_json::{json, Map, Value};

use crate::error::RpcError;

/// A request body, parsed as JSON.
#[derive(Debug, PartialEq)]
pub enum Payload {
    /// One request object (or anything else that is not an array).
    Single(Value),
    /// A non-empty batch within the limit.
    Batch(Vec<Value>),
}

/// Parses a body: `-32700` if it is not JSON, `-32600` for an empty batch or
/// one with more than `max_batch` elements.
pub fn parse_body(body: &[u8], max_batch: usize) -> Result<Payload, RpcError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| RpcError::parse_error(format!("parse error: invalid JSON: {e}")))?;
    match value {
        Value::Array(items) if items.is_empty() => Err(RpcError::invalid_request(
            "invalid request: empty batch; send a request object or a non-empty array of them",
        )),
        Value::Array(items) if items.len() > max_batch => Err(RpcError::invalid_request(format!(
            "invalid request: batch has {} requests; the limit is {max_batch}",
            items.len()
        ))),
        Value::Array(items) => Ok(Payload::Batch(items)),
        other => Ok(Payload::Single(other)),
    }
}

/// A well-formed JSON-RPC request or notification.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    /// `None` for a notification (no `id` member): it gets no response.
    pub id: Option<Value>,
    pub method: String,
    /// `None` when absent or `null`; otherwise an object or an array.
    pub params: Option<Value>,
}

/// An envelope that is not a valid request, with the id to answer with
/// (the request's own when it was readable, else `null`).
#[derive(Debug, Clone, PartialEq)]
pub struct Rejected {
    pub id: Value,
    pub error: RpcError,
}

/// Checks one request object's envelope.
pub fn parse_call(value: Value) -> Result<Call, Rejected> {
    let Value::Object(mut object) = value else {
        return Err(reject(
            Value::Null,
            "invalid request: expected a JSON-RPC request object",
        ));
    };
    let id = match object.remove("id") {
        None => None,
        Some(id @ (Value::String(_) | Value::Number(_) | Value::Null)) => Some(id),
        Some(_) => {
            return Err(reject(
                Value::Null,
                "invalid request: \"id\" must be a string, a number or null",
            ))
        }
    };
    let answer_id = || id.clone().unwrap_or(Value::Null);
    match object.get("jsonrpc") {
        Some(Value::String(v)) if v == "2.0" => {}
        _ => {
            return Err(reject(
                answer_id(),
                "invalid request: \"jsonrpc\" must be exactly \"2.0\"",
            ))
        }
    }
    let method = match object.remove("method") {
        Some(Value::String(method)) => method,
        Some(_) => {
            return Err(reject(
                answer_id(),
                "invalid request: \"method\" must be a string",
            ))
        }
        None => {
            return Err(reject(
                answer_id(),
                "invalid request: \"method\" is missing",
            ))
        }
    };
    let params = match object.remove("params") {
        None | Some(Value::Null) => None,
        Some(params @ (Value::Object(_) | Value::Array(_))) => Some(params),
        Some(_) => {
            return Err(reject(
                answer_id(),
                "invalid request: \"params\" must be an object",
            ))
        }
    };
    Ok(Call { id, method, params })
}

fn reject(id: Value, message: &str) -> Rejected {
    Rejected {
        id,
        error: RpcError::invalid_request(message),
    }
}

/// One JSON-RPC response object.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    pub id: Value,
    pub outcome: Result<Value, RpcError>,
}

impl Response {
    /// The response object as sent.
    pub fn to_json(&self) -> Value {
        let mut object = Map::new();
        object.insert("jsonrpc".to_owned(), json!("2.0"));
        match &self.outcome {
            Ok(result) => object.insert("result".to_owned(), result.clone()),
            Err(error) => object.insert("error".to_owned(), error.to_json()),
        };
        object.insert("id".to_owned(), self.id.clone());
        Value::Object(object)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;

    #[test]
    fn invalid_json_is_a_parse_error() {
        let err = parse_body(b"{\"jsonrpc\": ", 64).unwrap_err();
        assert_eq!(err.code(), ErrorCode::ParseError);
    }

    #[test]
    fn batches_are_checked_for_size() {
        assert_eq!(
            parse_body(b"[]", 64).unwrap_err().code(),
            ErrorCode::InvalidRequest
        );
        let err = parse_body(b"[1,2,3]", 2).unwrap_err();
        assert_eq!(err.code(), ErrorCode::InvalidRequest);
        assert!(
            err.message().contains("the limit is 2"),
            "{}",
            err.message()
        );
        assert_eq!(
            parse_body(b"[1,2]", 2).unwrap(),
            Payload::Batch(vec![json!(1), json!(2)])
        );
        assert_eq!(parse_body(b"7", 2).unwrap(), Payload::Single(json!(7)));
    }

    #[test]
    fn envelope_rules() {
        let ok = parse_call(json!({"jsonrpc": "2.0", "method": "m", "id": 1})).unwrap();
        assert_eq!(ok.id, Some(json!(1)));
        assert_eq!(ok.params, None);

        let note = parse_call(json!({"jsonrpc": "2.0", "method": "m", "params": {}})).unwrap();
        assert_eq!(note.id, None);
        assert_eq!(note.params, Some(json!({})));

        let null_id = parse_call(json!({"jsonrpc": "2.0", "method": "m", "id": null})).unwrap();
        assert_eq!(null_id.id, Some(Value::Null));

        let bad_version = parse_call(json!({"jsonrpc": "1.0", "method": "m", "id": "a"}));
        assert_eq!(bad_version.unwrap_err().id, json!("a"));

        let bad_id = parse_call(json!({"jsonrpc": "2.0", "method": "m", "id": {}}));
        assert_eq!(bad_id.unwrap_err().id, Value::Null);

        let bad_method = parse_call(json!({"jsonrpc": "2.0", "method": 5, "id": 2}));
        assert_eq!(bad_method.unwrap_err().id, json!(2));

        let bad_params = parse_call(json!({"jsonrpc": "2.0", "method": "m", "params": 3, "id": 2}));
        assert_eq!(
            bad_params.unwrap_err().error.code(),
            ErrorCode::InvalidRequest
        );

        let not_object = parse_call(json!("x")).unwrap_err();
        assert_eq!(not_object.id, Value::Null);
    }

    #[test]
    fn responses_carry_result_or_error_and_id() {
        let ok = Response {
            id: json!("x"),
            outcome: Ok(json!("done")),
        };
        assert_eq!(
            ok.to_json(),
            json!({"jsonrpc": "2.0", "result": "done", "id": "x"})
        );
        let err = Response {
            id: Value::Null,
            outcome: Err(RpcError::parse_error("bad")),
        };
        assert_eq!(
            err.to_json(),
            json!({"jsonrpc": "2.0", "error": {"code": -32700, "message": "bad"}, "id": null})
        );
    }
}
