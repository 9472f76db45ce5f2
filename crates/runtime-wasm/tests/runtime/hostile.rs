//! Hostile modules: each is refused at install with a precise reason, or contained at run time
//! (batch dropped and counted, VNF Failed or restarted) while the host and a well-behaved VNF
//! running beside it go on.

use crate::common;

use common::*;
use telvirt_runtime_wasm::{
    EngineKind, Error, FailureReason, InstallRequest, PacketBatch, RestartPolicy, RunLimits,
    RuntimeConfig, SecurityPolicy, Verdict, VerifyLimits, ViolationKind, VnfConfig, VnfInstance,
    VnfState, WasmRuntime,
};

fn batch(n: usize) -> PacketBatch {
    let mut b = PacketBatch::new();
    for i in 0..n {
        b.push(0, &[i as u8; 64]).expect("push");
    }
    b
}

fn refused(rt: &WasmRuntime, bytes: &[u8], domain: &str) -> Vec<(ViolationKind, String)> {
    match rt.install(&InstallRequest {
        bytes,
        domain,
        signature: None,
        precompile: &[],
    }) {
        Err(Error::Verification(v)) => v.into_iter().map(|v| (v.kind, v.reason)).collect(),
        other => panic!("expected a verification refusal, got {other:?}"),
    }
}

fn has(v: &[(ViolationKind, String)], kind: ViolationKind, needle: &str) -> bool {
    v.iter().any(|(k, r)| *k == kind && r.contains(needle))
}

/// A well-behaved VNF that must keep working next to the hostile one.
fn bystander(rt: &WasmRuntime) -> VnfInstance {
    let m = install(rt, &counter_module(), "untrusted");
    rt.instantiate(&m, VnfConfig::default()).expect("bystander")
}

fn bystander_still_works(b: &mut VnfInstance, expect_count: u64) {
    let mut pk = batch(2);
    b.process_batch(&mut pk).expect("bystander processes");
    assert_eq!(pk.verdicts(), &[Verdict::Forward(0), Verdict::Forward(0)]);
    assert_eq!(count_of(b), expect_count);
}

fn run_hostile(process: &str, extra: &str, engine: EngineKind) -> (Error, VnfInstance) {
    let rt = runtime("hostile");
    let mut good = bystander(&rt);
    bystander_still_works(&mut good, 2);
    let bytes = abi_module(COUNTER_MANIFEST, MAP_IMPORTS, process, extra);
    let m = install(&rt, &bytes, "untrusted");
    let cfg = VnfConfig {
        engine,
        limits: RunLimits {
            memory_bytes: 1 << 20,
            fuel_per_batch: 1_000_000,
        },
        ..VnfConfig::default()
    };
    let mut bad = rt.instantiate(&m, cfg).expect("hostile instantiates");
    let mut b = batch(8);
    let err = bad
        .process_batch(&mut b)
        .expect_err("hostile batch must not succeed");
    assert!(
        b.verdicts().iter().all(|v| *v == Verdict::Drop),
        "batch dropped"
    );
    assert_eq!(bad.stats().batches_trapped, 1);
    assert!(matches!(bad.state(), VnfState::Failed(_)));
    // A failed VNF refuses further batches with its reason.
    assert!(matches!(
        bad.process_batch(&mut batch(1)),
        Err(Error::Failed(_))
    ));
    bystander_still_works(&mut good, 4);
    (err, bad)
}

fn reason(e: &Error) -> &FailureReason {
    match e {
        Error::BatchTrapped { reason, restarted } => {
            assert!(!restarted);
            reason
        }
        other => panic!("expected BatchTrapped, got {other}"),
    }
}

#[test]
fn infinite_loop_hits_cpu_limit_on_both_engines() {
    for engine in [EngineKind::Cranelift, EngineKind::Pulley] {
        let (e, _) = run_hostile("(loop $l (br $l)) (i32.const 0)", "", engine);
        assert_eq!(
            reason(&e),
            &FailureReason::CpuLimit {
                fuel_per_batch: 1_000_000
            },
            "{engine:?}"
        );
    }
}

#[test]
fn memory_growth_bomb_hits_memory_cap() {
    let (e, _) = run_hostile(
        "(loop $l (drop (memory.grow (i32.const 4))) (br $l)) (i32.const 0)",
        "",
        EngineKind::Cranelift,
    );
    match reason(&e) {
        FailureReason::MemoryLimit {
            cap_bytes,
            requested_bytes,
        } => {
            assert_eq!(*cap_bytes, 1 << 20);
            assert!(*requested_bytes > 1 << 20);
        }
        other => panic!("expected memory limit, got {other}"),
    }
}

#[test]
fn deep_recursion_hits_stack_limit_on_both_engines() {
    let rec = "(func $r (param i32) (result i32) (i32.add (call $r (i32.add (local.get 0) (i32.const 1))) (i32.const 1)))";
    for engine in [EngineKind::Cranelift, EngineKind::Pulley] {
        let (e, _) = run_hostile("(call $r (i32.const 0))", rec, engine);
        assert!(
            matches!(reason(&e), FailureReason::StackOverflow { max_stack_bytes } if *max_stack_bytes == 256 << 10),
            "{engine:?}: {e}"
        );
    }
}

#[test]
fn trap_mid_batch_drops_the_batch_and_restart_policy_keeps_maps() {
    // Counts packets 0 and 1, then hits `unreachable` on packet 2.
    let process = COUNT_LOOP.replace(
        "(br_if $done (i32.ge_u (local.get $i) (local.get $n)))",
        "(br_if $done (i32.ge_u (local.get $i) (local.get $n)))
         (if (i32.eq (local.get $i) (i32.const 2)) (then unreachable))",
    );
    let (e, bad) = run_hostile(&process, "", EngineKind::Cranelift);
    assert!(
        matches!(reason(&e), FailureReason::Trap(t) if t.contains("unreachable")),
        "{e}"
    );
    assert_eq!(count_of(&bad), 2, "maps of a failed VNF stay readable");

    // With a restart policy the VNF is re-instantiated and its maps carried.
    let rt = runtime("restart");
    let m = install(
        &rt,
        &abi_module(COUNTER_MANIFEST, MAP_IMPORTS, &process, ""),
        "untrusted",
    );
    let cfg = VnfConfig {
        restart: RestartPolicy::OnFailure { max_restarts: 1 },
        ..VnfConfig::default()
    };
    let mut inst = rt.instantiate(&m, cfg).expect("instantiate");
    let err = inst.process_batch(&mut batch(8)).expect_err("traps");
    assert!(
        matches!(
            err,
            Error::BatchTrapped {
                restarted: true,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(inst.state(), &VnfState::Running);
    inst.process_batch(&mut batch(2))
        .expect("two packets do not reach the trap");
    assert_eq!(count_of(&inst), 4, "maps survived the restart");
    let err = inst.process_batch(&mut batch(8)).expect_err("traps again");
    assert!(
        matches!(
            err,
            Error::BatchTrapped {
                restarted: false,
                ..
            }
        ),
        "{err}"
    );
    assert!(matches!(
        inst.state(),
        VnfState::Failed(FailureReason::Trap(_))
    ));
    assert_eq!(inst.stats().restarts, 1);
}

#[test]
fn negative_status_drops_batch_but_keeps_running() {
    let rt = runtime("status");
    let m = install(
        &rt,
        &abi_module(COUNTER_MANIFEST, MAP_IMPORTS, "(i32.const -1)", ""),
        "untrusted",
    );
    let mut inst = rt
        .instantiate(&m, VnfConfig::default())
        .expect("instantiate");
    let mut b = batch(3);
    inst.process_batch(&mut b).expect("not a trap");
    assert!(b.verdicts().iter().all(|v| *v == Verdict::Drop));
    assert_eq!(inst.stats().batch_errors, 1);
    assert_eq!(inst.state(), &VnfState::Running);
}

#[test]
fn invalid_verdicts_and_escaping_descriptors_are_dropped() {
    // Packet 0: forward to port 9 (only 2 ports); packet 1: moves its offset to 0.
    let process = r#"
      (i32.store offset=12 (local.get $b) (i32.const 9))
      (i32.store offset=16 (local.get $b) (i32.const 0))
      (i32.store offset=28 (local.get $b) (i32.const 1))
      (local.get $n)"#;
    let rt = runtime("verdicts");
    let m = install(
        &rt,
        &abi_module(COUNTER_MANIFEST, MAP_IMPORTS, process, ""),
        "untrusted",
    );
    let mut inst = rt
        .instantiate(&m, VnfConfig::default())
        .expect("instantiate");
    let mut b = batch(2);
    inst.process_batch(&mut b).expect("process");
    assert_eq!(b.verdicts(), &[Verdict::Drop, Verdict::Drop]);
    assert_eq!(inst.stats().invalid_verdicts, 2);
}

#[test]
fn invalid_binary_is_refused() {
    let rt = runtime("invalid");
    let v = refused(&rt, b"\0asm\x01\0\0\0\x01\xff\xff", "operator");
    assert!(
        has(&v, ViolationKind::InvalidBinary, "wasm validation failed"),
        "{v:?}"
    );
    let v = refused(&rt, b"not wasm at all", "operator");
    assert!(has(&v, ViolationKind::InvalidBinary, ""), "{v:?}");
}

#[test]
fn disallowed_import_is_refused_for_the_domain() {
    let rt = runtime("disallowed");
    let manifest = r#"{"abi":1,"name":"spam","version":"1","permissions":["emit"]}"#;
    let bytes = abi_module(
        manifest,
        r#"(import "telvirt" "emit" (func $emit (param i32 i32 i32) (result i32)))"#,
        "(local.get $n)",
        "",
    );
    let v = refused(&rt, &bytes, "untrusted");
    assert!(has(&v, ViolationKind::PermissionDenied, "`emit`"), "{v:?}");
    // The operator domain allows it.
    install(&rt, &bytes, "operator");
    // An import outside the ABI is refused in every domain.
    let bytes = abi_module(
        manifest,
        r#"(import "env" "system" (func (param i32) (result i32)))"#,
        "(local.get $n)",
        "",
    );
    let v = refused(&rt, &bytes, "operator");
    assert!(
        has(&v, ViolationKind::UnknownImport, "`env.system`"),
        "{v:?}"
    );
    let v = refused(&rt, &counter_module(), "nonexistent");
    assert!(
        has(
            &v,
            ViolationKind::UnknownDomain,
            "known: operator, trusted, untrusted"
        ),
        "{v:?}"
    );
}

#[test]
fn wrong_export_signature_and_missing_exports_are_all_reported() {
    let rt = runtime("exports");
    let text = format!(
        r#"(module
  (func (export "tv_process") (param i32) (result i32) (local.get 0))
  (func (export "tv_tick") (param i32))
  {})"#,
        manifest(r#"{"abi":1,"name":"bad","version":"1"}"#)
    );
    let v = refused(&rt, &wat::parse_str(text).expect("wat"), "operator");
    assert!(
        has(
            &v,
            ViolationKind::WrongExportSignature,
            "`tv_process` must be a function (i32, i32) -> (i32)"
        ),
        "{v:?}"
    );
    assert!(
        has(&v, ViolationKind::WrongExportSignature, "`tv_tick`"),
        "{v:?}"
    );
    assert!(has(&v, ViolationKind::MissingExport, "`tv_init`"), "{v:?}");
    assert!(
        has(&v, ViolationKind::MissingExport, "`tv_buffer`"),
        "{v:?}"
    );
    assert!(has(&v, ViolationKind::MissingExport, "memory"), "{v:?}");
    // Wrong host-function signature.
    let bytes = abi_module(
        COUNTER_MANIFEST,
        r#"(import "telvirt" "map_lookup" (func (param i32) (result i32)))"#,
        "(local.get $n)",
        "",
    );
    let v = refused(&rt, &bytes, "operator");
    assert!(
        has(
            &v,
            ViolationKind::WrongImportSignature,
            "telvirt.map_lookup"
        ),
        "{v:?}"
    );
}

#[test]
fn oversize_module_data_and_memory_are_refused() {
    let dir = temp_dir("sizes");
    let mut cfg = RuntimeConfig::new(&dir);
    cfg.verify_limits = VerifyLimits {
        max_module_bytes: 4096,
        max_functions: 3,
        max_memory_bytes: 2 << 20,
        max_data_bytes: 1024,
    };
    let rt = WasmRuntime::new(cfg).expect("rt");
    let big = "x".repeat(5000);
    let text = format!(
        r#"(module
  (memory (export "memory") 64)
  (func (export "tv_buffer") (param i32) (result i32) (i32.const 65536))
  (func (export "tv_init") (param i32 i32) (result i32) (i32.const 0))
  (func (export "tv_process") (param i32 i32) (result i32) (i32.const 0))
  (func $extra)
  (data (i32.const 0) "{big}")
  {})"#,
        manifest(r#"{"abi":1,"name":"fat","version":"1"}"#)
    );
    let v = refused(&rt, &wat::parse_str(text).expect("wat"), "operator");
    assert!(
        has(&v, ViolationKind::ModuleTooLarge, "the limit is 4096"),
        "{v:?}"
    );
    assert!(
        has(&v, ViolationKind::DataSegmentTooLarge, "5000 bytes"),
        "{v:?}"
    );
    assert!(
        has(&v, ViolationKind::MemoryTooLarge, "64 initial pages"),
        "{v:?}"
    );
    assert!(
        has(&v, ViolationKind::TooManyFunctions, "4 functions"),
        "{v:?}"
    );
}

#[test]
fn lying_manifest_is_refused() {
    let rt = runtime("liar");
    // Imports `random` and `map_update` but requests only maps.read.
    let manifest = r#"{"abi":1,"name":"liar","version":"1","permissions":["maps.read"],"maps":[{"name":"m","kind":"hash","key_size":4,"value_size":4,"max_entries":8}]}"#;
    let bytes = abi_module(
        manifest,
        r#"(import "telvirt" "random" (func (param i32 i32) (result i32)))
           (import "telvirt" "map_update" (func (param i32 i32 i32 i32) (result i32)))"#,
        "(local.get $n)",
        "",
    );
    let v = refused(&rt, &bytes, "operator");
    assert!(
        has(
            &v,
            ViolationKind::ImportNotDeclared,
            "`telvirt.random` needs permission `random`"
        ),
        "{v:?}"
    );
    assert!(
        has(
            &v,
            ViolationKind::ImportNotDeclared,
            "`telvirt.map_update` needs permission `maps.write`"
        ),
        "{v:?}"
    );
    // Missing and malformed manifests.
    let bare = wat::parse_str(r#"(module (memory (export "memory") 1))"#).expect("wat");
    let v = refused(&rt, &bare, "operator");
    assert!(
        has(&v, ViolationKind::MissingManifest, "telvirt.manifest"),
        "{v:?}"
    );
    let bytes = abi_module(
        r#"{"abi":2,"name":"Bad Name","version":""}"#,
        "",
        "(local.get $n)",
        "",
    );
    let v = refused(&rt, &bytes, "operator");
    assert!(
        has(&v, ViolationKind::InvalidManifest, "manifest.abi: 2"),
        "{v:?}"
    );
    assert!(
        has(&v, ViolationKind::InvalidManifest, "manifest.name"),
        "{v:?}"
    );
    assert!(
        has(&v, ViolationKind::InvalidManifest, "manifest.version"),
        "{v:?}"
    );
}

#[test]
fn ungranted_host_function_is_not_linked() {
    let dir = temp_dir("grant");
    let manifest = r#"{"abi":1,"name":"emitter","version":"1","permissions":["emit"]}"#;
    let bytes = abi_module(
        manifest,
        r#"(import "telvirt" "emit" (func $emit (param i32 i32 i32) (result i32)))"#,
        "(local.get $n)",
        "",
    );
    let hash = {
        let rt = WasmRuntime::new(RuntimeConfig::new(&dir)).expect("rt");
        install(&rt, &bytes, "operator").hash
    };
    // The policy changes: the operator domain loses `emit`.
    let mut cfg = RuntimeConfig::new(&dir);
    let mut policy = SecurityPolicy::default();
    if let Some(op) = policy.domains.get_mut("operator") {
        op.allowed.remove(&telvirt_runtime_wasm::Permission::Emit);
    }
    cfg.policy = policy;
    let rt = WasmRuntime::new(cfg).expect("rt");
    let m = rt.installed(&hash).expect("installed");
    let err = rt
        .instantiate(&m, VnfConfig::default())
        .err()
        .expect("refused");
    let msg = err.to_string();
    assert!(matches!(err, Error::NotGranted { .. }), "{msg}");
    assert!(
        msg.contains("telvirt.emit") && msg.contains("`emit`") && msg.contains("not linked"),
        "{msg}"
    );
}

/// Tables are host memory outside the linear-memory cap: all of an instance's tables together
/// hold at most 100,000 elements, however many the module declares; a growth past that fails
/// (`table.grow` answers -1) and the budget starts afresh with the store a restart makes.
#[test]
fn tables_together_stay_within_their_element_budget() {
    let manifest = COUNTER_MANIFEST.replace(
        r#""counters":["packets"]"#,
        r#""counters":["a","b","c","d"]"#,
    );
    let grow = |counter: u32, table: &str, n: u32| {
        format!(
            "(call $counter (i32.const {counter}) (i64.extend_i32_s (table.grow {table} (ref.null func) (i32.const {n}))))"
        )
    };
    let process = format!(
        "{} {} {} {} unreachable",
        grow(0, "$a", 40_000),
        grow(1, "$b", 40_000),
        grow(2, "$c", 20_001),
        grow(3, "$c", 20_000)
    );
    let extra = "(table $a 0 funcref) (table $b 0 funcref) (table $c 0 funcref)";
    let rt = runtime("tables");
    let m = install(
        &rt,
        &abi_module(&manifest, MAP_IMPORTS, &process, extra),
        "untrusted",
    );
    let cfg = VnfConfig {
        restart: RestartPolicy::OnFailure { max_restarts: 1 },
        ..VnfConfig::default()
    };
    let mut inst = rt.instantiate(&m, cfg).expect("instantiate");
    let failed = u64::MAX; // -1, the answer of a growth refused
    let err = inst.process_batch(&mut batch(1)).expect_err("traps");
    assert!(
        matches!(
            err,
            Error::BatchTrapped {
                restarted: true,
                ..
            }
        ),
        "{err}"
    );
    let counters =
        |inst: &VnfInstance| -> Vec<u64> { inst.counters().into_iter().map(|(_, v)| v).collect() };
    assert_eq!(
        counters(&inst),
        [0, 0, failed, 0],
        "100,000 elements and not one more"
    );
    // The restarted instance's tables are new: the same growths again, the same answers.
    inst.process_batch(&mut batch(1)).expect_err("traps again");
    assert_eq!(
        counters(&inst),
        [0, 0, failed.wrapping_add(failed), 0],
        "the old store's tables are not counted against the new one"
    );
}

#[test]
fn initial_memory_over_the_cap_fails_to_start() {
    let rt = runtime("initmem");
    let m = install(&rt, &counter_module(), "untrusted");
    let cfg = VnfConfig {
        limits: RunLimits {
            memory_bytes: 64 << 10,
            fuel_per_batch: 1_000_000,
        },
        ..VnfConfig::default()
    };
    let err = rt.instantiate(&m, cfg).err().expect("refused");
    assert!(err.to_string().contains("memory limit"), "{err}");
}

#[test]
fn signatures_are_enforced_when_the_domain_requires_them() {
    use ed25519_dalek::{Signer, SigningKey};
    let key = SigningKey::from_bytes(&[7u8; 32]);
    let other = SigningKey::from_bytes(&[9u8; 32]);
    let mut cfg = RuntimeConfig::new(temp_dir("sig"));
    if let Some(d) = cfg.policy.domains.get_mut("trusted") {
        d.require_signature = true;
        d.trusted_keys = vec![key.verifying_key().to_bytes()];
    }
    let rt = WasmRuntime::new(cfg).expect("rt");
    let bytes = counter_module();
    let hash = telvirt_runtime_wasm::verify::module_hash(&bytes);
    let v = refused(&rt, &bytes, "trusted");
    assert!(
        has(
            &v,
            ViolationKind::SignatureRequired,
            "requires an ed25519 signature"
        ),
        "{v:?}"
    );
    let sign = |k: &SigningKey, msg: &[u8]| telvirt_runtime_wasm::ModuleSignature {
        public_key: k.verifying_key().to_bytes(),
        signature: k.sign(msg).to_bytes().to_vec(),
    };
    let install_signed = |sig| {
        rt.install(&InstallRequest {
            bytes: &bytes,
            domain: "trusted",
            signature: Some(sig),
            precompile: &[],
        })
    };
    let err = install_signed(sign(&other, &hash)).expect_err("untrusted key");
    assert!(
        err.to_string()
            .contains("not among the domain's trusted keys"),
        "{err}"
    );
    let err = install_signed(sign(&key, b"something else")).expect_err("bad signature");
    assert!(err.to_string().contains("does not verify"), "{err}");
    install_signed(sign(&key, &hash)).expect("valid signature accepted");
}
