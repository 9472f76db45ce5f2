//! Networks (`kind: Network`): which VNF ports, host interfaces and built-in traffic nodes are
//! linked on the node's data plane, owned per authority like VNFs.
//!
//! Owns validating a network against the VNFs and the other networks, storing it, and the
//! [`NetworkPlane`] hook through which the all-in-one node's agent applies networks and reports
//! their counters in-process (ADR 034). It must not touch the data plane itself.

use std::collections::BTreeMap;
use std::sync::Arc;

use telvirt_model::network::{Endpoint, Network, NetworkDescriptor, NetworkStatus, parse_network};
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
}

type Result<T, E = ControllerError> = std::result::Result<T, E>;

fn decode<T: serde::de::DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| ControllerError::Corrupt(format!("{key}: {e}")))
}

fn not_found(name: &str) -> ControllerError {
    ControllerError::NotFound(format!("network {name} not found"))
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
        let vnfs = self.all_vnfs().await?;
        let others: Vec<Network> = self
            .all_networks()
            .await?
            .into_iter()
            .filter(|n| n.name != *d.name())
            .collect();
        for (i, b) in d.spec.nodes.iter().enumerate() {
            let taken = vnfs.contains_key(b.name.as_str())
                || others
                    .iter()
                    .any(|n| n.descriptor.builtin(b.name.as_str()).is_some());
            if taken {
                return Err(ControllerError::Invalid(FieldError::new(
                    format!("spec.nodes[{i}].name"),
                    format!("`{}` already names a VNF or another network's node", b.name),
                )));
            }
        }
        let mut used: BTreeMap<(bool, Endpoint), String> = BTreeMap::new();
        for n in &others {
            for (_, l) in n.descriptor.parsed_links() {
                used.insert((true, l.from), n.name.to_string());
                used.insert((false, l.to), n.name.to_string());
            }
        }
        for (i, link) in d.parsed_links() {
            for (end, ep, out) in [("from", &link.from, true), ("to", &link.to, false)] {
                let path = format!("spec.links[{i}].{end}");
                if let Endpoint::Port { node, port } = ep
                    && d.builtin(node).is_none()
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
                if let Some(other) = used.get(&(out, ep.clone())) {
                    return Err(ControllerError::Invalid(FieldError::new(
                        path,
                        format!(
                            "port {ep} is already linked {} by network {other}",
                            if out { "out" } else { "in" }
                        ),
                    )));
                }
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
        let key = network_key(network.name.as_str());
        let value =
            serde_json::to_vec(&network).map_err(|e| ControllerError::Corrupt(e.to_string()))?;
        let outcome = self
            .store_handle()
            .txn(
                vec![Compare::ModRevision {
                    key: key.clone(),
                    revision: 0,
                }],
                vec![Op::Put {
                    key,
                    value,
                    lease: None,
                }],
            )
            .await?;
        if !outcome.succeeded {
            return Err(ControllerError::Conflict(format!(
                "the network name {} is already in use",
                network.name
            )));
        }
        if let Some(plane) = self.network_plane() {
            plane.wake();
        }
        Ok(network)
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
        let key = network_key(name);
        let Some(v) = self.store_handle().get(&key).await? else {
            return Err(not_found(name));
        };
        let mut n: Network = decode(&key, &v.value)?;
        if !may_see(caller, &n) {
            return Err(not_found(name));
        }
        n.status = self.network_plane().and_then(|p| p.status(&n.descriptor));
        Ok(n)
    }

    /// Deletes a network the caller owns (admin: any); its links go, VNFs keep running.
    pub async fn delete_network(&self, caller: &Caller, name: &str) -> Result<()> {
        let key = network_key(name);
        let Some(v) = self.store_handle().get(&key).await? else {
            return Err(not_found(name));
        };
        let n: Network = decode(&key, &v.value)?;
        if !may_see(caller, &n) {
            return Err(not_found(name));
        }
        let outcome = self
            .store_handle()
            .txn(
                vec![Compare::ModRevision {
                    key: key.clone(),
                    revision: v.mod_revision,
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
