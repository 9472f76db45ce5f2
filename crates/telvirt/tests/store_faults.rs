//! `telvirt serve` with its data dir on a small filesystem that runs full: writes are refused
//! with a clear 503 (not a 500 with the store library's text), `/v1/healthz` names the store,
//! and once space is back the node takes writes again and reports healthy, without a restart.
//! Needs root (it mounts a tmpfs).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;
use common::{DEADLINE, Serve, repo};

/// A tmpfs of `size` mounted on `at`, detached (and the directory removed) on drop.
struct SmallDisk {
    at: PathBuf,
}

impl SmallDisk {
    fn mount(at: &Path, size: &str) -> SmallDisk {
        std::fs::create_dir_all(at).unwrap();
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(at)
            .status()
            .unwrap();
        assert!(status.success(), "mount tmpfs on {}", at.display());
        SmallDisk { at: at.to_owned() }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        // Lazy: the server may still hold files open when a failing test unwinds.
        let _ = Command::new("umount").arg("-l").arg(&self.at).status();
        let _ = std::fs::remove_dir(&self.at);
        if let Some(parent) = self.at.parent() {
            let _ = std::fs::remove_dir(parent);
        }
    }
}

/// Writes `path` until the filesystem is full.
fn fill(path: &Path) {
    let mut file = std::fs::File::create(path).unwrap();
    let chunk = vec![0x5au8; 64 * 1024];
    loop {
        match file.write(&chunk) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => return,
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
}

/// One HTTP/1.1 request to the server as its admin: (status, JSON body or null).
fn http(server: &Serve, method: &str, path: &str, body: &str) -> (u16, Value) {
    let token = server.admin_token();
    let (status, body) = common::http(&server.server(), method, path, Some(&token), body);
    let body = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"))
    };
    (status, body)
}

fn vnf(name: &str) -> String {
    format!(
        "apiVersion: telvirt/v1\nkind: Vnf\nmetadata: {{ name: {name} }}\nspec:\n  runtime: wasm\n  cpu: {{ policy: dedicated, count: 1 }}\n  ports: [in, out]\n  wasm:\n    module: missing.wasm\n    limits: {{ memory: 16MiB }}\n"
    )
}

/// Polls `path` until it answers `status`; returns the body.
fn wait_status(server: &Serve, path: &str, status: u16) -> Value {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let (got, body) = http(server, "GET", path, "");
        if got == status {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{path} never answered {status}: {got} {body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn a_full_disk_is_refused_with_503_and_serve_recovers_once_space_is_back() {
    if !is_root() {
        eprintln!("skipped: mounting a small tmpfs for the data dir needs root");
        return;
    }
    let dir = Serve::dir();
    let data = dir.path().join("data");
    let images = dir.path().join("images");
    let disk = SmallDisk::mount(&data, "8m");
    let inventory = repo("examples/inventory/lab.yaml");
    let mut server = Serve::start_in(
        dir,
        &[
            "--inventory",
            inventory.to_str().unwrap(),
            "--image-cache",
            images.to_str().unwrap(),
        ],
    );

    let health = wait_status(&server, "/v1/healthz", 200);
    assert_eq!(health["status"], "ok");
    for component in ["store", "scheduler", "agent", "dataplane"] {
        assert_eq!(health["components"][component]["status"], "up", "{health}");
    }
    let mut acknowledged = Vec::new();
    let (status, body) = http(&server, "POST", "/v1/vnfs", &vnf("before"));
    assert_eq!(status, 201, "{body}");
    acknowledged.push("before".to_owned());

    let filler = data.join("filler");
    fill(&filler);
    // The store may still fit a few writes into pages its file already holds: create until one
    // is refused. Every answer is a 201 or a clean 503, never a 500.
    let mut refused = None;
    for i in 0..300 {
        let name = format!("full{i}");
        let (status, body) = http(&server, "POST", "/v1/vnfs", &vnf(&name));
        match status {
            201 => acknowledged.push(name),
            503 => {
                refused = Some((name, body));
                break;
            }
            other => panic!("create on a full disk answered {other}: {body}"),
        }
    }
    let (refused, problem) = refused.expect("no create was refused on a full disk");
    assert_eq!(problem["type"], "urn:telvirt:problem:store-unavailable");
    let detail = problem["detail"].as_str().unwrap();
    assert!(detail.contains("No space left on device"), "{detail}");
    assert!(!detail.contains("Previous I/O"), "{detail}");

    for path in ["/v1/healthz", "/v1/readyz"] {
        let problem = wait_status(&server, path, 503);
        let detail = problem["detail"].as_str().unwrap();
        assert!(detail.contains("store is down"), "{detail}");
        assert!(detail.contains("No space left on device"), "{detail}");
        assert_eq!(problem["components"]["store"]["status"], "down");
        assert_eq!(problem["components"]["scheduler"]["status"], "up");
    }
    // A delete is refused the same way, not with a 500.
    let (status, body) = http(&server, "DELETE", "/v1/vnfs/before", "");
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["type"], "urn:telvirt:problem:store-unavailable");

    std::fs::remove_file(&filler).unwrap();
    let health = wait_status(&server, "/v1/healthz", 200);
    assert_eq!(health["components"]["store"]["status"], "up", "{health}");
    let (status, body) = http(&server, "POST", "/v1/vnfs", &vnf("after"));
    assert_eq!(status, 201, "{body}");
    acknowledged.push("after".to_owned());

    let (status, list) = http(&server, "GET", "/v1/vnfs", "");
    assert_eq!(status, 200, "{list}");
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    for name in &acknowledged {
        assert!(names.contains(&name.as_str()), "{name} was lost: {names:?}");
    }
    assert!(
        !names.contains(&refused.as_str()),
        "the refused create {refused} was stored"
    );
    server.terminate();
    drop(server);
    drop(disk);
}
