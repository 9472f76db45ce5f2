//! The placement engine: cluster state (which thread belongs to whom), host selection through
//! ordered capacity indexes, the n+1 healing reserve, host failure, changes and restore.
//!
//! Owns every state transition of the allocator. Must not do I/O, read clocks or use
//! randomness: the same sequence of calls always gives the same placements.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::cpulist::CpuList;
use crate::error::{HostReason, HostReasons, SchedError};
use crate::inventory::{Class, HostSpec, Topology};
use crate::pick::{Picked, pick_dedicated, pick_one, pick_whole_core};
use crate::request::{
    Allocation, CpuPolicy, EmulatorPolicy, Placement, Redundancy, Role, RolePlacement, Runtime,
    ThreadPolicy, VnfRequest,
};

/// The cluster-wide healing reserve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum ReservePolicy {
    /// No reserve: placements may use every free cpu.
    #[serde(rename = "none")]
    None,
    /// Keep enough free dedicated cpus that the redundant roles of any one host can be re-placed.
    #[default]
    #[serde(rename = "n+1")]
    NPlusOne,
}

/// How candidate hosts are searched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Search {
    /// Best fit through the ordered free-capacity indexes (the real engine).
    #[default]
    Indexed,
    /// Naive first fit: scan every host and node in order (the benchmark baseline).
    FirstFit,
}

/// Scheduler settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchedConfig {
    /// Healing reserve (`n+1` by default).
    #[serde(default)]
    pub reserve: ReservePolicy,
    /// How many shared vCPUs one group core takes (default 8).
    #[serde(default = "default_capacity")]
    pub shared_core_capacity: u32,
    /// Host search strategy (default `indexed`).
    #[serde(default)]
    pub search: Search,
}

fn default_capacity() -> u32 {
    8
}

impl Default for SchedConfig {
    fn default() -> Self {
        SchedConfig {
            reserve: ReservePolicy::NPlusOne,
            shared_core_capacity: default_capacity(),
            search: Search::Indexed,
        }
    }
}

/// Who holds a hardware thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Holder {
    Free,
    /// Not in the dedicated set (shared, reserved, unassigned).
    Off,
    Vnf(u32),
    Group(u32),
}

#[derive(Debug, Clone)]
pub(crate) struct GroupCore {
    pub group: u32,
    pub used: u32,
}

#[derive(Debug, Clone)]
pub(crate) struct HostState {
    pub spec: HostSpec,
    pub topo: Topology,
    pub holder: Vec<Holder>,
    pub node_free: Vec<u32>,
    pub node_free_cores: Vec<u32>,
    pub node_mem: Vec<Option<u64>>,
    pub free: u32,
    pub need: u64,
    pub roles: BTreeMap<(u32, Role), u32>,
    pub group_cores: BTreeMap<u32, GroupCore>,
    /// The (free threads, whole free cores) per node and the reserve value as they are keyed
    /// in the indexes right now.
    pub keyed: Vec<(u32, u32)>,
    pub keyed_reserve: u64,
    /// Whether new roles may be placed here (false: cordoned; what it holds stays).
    pub schedulable: bool,
    /// The runtimes its agent offers (`None`: every runtime, a host known only from an
    /// inventory).
    pub runtimes: Option<Vec<Runtime>>,
}

impl HostState {
    /// Whether thread `t` may go to VNF `vid`: free, or already its own (changes reuse them).
    fn avail_for(&self, t: u32, vid: u32) -> bool {
        matches!(self.holder[t as usize], Holder::Free)
            || self.holder[t as usize] == Holder::Vnf(vid)
    }

    fn zone(&self) -> Option<&str> {
        self.spec.labels.get("zone").map(String::as_str)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RoleState {
    pub role: Role,
    pub host: u32,
    pub vcpus: Vec<u32>,
    pub group_core: Option<u32>,
    pub emulator: Option<u32>,
    pub held: Vec<u32>,
    pub nodes: Vec<u32>,
    pub need: u64,
}

impl RoleState {
    fn exclusive(&self) -> impl Iterator<Item = u32> + '_ {
        self.vcpus
            .iter()
            .copied()
            .filter(|_| self.group_core.is_none())
            .chain(self.emulator)
            .chain(self.held.iter().copied())
    }
}

#[derive(Debug, Clone)]
pub(crate) struct VnfState {
    pub req: VnfRequest,
    pub group: Option<u32>,
    pub roles: [Option<RoleState>; 2],
    pub pending: [Option<RoleState>; 2],
    pub pending_req: Option<VnfRequest>,
}

#[derive(Debug, Clone)]
pub(crate) struct GroupState {
    pub authority: String,
    pub name: String,
    /// (free slots, host, core).
    pub index: BTreeSet<(u32, u32, u32)>,
}

/// Hosts a role must avoid or stick to.
#[derive(Debug, Clone, Default)]
struct Avoid {
    hosts: Vec<u32>,
    /// Hosts the caller found unfit for reasons of its own ([`Scheduler::add_standby`]).
    unfit: Vec<u32>,
    zones: Vec<String>,
    need_zone: bool,
    only: Option<u32>,
}

/// A modification of an existing VNF (see [`Scheduler::begin_change`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Change {
    /// New vCPU count for every role (dedicated, shared).
    Resize {
        /// New count.
        count: u32,
    },
    /// New exact cpus for every role (pinned).
    Repin {
        /// New logical cpu numbers, one per vCPU.
        cores: Vec<u32>,
    },
    /// Move one role to another host (`to`, or the best other host).
    Move {
        /// Which role.
        role: Role,
        /// Target host; `None` = any other host.
        to: Option<String>,
    },
}

/// What happened to one role that was on a failed host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replacement {
    /// VNF name.
    pub vnf: String,
    /// The role that ran on the failed host.
    pub lost: Role,
    /// The SBY was promoted to ACT (the controller switches traffic); the new placement is SBY.
    pub promoted: bool,
    /// The new placement, or why none was found (the VNF then keeps only its surviving role,
    /// or is forgotten if it had none).
    pub result: Result<RolePlacement, SchedError>,
}

/// What [`Scheduler::relocate`] did to a VNF that held a role on a failed host.
#[derive(Debug, Clone, PartialEq)]
pub struct Relocation {
    /// The role that ran on the failed host.
    pub lost: Role,
    /// The SBY was promoted to ACT (the controller switches traffic); `replaced` is then the
    /// new SBY.
    pub promoted: bool,
    /// The new placement of the lost role (the SBY after a promotion); `None`: no host could
    /// take the standby, the VNF runs without one.
    pub replaced: Option<RolePlacement>,
}

/// Capacity totals, for status output and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Hosts.
    pub hosts: u32,
    /// VNFs placed.
    pub vnfs: u32,
    /// Dedicated cpus in the cluster.
    pub dedicated_cpus: u64,
    /// Free dedicated cpus.
    pub free_cpus: u64,
    /// Hosts holding at least one role.
    pub hosts_used: u32,
}

/// The CPU-core allocator and placement engine for a cluster of hosts.
#[derive(Debug, Clone, Default)]
pub struct Scheduler {
    pub(crate) config: SchedConfig,
    pub(crate) hosts: Vec<Option<HostState>>,
    pub(crate) host_by_name: BTreeMap<String, u32>,
    by_threads: BTreeSet<u64>,
    by_cores: BTreeSet<u64>,
    reserve_keys: BTreeSet<u64>,
    /// cpu number → hosts (by index, i.e. in the order they were added) where it is free.
    free_by_cpu: Vec<BTreeSet<u32>>,
    total_free: u64,
    pub(crate) vnfs: Vec<Option<VnfState>>,
    vnf_by_name: BTreeMap<String, u32>,
    free_slots: Vec<u32>,
    pub(crate) groups: Vec<GroupState>,
    group_by_key: BTreeMap<(String, String), u32>,
    /// The most threads a core has on any host added (never lowered when one goes: a bound
    /// on the whole cores a `thread_policy: require` VNF needs, [`Scheduler::demand`]).
    most_threads_per_core: u32,
}

const NODE_BITS: u64 = 8;
const HOST_BITS: u64 = 32;

fn node_key(free: u32, host: u32, node: u32) -> u64 {
    ((free as u64) << (HOST_BITS + NODE_BITS)) | ((host as u64) << NODE_BITS) | node as u64
}

fn decode_node_key(k: u64) -> (u32, u32) {
    (
        ((k >> NODE_BITS) & ((1 << HOST_BITS) - 1)) as u32,
        (k & ((1 << NODE_BITS) - 1)) as u32,
    )
}

fn reserve_key(value: u64, host: u32) -> u64 {
    (value << HOST_BITS) | host as u64
}

/// Most NUMA nodes one host may have.
pub const MAX_NODES_PER_HOST: usize = 256;

/// What a role on a host shares with another role of the same VNF there, the old and the new
/// of a change: the threads both hold, and the NUMA nodes whose memory one of them accounts
/// for (a change on its host keeps the VM's memory where it is, so the memory of a node both
/// use is counted once).
#[derive(Debug, Default)]
struct Kept {
    threads: Vec<u32>,
    mem_nodes: Vec<u32>,
}

/// What `other` holds on `host` (nothing when it is elsewhere).
fn keep_of(other: Option<&RoleState>, host: u32) -> Kept {
    other
        .filter(|o| o.host == host)
        .map(|o| Kept {
            threads: o.exclusive().collect(),
            mem_nodes: o.nodes.clone(),
        })
        .unwrap_or_default()
}

fn restore_err(vnf: &str, reason: impl Into<String>) -> SchedError {
    SchedError::InvalidRestore {
        vnf: vnf.to_string(),
        reason: reason.into(),
    }
}

impl Scheduler {
    /// An empty cluster.
    pub fn new(config: SchedConfig) -> Result<Scheduler, SchedError> {
        if config.shared_core_capacity == 0 || config.shared_core_capacity > 1024 {
            return Err(SchedError::InvalidRequest {
                vnf: String::new(),
                field: "shared_core_capacity".into(),
                reason: format!(
                    "{} is out of range; must be 1..=1024",
                    config.shared_core_capacity
                ),
            });
        }
        Ok(Scheduler {
            config,
            ..Scheduler::default()
        })
    }

    /// The settings.
    pub fn config(&self) -> &SchedConfig {
        &self.config
    }

    // ----- hosts -------------------------------------------------------------------------

    /// Adds a host (validated; nothing changes on error).
    pub fn add_host(&mut self, spec: HostSpec) -> Result<(), SchedError> {
        let topo = spec.build()?;
        if topo.nodes.len() > MAX_NODES_PER_HOST {
            return Err(SchedError::InvalidInventory {
                host: spec.name.clone(),
                field: "sockets".into(),
                reason: format!(
                    "{} NUMA nodes; at most {MAX_NODES_PER_HOST}",
                    topo.nodes.len()
                ),
            });
        }
        if self.host_by_name.contains_key(&spec.name) {
            return Err(SchedError::DuplicateHost(spec.name));
        }
        let holder = topo
            .threads
            .iter()
            .map(|t| {
                if t.class == Class::Dedicated {
                    Holder::Free
                } else {
                    Holder::Off
                }
            })
            .collect();
        let node_free = topo.nodes.iter().map(|n| n.dedicated_threads).collect();
        let node_free_cores = topo.nodes.iter().map(|n| n.whole_cores).collect();
        let node_mem = topo.nodes.iter().map(|n| n.memory).collect();
        let free = topo.nodes.iter().map(|n| n.dedicated_threads).sum();
        let idx = self.hosts.len() as u32;
        self.host_by_name.insert(spec.name.clone(), idx);
        self.most_threads_per_core = self.most_threads_per_core.max(topo.max_threads_per_core);
        self.hosts.push(Some(HostState {
            spec,
            topo,
            holder,
            node_free,
            node_free_cores,
            node_mem,
            free,
            need: 0,
            roles: BTreeMap::new(),
            group_cores: BTreeMap::new(),
            keyed: Vec::new(),
            keyed_reserve: 0,
            schedulable: true,
            runtimes: None,
        }));
        self.total_free += free as u64;
        self.index(idx);
        self.set_free_by_cpu(idx, true);
        Ok(())
    }

    /// Adds every host of an inventory, in order (stops at the first invalid one; the hosts
    /// before it stay added).
    pub fn add_inventory(&mut self, inv: &crate::inventory::Inventory) -> Result<(), SchedError> {
        for h in &inv.hosts {
            self.add_host(h.clone())?;
        }
        Ok(())
    }

    /// Removes an empty host.
    pub fn remove_host(&mut self, name: &str) -> Result<(), SchedError> {
        let h = self.host_idx(name)?;
        let host = self.host(h);
        if !host.roles.is_empty() {
            let vnfs: Vec<String> = host
                .roles
                .keys()
                .map(|(v, r)| format!("{}/{r}", self.vnf(*v).req.name))
                .collect();
            return Err(SchedError::HostInUse {
                host: name.to_string(),
                vnfs: vnfs.join(", "),
            });
        }
        self.drop_host(h);
        Ok(())
    }

    /// Replaces a host's description. Every allocation on it must still be valid on the new
    /// description (same cpus exist, still dedicated); otherwise nothing changes.
    pub fn update_host(&mut self, spec: HostSpec) -> Result<(), SchedError> {
        let h = self.host_idx(&spec.name)?;
        let backup = self.clone();
        let result = self.update_host_inner(h, spec);
        if result.is_err() {
            *self = backup;
        }
        result
    }

    fn update_host_inner(&mut self, h: u32, spec: HostSpec) -> Result<(), SchedError> {
        let roles: Vec<(u32, Role)> = self.host(h).roles.keys().copied().collect();
        let mut saved = Vec::new();
        for &(vid, role) in &roles {
            if self.vnf(vid).pending.iter().any(Option::is_some) {
                return Err(SchedError::ChangePending {
                    vnf: self.vnf(vid).req.name.clone(),
                    role,
                });
            }
            let rs = self.vnf(vid).roles[role.index()]
                .clone()
                .expect("host.roles lists held roles");
            saved.push((vid, self.render_role(vid, &rs)));
            self.unapply(vid, &rs, &Kept::default());
            self.vnf_mut(vid).roles[role.index()] = None;
        }
        let name = spec.name.clone();
        let (schedulable, runtimes) = (self.host(h).schedulable, self.host(h).runtimes.clone());
        self.drop_host(h);
        self.add_host(spec)?;
        let nh = self.host_by_name[&name];
        self.host_mut(nh).schedulable = schedulable;
        self.host_mut(nh).runtimes = runtimes;
        for (vid, rp) in saved {
            let req = self.vnf(vid).req.clone();
            let rs = self.role_from_placement(vid, &req, &rp)?;
            self.apply(vid, &rs);
            self.vnf_mut(vid).roles[rp.role.index()] = Some(rs);
        }
        debug_assert!(nh < self.hosts.len() as u32);
        Ok(())
    }

    /// Adds (or removes) a host's free cpus to (from) the per-cpu index.
    fn set_free_by_cpu(&mut self, h: u32, present: bool) {
        let host = self.hosts[h as usize].as_ref().expect("a live host");
        for (t, th) in host.topo.threads.iter().enumerate() {
            if host.holder[t] != Holder::Free {
                continue;
            }
            let cpu = th.cpu as usize;
            if self.free_by_cpu.len() <= cpu {
                self.free_by_cpu.resize_with(cpu + 1, BTreeSet::new);
            }
            if present {
                self.free_by_cpu[cpu].insert(h);
            } else {
                self.free_by_cpu[cpu].remove(&h);
            }
        }
    }

    fn drop_host(&mut self, h: u32) {
        self.set_free_by_cpu(h, false);
        self.unindex(h);
        let host = self.hosts[h as usize]
            .take()
            .expect("drop_host on a live host");
        self.total_free -= host.free as u64;
        self.host_by_name.remove(&host.spec.name);
    }

    /// Host names, in the order they were added.
    pub fn host_names(&self) -> Vec<String> {
        self.hosts
            .iter()
            .flatten()
            .map(|h| h.spec.name.clone())
            .collect()
    }

    /// Lets new roles be placed on a host (`true`) or not (`false`, cordoned). Roles it holds
    /// stay; moves and heals never target an unschedulable host either.
    pub fn set_schedulable(&mut self, name: &str, schedulable: bool) -> Result<(), SchedError> {
        let h = self.host_idx(name)?;
        self.host_mut(h).schedulable = schedulable;
        Ok(())
    }

    /// The runtimes a host's agent offers (`None`: every runtime): new roles of a VNF whose
    /// runtime is not among them are not placed there. Roles it holds stay.
    pub fn set_runtimes(
        &mut self,
        name: &str,
        runtimes: Option<Vec<Runtime>>,
    ) -> Result<(), SchedError> {
        let h = self.host_idx(name)?;
        self.host_mut(h).runtimes = runtimes;
        Ok(())
    }

    /// Whether new roles may be placed on a host (see [`Scheduler::set_schedulable`]).
    pub fn is_schedulable(&self, name: &str) -> Result<bool, SchedError> {
        Ok(self.host(self.host_idx(name)?).schedulable)
    }

    /// Number of VNF roles (and changes in progress) on a host.
    pub fn host_roles(&self, name: &str) -> Result<usize, SchedError> {
        Ok(self.host(self.host_idx(name)?).roles.len())
    }

    /// The description a host was added with.
    pub fn host_spec(&self, name: &str) -> Result<&HostSpec, SchedError> {
        Ok(&self.host(self.host_idx(name)?).spec)
    }

    pub(crate) fn host_idx(&self, name: &str) -> Result<u32, SchedError> {
        self.host_by_name
            .get(name)
            .copied()
            .ok_or_else(|| SchedError::UnknownHost(name.to_string()))
    }

    pub(crate) fn host(&self, h: u32) -> &HostState {
        self.hosts[h as usize]
            .as_ref()
            .expect("host index refers to a live host")
    }

    fn host_mut(&mut self, h: u32) -> &mut HostState {
        self.hosts[h as usize]
            .as_mut()
            .expect("host index refers to a live host")
    }

    pub(crate) fn vnf(&self, v: u32) -> &VnfState {
        self.vnfs[v as usize]
            .as_ref()
            .expect("vnf index refers to a live vnf")
    }

    /// VNF `name`'s index and state, refused while a change of it is pending.
    fn settled(&self, name: &str) -> Result<(u32, VnfState), SchedError> {
        let vid = self.vnf_idx(name)?;
        let v = self.vnf(vid).clone();
        if let Some(r) = v.pending.iter().flatten().next() {
            return Err(SchedError::ChangePending {
                vnf: name.to_string(),
                role: r.role,
            });
        }
        Ok((vid, v))
    }

    fn vnf_mut(&mut self, v: u32) -> &mut VnfState {
        self.vnfs[v as usize]
            .as_mut()
            .expect("vnf index refers to a live vnf")
    }

    fn vnf_idx(&self, name: &str) -> Result<u32, SchedError> {
        self.vnf_by_name
            .get(name)
            .copied()
            .ok_or_else(|| SchedError::UnknownVnf(name.to_string()))
    }

    // ----- index maintenance -------------------------------------------------------------

    /// Recomputes every counter and index from the per-thread holders and compares them with
    /// the maintained ones. O(cluster); for tests and for checking a restored state.
    pub fn self_check(&self) -> Result<(), String> {
        let (mut bt, mut bc, mut rk, mut total) =
            (BTreeSet::new(), BTreeSet::new(), BTreeSet::new(), 0u64);
        let mut group_entries = 0usize;
        for (h, host) in self.hosts.iter().enumerate() {
            let Some(host) = host else { continue };
            let h = h as u32;
            let mut free = 0;
            for (n, node) in host.topo.nodes.iter().enumerate() {
                let threads = node
                    .cores
                    .clone()
                    .flat_map(|c| {
                        let c = &host.topo.cores[c as usize];
                        c.first..c.first + c.nthreads
                    })
                    .filter(|&t| host.holder[t as usize] == Holder::Free)
                    .count() as u32;
                let cores = node
                    .cores
                    .clone()
                    .filter(|&c| Self::core_all_free(host, c))
                    .count() as u32;
                if (threads, cores) != (host.node_free[n], host.node_free_cores[n]) {
                    return Err(format!(
                        "{} node {}: counted ({threads}, {cores}) free, kept ({}, {})",
                        host.spec.name, node.id, host.node_free[n], host.node_free_cores[n]
                    ));
                }
                bt.insert(node_key(threads, h, n as u32));
                bc.insert(node_key(cores, h, n as u32));
                free += threads;
            }
            if free != host.free {
                return Err(format!(
                    "{}: counted {free} free, kept {}",
                    host.spec.name, host.free
                ));
            }
            total += free as u64;
            rk.insert(reserve_key(host.need + free as u64, h));
            for (&core, gc) in &host.group_cores {
                group_entries += 1;
                let slots = self.config.shared_core_capacity - gc.used;
                if !self.groups[gc.group as usize]
                    .index
                    .contains(&(slots, h, core))
                {
                    return Err(format!(
                        "{}: group core {core} missing from its group index",
                        host.spec.name
                    ));
                }
            }
        }
        for (cpu, hosts) in self.free_by_cpu.iter().enumerate() {
            for &h in hosts {
                let free = self
                    .hosts
                    .get(h as usize)
                    .and_then(Option::as_ref)
                    .is_some_and(|host| {
                        host.topo
                            .thread_of_cpu(cpu as u32)
                            .is_some_and(|t| host.holder[t as usize] == Holder::Free)
                    });
                if !free {
                    return Err(format!("cpu {cpu} is indexed free on host #{h} but is not"));
                }
            }
        }
        let free_entries: usize = self.free_by_cpu.iter().map(BTreeSet::len).sum();
        if free_entries as u64 != self.total_free {
            return Err(format!(
                "{free_entries} free cpus indexed, {} free",
                self.total_free
            ));
        }
        let indexed: usize = self.groups.iter().map(|g| g.index.len()).sum();
        if indexed != group_entries {
            return Err(format!(
                "group indexes hold {indexed} cores, hosts {group_entries}"
            ));
        }
        if bt != self.by_threads
            || bc != self.by_cores
            || rk != self.reserve_keys
            || total != self.total_free
        {
            return Err("capacity indexes differ from the recomputed ones".into());
        }
        Ok(())
    }

    /// Removes a host's entries (as they were last indexed).
    fn unindex(&mut self, h: u32) {
        let host = self.hosts[h as usize]
            .as_ref()
            .expect("unindex a live host");
        for (n, &(threads, cores)) in host.keyed.iter().enumerate() {
            self.by_threads.remove(&node_key(threads, h, n as u32));
            self.by_cores.remove(&node_key(cores, h, n as u32));
        }
        self.reserve_keys
            .remove(&reserve_key(host.keyed_reserve, h));
    }

    /// Inserts a new host's entries.
    fn index(&mut self, h: u32) {
        let host = self.hosts[h as usize].as_mut().expect("index a live host");
        host.keyed = host
            .node_free
            .iter()
            .copied()
            .zip(host.node_free_cores.iter().copied())
            .collect();
        host.keyed_reserve = host.need + host.free as u64;
        for (n, &(threads, cores)) in host.keyed.iter().enumerate() {
            self.by_threads.insert(node_key(threads, h, n as u32));
            self.by_cores.insert(node_key(cores, h, n as u32));
        }
        self.reserve_keys.insert(reserve_key(host.keyed_reserve, h));
    }

    /// Re-keys only the entries of a host whose counts changed since they were indexed.
    fn reindex(&mut self, h: u32) {
        let host = self.hosts[h as usize]
            .as_mut()
            .expect("reindex a live host");
        for n in 0..host.keyed.len() {
            let now = (host.node_free[n], host.node_free_cores[n]);
            let was = host.keyed[n];
            if now.0 != was.0 {
                self.by_threads.remove(&node_key(was.0, h, n as u32));
                self.by_threads.insert(node_key(now.0, h, n as u32));
            }
            if now.1 != was.1 {
                self.by_cores.remove(&node_key(was.1, h, n as u32));
                self.by_cores.insert(node_key(now.1, h, n as u32));
            }
            host.keyed[n] = now;
        }
        let value = host.need + host.free as u64;
        if value != host.keyed_reserve {
            self.reserve_keys
                .remove(&reserve_key(host.keyed_reserve, h));
            self.reserve_keys.insert(reserve_key(value, h));
            host.keyed_reserve = value;
        }
    }

    fn core_all_free(host: &HostState, core: u32) -> bool {
        let c = &host.topo.cores[core as usize];
        c.whole && (c.first..c.first + c.nthreads).all(|t| host.holder[t as usize] == Holder::Free)
    }

    /// Takes a free thread (index must be refreshed by the caller).
    fn take(&mut self, h: u32, t: u32, who: Holder) {
        let host = self.hosts[h as usize]
            .as_mut()
            .expect("take on a live host");
        debug_assert_eq!(
            host.holder[t as usize],
            Holder::Free,
            "take only free threads"
        );
        let core = host.topo.threads[t as usize].core;
        let node = host.topo.cores[core as usize].node as usize;
        if Self::core_all_free(host, core) {
            host.node_free_cores[node] -= 1;
        }
        host.holder[t as usize] = who;
        host.node_free[node] -= 1;
        host.free -= 1;
        self.total_free -= 1;
        let cpu = host.topo.threads[t as usize].cpu as usize;
        self.free_by_cpu[cpu].remove(&h);
    }

    fn give(&mut self, h: u32, t: u32) {
        let host = self.hosts[h as usize]
            .as_mut()
            .expect("give on a live host");
        debug_assert!(matches!(
            host.holder[t as usize],
            Holder::Vnf(_) | Holder::Group(_)
        ));
        let core = host.topo.threads[t as usize].core;
        let node = host.topo.cores[core as usize].node as usize;
        host.holder[t as usize] = Holder::Free;
        if Self::core_all_free(host, core) {
            host.node_free_cores[node] += 1;
        }
        host.node_free[node] += 1;
        host.free += 1;
        self.total_free += 1;
        let cpu = host.topo.threads[t as usize].cpu as usize;
        self.free_by_cpu[cpu].insert(h);
    }

    /// Applies a role's resources. Threads already held by this VNF are left as they are.
    fn apply(&mut self, vid: u32, rs: &RoleState) {
        self.apply_beside(vid, rs, &Kept::default());
    }

    /// [`Scheduler::apply`] for a role beside another of its VNF on the same host (`kept`,
    /// from [`keep_of`]): the memory of the nodes that one accounts for is not taken twice.
    fn apply_beside(&mut self, vid: u32, rs: &RoleState, kept: &Kept) {
        let h = rs.host;
        let ex: Vec<u32> = rs.exclusive().collect();
        for t in ex {
            if self.host(h).holder[t as usize] == Holder::Free {
                self.take(h, t, Holder::Vnf(vid));
            }
        }
        if let Some(core) = rs.group_core {
            let gid = self.vnf(vid).group.expect("shared roles have a group");
            let n = rs.vcpus.len() as u32;
            let cap = self.config.shared_core_capacity;
            let existing = self.host(h).group_cores.get(&core).map(|g| g.used);
            match existing {
                Some(used) => {
                    self.groups[gid as usize]
                        .index
                        .remove(&(cap - used, h, core));
                    self.groups[gid as usize]
                        .index
                        .insert((cap - used - n, h, core));
                    self.host_mut(h)
                        .group_cores
                        .get_mut(&core)
                        .expect("present")
                        .used += n;
                }
                None => {
                    let c = &self.host(h).topo.cores[core as usize];
                    for t in c.first..c.first + c.nthreads {
                        self.take(h, t, Holder::Group(gid));
                    }
                    self.host_mut(h).group_cores.insert(
                        core,
                        GroupCore {
                            group: gid,
                            used: n,
                        },
                    );
                    self.groups[gid as usize].index.insert((cap - n, h, core));
                }
            }
        }
        let mem = self.vnf(vid).req.memory_per_node;
        let host = self.host_mut(h);
        for &n in rs.nodes.iter().filter(|n| !kept.mem_nodes.contains(n)) {
            if let Some(m) = &mut host.node_mem[n as usize] {
                *m -= mem;
            }
        }
        host.need += rs.need;
        *host.roles.entry((vid, rs.role)).or_insert(0) += 1;
        self.reindex(h);
    }

    /// Gives back a role's resources, except what another role of its VNF beside it keeps
    /// (`keep`, from [`keep_of`]).
    fn unapply(&mut self, vid: u32, rs: &RoleState, keep: &Kept) {
        let h = rs.host;
        let ex: Vec<u32> = rs
            .exclusive()
            .filter(|t| !keep.threads.contains(t))
            .collect();
        for t in ex {
            if self.host(h).holder[t as usize] == Holder::Vnf(vid) {
                self.give(h, t);
            }
        }
        if let Some(core) = rs.group_core {
            let n = rs.vcpus.len() as u32;
            let cap = self.config.shared_core_capacity;
            let gc = self
                .host(h)
                .group_cores
                .get(&core)
                .cloned()
                .expect("group core of a shared role exists");
            let gid = gc.group;
            self.groups[gid as usize]
                .index
                .remove(&(cap - gc.used, h, core));
            if gc.used == n {
                self.host_mut(h).group_cores.remove(&core);
                let c = self.host(h).topo.cores[core as usize].clone();
                for t in c.first..c.first + c.nthreads {
                    self.give(h, t);
                }
            } else {
                self.groups[gid as usize]
                    .index
                    .insert((cap - gc.used + n, h, core));
                self.host_mut(h)
                    .group_cores
                    .get_mut(&core)
                    .expect("present")
                    .used -= n;
            }
        }
        let mem = self.vnf(vid).req.memory_per_node;
        let host = self.host_mut(h);
        for &n in rs.nodes.iter().filter(|n| !keep.mem_nodes.contains(n)) {
            if let Some(m) = &mut host.node_mem[n as usize] {
                *m += mem;
            }
        }
        host.need -= rs.need;
        let key = (vid, rs.role);
        if let Some(c) = host.roles.get_mut(&key) {
            *c -= 1;
            if *c == 0 {
                host.roles.remove(&key);
            }
        }
        self.reindex(h);
    }

    // ----- the reserve -------------------------------------------------------------------

    fn reserve_violation(&self) -> Option<(u32, u64, u64)> {
        if self.config.reserve == ReservePolicy::None {
            return None;
        }
        let top = *self.reserve_keys.last()?;
        let value = top >> HOST_BITS;
        if value <= self.total_free {
            return None;
        }
        let h = (top & ((1 << HOST_BITS) - 1)) as u32;
        let host = self.host(h);
        Some((h, host.need, self.total_free - host.free as u64))
    }

    /// Whether the n+1 reserve holds now (always true with `reserve: none`).
    pub fn reserve_holds(&self) -> bool {
        self.reserve_violation().is_none()
    }

    fn check_reserve(&self, vnf: &str) -> Result<(), SchedError> {
        match self.reserve_violation() {
            None => Ok(()),
            Some((h, needed, free)) => Err(SchedError::ReserveViolation {
                vnf: vnf.to_string(),
                host: self.host(h).spec.name.clone(),
                needed,
                free,
            }),
        }
    }

    // ----- placement ---------------------------------------------------------------------

    fn group_id(&mut self, req: &VnfRequest) -> Option<u32> {
        let g = req
            .cpu
            .group
            .as_ref()
            .filter(|_| req.cpu.policy == CpuPolicy::Shared)?;
        let key = (req.authority.clone(), g.clone());
        if let Some(&id) = self.group_by_key.get(&key) {
            return Some(id);
        }
        let id = self.groups.len() as u32;
        self.groups.push(GroupState {
            authority: key.0.clone(),
            name: key.1.clone(),
            index: BTreeSet::new(),
        });
        self.group_by_key.insert(key, id);
        Some(id)
    }

    /// Drops a group created by a call that then failed (so refusals change nothing).
    fn forget_new_group(&mut self, groups_before: usize) {
        if self.groups.len() > groups_before {
            let g = self.groups.pop().expect("a group was just created");
            debug_assert!(
                g.index.is_empty(),
                "a new group of a refused VNF holds no core"
            );
            self.group_by_key.remove(&(g.authority, g.name));
        }
    }

    /// Places a new VNF (both roles for active-standby). Nothing changes on error.
    pub fn place(&mut self, req: &VnfRequest) -> Result<Placement, SchedError> {
        req.validate(self.config.shared_core_capacity)?;
        if self.vnf_by_name.contains_key(&req.name) {
            return Err(SchedError::DuplicateVnf(req.name.clone()));
        }
        let groups_before = self.groups.len();
        let group = self.group_id(req);
        let vid = match self.free_slots.pop() {
            Some(v) => v,
            None => {
                self.vnfs.push(None);
                self.vnfs.len() as u32 - 1
            }
        };
        self.vnfs[vid as usize] = Some(VnfState {
            req: req.clone(),
            group,
            roles: [None, None],
            pending: [None, None],
            pending_req: None,
        });
        match self.place_roles(vid, req) {
            Ok(p) => {
                self.vnf_by_name.insert(req.name.clone(), vid);
                Ok(p)
            }
            Err(e) => {
                self.vnfs[vid as usize] = None;
                self.free_slots.push(vid);
                self.forget_new_group(groups_before);
                Err(e)
            }
        }
    }

    fn place_roles(&mut self, vid: u32, req: &VnfRequest) -> Result<Placement, SchedError> {
        let avoid = self.avoid_hosts(req, Vec::new());
        let act = self.find_role(vid, req, Role::Act, &avoid)?;
        self.apply(vid, &act);
        self.vnf_mut(vid).roles[0] = Some(act.clone());
        if req.redundancy == Redundancy::ActiveStandby {
            let avoid = self.avoid_hosts(req, vec![act.host]);
            match self.find_role(vid, req, Role::Sby, &avoid) {
                Ok(sby) => {
                    self.apply(vid, &sby);
                    self.vnf_mut(vid).roles[1] = Some(sby);
                }
                Err(e) => {
                    self.unapply(vid, &act, &Kept::default());
                    return Err(e);
                }
            }
        }
        if let Err(e) = self.check_reserve(&req.name) {
            for r in self.vnf(vid).roles.clone().into_iter().flatten() {
                self.unapply(vid, &r, &Kept::default());
            }
            return Err(e);
        }
        Ok(self.placement_of(vid))
    }

    fn placement_of(&self, vid: u32) -> Placement {
        let v = self.vnf(vid);
        let act = v.roles[0].as_ref().map(|r| self.render_role(vid, r));
        let sby = v.roles[1].as_ref().map(|r| self.render_role(vid, r));
        // A VNF whose ACT was lost and not re-placed keeps its SBY as the only role.
        match (act, sby) {
            (Some(act), sby) => Placement {
                vnf: v.req.name.clone(),
                act,
                sby,
            },
            (None, Some(sby)) => Placement {
                vnf: v.req.name.clone(),
                act: sby,
                sby: None,
            },
            (None, None) => unreachable!("a live vnf holds at least one role"),
        }
    }

    pub(crate) fn render_role(&self, vid: u32, rs: &RoleState) -> RolePlacement {
        let v = self.vnf(vid);
        let host = self.host(rs.host);
        let cpu = |t: u32| host.topo.threads[t as usize].cpu;
        let cpus = match rs.group_core {
            Some(core) => {
                let c = &host.topo.cores[core as usize];
                let l = CpuList::from_cpus((c.first..c.first + c.nthreads).map(cpu));
                vec![l; rs.vcpus.len()]
            }
            None => rs
                .vcpus
                .iter()
                .map(|&t| CpuList::from_cpus([cpu(t)]))
                .collect(),
        };
        let emulator_cpus = match (v.req.runtime, rs.emulator) {
            (Runtime::Wasm, _) => None,
            (Runtime::Vm, Some(t)) => Some(CpuList::from_cpus([cpu(t)])),
            (Runtime::Vm, None) => Some(host.topo.shared.clone()),
        };
        let mut numa_nodes: Vec<u32> = rs
            .nodes
            .iter()
            .map(|&n| host.topo.nodes[n as usize].id)
            .collect();
        numa_nodes.sort_unstable();
        RolePlacement {
            role: rs.role,
            host: host.spec.name.clone(),
            cpus,
            emulator_cpus,
            held: CpuList::from_cpus(rs.held.iter().map(|&t| cpu(t))),
            numa_nodes,
        }
    }

    fn emulator_isolated(req: &VnfRequest) -> bool {
        req.runtime == Runtime::Vm && req.emulator == EmulatorPolicy::Isolate
    }

    /// Host-level checks: avoid list, zones, shared set for emulator threads.
    fn host_ok(&self, h: u32, req: &VnfRequest, avoid: &Avoid) -> Result<(), String> {
        let host = self.host(h);
        if !host.schedulable {
            return Err("is cordoned: scheduling is disabled on it".into());
        }
        if let Some(offered) = &host.runtimes
            && !offered.contains(&req.runtime)
        {
            let names: Vec<&str> = offered.iter().map(|r| r.as_str()).collect();
            return Err(format!(
                "does not run {} VNFs (its agent offers: {})",
                req.runtime.as_str(),
                if names.is_empty() {
                    "none".to_owned()
                } else {
                    names.join(", ")
                }
            ));
        }
        if avoid.only.is_some_and(|o| o != h) {
            return Err("not the requested target host".into());
        }
        if avoid.hosts.contains(&h) {
            return Err(
                "holds the other role of this VNF (or is the host it moves away from)".into(),
            );
        }
        if avoid.unfit.contains(&h) {
            return Err("cannot take this VNF (the caller says why)".into());
        }
        if avoid.need_zone {
            match host.zone() {
                None => return Err("has no `zone` label (zone_anti_affinity needs one)".into()),
                Some(z) if avoid.zones.iter().any(|x| x == z) => {
                    return Err(format!(
                        "is in zone `{z}` like the other role (zone_anti_affinity)"
                    ));
                }
                _ => {}
            }
        }
        if req.runtime == Runtime::Vm
            && req.emulator == EmulatorPolicy::Share
            && host.topo.shared.is_empty()
        {
            return Err("has no shared cpus for emulator threads (emulator: share)".into());
        }
        Ok(())
    }

    /// The node locality forces on this host, if any.
    fn locality(&self, h: u32, req: &VnfRequest) -> Result<Option<u32>, String> {
        let host = self.host(h);
        if let Some(id) = req.cpu.numa_node {
            return host
                .topo
                .node_by_id(id)
                .map(Some)
                .ok_or_else(|| format!("has no NUMA node {id}"));
        }
        if let Some(nic) = &req.cpu.near_nic {
            return host
                .topo
                .nics
                .get(nic)
                .copied()
                .map(Some)
                .ok_or_else(|| format!("has no nic `{nic}`"));
        }
        Ok(None)
    }

    fn mem_ok(&self, h: u32, n: u32, req: &VnfRequest) -> bool {
        match self.host(h).node_mem[n as usize] {
            Some(m) => m >= req.memory_per_node,
            None => true,
        }
    }

    fn need_of(&self, h: u32, req: &VnfRequest, exclusive: u64) -> u64 {
        if req.redundancy != Redundancy::ActiveStandby {
            return 0;
        }
        match req.cpu.policy {
            CpuPolicy::Shared => {
                self.host(h).topo.max_threads_per_core as u64 + Self::emulator_isolated(req) as u64
            }
            _ => exclusive,
        }
    }

    fn role_state(
        &self,
        h: u32,
        role: Role,
        req: &VnfRequest,
        p: Picked,
        group_core: Option<u32>,
    ) -> RoleState {
        let host = self.host(h);
        // Shared roles list their group core in `vcpus`, not threads.
        let vcpu_threads = if group_core.is_some() {
            &[][..]
        } else {
            &p.vcpus[..]
        };
        let mut nodes: Vec<u32> = vcpu_threads
            .iter()
            .chain(p.emulator.iter())
            .map(|&t| host.topo.node_of_thread(t))
            .chain(group_core.map(|c| host.topo.cores[c as usize].node))
            .collect();
        nodes.sort_unstable();
        nodes.dedup();
        let exclusive = if group_core.is_some() {
            0
        } else {
            p.vcpus.len() as u64
        } + p.emulator.is_some() as u64
            + p.held.len() as u64;
        RoleState {
            role,
            host: h,
            need: self.need_of(h, req, exclusive),
            vcpus: p.vcpus,
            group_core,
            emulator: p.emulator,
            held: p.held,
            nodes,
        }
    }

    /// Tries one node for a dedicated or shared role (`group_core`: a specific group core).
    fn try_node(
        &self,
        vid: u32,
        (h, n): (u32, u32),
        req: &VnfRequest,
        role: Role,
        avoid: &Avoid,
        keep: &[u32],
    ) -> Option<RoleState> {
        if self.host_ok(h, req, avoid).is_err() || !self.mem_ok(h, n, req) {
            return None;
        }
        match self.locality(h, req) {
            Ok(Some(want)) if want != n => return None,
            Err(_) => return None,
            _ => {}
        }
        let host = self.host(h);
        let avail = |t: u32| host.avail_for(t, vid);
        let emu = Self::emulator_isolated(req);
        match req.cpu.policy {
            CpuPolicy::Dedicated => {
                let p = pick_dedicated(
                    &host.topo,
                    n,
                    &avail,
                    req.cpu.thread_policy,
                    req.cpu.count,
                    emu,
                    keep,
                )?;
                Some(self.role_state(h, role, req, p, None))
            }
            CpuPolicy::Shared => {
                let gid = self.vnf(vid).group.expect("shared roles have a group");
                let cap = self.config.shared_core_capacity;
                // Best fit among this group's cores on the node, else a new whole core.
                let existing = host
                    .group_cores
                    .iter()
                    .filter(|(c, g)| {
                        g.group == gid
                            && host.topo.cores[**c as usize].node == n
                            && cap - g.used >= req.cpu.count
                    })
                    .min_by_key(|(c, g)| (cap - g.used, **c))
                    .map(|(c, _)| *c);
                self.shared_on(vid, h, n, req, role, existing)
            }
            CpuPolicy::Pinned => None,
        }
    }

    /// Builds a shared role on group core `core` (or a new whole core when `None`).
    fn shared_on(
        &self,
        vid: u32,
        h: u32,
        n: u32,
        req: &VnfRequest,
        role: Role,
        core: Option<u32>,
    ) -> Option<RoleState> {
        let host = self.host(h);
        let avail = |t: u32| host.avail_for(t, vid);
        let core = match core {
            Some(c) => c,
            // A new group core must be entirely free: it will belong to the group, not the VNF.
            None => pick_whole_core(&host.topo, n, &|t| host.holder[t as usize] == Holder::Free)?,
        };
        let emulator = if Self::emulator_isolated(req) {
            let c = &host.topo.cores[core as usize];
            let exclude: Vec<u32> = (c.first..c.first + c.nthreads).collect();
            Some(pick_one(&host.topo, n, &avail, &exclude)?)
        } else {
            None
        };
        let p = Picked {
            vcpus: vec![core; req.cpu.count as usize],
            emulator,
            held: Vec::new(),
        };
        Some(self.role_state(h, role, req, p, Some(core)))
    }

    /// Tries a host for a pinned role.
    fn try_pinned(
        &self,
        vid: u32,
        h: u32,
        req: &VnfRequest,
        role: Role,
        avoid: &Avoid,
    ) -> Result<RoleState, String> {
        self.host_ok(h, req, avoid)?;
        let host = self.host(h);
        let want = self.locality(h, req)?;
        let mut threads = Vec::with_capacity(req.cpu.cores.len());
        for &cpu in &req.cpu.cores {
            let Some(t) = host.topo.thread_of_cpu(cpu) else {
                return Err(format!("cpu {cpu} does not exist"));
            };
            match host.holder[t as usize] {
                Holder::Free => {}
                Holder::Vnf(v) if v == vid => {}
                // Another authority's VNF or group is not named: only that the cpu is in use.
                Holder::Vnf(v) if self.vnf(v).req.authority != req.authority => {
                    return Err(format!("cpu {cpu} is in use by another authority"));
                }
                Holder::Vnf(v) => {
                    return Err(format!(
                        "cpu {cpu} is taken by vnf `{}`",
                        self.vnf(v).req.name
                    ));
                }
                Holder::Group(g) => {
                    let g = &self.groups[g as usize];
                    return Err(if g.authority == req.authority {
                        format!(
                            "cpu {cpu} is taken by shared group `{}` of `{}`",
                            g.name, g.authority
                        )
                    } else {
                        format!("cpu {cpu} is in use by another authority")
                    });
                }
                Holder::Off => {
                    let what = match host.topo.threads[t as usize].class {
                        Class::Reserved => "is reserved",
                        Class::Shared => "is in the shared set",
                        _ => "is outside the dedicated set",
                    };
                    return Err(format!("cpu {cpu} {what}, not dedicated"));
                }
            }
            let node = host.topo.node_of_thread(t);
            if want.is_some_and(|w| w != node) {
                return Err(format!(
                    "cpu {cpu} is on NUMA node {}, not on the requested node",
                    host.topo.nodes[node as usize].id
                ));
            }
            if !self.mem_ok(h, node, req) {
                return Err(format!(
                    "NUMA node {} has {} of memory free, the VNF needs {}",
                    host.topo.nodes[node as usize].id,
                    mib(host.node_mem[node as usize].unwrap_or(0)),
                    mib(req.memory_per_node)
                ));
            }
            threads.push(t);
        }
        let emulator = if Self::emulator_isolated(req) {
            let node = host.topo.node_of_thread(threads[0]);
            let avail = |t: u32| host.avail_for(t, vid);
            Some(pick_one(&host.topo, node, &avail, &threads).ok_or(
                "no free dedicated cpu for the isolated emulator on the pinned cores' node",
            )?)
        } else {
            None
        };
        let p = Picked {
            vcpus: threads,
            emulator,
            held: Vec::new(),
        };
        Ok(self.role_state(h, role, req, p, None))
    }

    /// Smallest per-node free count a node needs: (use the cores index, minimum). For whole
    /// cores of siblings, as few as the host with the most threads a core would take (a
    /// lower bound: the pick checks the node's own cores).
    fn demand(&self, req: &VnfRequest) -> (bool, u32) {
        let emu = Self::emulator_isolated(req) as u32;
        match (req.cpu.policy, req.cpu.thread_policy) {
            (CpuPolicy::Dedicated, ThreadPolicy::Prefer) => (false, req.cpu.count + emu),
            (CpuPolicy::Dedicated, ThreadPolicy::Isolate) => (true, req.cpu.count + emu),
            (CpuPolicy::Dedicated, ThreadPolicy::Require) => (
                true,
                (req.cpu.count + emu).div_ceil(self.most_threads_per_core.max(2)),
            ),
            _ => (true, 1),
        }
    }

    fn find_role(
        &self,
        vid: u32,
        req: &VnfRequest,
        role: Role,
        avoid: &Avoid,
    ) -> Result<RoleState, SchedError> {
        let found = match (req.cpu.policy, self.config.search) {
            (CpuPolicy::Pinned, Search::FirstFit) => self
                .live_hosts()
                .find_map(|h| self.try_pinned(vid, h, req, role, avoid).ok()),
            (CpuPolicy::Pinned, Search::Indexed) => {
                // Hosts where the first pinned cpu is free, in the order hosts were added (the
                // same host a full scan finds first); the other cpus are checked cheaply first.
                let first = req.cpu.cores[0] as usize;
                self.free_by_cpu.get(first).and_then(|hosts| {
                    hosts.iter().find_map(|&h| {
                        let host = self.host(h);
                        let quick = req.cpu.cores[1..].iter().all(|&c| {
                            host.topo
                                .thread_of_cpu(c)
                                .is_some_and(|t| host.avail_for(t, vid))
                        });
                        if !quick {
                            return None;
                        }
                        self.try_pinned(vid, h, req, role, avoid).ok()
                    })
                })
            }
            (_, Search::FirstFit) => {
                let (cores, min) = self.demand(req);
                self.live_hosts().find_map(|h| {
                    let host = self.host(h);
                    (0..host.topo.nodes.len() as u32).find_map(|n| {
                        let free = if cores {
                            host.node_free_cores[n as usize]
                        } else {
                            host.node_free[n as usize]
                        };
                        if free < min && req.cpu.policy != CpuPolicy::Shared {
                            return None;
                        }
                        self.try_node(vid, (h, n), req, role, avoid, &[])
                    })
                })
            }
            (_, Search::Indexed) => self.find_indexed(vid, req, role, avoid),
        };
        found.ok_or_else(|| self.no_placement(vid, req, role, avoid))
    }

    fn live_hosts(&self) -> impl Iterator<Item = u32> + '_ {
        self.hosts
            .iter()
            .enumerate()
            .filter(|(_, h)| h.is_some())
            .map(|(i, _)| i as u32)
    }

    fn find_indexed(
        &self,
        vid: u32,
        req: &VnfRequest,
        role: Role,
        avoid: &Avoid,
    ) -> Option<RoleState> {
        if let Some(only) = avoid.only {
            let nodes = self.host(only).topo.nodes.len() as u32;
            return (0..nodes).find_map(|n| self.try_node(vid, (only, n), req, role, avoid, &[]));
        }
        if req.cpu.policy == CpuPolicy::Shared {
            let gid = self.vnf(vid).group.expect("shared roles have a group");
            for &(_, h, core) in self.groups[gid as usize]
                .index
                .range((req.cpu.count, 0, 0)..)
            {
                let n = self.host(h).topo.cores[core as usize].node;
                if self.host_ok(h, req, avoid).is_err() || !self.mem_ok(h, n, req) {
                    continue;
                }
                if matches!(self.locality(h, req), Ok(Some(w)) if w != n)
                    || self.locality(h, req).is_err()
                {
                    continue;
                }
                if let Some(rs) = self.shared_on(vid, h, n, req, role, Some(core)) {
                    return Some(rs);
                }
            }
        }
        let (cores, min) = self.demand(req);
        let index = if cores {
            &self.by_cores
        } else {
            &self.by_threads
        };
        index
            .range(node_key(min, 0, 0)..)
            .map(|&k| decode_node_key(k))
            .find_map(|(h, n)| self.try_node(vid, (h, n), req, role, avoid, &[]))
    }

    fn summary(&self, req: &VnfRequest) -> String {
        let emu = if Self::emulator_isolated(req) {
            " plus 1 for the isolated emulator"
        } else {
            ""
        };
        let loc = match (&req.cpu.numa_node, &req.cpu.near_nic) {
            (Some(n), _) => format!("on NUMA node {n}"),
            (_, Some(nic)) => format!("on the NUMA node of nic `{nic}`"),
            _ => "on one NUMA node".to_string(),
        };
        match (req.cpu.policy, req.cpu.thread_policy) {
            (CpuPolicy::Dedicated, ThreadPolicy::Prefer) => {
                format!("needs {} dedicated cpus{emu} {loc}", req.cpu.count)
            }
            (CpuPolicy::Dedicated, ThreadPolicy::Isolate) => format!(
                "needs {} whole free cores (thread_policy isolate){emu} {loc}",
                req.cpu.count
            ),
            (CpuPolicy::Dedicated, ThreadPolicy::Require) => format!(
                "needs {} cpus on whole free cores, every sibling thread of each (thread_policy require){emu} {loc}",
                req.cpu.count
            ),
            (CpuPolicy::Shared, _) => format!(
                "needs room for {} vCPUs on a core of group `{}` or a whole free core{emu} {loc}",
                req.cpu.count,
                req.cpu.group.as_deref().unwrap_or("")
            ),
            (CpuPolicy::Pinned, _) => format!(
                "needs cpus {}{emu} free and dedicated",
                CpuList::from_cpus(req.cpu.cores.iter().copied())
            ),
        }
    }

    fn no_placement(&self, vid: u32, req: &VnfRequest, role: Role, avoid: &Avoid) -> SchedError {
        let summary = self.summary(req);
        let reasons = self
            .live_hosts()
            .map(|h| HostReason {
                host: self.host(h).spec.name.clone(),
                reason: self.explain(vid, h, req, role, avoid, &summary),
            })
            .collect();
        SchedError::NoPlacement {
            vnf: req.name.clone(),
            role,
            summary,
            reasons: HostReasons(reasons),
        }
    }

    fn explain(
        &self,
        vid: u32,
        h: u32,
        req: &VnfRequest,
        role: Role,
        avoid: &Avoid,
        summary: &str,
    ) -> String {
        if let Err(e) = self.host_ok(h, req, avoid) {
            return e;
        }
        if req.cpu.policy == CpuPolicy::Dedicated
            && req.cpu.thread_policy == ThreadPolicy::Require
            && self.host(h).topo.max_threads_per_core < 2
        {
            return "has no SMT siblings (thread_policy require needs them)".into();
        }
        if req.cpu.policy == CpuPolicy::Pinned {
            return match self.try_pinned(vid, h, req, role, avoid) {
                Err(e) => e,
                Ok(_) => "fits now".into(),
            };
        }
        let want = match self.locality(h, req) {
            Err(e) => return e,
            Ok(w) => w,
        };
        let host = self.host(h);
        let (cores, _) = self.demand(req);
        let mut parts = Vec::new();
        for (n, node) in host.topo.nodes.iter().enumerate() {
            if want.is_some_and(|w| w as usize != n) {
                continue;
            }
            let mut s = if cores {
                let c = host.node_free_cores[n];
                format!(
                    "node{} has {c} whole free core{}",
                    node.id,
                    if c == 1 { "" } else { "s" }
                )
            } else {
                format!("node{} has {} free", node.id, host.node_free[n])
            };
            if let Some(gid) = self.vnf(vid).group {
                let cap = self.config.shared_core_capacity;
                let room = host
                    .group_cores
                    .iter()
                    .filter(|(c, g)| {
                        g.group == gid && host.topo.cores[**c as usize].node == n as u32
                    })
                    .map(|(_, g)| cap - g.used)
                    .max();
                if let Some(room) = room {
                    s.push_str(&format!(
                        " (its group core with most room has {room} free vCPU slots)"
                    ));
                }
            }
            if !self.mem_ok(h, n as u32, req) {
                s.push_str(&format!(
                    " and {} of memory free (the VNF needs {})",
                    mib(host.node_mem[n].unwrap_or(0)),
                    mib(req.memory_per_node)
                ));
            }
            parts.push(s);
        }
        format!("{summary}; {}", parts.join(", "))
    }

    // ----- queries -----------------------------------------------------------------------

    /// The current placement of a VNF.
    pub fn placement(&self, name: &str) -> Result<Placement, SchedError> {
        Ok(self.placement_of(self.vnf_idx(name)?))
    }

    /// What VNF `name` holds and the request it holds it for, as [`Scheduler::restore`] takes
    /// it back. A pending change is not included.
    pub fn allocation(&self, name: &str) -> Result<Allocation, SchedError> {
        let vid = self.vnf_idx(name)?;
        Ok(Allocation {
            request: self.vnf(vid).req.clone(),
            placement: self.placement_of(vid),
        })
    }

    /// Every allocation, ordered by VNF name: what the controller stores and hands to
    /// [`Scheduler::restore`] after a restart. Pending changes are not included.
    pub fn allocations(&self) -> Vec<Allocation> {
        self.vnf_by_name
            .values()
            .map(|&v| Allocation {
                request: self.vnf(v).req.clone(),
                placement: self.placement_of(v),
            })
            .collect()
    }

    /// Capacity totals.
    pub fn stats(&self) -> Stats {
        let hosts = self.hosts.iter().flatten();
        Stats {
            hosts: self.host_by_name.len() as u32,
            vnfs: self.vnf_by_name.len() as u32,
            dedicated_cpus: hosts
                .clone()
                .map(|h| {
                    h.topo
                        .nodes
                        .iter()
                        .map(|n| n.dedicated_threads as u64)
                        .sum::<u64>()
                })
                .sum(),
            free_cpus: self.total_free,
            hosts_used: hosts.filter(|h| !h.roles.is_empty()).count() as u32,
        }
    }

    // ----- release, restore --------------------------------------------------------------

    /// Releases a VNF (every role and any change in progress); returns what it held.
    pub fn release(&mut self, name: &str) -> Result<Placement, SchedError> {
        let vid = self.vnf_idx(name)?;
        let p = self.placement_of(vid);
        self.forget(vid);
        Ok(p)
    }

    fn forget(&mut self, vid: u32) {
        let v = self.vnf(vid).clone();
        for r in v.pending.iter().flatten().chain(v.roles.iter().flatten()) {
            self.unapply(vid, r, &Kept::default());
        }
        self.vnf_by_name.remove(&v.req.name);
        self.vnfs[vid as usize] = None;
        self.free_slots.push(vid);
    }

    /// Re-inserts an existing allocation (after a controller restart). Validates that the
    /// request is valid, the hosts exist, every cpu exists, is dedicated and free (or, for
    /// shared groups, a core of the same group with room), locality, and that ACT and SBY are
    /// on different hosts. The reserve is not checked (the allocation already exists).
    pub fn restore(&mut self, alloc: &Allocation) -> Result<(), SchedError> {
        let req = &alloc.request;
        req.validate(self.config.shared_core_capacity)?;
        let p = &alloc.placement;
        if p.vnf != req.name {
            return Err(restore_err(
                &req.name,
                format!("placement is for vnf `{}`", p.vnf),
            ));
        }
        if self.vnf_by_name.contains_key(&req.name) {
            return Err(SchedError::DuplicateVnf(req.name.clone()));
        }
        if p.act.role != Role::Act {
            return Err(restore_err(&req.name, "act.role must be ACT"));
        }
        // A VNF without redundancy holds an SBY while it moves (its destination).
        if let Some(s) = &p.sby {
            if s.role != Role::Sby {
                return Err(restore_err(&req.name, "sby.role must be SBY"));
            }
            if s.host == p.act.host {
                return Err(restore_err(
                    &req.name,
                    format!("ACT and SBY are both on host `{}`", s.host),
                ));
            }
            if req.redundancy == Redundancy::ActiveStandby && req.zone_anti_affinity {
                let z = |n: &str| {
                    self.host_idx(n)
                        .ok()
                        .and_then(|h| self.host(h).zone().map(str::to_string))
                };
                let (za, zs) = (z(&p.act.host), z(&s.host));
                if za.is_none() || za == zs {
                    return Err(restore_err(
                        &req.name,
                        "ACT and SBY must be in different `zone` labels",
                    ));
                }
            }
        }
        let existed = self.groups.len();
        let group = self.group_id(req);
        let vid = self.free_slots.pop().unwrap_or_else(|| {
            self.vnfs.push(None);
            self.vnfs.len() as u32 - 1
        });
        self.vnfs[vid as usize] = Some(VnfState {
            req: req.clone(),
            group,
            roles: [None, None],
            pending: [None, None],
            pending_req: None,
        });
        let mut applied = Vec::new();
        let mut result = Ok(());
        for rp in std::iter::once(&p.act).chain(p.sby.iter()) {
            match self.role_from_placement(vid, req, rp) {
                Ok(rs) => {
                    self.apply(vid, &rs);
                    applied.push(rs);
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        if result.is_err() {
            for rs in &applied {
                self.unapply(vid, rs, &Kept::default());
            }
            self.vnfs[vid as usize] = None;
            self.free_slots.push(vid);
            self.forget_new_group(existed);
            return result;
        }
        for rs in applied {
            let i = rs.role.index();
            self.vnf_mut(vid).roles[i] = Some(rs);
        }
        self.vnf_by_name.insert(req.name.clone(), vid);
        Ok(())
    }

    fn role_from_placement(
        &self,
        vid: u32,
        req: &VnfRequest,
        rp: &RolePlacement,
    ) -> Result<RoleState, SchedError> {
        let name = &req.name;
        let h = self.host_idx(&rp.host)?;
        let host = self.host(h);
        let r = |s: String| restore_err(name, format!("{} on `{}`: {s}", rp.role, rp.host));
        if rp.cpus.len() as u32 != req.vcpus() {
            return Err(r(format!(
                "{} vCPU entries, the request has {}",
                rp.cpus.len(),
                req.vcpus()
            )));
        }
        let mut seen = BTreeSet::new();
        let dedicated_free = |cpu: u32, seen: &mut BTreeSet<u32>| -> Result<u32, SchedError> {
            let t = host
                .topo
                .thread_of_cpu(cpu)
                .ok_or_else(|| r(format!("cpu {cpu} does not exist")))?;
            if host.topo.threads[t as usize].class != Class::Dedicated {
                return Err(r(format!("cpu {cpu} is not in the dedicated set")));
            }
            if host.holder[t as usize] != Holder::Free {
                return Err(r(format!("cpu {cpu} is already taken")));
            }
            if !seen.insert(t) {
                return Err(r(format!("cpu {cpu} is used twice")));
            }
            Ok(t)
        };
        let mut vcpus = Vec::new();
        let mut group_core = None;
        match req.cpu.policy {
            CpuPolicy::Dedicated | CpuPolicy::Pinned => {
                for (i, l) in rp.cpus.iter().enumerate() {
                    let [cpu] = l.cpus() else {
                        return Err(r(format!("vCPU {i} must have exactly one cpu, has `{l}`")));
                    };
                    if req.cpu.policy == CpuPolicy::Pinned && req.cpu.cores[i] != *cpu {
                        return Err(r(format!(
                            "vCPU {i} is on cpu {cpu} but the request pins it to {}",
                            req.cpu.cores[i]
                        )));
                    }
                    vcpus.push(dedicated_free(*cpu, &mut seen)?);
                }
            }
            CpuPolicy::Shared => {
                let first = &rp.cpus[0];
                if rp.cpus.iter().any(|c| c != first) {
                    return Err(r("shared vCPUs must all be on the same group core".into()));
                }
                let t = first
                    .cpus()
                    .first()
                    .and_then(|&c| host.topo.thread_of_cpu(c))
                    .ok_or_else(|| r(format!("group core `{first}` does not exist")))?;
                let core = host.topo.threads[t as usize].core;
                let c = &host.topo.cores[core as usize];
                let threads: Vec<u32> = (c.first..c.first + c.nthreads)
                    .map(|t| host.topo.threads[t as usize].cpu)
                    .collect();
                if first.cpus() != threads.as_slice() || !c.whole {
                    return Err(r(format!("`{first}` is not one whole dedicated core")));
                }
                let gid = self.vnf(vid).group.expect("shared roles have a group");
                match host.group_cores.get(&core) {
                    Some(g) if g.group == gid => {
                        if g.used + req.cpu.count > self.config.shared_core_capacity {
                            return Err(r(format!(
                                "group core `{first}` has no room for {} more vCPUs",
                                req.cpu.count
                            )));
                        }
                    }
                    Some(_) => return Err(r(format!("core `{first}` belongs to another group"))),
                    None => {
                        if !Self::core_all_free(host, core) {
                            return Err(r(format!("core `{first}` is already taken")));
                        }
                    }
                }
                group_core = Some(core);
                vcpus = vec![core; req.cpu.count as usize];
            }
        }
        let emulator = match (req.runtime, req.emulator, &rp.emulator_cpus) {
            (Runtime::Wasm, _, None) => None,
            (Runtime::Wasm, _, Some(_)) => return Err(r("wasm VNFs have no emulator cpus".into())),
            (Runtime::Vm, EmulatorPolicy::Share, Some(l)) if *l == host.topo.shared => None,
            (Runtime::Vm, EmulatorPolicy::Share, _) => {
                return Err(r(format!(
                    "emulator cpus must be the host's shared set `{}`",
                    host.topo.shared
                )));
            }
            (Runtime::Vm, EmulatorPolicy::Isolate, Some(l)) if l.len() == 1 => {
                Some(dedicated_free(l.cpus()[0], &mut seen)?)
            }
            (Runtime::Vm, EmulatorPolicy::Isolate, _) => {
                return Err(r("emulator: isolate needs exactly one emulator cpu".into()));
            }
        };
        let mut held = Vec::new();
        for &cpu in rp.held.cpus() {
            held.push(dedicated_free(cpu, &mut seen)?);
        }
        if let Some(core) = group_core {
            let c = &host.topo.cores[core as usize];
            if seen
                .iter()
                .any(|t| (c.first..c.first + c.nthreads).contains(t))
            {
                return Err(r("the group core is also used as an exclusive cpu".into()));
            }
        }
        let rs = self.role_state(
            h,
            rp.role,
            req,
            Picked {
                vcpus,
                emulator,
                held,
            },
            group_core,
        );
        let want = self.locality(h, req).map_err(r)?;
        if let Some(w) = want
            && rs.nodes.iter().any(|&n| n != w)
        {
            return Err(r("cpus lie outside the requested NUMA node".into()));
        }
        if rs.nodes.iter().any(|&n| !self.mem_ok(h, n, req)) {
            return Err(r("not enough free memory on the NUMA node".into()));
        }
        let mut ids: Vec<u32> = rs
            .nodes
            .iter()
            .map(|&n| host.topo.nodes[n as usize].id)
            .collect();
        ids.sort_unstable();
        if ids != rp.numa_nodes {
            return Err(r(format!(
                "numa_nodes {:?} do not match the cpus' nodes {ids:?}",
                rp.numa_nodes
            )));
        }
        Ok(rs)
    }

    // ----- host failure ------------------------------------------------------------------

    /// A host is lost: forgets it, and re-places every role that ran on it (largest first,
    /// then by name). An SBY whose ACT was lost becomes ACT and the new placement is the SBY.
    /// The reserve is not checked here: this is what it is kept for.
    pub fn fail_host(&mut self, name: &str) -> Result<Vec<Replacement>, SchedError> {
        let h = self.host_idx(name)?;
        let mut lost: Vec<(u32, Role)> = self.host(h).roles.keys().copied().collect();
        // Changes in progress are abandoned: the controller re-plans after a failure.
        let touched: BTreeSet<u32> = lost.iter().map(|(v, _)| *v).collect();
        for &vid in &touched {
            let v = self.vnf(vid).clone();
            for rs in v.pending.iter().flatten() {
                let keep = keep_of(v.roles[rs.role.index()].as_ref(), rs.host);
                self.unapply(vid, rs, &keep);
            }
            let vm = self.vnf_mut(vid);
            vm.pending = [None, None];
            vm.pending_req = None;
        }
        lost = self.host(h).roles.keys().copied().collect();
        for &(vid, role) in &lost {
            let rs = self.vnf_mut(vid).roles[role.index()]
                .take()
                .expect("host.roles lists held roles");
            self.unapply(vid, &rs, &Kept::default());
        }
        self.drop_host(h);
        lost.sort_by(|a, b| {
            let (va, vb) = (self.vnf(a.0), self.vnf(b.0));
            vb.req
                .vcpus()
                .cmp(&va.req.vcpus())
                .then_with(|| va.req.name.cmp(&vb.req.name))
                .then(a.1.cmp(&b.1))
        });
        let mut out = Vec::with_capacity(lost.len());
        for (vid, role) in lost {
            let mut promoted = false;
            let mut new_role = role;
            if role == Role::Act
                && let Some(mut sby) = self.vnf_mut(vid).roles[1].take()
            {
                let sh = sby.host;
                let host = self.host_mut(sh);
                host.roles.remove(&(vid, Role::Sby));
                host.roles.insert((vid, Role::Act), 1);
                sby.role = Role::Act;
                self.vnf_mut(vid).roles[0] = Some(sby);
                promoted = true;
                new_role = Role::Sby;
            }
            let req = self.vnf(vid).req.clone();
            let partner = self.vnf(vid).roles[1 - new_role.index()]
                .as_ref()
                .map(|r| r.host);
            let avoid = self.avoid_hosts(&req, partner.into_iter().collect());
            let result = match self.find_role(vid, &req, new_role, &avoid) {
                Ok(rs) => {
                    self.apply(vid, &rs);
                    let rp = self.render_role(vid, &rs);
                    self.vnf_mut(vid).roles[new_role.index()] = Some(rs);
                    Ok(rp)
                }
                Err(e) => {
                    if self.vnf(vid).roles.iter().all(Option::is_none) {
                        self.forget(vid);
                    }
                    Err(e)
                }
            };
            out.push(Replacement {
                vnf: req.name.clone(),
                lost: role,
                promoted,
                result,
            });
        }
        Ok(out)
    }

    /// Moves the role VNF `name` holds on `host` (a host that failed) to another host, keeping
    /// the host itself. An ACT whose SBY lives elsewhere is replaced by promoting that SBY (the
    /// new placement, if any, is the SBY); a lost SBY gets a new host; a lost ACT without a
    /// standby (or a single VNF) moves to a new host, and when none can take it nothing
    /// changes and the error says why. A promotion or a lost SBY happens even when no new SBY
    /// fits: the VNF then runs without one (`replaced: None`) until [`Scheduler::heal`]. The
    /// reserve is not checked: this is what it is kept for.
    pub fn relocate(&mut self, name: &str, host: &str) -> Result<Relocation, SchedError> {
        let (vid, v) = self.settled(name)?;
        let h = self.host_idx(host)?;
        let held = |role: Role| v.roles[role.index()].as_ref().filter(|rs| rs.host == h);
        let (lost, state) = match (held(Role::Act), held(Role::Sby)) {
            (Some(rs), _) => (Role::Act, rs.clone()),
            (None, Some(rs)) => (Role::Sby, rs.clone()),
            (None, None) => {
                return Err(SchedError::InvalidChange {
                    vnf: name.to_string(),
                    reason: format!("holds no role on host {host}"),
                });
            }
        };
        let req = v.req.clone();
        let partner = v.roles[1 - lost.index()].as_ref().map(|r| r.host);
        let mut avoid = self.avoid_hosts(&req, partner.into_iter().collect());
        avoid.hosts.push(h);
        if lost == Role::Act && partner.is_none() {
            // Found before anything is released, so a refusal changes nothing.
            let rs = self.find_role(vid, &req, Role::Act, &avoid)?;
            self.unapply(vid, &state, &Kept::default());
            self.apply(vid, &rs);
            let rp = self.render_role(vid, &rs);
            self.vnf_mut(vid).roles[0] = Some(rs);
            return Ok(Relocation {
                lost,
                promoted: false,
                replaced: Some(rp),
            });
        }
        self.unapply(vid, &state, &Kept::default());
        self.vnf_mut(vid).roles[lost.index()] = None;
        let promoted = lost == Role::Act;
        if promoted && let Some(mut sby) = self.vnf_mut(vid).roles[1].take() {
            let sby_host = self.host_mut(sby.host);
            sby_host.roles.remove(&(vid, Role::Sby));
            sby_host.roles.insert((vid, Role::Act), 1);
            sby.role = Role::Act;
            self.vnf_mut(vid).roles[0] = Some(sby);
        }
        let replaced = match self.find_role(vid, &req, Role::Sby, &avoid) {
            Ok(rs) => {
                self.apply(vid, &rs);
                let rp = self.render_role(vid, &rs);
                self.vnf_mut(vid).roles[1] = Some(rs);
                Some(rp)
            }
            Err(_) => None,
        };
        Ok(Relocation {
            lost,
            promoted,
            replaced,
        })
    }

    /// Places a standby role for VNF `name` (which has none) on host `to` (or wherever fits
    /// best, never on its active's host nor on a host named in `except`, which a caller found
    /// unfit for reasons the scheduler does not know, such as a QEMU too old to take the
    /// guest; unknown names there are ignored): the destination of a move, which takes the
    /// state and then the traffic ([`Scheduler::swap_roles`], then
    /// [`Scheduler::drop_standby`]), so the two never share a cpu. Nothing changes on error.
    pub fn add_standby(
        &mut self,
        name: &str,
        to: Option<&str>,
        except: &[String],
    ) -> Result<RolePlacement, SchedError> {
        let (vid, v) = self.settled(name)?;
        if v.roles[1].is_some() {
            return Err(SchedError::InvalidChange {
                vnf: name.to_string(),
                reason: "has a standby already".into(),
            });
        }
        let Some(active) = v.roles[0].as_ref().map(|r| r.host) else {
            return Err(SchedError::InvalidChange {
                vnf: name.to_string(),
                reason: "has no active instance".into(),
            });
        };
        let mut avoid = self.avoid_hosts(&v.req, vec![active]);
        avoid.unfit = except
            .iter()
            .filter_map(|h| self.host_idx(h).ok())
            .collect();
        if let Some(to) = to {
            let h = self.host_idx(to)?;
            if h == active {
                return Err(SchedError::InvalidChange {
                    vnf: name.to_string(),
                    reason: format!("runs on host {to} already"),
                });
            }
            avoid.only = Some(h);
        }
        let rs = self.find_role(vid, &v.req, Role::Sby, &avoid)?;
        self.apply(vid, &rs);
        let rp = self.render_role(vid, &rs);
        self.vnf_mut(vid).roles[1] = Some(rs);
        Ok(rp)
    }

    /// Frees the standby role of VNF `name` (a move that ended, or was cancelled).
    pub fn drop_standby(&mut self, name: &str) -> Result<Placement, SchedError> {
        let (vid, v) = self.settled(name)?;
        let Some(rs) = v.roles[1].clone() else {
            return Err(SchedError::InvalidChange {
                vnf: name.to_string(),
                reason: "has no standby".into(),
            });
        };
        self.unapply(vid, &rs, &Kept::default());
        self.vnf_mut(vid).roles[1] = None;
        self.placement(name)
    }

    /// Makes the standby of VNF `name` its active and the active its standby, on the cpus each
    /// holds (the active instance died; its standby takes over and it comes back as the
    /// standby). Refused for a VNF without both roles or with a change pending; nothing changes
    /// then.
    pub fn swap_roles(&mut self, name: &str) -> Result<Placement, SchedError> {
        let (vid, v) = self.settled(name)?;
        let (Some(mut act), Some(mut sby)) = (v.roles[0].clone(), v.roles[1].clone()) else {
            return Err(SchedError::InvalidChange {
                vnf: name.to_string(),
                reason: "has no standby to take over".into(),
            });
        };
        for rs in [&act, &sby] {
            let host = self.host_mut(rs.host);
            if let Some(c) = host.roles.get_mut(&(vid, rs.role)) {
                *c -= 1;
                if *c == 0 {
                    host.roles.remove(&(vid, rs.role));
                }
            }
        }
        act.role = Role::Sby;
        sby.role = Role::Act;
        for rs in [&act, &sby] {
            *self
                .host_mut(rs.host)
                .roles
                .entry((vid, rs.role))
                .or_insert(0) += 1;
        }
        let vm = self.vnf_mut(vid);
        vm.roles = [Some(sby), Some(act)];
        self.placement(name)
    }

    /// Places the missing role of a VNF that lost one (e.g. after [`Scheduler::fail_host`]
    /// could not re-place it and capacity came back). Checks the reserve.
    pub fn heal(&mut self, name: &str) -> Result<RolePlacement, SchedError> {
        let vid = self.vnf_idx(name)?;
        let v = self.vnf(vid);
        let req = v.req.clone();
        let (role, partner) = match (&v.roles[0], &v.roles[1], req.redundancy) {
            (Some(_), None, Redundancy::ActiveStandby) => {
                (Role::Sby, v.roles[0].as_ref().map(|r| r.host))
            }
            (None, Some(_), _) => (Role::Act, v.roles[1].as_ref().map(|r| r.host)),
            _ => {
                return Err(SchedError::InvalidChange {
                    vnf: name.to_string(),
                    reason: "has every role it needs; nothing to heal".into(),
                });
            }
        };
        let avoid = self.avoid_hosts(&req, partner.into_iter().collect());
        let rs = self.find_role(vid, &req, role, &avoid)?;
        self.apply(vid, &rs);
        if let Err(e) = self.check_reserve(name) {
            self.unapply(vid, &rs, &Kept::default());
            return Err(e);
        }
        let rp = self.render_role(vid, &rs);
        self.vnf_mut(vid).roles[role.index()] = Some(rs);
        Ok(rp)
    }

    // ----- changes -----------------------------------------------------------------------

    /// Starts a change: computes the new allocation and holds it *together with* the old one,
    /// so the new cpus never overlap another VNF's, even while the VNF moves over. The new
    /// allocation may reuse cpus the VNF already holds. Finish with
    /// [`Scheduler::commit_change`] (frees what only the old one used) or
    /// [`Scheduler::abort_change`] (frees what only the new one used).
    pub fn begin_change(&mut self, name: &str, change: &Change) -> Result<Placement, SchedError> {
        let (vid, v) = self.settled(name)?;
        let mut req = v.req.clone();
        let invalid = |reason: &str| SchedError::InvalidChange {
            vnf: name.to_string(),
            reason: reason.to_string(),
        };
        let roles: Vec<RoleState> = v.roles.iter().flatten().cloned().collect();
        let mut targets: Vec<(RoleState, Avoid, bool)> = Vec::new();
        match change {
            Change::Resize { count } => {
                if req.cpu.policy == CpuPolicy::Pinned {
                    return Err(invalid(
                        "a pinned VNF changes size with repin (new cores), not resize",
                    ));
                }
                req.cpu.count = *count;
                req.validate(self.config.shared_core_capacity)?;
                for rs in &roles {
                    targets.push((rs.clone(), self.partner_avoid(vid, &req, rs.role), true));
                }
            }
            Change::Repin { cores } => {
                if req.cpu.policy != CpuPolicy::Pinned {
                    return Err(invalid(
                        "repin only applies to policy pinned; use resize or move",
                    ));
                }
                req.cpu.cores = cores.clone();
                req.cpu.count = 0;
                req.validate(self.config.shared_core_capacity)?;
                for rs in &roles {
                    targets.push((rs.clone(), self.partner_avoid(vid, &req, rs.role), true));
                }
            }
            Change::Move { role, to } => {
                let rs = v.roles[role.index()]
                    .clone()
                    .ok_or(SchedError::UnknownRole {
                        vnf: name.to_string(),
                        role: *role,
                    })?;
                let mut avoid = self.partner_avoid(vid, &req, *role);
                avoid.hosts.push(rs.host);
                if let Some(t) = to {
                    let th = self.host_idx(t)?;
                    if let Err(why) = self.host_ok(th, &req, &avoid) {
                        return Err(invalid(&format!("cannot move {role} to `{t}`: it {why}")));
                    }
                    avoid.only = Some(th);
                }
                targets.push((rs, avoid, false));
            }
        }
        let mut done: Vec<RoleState> = Vec::new();
        for (old, mut avoid, same_host_first) in targets {
            if same_host_first && !done.is_empty() {
                // The partner's new host is as off-limits as its old one.
                let mut hosts = avoid.hosts.clone();
                hosts.extend(done.iter().map(|d| d.host));
                avoid = self.avoid_hosts(&req, hosts);
            }
            let found = if same_host_first {
                // The VM's memory stays where it is: the old role's is the new one's to use.
                self.lend_memory(vid, &old, true);
                let found = self.change_in_place(vid, &req, &old);
                self.lend_memory(vid, &old, false);
                found
            } else {
                None
            };
            let found = match found {
                Some(rs) => Ok(rs),
                None => self.find_role(vid, &req, old.role, &avoid),
            };
            match found {
                Ok(rs) => {
                    self.apply_beside(vid, &rs, &keep_of(Some(&old), rs.host));
                    done.push(rs);
                }
                Err(e) => {
                    self.undo_pending(vid, &done);
                    return Err(e);
                }
            }
        }
        if let Err(e) = self.check_reserve(name) {
            self.undo_pending(vid, &done);
            return Err(e);
        }
        let vm = self.vnf_mut(vid);
        for rs in done {
            let i = rs.role.index();
            vm.pending[i] = Some(rs);
        }
        vm.pending_req = Some(req);
        Ok(self.pending_placement(vid))
    }

    /// Counts the memory role `old` of VNF `vid` holds on its nodes as free (`lend`) or as
    /// held again, around a search for the role that replaces it on the same host.
    fn lend_memory(&mut self, vid: u32, old: &RoleState, lend: bool) {
        let mem = self.vnf(vid).req.memory_per_node;
        let host = self.host_mut(old.host);
        for &n in &old.nodes {
            if let Some(m) = &mut host.node_mem[n as usize] {
                *m = if lend { *m + mem } else { *m - mem };
            }
        }
    }

    /// The placement as it will be once the change in progress is committed.
    fn pending_placement(&self, vid: u32) -> Placement {
        let mut p = self.placement_of(vid);
        for rs in self.vnf(vid).pending.iter().flatten() {
            let rp = self.render_role(vid, rs);
            match rs.role {
                Role::Act => p.act = rp,
                Role::Sby => p.sby = Some(rp),
            }
        }
        p
    }

    /// The change in progress for a VNF, if any: its request and the placement it will have
    /// once committed (both allocations are held until then).
    pub fn pending_change(
        &self,
        name: &str,
    ) -> Result<Option<(VnfRequest, Placement)>, SchedError> {
        let vid = self.vnf_idx(name)?;
        Ok(self
            .vnf(vid)
            .pending_req
            .clone()
            .map(|r| (r, self.pending_placement(vid))))
    }

    fn undo_pending(&mut self, vid: u32, done: &[RoleState]) {
        for rs in done {
            let keep = keep_of(self.vnf(vid).roles[rs.role.index()].as_ref(), rs.host);
            self.unapply(vid, rs, &keep);
        }
    }

    /// Avoid `hosts` (and, with zone anti-affinity, their zones).
    fn avoid_hosts(&self, req: &VnfRequest, hosts: Vec<u32>) -> Avoid {
        let zones = if req.zone_anti_affinity {
            hosts
                .iter()
                .filter_map(|&h| self.host(h).zone().map(str::to_string))
                .collect()
        } else {
            Vec::new()
        };
        Avoid {
            hosts,
            unfit: Vec::new(),
            zones,
            need_zone: req.zone_anti_affinity,
            only: None,
        }
    }

    fn partner_avoid(&self, vid: u32, req: &VnfRequest, role: Role) -> Avoid {
        let partner = self.vnf(vid).roles[1 - role.index()]
            .as_ref()
            .map(|r| r.host);
        self.avoid_hosts(req, partner.into_iter().collect())
    }

    /// The new allocation on the same host (and node), reusing the role's own cpus first.
    fn change_in_place(&self, vid: u32, req: &VnfRequest, old: &RoleState) -> Option<RoleState> {
        let h = old.host;
        match req.cpu.policy {
            CpuPolicy::Pinned => self
                .try_pinned(vid, h, req, old.role, &Avoid::default())
                .ok(),
            CpuPolicy::Shared => None,
            CpuPolicy::Dedicated => {
                let keep: Vec<u32> = old.vcpus.iter().copied().chain(old.emulator).collect();
                let node = *old.nodes.first()?;
                self.try_node(vid, (h, node), req, old.role, &Avoid::default(), &keep)
            }
        }
    }

    /// Finishes a change: the new allocation becomes the VNF's, cpus only the old one used
    /// are freed.
    pub fn commit_change(&mut self, name: &str) -> Result<Placement, SchedError> {
        let vid = self.vnf_idx(name)?;
        let v = self.vnf(vid).clone();
        let req = v.pending_req.clone().ok_or(SchedError::NoChangePending {
            vnf: name.to_string(),
            role: Role::Act,
        })?;
        for new in v.pending.iter().flatten() {
            let i = new.role.index();
            if let Some(old) = &v.roles[i] {
                let keep = keep_of(Some(new), old.host);
                self.unapply(vid, old, &keep);
            }
            self.vnf_mut(vid).roles[i] = Some(new.clone());
        }
        let vm = self.vnf_mut(vid);
        vm.pending = [None, None];
        vm.pending_req = None;
        let mem_changed = vm.req.memory_per_node != req.memory_per_node;
        debug_assert!(!mem_changed, "changes never alter memory");
        vm.req = req;
        Ok(self.placement_of(vid))
    }

    /// Abandons a change: frees what only the new allocation used.
    pub fn abort_change(&mut self, name: &str) -> Result<(), SchedError> {
        let vid = self.vnf_idx(name)?;
        let v = self.vnf(vid).clone();
        if v.pending_req.is_none() {
            return Err(SchedError::NoChangePending {
                vnf: name.to_string(),
                role: Role::Act,
            });
        }
        let done: Vec<RoleState> = v.pending.iter().flatten().cloned().collect();
        self.undo_pending(vid, &done);
        let vm = self.vnf_mut(vid);
        vm.pending = [None, None];
        vm.pending_req = None;
        Ok(())
    }
}

/// `bytes` for a person: whole MiB, or bytes below one MiB.
fn mib(bytes: u64) -> String {
    if bytes >= 1 << 20 {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{bytes} bytes")
    }
}
