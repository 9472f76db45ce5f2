//! Host failure detection does not wait for the store: the leading controller hears every
//! heartbeat, and a host heard from that sends nothing for one TTL is NotReady at once (its
//! VNFs Unknown, woken by the coming silence rather than a periodic pass) even while the store
//! still holds its lease, as etcd does for up to 1.5 s after a 1 s lease runs out. The store
//! here grants every lease for a minute, so only the controller's clock can notice.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use telvirt_controller::records::host_lease_key;
use telvirt_controller::{Caller, Controller};
use telvirt_model::Format;
use telvirt_model::Phase;
use telvirt_model::api::Observation;
use telvirt_sched::SchedConfig;
use telvirt_store::{
    Compare, LeaseId, Op, RedbStore, Store, StoreError, StoreHealth, TxnOutcome, Versioned, Watch,
};

mod common;

/// A real redb store whose leases last a minute whatever TTL is asked.
struct MinuteLeases(Arc<RedbStore>);

#[async_trait]
impl Store for MinuteLeases {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        self.0.get(key).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<(String, Versioned)>, StoreError> {
        self.0.list(prefix).await
    }
    async fn list_range(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Versioned)>, StoreError> {
        self.0.list_range(prefix, start_after, limit).await
    }
    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<TxnOutcome, StoreError> {
        self.0.txn(compares, ops).await
    }
    async fn watch(&self, prefix: &str) -> Result<Watch, StoreError> {
        self.0.watch(prefix).await
    }
    async fn grant_lease(&self, _ttl: Duration) -> Result<LeaseId, StoreError> {
        self.0.grant_lease(Duration::from_secs(60)).await
    }
    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.0.keep_alive(lease).await
    }
    async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.0.revoke(lease).await
    }
    fn health(&self) -> StoreHealth {
        self.0.health()
    }
}

async fn status(c: &Controller, admin: &Caller, host: &str) -> String {
    let hosts = c.hosts(admin).await.unwrap();
    let h = hosts.iter().find(|h| h.name == host).unwrap();
    format!("{:?}", h.status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_agent_is_not_ready_after_one_ttl_while_its_store_lease_lives_on() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(MinuteLeases(
        RedbStore::open(&dir.path().join("store.redb")).unwrap(),
    ));
    let c = Controller::open(store.clone(), SchedConfig::default())
        .await
        .unwrap();
    c.set_host_lease_ttl(Duration::from_millis(300)).unwrap();
    c.register_host(common::host_record("h2")).await.unwrap();
    // The periodic pass is an hour apart: only the coming silence can wake the monitor.
    tokio::spawn(c.clone().host_monitor(Duration::from_secs(3600)));
    let admin = Caller {
        name: "admin".into(),
    };
    let beating = {
        let c = c.clone();
        tokio::spawn(async move {
            loop {
                c.heartbeat("h2").await.unwrap();
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let u1 = "apiVersion: telvirt/v1\nkind: Vnf\nmetadata: { name: u1 }\nspec:\n  runtime: wasm\n  cpu: { policy: dedicated, count: 1 }\n  wasm:\n    module: /srv/telvirt/fw.wasm\n";
    c.create_vnf(&admin, u1.as_bytes(), Format::Yaml)
        .await
        .unwrap();
    // Placed once the monitor has seen h2's lease (a host is placeable only while Ready).
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.vnf(&admin, "u1").await.unwrap().placements.is_empty() {
        assert!(Instant::now() < deadline, "u1 was never placed");
        c.schedule_pending().await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let generation = c.vnf(&admin, "u1").await.unwrap().generation;
    for phase in [Phase::Starting, Phase::Running] {
        let obs = Observation {
            vnf: "u1".parse().unwrap(),
            phase,
            reason: "started".into(),
            generation,
            replication: None,
            active_lost: None,
            ..common::observation("x", Phase::Running)
        };
        c.observe("h2", obs).await.unwrap();
    }
    assert_eq!(status(&c, &admin, "h2").await, "Ready");

    beating.abort();
    let _ = beating.await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.vnf(&admin, "u1").await.unwrap().phase != Phase::Unknown {
        assert!(
            Instant::now() < deadline,
            "u1 never turned Unknown: {:?}",
            c.vnf(&admin, "u1").await.unwrap()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status(&c, &admin, "h2").await, "NotReady");
    assert!(
        store.get(&host_lease_key("h2")).await.unwrap().is_some(),
        "the store's lease expired: the test proves nothing"
    );
}
