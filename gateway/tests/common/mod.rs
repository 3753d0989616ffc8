//! Shared helpers for the oneshot suites: a gateway router built from a
//! config (dev mode, or API keys with a secret in a temp directory), the
//! broker pointed at a socket that does not exist, and request helpers.

#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderMap, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use moat_gateway::auth::secret;
use moat_gateway::auth::Signer;
use moat_gateway::config::Config;
use moat_gateway::{app, AppState};
use serde_json::Value;
use tower::ServiceExt;

pub struct Gateway {
    pub router: Router,
    pub socket: PathBuf,
    pub state: AppState,
    pub signer: Option<Signer>,
    pub revocation_file: PathBuf,
    pub dir: tempfile::TempDir,
}

/// A dev-mode gateway with `edit` applied to its config.
pub fn dev_with(edit: impl FnOnce(&mut Config)) -> Gateway {
    build(true, edit)
}

pub fn dev() -> Gateway {
    dev_with(|_| {})
}

/// A gateway that requires API keys (secret made in a temp directory).
pub fn keys_with(edit: impl FnOnce(&mut Config)) -> Gateway {
    build(false, edit)
}

pub fn keys() -> Gateway {
    keys_with(|_| {})
}

fn build(dev: bool, edit: impl FnOnce(&mut Config)) -> Gateway {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("broker.sock");
    let mut config = Config {
        dev,
        broker_socket: socket.clone(),
        ..Config::default()
    };
    config.auth.secret_file = dir.path().join("gateway.secret");
    config.auth.revocation_file = dir.path().join("revoked");
    config.auth.revocation_poll_secs = 1;
    edit(&mut config);
    config.validate().unwrap();
    let state = AppState::from_config(&config).unwrap();
    let signer = (!dev).then(|| {
        let secret = secret::load(&config.auth.secret_file).unwrap();
        Signer::from_secret(&secret)
    });
    Gateway {
        router: app(state.clone()),
        socket,
        state,
        signer,
        revocation_file: config.auth.revocation_file.clone(),
        dir,
    }
}

impl Gateway {
    /// A key for `namespaces`, valid for an hour: (token, key id).
    pub fn key(&self, namespaces: &[&str]) -> (String, String) {
        let names: Vec<String> = namespaces.iter().map(|s| s.to_string()).collect();
        let (token, claims) = self
            .signer
            .as_ref()
            .expect("a keys-mode gateway")
            .issue(&names, Duration::from_secs(3600))
            .unwrap();
        (token, claims.jti)
    }
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap_or_default().to_owned())
    }
}

pub async fn send(gateway: &Gateway, request: Request<Body>) -> Reply {
    let response = gateway.router.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let body = response
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .to_vec();
    Reply {
        status,
        headers,
        body,
    }
}

/// POST `body` to `path` with extra headers.
pub async fn post_to(
    gateway: &Gateway,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Body>,
) -> Reply {
    let mut request = Request::post(path).header(header::CONTENT_TYPE, "application/json");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    send(gateway, request.body(body.into()).unwrap()).await
}

pub async fn post_raw(gateway: &Gateway, body: impl Into<Body>) -> Reply {
    post_to(gateway, "/api/v1/rpc", &[], body).await
}

pub async fn post(gateway: &Gateway, body: Value) -> Reply {
    post_raw(gateway, body.to_string()).await
}

/// POST to /api/v1/rpc with `Authorization: Bearer token`.
pub async fn post_as(gateway: &Gateway, token: &str, body: Value) -> Reply {
    let auth = format!("Bearer {token}");
    post_to(
        gateway,
        "/api/v1/rpc",
        &[("authorization", auth.as_str())],
        body.to_string(),
    )
    .await
}

pub fn error_code(response: &Value) -> i64 {
    response["error"]["code"]
        .as_i64()
        .unwrap_or_else(|| panic!("no error code: {response}"))
}

pub fn error_message(response: &Value) -> String {
    response["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}
