//! The HTTP routers: which handler serves which route, and the layers in
//! front of them — the request id/metrics middleware on everything, CORS
//! when configured, and `crate::guard` (Origin, key, rate, concurrency) on
//! `/api/v1/rpc` and `/mcp`. [`metrics_app`] is the separate `/metrics`
//! listener's router.

use std::time::Duration;

use axum::http::{header, HeaderName, HeaderValue, Method};
use axum::middleware::from_fn_with_state;
use axum::routing::{get, post};
use axum::Router;
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::config::Config;
use crate::guard::guard;
use crate::health::health;
use crate::mcp::transport as mcp;
use crate::obs::{metrics, request};
use crate::rpc::handler::rpc;
use crate::state::AppState;

/// The gateway's public routes, ready to serve (or to drive with `oneshot`).
pub fn app(state: AppState) -> Router {
    let guarded = Router::new()
        .route("/api/v1/rpc", post(rpc))
        .route("/mcp", post(mcp::post).get(mcp::get).delete(mcp::delete))
        .route_layer(from_fn_with_state(state.clone(), guard));
    let mut router = Router::new()
        .route("/api/v1/health", get(health))
        .merge(guarded);
    if state.config().metrics.on_public_listener {
        router = router.route("/metrics", get(metrics::handler));
    }
    if let Some(cors) = cors(state.config()) {
        router = router.layer(cors);
    }
    router
        .layer(from_fn_with_state(state.clone(), request::track))
        .with_state(state)
}

/// `GET /metrics` alone, for `metrics.listen`.
pub fn metrics_app(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics::handler))
        .with_state(state)
}

/// The CORS layer when `http.cors_allowed_origins` lists any origin.
fn cors(config: &Config) -> Option<CorsLayer> {
    let origins: Vec<HeaderValue> = config
        .http
        .cors_allowed_origins
        .iter()
        .filter_map(|o| HeaderValue::from_str(o).ok())
        .collect();
    if origins.is_empty() {
        return None;
    }
    Some(
        CorsLayer::new()
            .allow_origin(AllowOrigin::list(origins))
            .allow_methods([Method::GET, Method::POST, Method::DELETE])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                header::ACCEPT,
                HeaderName::from_static("mcp-session-id"),
                HeaderName::from_static("mcp-protocol-version"),
                HeaderName::from_static("last-event-id"),
            ])
            .expose_headers([
                HeaderName::from_static("mcp-session-id"),
                HeaderName::from_static("x-request-id"),
                header::RETRY_AFTER,
            ])
            .max_age(Duration::from_secs(600)),
    )
}
