//! Adapters that drive each runtime crate through the agent's [`crate::Runtime`] trait.
//!
//! Owns mapping descriptors onto each runtime's own configuration types; must not hold
//! reconcile logic (that is [`crate::reconcile`]'s).

pub mod handoff;
pub mod vm;
pub mod wasm;
