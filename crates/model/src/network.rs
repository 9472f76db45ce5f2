//! The network descriptor, v1 (`apiVersion: telvirt/v1`, `kind: Network`): which VNF ports,
//! host interfaces and built-in traffic nodes are linked on a node's data plane.
//!
//! Owns the descriptor's shape (strict: unknown fields are errors) and the rules that need no
//! other facts (link syntax, a port used once per direction, built-in node names and ports).
//! It must not look at VNFs, hosts or the store: whether `fw1` has a port `in` is checked by the
//! controller, which knows the VNFs.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::{FieldError, ModelError};
use crate::name::Name;
use crate::parse::{Format, from_text};
use crate::vnf::{ApiVersion, Metadata};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum NetworkKind {
    Network,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NetworkDescriptor {
    #[serde(rename = "apiVersion")]
    pub api_version: ApiVersion,
    pub kind: NetworkKind,
    pub metadata: Metadata,
    pub spec: NetworkSpec,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NetworkSpec {
    /// Built-in nodes this network adds to the data plane (traffic generator, latency sink).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<BuiltinNode>,
    /// Steering endpoints: logical nodes that stand for one of several VNF instances.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steering: Vec<SteeringEndpoint>,
    /// Links `node.port -> node.port`; `host:IFNAME` names a host interface of the host where
    /// the first VNF linked to it runs, `host:IFNAME@HOST` one of host HOST (it stays there
    /// while the VNFs move).
    pub links: Vec<String>,
}

/// A logical node (`fw`) that links use like a VNF (`gen.out -> fw.in`, `fw.out -> sink.in`):
/// traffic sent to `fw.in` reaches the `in` port of the active instance only, and what any
/// instance sends from `out` leaves through `fw.out`. Switching the active instance is one
/// atomic step on the data plane (no packet delivered to both or neither).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SteeringEndpoint {
    pub name: Name,
    /// The VNFs that may receive the endpoint's traffic (each with every port the links use).
    pub instances: Vec<Name>,
    /// The instance receiving traffic (default: the first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active: Option<Name>,
}

impl SteeringEndpoint {
    /// The instance traffic goes to.
    pub fn active_instance(&self) -> Option<&Name> {
        self.active.as_ref().or_else(|| self.instances.first())
    }

    /// The instances, comma-separated (for messages).
    pub fn instance_list(&self) -> String {
        self.instances
            .iter()
            .map(Name::as_str)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// A port of a steering endpoint that the links use, and which ways.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirroredPort {
    pub port: String,
    /// A link sends into `endpoint.port`: it is wired on to each instance's port.
    pub into: bool,
    /// A link takes from `endpoint.port`: each instance's port is wired back to it.
    pub out_of: bool,
}

/// Body of `PUT /v1/networks/{name}/steering/{endpoint}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SteerRequest {
    /// The instance that receives the endpoint's traffic from now on.
    pub active: Name,
}

/// What a built-in node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum BuiltinKind {
    /// Sends UDP test frames (sequence number and timestamp inside) out of port `out`.
    Generator,
    /// Receives on port `in` and records latency, loss and reordering.
    Sink,
}

impl BuiltinKind {
    /// The node's only port.
    pub fn port(self) -> &'static str {
        match self {
            BuiltinKind::Generator => "out",
            BuiltinKind::Sink => "in",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BuiltinNode {
    pub name: Name,
    pub kind: BuiltinKind,
    /// Generator: packets per second (default 10000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_pps: Option<u64>,
    /// Generator: frame size in bytes (default 64).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u32>,
    /// Generator: number of UDP flows (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flows: Option<u32>,
}

/// One end of a link.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Endpoint {
    /// `node.port`: a VNF's or a built-in node's port.
    Port { node: String, port: String },
    /// `host:IFNAME`, or `host:IFNAME@HOST`: interface IFNAME of the host where the first VNF
    /// linked to it runs, or of host HOST (a port that stays where it is while the VNFs it
    /// feeds move between hosts, as a switch port does).
    Host { ifname: String, on: Option<String> },
}

impl Endpoint {
    /// A host interface where the VNFs linked to it run.
    pub fn host(ifname: &str) -> Self {
        Endpoint::Host {
            ifname: ifname.to_owned(),
            on: None,
        }
    }

    /// The name this end has among a network's nodes: its node, or `host:IFNAME` for a host
    /// interface (how a network span says where each end is).
    pub fn node_key(&self) -> String {
        match self {
            Endpoint::Port { node, .. } => node.clone(),
            Endpoint::Host { ifname, .. } => format!("host:{ifname}"),
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Port { node, port } => write!(f, "{node}.{port}"),
            Endpoint::Host { ifname, on: None } => write!(f, "host:{ifname}"),
            Endpoint::Host {
                ifname,
                on: Some(h),
            } => write!(f, "host:{ifname}@{h}"),
        }
    }
}

/// A parsed link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub from: Endpoint,
    pub to: Endpoint,
}

fn endpoint(s: &str) -> Result<Endpoint, String> {
    let s = s.trim();
    if let Some(rest) = s.strip_prefix("host:") {
        let (ifname, on) = match rest.split_once('@') {
            Some((i, h)) => (i, Some(h)),
            None => (rest, None),
        };
        if ifname.is_empty() || ifname.len() > 15 || ifname.contains(['/', ' ', '.']) {
            return Err(format!(
                "`{s}`: a host interface name has 1 to 15 characters without '/', '.', '@' or ' '"
            ));
        }
        if let Some(h) = on
            && (h.is_empty() || h.len() > 253 || h.contains(['/', ' ', '@']))
        {
            return Err(format!(
                "`{s}`: the host after '@' has 1 to 253 characters without '/', '@' or ' '"
            ));
        }
        return Ok(Endpoint::Host {
            ifname: ifname.to_owned(),
            on: on.map(str::to_owned),
        });
    }
    let Some((node, port)) = s.split_once('.') else {
        return Err(format!("`{s}` must be `node.port` or `host:IFNAME`"));
    };
    node.parse::<Name>()
        .map_err(|e| format!("`{s}`: node: {e}"))?;
    port.parse::<Name>()
        .map_err(|e| format!("`{s}`: port: {e}"))?;
    Ok(Endpoint::Port {
        node: node.to_owned(),
        port: port.to_owned(),
    })
}

/// Parses `A -> B`.
pub fn parse_link(s: &str) -> Result<Link, String> {
    let Some((a, b)) = s.split_once("->") else {
        return Err(format!(
            "`{s}` must be `from -> to`, e.g. `fw1.out -> nat1.in`"
        ));
    };
    Ok(Link {
        from: endpoint(a)?,
        to: endpoint(b)?,
    })
}

impl NetworkDescriptor {
    pub fn name(&self) -> &Name {
        &self.metadata.name
    }

    /// The links, parsed (valid descriptors only: [`parse_network`] checked them).
    pub fn parsed_links(&self) -> Vec<(usize, Link)> {
        self.spec
            .links
            .iter()
            .enumerate()
            .filter_map(|(i, l)| parse_link(l).ok().map(|l| (i, l)))
            .collect()
    }

    /// The VNFs it names: link ends that are not its own nodes, and steering instances.
    pub fn named_vnfs(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for (_, link) in self.parsed_links() {
            for ep in [link.from, link.to] {
                if let Endpoint::Port { node, .. } = ep
                    && self.builtin(&node).is_none()
                    && self.steering(&node).is_none()
                {
                    out.insert(node);
                }
            }
        }
        for e in &self.spec.steering {
            out.extend(e.instances.iter().map(|i| i.as_str().to_owned()));
        }
        out
    }

    /// The built-in node named `name`.
    pub fn builtin(&self, name: &str) -> Option<&BuiltinNode> {
        self.spec.nodes.iter().find(|n| n.name.as_str() == name)
    }

    /// The steering endpoint named `name`.
    pub fn steering(&self, name: &str) -> Option<&SteeringEndpoint> {
        self.spec.steering.iter().find(|e| e.name.as_str() == name)
    }

    /// Ports of each steering endpoint that the links use, in first-use order.
    pub fn steering_ports(&self) -> BTreeMap<String, Vec<String>> {
        self.mirrored_ports()
            .into_iter()
            .map(|(e, ports)| (e, ports.into_iter().map(|p| p.port).collect()))
            .collect()
    }

    /// [`NetworkDescriptor::steering_ports`] with the ways the links use each port: what the
    /// data plane wires between the endpoint and each of its instances.
    pub fn mirrored_ports(&self) -> BTreeMap<String, Vec<MirroredPort>> {
        let mut out: BTreeMap<String, Vec<MirroredPort>> = BTreeMap::new();
        for (_, l) in self.parsed_links() {
            for (ep, into) in [(&l.from, false), (&l.to, true)] {
                if let Endpoint::Port { node, port } = ep
                    && self.steering(node).is_some()
                {
                    let ports = out.entry(node.clone()).or_default();
                    let at = match ports.iter().position(|p| p.port == *port) {
                        Some(at) => at,
                        None => {
                            ports.push(MirroredPort {
                                port: port.clone(),
                                into: false,
                                out_of: false,
                            });
                            ports.len() - 1
                        }
                    };
                    if into {
                        ports[at].into = true;
                    } else {
                        ports[at].out_of = true;
                    }
                }
            }
        }
        out
    }

    /// Every rule that needs no other facts, each with its field path.
    pub fn violations(&self) -> Vec<FieldError> {
        let mut out = Vec::new();
        if self.spec.links.len() > MAX_NETWORK_LINKS {
            out.push(FieldError::new(
                "spec.links",
                format!(
                    "{} links are more than the {MAX_NETWORK_LINKS} a network may have; split it into several networks",
                    self.spec.links.len()
                ),
            ));
        }
        let mut builtins: BTreeMap<&str, usize> = BTreeMap::new();
        for (i, n) in self.spec.nodes.iter().enumerate() {
            if let Some(j) = builtins.insert(n.name.as_str(), i) {
                out.push(FieldError::new(
                    format!("spec.nodes[{i}].name"),
                    format!("`{}` is already the name of spec.nodes[{j}]", n.name),
                ));
            }
            let generator_only = [
                ("rate_pps", n.rate_pps.is_some()),
                ("size", n.size.is_some()),
                ("flows", n.flows.is_some()),
            ];
            if n.kind == BuiltinKind::Sink {
                for (field, set) in generator_only {
                    if set {
                        out.push(FieldError::new(
                            format!("spec.nodes[{i}].{field}"),
                            "only a generator takes this field",
                        ));
                    }
                }
            }
            match n.rate_pps {
                Some(0) => out.push(FieldError::new(
                    format!("spec.nodes[{i}].rate_pps"),
                    "must be at least 1 packet per second",
                )),
                Some(r) if r > MAX_GENERATOR_PPS => out.push(FieldError::new(
                    format!("spec.nodes[{i}].rate_pps"),
                    format!(
                        "{r} is more than the {MAX_GENERATOR_PPS} packets per second a generator \
                         may send (it shares the node's data-plane workers)"
                    ),
                )),
                _ => {}
            }
            if let Some(size) = n.size
                && !(MIN_FRAME_SIZE..=MAX_FRAME_SIZE).contains(&size)
            {
                out.push(FieldError::new(
                    format!("spec.nodes[{i}].size"),
                    format!("{size} is not a frame size in {MIN_FRAME_SIZE}..={MAX_FRAME_SIZE}"),
                ));
            }
            if n.flows == Some(0) {
                out.push(FieldError::new(
                    format!("spec.nodes[{i}].flows"),
                    "must be at least 1",
                ));
            }
        }
        if self.spec.steering.len() > MAX_STEERING_ENDPOINTS {
            out.push(FieldError::new(
                "spec.steering",
                format!(
                    "{} steering endpoints are more than the {MAX_STEERING_ENDPOINTS} a network may have",
                    self.spec.steering.len()
                ),
            ));
        }
        for (i, e) in self
            .spec
            .steering
            .iter()
            .enumerate()
            .take(MAX_STEERING_ENDPOINTS)
        {
            let path = format!("spec.steering[{i}]");
            if e.instances.len() > MAX_STEERING_INSTANCES {
                out.push(FieldError::new(
                    format!("{path}.instances"),
                    format!(
                        "{} instances are more than the {MAX_STEERING_INSTANCES} an endpoint may steer to",
                        e.instances.len()
                    ),
                ));
                continue;
            }
            if let Some(j) = builtins.get(e.name.as_str()) {
                out.push(FieldError::new(
                    format!("{path}.name"),
                    format!("`{}` is already the name of spec.nodes[{j}]", e.name),
                ));
            } else if let Some(j) = self.spec.steering[..i]
                .iter()
                .position(|o| o.name == e.name)
            {
                out.push(FieldError::new(
                    format!("{path}.name"),
                    format!("`{}` is already the name of spec.steering[{j}]", e.name),
                ));
            }
            if e.instances.is_empty() {
                out.push(FieldError::new(
                    format!("{path}.instances"),
                    "an endpoint needs at least one instance",
                ));
            }
            for (k, inst) in e.instances.iter().enumerate() {
                if e.instances[..k].contains(inst) {
                    out.push(FieldError::new(
                        format!("{path}.instances[{k}]"),
                        format!("`{inst}` is listed twice"),
                    ));
                }
                if builtins.contains_key(inst.as_str()) || self.steering(inst.as_str()).is_some() {
                    out.push(FieldError::new(
                        format!("{path}.instances[{k}]"),
                        format!("`{inst}` is a node of this network, not a VNF"),
                    ));
                }
            }
            if let Some(a) = &e.active
                && !e.instances.contains(a)
            {
                out.push(FieldError::new(
                    format!("{path}.active"),
                    format!("`{a}` is not one of the instances ({})", e.instance_list()),
                ));
            }
        }
        if self.spec.links.is_empty() {
            out.push(FieldError::new(
                "spec.links",
                "a network needs at least one link",
            ));
        }
        let mut sources: BTreeMap<Endpoint, usize> = BTreeMap::new();
        let mut targets: BTreeMap<Endpoint, usize> = BTreeMap::new();
        for (i, text) in self.spec.links.iter().enumerate() {
            let link = match parse_link(text) {
                Ok(l) => l,
                Err(e) => {
                    out.push(FieldError::new(format!("spec.links[{i}]"), e));
                    continue;
                }
            };
            for (end, ep, seen) in [
                ("from", &link.from, &mut sources),
                ("to", &link.to, &mut targets),
            ] {
                let path = format!("spec.links[{i}].{end}");
                if let Endpoint::Port { node, port } = ep
                    && let Some(b) = self.builtin(node)
                    && port != b.kind.port()
                {
                    out.push(FieldError::new(
                        &path,
                        format!(
                            "built-in node {node} ({:?}) has the single port `{}`",
                            b.kind,
                            b.kind.port()
                        ),
                    ));
                }
                if let Some(j) = seen.insert(ep.clone(), i) {
                    out.push(FieldError::new(
                        &path,
                        format!(
                            "port {ep} is already linked {} by spec.links[{j}]; a port sends \
                             on at most one link and receives from at most one",
                            if end == "from" { "out" } else { "in" }
                        ),
                    ));
                }
            }
            if link.from == link.to {
                out.push(FieldError::new(
                    format!("spec.links[{i}]"),
                    "a port cannot be linked to itself",
                ));
            }
        }
        let mirrored = self.steering_ports();
        for (i, e) in self.spec.steering.iter().enumerate() {
            if !mirrored.contains_key(e.name.as_str()) {
                out.push(FieldError::new(
                    format!("spec.steering[{i}]"),
                    format!(
                        "steering endpoint {} is used by no link; link its ports \
                         (e.g. `{}.in`) or leave it out",
                        e.name, e.name
                    ),
                ));
            }
        }
        for (i, link) in self.parsed_links() {
            for (end, ep) in [("from", &link.from), ("to", &link.to)] {
                let Endpoint::Port { node, port } = ep else {
                    continue;
                };
                for e in &self.spec.steering {
                    let uses = mirrored
                        .get(e.name.as_str())
                        .is_some_and(|p| p.contains(port));
                    if uses && e.instances.iter().any(|x| x.as_str() == node) {
                        out.push(FieldError::new(
                            format!("spec.links[{i}].{end}"),
                            format!(
                                "{ep} is wired through steering endpoint {0} (as {0}.{port}); \
                                 link {0}.{port} instead",
                                e.name
                            ),
                        ));
                    }
                }
            }
        }
        out
    }
}

/// A stored network as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Network {
    pub name: Name,
    /// The authority that owns it.
    pub owner: Name,
    pub descriptor: NetworkDescriptor,
    pub created_at: String,
    /// The first of the VXLAN network identifiers its links between hosts travel with: link
    /// `i` of the descriptor travels with `vni + i` (given at creation, and again when the
    /// network grows beyond `vnis` links; 0 for a network stored before identifiers were
    /// given).
    #[serde(default)]
    pub vni: u32,
    /// How many identifiers from `vni` the network holds (0 for a network stored when each
    /// had one: it holds just `vni`).
    #[serde(default)]
    pub vnis: u32,
    /// What the node's data plane holds now (filled by `GET /v1/networks/{name}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<NetworkStatus>,
}

/// The live state of a network on the node's data plane.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NetworkStatus {
    /// One entry per descriptor link, in descriptor order.
    pub links: Vec<LinkState>,
    /// The `net show` table: links in chain order with their counters.
    pub table: String,
    /// Why links are not live, if any are not.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub waiting: Vec<String>,
    /// Steering endpoints as the data plane holds them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steering: Vec<SteeringState>,
    /// Nodes of the network that dropped packets outside any link.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub node_drops: Vec<NodeDropState>,
    /// The network's built-in sinks: what each received and its latency distribution.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sinks: Vec<SinkStatus>,
    /// The host interfaces the network's links name, as their ports on this node hold them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub host_ports: Vec<HostPortStatus>,
    /// The tunnel endpoints of the hosts the network's links cross between, as each host's
    /// endpoint counts (shared by every network of that host).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tunnel_endpoints: Vec<TunnelEndpointStatus>,
    /// What the network counted on hosts it left (a VNF moved or failed over away, and with
    /// it the network's part on that host): their final counts, which the live ones above do
    /// not hold.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub departed: Vec<DepartedCounts>,
    /// Each holding host's own counts, from the hosts that answered (`links` and `node_drops`
    /// above merge them): each grows for as long as the network keeps its part on that host,
    /// whichever host answers first or not at all. `/metrics` gives them with a `host` label.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<HostCounts>,
}

/// What one host's data plane counted of a network. A link between hosts counts on both: on
/// its sender's host what went into the tunnel, on its receiver's what came out of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HostCounts {
    pub host: String,
    /// The links wired on the host now (one that is not, its end restarting say, is left
    /// out rather than shown at zero: its counts come back with it).
    pub links: Vec<LinkState>,
    /// Nodes that dropped packets outside any link there.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub node_drops: Vec<NodeDropState>,
}

impl HostCounts {
    /// Host `host`'s counts in the status it reported: the links wired there.
    pub fn of(host: &str, st: &NetworkStatus) -> Self {
        Self {
            host: host.to_owned(),
            links: st.links.iter().filter(|l| l.active).cloned().collect(),
            node_drops: st.node_drops.clone(),
        }
    }
}

impl NetworkStatus {
    /// The status of network `d` where no data plane holds it: every link waits, nothing
    /// counted.
    pub fn idle(d: &NetworkDescriptor) -> Self {
        Self {
            links: d
                .spec
                .links
                .iter()
                .map(|l| LinkState {
                    link: l.clone(),
                    active: false,
                    packets: 0,
                    bytes: 0,
                    drops: 0,
                    since: String::new(),
                })
                .collect(),
            table: String::new(),
            waiting: Vec::new(),
            steering: Vec::new(),
            node_drops: Vec::new(),
            sinks: Vec::new(),
            host_ports: Vec::new(),
            tunnel_endpoints: Vec::new(),
            departed: Vec::new(),
            hosts: Vec::new(),
        }
    }
}

/// The final counts of a network's part on a host it left: one departure as the host's agent
/// keeps it (the latest departures of the networks that left last, in its data dir too), or,
/// as `net show` gives them, every departure of the network from that host summed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DepartedCounts {
    pub host: String,
    /// When the network (last) left the host (RFC 3339, by the host's clock).
    pub left_at: String,
    /// One entry per descriptor link the host carried (`active` false, `since` when its
    /// counters there started).
    pub links: Vec<LinkState>,
    /// Nodes that dropped packets outside any link there (a moved VNF's source instance
    /// refusing what its freeze's queue could not hold, say).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub node_drops: Vec<NodeDropState>,
    /// Built-in sinks the network had there.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sinks: Vec<SinkStatus>,
}

impl DepartedCounts {
    /// Adds the counts of a later departure from the same host (`left_at` becomes its).
    pub fn add(&mut self, later: DepartedCounts) {
        self.left_at = later.left_at;
        for l in later.links {
            match self.links.iter_mut().find(|x| x.link == l.link) {
                Some(x) => {
                    x.packets += l.packets;
                    x.bytes += l.bytes;
                    x.drops += l.drops;
                }
                None => self.links.push(l),
            }
        }
        add_node_drops(&mut self.node_drops, later.node_drops);
        add_sinks(&mut self.sinks, later.sinks);
    }

    /// The lines `net show` prints for it.
    pub fn render(&self) -> String {
        let mut out = format!(
            "\nhost {}, which the network left at {} (final counts):\n",
            self.host, self.left_at
        );
        for l in self.links.iter().filter(|l| l.packets + l.drops > 0) {
            out.push_str(&format!(
                "  {}: {} packets, {} bytes, {} dropped\n",
                l.link, l.packets, l.bytes, l.drops
            ));
        }
        for d in &self.node_drops {
            out.push_str(&format!(
                "  {}: {} packets dropped on unlinked ports, {} dropped by the node itself\n",
                d.node, d.unlinked, d.refused
            ));
        }
        for s in &self.sinks {
            out.push_str(&format!(
                "  sink {}: {} received, {} lost\n",
                s.name, s.received, s.lost
            ));
        }
        out
    }
}

/// Adds `more` into `into`: a node two reports name is one, its counts add up.
pub fn add_node_drops(into: &mut Vec<NodeDropState>, more: Vec<NodeDropState>) {
    for d in more {
        match into.iter_mut().find(|x| x.node == d.node) {
            Some(x) => {
                x.unlinked += d.unlinked;
                x.refused += d.refused;
            }
            None => into.push(d),
        }
    }
}

/// Adds `more` into `into`: a sink two reports name is one, its counts and latencies add up.
pub fn add_sinks(into: &mut Vec<SinkStatus>, more: Vec<SinkStatus>) {
    for s in more {
        match into.iter_mut().find(|x| x.name == s.name) {
            Some(x) => {
                x.received += s.received;
                x.lost += s.lost;
                x.bytes += s.bytes;
                x.latency_sum_ns += s.latency_sum_ns;
                for (mine, theirs) in x.latency_buckets.iter_mut().zip(&s.latency_buckets) {
                    *mine += theirs;
                }
            }
            None => into.push(s),
        }
    }
}

/// A host's tunnel endpoint (its one VXLAN socket): what reached it and what it dropped before
/// any tunnel took it. Counters run for the life of the agent. A drop that names a link's VNI
/// (for no tunnel, queued in a tunnel when it was removed) is also in that link's `drops`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TunnelEndpointStatus {
    /// The host whose endpoint it is.
    pub host: String,
    /// The endpoint's UDP address.
    pub address: String,
    /// Datagrams read from the socket (frames, and the end markers of senders whose link
    /// into a tunnel went).
    pub received: u64,
    /// Datagrams the kernel dropped before the endpoint read them (its receive buffer full).
    pub kernel_dropped: u64,
    /// Datagrams that are not VXLAN (too short, or the I flag missing).
    pub not_vxlan: u64,
    /// Datagrams for a (source, VNI) with no tunnel here, dropped after being held for one.
    pub no_tunnel: u64,
    /// Datagrams a tunnel still queued when it was removed.
    pub removed_queued: u64,
}

/// A host port (a host interface on the data plane): how it moves frames and what it moved.
/// Counters run for the life of the port (shared by every network naming the interface).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HostPortStatus {
    /// The host whose interface it is (the agent's host name).
    pub host: String,
    /// The host interface.
    pub interface: String,
    /// How the port receives and sends: `af_xdp_zerocopy` or `af_xdp_copy` (an AF_XDP socket),
    /// `tpacket_v3` (an AF_PACKET socket with a mapped receive ring) or `recvmmsg`.
    pub socket: String,
    /// Why AF_XDP is not used on the interface (more than one receive queue, no native XDP,
    /// an MTU too large for XDP, another XDP program attached).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub af_xdp_refused: Option<String>,
    /// The interface's receive queues, one AF_XDP socket each (none: not AF_XDP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub af_xdp_queues: Option<u32>,
    /// Frames received from the interface into the data plane.
    pub received: u64,
    /// Frames sent on the interface.
    pub sent: u64,
    /// Frames that arrived on the interface and were dropped: by the kernel before the port
    /// took them (its receive ring full), larger than a buffer, or no free buffer.
    pub rx_dropped: u64,
    /// Frames the port could not send (the kernel refused them, or its transmit ring was full).
    pub tx_dropped: u64,
}

/// Upper bounds (nanoseconds) of the buckets a sink's latency distribution is reported in
/// ([`SinkStatus::latency_buckets`]): 1 µs to 1 s in 1-2.5-5 steps; one more bucket past the
/// last takes everything slower.
pub const SINK_LATENCY_BOUNDS_NS: [u64; 19] = [
    1_000,
    2_500,
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
];

/// A built-in sink of a network as the data plane holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SinkStatus {
    pub name: String,
    /// Test frames received.
    pub received: u64,
    /// Test frames that never arrived (sequence numbers below the highest seen).
    pub lost: u64,
    /// Bytes of every frame received.
    pub bytes: u64,
    /// Test frames per latency bucket, not cumulative: entry `i` counts the frames slower than
    /// bound `i - 1` and at most [`SINK_LATENCY_BOUNDS_NS`]`[i]`; the last entry counts those
    /// slower than every bound.
    pub latency_buckets: Vec<u64>,
    /// Sum of the test frames' one-way latencies, nanoseconds.
    pub latency_sum_ns: u64,
}

/// Packets one node of a network dropped outside any link.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NodeDropState {
    /// The node (a VNF, a built-in node, a steering endpoint).
    pub node: String,
    /// Sent to one of its ports that had no link (a steering endpoint's instance not wired
    /// here, a port the network leaves open).
    pub unlinked: u64,
    /// Dropped by its own verdict (a firewall's deny, a VNF's drop).
    pub refused: u64,
}

/// A steering endpoint on the data plane.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SteeringState {
    pub name: String,
    /// The instance receiving the endpoint's traffic now.
    pub active: String,
    /// Number of switches since the endpoint was created.
    pub generation: u32,
    /// Packets the endpoint sent to each instance, in instance order.
    pub delivered: Vec<InstanceCount>,
}

/// Packets delivered to one instance of a steering endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct InstanceCount {
    pub instance: String,
    pub packets: u64,
}

/// One link with its counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LinkState {
    pub link: String,
    /// Wired on the data plane now (false while an end is not running).
    pub active: bool,
    pub packets: u64,
    pub bytes: u64,
    /// Packets dropped because the link's ring was full (or, for a link between hosts, the
    /// tunnel could not carry).
    pub drops: u64,
    /// When the link's counters started from zero (RFC 3339; they only grow while the network
    /// holds the link, through probes, re-applies and restarts of its ends). Empty while the
    /// link is not live.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub since: String,
}

/// Body of `POST /v1/networks/{name}/latency`: a probe generator sends timestamped frames into
/// `from` and a probe sink takes them from `to` while the rest of the network runs on.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LatencyProbe {
    /// Port the probe sends into (default: where the network's generator or host port feeds
    /// the chain).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// Port the probe receives from (default: what feeds the network's sink or host port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// Packets per second (default 10000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_pps: Option<u64>,
    /// Packets to send (default 20000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packets: Option<u64>,
    /// Frame size in bytes (default 64).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u32>,
}

/// Smallest frame the data plane's generator writes (Ethernet, IPv4, UDP, sequence number and
/// timestamp), in bytes.
pub const MIN_FRAME_SIZE: u32 = 62;
/// Largest generated frame: a full Ethernet frame without FCS.
pub const MAX_FRAME_SIZE: u32 = 1514;
/// Most links one network may have (each may need its own VXLAN identifier between hosts).
pub const MAX_NETWORK_LINKS: usize = 1024;
/// Most steering endpoints in one network.
pub const MAX_STEERING_ENDPOINTS: usize = 256;
/// Most instances one steering endpoint chooses among.
pub const MAX_STEERING_INSTANCES: usize = 64;
/// Highest `rate_pps` of a generator node.
pub const MAX_GENERATOR_PPS: u64 = 1_000_000;

/// Longest probe the API runs, in seconds of sending.
pub const MAX_PROBE_SECONDS: u64 = 60;

/// A probe with its defaults filled in and its ports resolved against a network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedProbe {
    pub from: Endpoint,
    pub to: Endpoint,
    pub rate_pps: u64,
    pub packets: u64,
    pub size: u32,
    /// Links of the network that the probe takes over while it runs (`X -> from`, `to -> Y`).
    pub displaced: Vec<String>,
}

impl LatencyProbe {
    /// Fills defaults and checks every field against `network`; errors name the field.
    pub fn resolve(&self, network: &NetworkDescriptor) -> Result<ResolvedProbe, ModelError> {
        let mut errs = Vec::new();
        let rate_pps = self.rate_pps.unwrap_or(10_000);
        let packets = self.packets.unwrap_or(20_000);
        let size = self.size.unwrap_or(64);
        if !(1..=1_000_000).contains(&rate_pps) {
            errs.push(FieldError::new(
                "rate_pps",
                format!("{rate_pps} is not in 1..=1000000 packets per second"),
            ));
        }
        if packets == 0 {
            errs.push(FieldError::new("packets", "must be at least 1"));
        } else if rate_pps > 0 && packets.div_ceil(rate_pps) > MAX_PROBE_SECONDS {
            errs.push(FieldError::new(
                "packets",
                format!(
                    "{packets} packets at {rate_pps}/s take longer than {MAX_PROBE_SECONDS} s; \
                     send at most {}",
                    rate_pps * MAX_PROBE_SECONDS
                ),
            ));
        }
        if !(MIN_FRAME_SIZE..=MAX_FRAME_SIZE).contains(&size) {
            errs.push(FieldError::new(
                "size",
                format!("{size} is not a frame size in {MIN_FRAME_SIZE}..={MAX_FRAME_SIZE}"),
            ));
        }
        let links = network.parsed_links();
        let feeds = |ep: &Endpoint, kind: BuiltinKind| match ep {
            Endpoint::Host { .. } => true,
            Endpoint::Port { node, .. } => network.builtin(node).is_some_and(|b| b.kind == kind),
        };
        // `receives`: the probe sends into the port, so the chain must send into it too (it
        // is some link's `to`); otherwise the probe takes from it (some link's `from`).
        let mut end = |field: &str,
                       given: &Option<String>,
                       default: Option<Endpoint>,
                       receives: bool| {
            let ep = match given {
                Some(text) => match endpoint(text) {
                    Ok(ep) => Some(ep),
                    Err(e) => {
                        errs.push(FieldError::new(field, e));
                        None
                    }
                },
                None => {
                    if default.is_none() {
                        errs.push(FieldError::new(
                            field,
                            "the network has no generator or host port to take it from; \
                             name a port (e.g. fw1.in)",
                        ));
                    }
                    default
                }
            };
            match ep {
                Some(h @ Endpoint::Host { .. }) => {
                    errs.push(FieldError::new(
                        field,
                        format!("{h} is a host interface; the probe needs a VNF or endpoint port"),
                    ));
                    None
                }
                Some(Endpoint::Port { node, port }) => {
                    if network.builtin(&node).is_some() {
                        errs.push(FieldError::new(
                            field,
                            format!("{node} is a built-in node; name a VNF or endpoint port"),
                        ));
                        return None;
                    }
                    let is = |e: &Endpoint| matches!(e, Endpoint::Port { node: n, port: p } if *n == node && *p == port);
                    if !links.iter().any(|(_, l)| is(&l.from) || is(&l.to)) {
                        errs.push(FieldError::new(
                            field,
                            format!("{node}.{port} is not a port of network {}", network.name()),
                        ));
                        return None;
                    }
                    let right_way = links
                        .iter()
                        .any(|(_, l)| if receives { is(&l.to) } else { is(&l.from) });
                    if !right_way {
                        errs.push(FieldError::new(
                            field,
                            if receives {
                                format!(
                                    "{node}.{port} is an output in network {}: the probe sends \
                                     into a port that a link sends into (a link's right side)",
                                    network.name()
                                )
                            } else {
                                format!(
                                    "{node}.{port} is an input in network {}: the probe takes \
                                     from a port that a link takes from (a link's left side)",
                                    network.name()
                                )
                            },
                        ));
                        return None;
                    }
                    Some(Endpoint::Port { node, port })
                }
                None => None,
            }
        };
        let from = end(
            "from",
            &self.from,
            links
                .iter()
                .find(|(_, l)| feeds(&l.from, BuiltinKind::Generator))
                .map(|(_, l)| l.to.clone()),
            true,
        );
        let to = end(
            "to",
            &self.to,
            links
                .iter()
                .find(|(_, l)| feeds(&l.to, BuiltinKind::Sink))
                .map(|(_, l)| l.from.clone()),
            false,
        );
        match (from, to) {
            (Some(from), Some(to)) if errs.is_empty() => {
                let displaced = links
                    .iter()
                    .filter(|(_, l)| l.to == from || l.from == to)
                    .map(|(i, _)| network.spec.links[*i].clone())
                    .collect();
                Ok(ResolvedProbe {
                    from,
                    to,
                    rate_pps,
                    packets,
                    size,
                    displaced,
                })
            }
            _ => Err(ModelError::Invalid(errs)),
        }
    }
}

/// Most frames one capture takes.
pub const MAX_CAPTURE_PACKETS: u64 = 10_000_000;
/// Longest one capture runs, in milliseconds (an hour).
pub const MAX_CAPTURE_MS: u64 = 3_600_000;

/// Body of `POST /v1/networks/{name}/capture`: the frames one link of the network carries, as
/// a pcapng stream that ends after `packets` frames or `duration_ms`, whichever comes first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CaptureRequest {
    /// The link: the port it leaves (`fw1.out`), the port it enters (`sink.in`), or the link as
    /// the descriptor writes it (`fw1.out -> sink.in`).
    pub link: String,
    /// Frames to take (default 1000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packets: Option<u64>,
    /// Longest the capture runs, in milliseconds (default 10000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// Bytes kept of each frame (default and most 65535, at least 64).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snaplen: Option<u32>,
}

/// A [`CaptureRequest`] checked against its network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedCapture {
    /// Index of the link in the descriptor's `spec.links`.
    pub link: usize,
    pub packets: u64,
    pub duration_ms: u64,
    pub snaplen: u32,
}

impl CaptureRequest {
    /// Fills defaults and checks every field against `network`; errors name the field.
    pub fn resolve(&self, network: &NetworkDescriptor) -> Result<ResolvedCapture, ModelError> {
        let mut errs = Vec::new();
        let packets = self.packets.unwrap_or(1000);
        let duration_ms = self.duration_ms.unwrap_or(10_000);
        let snaplen = self.snaplen.unwrap_or(65535);
        if !(1..=MAX_CAPTURE_PACKETS).contains(&packets) {
            errs.push(FieldError::new(
                "packets",
                format!("{packets} is not in 1..={MAX_CAPTURE_PACKETS}"),
            ));
        }
        if !(1..=MAX_CAPTURE_MS).contains(&duration_ms) {
            errs.push(FieldError::new(
                "duration_ms",
                format!("{duration_ms} is not in 1..={MAX_CAPTURE_MS} milliseconds"),
            ));
        }
        if !(64..=65535).contains(&snaplen) {
            errs.push(FieldError::new(
                "snaplen",
                format!("{snaplen} is not in 64..=65535 bytes"),
            ));
        }
        let links = network.parsed_links();
        let wanted = self.link.trim();
        let by_text = parse_link(wanted)
            .ok()
            .and_then(|w| links.iter().find(|(_, l)| *l == w));
        let by_port = |to: bool| {
            links
                .iter()
                .find(|(_, l)| (if to { &l.to } else { &l.from }).to_string() == wanted)
        };
        let link = match by_text.or_else(|| by_port(false)).or_else(|| by_port(true)) {
            Some((i, _)) => Some(*i),
            None => {
                errs.push(FieldError::new(
                    "link",
                    format!(
                        "{wanted:?} is no link or linked port of network {}; its links: {}",
                        network.name(),
                        network.spec.links.join(", ")
                    ),
                ));
                None
            }
        };
        match link {
            Some(link) if errs.is_empty() => Ok(ResolvedCapture {
                link,
                packets,
                duration_ms,
                snaplen,
            }),
            _ => Err(ModelError::Invalid(errs)),
        }
    }
}

/// What a latency probe through a network measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct LatencyReport {
    pub network: String,
    pub from: String,
    pub to: String,
    /// Links paused while the probe ran.
    pub displaced: Vec<String>,
    pub rate_pps: u64,
    pub sent: u64,
    pub received: u64,
    pub lost: u64,
    pub reordered: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    /// Text histogram of the one-way latency.
    pub histogram: String,
}

/// Parses and validates a network descriptor; every violation is reported with its path.
pub fn parse_network(text: &[u8], format: Format) -> Result<NetworkDescriptor, ModelError> {
    let descriptor: NetworkDescriptor = from_text(text, format)?;
    let violations = descriptor.violations();
    if violations.is_empty() {
        Ok(descriptor)
    } else {
        Err(ModelError::Invalid(violations))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHAIN: &str = r#"
apiVersion: telvirt/v1
kind: Network
metadata: { name: chain1 }
spec:
  nodes:
    - { name: gen, kind: generator, rate_pps: 1000 }
    - { name: sink, kind: sink }
  links:
    - gen.out -> fw1.in
    - fw1.out -> host:veth1
"#;

    fn refused(text: &str) -> FieldError {
        let err = parse_network(text.as_bytes(), Format::Yaml).expect_err("must be refused");
        let fields = err.fields();
        assert_eq!(fields.len(), 1, "expected one error, got {fields:?}");
        fields[0].clone()
    }

    fn edit(from: &str, to: &str) -> String {
        assert!(CHAIN.contains(from), "test edit target missing: {from}");
        CHAIN.replacen(from, to, 1)
    }

    #[test]
    fn chain_parses() {
        let n = parse_network(CHAIN.as_bytes(), Format::Yaml).unwrap();
        assert_eq!(n.name().as_str(), "chain1");
        let links = n.parsed_links();
        assert_eq!(links.len(), 2);
        assert_eq!(links[1].1.to, Endpoint::host("veth1"));
        assert_eq!(links[0].1.from.to_string(), "gen.out");
    }

    #[test]
    fn unknown_field_is_refused_with_its_path() {
        let e = refused(&edit("links:", "colour: red\n  links:"));
        assert_eq!(e.path, "spec.colour");
        assert!(e.reason.contains("unknown field `colour`"), "{e}");
    }

    #[test]
    fn bad_link_syntax_is_refused() {
        let e = refused(&edit("gen.out -> fw1.in", "gen.out => fw1.in"));
        assert_eq!(e.path, "spec.links[0]");
        assert!(e.reason.contains("from -> to"), "{e}");
        let e = refused(&edit("gen.out -> fw1.in", "gen.out -> fw1"));
        assert_eq!(e.path, "spec.links[0]");
        assert!(e.reason.contains("node.port"), "{e}");
    }

    #[test]
    fn port_linked_twice_is_refused() {
        let e = refused(&edit(
            "fw1.out -> host:veth1",
            "fw1.out -> host:veth1\n    - fw1.out -> sink.in",
        ));
        assert_eq!(e.path, "spec.links[2].from");
        assert!(
            e.reason.contains("already linked out by spec.links[1]"),
            "{e}"
        );
    }

    #[test]
    fn builtin_node_has_one_port() {
        let e = refused(&edit("gen.out -> fw1.in", "gen.tx -> fw1.in"));
        assert_eq!(e.path, "spec.links[0].from");
        assert!(e.reason.contains("single port `out`"), "{e}");
    }

    #[test]
    fn generator_fields_are_checked() {
        let e = refused(&edit("rate_pps: 1000", "rate_pps: 0"));
        assert_eq!(e.path, "spec.nodes[0].rate_pps");
        let e = refused(&edit("rate_pps: 1000", "rate_pps: 1000001"));
        assert_eq!(e.path, "spec.nodes[0].rate_pps");
        assert!(e.reason.contains("1000000"), "{e}");
        let e = refused(&edit("kind: sink", "kind: sink, size: 64"));
        assert_eq!(e.path, "spec.nodes[1].size");
    }

    #[test]
    fn duplicate_builtin_is_refused() {
        let e = refused(&edit("name: sink", "name: gen"));
        assert_eq!(e.path, "spec.nodes[1].name");
    }

    #[test]
    fn no_links_is_refused() {
        let e = refused(
            "apiVersion: telvirt/v1\nkind: Network\nmetadata: { name: n }\nspec: { links: [] }\n",
        );
        assert_eq!(e.path, "spec.links");
    }

    const STEERED: &str = r#"
apiVersion: telvirt/v1
kind: Network
metadata: { name: s1 }
spec:
  nodes:
    - { name: gen, kind: generator }
    - { name: sink, kind: sink }
  steering:
    - { name: fw, instances: [fw1, fw2], active: fw2 }
  links:
    - gen.out -> fw.in
    - fw.out -> sink.in
"#;

    fn steered_refused(from: &str, to: &str) -> FieldError {
        assert!(STEERED.contains(from), "test edit target missing: {from}");
        refused(&STEERED.replacen(from, to, 1))
    }

    #[test]
    fn steering_endpoint_parses_and_mirrors_the_ports_links_use() {
        let n = parse_network(STEERED.as_bytes(), Format::Yaml).unwrap();
        let e = n.steering("fw").unwrap();
        assert_eq!(e.active_instance().map(Name::as_str), Some("fw2"));
        let ports = n.steering_ports();
        assert_eq!(ports["fw"], vec!["in".to_owned(), "out".to_owned()]);
        let mut other = n.clone();
        other.spec.steering[0].active = None;
        assert_ne!(other, n);
        assert_eq!(
            other
                .steering("fw")
                .unwrap()
                .active_instance()
                .map(Name::as_str),
            Some("fw1")
        );
    }

    #[test]
    fn a_steering_endpoint_no_link_uses_is_refused() {
        let e = steered_refused(
            "    - gen.out -> fw.in\n    - fw.out -> sink.in\n",
            "    - gen.out -> sink.in\n",
        );
        assert_eq!(e.path, "spec.steering[0]");
        assert!(e.reason.contains("used by no link"), "{e}");
    }

    #[test]
    fn steering_mistakes_are_refused_with_their_path() {
        let e = steered_refused("active: fw2", "active: fw3");
        assert_eq!(e.path, "spec.steering[0].active");
        assert!(e.reason.contains("fw1, fw2"), "{e}");
        let e = steered_refused("[fw1, fw2], active: fw2", "[fw1, fw1]");
        assert_eq!(e.path, "spec.steering[0].instances[1]");
        let e = steered_refused("[fw1, fw2], active: fw2", "[]");
        assert_eq!(e.path, "spec.steering[0].instances");
        let e = steered_refused("name: fw,", "name: gen,");
        assert_eq!(e.path, "spec.steering[0].name");
        let e = steered_refused(
            "fw.out -> sink.in",
            "fw1.out -> sink.in\n    - fw.out -> host:v1",
        );
        assert_eq!(e.path, "spec.links[1].from");
        assert!(e.reason.contains("steering endpoint fw"), "{e}");
        // An endpoint choosing among more instances than the cap is refused on their count
        // (its list is not walked: a long one would cost time squared in its length).
        let many: Vec<String> = (0..=MAX_STEERING_INSTANCES)
            .map(|i| format!("fw{i}"))
            .collect();
        let e = steered_refused("[fw1, fw2], active: fw2", &format!("[{}]", many.join(", ")));
        assert_eq!(e.path, "spec.steering[0].instances");
        assert!(e.reason.contains("more than the 64"), "{e}");
    }

    #[test]
    fn latency_probe_defaults_to_the_chain_ends_and_lists_what_it_pauses() {
        let n = parse_network(CHAIN.as_bytes(), Format::Yaml).unwrap();
        let p = LatencyProbe::default().resolve(&n).unwrap();
        assert_eq!(p.from.to_string(), "fw1.in");
        assert_eq!(p.to.to_string(), "fw1.out");
        assert_eq!((p.rate_pps, p.packets, p.size), (10_000, 20_000, 64));
        assert_eq!(
            p.displaced,
            vec!["gen.out -> fw1.in", "fw1.out -> host:veth1"]
        );
    }

    #[test]
    fn a_capture_names_its_link_by_either_port_or_the_link_and_refuses_anything_else() {
        let d = parse_network(CHAIN.as_bytes(), Format::Yaml).unwrap();
        let link = |text: &str| {
            CaptureRequest {
                link: text.to_owned(),
                ..Default::default()
            }
            .resolve(&d)
        };
        assert_eq!(link("fw1.out").unwrap().link, 1);
        assert_eq!(link("host:veth1").unwrap().link, 1);
        assert_eq!(link(" fw1.out  ->   host:veth1 ").unwrap().link, 1);
        let r = link("gen.out").unwrap();
        assert_eq!(
            (r.link, r.packets, r.duration_ms, r.snaplen),
            (0, 1000, 10_000, 65535)
        );
        let bad = CaptureRequest {
            link: "fw1.nope".into(),
            packets: Some(0),
            duration_ms: Some(MAX_CAPTURE_MS + 1),
            snaplen: Some(63),
        }
        .resolve(&d);
        match bad {
            Err(ModelError::Invalid(f)) => {
                let paths: Vec<_> = f.iter().map(|f| f.path.as_str()).collect();
                assert_eq!(paths, ["packets", "duration_ms", "snaplen", "link"]);
                assert!(f[3].reason.contains("gen.out -> fw1.in"), "{f:?}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn latency_probe_mistakes_name_their_field() {
        let n = parse_network(CHAIN.as_bytes(), Format::Yaml).unwrap();
        let fields = |p: LatencyProbe| match p.resolve(&n) {
            Err(ModelError::Invalid(f)) => f.into_iter().map(|f| f.path).collect::<Vec<_>>(),
            other => panic!("expected a refusal, got {other:?}"),
        };
        let probe = |from: &str| LatencyProbe {
            from: Some(from.to_owned()),
            ..LatencyProbe::default()
        };
        assert_eq!(fields(probe("nat1.in")), ["from"]);
        assert_eq!(fields(probe("gen.out")), ["from"]);
        assert_eq!(fields(probe("host:veth1")), ["from"]);
        assert_eq!(fields(probe("fw1")), ["from"]);
        // Direction: the probe sends into an input and takes from an output.
        assert_eq!(fields(probe("fw1.out")), ["from"]);
        let backwards = LatencyProbe {
            to: Some("fw1.in".to_owned()),
            ..LatencyProbe::default()
        };
        assert_eq!(fields(backwards), ["to"]);
        // The generator's smallest frame is the lower bound.
        let small = LatencyProbe {
            size: Some(MIN_FRAME_SIZE - 1),
            ..LatencyProbe::default()
        };
        assert_eq!(fields(small), ["size"]);
        let p = LatencyProbe {
            rate_pps: Some(10),
            packets: Some(10_000),
            size: Some(20),
            ..LatencyProbe::default()
        };
        assert_eq!(fields(p), ["packets", "size"]);
        let bare = parse_network(
            b"apiVersion: telvirt/v1\nkind: Network\nmetadata: { name: n }\nspec: { links: [a.out -> b.in] }\n",
            Format::Yaml,
        )
        .unwrap();
        match LatencyProbe::default().resolve(&bare) {
            Err(ModelError::Invalid(f)) => {
                assert_eq!(f.len(), 2, "{f:?}");
                assert!(f[0].reason.contains("name a port"), "{f:?}");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
}
