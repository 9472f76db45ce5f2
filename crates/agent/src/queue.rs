//! The agent's work queue: one item per key (a VNF's name), de-duplicated, handed to a bounded
//! number of workers at once, never the same key to two workers at once, with per-key
//! exponential backoff for retries.
//!
//! Owns which key is processed when. It must not know what processing a key means (the
//! reconcile loop decides that) nor hold an item's data: the caller keeps the newest desired
//! state and reads it when it takes the key, so a key queued twice is processed once, with what
//! is newest then.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::Hash;
use std::num::NonZeroUsize;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// Exponential backoff of a key whose processing failed: `base`, then twice as long after each
/// further failure, never longer than `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
}

impl Backoff {
    /// The wait before the retry that follows the `failures`-th failure in a row (1: `base`).
    pub fn delay(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(31);
        self.base.saturating_mul(1u32 << doublings).min(self.max)
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            base: Duration::from_millis(250),
            max: Duration::from_secs(30),
        }
    }
}

struct State<K> {
    /// Keys ready to be taken, oldest first; none of them is being processed.
    ready: VecDeque<K>,
    /// Keys waiting in `ready`, or being processed and asked for again (queued once more when
    /// their processing ends).
    queued: HashSet<K>,
    processing: HashSet<K>,
    /// Keys waiting for a backoff retry, with when it is due.
    delayed: HashMap<K, Instant>,
    /// Failures in a row, per key.
    failures: HashMap<K, u32>,
    closed: bool,
}

/// See the module comment. Shared by reference: workers call [`WorkQueue::next`] and drop the
/// returned [`Taken`] when done with the key.
pub struct WorkQueue<K> {
    state: Mutex<State<K>>,
    changed: Notify,
    limit: NonZeroUsize,
    backoff: Backoff,
}

/// A key handed to one worker. Dropping it ends the key's processing (also when the worker
/// panicked): a key asked for meanwhile is queued again.
pub struct Taken<'a, K: Eq + Hash + Clone> {
    queue: &'a WorkQueue<K>,
    key: K,
}

impl<K: Eq + Hash + Clone> Taken<'_, K> {
    pub fn key(&self) -> &K {
        &self.key
    }
}

impl<K: Eq + Hash + Clone> Drop for Taken<'_, K> {
    fn drop(&mut self) {
        {
            let mut s = self.queue.lock();
            s.processing.remove(&self.key);
            if s.queued.contains(&self.key) {
                s.ready.push_back(self.key.clone());
            }
        }
        self.queue.changed.notify_waiters();
    }
}

impl<K: Eq + Hash + Clone> WorkQueue<K> {
    /// A queue handing out at most `limit` keys at once.
    pub fn new(limit: NonZeroUsize, backoff: Backoff) -> Self {
        Self {
            state: Mutex::new(State {
                ready: VecDeque::new(),
                queued: HashSet::new(),
                processing: HashSet::new(),
                delayed: HashMap::new(),
                failures: HashMap::new(),
                closed: false,
            }),
            changed: Notify::new(),
            limit,
            backoff,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<K>> {
        // No code panics while holding the lock; a poisoned lock still holds consistent sets.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn enqueue(s: &mut State<K>, key: K) {
        if s.queued.insert(key.clone()) && !s.processing.contains(&key) {
            s.ready.push_back(key);
        }
    }

    /// Asks for `key` to be processed now (something about it changed). A key already waiting
    /// is not queued twice; a key being processed is processed once more afterwards; a backoff
    /// retry it was waiting for is replaced by this.
    pub fn add(&self, key: K) {
        {
            let mut s = self.lock();
            if s.closed {
                return;
            }
            s.delayed.remove(&key);
            Self::enqueue(&mut s, key);
        }
        self.changed.notify_waiters();
    }

    /// Like [`WorkQueue::add`], except that a key waiting for a backoff retry keeps waiting (a
    /// periodic look must not defeat the backoff).
    pub fn resync(&self, key: K) {
        {
            let mut s = self.lock();
            if s.closed || s.delayed.contains_key(&key) {
                return;
            }
            Self::enqueue(&mut s, key);
        }
        self.changed.notify_waiters();
    }

    /// Queues `key` once `delay` has passed (a change queues it sooner; a periodic look does
    /// not).
    pub fn add_after(&self, key: K, delay: Duration) {
        {
            let mut s = self.lock();
            if s.closed {
                return;
            }
            s.delayed.insert(key, Instant::now() + delay);
        }
        self.changed.notify_waiters();
    }

    /// Records a failure of `key` and queues it again after its backoff; returns the wait.
    pub fn retry(&self, key: K) -> Duration {
        let delay = {
            let mut s = self.lock();
            let failures = s.failures.entry(key.clone()).or_insert(0);
            *failures = failures.saturating_add(1);
            let delay = self.backoff.delay(*failures);
            if !s.closed {
                s.delayed.insert(key, Instant::now() + delay);
            }
            delay
        };
        self.changed.notify_waiters();
        delay
    }

    /// Clears `key`'s failures: its next failure waits `base` again.
    pub fn forget(&self, key: &K) {
        self.lock().failures.remove(key);
    }

    /// Failures of `key` in a row.
    pub fn failures(&self, key: &K) -> u32 {
        self.lock().failures.get(key).copied().unwrap_or(0)
    }

    /// Keys waiting to be taken (now or after a backoff) or being processed.
    pub fn len(&self) -> usize {
        let s = self.lock();
        let delayed_only = s
            .delayed
            .keys()
            .filter(|k| !s.queued.contains(*k) && !s.processing.contains(*k))
            .count();
        s.queued.union(&s.processing).count() + delayed_only
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Hands out nothing more: [`WorkQueue::next`] answers `None` (keys being processed finish).
    pub fn close(&self) {
        self.lock().closed = true;
        self.changed.notify_waiters();
    }

    /// The next key to process, waiting for one (and for a free slot); `None` once closed.
    pub async fn next(&self) -> Option<Taken<'_, K>> {
        self.take(false).await
    }

    /// Like [`WorkQueue::next`], but `None` as soon as no key is ready or being processed
    /// (keys waiting for a backoff retry are not waited for).
    pub async fn next_until_idle(&self) -> Option<Taken<'_, K>> {
        self.take(true).await
    }

    async fn take(&self, until_idle: bool) -> Option<Taken<'_, K>> {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            // Registered before looking, so a change made after the look wakes this wait.
            notified.as_mut().enable();
            let due = {
                let mut s = self.lock();
                if s.closed {
                    return None;
                }
                let now = Instant::now();
                let due_now: Vec<K> = s
                    .delayed
                    .iter()
                    .filter(|(_, at)| **at <= now)
                    .map(|(k, _)| k.clone())
                    .collect();
                for key in due_now {
                    s.delayed.remove(&key);
                    Self::enqueue(&mut s, key);
                }
                if s.processing.len() < self.limit.get()
                    && let Some(key) = s.ready.pop_front()
                {
                    s.queued.remove(&key);
                    s.processing.insert(key.clone());
                    return Some(Taken { queue: self, key });
                }
                if until_idle && s.ready.is_empty() && s.processing.is_empty() {
                    return None;
                }
                s.delayed.values().min().copied()
            };
            match due {
                Some(at) => {
                    tokio::select! {
                        _ = &mut notified => {}
                        _ = tokio::time::sleep_until(at) => {}
                    }
                }
                None => notified.await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(limit: usize) -> WorkQueue<&'static str> {
        WorkQueue::new(
            NonZeroUsize::new(limit).expect("test limits are positive"),
            Backoff {
                base: Duration::from_millis(5),
                max: Duration::from_millis(40),
            },
        )
    }

    #[test]
    fn backoff_doubles_up_to_its_max() {
        let b = Backoff {
            base: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        let delays: Vec<u128> = (1..=6).map(|n| b.delay(n).as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(b.delay(u32::MAX), Duration::from_secs(1));
    }

    #[tokio::test]
    async fn a_key_added_twice_is_taken_once() {
        let q = queue(4);
        q.add("a");
        q.add("b");
        q.add("a");
        let a = q.next_until_idle().await.expect("a is ready");
        let b = q.next_until_idle().await.expect("b is ready");
        assert_eq!((*a.key(), *b.key()), ("a", "b"));
        drop((a, b));
        assert!(q.next_until_idle().await.is_none());
    }

    #[tokio::test]
    async fn a_key_is_never_handed_out_twice_at_once() {
        let q = queue(4);
        q.add("a");
        let first = q.next_until_idle().await.expect("a is ready");
        q.add("a");
        // While `a` is processed, asking again only marks it: nothing else is ready.
        assert_eq!(q.len(), 1);
        let second = tokio::time::timeout(Duration::from_millis(50), q.next());
        assert!(second.await.is_err(), "a was handed out twice");
        drop(first);
        let again = q.next_until_idle().await.expect("a is queued again");
        assert_eq!(*again.key(), "a");
    }

    #[tokio::test]
    async fn at_most_limit_keys_are_out_at_once() {
        let q = queue(2);
        for k in ["a", "b", "c"] {
            q.add(k);
        }
        let a = q.next().await.expect("a");
        let b = q.next().await.expect("b");
        let blocked = tokio::time::timeout(Duration::from_millis(50), q.next());
        assert!(
            blocked.await.is_err(),
            "a third key went out over the limit"
        );
        drop(a);
        let c = q.next().await.expect("c after a slot freed");
        assert_eq!((*b.key(), *c.key()), ("b", "c"));
    }

    #[tokio::test]
    async fn a_failed_key_comes_back_after_its_backoff_and_resync_does_not_hurry_it() {
        let q = queue(1);
        assert_eq!(q.retry("a"), Duration::from_millis(5));
        assert_eq!(q.retry("a"), Duration::from_millis(10));
        q.resync("a");
        // Only delayed: the idle drain does not wait for it, `next` does.
        assert!(q.next_until_idle().await.is_none());
        let back = tokio::time::timeout(Duration::from_secs(10), q.next())
            .await
            .expect("the retry comes within its backoff")
            .expect("not closed");
        assert_eq!(*back.key(), "a");
        assert_eq!(q.failures(&"a"), 2);
        q.forget(&"a");
        assert_eq!(q.failures(&"a"), 0);
    }

    #[tokio::test]
    async fn close_ends_waiting_workers() {
        let q = std::sync::Arc::new(queue(1));
        let waiter = {
            let q = std::sync::Arc::clone(&q);
            tokio::spawn(async move { q.next().await.map(|t| *t.key()) })
        };
        tokio::task::yield_now().await;
        q.close();
        assert_eq!(waiter.await.expect("the waiter ends"), None);
    }
}
