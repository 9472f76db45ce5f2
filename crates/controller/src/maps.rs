//! Reading a running wasm VNF's maps (`GET /v1/vnfs/{name}/maps`: per map its name, kind and
//! how many entries it holds), counters (`GET /v1/vnfs/{name}/stats`) and module log
//! (`GET /v1/vnfs/{name}/logs`).
//!
//! Owns the checks (visibility, runtime, phase) and routing the read as a node call to the agent
//! of the host the VNF runs on (ADR 047). It must not touch the runtime itself nor write
//! anything.

use telvirt_api::{NodeReply, NodeRequest};
use telvirt_model::api::{MapView, VnfLogs, WasmStatsView};
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

    /// The counters of a wasm VNF the caller may see, read from its running (or locked) instance.
    pub async fn vnf_stats(
        &self,
        caller: &Caller,
        name: &str,
    ) -> Result<WasmStatsView, ControllerError> {
        let host = self.running_wasm(caller, name, "counters").await?;
        let request = NodeRequest::Stats {
            vnf: name.to_owned(),
        };
        match self.node_call(&host, request).await? {
            NodeReply::Stats { stats } => Ok(stats),
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
        let vnf = self.vnf(caller, name).await?;
        if vnf.descriptor.spec.runtime != RuntimeKind::Wasm {
            return Err(ControllerError::Conflict(format!(
                "vnf {name} runs on the {} runtime, which has no {what}; only wasm VNFs do",
                vnf.descriptor.spec.runtime.as_str()
            )));
        }
        if !matches!(vnf.phase, Phase::Running | Phase::Locked) {
            return Err(ControllerError::Conflict(format!(
                "vnf {name} is {}: its {what} are read from its running instance",
                vnf.phase.as_str()
            )));
        }
        active_host(&vnf).ok_or_else(|| {
            ControllerError::Conflict(format!("vnf {name} is placed nowhere to read {what} from"))
        })
    }
}

/// The host of a VNF's active instance (its only one without a standby).
pub(crate) fn active_host(vnf: &telvirt_model::Vnf) -> Option<String> {
    vnf.placements
        .iter()
        .find(|p| p.role == Role::Active)
        .or_else(|| vnf.placements.first())
        .map(|p| p.host.clone())
}

/// A reply that does not answer the call: the agent failed (409 with its reason) or spoke
/// out of turn (500).
pub(crate) fn unexpected(host: &str, what: &str, reply: NodeReply) -> ControllerError {
    match reply {
        NodeReply::Failed { reason } => ControllerError::Conflict(reason),
        other => ControllerError::Corrupt(format!(
            "the agent of host {host} answered a {what} call with {other:?}"
        )),
    }
}
