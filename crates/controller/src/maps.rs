//! Reading a running wasm VNF's maps (`GET /v1/vnfs/{name}/maps`: per map its name, kind and
//! how many entries it holds), counters (`GET /v1/vnfs/{name}/stats`) and module log
//! (`GET /v1/vnfs/{name}/logs`), and changing one of its maps (`POST
//! /v1/vnfs/{name}/maps/{map}/entries`: a rule or a bearer provisioned).
//!
//! Owns the checks (visibility, runtime, phase, lock, move, the change's bounds) and routing the
//! call as a node call to the agent of the host the VNF runs on (ADR 047). It must not touch
//! the runtime itself nor write anything to the store.

use telvirt_api::{NodeReply, NodeRequest};
use telvirt_model::api::{
    MapChangeRequest, MapChangeResult, MapView, VmStatsView, VnfLogs, VnfStatsView,
};
use telvirt_model::{Phase, Role, RuntimeKind};

use crate::service::{Caller, Controller, ControllerError};

impl Controller {
    /// The maps of a wasm VNF the caller may see, read from its running (or locked) instance.
    pub async fn vnf_maps(
        &self,
        caller: &Caller,
        name: &str,
    ) -> Result<Vec<MapView>, ControllerError> {
        let host = self.running_wasm(caller, name, "maps").await?;
        let request = NodeRequest::Maps {
            vnf: name.to_owned(),
        };
        match self.node_call(&host, request).await? {
            NodeReply::Maps { maps } => Ok(maps),
            other => Err(unexpected(&host, "maps", other)),
        }
    }

    /// Changes map `map` of a wasm VNF the caller owns, on its running instance, all or
    /// nothing. Refused before any call: a change that names nothing, too much or bad hex
    /// (422, the field), a locked VNF, one not Running or moving (409). The instance
    /// refuses an unknown map or a key or value of the wrong size (422, the field) and a
    /// change that would overfill a hash map (422).
    pub async fn change_map(
        &self,
        caller: &Caller,
        name: &str,
        map: &str,
        change: MapChangeRequest,
    ) -> Result<MapChangeResult, ControllerError> {
        change.decode().map_err(ControllerError::Invalid)?;
        let vnf = self.vnf(caller, name).await?;
        if let Some(lock) = &vnf.lock {
            return Err(ControllerError::locked(name, lock));
        }
        if let Some(m) = &vnf.migration {
            return Err(ControllerError::Conflict(format!(
                "vnf {name} is moving from host {} to host {}: its maps change by its own traffic only until the move ends (or `telvirt vnf migrate {name} --cancel`)",
                m.from, m.to
            )));
        }
        if vnf.phase != Phase::Running {
            return Err(ControllerError::Conflict(format!(
                "vnf {name} is {}: only a Running instance's maps are changed",
                vnf.phase.as_str()
            )));
        }
        let host = running_wasm_host(&vnf, "maps")?;
        let request = NodeRequest::MapChange {
            vnf: name.to_owned(),
            map: map.to_owned(),
            change,
        };
        match self.node_call(&host, request).await? {
            NodeReply::MapChanged { result } => Ok(result),
            other => Err(unexpected(&host, "map change", other)),
        }
    }

    /// The counters of a VNF the caller may see, read from its running (or locked) instance:
    /// a wasm VNF's runtime and module counters, a vm VNF's NIC counters.
    pub async fn vnf_stats(
        &self,
        caller: &Caller,
        name: &str,
    ) -> Result<VnfStatsView, ControllerError> {
        let vnf = self.vnf(caller, name).await?;
        if vnf.descriptor.spec.runtime == RuntimeKind::Vm {
            let host = running_host(&vnf, "counters")?;
            let request = NodeRequest::NicStats {
                vnf: name.to_owned(),
            };
            return match self.node_call(&host, request).await? {
                NodeReply::NicStats { nics, guest } => {
                    Ok(VnfStatsView::Vm(VmStatsView { nics, guest }))
                }
                other => Err(unexpected(&host, "NIC counters", other)),
            };
        }
        let host = running_wasm_host(&vnf, "counters")?;
        let request = NodeRequest::Stats {
            vnf: name.to_owned(),
        };
        match self.node_call(&host, request).await? {
            NodeReply::Stats { stats } => Ok(VnfStatsView::Wasm(stats)),
            other => Err(unexpected(&host, "counters", other)),
        }
    }

    /// The log lines of a wasm VNF the caller may see with a `seq` above `after`, read from its
    /// running (or locked) instance.
    pub async fn vnf_logs(
        &self,
        caller: &Caller,
        name: &str,
        after: u64,
    ) -> Result<VnfLogs, ControllerError> {
        let host = self.running_wasm(caller, name, "module logs").await?;
        let request = NodeRequest::Logs {
            vnf: name.to_owned(),
            after,
        };
        match self.node_call(&host, request).await? {
            NodeReply::Logs { logs } => Ok(logs),
            other => Err(unexpected(&host, "logs", other)),
        }
    }

    /// The host running VNF `name`'s active instance, if the caller may see it, it is a wasm VNF
    /// and its instance runs (or is locked); `what` names what is read, for the errors.
    async fn running_wasm(
        &self,
        caller: &Caller,
        name: &str,
        what: &str,
    ) -> Result<String, ControllerError> {
        running_wasm_host(&self.vnf(caller, name).await?, what)
    }
}

/// The host running wasm VNF `vnf`'s active instance, if it runs (or is locked); `what` names
/// what is read, for the errors.
fn running_wasm_host(vnf: &telvirt_model::Vnf, what: &str) -> Result<String, ControllerError> {
    let name = vnf.name.as_str();
    if vnf.descriptor.spec.runtime != RuntimeKind::Wasm {
        return Err(ControllerError::Conflict(format!(
            "vnf {name} runs on the {} runtime, which has no {what}; only wasm VNFs do",
            vnf.descriptor.spec.runtime.as_str()
        )));
    }
    running_host(vnf, what)
}

/// The host running VNF `vnf`'s active instance, if it runs (or is locked); `what` names what
/// is read, for the errors.
fn running_host(vnf: &telvirt_model::Vnf, what: &str) -> Result<String, ControllerError> {
    let name = vnf.name.as_str();
    if !matches!(vnf.phase, Phase::Running | Phase::Locked) {
        return Err(ControllerError::Conflict(format!(
            "vnf {name} is {}: its {what} are read from its running instance",
            vnf.phase.as_str()
        )));
    }
    active_host(vnf).ok_or_else(|| {
        ControllerError::Conflict(format!("vnf {name} is placed nowhere to read {what} from"))
    })
}

/// The host of a VNF's active instance (its only one without a standby).
pub(crate) fn active_host(vnf: &telvirt_model::Vnf) -> Option<String> {
    vnf.placements
        .iter()
        .find(|p| p.role == Role::Active)
        .or_else(|| vnf.placements.first())
        .map(|p| p.host.clone())
}

/// The host a VNF's traffic goes to: its active instance's, except during a vm VNF's move
/// past its commit point whose destination reported the guest resumed there (its source holds
/// a stopped copy from the final copy on): the destination's, before the move switches once
/// the guest answered there. A move that ends at its source (the guest broke on arrival)
/// brings it back.
pub(crate) fn traffic_host(vnf: &telvirt_model::Vnf) -> Option<String> {
    let resumed_at = vnf.migration.as_ref().filter(|m| {
        m.resumed_at_us.is_some()
            && m.committed_at.is_some()
            && vnf.descriptor.spec.runtime == RuntimeKind::Vm
    });
    match resumed_at {
        Some(m) => Some(m.to.clone()),
        None => active_host(vnf),
    }
}

/// A reply that does not answer the call: the agent failed (409 with its reason), refused the
/// call's input (422 with the field) or spoke out of turn (500).
pub(crate) fn unexpected(host: &str, what: &str, reply: NodeReply) -> ControllerError {
    match reply {
        NodeReply::Failed { reason } => ControllerError::Conflict(reason),
        NodeReply::Invalid { field, reason } => {
            ControllerError::Invalid(telvirt_model::FieldError::new(field, reason))
        }
        other => ControllerError::Corrupt(format!(
            "the agent of host {host} answered a {what} call with {other:?}"
        )),
    }
}
