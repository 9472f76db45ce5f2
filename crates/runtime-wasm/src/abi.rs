//! VNF ABI v1 constants: export and import names, signatures, batch memory layout and error
//! codes, as specified in `docs/vnf-abi.md`. Owns the numbers only; no host logic.

use crate::security::Permission;

/// ABI version implemented by this runtime (`"abi"` in the manifest).
pub const ABI_VERSION: u32 = 1;
/// Import module name of every host function.
pub const IMPORT_MODULE: &str = "telvirt";
/// Name of the custom section holding the JSON manifest.
pub const MANIFEST_SECTION: &str = "telvirt.manifest";

/// Maximum packets per batch.
pub const MAX_BATCH: usize = 64;
/// Bytes per packet descriptor: `{u32 off; u32 len; u32 port; i32 verdict}` little-endian.
pub const DESC_SIZE: usize = 16;
/// Bytes of the descriptor area at the start of the batch buffer.
pub const DESC_AREA: usize = MAX_BATCH * DESC_SIZE;
/// Bytes per packet slot in linear memory.
pub const SLOT_SIZE: usize = 2048;
/// Where the packet starts inside its slot (room for pushing headers, e.g. GTP-U encapsulation).
pub const HEADROOM: usize = 128;
/// Largest packet the host accepts into a batch.
pub const MAX_PACKET: usize = SLOT_SIZE - HEADROOM;
/// Size of the buffer the module must provide through `tv_buffer`.
pub const BUFFER_SIZE: usize = DESC_AREA + MAX_BATCH * SLOT_SIZE;
/// Largest packets emitted through `emit` per batch.
pub const MAX_EMIT: usize = 64;
/// Largest log lines kept per batch (more are counted and dropped).
pub const MAX_LOG_PER_BATCH: usize = 16;
/// Largest log line in bytes (longer lines are truncated).
pub const MAX_LOG_LEN: usize = 256;

/// Verdict value meaning drop; values `>= 0` forward to that output port.
pub const VERDICT_DROP: i32 = -1;

/// Host function return codes.
pub mod code {
    /// Success.
    pub const OK: i32 = 0;
    /// Key not found.
    pub const ENOENT: i32 = -2;
    /// Key exists (update with flag `NOEXIST`).
    pub const EEXIST: i32 = -3;
    /// Map full (hash map at `max_entries`).
    pub const E2BIG: i32 = -4;
    /// Invalid argument (unknown map id, bad flags, index out of range, bad port).
    pub const EINVAL: i32 = -5;
    /// Pointer or length outside linear memory.
    pub const EFAULT: i32 = -6;
    /// Per-batch buffer full (emit).
    pub const EFULL: i32 = -7;
}

/// Fuel charged by the map host functions and `random`, on top of the wasm instructions around the call, so
/// a module cannot spin in host code for free: `tv_init`, batches and ticks all run under a
/// fuel budget (`RunLimits::fuel_per_batch`). A call costs its base plus one unit per
/// [`host_fuel::BYTES_PER_FUEL`] bytes of key and value it copies (rounded down). One unit of
/// fuel is roughly one wasm instruction (about a nanosecond of compiled code); the bases are
/// of the order of what the call costs the host (hashing, probing, logging), a lookup being
/// the cheapest. A call that finds too little fuel left traps like wasm code out of fuel
/// (`FailureReason::CpuLimit`) and does nothing.
pub mod host_fuel {
    /// Base cost of `map_lookup`.
    pub const MAP_LOOKUP: u64 = 20;
    /// Base cost of `map_update` (insert or replace, plus the update log when enabled).
    pub const MAP_UPDATE: u64 = 100;
    /// Base cost of `map_delete`.
    pub const MAP_DELETE: u64 = 100;
    /// Base cost of `random` (plus one unit per [`BYTES_PER_FUEL`] bytes it fills: a 4 KiB
    /// fill is about 500 rounds of its generator).
    pub const RANDOM: u64 = 20;
    /// Bytes of key and value copied (or random bytes made) per unit of fuel.
    pub const BYTES_PER_FUEL: u64 = 8;

    /// Fuel of one call with this base that copies `bytes` bytes of key and value.
    pub const fn cost(base: u64, bytes: u64) -> u64 {
        base + bytes / BYTES_PER_FUEL
    }
}

/// `map_update` flags.
pub mod update_flags {
    /// Insert or replace.
    pub const ANY: i32 = 0;
    /// Insert only if the key is absent.
    pub const NOEXIST: i32 = 1;
    /// Replace only if the key exists.
    pub const EXIST: i32 = 2;
}

/// Wasm value types used in the ABI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValKind {
    I32,
    I64,
}

/// One host function of module `telvirt`.
#[derive(Debug, Clone, Copy)]
pub struct HostImport {
    pub name: &'static str,
    pub params: &'static [ValKind],
    pub results: &'static [ValKind],
    pub permission: Permission,
}

use ValKind::{I32, I64};

/// Every host function of ABI v1.
pub const IMPORTS: &[HostImport] = &[
    HostImport {
        name: "map_lookup",
        params: &[I32, I32, I32],
        results: &[I32],
        permission: Permission::MapsRead,
    },
    HostImport {
        name: "map_update",
        params: &[I32, I32, I32, I32],
        results: &[I32],
        permission: Permission::MapsWrite,
    },
    HostImport {
        name: "map_delete",
        params: &[I32, I32],
        results: &[I32],
        permission: Permission::MapsWrite,
    },
    HostImport {
        name: "clock_ns",
        params: &[],
        results: &[I64],
        permission: Permission::Clock,
    },
    HostImport {
        name: "log",
        params: &[I32, I32, I32],
        results: &[],
        permission: Permission::Log,
    },
    HostImport {
        name: "random",
        params: &[I32, I32],
        results: &[I32],
        permission: Permission::Random,
    },
    HostImport {
        name: "emit",
        params: &[I32, I32, I32],
        results: &[I32],
        permission: Permission::Emit,
    },
    HostImport {
        name: "counter_add",
        params: &[I32, I64],
        results: &[],
        permission: Permission::Counters,
    },
];

/// Looks up a host function by name.
pub fn import(name: &str) -> Option<&'static HostImport> {
    IMPORTS.iter().find(|i| i.name == name)
}

/// One export of the ABI.
#[derive(Debug, Clone, Copy)]
pub struct AbiExport {
    pub name: &'static str,
    pub params: &'static [ValKind],
    pub results: &'static [ValKind],
    pub required: bool,
}

/// Exported linear memory name (required).
pub const EXPORT_MEMORY: &str = "memory";

/// Function exports of ABI v1.
pub const EXPORTS: &[AbiExport] = &[
    AbiExport {
        name: "tv_buffer",
        params: &[I32],
        results: &[I32],
        required: true,
    },
    AbiExport {
        name: "tv_init",
        params: &[I32, I32],
        results: &[I32],
        required: true,
    },
    AbiExport {
        name: "tv_process",
        params: &[I32, I32],
        results: &[I32],
        required: true,
    },
    AbiExport {
        name: "tv_tick",
        params: &[I64],
        results: &[],
        required: false,
    },
];
