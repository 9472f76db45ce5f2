//! VNF lifecycle: phases, the transitions between them, and the records the control plane keeps.
//!
//! Owns which phase may follow which (Pending → Scheduled → Starting → Running ⇄ Locked →
//! Stopping → Stopped, or Failed with a reason; Unknown while its host is NotReady) and the
//! shapes of the stored VNF and its events.
//! It must not decide *when* a transition happens: the controller and the agent do.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::name::Name;
use crate::vnf::VnfDescriptor;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "PascalCase")]
pub enum Phase {
    /// Accepted and stored; not yet placed.
    Pending,
    /// Host and cores chosen.
    Scheduled,
    /// The runtime is starting it.
    Starting,
    Running,
    /// Paused by its owner's lock.
    Locked,
    Stopping,
    Stopped,
    /// Something went wrong; the reason says what.
    Failed,
    /// Its host stopped sending heartbeats (NotReady): what runs there is not known. The
    /// reason names the host; the last known phase comes back when the host does.
    Unknown,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Scheduled => "Scheduled",
            Phase::Starting => "Starting",
            Phase::Running => "Running",
            Phase::Locked => "Locked",
            Phase::Stopping => "Stopping",
            Phase::Stopped => "Stopped",
            Phase::Failed => "Failed",
            Phase::Unknown => "Unknown",
        }
    }

    /// Whether `self → next` is a lifecycle step. Staying in a phase is not a transition.
    pub fn can_become(self, next: Phase) -> bool {
        use Phase::*;
        matches!(
            (self, next),
            (Pending, Scheduled | Failed | Stopped)
                | (Scheduled, Starting | Failed | Stopped | Pending)
                | (Starting, Running | Failed | Stopping)
                | (Running, Locked | Stopping | Failed | Starting)
                | (Locked, Running | Stopping | Failed)
                | (Stopping, Stopped | Failed)
                | (Stopped, Starting | Pending | Failed)
                | (Failed, Starting | Pending | Stopped | Stopping)
                | (Starting | Running | Locked | Stopping, Unknown)
                | (
                    Unknown,
                    Pending | Starting | Running | Locked | Stopping | Stopped | Failed
                )
        )
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the owner wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "PascalCase")]
pub enum DesiredState {
    Running,
    Stopped,
}

/// The management authority's lock on a VNF.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LockInfo {
    /// The authority that locked it.
    pub by: Name,
    /// RFC 3339 time of the lock.
    pub at: String,
}

/// Role of one instance of a VNF.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The only instance, or the active one of an active-standby pair.
    Active,
    Standby,
}

/// Where one instance runs: host and the exact CPUs it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Placement {
    pub role: Role,
    pub host: String,
    /// Per vCPU or worker, in order, the Linux logical CPUs it runs on: one CPU when held
    /// exclusively, the threads of the group's core when shared.
    pub vcpus: Vec<Vec<u32>>,
    /// Where the emulator (QEMU's own threads) runs; empty for wasm.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub emulator_cpus: Vec<u32>,
    /// CPUs kept empty for this VNF (SMT siblings under `thread_policy: isolate`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub held: Vec<u32>,
    /// NUMA nodes the CPUs (and memory) lie on.
    #[serde(default)]
    pub numa_nodes: Vec<u32>,
    /// The shared group whose core the vCPUs share, for `policy: shared`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

impl Placement {
    /// Every CPU a vCPU or worker may run on, sorted, without repeats.
    pub fn cpus(&self) -> Vec<u32> {
        let mut all: Vec<u32> = self.vcpus.iter().flatten().copied().collect();
        all.sort_unstable();
        all.dedup();
        all
    }
}

/// A VNF as the control plane keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Vnf {
    pub name: Name,
    /// The authority that created it and owns it.
    pub owner: Name,
    pub descriptor: VnfDescriptor,
    pub desired: DesiredState,
    pub phase: Phase,
    /// Why it is in this phase (always set for Failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock: Option<LockInfo>,
    #[serde(default)]
    pub placements: Vec<Placement>,
    /// Peripherals granted to the running instance (`vnf attach`), in grant order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<crate::device::DeviceGrant>,
    /// Host memory it may use, in bytes, as placement counts it: a vm's guest RAM, or a wasm
    /// module's linear-memory limit plus its maps' budgets (`VnfDescriptor::memory_budget`).
    #[serde(default)]
    pub memory_bytes: u64,
    /// Bumped on every change of desired state, lock or placement.
    pub generation: u64,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    pub updated_at: String,
    /// The standby instance of an active-standby VNF, as its host's agent last saw it (the
    /// VNF's own phase is its active instance's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub standby: Option<crate::api::InstanceStatus>,
    /// How the active instance's state reaches the standby (wasm VNFs with a standby).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication: Option<crate::api::ReplicationStatus>,
    /// A move under way: the standby placement is its destination.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<crate::api::Migration>,
    /// The fencing token of an active-standby pair: raised each time its active instance
    /// moves to another host. An instance only forwards as the active of the epoch its
    /// assignment names; one that learns of a higher epoch stops forwarding.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub epoch: u64,
    /// Moves of it begun so far (`vnf migrate`): the latest one's id is this count
    /// ([`crate::api::Migration::id`]).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub moves: u64,
    /// The QEMU machine type its guest runs on (`pc-i440fx-7.2`), as its active's host last
    /// reported it (vm VNFs): its restarts and moves keep it unless `spec.vm.machine` names
    /// another, so a move to a host with a newer QEMU keeps the guest's hardware.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<String>,
    /// The accelerator its guest runs with (`kvm`, `tcg`), as its active's host last
    /// reported it (vm VNFs): a move keeps it unless `spec.vm.accel` names one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accel: Option<crate::vnf::Accelerator>,
    /// Its last move's guest broke on its arrival at the destination: the active (the move's
    /// source) resumes the stopped copy its stream left there. Cleared when a move begins.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub resume_moved_copy: bool,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// One lifecycle step of a VNF.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Event {
    /// Per-VNF sequence number, from 1.
    pub seq: u64,
    pub vnf: Name,
    /// RFC 3339.
    pub at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Phase>,
    pub to: Phase,
    pub reason: String,
    /// Who caused it: an authority name, `scheduler`, or `agent/<host>`.
    pub actor: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn main_path_is_allowed() {
        use Phase::*;
        let path = [
            Pending, Scheduled, Starting, Running, Locked, Running, Stopping, Stopped,
        ];
        for pair in path.windows(2) {
            assert!(pair[0].can_become(pair[1]), "{} -> {}", pair[0], pair[1]);
        }
    }

    #[test]
    fn unknown_is_entered_only_from_a_running_instance_and_left_to_any_observed_phase() {
        use Phase::*;
        for from in [Starting, Running, Locked, Stopping] {
            assert!(from.can_become(Unknown), "{from} -> Unknown");
            assert!(Unknown.can_become(from), "Unknown -> {from}");
        }
        for from in [Pending, Scheduled, Stopped, Failed, Unknown] {
            assert!(
                !from.can_become(Unknown),
                "{from} -> Unknown must be refused"
            );
        }
        assert_eq!(Unknown.as_str(), "Unknown");
    }

    #[test]
    fn shortcuts_are_refused() {
        use Phase::*;
        for (from, to) in [
            (Pending, Running),
            (Stopped, Running),
            (Locked, Stopped),
            (Running, Pending),
            (Running, Running),
        ] {
            assert!(!from.can_become(to), "{from} -> {to} must be refused");
        }
    }
}
