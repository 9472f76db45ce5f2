//! Confinement of what a VNF's author controls: the module file (read safely, never echoed),
//! the module header, map memory (within `MapDef::budget_bytes`), the update log (bounded),
//! host calls (paid in fuel) and the linear-memory limit (at most 4 GiB).

use crate::common;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use common::*;
use telvirt_runtime_wasm::abi::{code, host_fuel};
use telvirt_runtime_wasm::maps::{DEFAULT_LOG_CAP, MIN_LOG_CAP, log_cap};
use telvirt_runtime_wasm::{
    Error, FailureReason, InstallRequest, MAP_ENTRY_OVERHEAD_BYTES, MAX_MEMORY_BYTES,
    MAX_MODULE_BYTES, MapDef, MapKind, MapSet, PacketBatch, RunLimits, ViolationKind, VnfConfig,
    WasmRuntime, read_module_file,
};

fn def(name: &str, kind: MapKind, ks: u32, vs: u32, max: u32) -> MapDef {
    MapDef {
        name: name.into(),
        kind,
        key_size: ks,
        value_size: vs,
        max_entries: max,
    }
}

fn module_file_error(path: &Path, max: u64) -> String {
    match read_module_file(path, max) {
        Err(e @ Error::ModuleFile { .. }) => e.to_string(),
        other => panic!(
            "{}: expected a module-file refusal, got {other:?}",
            path.display()
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// Module file reader

#[test]
fn reader_refuses_dev_zero_as_a_character_device() {
    let e = module_file_error(Path::new("/dev/zero"), MAX_MODULE_BYTES);
    assert!(
        e.contains("/dev/zero") && e.contains("character device"),
        "{e}"
    );
}

#[test]
fn reader_refuses_a_fifo_without_blocking() {
    let dir = temp_dir("fifo");
    std::fs::create_dir_all(&dir).expect("dir");
    let fifo = dir.join("module.wasm");
    let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).expect("path");
    // SAFETY: `c` is a NUL-terminated path that lives across the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
    // No writer ever opens the FIFO: a blocking open or read would never return.
    let (tx, rx) = mpsc::channel();
    let p = fifo.clone();
    std::thread::spawn(move || {
        let _ = tx.send(read_module_file(&p, MAX_MODULE_BYTES).map_err(|e| e.to_string()));
    });
    let r = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("reading a FIFO must return, not block");
    let e = r.expect_err("a FIFO is refused");
    assert!(e.contains("module.wasm") && e.contains("FIFO"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn reader_refuses_a_directory() {
    let dir = temp_dir("dir");
    std::fs::create_dir_all(&dir).expect("dir");
    let e = module_file_error(&dir, MAX_MODULE_BYTES);
    assert!(e.contains("is a directory"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn reader_refuses_an_oversized_sparse_file_without_reading_it() {
    let dir = temp_dir("sparse");
    std::fs::create_dir_all(&dir).expect("dir");
    let p = dir.join("big.wasm");
    let f = std::fs::File::create(&p).expect("create");
    // 1 TiB, sparse: reading it whole would take the machine's memory.
    f.set_len(1 << 40).expect("set_len");
    let e = module_file_error(&p, MAX_MODULE_BYTES);
    assert!(
        e.contains(&format!("is {} bytes", 1u64 << 40))
            && e.contains(&MAX_MODULE_BYTES.to_string()),
        "{e}"
    );
    // One byte over a small cap is refused, exactly the cap is read.
    f.set_len(0).expect("truncate");
    f.write_all_at(&[7u8; 101], 0).expect("write");
    assert!(module_file_error(&p, 100).contains("is 101 bytes"));
    assert_eq!(
        read_module_file(&p, 101).expect("at the cap"),
        vec![7u8; 101]
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn reader_names_a_missing_file() {
    let p = temp_dir("missing").join("nope.wasm");
    let e = module_file_error(&p, MAX_MODULE_BYTES);
    assert!(e.contains("nope.wasm") && e.contains("no such file"), "{e}");
}

#[test]
fn non_wasm_file_content_never_reaches_an_error() {
    let secret = b"root:x:0:0:root:/root:/bin/bash\nsecret$6$saltsalt$hash\n";
    let dir = temp_dir("secret");
    std::fs::create_dir_all(&dir).expect("dir");
    let p = dir.join("shadow");
    std::fs::write(&p, secret).expect("write");
    let bytes = read_module_file(&p, MAX_MODULE_BYTES).expect("a regular file is read");
    assert_eq!(bytes, secret);
    let rt = runtime("secret");
    let e = rt
        .install(&InstallRequest {
            bytes: &bytes,
            domain: "operator",
            signature: None,
            precompile: &[],
        })
        .expect_err("not wasm");
    let text = e.to_string();
    assert!(
        text.contains("not a WebAssembly module: the file does not start with the \\0asm magic"),
        "{text}"
    );
    assert_no_bytes_of(&text, secret);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Fails if `text` quotes `secret`'s first bytes as text, as decimal or hexadecimal values.
fn assert_no_bytes_of(text: &str, secret: &[u8]) {
    let head = &secret[..4];
    let as_text = String::from_utf8_lossy(head);
    assert!(!text.contains(&*as_text), "quotes text: {text}");
    let hex = format!("{:#x}", head[0]);
    assert!(!text.contains(&hex), "quotes {hex}: {text}");
    let dec = format!("{:?}", head);
    assert!(
        !text.contains(&dec[1..dec.len() - 1]),
        "quotes {dec}: {text}"
    );
}

// ---------------------------------------------------------------------------------------------
// Header check and wasmparser messages

fn invalid_binary(rt: &WasmRuntime, bytes: &[u8]) -> String {
    match rt.install(&InstallRequest {
        bytes,
        domain: "operator",
        signature: None,
        precompile: &[],
    }) {
        Err(Error::Verification(v)) => {
            assert_eq!(v.len(), 1, "{v:?}");
            assert_eq!(v[0].kind, ViolationKind::InvalidBinary);
            v[0].reason.clone()
        }
        other => panic!("expected a verification refusal, got {other:?}"),
    }
}

#[test]
fn header_is_checked_before_the_parser_and_never_quoted() {
    let rt = runtime("header");
    for bad in [&b""[..], b"\0as", b"\x7fELF\x02\x01\x01\0", b"root:x:0:0:"] {
        let r = invalid_binary(&rt, bad);
        assert_eq!(
            r, "not a WebAssembly module: the file does not start with the \\0asm magic",
            "{bad:?}"
        );
    }
    let r = invalid_binary(&rt, b"\0asm\x01\0");
    assert!(r.contains("shorter than the 8-byte header"), "{r}");
    // A component (layer 1, version 0x0d) and a made-up version.
    let r = invalid_binary(&rt, b"\0asm\x0d\0\x01\0");
    assert!(r.starts_with("unsupported wasm version 65549 "), "{r}");
    let r = invalid_binary(&rt, b"\0asm\x02\0\0\0");
    assert!(r.starts_with("unsupported wasm version 2 "), "{r}");
}

#[test]
fn parser_errors_do_not_quote_input_bytes() {
    let rt = runtime("parser");
    // A type section whose one type starts with the byte 0x5a, which is no type form: the
    // parser's message quotes that byte, the reason must not.
    let r = invalid_binary(&rt, b"\0asm\x01\0\0\0\x01\x02\x01\x5a");
    assert!(r.starts_with("wasm validation failed: "), "{r}");
    assert!(r.contains("at byte offset"), "{r}");
    assert!(!r.contains("5a") && !r.contains("90"), "{r}");
}

// ---------------------------------------------------------------------------------------------
// Map memory budget

#[test]
fn budget_formula() {
    let d = def("m", MapKind::Hash, 8, 56, 100_000);
    assert_eq!(
        d.budget_bytes(),
        (8 + 56 + MAP_ENTRY_OVERHEAD_BYTES) * 100_000
    );
    let big = def("m", MapKind::Array, 4, 1024, 1 << 24);
    assert_eq!(
        big.budget_bytes(),
        (4 + 1024 + MAP_ENTRY_OVERHEAD_BYTES) << 24,
        "no overflow at the largest map"
    );
}

/// Fills map 0 of `s` to capacity, then churns (delete one, insert a new key) `churn` times,
/// checking the heap against the budget after every phase.
fn fill_and_churn(kind: MapKind, ks: u32, vs: u32, n: u32, churn: u32) {
    let d = def("m", kind, ks, vs, n);
    let budget = d.budget_bytes();
    let mut s = MapSet::new(std::slice::from_ref(&d)).expect("maps");
    let key = |i: u32| {
        let mut k = vec![0u8; ks as usize];
        let b = i.to_le_bytes();
        // One-byte keys wrap (callers keep fewer than 256 live).
        let l = b.len().min(k.len());
        k[..l].copy_from_slice(&b[..l]);
        k
    };
    let val = vec![0xabu8; vs as usize];
    let check = |s: &MapSet, phase: &str| {
        let m = s.get(0).expect("map");
        assert!(
            m.heap_bytes() <= budget,
            "{kind:?} ks {ks} vs {vs} max {n} {phase}: heap {} > budget {budget}",
            m.heap_bytes()
        );
    };
    check(&s, "empty");
    for i in 0..n {
        assert_eq!(s.update(0, &key(i), &val, 0), code::OK);
    }
    assert_eq!(s.get(0).expect("map").len(), n as usize);
    check(&s, "full");
    // Kinds that refuse when full: make room first; LRU maps evict on their own.
    for j in 0..churn {
        let i = n + j;
        if kind == MapKind::Hash {
            assert_eq!(s.delete(0, &key(i - n)), code::OK);
        }
        assert_eq!(s.update(0, &key(i), &val, 0), code::OK);
        if kind == MapKind::Hash && j % 3 == 0 {
            // Also leave holes and refill them.
            assert_eq!(s.delete(0, &key(i)), code::OK);
            assert_eq!(s.update(0, &key(i), &val, 0), code::OK);
        }
    }
    check(&s, "after churn");
}

#[test]
fn hash_and_lru_maps_filled_and_churned_stay_within_budget() {
    // Small sizes around hashbrown's bucket boundaries, then larger ones.
    let sizes = (1..=40).chain([55, 56, 57, 100, 112, 113, 1000, 3584, 3585, 20_000]);
    for n in sizes {
        for kind in [MapKind::Hash, MapKind::LruHash] {
            if n < 256 {
                // The smallest entries, where the per-entry overhead weighs most (one-byte
                // keys: keys wrap at 256, distinct over any window of fewer entries).
                fill_and_churn(kind, 1, 1, n, 4 * n);
            }
            fill_and_churn(kind, 4, 4, n, 4 * n);
            fill_and_churn(kind, 16, 48, n, 2 * n);
        }
    }
    fill_and_churn(MapKind::Hash, 8, 56, 100_000, 100_000);
    fill_and_churn(MapKind::LruHash, 4, 4, 100_000, 100_000);
}

#[test]
fn array_maps_stay_within_budget() {
    for (vs, n) in [(1, 1), (8, 1000), (1024, 4096)] {
        let d = def("a", MapKind::Array, 4, vs, n);
        let s = MapSet::new(std::slice::from_ref(&d)).expect("maps");
        let m = s.get(0).expect("map");
        assert!(m.heap_bytes() <= d.budget_bytes());
        assert!(
            m.heap_bytes() >= u64::from(vs) * u64::from(n),
            "values are counted"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Update log bound

#[test]
fn log_cap_follows_the_maps_budget() {
    let small = [def("s", MapKind::Hash, 4, 4, 4)];
    assert_eq!(log_cap(&small), MIN_LOG_CAP);
    let mid = [
        def("a", MapKind::Hash, 8, 56, 10_000),
        def("b", MapKind::Array, 4, 8, 1000),
    ];
    // A full snapshot's payload: 10,000 x 64 + 1,000 x 12 bytes, below the maps' budget.
    assert_eq!(log_cap(&mid), 10_000 * 64 + 1000 * 12);
    let budget: u64 = mid.iter().map(MapDef::budget_bytes).sum();
    assert!((log_cap(&mid) as u64) < budget);
    let huge = [def("h", MapKind::Hash, 1024, 1024, 1 << 24)];
    assert_eq!(log_cap(&huge), DEFAULT_LOG_CAP);
}

#[test]
fn an_overflowing_log_is_dropped_and_the_next_delta_is_a_snapshot() {
    let defs = [def("h", MapKind::Hash, 4, 60, 2000)];
    let mut a = MapSet::new(&defs).expect("maps");
    let cap = a.log_cap();
    assert_eq!(cap, 2000 * 64);
    let snap = a.snapshot();
    let mut standby = MapSet::restore(&defs, &snap).expect("restore");
    // A log within the cap replays.
    for i in 0..10u32 {
        assert_eq!(a.update(0, &i.to_le_bytes(), &[1; 60], 0), code::OK);
    }
    standby
        .apply_log(&a.take_log().expect("log"))
        .expect("apply");
    // Churn far past the cap: the log is freed, not grown.
    let per_entry = 3 + 4 + 60;
    let rounds = 4 * cap / per_entry;
    for _ in 0..rounds {
        assert_eq!(a.update(0, &77u32.to_le_bytes(), &[2; 60], 0), code::OK);
        assert_eq!(a.delete(0, &77u32.to_le_bytes()), code::OK);
        assert!(a.log_heap_bytes() <= cap as u64, "log within its cap");
    }
    assert!(a.log_overflowed());
    assert_eq!(a.log_heap_bytes(), 0, "an overflowed log holds nothing");
    assert_eq!(
        a.logged_updates(),
        Some(2 * rounds as u64),
        "still counts changes"
    );
    let e = a.take_log().expect_err("overflowed").to_string();
    assert!(e.contains("take a new snapshot"), "{e}");
    // The next delta is a full snapshot; logging then resumes and replays.
    assert_eq!(a.update(0, &5u32.to_le_bytes(), &[3; 60], 0), code::OK);
    let mut standby = MapSet::restore(&defs, &a.snapshot()).expect("restore");
    assert!(!a.log_overflowed());
    assert_eq!(a.delete(0, &5u32.to_le_bytes()), code::OK);
    standby
        .apply_log(&a.take_log().expect("log after snapshot"))
        .expect("apply");
    assert_eq!(
        a.get(0).expect("map").entries(),
        standby.get(0).expect("map").entries()
    );
}

const CHURN_MANIFEST: &str = r#"{"abi":1,"name":"churn","version":"1","permissions":["maps.read","maps.write"],"maps":[{"name":"h","kind":"hash","key_size":8,"value_size":8,"max_entries":1024}]}"#;

/// A module with the map imports whose `tv_init` and `tv_process` bodies are given (locals
/// `$i` and `$j` of type i32 in both; key at 0, value at 8, the batch buffer at 64 KiB).
fn map_module(manifest_json: &str, init: &str, process: &str, pages: u32) -> Vec<u8> {
    let text = format!(
        r#"(module
  (import "telvirt" "map_lookup" (func $lookup (param i32 i32 i32) (result i32)))
  (import "telvirt" "map_update" (func $update (param i32 i32 i32 i32) (result i32)))
  (import "telvirt" "map_delete" (func $delete (param i32 i32) (result i32)))
  (memory (export "memory") {pages})
  (func (export "tv_buffer") (param i32) (result i32) (i32.const 65536))
  (func (export "tv_init") (param $p i32) (param $len i32) (result i32)
    (local $i i32) (local $j i32)
    {init})
  (func (export "tv_process") (param $b i32) (param $n i32) (result i32)
    (local $i i32) (local $j i32)
    {process})
  {}
)"#,
        manifest(manifest_json)
    );
    wat::parse_str(&text).unwrap_or_else(|e| panic!("bad test WAT: {e}\n{text}"))
}

/// Inserts and deletes key `$i` (8 bytes at 0) `count` times.
fn churn_loop(count: u32) -> String {
    format!(
        r#"(block $done (loop $l
      (br_if $done (i32.ge_u (local.get $i) (i32.const {count})))
      (i64.store (i32.const 0) (i64.extend_i32_u (i32.and (local.get $i) (i32.const 7))))
      (drop (call $update (i32.const 0) (i32.const 0) (i32.const 8) (i32.const 0)))
      (drop (call $delete (i32.const 0) (i32.const 0)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $l)))"#
    )
}

#[test]
fn module_churning_its_map_keeps_the_update_log_bounded() {
    let rt = runtime("churn");
    let process = format!("{} (i32.const 0)", churn_loop(1_000_000));
    let m = install(
        &rt,
        &map_module(CHURN_MANIFEST, "(i32.const 0)", &process, 4),
        "untrusted",
    );
    let cfg = VnfConfig {
        limits: RunLimits {
            memory_bytes: 1 << 20,
            fuel_per_batch: 1 << 30,
        },
        ..VnfConfig::default()
    };
    let mut inst = rt.instantiate(&m, cfg).expect("instantiate");
    // Logging starts with the first snapshot, as the agent's periodic snapshots do.
    inst.snapshot_maps().expect("snapshot");
    // One batch: two million host calls, each logged (19 or 11 bytes): 30 MB unbounded.
    inst.process_batch(&mut PacketBatch::new())
        .expect("the churn fits its fuel");
    let maps = inst.maps().expect("maps");
    assert_eq!(maps.logged_updates(), Some(2_000_000));
    let budget: u64 = maps.defs().iter().map(MapDef::budget_bytes).sum();
    assert!(maps.log_cap() as u64 <= budget.max(MIN_LOG_CAP as u64));
    assert!(maps.heap_bytes() <= budget + maps.log_cap() as u64);
    assert!(
        maps.log_heap_bytes() <= maps.log_cap() as u64,
        "log holds {} bytes, cap {}",
        maps.log_heap_bytes(),
        maps.log_cap()
    );
    assert!(maps.log_overflowed());
    assert!(
        inst.take_update_log().is_err(),
        "the next delta is a snapshot"
    );
    inst.snapshot_maps().expect("snapshot");
    assert!(inst.take_update_log().is_ok());
}

// ---------------------------------------------------------------------------------------------
// Fuel of host calls

fn cpu_limit_at_init(rt: &WasmRuntime, bytes: &[u8], fuel_per_batch: u64) -> Option<Error> {
    let m = install(rt, bytes, "untrusted");
    let cfg = VnfConfig {
        limits: RunLimits {
            memory_bytes: 1 << 20,
            fuel_per_batch,
        },
        ..VnfConfig::default()
    };
    rt.instantiate(&m, cfg).err()
}

#[test]
fn tv_init_looping_on_map_updates_runs_out_of_fuel() {
    let rt = runtime("fuel-loop");
    let init = r#"
      (loop $l
        (i64.store (i32.const 0) (i64.extend_i32_u (local.get $i)))
        (drop (call $update (i32.const 0) (i32.const 0) (i32.const 8) (i32.const 0)))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $l))
      (i32.const 0)"#;
    let bytes = map_module(CHURN_MANIFEST, init, "(i32.const 0)", 4);
    match cpu_limit_at_init(&rt, &bytes, 100_000) {
        Some(Error::Failed(FailureReason::CpuLimit { fuel_per_batch })) => {
            assert_eq!(fuel_per_batch, 100_000)
        }
        other => panic!("expected the CPU limit, got {other:?}"),
    }
}

const FUEL_MANIFEST: &str = r#"{"abi":1,"name":"fuel","version":"1","permissions":["maps.read","maps.write"],"maps":[{"name":"h","kind":"hash","key_size":8,"value_size":8,"max_entries":1024},{"name":"big","kind":"hash","key_size":8,"value_size":1024,"max_entries":16}]}"#;

/// Whether a module whose `tv_init` runs `body` `calls` times starts with `total` fuel for
/// `tv_init` (16 times the batch budget); panics on any failure other than the CPU limit.
fn init_fits(body: &str, calls: u64, total: u64) -> bool {
    let init = format!(
        r#"(block $done (loop $l
        (br_if $done (i32.ge_u (local.get $i) (i32.const {calls})))
        {body}
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $l)))
      (i32.const 0)"#
    );
    let rt = runtime("fuel-charge");
    let bytes = map_module(FUEL_MANIFEST, &init, "(i32.const 0)", 4);
    match cpu_limit_at_init(&rt, &bytes, total.div_ceil(16)) {
        None => true,
        Some(Error::Failed(FailureReason::CpuLimit { .. })) => false,
        Some(other) => panic!("expected success or the CPU limit, got {other}"),
    }
}

#[test]
fn map_host_calls_are_charged_their_documented_fuel() {
    let calls: u64 = 20_000;
    // The same wasm around the call, without the call: four constants dropped.
    let control =
        "(drop (i32.const 0)) (drop (i32.const 0)) (drop (i32.const 0)) (drop (i32.const 0))";
    // Fuel per loop round for the wasm alone: the control fits in it.
    let wasm = 60;
    assert!(
        init_fits(control, calls, calls * wasm),
        "the wasm alone fits"
    );
    for (call, cost) in [
        (
            "(drop (call $update (i32.const 0) (i32.const 0) (i32.const 8) (i32.const 0)))",
            host_fuel::cost(host_fuel::MAP_UPDATE, 8 + 8),
        ),
        (
            "(drop (call $delete (i32.const 0) (i32.const 0)) (drop (i32.const 0)) (drop (i32.const 0)))",
            host_fuel::cost(host_fuel::MAP_DELETE, 8),
        ),
        (
            "(drop (call $lookup (i32.const 1) (i32.const 0) (i32.const 8))) (drop (i32.const 0))",
            host_fuel::cost(host_fuel::MAP_LOOKUP, 8 + 1024),
        ),
    ] {
        assert!(
            cost > wasm,
            "{call}: the charge must exceed the wasm budget"
        );
        assert!(
            !init_fits(call, calls, calls * wasm),
            "{call}: the host charge of {cost} per call must not be free"
        );
        assert!(
            init_fits(call, calls, calls * (wasm + cost)),
            "{call}: {cost} per call plus the wasm fits"
        );
    }
    assert_eq!(
        host_fuel::cost(host_fuel::MAP_UPDATE, 16),
        host_fuel::MAP_UPDATE + 2
    );
}

/// `random` costs its base plus a unit per 8 bytes it fills: a module filling 4 KiB in a loop
/// runs out of fuel where the wasm alone would not, and fits once the charge is budgeted.
#[test]
fn random_is_charged_by_the_bytes_it_fills() {
    let calls: u64 = 2_000;
    let fits = |call: &str, total: u64| -> bool {
        let text = format!(
            r#"(module
  (import "telvirt" "random" (func $random (param i32 i32) (result i32)))
  (memory (export "memory") 4)
  (func (export "tv_buffer") (param i32) (result i32) (i32.const 65536))
  (func (export "tv_init") (param $p i32) (param $len i32) (result i32)
    (local $i i32)
    (block $done (loop $l
      (br_if $done (i32.ge_u (local.get $i) (i32.const {calls})))
      {call}
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $l)))
    (i32.const 0))
  (func (export "tv_process") (param $b i32) (param $n i32) (result i32) (i32.const 0))
  {}
)"#,
            manifest(r#"{"abi":1,"name":"rand","version":"1","permissions":["random"]}"#)
        );
        let rt = runtime("fuel-random");
        let m = install(&rt, &wat::parse_str(&text).expect("wat"), "operator");
        let cfg = VnfConfig {
            limits: RunLimits {
                memory_bytes: 1 << 20,
                fuel_per_batch: total.div_ceil(16),
            },
            ..VnfConfig::default()
        };
        match rt.instantiate(&m, cfg).err() {
            None => true,
            Some(Error::Failed(FailureReason::CpuLimit { .. })) => false,
            Some(other) => panic!("expected success or the CPU limit, got {other}"),
        }
    };
    let wasm = 60;
    let control = "(drop (i32.const 0)) (drop (i32.const 4096))";
    assert!(fits(control, calls * wasm), "the wasm alone fits");
    let call = "(drop (call $random (i32.const 0) (i32.const 4096)))";
    let cost = host_fuel::cost(host_fuel::RANDOM, 4096);
    assert_eq!(cost, host_fuel::RANDOM + 512);
    assert!(
        !fits(call, calls * wasm),
        "4 KiB of random bytes must not be free"
    );
    assert!(
        fits(call, calls * (wasm + cost)),
        "{cost} per call plus the wasm fits"
    );
}

// ---------------------------------------------------------------------------------------------
// Linear-memory limit

#[test]
fn memory_limit_above_4_gib_is_refused_naming_the_field() {
    let rt = runtime("mem-limit");
    let m = install(&rt, &counter_module(), "untrusted");
    for bytes in [MAX_MEMORY_BYTES + 1, 8 << 40] {
        let cfg = VnfConfig {
            limits: RunLimits {
                memory_bytes: bytes,
                ..RunLimits::default()
            },
            ..VnfConfig::default()
        };
        match rt.instantiate(&m, cfg) {
            Err(e @ Error::Config { .. }) => {
                let t = e.to_string();
                assert!(
                    t.contains("limits.memory_bytes")
                        && t.contains(&bytes.to_string())
                        && t.contains("4294967296"),
                    "{t}"
                );
            }
            other => panic!("{bytes}: expected a config error, got {:?}", other.err()),
        }
    }
    let cfg = VnfConfig {
        limits: RunLimits {
            memory_bytes: MAX_MEMORY_BYTES,
            ..RunLimits::default()
        },
        ..VnfConfig::default()
    };
    rt.instantiate(&m, cfg).expect("exactly 4 GiB is accepted");
}
