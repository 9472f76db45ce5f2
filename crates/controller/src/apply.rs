//! Applying a new descriptor to an existing VNF (`PUT /v1/vnfs/{name}`): which fields change,
//! refusing with 409 those a VNF cannot take while it exists (each named with why), and taking
//! the rest in place: labels in the record, a wasm VNF's config and fuel by its agent
//! (`Taking::Reconfigure`), a pinned vm VNF's cores by the scheduler and its agent
//! (`Taking::Repin`). New cores are held beside the old ones until the VNF's agents report the
//! generation that moved the threads, so no core is ever given to two VNFs. A dry run computes
//! the same answer and writes nothing. It must not talk to agents: the record carries the
//! change and the agents follow their assignments.

use std::sync::Arc;
use std::time::Duration;

use super::{
    CAS_RETRIES, Caller, Controller, ControllerError, Result, allocation_key, allocation_op,
    decode, placement, placement_commit, transition_ops,
};
use telvirt_model::api::VnfApplied;
use telvirt_model::change::{self, ApplyPlan, FieldChange, Taking};
use telvirt_model::{FieldError, Format, Vnf, VnfDescriptor, parse_vnf};
use telvirt_sched::Change;

/// How long a re-pin waits for the VNF's agents to report that its threads moved before it
/// frees the old cores anyway (an agent that does not answer by then is on a host the
/// controller will find NotReady).
pub const REPIN_CONFIRM_DEADLINE: Duration = Duration::from_secs(30);

impl Controller {
    /// Applies descriptor `text` to VNF `name` as `caller`, or with `dry_run` says what it
    /// would do and changes nothing.
    pub async fn apply_vnf(
        self: &Arc<Self>,
        caller: &Caller,
        name: &str,
        text: &[u8],
        format: Format,
        dry_run: bool,
    ) -> Result<VnfApplied> {
        let new = parse_vnf(text, format)?;
        if new.name().as_str() != name {
            return Err(ControllerError::Invalid(FieldError::new(
                "metadata.name",
                format!(
                    "is `{}` but the path names vnf {name}; a VNF keeps its name (create the other one)",
                    new.name()
                ),
            )));
        }
        let (record, _) = self.load_visible(caller, name).await?;
        let grants = self.confining_grants(caller).await?;
        if let Some(g) = &grants {
            crate::access::require_all(&g.grants, &crate::access::vnf_resources(&new))?;
        }
        let old = record.vnf.descriptor.clone();
        let plan = change::plan(&old, &new);
        if let Some(first) = plan.refused.first() {
            return Err(ControllerError::NeedsRecreate {
                detail: format!(
                    "vnf {name} cannot take {} while it exists: {}: {}{}",
                    if plan.refused.len() == 1 {
                        "this change".to_owned()
                    } else {
                        format!("these {} changes", plan.refused.len())
                    },
                    first.path,
                    first.reason,
                    if plan.refused.len() > 1 {
                        "; `errors` names the others"
                    } else {
                        ""
                    }
                ),
                errors: plan.refused,
            });
        }
        if plan.changes.is_empty() {
            return Ok(VnfApplied {
                vnf: record.vnf,
                changes: Vec::new(),
                dry_run,
            });
        }
        refuse_now(name, &record)?;
        let memory_bytes = self.checked_budget(caller, &new).await?;
        if memory_bytes != record.vnf.memory_bytes {
            return Err(ControllerError::NeedsRecreate {
                detail: format!(
                    "vnf {name} would need {memory_bytes} bytes of host memory where placement counted {}; create it again",
                    record.vnf.memory_bytes
                ),
                errors: vec![FieldError::new(
                    "spec",
                    "changes the memory placement counted for the VNF",
                )],
            });
        }
        let reason = format!("applied by {}: {}", caller.name, describe(&plan.changes));
        if plan.takes(Taking::Repin) && !record.vnf.placements.is_empty() {
            return self
                .repin(caller, name, &record.vnf, new, plan, &reason, dry_run)
                .await;
        }
        if dry_run {
            let mut vnf = record.vnf;
            vnf.descriptor = new;
            return Ok(VnfApplied {
                vnf,
                changes: plan.changes,
                dry_run,
            });
        }
        let actor = caller.name.clone();
        let guard = grants.as_ref().map(|g| g.unchanged(&caller.name));
        let vnf = self
            .update_guarded(name, guard, |r| {
                // Placed meanwhile: new cores must go through the scheduler (apply again).
                let placed = plan.takes(Taking::Repin) && !r.vnf.placements.is_empty();
                if r.vnf.descriptor != old || placed {
                    return Err(changed_meanwhile(name));
                }
                refuse_now(name, r)?;
                r.vnf.descriptor = new.clone();
                r.vnf.generation += 1;
                Ok(Some((r.vnf.phase, reason.clone(), actor.clone())))
            })
            .await?;
        Ok(VnfApplied {
            vnf,
            changes: plan.changes,
            dry_run,
        })
    }

    /// Moves a placed VNF to the cores `new` pins it to: the scheduler holds them beside the
    /// old ones, the record and its allocation are written in one transaction, and the old
    /// cores are freed once every host of the VNF reported the new generation (or after
    /// [`REPIN_CONFIRM_DEADLINE`]).
    #[allow(clippy::too_many_arguments)]
    async fn repin(
        self: &Arc<Self>,
        caller: &Caller,
        name: &str,
        current: &Vnf,
        new: VnfDescriptor,
        plan: ApplyPlan,
        reason: &str,
        dry_run: bool,
    ) -> Result<VnfApplied> {
        let cores = new.spec.cpu.cores.clone().unwrap_or_default();
        let mut scheduler = self.scheduler.lock().await;
        let before = scheduler.placement(name)?;
        let placed = match scheduler.begin_change(
            name,
            &Change::Repin {
                cores: cores.clone(),
            },
        ) {
            Ok(p) => p,
            Err(e) => {
                return Err(ControllerError::CannotApply(FieldError::new(
                    "spec.cpu.cores",
                    format!("cannot have {cores:?}: {e}"),
                )));
            }
        };
        let hosts_before: Vec<&str> = std::iter::once(&before.act)
            .chain(&before.sby)
            .map(|r| r.host.as_str())
            .collect();
        let hosts_after: Vec<&str> = std::iter::once(&placed.act)
            .chain(&placed.sby)
            .map(|r| r.host.as_str())
            .collect();
        if hosts_before != hosts_after {
            scheduler.abort_change(name)?;
            return Err(ControllerError::CannotApply(FieldError::new(
                "spec.cpu.cores",
                format!(
                    "cores {cores:?} are not free on host {} (a re-pin keeps the VNF on its host)",
                    hosts_before.join(", ")
                ),
            )));
        }
        if dry_run {
            scheduler.abort_change(name)?;
            drop(scheduler);
            // The VNF as read for this apply, with what the apply would give it.
            let mut vnf = current.clone();
            vnf.placements = placement::placements(&placed, &new);
            vnf.descriptor = new;
            return Ok(VnfApplied {
                vnf,
                changes: plan.changes,
                dry_run,
            });
        }
        let hosts: Vec<String> = hosts_after.iter().map(|h| (*h).to_owned()).collect();
        // Expected before the write: an agent in this process may report before it returns.
        self.expect_observations(name, &hosts);
        let written = match self
            .record_repin(name, &current.descriptor, &new, &placed, caller, reason)
            .await
        {
            Ok(v) => v,
            Err(e) => {
                self.forget_observations(name, &hosts);
                scheduler.abort_change(name)?;
                return Err(e);
            }
        };
        drop(scheduler);
        // The wait and the commit run on their own: a caller that goes away (a closed
        // connection) must not leave the change pending, which would hold both sets of cores
        // and refuse every later change of the VNF, its healing included.
        let this = Arc::clone(self);
        let (vnf, generation) = (name.to_owned(), written.generation);
        let finish = tokio::spawn(async move {
            let confirmed = this
                .wait_observed(&vnf, &hosts, generation, REPIN_CONFIRM_DEADLINE)
                .await;
            // A host failure or a delete in the meantime may have ended the change already.
            if let Err(e) = this.scheduler.lock().await.commit_change(&vnf) {
                tracing::info!(vnf, "the re-pin had ended before its commit: {e}");
            }
            if !confirmed {
                tracing::warn!(
                    vnf,
                    "no agent confirmed the re-pin within {} s; the old cores are freed",
                    REPIN_CONFIRM_DEADLINE.as_secs()
                );
            }
        });
        if let Err(e) = finish.await {
            tracing::warn!(
                vnf = name,
                "the re-pin's commit did not run to its end: {e}"
            );
        }
        let vnf = self
            .load(name)
            .await?
            .map_or(written, |(record, _)| record.vnf);
        Ok(VnfApplied {
            vnf,
            changes: plan.changes,
            dry_run,
        })
    }

    /// Writes the re-pinned VNF: its descriptor, placements and allocation, a new generation
    /// and the event, conditioned on the record and allocation as read.
    async fn record_repin(
        &self,
        name: &str,
        old: &VnfDescriptor,
        new: &VnfDescriptor,
        placed: &telvirt_sched::Placement,
        caller: &Caller,
        reason: &str,
    ) -> Result<telvirt_model::Vnf> {
        for _ in 0..CAS_RETRIES {
            let (record, rev) = self
                .load(name)
                .await?
                .ok_or_else(|| super::not_found(name))?;
            if record.vnf.descriptor != *old {
                return Err(changed_meanwhile(name));
            }
            refuse_now(name, &record)?;
            let stored_alloc = self.store.get(&allocation_key(name)).await?;
            let mut next = record.clone();
            next.vnf.descriptor = new.clone();
            next.vnf.placements = placement::placements(placed, new);
            next.vnf.generation += 1;
            let from = next.vnf.phase;
            let mut ops = transition_ops(&mut next, from, reason, &caller.name)?;
            let request = match &stored_alloc {
                Some(v) => {
                    let mut request =
                        decode::<telvirt_sched::Allocation>(&allocation_key(name), &v.value)?
                            .request;
                    request.cpu = placement::request(new, record.vnf.owner.as_str()).cpu;
                    request
                }
                None => placement::request(new, record.vnf.owner.as_str()),
            };
            ops.push(allocation_op(name, request, placed)?);
            let compares = placement_commit(
                &mut ops,
                Some(&record),
                &next,
                rev,
                stored_alloc.map_or(0, |v| v.mod_revision),
            );
            if self.store.txn(compares, ops).await?.succeeded {
                self.metrics.event();
                self.vnf_changed(Some(&record.vnf), Some(&next.vnf));
                return Ok(next.vnf);
            }
        }
        Err(changed_meanwhile(name))
    }
}

/// Why VNF `name`, as `record` says, takes no change now: locked, being deleted or moving.
fn refuse_now(name: &str, record: &super::VnfRecord) -> Result<()> {
    if let Some(lock) = &record.vnf.lock {
        return Err(ControllerError::locked(name, lock));
    }
    if record.deleting {
        return Err(ControllerError::Conflict(format!(
            "vnf {name} is being deleted"
        )));
    }
    if let Some(m) = &record.vnf.migration {
        return Err(ControllerError::Conflict(format!(
            "vnf {name} is moving to host {}; apply once the move has ended",
            m.to
        )));
    }
    Ok(())
}

fn changed_meanwhile(name: &str) -> ControllerError {
    ControllerError::Conflict(format!(
        "vnf {name} changed while the new descriptor was applied; read it again and retry"
    ))
}

/// The changes for an event: `path: old → new`, `;`-separated.
fn describe(changes: &[FieldChange]) -> String {
    changes
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}
