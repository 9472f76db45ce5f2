//! The C example VNFs built by build.rs: each runs its trace as wasm (cranelift) and natively
//! with identical outputs, and does its job (ACL verdicts, NAT rewriting with valid checksums,
//! GTP-U decapsulation and encapsulation).

use crate::common;

use common::*;
use telvirt_runtime_wasm::trace::{self, Workload};
use telvirt_runtime_wasm::{EngineKind, PacketBatch, Verdict, VnfConfig, VnfInstance, WasmRuntime};

type Output = Vec<(Verdict, Vec<u8>)>;

fn instantiate(rt: &WasmRuntime, w: &Workload, engine: EngineKind) -> VnfInstance {
    let m = install(rt, w.vnf.wasm, "operator");
    let cfg = VnfConfig {
        engine,
        config: w.config.clone(),
        ports: w.ports,
        random_seed: Some(1),
        ..VnfConfig::default()
    };
    let mut inst = rt.instantiate(&m, cfg).expect("instantiate example");
    for (map, k, v) in &w.provision {
        inst.map_update(map, k, v).expect("provision");
    }
    inst
}

fn run(w: &Workload, range: std::ops::Range<usize>, mut f: impl FnMut(&mut PacketBatch)) -> Output {
    let mut out = Vec::new();
    let mut b = PacketBatch::new();
    for chunk in w.packets[range].chunks(32) {
        b.clear();
        b.now_ns = Some(1_000_000_000);
        for (port, p) in chunk {
            b.push(*port, p).expect("push");
        }
        f(&mut b);
        for i in 0..b.len() {
            let bytes = match b.verdict(i) {
                Verdict::Drop => Vec::new(),
                Verdict::Forward(_) => b.packet(i).to_vec(),
            };
            out.push((b.verdict(i), bytes));
        }
    }
    out
}

/// One native instance at a time: the C examples' buffers and globals are static, so a second
/// live instance of the same example is refused (tests run in parallel threads).
static NATIVE: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs `w` through the natively compiled example; its instance is gone when this returns.
fn native(w: &Workload) -> Output {
    let _one = NATIVE.lock().unwrap_or_else(|p| p.into_inner());
    let rt = runtime("native-defs");
    let m = install(&rt, w.vnf.wasm, "operator");
    let mut n =
        telvirt_runtime_wasm::native::NativeVnf::new(w.vnf, &m.manifest.maps, &w.config, w.ports)
            .expect("native");
    for (map, k, v) in &w.provision {
        n.map_update(map, k, v).expect("provision");
    }
    run(w, 0..w.packets.len(), |b| {
        n.process_batch(b).expect("native batch")
    })
}

fn wasm(w: &Workload) -> (Output, VnfInstance) {
    let rt = runtime("examples");
    let mut inst = instantiate(&rt, w, EngineKind::Cranelift);
    let out = run(w, 0..w.packets.len(), |b| {
        inst.process_batch(b).expect("wasm batch")
    });
    (out, inst)
}

fn ip_csum_ok(p: &[u8]) -> bool {
    let h = &p[14..34];
    let mut s: u32 = h
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s == 0xffff
}

#[test]
fn firewall_matches_native_and_filters() {
    let w = trace::firewall(64, 2000);
    let (out_w, inst) = wasm(&w);
    let out_n = native(&w);
    assert_eq!(out_w, out_n, "wasm and native outputs differ");
    let fwd = out_w
        .iter()
        .filter(|(v, _)| *v == Verdict::Forward(1))
        .count();
    let drop = out_w.iter().filter(|(v, _)| *v == Verdict::Drop).count();
    assert!(fwd > 400 && drop > 400, "fwd {fwd} drop {drop}");
    let c = inst.counters();
    assert_eq!(c[0].1 + c[1].1, 2000, "{c:?}");
    assert_eq!(c[0].1 as usize, fwd);
}

#[test]
fn nat_matches_native_and_translates() {
    let w = trace::nat(128, 3000);
    let (out_w, inst) = wasm(&w);
    let out_n = native(&w);
    assert_eq!(out_w, out_n, "wasm and native outputs differ");
    let mut outbound = 0;
    for ((port, pkt), (v, o)) in w.packets.iter().zip(&out_w) {
        if *port == 0 {
            assert_eq!(*v, Verdict::Forward(1));
            assert_eq!(
                &o[26..30],
                &[192, 0, 2, 1],
                "source rewritten to the public address"
            );
            assert!(ip_csum_ok(o), "IP checksum stays valid");
            assert_eq!(&o[30..34], &pkt[30..34], "destination unchanged");
            outbound += 1;
        } else {
            assert_eq!(
                *v,
                Verdict::Forward(0),
                "replies to known sessions are translated back"
            );
            assert_eq!(o[30], 10, "destination rewritten to the inside host");
            assert!(ip_csum_ok(o));
        }
    }
    assert!(outbound > 1000);
    let sessions = inst
        .maps()
        .expect("maps")
        .by_name("sessions")
        .expect("sessions")
        .len();
    assert_eq!(sessions, 128);
    assert_eq!(inst.counters()[0], ("sessions_created".to_string(), 128));
}

#[test]
fn gtpu_matches_native_and_tunnels() {
    let w = trace::gtpu(64, 2000);
    let (out_w, inst) = wasm(&w);
    let out_n = native(&w);
    assert_eq!(out_w, out_n, "wasm and native outputs differ");
    for ((port, pkt), (v, o)) in w.packets.iter().zip(&out_w) {
        match (port, v) {
            (1, Verdict::Forward(0)) => {
                assert_eq!(o.len(), pkt.len() + 36, "downlink encapsulated");
                assert_eq!(&o[36..38], &2152u16.to_be_bytes());
                assert!(ip_csum_ok(o));
                assert_eq!(&o[50..], &pkt[14..], "inner packet intact");
            }
            (0, Verdict::Forward(1)) => {
                assert_eq!(o.len(), pkt.len() - 36, "uplink decapsulated");
                assert_eq!(&o[14..], &pkt[50..]);
            }
            (0, Verdict::Drop) => {
                assert_eq!(&pkt[46..48], &[0xde, 0xad], "only unknown TEIDs drop")
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let c = inst.counters();
    assert!(c[0].1 > 500 && c[1].1 > 500 && c[2].1 > 0, "{c:?}");
}

/// The portability claim: a stateful VNF runs half a trace on one engine, its maps are
/// snapshotted and restored into an instance on the other engine, which finishes the trace;
/// outputs and final maps equal an uninterrupted run.
#[test]
fn snapshot_mid_trace_moves_between_engines() {
    let w = trace::nat(200, 2400);
    let rt = runtime("cross");
    let mut whole = instantiate(&rt, &w, EngineKind::Cranelift);
    let expected = run(&w, 0..w.packets.len(), |b| {
        whole.process_batch(b).expect("batch")
    });
    for (first, second) in [
        (EngineKind::Cranelift, EngineKind::Pulley),
        (EngineKind::Pulley, EngineKind::Cranelift),
    ] {
        let half = 1184; // a multiple of the batch size, inside the trace
        let mut a = instantiate(&rt, &w, first);
        let mut out = run(&w, 0..half, |b| a.process_batch(b).expect("batch"));
        let snap = a.snapshot_maps().expect("snapshot");
        // More traffic on the source after the snapshot goes to the update log.
        let mut b_inst = instantiate(&rt, &w, second);
        b_inst
            .restore_maps(&snap)
            .expect("restore on the other engine");
        out.extend(run(&w, half..w.packets.len(), |b| {
            b_inst.process_batch(b).expect("batch")
        }));
        assert_eq!(out, expected, "{first:?} -> {second:?}: outputs differ");
        for name in ["sessions", "reverse", "next_port"] {
            let got = b_inst
                .maps()
                .expect("maps")
                .by_name(name)
                .expect("map")
                .entries();
            let want = whole
                .maps()
                .expect("maps")
                .by_name(name)
                .expect("map")
                .entries();
            assert_eq!(got, want, "{first:?} -> {second:?}: map {name} differs");
        }
    }
}

#[test]
fn update_log_replicates_to_a_standby() {
    let w = trace::nat(100, 1600);
    let rt = runtime("standby");
    let mut active = instantiate(&rt, &w, EngineKind::Cranelift);
    let mut standby = instantiate(&rt, &w, EngineKind::Pulley);
    run(&w, 0..320, |b| active.process_batch(b).expect("batch"));
    standby
        .restore_maps(&active.snapshot_maps().expect("snapshot"))
        .expect("restore");
    run(&w, 320..960, |b| active.process_batch(b).expect("batch"));
    let log1 = active.take_update_log().expect("log 1");
    run(&w, 960..1600, |b| active.process_batch(b).expect("batch"));
    let log2 = active.take_update_log().expect("log 2");
    // Out of order is refused and changes nothing.
    let err = standby
        .apply_update_log(&log2)
        .expect_err("log 2 before log 1");
    assert!(err.to_string().contains("out of order"), "{err}");
    assert!(standby.apply_update_log(&log1).expect("log 1") > 0);
    standby.apply_update_log(&log2).expect("log 2");
    for name in ["sessions", "reverse", "next_port"] {
        assert_eq!(
            standby
                .maps()
                .expect("maps")
                .by_name(name)
                .expect("map")
                .entries(),
            active
                .maps()
                .expect("maps")
                .by_name(name)
                .expect("map")
                .entries(),
            "map {name}"
        );
    }
    // A corrupted log is refused.
    let mut bad = log2.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 1;
    let err = standby.apply_update_log(&bad).expect_err("corrupt");
    assert!(err.to_string().contains("checksum mismatch"), "{err}");
}

#[test]
fn firewall_in_cross_mode_passes_both_ways_and_still_denies() {
    use telvirt_runtime_wasm::vnfs::{FirewallRule, firewall_config, fw_action};
    let (a, b) = ([10, 203, 0, 1], [10, 203, 0, 2]);
    let deny = FirewallRule {
        src: [0; 4],
        dst: b,
        sport: 0,
        dport: 5202,
        proto: 6,
        action: fw_action::DROP,
    };
    let mut arp = vec![0u8; 60];
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    // A VLAN-tagged IPv4 packet must not pass around the rules.
    let mut tagged = trace::ipv4_packet(a, b, 40002, 5202, 6, 68);
    tagged.splice(12..12, [0x81, 0x00, 0x00, 0x0a]);
    let w = Workload {
        vnf: telvirt_runtime_wasm::vnfs::firewall(),
        config: firewall_config(fw_action::CROSS, &[deny]),
        provision: Vec::new(),
        packets: vec![
            (0, trace::ipv4_packet(a, b, 40000, 5201, 6, 64)),
            (1, trace::ipv4_packet(b, a, 5201, 40000, 6, 64)),
            (0, trace::ipv4_packet(a, b, 40001, 5202, 6, 64)),
            (1, arp.clone()),
            (0, arp),
            (0, tagged),
        ],
        ports: 2,
    };
    let (out_w, inst) = wasm(&w);
    let out_n = native(&w);
    assert_eq!(out_w, out_n, "wasm and native outputs differ");
    let verdicts: Vec<Verdict> = out_w.iter().map(|(v, _)| *v).collect();
    assert_eq!(
        verdicts,
        [
            Verdict::Forward(1),
            Verdict::Forward(0),
            Verdict::Drop,
            Verdict::Forward(0),
            Verdict::Forward(1),
            Verdict::Drop
        ]
    );
    let c: Vec<u64> = inst.counters().iter().map(|c| c.1).collect();
    assert_eq!(c, [2, 1, 3], "allowed, denied, non-ip");
}
