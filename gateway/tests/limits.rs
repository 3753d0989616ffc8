//! Limits and observability through the router (`oneshot`): JSON depth,
//! per-key rate (429 + Retry-After while another key is served), per-key
//! caps on memory/cpus/timeout, CORS (off unless configured), request ids,
//! and the Prometheus endpoint.

mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::{dev, dev_with, error_code, keys_with, post, post_as, post_raw, send};
use moat_gateway::metrics_app;
use serde_json::{json, Value};
use tower::ServiceExt;

fn stop() -> Value {
    json!({"jsonrpc": "2.0", "method": "sandbox.stop", "id": 1,
           "params": {"sandbox": "s", "namespace": "a"}})
}

#[tokio::test]
async fn deep_json_is_refused_before_parsing() {
    let gw = dev_with(|c| c.limits.max_json_depth = 8);
    let deep = format!("{}1{}", "[".repeat(9), "]".repeat(9));
    let reply = post_raw(&gw, deep).await;
    assert_eq!(reply.status, StatusCode::OK);
    let body = reply.json();
    assert_eq!(error_code(&body), -32600);
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("deeper than 8"));
}

#[tokio::test]
async fn a_flood_from_one_key_is_429_while_another_key_is_served() {
    let gw = keys_with(|c| {
        c.limits.requests_per_sec = 0.5;
        c.limits.burst = 3;
    });
    let (a, _) = gw.key(&["a"]);
    let (b, _) = gw.key(&["a"]);
    for _ in 0..3 {
        assert_eq!(
            post_as(&gw, &a, stop()).await.status,
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
    let reply = post_as(&gw, &a, stop()).await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = reply.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry), "{retry}");
    let body = reply.json();
    assert_eq!(error_code(&body), -32000);
    assert_eq!(body["jsonrpc"], "2.0");
    assert_eq!(
        post_as(&gw, &b, stop()).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
}

#[tokio::test]
async fn operator_caps_are_invalid_params() {
    let gw = dev_with(|c| {
        c.limits.max_memory_mib = Some(512);
        c.limits.max_timeout_secs = Some(10);
    });
    let reply = post(
        &gw,
        json!({"jsonrpc": "2.0", "method": "sandbox.start", "id": 1,
        "params": {"sandbox": "s", "namespace": "a", "config": {"memory": 1024}}}),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    let body = reply.json();
    assert_eq!(error_code(&body), -32602);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("limit of 512 MiB"),
        "{body}"
    );
    let reply = post(
        &gw,
        json!({"jsonrpc": "2.0", "method": "sandbox.command.run", "id": 2,
        "params": {"sandbox": "s", "namespace": "a", "command": "x", "timeout": 11}}),
    )
    .await;
    assert_eq!(error_code(&reply.json()), -32602);
}

#[tokio::test]
async fn cors_is_off_unless_configured() {
    let preflight = || {
        Request::options("/api/v1/rpc")
            .header("origin", "https://app.example.com")
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization, content-type",
            )
            .body(Body::empty())
            .unwrap()
    };
    let gw = dev();
    let reply = send(&gw, preflight()).await;
    assert!(reply.header("access-control-allow-origin").is_none());
    let gw = dev_with(|c| c.http.cors_allowed_origins = vec!["https://app.example.com".into()]);
    let reply = send(&gw, preflight()).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        reply.header("access-control-allow-origin").as_deref(),
        Some("https://app.example.com")
    );
    let reply = common::post_to(
        &gw,
        "/api/v1/rpc",
        &[("origin", "https://app.example.com")],
        stop().to_string(),
    )
    .await;
    assert_eq!(
        reply.header("access-control-allow-origin").as_deref(),
        Some("https://app.example.com")
    );
}

#[tokio::test]
async fn every_response_has_a_request_id_and_is_counted() {
    let gw = dev();
    let first = post(&gw, stop()).await;
    let second = post(&gw, json!({"jsonrpc": "2.0", "method": "nope", "id": 1})).await;
    let (a, b) = (
        first.header("x-request-id").unwrap(),
        second.header("x-request-id").unwrap(),
    );
    assert_ne!(a, b);
    let response = metrics_app(gw.state.clone())
        .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let bytes = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap()
        .to_bytes();
    let text = String::from_utf8(bytes.to_vec()).unwrap();
    for needle in [
        "moat_gateway_http_requests_total{route=\"/api/v1/rpc\",status=\"503\"} 1",
        "moat_gateway_http_requests_total{route=\"/api/v1/rpc\",status=\"200\"} 1",
        "moat_gateway_errors_total{code=\"-32601\"} 1",
        "moat_gateway_errors_total{code=\"-32000\"} 1",
        "moat_gateway_broker_up 0",
    ] {
        assert!(text.contains(needle), "{needle} not in:\n{text}");
    }
    // Not on the public router unless configured.
    let reply = send(&gw, Request::get("/metrics").body(Body::empty()).unwrap()).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    let gw = dev_with(|c| c.metrics.on_public_listener = true);
    let reply = send(&gw, Request::get("/metrics").body(Body::empty()).unwrap()).await;
    assert_eq!(reply.status, StatusCode::OK);
}
