//! The embedded store against the `Store` contract, on real redb files.

use std::time::{Duration, Instant};

use telvirt_store::{Compare, Op, RedbStore, Store, WatchEvent};

mod common;

use common::{put, txn_leased};

fn temp_store() -> (tempfile::TempDir, std::sync::Arc<RedbStore>) {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(&dir.path().join("store.redb")).unwrap();
    (dir, store)
}

#[tokio::test]
async fn put_get_list_delete() {
    let (_dir, store) = temp_store();
    assert!(store.get("/a").await.unwrap().is_none());
    let r1 = store.put("/vnfs/fw1", b"one".to_vec()).await.unwrap();
    let r2 = store.put("/vnfs/nat1", b"two".to_vec()).await.unwrap();
    store.put("/hosts/h1", b"h".to_vec()).await.unwrap();
    assert!(r2 > r1);
    let got = store.get("/vnfs/fw1").await.unwrap().unwrap();
    assert_eq!(got.value, b"one");
    assert_eq!(got.mod_revision, r1);
    let listed = store.list("/vnfs/").await.unwrap();
    let keys: Vec<_> = listed.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ["/vnfs/fw1", "/vnfs/nat1"]);
    store.delete("/vnfs/fw1").await.unwrap();
    assert!(store.get("/vnfs/fw1").await.unwrap().is_none());
}

#[tokio::test]
async fn create_revision_survives_updates() {
    let (_dir, store) = temp_store();
    let created = store.put("/k", b"1".to_vec()).await.unwrap();
    let updated = store.put("/k", b"2".to_vec()).await.unwrap();
    let got = store.get("/k").await.unwrap().unwrap();
    assert_eq!(got.create_revision, created);
    assert_eq!(got.mod_revision, updated);
}

#[tokio::test]
async fn compare_and_swap_only_writes_on_expected_revision() {
    let (_dir, store) = temp_store();
    assert!(
        store
            .compare_and_swap("/k", 0, b"first".to_vec())
            .await
            .unwrap()
    );
    // A second create-if-absent loses.
    assert!(
        !store
            .compare_and_swap("/k", 0, b"second".to_vec())
            .await
            .unwrap()
    );
    let rev = store.get("/k").await.unwrap().unwrap().mod_revision;
    assert!(
        !store
            .compare_and_swap("/k", rev + 7, b"stale".to_vec())
            .await
            .unwrap()
    );
    assert!(
        store
            .compare_and_swap("/k", rev, b"third".to_vec())
            .await
            .unwrap()
    );
    assert_eq!(store.get("/k").await.unwrap().unwrap().value, b"third");
}

#[tokio::test]
async fn failed_transaction_changes_nothing() {
    let (_dir, store) = temp_store();
    store.put("/a", b"a".to_vec()).await.unwrap();
    let before = store.list("/").await.unwrap();
    let outcome = store
        .txn(
            vec![Compare::ModRevision {
                key: "/a".into(),
                revision: 999,
            }],
            vec![
                Op::Put {
                    key: "/b".into(),
                    value: b"b".to_vec(),
                    lease: None,
                },
                Op::Delete { key: "/a".into() },
            ],
        )
        .await
        .unwrap();
    assert!(!outcome.succeeded);
    assert_eq!(store.list("/").await.unwrap(), before);
}

#[tokio::test]
async fn transaction_applies_all_ops_at_one_revision() {
    let (_dir, store) = temp_store();
    let outcome = store
        .txn(
            vec![],
            vec![
                Op::Put {
                    key: "/x".into(),
                    value: b"x".to_vec(),
                    lease: None,
                },
                Op::Put {
                    key: "/y".into(),
                    value: b"y".to_vec(),
                    lease: None,
                },
            ],
        )
        .await
        .unwrap();
    assert!(outcome.succeeded);
    for key in ["/x", "/y"] {
        assert_eq!(
            store.get(key).await.unwrap().unwrap().mod_revision,
            outcome.revision
        );
    }
}

#[tokio::test]
async fn watch_sees_changes_under_its_prefix_only() {
    let (_dir, store) = temp_store();
    let mut watch = store.watch("/vnfs/").await.unwrap();
    store.put("/hosts/h1", b"h".to_vec()).await.unwrap();
    store.put("/vnfs/fw1", b"v".to_vec()).await.unwrap();
    store.delete("/vnfs/fw1").await.unwrap();
    let first = watch.next().await.unwrap();
    assert!(
        matches!(&first, WatchEvent::Put { key, value, .. } if key == "/vnfs/fw1" && value == b"v"),
        "{first:?}"
    );
    let second = watch.next().await.unwrap();
    assert!(
        matches!(&second, WatchEvent::Delete { key, .. } if key == "/vnfs/fw1"),
        "{second:?}"
    );
}

#[tokio::test]
async fn data_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    {
        let store = RedbStore::open(&path).unwrap();
        store.put("/vnfs/fw1", b"kept".to_vec()).await.unwrap();
    }
    let store = RedbStore::open(&path).unwrap();
    assert_eq!(
        store.get("/vnfs/fw1").await.unwrap().unwrap().value,
        b"kept"
    );
    // Revisions keep counting from where they were.
    let next = store.put("/vnfs/fw2", b"x".to_vec()).await.unwrap();
    assert!(next >= 2);
}

#[tokio::test]
async fn revoked_lease_deletes_its_keys() {
    let (_dir, store) = temp_store();
    let lease = store.grant_lease(Duration::from_secs(60)).await.unwrap();
    store
        .txn(
            vec![],
            vec![Op::Put {
                key: "/alive/h1".into(),
                value: b"1".to_vec(),
                lease: Some(lease),
            }],
        )
        .await
        .unwrap();
    assert_eq!(
        store.get("/alive/h1").await.unwrap().unwrap().lease,
        Some(lease)
    );
    store.revoke(lease).await.unwrap();
    assert!(store.get("/alive/h1").await.unwrap().is_none());
    assert!(store.keep_alive(lease).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_lease_deletes_its_keys() {
    let (_dir, store) = temp_store();
    let mut watch = store.watch("/alive/").await.unwrap();
    txn_leased(&*store, Duration::from_millis(50), |lease| {
        vec![put("/alive/h1", b"1", Some(lease))]
    })
    .await;
    assert!(matches!(watch.next().await, Some(WatchEvent::Put { .. })));
    let deadline = Instant::now() + Duration::from_secs(10);
    let event = tokio::time::timeout_at(deadline.into(), watch.next())
        .await
        .expect("the lease must expire within the deadline");
    assert!(matches!(event, Some(WatchEvent::Delete { ref key, .. }) if key == "/alive/h1"));
    assert!(store.get("/alive/h1").await.unwrap().is_none());
}

#[tokio::test]
async fn put_with_unknown_lease_is_refused() {
    let (_dir, store) = temp_store();
    let err = store
        .txn(
            vec![],
            vec![Op::Put {
                key: "/k".into(),
                value: vec![],
                lease: Some(telvirt_store::LeaseId(42)),
            }],
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("lease 42"));
    assert!(store.get("/k").await.unwrap().is_none());
}

#[tokio::test]
async fn list_range_pages_through_a_prefix_in_key_order() {
    let (_dir, store) = temp_store();
    for name in ["b", "a", "d", "c", "e"] {
        store.put(&format!("/x/{name}"), name.into()).await.unwrap();
    }
    // Neighbours on both sides of the prefix must not leak into a page.
    store.put("/w/z", b"w".to_vec()).await.unwrap();
    store.put("/y/a", b"y".to_vec()).await.unwrap();

    let keys = |page: Vec<(String, telvirt_store::Versioned)>| {
        page.into_iter().map(|(k, _)| k).collect::<Vec<_>>()
    };
    assert_eq!(
        keys(store.list_range("/x/", None, 2).await.unwrap()),
        ["/x/a", "/x/b"]
    );
    assert_eq!(
        keys(store.list_range("/x/", Some("/x/b"), 2).await.unwrap()),
        ["/x/c", "/x/d"]
    );
    assert_eq!(
        keys(store.list_range("/x/", Some("/x/d"), 2).await.unwrap()),
        ["/x/e"]
    );
    assert!(
        store
            .list_range("/x/", Some("/x/e"), 2)
            .await
            .unwrap()
            .is_empty()
    );
    // A cursor that is not itself a key starts after where it would sort.
    assert_eq!(
        keys(store.list_range("/x/", Some("/x/bb"), 10).await.unwrap()),
        ["/x/c", "/x/d", "/x/e"]
    );
    // A cursor before the prefix starts at the prefix; limit 0 reads nothing.
    assert_eq!(
        keys(store.list_range("/x/", Some("/a"), 1).await.unwrap()),
        ["/x/a"]
    );
    assert!(store.list_range("/x/", None, 0).await.unwrap().is_empty());
    // The page's records are the same as the whole list's.
    let whole = store.list("/x/").await.unwrap();
    let paged = store.list_range("/x/", None, 100).await.unwrap();
    assert_eq!(whole, paged);
}

fn unix_ms() -> u64 {
    u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

#[tokio::test]
async fn a_keep_alive_moves_the_deadline_and_an_unrenewed_lease_expires() {
    let (_dir, store) = temp_store();
    let granted_at = unix_ms();
    let lease = store.grant_lease(Duration::from_secs(60)).await.unwrap();
    store
        .txn(
            vec![],
            vec![Op::Put {
                key: "/alive/h1".into(),
                value: b"1".to_vec(),
                lease: Some(lease),
            }],
        )
        .await
        .unwrap();
    // Let the clock move on, then renew: the deadline follows the renewal, not the grant.
    let before = unix_ms();
    while unix_ms() < before + 20 {
        tokio::task::yield_now().await;
    }
    store.keep_alive(lease).await.unwrap();
    let grant_deadline = granted_at + 60_000;
    assert_eq!(store.expire_leases(grant_deadline + 5).unwrap(), 0);
    assert!(store.get("/alive/h1").await.unwrap().is_some());
    // Past the renewal's deadline, nothing keeps it.
    assert_eq!(store.expire_leases(unix_ms() + 61_000).unwrap(), 1);
    assert!(store.get("/alive/h1").await.unwrap().is_none());
    assert!(store.keep_alive(lease).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reopened_store_gives_every_lease_its_ttl_again() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    {
        let store = RedbStore::open(&path).unwrap();
        let lease = store.grant_lease(Duration::from_millis(300)).await.unwrap();
        store
            .txn(
                vec![],
                vec![Op::Put {
                    key: "/alive/h1".into(),
                    value: b"1".to_vec(),
                    lease: Some(lease),
                }],
            )
            .await
            .unwrap();
    }
    // The stored deadline passes while the store is closed.
    let closed = unix_ms();
    while unix_ms() < closed + 400 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let store = RedbStore::open(&path).unwrap();
    assert_eq!(store.expire_leases(unix_ms()).unwrap(), 0);
    assert!(store.get("/alive/h1").await.unwrap().is_some());
    // Not renewed by anyone: it expires one TTL after the open.
    let deadline = Instant::now() + Duration::from_secs(10);
    while store.get("/alive/h1").await.unwrap().is_some() {
        assert!(
            Instant::now() < deadline,
            "the lease never expired after the reopen"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Writes arriving together are committed together: each keeps its own compare, revision and
/// outcome, and one that names no lease fails alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_transactions_keep_their_own_compares_revisions_and_outcomes() {
    let (_dir, store) = temp_store();
    let mut tasks = tokio::task::JoinSet::new();
    // 64 writers each add one to a counter with compare-and-swap, retrying on a lost race.
    for _ in 0..64 {
        let store = store.clone();
        tasks.spawn(async move {
            loop {
                let (value, rev) = match store.get("/counter").await.unwrap() {
                    Some(v) => (
                        u64::from_le_bytes(v.value.as_slice().try_into().unwrap()),
                        v.mod_revision,
                    ),
                    None => (0, 0),
                };
                let outcome = store
                    .txn(
                        vec![Compare::ModRevision {
                            key: "/counter".into(),
                            revision: rev,
                        }],
                        vec![Op::Put {
                            key: "/counter".into(),
                            value: (value + 1).to_le_bytes().to_vec(),
                            lease: None,
                        }],
                    )
                    .await
                    .unwrap();
                if outcome.succeeded {
                    return Some(outcome.revision);
                }
            }
        });
    }
    // Among them, one names a lease that does not exist.
    let bad = store.clone();
    tasks.spawn(async move {
        let err = bad
            .txn(
                vec![],
                vec![
                    Op::Put {
                        key: "/bad/a".into(),
                        value: vec![1],
                        lease: None,
                    },
                    Op::Put {
                        key: "/bad/b".into(),
                        value: vec![1],
                        lease: Some(telvirt_store::LeaseId(999)),
                    },
                ],
            )
            .await
            .unwrap_err();
        assert!(err.to_string().contains("lease 999"), "{err}");
        None
    });
    let mut revisions = Vec::new();
    while let Some(r) = tasks.join_next().await {
        revisions.extend(r.unwrap());
    }
    let v = store.get("/counter").await.unwrap().unwrap();
    assert_eq!(
        u64::from_le_bytes(v.value.as_slice().try_into().unwrap()),
        64
    );
    revisions.sort_unstable();
    revisions.dedup();
    assert_eq!(revisions.len(), 64, "each write has a revision of its own");
    assert_eq!(v.mod_revision, *revisions.last().unwrap());
    // The refused one wrote nothing, not even its first op.
    assert!(store.get("/bad/a").await.unwrap().is_none());
    assert!(store.get("/bad/b").await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_gives_free_pages_back_and_keeps_every_record() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let store = RedbStore::open(&path).unwrap();
    // Many small commits, each rewriting records: copy-on-write leaves free pages behind.
    for round in 0..4u32 {
        for i in 0..300u32 {
            store
                .put(
                    &format!("/vnfs/v{i:04}"),
                    vec![u8::try_from(round).unwrap(); 600],
                )
                .await
                .unwrap();
        }
    }
    let before = std::fs::metadata(&path).unwrap().len();
    assert!(store.compact().unwrap(), "a fragmented file compacts");
    let after = std::fs::metadata(&path).unwrap().len();
    assert!(
        after < before,
        "{after} bytes after compaction, {before} before"
    );
    let all = store.list("/vnfs/").await.unwrap();
    assert_eq!(all.len(), 300);
    assert!(all.iter().all(|(_, v)| v.value == vec![3u8; 600]));
    // Still a working store.
    store.put("/vnfs/new", b"x".to_vec()).await.unwrap();
    assert!(store.get("/vnfs/new").await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_packs_records_written_one_at_a_time_into_full_pages() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let store = RedbStore::open(&path).unwrap();
    // As a VNF's records are written: one key under each of several prefixes, one commit
    // each. Every insert lands at the end of its prefix's range, in the middle of the tree,
    // where a full page splits in half and stays half full.
    let mut revisions = Vec::new();
    for i in 0..1000u32 {
        for prefix in ["/allocations/", "/events/", "/vnfs/", "/zones/"] {
            let r = store
                .put(
                    &format!("{prefix}v{i:05}"),
                    vec![u8::try_from(i % 251).unwrap(); 400],
                )
                .await
                .unwrap();
            revisions.push((format!("{prefix}v{i:05}"), r));
        }
    }
    revisions.sort();
    let live: u64 = store
        .list("/")
        .await
        .unwrap()
        .iter()
        .map(|(k, v)| (k.len() + v.value.len()) as u64)
        .sum();
    store.compact().unwrap();
    let file = std::fs::metadata(&path).unwrap().len();
    // Full pages hold the records and their 24-byte headers with little to spare; half-full
    // pages would need about twice the live bytes.
    assert!(
        file < live * 13 / 10,
        "{file} bytes in the file for {live} live bytes"
    );
    let all = store.list("/").await.unwrap();
    assert_eq!(all.len(), 4000);
    for ((key, v), (written, revision)) in all.iter().zip(&revisions) {
        assert_eq!(key, written);
        let i: u32 = key[key.len() - 5..].parse().unwrap();
        assert_eq!(v.value, vec![u8::try_from(i % 251).unwrap(); 400]);
        assert_eq!(v.mod_revision, *revision, "revisions are kept");
    }
    store.put("/vnfs/v00000", b"x".to_vec()).await.unwrap();
    assert_eq!(
        store.get("/vnfs/v00000").await.unwrap().unwrap().value,
        b"x"
    );
}

/// A record the store cannot read (a damaged file) does not keep a lease from expiring: the
/// lease's own keys go, the damaged record stays for its reader to see the error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_that_cannot_be_read_does_not_keep_a_lease_alive() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    {
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let kv: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("kv");
            let mut kv = txn.open_table(kv).unwrap();
            kv.insert("/damaged", &b"\x01"[..]).unwrap();
        }
        txn.commit().unwrap();
    }
    let store = RedbStore::open(&path).unwrap();
    assert!(
        store.get("/damaged").await.is_err(),
        "the damaged record reads as an error"
    );
    let lease = txn_leased(&*store, Duration::from_millis(50), |lease| {
        vec![put("/alive/h1", b"1", Some(lease))]
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while store.get("/alive/h1").await.unwrap().is_some() {
        assert!(
            Instant::now() < deadline,
            "the lease never expired beside a damaged record"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(store.keep_alive(lease).await.is_err(), "the lease is gone");
    assert!(
        store.get("/damaged").await.is_err(),
        "the damaged record stays"
    );
}

/// Watchers see every event in revision order while leases expire (their deletes are
/// committed by the store's sweep) among writes committed by its commit thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_arrive_in_revision_order_while_leases_expire_among_writes() {
    let (_dir, store) = temp_store();
    let mut watch = store.watch("/").await.unwrap();
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            for i in 0..400u32 {
                txn_leased(&*store, Duration::from_millis(1), |lease| {
                    vec![
                        put(&format!("/leased/{i}"), b"1", Some(lease)),
                        put("/plain", &i.to_le_bytes(), None),
                    ]
                })
                .await;
            }
        })
    };
    let mut last = 0;
    let mut deletes = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while deletes < 400 {
        let event = tokio::time::timeout_at(deadline.into(), watch.next())
            .await
            .expect("every leased key expires within the deadline")
            .expect("the watch goes on");
        let revision = match event {
            WatchEvent::Put { revision, .. } => revision,
            WatchEvent::Delete { revision, .. } => {
                deletes += 1;
                revision
            }
            WatchEvent::Resync => panic!("the watch fell behind"),
        };
        assert!(revision >= last, "revision {revision} after {last}");
        last = revision;
    }
    writer.await.unwrap();
}
