//! A bounded memory of API keys whose signature and claims already
//! verified, so a client that sends the same key on every request is not
//! made to pay an HMAC, two base64 decodes and two JSON parses each time.
//!
//! It only ever narrows what passes: an entry is found by the whole token
//! (byte for byte, never by a hash alone), it is forgotten from the second
//! of the key's expiry on (the full check then names the expired key), and
//! the revocation list is still asked on every request by the
//! [`super::Verifier`]. Refused keys are never remembered. When full, the
//! memory is emptied at once: a client cycling through many valid keys
//! costs only the full check it would have cost anyway.

use std::collections::HashMap;
use std::sync::Mutex;

use super::Identity;

/// Keys remembered at most.
pub const CAPACITY: usize = 1024;

/// Tokens longer than this are never remembered (every real key is far
/// shorter; this bounds the memory to `CAPACITY` times it).
pub const MAX_TOKEN_LEN: usize = 2048;

#[derive(Debug)]
struct Verified {
    identity: Identity,
    /// The key's `exp`, seconds since 1970.
    exp: u64,
}

/// Verified tokens by their text.
#[derive(Debug, Default)]
pub struct VerifiedTokens {
    tokens: Mutex<HashMap<Box<str>, Verified>>,
}

impl VerifiedTokens {
    /// The identity `token` verified as, when it did and its expiry is
    /// still ahead of `now` (seconds since 1970).
    pub fn get(&self, token: &str, now: u64) -> Option<Identity> {
        let mut tokens = self.lock();
        match tokens.get(token) {
            Some(v) if v.exp > now => Some(v.identity.clone()),
            Some(_) => {
                tokens.remove(token);
                None
            }
            None => None,
        }
    }

    /// Remembers that `token` verified as `identity` until `exp`.
    pub fn insert(&self, token: &str, identity: &Identity, exp: u64) {
        if token.len() > MAX_TOKEN_LEN {
            return;
        }
        let mut tokens = self.lock();
        if tokens.len() >= CAPACITY {
            tokens.clear();
        }
        tokens.insert(
            token.into(),
            Verified {
                identity: identity.clone(),
                exp,
            },
        );
    }

    /// How many tokens are remembered.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Box<str>, Verified>> {
        match self.tokens.lock() {
            Ok(tokens) => tokens,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(key: &str) -> Identity {
        Identity {
            key_id: key.into(),
            namespaces: std::sync::Arc::new(super::super::Namespaces::All),
        }
    }

    #[test]
    fn found_only_by_the_whole_token_until_expiry() {
        let memory = VerifiedTokens::default();
        memory.insert("a.b.c", &id("k1"), 100);
        assert_eq!(memory.get("a.b.c", 99), Some(id("k1")));
        assert_eq!(memory.get("a.b.c ", 99), None);
        assert_eq!(memory.get("a.b.", 99), None);
        assert_eq!(memory.get("a.b.c", 100), None, "forgotten at exp");
        assert_eq!(memory.len(), 0, "and removed");
    }

    #[test]
    fn bounded_in_entries_and_token_length() {
        let memory = VerifiedTokens::default();
        for i in 0..CAPACITY + 10 {
            memory.insert(&format!("t{i}"), &id("k"), u64::MAX);
        }
        assert!(memory.len() <= CAPACITY);
        memory.insert(&"x".repeat(MAX_TOKEN_LEN + 1), &id("k"), u64::MAX);
        assert_eq!(memory.get(&"x".repeat(MAX_TOKEN_LEN + 1), 0), None);
    }
}
