//! Wasm VNFs in a real `telvirt serve`: the example modules reach Running on the node's data
//! plane, lock and unlock pause and resume them, a module the verifier refuses ends Failed with
//! the verifier's reason while the others keep running, and networks carry packets through them.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

mod common;
use common::{BIN, DEADLINE, Serve, repo, stderr};

/// Four dedicatable CPUs, none kept shared: VNFs created first land on CPUs 0 and 1, where the
/// data plane has workers on any machine with two CPUs.
const INVENTORY: &str =
    "hosts:\n  - name: t\n    topology: { sockets: 1, cores_per_socket: 4, threads_per_core: 1 }\n";

/// A `telvirt serve` working in a temp directory that holds `examples/` (built-in modules
/// written by `telvirt wasm examples`, and the example descriptors).
fn start() -> Serve {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::write(root.join("inventory.yaml"), INVENTORY).unwrap();
    let out = Command::new(BIN)
        .args(["wasm", "examples", "--out", "examples/vnfs"])
        .current_dir(root)
        .output()
        .unwrap();
    assert!(out.status.success(), "wasm examples: {}", stderr(&out));
    for m in ["firewall", "nat", "gtpu"] {
        assert!(root.join(format!("examples/vnfs/{m}.wasm")).exists());
    }
    std::fs::create_dir_all(root.join("examples/descriptors")).unwrap();
    for d in ["fw1.yaml", "nat1.yaml"] {
        std::fs::copy(
            repo(&format!("examples/descriptors/{d}")),
            root.join("examples/descriptors").join(d),
        )
        .unwrap();
    }
    Serve::start_in(dir, &["--inventory", "inventory.yaml", "--host-name", "t"])
}

/// The firewall module with `maps.write` blanked out of its manifest (same length, so the
/// section stays valid JSON): it still imports `map_update`, which its manifest no longer grants.
fn hostile_module(node: &Serve) -> PathBuf {
    let mut bytes = std::fs::read(node.path("examples/vnfs/firewall.wasm")).unwrap();
    let needle = b"\"maps.write\",";
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("firewall manifest grants maps.write");
    bytes[at..at + needle.len()].fill(b' ');
    let path = node.path("hostile.wasm");
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn wasm_vnfs_run_lock_unlock_and_a_refused_module_fails_alone() {
    let node = start();
    node.ok(&["vnf", "create", "-f", "examples/descriptors/fw1.yaml"]);
    node.wait_phase("fw1", "Running");

    node.ok(&["vnf", "lock", "fw1"]);
    node.wait_phase("fw1", "Locked");
    node.ok(&["vnf", "unlock", "fw1"]);
    node.wait_phase("fw1", "Running");

    let hostile = hostile_module(&node);
    let descriptor = std::fs::read_to_string(node.path("examples/descriptors/fw1.yaml"))
        .unwrap()
        .replace("name: fw1", "name: bad1")
        .replace(
            "examples/vnfs/firewall.wasm",
            &hostile.display().to_string(),
        );
    std::fs::write(node.path("bad1.yaml"), descriptor).unwrap();
    node.ok(&["vnf", "create", "-f", "bad1.yaml"]);
    let bad = node.wait_phase("bad1", "Failed");
    let reason = bad["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("module refused") && reason.contains("maps.write"),
        "reason should be the verifier's: {reason}"
    );
    let fw1 = node.json(&["vnf", "show", "fw1"]);
    assert_eq!(fw1["phase"], "Running", "fw1 must keep running: {fw1}");

    // Upgrade: a refused module changes nothing; another firewall build is swapped in.
    let out = node.cli(&[
        "vnf",
        "upgrade",
        "fw1",
        "--module",
        &hostile.display().to_string(),
    ]);
    assert!(!out.status.success(), "a refused module must not upgrade");
    assert!(stderr(&out).contains("module refused"), "{}", stderr(&out));
    let fw1 = node.json(&["vnf", "show", "fw1"]);
    assert_eq!(
        fw1["descriptor"]["spec"]["wasm"]["module"],
        "examples/vnfs/firewall.wasm"
    );
    let mut v2 = std::fs::read(node.path("examples/vnfs/firewall.wasm")).unwrap();
    let needle = b"\"version\":\"1.0.0\"";
    let at = v2.windows(needle.len()).position(|w| w == needle).unwrap();
    v2[at..at + needle.len()].copy_from_slice(b"\"version\":\"1.0.1\"");
    std::fs::write(node.path("firewall-v2.wasm"), v2).unwrap();
    let up = node.json(&["vnf", "upgrade", "fw1", "--module", "firewall-v2.wasm"]);
    assert_eq!(
        up["descriptor"]["spec"]["wasm"]["module"],
        "firewall-v2.wasm"
    );
    assert!(
        up["reason"].as_str().unwrap().contains("module upgraded"),
        "{up}"
    );
    assert_eq!(node.json(&["vnf", "show", "fw1"])["phase"], "Running");
}

#[test]
fn a_network_through_fw1_carries_packets() {
    let node = start();
    node.ok(&["vnf", "create", "-f", "examples/descriptors/fw1.yaml"]);
    node.wait_phase("fw1", "Running");
    let net = "apiVersion: telvirt/v1\nkind: Network\nmetadata: { name: t1 }\nspec:\n  nodes:\n    - { name: gen, kind: generator, rate_pps: 5000 }\n    - { name: sink, kind: sink }\n  links:\n    - gen.out -> fw1.in\n    - fw1.out -> sink.in\n";
    std::fs::write(node.path("t1.yaml"), net).unwrap();
    node.ok(&["net", "create", "-f", "t1.yaml"]);
    let deadline = Instant::now() + DEADLINE;
    loop {
        let v = node.json(&["net", "show", "t1"]);
        let links = &v["status"]["links"];
        let through = |i: usize| links[i]["packets"].as_u64().unwrap_or(0);
        if through(0) > 0 && through(1) > 0 {
            assert_eq!(links[1]["link"], "fw1.out -> sink.in");
            break;
        }
        assert!(Instant::now() < deadline, "no packets through fw1: {v}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let table = String::from_utf8_lossy(&node.ok(&["net", "show", "t1"]).stdout).into_owned();
    assert!(table.contains("fw1.out -> sink.in"), "{table}");
    assert!(table.contains("sink sink:"), "{table}");
    node.ok(&["net", "delete", "t1"]);
    let list = node.json(&["net", "list"]);
    assert_eq!(list, serde_json::json!([]));
    // fw1 keeps running without its links.
    assert_eq!(node.json(&["vnf", "show", "fw1"])["phase"], "Running");
}
