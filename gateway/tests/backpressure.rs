//! The gateway-wide bound on broker calls in flight (`limits.max_broker_calls`)
//! through the router (`oneshot`): a "broker" that accepts connections and
//! never answers holds calls in flight; the next call, from any key and
//! either interface (JSON-RPC, an MCP tool call, the health check), is
//! refused at once with HTTP 503, `-32000` and `Retry-After: 1`, and the
//! bound frees as calls end. A request asking exactly what a call in
//! flight asks joins that call instead (`coalesce.rs`), taking no place.

mod common;

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::{error_code, error_message, keys_with, post_as, post_to, send, Gateway, Reply};
use serde_json::{json, Value};
use tokio::net::UnixListener;
use tokio::task::JoinHandle;
use tower::ServiceExt;

/// Listens on the gateway's broker socket, accepts every connection and
/// never answers: every call sent there stays in flight until its deadline.
fn silent_broker(gw: &Gateway) -> JoinHandle<()> {
    let listener = UnixListener::bind(&gw.socket).unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    })
}

/// A `metrics.get` for sandbox `s<id>`: each id asks its own question, so
/// calls with different ids are not coalesced into one broker call.
fn metrics_get(id: i64) -> Value {
    json!({"jsonrpc": "2.0", "method": "sandbox.metrics.get", "id": id,
           "params": {"namespace": "a", "sandbox": format!("s{id}")}})
}

/// Sends `metrics_get(id)` as `token` in the background (it hangs on the
/// silent broker until aborted); returns the HTTP status.
fn in_background(gw: &Gateway, token: &str, id: i64) -> JoinHandle<StatusCode> {
    let router = gw.router.clone();
    let request = Request::post("/api/v1/rpc")
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {token}"))
        .body(Body::from(metrics_get(id).to_string()))
        .unwrap();
    tokio::spawn(async move { router.oneshot(request).await.unwrap().status() })
}

async fn wait_in_flight(gw: &Gateway, n: usize) {
    for _ in 0..500 {
        if gw.state.broker().calls().in_flight() == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "expected {n} broker calls in flight, have {}",
        gw.state.broker().calls().in_flight()
    );
}

fn assert_refused_at_capacity(reply: &Reply, body: &Value, max: usize) {
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(reply.header("retry-after").as_deref(), Some("1"), "{body}");
    assert_eq!(error_code(body), -32000, "{body}");
    let message = error_message(body);
    assert!(
        message.contains(&format!("at its limit of {max} calls in flight"))
            && message.contains("retry after a second"),
        "{message}"
    );
}

/// A keys-mode gateway with at most 2 broker calls in flight and a long
/// enough deadline that held calls stay held.
fn bounded() -> Gateway {
    keys_with(|c| {
        c.limits.max_broker_calls = 2;
        c.timeouts.health_secs = 60;
    })
}

#[tokio::test]
async fn the_bound_is_across_keys_and_refuses_at_once() {
    let gw = bounded();
    let broker = silent_broker(&gw);
    let (a, _) = gw.key(&["a"]);
    let (b, _) = gw.key(&["a"]);
    let held = [in_background(&gw, &a, 100), in_background(&gw, &a, 101)];
    wait_in_flight(&gw, 2).await;

    // Another key, well within its own concurrency limit: refused anyway.
    let reply = post_as(&gw, &b, metrics_get(2)).await;
    let body = reply.json();
    assert_refused_at_capacity(&reply, &body, 2);
    assert_eq!(body["id"], 2, "the refusal answers the request: {body}");
    // The first key too.
    let reply = post_as(&gw, &a, metrics_get(3)).await;
    assert_refused_at_capacity(&reply, &reply.json(), 2);
    assert_eq!(gw.state.broker().calls().in_flight(), 2);

    // Calls ending free the bound: the next call reaches for the broker
    // (and fails there, the broker being gone, with another message).
    for task in held {
        task.abort();
        let _ = task.await;
    }
    wait_in_flight(&gw, 0).await;
    broker.abort();
    let _ = broker.await;
    let reply = post_as(&gw, &b, metrics_get(4)).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    let body = reply.json();
    assert!(reply.header("retry-after").is_none(), "{body}");
    assert!(!error_message(&body).contains("calls in flight"), "{body}");
}

#[tokio::test]
async fn mcp_tool_calls_and_health_count_against_the_same_bound() {
    let gw = bounded();
    let _broker = silent_broker(&gw);
    let (a, _) = gw.key(&["a"]);
    let auth = format!("Bearer {a}");
    let mcp = |session: Option<String>, body: Value| {
        let auth = auth.clone();
        let gw = &gw;
        async move {
            let mut headers = vec![
                ("accept", "application/json, text/event-stream".to_owned()),
                ("authorization", auth),
            ];
            if let Some(s) = session {
                headers.push(("mcp-session-id", s));
            }
            let headers: Vec<(&str, &str)> =
                headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            post_to(gw, "/mcp", &headers, body.to_string()).await
        }
    };
    let init = mcp(
        None,
        json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": "2025-11-25", "capabilities": {},
            "clientInfo": {"name": "test", "version": "1"}}}),
    )
    .await;
    let session = init.header("mcp-session-id").expect("Mcp-Session-Id");

    let held = [in_background(&gw, &a, 100), in_background(&gw, &a, 101)];
    wait_in_flight(&gw, 2).await;

    let reply = mcp(
        Some(session.clone()),
        json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {
            "name": "sandbox_get_metrics", "arguments": {"namespace": "a"}}}),
    )
    .await;
    let body = reply.json();
    // A JSON-RPC error answering the request (as for the per-key limits),
    // not a tool result with isError.
    assert!(body.get("result").is_none(), "{body}");
    assert_eq!(body["id"], 7, "{body}");
    assert_refused_at_capacity(&reply, &body, 2);

    // Requests that need no broker are still served.
    let reply = mcp(
        Some(session.clone()),
        json!({"jsonrpc": "2.0", "id": 8, "method": "tools/list"}),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.json()["result"]["tools"].is_array());

    let reply = send(
        &gw,
        Request::get("/api/v1/health").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.header("retry-after").as_deref(), Some("1"));
    let body = reply.json();
    assert!(
        body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("at its limit of 2 calls in flight"),
        "{body}"
    );
    for task in held {
        task.abort();
        let _ = task.await;
    }
    wait_in_flight(&gw, 0).await;
}

#[tokio::test]
async fn the_same_question_in_flight_is_asked_once_and_joining_it_is_not_refused() {
    let gw = bounded();
    let broker = silent_broker(&gw);
    let (a, _) = gw.key(&["a"]);
    let (b, _) = gw.key(&["a"]);
    let first = [in_background(&gw, &a, 100), in_background(&gw, &b, 100)];
    let second = [in_background(&gw, &a, 101), in_background(&gw, &a, 101)];
    wait_in_flight(&gw, 2).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        gw.state.broker().calls().in_flight(),
        2,
        "four requests, two questions, two calls"
    );
    for task in first.into_iter().chain(second) {
        assert!(!task.is_finished(), "joined requests wait for the call");
        task.abort();
        let _ = task.await;
    }
    broker.abort();
    let _ = broker.await;
}

#[test]
fn the_bound_is_validated() {
    use moat_gateway::config::{Config, ConfigError};
    let mut config = Config {
        dev: true,
        ..Config::default()
    };
    assert_eq!(config.limits.max_broker_calls, 256);
    config.limits.max_broker_calls = 0;
    assert!(matches!(
        config.validate(),
        Err(ConfigError::Zero {
            field: "limits.max_broker_calls"
        })
    ));
    config.limits.max_broker_calls = 1 << 20;
    let err = config.validate().unwrap_err();
    assert!(err.to_string().contains("limits.max_broker_calls"), "{err}");
    let parsed = Config::parse(
        "[limits]\nmax_broker_calls = 8\n",
        std::path::Path::new("g.toml"),
    )
    .unwrap();
    assert_eq!(parsed.limits.max_broker_calls, 8);
}
