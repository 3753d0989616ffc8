//! The gateway-wide bound on broker calls in flight
//! (`limits.max_broker_calls`), across every key and both interfaces, and
//! counting health checks and the metrics scrape's question too. It is the
//! back-pressure between many clients and the one broker: a call over the
//! bound is refused at once ([`RpcError::at_capacity`]: HTTP 503, `-32000`,
//! `Retry-After: 1`) rather than queued, so the gateway's memory and the
//! broker's load stay bounded whatever the clients send. Per-key fairness is
//! [`super::concurrency`]'s.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::RpcError;

/// Permits for broker calls; cheap to clone (clones share the permits).
#[derive(Debug, Clone)]
pub struct BrokerCalls {
    max: usize,
    slots: Arc<Semaphore>,
}

impl BrokerCalls {
    /// At most `max` calls in flight at once (`max` is validated by
    /// `Config::validate`: 1 to `MAX_MAX_BROKER_CALLS`).
    pub fn new(max: usize) -> Self {
        let max = max.clamp(1, Semaphore::MAX_PERMITS);
        BrokerCalls {
            max,
            slots: Arc::new(Semaphore::new(max)),
        }
    }

    /// A permit to hold for the call's life, or the refusal to send back
    /// when `max` calls are already in flight.
    pub fn try_acquire(&self) -> Result<OwnedSemaphorePermit, RpcError> {
        Arc::clone(&self.slots)
            .try_acquire_owned()
            .map_err(|_| RpcError::at_capacity(self.max))
    }

    /// Calls in flight now.
    pub fn in_flight(&self) -> usize {
        self.max.saturating_sub(self.slots.available_permits())
    }

    /// The configured maximum.
    pub fn max(&self) -> usize {
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;

    #[test]
    fn refuses_at_once_over_the_bound_and_frees_on_drop() {
        let calls = BrokerCalls::new(2);
        let first = calls.try_acquire().unwrap();
        let _second = calls.try_acquire().unwrap();
        assert_eq!(calls.in_flight(), 2);
        let err = calls.try_acquire().unwrap_err();
        assert_eq!(err.code().code(), -32000);
        assert_eq!(err.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(err.retry_after_secs(), Some(1));
        assert!(err.message().contains("limit of 2 calls in flight"));
        drop(first);
        assert_eq!(calls.in_flight(), 1);
        assert!(calls.try_acquire().is_ok());
    }

    #[test]
    fn clones_share_the_bound() {
        let calls = BrokerCalls::new(1);
        let other = calls.clone();
        let _held = calls.try_acquire().unwrap();
        assert!(other.try_acquire().is_err());
        assert_eq!(other.in_flight(), 1);
        assert_eq!(other.max(), 1);
    }
}
