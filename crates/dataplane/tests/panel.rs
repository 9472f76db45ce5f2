//! Patch panel, steering and chain tests: packets really flow through workers, links are
//! counted, rewiring happens while nodes run, and steering switches are exact.

#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use telvirt_dataplane::firewall::{Action, Firewall, Rule};
use telvirt_dataplane::graph::LinkSpec;
use telvirt_dataplane::node::{Node, NodeIo, PortIo, ProcessorNode};
use telvirt_dataplane::packet::read_test_frame;
use telvirt_dataplane::panel::PatchPanel;
use telvirt_dataplane::pool::{Packet, Pool, PoolCache};
use telvirt_dataplane::steering::{SteeringNode, SteeringTable};
use telvirt_dataplane::traffic::{GenConfig, Generator, LatencySink, SinkState};
use telvirt_dataplane::worker::WorkerConfig;

#[path = "support/panels.rs"]
mod panels;
use panels::{panel, wait_for};

fn links(specs: &[&str]) -> Vec<LinkSpec> {
    specs.iter().map(|s| LinkSpec::parse(s).unwrap()).collect()
}

fn make_gen(count: u64, rate: Option<u64>) -> Generator {
    Generator::new(
        GenConfig {
            count: Some(count),
            rate_pps: rate,
            flows: 4,
            sizes: vec![64, 128, 1500],
            ..GenConfig::default()
        },
        2048,
    )
    .unwrap()
}

/// Place `source -> fw1 (on worker fw_worker) -> sink` and link it; returns the sink's state.
fn gen_fw_sink(
    p: &mut PatchPanel,
    source: Box<dyn Node>,
    fw: Firewall,
    fw_worker: usize,
) -> Arc<Mutex<SinkState>> {
    let sink = LatencySink::new(32);
    let st = sink.state();
    p.add_node("gen", &["out"], 0, source).unwrap();
    let fw = Box::new(ProcessorNode::new(fw, 32));
    p.add_node("fw1", &["in", "out"], fw_worker, fw).unwrap();
    p.add_node("sink", &["in"], 1, Box::new(sink)).unwrap();
    let r = p
        .apply(&links(&["gen.out -> fw1.in", "fw1.out -> sink.in"]))
        .unwrap();
    assert_eq!(r.added.len(), 2);
    st
}

#[test]
fn chain_gen_firewall_sink_delivers_and_counts() {
    let pool = Arc::new(Pool::new("chain", 4096, 2048).unwrap());
    let mut p = panel(&pool);
    let g = make_gen(20_000, None);
    let gstats = g.stats();
    let fw = Firewall::new(vec![], Action::Allow);
    let fwc = fw.counters();
    let st = gen_fw_sink(&mut p, Box::new(g), fw, 0);
    wait_for("20000 packets at the sink", 60, || {
        st.lock().unwrap().received == 20_000
    });
    let s = st.lock().unwrap().summary();
    assert_eq!((s.lost, s.reordered, s.foreign), (0, 0, 0));
    assert!(s.latency.count == 20_000 && s.latency.max_us > 0.0);
    assert_eq!(fwc.allowed.load(Ordering::Relaxed), 20_000);
    assert_eq!(gstats.sent.load(Ordering::Relaxed), 20_000);
    let total_bytes: u64 = (0..20_000u64)
        .map(|i| [64, 128, 1500][(i % 3) as usize])
        .sum();
    // A sender counts a batch on its link just after the ring took it: the sink may have
    // received it a moment before.
    wait_for("every link counted 20000 packets", 10, || {
        p.status().iter().all(|l| l.counters.packets == 20_000)
    });
    let status = p.status();
    for l in &status {
        assert_eq!(l.counters.packets, 20_000, "{}", l.link);
        assert_eq!(l.counters.bytes, total_bytes, "{}", l.link);
    }
    let text = p.render();
    assert!(
        text.lines()
            .nth(1)
            .unwrap()
            .starts_with("gen.out -> fw1.in"),
        "{text}"
    );
    assert!(text.contains(&total_bytes.to_string()), "{text}");
    drop(p.remove_node("sink").unwrap());
    assert_eq!(p.current_links(), links(&["gen.out -> fw1.in"]));
    assert!(p.nodes_with_drops().is_empty());
    p.shutdown();
    wait_for("all buffers back in the pool", 10, || {
        pool.available() == 4096
    });
}

#[test]
fn firewall_rule_blocks_in_a_running_chain() {
    let pool = Arc::new(Pool::new("deny", 1024, 2048).unwrap());
    let mut p = panel(&pool);
    let fw = Firewall::new(
        vec![Rule::parse("deny proto=udp dport=9").unwrap()],
        Action::Allow,
    );
    let fwc = fw.counters();
    let st = gen_fw_sink(&mut p, Box::new(make_gen(5_000, None)), fw, 1);
    wait_for("5000 denials", 60, || {
        fwc.denied.load(Ordering::Relaxed) == 5_000
    });
    p.barrier();
    assert_eq!(st.lock().unwrap().received, 0);
    assert_eq!(fwc.allowed.load(Ordering::Relaxed), 0);
    p.shutdown();
}

#[test]
fn rewire_while_running_loses_nothing() {
    let pool = Arc::new(Pool::new("rewire", 8192, 2048).unwrap());
    let mut p = panel(&pool);
    const N: u64 = 60_000;
    let g = make_gen(N, Some(200_000));
    let gstats = g.stats();
    let sink = LatencySink::new(32);
    let st = sink.state();
    p.add_node("gen", &["out"], 0, Box::new(g)).unwrap();
    for (name, w) in [("fw1", 0), ("fw2", 1)] {
        let fw = Firewall::new(vec![], Action::Allow);
        p.add_node(
            name,
            &["in", "out"],
            w,
            Box::new(ProcessorNode::new(fw, 32)),
        )
        .unwrap();
    }
    p.add_node("sink", &["a", "b"], 1, Box::new(sink)).unwrap();
    let before = links(&[
        "gen.out -> fw1.in",
        "fw1.out -> sink.a",
        "fw2.out -> sink.b",
    ]);
    let after = links(&[
        "gen.out -> fw2.in",
        "fw1.out -> sink.a",
        "fw2.out -> sink.b",
    ]);
    p.apply(&before).unwrap();
    wait_for("traffic on fw1", 30, || st.lock().unwrap().received > 1000);
    let r = p.apply(&after).unwrap();
    assert_eq!((r.added.len(), r.removed.len(), r.kept), (1, 1, 2));
    wait_for("generator done", 60, || gstats.done.load(Ordering::Acquire));
    wait_for("all packets at the sink", 60, || {
        st.lock().unwrap().received == N
    });
    let s = st.lock().unwrap().summary();
    assert_eq!(s.lost, 0);
    let status = p.status();
    let via = |l: &str| {
        status
            .iter()
            .find(|s| s.link.to_string() == l)
            .unwrap()
            .counters
            .packets
    };
    assert!(via("fw1.out -> sink.a") > 0 && via("fw2.out -> sink.b") > 0);
    assert_eq!(via("fw1.out -> sink.a") + via("fw2.out -> sink.b"), N);
    // A bad graph is refused and changes nothing.
    let e = p.apply(&links(&["gen.out -> fw9.in"])).unwrap_err();
    assert!(e.to_string().contains("unknown node \"fw9\""), "{e}");
    assert_eq!(p.current_links(), {
        let mut a = after.clone();
        a.sort();
        a
    });
    p.shutdown();
}

/// Collects sequence numbers of test frames.
struct SeqCollector(Arc<Mutex<Vec<u64>>>);

impl Node for SeqCollector {
    fn poll(&mut self, io: &mut NodeIo<'_>) -> usize {
        let mut buf = Vec::new();
        let n = io.recv(0, &mut buf, 64);
        let mut seen = self.0.lock().unwrap();
        for p in buf {
            seen.push(read_test_frame(io.pool().data(&p)).unwrap().0);
            io.free(p);
        }
        n
    }
}

/// Records the sequence number of each packet from port 0 and forwards it on port 1.
struct SeqForwarder(Arc<Mutex<Vec<u64>>>);

impl Node for SeqForwarder {
    fn poll(&mut self, io: &mut NodeIo<'_>) -> usize {
        let mut buf = Vec::new();
        let room = 32.min(io.tx_space(1));
        let n = io.recv(0, &mut buf, room);
        let mut seen = self.0.lock().unwrap();
        for p in &buf {
            seen.push(read_test_frame(io.pool().data(p)).unwrap().0);
        }
        io.send(1, &mut buf);
        n
    }
}

#[test]
fn steering_switch_delivers_each_packet_to_exactly_one_instance() {
    const N: u64 = 100_000;
    let pool = Arc::new(Pool::new("steer", 8192, 128).unwrap());
    let mut table = SteeringTable::new();
    let ep = table.add_endpoint("fw", &["fw1", "fw2"], "fw1").unwrap();
    let table = Arc::new(table);
    let mut p = panel(&pool);
    let seen1 = Arc::new(Mutex::new(Vec::new()));
    let seen2 = Arc::new(Mutex::new(Vec::new()));
    let returned = Arc::new(Mutex::new(Vec::new()));
    let g = Generator::new(
        GenConfig {
            count: Some(N),
            sizes: vec![64],
            ..GenConfig::default()
        },
        128,
    )
    .unwrap();
    let gstats = g.stats();
    let steer = SteeringNode::new(Arc::clone(&ep), &["in", "out"]).unwrap();
    let names = steer.port_names();
    assert_eq!(
        names,
        ["in", "out", "fw1/in", "fw1/out", "fw2/in", "fw2/out"]
    );
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    p.add_node("gen", &["out"], 0, Box::new(g)).unwrap();
    p.add_node("fw", &names, 0, Box::new(ProcessorNode::new(steer, 32)))
        .unwrap();
    for (name, seen) in [("fw1", &seen1), ("fw2", &seen2)] {
        p.add_node(
            name,
            &["in", "out"],
            1,
            Box::new(SeqForwarder(Arc::clone(seen))),
        )
        .unwrap();
    }
    p.add_node(
        "sink",
        &["in"],
        1,
        Box::new(SeqCollector(Arc::clone(&returned))),
    )
    .unwrap();
    p.apply(&links(&[
        "gen.out -> fw.in",
        "fw.fw1/in -> fw1.in",
        "fw.fw2/in -> fw2.in",
        "fw1.out -> fw.fw1/out",
        "fw2.out -> fw.fw2/out",
        "fw.out -> sink.in",
    ]))
    .unwrap();
    let mut switches = 0u32;
    let t2 = Arc::clone(&table);
    while !gstats.done.load(Ordering::Acquire) {
        let to = if switches.is_multiple_of(2) {
            "fw2"
        } else {
            "fw1"
        };
        t2.switch("fw", to).unwrap();
        switches += 1;
        std::thread::sleep(Duration::from_micros(200));
    }
    let total = || (seen1.lock().unwrap().len() + seen2.lock().unwrap().len()) as u64;
    let drops = || p.status().iter().map(|s| s.counters.drops).sum::<u64>();
    wait_for("every packet delivered or dropped", 60, || {
        total() + drops() >= N
    });
    assert_eq!(
        drops(),
        0,
        "a ring overflowed; the test cannot tell which packets"
    );
    let mut all: Vec<u64> = seen1.lock().unwrap().clone();
    all.extend(seen2.lock().unwrap().iter());
    all.sort_unstable();
    let expect: Vec<u64> = (0..N).collect();
    assert!(
        all == expect,
        "some packet went to both instances or to neither"
    );
    wait_for("every packet back through the endpoint", 60, || {
        returned.lock().unwrap().len() as u64 + drops() == N
    });
    let mut back = returned.lock().unwrap().clone();
    back.sort_unstable();
    assert!(back == expect, "a packet was lost on the way back");
    assert!(switches > 1);
    assert_eq!(ep.current().generation, switches);
    p.shutdown();
}

#[test]
fn nodes_and_sinks_work_without_a_panel() {
    // A PortIo set can be driven by hand (the agent embeds nodes this way in tests).
    let pool = Pool::new("hand", 64, 128).unwrap();
    let mut ports = vec![PortIo::default()];
    let mut cache = PoolCache::new();
    let mut io = NodeIo::new(&pool, &mut cache, &mut ports);
    let mut v: Vec<Packet> = Vec::new();
    assert_eq!(io.alloc_batch(3, &mut v), 3);
    assert_eq!(io.send(0, &mut v), 0, "unlinked port drops");
    assert!(v.is_empty());
    cache.flush(&pool);
    assert_eq!(pool.available(), 64);
}

#[test]
fn a_sink_on_one_stream_counts_other_generators_as_foreign() {
    let pool = Arc::new(Pool::new("streams", 1024, 2048).unwrap());
    let mut p = panel(&pool);
    let sink = LatencySink::new(32).only_stream(7);
    let state = sink.state();
    p.add_node("sink", &["a", "b"], 1, Box::new(sink)).unwrap();
    p.add_node("plain", &["out"], 0, Box::new(make_gen(100, None)))
        .unwrap();
    p.add_node(
        "probe",
        &["out"],
        0,
        Box::new(make_gen(50, None).with_stream(7)),
    )
    .unwrap();
    p.apply(&links(&["plain.out -> sink.a", "probe.out -> sink.b"]))
        .unwrap();
    wait_for("150 frames at the sink", 20, || {
        let s = state.lock().unwrap();
        s.received + s.foreign >= 150
    });
    let s = state.lock().unwrap().summary();
    assert_eq!((s.received, s.foreign, s.lost), (50, 100, 0));
    p.shutdown();
}

#[test]
fn latency_chain_probes_a_running_chain_and_leaves_it_as_it_was() {
    use telvirt_dataplane::graph::PortRef;
    use telvirt_dataplane::latency::{ChainLatencyOpts, chain};
    let pool = Arc::new(Pool::new("probe", 2048, 2048).unwrap());
    let mut p = panel(&pool);
    let fw = Firewall::new(vec![], Action::Allow);
    p.add_node(
        "fw1",
        &["in", "out"],
        1,
        Box::new(ProcessorNode::new(fw, 32)),
    )
    .unwrap();
    let mut last = (0, 0);
    let opts = ChainLatencyOpts {
        entry: PortRef::new("fw1", "in"),
        exit: PortRef::new("fw1", "out"),
        rate_pps: 20_000,
        packets: 2_000,
        size: 64,
        worker: 0,
        settle: Duration::from_secs(5),
    };
    let r = chain(&mut p, &opts, &mut |d, t| last = (d, t)).unwrap();
    assert_eq!((r.sent, r.sink.received, r.sink.lost), (2_000, 2_000, 0));
    assert_eq!(last, (2_000, 2_000));
    assert!(r.sink.latency.p50_us > 0.0);
    assert!(p.current_links().is_empty(), "probe links removed");
    // An entry port that is already fed is refused, and the probe is removed again.
    p.add_node("src", &["out"], 0, Box::new(make_gen(1, None)))
        .unwrap();
    p.apply(&links(&["src.out -> fw1.in"])).unwrap();
    let e = chain(&mut p, &opts, &mut |_, _| {}).unwrap_err();
    assert!(e.to_string().contains("already receives"), "{e}");
    assert_eq!(p.current_links(), links(&["src.out -> fw1.in"]));
    p.shutdown();
}

#[test]
fn pcap_sink_then_pcap_source_replays_the_same_frames() {
    use telvirt_dataplane::pcap::{PcapSink, PcapSource, Reader};
    let path = std::env::temp_dir().join(format!("telvirt-dp-panel-{}.pcap", std::process::id()));
    let pool = Arc::new(Pool::new("pcap", 1024, 2048).unwrap());
    let mut p = panel(&pool);
    let w = PcapSink::create(&path).unwrap();
    let ws = w.stats();
    p.add_node("gen", &["out"], 0, Box::new(make_gen(300, None)))
        .unwrap();
    p.add_node("cap", &["in"], 1, Box::new(w)).unwrap();
    p.apply(&links(&["gen.out -> cap.in"])).unwrap();
    wait_for("300 frames written", 30, || {
        ws.packets.load(Ordering::Relaxed) == 300
    });
    assert_eq!(ws.last_error(), None);
    let mut r = Reader::open(&path).unwrap();
    let first = r.next_record().unwrap().unwrap();
    assert_eq!(read_test_frame(&first.data).map(|x| x.0), Some(0));
    assert_eq!(first.data.len(), 64);
    // Replay the file into a latency sink: every generator frame comes back, in order.
    let src = PcapSource::open(&path).unwrap();
    let ss = src.stats();
    let sink = LatencySink::new(32);
    let st = sink.state();
    p.add_node("replay", &["out"], 0, Box::new(src)).unwrap();
    p.add_node("sink", &["in"], 1, Box::new(sink)).unwrap();
    p.apply(&links(&["replay.out -> sink.in"])).unwrap();
    wait_for("300 frames replayed", 30, || {
        st.lock().unwrap().received == 300
    });
    assert!(ss.done.load(Ordering::Acquire));
    let s = st.lock().unwrap().summary();
    assert_eq!((s.lost, s.reordered, s.foreign), (0, 0, 0));
    p.shutdown();
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn replacing_a_whole_chain_segment_drains_the_old_one() {
    // gen -> fw1 -> sink.a becomes gen -> fw2 -> sink.b in one apply: fw1 keeps its old
    // output link until it has forwarded what was queued for it.
    let pool = Arc::new(Pool::new("swap", 8192, 2048).unwrap());
    let mut p = panel(&pool);
    const N: u64 = 50_000;
    let g = make_gen(N, Some(300_000));
    let gstats = g.stats();
    let sink = LatencySink::new(32);
    let st = sink.state();
    p.add_node("gen", &["out"], 0, Box::new(g)).unwrap();
    for name in ["fw1", "fw2"] {
        let fw = Box::new(ProcessorNode::new(Firewall::new(vec![], Action::Allow), 32));
        // fw1 on the sink's worker so that it lags behind the generator and has a backlog.
        p.add_node(name, &["in", "out"], 1, fw).unwrap();
    }
    p.add_node("sink", &["a", "b"], 1, Box::new(sink)).unwrap();
    p.apply(&links(&["gen.out -> fw1.in", "fw1.out -> sink.a"]))
        .unwrap();
    wait_for("traffic through fw1", 30, || {
        st.lock().unwrap().received > 1000
    });
    let r = p
        .apply(&links(&["gen.out -> fw2.in", "fw2.out -> sink.b"]))
        .unwrap();
    assert_eq!((r.added.len(), r.removed.len()), (2, 2));
    wait_for("generator done", 60, || gstats.done.load(Ordering::Acquire));
    wait_for("every packet at the sink", 60, || {
        st.lock().unwrap().received == N
    });
    assert_eq!(st.lock().unwrap().summary().lost, 0);
    p.shutdown();
}

#[test]
fn workers_run_their_nodes_on_the_pinned_core() {
    struct WhereAmI(Arc<Mutex<Vec<Option<usize>>>>);
    impl Node for WhereAmI {
        fn poll(&mut self, _io: &mut NodeIo<'_>) -> usize {
            let mut v = self.0.lock().unwrap();
            if v.len() < 100 {
                v.push(telvirt_dataplane::worker::current_core());
            }
            0
        }
    }
    let pool = Arc::new(Pool::new("pin", 64, 128).unwrap());
    let mut p = panel(&pool);
    let cores: Vec<usize> = p
        .workers()
        .iter()
        .map(|w| w.config().core.unwrap())
        .collect();
    let seen: Vec<_> = (0..2).map(|_| Arc::new(Mutex::new(Vec::new()))).collect();
    for (w, s) in seen.iter().enumerate() {
        p.add_node(
            &format!("probe{w}"),
            &[],
            w,
            Box::new(WhereAmI(Arc::clone(s))),
        )
        .unwrap();
    }
    for (w, s) in seen.iter().enumerate() {
        wait_for("100 polls", 30, || s.lock().unwrap().len() == 100);
        assert!(
            s.lock().unwrap().iter().all(|c| *c == Some(cores[w])),
            "worker {w} left core {}",
            cores[w]
        );
    }
    p.shutdown();
}

#[test]
fn bad_panel_requests_are_precise_and_change_nothing() {
    let pool = Arc::new(Pool::new("bad", 64, 128).unwrap());
    let e = PatchPanel::new(Arc::clone(&pool), vec![], 1024)
        .err()
        .unwrap();
    assert!(e.to_string().contains("panel.workers"), "{e}");
    let e = PatchPanel::new(Arc::clone(&pool), vec![WorkerConfig::new("w", None)], 1000)
        .err()
        .unwrap();
    assert!(e.to_string().contains("ring.capacity"), "{e}");
    let mut p = panel(&pool);
    let node = || Box::new(make_gen(1, None));
    for (name, ports, worker, want) in [
        ("", &["out"][..], 0, "must be non-empty"),
        ("a.b", &["out"][..], 0, "without '.'"),
        ("g", &["out"][..], 7, "7 is not a worker index (0..2)"),
        ("g", &["out", "out"][..], 0, "port \"out\" listed twice"),
    ] {
        let e = p
            .add_node(name, ports, worker, node())
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{name:?}: {e}");
    }
    p.add_node("g", &["out"], 0, node()).unwrap();
    let e = p
        .add_node("g", &["out"], 0, node())
        .unwrap_err()
        .to_string();
    assert!(e.contains("node g already exists"), "{e}");
    let e = p.remove_node("nope").err().unwrap().to_string();
    assert!(e.contains("unknown node \"nope\""), "{e}");
    assert!(p.current_links().is_empty());
    p.shutdown();
}

#[test]
fn packets_to_an_unlinked_port_are_counted_and_shown() {
    let pool = Arc::new(Pool::new("unlinked", 1024, 2048).unwrap());
    let mut p = panel(&pool);
    let fw = Box::new(ProcessorNode::new(Firewall::new(vec![], Action::Allow), 32));
    p.add_node("gen", &["out"], 0, Box::new(make_gen(500, None)))
        .unwrap();
    p.add_node("fw1", &["in", "out"], 1, fw).unwrap();
    // fw1.out has no link: fw1 forwards into nothing.
    p.apply(&links(&["gen.out -> fw1.in"])).unwrap();
    wait_for("500 drops at fw1", 30, || {
        p.node_drops("fw1").is_some_and(|d| d.unlinked == 500)
    });
    assert_eq!(p.node_drops("fw1").unwrap().refused, 0);
    assert_eq!(p.nodes_with_drops().len(), 1, "{:?}", p.nodes_with_drops());
    let text = p.render();
    assert!(
        text.contains("fw1: 500 packets dropped on unlinked ports, 0 dropped by the node itself"),
        "{text}"
    );
    p.shutdown();
}

#[test]
fn packets_a_node_refuses_are_counted_at_the_node() {
    let pool = Arc::new(Pool::new("refused", 1024, 2048).unwrap());
    let mut p = panel(&pool);
    // Deny everything: every packet the generator sends is refused by fw1's verdict.
    let fw = Box::new(ProcessorNode::new(Firewall::new(vec![], Action::Deny), 32));
    p.add_node("gen", &["out"], 0, Box::new(make_gen(300, None)))
        .unwrap();
    p.add_node("fw1", &["in", "out"], 1, fw).unwrap();
    p.add_node("sink", &["in"], 1, Box::new(LatencySink::new(32)))
        .unwrap();
    p.apply(&links(&["gen.out -> fw1.in", "fw1.out -> sink.in"]))
        .unwrap();
    wait_for("300 refused at fw1", 30, || {
        p.node_drops("fw1").is_some_and(|d| d.refused == 300)
    });
    assert_eq!(p.node_drops("fw1").unwrap().unlinked, 0);
    assert_eq!(p.node_drops("gen").unwrap(), Default::default());
    p.shutdown();
}

#[test]
fn a_removed_nodes_drops_and_links_stay_readable() {
    let pool = Arc::new(Pool::new("removed", 1024, 2048).unwrap());
    let mut p = panel(&pool);
    let deny = || Box::new(ProcessorNode::new(Firewall::new(vec![], Action::Deny), 32));
    p.add_node("gen", &["out"], 0, Box::new(make_gen(300, None)))
        .unwrap();
    p.add_node("fw1", &["in", "out"], 1, deny()).unwrap();
    let link = links(&["gen.out -> fw1.in"]);
    p.apply_network("n", &link).unwrap();
    wait_for("300 refused at fw1", 30, || {
        p.node_drops("fw1").is_some_and(|d| d.refused == 300)
    });
    // The sender counts a batch just after the ring took it: fw1 may have refused it first.
    wait_for("the link counted 300 packets", 10, || {
        p.link_counters(&link[0]).is_some_and(|c| c.packets == 300)
    });
    let carried = p.link_counters(&link[0]).unwrap();
    assert_eq!(carried.packets, 300);
    // The node goes (a VNF moved away): what it dropped and what its link carried stay.
    drop(p.remove_node("fw1").unwrap());
    assert!(p.status().is_empty());
    assert_eq!(p.node_drops("fw1").unwrap().refused, 300);
    assert_eq!(p.link_counters(&link[0]), Some(carried));
    assert_eq!(p.node_drops("never"), None);
    // A node of that name added again starts from zero: its drops are its own.
    p.add_node("fw1", &["in", "out"], 1, deny()).unwrap();
    assert_eq!(p.node_drops("fw1").unwrap(), Default::default());
    drop(p.remove_node("fw1").unwrap());
    assert_eq!(p.node_drops("fw1").unwrap(), Default::default());
    // Forgotten: none.
    p.forget_node_drops("fw1");
    assert_eq!(p.node_drops("fw1"), None);
    p.shutdown();
}

#[test]
fn a_link_made_again_between_the_same_ports_keeps_its_counters() {
    let pool = Arc::new(Pool::new("relink", 1024, 2048).unwrap());
    let mut p = panel(&pool);
    p.add_node("gen", &["out"], 0, Box::new(make_gen(200, None)))
        .unwrap();
    p.add_node("sink", &["in"], 1, Box::new(LatencySink::new(32)))
        .unwrap();
    p.add_node("other", &["in"], 1, Box::new(LatencySink::new(32)))
        .unwrap();
    let direct = links(&["gen.out -> sink.in"]);
    p.apply_network("n", &direct).unwrap();
    wait_for("200 packets on the link", 30, || {
        p.status()
            .first()
            .is_some_and(|l| l.counters.packets == 200)
    });
    // The round that counted the packets counts their bytes after: it has ended past this.
    p.barrier();
    let before = p.status()[0].counters;
    assert!(before.since_unix_ms > 0, "{before:?}");
    // Paused (as a probe does) and made again: the same counters go on.
    p.apply_network("n", &links(&["gen.out -> other.in"]))
        .unwrap();
    assert_eq!(
        p.status()[0].counters.packets,
        0,
        "a different link starts at zero"
    );
    p.apply_network("n", &direct).unwrap();
    assert_eq!(p.status()[0].counters, before);
    // A deleted network's links start again from zero.
    p.delete_network("n").unwrap();
    p.apply_network("n", &direct).unwrap();
    assert_eq!(p.status()[0].counters.packets, 0);
    // Also when an end of the link went before the network was deleted.
    p.add_node("gen2", &["out"], 0, Box::new(make_gen(100, None)))
        .unwrap();
    let second = links(&["gen2.out -> other.in"]);
    p.apply_network("m", &second).unwrap();
    let on_second = |p: &PatchPanel| {
        p.status()
            .into_iter()
            .find(|l| l.link == second[0])
            .map(|l| l.counters.packets)
    };
    wait_for("100 packets on the second link", 30, || {
        on_second(&p) == Some(100)
    });
    drop(p.remove_node("other").unwrap());
    p.delete_network("m").unwrap();
    p.add_node("other", &["in"], 1, Box::new(LatencySink::new(32)))
        .unwrap();
    p.apply_network("m", &second).unwrap();
    assert_eq!(
        on_second(&p),
        Some(0),
        "the deleted network's counters are gone"
    );
    p.shutdown();
}

#[test]
fn networks_are_applied_changed_and_deleted_independently() {
    let pool = Arc::new(Pool::new("nets", 2048, 2048).unwrap());
    let mut p = panel(&pool);
    for (name, w) in [("g1", 0), ("g2", 0)] {
        p.add_node(name, &["out"], w, Box::new(make_gen(1_000, None)))
            .unwrap();
    }
    let sink = LatencySink::new(32);
    let st = sink.state();
    p.add_node("s1", &["in"], 1, Box::new(sink)).unwrap();
    p.add_node("s2", &["in"], 1, Box::new(LatencySink::new(32)))
        .unwrap();
    let r = p
        .apply_network("blue", &links(&["g1.out -> s1.in"]))
        .unwrap();
    assert_eq!(r.added.len(), 1);
    p.apply_network("red", &links(&["g2.out -> s2.in"]))
        .unwrap();
    assert_eq!(p.networks(), vec!["blue".to_string(), "red".to_string()]);
    wait_for("blue traffic", 30, || st.lock().unwrap().received == 1_000);
    // g1 counts its last batch just after the ring took it: s1 may have received it first.
    wait_for("blue's link counted 1000 packets", 10, || {
        p.status()
            .iter()
            .any(|l| l.link.from.node == "g1" && l.counters.packets == 1_000)
    });
    // A network's own error names the network; a conflict with another network says so.
    let e = p
        .apply_network("red", &links(&["g2.out -> nope.in"]))
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("network red: link 1 (g2.out -> nope.in): unknown node"),
        "{e}"
    );
    let e = p
        .apply_network("red", &links(&["g2.out -> s1.in"]))
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("network red conflicts with another network")
            && e.to_string().contains("port s1.in already receives"),
        "{e}"
    );
    // Changing red keeps blue's link (and its counters) untouched.
    let before = p
        .status()
        .into_iter()
        .find(|l| l.link.from.node == "g1")
        .unwrap();
    let r = p
        .apply_network("red", &links(&["g2.out -> s2.in"]))
        .unwrap();
    assert_eq!((r.added.len(), r.removed.len(), r.kept), (0, 0, 2));
    p.delete_network("red").unwrap();
    assert_eq!(p.current_links(), links(&["g1.out -> s1.in"]));
    let after = p
        .status()
        .into_iter()
        .find(|l| l.link.from.node == "g1")
        .unwrap();
    assert_eq!(after.counters.packets, before.counters.packets);
    let e = p.delete_network("red").unwrap_err().to_string();
    assert!(e.contains("unknown network \"red\" (known: blue)"), "{e}");
    p.shutdown();
}

#[test]
fn a_worker_busy_polls_while_one_of_its_nodes_wants_it() {
    let pool = Arc::new(Pool::new("busy", 64, 2048).unwrap());
    let mut p = panel(&pool);
    let fw = || Box::new(ProcessorNode::new(Firewall::new(vec![], Action::Allow), 32));
    p.add_node("fw1", &["in", "out"], 1, fw()).unwrap();
    p.add_node("fw2", &["in", "out"], 1, fw()).unwrap();
    assert!(!p.workers()[1].busy_poll());
    p.set_busy_poll("fw1", true).unwrap();
    p.set_busy_poll("fw2", true).unwrap();
    assert!(p.workers()[1].busy_poll() && !p.workers()[0].busy_poll());
    p.set_busy_poll("fw2", false).unwrap();
    assert!(p.workers()[1].busy_poll(), "fw1 still wants it");
    drop(p.remove_node("fw1").unwrap());
    assert!(!p.workers()[1].busy_poll(), "nobody wants it any more");
    let e = p.set_busy_poll("nope", true).unwrap_err().to_string();
    assert!(e.contains("unknown node \"nope\""), "{e}");
    p.shutdown();
}

/// Takes nothing: whatever reaches it stays on its incoming ring.
struct Stalled;

impl Node for Stalled {
    fn poll(&mut self, _io: &mut NodeIo<'_>) -> usize {
        0
    }
}

#[test]
fn an_overfilling_generator_loses_what_the_link_cannot_hold_and_the_link_counts_it() {
    let pool = Arc::new(Pool::new("overfill", 8192, 2048).unwrap());
    let mut p = panel(&pool);
    let generator = make_gen(5_000, None).overfilling();
    let stats = generator.stats();
    p.add_node("gen", &["out"], 0, Box::new(generator)).unwrap();
    p.add_node("stalled", &["in"], 1, Box::new(Stalled))
        .unwrap();
    p.apply(&links(&["gen.out -> stalled.in"])).unwrap();
    wait_for("the generator done", 30, || {
        stats.done.load(Ordering::Acquire)
    });
    let c = p.status()[0].counters;
    // The ring (1024 slots) holds what was enqueued; the rest was dropped at the link.
    assert_eq!(c.packets, 1024, "{c:?}");
    assert_eq!(c.packets + c.drops, 5_000, "{c:?}");
    assert_eq!(stats.dropped.load(Ordering::Relaxed), c.drops);
    assert!(
        stats.elapsed_ns.load(Ordering::Relaxed) > 0,
        "the time it took is kept"
    );
    p.shutdown();
}

/// Sends one packet each time `asked` grows past what it sent.
struct OnRequest {
    asked: Arc<AtomicU64>,
    sent: u64,
}

impl Node for OnRequest {
    fn poll(&mut self, io: &mut NodeIo<'_>) -> usize {
        if self.asked.load(Ordering::Acquire) <= self.sent {
            return 0;
        }
        let Some(mut pkt) = io.alloc() else { return 0 };
        io.pool().write(&mut pkt, &[0u8; 64]);
        io.send(0, &mut vec![pkt]);
        self.sent += 1;
        1
    }
}

/// Counts what reaches it.
struct Counted(Arc<AtomicU64>);

impl Node for Counted {
    fn poll(&mut self, io: &mut NodeIo<'_>) -> usize {
        let mut buf = Vec::new();
        let n = io.recv(0, &mut buf, 32);
        io.free_all(&mut buf);
        self.0.fetch_add(n as u64, Ordering::Release);
        n
    }
}

/// A packet pushed onto a link into a worker that sleeps wakes it: it arrives long before
/// the worker's 60 s sleep would have ended, every time (within 10 s: a loaded machine may
/// take a while to run the woken thread).
#[test]
fn a_packet_into_a_sleeping_worker_wakes_it() {
    let pool = Arc::new(Pool::new("bell", 64, 2048).unwrap());
    let sleep = Duration::from_secs(60);
    let workers = vec![
        WorkerConfig {
            busy_poll: true,
            ..WorkerConfig::new("sends", None)
        },
        WorkerConfig {
            idle_spin: Duration::ZERO,
            idle_sleep: sleep,
            ..WorkerConfig::new("sleeps", None)
        },
    ];
    let mut p = PatchPanel::new(Arc::clone(&pool), workers, 64).unwrap();
    let asked = Arc::new(AtomicU64::new(0));
    let got = Arc::new(AtomicU64::new(0));
    let source = OnRequest {
        asked: Arc::clone(&asked),
        sent: 0,
    };
    p.add_node("one", &["out"], 0, Box::new(source)).unwrap();
    p.add_node("count", &["in"], 1, Box::new(Counted(Arc::clone(&got))))
        .unwrap();
    p.apply(&links(&["one.out -> count.in"])).unwrap();
    // Both ends attached before the first packet (a packet to an unlinked port is dropped).
    p.barrier();
    let bell = Arc::clone(p.workers()[1].doorbell());
    let wakes = bell.wakes();
    for i in 1..=3 {
        wait_for("the receiving worker asleep", 10, || bell.is_asleep());
        let t0 = Instant::now();
        asked.store(i, Ordering::Release);
        wait_for("the packet", 10, || got.load(Ordering::Acquire) == i);
        assert!(
            t0.elapsed() < sleep / 6,
            "packet {i} took {:?}: it waited out the sleep",
            t0.elapsed()
        );
    }
    assert!(
        bell.wakes() >= wakes + 3,
        "{} wakes, {wakes} before the packets",
        bell.wakes()
    );
    p.shutdown();
}
