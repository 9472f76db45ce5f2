//! Upgrading a running wasm VNF's module in place (`POST /v1/vnfs/{name}/upgrade`): the new
//! module is swapped in between two batches and maps with the same name and layout keep their
//! contents.
//!
//! Owns the checks (visibility, lock, runtime, phase, the owner's grants), asking the agent of
//! the VNF's host to swap through a node call (ADR 047), and recording the new module path in
//! the stored descriptor so a restart runs it, under the owner's grants as checked; a swap it
//! cannot record is undone by swapping the previous module back. It must not touch the runtime
//! itself.

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

fn moving(name: &str, m: &telvirt_model::api::Migration) -> ControllerError {
    ControllerError::Conflict(format!(
        "vnf {name} is moving from host {} to host {}; upgrade it once the move has ended",
        m.from, m.to
    ))
}

impl Controller {
    /// Swaps a running wasm VNF's module, keeping its maps; the stored descriptor names the new
    /// module afterwards. Refused (and nothing changed) when locked, not wasm, not running, when
    /// the runtime refuses the module, or when the owner's grants or standing changed before the
    /// swap was recorded (409; the previous module is swapped back).
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
        if let Some(m) = &vnf.migration {
            return Err(moving(name, m));
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
        let grants = self.confining_grants(&owner).await?;
        if let Some(g) = &grants {
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
        let previous = vnf
            .descriptor
            .spec
            .wasm
            .as_ref()
            .map(|w| w.module.clone())
            .unwrap_or_default();
        // The host swaps only over the module the record names, when its hash is known (an
        // uploaded one): not over another upgrade's, nor in a new VNF of the name.
        let from = telvirt_model::module_digest(&previous).map(str::to_owned);
        let hash = self.swap_module(&host, name, &req.module, from).await?;
        // The module runs now: record it, under the grants it was checked against.
        let guard = grants.as_ref().map(|g| g.unchanged(&owner.name));
        let recorded = self
            .record_upgrade(name, record, v.mod_revision, &req.module, &hash, guard)
            .await;
        match recorded {
            Ok(vnf) => Ok(vnf),
            // Deleted (or replaced by a new VNF of the name): nothing to put back.
            Err(e @ ControllerError::NotFound(_)) => Err(e),
            // Not recorded: the previous module runs again, so nothing changed. Only over the
            // module swapped in: another upgrade that came since stands.
            Err(e) => Err(
                match self
                    .swap_module(&host, name, &previous, Some(hash.clone()))
                    .await
                {
                    Ok(_) => e,
                    Err(back) => ControllerError::Conflict(format!(
                        "{e}; module {hash} was swapped in on host {host} and could not be \
                         swapped back to {previous} ({back}); `telvirt vnf show {name}` says \
                         which module its record names"
                    )),
                },
            ),
        }
    }

    /// Asks `host`'s agent to run `module` in `name`, only over the module of hash `from`
    /// when given; the hash of the module running after.
    async fn swap_module(
        &self,
        host: &str,
        name: &str,
        module: &str,
        from: Option<String>,
    ) -> Result<String> {
        let request = NodeRequest::Upgrade {
            vnf: name.to_owned(),
            module: module.to_owned(),
            from,
        };
        match self.node_call(host, request).await? {
            NodeReply::Upgraded { hash } => Ok(hash),
            NodeReply::Failed { reason } => Err(invalid("module", reason)),
            other => Err(crate::maps::unexpected(host, "upgrade", other)),
        }
    }

    /// Writes `module` into the VNF's stored descriptor (read at `rev`), re-reading the record
    /// when a phase report got in between. Refused (409) when `guard` (the owner's grants and
    /// standing the module was checked against) no longer holds: an authority whose grant was
    /// revoked meanwhile does not keep a module the revoke could not see in use; and when the
    /// VNF began moving (its destination runs the module the record names). NotFound when the
    /// VNF is gone or is another of the name.
    async fn record_upgrade(
        &self,
        name: &str,
        mut record: VnfRecord,
        mut rev: u64,
        module: &str,
        hash: &str,
        guard: Option<Compare>,
    ) -> Result<Vnf> {
        let key = vnf_key(name);
        let upgraded = (record.vnf.owner.clone(), record.vnf.created_at.clone());
        for _ in 0..16 {
            let vnf = &mut record.vnf;
            if let Some(wasm) = vnf.descriptor.spec.wasm.as_mut() {
                wasm.module = module.to_owned();
            }
            vnf.updated_at = now_rfc3339();
            vnf.reason = Some(format!("module upgraded to {module} ({hash})"));
            let value =
                serde_json::to_vec(&record).map_err(|e| ControllerError::Corrupt(e.to_string()))?;
            let compares = std::iter::once(Compare::ModRevision {
                key: key.clone(),
                revision: rev,
            })
            .chain(guard.clone())
            .collect();
            let put = Op::Put {
                key: key.clone(),
                value: value.clone(),
                lease: None,
            };
            match self.store_handle().txn(compares, vec![put]).await {
                Ok(outcome) if outcome.succeeded => return Ok(record.vnf),
                Ok(_) => {}
                // Unanswered, maybe written (an etcd call that timed out after its commit):
                // written if the record is exactly this.
                Err(e) => {
                    let fresh = self.store_handle().get(&key).await.ok().flatten();
                    if fresh.is_some_and(|f| f.value == value) {
                        return Ok(record.vnf);
                    }
                    return Err(e.into());
                }
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
            if let Some(m) = &record.vnf.migration {
                return Err(moving(name, m));
            }
            if let Some(g) = &guard {
                self.guard_holds(g).await?;
            }
        }
        Err(ControllerError::Conflict(format!(
            "vnf {name}'s record kept changing while module {hash} was recorded; upgrade again"
        )))
    }
}
