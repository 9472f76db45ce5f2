//! The node's data plane as the agent sees it: one [`PatchPanel`] per agent process, with one
//! worker thread pinned to each CPU this process may run on, shared by the wasm runtime adapter
//! (which places VNF nodes on the worker of their allocated core) and the network reconciler
//! (which applies `kind: Network` links).
//!
//! Owns the panel's lifetime, the core → worker mapping and the built-in nodes networks may
//! name. It must not decide placement (the scheduler does) nor parse descriptors beyond mapping
//! them onto the data plane's own types.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use telvirt_dataplane::node::Node;
use telvirt_dataplane::panel::PatchPanel;
use telvirt_dataplane::pool::{DEFAULT_BUF_SIZE, Pool};
use telvirt_dataplane::worker::{WorkerConfig, allowed_cores};

use crate::AgentError;

/// Packet buffers in the node's pool.
pub const POOL_BUFFERS: usize = 16384;
/// Slots per link ring.
pub const RING_CAPACITY: usize = 1024;

/// The agent's patch panel and which worker runs on which core.
pub struct NodeDataPlane {
    panel: Mutex<PatchPanel>,
    /// Node name → port names, of every node on the panel.
    nodes: Mutex<BTreeMap<String, Vec<String>>>,
    /// Linux CPU → index of the worker pinned to it.
    workers: BTreeMap<u32, usize>,
}

impl NodeDataPlane {
    /// One worker per CPU in this process's affinity mask, pinned to it, backing off when idle.
    pub fn new() -> Result<Arc<Self>, AgentError> {
        let cores = allowed_cores().map_err(|e| AgentError::DataPlane(e.to_string()))?;
        Self::with_cores(&cores)
    }

    /// One worker pinned to each of `cores`.
    pub fn with_cores(cores: &[usize]) -> Result<Arc<Self>, AgentError> {
        let dp = |e: telvirt_dataplane::Error| AgentError::DataPlane(e.to_string());
        let pool = Arc::new(Pool::new("telvirt", POOL_BUFFERS, DEFAULT_BUF_SIZE).map_err(dp)?);
        let configs: Vec<WorkerConfig> = cores
            .iter()
            .map(|c| WorkerConfig::new(&format!("cpu{c}"), Some(*c)))
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
        }))
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
        Ok(node)
    }

    /// The ports of node `name`, if it is on the panel.
    pub fn node_ports(&self, name: &str) -> Option<Vec<String>> {
        self.node_table().get(name).cloned()
    }

    fn node_table(&self) -> MutexGuard<'_, BTreeMap<String, Vec<String>>> {
        self.nodes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `net show`: the links with their counters and per-node unlinked drops.
    pub fn render(&self) -> String {
        self.panel().render()
    }
}
