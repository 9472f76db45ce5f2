//! The core map of one host (`telvirt host show`): which VNF holds which cpu, which are free,
//! shared or reserved, as serde data and as plain text. Must not change scheduler state.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::error::SchedError;
use crate::inventory::Class;
use crate::request::Role;
use crate::scheduler::{Holder, Scheduler};

/// What a vCPU-holding cpu is used for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CpuUse {
    /// vCPU / worker number.
    Vcpu(u32),
    /// The isolated emulator thread.
    Emulator,
    /// Held empty for the VNF (SMT sibling).
    Held,
}

/// State of one logical cpu.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum CpuState {
    /// Dedicated and free.
    Free,
    /// In the reserved set.
    Reserved,
    /// In the shared set (host OS, agents, shared emulator threads).
    Shared,
    /// In no set (explicit `dedicated` leaves it out).
    Unassigned,
    /// Held by one VNF role.
    Vnf {
        /// VNF name.
        vnf: String,
        /// Role.
        role: Role,
        /// What for.
        #[serde(rename = "use")]
        usage: CpuUse,
        /// Held by a change in progress (new allocation not yet committed).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        pending: bool,
    },
    /// A core of a shared group.
    Group {
        /// Owning authority.
        authority: String,
        /// Group name.
        group: String,
        /// vCPUs on this core.
        vcpus: u32,
    },
}

/// One cpu.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThreadMap {
    /// Linux logical cpu number.
    pub cpu: u32,
    /// Its state.
    #[serde(flatten)]
    pub state: CpuState,
}

/// One physical core.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoreMap {
    /// Core id within its NUMA node's list.
    pub core: u32,
    /// Its hardware threads.
    pub threads: Vec<ThreadMap>,
}

/// One NUMA node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeMap {
    /// NUMA node id.
    pub id: u32,
    /// Socket id.
    pub socket: u32,
    /// Free memory in bytes, when tracked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_free: Option<u64>,
    /// Cores.
    pub cores: Vec<CoreMap>,
}

/// The core map of one host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostMap {
    /// Host name.
    pub host: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Dedicated cpus.
    pub dedicated_cpus: u32,
    /// Free dedicated cpus.
    pub free_cpus: u32,
    /// NUMA nodes.
    pub nodes: Vec<NodeMap>,
}

/// Builds the core map of host `name`.
pub fn host_map(s: &Scheduler, name: &str) -> Result<HostMap, SchedError> {
    let h = s.host_idx(name)?;
    let host = s.host(h);
    // thread index → (vnf, role, use, pending)
    let mut uses: BTreeMap<u32, (String, Role, CpuUse, bool)> = BTreeMap::new();
    for &(vid, role) in host.roles.keys() {
        let v = s.vnf(vid);
        let i = role.index();
        for (rs, pending) in [(&v.roles[i], false), (&v.pending[i], true)] {
            let Some(rs) = rs.as_ref().filter(|r| r.host == h) else {
                continue;
            };
            let mut put = |t: u32, u: CpuUse| {
                uses.entry(t)
                    .or_insert_with(|| (v.req.name.clone(), role, u, pending));
            };
            if rs.group_core.is_none() {
                for (k, &t) in rs.vcpus.iter().enumerate() {
                    put(t, CpuUse::Vcpu(k as u32));
                }
            }
            if let Some(t) = rs.emulator {
                put(t, CpuUse::Emulator);
            }
            for &t in &rs.held {
                put(t, CpuUse::Held);
            }
        }
    }
    let nodes = host
        .topo
        .nodes
        .iter()
        .enumerate()
        .map(|(ni, n)| NodeMap {
            id: n.id,
            socket: n.socket,
            memory_free: host.node_mem[ni],
            cores: n
                .cores
                .clone()
                .map(|c| {
                    let core = &host.topo.cores[c as usize];
                    CoreMap {
                        core: core.id,
                        threads: (core.first..core.first + core.nthreads)
                            .map(|t| {
                                let th = &host.topo.threads[t as usize];
                                let state = match host.holder[t as usize] {
                                    Holder::Free => CpuState::Free,
                                    Holder::Off => match th.class {
                                        Class::Reserved => CpuState::Reserved,
                                        Class::Shared => CpuState::Shared,
                                        _ => CpuState::Unassigned,
                                    },
                                    Holder::Vnf(_) => match uses.get(&t) {
                                        Some((vnf, role, usage, pending)) => CpuState::Vnf {
                                            vnf: vnf.clone(),
                                            role: *role,
                                            usage: usage.clone(),
                                            pending: *pending,
                                        },
                                        None => unreachable!(
                                            "every VNF-held thread belongs to a role on this host"
                                        ),
                                    },
                                    Holder::Group(g) => {
                                        let gs = &s.groups[g as usize];
                                        CpuState::Group {
                                            authority: gs.authority.clone(),
                                            group: gs.name.clone(),
                                            vcpus: host.group_cores.get(&c).map_or(0, |gc| gc.used),
                                        }
                                    }
                                };
                                ThreadMap { cpu: th.cpu, state }
                            })
                            .collect(),
                    }
                })
                .collect(),
        })
        .collect();
    Ok(HostMap {
        host: host.spec.name.clone(),
        labels: host.spec.labels.clone(),
        dedicated_cpus: host.topo.nodes.iter().map(|n| n.dedicated_threads).sum(),
        free_cpus: host.free,
        nodes,
    })
}

fn label(state: &CpuState) -> String {
    match state {
        CpuState::Free => "free".into(),
        CpuState::Reserved => "reserved".into(),
        CpuState::Shared => "shared".into(),
        CpuState::Unassigned => "unassigned".into(),
        CpuState::Vnf {
            vnf,
            role,
            usage,
            pending,
        } => {
            let u = match usage {
                CpuUse::Vcpu(n) => format!("vcpu{n}"),
                CpuUse::Emulator => "emulator".into(),
                CpuUse::Held => "held".into(),
            };
            format!(
                "{vnf}/{role} {u}{}",
                if *pending { " (pending)" } else { "" }
            )
        }
        CpuState::Group {
            authority,
            group,
            vcpus,
        } => format!("group {authority}/{group} ({vcpus} vcpus)"),
    }
}

/// Plain-text rendering of a core map, one line per physical core.
///
/// ```text
/// host h1 (zone=a): 5 of 6 dedicated cpus free
///   node 0 (socket 0):
///     core 0: cpu0 shared | cpu4 shared
///     core 1: cpu1 fw1/ACT vcpu0 | cpu5 free
/// ```
pub fn render_host_map(m: &HostMap) -> String {
    let mut out = String::new();
    let labels: Vec<String> = m.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let labels = if labels.is_empty() {
        String::new()
    } else {
        format!(" ({})", labels.join(" "))
    };
    let _ = writeln!(
        out,
        "host {}{labels}: {} of {} dedicated cpus free",
        m.host, m.free_cpus, m.dedicated_cpus
    );
    for n in &m.nodes {
        let mem = n
            .memory_free
            .map(|b| format!(", {b} bytes memory free"))
            .unwrap_or_default();
        let _ = writeln!(out, "  node {} (socket {}{mem}):", n.id, n.socket);
        for c in &n.cores {
            let threads: Vec<String> = c
                .threads
                .iter()
                .map(|t| format!("cpu{} {}", t.cpu, label(&t.state)))
                .collect();
            let _ = writeln!(out, "    core {}: {}", c.core, threads.join(" | "));
        }
    }
    out
}
