//! The HTTP router: which handler serves which route. Authentication, MCP
//! and metrics routes are added here by later issues.

use axum::routing::{get, post};
use axum::Router;

use crate::health::health;
use crate::rpc::handler::rpc;
use crate::state::AppState;

/// The gateway's routes, ready to serve (or to drive with `oneshot`).
pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/api/v1/health", get(health))
        .route("/api/v1/rpc", post(rpc))
        .with_state(state)
}
