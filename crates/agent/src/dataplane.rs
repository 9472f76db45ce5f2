//! The node's data plane as the agent sees it: one [`PatchPanel`] per agent process, with one
//! worker thread pinned to each CPU this process may run on, shared by the wasm runtime adapter
//! (which places VNF nodes on the worker of their allocated core) and the network reconciler
//! (which applies `kind: Network` links).
//!
//! Owns the panel's lifetime, the core → worker mapping, the built-in nodes networks may name,
//! which workers busy-poll, and (in `serve` and `agent`) keeping the process's other threads
//! off busy-polled cores. The vm runtime puts VMs' NIC nodes here too. It must not decide
//! placement (the scheduler does) nor parse descriptors beyond mapping them onto the data
//! plane's own types.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant};

use telvirt_dataplane::node::Node;
use telvirt_dataplane::panel::PatchPanel;
use telvirt_dataplane::pool::{DEFAULT_BUF_SIZE, Pool};
use telvirt_dataplane::vxlan::VxlanTunnelStats;
use telvirt_dataplane::worker::{WorkerConfig, allowed_cores, set_thread_affinity};

use crate::AgentError;

/// `m` if nobody holds it right now; a poisoned lock is taken as it was left (its holder's
/// panic left it between two changes).
pub(crate) fn try_lock_unpoisoned<T>(m: &Mutex<T>) -> Option<MutexGuard<'_, T>> {
    match m.try_lock() {
        Ok(held) => Some(held),
        Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
        Err(TryLockError::WouldBlock) => None,
    }
}

/// Packet buffers in the node's pool.
pub const POOL_BUFFERS: usize = 16384;
/// Slots per link ring.
pub const RING_CAPACITY: usize = 1024;
/// A worker's name: this prefix and its core (thread `tv-cpu3`, the data plane's
/// [`telvirt_dataplane::worker::THREAD_PREFIX`] before it).
pub const WORKER_NAME_PREFIX: &str = "cpu";

/// Where this process's threads other than the data-plane workers belong, as decided.
struct HousekeepingPlacement {
    /// Decided as the `number`th placement.
    number: u64,
    cores: Vec<usize>,
    worker_tids: Vec<i32>,
}

/// Records the `number`th placement's `cores` in `placed` (the last applied: its number and
/// cores) unless a later one was applied; answers whether the threads must move (the cores
/// differ from where they are).
fn takes_over(placed: &mut (u64, Vec<usize>), number: u64, cores: &[usize]) -> bool {
    if number < placed.0 {
        return false;
    }
    placed.0 = number;
    if placed.1 == cores {
        return false;
    }
    placed.1 = cores.to_vec();
    true
}

/// The agent's patch panel and which worker runs on which core.
pub struct NodeDataPlane {
    panel: Mutex<PatchPanel>,
    /// Node name → port names, of every node on the panel.
    nodes: Mutex<BTreeMap<String, Vec<String>>>,
    /// Linux CPU → index of the worker pinned to it.
    workers: BTreeMap<u32, usize>,
    /// Worker index → (name, polling rounds last seen, when they last moved), for liveness.
    progress: Mutex<BTreeMap<usize, (String, u64, Instant)>>,
    /// Keep this process's other threads off the cores whose worker busy-polls.
    confine_housekeeping: AtomicBool,
    /// The cores housekeeping threads were last given (empty: not yet), and the number of
    /// the placement that gave them (a placement decided earlier never undoes a later one).
    housekeeping_cores: Mutex<(u64, Vec<usize>)>,
    /// Numbers the placements as they are decided, under the panel's lock.
    housekeeping_decided: AtomicU64,
    /// No worker busy-polls, whatever its nodes ask.
    busy_forbidden: AtomicBool,
    /// Nodes whose links stay as they are whatever the networks say (a frozen move's source
    /// that still receives what was sent to it before its senders rewired), and what still
    /// sends to them.
    held: Mutex<BTreeMap<String, HeldSenders>>,
}

/// What still sends to a node whose links are held, as the last network pass found it.
#[derive(Debug, Default)]
struct HeldSenders {
    /// When the hold began (CLOCK_MONOTONIC nanoseconds): a tunnel's end from before says
    /// nothing about this hold.
    since_ns: u64,
    /// A network pass told since the hold (until then nothing is known).
    known: bool,
    /// Links into the node from nodes of this host that send (senders here not rewired yet).
    local: usize,
    /// Links into the node that send nothing more: from other held nodes (frozen too).
    quiet: usize,
    /// The tunnels that bring it frames from other hosts.
    tunnels: Vec<Arc<VxlanTunnelStats>>,
}

impl NodeDataPlane {
    /// One worker per CPU in this process's affinity mask, pinned to it, backing off when idle
    /// once it found no work for `idle_spin` ([`WorkerConfig::idle_spin`]).
    pub fn new(idle_spin: Duration) -> Result<Arc<Self>, AgentError> {
        let cores = allowed_cores().map_err(|e| AgentError::DataPlane(e.to_string()))?;
        Self::build(&cores, idle_spin)
    }

    /// One worker pinned to each of `cores`, backing off as workers do by default.
    pub fn with_cores(cores: &[usize]) -> Result<Arc<Self>, AgentError> {
        Self::build(cores, telvirt_dataplane::worker::IDLE_SPIN)
    }

    fn build(cores: &[usize], idle_spin: Duration) -> Result<Arc<Self>, AgentError> {
        let dp = |e: telvirt_dataplane::Error| AgentError::DataPlane(e.to_string());
        let pool = Arc::new(Pool::new("telvirt", POOL_BUFFERS, DEFAULT_BUF_SIZE).map_err(dp)?);
        let configs: Vec<WorkerConfig> = cores
            .iter()
            .map(|c| WorkerConfig {
                idle_spin,
                ..WorkerConfig::new(&format!("{WORKER_NAME_PREFIX}{c}"), Some(*c))
            })
            .collect();
        let workers = cores
            .iter()
            .enumerate()
            .filter_map(|(i, c)| u32::try_from(*c).ok().map(|c| (c, i)))
            .collect();
        let panel = PatchPanel::new(pool, configs, RING_CAPACITY).map_err(dp)?;
        Ok(Arc::new(Self {
            panel: Mutex::new(panel),
            nodes: Mutex::new(BTreeMap::new()),
            workers,
            progress: Mutex::new(BTreeMap::new()),
            confine_housekeeping: AtomicBool::new(false),
            housekeeping_cores: Mutex::new((0, Vec::new())),
            housekeeping_decided: AtomicU64::new(0),
            busy_forbidden: AtomicBool::new(false),
            held: Mutex::new(BTreeMap::new()),
        }))
    }

    /// Keeps the links of `node` (and the tunnels they use) as they are until
    /// [`NodeDataPlane::release_links`].
    pub fn hold_links(&self, node: &str) {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).insert(
            node.to_owned(),
            HeldSenders {
                since_ns: telvirt_dataplane::packet::now_ns(),
                ..HeldSenders::default()
            },
        );
    }

    /// Ends [`NodeDataPlane::hold_links`]: the next network pass rewires `node` as its networks
    /// say.
    pub fn release_links(&self, node: &str) {
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(node);
    }

    /// The nodes whose links are held.
    pub fn held_nodes(&self) -> BTreeSet<String> {
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    /// What sends to held node `node` now (a network pass tells, after it wired): `local`
    /// links from nodes of this host that send, `quiet` links from held ones, and the tunnels
    /// from other hosts.
    pub fn note_held_senders(
        &self,
        node: &str,
        local: usize,
        quiet: usize,
        tunnels: Vec<Arc<VxlanTunnelStats>>,
    ) {
        if let Some(h) = self
            .held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(node)
        {
            (h.known, h.local, h.quiet, h.tunnels) = (true, local, quiet, tunnels);
        }
    }

    /// Whether every sender of held node `node` rewired since its hold: no link of this host
    /// that sends is wired to it and every tunnel into it passed on its sender's last frame
    /// (its end marker came since the hold). If so, how many links into it stay wired (the
    /// tunnels' and the quiet ones): a ring more on the node is a sender's here whose worker
    /// has not let go of it yet. What still sits on the node's rings is taken by its next
    /// poll.
    pub fn held_senders_done(&self, node: &str) -> Option<usize> {
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let h = held.get(node)?;
        let done =
            h.known && h.local == 0 && h.tunnels.iter().all(|t| t.sender_done_since(h.since_ns));
        done.then_some(h.tunnels.len() + h.quiet)
    }

    /// From now on no worker busy-polls for a node (several hosts simulated on one machine
    /// share its cores).
    pub fn forbid_busy_poll(&self) {
        self.busy_forbidden.store(true, Ordering::Relaxed);
    }

    /// From now on, keep every thread of this process that is not a data-plane worker (the
    /// API, the agent's loops, replication) off the cores whose worker busy-polls for a VNF on
    /// a dedicated core. For a process that owns its data plane (`serve`, `agent`): the change
    /// applies to every thread of the process.
    pub fn confine_housekeeping(&self) {
        self.confine_housekeeping.store(true, Ordering::Relaxed);
        self.rehouse(self.panel());
    }

    /// Whether node `name`'s worker should poll without sleeping for it (a wasm VNF with
    /// `spec.wasm.poll: busy`); housekeeping threads move off or back onto that core. Busy
    /// polling is granted only while at least one of this process's cores stays for
    /// housekeeping (a host whose every core spins starves its own agent): answers whether
    /// the worker busy-polls.
    pub fn set_busy_poll(&self, name: &str, busy: bool) -> Result<bool, AgentError> {
        let mut panel = self.panel();
        let dp = |e: telvirt_dataplane::Error| AgentError::DataPlane(e.to_string());
        panel.set_busy_poll(name, busy).map_err(dp)?;
        let spinning = panel.workers().iter().filter(|w| w.busy_poll()).count();
        let forbidden = self.busy_forbidden.load(Ordering::Relaxed);
        let granted = if busy && (forbidden || spinning >= self.workers.len()) {
            panel.set_busy_poll(name, false).map_err(dp)?;
            false
        } else {
            busy
        };
        self.rehouse(panel);
        Ok(granted)
    }

    /// Decides where housekeeping threads belong as `panel` stands, lets the panel go, then
    /// moves them there.
    fn rehouse(&self, panel: MutexGuard<'_, PatchPanel>) {
        let placement = self.housekeeping_placement(&panel);
        drop(panel);
        self.place_housekeeping(placement);
    }

    /// Where housekeeping threads belong as `panel` stands (`None`: not confined): every
    /// worker's core but those busy-polling (all of them when every one is, which only a worker
    /// configured to busy-poll can cause). Decided under the panel's lock, applied by
    /// [`Self::place_housekeeping`] after it is let go.
    fn housekeeping_placement(&self, panel: &PatchPanel) -> Option<HousekeepingPlacement> {
        if !self.confine_housekeeping.load(Ordering::Relaxed) {
            return None;
        }
        let workers = panel.workers();
        let free: Vec<usize> = self
            .workers
            .iter()
            .filter(|(_, w)| workers.get(**w).is_some_and(|w| !w.busy_poll()))
            .filter_map(|(cpu, _)| usize::try_from(*cpu).ok())
            .collect();
        let cores = if free.is_empty() {
            self.workers
                .keys()
                .filter_map(|c| usize::try_from(*c).ok())
                .collect()
        } else {
            free
        };
        Some(HousekeepingPlacement {
            number: self.housekeeping_decided.fetch_add(1, Ordering::Relaxed) + 1,
            cores,
            worker_tids: workers.iter().map(|w| w.tid()).collect(),
        })
    }

    /// Moves this process's threads but the workers to the placement's cores, walking
    /// `/proc/self/task` without the panel's lock (a network change or a move's switch waits
    /// for no thread list). Skipped when the threads are there already (most calls: every
    /// node removed by a network change) or a placement decided later was applied.
    fn place_housekeeping(&self, placement: Option<HousekeepingPlacement>) {
        let Some(HousekeepingPlacement {
            number,
            cores,
            worker_tids,
        }) = placement
        else {
            return;
        };
        let mut placed = self
            .housekeeping_cores
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if !takes_over(&mut placed, number, &cores) {
            return;
        }
        // Held while moving the threads: two placements never interleave their moves.
        let tasks = match std::fs::read_dir("/proc/self/task") {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(
                    "cannot list this process's threads to keep them off busy cores: {e}"
                );
                return;
            }
        };
        for task in tasks.flatten() {
            let Some(tid) = task
                .file_name()
                .to_str()
                .and_then(|t| t.parse::<i32>().ok())
            else {
                continue;
            };
            if worker_tids.contains(&tid) {
                continue;
            }
            if let Err(e) = set_thread_affinity(tid, &cores) {
                // A thread that ended meanwhile is no news; anything else (a cpuset that
                // forbids the cores) brings back the starvation busy polling must not cause.
                if std::fs::metadata(task.path()).is_ok() {
                    tracing::warn!(tid, "thread not moved to cores {cores:?}: {e}");
                }
            }
        }
    }

    /// The worker pinned to `cpu`, if this process may run there.
    pub fn worker_for_cpu(&self, cpu: u32) -> Option<usize> {
        self.workers.get(&cpu).copied()
    }

    /// CPUs that have a worker.
    pub fn cpus(&self) -> Vec<u32> {
        self.workers.keys().copied().collect()
    }

    /// Exclusive access to the panel (held only for wiring changes and status reads, never
    /// while packets are processed: workers run without this lock).
    pub fn panel(&self) -> MutexGuard<'_, PatchPanel> {
        // A panic while holding the lock left the panel as it was between two calls: every
        // panel method validates before changing anything, so keep using it.
        self.panel.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Places `node` with `ports` on worker `worker`.
    pub fn add_node(
        &self,
        name: &str,
        ports: &[&str],
        worker: usize,
        node: Box<dyn Node>,
    ) -> Result<(), AgentError> {
        let mut panel = self.panel();
        panel
            .add_node(name, ports, worker, node)
            .map_err(|e| AgentError::DataPlane(e.to_string()))?;
        self.node_table().insert(
            name.to_owned(),
            ports.iter().map(|p| (*p).to_owned()).collect(),
        );
        Ok(())
    }

    /// Removes node `name` and its links, returning it.
    pub fn remove_node(&self, name: &str) -> Result<Box<dyn Node>, AgentError> {
        let mut panel = self.panel();
        let node = panel
            .remove_node(name)
            .map_err(|e| AgentError::DataPlane(e.to_string()))?;
        self.node_table().remove(name);
        self.rehouse(panel);
        Ok(node)
    }

    /// The ports of node `name`, if it is on the panel.
    pub fn node_ports(&self, name: &str) -> Option<Vec<String>> {
        self.node_table().get(name).cloned()
    }

    fn node_table(&self) -> MutexGuard<'_, BTreeMap<String, Vec<String>>> {
        self.nodes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Workers whose polling-round counter has not moved for `limit` or longer, by name with
    /// how long (a worker whose thread died, e.g. a node panicked, or that is stuck in a node's
    /// poll). Every call samples the counters, so a stall shows once two calls `limit` apart
    /// saw the same count. While the panel is busy (a wiring change) the last samples answer.
    pub fn stalled_workers(&self, limit: Duration) -> Vec<(String, Duration)> {
        let now = Instant::now();
        let mut seen = self.progress.lock().unwrap_or_else(|p| p.into_inner());
        let panel = try_lock_unpoisoned(&self.panel);
        if let Some(panel) = &panel {
            for (i, worker) in panel.workers().iter().enumerate() {
                let rounds = worker.rounds();
                match seen.get(&i) {
                    Some((_, last, _)) if *last == rounds => {}
                    _ => {
                        seen.insert(i, (worker.config().name.clone(), rounds, now));
                    }
                }
            }
        }
        drop(panel);
        seen.values()
            .map(|(name, _, moved)| (name.clone(), now.duration_since(*moved)))
            .filter(|(_, still)| *still >= limit)
            .collect()
    }

    /// `net show`: the links with their counters and per-node unlinked drops.
    pub fn render(&self) -> String {
        self.panel().render()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use telvirt_dataplane::firewall::{Action, Firewall};
    use telvirt_dataplane::node::{NodeIo, ProcessorNode};

    struct Exploding;

    impl Node for Exploding {
        fn poll(&mut self, _io: &mut NodeIo<'_>) -> usize {
            panic!("node exploded");
        }
    }

    #[test]
    fn a_housekeeping_placement_decided_earlier_never_undoes_a_later_one() {
        let mut placed = (0, Vec::new());
        // The first placement moves the threads; the same cores again do not.
        assert!(takes_over(&mut placed, 1, &[0, 1]));
        assert!(!takes_over(&mut placed, 2, &[0, 1]));
        assert_eq!(placed, (2, vec![0, 1]));
        // Decided as 4 and 3, applied in the other order: 3 is older than what is applied.
        assert!(takes_over(&mut placed, 4, &[0]));
        assert!(!takes_over(&mut placed, 3, &[0, 1]));
        assert_eq!(placed, (4, vec![0]));
        // A later one that finds the threads where it wants them still counts as applied.
        assert!(!takes_over(&mut placed, 6, &[0]));
        assert!(!takes_over(&mut placed, 5, &[1]));
        assert_eq!(placed, (6, vec![0]));
    }

    #[test]
    fn busy_polling_always_leaves_one_core_for_the_hosts_own_threads() {
        let cores = allowed_cores().unwrap();
        let dp = NodeDataPlane::with_cores(&cores).unwrap();
        let fw = || Box::new(ProcessorNode::new(Firewall::new(vec![], Action::Allow), 32));
        let names: Vec<String> = (0..cores.len()).map(|i| format!("fw{i}")).collect();
        for (i, name) in names.iter().enumerate() {
            dp.add_node(name, &["in", "out"], i, fw()).unwrap();
        }
        let (last, others) = names.split_last().unwrap();
        for name in others {
            assert!(dp.set_busy_poll(name, true).unwrap(), "{name}");
        }
        assert!(
            !dp.set_busy_poll(last, true).unwrap(),
            "every core would spin"
        );
        assert!(!dp.panel().workers()[cores.len() - 1].busy_poll());
        // Once another core stops spinning, the last one may.
        if let Some(first) = others.first() {
            drop(dp.remove_node(first).unwrap());
            assert!(dp.set_busy_poll(last, true).unwrap());
        }
        assert!(dp.set_busy_poll("nope", true).is_err());
        dp.forbid_busy_poll();
        assert!(
            !dp.set_busy_poll(last, true).unwrap(),
            "busy polling is forbidden"
        );
    }

    #[test]
    fn a_worker_whose_node_panicked_is_reported_stalled_and_live_ones_are_not() {
        let core = allowed_cores().unwrap()[0];
        let dp = NodeDataPlane::with_cores(&[core]).unwrap();
        let limit = Duration::from_millis(200);
        assert!(dp.stalled_workers(limit).is_empty());
        // Two samples more than `limit` apart on a live worker: its rounds moved.
        std::thread::sleep(limit + Duration::from_millis(100));
        assert_eq!(dp.stalled_workers(limit), Vec::new());

        dp.add_node("boom", &["in"], 0, Box::new(Exploding))
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let stalled = loop {
            let stalled = dp.stalled_workers(limit);
            if !stalled.is_empty() {
                break stalled;
            }
            assert!(
                Instant::now() < deadline,
                "the dead worker was never reported"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(stalled.len(), 1, "{stalled:?}");
        assert_eq!(stalled[0].0, format!("cpu{core}"));
        assert!(stalled[0].1 >= limit, "{stalled:?}");
    }
}
