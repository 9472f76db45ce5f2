//! telvirt's wasm runtime: verified, sandboxed VNF service logic in portable bytecode.
//!
//! Owns the VNF ABI v1 (`abi`, `host`), manifest parsing, the install-time verifier, the
//! security manager, resource limits, runtime-owned maps with snapshots and update logs, engine
//! selection (cranelift or pulley), the module store and the instance life cycle. It must not
//! know about descriptors or the cluster store: callers pass this crate's own config types.
//!
//! Life cycle: [`WasmRuntime::install`] → [`WasmRuntime::instantiate`] →
//! [`VnfInstance::process_batch`] (optionally on a pinned [`worker::Worker`]) →
//! [`VnfInstance::lock`] / [`VnfInstance::unlock`] → [`WasmRuntime::upgrade`] →
//! [`WasmRuntime::remove`].

pub mod abi;
pub mod batch;
pub mod bench;
pub mod engine;
pub mod error;
mod host;
pub mod instance;
pub mod manifest;
pub mod maps;
pub mod module_file;
pub mod native;
pub mod runtime;
pub mod security;
pub mod snapshot;
pub mod store;
pub mod trace;
pub mod verify;
pub mod vnfs;
pub mod worker;

pub use batch::{Emitted, PacketBatch, Verdict};
pub use engine::EngineKind;
pub use error::{Error, FailureReason, Result};
pub use host::LogLine;
pub use instance::{
    MAX_MEMORY_BYTES, RestartPolicy, RunLimits, StartTimes, VnfConfig, VnfInstance, VnfState,
    VnfStats,
};
pub use manifest::Manifest;
pub use maps::{MAP_ENTRY_OVERHEAD_BYTES, MapChanged, MapDef, MapKind, MapSet};
pub use module_file::{MAX_MODULE_BYTES, read_module_file};
pub use runtime::{InstallRequest, RuntimeConfig, WasmRuntime};
pub use security::{DomainPolicy, ModuleSignature, Permission, SecurityPolicy};
pub use store::{InstalledModule, ModuleStore};
pub use verify::{VerifyLimits, Violation, ViolationKind};
