//! The network reconciler: makes the node's patch panel hold the links of every wanted
//! `kind: Network`, without stopping any VNF.
//!
//! Owns mapping network descriptors onto the data plane (links, built-in generator and sink
//! nodes, host ports) and reporting each network's live links and counters. A link whose end is
//! not on the panel yet (a VNF still starting, a host interface that cannot be opened) waits and
//! is wired by a later pass. It must not validate networks against VNFs (the controller does)
//! nor start VNFs (the runtimes do).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use telvirt_dataplane::afpacket::HostPort;
use telvirt_dataplane::graph::{self, LinkSpec, PortRef};
use telvirt_dataplane::traffic::{GenConfig, Generator, LatencySink, SinkState};
use telvirt_model::network::{
    BuiltinKind, BuiltinNode, Endpoint, LinkState, NetworkDescriptor, NetworkStatus,
};

use crate::AgentError;
use crate::dataplane::NodeDataPlane;

/// Default generator rate.
pub const DEFAULT_RATE_PPS: u64 = 10_000;

struct Applied {
    descriptor: NetworkDescriptor,
    /// Links wired now.
    live: Vec<LinkSpec>,
    /// Why other links are not.
    waiting: Vec<String>,
    /// Built-in nodes this network placed.
    builtins: Vec<String>,
    sinks: BTreeMap<String, Arc<Mutex<SinkState>>>,
}

/// Applies networks to one [`NodeDataPlane`].
pub struct NetworkReconciler {
    dp: Arc<NodeDataPlane>,
    applied: Mutex<BTreeMap<String, Applied>>,
}

fn port_ref(ep: &Endpoint) -> PortRef {
    match ep {
        Endpoint::Port { node, port } => PortRef::new(node, port),
        Endpoint::Host(ifname) => PortRef::host(ifname),
    }
}

fn host_node(ifname: &str) -> String {
    format!("host:{ifname}")
}

impl NetworkReconciler {
    pub fn new(dp: Arc<NodeDataPlane>) -> Self {
        Self {
            dp,
            applied: Mutex::new(BTreeMap::new()),
        }
    }

    fn applied(&self) -> MutexGuard<'_, BTreeMap<String, Applied>> {
        self.applied.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn add_builtin(&self, b: &BuiltinNode) -> Result<Option<Arc<Mutex<SinkState>>>, AgentError> {
        let dp = |e: telvirt_dataplane::Error| AgentError::DataPlane(e.to_string());
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
                let node = Generator::new(cfg, buf).map_err(dp)?;
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

    /// Removes a network's links and built-in nodes.
    fn tear_down(&self, name: &str, a: &Applied) {
        if !a.live.is_empty() {
            let _ = self.dp.panel().delete_network(name);
        }
        for b in &a.builtins {
            let _ = self.dp.remove_node(b);
        }
    }

    /// One pass: the panel ends up holding exactly `wanted` (links whose ends exist).
    pub fn sync(&self, wanted: &[NetworkDescriptor]) {
        let mut applied = self.applied();
        let gone: Vec<String> = applied
            .iter()
            .filter(|(n, a)| {
                !wanted
                    .iter()
                    .any(|w| w.name().as_str() == n.as_str() && *w == a.descriptor)
            })
            .map(|(n, _)| n.clone())
            .collect();
        for name in gone {
            if let Some(a) = applied.remove(&name) {
                self.tear_down(&name, &a);
            }
        }
        for d in wanted {
            let name = d.name().as_str().to_owned();
            if !applied.contains_key(&name) {
                let mut a = Applied {
                    descriptor: d.clone(),
                    live: Vec::new(),
                    waiting: Vec::new(),
                    builtins: Vec::new(),
                    sinks: BTreeMap::new(),
                };
                for b in &d.spec.nodes {
                    match self.add_builtin(b) {
                        Ok(sink) => {
                            a.builtins.push(b.name.as_str().to_owned());
                            if let Some(s) = sink {
                                a.sinks.insert(b.name.as_str().to_owned(), s);
                            }
                        }
                        Err(e) => a.waiting.push(format!("node {}: {e}", b.name)),
                    }
                }
                applied.insert(name.clone(), a);
            }
            let Some(a) = applied.get_mut(&name) else {
                continue;
            };
            self.wire(&name, a);
        }
    }

    /// Wires the links of one network whose ends are on the panel.
    fn wire(&self, name: &str, a: &mut Applied) {
        let mut links = Vec::new();
        let mut waiting: Vec<String> = a
            .waiting
            .iter()
            .filter(|w| w.starts_with("node "))
            .cloned()
            .collect();
        for (_, link) in a.descriptor.parsed_links() {
            let mut ready = true;
            for ep in [&link.from, &link.to] {
                match ep {
                    Endpoint::Port { node, port } => match self.dp.node_ports(node) {
                        Some(ports) if ports.iter().any(|p| p == port) => {}
                        Some(_) => {
                            ready = false;
                            waiting.push(format!("{node} has no port {port}"));
                        }
                        None => {
                            ready = false;
                            waiting.push(format!("{node} is not running on this node"));
                        }
                    },
                    Endpoint::Host(ifname) => {
                        let node = host_node(ifname);
                        if self.dp.node_ports(&node).is_none() {
                            let opened = HostPort::open(ifname)
                                .map_err(|e| AgentError::DataPlane(e.to_string()))
                                .and_then(|p| self.dp.add_node(&node, &[""], 0, Box::new(p)));
                            if let Err(e) = opened {
                                ready = false;
                                waiting.push(format!("host port {ifname}: {e}"));
                            }
                        }
                    }
                }
            }
            if ready {
                links.push(LinkSpec::new(port_ref(&link.from), port_ref(&link.to)));
            }
        }
        waiting.dedup();
        // A VNF that restarted lost its links on the panel: compare with what is live.
        let live_now = self.dp.panel().current_links();
        let intact = a.live.iter().all(|l| live_now.contains(l));
        if links != a.live || !intact {
            let result = if links.is_empty() {
                if a.live.is_empty() {
                    Ok(())
                } else {
                    self.dp.panel().delete_network(name).map(|_| ())
                }
            } else {
                self.dp.panel().apply_network(name, &links).map(|_| ())
            };
            match result {
                Ok(()) => a.live = links,
                Err(e) => {
                    waiting.push(e.to_string());
                    tracing::warn!(network = name, "cannot wire: {e}");
                }
            }
        }
        a.waiting = waiting;
    }

    /// The live state of network `d`, if this reconciler applied it.
    pub fn status(&self, d: &NetworkDescriptor) -> Option<NetworkStatus> {
        let applied = self.applied();
        let a = applied.get(d.name().as_str())?;
        let all = self.dp.panel().status();
        let mut mine = Vec::new();
        let mut links = Vec::new();
        for (i, link) in d.parsed_links() {
            let spec = LinkSpec::new(port_ref(&link.from), port_ref(&link.to));
            let live = all
                .iter()
                .find(|s| s.link == spec && a.live.contains(&spec));
            if let Some(s) = live {
                mine.push(s.clone());
            }
            links.push(LinkState {
                link: d.spec.links[i].clone(),
                active: live.is_some(),
                packets: live.map_or(0, |s| s.counters.packets),
                bytes: live.map_or(0, |s| s.counters.bytes),
                drops: live.map_or(0, |s| s.counters.drops),
            });
        }
        let mut table = graph::render(&mine);
        for (name, sink) in &a.sinks {
            let s = sink.lock().unwrap_or_else(|p| p.into_inner()).summary();
            table.push_str(&format!(
                "\nsink {name}: {} received, {} lost, latency p50 {:.1} us, p99 {:.1} us, p99.9 {:.1} us\n",
                s.received, s.lost, s.latency.p50_us, s.latency.p99_us, s.latency.p999_us
            ));
        }
        Some(NetworkStatus {
            links,
            table,
            waiting: a.waiting.clone(),
        })
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
        let fw = Firewall::new(Vec::new(), Action::Allow);
        dp.add_node(
            "fw1",
            &["in", "out"],
            0,
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
        let _ = dp.remove_node("fw1").unwrap();
        add_fw(&dp);
        delivered_above(&r, &d, 0);
        assert!(first > 0);

        // Deleting the network removes its links and built-in nodes, not fw1.
        r.sync(&[]);
        assert!(r.status(&d).is_none());
        assert!(dp.node_ports("gen").is_none() && dp.node_ports("sink").is_none());
        assert!(dp.node_ports("fw1").is_some());
        assert!(dp.panel().current_links().is_empty());
    }
}
