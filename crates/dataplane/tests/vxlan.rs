//! VXLAN tunnels on a running patch panel: two endpoints in one process carrying two generator
//! streams across worker threads; a packet analyser (tcpdump) decoding the tunnel traffic; and
//! two hosts as network namespaces, each with a VM namespace behind a host port, where ping
//! crosses the tunnel. The tcpdump and namespace tests need root, tcpdump and iproute2,
//! iputils-ping and ethtool; a missing tool fails the test naming the apt package.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use telvirt_dataplane::afpacket::HostPort;
use telvirt_dataplane::graph::{LinkSpec, PortRef};
use telvirt_dataplane::pool::Pool;
use telvirt_dataplane::traffic::{GenConfig, Generator, LatencySink};
use telvirt_dataplane::vxlan::{TUNNEL_PORT, VXLAN_PORT, VxlanEndpoint, tunnel_node, tunnel_port};

#[path = "support/panels.rs"]
mod panels;
use panels::{panel, wait_for};

#[path = "support/netns.rs"]
mod netns;
use netns::{Guarded, Topology, must, ping_ok, require_root, require_tool};

fn generator(count: Option<u64>, rate: u64, stream: u16) -> Generator {
    Generator::new(
        GenConfig {
            count,
            rate_pps: Some(rate),
            flows: 4,
            sizes: vec![64, 128, 1500],
            ..GenConfig::default()
        },
        2048,
    )
    .unwrap()
    .with_stream(stream)
}

fn links(specs: &[&str]) -> Vec<LinkSpec> {
    specs.iter().map(|s| LinkSpec::parse(s).unwrap()).collect()
}

#[test]
fn two_streams_cross_tunnels_on_different_workers_and_every_frame_is_accounted_for() {
    let pool = Arc::new(Pool::new("vxlan-panel", 4096, 2048).unwrap());
    let mut p = panel(&pool);
    let local: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let ea = VxlanEndpoint::bind(local, Arc::clone(&pool)).unwrap();
    let eb = VxlanEndpoint::bind(local, Arc::clone(&pool)).unwrap();
    const N: u64 = 2000;
    let mut sinks = Vec::new();
    let mut stats = Vec::new();
    // Stream 1: gen1 and tun:a1 on worker 0, tun:b1 and sink1 on worker 1; stream 2 mirrored.
    for (vni, w) in [(1u32, 0usize), (2, 1)] {
        let ta = ea.tunnel(eb.local_addr(), vni).unwrap();
        let tb = eb.tunnel(ea.local_addr(), vni).unwrap();
        stats.push((ta.stats(), tb.stats()));
        let sink = LatencySink::new(32).only_stream(vni as u16);
        sinks.push(sink.state());
        let (a, b) = (format!("a{vni}"), format!("b{vni}"));
        p.add_node(&tunnel_node(&a), &[TUNNEL_PORT], w, Box::new(ta))
            .unwrap();
        p.add_node(&tunnel_node(&b), &[TUNNEL_PORT], 1 - w, Box::new(tb))
            .unwrap();
        p.add_node(&format!("sink{vni}"), &["in"], 1 - w, Box::new(sink))
            .unwrap();
        let g = generator(Some(N), 5_000, vni as u16);
        p.add_node(&format!("gen{vni}"), &["out"], w, Box::new(g))
            .unwrap();
    }
    assert_eq!((ea.tunnel_count(), eb.tunnel_count()), (2, 2));
    p.apply(&links(&[
        "gen1.out -> tun:a1.io",
        "tun:b1.io -> sink1.in",
        "gen2.out -> tun:a2.io",
        "tun:b2.io -> sink2.in",
    ]))
    .unwrap();
    assert_eq!(
        p.current_links()[0].to,
        tunnel_port("a1"),
        "tunnel ports are named tun:NAME.io"
    );
    // Loopback UDP is not lossless: when the machine is busy, the receiving socket's buffer
    // can overflow before a worker reads it. The kernel counts those drops. And a tunnel's
    // queue, filled by the other worker's reads of the shared socket, overflows when its own
    // worker stalls (512 frames: 100 ms at this rate); the tunnel counts those. Every frame
    // must be either delivered or counted in one of the two.
    let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let received = || -> u64 { sinks.iter().map(|st| st.lock().unwrap().received).sum() };
    let kernel_drops = || eb.kernel_drops().unwrap();
    let queue_full = || -> u64 { stats.iter().map(|(_, tb)| load(&tb.rx_queue_full)).sum() };
    wait_for(
        "every frame delivered or counted as a kernel or a full queue's drop",
        60,
        || received() + kernel_drops() + queue_full() == 2 * N,
    );
    let frame_bytes: u64 = (0..N).map(|i| [64, 128, 1500][(i % 3) as usize]).sum();
    let in_kernel = kernel_drops();
    // A stall's worth of drops, not a queue that refuses what it should take.
    assert!(
        queue_full() < N / 4,
        "{} frames found a full queue",
        queue_full()
    );
    let dropped = in_kernel + queue_full();
    if dropped > 0 {
        eprintln!(
            "the kernel dropped {in_kernel} datagrams, full queues {} (busy machine)",
            dropped - in_kernel
        );
    }
    let mut lost = 0;
    for (i, st) in sinks.iter().enumerate() {
        let s = st.lock().unwrap().summary();
        assert_eq!((s.reordered, s.foreign), (0, 0), "sink{}", i + 1);
        let (ta, tb) = &stats[i];
        assert!(s.received > 0, "sink{} received nothing", i + 1);
        assert_eq!(load(&ta.tx_packets), N, "tunnel a{} sent", i + 1);
        assert_eq!(
            load(&tb.rx_packets),
            s.received,
            "tunnel b{} delivered",
            i + 1
        );
        assert_eq!((ta.drops(), tb.drops()), (0, load(&tb.rx_queue_full)));
        if dropped == 0 {
            assert_eq!(s.received, N);
            assert_eq!(load(&ta.tx_bytes), frame_bytes);
            assert_eq!(load(&tb.rx_bytes), frame_bytes);
        }
        lost += N - s.received;
    }
    assert_eq!(lost, dropped);
    for e in [&ea, &eb] {
        let s = e.stats();
        assert_eq!(
            (
                load(&s.unknown_tunnel),
                load(&s.malformed),
                load(&s.pool_mismatch)
            ),
            (0, 0, 0)
        );
        assert_eq!(load(&s.rx_errors), 0);
    }
    assert_eq!(load(&eb.stats().datagrams), 2 * N - in_kernel);
    // Removing a tunnel node unregisters it from its endpoint.
    drop(p.remove_node("tun:b2").unwrap());
    assert_eq!(eb.tunnel_count(), 1);
    p.shutdown();
    assert_eq!((ea.tunnel_count(), eb.tunnel_count()), (0, 0));
    wait_for("all buffers back in the pool", 10, || {
        pool.available() == pool.capacity()
    });
}

/// Start `tcpdump args...` and wait until it says it listens; returns the guarded child and
/// a channel that yields its remaining stderr when it exits.
fn start_tcpdump(mut cmd: Command) -> (Guarded, mpsc::Receiver<String>) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run tcpdump: {e}"));
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut r = BufReader::new(stderr);
        let mut all = String::new();
        let mut line = String::new();
        while r.read_line(&mut line).unwrap_or(0) > 0 {
            if line.contains("listening on") {
                let _ = tx.send(String::new());
            }
            all.push_str(&line);
            line.clear();
        }
        let _ = tx.send(all);
    });
    let first = rx.recv_timeout(Duration::from_secs(10));
    assert_eq!(
        first.as_deref(),
        Ok(""),
        "tcpdump did not start listening: {first:?}"
    );
    (Guarded(child), rx)
}

/// Wait (with a deadline) until tcpdump exits after capturing its `-c` packets; its stdout.
fn tcpdump_output(mut g: Guarded, stderr: mpsc::Receiver<String>) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = g.0.try_wait().unwrap() {
            let mut out = String::new();
            g.0.stdout.take().unwrap().read_to_string(&mut out).unwrap();
            let err = stderr
                .recv_timeout(Duration::from_secs(5))
                .unwrap_or_default();
            assert!(status.success(), "tcpdump failed: {err}\n{out}");
            return out;
        }
        assert!(
            Instant::now() < deadline,
            "tcpdump captured too few packets in time"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn tcpdump_decodes_tunnel_traffic_as_vxlan_with_the_vni() {
    require_root();
    require_tool("tcpdump", "tcpdump");
    let pool = Arc::new(Pool::new("vxlan-tcpdump", 1024, 2048).unwrap());
    let mut p = panel(&pool);
    let local: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let ea = VxlanEndpoint::bind(local, Arc::clone(&pool)).unwrap();
    let eb = VxlanEndpoint::bind(local, Arc::clone(&pool)).unwrap();
    let port_b = eb.local_addr().port().to_string();
    // Not the VXLAN port (tests share the host's loopback): tell tcpdump to decode as VXLAN.
    let mut cmd = Command::new("tcpdump");
    cmd.args(["-i", "lo", "-nn", "-l", "-c", "4", "-T", "vxlan"])
        .args(["udp", "and", "dst", "port", &port_b]);
    let (td, stderr) = start_tcpdump(cmd);
    let ta = ea.tunnel(eb.local_addr(), 4242).unwrap();
    let tb = eb.tunnel(ea.local_addr(), 4242).unwrap();
    let sink = LatencySink::new(32);
    let st = sink.state();
    p.add_node("tun:a", &[TUNNEL_PORT], 0, Box::new(ta))
        .unwrap();
    p.add_node("tun:b", &[TUNNEL_PORT], 1, Box::new(tb))
        .unwrap();
    p.add_node("gen", &["out"], 0, Box::new(generator(None, 200, 0)))
        .unwrap();
    p.add_node("sink", &["in"], 1, Box::new(sink)).unwrap();
    p.apply(&links(&["gen.out -> tun:a.io", "tun:b.io -> sink.in"]))
        .unwrap();
    let out = tcpdump_output(td, stderr);
    p.shutdown();
    assert!(st.lock().unwrap().received > 0, "no frame crossed");
    // One line per captured datagram starts with the outer header (`-T vxlan` also decodes the
    // inner UDP packet as VXLAN, on the next line: that is tcpdump being told, not the tunnel).
    let outer = format!("127.0.0.1.{port_b}: VXLAN, flags [I] (0x08), vni 4242");
    let outer_lines = out.lines().filter(|l| l.contains(&outer)).count();
    assert_eq!(outer_lines, 4, "{out}");
    // The inner frame is decoded too: the generator's UDP flow 10.0.0.1 -> 10.0.1.1:9.
    assert!(
        out.contains("10.0.0.1.102") && out.contains("> 10.0.1.1.9:"),
        "{out}"
    );
}

/// Two hosts (namespaces hA, hB) joined by an underlay veth pair, each with a VM namespace
/// (vA, vB) behind a veth pair whose host side is a host port on that host's data plane.
struct Hosts {
    t: Topology,
}

impl Hosts {
    const UNDERLAY_A: &'static str = "10.207.0.1";
    const UNDERLAY_B: &'static str = "10.207.0.2";
    const VM_A: &'static str = "192.168.207.1";
    const VM_B: &'static str = "192.168.207.2";

    fn new() -> Self {
        let id = std::process::id() % 100_000;
        let t = Topology {
            ns: ["hA", "hB", "vA", "vB"]
                .iter()
                .map(|s| format!("tvvx{id}{s}"))
                .collect(),
        };
        for ns in &t.ns {
            must(&["ip", "netns", "add", ns]);
            must(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        let (ha, hb, va, vb) = (&t.ns[0], &t.ns[1], &t.ns[2], &t.ns[3]);
        // Underlay: hA u0 <-> hB u0.
        must(&[
            "ip", "-n", ha, "link", "add", "u0", "type", "veth", "peer", "name", "u0", "netns", hb,
        ]);
        for (ns, addr) in [(ha, Self::UNDERLAY_A), (hb, Self::UNDERLAY_B)] {
            must(&[
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "u0",
            ]);
            must(&["ip", "-n", ns, "link", "set", "u0", "up"]);
        }
        // VM links: host side h0 (a host port), VM side e0. Offloads off where frames are
        // read with AF_PACKET (the frames must be complete).
        for (host, vm, addr) in [(ha, va, Self::VM_A), (hb, vb, Self::VM_B)] {
            must(&[
                "ip", "-n", host, "link", "add", "h0", "type", "veth", "peer", "name", "e0",
                "netns", vm,
            ]);
            must(&[
                "ip",
                "-n",
                vm,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "e0",
            ]);
            for (ns, ifname) in [(host, "h0"), (vm, "e0")] {
                must(&[
                    "ip", "netns", "exec", ns, "ethtool", "-K", ifname, "tx", "off", "rx", "off",
                    "tso", "off", "gso", "off", "gro", "off",
                ]);
                must(&["ip", "-n", ns, "link", "set", ifname, "up"]);
            }
        }
        Hosts { t }
    }

    fn path(&self, i: usize) -> String {
        format!("/run/netns/{}", self.t.ns[i])
    }
}

#[test]
fn ping_between_vms_on_two_hosts_crosses_the_tunnel_and_tcpdump_sees_vxlan() {
    require_root();
    for (tool, pkg) in [
        ("ip", "iproute2"),
        ("ping", "iputils-ping"),
        ("ethtool", "ethtool"),
        ("tcpdump", "tcpdump"),
    ] {
        require_tool(tool, pkg);
    }
    let h = Hosts::new();
    let pool = Arc::new(Pool::new("vxlan-hosts", 2048, 2048).unwrap());
    let mut p = panel(&pool);
    let (ha, hb) = (h.path(0), h.path(1));
    let at = |ip: &str| SocketAddr::new(ip.parse().unwrap(), VXLAN_PORT);
    // Each host's data plane: its endpoint on the underlay address, the IANA port.
    let ea = VxlanEndpoint::bind_in(at(Hosts::UNDERLAY_A), Some(ha.as_ref()), Arc::clone(&pool))
        .unwrap();
    let eb = VxlanEndpoint::bind_in(at(Hosts::UNDERLAY_B), Some(hb.as_ref()), Arc::clone(&pool))
        .unwrap();
    let ta = ea.tunnel(at(Hosts::UNDERLAY_B), 100).unwrap();
    let tb = eb.tunnel(at(Hosts::UNDERLAY_A), 100).unwrap();
    let (sa, sb) = (ta.stats(), tb.stats());
    p.add_node("tun:ab", &[TUNNEL_PORT], 0, Box::new(ta))
        .unwrap();
    p.add_node("tun:ba", &[TUNNEL_PORT], 1, Box::new(tb))
        .unwrap();
    let pa = HostPort::open_in("h0", Some(ha.as_ref())).unwrap();
    let pb = HostPort::open_in("h0", Some(hb.as_ref())).unwrap();
    p.add_node("hostA", &[""], 0, Box::new(pa)).unwrap();
    p.add_node("hostB", &[""], 1, Box::new(pb)).unwrap();
    let hosta = PortRef::new("hostA", "");
    let hostb = PortRef::new("hostB", "");
    p.apply(&[
        LinkSpec::new(hosta.clone(), tunnel_port("ab")),
        LinkSpec::new(tunnel_port("ab"), hosta),
        LinkSpec::new(hostb.clone(), tunnel_port("ba")),
        LinkSpec::new(tunnel_port("ba"), hostb),
    ])
    .unwrap();

    // tcpdump on host B's underlay decodes port 4789 as VXLAN without being told.
    let mut cmd = Command::new("ip");
    cmd.args([
        "netns", "exec", &h.t.ns[1], "tcpdump", "-i", "u0", "-nn", "-l", "-c", "6",
    ])
    .args(["udp", "and", "dst", "port", "4789"]);
    let (td, stderr) = start_tcpdump(cmd);

    // VM A pings VM B through: host port -> tunnel -> underlay -> tunnel -> host port.
    ping_ok(&h.t, 2, Hosts::VM_B);
    let out = tcpdump_output(td, stderr);
    // Six datagrams: ARP request and reply, then echo requests and replies, each a VXLAN
    // header with VNI 100 and the decoded inner frame.
    let vxlan_lines = out
        .lines()
        .filter(|l| l.contains("VXLAN, flags [I] (0x08), vni 100"))
        .count();
    assert_eq!(vxlan_lines, 6, "{out}");
    assert!(
        out.contains(&format!(
            "{} > {}: ICMP echo request",
            Hosts::VM_A,
            Hosts::VM_B
        )),
        "inner echo request not decoded: {out}"
    );
    // Full-size frames (1514 bytes inner) cross too; the underlay fragments the datagrams.
    let big =
        h.t.exec(
            2,
            &[
                "ping",
                "-c",
                "2",
                "-s",
                "1472",
                "-M",
                "do",
                "-W",
                "2",
                Hosts::VM_B,
            ],
        )
        .output()
        .unwrap();
    assert!(
        big.status.success(),
        "1500-byte ping failed: {}",
        String::from_utf8_lossy(&big.stdout)
    );
    let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
    assert!(load(&sa.tx_packets) >= 5 && load(&sb.rx_packets) >= 5);
    assert!(load(&sb.tx_packets) >= 5 && load(&sa.rx_packets) >= 5);
    assert_eq!((sa.drops(), sb.drops()), (0, 0));
    p.shutdown();
}
