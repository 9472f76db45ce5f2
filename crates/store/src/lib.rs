//! The control plane's memory: a revisioned key/value store with transactions, watches and leases.
//!
//! Owns the `Store` trait (shaped after etcd's v3 API so a cluster backend slots in without
//! touching callers), its two backends (the embedded one, a redb file; the cluster one, etcd v3)
//! and the parser of store URLs. It must not know what the keys mean: VNFs, hosts and
//! authorities are the controller's business.

mod etcd_store;
pub mod local_etcd;
mod redb_store;
mod url;

use std::time::{Duration, SystemTime};

use async_trait::async_trait;

pub use etcd_store::EtcdStore;
pub use redb_store::RedbStore;
pub use url::{StoreUrl, parse_store_url};

/// A lease id; keys attached to a lease vanish when it expires or is revoked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseId(pub u64);

/// A stored value with its revisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    pub value: Vec<u8>,
    /// Store revision of the last write to this key.
    pub mod_revision: u64,
    /// Store revision at which the key was created.
    pub create_revision: u64,
    pub lease: Option<LeaseId>,
}

/// A condition of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compare {
    /// The key's `mod_revision` equals this; `0` means the key must not exist.
    ModRevision { key: String, revision: u64 },
}

/// A write of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put {
        key: String,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    },
    Delete {
        key: String,
    },
}

/// The outcome of a transaction: whether every compare held (and so every op was applied).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxnOutcome {
    pub succeeded: bool,
    /// The store revision after the transaction.
    pub revision: u64,
}

/// A change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    Put {
        key: String,
        value: Vec<u8>,
        revision: u64,
    },
    Delete {
        key: String,
        revision: u64,
    },
    /// The watcher fell behind and missed changes: list again.
    Resync,
}

impl WatchEvent {
    pub fn key(&self) -> Option<&str> {
        match self {
            WatchEvent::Put { key, .. } | WatchEvent::Delete { key, .. } => Some(key),
            WatchEvent::Resync => None,
        }
    }
}

/// Whether the store can be used now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreHealth {
    Ok,
    /// Reads and writes are refused since `since` (the disk failed: full, I/O error); the
    /// backend keeps trying to reopen itself.
    Failing {
        since: SystemTime,
        error: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the store at {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: Box<redb::DatabaseError>,
    },
    /// The first contact with an etcd cluster failed ([`EtcdStore::connect`]).
    #[error("cannot connect to etcd at {endpoints}: {why}")]
    Connect { endpoints: String, why: String },
    /// A store URL that does not parse ([`parse_store_url`]).
    #[error("store URL {url:?}: {why}")]
    BadUrl { url: String, why: String },
    #[error("store I/O failed: {0}")]
    Backend(String),
    /// The store cannot be reached now: the disk under a redb store failed (full, I/O error), or
    /// no etcd endpoint answered. The call was not acknowledged. The store recovers by itself
    /// (redb reopens its file, the etcd client reconnects) once the cause is gone; until then
    /// every call answers this.
    #[error(
        "the store is unavailable ({0}); this call did not complete, and the store recovers by itself once its disk or its server works again"
    )]
    Unavailable(String),
    #[error("lease {0} does not exist or has expired")]
    NoLease(u64),
    #[error("stored record {key} is corrupt: {why}")]
    Corrupt { key: String, why: String },
}

/// What a call reports that met a disk fault another call caused.
pub(crate) const EARLIER_FAILURE: &str = "an earlier write to the store's file failed";

impl StoreError {
    /// Whether the disk under the store failed (see [`StoreError::Unavailable`]).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

impl From<redb::StorageError> for StoreError {
    fn from(e: redb::StorageError) -> Self {
        use redb::StorageError as S;
        match e {
            // redb latches an I/O failure: every later transaction of this handle fails too.
            S::Io(_) => StoreError::Unavailable(e.to_string()),
            // The cause went to the call that met it; the store records that one.
            S::PreviousIo | S::DatabaseClosed => StoreError::Unavailable(EARLIER_FAILURE.into()),
            other => StoreError::Backend(other.to_string()),
        }
    }
}

impl From<redb::TransactionError> for StoreError {
    fn from(e: redb::TransactionError) -> Self {
        match e {
            redb::TransactionError::Storage(s) => s.into(),
            other => StoreError::Backend(other.to_string()),
        }
    }
}

impl From<redb::TableError> for StoreError {
    fn from(e: redb::TableError) -> Self {
        match e {
            redb::TableError::Storage(s) => s.into(),
            other => StoreError::Backend(other.to_string()),
        }
    }
}

impl From<redb::CommitError> for StoreError {
    fn from(e: redb::CommitError) -> Self {
        match e {
            redb::CommitError::Storage(s) => s.into(),
            other => StoreError::Backend(other.to_string()),
        }
    }
}

/// A stream of changes under a key prefix.
pub struct Watch {
    /// Delivered before anything from `source`.
    first: Option<WatchEvent>,
    source: WatchSource,
}

/// Where a watch's changes come from.
enum WatchSource {
    /// Every change of the store (redb), filtered here by prefix.
    Broadcast {
        prefix: String,
        rx: tokio::sync::broadcast::Receiver<WatchEvent>,
    },
    /// The changes under the prefix only, fed by a task of the backend (etcd), which reconnects
    /// and sends `Resync` itself.
    Feed(tokio::sync::mpsc::Receiver<WatchEvent>),
}

impl Watch {
    pub(crate) fn new(prefix: String, rx: tokio::sync::broadcast::Receiver<WatchEvent>) -> Self {
        Self {
            first: None,
            source: WatchSource::Broadcast { prefix, rx },
        }
    }

    pub(crate) fn from_feed(rx: tokio::sync::mpsc::Receiver<WatchEvent>) -> Self {
        Self {
            first: None,
            source: WatchSource::Feed(rx),
        }
    }

    /// Makes [`WatchEvent::Resync`] the first event: changes before the watch began were missed.
    pub(crate) fn resync_first(mut self) -> Self {
        self.first = Some(WatchEvent::Resync);
        self
    }

    /// The next change under the prefix; `None` once the store is gone.
    pub async fn next(&mut self) -> Option<WatchEvent> {
        use tokio::sync::broadcast::error::RecvError;
        if let Some(event) = self.first.take() {
            return Some(event);
        }
        match &mut self.source {
            WatchSource::Broadcast { prefix, rx } => loop {
                match rx.recv().await {
                    Ok(event) => match event.key() {
                        Some(key) if !key.starts_with(prefix.as_str()) => continue,
                        _ => return Some(event),
                    },
                    Err(RecvError::Lagged(_)) => return Some(WatchEvent::Resync),
                    Err(RecvError::Closed) => return None,
                }
            },
            WatchSource::Feed(rx) => rx.recv().await,
        }
    }
}

/// get / put / compare-and-swap / watch / lease over a revisioned key space.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError>;

    /// Every key starting with `prefix`, in key order.
    async fn list(&self, prefix: &str) -> Result<Vec<(String, Versioned)>, StoreError>;

    /// At most `limit` keys starting with `prefix` and (when given) sorting strictly after
    /// `start_after`, in key order: one page of [`Store::list`]. Backends that can range-scan
    /// read only that page; this default reads the whole prefix.
    async fn list_range(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Versioned)>, StoreError> {
        Ok(self
            .list(prefix)
            .await?
            .into_iter()
            .filter(|(key, _)| start_after.is_none_or(|after| key.as_str() > after))
            .take(limit)
            .collect())
    }

    /// Applies every op atomically if every compare holds; otherwise changes nothing.
    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<TxnOutcome, StoreError>;

    /// Changes under `prefix` from now on.
    async fn watch(&self, prefix: &str) -> Result<Watch, StoreError>;

    /// Changes under `prefix` with a revision above `after_revision` (typically the revision a
    /// caller listed at). A backend that keeps its history (etcd) replays the changes since then;
    /// this default keeps none: when the store has moved past `after_revision`, the first event
    /// is [`WatchEvent::Resync`] (list again), then the changes from now on.
    /// Forgets the history before `revision`: a backend that keeps every revision of every key
    /// (etcd) grows with every write until it is compacted. A watch from before it then starts
    /// with [`WatchEvent::Resync`]. This default keeps no history, so there is nothing to do.
    async fn compact(&self, revision: u64) -> Result<(), StoreError> {
        let _ = revision;
        Ok(())
    }

    async fn watch_from(&self, prefix: &str, after_revision: u64) -> Result<Watch, StoreError> {
        // Watching before reading the revision: a change in between costs an unneeded resync
        // at worst, never a missed change.
        let watch = self.watch(prefix).await?;
        if after_revision < self.current_revision().await? {
            Ok(watch.resync_first())
        } else {
            Ok(watch)
        }
    }

    /// The store's revision now: that of its last change.
    async fn current_revision(&self) -> Result<u64, StoreError> {
        // A transaction without compares or ops changes nothing and answers the revision.
        Ok(self.txn(Vec::new(), Vec::new()).await?.revision)
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError>;

    /// Pushes the lease's expiry `ttl` into the future.
    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError>;

    /// Ends the lease now and deletes its keys.
    async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError>;

    /// Bytes the store takes on disk now (redb: its file; etcd: the answering member's
    /// database, every namespace, history not yet compacted); `None` when a backend cannot tell.
    async fn size_bytes(&self) -> Result<Option<u64>, StoreError> {
        Ok(None)
    }

    /// Whether the store can be used now. Backends without failure detection are always `Ok`.
    fn health(&self) -> StoreHealth {
        StoreHealth::Ok
    }

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<u64, StoreError> {
        let op = Op::Put {
            key: key.to_owned(),
            value,
            lease: None,
        };
        Ok(self.txn(Vec::new(), vec![op]).await?.revision)
    }

    /// Writes `value` only if the key's `mod_revision` is `expected` (`0`: only if absent).
    /// Returns whether it was written.
    async fn compare_and_swap(
        &self,
        key: &str,
        expected: u64,
        value: Vec<u8>,
    ) -> Result<bool, StoreError> {
        let compare = Compare::ModRevision {
            key: key.to_owned(),
            revision: expected,
        };
        let op = Op::Put {
            key: key.to_owned(),
            value,
            lease: None,
        };
        Ok(self.txn(vec![compare], vec![op]).await?.succeeded)
    }

    async fn delete(&self, key: &str) -> Result<u64, StoreError> {
        let op = Op::Delete {
            key: key.to_owned(),
        };
        Ok(self.txn(Vec::new(), vec![op]).await?.revision)
    }
}
