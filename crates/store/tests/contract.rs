//! The `Store` contract: one set of checks run against each backend, the embedded redb store (in
//! a temporary directory) and a real etcd (`/usr/bin/etcd`, started by the test on free loopback
//! ports with its data in a temporary directory, killed when the test ends). Then checks only
//! etcd has: a restart under an open watch and a lease, namespaces, compacted history, an
//! unreachable cluster.

// Not every helper there serves this file.
#[allow(dead_code)]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::put;
use telvirt_store::local_etcd::LocalEtcd;
use telvirt_store::{
    Compare, EtcdStore, LeaseId, Op, RedbStore, Store, StoreError, StoreHealth, Watch, WatchEvent,
};
/// How long a test waits for something that should happen soon (an event, an expiry, a start).
const PATIENCE: Duration = Duration::from_secs(20);

/// A backend under test, with what must live as long as it does.
struct Backend {
    store: Arc<dyn Store>,
    /// Whether `watch_from` replays history (etcd) rather than answering `Resync` (redb).
    replays_history: bool,
    _dir: Option<tempfile::TempDir>,
    _etcd: Option<EtcdServer>,
}

fn redb_backend() -> Backend {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(&dir.path().join("store.redb")).unwrap();
    Backend {
        store,
        replays_history: false,
        _dir: Some(dir),
        _etcd: None,
    }
}

async fn etcd_backend() -> Backend {
    let etcd = EtcdServer::start().await;
    let store = etcd.connect("/contract").await;
    Backend {
        store: Arc::new(store),
        replays_history: true,
        _dir: None,
        _etcd: Some(etcd),
    }
}

/// A single-member etcd on loopback ([`LocalEtcd`], tied to this test process) with its data in
/// a temporary directory, killed on drop.
struct EtcdServer {
    etcd: LocalEtcd,
    _dir: tempfile::TempDir,
}

impl EtcdServer {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let etcd = LocalEtcd::start(dir.path(), true)
            .await
            .unwrap_or_else(|e| panic!("{e}; the etcd backend's tests need a real etcd"));
        Self { etcd, _dir: dir }
    }

    fn endpoint(&self) -> String {
        self.etcd.endpoint()
    }

    fn kill(&mut self) {
        self.etcd.kill();
    }

    fn spawn(&mut self) {
        self.etcd.spawn().unwrap();
    }

    async fn wait_until_answering(&mut self) -> Result<(), String> {
        self.etcd.wait_until_answering().await
    }

    fn log_tail(&self) -> String {
        self.etcd.log_tail()
    }

    /// Connects a store under `namespace` to the running etcd.
    async fn connect(&self, namespace: &str) -> EtcdStore {
        EtcdStore::connect(&[self.endpoint()], namespace)
            .await
            .unwrap()
    }
}

/// The next event of `watch`, or a panic naming `what` was awaited.
async fn next_event(watch: &mut Watch, what: &str) -> WatchEvent {
    match tokio::time::timeout(PATIENCE, watch.next()).await {
        Ok(Some(event)) => event,
        Ok(None) => panic!("the watch ended while waiting for {what}"),
        Err(_) => panic!("no event within {PATIENCE:?} while waiting for {what}"),
    }
}

fn keys(listed: &[(String, telvirt_store::Versioned)]) -> Vec<&str> {
    listed.iter().map(|(k, _)| k.as_str()).collect()
}

// ---- the contract ----

async fn put_get_delete(b: &Backend) {
    let store = &*b.store;
    assert!(store.get("/pg/a").await.unwrap().is_none());
    let created = store.put("/pg/a", b"one".to_vec()).await.unwrap();
    let got = store.get("/pg/a").await.unwrap().unwrap();
    assert_eq!(got.value, b"one");
    assert_eq!(got.mod_revision, created);
    assert_eq!(got.create_revision, created);
    assert_eq!(got.lease, None);

    let updated = store.put("/pg/a", b"two".to_vec()).await.unwrap();
    assert!(updated > created);
    let got = store.get("/pg/a").await.unwrap().unwrap();
    assert_eq!(got.value, b"two");
    assert_eq!((got.mod_revision, got.create_revision), (updated, created));
    assert_eq!(store.current_revision().await.unwrap(), updated);

    let deleted = store.delete("/pg/a").await.unwrap();
    assert!(deleted > updated);
    assert!(store.get("/pg/a").await.unwrap().is_none());
}

async fn compare_and_swap(b: &Backend) {
    let store = &*b.store;
    // `0`: only if absent.
    assert!(
        store
            .compare_and_swap("/cas/k", 0, b"first".to_vec())
            .await
            .unwrap()
    );
    assert!(
        !store
            .compare_and_swap("/cas/k", 0, b"second".to_vec())
            .await
            .unwrap()
    );
    let current = store.get("/cas/k").await.unwrap().unwrap();
    assert_eq!(current.value, b"first");
    // A stale revision loses, the current one wins.
    assert!(
        !store
            .compare_and_swap("/cas/k", current.mod_revision + 100, b"stale".to_vec())
            .await
            .unwrap()
    );
    assert!(
        store
            .compare_and_swap("/cas/k", current.mod_revision, b"third".to_vec())
            .await
            .unwrap()
    );
    assert_eq!(store.get("/cas/k").await.unwrap().unwrap().value, b"third");
    // Deleted, the key is absent again.
    store.delete("/cas/k").await.unwrap();
    assert!(
        store
            .compare_and_swap("/cas/k", 0, b"again".to_vec())
            .await
            .unwrap()
    );
}

async fn a_failed_compare_applies_no_op(b: &Backend) {
    let store = &*b.store;
    let a = store.put("/tx/a", b"a".to_vec()).await.unwrap();
    let before = store.current_revision().await.unwrap();
    let outcome = store
        .txn(
            vec![
                Compare::ModRevision {
                    key: "/tx/a".into(),
                    revision: a,
                },
                // Holds for nobody: the key is absent.
                Compare::ModRevision {
                    key: "/tx/absent".into(),
                    revision: 7,
                },
            ],
            vec![
                put("/tx/b", b"b", None),
                Op::Delete {
                    key: "/tx/a".into(),
                },
            ],
        )
        .await
        .unwrap();
    assert!(!outcome.succeeded);
    assert_eq!(outcome.revision, before);
    assert!(store.get("/tx/b").await.unwrap().is_none());
    assert_eq!(store.get("/tx/a").await.unwrap().unwrap().mod_revision, a);

    let outcome = store
        .txn(
            vec![
                Compare::ModRevision {
                    key: "/tx/a".into(),
                    revision: a,
                },
                Compare::ModRevision {
                    key: "/tx/absent".into(),
                    revision: 0,
                },
            ],
            vec![
                put("/tx/b", b"b", None),
                put("/tx/c", b"c", None),
                Op::Delete {
                    key: "/tx/a".into(),
                },
            ],
        )
        .await
        .unwrap();
    assert!(outcome.succeeded);
    assert!(outcome.revision > before);
    // Every op at one revision.
    for key in ["/tx/b", "/tx/c"] {
        assert_eq!(
            store.get(key).await.unwrap().unwrap().mod_revision,
            outcome.revision
        );
    }
    assert!(store.get("/tx/a").await.unwrap().is_none());
}

async fn list_and_list_range_stay_inside_the_prefix(b: &Backend) {
    let store = &*b.store;
    // Written out of order, with neighbours just outside the prefix on both sides: "/l.x"
    // ('.' < '/'), "/l" (the prefix without its slash), "/l0" ('0' follows '/').
    for key in [
        "/l/c", "/l.x", "/l/a", "/l0", "/l/e", "/l", "/l/b", "/l/d", "/k/z",
    ] {
        store.put(key, key.as_bytes().to_vec()).await.unwrap();
    }
    let all = store.list("/l/").await.unwrap();
    assert_eq!(keys(&all), ["/l/a", "/l/b", "/l/c", "/l/d", "/l/e"]);
    assert_eq!(all[2].1.value, b"/l/c");

    let page = |after: Option<&'static str>, limit: usize| async move {
        let listed = store.list_range("/l/", after, limit).await.unwrap();
        keys(&listed)
            .into_iter()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    assert_eq!(page(None, 2).await, ["/l/a", "/l/b"]);
    assert_eq!(page(Some("/l/b"), 2).await, ["/l/c", "/l/d"]);
    assert_eq!(page(Some("/l/d"), 2).await, ["/l/e"]);
    assert!(page(Some("/l/e"), 2).await.is_empty());
    // A start between two keys, one before the prefix, one after it.
    assert_eq!(page(Some("/l/bb"), 1).await, ["/l/c"]);
    assert_eq!(page(Some("/a"), 2).await, ["/l/a", "/l/b"]);
    assert!(page(Some("/m"), 2).await.is_empty());
    assert!(page(None, 0).await.is_empty());
    assert!(store.list("/nothing/").await.unwrap().is_empty());
}

async fn watch_sees_changes_under_its_prefix_in_order(b: &Backend) {
    let store = &*b.store;
    let mut watch = store.watch("/w/").await.unwrap();
    let r1 = store.put("/w/a", b"1".to_vec()).await.unwrap();
    store.put("/x/outside", b"no".to_vec()).await.unwrap();
    store.put("/w", b"no".to_vec()).await.unwrap();
    let r2 = store.put("/w/b", b"2".to_vec()).await.unwrap();
    let r3 = store.delete("/w/a").await.unwrap();
    assert_eq!(
        next_event(&mut watch, "the put of /w/a").await,
        WatchEvent::Put {
            key: "/w/a".into(),
            value: b"1".to_vec(),
            revision: r1
        }
    );
    assert_eq!(
        next_event(&mut watch, "the put of /w/b").await,
        WatchEvent::Put {
            key: "/w/b".into(),
            value: b"2".to_vec(),
            revision: r2
        }
    );
    assert_eq!(
        next_event(&mut watch, "the delete of /w/a").await,
        WatchEvent::Delete {
            key: "/w/a".into(),
            revision: r3
        }
    );
    assert!(r1 < r2 && r2 < r3);
}

async fn watch_from_a_revision(b: &Backend) {
    let store = &*b.store;
    let r1 = store.put("/wf/a", b"1".to_vec()).await.unwrap();
    let r2 = store.put("/wf/b", b"2".to_vec()).await.unwrap();

    // From the current revision: exactly the changes to come.
    let mut current = store.watch_from("/wf/", r2).await.unwrap();
    let r3 = store.put("/wf/c", b"3".to_vec()).await.unwrap();
    assert_eq!(
        next_event(&mut current, "the put after the current revision").await,
        WatchEvent::Put {
            key: "/wf/c".into(),
            value: b"3".to_vec(),
            revision: r3
        }
    );

    // From an older one: the changes since (etcd keeps them) or a resync (redb does not).
    let mut older = store.watch_from("/wf/", r1).await.unwrap();
    let first = next_event(&mut older, "the replay or the resync").await;
    if b.replays_history {
        assert_eq!(
            first,
            WatchEvent::Put {
                key: "/wf/b".into(),
                value: b"2".to_vec(),
                revision: r2
            }
        );
        assert_eq!(
            next_event(&mut older, "the second replayed change")
                .await
                .key(),
            Some("/wf/c")
        );
    } else {
        assert_eq!(first, WatchEvent::Resync);
    }
    let r4 = store.put("/wf/d", b"4".to_vec()).await.unwrap();
    assert_eq!(
        next_event(&mut older, "the put after the watch began").await,
        WatchEvent::Put {
            key: "/wf/d".into(),
            value: b"4".to_vec(),
            revision: r4
        }
    );
}

async fn revoking_a_lease_deletes_its_keys(b: &Backend) {
    let store = &*b.store;
    let lease = store.grant_lease(Duration::from_secs(60)).await.unwrap();
    store
        .txn(Vec::new(), vec![put("/lease/h1", b"up", Some(lease))])
        .await
        .unwrap();
    assert_eq!(
        store.get("/lease/h1").await.unwrap().unwrap().lease,
        Some(lease)
    );
    store.keep_alive(lease).await.unwrap();
    store.revoke(lease).await.unwrap();
    assert!(store.get("/lease/h1").await.unwrap().is_none());
    assert!(matches!(
        store.keep_alive(lease).await,
        Err(StoreError::NoLease(id)) if id == lease.0
    ));
    assert!(matches!(
        store.revoke(lease).await,
        Err(StoreError::NoLease(id)) if id == lease.0
    ));
}

async fn unknown_leases_are_refused(b: &Backend) {
    let store = &*b.store;
    let unknown = LeaseId(4_242_424_242);
    assert!(matches!(
        store.keep_alive(unknown).await,
        Err(StoreError::NoLease(4_242_424_242))
    ));
    let refused = store
        .txn(Vec::new(), vec![put("/lease/ghost", b"x", Some(unknown))])
        .await;
    assert!(
        matches!(refused, Err(StoreError::NoLease(4_242_424_242))),
        "{refused:?}"
    );
    assert!(store.get("/lease/ghost").await.unwrap().is_none());
}

async fn an_expired_lease_deletes_its_keys(b: &Backend) {
    let store = &*b.store;
    let lease = store.grant_lease(Duration::from_secs(1)).await.unwrap();
    store
        .txn(Vec::new(), vec![put("/expiry/h1", b"up", Some(lease))])
        .await
        .unwrap();
    let deadline = Instant::now() + PATIENCE;
    while store.get("/expiry/h1").await.unwrap().is_some() {
        assert!(
            Instant::now() < deadline,
            "the key of a 1 s lease is still there after {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(matches!(
        store.keep_alive(lease).await,
        Err(StoreError::NoLease(_))
    ));
}

async fn a_kept_alive_lease_outlives_its_ttl(b: &Backend) {
    let store = &*b.store;
    let lease = store.grant_lease(Duration::from_secs(1)).await.unwrap();
    store
        .txn(Vec::new(), vec![put("/alive/h1", b"up", Some(lease))])
        .await
        .unwrap();
    // Three TTLs, a keep-alive every fifth of one.
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        store.keep_alive(lease).await.unwrap();
        assert!(
            store.get("/alive/h1").await.unwrap().is_some(),
            "the key of a lease kept alive every 200 ms expired"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Runs each contract check once per backend.
macro_rules! contract {
    ($($check:ident),* $(,)?) => {
        mod redb {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $check() {
                    super::$check(&super::redb_backend()).await;
                }
            )*
        }
        mod etcd {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $check() {
                    super::$check(&super::etcd_backend().await).await;
                }
            )*
        }
    };
}

contract!(
    put_get_delete,
    compare_and_swap,
    a_failed_compare_applies_no_op,
    list_and_list_range_stay_inside_the_prefix,
    watch_sees_changes_under_its_prefix_in_order,
    watch_from_a_revision,
    revoking_a_lease_deletes_its_keys,
    unknown_leases_are_refused,
    an_expired_lease_deletes_its_keys,
    a_kept_alive_lease_outlives_its_ttl,
);

// ---- etcd only ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_a_restart_resumes_the_watch_and_keep_alives() {
    let mut etcd = EtcdServer::start().await;
    let store = etcd.connect("/restart").await;
    let lease = store.grant_lease(Duration::from_secs(30)).await.unwrap();
    let mut watch = store.watch("/r/").await.unwrap();
    let before = store.put("/r/before", b"1".to_vec()).await.unwrap();
    assert_eq!(
        next_event(&mut watch, "the put before the restart")
            .await
            .key(),
        Some("/r/before")
    );

    etcd.kill();
    let refused = store.get("/r/before").await;
    match &refused {
        Err(StoreError::Unavailable(why)) => {
            assert!(
                why.contains(&format!("etcd at {}", etcd.endpoint())),
                "{why}"
            );
        }
        other => panic!("a read from a stopped etcd answered {other:?}"),
    }
    assert!(matches!(store.health(), StoreHealth::Failing { .. }));

    etcd.spawn();
    if let Err(exited) = etcd.wait_until_answering().await {
        panic!(
            "etcd exited after its restart ({exited})\nits log:\n{}",
            etcd.log_tail()
        );
    }
    // The store's own connection comes back by itself: retry until it has.
    let deadline = Instant::now() + PATIENCE;
    let after = loop {
        match store.put("/r/after", b"2".to_vec()).await {
            Ok(revision) => break revision,
            Err(e) => assert!(
                Instant::now() < deadline,
                "no write went through {PATIENCE:?} after the restart: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(after > before);
    assert_eq!(store.health(), StoreHealth::Ok);
    assert_eq!(
        next_event(&mut watch, "the put after the restart").await,
        WatchEvent::Put {
            key: "/r/after".into(),
            value: b"2".to_vec(),
            revision: after
        }
    );
    store.keep_alive(lease).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_namespaces_keep_stores_apart() {
    let etcd = EtcdServer::start().await;
    let a = etcd.connect("/ns-a").await;
    let b = etcd.connect("/ns-b").await;
    let mut watch_b = b.watch("/").await.unwrap();
    a.put("/k", b"a".to_vec()).await.unwrap();
    let in_b = b.put("/k", b"b".to_vec()).await.unwrap();
    assert_eq!(a.get("/k").await.unwrap().unwrap().value, b"a");
    assert_eq!(b.get("/k").await.unwrap().unwrap().value, b"b");
    assert_eq!(keys(&a.list("/").await.unwrap()), ["/k"]);
    assert_eq!(keys(&b.list_range("", None, 10).await.unwrap()), ["/k"]);
    // The store without a namespace sees both, under their full keys.
    let root = etcd.connect("").await;
    assert_eq!(
        keys(&root.list("/ns-").await.unwrap()),
        ["/ns-a/k", "/ns-b/k"]
    );
    assert_eq!(
        next_event(&mut watch_b, "b's own put").await,
        WatchEvent::Put {
            key: "/k".into(),
            value: b"b".to_vec(),
            revision: in_b
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_watch_from_a_compacted_revision_resyncs() {
    let etcd = EtcdServer::start().await;
    let store = etcd.connect("/compact").await;
    let old = store.put("/c/a", b"1".to_vec()).await.unwrap();
    let latest = store.put("/c/b", b"2".to_vec()).await.unwrap();
    let mut raw = etcd_client::Client::connect([etcd.endpoint()], None)
        .await
        .unwrap();
    raw.compact(i64::try_from(latest).unwrap(), None)
        .await
        .unwrap();
    let mut watch = store.watch_from("/c/", old - 1).await.unwrap();
    assert_eq!(
        next_event(&mut watch, "the resync").await,
        WatchEvent::Resync
    );
    let next = store.put("/c/c", b"3".to_vec()).await.unwrap();
    assert_eq!(
        next_event(&mut watch, "the put after the resync").await,
        WatchEvent::Put {
            key: "/c/c".into(),
            value: b"3".to_vec(),
            revision: next
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_connecting_where_nothing_listens_names_the_endpoint() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let endpoint = format!("127.0.0.1:{port}");
    match EtcdStore::connect(std::slice::from_ref(&endpoint), "").await {
        Err(StoreError::Connect { endpoints, why }) => {
            assert_eq!(endpoints, endpoint);
            assert!(!why.is_empty());
        }
        Err(other) => panic!("expected a Connect error, got {other}"),
        Ok(_) => panic!("connected to {endpoint}, where nothing listens"),
    }
}

/// A TCP relay to etcd whose connections the test can cut: the store behind it loses etcd while
/// etcd itself goes on serving others.
struct CutProxy {
    port: u16,
    open: Arc<std::sync::atomic::AtomicBool>,
    relays: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
    accepting: tokio::task::JoinHandle<()>,
}

impl CutProxy {
    async fn start(target: String) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let open = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let relays = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (gate, list) = (Arc::clone(&open), Arc::clone(&relays));
        let accepting = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                // Closed: the connection is dropped at once.
                if !gate.load(std::sync::atomic::Ordering::SeqCst) {
                    continue;
                }
                let target = target.clone();
                let relay = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                list.lock().unwrap().push(relay.abort_handle());
            }
        });
        Self {
            port,
            open,
            relays,
            accepting,
        }
    }

    fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Closes every relayed connection and drops new ones until [`Self::restore`].
    fn cut(&self) {
        self.open.store(false, std::sync::atomic::Ordering::SeqCst);
        for relay in self.relays.lock().unwrap().drain(..) {
            relay.abort();
        }
    }

    fn restore(&self) {
        self.open.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.cut();
        self.accepting.abort();
    }
}

/// Waits until `store` reports the health `wanted` (`true`: Ok).
async fn await_health(store: &EtcdStore, wanted_ok: bool) {
    let deadline = Instant::now() + PATIENCE;
    while (store.health() == StoreHealth::Ok) != wanted_ok {
        assert!(
            Instant::now() < deadline,
            "the store's health is still {:?} after {PATIENCE:?}",
            store.health()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_a_broken_watch_resumes_after_its_last_delivered_revision() {
    let etcd = EtcdServer::start().await;
    let proxy = CutProxy::start(etcd.endpoint()).await;
    let store = EtcdStore::connect(&[proxy.endpoint()], "/resume")
        .await
        .unwrap();
    let direct = etcd.connect("/resume").await;
    let mut watch = store.watch("/p/").await.unwrap();
    store.put("/p/a", b"1".to_vec()).await.unwrap();
    assert_eq!(
        next_event(&mut watch, "the put before the cut").await.key(),
        Some("/p/a")
    );

    proxy.cut();
    // Only the watch talks to etcd now: its failing reconnections turn the health.
    await_health(&store, false).await;
    let missed = direct.put("/p/during", b"2".to_vec()).await.unwrap();
    direct.put("/elsewhere", b"x".to_vec()).await.unwrap();
    proxy.restore();
    let after = store.put("/p/after", b"3".to_vec()).await.unwrap();

    assert_eq!(
        next_event(&mut watch, "the put made while the watch was cut off").await,
        WatchEvent::Put {
            key: "/p/during".into(),
            value: b"2".to_vec(),
            revision: missed
        }
    );
    assert_eq!(
        next_event(&mut watch, "the put after the reconnection").await,
        WatchEvent::Put {
            key: "/p/after".into(),
            value: b"3".to_vec(),
            revision: after
        }
    );
    await_health(&store, true).await;
}

/// A store on a three-member etcd keeps answering while one member is down: once the members
/// left have a leader, reads, writes and lease keep-alives go to them (a request the stopped
/// member never received goes again, elsewhere), and a watch opened before the kill delivers
/// what follows it. Requests in flight when the member died (or sent to it as raft leader
/// before the others noticed) may fail as unavailable: whether they applied is unknown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_a_store_on_three_members_answers_while_one_is_down() {
    let dir = tempfile::tempdir().unwrap();
    let mut etcd = LocalEtcd::start_members(dir.path(), 3, true)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let store = EtcdStore::connect(&etcd.endpoints(), "/three")
        .await
        .unwrap();
    let lease = store.grant_lease(Duration::from_secs(5)).await.unwrap();
    let mut watch = store.watch("/w/").await.unwrap();
    store
        .txn(vec![], vec![put("/k", b"0", None)])
        .await
        .unwrap();

    etcd.kill_member(0);
    let deadline = Instant::now() + PATIENCE;
    while let Err(e) = store.txn(vec![], vec![put("/k", b"0", None)]).await {
        assert!(
            matches!(e, StoreError::Unavailable(_)),
            "a write right after a member's kill answered {e}"
        );
        assert!(
            Instant::now() < deadline,
            "no write succeeded within {PATIENCE:?} of a member's kill: {e}"
        );
    }
    // Two members left, with the tests' 100 ms election timeout: a member stalled that long
    // on a loaded machine costs the cluster its leader for a moment (Unavailable). Each call
    // is idempotent; it must be answered within PATIENCE.
    for i in 1..=30u32 {
        let value = i.to_string();
        answered(&format!("write {i} with a member down"), || {
            store.txn(vec![], vec![put("/k", value.as_bytes(), Some(lease))])
        })
        .await;
        let read = answered("a read", || store.get("/k")).await.unwrap();
        assert_eq!(read.value, value.as_bytes());
        answered(&format!("keep-alive {i} with a member down"), || {
            store.keep_alive(lease)
        })
        .await;
    }
    store
        .txn(vec![], vec![put("/w/after", b"1", None)])
        .await
        .unwrap();
    assert_eq!(
        next_event(&mut watch, "a put after the member's kill")
            .await
            .key(),
        Some("/w/after")
    );
    assert!(
        matches!(store.health(), StoreHealth::Ok),
        "{:?}",
        store.health()
    );
}

/// A member cut off from its cluster's quorum says so: a watch asked of it is refused as
/// unavailable (no leader) once it has lost its leader, rather than opened to deliver nothing
/// until the partition heals (the store asks etcd to require a leader).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_a_member_without_a_leader_refuses_a_watch() {
    let dir = tempfile::tempdir().unwrap();
    let mut etcd = LocalEtcd::start_members(dir.path(), 3, true)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let first = etcd.endpoints()[0].clone();
    let store = EtcdStore::connect(&[first], "/quorum").await.unwrap();
    let watch = store.watch("/w/").await;
    assert!(watch.is_ok(), "a member with a leader opens a watch");
    etcd.kill_member(1);
    etcd.kill_member(2);
    let deadline = Instant::now() + PATIENCE;
    loop {
        match store.watch("/w/").await {
            Err(StoreError::Unavailable(why)) => {
                assert!(why.contains("leader"), "{why}");
                break;
            }
            Err(other) => panic!("a watch on a member without a leader answered {other}"),
            Ok(_) => assert!(
                Instant::now() < deadline,
                "a member alone of three still opened watches {PATIENCE:?} after the others died"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What `call` answers once the cluster answers it, trying again within [`PATIENCE`] while
/// it is Unavailable for want of a leader (no leader, a leader changed, a proposal timed
/// out "possibly due to connection lost", no answer in time).
/// A connection refused or failed fails the test at once: the store must send a request the
/// stopped member could not take to another member itself.
async fn answered<T, F>(what: &str, mut call: impl FnMut() -> F) -> T
where
    F: std::future::Future<Output = Result<T, StoreError>>,
{
    let deadline = Instant::now() + PATIENCE;
    loop {
        match call().await {
            Ok(v) => return v,
            Err(StoreError::Unavailable(why))
                if !why.contains("tcp connect error")
                    && !why.contains("refused")
                    && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("{what}: {e}"),
        }
    }
}

/// Compaction through the trait: history before the revision is gone (a watch from before it
/// resyncs), the latest values stay, and compacting an already compacted revision is no error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_compact_forgets_the_history_before_a_revision() {
    let etcd = EtcdServer::start().await;
    let store = etcd.connect("/compaction").await;
    let old = store.put("/h/a", b"1".to_vec()).await.unwrap();
    let latest = store.put("/h/a", b"2".to_vec()).await.unwrap();
    store.compact(latest).await.unwrap();
    store.compact(old).await.unwrap();
    assert_eq!(store.get("/h/a").await.unwrap().unwrap().value, b"2");
    let mut watch = store.watch_from("/h/", old - 1).await.unwrap();
    assert_eq!(
        next_event(&mut watch, "the resync after compaction").await,
        WatchEvent::Resync
    );
}
