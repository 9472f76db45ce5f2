//! Every CPU policy, locality rule, active-standby rule and the healing reserve through the
//! descriptor, in a real `telvirt serve` on the lab inventory (`examples/inventory/lab.yaml`:
//! lab-a 8 cores zone z1, lab-b 2 sockets x 4 cores x 2 threads zone z2 with eth1 on node 1,
//! lab-c 8 cores zone z2).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_telvirt");

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(rel)
}

struct Node {
    child: Child,
    dir: tempfile::TempDir,
}

impl Node {
    fn start() -> Node {
        let dir = tempfile::tempdir().unwrap();
        let child = Command::new(BIN)
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path())
            .arg("--inventory")
            .arg(repo("examples/inventory/lab.yaml"))
            .env("TELVIRT_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let node = Node { child, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !(node.dir.path().join("client.toml").exists() && node.cli(&["vnf", "list"]).0) {
            assert!(Instant::now() < deadline, "serve did not become ready");
            std::thread::sleep(Duration::from_millis(50));
        }
        node
    }

    fn cli(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(BIN)
            .args(args)
            .env("TELVIRT_CONFIG", self.dir.path().join("client.toml"))
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn create(&self, yaml: &str) {
        let name = format!("{}.yaml", yaml.len());
        let path = self.dir.path().join(name);
        std::fs::write(&path, yaml).unwrap();
        let (ok, _, err) = self.cli(&["vnf", "create", "-f", path.to_str().unwrap()]);
        assert!(ok, "{err}");
    }

    /// Polls until the scheduler has decided: placed, or pending with a reason.
    fn decided(&self, name: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (ok, out, err) = self.cli(&["vnf", "show", name, "-o", "json"]);
            assert!(ok, "{err}");
            let v: Value = serde_json::from_str(&out).unwrap();
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
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn vnf(name: &str, cpu: &str, extra: &str) -> String {
    format!(
        "apiVersion: telvirt/v1\nkind: Vnf\nmetadata: {{ name: {name} }}\nspec:\n  runtime: vm\n  cpu: {cpu}\n{extra}  vm: {{ memory: 64MiB }}\n"
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
    let node = Node::start();

    // dedicated, isolate: one thread per core, the sibling held empty (lab-b has SMT).
    node.create(&vnf(
        "iso",
        "{ policy: dedicated, count: 2, thread_policy: isolate, numa_node: 1 }",
        "",
    ));
    let iso = node.decided("iso");
    assert_eq!(iso["placements"][0]["host"], "lab-b", "{iso}");
    assert_eq!(
        iso["placements"][0]["held"].as_array().unwrap().len(),
        2,
        "{iso}"
    );
    assert_eq!(iso["placements"][0]["numa_nodes"], serde_json::json!([1]));

    // near_nic: every core on eth1's NUMA node (lab-b node 1: cpus 4-7, 12-15).
    node.create(&vnf(
        "nic",
        "{ policy: dedicated, count: 1, near_nic: eth1 }",
        "",
    ));
    let nic = node.decided("nic");
    assert_eq!(nic["placements"][0]["host"], "lab-b");
    assert!(
        cpus(&nic, 0)
            .iter()
            .all(|c| (4..8).contains(c) || (12..16).contains(c)),
        "{nic}"
    );

    // pinned: exact cores; a taken core is refused with the reason.
    node.create(&vnf("pin", "{ policy: pinned, cores: [3] }", ""));
    let pin = node.decided("pin");
    assert_eq!(cpus(&pin, 0), [3]);
    // The same core number again: refused on the host where it is taken, placed on another.
    node.create(&vnf("pin2", "{ policy: pinned, cores: [3] }", ""));
    let pin2 = node.decided("pin2");
    assert_eq!(cpus(&pin2, 0), [3]);
    assert_ne!(pin2["placements"][0]["host"], pin["placements"][0]["host"]);

    // shared group: two VNFs of one authority on the same core.
    node.create(&vnf("g1", "{ policy: shared, group: edge, count: 1 }", ""));
    node.create(&vnf("g2", "{ policy: shared, group: edge, count: 1 }", ""));
    let (g1, g2) = (node.decided("g1"), node.decided("g2"));
    assert_eq!(g1["placements"][0]["host"], g2["placements"][0]["host"]);
    assert_eq!(cpus(&g1, 0), cpus(&g2, 0));
    assert_eq!(g1["placements"][0]["group"], "edge");

    // reserved cores are never handed out: lab-a keeps cpu 7 for the host OS.
    node.create(&vnf("res", "{ policy: pinned, cores: [7] }", ""));
    let res = node.decided("res");
    assert_ne!(res["phase"], "Pending", "{res}");
    assert_ne!(
        res["placements"][0]["host"], "lab-a",
        "reserved cpu 7 of lab-a was handed out"
    );
}

#[test]
fn active_standby_goes_to_two_hosts_in_different_zones() {
    let node = Node::start();
    node.create(&vnf(
        "ha",
        "{ policy: dedicated, count: 2 }",
        "  redundancy: active-standby\n  placement: { zone_anti_affinity: true }\n",
    ));
    let ha = node.decided("ha");
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
    let node = Node::start();
    // More dedicated cores than any host has.
    node.create(&vnf("huge", "{ policy: dedicated, count: 15 }", ""));
    let huge = node.decided("huge");
    assert_eq!(huge["phase"], "Pending");
    let reason = huge["reason"].as_str().unwrap();
    for host in ["lab-a", "lab-b", "lab-c"] {
        assert!(reason.contains(host), "no reason for {host}: {reason}");
    }
    // The reason shows as an event too.
    let (_, events, _) = node.cli(&["vnf", "events", "huge", "-o", "json"]);
    assert!(events.contains("cannot place"), "{events}");
}
