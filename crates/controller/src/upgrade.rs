//! Upgrading a running wasm VNF's module in place (`POST /v1/vnfs/{name}/upgrade`): the new
//! module is swapped in between two batches and maps with the same name and layout keep their
//! contents.
//!
//! Owns the checks (visibility, lock, runtime, phase), asking the agent of the VNF's host to swap
//! through a node call (ADR 047), and
//! recording the new module path in the stored descriptor so a restart runs it. It must not
//! touch the runtime itself.

use serde::{Deserialize, Serialize};
use telvirt_api::{NodeReply, NodeRequest};
use telvirt_model::{FieldError, Format, Phase, RuntimeKind, Vnf};
use telvirt_store::{Compare, Op};
use utoipa::ToSchema;

use crate::records::{VnfRecord, vnf_key};
use crate::service::{Caller, Controller, ControllerError, now_rfc3339};

/// Body of `POST /v1/vnfs/{name}/upgrade`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpgradeRequest {
    /// The new module: `sha256:<hex>` of an uploaded module, or a `.wasm` path on the node
    /// (admin, or granted to the VNF's owner; relative: to the server's working directory).
    pub module: String,
}

type Result<T, E = ControllerError> = std::result::Result<T, E>;

fn invalid(path: &str, reason: impl Into<String>) -> ControllerError {
    ControllerError::Invalid(FieldError::new(path, reason))
}

impl Controller {
    /// Swaps a running wasm VNF's module, keeping its maps; the stored descriptor names the new
    /// module afterwards. Refused (and nothing changed) when locked, not wasm, not running, or
    /// when the runtime refuses the module.
    pub async fn upgrade_module(
        &self,
        caller: &Caller,
        name: &str,
        body: &[u8],
        format: Format,
    ) -> Result<Vnf> {
        let req: UpgradeRequest = telvirt_model::from_text(body, format)?;
        let key = vnf_key(name);
        let Some(v) = self.store_handle().get(&key).await? else {
            return Err(ControllerError::NotFound(format!("vnf {name} not found")));
        };
        let mut record: VnfRecord = serde_json::from_slice(&v.value)
            .map_err(|e| ControllerError::Corrupt(format!("{key}: {e}")))?;
        let vnf = &mut record.vnf;
        if !(caller.is_admin() || vnf.owner.as_str() == caller.name) {
            return Err(ControllerError::NotFound(format!("vnf {name} not found")));
        }
        if let Some(lock) = &vnf.lock {
            return Err(ControllerError::Locked {
                vnf: name.to_owned(),
                by: lock.by.to_string(),
                since: lock.at.clone(),
            });
        }
        if vnf.descriptor.spec.runtime != RuntimeKind::Wasm {
            return Err(invalid(
                "module",
                format!("vnf {name} runs on the vm runtime; only wasm VNFs swap modules"),
            ));
        }
        if vnf.phase != Phase::Running {
            return Err(ControllerError::Conflict(format!(
                "vnf {name} is {}; only a Running VNF can be upgraded",
                vnf.phase
            )));
        }
        if req.module.trim().is_empty() || req.module.contains('\0') {
            return Err(invalid(
                "module",
                "must name an uploaded module (sha256:<hex>) or a .wasm file on the node",
            ));
        }
        // The same rules as at create, for the VNF's owner: an uploaded module the owner
        // keeps, or a host path the owner was granted; its maps must fit the placed budget.
        let owner = Caller {
            name: vnf.owner.as_str().to_owned(),
        };
        let mut next = vnf.descriptor.clone();
        if let Some(wasm) = next.spec.wasm.as_mut() {
            wasm.module = req.module.clone();
        }
        if let Some(g) = self.confining_grants(&owner).await? {
            crate::access::require_all(&g.grants, &crate::access::vnf_resources(&next)).map_err(
                |e| match e {
                    ControllerError::NotGranted(f) => {
                        ControllerError::NotGranted(FieldError::new("module", f.reason))
                    }
                    other => other,
                },
            )?;
        }
        let needed = self
            .checked_budget(&owner, &next)
            .await
            .map_err(|e| match e {
                ControllerError::Invalid(f) => invalid("module", f.reason),
                other => other,
            })?;
        if vnf.memory_bytes > 0 && needed > vnf.memory_bytes {
            return Err(invalid(
                "module",
                format!(
                    "the new module needs {needed} bytes of memory (linear memory and maps), more \
                     than the {} bytes placed for vnf {name}; create the VNF again to place it \
                     with the larger budget",
                    vnf.memory_bytes
                ),
            ));
        }
        let host = crate::maps::active_host(vnf)
            .ok_or_else(|| ControllerError::Conflict(format!("vnf {name} is placed nowhere")))?;
        let request = NodeRequest::Upgrade {
            vnf: name.to_owned(),
            module: req.module.clone(),
        };
        let hash = match self.node_call(&host, request).await? {
            NodeReply::Upgraded { hash } => hash,
            NodeReply::Failed { reason } => return Err(invalid("module", reason)),
            other => return Err(crate::maps::unexpected(&host, "upgrade", other)),
        };
        // The module runs now: record its path, re-reading the record if a phase report got
        // in between.
        let (mut record, mut rev) = (record, v.mod_revision);
        let upgraded = (record.vnf.owner.clone(), record.vnf.created_at.clone());
        for _ in 0..16 {
            let vnf = &mut record.vnf;
            if let Some(wasm) = vnf.descriptor.spec.wasm.as_mut() {
                wasm.module = req.module.clone();
            }
            vnf.updated_at = now_rfc3339();
            vnf.reason = Some(format!("module upgraded to {} ({hash})", req.module));
            let value =
                serde_json::to_vec(&record).map_err(|e| ControllerError::Corrupt(e.to_string()))?;
            let outcome = self
                .store_handle()
                .txn(
                    vec![Compare::ModRevision {
                        key: key.clone(),
                        revision: rev,
                    }],
                    vec![Op::Put {
                        key: key.clone(),
                        value,
                        lease: None,
                    }],
                )
                .await?;
            if outcome.succeeded {
                return Ok(record.vnf);
            }
            let Some(fresh) = self.store_handle().get(&key).await? else {
                return Err(ControllerError::NotFound(format!("vnf {name} not found")));
            };
            record = serde_json::from_slice(&fresh.value)
                .map_err(|e| ControllerError::Corrupt(format!("{key}: {e}")))?;
            rev = fresh.mod_revision;
            // The same VNF still (not a new one of the name, maybe another authority's).
            if (&record.vnf.owner, &record.vnf.created_at) != (&upgraded.0, &upgraded.1)
                || record.deleting
            {
                return Err(ControllerError::NotFound(format!("vnf {name} not found")));
            }
        }
        Err(ControllerError::Conflict(format!(
            "vnf {name} now runs module {hash}, but its record kept changing; upgrade again to \
             record the module path"
        )))
    }
}
