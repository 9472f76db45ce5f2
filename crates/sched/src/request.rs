//! What a VNF asks for ([`VnfRequest`], shaped like the descriptor's `spec.cpu`) and what it gets
//! ([`Placement`], [`RolePlacement`]). Owns request validation. Must not choose hosts or cores.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::cpulist::CpuList;
use crate::error::SchedError;

/// `spec.runtime`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Runtime {
    /// QEMU/KVM virtual machine (has emulator threads).
    #[default]
    Vm,
    /// WebAssembly workers (no emulator threads).
    Wasm,
}

impl Runtime {
    /// The name `spec.runtime` gives it.
    pub fn as_str(self) -> &'static str {
        match self {
            Runtime::Vm => "vm",
            Runtime::Wasm => "wasm",
        }
    }
}

/// `spec.cpu.policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CpuPolicy {
    /// Each vCPU / worker gets its own hardware thread exclusively.
    #[default]
    Dedicated,
    /// vCPUs share a physical core owned by the (authority, group) alone.
    Shared,
    /// Exactly the listed logical CPUs.
    Pinned,
}

/// `spec.cpu.thread_policy` (dedicated only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ThreadPolicy {
    /// Use sibling pairs where they fit, any free thread otherwise.
    #[default]
    Prefer,
    /// One vCPU per physical core; the SMT siblings stay empty.
    Isolate,
    /// vCPUs fill whole cores (every sibling thread of each); needs an SMT host.
    Require,
}

/// `spec.redundancy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Redundancy {
    /// One instance.
    #[default]
    None,
    /// ACT and SBY on different hosts.
    ActiveStandby,
}

/// `spec.vm.emulator`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EmulatorPolicy {
    /// QEMU's own threads run on the host's shared set.
    #[default]
    Share,
    /// QEMU's own threads get one extra dedicated cpu on the VNF's NUMA node.
    Isolate,
}

/// Which instance of a VNF.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Role {
    /// The active instance (also the only one without redundancy).
    #[serde(rename = "ACT")]
    Act,
    /// The standby instance.
    #[serde(rename = "SBY")]
    Sby,
}

impl Role {
    pub(crate) fn index(self) -> usize {
        match self {
            Role::Act => 0,
            Role::Sby => 1,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Act => "ACT",
            Role::Sby => "SBY",
        })
    }
}

/// `spec.cpu`, field for field.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuRequest {
    /// `policy`.
    #[serde(default)]
    pub policy: CpuPolicy,
    /// `count`: vCPUs or wasm workers (dedicated, shared); ignored for pinned (= `cores.len()`).
    #[serde(default)]
    pub count: u32,
    /// `thread_policy` (dedicated only).
    #[serde(default)]
    pub thread_policy: ThreadPolicy,
    /// `group` (shared only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// `cores` (pinned only): Linux logical CPU numbers, one per vCPU in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cores: Vec<u32>,
    /// `numa_node`: keep every cpu (and memory) on this node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numa_node: Option<u32>,
    /// `near_nic`: keep every cpu (and memory) on this NIC's node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub near_nic: Option<String>,
}

/// Everything the scheduler needs to know about one VNF.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VnfRequest {
    /// Unique VNF name (`metadata.name`).
    pub name: String,
    /// Owning authority; shared groups are per authority.
    pub authority: String,
    /// `spec.runtime`.
    #[serde(default)]
    pub runtime: Runtime,
    /// `spec.cpu`.
    pub cpu: CpuRequest,
    /// `spec.redundancy`.
    #[serde(default)]
    pub redundancy: Redundancy,
    /// `spec.placement.zone_anti_affinity`: ACT and SBY in different `zone` labels.
    #[serde(default)]
    pub zone_anti_affinity: bool,
    /// `spec.vm.emulator` (vm only).
    #[serde(default)]
    pub emulator: EmulatorPolicy,
    /// Memory needed on the VNF's NUMA node, in bytes (0 = not tracked).
    #[serde(default)]
    pub memory_per_node: u64,
}

/// Largest vCPU count one VNF may ask for.
pub const MAX_VCPUS: u32 = 1024;

fn req_err(vnf: &str, field: &str, reason: impl Into<String>) -> SchedError {
    SchedError::InvalidRequest {
        vnf: vnf.to_string(),
        field: field.to_string(),
        reason: reason.into(),
    }
}

impl VnfRequest {
    /// Number of vCPUs / workers this request places.
    pub fn vcpus(&self) -> u32 {
        match self.cpu.policy {
            CpuPolicy::Pinned => self.cpu.cores.len() as u32,
            _ => self.cpu.count,
        }
    }

    /// Checks the request on its own (not against hosts). `shared_core_capacity` is the
    /// scheduler's limit of vCPUs per shared-group core.
    pub fn validate(&self, shared_core_capacity: u32) -> Result<(), SchedError> {
        let n = self.name.as_str();
        if n.trim().is_empty() {
            return Err(req_err(n, "metadata.name", "must not be empty"));
        }
        if self.authority.trim().is_empty() {
            return Err(req_err(n, "authority", "must not be empty"));
        }
        let c = &self.cpu;
        if c.numa_node.is_some() && c.near_nic.is_some() {
            return Err(req_err(
                n,
                "cpu.near_nic",
                "give either numa_node or near_nic, not both",
            ));
        }
        if let Some(nic) = &c.near_nic
            && nic.trim().is_empty()
        {
            return Err(req_err(n, "cpu.near_nic", "must not be empty"));
        }
        if c.policy != CpuPolicy::Dedicated && c.thread_policy != ThreadPolicy::Prefer {
            return Err(req_err(
                n,
                "cpu.thread_policy",
                "only valid with policy: dedicated",
            ));
        }
        if c.policy != CpuPolicy::Shared && c.group.is_some() {
            return Err(req_err(n, "cpu.group", "only valid with policy: shared"));
        }
        if c.policy != CpuPolicy::Pinned && !c.cores.is_empty() {
            return Err(req_err(n, "cpu.cores", "only valid with policy: pinned"));
        }
        match c.policy {
            CpuPolicy::Dedicated | CpuPolicy::Shared => {
                if c.count == 0 || c.count > MAX_VCPUS {
                    return Err(req_err(
                        n,
                        "cpu.count",
                        format!("{} is out of range; must be 1..={MAX_VCPUS}", c.count),
                    ));
                }
            }
            CpuPolicy::Pinned => {
                if c.cores.is_empty() {
                    return Err(req_err(
                        n,
                        "cpu.cores",
                        "policy pinned needs the cpu numbers, e.g. cores: [4, 5]",
                    ));
                }
                if c.count != 0 && c.count as usize != c.cores.len() {
                    return Err(req_err(
                        n,
                        "cpu.count",
                        format!(
                            "{} does not match the {} pinned cores (omit count or make it equal)",
                            c.count,
                            c.cores.len()
                        ),
                    ));
                }
                let mut sorted = c.cores.clone();
                sorted.sort_unstable();
                if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
                    return Err(req_err(
                        n,
                        "cpu.cores",
                        format!("cpu {} is listed twice; each vCPU needs its own cpu", w[0]),
                    ));
                }
                if c.cores.len() as u32 > MAX_VCPUS {
                    return Err(req_err(
                        n,
                        "cpu.cores",
                        format!("more than {MAX_VCPUS} cores"),
                    ));
                }
            }
        }
        if c.policy == CpuPolicy::Shared {
            match &c.group {
                None => return Err(req_err(n, "cpu.group", "policy shared needs a group name")),
                Some(g) if g.trim().is_empty() => {
                    return Err(req_err(n, "cpu.group", "must not be empty"));
                }
                _ => {}
            }
            if c.count > shared_core_capacity {
                return Err(req_err(
                    n,
                    "cpu.count",
                    format!(
                        "{} shared vCPUs do not fit one group core (at most {shared_core_capacity})",
                        c.count
                    ),
                ));
            }
        }
        if self.runtime == Runtime::Wasm && self.emulator == EmulatorPolicy::Isolate {
            return Err(req_err(
                n,
                "vm.emulator",
                "only vm VNFs have emulator threads; use share (the default) for wasm",
            ));
        }
        if self.zone_anti_affinity && self.redundancy == Redundancy::None {
            return Err(req_err(
                n,
                "placement.zone_anti_affinity",
                "only meaningful with redundancy: active-standby",
            ));
        }
        Ok(())
    }
}

/// Where one role (ACT or SBY) of a VNF runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolePlacement {
    /// ACT or SBY.
    pub role: Role,
    /// Host name.
    pub host: String,
    /// Per vCPU / worker, in order, the logical cpus it is pinned to (one cpu for dedicated
    /// and pinned; the group core's threads for shared).
    pub cpus: Vec<CpuList>,
    /// Emulator threads (vm only): the host's shared set, or the one isolated cpu.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub emulator_cpus: Option<CpuList>,
    /// Cpus held empty for this VNF (SMT siblings under isolate, the odd sibling under require).
    #[serde(default, skip_serializing_if = "CpuList::is_empty")]
    pub held: CpuList,
    /// NUMA node ids of the cpus (and of the memory).
    pub numa_nodes: Vec<u32>,
}

impl RolePlacement {
    /// Every cpu this role holds exclusively (vCPUs of dedicated/pinned, isolated emulator,
    /// held siblings). Shared-group cores are not included (they belong to the group).
    pub fn exclusive_cpus(&self, policy: CpuPolicy, emulator: EmulatorPolicy) -> CpuList {
        let mut v: Vec<u32> = self.held.cpus().to_vec();
        if policy != CpuPolicy::Shared {
            v.extend(self.cpus.iter().flat_map(|c| c.cpus().iter().copied()));
        }
        if emulator == EmulatorPolicy::Isolate
            && let Some(e) = &self.emulator_cpus
        {
            v.extend(e.cpus());
        }
        CpuList::from_cpus(v)
    }
}

/// The whole placement of a VNF.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// VNF name.
    pub vnf: String,
    /// The active (or only) instance.
    pub act: RolePlacement,
    /// The standby instance (active-standby only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sby: Option<RolePlacement>,
}

/// An existing allocation as the controller stores it (for [`crate::Scheduler::restore`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    /// The request it was placed for.
    pub request: VnfRequest,
    /// Where it was placed.
    pub placement: Placement,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> VnfRequest {
        VnfRequest {
            name: "fw1".into(),
            authority: "op".into(),
            cpu: CpuRequest {
                count: 2,
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn field_of(r: &VnfRequest) -> String {
        match r.validate(8).unwrap_err() {
            SchedError::InvalidRequest { field, .. } => field,
            e => panic!("unexpected {e}"),
        }
    }

    #[test]
    fn every_bad_request_names_its_field() {
        assert!(base().validate(8).is_ok());
        type Mutate = Box<dyn Fn(&mut VnfRequest)>;
        let cases: Vec<(&str, Mutate)> = vec![
            ("metadata.name", Box::new(|r| r.name.clear())),
            ("authority", Box::new(|r| r.authority.clear())),
            ("cpu.count", Box::new(|r| r.cpu.count = 0)),
            ("cpu.count", Box::new(|r| r.cpu.count = MAX_VCPUS + 1)),
            (
                "cpu.near_nic",
                Box::new(|r| {
                    r.cpu.numa_node = Some(0);
                    r.cpu.near_nic = Some("eth1".into());
                }),
            ),
            (
                "cpu.near_nic",
                Box::new(|r| r.cpu.near_nic = Some(String::new())),
            ),
            ("cpu.group", Box::new(|r| r.cpu.group = Some("g".into()))),
            ("cpu.cores", Box::new(|r| r.cpu.cores = vec![1])),
            ("cpu.group", Box::new(|r| r.cpu.policy = CpuPolicy::Shared)),
            (
                "cpu.group",
                Box::new(|r| {
                    r.cpu.policy = CpuPolicy::Shared;
                    r.cpu.group = Some(" ".into());
                }),
            ),
            (
                "cpu.count",
                Box::new(|r| {
                    r.cpu.policy = CpuPolicy::Shared;
                    r.cpu.group = Some("g".into());
                    r.cpu.count = 9;
                }),
            ),
            (
                "cpu.thread_policy",
                Box::new(|r| {
                    r.cpu.policy = CpuPolicy::Shared;
                    r.cpu.group = Some("g".into());
                    r.cpu.thread_policy = ThreadPolicy::Isolate;
                }),
            ),
            (
                "cpu.cores",
                Box::new(|r| {
                    r.cpu.policy = CpuPolicy::Pinned;
                    r.cpu.count = 0;
                }),
            ),
            (
                "cpu.cores",
                Box::new(|r| {
                    r.cpu.policy = CpuPolicy::Pinned;
                    r.cpu.count = 0;
                    r.cpu.cores = vec![3, 3];
                }),
            ),
            (
                "cpu.count",
                Box::new(|r| {
                    r.cpu.policy = CpuPolicy::Pinned;
                    r.cpu.cores = vec![3];
                }),
            ),
            (
                "vm.emulator",
                Box::new(|r| {
                    r.runtime = Runtime::Wasm;
                    r.emulator = EmulatorPolicy::Isolate;
                }),
            ),
            (
                "placement.zone_anti_affinity",
                Box::new(|r| r.zone_anti_affinity = true),
            ),
        ];
        for (want, f) in cases {
            let mut r = base();
            f(&mut r);
            assert_eq!(field_of(&r), want, "{r:?}");
        }
    }

    #[test]
    fn request_deserializes_from_descriptor_like_json() {
        let r: VnfRequest = serde_json::from_str(
            r#"{"name":"upf","authority":"op","runtime":"vm",
                "cpu":{"policy":"dedicated","count":4,"thread_policy":"isolate","near_nic":"eth1"},
                "redundancy":"active-standby","zone_anti_affinity":true,"emulator":"isolate"}"#,
        )
        .unwrap();
        assert_eq!(r.cpu.thread_policy, ThreadPolicy::Isolate);
        assert_eq!(r.redundancy, Redundancy::ActiveStandby);
        assert!(r.validate(8).is_ok());
    }
}
