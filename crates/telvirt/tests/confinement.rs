//! No core leaks through a real `telvirt serve` (issue #12, item 5): several threads create and
//! delete wasm VNFs through the CLI while the scheduler places them, serve is killed with
//! SIGKILL in the middle of the storm, and then, from the store file itself (opened after the
//! kill) and from the API after a restart: every allocation belongs to an existing VNF and was
//! made for its request, every CPU is held once, and the core maps serve shows equal the ones
//! rebuilt from the store alone.
//!
//! The inventory's first host (this node's agent) has no dedicated cpu, so every VNF lands on one
//! of the big hosts without an agent and stays Scheduled: nothing runs, deletes need no agent.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use telvirt_controller::placement;
use telvirt_controller::records::{self, VnfRecord};
use telvirt_sched::coremap::{host_map, render_host_map};
use telvirt_sched::{Allocation, HostSpec, Inventory, SchedConfig, Scheduler};
use telvirt_store::{RedbStore, Store};

mod common;
use common::{BIN, DEADLINE, Serve, stderr};

const BIG_HOSTS: [&str; 3] = ["big1", "big2", "big3"];
const NAMES: u64 = 160;

/// The agent's host without dedicated cpus, and three hosts of 2 x 32 cores (62 dedicated each).
fn inventory() -> String {
    let mut s = String::from(
        "hosts:\n  - name: local0\n    topology: { sockets: 1, cores_per_socket: 2, threads_per_core: 1 }\n    shared: \"0\"\n    reserved: \"1\"\n",
    );
    for h in BIG_HOSTS {
        s.push_str(&format!(
            "  - name: {h}\n    topology: {{ sockets: 2, cores_per_socket: 32, threads_per_core: 1 }}\n    shared: \"0,32\"\n"
        ));
    }
    s
}

/// A wasm VNF of one worker: in the shared group `light`, or one dedicated cpu.
fn descriptor(name: &str, shared: bool) -> String {
    let cpu = if shared {
        "{ policy: shared, count: 1, group: light }"
    } else {
        "{ policy: dedicated, count: 1 }"
    };
    format!(
        "apiVersion: telvirt/v1\nkind: Vnf\nmetadata: {{ name: {name} }}\nspec:\n  runtime: wasm\n  cpu: {cpu}\n  ports: [in, out]\n  wasm:\n    module: /srv/telvirt/fw.wasm\n    limits: {{ memory: 16MiB }}\n"
    )
}

/// splitmix64: the same storm for the same seed.
struct Dice(u64);

impl Dice {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) % n
    }
}

/// Runs the CLI (as admin, the server's address from `config`); true when it succeeded. A
/// refusal must be a name in use or a VNF already gone, unless the server is being killed.
fn cli(config: &Path, args: &[&str], stop: &AtomicBool) -> bool {
    let out = Command::new(BIN)
        .args(args)
        .env("TELVIRT_CONFIG", config)
        .env_remove("TELVIRT_SERVER")
        .env_remove("TELVIRT_TOKEN")
        .output()
        .unwrap();
    if !out.status.success() {
        let err = stderr(&out);
        assert!(
            err.contains("in use") || err.contains("not found") || stop.load(Ordering::Relaxed),
            "telvirt {args:?}: {err}"
        );
    }
    out.status.success()
}

/// The storm: `threads` threads running the CLI until `stop`, counting commands that succeeded
/// in `done`: creates and deletes of `v<i>`, and creates of a fresh name deleted at once (never
/// used again, so nothing later could hide a leak of it).
fn storm(dir: &Path, config: &Path, threads: u64, stop: &AtomicBool, done: &AtomicU64) {
    std::thread::scope(|scope| {
        for t in 0..threads {
            scope.spawn(move || {
                let mut dice = Dice(0xc0de + t);
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let i = dice.below(NAMES);
                    let ok = match dice.below(8) {
                        0..=3 => {
                            let file = dir.join(format!("v{i}.yaml"));
                            cli(
                                config,
                                &["vnf", "create", "-f", file.to_str().unwrap()],
                                stop,
                            )
                        }
                        4 | 5 => {
                            n += 1;
                            let name = format!("t{t}-{n}");
                            let file = dir.join(format!("{name}.yaml"));
                            std::fs::write(&file, descriptor(&name, n.is_multiple_of(3))).unwrap();
                            cli(
                                config,
                                &["vnf", "create", "-f", file.to_str().unwrap()],
                                stop,
                            ) && cli(config, &["vnf", "delete", &name], stop)
                        }
                        _ => cli(config, &["vnf", "delete", &format!("v{i}")], stop),
                    };
                    if ok {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
}

/// What the store file says, checked: VNFs and allocations by name, and the core map of every
/// big host rebuilt from the allocations alone.
fn from_store(
    path: &Path,
    hosts: &[HostSpec],
) -> (BTreeMap<String, VnfRecord>, BTreeMap<String, String>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let store = RedbStore::open(path).unwrap();
        let mut vnfs = BTreeMap::new();
        for (_, v) in store.list(records::VNFS).await.unwrap() {
            let r: VnfRecord = serde_json::from_slice(&v.value).unwrap();
            vnfs.insert(r.vnf.name.to_string(), r);
        }
        let mut fresh = Scheduler::new(SchedConfig::default()).unwrap();
        for h in hosts {
            fresh.add_host(h.clone()).unwrap();
        }
        for (key, v) in store.list(records::ALLOCATIONS).await.unwrap() {
            let a: Allocation = serde_json::from_slice(&v.value).unwrap();
            let Some(r) = vnfs.get(&a.request.name) else {
                panic!("{key} belongs to no VNF (a leak)");
            };
            assert_eq!(
                a.request,
                placement::vnf_request(&r.vnf),
                "{key} was made for another request"
            );
            assert_eq!(
                r.vnf.placements,
                placement::placements(&a.placement, &r.vnf.descriptor),
                "{key}: the VNF's placements differ"
            );
            fresh
                .restore(&a)
                .unwrap_or_else(|e| panic!("{key} does not restore (a cpu held twice?): {e}"));
        }
        for (name, r) in &vnfs {
            let held = fresh.placement(name).is_ok();
            assert_eq!(
                held,
                r.vnf.phase != telvirt_model::Phase::Pending,
                "{name} is {:?}; holds cores: {held}",
                r.vnf.phase
            );
        }
        let maps = BIG_HOSTS
            .iter()
            .map(|h| {
                (
                    h.to_string(),
                    render_host_map(&host_map(&fresh, h).unwrap()),
                )
            })
            .collect();
        (vnfs, maps)
    })
}

/// The core map text of `host` as serve shows it (`host show`).
fn coremap(node: &Serve, host: &str) -> String {
    let out = String::from_utf8(node.ok(&["host", "show", host]).stdout).unwrap();
    let start = out
        .find(&format!("host {host}"))
        .unwrap_or_else(|| panic!("no core map in: {out}"));
    out[start..].trim_end().to_owned() + "\n"
}

/// Polls until no VNF is Pending (all fit), with a deadline; returns the VNF list.
fn settled(node: &Serve) -> Vec<Value> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let list = node.json(&["vnf", "list"]);
        let list = list.as_array().unwrap().clone();
        if list.iter().all(|v| v["phase"] == "Scheduled") {
            return list;
        }
        assert!(Instant::now() < deadline, "VNFs never all placed: {list:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Each VNF's cpus appear in the core maps under its name, and nothing else does.
fn check_maps(vnfs: &[Value], maps: &BTreeMap<String, String>) {
    let text: String = maps.values().cloned().collect();
    for v in vnfs {
        let name = v["name"].as_str().unwrap();
        let p = &v["placements"][0];
        let host = p["host"].as_str().unwrap();
        let shared = v["descriptor"]["spec"]["cpu"]["policy"] == "shared";
        let want = if shared {
            "group admin/light".to_owned()
        } else {
            format!("{name}/ACT vcpu0")
        };
        let cpu = p["vcpus"][0][0].as_u64().unwrap();
        let line = maps[host]
            .lines()
            .find(|l| l.contains(&format!("cpu{cpu} ")))
            .unwrap_or_else(|| panic!("cpu{cpu} not on {host}"));
        assert!(line.contains(&format!("cpu{cpu} {want}")), "{name}: {line}");
    }
    let dedicated = vnfs
        .iter()
        .filter(|v| v["descriptor"]["spec"]["cpu"]["policy"] != "shared")
        .count();
    assert_eq!(
        text.matches("/ACT vcpu0").count(),
        dedicated,
        "cpus held by VNFs that do not exist: {text}"
    );
}

fn hosts_of(inventory: &str) -> Vec<HostSpec> {
    let inv: Inventory =
        telvirt_model::from_text(inventory.as_bytes(), telvirt_model::Format::Yaml).unwrap();
    inv.hosts
}

#[test]
fn storm_and_kill9_leak_no_core() {
    let dir = Serve::dir();
    let inv = inventory();
    std::fs::write(dir.path().join("inventory.yaml"), &inv).unwrap();
    for i in 0..NAMES {
        std::fs::write(
            dir.path().join(format!("v{i}.yaml")),
            descriptor(&format!("v{i}"), i.is_multiple_of(3)),
        )
        .unwrap();
    }
    let work: PathBuf = dir.path().to_owned();
    let mut node = Serve::start_in(dir, &["--inventory", "inventory.yaml"]);
    let hosts = hosts_of(&inv);
    let store = node.path("data/telvirt.redb");

    // The storm, killed in its middle.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let config = node.config();
    let storm_thread = {
        let (stop, done, work, config) = (stop.clone(), done.clone(), work.clone(), config.clone());
        std::thread::spawn(move || storm(&work, &config, 4, &stop, &done))
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while done.load(Ordering::Relaxed) < 150 {
        assert!(Instant::now() < deadline, "the storm made no progress");
        assert!(!storm_thread.is_finished(), "a storm thread failed");
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Relaxed);
    node.kill9();
    storm_thread.join().expect("storm threads");
    let (after_kill, _) = from_store(&store, &hosts);
    assert!(
        after_kill.len() > 20,
        "the storm left {} VNFs",
        after_kill.len()
    );

    // Restarted, everything left is placed, and serve's maps are the store's.
    node.restart();
    let vnfs = settled(&node);
    assert_eq!(
        vnfs.len(),
        after_kill.len(),
        "a restart neither loses nor invents VNFs"
    );
    let shown: BTreeMap<String, String> = BIG_HOSTS
        .iter()
        .map(|h| (h.to_string(), coremap(&node, h)))
        .collect();
    check_maps(&vnfs, &shown);
    node.kill9();
    let (_, stored_maps) = from_store(&store, &hosts);
    assert_eq!(
        shown, stored_maps,
        "serve's scheduler differed from its store"
    );

    // A second storm on the restarted node, then everything deleted: every cpu free again.
    node.restart();
    let (stop, done) = (AtomicBool::new(false), AtomicU64::new(0));
    std::thread::scope(|s| {
        s.spawn(|| storm(&work, &node.config(), 3, &stop, &done));
        let deadline = Instant::now() + Duration::from_secs(120);
        while done.load(Ordering::Relaxed) < 60 {
            assert!(
                Instant::now() < deadline,
                "the second storm made no progress"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        stop.store(true, Ordering::Relaxed);
    });
    let vnfs = settled(&node);
    let shown: BTreeMap<String, String> = BIG_HOSTS
        .iter()
        .map(|h| (h.to_string(), coremap(&node, h)))
        .collect();
    check_maps(&vnfs, &shown);
    for v in &vnfs {
        node.ok(&["vnf", "delete", v["name"].as_str().unwrap()]);
    }
    for h in BIG_HOSTS {
        let map = coremap(&node, h);
        assert!(map.contains(": 62 of 62 dedicated cpus free"), "{map}");
    }
    node.kill9();
    let (left, maps) = from_store(&store, &hosts);
    assert!(left.is_empty());
    for map in maps.values() {
        assert!(map.contains(": 62 of 62 dedicated cpus free"), "{map}");
    }
}
