//! The outermost middleware: gives every request an id (returned as
//! `X-Request-Id`), runs it with a [`RequestContext`] (that id and the
//! client's address) that the request's log lines name, and counts it
//! (status, latency) in [`super::metrics`]. The context is a task-local
//! value, not a `tracing` span: entering and leaving a span on every poll,
//! and carrying its fields into every line, cost more per request than the
//! rest of the request's logging (measured in `docs/gateway.md`).

use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;

use super::client_ip::{client_ip, Peer};
use super::metrics::route_label;
use crate::state::AppState;

tokio::task_local! {
    static CONTEXT: RequestContext;
}

/// A request's id: a random per-process prefix and a counter, shown as 16
/// hex digits (`-` outside any request).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RequestId(Option<(u32, u32)>);

impl RequestId {
    /// A new id.
    pub fn next() -> Self {
        static PREFIX: OnceLock<u32> = OnceLock::new();
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let prefix = *PREFIX.get_or_init(|| {
            let mut b = [0u8; 4];
            let _ = getrandom::fill(&mut b);
            u32::from_ne_bytes(b)
        });
        RequestId(Some((prefix, COUNTER.fetch_add(1, Ordering::Relaxed))))
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some((prefix, n)) => write!(f, "{prefix:08x}{n:08x}"),
            None => f.write_str("-"),
        }
    }
}

/// The client's address as the logs show it (`-` when unknown).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClientAddr(pub Option<IpAddr>);

impl fmt::Display for ClientAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(ip) => ip.fmt(f),
            None => f.write_str("-"),
        }
    }
}

/// Which request a log line is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RequestContext {
    pub id: RequestId,
    pub client: ClientAddr,
}

/// The context of the request being served by this task (the default,
/// shown as `-`, outside any request).
pub fn current() -> RequestContext {
    CONTEXT.try_with(|c| *c).unwrap_or_default()
}

/// The middleware (`axum::middleware::from_fn_with_state`).
pub async fn track(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let peer = request.extensions().get::<Peer>().copied();
    let context = RequestContext {
        id: RequestId::next(),
        client: ClientAddr(client_ip(peer, request.headers(), state.trusted_proxies())),
    };
    let route = route_label(request.uri().path());
    let method = request.method().clone();
    let mut response = CONTEXT.scope(context, next.run(request)).await;
    let status = response.status().as_u16();
    state
        .metrics()
        .http_request(route, status, started.elapsed());
    tracing::debug!(
        request_id = %context.id,
        client = %context.client,
        %method,
        route,
        status,
        duration_ms = started.elapsed().as_millis() as u64,
        "answered"
    );
    if let Ok(value) = HeaderValue::from_str(&context.id.to_string()) {
        response.headers_mut().insert("x-request-id", value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_and_hex() {
        let a = RequestId::next().to_string();
        let b = RequestId::next().to_string();
        assert_ne!(a, b);
        assert_eq!(a.len(), 16);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(RequestId::default().to_string(), "-");
    }

    #[tokio::test]
    async fn the_context_is_the_requests_inside_it_only() {
        assert_eq!(current(), RequestContext::default());
        let context = RequestContext {
            id: RequestId::next(),
            client: ClientAddr(Some([192, 0, 2, 1].into())),
        };
        let seen = CONTEXT
            .scope(context, async {
                tokio::task::yield_now().await;
                current()
            })
            .await;
        assert_eq!(seen, context);
        assert_eq!(current().client.to_string(), "-");
    }
}
