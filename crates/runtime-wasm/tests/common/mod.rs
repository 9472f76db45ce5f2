//! Test helpers: WAT modules following VNF ABI v1 and a runtime on a temporary store.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use telvirt_runtime_wasm::{
    EngineKind, InstallRequest, InstalledModule, RuntimeConfig, WasmRuntime,
};

/// A fresh, unique store directory under the target directory's `tmp` (which `cargo clean`
/// empties; the tests leave their stores there, not in the host's temporary directory).
pub fn temp_dir(tag: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "telvirt-rw-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&d);
    d
}

pub fn runtime(tag: &str) -> WasmRuntime {
    WasmRuntime::new(RuntimeConfig::new(temp_dir(tag))).expect("runtime")
}

/// Manifest JSON escaped for a WAT string.
pub fn manifest(json: &str) -> String {
    format!(
        "(@custom \"telvirt.manifest\" \"{}\")",
        json.replace('\\', "\\\\").replace('"', "\\\"")
    )
}

pub const COUNTER_MANIFEST: &str = r#"{"abi":1,"name":"counter","version":"1.0.0","permissions":["maps.read","maps.write","counters"],"maps":[{"name":"count","kind":"array","key_size":4,"value_size":8,"max_entries":1}],"counters":["packets"]}"#;

/// Standard imports used by the test modules.
pub const MAP_IMPORTS: &str = r#"
  (import "telvirt" "map_lookup" (func $lookup (param i32 i32 i32) (result i32)))
  (import "telvirt" "map_update" (func $update (param i32 i32 i32 i32) (result i32)))
  (import "telvirt" "counter_add" (func $counter (param i32 i64)))
"#;

/// A module whose `tv_process` body is `process` (params $b $n, local $i), exporting the ABI.
pub fn abi_module(manifest_json: &str, imports: &str, process: &str, extra: &str) -> Vec<u8> {
    let text = format!(
        r#"(module
  {imports}
  (memory (export "memory") 4)
  (func (export "tv_buffer") (param i32) (result i32) (i32.const 65536))
  (func (export "tv_init") (param i32 i32) (result i32) (i32.const 0))
  (func (export "tv_process") (param $b i32) (param $n i32) (result i32)
    (local $i i32)
    {process})
  {extra}
  {}
)"#,
        manifest(manifest_json)
    );
    wat::parse_str(&text).unwrap_or_else(|e| panic!("bad test WAT: {e}\n{text}"))
}

/// Loop over packets: forward each to port 0 and add 1 to the `count` array map and counter 0.
pub const COUNT_LOOP: &str = r#"
    (block $done (loop $l
      (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
      (i32.store (i32.add (i32.add (local.get $b) (i32.mul (local.get $i) (i32.const 16))) (i32.const 12)) (i32.const 0))
      (drop (call $lookup (i32.const 0) (i32.const 0) (i32.const 8)))
      (i64.store (i32.const 8) (i64.add (i64.load (i32.const 8)) (i64.const 1)))
      (drop (call $update (i32.const 0) (i32.const 0) (i32.const 8) (i32.const 0)))
      (call $counter (i32.const 0) (i64.const 1))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $l)))
    (local.get $n)
"#;

pub fn counter_module() -> Vec<u8> {
    abi_module(COUNTER_MANIFEST, MAP_IMPORTS, COUNT_LOOP, "")
}

pub fn install(rt: &WasmRuntime, bytes: &[u8], domain: &str) -> InstalledModule {
    rt.install(&InstallRequest {
        bytes,
        domain,
        signature: None,
        precompile: &[EngineKind::Cranelift],
    })
    .expect("install")
}

/// Value of the counter module's `count` map.
pub fn count_of(inst: &telvirt_runtime_wasm::VnfInstance) -> u64 {
    let m = inst
        .maps()
        .expect("maps")
        .by_name("count")
        .expect("count map");
    let v = m.peek(&0u32.to_le_bytes()).expect("entry 0");
    u64::from_le_bytes(v.try_into().expect("8 bytes"))
}
