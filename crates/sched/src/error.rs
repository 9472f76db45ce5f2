//! The crate's one error type, [`SchedError`]: every refusal carries which field or resource,
//! why, and what would be valid. Must not do I/O or formatting beyond `Display`.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::request::Role;

/// Why one host cannot take a VNF role (part of [`SchedError::NoPlacement`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostReason {
    /// Host name.
    pub host: String,
    /// Human-readable reason, e.g. `needs 4 dedicated cpus on one NUMA node; node0 has 3 free`.
    pub reason: String,
}

/// Per-host reasons, rendered one per line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostReasons(pub Vec<HostReason>);

impl fmt::Display for HostReasons {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("\n  (the cluster has no hosts)");
        }
        for r in &self.0 {
            write!(f, "\n  {}: {}", r.host, r.reason)?;
        }
        Ok(())
    }
}

/// Every error of the scheduler. Nothing is changed when one is returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchedError {
    /// An inventory (host description) is not valid.
    #[error("inventory: host `{host}`: {field}: {reason}")]
    InvalidInventory {
        /// Host name (or `#index` when the name itself is missing).
        host: String,
        /// Field path, e.g. `sockets[0].numa_nodes[1].cores[3]`.
        field: String,
        /// Why, and what would be valid.
        reason: String,
    },
    /// A VNF request is not valid.
    #[error("vnf `{vnf}`: {field}: {reason}")]
    InvalidRequest {
        /// VNF name.
        vnf: String,
        /// Field path in descriptor terms, e.g. `cpu.group`.
        field: String,
        /// Why, and what would be valid.
        reason: String,
    },
    /// A host with that name already exists.
    #[error("host `{0}` already exists")]
    DuplicateHost(String),
    /// No host with that name.
    #[error("host `{0}` does not exist")]
    UnknownHost(String),
    /// The host still holds VNFs.
    #[error(
        "host `{host}` still holds VNFs: {vnfs}; release or move them first (or use fail_host)"
    )]
    HostInUse {
        /// Host name.
        host: String,
        /// Comma-separated VNF roles.
        vnfs: String,
    },
    /// A VNF with that name is already placed.
    #[error("vnf `{0}` is already placed; names are unique (release it first)")]
    DuplicateVnf(String),
    /// No VNF with that name is placed.
    #[error("vnf `{0}` is not placed")]
    UnknownVnf(String),
    /// The VNF has no such role (e.g. SBY of a VNF without redundancy).
    #[error("vnf `{vnf}` has no {role} placement")]
    UnknownRole {
        /// VNF name.
        vnf: String,
        /// The role asked for.
        role: Role,
    },
    /// No host can take the VNF role; one reason per host.
    #[error("cannot place vnf `{vnf}` ({role}): {summary}{reasons}")]
    NoPlacement {
        /// VNF name.
        vnf: String,
        /// Role being placed.
        role: Role,
        /// One-line summary of the demand.
        summary: String,
        /// Why each host was refused.
        reasons: HostReasons,
    },
    /// The placement would leave too few free dedicated cpus to heal the loss of one host.
    #[error(
        "placing vnf `{vnf}` would break the n+1 healing reserve: if host `{host}` failed, its redundant VNFs would need {needed} dedicated cpus but only {free} would be free on the other hosts"
    )]
    ReserveViolation {
        /// VNF name.
        vnf: String,
        /// The host whose loss could no longer be healed.
        host: String,
        /// Dedicated cpus its redundant roles need.
        needed: u64,
        /// Dedicated cpus that would be free elsewhere.
        free: u64,
    },
    /// An existing allocation handed to `restore` is inconsistent.
    #[error("restore vnf `{vnf}`: {reason}")]
    InvalidRestore {
        /// VNF name.
        vnf: String,
        /// What is wrong.
        reason: String,
    },
    /// A change is already in progress for that role.
    #[error("vnf `{vnf}` ({role}) already has a change in progress; commit or abort it first")]
    ChangePending {
        /// VNF name.
        vnf: String,
        /// Role.
        role: Role,
    },
    /// commit/abort without a change in progress.
    #[error("vnf `{vnf}` ({role}) has no change in progress")]
    NoChangePending {
        /// VNF name.
        vnf: String,
        /// Role.
        role: Role,
    },
    /// The change is not possible for this VNF (e.g. resize of a pinned VNF).
    #[error("vnf `{vnf}`: {reason}")]
    InvalidChange {
        /// VNF name.
        vnf: String,
        /// Why, and what would be valid.
        reason: String,
    },
}
