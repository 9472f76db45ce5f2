//! A vm VNF's serial console (`GET /v1/vnfs/{name}/console?lines=N`), read on the host it runs
//! on through a node call (ADR 047).
//!
//! Owns the checks (visibility, runtime, placement, the line count) and the routing. It must
//! not read files itself: the console log is on the VNF's host, which may not be this one.

use serde::Deserialize;
use telvirt_api::{MAX_CONSOLE_LINES, NodeReply, NodeRequest};
use telvirt_model::{FieldError, RuntimeKind};
use utoipa::IntoParams;

use crate::service::{Caller, Controller, ControllerError};

/// Lines shown when the caller does not say.
pub const DEFAULT_CONSOLE_LINES: u32 = 50;

/// `?lines=` of `GET /v1/vnfs/{name}/console`.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ConsoleQuery {
    /// Last lines to show, 1 to 10000 (default 50).
    pub lines: Option<u32>,
}

impl Controller {
    /// The last lines of a vm VNF's serial console the caller may see, read on its host.
    pub async fn vnf_console(
        &self,
        caller: &Caller,
        name: &str,
        query: &ConsoleQuery,
    ) -> Result<Vec<String>, ControllerError> {
        let lines = query.lines.unwrap_or(DEFAULT_CONSOLE_LINES);
        if lines == 0 || lines > MAX_CONSOLE_LINES {
            return Err(ControllerError::Invalid(FieldError::new(
                "lines",
                format!("{lines} is out of range: 1 to {MAX_CONSOLE_LINES}"),
            )));
        }
        let vnf = self.vnf(caller, name).await?;
        if vnf.descriptor.spec.runtime != RuntimeKind::Vm {
            return Err(ControllerError::Conflict(format!(
                "vnf {name} runs on the {} runtime; only vm VNFs have a serial console",
                vnf.descriptor.spec.runtime.as_str()
            )));
        }
        let host = crate::maps::active_host(&vnf).ok_or_else(|| {
            ControllerError::Conflict(format!(
                "vnf {name} is placed nowhere: it has no console yet"
            ))
        })?;
        let request = NodeRequest::Console {
            vnf: name.to_owned(),
            lines,
        };
        match self.node_call(&host, request).await? {
            NodeReply::Console { lines } => Ok(lines),
            other => Err(crate::maps::unexpected(&host, "console", other)),
        }
    }
}
