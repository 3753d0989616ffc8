//! Coalescing of identical reads in flight: while one `GetMetrics` (or
//! `Health`) call for a given question is on its way to the broker, other
//! requests asking exactly the same question wait for its answer instead of
//! sending their own. The answer a request gets was computed after the call
//! it joined was sent, so it is never older than one broker round trip; no
//! answer outlives its call (this is not a cache). The question is the
//! whole broker request minus who asked (the namespaces it covers are part
//! of it), so a caller never sees an answer to a wider question than its
//! own; each request is still authenticated, authorized and audited alone.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use tokio::sync::OnceCell;

/// Calls in flight, by question.
#[derive(Debug)]
pub struct Coalescer<K, V> {
    flights: Mutex<HashMap<K, Arc<OnceCell<V>>>>,
}

impl<K, V> Default for Coalescer<K, V> {
    fn default() -> Self {
        Self {
            flights: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Eq + Hash + Clone, V: Clone> Coalescer<K, V> {
    /// The answer to `key`: from the call in flight for it if there is one,
    /// else from `call`, which then serves whoever joins while it runs.
    pub async fn run<F, Fut>(&self, key: K, call: F) -> V
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = V>,
    {
        let flight = {
            let mut map = self.lock();
            map.entry(key.clone()).or_default().clone()
        };
        // Removes the flight when this request is the last one holding it
        // and no answer came (every request for it gone: cancelled).
        let _leave = Leave {
            coalescer: self,
            key: &key,
            flight: &flight,
        };
        let answer = flight
            .get_or_init(|| async {
                let answer = call().await;
                // Later requests start a call of their own.
                self.forget(&key, &flight);
                answer
            })
            .await;
        answer.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, Arc<OnceCell<V>>>> {
        self.flights.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Drops `key`'s entry if it is still `flight`.
    fn forget(&self, key: &K, flight: &Arc<OnceCell<V>>) {
        let mut map = self.lock();
        if map.get(key).is_some_and(|f| Arc::ptr_eq(f, flight)) {
            map.remove(key);
        }
    }

    /// Questions with a call in flight (for tests).
    #[cfg(test)]
    fn in_flight(&self) -> usize {
        self.flights.lock().map(|m| m.len()).unwrap_or(0)
    }
}

/// See [`Coalescer::run`].
struct Leave<'a, K: Eq + Hash + Clone, V: Clone> {
    coalescer: &'a Coalescer<K, V>,
    key: &'a K,
    flight: &'a Arc<OnceCell<V>>,
}

impl<K: Eq + Hash + Clone, V: Clone> Drop for Leave<'_, K, V> {
    fn drop(&mut self) {
        // Held by the map and by this request only: nobody else waits.
        if !self.flight.initialized() && Arc::strong_count(self.flight) <= 2 {
            self.coalescer.forget(self.key, self.flight);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn concurrent_identical_questions_share_one_call_and_later_ones_ask_again() {
        let c: Arc<Coalescer<&str, usize>> = Arc::default();
        let calls = Arc::new(AtomicUsize::new(0));
        let (release, gate) = tokio::sync::watch::channel(false);
        let ask = |key: &'static str| {
            let (c, calls, mut gate) = (c.clone(), calls.clone(), gate.clone());
            tokio::spawn(async move {
                c.run(key, || async move {
                    let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                    let _ = gate.wait_for(|open| *open).await;
                    n
                })
                .await
            })
        };
        let joined: Vec<_> = (0..5).map(|_| ask("a")).collect();
        let other = ask("b");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(calls.load(Ordering::SeqCst), 2, "one call per question");
        release.send(true).unwrap();
        let mut answers = Vec::new();
        for j in joined {
            answers.push(j.await.unwrap());
        }
        assert!(answers.iter().all(|a| *a == answers[0]), "{answers:?}");
        assert_ne!(other.await.unwrap(), answers[0]);
        assert_eq!(c.in_flight(), 0, "no answer outlives its call");
        let later = ask("a").await.unwrap();
        assert_eq!(
            calls.load(Ordering::SeqCst),
            3,
            "a later question is asked again"
        );
        assert_eq!(later, 3);
    }

    #[tokio::test]
    async fn a_question_whose_askers_all_left_is_forgotten() {
        let c: Arc<Coalescer<&str, usize>> = Arc::default();
        let asker = {
            let c = c.clone();
            tokio::spawn(async move {
                c.run("q", || async {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    1
                })
                .await
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(c.in_flight(), 1);
        asker.abort();
        let _ = asker.await;
        assert_eq!(c.in_flight(), 0, "no entry left behind by a cancelled call");
    }
}
