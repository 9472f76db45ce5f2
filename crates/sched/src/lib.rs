//! telvirt-sched: the inventory model, the CPU-core allocator and the placement engine.
//!
//! Packet-processing VNFs keep their throughput and latency only when their cpus are theirs
//! alone. This crate decides which host and which Linux logical cpus every VNF role gets:
//! dedicated (1:1, with SMT thread policies), shared groups (light vCPUs of one authority on a
//! core of their own), pinned (exact cpus), NUMA/NIC locality, isolated emulator threads,
//! active-standby anti-affinity and an n+1 healing reserve.
//!
//! It is pure and deterministic: no I/O, no async, no clocks, no randomness. The same calls in
//! the same order give the same placements. The one exception is the [`bench`] module, which
//! reads `std::time::Instant` to time the placement benchmark.
//!
//! Entry points: [`Scheduler`] (state and every operation), [`HostSpec`]/[`Inventory`] (what
//! hosts look like), [`VnfRequest`] (what a VNF asks for), [`Placement`] (what it gets),
//! [`coremap::host_map`] and [`coremap::render_host_map`] (`telvirt host show`),
//! [`bench::run_placement_bench`] (`telvirt bench placement`).

pub mod bench;
pub mod coremap;
mod cpulist;
mod error;
mod inventory;
mod pick;
mod request;
mod scheduler;

pub use cpulist::{CpuList, CpuListParseError, MAX_CPU};
pub use error::{HostReason, HostReasons, SchedError};
pub use inventory::{
    HostSpec, Inventory, MAX_HOST_THREADS, NicSpec, NumaNodeSpec, SocketSpec, TopologySpec,
};
pub use request::{
    Allocation, CpuPolicy, CpuRequest, EmulatorPolicy, MAX_VCPUS, Placement, Redundancy, Role,
    RolePlacement, Runtime, ThreadPolicy, VnfRequest,
};
pub use scheduler::{
    Change, MAX_NODES_PER_HOST, Relocation, Replacement, ReservePolicy, SchedConfig, Scheduler,
    Search, Stats,
};
