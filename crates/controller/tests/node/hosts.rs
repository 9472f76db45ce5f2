//! Host lifecycle through the API: cordon keeps new VNFs off a host, drain moves its VNFs back to
//! Pending and places them elsewhere (or leaves them Pending with the reason), delete is refused
//! while a VNF is placed there or the agent is alive, only admin changes hosts, and a host whose
//! heartbeat lease lapses turns NotReady with its VNFs Unknown, and back on a heartbeat. Every
//! answer is checked against the OpenAPI document by the harness.

use crate::common;

use std::time::{Duration, Instant};

use common::{Node, beat, host_record, observation, wasm_vnf};
use serde_json::Value;
use telvirt_controller::Controller;
use telvirt_model::Phase;
use telvirt_model::api::Observation;

const DEADLINE: Duration = Duration::from_secs(20);

async fn action(node: &Node, token: &str, name: &str, what: &str) -> common::Reply {
    node.call(
        "POST",
        &format!("/v1/hosts/{{name}}/{what}"),
        Some(name),
        Some(token),
        None,
    )
    .await
}

async fn show(node: &Node, name: &str) -> common::Reply {
    node.call(
        "GET",
        "/v1/hosts/{name}",
        Some(name),
        Some(&node.admin),
        None,
    )
    .await
}

async fn delete(node: &Node, token: &str, name: &str) -> common::Reply {
    node.call("DELETE", "/v1/hosts/{name}", Some(name), Some(token), None)
        .await
}

fn host_of(vnf: &Value) -> Option<&str> {
    vnf["placements"][0]["host"].as_str()
}

/// Polls host `name` until `pred` holds on its view, with a deadline.
async fn wait_host(node: &Node, name: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let r = show(node, name).await;
        if r.status == 200 && pred(&r.body) {
            return r.body;
        }
        assert!(
            Instant::now() < deadline,
            "host {name} did not reach the expected state: {}",
            r.body
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A node with a 300 ms host lease, its liveness monitor running, and host h2 registered
/// (no heartbeat yet). Healing is off: these tests keep VNFs on their NotReady host (healing
/// has its own, the `healing` module).
async fn node_with_monitored_h2() -> Node {
    let node = Node::start_monitored(None).await;
    node.controller
        .register_host(host_record("h2"))
        .await
        .unwrap();
    node
}

#[tokio::test]
async fn cordon_keeps_new_vnfs_off_a_host_and_uncordon_lets_them_back() {
    let node = Node::start().await;
    node.controller
        .register_host(host_record("h2"))
        .await
        .unwrap();
    let r = action(&node, &node.admin, "h1", "cordon").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["schedulable"], false, "{}", r.body);
    let r = node.create_vnf(&node.admin, &wasm_vnf("a1")).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let a1 = node
        .wait_vnf(&node.admin, "a1", |v| host_of(v).is_some())
        .await;
    assert_eq!(host_of(&a1), Some("h2"), "placed on the cordoned h1: {a1}");

    // Both cordoned: a new VNF waits, and says why for h1 and h2.
    assert_eq!(action(&node, &node.admin, "h2", "cordon").await.status, 200);
    node.create_vnf(&node.admin, &wasm_vnf("a2")).await;
    let a2 = node
        .wait_vnf(&node.admin, "a2", |v| {
            v["reason"].as_str().is_some_and(|r| r.contains("cordoned"))
        })
        .await;
    assert_eq!(a2["phase"], "Pending", "{a2}");
    let reason = a2["reason"].as_str().unwrap();
    assert!(reason.contains("h1") && reason.contains("h2"), "{reason}");

    let r = action(&node, &node.admin, "h1", "uncordon").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["schedulable"], true, "{}", r.body);
    let a2 = node
        .wait_vnf(&node.admin, "a2", |v| host_of(v).is_some())
        .await;
    assert_eq!(host_of(&a2), Some("h1"), "{a2}");
    // Cordoning again does not move what runs there.
    assert_eq!(action(&node, &node.admin, "h1", "cordon").await.status, 200);
    let a2 = node.wait_vnf(&node.admin, "a2", |_| true).await;
    assert_eq!(host_of(&a2), Some("h1"), "{a2}");
}

#[tokio::test]
async fn drain_places_vnfs_elsewhere_or_leaves_them_pending_with_the_reason() {
    let node = Node::start().await;
    node.controller
        .register_host(host_record("h2"))
        .await
        .unwrap();
    assert_eq!(action(&node, &node.admin, "h2", "cordon").await.status, 200);
    node.create_vnf(&node.admin, &wasm_vnf("d1")).await;
    let d1 = node
        .wait_vnf(&node.admin, "d1", |v| host_of(v).is_some())
        .await;
    assert_eq!(host_of(&d1), Some("h1"), "{d1}");
    assert_eq!(
        action(&node, &node.admin, "h2", "uncordon").await.status,
        200
    );

    let r = action(&node, &node.admin, "h1", "drain").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["schedulable"], false, "{}", r.body);
    let d1 = node
        .wait_vnf(&node.admin, "d1", |v| host_of(v) == Some("h2"))
        .await;
    assert_ne!(d1["phase"], "Pending", "{d1}");
    let evs = node.events("d1").await;
    assert!(
        evs.iter().any(|e| e["to"] == "Pending"
            && e["reason"]
                .as_str()
                .is_some_and(|r| r.contains("host h1 was drained"))),
        "no drain event: {evs:?}"
    );
    // h1's cores are free again.
    let h1 = show(&node, "h1").await.body;
    assert!(
        h1["cpus"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["use"]["state"] != "vnf"),
        "{h1}"
    );

    // Nowhere else to go: Pending, with the scheduler's reason naming the cordon.
    assert_eq!(action(&node, &node.admin, "h2", "drain").await.status, 200);
    let d1 = node
        .wait_vnf(&node.admin, "d1", |v| {
            v["phase"] == "Pending" && v["reason"].as_str().is_some_and(|r| r.contains("cordoned"))
        })
        .await;
    assert!(d1["placements"].as_array().unwrap().is_empty(), "{d1}");
}

#[tokio::test]
async fn delete_is_refused_while_a_vnf_is_there_or_the_agent_is_alive() {
    let node = Node::start().await;
    node.controller
        .set_host_lease_ttl(Duration::from_millis(300))
        .unwrap();
    node.controller
        .register_host(host_record("h2"))
        .await
        .unwrap();
    assert_eq!(action(&node, &node.admin, "h1", "cordon").await.status, 200);
    node.create_vnf(&node.admin, &wasm_vnf("x1")).await;
    let x1 = node
        .wait_vnf(&node.admin, "x1", |v| host_of(v).is_some())
        .await;
    assert_eq!(host_of(&x1), Some("h2"), "{x1}");

    // Alive: refused, whatever it holds. (Asked again when a beat came late past the 300 ms
    // lease on a loaded machine: NotReady for that moment, the refusal names x1 instead.)
    let beating = beat(&node.controller, "h2");
    let deadline = Instant::now() + Duration::from_secs(20);
    let r = loop {
        wait_host(&node, "h2", |h| h["status"] == "Ready").await;
        let r = delete(&node, &node.admin, "h2").await;
        let lapsed = r.status == 409 && r.body["detail"].as_str().is_some_and(|d| d.contains("x1"));
        if !lapsed || Instant::now() > deadline {
            break r;
        }
    };
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(
        r.body["detail"].as_str().unwrap().contains("heartbeats"),
        "{}",
        r.body
    );
    beating.abort();
    let _ = beating.await;
    wait_host(&node, "h2", |h| h["status"] == "NotReady").await;

    // Holding x1: refused, naming it; nothing changed.
    let r = delete(&node, &node.admin, "h2").await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(
        r.body["detail"].as_str().unwrap().contains("x1"),
        "{}",
        r.body
    );
    assert_eq!(show(&node, "h2").await.status, 200);

    // Drained (and h1 open again): x1 goes to h1, and h2 can go.
    assert_eq!(
        action(&node, &node.admin, "h1", "uncordon").await.status,
        200
    );
    assert_eq!(action(&node, &node.admin, "h2", "drain").await.status, 200);
    node.wait_vnf(&node.admin, "x1", |v| host_of(v) == Some("h1"))
        .await;
    let r = delete(&node, &node.admin, "h2").await;
    assert_eq!(r.status, 204, "{}", r.body);
    assert_eq!(show(&node, "h2").await.status, 404);
    let list = node
        .call("GET", "/v1/hosts", None, Some(&node.admin), None)
        .await;
    let names: Vec<&str> = list
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["h1"]);
    // A deleted host's agent is told so, and does not bring it back.
    assert!(node.controller.heartbeat("h2").await.is_err());
    assert_eq!(show(&node, "h2").await.status, 404);
    assert_eq!(delete(&node, &node.admin, "h2").await.status, 404);
    for what in ["cordon", "uncordon", "drain"] {
        assert_eq!(action(&node, &node.admin, "nope", what).await.status, 404);
    }
}

#[tokio::test]
async fn only_admin_changes_hosts() {
    let node = Node::start().await;
    let ent = node.create_authority("ent").await;
    for what in ["cordon", "uncordon", "drain"] {
        let r = action(&node, &ent, "h1", what).await;
        assert_eq!(r.status, 403, "{what}: {}", r.body);
        assert!(
            r.body["detail"].as_str().unwrap().contains("admin"),
            "{}",
            r.body
        );
    }
    assert_eq!(delete(&node, &ent, "h1").await.status, 403);
    let h1 = show(&node, "h1").await.body;
    assert_eq!(h1["schedulable"], true, "{h1}");
    // Everyone may read the status.
    let r = node
        .call("GET", "/v1/hosts/{name}", Some("h1"), Some(&ent), None)
        .await;
    assert_eq!(r.status, 200);
    assert!(r.body["status"].is_string(), "{}", r.body);
}

#[tokio::test]
async fn a_lapsed_heartbeat_lease_makes_the_host_not_ready_and_its_vnfs_unknown_until_it_is_back() {
    let node = node_with_monitored_h2().await;
    // Never a heartbeat: NotReady, no age.
    let h2 = show(&node, "h2").await.body;
    assert_eq!(h2["status"], "NotReady", "{h2}");
    assert_eq!(h2["ready"], false, "{h2}");
    assert!(h2.get("heartbeat_age_ms").is_none(), "{h2}");

    let beating = beat(&node.controller, "h2");
    let h2 = wait_host(&node, "h2", |h| h["status"] == "Ready").await;
    assert!(h2["heartbeat_age_ms"].as_u64().is_some(), "{h2}");
    assert_eq!(action(&node, &node.admin, "h1", "cordon").await.status, 200);
    node.create_vnf(&node.admin, &wasm_vnf("u1")).await;
    let u1 = node
        .wait_vnf(&node.admin, "u1", |v| host_of(v).is_some())
        .await;
    assert_eq!(host_of(&u1), Some("h2"), "{u1}");
    // h2's agent (played here through the controller's agent API) runs it.
    let generation = u1["generation"].as_u64().unwrap();
    for phase in [Phase::Starting, Phase::Running] {
        node.controller
            .observe(
                "h2",
                Observation {
                    reason: "started".into(),
                    generation,
                    ..observation("u1", phase)
                },
            )
            .await
            .unwrap();
    }
    node.wait_vnf(&node.admin, "u1", |v| v["phase"] == "Running")
        .await;

    // The agent goes silent: the store expires the lease, the host is NotReady, u1 Unknown.
    beating.abort();
    let _ = beating.await;
    let h2 = wait_host(&node, "h2", |h| h["status"] == "NotReady").await;
    assert!(h2["heartbeat_age_ms"].as_u64().is_some(), "{h2}");
    let u1 = node
        .wait_vnf(&node.admin, "u1", |v| v["phase"] == "Unknown")
        .await;
    let reason = u1["reason"].as_str().unwrap();
    assert!(
        reason.contains("host h2 is NotReady (no heartbeat for"),
        "{reason}"
    );
    let evs = node.events("u1").await;
    let last = evs.last().unwrap();
    assert_eq!(last["from"], "Running", "{last}");
    assert_eq!(last["to"], "Unknown", "{last}");

    // Back: Ready, and u1 Running again, with an event saying so.
    let beating = beat(&node.controller, "h2");
    wait_host(&node, "h2", |h| h["status"] == "Ready").await;
    let u1 = node
        .wait_vnf(&node.admin, "u1", |v| v["phase"] == "Running")
        .await;
    assert!(
        u1["reason"]
            .as_str()
            .unwrap()
            .contains("host h2 is Ready again"),
        "{u1}"
    );
    let evs = node.events("u1").await;
    assert_eq!(evs.last().unwrap()["from"], "Unknown", "{evs:?}");
    beating.abort();
}

#[tokio::test]
async fn a_lease_ttl_out_of_range_is_refused_and_changes_nothing() {
    let node = Node::start().await;
    let before = node.controller.host_lease_ttl();
    for ttl in [Duration::from_millis(10), Duration::from_secs(7200)] {
        let e = node.controller.set_host_lease_ttl(ttl).unwrap_err();
        assert!(e.to_string().contains("host_lease_ttl"), "{e}");
        assert_eq!(node.controller.host_lease_ttl(), before);
    }
}

#[tokio::test]
async fn a_cordon_survives_a_restart_of_the_controller() {
    let dir = tempfile::tempdir().unwrap();
    let store = telvirt_store::RedbStore::open(&dir.path().join("store.redb")).unwrap();
    let admin = telvirt_controller::Caller {
        name: "admin".into(),
    };
    let first = Controller::open(store.clone(), telvirt_sched::SchedConfig::default())
        .await
        .unwrap();
    for h in ["h1", "h2"] {
        first.register_host(host_record(h)).await.unwrap();
    }
    first.cordon(&admin, "h1").await.unwrap();
    drop(first);
    // A new controller over the same store: h1 (the first host, where placement would go) is
    // still cordoned, so the VNF goes to h2.
    let second = Controller::open(store, telvirt_sched::SchedConfig::default())
        .await
        .unwrap();
    assert!(!second.host(&admin, "h1").await.unwrap().schedulable);
    let text = "apiVersion: telvirt/v1\nkind: Vnf\nmetadata: { name: r1 }\nspec:\n  runtime: vm\n  cpu: { policy: dedicated, count: 1 }\n  vm: { memory: 64MiB }\n";
    second
        .create_vnf(&admin, text.as_bytes(), telvirt_model::Format::Yaml)
        .await
        .unwrap();
    second.schedule_pending().await.unwrap();
    let r1 = second.vnf(&admin, "r1").await.unwrap();
    assert_eq!(r1.placements[0].host, "h2", "{r1:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_new_is_placed_on_a_host_whose_agent_is_silent_until_it_is_back() {
    let node = node_with_monitored_h2().await;
    // No agent of h1 or h2 sends heartbeats: both NotReady (a liveness pass has seen it), so
    // u1 waits with the reason.
    wait_host(&node, "h2", |h| h["status"] == "NotReady").await;
    wait_host(&node, "h1", |h| h["status"] == "NotReady").await;
    node.controller.check_hosts().await.unwrap();
    node.create_vnf(&node.admin, &wasm_vnf("u1")).await;
    let u1 = node
        .wait_vnf(&node.admin, "u1", |v| {
            v["phase"] == "Pending" && v["reason"].is_string()
        })
        .await;
    assert_eq!(host_of(&u1), None, "placed on a silent host: {u1}");
    // A cordon record is not what keeps it off: both still show schedulable.
    assert_eq!(show(&node, "h2").await.body["schedulable"], true);

    // h2's agent comes back: u1 is placed there.
    let beating = beat(&node.controller, "h2");
    let u1 = node
        .wait_vnf(&node.admin, "u1", |v| host_of(v).is_some())
        .await;
    assert_eq!(host_of(&u1), Some("h2"), "{u1}");
    beating.abort();
}
