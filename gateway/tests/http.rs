//! The gateway's JSON-RPC surface (dev mode) driven through `app(...).oneshot(...)`, with
//! the broker client pointed at a socket that does not exist: framing,
//! validation and the broker-unreachable paths. Success paths against a real
//! broker live in the project's end-to-end suite.

mod common;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use common::{dev as gateway, dev_with, error_code, error_message, post, post_raw, send};
use serde_json::{json, Value};

#[tokio::test]
async fn invalid_json_is_a_parse_error_with_null_id() {
    let gw = gateway();
    let reply = post_raw(&gw, "{\"jsonrpc\": \"2.0\", \"method\": ").await;
    assert_eq!(reply.status, StatusCode::OK);
    let body = reply.json();
    assert_eq!(error_code(&body), -32700);
    assert_eq!(body["id"], Value::Null);
    assert_eq!(body["jsonrpc"], json!("2.0"));
}

#[tokio::test]
async fn invalid_request_shapes_are_32600() {
    let gw = gateway();
    let cases = [
        (json!(42), Value::Null),
        (json!("sandbox.start"), Value::Null),
        (json!({"method": "sandbox.stop", "id": 1}), json!(1)),
        (
            json!({"jsonrpc": "1.0", "method": "sandbox.stop", "id": "a"}),
            json!("a"),
        ),
        (
            json!({"jsonrpc": 2.0, "method": "sandbox.stop", "id": 2}),
            json!(2),
        ),
        (json!({"jsonrpc": "2.0", "id": 3}), json!(3)),
        (json!({"jsonrpc": "2.0", "method": 7, "id": 4}), json!(4)),
        (
            json!({"jsonrpc": "2.0", "method": "sandbox.stop", "id": {"x": 1}}),
            Value::Null,
        ),
        (
            json!({"jsonrpc": "2.0", "method": "sandbox.stop", "id": [1]}),
            Value::Null,
        ),
        (
            json!({"jsonrpc": "2.0", "method": "sandbox.stop", "params": "x", "id": 5}),
            json!(5),
        ),
    ];
    for (request, id) in cases {
        let reply = post(&gw, request.clone()).await;
        assert_eq!(reply.status, StatusCode::OK, "{request}");
        let body = reply.json();
        assert_eq!(error_code(&body), -32600, "{request}: {body}");
        assert_eq!(body["id"], id, "{request}: {body}");
    }
}

#[tokio::test]
async fn empty_batch_is_one_invalid_request() {
    let gw = gateway();
    let reply = post(&gw, json!([])).await;
    assert_eq!(reply.status, StatusCode::OK);
    let body = reply.json();
    assert!(body.is_object(), "{body}");
    assert_eq!(error_code(&body), -32600);
    assert_eq!(body["id"], Value::Null);
}

#[tokio::test]
async fn batch_over_the_limit_names_the_limit() {
    let gw = dev_with(|c| c.limits.max_batch = 2);
    let call = json!({"jsonrpc": "2.0", "method": "nope", "id": 1});
    let reply = post(&gw, json!([call, call, call])).await;
    assert_eq!(reply.status, StatusCode::OK);
    let body = reply.json();
    assert_eq!(error_code(&body), -32600);
    assert!(error_message(&body).contains("the limit is 2"), "{body}");
}

#[tokio::test]
async fn batch_answers_each_element_in_order_and_skips_notifications() {
    let gw = gateway();
    let batch = json!([
        {"jsonrpc": "2.0", "method": "sandbox.nope", "id": "a"},
        1,
        {"jsonrpc": "2.0", "method": "sandbox.stop", "params": {"sandbox": "x"}},
        {"jsonrpc": "2.0", "method": "sandbox.stop", "params": {"sandbox": "b/c", "namespace": "d"}, "id": 7},
        {"jsonrpc": "2.0", "method": "sandbox.metrics.get", "params": {}, "id": null},
        {"jsonrpc": "2.0", "method": "sandbox.stop", "params": {"sandbox": "ok", "namespace": "default"}, "id": 9},
    ]);
    let reply = post(&gw, batch).await;
    assert_eq!(reply.status, StatusCode::OK);
    let body = reply.json();
    let responses = body
        .as_array()
        .unwrap_or_else(|| panic!("not an array: {body}"));
    assert_eq!(responses.len(), 5, "{body}");
    assert_eq!(
        (error_code(&responses[0]), &responses[0]["id"]),
        (-32601, &json!("a"))
    );
    assert_eq!(
        (error_code(&responses[1]), &responses[1]["id"]),
        (-32600, &Value::Null)
    );
    assert_eq!(
        (error_code(&responses[2]), &responses[2]["id"]),
        (-32602, &json!(7))
    );
    assert_eq!(
        (error_code(&responses[3]), &responses[3]["id"]),
        (-32602, &Value::Null)
    );
    // The broker is unreachable: the element says so, the batch is still 200.
    assert_eq!(
        (error_code(&responses[4]), &responses[4]["id"]),
        (-32000, &json!(9))
    );
}

#[tokio::test]
async fn notifications_alone_get_204_with_an_empty_body() {
    let gw = gateway();
    let note = json!({"jsonrpc": "2.0", "method": "sandbox.nope", "params": {}});
    let reply = post(&gw, note.clone()).await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT);
    assert!(reply.body.is_empty());

    let reply = post(&gw, json!([note, note])).await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT);
    assert!(reply.body.is_empty());
}

#[tokio::test]
async fn id_is_echoed_with_its_type() {
    let gw = gateway();
    for id in [
        json!("req-1"),
        json!(17),
        json!(-3),
        json!(2.5),
        Value::Null,
        json!(""),
    ] {
        let reply = post(&gw, json!({"jsonrpc": "2.0", "method": "nope", "id": id})).await;
        let body = reply.json();
        assert_eq!(body["id"], id, "{body}");
        assert!(body.as_object().unwrap().contains_key("id"));
    }
}

#[tokio::test]
async fn unknown_method_is_named_with_the_available_ones() {
    let gw = gateway();
    let reply = post(
        &gw,
        json!({"jsonrpc": "2.0", "method": "sandbox.destroy", "id": 1}),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    let body = reply.json();
    assert_eq!(error_code(&body), -32601);
    let message = error_message(&body);
    assert!(message.contains("sandbox.destroy"), "{message}");
    for method in ["sandbox.start", "sandbox.stop", "sandbox.command.run"] {
        assert!(message.contains(method), "{message}");
    }
}

#[tokio::test]
async fn metrics_get_checks_params_then_asks_the_broker() {
    let gw = gateway();
    let reply = post(
        &gw,
        json!({"jsonrpc": "2.0", "method": "sandbox.metrics.get", "params": {"namespace": "*"}, "id": 1}),
    )
    .await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(error_code(&reply.json()), -32000);
    let reply = post(
        &gw,
        json!({"jsonrpc": "2.0", "method": "sandbox.metrics.get", "params": {"namespace": "a b"}, "id": 2}),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(error_code(&reply.json()), -32602);
}

#[tokio::test]
async fn unknown_config_field_is_invalid_params_naming_it() {
    let gw = gateway();
    let request = json!({
        "jsonrpc": "2.0", "method": "sandbox.start", "id": "s",
        "params": {"sandbox": "py", "namespace": "default", "config": {"image": "python", "gpu": true}}
    });
    let reply = post(&gw, request).await;
    assert_eq!(reply.status, StatusCode::OK);
    let body = reply.json();
    assert_eq!(error_code(&body), -32602);
    let message = error_message(&body);
    assert!(
        message.starts_with("invalid params for sandbox.start: "),
        "{message}"
    );
    assert!(message.contains("gpu"), "{message}");
}

#[tokio::test]
async fn wrong_type_and_missing_field_are_invalid_params() {
    let gw = gateway();
    let request = json!({
        "jsonrpc": "2.0", "method": "sandbox.command.run", "id": 1,
        "params": {"sandbox": "py", "namespace": "default", "command": "ls", "timeout": "soon"}
    });
    let body = post(&gw, request).await.json();
    assert_eq!(error_code(&body), -32602);
    assert!(error_message(&body).contains("timeout"), "{body}");

    let request =
        json!({"jsonrpc": "2.0", "method": "sandbox.stop", "id": 2, "params": {"sandbox": "py"}});
    let body = post(&gw, request).await.json();
    assert_eq!(error_code(&body), -32602);
    assert!(error_message(&body).contains("namespace"), "{body}");

    let request =
        json!({"jsonrpc": "2.0", "method": "sandbox.stop", "id": 3, "params": ["py", "default"]});
    let body = post(&gw, request).await.json();
    assert_eq!(error_code(&body), -32602);
}

#[tokio::test]
async fn bad_name_is_invalid_params_with_the_reason() {
    let gw = gateway();
    let request = json!({
        "jsonrpc": "2.0", "method": "sandbox.stop", "id": 1,
        "params": {"sandbox": "../etc", "namespace": "default"}
    });
    let body = post(&gw, request).await.json();
    assert_eq!(error_code(&body), -32602);
    let message = error_message(&body);
    assert!(message.contains("sandbox name"), "{message}");
    assert!(
        message.contains("must start with a letter or digit"),
        "{message}"
    );
}

#[tokio::test]
async fn body_over_the_limit_is_413_with_a_jsonrpc_error() {
    let gw = dev_with(|c| c.limits.max_body_bytes = 100);
    let big = json!({"jsonrpc": "2.0", "method": "x".repeat(200), "id": 1}).to_string();

    // Without Content-Length: cut off while reading.
    let reply = post_raw(&gw, big.clone()).await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    let body = reply.json();
    assert_eq!(error_code(&body), -32600);
    assert!(error_message(&body).contains("100 bytes"), "{body}");
    assert_eq!(body["id"], Value::Null);

    // With Content-Length: refused before reading.
    let request = Request::post("/api/v1/rpc")
        .header(header::CONTENT_LENGTH, big.len())
        .body(Body::from(big))
        .unwrap();
    let reply = send(&gw, request).await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(error_code(&reply.json()), -32600);
}

#[tokio::test]
async fn health_is_503_naming_the_broker_socket() {
    let gw = gateway();
    let request = Request::get("/api/v1/health").body(Body::empty()).unwrap();
    let reply = send(&gw, request).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    let body = reply.json();
    assert_eq!(body["message"], json!("Service is unhealthy"));
    let error = body["error"].as_str().unwrap_or_default();
    assert!(error.contains("broker unreachable"), "{error}");
    assert!(error.contains(&gw.socket.display().to_string()), "{error}");
}

#[tokio::test]
async fn valid_start_without_a_broker_is_503_and_32000() {
    let gw = gateway();
    let request = json!({
        "jsonrpc": "2.0", "method": "sandbox.start", "id": "start-1",
        "params": {
            "sandbox": "my-python-env", "namespace": "default",
            "config": {"image": "microsandbox/python", "memory": 1024, "cpus": 2,
                       "envs": ["DEBUG=true"], "workdir": "/workspace"}
        }
    });
    let reply = post(&gw, request).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    let body = reply.json();
    assert_eq!(error_code(&body), -32000);
    assert_eq!(body["id"], json!("start-1"));
    let message = error_message(&body);
    assert!(message.contains("broker unreachable"), "{message}");
    assert!(
        message.contains(&gw.socket.display().to_string()),
        "{message}"
    );
}

#[tokio::test]
async fn valid_command_run_without_a_broker_is_503_and_32000() {
    let gw = gateway();
    let request = json!({
        "jsonrpc": "2.0", "method": "sandbox.command.run", "id": 5,
        "params": {"sandbox": "py", "namespace": "default", "command": "ls", "args": ["-la"]}
    });
    let reply = post(&gw, request).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(error_code(&reply.json()), -32000);
}

#[tokio::test]
async fn rpc_only_accepts_post() {
    let gw = gateway();
    let request = Request::get("/api/v1/rpc").body(Body::empty()).unwrap();
    let reply = send(&gw, request).await;
    assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn repl_run_checks_language_and_params_before_the_broker() {
    let gw = gateway();
    let reply = post(
        &gw,
        json!({"jsonrpc": "2.0", "method": "sandbox.repl.run", "id": 1,
               "params": {"sandbox": "a", "namespace": "default", "language": "cobol", "code": "1"}}),
    )
    .await;
    let body = reply.json();
    assert_eq!(error_code(&body), -32602);
    assert!(error_message(&body).contains("cobol"), "{body}");
    assert!(error_message(&body).contains("python"), "{body}");
    let reply = post(
        &gw,
        json!({"jsonrpc": "2.0", "method": "sandbox.repl.run", "id": 2,
               "params": {"sandbox": "a", "namespace": "default", "language": "python"}}),
    )
    .await;
    let body = reply.json();
    assert_eq!(error_code(&body), -32602);
    assert!(error_message(&body).contains("code"), "{body}");
}
