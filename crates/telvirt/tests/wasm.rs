//! Wasm VNFs in a real `telvirt serve`: the example modules reach Running on the node's data
//! plane, lock and unlock pause and resume them, a module the verifier refuses is refused at
//! upload (or, named as a path on the node, ends Failed) with the verifier's reason while the
//! others keep running, and networks carry packets through them.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

mod common;
use common::{
    BIN, DEADLINE, Serve, lay_out_examples, map_entries, sample, scrape, stderr, wait_until,
};
#[path = "../../dataplane/tests/support/netns.rs"]
mod netns;

/// Four dedicatable CPUs, none kept shared: VNFs created first land on CPUs 0 and 1, where the
/// data plane has workers on any machine with two CPUs.
const INVENTORY: &str =
    "hosts:\n  - name: t\n    topology: { sockets: 1, cores_per_socket: 4, threads_per_core: 1 }\n";

/// A `telvirt serve` working in a temp directory that holds `examples/` (built-in modules
/// written by `telvirt wasm examples`, and the example descriptors).
fn start() -> Serve {
    start_with(&[])
}

/// [`start`] with more `telvirt serve` arguments.
fn start_with(extra: &[&str]) -> Serve {
    start_wrapped(extra, &[])
}

/// [`start_with`], the server and the CLI run under `wrapper` (e.g. `ip netns exec NS`).
fn start_wrapped(extra: &[&str], wrapper: &[&str]) -> Serve {
    let dir = Serve::dir();
    let root = dir.path();
    std::fs::write(root.join("inventory.yaml"), INVENTORY).unwrap();
    lay_out_examples(root);
    let mut args = vec!["--inventory", "inventory.yaml", "--host-name", "t"];
    args.extend_from_slice(extra);
    Serve::start_wrapped(dir, &args, wrapper)
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

/// An absolute path that names `rel` in serve's working directory when serve reads it, and
/// nothing where the CLI runs when that is another directory (`/proc/self/cwd` is each
/// process's own working directory): a module that is on the node only, as it looks to a CLI on
/// another machine, which sends such a path as it is.
fn node_only_path(rel: &str) -> String {
    format!("/proc/self/cwd/{rel}")
}

/// The `sha256:` reference of a module file, from `telvirt wasm verify -o json`.
fn module_ref(node: &Serve, file: &str) -> String {
    let v = node.json(&["wasm", "verify", file]);
    assert_eq!(v["verdict"], "accepted", "{v}");
    format!("sha256:{}", v["sha256"].as_str().unwrap())
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

    // A module the verifier refuses: the CLI's upload is refused with the verifier's reason and
    // nothing is created.
    let hostile = hostile_module(&node);
    let file = firewall_descriptor(&node, "bad1", "hostile.wasm");
    let out = node.cli(&["vnf", "create", "-f", &file]);
    assert!(
        !out.status.success(),
        "a refused module must not be created"
    );
    let err = stderr(&out);
    assert!(
        err.contains("refused by the verifier") && err.contains("maps.write"),
        "the error should be the verifier's: {err}"
    );
    assert!(!node.cli(&["vnf", "show", "bad1"]).status.success());

    // The same module as a path on the node, which the admin may name: the CLI does not have
    // it and sends the path; the node's runtime refuses it at start, so bad1 ends Failed with
    // the verifier's reason while fw1 keeps running.
    let on_node = node_only_path("hostile.wasm");
    let file = firewall_descriptor(&node, "bad1", &on_node);
    let elsewhere = Serve::dir();
    let file = node.path(&file).display().to_string();
    let out = node.cli_at(elsewhere.path(), None, &["vnf", "create", "-f", &file]);
    assert!(out.status.success(), "{}", stderr(&out));
    let bad = node.wait_phase("bad1", "Failed");
    assert_eq!(
        bad["descriptor"]["spec"]["wasm"]["module"],
        on_node.as_str()
    );
    let reason = bad["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("module refused") && reason.contains("maps.write"),
        "reason should be the verifier's: {reason}"
    );
    let fw1 = node.json(&["vnf", "show", "fw1"]);
    assert_eq!(fw1["phase"], "Running", "fw1 must keep running: {fw1}");

    // Upgrade: a refused module changes nothing; another firewall build is swapped in.
    let uploaded = module_ref(&node, "examples/vnfs/firewall.wasm");
    assert_eq!(
        fw1["descriptor"]["spec"]["wasm"]["module"],
        uploaded.as_str()
    );
    let out = node.cli(&[
        "vnf",
        "upgrade",
        "fw1",
        "--module",
        &hostile.display().to_string(),
    ]);
    assert!(!out.status.success(), "a refused module must not upgrade");
    assert!(
        stderr(&out).contains("refused by the verifier"),
        "{}",
        stderr(&out)
    );
    let fw1 = node.json(&["vnf", "show", "fw1"]);
    assert_eq!(
        fw1["descriptor"]["spec"]["wasm"]["module"],
        uploaded.as_str()
    );
    let mut v2 = std::fs::read(node.path("examples/vnfs/firewall.wasm")).unwrap();
    let needle = b"\"version\":\"1.0.0\"";
    let at = v2.windows(needle.len()).position(|w| w == needle).unwrap();
    v2[at..at + needle.len()].copy_from_slice(b"\"version\":\"1.0.1\"");
    std::fs::write(node.path("firewall-v2.wasm"), v2).unwrap();
    let up = node.json(&["vnf", "upgrade", "fw1", "--module", "firewall-v2.wasm"]);
    let v2 = module_ref(&node, "firewall-v2.wasm");
    assert_ne!(v2, uploaded);
    assert_eq!(up["descriptor"]["spec"]["wasm"]["module"], v2.as_str());
    assert!(
        up["reason"].as_str().unwrap().contains("module upgraded"),
        "{up}"
    );
    assert_eq!(node.json(&["vnf", "show", "fw1"])["phase"], "Running");
}

/// fw1 Running, and network `t1` sending 5000 packets/s from a generator through fw1 to a sink.
fn fw1_between_a_generator_and_a_sink(node: &Serve) {
    node.ok(&["vnf", "create", "-f", "examples/descriptors/fw1.yaml"]);
    node.wait_phase("fw1", "Running");
    let net = "apiVersion: telvirt/v1\nkind: Network\nmetadata: { name: t1 }\nspec:\n  nodes:\n    - { name: gen, kind: generator, rate_pps: 5000 }\n    - { name: sink, kind: sink }\n  links:\n    - gen.out -> fw1.in\n    - fw1.out -> sink.in\n";
    std::fs::write(node.path("t1.yaml"), net).unwrap();
    node.ok(&["net", "create", "-f", "t1.yaml"]);
}

#[test]
fn a_network_through_fw1_carries_packets() {
    let node = start();
    fw1_between_a_generator_and_a_sink(&node);
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

    // A capture of fw1's output: 50 frames into a pcapng file that tcpdump reads.
    let file = node.path("fw1-out.pcapng");
    let file_arg = file.to_str().unwrap();
    let cap = node.json(&[
        "net", "capture", "t1", "fw1.out", "-c", "50", "-w", file_arg,
    ]);
    assert_eq!(
        (cap["frames"].as_u64(), cap["missed"].as_u64()),
        (Some(50), Some(0)),
        "{cap}"
    );
    let frames = |read: std::process::Output| {
        let text = String::from_utf8_lossy(&read.stdout).into_owned();
        assert!(read.status.success(), "tcpdump: {}", stderr(&read));
        assert!(text.lines().all(|l| l.contains("UDP")), "{text}");
        text.lines().count()
    };
    let read = Command::new("tcpdump")
        .args(["-nn", "-r", file_arg])
        .output()
        .unwrap();
    assert_eq!(frames(read), 50);
    // Streamed to standard output, read from a pipe.
    let streamed = node.ok(&["net", "capture", "t1", "gen.out", "-c", "20", "-w", "-"]);
    let mut tcpdump = Command::new("tcpdump")
        .args(["-nn", "-r", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut tcpdump.stdin.take().unwrap(), &streamed.stdout).unwrap();
    assert_eq!(frames(tcpdump.wait_with_output().unwrap()), 20);
    // A port of no link of the network: refused, naming the field and the links there are.
    let bad = node.cli(&["net", "capture", "t1", "fw9.out", "-w", file_arg]);
    assert_eq!(bad.status.code(), Some(2), "{}", stderr(&bad));
    assert!(
        stderr(&bad).contains("link: \"fw9.out\" is no link or linked port of network t1"),
        "{}",
        stderr(&bad)
    );
    node.ok(&["net", "delete", "t1"]);
    let list = node.json(&["net", "list"]);
    assert_eq!(list, serde_json::json!([]));
    // fw1 keeps running without its links.
    let fw1 = node.json(&["vnf", "show", "fw1"]);
    assert_eq!(fw1["phase"], "Running");

    // fw1 has a dedicated core, so its worker busy-polls it and the server keeps its own
    // threads off it; once fw1 is gone they may use it again.
    let core = fw1["placements"][0]["vcpus"][0][0].as_u64().unwrap();
    let on_core = |on: bool| {
        let threads = housekeeping_cpus(node.pid());
        !threads.is_empty() && threads.iter().all(|(_, cpus)| cpus.contains(&core) == on)
    };
    if telvirt_dataplane::worker::allowed_cores().unwrap().len() > 1 {
        wait_until("housekeeping off fw1's core", || on_core(false));
        node.ok(&["vnf", "delete", "fw1"]);
        wait_until("housekeeping back on fw1's core", || on_core(true));
    }
}

#[test]
fn metrics_show_vnfs_links_sinks_hosts_and_the_process_and_an_authority_only_its_own() {
    let node = start();
    fw1_between_a_generator_and_a_sink(&node);
    let admin = node.admin_token();
    let mut families = std::collections::BTreeSet::new();
    let mut samples = Vec::new();
    let through = ("link", "fw1.out -> sink.in");
    wait_until("fw1 Running, its packets in /metrics", || {
        let (status, f, s) = scrape(&node.server(), Some(&admin));
        assert_eq!(status, 200);
        (families, samples) = (f, s);
        sample(
            &samples,
            "telvirt_link_packets_total",
            &[("network", "t1"), through, ("host", "t")],
        )
        .is_some_and(|n| n > 0.0)
            && sample(&samples, "telvirt_sink_received_total", &[("sink", "sink")])
                .is_some_and(|n| n > 0.0)
            // Packets flow as soon as fw1's worker runs; its agent reports it Running after
            // (on a loaded machine, a scrape can fall between the two).
            && sample(
                &samples,
                "telvirt_vnf_phase",
                &[("vnf", "fw1"), ("phase", "Running")],
            )
            .is_some_and(|n| n > 0.0)
    });
    let fw1 = [("vnf", "fw1")];
    let positive = |metric: &str, labels: &[(&str, &str)]| {
        let v = sample(&samples, metric, labels);
        assert!(v.is_some_and(|v| v > 0.0), "{metric} {labels:?}: {v:?}");
    };
    positive("telvirt_vnf_packets_received_total", &fw1);
    positive("telvirt_vnf_packets_forwarded_total", &fw1);
    positive("telvirt_vnf_fuel_used_total", &fw1);
    positive(
        "telvirt_vnf_info",
        &[("vnf", "fw1"), ("runtime", "wasm"), ("host", "t")],
    );
    positive("telvirt_vnf_phase", &[("vnf", "fw1"), ("phase", "Running")]);
    positive("telvirt_vnfs", &[("phase", "Running")]);
    positive("telvirt_host_cpus", &[("host", "t"), ("use", "dedicated")]);
    positive("telvirt_host_memory_allocated_bytes", &[("host", "t")]);
    positive("telvirt_host_scrape_success", &[("host", "t")]);
    positive("telvirt_store_size_bytes", &[]);
    positive("process_resident_memory_bytes", &[]);
    positive("process_cpu_seconds_total", &[]);
    positive("process_open_fds", &[]);
    positive(
        "telvirt_http_requests_total",
        &[("method", "POST"), ("route", "/v1/vnfs"), ("status", "201")],
    );
    assert_eq!(
        sample(
            &samples,
            "telvirt_vnf_packets_dropped_total",
            &[("vnf", "fw1"), ("reason", "trap")]
        ),
        Some(0.0)
    );
    // Each module counter under its manifest name, with the value `vnf stats` shows.
    let stats = node.json(&["vnf", "stats", "fw1"]);
    let first = &stats["counters"][0];
    let name = first["name"].as_str().expect("fw1's module has counters");
    assert!(
        sample(
            &samples,
            "telvirt_vnf_module_counter_total",
            &[("vnf", "fw1"), ("counter", name)]
        )
        .is_some(),
        "no module counter {name}"
    );
    // The sink's latency is a histogram whose count is the frames it received (or close: the
    // scrape reads one after the other).
    let latency = samples
        .iter()
        .find(|s| {
            s.metric == "telvirt_sink_latency_seconds"
                && s.labels.get("network").map(String::as_str) == Some("t1")
        })
        .expect("a sink latency histogram");
    let buckets = &latency.buckets;
    let inf = buckets.iter().find(|b| b.0.is_infinite()).unwrap().1;
    assert!(
        inf > 0.0 && inf == latency.value && buckets.windows(2).all(|w| w[0].1 <= w[1].1),
        "{latency:?}"
    );
    // Every metric the example Grafana dashboard queries is a family the node exposes; empty
    // families are left out, so the vm ones (no vm VNF here; the controller's unit tests show
    // them) and the node drops (none here) are not looked for.
    let dashboard =
        std::fs::read_to_string(common::repo("examples/grafana/telvirt-dashboard.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
    let mut queried = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap();
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("telvirt_") || word.starts_with("process_") {
                    queried.push(word.to_owned());
                }
            }
        }
    }
    assert!(queried.len() > 20, "{queried:?}");
    let exposed = |m: &str| {
        families.contains(m)
            || families.contains(m.trim_end_matches("_bucket"))
            || m.starts_with("telvirt_vm_")
            || m == "telvirt_network_node_drops_total"
    };
    let missing: Vec<_> = queried.iter().filter(|m| !exposed(m)).collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics /metrics lacks: {missing:?}"
    );

    // An authority sees its own VNFs only, and nothing of the host, the store or the process.
    let ent = node.authority("ent1");
    let (status, _, theirs) = scrape(&node.server(), Some(&ent));
    assert_eq!(status, 200);
    assert!(
        theirs
            .iter()
            .all(|s| !s.labels.contains_key("vnf") && !s.labels.contains_key("network")),
        "another authority's VNF or network shown: {:?}",
        theirs
            .iter()
            .find(|s| s.labels.contains_key("vnf") || s.labels.contains_key("network"))
    );
    for hidden in [
        "telvirt_host_cpus",
        "telvirt_store_size_bytes",
        "process_resident_memory_bytes",
    ] {
        assert!(
            theirs.iter().all(|s| s.metric != hidden),
            "{hidden} shown to an authority"
        );
    }
    assert_eq!(
        sample(&theirs, "telvirt_vnfs", &[("phase", "Running")]),
        Some(0.0)
    );
    // Without a token: 401, nothing shown.
    assert_eq!(scrape(&node.server(), None).0, 401);
}

/// `--control-priority`: the node's tokio worker threads run at SCHED_FIFO of the priority
/// asked, its data-plane workers (started from them) and every other thread SCHED_OTHER.
#[test]
fn control_threads_run_at_the_priority_asked_and_nothing_else_does() {
    let node = start_with(&["--control-priority", "3"]);
    fw1_between_a_generator_and_a_sink(&node);
    wait_until(
        "tokio's workers at SCHED_FIFO 3, the rest SCHED_OTHER",
        || {
            let threads = thread_policies(node.pid());
            // Tokio's blocking threads share its workers' name (they stay SCHED_OTHER, which
            // the names cannot tell apart here); the runtime has a worker per CPU it may use,
            // each at the priority asked once it first went idle.
            let fifo = threads
                .iter()
                .filter(|t| t.0 == "tokio-rt-worker" && t.1 == (libc::SCHED_FIFO, 3))
                .count();
            let others_fair = threads
                .iter()
                .filter(|t| t.0 != "tokio-rt-worker")
                .all(|t| t.1 == (libc::SCHED_OTHER, 0));
            let data_plane = threads.iter().any(|t| t.0.starts_with("tv-"));
            fifo == std::thread::available_parallelism().unwrap().get() && others_fair && data_plane
        },
    );
}

#[test]
fn control_threads_run_at_nice_minus_10_by_default_and_nothing_else_does() {
    let node = start();
    fw1_between_a_generator_and_a_sink(&node);
    wait_until("tokio's workers at nice -10, the rest at 0", || {
        let threads = thread_nices(node.pid());
        // As above: the blocking threads share the workers' name and stay at 0 (reset on
        // fork), so the workers are counted.
        let raised = threads
            .iter()
            .filter(|t| t.0 == "tokio-rt-worker" && t.1 == -10)
            .count();
        let others_at_0 = threads
            .iter()
            .filter(|t| t.0 != "tokio-rt-worker")
            .all(|t| t.1 == 0);
        let data_plane = threads.iter().any(|t| t.0.starts_with("tv-"));
        raised == std::thread::available_parallelism().unwrap().get() && others_at_0 && data_plane
    });
}

/// Each thread of process `pid`: its name and its nice value (`/proc/PID/task/TID/stat`
/// field 19).
fn thread_nices(pid: u32) -> Vec<(String, i32)> {
    thread_stat_fields(pid, &[19])
        .into_iter()
        .map(|(name, f)| (name, f[0]))
        .collect()
}

/// Each thread of process `pid`: its name and the numeric `stat` fields asked for (numbered
/// as in proc(5), from 3).
fn thread_stat_fields(pid: u32, fields: &[usize]) -> Vec<(String, Vec<i32>)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        let (head, rest) = stat.rsplit_once(") ").unwrap();
        let name = head.split_once(" (").unwrap().1.to_owned();
        // `rest` starts at field 3 (state).
        let all: Vec<&str> = rest.split_whitespace().collect();
        out.push((
            name,
            fields.iter().map(|f| all[f - 3].parse().unwrap()).collect(),
        ));
    }
    out
}

/// Each thread of process `pid`: its name and its scheduling policy and real-time priority
/// (`/proc/PID/task/TID/stat` fields 41 and 40).
fn thread_policies(pid: u32) -> Vec<(String, (i32, u32))> {
    thread_stat_fields(pid, &[41, 40])
        .into_iter()
        .map(|(name, f)| (name, (f[0], f[1] as u32)))
        .collect()
}

/// Every thread of process `pid` but its data-plane workers, with the CPUs it may run on.
fn housekeeping_cpus(pid: u32) -> Vec<(String, Vec<u64>)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.starts_with("tv-") {
            continue;
        }
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        let Some(list) = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        else {
            continue;
        };
        let mut cpus = Vec::new();
        for part in list.trim().split(',') {
            let (a, b) = part.split_once('-').unwrap_or((part, part));
            cpus.extend(a.parse::<u64>().unwrap()..=b.parse::<u64>().unwrap());
        }
        out.push((comm.trim().to_owned(), cpus));
    }
    out
}

/// The firewall module with `log` added to its manifest's permissions (its name shortened from
/// `firewall` to `fw` to keep the section's length): a module that asks for more than the
/// `untrusted` domain allows.
fn logging_module(node: &Serve) -> String {
    let mut bytes = std::fs::read(node.path("examples/vnfs/firewall.wasm")).unwrap();
    let from: &[u8] = br#""name":"firewall","version":"1.0.0","permissions":["maps.read","maps.write","counters"]"#;
    let to: &[u8] = br#""name":"fw","version":"1.0.0","permissions":["maps.read","maps.write","counters","log"]"#;
    assert_eq!(from.len(), to.len());
    let at = bytes
        .windows(from.len())
        .position(|w| w == from)
        .expect("firewall manifest as expected");
    bytes[at..at + from.len()].copy_from_slice(to);
    std::fs::write(node.path("logging.wasm"), bytes).unwrap();
    "logging.wasm".to_owned()
}

/// fw1's descriptor renamed to `name`, running `module` (relative to the node's directory, where
/// the descriptor is written), as the file name to give `vnf create -f`.
fn firewall_descriptor(node: &Serve, name: &str, module: &str) -> String {
    let text = std::fs::read_to_string(node.path("examples/descriptors/fw1.yaml")).unwrap();
    assert!(text.contains("module: ../vnfs/firewall.wasm"), "{text}");
    let text = text.replace("name: fw1", &format!("name: {name}")).replace(
        "module: ../vnfs/firewall.wasm",
        &format!("module: {module}"),
    );
    let file = format!("{name}.yaml");
    std::fs::write(node.path(&file), text).unwrap();
    file
}

#[test]
fn a_module_runs_in_its_owners_security_domain() {
    let node = start();
    // An unknown domain is refused naming the valid ones; nothing is created.
    let out = node.cli(&["authority", "create", "ent0", "--domain", "root"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("domain") && err.contains("operator, trusted, untrusted"),
        "{err}"
    );
    let list = node.json(&["authority", "list"]);
    assert!(
        list.as_array().unwrap().iter().all(|a| a["name"] != "ent0"),
        "{list}"
    );

    // A new authority gets the least privileged domain unless told otherwise.
    let ent = node.json(&["authority", "create", "ent1"]);
    assert_eq!(ent["domain"], "untrusted", "{ent}");
    let token = ent["token"].as_str().unwrap().to_owned();

    // A module asking for `log` is refused for the enterprise at upload, naming the permission
    // and the domain; nothing is created.
    let logging = logging_module(&node);
    let file = firewall_descriptor(&node, "entlog", &logging);
    let out = node.cli_as(&token, &["vnf", "create", "-f", &file]);
    assert!(!out.status.success(), "entlog must be refused");
    let err = stderr(&out);
    assert!(
        err.contains("`log`") && err.contains("`untrusted`"),
        "the error must name the permission and the domain: {err}"
    );
    let mine = node.json_as(&token, &["vnf", "list"]);
    assert_eq!(mine, serde_json::json!([]), "nothing was created");
    assert_eq!(
        node.json_as(&token, &["module", "list"]),
        serde_json::json!([])
    );

    // The same module under the operator runs.
    let file = firewall_descriptor(&node, "oplog", &logging);
    node.ok(&["vnf", "create", "-f", &file]);
    node.wait_phase("oplog", "Running");

    // A module within the domain's permissions runs for the enterprise.
    let file = firewall_descriptor(&node, "entfw", "examples/vnfs/firewall.wasm");
    node.ok_as(&token, &["vnf", "create", "-f", &file]);
    let v = node.wait_vnf("entfw", |v| {
        v["phase"] == "Running" || v["phase"] == "Failed"
    });
    assert_eq!(v["phase"], "Running", "{v}");
    assert_eq!(v["owner"], "ent1");
}

/// A NAT on one dedicated core (the example's descriptor uses a shared group).
const NAT: &str = "apiVersion: telvirt/v1\nkind: Vnf\nmetadata: { name: nat1 }\nspec:\n  runtime: wasm\n  cpu: { policy: dedicated, count: 1 }\n  ports: [in, out]\n  wasm:\n    module: examples/vnfs/nat.wasm\n";

/// Entries of nat1's `sessions` and `reverse` maps, read through `vnf maps`; `None` while its
/// instance is not running (e.g. just after a restart of serve).
fn nat_entries(node: &Serve) -> Option<(u64, u64)> {
    let out = node.cli(&["vnf", "maps", "nat1", "-o", "json"]);
    if !out.status.success() {
        return None;
    }
    let maps: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let count = |name: &str| {
        maps.as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == name)
            .and_then(|m| m["entries"].as_u64())
            .unwrap_or_else(|| panic!("no map {name}: {maps}"))
    };
    Some((count("sessions"), count("reverse")))
}

/// The reason of nat1's last Running event.
fn last_running_reason(node: &Serve) -> String {
    let events = node.json(&["vnf", "events", "nat1"]);
    events
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .find(|e| e["to"] == "Running")
        .and_then(|e| e["reason"].as_str())
        .unwrap_or_default()
        .to_owned()
}

/// Sends `flows` UDP flows into nat1's inside port until it holds that many sessions, then
/// takes the network away again (so that nothing but a restore can refill the maps).
fn nat_sessions(node: &Serve, flows: u64) {
    let net = format!(
        "apiVersion: telvirt/v1\nkind: Network\nmetadata: {{ name: t1 }}\nspec:\n  nodes:\n    - {{ name: gen, kind: generator, rate_pps: 2000, flows: {flows} }}\n    - {{ name: sink, kind: sink }}\n  links:\n    - gen.out -> nat1.in\n    - nat1.out -> sink.in\n"
    );
    std::fs::write(node.path("t1.yaml"), net).unwrap();
    node.ok(&["net", "create", "-f", "t1.yaml"]);
    wait_until("nat1 to create the sessions", || {
        nat_entries(node) == Some((flows, flows))
    });
    node.ok(&["net", "delete", "t1"]);
}

#[test]
fn wasm_maps_survive_a_restart_of_serve() {
    let mut node = start_with(&["--snapshot-interval-ms", "200"]);
    std::fs::write(node.path("nat1.yaml"), NAT).unwrap();
    node.ok(&["vnf", "create", "-f", "nat1.yaml"]);
    node.wait_phase("nat1", "Running");
    assert_eq!(
        nat_entries(&node),
        Some((0, 0)),
        "a new NAT holds no sessions"
    );
    nat_sessions(&node, 5);

    // Graceful stop (SIGTERM) and start on the same data dir: the sessions are back, and the
    // VNF's Running event says they were restored.
    // No traffic reaches it any more: only a restore can bring the sessions back.
    node.terminate();
    node.restart();
    wait_until("nat1 to run again with its 5 sessions", || {
        nat_entries(&node) == Some((5, 5))
    });
    wait_until("the Running event to say the maps were restored", || {
        last_running_reason(&node).contains("maps restored from snapshot (sessions 5, reverse 5")
    });

    // SIGKILL loses at most one snapshot interval: once the periodic snapshot holds three more
    // sessions, a kill -9 keeps them.
    let snapshot = node.path("data/snapshots/nat1.maps");
    let before = std::fs::metadata(&snapshot).unwrap().len();
    nat_sessions(&node, 8);
    // Each session adds one `sessions` entry (16 + 8 bytes) and one `reverse` entry (4 + 16).
    let want = before + 3 * (24 + 20);
    wait_until("the periodic snapshot of 8 sessions", || {
        std::fs::metadata(&snapshot).is_ok_and(|m| m.len() == want)
    });
    node.kill9();
    node.restart();
    wait_until("nat1 to run again with its 8 sessions", || {
        nat_entries(&node) == Some((8, 8))
    });

    // Deleting the VNF deletes its snapshot.
    node.ok(&["vnf", "delete", "nat1"]);
    wait_until("the snapshot to go with the VNF", || !snapshot.exists());
}

/// A module that forwards packets to port 1 until it has seen 50, then spins forever inside
/// `tv_process`: a batch that never ends unless the CPU-per-batch budget stops it.
fn spinning_module(node: &Serve) -> String {
    let manifest = r#"{"abi":1,"name":"spinner","version":"1.0.0","permissions":[]}"#;
    let text = format!(
        r#"(module
  (memory (export "memory") 4)
  (global $seen (mut i32) (i32.const 0))
  (func (export "tv_buffer") (param i32) (result i32) (i32.const 65536))
  (func (export "tv_init") (param i32 i32) (result i32) (i32.const 0))
  (func (export "tv_process") (param $b i32) (param $n i32) (result i32)
    (local $i i32)
    (block $done (loop $next
      (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
      (global.set $seen (i32.add (global.get $seen) (i32.const 1)))
      (if (i32.ge_u (global.get $seen) (i32.const 50)) (then (loop $spin (br $spin))))
      (i32.store offset=12 (i32.add (local.get $b) (i32.mul (local.get $i) (i32.const 16)))
        (i32.const 1))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $next)))
    (local.get $n))
  (@custom "telvirt.manifest" "{}")
)"#,
        manifest.replace('"', "\\\"")
    );
    let bytes = wat::parse_str(&text).unwrap();
    std::fs::write(node.path("spinner.wasm"), bytes).unwrap();
    "spinner.wasm".to_owned()
}

#[test]
fn a_vnf_over_its_cpu_budget_fails_with_the_budget_while_another_keeps_running() {
    // Its agent looks at its instances unasked once an hour: spin1's failure is reported
    // because the runtime tells the agent when an instance traps.
    let node = start_with(&["--resync-interval-ms", "3600000"]);
    node.ok(&["vnf", "create", "-f", "examples/descriptors/fw1.yaml"]);
    node.wait_phase("fw1", "Running");
    let module = spinning_module(&node);
    node.create(
        "spin1.yaml",
        &format!(
            "apiVersion: telvirt/v1\nkind: Vnf\nmetadata: {{ name: spin1 }}\nspec:\n  runtime: wasm\n  cpu: {{ policy: dedicated, count: 1 }}\n  ports: [in, out]\n  wasm:\n    module: {module}\n    limits: {{ memory: 4MiB, fuel_per_batch: 200000 }}\n"
        ),
    );
    let spin = node.wait_phase("spin1", "Running");
    assert_eq!(
        spin["descriptor"]["spec"]["wasm"]["limits"]["fuel_per_batch"], 200000,
        "{spin}"
    );
    // Traffic through both: the spinner forwards its first 49 packets, then a batch spins.
    for (net, vnf) in [("t-fw", "fw1"), ("t-spin", "spin1")] {
        let text = format!(
            "apiVersion: telvirt/v1\nkind: Network\nmetadata: {{ name: {net} }}\nspec:\n  nodes:\n    - {{ name: gen-{vnf}, kind: generator, rate_pps: 2000 }}\n    - {{ name: sink-{vnf}, kind: sink }}\n  links:\n    - gen-{vnf}.out -> {vnf}.in\n    - {vnf}.out -> sink-{vnf}.in\n"
        );
        let file = format!("{net}.yaml");
        std::fs::write(node.path(&file), text).unwrap();
        node.ok(&["net", "create", "-f", &file]);
    }
    let failed = node.wait_phase("spin1", "Failed");
    let reason = failed["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("CPU limit") && reason.contains("fuel budget of 200000"),
        "the reason must name the descriptor's budget: {reason}"
    );
    let table = String::from_utf8_lossy(&node.ok(&["vnf", "show", "spin1"]).stdout).into_owned();
    assert!(table.contains("fuel budget of 200000"), "{table}");
    // fw1, on its own worker, still forwards: its sink keeps counting after spin1 failed.
    let sink_packets = || {
        let v = node.json(&["net", "show", "t-fw"]);
        v["status"]["links"][1]["packets"].as_u64().unwrap_or(0)
    };
    let after_failure = sink_packets();
    let deadline = Instant::now() + DEADLINE;
    while sink_packets() <= after_failure {
        assert!(
            Instant::now() < deadline,
            "fw1 stopped forwarding after spin1 failed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(node.json(&["vnf", "show", "fw1"])["phase"], "Running");
}

#[test]
fn serve_refuses_a_bad_security_policy_or_snapshot_interval() {
    let dir = Serve::dir();
    let serve = |extra: &[&str]| {
        Command::new(BIN)
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir", "data"])
            .args(extra)
            .current_dir(dir.path())
            .env("TELVIRT_LOG", "warn")
            .output()
            .unwrap()
    };
    // A policy without the default domain of new authorities.
    std::fs::write(
        dir.path().join("policy.yaml"),
        "domains:\n  operator: { allowed: [maps.read, maps.write, counters, clock, log, random, emit] }\n",
    )
    .unwrap();
    let out = serve(&["--security-policy", "policy.yaml"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("`untrusted`"), "{}", stderr(&out));
    // A permission that does not exist.
    std::fs::write(
        dir.path().join("policy.yaml"),
        "domains:\n  operator: { allowed: [maps.read] }\n  untrusted: { allowed: [network] }\n",
    )
    .unwrap();
    let out = serve(&["--security-policy", "policy.yaml"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("network"), "{}", stderr(&out));
    // A real-time priority outside 1-99, and one the host does not permit (no CAP_SYS_NICE):
    // refused before anything is written.
    let out = serve(&["--control-priority", "0"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("--control-priority"),
        "{}",
        stderr(&out)
    );
    // Root without CAP_SYS_NICE, its limit allowing no real-time priority, no nice below 0:
    // a class asked for that the host refuses is refused, naming the option, nothing written.
    let unprivileged = |limit: &str| {
        let mut c = Command::new("setpriv");
        c.args(["--bounding-set", "-sys_nice", "prlimit", limit, BIN])
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(["--data-dir", "unprivileged"])
            .env_remove("TELVIRT_CONTROL_NICE")
            .env_remove("TELVIRT_CONTROL_PRIORITY")
            .current_dir(dir.path());
        c
    };
    let refused = |limit: &str, option: &str, value: &str, said: &str| {
        let out = unprivileged(limit).args([option, value]).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        assert!(
            stderr(&out).contains(&format!("{option} {value}: {said}"))
                && stderr(&out).contains("CAP_SYS_NICE"),
            "{}",
            stderr(&out)
        );
        assert!(!dir.path().join("unprivileged").exists());
    };
    refused("--rtprio=0", "--control-priority", "5", "SCHED_FIFO 5");
    // A nice value outside -20..=0, and one below 0 the host does not permit.
    let out = serve(&["--control-nice", "5"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--control-nice"), "{}", stderr(&out));
    refused("--nice=0", "--control-nice", "-5", "nice -5 refused");
    // Without the option such a host runs the node, its control threads at nice 0, and says
    // so.
    let mut node = unprivileged("--nice=0")
        .env("TELVIRT_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let lines = std::io::BufReader::new(node.stderr.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(lines).map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let said = loop {
        match rx.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now())) {
            Ok(line) if line.contains("stay at nice 0") => break Some(line),
            Ok(_) => {}
            Err(_) => break None,
        }
    };
    let running = node.try_wait().unwrap().is_none();
    let _ = node.kill();
    let _ = node.wait();
    assert!(said.is_some() && running, "{said:?}, running: {running}");
    // A worker's idle spin beyond 100 ms: refused naming the option and its range, nothing
    // written.
    let out = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            "spin-data",
        ])
        .args(["--worker-idle-spin-us", "100001"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("--worker-idle-spin-us") && stderr(&out).contains("0..=100000"),
        "{}",
        stderr(&out)
    );
    assert!(!dir.path().join("spin-data").exists());
    // An interval outside 100 ms ..= 1 h.
    let out = serve(&["--snapshot-interval-ms", "5"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("--snapshot-interval-ms"),
        "{}",
        stderr(&out)
    );
}

/// Packets a steering endpoint delivered to each instance, from `net show -o json`.
fn delivered(node: &Serve, net: &str) -> (Vec<u64>, serde_json::Value) {
    let v = node.json(&["net", "show", net]);
    let counts = v["status"]["steering"][0]["delivered"]
        .as_array()
        .map(|d| d.iter().map(|c| c["packets"].as_u64().unwrap()).collect())
        .unwrap_or_default();
    (counts, v)
}

#[test]
fn steering_switches_between_two_firewalls_and_latency_chain_probes_the_chain() {
    let node = start();
    node.ok(&["vnf", "create", "-f", "examples/descriptors/fw1.yaml"]);
    let fw2 = firewall_descriptor(&node, "fw2", "examples/vnfs/firewall.wasm");
    node.ok(&["vnf", "create", "-f", &fw2]);
    node.wait_phase("fw1", "Running");
    node.wait_phase("fw2", "Running");
    let net = "apiVersion: telvirt/v1\nkind: Network\nmetadata: { name: s1 }\nspec:\n  nodes:\n    - { name: gen, kind: generator, rate_pps: 5000 }\n    - { name: sink, kind: sink }\n  steering:\n    - { name: fw, instances: [fw1, fw2] }\n  links:\n    - gen.out -> fw.in\n    - fw.out -> sink.in\n";
    std::fs::write(node.path("s1.yaml"), net).unwrap();
    node.ok(&["net", "apply", "-f", "s1.yaml"]);
    wait_until("fw1 to carry the endpoint's traffic", || {
        let (d, v) = delivered(&node, "s1");
        d.len() == 2 && d[0] > 0 && v["status"]["links"][1]["packets"].as_u64() > Some(0)
    });
    assert_eq!(delivered(&node, "s1").0[1], 0, "fw2 is standing by");

    // One switch, confirmed by the data plane.
    let st = node.json(&["net", "steer", "s1", "fw", "fw2"]);
    assert_eq!(
        (st["active"].as_str(), st["generation"].as_u64()),
        (Some("fw2"), Some(1)),
        "{st}"
    );
    wait_until("fw2 to carry the traffic", || {
        delivered(&node, "s1").0[1] > 0
    });
    let fw1_total = delivered(&node, "s1").0[0];
    let fw2_before = delivered(&node, "s1").0[1];
    wait_until("more traffic through fw2", || {
        delivered(&node, "s1").0[1] > fw2_before + 500
    });
    assert_eq!(
        delivered(&node, "s1").0[0],
        fw1_total,
        "fw1 got packets after the switch"
    );
    let table = String::from_utf8_lossy(&node.ok(&["net", "show", "s1"]).stdout).into_owned();
    assert!(
        table.contains("steering fw: active fw2 (switches: 1)"),
        "{table}"
    );

    // A refused switch names the valid instances and moves nothing.
    node.fails(&["net", "steer", "s1", "fw", "fw9"], "fw1, fw2");
    let v = node.json(&["net", "show", "s1"]);
    assert_eq!(v["status"]["steering"][0]["active"], "fw2", "{v}");

    // The stored descriptor is the truth: applying the file (no `active`) steers back to the
    // first instance.
    node.ok(&["net", "apply", "-f", "s1.yaml"]);
    wait_until("the endpoint back on fw1", || {
        node.json(&["net", "show", "s1"])["status"]["steering"][0]["active"] == "fw1"
    });

    // latency chain: the probe goes through the endpoint while the network's own traffic is
    // paused, every probe packet arrives, and the network carries its traffic again after.
    let probe = |packets: &str, json: bool| {
        let mut args = vec![
            "latency",
            "chain",
            "s1",
            "--rate",
            "20000",
            "--packets",
            packets,
        ];
        if json {
            args.extend(["-o", "json"]);
        }
        node.ok(&args).stdout
    };
    let r: serde_json::Value = serde_json::from_slice(&probe("2000", true)).unwrap();
    assert_eq!(
        (r["from"].as_str(), r["to"].as_str()),
        (Some("fw.in"), Some("fw.out")),
        "{r}"
    );
    assert_eq!(
        (
            r["sent"].as_u64(),
            r["received"].as_u64(),
            r["lost"].as_u64()
        ),
        (Some(2000), Some(2000), Some(0)),
        "{r}"
    );
    let (p50, max) = (r["p50_us"].as_f64().unwrap(), r["max_us"].as_f64().unwrap());
    assert!(p50 > 0.0 && p50 <= max, "{r}");
    assert_eq!(
        r["displaced"],
        serde_json::json!(["gen.out -> fw.in", "fw.out -> sink.in"])
    );
    let sunk = |v: &serde_json::Value| v["status"]["links"][1]["packets"].as_u64().unwrap_or(0);
    let after = sunk(&node.json(&["net", "show", "s1"]));
    wait_until("the network's own traffic again", || {
        sunk(&node.json(&["net", "show", "s1"])) > after + 100
    });
    let text = String::from_utf8_lossy(&probe("500", false)).into_owned();
    assert!(
        text.contains("P99.9") && text.contains("fw.in -> fw.out"),
        "{text}"
    );

    // Bad probes are refused before anything is sent, naming the field.
    node.fails(&["latency", "chain", "s1", "--rate", "0"], "rate_pps");
    node.fails(&["latency", "chain", "s1", "--from", "nat1.in"], "from");
    node.fails(&["latency", "chain", "nosuch"], "not found");
}

/// `vnf stats VNF ARGS...` once the VNF is Running, asked again while the host's lease has
/// lapsed for a moment (`Serve::ok`).
fn running_stats(node: &Serve, vnf: &str, args: &[&str]) -> Vec<u8> {
    node.wait_phase(vnf, "Running");
    let mut all = vec!["vnf", "stats", vnf];
    all.extend(args);
    node.ok(&all).stdout
}

/// The module counter `name` of `vnf`, from `vnf stats -o json`.
fn module_counter(node: &Serve, vnf: &str, name: &str) -> u64 {
    let s: serde_json::Value =
        serde_json::from_slice(&running_stats(node, vnf, &["-o", "json"])).unwrap();
    s["counters"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == name))
        .and_then(|c| c["value"].as_u64())
        .unwrap_or_else(|| panic!("no counter {name}: {s}"))
}

#[test]
fn a_bearer_put_into_a_running_upf_carries_its_traffic_and_a_bad_change_changes_nothing() {
    let node = start();
    node.ok(&["vnf", "create", "-f", "examples/descriptors/gtpu1.yaml"]);
    node.wait_phase("gtpu1", "Running");
    // The generator's frames (10.0.0.1 -> 10.0.1.1) come from the data network; what the
    // UPF tunnels leaves on the access side.
    let net = "apiVersion: telvirt/v1\nkind: Network\nmetadata: { name: dn }\nspec:\n  nodes:\n    - { name: gen, kind: generator, rate_pps: 500, flows: 4 }\n    - { name: sink, kind: sink }\n  links:\n    - gen.out -> gtpu1.n6\n    - gtpu1.n3 -> sink.in\n";
    std::fs::write(node.path("dn.yaml"), net).unwrap();
    node.ok(&["net", "create", "-f", "dn.yaml"]);
    // No bearer for the UE yet: every frame is dropped as of an unknown bearer.
    wait_until("frames of an unknown bearer", || {
        module_counter(&node, "gtpu1", "unknown_bearer") > 0
    });
    assert_eq!(module_counter(&node, "gtpu1", "downlink"), 0);

    // Each bad change is refused with its field and why, and changes nothing.
    let refused = |args: &[&str]| {
        let mut all = vec!["vnf", "map-update", "gtpu1"];
        all.extend_from_slice(args);
        let out = node.cli(&all);
        assert!(!out.status.success(), "{all:?} was taken");
        stderr(&out)
    };
    let bearer = "0a000101=00000101c0000201c0000202";
    let e = refused(&["downlink", "--put", "0a000101=00000101"]);
    assert!(
        e.contains("put[0].value")
            && e.contains("4 bytes; the values of map `downlink` are 12 bytes"),
        "{e}"
    );
    let e = refused(&["bearers", "--put", bearer]);
    assert!(
        e.contains("no map named `bearers`") && e.contains("uplink, downlink"),
        "{e}"
    );
    let e = refused(&[
        "downlink",
        "--put",
        bearer,
        "--put",
        "0a0001zz=00000101c0000201c0000202",
    ]);
    assert!(
        e.contains("put[1].key") && e.contains("`z` at character 6"),
        "{e}"
    );
    let e = refused(&["downlink"]);
    assert!(e.contains("names no key"), "{e}");
    let e = refused(&["downlink", "--put", "0a000101"]);
    assert!(e.contains("expected KEY=VALUE"), "{e}");
    // Another authority does not see the VNF, let alone change it.
    let other = node.authority("ent9");
    let out = node.cli_as(
        &other,
        &["vnf", "map-update", "gtpu1", "downlink", "--put", bearer],
    );
    assert!(
        !out.status.success() && stderr(&out).contains("not found"),
        "{}",
        stderr(&out)
    );
    assert_eq!(map_entries(&node, "gtpu1", "downlink"), Some(0));

    // The bearer: the UE's frames are tunnelled to the access side from then on.
    let done = node.json(&["vnf", "map-update", "gtpu1", "downlink", "--put", bearer]);
    assert_eq!(
        (done["put"].as_u64(), done["entries"].as_u64()),
        (Some(1), Some(1)),
        "{done}"
    );
    assert_eq!(map_entries(&node, "gtpu1", "downlink"), Some(1));
    wait_until("frames tunnelled on the bearer", || {
        module_counter(&node, "gtpu1", "downlink") > 0
    });
    wait_until("the tunnelled frames at the sink", || {
        let v = node.json(&["net", "show", "dn"]);
        v["status"]["links"][1]["packets"].as_u64() > Some(0)
    });

    // A locked VNF's maps do not change.
    node.ok(&["vnf", "lock", "gtpu1"]);
    node.wait_phase("gtpu1", "Locked");
    let e = refused(&["downlink", "--delete", "0a000101"]);
    assert!(e.contains("locked"), "{e}");
    node.ok(&["vnf", "unlock", "gtpu1"]);
    node.wait_phase("gtpu1", "Running");
    assert_eq!(map_entries(&node, "gtpu1", "downlink"), Some(1));
    let done = node.json(&[
        "vnf",
        "map-update",
        "gtpu1",
        "downlink",
        "--delete",
        "0a000101",
    ]);
    assert_eq!(
        (done["deleted"].as_u64(), done["entries"].as_u64()),
        (Some(1), Some(0)),
        "{done}"
    );
}

#[test]
fn ping_and_iperf3_cross_a_wasm_firewall_in_serve_and_its_rule_blocks() {
    use telvirt_runtime_wasm::vnfs::{FirewallRule, firewall_blob_hex, fw_action};
    netns::require_traffic_tools();
    // nsA (10.203.0.1) <-> a1 [serve in the middle namespace: fw1] b1 <-> nsB (10.203.0.2)
    let t = netns::Topology::new("wf");
    let mid = t.ns[2].clone();
    let node = start_wrapped(&[], &["ip", "netns", "exec", &mid]);
    // fw1 as a bump in the wire: everything crosses between its ports but TCP to port 5202.
    let deny = FirewallRule {
        src: [0; 4],
        dst: [10, 203, 0, 2],
        sport: 0,
        dport: 5202,
        proto: 6,
        action: fw_action::DROP,
    };
    let blob = firewall_blob_hex(fw_action::CROSS, &[deny]);
    let text = std::fs::read_to_string(node.path("examples/descriptors/fw1.yaml"))
        .unwrap()
        .replace("blob_hex: \"02000000\"", &format!("blob_hex: \"{blob}\""));
    assert!(text.contains(&blob), "fw1.yaml's config changed: {text}");
    // Beside fw1.yaml, where its module (../vnfs/firewall.wasm) is found.
    node.create("examples/descriptors/fw1-wire.yaml", &text);
    node.wait_phase("fw1", "Running");
    let net = "apiVersion: telvirt/v1\nkind: Network\nmetadata: { name: wire }\nspec:\n  links:\n    - host:a1 -> fw1.in\n    - fw1.out -> host:b1\n    - host:b1 -> fw1.out\n    - fw1.in -> host:a1\n";
    std::fs::write(node.path("wire.yaml"), net).unwrap();
    node.ok(&["net", "create", "-f", "wire.yaml"]);
    wait_until("the four links to be live", || {
        let v = node.json(&["net", "show", "wire"]);
        v["status"]["links"]
            .as_array()
            .is_some_and(|l| l.len() == 4 && l.iter().all(|l| l["active"] == true))
    });

    netns::ping_ok(&t, 0, "10.203.0.2");
    let _srv = netns::iperf3_server(&t, 1, 5201);
    let (_, bps) = netns::iperf3_moves_data(&t, 0, "10.203.0.2", 5201);
    eprintln!(
        "iperf3 TCP through the wasm firewall in serve: {:.0} Mbit/s",
        bps / 1e6
    );
    let v = node.json(&["net", "show", "wire"]);
    for l in v["status"]["links"].as_array().unwrap() {
        assert!(
            l["packets"].as_u64() > Some(0),
            "a link carried nothing: {v}"
        );
    }
    assert!(module_counter(&node, "fw1", "allowed") > 0);
    // Both host ports say how they move frames (veth has no zero-copy AF_XDP: the packet
    // ring, and why) and what they moved.
    let ports = v["status"]["host_ports"].as_array().unwrap();
    let mut names: Vec<&str> = ports
        .iter()
        .map(|p| p["interface"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["a1", "b1"], "{v}");
    for p in ports {
        assert_eq!(p["socket"], "tpacket_v3", "{v}");
        let why = p["af_xdp_refused"].as_str().unwrap();
        assert!(why.contains("no zero-copy AF_XDP"), "{v}");
        assert!(
            p["received"].as_u64() > Some(0) && p["sent"].as_u64() > Some(0),
            "{v}"
        );
    }
    let shown = String::from_utf8_lossy(&node.ok(&["net", "show", "wire"]).stdout).into_owned();
    assert!(
        shown.contains("host port a1 (tpacket_v3): received"),
        "{shown}"
    );

    // The rule blocks TCP to port 5202 and the module counts the denials.
    let denied = module_counter(&node, "fw1", "denied");
    let _srv2 = netns::iperf3_server(&t, 1, 5202);
    netns::iperf3_is_blocked(&t, 0, "10.203.0.2", 5202);
    assert!(
        module_counter(&node, "fw1", "denied") > denied,
        "no denial counted"
    );
    // Allowed traffic still crosses after the denial.
    netns::ping_ok(&t, 0, "10.203.0.2");
    let table = String::from_utf8_lossy(&running_stats(&node, "fw1", &[])).into_owned();
    assert!(
        table.contains("denied") && table.contains("packets_in"),
        "{table}"
    );
}

/// `telvirt bench ports`, at its smallest: both paths carry TCP and the flood, the deny rule is
/// checked on each before any figure, and every ratio is the medians' quotient.
#[test]
fn bench_ports_measures_both_paths_in_one_run() {
    netns::require_traffic_tools();
    netns::require_tool("nft", "nftables");
    // Bad options are refused before anything is made, naming the option.
    for bad in [
        ["--rounds", "0"],
        ["--size", "63"],
        ["--trial-ms", "5"],
        ["--host-port-socket", "dpdk"],
    ] {
        let out = Command::new(BIN)
            .args(["bench", "ports"])
            .args(bad)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(bad[0]), "{bad:?}: {}", stderr(&out));
    }
    let out = Command::new(BIN)
        .args(["bench", "ports", "--rounds", "1", "--seconds", "1"])
        .args([
            "--flood-packets",
            "20000",
            "--search-steps",
            "1",
            "--trial-ms",
            "50",
        ])
        // serve's host ports on AF_XDP (copy mode on veth), end to end.
        .args(["--host-port-socket", "af-xdp", "-o", "json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["telvirt_host_port_socket"], "af_xdp_copy", "{r}");
    let round = &r["rounds"][0];
    assert_eq!(round["first"], "telvirt", "{r}");
    for path in ["telvirt", "kernel"] {
        let p = &round[path];
        assert!(p["tcp_gbps"].as_f64().unwrap() > 0.0, "{path}: {r}");
        assert_eq!(p["flood"]["sent"], 20_000, "{path}: {r}");
        assert!(p["flood"]["received"].as_u64().unwrap() > 0, "{path}: {r}");
        assert_eq!(p["search"]["trials"].as_array().unwrap().len(), 2, "{r}");
    }
    assert!(round["kernel_offloads_gbps"].as_f64().unwrap() > 0.0, "{r}");
    let f = |k: &str| r[k].as_f64().unwrap();
    assert!(
        (f("ratio") - f("telvirt_gbps") / f("kernel_gbps")).abs() < 1e-9,
        "{r}"
    );
    assert!(
        (f("mpps_ratio") - f("telvirt_mpps") / f("kernel_mpps")).abs() < 1e-9,
        "{r}"
    );
    assert_eq!(r["goal_tcp_ratio_ge_1"], f("ratio") >= 1.0, "{r}");
    // Nothing is left behind: the namespaces went with the run.
    let left = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(
        !String::from_utf8_lossy(&left.stdout).contains("tvkm"),
        "a namespace of bench ports is left: {}",
        String::from_utf8_lossy(&left.stdout)
    );
}

#[test]
fn a_qemu_that_is_no_file_is_refused_naming_the_flag_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let out = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--qemu",
            "/nonexistent/qemu",
        ])
        .arg("--data-dir")
        .arg(&data)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("--qemu") && stderr(&out).contains("no such file"),
        "{}",
        stderr(&out)
    );
    assert!(!data.exists(), "the data dir was made");
    // The migration benchmark's --qemu alike, before it builds or boots anything.
    let out = Command::new(BIN)
        .args(["bench", "vm-migrate", "--qemu", "/nonexistent/qemu"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--qemu"), "{}", stderr(&out));
}

#[test]
fn serve_with_runtimes_wasm_offers_only_wasm_and_leaves_vm_vnfs_pending() {
    // A runtime it does not know is refused, naming the flag and what is valid.
    let out = Command::new(BIN)
        .args(["serve", "--runtimes", "wasm,docker"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("--runtimes") && stderr(&out).contains("wasm, vm"),
        "{}",
        stderr(&out)
    );
    // Its own image cache, so an image built in spite of `--runtimes wasm` would show there.
    let node = Serve::start(&["--runtimes", "wasm", "--image-cache", "cache"]);
    let hosts = node.json(&["host", "list"]);
    assert_eq!(hosts[0]["runtimes"], serde_json::json!(["wasm"]), "{hosts}");
    let vm = format!("vmoff{}", std::process::id());
    node.create(
        "vm.yaml",
        &format!(
            "apiVersion: telvirt/v1\nkind: Vnf\nmetadata: {{ name: {vm} }}\nspec:\n  runtime: vm\n  cpu: {{ policy: shared, group: g, count: 1 }}\n  vm: {{ memory: 64MiB }}\n"
        ),
    );
    node.wait_vnf(&vm, |v| {
        v["phase"] == "Pending" && v["reason"].as_str().is_some_and(|r| r.contains("vm"))
    });
    // Nothing of the vm runtime was prepared: no guest image in its cache.
    assert!(!node.path("cache/images").exists(), "an image was built");
}

/// A module whose `tv_tick` counts its calls in counter `ticks`, forwarding nothing.
fn ticking_module(node: &Serve) -> String {
    let manifest = r#"{"abi":1,"name":"ticker","version":"1.0.0","permissions":["counters"],"counters":["ticks"]}"#;
    let text = format!(
        r#"(module
  (import "telvirt" "counter_add" (func $counter (param i32 i64)))
  (memory (export "memory") 4)
  (func (export "tv_buffer") (param i32) (result i32) (i32.const 65536))
  (func (export "tv_init") (param i32 i32) (result i32) (i32.const 0))
  (func (export "tv_process") (param i32 i32) (result i32) (i32.const 0))
  (func (export "tv_tick") (param i64) (call $counter (i32.const 0) (i64.const 1)))
  (@custom "telvirt.manifest" "{}")
)"#,
        manifest.replace('"', "\\\"")
    );
    std::fs::write(node.path("ticker.wasm"), wat::parse_str(&text).unwrap()).unwrap();
    "ticker.wasm".to_owned()
}

#[test]
fn tv_tick_is_called_at_the_descriptors_interval_and_never_with_0() {
    let node = start();
    let module = ticking_module(&node);
    let descriptor = |name: &str, tick: &str| {
        format!(
            "apiVersion: telvirt/v1\nkind: Vnf\nmetadata: {{ name: {name} }}\nspec:\n  runtime: wasm\n  cpu: {{ policy: shared, group: t, count: 1 }}\n  ports: [in, out]\n  wasm:\n    module: {module}\n    limits: {{ memory: 4MiB }}\n{tick}"
        )
    };
    // A tick interval over an hour is refused, naming the field; nothing is created.
    std::fs::write(
        node.path("slow.yaml"),
        descriptor("slow", "    tick_ms: 3600001\n"),
    )
    .unwrap();
    let out = node.cli(&["vnf", "create", "-f", "slow.yaml"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("spec.wasm.tick_ms"),
        "{}",
        stderr(&out)
    );
    assert!(!node.cli(&["vnf", "show", "slow"]).status.success());
    node.create("fast.yaml", &descriptor("fast", "    tick_ms: 20\n"));
    node.create("never.yaml", &descriptor("never", "    tick_ms: 0\n"));
    node.wait_phase("never", "Running");
    node.wait_vnf("fast", |_| module_counter(&node, "fast", "ticks") >= 5);
    assert_eq!(
        module_counter(&node, "never", "ticks"),
        0,
        "tick_ms 0 still ticked"
    );
}

#[test]
fn vnf_logs_shows_and_follows_a_modules_log_lines() {
    use std::io::BufRead;
    let node = start();
    // A module that logs "tick" from tv_tick (the admin's operator domain may log).
    let manifest = r#"{"abi":1,"name":"logger","version":"1.0.0","permissions":["log"]}"#;
    let text = format!(
        r#"(module
  (import "telvirt" "log" (func $log (param i32 i32 i32)))
  (memory (export "memory") 4)
  (data (i32.const 16) "tick")
  (func (export "tv_buffer") (param i32) (result i32) (i32.const 65536))
  (func (export "tv_init") (param i32 i32) (result i32) (i32.const 0))
  (func (export "tv_process") (param i32 i32) (result i32) (i32.const 0))
  (func (export "tv_tick") (param i64) (call $log (i32.const 3) (i32.const 16) (i32.const 4)))
  (@custom "telvirt.manifest" "{}")
)"#,
        manifest.replace('"', "\\\"")
    );
    std::fs::write(node.path("logger.wasm"), wat::parse_str(&text).unwrap()).unwrap();
    node.create(
        "logger.yaml",
        "apiVersion: telvirt/v1\nkind: Vnf\nmetadata: { name: logger }\nspec:\n  runtime: wasm\n  cpu: { policy: shared, group: l, count: 1 }\n  ports: [in, out]\n  wasm:\n    module: logger.wasm\n    limits: { memory: 4MiB }\n    tick_ms: 20\n",
    );
    node.wait_phase("logger", "Running");
    node.wait_vnf("logger", |_| {
        node.json(&["vnf", "logs", "logger"])["lines"]
            .as_array()
            .is_some_and(|l| l.len() >= 3)
    });
    let v = node.json(&["vnf", "logs", "logger"]);
    let lines = v["lines"].as_array().unwrap();
    assert!(lines.len() <= 64, "more than the 64 kept: {v}");
    assert!(
        lines.iter().all(|l| l["text"] == "tick" && l["level"] == 3),
        "{v}"
    );
    let seqs: Vec<u64> = lines.iter().map(|l| l["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    assert_eq!(v["latest"].as_u64(), seqs.last().copied(), "{v}");
    // -f keeps printing new lines, one per tick, each numbered after the last.
    struct KilledOnDrop(std::process::Child);
    impl Drop for KilledOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut follow = KilledOnDrop(
        node.command()
            .args(["vnf", "logs", "logger", "-f"])
            .env("TELVIRT_CONFIG", node.config())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // Its lines through a channel, so a follow that stops printing fails at a deadline.
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = follow.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let next = || {
        rx.recv_timeout(DEADLINE)
            .expect("vnf logs -f printed nothing new within the deadline")
    };
    let seq_of = |line: &str| {
        line.split_whitespace()
            .next()
            .unwrap()
            .parse::<u64>()
            .unwrap()
    };
    let first = seq_of(&next());
    let mut last = first;
    // Past what the first answer held: lines the follow fetched later.
    while last < first + 70 {
        let line = next();
        assert!(line.ends_with("L3 tick"), "{line}");
        let seq = seq_of(&line);
        assert_eq!(seq, last + 1, "a line skipped or repeated");
        last = seq;
    }
    drop(follow);
    // A VNF that does not exist: exit 4.
    let out = node.cli(&["vnf", "logs", "nobody"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
}

#[test]
fn vnf_apply_reconfigures_a_running_firewall_in_place_and_refuses_what_needs_a_re_create() {
    let node = start();
    fw1_between_a_generator_and_a_sink(&node);
    let admin = node.admin_token();
    let dropped = || {
        let (status, _, samples) = scrape(&node.server(), Some(&admin));
        assert_eq!(status, 200);
        sample(
            &samples,
            "telvirt_vnf_packets_dropped_total",
            &[("vnf", "fw1"), ("reason", "verdict")],
        )
    };
    wait_until("fw1 forwards", || {
        node.json(&["vnf", "stats", "fw1"])["packets_forwarded"]
            .as_u64()
            .is_some_and(|n| n > 0)
    });
    assert_eq!(dropped(), Some(0.0), "the default action forwards");
    let generation = node.json(&["vnf", "show", "fw1"])["generation"].clone();

    // The same file: unchanged, nothing written.
    let out = node.ok(&["vnf", "apply", "-f", "examples/descriptors/fw1.yaml"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "vnf/fw1 unchanged\n");
    assert_eq!(node.json(&["vnf", "show", "fw1"])["generation"], generation);

    // Default action drop: a dry run shows it and changes nothing; applied, the instance
    // starts again from its module between batches and drops by its verdict.
    let fw1 = std::fs::read_to_string(node.path("examples/descriptors/fw1.yaml")).unwrap();
    let drop_all = fw1.replace("blob_hex: \"02000000\"", "blob_hex: \"00000000\"");
    assert_ne!(drop_all, fw1);
    std::fs::write(node.path("examples/descriptors/fw1-drop.yaml"), &drop_all).unwrap();
    let file = "examples/descriptors/fw1-drop.yaml";
    // A dry run uploads nothing either: a module file the node does not have yet is named by
    // its digest, and refused as a module change.
    let modules_before = node.json(&["module", "list"]);
    let other = node.path("examples/vnfs/other.wasm");
    let mut bytes = std::fs::read(node.path("examples/vnfs/firewall.wasm")).unwrap();
    bytes.extend_from_slice(b"\x00\x08\x07padding"); // a custom section: other bytes
    std::fs::write(&other, bytes).unwrap();
    std::fs::write(
        node.path("examples/descriptors/fw1-other.yaml"),
        fw1.replace("../vnfs/firewall.wasm", "../vnfs/other.wasm"),
    )
    .unwrap();
    let out = node.cli(&[
        "vnf",
        "apply",
        "-f",
        "examples/descriptors/fw1-other.yaml",
        "--dry-run",
    ]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("spec.wasm.module"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        node.json(&["module", "list"]),
        modules_before,
        "a dry run uploaded"
    );
    let out = node.ok(&["vnf", "apply", "-f", file, "--dry-run"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.starts_with("vnf/fw1 would be changed (dry run):\n"),
        "{text}"
    );
    assert!(
        text.contains("  spec.wasm.config.blob_hex: 02000000 → 00000000\n"),
        "{text}"
    );
    assert_eq!(node.json(&["vnf", "show", "fw1"])["generation"], generation);
    let applied = node.json(&["vnf", "apply", "-f", file]);
    assert_eq!(applied["changes"][0]["path"], "spec.wasm.config.blob_hex");
    let v = node.wait_vnf("fw1", |v| {
        v["reason"]
            .as_str()
            .is_some_and(|r| r.contains("reconfigured"))
    });
    assert_eq!(v["phase"], "Running");
    wait_until("fw1 drops by its verdict", || {
        dropped().is_some_and(|n| n > 0.0)
    });
    // The maps were carried over, not recreated empty: the firewall still has its map.
    let maps = node.json(&["vnf", "maps", "fw1"]);
    assert!(maps.to_string().contains("rules"), "{maps}");

    // A core count is taken only at creation: exit 5 (conflict) naming the field; nothing
    // changes, the label in the same file included.
    let bigger = drop_all
        .replace("count: 1", "count: 2")
        .replace("role: edge", "role: core");
    std::fs::write(node.path("examples/descriptors/fw1-two.yaml"), bigger).unwrap();
    let out = node.cli(&["vnf", "apply", "-f", "examples/descriptors/fw1-two.yaml"]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(stderr(&out).contains("spec.cpu.count"), "{}", stderr(&out));
    let now = node.json(&["vnf", "show", "fw1"]);
    assert_eq!(now["descriptor"]["metadata"]["labels"]["role"], "edge");
    assert_eq!(now["descriptor"]["spec"]["cpu"]["count"], 1);
}
