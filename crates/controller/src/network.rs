//! Networks (`kind: Network`): which VNF ports, host interfaces and built-in traffic nodes are
//! linked on the nodes' data planes, owned per authority like VNFs.
//!
//! Owns validating a network against the VNFs and the other networks, storing it, telling each
//! host's agent which networks its data plane holds (those naming a VNF placed there, with a
//! revision it can wait on), and routing status reads and latency probes as node calls to those
//! agents (ADR 047). It must not touch a data plane itself.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use telvirt_api::{NetworkSet, NetworkSpan, NodeReply, NodeRequest};
use telvirt_model::network::{
    DepartedCounts, Endpoint, HostCounts, LatencyProbe, LatencyReport, Network, NetworkDescriptor,
    NetworkStatus, SteerRequest, add_node_drops, add_sinks, parse_network,
};
use telvirt_model::{FieldError, Format, Name, Vnf};
use telvirt_store::{Compare, Op};

use crate::records::{self, VnfRecord};
use crate::service::{Caller, Controller, ControllerError, bump, decode};

/// Store key prefix of networks.
pub const NETWORKS: &str = "/networks/";

pub fn network_key(name: &str) -> String {
    format!("{NETWORKS}{name}")
}

/// The last VNI given to a network.
const VNI_COUNTER: &str = "/counters/vni";
/// VNIs are 24 bits; after the last one the counter wraps to 1 (0 means none).
const MAX_NETWORK_VNI: u32 = (1 << 24) - 1;

/// Set once the counter wrapped: from then on a new block may meet a live network's, so
/// each is checked against them.
const VNI_WRAPPED: &str = "/counters/vni-wrapped";

/// The first VNI of a block of `count` (at least 1) after the counter's `last`: a block that
/// would pass the last VNI starts again at 1.
fn next_vni_block(last: u32, count: u32) -> u32 {
    let first = last.saturating_add(1);
    if first > MAX_NETWORK_VNI || MAX_NETWORK_VNI - first < count.saturating_sub(1) {
        1
    } else {
        first
    }
}

/// The first block of `count` VNIs after `last` (wrapping to 1 past the last VNI) that meets
/// none of the `taken` blocks (first VNI, count); `None` when every place meets one.
fn free_vni_block(last: u32, count: u32, taken: &[(u32, u32)]) -> Option<u32> {
    let end_of = |first: u32, n: u32| first.saturating_add(n.max(1) - 1);
    let meets = |first: u32| {
        taken
            .iter()
            .filter(|(f, n)| *f <= end_of(first, count) && first <= end_of(*f, *n))
            .map(|(f, n)| end_of(*f, *n))
            .max()
    };
    let mut first = next_vni_block(last, count);
    let mut wrapped = first <= last;
    for _ in 0..=2 * taken.len() + 1 {
        let Some(end) = meets(first) else {
            return Some(first);
        };
        let next = next_vni_block(end, count);
        if next <= first {
            if wrapped {
                return None;
            }
            wrapped = true;
        }
        first = next;
    }
    None
}

/// How long `net show` waits for a host's data plane to report a network before it shows the
/// network without that host's counters.
const STATUS_CALL_TIMEOUT: Duration = Duration::from_secs(5);

type Result<T, E = ControllerError> = std::result::Result<T, E>;

fn changed_meanwhile(name: &str) -> ControllerError {
    ControllerError::Conflict(format!(
        "network {name} changed meanwhile; read it again and retry"
    ))
}

fn not_found(name: &str) -> ControllerError {
    ControllerError::NotFound(format!("network {name} not found"))
}

/// Every port a network wires, with its direction (`true`: the port sends) and the field that
/// wires it: the ends of its links, and the instance ports its steering endpoints mirror.
/// Which network (named when the caller may see it) links port `ep` in direction `out`, if
/// one does. A host interface named without its host (`host:IFNAME`) is on whichever host its
/// VNFs run: it meets the same interface named with one (`host:IFNAME@HOST`).
fn linked_by<'a>(
    used: &'a BTreeMap<(bool, Endpoint), Option<String>>,
    out: bool,
    ep: &Endpoint,
) -> Option<&'a Option<String>> {
    if let Some(by) = used.get(&(out, ep.clone())) {
        return Some(by);
    }
    let Endpoint::Host { ifname, on } = ep else {
        return None;
    };
    used.iter()
        .find(|((o, e), _)| {
            *o == out
                && matches!(e, Endpoint::Host { ifname: i, on: other }
                    if i == ifname && (on.is_none() || other.is_none()))
        })
        .map(|(_, by)| by)
}

fn wired_ports(d: &NetworkDescriptor) -> Vec<(bool, Endpoint, String)> {
    let links = d.parsed_links();
    let mut out = Vec::new();
    for (i, l) in &links {
        out.push((true, l.from.clone(), format!("spec.links[{i}].from")));
        out.push((false, l.to.clone(), format!("spec.links[{i}].to")));
    }
    let mirrored = d.mirrored_ports();
    for (i, e) in d.spec.steering.iter().enumerate() {
        for m in mirrored.get(e.name.as_str()).into_iter().flatten() {
            for (k, inst) in e.instances.iter().enumerate() {
                let ep = Endpoint::Port {
                    node: inst.as_str().to_owned(),
                    port: m.port.clone(),
                };
                let path = format!("spec.steering[{i}].instances[{k}]");
                if m.into {
                    out.push((false, ep.clone(), path.clone()));
                }
                if m.out_of {
                    out.push((true, ep, path));
                }
            }
        }
    }
    out
}

fn vnf_visible(caller: &Caller, v: &Vnf) -> bool {
    caller.is_admin() || v.owner.as_str() == caller.name
}

fn may_see(caller: &Caller, n: &Network) -> bool {
    caller.is_admin() || n.owner.as_str() == caller.name
}

/// One end of a network pinned to a host: a host interface `host:IFNAME@HOST`.
struct PinnedEnd {
    /// The end's field path.
    path: String,
    /// Its node's name among the network's nodes.
    node: String,
    host: String,
}

/// The host interfaces network `d` pins to a host.
fn pinned_ends(d: &NetworkDescriptor) -> Vec<PinnedEnd> {
    let mut out = Vec::new();
    for (i, link) in d.parsed_links() {
        for (end, ep) in [("from", &link.from), ("to", &link.to)] {
            if let Endpoint::Host { on: Some(h), .. } = ep {
                out.push(PinnedEnd {
                    path: format!("spec.links[{i}].{end}"),
                    node: ep.node_key(),
                    host: h.clone(),
                });
            }
        }
    }
    out
}

impl Controller {
    /// Every stored network (all owners): what the node's data plane should hold.
    pub async fn all_networks(&self) -> Result<Vec<Network>> {
        let mut out = Vec::new();
        for (key, v) in self.store_handle().list(NETWORKS).await? {
            out.push(decode(&key, &v.value)?);
        }
        Ok(out)
    }

    /// Every stored VNF (all owners), by name.
    pub(crate) async fn all_vnfs(&self) -> Result<BTreeMap<String, Vnf>> {
        let mut out = BTreeMap::new();
        for (key, v) in self.store_handle().list(records::VNFS).await? {
            let r: VnfRecord = decode(&key, &v.value)?;
            out.insert(r.vnf.name.as_str().to_owned(), r.vnf);
        }
        Ok(out)
    }

    /// Checks a valid descriptor against the caller's VNFs and the other networks.
    /// Checks network `d` for `caller`; the condition its write needs: the caller's grants
    /// as they were checked (none for the admin).
    async fn check_network(
        &self,
        caller: &Caller,
        d: &NetworkDescriptor,
    ) -> Result<Option<Compare>> {
        // A host interface is a host resource: only what the admin granted (ADR 045).
        let mut guard = None;
        if let Some(g) = self.confining_grants(caller).await? {
            crate::access::require_all(&g.grants, &crate::access::network_resources(d))?;
            guard = Some(g.unchanged(&caller.name));
        }
        // A host interface pinned to a host (`host:IFNAME@HOST`) names a host that exists.
        for end in pinned_ends(d) {
            match self.host_record(&end.host).await {
                Ok(_) => {}
                Err(ControllerError::NotFound(_)) => {
                    return Err(ControllerError::Invalid(FieldError::new(
                        end.path,
                        format!(
                            "there is no host {} (telvirt host list shows the hosts)",
                            end.host
                        ),
                    )));
                }
                Err(e) => return Err(e),
            }
        }
        let vnfs = self.all_vnfs().await?;
        let others: Vec<Network> = self
            .all_networks()
            .await?
            .into_iter()
            .filter(|n| n.name != *d.name())
            .collect();
        let names = d
            .spec
            .nodes
            .iter()
            .enumerate()
            .map(|(i, b)| (format!("spec.nodes[{i}].name"), &b.name))
            .chain(
                d.spec
                    .steering
                    .iter()
                    .enumerate()
                    .map(|(i, e)| (format!("spec.steering[{i}].name"), &e.name)),
            );
        for (path, name) in names {
            let taken = vnfs.contains_key(name.as_str())
                || others.iter().any(|n| {
                    n.descriptor.builtin(name.as_str()).is_some()
                        || n.descriptor.steering(name.as_str()).is_some()
                });
            if taken {
                return Err(ControllerError::Invalid(FieldError::new(
                    path,
                    format!("`{name}` already names a VNF or another network's node"),
                )));
            }
        }
        for (i, e) in d.spec.steering.iter().enumerate() {
            let ports = d.steering_ports();
            let ports = ports.get(e.name.as_str()).map_or(&[][..], Vec::as_slice);
            for (k, inst) in e.instances.iter().enumerate() {
                let path = format!("spec.steering[{i}].instances[{k}]");
                let Some(vnf) = vnfs.get(inst.as_str()).filter(|v| vnf_visible(caller, v)) else {
                    return Err(ControllerError::Invalid(FieldError::new(
                        path,
                        format!("{inst} is not a VNF you own"),
                    )));
                };
                if let Some(missing) = ports
                    .iter()
                    .find(|p| !vnf.descriptor.spec.ports.iter().any(|q| q.as_str() == *p))
                {
                    return Err(ControllerError::Invalid(FieldError::new(
                        path,
                        format!(
                            "VNF {inst} has no port `{missing}`, which the links use on endpoint {}",
                            e.name
                        ),
                    )));
                }
            }
        }
        // Which network uses each port: named only when the caller may see that network.
        let mut used: BTreeMap<(bool, Endpoint), Option<String>> = BTreeMap::new();
        for n in &others {
            let shown = may_see(caller, n).then(|| n.name.to_string());
            for (out, ep, _) in wired_ports(&n.descriptor) {
                used.insert((out, ep), shown.clone());
            }
        }
        for (i, link) in d.parsed_links() {
            for (end, ep) in [("from", &link.from), ("to", &link.to)] {
                let path = format!("spec.links[{i}].{end}");
                if let Endpoint::Port { node, port } = ep
                    && d.builtin(node).is_none()
                    && d.steering(node).is_none()
                {
                    let Some(vnf) = vnfs.get(node).filter(|v| vnf_visible(caller, v)) else {
                        return Err(ControllerError::Invalid(FieldError::new(
                            path,
                            format!("{node} is not a VNF you own nor a node of this network"),
                        )));
                    };
                    if !vnf.descriptor.spec.ports.iter().any(|p| p.as_str() == port) {
                        let ports: Vec<&str> =
                            vnf.descriptor.spec.ports.iter().map(Name::as_str).collect();
                        return Err(ControllerError::Invalid(FieldError::new(
                            path,
                            format!(
                                "VNF {node} has no port `{port}` (its ports: {})",
                                ports.join(", ")
                            ),
                        )));
                    }
                }
            }
        }
        let mut mine: BTreeMap<(bool, Endpoint), String> = BTreeMap::new();
        for (out, ep, path) in wired_ports(d) {
            let dir = if out { "out" } else { "in" };
            if let Some(other) = linked_by(&used, out, &ep) {
                let by = match other {
                    Some(name) => format!("network {name}"),
                    None => "another network".to_owned(),
                };
                return Err(ControllerError::Invalid(FieldError::new(
                    path,
                    format!("port {ep} is already linked {dir} by {by}"),
                )));
            }
            // Two steering endpoints of this network that share an instance would wire its
            // port twice.
            if let Some(first) = mine.insert((out, ep.clone()), path.clone()) {
                return Err(ControllerError::Invalid(FieldError::new(
                    path,
                    format!("port {ep} is already linked {dir} through {first}"),
                )));
            }
        }
        Ok(guard)
    }

    /// Validates and stores a network owned by the caller; the agent applies it.
    pub async fn create_network(
        &self,
        caller: &Caller,
        text: &[u8],
        format: Format,
    ) -> Result<Network> {
        let descriptor = parse_network(text, format)?;
        let guard = self.check_network(caller, &descriptor).await?;
        let owner: Name = caller
            .name
            .parse()
            .map_err(|e| ControllerError::Corrupt(format!("authority name: {e}")))?;
        let mut network = Network {
            name: descriptor.name().clone(),
            owner,
            descriptor,
            created_at: crate::service::now_rfc3339(),
            vni: 0,
            vnis: 0,
            status: None,
        };
        if self
            .put_with_vni_block(&mut network, 0, guard.as_ref())
            .await?
        {
            return Ok(network);
        }
        Err(ControllerError::Conflict(format!(
            "the network name {} is already in use",
            network.name
        )))
    }

    /// Writes `network` over revision `rev` (0: absent) with a fresh block of VNIs, one per
    /// descriptor link, taken from the counter in the same transaction (a concurrent writer
    /// that took the same block makes this one take the next). False when the network's record
    /// was not at `rev`.
    /// Written only while `guard` holds (the grants it was checked against; a conflict to
    /// answer when they changed).
    async fn put_with_vni_block(
        &self,
        network: &mut Network,
        rev: u64,
        guard: Option<&Compare>,
    ) -> Result<bool> {
        let count = u32::try_from(network.descriptor.spec.links.len().max(1)).map_err(|_| {
            ControllerError::Invalid(FieldError::new("spec.links", "too many links"))
        })?;
        let key = network_key(network.name.as_str());
        for _ in 0..crate::service::CAS_RETRIES {
            let counter = self.store_handle().get(VNI_COUNTER).await?;
            let (last, counter_rev) = match &counter {
                Some(v) => (decode::<u32>(VNI_COUNTER, &v.value)?, v.mod_revision),
                None => (0, 0),
            };
            // Until the counter first wraps, blocks only grow: none can meet a live one.
            let next = next_vni_block(last, count);
            let wraps = next <= last;
            let wrapped = wraps || self.store_handle().get(VNI_WRAPPED).await?.is_some();
            network.vni = if wrapped {
                let taken: Vec<(u32, u32)> = self
                    .all_networks()
                    .await?
                    .iter()
                    .filter(|n| n.name != network.name && n.vni != 0)
                    .map(|n| (n.vni, n.vnis))
                    .collect();
                free_vni_block(last, count, &taken).ok_or_else(|| {
                    ControllerError::Conflict(format!(
                        "no free block of {count} VNIs: the networks hold them (of 1..={MAX_NETWORK_VNI}); delete a network to free its block"
                    ))
                })?
            } else {
                next
            };
            network.vnis = count;
            let block_end = network.vni + (count - 1);
            let value = serde_json::to_vec(&*network)
                .map_err(|e| ControllerError::Corrupt(e.to_string()))?;
            let outcome = self
                .store_handle()
                .txn(
                    vec![
                        Compare::ModRevision {
                            key: key.clone(),
                            revision: rev,
                        },
                        Compare::ModRevision {
                            key: VNI_COUNTER.to_owned(),
                            revision: counter_rev,
                        },
                    ]
                    .into_iter()
                    .chain(guard.cloned())
                    .collect(),
                    vec![
                        Op::Put {
                            key: key.clone(),
                            value,
                            lease: None,
                        },
                        Op::Put {
                            key: VNI_COUNTER.to_owned(),
                            value: block_end.to_string().into_bytes(),
                            lease: None,
                        },
                    ]
                    .into_iter()
                    .chain(wraps.then(|| Op::Put {
                        key: VNI_WRAPPED.to_owned(),
                        value: b"true".to_vec(),
                        lease: None,
                    }))
                    .collect(),
                )
                .await?;
            if outcome.succeeded {
                bump(self.networks_version());
                return Ok(true);
            }
            if let Some(guard) = guard {
                self.guard_holds(guard).await?;
            }
            let now = self.store_handle().get(&key).await?;
            if now.map_or(0, |v| v.mod_revision) != rev {
                return Ok(false);
            }
        }
        Err(ControllerError::Conflict(
            "networks are being written faster than VNIs could be given; try again".to_owned(),
        ))
    }

    /// The stored network `name` if the caller may see it, with its revision.
    pub(crate) async fn visible_network(
        &self,
        caller: &Caller,
        name: &str,
    ) -> Result<(Network, u64)> {
        let key = network_key(name);
        let Some(v) = self.store_handle().get(&key).await? else {
            return Err(not_found(name));
        };
        let n: Network = decode(&key, &v.value)?;
        if !may_see(caller, &n) {
            return Err(not_found(name));
        }
        Ok((n, v.mod_revision))
    }

    /// Writes `n` if its record is still at revision `rev` (0: absent) and wakes the data plane;
    /// false when it was not.
    async fn put_network(&self, n: &Network, rev: u64, guard: Option<&Compare>) -> Result<bool> {
        let key = network_key(n.name.as_str());
        let value = serde_json::to_vec(n).map_err(|e| ControllerError::Corrupt(e.to_string()))?;
        let outcome = self
            .store_handle()
            .txn(
                std::iter::once(Compare::ModRevision {
                    key: key.clone(),
                    revision: rev,
                })
                .chain(guard.cloned())
                .collect(),
                vec![Op::Put {
                    key,
                    value,
                    lease: None,
                }],
            )
            .await?;
        if outcome.succeeded {
            bump(self.networks_version());
        } else if let Some(guard) = guard {
            self.guard_holds(guard).await?;
        }
        Ok(outcome.succeeded)
    }

    /// Writes `n` over the revision `rev` read before, while `guard` holds.
    async fn store_network(&self, n: &Network, rev: u64, guard: Option<&Compare>) -> Result<()> {
        if self.put_network(n, rev, guard).await? {
            Ok(())
        } else {
            Err(changed_meanwhile(n.name.as_str()))
        }
    }

    /// Replaces the descriptor of network `name` (the caller's; admin: any). The data plane
    /// rewires in place: links in both versions stay up, VNFs keep running, and a changed
    /// `active` of a steering endpoint is one atomic switch.
    pub async fn replace_network(
        &self,
        caller: &Caller,
        name: &str,
        text: &[u8],
        format: Format,
    ) -> Result<Network> {
        let descriptor = parse_network(text, format)?;
        if descriptor.name().as_str() != name {
            return Err(ControllerError::Invalid(FieldError::new(
                "metadata.name",
                format!(
                    "`{}` differs from the network in the path ({name}); a network cannot be renamed",
                    descriptor.name()
                ),
            )));
        }
        let (mut n, rev) = self.visible_network(caller, name).await?;
        let owner = Caller {
            name: n.owner.as_str().to_owned(),
        };
        let guard = self.check_network(&owner, &descriptor).await?;
        n.descriptor = descriptor;
        // A network that grew beyond its block of VNIs gets a new one (its links between
        // hosts move to the new identifiers together).
        let held = if n.vni == 0 {
            0
        } else {
            n.vnis.max(1) as usize
        };
        if n.descriptor.spec.links.len() > held {
            if !self.put_with_vni_block(&mut n, rev, guard.as_ref()).await? {
                return Err(changed_meanwhile(name));
            }
        } else {
            self.store_network(&n, rev, guard.as_ref()).await?;
        }
        Ok(n)
    }

    /// Points steering endpoint `endpoint` of network `name` at another instance: stored
    /// first, then applied by the data plane as one atomic switch.
    pub async fn steer(
        &self,
        caller: &Caller,
        name: &str,
        endpoint: &str,
        req: &SteerRequest,
    ) -> Result<Network> {
        let (mut n, rev) = self.visible_network(caller, name).await?;
        let steering = &mut n.descriptor.spec.steering;
        let Some(e) = steering.iter().position(|e| e.name.as_str() == endpoint) else {
            let known: Vec<&str> = steering.iter().map(|e| e.name.as_str()).collect();
            return Err(ControllerError::NotFound(format!(
                "network {name} has no steering endpoint {endpoint} (its endpoints: {})",
                if known.is_empty() {
                    "none".to_owned()
                } else {
                    known.join(", ")
                }
            )));
        };
        let e = &mut steering[e];
        if !e.instances.contains(&req.active) {
            return Err(ControllerError::Invalid(FieldError::new(
                "active",
                format!(
                    "`{}` is not an instance of endpoint {endpoint} (valid: {})",
                    req.active,
                    e.instance_list()
                ),
            )));
        }
        e.active = Some(req.active.clone());
        self.store_network(&n, rev, None).await?;
        Ok(n)
    }

    /// `latency chain`: a probe through network `name` as the data plane of the host holding it
    /// runs it now (a network spread over several hosts cannot be probed yet).
    pub async fn probe_latency(
        &self,
        caller: &Caller,
        name: &str,
        probe: &LatencyProbe,
    ) -> Result<LatencyReport> {
        let (n, _) = self.visible_network(caller, name).await?;
        // Checked here, so bad input is refused before any host is asked.
        probe.resolve(&n.descriptor)?;
        let hosts = self.network_hosts(&n).await?;
        let host = match hosts.len() {
            0 => {
                return Err(ControllerError::Conflict(format!(
                    "no VNF of network {name} is placed on a host with an agent yet: nothing runs it to probe"
                )));
            }
            1 => hosts.into_iter().next().unwrap_or_default(),
            _ => {
                return Err(ControllerError::Conflict(format!(
                    "network {name} spans hosts {}; a probe runs on one host's data plane, and links between hosts are not carried yet",
                    hosts.into_iter().collect::<Vec<_>>().join(", ")
                )));
            }
        };
        let request = NodeRequest::Probe {
            network: n.descriptor,
            probe: probe.clone(),
        };
        let reply = self
            .node_call_within(&host, request, telvirt_api::PROBE_CALL_TIMEOUT)
            .await?;
        match reply {
            NodeReply::Latency { report } => Ok(report),
            NodeReply::Failed { reason } => Err(ControllerError::Unavailable(reason)),
            other => Err(crate::maps::unexpected(&host, "latency probe", other)),
        }
    }

    /// The stored VNFs network `n` names, by name: those that exist and that its owner may
    /// wire (its own, or any for the admin). A name its VNF left and another authority took
    /// since is not the network's: its traffic must not be wired into the network, captured
    /// or steered by the network's owner.
    async fn named_records(&self, n: &Network) -> Result<BTreeMap<String, Vnf>> {
        let owner = Caller {
            name: n.owner.to_string(),
        };
        let mut out = BTreeMap::new();
        for vnf in n.descriptor.named_vnfs() {
            let key = records::vnf_key(&vnf);
            if let Some(v) = self.store_handle().get(&key).await? {
                let r: VnfRecord = decode(&key, &v.value)?;
                if vnf_visible(&owner, &r.vnf) {
                    out.insert(vnf, r.vnf);
                }
            }
        }
        Ok(out)
    }

    /// A network of another authority that names `vnf`'s name (its own VNF of that name was
    /// deleted since), whose owner may not wire `vnf`: a VNF of that name would be wired into
    /// that owner's network, its traffic captured or steered there.
    pub(crate) async fn network_claiming(&self, vnf: &Vnf) -> Result<Option<Network>> {
        Ok(self.all_networks().await?.into_iter().find(|n| {
            let owner = Caller {
                name: n.owner.to_string(),
            };
            !vnf_visible(&owner, vnf) && n.descriptor.named_vnfs().contains(vnf.name.as_str())
        }))
    }

    /// The hosts whose data planes hold network `n`: those with an agent where a VNF it names
    /// (and its owner may wire) has its active instance, or where it pins a host interface.
    pub(crate) async fn network_hosts(&self, n: &Network) -> Result<BTreeSet<String>> {
        let holders = self
            .holding_hosts(&n.descriptor, &self.named_records(n).await?)
            .await?;
        Ok(holders.into_keys().collect())
    }

    /// The hosts with an agent where one of `vnfs` (those network `d` names) has its active
    /// instance, or where `d` pins a host interface. A standby's host holds none of the
    /// network: a standby never forwards.
    async fn holding_hosts(
        &self,
        d: &NetworkDescriptor,
        vnfs: &BTreeMap<String, Vnf>,
    ) -> Result<BTreeMap<String, crate::HostRecord>> {
        let mut hosts = BTreeMap::new();
        let mut placed: BTreeSet<String> = vnfs
            .values()
            .filter_map(crate::maps::traffic_host)
            .collect();
        placed.extend(pinned_ends(d).into_iter().map(|e| e.host));
        for host in placed {
            if let Some(record) = self.agent_host(&host).await? {
                hosts.insert(host, record);
            }
        }
        Ok(hosts)
    }

    /// Where the nodes of network `n` are, when its VNFs (`vnfs`) are on several hosts of
    /// `holders` (the hosts with an agent that hold them, with their records).
    fn network_span(
        n: &Network,
        vnfs: &BTreeMap<String, Vnf>,
        holders: &BTreeMap<String, crate::HostRecord>,
    ) -> Option<NetworkSpan> {
        let d = &n.descriptor;
        let vnf_hosts: BTreeMap<String, String> = vnfs
            .iter()
            .filter_map(|(name, v)| crate::maps::traffic_host(v).map(|h| (name.clone(), h)))
            .collect();
        // Host interfaces pinned to a host stay there.
        let pinned: BTreeMap<String, String> = pinned_ends(d)
            .into_iter()
            .map(|e| (e.node, e.host))
            .collect();
        let distinct: BTreeSet<String> =
            vnf_hosts.values().chain(pinned.values()).cloned().collect();
        if distinct.len() < 2 {
            return None;
        }
        let mut hosts = vnf_hosts.clone();
        hosts.extend(pinned);
        // The other nodes go where the first VNF linked to them is.
        for (_, link) in d.parsed_links() {
            for (this, other) in [(&link.from, &link.to), (&link.to, &link.from)] {
                let key = this.node_key();
                if hosts.contains_key(&key) {
                    continue;
                }
                if let Some(h) = vnf_hosts.get(&other.node_key()) {
                    hosts.insert(key, h.clone());
                }
            }
        }
        for e in &d.spec.steering {
            if let Some(h) = e.instances.iter().find_map(|i| vnf_hosts.get(i.as_str())) {
                hosts
                    .entry(e.name.as_str().to_owned())
                    .or_insert_with(|| h.clone());
            }
        }
        let tunnels = distinct
            .into_iter()
            .filter_map(|h| {
                let tunnel = holders.get(&h)?.tunnel.clone()?;
                Some((h, tunnel))
            })
            .collect();
        Some(NetworkSpan {
            network: n.name.as_str().to_owned(),
            vni: n.vni,
            vnis: n.vnis,
            hosts,
            tunnels,
        })
    }

    /// The networks `host`'s data plane should hold, with the revision they were read at.
    pub async fn host_networks(&self, host: &str) -> Result<NetworkSet> {
        // Read the revision first: a change after it makes the agent's next wait end at once.
        let revision = self.network_revision(host);
        let mut networks = Vec::new();
        let mut spans = Vec::new();
        for n in self.all_networks().await? {
            // Each VNF and host record read once, for both the holding hosts and the span.
            let vnfs = self.named_records(&n).await?;
            let holders = self.holding_hosts(&n.descriptor, &vnfs).await?;
            if holders.contains_key(host) {
                spans.extend(Self::network_span(&n, &vnfs, &holders));
                networks.push(n.descriptor);
            }
        }
        Ok(NetworkSet {
            revision,
            networks,
            spans,
        })
    }

    /// `host`'s network revision: the stored networks' change counter plus the host's
    /// assignment counter (a VNF placed on or moved off the host changes which networks it
    /// holds). Both only grow, so their sum grows whenever either does.
    fn network_revision(&self, host: &str) -> u64 {
        let assignments = *self.assignments_watch(host).borrow();
        assignments.wrapping_add(*self.networks_version().borrow())
    }

    /// `host`'s network revision once it differs from `after`, or as it is after `max_wait`.
    pub async fn wait_networks(&self, host: &str, after: u64, max_wait: Duration) -> u64 {
        let mut assignments = self.assignments_watch(host);
        let mut networks = self.networks_version().subscribe();
        let _ = tokio::time::timeout(max_wait, async {
            while self.network_revision(host) == after {
                tokio::select! {
                    r = assignments.changed() => if r.is_err() { break },
                    r = networks.changed() => if r.is_err() { break },
                }
            }
        })
        .await;
        self.network_revision(host)
    }

    /// The networks the caller may see.
    pub async fn networks(&self, caller: &Caller) -> Result<Vec<Network>> {
        Ok(self
            .all_networks()
            .await?
            .into_iter()
            .filter(|n| may_see(caller, n))
            .collect())
    }

    /// One network with its live state from the data planes of the hosts holding it.
    pub async fn network(&self, caller: &Caller, name: &str) -> Result<Network> {
        self.network_with(caller, name, true).await
    }

    /// [`Controller::network`]; with `departed`, the counts the network left on hosts that no
    /// longer hold it too (the Ready hosts whose heartbeat named it, or did not say, are
    /// asked), else those of its holders only.
    pub(crate) async fn network_with(
        &self,
        caller: &Caller,
        name: &str,
        departed: bool,
    ) -> Result<Network> {
        let (mut n, _) = self.visible_network(caller, name).await?;
        let holders = self.network_hosts(&n).await?;
        // The other hosts may be ones the network left (a VNF moved or failed over away):
        // those whose heartbeat says so keep its final counts there.
        let mut others = if departed {
            self.hosts_keeping_counts_of(name).await?
        } else {
            Vec::new()
        };
        others.retain(|h| !holders.contains(h));
        let ask = |host: String| {
            let request = NodeRequest::NetworkStatus {
                network: n.descriptor.clone(),
            };
            async move {
                let answer = match self
                    .node_call_within(&host, request, STATUS_CALL_TIMEOUT)
                    .await
                {
                    Ok(NodeReply::NetworkStatus { status }) => Ok(status),
                    Ok(NodeReply::Failed { reason }) => Err(reason),
                    Ok(other) => Err(format!("answered {other:?}")),
                    Err(e) => Err(e.to_string()),
                };
                (host, answer)
            }
        };
        let (reports, left) = futures_util::future::join(
            futures_util::future::join_all(holders.into_iter().map(ask)),
            futures_util::future::join_all(others.into_iter().map(ask)),
        )
        .await;
        let mut status = merge_statuses(&n.descriptor, reports);
        // Of a host that does not hold the network, only what it kept from before counts (a
        // part it still tears down is gone within a pass).
        for (_, answer) in left {
            if let Ok(Some(st)) = answer {
                status.departed.extend(st.departed);
            }
        }
        add_departed(&mut status, &n.created_at);
        n.status = Some(status);
        Ok(n)
    }

    /// Deletes a network the caller owns (admin: any); its links go, VNFs keep running.
    pub async fn delete_network(&self, caller: &Caller, name: &str) -> Result<()> {
        let (_, rev) = self.visible_network(caller, name).await?;
        let key = network_key(name);
        let outcome = self
            .store_handle()
            .txn(
                vec![Compare::ModRevision {
                    key: key.clone(),
                    revision: rev,
                }],
                vec![Op::Delete { key }],
            )
            .await?;
        if !outcome.succeeded {
            return Err(ControllerError::Conflict(format!(
                "network {name} changed while deleting it; try again"
            )));
        }
        bump(self.networks_version());
        Ok(())
    }
}

/// One status of network `d` from what each host holding it answered (none: every link waits).
/// With several hosts, a link is live where its host carries it; tables and
/// waiting reasons are given per host.
fn merge_statuses(
    d: &NetworkDescriptor,
    reports: Vec<(String, std::result::Result<Option<NetworkStatus>, String>)>,
) -> NetworkStatus {
    let several = reports.len() > 1;
    let mut merged: Option<NetworkStatus> = None;
    let mut failures = Vec::new();
    if reports.is_empty() {
        failures.push(
            "no VNF of the network is placed on a host with an agent yet: no data plane holds it"
                .to_owned(),
        );
    }
    for (host, answer) in reports {
        let mut st = match answer {
            Ok(Some(st)) => st,
            Ok(None) => {
                failures.push(format!(
                    "host {host} has not applied the network to its data plane yet"
                ));
                continue;
            }
            Err(why) => {
                failures.push(format!("host {host} did not report the network: {why}"));
                continue;
            }
        };
        st.hosts = vec![HostCounts::of(&host, &st)];
        if several {
            st.table = format!("host {host}:\n{}", st.table);
            st.waiting = st
                .waiting
                .into_iter()
                .map(|w| format!("host {host}: {w}"))
                .collect();
        }
        merged = Some(match merged.take() {
            None => st,
            Some(mut m) => {
                m.hosts.extend(st.hosts);
                // A link between hosts drops on each of them (its ring on the sender, its
                // tunnel and ring on the receiver): its drops add up.
                for (mine, theirs) in m.links.iter_mut().zip(st.links) {
                    let drops = mine.drops + theirs.drops;
                    if !mine.active && theirs.active {
                        *mine = theirs;
                    }
                    mine.drops = drops;
                }
                m.table.push('\n');
                m.table.push_str(&st.table);
                m.waiting.extend(st.waiting);
                // A node or sink reported by two hosts is one: its counts add up.
                add_node_drops(&mut m.node_drops, st.node_drops);
                add_sinks(&mut m.sinks, st.sinks);
                m.host_ports.extend(st.host_ports);
                m.departed.extend(st.departed);
                m.tunnel_endpoints.extend(st.tunnel_endpoints);
                for s in st.steering {
                    if !m.steering.iter().any(|t| t.name == s.name) {
                        m.steering.push(s);
                    }
                }
                m
            }
        });
    }
    let mut st = merged.unwrap_or_else(|| NetworkStatus::idle(d));
    st.waiting.extend(failures);
    st
}

/// Keeps the hosts' departures of the network made at `created_at` (not those of an earlier
/// network of the same name, which left before it was made; by the hosts' clocks against the
/// controller's), sums them per host and adds them to the table, the host left first first.
fn add_departed(st: &mut NetworkStatus, created_at: &str) {
    let made = humantime::parse_rfc3339(created_at).ok();
    let mut kept: Vec<DepartedCounts> = std::mem::take(&mut st.departed)
        .into_iter()
        .filter(|d| {
            let left = humantime::parse_rfc3339(&d.left_at).ok();
            match (made, left) {
                (Some(made), Some(left)) => left >= made,
                _ => true,
            }
        })
        .collect();
    kept.sort_by(|a, b| a.left_at.cmp(&b.left_at));
    for d in kept {
        match st.departed.iter_mut().find(|x| x.host == d.host) {
            Some(x) => x.add(d),
            None => st.departed.push(d),
        }
    }
    st.departed.sort_by(|a, b| a.left_at.cmp(&b.left_at));
    for d in &st.departed {
        st.table.push_str(&d.render());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use telvirt_model::network::LinkState;

    #[test]
    fn a_node_sink_or_link_two_hosts_report_is_one_whose_counts_add_up() {
        let d = telvirt_model::parse_network(
            b"apiVersion: telvirt/v1\nkind: Network\nmetadata: { name: n }\nspec:\n  nodes:\n    - { name: gen, kind: generator }\n    - { name: sink, kind: sink }\n  links: [gen.out -> sink.in]\n",
            telvirt_model::Format::Yaml,
        )
        .unwrap();
        // The link is live on h2 only (its packets are h2's), and dropped on both.
        let report = |received, refused| NetworkStatus {
            links: vec![LinkState {
                link: d.spec.links[0].clone(),
                active: received != 10,
                packets: received,
                bytes: 0,
                drops: refused * 10,
                since: String::new(),
            }],
            table: String::new(),
            waiting: Vec::new(),
            steering: Vec::new(),
            node_drops: vec![telvirt_model::network::NodeDropState {
                node: "fw1".into(),
                unlinked: 1,
                refused,
            }],
            sinks: vec![telvirt_model::network::SinkStatus {
                name: "sink".into(),
                received,
                lost: 0,
                bytes: received * 64,
                latency_buckets: vec![received, 1],
                latency_sum_ns: received * 1000,
            }],
            host_ports: Vec::new(),
            tunnel_endpoints: Vec::new(),
            departed: Vec::new(),
            hosts: Vec::new(),
        };
        let st = merge_statuses(
            &d,
            vec![
                ("h1".into(), Ok(Some(report(10, 2)))),
                ("h2".into(), Ok(Some(report(5, 3)))),
            ],
        );
        assert_eq!(st.node_drops.len(), 1);
        assert_eq!(
            (st.node_drops[0].unlinked, st.node_drops[0].refused),
            (2, 5)
        );
        assert_eq!(st.sinks.len(), 1);
        let s = &st.sinks[0];
        assert_eq!((s.received, s.bytes, s.latency_sum_ns), (15, 960, 15_000));
        assert_eq!(s.latency_buckets, [15, 2]);
        let l = &st.links[0];
        assert_eq!((l.active, l.packets, l.drops), (true, 5, 50));
        // Each host's own counts are kept apart, as it counted them: h1's link is not wired
        // there (its end restarting, say), so it has none rather than zeros.
        let own: Vec<_> = st
            .hosts
            .iter()
            .map(|h| (h.host.as_str(), h.links.len(), h.node_drops[0].refused))
            .collect();
        assert_eq!(own, [("h1", 0, 2), ("h2", 1, 3)]);
        assert_eq!(st.hosts[1].links[0].packets, 5);
        // A host that did not answer has no counts (not zeros), and one whose link is not
        // wired, its tunnel's drops counted all the same, no link.
        let mut idle = report(10, 0);
        idle.node_drops.clear();
        (idle.links[0].packets, idle.links[0].drops) = (0, 7);
        let st = merge_statuses(
            &d,
            vec![
                ("h1".into(), Err("timed out".into())),
                ("h2".into(), Ok(Some(report(5, 3)))),
                ("h3".into(), Ok(Some(idle))),
            ],
        );
        let own: Vec<_> = st
            .hosts
            .iter()
            .map(|h| (h.host.as_str(), h.links.len(), h.node_drops.len()))
            .collect();
        assert_eq!(own, [("h2", 1, 1), ("h3", 0, 0)]);
    }

    #[test]
    fn departed_counts_of_the_network_are_shown_and_those_of_an_earlier_one_are_not() {
        let left = |host: &str, at: &str, packets| telvirt_model::network::DepartedCounts {
            host: host.into(),
            left_at: at.into(),
            links: vec![LinkState {
                link: "gen.out -> fw1.in".into(),
                active: false,
                packets,
                bytes: packets * 64,
                drops: 1,
                since: String::new(),
            }],
            node_drops: vec![telvirt_model::network::NodeDropState {
                node: "fw1".into(),
                unlinked: 0,
                refused: 7,
            }],
            sinks: Vec::new(),
        };
        let mut st = merge_statuses(
            &telvirt_model::parse_network(
                b"apiVersion: telvirt/v1\nkind: Network\nmetadata: { name: n }\nspec:\n  links: [gen.out -> fw1.in]\n  nodes: [{ name: gen, kind: generator }]\n",
                telvirt_model::Format::Yaml,
            )
            .unwrap(),
            Vec::new(),
        );
        st.departed = vec![
            left("h2", "2026-12-06T10:00:02.000Z", 40),
            left("h1", "2026-12-06T10:00:01.000Z", 20),
            // Left before the network was made: an earlier network of the same name.
            left("h3", "2026-12-06T09:59:59.000Z", 99),
            left("h1", "2026-12-06T09:59:58.000Z", 500),
            // h1 left it twice: the counts add up, the later time stays.
            left("h1", "2026-12-06T10:00:00.500Z", 10),
        ];
        add_departed(&mut st, "2026-12-06T10:00:00.000Z");
        let hosts: Vec<&str> = st.departed.iter().map(|d| d.host.as_str()).collect();
        assert_eq!(hosts, ["h1", "h2"]);
        assert_eq!(st.departed[0].links[0].packets, 30);
        assert_eq!(st.departed[0].node_drops[0].refused, 14);
        let h1 = st
            .table
            .find("host h1, which the network left at 2026-12-06T10:00:01.000Z");
        let h2 = st
            .table
            .find("host h2, which the network left at 2026-12-06T10:00:02.000Z");
        assert!(h1.is_some() && h1 < h2, "{}", st.table);
        assert!(
            st.table
                .contains("  gen.out -> fw1.in: 40 packets, 2560 bytes, 1 dropped\n"),
            "{}",
            st.table
        );
        assert!(
            st.table.contains(
                "  fw1: 0 packets dropped on unlinked ports, 7 dropped by the node itself\n"
            ),
            "{}",
            st.table
        );
        assert!(!st.table.contains("h3"), "{}", st.table);
    }

    #[test]
    fn a_vni_block_follows_the_counter_and_never_passes_the_last_vni() {
        assert_eq!(next_vni_block(0, 1), 1);
        assert_eq!(next_vni_block(41, 3), 42);
        // The block ends exactly at the last VNI: it fits.
        assert_eq!(next_vni_block(MAX_NETWORK_VNI - 3, 3), MAX_NETWORK_VNI - 2);
        // One more would pass it: start again at 1.
        assert_eq!(next_vni_block(MAX_NETWORK_VNI - 2, 3), 1);
        assert_eq!(next_vni_block(MAX_NETWORK_VNI, 1), 1);
        assert_eq!(next_vni_block(u32::MAX, 1), 1);
    }

    #[test]
    fn after_the_counter_wraps_a_block_meets_no_live_network() {
        // Nothing taken: the counter's next block.
        assert_eq!(free_vni_block(41, 3, &[]), Some(42));
        // Wrapped to 1 where a live network holds 1..=4: the first free place after it.
        assert_eq!(free_vni_block(MAX_NETWORK_VNI, 2, &[(1, 4)]), Some(5));
        // Between two networks, only a gap large enough takes the block.
        assert_eq!(free_vni_block(0, 3, &[(1, 2), (5, 1), (9, 1)]), Some(6));
        // A block that overlaps a network's end, not its start, also meets it.
        assert_eq!(free_vni_block(2, 2, &[(1, 3)]), Some(4));
        // Past the last VNI's neighbours, back at 1.
        let near_end = MAX_NETWORK_VNI - 1;
        assert_eq!(free_vni_block(near_end - 1, 2, &[(near_end, 2)]), Some(1));
        // Every place taken: none.
        assert_eq!(free_vni_block(0, 2, &[(1, MAX_NETWORK_VNI)]), None);
        assert_eq!(
            free_vni_block(5, 2, &[(1, MAX_NETWORK_VNI - 1)]),
            None,
            "one VNI left is not a block of 2"
        );
    }
}
