//! Moving a wasm VNF through the API with the agents played: the destination is held as a
//! standby beside the source (cpus never shared), the move survives a controller restart, it
//! can be cancelled, and it ends (the destination active, the source freed) once the
//! destination runs and the source reports the stream synced, or is cancelled past its
//! deadline. A host that cannot receive state is refused. The store stays consistent
//! throughout.

mod common;

use common::{Node, beat, host_record, role_hosts, wasm_vnf};
use telvirt_controller::{Controller, consistency};
use telvirt_model::Phase;
use telvirt_model::api::{Observation, ReplicationStatus};

const JSON: &str = "application/json";

async fn migrate(node: &Node, body: &str) -> common::Reply {
    node.call(
        "POST",
        "/v1/vnfs/{name}/migrate",
        Some("u1"),
        Some(&node.admin),
        Some((body.as_bytes(), JSON)),
    )
    .await
}

async fn report(c: &Controller, host: &str, phase: Phase, replication: Option<ReplicationStatus>) {
    c.observe(
        host,
        Observation {
            vnf: "u1".parse().unwrap(),
            phase,
            reason: "running".into(),
            generation: 0,
            replication,
            active_lost: None,
        },
    )
    .await
    .unwrap();
}

async fn consistent(node: &Node) {
    let report = consistency::check(node.store.as_ref(), telvirt_sched::SchedConfig::default())
        .await
        .unwrap();
    assert!(report.is_consistent(), "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_is_held_beside_the_source_survives_a_restart_can_be_cancelled_and_ends() {
    let node = Node::start_monitored(None).await;
    node.cordon("h1").await;
    // h2 runs u1; h3 can receive state (a tunnel address), h4 cannot.
    let mut beats = Vec::new();
    for (h, tunnel) in [("h2", true), ("h3", true), ("h4", false)] {
        let mut record = host_record(h);
        if tunnel {
            record.tunnel = Some("127.0.0.1:4789".into());
        }
        node.controller.register_host(record).await.unwrap();
        beats.push(beat(&node.controller, h));
    }
    node.cordon("h3").await;
    node.cordon("h4").await;
    node.create_vnf(&node.admin, &wasm_vnf("u1")).await;
    node.wait_vnf(&node.admin, "u1", |v| v["phase"] == "Scheduled")
        .await;
    report(&node.controller, "h2", Phase::Running, None).await;
    for h in ["h3", "h4"] {
        node.uncordon(h).await;
    }

    // A host without a tunnel address cannot receive the state: refused, nothing changes.
    let before = node.vnf_json("u1").await;
    let r = migrate(&node, r#"{"to": "h4"}"#).await;
    assert_eq!(r.status, 422, "{}", r.body);
    assert_eq!(r.error_paths(), ["to"], "{}", r.body);
    assert!(
        r.body["detail"]
            .as_str()
            .unwrap()
            .contains("tunnel address")
    );
    assert_eq!(node.vnf_json("u1").await, before);
    let r = migrate(&node, r#"{"to": "h3", "colour": "red"}"#).await;
    assert_eq!(r.status, 422, "unknown fields are refused: {}", r.body);
    assert_eq!(node.vnf_json("u1").await, before);

    // The move starts: h3 is held as the standby, its cpus apart from h2's.
    let r = migrate(&node, r#"{"to": "h3"}"#).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["migration"]["to"], "h3", "{}", r.body);
    assert_eq!(r.body["migration"]["from"], "h2", "{}", r.body);
    assert_eq!(
        role_hosts(&r.body),
        [
            ("active".into(), "h2".into()),
            ("standby".into(), "h3".into())
        ]
    );
    assert_eq!(r.body["phase"], "Running", "{}", r.body);
    let r = migrate(&node, r#"{"to": "h3"}"#).await;
    assert_eq!(r.status, 409, "one move at a time: {}", r.body);
    consistent(&node).await;
    let assigned = |a: Vec<telvirt_model::api::Assignment>| a.len();
    assert_eq!(
        assigned(node.controller.assignments("h3").await.unwrap()),
        1
    );
    let source = node.controller.assignments("h2").await.unwrap();
    assert_eq!(source[0].standby.as_ref().unwrap().host, "h3");

    // A controller opened again on the store restores the move (the standby of a VNF
    // without redundancy) and keeps it.
    let again = Controller::open(node.store.clone(), telvirt_sched::SchedConfig::default())
        .await
        .unwrap();
    let admin = telvirt_controller::Caller {
        name: "admin".into(),
    };
    assert!(again.vnf(&admin, "u1").await.unwrap().migration.is_some());
    drop(again);

    // Cancelled: h3 is free again, h2 keeps running it; a second cancel has nothing to end.
    let r = migrate(&node, r#"{"cancel": true}"#).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.get("migration").is_none(), "{}", r.body);
    assert_eq!(role_hosts(&r.body), [("active".into(), "h2".into())]);
    assert_eq!(migrate(&node, r#"{"cancel": true}"#).await.status, 409);
    consistent(&node).await;

    // Again, to the end: the destination runs, the source reports the stream synced.
    assert_eq!(migrate(&node, r#"{"to": "h3"}"#).await.status, 200);
    report(&node.controller, "h3", Phase::Running, None).await;
    let still = node.vnf_json("u1").await;
    assert!(still["migration"].is_object(), "not synced yet: {still}");
    let synced = ReplicationStatus {
        standby_host: "h3".into(),
        state: "synced".into(),
        lag_us: 900,
        updates: 7,
        snapshots: 1,
        bytes: 512,
        error: None,
    };
    report(&node.controller, "h2", Phase::Running, Some(synced)).await;
    let moved = node.vnf_json("u1").await;
    assert_eq!(
        role_hosts(&moved),
        [("active".into(), "h3".into())],
        "{moved}"
    );
    assert!(moved.get("migration").is_none(), "{moved}");
    assert_eq!(moved["phase"], "Scheduled", "{moved}");
    assert!(node.controller.assignments("h2").await.unwrap().is_empty());
    let last = node.events("u1").await.pop().unwrap();
    assert!(
        last["reason"]
            .as_str()
            .unwrap()
            .contains("moved from host h2 to host h3 (7 map updates"),
        "{last}"
    );
    consistent(&node).await;
    beats.into_iter().for_each(|b| b.abort());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_past_its_deadline_is_cancelled_saying_what_was_missing() {
    let node = Node::start_monitored(None).await;
    node.controller
        .set_move_deadline(std::time::Duration::from_millis(300));
    node.cordon("h1").await;
    let mut beats = Vec::new();
    for h in ["h2", "h3"] {
        let mut record = host_record(h);
        record.tunnel = Some("127.0.0.1:4789".into());
        node.controller.register_host(record).await.unwrap();
        beats.push(beat(&node.controller, h));
    }
    node.cordon("h3").await;
    node.create_vnf(&node.admin, &wasm_vnf("u1")).await;
    node.wait_vnf(&node.admin, "u1", |v| v["phase"] == "Scheduled")
        .await;
    report(&node.controller, "h2", Phase::Running, None).await;
    node.uncordon("h3").await;
    assert_eq!(migrate(&node, r#"{"to": "h3"}"#).await.status, 200);
    // The destination never runs; the source keeps reporting a stream that cannot connect.
    let failing = ReplicationStatus {
        standby_host: "h3".into(),
        state: "failing".into(),
        lag_us: 0,
        updates: 0,
        snapshots: 0,
        bytes: 0,
        error: Some("connecting to 127.0.0.1:4789: Connection refused".into()),
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        report(
            &node.controller,
            "h2",
            Phase::Running,
            Some(failing.clone()),
        )
        .await;
        if node.vnf_json("u1").await.get("migration").is_none() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the move never expired"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let v = node.vnf_json("u1").await;
    assert_eq!(role_hosts(&v), [("active".into(), "h2".into())], "{v}");
    assert!(node.controller.assignments("h3").await.unwrap().is_empty());
    let last = node.events("u1").await.pop().unwrap();
    assert_eq!(last["actor"], "controller", "{last}");
    let reason = last["reason"].as_str().unwrap();
    assert!(
        reason.contains("the move to host h3 did not end within 300ms")
            && reason.contains("the destination never reported its instance")
            && reason.contains("Connection refused")
            && reason.ends_with("cancelled, it runs on h2"),
        "{reason}"
    );
    consistent(&node).await;
    beats.into_iter().for_each(|b| b.abort());
}
