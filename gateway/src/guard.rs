//! What every request to `/api/v1/rpc` and `/mcp` passes before its
//! handler, in this order: the `Origin` check (a browser origin not allowed
//! by the config: HTTP 403), authentication (HTTP 401), the key's rate
//! (HTTP 429 + `Retry-After`) and the key's concurrency (HTTP 429). The
//! caller's [`Identity`] is then in the request's extensions, and the
//! concurrency permit is held until the response is produced.

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::auth::Identity;
use crate::error::RpcError;
use crate::limits::rate::retry_after_secs;
use crate::state::AppState;

/// The middleware (`axum::middleware::from_fn_with_state`).
pub async fn guard(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    match admit(&state, &request) {
        Ok(identity) => {
            let Some(permit) = state.concurrency().try_acquire(&identity.key_id) else {
                let err = RpcError::rate_limited(
                    format!(
                        "too many requests in flight for this API key (the limit is {}); \
                         wait for some to finish",
                        state.concurrency().max()
                    ),
                    1,
                );
                return refuse(&state, err);
            };
            request.extensions_mut().insert(identity);
            let response = next.run(request).await;
            drop(permit);
            response
        }
        Err(err) => refuse(&state, err),
    }
}

fn refuse(state: &AppState, err: RpcError) -> Response {
    state.metrics().error(err.code().code());
    let request = crate::obs::request::current();
    tracing::info!(
        request_id = %request.id,
        client = %request.client,
        status = err.status().as_u16(),
        code = err.code().code(),
        error = %err,
        "request refused"
    );
    err.into_response()
}

fn admit(state: &AppState, request: &Request) -> Result<Identity, RpcError> {
    if let Some(origin) = request.headers().get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or_default();
        if !state.origin_allowed(origin) {
            let shown: String = origin.chars().take(100).collect();
            return Err(RpcError::forbidden(format!(
                "Origin {shown:?} is not allowed; an operator can allow it in the gateway \
                 config (http.allowed_origins)"
            )));
        }
    }
    let identity = state.authenticator().authenticate(request.headers())?;
    if let Err(wait) = state.rate().check(&identity.key_id) {
        return Err(RpcError::rate_limited(
            format!(
                "rate limit exceeded for this API key ({} requests/s, bursts of {}); retry later",
                state.config().limits.requests_per_sec,
                state.config().limits.burst
            ),
            retry_after_secs(wait),
        ));
    }
    Ok(identity)
}
