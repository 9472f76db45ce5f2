//! `telvirt cluster up` lays out a cluster on this machine (etcd, two controllers, two hosts
//! that are network namespaces with their own agents); a wasm VNF runs on it; `cluster down`
//! stops every process and deletes every namespace it started. A second `up` while one is up
//! is refused and changes nothing; an `up` that fails half-way removes what it started;
//! `down` where nothing is up reports that and removes nothing. Needs root (namespaces).

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Mutex;
use std::time::{Duration, Instant};

mod common;
use common::{BIN, lay_out_examples, stderr, wait_until};
#[path = "../../dataplane/tests/support/netns.rs"]
mod netns;
use serde_json::Value;

/// The tests that lay out namespaces run one at a time: each compares `ip netns list` before
/// and after.
static NAMESPACES: Mutex<()> = Mutex::new(());

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// `telvirt ARGS` run in `cwd`, as the admin of the cluster whose client config is `config`.
fn telvirt(cwd: &Path, config: Option<&Path>, args: &[&str]) -> Output {
    let mut c = Command::new(BIN);
    c.current_dir(cwd)
        .args(args)
        .env_remove("TELVIRT_SERVER")
        .env_remove("TELVIRT_TOKEN")
        .env_remove("TELVIRT_CONFIG");
    if let Some(config) = config {
        c.env("TELVIRT_CONFIG", config);
    }
    c.output().unwrap()
}

fn json(out: &Output, what: &str) -> Value {
    assert!(out.status.success(), "{what}: {}", stderr(out));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{what} printed no JSON ({e}): {}", common::stdout(out)))
}

fn namespaces() -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    common::stdout(&out)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

/// Whether `pid` is a live process (not gone, not a zombie waiting to be reaped).
fn running(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !matches!(
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next()),
            Some("Z" | "X")
        )
    })
}

/// Every pid `cluster up -o json` reports: etcd's, the controllers' and the agents'.
fn pids(cluster: &Value) -> Vec<u64> {
    let mut pids = vec![cluster["etcd"]["pid"].as_u64().unwrap()];
    for group in ["controllers", "hosts"] {
        for p in cluster[group].as_array().unwrap() {
            pids.push(p["pid"].as_u64().unwrap());
        }
    }
    pids
}

/// Takes the cluster in `dir` down when dropped, so a failing test leaves nothing running.
struct Down<'a>(&'a Path);

impl Drop for Down<'_> {
    fn drop(&mut self) {
        let _ = telvirt(
            self.0,
            None,
            &["cluster", "down", "--dir", self.0.to_str().unwrap()],
        );
    }
}

#[test]
fn cluster_up_runs_a_vnf_and_cluster_down_removes_everything() {
    if !is_root() {
        eprintln!("skipped: cluster up creates network namespaces, which needs root");
        return;
    }
    let _one_at_a_time = NAMESPACES.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    lay_out_examples(tmp.path());
    let dir = tmp.path().join("cluster");
    let dir_arg = dir.to_str().unwrap();
    let before = namespaces();
    let _down = Down(&dir);

    let up = &[
        "cluster",
        "up",
        "--hosts",
        "2",
        "--controllers",
        "2",
        "--dir",
        dir_arg,
        "-o",
        "json",
    ];
    let cluster = json(&telvirt(tmp.path(), None, up), "cluster up");
    let config = Path::new(cluster["client_config"].as_str().unwrap()).to_owned();
    let controllers: Vec<&str> = cluster["controllers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["url"].as_str().unwrap())
        .collect();
    assert_eq!(controllers.len(), 2, "{cluster}");
    assert!(
        controllers.contains(&cluster["leader"].as_str().unwrap()),
        "the leader is not one of the controllers: {cluster}"
    );
    let ours: Vec<String> = cluster["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["namespace"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ours.len(), 2, "{cluster}");
    let now = namespaces();
    for ns in &ours {
        assert!(now.contains(ns), "namespace {ns} missing from {now:?}");
    }
    let pids = pids(&cluster);
    for pid in &pids {
        assert!(running(*pid), "pid {pid} is not running: {cluster}");
    }

    // Both hosts are Ready, through the controllers' client config (polled: a heartbeat late
    // past the 1 s lease on a loaded machine makes a host NotReady until its next beat).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let hosts = json(
            &telvirt(tmp.path(), Some(&config), &["host", "list", "-o", "json"]),
            "host list",
        );
        let ready: Vec<&str> = hosts
            .as_array()
            .unwrap()
            .iter()
            .filter(|h| h["status"] == "Ready")
            .map(|h| h["name"].as_str().unwrap())
            .collect();
        if ready == ["h1", "h2"] {
            break;
        }
        assert!(Instant::now() < deadline, "{hosts}");
        std::thread::sleep(Duration::from_millis(100));
    }

    // A second `up` on the same directory is refused and changes nothing.
    let record = std::fs::read(dir.join("cluster.json")).unwrap();
    let again = telvirt(tmp.path(), None, up);
    assert!(!again.status.success(), "a second cluster up succeeded");
    assert!(
        stderr(&again).contains("a cluster is up in"),
        "{}",
        stderr(&again)
    );
    assert_eq!(std::fs::read(dir.join("cluster.json")).unwrap(), record);
    assert_eq!(namespaces(), now);

    // A wasm VNF is placed on one of the hosts and runs there.
    let created = telvirt(
        tmp.path(),
        Some(&config),
        &["vnf", "create", "-f", "examples/descriptors/fw1.yaml"],
    );
    assert!(created.status.success(), "vnf create: {}", stderr(&created));
    let mut shown = Value::Null;
    wait_until("fw1 never ran", || {
        shown = json(
            &telvirt(
                tmp.path(),
                Some(&config),
                &["vnf", "show", "fw1", "-o", "json"],
            ),
            "vnf show",
        );
        shown["phase"] == "Running"
    });
    let host = shown["placements"][0]["host"].as_str().unwrap_or_default();
    assert!(["h1", "h2"].contains(&host), "fw1 runs on {host}: {shown}");

    // Down stops every process and deletes the namespaces; logs stay.
    let down = json(
        &telvirt(
            tmp.path(),
            None,
            &["cluster", "down", "--dir", dir_arg, "-o", "json"],
        ),
        "cluster down",
    );
    for list in ["gone", "failed"] {
        assert_eq!(down[list], serde_json::json!([]), "{list}: {down}");
    }
    let after = namespaces();
    for ns in &ours {
        assert!(!after.contains(ns), "namespace {ns} left: {after:?}");
    }
    assert_eq!(after, before);
    for pid in &pids {
        assert!(!running(*pid), "pid {pid} still runs after cluster down");
    }
    assert!(!dir.join("cluster.json").exists());
    assert!(dir.join("h1/agent.log").is_file(), "the logs were not kept");

    // Down again: nothing is recorded, nothing is removed.
    let again = json(
        &telvirt(
            tmp.path(),
            None,
            &["cluster", "down", "--dir", dir_arg, "-o", "json"],
        ),
        "second cluster down",
    );
    assert_eq!(again["removed"], serde_json::json!([]), "{again}");
}

#[test]
fn a_cluster_up_that_fails_half_way_removes_what_it_started() {
    if !is_root() {
        eprintln!("skipped: cluster up creates network namespaces, which needs root");
        return;
    }
    let _one_at_a_time = NAMESPACES.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cluster");
    let _down = Down(&dir);
    // Host h2's directory cannot be made: up fails after etcd, a controller and h1 run.
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("h2"), "in the way").unwrap();
    let before = namespaces();
    let out = telvirt(
        tmp.path(),
        None,
        &[
            "cluster",
            "up",
            "--hosts",
            "2",
            "--controllers",
            "1",
            "--dir",
            dir.to_str().unwrap(),
        ],
    );
    assert!(!out.status.success(), "cluster up succeeded");
    let err = stderr(&out);
    assert!(
        err.contains("everything it had started was removed") && err.contains("h2"),
        "{err}"
    );
    assert!(
        dir.join("h1/agent.log").is_file(),
        "h1's agent was never started, so nothing was undone"
    );
    assert!(!dir.join("cluster.json").exists());
    assert_eq!(namespaces(), before);
    let marker = dir.to_str().unwrap().to_owned();
    let left: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<u64>().ok())
        .filter(|pid| running(*pid))
        .filter_map(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&marker) && !c.contains("cluster up"))
        .collect();
    assert!(left.is_empty(), "processes left running: {left:?}");
}

#[test]
fn cluster_down_where_nothing_is_up_says_so_and_removes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("nothing");
    let out = telvirt(
        tmp.path(),
        None,
        &["cluster", "down", "--dir", dir.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        common::stdout(&out).contains("nothing to take down"),
        "{}",
        common::stdout(&out)
    );
    let report = json(
        &telvirt(
            tmp.path(),
            None,
            &[
                "cluster",
                "down",
                "--dir",
                dir.to_str().unwrap(),
                "-o",
                "json",
            ],
        ),
        "cluster down",
    );
    assert_eq!(report["removed"], serde_json::json!([]), "{report}");
    assert!(!dir.exists(), "down created {}", dir.display());
}

/// Client and server namespaces wired into hosts `near` and `far` of a cluster: client
/// (c0 10.204.0.1) <-veth-> c1 in `near`, server (s0 10.204.0.2) <-veth-> s1 in `far`;
/// offloads off (the data plane handles whole frames with finished checksums).
fn client_and_server(near: &str, far: &str) -> netns::Topology {
    let id = std::process::id() % 100_000;
    let t = netns::Topology {
        ns: vec![format!("tvxc{id}"), format!("tvxs{id}")],
    };
    for (ns, host_ns, side, addr) in [
        (&t.ns[0], near, "c", "10.204.0.1/24"),
        (&t.ns[1], far, "s", "10.204.0.2/24"),
    ] {
        netns::must(&["ip", "netns", "add", ns]);
        netns::veth(host_ns, &format!("{side}1"), ns, &format!("{side}0"), addr);
    }
    t
}

#[test]
fn ping_and_iperf3_cross_a_chain_whose_firewalls_run_on_two_hosts() {
    if !is_root() {
        eprintln!("skipped: cluster up creates network namespaces, which needs root");
        return;
    }
    netns::require_traffic_tools();
    let _one_at_a_time = NAMESPACES.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    lay_out_examples(tmp.path());
    let dir = tmp.path().join("cluster");
    let dir_arg = dir.to_str().unwrap();
    let _down = Down(&dir);
    let up = &[
        "cluster",
        "up",
        "--hosts",
        "2",
        "--controllers",
        "1",
        "--dir",
        dir_arg,
        "-o",
        "json",
    ];
    let cluster = json(&telvirt(tmp.path(), None, up), "cluster up");
    let config = Path::new(cluster["client_config"].as_str().unwrap()).to_owned();
    let host_ns = |name: &str| {
        cluster["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["name"] == name)
            .and_then(|h| h["namespace"].as_str())
            .unwrap()
            .to_owned()
    };
    let cli = |args: &[&str]| {
        let out = telvirt(tmp.path(), Some(&config), args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        out
    };
    // Two firewalls that pass everything across their ports: fw1 on h1, fw2 on h2.
    use telvirt_runtime_wasm::vnfs::{firewall_blob_hex, fw_action};
    let blob = firewall_blob_hex(fw_action::CROSS, &[]);
    let fw1 = std::fs::read_to_string(tmp.path().join("examples/descriptors/fw1.yaml"))
        .unwrap()
        .replace("blob_hex: \"02000000\"", &format!("blob_hex: \"{blob}\""));
    assert!(fw1.contains(&blob), "fw1.yaml's config changed: {fw1}");
    for (name, on, off) in [("fw1", "h1", "h2"), ("fw2", "h2", "h1")] {
        let file = tmp
            .path()
            .join(format!("examples/descriptors/{name}-cross.yaml"));
        std::fs::write(&file, fw1.replace("name: fw1", &format!("name: {name}"))).unwrap();
        cli(&["host", "uncordon", on]);
        cli(&["host", "cordon", off]);
        cli(&["vnf", "create", "-f", file.to_str().unwrap()]);
        wait_until(&format!("{name} never ran on {on}"), || {
            let v: Value =
                serde_json::from_slice(&cli(&["vnf", "show", name, "-o", "json"]).stdout).unwrap();
            v["phase"] == "Running" && v["placements"][0]["host"] == on
        });
    }
    let t = client_and_server(&host_ns("h1"), &host_ns("h2"));
    let net = "apiVersion: telvirt/v1\nkind: Network\nmetadata: { name: span }\nspec:\n  links:\n    - host:c1 -> fw1.in\n    - fw1.out -> fw2.in\n    - fw2.out -> host:s1\n    - host:s1 -> fw2.out\n    - fw2.in -> fw1.out\n    - fw1.in -> host:c1\n";
    let file = tmp.path().join("span.yaml");
    std::fs::write(&file, net).unwrap();
    cli(&["net", "create", "-f", file.to_str().unwrap()]);
    wait_until("the six links were never live on their hosts", || {
        let v: Value =
            serde_json::from_slice(&cli(&["net", "show", "span", "-o", "json"]).stdout).unwrap();
        v["status"]["links"]
            .as_array()
            .is_some_and(|l| l.len() == 6 && l.iter().all(|l| l["active"] == true))
    });
    netns::ping_ok(&t, 0, "10.204.0.2");
    let _server = netns::iperf3_server(&t, 1, 5201);
    let (bytes, bps) = netns::iperf3_moves_data(&t, 0, "10.204.0.2", 5201);
    eprintln!(
        "iperf3 TCP across fw1 (h1) -> VXLAN -> fw2 (h2): {bytes} bytes, {:.0} Mbit/s",
        bps / 1e6
    );
}
