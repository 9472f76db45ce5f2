//! Networks (`kind: Network`): which VNF ports, host interfaces and built-in traffic nodes are
//! linked on the node's data plane, owned per authority like VNFs.
//!
//! Owns validating a network against the VNFs and the other networks, storing it, and the
//! [`NetworkPlane`] hook through which the all-in-one node's agent applies networks and reports
//! their counters in-process (ADR 034). It must not touch the data plane itself.

use std::collections::BTreeMap;
use std::sync::Arc;

use telvirt_model::network::{
    Endpoint, LatencyProbe, LatencyReport, Network, NetworkDescriptor, NetworkStatus,
    ResolvedProbe, SteerRequest, parse_network,
};
use telvirt_model::{FieldError, Format, Name, Vnf};
use telvirt_store::{Compare, Op};

use crate::records::{self, VnfRecord};
use crate::service::{Caller, Controller, ControllerError};

/// Store key prefix of networks.
pub const NETWORKS: &str = "/networks/";

pub fn network_key(name: &str) -> String {
    format!("{NETWORKS}{name}")
}

/// The local agent's data plane as the controller sees it (in-process on `telvirt serve`).
pub trait NetworkPlane: Send + Sync + 'static {
    /// The live state of network `name`, if the data plane holds it.
    fn status(&self, network: &NetworkDescriptor) -> Option<NetworkStatus>;
    /// The stored networks changed: apply them soon.
    fn wake(&self);
    /// Runs a latency probe through `network` as wired now (blocks for the probe's length).
    fn probe(
        &self,
        network: &NetworkDescriptor,
        probe: &ResolvedProbe,
    ) -> Result<LatencyReport, String>;
}

type Result<T, E = ControllerError> = std::result::Result<T, E>;

fn decode<T: serde::de::DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| ControllerError::Corrupt(format!("{key}: {e}")))
}

fn not_found(name: &str) -> ControllerError {
    ControllerError::NotFound(format!("network {name} not found"))
}

/// Every port a network wires, with its direction (`true`: the port sends) and the field that
/// wires it: the ends of its links, and the instance ports its steering endpoints mirror.
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

impl Controller {
    /// Every stored network (all owners): what the node's data plane should hold.
    pub async fn all_networks(&self) -> Result<Vec<Network>> {
        let mut out = Vec::new();
        for (key, v) in self.store_handle().list(NETWORKS).await? {
            out.push(decode(&key, &v.value)?);
        }
        Ok(out)
    }

    async fn all_vnfs(&self) -> Result<BTreeMap<String, Vnf>> {
        let mut out = BTreeMap::new();
        for (key, v) in self.store_handle().list(records::VNFS).await? {
            let r: VnfRecord = decode(&key, &v.value)?;
            out.insert(r.vnf.name.as_str().to_owned(), r.vnf);
        }
        Ok(out)
    }

    /// Checks a valid descriptor against the caller's VNFs and the other networks.
    async fn check_network(&self, caller: &Caller, d: &NetworkDescriptor) -> Result<()> {
        // A host interface is a host resource: only what the admin granted (ADR 045).
        if let Some(g) = self.confining_grants(caller).await? {
            crate::access::require_all(&g.grants, &crate::access::network_resources(d))?;
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
            if let Some(other) = used.get(&(out, ep.clone())) {
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
        Ok(())
    }

    /// Validates and stores a network owned by the caller; the agent applies it.
    pub async fn create_network(
        &self,
        caller: &Caller,
        text: &[u8],
        format: Format,
    ) -> Result<Network> {
        let descriptor = parse_network(text, format)?;
        self.check_network(caller, &descriptor).await?;
        let owner: Name = caller
            .name
            .parse()
            .map_err(|e| ControllerError::Corrupt(format!("authority name: {e}")))?;
        let network = Network {
            name: descriptor.name().clone(),
            owner,
            descriptor,
            created_at: crate::service::now_rfc3339(),
            status: None,
        };
        if !self.put_network(&network, 0).await? {
            return Err(ControllerError::Conflict(format!(
                "the network name {} is already in use",
                network.name
            )));
        }
        Ok(network)
    }

    /// The stored network `name` if the caller may see it, with its revision.
    async fn visible_network(&self, caller: &Caller, name: &str) -> Result<(Network, u64)> {
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
    async fn put_network(&self, n: &Network, rev: u64) -> Result<bool> {
        let key = network_key(n.name.as_str());
        let value = serde_json::to_vec(n).map_err(|e| ControllerError::Corrupt(e.to_string()))?;
        let outcome = self
            .store_handle()
            .txn(
                vec![Compare::ModRevision {
                    key: key.clone(),
                    revision: rev,
                }],
                vec![Op::Put {
                    key,
                    value,
                    lease: None,
                }],
            )
            .await?;
        if outcome.succeeded
            && let Some(plane) = self.network_plane()
        {
            plane.wake();
        }
        Ok(outcome.succeeded)
    }

    /// Writes `n` over the revision `rev` read before.
    async fn store_network(&self, n: &Network, rev: u64) -> Result<()> {
        if self.put_network(n, rev).await? {
            Ok(())
        } else {
            Err(ControllerError::Conflict(format!(
                "network {} changed meanwhile; read it again and retry",
                n.name
            )))
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
        self.check_network(&owner, &descriptor).await?;
        n.descriptor = descriptor;
        self.store_network(&n, rev).await?;
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
        self.store_network(&n, rev).await?;
        Ok(n)
    }

    /// `latency chain`: a probe through network `name` as the data plane holds it now.
    pub async fn probe_latency(
        &self,
        caller: &Caller,
        name: &str,
        probe: &LatencyProbe,
    ) -> Result<LatencyReport> {
        let (n, _) = self.visible_network(caller, name).await?;
        let resolved = probe.resolve(&n.descriptor)?;
        let Some(plane) = self.network_plane().cloned() else {
            return Err(ControllerError::Unavailable(
                "this node runs no data plane".to_owned(),
            ));
        };
        let d = n.descriptor;
        tokio::task::spawn_blocking(move || plane.probe(&d, &resolved))
            .await
            .map_err(|e| ControllerError::Unavailable(format!("probe task: {e}")))?
            .map_err(ControllerError::Unavailable)
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

    /// One network with its live state from the node's data plane.
    pub async fn network(&self, caller: &Caller, name: &str) -> Result<Network> {
        let (mut n, _) = self.visible_network(caller, name).await?;
        n.status = self.network_plane().and_then(|p| p.status(&n.descriptor));
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
        if let Some(plane) = self.network_plane() {
            plane.wake();
        }
        Ok(())
    }

    /// Installs the local agent's data plane (once; later calls are ignored).
    pub fn set_network_plane(&self, plane: Arc<dyn NetworkPlane>) {
        let _ = self.network_plane_cell().set(plane);
    }

    fn network_plane(&self) -> Option<&Arc<dyn NetworkPlane>> {
        self.network_plane_cell().get()
    }
}
