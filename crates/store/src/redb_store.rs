//! The embedded backend: one redb file, durable on every commit.
//!
//! Owns the on-disk layout (a `kv` table of revisioned records, a `meta` table with the store
//! revision and lease counter, a `leases` table), lease expiry, and recovery from disk faults:
//! after an I/O error (a full disk, a failing device) redb refuses every later transaction of
//! that handle, so the store drops the handle, answers [`StoreError::Unavailable`], and reopens
//! the same file (with backoff, from the next call or the background task) until that works.
//! It must not hold a write transaction across an await point, and it must not acknowledge a
//! write before redb has committed it durably: an acknowledged write survives `kill -9` and a
//! reopen. Transactions are committed by one thread of the store's own, off the async runtime's
//! threads: the ones that arrive while a commit is under way go into the next commit together
//! (group commit; each keeps its own compares, revision and outcome), so a burst of writes
//! costs one durable commit per batch instead of one each. Lease renewals are the exception, as in etcd: a keep-alive moves the lease's deadline
//! in memory only (no commit per heartbeat), and after the store is opened every lease has at
//! least its full TTL again, so a restart never expires a lease whose holder is alive.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::broadcast;

use crate::{
    Compare, EARLIER_FAILURE, LeaseId, Op, Store, StoreError, StoreHealth, TxnOutcome, Versioned,
    Watch, WatchEvent,
};

const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// lease id → (ttl ms, deadline as unix ms), 16 bytes little-endian.
const LEASES: TableDefinition<u64, &[u8]> = TableDefinition::new("leases");

const REVISION: &str = "revision";
const NEXT_LEASE: &str = "next_lease";
const HEADER: usize = 24;

/// First wait between two attempts to reopen a failed store; doubled up to [`REOPEN_MAX`].
const REOPEN_FIRST: Duration = Duration::from_millis(200);
const REOPEN_MAX: Duration = Duration::from_secs(2);
/// How often the background task expires leases and retries a reopen.
const TICK: Duration = Duration::from_millis(100);

/// A redb-backed store.
pub struct RedbStore {
    path: PathBuf,
    /// The open database; `None` from a disk fault until the reopen succeeds. Every transaction
    /// runs under a read guard, so a reopen (write guard) never races a live transaction and the
    /// old handle has released the file's lock before the new one takes it.
    db: RwLock<Option<Database>>,
    state: Mutex<State>,
    events: broadcast::Sender<WatchEvent>,
    /// Held by a write that changes keys from before its transaction begins until its events
    /// are sent, so watchers get every event in revision order (the committer's batches and a
    /// lease's expiry commit on different threads).
    publishing: Mutex<()>,
    /// Every live lease: id → (TTL ms, deadline as unix ms). The `leases` table holds the same
    /// leases durably (with their TTL); deadlines live here only: a keep-alive touches nothing
    /// but this map, and a store just opened gives every lease its full TTL.
    live_leases: Mutex<std::collections::HashMap<u64, (u64, u64)>>,
    /// To the committer thread: transactions waiting for the next commit.
    commits: Mutex<std::sync::mpsc::Sender<Pending>>,
    /// When the last commit that changed something ended (unix ms), and whether the file was
    /// compacted since: an idle store gives its free pages back (see [`RedbStore::compact`]).
    last_write_ms: std::sync::atomic::AtomicU64,
    compacted: std::sync::atomic::AtomicBool,
}

/// A store with no write for this long is compacted (once, until the next write).
pub const COMPACT_WHEN_IDLE: Duration = Duration::from_secs(30);

/// One transaction waiting for the committer.
struct Pending {
    compares: Vec<Compare>,
    ops: Vec<Op>,
    done: tokio::sync::oneshot::Sender<Result<TxnOutcome, StoreError>>,
}

/// Transactions committed together at most (more wait for the next commit).
const MAX_BATCH: usize = 256;

#[derive(Default)]
struct State {
    /// Bumped at every reopen, so a fault seen on an older handle does not fail a newer one.
    generation: u64,
    fault: Option<Fault>,
}

struct Fault {
    since: SystemTime,
    /// The error that failed the store.
    error: String,
    /// Why the last reopen did not work, if one was tried.
    reopen: Option<String>,
    next_attempt: Instant,
    backoff: Duration,
}

impl Fault {
    fn describe(&self) -> String {
        match &self.reopen {
            Some(why) => format!("{}; reopening failed: {why}", self.error),
            None => self.error.clone(),
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Record layout: mod_revision, create_revision, lease (0 = none), then the value.
fn encode(mod_rev: u64, create_rev: u64, lease: Option<LeaseId>, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + value.len());
    out.extend_from_slice(&mod_rev.to_le_bytes());
    out.extend_from_slice(&create_rev.to_le_bytes());
    out.extend_from_slice(&lease.map_or(0, |l| l.0).to_le_bytes());
    out.extend_from_slice(value);
    out
}

/// Rewrites the key-value table in one transaction, its entries in key order through one
/// cursor, so redb packs them into full leaves (a B-tree grown one insert at a time splits its
/// pages in half). Keys, values and revisions are unchanged: no watcher sees anything.
fn repack(db: &Database) -> Result<(), StoreError> {
    let txn = db.begin_write()?;
    {
        let entries = {
            let kv = txn.open_table(KV)?;
            let mut entries = Vec::new();
            for entry in kv.iter()? {
                let (key, value) = entry?;
                entries.push((key.value().to_owned(), value.value().to_vec()));
            }
            entries
        };
        txn.delete_table(KV)?;
        let mut kv = txn.open_table(KV)?;
        let mut cursor = kv.upper_bound_mut(std::ops::Bound::<&str>::Unbounded)?;
        for (key, value) in &entries {
            cursor
                .insert_before(key.as_str(), value.as_slice())
                .map_err(|e| StoreError::Backend(format!("repacking the records: {e}")))?;
        }
        cursor
            .close()
            .map_err(|e| StoreError::Backend(format!("repacking the records: {e}")))?;
    }
    txn.commit()?;
    Ok(())
}

fn decode(key: &str, raw: &[u8]) -> Result<Versioned, StoreError> {
    let word = |i: usize| -> Result<u64, StoreError> {
        raw.get(i * 8..i * 8 + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
            .ok_or_else(|| StoreError::Corrupt {
                key: key.to_owned(),
                why: format!("record of {} bytes is shorter than its header", raw.len()),
            })
    };
    let lease = word(2)?;
    Ok(Versioned {
        mod_revision: word(0)?,
        create_revision: word(1)?,
        lease: (lease != 0).then_some(LeaseId(lease)),
        value: raw[HEADER..].to_vec(),
    })
}

fn lease_record(ttl_ms: u64, deadline_ms: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&ttl_ms.to_le_bytes());
    out[8..].copy_from_slice(&deadline_ms.to_le_bytes());
    out
}

fn lease_fields(raw: &[u8]) -> (u64, u64) {
    let half = |r: std::ops::Range<usize>| {
        raw.get(r)
            .and_then(|b| b.try_into().ok())
            .map_or(0, u64::from_le_bytes)
    };
    (half(0..8), half(8..16))
}

/// Opens (creating if needed) the database at `path` with the store's tables.
fn open_database(path: &Path) -> Result<Database, StoreError> {
    let db = Database::create(path).map_err(|e| StoreError::Open {
        path: path.display().to_string(),
        source: Box::new(e),
    })?;
    let txn = db.begin_write()?;
    txn.open_table(KV)?;
    txn.open_table(META)?;
    txn.open_table(LEASES)?;
    txn.commit()?;
    Ok(db)
}

impl RedbStore {
    /// Opens (creating if needed) the store file at `path`. Inside a tokio runtime it also starts
    /// the task that expires leases and reopens the store after a disk fault.
    pub fn open(path: &Path) -> Result<Arc<Self>, StoreError> {
        let db = open_database(path)?;
        let (events, _) = broadcast::channel(4096);
        let (commits, queue) = std::sync::mpsc::channel::<Pending>();
        let store = Arc::new(Self {
            path: path.to_owned(),
            db: RwLock::new(Some(db)),
            state: Mutex::new(State::default()),
            events,
            publishing: Mutex::new(()),
            live_leases: Mutex::new(std::collections::HashMap::new()),
            commits: Mutex::new(commits),
            last_write_ms: std::sync::atomic::AtomicU64::new(0),
            compacted: std::sync::atomic::AtomicBool::new(true),
        });
        store.load_leases()?;
        let weak = Arc::downgrade(&store);
        std::thread::Builder::new()
            .name("telvirt-store-commit".into())
            .spawn(move || committer(&weak, &queue))
            .map_err(|e| StoreError::Unavailable(format!("cannot start the commit thread: {e}")))?;
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let weak = Arc::downgrade(&store);
            handle.spawn(async move {
                let mut tick = tokio::time::interval(TICK);
                loop {
                    tick.tick().await;
                    let Some(store) = weak.upgrade() else { break };
                    store.reopen_if_due();
                    // A failed sweep is retried on the next tick.
                    let _ = store.expire_leases(now_ms());
                    if store.compaction_due(now_ms()) {
                        let compacting = Arc::clone(&store);
                        let _ = tokio::task::spawn_blocking(move || compacting.compact()).await;
                    }
                }
            });
        }
        Ok(store)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // The state is two plain fields, consistent between statements: keep using it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the open database. A disk fault it meets fails the store (the handle is
    /// dropped, every call answers `Unavailable` until a reopen works); a failed store first
    /// tries to reopen when its backoff has passed.
    fn with_db<T>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.reopen_if_due();
        let guard = self.db.read().unwrap_or_else(|p| p.into_inner());
        let generation = self.state().generation;
        let Some(db) = guard.as_ref() else {
            return Err(self.unavailable());
        };
        let result = f(db);
        let Err(StoreError::Unavailable(why)) = &result else {
            return result;
        };
        // Recorded under the read guard, so the call that met the fault's cause has recorded
        // it before `close` below (which waits for every guard) returns.
        self.record_fault(generation, why);
        drop(guard);
        self.close(generation);
        Err(self.unavailable())
    }

    fn unavailable(&self) -> StoreError {
        StoreError::Unavailable(
            self.state()
                .fault
                .as_ref()
                .map_or_else(|| "it is being reopened".to_owned(), Fault::describe),
        )
    }

    /// Marks the store failed by `error`, seen on the handle of `generation`. A cause replaces
    /// the "earlier failure" another call met first.
    fn record_fault(&self, generation: u64, error: &str) {
        let mut state = self.state();
        if state.generation != generation {
            return;
        }
        match &mut state.fault {
            None => {
                state.fault = Some(Fault {
                    since: SystemTime::now(),
                    error: error.to_owned(),
                    reopen: None,
                    next_attempt: Instant::now() + REOPEN_FIRST,
                    backoff: REOPEN_FIRST,
                });
            }
            Some(fault) if fault.error == EARLIER_FAILURE && error != EARLIER_FAILURE => {
                fault.error = error.to_owned();
            }
            Some(_) => {}
        }
    }

    /// Drops the failed handle of `generation` (its later transactions would all fail).
    fn close(&self, generation: u64) {
        let mut db = self.db.write().unwrap_or_else(|p| p.into_inner());
        if self.state().generation == generation {
            // Closing after an I/O fault fails too: the next open repairs the file.
            if let Some(old) = db.take() {
                let _ = old.close();
            }
        }
    }

    /// Reopens a failed store if its backoff has passed. Every acknowledged write is in the file
    /// (redb commits are durable), so the reopened store holds all of them.
    fn reopen_if_due(&self) {
        match &self.state().fault {
            Some(fault) if Instant::now() >= fault.next_attempt => {}
            _ => return,
        }
        let mut db = self.db.write().unwrap_or_else(|p| p.into_inner());
        let due = self
            .state()
            .fault
            .as_ref()
            .is_some_and(|f| Instant::now() >= f.next_attempt);
        if !due {
            return;
        }
        if let Some(old) = db.take() {
            let _ = old.close();
        }
        let opened = open_database(&self.path);
        let mut state = self.state();
        match opened {
            Ok(new) => {
                *db = Some(new);
                state.generation += 1;
                state.fault = None;
                // A commit that failed may still have reached the file, with no event sent for
                // it: watchers read again rather than miss it.
                let _ = self.events.send(WatchEvent::Resync);
            }
            Err(e) => {
                if let Some(fault) = state.fault.as_mut() {
                    fault.reopen = Some(match e {
                        StoreError::Open { source, .. } => source.to_string(),
                        other => other.to_string(),
                    });
                    fault.backoff = (fault.backoff * 2).min(REOPEN_MAX);
                    fault.next_attempt = Instant::now() + fault.backoff;
                }
            }
        }
    }

    /// Deletes the keys of every lease whose deadline is before `now`; returns how many leases.
    pub fn expire_leases(&self, now: u64) -> Result<usize, StoreError> {
        let expired: Vec<u64> = self
            .leases()
            .iter()
            .filter(|(_, (_, deadline))| *deadline < now)
            .map(|(id, _)| *id)
            .collect();
        for id in &expired {
            match self.drop_lease(LeaseId(*id)) {
                Ok(()) | Err(StoreError::NoLease(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(expired.len())
    }

    /// Fills the live leases from the `leases` table, each with its full TTL from now.
    fn load_leases(&self) -> Result<(), StoreError> {
        let stored: Vec<(u64, u64)> = self.with_db(|db| {
            let txn = db.begin_read()?;
            let leases = txn.open_table(LEASES)?;
            let mut out = Vec::new();
            for entry in leases.iter()? {
                let (id, raw) = entry?;
                out.push((id.value(), lease_fields(raw.value()).0));
            }
            Ok(out)
        })?;
        let now = now_ms();
        let mut live = self.leases();
        for (id, ttl) in stored {
            live.insert(id, (ttl, now.saturating_add(ttl)));
        }
        Ok(())
    }

    /// Drops `lease` and the keys attached to it. The lease leaves the live set only once it
    /// is gone from the file (dropped now, or not there): a drop that failed is tried again by
    /// the next sweep, its keys not left to outlive it.
    fn drop_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        let dropped = self.with_db(|db| self.drop_lease_in(db, lease));
        if matches!(&dropped, Ok(()) | Err(StoreError::NoLease(_))) {
            self.leases().remove(&lease.0);
        }
        dropped
    }

    /// Whether the store has been idle for [`COMPACT_WHEN_IDLE`] since a write not yet
    /// compacted.
    fn compaction_due(&self, now: u64) -> bool {
        use std::sync::atomic::Ordering;
        let idle = u64::try_from(COMPACT_WHEN_IDLE.as_millis()).unwrap_or(u64::MAX);
        !self.compacted.load(Ordering::Relaxed)
            && now.saturating_sub(self.last_write_ms.load(Ordering::Relaxed)) >= idle
    }

    /// Packs the records into full pages and gives the file's free pages back (redb's
    /// compaction): copy-on-write commits leave the file several times larger than what it
    /// holds, and records written one at a time leave pages about half full. Waits for the
    /// transactions in flight and holds every other call meanwhile; run by the store itself once
    /// it has been idle for [`COMPACT_WHEN_IDLE`]. Returns whether the file shrank.
    pub fn compact(&self) -> Result<bool, StoreError> {
        use std::sync::atomic::Ordering;
        self.compacted.store(true, Ordering::Relaxed);
        let mut guard = self.db.write().unwrap_or_else(|p| p.into_inner());
        let Some(db) = guard.as_mut() else {
            return Err(self.unavailable());
        };
        repack(db)?;
        let mut shrank = false;
        // Each pass moves what it can; a few passes reach the end.
        for _ in 0..8 {
            match db.compact() {
                Ok(true) => shrank = true,
                Ok(false) => break,
                Err(e) => return Err(StoreError::Backend(format!("compacting: {e}"))),
            }
        }
        Ok(shrank)
    }

    fn leases(&self) -> MutexGuard<'_, std::collections::HashMap<u64, (u64, u64)>> {
        // A map of plain numbers, consistent between statements: keep using it.
        self.live_leases.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn drop_lease_in(&self, db: &Database, lease: LeaseId) -> Result<(), StoreError> {
        let _publishing = self.publishing.lock().unwrap_or_else(|p| p.into_inner());
        let txn = db.begin_write()?;
        let mut events = Vec::new();
        {
            let mut kv = txn.open_table(KV)?;
            let mut meta = txn.open_table(META)?;
            let mut leases = txn.open_table(LEASES)?;
            if leases.remove(lease.0)?.is_none() {
                return Err(StoreError::NoLease(lease.0));
            }
            let mut doomed = Vec::new();
            for entry in kv.iter()? {
                let (key, raw) = entry?;
                // A record that cannot be read does not say it is the lease's: it stays (its
                // reader gets the error), and the lease's other keys go.
                match decode(key.value(), raw.value()) {
                    Ok(record) if record.lease == Some(lease) => {
                        doomed.push(key.value().to_owned())
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(key = key.value(), "dropping lease {}: {e}", lease.0),
                }
            }
            if !doomed.is_empty() {
                let revision = meta.get(REVISION)?.map_or(0, |v| v.value()) + 1;
                for key in doomed {
                    kv.remove(key.as_str())?;
                    events.push(WatchEvent::Delete { key, revision });
                }
                meta.insert(REVISION, revision)?;
            }
        }
        txn.commit()?;
        for event in events {
            let _ = self.events.send(event);
        }
        Ok(())
    }

    /// Applies `batch` in order in one write transaction and commits it once: each
    /// transaction's compares see the ones before it; a transaction whose compare fails, or that
    /// names a lease that does not exist, changes nothing and the others go on. Returns each
    /// outcome in order; an I/O error fails all of them (nothing was committed).
    fn apply_batch(
        &self,
        db: &Database,
        batch: &mut [Pending],
    ) -> Result<Vec<Result<TxnOutcome, StoreError>>, StoreError> {
        let _publishing = self.publishing.lock().unwrap_or_else(|p| p.into_inner());
        let txn = db.begin_write()?;
        let mut events = Vec::new();
        let mut outcomes = Vec::with_capacity(batch.len());
        {
            let mut kv = txn.open_table(KV)?;
            let mut meta = txn.open_table(META)?;
            let leases = txn.open_table(LEASES)?;
            let mut current = meta.get(REVISION)?.map_or(0, |v| v.value());
            'next: for pending in batch.iter_mut() {
                for compare in &pending.compares {
                    let Compare::ModRevision { key, revision } = compare;
                    let actual = match kv.get(key.as_str())? {
                        Some(raw) => decode(key, raw.value())?.mod_revision,
                        None => 0,
                    };
                    if actual != *revision {
                        outcomes.push(Ok(TxnOutcome {
                            succeeded: false,
                            revision: current,
                        }));
                        continue 'next;
                    }
                }
                for op in &pending.ops {
                    if let Op::Put { lease: Some(l), .. } = op
                        && leases.get(l.0)?.is_none()
                    {
                        outcomes.push(Err(StoreError::NoLease(l.0)));
                        continue 'next;
                    }
                }
                if pending.ops.is_empty() {
                    outcomes.push(Ok(TxnOutcome {
                        succeeded: true,
                        revision: current,
                    }));
                    continue;
                }
                let revision = current + 1;
                for op in std::mem::take(&mut pending.ops) {
                    match op {
                        Op::Put { key, value, lease } => {
                            let create = match kv.get(key.as_str())? {
                                Some(raw) => decode(&key, raw.value())?.create_revision,
                                None => revision,
                            };
                            kv.insert(
                                key.as_str(),
                                encode(revision, create, lease, &value).as_slice(),
                            )?;
                            events.push(WatchEvent::Put {
                                key,
                                value,
                                revision,
                            });
                        }
                        Op::Delete { key } => {
                            if kv.remove(key.as_str())?.is_some() {
                                events.push(WatchEvent::Delete { key, revision });
                            }
                        }
                    }
                }
                current = revision;
                outcomes.push(Ok(TxnOutcome {
                    succeeded: true,
                    revision,
                }));
            }
            meta.insert(REVISION, current)?;
        }
        txn.commit()?;
        if !events.is_empty() {
            use std::sync::atomic::Ordering;
            self.last_write_ms.store(now_ms(), Ordering::Relaxed);
            self.compacted.store(false, Ordering::Relaxed);
        }
        for event in events {
            // No watcher is not an error.
            let _ = self.events.send(event);
        }
        Ok(outcomes)
    }
}

/// `e` once more, for each transaction of a batch that failed as a whole.
fn same_error(e: &StoreError) -> StoreError {
    match e {
        StoreError::Unavailable(why) => StoreError::Unavailable(why.clone()),
        StoreError::NoLease(id) => StoreError::NoLease(*id),
        StoreError::Corrupt { key, why } => StoreError::Corrupt {
            key: key.clone(),
            why: why.clone(),
        },
        StoreError::Backend(why) => StoreError::Backend(why.clone()),
        StoreError::Open { .. } | StoreError::Connect { .. } | StoreError::BadUrl { .. } => {
            StoreError::Backend(e.to_string())
        }
    }
}

/// The commit thread: takes what waits (up to [`MAX_BATCH`]), commits it as one batch and
/// answers each; ends when the store is dropped.
fn committer(store: &std::sync::Weak<RedbStore>, queue: &std::sync::mpsc::Receiver<Pending>) {
    while let Ok(first) = queue.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(more) => batch.push(more),
                Err(_) => break,
            }
        }
        let Some(store) = store.upgrade() else {
            for pending in batch {
                let _ = pending
                    .done
                    .send(Err(StoreError::Unavailable("the store was closed".into())));
            }
            return;
        };
        let result = store.with_db(|db| store.apply_batch(db, &mut batch));
        // Let go before answering: a caller that drops the store after its answer closes the
        // file, and may open it again at once.
        drop(store);
        match result {
            Ok(outcomes) => {
                for (pending, outcome) in batch.into_iter().zip(outcomes) {
                    let _ = pending.done.send(outcome);
                }
            }
            Err(e) => {
                for pending in batch {
                    let _ = pending.done.send(Err(same_error(&e)));
                }
            }
        }
    }
}

#[async_trait]
impl Store for RedbStore {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        self.with_db(|db| {
            let txn = db.begin_read()?;
            let kv = txn.open_table(KV)?;
            kv.get(key)?.map(|raw| decode(key, raw.value())).transpose()
        })
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, Versioned)>, StoreError> {
        self.with_db(|db| {
            let txn = db.begin_read()?;
            let kv = txn.open_table(KV)?;
            let mut out = Vec::new();
            for entry in kv.range(prefix..)? {
                let (key, raw) = entry?;
                let key = key.value();
                if !key.starts_with(prefix) {
                    break;
                }
                out.push((key.to_owned(), decode(key, raw.value())?));
            }
            Ok(out)
        })
    }

    async fn list_range(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Versioned)>, StoreError> {
        use std::ops::Bound;
        self.with_db(|db| {
            let txn = db.begin_read()?;
            let kv = txn.open_table(KV)?;
            let mut out = Vec::new();
            if limit == 0 {
                return Ok(out);
            }
            // Start at the prefix, or just after `start_after` when that sorts after it.
            let lower = match start_after {
                Some(after) if after >= prefix => Bound::Excluded(after),
                _ => Bound::Included(prefix),
            };
            for entry in kv.range::<&str>((lower, Bound::Unbounded))? {
                let (key, raw) = entry?;
                let key = key.value();
                if !key.starts_with(prefix) {
                    break;
                }
                out.push((key.to_owned(), decode(key, raw.value())?));
                if out.len() == limit {
                    break;
                }
            }
            Ok(out)
        })
    }

    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<TxnOutcome, StoreError> {
        let (done, outcome) = tokio::sync::oneshot::channel();
        self.commits
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(Pending {
                compares,
                ops,
                done,
            })
            .map_err(|_| StoreError::Unavailable("the store's commit thread ended".into()))?;
        outcome
            .await
            .map_err(|_| StoreError::Unavailable("the store's commit thread ended".into()))?
    }

    async fn watch(&self, prefix: &str) -> Result<Watch, StoreError> {
        Ok(Watch::new(prefix.to_owned(), self.events.subscribe()))
    }

    async fn current_revision(&self) -> Result<u64, StoreError> {
        // A read: the trait's default (an empty transaction) would cost a durable commit.
        self.with_db(|db| {
            let txn = db.begin_read()?;
            let meta = txn.open_table(META)?;
            Ok(meta.get(REVISION)?.map_or(0, |v| v.value()))
        })
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        self.with_db(|db| {
            let txn = db.begin_write()?;
            let id = {
                let mut meta = txn.open_table(META)?;
                let mut leases = txn.open_table(LEASES)?;
                let id = meta.get(NEXT_LEASE)?.map_or(1, |v| v.value());
                meta.insert(NEXT_LEASE, id + 1)?;
                leases.insert(
                    id,
                    lease_record(ttl_ms, now_ms().saturating_add(ttl_ms)).as_slice(),
                )?;
                id
            };
            txn.commit()?;
            Ok(LeaseId(id))
        })
        .inspect(|id| {
            self.leases()
                .insert(id.0, (ttl_ms, now_ms().saturating_add(ttl_ms)));
        })
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        // In memory only (see the module comment): a heartbeat costs no transaction.
        match self.leases().get_mut(&lease.0) {
            Some((ttl, deadline)) => {
                *deadline = now_ms().saturating_add(*ttl);
                Ok(())
            }
            None => Err(StoreError::NoLease(lease.0)),
        }
    }

    async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.drop_lease(lease)
    }

    async fn size_bytes(&self) -> Result<Option<u64>, StoreError> {
        let meta = std::fs::metadata(&self.path).map_err(|e| {
            StoreError::Unavailable(format!("read the size of {}: {e}", self.path.display()))
        })?;
        Ok(Some(meta.len()))
    }

    fn health(&self) -> StoreHealth {
        match &self.state().fault {
            None => StoreHealth::Ok,
            Some(fault) => StoreHealth::Failing {
                since: fault.since,
                error: fault.describe(),
            },
        }
    }
}
