//! Test hosts in network namespaces for the real-traffic tests of the data plane and of
//! `telvirt serve` (included by path from both crates' tests): two namespaces joined through a
//! middle one by veth pairs, and the tools that send real traffic across. Everything it creates
//! is deleted on drop, also when a test fails. Needs root and iproute2, iputils-ping, iperf3 and
//! ethtool; a missing tool fails the test naming the apt package.

#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Fails the test unless it runs as root (network namespaces need it).
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test needs root (network namespaces)"
    );
}

/// Root and every tool the traffic tests run.
pub fn require_traffic_tools() {
    require_root();
    for (tool, pkg) in [
        ("ip", "iproute2"),
        ("ss", "iproute2"),
        ("ping", "iputils-ping"),
        ("iperf3", "iperf3"),
        ("ethtool", "ethtool"),
    ] {
        require_tool(tool, pkg);
    }
}

pub fn require_tool(tool: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(found, "`{tool}` is missing: apt-get install -y {package}");
}

pub fn run(args: &[&str]) -> std::process::Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"))
}

pub fn must(args: &[&str]) {
    let out = run(args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Namespaces and veth pairs that exist only while this value lives.
pub struct Topology {
    pub ns: Vec<String>,
}

impl Topology {
    /// nsA(a0 10.203.0.1) <-veth-> mid(a1)   mid(b1) <-veth-> nsB(b0 10.203.0.2)
    pub fn new(tag: &str) -> Self {
        let id = std::process::id() % 100_000;
        let n = |s: &str| format!("tv{tag}{id}{s}");
        let t = Topology {
            ns: vec![n("A"), n("B"), n("M")],
        };
        for ns in &t.ns {
            must(&["ip", "netns", "add", ns]);
        }
        let (a, b, m) = (&t.ns[0], &t.ns[1], &t.ns[2]);
        for (side, ns, addr) in [("a", a, "10.203.0.1/24"), ("b", b, "10.203.0.2/24")] {
            veth(m, &format!("{side}1"), ns, &format!("{side}0"), addr);
        }
        // A program in the middle (e.g. `telvirt serve`) may listen on loopback.
        must(&["ip", "-n", m, "link", "set", "lo", "up"]);
        t
    }

    pub fn exec(&self, ns: usize, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns[ns]]).args(args);
        c
    }
}

/// A veth pair: `outer_if` in namespace `outer`, `inner_if` in `inner` with address `addr`;
/// offloads off on both ends (the data plane handles whole frames with finished checksums),
/// both up, and `inner`'s loopback up.
pub fn veth(outer: &str, outer_if: &str, inner: &str, inner_if: &str, addr: &str) {
    must(&[
        "ip", "-n", outer, "link", "add", outer_if, "type", "veth", "peer", "name", inner_if,
        "netns", inner,
    ]);
    must(&["ip", "-n", inner, "addr", "add", addr, "dev", inner_if]);
    for (ns, ifname) in [(inner, inner_if), (outer, outer_if)] {
        must(&[
            "ip", "netns", "exec", ns, "ethtool", "-K", ifname, "tx", "off", "rx", "off", "tso",
            "off", "gso", "off", "gro", "off",
        ]);
        must(&["ip", "-n", ns, "link", "set", ifname, "up"]);
    }
    must(&["ip", "-n", inner, "link", "set", "lo", "up"]);
}

impl Drop for Topology {
    fn drop(&mut self) {
        // Deleting a namespace deletes the veth ends inside it (and so their peers).
        for ns in &self.ns {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// A child process killed (by its own pid) when dropped.
pub struct Guarded(pub Child);

impl Drop for Guarded {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start a one-shot iperf3 server in namespace `ns` and wait until it listens.
pub fn iperf3_server(t: &Topology, ns: usize, port: u16) -> Guarded {
    let p = port.to_string();
    let child = t
        .exec(ns, &["iperf3", "-s", "-1", "-p", &p])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let g = Guarded(child);
    wait_port_open(t, ns, port);
    g
}

pub fn wait_port_open(t: &Topology, ns: usize, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = t
            .exec(ns, &["ss", "-ltnH", &format!("sport = :{port}")])
            .output()
            .unwrap();
        if !out.stdout.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "iperf3 server on port {port} did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `ping -c 3` from namespace `ns` to `addr`; panics with ping's output unless all came back.
pub fn ping_ok(t: &Topology, ns: usize, addr: &str) {
    let out = t
        .exec(ns, &["ping", "-c", "3", "-i", "0.2", "-W", "2", addr])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ping {addr} failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// A one-second iperf3 TCP run from namespace `ns` to `addr:port` (a server must listen there);
/// panics unless it moved data. Returns the bytes received and the bit rate.
pub fn iperf3_moves_data(t: &Topology, ns: usize, addr: &str, port: u16) -> (u64, f64) {
    let p = port.to_string();
    let out = t
        .exec(ns, &["iperf3", "-c", addr, "-p", &p, "-t", "1", "-J"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "iperf3 to {addr}:{port} failed: {text}"
    );
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let bytes = v["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0);
    assert!(bytes > 0, "iperf3 moved no data: {text}");
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0);
    (bytes, bps)
}

/// An iperf3 connection from namespace `ns` to `addr:port` must fail (within 1.5 s).
pub fn iperf3_is_blocked(t: &Topology, ns: usize, addr: &str, port: u16) {
    let p = port.to_string();
    let out = t
        .exec(
            ns,
            &[
                "iperf3",
                "-c",
                addr,
                "-p",
                &p,
                "-t",
                "1",
                "--connect-timeout",
                "1500",
            ],
        )
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "iperf3 to {addr}:{port} succeeded but should be blocked"
    );
}
