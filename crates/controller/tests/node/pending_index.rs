//! The pending index (`/pending/<vnf>`): a scheduling pass reads only it, not every VNF; it is
//! written and removed in the VNF's own transactions; opening a store written before it existed
//! (or left out of step) rebuilds it. The assignment index (`/assignments/<host>/<vnf>`): an
//! agent's assignments read only its host's VNFs, and agree with what every VNF's placements
//! say. The controller runs over a real redb store seen through a hooked test store, which
//! records which keys each call reads.

use std::sync::Arc;

use telvirt_controller::records::{self, VnfRecord};
use telvirt_controller::{Caller, Controller, Deletion, HostRecord};
use telvirt_model::{Format, Phase};
use telvirt_sched::{HostSpec, SchedConfig, TopologySpec};
use telvirt_store::Store;

use crate::common::hooked_store::HookedStore;

fn admin() -> Caller {
    Caller {
        name: "admin".into(),
    }
}

/// A wasm VNF of `count` workers in the admin's shared group `g` (`None`: dedicated).
fn descriptor(name: &str, count: u32, shared: bool) -> String {
    let cpu = if shared {
        format!("{{ policy: shared, count: {count}, group: g }}")
    } else {
        format!("{{ policy: dedicated, count: {count} }}")
    };
    format!(
        "apiVersion: telvirt/v1\nkind: Vnf\nmetadata: {{ name: {name} }}\nspec:\n  runtime: wasm\n  cpu: {cpu}\n  ports: [in, out]\n  wasm:\n    module: /srv/telvirt/fw.wasm\n    limits: {{ memory: 16MiB }}\n"
    )
}

/// A host of 8 cores without an agent, so placed VNFs stay Scheduled.
fn host() -> HostRecord {
    HostRecord {
        qemu_machines: Vec::new(),
        accel: None,
        cpu: None,
        spec: HostSpec {
            name: "h1".into(),
            topology: Some(TopologySpec {
                sockets: 1,
                cores_per_socket: 8,
                threads_per_core: 1,
                numa_nodes_per_socket: 1,
                memory_per_node: None,
            }),
            shared: "0".parse().unwrap(),
            ..HostSpec::default()
        },
        memory_bytes: 0,
        hugepages: Vec::new(),
        runtimes: Vec::new(),
        agent: false,
        tunnel: None,
        qemu: None,
    }
}

/// Room for every test VNF in the admin's shared group.
fn config() -> SchedConfig {
    SchedConfig {
        shared_core_capacity: 64,
        ..SchedConfig::default()
    }
}

async fn open(path: &std::path::Path) -> (Arc<Controller>, Arc<HookedStore>) {
    let store = HookedStore::open(path);
    let controller = Controller::open(store.clone(), config()).await.unwrap();
    controller.register_host(host()).await.unwrap();
    (controller, store)
}

async fn create(c: &Controller, name: &str, count: u32, shared: bool) {
    c.create_vnf(
        &admin(),
        descriptor(name, count, shared).as_bytes(),
        Format::Yaml,
    )
    .await
    .unwrap();
}

/// The names in the pending index.
async fn index(store: &dyn Store) -> Vec<String> {
    store
        .list(records::PENDING)
        .await
        .unwrap()
        .into_iter()
        .map(|(k, _)| k.strip_prefix(records::PENDING).unwrap().to_owned())
        .collect()
}

/// The names of the stored VNFs that wait for a placement, read from the VNFs themselves.
async fn waiting(store: &dyn Store) -> Vec<String> {
    let mut out = Vec::new();
    for (_, v) in store.list(records::VNFS).await.unwrap() {
        let r: VnfRecord = serde_json::from_slice(&v.value).unwrap();
        if records::wants_placement(&r) {
            out.push(r.vnf.name.to_string());
        }
    }
    out
}

#[tokio::test]
async fn a_scheduling_pass_reads_only_the_pending_index() {
    let dir = tempfile::tempdir().unwrap();
    let (c, store) = open(&dir.path().join("store.redb")).await;
    for i in 0..60 {
        create(&c, &format!("vnf{i:02}"), 1, true).await;
    }
    assert_eq!(index(store.as_ref()).await.len(), 60);
    c.schedule_pending().await.unwrap();
    assert!(
        waiting(store.as_ref()).await.is_empty(),
        "all fit in the group"
    );
    assert!(index(store.as_ref()).await.is_empty());

    // Nothing pending: a pass lists the index and reads no VNF.
    store.take_reads();
    c.schedule_pending().await.unwrap();
    let (lists, gets) = store.take_reads();
    assert_eq!(lists, [records::PENDING]);
    assert!(gets.is_empty(), "read {gets:?}");

    // Two that cannot be placed: a pass reads those two (and their index entries) only.
    create(&c, "big1", 64, false).await;
    create(&c, "big2", 64, false).await;
    c.schedule_pending().await.unwrap();
    store.take_reads();
    c.schedule_pending().await.unwrap();
    let (lists, gets) = store.take_reads();
    assert_eq!(lists, [records::PENDING]);
    let vnf_reads: Vec<&String> = gets
        .iter()
        .filter(|k| k.starts_with(records::VNFS))
        .collect();
    assert!(
        !vnf_reads.is_empty()
            && vnf_reads
                .iter()
                .all(|k| *k == &records::vnf_key("big1") || *k == &records::vnf_key("big2")),
        "read {gets:?}"
    );
    let v = c.vnf(&admin(), "big1").await.unwrap();
    assert_eq!(v.phase, Phase::Pending);
    assert!(v.reason.unwrap_or_default().contains("cpu"), "a reason");
    assert_eq!(index(store.as_ref()).await, ["big1", "big2"]);
}

/// A placement the store refuses does not stop the pass: the VNFs of the batches after it are
/// placed in the same pass, which then reports the error; the refused one is placed by the next.
#[tokio::test]
async fn a_placement_the_store_refuses_does_not_stop_the_pass() {
    let dir = tempfile::tempdir().unwrap();
    let store = HookedStore::open(&dir.path().join("store.redb"));
    let room = SchedConfig {
        shared_core_capacity: 128,
        ..SchedConfig::default()
    };
    let c = Controller::open(store.clone(), room).await.unwrap();
    c.register_host(host()).await.unwrap();
    let n = telvirt_controller::service::PLACE_BATCH + 6;
    for i in 0..n {
        create(&c, &format!("vnf{i:03}"), 1, true).await;
    }
    // The first of the first batch.
    *store.fail_write.lock().unwrap() = Some(records::vnf_key("vnf000"));
    let e = c.schedule_pending().await.unwrap_err();
    assert!(e.to_string().contains("the test refuses"), "{e}");
    assert_eq!(
        waiting(store.as_ref()).await,
        ["vnf000"],
        "the second batch was placed in the same pass"
    );
    c.schedule_pending().await.unwrap();
    assert!(waiting(store.as_ref()).await.is_empty());
}

#[tokio::test]
async fn the_index_follows_create_place_and_delete_in_the_vnfs_transactions() {
    let dir = tempfile::tempdir().unwrap();
    let (c, store) = open(&dir.path().join("store.redb")).await;
    create(&c, "a", 1, false).await;
    create(&c, "b", 64, false).await;
    create(&c, "c", 1, false).await;
    assert_eq!(index(store.as_ref()).await, ["a", "b", "c"]);
    c.schedule_pending().await.unwrap();
    assert_eq!(index(store.as_ref()).await, ["b"]);
    // Deleting a pending VNF takes its entry with it; a placed one has none to take.
    assert_eq!(c.delete(&admin(), "b").await.unwrap(), Deletion::Deleted);
    assert_eq!(c.delete(&admin(), "a").await.unwrap(), Deletion::Deleted);
    assert!(index(store.as_ref()).await.is_empty());
    assert_eq!(waiting(store.as_ref()).await, Vec::<String>::new());
}

#[tokio::test]
async fn open_rebuilds_an_index_out_of_step_with_the_stored_vnfs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    {
        let (c, store) = open(&path).await;
        create(&c, "placed", 1, false).await;
        c.schedule_pending().await.unwrap();
        for name in ["w1", "w2", "w3"] {
            create(&c, name, 1, false).await;
        }
        // As a store written before the index existed: no entries; and two stray ones.
        for name in ["w1", "w2", "w3"] {
            store.delete(&records::pending_key(name)).await.unwrap();
        }
        store
            .put(&records::pending_key("placed"), Vec::new())
            .await
            .unwrap();
        store
            .put(&records::pending_key("ghost"), Vec::new())
            .await
            .unwrap();
    }
    let (c, store) = open(&path).await;
    assert_eq!(index(store.as_ref()).await, ["w1", "w2", "w3"]);
    assert_eq!(waiting(store.as_ref()).await, ["w1", "w2", "w3"]);
    c.schedule_pending().await.unwrap();
    assert!(index(store.as_ref()).await.is_empty());
    for name in ["w1", "w2", "w3"] {
        assert_eq!(c.vnf(&admin(), name).await.unwrap().phase, Phase::Scheduled);
    }
}

/// The names `assignments(host)` would hold if it read every VNF: placed there, not Pending.
async fn assigned_by_scan(store: &dyn Store, host: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (_, v) in store.list(records::VNFS).await.unwrap() {
        let r: VnfRecord = serde_json::from_slice(&v.value).unwrap();
        if r.vnf.phase != Phase::Pending
            && telvirt_controller::placement::placement_on(&r.vnf, host).is_some()
        {
            out.push(r.vnf.name.to_string());
        }
    }
    out
}

async fn assigned(c: &Controller, host: &str) -> Vec<String> {
    c.assignments(host)
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.vnf.to_string())
        .collect()
}

#[tokio::test]
async fn assignments_read_only_the_hosts_own_vnfs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    {
        let (c, store) = open(&path).await;
        let mut h2 = host();
        h2.spec.name = "h2".into();
        c.register_host(h2).await.unwrap();
        for i in 0..40 {
            create(&c, &format!("vnf{i:02}"), 1, true).await;
        }
        create(&c, "big", 64, false).await;
        c.schedule_pending().await.unwrap();
        let mut total = 0;
        for h in ["h1", "h2"] {
            let want = assigned_by_scan(store.as_ref(), h).await;
            total += want.len();
            store.take_reads();
            assert_eq!(assigned(&c, h).await, want, "host {h}");
            let (lists, gets) = store.take_reads();
            assert_eq!(lists, [records::assignments_prefix(h)]);
            let vnf_reads = gets.iter().filter(|k| k.starts_with(records::VNFS)).count();
            assert_eq!(vnf_reads, want.len(), "read {gets:?}");
            // The owner's record once, not every authority.
            let authority_reads = gets
                .iter()
                .filter(|k| k.starts_with(records::AUTHORITIES))
                .count();
            assert!(authority_reads <= 1, "read {gets:?}");
        }
        assert_eq!(total, 40, "every placed VNF is assigned to one host");
        assert!(assigned(&c, "nowhere").await.is_empty());

        // Deleting a placed VNF takes its entry with it.
        let (victim, on) = if assigned(&c, "h1").await.is_empty() {
            (assigned(&c, "h2").await[0].clone(), "h2")
        } else {
            (assigned(&c, "h1").await[0].clone(), "h1")
        };
        c.delete(&admin(), &victim).await.unwrap();
        let keys = store
            .list(&records::assignments_prefix(on))
            .await
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect::<Vec<_>>();
        assert!(
            !keys.contains(&records::assignment_key(on, &victim)),
            "{keys:?}"
        );

        // As a store written before the index: no entries; and a stray one.
        for (k, _) in store.list(records::ASSIGNMENTS).await.unwrap() {
            store.delete(&k).await.unwrap();
        }
        store
            .put(&records::assignment_key("h1", "ghost"), Vec::new())
            .await
            .unwrap();
    }
    let (c, store) = open(&path).await;
    for h in ["h1", "h2"] {
        assert_eq!(
            assigned(&c, h).await,
            assigned_by_scan(store.as_ref(), h).await,
            "host {h} after the rebuild"
        );
    }
    assert!(
        store
            .get(&records::assignment_key("h1", "ghost"))
            .await
            .unwrap()
            .is_none()
    );
}

/// A pass that finds a VNF placed whose stored cores its scheduler does not hold (here: placed
/// by another controller over the same store after this one opened, its index entry left, as
/// a placement applied late after a store error leaves it) holds them again: the next VNF is
/// given other cores.
#[tokio::test]
async fn a_pass_holds_the_cores_of_a_placement_its_scheduler_did_not_know() {
    let dir = tempfile::tempdir().unwrap();
    let (first, second, store) = two_controllers(&dir).await;
    create(&first, "fw1", 1, false).await;
    first.schedule_pending().await.unwrap();
    store
        .put(&records::pending_key("fw1"), Vec::new())
        .await
        .unwrap();
    second.schedule_pending().await.unwrap();
    assert!(index(store.as_ref()).await.is_empty());
    fw2_placed_beside_fw1(&second, store.as_ref()).await;
}

/// A placement whose transaction loses its race to another placement of the same VNF (here a
/// second controller's, as a transaction applied late is): the loser's scheduler holds the
/// cores the store holds for the VNF, not the ones it had picked, and the next VNF is given
/// other cores.
#[tokio::test]
async fn a_placement_that_lost_to_another_of_its_vnf_holds_the_stored_cores() {
    let dir = tempfile::tempdir().unwrap();
    let (first, second, store) = two_controllers(&dir).await;
    create(&second, "fw1", 1, false).await;
    // The second controller's commit waits in the store while the first places fw1.
    *store.hold_write.lock().unwrap() = Some(records::allocation_key("fw1"));
    let pass = tokio::spawn({
        let second = second.clone();
        async move { second.schedule_pending().await }
    });
    store.held.notified().await;
    first.schedule_pending().await.unwrap();
    store.go_on.notify_one();
    pass.await.unwrap().unwrap();
    fw2_placed_beside_fw1(&second, store.as_ref()).await;
}

/// Two controllers over one store in `dir` (with h1), the second opened after the first.
async fn two_controllers(
    dir: &tempfile::TempDir,
) -> (Arc<Controller>, Arc<Controller>, Arc<HookedStore>) {
    let (first, store) = open(&dir.path().join("store.redb")).await;
    let second = Controller::open(store.clone(), config()).await.unwrap();
    (first, second, store)
}

/// Places a new VNF fw2 through `c` and checks it got other cores than fw1 and the store is
/// consistent.
async fn fw2_placed_beside_fw1(c: &Controller, store: &dyn Store) {
    create(c, "fw2", 1, false).await;
    c.schedule_pending().await.unwrap();
    let mut cpus = Vec::new();
    for name in ["fw1", "fw2"] {
        let v = c.vnf(&admin(), name).await.unwrap();
        assert_eq!(v.phase, Phase::Scheduled, "{v:?}");
        cpus.push(
            v.placements
                .iter()
                .flat_map(|p| p.cpus())
                .collect::<Vec<u32>>(),
        );
    }
    let (a, b) = (&cpus[0], &cpus[1]);
    assert!(
        !a.is_empty() && a.iter().all(|c| !b.contains(c)),
        "fw1 on {a:?}, fw2 on {b:?}"
    );
    let report = telvirt_controller::consistency::check(store, config())
        .await
        .unwrap();
    assert!(report.is_consistent(), "{report:?}");
}
