//! Host failure detection does not wait for the store: the leading controller hears every
//! heartbeat, and a host heard from that sends nothing for one TTL is NotReady at once (its
//! VNFs Unknown, woken by the coming silence rather than a periodic pass) even while the store
//! still holds its lease, as etcd does for up to 1.5 s after a 1 s lease runs out. The store
//! here grants every lease for a minute, so only the controller's clock can notice. And a
//! liveness pass cut short after it made a VNF Unknown does not let the next passes skip it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common;
use crate::common::hooked_store::HookedStore;
use telvirt_controller::records::{host_lease_key, vnf_key};
use telvirt_controller::{Caller, Controller};
use telvirt_model::Format;
use telvirt_model::Phase;
use telvirt_model::api::Observation;
use telvirt_sched::SchedConfig;
use telvirt_store::Store;

/// A real redb store whose leases last a minute whatever TTL is asked (with the shared
/// hooks: refuse or hold a chosen write).
fn minute_leases(dir: &tempfile::TempDir) -> Arc<HookedStore> {
    HookedStore::with_lease_ttl(&dir.path().join("store.redb"), Duration::from_secs(60))
}

/// A controller over `store` with a 300 ms host lease and host h2 registered, and its admin.
async fn controller_with_h2(store: Arc<HookedStore>) -> (Arc<Controller>, Caller) {
    let c = Controller::open(store, SchedConfig::default())
        .await
        .unwrap();
    c.set_host_lease_ttl(Duration::from_millis(300)).unwrap();
    c.register_host(common::host_record("h2")).await.unwrap();
    let admin = Caller {
        name: "admin".into(),
    };
    (c, admin)
}

/// The descriptor of wasm VNF `name` (one dedicated cpu).
fn wasm_text(name: &str) -> String {
    format!(
        "apiVersion: telvirt/v1\nkind: Vnf\nmetadata: {{ name: {name} }}\nspec:\n  runtime: wasm\n  cpu: {{ policy: dedicated, count: 1 }}\n  wasm:\n    module: /srv/telvirt/fw.wasm\n"
    )
}

/// Creates wasm VNF `name` (one dedicated cpu).
async fn create(c: &Controller, admin: &Caller, name: &str) {
    c.create_vnf(admin, wasm_text(name).as_bytes(), Format::Yaml)
        .await
        .unwrap();
}

/// Plays h2's agent reporting VNF `name` Starting, then Running.
async fn report_running(c: &Controller, admin: &Caller, name: &str) {
    let generation = c.vnf(admin, name).await.unwrap().generation;
    for phase in [Phase::Starting, Phase::Running] {
        let obs = Observation {
            vnf: name.parse().unwrap(),
            phase,
            reason: "started".into(),
            generation,
            ..common::observation("x", Phase::Running)
        };
        c.observe("h2", obs).await.unwrap();
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
    let store = minute_leases(&dir);
    let (c, admin) = controller_with_h2(store.clone()).await;
    // The periodic pass is an hour apart: only the coming silence can wake the monitor.
    tokio::spawn(c.clone().host_monitor(Duration::from_secs(3600)));
    let beating = {
        let c = c.clone();
        tokio::spawn(async move {
            loop {
                c.heartbeat("h2").await.unwrap();
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    create(&c, &admin, "u1").await;
    // Placed once the monitor has seen h2's lease (a host is placeable only while Ready).
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.vnf(&admin, "u1").await.unwrap().placements.is_empty() {
        assert!(Instant::now() < deadline, "u1 was never placed");
        c.schedule_pending().await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    report_running(&c, &admin, "u1").await;
    // Ready while it beats (polled: a beat late past the 300 ms lease on a loaded machine
    // makes it NotReady for a moment, and the next beat Ready again).
    let deadline = Instant::now() + Duration::from_secs(20);
    while status(&c, &admin, "h2").await != "Ready" {
        assert!(
            Instant::now() < deadline,
            "h2 never was Ready while it beat"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pass_cut_short_after_it_made_a_vnf_unknown_leaves_the_next_pass_to_bring_it_back() {
    let dir = tempfile::tempdir().unwrap();
    let store = minute_leases(&dir);
    let (c, admin) = controller_with_h2(store.clone()).await;
    // The passes run here, one at a time, no monitor.
    c.heartbeat("h2").await.unwrap();
    c.check_hosts().await.unwrap();
    for name in ["u1", "u2"] {
        create(&c, &admin, name).await;
    }
    c.schedule_pending().await.unwrap();
    for name in ["u1", "u2"] {
        report_running(&c, &admin, name).await;
    }
    // Every host Ready: the passes after this complete one may skip the VNFs. (A beat just
    // before: the writes above may outlast the 300 ms lease on a loaded machine, and a pass
    // that found h2 silent already made the VNFs Unknown; the next beat's pass brings them
    // back.)
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        c.heartbeat("h2").await.unwrap();
        c.check_hosts().await.unwrap();
        let mut running = true;
        for name in ["u1", "u2"] {
            running &= c.vnf(&admin, name).await.unwrap().phase == Phase::Running;
        }
        if running {
            break;
        }
        assert!(Instant::now() < deadline, "u1 and u2 never both Running");
    }

    // h2 falls silent. The pass that sees it makes u1 Unknown, then the store refuses u2's
    // write: the pass ends there.
    *store.fail_write.lock().unwrap() = Some(vnf_key("u2"));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match c.check_hosts().await {
            Err(e) => {
                assert!(e.to_string().contains("the test refuses"), "{e}");
                break;
            }
            Ok(()) => {
                assert!(Instant::now() < deadline, "h2 never fell silent");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    assert_eq!(c.vnf(&admin, "u1").await.unwrap().phase, Phase::Unknown);
    assert_eq!(c.vnf(&admin, "u2").await.unwrap().phase, Phase::Running);
    // An event while u1 stays Unknown (an applied label: Unknown to Unknown) is not the phase
    // it comes back to.
    let labelled = wasm_text("u1").replace(
        "metadata: { name: u1 }",
        "metadata: { name: u1, labels: { tier: edge } }",
    );
    c.apply_vnf(&admin, "u1", labelled.as_bytes(), Format::Yaml, false)
        .await
        .unwrap();
    let events = c.events(&admin, "u1").await.unwrap();
    let last = events.last().unwrap();
    assert_eq!(
        (last.from, last.to),
        (Some(Phase::Unknown), Phase::Unknown),
        "{last:?}"
    );

    // h2 is heard again, every host Ready as at the last complete pass: the next pass still
    // looks, and u1 is known again.
    c.heartbeat("h2").await.unwrap();
    c.check_hosts().await.unwrap();
    let u1 = c.vnf(&admin, "u1").await.unwrap();
    assert_eq!(u1.phase, Phase::Running, "{u1:?}");
    assert!(
        u1.reason.as_deref().unwrap_or("").contains("Ready again"),
        "{u1:?}"
    );
    assert_eq!(c.vnf(&admin, "u2").await.unwrap().phase, Phase::Running);
}

/// A liveness pass does not judge a host between its heartbeat's record of itself and the
/// write of its lease: one that did (its lease had lapsed, as in a leader's handover) found a
/// host that had just spoken without a lease and made its VNFs Unknown. The lease's write is
/// held here while a pass runs: the pass waits for it, and the host stays Ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pass_does_not_judge_a_host_while_its_heartbeat_writes_its_lease() {
    let dir = tempfile::tempdir().unwrap();
    let store = minute_leases(&dir);
    let (c, admin) = controller_with_h2(store.clone()).await;
    c.heartbeat("h2").await.unwrap();
    c.check_hosts().await.unwrap();
    create(&c, &admin, "u1").await;
    c.schedule_pending().await.unwrap();
    report_running(&c, &admin, "u1").await;
    // The lease lapses; the next heartbeat grants a new one, whose write is held.
    let lease = store.get(&host_lease_key("h2")).await.unwrap().unwrap();
    store.revoke(lease.lease.unwrap()).await.unwrap();
    *store.hold_write.lock().unwrap() = Some(host_lease_key("h2"));
    let beat = tokio::spawn({
        let c = c.clone();
        async move { c.heartbeat("h2").await }
    });
    store.held.notified().await;
    let pass = tokio::spawn({
        let c = c.clone();
        async move { c.check_hosts().await }
    });
    // Time enough for a pass to list the leases and judge.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !pass.is_finished(),
        "the pass judged h2 while its heartbeat wrote its lease: {:?}",
        c.vnf(&admin, "u1").await.unwrap()
    );
    store.go_on.notify_one();
    beat.await.unwrap().unwrap();
    pass.await.unwrap().unwrap();
    assert_eq!(status(&c, &admin, "h2").await, "Ready");
    assert_eq!(c.vnf(&admin, "u1").await.unwrap().phase, Phase::Running);
}
