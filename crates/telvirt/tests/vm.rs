//! vm VNFs in a real `telvirt serve` under TCG: a descriptor boots the default guest with its
//! vCPU thread pinned as placed, lock/unlock pause/resume it, an rng device comes and goes
//! through the API, a SIGKILLed node re-adopts the same QEMU on restart (no duplicate), a
//! crashed QEMU is Failed with the reason and `vnf start` boots a new one, and delete ends QEMU. Without the static guest agent the vm runtime is honestly unavailable.
//!
//! One guest at a time (1 vCPU, 256 MiB); every QEMU started here is SIGKILLed by a guard even
//! when an assertion fails.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;
#[path = "../../dataplane/tests/support/netns.rs"]
mod netns;

const BIN: &str = env!("CARGO_BIN_EXE_telvirt");
/// TCG boots take 3-10 s on a loaded 2-core machine; leave plenty of room.
const BOOT_DEADLINE: Duration = Duration::from_secs(240);
const DEADLINE: Duration = Duration::from_secs(60);

/// At most one guest boots at a time in this test binary.
static ONE_GUEST: Mutex<()> = Mutex::new(());

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A `telvirt serve` in a short temp dir (unix socket paths are limited); on drop the node is
/// SIGKILLed and so is every QEMU of `vm` (the VNF the test uses).
struct Node {
    child: Option<Child>,
    dir: tempfile::TempDir,
    vm: String,
    guest: PathBuf,
    /// A command the node and the CLI run under (e.g. `ip netns exec NS`), or none.
    wrapper: Vec<String>,
    /// The QEMU the node runs (`--qemu`), or the system's.
    qemu: Option<PathBuf>,
    /// The user its QEMUs change to (`--qemu-user`), or the default (`auto`).
    qemu_user: Option<String>,
    /// How often its agent looks at every instance unasked (`--resync-interval-ms`), or the
    /// default (1 s).
    resync_ms: Option<u64>,
}

impl Node {
    fn new(vm: &str, guest: PathBuf) -> Node {
        Node::new_wrapped(vm, guest, &[])
    }

    /// A node whose agent looks at its instances unasked only once an hour: what it reports
    /// within a test, the instances told it.
    fn told_not_looking(vm: &str, guest: PathBuf) -> Node {
        let mut node = Node::unstarted(vm, guest, &[], None, None);
        node.resync_ms = Some(3_600_000);
        node.start();
        node
    }

    /// A node whose serve and CLI run under `wrapper`.
    fn new_wrapped(vm: &str, guest: PathBuf, wrapper: &[&str]) -> Node {
        Node::create(vm, guest, wrapper, None)
    }

    /// A node whose serve runs its VMs with the QEMU at `qemu`, as `user`.
    fn on_qemu_as(vm: &str, guest: PathBuf, qemu: PathBuf, user: &str) -> Node {
        Node::create_as(vm, guest, &[], Some(qemu), Some(user.to_owned()))
    }

    fn create(vm: &str, guest: PathBuf, wrapper: &[&str], qemu: Option<PathBuf>) -> Node {
        Node::create_as(vm, guest, wrapper, qemu, None)
    }

    fn create_as(
        vm: &str,
        guest: PathBuf,
        wrapper: &[&str],
        qemu: Option<PathBuf>,
        qemu_user: Option<String>,
    ) -> Node {
        let mut node = Node::unstarted(vm, guest, wrapper, qemu, qemu_user);
        node.start();
        node
    }

    fn unstarted(
        vm: &str,
        guest: PathBuf,
        wrapper: &[&str],
        qemu: Option<PathBuf>,
        qemu_user: Option<String>,
    ) -> Node {
        let dir = tempfile::Builder::new()
            .prefix("tvi")
            .tempdir_in("/tmp")
            .expect("temp dir in /tmp");
        Node {
            child: None,
            dir,
            vm: vm.to_owned(),
            guest,
            wrapper: wrapper.iter().map(|w| (*w).to_owned()).collect(),
            qemu,
            qemu_user,
            resync_ms: None,
        }
    }

    /// `telvirt` under the node's wrapper.
    fn command(&self) -> Command {
        match self.wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(BIN);
                c
            }
            None => Command::new(BIN),
        }
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("d")
    }

    fn config(&self) -> PathBuf {
        self.data().join("client.toml")
    }

    fn start(&mut self) {
        let _ = std::fs::remove_file(self.config());
        let mut serve = self.command();
        serve.args(["serve", "--listen", "127.0.0.1:0", "--accel", "tcg"]);
        if let Some(q) = &self.qemu {
            serve.arg("--qemu").arg(q);
        }
        if let Some(u) = &self.qemu_user {
            serve.arg("--qemu-user").arg(u);
        }
        if let Some(ms) = self.resync_ms {
            serve.args(["--resync-interval-ms", &ms.to_string()]);
        }
        let child = serve
            .arg("--data-dir")
            .arg(self.data())
            .arg("--image-cache")
            .arg(common::shared_image_cache())
            .env("TELVIRT_GUEST_BIN", &self.guest)
            .env("TELVIRT_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn telvirt serve");
        self.child = Some(child);
        let deadline = Instant::now() + DEADLINE;
        while !(self.config().exists() && self.cli(&["vnf", "list"]).status.success()) {
            assert!(
                Instant::now() < deadline,
                "telvirt serve did not become ready"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        common::trust(&common::config_value(&self.config(), "ca"));
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn cli(&self, args: &[&str]) -> Output {
        self.command()
            .args(args)
            .env("TELVIRT_CONFIG", self.config())
            .env_remove("TELVIRT_SERVER")
            .env_remove("TELVIRT_TOKEN")
            .env_remove("TELVIRT_DATA_DIR")
            .output()
            .expect("run telvirt")
    }

    fn ok(&self, args: &[&str]) -> Output {
        let out = self.cli(args);
        assert!(out.status.success(), "telvirt {args:?}: {}", stderr(&out));
        out
    }

    /// The command must fail, and its error must contain `what`.
    fn refused(&self, args: &[&str], what: &str) {
        let out = self.cli(args);
        assert!(!out.status.success(), "telvirt {args:?} must be refused");
        assert!(
            stderr(&out).contains(what),
            "telvirt {args:?}: expected '{what}' in: {}",
            stderr(&out)
        );
    }

    fn show(&self, name: &str) -> Value {
        serde_json::from_slice(&self.ok(&["vnf", "show", name, "-o", "json"]).stdout)
            .expect("vnf show -o json is JSON")
    }

    /// Polls `vnf show` until `done` holds, with a deadline.
    fn wait(
        &self,
        name: &str,
        limit: Duration,
        what: &str,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            let v = self.show(name);
            if done(&v) {
                return v;
            }
            assert!(
                v["phase"] != "Failed" || what.contains("Failed"),
                "{name} failed while waiting for {what}: {v}"
            );
            assert!(Instant::now() < deadline, "{name}: never {what}: {v}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn wait_phase(&self, name: &str, phase: &str, limit: Duration) -> Value {
        self.wait(name, limit, phase, |v| v["phase"] == phase)
    }

    fn instance(&self, rel: &str) -> PathBuf {
        self.data().join("instances").join(&self.vm).join(rel)
    }

    fn qemu_pid(&self) -> i32 {
        std::fs::read_to_string(self.instance("qemu.pid"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .expect("qemu.pid of a running vm")
    }

    fn granted_ids(&self) -> Vec<String> {
        let grants: Value = std::fs::read(self.instance("grants.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Value::Null);
        grants
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|g| g["id"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
        for pid in common::qemu_pids(&self.vm) {
            common::sigkill(pid);
        }
    }
}

/// `examples/descriptors/upf1.json` (shared group `edge`, 1 vCPU, 256 MiB) under another name,
/// so no other QEMU on the machine matches `guest=<name>,`.
fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The real, effective, saved and filesystem uids of process `pid`.
fn qemu_uids(pid: i32) -> Vec<u32> {
    telvirt_files::proc::uids(pid).expect("QEMU's status")
}

fn descriptor(node: &Node) -> PathBuf {
    let text = std::fs::read_to_string(workspace().join("examples/descriptors/upf1.json"))
        .expect("read upf1.json")
        .replace("\"name\": \"upf1\"", &format!("\"name\": \"{}\"", node.vm));
    assert!(text.contains(&node.vm), "descriptor renamed");
    let path = node.dir.path().join("vm.json");
    std::fs::write(&path, text).expect("write descriptor");
    path
}

#[test]
fn vm_vnf_boots_pinned_locks_takes_devices_survives_a_node_kill_and_is_deleted() {
    let _one = ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner());
    let vm = format!("vmint{}", std::process::id());
    // Its agent looks at the VM unasked once an hour: the crash below is reported because
    // the runtime tells the agent when QEMU exits.
    let mut node = Node::told_not_looking(&vm, common::guest_binary());
    let file = descriptor(&node);
    node.ok(&["vnf", "create", "-f", file.to_str().expect("utf-8 path")]);

    // Running means the guest agent in the default image said ready.
    let v = node.wait_phase(&vm, "Running", BOOT_DEADLINE);
    let pid = node.qemu_pid();
    // As root, its QEMU runs as a uid of its own (`--qemu-user auto`, the default).
    if is_root() {
        let uids = qemu_uids(pid);
        assert!(
            uids.iter()
                .all(|u| (1_900_000_000..1_900_065_536).contains(u))
                && uids.len() == 4,
            "QEMU's uids {uids:?}"
        );
    }
    assert_eq!(
        common::qemu_pids(&vm),
        vec![pid],
        "exactly one QEMU for {vm}"
    );

    // The vCPU thread runs only on the placed CPU, QEMU's other threads on the emulator set.
    let placement = &v["placements"][0];
    let vcpu_cpus = common::cpu_list(&placement["vcpus"][0]);
    assert!(!vcpu_cpus.is_empty(), "placement has vCPU CPUs: {v}");
    assert_eq!(
        common::allowed_cpus(pid, true),
        vec![vcpu_cpus.clone()],
        "vCPU pinning"
    );
    let emulator = common::cpu_list(&placement["emulator_cpus"]);
    if !emulator.is_empty() {
        let others = common::allowed_cpus(pid, false);
        assert!(!others.is_empty());
        assert!(
            others.iter().all(|c| *c == emulator),
            "emulator threads {others:?} on {emulator}"
        );
    }

    // /metrics carries the QEMU process's resident memory and its vCPU thread's run time,
    // read from /proc on the VNF's host through its agent.
    let config = node.config();
    let server = common::config_value(&config, "server");
    let token = common::config_value(&config, "token");
    let (status, _, samples) = common::scrape(&server, Some(&token));
    assert_eq!(status, 200, "admin scrape");
    let rss = common::sample(
        &samples,
        "telvirt_vm_resident_memory_bytes",
        &[("vnf", &vm)],
    );
    assert!(rss.is_some_and(|b| b > 0.0), "QEMU RSS of {vm}: {rss:?}");
    let run = common::sample(
        &samples,
        "telvirt_vm_vcpu_run_seconds_total",
        &[("vnf", &vm), ("vcpu", "0")],
    );
    assert!(
        run.is_some_and(|s| s > 0.0),
        "vCPU 0 run time of {vm}: {run:?}"
    );

    // The serial console is read on the VNF's host, through its agent.
    let console = node.ok(&["vnf", "console", &vm, "--lines", "200"]);
    let console = String::from_utf8_lossy(&console.stdout).into_owned();
    assert!(
        console.contains(&format!("starting vm {vm}")),
        "console: {console}"
    );

    // Lock pauses; a locked VNF refuses devices and nothing changes.
    node.ok(&["vnf", "lock", &vm]);
    node.wait_phase(&vm, "Locked", DEADLINE);
    node.refused(
        &["vnf", "attach", &vm, "--id", "rng0", "--kind", "rng"],
        "locked",
    );
    assert!(
        node.show(&vm).get("devices").is_none(),
        "refusal changed nothing"
    );
    node.ok(&["vnf", "unlock", &vm]);
    node.wait_phase(&vm, "Running", DEADLINE);

    // An rng device comes and goes through the API; the agent plugs it into QEMU.
    node.ok(&["vnf", "attach", &vm, "--id", "rng0", "--kind", "rng"]);
    node.wait(&vm, DEADLINE, "holding rng0", |v| {
        v["reason"]
            .as_str()
            .is_some_and(|r| r.contains("devices rng0"))
    });
    assert_eq!(node.granted_ids(), ["rng0"]);
    let table = node.ok(&["vnf", "show", &vm]);
    let table = String::from_utf8_lossy(&table.stdout).into_owned();
    assert!(
        table.contains("Device:      rng0 rng"),
        "vnf show lists the grant: {table}"
    );
    node.refused(
        &["vnf", "attach", &vm, "--id", "rng0", "--kind", "rng"],
        "already has",
    );
    node.refused(&["vnf", "detach", &vm, "nope"], "404");
    assert_eq!(node.show(&vm)["devices"].as_array().map(Vec::len), Some(1));
    node.ok(&["vnf", "detach", &vm, "rng0"]);
    node.wait(&vm, DEADLINE, "without devices", |v| {
        v["reason"] == "running"
    });
    assert!(node.granted_ids().is_empty(), "rng0 detached from QEMU");

    // SIGKILL the node: QEMU keeps running; the restarted node adopts it, starts no other.
    node.kill9();
    assert!(common::alive(pid), "QEMU survives its node");
    node.start();
    node.wait_phase(&vm, "Running", DEADLINE);
    // Give a duplicate start its chance to show up before counting.
    node.ok(&["vnf", "lock", &vm]);
    node.wait_phase(&vm, "Locked", DEADLINE);
    assert_eq!(
        common::qemu_pids(&vm),
        vec![pid],
        "the same QEMU, adopted, and no duplicate"
    );
    node.ok(&["vnf", "unlock", &vm]);
    node.wait_phase(&vm, "Running", DEADLINE);

    // A crash (QEMU killed behind telvirt's back) is Failed with the reason (its runtime told
    // the agent at once), and the agent restarts it in place (Masakari's instance failure),
    // saying so.
    // Failed lasts the second before the restart, which a slow poll can miss: its event,
    // which stays, is waited for.
    let failures = || -> Vec<String> {
        let events: Value =
            serde_json::from_slice(&node.ok(&["vnf", "events", &vm, "-o", "json"]).stdout)
                .expect("vnf events -o json is JSON");
        let events = events.as_array().cloned().unwrap_or_default();
        events
            .iter()
            .filter(|e| e["to"] == "Failed")
            .map(|e| e["reason"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    let before = failures().len();
    common::sigkill(pid);
    let mut reason = String::new();
    common::wait_until("a Failed event after the crash", || {
        let after = failures();
        reason = after.last().cloned().unwrap_or_default();
        after.len() > before
    });
    assert!(
        reason.contains("without being asked") && reason.contains("restarting in place in 1 s"),
        "crash reason: {reason}"
    );
    let back = node.wait(&vm, BOOT_DEADLINE, "Running again after Failed", |v| {
        v["phase"] == "Running"
            && v["reason"]
                .as_str()
                .is_some_and(|r| r.contains("restarted in place 1 time"))
    });
    assert!(
        back["reason"]
            .as_str()
            .unwrap()
            .contains("without being asked"),
        "{back}"
    );
    let new_pid = node.qemu_pid();
    assert_ne!(new_pid, pid);
    assert_eq!(
        common::qemu_pids(&vm),
        vec![new_pid],
        "one new QEMU after the restart"
    );
    let pid = new_pid;

    // Delete stops the guest and QEMU goes away.
    node.ok(&["vnf", "delete", &vm]);
    let deadline = Instant::now() + DEADLINE;
    while common::alive(pid) {
        assert!(
            Instant::now() < deadline,
            "QEMU {pid} still runs after delete"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(common::qemu_pids(&vm).is_empty());
}

#[test]
fn without_the_static_guest_agent_vm_vnfs_fail_honestly() {
    let vm = format!("vmna{}", std::process::id());
    let node = Node::new(&vm, PathBuf::from("/nonexistent/telvirt-guest"));
    let hosts: Value =
        serde_json::from_slice(&node.ok(&["host", "list", "-o", "json"]).stdout).expect("json");
    let runtimes = &hosts[0]["runtimes"];
    assert!(
        !runtimes
            .as_array()
            .is_some_and(|r| r.iter().any(|k| k == "vm")),
        "vm must not be offered: {runtimes}"
    );
    let file = descriptor(&node);
    node.ok(&["vnf", "create", "-f", file.to_str().expect("utf-8 path")]);
    let v = node.wait(&vm, DEADLINE, "Failed or Pending with a reason", |v| {
        v["reason"].as_str().is_some_and(|r| r.contains("vm"))
            && (v["phase"] == "Failed" || v["phase"] == "Pending")
    });
    assert!(
        common::qemu_pids(&vm).is_empty(),
        "no QEMU without the runtime: {v}"
    );
}

/// `telvirt` outside a node, with the test's guest agent and image cache.
fn offline(args: &[&str], guest: &Path) -> Output {
    Command::new(BIN)
        .args(args)
        .arg("--image-cache")
        .arg(common::shared_image_cache())
        .env("TELVIRT_GUEST_BIN", guest)
        .env("TELVIRT_DATA_DIR", "/nonexistent-data-dir")
        .output()
        .expect("run telvirt")
}

#[test]
fn image_build_reports_the_image_and_refuses_a_dynamic_agent() {
    let out = offline(&["image", "build", "-o", "json"], &common::guest_binary());
    assert!(out.status.success(), "image build: {}", stderr(&out));
    let image: Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    for file in ["kernel", "initrd"] {
        let path = image[file].as_str().unwrap_or_default();
        assert!(Path::new(path).is_file(), "{file} {path} exists: {image}");
    }
    assert!(image["digest"].as_str().is_some_and(|d| !d.is_empty()));
    // Same inputs again: found in the cache.
    let again = offline(&["image", "build", "-o", "json"], &common::guest_binary());
    let again: Value = serde_json::from_slice(&again.stdout).expect("one JSON object");
    assert_eq!(again["cached"], true);
    assert_eq!(again["initrd"], image["initrd"]);
    // The telvirt binary itself is dynamically linked: refused with the reason and the fix.
    let out = offline(&["image", "build"], Path::new(BIN));
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("dynamically linked"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn bench_vm_prints_one_json_object_with_both_boots() {
    let _one = ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner());
    let out = offline(
        &[
            "bench", "vm", "--rounds", "1", "--accel", "tcg", "-o", "json",
        ],
        &common::guest_binary(),
    );
    assert!(out.status.success(), "bench vm: {}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.lines().count(),
        1,
        "one JSON object on one line: {text}"
    );
    let r: Value = serde_json::from_str(&text).expect("JSON");
    assert_eq!(r["accel"], "tcg");
    assert_eq!(r["rounds"], 1);
    let (t, b) = (
        r["telvirt_boot_ms"].as_f64().unwrap_or(0.0),
        r["bare_boot_ms"].as_f64().unwrap_or(0.0),
    );
    assert!(t > 0.0 && b > 0.0, "{r}");
    let ratio = r["ratio"].as_f64().unwrap_or(0.0);
    assert!((ratio - t / b).abs() < 1e-6, "ratio is telvirt / bare: {r}");
}

#[test]
fn bench_vm_move_says_at_once_when_its_agents_have_no_vm_runtime() {
    // No guest agent where the agents look: they run without their vm runtime.
    let out = offline(
        &["bench", "vm-move", "--rounds", "1", "-o", "json"],
        Path::new("/nonexistent/telvirt-guest"),
    );
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(
        e.contains("agent offers no vm runtime (only wasm)")
            && e.contains("/nonexistent/telvirt-guest does not exist"),
        "{e}"
    );
}

#[test]
fn bench_vm_move_prints_one_json_object_with_live_and_cold_moves() {
    let _one = ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner());
    let _qemus = common::QemuGuard("vmm");
    // In the clear (the agent tests move guests sealed, the default): both paths move, with a
    // stream through the guest's NICs.
    let out = offline(
        &[
            "bench",
            "vm-move",
            "--rounds",
            "1",
            "--move-encryption",
            "none",
            "--stream-pps",
            "1000",
            "-o",
            "json",
        ],
        &common::guest_binary(),
    );
    assert!(out.status.success(), "bench vm-move: {}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.lines().count(),
        1,
        "one JSON object on one line: {text}"
    );
    let r: Value = serde_json::from_str(&text).expect("JSON");
    assert_eq!(r["rounds"], 1);
    assert_eq!(r["move_encryption"], "none", "{r}");
    for set in ["live", "cold"] {
        for figure in ["total_p50_ms", "outage_p50_ms"] {
            assert!(r[set][figure].as_f64() > Some(0.0), "{set}.{figure}: {r}");
        }
    }
    assert!(r["live"]["streamed_mib"][0].as_u64() > Some(0), "{r}");
    // The agents' data-plane workers ran during the live move (they carried the stream), and
    // the report says how long they spin idle.
    assert!(r["dataplane_worker_cores"].as_f64() > Some(0.0), "{r}");
    assert!(r["worker_idle_spin_us"].is_u64(), "{r}");
    // The live move's outage is the guest's whole pause (from the source's QEMU beginning to
    // stop it until the destination resumed it), which holds QEMU's own downtime (whole ms,
    // until the source's last byte) when the destination resumed after that byte by their
    // stamps (its part of the pause stated).
    let (paused, downtime) = (
        r["live"]["outage_ms"][0].as_f64().unwrap_or(0.0),
        r["live"]["qemu_downtime_ms"][0]
            .as_f64()
            .unwrap_or(f64::MAX),
    );
    assert!(paused > 0.0 && downtime > 0.0, "{r}");
    if r["pause_phases"]["destination_ms"][0].is_number() {
        assert!(paused + 0.1 >= downtime, "{r}");
    }
    // One clock here: the switch came after the destination resumed the guest (once its agent
    // answered), as the event states.
    let switched = r["switched_after_resume_ms"][0].as_f64();
    assert!(switched.is_some_and(|ms| ms >= 0.0), "{r}");
    assert_eq!(r["switched_after_resume_p50_ms"].as_f64(), switched, "{r}");
    assert_eq!(r["qemu"], "qemu-system-x86_64 on PATH", "{r}");
    let ratio = r["outage_ratio"].as_f64().unwrap_or(0.0);
    let (live, cold) = (
        r["live"]["outage_p50_ms"].as_f64().unwrap_or(0.0),
        r["cold"]["outage_p50_ms"].as_f64().unwrap_or(1.0),
    );
    assert!(
        (ratio - live / cold).abs() < 1e-6,
        "outage ratio is live / cold: {r}"
    );
    // The stream through the guest: a cold move cuts it while a new guest boots, so it lost
    // frames; the live move cut it for less (its guest paused for milliseconds, then the
    // switch and the agents' rewiring).
    assert_eq!(r["stream_pps"], 1000, "{r}");
    let stream_outage = |set: &str| r[set]["stream"]["outage_p50_ms"].as_f64();
    let lost = |set: &str| r[set]["stream"]["moves"][0]["lost_packets"].as_u64();
    assert!(lost("cold") > Some(0), "{r}");
    assert!(lost("live").is_some(), "{r}");
    assert!(
        stream_outage("live") < stream_outage("cold"),
        "the live move cut the stream for less than the cold one: {r}"
    );
    let stream_ratio = r["stream_outage_ratio"].as_f64().unwrap_or(f64::NAN);
    let (live, cold) = (
        stream_outage("live").unwrap_or(0.0),
        stream_outage("cold").unwrap_or(1.0),
    );
    assert!((stream_ratio - live / cold).abs() < 1e-6, "{r}");
    // The live move's cut less its guest's pause, when its pause was stated and it moved at
    // its first try (a guest that arrived broken is moved again: the cut spans both tries,
    // the pause only the last's, and the figure is left out).
    if let Some(paused) = r["live"]["outage_ms"][0]
        .as_f64()
        .filter(|_| r["arrivals_broken"] == 0)
    {
        let beyond = r["live"]["stream"]["beyond_pause_ms"][0].as_f64();
        assert!(
            beyond.is_some_and(|b| (b - (live - paused)).abs() < 1e-6),
            "{r}"
        );
    }
}

#[test]
fn attach_arguments_are_checked_before_any_request() {
    for (args, expected) in [
        (vec!["--kind", "net"], "--tap"),
        (vec!["--kind", "serial"], "--name"),
        (vec!["--kind", "blk"], "--path"),
        (vec!["--kind", "gpu"], "gpu"),
    ] {
        let out = Command::new(BIN)
            .args(["vnf", "attach", "vm1", "--id", "d0"])
            .args(&args)
            .env("TELVIRT_SERVER", "http://127.0.0.1:9")
            .env("TELVIRT_TOKEN", "x")
            .output()
            .expect("run telvirt");
        assert!(!out.status.success(), "{args:?} must be refused");
        let err = stderr(&out);
        assert!(
            err.contains(expected),
            "{args:?}: expected '{expected}' in {err}"
        );
        assert!(
            !err.contains("cannot reach"),
            "{args:?}: refused before any request: {err}"
        );
    }
}

/// A VM whose guest never comes up (its kernel finds no init and waits: it stays Starting
/// until the runtime's 180 s ready timeout) does not hold back a wasm VNF created after it.
#[test]
fn a_vm_that_never_finishes_booting_does_not_delay_a_wasm_vnf() {
    let _one = ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner());
    let vm = format!("vmslow{}", std::process::id());
    let node = Node::new(&vm, common::guest_binary());
    let text = std::fs::read_to_string(descriptor(&node))
        .expect("read the vm descriptor")
        .replace(
            "\"emulator\": \"share\"",
            "\"emulator\": \"share\", \"cmdline\": \"console=ttyS0 panic=0 rdinit=/no-such-init\"",
        );
    assert!(text.contains("no-such-init"), "descriptor has the cmdline");
    let slow = node.dir.path().join("slow.json");
    std::fs::write(&slow, text).expect("write the slow descriptor");
    node.ok(&["vnf", "create", "-f", slow.to_str().expect("utf-8 path")]);
    // QEMU runs and the agent waits for a guest agent that never comes.
    node.wait(&vm, DEADLINE, "Starting with a QEMU", |v| {
        v["phase"] == "Starting" && !common::qemu_pids(&vm).is_empty()
    });

    let vnfs = node.dir.path().join("vnfs");
    let out = Command::new(BIN)
        .args(["wasm", "examples", "--out"])
        .arg(&vnfs)
        .output()
        .expect("run telvirt wasm examples");
    assert!(out.status.success(), "{}", stderr(&out));
    let fw = node.dir.path().join("fw.yaml");
    std::fs::write(
        &fw,
        "apiVersion: telvirt/v1\nkind: Vnf\nmetadata: { name: fwquick }\nspec:\n  runtime: wasm\n  \
         cpu: { policy: shared, group: edge, count: 1 }\n  ports: [in, out]\n  wasm:\n    \
         module: vnfs/firewall.wasm\n    limits: { memory: 16MiB }\n",
    )
    .expect("write the wasm descriptor");
    node.ok(&["vnf", "create", "-f", fw.to_str().expect("utf-8 path")]);
    node.wait_phase("fwquick", "Running", DEADLINE);
    let v = node.show(&vm);
    assert_eq!(v["phase"], "Starting", "the VM is still booting: {v}");

    // Deleting it cancels its boot: QEMU goes well before the 180 s the agent would wait for
    // the guest agent.
    node.ok(&["vnf", "delete", &vm]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !common::qemu_pids(&vm).is_empty() {
        assert!(
            Instant::now() < deadline,
            "QEMU of {vm} still runs 30 s after its delete: the boot was not cancelled"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_until_gone(&node, &vm);
}

/// Polls `vnf show NAME` until the VNF is not found, with a deadline.
fn wait_until_gone(node: &Node, name: &str) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let out = node.cli(&["vnf", "show", name]);
        // 4: not found.
        if out.status.code() == Some(4) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} is never gone: {}",
            stderr(&out)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Frames on link `i` of network `net` (`net show -o json`).
fn link_packets(node: &Node, net: &str, i: usize) -> u64 {
    let out = node.ok(&["net", "show", net, "-o", "json"]);
    let v: Value = serde_json::from_slice(&out.stdout).expect("net show -o json is JSON");
    v["status"]["links"][i]["packets"].as_u64().unwrap_or(0)
}

/// Polls (up to the boot deadline) until link `i` of network `net` carried `at_least` packets;
/// fails saying `what`, with the network as shown then.
fn wait_link_packets(node: &Node, net: &str, i: usize, at_least: u64, what: &str) {
    let deadline = Instant::now() + BOOT_DEADLINE;
    while link_packets(node, net, i) < at_least {
        assert!(
            Instant::now() < deadline,
            "{what}: {}",
            String::from_utf8_lossy(&node.ok(&["net", "show", net]).stdout)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Network c1, generator -> the node's VM (n3, n6) -> sink, once 1,000 frames crossed the VM.
fn chain_through_the_vm(node: &Node) {
    let vm = &node.vm;
    let net = format!(
        "apiVersion: telvirt/v1\nkind: Network\nmetadata: {{ name: c1 }}\nspec:\n  nodes:\n    \
         - {{ name: gen, kind: generator, rate_pps: 2000 }}\n    - {{ name: sink, kind: sink }}\n  \
         links:\n    - gen.out -> {vm}.n3\n    - {vm}.n6 -> sink.in\n"
    );
    let path = node.dir.path().join("c1.yaml");
    std::fs::write(&path, net).expect("write the network");
    node.ok(&["net", "create", "-f", path.to_str().expect("utf-8 path")]);
    wait_link_packets(node, "c1", 1, 1000, "no frames crossed the VM");
}

/// The same NICs on the newer QEMU (`make qemu-next`), whose vhost-user frontend waits for a
/// reply to its early ring enable (ADR 056): frames cross its guest too.
#[test]
fn a_vm_on_the_newer_qemu_forwards_between_its_nics() {
    let _one = ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner());
    let vm = format!("vmnxt{}", std::process::id());
    let Some(next) = common::qemu_next() else {
        return;
    };
    // Its QEMU as the user named (`--qemu-user`), shared by the host's QEMUs.
    let node = Node::on_qemu_as(&vm, common::guest_binary(), next.clone(), "nobody");
    let file = descriptor(&node);
    node.ok(&["vnf", "create", "-f", file.to_str().expect("utf-8 path")]);
    node.wait_phase(&vm, "Running", BOOT_DEADLINE);
    assert_eq!(
        std::fs::read_link(format!("/proc/{}/exe", node.qemu_pid())).expect("QEMU's binary"),
        next.canonicalize().expect("the newer QEMU"),
        "the guest runs in the newer QEMU"
    );
    if is_root() {
        assert_eq!(
            qemu_uids(node.qemu_pid()),
            vec![65534; 4],
            "QEMU runs as nobody"
        );
    }
    chain_through_the_vm(&node);
    let stats: serde_json::Value =
        serde_json::from_slice(&node.ok(&["vnf", "stats", &vm, "-o", "json"]).stdout)
            .expect("JSON");
    assert!(
        stats["nics"][1]["frames_from_guest"].as_u64() >= Some(1000),
        "{stats}"
    );
}

/// A VM's `spec.vm.nics` are vhost-user NICs on the node's data plane: a generator's frames
/// enter the guest on n3, cross the default guest's bridge and leave on n6 for the sink (under
/// TCG, its NICs on INTx interrupts: see `vhost_user_nic_options`), and again after the node
/// was killed and restarted (it connects to the sockets the adopted QEMU serves).
#[test]
fn a_vm_in_a_chain_forwards_between_its_nics() {
    let _one = ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner());
    let vm = format!("vmnic{}", std::process::id());
    let node = Node::new(&vm, common::guest_binary());
    let file = descriptor(&node);
    node.ok(&["vnf", "create", "-f", file.to_str().expect("utf-8 path")]);
    node.wait_phase(&vm, "Running", BOOT_DEADLINE);
    assert!(node.instance("nic-n3.sock").exists(), "n3's socket");
    chain_through_the_vm(&node);
    assert!(link_packets(&node, "c1", 0) >= 1000);
    // The VM's NICs count what crossed them, in spec.vm.nics order. (The guest's own section
    // is left out when its agent does not answer within 2 s, as a busy TCG guest may not.)
    let mut stats = Value::Null;
    common::wait_until("the guest's counters in vnf stats", || {
        stats = serde_json::from_slice(&node.ok(&["vnf", "stats", &vm, "-o", "json"]).stdout)
            .expect("JSON");
        stats["guest"]["nics"].is_array()
    });
    let nics = stats["nics"].as_array().expect("nics");
    assert_eq!(nics.len(), 2, "{stats}");
    assert_eq!(
        (nics[0]["port"].as_str(), nics[1]["port"].as_str()),
        (Some("n3"), Some("n6"))
    );
    assert!(
        nics[0]["connected"] == true && nics[1]["connected"] == true,
        "{stats}"
    );
    assert!(nics[0]["frames_to_guest"].as_u64() >= Some(1000), "{stats}");
    assert!(
        nics[1]["frames_from_guest"].as_u64() >= Some(1000),
        "{stats}"
    );
    // The guest's own kernel counts what its bridge took in (and what it dropped inside).
    let guest_nics = stats["guest"]["nics"]
        .as_array()
        .expect("the guest's counters");
    assert!(
        guest_nics
            .iter()
            .any(|n| n["rx_packets"].as_u64() >= Some(1000) && n["name"] != "lo"),
        "{stats}"
    );
    assert!(stats["guest"]["backlog_dropped"].is_u64(), "{stats}");
    // Its NICs have root queue disciplines, whose drops are read too.
    assert!(
        guest_nics.iter().any(|n| n["qdisc_dropped"].is_u64()),
        "{stats}"
    );
    let mut table = String::new();
    common::wait_until("the guest's counters in the table", || {
        table = String::from_utf8_lossy(&node.ok(&["vnf", "stats", &vm]).stdout).into_owned();
        table.contains("Inside the guest")
    });
    assert!(
        table.contains("FROM GUEST") && table.lines().any(|l| l.starts_with("n6 ")),
        "{table}"
    );
    // It runs on the versioned machine type its QEMU resolved, which the VNF keeps.
    let show = String::from_utf8_lossy(&node.ok(&["vnf", "show", &vm]).stdout).into_owned();
    assert!(
        show.lines()
            .any(|l| l.starts_with("Machine:     pc-i440fx-")
                && l.ends_with("(kept across its restarts and moves)")),
        "{show}"
    );
    // Its kernel's drops are traced, by where and why; its bridge dropped none of the chain's
    // frames (the guest is ready only once both ports forward).
    let drops = &stats["guest"]["kernel_drops"];
    assert!(
        drops["untraced"].is_null() && drops["sites"].is_array(),
        "{stats}"
    );
    let in_bridge: u64 = drops["sites"]
        .as_array()
        .expect("sites")
        .iter()
        .filter(|s| {
            s["function"]
                .as_str()
                .is_some_and(|f| f.ends_with("[bridge]"))
        })
        .filter_map(|s| s["count"].as_u64())
        .sum();
    assert_eq!(in_bridge, 0, "{table}");

    // The node dies and comes back: it adopts the running QEMU and connects to the NICs' sockets
    // QEMU serves again; frames cross the same guest.
    let pid = node.qemu_pid();
    let mut node = node;
    node.kill9();
    node.start();
    assert_eq!(node.qemu_pid(), pid, "the same QEMU");
    let before = link_packets(&node, "c1", 1);
    wait_link_packets(
        &node,
        "c1",
        1,
        before + 1000,
        "no frames crossed the VM after the node's restart",
    );
    node.ok(&["vnf", "delete", &vm]);
    wait_until_gone(&node, &vm);
    let deadline = Instant::now() + DEADLINE;
    while node.instance("nic-n3.sock").exists() {
        assert!(Instant::now() < deadline, "n3's socket outlives the VM");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Ping and iperf3 cross a VM between two namespaces: nsA's veth is a host port linked to the
/// VM's n3, n6 to a host port on nsB's veth, and the default guest bridges its NICs.
#[test]
fn ping_and_iperf3_cross_a_vm_between_namespaces() {
    netns::require_traffic_tools();
    let _one = ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner());
    // nsA (10.203.0.1) <-> a1 [serve in the middle namespace: the VM] b1 <-> nsB (10.203.0.2)
    let t = netns::Topology::new("vw");
    let vm = format!("vmwire{}", std::process::id());
    let node = Node::new_wrapped(
        &vm,
        common::guest_binary(),
        &["ip", "netns", "exec", &t.ns[2]],
    );
    let file = descriptor(&node);
    node.ok(&["vnf", "create", "-f", file.to_str().expect("utf-8 path")]);
    node.wait_phase(&vm, "Running", BOOT_DEADLINE);
    let net = format!(
        "apiVersion: telvirt/v1\nkind: Network\nmetadata: {{ name: wire }}\nspec:\n  links:\n    \
         - host:a1 -> {vm}.n3\n    - {vm}.n6 -> host:b1\n    - host:b1 -> {vm}.n6\n    \
         - {vm}.n3 -> host:a1\n"
    );
    let path = node.dir.path().join("wire.yaml");
    std::fs::write(&path, net).expect("write the network");
    node.ok(&["net", "create", "-f", path.to_str().expect("utf-8 path")]);
    // The guest's bridge may take a moment to forward: ping until it answers.
    let deadline = Instant::now() + DEADLINE;
    loop {
        let out = t
            .exec(0, &["ping", "-c", "1", "-W", "1", "10.203.0.2"])
            .output()
            .expect("run ping");
        if out.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no ping crossed the VM: {}",
            String::from_utf8_lossy(&node.ok(&["net", "show", "wire"]).stdout)
        );
    }
    netns::ping_ok(&t, 0, "10.203.0.2");
    let _srv = netns::iperf3_server(&t, 1, 5201);
    let (bytes, bps) = netns::iperf3_moves_data(&t, 0, "10.203.0.2", 5201);
    eprintln!(
        "iperf3 TCP across the VM (TCG): {bytes} bytes, {:.0} Mbit/s",
        bps / 1e6
    );
    let v: Value = serde_json::from_slice(&node.ok(&["net", "show", "wire", "-o", "json"]).stdout)
        .expect("net show -o json is JSON");
    for l in v["status"]["links"].as_array().expect("links") {
        assert!(
            l["packets"].as_u64() > Some(0),
            "a link carried nothing: {v}"
        );
    }
    node.ok(&["vnf", "delete", &vm]);
    wait_until_gone(&node, &vm);
}

/// `bench vhost` floods the same guest image over vhost-user NICs and over TAP NICs in one
/// run and reports both with their ratio; bad options are refused before anything starts.
#[test]
fn bench_vhost_measures_both_transports_in_one_run() {
    netns::require_root();
    for bad in [
        &["--rounds", "0"][..],
        &["--size", "63"],
        &["--frames", "1"],
    ] {
        let out = Command::new(BIN)
            .args(["bench", "vhost"])
            .args(bad)
            .output()
            .expect("run telvirt");
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {}", stderr(&out));
    }
    let _one = ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner());
    let out = Command::new(BIN)
        .args(["bench", "vhost", "--rounds", "1", "--frames", "2000"])
        .args([
            "--search-steps",
            "1",
            "--trial-ms",
            "300",
            "--accel",
            "tcg",
            "-o",
            "json",
        ])
        .arg("--image-cache")
        .arg(common::shared_image_cache())
        .env("TELVIRT_GUEST_BIN", common::guest_binary())
        .output()
        .expect("run telvirt bench vhost");
    assert!(out.status.success(), "bench vhost: {}", stderr(&out));
    let v: Value = serde_json::from_slice(&out.stdout).expect("bench vhost -o json is JSON");
    for side in ["vhost_user", "tap"] {
        let f = &v[side];
        assert_eq!(f["runs"].as_array().map(Vec::len), Some(1), "{side}: {v}");
        assert!(
            f["mpps_p50"].as_f64() > Some(0.0),
            "{side} carried nothing: {v}"
        );
        assert!(
            f["runs"][0]["search"]["trials"]
                .as_array()
                .is_some_and(|t| !t.is_empty()),
            "{side}: no search trial: {v}"
        );
    }
    let (a, b) = (
        v["vhost_user"]["mpps_p50"].as_f64().unwrap_or(0.0),
        v["tap"]["mpps_p50"].as_f64().unwrap_or(1.0),
    );
    let ratio = v["mpps_ratio"].as_f64().unwrap_or(0.0);
    assert!(
        (ratio - a / b).abs() < 1e-9,
        "ratio {ratio} is not {a} / {b}"
    );
    // Nothing left behind: no TAP of the bench, no QEMU of its guests.
    assert!(!bench_taps_left(), "a TAP of the bench is left");
    assert!(common::qemu_pids("tvb-vhu").is_empty() && common::qemu_pids("tvb-tap").is_empty());

    // Interrupted once its guests boot (SIGTERM or Ctrl-C), it stops them and removes its TAPs.
    let _qemus = (common::QemuGuard("tvb-vhu"), common::QemuGuard("tvb-tap"));
    let mut run = Command::new(BIN)
        .args([
            "bench", "vhost", "--rounds", "3", "--accel", "tcg", "-o", "json",
        ])
        .arg("--image-cache")
        .arg(common::shared_image_cache())
        .env("TELVIRT_GUEST_BIN", common::guest_binary())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run telvirt bench vhost");
    let deadline = Instant::now() + DEADLINE;
    while common::qemu_pids("tvb-vhu").is_empty() {
        assert!(Instant::now() < deadline, "bench vhost started no guest");
        assert!(
            run.try_wait().ok().flatten().is_none(),
            "bench vhost ended early"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // SIGTERM, as `timeout` sends (Ctrl-C's SIGINT ends it the same way).
    // SAFETY: kill has no memory preconditions; the pid is our child's.
    unsafe {
        libc::kill(i32::try_from(run.id()).expect("pid"), libc::SIGTERM);
    }
    let out = run.wait_with_output().expect("bench vhost ends");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("interrupted"), "{}", stderr(&out));
    let deadline = Instant::now() + DEADLINE;
    while !(common::qemu_pids("tvb-vhu").is_empty() && common::qemu_pids("tvb-tap").is_empty()) {
        assert!(
            Instant::now() < deadline,
            "an interrupted bench vhost left its guests"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!bench_taps_left(), "an interrupted bench vhost left a TAP");
}

/// Whether a TAP of `telvirt bench vhost` (named `tvbv...`) exists.
fn bench_taps_left() -> bool {
    let links = Command::new("ip")
        .args(["-o", "link"])
        .output()
        .expect("ip link");
    String::from_utf8_lossy(&links.stdout).contains("tvbv")
}
