//! The `telvirt` binary end to end: a real `telvirt serve` process, the CLI round trip against
//! it, and `kill -9` of the server at arbitrary moments losing nothing that was acknowledged.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;
use common::{BIN, Serve, stderr};

/// A node on the lab inventory (`examples/inventory/lab.yaml`) working in a directory laid out
/// with the examples (`common::lay_out_examples`).
fn lab() -> Serve {
    Serve::with_examples(&["--inventory", "examples/inventory/lab.yaml"])
}

/// One of the example descriptors in the node's directory, as an absolute path.
fn example(server: &Serve, file: &str) -> String {
    server
        .path(&format!("examples/descriptors/{file}"))
        .display()
        .to_string()
}

#[test]
fn cli_round_trip() {
    let server = lab();
    let fw = example(&server, "fw1.yaml");
    let upf = example(&server, "upf1.json");
    let out = server.cli(&["vnf", "create", "-f", &fw]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("vnf/fw1 created"));
    let created = server.json(&["vnf", "create", "-f", &upf]);
    assert_eq!(created["name"], "upf1");

    let list = server.cli(&["vnf", "list"]);
    let table = String::from_utf8_lossy(&list.stdout);
    assert!(table.starts_with("NAME"), "{table}");
    assert!(table.contains("fw1") && table.contains("upf1"), "{table}");
    assert!(!table.contains("LABELS"), "{table}");
    // -o wide: more columns, fw1's labels among them.
    let wide = server.cli(&["vnf", "list", "-o", "wide"]);
    let wide = String::from_utf8_lossy(&wide.stdout);
    let header = wide.lines().next().unwrap_or_default();
    for column in ["STANDBY", "MEMORY", "LABELS", "REASON"] {
        assert!(header.contains(column), "{wide}");
    }
    assert!(
        wide.lines()
            .any(|l| l.starts_with("fw1 ") && l.contains("role=edge")),
        "{wide}"
    );
    let hosts = server.cli(&["host", "list", "-o", "wide"]);
    let hosts = String::from_utf8_lossy(&hosts.stdout);
    let header = hosts.lines().next().unwrap_or_default();
    assert!(
        header.contains("HELD") && header.contains("QEMU"),
        "{hosts}"
    );

    // The CLI uploaded the module the descriptor names next to itself (../vnfs/firewall.wasm)
    // and sent its reference; lab-a is this node, so fw1 runs on its dedicated core.
    let fw1 = server.wait_phase("fw1", "Running");
    assert_eq!(fw1["placements"][0]["host"], "lab-a");
    let module = fw1["descriptor"]["spec"]["wasm"]["module"]
        .as_str()
        .unwrap_or_default();
    assert!(module.starts_with("sha256:"), "{fw1}");
    let yaml = server.cli(&["vnf", "show", "fw1", "-o", "yaml"]);
    assert!(String::from_utf8_lossy(&yaml.stdout).contains("name: fw1"));

    let out = server.cli(&["vnf", "lock", "fw1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    server.wait_phase("fw1", "Locked");
    let out = server.cli(&["vnf", "stop", "fw1"]);
    assert!(!out.status.success(), "stop must be refused while locked");
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "one-line error: {err}");
    assert!(err.contains("locked by authority admin"), "{err}");
    let out = server.cli(&["vnf", "unlock", "fw1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    server.wait_phase("fw1", "Running");

    let events = server.json(&["vnf", "events", "fw1"]);
    let phases: Vec<&str> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["to"].as_str().unwrap())
        .collect();
    // Started once, paused by the lock, running again after the unlock.
    assert_eq!(
        phases[..5],
        ["Pending", "Scheduled", "Starting", "Running", "Locked"],
        "{phases:?}"
    );
    assert_eq!(phases.last(), Some(&"Running"), "{phases:?}");

    let out = server.cli(&["vnf", "delete", "fw1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = server.cli(&["vnf", "show", "fw1"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("404"), "{}", stderr(&out));

    let hosts = server.json(&["host", "list"]);
    let names: Vec<&str> = hosts
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["lab-a", "lab-b", "lab-c"]);
    // This node's agent reports the version of the QEMU its vm runtime starts (vm VNFs move
    // only between hosts with the same); the hosts without an agent report none.
    let qemu = std::process::Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let version = telvirt_runtime_vm::parse_qemu_version(&qemu)
        .map(|(major, minor)| format!("{major}.{minor}"))
        .unwrap_or_default();
    let lab_a = &hosts[0];
    if lab_a["runtimes"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r == "vm")
    {
        assert_eq!(lab_a["qemu"].as_str(), Some(version.as_str()), "{lab_a}");
    }
    assert!(hosts[1].get("qemu").is_none(), "{}", hosts[1]);
    let upf1 = server.wait_vnf("upf1", |v| v["phase"] != "Pending");
    let host = upf1["placements"][0]["host"].as_str().unwrap();
    let show = server.cli(&["host", "show", host]);
    let text = String::from_utf8_lossy(&show.stdout);
    assert!(text.contains("group admin/edge"), "{text}");
}

#[test]
fn authority_token_is_shown_once_and_confines_its_holder() {
    let server = lab();
    let created = server.json(&["authority", "create", "op1"]);
    assert_eq!(created["name"], "op1");
    let token = created["token"].as_str().unwrap().to_owned();
    let fw = example(&server, "fw1.yaml");
    assert!(server.cli(&["vnf", "create", "-f", &fw]).status.success());
    // op1 does not see admin's fw1 and cannot act on it.
    let as_op1 = |args: &[&str]| {
        Command::new(BIN)
            .args(args)
            .args(["--token", &token])
            .env("TELVIRT_CONFIG", server.config())
            .output()
            .unwrap()
    };
    let list = as_op1(&["vnf", "list", "-o", "json"]);
    assert_eq!(
        serde_json::from_slice::<Value>(&list.stdout).unwrap(),
        serde_json::json!([])
    );
    let out = as_op1(&["vnf", "delete", "fw1"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("404"));
    // The listing never shows tokens.
    let all = server.cli(&["authority", "list", "-o", "json"]);
    assert!(!String::from_utf8_lossy(&all.stdout).contains(&token));
}

#[test]
fn bad_input_exits_non_zero_with_one_line() {
    let server = lab();
    let fw1 = std::fs::read_to_string(example(&server, "fw1.yaml")).unwrap();
    // Beside fw1.yaml, so that its module (../vnfs/firewall.wasm) is found and uploaded: the
    // refusal is the server's, naming the field.
    let bad = example(&server, "bad.yaml");
    std::fs::write(&bad, fw1.replace("count: 1", "count: 0")).unwrap();
    let out = server.cli(&["vnf", "create", "-f", &bad]);
    assert_eq!(out.status.code(), Some(2), "refused input exits 2");
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("spec.cpu.count"), "{err}");
    // Under -o json the error is the API's problem document (RFC 9457), with the exit code.
    let out = server.cli(&["vnf", "create", "-f", &bad, "-o", "json"]);
    assert_eq!(out.status.code(), Some(2));
    let e: serde_json::Value = serde_json::from_str(stderr(&out).trim()).unwrap();
    assert_eq!(
        (e["status"].as_u64(), e["exit_code"].as_i64()),
        (Some(422), Some(2)),
        "{e}"
    );
    assert!(
        e["type"]
            .as_str()
            .unwrap()
            .starts_with("urn:telvirt:problem:"),
        "{e}"
    );
    assert_eq!(e["errors"][0]["path"], "spec.cpu.count", "{e}");
    assert!(
        e["error"].as_str().unwrap().contains("spec.cpu.count"),
        "{e}"
    );
    // A local error is a problem document too, of the client's type and without a status.
    let out = server.cli(&["vnf", "create", "-f", "/nonexistent.yaml", "-o", "json"]);
    assert_eq!(out.status.code(), Some(1));
    let e: serde_json::Value = serde_json::from_str(stderr(&out).trim()).unwrap();
    assert_eq!(e["type"], "urn:telvirt:problem:client", "{e}");
    assert!(e.get("status").is_none(), "{e}");
    assert!(
        e["detail"].as_str().unwrap().contains("/nonexistent.yaml"),
        "{e}"
    );
    assert_eq!(e["exit_code"], 1, "{e}");
    // Something that does not exist exits 4, a conflict 5.
    assert_eq!(server.cli(&["vnf", "show", "nope"]).status.code(), Some(4));
    server.ok(&["vnf", "create", "-f", &example(&server, "fw1.yaml")]);
    let twice = server.cli(&["vnf", "create", "-f", &example(&server, "fw1.yaml")]);
    assert_eq!(twice.status.code(), Some(5), "{}", stderr(&twice));
    server.ok(&["vnf", "delete", "fw1"]);
    // A relative module that is not there: refused before any request, naming the directory
    // it was looked for in.
    let lost = server.path("lost.yaml");
    std::fs::write(&lost, &fw1).unwrap();
    let out = server.cli(&["vnf", "create", "-f", lost.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    let dir = server.path("").display().to_string();
    assert!(
        err.contains("module ../vnfs/firewall.wasm not found")
            && err.contains(dir.trim_end_matches('/')),
        "{err}"
    );
    let out = server.cli(&["vnf", "create", "-f", "/nonexistent.yaml"]);
    assert_eq!(out.status.code(), Some(1), "a local error exits 1");
    assert!(stderr(&out).contains("/nonexistent.yaml"));
    let gone = || server.json(&["vnf", "list"]) == serde_json::json!([]);
    common::wait_until("fw1 is gone", gone);
}

#[test]
fn kill_9_and_restart_lose_nothing() {
    let mut server = lab();
    for file in ["fw1.yaml", "nat1.yaml", "upf1.json"] {
        let out = server.cli(&["vnf", "create", "-f", &example(&server, file)]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    server.wait_phase("fw1", "Running");
    server.wait_vnf("upf1", |v| v["phase"] != "Pending");
    assert!(server.cli(&["vnf", "lock", "nat1"]).status.success());
    let before = server.json(&["vnf", "list"]);
    server.kill9();
    server.restart();
    let after = server.json(&["vnf", "list"]);
    let key = |v: &Value| -> Vec<(Value, Value, Value)> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| {
                (
                    x["name"].clone(),
                    x["placements"].clone(),
                    x["lock"].clone(),
                )
            })
            .collect()
    };
    assert_eq!(
        key(&after),
        key(&before),
        "names, placements and locks survive kill -9"
    );
    // The restarted node still holds the same cores: a new VNF does not get them.
    let host = server.json(&["host", "show", "lab-a"]);
    let holders: Vec<&str> = host["cpus"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["use"]["vnf"].as_str())
        .collect();
    assert!(holders.contains(&"fw1"), "{host}");
}

#[test]
fn kill_9_during_creates_keeps_every_acknowledged_vnf() {
    let mut server = lab();
    let template = std::fs::read_to_string(example(&server, "upf1.json")).unwrap();
    let config = server.config();
    // A client creating VNFs as fast as it can while the server is killed under it.
    let acked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let writer = {
        let dir = server.path("");
        let acked = acked.clone();
        std::thread::spawn(move || {
            let mut acknowledged = Vec::new();
            for i in 0..400 {
                let name = format!("vnf{i}");
                let path = dir.join(format!("{name}.json"));
                std::fs::write(&path, template.replace("upf1", &name)).unwrap();
                let out = Command::new(BIN)
                    .args(["vnf", "create", "-f", path.to_str().unwrap()])
                    .env("TELVIRT_CONFIG", &config)
                    .output()
                    .unwrap();
                if !out.status.success() {
                    break;
                }
                acknowledged.push(name);
                acked.store(acknowledged.len(), std::sync::atomic::Ordering::SeqCst);
            }
            acknowledged
        })
    };
    // Kill once a few creates were acknowledged (listed is not enough: the server may die
    // before it answers the last one it wrote).
    let deadline = Instant::now() + Duration::from_secs(30);
    while acked.load(std::sync::atomic::Ordering::SeqCst) < 5 {
        assert!(Instant::now() < deadline, "creates did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    server.kill9();
    let acknowledged = writer.join().unwrap();
    assert!(acknowledged.len() >= 5);

    server.restart();
    let names: Vec<String> = server
        .json(&["vnf", "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_owned())
        .collect();
    for name in &acknowledged {
        assert!(names.contains(name), "acknowledged {name} was lost");
    }
    // Every VNF that survived is placed or pending with a reason, and the scheduler goes on.
    for name in &names {
        server.wait_vnf(name, |v| v["phase"] != "Pending" || v["reason"].is_string());
    }
}

#[test]
fn schema_prints_json_unless_yaml_is_asked_for() {
    let json = std::process::Command::new(BIN)
        .arg("schema")
        .output()
        .unwrap();
    assert!(json.status.success(), "{}", stderr(&json));
    let from_json: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let yaml = std::process::Command::new(BIN)
        .args(["schema", "-o", "yaml"])
        .output()
        .unwrap();
    assert!(yaml.status.success(), "{}", stderr(&yaml));
    assert!(
        !String::from_utf8_lossy(&yaml.stdout)
            .trim_start()
            .starts_with('{'),
        "YAML, not JSON"
    );
    let from_yaml: serde_json::Value = yaml_serde::from_slice(&yaml.stdout).unwrap();
    assert_eq!(from_yaml, from_json);
}

#[test]
fn completion_scripts_name_every_subcommand_and_a_bad_shell_is_refused() {
    let script = |shell: &str| {
        let out = Command::new(BIN)
            .args(["completion", shell])
            .output()
            .unwrap();
        assert!(out.status.success(), "{shell}: {}", stderr(&out));
        String::from_utf8(out.stdout).unwrap()
    };
    let bash = script("bash");
    assert!(bash.contains("complete -F _telvirt"), "{bash}");
    for word in ["migrate", "capture", "completion", "--runtimes"] {
        assert!(bash.contains(word), "bash completion lacks {word}");
    }
    assert!(script("zsh").starts_with("#compdef telvirt"));
    assert!(script("fish").contains("complete -c telvirt"));
    let out = Command::new(BIN)
        .args(["completion", "nu"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("bash"), "{}", stderr(&out));
}

#[test]
fn wait_returns_once_the_phase_is_reached_and_fails_on_failed() {
    let server = lab();
    let fw = example(&server, "fw1.yaml");
    let ok = |args: &[&str]| {
        let out = server.cli(args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let out = ok(&["vnf", "create", "-f", &fw, "--wait"]);
    assert!(out.contains("vnf/fw1 created (Running)"), "{out}");
    let v: Value =
        serde_json::from_str(&ok(&["vnf", "lock", "fw1", "--wait=60", "-o", "json"])).unwrap();
    assert_eq!(v["phase"], "Locked", "{v}");
    assert!(ok(&["vnf", "unlock", "fw1", "--wait"]).contains("vnf/fw1 Running"));
    assert!(ok(&["vnf", "stop", "fw1", "--wait"]).contains("vnf/fw1 Stopped"));
    assert!(ok(&["vnf", "start", "fw1", "--wait"]).contains("vnf/fw1 Running"));
    // A VNF that ends Failed: --wait says why and exits 1.
    let broken = server.path("examples/descriptors/broken.yaml");
    let text = std::fs::read_to_string(&fw)
        .unwrap()
        .replace("name: fw1", "name: fw9")
        // Six bytes: not a default action plus whole rules, so the firewall's tv_init refuses.
        .replace("blob_hex: \"02000000\"", "blob_hex: \"020000000000\"");
    std::fs::write(&broken, text).unwrap();
    let out = server.cli(&["vnf", "create", "-f", broken.to_str().unwrap(), "--wait=60"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("vnf/fw9 failed"), "{}", stderr(&out));
    // A zero deadline is refused before any request.
    let out = server.cli(&["vnf", "stop", "fw1", "--wait=0"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--wait"), "{}", stderr(&out));
    assert_eq!(server.json(&["vnf", "show", "fw1"])["phase"], "Running");
    // delete waits too, as long as asked; a zero or a wait with --no-wait is refused.
    for bad in [&["--wait=0"][..], &["--wait", "--no-wait"][..]] {
        let out = server.cli(&[&["vnf", "delete", "fw1"][..], bad].concat());
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {}", stderr(&out));
    }
    assert!(ok(&["vnf", "delete", "fw1", "--wait=60"]).contains("vnf/fw1 deleted"));
    assert_eq!(
        server.cli(&["vnf", "show", "fw1"]).status.code(),
        Some(4),
        "fw1 is gone once delete --wait returned"
    );
}

#[test]
fn an_authority_rotates_its_token_and_is_deleted_only_once_it_owns_nothing() {
    let server = lab();
    let old = server.authority("op2");
    let created_at = server
        .json(&["authority", "list"])
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "op2")
        .unwrap()["created_at"]
        .clone();
    // Rotated by itself: the new token works, the old one is refused at once (exit 3).
    let rotated = server.json_as(&old, &["authority", "rotate-token", "op2"]);
    let new = rotated["token"].as_str().unwrap().to_owned();
    assert_ne!(new, old);
    assert_eq!(server.cli_as(&old, &["vnf", "list"]).status.code(), Some(3));
    server.ok_as(&new, &["vnf", "list"]);
    let listed = server.json(&["authority", "list"]);
    let op2 = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "op2")
        .unwrap();
    assert_eq!(
        op2["created_at"], created_at,
        "a new token is not a new authority"
    );
    // Not another's, not one that does not exist.
    let other = server.authority("op3");
    let out = server.cli_as(&other, &["authority", "rotate-token", "op2"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let out = server.cli(&["authority", "rotate-token", "nobody"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    // Deletion: admin only, never admin, never while it owns a VNF (named); then its token is dead.
    let fw = example(&server, "fw1.yaml");
    server.ok_as(&new, &["vnf", "create", "-f", &fw]);
    let out = server.cli_as(&other, &["authority", "delete", "op2"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let out = server.cli(&["authority", "delete", "admin"]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    let out = server.cli(&["authority", "delete", "op2"]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(stderr(&out).contains("VNFs fw1"), "{}", stderr(&out));
    server.ok_as(&new, &["vnf", "list"]);
    server.ok_as(&new, &["vnf", "delete", "fw1"]);
    server.ok(&["authority", "delete", "op2"]);
    assert_eq!(server.cli_as(&new, &["vnf", "list"]).status.code(), Some(3));
    let listed = server.json(&["authority", "list"]);
    assert!(!listed.to_string().contains("\"op2\""), "{listed}");
    let out = server.cli(&["authority", "delete", "op2"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
}

/// The lines a running command prints, as they come.
fn lines_of(child: &mut std::process::Child) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// Lines from `rx` until one satisfies `done`, within 60 s; returns it.
fn line_until(
    rx: &std::sync::mpsc::Receiver<String>,
    what: &str,
    done: impl Fn(&str) -> bool,
) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if done(&line) => return line,
            Ok(_) => {}
            Err(e) => panic!("no line {what}: {e}"),
        }
    }
}

#[test]
fn list_watch_prints_the_list_then_a_line_per_change() {
    let server = lab();
    let fw = example(&server, "fw1.yaml");
    let spawn = |args: &[&str]| {
        server
            .command()
            .args(args)
            .env("TELVIRT_CONFIG", server.config())
            .env_remove("TELVIRT_SERVER")
            .env_remove("TELVIRT_TOKEN")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut watch = spawn(&["vnf", "list", "-w"]);
    let mut json_watch = spawn(&["vnf", "list", "-w", "-o", "json", "-l", "tier=none"]);
    let lines = lines_of(&mut watch);
    let json_lines = lines_of(&mut json_watch);
    line_until(&lines, "with the table's header", |l| l.starts_with("NAME"));
    line_until(&json_lines, "SYNCED", |l| l.contains("\"SYNCED\""));

    let out = server.cli(&["vnf", "create", "-f", &fw]);
    assert!(out.status.success(), "{}", stderr(&out));
    line_until(&lines, "with fw1 Running", |l| {
        l.starts_with("fw1 ") && l.contains("Running")
    });
    let out = server.cli(&["vnf", "delete", "fw1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    line_until(&lines, "with fw1 Deleted", |l| {
        l.starts_with("fw1 ") && l.contains("Deleted")
    });
    // fw1 has no label tier=none: the selecting watch printed nothing since SYNCED.
    assert!(
        json_lines.try_recv().is_err(),
        "the selecting watch showed a VNF it does not select"
    );
    for child in [&mut watch, &mut json_watch] {
        assert!(
            child.try_wait().unwrap().is_none(),
            "a watch ended by itself"
        );
        child.kill().unwrap();
        child.wait().unwrap();
    }

    // A watch has no pages.
    let out = server.cli(&["vnf", "list", "-w", "--limit", "5"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--limit"), "{}", stderr(&out));
}

#[test]
fn serve_refuses_bad_shared_cpus_before_writing_anything_and_status_waits_for_a_node() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d");
    let run = |args: &[&str]| {
        std::process::Command::new(BIN)
            .args(args)
            .env_remove("TELVIRT_SERVER")
            .env_remove("TELVIRT_TOKEN")
            .env_remove("TELVIRT_CONFIG")
            .output()
            .unwrap()
    };
    let data_arg = data.to_str().unwrap();
    let serve = ["serve", "--data-dir", data_arg, "--listen", "127.0.0.1:0"];
    let out = run(&[&serve[..], &["--shared-cpus", "4096"]].concat());
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("--shared-cpus 4096: CPU 4096 is not online"),
        "{}",
        stderr(&out)
    );
    for file in ["telvirt.redb", "client.toml"] {
        assert!(!data.join(file).exists(), "{file} was written");
    }
    let out = run(&[&serve[..], &["--shared-cpus", "x-y"]].concat());
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--shared-cpus"), "{}", stderr(&out));
    // A QEMU user that is no name (at parse), no user of the host, or root: refused at once.
    for (user, why, code) in [
        ("bad user!", "is not `auto`, `current` or a user name", 2),
        ("telvirt-no-such-user", "does not exist on this host", 1),
        ("root", "has uid 0", 1),
    ] {
        let out = run(&[&serve[..], &["--qemu-user", user]].concat());
        assert_eq!(out.status.code(), Some(code), "{}", stderr(&out));
        let err = stderr(&out);
        assert!(
            err.contains("--qemu-user") && err.contains(user) && err.contains(why),
            "{err}"
        );
    }
    // A host without the vm runtime starts no QEMU: the user it names is not looked up (what
    // stops this one is its CPU list).
    let wasm_only = ["--runtimes", "wasm", "--qemu-user", "telvirt-no-such-user"];
    let out = run(&[&serve[..], &wasm_only, &["--shared-cpus", "4096"]].concat());
    assert!(
        stderr(&out).contains("--shared-cpus 4096: CPU 4096 is not online"),
        "{}",
        stderr(&out)
    );
    for file in ["telvirt.redb", "client.toml"] {
        assert!(!data.join(file).exists(), "{file} was written");
    }
    // No node answers: status says so at once, or after its wait.
    let nobody = [
        "--server",
        "http://127.0.0.1:9",
        "--token",
        "tvt_x",
        "status",
    ];
    let out = run(&nobody);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let out = run(&[&nobody[..], &["--wait=1"]].concat());
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("the node was not ready within 1 s"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn the_api_speaks_tls_to_the_pinned_certificate_only_and_plain_http_only_on_loopback() {
    // Refused set-ups write nothing: no store, no client config, no certificate.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d");
    let data_arg = data.to_str().unwrap();
    let serve = |extra: &[&str]| {
        Command::new(BIN)
            .args(["serve", "--data-dir", data_arg])
            .args(extra)
            .env_remove("TELVIRT_CONFIG")
            .output()
            .unwrap()
    };
    let out = serve(&["--listen", "0.0.0.0:0", "--plain-http"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("--plain-http")
            && stderr(&out).contains("not one: listen on 127.0.0.1"),
        "{}",
        stderr(&out)
    );
    let out = serve(&["--listen", "127.0.0.1:0", "--tls-cert", "c.pem"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--tls-key"), "{}", stderr(&out));
    let missing = data.join("none.pem");
    let out = serve(&[
        "--listen",
        "127.0.0.1:0",
        "--tls-cert",
        missing.to_str().unwrap(),
        "--tls-key",
        missing.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("--tls-cert: cannot read"),
        "{}",
        stderr(&out)
    );
    for file in ["telvirt.redb", "client.toml", "tls"] {
        assert!(!data.join(file).exists(), "{file} was written");
    }

    // By default: TLS with a generated certificate, pinned in the client config.
    let mut node = Serve::start(&[]);
    let server = node.server();
    assert!(server.starts_with("https://127.0.0.1:"), "{server}");
    let pinned = common::config_value(&node.config(), "ca");
    let generated = std::fs::read_to_string(node.path("data/tls/server.crt")).unwrap();
    assert_eq!(pinned, generated);
    let admin = node.admin_token();
    assert_eq!(
        common::http(&server, "GET", "/v1/vnfs", Some(&admin), "").0,
        200
    );
    // Plain HTTP to the TLS port gets no HTTP answer at all.
    let plain = server.replacen("https://", "http://", 1);
    let answer = common::try_http(&plain, "GET", "/v1/vnfs", Some(&admin), "");
    assert!(
        !matches!(answer, Ok((status, _)) if status != 0),
        "{answer:?}"
    );
    // A peer that goes away mid-write must not end the node: a TLS stream writes with writev,
    // which raises SIGPIPE, so the node keeps it ignored (the agent tests' hosts that die
    // exercise it).
    let status = std::fs::read_to_string(format!("/proc/{}/status", node.pid())).unwrap();
    let ignored = status
        .lines()
        .find_map(|l| l.strip_prefix("SigIgn:"))
        .map(|m| u64::from_str_radix(m.trim(), 16).unwrap())
        .unwrap();
    assert_ne!(ignored & (1 << (libc::SIGPIPE - 1)), 0, "{status}");
    // A client that pins another certificate refuses the server before sending its token.
    let (other, _) = {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.pem(), key)
    };
    let quoted = |v: &str| toml::Value::String(v.to_owned()).to_string();
    let alt = format!(
        "server = {}
token = {}
ca = {}
",
        quoted(&server),
        quoted(&admin),
        quoted(&other)
    );
    std::fs::write(node.path("alt.toml"), alt).unwrap();
    let out = node.cli(&["--config", "alt.toml", "vnf", "list"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("invalid peer certificate"),
        "{}",
        stderr(&out)
    );
    // A restart keeps the certificate, so the pinned client config stays valid.
    node.terminate();
    node.restart();
    assert_eq!(common::config_value(&node.config(), "ca"), pinned);
    node.ok(&["vnf", "list"]);

    // Plain HTTP when asked, on loopback: no certificate to pin.
    let plain_node = Serve::start(&["--plain-http"]);
    assert!(plain_node.server().starts_with("http://127.0.0.1:"));
    let config = std::fs::read_to_string(plain_node.config()).unwrap();
    assert!(!config.contains("ca ="), "{config}");
    assert!(!plain_node.path("data/tls").exists());
    plain_node.ok(&["vnf", "list"]);
}

#[test]
fn bench_api_times_the_same_calls_over_tls_and_plain_http() {
    let out = Command::new(BIN)
        .args([
            "bench",
            "api",
            "--calls",
            "5",
            "--connections",
            "3",
            "--rounds",
            "1",
        ])
        .args(["-o", "json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let figures = report["figures"].as_array().unwrap();
    assert_eq!(figures.len(), 3, "{report}");
    for f in figures {
        for side in ["plain", "tls"] {
            let p50 = f[side]["p50_ms"].as_f64().unwrap();
            assert!(
                p50 > 0.0 && p50 <= f[side]["max_ms"].as_f64().unwrap(),
                "{f}"
            );
        }
        let ratio = f["ratio_p50"].as_f64().unwrap();
        let expected =
            f["tls"]["p50_ms"].as_f64().unwrap() / f["plain"]["p50_ms"].as_f64().unwrap();
        assert!((ratio - expected).abs() < 1e-9, "{f}");
    }
    // The large document is large, and both sides answered it whole.
    assert!(
        figures[1]["body_bytes"].as_u64().unwrap() > 10_000,
        "{report}"
    );
    assert!(
        report["measured"]
            .as_str()
            .unwrap()
            .contains("--plain-http")
    );
}

#[test]
fn a_command_whose_reader_goes_away_ends_quietly_like_a_unix_tool() {
    use std::io::Read;
    for args in [&["schema"][..], &["completion", "bash"][..]] {
        let mut child = Command::new(BIN)
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Read a little, then go away as `head -c 10` does.
        let mut first = [0u8; 10];
        child.stdout.take().unwrap().read_exact(&mut first).unwrap();
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(141), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).is_empty(), "{args:?}: {}", stderr(&out));
    }
}
