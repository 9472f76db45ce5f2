//! telvirt vm runtime: VNFs as QEMU/KVM (or TCG) virtual machines. Owns QEMU processes, the
//! QMP client, the default guest image, the accelerator probe, CPU pinning, peripherals and the
//! boot benchmark; must not know about descriptors or the store (the agent maps those onto
//! [`VmConfig`]).

pub mod error;
pub mod image;
pub mod qmp;

pub use error::{Error, Result};
