//! The core map of one host (`telvirt host show`): which VNF holds which cpu, which are free,
//! shared or reserved, as serde data and as plain text, and the same map confined to what one
//! authority may see ([`confine`]). Must not change scheduler state.

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
        /// The authority owning the VNF.
        #[serde(default)]
        authority: String,
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
    /// Held by a VNF or a shared group of another authority (see [`confine`]): who holds it and
    /// what for is not shown.
    InUse,
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
    let mut uses: BTreeMap<u32, (&crate::request::VnfRequest, Role, CpuUse, bool)> =
        BTreeMap::new();
    for &(vid, role) in host.roles.keys() {
        let v = s.vnf(vid);
        let i = role.index();
        for (rs, pending) in [(&v.roles[i], false), (&v.pending[i], true)] {
            let Some(rs) = rs.as_ref().filter(|r| r.host == h) else {
                continue;
            };
            let mut put = |t: u32, u: CpuUse| {
                uses.entry(t).or_insert_with(|| (&v.req, role, u, pending));
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
                                        Some((req, role, usage, pending)) => CpuState::Vnf {
                                            vnf: req.name.clone(),
                                            authority: req.authority.clone(),
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

/// The map as `authority` may see it: its own VNFs and shared groups by name; a cpu held by any
/// other authority's VNF or group only as [`CpuState::InUse`], without owner, VNF or group name.
pub fn confine(map: &HostMap, authority: &str) -> HostMap {
    let mut out = map.clone();
    for thread in out
        .nodes
        .iter_mut()
        .flat_map(|n| n.cores.iter_mut())
        .flat_map(|c| c.threads.iter_mut())
    {
        let foreign = match &thread.state {
            CpuState::Vnf { authority: a, .. } | CpuState::Group { authority: a, .. } => {
                a != authority
            }
            _ => false,
        };
        if foreign {
            thread.state = CpuState::InUse;
        }
    }
    out
}

fn label(state: &CpuState) -> String {
    match state {
        CpuState::Free => "free".into(),
        CpuState::Reserved => "reserved".into(),
        CpuState::Shared => "shared".into(),
        CpuState::Unassigned => "unassigned".into(),
        CpuState::InUse => "in use".into(),
        CpuState::Vnf {
            vnf,
            role,
            usage,
            pending,
            ..
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::{CpuPolicy, CpuRequest, Runtime, VnfRequest};
    use crate::{HostSpec, ReservePolicy, SchedConfig};

    fn request(name: &str, authority: &str, group: Option<&str>) -> VnfRequest {
        VnfRequest {
            name: name.into(),
            authority: authority.into(),
            runtime: Runtime::Wasm,
            cpu: CpuRequest {
                policy: if group.is_some() {
                    CpuPolicy::Shared
                } else {
                    CpuPolicy::Dedicated
                },
                count: 1,
                group: group.map(str::to_owned),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn confine_hides_every_other_authority_and_keeps_its_own() {
        let mut s = Scheduler::new(SchedConfig {
            reserve: ReservePolicy::None,
            ..SchedConfig::default()
        })
        .expect("valid config");
        s.add_host(HostSpec::synthetic("h1", 1, 6, 1))
            .expect("valid host");
        for r in [
            request("alicefw", "alice", None),
            request("alicelight", "alice", Some("rg")),
            request("bobfw", "bob", None),
            request("boblight", "bob", Some("bg")),
        ] {
            s.place(&r).expect("room for every request");
        }
        let full = host_map(&s, "h1").expect("h1 exists");
        let text = render_host_map(&full);
        for name in ["alicefw", "alice/rg", "bobfw", "bob/bg"] {
            assert!(text.contains(name), "the full map names {name}: {text}");
        }

        let alice = confine(&full, "alice");
        let text = render_host_map(&alice);
        assert!(text.contains("alicefw/ACT vcpu0"), "{text}");
        assert!(text.contains("group alice/rg"), "{text}");
        assert!(
            !text.contains("bob"),
            "alice's map names bob's objects: {text}"
        );
        assert_eq!(text.matches("in use").count(), 2, "{text}");
        let json = serde_json::to_string(&alice).expect("serialisable");
        assert!(!json.contains("bob"), "{json}");
        assert!(json.contains("\"in-use\""), "{json}");

        let bob = render_host_map(&confine(&full, "bob"));
        assert!(!bob.contains("alice"), "{bob}");
        assert!(bob.contains("bobfw") && bob.contains("bob/bg"), "{bob}");
        // Free, shared and the counts are the same for everyone.
        assert_eq!(alice.free_cpus, full.free_cpus);
        assert_eq!(confine(&full, "nobody").nodes.len(), full.nodes.len());
    }
}
