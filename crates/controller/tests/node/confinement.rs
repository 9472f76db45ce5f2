//! Confinement of cores and names (issue #12, items 5 and 6).
//!
//! No core leaks: a storm of concurrent creates and deletes while scheduling passes run, random
//! interleavings of create / delete / scheduling pass / restart (proptest), a stale allocation
//! from an older VNF of the same name, and an orphan allocation left by an older version. After
//! each, the ledger holds: every allocation belongs to an existing VNF and was made for its
//! current request, every CPU is held once, and the controller's in-memory scheduler equals
//! what the store says (the core map it renders equals the one rebuilt from the store alone).
//!
//! No names across authorities: host lists, host views and core maps show an authority its own
//! VNFs and groups by name and every other holder only as in use; admin sees all; a refused
//! network names no other authority's network.

use crate::common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::Node;
use proptest::prelude::*;
use serde_json::Value;
use telvirt_controller::placement;
use telvirt_controller::records::{self, VnfRecord, allocation_key, event_key, vnf_key};
use telvirt_controller::{Caller, Controller, ControllerError, Deletion, HostRecord};
use telvirt_model::api::CreateAuthority;
use telvirt_model::{Format, HostGrants, Phase};
use telvirt_sched::coremap::{host_map, render_host_map};
use telvirt_sched::{Allocation, CpuPolicy, HostSpec, SchedConfig, Scheduler};
use telvirt_store::{Op, RedbStore, Store};

fn caller(name: &str) -> Caller {
    Caller { name: name.into() }
}

fn admin() -> Caller {
    caller("admin")
}

/// A wasm VNF of one worker: dedicated, or in the shared group `group` of its owner.
fn descriptor(name: &str, group: Option<&str>) -> String {
    let cpu = match group {
        Some(g) => format!("{{ policy: shared, count: 1, group: {g} }}"),
        None => "{ policy: dedicated, count: 1 }".to_owned(),
    };
    format!(
        "apiVersion: telvirt/v1\nkind: Vnf\nmetadata: {{ name: {name} }}\nspec:\n  runtime: wasm\n  cpu: {cpu}\n  ports: [in, out]\n  wasm:\n    module: {MODULES}fw.wasm\n    limits: {{ memory: 16MiB }}\n"
    )
}

/// Where the test VNFs' module file is said to be (granted to both authorities; no agent runs it).
const MODULES: &str = "/srv/telvirt/";

/// The module directory and the `veth*` interfaces.
fn grants() -> HostGrants {
    HostGrants {
        paths: [MODULES.to_owned()].into(),
        interfaces: ["veth*".to_owned()].into(),
        ..HostGrants::default()
    }
}

/// Creates the authorities of [`OWNERS`], each granted the module directory and `veth*`.
async fn authorities(c: &Controller) {
    for (name, _) in OWNERS {
        let request = CreateAuthority {
            name: name.parse().unwrap(),
            domain: None,
        };
        c.create_authority(&admin(), &request).await.unwrap();
        c.grant(&admin(), name, &grants()).await.unwrap();
    }
}

/// A host without an agent, so placed VNFs stay Scheduled and deletes need no agent.
fn host(spec: HostSpec) -> HostRecord {
    HostRecord {
        qemu_machines: Vec::new(),
        accel: None,
        cpu: None,
        spec,
        memory_bytes: 0,
        hugepages: Vec::new(),
        runtimes: Vec::new(),
        agent: false,
        tunnel: None,
        qemu: None,
    }
}

/// A controller over the store file `path`, its hosts registered (again).
async fn open(path: &Path, hosts: &[HostSpec]) -> (Arc<Controller>, Arc<RedbStore>) {
    let store = RedbStore::open(path).unwrap();
    let controller = Controller::open(store.clone(), SchedConfig::default())
        .await
        .unwrap();
    for h in hosts {
        controller.register_host(host(h.clone())).await.unwrap();
    }
    if controller.read_grants(OWNERS[0].0).await.unwrap().revision == 0 {
        authorities(&controller).await;
    }
    (controller, store)
}

/// Every stored VNF and allocation, by name.
async fn stored(store: &dyn Store) -> (BTreeMap<String, VnfRecord>, BTreeMap<String, Allocation>) {
    let mut vnfs = BTreeMap::new();
    for (key, v) in store.list(records::VNFS).await.unwrap() {
        let r: VnfRecord = serde_json::from_slice(&v.value).unwrap();
        assert_eq!(key, vnf_key(r.vnf.name.as_str()));
        vnfs.insert(r.vnf.name.to_string(), r);
    }
    let mut allocs = BTreeMap::new();
    for (key, v) in store.list(records::ALLOCATIONS).await.unwrap() {
        let a: Allocation = serde_json::from_slice(&v.value).unwrap();
        assert_eq!(key, allocation_key(&a.request.name));
        allocs.insert(a.request.name.clone(), a);
    }
    (vnfs, allocs)
}

/// Who holds a cpu: one VNF alone, or a shared group of one authority.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Holder {
    Vnf(String),
    Group(String, String),
}

/// The ledger invariant; panics with what broke. Needs a quiet controller (no pass running).
async fn check_ledger(controller: &Controller, store: &dyn Store, hosts: &[HostSpec]) {
    let (vnfs, allocs) = stored(store).await;
    let mut held: BTreeMap<(String, u32), Holder> = BTreeMap::new();
    for (name, alloc) in &allocs {
        let Some(record) = vnfs.get(name) else {
            panic!("allocation {name} belongs to no VNF (a leak): {alloc:?}");
        };
        let vnf = &record.vnf;
        assert_eq!(
            alloc.request,
            placement::vnf_request(vnf),
            "allocation {name} was made for another request than its VNF's"
        );
        assert_ne!(
            vnf.phase,
            Phase::Pending,
            "{name} is Pending but holds cores"
        );
        assert_eq!(
            vnf.placements,
            placement::placements(&alloc.placement, &vnf.descriptor),
            "{name}: the VNF's placements differ from its allocation"
        );
        let req = &alloc.request;
        for role in std::iter::once(&alloc.placement.act).chain(&alloc.placement.sby) {
            let holder = match (&req.cpu.policy, &req.cpu.group) {
                (CpuPolicy::Shared, Some(g)) => Holder::Group(req.authority.clone(), g.clone()),
                _ => Holder::Vnf(name.clone()),
            };
            let mut cpus: Vec<u32> = role
                .exclusive_cpus(req.cpu.policy, req.emulator)
                .cpus()
                .to_vec();
            if req.cpu.policy == CpuPolicy::Shared {
                cpus.extend(role.cpus.iter().flat_map(|c| c.cpus().iter().copied()));
            }
            cpus.sort_unstable();
            cpus.dedup();
            for cpu in cpus {
                let h = if req.cpu.policy == CpuPolicy::Shared && !role.held.cpus().contains(&cpu) {
                    holder.clone()
                } else {
                    Holder::Vnf(name.clone())
                };
                if let Some(before) = held.insert((role.host.clone(), cpu), h.clone())
                    && (before != h || matches!(h, Holder::Vnf(_)))
                {
                    panic!(
                        "cpu {cpu} of {} is held twice: {before:?} and {h:?}",
                        role.host
                    );
                }
            }
        }
    }
    for (name, r) in &vnfs {
        if r.vnf.phase != Phase::Pending {
            assert!(
                allocs.contains_key(name),
                "{name} is {:?} without an allocation",
                r.vnf.phase
            );
        }
    }
    // The store alone, restored into a fresh scheduler (which refuses a cpu taken twice), must
    // render the same core maps as the controller's in-memory scheduler.
    let mut fresh = Scheduler::new(SchedConfig::default()).unwrap();
    for h in hosts {
        fresh.add_host(h.clone()).unwrap();
    }
    for alloc in allocs.values() {
        fresh
            .restore(alloc)
            .unwrap_or_else(|e| panic!("the stored allocations do not restore: {e}"));
    }
    for h in hosts {
        let from_store = render_host_map(&host_map(&fresh, &h.name).unwrap());
        let in_memory = controller.host_core_map(&admin(), &h.name).await.unwrap();
        assert_eq!(
            in_memory, from_store,
            "the scheduler differs from the store"
        );
    }
}

/// A small deterministic generator (splitmix64): the storm is the same for the same seed.
struct Dice(u64);

impl Dice {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const OWNERS: [(&str, &str); 2] = [("alice", "rg"), ("bob", "bg")];

/// Creates `name` for `owner` (dedicated, or in the owner's group); a name in use is no error.
async fn try_create(c: &Controller, name: &str, owner: usize, shared: bool) -> bool {
    let (who, group) = OWNERS[owner];
    let text = descriptor(name, shared.then_some(group));
    match c
        .create_vnf(&caller(who), text.as_bytes(), Format::Yaml)
        .await
    {
        Ok(_) => true,
        Err(ControllerError::Conflict(_)) => false,
        Err(e) => panic!("create {name} as {who}: {e}"),
    }
}

/// Deletes `name` as `who`; gone already, not visible to `who`, or still changing is no error.
async fn try_delete(c: &Controller, name: &str, who: &str) -> bool {
    match c.delete(&caller(who), name).await {
        Ok(Deletion::Deleted) => true,
        Ok(Deletion::Pending(v)) => panic!("{name} runs nowhere, yet its delete waits: {v:?}"),
        Err(ControllerError::NotFound(_) | ControllerError::Conflict(_)) => false,
        Err(e) => panic!("delete {name} as {who}: {e}"),
    }
}

/// Three hosts of 2 sockets x 64 cores: 378 dedicated cpus, so hundreds of VNFs fit.
fn big_hosts() -> Vec<HostSpec> {
    (1..=3)
        .map(|i| HostSpec::synthetic(format!("big{i}"), 2, 64, 1))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn storm_of_creates_and_deletes_leaks_no_core() {
    const WORKERS: u64 = 6;
    const OPS: u64 = 160;
    const NAMES: u64 = 300;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let hosts = big_hosts();
    let (controller, store) = open(&path, &hosts).await;

    let stop = Arc::new(AtomicBool::new(false));
    let mut passes = Vec::new();
    for _ in 0..2 {
        let (c, stop) = (controller.clone(), stop.clone());
        passes.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                c.schedule_pending().await.unwrap();
                n += 1;
                tokio::task::yield_now().await;
            }
            n
        }));
    }
    let mut workers = Vec::new();
    for w in 0..WORKERS {
        let c = controller.clone();
        workers.push(tokio::spawn(async move {
            let mut dice = Dice(0x5eed ^ (w << 32));
            let (mut created, mut deleted) = (0u64, 0u64);
            for op in 0..OPS {
                let name = format!("v{}", dice.below(NAMES));
                let owner = dice.below(2) as usize;
                let who = if dice.below(2) == 0 {
                    "admin"
                } else {
                    OWNERS[owner].0
                };
                match dice.below(8) {
                    0..=3 => {
                        created +=
                            u64::from(try_create(&c, &name, owner, dice.below(3) == 0).await);
                    }
                    // Created and deleted at once under a name never used again (so nothing
                    // later could hide a leak): a pass running meanwhile may have read it
                    // Pending, and must not place it after it is gone.
                    4 | 5 => {
                        let name = format!("t{w}-{op}");
                        if try_create(&c, &name, owner, dice.below(3) == 0).await {
                            created += 1;
                            for _ in 0..dice.below(16) {
                                tokio::task::yield_now().await;
                            }
                            deleted += u64::from(try_delete(&c, &name, OWNERS[owner].0).await);
                        }
                    }
                    _ => deleted += u64::from(try_delete(&c, &name, who).await),
                }
                tokio::task::yield_now().await;
            }
            (created, deleted)
        }));
    }
    let (mut created, mut deleted) = (0, 0);
    for w in workers {
        let (c, d) = w.await.unwrap();
        created += c;
        deleted += d;
    }
    stop.store(true, Ordering::Relaxed);
    let mut rounds = 0;
    for p in passes {
        rounds += p.await.unwrap();
    }
    assert!(
        created > 200 && deleted > 50,
        "the storm was too calm: {created} creates, {deleted} deletes"
    );
    assert!(rounds > 2, "scheduling passes did not run during the storm");

    // Whatever is left Pending with room is placed by one more quiet pass.
    controller.schedule_pending().await.unwrap();
    let (vnfs, allocs) = stored(store.as_ref()).await;
    assert_eq!(
        vnfs.len() as u64,
        created - deleted,
        "creates minus deletes"
    );
    assert!(allocs.len() > 100, "only {} VNFs hold cores", allocs.len());
    assert!(
        vnfs.values().all(|r| r.vnf.phase == Phase::Scheduled),
        "every VNF fits on these hosts and should be placed"
    );
    check_ledger(&controller, store.as_ref(), &hosts).await;

    // The same after a restart: what was stored restores, nothing is dropped or doubled.
    drop(controller);
    drop(store);
    let (controller, store) = open(&path, &hosts).await;
    let (again, allocs_again) = stored(store.as_ref()).await;
    assert_eq!(again.len(), vnfs.len());
    assert_eq!(allocs_again, allocs);
    check_ledger(&controller, store.as_ref(), &hosts).await;

    // Deleting everything frees every cpu.
    for name in again.keys() {
        assert!(try_delete(&controller, name, "admin").await, "{name}");
    }
    let (vnfs, allocs) = stored(store.as_ref()).await;
    assert!(vnfs.is_empty() && allocs.is_empty());
    assert!(
        store.list(records::EVENTS).await.unwrap().is_empty(),
        "events outlived their VNFs"
    );
    for h in &hosts {
        let map = controller.host_core_map(&admin(), &h.name).await.unwrap();
        assert!(map.contains(": 126 of 126 dedicated cpus free"), "{map}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_placement_is_not_adopted_by_a_new_vnf_of_the_same_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let hosts = vec![HostSpec::synthetic("h1", 1, 6, 1)];
    let (controller, store) = open(&path, &hosts).await;
    // alice's x in her shared group rg, placed.
    assert!(try_create(&controller, "x", 0, true).await);
    controller.schedule_pending().await.unwrap();
    let (vnfs, allocs) = stored(store.as_ref()).await;
    assert_eq!(vnfs["x"].vnf.phase, Phase::Scheduled);
    // What an older version left after a create/delete race: the VNF and its events gone,
    // its allocation still there.
    let mut ops = vec![Op::Delete { key: vnf_key("x") }];
    for seq in 1..=vnfs["x"].last_event {
        ops.push(Op::Delete {
            key: event_key("x", seq),
        });
    }
    store.txn(Vec::new(), ops).await.unwrap();
    // bob creates x, dedicated; the scheduler (as after a restart of that version) and the
    // store still hold alice's placement under that name.
    assert!(try_create(&controller, "x", 1, false).await);
    let before = controller.host_core_map(&admin(), "h1").await.unwrap();
    assert!(before.contains("group alice/rg"), "{before}");
    controller.schedule_pending().await.unwrap();

    let (vnfs, after) = stored(store.as_ref()).await;
    let x = &vnfs["x"].vnf;
    assert_eq!(x.owner.as_str(), "bob");
    assert_eq!(x.phase, Phase::Scheduled, "{x:?}");
    assert_eq!(after["x"].request.authority, "bob");
    assert_eq!(after["x"].request.cpu.policy, CpuPolicy::Dedicated);
    assert_ne!(after["x"], allocs["x"]);
    let map = controller.host_core_map(&admin(), "h1").await.unwrap();
    assert!(!map.contains("alice"), "the stale group is gone: {map}");
    assert!(map.contains("x/ACT vcpu0"), "{map}");
    check_ledger(&controller, store.as_ref(), &hosts).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_placement_adopted_from_another_vnf_is_dropped_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let hosts = vec![HostSpec::synthetic("h1", 1, 6, 1)];
    let (controller, store) = open(&path, &hosts).await;
    assert!(try_create(&controller, "x", 0, true).await);
    controller.schedule_pending().await.unwrap();
    let (vnfs, allocs) = stored(store.as_ref()).await;
    // What an older version did: alice's x went but not its allocation, bob created x
    // (dedicated) and the next pass adopted alice's group core for it.
    let mut ops = vec![Op::Delete { key: vnf_key("x") }];
    for seq in 1..=vnfs["x"].last_event {
        ops.push(Op::Delete {
            key: event_key("x", seq),
        });
    }
    store.txn(Vec::new(), ops).await.unwrap();
    assert!(try_create(&controller, "x", 1, false).await);
    let (vnfs, _) = stored(store.as_ref()).await;
    let mut adopted = vnfs["x"].clone();
    adopted.vnf.phase = Phase::Scheduled;
    adopted.vnf.placements = placement::placements(&allocs["x"].placement, &adopted.vnf.descriptor);
    store
        .put(&vnf_key("x"), serde_json::to_vec(&adopted).unwrap())
        .await
        .unwrap();
    drop(controller);
    drop(store);

    let (controller, store) = open(&path, &hosts).await;
    let (vnfs, allocs) = stored(store.as_ref()).await;
    assert!(
        allocs.is_empty(),
        "the foreign allocation was dropped: {allocs:?}"
    );
    let x = &vnfs["x"].vnf;
    assert_eq!(x.phase, Phase::Pending);
    assert!(x.placements.is_empty());
    assert!(
        x.reason
            .as_deref()
            .unwrap()
            .contains("made for another VNF"),
        "{x:?}"
    );
    let map = controller.host_core_map(&admin(), "h1").await.unwrap();
    assert!(!map.contains("alice"), "{map}");
    check_ledger(&controller, store.as_ref(), &hosts).await;
    controller.schedule_pending().await.unwrap();
    let (vnfs, allocs) = stored(store.as_ref()).await;
    assert_eq!(vnfs["x"].vnf.phase, Phase::Scheduled);
    assert_eq!(allocs["x"].request.authority, "bob");
    assert_eq!(allocs["x"].request.cpu.policy, CpuPolicy::Dedicated);
    check_ledger(&controller, store.as_ref(), &hosts).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_placement_restored_for_the_same_request_is_completed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let hosts = vec![HostSpec::synthetic("h1", 1, 6, 1)];
    let (controller, store) = open(&path, &hosts).await;
    // Two VNFs so the second's cpu is not the first free one a fresh placement would take.
    assert!(try_create(&controller, "a", 0, false).await);
    controller.schedule_pending().await.unwrap();
    assert!(try_create(&controller, "y", 0, false).await);
    controller.schedule_pending().await.unwrap();
    assert!(try_delete(&controller, "a", "alice").await);
    let (vnfs, allocs) = stored(store.as_ref()).await;
    // A crash of an older version between writing y's allocation and marking y Scheduled.
    let mut record = vnfs["y"].clone();
    record.vnf.phase = Phase::Pending;
    record.vnf.placements.clear();
    store
        .put(&vnf_key("y"), serde_json::to_vec(&record).unwrap())
        .await
        .unwrap();
    drop(controller);
    drop(store);
    let (controller, store) = open(&path, &hosts).await;
    controller.schedule_pending().await.unwrap();
    let (vnfs, after) = stored(store.as_ref()).await;
    assert_eq!(vnfs["y"].vnf.phase, Phase::Scheduled);
    assert_eq!(after["y"], allocs["y"], "the restored placement was kept");
    check_ledger(&controller, store.as_ref(), &hosts).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orphan_allocation_is_dropped_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let hosts = vec![HostSpec::synthetic("h1", 1, 6, 1)];
    let (controller, store) = open(&path, &hosts).await;
    assert!(try_create(&controller, "gone", 1, false).await);
    assert!(try_create(&controller, "kept", 1, true).await);
    controller.schedule_pending().await.unwrap();
    let (vnfs, _) = stored(store.as_ref()).await;
    let mut ops = vec![Op::Delete {
        key: vnf_key("gone"),
    }];
    for seq in 1..=vnfs["gone"].last_event {
        ops.push(Op::Delete {
            key: event_key("gone", seq),
        });
    }
    store.txn(Vec::new(), ops).await.unwrap();
    drop(controller);
    drop(store);
    let (controller, store) = open(&path, &hosts).await;
    let (vnfs, allocs) = stored(store.as_ref()).await;
    assert_eq!(
        allocs.keys().collect::<Vec<_>>(),
        ["kept"],
        "the orphan was dropped"
    );
    assert_eq!(vnfs.keys().collect::<Vec<_>>(), ["kept"]);
    let map = controller.host_core_map(&admin(), "h1").await.unwrap();
    assert!(!map.contains("gone"), "{map}");
    check_ledger(&controller, store.as_ref(), &hosts).await;
}

// ----- interleavings -----

#[derive(Debug, Clone)]
enum Step {
    Create {
        name: u8,
        owner: usize,
        shared: bool,
    },
    Delete {
        name: u8,
        as_admin: bool,
    },
    Pass,
    Restart,
    /// These steps at once, each on its own task.
    Together(Vec<Step>),
}

fn simple_step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (0u8..6, 0usize..2, any::<bool>())
            .prop_map(|(name, owner, shared)| Step::Create { name, owner, shared }),
        2 => (0u8..6, any::<bool>()).prop_map(|(name, as_admin)| Step::Delete { name, as_admin }),
        2 => Just(Step::Pass),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => simple_step(),
        1 => Just(Step::Restart),
        3 => prop::collection::vec(simple_step(), 2..6).prop_map(Step::Together),
    ]
}

/// Runs one step; what the owner table (name → owner index) should say afterwards is kept for
/// sequential steps (concurrent ones are checked against the store only).
async fn run(
    c: &Arc<Controller>,
    store: &dyn Store,
    step: &Step,
    owners: &mut BTreeMap<String, usize>,
) {
    match step {
        Step::Create {
            name,
            owner,
            shared,
        } => {
            let name = format!("n{name}");
            let made = try_create(c, &name, *owner, *shared).await;
            assert_eq!(made, !owners.contains_key(&name), "create {name}");
            owners.entry(name).or_insert(*owner);
        }
        Step::Delete { name, as_admin } => {
            let name = format!("n{name}");
            let Some(&owner) = owners.get(&name) else {
                assert!(!try_delete(c, &name, "admin").await);
                return;
            };
            let who = if *as_admin { "admin" } else { OWNERS[owner].0 };
            assert!(try_delete(c, &name, who).await, "delete {name} as {who}");
            owners.remove(&name);
        }
        Step::Pass => c.schedule_pending().await.unwrap(),
        Step::Restart => unreachable!("restarts are run by the caller"),
        Step::Together(steps) => {
            let mut tasks = Vec::new();
            for s in steps.clone() {
                let c = c.clone();
                tasks.push(tokio::spawn(async move {
                    match s {
                        Step::Create {
                            name,
                            owner,
                            shared,
                        } => {
                            try_create(&c, &format!("n{name}"), owner, shared).await;
                        }
                        Step::Delete { name, as_admin } => {
                            let who = if as_admin { "admin" } else { OWNERS[0].0 };
                            try_delete(&c, &format!("n{name}"), who).await;
                        }
                        _ => c.schedule_pending().await.unwrap(),
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
            // The table is rebuilt from the store: who owns what after a race is not decided
            // by the test.
            owners.clear();
            for (key, v) in store.list(records::VNFS).await.unwrap() {
                let r: VnfRecord = serde_json::from_slice(&v.value).unwrap();
                let owner = OWNERS
                    .iter()
                    .position(|o| o.0 == r.vnf.owner.as_str())
                    .unwrap();
                owners.insert(key.trim_start_matches(records::VNFS).to_owned(), owner);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn interleavings_keep_the_ledger(steps in prop::collection::vec(step(), 1..14)) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("store.redb");
            // 3 dedicated cpus: VNFs compete for room and some stay Pending.
            let hosts = vec![HostSpec::synthetic("h1", 1, 4, 1)];
            let (mut c, mut store) = open(&path, &hosts).await;
            let mut owners = BTreeMap::new();
            for s in &steps {
                if matches!(s, Step::Restart) {
                    drop(c);
                    drop(store);
                    (c, store) = open(&path, &hosts).await;
                } else {
                    run(&c, store.as_ref(), s, &mut owners).await;
                }
                check_ledger(&c, store.as_ref(), &hosts).await;
                let (vnfs, _) = stored(store.as_ref()).await;
                let names: Vec<&String> = vnfs.keys().collect();
                prop_assert_eq!(names, owners.keys().collect::<Vec<_>>());
            }
            Ok::<(), TestCaseError>(())
        })?;
    }
}

// ----- names across authorities -----

/// Grants both authorities of a [`Node`] what [`authorities`] grants.
async fn grant_both(node: &Node) {
    for (name, _) in OWNERS {
        node.controller
            .grant(&admin(), name, &grants())
            .await
            .unwrap();
    }
}

async fn placed(node: &Node, token: &str, name: &str) {
    node.wait_vnf(token, name, |v| v["phase"] != "Pending")
        .await;
}

fn in_use(view: &Value) -> usize {
    view["cpus"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["use"]["state"] == "in-use")
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_views_name_only_the_callers_own() {
    let node = Node::start().await;
    let alice = node.create_authority("alice").await;
    let bob = node.create_authority("bob").await;
    grant_both(&node).await;
    for (token, fw, light, group) in [
        (&alice, "alicefw", "alicelight", "rg"),
        (&bob, "bobfw", "boblight", "bg"),
    ] {
        assert_eq!(
            node.create_vnf(token, &descriptor(fw, None)).await.status,
            201
        );
        let shared = descriptor(light, Some(group));
        assert_eq!(node.create_vnf(token, &shared).await.status, 201);
        placed(&node, token, fw).await;
        placed(&node, token, light).await;
    }
    let own = |token: &str| {
        if token == alice {
            (["alicefw", "alicelight", "rg"], ["bob", "bg"])
        } else {
            (["bobfw", "boblight", "bg"], ["alice", "rg"])
        }
    };
    for token in [&alice, &bob] {
        let (mine, theirs) = own(token);
        let list = node.call("GET", "/v1/hosts", None, Some(token), None).await;
        assert_eq!(list.status, 200);
        let one = node
            .call("GET", "/v1/hosts/{name}", Some("h1"), Some(token), None)
            .await;
        assert_eq!(one.status, 200);
        assert_eq!(list.body[0], one.body);
        let text = one.body.to_string();
        for name in theirs {
            assert!(
                !text.contains(name),
                "{name} is shown to another authority: {text}"
            );
        }
        // Their dedicated cpu and their group's core, each as in use and nothing more.
        assert_eq!(in_use(&one.body), 2, "{text}");
        let cpus = one.body["cpus"].as_array().unwrap();
        let named = |n: &str| {
            cpus.iter()
                .any(|c| c["use"]["vnf"] == n || c["use"]["group"] == n)
        };
        assert!(
            named(mine[0]) && named(mine[2]),
            "own VNF and group by name: {text}"
        );

        let map = node
            .call(
                "GET",
                "/v1/hosts/{name}/coremap",
                Some("h1"),
                Some(token),
                None,
            )
            .await;
        assert_eq!(map.status, 200);
        let map = map.body.as_str().unwrap();
        for name in theirs {
            assert!(
                !map.contains(name),
                "{name} in the core map of another authority: {map}"
            );
        }
        assert_eq!(map.matches("in use").count(), 2, "{map}");
        assert!(map.contains(&format!("{}/ACT vcpu0", mine[0])), "{map}");
    }
    let all = node
        .call(
            "GET",
            "/v1/hosts/{name}",
            Some("h1"),
            Some(&node.admin),
            None,
        )
        .await;
    assert_eq!(in_use(&all.body), 0);
    let map = node
        .call(
            "GET",
            "/v1/hosts/{name}/coremap",
            Some("h1"),
            Some(&node.admin),
            None,
        )
        .await;
    let map = map.body.as_str().unwrap();
    for name in ["alicefw", "alice/rg", "bobfw", "bob/bg"] {
        assert!(map.contains(name), "admin sees {name}: {map}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_port_in_use_names_no_other_authoritys_network() {
    let node = Node::start().await;
    let alice = node.create_authority("alice").await;
    let bob = node.create_authority("bob").await;
    grant_both(&node).await;
    let node = &node;
    let network = |name: &str| {
        format!(
            "apiVersion: telvirt/v1\nkind: Network\nmetadata: {{ name: {name} }}\nspec:\n  nodes:\n    - {{ name: gen-{name}, kind: generator }}\n  links:\n    - gen-{name}.out -> host:veth5\n"
        )
    };
    let create = |token: &str, name: &str| {
        let body = network(name);
        let token = token.to_owned();
        async move { node.create_network(&token, &body).await }
    };
    assert_eq!(create(&alice, "alicenet").await.status, 201);
    let refused = create(&bob, "bobnet").await;
    assert_eq!(refused.status, 422, "{}", refused.body);
    let text = refused.body.to_string();
    assert!(text.contains("by another network"), "{text}");
    assert!(
        !text.contains("alice"),
        "bob's refusal names alice's network: {text}"
    );
    // Named with its host, the same interface is still taken.
    let pinned = network("bobnet").replace("host:veth5", "host:veth5@h1");
    let refused = node.create_network(&bob, &pinned).await;
    assert_eq!(refused.status, 422, "{}", refused.body);
    assert!(
        refused.body.to_string().contains("by another network"),
        "{}",
        refused.body
    );
    // The owner (and admin) are told which network holds it.
    let own = create(&alice, "alice2").await;
    assert_eq!(own.status, 422);
    assert!(
        own.body.to_string().contains("by network alicenet"),
        "{}",
        own.body
    );
    let admin = create(&node.admin, "adminnet").await;
    assert!(
        admin.body.to_string().contains("by network alicenet"),
        "{}",
        admin.body
    );
}
