//! Two `telvirt controller` processes sharing a real etcd (started by the test): one leads, the
//! other forwards every request to it; an agent knows both. Killing the leader with SIGKILL
//! hands over: the other leads, nothing acknowledged is lost, the agent's VNFs keep running
//! and new ones are placed on cores nobody else holds. When the agent dies, its host turns
//! NotReady (its etcd lease lapses) and every VNF it held is Unknown with an event.

mod common;
use common::{Agent, ExtraController, Serve, a1_agent_args, lay_out_examples, wait_until};
use serde_json::Value;
use telvirt_store::local_etcd::LocalEtcd;

const INVENTORY: &str = "hosts:\n  - name: a1\n    topology: { sockets: 1, cores_per_socket: 4, threads_per_core: 1 }\n";

/// A request to `base` as `token`: (status, body as JSON, or null).
fn http(base: &str, method: &str, path: &str, token: &str, body: &str) -> (u16, Value) {
    let (status, text) = common::http(base, method, path, Some(token), body);
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// The dedicated cores each VNF on host a1 holds.
fn dedicated_cores(node: &Serve) -> Vec<(String, Vec<u64>)> {
    node.json(&["vnf", "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            let cores = v["placements"][0]["vcpus"]
                .as_array()
                .map(|per_vcpu| {
                    per_vcpu
                        .iter()
                        .flat_map(|cpus| cpus.as_array().cloned().unwrap_or_default())
                        .filter_map(|c| c.as_u64())
                        .collect()
                })
                .unwrap_or_default();
            (v["name"].as_str().unwrap().to_owned(), cores)
        })
        .collect()
}

#[test]
fn the_follower_forwards_and_takes_over_when_the_leader_is_killed() {
    let dir = Serve::dir();
    lay_out_examples(dir.path());
    std::fs::write(dir.path().join("inventory.yaml"), INVENTORY).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let etcd = runtime
        .block_on(LocalEtcd::start(&dir.path().join("etcd"), true))
        .unwrap_or_else(|e| panic!("{e}"));
    let store = etcd.store_url("/cluster-test");
    // A host lease shorter than a handover (the leader key outlives its killed leader by
    // 5 s): the hosts' leases lapse while no controller leads. Neither is shorter than a
    // loaded machine may delay a heartbeat (a 1 s lease let the VNFs flap before the kill).
    let times = ["--leader-ttl-ms", "5000", "--host-lease-ttl-ms", "3000"];
    let mut leader = Serve::controller_in(dir, &[&["--store", &store][..], &times].concat());
    let first = leader.server();
    let admin = leader.admin_token();
    let follower = ExtraController::start(
        &leader,
        &[&["--store", &store][..], &times].concat(),
        "second.log",
    );
    let second = follower.api.clone();
    wait_until("the second controller never saw the first lead", || {
        let (status, v) = http(&second, "GET", "/v1/leader", "", "");
        status == 200 && v["role"] == "follower" && v["leader"]["api"] == first.as_str()
    });

    // The follower forwards reads and writes to the leader, errors included.
    let (status, list) = http(&second, "GET", "/v1/vnfs", &admin, "");
    assert_eq!(status, 200, "{list}");
    let (status, problem) = http(&second, "GET", "/v1/vnfs", "tvt_wrong", "");
    assert_eq!(status, 401, "{problem}");

    leader.ok(&["host", "credential", "a1", "--out", "a1.token"]);
    let controllers = format!("{first},{second}");
    let agent = Agent::start_at(
        &leader,
        &controllers,
        "agent.log",
        &a1_agent_args("a1.token", &[]),
    );
    leader.ok(&["vnf", "create", "-f", "examples/descriptors/fw1.yaml"]);
    leader.wait_phase("fw1", "Running");
    // fw1's module, uploaded already: a raw request names it by digest.
    let module = leader.json(&["vnf", "show", "fw1"])["descriptor"]["spec"]["wasm"]["module"]
        .as_str()
        .unwrap()
        .to_owned();
    let fw2 = std::fs::read_to_string(leader.path("examples/descriptors/fw1.yaml"))
        .unwrap()
        .replace("name: fw1", "name: fw2")
        .replace("../vnfs/firewall.wasm", &module);
    let (status, created) = http(&second, "POST", "/v1/vnfs", &admin, &fw2);
    assert_eq!(status, 201, "{created}");
    leader.wait_phase("fw2", "Running");

    leader.kill9();
    wait_until("the follower never took over", || {
        let (status, v) = http(&second, "GET", "/v1/leader", "", "");
        status == 200 && v["role"] == "leader"
    });
    // The new leader rewrote the shared client config: the CLI follows it.
    wait_until("the client config never named the new leader", || {
        leader.server() == second
    });
    // Nothing acknowledged is lost; the agent moved to the new leader and its VNFs run on.
    for name in ["fw1", "fw2"] {
        leader.wait_phase(name, "Running");
    }
    // The host's lease lapsed during the handover, but the new leader waited for the agent's
    // first heartbeat before judging the host: no VNF flapped to Unknown.
    wait_until("host a1 never turned Ready under the new leader", || {
        leader
            .json(&["host", "list"])
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h["name"] == "a1" && h["status"] == "Ready")
    });
    for name in ["fw1", "fw2"] {
        let events = leader.json(&["vnf", "events", name]);
        assert!(
            events
                .as_array()
                .unwrap()
                .iter()
                .all(|e| e["to"] != "Unknown"),
            "{name} flapped during the handover: {events}"
        );
    }
    // The new leader frees and gives out cores from what the store holds (this machine has two
    // CPUs for workers: fw1's goes before fw3 takes one).
    let fw1_cores = dedicated_cores(&leader)
        .into_iter()
        .find(|(name, _)| name == "fw1")
        .unwrap()
        .1;
    leader.ok(&["vnf", "delete", "fw1"]);
    wait_until("fw1 was never deleted", || {
        dedicated_cores(&leader)
            .iter()
            .all(|(name, _)| name != "fw1")
    });
    let fw3 = fw2.replace("name: fw2", "name: fw3");
    let (status, created) = http(&second, "POST", "/v1/vnfs", &admin, &fw3);
    assert_eq!(status, 201, "{created}");
    leader.wait_phase("fw3", "Running");
    // No core is held twice.
    let held = dedicated_cores(&leader);
    assert_eq!(held.len(), 2, "{held:?}");
    let mut cores: Vec<u64> = held.iter().flat_map(|(_, c)| c.clone()).collect();
    assert_eq!(
        cores.len(),
        2,
        "each VNF holds one dedicated core: {held:?}"
    );
    cores.sort_unstable();
    cores.dedup();
    assert_eq!(cores.len(), 2, "a core is held twice: {held:?}");
    assert!(
        cores.contains(&fw1_cores[0]),
        "fw3 did not get fw1's freed core: {held:?}"
    );

    // The host's agent dies: its etcd lease lapses, the host turns NotReady and each VNF it
    // held is Unknown, with an event saying why.
    drop(agent);
    wait_until("host a1 never turned NotReady", || {
        leader
            .json(&["host", "list"])
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h["name"] == "a1" && h["status"] == "NotReady")
    });
    for name in ["fw2", "fw3"] {
        leader.wait_phase(name, "Unknown");
        let events = leader.json(&["vnf", "events", name]);
        assert!(
            events
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["to"] == "Unknown"
                    && e["reason"].as_str().is_some_and(|r| r.contains("a1"))),
            "{events}"
        );
    }

    drop(follower);
    drop(etcd);
}

/// `telvirt bench cluster`, at its smallest, reports every figure from real processes: each
/// VNF ran on both set-ups, each kind of failure was timed against its baseline, nothing
/// acknowledged was lost and the store is consistent after the kills.
#[test]
fn bench_cluster_reports_every_figure() {
    let out = std::process::Command::new(common::BIN)
        .args(["bench", "cluster", "--vnfs", "2", "--rounds", "1"])
        .args([
            "--failovers",
            "1",
            "--host-failures",
            "1",
            "--etcd-failures",
            "1",
        ])
        .args(["-o", "json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", common::stderr(&out));
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    for setup in ["embedded", "cluster"] {
        assert_eq!(r[setup]["running"], 2, "{r}");
        assert!(r[setup]["creates_per_s"].as_f64().unwrap() > 0.0, "{r}");
    }
    for kill in ["leader_failover", "host_failure", "etcd_member_failure"] {
        assert_eq!(r[kill]["telvirt_ms"].as_array().unwrap().len(), 1, "{r}");
        assert!(r[kill]["baseline_max_ms"].as_f64().unwrap() > 0.0, "{r}");
    }
    assert!(r["etcd_db_bytes"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(r["lost_acknowledged"], 0, "{r}");
    assert_eq!(r["store_consistent"], true, "{r}");
}
