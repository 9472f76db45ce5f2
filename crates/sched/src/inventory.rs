//! Inventory model: host → sockets → NUMA nodes → physical cores → hardware threads, NICs with
//! their NUMA node, the dedicated / shared / reserved CPU sets and host labels.
//!
//! Owns the serde shape operators write (`--inventory FILE`) and the agent fills from `/sys`,
//! its validation, and the compact validated topology ([`Topology`]) the allocator works on.
//! Must not read `/sys` or any file itself: callers hand in data.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::cpulist::CpuList;
use crate::error::SchedError;

/// A whole inventory file: `hosts: [...]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Inventory {
    /// The hosts, in the order they are added to the scheduler.
    pub hosts: Vec<HostSpec>,
}

/// One host as the operator (or the agent's discovery) describes it.
///
/// Give the CPU layout either as `topology` (regular machines, Linux numbering) or as explicit
/// `sockets` (anything, e.g. what `/sys/devices/system/cpu` reports), not both.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HostSpec {
    /// Unique host name.
    pub name: String,
    /// Free-form labels; `zone` is used by `zone_anti_affinity`, `rack` is informative.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Regular layout shorthand (exclusive with `sockets`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology: Option<TopologySpec>,
    /// Explicit layout (exclusive with `topology`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sockets: Vec<SocketSpec>,
    /// Network interfaces and their NUMA node (for `near_nic`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nics: Vec<NicSpec>,
    /// CPUs for the host OS, agents and shared emulator threads (never handed out exclusively).
    #[serde(default)]
    pub shared: CpuList,
    /// CPUs nobody gets (e.g. kept for the host OS and interrupts).
    #[serde(default)]
    pub reserved: CpuList,
    /// CPUs that may be handed out exclusively. Default: every CPU not in `shared` or `reserved`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dedicated: Option<CpuList>,
}

/// Regular layout: Linux numbering `cpu = thread * (sockets * cores_per_socket) + socket *
/// cores_per_socket + core`, i.e. the SMT siblings of cpu 0 are cpu `sockets*cores_per_socket`, ...
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TopologySpec {
    /// Number of sockets (≥ 1).
    pub sockets: u32,
    /// Physical cores per socket (≥ 1).
    pub cores_per_socket: u32,
    /// Hardware threads per core (1 = no SMT, 2 = SMT2); default 1.
    #[serde(default = "one")]
    pub threads_per_core: u32,
    /// NUMA nodes per socket (must divide `cores_per_socket`); default 1.
    #[serde(default = "one")]
    pub numa_nodes_per_socket: u32,
    /// Memory per NUMA node in bytes; absent = memory is not tracked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_per_node: Option<u64>,
}

fn one() -> u32 {
    1
}

/// One socket of an explicit layout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SocketSpec {
    /// Socket (package) id.
    pub id: u32,
    /// Its NUMA nodes.
    pub numa_nodes: Vec<NumaNodeSpec>,
}

/// One NUMA node of an explicit layout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NumaNodeSpec {
    /// NUMA node id (unique on the host).
    pub id: u32,
    /// Memory in bytes; absent = not tracked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<u64>,
    /// Physical cores, each given as the CPU list of its hardware threads (`"0,32"`).
    pub cores: Vec<CpuList>,
}

/// A network interface and the NUMA node it is attached to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = HostNicSpec)]
pub struct NicSpec {
    /// Interface name (`near_nic` refers to it).
    pub name: String,
    /// NUMA node id.
    pub numa_node: u32,
}

impl HostSpec {
    /// A regular synthetic host: `sockets` × `cores_per_socket` × `threads_per_core`, one NUMA
    /// node per socket, core 0 of each socket (all its threads) in the shared set, one NIC
    /// `nic<N>` per NUMA node. Used by tests, benchmarks and examples.
    pub fn synthetic(
        name: impl Into<String>,
        sockets: u32,
        cores_per_socket: u32,
        threads_per_core: u32,
    ) -> HostSpec {
        let total = sockets * cores_per_socket;
        let shared = (0..sockets)
            .flat_map(|s| (0..threads_per_core).map(move |t| t * total + s * cores_per_socket));
        HostSpec {
            name: name.into(),
            topology: Some(TopologySpec {
                sockets,
                cores_per_socket,
                threads_per_core,
                numa_nodes_per_socket: 1,
                memory_per_node: None,
            }),
            nics: (0..sockets)
                .map(|s| NicSpec {
                    name: format!("nic{s}"),
                    numa_node: s,
                })
                .collect(),
            shared: CpuList::from_cpus(shared),
            ..HostSpec::default()
        }
    }
}

/// What a hardware thread may be used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    Dedicated,
    Shared,
    Reserved,
    /// Not listed in any set when `dedicated` is explicit: never handed out.
    Unassigned,
}

#[derive(Debug, Clone)]
pub(crate) struct Thread {
    pub cpu: u32,
    pub core: u32,
    pub class: Class,
}

#[derive(Debug, Clone)]
pub(crate) struct Core {
    /// Socket-local core id as given (or generated).
    pub id: u32,
    /// Index of its first thread; threads are contiguous.
    pub first: u32,
    pub nthreads: u32,
    pub node: u32,
    /// All threads are in the dedicated set (the core can be handed out whole).
    pub whole: bool,
}

#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub id: u32,
    pub socket: u32,
    /// Range of core indices (contiguous).
    pub cores: std::ops::Range<u32>,
    pub memory: Option<u64>,
    pub dedicated_threads: u32,
    pub whole_cores: u32,
}

/// A validated, index-based host layout. Thread indices are ordered node → core → thread.
#[derive(Debug, Clone)]
pub(crate) struct Topology {
    pub threads: Vec<Thread>,
    pub cores: Vec<Core>,
    pub nodes: Vec<Node>,
    /// cpu number → thread index (`u32::MAX` when absent).
    pub cpu_index: Vec<u32>,
    /// NIC name → node index.
    pub nics: BTreeMap<String, u32>,
    pub shared: CpuList,
    pub max_threads_per_core: u32,
}

impl Topology {
    pub fn thread_of_cpu(&self, cpu: u32) -> Option<u32> {
        self.cpu_index
            .get(cpu as usize)
            .copied()
            .filter(|&i| i != u32::MAX)
    }

    pub fn node_by_id(&self, id: u32) -> Option<u32> {
        self.nodes.iter().position(|n| n.id == id).map(|i| i as u32)
    }

    pub fn node_of_thread(&self, t: u32) -> u32 {
        self.cores[self.threads[t as usize].core as usize].node
    }
}

fn inv_err(host: &str, field: impl Into<String>, reason: impl Into<String>) -> SchedError {
    SchedError::InvalidInventory {
        host: host.to_string(),
        field: field.into(),
        reason: reason.into(),
    }
}

/// Largest number of hardware threads one host may have.
pub const MAX_HOST_THREADS: usize = 8192;

impl HostSpec {
    /// The explicit socket layout this spec describes (expands `topology`).
    pub fn expanded_sockets(&self) -> Result<Vec<SocketSpec>, SchedError> {
        let h = self.name.as_str();
        match (&self.topology, self.sockets.is_empty()) {
            (Some(_), false) => Err(inv_err(
                h,
                "topology",
                "give either `topology` or `sockets`, not both",
            )),
            (None, true) => Err(inv_err(
                h,
                "sockets",
                "no CPU layout: give `topology` (sockets, cores_per_socket, threads_per_core) or explicit `sockets`",
            )),
            (None, false) => Ok(self.sockets.clone()),
            (Some(t), true) => {
                for (field, v) in [
                    ("topology.sockets", t.sockets),
                    ("topology.cores_per_socket", t.cores_per_socket),
                    ("topology.threads_per_core", t.threads_per_core),
                    ("topology.numa_nodes_per_socket", t.numa_nodes_per_socket),
                ] {
                    if v == 0 {
                        return Err(inv_err(h, field, "must be at least 1"));
                    }
                }
                let total =
                    t.sockets as u64 * t.cores_per_socket as u64 * t.threads_per_core as u64;
                if total > MAX_HOST_THREADS as u64 {
                    return Err(inv_err(
                        h,
                        "topology",
                        format!(
                            "{total} hardware threads; at most {MAX_HOST_THREADS} are supported"
                        ),
                    ));
                }
                if t.cores_per_socket % t.numa_nodes_per_socket != 0 {
                    return Err(inv_err(
                        h,
                        "topology.numa_nodes_per_socket",
                        format!(
                            "{} does not divide cores_per_socket {}",
                            t.numa_nodes_per_socket, t.cores_per_socket
                        ),
                    ));
                }
                let per_node = t.cores_per_socket / t.numa_nodes_per_socket;
                let all_cores = t.sockets * t.cores_per_socket;
                Ok((0..t.sockets)
                    .map(|s| SocketSpec {
                        id: s,
                        numa_nodes: (0..t.numa_nodes_per_socket)
                            .map(|n| NumaNodeSpec {
                                id: s * t.numa_nodes_per_socket + n,
                                memory: t.memory_per_node,
                                cores: (0..per_node)
                                    .map(|c| {
                                        let core = s * t.cores_per_socket + n * per_node + c;
                                        CpuList::from_cpus(
                                            (0..t.threads_per_core).map(|th| th * all_cores + core),
                                        )
                                    })
                                    .collect(),
                            })
                            .collect(),
                    })
                    .collect())
            }
        }
    }

    /// Validates the spec and builds the index-based layout.
    pub(crate) fn build(&self) -> Result<Topology, SchedError> {
        let h = self.name.as_str();
        if h.trim().is_empty() {
            return Err(inv_err("", "name", "must not be empty"));
        }
        let sockets = self.expanded_sockets()?;
        let mut seen_sockets = BTreeSet::new();
        let mut seen_nodes = BTreeSet::new();
        let mut seen_cpus = BTreeSet::new();
        let mut threads = Vec::new();
        let mut cores = Vec::new();
        let mut nodes = Vec::new();
        for (si, s) in sockets.iter().enumerate() {
            if !seen_sockets.insert(s.id) {
                return Err(inv_err(
                    h,
                    format!("sockets[{si}].id"),
                    format!("socket id {} appears twice", s.id),
                ));
            }
            if s.numa_nodes.is_empty() {
                return Err(inv_err(
                    h,
                    format!("sockets[{si}].numa_nodes"),
                    "must list at least one NUMA node",
                ));
            }
            for (ni, n) in s.numa_nodes.iter().enumerate() {
                let nf = format!("sockets[{si}].numa_nodes[{ni}]");
                if !seen_nodes.insert(n.id) {
                    return Err(inv_err(
                        h,
                        format!("{nf}.id"),
                        format!("NUMA node id {} appears twice", n.id),
                    ));
                }
                if n.cores.is_empty() {
                    return Err(inv_err(
                        h,
                        format!("{nf}.cores"),
                        "must list at least one core",
                    ));
                }
                let node_idx = nodes.len() as u32;
                let core_start = cores.len() as u32;
                for (ci, c) in n.cores.iter().enumerate() {
                    if c.is_empty() {
                        return Err(inv_err(
                            h,
                            format!("{nf}.cores[{ci}]"),
                            "a core needs at least one hardware thread (e.g. \"0,32\")",
                        ));
                    }
                    if c.len() > 64 {
                        return Err(inv_err(
                            h,
                            format!("{nf}.cores[{ci}]"),
                            "more than 64 threads in one core",
                        ));
                    }
                    let core_idx = cores.len() as u32;
                    cores.push(Core {
                        id: ci as u32,
                        first: threads.len() as u32,
                        nthreads: c.len() as u32,
                        node: node_idx,
                        whole: false,
                    });
                    for &cpu in c.cpus() {
                        if !seen_cpus.insert(cpu) {
                            return Err(inv_err(
                                h,
                                format!("{nf}.cores[{ci}]"),
                                format!("cpu {cpu} is listed twice on this host"),
                            ));
                        }
                        threads.push(Thread {
                            cpu,
                            core: core_idx,
                            class: Class::Unassigned,
                        });
                        if threads.len() > MAX_HOST_THREADS {
                            return Err(inv_err(
                                h,
                                "sockets",
                                format!("more than {MAX_HOST_THREADS} hardware threads"),
                            ));
                        }
                    }
                }
                nodes.push(Node {
                    id: n.id,
                    socket: s.id,
                    cores: core_start..cores.len() as u32,
                    memory: n.memory,
                    dedicated_threads: 0,
                    whole_cores: 0,
                });
            }
        }
        let max_cpu = seen_cpus.iter().next_back().copied().unwrap_or(0);
        let mut cpu_index = vec![u32::MAX; max_cpu as usize + 1];
        for (i, t) in threads.iter().enumerate() {
            cpu_index[t.cpu as usize] = i as u32;
        }
        let check_exists = |field: &str, list: &CpuList| -> Result<(), SchedError> {
            if let Some(bad) = list.cpus().iter().find(|c| !seen_cpus.contains(c)) {
                return Err(inv_err(
                    h,
                    field,
                    format!(
                        "cpu {bad} does not exist on this host (cpus: {})",
                        CpuList::from_cpus(seen_cpus.iter().copied())
                    ),
                ));
            }
            Ok(())
        };
        check_exists("shared", &self.shared)?;
        check_exists("reserved", &self.reserved)?;
        if let Some(both) = self
            .shared
            .cpus()
            .iter()
            .find(|c| self.reserved.contains(**c))
        {
            return Err(inv_err(
                h,
                "reserved",
                format!("cpu {both} is also in `shared`; a cpu belongs to one set"),
            ));
        }
        if let Some(d) = &self.dedicated {
            check_exists("dedicated", d)?;
            if let Some(both) = d
                .cpus()
                .iter()
                .find(|c| self.reserved.contains(**c) || self.shared.contains(**c))
            {
                return Err(inv_err(
                    h,
                    "dedicated",
                    format!(
                        "cpu {both} is also in `shared` or `reserved`; a cpu belongs to one set"
                    ),
                ));
            }
        }
        for t in &mut threads {
            t.class = if self.shared.contains(t.cpu) {
                Class::Shared
            } else if self.reserved.contains(t.cpu) {
                Class::Reserved
            } else {
                match &self.dedicated {
                    Some(d) if !d.contains(t.cpu) => Class::Unassigned,
                    _ => Class::Dedicated,
                }
            };
        }
        for c in &mut cores {
            let ts = &threads[c.first as usize..(c.first + c.nthreads) as usize];
            let ded = ts.iter().filter(|t| t.class == Class::Dedicated).count() as u32;
            c.whole = ded == c.nthreads;
            let node = &mut nodes[c.node as usize];
            node.dedicated_threads += ded;
            node.whole_cores += c.whole as u32;
        }
        let mut nics = BTreeMap::new();
        for (i, nic) in self.nics.iter().enumerate() {
            if nic.name.trim().is_empty() {
                return Err(inv_err(h, format!("nics[{i}].name"), "must not be empty"));
            }
            let Some(node) = nodes.iter().position(|n| n.id == nic.numa_node) else {
                return Err(inv_err(
                    h,
                    format!("nics[{i}].numa_node"),
                    format!(
                        "NUMA node {} does not exist (nodes: {:?})",
                        nic.numa_node, seen_nodes
                    ),
                ));
            };
            if nics.insert(nic.name.clone(), node as u32).is_some() {
                return Err(inv_err(
                    h,
                    format!("nics[{i}].name"),
                    format!("nic `{}` appears twice", nic.name),
                ));
            }
        }
        let max_threads_per_core = cores.iter().map(|c| c.nthreads).max().unwrap_or(1);
        Ok(Topology {
            threads,
            cores,
            nodes,
            cpu_index,
            nics,
            shared: self.shared.clone(),
            max_threads_per_core,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topology_shorthand_uses_linux_numbering() {
        let h = HostSpec::synthetic("h", 2, 4, 2);
        let t = h.build().unwrap();
        assert_eq!(t.threads.len(), 16);
        assert_eq!(t.nodes.len(), 2);
        // core 1 of socket 0 has threads 1 and 9.
        let c = &t.cores[1];
        let cpus: Vec<u32> = (c.first..c.first + c.nthreads)
            .map(|i| t.threads[i as usize].cpu)
            .collect();
        assert_eq!(cpus, vec![1, 9]);
        // core 0 of each socket is shared: 0,8 and 4,12.
        assert_eq!(h.shared.to_string(), "0,4,8,12");
        assert_eq!(t.nodes[0].whole_cores, 3);
        assert_eq!(t.nodes[0].dedicated_threads, 6);
        assert_eq!(t.nics["nic1"], 1);
    }

    #[test]
    fn rejects_bad_inventories_with_field() {
        let mut h = HostSpec::synthetic("h", 1, 4, 2);
        h.reserved = CpuList::from_cpus([0]);
        let e = h.build().unwrap_err().to_string();
        assert!(e.contains("reserved") && e.contains("cpu 0"), "{e}");

        let mut h = HostSpec::synthetic("h", 1, 4, 2);
        h.shared = CpuList::from_cpus([99]);
        let e = h.build().unwrap_err().to_string();
        assert!(
            e.contains("shared") && e.contains("cpu 99 does not exist"),
            "{e}"
        );

        let mut h = HostSpec::synthetic("h", 1, 4, 2);
        h.sockets = h.expanded_sockets().unwrap();
        let e = h.build().unwrap_err().to_string();
        assert!(e.contains("not both"), "{e}");

        let mut h = HostSpec::synthetic("h", 1, 4, 2);
        h.topology = None;
        h.sockets = vec![SocketSpec {
            id: 0,
            numa_nodes: vec![NumaNodeSpec {
                id: 0,
                memory: None,
                cores: vec![CpuList::from_cpus([1, 2]), CpuList::from_cpus([2])],
            }],
        }];
        h.shared = CpuList::new();
        h.nics.clear();
        let e = h.build().unwrap_err().to_string();
        assert!(e.contains("cores[1]") && e.contains("listed twice"), "{e}");

        let mut h = HostSpec::synthetic("h", 1, 4, 2);
        h.nics[0].numa_node = 7;
        let e = h.build().unwrap_err().to_string();
        assert!(e.contains("nics[0].numa_node"), "{e}");

        let mut h = HostSpec::synthetic("h", 1, 4, 2);
        h.topology.as_mut().unwrap().numa_nodes_per_socket = 3;
        let e = h.build().unwrap_err().to_string();
        assert!(e.contains("does not divide"), "{e}");

        let h = HostSpec {
            name: " ".into(),
            ..HostSpec::synthetic("x", 1, 1, 1)
        };
        assert!(h.build().unwrap_err().to_string().contains("name"));

        let mut h = HostSpec::synthetic("h", 1, 4, 2);
        h.dedicated = Some(CpuList::from_cpus([0, 1]));
        let e = h.build().unwrap_err().to_string();
        assert!(e.contains("dedicated"), "{e}");
    }

    #[test]
    fn every_layout_error_names_its_field() {
        fn explicit(nodes: Vec<(u32, Vec<&str>)>, sockets: Vec<u32>) -> HostSpec {
            HostSpec {
                name: "x".into(),
                sockets: sockets
                    .iter()
                    .map(|&id| SocketSpec {
                        id,
                        numa_nodes: nodes
                            .iter()
                            .map(|(nid, cores)| NumaNodeSpec {
                                id: *nid + id * 10,
                                memory: None,
                                cores: cores.iter().map(|c| c.parse().unwrap()).collect(),
                            })
                            .collect(),
                    })
                    .collect(),
                ..HostSpec::default()
            }
        }
        let field = |h: HostSpec| match h.build().unwrap_err() {
            SchedError::InvalidInventory { field, .. } => field,
            e => panic!("unexpected {e}"),
        };
        assert_eq!(
            field(explicit(vec![(0, vec!["0"])], vec![0, 0])),
            "sockets[1].id"
        );
        assert_eq!(field(explicit(vec![], vec![0])), "sockets[0].numa_nodes");
        assert_eq!(
            field(explicit(vec![(0, vec!["0"]), (0, vec!["1"])], vec![0])),
            "sockets[0].numa_nodes[1].id"
        );
        assert_eq!(
            field(explicit(vec![(0, vec![])], vec![0])),
            "sockets[0].numa_nodes[0].cores"
        );
        assert_eq!(
            field(explicit(vec![(0, vec![""])], vec![0])),
            "sockets[0].numa_nodes[0].cores[0]"
        );
        assert_eq!(
            field(HostSpec {
                name: "x".into(),
                ..HostSpec::default()
            }),
            "sockets"
        );
        let mut h = explicit(vec![(0, vec!["0", "1"])], vec![0]);
        h.nics = vec![
            NicSpec {
                name: "e".into(),
                numa_node: 0,
            },
            NicSpec {
                name: "e".into(),
                numa_node: 0,
            },
        ];
        assert_eq!(field(h.clone()), "nics[1].name");
        h.nics = vec![NicSpec {
            name: " ".into(),
            numa_node: 0,
        }];
        assert_eq!(field(h), "nics[0].name");
        for (f, set) in [
            ("topology.sockets", (0, 1, 1, 1)),
            ("topology.cores_per_socket", (1, 0, 1, 1)),
            ("topology.threads_per_core", (1, 1, 0, 1)),
            ("topology.numa_nodes_per_socket", (1, 1, 1, 0)),
            ("topology", (64, 64, 4, 1)),
        ] {
            let mut h = HostSpec::synthetic("x", 1, 1, 1);
            h.shared = CpuList::new();
            h.nics.clear();
            let t = h.topology.as_mut().unwrap();
            (
                t.sockets,
                t.cores_per_socket,
                t.threads_per_core,
                t.numa_nodes_per_socket,
            ) = set;
            assert_eq!(field(h), f);
        }
    }

    #[test]
    fn explicit_dedicated_leaves_rest_unassigned() {
        let mut h = HostSpec::synthetic("h", 1, 4, 2);
        h.dedicated = Some(CpuList::from_cpus([1, 5, 2]));
        let t = h.build().unwrap();
        assert_eq!(t.nodes[0].dedicated_threads, 3);
        assert_eq!(t.nodes[0].whole_cores, 1); // core 1 = cpus 1,5
        let i = t.thread_of_cpu(3).unwrap();
        assert_eq!(t.threads[i as usize].class, Class::Unassigned);
    }
}
