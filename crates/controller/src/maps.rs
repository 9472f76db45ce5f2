//! Reading a running wasm VNF's maps (`GET /v1/vnfs/{name}/maps`: per map its name, kind and
//! how many entries it holds) and counters (`GET /v1/vnfs/{name}/stats`).
//!
//! Owns the checks (visibility, runtime, phase) and asking the local agent's wasm runtime
//! through the [`MapReader`] hook (in-process on the all-in-one node, like module upgrades,
//! ADR 035). It must not touch the runtime itself nor write anything.

use std::sync::Arc;

use telvirt_model::api::{MapView, WasmStatsView};
use telvirt_model::{Phase, RuntimeKind};

use crate::service::{Caller, Controller, ControllerError};

/// The local agent's wasm runtime, as the controller sees it for map reads.
pub trait MapReader: Send + Sync + 'static {
    /// The maps of VNF `vnf`'s running instance, in declaration order.
    fn maps(&self, vnf: &str) -> Result<Vec<MapView>, String>;
    /// The runtime's and the module's counters of VNF `vnf`'s running instance.
    fn stats(&self, vnf: &str) -> Result<WasmStatsView, String>;
}

impl Controller {
    /// Installs the local agent's map reader (once; later calls are ignored).
    pub fn set_map_reader(&self, reader: Arc<dyn MapReader>) {
        let _ = self.map_reader_cell().set(reader);
    }

    /// The maps of a wasm VNF the caller may see, read from its running (or locked) instance.
    pub async fn vnf_maps(
        &self,
        caller: &Caller,
        name: &str,
    ) -> Result<Vec<MapView>, ControllerError> {
        let reader = self.running_wasm(caller, name, "maps").await?;
        reader.maps(name).map_err(ControllerError::Conflict)
    }

    /// The counters of a wasm VNF the caller may see, read from its running (or locked) instance.
    pub async fn vnf_stats(
        &self,
        caller: &Caller,
        name: &str,
    ) -> Result<WasmStatsView, ControllerError> {
        let reader = self.running_wasm(caller, name, "counters").await?;
        reader.stats(name).map_err(ControllerError::Conflict)
    }

    /// The reader for VNF `name` if the caller may see it, it is a wasm VNF and its instance
    /// runs (or is locked); `what` names what is read, for the errors.
    async fn running_wasm(
        &self,
        caller: &Caller,
        name: &str,
        what: &str,
    ) -> Result<Arc<dyn MapReader>, ControllerError> {
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
        self.map_reader_cell().get().cloned().ok_or_else(|| {
            ControllerError::Conflict(format!(
                "this node runs no wasm runtime to read {what} from"
            ))
        })
    }
}
