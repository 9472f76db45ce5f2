//! The controller's key layout in the store and the records kept under it.
//!
//! Owns key names and (de)serialization of stored records. It must not decide anything: callers
//! read, change and write records inside store transactions.

use serde::{Deserialize, Serialize};

pub const VNFS: &str = "/vnfs/";
pub const EVENTS: &str = "/events/";
pub const AUTHORITIES: &str = "/authorities/";
pub const HOSTS: &str = "/hosts/";
pub const ALLOCATIONS: &str = "/allocations/";
pub const TOKENS: &str = "/tokens/";
pub const GRANTS: &str = "/grants/";
pub const MODULES: &str = "/modules/";
/// A host's liveness: present while its agent's heartbeat lease is alive.
pub const HOST_LEASES: &str = "/leases/hosts/";
/// When each host's agent last sent a heartbeat (outlives the lease, for its age).
pub const HEARTBEATS: &str = "/heartbeats/";
/// Cordoned hosts: nothing new is placed on them.
pub const CORDONS: &str = "/cordons/";

/// The pending index: one empty key per VNF that waits for a placement (phase Pending, not
/// being deleted), written in the same transaction as the VNF record, so a scheduling pass
/// reads only these instead of every VNF.
pub const PENDING: &str = "/pending/";

pub fn pending_key(vnf: &str) -> String {
    format!("{PENDING}{vnf}")
}

/// Whether a VNF belongs in the pending index.
pub fn wants_placement(record: &VnfRecord) -> bool {
    record.vnf.phase == telvirt_model::Phase::Pending && !record.deleting
}

/// The per-host assignment index: one empty key per VNF placed on a host, written in the
/// transaction that places it and removed with it, so a host's agent reads only its VNFs. An
/// entry may outlive a placement that was cleared elsewhere (a drain): readers check the VNF.
pub const ASSIGNMENTS: &str = "/assignments/";

pub fn assignments_prefix(host: &str) -> String {
    format!("{ASSIGNMENTS}{host}/")
}

pub fn assignment_key(host: &str, vnf: &str) -> String {
    format!("{ASSIGNMENTS}{host}/{vnf}")
}

/// The hosts a VNF is placed on, each once.
pub fn placed_hosts(record: &VnfRecord) -> std::collections::BTreeSet<String> {
    record
        .vnf
        .placements
        .iter()
        .map(|p| p.host.clone())
        .collect()
}

pub fn vnf_key(name: &str) -> String {
    format!("{VNFS}{name}")
}

pub fn events_prefix(vnf: &str) -> String {
    format!("{EVENTS}{vnf}/")
}

/// Events kept per VNF: writing one more deletes the oldest kept (in the same transaction), so
/// a VNF that flaps for months holds at most this many.
pub const MAX_EVENTS_PER_VNF: u64 = 100;

/// Zero-padded so that key order is sequence order.
pub fn event_key(vnf: &str, seq: u64) -> String {
    format!("{EVENTS}{vnf}/{seq:020}")
}

pub fn authority_key(name: &str) -> String {
    format!("{AUTHORITIES}{name}")
}

/// Index from a token's SHA-256 to its authority, so authenticating is one lookup.
pub fn token_key(sha256: &str) -> String {
    format!("{TOKENS}{sha256}")
}

/// The host resources granted to an authority (`HostGrants`).
pub fn grants_key(authority: &str) -> String {
    format!("{GRANTS}{authority}")
}

/// An uploaded module's index entry, by the hex SHA-256 of its bytes.
pub fn module_key(sha256: &str) -> String {
    format!("{MODULES}{sha256}")
}

/// An uploaded module's bytes, in chunks: `/module-bytes/<sha256>/<index>`.
pub const MODULE_BYTES: &str = "/module-bytes/";

pub fn module_chunk_key(sha256: &str, index: u32) -> String {
    format!("{MODULE_BYTES}{sha256}/{index:04}")
}

pub fn host_key(name: &str) -> String {
    format!("{HOSTS}{name}")
}

pub fn host_lease_key(host: &str) -> String {
    format!("{HOST_LEASES}{host}")
}

pub fn heartbeat_key(host: &str) -> String {
    format!("{HEARTBEATS}{host}")
}

pub fn cordon_key(host: &str) -> String {
    format!("{CORDONS}{host}")
}

pub fn allocation_key(vnf: &str) -> String {
    format!("{ALLOCATIONS}{vnf}")
}

/// A stored authority: only the hash of its token is kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthorityRecord {
    pub name: String,
    /// SHA-256 of the token, hex.
    pub token_sha256: String,
    pub created_at: String,
    /// The wasm security domain of its modules; absent in records written before domains
    /// existed (read as the default domain, or `operator` for admin).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// Its deletion began: its token is gone, and nothing it sent before is written any more
    /// (every write on its behalf compares this record's revision, [`crate::access::GrantsRead`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleting: bool,
}

/// An uploaded, verified module: its bytes live in the node's module directory under their
/// digest; this is the index the controller checks descriptors against.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleRecord {
    pub sha256: String,
    pub size: u64,
    pub info: telvirt_model::api::ModuleInfo,
    /// Authorities that uploaded it, with when each first did.
    pub owners: std::collections::BTreeMap<String, String>,
    /// How many chunks of its bytes the store holds under [`MODULE_BYTES`] (0: a store from
    /// before they were kept there, which has the bytes in one node's module directory only).
    #[serde(default)]
    pub chunks: u32,
}

/// A stored host: as its agent registers it (the agent protocol's type).
pub use telvirt_api::HostRecord;

/// The last heartbeat of a host's agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatRecord {
    /// Unix time in milliseconds.
    pub at_ms: u64,
}

/// Why a host is cordoned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CordonRecord {
    /// The authority that cordoned (or drained) it.
    pub by: String,
    /// RFC 3339.
    pub at: String,
    /// Whether it was drained (its VNFs moved away) as well.
    #[serde(default)]
    pub drained: bool,
}

/// Controller-side bookkeeping kept with a VNF but not part of its API shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VnfRecord {
    pub vnf: telvirt_model::Vnf,
    /// Sequence number of the last event.
    pub last_event: u64,
    /// Delete was asked while it ran: remove it once the agent reports it stopped.
    #[serde(default)]
    pub deleting: bool,
}
