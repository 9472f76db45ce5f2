//! telvirt's data model: descriptors, names, units, lifecycle records and API shapes.
//!
//! Plain data and pure functions. This crate must not do I/O, read clocks or spawn tasks: every
//! other layer depends on it, and it stays testable with nothing but values.

pub mod api;
pub mod change;
pub mod device;
pub mod error;
pub mod grant;
pub mod lifecycle;
pub mod name;
pub mod network;
pub mod parse;
pub mod sse;
pub mod units;
pub mod vnf;

pub use device::{Device, DeviceGrant, reserved_device_id};
pub use error::{FieldError, ModelError};
pub use grant::{HostGrants, ResourceKind};
pub use lifecycle::{DesiredState, Event, LockInfo, Phase, Placement, Role, Vnf};
pub use name::{MapName, Name, NameError};
pub use network::{NetworkDescriptor, parse_network};
pub use parse::{Format, from_text, parse_vnf};
pub use units::{ByteSize, ByteSizeError};
pub use vnf::{
    ApiVersion, CpuPolicy, CpuSpec, EmulatorPolicy, MapKind, MapSpec, Metadata, MoveEncryption,
    NicSpec, PlacementSpec, PollMode, Redundancy, RuntimeKind, ThreadPolicy, VmSpec, VnfDescriptor,
    VnfKind, VnfSpec, WasmEngine, WasmLimits, WasmSpec, map_budget_bytes, module_digest,
};

#[cfg(test)]
mod tests {
    use super::*;

    const FIREWALL: &str = r#"
apiVersion: telvirt/v1
kind: Vnf
metadata: { name: fw1 }
spec:
  runtime: wasm
  cpu: { policy: dedicated, count: 1, numa_node: 0 }
  ports: [in, out]
  wasm:
    module: examples/vnfs/firewall.wasm
    engine: cranelift
    limits: { memory: 16MiB }
    maps: [ { name: rules, kind: hash, key_size: 16, value_size: 4, max_entries: 65536 } ]
"#;

    const VM: &str = r#"
apiVersion: telvirt/v1
kind: Vnf
metadata: { name: upf1 }
spec:
  runtime: vm
  cpu: { policy: dedicated, count: 2, thread_policy: isolate }
  redundancy: active-standby
  ports: [n3, n6]
  vm:
    memory: 512MiB
    hugepages: 2MiB
    emulator: isolate
    nics: [ { port: n3 }, { port: n6 } ]
"#;

    fn yaml(text: &str) -> Result<VnfDescriptor, ModelError> {
        parse_vnf(text.as_bytes(), Format::Yaml)
    }

    /// The single field error of a refused descriptor.
    fn refused(text: &str) -> FieldError {
        let err = yaml(text).expect_err("descriptor must be refused");
        let fields = err.fields();
        assert_eq!(fields.len(), 1, "expected one error, got {fields:?}");
        fields[0].clone()
    }

    /// YAML whose aliases would repeat one long string until the document is hundreds of
    /// times its size is refused before it is built, naming why; a document that uses an
    /// alias within bounds is read as before.
    #[test]
    fn yaml_whose_aliases_expand_past_the_bound_is_refused() {
        let long = "x".repeat(4000);
        let mut labels = format!("a0: &s \"{long}\"");
        for i in 1..200 {
            labels.push_str(&format!(", a{i}: *s"));
        }
        let bomb = FIREWALL.replace(
            "metadata: { name: fw1 }",
            &format!("metadata: {{ name: fw1, labels: {{ {labels} }} }}"),
        );
        assert!(bomb.len() < 10_000, "{} bytes", bomb.len());
        let e = refused(&bomb);
        assert_eq!(e.path, "");
        assert!(e.reason.contains("expands, through its aliases"), "{e}");
        let small = FIREWALL.replace(
            "metadata: { name: fw1 }",
            "metadata: { name: fw1, labels: { a: &s edge, b: *s } }",
        );
        let d = yaml(&small).unwrap();
        assert_eq!(d.metadata.labels["b"], "edge");
        // Not YAML at all is still told as such.
        let e = refused("metadata: [unclosed");
        assert!(e.reason.contains("invalid YAML"), "{e}");
    }

    fn edit(base: &str, from: &str, to: &str) -> String {
        assert!(base.contains(from), "test edit target missing: {from}");
        base.replacen(from, to, 1)
    }

    #[test]
    fn tv_tick_runs_every_second_by_default_never_at_0_and_at_most_hourly() {
        let tick = |text: &str| {
            yaml(text)
                .unwrap()
                .spec
                .wasm
                .and_then(|w| w.tick_interval())
        };
        let with = |t: &str| {
            edit(
                FIREWALL,
                "engine: cranelift",
                &format!("engine: cranelift\n    tick_ms: {t}"),
            )
        };
        assert_eq!(tick(FIREWALL), Some(std::time::Duration::from_secs(1)));
        assert_eq!(
            tick(&with("20")),
            Some(std::time::Duration::from_millis(20))
        );
        assert_eq!(tick(&with("0")), None);
        assert_eq!(
            tick(&with("3600000")),
            Some(std::time::Duration::from_secs(3600))
        );
        let e = refused(&with("3600001"));
        assert_eq!(e.path, "spec.wasm.tick_ms");
        assert!(
            e.reason.contains("3600001") && e.reason.contains("0 never"),
            "{e}"
        );
        assert!(yaml(&with("-1")).is_err(), "a negative interval parses");
    }

    #[test]
    fn a_wasm_vnf_busy_polls_on_its_own_core_by_default_and_never_in_a_shared_group() {
        let mode = |text: &str| yaml(text).unwrap().poll_mode();
        let shared = edit(
            FIREWALL,
            "policy: dedicated, count: 1, numa_node: 0",
            "policy: shared, group: g1",
        );
        assert_eq!(mode(FIREWALL), Some(PollMode::Busy));
        assert_eq!(mode(&shared), Some(PollMode::Adaptive));
        let calm = edit(
            FIREWALL,
            "engine: cranelift",
            "engine: cranelift\n    poll: adaptive",
        );
        assert_eq!(mode(&calm), Some(PollMode::Adaptive));
        assert_eq!(yaml(VM).unwrap().poll_mode(), None);
        let e = refused(&edit(
            &shared,
            "engine: cranelift",
            "engine: cranelift\n    poll: busy",
        ));
        assert_eq!(e.path, "spec.wasm.poll");
        assert!(e.reason.contains("shared group"), "{e}");
        let e = yaml(&edit(
            FIREWALL,
            "engine: cranelift",
            "engine: cranelift\n    poll: spin",
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("busy") && e.contains("adaptive"), "{e}");
    }

    #[test]
    fn sketch_descriptors_parse() {
        let fw = yaml(FIREWALL).unwrap();
        assert_eq!(fw.name().as_str(), "fw1");
        let wasm = fw.spec.wasm.as_ref().unwrap();
        assert_eq!(wasm.limits.memory.bytes(), 16 << 20);
        assert_eq!(wasm.maps[0].max_entries, 65536);
        let vm = yaml(VM).unwrap();
        assert_eq!(vm.spec.redundancy, Redundancy::ActiveStandby);
        assert_eq!(
            vm.spec.vm.as_ref().unwrap().hugepages,
            Some(ByteSize::mib(2))
        );
        assert_eq!(vm.spec.cpu.effective_count(), 2);
    }

    #[test]
    fn json_and_yaml_give_the_same_descriptor() {
        let fw = yaml(FIREWALL).unwrap();
        let json = serde_json::to_vec(&fw).unwrap();
        assert_eq!(Format::sniff(&json), Format::Json);
        assert_eq!(parse_vnf(&json, Format::Json).unwrap(), fw);
    }

    #[test]
    fn malformed_yaml_is_a_syntax_error() {
        let err = yaml("apiVersion: telvirt/v1\nkind: [Vnf\n").unwrap_err();
        assert!(matches!(err, ModelError::Syntax(_)), "{err:?}");
    }

    #[test]
    fn malformed_json_names_line_and_column() {
        let err = parse_vnf(b"{\"apiVersion\": \"telvirt/v1\",,}", Format::Json).unwrap_err();
        assert!(matches!(err, ModelError::Syntax(_)), "{err:?}");
        assert!(err.to_string().contains("line 1"), "{err}");
    }

    #[test]
    fn empty_descriptor_is_refused() {
        assert!(matches!(yaml("  \n"), Err(ModelError::Syntax(_))));
    }

    #[test]
    fn unknown_field_is_refused_with_its_path() {
        let e = refused(&edit(
            FIREWALL,
            "engine: cranelift",
            "engine: cranelift\n    turbo: true",
        ));
        assert_eq!(e.path, "spec.wasm.turbo");
        assert!(e.reason.contains("unknown field `turbo`"), "{}", e.reason);
    }

    #[test]
    fn unknown_top_level_field_is_refused() {
        let e = refused(&format!("{FIREWALL}status: {{}}\n"));
        assert!(e.reason.contains("unknown field `status`"), "{e}");
    }

    #[test]
    fn bad_unit_is_refused_with_its_path() {
        let e = refused(&edit(FIREWALL, "memory: 16MiB", "memory: 16MB"));
        assert_eq!(e.path, "spec.wasm.limits.memory");
        assert!(e.reason.contains("valid units"), "{}", e.reason);
    }

    #[test]
    fn zero_size_is_refused() {
        let e = refused(&edit(VM, "memory: 512MiB", "memory: 0MiB"));
        assert_eq!(e.path, "spec.vm.memory");
        assert!(e.reason.contains("positive"), "{}", e.reason);
    }

    #[test]
    fn negative_size_is_refused() {
        let e = refused(&edit(VM, "memory: 512MiB", "memory: -512MiB"));
        assert_eq!(e.path, "spec.vm.memory");
        assert!(e.reason.contains("negative"), "{}", e.reason);
    }

    #[test]
    fn negative_count_is_refused() {
        let e = refused(&edit(FIREWALL, "count: 1", "count: -2"));
        assert_eq!(e.path, "spec.cpu.count");
    }

    #[test]
    fn zero_count_is_refused() {
        let e = refused(&edit(FIREWALL, "count: 1", "count: 0"));
        assert_eq!(e.path, "spec.cpu.count");
        assert!(e.reason.contains("at least 1"));
    }

    #[test]
    fn unknown_runtime_is_refused() {
        let e = refused(&edit(FIREWALL, "runtime: wasm", "runtime: docker"));
        assert_eq!(e.path, "spec.runtime");
        assert!(
            e.reason.contains("`vm`") && e.reason.contains("`wasm`"),
            "{}",
            e.reason
        );
    }

    #[test]
    fn invalid_name_is_refused() {
        let e = refused(&edit(FIREWALL, "name: fw1", "name: Fw_1"));
        assert_eq!(e.path, "metadata.name");
        assert!(e.reason.contains("not a valid name"));
    }

    #[test]
    fn wrong_api_version_is_refused() {
        let e = refused(&edit(FIREWALL, "telvirt/v1", "telvirt/v9"));
        assert_eq!(e.path, "apiVersion");
        assert!(e.reason.contains("telvirt/v1"));
    }

    #[test]
    fn runtime_block_must_match_runtime() {
        // Both the missing vm block and the stray wasm block are reported.
        let err = yaml(&edit(FIREWALL, "runtime: wasm", "runtime: vm")).unwrap_err();
        let paths: Vec<_> = err.fields().iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, ["spec.vm", "spec.wasm"]);
    }

    #[test]
    fn every_violation_is_reported() {
        let text = edit(
            &edit(FIREWALL, "count: 1", "count: 0"),
            "ports: [in, out]",
            "ports: [in, in]",
        );
        let err = yaml(&text).unwrap_err();
        let paths: Vec<_> = err.fields().iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, ["spec.cpu.count", "spec.ports[1]"]);
    }

    #[test]
    fn shared_policy_needs_a_group() {
        let e = refused(&edit(FIREWALL, "policy: dedicated", "policy: shared"));
        assert_eq!(e.path, "spec.cpu.group");
    }

    #[test]
    fn pinned_policy_needs_cores_matching_count() {
        let e = refused(&edit(FIREWALL, "policy: dedicated", "policy: pinned"));
        assert_eq!(e.path, "spec.cpu.cores");
        let e = refused(&edit(
            FIREWALL,
            "policy: dedicated, count: 1",
            "policy: pinned, count: 2, cores: [3]",
        ));
        assert_eq!(e.path, "spec.cpu.count");
        let e = refused(&edit(
            FIREWALL,
            "policy: dedicated, count: 1",
            "policy: pinned, cores: [3, 3]",
        ));
        assert!(e.reason.contains("more than once"));
    }

    #[test]
    fn locality_rules_are_exclusive() {
        let e = refused(&edit(
            FIREWALL,
            "numa_node: 0",
            "numa_node: 0, near_nic: eth1",
        ));
        assert_eq!(e.path, "spec.cpu.near_nic");
    }

    #[test]
    fn hugepage_size_must_be_real() {
        let e = refused(&edit(VM, "hugepages: 2MiB", "hugepages: 4MiB"));
        assert_eq!(e.path, "spec.vm.hugepages");
        assert!(e.reason.contains("2MiB and 1GiB"));
    }

    #[test]
    fn memory_must_fill_whole_hugepages() {
        let e = refused(&edit(VM, "hugepages: 2MiB", "hugepages: 1GiB"));
        assert_eq!(e.path, "spec.vm.memory");
    }

    #[test]
    fn nic_must_name_a_port() {
        let e = refused(&edit(VM, "{ port: n6 }", "{ port: n9 }"));
        assert_eq!(e.path, "spec.vm.nics[1].port");
    }

    #[test]
    fn map_rules_are_checked() {
        let e = refused(&edit(FIREWALL, "key_size: 16", "key_size: 0"));
        assert_eq!(e.path, "spec.wasm.maps[0].key_size");
        let e = refused(&edit(
            FIREWALL,
            "kind: hash, key_size: 16",
            "kind: array, key_size: 16",
        ));
        assert_eq!(e.path, "spec.wasm.maps[0].key_size");
        // The runtime's bound on a value (1 KiB), refused here rather than at start.
        let e = refused(&edit(FIREWALL, "value_size: 4", "value_size: 1025"));
        assert_eq!(e.path, "spec.wasm.maps[0].value_size");
        assert!(e.reason.contains("outside 1..=1024"), "{e}");
        assert!(yaml(&edit(FIREWALL, "value_size: 4", "value_size: 1024")).is_ok());
    }

    #[test]
    fn wasm_memory_must_be_whole_pages() {
        let e = refused(&edit(FIREWALL, "memory: 16MiB", "memory: 1000B"));
        assert_eq!(e.path, "spec.wasm.limits.memory");
    }

    #[test]
    fn policy_fields_belong_to_their_policy() {
        let e = refused(&edit(FIREWALL, "count: 1,", "count: 1, group: g1,"));
        assert_eq!(e.path, "spec.cpu.group");
        assert!(e.reason.contains("policy: shared"));
    }

    #[test]
    fn confinement_limits_are_checked_at_parse() {
        let e = refused(&edit(FIREWALL, "memory: 16MiB", "memory: 8TiB"));
        assert_eq!(e.path, "spec.wasm.limits.memory");
        assert!(e.reason.contains("4GiB"), "{e}");
        let ports: Vec<String> = (0..33).map(|i| format!("p{i}")).collect();
        let e = refused(&edit(
            FIREWALL,
            "ports: [in, out]",
            &format!("ports: [{}]", ports.join(", ")),
        ));
        assert_eq!(e.path, "spec.ports");
        let e = refused(&edit(
            FIREWALL,
            "engine: cranelift",
            "engine: cranelift\n    config: { blob_hex: \"0g\" }",
        ));
        assert_eq!(e.path, "spec.wasm.config.blob_hex");
        let e = refused(&edit(
            FIREWALL,
            "engine: cranelift",
            "engine: cranelift\n    config: { blob_hex: \"020\" }",
        ));
        assert_eq!(e.path, "spec.wasm.config.blob_hex");
        let e = refused(&edit(
            FIREWALL,
            "engine: cranelift",
            "engine: cranelift\n    config: { blob_hex: \"02\", mode: x }",
        ));
        assert_eq!(e.path, "spec.wasm.config.blob_hex");
        let e = refused(&edit(
            FIREWALL,
            "module: examples/vnfs/firewall.wasm",
            "module: \"fw\\0.wasm\"",
        ));
        assert_eq!(e.path, "spec.wasm.module");
        assert!(e.reason.contains("NUL"), "{e}");
        let e = refused(&edit(
            FIREWALL,
            "module: examples/vnfs/firewall.wasm",
            "module: sha256:abc",
        ));
        assert_eq!(e.path, "spec.wasm.module");
        let e = refused(&edit(
            VM,
            "emulator: isolate",
            "emulator: isolate\n    cmdline: \"a\\0b\"",
        ));
        assert_eq!(e.path, "spec.vm.cmdline");
        let e = refused(&edit(
            VM,
            "emulator: isolate",
            "emulator: isolate\n    machine: pc-q35-7.2",
        ));
        assert_eq!(e.path, "spec.vm.machine");
        assert!(e.reason.contains("pc-i440fx-7.2"), "{e}");
        assert!(
            yaml(&edit(
                VM,
                "emulator: isolate",
                "emulator: isolate\n    machine: pc-i440fx-7.1"
            ))
            .is_ok()
        );
        let accel = |value: &str| {
            yaml(&edit(
                VM,
                "emulator: isolate",
                &format!("emulator: isolate\n    accel: {value}"),
            ))
        };
        let vm = |d: VnfDescriptor| d.spec.vm.and_then(|vm| vm.accel);
        assert_eq!(vm(accel("kvm").unwrap()), Some(vnf::Accelerator::Kvm));
        assert_eq!(vm(accel("tcg").unwrap()), Some(vnf::Accelerator::Tcg));
        assert_eq!(vm(yaml(VM).unwrap()), None);
        let e = accel("xen").unwrap_err().to_string();
        assert!(
            e.contains("spec.vm.accel") && e.contains("kvm") && e.contains("tcg"),
            "{e}"
        );
        let cpu = |value: &str| {
            edit(
                VM,
                "emulator: isolate",
                &format!("emulator: isolate\n    cpu_model: {value}"),
            )
        };
        let model = |d: VnfDescriptor| d.spec.vm.and_then(|vm| vm.cpu_model);
        assert_eq!(
            model(yaml(&cpu("Haswell-v4")).unwrap()).as_deref(),
            Some("Haswell-v4")
        );
        assert_eq!(model(yaml(VM).unwrap()), None);
        for (bad, why) in [
            ("host", "the host's CPU"),
            ("max", "leave it out"),
            ("help", "-cpu help"),
            ("\"Has well\"", "not a QEMU CPU model name"),
            ("\"-cpu\"", "starting with a letter or digit"),
            ("\"Haswell,+vmx\"", "not a QEMU CPU model name"),
        ] {
            let e = refused(&cpu(bad));
            assert_eq!(e.path, "spec.vm.cpu_model", "{bad}: {e}");
            assert!(e.reason.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn memory_budget_counts_linear_memory_and_every_map() {
        let d = yaml(FIREWALL).unwrap();
        let map = |name: &str, entries: u32| MapSpec {
            name: name.parse().unwrap(),
            kind: MapKind::Hash,
            key_size: 16,
            value_size: 4,
            max_entries: entries,
        };
        let per_entry = 16 + 4 + vnf::limits::MAP_ENTRY_OVERHEAD_BYTES;
        // The update log holds at most a snapshot's payload (here above the 64 KiB floor).
        let log = |entries: u64| (entries * 20).max(64 << 10);
        // The descriptor's `rules` overrides the module's capacity; `extra` counts in full.
        let module = [map("rules", 10), map("extra", 100)];
        assert_eq!(
            d.memory_budget(&module),
            (16 << 20) + 65636 * per_entry + log(65636)
        );
        assert_eq!(
            d.memory_budget(&[]),
            (16 << 20) + 65536 * per_entry + log(65536)
        );
        let small = yaml(&edit(FIREWALL, "max_entries: 65536", "max_entries: 10")).unwrap();
        assert_eq!(
            small.memory_budget(&[]),
            (16 << 20) + 10 * per_entry + (64 << 10)
        );
        assert!(d.map_mismatches(&module).is_empty());
        let e = d.map_mismatches(&[map("other", 1)]);
        assert_eq!(e[0].path, "spec.wasm.maps[0].name");
        let mut wrong = map("rules", 1);
        wrong.value_size = 8;
        assert_eq!(d.map_mismatches(&[wrong])[0].path, "spec.wasm.maps[0]");
        assert_eq!(yaml(VM).unwrap().memory_budget(&[]), 512 << 20);
    }

    #[test]
    fn module_references_are_sha256_digests() {
        let hex = "a".repeat(64);
        assert_eq!(module_digest(&format!("sha256:{hex}")), Some(hex.as_str()));
        assert_eq!(module_digest(&format!("sha256:{}", "A".repeat(64))), None);
        assert_eq!(module_digest("sha256:abc"), None);
        assert_eq!(module_digest("firewall.wasm"), None);
    }
}
