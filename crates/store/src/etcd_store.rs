//! The cluster backend: the `Store` trait on an etcd v3 cluster.
//!
//! Owns the mapping of the trait onto etcd's API (keys under an optional namespace prefix, range
//! reads with limits, transactions, leases), the watch task that turns an etcd watch stream into
//! `WatchEvent`s and reconnects it (resuming after the last revision it delivered, or answering
//! `Resync` when etcd compacted that history away), the health the store reports, and the
//! mapping of etcd's errors onto `StoreError`. It must not retry writes by itself (a write that
//! got no answer may or may not have been applied: the caller decides) and must not touch keys
//! outside its namespace.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use etcd_client::{
    Client, Compare as EtcdCompare, CompareOp, ConnectOptions, EventType, GetOptions, KeyValue,
    PutOptions, Txn, TxnOp, WatchOptions, WatchStream,
};
use tokio::sync::{mpsc, watch as signal};

use crate::{
    Compare, LeaseId, Op, Store, StoreError, StoreHealth, TxnOutcome, Versioned, Watch, WatchEvent,
};

/// How long a call waits for an answer before it reports etcd unavailable. Requests to a cluster
/// that cannot be reached wait for a connection rather than fail, so this bounds every call.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// How many times at least a request no member received goes again. The client routes each
/// attempt to a member at random: with one of three members stopped, 24 attempts all meet it
/// with a chance of 3^-24; each refused connection fails at once, so a store whose members
/// are all down still answers "unavailable" without delay.
const NEVER_SENT_ATTEMPTS: usize = 24;
/// How long opening one TCP connection to an endpoint may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// HTTP/2 pings on idle connections find a peer that vanished without closing them.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Keys read by one range request of [`Store::list`] (the whole list is read at one revision).
const LIST_PAGE: usize = 1000;
/// First wait before a broken watch stream is opened again; doubled up to [`REWATCH_MAX`].
const REWATCH_FIRST: Duration = Duration::from_millis(100);
const REWATCH_MAX: Duration = Duration::from_secs(2);
/// Events a watch buffers for a caller that does not read them (then the watch waits).
const WATCH_BUFFER: usize = 1024;

/// A store on an etcd v3 cluster.
///
/// Leases: etcd counts TTLs in whole seconds (a TTL is rounded up) and raises every TTL to its
/// minimum, 1.5 × the election timeout rounded up to a second (2 s with the default election
/// timeout of 1 s). Keys of an expired lease are deleted by etcd's leader, which checks leases
/// every 500 ms.
pub struct EtcdStore {
    client: Client,
    /// `host:port, host:port` as given, for error messages.
    endpoints: String,
    /// How many endpoints were given: how often a request no member received may go again.
    endpoint_count: usize,
    /// Put before every key; empty or `/name…`.
    namespace: String,
    health: Arc<HealthCell>,
    /// Dropped with the store: every watch task sees it and ends its watch.
    _closing: signal::Sender<()>,
    closed: signal::Receiver<()>,
}

/// The last call's verdict on reaching etcd.
#[derive(Default)]
struct HealthCell(Mutex<Option<(SystemTime, String)>>);

impl HealthCell {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(SystemTime, String)>> {
        // One plain value: a panic elsewhere cannot leave it half-written.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn reached(&self) {
        *self.lock() = None;
    }

    /// Records a failure to reach etcd; `since` stays the first failure of a run of them.
    fn failed(&self, error: &str) {
        let mut health = self.lock();
        let since = health
            .as_ref()
            .map_or_else(SystemTime::now, |(since, _)| *since);
        *health = Some((since, error.to_owned()));
    }

    fn get(&self) -> StoreHealth {
        match &*self.lock() {
            None => StoreHealth::Ok,
            Some((since, error)) => StoreHealth::Failing {
                since: *since,
                error: error.clone(),
            },
        }
    }
}

/// `e` and its causes, `: `-separated (tonic's own `Display` of a status is a debug dump).
fn describe(e: &etcd_client::Error) -> String {
    let mut out = match e {
        etcd_client::Error::GRpcStatus(status) => status.message().to_owned(),
        other => other.to_string(),
    };
    let mut source = std::error::Error::source(e);
    if let etcd_client::Error::GRpcStatus(status) = e {
        source = std::error::Error::source(status);
    }
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

/// Whether `e` says etcd could not be reached (as opposed to an answer refusing the request).
fn is_unreachable(e: &etcd_client::Error) -> bool {
    use tonic::Code;
    match e {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        etcd_client::Error::GRpcStatus(status) => matches!(
            status.code(),
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown
        ),
        _ => false,
    }
}

/// Whether `e` says the request never reached a member: the connection to the one it was
/// routed to could not be made (refused, or reset while connecting, as a stopped member's is).
/// Such a request can go again, to another member, without any risk of applying twice.
fn never_sent(e: &etcd_client::Error) -> bool {
    let mut source = std::error::Error::source(e);
    if let etcd_client::Error::GRpcStatus(status) = e {
        source = std::error::Error::source(status);
    }
    let mut connecting = false;
    while let Some(cause) = source {
        // hyper's connector says so in its error, whose type it does not export.
        connecting |= cause.to_string().starts_with("tcp connect error");
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind;
            return io.kind() == ErrorKind::ConnectionRefused
                || (connecting
                    && matches!(
                        io.kind(),
                        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
                    ));
        }
        source = cause.source();
    }
    false
}

/// Whether `e` is etcd's answer that a lease does not exist.
fn is_lease_not_found(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(status) => {
            status.code() == tonic::Code::NotFound && status.message().contains("lease not found")
        }
        etcd_client::Error::LeaseKeepAliveError(why) => why.contains("lease not found"),
        _ => false,
    }
}

fn to_etcd_revision(revision: u64) -> Result<i64, StoreError> {
    i64::try_from(revision)
        .map_err(|_| StoreError::Backend(format!("revision {revision} is beyond etcd's range")))
}

fn to_etcd_lease(lease: LeaseId) -> Result<i64, StoreError> {
    i64::try_from(lease.0).map_err(|_| StoreError::NoLease(lease.0))
}

/// etcd's revisions and lease ids are never negative; a negative one reads as 0.
fn from_etcd(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// The smallest key above every key starting with `prefix` (etcd's range end of a prefix);
/// `[0]` (to the end of the key space) when there is none.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// The range `[start, end)` of the keys starting with `prefix`: etcd has no empty key, so the
/// empty prefix starts at `[0]`.
fn prefix_range(prefix: &[u8]) -> (Vec<u8>, Vec<u8>) {
    if prefix.is_empty() {
        (vec![0], vec![0])
    } else {
        (prefix.to_vec(), prefix_end(prefix))
    }
}

impl EtcdStore {
    /// Connects to the etcd cluster at `endpoints` (`host:port` each, or URLs with `http://`)
    /// and checks that it answers a read. Every key of the store is `namespace` + key in etcd,
    /// so several clusters or test runs can share one etcd: give each a namespace that is no
    /// prefix of another's (`/telvirt/a` and `/telvirt/b`, not `/t` and `/t2`). Must be called
    /// inside a tokio runtime, which then runs the store's watch tasks.
    pub async fn connect(endpoints: &[String], namespace: &str) -> Result<Self, StoreError> {
        let listed = endpoints.join(", ");
        let failed = |why: String| StoreError::Connect {
            endpoints: listed.clone(),
            why,
        };
        if endpoints.is_empty() {
            return Err(failed("no endpoint was given".into()));
        }
        // A member cut off from its cluster's quorum refuses at once (no leader: Unavailable)
        // instead of answering keepalives while a watch on it delivers nothing until the
        // partition heals; the store then goes to another member.
        let options = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_keep_alive(KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT)
            .with_keep_alive_while_idle(true)
            .with_require_leader(true);
        let client =
            match tokio::time::timeout(REQUEST_TIMEOUT, Client::connect(endpoints, Some(options)))
                .await
            {
                Ok(Ok(client)) => client,
                Ok(Err(e)) => return Err(failed(describe(&e))),
                Err(_) => {
                    return Err(failed(format!(
                        "no answer within {} s",
                        REQUEST_TIMEOUT.as_secs()
                    )));
                }
            };
        let (closing, closed) = signal::channel(());
        let store = Self {
            client,
            endpoints: listed.clone(),
            endpoint_count: endpoints.len(),
            namespace: namespace.to_owned(),
            health: Arc::new(HealthCell::default()),
            _closing: closing,
            closed,
        };
        // The client connects lazily: a count of the namespace's keys proves a quorum answers.
        let (start, end) = prefix_range(namespace.as_bytes());
        let mut kv = store.client.kv_client();
        let probe = kv.get(
            start,
            Some(GetOptions::new().with_range(end).with_count_only()),
        );
        match tokio::time::timeout(REQUEST_TIMEOUT, probe).await {
            Ok(Ok(_)) => Ok(store),
            Ok(Err(e)) => Err(failed(describe(&e))),
            Err(_) => Err(failed(format!(
                "no answer within {} s",
                REQUEST_TIMEOUT.as_secs()
            ))),
        }
    }

    /// The size of the database file of the member that answers, in bytes (the whole etcd,
    /// every namespace, with the history not yet compacted).
    pub async fn db_size(&self) -> Result<u64, StoreError> {
        let status = self
            .call("a status request", None, || {
                let mut maintenance = self.client.maintenance_client();
                async move { maintenance.status().await }
            })
            .await?;
        Ok(from_etcd(status.db_size()))
    }

    /// The key in etcd of the store's `key`.
    fn full_key(&self, key: &str) -> Vec<u8> {
        let mut full = Vec::with_capacity(self.namespace.len() + key.len());
        full.extend_from_slice(self.namespace.as_bytes());
        full.extend_from_slice(key.as_bytes());
        full
    }

    fn unavailable(&self, why: &str) -> StoreError {
        let why = format!("etcd at {}: {why}", self.endpoints);
        self.health.failed(&why);
        StoreError::Unavailable(why)
    }

    /// Runs one request with [`REQUEST_TIMEOUT`], records whether etcd was reached, and maps
    /// its error (a missing lease to [`StoreError::NoLease`] of `lease`). `request` makes the
    /// request afresh for each attempt: one that no member received (its connection was
    /// refused, as a stopped member's is) goes again, up to [`NEVER_SENT_ATTEMPTS`] times
    /// (the client picks a member at random for each, so a fixed few can all meet the stopped
    /// one); a request that may have reached etcd is never repeated.
    async fn call<T, F>(
        &self,
        what: &str,
        lease: Option<LeaseId>,
        mut request: impl FnMut() -> F,
    ) -> Result<T, StoreError>
    where
        F: Future<Output = Result<T, etcd_client::Error>>,
    {
        let attempts = NEVER_SENT_ATTEMPTS.max(8 * self.endpoint_count);
        let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
        let mut attempt = 0;
        loop {
            attempt += 1;
            match tokio::time::timeout_at(deadline, request()).await {
                Ok(Ok(answer)) => {
                    self.health.reached();
                    return Ok(answer);
                }
                Ok(Err(e)) if never_sent(&e) && attempt < attempts => continue,
                Ok(Err(e)) if is_unreachable(&e) => {
                    return Err(self.unavailable(&format!("{what}: {}", describe(&e))));
                }
                Ok(Err(e)) => {
                    self.health.reached();
                    return match lease {
                        Some(lease) if is_lease_not_found(&e) => Err(StoreError::NoLease(lease.0)),
                        _ => Err(StoreError::Backend(format!(
                            "etcd at {} refused {what}: {}",
                            self.endpoints,
                            describe(&e)
                        ))),
                    };
                }
                Err(_) => {
                    return Err(self.unavailable(&format!(
                        "{what}: no answer within {} s",
                        REQUEST_TIMEOUT.as_secs()
                    )));
                }
            }
        }
    }

    /// The store's key and record of an etcd key-value read under the namespace.
    fn record(&self, kv: &KeyValue) -> Result<(String, Versioned), StoreError> {
        let key = strip_namespace(&self.namespace, kv.key())?;
        let lease = from_etcd(kv.lease());
        Ok((
            key,
            Versioned {
                value: kv.value().to_vec(),
                mod_revision: from_etcd(kv.mod_revision()),
                create_revision: from_etcd(kv.create_revision()),
                lease: (lease != 0).then_some(LeaseId(lease)),
            },
        ))
    }

    /// At most `limit` records (all when `None`) from `start` up to `end` (excluded), at
    /// `revision` (the latest when `None`); also the revision read at and whether more follow.
    async fn range(
        &self,
        start: Vec<u8>,
        end: Vec<u8>,
        limit: Option<usize>,
        revision: Option<i64>,
    ) -> Result<(Vec<(String, Versioned)>, i64, bool), StoreError> {
        let mut options = GetOptions::new().with_range(end);
        if let Some(limit) = limit {
            options = options.with_limit(i64::try_from(limit).unwrap_or(i64::MAX));
        }
        if let Some(revision) = revision {
            options = options.with_revision(revision);
        }
        let answer = self
            .call("a range read", None, || {
                let (mut kv, start, options) =
                    (self.client.kv_client(), start.clone(), options.clone());
                async move { kv.get(start, Some(options)).await }
            })
            .await?;
        let records = answer
            .kvs()
            .iter()
            .map(|kv| self.record(kv))
            .collect::<Result<Vec<_>, _>>()?;
        let read_at = answer.header().map_or(0, |h| h.revision());
        Ok((records, read_at, answer.more()))
    }

    /// Which lease of `ops` etcd does not know (asked only after a transaction naming leases was
    /// refused for a missing one).
    async fn missing_lease(&self, ops: &[Op]) -> Option<LeaseId> {
        let mut named: Vec<LeaseId> = ops
            .iter()
            .filter_map(|op| match op {
                Op::Put { lease, .. } => *lease,
                Op::Delete { .. } => None,
            })
            .collect();
        named.sort_unstable();
        named.dedup();
        if let [only] = named.as_slice() {
            return Some(*only);
        }
        let mut leases = self.client.lease_client();
        for lease in named {
            let Ok(id) = to_etcd_lease(lease) else {
                return Some(lease);
            };
            // etcd answers a TTL of -1 for a lease it does not know.
            if let Ok(Ok(answer)) =
                tokio::time::timeout(REQUEST_TIMEOUT, leases.time_to_live(id, None)).await
                && answer.ttl() < 0
            {
                return Some(lease);
            }
        }
        None
    }

    /// Opens a watch of `prefix` from `start` (the next change when `None`) and starts the task
    /// that feeds it.
    async fn open_watch(&self, prefix: &str, start: Option<i64>) -> Result<Watch, StoreError> {
        let (key, end) = prefix_range(&self.full_key(prefix));
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        let mut feed = WatchFeed {
            client: self.client.clone(),
            key,
            end,
            namespace: self.namespace.clone(),
            endpoints: self.endpoints.clone(),
            health: Arc::clone(&self.health),
            closed: self.closed.clone(),
            last_delivered: 0,
            tx,
        };
        let opened = self
            .call("opening a watch", None, || feed.open(start))
            .await?;
        let (stream, resync) = match opened {
            Opened::Live { stream, revision } => {
                feed.last_delivered = match start {
                    Some(start) => start.saturating_sub(1),
                    None => revision,
                };
                (stream, false)
            }
            Opened::Compacted { .. } => {
                // The history asked for is gone: the caller lists again, then sees what follows.
                match self
                    .call("opening a watch", None, || feed.open(None))
                    .await?
                {
                    Opened::Live { stream, revision } => {
                        feed.last_delivered = revision;
                        (stream, true)
                    }
                    Opened::Compacted { revision } => {
                        return Err(StoreError::Backend(format!(
                            "etcd at {} reported a watch from now as compacted (at revision {revision})",
                            self.endpoints
                        )));
                    }
                }
            }
        };
        tokio::spawn(feed.run(stream));
        let watch = Watch::from_feed(rx);
        Ok(if resync { watch.resync_first() } else { watch })
    }
}

/// `key` without the namespace it was read under.
fn strip_namespace(namespace: &str, key: &[u8]) -> Result<String, StoreError> {
    let shown = || String::from_utf8_lossy(key).into_owned();
    let Some(rest) = key.strip_prefix(namespace.as_bytes()) else {
        return Err(StoreError::Corrupt {
            key: shown(),
            why: format!("etcd returned it for a read under the namespace {namespace:?}"),
        });
    };
    String::from_utf8(rest.to_vec()).map_err(|_| StoreError::Corrupt {
        key: shown(),
        why: "the key is not UTF-8".into(),
    })
}

/// An etcd watch just opened.
enum Opened {
    /// Delivering changes; `revision` is etcd's revision when the watch was created.
    Live {
        stream: Box<WatchStream>,
        revision: i64,
    },
    /// The start revision asked for was compacted away; etcd keeps history from `revision`.
    Compacted { revision: i64 },
}

/// The task behind one [`Watch`] of an [`EtcdStore`].
struct WatchFeed {
    client: Client,
    /// The watched range, namespace included.
    key: Vec<u8>,
    end: Vec<u8>,
    namespace: String,
    endpoints: String,
    health: Arc<HealthCell>,
    /// Changes (to `Err`) when the store is dropped.
    closed: signal::Receiver<()>,
    /// The revision of the last change sent to the caller: a new stream starts after it.
    last_delivered: i64,
    tx: mpsc::Sender<WatchEvent>,
}

impl WatchFeed {
    /// Opens an etcd watch of the range from `start` and waits for etcd to confirm it.
    async fn open(&self, start: Option<i64>) -> Result<Opened, etcd_client::Error> {
        let mut options = WatchOptions::new().with_range(self.end.clone());
        if let Some(start) = start {
            options = options.with_start_revision(start);
        }
        let mut watches = self.client.watch_client();
        let mut stream = watches.watch(self.key.clone(), Some(options)).await?;
        loop {
            let Some(answer) = stream.message().await? else {
                return Err(etcd_client::Error::WatchError(
                    "the watch stream ended before etcd confirmed the watch".into(),
                ));
            };
            if answer.compact_revision() > 0 {
                return Ok(Opened::Compacted {
                    revision: answer.compact_revision(),
                });
            }
            if answer.canceled() {
                return Err(etcd_client::Error::WatchError(format!(
                    "etcd canceled the watch: {}",
                    answer.cancel_reason()
                )));
            }
            if answer.created() {
                let revision = answer.header().map_or(0, |h| h.revision());
                return Ok(Opened::Live {
                    stream: Box::new(stream),
                    revision,
                });
            }
        }
    }

    /// Whether the caller dropped its [`Watch`] or the store was dropped.
    fn finished(&self) -> bool {
        self.tx.is_closed() || self.closed.has_changed().is_err()
    }

    /// Delivers the changes of `stream`, and of the streams opened after it broke, until the
    /// caller drops its watch or the store is dropped.
    async fn run(mut self, mut stream: Box<WatchStream>) {
        loop {
            let from_now = match self.pump(&mut stream).await {
                Pumped::Finished => return,
                Pumped::Broken => false,
                Pumped::Compacted => {
                    if self.tx.send(WatchEvent::Resync).await.is_err() {
                        return;
                    }
                    true
                }
            };
            match self.reopen(from_now).await {
                Some(next) => stream = next,
                None => return,
            }
        }
    }

    /// Forwards the changes of `stream` until it stops.
    async fn pump(&mut self, stream: &mut WatchStream) -> Pumped {
        let mut closed = self.closed.clone();
        loop {
            let answer = tokio::select! {
                () = self.tx.closed() => return Pumped::Finished,
                _ = closed.changed() => return Pumped::Finished,
                answer = stream.message() => answer,
            };
            let answer = match answer {
                Ok(Some(answer)) => answer,
                Ok(None) | Err(_) => return Pumped::Broken,
            };
            if answer.compact_revision() > 0 {
                return Pumped::Compacted;
            }
            if answer.canceled() {
                return Pumped::Broken;
            }
            for event in answer.events() {
                let Some(kv) = event.kv() else { continue };
                // Keys this store cannot have written (not UTF-8) are not its business.
                let Ok(key) = strip_namespace(&self.namespace, kv.key()) else {
                    continue;
                };
                let revision = kv.mod_revision();
                let change = match event.event_type() {
                    EventType::Put => WatchEvent::Put {
                        key,
                        value: kv.value().to_vec(),
                        revision: from_etcd(revision),
                    },
                    EventType::Delete => WatchEvent::Delete {
                        key,
                        revision: from_etcd(revision),
                    },
                };
                if self.tx.send(change).await.is_err() {
                    return Pumped::Finished;
                }
                self.last_delivered = self.last_delivered.max(revision);
            }
        }
    }

    /// Opens the watch again, after the last delivered revision (or from now when `from_now`),
    /// waiting with backoff until etcd answers; when the history after the last delivered
    /// revision was compacted, tells the caller to resync and watches from now. `None` when the
    /// watch is finished meanwhile.
    async fn reopen(&mut self, mut from_now: bool) -> Option<Box<WatchStream>> {
        let mut backoff = REWATCH_FIRST;
        loop {
            if self.finished() {
                return None;
            }
            let start = (!from_now).then(|| self.last_delivered.saturating_add(1));
            let why = match tokio::time::timeout(REQUEST_TIMEOUT, self.open(start)).await {
                Ok(Ok(Opened::Live { stream, revision })) => {
                    self.health.reached();
                    if from_now {
                        self.last_delivered = revision;
                    }
                    return Some(stream);
                }
                Ok(Ok(Opened::Compacted { .. })) => {
                    if self.tx.send(WatchEvent::Resync).await.is_err() {
                        return None;
                    }
                    from_now = true;
                    continue;
                }
                Ok(Err(e)) if is_unreachable(&e) => Some(describe(&e)),
                Ok(Err(_)) => None,
                Err(_) => Some(format!("no answer within {} s", REQUEST_TIMEOUT.as_secs())),
            };
            if let Some(why) = why {
                self.health.failed(&format!(
                    "etcd at {}: reopening a watch: {why}",
                    self.endpoints
                ));
            }
            let mut closed = self.closed.clone();
            tokio::select! {
                () = self.tx.closed() => return None,
                _ = closed.changed() => return None,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(REWATCH_MAX);
        }
    }
}

/// Why [`WatchFeed::pump`] stopped.
enum Pumped {
    /// The caller dropped its watch, or the store was dropped.
    Finished,
    /// The stream broke or etcd ended it: open another after the last delivered revision.
    Broken,
    /// etcd compacted the history the stream was to deliver.
    Compacted,
}

#[async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        let key = self.full_key(key);
        let answer = self
            .call("a read", None, || {
                let (mut kv, key) = (self.client.kv_client(), key.clone());
                async move { kv.get(key, None).await }
            })
            .await?;
        answer
            .kvs()
            .first()
            .map(|kv| self.record(kv).map(|(_, record)| record))
            .transpose()
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, Versioned)>, StoreError> {
        // Page by page, every page at the revision of the first: one consistent snapshot
        // without one answer larger than the transport allows.
        let (mut start, end) = prefix_range(&self.full_key(prefix));
        let mut out = Vec::new();
        let mut revision = None;
        loop {
            let (page, read_at, more) = self
                .range(start, end.clone(), Some(LIST_PAGE), revision)
                .await?;
            revision = Some(read_at);
            out.extend(page);
            let Some((last, _)) = out.last().filter(|_| more) else {
                return Ok(out);
            };
            start = self.full_key(last);
            start.push(0);
        }
    }

    async fn list_range(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Versioned)>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let (prefix_start, end) = prefix_range(&self.full_key(prefix));
        // Start just after `start_after` (the smallest key above it is it + NUL) when that sorts
        // after the prefix's start.
        let start = match start_after {
            Some(after) if after >= prefix => {
                let mut start = self.full_key(after);
                start.push(0);
                start
            }
            _ => prefix_start,
        };
        if end != [0] && start >= end {
            return Ok(Vec::new());
        }
        Ok(self.range(start, end, Some(limit), None).await?.0)
    }

    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<TxnOutcome, StoreError> {
        let mut when = Vec::with_capacity(compares.len());
        for compare in &compares {
            let Compare::ModRevision { key, revision } = compare;
            // An absent key has mod_revision 0 in etcd's compares, as in this trait.
            when.push(EtcdCompare::mod_revision(
                self.full_key(key),
                CompareOp::Equal,
                to_etcd_revision(*revision)?,
            ));
        }
        let mut then = Vec::with_capacity(ops.len());
        let mut names_lease = false;
        for op in &ops {
            then.push(match op {
                Op::Put { key, value, lease } => {
                    let options = match lease {
                        Some(lease) => {
                            names_lease = true;
                            Some(PutOptions::new().with_lease(to_etcd_lease(*lease)?))
                        }
                        None => None,
                    };
                    TxnOp::put(self.full_key(key), value.clone(), options)
                }
                Op::Delete { key } => TxnOp::delete(self.full_key(key), None),
            });
        }
        let txn = Txn::new().when(when).and_then(then);
        let transaction = || {
            let (mut kv, txn) = (self.client.kv_client(), txn.clone());
            async move { kv.txn(txn).await }
        };
        let answer = match self.call("a transaction", None, transaction).await {
            Ok(answer) => answer,
            Err(StoreError::Backend(why)) if names_lease && why.contains("lease not found") => {
                return Err(match self.missing_lease(&ops).await {
                    Some(lease) => StoreError::NoLease(lease.0),
                    None => StoreError::Backend(why),
                });
            }
            Err(e) => return Err(e),
        };
        Ok(TxnOutcome {
            succeeded: answer.succeeded(),
            revision: from_etcd(answer.header().map_or(0, |h| h.revision())),
        })
    }

    async fn watch(&self, prefix: &str) -> Result<Watch, StoreError> {
        self.open_watch(prefix, None).await
    }

    async fn watch_from(&self, prefix: &str, after_revision: u64) -> Result<Watch, StoreError> {
        let start = to_etcd_revision(after_revision.saturating_add(1))?;
        self.open_watch(prefix, Some(start)).await
    }

    /// Grants a lease of `ttl` rounded up to whole seconds; etcd raises it to its minimum (see
    /// [`EtcdStore`]).
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let seconds = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
        let seconds = i64::try_from(seconds.max(1)).unwrap_or(i64::MAX);
        let answer = self
            .call("granting a lease", None, || {
                let mut leases = self.client.lease_client();
                async move { leases.grant(seconds, None).await }
            })
            .await?;
        if !answer.error().is_empty() {
            return Err(StoreError::Backend(format!(
                "etcd at {} refused a lease of {seconds} s: {}",
                self.endpoints,
                answer.error()
            )));
        }
        Ok(LeaseId(from_etcd(answer.id())))
    }

    /// One keep-alive on a stream of its own: nothing outlives the call, so a restarted etcd
    /// needs no recovery here.
    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        let id = to_etcd_lease(lease)?;
        // The stream ends here: the answer to its first request is all this call needs.
        self.call("a lease keep-alive", Some(lease), || {
            let mut leases = self.client.lease_client();
            async move { leases.keep_alive(id).await }
        })
        .await
        .map(drop)
    }

    /// Compacts the whole etcd (every namespace: etcd's history is one), as Kubernetes' API
    /// server does; a revision already compacted is not an error.
    async fn compact(&self, revision: u64) -> Result<(), StoreError> {
        let revision = to_etcd_revision(revision)?;
        let compacted = self
            .call("compacting the history", None, || {
                let mut kv = self.client.kv_client();
                async move { kv.compact(revision, None).await }
            })
            .await;
        match compacted {
            Err(StoreError::Backend(why)) if why.contains("has been compacted") => Ok(()),
            other => other.map(drop),
        }
    }

    async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        let id = to_etcd_lease(lease)?;
        self.call("revoking a lease", Some(lease), || {
            let mut leases = self.client.lease_client();
            async move { leases.revoke(id).await }
        })
        .await
        .map(drop)
    }

    async fn size_bytes(&self) -> Result<Option<u64>, StoreError> {
        self.db_size().await.map(Some)
    }

    fn health(&self) -> StoreHealth {
        self.health.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_ends_at_its_last_byte_plus_one() {
        assert_eq!(prefix_end(b"/vnfs/"), b"/vnfs0".to_vec());
        assert_eq!(prefix_end(b"a\xff\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff"), vec![0]);
        assert_eq!(prefix_range(b""), (vec![0], vec![0]));
    }

    #[test]
    fn keys_outside_the_namespace_are_refused() {
        assert_eq!(strip_namespace("/ns", b"/ns/a").unwrap(), "/a");
        assert!(matches!(
            strip_namespace("/ns", b"/other/a"),
            Err(StoreError::Corrupt { .. })
        ));
    }
}
