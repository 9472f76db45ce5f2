//! Host functions other than maps: clock (replay time), log (bounded), random (seeded), emit
//! (bounded, port-checked), counters, tv_tick, and pointer checks (EFAULT).

use crate::common;

use common::*;
use telvirt_runtime_wasm::{EngineKind, PacketBatch, VnfConfig};

const MANIFEST: &str = r#"{"abi":1,"name":"hostfns","version":"1","permissions":["clock","log","random","emit","counters"],"counters":["ticks","last_rc"]}"#;

const IMPORTS: &str = r#"
  (import "telvirt" "clock_ns" (func $clock (result i64)))
  (import "telvirt" "log" (func $log (param i32 i32 i32)))
  (import "telvirt" "random" (func $random (param i32 i32) (result i32)))
  (import "telvirt" "emit" (func $emit (param i32 i32 i32) (result i32)))
  (import "telvirt" "counter_add" (func $counter (param i32 i64)))
"#;

// Per batch: write clock_ns into the first packet's first 8 bytes (forwarding it to port 0), log "hello" 20 times, 8 random bytes after it, emit 70 copies of
// the first packet to port 1, one emit to port 5 (EINVAL) and one with a bad pointer (EFAULT);
// return codes summed into counter 1.
const PROCESS: &str = r#"
    (local $rc i32)
    (i64.store (i32.add (local.get $b) (i32.load (local.get $b))) (call $clock))
    (i32.store offset=12 (local.get $b) (i32.const 0))
    (block $d (loop $l
      (br_if $d (i32.ge_u (local.get $i) (i32.const 20)))
      (call $log (i32.const 2) (i32.const 100) (i32.const 5))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $l)))
    (drop (call $random (i32.add (i32.const 8) (i32.add (local.get $b) (i32.load (local.get $b)))) (i32.const 8)))
    (local.set $i (i32.const 0))
    (block $d2 (loop $l2
      (br_if $d2 (i32.ge_u (local.get $i) (i32.const 70)))
      (local.set $rc (i32.add (local.get $rc)
        (call $emit (i32.const 1) (i32.add (local.get $b) (i32.load (local.get $b))) (i32.const 64))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $l2)))
    (local.set $rc (i32.add (local.get $rc) (call $emit (i32.const 5) (i32.const 0) (i32.const 4))))
    (local.set $rc (i32.add (local.get $rc) (call $emit (i32.const 0) (i32.const -16) (i32.const 64))))
    (call $counter (i32.const 1) (i64.extend_i32_s (local.get $rc)))
    (local.get $n)
"#;

const EXTRA: &str = r#"
  (data (i32.const 100) "hello")
  (func (export "tv_tick") (param i64) (call $counter (i32.const 0) (local.get 0)))
  (func (export "read_i64") (param i32) (result i64) (i64.load (local.get 0)))
"#;

#[test]
fn clock_log_random_emit_counters_and_tick() {
    let rt = runtime("hostfns");
    let m = install(
        &rt,
        &abi_module(MANIFEST, IMPORTS, PROCESS, EXTRA),
        "operator",
    );
    let cfg = VnfConfig {
        random_seed: Some(42),
        ..VnfConfig::default()
    };
    let mut inst = rt.instantiate(&m, cfg).expect("instantiate");
    let mut b = PacketBatch::new();
    b.push(0, &[0xab; 64]).expect("push");
    b.now_ns = Some(123_456_789);
    inst.process_batch(&mut b).expect("process");
    // clock_ns returns the batch's replay time; random fills 8 bytes after it.
    assert_eq!(&b.packet(0)[..8], &123_456_789u64.to_le_bytes());
    let random = b.packet(0)[8..16].to_vec();
    assert_ne!(random, vec![0xab; 8]);
    // emit: 64 accepted, 6 EFULL, one EINVAL (port 5 of 2), one EFAULT.
    assert_eq!(b.emitted().len(), 64);
    assert_eq!(
        b.emitted().get(0),
        Some((1, b.packet(0))),
        "emitted copies of the rewritten packet"
    );
    let expected_rc = 6 * -7 + -5 + -6;
    assert_eq!(inst.counters()[1].1 as i64, expected_rc);
    assert_eq!(inst.stats().packets_emitted, 64);
    // log: 16 kept per batch, 4 counted as dropped.
    let logs = inst.logs();
    assert_eq!(logs.len(), 16);
    assert_eq!(logs[0].text, "hello");
    assert_eq!(logs[0].level, 2);
    assert_eq!(inst.stats().logs_dropped, 4);
    // tick goes to counter 0.
    inst.tick(7).expect("tick");
    inst.tick(5).expect("tick");
    assert_eq!(inst.counters()[0], ("ticks".to_string(), 12));
    // The same seed gives the same random bytes in another instance.
    let cfg = VnfConfig {
        random_seed: Some(42),
        ..VnfConfig::default()
    };
    let mut other = rt.instantiate(&m, cfg).expect("instantiate");
    let mut b2 = PacketBatch::new();
    b2.push(0, &[0xab; 64]).expect("push");
    other.process_batch(&mut b2).expect("process");
    assert_eq!(other.counters()[1].1 as i64, expected_rc);
    assert_eq!(b2.emitted().len(), 64, "emit buffer is per batch");
    assert_eq!(
        &b2.packet(0)[8..16],
        &random[..],
        "seeded random is reproducible"
    );
    assert_ne!(
        &b2.packet(0)[..8],
        &123_456_789u64.to_le_bytes(),
        "live clock without replay time"
    );
}

// Warms the host's memory view with a lookup, grows memory by a page, then updates and looks up
// the `count` map through pointers in the new page; counter 0 gets 1000 * (sum of both return
// codes) + the value read back. A stale view would answer EFAULT (-6) for the new page.
const GROW_THEN_CALL: &str = r#"
    (local $p i32)
    (local $rc i32)
    (drop (call $lookup (i32.const 0) (i32.const 0) (i32.const 16)))
    (local.set $p (i32.mul (memory.grow (i32.const 1)) (i32.const 65536)))
    (i32.store (local.get $p) (i32.const 0))
    (i64.store offset=8 (local.get $p) (i64.const 77))
    (local.set $rc (call $update (i32.const 0) (local.get $p) (i32.add (local.get $p) (i32.const 8)) (i32.const 0)))
    (local.set $rc (i32.add (local.get $rc)
      (call $lookup (i32.const 0) (local.get $p) (i32.add (local.get $p) (i32.const 16)))))
    (call $counter (i32.const 0)
      (i64.add (i64.mul (i64.extend_i32_s (local.get $rc)) (i64.const 1000))
               (i64.load offset=16 (local.get $p))))
    (local.get $n)
"#;

#[test]
fn host_calls_see_memory_grown_during_the_batch() {
    let rt = runtime("grow");
    let m = install(
        &rt,
        &abi_module(COUNTER_MANIFEST, MAP_IMPORTS, GROW_THEN_CALL, ""),
        "operator",
    );
    for engine in [EngineKind::Cranelift, EngineKind::Pulley] {
        let cfg = VnfConfig {
            engine,
            ..VnfConfig::default()
        };
        let mut inst = rt.instantiate(&m, cfg).expect("instantiate");
        let mut b = PacketBatch::new();
        for round in 1..=3u64 {
            b.clear();
            b.push(0, &[0; 64]).expect("push");
            inst.process_batch(&mut b).expect("process");
            assert_eq!(
                inst.counters()[0].1,
                77 * round,
                "{engine:?} round {round}: host calls into the new page must succeed"
            );
        }
    }
}
