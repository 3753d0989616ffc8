//! Fuzzes what the gateway does with an untrusted request body: the depth
//! pre-check, JSON-RPC framing, envelope checks, method lookup, params →
//! typed action, the operator caps, MCP tool-call and prompt argument
//! handling, and the whole router (`POST /api/v1/rpc`, dev mode, broker
//! absent). Invariants: nothing panics, every answer has an expected HTTP
//! status, and every non-empty answer is JSON-RPC 2.0.

#![no_main]

use std::sync::OnceLock;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use libfuzzer_sys::fuzz_target;
use moat_gateway::auth::Identity;
use moat_gateway::config::Config;
use moat_gateway::limits::{depth, ops};
use moat_gateway::mcp::{prompts, protocol, tools};
use moat_gateway::rpc::framing::{self, Payload};
use moat_gateway::rpc::methods::Method;
use moat_gateway::rpc::params;
use moat_gateway::{app, AppState};
use serde_json::Value;
use tower::ServiceExt;

struct World {
    runtime: tokio::runtime::Runtime,
    state: AppState,
    router: Router,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let mut config = Config {
            dev: true,
            broker_socket: "/nonexistent/moat-fuzz/broker.sock".into(),
            ..Config::default()
        };
        config.limits.requests_per_sec = 1e12;
        config.limits.burst = u32::MAX;
        config.limits.max_memory_mib = Some(4096);
        config.limits.max_timeout_secs = Some(600);
        let state = runtime.block_on(async { AppState::from_config(&config).expect("state") });
        let router = app(state.clone());
        World {
            runtime,
            state,
            router,
        }
    })
}

fn check_parsing(data: &[u8]) {
    let _ = depth::exceeds(data, 32);
    let Ok(payload) = framing::parse_body(data, 64) else {
        return;
    };
    let values = match payload {
        Payload::Single(v) => vec![v],
        Payload::Batch(vs) => vs,
    };
    for value in values {
        if let Ok(call) = framing::parse_call(value) {
            if let Ok(method) = Method::lookup(&call.method) {
                if let Ok(action) = params::parse(method, call.params.clone()) {
                    let _ = action.namespace();
                    let _ = ops::check(&action, world().state.limits());
                }
            }
            let _ = protocol::initialize_version(call.params.as_ref());
        }
    }
}

/// The body taken as MCP `tools/call` / `prompts/get` params.
fn check_mcp(data: &[u8]) {
    let Ok(params) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let _ = prompts::get(Some(params.clone()));
    let w = world();
    let identity = Identity::dev();
    let outcome = w
        .runtime
        .block_on(tools::call(&w.state, &identity, "2025-11-25", Some(params)));
    if let Ok(result) = outcome {
        // Reaching here means the arguments were valid and the (absent)
        // broker failed: always a tool error result.
        assert_eq!(result["isError"], true, "{result}");
    }
}

fn check_router(data: &[u8]) {
    let w = world();
    let request = Request::post("/api/v1/rpc")
        .header("content-type", "application/json")
        .body(Body::from(data.to_vec()))
        .expect("request");
    let (status, body) = w.runtime.block_on(async {
        let response = w.router.clone().oneshot(request).await.expect("infallible");
        let status = response.status();
        let body = response.into_body().collect().await.expect("body").to_bytes();
        (status, body)
    });
    assert!(
        [
            StatusCode::OK,
            StatusCode::NO_CONTENT,
            StatusCode::PAYLOAD_TOO_LARGE,
            StatusCode::SERVICE_UNAVAILABLE,
        ]
        .contains(&status),
        "unexpected status {status}"
    );
    if status == StatusCode::NO_CONTENT {
        assert!(body.is_empty());
        return;
    }
    let answer: Value = serde_json::from_slice(&body).expect("answers are JSON");
    let objects = match &answer {
        Value::Array(items) => items.iter().collect(),
        other => vec![other],
    };
    assert!(!objects.is_empty());
    for object in objects {
        assert_eq!(object["jsonrpc"], "2.0", "{object}");
        assert!(object.get("id").is_some(), "{object}");
        assert!(
            object.get("result").is_some() ^ object.get("error").is_some(),
            "{object}"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    check_parsing(data);
    check_mcp(data);
    check_router(data);
});
