//! The store consistency check: a store the controller wrote is consistent; each invariant the
//! check guards, broken by hand in the store, is reported by name (an allocation whose VNF is
//! gone, a placed VNF without its allocation, a CPU two dedicated VNFs hold).

use std::sync::Arc;

use telvirt_controller::consistency::check;
use telvirt_controller::records::{self, VnfRecord};
use telvirt_controller::{Caller, Controller};
use telvirt_model::Format;
use telvirt_sched::{Allocation, SchedConfig};
use telvirt_store::{Op, RedbStore, Store};

use crate::common;

fn admin() -> Caller {
    Caller {
        name: "admin".into(),
    }
}

fn descriptor(name: &str) -> String {
    format!(
        "apiVersion: telvirt/v1\nkind: Vnf\nmetadata: {{ name: {name} }}\nspec:\n  runtime: wasm\n  cpu: {{ policy: dedicated, count: 1 }}\n  ports: [in, out]\n  wasm:\n    module: /srv/telvirt/fw.wasm\n    limits: {{ memory: 16MiB }}\n"
    )
}

/// A controller over a fresh redb store with host h1 (cores 1-3 free) and VNFs a and b placed.
async fn placed_pair(dir: &std::path::Path) -> (Arc<Controller>, Arc<RedbStore>) {
    let store = RedbStore::open(&dir.join("store.redb")).unwrap();
    let c = Controller::open(store.clone(), SchedConfig::default())
        .await
        .unwrap();
    c.register_host(common::host_record("h1")).await.unwrap();
    for name in ["a", "b"] {
        c.create_vnf(&admin(), descriptor(name).as_bytes(), Format::Yaml)
            .await
            .unwrap();
    }
    c.schedule_pending().await.unwrap();
    (c, store)
}

async fn put(store: &dyn Store, key: &str, value: Vec<u8>) {
    store
        .txn(
            Vec::new(),
            vec![Op::Put {
                key: key.to_owned(),
                value,
                lease: None,
            }],
        )
        .await
        .unwrap();
}

async fn delete(store: &dyn Store, key: &str) {
    let op = Op::Delete {
        key: key.to_owned(),
    };
    store.txn(Vec::new(), vec![op]).await.unwrap();
}

async fn get<T: serde::de::DeserializeOwned>(store: &dyn Store, key: &str) -> T {
    serde_json::from_slice(&store.get(key).await.unwrap().unwrap().value).unwrap()
}

#[tokio::test]
async fn what_the_controller_wrote_is_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let (_c, store) = placed_pair(dir.path()).await;
    let report = check(store.as_ref(), SchedConfig::default()).await.unwrap();
    assert!(report.is_consistent(), "{report:?}");
    assert_eq!((report.vnfs, report.allocations), (2, 2), "{report:?}");
}

#[tokio::test]
async fn an_allocation_without_its_vnf_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let (_c, store) = placed_pair(dir.path()).await;
    delete(store.as_ref(), &records::vnf_key("a")).await;
    let report = check(store.as_ref(), SchedConfig::default()).await.unwrap();
    assert!(!report.is_consistent());
    assert_eq!(report.allocations_without_vnf, ["a"], "{report:?}");
}

#[tokio::test]
async fn a_placed_vnf_without_its_allocation_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let (_c, store) = placed_pair(dir.path()).await;
    delete(store.as_ref(), &records::allocation_key("b")).await;
    let report = check(store.as_ref(), SchedConfig::default()).await.unwrap();
    assert_eq!(report.placed_without_allocation, ["b"], "{report:?}");
}

#[tokio::test]
async fn a_cpu_held_by_two_dedicated_vnfs_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let (_c, store) = placed_pair(dir.path()).await;
    // b's allocation and record are rewritten onto a's CPU.
    let a: Allocation = get(store.as_ref(), &records::allocation_key("a")).await;
    let mut b: Allocation = get(store.as_ref(), &records::allocation_key("b")).await;
    b.placement.act.cpus = a.placement.act.cpus.clone();
    let mut record: VnfRecord = get(store.as_ref(), &records::vnf_key("b")).await;
    record.vnf.placements =
        telvirt_controller::placement::placements(&b.placement, &record.vnf.descriptor);
    put(
        store.as_ref(),
        &records::allocation_key("b"),
        serde_json::to_vec(&b).unwrap(),
    )
    .await;
    put(
        store.as_ref(),
        &records::vnf_key("b"),
        serde_json::to_vec(&record).unwrap(),
    )
    .await;
    let report = check(store.as_ref(), SchedConfig::default()).await.unwrap();
    let cpu = a.placement.act.cpus[0].cpus()[0];
    assert_eq!(
        report.cpus_held_twice,
        [format!("h1/{cpu} (a, b)")],
        "{report:?}"
    );
    assert_eq!(report.conflicts.len(), 1, "{report:?}");
    assert!(report.conflicts[0].starts_with("b: "), "{report:?}");
    assert!(report.placement_mismatch.is_empty(), "{report:?}");
}
