//! MCP's streamable HTTP transport through the router (`oneshot`):
//! version negotiation, sessions, 202 for notifications, GET 405, DELETE,
//! Origin rejection, tools and prompts listing, argument errors (-32602) and
//! sandbox failures (`isError`) — the broker is absent, so a tool call that
//! reaches it fails as a result the model can read.

mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::{dev, dev_with, keys, post_to, send, Gateway, Reply};
use serde_json::{json, Value};

async fn mcp(gw: &Gateway, session: Option<&str>, extra: &[(&str, &str)], body: Value) -> Reply {
    let mut headers: Vec<(&str, &str)> = vec![("accept", "application/json, text/event-stream")];
    if let Some(s) = session {
        headers.push(("mcp-session-id", s));
    }
    headers.extend_from_slice(extra);
    post_to(gw, "/mcp", &headers, body.to_string()).await
}

fn init(version: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": version, "capabilities": {},
        "clientInfo": {"name": "test", "version": "1"}}})
}

async fn session(gw: &Gateway, version: &str) -> String {
    let reply = mcp(gw, None, &[], init(version)).await;
    assert_eq!(reply.status, StatusCode::OK);
    reply.header("mcp-session-id").expect("Mcp-Session-Id")
}

fn request(id: i64, method: &str, params: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params})
}

#[tokio::test]
async fn initialize_negotiates_the_version_and_opens_a_session() {
    let gw = dev();
    for (asked, got) in [
        ("2025-11-25", "2025-11-25"),
        ("2025-06-18", "2025-06-18"),
        ("2025-03-26", "2025-03-26"),
        ("2024-11-05", "2024-11-05"),
        ("2031-01-01", "2025-11-25"),
    ] {
        let reply = mcp(&gw, None, &[], init(asked)).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert!(reply
            .header("content-type")
            .unwrap()
            .starts_with("application/json"));
        let body = reply.json();
        assert_eq!(body["result"]["protocolVersion"], got, "{asked}");
        assert_eq!(body["id"], 0);
        assert!(body["result"]["capabilities"]["tools"].is_object());
        assert!(body["result"]["capabilities"]["prompts"].is_object());
        let id = reply.header("mcp-session-id").unwrap();
        assert!(id.len() >= 32 && id.chars().all(|c| c.is_ascii_graphic()));
    }
    let reply = mcp(
        &gw,
        None,
        &[],
        json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}),
    )
    .await;
    assert_eq!(reply.json()["error"]["code"], -32602);
}

#[tokio::test]
async fn notifications_and_responses_get_202() {
    let gw = dev();
    let s = session(&gw, "2025-11-25").await;
    let reply = mcp(
        &gw,
        Some(&s),
        &[],
        json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
    )
    .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    assert!(reply.body.is_empty());
    let reply = mcp(
        &gw,
        Some(&s),
        &[],
        json!({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 3}}),
    )
    .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    let reply = mcp(
        &gw,
        Some(&s),
        &[],
        json!({"jsonrpc": "2.0", "id": 5, "result": {}}),
    )
    .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
}

#[tokio::test]
async fn sessions_are_required_checked_and_ended() {
    let gw = dev();
    let reply = mcp(&gw, None, &[], request(1, "ping", json!({}))).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "no session header");
    let reply = mcp(
        &gw,
        Some("no-such-session"),
        &[],
        request(1, "ping", json!({})),
    )
    .await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    let s = session(&gw, "2025-11-25").await;
    let reply = mcp(
        &gw,
        Some(&s),
        &[("mcp-protocol-version", "2025-11-25")],
        request(1, "ping", json!({})),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        reply.json(),
        json!({"jsonrpc": "2.0", "id": 1, "result": {}})
    );
    let reply = mcp(
        &gw,
        Some(&s),
        &[("mcp-protocol-version", "1999-01-01")],
        request(2, "ping", json!({})),
    )
    .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    // DELETE ends it.
    let delete = Request::delete("/mcp")
        .header("mcp-session-id", &s)
        .body(Body::empty())
        .unwrap();
    assert_eq!(send(&gw, delete).await.status, StatusCode::NO_CONTENT);
    let reply = mcp(&gw, Some(&s), &[], request(3, "ping", json!({}))).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    let delete = Request::delete("/mcp")
        .header("mcp-session-id", &s)
        .body(Body::empty())
        .unwrap();
    assert_eq!(send(&gw, delete).await.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_session_belongs_to_its_key() {
    let gw = keys();
    let (a, _) = gw.key(&["a"]);
    let (b, _) = gw.key(&["b"]);
    let auth_a = format!("Bearer {a}");
    let auth_b = format!("Bearer {b}");
    let reply = mcp(&gw, None, &[("authorization", &auth_a)], init("2025-06-18")).await;
    let s = reply.header("mcp-session-id").unwrap();
    let ping = request(1, "ping", json!({}));
    assert_eq!(
        mcp(&gw, Some(&s), &[("authorization", &auth_a)], ping.clone())
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        mcp(&gw, Some(&s), &[("authorization", &auth_b)], ping)
            .await
            .status,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn get_is_405() {
    let gw = dev();
    let reply = send(
        &gw,
        Request::get("/mcp")
            .header("accept", "text/event-stream")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED);
    assert!(reply.header("allow").unwrap().contains("POST"));
}

#[tokio::test]
async fn foreign_origins_are_403_and_allowed_ones_pass() {
    let gw = dev_with(|c| c.http.allowed_origins = vec!["https://app.example.com".into()]);
    let reply = mcp(
        &gw,
        None,
        &[("origin", "https://evil.example")],
        init("2025-11-25"),
    )
    .await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    assert_eq!(reply.json()["error"]["code"], -32002);
    let reply = mcp(
        &gw,
        None,
        &[("origin", "https://app.example.com")],
        init("2025-11-25"),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    // The JSON-RPC endpoint checks Origin too.
    let reply = post_to(
        &gw,
        "/api/v1/rpc",
        &[("origin", "http://localhost.evil:5555")],
        "{}",
    )
    .await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn tools_and_prompts_are_listed() {
    let gw = dev();
    let s = session(&gw, "2025-11-25").await;
    let body = mcp(&gw, Some(&s), &[], request(1, "tools/list", json!({})))
        .await
        .json();
    let tools = body["result"]["tools"].as_array().unwrap();
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
    assert!(tools.iter().all(|t| t["outputSchema"]["type"] == "object"));
    let body = mcp(&gw, Some(&s), &[], request(2, "prompts/list", json!({})))
        .await
        .json();
    assert_eq!(body["result"]["prompts"].as_array().unwrap().len(), 2);
    let body = mcp(
        &gw,
        Some(&s),
        &[],
        request(
            3,
            "prompts/get",
            json!({"name": "create_python_sandbox", "arguments": {"sandbox_name": "py"}}),
        ),
    )
    .await
    .json();
    assert_eq!(body["result"]["messages"][0]["role"], "user");
    let body = mcp(&gw, Some(&s), &[], request(4, "resources/list", json!({})))
        .await
        .json();
    assert_eq!(body["error"]["code"], -32601);
}

#[tokio::test]
async fn bad_tool_calls_are_32602_and_failures_are_is_error() {
    let gw = dev();
    let s = session(&gw, "2025-11-25").await;
    let call = |id, params| request(id, "tools/call", params);
    for params in [
        json!({"name": "sandbox_explode", "arguments": {}}),
        json!({"name": "sandbox_stop", "arguments": {"sandbox": "x"}}),
        json!({"name": "sandbox_stop", "arguments": {"sandbox": "../x", "namespace": "a"}}),
        json!({"name": "sandbox_stop", "arguments": {"sandbox": "x", "namespace": "a", "force": true}}),
        json!({"name": "sandbox_run_code", "arguments": {"sandbox": "x", "namespace": "a", "language": "cobol", "code": "1"}}),
        json!({"arguments": {}}),
    ] {
        let body = mcp(&gw, Some(&s), &[], call(1, params.clone()))
            .await
            .json();
        assert_eq!(body["error"]["code"], -32602, "{params}: {body}");
    }
    // Valid arguments reach the (absent) broker: a tool error, not a protocol error.
    let body = mcp(
        &gw,
        Some(&s),
        &[],
        call(
            2,
            json!({"name": "sandbox_run_command",
        "arguments": {"sandbox": "x", "namespace": "a", "command": "ls"}}),
        ),
    )
    .await
    .json();
    assert_eq!(body["result"]["isError"], true, "{body}");
    let text = body["result"]["content"][0]["text"].as_str().unwrap();
    assert!(text.contains("broker unreachable"), "{text}");
}

#[tokio::test]
async fn tool_call_on_an_uncovered_namespace_is_403() {
    let gw = keys();
    let (a, _) = gw.key(&["a"]);
    let auth = format!("Bearer {a}");
    let reply = mcp(&gw, None, &[("authorization", &auth)], init("2025-11-25")).await;
    let s = reply.header("mcp-session-id").unwrap();
    let reply = mcp(
        &gw,
        Some(&s),
        &[("authorization", &auth)],
        request(
            1,
            "tools/call",
            json!({"name": "sandbox_stop", "arguments": {"sandbox": "x", "namespace": "b"}}),
        ),
    )
    .await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    assert_eq!(reply.json()["error"]["code"], -32002);
}
