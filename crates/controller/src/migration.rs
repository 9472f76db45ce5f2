//! Moving a running VNF to another host: the destination is placed as a standby (its cpus held
//! beside the source's, so the two never overlap), the source's agent streams the state to it
//! (a wasm VNF's maps, ADR 052; a vm's guest, QEMU's migration stream, ADR 062), and once the
//! stream is synced and the destination runs, the roles swap and the source's place is freed,
//! in one transaction; the network follows the active. A move can be cancelled until its
//! commit point (a vm's: its source reported the final copy waiting); past it, a vm's move
//! whose destination fails (its guest broke on arrival) ends on the source, which resumes the
//! copy it kept. If the source dies during a wasm move, the destination takes over as any
//! standby would; a vm's destination does so only past the commit point (before it, it holds
//! no guest).
//!
//! Owns the refusals of a move (which field, why), its start, its end and its cancel. It must
//! not talk to agents: the store carries the move, the agents follow their assignments.

use telvirt_model::api::{MigrateRequest, Migration};
use telvirt_model::vnf::Accelerator;
use telvirt_model::{FieldError, Phase, Redundancy, Role, RuntimeKind, Vnf};
use telvirt_sched::SchedError;

use std::time::{Duration, SystemTime};

use super::healing::{Recording, Restart};
use super::{Caller, Controller, ControllerError, Result, now_rfc3339};

/// How long a move may take before the controller cancels it (the VNF stays on its source),
/// unless told otherwise.
pub const DEFAULT_MOVE_DEADLINE: Duration = Duration::from_secs(120);

/// Who the events of a move the controller ends (overdue, or its guest broken on arrival) name
/// as their actor.
const CONTROLLER_ACTOR: &str = "controller";

/// Why VNF `v` cannot start a move (checked on the record read under the scheduler lock).
fn refusal(v: &Vnf, deleting: bool) -> Option<ControllerError> {
    let name = v.name.as_str();
    if let Some(lock) = &v.lock {
        return Some(ControllerError::locked(name, lock));
    }
    if deleting {
        return Some(ControllerError::Conflict(format!(
            "vnf {name} is being deleted"
        )));
    }
    if let Some(m) = &v.migration {
        return Some(ControllerError::Conflict(format!(
            "vnf {name} is moving to host {} already (since {}); cancel it first with {{\"cancel\": true}}",
            m.to, m.started_at
        )));
    }
    if let Some(e) = vm_refusal(v) {
        return Some(e);
    }
    if v.descriptor.spec.redundancy == Redundancy::ActiveStandby {
        return Some(ControllerError::Invalid(FieldError::new(
            "spec.redundancy",
            format!(
                "vnf {name} is an active-standby pair: its standby takes over instead of a move"
            ),
        )));
    }
    if v.phase != Phase::Running {
        return Some(ControllerError::Conflict(format!(
            "vnf {name} is {}, not Running: only a running VNF moves",
            v.phase
        )));
    }
    None
}

/// Whether move `m` of vm `v` is past its point of no return: its source reported the stream
/// at its commit point (`m.committed_at`, recorded once under the scheduler lock, when the
/// stream asked for it near its end or waited at its final copy: from then on the move is not
/// cancelled, nor ended by its deadline, and the source lets the final copy through only once
/// it has read that the move stands), and the latest stream reported is that one (not a
/// later stream, which has not committed) and has not failed (the guest then runs at the
/// source again, and the move may be cancelled until a stream commits again); or a report says
/// the final copy streams or completed.
pub(crate) fn move_committed(v: &Vnf, m: &Migration) -> bool {
    let report = move_report(v, m);
    let stream = report.and_then(|r| r.guest.as_ref());
    let committed = m.committed_stream.unwrap_or(0);
    // A failure of the committed stream (or a later one): the guest runs at the source again.
    let failed = report.is_some_and(|r| r.state == "failing")
        && stream.is_some_and(|g| g.opened_ms >= committed);
    // A later stream than the committed one: that one ended; this one has not committed (a
    // record from before streams were told apart has no committed stream to compare).
    let later = stream.is_some_and(|g| m.committed_stream.is_some_and(|c| g.opened_ms > c));
    final_copy(v, m) || (m.committed_at.is_some() && !failed && !later)
}

/// `v`'s last stream report when it is of move `m` (not of an earlier move's stream).
fn move_report<'a>(v: &'a Vnf, m: &Migration) -> Option<&'a telvirt_model::api::ReplicationStatus> {
    v.replication.as_ref().filter(|r| r.serves(m))
}

/// Whether a report of move `m` says its final copy streams or completed.
fn final_copy(v: &Vnf, m: &Migration) -> bool {
    move_report(v, m).is_some_and(|r| {
        r.guest.as_ref().is_some_and(|g| {
            r.state == "synced"
                || (r.state == "streaming" && ["device", "completed"].contains(&g.status.as_str()))
        })
    })
}

/// Whether move `m`'s guest has left its source: the move is committed
/// ([`move_committed`]) and its stream reached its final copy (the guest stopped at the source
/// for it, `pre-switchover`, or later). A move committed ahead, whose stream still copies
/// while the guest runs at the source, has not: its destination holds no guest yet.
pub(crate) fn guest_moved(v: &Vnf, m: &Migration) -> bool {
    let stopped = move_report(v, m)
        .filter(|r| r.state == "streaming")
        .and_then(|r| r.guest.as_ref())
        .is_some_and(|g| g.status == "pre-switchover");
    // A final copy commits the move by itself ([`move_committed`]).
    final_copy(v, m) || (move_committed(v, m) && stopped)
}

/// The guest's whole pause in a move's switch event: from when its source began stopping it
/// (`stopped_at_us`) until its destination resumed it (`resumed`), µs by the two hosts' clocks, and where it went
/// ([`telvirt_model::api::PausePhases`]); QEMU's own measure of the stop ends when the
/// source's last byte left. Empty when it is not known
/// ([`telvirt_model::api::ms_between`]).
fn whole_pause(g: &telvirt_model::api::GuestStream, resumed: Option<u64>) -> String {
    telvirt_model::api::ms_between(g.stopped_at_us, resumed).map_or_else(String::new, |ms| {
        let phases = telvirt_model::api::PausePhases::of(g, resumed)
            .map_or_else(String::new, |p| format!(": {p}"));
        format!(
            " by its source's measure, {ms:.1} ms until its destination resumed it (the two hosts' clocks{phases})"
        )
    })
}

/// How long after its destination resumed a moved guest (`resumed`, µs by that host's clock)
/// this controller decided to switch the move to it (now, by its clock): the VNF's traffic
/// went to the source, where the guest no longer runs, at least that long (it follows once
/// the switch is written and the agents rewire). Empty when it is not known or the clocks
/// disagree so far that it would be negative.
fn switch_lag(resumed: Option<u64>) -> String {
    telvirt_model::api::ms_between(resumed, unix_now_us()).map_or_else(String::new, |ms| {
        format!(
            "; switched {ms:.1} ms {} (the controller's clock)",
            telvirt_model::api::SWITCHED_AFTER_RESUME
        )
    })
}

/// Now, µs since the Unix epoch by this host's clock (`None` before the epoch).
fn unix_now_us() -> Option<u64> {
    let since = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .ok()?;
    u64::try_from(since.as_micros()).ok()
}

/// Whether a report's guest stream waits at its move's commit point, or asks to pass it ahead
/// of its final copy (`commit_ahead` while QEMU still streams).
pub(crate) fn at_commit_point(replication: Option<&telvirt_model::api::ReplicationStatus>) -> bool {
    replication.is_some_and(|r| {
        r.state == "streaming"
            && r.guest.as_ref().is_some_and(|g| {
                g.status == "pre-switchover" || (g.commit_ahead && g.status == "active")
            })
    })
}

/// Whether the source of wasm move `m` of `v` froze and handed its last updates over (asked
/// to, and its report says so): from then on the destination holds the VNF's state and
/// traffic, the move ends with the switch to it.
fn handed_off(v: &Vnf, m: &Migration) -> bool {
    m.handoff_at.is_some() && move_report(v, m).is_some_and(|r| r.state == "handed-off")
}

/// How long the source of a wasm move may take to freeze and hand its last updates over once
/// asked (at most the move's own deadline): its traffic waits meanwhile, so the move is
/// cancelled (the source goes on, what it queued first) well before the move's deadline.
const HANDOFF_DEADLINE: Duration = Duration::from_secs(10);

/// How long ago `at`, the RFC 3339 time in `v`'s field `field`, was.
fn since(v: &Vnf, field: &str, at: &str) -> Result<Duration> {
    let at = humantime::parse_rfc3339_weak(at)
        .map_err(|e| ControllerError::Corrupt(format!("vnf {}: {field}: {e}", v.name)))?;
    Ok(SystemTime::now().duration_since(at).unwrap_or_default())
}

/// Why vm VNF `v`'s guest cannot move (`None` for a wasm VNF): what lives on its host only.
fn vm_refusal(v: &Vnf) -> Option<ControllerError> {
    let name = v.name.as_str();
    let vm = match (v.descriptor.spec.runtime, &v.descriptor.spec.vm) {
        (RuntimeKind::Wasm, _) => return None,
        (RuntimeKind::Vm, Some(vm)) => vm,
        (RuntimeKind::Vm, None) => {
            return Some(ControllerError::Invalid(FieldError::new(
                "spec.vm",
                format!("vnf {name} runs on `vm` but has no spec.vm"),
            )));
        }
    };
    let refuse = |field: &str, why: &str| {
        Some(ControllerError::Invalid(FieldError::new(
            field,
            format!("vnf {name} cannot move: {why}"),
        )))
    };
    if vm.disk.is_some() {
        return refuse(
            "spec.vm.disk",
            "its boot disk stays on its host (telvirt has no shared storage or block migration); only guests without a disk move",
        );
    }
    if !v.devices.is_empty() {
        let ids: Vec<&str> = v.devices.iter().map(|d| d.id.as_str()).collect();
        return refuse(
            "devices",
            &format!(
                "it holds host devices ({}); revoke them first, a device does not follow the guest",
                ids.join(", ")
            ),
        );
    }
    None
}

/// Why vm VNF `v` cannot move from host `from` (`here`) to `host` (`there`), or `None` when it
/// can. A guest under KVM moves only to a host whose guests run under KVM (its stream carries
/// the host CPU model; a TCG guest may move anywhere, its destination emulates it too), and
/// one on its host's CPU (no `spec.vm.cpu_model`) only to a host that reports the same CPU.
/// QEMU takes a guest's stream only from the same or an older version, on the machine
/// type the guest runs on: the destination's QEMU must be no older and have that type (the
/// controller pins it on the destination). A host that reports no version is not compared;
/// without the guest's machine type or the destination's list, the versions must be equal.
pub(crate) fn vm_move_refusal(
    v: &Vnf,
    from: &str,
    here: &telvirt_api::HostRecord,
    host: &str,
    there: &telvirt_api::HostRecord,
) -> Option<String> {
    let name = &v.name;
    let accel = v
        .descriptor
        .spec
        .vm
        .as_ref()
        .and_then(|vm| vm.accel)
        .or(v.accel);
    if let (Some(Accelerator::Kvm), Some(Accelerator::Tcg)) = (accel, there.accel) {
        return Some(format!(
            "host {host} runs guests under TCG and vnf {name}'s guest runs under KVM: a KVM guest moves only to a host whose KVM runs guests"
        ));
    }
    // A KVM guest on its host's CPU (no named model) sees that CPU: it moves only to a host
    // with the same one (when both hosts say which they have).
    let named_model = v
        .descriptor
        .spec
        .vm
        .as_ref()
        .is_some_and(|vm| vm.cpu_model.is_some());
    // Its accelerator, or when it was never reported its host's.
    if accel.or(here.accel) == Some(Accelerator::Kvm)
        && !named_model
        && let (Some(mine), Some(theirs)) = (here.cpu.as_deref(), there.cpu.as_deref())
        && mine != theirs
    {
        return Some(format!(
            "host {host}'s CPU ({theirs}) is not host {from}'s ({mine}), and vnf {name}'s guest runs under KVM on its host's CPU: it moves only to a host with the same CPU (a VNF created with spec.vm.cpu_model, a CPU model both hosts have, moves between different CPUs; the field is taken only at creation)"
        ));
    }
    let (Some(old), Some(new)) = (here.qemu.as_deref(), there.qemu.as_deref()) else {
        return None;
    };
    let version = telvirt_model::vnf::major_minor;
    if version(new) < version(old) {
        return Some(format!(
            "host {host} runs QEMU {new}, older than QEMU {old} of vnf {name}'s host {from}: QEMU takes a guest's stream only from the same or an older version"
        ));
    }
    if old == new {
        return None;
    }
    // The type the guest runs on; a descriptor's versioned type is what it was started with.
    let machine = v.machine.clone().or_else(|| {
        v.descriptor
            .spec
            .vm
            .as_ref()
            .and_then(|vm| vm.machine.clone())
            .filter(|m| telvirt_model::vnf::machine_version(m).is_some())
    });
    match machine {
        Some(m) if !there.qemu_machines.is_empty() => {
            (!there.qemu_machines.contains(&m)).then(|| {
                format!(
                    "host {host}'s QEMU {new} has no machine type {m}, which vnf {name}'s guest runs on (it has {})",
                    telvirt_model::vnf::machine_span(&there.qemu_machines)
                )
            })
        }
        _ => Some(format!(
            "host {host} runs QEMU {new} and vnf {name}'s host {from} QEMU {old}, and whether the newer one has the guest's machine type is unknown ({}): a vm moves between QEMU versions only when it is known",
            if machine.is_none() {
                "its host has not reported the type the guest runs on"
            } else {
                "the destination's agent does not report its machine types"
            }
        )),
    }
}

/// The VNFs with a move under way: kept by every VNF write of this controller, and read
/// again from the store every [`MOVING_RELOAD`] (moves another controller began).
#[derive(Default)]
pub(crate) struct MovingSet {
    inner: std::sync::Mutex<MovingNames>,
}

#[derive(Default)]
struct MovingNames {
    names: std::collections::BTreeSet<String>,
    /// When the names were last read from the store (`None`: never).
    loaded: Option<std::time::Instant>,
}

/// How often [`MovingSet`] is read again from the store.
pub(crate) const MOVING_RELOAD: Duration = Duration::from_secs(30);

impl MovingSet {
    fn names(&self) -> std::sync::MutexGuard<'_, MovingNames> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// VNF `before` became `after` (either `None`: created or deleted).
    pub(crate) fn note(&self, before: Option<&Vnf>, after: Option<&Vnf>) {
        let moving = |v: Option<&Vnf>| v.is_some_and(|v| v.migration.is_some());
        // Most writes (a phase report) touch no move: nothing to lock.
        if !moving(before) && !moving(after) {
            return;
        }
        let Some(name) = after.or(before).map(|v| v.name.as_str()) else {
            return;
        };
        let mut n = self.names();
        if moving(after) {
            n.names.insert(name.to_owned());
        } else {
            n.names.remove(name);
        }
    }

    fn due_reload(&self) -> bool {
        self.names()
            .loaded
            .is_none_or(|at| at.elapsed() >= MOVING_RELOAD)
    }

    fn reload(&self, names: std::collections::BTreeSet<String>) {
        let mut n = self.names();
        n.names = names;
        n.loaded = Some(std::time::Instant::now());
    }

    fn snapshot(&self) -> Vec<String> {
        self.names().names.iter().cloned().collect()
    }
}

impl Controller {
    /// `POST /v1/vnfs/{name}/migrate`: starts moving `name` to `req.to` (or wherever fits), or
    /// cancels the move under way. Refusals change nothing.
    pub async fn migrate(&self, caller: &Caller, name: &str, req: &MigrateRequest) -> Result<Vnf> {
        self.load_visible(caller, name).await?;
        if req.cancel {
            if req.to.is_some() || req.engine.is_some() {
                return Err(ControllerError::Invalid(FieldError::new(
                    if req.to.is_some() { "to" } else { "engine" },
                    "a cancel names no destination",
                )));
            }
            return self.cancel_migration(caller, name).await;
        }
        if let Some(to) = &req.to {
            crate::nodes::check_host_name(to).map_err(|_| {
                ControllerError::Invalid(FieldError::new(
                    "to",
                    format!("'{to}' is not a host name"),
                ))
            })?;
        }
        let mut scheduler = self.scheduler.lock().await;
        let (record, _) = self
            .load(name)
            .await?
            // Read again under the lock: the name may have been taken by another authority.
            .filter(|(r, _)| caller.may_see(&r.vnf))
            .ok_or_else(|| super::not_found(name))?;
        if let Some(e) = refusal(&record.vnf, record.deleting) {
            return Err(e);
        }
        if req.engine.is_some() && record.vnf.descriptor.spec.runtime == RuntimeKind::Vm {
            return Err(ControllerError::Invalid(FieldError::new(
                "engine",
                format!("vnf {name} is a vm: an engine is chosen for wasm VNFs only"),
            )));
        }
        let from = record
            .vnf
            .placements
            .iter()
            .find(|p| p.role == Role::Active)
            .map(|p| p.host.clone())
            .ok_or_else(|| ControllerError::Conflict(format!("vnf {name} is placed nowhere")))?;
        // The source's record, read once for every check below.
        let here = self.agent_host(&from).await?;
        // Named: the host is checked below. Picked: only among the hosts that can take it.
        let unfit = match req.to {
            Some(_) => Vec::new(),
            None => {
                self.unfit_destinations(scheduler.host_names(), &record.vnf, &from, here.as_ref())
                    .await?
            }
        };
        let except: Vec<String> = unfit.iter().map(|(h, _)| h.clone()).collect();
        let dest = scheduler
            .add_standby(name, req.to.as_deref(), &except)
            .map_err(|e| match e {
                SchedError::UnknownHost(h) => {
                    ControllerError::Invalid(FieldError::new("to", format!("there is no host {h}")))
                }
                SchedError::InvalidChange { reason, .. } => {
                    ControllerError::Invalid(FieldError::new("to", format!("vnf {name} {reason}")))
                }
                SchedError::NoPlacement { .. } => ControllerError::Conflict(format!(
                    "no room for vnf {name} {}: {e}{}",
                    req.to
                        .as_ref()
                        .map_or("on another host".to_owned(), |h| format!("on host {h}")),
                    unfit
                        .iter()
                        .map(|(_, why)| format!("; {why}"))
                        .collect::<String>()
                )),
                e => e.into(),
            })?;
        // Checked with the destination reserved (a picked one was fit a moment ago, under
        // the same lock); any refusal or failure releases it.
        let refusal = self
            .destination_refusal(&record.vnf, &from, here.as_ref(), &dest.host)
            .await;
        let checked = match refusal {
            Ok(None) => Ok(()),
            Ok(Some(why)) if req.to.is_some() => {
                Err(ControllerError::Invalid(FieldError::new("to", why)))
            }
            Ok(Some(why)) => Err(ControllerError::Conflict(format!(
                "{why}; the host picked cannot take it: name one that can (--to)"
            ))),
            Err(e) => Err(e),
        };
        if let Err(e) = checked {
            scheduler.drop_standby(name)?;
            return Err(e);
        }
        let placed = scheduler.placement(name)?;
        let cpus: Vec<String> = dest.cpus.iter().map(ToString::to_string).collect();
        let reason = format!(
            "moving to host {} (cpus {}): {}",
            dest.host,
            cpus.join(","),
            match record.vnf.descriptor.spec.runtime {
                RuntimeKind::Wasm => "its state streams there, then the traffic",
                RuntimeKind::Vm => "its guest's memory streams there, then the guest runs there",
            }
        );
        let migration = Migration {
            // The VNF's next move: set by the recording.
            id: 0,
            to: dest.host.clone(),
            from,
            started_at: now_rfc3339(),
            by: caller.name.clone(),
            engine: req.engine,
            handoff_at: None,
            committed_at: None,
            committed_stream: None,
            resumed_at_us: None,
        };
        let recorded = self
            .record_new_placement(
                &mut scheduler,
                name,
                &placed,
                &Recording {
                    reason: &reason,
                    actor: &caller.name,
                    restart: Restart::No,
                    extra: &|v| {
                        v.moves += 1;
                        v.migration = Some(Migration {
                            id: v.moves,
                            ..migration.clone()
                        })
                    },
                },
            )
            .await;
        match recorded {
            Ok(true) => {}
            Ok(false) => return Err(super::not_found(name)),
            Err(e) => {
                scheduler.drop_standby(name)?;
                return Err(e);
            }
        }
        drop(scheduler);
        self.vnf(caller, name).await
    }

    /// Why `host` may not take `v`'s move from `from`, or `None` when it may: its agent must
    /// receive the state (a running agent with a tunnel address), and a vm's guest must be
    /// able to run there ([`vm_move_refusal`]: accelerator, QEMU version, machine type; a host
    /// whose agent reports no version is not compared).
    /// `here`: the source's agent record, when it has one.
    async fn destination_refusal(
        &self,
        v: &Vnf,
        from: &str,
        here: Option<&telvirt_api::HostRecord>,
        host: &str,
    ) -> Result<Option<String>> {
        let name = &v.name;
        let there = self.agent_host(host).await?;
        let receives = there.as_ref().is_some_and(|h| h.tunnel.is_some());
        if !receives || !self.host_ready(host).await? {
            return Ok(Some(format!(
                "host {host} cannot receive vnf {name}'s state: it needs a running agent with a tunnel address (telvirt agent --tunnel-address)"
            )));
        }
        if v.descriptor.spec.runtime != RuntimeKind::Vm {
            return Ok(None);
        }
        let (Some(here), Some(there)) = (here, there) else {
            return Ok(None);
        };
        Ok(vm_move_refusal(v, from, here, host, &there))
    }

    /// The hosts other than `from` that cannot take `v`'s move, each with why
    /// ([`Controller::destination_refusal`], the source's record `here`): left out of the
    /// scheduler's own pick.
    async fn unfit_destinations(
        &self,
        hosts: Vec<String>,
        v: &Vnf,
        from: &str,
        here: Option<&telvirt_api::HostRecord>,
    ) -> Result<Vec<(String, String)>> {
        let mut unfit = Vec::new();
        for host in hosts.into_iter().filter(|h| h != from) {
            if let Some(why) = self.destination_refusal(v, from, here, &host).await? {
                unfit.push((host, why));
            }
        }
        Ok(unfit)
    }

    /// Ends the move of `name` under way; it stays where it runs.
    async fn cancel_migration(&self, caller: &Caller, name: &str) -> Result<Vnf> {
        let mut scheduler = self.scheduler.lock().await;
        let (record, _) = self
            .load(name)
            .await?
            .filter(|(r, _)| caller.may_see(&r.vnf))
            .ok_or_else(|| super::not_found(name))?;
        let Some(m) = record.vnf.migration.clone() else {
            return Err(ControllerError::Conflict(format!(
                "vnf {name} is not moving"
            )));
        };
        if move_committed(&record.vnf, &m) {
            return Err(ControllerError::Conflict(format!(
                "vnf {name}'s guest is moving to host {} for good (its stream passed its commit point); the move ends with the switch to it",
                m.to
            )));
        }
        if handed_off(&record.vnf, &m) {
            return Err(ControllerError::Conflict(format!(
                "vnf {name} handed its state and queued packets to host {} (its source is frozen); the move ends with the switch to it",
                m.to
            )));
        }
        let reason = format!("the move to host {} was cancelled by {}", m.to, caller.name);
        self.end_move(&mut scheduler, name, &reason, &caller.name)
            .await?;
        drop(scheduler);
        self.vnf(caller, name).await
    }

    /// Ends the move of `name` short of its switch, saying `reason` as `actor`: the VNF stays
    /// on its source, the destination's place is freed (its agent stops what waits there).
    /// Returns whether the record was written.
    pub(crate) async fn end_move(
        &self,
        scheduler: &mut telvirt_sched::Scheduler,
        name: &str,
        reason: &str,
        actor: &str,
    ) -> Result<bool> {
        let placed = scheduler.drop_standby(name)?;
        let how = Recording {
            reason,
            actor,
            restart: Restart::No,
            extra: &|_| {},
        };
        self.record_new_placement(scheduler, name, &placed, &how)
            .await
    }

    fn move_deadline(&self) -> Duration {
        *self.move_deadline.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether move `m` of `v` is older than the move deadline.
    fn past_deadline(&self, v: &Vnf, m: &Migration) -> Result<bool> {
        Ok(since(v, "migration.started_at", &m.started_at)? >= self.move_deadline())
    }

    /// Sets how long a move may take before it is cancelled.
    pub fn set_move_deadline(&self, deadline: Duration) {
        *self.move_deadline.lock().unwrap_or_else(|p| p.into_inner()) = deadline;
    }

    /// Takes each VNF with a move under way a step further, as a report about it would (a move
    /// past its deadline is switched or cancelled even when its agents say nothing more: a destination
    /// whose agent hung, a source that went quiet). The host monitor calls it every pass.
    pub async fn check_moves(&self) -> Result<()> {
        if self.moving.due_reload() {
            let moving = self
                .all_vnfs()
                .await?
                .into_iter()
                .filter(|(_, v)| v.migration.is_some())
                .map(|(name, _)| name)
                .collect();
            self.moving.reload(moving);
        }
        for name in self.moving.snapshot() {
            if let Err(e) = self.advance_migration(&name).await {
                tracing::warn!(vnf = %name, "the move could not end: {e}");
            }
        }
        Ok(())
    }

    /// Takes the move of `name` on after a report of either instance (one read of the record,
    /// under the scheduler lock): ends it once the destination runs and holds the source's
    /// state (the source's agent reported the stream synced) — the destination is the active,
    /// the source's place is freed, the agents follow — or cancels it once it is older than
    /// the move deadline (a destination that never ran, a stream that never synced): the VNF
    /// stays on its source, the destination's cpus are freed, an event says what was missing.
    /// Returns whether it changed the move.
    pub(crate) async fn advance_migration(&self, name: &str) -> Result<bool> {
        let mut scheduler = self.scheduler.lock().await;
        let Some((record, _)) = self.load(name).await? else {
            return Ok(false);
        };
        let v = &record.vnf;
        let Some(m) = v.migration.clone() else {
            return Ok(false);
        };
        let destination_runs = v
            .standby
            .as_ref()
            .is_some_and(|s| s.host == m.to && s.phase == Phase::Running);
        let synced = move_report(v, &m).is_some_and(|r| r.state == "synced");
        // A vm's guest whose stream completed runs only at the destination: past the deadline
        // the destination becomes the active without its report (a cancel would stop it there).
        let completed = synced && v.replication.as_ref().is_some_and(|r| r.guest.is_some());
        let wasm = v.descriptor.spec.runtime == RuntimeKind::Wasm;
        // A vm destination runs only once its guest's stream completed (the source's QEMU then
        // holds a stopped copy it never resumes): past the commit point and the deadline its
        // report is enough (the source's may never come: its agent restarted meanwhile).
        let arrived = !wasm && destination_runs && m.committed_at.is_some();
        let forced = (completed || arrived || handed_off(v, &m))
            && !record.deleting
            && self.past_deadline(v, &m)?;
        let ready = destination_runs && v.phase == Phase::Running && !record.deleting;
        // A wasm move's source first freezes between two batches and hands its last updates
        // over (with the packets it queues meanwhile); the switch follows its report.
        if wasm && ready && synced && m.handoff_at.is_none() {
            drop(scheduler);
            return self.ask_hand_off(name, &m).await;
        }
        let switch = if wasm { handed_off(v, &m) } else { synced };
        // A vm's destination whose QEMU took the stream past the commit point and is gone
        // without the guest running there (its guest broke on arrival, or the stream failed;
        // its agent says so only once that QEMU is killed). The guest then runs nowhere but
        // at the source: from the stopped copy a completed stream left there, or on where the
        // stream failed. A destination failed otherwise (its guest running) does not count.
        let broke = v.standby.as_ref().filter(|s| {
            !wasm
                && m.committed_at.is_some()
                && s.host == m.to
                && s.phase == Phase::Failed
                && s.arrival_failed
        });
        if let Some(dest) = broke
            && !record.deleting
        {
            let placed = scheduler.drop_standby(name)?;
            let reason = format!(
                "the move to host {} ended on host {}: its guest did not come to run there ({}); it runs on at host {}",
                m.to, m.from, dest.reason, m.from
            );
            let how = Recording {
                reason: &reason,
                actor: CONTROLLER_ACTOR,
                restart: Restart::No,
                extra: &|v| v.resume_moved_copy = true,
            };
            return self
                .record_new_placement(&mut scheduler, name, &placed, &how)
                .await;
        }
        let (placed, reason, actor, restart) = if forced || (ready && switch) {
            let streamed = match v.replication.as_ref() {
                Some(r) => match &r.guest {
                    Some(g) => format!(
                        "{} MiB of guest memory streamed in {} ms, the guest stopped for {} ms{}{}",
                        g.transferred_bytes >> 20,
                        g.total_ms,
                        g.downtime_ms
                            .map_or_else(|| "an unreported time".to_owned(), |d| d.to_string()),
                        whole_pause(g, m.resumed_at_us),
                        switch_lag(m.resumed_at_us)
                    ),
                    None => format!(
                        "{} map updates streamed, the last after the source froze; frozen for {}{}; {} packets it queued meanwhile passed on",
                        r.updates,
                        r.frozen_us
                            .map_or_else(|| "an unreported time".to_owned(), |d| format!("{d} µs")),
                        r.freeze_phases
                            .filter(|_| r.frozen_us.is_some())
                            .map_or_else(String::new, |p| format!(" ({p})")),
                        r.packets_passed
                    ),
                },
                None => "nothing streamed".to_owned(),
            };
            // Should the record fail to be written after this, the scheduler holds the end of
            // the move and the store its start: the next open restores from the store.
            scheduler.swap_roles(name)?;
            let placed = scheduler.drop_standby(name)?;
            let mut reason = format!(
                "moved from host {} to host {}{} ({streamed})",
                m.from,
                m.to,
                m.engine
                    .map_or(String::new(), |e| format!(", now on engine {}", e.as_str()))
            );
            if !destination_runs {
                reason.push_str(&format!(
                    "; host {} had not reported the guest running by the move's deadline",
                    m.to
                ));
            }
            (placed, reason, m.by.clone(), Restart::Yes)
        } else if let Some(reason) = self.overdue(v, &m)? {
            let placed = scheduler.drop_standby(name)?;
            (placed, reason, CONTROLLER_ACTOR.to_owned(), Restart::No)
        } else {
            return Ok(false);
        };
        // The descriptor says the engine the destination runs on (once it is the active).
        let engine = m.engine.filter(|_| restart == Restart::Yes);
        let how = Recording {
            reason: &reason,
            actor: &actor,
            restart,
            extra: &|v| {
                if let (Some(e), Some(w)) = (engine, v.descriptor.spec.wasm.as_mut()) {
                    w.engine = e;
                }
            },
        };
        self.record_new_placement(&mut scheduler, name, &placed, &how)
            .await
    }

    /// Asks the source of wasm move `m` of `name` to freeze and hand its last updates over
    /// (once: the record says when), with an event. Returns whether it asked.
    async fn ask_hand_off(&self, name: &str, m: &Migration) -> Result<bool> {
        let at = now_rfc3339();
        let reason = format!(
            "freezing on host {} between two batches: its last map updates go to host {}, the packets that arrive meanwhile are queued and follow them, then the traffic switches",
            m.from, m.to
        );
        let mut asked = false;
        self.update(name, |record| {
            let v = &mut record.vnf;
            let phase = v.phase;
            match v.migration.as_mut() {
                // This move (not a new one to the same host begun meanwhile).
                Some(now) if now.id == m.id && now.to == m.to && now.handoff_at.is_none() => {
                    now.handoff_at = Some(at.clone());
                    v.reason = Some(reason.clone());
                    asked = true;
                    Ok(Some((phase, reason.clone(), m.by.clone())))
                }
                _ => Ok(None),
            }
        })
        .await?;
        Ok(asked)
    }

    /// Why move `m` of `v` is cancelled, once it is older than the move deadline.
    fn overdue(&self, v: &Vnf, m: &Migration) -> Result<Option<String>> {
        if move_committed(v, m) || handed_off(v, m) {
            return Ok(None);
        }
        if let Some(asked) = &m.handoff_at {
            let waited = since(v, "migration.handoff_at", asked)?;
            let limit = HANDOFF_DEADLINE.min(self.move_deadline());
            // Past either deadline, what was missing is the hand-off.
            if waited >= limit || self.past_deadline(v, m)? {
                let stream = v.replication.as_ref().map_or_else(
                    || "it reported no stream".to_owned(),
                    |r| {
                        format!(
                            "its stream is {}{}",
                            r.state,
                            r.error.as_ref().map_or(String::new(), |e| format!(": {e}"))
                        )
                    },
                );
                return Ok(Some(format!(
                    "host {} had not handed the move to host {} over {} after it was asked ({stream}); cancelled, it runs on {}, what it queued first",
                    m.from,
                    m.to,
                    humantime::format_duration(Duration::from_millis(
                        u64::try_from(waited.as_millis()).unwrap_or(u64::MAX)
                    )),
                    m.from
                )));
            }
        }
        if !self.past_deadline(v, m)? {
            return Ok(None);
        }
        let deadline = self.move_deadline();
        let destination = match &v.standby {
            Some(s) if s.host == m.to => {
                format!("the destination is {} ({})", s.phase.as_str(), s.reason)
            }
            _ => "the destination never reported its instance".to_owned(),
        };
        let stream = match move_report(v, m) {
            Some(r) => format!(
                "the stream is {}{}",
                r.state,
                r.error.as_ref().map_or(String::new(), |e| format!(": {e}"))
            ),
            _ => "the source never reported the stream".to_owned(),
        };
        Ok(Some(format!(
            "the move to host {} did not end within {} ({destination}; {stream}); cancelled, it runs on {}",
            m.to,
            humantime::format_duration(deadline),
            m.from
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_whole_pause_is_stated_only_from_both_ends() {
        let stopped = |at: Option<u64>| telvirt_model::api::GuestStream {
            stopped_at_us: at,
            ..Default::default()
        };
        assert_eq!(
            whole_pause(&stopped(Some(1_000_000)), Some(1_006_540)),
            " by its source's measure, 6.5 ms until its destination resumed it (the two hosts' clocks)"
        );
        assert_eq!(whole_pause(&stopped(None), Some(1_006_540)), "");
        assert_eq!(whole_pause(&stopped(Some(1_000_000)), None), "");
        // Clocks so far apart that it would be negative: nothing is claimed.
        assert_eq!(whole_pause(&stopped(Some(1_000_000)), Some(999_000)), "");
        // With the source's last byte known, where the pause went.
        let completed = telvirt_model::api::GuestStream {
            completed_at_us: Some(1_003_000),
            ..stopped(Some(1_000_000))
        };
        assert_eq!(
            whole_pause(&completed, Some(1_006_540)),
            " by its source's measure, 6.5 ms until its destination resumed it (the two hosts' clocks: 3.0 ms final copy, 3.5 ms at the destination)"
        );
    }

    #[test]
    fn the_switch_states_how_long_after_the_resume_it_came_by_this_clock() {
        let now_us = || unix_now_us().unwrap();
        let resumed = now_us() - 2_000_000;
        let said = switch_lag(Some(resumed));
        let suffix = format!(" ms {}", telvirt_model::api::SWITCHED_AFTER_RESUME);
        let ms = telvirt_model::api::figure_before(&said, &suffix);
        assert!(
            ms.is_some_and(|ms| (2_000.0..60_000.0).contains(&ms)),
            "{said}"
        );
        assert!(said.starts_with("; switched ") && said.ends_with("(the controller's clock)"));
        // Unknown, or a destination's clock ahead of this one: nothing is claimed.
        assert_eq!(switch_lag(None), "");
        assert_eq!(switch_lag(Some(now_us() + 60_000_000)), "");
    }

    fn vm(machine: Option<&str>) -> Vnf {
        let descriptor = telvirt_model::parse_vnf(
            b"apiVersion: telvirt/v1\nkind: Vnf\nmetadata: { name: upf1 }\nspec:\n  runtime: vm\n  cpu: { policy: dedicated, count: 1 }\n  vm: { memory: 256MiB }\n",
            telvirt_model::Format::Yaml,
        )
        .unwrap();
        let mut v: Vnf = serde_json::from_value(serde_json::json!({
            "name": "upf1",
            "owner": "admin",
            "descriptor": descriptor,
            "desired": "Running",
            "phase": "Running",
            "generation": 1,
            "created_at": "",
            "updated_at": "",
        }))
        .unwrap();
        v.machine = machine.map(str::to_owned);
        v
    }

    fn host(qemu: Option<&str>, machines: &[&str]) -> telvirt_api::HostRecord {
        telvirt_api::HostRecord {
            spec: telvirt_sched::HostSpec::default(),
            memory_bytes: 0,
            hugepages: Vec::new(),
            runtimes: vec!["vm".into()],
            agent: true,
            qemu: qemu.map(str::to_owned),
            qemu_machines: machines.iter().map(|m| (*m).to_owned()).collect(),
            accel: None,
            cpu: None,
            tunnel: None,
        }
    }

    const OLD: &[&str] = &["pc-i440fx-7.2", "pc-i440fx-7.1"];
    const NEW: &[&str] = &["pc-i440fx-8.2", "pc-i440fx-8.1", "pc-i440fx-7.2"];

    #[test]
    fn a_vm_moves_to_a_newer_qemu_that_has_its_machine_type() {
        let v = vm(Some("pc-i440fx-7.2"));
        let refused = |here: &telvirt_api::HostRecord, there: &telvirt_api::HostRecord| {
            vm_move_refusal(&v, "h1", here, "h2", there)
        };
        // Same version, or a newer one with the guest's type: allowed.
        assert_eq!(
            refused(&host(Some("7.2"), OLD), &host(Some("7.2"), OLD)),
            None
        );
        assert_eq!(
            refused(&host(Some("7.2"), OLD), &host(Some("8.2"), NEW)),
            None
        );
        // Newer, but without the type.
        let why = refused(
            &host(Some("7.2"), OLD),
            &host(Some("10.0"), &["pc-i440fx-10.0", "pc-i440fx-8.0"]),
        )
        .unwrap();
        assert!(
            why.contains("no machine type pc-i440fx-7.2")
                && why.contains("pc-i440fx-8.0 … pc-i440fx-10.0"),
            "{why}"
        );
        // Older: QEMU does not take a stream from a newer version, whatever the type.
        let why = refused(&host(Some("8.2"), NEW), &host(Some("7.2"), OLD)).unwrap();
        assert!(why.contains("older than QEMU 8.2"), "{why}");
        // 10.0 is newer than 8.2 (numbers, not text).
        assert_eq!(
            refused(
                &host(Some("8.2"), NEW),
                &host(Some("10.0"), &["pc-i440fx-10.0", "pc-i440fx-7.2"])
            ),
            None
        );
        // A host reporting no version is not compared.
        assert_eq!(refused(&host(None, &[]), &host(Some("7.1"), OLD)), None);
    }

    #[test]
    fn without_the_guests_machine_type_or_the_destinations_list_versions_must_match() {
        let unknown = vm(None);
        let why = vm_move_refusal(
            &unknown,
            "h1",
            &host(Some("7.2"), OLD),
            "h2",
            &host(Some("8.2"), NEW),
        )
        .unwrap();
        assert!(why.contains("has not reported the type"), "{why}");
        let known = vm(Some("pc-i440fx-7.2"));
        let why = vm_move_refusal(
            &known,
            "h1",
            &host(Some("7.2"), OLD),
            "h2",
            &host(Some("8.2"), &[]),
        )
        .unwrap();
        assert!(why.contains("does not report its machine types"), "{why}");
        assert_eq!(
            vm_move_refusal(
                &unknown,
                "h1",
                &host(Some("7.2"), OLD),
                "h2",
                &host(Some("7.2"), &[])
            ),
            None
        );
    }

    /// A committed move stays one (not cancelled) until its source reports the committed
    /// stream, or a later one, failed: as a restarted source's agent says its failed tries
    /// (a stream `failed` at its first try, later than the committed one).
    #[test]
    fn a_committed_move_holds_until_its_stream_failed_or_a_later_one_runs() {
        let m = Migration {
            id: 0,
            to: "h3".into(),
            from: "h2".into(),
            started_at: String::new(),
            by: "admin".into(),
            engine: None,
            handoff_at: None,
            committed_at: Some("t".into()),
            committed_stream: Some(1_000),
            resumed_at_us: None,
        };
        let reported = |state: &str, stream: Option<(&str, u64)>| {
            let mut v = vm(None);
            v.replication = Some(telvirt_model::api::ReplicationStatus {
                standby_host: "h3".into(),
                state: state.into(),
                guest: stream.map(|(status, opened_ms)| telvirt_model::api::GuestStream {
                    status: status.into(),
                    opened_ms,
                    ..Default::default()
                }),
                ..Default::default()
            });
            v
        };
        let committed = |v: &Vnf| move_committed(v, &m);
        let at_final_copy = reported("streaming", Some(("pre-switchover", 1_000)));
        assert!(committed(&at_final_copy) && guest_moved(&at_final_copy, &m));
        // A try that says no stream, or a late report of an earlier stream's failure.
        assert!(committed(&reported("failing", None)));
        assert!(committed(&reported("failing", Some(("failed", 999)))));
        // The committed stream failed, or a restarted source's later try did.
        assert!(!committed(&reported("failing", Some(("failed", 1_000)))));
        assert!(!committed(&reported("failing", Some(("failed", 5_000)))));
        // A later stream runs (the committed one ended): it has not committed.
        assert!(!committed(&reported("streaming", Some(("active", 2_000)))));
        // Committed ahead, still copying: not cancelled, but the guest is still at its
        // source (its destination holds none: no failover there).
        let ahead = reported("streaming", Some(("active", 1_000)));
        assert!(committed(&ahead) && !guest_moved(&ahead, &m));
        // The final copy streams: moved whatever else.
        let device = reported("streaming", Some(("device", 1_000)));
        assert!(committed(&device) && guest_moved(&device, &m));
    }

    /// A KVM guest moves only to a host whose guests run under KVM, or whose accelerator is
    /// not known (its agent refuses it there if it cannot); a TCG guest moves anywhere.
    #[test]
    fn a_kvm_guest_does_not_move_to_a_host_that_runs_guests_under_tcg() {
        let on = |accel: Option<Accelerator>| {
            let mut h = host(Some("7.2"), OLD);
            h.accel = accel;
            h
        };
        let mut guest = vm(Some("pc-i440fx-7.2"));
        guest.accel = Some(Accelerator::Kvm);
        let here = on(Some(Accelerator::Kvm));
        let why = vm_move_refusal(&guest, "h1", &here, "h2", &on(Some(Accelerator::Tcg))).unwrap();
        assert!(
            why.contains("host h2 runs guests under TCG") && why.contains("under KVM"),
            "{why}"
        );
        for there in [on(Some(Accelerator::Kvm)), on(None)] {
            assert_eq!(vm_move_refusal(&guest, "h1", &here, "h2", &there), None);
        }
        // The descriptor's accelerator is the guest's, whatever was last reported.
        let mut pinned = vm(Some("pc-i440fx-7.2"));
        if let Some(vm) = pinned.descriptor.spec.vm.as_mut() {
            vm.accel = Some(Accelerator::Kvm);
        }
        assert!(vm_move_refusal(&pinned, "h1", &here, "h2", &on(Some(Accelerator::Tcg))).is_some());
        guest.accel = Some(Accelerator::Tcg);
        for there in [on(Some(Accelerator::Kvm)), on(Some(Accelerator::Tcg))] {
            assert_eq!(vm_move_refusal(&guest, "h1", &here, "h2", &there), None);
        }
    }

    /// A KVM guest on its host's CPU moves only to a host that reports the same CPU (or does
    /// not say); with a named CPU model, or under TCG, the hosts' CPUs are not compared.
    #[test]
    fn a_kvm_guest_on_its_hosts_cpu_moves_only_to_the_same_cpu_unless_it_names_a_model() {
        let with = |cpu: Option<&str>| {
            let mut h = host(Some("7.2"), OLD);
            (h.accel, h.cpu) = (Some(Accelerator::Kvm), cpu.map(str::to_owned));
            h
        };
        let mut guest = vm(Some("pc-i440fx-7.2"));
        guest.accel = Some(Accelerator::Kvm);
        let here = with(Some("GenuineIntel 6/85/7 flags 0a1b2c3d"));
        let other = with(Some("AuthenticAMD 25/1/1 flags 44556677"));
        let why = vm_move_refusal(&guest, "h1", &here, "h2", &other).unwrap();
        assert!(
            why.contains("host h2's CPU (AuthenticAMD 25/1/1") && why.contains("spec.vm.cpu_model"),
            "{why}"
        );
        for there in [with(Some("GenuineIntel 6/85/7 flags 0a1b2c3d")), with(None)] {
            assert_eq!(vm_move_refusal(&guest, "h1", &here, "h2", &there), None);
        }
        let mut named = guest.clone();
        if let Some(vm) = named.descriptor.spec.vm.as_mut() {
            vm.cpu_model = Some("Haswell-v4".into());
        }
        assert_eq!(vm_move_refusal(&named, "h1", &here, "h2", &other), None);
        // A guest whose accelerator was never reported runs with its host's.
        guest.accel = None;
        assert!(vm_move_refusal(&guest, "h1", &here, "h2", &other).is_some());
        guest.accel = Some(Accelerator::Tcg);
        assert_eq!(vm_move_refusal(&guest, "h1", &here, "h2", &other), None);
    }
}
