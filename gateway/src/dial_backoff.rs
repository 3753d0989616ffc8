//! Backoff for dialling the broker: after a failed connect the next one is
//! allowed only after a delay that doubles with each failure in a row (20 ms
//! up to 250 ms, so a restarted broker is found within a quarter second) and
//! resets on success. While the broker is away, calls fail
//! at once with the cause instead of every one of them dialling again.

use std::sync::Mutex;
use std::time::{Duration, Instant};

const FIRST: Duration = Duration::from_millis(20);
const MAX: Duration = Duration::from_millis(250);

/// When the broker may be dialled next.
#[derive(Debug, Default)]
pub struct DialBackoff {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    failures: u32,
    next: Option<Instant>,
    last_error: String,
}

impl DialBackoff {
    /// `Err` (the last failure, and when the next attempt is allowed) while
    /// dialling is held back.
    pub fn check(&self, now: Instant) -> Result<(), String> {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match s.next {
            Some(next) if now < next => Err(format!(
                "{} (not retried for another {} ms)",
                s.last_error,
                next.duration_since(now).as_millis()
            )),
            _ => Ok(()),
        }
    }

    /// Records a failed dial.
    pub fn failed(&self, now: Instant, error: &std::io::Error) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.failures = s.failures.saturating_add(1);
        let delay = FIRST
            .saturating_mul(1u32 << (s.failures - 1).min(16))
            .min(MAX);
        s.next = Some(now + delay);
        s.last_error = error.to_string();
    }

    /// Records a successful dial.
    pub fn succeeded(&self) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        *s = State::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_and_reset_on_success() {
        let b = DialBackoff::default();
        let t0 = Instant::now();
        assert!(b.check(t0).is_ok());
        let err = std::io::Error::from(std::io::ErrorKind::NotFound);
        b.failed(t0, &err);
        assert!(b.check(t0 + Duration::from_millis(19)).is_err());
        assert!(b.check(t0 + FIRST).is_ok());
        for _ in 0..10 {
            b.failed(t0, &err);
        }
        let held = b.check(t0 + MAX - Duration::from_millis(1)).unwrap_err();
        assert!(held.contains("not retried"), "{held}");
        assert!(b.check(t0 + MAX).is_ok());
        b.succeeded();
        assert!(b.check(t0).is_ok());
    }
}
