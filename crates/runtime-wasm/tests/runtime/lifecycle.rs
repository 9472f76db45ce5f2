//! Life cycle through the public API: install → instantiate → process → lock/unlock →
//! upgrade (maps carried) → remove, and the precompiled cache.

use crate::common;

use common::*;
use telvirt_runtime_wasm::{
    EngineKind, Error, InstallRequest, PacketBatch, Verdict, VnfConfig, VnfState,
};

fn batch(n: usize) -> PacketBatch {
    let mut b = PacketBatch::new();
    for i in 0..n {
        b.push(1, &[i as u8; 64]).expect("push");
    }
    b
}

#[test]
fn install_process_lock_unlock_remove() {
    let rt = runtime("life");
    let m = install(&rt, &counter_module(), "untrusted");
    assert_eq!(m.manifest.name, "counter");
    let artifacts: Vec<_> = std::fs::read_dir(rt.module_store().dir().join("cache"))
        .expect("cache dir")
        .collect();
    assert_eq!(artifacts.len(), 1, "one precompiled artifact for cranelift");
    let mut inst = rt
        .instantiate(&m, VnfConfig::default())
        .expect("instantiate");
    let mut b = batch(32);
    inst.process_batch(&mut b).expect("process");
    assert!(b.verdicts().iter().all(|v| *v == Verdict::Forward(0)));
    assert_eq!(b.packet(5), &[5u8; 64][..]);
    assert_eq!(count_of(&inst), 32);
    assert_eq!(inst.counters(), vec![("packets".to_string(), 32)]);

    inst.lock().expect("lock");
    assert_eq!(inst.state(), &VnfState::Locked);
    let mut b2 = batch(4);
    assert!(matches!(inst.process_batch(&mut b2), Err(Error::Locked)));
    assert_eq!(count_of(&inst), 32, "a locked VNF is not scheduled");
    inst.unlock().expect("unlock");
    inst.process_batch(&mut b2).expect("process after unlock");
    assert_eq!(count_of(&inst), 36);
    assert_eq!(inst.stats().packets_forwarded, 36);

    rt.remove(&m.hash).expect("remove");
    assert!(matches!(rt.installed(&m.hash), Err(Error::NotInstalled(_))));
    assert!(matches!(rt.remove(&m.hash), Err(Error::NotInstalled(_))));
    let left = std::fs::read_dir(rt.module_store().dir().join("cache"))
        .expect("cache dir")
        .count();
    assert_eq!(left, 0, "artifacts removed with the module");
}

#[test]
fn upgrade_keeps_maps_and_refuses_layout_change() {
    let rt = runtime("upgrade");
    let v1 = install(&rt, &counter_module(), "untrusted");
    let mut inst = rt
        .instantiate(&v1, VnfConfig::default())
        .expect("instantiate");
    inst.process_batch(&mut batch(10)).expect("process");
    // v2: forwards to port 1 instead, same map.
    let v2_bytes = abi_module(
        &COUNTER_MANIFEST.replace("1.0.0", "2.0.0"),
        MAP_IMPORTS,
        &COUNT_LOOP.replace(
            "(i32.const 12)) (i32.const 0))",
            "(i32.const 12)) (i32.const 1))",
        ),
        "",
    );
    let v2 = install(&rt, &v2_bytes, "untrusted");
    rt.upgrade(&mut inst, &v2).expect("upgrade");
    assert_eq!(inst.module().manifest.version, "2.0.0");
    let mut b = batch(5);
    inst.process_batch(&mut b).expect("process v2");
    assert_eq!(b.verdict(0), Verdict::Forward(1));
    assert_eq!(count_of(&inst), 15, "map carried over the upgrade");

    // v3 changes the map's value size: refused, v2 keeps running with its state.
    let v3_bytes = abi_module(
        &COUNTER_MANIFEST
            .replace("1.0.0", "3.0.0")
            .replace("\"value_size\":8", "\"value_size\":16"),
        MAP_IMPORTS,
        COUNT_LOOP,
        "",
    );
    let v3 = install(&rt, &v3_bytes, "untrusted");
    let err = rt
        .upgrade(&mut inst, &v3)
        .expect_err("layout change refused");
    assert!(
        err.to_string().contains("map `count` changes layout"),
        "{err}"
    );
    assert_eq!(inst.module().manifest.version, "2.0.0");
    inst.process_batch(&mut batch(1)).expect("v2 still runs");
    assert_eq!(count_of(&inst), 16);

    // v4 fails in tv_init: refused, state intact.
    let bad_init =
        abi_module_with_init(&COUNTER_MANIFEST.replace("1.0.0", "4.0.0"), "(i32.const 7)");
    let v4 = install(&rt, &bad_init, "untrusted");
    let err = rt
        .upgrade(&mut inst, &v4)
        .expect_err("failing init refused");
    assert!(
        err.to_string().contains("tv_init returned error code 7"),
        "{err}"
    );
    inst.process_batch(&mut batch(1)).expect("v2 still runs");
    assert_eq!(count_of(&inst), 17);
    assert_eq!(inst.module().manifest.version, "2.0.0");
}

fn abi_module_with_init(manifest_json: &str, init_body: &str) -> Vec<u8> {
    let text = format!(
        r#"(module
  {MAP_IMPORTS}
  (memory (export "memory") 4)
  (func (export "tv_buffer") (param i32) (result i32) (i32.const 65536))
  (func (export "tv_init") (param i32 i32) (result i32) {init_body})
  (func (export "tv_process") (param $b i32) (param $n i32) (result i32) (local $i i32) {COUNT_LOOP})
  {}
)"#,
        manifest(manifest_json)
    );
    wat::parse_str(&text).expect("wat")
}

#[test]
fn cache_survives_runtime_restart_and_pulley_compiles_on_demand() {
    let dir = temp_dir("cache");
    let bytes = counter_module();
    let hash = {
        let rt =
            telvirt_runtime_wasm::WasmRuntime::new(telvirt_runtime_wasm::RuntimeConfig::new(&dir))
                .expect("rt");
        rt.install(&InstallRequest {
            bytes: &bytes,
            domain: "operator",
            signature: None,
            precompile: &[EngineKind::Cranelift],
        })
        .expect("install")
        .hash
    };
    let rt = telvirt_runtime_wasm::WasmRuntime::new(telvirt_runtime_wasm::RuntimeConfig::new(&dir))
        .expect("rt");
    let m = rt.installed(&hash).expect("still installed");
    assert_eq!(rt.list().expect("list").len(), 1);
    for engine in [EngineKind::Cranelift, EngineKind::Pulley] {
        let cfg = VnfConfig {
            engine,
            ..VnfConfig::default()
        };
        let mut inst = rt.instantiate(&m, cfg).expect("instantiate");
        inst.process_batch(&mut batch(3)).expect("process");
        assert_eq!(count_of(&inst), 3, "{engine:?}");
    }
    let n = std::fs::read_dir(dir.join("cache")).expect("cache").count();
    assert_eq!(n, 2, "pulley artifact cached on first use");
}

#[test]
fn bad_config_is_refused_precisely() {
    let rt = runtime("cfg");
    let m = install(&rt, &counter_module(), "untrusted");
    let cfg = VnfConfig {
        maps: vec![telvirt_runtime_wasm::MapDef {
            name: "nope".into(),
            kind: telvirt_runtime_wasm::MapKind::Hash,
            key_size: 4,
            value_size: 4,
            max_entries: 4,
        }],
        ..VnfConfig::default()
    };
    let err = rt.instantiate(&m, cfg).err().expect("unknown map refused");
    assert!(
        err.to_string()
            .contains("`nope` is not a map of the module (declared: count)"),
        "{err}"
    );
    let cfg = VnfConfig {
        ports: 0,
        ..VnfConfig::default()
    };
    let err = rt.instantiate(&m, cfg).err().expect("zero ports refused");
    assert!(err.to_string().contains("ports"), "{err}");
    let mut b = PacketBatch::new();
    let err = b.push(0, &[0u8; 4000]).expect_err("oversize packet");
    assert!(
        err.to_string().contains("exceeds the ABI maximum of 1920"),
        "{err}"
    );
}

#[test]
fn upgrade_repairs_a_failed_vnf_and_locked_vnf_refuses_changes() {
    let rt = runtime("repair");
    // v1 traps on every batch after counting its packets.
    let v1 = abi_module(
        COUNTER_MANIFEST,
        MAP_IMPORTS,
        &COUNT_LOOP.replace("    (local.get $n)\n", "    unreachable\n"),
        "",
    );
    let v1 = install(&rt, &v1, "untrusted");
    let mut inst = rt
        .instantiate(&v1, VnfConfig::default())
        .expect("instantiate");
    assert!(inst.process_batch(&mut batch(3)).is_err());
    assert!(matches!(inst.state(), VnfState::Failed(_)));
    assert_eq!(count_of(&inst), 3);
    let v2 = install(&rt, &counter_module(), "untrusted");
    rt.upgrade(&mut inst, &v2).expect("upgrade repairs");
    assert_eq!(inst.state(), &VnfState::Running);
    inst.process_batch(&mut batch(2))
        .expect("fixed version runs");
    assert_eq!(count_of(&inst), 5, "state kept across failure and upgrade");
    inst.lock().expect("lock");
    assert!(matches!(rt.upgrade(&mut inst, &v1), Err(Error::Locked)));
    assert!(matches!(
        inst.map_update("count", &[0; 4], &[0; 8]),
        Err(Error::Locked)
    ));
    assert_eq!(count_of(&inst), 5);
}

/// A new version whose `tv_init` writes into the carried maps and then fails leaves the
/// running version's maps as they were: its write undone, an array it shrank whole, an LRU map
/// it only read in its old order; and the maps' change count counts on across a version that
/// did start (a reader comparing counts, like the agent's disk copy, must see later changes).
#[test]
fn a_failed_upgrade_leaves_the_maps_it_was_handed_untouched() {
    let manifest = |version: &str, count_entries: u32| {
        format!(
            r#"{{"abi":1,"name":"counter","version":"{version}","permissions":["maps.read","maps.write","counters"],"maps":[{{"name":"count","kind":"array","key_size":4,"value_size":8,"max_entries":{count_entries}}},{{"name":"recent","kind":"lru_hash","key_size":4,"value_size":8,"max_entries":2}}],"counters":["packets"]}}"#
        )
    };
    let rt = runtime("upgrade-undo");
    let v1 = install(
        &rt,
        &abi_module(&manifest("1.0.0", 4), MAP_IMPORTS, COUNT_LOOP, ""),
        "untrusted",
    );
    let mut inst = rt
        .instantiate(&v1, VnfConfig::default())
        .expect("instantiate");
    inst.process_batch(&mut batch(10)).expect("process");
    for (k, v) in [(1u32, 11u64), (2, 22), (3, 33)] {
        inst.map_update("count", &k.to_le_bytes(), &v.to_le_bytes())
            .expect("count entry");
    }
    for k in [7u32, 8] {
        inst.map_update("recent", &k.to_le_bytes(), &u64::from(k).to_le_bytes())
            .expect("recent entry");
    }
    let entries = |inst: &telvirt_runtime_wasm::VnfInstance| -> Vec<Option<Vec<u8>>> {
        let maps = inst.maps().expect("maps");
        let count = maps.by_name("count").expect("count");
        let recent = maps.by_name("recent").expect("recent");
        (0u32..4)
            .map(|k| count.peek(&k.to_le_bytes()).map(<[u8]>::to_vec))
            .chain([7u32, 8, 9].map(|k| recent.peek(&k.to_le_bytes()).map(<[u8]>::to_vec)))
            .collect()
    };
    let before = entries(&inst);
    let changes = inst.maps().expect("maps").changes();
    assert_eq!(changes, 15, "10 packets and 5 entries written");

    // v2 shrinks `count` to 2 entries; its tv_init writes 999 at entry 0, reads key 7 of
    // `recent` (the older one: a read makes it the newer), inserts key 9 into `recent` (which
    // evicts the older one), then fails.
    let init = r#"
      (i64.store (i32.const 8) (i64.const 999))
      (drop (call $update (i32.const 0) (i32.const 0) (i32.const 8) (i32.const 0)))
      (i32.store (i32.const 0) (i32.const 7))
      (drop (call $lookup (i32.const 1) (i32.const 0) (i32.const 8)))
      (i32.store (i32.const 0) (i32.const 9))
      (drop (call $update (i32.const 1) (i32.const 0) (i32.const 8) (i32.const 0)))
      (i32.const 7)"#;
    let v2 = install(
        &rt,
        &abi_module_with_init(&manifest("2.0.0", 2), init),
        "untrusted",
    );
    let err = rt
        .upgrade(&mut inst, &v2)
        .expect_err("failing init refused");
    assert!(
        err.to_string().contains("tv_init returned error code 7"),
        "{err}"
    );
    assert_eq!(entries(&inst), before, "the maps as they were handed over");
    assert_eq!(inst.maps().expect("maps").changes(), changes);
    // The LRU order was kept too: inserting one more evicts key 7 (the older), not key 8.
    inst.map_update("recent", &10u32.to_le_bytes(), &10u64.to_le_bytes())
        .expect("insert into the full LRU map");
    let recent = inst
        .maps()
        .expect("maps")
        .by_name("recent")
        .expect("recent");
    assert!(
        recent.peek(&7u32.to_le_bytes()).is_none(),
        "key 7 was the older"
    );
    assert!(recent.peek(&8u32.to_le_bytes()).is_some());
    inst.process_batch(&mut batch(1)).expect("v1 still runs");
    assert_eq!(count_of(&inst), 11);

    // A reconfigure starts the module again on its maps: the count goes on from where it was.
    let changes = inst.maps().expect("maps").changes();
    inst.reconfigure(Vec::new(), 10_000_000)
        .expect("reconfigure");
    assert_eq!(inst.maps().expect("maps").changes(), changes);
    inst.process_batch(&mut batch(2))
        .expect("process after reconfigure");
    assert_eq!(inst.maps().expect("maps").changes(), changes + 2);
}
