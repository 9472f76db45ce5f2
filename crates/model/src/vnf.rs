//! The VNF descriptor, v1 (`apiVersion: telvirt/v1`, `kind: Vnf`).
//!
//! Owns the descriptor's shape (strict: unknown fields are errors) and its semantic rules, which
//! report every violation with the field path. It must not look at files, hosts or the store:
//! whether a module file exists or a core is free is decided by the layers that own those facts.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::FieldError;
use crate::name::Name;
use crate::units::ByteSize;

/// `apiVersion` of every telvirt descriptor of this version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum ApiVersion {
    #[serde(rename = "telvirt/v1")]
    V1,
}

/// `kind: Vnf`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum VnfKind {
    Vnf,
}

/// A VNF descriptor: what the operator asks for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VnfDescriptor {
    #[serde(rename = "apiVersion")]
    pub api_version: ApiVersion,
    pub kind: VnfKind,
    pub metadata: Metadata,
    pub spec: VnfSpec,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    pub name: Name,
    /// Free-form labels (`role: edge`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// Which kind of virtual machine runs the VNF.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeKind {
    /// A full guest OS in a QEMU process.
    Vm,
    /// Verified WebAssembly service logic on a pinned worker thread.
    Wasm,
}

impl RuntimeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RuntimeKind::Vm => "vm",
            RuntimeKind::Wasm => "wasm",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VnfSpec {
    pub runtime: RuntimeKind,
    #[serde(default)]
    pub cpu: CpuSpec,
    #[serde(default)]
    pub redundancy: Redundancy,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<PlacementSpec>,
    /// Named packet ports of the VNF (`[in, out]`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<Name>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wasm: Option<WasmSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<VmSpec>,
}

/// How physical cores are given to the VNF.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum CpuPolicy {
    /// Each vCPU or worker gets its own physical core, exclusively.
    #[default]
    Dedicated,
    /// Light vCPUs share one physical core that belongs to a named group alone.
    Shared,
    /// Exact Linux logical CPU numbers.
    Pinned,
}

/// What happens to the SMT sibling of a dedicated core.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ThreadPolicy {
    /// Use what fits.
    #[default]
    Prefer,
    /// Keep the sibling thread empty.
    Isolate,
    /// Place vCPUs on sibling pairs.
    Require,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CpuSpec {
    #[serde(default)]
    pub policy: CpuPolicy,
    /// vCPUs (vm) or worker threads (wasm); 1 when omitted. For `pinned` it equals `cores`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thread_policy: Option<ThreadPolicy>,
    /// Shared-core group (policy `shared`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<Name>,
    /// Linux logical CPU numbers (policy `pinned`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cores: Option<Vec<u32>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numa_node: Option<u32>,
    /// Keep every core on the NUMA node of this host NIC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub near_nic: Option<String>,
}

impl CpuSpec {
    /// Number of vCPUs or workers this spec asks for.
    pub fn effective_count(&self) -> u32 {
        match (&self.cores, self.count) {
            (Some(cores), _) if self.policy == CpuPolicy::Pinned => {
                u32::try_from(cores.len()).unwrap_or(u32::MAX)
            }
            (_, Some(n)) => n,
            _ => 1,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Redundancy {
    #[default]
    None,
    /// An active instance and a standby on another host.
    ActiveStandby,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlacementSpec {
    /// Put ACT and SBY in different `zone` labels.
    #[serde(default)]
    pub zone_anti_affinity: bool,
}

/// The wasm engine a module runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum WasmEngine {
    /// Native code through Cranelift.
    #[default]
    Cranelift,
    /// Wasmtime's portable interpreter.
    Pulley,
}

impl WasmEngine {
    /// The name descriptors use.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cranelift => "cranelift",
            Self::Pulley => "pulley",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WasmSpec {
    /// Path of the `.wasm` module on the node.
    pub module: String,
    #[serde(default)]
    pub engine: WasmEngine,
    #[serde(default)]
    pub limits: WasmLimits,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub maps: Vec<MapSpec>,
    /// Key/value configuration handed to the module's init export.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub config: BTreeMap<String, String>,
    /// How the data-plane worker on the VNF's core waits for packets: `busy` (never sleeps:
    /// the lowest latency, the whole core) or `adaptive` (spins briefly, then sleeps 50 µs
    /// between polls while idle). Default: `busy` on dedicated and pinned cores, `adaptive` in
    /// a shared group (where `busy` is refused: it would take the core from the group).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub poll: Option<PollMode>,
    /// How often the module's `tv_tick(now_ns)` export is called (session ageing,
    /// housekeeping), in milliseconds, by the worker that runs the VNF, between batches and
    /// under the batch's fuel budget. 0 never calls it; 1 to 3600000; default 1000. A module
    /// without the export is never called.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tick_ms: Option<u32>,
}

impl WasmSpec {
    /// How often `tv_tick` is called (`tick_ms`, default [`limits::DEFAULT_WASM_TICK_MS`]);
    /// `None` never.
    pub fn tick_interval(&self) -> Option<std::time::Duration> {
        match self.tick_ms.unwrap_or(limits::DEFAULT_WASM_TICK_MS) {
            0 => None,
            ms => Some(std::time::Duration::from_millis(u64::from(ms))),
        }
    }
}

/// How a data-plane worker waits for packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum PollMode {
    /// Poll without ever sleeping.
    Busy,
    /// Back off to short sleeps while idle.
    Adaptive,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WasmLimits {
    /// Linear-memory cap; a multiple of the 64KiB wasm page.
    #[serde(default = "default_wasm_memory")]
    pub memory: ByteSize,
    /// CPU budget of one batch (and of one `tv_tick`) in wasmtime fuel units, roughly wasm
    /// instructions; `tv_init` gets 16 times it. A batch that runs out traps and the VNF goes
    /// to Failed (or restarts) with a `cpu limit` reason. 1 to 1000000000; default 10000000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fuel_per_batch: Option<u64>,
}

fn default_wasm_memory() -> ByteSize {
    ByteSize::mib(16)
}

impl Default for WasmLimits {
    fn default() -> Self {
        Self {
            memory: default_wasm_memory(),
            fuel_per_batch: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MapKind {
    Hash,
    Array,
    LruHash,
}

/// A runtime-owned map: the VNF's state, kept apart from its code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MapSpec {
    pub name: crate::name::MapName,
    pub kind: MapKind,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
}

/// Where QEMU's own (non-vCPU) threads run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum EmulatorPolicy {
    /// On the host's shared set.
    #[default]
    Share,
    /// On one extra dedicated core.
    Isolate,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    /// Guest RAM, a multiple of 1MiB (and of the huge page size when huge pages are used).
    pub memory: ByteSize,
    /// Back guest RAM with pre-allocated huge pages of this size: 2MiB or 1GiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugepages: Option<ByteSize>,
    #[serde(default)]
    pub emulator: EmulatorPolicy,
    /// Guest kernel; the project's default guest when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    /// Boot disk image (raw or qcow2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nics: Vec<NicSpec>,
    /// Lock guest memory in host RAM (mlock).
    #[serde(default)]
    pub lock_memory: bool,
    /// Back guest RAM with shared memfd memory (needed by vhost-user links).
    #[serde(default)]
    pub shared_memory: bool,
    /// SCHED_FIFO for vCPU threads where the host permits it.
    #[serde(default)]
    pub realtime: bool,
    /// QEMU machine type: `pc` (the host QEMU's newest i440FX PC) or a versioned one such as
    /// `pc-i440fx-7.2`; left out, the VNF keeps the versioned type its first start resolved
    /// (`machine` in its status) on its moves, and on its restarts where the host's QEMU has it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<String>,
    /// The accelerator its QEMU runs the guest with: `kvm` (the host's KVM, the guest's CPU
    /// the host's; a host whose KVM does not boot a guest refuses to start it) or `tcg`
    /// (emulation, even where KVM runs). Left out, each start takes the host's (KVM where it
    /// boots a guest, else TCG), and a move keeps the one its source runs (`accel` in its
    /// status): a guest is never moved between a KVM and a TCG QEMU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accel: Option<Accelerator>,
    /// The CPU model its guest sees, a QEMU model name (`Haswell-v4`, `EPYC-v3`, as `qemu
    /// -cpu help` lists them): the same CPU on every host, so under KVM the guest moves
    /// between hosts with different CPUs (QEMU refuses to start it where the host's CPU
    /// lacks one of the model's features). Left out, the guest sees the host's CPU under KVM
    /// (`-cpu host`: it moves only to a host that reports the same CPU) and QEMU's `max`
    /// under TCG.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_model: Option<String>,
    /// How the guest's memory crosses the network when it moves (`vnf migrate`): `encrypted`
    /// (the two hosts' agents seal QEMU's stream with AES-256-GCM under a key only they derive,
    /// a new one for each connection; QEMU never holds it) or `none` (in the clear, as QEMU,
    /// libvirt and Nova move a guest by default; the stream's opening is still tagged with the
    /// move's key, so only the source's agent can start it). Default `encrypted` (`tls`, its
    /// name before, is read as it); taken only at creation.
    #[serde(default, skip_serializing_if = "MoveEncryption::is_default")]
    pub move_encryption: MoveEncryption,
}

/// How a vm guest's memory crosses the network when it moves (`spec.vm.move_encryption`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum MoveEncryption {
    /// Encrypted and authenticated by the two hosts' agents (AES-256-GCM).
    #[default]
    #[serde(alias = "tls")]
    Encrypted,
    /// In the clear.
    None,
}

impl MoveEncryption {
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// How a vm VNF's QEMU runs its guest's CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Accelerator {
    /// The host's KVM (`-cpu host`).
    Kvm,
    /// QEMU's TCG emulation (`-cpu max`): much slower, any host.
    Tcg,
}

impl Accelerator {
    pub fn as_str(self) -> &'static str {
        match self {
            Accelerator::Kvm => "kvm",
            Accelerator::Tcg => "tcg",
        }
    }
}

impl std::fmt::Display for Accelerator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NicSpec {
    /// One of the VNF's `ports`.
    pub port: Name,
}

/// The machine types telvirt runs guests on: QEMU's i440FX PC, by its alias or a version.
pub const MACHINE_ALIAS: &str = "pc";
const MACHINE_PREFIX: &str = "pc-i440fx-";

/// Whether `model` may name a vm guest's CPU model (`spec.vm.cpu_model`): a QEMU model name
/// (letters, digits, `.`, `_`, `-`; at most 64), not `host` or `max`, which are the host's CPU
/// and the default when the field is left out. Whether the host's QEMU has it, its start says.
pub fn check_cpu_model(model: &str) -> std::result::Result<(), String> {
    if model == "help" {
        return Err(
            "`help` lists QEMU's CPU models (`qemu-system-x86_64 -cpu help`); name one of them, such as `Haswell-v4`".to_owned(),
        );
    }
    if model == "host" || model == "max" {
        return Err(format!(
            "`{model}` is what a guest gets with no cpu_model (the host's CPU under KVM, `max` under TCG); name a QEMU CPU model the guest keeps on every host, such as `Haswell-v4` or `EPYC-v3`, or leave it out"
        ));
    }
    let valid = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if model.is_empty()
        || model.len() > 64
        || !model.starts_with(|c: char| c.is_ascii_alphanumeric())
        || !model.chars().all(valid)
    {
        return Err(format!(
            "`{model}` is not a QEMU CPU model name: 1 to 64 letters, digits, `.`, `_` or `-`, starting with a letter or digit, such as `Haswell-v4`"
        ));
    }
    Ok(())
}

/// Whether `machine` is `pc` or `pc-i440fx-MAJOR.MINOR`; the reason when not.
pub fn check_machine_type(machine: &str) -> std::result::Result<(), String> {
    if machine == MACHINE_ALIAS || machine_version(machine).is_some() {
        return Ok(());
    }
    Err(format!(
        "`{machine}` is not an i440FX PC machine type: `pc` or a versioned one such as `pc-i440fx-7.2`"
    ))
}

/// `pc-i440fx-OLDEST … NEWEST` of a newest-first list of machine types (or the one), for
/// messages.
pub fn machine_span(newest_first: &[String]) -> String {
    match (newest_first.last(), newest_first.first()) {
        (Some(old), Some(new)) if old != new => format!("{old} … {new}"),
        (Some(one), _) => one.clone(),
        _ => "no i440FX PC machine type".to_owned(),
    }
}

/// `(major, minor)` of a versioned i440FX machine type (`pc-i440fx-7.2`).
pub fn machine_version(machine: &str) -> Option<(u32, u32)> {
    major_minor(machine.strip_prefix(MACHINE_PREFIX)?)
}

/// `(major, minor)` of a `MAJOR.MINOR` version (a QEMU's, as its agent reports it): each of 1
/// to 4 digits.
pub fn major_minor(version: &str) -> Option<(u32, u32)> {
    let (major, minor) = version.split_once('.')?;
    let number = |s: &str| {
        (!s.is_empty() && s.len() <= 4 && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse::<u32>().ok())
            .flatten()
    };
    Some((number(major)?, number(minor)?))
}

/// Upper bounds that keep one descriptor from asking for absurd amounts.
pub mod limits {
    pub const MAX_CPUS: u32 = 1024;
    /// Largest key and value of a wasm map: the wasm runtime's own bound, so a descriptor it
    /// would refuse at start is refused here, naming the field.
    pub const MAX_KEY_SIZE: u32 = 1024;
    pub const MAX_VALUE_SIZE: u32 = 1024;
    pub const MAX_MAP_ENTRIES: u32 = 1 << 24;
    pub const WASM_PAGE: u64 = 64 * 1024;
    /// Largest `spec.wasm.limits.fuel_per_batch` (about a second of CPU per batch).
    pub const MAX_WASM_FUEL_PER_BATCH: u64 = 1_000_000_000;
    /// Largest `spec.wasm.tick_ms` (an hour).
    pub const MAX_WASM_TICK_MS: u32 = 3_600_000;
    /// `spec.wasm.tick_ms` when the descriptor leaves it out.
    pub const DEFAULT_WASM_TICK_MS: u32 = 1000;
    /// Largest `spec.wasm.limits.memory`: all a wasm32 module can address.
    pub const MAX_WASM_MEMORY: u64 = 4 << 30;
    /// Most packet ports one VNF may have.
    pub const MAX_PORTS: usize = 32;
    /// Bytes of bookkeeping one map entry may cost besides its key and value (hash slot,
    /// control byte, live flag, LRU links); the wasm runtime's maps stay within it.
    pub const MAP_ENTRY_OVERHEAD_BYTES: u64 = 64;
    /// Bounds of a wasm VNF's map update log (kept for snapshots and moves): the payload of a
    /// full snapshot of its maps, within these.
    pub const MIN_MAP_LOG_BYTES: u64 = 64 << 10;
    pub const MAX_MAP_LOG_BYTES: u64 = 64 << 20;
    /// Largest wasm module accepted (upload or file).
    pub const MAX_MODULE_BYTES: u64 = 16 << 20;
    /// Most keys and entries one change of a map names (`POST
    /// /v1/vnfs/{name}/maps/{map}/entries`), and the largest body of one.
    pub const MAX_MAP_CHANGE_ENTRIES: usize = 65_536;
    pub const MAX_MAP_CHANGE_BYTES: usize = 8 << 20;
    /// Longest string field of a descriptor (a path, a kernel command line, a config value).
    pub const MAX_STRING_LEN: usize = 4096;
}

/// Prefix of a reference to an uploaded module: `sha256:<64 lowercase hex digits>`.
pub const MODULE_REF_PREFIX: &str = "sha256:";

/// The hex digest of a `sha256:<hex>` module reference; `None` for anything else (a path).
pub fn module_digest(module: &str) -> Option<&str> {
    module.strip_prefix(MODULE_REF_PREFIX).filter(|hex| {
        hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

/// The bytes one map may use: key, value and bookkeeping per entry, for every entry.
pub fn map_budget_bytes(map: &MapSpec) -> u64 {
    (u64::from(map.key_size) + u64::from(map.value_size) + limits::MAP_ENTRY_OVERHEAD_BYTES)
        * u64::from(map.max_entries)
}

impl VnfDescriptor {
    pub fn name(&self) -> &Name {
        &self.metadata.name
    }

    /// How a wasm VNF's worker waits for packets (`spec.wasm.poll`, or its default for the
    /// CPU policy); `None` for a vm VNF.
    pub fn poll_mode(&self) -> Option<PollMode> {
        let wasm = self.spec.wasm.as_ref()?;
        Some(wasm.poll.unwrap_or(match self.spec.cpu.policy {
            CpuPolicy::Dedicated | CpuPolicy::Pinned => PollMode::Busy,
            CpuPolicy::Shared => PollMode::Adaptive,
        }))
    }

    /// The host memory this VNF may use, in bytes: a vm's guest RAM; a wasm VNF's linear-memory
    /// limit, plus the budget of every map it runs with (`module_maps`, the module's own maps,
    /// with capacities overridden by `spec.wasm.maps` of the same name; maps only the descriptor
    /// names count too), plus its map update log (a snapshot's payload, within
    /// `MIN_MAP_LOG_BYTES..=MAX_MAP_LOG_BYTES`).
    pub fn memory_budget(&self, module_maps: &[MapSpec]) -> u64 {
        match (&self.spec.vm, &self.spec.wasm) {
            (Some(vm), _) => vm.memory.bytes(),
            (None, Some(wasm)) => {
                let maps: Vec<&MapSpec> = module_maps
                    .iter()
                    .map(|m| wasm.maps.iter().find(|o| o.name == m.name).unwrap_or(m))
                    .chain(
                        wasm.maps
                            .iter()
                            .filter(|o| !module_maps.iter().any(|m| m.name == o.name)),
                    )
                    .collect();
                let snapshot: u64 = maps
                    .iter()
                    .map(|m| {
                        u64::from(m.max_entries) * (u64::from(m.key_size) + u64::from(m.value_size))
                    })
                    .fold(0, u64::saturating_add);
                let log = snapshot.clamp(limits::MIN_MAP_LOG_BYTES, limits::MAX_MAP_LOG_BYTES);
                maps.into_iter().map(map_budget_bytes).fold(
                    wasm.limits.memory.bytes().saturating_add(log),
                    u64::saturating_add,
                )
            }
            (None, None) => 0,
        }
    }

    /// Descriptor maps that the module (whose maps are `module_maps`) does not declare, or
    /// declares with another layout: each with its field path.
    pub fn map_mismatches(&self, module_maps: &[MapSpec]) -> Vec<FieldError> {
        let Some(wasm) = &self.spec.wasm else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (i, map) in wasm.maps.iter().enumerate() {
            let at = format!("spec.wasm.maps[{i}]");
            match module_maps.iter().find(|m| m.name == map.name) {
                None => {
                    let declared: Vec<&str> = module_maps.iter().map(|m| m.name.as_str()).collect();
                    out.push(FieldError::new(
                        format!("{at}.name"),
                        format!(
                            "the module declares no map `{}` (its maps: {}); descriptor maps only \
                             change the capacity of the module's own",
                            map.name,
                            if declared.is_empty() {
                                "none".to_owned()
                            } else {
                                declared.join(", ")
                            }
                        ),
                    ));
                }
                Some(m)
                    if (m.kind, m.key_size, m.value_size)
                        != (map.kind, map.key_size, map.value_size) =>
                {
                    out.push(FieldError::new(
                        at,
                        format!(
                            "map `{}` has another layout in the module ({:?}, key_size {}, value_size {}); only max_entries may differ",
                            map.name, m.kind, m.key_size, m.value_size
                        ),
                    ));
                }
                Some(_) => {}
            }
        }
        out
    }

    /// Every semantic rule the types alone cannot express; all violations, each with its path.
    pub fn violations(&self) -> Vec<FieldError> {
        let mut out = Vec::new();
        let spec = &self.spec;
        check_runtime_blocks(spec, &mut out);
        check_cpu(&spec.cpu, &mut out);
        check_strings(self, &mut out);
        let ports = check_ports(&spec.ports, &mut out);
        if let Some(wasm) = &spec.wasm {
            check_wasm(wasm, &mut out);
            if wasm.poll == Some(PollMode::Busy) && spec.cpu.policy == CpuPolicy::Shared {
                out.push(FieldError::new(
                    "spec.wasm.poll",
                    "busy polling would take the whole core from the shared group; use \
                     adaptive, or cpu.policy dedicated or pinned",
                ));
            }
        }
        if let Some(vm) = &spec.vm {
            check_vm(vm, &ports, &mut out);
        }
        if spec
            .placement
            .as_ref()
            .is_some_and(|p| p.zone_anti_affinity)
            && spec.redundancy != Redundancy::ActiveStandby
        {
            out.push(FieldError::new(
                "spec.placement.zone_anti_affinity",
                "only applies to redundancy: active-standby",
            ));
        }
        out
    }
}

fn check_runtime_blocks(spec: &VnfSpec, out: &mut Vec<FieldError>) {
    match spec.runtime {
        RuntimeKind::Wasm => {
            if spec.wasm.is_none() {
                out.push(FieldError::new(
                    "spec.wasm",
                    "is required when runtime is wasm",
                ));
            }
            if spec.vm.is_some() {
                out.push(FieldError::new(
                    "spec.vm",
                    "must be absent when runtime is wasm",
                ));
            }
        }
        RuntimeKind::Vm => {
            if spec.vm.is_none() {
                out.push(FieldError::new("spec.vm", "is required when runtime is vm"));
            }
            if spec.wasm.is_some() {
                out.push(FieldError::new(
                    "spec.wasm",
                    "must be absent when runtime is vm",
                ));
            }
        }
    }
}

fn check_cpu(cpu: &CpuSpec, out: &mut Vec<FieldError>) {
    if let Some(count) = cpu.count {
        if count == 0 {
            out.push(FieldError::new("spec.cpu.count", "must be at least 1"));
        } else if count > limits::MAX_CPUS {
            out.push(FieldError::new(
                "spec.cpu.count",
                format!("{count} is more than {}", limits::MAX_CPUS),
            ));
        }
    }
    match cpu.policy {
        CpuPolicy::Dedicated => {
            forbid(cpu.group.is_some(), "spec.cpu.group", "policy: shared", out);
            forbid(cpu.cores.is_some(), "spec.cpu.cores", "policy: pinned", out);
        }
        CpuPolicy::Shared => {
            if cpu.group.is_none() {
                out.push(FieldError::new(
                    "spec.cpu.group",
                    "is required with policy: shared (the group whose core the vCPUs share)",
                ));
            }
            forbid(cpu.cores.is_some(), "spec.cpu.cores", "policy: pinned", out);
            forbid(
                cpu.thread_policy.is_some(),
                "spec.cpu.thread_policy",
                "policy: dedicated",
                out,
            );
        }
        CpuPolicy::Pinned => {
            forbid(cpu.group.is_some(), "spec.cpu.group", "policy: shared", out);
            forbid(
                cpu.thread_policy.is_some(),
                "spec.cpu.thread_policy",
                "policy: dedicated",
                out,
            );
            match &cpu.cores {
                None => out.push(FieldError::new(
                    "spec.cpu.cores",
                    "is required with policy: pinned (Linux logical CPU numbers)",
                )),
                Some(cores) if cores.is_empty() => out.push(FieldError::new(
                    "spec.cpu.cores",
                    "must list at least one core",
                )),
                Some(cores) => {
                    let unique: BTreeSet<_> = cores.iter().collect();
                    if unique.len() != cores.len() {
                        out.push(FieldError::new(
                            "spec.cpu.cores",
                            "lists a core more than once",
                        ));
                    }
                    if let Some(count) = cpu.count
                        && usize::try_from(count).ok() != Some(cores.len())
                    {
                        out.push(FieldError::new(
                            "spec.cpu.count",
                            format!(
                                "is {count} but cores lists {}; omit count or make them equal",
                                cores.len()
                            ),
                        ));
                    }
                }
            }
        }
    }
    if cpu.numa_node.is_some() && cpu.near_nic.is_some() {
        out.push(FieldError::new(
            "spec.cpu.near_nic",
            "cannot be combined with numa_node; give one locality rule",
        ));
    }
    if cpu.near_nic.as_deref().is_some_and(|n| n.trim().is_empty()) {
        out.push(FieldError::new(
            "spec.cpu.near_nic",
            "must name a host interface",
        ));
    }
}

fn forbid(present: bool, path: &str, belongs_to: &str, out: &mut Vec<FieldError>) {
    if present {
        out.push(FieldError::new(
            path,
            format!("only applies to {belongs_to}"),
        ));
    }
}

/// No string of the descriptor may hold a NUL byte (it would cut a path or a command line
/// short on the node) or exceed `MAX_STRING_LEN`.
fn check_strings(d: &VnfDescriptor, out: &mut Vec<FieldError>) {
    fn walk(value: &serde_json::Value, path: &str, out: &mut Vec<FieldError>) {
        match value {
            serde_json::Value::String(s) => {
                if s.contains('\0') {
                    out.push(FieldError::new(path, "contains a NUL byte"));
                } else if s.len() > limits::MAX_STRING_LEN {
                    out.push(FieldError::new(
                        path,
                        format!(
                            "is {} bytes long, more than {}",
                            s.len(),
                            limits::MAX_STRING_LEN
                        ),
                    ));
                }
            }
            serde_json::Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    walk(item, &format!("{path}[{i}]"), out);
                }
            }
            serde_json::Value::Object(fields) => {
                for (key, item) in fields {
                    let at = if path.is_empty() {
                        key.clone()
                    } else {
                        format!("{path}.{key}")
                    };
                    if key.contains('\0') {
                        out.push(FieldError::new(
                            at.escape_debug().to_string(),
                            "the key contains a NUL byte",
                        ));
                    } else {
                        walk(item, &at, out);
                    }
                }
            }
            _ => {}
        }
    }
    if let Ok(value) = serde_json::to_value(d) {
        walk(&value, "", out);
    }
}

fn check_ports<'a>(ports: &'a [Name], out: &mut Vec<FieldError>) -> BTreeSet<&'a Name> {
    if ports.len() > limits::MAX_PORTS {
        out.push(FieldError::new(
            "spec.ports",
            format!(
                "{} ports are more than the {} one VNF may have",
                ports.len(),
                limits::MAX_PORTS
            ),
        ));
    }
    let mut seen = BTreeSet::new();
    for (i, port) in ports.iter().enumerate() {
        if !seen.insert(port) {
            out.push(FieldError::new(
                format!("spec.ports[{i}]"),
                format!("port '{port}' is listed twice"),
            ));
        }
    }
    seen
}

fn check_wasm(wasm: &WasmSpec, out: &mut Vec<FieldError>) {
    if wasm.module.trim().is_empty() {
        out.push(FieldError::new(
            "spec.wasm.module",
            "must name an uploaded module (sha256:<hex>) or a .wasm file",
        ));
    } else if wasm.module.starts_with(MODULE_REF_PREFIX) && module_digest(&wasm.module).is_none() {
        out.push(FieldError::new(
            "spec.wasm.module",
            format!(
                "`{}` is not a module reference: sha256: must be followed by 64 lowercase hex digits",
                wasm.module.escape_debug()
            ),
        ));
    }
    if wasm.limits.memory.bytes() > limits::MAX_WASM_MEMORY {
        out.push(FieldError::new(
            "spec.wasm.limits.memory",
            format!(
                "{} is more than the 4GiB a wasm32 module can address",
                wasm.limits.memory
            ),
        ));
    } else if wasm.limits.memory.bytes() == 0 {
        out.push(FieldError::new(
            "spec.wasm.limits.memory",
            "must be at least one 64KiB wasm page",
        ));
    }
    check_blob_hex(&wasm.config, out);
    if !wasm.limits.memory.bytes().is_multiple_of(limits::WASM_PAGE) {
        out.push(FieldError::new(
            "spec.wasm.limits.memory",
            format!(
                "{} is not a multiple of the 64KiB wasm page",
                wasm.limits.memory
            ),
        ));
    }
    match wasm.limits.fuel_per_batch {
        Some(0) => out.push(FieldError::new(
            "spec.wasm.limits.fuel_per_batch",
            format!(
                "0 would stop every batch; must be 1 to {} (omit it for the default 10000000)",
                limits::MAX_WASM_FUEL_PER_BATCH
            ),
        )),
        Some(f) if f > limits::MAX_WASM_FUEL_PER_BATCH => out.push(FieldError::new(
            "spec.wasm.limits.fuel_per_batch",
            format!(
                "{f} is more than {} (about a second of CPU per batch)",
                limits::MAX_WASM_FUEL_PER_BATCH
            ),
        )),
        _ => {}
    }
    if let Some(t) = wasm.tick_ms
        && t > limits::MAX_WASM_TICK_MS
    {
        out.push(FieldError::new(
            "spec.wasm.tick_ms",
            format!(
                "{t} ms is more than {} (an hour); 0 never ticks",
                limits::MAX_WASM_TICK_MS
            ),
        ));
    }
    let mut names = BTreeSet::new();
    for (i, map) in wasm.maps.iter().enumerate() {
        let at = |field: &str| format!("spec.wasm.maps[{i}].{field}");
        if !names.insert(&map.name) {
            out.push(FieldError::new(
                at("name"),
                format!("map '{}' is declared twice", map.name),
            ));
        }
        let bounded = [
            ("key_size", map.key_size, limits::MAX_KEY_SIZE),
            ("value_size", map.value_size, limits::MAX_VALUE_SIZE),
            ("max_entries", map.max_entries, limits::MAX_MAP_ENTRIES),
        ];
        for (field, value, max) in bounded {
            if value == 0 || value > max {
                out.push(FieldError::new(
                    at(field),
                    format!("{value} is outside 1..={max}"),
                ));
            }
        }
        if map.kind == MapKind::Array && map.key_size != 4 {
            out.push(FieldError::new(
                at("key_size"),
                format!(
                    "an array map is indexed by a 4-byte index, so key_size must be 4 (got {})",
                    map.key_size
                ),
            ));
        }
    }
}

/// Config key whose value is the module's whole `tv_init` blob, hex-encoded.
pub const BLOB_HEX: &str = "blob_hex";

fn check_blob_hex(config: &BTreeMap<String, String>, out: &mut Vec<FieldError>) {
    let Some(hex) = config.get(BLOB_HEX) else {
        return;
    };
    let path = format!("spec.wasm.config.{BLOB_HEX}");
    if config.len() != 1 {
        out.push(FieldError::new(
            path,
            format!("`{BLOB_HEX}` is the whole init blob, so it must be the only config key"),
        ));
    } else if !hex.len().is_multiple_of(2) || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        out.push(FieldError::new(
            path,
            "must be an even number of hex digits (two per byte of the init blob)",
        ));
    }
}

fn check_vm(vm: &VmSpec, ports: &BTreeSet<&Name>, out: &mut Vec<FieldError>) {
    const MIB: u64 = 1 << 20;
    if !vm.memory.bytes().is_multiple_of(MIB) {
        out.push(FieldError::new(
            "spec.vm.memory",
            format!("{} is not a whole number of MiB", vm.memory),
        ));
    } else if vm.memory.bytes() < 16 * MIB {
        out.push(FieldError::new(
            "spec.vm.memory",
            format!("{} is below the 16MiB minimum", vm.memory),
        ));
    }
    if let Some(page) = vm.hugepages {
        if page.bytes() != 2 * MIB && page.bytes() != 1 << 30 {
            out.push(FieldError::new(
                "spec.vm.hugepages",
                format!("{page} is not a huge page size; valid sizes are 2MiB and 1GiB"),
            ));
        } else if !vm.memory.bytes().is_multiple_of(page.bytes()) {
            out.push(FieldError::new(
                "spec.vm.memory",
                format!("{} is not a multiple of the {page} huge page", vm.memory),
            ));
        }
    }
    for (path, value) in [
        ("spec.vm.kernel", &vm.kernel),
        ("spec.vm.initrd", &vm.initrd),
        ("spec.vm.disk", &vm.disk),
    ] {
        if value.as_deref().is_some_and(|v| v.trim().is_empty()) {
            out.push(FieldError::new(path, "must not be empty when given"));
        }
    }
    if vm.initrd.is_some() && vm.kernel.is_none() {
        out.push(FieldError::new(
            "spec.vm.initrd",
            "needs spec.vm.kernel: an initrd is booted with its kernel",
        ));
    }
    if let Some(m) = &vm.machine
        && let Err(why) = check_machine_type(m)
    {
        out.push(FieldError::new("spec.vm.machine", why));
    }
    if let Some(m) = &vm.cpu_model
        && let Err(why) = check_cpu_model(m)
    {
        out.push(FieldError::new("spec.vm.cpu_model", why));
    }
    for (i, nic) in vm.nics.iter().enumerate() {
        if !ports.contains(&nic.port) {
            out.push(FieldError::new(
                format!("spec.vm.nics[{i}].port"),
                format!("'{}' is not one of spec.ports", nic.port),
            ));
        }
    }
}
