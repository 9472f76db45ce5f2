//! `telvirt agent` as its own process against `telvirt controller`, on the same machine: the
//! host joins with a node credential and serves VNFs as `telvirt serve` does (start, maps and
//! counters read through node calls, an upgrade whose module it fetches, stop, delete); a
//! credential that is not a node's is refused.

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

mod common;
use common::{Agent, Serve, a1_agent_args, lay_out_examples, map_entries, stderr, wait_until};

/// Four dedicatable CPUs for the agent's host (as in the serve tests).
const INVENTORY: &str = "hosts:\n  - name: a1\n    topology: { sockets: 1, cores_per_socket: 4, threads_per_core: 1 }\n";

fn controller() -> Serve {
    controller_with(&[])
}

fn controller_with(args: &[&str]) -> Serve {
    let dir = Serve::dir();
    lay_out_examples(dir.path());
    std::fs::write(dir.path().join("inventory.yaml"), INVENTORY).unwrap();
    Serve::controller_in(dir, args)
}

/// A plain HTTP/1.1 GET: (status, body).
fn http_get(addr: &str, path: &str) -> (u16, String) {
    common::http(addr, "GET", path, None, "")
}

fn host_status(node: &Serve, name: &str) -> Option<String> {
    let hosts = node.json(&["host", "list"]);
    hosts
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["name"] == name)
        .map(|h| h["status"].as_str().unwrap_or_default().to_owned())
}

#[test]
fn an_agent_process_serves_wasm_vnfs_as_serve_does() {
    let node = controller();
    // The control plane alone has no host.
    assert!(node.json(&["host", "list"]).as_array().unwrap().is_empty());
    node.ok(&["host", "credential", "a1", "--out", "a1.token"]);
    let mode = std::fs::metadata(node.path("a1.token"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "a node credential is a secret");
    let mut agent = Agent::start(
        &node,
        "agent.log",
        &a1_agent_args("a1.token", &["--health-listen", "127.0.0.1:0"]),
    );
    wait_until("host a1 never turned Ready", || {
        host_status(&node, "a1").is_some_and(|s| s.starts_with("Ready"))
    });
    // The agent's own health: every supervised task of it, up.
    let mut health_url = None;
    wait_until("the agent never said where its health is", || {
        let log = std::fs::read_to_string(node.path("agent.log")).unwrap_or_default();
        health_url = log
            .split("health of the agent at http://")
            .nth(1)
            .and_then(|rest| rest.split('/').next())
            .map(str::to_owned);
        health_url.is_some()
    });
    let (status, body) = http_get(health_url.as_deref().unwrap(), "/v1/healthz");
    assert_eq!(status, 200, "{body}");
    let health: serde_json::Value = serde_json::from_str(&body).unwrap();
    for component in [
        "agent",
        "heartbeat",
        "node-calls",
        "network",
        "snapshots",
        "dataplane",
    ] {
        assert_eq!(
            health["components"][component]["status"], "up",
            "{component}: {health}"
        );
    }

    node.ok(&["vnf", "create", "-f", "examples/descriptors/fw1.yaml"]);
    let fw1 = node.wait_phase("fw1", "Running");
    assert_eq!(fw1["placements"][0]["host"], "a1");
    // The module was uploaded to the controller; the agent fetched it into its own data dir.
    let module = fw1["descriptor"]["spec"]["wasm"]["module"]
        .as_str()
        .unwrap()
        .to_owned();
    let digest = module.strip_prefix("sha256:").unwrap();
    assert!(
        node.path(&format!("agent-data/modules/{digest}.wasm"))
            .is_file()
    );

    // Maps and counters are read on the agent's host, routed as node calls.
    let maps = node.json(&["vnf", "maps", "fw1"]);
    assert!(
        maps.as_array()
            .unwrap()
            .iter()
            .any(|m| m["name"] == "rules"),
        "{maps}"
    );
    let stats = node.json(&["vnf", "stats", "fw1"]);
    assert!(
        stats["counters"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["name"] == "allowed"),
        "{stats}"
    );

    // An upgrade to a module the agent does not have yet: uploaded, fetched, swapped.
    let mut v2 = std::fs::read(node.path("examples/vnfs/firewall.wasm")).unwrap();
    let needle = b"\"version\":\"1.0.0\"";
    let at = v2.windows(needle.len()).position(|w| w == needle).unwrap();
    v2[at..at + needle.len()].copy_from_slice(b"\"version\":\"1.0.1\"");
    std::fs::write(node.path("firewall-v2.wasm"), v2).unwrap();
    let up = node.json(&["vnf", "upgrade", "fw1", "--module", "firewall-v2.wasm"]);
    assert!(
        up["reason"].as_str().unwrap().contains("module upgraded"),
        "{up}"
    );
    assert_ne!(up["descriptor"]["spec"]["wasm"]["module"], module.as_str());

    // A network through fw1: the agent's data plane wires it and counts its packets, and a
    // latency probe runs there, both asked over the agent protocol.
    let net = "apiVersion: telvirt/v1\nkind: Network\nmetadata: { name: t1 }\nspec:\n  nodes:\n    - { name: gen, kind: generator, rate_pps: 2000 }\n    - { name: sink, kind: sink }\n  links:\n    - gen.out -> fw1.in\n    - fw1.out -> sink.in\n";
    std::fs::write(node.path("t1.yaml"), net).unwrap();
    node.ok(&["net", "create", "-f", "t1.yaml"]);
    wait_until("the agent never carried t1's packets", || {
        let v = node.json(&["net", "show", "t1"]);
        let links = &v["status"]["links"];
        links[0]["active"] == true && links[1]["packets"].as_u64() > Some(0)
    });
    let r = node.json(&[
        "latency",
        "chain",
        "t1",
        "--rate",
        "20000",
        "--packets",
        "1000",
    ]);
    assert_eq!(
        (r["sent"].as_u64(), r["received"].as_u64()),
        (Some(1000), Some(1000)),
        "{r}"
    );
    node.ok(&["net", "delete", "t1"]);

    node.ok(&["vnf", "stop", "fw1"]);
    node.wait_phase("fw1", "Stopped");
    let err = node.fails(&["vnf", "maps", "fw1"], "Stopped");
    assert!(err.contains("running instance"), "{err}");
    node.ok(&["vnf", "delete", "fw1"]);
    wait_until("fw1 was never deleted", || {
        node.json(&["vnf", "list"]).as_array().unwrap().is_empty()
    });

    // The agent stops cleanly; its host turns NotReady on the controller.
    agent.terminate();
    wait_until("host a1 never turned NotReady", || {
        host_status(&node, "a1").is_some_and(|s| s.starts_with("NotReady"))
    });
}

#[test]
fn an_agent_without_a_valid_node_credential_is_refused() {
    let node = controller();
    // An authority's token (here the admin's) is not a node credential: refused before use.
    std::fs::write(node.path("admin.token"), node.admin_token()).unwrap();
    let args = |file: &'static str| a1_agent_args(file, &[]);
    let mut agent = Agent::start(&node, "admin.log", &args("admin.token"));
    assert!(!agent.wait_exit().success());
    let log = std::fs::read_to_string(node.path("admin.log")).unwrap();
    assert!(log.contains("does not hold a node credential"), "{log}");

    // A node credential the controller never issued (or replaced): refused at registration.
    std::fs::write(node.path("forged.token"), format!("tvn_{}", "0".repeat(64))).unwrap();
    let mut agent = Agent::start(&node, "forged.log", &args("forged.token"));
    assert!(!agent.wait_exit().success());
    let log = std::fs::read_to_string(node.path("forged.log")).unwrap();
    assert!(
        log.contains("registering host a1") && log.contains("401"),
        "{log}"
    );
    assert!(node.json(&["host", "list"]).as_array().unwrap().is_empty());

    // Another host's credential cannot register this one.
    let out = node.cli(&["host", "credential", "b1", "--out", "b1.token"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let mut agent = Agent::start(&node, "b1.log", &args("b1.token"));
    assert!(!agent.wait_exit().success());
    let log = std::fs::read_to_string(node.path("b1.log")).unwrap();
    assert!(log.contains("403") && log.contains("host b1"), "{log}");
    assert!(node.json(&["host", "list"]).as_array().unwrap().is_empty());
}

/// A controller (`controller_args`) and two agent processes with tunnel addresses, hosts a1
/// (127.0.0.1) and a2 (127.0.0.2), both Ready.
fn two_agents(controller_args: &[&str]) -> (Serve, Agent, Agent) {
    two_agents_with(controller_args, INVENTORY, &[])
}

/// The arguments of the agent of host a2 in [`two_agents_with`].
/// The host lease of the tests whose hosts die or stall on purpose: short enough that they
/// fail over within seconds, long enough that a heartbeat late on a loaded 2-core machine (a
/// TCG guest booting beside them) does not make a live host NotReady and fail a pair over on
/// its own (600 ms did not suffice).
const HOST_LEASE_MS: &str = "3000";

const A2_AGENT_ARGS: &[&str] = &[
    "--token-file",
    "a2.token",
    "--data-dir",
    "agent2-data",
    "--inventory",
    "inventory2.yaml",
    "--host-name",
    "a2",
    "--heartbeat-interval-ms",
    "200",
    "--tunnel-address",
    "127.0.0.2:0",
];

/// [`two_agents`] on hosts of `inventory` (its host named a1; a2 is its copy), the agents
/// started with `env`.
fn two_agents_with(
    controller_args: &[&str],
    inventory: &str,
    env: &[(&str, &std::path::Path)],
) -> (Serve, Agent, Agent) {
    two_agents_with_a2(controller_args, inventory, env, &[])
}

/// [`two_agents_with`], a2's agent given `a2_args` too.
fn two_agents_with_a2(
    controller_args: &[&str],
    inventory: &str,
    env: &[(&str, &std::path::Path)],
    a2_args: &[&str],
) -> (Serve, Agent, Agent) {
    let node = controller_with(controller_args);
    std::fs::write(node.path("inventory.yaml"), inventory).unwrap();
    std::fs::write(
        node.path("inventory2.yaml"),
        inventory.replace("name: a1", "name: a2"),
    )
    .unwrap();
    node.ok(&["host", "credential", "a1", "--out", "a1.token"]);
    node.ok(&["host", "credential", "a2", "--out", "a2.token"]);
    let a1 = Agent::start_with_env(
        &node,
        &node.server(),
        "a1.log",
        &a1_agent_args("a1.token", &["--tunnel-address", "127.0.0.1:0"]),
        env,
    );
    let a2_args: Vec<&str> = A2_AGENT_ARGS.iter().chain(a2_args).copied().collect();
    let a2 = Agent::start_with_env(&node, &node.server(), "a2.log", &a2_args, env);
    for host in ["a1", "a2"] {
        wait_until("both hosts Ready", || {
            host_status(&node, host).is_some_and(|s| s.starts_with("Ready"))
        });
    }
    (node, a1, a2)
}

/// A controller (`controller_args`) and two agent processes with tunnel addresses: host a1
/// runs fw1, host a2 runs fw2 (both Running).
fn fw1_on_a1_and_fw2_on_a2(controller_args: &[&str]) -> (Serve, Agent, Agent) {
    let (node, a1, a2) = two_agents(controller_args);
    // fw1 on a1, fw2 on a2.
    node.ok(&["host", "cordon", "a2"]);
    node.ok(&["vnf", "create", "-f", "examples/descriptors/fw1.yaml"]);
    assert_eq!(
        node.wait_phase("fw1", "Running")["placements"][0]["host"],
        "a1"
    );
    node.ok(&["host", "uncordon", "a2"]);
    node.ok(&["host", "cordon", "a1"]);
    let fw2 = std::fs::read_to_string(node.path("examples/descriptors/fw1.yaml"))
        .unwrap()
        .replace("name: fw1", "name: fw2");
    std::fs::write(node.path("examples/descriptors/fw2.yaml"), fw2).unwrap();
    node.ok(&["vnf", "create", "-f", "examples/descriptors/fw2.yaml"]);
    assert_eq!(
        node.wait_phase("fw2", "Running")["placements"][0]["host"],
        "a2"
    );

    node.ok(&["host", "uncordon", "a1"]);
    (node, a1, a2)
}

/// gen (with fw1, on a1) -> fw1 -> [tunnel a1 -> a2] -> fw2 -> sink (with fw2, on a2).
const CROSSING: &str = "apiVersion: telvirt/v1\nkind: Network\nmetadata: { name: x1 }\nspec:\n  nodes:\n    - { name: gen, kind: generator, rate_pps: 2000 }\n    - { name: sink, kind: sink }\n  links:\n    - gen.out -> fw1.in\n    - fw1.out -> fw2.in\n    - fw2.out -> sink.in\n";

/// Waits until every link of network x1 is active and its last one carried packets.
fn x1_carries_traffic(node: &Serve, what: &str) {
    wait_until(what, || {
        let v = node.json(&["net", "show", "x1"]);
        let links = &v["status"]["links"];
        (0..3).all(|i| links[i]["active"] == true) && links[2]["packets"].as_u64() > Some(0)
    });
}

#[test]
fn a_chain_crosses_two_agent_processes_through_a_vxlan_tunnel() {
    let (node, _a1, _a2) = fw1_on_a1_and_fw2_on_a2(&[]);
    std::fs::write(node.path("x1.yaml"), CROSSING).unwrap();
    let created = node.json(&["net", "create", "-f", "x1.yaml"]);
    assert!(created["vni"].as_u64() > Some(0), "{created}");
    x1_carries_traffic(&node, "packets never crossed the tunnel to a2's sink");
    // A probe needs the whole network on one data plane: refused, naming both hosts.
    let err = node.fails(&["latency", "chain", "x1"], "spans hosts");
    assert!(err.contains("a1") && err.contains("a2"), "{err}");
    node.ok(&["net", "delete", "x1"]);
}

#[test]
fn a_vnf_whose_host_dies_runs_on_another_host_and_its_chain_carries_traffic_again() {
    let (node, _a1, a2) =
        fw1_on_a1_and_fw2_on_a2(&["--host-lease-ttl-ms", HOST_LEASE_MS, "--heal-after-ms", "0"]);
    std::fs::write(node.path("x1.yaml"), CROSSING).unwrap();
    node.ok(&["net", "create", "-f", "x1.yaml"]);
    x1_carries_traffic(&node, "packets never crossed the tunnel to a2's sink");

    // a2's agent (and fw2 in it) is killed: once a2 is NotReady, fw2 is placed on a1 (the
    // only Ready host), starts there, and the chain, now on one host, carries traffic to a
    // sink on a1.
    drop(a2);
    wait_until("fw2 never ran again on a1", || {
        let v = node.json(&["vnf", "show", "fw2"]);
        v["placements"][0]["host"] == "a1" && v["phase"] == "Running"
    });
    healed(&node, "fw2", "moved off failed host a2 to a1");
    x1_carries_traffic(
        &node,
        "the chain never carried traffic again after fw2 moved",
    );
    assert_eq!(host_status(&node, "a2").as_deref(), Some("NotReady"));
}

#[test]
fn a_nat_pair_keeps_its_sessions_on_the_standby_across_a_secret_rotation_and_a_failover() {
    // A heal delay longer than the test: only the failover to the standby moves the NAT.
    let (node, a1, a2) = two_agents(&[
        "--host-lease-ttl-ms",
        HOST_LEASE_MS,
        "--heal-after-ms",
        "3600000",
    ]);
    let (active, standby) = nat_pair(&node);

    // 20 flows through the active NAT make 20 sessions; then the traffic stops, so nothing but
    // the replicated state can fill the standby's maps.
    let net = "apiVersion: telvirt/v1\nkind: Network\nmetadata: { name: t1 }\nspec:\n  nodes:\n    - { name: gen, kind: generator, rate_pps: 2000, flows: 20 }\n    - { name: sink, kind: sink }\n  links:\n    - gen.out -> natp.in\n    - natp.out -> sink.in\n";
    std::fs::write(node.path("t1.yaml"), net).unwrap();
    node.ok(&["net", "create", "-f", "t1.yaml"]);
    wait_until("the active NAT never held 20 sessions", || {
        map_entries(&node, "natp", "sessions") == Some(20)
    });
    node.ok(&["net", "delete", "t1"]);
    // The standby runs (its own status), and the active reports the stream to it synced.
    wait_until("the standby never acknowledged the sessions", || {
        let v = node.json(&["vnf", "show", "natp"]);
        v["standby"]["phase"] == "Running"
            && v["standby"]["host"] == standby.as_str()
            && v["replication"]["state"] == "synced"
            && v["replication"]["standby_host"] == standby.as_str()
            // 20 sessions and 20 reverse entries at least (the snapshot may hold some).
            && v["replication"]["updates"].as_u64() >= Some(40)
    });
    let v = node.json(&["vnf", "show", "natp"]);
    assert!(v["replication"]["snapshots"].as_u64() >= Some(1), "{v}");
    assert_eq!(
        v["phase"], "Running",
        "the standby's reports are its own: {v}"
    );
    let text = String::from_utf8(node.ok(&["vnf", "show", "natp", "-o", "table"]).stdout).unwrap();
    assert!(
        text.contains(&format!("Standby:     Running on {standby}"))
            && text.contains(&format!("Replication: synced to {standby}, lag ")),
        "{text}"
    );

    // The cluster's replication secret rotated: the stream takes its new key on the
    // connection it holds, so the pair keeps its roles, and what the NAT learns next still
    // reaches the standby (10 more sessions: the failover below finds 30).
    let epoch = v["epoch"].clone();
    let rotation = node.json(&["host", "rotate-replication-secret"]);
    assert_eq!(
        rotation["streams"],
        serde_json::json!(["natp"]),
        "{rotation}"
    );
    // Settled: batches taken again (a batch refused meanwhile makes the next a snapshot,
    // whose acknowledgement counts every entry: counted from here, the updates below are the
    // new sessions').
    wait_until("the stream never took batches again", || {
        let v = node.json(&["vnf", "show", "natp"]);
        v["replication"]["state"] == "synced" && v["replication"]["error"].is_null()
    });
    let updates = node.json(&["vnf", "show", "natp"])["replication"]["updates"]
        .as_u64()
        .unwrap();
    std::fs::write(node.path("t1.yaml"), net.replace("flows: 20", "flows: 30")).unwrap();
    node.ok(&["net", "create", "-f", "t1.yaml"]);
    wait_until("the active NAT never held 30 sessions", || {
        map_entries(&node, "natp", "sessions") == Some(30)
    });
    node.ok(&["net", "delete", "t1"]);
    wait_until(
        "the standby never took the new sessions under the new key",
        || {
            let v = node.json(&["vnf", "show", "natp"]);
            v["replication"]["state"] == "synced"
                && v["replication"]["updates"].as_u64() >= Some(updates + 20)
        },
    );
    let v = node.json(&["vnf", "show", "natp"]);
    assert_eq!(
        role_host("active", &v),
        active,
        "the rotation moved the pair: {v}"
    );
    assert_eq!(v["epoch"], epoch, "{v}");

    // The active's agent dies: the standby is the active at once, with the sessions.
    if active == "a1" {
        drop(a1);
    } else {
        drop(a2);
    }
    wait_until("the standby never took over", || {
        let v = node.json(&["vnf", "show", "natp"]);
        role_host("active", &v) == standby && v["phase"] == "Running"
    });
    assert_eq!(map_entries(&node, "natp", "sessions"), Some(30));
    assert_eq!(map_entries(&node, "natp", "reverse"), Some(30));
    healed(&node, "natp", "lost its active on");
}

/// The host of `v`'s instance in `role`.
fn role_host(role: &str, v: &serde_json::Value) -> String {
    v["placements"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["role"] == role)
        .and_then(|p| p["host"].as_str())
        .unwrap_or_default()
        .to_owned()
}

/// Creates `natp`, a NAT with a standby, and waits until it runs: (active's host, standby's).
fn nat_pair(node: &Serve) -> (String, String) {
    nat_pair_limited(node, "limits: { memory: 16MiB }")
}

/// [`nat_pair`] with the descriptor's wasm `limits` line replaced by `limits`.
fn nat_pair_limited(node: &Serve, limits: &str) -> (String, String) {
    let pair = std::fs::read_to_string(node.path("examples/descriptors/nat1.yaml"))
        .unwrap()
        .replace("name: nat1", "name: natp")
        .replace(
            "cpu: { policy: shared, group: edge, count: 1 }",
            "cpu: { policy: dedicated, count: 1 }\n  redundancy: active-standby",
        )
        .replace("limits: { memory: 16MiB }", limits);
    std::fs::write(node.path("examples/descriptors/natp.yaml"), pair).unwrap();
    node.ok(&["vnf", "create", "-f", "examples/descriptors/natp.yaml"]);
    let v = node.wait_phase("natp", "Running");
    let (active, standby) = (role_host("active", &v), role_host("standby", &v));
    assert_ne!(active, standby);
    (active, standby)
}

/// Waits until `natp`'s standby on `standby` runs and its active reports the stream to it
/// synced; the VNF as shown then.
fn pair_synced(node: &Serve, standby: &str) -> serde_json::Value {
    wait_until("the standby never took the active's state", || {
        let v = node.json(&["vnf", "show", "natp"]);
        v["standby"]["phase"] == "Running"
            && v["standby"]["host"] == standby
            && v["replication"]["state"] == "synced"
            && v["replication"]["standby_host"] == standby
    });
    node.json(&["vnf", "show", "natp"])
}

#[test]
fn a_stalled_active_is_fenced_and_its_standby_takes_over_once_the_lease_ran_out() {
    let (node, a1, a2) = two_agents(&[
        "--host-lease-ttl-ms",
        HOST_LEASE_MS,
        "--heal-after-ms",
        "3600000",
    ]);
    let (active, standby) = nat_pair(&node);
    pair_synced(&node, &standby);
    let (stalled, log) = if active == "a1" {
        (&a1, "a1.log")
    } else {
        (&a2, "a2.log")
    };
    // The active's agent stops as a host cut off from everyone would: its standby hears
    // nothing (30 ms), but the active's host is Ready until its lease runs out (3 s); then
    // the standby is the active, at epoch 1.
    stalled.signal(libc::SIGSTOP);
    wait_until("the standby never took over", || {
        let v = node.json(&["vnf", "show", "natp"]);
        role_host("active", &v) == standby && v["epoch"] == 1
    });
    healed(&node, "natp", &format!("host {active} failed"));
    let text = String::from_utf8(node.ok(&["vnf", "show", "natp", "-o", "table"]).stdout).unwrap();
    assert!(
        text.contains("Epoch:       1 (the active moved to another host 1 time)"),
        "{text}"
    );
    // It goes on: its lease lapsed, so its NAT forwards nothing until the assignments read
    // after its next heartbeat say what it is (the standby of epoch 1, the pair whole again).
    stalled.signal(libc::SIGCONT);
    let v = pair_synced(&node, &active);
    assert_eq!(role_host("active", &v), standby, "{v}");
    assert_eq!(v["epoch"], 1, "{v}");
    let text = std::fs::read_to_string(node.path(log)).unwrap();
    assert!(
        text.contains("heartbeats go through again after the lease lapsed"),
        "{text}"
    );
}

/// A module with the NAT's manifest (maps, counters) that spins in its first batch: an upgrade
/// to it makes the instance exceed its CPU budget and fail, as a crashing worker would.
fn spinning_nat(node: &Serve) -> String {
    let manifest = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/vnfs/nat.manifest.json"
    ))
    .unwrap()
    .trim()
    .replace("\"version\":\"1.0.0\"", "\"version\":\"9.9.9\"");
    let text = format!(
        r#"(module
  (memory (export "memory") 4)
  (func (export "tv_buffer") (param i32) (result i32) (i32.const 65536))
  (func (export "tv_init") (param i32 i32) (result i32) (i32.const 0))
  (func (export "tv_process") (param i32 i32) (result i32) (loop $spin (br $spin)) (i32.const 0))
  (@custom "telvirt.manifest" "{}")
)"#,
        manifest.replace('"', "\\\"")
    );
    std::fs::write(
        node.path("spinning-nat.wasm"),
        wat::parse_str(&text).unwrap(),
    )
    .unwrap();
    "spinning-nat.wasm".to_owned()
}

#[test]
fn a_pair_whose_active_instance_fails_hands_over_and_its_flow_goes_on_with_its_sessions() {
    // The hosts stay up: a lease long enough that a spinning instance on a loaded machine does
    // not starve its agent's heartbeat past it (the handover must come from the instance).
    let (node, _a1, _a2) = two_agents(&[
        "--host-lease-ttl-ms",
        HOST_LEASE_MS,
        "--heal-after-ms",
        "3600000",
    ]);
    let (active, standby) =
        nat_pair_limited(&node, "limits: { memory: 16MiB, fuel_per_batch: 2000000 }");
    let net = "apiVersion: telvirt/v1\nkind: Network\nmetadata: { name: t1 }\nspec:\n  nodes:\n    - { name: gen, kind: generator, rate_pps: 2000, flows: 20 }\n    - { name: sink, kind: sink }\n  links:\n    - gen.out -> natp.in\n    - natp.out -> sink.in\n";
    std::fs::write(node.path("t1.yaml"), net).unwrap();
    node.ok(&["net", "create", "-f", "t1.yaml"]);
    wait_until("the active NAT never held 20 sessions", || {
        map_entries(&node, "natp", "sessions") == Some(20)
    });
    wait_until("the standby never took the 20 sessions", || {
        let v = node.json(&["vnf", "show", "natp"]);
        v["replication"]["state"] == "synced"
            && v["replication"]["updates"].as_u64() >= Some(40)
            && v["standby"]["phase"] == "Running"
    });
    // The active's instance dies (its module spins past the CPU budget): its agent reports it
    // Failed, and the standby takes over at once.
    let module = spinning_nat(&node);
    node.ok(&["vnf", "upgrade", "natp", "--module", &module]);
    wait_until("the standby never took over", || {
        let v = node.json(&["vnf", "show", "natp"]);
        role_host("active", &v) == standby && v["phase"] == "Running"
    });
    // Its agent reports the instance Failed and stops streaming to the standby: whichever the
    // controller hears first hands over (the event names the old active either way).
    healed(&node, "natp", &format!("on {active}"));
    // The flow goes on through the new active, which found every session: it made none.
    let sink = || sink_link_packets(&node, "t1");
    wait_until("the flow never went on through the new active", || {
        sink() > 200
    });
    let stats = node.json(&["vnf", "stats", "natp"]);
    let created = stats["counters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "sessions_created")
        .and_then(|c| c["value"].as_u64());
    assert_eq!(
        created,
        Some(0),
        "the new active made sessions again: {stats}"
    );
    assert_eq!(map_entries(&node, "natp", "sessions"), Some(20));
}

/// Drops every packet this machine sends to or from `port` (TCP and UDP: a host's tunnel and
/// replication) while it lives, with an nftables table of its own. Needs root and `nft`.
struct CutPath {
    table: String,
}

impl CutPath {
    fn nft(script: &str) -> std::process::Output {
        use std::io::Write;
        let mut child = std::process::Command::new("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    }

    fn new(port: u16) -> CutPath {
        let table = format!("tvcut_{}", std::process::id());
        let out = Self::nft(&format!(
            "table inet {table} {{\n  chain out {{\n    type filter hook output priority 0; policy accept;\n    meta l4proto {{ tcp, udp }} th dport {port} drop\n    meta l4proto {{ tcp, udp }} th sport {port} drop\n  }}\n}}\n"
        ));
        assert!(
            out.status.success(),
            "nft: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        CutPath { table }
    }
}

impl Drop for CutPath {
    fn drop(&mut self) {
        let _ = Self::nft(&format!("delete table inet {}\n", self.table));
    }
}

#[test]
fn a_cut_path_between_a_pair_that_both_reach_the_controller_keeps_one_active() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let nft = std::process::Command::new("nft").arg("-v").output().is_ok();
    if !root || !nft {
        eprintln!("skipped: cutting a path needs root and nft (scripts/deps.sh installs it)");
        return;
    }
    let (node, _a1, _a2) = two_agents(&[
        "--host-lease-ttl-ms",
        HOST_LEASE_MS,
        "--heal-after-ms",
        "3600000",
    ]);
    let (active, standby) = nat_pair(&node);
    pair_synced(&node, &standby);
    let tunnel = node.json(&["host", "show", &standby])["tunnel"]
        .as_str()
        .unwrap()
        .to_owned();
    let port: u16 = tunnel.rsplit(':').next().unwrap().parse().unwrap();
    let cut = CutPath::new(port);
    // The standby hears nothing and says so; the active's host is Ready, so it keeps its role
    // (taking over would make two actives), at epoch 0.
    wait_until("the standby never reported the silence", || {
        node.json(&["vnf", "show", "natp"])["standby"]["active_lost"]["closed"] == false
    });
    let v = node.json(&["vnf", "show", "natp"]);
    assert_eq!(role_host("active", &v), active, "{v}");
    assert!(v.get("epoch").is_none(), "{v}");
    let text = String::from_utf8(node.ok(&["vnf", "show", "natp", "-o", "table"]).stdout).unwrap();
    assert!(
        text.contains("; it lost its active: nothing from"),
        "{text}"
    );
    for h in [&active, &standby] {
        assert!(host_status(&node, h).is_some_and(|s| s.starts_with("Ready")));
    }
    // The path is back: the standby hears its active again.
    drop(cut);
    wait_until("the standby never heard its active again", || {
        let v = node.json(&["vnf", "show", "natp"]);
        v["standby"]["phase"] == "Running" && v["standby"].get("active_lost").is_none()
    });
    let v = node.json(&["vnf", "show", "natp"]);
    assert_eq!(role_host("active", &v), active, "{v}");
    // Both were events by the standby's agent, the phase unchanged.
    let events = node.json(&["vnf", "events", "natp"]);
    for what in ["lost its active on", "hears its active on"] {
        assert!(
            events
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["actor"] == format!("agent/{standby}").as_str()
                    && e["reason"].as_str().is_some_and(|r| r.contains(what))),
            "{what}: {events}"
        );
    }
}

/// Asserts that VNF `vnf` has an event by the healer whose reason contains `what`.
fn healed(node: &Serve, vnf: &str, what: &str) {
    let events = node.json(&["vnf", "events", vnf]);
    assert!(
        events
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["actor"] == "healer"
                && e["reason"].as_str().is_some_and(|r| r.contains(what))),
        "{events}"
    );
}

#[test]
fn a_nat_moves_to_another_host_with_its_sessions_and_bad_moves_change_nothing() {
    // Not beside a TCG guest: one booting or moving takes both cores of a 2-core machine, and
    // the source, frozen for its hand-off that much longer, overfilled its link's ring (216
    // frames dropped there, 108 missing at the sink, in one run of this binary; none alone).
    let _one = ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner());
    let (node, _a1, _a2) = two_agents(&[]);
    // A frame lost shows where each side was (the freeze, the hand-over, the senders' end).
    with_agent_logs(&node, || a_nat_moves_with_its_sessions(&node));
}

fn a_nat_moves_with_its_sessions(node: &Serve) {
    let nat = std::fs::read_to_string(node.path("examples/descriptors/nat1.yaml"))
        .unwrap()
        .replace("name: nat1", "name: natm")
        .replace(
            "cpu: { policy: shared, group: edge, count: 1 }",
            "cpu: { policy: dedicated, count: 1 }",
        );
    std::fs::write(node.path("examples/descriptors/natm.yaml"), nat).unwrap();
    node.ok(&["host", "cordon", "a2"]);
    node.ok(&["vnf", "create", "-f", "examples/descriptors/natm.yaml"]);
    assert_eq!(
        node.wait_phase("natm", "Running")["placements"][0]["host"],
        "a1"
    );
    // Two firewalls on a2 around the NAT, the generator and the sink with them: the stream
    // crosses between the hosts until the NAT moves to a2.
    node.ok(&["host", "uncordon", "a2"]);
    node.ok(&["host", "cordon", "a1"]);
    let fw = std::fs::read_to_string(node.path("examples/descriptors/fw1.yaml"))
        .unwrap()
        .replace(
            "cpu: { policy: dedicated, count: 1 }",
            "cpu: { policy: shared, group: edge, count: 1 }",
        );
    for name in ["fwt1", "fwt2"] {
        let file = format!("examples/descriptors/{name}.yaml");
        std::fs::write(
            node.path(&file),
            fw.replace("name: fw1", &format!("name: {name}")),
        )
        .unwrap();
        node.ok(&["vnf", "create", "-f", &file]);
        assert_eq!(
            node.wait_phase(name, "Running")["placements"][0]["host"],
            "a2"
        );
    }
    node.ok(&["host", "uncordon", "a1"]);
    let net = "apiVersion: telvirt/v1\nkind: Network\nmetadata: { name: t2 }\nspec:\n  nodes:\n    - { name: gen, kind: generator, rate_pps: 2000, flows: 12 }\n    - { name: sink, kind: sink }\n  links:\n    - gen.out -> fwt1.in\n    - fwt1.out -> natm.in\n    - natm.out -> fwt2.in\n    - fwt2.out -> sink.in\n";
    std::fs::write(node.path("t2.yaml"), net).unwrap();
    node.ok(&["net", "create", "-f", "t2.yaml"]);
    wait_until("the NAT never held 12 sessions", || {
        map_entries(node, "natm", "sessions") == Some(12)
    });
    // The sink's frames and the gaps in their sequence numbers, once it has some.
    let sink = || {
        let n = node.json(&["net", "show", "t2"]);
        let s = &n["status"]["sinks"][0];
        (s["received"].as_u64(), s["lost"].as_u64())
    };
    // The datagrams the hosts' kernels dropped from their tunnel sockets, full while a worker
    // did not run (loopback UDP on a busy host): counted there, not lost by a move.
    let kernel_dropped = || -> u64 {
        node.json(&["net", "show", "t2"])["status"]["tunnel_endpoints"]
            .as_array()
            .map_or(0, |e| {
                e.iter()
                    .map(|e| e["kernel_dropped"].as_u64().unwrap_or(0))
                    .sum()
            })
    };
    wait_until("the sink receiving", || sink().0.is_some_and(|r| r > 0));

    // Bad moves: each refused with its reason, nothing changes.
    let before = node.json(&["vnf", "show", "natm"]);
    for (args, needle) in [
        (vec!["--to", "a1"], "runs on host a1 already"),
        (vec!["--to", "nosuch"], "there is no host nosuch"),
        (vec!["--to", "bad..name"], "not a host name"),
        (vec!["--cancel"], "is not moving"),
    ] {
        let mut cmd = vec!["vnf", "migrate", "natm"];
        cmd.extend(args);
        node.fails(&cmd, needle);
    }
    assert_eq!(node.json(&["vnf", "show", "natm"]), before);
    // What the sink missed before the move (while the chain was being wired).
    // The kernel's drops first (as the sink first at the end): a datagram dropped between the
    // two reads is counted afterwards, and its gap shows at the sink afterwards too.
    let dropped_before = kernel_dropped();
    let (_, lost_before) = sink();
    let table_before = node.json(&["net", "show", "t2"])["status"]["table"].clone();

    // The move: the destination takes the maps, then the traffic; the source's place is freed.
    // On the other engine, too (pulley to cranelift): the maps' snapshot does not depend on it.
    let moved = node.json(&[
        "vnf",
        "migrate",
        "natm",
        "--to",
        "a2",
        "--engine",
        "cranelift",
    ]);
    assert_eq!(moved["placements"][0]["host"], "a2", "{moved}");
    assert_eq!(
        moved["descriptor"]["spec"]["wasm"]["engine"], "cranelift",
        "{moved}"
    );
    assert_eq!(moved["placements"].as_array().unwrap().len(), 1, "{moved}");
    assert!(moved.get("migration").is_none(), "{moved}");
    node.wait_phase("natm", "Running");
    assert_eq!(map_entries(node, "natm", "sessions"), Some(12));
    assert_eq!(map_entries(node, "natm", "reverse"), Some(12));
    let events = node.json(&["vnf", "events", "natm"]);
    let said = |what: &str| {
        events
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["reason"].as_str().is_some_and(|r| r.contains(what)))
    };
    assert!(
        said("moved from host a1 to host a2, now on engine cranelift"),
        "{events}"
    );
    assert!(said("freezing on host a1 between two batches"), "{events}");
    // The switch says how long the source stood frozen before the destination held its last
    // updates.
    let frozen_us: Option<u64> = events.as_array().unwrap().iter().find_map(|e| {
        let reason = e["reason"].as_str()?;
        reason
            .split("frozen for ")
            .nth(1)?
            .split(' ')
            .next()?
            .parse()
            .ok()
    });
    assert!(frozen_us.is_some_and(|us| us > 0), "{events}");
    // And where the freeze went, in phases that make it up.
    let phases = events
        .as_array()
        .unwrap()
        .iter()
        .find_map(|e| telvirt_model::api::FreezePhases::stated_in(e["reason"].as_str()?));
    assert_eq!(phases.map(|p| p.total_us()), frozen_us, "{events}");
    // The stream went on through the move (the frozen source's queue handed over, what was
    // sent before the rewiring passed on): no sequence number is missing at the sink.
    let (received, _) = sink();
    wait_until("the stream at the sink after the move", || {
        sink().0 > received.map(|r| r + 2000)
    });
    // The sink first: a frame the kernel drops between the two reads is counted, and shows as
    // missing at the sink only later.
    let lost = sink().1.zip(lost_before).map(|(l, b)| l - b);
    let dropped = kernel_dropped() - dropped_before;
    assert!(
        lost.is_some_and(|l| l <= dropped),
        "frames lost across the move: {lost:?} ({dropped} dropped by the kernel): {}\nbefore the move ({lost_before:?} lost): {table_before}",
        node.json(&["net", "show", "t2"])["status"]["table"]
    );
    // The source's part of the network left with the NAT: what it carried there (into the
    // NAT from the tunnel) stays in view, as a1's final counts.
    wait_until("a1's final counts of t2 in net show", || {
        let st = node.json(&["net", "show", "t2"])["status"].clone();
        st["departed"].as_array().is_some_and(|d| {
            d.iter()
                .any(|d| d["host"] == "a1" && d["links"][1]["packets"].as_u64() > Some(0))
        }) && st["table"]
            .as_str()
            .is_some_and(|t| t.contains("host a1, which the network left at"))
    });
    node.ok(&["net", "delete", "t2"]);
}

/// `f`, and if it fails, the last lines of both agents' logs on stderr first (a move that
/// hangs shows where on each side).
fn with_agent_logs<T>(node: &Serve, f: impl FnOnce() -> T) -> T {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|e| {
        eprintln!("{}", log_tails(node, &["a1.log", "a2.log"]));
        std::panic::resume_unwind(e)
    })
}

/// A vm VNF just created boots where it was placed: never Failed, and Pending only for the
/// moment between its record and its placement (the placer runs right after the create; a
/// poll on a loaded machine can land in between), never for want of room.
fn booting_where_placed(v: &serde_json::Value) {
    let phase = v["phase"].as_str().unwrap_or("");
    let placing = phase == "Pending" && v["reason"] == "waiting for a placement";
    assert!(!["Pending", "Failed"].contains(&phase) || placing, "{v}");
}

/// Hosts of two cores, as this machine has (cpu 0 shared, for QEMU's other threads): a vm's
/// dedicated core is one its QEMU can use.
const TWO_CORES: &str = "hosts:\n  - name: a1\n    topology: { sockets: 1, cores_per_socket: 2, threads_per_core: 1 }\n    shared: \"0\"\n";
/// TCG boots and moves on a loaded 2-core machine take long: plenty of room.
const VM_DEADLINE: Duration = Duration::from_secs(240);

/// The controller of a vm move test about anything but a host going away: a move may take a
/// minute, a host's lease lasts 20 s and nothing is healed, so a machine too loaded to send a
/// heartbeat within the default 3 s does not end the move or place the guest again cold.
const MOVE_WITHOUT_HEALING: [&str; 6] = [
    "--move-timeout-ms",
    "60000",
    "--host-lease-ttl-ms",
    "20000",
    "--heal-after-ms",
    "3600000",
];
/// The default guest on one dedicated core, without disk or NICs: it can move.
const MOVING_VM: &str = "apiVersion: telvirt/v1\nkind: Vnf\nmetadata: { name: vmmove1 }\nspec:\n  runtime: vm\n  cpu: { policy: dedicated, count: 1 }\n  vm: { memory: 256MiB }\n";

/// The default guest with two vhost-user NICs, which its bridge joins: it forwards n3 <-> n6.
const NIC_VM: &str = "apiVersion: telvirt/v1\nkind: Vnf\nmetadata: { name: vmnic1 }\nspec:\n  runtime: vm\n  cpu: { policy: dedicated, count: 1 }\n  ports: [n3, n6]\n  vm: { memory: 256MiB, nics: [ { port: n3 }, { port: n6 } ] }\n";

/// The pid of the QEMU an agent started for `vm` in its data dir `data`.
fn qemu_pid_in(node: &Serve, data: &str, vm: &str) -> Option<i32> {
    std::fs::read_to_string(node.path(&format!("{data}/instances/{vm}/qemu.pid")))
        .ok()
        .and_then(|p| p.trim().parse().ok())
        .filter(|&p| common::alive(p))
}

/// The vm tests here boot TCG guests and move them: one at a time on a 2-core machine, as in
/// tests/vm.rs (a TCG guest moved while the machine's cores were busy arrived broken in 1 of
/// 5-10 tries here, ADR 062), and the wasm NAT's lossless move not beside them.
static ONE_GUEST: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The value of `-machine` on QEMU `pid`'s command line.
fn qemu_machine(pid: i32) -> String {
    qemu_option(pid, "-machine")
}

/// The value of option `flag` on QEMU `pid`'s command line.
fn qemu_option(pid: i32, flag: &str) -> String {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_default()
}

/// Asserts that VNF `arrived`, Running after a move, says its guest has been up at least since
/// `running_since` (it did not boot again at the destination).
fn arrived_without_a_reboot(arrived: &serde_json::Value, running_since: Instant) {
    let reason = arrived["reason"].as_str().unwrap();
    let uptime: u64 = reason
        .split("its guest has been up ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no guest uptime in: {reason}"));
    assert!(
        uptime + 1 >= running_since.elapsed().as_secs(),
        "the guest was up {uptime} s, but it ran {} s before: it booted again ({reason})",
        running_since.elapsed().as_secs()
    );
}

/// A vm moves live from a host on the system's QEMU to one whose agent runs a newer QEMU
/// (`--qemu`, `make qemu-next`): the guest goes on there on the machine type it ran on, in the
/// newer binary; back to the older QEMU it is refused, naming both versions, and stays.
#[test]
fn a_vm_moves_live_to_a_newer_qemu_on_its_machine_type_and_not_back() {
    let _one = ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner());
    let _qemus = common::QemuGuard("vmnext1");
    let guest = common::guest_binary();
    let Some(next) = common::qemu_next() else {
        return;
    };
    let next_arg = next.to_string_lossy().into_owned();
    // (Placed again cold was seen once under load: the guest then ran rather than arrived.)
    let (node, _a1, _a2) = two_agents_with_a2(
        &MOVE_WITHOUT_HEALING,
        TWO_CORES,
        &[("TELVIRT_GUEST_BIN", &guest)],
        &["--qemu", &next_arg],
    );
    let (a1, a2) = (
        node.json(&["host", "show", "a1"]),
        node.json(&["host", "show", "a2"]),
    );
    let (old, new) = (a1["qemu"].as_str().unwrap(), a2["qemu"].as_str().unwrap());
    assert_ne!(old, new, "two QEMU versions: {a1} {a2}");
    node.ok(&["host", "cordon", "a2"]);
    node.create("vmnext1.yaml", &MOVING_VM.replace("vmmove1", "vmnext1"));
    node.wait_vnf_for("vmnext1", VM_DEADLINE, |v| {
        booting_where_placed(v);
        v["phase"] == "Running"
    });
    let running_since = Instant::now();
    let machine =
        node.wait_vnf_for("vmnext1", VM_DEADLINE, |v| v["machine"].is_string())["machine"]
            .as_str()
            .unwrap()
            .to_owned();
    assert!(
        a2["qemu_machines"]
            .as_array()
            .is_some_and(|m| m.iter().any(|t| t == machine.as_str())),
        "a2's QEMU {new} has the guest's {machine}: {a2}"
    );
    node.ok(&["host", "uncordon", "a2"]);
    // The command says what the move took, as its switch event does.
    let said = node.ok(&["vnf", "migrate", "vmnext1", "--to", "a2"]);
    let said = String::from_utf8_lossy(&said.stdout);
    assert!(
        said.contains("vnf/vmnext1 moved from a1 to a2\n  ")
            && said.contains("MiB of guest memory streamed in"),
        "{said}"
    );
    let moved = node.wait_vnf_for("vmnext1", VM_DEADLINE, |v| {
        v["phase"] == "Running"
            && v["placements"][0]["host"] == "a2"
            && v["reason"]
                .as_str()
                .is_some_and(|r| r.contains("arrived by a migration stream"))
    });
    arrived_without_a_reboot(&moved, running_since);
    assert_eq!(moved["machine"], machine.as_str(), "{moved}");
    let dest = qemu_pid_in(&node, "agent2-data", "vmnext1").expect("a QEMU on a2");
    assert_eq!(
        std::fs::read_link(format!("/proc/{dest}/exe")).unwrap(),
        next.canonicalize().unwrap(),
        "the guest runs in the newer QEMU"
    );
    assert!(
        qemu_machine(dest).starts_with(&format!("{machine},")),
        "{}",
        qemu_machine(dest)
    );
    // Back to the older QEMU: refused, and nothing changes.
    let before = node.json(&["vnf", "show", "vmnext1"]);
    node.fails(
        &["vnf", "migrate", "vmnext1", "--to", "a1"],
        &format!("host a1 runs QEMU {old}, older than QEMU {new}"),
    );
    assert_eq!(node.json(&["vnf", "show", "vmnext1"]), before);
    node.ok(&["vnf", "delete", "vmnext1"]);
    wait_until("the guest's QEMU ended", || {
        qemu_pid_in(&node, "agent2-data", "vmnext1").is_none()
    });
}

#[test]
fn a_vm_moves_live_pinned_on_its_new_cores_and_a_cancelled_or_failed_move_leaves_it_running() {
    let _one = ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner());
    let _qemus = common::QemuGuard("vmmove1");
    let guest = common::guest_binary();
    // A move that does not end within 60 s is cancelled (a guest stream of this one takes 2-5
    // s; the stalled source below adds its lease and 1.5 s, and a loaded host more).
    // A host lease of 6 s: a2, stopped below, must still be Ready when the move to it is
    // asked for (a CLI's start and a request on a loaded machine), as a1 when it stalls. Healing
    // 15 s after: the window below in which a stalled a1 must change nothing is 1.5 s and a
    // CLI call, well inside it.
    let (node, a1, a2) = two_agents_with(
        &[
            "--move-timeout-ms",
            "60000",
            "--host-lease-ttl-ms",
            "6000",
            "--heal-after-ms",
            "15000",
        ],
        TWO_CORES,
        &[("TELVIRT_GUEST_BIN", &guest)],
    );
    node.ok(&["host", "cordon", "a2"]);
    // A named CPU model: the guest's CPU on every host (a KVM guest on its host's CPU moves
    // only between hosts with the same one).
    node.create(
        "vmmove1.yaml",
        &MOVING_VM.replace("memory: 256MiB", "memory: 256MiB, cpu_model: Westmere-v1"),
    );
    let booted = node.wait_vnf_for("vmmove1", VM_DEADLINE, |v| {
        booting_where_placed(v);
        v["phase"] == "Running"
    });
    let running_since = Instant::now();
    assert_eq!(booted["placements"][0]["host"], "a1", "{booted}");
    let source = qemu_pid_in(&node, "agent-data", "vmmove1").expect("a QEMU on a1");
    // Its QEMU runs the versioned type `pc` resolved to, and the VNF keeps it.
    let machine =
        node.wait_vnf_for("vmmove1", VM_DEADLINE, |v| v["machine"].is_string())["machine"]
            .as_str()
            .unwrap()
            .to_owned();
    assert!(machine.starts_with("pc-i440fx-"), "{machine}");
    assert!(
        qemu_machine(source).starts_with(&format!("{machine},")),
        "{}",
        qemu_machine(source)
    );
    assert_eq!(qemu_option(source, "-cpu"), "Westmere-v1");
    // And the accelerator it runs with (TCG here), which its move keeps.
    let accel = node.wait_vnf_for("vmmove1", VM_DEADLINE, |v| v["accel"].is_string())["accel"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        qemu_machine(source).contains(&format!(",accel={accel}")),
        "{accel}: {}",
        qemu_machine(source)
    );
    // Each host says which machine types its QEMU has: a2's include the guest's.
    let a2_show = String::from_utf8_lossy(&node.ok(&["host", "show", "a2"]).stdout).into_owned();
    assert!(
        a2_show.contains("machine types pc-i440fx-")
            && node.json(&["host", "show", "a2"])["qemu_machines"]
                .as_array()
                .is_some_and(|m| m.iter().any(|t| t == machine.as_str())),
        "{a2_show}"
    );
    node.ok(&["host", "uncordon", "a2"]);
    // Long enough on a1 that a guest booted again at a2 would show a shorter uptime than the
    // time since this one started (a boot here takes under 10 s).
    while running_since.elapsed() < Duration::from_secs(10) {
        assert_eq!(node.json(&["vnf", "show", "vmmove1"])["phase"], "Running");
        std::thread::sleep(Duration::from_millis(200));
    }

    // Refused with the field: an engine is for wasm VNFs; nothing changes.
    let before = node.json(&["vnf", "show", "vmmove1"]);
    node.fails(
        &[
            "vnf", "migrate", "vmmove1", "--to", "a2", "--engine", "pulley",
        ],
        "an engine is chosen for wasm VNFs only",
    );
    assert_eq!(node.json(&["vnf", "show", "vmmove1"]), before);

    // A move cancelled while its stream runs: QEMU ends the stream, the guest runs on at a1
    // in the same QEMU, and a2's place is freed.
    node.ok(&["vnf", "migrate", "vmmove1", "--to", "a2", "--no-wait"]);
    node.wait_vnf_for("vmmove1", VM_DEADLINE, |v| {
        v["replication"]["guest"]["status"] == "active"
    });
    node.ok(&["vnf", "migrate", "vmmove1", "--cancel"]);
    let stayed = node.wait_vnf("vmmove1", |v| {
        v["phase"] == "Running" && v["placements"].as_array().is_some_and(|p| p.len() == 1)
    });
    assert_eq!(stayed["placements"][0]["host"], "a1", "{stayed}");
    assert_eq!(qemu_pid_in(&node, "agent-data", "vmmove1"), Some(source));
    wait_until("a2's waiting QEMU ended", || {
        qemu_pid_in(&node, "agent2-data", "vmmove1").is_none()
    });

    // A move whose destination hangs (its agent stopped, so no QEMU waits there and its
    // replication port never answers): it ends without the guest, which runs on in the same
    // QEMU on a1.
    a2.signal(libc::SIGSTOP);
    // At once: a2 stays Ready for its lease (6 s) after its last heartbeat.
    node.ok(&["vnf", "migrate", "vmmove1", "--to", "a2", "--no-wait"]);
    // Ended by the healer (a2 NotReady) or the move's deadline, whichever comes first.
    let ended = node.wait_vnf_for("vmmove1", VM_DEADLINE, |v| {
        v.get("migration").is_none() && v["phase"] == "Running"
    });
    a2.signal(libc::SIGCONT);
    assert_eq!(ended["phase"], "Running", "{ended}");
    assert_eq!(ended["placements"][0]["host"], "a1", "{ended}");
    assert_eq!(ended["placements"].as_array().unwrap().len(), 1, "{ended}");
    assert_eq!(qemu_pid_in(&node, "agent-data", "vmmove1"), Some(source));
    wait_until("a2 Ready again", || {
        host_status(&node, "a2").is_some_and(|s| s.starts_with("Ready"))
    });
    wait_until("nothing of the failed move left on a2", || {
        qemu_pid_in(&node, "agent2-data", "vmmove1").is_none()
    });

    // The move: the guest's memory streams to a2, whose QEMU was pinned to a2's cores before
    // the guest ran there; the guest goes on (its uptime counts from its boot on a1). Its
    // source's agent stalls first, past its lease (a1 NotReady for a moment, as a host busy
    // with a stream may be): the waiting QEMU on a2 holds no guest, so nothing fails over to
    // it; once a1 is back the stream runs and the move ends.
    a1.signal(libc::SIGSTOP);
    node.ok(&["vnf", "migrate", "vmmove1", "--to", "a2", "--no-wait"]);
    wait_until("a1 NotReady while its agent stalls", || {
        host_status(&node, "a1").is_some_and(|s| s.starts_with("NotReady"))
    });
    // A window in which nothing may change: a few of the controller's passes see a1 so.
    std::thread::sleep(Duration::from_millis(1500));
    let stalled = node.json(&["vnf", "show", "vmmove1"]);
    a1.signal(libc::SIGCONT);
    assert_eq!(stalled["placements"][0]["host"], "a1", "{stalled}");
    assert_eq!(stalled["migration"]["to"], "a2", "{stalled}");
    let moved = node.wait_vnf_for("vmmove1", VM_DEADLINE, |v| {
        v.get("migration").is_none() && v["placements"].as_array().is_some_and(|p| p.len() == 1)
    });
    assert_eq!(moved["placements"][0]["host"], "a2", "{moved}");
    let moved = node.wait_vnf_for("vmmove1", VM_DEADLINE, |v| {
        v["phase"] == "Running"
            && v["reason"]
                .as_str()
                .is_some_and(|r| r.contains("arrived by a migration stream"))
    });
    arrived_without_a_reboot(&moved, running_since);
    let dest = qemu_pid_in(&node, "agent2-data", "vmmove1").expect("a QEMU on a2");
    // The destination took the guest in on the machine type it ran on at a1.
    assert!(
        qemu_machine(dest).starts_with(&format!("{machine},")),
        "{}",
        qemu_machine(dest)
    );
    assert_eq!(moved["machine"], machine.as_str(), "{moved}");
    assert!(
        qemu_machine(dest).contains(&format!(",accel={accel}")),
        "{accel}: {}",
        qemu_machine(dest)
    );
    assert_eq!(moved["accel"], accel.as_str(), "{moved}");
    // The destination gave the guest the model it names, as its source did.
    assert_eq!(qemu_option(dest, "-cpu"), "Westmere-v1");
    let vcpus = common::cpu_list(&moved["placements"][0]["vcpus"][0]);
    assert_eq!(
        common::allowed_cpus(dest, true),
        vec![vcpus],
        "vCPU pinned on a2"
    );
    let emulator = common::cpu_list(&moved["placements"][0]["emulator_cpus"]);
    let others = common::allowed_cpus(dest, false);
    assert!(
        !others.is_empty() && others.iter().all(|c| *c == emulator),
        "QEMU's other threads on a2's cpus {emulator}: {others:?}"
    );
    // The destination never booted the guest: its console shows no kernel start.
    let console =
        std::fs::read_to_string(node.path("agent2-data/instances/vmmove1/console.log")).unwrap();
    assert!(!console.contains("Linux version"), "{console}");
    wait_until("a1's QEMU ended after the switch", || {
        !common::alive(source)
    });
    let events = node.json(&["vnf", "events", "vmmove1"]);
    assert!(
        events
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["reason"].as_str().is_some_and(
                |r| r.contains("moved from host a1 to host a2")
                && r.contains("MiB of guest memory streamed")
                // The whole pause, from a1's stop until a2 resumed the guest, and where it
                // went by the two QEMUs' event times. The destination's part is stated only
                // when a2's resume comes after a1's last byte by their stamps (under load a1's
                // `completed` event can be stamped after a2 resumed; the final copy then
                // holds it).
                && r.contains("ms until its destination resumed it")
                && r.contains("ms at the commit point")
                && r.contains("ms final copy")
                // And when, by the controller's clock, the move switched to a2 after that
                // (one clock here: never negative, so always stated).
                && r.contains("ms after its destination resumed it (the controller's clock)")
            )),
        "{events}"
    );
    // The final copy went only once a1's agent had read that the move stood.
    let log = std::fs::read_to_string(node.path("a1.log")).unwrap();
    assert!(
        log.contains("the guest's stream passed its commit point"),
        "{log}"
    );
}

/// A move whose destination's agent dies while the guest streams there: the restarted agent
/// adopts the QEMU that takes the stream, which runs the same guest once the stream ends (QEMU
/// resumes it by itself), and the move ends on the destination.
#[test]
fn a_vm_move_whose_destination_agent_restarts_mid_stream_ends_there_with_the_same_guest() {
    let _one = ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner());
    let _qemus = common::QemuGuard("vmmove2");
    let guest = common::guest_binary();
    let env = [("TELVIRT_GUEST_BIN", guest.as_path())];
    // a2's agent restarting on a loaded machine must not make it NotReady long enough to be
    // healed (the destination's standby dropped, the move ended on a1).
    let (node, _a1, mut a2) = two_agents_with(&MOVE_WITHOUT_HEALING, TWO_CORES, &env);
    node.ok(&["host", "cordon", "a2"]);
    node.create("vmmove2.yaml", &MOVING_VM.replace("vmmove1", "vmmove2"));
    let booted = node.wait_vnf_for("vmmove2", VM_DEADLINE, |v| {
        booting_where_placed(v);
        v["phase"] == "Running"
    });
    assert_eq!(booted["placements"][0]["host"], "a1", "{booted}");
    node.ok(&["host", "uncordon", "a2"]);
    // a2 comes back on the same tunnel address (a changed address is another destination:
    // the source would open a new stream).
    let tunnel = node.json(&["host", "show", "a2"])["tunnel"]
        .as_str()
        .unwrap()
        .to_owned();
    node.ok(&["vnf", "migrate", "vmmove2", "--to", "a2", "--no-wait"]);
    node.wait_vnf_for("vmmove2", VM_DEADLINE, |v| {
        v["replication"]["guest"]["status"] == "active"
    });
    let waiting = qemu_pid_in(&node, "agent2-data", "vmmove2").expect("a QEMU waiting on a2");
    // The guest streams into a2's QEMU; a2's agent dies and comes back.
    a2.signal(libc::SIGKILL);
    a2.wait_exit();
    let args: Vec<&str> = A2_AGENT_ARGS
        .iter()
        .map(|a| {
            if *a == "127.0.0.2:0" {
                tunnel.as_str()
            } else {
                a
            }
        })
        .collect();
    let _a2 = Agent::start_with_env(&node, &node.server(), "a2-again.log", &args, &env);
    let logs = || log_tails(&node, &["a1.log", "a2.log", "a2-again.log", "serve.log"]);
    let deadline = Instant::now() + VM_DEADLINE;
    let moved = loop {
        let v = node.json(&["vnf", "show", "vmmove2"]);
        if v.get("migration").is_none()
            && v["placements"].as_array().is_some_and(|p| p.len() == 1)
            && v["phase"] == "Running"
        {
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "the move did not end: {v}\nlogs: {}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(moved["placements"][0]["host"], "a2", "{moved}");
    // The QEMU that took the stream runs the guest: adopted, not started again.
    assert_eq!(
        qemu_pid_in(&node, "agent2-data", "vmmove2"),
        Some(waiting),
        "events: {}\nlogs: {}",
        node.json(&["vnf", "events", "vmmove2"]),
        logs()
    );
    let console =
        std::fs::read_to_string(node.path("agent2-data/instances/vmmove2/console.log")).unwrap();
    assert!(!console.contains("Linux version"), "{console}");
    // Adopted (mid-stream, then followed to its end, or after it, QEMU having resumed the
    // guest itself: which one is the stream's timing), not started again.
    let log = std::fs::read_to_string(node.path("a2-again.log")).unwrap();
    assert!(log.contains("re-adopted running QEMU"), "{log}");
}

/// The last 25 lines (DEBUG left out) of each of `node`'s log `files`, for a failure's message.
fn log_tails(node: &Serve, files: &[&str]) -> String {
    files
        .iter()
        .map(|f| {
            let text = std::fs::read_to_string(node.path(f)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().filter(|l| !l.contains("DEBUG")).collect();
            format!(
                "\n--- {f}\n{}",
                lines[lines.len().saturating_sub(25)..].join("\n")
            )
        })
        .collect()
}

/// Frames the sink of network `net` received (its second link, `net show -o json`).
fn sink_link_packets(node: &Serve, net: &str) -> u64 {
    node.json(&["net", "show", net])["status"]["links"][1]["packets"]
        .as_u64()
        .unwrap_or(0)
}

/// Moves vm VNF `name` from a1, where QEMU `source` runs it, to a2 (`vnf migrate`), and
/// answers the VNF moved. A move whose guest broke on its arrival at a2 (QEMU 7.2's TCG
/// delivers some guests broken while they work, ADR 062) must end with the same guest running
/// on at a1, resumed in the same QEMU from the copy its move stopped, which `resumed` checks
/// further; the move is then asked again, three tries in all.
fn move_vm_again_if_it_breaks(
    node: &Serve,
    name: &str,
    source: i32,
    resumed: impl Fn(),
) -> serde_json::Value {
    let args = [
        "vnf",
        "migrate",
        name,
        "--to",
        "a2",
        "--timeout",
        "240",
        "-o",
        "json",
    ];
    for _ in 0..3 {
        let out = node.cli(&args);
        if out.status.success() {
            return serde_json::from_slice(&out.stdout).unwrap();
        }
        let err = common::stderr(&out);
        assert!(
            err.contains("its guest did not come to run there"),
            "telvirt {args:?}: {err}"
        );
        let back = node.wait_vnf_for(name, VM_DEADLINE, |v| {
            v["phase"] == "Running"
                && v["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("runs on here from the copy its move stopped"))
        });
        assert_eq!(back["placements"][0]["host"], "a1", "{back}");
        assert_eq!(back["placements"].as_array().unwrap().len(), 1, "{back}");
        assert_eq!(qemu_pid_in(node, "agent-data", name), Some(source));
        assert_eq!(qemu_pid_in(node, "agent2-data", name), None);
        resumed();
        eprintln!(
            "{name}'s guest broke on its arrival at a2 and runs on at a1: moving it again ({err})"
        );
    }
    panic!("{name}'s guest broke on its arrival at a2 in each of 3 moves");
}

/// A VM with vhost-user NICs in a chain (gen -> VM -> sink) moves live: its NICs listen on the
/// destination before the waiting QEMU starts there, the pages its NICs write are logged
/// (QEMU refuses to move a vhost-user guest otherwise), and after the switch the network runs
/// on the new host with the same guest forwarding.
///
/// Both agents run the newer QEMU where there is one (`make qemu-next`, as `make test` has):
/// under the system's QEMU 7.2's TCG, about 1 guest in 8 moved under this stream arrived broken
/// (a kernel BUG at the resume, then `id N is not a head` on both queues, as dirtying guests
/// without NICs break there: ADR 062), against none in 10.0's runs; CI failed on one on
/// 2026-12-07. The system's QEMU runs it where there is no other.
#[test]
fn a_vm_with_nics_in_a_chain_moves_live_and_forwards_on_its_new_host() {
    let _one = ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner());
    let _qemus = common::QemuGuard("vmnic1");
    let guest = common::guest_binary();
    let next = common::qemu_next();
    let mut env = vec![("TELVIRT_GUEST_BIN", guest.as_path())];
    env.extend(next.as_deref().map(|q| ("TELVIRT_QEMU", q)));
    // The destination's agent looks at its instances unasked once an hour: the arrival's
    // resume and its end reach it from its runtime.
    let (node, _a1, _a2) = two_agents_with_a2(
        &MOVE_WITHOUT_HEALING,
        TWO_CORES,
        &env,
        &["--resync-interval-ms", "3600000"],
    );
    if next.is_some() {
        // Both ends on the same, newer QEMU (the system's is 7.2 where there is a next).
        let (a1, a2) = (
            node.json(&["host", "show", "a1"]),
            node.json(&["host", "show", "a2"]),
        );
        assert_eq!(a1["qemu"], a2["qemu"], "{a1} {a2}");
        assert!(
            a1["qemu"].as_str().is_some_and(|v| !v.starts_with("7.")),
            "{a1}"
        );
    }
    node.ok(&["host", "cordon", "a2"]);
    node.create("vmnic1.yaml", NIC_VM);
    let booted = node.wait_vnf_for("vmnic1", VM_DEADLINE, |v| {
        assert_ne!(v["phase"], "Failed", "{v}");
        v["phase"] == "Running"
    });
    assert_eq!(booted["placements"][0]["host"], "a1", "{booted}");
    let source = qemu_pid_in(&node, "agent-data", "vmnic1").expect("a QEMU on a1");
    node.ok(&["host", "uncordon", "a2"]);
    std::fs::write(
        node.path("c1.yaml"),
        "apiVersion: telvirt/v1\nkind: Network\nmetadata: { name: c1 }\nspec:\n  nodes:\n    \
         - { name: gen, kind: generator, rate_pps: 1000 }\n    - { name: sink, kind: sink }\n  \
         links:\n    - gen.out -> vmnic1.n3\n    - vmnic1.n6 -> sink.in\n",
    )
    .unwrap();
    node.ok(&["net", "create", "-f", "c1.yaml"]);
    common::wait_until_for("frames across the VM on a1", VM_DEADLINE, || {
        sink_link_packets(&node, "c1") > 500
    });

    let moved = with_agent_logs(&node, || {
        move_vm_again_if_it_breaks(&node, "vmnic1", source, || {
            // Its traffic goes on through the guest at a1.
            let before = sink_link_packets(&node, "c1");
            common::wait_until_for("frames across the VM on a1 again", VM_DEADLINE, || {
                sink_link_packets(&node, "c1") >= before + 300
            });
        })
    });
    assert_eq!(moved["placements"][0]["host"], "a2", "{moved}");
    wait_until("a1's QEMU ended after the switch", || {
        !common::alive(source)
    });
    assert!(
        qemu_pid_in(&node, "agent2-data", "vmnic1").is_some(),
        "a QEMU on a2"
    );
    // The same guest forwards on a2: the sink's count grows again (a rate, read twice). A
    // guest that broke on arrival fails at once, with its console.
    let console_log = node.path("agent2-data/instances/vmnic1/console.log");
    let deadline = Instant::now() + VM_DEADLINE;
    loop {
        let before = sink_link_packets(&node, "c1");
        std::thread::sleep(Duration::from_secs(1));
        if sink_link_packets(&node, "c1") >= before + 300 {
            break;
        }
        let console = std::fs::read_to_string(&console_log).unwrap_or_default();
        assert!(
            !console.contains("BUG:") && !console.contains("is not a head"),
            "the guest broke after its arrival on a2:\n{console}"
        );
        assert!(
            Instant::now() < deadline,
            "no frames across the VM on a2 within {VM_DEADLINE:?}; its console:\n{console}\nlogs: {}",
            log_tails(&node, &["a1.log", "a2.log", "serve.log"])
        );
    }
    let console = std::fs::read_to_string(&console_log).unwrap();
    assert!(
        !console.contains("Linux version"),
        "a2 booted a guest: {console}"
    );
    let events = node.json(&["vnf", "events", "vmnic1"]);
    let said = |what: &str| {
        events
            .as_array()
            .unwrap()
            .iter()
            .position(|e| e["reason"].as_str().is_some_and(|r| r.contains(what)))
    };
    let moved = said("moved from host a1 to host a2");
    assert!(moved.is_some(), "{events}");
    // Its traffic went to a2 once a2's agent said the guest resumed there (before the guest
    // answered and the move switched): a2's runtime woke it at the resume.
    let resumed = said("its guest resumed on host a2: its traffic goes there");
    assert!(resumed.is_some() && resumed < moved, "{events}");
}
