//! The outermost middleware: gives every request an id (returned as
//! `X-Request-Id`), runs it inside a span carrying that id, the client's
//! address, method and route, and counts it (status, latency) in
//! [`super::metrics`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;

use super::client_ip::{client_ip, Peer};
use super::metrics::route_label;
use crate::state::AppState;

/// The id of a request, in its extensions for handlers that log.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// A new request id: a random per-process prefix and a counter.
pub fn next_id() -> String {
    static PREFIX: OnceLock<u32> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let prefix = *PREFIX.get_or_init(|| {
        let mut b = [0u8; 4];
        let _ = getrandom::fill(&mut b);
        u32::from_ne_bytes(b)
    });
    format!(
        "{prefix:08x}{:08x}",
        COUNTER.fetch_add(1, Ordering::Relaxed) & 0xffff_ffff
    )
}

/// The middleware (`axum::middleware::from_fn_with_state`).
pub async fn track(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let started = Instant::now();
    let id = next_id();
    let peer = request.extensions().get::<Peer>().copied();
    let client = client_ip(peer, request.headers(), state.trusted_proxies());
    let route = route_label(request.uri().path());
    let span = tracing::info_span!(
        "request",
        request_id = %id,
        client = client.map(|ip| ip.to_string()).unwrap_or_else(|| "-".to_owned()),
        method = %request.method(),
        route,
    );
    request.extensions_mut().insert(RequestId(id.clone()));
    let mut response = next.run(request).instrument(span.clone()).await;
    let status = response.status().as_u16();
    state
        .metrics()
        .http_request(route, status, started.elapsed());
    span.in_scope(|| {
        tracing::debug!(
            status,
            duration_ms = started.elapsed().as_millis() as u64,
            "answered"
        )
    });
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert("x-request-id", value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_and_hex() {
        let a = next_id();
        let b = next_id();
        assert_ne!(a, b);
        assert_eq!(a.len(), 16);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
    }
}
