//! telvirt vm runtime: VNFs as QEMU/KVM (or TCG) virtual machines. Owns QEMU processes, the
//! QMP client, the default guest image, the accelerator probe, CPU pinning, peripherals and the
//! boot benchmark; must not know about descriptors or the store (the agent maps those onto
//! [`VmConfig`]).

// Tests may unwrap: a failed unwrap is a failed test.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod accel;
pub mod agent;
pub mod bare;
pub mod bench;
pub mod config;
pub mod confine;
pub mod error;
pub mod image;
mod lines;
pub mod logcap;
pub mod manager;
pub mod memory;
pub mod migrate;
pub mod migrate_bench;
pub mod periph;
pub mod pin;
pub mod process;
pub mod qmp;
mod relay_filter;
pub mod stream_seal;
#[cfg(test)]
mod test_child;
pub mod uid_lease;
pub mod usage;

pub use accel::{AccelDecision, AccelProbe};
pub use bench::{BenchOptions, VmBenchReport};
pub use config::{
    Accel, AccelChoice, CpuPlacement, CpuSet, DiskFormat, DiskImage, Grant, HugePageSize,
    MachineTypes, Peripheral, VhostUserNic, VmConfig, parse_qemu_version, vhost_user_nic_options,
};
pub use confine::{Confinement, QemuUser};
pub use error::{Error, Result};
pub use image::{GuestImage, ImageBuilder, ImageProgress};
pub use manager::{
    ExitInfo, Failure, StopMethod, VcpuThread, VmHandle, VmManager, VmPhase, VmStatus,
};
pub use migrate::{
    MigrationChannel, MigrationProgress, MigrationTuning, StreamEnd, SwitchoverGate,
    pause_began_at_us, stream_socket,
};
pub use qmp::{QmpClient, QmpEvent};
pub use stream_seal::StreamSecret;
pub use telvirt_guest::proto as guest_proto;
