//! MCP sessions: `initialize` makes one (a random 128-bit id sent as
//! `Mcp-Session-Id`), bound to the API key that made it and to the
//! negotiated protocol version. A session unused for the idle timeout ends;
//! a key holding too many loses its least recently used one; past the total
//! cap, new sessions are refused. DELETE ends one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::RpcError;

#[derive(Debug, Clone)]
struct Session {
    key_id: String,
    version: &'static str,
    last_used: Instant,
    /// Order of last use (ties of `Instant` are possible).
    order: u64,
}

/// The live sessions.
#[derive(Debug)]
pub struct Sessions {
    max_total: usize,
    max_per_key: usize,
    idle: Duration,
    map: Mutex<HashMap<String, Session>>,
    clock: AtomicU64,
}

impl Sessions {
    /// An empty table with these bounds.
    pub fn new(max_total: usize, max_per_key: usize, idle: Duration) -> Self {
        Sessions {
            max_total,
            max_per_key,
            idle,
            map: Mutex::new(HashMap::new()),
            clock: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        match self.map.lock() {
            Ok(map) => map,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// A new session for `key_id` speaking `version`: its id.
    pub fn create(&self, key_id: &str, version: &'static str) -> Result<String, RpcError> {
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes)
            .map_err(|e| RpcError::internal(format!("cannot make a session id: {e}")))?;
        let id: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let now = Instant::now();
        let mut map = self.lock();
        let idle = self.idle;
        map.retain(|_, s| now.saturating_duration_since(s.last_used) < idle);
        let mine: Vec<(String, u64)> = map
            .iter()
            .filter(|(_, s)| s.key_id == key_id)
            .map(|(id, s)| (id.clone(), s.order))
            .collect();
        if mine.len() >= self.max_per_key {
            if let Some((oldest, _)) = mine.iter().min_by_key(|(_, used)| *used) {
                map.remove(oldest);
            }
        }
        if map.len() >= self.max_total {
            return Err(RpcError::overloaded(
                "too many MCP sessions are open on this server; retry later",
            ));
        }
        map.insert(
            id.clone(),
            Session {
                key_id: key_id.to_owned(),
                version,
                last_used: now,
                order: self.clock.fetch_add(1, Ordering::Relaxed),
            },
        );
        Ok(id)
    }

    /// The negotiated version of session `id` if it is alive and belongs
    /// to `key_id` (and marks it used); `None` otherwise.
    pub fn touch(&self, id: &str, key_id: &str) -> Option<&'static str> {
        let now = Instant::now();
        let mut map = self.lock();
        let session = map.get_mut(id)?;
        if now.saturating_duration_since(session.last_used) >= self.idle {
            map.remove(id);
            return None;
        }
        if session.key_id != key_id {
            return None;
        }
        session.last_used = now;
        session.order = self.clock.fetch_add(1, Ordering::Relaxed);
        Some(session.version)
    }

    /// Ends session `id` of `key_id`; whether it existed.
    pub fn remove(&self, id: &str, key_id: &str) -> bool {
        let mut map = self.lock();
        match map.get(id) {
            Some(s) if s.key_id == key_id => map.remove(id).is_some(),
            _ => false,
        }
    }

    /// Sessions alive (or not yet swept).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_are_bound_to_their_key() {
        let s = Sessions::new(10, 10, Duration::from_secs(60));
        let id = s.create("a", "2025-06-18").unwrap();
        assert_eq!(id.len(), 32);
        assert_eq!(s.touch(&id, "a"), Some("2025-06-18"));
        assert_eq!(s.touch(&id, "b"), None);
        assert!(!s.remove(&id, "b"));
        assert!(s.remove(&id, "a"));
        assert_eq!(s.touch(&id, "a"), None);
        assert!(s.is_empty());
    }

    #[test]
    fn idle_sessions_end() {
        let s = Sessions::new(10, 10, Duration::ZERO);
        let id = s.create("a", "2025-06-18").unwrap();
        assert_eq!(s.touch(&id, "a"), None);
    }

    #[test]
    fn caps_per_key_and_in_total() {
        let s = Sessions::new(3, 2, Duration::from_secs(60));
        let first = s.create("a", "v").unwrap();
        let _second = s.create("a", "v").unwrap();
        let _third = s.create("a", "v").unwrap();
        assert_eq!(
            s.touch(&first, "a"),
            None,
            "the oldest of key a was dropped"
        );
        let _b = s.create("b", "v").unwrap();
        let err = s.create("c", "v").unwrap_err();
        assert_eq!(err.code().code(), -32000);
    }
}
