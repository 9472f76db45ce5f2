//! The network reconciler: makes the node's patch panel hold the links of every wanted
//! `kind: Network`, without stopping any VNF.
//!
//! Owns mapping network descriptors onto the data plane (links, built-in generator and sink
//! nodes, host ports) and reporting each network's live links and counters. A link whose end is
//! not on the panel yet (a VNF still starting, a host interface that cannot be opened) waits and
//! is wired by a later pass. It must not validate networks against VNFs (the controller does)
//! nor start VNFs (the runtimes do).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use std::time::{Duration, Instant};

use telvirt_api::{CaptureChunk, CaptureSlice, NetworkSpan};
use telvirt_dataplane::afpacket::{HostPort, HostPortStats, RxMode};
use telvirt_dataplane::graph::{self, LinkSpec, PortRef};
use telvirt_dataplane::latency::{ChainLatencyOpts, ChainProbe};
use telvirt_dataplane::node::{NodeDrops, ProcessorNode};
use telvirt_dataplane::steering::{self, SteeringNode};
use telvirt_dataplane::traffic::{GenConfig, Generator, LatencySink, SinkState, SinkSummary};
use telvirt_dataplane::vxlan::{self, VxlanEndpoint, VxlanTunnelStats};
use telvirt_model::network::{
    BuiltinKind, BuiltinNode, DepartedCounts, Endpoint, HostPortStatus, InstanceCount,
    LatencyReport, LinkState, NetworkDescriptor, NetworkStatus, NodeDropState, ResolvedProbe,
    SINK_LATENCY_BOUNDS_NS, SinkStatus, SteeringEndpoint, SteeringState, TunnelEndpointStatus,
};

use crate::AgentError;
use crate::capture::Captures;
use crate::dataplane::NodeDataPlane;

/// Default generator rate.
pub const DEFAULT_RATE_PPS: u64 = 10_000;

/// A tunnel node a network placed: its counters, and the peer endpoint and VNI it was made for.
struct PlacedTunnel {
    stats: Arc<VxlanTunnelStats>,
    remote: SocketAddr,
    vni: u32,
}

struct Applied {
    descriptor: NetworkDescriptor,
    /// Links wired now.
    live: Vec<LinkSpec>,
    /// Why other links are not.
    waiting: Vec<String>,
    /// Built-in nodes this network placed, as they were placed.
    builtins: BTreeMap<String, BuiltinNode>,
    /// A latency probe runs through this network: passes leave its links alone.
    probing: bool,
    sinks: BTreeMap<String, Arc<Mutex<SinkState>>>,
    /// Steering endpoints this network placed, by name.
    endpoints: BTreeMap<String, PlacedEndpoint>,
    /// Where the network's nodes are, when they are on several hosts (`None`: all here).
    span: Option<NetworkSpan>,
    /// Tunnel nodes this network placed (one per other host it links to), by node name, with
    /// their counters.
    tunnels: BTreeMap<String, PlacedTunnel>,
    /// Tunnels no link needs any more, since when: they go after [`TUNNEL_LINGER`], and
    /// meanwhile send on what their incoming rings still hold.
    retiring: BTreeMap<String, Instant>,
}

/// How long a tunnel no link needs stays on the panel: what was queued for it when its link
/// was rewired (a VNF moved to another host) still leaves through it.
const TUNNEL_LINGER: Duration = Duration::from_secs(1);

impl Applied {
    /// The host of `node` (a node name, or `host:IF`) when the network spans hosts.
    fn host_of(&self, node: &str) -> Option<&str> {
        self.span
            .as_ref()
            .and_then(|s| s.hosts.get(node))
            .map(String::as_str)
    }
}

/// A steering endpoint on the panel.
struct PlacedEndpoint {
    /// The endpoint as the descriptor gave it when it was placed (without `active`).
    spec: SteeringEndpoint,
    /// The instance ports it mirrors.
    ports: Vec<String>,
    endpoint: Arc<steering::Endpoint>,
}

/// How long a latency probe waits for its network to reach this node's data plane (a network
/// applied just before the probe) before it is refused.
const PROBE_APPLY_WAIT: Duration = Duration::from_secs(5);

/// Applies networks to one [`NodeDataPlane`].
pub struct NetworkReconciler {
    dp: Arc<NodeDataPlane>,
    /// This host's name, as the controller's network spans name it.
    host: String,
    /// Where links from other hosts arrive, when this host has a tunnel address.
    vxlan: Option<Arc<VxlanEndpoint>>,
    applied: Mutex<BTreeMap<String, Applied>>,
    /// Held for the length of a latency probe (its node names are fixed).
    probe_lock: Mutex<()>,
    captures: Captures,
    /// Host ports opened on the panel (they stay for the agent's life), by node name.
    host_ports: Mutex<BTreeMap<String, OpenHostPort>>,
    /// How host ports are opened.
    host_port_mode: RxMode,
    /// The endpoint's drops the last pass saw (no tunnel, queued in removed tunnels, in
    /// the kernel): a pass that finds more says so in the log.
    endpoint_drops_seen: Mutex<[u64; 3]>,
    /// The final counts of networks this host left, by name, one entry per departure, oldest
    /// first (at most [`DEPARTED_KEPT`] networks, [`DEPARTURES_KEPT`] departures each).
    departed: Mutex<BTreeMap<String, Vec<DepartedCounts>>>,
    /// Notified when a network left this host.
    departed_changed: Arc<tokio::sync::Notify>,
    /// Where the final counts are kept across restarts of the agent (none: in memory only).
    departures_file: Option<std::path::PathBuf>,
}

/// Largest departures file read back (the ledger's bounds keep it far below).
const MAX_DEPARTURES_FILE: u64 = 16 << 20;

/// Networks whose final counts on a host they left its agent keeps (those that left last): as
/// many as its heartbeat may name.
const DEPARTED_KEPT: usize = telvirt_api::MAX_DEPARTED_NAMED;
/// Departures of one network (by name) whose counts its agent keeps apart (the latest): the
/// controller keeps those of the network it shows, not of an earlier one of that name.
const DEPARTURES_KEPT: usize = 16;

/// When the latest of `departures` left.
fn last_left(departures: &[DepartedCounts]) -> &str {
    departures.last().map_or("", |d| d.left_at.as_str())
}

/// Keeps the ledger of final counts within its bounds: the latest [`DEPARTURES_KEPT`]
/// departures of a network, the [`DEPARTED_KEPT`] networks that left last.
fn keep_within_bounds(kept: &mut BTreeMap<String, Vec<DepartedCounts>>) {
    for list in kept.values_mut() {
        let extra = list.len().saturating_sub(DEPARTURES_KEPT);
        list.drain(..extra);
    }
    while kept.len() > DEPARTED_KEPT {
        let Some(oldest) = kept
            .iter()
            .min_by(|x, y| last_left(x.1).cmp(last_left(y.1)))
            .map(|(n, _)| n.clone())
        else {
            break;
        };
        kept.remove(&oldest);
    }
}

/// What `net show` reports of an open host port.
struct OpenHostPort {
    interface: String,
    socket: &'static str,
    af_xdp_refused: Option<String>,
    af_xdp_queues: Option<u32>,
    stats: Arc<HostPortStats>,
}

fn port_ref(ep: &Endpoint) -> PortRef {
    match ep {
        Endpoint::Port { node, port } => PortRef::new(node, port),
        Endpoint::Host { ifname, .. } => PortRef::host(ifname),
    }
}

fn host_node(ifname: &str) -> String {
    format!("host:{ifname}")
}

fn dp_err(e: telvirt_dataplane::Error) -> AgentError {
    AgentError::DataPlane(e.to_string())
}

impl NetworkReconciler {
    pub fn new(dp: Arc<NodeDataPlane>) -> Self {
        Self {
            dp,
            host: String::new(),
            vxlan: None,
            applied: Mutex::new(BTreeMap::new()),
            probe_lock: Mutex::new(()),
            captures: Captures::default(),
            host_ports: Mutex::new(BTreeMap::new()),
            host_port_mode: RxMode::Auto,
            endpoint_drops_seen: Mutex::new([0; 3]),
            departed: Mutex::new(BTreeMap::new()),
            departed_changed: Arc::new(tokio::sync::Notify::new()),
            departures_file: None,
        }
    }

    /// Keeps the final counts of the networks that left this host in `file` as well (written
    /// at each departure) and takes those it holds now: a restarted agent still shows them. A
    /// file that cannot be read is said in the log and left to be replaced.
    pub fn with_departures_file(mut self, file: std::path::PathBuf) -> Self {
        match read_departures(&file) {
            Ok(kept) => {
                *self.departed.get_mut().unwrap_or_else(|p| p.into_inner()) = kept;
            }
            Err(why) => {
                tracing::warn!(file = %file.display(), "final counts of networks that left this host not read back: {why}")
            }
        }
        self.departures_file = Some(file);
        self
    }

    /// Host ports opened as `mode` says (default: AF_XDP where the interface allows it).
    pub fn with_host_port_mode(mut self, mode: RxMode) -> Self {
        self.host_port_mode = mode;
        self
    }

    /// The reconciler of host `host`, carrying links to other hosts through `vxlan` (none:
    /// such links wait).
    pub fn with_host(mut self, host: &str, vxlan: Option<Arc<VxlanEndpoint>>) -> Self {
        self.host = host.to_owned();
        self.vxlan = vxlan;
        self
    }

    /// Whether node `node` of `a` is on this host (every node is when the network spans
    /// none).
    fn is_local(&self, a: &Applied, node: &str) -> bool {
        a.host_of(node).is_none_or(|h| h == self.host)
    }

    /// The tunnel node of descriptor link `link` of network `name` to or from host `peer`:
    /// each link between hosts has its own tunnel (and VNI), so two links in the same
    /// direction between the same two hosts stay apart. A host name's dots (which node names
    /// cannot hold) become ':' (which host names cannot hold), so names stay distinct.
    fn tunnel_name(name: &str, link: usize, peer: &str) -> String {
        vxlan::tunnel_node(&format!("{name}/{link}@{}", peer.replace('.', ":")))
    }

    /// Takes tunnel node `node` of network `a` off the panel and out of `a`'s records.
    fn remove_tunnel(&self, a: &mut Applied, node: &str) {
        let _ = self.dp.remove_node(node);
        a.tunnels.remove(node);
        a.retiring.remove(node);
    }

    /// Makes the tunnel of link `link` of network `a` to host `peer` present; its port, or why
    /// not into `waiting`.
    fn ensure_tunnel(
        &self,
        name: &str,
        a: &mut Applied,
        link: usize,
        peer: &str,
        waiting: &mut Vec<String>,
    ) -> Option<PortRef> {
        let node = Self::tunnel_name(name, link, peer);
        let port = PortRef::new(&node, vxlan::TUNNEL_PORT);
        let Some(span) = &a.span else {
            // Without a span nothing can be made: only a tunnel still on the panel serves.
            let present = a.tunnels.contains_key(&node) && self.dp.node_ports(&node).is_some();
            return present.then_some(port);
        };
        let Some(endpoint) = &self.vxlan else {
            waiting.push(format!(
                "links to host {peer} wait: this host has no tunnel address (telvirt agent --tunnel-address)"
            ));
            return None;
        };
        let Some(remote) = span.tunnels.get(peer) else {
            waiting.push(format!(
                "links to host {peer} wait: it has no tunnel address (telvirt agent --tunnel-address)"
            ));
            return None;
        };
        let remote: SocketAddr = match remote.parse() {
            Ok(r) => r,
            Err(e) => {
                waiting.push(format!("host {peer}'s tunnel address {remote}: {e}"));
                return None;
            }
        };
        let Some(vni) = span.link_vni(link) else {
            waiting.push(format!(
                "spec.links[{link}] to host {peer} waits: network {name} holds no VNI for it (it was stored before each link had one; apply it again)"
            ));
            return None;
        };
        if let Some(t) = a.tunnels.get(&node)
            && self.dp.node_ports(&node).is_some()
        {
            if (t.remote, t.vni) == (remote, vni) {
                return Some(port);
            }
            // The peer's tunnel address or the link's VNI changed (a host renumbered, a
            // network given a new block): the tunnel is made again, so nothing more goes to,
            // or is taken from, the old address under the old VNI.
            self.remove_tunnel(a, &node);
        }
        let placed = endpoint.tunnel(remote, vni).map_err(dp_err).and_then(|t| {
            let stats = t.stats();
            self.dp
                .add_node(&node, &[vxlan::TUNNEL_PORT], 0, Box::new(t))
                .map(|()| stats)
        });
        match placed {
            Ok(stats) => {
                a.tunnels.insert(node, PlacedTunnel { stats, remote, vni });
                Some(port)
            }
            Err(e) => {
                waiting.push(format!("tunnel to host {peer}: {e}"));
                None
            }
        }
    }

    /// How descriptor link `link` of `a` is wired on this host: both ends here, one end
    /// through the tunnel to the other end's host, or not here at all (`None`).
    fn local_spec(
        &self,
        name: &str,
        a: &Applied,
        index: usize,
        link: &telvirt_model::network::Link,
    ) -> Option<LinkSpec> {
        let from_host = a.host_of(&link.from.node_key());
        let to_host = a.host_of(&link.to.node_key());
        let here = |h: Option<&str>| h.is_none_or(|h| h == self.host);
        match (here(from_host), here(to_host)) {
            (true, true) => Some(LinkSpec::new(port_ref(&link.from), port_ref(&link.to))),
            (true, false) => Some(LinkSpec::new(
                port_ref(&link.from),
                PortRef::new(
                    &Self::tunnel_name(name, index, to_host?),
                    vxlan::TUNNEL_PORT,
                ),
            )),
            (false, true) => Some(LinkSpec::new(
                PortRef::new(
                    &Self::tunnel_name(name, index, from_host?),
                    vxlan::TUNNEL_PORT,
                ),
                port_ref(&link.to),
            )),
            (false, false) => None,
        }
    }

    /// The worker each host port of network `name` runs on: that of what the first of its
    /// links here (in the descriptor's order) joins it to, where that is on the panel (a VNF's
    /// own core: its frames cross no ring between threads and no worker that sleeps when
    /// idle); worker 0, the host's own, when nothing it links to is here.
    fn host_port_workers(&self, name: &str, a: &Applied) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        let panel = self.dp.panel();
        for (i, link) in a.descriptor.parsed_links() {
            let Some(spec) = self.local_spec(name, a, i, &link) else {
                continue;
            };
            for (end, other) in [(&spec.from, &spec.to), (&spec.to, &spec.from)] {
                if end.is_host()
                    && !out.contains_key(&end.node)
                    && let Some(w) = panel.worker_of(&other.node)
                {
                    out.insert(end.node.clone(), w);
                }
            }
        }
        out
    }

    fn applied(&self) -> MutexGuard<'_, BTreeMap<String, Applied>> {
        self.applied.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn add_builtin(&self, b: &BuiltinNode) -> Result<Option<Arc<Mutex<SinkState>>>, AgentError> {
        match b.kind {
            BuiltinKind::Generator => {
                let cfg = GenConfig {
                    flows: b.flows.unwrap_or(1),
                    sizes: vec![b.size.map_or(64, |s| s as usize)],
                    rate_pps: Some(b.rate_pps.unwrap_or(DEFAULT_RATE_PPS)),
                    count: None,
                    ..GenConfig::default()
                };
                let buf = self.dp.panel().pool().buf_size();
                let node = Generator::new(cfg, buf).map_err(dp_err)?;
                self.dp
                    .add_node(b.name.as_str(), &["out"], 0, Box::new(node))?;
                Ok(None)
            }
            BuiltinKind::Sink => {
                let sink = LatencySink::new(telvirt_dataplane::node::BATCH);
                let state = sink.state();
                self.dp
                    .add_node(b.name.as_str(), &["in"], 0, Box::new(sink))?;
                Ok(Some(state))
            }
        }
    }

    /// Places steering endpoint `e` mirroring `ports`, pointing at `e`'s active instance.
    fn add_endpoint(
        &self,
        e: &SteeringEndpoint,
        ports: &[String],
    ) -> Result<PlacedEndpoint, AgentError> {
        let instances: Vec<&str> = e.instances.iter().map(|n| n.as_str()).collect();
        let active = e.active_instance().map_or("", |n| n.as_str());
        let endpoint =
            steering::Endpoint::new(e.name.as_str(), &instances, active).map_err(dp_err)?;
        let port_refs: Vec<&str> = ports.iter().map(String::as_str).collect();
        let node = SteeringNode::new(Arc::clone(&endpoint), &port_refs).map_err(dp_err)?;
        let names = node.port_names();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        self.dp.add_node(
            e.name.as_str(),
            &names,
            0,
            Box::new(ProcessorNode::new(node, telvirt_dataplane::node::BATCH)),
        )?;
        let mut spec = e.clone();
        spec.active = None;
        Ok(PlacedEndpoint {
            spec,
            ports: ports.to_vec(),
            endpoint,
        })
    }

    /// Takes network `name` (applied as `a`) off this host, keeping its final counts here
    /// ([`DepartedCounts`]): its own nodes go first (nothing counts after), then its links'
    /// counters (live, or retired with an end that left), its own nodes' drops, those of the
    /// VNFs it names that left the panel, and its sinks' are read, then its links go. The
    /// drops read are forgotten by the panel: counted once, here (a VNF two networks name is
    /// counted by the first that leaves).
    fn depart(&self, name: &str, a: &Applied) {
        let d = &a.descriptor;
        let own: Vec<&String> = a.builtins.keys().chain(a.endpoints.keys()).collect();
        for n in own.iter().copied().chain(a.tunnels.keys()) {
            let _ = self.dp.remove_node(n);
        }
        let sinks = a
            .sinks
            .iter()
            .map(|(n, s)| sink_status(n, &s.lock().unwrap_or_else(|p| p.into_inner())).0)
            .collect();
        let mut panel = self.dp.panel();
        let links = d
            .parsed_links()
            .into_iter()
            .map(|(i, link)| {
                let spec = self.local_spec(name, a, i, &link);
                let c = spec.as_ref().and_then(|spec| panel.link_counters(spec));
                LinkState {
                    link: d.spec.links[i].clone(),
                    active: false,
                    packets: c.map_or(0, |c| c.packets),
                    bytes: c.map_or(0, |c| c.bytes),
                    // The tunnels went above: their drops are in the endpoint's per-VNI count
                    // now (counting their own as well counted them twice).
                    drops: c.map_or(0, |c| c.drops) + self.vni_link_drops(a, i),
                    since: c.map_or_else(String::new, |c| unix_ms_rfc3339(c.since_unix_ms)),
                }
            })
            .collect();
        let left = d
            .named_vnfs()
            .into_iter()
            .filter(|n| panel.node_ports(n).is_none());
        let counted: Vec<(String, NodeDrops)> = own
            .into_iter()
            .cloned()
            .chain(left)
            .filter_map(|n| Some((n.clone(), panel.node_drops(&n)?)))
            .collect();
        for (n, _) in &counted {
            panel.forget_node_drops(n);
        }
        for n in a.tunnels.keys() {
            panel.forget_node_drops(n);
        }
        // Known to the panel once applied, even with no link live (unknown: nothing to do).
        let _ = panel.delete_network(name);
        drop(panel);
        let counts = DepartedCounts {
            host: self.host.clone(),
            left_at: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            links,
            node_drops: counted
                .into_iter()
                .filter(|(_, d)| d.unlinked + d.refused > 0)
                .map(|(node, d)| NodeDropState {
                    node,
                    unlinked: d.unlinked,
                    refused: d.refused,
                })
                .collect(),
            sinks,
        };
        let mut departed = self.departed.lock().unwrap_or_else(|p| p.into_inner());
        departed.entry(name.to_owned()).or_default().push(counts);
        keep_within_bounds(&mut departed);
        // Encoded under the lock, written after it.
        let encoded = self
            .departures_file
            .as_ref()
            .map(|f| (f, serde_json::to_vec(&*departed)));
        drop(departed);
        if let Some((file, encoded)) = encoded {
            let written = encoded.map_err(|e| e.to_string()).and_then(|bytes| {
                telvirt_files::write_atomic(file, &bytes).map_err(|e| e.to_string())
            });
            if let Err(why) = written {
                tracing::warn!(file = %file.display(), "final counts of networks that left this host not written: {why}");
            }
        }
        self.departed_changed.notify_one();
    }

    /// What descriptor link `i` of `a` (`spec` its link here) lost beyond its ring: a link into
    /// a tunnel, what the tunnel could not send; one out of a tunnel, what it received but could
    /// not queue; a link between hosts, what the endpoint here dropped of its VNI (for no
    /// tunnel, or in a tunnel removed since).
    fn tunnel_drops(&self, a: &Applied, i: usize, spec: Option<&LinkSpec>) -> u64 {
        self.vni_link_drops(a, i)
            + spec.map_or(0, |spec| {
                let sent = a.tunnels.get(spec.to.node.as_str()).map_or(0, |t| {
                    let t = &t.stats;
                    t.tx_errors.load(Ordering::Relaxed) + t.tx_too_big.load(Ordering::Relaxed)
                });
                let received = a.tunnels.get(spec.from.node.as_str()).map_or(0, |t| {
                    let t = &t.stats;
                    t.rx_queue_full.load(Ordering::Relaxed) + t.rx_too_big.load(Ordering::Relaxed)
                });
                sent + received
            })
    }

    /// What the endpoint here dropped of descriptor link `i`'s VNI: for no tunnel, or in a
    /// tunnel removed since (what it still queued, and its own drops).
    fn vni_link_drops(&self, a: &Applied, i: usize) -> u64 {
        match (&self.vxlan, &a.span) {
            (Some(e), Some(span)) => span.link_vni(i).map_or(0, |v| e.vni_drops(v)),
            _ => 0,
        }
    }

    /// Brings the built-in nodes and steering endpoints of `a` to those of `d`: nodes that
    /// did not change stay (with their counters and links), changed and dropped ones go before
    /// any is added, and what could not be placed is retried on the next pass. A steering
    /// endpoint whose `active` changed switches in one atomic step, once the new instance is on
    /// the panel with every mirrored port (until then traffic stays where it is). Returns why
    /// nodes are not placed or not switched.
    fn place_nodes(&self, a: &mut Applied, d: &NetworkDescriptor) -> Vec<String> {
        let ports = d.steering_ports();
        let wanted: BTreeMap<&str, (&SteeringEndpoint, Vec<String>)> = d
            .spec
            .steering
            .iter()
            .map(|e| {
                let p = ports.get(e.name.as_str()).cloned().unwrap_or_default();
                (e.name.as_str(), (e, p))
            })
            .collect();
        let local: BTreeSet<String> = d
            .spec
            .nodes
            .iter()
            .map(|b| b.name.as_str())
            .chain(d.spec.steering.iter().map(|e| e.name.as_str()))
            .filter(|n| self.is_local(a, n))
            .map(str::to_owned)
            .collect();
        a.builtins.retain(|name, placed| {
            let keep = d.builtin(name) == Some(&*placed) && local.contains(name);
            if !keep {
                let _ = self.dp.remove_node(name);
                a.sinks.remove(name);
            }
            keep
        });
        a.endpoints.retain(|name, placed| {
            let keep = local.contains(name)
                && wanted.get(name.as_str()).is_some_and(|(e, p)| {
                    placed.spec.instances == e.instances && placed.ports == *p
                });
            if !keep {
                let _ = self.dp.remove_node(name);
            }
            keep
        });
        let mut waiting = Vec::new();
        for b in &d.spec.nodes {
            if a.builtins.contains_key(b.name.as_str()) || !local.contains(b.name.as_str()) {
                continue;
            }
            match self.add_builtin(b) {
                Ok(sink) => {
                    a.builtins.insert(b.name.as_str().to_owned(), b.clone());
                    if let Some(s) = sink {
                        a.sinks.insert(b.name.as_str().to_owned(), s);
                    }
                }
                Err(e) => waiting.push(format!("node {}: {e}", b.name)),
            }
        }
        for (name, (e, p)) in wanted {
            if !local.contains(name) {
                continue;
            }
            if let Some(placed) = a.endpoints.get(name) {
                let Some(active) = e.active_instance() else {
                    continue;
                };
                if placed.endpoint.current_instance() == active.as_str() {
                    continue;
                }
                let missing: Vec<String> = p
                    .iter()
                    .filter(|port| !self.has_port(active.as_str(), port, &mut Vec::new()))
                    .cloned()
                    .collect();
                if !missing.is_empty() {
                    waiting.push(format!(
                        "node {name}: not switched to {active} yet: it is not on this node's \
                         data plane with port(s) {}; traffic stays on {}",
                        missing.join(", "),
                        placed.endpoint.current_instance()
                    ));
                    continue;
                }
                match placed.endpoint.switch(active.as_str()) {
                    Ok(s) => tracing::info!(
                        endpoint = name,
                        from = s.from,
                        to = s.to,
                        generation = s.generation,
                        "steering switched"
                    ),
                    Err(err) => waiting.push(format!("node {name}: {err}")),
                }
                continue;
            }
            if p.is_empty() {
                waiting.push(format!("node {name}: steering endpoint used by no link"));
                continue;
            }
            match self.add_endpoint(e, &p) {
                Ok(placed) => {
                    a.endpoints.insert(name.to_owned(), placed);
                }
                Err(err) => waiting.push(format!("node {name}: {err}")),
            }
        }
        a.descriptor = d.clone();
        waiting
    }

    /// One pass: the panel ends up holding exactly `wanted` (links whose ends exist). A
    /// network whose descriptor changed is rewired in place: links in both versions stay up,
    /// and a change of a steering endpoint's `active` is one atomic switch.
    pub fn sync(&self, wanted: &[NetworkDescriptor]) {
        self.sync_spans(wanted, &[]);
    }

    /// [`NetworkReconciler::sync`] with where the nodes of networks spanning several hosts
    /// are: only this host's part is placed, and links to another host's nodes go through a
    /// tunnel to that host.
    pub fn sync_spans(&self, wanted: &[NetworkDescriptor], spans: &[NetworkSpan]) {
        self.captures.end_expired(&self.dp);
        let mut applied = self.applied();
        // A network with a node whose links are held (a frozen move's source still receiving)
        // is not torn down until they are released (`wire` keeps those links meanwhile).
        let nodes = self.dp.held_nodes();
        let held: BTreeSet<String> = applied
            .iter()
            .filter(|(_, a)| {
                a.live
                    .iter()
                    .any(|l| nodes.contains(&l.from.node) || nodes.contains(&l.to.node))
            })
            .map(|(n, _)| n.clone())
            .collect();
        let gone: Vec<String> = applied
            .keys()
            .filter(|n| !held.contains(*n))
            .filter(|n| !wanted.iter().any(|w| w.name().as_str() == n.as_str()))
            .cloned()
            .collect();
        for name in gone {
            if let Some(a) = applied.remove(&name) {
                self.depart(&name, &a);
            }
        }
        for d in wanted {
            let name = d.name().as_str().to_owned();
            let a = applied.entry(name.clone()).or_insert_with(|| Applied {
                descriptor: d.clone(),
                live: Vec::new(),
                waiting: Vec::new(),
                builtins: BTreeMap::new(),
                probing: false,
                sinks: BTreeMap::new(),
                endpoints: BTreeMap::new(),
                span: None,
                tunnels: BTreeMap::new(),
                retiring: BTreeMap::new(),
            });
            if a.probing {
                continue;
            }
            a.span = spans.iter().find(|s| s.network == name).cloned();
            self.reconcile(&name, a, d);
        }
        self.note_held_senders(&applied);
        // Half full, the per-VNI drops keep only the VNIs of this host's networks (until
        // then a VNI whose network has not reached this host yet keeps its drops too).
        if let Some(e) = &self.vxlan
            && e.vni_drops_tracked() >= vxlan::VNI_DROPS_TRACKED / 2
        {
            let held: Vec<(u32, u32)> = applied
                .values()
                .filter_map(|a| a.span.as_ref())
                .map(|s| (s.vni, s.vnis.max(1)))
                .collect();
            e.forget_vni_drops(|v| held.iter().any(|(first, n)| v >= *first && v - first < *n));
        }
        drop(applied);
        self.log_endpoint_drops();
    }

    /// Tells the data plane what still sends to each node whose links are held, over every
    /// network: a link from a node of this host (quiet when that node is held too), or one out
    /// of a tunnel from another host.
    fn note_held_senders(&self, applied: &BTreeMap<String, Applied>) {
        let held = self.dp.held_nodes();
        for node in &held {
            let (mut local, mut quiet) = (0, 0);
            let mut tunnels = Vec::new();
            for a in applied.values() {
                for l in a.live.iter().filter(|l| &l.to.node == node) {
                    match a.tunnels.get(&l.from.node) {
                        Some(t) => tunnels.push(Arc::clone(&t.stats)),
                        // Another frozen source (two VNFs of a chain moving at once) sends
                        // nothing.
                        None if held.contains(&l.from.node) => quiet += 1,
                        None => local += 1,
                    }
                }
            }
            self.dp.note_held_senders(node, local, quiet, tunnels);
        }
    }

    /// Says in the log what the tunnel endpoint dropped since the last pass: for a network
    /// this host still holds, the links' drops count it too; for one it left (a moved
    /// VNF's old host), the log is the only place that says so.
    fn log_endpoint_drops(&self) {
        let Some(e) = &self.vxlan else {
            return;
        };
        let st = endpoint_status(&self.host, e);
        let now = [st.no_tunnel, st.removed_queued, st.kernel_dropped];
        let mut seen = self
            .endpoint_drops_seen
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let [no_tunnel, removed, kernel] = std::array::from_fn(|i| now[i].saturating_sub(seen[i]));
        if no_tunnel + removed + kernel > 0 {
            tracing::warn!(
                endpoint = %e.local_addr(),
                no_tunnel,
                removed,
                kernel,
                "the tunnel endpoint dropped datagrams: for no tunnel here, queued in tunnels removed, in the kernel's receive buffer"
            );
        }
        *seen = now;
    }

    /// Whether `node` is on the panel with `port`; otherwise why not, into `waiting`.
    fn has_port(&self, node: &str, port: &str, waiting: &mut Vec<String>) -> bool {
        match self.dp.node_ports(node) {
            Some(ports) if ports.iter().any(|p| p == port) => true,
            Some(_) => {
                waiting.push(format!("{node} has no port {port}"));
                false
            }
            None => {
                waiting.push(format!("{node} is not running on this node"));
                false
            }
        }
    }

    /// The links of `a` between each steering endpoint and its instances that can be wired.
    fn endpoint_links(&self, a: &Applied, waiting: &mut Vec<String>) -> Vec<LinkSpec> {
        let mirrored = a.descriptor.mirrored_ports();
        let mut out = Vec::new();
        for (name, placed) in &a.endpoints {
            for inst in &placed.spec.instances {
                for m in mirrored.get(name).into_iter().flatten() {
                    if !self.has_port(inst.as_str(), &m.port, waiting) {
                        continue;
                    }
                    let inner =
                        PortRef::new(name, &SteeringNode::instance_port(inst.as_str(), &m.port));
                    let outer = PortRef::new(inst.as_str(), &m.port);
                    if m.into {
                        out.push(LinkSpec::new(inner.clone(), outer.clone()));
                    }
                    if m.out_of {
                        out.push(LinkSpec::new(outer, inner));
                    }
                }
            }
        }
        out
    }

    /// One network's pass: its nodes, then its links. Every pass places: that is a comparison
    /// when nothing changed, and it retries what an earlier pass could not place (or switch).
    fn reconcile(&self, name: &str, a: &mut Applied, d: &NetworkDescriptor) {
        let waiting = self.place_nodes(a, d);
        self.wire(name, a, waiting);
    }

    /// Wires the links of one network whose ends are on the panel; `waiting` holds why nodes
    /// are not placed, and gets why links are not wired.
    fn wire(&self, name: &str, a: &mut Applied, mut waiting: Vec<String>) {
        let mut links = Vec::new();
        let mut tunnels_used = BTreeSet::new();
        let host_workers = self.host_port_workers(name, a);
        for (i, link) in a.descriptor.parsed_links() {
            let Some(spec) = self.local_spec(name, a, i, &link) else {
                continue;
            };
            let mut ready = true;
            for (ep, wired) in [(&link.from, &spec.from), (&link.to, &spec.to)] {
                if *wired != port_ref(ep) {
                    // The other host's end: through the tunnel to it.
                    let peer = a.host_of(&ep.node_key()).unwrap_or_default().to_owned();
                    tunnels_used.insert(Self::tunnel_name(name, i, &peer));
                    ready &= self
                        .ensure_tunnel(name, a, i, &peer, &mut waiting)
                        .is_some();
                    continue;
                }
                match ep {
                    Endpoint::Port { node, port } => {
                        ready &= self.has_port(node, port, &mut waiting);
                    }
                    Endpoint::Host { ifname, .. } => {
                        let node = host_node(ifname);
                        let worker = host_workers.get(&node).copied().unwrap_or(0);
                        // Bound first: the panel's lock is not held while nodes change.
                        let current = self.dp.panel().worker_of(&node);
                        let placed = match current {
                            Some(w) if w == worker => Ok(()),
                            // What it links to went (its core may be another VNF's now) or
                            // came: the port follows; its links are wired again below.
                            Some(_) => self.dp.remove_node(&node).and_then(|p| {
                                tracing::info!(ifname, worker, "host port moved");
                                self.dp.add_node(&node, &[""], worker, p).inspect_err(|_| {
                                    // Closed: reopened (and reported again) on a later pass.
                                    self.host_ports
                                        .lock()
                                        .unwrap_or_else(|p| p.into_inner())
                                        .remove(&node);
                                })
                            }),
                            None => HostPort::open_with(ifname, None, self.host_port_mode)
                                .map_err(dp_err)
                                .and_then(|p| {
                                    tracing::info!(
                                        ifname,
                                        worker,
                                        socket = p.rx_mode(),
                                        af_xdp_refused = p.xdp_refused(),
                                        af_xdp_queues = p.xdp_queues(),
                                        "host port open"
                                    );
                                    let open = OpenHostPort {
                                        interface: ifname.clone(),
                                        socket: p.rx_mode(),
                                        af_xdp_refused: p.xdp_refused().map(str::to_owned),
                                        af_xdp_queues: p.xdp_queues(),
                                        stats: p.stats(),
                                    };
                                    self.dp.add_node(&node, &[""], worker, Box::new(p))?;
                                    self.host_ports
                                        .lock()
                                        .unwrap_or_else(|p| p.into_inner())
                                        .insert(node.clone(), open);
                                    Ok(())
                                }),
                        };
                        if let Err(e) = placed {
                            ready = false;
                            waiting.push(format!("host port {ifname}: {e}"));
                        }
                    }
                }
            }
            if ready {
                links.push(spec);
            }
        }
        links.extend(self.endpoint_links(a, &mut waiting));
        links.extend(self.held_links(a, &links, &mut tunnels_used));
        waiting.dedup();
        // A VNF that restarted lost its links on the panel: compare with what is live.
        let live_now = self.dp.panel().current_links();
        let intact = a.live.iter().all(|l| live_now.contains(l));
        if links != a.live || !intact {
            // No link ready is not a deleted network: its links' counters are kept for when
            // they come back (`tear_down` deletes).
            let result = self.dp.panel().apply_network(name, &links).map(|_| ());
            match result {
                Ok(()) => a.live = links.clone(),
                Err(e) => {
                    waiting.push(e.to_string());
                    tracing::warn!(network = name, "cannot wire: {e}");
                }
            }
        }
        // Tunnels no link needs any more go, once the links through them are gone and they
        // had time to send on what their rings held.
        if a.live == links {
            let now = Instant::now();
            a.retiring.retain(|t, _| !tunnels_used.contains(t));
            for t in a.tunnels.keys().filter(|t| !tunnels_used.contains(*t)) {
                a.retiring.entry(t.clone()).or_insert(now);
            }
            let gone: Vec<String> = a
                .retiring
                .iter()
                .filter(|(_, since)| now.duration_since(**since) >= TUNNEL_LINGER)
                .map(|(t, _)| t.clone())
                .collect();
            for t in gone {
                self.remove_tunnel(a, &t);
            }
        }
        a.waiting = waiting;
    }

    /// The live links of `a` to or from a node whose links are held (a frozen move's source,
    /// still receiving what its senders send before they rewire) that `links` (the network as
    /// it is now) does not replace: no link of `links` sends from or receives at their ports,
    /// and both their ends are on the panel. The tunnels they use go into `tunnels_used`. The
    /// rest of the network is wired as it is now meanwhile (the frames the moved instance
    /// sends back here arrive). Only links whose ends still have their ports are kept (a node
    /// placed again with other ports would fail the whole network's wiring).
    fn held_links(
        &self,
        a: &Applied,
        links: &[LinkSpec],
        tunnels_used: &mut BTreeSet<String>,
    ) -> Vec<LinkSpec> {
        let held = self.dp.held_nodes();
        if held.is_empty() {
            return Vec::new();
        }
        let kept: Vec<LinkSpec> = a
            .live
            .iter()
            .filter(|l| held.contains(&l.from.node) || held.contains(&l.to.node))
            .filter(|l| !links.iter().any(|n| n.from == l.from || n.to == l.to))
            .filter(|l| {
                [&l.from, &l.to].iter().all(|e| {
                    self.dp
                        .node_ports(&e.node)
                        .is_some_and(|ports| ports.contains(&e.port))
                })
            })
            .cloned()
            .collect();
        for l in &kept {
            for end in [&l.from, &l.to] {
                if a.tunnels.contains_key(&end.node) {
                    tunnels_used.insert(end.node.clone());
                }
            }
        }
        kept
    }

    /// The networks whose final counts this host keeps (its heartbeat names them, so `net
    /// show` asks it for them).
    pub fn departed_networks(&self) -> Vec<String> {
        self.departed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    /// Notified whenever a network leaves this host (its heartbeat then names it at once).
    pub fn departed_changed(&self) -> Arc<tokio::sync::Notify> {
        Arc::clone(&self.departed_changed)
    }

    /// The live state of network `d`, if this reconciler applied it; with it, or alone once
    /// the network left this host, the final counts it had here ([`NetworkStatus::departed`]).
    pub fn status(&self, d: &NetworkDescriptor) -> Option<NetworkStatus> {
        let name = d.name().as_str();
        let applied = self.applied();
        let departed: Vec<DepartedCounts> = self
            .departed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
            .unwrap_or_default();
        let mut st = match applied.get(name) {
            Some(a) => self.live_status(d, a),
            None if departed.is_empty() => return None,
            None => {
                let mut st = NetworkStatus::idle(d);
                st.waiting
                    .push("the network is not applied to this host's data plane (yet)".to_owned());
                st
            }
        };
        st.departed = departed;
        Some(st)
    }

    /// The live state of network `d`, applied as `a`.
    fn live_status(&self, d: &NetworkDescriptor, a: &Applied) -> NetworkStatus {
        let all = self.dp.panel().status();
        let live = |spec: &LinkSpec| {
            all.iter()
                .find(|s| s.link == *spec && a.live.contains(spec))
        };
        let mut mine = Vec::new();
        let mut links = Vec::new();
        let mut host_nodes = BTreeSet::new();
        for (i, link) in d.parsed_links() {
            let spec = self.local_spec(d.name().as_str(), a, i, &link);
            for end in spec.iter().flat_map(|s| [&s.from, &s.to]) {
                if end.is_host() {
                    host_nodes.insert(end.node.clone());
                }
            }
            let l = spec.as_ref().and_then(&live);
            let drops = l.map_or(0, |s| s.counters.drops) + self.tunnel_drops(a, i, spec.as_ref());
            if let Some(s) = l {
                // The table's row shows the link's whole drops, its tunnel's and VNI's too.
                let mut row = s.clone();
                row.counters.drops = drops;
                mine.push(row);
            }
            links.push(LinkState {
                link: d.spec.links[i].clone(),
                active: l.is_some(),
                packets: l.map_or(0, |s| s.counters.packets),
                bytes: l.map_or(0, |s| s.counters.bytes),
                drops,
                since: l.map_or_else(String::new, |s| unix_ms_rfc3339(s.counters.since_unix_ms)),
            });
        }
        let mut steering = Vec::new();
        for (name, placed) in &a.endpoints {
            let mut delivered = Vec::new();
            for inst in &placed.spec.instances {
                let mut packets = 0;
                for port in &placed.ports {
                    let spec = LinkSpec::new(
                        PortRef::new(name, &SteeringNode::instance_port(inst.as_str(), port)),
                        PortRef::new(inst.as_str(), port),
                    );
                    for s in [
                        spec.clone(),
                        LinkSpec::new(spec.to.clone(), spec.from.clone()),
                    ] {
                        if let Some(l) = live(&s) {
                            mine.push(l.clone());
                            if s == spec {
                                packets += l.counters.packets;
                            }
                        }
                    }
                }
                delivered.push(InstanceCount {
                    instance: inst.as_str().to_owned(),
                    packets,
                });
            }
            steering.push(SteeringState {
                name: name.clone(),
                active: placed.endpoint.current_instance().to_owned(),
                generation: placed.endpoint.current().generation,
                delivered,
            });
        }
        let mut table = graph::render(&mine);
        // Nodes of this network on this host, but not the tunnels (their losses are the links').
        let nodes: BTreeSet<&str> = mine
            .iter()
            .flat_map(|l| [l.link.from.node.as_str(), l.link.to.node.as_str()])
            .chain(a.builtins.keys().map(String::as_str))
            .chain(a.endpoints.keys().map(String::as_str))
            .filter(|n| !a.tunnels.contains_key(*n))
            .collect();
        let node_drops: Vec<NodeDropState> = {
            let panel = self.dp.panel();
            nodes
                .into_iter()
                .filter_map(|n| Some((n, panel.node_drops(n)?)))
                .filter(|(_, d)| d.unlinked + d.refused > 0)
                .map(|(n, d)| NodeDropState {
                    node: n.to_owned(),
                    unlinked: d.unlinked,
                    refused: d.refused,
                })
                .collect()
        };
        for d in &node_drops {
            table.push_str(&telvirt_dataplane::panel::render_node_drops(
                &d.node, d.unlinked, d.refused,
            ));
        }
        for s in &steering {
            table.push_str(&format!(
                "\nsteering {}: active {} (switches: {}), delivered {}\n",
                s.name,
                s.active,
                s.generation,
                s.delivered
                    .iter()
                    .map(|c| format!("{} {}", c.instance, c.packets))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        let mut sinks = Vec::new();
        for (name, sink) in &a.sinks {
            let (st, s) = sink_status(name, &sink.lock().unwrap_or_else(|p| p.into_inner()));
            table.push_str(&format!(
                "\nsink {name}: {} received, {} lost, latency p50 {:.1} us, p99 {:.1} us, p99.9 {:.1} us\n",
                s.received, s.lost, s.latency.p50_us, s.latency.p99_us, s.latency.p999_us
            ));
            sinks.push(st);
        }
        let mut host_ports = Vec::new();
        let open = self.host_ports.lock().unwrap_or_else(|p| p.into_inner());
        for p in host_nodes.iter().filter_map(|n| open.get(n)) {
            let st = HostPortStatus {
                host: self.host.clone(),
                interface: p.interface.clone(),
                socket: p.socket.to_owned(),
                af_xdp_refused: p.af_xdp_refused.clone(),
                af_xdp_queues: p.af_xdp_queues,
                received: p.stats.rx.load(Ordering::Relaxed),
                sent: p.stats.tx.load(Ordering::Relaxed),
                rx_dropped: p.stats.rx_dropped(),
                tx_dropped: p.stats.tx_errors.load(Ordering::Relaxed),
            };
            let queues = match st.af_xdp_queues {
                Some(n) if n > 1 => format!(", {n} queues"),
                _ => String::new(),
            };
            table.push_str(&format!(
                "\nhost port {} ({}{queues}): received {}, sent {}, dropped {} on receive, {} on send\n",
                st.interface, st.socket, st.received, st.sent, st.rx_dropped, st.tx_dropped
            ));
            host_ports.push(st);
        }
        drop(open);
        let mut tunnel_endpoints = Vec::new();
        if let (Some(e), Some(_)) = (&self.vxlan, &a.span) {
            let st = endpoint_status(&self.host, e);
            table.push_str(&format!(
                "\ntunnel endpoint {}: received {}, dropped {} in the kernel, {} not VXLAN, {} for no tunnel, {} queued in removed tunnels\n",
                st.address, st.received, st.kernel_dropped, st.not_vxlan, st.no_tunnel, st.removed_queued
            ));
            tunnel_endpoints.push(st);
        }
        NetworkStatus {
            links,
            table,
            waiting: a.waiting.clone(),
            steering,
            node_drops,
            sinks,
            host_ports,
            tunnel_endpoints,
            departed: Vec::new(),
            hosts: Vec::new(),
        }
    }

    /// `net capture`: one slice of a capture of link `slice.link` of network `d`, on this host's
    /// part of the link (for a link between hosts: from the sending VNF into the tunnel here,
    /// or from the tunnel into the receiving VNF).
    pub fn capture(
        &self,
        d: &NetworkDescriptor,
        slice: &CaptureSlice,
    ) -> Result<CaptureChunk, AgentError> {
        let name = d.name().as_str();
        let label = d.spec.links.get(slice.link).cloned().ok_or_else(|| {
            AgentError::DataPlane(format!("network {name} has no link {}", slice.link))
        })?;
        let spec = {
            let applied = self.applied();
            let a = applied.get(name).ok_or_else(|| {
                AgentError::DataPlane(format!("network {name} is not applied on this host"))
            })?;
            d.parsed_links()
                .into_iter()
                .find(|(i, _)| *i == slice.link)
                .and_then(|(i, l)| self.local_spec(name, a, i, &l))
                .filter(|s| a.live.contains(s))
                .ok_or_else(|| {
                    AgentError::DataPlane(format!(
                        "link {label} of network {name} is not live on this host{}",
                        if a.waiting.is_empty() {
                            String::new()
                        } else {
                            format!(" (waiting: {})", a.waiting.join("; "))
                        }
                    ))
                })?
        };
        self.captures.slice(&self.dp, name, spec, &label, slice)
    }

    /// `latency chain`: sends the probe's packets from `p.from` to `p.to` through network `d`
    /// as it is wired now. Everything that can be checked is checked before anything changes;
    /// then the links the probe displaces pause for its duration (network passes leave this
    /// network alone meanwhile) and come back afterwards. Blocks for the probe's length, at most
    /// its send time plus a few seconds ([`ChainProbe::wait`]); one probe runs at a time.
    pub fn probe(
        &self,
        d: &NetworkDescriptor,
        p: &ResolvedProbe,
    ) -> Result<LatencyReport, AgentError> {
        let name = d.name().as_str();
        // A network applied a moment ago (`net apply`, then `latency chain`) may not have
        // reached this node's data plane yet: its pass is waited for a few seconds (before the
        // probe's turn, so a probe of a network never applied here does not hold up the next).
        // Links that wait for their ends are not waited for: one may wait for good (a stopped
        // VNF), and the probe's own checks name it.
        let until = Instant::now() + PROBE_APPLY_WAIT;
        while !self.applied().get(name).is_some_and(|a| a.descriptor == *d)
            && Instant::now() < until
        {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _one = self.probe_lock.lock().unwrap_or_else(|e| e.into_inner());
        let opts = ChainLatencyOpts {
            entry: port_ref(&p.from),
            exit: port_ref(&p.to),
            rate_pps: p.rate_pps,
            packets: p.packets,
            size: p.size as usize,
            worker: 0,
            settle: Duration::from_secs(2),
        };
        let displaced: Vec<LinkSpec> = d
            .parsed_links()
            .into_iter()
            .filter(|(i, _)| p.displaced.contains(&d.spec.links[*i]))
            .map(|(_, l)| LinkSpec::new(port_ref(&l.from), port_ref(&l.to)))
            .collect();
        let started = {
            let mut applied = self.applied();
            let a = applied
                .get_mut(name)
                .filter(|a| a.descriptor == *d)
                .ok_or_else(|| {
                    AgentError::DataPlane(format!(
                        "network {name} is not applied on this node's data plane yet; try again"
                    ))
                })?;
            let mut panel = self.dp.panel();
            ChainProbe::check(&panel, &opts).map_err(dp_err)?;
            let kept: Vec<LinkSpec> = a
                .live
                .iter()
                .filter(|l| !displaced.contains(l))
                .cloned()
                .collect();
            if kept != a.live {
                panel.apply_network(name, &kept).map_err(dp_err)?;
            }
            let started = ChainProbe::start(&mut panel, &opts);
            if started.is_err() && kept != a.live {
                // Put the paused links back at once.
                let _ = panel.apply_network(name, &a.live);
            } else {
                a.live = kept;
                a.probing = true;
            }
            started.map_err(dp_err)?
        };
        let timed_out = started.wait(opts.settle, &mut |_, _| {});
        let r = started.finish(&mut self.dp.panel());
        {
            let mut applied = self.applied();
            if let Some(a) = applied.get_mut(name) {
                a.probing = false;
                // Rewire the paused links now rather than on the next pass.
                let d = a.descriptor.clone();
                self.reconcile(name, a, &d);
            }
        }
        if timed_out {
            tracing::warn!(
                network = name,
                sent = r.sent,
                received = r.sink.received,
                "latency probe ended on its deadline"
            );
        }
        Ok(LatencyReport {
            network: name.to_owned(),
            from: p.from.to_string(),
            to: p.to.to_string(),
            displaced: p.displaced.clone(),
            rate_pps: p.rate_pps,
            sent: r.sent,
            received: r.sink.received,
            lost: r.lost,
            reordered: r.sink.reordered,
            p50_us: r.sink.latency.p50_us,
            p99_us: r.sink.latency.p99_us,
            p999_us: r.sink.latency.p999_us,
            max_us: r.sink.latency.max_us,
            histogram: r.histogram,
        })
    }
}

/// The final counts kept in `file` (none when it does not exist), within the ledger's bounds.
fn read_departures(
    file: &std::path::Path,
) -> Result<BTreeMap<String, Vec<DepartedCounts>>, String> {
    let meta = match std::fs::metadata(file) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => return Err(e.to_string()),
    };
    if meta.len() > MAX_DEPARTURES_FILE {
        return Err(format!(
            "{} bytes, more than the {MAX_DEPARTURES_FILE} a departures file may hold",
            meta.len()
        ));
    }
    let bytes = std::fs::read(file).map_err(|e| e.to_string())?;
    let mut kept: BTreeMap<String, Vec<DepartedCounts>> =
        serde_json::from_slice(&bytes).map_err(|e| format!("not a departures file: {e}"))?;
    keep_within_bounds(&mut kept);
    Ok(kept)
}

/// What `net show` reports of sink `name`, with its summary.
fn sink_status(name: &str, state: &SinkState) -> (SinkStatus, SinkSummary) {
    let s = state.summary();
    let st = SinkStatus {
        name: name.to_owned(),
        received: s.received,
        lost: s.lost,
        bytes: s.bytes,
        latency_buckets: telvirt_dataplane::hist::bucket_counts(
            &state.latency,
            &SINK_LATENCY_BOUNDS_NS,
        ),
        latency_sum_ns: (state.latency.mean() * state.latency.len() as f64) as u64,
    };
    (st, s)
}

/// `ms` since the Unix epoch as RFC 3339 (empty for 0: not recorded).
fn unix_ms_rfc3339(ms: u64) -> String {
    if ms == 0 {
        return String::new();
    }
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms);
    humantime::format_rfc3339_millis(t).to_string()
}

/// Host `host`'s tunnel endpoint `e` and its counters. Its drops are read before what it
/// received: each dropped datagram was counted received first, so `received` is never below
/// them (read the other way, datagrams received and dropped between the two reads would show
/// more drops than receipts).
fn endpoint_status(host: &str, e: &VxlanEndpoint) -> TunnelEndpointStatus {
    let stats = e.stats();
    let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Acquire);
    let no_tunnel = load(&stats.unknown_tunnel);
    let removed_queued = load(&stats.removed_queued);
    let not_vxlan = load(&stats.malformed);
    TunnelEndpointStatus {
        host: host.to_owned(),
        address: e.local_addr().to_string(),
        received: load(&stats.datagrams),
        // Unreadable only if the kernel lacks SO_MEMINFO (before 4.6): nothing counted.
        kernel_dropped: e.kernel_drops().unwrap_or(0),
        not_vxlan,
        no_tunnel,
        removed_queued,
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use telvirt_dataplane::firewall::{Action, Firewall};
    use telvirt_dataplane::node::ProcessorNode;
    use telvirt_model::Format;
    use telvirt_model::network::parse_network;

    use super::*;

    const CHAIN: &str = "apiVersion: telvirt/v1\nkind: Network\nmetadata: { name: c1 }\nspec:\n  nodes:\n    - { name: gen, kind: generator, rate_pps: 20000 }\n    - { name: sink, kind: sink }\n  links:\n    - gen.out -> fw1.in\n    - fw1.out -> sink.in\n";

    fn add_fw(dp: &NodeDataPlane) {
        add_fw_on(dp, "fw1", 0);
    }

    /// A pass-everything firewall `name` on worker `worker`.
    fn add_fw_on(dp: &NodeDataPlane, name: &str, worker: usize) {
        let fw = Firewall::new(Vec::new(), Action::Allow);
        dp.add_node(
            name,
            &["in", "out"],
            worker,
            Box::new(ProcessorNode::new(fw, 32)),
        )
        .unwrap();
    }

    /// Syncs until the sink's link carried more than `above` packets, with a deadline.
    fn delivered_above(r: &NetworkReconciler, d: &NetworkDescriptor, above: u64) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            r.sync(std::slice::from_ref(d));
            let st = r.status(d).unwrap();
            if st.links[1].packets > above {
                return st.links[1].packets;
            }
            assert!(Instant::now() < deadline, "no packets: {st:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn links_wait_for_their_vnf_and_come_back_after_it_restarts() {
        let cpu = telvirt_dataplane::worker::allowed_cores().unwrap()[0];
        let dp = NodeDataPlane::with_cores(&[cpu]).unwrap();
        let r = NetworkReconciler::new(Arc::clone(&dp));
        let d = parse_network(CHAIN.as_bytes(), Format::Yaml).unwrap();
        r.sync(std::slice::from_ref(&d));
        let st = r.status(&d).unwrap();
        assert!(st.links.iter().all(|l| !l.active), "{st:?}");
        assert!(
            st.waiting.iter().any(|w| w.contains("fw1 is not running")),
            "{st:?}"
        );
        assert!(dp.node_ports("gen").is_some() && dp.node_ports("sink").is_some());

        add_fw(&dp);
        let first = delivered_above(&r, &d, 0);
        assert!(r.status(&d).unwrap().waiting.is_empty());

        // fw1 restarts: its links go with it, and the next pass wires them again.
        let since = r.status(&d).unwrap().links[1].since.clone();
        assert!(since.ends_with('Z'), "{since:?}");
        let _ = dp.remove_node("fw1").unwrap();
        add_fw(&dp);
        // The links are made again between the same ports: their counters go on.
        let again = delivered_above(&r, &d, first);
        assert!(first > 0 && again > first);
        assert_eq!(r.status(&d).unwrap().links[1].since, since);

        // Deleting the network removes its links and built-in nodes, not fw1 (what it
        // counted here stays, as a network that left the host).
        r.sync(&[]);
        let st = r.status(&d).unwrap();
        assert!(st.links.iter().all(|l| !l.active), "{st:?}");
        assert!(st.departed[0].links[1].packets >= again, "{st:?}");
        assert!(dp.node_ports("gen").is_none() && dp.node_ports("sink").is_none());
        assert!(dp.node_ports("fw1").is_some());
        assert!(dp.panel().current_links().is_empty());
    }

    #[test]
    fn a_network_that_leaves_the_host_keeps_its_final_counts_here() {
        let cpu = telvirt_dataplane::worker::allowed_cores().unwrap()[0];
        let dp = NodeDataPlane::with_cores(&[cpu]).unwrap();
        let r = NetworkReconciler::new(Arc::clone(&dp)).with_host("h1", None);
        let d = parse_network(CHAIN.as_bytes(), Format::Yaml).unwrap();
        add_fw(&dp);
        delivered_above(&r, &d, 0);
        // fw1 restarts refusing everything (a deny-all rule set): its drops count here.
        drop(dp.remove_node("fw1").unwrap());
        let deny = Firewall::new(Vec::new(), Action::Deny);
        dp.add_node(
            "fw1",
            &["in", "out"],
            0,
            Box::new(ProcessorNode::new(deny, 32)),
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !r
            .status(&d)
            .unwrap()
            .node_drops
            .iter()
            .any(|n| n.node == "fw1" && n.refused > 0)
        {
            assert!(Instant::now() < deadline, "{:?}", r.status(&d));
            r.sync(std::slice::from_ref(&d));
            std::thread::sleep(Duration::from_millis(10));
        }
        // fw1 leaves the host (moved away), then its network does.
        drop(dp.remove_node("fw1").unwrap());
        let refused = dp.panel().node_drops("fw1").unwrap().refused;
        let before = r.status(&d).unwrap();
        assert!(before.links.iter().all(|l| !l.active), "{before:?}");
        r.sync(&[]);
        let st = r.status(&d).unwrap();
        assert!(
            st.links.iter().all(|l| !l.active && l.packets == 0),
            "{st:?}"
        );
        assert!(st.table.is_empty(), "{st:?}");
        let [left] = &st.departed[..] else {
            panic!("one departure: {st:?}")
        };
        assert_eq!(left.host, "h1");
        assert!(left.left_at.ends_with('Z'), "{left:?}");
        let into_fw = &left.links[0];
        assert!(into_fw.packets > 0 && !into_fw.since.is_empty(), "{left:?}");
        let fw = left.node_drops.iter().find(|n| n.node == "fw1");
        assert_eq!(fw.map(|n| n.refused), Some(refused), "{left:?}");
        assert!(
            left.sinks
                .iter()
                .any(|s| s.name == "sink" && s.received > 0),
            "{left:?}"
        );
        // The panel forgot fw1's drops: counted once, here.
        assert_eq!(dp.panel().node_drops("fw1"), None);

        // The network comes back, and leaves again: its counts here add up.
        add_fw(&dp);
        delivered_above(&r, &d, 0);
        let second = r.status(&d).unwrap();
        assert_eq!(second.departed, st.departed, "kept beside the live counts");
        let fw_out = second.links[1].packets;
        r.sync(&[]);
        let st = r.status(&d).unwrap();
        let [first, then] = &st.departed[..] else {
            panic!("two departures, each apart: {st:?}")
        };
        assert_eq!(first, left);
        assert!(then.links[1].packets >= fw_out, "{then:?}");
        assert!(then.left_at >= left.left_at, "{then:?}");
        assert!(
            then.node_drops.is_empty(),
            "fw1 dropped nothing there: {then:?}"
        );
    }

    #[test]
    fn the_final_counts_of_a_network_that_left_outlive_the_agent_in_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("network-departures.json");
        let cpu = telvirt_dataplane::worker::allowed_cores().unwrap()[0];
        let dp = NodeDataPlane::with_cores(&[cpu]).unwrap();
        let r = NetworkReconciler::new(Arc::clone(&dp))
            .with_host("h1", None)
            .with_departures_file(file.clone());
        let d = parse_network(CHAIN.as_bytes(), Format::Yaml).unwrap();
        add_fw(&dp);
        delivered_above(&r, &d, 0);
        r.sync(&[]);
        let before = r.status(&d).unwrap().departed;
        assert_eq!(before.len(), 1);
        drop(r);
        // The agent again, on another data plane: the counts are read back.
        let again = NetworkReconciler::new(Arc::clone(&dp))
            .with_host("h1", None)
            .with_departures_file(file.clone());
        assert_eq!(again.departed_networks(), ["c1"]);
        assert_eq!(again.status(&d).unwrap().departed, before);
        // A file that is no departures file: none read, and it is replaced at the next.
        std::fs::write(&file, b"{not json").unwrap();
        let fresh = NetworkReconciler::new(dp).with_departures_file(file);
        assert!(fresh.departed_networks().is_empty());
    }

    #[test]
    fn a_host_port_runs_on_the_worker_of_what_it_links_to_and_follows_it() {
        let cores = telvirt_dataplane::worker::allowed_cores().unwrap();
        assert!(cores.len() >= 2, "this test needs two cores: {cores:?}");
        let dp = NodeDataPlane::with_cores(&cores[..2]).unwrap();
        let r = NetworkReconciler::new(Arc::clone(&dp));
        // A veth pair in this namespace, deleted at the end (also on failure).
        struct Veth(String);
        impl Drop for Veth {
            fn drop(&mut self) {
                let _ = std::process::Command::new("ip")
                    .args(["link", "del", &self.0])
                    .output();
            }
        }
        let a = format!("tvhw{}a", std::process::id() % 100_000);
        let b = a.replace('a', "b");
        let out = std::process::Command::new("ip")
            .args(["link", "add", &a, "type", "veth", "peer", "name", &b])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let _veth = Veth(a.clone());
        let text = format!(
            "apiVersion: telvirt/v1\nkind: Network\nmetadata: {{ name: hp }}\nspec:\n  links:\n    - host:{a} -> fw1.in\n    - fw1.out -> host:{b}\n"
        );
        let d = parse_network(text.as_bytes(), Format::Yaml).unwrap();
        let on_worker_1 = |dp: &NodeDataPlane| add_fw_on(dp, "fw1", 1);
        let workers = |dp: &NodeDataPlane| {
            let panel = dp.panel();
            [&a, &b].map(|i| panel.worker_of(&host_node(i)))
        };
        on_worker_1(&dp);
        until(&r, &d, "links live", |st| st.links.iter().all(|l| l.active));
        assert_eq!(workers(&dp), [Some(1), Some(1)], "not on fw1's worker");
        // fw1 goes (its core may be another VNF's next): the ports go back to worker 0.
        let _ = dp.remove_node("fw1").unwrap();
        r.sync(std::slice::from_ref(&d));
        assert_eq!(workers(&dp), [Some(0), Some(0)], "left on fw1's old worker");
        // It comes back: so do they, and the links are live again.
        on_worker_1(&dp);
        until(&r, &d, "links live again", |st| {
            st.links.iter().all(|l| l.active)
        });
        assert_eq!(workers(&dp), [Some(1), Some(1)]);
        r.sync(&[]);
    }

    fn add_fw_named(dp: &NodeDataPlane, name: &str) {
        add_fw_on(dp, name, 0);
    }

    /// Syncs `d` until `check` holds on its status, with a deadline.
    fn until(
        r: &NetworkReconciler,
        d: &NetworkDescriptor,
        what: &str,
        check: impl Fn(&NetworkStatus) -> bool,
    ) -> NetworkStatus {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            r.sync(std::slice::from_ref(d));
            let st = r.status(d).unwrap();
            if check(&st) {
                return st;
            }
            assert!(Instant::now() < deadline, "{what}: {st:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    const STEERED: &str = "apiVersion: telvirt/v1\nkind: Network\nmetadata: { name: s1 }\nspec:\n  nodes:\n    - { name: gen, kind: generator, rate_pps: 20000 }\n    - { name: sink, kind: sink }\n  steering:\n    - { name: fw, instances: [fw1, fw2] }\n  links:\n    - gen.out -> fw.in\n    - fw.out -> sink.in\n";

    #[test]
    fn a_changed_active_instance_is_one_switch_without_rewiring() {
        let cpu = telvirt_dataplane::worker::allowed_cores().unwrap()[0];
        let dp = NodeDataPlane::with_cores(&[cpu]).unwrap();
        let r = NetworkReconciler::new(Arc::clone(&dp));
        add_fw_named(&dp, "fw1");
        add_fw_named(&dp, "fw2");
        let d = parse_network(STEERED.as_bytes(), Format::Yaml).unwrap();
        let delivered = |st: &NetworkStatus, i: usize| st.steering[0].delivered[i].packets;
        let st = until(&r, &d, "fw1 gets traffic, back to the sink", |st| {
            delivered(st, 0) > 100 && st.links[1].packets > 100
        });
        assert_eq!(
            (st.steering[0].active.as_str(), st.steering[0].generation),
            ("fw1", 0)
        );
        assert_eq!(delivered(&st, 1), 0, "{st:?}");
        assert!(st.table.contains("steering fw: active fw1"), "{}", st.table);

        let mut to_fw2 = d.clone();
        to_fw2.spec.steering[0].active = Some("fw2".parse().unwrap());
        let entry_before = st.links[0].packets;
        let st = until(&r, &to_fw2, "fw2 gets traffic", |st| delivered(st, 1) > 100);
        assert_eq!(
            (st.steering[0].active.as_str(), st.steering[0].generation),
            ("fw2", 1)
        );
        // The entry link was not rebuilt: its counter went on from where it was.
        assert!(st.links[0].packets > entry_before, "{st:?}");
        // Read again: the snapshot above may have read fw1's count before the switch and
        // fw2's after it.
        let fw1_after = delivered(&r.status(&to_fw2).unwrap(), 0);
        let st = until(&r, &to_fw2, "more traffic on fw2", |st| {
            delivered(st, 1) > 2 * 100 + 500
        });
        assert_eq!(
            delivered(&st, 0),
            fw1_after,
            "fw1 got packets after the switch"
        );
        r.sync(&[]);
        assert!(dp.node_ports("fw").is_none());
        assert!(dp.panel().current_links().is_empty());
    }

    #[test]
    fn packets_a_vnf_sends_to_a_port_the_network_leaves_open_are_shown_at_the_vnf() {
        let cpu = telvirt_dataplane::worker::allowed_cores().unwrap()[0];
        let dp = NodeDataPlane::with_cores(&[cpu]).unwrap();
        let r = NetworkReconciler::new(Arc::clone(&dp));
        add_fw(&dp);
        let open = CHAIN.replace("    - fw1.out -> sink.in\n", "");
        let d = parse_network(open.as_bytes(), Format::Yaml).unwrap();
        let st = until(&r, &d, "fw1's unlinked drops", |st| {
            st.node_drops
                .iter()
                .any(|n| n.node == "fw1" && n.unlinked > 100 && n.refused == 0)
        });
        assert!(
            st.table.contains("fw1: ") && st.table.contains("dropped on unlinked ports"),
            "{}",
            st.table
        );
        assert!(st.node_drops.iter().all(|n| n.node == "fw1"), "{st:?}");
        r.sync(&[]);
    }

    /// CHAIN through fw1 on a fresh data plane, once packets reach its sink.
    fn chain_carrying_packets() -> (Arc<NodeDataPlane>, NetworkReconciler, NetworkDescriptor) {
        chain_carrying_packets_at(20_000)
    }

    /// [`chain_carrying_packets`] with its generator at `rate_pps`.
    fn chain_carrying_packets_at(
        rate_pps: u32,
    ) -> (Arc<NodeDataPlane>, NetworkReconciler, NetworkDescriptor) {
        let cpu = telvirt_dataplane::worker::allowed_cores().unwrap()[0];
        let dp = NodeDataPlane::with_cores(&[cpu]).unwrap();
        let r = NetworkReconciler::new(Arc::clone(&dp));
        add_fw(&dp);
        let chain = CHAIN.replace("rate_pps: 20000", &format!("rate_pps: {rate_pps}"));
        let d = parse_network(chain.as_bytes(), Format::Yaml).unwrap();
        delivered_above(&r, &d, 0);
        (dp, r, d)
    }

    #[test]
    fn a_capture_in_slices_takes_every_frame_once_and_ends_on_its_count() {
        use base64::Engine;
        use telvirt_dataplane::capture::PcapngFrameCounter;
        // 2000 packets/s: 3000 frames take 1.5 s, far more than the first slice waits (one
        // poll of 5 ms), even when a worker stalled for a while catches up in a burst (as
        // much as the ring holds).
        let (_dp, r, d) = chain_carrying_packets_at(2_000);
        let slice = |first: bool, wait_ms: u64| CaptureSlice {
            link: 1,
            packets: 3_000,
            snaplen: 64,
            wait_ms,
            first,
            last: false,
        };
        let mut stream = PcapngFrameCounter::default();
        let mut feed = |c: &CaptureChunk| {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(&c.pcapng)
                .unwrap();
            stream.feed(&bytes);
            c.frames
        };
        let first = r.capture(&d, &slice(true, 1)).unwrap();
        assert!(!first.done, "{first:?}");
        let mut frames = feed(&first);
        let e = r.capture(&d, &slice(true, 1)).unwrap_err().to_string();
        assert!(e.contains("being captured already"), "{e}");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let c = r.capture(&d, &slice(false, 1000)).unwrap();
            frames += feed(&c);
            if c.done {
                break;
            }
            assert!(Instant::now() < deadline, "the capture never ended");
        }
        assert_eq!(
            (frames, stream.frames(), stream.missed()),
            (3_000, 3_000, 0)
        );
        let e = r.capture(&d, &slice(false, 1)).unwrap_err().to_string();
        assert!(e.contains("ended"), "{e}");
        // The tap is gone: a new capture of the link may start.
        let again = r.capture(
            &d,
            &CaptureSlice {
                last: true,
                ..slice(true, 1)
            },
        );
        assert!(again.is_ok_and(|c| c.done));
        let e = r
            .capture(
                &d,
                &CaptureSlice {
                    link: 7,
                    ..slice(true, 1)
                },
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("has no link 7"), "{e}");
        // However long a slice may wait, it answers about 512 KiB of pcapng at most (here
        // 64-byte frames, 96 bytes each in the file), and as soon as it has them (2.7 s at
        // this rate): the rest waits in the tap.
        let t0 = Instant::now();
        let big = r
            .capture(
                &d,
                &CaptureSlice {
                    packets: 1_000_000,
                    ..slice(true, 30_000)
                },
            )
            .unwrap();
        let cap = 512 * 1024 / 96;
        assert!(
            big.frames >= cap - 16 && big.frames <= cap + 1,
            "{} frames in a slice",
            big.frames
        );
        assert!(t0.elapsed() < Duration::from_secs(25), "{:?}", t0.elapsed());
        let last = r
            .capture(
                &d,
                &CaptureSlice {
                    last: true,
                    ..slice(false, 1)
                },
            )
            .unwrap();
        assert!(last.done);
    }

    #[test]
    fn a_probe_measures_the_chain_and_puts_the_links_back() {
        let (dp, r, d) = chain_carrying_packets();
        let before = dp.panel().current_links();
        let counted = r.status(&d).unwrap().links;
        let probe = telvirt_model::network::LatencyProbe {
            rate_pps: Some(20_000),
            packets: Some(2_000),
            ..Default::default()
        }
        .resolve(&d)
        .unwrap();
        let report = r.probe(&d, &probe).unwrap();
        assert_eq!(
            (report.sent, report.received, report.lost),
            (2_000, 2_000, 0)
        );
        assert!(
            report.p50_us > 0.0 && report.p50_us <= report.max_us,
            "{report:?}"
        );
        assert_eq!(report.from, "fw1.in");
        assert_eq!(dp.panel().current_links(), before);
        assert!(dp.panel().node_ports(ChainProbe::NODES[0]).is_none());
        // The network carries its own traffic again, on counters the probe did not reset.
        let after = r.status(&d).unwrap().links;
        for (b, a) in counted.iter().zip(&after) {
            assert!(
                a.packets >= b.packets && a.since == b.since,
                "{b:?} -> {a:?}"
            );
        }
        delivered_above(&r, &d, after[1].packets);
    }

    #[test]
    fn the_models_smallest_frame_is_the_generators() {
        assert_eq!(
            telvirt_model::network::MIN_FRAME_SIZE as usize,
            telvirt_dataplane::packet::MIN_FRAME
        );
    }

    #[test]
    fn a_switch_waits_until_the_new_instance_is_on_the_panel() {
        let cpu = telvirt_dataplane::worker::allowed_cores().unwrap()[0];
        let dp = NodeDataPlane::with_cores(&[cpu]).unwrap();
        let r = NetworkReconciler::new(Arc::clone(&dp));
        add_fw_named(&dp, "fw1");
        let d = parse_network(STEERED.as_bytes(), Format::Yaml).unwrap();
        let delivered = |st: &NetworkStatus, i: usize| st.steering[0].delivered[i].packets;
        until(&r, &d, "fw1 gets traffic", |st| delivered(st, 0) > 100);
        // fw2 is not running: the switch is held back, traffic stays on fw1, and why is shown.
        let mut to_fw2 = d.clone();
        to_fw2.spec.steering[0].active = Some("fw2".parse().unwrap());
        r.sync(std::slice::from_ref(&to_fw2));
        let st = r.status(&to_fw2).unwrap();
        assert_eq!(st.steering[0].active, "fw1", "{st:?}");
        assert!(
            st.waiting.iter().any(|w| w.contains("not switched to fw2")),
            "{st:?}"
        );
        let before = delivered(&st, 0);
        until(&r, &to_fw2, "fw1 still forwarding", |st| {
            delivered(st, 0) > before + 100
        });
        // Once fw2 runs, a later pass makes the switch.
        add_fw_named(&dp, "fw2");
        let st = until(&r, &to_fw2, "fw2 gets traffic", |st| delivered(st, 1) > 100);
        assert_eq!(
            (st.steering[0].active.as_str(), st.steering[0].generation),
            ("fw2", 1)
        );
        assert!(
            !st.waiting.iter().any(|w| w.contains("not switched")),
            "{st:?}"
        );
    }

    /// The CHAIN network wired through `fw1`, a node given by the test.
    fn wired_chain(
        fw1: Box<dyn telvirt_dataplane::node::Node>,
    ) -> (Arc<NodeDataPlane>, NetworkReconciler, NetworkDescriptor) {
        let cpu = telvirt_dataplane::worker::allowed_cores().unwrap()[0];
        let dp = NodeDataPlane::with_cores(&[cpu]).unwrap();
        let r = NetworkReconciler::new(Arc::clone(&dp));
        dp.add_node("fw1", &["in", "out"], 0, fw1).unwrap();
        let d = parse_network(CHAIN.as_bytes(), Format::Yaml).unwrap();
        until(&r, &d, "the chain wired", |st| {
            st.links.iter().all(|l| l.active)
        });
        (dp, r, d)
    }

    /// Takes every packet it is given and never sends one (a VNF that stopped forwarding).
    struct Blackhole;

    impl telvirt_dataplane::node::Node for Blackhole {
        fn poll(&mut self, io: &mut telvirt_dataplane::node::NodeIo<'_>) -> usize {
            let mut buf = Vec::new();
            let n = io.recv(0, &mut buf, 32);
            for p in buf {
                io.free(p);
            }
            n
        }
    }

    #[test]
    fn a_probe_through_a_chain_that_loses_everything_ends_and_counts_the_loss() {
        let (dp, r, d) = wired_chain(Box::new(Blackhole));
        let r = Arc::new(r);
        let probe = telvirt_model::network::LatencyProbe {
            rate_pps: Some(20_000),
            packets: Some(1_000),
            ..Default::default()
        }
        .resolve(&d)
        .unwrap();
        let prober = {
            let (r, d) = (Arc::clone(&r), d.clone());
            std::thread::spawn(move || r.probe(&d, &probe))
        };
        // Status reads and passes of the network go on while the probe runs.
        let deadline = Instant::now() + Duration::from_secs(20);
        while dp.panel().node_ports(ChainProbe::NODES[0]).is_none() {
            assert!(Instant::now() < deadline, "the probe never started");
            std::thread::sleep(Duration::from_millis(5));
        }
        r.sync(std::slice::from_ref(&d));
        assert!(r.status(&d).is_some());
        assert!(
            !prober.is_finished(),
            "the probe should still wait for its packets"
        );
        let report = prober.join().unwrap().unwrap();
        assert_eq!((report.sent, report.received), (1_000, 0), "{report:?}");
        assert_eq!(report.lost, 1_000, "{report:?}");
        // The chain's own links are back.
        let st = r.status(&d).unwrap();
        assert!(st.links.iter().all(|l| l.active), "{st:?}");
        assert!(dp.panel().node_ports(ChainProbe::NODES[0]).is_none());
    }

    /// Never takes a packet (a VNF that stopped reading, e.g. locked): its input ring fills.
    struct Stuck;

    impl telvirt_dataplane::node::Node for Stuck {
        fn poll(&mut self, _io: &mut telvirt_dataplane::node::NodeIo<'_>) -> usize {
            0
        }
    }

    #[test]
    fn a_probe_into_a_chain_that_stopped_reading_ends_on_its_deadline() {
        let (dp, r, d) = wired_chain(Box::new(Stuck));
        let probe = telvirt_model::network::LatencyProbe {
            rate_pps: Some(1_000_000),
            packets: Some(50_000),
            ..Default::default()
        }
        .resolve(&d)
        .unwrap();
        let report = r.probe(&d, &probe).unwrap();
        // The generator could not send everything into the full ring; nothing came out.
        assert!(report.sent < 50_000, "{report:?}");
        assert_eq!(report.received, 0, "{report:?}");
        assert_eq!(report.lost, report.sent, "{report:?}");
        assert!(dp.panel().node_ports(ChainProbe::NODES[0]).is_none());
    }

    /// A probe that comes before its network reached the data plane (`net apply`, then at once
    /// `latency chain`) waits for the network's pass; one for a network no pass applies is
    /// refused once the wait is over.
    #[test]
    fn a_probe_waits_for_a_network_applied_just_before_it() {
        let cpu = telvirt_dataplane::worker::allowed_cores().unwrap()[0];
        let dp = NodeDataPlane::with_cores(&[cpu]).unwrap();
        let r = Arc::new(NetworkReconciler::new(Arc::clone(&dp)));
        dp.add_node("fw1", &["in", "out"], 0, Box::new(Blackhole))
            .unwrap();
        let d = parse_network(CHAIN.as_bytes(), Format::Yaml).unwrap();
        let probe = telvirt_model::network::LatencyProbe {
            rate_pps: Some(20_000),
            packets: Some(100),
            ..Default::default()
        }
        .resolve(&d)
        .unwrap();
        let t0 = Instant::now();
        let e = r.probe(&d, &probe).unwrap_err().to_string();
        assert!(
            e.contains("not applied on this node's data plane yet"),
            "{e}"
        );
        assert!(t0.elapsed() >= PROBE_APPLY_WAIT, "{:?}", t0.elapsed());

        let prober = {
            let (r, d, probe) = (Arc::clone(&r), d.clone(), probe.clone());
            std::thread::spawn(move || r.probe(&d, &probe))
        };
        std::thread::sleep(Duration::from_millis(300));
        assert!(!prober.is_finished(), "a probe of no applied network waits");
        r.sync(std::slice::from_ref(&d));
        let report = prober.join().unwrap().unwrap();
        assert_eq!(report.sent, 100, "{report:?}");
    }

    /// Two generator-to-sink lanes, one faster than the other. The fast lane stays slow enough
    /// that a sink stalled for half a second under a loaded machine does not overflow its
    /// tunnel's queue and ring (512 + 1,024 frames): a test counting that lane's drops counts
    /// only misplaced ones (at 20 kpps, a 122 ms stall in CI dropped 1,656 frames).
    const TWO_LANES: &str = "apiVersion: telvirt/v1\nkind: Network\nmetadata: { name: l2 }\nspec:\n  nodes:\n    - { name: slow, kind: generator, rate_pps: 500 }\n    - { name: fast, kind: generator, rate_pps: 2000 }\n    - { name: sink1, kind: sink }\n    - { name: sink2, kind: sink }\n  links:\n    - slow.out -> sink1.in\n    - fast.out -> sink2.in\n";

    /// A reconciler of host `name` with a tunnel endpoint on loopback, and its address.
    fn tunnel_host(name: &str) -> (NetworkReconciler, String) {
        let cpu = telvirt_dataplane::worker::allowed_cores().unwrap()[0];
        let dp = NodeDataPlane::with_cores(&[cpu]).unwrap();
        let endpoint = VxlanEndpoint::bind(
            "127.0.0.1:0".parse().unwrap(),
            Arc::clone(dp.panel().pool()),
        )
        .unwrap();
        let address = endpoint.local_addr().to_string();
        let r = NetworkReconciler::new(dp).with_host(name, Some(endpoint));
        (r, address)
    }

    /// TWO_LANES spread as `hosts` says (node, host), VNIs 40 and 41.
    fn two_lanes_span(hosts: [(&str, &str); 4], tunnels: &[(&str, &str)]) -> NetworkSpan {
        NetworkSpan {
            network: "l2".into(),
            vni: 40,
            vnis: 2,
            hosts: hosts.map(|(n, h)| (n.to_owned(), h.to_owned())).into(),
            tunnels: tunnels
                .iter()
                .map(|(h, a)| ((*h).to_owned(), (*a).to_owned()))
                .collect(),
        }
    }

    #[test]
    fn frames_that_reach_a_host_with_no_tunnel_for_them_are_the_links_drops() {
        let (h1, a1) = tunnel_host("h1");
        let (h2, a2) = tunnel_host("h2");
        let d = parse_network(TWO_LANES.as_bytes(), Format::Yaml).unwrap();
        let tunnels = [
            ("h1", a1.as_str()),
            ("h2", a2.as_str()),
            ("h3", "127.0.0.1:9"),
        ];
        // h1 sends both links to h2; h2 holds sink1 on h3 (an older placement): link 0's
        // datagrams reach h2's endpoint (read while link 1's tunnel polls) with no tunnel.
        let sent_to_h2 = two_lanes_span(
            [
                ("slow", "h1"),
                ("fast", "h1"),
                ("sink1", "h2"),
                ("sink2", "h2"),
            ],
            &tunnels,
        );
        let stale = two_lanes_span(
            [
                ("slow", "h1"),
                ("fast", "h1"),
                ("sink1", "h3"),
                ("sink2", "h2"),
            ],
            &tunnels,
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            h1.sync_spans(std::slice::from_ref(&d), std::slice::from_ref(&sent_to_h2));
            h2.sync_spans(std::slice::from_ref(&d), std::slice::from_ref(&stale));
            let st = h2.status(&d).unwrap();
            let e = &st.tunnel_endpoints;
            // Held for EARLY_WAIT, then dropped: counted on link 0, not link 1.
            if st.links[0].drops > 0 && st.links[1].packets > 0 {
                assert_eq!(e.len(), 1, "{st:?}");
                assert_eq!(
                    (e[0].host.as_str(), e[0].address.as_str()),
                    ("h2", a2.as_str())
                );
                assert!(e[0].no_tunnel >= st.links[0].drops, "{st:?}");
                assert!(e[0].received > e[0].no_tunnel, "{st:?}");
                assert_eq!(st.links[1].drops, 0, "{st:?}");
                assert!(st.table.contains("tunnel endpoint"), "{}", st.table);
                break;
            }
            assert!(
                Instant::now() < deadline,
                "link 0's frames at h2 were never counted: {st:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // The sender's status reports its own endpoint, which dropped nothing.
        let sender = h1.status(&d).unwrap();
        assert_eq!(sender.tunnel_endpoints.len(), 1, "{sender:?}");
        assert_eq!(sender.tunnel_endpoints[0].no_tunnel, 0, "{sender:?}");
    }

    /// A tunnel's drops (here: what it received while the VNF behind it read nothing) are
    /// its link's, in the table's row as in the link's state, and once in its final counts.
    #[test]
    fn a_tunnels_drops_show_in_its_links_row_of_the_table() {
        let (h1, a1) = tunnel_host("h1");
        let (h2, a2) = tunnel_host("h2");
        h2.dp.add_node("x", &["in"], 0, Box::new(Stuck)).unwrap();
        let d = parse_network(
            b"apiVersion: telvirt/v1\nkind: Network\nmetadata: { name: n }\nspec:\n  nodes:\n    - { name: fast, kind: generator, rate_pps: 20000 }\n  links: [fast.out -> x.in]\n",
            Format::Yaml,
        )
        .unwrap();
        let span = NetworkSpan {
            network: "n".into(),
            vni: 80,
            vnis: 1,
            hosts: [("fast", "h1"), ("x", "h2")]
                .map(|(n, h)| (n.to_owned(), h.to_owned()))
                .into(),
            tunnels: [("h1", a1.as_str()), ("h2", a2.as_str())]
                .map(|(h, t)| (h.to_owned(), t.to_owned()))
                .into(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            h1.sync_spans(std::slice::from_ref(&d), std::slice::from_ref(&span));
            h2.sync_spans(std::slice::from_ref(&d), std::slice::from_ref(&span));
            let st = h2.status(&d).unwrap();
            if st.links[0].drops > 0 {
                let row = st
                    .table
                    .lines()
                    .find(|l| l.contains("-> x.in"))
                    .unwrap_or_else(|| panic!("no row of the link: {}", st.table));
                let shown: u64 = row.split_whitespace().last().unwrap().parse().unwrap();
                assert_eq!(shown, st.links[0].drops, "{}", st.table);
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the tunnel never dropped: {st:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // h1 stops sending; once h2 received all it sent, the network leaves h2: its final
        // counts hold every frame once, carried or dropped.
        let sent = Arc::clone(&h1.applied()["n"].tunnels["tun:n/0@h2"].stats);
        h1.sync_spans(&[], &[]);
        let sent = sent.tx_packets.load(Ordering::Relaxed);
        let e = Arc::clone(h2.vxlan.as_ref().unwrap());
        // Frames h2 took off its socket, or its kernel dropped (h1's end marker is no frame).
        let arrived = || {
            let s = e.stats();
            s.datagrams.load(Ordering::Relaxed) - s.end_markers.load(Ordering::Relaxed)
                + e.kernel_drops().unwrap()
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while arrived() < sent {
            assert!(Instant::now() < deadline, "h2 never received all {sent}");
            std::thread::sleep(Duration::from_millis(20));
        }
        h2.sync_spans(&[], &[]);
        let st = h2.status(&d).unwrap();
        let left = &st.departed[0].links[0];
        // The kernel's drops may hold h1's end marker too.
        let total = left.packets + left.drops + e.kernel_drops().unwrap();
        assert!(
            (sent..=sent + 1).contains(&total),
            "{total} of {sent}: {st:?}"
        );
    }

    #[test]
    fn a_held_instance_keeps_its_input_while_the_rest_of_its_network_rewires() {
        let (h1, _) = tunnel_host("h1");
        for (node, ports) in [("x", &["in", "out"][..]), ("b", &["in"][..])] {
            h1.dp.add_node(node, ports, 0, Box::new(Stuck)).unwrap();
        }
        let d = parse_network(
            b"apiVersion: telvirt/v1\nkind: Network\nmetadata: { name: n }\nspec:\n  links: [a.out -> x.in, x.out -> b.in]\n",
            Format::Yaml,
        )
        .unwrap();
        let span = |x_host: &str| NetworkSpan {
            network: "n".into(),
            vni: 70,
            vnis: 2,
            hosts: [("a", "h3"), ("x", x_host), ("b", "h1")]
                .map(|(n, h)| (n.to_owned(), h.to_owned()))
                .into(),
            tunnels: [("h2", "127.0.0.1:9"), ("h3", "127.0.0.1:9")]
                .map(|(h, t)| (h.to_owned(), t.to_owned()))
                .into(),
        };
        let live = || {
            let mut l: Vec<String> = h1.applied()["n"]
                .live
                .iter()
                .map(|l| l.to_string())
                .collect();
            l.sort();
            l
        };
        let from_h3 = "tun:n/0@h3.io -> x.in";
        h1.sync_spans(std::slice::from_ref(&d), &[span("h1")]);
        assert_eq!(live(), [from_h3, "x.out -> b.in"]);
        // x moves to h2, frozen here: what h3 still sends it arrives, what x sends from h2
        // reaches b.
        h1.dp.hold_links("x");
        h1.sync_spans(std::slice::from_ref(&d), &[span("h2")]);
        assert_eq!(live(), [from_h3, "tun:n/1@h2.io -> b.in"]);
        // Its tunnel stays past the linger of a tunnel no link needs.
        std::thread::sleep(TUNNEL_LINGER + Duration::from_millis(100));
        h1.sync_spans(std::slice::from_ref(&d), &[span("h2")]);
        assert_eq!(live(), [from_h3, "tun:n/1@h2.io -> b.in"]);
        assert!(h1.dp.node_ports("tun:n/0@h3").is_some());
        // Released: the network is as its span says.
        h1.dp.release_links("x");
        h1.sync_spans(std::slice::from_ref(&d), &[span("h2")]);
        assert_eq!(live(), ["tun:n/1@h2.io -> b.in"]);
    }

    /// A held node's senders: a link of this host until that sender rewires, a tunnel from
    /// another host until that host's end marker came after its last frame.
    #[test]
    fn a_held_node_hears_when_its_senders_rewired() {
        let (h1, at) = tunnel_host("h1");
        for (node, ports) in [
            ("x", &["in", "in2", "out"][..]),
            ("b", &["in"][..]),
            ("l", &["out"][..]),
        ] {
            h1.dp.add_node(node, ports, 0, Box::new(Stuck)).unwrap();
        }
        let d = parse_network(
            b"apiVersion: telvirt/v1\nkind: Network\nmetadata: { name: n }\nspec:\n  links: [a.out -> x.in, l.out -> x.in2, x.out -> b.in]\n",
            Format::Yaml,
        )
        .unwrap();
        let span = |x_host: &str| NetworkSpan {
            network: "n".into(),
            vni: 70,
            vnis: 3,
            hosts: [("a", "h3"), ("x", x_host), ("b", "h1"), ("l", "h1")]
                .map(|(n, h)| (n.to_owned(), h.to_owned()))
                .into(),
            tunnels: [("h2", "127.0.0.1:9"), ("h3", "127.0.0.1:9")]
                .map(|(h, t)| (h.to_owned(), t.to_owned()))
                .into(),
        };
        let sync = |x_host: &str| h1.sync_spans(std::slice::from_ref(&d), &[span(x_host)]);
        let done = || h1.dp.held_senders_done("x");
        sync("h1");
        // h3 (a socket of 127.0.0.1, as its tunnel names) sends a frame on link 0 and its end
        // (and a wait for them) before x is held: an end from before the hold says nothing.
        let h3 = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let from_h3 = Arc::clone(&h1.applied()["n"].tunnels["tun:n/0@h3"].stats);
        let h3_ends = |frame: u8, markers: u64| {
            h3.send_to(&vxlan::encap(70, &[frame; 60]).unwrap(), &at)
                .unwrap();
            h3.send_to(&vxlan::end_marker(70), &at).unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            while from_h3.end_marker_ns.load(Ordering::Acquire) == 0
                || !from_h3.sender_done()
                || h1
                    .vxlan
                    .as_ref()
                    .unwrap()
                    .stats()
                    .end_markers
                    .load(Ordering::Acquire)
                    < markers
            {
                assert!(Instant::now() < deadline, "h3's end never heard");
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        h3_ends(6, 1);
        // l is held too (another frozen source: it sends nothing).
        h1.dp.hold_links("x");
        h1.dp.hold_links("l");
        assert_eq!(done(), None, "no pass told since the hold");
        sync("h1");
        assert_eq!(done(), None, "h3's end came before the hold");
        // Its end since the hold: done, h3's link and l's stay.
        h3_ends(7, 2);
        assert_eq!(from_h3.rx_packets.load(Ordering::Relaxed), 2);
        assert_eq!(done(), Some(2));
        // l no longer held sends to x again.
        h1.dp.release_links("l");
        sync("h1");
        assert_eq!(done(), None, "l sends to x");
        // x moves to h2: l's link goes to h2's tunnel; nothing sends to x any more.
        sync("h2");
        assert_eq!(done(), Some(1), "h3's link stays");
        // h3 sends again (it linked x again): not done until its next end.
        h3.send_to(&vxlan::encap(70, &[8u8; 60]).unwrap(), &at)
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while from_h3.queued.load(Ordering::Acquire) < 3 {
            assert!(Instant::now() < deadline, "h3's third frame never came");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(done(), None);
        h1.dp.release_links("x");
        assert_eq!(done(), None, "released: not held");
    }

    /// A peer host whose tunnel address changes gets the link's frames at its new address
    /// (the tunnel is made again), as does a link whose VNI changes (a network given a new
    /// block): the old address and VNI are no longer used.
    #[test]
    fn a_tunnel_follows_its_peers_new_address_and_its_links_new_vni() {
        let (h1, _) = tunnel_host("h1");
        let d = parse_network(TWO_LANES.as_bytes(), Format::Yaml).unwrap();
        let old = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let new = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        for s in [&old, &new] {
            s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        }
        let spread = [
            ("slow", "h1"),
            ("fast", "h1"),
            ("sink1", "h2"),
            ("sink2", "h2"),
        ];
        let at = |peer: &std::net::UdpSocket| peer.local_addr().unwrap().to_string();
        // The VNI of the first frame `peer` receives within the deadline (an end marker, the
        // old VNI's when a link is renumbered, carries none).
        let vni_at = |peer: &std::net::UdpSocket, span: &NetworkSpan| {
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut buf = [0u8; 2048];
            loop {
                h1.sync_spans(std::slice::from_ref(&d), std::slice::from_ref(span));
                if let Ok(n) = peer.recv(&mut buf)
                    && n > vxlan::HEADER_LEN
                {
                    return vxlan::decap(&buf[..n]).unwrap().0;
                }
                assert!(
                    Instant::now() < deadline,
                    "nothing at {:?}",
                    peer.local_addr()
                );
            }
        };
        let first = two_lanes_span(spread, &[("h2", &at(&old))]);
        assert!([40, 41].contains(&vni_at(&old, &first)));
        let moved = two_lanes_span(spread, &[("h2", &at(&new))]);
        assert!([40, 41].contains(&vni_at(&new, &moved)));
        let renumbered = NetworkSpan {
            vni: 90,
            ..moved.clone()
        };
        // Frames in flight with the old VNI may still come: the new one comes in the end.
        let deadline = Instant::now() + Duration::from_secs(10);
        while ![90, 91].contains(&vni_at(&new, &renumbered)) {
            assert!(Instant::now() < deadline, "the old VNIs are still used");
        }
    }

    #[test]
    fn two_links_in_one_direction_between_two_hosts_travel_apart() {
        // Host names with dots, as a host's FQDN would be.
        let (h1, a1) = tunnel_host("h1.lab");
        let (h2, a2) = tunnel_host("h2.lab");
        let d = parse_network(TWO_LANES.as_bytes(), Format::Yaml).unwrap();
        // Both generators on h1, both sinks on h2: two links from h1 to h2.
        let span = two_lanes_span(
            [
                ("slow", "h1.lab"),
                ("fast", "h1.lab"),
                ("sink1", "h2.lab"),
                ("sink2", "h2.lab"),
            ],
            &[("h1.lab", a1.as_str()), ("h2.lab", a2.as_str())],
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            for h in [&h1, &h2] {
                h.sync_spans(std::slice::from_ref(&d), std::slice::from_ref(&span));
            }
            // Received first, sent after: what a sink got cannot exceed what its generator
            // had sent, unless the other link's frames reached it too.
            let received = h2.status(&d).unwrap();
            let sent = h1.status(&d).unwrap();
            for i in 0..2 {
                assert!(
                    received.links[i].packets <= sent.links[i].packets,
                    "link {i} delivered frames of the other link: sent {sent:?}, received {received:?}"
                );
            }
            if received.links.iter().all(|l| l.packets > 50) {
                assert!(received.waiting.is_empty(), "{received:?}");
                assert!(received.links[1].packets > received.links[0].packets);
                break;
            }
            assert!(
                Instant::now() < deadline,
                "both links never carried traffic: sent {sent:?}, received {received:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
