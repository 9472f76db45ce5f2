//! Chaos on a cluster laid out on loopback: a three-member etcd, two `telvirt controller`
//! processes and three `telvirt agent` processes (hosts a1..a3, each the two CPUs of this
//! machine on paper), under a steady burst of creates and deletes sent to whichever controller
//! answers. One thing at a time is killed with SIGKILL: the leading controller, an agent, an
//! etcd member. After each kill the load pauses and the test waits (with a deadline) until:
//! the API answers; every acknowledged create is listed and every acknowledged delete gone;
//! the store is consistent (no allocation without its VNF, no placed VNF without its
//! allocation, no CPU held by two VNFs, the allocations replay into an empty scheduler); and
//! every VNF placed on a Ready host is Running. How fast the API answers again is a figure of
//! `telvirt bench cluster`, not asserted here.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;
use common::{Agent, DEADLINE, ExtraController, Serve, lay_out_examples, try_http, wait_until};
use serde_json::Value;
use telvirt_controller::consistency::{ConsistencyReport, check};
use telvirt_sched::SchedConfig;
use telvirt_store::EtcdStore;
use telvirt_store::local_etcd::LocalEtcd;

const HOSTS: [&str; 3] = ["a1", "a2", "a3"];
/// How long the load runs between two kills at least, and what it must have had acknowledged
/// meanwhile (creates, deletes): on a slow host it runs longer, never does less.
const LOAD_BETWEEN_KILLS: Duration = Duration::from_secs(3);
const LOAD_ACKED_BETWEEN_KILLS: (usize, usize) = (6, 2);

/// What the load was told, and what it could not find out.
#[derive(Default, Debug)]
struct Ledger {
    /// Creates a controller acknowledged (201).
    created: BTreeSet<String>,
    /// Deletes a controller acknowledged.
    deleted: BTreeSet<String>,
    /// Requests no controller answered: their VNF may or may not exist.
    uncertain: BTreeSet<String>,
    /// Answers other than success or "unavailable" (none is expected).
    refused: Vec<String>,
}

/// Sends a request to each controller in turn until one answers with something other than
/// 503; its (status, body), or None when none did.
fn to_any(
    apis: &[String],
    method: &str,
    path: &str,
    token: &str,
    body: &str,
) -> Option<(u16, String)> {
    send(apis, method, path, token, body).0
}

/// [`to_any`], also saying whether an attempt before the answer went unanswered or was refused
/// as unavailable: then the request may have applied before the answer (a create then answers
/// 409, a delete 404).
fn send(
    apis: &[String],
    method: &str,
    path: &str,
    token: &str,
    body: &str,
) -> (Option<(u16, String)>, bool) {
    let mut in_doubt = false;
    for api in apis {
        match try_http(api, method, path, Some(token), body) {
            Ok((status, text)) if status != 503 && status != 0 => {
                return (Some((status, text)), in_doubt);
            }
            // Refused before it was sent: nothing happened.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
            _ => in_doubt = true,
        }
    }
    (None, in_doubt)
}

/// The load: every 100 ms a create (alternately a dedicated and a shared-group wasm VNF), and
/// every third step a delete of the oldest VNF it created. Holds `gate` during each request, so
/// a checker that takes it sees no request in flight.
fn load(
    apis: Arc<Mutex<Vec<String>>>,
    token: String,
    template: String,
    ledger: Arc<Mutex<Ledger>>,
    gate: Arc<Mutex<()>>,
    stop: Arc<AtomicBool>,
) {
    let mut n = 0u32;
    let mut live = std::collections::VecDeque::new();
    while !stop.load(Ordering::SeqCst) {
        {
            let _in_flight = gate.lock().unwrap();
            let apis = apis.lock().unwrap().clone();
            n += 1;
            if n.is_multiple_of(3)
                && let Some(name) = live.pop_front()
            {
                let path = format!("/v1/vnfs/{name}");
                let mut l = ledger.lock().unwrap();
                match send(&apis, "DELETE", &path, &token, "") {
                    (Some((200..=299, _)), _) => {
                        l.deleted.insert(name);
                    }
                    (Some((404, _)), true) | (None, _) => {
                        l.uncertain.insert(name);
                    }
                    (Some((status, body)), _) => {
                        l.refused.push(format!("delete {name}: {status} {body}"))
                    }
                }
            } else {
                let name = format!("c{n}");
                let cpu = if n.is_multiple_of(2) {
                    "{ policy: shared, count: 1, group: g }"
                } else {
                    "{ policy: dedicated, count: 1 }"
                };
                let body = template
                    .replace("name: fw1", &format!("name: {name}"))
                    .replace("{ policy: dedicated, count: 1 }", cpu);
                let mut l = ledger.lock().unwrap();
                match send(&apis, "POST", "/v1/vnfs", &token, &body) {
                    (Some((201, _)), _) => {
                        l.created.insert(name.clone());
                        live.push_back(name);
                    }
                    (Some((409, _)), true) | (None, _) => {
                        l.uncertain.insert(name);
                    }
                    (Some((status, body)), _) => {
                        l.refused.push(format!("create {name}: {status} {body}"))
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The cluster under test.
struct Cluster {
    etcd: LocalEtcd,
    store: EtcdStore,
    runtime: tokio::runtime::Runtime,
    first: Serve,
    /// Controllers started after the first; killed ones stay (dead) in the list.
    extra: Vec<ExtraController>,
    agents: Vec<Option<Agent>>,
    controllers: String,
    admin: String,
}

impl Cluster {
    fn start_agent(&mut self, i: usize) {
        let host = HOSTS[i];
        let (token, data, inventory) = (
            format!("{host}.token"),
            format!("agent-{host}"),
            format!("inventory-{host}.yaml"),
        );
        let args = [
            "--token-file",
            &token,
            "--data-dir",
            &data,
            "--inventory",
            &inventory,
            "--host-name",
            host,
            "--heartbeat-interval-ms",
            "200",
        ];
        let agent = Agent::start_at(
            &self.first,
            &self.controllers,
            &format!("agent-{host}.log"),
            &args,
        );
        self.agents[i] = Some(agent);
    }

    /// (status, JSON body) of a request to whichever controller answers.
    fn api(&self, method: &str, path: &str) -> Option<Value> {
        let apis: Vec<String> = self.controllers.split(',').map(str::to_owned).collect();
        to_any(&apis, method, path, &self.admin, "")
            .filter(|(status, _)| *status == 200)
            .and_then(|(_, body)| serde_json::from_str(&body).ok())
    }

    fn host_status(&self) -> Vec<(String, String)> {
        self.api("GET", "/v1/hosts")
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
            .iter()
            .map(|h| {
                (
                    h["name"].as_str().unwrap_or_default().to_owned(),
                    h["status"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    }

    fn consistency(&self) -> ConsistencyReport {
        self.runtime
            .block_on(check(&self.store, SchedConfig::default()))
            .unwrap()
    }

    /// Waits until the cluster meets every invariant for what `ledger` says; `after` names the
    /// kill, for the failure message.
    fn settle(&self, ledger: &Ledger, after: &str) {
        let deadline = Instant::now() + DEADLINE * 3;
        while let Some(why) = self.broken(ledger) {
            assert!(
                Instant::now() < deadline,
                "after {after}, the cluster did not settle: {why}\n{ledger:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// What is not (yet) as it must be, if anything.
    fn broken(&self, ledger: &Ledger) -> Option<String> {
        let Some(vnfs) = self.api("GET", "/v1/vnfs?limit=1000") else {
            return Some("no controller answers".into());
        };
        let vnfs = vnfs.as_array().cloned().unwrap_or_default();
        let names: BTreeSet<&str> = vnfs.iter().filter_map(|v| v["name"].as_str()).collect();
        let missing: Vec<&String> = ledger
            .created
            .iter()
            .filter(|n| !ledger.deleted.contains(*n) && !ledger.uncertain.contains(*n))
            .filter(|n| !names.contains(n.as_str()))
            .collect();
        if !missing.is_empty() {
            return Some(format!("acknowledged creates missing: {missing:?}"));
        }
        let ready: BTreeSet<String> = self
            .host_status()
            .into_iter()
            .filter(|(_, s)| s == "Ready")
            .map(|(h, _)| h)
            .collect();
        // A delete of a VNF on a host that is not Ready waits for that host (its VNF may still
        // run there): it stays listed, to be stopped, until the host's agent is back.
        let on_ready = |v: &Value| {
            v["placements"].as_array().is_some_and(|p| {
                !p.is_empty()
                    && p.iter()
                        .all(|p| p["host"].as_str().is_some_and(|h| ready.contains(h)))
            })
        };
        let kept: Vec<String> = vnfs
            .iter()
            .filter(|v| {
                v["name"]
                    .as_str()
                    .is_some_and(|n| ledger.deleted.contains(n))
            })
            .filter(|v| on_ready(v) || v["desired"] != "Stopped")
            .map(|v| format!("{} {} on {}", v["name"], v["phase"], v["placements"]))
            .collect();
        if !kept.is_empty() {
            return Some(format!("acknowledged deletes still listed: {kept:?}"));
        }
        let not_running: Vec<String> = vnfs
            .iter()
            .filter(|v| on_ready(v) && v["phase"] != "Running")
            .map(|v| {
                format!(
                    "{} {}: {} on {}",
                    v["name"], v["phase"], v["reason"], v["placements"]
                )
            })
            .collect();
        if !not_running.is_empty() {
            return Some(format!(
                "placed on a Ready host but not Running: {not_running:?}"
            ));
        }
        let report = self.consistency();
        if !report.is_consistent() {
            return Some(format!("the store is not consistent: {report:?}"));
        }
        None
    }
}

#[test]
fn a_cluster_keeps_its_invariants_when_a_controller_an_agent_and_an_etcd_member_die() {
    let dir = Serve::dir();
    lay_out_examples(dir.path());
    for host in HOSTS {
        std::fs::write(
            dir.path().join(format!("inventory-{host}.yaml")),
            format!("hosts:\n  - name: {host}\n    topology: {{ sockets: 1, cores_per_socket: 2, threads_per_core: 1 }}\n"),
        )
        .unwrap();
    }
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let etcd = runtime
        .block_on(LocalEtcd::start_members(&dir.path().join("etcd"), 3, true))
        .unwrap_or_else(|e| panic!("{e}"));
    let namespace = "/chaos";
    let url = etcd.store_url(namespace);
    let store = runtime
        .block_on(EtcdStore::connect(&etcd.endpoints(), namespace))
        .unwrap();
    let controller_args = ["--store", url.as_str(), "--host-lease-ttl-ms", "1000"];
    let first = Serve::controller_in(dir, &controller_args);
    let second = ExtraController::start(&first, &controller_args, "controller-2.log");
    let admin = first.admin_token();
    let controllers = format!("{},{}", first.server(), second.api);
    let mut cluster = Cluster {
        etcd,
        store,
        runtime,
        first,
        extra: vec![second],
        agents: HOSTS.iter().map(|_| None).collect(),
        controllers,
        admin,
    };
    for (i, host) in HOSTS.iter().enumerate() {
        cluster.first.ok(&[
            "host",
            "credential",
            host,
            "--out",
            &format!("{host}.token"),
        ]);
        cluster.start_agent(i);
    }
    wait_until("every host Ready", || {
        cluster
            .host_status()
            .iter()
            .filter(|(_, s)| s == "Ready")
            .count()
            == HOSTS.len()
    });
    // The firewall module is uploaded once (by the CLI); the load's descriptors name it.
    cluster
        .first
        .ok(&["vnf", "create", "-f", "examples/descriptors/fw1.yaml"]);
    cluster.first.wait_phase("fw1", "Running");
    let module =
        cluster.first.json(&["vnf", "show", "fw1"])["descriptor"]["spec"]["wasm"]["module"]
            .as_str()
            .unwrap()
            .to_owned();
    let template = std::fs::read_to_string(cluster.first.path("examples/descriptors/fw1.yaml"))
        .unwrap()
        .replace("../vnfs/firewall.wasm", &module);

    let apis = Arc::new(Mutex::new(
        cluster
            .controllers
            .split(',')
            .map(str::to_owned)
            .collect::<Vec<_>>(),
    ));
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let gate = Arc::new(Mutex::new(()));
    let stop = Arc::new(AtomicBool::new(false));
    let loader = {
        let (apis, token, ledger, gate, stop) = (
            apis.clone(),
            cluster.admin.clone(),
            ledger.clone(),
            gate.clone(),
            stop.clone(),
        );
        std::thread::spawn(move || load(apis, token, template, ledger, gate, stop))
    };
    // Checks with the load paused (no request in flight), then lets it go on.
    let check_after = |cluster: &Cluster, after: &str| {
        let _paused = gate.lock().unwrap();
        let ledger = ledger.lock().unwrap();
        assert!(
            ledger.refused.is_empty(),
            "after {after}: {:?}",
            ledger.refused
        );
        cluster.settle(&ledger, after);
    };

    // Lets the load run for its time and work between two kills.
    let load_runs = |before: &str| {
        let acked = || {
            let l = ledger.lock().unwrap();
            (l.created.len(), l.deleted.len())
        };
        let (created, deleted) = acked();
        let (creates, deletes) = LOAD_ACKED_BETWEEN_KILLS;
        let since = Instant::now();
        wait_until(&format!("the load's work before {before}"), || {
            let now = acked();
            since.elapsed() >= LOAD_BETWEEN_KILLS
                && now.0 >= created + creates
                && now.1 >= deleted + deletes
        });
    };

    // 1. The leading controller (the first one) dies; another is started in its place.
    load_runs("the leader's kill");
    cluster.first.kill9();
    check_after(&cluster, "the leader's kill");
    let third = ExtraController::start(&cluster.first, &controller_args, "controller-3.log");
    apis.lock().unwrap().push(third.api.clone());
    cluster.controllers = format!("{},{}", cluster.controllers, third.api);
    cluster.extra.push(third);

    // 2. Host a3's agent dies: a3 turns NotReady (its VNFs are exempt from Running), then its
    // agent comes back and a3's VNFs run again.
    load_runs("a3's agent's kill");
    cluster.agents[2] = None;
    wait_until("host a3 NotReady after its agent's kill", || {
        cluster
            .host_status()
            .iter()
            .any(|(h, s)| h == "a3" && s == "NotReady")
    });
    check_after(&cluster, "a3's agent's kill");
    cluster.start_agent(2);
    wait_until("host a3 Ready again", || {
        cluster
            .host_status()
            .iter()
            .any(|(h, s)| h == "a3" && s == "Ready")
    });

    // 3. An etcd member dies; two of three keep the quorum. Then it comes back.
    load_runs("an etcd member's kill");
    cluster.etcd.kill_member(0);
    check_after(&cluster, "an etcd member's kill");
    cluster.etcd.spawn_member(0).unwrap();

    // The load stops; everything settles once more.
    load_runs("the load's end");
    stop.store(true, Ordering::SeqCst);
    loader.join().unwrap();
    let ledger = ledger.lock().unwrap();
    assert!(ledger.refused.is_empty(), "{:?}", ledger.refused);
    cluster.settle(&ledger, "the load's end");
    // The load did real work around the kills.
    assert!(ledger.created.len() >= 20, "{ledger:?}");
    assert!(ledger.deleted.len() >= 8, "{ledger:?}");
    let running = cluster
        .api("GET", "/v1/vnfs?limit=1000")
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter(|v| v["phase"] == "Running")
        .count();
    assert!(running >= 3, "only {running} VNFs run at the end");
}
