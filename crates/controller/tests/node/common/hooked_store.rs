//! A real redb store seen through hooks the controller's tests set: it records what is read,
//! refuses or holds a chosen write, answers a transaction it applied with an error (as an
//! etcd call that timed out after its commit), and can grant every lease for longer than
//! asked. One test double for every test that needs the store to misbehave; the store
//! underneath is the real one.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use telvirt_store::{
    Compare, LeaseId, Op, RedbStore, Store, StoreError, StoreHealth, TxnOutcome, Versioned, Watch,
};

pub struct HookedStore {
    inner: Arc<RedbStore>,
    /// Prefixes listed since the last [`HookedStore::take_reads`].
    lists: Mutex<Vec<String>>,
    /// Keys read since the last [`HookedStore::take_reads`].
    gets: Mutex<Vec<String>>,
    /// The next write of this key is refused (once), nothing applied.
    pub fail_write: Mutex<Option<String>>,
    /// The next write of this key (once) waits in the store from when it says so (`held`)
    /// until it is let go (`go_on`).
    pub hold_write: Mutex<Option<String>>,
    /// The next transaction that deletes this key (once) waits as a held write does.
    pub hold_delete: Mutex<Option<String>>,
    pub held: tokio::sync::Notify,
    pub go_on: tokio::sync::Notify,
    /// The next transaction is applied, then answered with an error (once).
    pub unanswered_txn: AtomicBool,
    /// How long every lease lasts, whatever TTL is asked (`None`: as asked).
    lease_ttl: Option<Duration>,
}

impl HookedStore {
    /// The store at `path`, with no hook set.
    pub fn open(path: &std::path::Path) -> Arc<Self> {
        Self::build(path, None)
    }

    /// [`HookedStore::open`] whose leases all last `ttl`.
    pub fn with_lease_ttl(path: &std::path::Path, ttl: Duration) -> Arc<Self> {
        Self::build(path, Some(ttl))
    }

    fn build(path: &std::path::Path, lease_ttl: Option<Duration>) -> Arc<Self> {
        Arc::new(Self {
            inner: RedbStore::open(path).unwrap(),
            lists: Mutex::new(Vec::new()),
            gets: Mutex::new(Vec::new()),
            fail_write: Mutex::new(None),
            hold_write: Mutex::new(None),
            hold_delete: Mutex::new(None),
            held: tokio::sync::Notify::new(),
            go_on: tokio::sync::Notify::new(),
            unanswered_txn: AtomicBool::new(false),
            lease_ttl,
        })
    }

    /// What was listed and read since the last call (prefixes, keys), and forgets it.
    pub fn take_reads(&self) -> (Vec<String>, Vec<String>) {
        (
            std::mem::take(&mut *self.lists.lock().unwrap()),
            std::mem::take(&mut *self.gets.lock().unwrap()),
        )
    }
}

/// Takes the key `hook` names when `ops` write it.
fn take_if_written(hook: &Mutex<Option<String>>, ops: &[Op]) -> Option<String> {
    take_if(
        hook,
        ops,
        |op, key| matches!(op, Op::Put { key: k, .. } if k == key),
    )
}

/// Takes the key `hook` names when `ops` delete it.
fn take_if_deleted(hook: &Mutex<Option<String>>, ops: &[Op]) -> Option<String> {
    take_if(
        hook,
        ops,
        |op, key| matches!(op, Op::Delete { key: k } if k == key),
    )
}

fn take_if(
    hook: &Mutex<Option<String>>,
    ops: &[Op],
    touches: impl Fn(&Op, &str) -> bool,
) -> Option<String> {
    let mut hook = hook.lock().unwrap();
    let hit = hook
        .as_ref()
        .is_some_and(|key| ops.iter().any(|op| touches(op, key)));
    if hit { hook.take() } else { None }
}

#[async_trait]
impl Store for HookedStore {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        self.gets.lock().unwrap().push(key.to_owned());
        self.inner.get(key).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<(String, Versioned)>, StoreError> {
        self.lists.lock().unwrap().push(prefix.to_owned());
        self.inner.list(prefix).await
    }
    async fn list_range(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Versioned)>, StoreError> {
        self.lists.lock().unwrap().push(prefix.to_owned());
        self.inner.list_range(prefix, start_after, limit).await
    }
    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<TxnOutcome, StoreError> {
        if let Some(key) = take_if_written(&self.fail_write, &ops) {
            return Err(StoreError::Unavailable(format!(
                "the test refuses this write of {key}"
            )));
        }
        if take_if_written(&self.hold_write, &ops).is_some()
            || take_if_deleted(&self.hold_delete, &ops).is_some()
        {
            self.held.notify_one();
            self.go_on.notified().await;
        }
        let outcome = self.inner.txn(compares, ops).await?;
        if self.unanswered_txn.swap(false, Ordering::SeqCst) {
            return Err(StoreError::Unavailable(
                "the test lets this applied transaction time out".into(),
            ));
        }
        Ok(outcome)
    }
    async fn watch(&self, prefix: &str) -> Result<Watch, StoreError> {
        self.inner.watch(prefix).await
    }
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        self.inner.grant_lease(self.lease_ttl.unwrap_or(ttl)).await
    }
    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.inner.keep_alive(lease).await
    }
    async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.inner.revoke(lease).await
    }
    fn health(&self) -> StoreHealth {
        self.inner.health()
    }
}
