//! Every CPU policy, locality rule, active-standby rule and the healing reserve through the
//! descriptor, in a real `telvirt serve` on the lab inventory (`examples/inventory/lab.yaml`:
//! lab-a 8 cores zone z1, lab-b 2 sockets x 4 cores x 2 threads zone z2 with eth1 on node 1,
//! lab-c 8 cores zone z2).

use std::time::{Duration, Instant};

use serde_json::Value;

mod common;
use common::{Serve, repo};

fn lab() -> Serve {
    let inventory = repo("examples/inventory/lab.yaml");
    Serve::start(&["--inventory", inventory.to_str().unwrap()])
}

/// Creates a VNF from descriptor text.
fn create(node: &Serve, yaml: &str) {
    let name = yaml
        .split("name: ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .unwrap_or("vnf");
    node.create(&format!("{name}.yaml"), yaml);
}

/// Polls until the scheduler has decided: placed, or pending with a reason.
fn decided(node: &Serve, name: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = node.json(&["vnf", "show", name]);
        let pending_with_reason = v["phase"] == "Pending"
            && v["reason"]
                .as_str()
                .is_some_and(|r| r.contains("cannot place"));
        if v["phase"] != "Pending" || pending_with_reason {
            return v;
        }
        assert!(Instant::now() < deadline, "{name} was never decided: {v}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn vnf(name: &str, cpu: &str, extra: &str) -> String {
    format!(
        "apiVersion: telvirt/v1\nkind: Vnf\nmetadata: {{ name: {name} }}\nspec:\n  runtime: vm\n  cpu: {cpu}\n{extra}  vm: {{ memory: 64MiB }}\n"
    )
}

/// A wasm VNF (the example firewall): for rules that must be able to use lab-a, the node's own
/// host, whose agent offers no vm runtime where the tests run (no static guest agent).
fn wasm_vnf(name: &str, cpu: &str, extra: &str) -> String {
    format!(
        "apiVersion: telvirt/v1\nkind: Vnf\nmetadata: {{ name: {name} }}\nspec:\n  runtime: wasm\n  cpu: {cpu}\n{extra}  ports: [in, out]\n  wasm:\n    module: examples/vnfs/firewall.wasm\n    limits: {{ memory: 16MiB }}\n    config: {{ blob_hex: \"02000000\" }}\n    maps:\n      - {{ name: rules, kind: hash, key_size: 16, value_size: 4, max_entries: 1024 }}\n"
    )
}

fn cpus(v: &Value, role: usize) -> Vec<u64> {
    v["placements"][role]["vcpus"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|c| c.as_array().unwrap().iter().map(|x| x.as_u64().unwrap()))
        .collect()
}

#[test]
fn policies_and_locality_through_the_descriptor() {
    let node = lab();

    // dedicated, isolate: one thread per core, the sibling held empty (lab-b has SMT).
    create(
        &node,
        &vnf(
            "iso",
            "{ policy: dedicated, count: 2, thread_policy: isolate, numa_node: 1 }",
            "",
        ),
    );
    let iso = decided(&node, "iso");
    assert_eq!(iso["placements"][0]["host"], "lab-b", "{iso}");
    assert_eq!(
        iso["placements"][0]["held"].as_array().unwrap().len(),
        2,
        "{iso}"
    );
    assert_eq!(iso["placements"][0]["numa_nodes"], serde_json::json!([1]));

    // near_nic: every core on eth1's NUMA node (lab-b node 1: cpus 4-7, 12-15).
    create(
        &node,
        &vnf("nic", "{ policy: dedicated, count: 1, near_nic: eth1 }", ""),
    );
    let nic = decided(&node, "nic");
    assert_eq!(nic["placements"][0]["host"], "lab-b");
    assert!(
        cpus(&nic, 0)
            .iter()
            .all(|c| (4..8).contains(c) || (12..16).contains(c)),
        "{nic}"
    );

    // pinned: exact cores; a taken core is refused with the reason.
    create(&node, &vnf("pin", "{ policy: pinned, cores: [3] }", ""));
    let pin = decided(&node, "pin");
    assert_eq!(cpus(&pin, 0), [3]);
    // The same core number again: refused on the host where it is taken, placed on another.
    create(&node, &vnf("pin2", "{ policy: pinned, cores: [3] }", ""));
    let pin2 = decided(&node, "pin2");
    assert_eq!(cpus(&pin2, 0), [3]);
    assert_ne!(pin2["placements"][0]["host"], pin["placements"][0]["host"]);

    // shared group: two VNFs of one authority on the same core.
    create(
        &node,
        &vnf("g1", "{ policy: shared, group: edge, count: 1 }", ""),
    );
    create(
        &node,
        &vnf("g2", "{ policy: shared, group: edge, count: 1 }", ""),
    );
    let (g1, g2) = (decided(&node, "g1"), decided(&node, "g2"));
    assert_eq!(g1["placements"][0]["host"], g2["placements"][0]["host"]);
    assert_eq!(cpus(&g1, 0), cpus(&g2, 0));
    assert_eq!(g1["placements"][0]["group"], "edge");

    // reserved cores are never handed out: lab-a keeps cpu 7 for the host OS.
    create(&node, &vnf("res", "{ policy: pinned, cores: [7] }", ""));
    let res = decided(&node, "res");
    assert_ne!(res["phase"], "Pending", "{res}");
    assert_ne!(
        res["placements"][0]["host"], "lab-a",
        "reserved cpu 7 of lab-a was handed out"
    );
}

#[test]
fn active_standby_goes_to_two_hosts_in_different_zones() {
    let inventory = repo("examples/inventory/lab.yaml");
    let node = Serve::with_examples(&["--inventory", inventory.to_str().unwrap()]);
    create(
        &node,
        &wasm_vnf(
            "ha",
            "{ policy: dedicated, count: 1 }",
            "  redundancy: active-standby\n  placement: { zone_anti_affinity: true }\n",
        ),
    );
    let ha = decided(&node, "ha");
    let placements = ha["placements"].as_array().unwrap();
    assert_eq!(placements.len(), 2, "{ha}");
    assert_eq!(placements[0]["role"], "active");
    assert_eq!(placements[1]["role"], "standby");
    let hosts: Vec<&str> = placements
        .iter()
        .map(|p| p["host"].as_str().unwrap())
        .collect();
    assert_ne!(hosts[0], hosts[1]);
    // lab-a is zone z1, lab-b and lab-c zone z2: one of them must be lab-a.
    assert!(hosts.contains(&"lab-a"), "{hosts:?}");
}

#[test]
fn unplaceable_vnf_waits_with_a_reason_per_host() {
    let node = lab();
    // More dedicated cores than any host has.
    create(&node, &vnf("huge", "{ policy: dedicated, count: 15 }", ""));
    let huge = decided(&node, "huge");
    assert_eq!(huge["phase"], "Pending");
    let reason = huge["reason"].as_str().unwrap();
    for host in ["lab-a", "lab-b", "lab-c"] {
        assert!(reason.contains(host), "no reason for {host}: {reason}");
    }
    // The reason shows as an event too.
    let events = node.json(&["vnf", "events", "huge"]).to_string();
    assert!(events.contains("cannot place"), "{events}");
}
