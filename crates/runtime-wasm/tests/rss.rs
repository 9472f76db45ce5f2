//! A module using everything it was granted (maps filled to capacity, linear memory grown to its
//! cap and touched, update log on, CPU spent in loops and restarts) raises this process's
//! resident memory by no more than its accepted budget plus a fixed overhead. Alone in its test
//! binary so no other test's allocations are measured with it.

mod common;

use common::*;
use telvirt_runtime_wasm::{
    Error, FailureReason, MapDef, PacketBatch, RestartPolicy, RunLimits, VnfConfig,
};

/// Resident set size of this process in bytes (`VmRSS` of `/proc/self/status`).
fn rss_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let line = s
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("VmRSS line");
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("VmRSS value in kB");
    kib * 1024
}

const ENTRIES: u32 = 100_000;
const MEMORY_CAP: u64 = 16 << 20;

/// Fixed overhead allowed besides the budget: the wasmtime engine and its compiler (cranelift
/// code and tables, touched as it compiles), the compiled module, the module store's buffers,
/// the test harness's thread, and allocator slack (freed memory not yet returned to the
/// system). Measured at about 11 MB in a debug build (growth minus linear memory and the maps'
/// touched pages); 32 MiB leaves room for other builds and allocators.
const FIXED_OVERHEAD: u64 = 32 << 20;

#[test]
fn a_module_filling_its_budget_stays_within_it() {
    let before = rss_bytes();
    let manifest_json = format!(
        r#"{{"abi":1,"name":"hog","version":"1","permissions":["maps.read","maps.write"],"maps":[{{"name":"h","kind":"hash","key_size":8,"value_size":56,"max_entries":{ENTRIES}}}]}}"#
    );
    let pages = MEMORY_CAP / 65536;
    // tv_init: grow memory to the cap (failing tv_init if refused), touch every page, then fill
    // the map to capacity. tv_process: replace entries and dirty memory until out of fuel.
    let text = format!(
        r#"(module
  (import "telvirt" "map_lookup" (func $lookup (param i32 i32 i32) (result i32)))
  (import "telvirt" "map_update" (func $update (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 4)
  (func (export "tv_buffer") (param i32) (result i32) (i32.const 65536))
  (func (export "tv_init") (param $p i32) (param $len i32) (result i32)
    (local $i i32)
    (if (i32.lt_s (memory.grow (i32.sub (i32.const {pages}) (memory.size))) (i32.const 0))
      (then (return (i32.const 1))))
    (block $done (loop $l
      (br_if $done (i32.ge_u (local.get $i) (i32.const {MEMORY_CAP})))
      (i32.store (local.get $i) (local.get $i))
      (local.set $i (i32.add (local.get $i) (i32.const 4096)))
      (br $l)))
    (local.set $i (i32.const 0))
    (block $done (loop $l
      (br_if $done (i32.ge_u (local.get $i) (i32.const {ENTRIES})))
      (i64.store (i32.const 0) (i64.extend_i32_u (local.get $i)))
      (i64.store (i32.const 8) (i64.extend_i32_u (local.get $i)))
      (if (call $update (i32.const 0) (i32.const 0) (i32.const 8) (i32.const 0))
        (then (return (i32.const 2))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $l)))
    (i32.const 0))
  (func (export "tv_process") (param $b i32) (param $n i32) (result i32)
    (local $i i32)
    (loop $l
      (i64.store (i32.const 0) (i64.extend_i32_u (i32.rem_u (local.get $i) (i32.const {ENTRIES}))))
      (drop (call $lookup (i32.const 0) (i32.const 0) (i32.const 8)))
      (i64.store (i32.const 8) (i64.extend_i32_u (local.get $i)))
      (drop (call $update (i32.const 0) (i32.const 0) (i32.const 8) (i32.const 0)))
      (i32.store (i32.and (i32.mul (local.get $i) (i32.const 4096)) (i32.const {mask}))
        (local.get $i))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $l))
    (i32.const 0))
  {}
)"#,
        manifest(&manifest_json),
        mask = (MEMORY_CAP - 4) as u32,
    );
    let bytes = wat::parse_str(&text).expect("WAT");
    let rt = runtime("rss");
    let m = install(&rt, &bytes, "untrusted");
    let cfg = VnfConfig {
        limits: RunLimits {
            memory_bytes: MEMORY_CAP,
            fuel_per_batch: 10_000_000,
        },
        restart: RestartPolicy::OnFailure { max_restarts: 3 },
        ..VnfConfig::default()
    };
    let mut inst = rt
        .instantiate(&m, cfg)
        .expect("grows to its cap and fills its map");
    let maps = inst.maps().expect("maps");
    assert_eq!(maps.by_name("h").expect("map").len(), ENTRIES as usize);
    let budget: u64 = maps.defs().iter().map(MapDef::budget_bytes).sum();
    let log_cap = maps.log_cap() as u64;
    // Logging on, as with the agent's periodic snapshots.
    inst.snapshot_maps().expect("snapshot");
    // Each batch spins until out of fuel; the restart policy re-runs tv_init on a fresh store
    // (memory grown and touched again) three times, then the VNF fails.
    for round in 0..4 {
        match inst.process_batch(&mut PacketBatch::new()) {
            Err(Error::BatchTrapped {
                reason: FailureReason::CpuLimit { .. },
                restarted,
            }) => assert_eq!(restarted, round < 3, "round {round}"),
            other => panic!("round {round}: expected the CPU limit, got {other:?}"),
        }
    }
    let heap = inst.maps().expect("maps").heap_bytes();
    assert!(
        heap <= budget + log_cap,
        "maps and log {heap} > {budget} + {log_cap}"
    );
    let after = rss_bytes();
    let growth = after.saturating_sub(before);
    let bound = MEMORY_CAP + budget + log_cap + FIXED_OVERHEAD;
    eprintln!(
        "RSS {before} -> {after}: growth {growth} bytes; bound {bound} = memory {MEMORY_CAP} + maps {budget} + log {log_cap} + fixed {FIXED_OVERHEAD}"
    );
    assert!(
        growth <= bound,
        "RSS grew by {growth} bytes, more than {bound} (memory {MEMORY_CAP} + maps {budget} + log {log_cap} + fixed {FIXED_OVERHEAD})"
    );
    drop(inst);
}
