//! telvirt-guest: the protocol between the host (runtime-vm) and the in-guest agent, and the
//! agent's request handling. Owns the wire types and what each request does inside the guest;
//! must not know about QEMU, the host's configuration or anything outside the guest.

// Tests may unwrap: a failed unwrap is a failed test.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod agent;
pub mod drops;
pub mod proto;
pub mod qdisc;
