//! Real traffic: ping and iperf3 from one network namespace to another through a telvirt chain
//! (host port → 5-tuple firewall → host port) attached to veth pairs, and a firewall rule that
//! really blocks. Needs root and iproute2, iputils-ping, iperf3 and ethtool; a missing tool
//! fails the test with the apt package to install. All traffic stays inside namespaces this
//! test creates (and removes, also on failure).

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use telvirt_dataplane::afpacket::HostPort;
use telvirt_dataplane::firewall::{Action, Firewall, Rule};
use telvirt_dataplane::graph::LinkSpec;
use telvirt_dataplane::node::ProcessorNode;
use telvirt_dataplane::panel::PatchPanel;
use telvirt_dataplane::pool::Pool;
use telvirt_dataplane::traffic::Generator;
use telvirt_dataplane::worker::{WorkerConfig, allowed_cores};

fn require_tool(tool: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(found, "`{tool}` is missing: apt-get install -y {package}");
}

fn run(args: &[&str]) -> std::process::Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"))
}

fn must(args: &[&str]) {
    let out = run(args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Namespaces and veth pairs that exist only while this value lives.
struct Topology {
    ns: Vec<String>,
}

impl Topology {
    /// nsA(a0 10.203.0.1) <-veth-> mid(a1)   mid(b1) <-veth-> nsB(b0 10.203.0.2)
    fn new(tag: &str) -> Self {
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
            must(&[
                "ip",
                "-n",
                m,
                "link",
                "add",
                &format!("{side}1"),
                "type",
                "veth",
                "peer",
                "name",
                &format!("{side}0"),
                "netns",
                ns,
            ]);
            must(&[
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                addr,
                "dev",
                &format!("{side}0"),
            ]);
            for (nsx, ifx) in [(ns, format!("{side}0")), (m, format!("{side}1"))] {
                must(&[
                    "ip", "netns", "exec", nsx, "ethtool", "-K", &ifx, "tx", "off", "rx", "off",
                    "tso", "off", "gso", "off", "gro", "off",
                ]);
                must(&["ip", "-n", nsx, "link", "set", &ifx, "up"]);
            }
            must(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        t
    }

    fn exec(&self, ns: usize, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns[ns]]).args(args);
        c
    }
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
struct Guarded(Child);

impl Drop for Guarded {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start a one-shot iperf3 server in namespace `ns` and wait until it listens.
fn iperf3_server(t: &Topology, ns: usize, port: u16) -> Guarded {
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

fn wait_port_open(t: &Topology, ns: usize, port: u16) {
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

#[test]
fn ping_and_iperf3_cross_a_firewall_chain_and_a_rule_blocks() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test needs root (network namespaces)"
    );
    for (tool, pkg) in [
        ("ip", "iproute2"),
        ("ss", "iproute2"),
        ("ping", "iputils-ping"),
        ("iperf3", "iperf3"),
        ("ethtool", "ethtool"),
    ] {
        require_tool(tool, pkg);
    }
    let t = Topology::new("fw");
    let mid = format!("/run/netns/{}", t.ns[2]);
    let pool = Arc::new(Pool::new("netns", 4096, 2048).unwrap());
    let core = *allowed_cores().unwrap().last().unwrap();
    let mut panel = PatchPanel::new(
        Arc::clone(&pool),
        vec![WorkerConfig::new("io", Some(core))],
        1024,
    )
    .unwrap();
    let pa = HostPort::open_in("a1", Some(mid.as_ref())).unwrap();
    let pb = HostPort::open_in("b1", Some(mid.as_ref())).unwrap();
    let (sa, sb) = (pa.stats(), pb.stats());
    let fw = Firewall::new(
        vec![Rule::parse("deny proto=tcp dport=5202").unwrap()],
        Action::Allow,
    );
    let fwc = fw.counters();
    panel.add_node("host:a1", &[""], 0, Box::new(pa)).unwrap();
    panel.add_node("host:b1", &[""], 0, Box::new(pb)).unwrap();
    panel
        .add_node("fw1", &["a", "b"], 0, Box::new(ProcessorNode::new(fw, 32)))
        .unwrap();
    let links: Vec<LinkSpec> = [
        "host:a1 -> fw1.a",
        "fw1.b -> host:b1",
        "host:b1 -> fw1.b",
        "fw1.a -> host:a1",
    ]
    .iter()
    .map(|s| LinkSpec::parse(s).unwrap())
    .collect();
    panel.apply(&links).unwrap();

    // ping crosses the chain both ways.
    let out = t
        .exec(
            0,
            &["ping", "-c", "3", "-i", "0.2", "-W", "2", "10.203.0.2"],
        )
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ping failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(sa.rx.load(Ordering::Relaxed) >= 3 && sb.tx.load(Ordering::Relaxed) >= 3);
    assert!(sb.rx.load(Ordering::Relaxed) >= 3 && sa.tx.load(Ordering::Relaxed) >= 3);

    // iperf3 TCP on an allowed port carries data.
    let _srv = iperf3_server(&t, 1, 5201);
    let out = t
        .exec(
            0,
            &["iperf3", "-c", "10.203.0.2", "-p", "5201", "-t", "1", "-J"],
        )
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "iperf3 through the chain failed: {text}"
    );
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let bytes = v["end"]["sum_received"]["bytes"].as_u64().unwrap();
    assert!(bytes > 0, "iperf3 moved no data: {text}");
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0);
    eprintln!("iperf3 TCP through the chain: {:.0} Mbit/s", bps / 1e6);

    // The rule blocks TCP to port 5202: the connection attempt fails and denials are counted.
    let denied_before = fwc.denied.load(Ordering::Relaxed);
    let _srv2 = iperf3_server(&t, 1, 5202);
    let out = t
        .exec(
            0,
            &[
                "iperf3",
                "-c",
                "10.203.0.2",
                "-p",
                "5202",
                "-t",
                "1",
                "--connect-timeout",
                "1500",
            ],
        )
        .output()
        .unwrap();
    assert!(!out.status.success(), "iperf3 to a denied port succeeded");
    assert!(
        fwc.denied.load(Ordering::Relaxed) > denied_before,
        "no denial counted"
    );

    let status = panel.status();
    assert!(
        status.iter().all(|s| s.counters.packets > 0),
        "{}",
        panel.render()
    );
    panel.shutdown();
}

/// Open a TAP device `name` inside the namespace at `ns_path` (a helper thread enters the
/// namespace; the device lives there as long as the returned fd is open).
fn open_tap(ns_path: &str, name: &str) -> std::fs::File {
    let ns_path = ns_path.to_string();
    let name = name.to_string();
    std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        let ns = std::fs::File::open(&ns_path).unwrap();
        // SAFETY: valid namespace fd; only this helper thread changes namespace.
        assert_eq!(
            unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) },
            0
        );
        let tun = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .expect("/dev/net/tun must exist (kernel module tun)");
        // SAFETY: an all-zero ifreq is valid; we set the name and the flags.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, s) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
            *d = s as libc::c_char;
        }
        ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
        // SAFETY: TUNSETIFF takes a pointer to a valid ifreq.
        let rc = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut ifr) };
        assert_eq!(rc, 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
        tun
    })
    .join()
    .unwrap()
}

#[test]
fn tap_host_port_receives_and_transmits_frames() {
    use std::io::{Read, Write};
    use telvirt_dataplane::packet::{read_test_frame, write_test_frame};
    use telvirt_dataplane::traffic::LatencySink;
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test needs root (network namespaces)"
    );
    require_tool("ip", "iproute2");
    let ns = format!("tvtap{}", std::process::id() % 100_000);
    must(&["ip", "netns", "add", &ns]);
    let t = Topology {
        ns: vec![ns.clone()],
    };
    let path = format!("/run/netns/{ns}");
    let mut tap = open_tap(&path, "tap0");
    must(&["ip", "-n", &ns, "link", "set", "tap0", "up"]);
    let pool = Arc::new(Pool::new("tap", 1024, 2048).unwrap());
    let core = *allowed_cores().unwrap().last().unwrap();
    let mut panel = PatchPanel::new(
        Arc::clone(&pool),
        vec![WorkerConfig::new("tap", Some(core))],
        256,
    )
    .unwrap();
    let port = HostPort::open_in("tap0", Some(path.as_ref())).unwrap();
    let stats = port.stats();
    let sink = LatencySink::new(32);
    let st = sink.state();
    panel
        .add_node("host:tap0", &[""], 0, Box::new(port))
        .unwrap();
    panel.add_node("sink", &["in"], 0, Box::new(sink)).unwrap();
    panel
        .add_node(
            "gen",
            &["out"],
            0,
            Box::new(
                Generator::new(
                    telvirt_dataplane::traffic::GenConfig {
                        count: Some(5),
                        rate_pps: Some(1000),
                        ..Default::default()
                    },
                    2048,
                )
                .unwrap(),
            ),
        )
        .unwrap();
    let l = ["host:tap0 -> sink.in", "gen.out -> host:tap0"].map(|s| LinkSpec::parse(s).unwrap());
    panel.apply(&l).unwrap();
    // Frames written to the TAP fd arrive on the interface: the host port picks them up.
    let mut frame = [0u8; 128];
    for seq in 0..10u64 {
        let n = write_test_frame(&mut frame, 100, 0, seq, 0);
        tap.write_all(&frame[..n]).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while st.lock().unwrap().received < 10 {
        assert!(
            Instant::now() < deadline,
            "TAP frames did not reach the sink"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // Frames the graph sends to host:tap0 come out of the TAP fd.
    let mut seqs = Vec::new();
    let mut buf = [0u8; 2048];
    {
        use std::os::fd::AsRawFd;
        // SAFETY: valid fd; F_GETFL/F_SETFL with plain flags, so a read cannot hang the test.
        unsafe {
            let fl = libc::fcntl(tap.as_raw_fd(), libc::F_GETFL);
            libc::fcntl(tap.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
        }
    }
    while seqs.len() < 5 {
        assert!(
            Instant::now() < deadline,
            "generator frames did not leave the TAP"
        );
        match tap.read(&mut buf) {
            Ok(n) => {
                if let Some((seq, _)) = read_test_frame(&buf[..n]) {
                    seqs.push(seq);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("reading the TAP: {e}"),
        }
    }
    assert_eq!(seqs, vec![0, 1, 2, 3, 4]);
    // The counters are bumped after the syscalls return: poll them.
    while stats.tx.load(Ordering::Relaxed) < 5 || stats.rx.load(Ordering::Relaxed) < 10 {
        assert!(
            Instant::now() < deadline,
            "host port counters did not reach 5 tx / 10 rx"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    panel.shutdown();
    drop(tap);
    drop(t);
}
