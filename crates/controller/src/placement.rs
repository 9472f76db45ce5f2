//! Translation between descriptors and the scheduler, and between the scheduler's core map and
//! the API's host view.
//!
//! Owns field-for-field mapping only. It must not place anything: the scheduler does.

use telvirt_model::api::{CpuUse, CpuView, HostStatus, HostView};
use telvirt_model::{
    CpuPolicy, EmulatorPolicy, Placement, Redundancy, Role, RuntimeKind, ThreadPolicy, Vnf,
    VnfDescriptor,
};
use telvirt_sched as sched;

use crate::records::HostRecord;

/// The runtimes a host's agent registered (`HostRecord::runtimes`), as the scheduler knows them
/// (names it does not know are left out); `None`, every runtime, for a host that lists none
/// (an inventory's host without an agent, whose facts are all on paper).
pub fn offered_runtimes(names: &[String]) -> Option<Vec<sched::Runtime>> {
    if names.is_empty() {
        return None;
    }
    Some(
        names
            .iter()
            .filter_map(|n| match n.as_str() {
                "vm" => Some(sched::Runtime::Vm),
                "wasm" => Some(sched::Runtime::Wasm),
                _ => None,
            })
            .collect(),
    )
}

/// The scheduler's request for a VNF owned by `authority`.
pub fn request(descriptor: &VnfDescriptor, authority: &str) -> sched::VnfRequest {
    let spec = &descriptor.spec;
    let cpu = &spec.cpu;
    sched::VnfRequest {
        name: descriptor.name().to_string(),
        authority: authority.to_owned(),
        runtime: match spec.runtime {
            RuntimeKind::Vm => sched::Runtime::Vm,
            RuntimeKind::Wasm => sched::Runtime::Wasm,
        },
        cpu: sched::CpuRequest {
            policy: match cpu.policy {
                CpuPolicy::Dedicated => sched::CpuPolicy::Dedicated,
                CpuPolicy::Shared => sched::CpuPolicy::Shared,
                CpuPolicy::Pinned => sched::CpuPolicy::Pinned,
            },
            count: cpu.effective_count(),
            thread_policy: match cpu.thread_policy.unwrap_or_default() {
                ThreadPolicy::Prefer => sched::ThreadPolicy::Prefer,
                ThreadPolicy::Isolate => sched::ThreadPolicy::Isolate,
                ThreadPolicy::Require => sched::ThreadPolicy::Require,
            },
            group: cpu.group.as_ref().map(ToString::to_string),
            cores: cpu.cores.clone().unwrap_or_default(),
            numa_node: cpu.numa_node,
            near_nic: cpu.near_nic.clone(),
        },
        redundancy: match spec.redundancy {
            Redundancy::None => sched::Redundancy::None,
            Redundancy::ActiveStandby => sched::Redundancy::ActiveStandby,
        },
        zone_anti_affinity: spec
            .placement
            .as_ref()
            .is_some_and(|p| p.zone_anti_affinity),
        emulator: match spec.vm.as_ref().map(|vm| vm.emulator) {
            Some(EmulatorPolicy::Isolate) => sched::EmulatorPolicy::Isolate,
            _ => sched::EmulatorPolicy::Share,
        },
        memory_per_node: spec.vm.as_ref().map_or(0, |vm| vm.memory.bytes()),
    }
}

/// The scheduler's request for a stored VNF: its descriptor's, with the memory budget the
/// controller computed at create (guest RAM, or wasm linear memory plus map bytes) on every
/// NUMA node it uses.
pub fn vnf_request(vnf: &Vnf) -> sched::VnfRequest {
    let mut req = request(&vnf.descriptor, vnf.owner.as_str());
    if vnf.memory_bytes > 0 {
        req.memory_per_node = vnf.memory_bytes;
    }
    req
}

fn role(r: sched::Role) -> Role {
    match r {
        sched::Role::Act => Role::Active,
        sched::Role::Sby => Role::Standby,
    }
}

fn role_placement(p: &sched::RolePlacement, group: Option<&str>) -> Placement {
    Placement {
        role: role(p.role),
        host: p.host.clone(),
        vcpus: p.cpus.iter().map(|c| c.cpus().to_vec()).collect(),
        emulator_cpus: p
            .emulator_cpus
            .as_ref()
            .map(|c| c.cpus().to_vec())
            .unwrap_or_default(),
        held: p.held.cpus().to_vec(),
        numa_nodes: p.numa_nodes.clone(),
        group: group.map(str::to_owned),
    }
}

/// The API's placements (ACT first) of a scheduler placement.
pub fn placements(p: &sched::Placement, descriptor: &VnfDescriptor) -> Vec<Placement> {
    let group = descriptor.spec.cpu.group.as_ref().map(|g| g.as_str());
    std::iter::once(&p.act)
        .chain(p.sby.as_ref())
        .map(|r| role_placement(r, group))
        .collect()
}

/// A host's liveness and schedulability, as the controller read them from the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostLife {
    pub status: HostStatus,
    pub schedulable: bool,
    pub heartbeat_age_ms: Option<u64>,
}

/// The host view the API shows: facts from the host record, liveness from its lease, the core
/// map from the scheduler. `map` is shown as given: confine it first
/// ([`sched::coremap::confine`]) for a caller who may not see every authority's names.
pub fn host_view(record: &HostRecord, life: HostLife, map: &sched::coremap::HostMap) -> HostView {
    let mut cpus = Vec::new();
    let mut sockets = std::collections::BTreeSet::new();
    for node in &map.nodes {
        sockets.insert(node.socket);
        for core in &node.cores {
            for thread in &core.threads {
                cpus.push(CpuView {
                    cpu: thread.cpu,
                    core: core.core,
                    socket: node.socket,
                    numa_node: node.id,
                    usage: cpu_use(&thread.state),
                });
            }
        }
    }
    cpus.sort_by_key(|c| c.cpu);
    HostView {
        name: record.spec.name.clone(),
        labels: record.spec.labels.clone(),
        ready: life.status == HostStatus::Ready,
        status: life.status,
        schedulable: life.schedulable,
        heartbeat_age_ms: life.heartbeat_age_ms,
        sockets: u32::try_from(sockets.len()).unwrap_or(u32::MAX),
        numa_nodes: u32::try_from(map.nodes.len()).unwrap_or(u32::MAX),
        memory_bytes: record.memory_bytes,
        hugepages: record.hugepages.clone(),
        runtimes: record.runtimes.clone(),
        qemu: record.qemu.clone(),
        qemu_machines: record.qemu_machines.clone(),
        accel: record.accel,
        cpu: record.cpu.clone(),
        tunnel: record.tunnel.clone(),
        cpus,
    }
}

fn cpu_use(state: &sched::coremap::CpuState) -> CpuUse {
    use sched::coremap::{CpuState, CpuUse as Purpose};
    match state {
        CpuState::Free => CpuUse::Free,
        CpuState::Reserved => CpuUse::Reserved,
        CpuState::Shared => CpuUse::Shared,
        CpuState::Unassigned => CpuUse::Unassigned,
        CpuState::InUse => CpuUse::InUse,
        CpuState::Vnf {
            vnf,
            role: r,
            usage,
            ..
        } => CpuUse::Vnf {
            vnf: vnf.clone(),
            role: role(*r),
            purpose: match usage {
                Purpose::Vcpu(n) => format!("vcpu {n}"),
                Purpose::Emulator => "emulator".to_owned(),
                Purpose::Held => "held".to_owned(),
            },
        },
        CpuState::Group {
            authority,
            group,
            vcpus,
        } => CpuUse::Group {
            group: group.clone(),
            authority: authority.clone(),
            vcpus: *vcpus,
        },
    }
}

/// The placement of `vnf` on `host` (its ACT or SBY instance there).
pub fn placement_on<'a>(vnf: &'a Vnf, host: &str) -> Option<&'a Placement> {
    vnf.placements.iter().find(|p| p.host == host)
}
