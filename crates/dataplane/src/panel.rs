//! The patch panel: nodes placed on workers, and the links between their ports, rewired while
//! everything keeps running.
//!
//! Owns the live graph (rings and counters per link); must not read descriptors: the agent
//! turns a `kind: Network` into [`LinkSpec`]s and calls [`PatchPanel::apply`].
//!
//! Rewiring protocol: a removed link's producer is dropped by its source worker between two
//! rounds; the destination keeps draining the old ring until it is empty and then discards it,
//! so no packet already on a link is lost. An added link gets a fresh ring; its consumer is
//! handed to the destination worker before its producer is handed to the source worker.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::capture::LinkTap;
use crate::error::{Error, Result};
use crate::graph::{LinkSpec, LinkStatus, PortRef, render, validate};
use crate::node::{CounterSnapshot, LinkCounters, Node, NodeCounters, NodeDrops, TxLink};
use crate::pool::{Packet, Pool};
use crate::ring;
use crate::worker::{Cmd, Worker, WorkerConfig};

struct NodeEntry {
    id: u64,
    worker: usize,
    ports: Vec<String>,
    drops: Arc<NodeCounters>,
    /// The node wants its worker to poll without sleeping.
    busy: bool,
}

/// Most counters of removed links the panel keeps for links made again between the same ports.
const RETIRED_COUNTERS: usize = 4096;

struct LiveLink {
    to: PortRef,
    serial: u64,
    counters: Arc<LinkCounters>,
}

/// What [`PatchPanel::apply`] changed.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ApplyReport {
    /// Links created.
    pub added: Vec<LinkSpec>,
    /// Links removed.
    pub removed: Vec<LinkSpec>,
    /// Links left as they were (counters kept).
    pub kept: usize,
}

/// Nodes on workers and the links between them.
pub struct PatchPanel {
    pool: Arc<Pool>,
    workers: Vec<Worker>,
    nodes: BTreeMap<String, NodeEntry>,
    links: BTreeMap<PortRef, LiveLink>,
    ring_capacity: usize,
    next_id: u64,
    /// Links per named network service (`kind: Network`), when `apply_network` is used.
    networks: BTreeMap<String, Vec<LinkSpec>>,
    /// Counters of removed links, handed back when the same link is made again (a probe that
    /// paused it, a re-apply, a restarted VNF), so a link's counters only grow. A network's go
    /// when it is deleted; at most [`RETIRED_COUNTERS`] are kept.
    retired: BTreeMap<LinkSpec, Arc<LinkCounters>>,
    /// Per network, links `remove_node` took out of it (their counters retired).
    stripped: BTreeMap<String, std::collections::BTreeSet<LinkSpec>>,
    /// The final drops of removed nodes, by name, with the order of their removal: readable
    /// until a node of that name is added again (which starts from zero) or they are forgotten;
    /// at most [`RETIRED_COUNTERS`], the earliest removed go first.
    retired_drops: BTreeMap<String, (u64, NodeDrops)>,
}

impl PatchPanel {
    /// Start one worker per entry of `workers`; links get rings of `ring_capacity` slots.
    pub fn new(pool: Arc<Pool>, workers: Vec<WorkerConfig>, ring_capacity: usize) -> Result<Self> {
        if workers.is_empty() {
            return Err(Error::config(
                "panel.workers",
                "at least one worker is needed",
            ));
        }
        // Validate the capacity once, up front, with the ring's own rule.
        drop(ring::channel::<u64>("probe", ring_capacity)?);
        let workers = workers
            .into_iter()
            .map(|w| Worker::spawn(w, Arc::clone(&pool)))
            .collect::<Result<Vec<_>>>()?;
        Ok(PatchPanel {
            pool,
            workers,
            nodes: BTreeMap::new(),
            links: BTreeMap::new(),
            ring_capacity,
            next_id: 1,
            networks: BTreeMap::new(),
            retired: BTreeMap::new(),
            stripped: BTreeMap::new(),
            retired_drops: BTreeMap::new(),
        })
    }

    /// The shared packet pool.
    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// The workers.
    pub fn workers(&self) -> &[Worker] {
        &self.workers
    }

    /// Place `node` (with the given port names, in port-index order) on worker `worker`.
    pub fn add_node(
        &mut self,
        name: &str,
        ports: &[&str],
        worker: usize,
        node: Box<dyn Node>,
    ) -> Result<()> {
        if name.is_empty() || name.contains(['.', ' ']) {
            return Err(Error::Graph(format!(
                "node name {name:?} must be non-empty without '.' or ' '"
            )));
        }
        if self.nodes.contains_key(name) {
            return Err(Error::Graph(format!("node {name} already exists")));
        }
        let w = self.workers.get(worker).ok_or_else(|| {
            Error::config(
                "worker",
                format!("{worker} is not a worker index (0..{})", self.workers.len()),
            )
        })?;
        for (i, p) in ports.iter().enumerate() {
            if ports[..i].contains(p) {
                return Err(Error::Graph(format!(
                    "node {name}: port {p:?} listed twice"
                )));
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        self.retired_drops.remove(name);
        let drops = Arc::new(NodeCounters::default());
        w.send(vec![Cmd::AddNode {
            id,
            node,
            ports: ports.len(),
            node_drops: Arc::clone(&drops),
        }]);
        self.nodes.insert(
            name.to_string(),
            NodeEntry {
                id,
                worker,
                ports: ports.iter().map(|s| s.to_string()).collect(),
                drops,
                busy: false,
            },
        );
        Ok(())
    }

    /// Remove node `name` (and every link touching it), returning the node so the caller can
    /// read its final state (e.g. a sink's histogram).
    pub fn remove_node(&mut self, name: &str) -> Result<Box<dyn Node>> {
        if !self.nodes.contains_key(name) {
            return Err(Error::Graph(format!("unknown node {name:?}")));
        }
        let keep: Vec<LinkSpec> = self
            .current_links()
            .into_iter()
            .filter(|l| l.from.node != name && l.to.node != name)
            .collect();
        self.apply(&keep)?;
        for (net, links) in self.networks.iter_mut() {
            let (gone, kept): (Vec<LinkSpec>, Vec<LinkSpec>) = links
                .drain(..)
                .partition(|l| l.from.node == name || l.to.node == name);
            *links = kept;
            // Their counters are retired; deleting the network must still forget them.
            self.stripped.entry(net.clone()).or_default().extend(gone);
        }
        let e = self
            .nodes
            .remove(name)
            .expect("invariant: node checked present above");
        self.update_busy_poll(e.worker);
        let node = self.workers[e.worker]
            .remove_node(e.id)
            .ok_or_else(|| Error::Graph(format!("worker of {name} stopped")))?;
        // Off its worker: its drops are final.
        if self.retired_drops.len() >= RETIRED_COUNTERS
            && let Some(earliest) = self
                .retired_drops
                .iter()
                .min_by_key(|(_, (order, _))| *order)
                .map(|(n, _)| n.clone())
        {
            self.retired_drops.remove(&earliest);
        }
        self.retired_drops
            .insert(name.to_owned(), (e.id, e.drops.snapshot()));
        Ok(node)
    }

    /// The links now in force.
    pub fn current_links(&self) -> Vec<LinkSpec> {
        self.links
            .iter()
            .map(|(from, l)| LinkSpec::new(from.clone(), l.to.clone()))
            .collect()
    }

    /// Make the live links exactly `links`: validate the whole set first (on error nothing
    /// changes), then remove and add only the difference, without stopping any node. Use
    /// either this or the per-network [`PatchPanel::apply_network`], not both.
    pub fn apply(&mut self, links: &[LinkSpec]) -> Result<ApplyReport> {
        validate(&self.port_table(), links)?;
        let current = self.current_links();
        let removed: Vec<LinkSpec> = current
            .iter()
            .filter(|l| !links.contains(l))
            .cloned()
            .collect();
        let added: Vec<LinkSpec> = links
            .iter()
            .filter(|l| !current.contains(l))
            .cloned()
            .collect();
        // Build all new rings before changing anything, so a failure leaves the panel as it was.
        let mut fresh = Vec::with_capacity(added.len());
        for l in &added {
            let (p, c) = ring::channel::<Packet>(&l.to_string(), self.ring_capacity)?;
            fresh.push((l.clone(), p, c));
        }
        // One batch per worker: a worker applies a batch whole before it polls again, so a
        // node never takes packets from a new incoming link while its new outgoing link is
        // still on the way (it would drop them as unlinked; a worker woken by the first of two
        // sends made that window real). Old sending ends go before new ones on the same port.
        let mut batches: Vec<Vec<Cmd>> = (0..self.workers.len()).map(|_| Vec::new()).collect();
        for l in &removed {
            let (id, w, port) = self.locate(&l.from);
            // Incoming links of the same node removed in this change: the node forwards what
            // is still queued on them before its old outgoing link goes (ADR 022).
            let after: Vec<u64> = removed
                .iter()
                .filter(|r| r.to.node == l.from.node)
                .filter_map(|r| self.links.get(&r.from).map(|x| x.serial))
                .collect();
            batches[w].push(Cmd::DetachTx { id, port, after });
        }
        for l in &removed {
            if let Some(gone) = self.links.remove(&l.from) {
                if self.retired.len() >= RETIRED_COUNTERS {
                    self.retired.pop_first();
                }
                self.retired.insert(l.clone(), gone.counters);
            }
        }
        for (l, producer, consumer) in fresh {
            let (did, dw, dport) = self.locate(&l.to);
            let serial = self.next_id;
            self.next_id += 1;
            batches[dw].push(Cmd::AttachRx {
                id: did,
                port: dport,
                serial,
                rx: consumer,
            });
            let counters = self
                .retired
                .remove(&l)
                .unwrap_or_else(|| Arc::new(LinkCounters::starting_now()));
            let (sid, sw, sport) = self.locate(&l.from);
            batches[sw].push(Cmd::AttachTx {
                id: sid,
                port: sport,
                tx: TxLink {
                    ring: producer,
                    counters: Arc::clone(&counters),
                    bell: (sw != dw).then(|| Arc::clone(self.workers[dw].doorbell())),
                },
            });
            self.links.insert(
                l.from.clone(),
                LiveLink {
                    to: l.to.clone(),
                    serial,
                    counters,
                },
            );
        }
        for (w, cmds) in batches.into_iter().enumerate() {
            if !cmds.is_empty() {
                self.workers[w].send(cmds);
            }
        }
        Ok(ApplyReport {
            kept: links.len() - added.len(),
            added,
            removed,
        })
    }

    /// Create or change the network service `name`: the live links become the union of every
    /// network's links. The new links are validated on their own first (errors name this
    /// network's links), then together with the other networks (a port used by two networks is
    /// refused). On any error nothing changes. Other networks' links are not touched.
    pub fn apply_network(&mut self, name: &str, links: &[LinkSpec]) -> Result<ApplyReport> {
        if name.is_empty() {
            return Err(Error::Graph("network name must not be empty".into()));
        }
        let ports = self.port_table();
        validate(&ports, links).map_err(|e| prefix(name, e))?;
        let union: Vec<LinkSpec> = self
            .networks
            .iter()
            .filter(|(n, _)| n.as_str() != name)
            .flat_map(|(_, l)| l.iter().cloned())
            .chain(links.iter().cloned())
            .collect();
        validate(&ports, &union).map_err(|e| {
            Error::Graph(format!(
                "network {name} conflicts with another network: {}",
                strip(e)
            ))
        })?;
        let report = self.apply(&union)?;
        self.networks.insert(name.to_string(), links.to_vec());
        Ok(report)
    }

    /// Delete the network service `name`: its links go, the others stay.
    pub fn delete_network(&mut self, name: &str) -> Result<ApplyReport> {
        if !self.networks.contains_key(name) {
            return Err(Error::Graph(format!(
                "unknown network {name:?} (known: {})",
                self.networks.keys().cloned().collect::<Vec<_>>().join(", ")
            )));
        }
        let union: Vec<LinkSpec> = self
            .networks
            .iter()
            .filter(|(n, _)| n.as_str() != name)
            .flat_map(|(_, l)| l.iter().cloned())
            .collect();
        let report = self.apply(&union)?;
        let stripped = self.stripped.remove(name).unwrap_or_default();
        if let Some(gone) = self.networks.remove(name) {
            for l in gone.iter().chain(&stripped) {
                self.retired.remove(l);
            }
        }
        Ok(report)
    }

    /// Names of the network services applied with [`PatchPanel::apply_network`].
    pub fn networks(&self) -> Vec<String> {
        self.networks.keys().cloned().collect()
    }

    /// The port names of node `name`, if it is on the panel.
    pub fn node_ports(&self, name: &str) -> Option<&[String]> {
        self.nodes.get(name).map(|e| e.ports.as_slice())
    }

    /// The worker node `name` runs on, if it is on the panel.
    pub fn worker_of(&self, name: &str) -> Option<usize> {
        self.nodes.get(name).map(|e| e.worker)
    }

    fn port_table(&self) -> BTreeMap<String, Vec<String>> {
        self.nodes
            .iter()
            .map(|(n, e)| (n.clone(), e.ports.clone()))
            .collect()
    }

    fn locate(&self, p: &PortRef) -> (u64, usize, usize) {
        let e = self
            .nodes
            .get(&p.node)
            .expect("invariant: validated links name existing nodes");
        let port = e
            .ports
            .iter()
            .position(|x| *x == p.port)
            .expect("invariant: validated links name existing ports");
        (e.id, e.worker, port)
    }

    /// Every live link with its counters.
    pub fn status(&self) -> Vec<LinkStatus> {
        self.links
            .iter()
            .map(|(from, l)| LinkStatus {
                link: LinkSpec::new(from.clone(), l.to.clone()),
                counters: l.counters.snapshot(),
            })
            .collect()
    }

    /// Whether node `name` wants its worker to poll without sleeping when idle (a VNF on a
    /// dedicated core). A worker busy-polls while any of its nodes wants it, and backs off
    /// when idle otherwise (the worker's own `busy_poll` setting counts as a wish too).
    pub fn set_busy_poll(&mut self, name: &str, busy: bool) -> Result<()> {
        let e = self
            .nodes
            .get_mut(name)
            .ok_or_else(|| Error::Graph(format!("unknown node {name:?}")))?;
        e.busy = busy;
        let worker = e.worker;
        self.update_busy_poll(worker);
        Ok(())
    }

    fn update_busy_poll(&self, worker: usize) {
        if let Some(w) = self.workers.get(worker) {
            let wanted =
                w.config().busy_poll || self.nodes.values().any(|e| e.worker == worker && e.busy);
            w.set_busy_poll(wanted);
        }
    }

    /// Arm `tap` on live link `link`: it takes the frames the link's sender puts on it from now
    /// on. Refused when the link is not live or another capture of it runs.
    pub fn tap_link(&self, link: &LinkSpec, tap: Arc<LinkTap>) -> Result<()> {
        let live = self
            .live_link(link)
            .ok_or_else(|| Error::Graph(format!("link {link} is not live on this data plane")))?;
        if !live.counters.tap.arm(tap) {
            return Err(Error::Graph(format!(
                "link {link} is being captured already; one capture of a link runs at a time"
            )));
        }
        Ok(())
    }

    /// Disarm `tap` from `link` (wherever the link's counters are now: live or retired).
    pub fn untap_link(&self, link: &LinkSpec, tap: &Arc<LinkTap>) {
        if let Some(c) = self.counters_of(link) {
            c.tap.disarm(tap);
        }
    }

    /// What node `name` dropped outside any link (unlinked ports, its own verdicts), if it is
    /// on the panel or was (its final count, until a node of that name comes back or
    /// [`PatchPanel::forget_node_drops`]).
    pub fn node_drops(&self, name: &str) -> Option<NodeDrops> {
        match self.nodes.get(name) {
            Some(e) => Some(e.drops.snapshot()),
            None => self.retired_drops.get(name).map(|(_, d)| *d),
        }
    }

    /// Counts `packets` as dropped by node `name`'s own doing (frames it held outside the
    /// panel and will not deliver), on the panel or removed (its final drops); false when it
    /// is neither.
    pub fn count_refused(&mut self, name: &str, packets: u64) -> bool {
        if let Some(e) = self.nodes.get(name) {
            e.drops
                .refused
                .fetch_add(packets, std::sync::atomic::Ordering::Relaxed);
            return true;
        }
        match self.retired_drops.get_mut(name) {
            Some((_, d)) => {
                d.refused += packets;
                true
            }
            None => false,
        }
    }

    /// Forgets the final drops of removed node `name` (a node on the panel keeps its own).
    pub fn forget_node_drops(&mut self, name: &str) {
        self.retired_drops.remove(name);
    }

    /// The counters of `link`, live or removed (until the same link is made again or its
    /// network deleted).
    pub fn link_counters(&self, link: &LinkSpec) -> Option<CounterSnapshot> {
        self.counters_of(link).map(|c| c.snapshot())
    }

    /// `link` if it is live.
    fn live_link(&self, link: &LinkSpec) -> Option<&LiveLink> {
        self.links.get(&link.from).filter(|l| l.to == link.to)
    }

    /// The counters of `link` wherever they are now: live or retired.
    fn counters_of(&self, link: &LinkSpec) -> Option<&Arc<LinkCounters>> {
        self.live_link(link)
            .map(|l| &l.counters)
            .or_else(|| self.retired.get(link))
    }

    /// Nodes that dropped packets outside any link, with what they dropped.
    pub fn nodes_with_drops(&self) -> Vec<(String, NodeDrops)> {
        self.nodes
            .iter()
            .map(|(n, e)| (n.clone(), e.drops.snapshot()))
            .filter(|(_, d)| *d != NodeDrops::default())
            .collect()
    }

    /// The `telvirt net show` text: the link table, then nodes that dropped packets outside
    /// any link.
    pub fn render(&self) -> String {
        let mut out = render(&self.status());
        for (node, drops) in self.nodes_with_drops() {
            out.push_str(&render_node_drops(&node, drops.unlinked, drops.refused));
        }
        out
    }

    /// Wait until every worker has applied every command sent so far: asked of all of them
    /// first, then waited for, so the wait is the slowest worker's, not the sum.
    pub fn barrier(&self) {
        let answers: Vec<_> = self.workers.iter().map(|w| w.barrier_sent()).collect();
        for answer in answers {
            let _ = answer.recv();
        }
    }

    /// Stop all workers (nodes are dropped).
    pub fn shutdown(mut self) {
        for w in &mut self.workers {
            w.stop();
        }
    }
}

fn strip(e: Error) -> String {
    match e {
        Error::Graph(m) => m,
        other => other.to_string(),
    }
}

fn prefix(network: &str, e: Error) -> Error {
    Error::Graph(format!("network {network}: {}", strip(e)))
}

/// One line of `net show` for a node that dropped packets outside any link.
pub fn render_node_drops(node: &str, unlinked: u64, refused: u64) -> String {
    format!(
        "{node}: {unlinked} packets dropped on unlinked ports, {refused} dropped by the node \
         itself (its verdict, a failed batch, a frame a VM's NIC could not pass)\n"
    )
}
