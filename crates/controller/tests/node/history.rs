//! The leader compacts the store's history one interval behind: the first call only notes the
//! revision; the next compacts up to it, so a watcher from before it resyncs while one from
//! after it replays. On a real etcd, whose database grows with every revision otherwise.

use std::sync::Arc;

use telvirt_controller::Controller;
use telvirt_sched::SchedConfig;
use telvirt_store::local_etcd::LocalEtcd;
use telvirt_store::{EtcdStore, Store, WatchEvent};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_is_compacted_one_interval_behind() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = LocalEtcd::start(dir.path(), true)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let store: Arc<dyn Store> = Arc::new(
        EtcdStore::connect(&[etcd.endpoint()], "/history")
            .await
            .unwrap(),
    );
    let c = Controller::open(store.clone(), SchedConfig::default())
        .await
        .unwrap();
    let before = store.put("/x/a", b"1".to_vec()).await.unwrap();
    store.put("/x/b", b"1".to_vec()).await.unwrap();
    let noted = c.compact_history(None).await.unwrap();
    assert!(noted > before);
    // Nothing compacted yet: a watch from before replays.
    let mut replay = store.watch_from("/x/", before - 1).await.unwrap();
    assert!(matches!(replay.next().await, Some(WatchEvent::Put { .. })));
    let after = store.put("/x/a", b"2".to_vec()).await.unwrap();
    c.compact_history(Some(noted)).await.unwrap();
    let mut old = store.watch_from("/x/", before - 1).await.unwrap();
    assert_eq!(old.next().await, Some(WatchEvent::Resync));
    let mut recent = store.watch_from("/x/", after - 1).await.unwrap();
    assert!(matches!(recent.next().await, Some(WatchEvent::Put { .. })));
}
