//! API keys and tenancy through the router (`oneshot`), with a real secret
//! file in a temp directory and no broker: every refusal happens before the
//! broker, so a request that gets past auth shows up as 503 (-32000).

mod common;

use std::time::Duration;

use axum::http::StatusCode;
use base64::Engine;
use common::{error_code, error_message, keys, post, post_as, post_to};
use moat_gateway::auth::claims::Claims;
use moat_gateway::auth::{revocation, Signer};
use serde_json::{json, Value};

fn stop(namespace: &str) -> Value {
    json!({"jsonrpc": "2.0", "method": "sandbox.stop", "id": 1,
           "params": {"sandbox": "s", "namespace": namespace}})
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn assert_401(reply: &common::Reply, needle: &str) {
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    let body = reply.json();
    assert_eq!(error_code(&body), -32002, "{body}");
    assert_eq!(body["id"], Value::Null);
    assert!(error_message(&body).contains(needle), "{needle}: {body}");
}

#[tokio::test]
async fn no_key_is_401() {
    let gw = keys();
    assert_401(&post(&gw, stop("a")).await, "authentication required");
    // MCP too.
    let reply = post_to(&gw, "/mcp", &[], "{}").await;
    assert_401(&reply, "authentication required");
}

#[tokio::test]
async fn malformed_keys_are_401() {
    let gw = keys();
    for auth in [
        "Bearer",
        "Bearer not-a-jwt",
        "Basic dXNlcjpwYXNz",
        "Bearer a.b.c",
    ] {
        let reply = post_to(
            &gw,
            "/api/v1/rpc",
            &[("authorization", auth)],
            stop("a").to_string(),
        )
        .await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{auth}");
        assert_eq!(error_code(&reply.json()), -32002, "{auth}");
    }
}

#[tokio::test]
async fn expired_key_is_401_naming_it() {
    let gw = keys();
    let claims = Claims {
        jti: "expired1".into(),
        iat: now() - 100,
        exp: now() - 1,
        namespaces: vec!["a".into()],
    };
    let token = gw.signer.as_ref().unwrap().sign(&claims).unwrap();
    assert_401(&post_as(&gw, &token, stop("a")).await, "expired1 expired");
}

#[tokio::test]
async fn revoked_key_is_401_without_restart() {
    let gw = keys();
    let (token, id) = gw.key(&["a"]);
    let reply = post_as(&gw, &token, stop("a")).await;
    assert_eq!(
        reply.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "valid key reaches the broker"
    );
    revocation::append(&gw.revocation_file, &id, "test").unwrap();
    // The list is polled at most every second.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_401(&post_as(&gw, &token, stop("a")).await, "revoked");
}

#[tokio::test]
async fn key_signed_with_another_secret_is_401() {
    let gw = keys();
    let (token, _) = Signer::new([9; 32])
        .issue(&["*".to_owned()], Duration::from_secs(60))
        .unwrap();
    assert_401(&post_as(&gw, &token, stop("a")).await, "signature");
}

#[tokio::test]
async fn alg_none_and_hs384_keys_are_401() {
    let gw = keys();
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let payload = b64(&format!(
        r#"{{"jti":"x","iat":0,"exp":{},"namespaces":["*"]}}"#,
        now() + 60
    ));
    let none = format!("{}.{payload}.", b64(r#"{"alg":"none","typ":"JWT"}"#));
    assert_401(&post_as(&gw, &none, stop("a")).await, "algorithm \"none\"");
    let hs384 = format!("{}.{payload}.c2ln", b64(r#"{"alg":"HS384","typ":"JWT"}"#));
    assert_401(&post_as(&gw, &hs384, stop("a")).await, "HS384");
}

#[tokio::test]
async fn key_for_a_used_on_b_is_403_naming_b() {
    let gw = keys();
    let (token, _) = gw.key(&["team-a"]);
    let reply = post_as(&gw, &token, stop("team-b")).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    let body = reply.json();
    assert_eq!(error_code(&body), -32002);
    assert_eq!(body["id"], json!(1));
    assert!(error_message(&body).contains("\"team-b\""), "{body}");
    // Metrics of another namespace too; "*" is allowed (means team-a).
    let metrics = |ns: &str| json!({"jsonrpc": "2.0", "method": "sandbox.metrics.get", "id": 2, "params": {"namespace": ns}});
    assert_eq!(
        post_as(&gw, &token, metrics("team-b")).await.status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        post_as(&gw, &token, metrics("*")).await.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "'*' passes the gateway and reaches the (absent) broker"
    );
    // In a batch each element gets its own answer; the batch is 200.
    let batch = json!([stop("team-b"), stop("team-a")]);
    let reply = post_as(&gw, &token, batch).await;
    assert_eq!(reply.status, StatusCode::OK);
    let body = reply.json();
    assert_eq!(error_code(&body[0]), -32002);
    assert_eq!(error_code(&body[1]), -32000);
}

#[tokio::test]
async fn star_key_covers_every_namespace() {
    let gw = keys();
    let (token, _) = gw.key(&["*"]);
    for ns in ["a", "b", "anything-else"] {
        let reply = post_as(&gw, &token, stop(ns)).await;
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{ns}");
    }
}

#[tokio::test]
async fn health_needs_no_key() {
    let gw = keys();
    let request = axum::http::Request::get("/api/v1/health")
        .body(axum::body::Body::empty())
        .unwrap();
    let reply = common::send(&gw, request).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
}
