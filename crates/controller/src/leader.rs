//! Leader election among controllers sharing one store, and the fence that keeps a deposed
//! leader from writing.
//!
//! Owns the leader key (a record naming the leader and its API address, attached to a lease the
//! leader keeps alive), campaigning for it, holding it, and [`FencedStore`]: the store as the
//! leader uses it, where every transaction also requires that the leader key is still the one
//! this leader wrote. It must not decide what a leader does (the binary starts the scheduler
//! and liveness loops once elected) nor know the backend (it uses the `Store` trait only, so the
//! embedded store elects its single controller the same way).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use telvirt_store::{
    Compare, LeaseId, Op, Store, StoreError, StoreHealth, TxnOutcome, Versioned, Watch, WatchEvent,
};

/// The key the leader holds.
pub const LEADER_KEY: &str = "/leader";

/// Who leads: stored at [`LEADER_KEY`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderRecord {
    /// Unique per controller process.
    pub id: String,
    /// Where the leader's API is reached, e.g. `http://10.0.0.1:7070`.
    pub api: String,
}

/// Held leadership: the lease under the leader key and the revision at which this leader
/// wrote it (the fence).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leadership {
    pub lease: LeaseId,
    pub revision: u64,
}

/// Why a leader stopped leading.
#[derive(Debug, thiserror::Error)]
pub enum LeadershipLost {
    #[error("the leader lease could not be renewed: {0}")]
    Renewal(StoreError),
    #[error("the leader key was taken over or deleted")]
    KeyChanged,
}

/// Campaigns for and holds the leader key on `store`.
pub struct Election {
    store: Arc<dyn Store>,
    me: LeaderRecord,
    ttl: Duration,
}

impl Election {
    /// `ttl`: how long the key outlives its leader (a dead leader is replaced after it).
    pub fn new(store: Arc<dyn Store>, me: LeaderRecord, ttl: Duration) -> Self {
        Self { store, me, ttl }
    }

    pub fn me(&self) -> &LeaderRecord {
        &self.me
    }

    /// The leader now, if there is one.
    pub async fn leader(&self) -> Result<Option<LeaderRecord>, StoreError> {
        read_leader(self.store.as_ref()).await
    }

    /// Waits until this process holds the leader key. Store errors are retried (a leader
    /// must be elected once the store is back).
    pub async fn campaign(&self) -> Leadership {
        loop {
            match self.try_once().await {
                Ok(Some(l)) => return l,
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!("campaigning for leadership: {e}");
                    tokio::time::sleep(self.ttl / 2).await;
                }
            }
        }
    }

    /// One attempt: the key if it is free now, else waits (at most a TTL) for it to go.
    async fn try_once(&self) -> Result<Option<Leadership>, StoreError> {
        // Watching first: a deletion between the failed attempt and the wait is not missed.
        let mut watch = self.store.watch(LEADER_KEY).await?;
        let lease = self.store.grant_lease(self.ttl).await?;
        let value = serde_json::to_vec(&self.me)
            .map_err(|e| StoreError::Backend(format!("encoding the leader record: {e}")))?;
        let outcome = self
            .store
            .txn(
                vec![Compare::ModRevision {
                    key: LEADER_KEY.to_owned(),
                    revision: 0,
                }],
                vec![Op::Put {
                    key: LEADER_KEY.to_owned(),
                    value,
                    lease: Some(lease),
                }],
            )
            .await;
        match outcome {
            Ok(o) if o.succeeded => {
                return Ok(Some(Leadership {
                    lease,
                    revision: o.revision,
                }));
            }
            Ok(_) => {}
            Err(e) => {
                let _ = self.store.revoke(lease).await;
                return Err(e);
            }
        }
        let _ = self.store.revoke(lease).await;
        // Someone leads: wait for the key to go (its leader died or resigned), or a TTL.
        let _ = tokio::time::timeout(self.ttl, async {
            while let Some(event) = watch.next().await {
                if matches!(event, WatchEvent::Delete { .. } | WatchEvent::Resync) {
                    break;
                }
            }
        })
        .await;
        Ok(None)
    }

    /// Keeps `held` alive (every third of the TTL) until it is lost; returns why. A renewal
    /// that fails is retried until the TTL since the last success has passed: then the key may
    /// be someone else's, and this process must stop acting as leader.
    pub async fn hold(&self, held: Leadership) -> LeadershipLost {
        let every = self.ttl / 3;
        let mut last_ok = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(every).await;
            match self.store.keep_alive(held.lease).await {
                Ok(()) => last_ok = tokio::time::Instant::now(),
                Err(e @ StoreError::NoLease(_)) => return LeadershipLost::Renewal(e),
                Err(e) => {
                    if last_ok.elapsed() >= self.ttl {
                        return LeadershipLost::Renewal(e);
                    }
                    tracing::warn!("renewing the leader lease: {e}");
                    continue;
                }
            }
            match self.store.get(LEADER_KEY).await {
                Ok(Some(v)) if v.mod_revision == held.revision => {}
                Ok(_) => return LeadershipLost::KeyChanged,
                Err(e) => tracing::warn!("reading the leader key: {e}"),
            }
        }
    }

    /// Gives the key up at once (a clean shutdown), so another controller leads without
    /// waiting for the TTL.
    pub async fn resign(&self, held: Leadership) {
        if let Err(e) = self.store.revoke(held.lease).await {
            tracing::warn!("resigning leadership: {e}");
        }
    }
}

/// The leader record stored now, if any.
pub async fn read_leader(store: &dyn Store) -> Result<Option<LeaderRecord>, StoreError> {
    let Some(v) = store.get(LEADER_KEY).await? else {
        return Ok(None);
    };
    serde_json::from_slice(&v.value)
        .map(Some)
        .map_err(|e| StoreError::Corrupt {
            key: LEADER_KEY.to_owned(),
            why: e.to_string(),
        })
}

/// The store as a leader writes to it: every transaction also requires the leader key to be
/// at the revision this leader wrote it, so a leader that lost its key (paused, partitioned,
/// its lease expired) cannot change anything, even before it notices.
pub struct FencedStore {
    inner: Arc<dyn Store>,
    fence: u64,
}

impl FencedStore {
    pub fn new(inner: Arc<dyn Store>, held: Leadership) -> Self {
        Self {
            inner,
            fence: held.revision,
        }
    }
}

#[async_trait]
impl Store for FencedStore {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        self.inner.get(key).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, Versioned)>, StoreError> {
        self.inner.list(prefix).await
    }

    async fn list_range(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Versioned)>, StoreError> {
        self.inner.list_range(prefix, start_after, limit).await
    }

    async fn txn(
        &self,
        mut compares: Vec<Compare>,
        ops: Vec<Op>,
    ) -> Result<TxnOutcome, StoreError> {
        compares.push(Compare::ModRevision {
            key: LEADER_KEY.to_owned(),
            revision: self.fence,
        });
        let outcome = self.inner.txn(compares, ops).await?;
        if !outcome.succeeded
            && self
                .inner
                .get(LEADER_KEY)
                .await?
                .is_none_or(|v| v.mod_revision != self.fence)
        {
            return Err(StoreError::Unavailable(
                "this controller is no longer the leader; the write was refused".to_owned(),
            ));
        }
        Ok(outcome)
    }

    async fn watch(&self, prefix: &str) -> Result<Watch, StoreError> {
        self.inner.watch(prefix).await
    }

    async fn watch_from(&self, prefix: &str, after_revision: u64) -> Result<Watch, StoreError> {
        self.inner.watch_from(prefix, after_revision).await
    }

    async fn current_revision(&self) -> Result<u64, StoreError> {
        self.inner.current_revision().await
    }

    async fn compact(&self, revision: u64) -> Result<(), StoreError> {
        self.inner.compact(revision).await
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        self.inner.grant_lease(ttl).await
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.inner.keep_alive(lease).await
    }

    async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.inner.revoke(lease).await
    }

    async fn size_bytes(&self) -> Result<Option<u64>, StoreError> {
        self.inner.size_bytes().await
    }

    fn health(&self) -> StoreHealth {
        self.inner.health()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use telvirt_store::RedbStore;

    fn record(id: &str) -> LeaderRecord {
        LeaderRecord {
            id: id.into(),
            api: format!("http://{id}"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_leader_at_a_time_and_the_next_takes_over_when_it_resigns() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = RedbStore::open(&dir.path().join("s.redb")).unwrap();
        let ttl = Duration::from_secs(2);
        let a = Election::new(Arc::clone(&store), record("a"), ttl);
        let b = Arc::new(Election::new(Arc::clone(&store), record("b"), ttl));
        let held_a = a.campaign().await;
        assert_eq!(a.leader().await.unwrap(), Some(record("a")));
        let campaign_b = {
            let b = Arc::clone(&b);
            tokio::spawn(async move { b.campaign().await })
        };
        // b waits while a leads.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!campaign_b.is_finished());
        a.resign(held_a).await;
        let held_b = tokio::time::timeout(Duration::from_secs(10), campaign_b)
            .await
            .expect("b never took over")
            .unwrap();
        assert_eq!(b.leader().await.unwrap(), Some(record("b")));
        assert!(held_b.revision > held_a.revision);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_deposed_leaders_fenced_writes_are_refused_and_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = RedbStore::open(&dir.path().join("s.redb")).unwrap();
        let ttl = Duration::from_secs(2);
        let a = Election::new(Arc::clone(&store), record("a"), ttl);
        let held_a = a.campaign().await;
        let fenced_a = FencedStore::new(Arc::clone(&store), held_a);
        fenced_a.put("/vnfs/x", b"1".to_vec()).await.unwrap();
        // a loses its key (as after a pause longer than the TTL) and b leads.
        a.resign(held_a).await;
        let b = Election::new(Arc::clone(&store), record("b"), ttl);
        let held_b = b.campaign().await;
        let err = fenced_a.put("/vnfs/x", b"2".to_vec()).await.unwrap_err();
        assert!(err.to_string().contains("no longer the leader"), "{err}");
        assert_eq!(store.get("/vnfs/x").await.unwrap().unwrap().value, b"1");
        // b's fenced writes go through; a plain CAS failure is still just a failure.
        let fenced_b = FencedStore::new(Arc::clone(&store), held_b);
        fenced_b.put("/vnfs/x", b"3".to_vec()).await.unwrap();
        assert!(
            !fenced_b
                .compare_and_swap("/vnfs/x", 1, b"4".to_vec())
                .await
                .unwrap()
        );
        assert_eq!(store.get("/vnfs/x").await.unwrap().unwrap().value, b"3");
    }
}
