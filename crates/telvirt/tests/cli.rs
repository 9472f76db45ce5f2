//! The `telvirt` binary end to end: a real `telvirt serve` process, the CLI round trip against
//! it, and `kill -9` of the server at arbitrary moments losing nothing that was acknowledged.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_telvirt");

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(rel)
}

/// A `telvirt serve` process on an ephemeral port; SIGKILLed when dropped.
struct Server {
    child: Child,
    data: PathBuf,
}

impl Server {
    fn start(data: &Path) -> Server {
        let config = data.join("client.toml");
        let _ = std::fs::remove_file(&config);
        let child = Command::new(BIN)
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data)
            .arg("--inventory")
            .arg(repo("examples/inventory/lab.yaml"))
            .env("TELVIRT_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let server = Server {
            child,
            data: data.to_path_buf(),
        };
        server.wait_ready();
        server
    }

    /// Polls until the client config exists and the API answers, with a deadline.
    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.data.join("client.toml").exists() && self.cli(&["vnf", "list"]).status.success()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "telvirt serve did not become ready"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .env("TELVIRT_CONFIG", self.data.join("client.toml"))
            .env_remove("TELVIRT_SERVER")
            .env_remove("TELVIRT_TOKEN")
            .output()
            .unwrap()
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        let out = self.cli(&all);
        assert!(
            out.status.success(),
            "telvirt {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Polls `vnf show` until `pred` holds.
    fn wait_vnf(&self, name: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let v = self.json(&["vnf", "show", name]);
            if pred(&v) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "{name} never reached the state: {v}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn cli_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let fw = repo("examples/descriptors/fw1.yaml");
    let upf = repo("examples/descriptors/upf1.json");
    let out = server.cli(&["vnf", "create", "-f", fw.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("vnf/fw1 created"));
    let created = server.json(&["vnf", "create", "-f", upf.to_str().unwrap()]);
    assert_eq!(created["name"], "upf1");

    let list = server.cli(&["vnf", "list"]);
    let table = String::from_utf8_lossy(&list.stdout);
    assert!(table.starts_with("NAME"), "{table}");
    assert!(table.contains("fw1") && table.contains("upf1"), "{table}");

    let fw1 = server.wait_vnf("fw1", |v| v["phase"] == "Failed");
    assert_eq!(fw1["placements"][0]["host"], "lab-a");
    let yaml = server.cli(&["vnf", "show", "fw1", "-o", "yaml"]);
    assert!(String::from_utf8_lossy(&yaml.stdout).contains("name: fw1"));

    let out = server.cli(&["vnf", "lock", "fw1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = server.cli(&["vnf", "stop", "fw1"]);
    assert!(!out.status.success(), "stop must be refused while locked");
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "one-line error: {err}");
    assert!(err.contains("locked by authority admin"), "{err}");
    let out = server.cli(&["vnf", "unlock", "fw1"]);
    assert!(out.status.success(), "{}", stderr(&out));

    let events = server.json(&["vnf", "events", "fw1"]);
    let phases: Vec<&str> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["to"].as_str().unwrap())
        .collect();
    // The wasm runtime cannot read the module (relative to the server's working directory);
    // each unlock is a new generation, so the start is tried again and fails again.
    assert_eq!(phases[..4], ["Pending", "Scheduled", "Starting", "Failed"]);
    assert!(
        phases[4..]
            .iter()
            .all(|p| ["Starting", "Failed"].contains(p)),
        "{phases:?}"
    );

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
    let upf1 = server.wait_vnf("upf1", |v| v["phase"] != "Pending");
    let host = upf1["placements"][0]["host"].as_str().unwrap();
    let show = server.cli(&["host", "show", host]);
    let text = String::from_utf8_lossy(&show.stdout);
    assert!(text.contains("group admin/edge"), "{text}");
}

#[test]
fn authority_token_is_shown_once_and_confines_its_holder() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let created = server.json(&["authority", "create", "op1"]);
    assert_eq!(created["name"], "op1");
    let token = created["token"].as_str().unwrap().to_owned();
    let fw = repo("examples/descriptors/fw1.yaml");
    assert!(
        server
            .cli(&["vnf", "create", "-f", fw.to_str().unwrap()])
            .status
            .success()
    );
    // op1 does not see admin's fw1 and cannot act on it.
    let as_op1 = |args: &[&str]| {
        Command::new(BIN)
            .args(args)
            .args(["--token", &token])
            .env("TELVIRT_CONFIG", server.data.join("client.toml"))
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
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        std::fs::read_to_string(repo("examples/descriptors/fw1.yaml"))
            .unwrap()
            .replace("count: 1", "count: 0"),
    )
    .unwrap();
    let out = server.cli(&["vnf", "create", "-f", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("spec.cpu.count"), "{err}");
    let out = server.cli(&["vnf", "create", "-f", "/nonexistent.yaml"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("/nonexistent.yaml"));
    assert_eq!(server.json(&["vnf", "list"]), serde_json::json!([]));
}

#[test]
fn kill_9_and_restart_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    for file in ["fw1.yaml", "nat1.yaml", "upf1.json"] {
        let path = repo(&format!("examples/descriptors/{file}"));
        let out = server.cli(&["vnf", "create", "-f", path.to_str().unwrap()]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    server.wait_vnf("fw1", |v| v["phase"] == "Failed");
    server.wait_vnf("upf1", |v| v["phase"] != "Pending");
    assert!(server.cli(&["vnf", "lock", "nat1"]).status.success());
    let before = server.json(&["vnf", "list"]);
    server.kill9();

    let server = Server::start(dir.path());
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
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let template = std::fs::read_to_string(repo("examples/descriptors/upf1.json")).unwrap();
    let config = server.data.join("client.toml");
    // A client creating VNFs as fast as it can while the server is killed under it.
    let writer = {
        let dir = dir.path().to_path_buf();
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
            }
            acknowledged
        })
    };
    // Kill once a few creates went through.
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.json(&["vnf", "list"]).as_array().unwrap().len() < 5 {
        assert!(Instant::now() < deadline, "creates did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    server.kill9();
    let acknowledged = writer.join().unwrap();
    assert!(acknowledged.len() >= 5);

    let server = Server::start(dir.path());
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
