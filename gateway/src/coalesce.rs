//! Sharing of identical reads: while one `GetMetrics` (or `Health`) call
//! for a given question is on its way to the broker, other requests asking
//! exactly the same question wait for its answer instead of sending their
//! own. A coalescer may also keep a good answer for a bounded time
//! (`max_age`, measured from when its call was sent) and give it to later
//! requests asking the same question; with `max_age` zero nothing outlives
//! its call. Answers that `keep` refuses (errors) are never kept. The
//! question is the whole broker request minus who asked (the namespaces it
//! covers are part of it), so a caller never sees an answer to a wider
//! question than its own; each request is still authenticated, authorized
//! and audited alone. Callers that must not see answers from before some
//! event (a start or stop) put a generation in the question.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::OnceCell;

/// Questions held beyond which a new question first drops the expired
/// answers; after that, twice what was left (so dropping stays amortised
/// constant time per question however many are young).
const PRUNE_ABOVE: usize = 256;

/// One call for a question: in flight, or answered at most `max_age` ago.
#[derive(Debug)]
struct Flight<V> {
    sent: Instant,
    answer: Arc<OnceCell<V>>,
}

/// Calls in flight and kept answers, by question.
#[derive(Debug)]
pub struct Coalescer<K, V> {
    max_age: Duration,
    flights: Mutex<Flights<K, V>>,
}

#[derive(Debug)]
struct Flights<K, V> {
    by_question: HashMap<K, Flight<V>>,
    /// Size at which the next question drops expired answers first.
    prune_at: usize,
}

impl<K, V> Default for Coalescer<K, V> {
    /// Shares calls in flight only: no answer outlives its call.
    fn default() -> Self {
        Self::keeping_for(Duration::ZERO)
    }
}

impl<K, V> Coalescer<K, V> {
    /// A coalescer that also gives a kept answer to requests arriving up
    /// to `max_age` after its call was sent.
    pub fn keeping_for(max_age: Duration) -> Self {
        Self {
            max_age,
            flights: Mutex::new(Flights {
                by_question: HashMap::new(),
                prune_at: PRUNE_ABOVE,
            }),
        }
    }
}

impl<K: Eq + Hash + Clone, V: Clone> Coalescer<K, V> {
    /// The answer to `key`: from the call in flight for it, or from a kept
    /// answer still young enough, else from `call`, which then serves
    /// whoever asks while it runs (and, if `keep` accepts its answer, for
    /// `max_age` after it was sent).
    pub async fn run<F, Fut>(&self, key: K, keep: fn(&V) -> bool, call: F) -> V
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = V>,
    {
        let cell = self.join(&key);
        // Removes the flight when this request is the last one holding it
        // and no answer came (every request for it gone: cancelled).
        let _leave = Leave {
            coalescer: self,
            key: &key,
            answer: &cell,
        };
        cell.get_or_init(|| async {
            let answer = call().await;
            if self.max_age.is_zero() || !keep(&answer) {
                // Later requests start a call of their own.
                self.forget(&key, &cell);
            }
            answer
        })
        .await
        .clone()
    }

    /// The answer cell for `key`: the live flight's, or a new flight's.
    fn join(&self, key: &K) -> Arc<OnceCell<V>> {
        let now = Instant::now();
        let max_age = self.max_age;
        let live = |f: &Flight<V>| !f.answer.initialized() || now.duration_since(f.sent) < max_age;
        let mut flights = self.lock();
        if let Some(flight) = flights.by_question.get(key).filter(|f| live(f)) {
            return flight.answer.clone();
        }
        if flights.by_question.len() >= flights.prune_at {
            flights.by_question.retain(|_, f| live(f));
            flights.prune_at = PRUNE_ABOVE.max(2 * flights.by_question.len());
        }
        let answer = Arc::new(OnceCell::new());
        flights.by_question.insert(
            key.clone(),
            Flight {
                sent: now,
                answer: answer.clone(),
            },
        );
        answer
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Flights<K, V>> {
        self.flights.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Drops `key`'s entry if it is still `answer`'s flight.
    fn forget(&self, key: &K, answer: &Arc<OnceCell<V>>) {
        let mut flights = self.lock();
        if flights
            .by_question
            .get(key)
            .is_some_and(|f| Arc::ptr_eq(&f.answer, answer))
        {
            flights.by_question.remove(key);
        }
    }

    /// Questions with a call in flight or an answer kept (for tests).
    #[cfg(test)]
    fn held(&self) -> usize {
        self.lock().by_question.len()
    }
}

/// See [`Coalescer::run`].
struct Leave<'a, K: Eq + Hash + Clone, V: Clone> {
    coalescer: &'a Coalescer<K, V>,
    key: &'a K,
    answer: &'a Arc<OnceCell<V>>,
}

impl<K: Eq + Hash + Clone, V: Clone> Drop for Leave<'_, K, V> {
    fn drop(&mut self) {
        // Held by the map and by this request only: nobody else waits.
        if !self.answer.initialized() && Arc::strong_count(self.answer) <= 2 {
            self.coalescer.forget(self.key, self.answer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    fn always(_: &usize) -> bool {
        true
    }

    /// Asks `key` of `c` with a call that counts itself in `calls` and
    /// answers the count.
    async fn ask_counted(
        c: &Coalescer<&'static str, usize>,
        key: &'static str,
        calls: &AtomicUsize,
        keep: fn(&usize) -> bool,
    ) -> usize {
        c.run(key, keep, || async {
            calls.fetch_add(1, Ordering::SeqCst) + 1
        })
        .await
    }

    #[tokio::test]
    async fn concurrent_identical_questions_share_one_call_and_later_ones_ask_again() {
        let c: Arc<Coalescer<&str, usize>> = Arc::default();
        let calls = Arc::new(AtomicUsize::new(0));
        let (release, gate) = tokio::sync::watch::channel(false);
        let ask = |key: &'static str| {
            let (c, calls, mut gate) = (c.clone(), calls.clone(), gate.clone());
            tokio::spawn(async move {
                c.run(key, always, || async move {
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
        assert_eq!(c.held(), 0, "no answer outlives its call");
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
                c.run("q", always, || async {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    1
                })
                .await
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(c.held(), 1);
        asker.abort();
        let _ = asker.await;
        assert_eq!(c.held(), 0, "no entry left behind by a cancelled call");
    }

    #[tokio::test]
    async fn a_kept_answer_serves_later_questions_until_it_is_too_old() {
        let calls = AtomicUsize::new(0);
        let kept = Coalescer::keeping_for(Duration::from_secs(30));
        assert_eq!(ask_counted(&kept, "a", &calls, always).await, 1);
        assert_eq!(ask_counted(&kept, "a", &calls, always).await, 1, "kept");
        assert_eq!(
            ask_counted(&kept, "b", &calls, always).await,
            2,
            "own question"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 2);

        let brief = Coalescer::keeping_for(Duration::from_millis(20));
        assert_eq!(ask_counted(&brief, "a", &calls, always).await, 3);
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(
            ask_counted(&brief, "a", &calls, always).await,
            4,
            "an answer older than max_age is asked again"
        );
    }

    #[tokio::test]
    async fn answers_keep_refuses_are_not_kept() {
        let calls = AtomicUsize::new(0);
        let c = Coalescer::keeping_for(Duration::from_secs(30));
        let odd = |n: &usize| n % 2 == 1;
        assert_eq!(ask_counted(&c, "a", &calls, odd).await, 1);
        assert_eq!(ask_counted(&c, "a", &calls, odd).await, 1, "1 is kept");
        assert_eq!(ask_counted(&c, "b", &calls, odd).await, 2);
        assert_eq!(ask_counted(&c, "b", &calls, odd).await, 3, "2 was refused");
        assert_eq!(c.held(), 2, "a and b's 3");
    }

    #[tokio::test]
    async fn expired_answers_are_dropped_once_many_are_held() {
        let calls = AtomicUsize::new(0);
        let c: Coalescer<String, usize> = Coalescer::keeping_for(Duration::from_millis(10));
        for i in 0..PRUNE_ABOVE {
            c.run(i.to_string(), always, || async {
                calls.fetch_add(1, Ordering::SeqCst)
            })
            .await;
        }
        assert_eq!(c.held(), PRUNE_ABOVE);
        tokio::time::sleep(Duration::from_millis(30)).await;
        c.run("new".to_owned(), always, || async { 0 }).await;
        assert_eq!(c.held(), 1, "only the new answer is left");
    }

    #[tokio::test]
    async fn young_answers_are_all_kept_and_dropping_waits_for_twice_as_many() {
        let c: Coalescer<String, usize> = Coalescer::keeping_for(Duration::from_secs(60));
        for i in 0..PRUNE_ABOVE + 10 {
            c.run(i.to_string(), always, || async { i }).await;
        }
        assert_eq!(c.held(), PRUNE_ABOVE + 10, "none expired");
        assert_eq!(c.lock().prune_at, 2 * PRUNE_ABOVE);
        assert_eq!(c.run("3".to_owned(), always, || async { 0 }).await, 3);
    }
}
