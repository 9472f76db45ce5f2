//! Agent wake-ups through the in-process link: a change of a host's assignments that arrives
//! while its agent is not waiting (busy in a pass) ends the next `wait_for_change` at once; a
//! change on another host, or a phase report, wakes nobody. A placement the store applied but
//! answered with an error wakes its agent too, and keeps its cores.

use crate::common;

use std::time::Duration;

use common::{host_record, observation};
use telvirt_agent::ControlLink;
use telvirt_controller::{Caller, Controller, LocalLink};
use telvirt_model::api::Observation;
use telvirt_model::{Format, Phase};
use telvirt_sched::SchedConfig;
use telvirt_store::RedbStore;

/// Far longer than the test may take: a wait that lasts this long means the wake-up was lost.
const FOREVER: Duration = Duration::from_secs(3600);
const DEADLINE: Duration = Duration::from_secs(20);
/// How long a wait that should not end is given to end anyway.
const QUIET: Duration = Duration::from_millis(50);

#[tokio::test]
async fn a_hosts_agent_is_woken_by_its_own_assignments_only_and_keeps_a_wake_up_it_was_busy_for() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(&dir.path().join("store.redb")).unwrap();
    let controller = Controller::open(store, SchedConfig::default())
        .await
        .unwrap();
    controller.register_host(host_record("h1")).await.unwrap();
    let h1 = LocalLink::new(controller.clone(), "h1");
    let h2 = LocalLink::new(controller.clone(), "h2");
    // Nothing changed yet: a wait lasts its full time and says so.
    assert!(!h1.wait_for_change(Duration::from_millis(1)).await);

    // A create places nothing yet: no agent is woken.
    let admin = Caller {
        name: telvirt_model::api::ADMIN_AUTHORITY.into(),
    };
    let text = "apiVersion: telvirt/v1\nkind: Vnf\nmetadata: { name: fw1 }\nspec:\n  runtime: vm\n  vm: { memory: 64MiB }\n";
    controller
        .create_vnf(&admin, text.as_bytes(), Format::Yaml)
        .await
        .unwrap();
    assert!(!h1.wait_for_change(QUIET).await, "a create woke h1's agent");

    // The agent is "in a pass" (not waiting) while fw1 is placed on h1.
    controller.schedule_pending().await.unwrap();
    let changed = tokio::time::timeout(DEADLINE, h1.wait_for_change(FOREVER))
        .await
        .expect("the placement made before the wait ends it at once");
    assert!(changed, "a wait ended by a change says so");
    // Seen once: the wait after it lasts again.
    let again = tokio::time::timeout(QUIET, h1.wait_for_change(FOREVER));
    assert!(again.await.is_err(), "one change woke the link twice");
    // Another host's agent was never woken.
    assert!(
        !h2.wait_for_change(QUIET).await,
        "h1's placement woke h2's agent"
    );

    // A phase report changes no assignment: it wakes nobody.
    let generation = controller
        .assignments("h1")
        .await
        .unwrap()
        .first()
        .expect("fw1 is assigned to h1")
        .generation;
    controller
        .observe(
            "h1",
            Observation {
                vnf: "fw1".parse().unwrap(),
                phase: Phase::Starting,
                reason: "starting".into(),
                generation,
                replication: None,
                active_lost: None,
                ..observation("x", Phase::Running)
            },
        )
        .await
        .unwrap();
    assert!(
        !h1.wait_for_change(QUIET).await,
        "a phase report woke the agent"
    );

    // A stop changes the assignment: h1 is woken.
    controller.stop(&admin, "fw1").await.unwrap();
    assert!(h1.wait_for_change(DEADLINE).await);
}

/// A placement the store applied but answered with an error: its cores are not given to
/// another VNF (the store holds them for the first), and its host's agent is woken as after
/// any placement.
#[tokio::test]
async fn a_placement_stored_despite_an_error_keeps_its_cores_and_wakes_its_agent() {
    let dir = tempfile::tempdir().unwrap();
    let store = common::hooked_store::HookedStore::open(&dir.path().join("store.redb"));
    let controller = Controller::open(store.clone(), SchedConfig::default())
        .await
        .unwrap();
    controller.register_host(host_record("h1")).await.unwrap();
    let h1 = LocalLink::new(controller.clone(), "h1");
    let admin = Caller {
        name: telvirt_model::api::ADMIN_AUTHORITY.into(),
    };
    let create = |name: &str| {
        let text = format!(
            "apiVersion: telvirt/v1\nkind: Vnf\nmetadata: {{ name: {name} }}\nspec:\n  runtime: vm\n  vm: {{ memory: 64MiB }}\n"
        );
        let controller = controller.clone();
        let admin = admin.clone();
        async move {
            controller
                .create_vnf(&admin, text.as_bytes(), Format::Yaml)
                .await
                .unwrap();
        }
    };
    create("fw1").await;
    store
        .unanswered_txn
        .store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(controller.schedule_pending().await.is_err());
    assert!(
        !store
            .unanswered_txn
            .load(std::sync::atomic::Ordering::SeqCst)
    );
    let fw1 = controller.vnf(&admin, "fw1").await.unwrap();
    assert_eq!(fw1.phase, Phase::Scheduled, "{fw1:?}");
    let changed = tokio::time::timeout(DEADLINE, h1.wait_for_change(FOREVER))
        .await
        .expect("the stored placement woke no agent");
    assert!(changed);
    // The next VNF gets other cores than the ones the store holds for fw1.
    create("fw2").await;
    controller.schedule_pending().await.unwrap();
    let fw2 = controller.vnf(&admin, "fw2").await.unwrap();
    assert_eq!(fw2.phase, Phase::Scheduled, "{fw2:?}");
    let cpus = |v: &telvirt_model::Vnf| -> Vec<u32> {
        v.placements.iter().flat_map(|p| p.cpus()).collect()
    };
    let (a, b) = (cpus(&fw1), cpus(&fw2));
    assert!(!a.is_empty() && !b.is_empty(), "{fw1:?} {fw2:?}");
    assert!(
        a.iter().all(|c| !b.contains(c)),
        "fw1 on {a:?}, fw2 on {b:?}"
    );
    let report = telvirt_controller::consistency::check(store.as_ref(), SchedConfig::default())
        .await
        .unwrap();
    assert!(report.is_consistent(), "{report:?}");
}
