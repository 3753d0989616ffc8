//! Per-key concurrency: at most `max` requests of one key in flight. A
//! request over it is refused at once (HTTP 429) rather than queued, so one
//! key cannot tie up the gateway's connections.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Semaphores by key id.
#[derive(Debug)]
pub struct ConcurrencyLimiter {
    max: u32,
    keys: Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl ConcurrencyLimiter {
    /// At most `max` requests per key at once.
    pub fn new(max: u32) -> Self {
        ConcurrencyLimiter {
            max,
            keys: Mutex::new(HashMap::new()),
        }
    }

    /// A permit held for the request's life, or `None` when `key` already
    /// has `max` requests in flight.
    pub fn try_acquire(&self, key: &str) -> Option<OwnedSemaphorePermit> {
        let semaphore = {
            let mut keys = match self.keys.lock() {
                Ok(k) => k,
                Err(poisoned) => poisoned.into_inner(),
            };
            if keys.len() > 10_000 {
                let max = self.max as usize;
                keys.retain(|_, s| s.available_permits() < max);
            }
            match keys.get(key) {
                Some(semaphore) => Arc::clone(semaphore),
                None => {
                    let semaphore = Arc::new(Semaphore::new(self.max as usize));
                    keys.insert(key.to_owned(), Arc::clone(&semaphore));
                    semaphore
                }
            }
        };
        semaphore.try_acquire_owned().ok()
    }

    /// The configured maximum.
    pub fn max(&self) -> u32 {
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_key_permits() {
        let limiter = ConcurrencyLimiter::new(2);
        let a1 = limiter.try_acquire("a").unwrap();
        let _a2 = limiter.try_acquire("a").unwrap();
        assert!(limiter.try_acquire("a").is_none());
        assert!(limiter.try_acquire("b").is_some());
        drop(a1);
        assert!(limiter.try_acquire("a").is_some());
    }
}
