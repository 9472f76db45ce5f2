//! Healing after a host failure, through the controller's liveness monitor: a VNF without a
//! standby moves to a Ready host once its host has been NotReady for the heal delay; an active
//! whose standby lives fails over at once (the standby is the active, a new standby is placed);
//! a VNF no host can take stays, Unknown, with the reason, and is back when its host is. After
//! each, the store is consistent (no CPU held twice, allocations match placements).

use crate::common;

use std::time::Duration;

use common::{Node, beat, host_record, observation, role_hosts, wasm_vnf};
use serde_json::Value;
use telvirt_controller::consistency;
use telvirt_controller::records::allocation_key;
use telvirt_model::Phase;
use telvirt_model::api::{ActiveLost, Observation};

/// A node with a 300 ms host lease, heal delay `heal_after`, its liveness monitor running,
/// hosts `hosts` registered with agents that beat (the handles stop them), h1 (the node's own
/// inventory host) cordoned.
async fn node_with(
    hosts: &[&str],
    heal_after: Option<Duration>,
) -> (Node, Vec<tokio::task::JoinHandle<()>>) {
    with_hosts(Node::start_monitored(heal_after).await, hosts).await
}

/// `node` with hosts `hosts` registered with agents that beat, h1 cordoned (as [`node_with`]).
async fn with_hosts(node: Node, hosts: &[&str]) -> (Node, Vec<tokio::task::JoinHandle<()>>) {
    node.cordon("h1").await;
    let mut beats = Vec::new();
    for h in hosts {
        node.controller.register_host(host_record(h)).await.unwrap();
        beats.push(beat(&node.controller, h));
    }
    (node, beats)
}

/// Creates the VNF u1 (no standby) on h2 or h3 and plays its agent reporting it Running:
/// (u1, its host, the other host).
async fn running_single(node: &Node) -> (Value, String, &'static str) {
    node.create_vnf(&node.admin, &wasm_vnf("u1")).await;
    let u1 = node
        .wait_vnf(&node.admin, "u1", |v| {
            v["placements"][0]["host"].is_string()
        })
        .await;
    let (_, from) = role_hosts(&u1)[0].clone();
    let to = if from == "h2" { "h3" } else { "h2" };
    running(node, &from, "u1").await;
    (u1, from, to)
}

/// Plays the agent of `host` reporting VNF `vnf` Running.
async fn running(node: &Node, host: &str, vnf: &str) {
    report(node, host, vnf, Phase::Running, "running").await;
}

/// Plays the agent of `host` reporting `phase` of its instance of VNF `vnf`.
async fn report(node: &Node, host: &str, vnf: &str, phase: Phase, reason: &str) {
    let v = node
        .wait_vnf(&node.admin, vnf, |v| v["phase"] != "Pending")
        .await;
    let generation = v["generation"].as_u64().unwrap();
    node.controller
        .observe(
            host,
            Observation {
                vnf: vnf.parse().unwrap(),
                phase,
                reason: reason.into(),
                generation,
                replication: None,
                active_lost: None,
                ..observation("x", Phase::Running)
            },
        )
        .await
        .unwrap();
}

/// The host of `v`'s instance in `role`.
fn role_host(v: &Value, role: &str) -> String {
    role_hosts(v)
        .into_iter()
        .find(|(r, _)| r == role)
        .unwrap()
        .1
}

/// Creates the active-standby VNF p1 and waits for both placements: (p1, active's host,
/// standby's host).
async fn placed_pair(node: &Node) -> (Value, String, String) {
    let pair = wasm_vnf("p1").replace("  ports:", "  redundancy: active-standby\n  ports:");
    assert_eq!(node.create_vnf(&node.admin, &pair).await.status, 201);
    let p1 = node
        .wait_vnf(&node.admin, "p1", |v| role_hosts(v).len() == 2)
        .await;
    let (act, sby) = (role_host(&p1, "active"), role_host(&p1, "standby"));
    (p1, act, sby)
}

/// The report of p1's running standby that no longer hears its active on `act`.
fn silent_standby(act: &str, generation: u64) -> Observation {
    Observation {
        vnf: "p1".parse().unwrap(),
        phase: Phase::Running,
        reason: "running as the standby".into(),
        generation,
        replication: None,
        active_lost: Some(ActiveLost {
            why: format!("nothing from {act} for 30 ms"),
            closed: false,
        }),
        ..observation("x", Phase::Running)
    }
}

async fn assert_consistent(node: &Node) {
    let report = consistency::check(node.store.as_ref(), telvirt_sched::SchedConfig::default())
        .await
        .unwrap();
    assert!(report.is_consistent(), "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vnf_without_a_standby_moves_off_a_failed_host_after_the_heal_delay() {
    let (node, mut beats) = node_with(&["h2", "h3"], Some(Duration::from_millis(500))).await;
    let (u1, from, to) = running_single(&node).await;
    let generation = u1["generation"].as_u64().unwrap();

    // The host's agent stops: NotReady, u1 Unknown, then (after the delay) moved.
    beats.remove(if from == "h2" { 0 } else { 1 }).abort();
    let u1 = node
        .wait_vnf(&node.admin, "u1", |v| v["placements"][0]["host"] == to)
        .await;
    assert_eq!(u1["phase"], "Scheduled", "{u1}");
    assert_eq!(u1["generation"].as_u64(), Some(generation + 1), "{u1}");
    let evs = node.events("u1").await;
    let last = evs.last().unwrap();
    assert_eq!(last["actor"], "healer", "{last}");
    assert!(
        last["reason"]
            .as_str()
            .unwrap()
            .contains(&format!("moved off failed host {from} to {to}")),
        "{last}"
    );
    assert!(
        evs.iter().any(|e| e["to"] == "Unknown"),
        "the host's failure was seen first: {evs:?}"
    );
    // The new host's agent is given it; the failed one's no longer.
    let names = |a: Vec<telvirt_model::api::Assignment>| -> Vec<String> {
        a.into_iter().map(|a| a.vnf.to_string()).collect()
    };
    assert_eq!(
        names(node.controller.assignments(to).await.unwrap()),
        ["u1"]
    );
    assert!(names(node.controller.assignments(&from).await.unwrap()).is_empty());
    assert_consistent(&node).await;
    for b in beats {
        b.abort();
    }
}

/// A heal whose record the store refuses (nothing of it applied) is not lost: the scheduler
/// holds what the store holds again (the failed host), and a later pass moves the VNF. Before,
/// the scheduler kept the unrecorded place, and every later pass found the VNF holding nothing
/// on the failed host to move: it stayed there for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heal_the_store_did_not_take_is_made_again_by_a_later_pass() {
    let (node, store) = Node::start_hooked().await;
    let monitored = Node::monitored(node, Some(Duration::from_millis(500)));
    let (node, mut beats) = with_hosts(monitored, &["h2", "h3"]).await;
    let (_, from, to) = running_single(&node).await;

    *store.fail_write.lock().unwrap() = Some(allocation_key("u1"));
    beats.remove(if from == "h2" { 0 } else { 1 }).abort();
    node.wait_vnf(&node.admin, "u1", |v| v["placements"][0]["host"] == to)
        .await;
    assert!(
        store.fail_write.lock().unwrap().is_none(),
        "the first heal's record was refused"
    );
    let evs = node.events("u1").await;
    assert!(
        evs.iter().any(|e| e["actor"] == "healer"
            && e["reason"]
                .as_str()
                .unwrap()
                .contains(&format!("moved off failed host {from} to {to}"))),
        "{evs:?}"
    );
    assert_consistent(&node).await;
    for b in beats {
        b.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_active_fails_over_to_its_standby_at_once_and_a_new_standby_is_placed() {
    // A heal delay far longer than the test: only the failover itself can move the pair.
    let (node, mut beats) = node_with(&["h2", "h3", "h4"], Some(Duration::from_secs(3600))).await;
    let (_, act, sby) = placed_pair(&node).await;
    running(&node, &act, "p1").await;

    let index = |h: &str| ["h2", "h3", "h4"].iter().position(|x| *x == h).unwrap();
    beats[index(&act)].abort();
    let p1 = node
        .wait_vnf(&node.admin, "p1", |v| {
            role_hosts(v).contains(&("active".to_owned(), sby.clone()))
        })
        .await;
    let now = role_hosts(&p1);
    let new_sby = &now.iter().find(|(r, _)| r == "standby").unwrap().1;
    assert!(new_sby != &act && new_sby != &sby, "{now:?}");
    let last = node.events("p1").await.pop().unwrap();
    assert_eq!(last["actor"], "healer", "{last}");
    assert!(
        last["reason"].as_str().unwrap().contains(&format!(
            "the standby is the active now (host {act} failed); new standby on {new_sby}"
        )),
        "{last}"
    );
    assert_consistent(&node).await;
    beats.drain(..).for_each(|b| b.abort());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vnf_no_host_can_take_stays_unknown_with_the_reason_until_its_host_is_back() {
    let (node, mut beats) = node_with(&["h2"], Some(Duration::from_millis(200))).await;
    node.create_vnf(&node.admin, &wasm_vnf("u1")).await;
    node.wait_vnf(&node.admin, "u1", |v| v["placements"][0]["host"] == "h2")
        .await;
    running(&node, "h2", "u1").await;
    beats.pop().unwrap().abort();
    let u1 = node
        .wait_vnf(&node.admin, "u1", |v| {
            v["phase"] == "Unknown"
                && v["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("no other host can take it now"))
        })
        .await;
    assert_eq!(role_hosts(&u1), [("active".to_owned(), "h2".to_owned())]);
    assert!(
        node.events("u1")
            .await
            .iter()
            .all(|e| e["actor"] != "healer"),
        "nothing moved"
    );
    let _back = beat(&node.controller, "h2");
    node.wait_vnf(&node.admin, "u1", |v| v["phase"] == "Running")
        .await;
    assert_consistent(&node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_active_instance_hands_over_to_its_running_standby_and_restarts_as_it() {
    let (node, beats) = node_with(&["h2", "h3"], None).await;
    let (_, act, sby) = placed_pair(&node).await;
    let cpus = |v: &Value, role: &str| {
        v["placements"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["role"] == role)
            .unwrap()["vcpus"]
            .clone()
    };
    running(&node, &act, "p1").await;

    // The standby has not said it runs: a failed active stays Failed, nothing moves.
    report(&node, &act, "p1", Phase::Failed, "worker trapped").await;
    let v = node
        .wait_vnf(&node.admin, "p1", |v| v["phase"] == "Failed")
        .await;
    assert_eq!(role_host(&v, "active"), act, "{v}");

    // Once the standby runs (its own status, not the VNF's phase), the next failure of the
    // active hands over at once; the old active comes back as the standby on its cpus.
    running(&node, &act, "p1").await;
    running(&node, &sby, "p1").await;
    let v = node
        .wait_vnf(&node.admin, "p1", |v| v["standby"]["phase"] == "Running")
        .await;
    assert_eq!(v["phase"], "Running", "{v}");
    let generation = v["generation"].as_u64().unwrap();
    report(&node, &act, "p1", Phase::Failed, "worker trapped").await;
    let after = node
        .wait_vnf(&node.admin, "p1", |v| role_host(v, "active") == sby)
        .await;
    assert_eq!(role_host(&after, "standby"), act, "{after}");
    assert_eq!(cpus(&after, "active"), cpus(&v, "standby"));
    assert_eq!(cpus(&after, "standby"), cpus(&v, "active"));
    assert_eq!(after["phase"], "Scheduled", "{after}");
    assert_eq!(after["generation"].as_u64(), Some(generation + 1));
    assert!(
        after.get("standby").is_none(),
        "a new standby reports afresh: {after}"
    );
    let last = node.events("p1").await.pop().unwrap();
    assert_eq!(last["actor"], "healer", "{last}");
    assert!(
        last["reason"].as_str().unwrap().contains(&format!(
            "the active instance on {act} failed (worker trapped); the standby on {sby} is the active now"
        )),
        "{last}"
    );
    assert_consistent(&node).await;
    beats.into_iter().for_each(|b| b.abort());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_that_lost_its_active_takes_over_while_other_hosts_cannot_make_it() {
    let (node, beats) = node_with(&["h2", "h3", "h4"], None).await;
    let (p1, act, sby) = placed_pair(&node).await;
    let other = ["h2", "h3", "h4"]
        .into_iter()
        .find(|h| *h != act && *h != sby)
        .unwrap();
    running(&node, &act, "p1").await;
    running(&node, &sby, "p1").await;
    node.wait_vnf(&node.admin, "p1", |v| v["standby"]["phase"] == "Running")
        .await;
    let lost = || Observation {
        vnf: "p1".parse().unwrap(),
        phase: Phase::Running,
        reason: "running as the standby".into(),
        generation: p1["generation"].as_u64().unwrap(),
        replication: None,
        active_lost: Some(ActiveLost {
            why: "its host closed the replication connection".into(),
            closed: true,
        }),
        ..observation("x", Phase::Running)
    };
    // A host that holds no standby of p1 (nor the active) cannot make it move.
    node.controller.observe(other, lost()).await.unwrap();
    node.controller.observe(&act, lost()).await.unwrap();
    let v = node.vnf_json("p1").await;
    assert_eq!(role_host(&v, "active"), act, "{v}");

    // The standby's report hands over at once: it is the active, the old active's host holds
    // the standby (the healer moves it if that host is dead).
    node.controller.observe(&sby, lost()).await.unwrap();
    let v = node.vnf_json("p1").await;
    assert_eq!(role_host(&v, "active"), sby, "{v}");
    assert_eq!(role_host(&v, "standby"), act, "{v}");
    let last = node.events("p1").await.pop().unwrap();
    assert!(
        last["reason"].as_str().unwrap().contains(&format!(
            "the standby on {sby} lost its active on {act} (its host closed the replication connection); it is the active now"
        )),
        "{last}"
    );
    assert_consistent(&node).await;
    beats.into_iter().for_each(|b| b.abort());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_that_no_longer_hears_a_live_active_takes_over_only_once_its_lease_ran_out() {
    let (node, mut beats) = node_with(&["h2", "h3"], None).await;
    let (p1, act, sby) = placed_pair(&node).await;
    running(&node, &act, "p1").await;
    running(&node, &sby, "p1").await;
    node.wait_vnf(&node.admin, "p1", |v| v["standby"]["phase"] == "Running")
        .await;
    let silent = silent_standby(&act, p1["generation"].as_u64().unwrap());
    // The path between the two hosts is cut, both still reach the controller: the active's
    // host is Ready, so it stays the active (a takeover would make two), and the standby's
    // status says what it sees. (A beat of the active's host just before: its beat task late
    // past the 300 ms lease on a loaded machine would make it NotReady for that moment.)
    node.controller.heartbeat(&act).await.unwrap();
    node.controller.observe(&sby, silent.clone()).await.unwrap();
    let v = node.vnf_json("p1").await;
    assert_eq!(role_host(&v, "active"), act, "{v}");
    assert_eq!(v["epoch"].as_u64().unwrap_or(0), 0, "{v}");
    assert_eq!(
        v["standby"]["active_lost"]["why"],
        format!("nothing from {act} for 30 ms"),
        "{v}"
    );
    let last = node.events("p1").await.pop().unwrap();
    assert_eq!(
        last["reason"],
        format!("the standby on {sby} lost its active on {act}: nothing from {act} for 30 ms"),
        "{last}"
    );
    assert_eq!((&last["from"], &last["to"]), (&last["to"], &v["phase"]));

    // The active's host goes quiet too: once its lease runs out (its agent has fenced the
    // instance by then), the standby is the active, at a new epoch.
    beats.remove(if act == "h2" { 0 } else { 1 }).abort();
    let v = node
        .wait_vnf(&node.admin, "p1", |v| role_host(v, "active") == sby)
        .await;
    assert_eq!(v["epoch"].as_u64(), Some(1), "{v}");
    assert_consistent(&node).await;
    beats.into_iter().for_each(|b| b.abort());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_active_host_that_only_the_controller_lost_keeps_its_role_while_its_standby_hears_it() {
    let (node, mut beats) = node_with(&["h2", "h3", "h4"], Some(Duration::from_millis(200))).await;
    node.cordon("h4").await;
    let (p1, act, sby) = placed_pair(&node).await;
    // u1, without a standby, on the active's host: its move shows a heal pass ran.
    node.cordon(&sby).await;
    node.create_vnf(&node.admin, &wasm_vnf("u1")).await;
    let u1 = node
        .wait_vnf(&node.admin, "u1", |v| {
            v["placements"][0]["host"].is_string()
        })
        .await;
    assert_eq!(u1["placements"][0]["host"], act.as_str(), "{u1}");
    running(&node, &act, "u1").await;
    node.uncordon(&sby).await;
    node.uncordon("h4").await;
    let generation = p1["generation"].as_u64().unwrap();
    // The active reports its stream to the standby synced; the standby hears it.
    node.controller
        .observe(
            &act,
            Observation {
                vnf: "p1".parse().unwrap(),
                phase: Phase::Running,
                reason: "running".into(),
                generation,
                replication: Some(telvirt_model::api::ReplicationStatus {
                    standby_host: sby.clone(),
                    state: "synced".into(),
                    lag_us: 100,
                    updates: 1,
                    snapshots: 1,
                    bytes: 8,
                    error: None,
                    guest: None,
                    packets_passed: 0,
                    frozen_us: None,
                    freeze_phases: None,
                    move_id: 0,
                }),
                active_lost: None,
                ..observation("x", Phase::Running)
            },
        )
        .await
        .unwrap();
    running(&node, &sby, "p1").await;
    node.wait_vnf(&node.admin, "p1", |v| v["standby"]["phase"] == "Running")
        .await;
    // The active's host stops beating: NotReady, the VNF Unknown, but no takeover, not even
    // once the heal delay has passed (u1 was moved off the host by then).
    beats.remove(if act == "h2" { 0 } else { 1 }).abort();
    let v = node
        .wait_vnf(&node.admin, "p1", |v| v["phase"] == "Unknown")
        .await;
    assert_eq!(role_host(&v, "active"), act, "{v}");
    node.wait_vnf(&node.admin, "u1", |v| {
        v["placements"][0]["host"] != act.as_str()
    })
    .await;
    let v = node.vnf_json("p1").await;
    assert_eq!(role_host(&v, "active"), act, "{v}");
    assert_eq!(role_host(&v, "standby"), sby, "{v}");
    // Then the standby stops hearing it: now it takes over.
    node.controller
        .observe(&sby, silent_standby(&act, generation))
        .await
        .unwrap();
    let v = node
        .wait_vnf(&node.admin, "p1", |v| role_host(v, "active") == sby)
        .await;
    assert_eq!(v["epoch"].as_u64(), Some(1), "{v}");
    assert_consistent(&node).await;
    beats.into_iter().for_each(|b| b.abort());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pair_left_without_a_standby_is_whole_again_once_a_host_can_take_one() {
    let (node, mut beats) = node_with(&["h2", "h3"], None).await;
    let (_, act, sby) = placed_pair(&node).await;
    running(&node, &act, "p1").await;
    running(&node, &sby, "p1").await;
    node.wait_vnf(&node.admin, "p1", |v| v["standby"]["phase"] == "Running")
        .await;
    // The active's host dies; the only other host holds the standby, which takes over, and
    // no host is left for a new standby.
    beats.remove(if act == "h2" { 0 } else { 1 }).abort();
    let v = node
        .wait_vnf(&node.admin, "p1", |v| role_host(v, "active") == sby)
        .await;
    assert_eq!(role_hosts(&v).len(), 1, "{v}");
    // The host is back: the pair is whole again, its standby there.
    beats.push(beat(&node.controller, &act));
    let v = node
        .wait_vnf(&node.admin, "p1", |v| role_hosts(v).len() == 2)
        .await;
    assert_eq!(role_host(&v, "standby"), act, "{v}");
    assert_eq!(role_host(&v, "active"), sby, "{v}");
    let last = node.events("p1").await.pop().unwrap();
    assert_eq!(last["actor"], "healer", "{last}");
    assert!(
        last["reason"]
            .as_str()
            .unwrap()
            .contains(&format!("the pair is whole again: new standby on {act}")),
        "{last}"
    );
    assert_consistent(&node).await;
    beats.into_iter().for_each(|b| b.abort());
}
