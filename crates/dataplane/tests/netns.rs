//! Real traffic: ping and iperf3 from one network namespace to another through a telvirt chain
//! (host port → 5-tuple firewall → host port) attached to veth pairs, and a firewall rule that
//! really blocks. Needs root and iproute2, iputils-ping, iperf3 and ethtool; a missing tool
//! fails the test with the apt package to install. All traffic stays inside namespaces this
//! test creates (and removes, also on failure).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use telvirt_dataplane::afpacket::{HostPort, RxMode};
use telvirt_dataplane::firewall::{Action, Firewall, Rule};
use telvirt_dataplane::graph::LinkSpec;
use telvirt_dataplane::node::ProcessorNode;
use telvirt_dataplane::panel::PatchPanel;
use telvirt_dataplane::pool::Pool;
use telvirt_dataplane::traffic::Generator;
use telvirt_dataplane::worker::{WorkerConfig, allowed_cores};

#[path = "support/netns.rs"]
mod netns;
use netns::{
    Topology, iperf3_is_blocked, iperf3_moves_data, iperf3_server, must, ping_ok, require_root,
    require_tool, require_traffic_tools,
};

#[test]
fn ping_and_iperf3_cross_a_firewall_chain_and_a_rule_blocks() {
    require_traffic_tools();
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
    // `TELVIRT_TEST_RX=recvmmsg` receives with system calls, `tpacket_v3` with the packet
    // ring, `af_xdp` with a copy-mode AF_XDP socket.
    let mode = match std::env::var("TELVIRT_TEST_RX").as_deref() {
        Ok("recvmmsg") => RxMode::Syscalls,
        Ok("tpacket_v3") => RxMode::Packet,
        Ok("af_xdp") => RxMode::Xdp,
        _ => RxMode::Auto,
    };
    let pa = HostPort::open_with("a1", Some(mid.as_ref()), mode).unwrap();
    let pb = HostPort::open_with("b1", Some(mid.as_ref()), mode).unwrap();
    match mode {
        // veth has native XDP but no zero-copy: the packet ring is chosen, saying why.
        RxMode::Auto => {
            assert_eq!(pa.rx_mode(), "tpacket_v3");
            let why = pa.xdp_refused().expect("why AF_XDP was not used");
            assert!(why.contains("a1 has no zero-copy AF_XDP"), "{why}");
            // Known from the driver's XDP features, before any program was loaded.
            assert!(why.contains("XDP features: basic, redirect"), "{why}");
        }
        RxMode::Xdp => assert_eq!((pa.rx_mode(), pa.xdp_refused()), ("af_xdp_copy", None)),
        RxMode::Packet => assert_eq!(pa.rx_mode(), "tpacket_v3"),
        RxMode::Syscalls => assert_eq!(pa.rx_mode(), "recvmmsg"),
    }
    println!("host ports receive with {}", pa.rx_mode());
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
    ping_ok(&t, 0, "10.203.0.2");
    // The counters are bumped after the syscalls return (a reply may arrive first): poll them.
    let deadline = Instant::now() + Duration::from_secs(10);
    let at_least_3 = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed) >= 3;
    while !(at_least_3(&sa.rx) && at_least_3(&sb.tx) && at_least_3(&sb.rx) && at_least_3(&sa.tx)) {
        assert!(
            Instant::now() < deadline,
            "host port counters below 3: {sa:?} {sb:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }

    // iperf3 TCP on an allowed port carries data.
    let _srv = iperf3_server(&t, 1, 5201);
    let (_, bps) = iperf3_moves_data(&t, 0, "10.203.0.2", 5201);
    eprintln!("iperf3 TCP through the chain: {:.0} Mbit/s", bps / 1e6);

    // The rule blocks TCP to port 5202: the connection attempt fails and denials are counted.
    let denied_before = fwc.denied.load(Ordering::Relaxed);
    let _srv2 = iperf3_server(&t, 1, 5202);
    iperf3_is_blocked(&t, 0, "10.203.0.2", 5202);
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
    require_root();
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

#[test]
fn a_flood_between_two_host_interfaces_counts_what_crossed() {
    use telvirt_dataplane::bench::{HostEnd, flood, search_flood};
    require_root();
    require_tool("ip", "iproute2");
    require_tool("ethtool", "ethtool");
    // a0 (in nsA) and a1 (in the middle) are the two ends of one veth: what leaves one
    // arrives on the other, nothing else in between.
    let t = Topology::new("fl");
    let end = |ns: &str, ifname: &str| HostEnd {
        netns: Some(format!("/run/netns/{ns}").into()),
        ifname: ifname.into(),
    };
    let (tx, rx) = (end(&t.ns[0], "a0"), end(&t.ns[2], "a1"));
    let mut calls = 0;
    let run = flood(&tx, &rx, 64, Some(50_000), 5_000, &mut |_, _| calls += 1).unwrap();
    assert_eq!(run.sent, 5_000);
    // Some crossed, none invented (how many a busy host's veth drops is the benchmark's).
    assert!(
        run.received > 0 && run.received <= 5_000,
        "a bare veth at 50 kpps: {run:?}"
    );
    assert!(run.mpps > 0.0 && run.offered_mpps > 0.0, "{run:?}");
    assert!(calls > 0, "no progress reported");
    // Nothing joins a0 to b0 (different veths): every frame is lost, and the searches say 0.
    let lost = flood(
        &tx,
        &end(&t.ns[1], "b0"),
        64,
        Some(50_000),
        1_000,
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(lost.received, 0, "{lost:?}");
    let s = search_flood(&tx, &end(&t.ns[1], "b0"), 64, 2, 20, 100_000).unwrap();
    assert_eq!((s.ndr_pps, s.pdr_pps), (0, 0), "{s:?}");
    assert_eq!(s.trials.len(), 4);
    // A bad interface is an error naming it, not a run that counts nothing.
    let e = flood(
        &end(&t.ns[0], "tvnosuch0"),
        &rx,
        64,
        None,
        10,
        &mut |_, _| {},
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("tvnosuch0"), "{e}");
}

#[test]
fn a_frame_larger_than_a_pool_buffer_is_counted_and_the_ring_goes_on() {
    // An MTU of 4,000 is too large for XDP on veth: the port falls back to the packet ring
    // and says why. At 3,400 AF_XDP takes the interface.
    big_frame_through("4000", "tpacket_v3");
    big_frame_through("3400", "af_xdp_copy");
}

fn big_frame_through(mtu: &str, socket: &str) {
    require_traffic_tools();
    let t = Topology::new("big");
    let (a, mid) = (&t.ns[0], &t.ns[2]);
    for (ns, ifname) in [(a, "a0"), (mid, "a1")] {
        must(&["ip", "-n", ns, "link", "set", ifname, "mtu", mtu]);
    }
    let pool = Arc::new(Pool::new("big", 1024, 2048).unwrap());
    let mut panel =
        PatchPanel::new(Arc::clone(&pool), vec![WorkerConfig::new("io", None)], 256).unwrap();
    let mode = RxMode::Xdp;
    let port = HostPort::open_with("a1", Some(format!("/run/netns/{mid}").as_ref()), mode).unwrap();
    assert_eq!(port.rx_mode(), socket, "MTU {mtu}");
    if socket == "tpacket_v3" {
        let why = port.xdp_refused().expect("why AF_XDP was not used");
        assert!(why.contains("attach XDP (driver mode) to a1"), "{why}");
    }
    let stats = port.stats();
    panel.add_node("host:a1", &[""], 0, Box::new(port)).unwrap();
    // A 3,042-byte frame (ICMP echo of 3,000 bytes) to an address with a fixed MAC: no ARP.
    must(&[
        "ip",
        "-n",
        a,
        "neigh",
        "add",
        "10.203.0.99",
        "lladdr",
        "02:00:00:00:00:99",
        "dev",
        "a0",
    ]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while stats.rx_truncated.load(Ordering::Relaxed) == 0 {
        assert!(Instant::now() < deadline, "the big frame was not counted");
        let _ = t
            .exec(
                0,
                &["ping", "-c", "1", "-s", "3000", "-W", "1", "10.203.0.99"],
            )
            .output();
    }
    // The ring goes on past it: an ordinary frame is received.
    let before = stats.rx.load(Ordering::Relaxed);
    while stats.rx.load(Ordering::Relaxed) == before {
        assert!(
            Instant::now() < deadline,
            "nothing received after the big frame"
        );
        let _ = t
            .exec(
                0,
                &["ping", "-c", "1", "-s", "100", "-W", "1", "10.203.0.99"],
            )
            .output();
    }
    panel.shutdown();
}

#[test]
fn an_af_xdp_port_counts_what_the_kernel_drops_and_a_second_port_falls_back() {
    require_traffic_tools();
    let t = Topology::new("xdp");
    let (a, mid) = (
        format!("/run/netns/{}", t.ns[0]),
        format!("/run/netns/{}", t.ns[2]),
    );
    // The receiving port is never polled: its receive ring (2,048 frames) fills, and the
    // kernel drops the rest.
    let mut rx = HostPort::open_with("a1", Some(mid.as_ref()), RxMode::Xdp).unwrap();
    assert_eq!((rx.rx_mode(), rx.xdp_refused()), ("af_xdp_copy", None));
    // Queue 0 of the interface has its AF_XDP socket: a second port falls back, saying why.
    let second = HostPort::open_with("a1", Some(mid.as_ref()), RxMode::Xdp).unwrap();
    assert_eq!(second.rx_mode(), "tpacket_v3");
    let why = second.xdp_refused().expect("why AF_XDP was not used");
    assert!(
        why.contains("bind AF_XDP to a1") && why.contains("busy"),
        "{why}"
    );
    drop(second);
    // A generator sends 10,000 frames through a host port on the other end of the veth.
    let pool = Arc::new(Pool::new("xdp", 4096, 2048).unwrap());
    let mut panel =
        PatchPanel::new(Arc::clone(&pool), vec![WorkerConfig::new("io", None)], 1024).unwrap();
    let tx = HostPort::open_with("a0", Some(a.as_ref()), RxMode::Xdp).unwrap();
    let tx_stats = tx.stats();
    panel.add_node("host:a0", &[""], 0, Box::new(tx)).unwrap();
    let generator = Generator::new(
        telvirt_dataplane::traffic::GenConfig {
            count: Some(10_000),
            rate_pps: Some(200_000),
            ..Default::default()
        },
        2048,
    )
    .unwrap();
    panel
        .add_node("gen", &["out"], 0, Box::new(generator))
        .unwrap();
    panel
        .apply(&[LinkSpec::parse("gen.out -> host:a0").unwrap()])
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let sent = || tx_stats.tx.load(Ordering::Relaxed);
    while sent() + tx_stats.tx_errors.load(Ordering::Relaxed) < 10_000 {
        assert!(
            Instant::now() < deadline,
            "the generator's frames were not sent"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // Frames may still be in flight on the veth: poll the kernel's counters.
    let stats = rx.stats();
    let expected = sent().saturating_sub(2048);
    assert!(expected > 0, "only {} frames were sent", sent());
    loop {
        rx.read_kernel_stats();
        let dropped = stats.rx_kernel_dropped.load(Ordering::Relaxed);
        if dropped >= expected {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the kernel's drops were not counted: {dropped} of at least {expected}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    panel.shutdown();
}

#[test]
fn an_af_xdp_port_takes_frames_from_every_receive_queue() {
    require_traffic_tools();
    let t = Topology::new("xq");
    let (a, m) = (&t.ns[0], &t.ns[2]);
    // A veth pair with two queues each way: q0 in nsA (10.209.0.1), q1 in the middle.
    must(&[
        "ip",
        "-n",
        a,
        "link",
        "add",
        "q0",
        "numtxqueues",
        "2",
        "numrxqueues",
        "2",
        "type",
        "veth",
        "peer",
        "name",
        "q1",
        "netns",
        m,
        "numtxqueues",
        "2",
        "numrxqueues",
        "2",
    ]);
    must(&["ip", "-n", a, "addr", "add", "10.209.0.1/24", "dev", "q0"]);
    // Nothing answers ARP behind the host port: the neighbour is fixed.
    must(&[
        "ip",
        "-n",
        a,
        "neigh",
        "add",
        "10.209.0.2",
        "lladdr",
        "02:00:00:00:00:02",
        "dev",
        "q0",
    ]);
    for (ns, ifname) in [(a, "q0"), (m, "q1")] {
        must(&["ip", "-n", ns, "link", "set", ifname, "up"]);
    }
    let mid = format!("/run/netns/{m}");
    let rx = HostPort::open_with("q1", Some(mid.as_ref()), RxMode::Xdp).unwrap();
    assert_eq!((rx.rx_mode(), rx.xdp_refused()), ("af_xdp_copy", None));
    assert_eq!(rx.xdp_queues(), Some(2));
    let stats = rx.stats();
    let pool = Arc::new(Pool::new("xq", 4096, 2048).unwrap());
    let mut panel =
        PatchPanel::new(Arc::clone(&pool), vec![WorkerConfig::new("io", None)], 1024).unwrap();
    panel.add_node("host:q1", &[""], 0, Box::new(rx)).unwrap();
    let sink = telvirt_dataplane::traffic::LatencySink::new(32);
    panel.add_node("sink", &["in"], 0, Box::new(sink)).unwrap();
    panel
        .apply(&[LinkSpec::parse("host:q1 -> sink.in").unwrap()])
        .unwrap();
    // 32 UDP flows (one socket each) from nsA: the kernel spreads them over q0's transmit
    // queues, and veth delivers each on the receive queue of the same number.
    // Unpaced, few enough for veth's 256-frame queue of each receive queue to hold them
    // all while the softirq that runs XDP waits for a loaded CPU.
    const FLOWS: u64 = 32;
    const EACH: u64 = 5;
    let ns_file = std::fs::File::open(format!("/run/netns/{a}")).unwrap();
    std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        // SAFETY: an open namespace file; setns only changes this thread.
        assert_eq!(
            unsafe { libc::setns(ns_file.as_raw_fd(), libc::CLONE_NEWNET) },
            0
        );
        for _ in 0..FLOWS {
            let s = std::net::UdpSocket::bind("10.209.0.1:0").unwrap();
            for _ in 0..EACH {
                s.send_to(&[0u8; 64], "10.209.0.2:9").unwrap();
            }
        }
    })
    .join()
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let per_queue = stats
            .rx_per_queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let received = stats.rx.load(Ordering::Relaxed);
        if received >= FLOWS * EACH && per_queue.iter().sum::<u64>() == received {
            assert_eq!(per_queue.len(), 2, "{per_queue:?}");
            assert!(
                per_queue.iter().all(|n| *n > 0),
                "a queue's socket took nothing: {per_queue:?}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the flows did not all arrive: {received} of {} ({per_queue:?})",
            FLOWS * EACH
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    panel.shutdown();
}
