//! Host lifecycle end to end through `telvirt serve` and the CLI: the local host is Ready (its
//! agent's heartbeat lease), inventory hosts without an agent are NotReady with no heartbeat,
//! `host cordon|uncordon|drain|delete` change them (admin only), and a Ready host is not deleted.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;
use common::{BIN, Serve, stderr, stdout};

fn find<'a>(hosts: &'a Value, name: &str) -> &'a Value {
    hosts
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["name"] == name)
        .unwrap_or_else(|| panic!("no host {name} in {hosts}"))
}

#[test]
fn host_list_shows_the_local_host_ready_and_hosts_change_only_by_admin() {
    let server = Serve::with_examples(&["--inventory", "examples/inventory/lab.yaml"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    let hosts = loop {
        let hosts = server.json(&["host", "list"]);
        if find(&hosts, "lab-a")["status"] == "Ready" {
            break hosts;
        }
        assert!(
            Instant::now() < deadline,
            "lab-a never became Ready: {hosts}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let a = find(&hosts, "lab-a");
    assert_eq!(a["ready"], true, "{a}");
    assert_eq!(a["schedulable"], true, "{a}");
    assert!(a["heartbeat_age_ms"].as_u64().is_some(), "{a}");
    let b = find(&hosts, "lab-b");
    assert_eq!(b["status"], "NotReady", "{b}");
    assert!(b.get("heartbeat_age_ms").is_none(), "{b}");

    let table = stdout(&server.ok(&["host", "list"]));
    assert!(
        table.contains("STATUS") && table.contains("HEARTBEAT"),
        "{table}"
    );
    let row = |name: &str| {
        table
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no row {name}: {table}"))
            .to_owned()
    };
    assert!(
        row("lab-a").contains("Ready") && row("lab-a").contains("s ago"),
        "{table}"
    );
    assert!(
        row("lab-b").contains("NotReady") && row("lab-b").contains("never"),
        "{table}"
    );

    let out = stdout(&server.ok(&["host", "cordon", "lab-c"]));
    assert!(out.contains("NotReady,SchedulingDisabled"), "{out}");
    let c = server.json(&["host", "show", "lab-c"]);
    assert_eq!(c["schedulable"], false, "{c}");
    let c = server.json(&["host", "uncordon", "lab-c"]);
    assert_eq!(c["schedulable"], true, "{c}");

    let ent = server.authority("ent");
    let out = server.cli_as(&ent, &["host", "drain", "lab-b"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("403"), "{}", stderr(&out));

    // The local host's agent is alive: not deleted.
    server.fails(&["host", "delete", "lab-a"], "heartbeats");
    let gone = server.json(&["host", "delete", "lab-c"]);
    assert_eq!(gone["deleted"], true, "{gone}");
    let names: Vec<String> = server
        .json(&["host", "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["lab-a", "lab-b"]);
}

#[test]
fn serve_refuses_a_heartbeat_interval_not_shorter_than_the_lease() {
    let dir = Serve::dir();
    let out = Command::new(BIN)
        .current_dir(dir.path())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            "data",
            "--heartbeat-interval-ms",
            "3000",
            "--host-lease-ttl-ms",
            "3000",
        ])
        .env("TELVIRT_LOG", "warn")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("--heartbeat-interval-ms 3000 must be shorter than --host-lease-ttl-ms 3000"),
        "{err}"
    );
}
