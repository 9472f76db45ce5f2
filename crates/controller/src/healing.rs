//! Healing after a host or instance failure: the roles VNFs held on a NotReady host go
//! elsewhere, and an active instance that died hands over to its running standby. An
//! active instance whose standby lives on a Ready host fails over at once (the standby is the
//! active now, a new standby is placed when a host can take one); everything else (a VNF
//! without a pair, a lost standby) is re-placed once its host has been NotReady for the heal
//! delay. A VNF no other host can take stays where it is, Unknown, and is tried again on later
//! passes. A vm's move destination is no standby until its guest's stream reached the final
//! copy (the QEMU waiting there holds no guest): it never takes over, and a source lost for the
//! heal delay ends the move before the VNF is healed.
//!
//! Owns the decision of when to heal and the store transaction that records it (placements,
//! allocation, assignments, phase Scheduled with a new generation so the agents act, an event
//! naming what moved). It must not fence or stop the failed host's instances: the store no
//! longer assigns them to that host, and its agent stops them if it comes back.

use std::time::Duration;

use telvirt_model::{DesiredState, Phase, Placement, Role};
use telvirt_sched::{Allocation, Relocation, SchedError, Scheduler};

use super::{
    CAS_RETRIES, Controller, ControllerError, Result, allocation_op, decode, placement_commit,
    transition_ops,
};
use crate::placement;
use crate::records::allocation_key;

/// How long a host stays NotReady before the VNFs without a standby it held are placed again
/// elsewhere, unless told otherwise.
pub const DEFAULT_HEAL_AFTER: Duration = Duration::from_secs(5);

/// How an active instance was lost, as reported.
pub(crate) enum ActiveLoss<'a> {
    /// Its own agent reported it Failed (a worker that trapped, a QEMU that exited).
    Failed { host: &'a str, why: &'a str },
    /// Its standby's agent lost it: the replication connection closed or fell silent.
    Unreachable { standby_host: &'a str, why: &'a str },
}

/// How [`Controller::record_new_placement`] records a placement: the event's reason and
/// actor, whether the agents act again, and a last change of the record.
pub(crate) struct Recording<'a> {
    pub reason: &'a str,
    pub actor: &'a str,
    pub restart: Restart,
    pub extra: &'a (dyn Fn(&mut telvirt_model::Vnf) + Sync),
}

/// Whether a new placement makes the agents act again (phase Scheduled, a new generation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Restart {
    Yes,
    No,
}

/// Who the events written by healing name as their actor.
const HEALER: &str = "healer";

/// The roles of a VNF on failed hosts, standbys first (so an active fails over to a standby
/// that is still alive, never to one on a failed host).
fn lost_roles<'a>(placements: &'a [Placement], failed: &[String]) -> Vec<&'a Placement> {
    let mut lost: Vec<&Placement> = placements
        .iter()
        .filter(|p| failed.contains(&p.host))
        .collect();
    lost.sort_by_key(|p| p.role == Role::Active);
    lost
}

/// Whether `vnf` fails over at once when `failed` hosts are NotReady: its active instance is on
/// one of them, its standby on a host that is not, and the standby lost its active too. A
/// standby that still hears its active says the active's host is cut off from the controller
/// only: it keeps forwarding, and a takeover would make two actives. A pair without a
/// replication stream (vm VNFs) has no such witness: the lease alone decides, except for a vm
/// move short of its commit point, whose destination holds no guest (never).
pub(crate) fn fails_over(vnf: &telvirt_model::Vnf, failed: &[String]) -> bool {
    if destination_holds_no_guest(vnf) {
        return false;
    }
    let on_failed = |role: Role| {
        vnf.placements
            .iter()
            .find(|p| p.role == role)
            .map(|p| failed.contains(&p.host))
    };
    on_failed(Role::Active) == Some(true)
        && on_failed(Role::Standby) == Some(false)
        && !standby_hears_active(vnf, failed)
}

/// Whether `vnf` is a vm under a move short of its commit point: the standby placement is the
/// destination's QEMU waiting for the stream, which holds no guest and will not get one
/// unless the source lets the final copy through. It is no standby to fail over or promote to:
/// its source's host may only be slow (a lease lapsed under the stream's load), and were it
/// lost, the guest is not at the destination either. Past the commit point the guest is on
/// its way there (or runs there): the destination takes over.
pub(crate) fn destination_holds_no_guest(vnf: &telvirt_model::Vnf) -> bool {
    vnf.descriptor.spec.runtime == telvirt_model::RuntimeKind::Vm
        && vnf
            .migration
            .as_ref()
            .is_some_and(|m| !super::migration::guest_moved(vnf, m))
}

/// Whether `vnf`'s standby, on a host not in `not_ready`, still hears its active over a synced
/// stream (as last reported): its active lives, whatever the controller's view of its host.
/// Neither a failover nor a heal moves such an active.
pub(crate) fn standby_hears_active(vnf: &telvirt_model::Vnf, not_ready: &[String]) -> bool {
    vnf.descriptor.spec.runtime == telvirt_model::RuntimeKind::Wasm
        && vnf
            .replication
            .as_ref()
            .is_some_and(|r| r.state == "synced")
        && vnf
            .standby
            .as_ref()
            .is_some_and(|s| s.active_lost.is_none() && !not_ready.contains(&s.host))
}

/// What one relocation did, for the event.
fn describe(host: &str, r: &Relocation) -> String {
    let target = |rp: &telvirt_sched::RolePlacement| {
        let cpus: Vec<String> = rp.cpus.iter().map(ToString::to_string).collect();
        format!("{} cpus {}", rp.host, cpus.join(","))
    };
    match (r.promoted, &r.replaced) {
        (true, Some(new)) => format!(
            "the standby is the active now (host {host} failed); new standby on {}",
            target(new)
        ),
        (true, None) => format!(
            "the standby is the active now (host {host} failed); no host can take a new standby"
        ),
        (false, Some(new)) if r.lost == telvirt_sched::Role::Sby => {
            format!("standby moved off failed host {host} to {}", target(new))
        }
        (false, Some(new)) => format!("moved off failed host {host} to {}", target(new)),
        (false, None) => {
            format!("standby lost with host {host}; no host can take a new one")
        }
    }
}

impl Controller {
    /// Sets how long a host stays NotReady before the VNFs without a standby it held are
    /// placed elsewhere (`None`: never; an active with a live standby fails over regardless).
    pub fn set_heal_after(&self, after: Option<Duration>) {
        *self
            .liveness
            .heal_after
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = after;
    }

    /// How long a host stays NotReady before its VNFs are placed elsewhere (`None`: never).
    pub fn heal_after(&self) -> Option<Duration> {
        *self
            .liveness
            .heal_after
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Moves the roles VNF `name` holds on the failed hosts `failed` elsewhere, and records it
    /// in one transaction. Returns whether it moved; a VNF no host can take keeps its
    /// placement (its reason says why).
    pub(crate) async fn heal_vnf(&self, name: &str, failed: &[String]) -> Result<bool> {
        let mut scheduler = self.scheduler.lock().await;
        let Some((record, _)) = self.load(name).await? else {
            return Ok(false);
        };
        if record.deleting {
            drop(scheduler);
            return match self.remove_when(name, |r| r.deleting).await {
                Ok(_) | Err(ControllerError::NotFound(_)) => Ok(true),
                Err(e) => Err(e),
            };
        }
        if let Some(m) = record
            .vnf
            .migration
            .as_ref()
            .filter(|m| failed.contains(&m.from) && destination_holds_no_guest(&record.vnf))
        {
            // The move ends first, its destination freed (its agent stops the waiting QEMU);
            // a later pass heals the active as any other.
            let reason = format!(
                "host {} failed during the move to host {}: the move ended (the QEMU waiting there held no guest)",
                m.from, m.to
            );
            return self.end_move(&mut scheduler, name, &reason, HEALER).await;
        }
        let lost = lost_roles(&record.vnf.placements, failed);
        if lost.is_empty() {
            return Ok(false);
        }
        let mut moves = Vec::new();
        let mut refusal = None;
        for p in lost {
            match scheduler.relocate(name, &p.host) {
                Ok(r) => moves.push(describe(&p.host, &r)),
                // Kept stable (no heartbeat age), so later passes write nothing new.
                Err(e @ (SchedError::NoPlacement { .. } | SchedError::ReserveViolation { .. })) => {
                    refusal = Some(format!(
                        "host {} failed; no other host can take it now: {e}",
                        p.host
                    ));
                }
                Err(e) => {
                    tracing::warn!(vnf = name, host = %p.host, "cannot heal: {e}");
                    refusal = Some(format!("cannot be moved off host {}: {e}", p.host));
                }
            }
        }
        if moves.is_empty() {
            drop(scheduler);
            if let Some(reason) = refusal {
                self.note_reason(name, reason).await?;
            }
            return Ok(false);
        }
        let placed = scheduler.placement(name)?;
        let recorded = self
            .record_placement(&mut scheduler, name, &placed, &moves.join("; "))
            .await;
        if recorded.is_err() {
            self.hold_what_is_stored(&mut scheduler, name).await;
        }
        drop(scheduler);
        recorded
    }

    /// After a placement of VNF `name` whose record the store answered with an error (it may
    /// have been applied all the same) or that kept losing its race: the scheduler holds again
    /// what the store holds for the VNF, read back now. Otherwise it would keep cores for a
    /// place nobody recorded (the record still naming the failed host, no later pass would move
    /// the VNF again, and its cores there would be free for another VNF). A store that cannot
    /// be read leaves the scheduler as it is (logged).
    async fn hold_what_is_stored(&self, scheduler: &mut Scheduler, name: &str) {
        let stored = match self.stored_allocation(name).await {
            Ok(stored) => stored,
            Err(e) => {
                tracing::warn!(vnf = %name, "cannot read its stored placement back after the store did not take its new one: {e}");
                return;
            }
        };
        let held = scheduler.allocation(name).ok();
        if held.as_ref().map(|a| &a.placement) == stored.as_ref().map(|a| &a.placement) {
            return;
        }
        if held.is_some() {
            let _ = scheduler.release(name);
        }
        let Some(stored) = stored else {
            tracing::warn!(vnf = %name, "the store holds no placement for it: its cores are released");
            return;
        };
        match scheduler.restore(&stored) {
            Ok(()) => {
                tracing::warn!(vnf = %name, "its new placement was not recorded: the scheduler holds what the store holds again")
            }
            Err(e) => {
                tracing::error!(vnf = %name, "its stored placement cannot be held again ({e}); it keeps the unrecorded one");
                if let Some(held) = held
                    && let Err(e) = scheduler.restore(&held)
                {
                    tracing::error!(vnf = %name, "and that cannot be held again either: {e}");
                }
            }
        }
    }

    /// Places a new standby for VNF `name`, an active-standby pair left without one (no host
    /// could take it when it was lost), once a host can. Returns whether it placed one; no host
    /// with room is no error (a later pass tries again).
    pub(crate) async fn complete_pair(&self, name: &str) -> Result<bool> {
        let mut scheduler = self.scheduler.lock().await;
        let Some((record, _)) = self.load(name).await? else {
            return Ok(false);
        };
        let v = &record.vnf;
        let has = |role: Role| v.placements.iter().any(|p| p.role == role);
        if record.deleting
            || v.migration.is_some()
            || v.desired != DesiredState::Running
            || v.descriptor.spec.redundancy != telvirt_model::Redundancy::ActiveStandby
            || !has(Role::Active)
            || has(Role::Standby)
        {
            return Ok(false);
        }
        let new = match scheduler.add_standby(name, None, &[]) {
            Ok(new) => new,
            Err(SchedError::NoPlacement { .. } | SchedError::ReserveViolation { .. }) => {
                return Ok(false);
            }
            Err(e) => return Err(e.into()),
        };
        let placed = scheduler.placement(name)?;
        let cpus: Vec<String> = new.cpus.iter().map(ToString::to_string).collect();
        let reason = format!(
            "the pair is whole again: new standby on {} cpus {}",
            new.host,
            cpus.join(",")
        );
        let how = Recording {
            reason: &reason,
            actor: HEALER,
            restart: Restart::No,
            extra: &|_| {},
        };
        match self
            .record_new_placement(&mut scheduler, name, &placed, &how)
            .await
        {
            Ok(recorded) => Ok(recorded),
            Err(e) => {
                scheduler.drop_standby(name)?;
                Err(e)
            }
        }
    }

    /// Hands VNF `name` over to its standby at once, when `loss` holds (as the store says
    /// now), the VNF is wanted running and unlocked, and its standby runs on a Ready host: the
    /// roles swap on the cpus each holds, and the old active's host gets the standby (started
    /// again in place by a new generation; a host that died loses it later to the healer).
    /// Returns whether it handed over.
    pub(crate) async fn hand_over(&self, name: &str, loss: &ActiveLoss<'_>) -> Result<bool> {
        let mut scheduler = self.scheduler.lock().await;
        let Some((record, _)) = self.load(name).await? else {
            return Ok(false);
        };
        let v = &record.vnf;
        let role_host = |role: Role| {
            v.placements
                .iter()
                .find(|p| p.role == role)
                .map(|p| p.host.clone())
        };
        let (Some(active), Some(standby)) = (role_host(Role::Active), role_host(Role::Standby))
        else {
            return Ok(false);
        };
        let standby_runs = v
            .standby
            .as_ref()
            .is_some_and(|s| s.phase == Phase::Running && s.host == standby);
        let (holds, why) = match loss {
            ActiveLoss::Failed { host, why } => (*host == active && v.phase == Phase::Failed, why),
            ActiveLoss::Unreachable { standby_host, why } => (
                *standby_host == standby
                    && matches!(v.phase, Phase::Running | Phase::Unknown | Phase::Starting),
                why,
            ),
        };
        if !holds
            || record.deleting
            || v.desired != DesiredState::Running
            || v.lock.is_some()
            || !standby_runs
            || destination_holds_no_guest(v)
            || !self.host_ready(&standby).await?
        {
            return Ok(false);
        }
        let placed = scheduler.swap_roles(name)?;
        let reason = match loss {
            ActiveLoss::Failed { .. } => format!(
                "the active instance on {active} failed ({why}); the standby on {standby} is the active now, and {active} starts again as the standby"
            ),
            ActiveLoss::Unreachable { .. } => format!(
                "the standby on {standby} lost its active on {active} ({why}); it is the active now, and {active} holds the standby"
            ),
        };
        match self
            .record_placement(&mut scheduler, name, &placed, &reason)
            .await
        {
            Ok(true) => Ok(true),
            // Not recorded: the scheduler goes back to what the store holds.
            other => {
                if scheduler.placement(name).is_ok() {
                    scheduler.swap_roles(name)?;
                }
                other
            }
        }
    }

    /// Records the placement `placed` the scheduler (locked by the caller) now holds for VNF
    /// `name`, in one transaction: placements, allocation, assignment index, phase Scheduled
    /// with a new generation (so the agents act), the standby's status and stream reset, an
    /// event by the healer with `reason`. Read again while the agents' observations change the
    /// record (deletes wait for the scheduler lock). False when the VNF is gone (its cores are
    /// released).
    async fn record_placement(
        &self,
        scheduler: &mut Scheduler,
        name: &str,
        placed: &telvirt_sched::Placement,
        reason: &str,
    ) -> Result<bool> {
        let how = Recording {
            reason,
            actor: HEALER,
            restart: Restart::Yes,
            extra: &|_| {},
        };
        self.record_new_placement(scheduler, name, placed, &how)
            .await
    }

    /// [`Controller::record_placement`] as `how` says: keeping the phase and generation with
    /// `Restart::No` (nothing the agents run changes, only where a standby is), by its actor,
    /// with its `extra` applied to the new record last.
    pub(crate) async fn record_new_placement(
        &self,
        scheduler: &mut Scheduler,
        name: &str,
        placed: &telvirt_sched::Placement,
        how: &Recording<'_>,
    ) -> Result<bool> {
        let Recording {
            reason,
            actor,
            restart,
            extra,
        } = how;
        for _ in 0..CAS_RETRIES {
            let Some((record, rev)) = self.load(name).await? else {
                scheduler.release(name)?;
                return Ok(false);
            };
            let stored_alloc = self.store.get(&allocation_key(name)).await?;
            let request = match &stored_alloc {
                Some(v) => decode::<Allocation>(&allocation_key(name), &v.value)?.request,
                None => placement::vnf_request(&record.vnf),
            };
            let mut next = record.clone();
            let from = next.vnf.phase;
            next.vnf.placements = placement::placements(placed, &record.vnf.descriptor);
            // The active moved: a new epoch fences the instance that held it.
            if crate::maps::active_host(&next.vnf) != crate::maps::active_host(&record.vnf) {
                next.vnf.epoch += 1;
            }
            if *restart == Restart::Yes {
                next.vnf.phase = Phase::Scheduled;
                next.vnf.generation += 1;
            }
            // A new standby (or none): its status and the stream to it start over.
            next.vnf.standby = None;
            next.vnf.replication = None;
            // A new placement ends a move (its destination may be the active now).
            next.vnf.migration = None;
            // And what its end left its source to do (a recording may set it again).
            next.vnf.resume_moved_copy = false;
            next.vnf.reason = Some((*reason).to_owned());
            extra(&mut next.vnf);
            let mut ops = transition_ops(&mut next, from, reason, actor)?;
            ops.push(allocation_op(name, request, placed)?);
            let compares = placement_commit(
                &mut ops,
                Some(&record),
                &next,
                rev,
                stored_alloc.map_or(0, |v| v.mod_revision),
            );
            if self.store.txn(compares, ops).await?.succeeded {
                tracing::info!(vnf = name, "healed: {reason}");
                self.metrics.event();
                // Hosts holding its networks rewire when its traffic moved (`vnf_changed`).
                self.vnf_changed(Some(&record.vnf), Some(&next.vnf));
                return Ok(true);
            }
        }
        Err(ControllerError::Conflict(format!(
            "vnf {name} kept changing while its new placement was being recorded"
        )))
    }

    /// Sets a VNF's reason without a phase change (and so without an event), once per reason.
    async fn note_reason(&self, name: &str, reason: String) -> Result<()> {
        match self
            .update(name, |record| {
                if record.vnf.reason.as_deref() != Some(reason.as_str()) {
                    record.vnf.reason = Some(reason.clone());
                }
                Ok(None)
            })
            .await
        {
            Ok(_) | Err(ControllerError::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(role: Role, host: &str) -> Placement {
        Placement {
            role,
            host: host.into(),
            vcpus: vec![vec![1]],
            emulator_cpus: Vec::new(),
            held: Vec::new(),
            numa_nodes: vec![0],
            group: None,
        }
    }

    /// A wasm VNF placed as `placements`, its stream to the standby synced.
    fn pair(placements: &[Placement]) -> telvirt_model::Vnf {
        let descriptor = telvirt_model::parse_vnf(
            b"apiVersion: telvirt/v1\nkind: Vnf\nmetadata: { name: natp }\nspec:\n  runtime: wasm\n  cpu: { policy: dedicated, count: 1 }\n  redundancy: active-standby\n  ports: [in, out]\n  wasm: { module: nat.wasm }\n",
            telvirt_model::Format::Yaml,
        )
        .unwrap();
        telvirt_model::Vnf {
            machine: None,
            accel: None,
            resume_moved_copy: false,
            moves: 0,
            name: descriptor.name().clone(),
            owner: "admin".parse().unwrap(),
            descriptor,
            desired: DesiredState::Running,
            phase: Phase::Running,
            reason: None,
            lock: None,
            placements: placements.to_vec(),
            devices: Vec::new(),
            memory_bytes: 0,
            generation: 1,
            created_at: String::new(),
            updated_at: String::new(),
            standby: Some(telvirt_model::api::InstanceStatus {
                host: "h2".into(),
                phase: Phase::Running,
                reason: String::new(),
                active_lost: None,
                arrival_failed: false,
            }),
            replication: Some(telvirt_model::api::ReplicationStatus {
                standby_host: "h2".into(),
                state: "synced".into(),
                lag_us: 0,
                updates: 0,
                snapshots: 1,
                bytes: 0,
                error: None,
                guest: None,
                packets_passed: 0,
                frozen_us: None,
                freeze_phases: None,
                move_id: 0,
            }),
            migration: None,
            epoch: 0,
        }
    }

    #[test]
    fn an_active_fails_over_only_to_a_standby_on_a_live_host_that_lost_it_too() {
        let pair_at = [at(Role::Active, "h1"), at(Role::Standby, "h2")];
        let failed = |hosts: &[&str]| hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>();
        let mut lost = pair(&pair_at);
        lost.standby.as_mut().unwrap().active_lost = Some(telvirt_model::api::ActiveLost {
            why: "nothing from h1 for 30 ms".into(),
            closed: false,
        });
        assert!(fails_over(&lost, &failed(&["h1"])));
        assert!(!fails_over(&lost, &failed(&["h2"])));
        assert!(!fails_over(&lost, &failed(&["h1", "h2"])));
        assert!(!fails_over(&pair(&pair_at[..1]), &failed(&["h1"])));
        // The standby still hears its active: h1 is cut off from the controller only.
        let hears = pair(&pair_at);
        assert!(!fails_over(&hears, &failed(&["h1"])));
        // A stream that never synced is no witness: the lease decides.
        let mut unsynced = pair(&pair_at);
        unsynced.replication = None;
        assert!(fails_over(&unsynced, &failed(&["h1"])));
        let pair = pair_at;
        // Both lost: the standby is moved first, so the active never fails over to a dead host.
        let order: Vec<Role> = lost_roles(&pair, &failed(&["h1", "h2"]))
            .iter()
            .map(|p| p.role)
            .collect();
        assert_eq!(order, [Role::Standby, Role::Active]);
    }

    #[test]
    fn a_vm_moving_fails_over_to_its_destination_only_once_the_guest_is_there() {
        let at_both = [at(Role::Active, "h1"), at(Role::Standby, "h2")];
        let mut moving = pair(&at_both);
        moving.descriptor.spec.runtime = telvirt_model::RuntimeKind::Vm;
        moving.standby.as_mut().unwrap().active_lost = Some(telvirt_model::api::ActiveLost {
            why: "nothing from h1".into(),
            closed: false,
        });
        moving.migration = Some(telvirt_model::api::Migration {
            id: 0,
            to: "h2".into(),
            from: "h1".into(),
            started_at: String::new(),
            by: "admin".into(),
            engine: None,
            handoff_at: None,
            committed_at: None,
            committed_stream: None,
            resumed_at_us: None,
        });
        let stream = |status: &str| telvirt_model::api::ReplicationStatus {
            standby_host: "h2".into(),
            state: "streaming".into(),
            lag_us: 0,
            updates: 0,
            snapshots: 0,
            bytes: 0,
            error: None,
            guest: Some(telvirt_model::api::GuestStream {
                status: status.into(),
                opened_ms: 1_000,
                ..Default::default()
            }),
            packets_passed: 0,
            frozen_us: None,
            freeze_phases: None,
            move_id: 0,
        };
        let h1 = ["h1".to_owned()];
        // Still streaming: the QEMU waiting on h2 holds no guest.
        moving.replication = Some(stream("active"));
        assert!(destination_holds_no_guest(&moving));
        assert!(!fails_over(&moving, &h1));
        moving.replication = None;
        assert!(!fails_over(&moving, &h1));
        // At its commit point the guest is stopped at h1, its device state not sent.
        moving.replication = Some(stream("pre-switchover"));
        assert!(destination_holds_no_guest(&moving));
        // Once the controller recorded that report, the source lets the final copy through.
        let mut committed = moving.clone();
        committed.migration.as_mut().unwrap().committed_at = Some("2026-12-04T12:00:00Z".into());
        assert!(!destination_holds_no_guest(&committed));
        assert!(fails_over(&committed, &h1));
        // Committed ahead of the final copy (QEMU still streams, the guest runs at h1): no
        // guest at h2 yet, no failover there.
        let mut ahead = committed.clone();
        ahead.migration.as_mut().unwrap().committed_stream = Some(1_000);
        ahead.replication = Some(stream("active"));
        assert!(destination_holds_no_guest(&ahead));
        assert!(!fails_over(&ahead, &h1));
        ahead.replication = Some(stream("pre-switchover"));
        assert!(fails_over(&ahead, &h1));
        // The final copy under way: the guest runs only on h2 from now on.
        moving.replication = Some(stream("device"));
        assert!(!destination_holds_no_guest(&moving));
        assert!(fails_over(&moving, &h1));
        // A wasm move's destination holds the replicated maps.
        let mut wasm = moving.clone();
        wasm.descriptor.spec.runtime = telvirt_model::RuntimeKind::Wasm;
        wasm.replication = Some(stream("active"));
        assert!(!destination_holds_no_guest(&wasm));
    }
}
