//! Moving a VNF through the API with the agents played: the destination is held as a
//! standby beside the source (cpus never shared), the move survives a controller restart, it
//! can be cancelled, and it ends (the destination active, the source freed) once the
//! destination runs and the source reports the stream synced, or is cancelled past its
//! deadline. A host that cannot receive state is refused. A vm VNF moves by its guest's
//! stream (the assignments say who sends and who waits), cannot be cancelled once the stream
//! completed, and is refused when a disk, a host device or an engine would not follow. The store stays
//! consistent throughout.

use crate::common;

use common::{Node, beat, host_record, observation, role_hosts, wasm_vnf};
use telvirt_controller::{Controller, consistency};
use telvirt_model::Phase;
use telvirt_model::api::{Observation, ReplicationStatus};
use telvirt_model::vnf::Accelerator;

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

/// `POST /v1/secrets/replication/rotate` as the holder of `token`.
async fn rotate_secret(node: &Node, token: &str) -> common::Reply {
    node.call(
        "POST",
        "/v1/secrets/replication/rotate",
        None,
        Some(token),
        None,
    )
    .await
}

/// The key of p1's stream as its active's host (`act`) and its standby's (`sby`) are given it.
async fn pair_keys(
    c: &Controller,
    act: &str,
    sby: &str,
) -> (telvirt_model::api::PairKey, telvirt_model::api::PairKey) {
    let source = c.assignments(act).await.unwrap();
    let dest = c.assignments(sby).await.unwrap();
    (
        source[0].standby.as_ref().unwrap().key.clone(),
        dest[0].active_key.clone().unwrap(),
    )
}

/// The cluster's replication secret rotated (admin only): every stream takes a new key, both
/// its ends the same one, and a controller opened again on the store derives it too; every
/// agent is woken to read it. (Refused under a move: the test above.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_replication_secret_gives_every_stream_a_new_key() {
    let node = Node::start_monitored(None).await;
    node.cordon("h1").await;
    let mut beats = Vec::new();
    for (h, tunnel) in [("h2", "127.0.0.2:4789"), ("h3", "127.0.0.3:4789")] {
        let mut record = host_record(h);
        record.tunnel = Some(tunnel.into());
        node.controller.register_host(record).await.unwrap();
        beats.push(beat(&node.controller, h));
    }
    let pair = wasm_vnf("p1").replace("  ports:", "  redundancy: active-standby\n  ports:");
    assert_eq!(node.create_vnf(&node.admin, &pair).await.status, 201);
    let p1 = node
        .wait_vnf(&node.admin, "p1", |v| role_hosts(v).len() == 2)
        .await;
    let host_of = |role: &str| {
        role_hosts(&p1)
            .into_iter()
            .find(|(r, _)| r == role)
            .unwrap()
            .1
    };
    let (act, sby) = (host_of("active"), host_of("standby"));
    let (before, at_standby) = pair_keys(&node.controller, &act, &sby).await;
    assert_eq!(before, at_standby);

    // Another authority may not: 403, the key kept.
    let tenant = node.create_authority("t1").await;
    let r = rotate_secret(&node, &tenant).await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(pair_keys(&node.controller, &act, &sby).await.0, before);

    let mut woken = [&act, &sby].map(|h| node.controller.assignments_watch(h));
    let seen = woken.each_mut().map(|w| *w.borrow_and_update());
    let r = rotate_secret(&node, &node.admin).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["streams"], serde_json::json!(["p1"]), "{}", r.body);
    for (w, seen) in woken.iter().zip(seen) {
        assert_ne!(*w.borrow(), seen, "an agent of the pair was not woken");
    }
    let (after, at_standby) = pair_keys(&node.controller, &act, &sby).await;
    assert_ne!(after, before);
    assert_eq!(after, at_standby);
    // Kept in the store: another controller derives the new key.
    let again = Controller::open(node.store.clone(), telvirt_sched::SchedConfig::default())
        .await
        .unwrap();
    assert_eq!(pair_keys(&again, &act, &sby).await.0, after);
    drop(beats);
}

async fn report(c: &Controller, host: &str, phase: Phase, replication: Option<ReplicationStatus>) {
    observe_u1(c, host, phase, replication, None, None).await;
}

/// `host`'s agent reports u1 in `phase`.
async fn observe_u1(
    c: &Controller,
    host: &str,
    phase: Phase,
    replication: Option<ReplicationStatus>,
    machine: Option<&str>,
    accel: Option<Accelerator>,
) {
    c.observe(
        host,
        Observation {
            machine: machine.map(str::to_owned),
            accel,
            replication,
            ..observation("u1", phase)
        },
    )
    .await
    .unwrap();
}

/// h2's report that u1 runs on machine type `machine`.
async fn report_machine(c: &Controller, machine: &str) {
    observe_u1(c, "h2", Phase::Running, None, Some(machine), None).await;
}

/// Hosts h2 and h3, heartbeating, with tunnel addresses (both can receive state); h1 and h3
/// cordoned, so what is created next runs on h2.
async fn h2_and_h3(node: &Node) -> Vec<tokio::task::JoinHandle<()>> {
    h2_and_h3_with(node, [None, None]).await
}

/// [`h2_and_h3`] whose agents report QEMU versions `qemu` (h2's, h3's).
async fn h2_and_h3_with(node: &Node, qemu: [Option<&str>; 2]) -> Vec<tokio::task::JoinHandle<()>> {
    node.cordon("h1").await;
    let mut beats = Vec::new();
    for ((h, tunnel), qemu) in [("h2", "127.0.0.2:4789"), ("h3", "127.0.0.3:4789")]
        .into_iter()
        .zip(qemu)
    {
        let mut record = host_record(h);
        record.tunnel = Some(tunnel.into());
        record.qemu = qemu.map(str::to_owned);
        node.controller.register_host(record).await.unwrap();
        beats.push(beat(&node.controller, h));
    }
    node.cordon("h3").await;
    beats
}

/// [`h2_and_h3`], with vm VNF u1 ([`VM`]) placed on h2.
async fn vm_u1_on_h2(node: &Node) -> Vec<tokio::task::JoinHandle<()>> {
    let beats = h2_and_h3(node).await;
    node.create_vnf(&node.admin, VM).await;
    node.wait_vnf(&node.admin, "u1", |v| v["phase"] == "Scheduled")
        .await;
    beats
}

/// h3 as the API shows it.
async fn h3_view(node: &Node) -> serde_json::Value {
    node.call(
        "GET",
        "/v1/hosts/{name}",
        Some("h3"),
        Some(&node.admin),
        None,
    )
    .await
    .body
}

/// Asks to move u1 to h3, which must be refused naming `to`; the refusal's detail.
async fn refused_to_h3(node: &Node) -> String {
    let r = migrate(node, r#"{"to": "h3"}"#).await;
    assert_eq!(r.status, 422, "{}", r.body);
    assert_eq!(r.error_paths(), ["to"], "{}", r.body);
    r.body["detail"].as_str().unwrap().to_owned()
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
    for (h, tunnel) in [
        ("h2", Some("127.0.0.2:4789")),
        ("h3", Some("127.0.0.3:4789")),
        ("h4", None),
    ] {
        let mut record = host_record(h);
        record.tunnel = tunnel.map(Into::into);
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
    // The destination takes state only from the source's tunnel address.
    let dest = node.controller.assignments("h3").await.unwrap();
    assert_eq!(dest[0].active_from.as_deref(), Some("127.0.0.2:4789"));
    assert_eq!(
        source[0].standby.as_ref().unwrap().address,
        "127.0.0.3:4789"
    );
    assert!(source[0].active_from.is_none(), "an active takes no state");
    // Both ends of the stream hold its key, and nobody else is given one.
    let key = source[0].standby.as_ref().unwrap().key.clone();
    assert_eq!(dest[0].active_key.as_ref(), Some(&key));
    assert!(source[0].active_key.is_none());

    // A controller opened again on the store restores the move (the standby of a VNF
    // without redundancy) and keeps it.
    let again = Controller::open(node.store.clone(), telvirt_sched::SchedConfig::default())
        .await
        .unwrap();
    let admin = telvirt_controller::Caller {
        name: "admin".into(),
    };
    assert!(again.vnf(&admin, "u1").await.unwrap().migration.is_some());
    // The cluster's secret is kept in the store: the same key from another controller.
    let dest_again = again.assignments("h3").await.unwrap();
    assert_eq!(dest_again[0].active_key.as_ref(), Some(&key));
    drop(again);

    // The replication secret is not rotated under a move: 409 naming it, the key kept.
    let r = rotate_secret(&node, &node.admin).await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(
        r.body["detail"].as_str().unwrap().contains("u1 (h2 -> h3)"),
        "{}",
        r.body
    );
    let dest = node.controller.assignments("h3").await.unwrap();
    assert_eq!(dest[0].active_key.as_ref(), Some(&key));

    // Cancelled: h3 is free again, h2 keeps running it; a second cancel has nothing to end.
    let r = migrate(&node, r#"{"cancel": true}"#).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.get("migration").is_none(), "{}", r.body);
    assert_eq!(role_hosts(&r.body), [("active".into(), "h2".into())]);
    assert_eq!(migrate(&node, r#"{"cancel": true}"#).await.status, 409);
    consistent(&node).await;

    // Again, to the end: the destination runs, the source reports the stream synced.
    assert_eq!(migrate(&node, r#"{"to": "h3"}"#).await.status, 200);
    // Another move, another key: nothing tagged for the cancelled one is taken.
    let source = node.controller.assignments("h2").await.unwrap();
    let second_key = source[0].standby.as_ref().unwrap().key.clone();
    assert_ne!(second_key, key);
    let dest = node.controller.assignments("h3").await.unwrap();
    assert_eq!(dest[0].active_key.as_ref(), Some(&second_key));
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
        guest: None,
        packets_passed: 0,
        frozen_us: None,
        freeze_phases: None,
        move_id: 0,
    };
    // Synced: the source is asked to freeze and hand its last updates over (an event says
    // so); nothing switches yet.
    report(&node.controller, "h2", Phase::Running, Some(synced.clone())).await;
    let handing = node.vnf_json("u1").await;
    assert!(handing["migration"]["handoff_at"].is_string(), "{handing}");
    assert_eq!(role_hosts(&handing).len(), 2, "{handing}");
    let source = node.controller.assignments("h2").await.unwrap();
    assert!(source[0].hand_off, "{source:?}");
    assert!(
        !node.controller.assignments("h3").await.unwrap()[0].hand_off,
        "only the source freezes"
    );
    let asked = node.events("u1").await.pop().unwrap();
    assert!(
        asked["reason"]
            .as_str()
            .unwrap()
            .contains("freezing on host h2 between two batches"),
        "{asked}"
    );
    // Its report that the last batch after the freeze was acknowledged ends the move.
    let handed = ReplicationStatus {
        state: "handed-off".into(),
        updates: 9,
        packets_passed: 41,
        frozen_us: Some(730),
        freeze_phases: Some(telvirt_model::api::FreezePhases {
            until_batch_us: 500,
            take_us: 30,
            exchange_us: 200,
        }),
        ..synced
    };
    // While the destination is not running, the handed-off move waits for it, and a cancel
    // is refused: the destination holds the state and the queued packets.
    report(&node.controller, "h3", Phase::Starting, None).await;
    report(&node.controller, "h2", Phase::Running, Some(handed.clone())).await;
    assert!(node.vnf_json("u1").await["migration"].is_object());
    let r = migrate(&node, r#"{"cancel": true}"#).await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(
        r.body
            .to_string()
            .contains("handed its state and queued packets to host h3"),
        "{}",
        r.body
    );
    report(&node.controller, "h3", Phase::Running, None).await;
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
            .contains("moved from host h2 to host h3 (9 map updates streamed, the last after the source froze; frozen for 730 µs (500 µs until its last batch began, 30 µs taking it, 200 µs until the destination acknowledged it); 41 packets it queued meanwhile passed on)"),
        "{last}"
    );
    consistent(&node).await;
    beats.into_iter().for_each(|b| b.abort());
}

/// A controller with hosts h2 and h3, and wasm VNF u1 running on h2 moving to h3 (its move's
/// deadline the default: a test sets 300 ms where it wants the move to run out of time, as
/// the controller reads it at each check).
async fn moving_u1() -> (Node, Vec<tokio::task::JoinHandle<()>>) {
    let node = Node::start_monitored(None).await;
    let beats = h2_and_h3(&node).await;
    node.create_vnf(&node.admin, &wasm_vnf("u1")).await;
    node.wait_vnf(&node.admin, "u1", |v| v["phase"] == "Scheduled")
        .await;
    report(&node.controller, "h2", Phase::Running, None).await;
    node.uncordon("h3").await;
    assert_eq!(migrate(&node, r#"{"to": "h3"}"#).await.status, 200);
    (node, beats)
}

/// A wasm VNF that is moving is not upgraded (its destination runs the module its record
/// names): 409 naming the move, nothing changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moving_vnf_is_not_upgraded() {
    let (node, beats) = moving_u1().await;
    let before = node.vnf_json("u1").await;
    let body = format!(r#"{{"module": "{}"}}"#, common::firewall_ref());
    let r = node
        .call(
            "POST",
            "/v1/vnfs/{name}/upgrade",
            Some("u1"),
            Some(&node.admin),
            Some((body.as_bytes(), "application/json")),
        )
        .await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(
        r.body["detail"]
            .as_str()
            .unwrap()
            .contains("is moving from host h2 to host h3"),
        "{}",
        r.body
    );
    let after = node.vnf_json("u1").await;
    assert_eq!(after["descriptor"], before["descriptor"]);
    assert_eq!(after["generation"], before["generation"]);
    beats.into_iter().for_each(|b| b.abort());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_that_does_not_hand_off_in_time_goes_on_and_the_move_is_cancelled() {
    let (node, beats) = moving_u1().await;
    report(&node.controller, "h3", Phase::Running, None).await;
    // The stream synced: the source is asked to hand off, and never says it did.
    let synced = ReplicationStatus {
        standby_host: "h3".into(),
        state: "synced".into(),
        lag_us: 100,
        updates: 3,
        snapshots: 1,
        bytes: 64,
        error: None,
        guest: None,
        packets_passed: 0,
        frozen_us: None,
        freeze_phases: None,
        move_id: 0,
    };
    report(&node.controller, "h2", Phase::Running, Some(synced.clone())).await;
    assert!(node.controller.assignments("h2").await.unwrap()[0].hand_off);
    // Asked to hand off: from now the move has 300 ms since it began (long gone on a slow
    // host: then it runs out at the next check).
    node.controller
        .set_move_deadline(std::time::Duration::from_millis(300));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while node.vnf_json("u1").await.get("migration").is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "the hand-off never expired"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        report(&node.controller, "h2", Phase::Running, Some(synced.clone())).await;
    }
    // It goes on where it ran, unfrozen; the event says why.
    let v = node.vnf_json("u1").await;
    assert_eq!(role_hosts(&v), [("active".into(), "h2".into())], "{v}");
    let source = node.controller.assignments("h2").await.unwrap();
    assert!(
        !source[0].hand_off && source[0].standby.is_none(),
        "{source:?}"
    );
    let last = node.events("u1").await.pop().unwrap();
    let reason = last["reason"].as_str().unwrap();
    assert!(
        reason.contains("host h2 had not handed the move to host h3 over")
            && reason.contains("ms after it was asked")
            && reason.contains("its stream is synced")
            && reason.ends_with("cancelled, it runs on h2, what it queued first"),
        "{reason}"
    );
    consistent(&node).await;
    beats.into_iter().for_each(|b| b.abort());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_past_its_deadline_is_cancelled_saying_what_was_missing() {
    let (node, beats) = moving_u1().await;
    node.controller
        .set_move_deadline(std::time::Duration::from_millis(300));
    // The destination never runs; the source keeps reporting a stream that cannot connect.
    let failing = ReplicationStatus {
        standby_host: "h3".into(),
        state: "failing".into(),
        lag_us: 0,
        updates: 0,
        snapshots: 0,
        bytes: 0,
        error: Some("connecting to 127.0.0.1:4789: Connection refused".into()),
        guest: None,
        packets_passed: 0,
        frozen_us: None,
        freeze_phases: None,
        move_id: 0,
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

/// A vm VNF that can move: the default guest, no disk, NICs or devices.
const VM: &str = "apiVersion: telvirt/v1\nkind: Vnf\nmetadata: { name: u1 }\nspec:\n  runtime: vm\n  cpu: { policy: dedicated, count: 1 }\n  vm: { memory: 256MiB }\n";

/// Plays `host`'s agent reporting `stream` (past the move deadline) until u1's move ends; it
/// must end with u1 active on h2 alone and an event saying `why`.
async fn move_ends_on_h2(node: &Node, host: &str, stream: &ReplicationStatus, why: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while node.vnf_json("u1").await.get("migration").is_some() {
        assert!(std::time::Instant::now() < deadline, "the move never ended");
        report(&node.controller, host, Phase::Running, Some(stream.clone())).await;
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let v = node.vnf_json("u1").await;
    assert_eq!(role_hosts(&v), [("active".into(), "h2".into())], "{v}");
    let last = node.events("u1").await.pop().unwrap();
    assert!(last["reason"].as_str().unwrap().contains(why), "{last}");
    consistent(node).await;
}

/// A guest under KVM moves only to a host whose agent does not report TCG; the destination's
/// assignment names the accelerator (its agent refuses a KVM guest it cannot run), its
/// source's does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kvm_guest_moves_only_where_guests_are_not_emulated_and_keeps_kvm_there() {
    let node = Node::start_monitored(None).await;
    let beats = vm_u1_on_h2(&node).await;
    observe_u1(
        &node.controller,
        "h2",
        Phase::Running,
        None,
        None,
        Some(Accelerator::Kvm),
    )
    .await;
    let v = node.vnf_json("u1").await;
    assert_eq!(v["accel"], "kvm", "{v}");
    node.uncordon("h3").await;
    let h3 = |accel: Option<Accelerator>| {
        let mut record = host_record("h3");
        record.tunnel = Some("127.0.0.3:4789".into());
        record.accel = accel;
        record
    };
    node.controller
        .register_host(h3(Some(Accelerator::Tcg)))
        .await
        .unwrap();
    let host = h3_view(&node).await;
    assert_eq!(host["accel"], "tcg", "{host}");
    let before = node.vnf_json("u1").await;
    let detail = refused_to_h3(&node).await;
    assert!(
        detail.contains("host h3 runs guests under TCG") && detail.contains("under KVM"),
        "{detail}"
    );
    assert_eq!(node.vnf_json("u1").await, before);
    let r = migrate(&node, "{}").await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert_eq!(node.vnf_json("u1").await, before);

    // h3's accelerator unknown (not probed yet): the move starts, pinned to KVM there.
    node.controller.register_host(h3(None)).await.unwrap();
    let r = migrate(&node, r#"{"to": "h3"}"#).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let accel_on = |assigned: Vec<telvirt_model::api::Assignment>| {
        assigned
            .into_iter()
            .find(|a| a.vnf.as_str() == "u1")
            .and_then(|a| a.descriptor.spec.vm?.accel)
    };
    assert_eq!(
        accel_on(node.controller.assignments("h3").await.unwrap()),
        Some(Accelerator::Kvm)
    );
    assert_eq!(
        accel_on(node.controller.assignments("h2").await.unwrap()),
        None
    );
    for b in beats {
        b.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_moves_to_a_qemu_as_new_that_has_its_machine_type_and_nowhere_else() {
    let node = Node::start_monitored(None).await;
    let beats = h2_and_h3_with(&node, [Some("7.2"), Some("8.0")]).await;
    node.create_vnf(&node.admin, VM).await;
    node.wait_vnf(&node.admin, "u1", |v| v["phase"] == "Scheduled")
        .await;
    report(&node.controller, "h2", Phase::Running, None).await;
    node.uncordon("h3").await;
    let host = h3_view(&node).await;
    assert_eq!(host["qemu"], "8.0", "{host}");

    // Refused, naming `to` and both versions; nothing changes (no standby kept on h3).
    let before = node.vnf_json("u1").await;
    let detail = refused_to_h3(&node).await;
    // Neither the guest's machine type nor h3's types are known: the versions must match.
    assert!(
        detail.contains("host h3 runs QEMU 8.0")
            && detail.contains("host h2 QEMU 7.2")
            && detail.contains("has not reported the type the guest runs on"),
        "{detail}"
    );
    assert_eq!(node.vnf_json("u1").await, before);
    // No host named: h3 is left out of the pick, and no other host can take it.
    let r = migrate(&node, "{}").await;
    assert_eq!(r.status, 409, "{}", r.body);
    let detail = r.body["detail"].as_str().unwrap();
    assert!(
        detail.contains("no room for vnf u1 on another host")
            && detail.contains("h3: cannot take this VNF")
            && detail.contains("; host h3 runs QEMU 8.0"),
        "{detail}"
    );
    assert_eq!(node.vnf_json("u1").await, before);

    // h2 reports the type the guest runs on: the VNF keeps it.
    report_machine(&node.controller, "pc-i440fx-7.2").await;
    let v = node.vnf_json("u1").await;
    assert_eq!(v["machine"], "pc-i440fx-7.2", "{v}");
    let before = node.vnf_json("u1").await;
    let h3 = |qemu: &str, machines: &[&str]| {
        let mut record = host_record("h3");
        record.tunnel = Some("127.0.0.3:4789".into());
        record.qemu = Some(qemu.into());
        record.qemu_machines = machines.iter().map(|m| (*m).to_owned()).collect();
        record
    };
    // A newer QEMU without that type, an older QEMU: refused, naming why; nothing changes.
    for (record, why) in [
        (
            h3("8.0", &["pc-i440fx-8.0", "pc-i440fx-7.1"]),
            "host h3's QEMU 8.0 has no machine type pc-i440fx-7.2",
        ),
        (
            h3("7.1", &["pc-i440fx-7.1"]),
            "host h3 runs QEMU 7.1, older than QEMU 7.2",
        ),
    ] {
        node.controller.register_host(record).await.unwrap();
        let detail = refused_to_h3(&node).await;
        assert!(detail.contains(why), "{detail}");
        assert_eq!(node.vnf_json("u1").await, before);
    }

    node.controller
        .register_host(h3("8.0", &["pc-i440fx-8.0", "pc-i440fx-7.2"]))
        .await
        .unwrap();

    // A newer QEMU that has the guest's type: the move starts, and h3's assignment pins it.
    let r = migrate(&node, r#"{"to": "h3"}"#).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["migration"]["to"], "h3", "{}", r.body);
    let assigned = node.controller.assignments("h3").await.unwrap();
    let pinned = assigned
        .iter()
        .find(|a| a.vnf.as_str() == "u1")
        .and_then(|a| a.descriptor.spec.vm.as_ref()?.machine.clone());
    assert_eq!(pinned.as_deref(), Some("pc-i440fx-7.2"));
    // Its own host's assignment names the type only once that host's agent reports having it
    // (an older agent, or a QEMU without the type, starts the guest on its own newest).
    let machine_on = |assigned: Vec<telvirt_model::api::Assignment>| {
        assigned
            .into_iter()
            .find(|a| a.vnf.as_str() == "u1")
            .and_then(|a| a.descriptor.spec.vm?.machine)
    };
    assert_eq!(
        machine_on(node.controller.assignments("h2").await.unwrap()),
        None
    );
    let mut h2 = host_record("h2");
    h2.tunnel = Some("127.0.0.2:4789".into());
    h2.qemu = Some("7.2".into());
    h2.qemu_machines = vec!["pc-i440fx-7.2".into(), "pc-i440fx-7.1".into()];
    node.controller.register_host(h2).await.unwrap();
    assert_eq!(
        machine_on(node.controller.assignments("h2").await.unwrap()).as_deref(),
        Some("pc-i440fx-7.2")
    );
    for b in beats {
        b.abort();
    }
}

/// A move without a destination goes only to a host that can take the guest: one whose QEMU
/// is older is passed over for one with the same version, and with none left the refusal says
/// why each was left out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_without_a_destination_picks_only_a_host_that_can_take_the_guest() {
    let node = Node::start_monitored(None).await;
    let mut beats = h2_and_h3_with(&node, [Some("7.2"), Some("7.1")]).await;
    node.create_vnf(&node.admin, VM).await;
    node.wait_vnf(&node.admin, "u1", |v| v["phase"] == "Scheduled")
        .await;
    report(&node.controller, "h2", Phase::Running, None).await;
    node.uncordon("h3").await;
    let before = node.vnf_json("u1").await;
    let r = migrate(&node, "{}").await;
    assert_eq!(r.status, 409, "{}", r.body);
    let detail = r.body["detail"].as_str().unwrap();
    assert!(
        detail.contains("h3: cannot take this VNF")
            && detail.contains("; host h3 runs QEMU 7.1, older than QEMU 7.2"),
        "{detail}"
    );
    assert_eq!(node.vnf_json("u1").await, before);
    assert!(node.controller.assignments("h3").await.unwrap().is_empty());

    // h4 joins with h2's version, after h3 in the scheduler's order: the pick is h4.
    let mut h4 = host_record("h4");
    h4.tunnel = Some("127.0.0.4:4789".into());
    h4.qemu = Some("7.2".into());
    node.controller.register_host(h4).await.unwrap();
    node.controller.heartbeat("h4").await.unwrap();
    beats.push(beat(&node.controller, "h4"));
    let r = migrate(&node, "{}").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["migration"]["to"], "h4", "{}", r.body);
    assert!(node.controller.assignments("h3").await.unwrap().is_empty());
    for b in beats {
        b.abort();
    }
}

/// The report of u1's stream to h3 once it completed (its second stream, opened at 2 s), with
/// QEMU's event times.
fn completed_stream() -> ReplicationStatus {
    ReplicationStatus {
        standby_host: "h3".into(),
        state: "synced".into(),
        lag_us: 0,
        updates: 0,
        snapshots: 0,
        bytes: 300 << 20,
        error: None,
        guest: Some(telvirt_model::api::GuestStream {
            status: "completed".into(),
            total_ms: 2100,
            transferred_bytes: 300 << 20,
            remaining_bytes: 0,
            total_bytes: 256 << 20,
            dirty_pages_per_s: 0,
            downtime_ms: Some(42),
            stopped_at_us: Some(1_800_000_000_000_000),
            commit_point_at_us: Some(1_800_000_000_001_100),
            continued_at_us: Some(1_800_000_000_001_800),
            completed_at_us: Some(1_800_000_000_003_200),
            opened_ms: 2_000,
            ..Default::default()
        }),
        packets_passed: 0,
        frozen_us: None,
        freeze_phases: None,
        move_id: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_moves_by_its_guest_stream_and_what_cannot_follow_it_is_refused() {
    let node = Node::start_monitored(None).await;
    let beats = h2_and_h3(&node).await;
    node.create_vnf(&node.admin, VM).await;
    for (name, vm) in [
        ("ud", "{ memory: 256MiB, disk: /var/lib/telvirt/ud.qcow2 }"),
        ("ug", "{ memory: 256MiB }"),
    ] {
        // In a shared group: h2 has no dedicated cpus for all of them.
        let text = VM
            .replace("name: u1", &format!("name: {name}"))
            .replace("policy: dedicated", "policy: shared, group: edge")
            .replace(
                "vm: { memory: 256MiB }",
                &format!("ports: [n3]\n  vm: {vm}"),
            );
        node.create_vnf(&node.admin, &text).await;
    }
    for name in ["u1", "ud", "ug"] {
        node.wait_vnf(&node.admin, name, |v| v["phase"] == "Scheduled")
            .await;
    }
    report(&node.controller, "h2", Phase::Running, None).await;
    for name in ["ud", "ug"] {
        node.controller
            .observe("h2", observation(name, Phase::Running))
            .await
            .unwrap();
    }
    // ug holds a host device.
    let r = node
        .call(
            "POST",
            "/v1/vnfs/{name}/devices",
            Some("ug"),
            Some(&node.admin),
            Some((br#"{"id":"rng0","kind":"rng"}"#.as_slice(), JSON)),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    node.uncordon("h3").await;

    // What stays on its host refuses the move, naming the field; nothing changes.
    for (name, body, field, needle) in [
        (
            "ud",
            r#"{"to": "h3"}"#,
            "spec.vm.disk",
            "boot disk stays on its host",
        ),
        (
            "ug",
            r#"{"to": "h3"}"#,
            "devices",
            "holds host devices (rng0)",
        ),
        (
            "u1",
            r#"{"to": "h3", "engine": "pulley"}"#,
            "engine",
            "wasm VNFs only",
        ),
    ] {
        let before = node.vnf_json(name).await;
        let r = node
            .call(
                "POST",
                "/v1/vnfs/{name}/migrate",
                Some(name),
                Some(&node.admin),
                Some((body.as_bytes(), JSON)),
            )
            .await;
        assert_eq!(r.status, 422, "{name}: {}", r.body);
        assert_eq!(r.error_paths(), [field], "{}", r.body);
        assert!(
            r.body["detail"].as_str().unwrap().contains(needle),
            "{}",
            r.body
        );
        assert_eq!(node.vnf_json(name).await, before);
    }

    // The move: the source's assignment names the destination, the destination's says where
    // its guest comes from (it waits instead of booting).
    let r = migrate(&node, r#"{"to": "h3"}"#).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let source = node.controller.assignments("h2").await.unwrap();
    let source = source.iter().find(|a| a.vnf.as_str() == "u1").unwrap();
    assert_eq!(source.standby.as_ref().unwrap().host, "h3");
    assert_eq!(source.incoming_from, None);
    let dest = node.controller.assignments("h3").await.unwrap();
    assert_eq!(dest[0].incoming_from.as_deref(), Some("h2"));
    // The move's id: the source's assignment names it (its stream's reports carry it).
    let first_move = node.vnf_json("u1").await["migration"]["id"]
        .as_u64()
        .unwrap();
    assert!(first_move > 0);
    assert_eq!(source.standby.as_ref().unwrap().move_id, first_move);

    // A cancel recorded before the stream's commit point wins: the source's report of its
    // commit point comes too late, and its assignment names no destination, so it cancels
    // the stream and the guest runs on at h2. Then the move is asked again.
    assert_eq!(migrate(&node, r#"{"cancel": true}"#).await.status, 200);
    let late = ReplicationStatus {
        standby_host: "h3".into(),
        state: "streaming".into(),
        lag_us: 0,
        updates: 0,
        snapshots: 0,
        bytes: 256 << 20,
        error: None,
        guest: Some(telvirt_model::api::GuestStream {
            status: "pre-switchover".into(),
            total_ms: 2000,
            transferred_bytes: 256 << 20,
            remaining_bytes: 4 << 20,
            total_bytes: 256 << 20,
            dirty_pages_per_s: 0,
            downtime_ms: None,
            stopped_at_us: None,
            opened_ms: 1_000,
            ..Default::default()
        }),
        packets_passed: 0,
        frozen_us: None,
        freeze_phases: None,
        move_id: 0,
    };
    report(&node.controller, "h2", Phase::Running, Some(late.clone())).await;
    let source = node.controller.assignments("h2").await.unwrap();
    let source = source.iter().find(|a| a.vnf.as_str() == "u1").unwrap();
    assert_eq!(source.standby, None);
    let v = node.vnf_json("u1").await;
    assert!(v.get("migration").is_none(), "{v}");
    assert_eq!(role_hosts(&v), [("active".into(), "h2".into())], "{v}");
    report(&node.controller, "h2", Phase::Running, None).await;
    assert_eq!(migrate(&node, r#"{"to": "h3"}"#).await.status, 200);
    let second_move = node.vnf_json("u1").await["migration"]["id"]
        .as_u64()
        .unwrap();
    assert!(second_move > first_move, "each move has its own id");
    let source = node.controller.assignments("h2").await.unwrap();
    let source = source.iter().find(|a| a.vnf.as_str() == "u1").unwrap();
    assert_eq!(source.standby.as_ref().unwrap().move_id, second_move);
    // A report of the cancelled move's stream at its commit point that lands only now (it
    // left before the cancel) names that move: it does not commit this one, to the same host.
    let cancelled = ReplicationStatus {
        move_id: first_move,
        ..late.clone()
    };
    report(&node.controller, "h2", Phase::Running, Some(cancelled)).await;
    let v = node.vnf_json("u1").await;
    assert!(v["migration"].get("committed_at").is_none(), "{v}");
    // Nor does it stand for this move's stream, which has not reported yet.
    assert!(v.get("replication").is_none(), "{v}");
    // The same report of this move's stream does.
    let this = ReplicationStatus {
        move_id: second_move,
        ..late.clone()
    };
    report(&node.controller, "h2", Phase::Running, Some(this)).await;
    let v = node.vnf_json("u1").await;
    assert!(v["migration"]["committed_at"].is_string(), "{v}");
    let failed_this = ReplicationStatus {
        state: "failing".into(),
        guest: Some(telvirt_model::api::GuestStream {
            status: "failed".into(),
            ..late.guest.clone().unwrap()
        }),
        move_id: second_move,
        ..late.clone()
    };
    report(&node.controller, "h2", Phase::Running, Some(failed_this)).await;
    assert_eq!(migrate(&node, r#"{"cancel": true}"#).await.status, 200);
    report(&node.controller, "h2", Phase::Running, None).await;
    assert_eq!(migrate(&node, r#"{"to": "h3"}"#).await.status, 200);

    // A stream still copying is not committed; one that asks to pass its commit point ahead
    // of its final copy (QEMU still streams, the guest still runs) is, as one waiting at it.
    let active = |commit_ahead: bool| ReplicationStatus {
        guest: Some(telvirt_model::api::GuestStream {
            status: "active".into(),
            commit_ahead,
            ..late.guest.clone().unwrap()
        }),
        ..late.clone()
    };
    report(&node.controller, "h2", Phase::Running, Some(active(false))).await;
    let v = node.vnf_json("u1").await;
    assert!(v["migration"].get("committed_at").is_none(), "{v}");
    report(&node.controller, "h2", Phase::Running, Some(active(true))).await;
    let v = node.vnf_json("u1").await;
    assert!(v["migration"]["committed_at"].is_string(), "{v}");
    assert_eq!(migrate(&node, r#"{"cancel": true}"#).await.status, 409);
    // Its guest still runs at h2 (the destination holds none: the healer must not fail over
    // there). The stream committed ahead fails (its source gave up on its final copy): the
    // move may be cancelled again. Then the move is asked again.
    let failed = ReplicationStatus {
        state: "failing".into(),
        guest: Some(telvirt_model::api::GuestStream {
            status: "failed".into(),
            ..active(true).guest.unwrap()
        }),
        ..late.clone()
    };
    report(&node.controller, "h2", Phase::Running, Some(failed)).await;
    // The ahead ask's own report, sent alongside, lands after the failure: it left before,
    // and commits nothing.
    report(&node.controller, "h2", Phase::Running, Some(active(true))).await;
    assert_eq!(node.vnf_json("u1").await["replication"]["state"], "failing");
    assert_eq!(migrate(&node, r#"{"cancel": true}"#).await.status, 200);
    report(&node.controller, "h2", Phase::Running, None).await;
    assert_eq!(migrate(&node, r#"{"to": "h3"}"#).await.status, 200);
    let v = node.vnf_json("u1").await;
    assert!(
        v["migration"].get("committed_at").is_none(),
        "a new move: {v}"
    );

    // The stream waits at its commit point (the guest stopped at h2): once that report is
    // recorded the move cannot be cancelled (the source reads its assignment next, finds the
    // move standing and lets the final copy through).
    report(&node.controller, "h2", Phase::Running, Some(late.clone())).await;
    assert!(
        node.vnf_json("u1").await["migration"]["committed_at"].is_string(),
        "the commit point is recorded"
    );
    // A report that left the agent before (its stream still `active`) lands after it: the
    // commit stands.
    let stale = ReplicationStatus {
        guest: Some(telvirt_model::api::GuestStream {
            status: "active".into(),
            ..late.guest.clone().unwrap()
        }),
        ..late.clone()
    };
    report(&node.controller, "h2", Phase::Running, Some(stale)).await;
    // Nor does a failure of an earlier stream (the commit is the second stream's).
    let second = ReplicationStatus {
        guest: Some(telvirt_model::api::GuestStream {
            opened_ms: 2_000,
            ..late.guest.clone().unwrap()
        }),
        ..late.clone()
    };
    report(&node.controller, "h2", Phase::Running, Some(second)).await;
    // A late report of the first stream at its commit point does not lower the commit either.
    report(&node.controller, "h2", Phase::Running, Some(late.clone())).await;
    let first_failed = ReplicationStatus {
        state: "failing".into(),
        guest: Some(telvirt_model::api::GuestStream {
            status: "failed".into(),
            opened_ms: 1_000,
            ..late.guest.clone().unwrap()
        }),
        ..late.clone()
    };
    report(&node.controller, "h2", Phase::Running, Some(first_failed)).await;
    assert_eq!(
        node.vnf_json("u1").await["migration"]["committed_stream"],
        2_000
    );
    let r = migrate(&node, r#"{"cancel": true}"#).await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(
        r.body["detail"]
            .as_str()
            .unwrap()
            .contains("its stream passed its commit point"),
        "{}",
        r.body
    );
    let source = node.controller.assignments("h2").await.unwrap();
    let source = source.iter().find(|a| a.vnf.as_str() == "u1").unwrap();
    assert_eq!(source.standby.as_ref().unwrap().host, "h3");

    // The stream completed: the guest runs only at h3 now, so the move cannot be cancelled.
    let completed = completed_stream();
    report(
        &node.controller,
        "h2",
        Phase::Running,
        Some(completed.clone()),
    )
    .await;
    let r = migrate(&node, r#"{"cancel": true}"#).await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(node.vnf_json("u1").await["migration"].is_object());

    // The destination runs its guest, resumed 6.5 ms after its source stopped it: the roles
    // swap, h2 is freed, the event has the figures.
    node.controller
        .observe(
            "h3",
            Observation {
                resumed_at_us: Some(1_800_000_000_006_500),
                ..observation("u1", Phase::Running)
            },
        )
        .await
        .unwrap();
    let moved = node.vnf_json("u1").await;
    assert_eq!(
        role_hosts(&moved),
        [("active".into(), "h3".into())],
        "{moved}"
    );
    assert!(moved.get("migration").is_none(), "{moved}");
    let dest = node.controller.assignments("h3").await.unwrap();
    assert_eq!(dest[0].incoming_from, None, "the guest runs there now");
    let last = node.events("u1").await.pop().unwrap();
    assert!(
        last["reason"].as_str().unwrap().contains(
            "moved from host h2 to host h3 (300 MiB of guest memory streamed in 2100 ms, the guest stopped for 42 ms by its source's measure, 6.5 ms until its destination resumed it (the two hosts' clocks: 1.1 ms stopping, 0.7 ms at the commit point, 1.4 ms final copy, 3.3 ms at the destination))"
        ),
        "{last}"
    );
    consistent(&node).await;

    // Back to h2, whose agent never reports the guest running: past the deadline a completed
    // stream switches anyway (cancelling would stop the only guest), and the event says so.
    report(&node.controller, "h3", Phase::Running, None).await;
    node.controller
        .set_move_deadline(std::time::Duration::from_millis(300));
    assert_eq!(migrate(&node, r#"{"to": "h2"}"#).await.status, 200);
    let back = ReplicationStatus {
        standby_host: "h2".into(),
        ..completed.clone()
    };
    move_ends_on_h2(
        &node,
        "h3",
        &back,
        "host h2 had not reported the guest running by the move's deadline",
    )
    .await;

    // A move past its commit point whose stream then failed (the guest runs on at h2): not
    // cancellable by hand while committed; once the failure is reported, ended at its deadline
    // as any move that did not end.
    report(&node.controller, "h2", Phase::Running, None).await;
    assert_eq!(migrate(&node, r#"{"to": "h3"}"#).await.status, 200);
    report(&node.controller, "h2", Phase::Running, Some(late.clone())).await;
    assert_eq!(migrate(&node, r#"{"cancel": true}"#).await.status, 409);
    let failed = ReplicationStatus {
        state: "failing".into(),
        error: Some("the stream to a passed socket ended: Connection reset".into()),
        guest: Some(telvirt_model::api::GuestStream {
            status: "failed".into(),
            ..late.guest.clone().unwrap()
        }),
        ..late.clone()
    };
    move_ends_on_h2(
        &node,
        "h2",
        &failed,
        "the move to host h3 did not end within 300ms",
    )
    .await;
    beats.into_iter().for_each(|b| b.abort());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_whose_source_host_fails_mid_stream_is_not_failed_over_to_its_waiting_destination() {
    let heal_after = std::time::Duration::from_millis(3000);
    let node = Node::start_monitored(Some(heal_after)).await;
    let mut beats = vm_u1_on_h2(&node).await;
    report(&node.controller, "h2", Phase::Running, None).await;
    node.uncordon("h3").await;
    assert_eq!(migrate(&node, r#"{"to": "h3"}"#).await.status, 200);
    // h3's QEMU waits for the stream, which runs.
    report(&node.controller, "h3", Phase::Starting, None).await;
    let streaming = ReplicationStatus {
        standby_host: "h3".into(),
        state: "streaming".into(),
        lag_us: 0,
        updates: 0,
        snapshots: 0,
        bytes: 64 << 20,
        error: None,
        guest: Some(telvirt_model::api::GuestStream {
            status: "active".into(),
            total_ms: 300,
            transferred_bytes: 64 << 20,
            remaining_bytes: 192 << 20,
            total_bytes: 256 << 20,
            dirty_pages_per_s: 0,
            downtime_ms: None,
            stopped_at_us: None,
            opened_ms: 1_000,
            ..Default::default()
        }),
        packets_passed: 0,
        frozen_us: None,
        freeze_phases: None,
        move_id: 0,
    };
    report(&node.controller, "h2", Phase::Running, Some(streaming)).await;

    // h2's agent falls silent: its lease lapses (300 ms), u1 is Unknown. The QEMU waiting on
    // h3 holds no guest, so nothing fails over to it: for the heal delay u1 stays on h2 with
    // its move (its host may only be slow).
    let silent = std::time::Instant::now();
    beats.remove(0).abort();
    node.wait_vnf(&node.admin, "u1", |v| v["phase"] == "Unknown")
        .await;
    // Watched for half the heal delay: a beat task starved before its abort beat last a
    // while before `silent`, and the heal comes that much sooner.
    while silent.elapsed() < heal_after / 2 {
        let v = node.vnf_json("u1").await;
        assert_eq!(
            role_hosts(&v),
            [
                ("active".into(), "h2".into()),
                ("standby".into(), "h3".into())
            ],
            "{v}"
        );
        assert_eq!(v["migration"]["to"], "h3", "{v}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    // Past the heal delay the move ends (h3's place freed) and u1 is healed as any VNF: a new
    // guest boots on h3, the one Ready host.
    let healed = node
        .wait_vnf(&node.admin, "u1", |v| {
            v["placements"].as_array().is_some_and(|p| p.len() == 1)
                && v["placements"][0]["host"] == "h3"
        })
        .await;
    assert!(healed.get("migration").is_none(), "{healed}");
    assert_eq!(healed["phase"], "Scheduled", "{healed}");
    let reasons: Vec<String> = node
        .events("u1")
        .await
        .iter()
        .filter(|e| e["actor"] == "healer")
        .filter_map(|e| e["reason"].as_str().map(str::to_owned))
        .collect();
    assert!(
        reasons.iter().any(|r| r.contains(
            "host h2 failed during the move to host h3: the move ended (the QEMU waiting there held no guest)"
        )),
        "{reasons:?}"
    );
    let dest = node.controller.assignments("h3").await.unwrap();
    assert_eq!(dest[0].incoming_from, None, "a new guest boots there");
    consistent(&node).await;
    beats.into_iter().for_each(|b| b.abort());
}

/// A vm move whose guest breaks on its arrival (its stream completed, the destination's agent
/// reports the instance failed once its QEMU is gone) ends at once on its source, whose
/// assignment says to resume the stopped copy its stream left there; nothing of the move
/// stays, and the next move starts with that word gone. A destination that only waits (no
/// failure) does not end a committed move.
/// Plays h3's agent reporting that u1's guest broke on its arrival (its QEMU gone): the move
/// must end at once; u1 as the API shows it then.
async fn arrival_broke_at_h3(node: &Node) -> serde_json::Value {
    node.controller
        .observe(
            "h3",
            Observation {
                arrival_failed: true,
                ..observation("u1", Phase::Failed)
            },
        )
        .await
        .unwrap();
    let v = node.vnf_json("u1").await;
    assert!(v.get("migration").is_none(), "{v}");
    v
}

/// Moves u1 (running on h2) to h3, whose agent says it waits, and plays h2's agent reporting
/// the guest stream at its commit point, then completed: the guest is stopped at h2 and the
/// move stands.
async fn move_u1_to_h3_past_its_stream(node: &Node) {
    let move_id = move_u1_to_h3(node).await;
    stream_u1_past_its_commit(node, move_id).await;
}

/// Asks to move u1 to h3, whose agent says it waits; the move's id.
async fn move_u1_to_h3(node: &Node) -> u64 {
    node.uncordon("h3").await;
    assert_eq!(migrate(node, r#"{"to": "h3"}"#).await.status, 200);
    let move_id = node.vnf_json("u1").await["migration"]["id"]
        .as_u64()
        .unwrap();
    report(&node.controller, "h3", Phase::Starting, None).await;
    move_id
}

/// Plays h2's agent reporting move `move_id`'s guest stream at its commit point, then
/// completed.
async fn stream_u1_past_its_commit(node: &Node, move_id: u64) {
    let completed = ReplicationStatus {
        move_id,
        ..completed_stream()
    };
    let at_commit = ReplicationStatus {
        state: "streaming".into(),
        guest: Some(telvirt_model::api::GuestStream {
            status: "pre-switchover".into(),
            ..completed.guest.clone().unwrap()
        }),
        ..completed.clone()
    };
    report(&node.controller, "h2", Phase::Running, Some(at_commit)).await;
    report(&node.controller, "h2", Phase::Running, Some(completed)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_whose_guest_breaks_on_arrival_runs_on_from_the_copy_its_source_kept() {
    let node = Node::start_monitored(None).await;
    let beats = vm_u1_on_h2(&node).await;
    report(&node.controller, "h2", Phase::Running, None).await;
    move_u1_to_h3_past_its_stream(&node).await;
    let v = node.vnf_json("u1").await;
    assert!(v["migration"]["committed_at"].is_string(), "{v}");
    // h3 still waits (it may be taking the guest in): the move goes on.
    report(&node.controller, "h3", Phase::Starting, None).await;
    assert!(node.vnf_json("u1").await["migration"].is_object());
    let source = node.controller.assignments("h2").await.unwrap();
    assert!(!source[0].resume_moved_copy, "{source:?}");

    // h3 fails otherwise (its guest running there, a pause for a lock refused): not the end
    // of the move (the source's copy must not run beside it).
    report(&node.controller, "h3", Phase::Failed, None).await;
    assert!(node.vnf_json("u1").await["migration"].is_object());
    // h3's guest broke on arrival (its QEMU gone): the move ends on h2 at once, whose
    // assignment says to resume its copy; h3 is assigned nothing.
    let v = arrival_broke_at_h3(&node).await;
    assert_eq!(role_hosts(&v), [("active".into(), "h2".into())], "{v}");
    let source = node.controller.assignments("h2").await.unwrap();
    assert!(source[0].resume_moved_copy, "{source:?}");
    assert_eq!(source[0].standby, None);
    assert!(node.controller.assignments("h3").await.unwrap().is_empty());
    let last = node.events("u1").await.pop().unwrap();
    assert!(
        last["reason"]
            .as_str()
            .unwrap()
            .contains("the move to host h3 ended on host h2: its guest did not come to run there"),
        "{last}"
    );
    assert_eq!(last["actor"], "controller", "{last}");
    consistent(&node).await;

    assert_eq!(node.vnf_json("u1").await["resume_moved_copy"], true);
    // The next move starts without that word.
    report(&node.controller, "h2", Phase::Running, None).await;
    assert_eq!(migrate(&node, r#"{"to": "h3"}"#).await.status, 200);
    let v = node.vnf_json("u1").await;
    assert!(v.get("resume_moved_copy").is_none(), "{v}");
    beats.into_iter().for_each(|b| b.abort());
}

/// u1 as [`VM`] with one NIC, on port `in`.
const VM_WITH_NIC: &str = "apiVersion: telvirt/v1\nkind: Vnf\nmetadata: { name: u1 }\nspec:\n  runtime: vm\n  cpu: { policy: dedicated, count: 1 }\n  ports: [in]\n  vm: { memory: 256MiB, nics: [ { port: in } ] }\n";

/// Where network `edge` sends u1's traffic as host h1 (whose pinned interface feeds u1) reads
/// it, and whether h2 and h3 hold the network.
async fn u1_traffic(c: &Controller) -> (String, [bool; 2]) {
    let set = c.host_networks("h1").await.unwrap();
    let at = set.spans[0].hosts["u1"].clone();
    let mut holds = [false; 2];
    for (held, host) in holds.iter_mut().zip(["h2", "h3"]) {
        *held = !c.host_networks(host).await.unwrap().networks.is_empty();
    }
    (at, holds)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_guests_traffic_goes_to_its_destination_once_it_resumed_and_back_if_it_broke() {
    let node = Node::start_monitored(None).await;
    let mut beats = h2_and_h3(&node).await;
    // h1 holds the network through an interface pinned to it: it reads where u1's traffic goes.
    let mut h1 = host_record("h1");
    h1.tunnel = Some("127.0.0.1:4789".into());
    node.controller.register_host(h1).await.unwrap();
    beats.push(beat(&node.controller, "h1"));
    node.create_vnf(&node.admin, VM_WITH_NIC).await;
    node.wait_vnf(&node.admin, "u1", |v| v["phase"] == "Scheduled")
        .await;
    report(&node.controller, "h2", Phase::Running, None).await;
    let edge = "apiVersion: telvirt/v1\nkind: Network\nmetadata: { name: edge }\nspec:\n  links: [host:vc0@h1 -> u1.in]\n";
    let r = node.create_network(&node.admin, edge).await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(
        u1_traffic(&node.controller).await,
        ("h2".into(), [true, false])
    );

    let move_id = move_u1_to_h3(&node).await;
    // A stamp before the commit point is no arrival of this move's (a guest resumes at the
    // destination only after its final copy): it moves nothing.
    let stale = Observation {
        resumed_at_us: Some(1_700_000_000_000_000),
        ..observation("u1", Phase::Starting)
    };
    node.controller.observe("h3", stale).await.unwrap();
    assert_eq!(
        u1_traffic(&node.controller).await,
        ("h2".into(), [true, false])
    );
    assert!(node.vnf_json("u1").await["migration"]["resumed_at_us"].is_null());
    stream_u1_past_its_commit(&node, move_id).await;
    // The stream completed, the destination has not resumed the guest: the traffic stays.
    assert_eq!(
        u1_traffic(&node.controller).await,
        ("h2".into(), [true, false])
    );

    // h3 resumed the guest (its agent not yet answered): its traffic goes there before the
    // move switches, and h1, which holds none of u1, is told (a new network revision).
    let before = node
        .controller
        .wait_networks("h1", u64::MAX, std::time::Duration::ZERO)
        .await;
    node.controller
        .observe(
            "h3",
            Observation {
                resumed_at_us: Some(1_800_000_000_006_500),
                ..observation("u1", Phase::Starting)
            },
        )
        .await
        .unwrap();
    let v = node.vnf_json("u1").await;
    assert!(v["migration"].is_object(), "the move has not switched: {v}");
    assert_eq!(
        u1_traffic(&node.controller).await,
        ("h3".into(), [false, true])
    );
    let said = node.events("u1").await.pop().unwrap();
    assert!(
        said["reason"].as_str().is_some_and(|r| r.contains(
            "its guest resumed on host h3: its traffic goes there; the move switches once the guest answers"
        )),
        "{said}"
    );
    let after = node
        .controller
        .wait_networks("h1", before, std::time::Duration::from_secs(5))
        .await;
    assert_ne!(after, before, "h1 was not told u1's traffic moved");

    // Its guest broke there: the move ends at h2, and the traffic comes back with it.
    arrival_broke_at_h3(&node).await;
    assert_eq!(
        u1_traffic(&node.controller).await,
        ("h2".into(), [true, false])
    );
    consistent(&node).await;
    beats.into_iter().for_each(|b| b.abort());
}

/// A move whose agents say nothing more once its stream completed (the destination's agent
/// hung before it reported the guest running) is switched at its deadline by the host monitor,
/// with no further report to trigger it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_whose_agents_fall_silent_ends_at_its_deadline_without_a_report() {
    let node = Node::start_monitored(None).await;
    let beats = vm_u1_on_h2(&node).await;
    report(&node.controller, "h2", Phase::Running, None).await;
    node.controller
        .set_move_deadline(std::time::Duration::from_millis(500));
    move_u1_to_h3_past_its_stream(&node).await;
    // Nothing more is reported: the guest runs only at h3 (its stream completed), so past
    // the deadline h3 becomes the active.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while node.vnf_json("u1").await.get("migration").is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "the move did not end without a report: {}",
            node.vnf_json("u1").await
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let v = node.vnf_json("u1").await;
    assert_eq!(role_hosts(&v), [("active".into(), "h3".into())], "{v}");
    let last = node.events("u1").await.pop().unwrap();
    assert!(
        last["reason"]
            .as_str()
            .unwrap()
            .contains("host h3 had not reported the guest running by the move's deadline"),
        "{last}"
    );
    consistent(&node).await;
    beats.into_iter().for_each(|b| b.abort());
}
