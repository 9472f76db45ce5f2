//! The agent's reconcile loop: desired (the controller's assignments) against observed (what the
//! runtimes hold), one idempotent step per VNF, VNFs in parallel.
//!
//! Owns turning the difference into runtime calls and reporting what it observed. A pass only
//! reads the assignments and queues every VNF whose assignment changed (all of them every
//! resync interval) on the work queue (`crate::queue`); a bounded number of workers then take
//! one VNF each, so a slow step (a VM booting) holds up no other VNF, a VNF is never worked on
//! twice at once, and a failed step is retried with backoff without stopping the others.
//! A start under way is cancelled (its instance removed) as soon as a pass sees its VNF gone or
//! stopped, so deleting a VM that is still booting does not wait for its boot to end.
//! It must not write the store or decide placement: assignments come in and observations go
//! out through the `ControlLink`, so a remote host runs exactly this code.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use telvirt_api::{Assignment, ControlLink, Observation};
use telvirt_model::api::{ActiveLost, PairKey, ReplicationStatus, StandbyPeer};
use telvirt_model::{
    DesiredState, DeviceGrant, MoveEncryption, Name, Phase, Role, RuntimeKind, VnfDescriptor,
};
use tokio::sync::{Mutex, Notify, watch};

use crate::AgentError;
use crate::fencing::Fencing;
use crate::queue::{Backoff, WorkQueue};
use crate::replication::Replicas;
use crate::runtime::{GuestHardware, InstanceSpec, InstanceState, Runtime, RuntimeFailure};

/// How the agent works its queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentConfig {
    /// VNFs worked on at once (each by one worker; never one VNF by two).
    pub workers: NonZeroUsize,
    /// Wait before a failed step of a VNF is tried again.
    pub backoff: Backoff,
    /// Every VNF is looked at again this often even when nothing told the agent to (a crashed
    /// instance is noticed this way); against the assignments it holds, without asking the
    /// controller.
    pub resync: Duration,
    /// The assignments are listed from the controller again this often even when no change
    /// was signalled (a safety net: changes wake the agent at once).
    pub relist: Duration,
}

/// VNFs worked on at once unless configured otherwise.
pub const DEFAULT_WORKERS: NonZeroUsize = NonZeroUsize::new(4).expect("4 is not zero");

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            workers: DEFAULT_WORKERS,
            backoff: Backoff::default(),
            resync: RESYNC_INTERVAL,
            relist: RELIST_INTERVAL,
        }
    }
}

/// What one observation told: phase, reason, generation, replication status, (from a
/// standby) whether it lost its active, what its guest runs on, and (from a move's
/// destination) whether its arrival failed.
type Fact = (
    Phase,
    String,
    u64,
    Option<ReplicationStatus>,
    Option<ActiveLost>,
    GuestHardware,
    bool,
);

#[derive(Debug, Default)]
struct Known {
    kind: Option<RuntimeKind>,
    /// Last (phase, reason, generation, replication) reported, so unchanged facts are not
    /// re-sent.
    reported: Option<Fact>,
    /// The generation whose start failed or crashed: not retried until the generation changes.
    failed_generation: Option<u64>,
    /// Adoption was tried in this agent's lifetime.
    adoption_tried: bool,
    /// The device grants the running instance holds (`None`: not known since it started).
    devices: Option<Vec<DeviceGrant>>,
    /// A grant list the runtime refused, and why: not retried until the list changes.
    devices_refused: Option<(Vec<DeviceGrant>, String)>,
    /// What the runtime said about the instance's start (`Runtime::start_note`), kept in its
    /// Running reason.
    note: Option<String>,
    /// Why the last step of this VNF failed (it is retried after a backoff); `None` once a step
    /// succeeds.
    error: Option<String>,
    /// Restarts in place after its instance failed while it ran, in this generation.
    restarts: u32,
    /// Why the instance last failed while it ran (kept in its restart's reasons).
    crash: Option<String>,
    /// When the restart in place under way is due.
    restart_at: Option<std::time::Instant>,
    /// The descriptor and placement the running instance has taken (`None`: not known, as
    /// after an adoption).
    running_as: Option<(telvirt_model::VnfDescriptor, telvirt_model::Placement)>,
    /// What the running instance did with the last change it took (kept in its Running
    /// reason until it starts again).
    taken: Option<String>,
    /// The instance was started to wait for its state from a move's source, and has not been
    /// seen running since.
    incoming: bool,
}

impl Known {
    /// A fresh instance holds no devices until they are applied again, and has taken no change.
    fn fresh_instance(&mut self) {
        self.devices = None;
        self.devices_refused = None;
        self.running_as = None;
        self.taken = None;
    }
}

/// Why a destination that takes `vnf`'s guest sealed (`seals`) or in the clear cannot take the
/// stream its source opened the other way (`sealed`); `None` when both ends agree.
fn sealing_mismatch(vnf: &Name, seals: bool, sealed: bool) -> Option<String> {
    if seals == sealed {
        return None;
    }
    let (theirs, mine) = if sealed {
        ("sealed", "in the clear (spec.vm.move_encryption: none)")
    } else {
        (
            "in the clear",
            "sealed (spec.vm.move_encryption: encrypted; an agent from before the agents sealed guest streams sends it otherwise)",
        )
    };
    Some(format!(
        "the source streams {vnf}'s guest {theirs} and this host takes it {mine}"
    ))
}

/// Whether a vm VNF described so moves its guest sealed (`spec.vm.move_encryption`).
fn encrypts_moves(descriptor: &VnfDescriptor) -> bool {
    descriptor
        .spec
        .vm
        .as_ref()
        .is_none_or(|vm| vm.move_encryption == MoveEncryption::Encrypted)
}

/// The wait before restart in place `n` (1: the first) of an instance that failed while it
/// ran: 1 s, doubling, at most 60 s, as a crash loop backs off.
fn restart_delay(n: u32) -> Duration {
    Duration::from_secs(1)
        .saturating_mul(1u32 << n.saturating_sub(1).min(6))
        .min(MAX_RESTART_DELAY)
}

/// The longest wait between two restarts in place.
pub const MAX_RESTART_DELAY: Duration = Duration::from_secs(60);

/// What to do with an instance that failed.
enum AfterFailure {
    /// It failed while it ran: restart `n` in place is due now.
    RestartNow(u32),
    /// A restart in place is due after this long.
    RestartLater(Duration),
    /// It failed while it ran: restart `n` is scheduled after `delay` (report it).
    Crashed { n: u32, delay: Duration },
    /// Its start failed: not retried in this generation.
    Stay,
}

/// One host's agent.
pub struct Agent {
    inner: Arc<Inner>,
}

struct Inner {
    host: String,
    runtimes: HashMap<RuntimeKind, Arc<dyn Runtime>>,
    link: Arc<dyn ControlLink>,
    state_root: PathBuf,
    config: AgentConfig,
    known: Mutex<HashMap<Name, Known>>,
    /// The newest assignment of every VNF on this host, as of the last pass: what a worker
    /// taking a VNF from the queue works towards.
    desired: std::sync::Mutex<HashMap<Name, Assignment>>,
    queue: WorkQueue<Name>,
    /// Where uploaded modules fetched from the controller are kept (a remote agent's).
    modules: Option<crate::node::ModuleCache>,
    /// Streams the maps of this host's active wasm instances to their standbys (`None`: this
    /// agent replicates nothing).
    replicas: Option<Arc<Replicas>>,
    /// The gates of this host's instances, set from every list of assignments (`None`: nothing
    /// is gated).
    fencing: Option<Arc<Fencing>>,
    /// The standbys on this host that lost their active, and how (as replication last said).
    lost: std::sync::Mutex<HashMap<Name, ActiveLost>>,
    /// The address each VNF's state may come from here (its active's host) and the key of
    /// its stream, as a standby's assignment last named them; kept while the VNF is assigned here (a standby made the
    /// active still takes what its old active passes on after a move's switch).
    active_peers: std::sync::Mutex<HashMap<Name, (IpAddr, PairKey)>>,
    /// The starts under way, each with what cancels it.
    starting: std::sync::Mutex<HashMap<Name, Arc<Notify>>>,
    /// Each VNF's turn to report ([`Inner::report_turn`]).
    report_turns: std::sync::Mutex<HashMap<Name, Arc<tokio::sync::Mutex<()>>>>,
}

/// How long a guest move's commit point waits for the controller (the guest is stopped
/// meanwhile); past it the stream is cancelled and the guest runs on here.
const COMMIT_WITHIN: Duration = Duration::from_secs(2);

/// What queues a VNF when a runtime or the replicas tell the agent its state changed (nothing
/// once the agent is gone).
fn queue_when_told(inner: &Arc<Inner>) -> impl Fn(&Name) + Send + Sync + 'static {
    let weak = Arc::downgrade(inner);
    move |vnf: &Name| {
        if let Some(inner) = weak.upgrade() {
            inner.queue.add(vnf.clone());
        }
    }
}

/// How often the loop looks at every instance again when nothing told it to.
pub const RESYNC_INTERVAL: Duration = Duration::from_secs(1);
/// A handed-off source passes on what its senders still send until they all rewired, for this
/// long at most (a sender host that died, or one whose end marker was lost); its stream then
/// has as long again to pass the rest on.
pub const HANDOFF_DRAIN: Duration = Duration::from_secs(10);
/// How often the assignments are listed again when no change was signalled.
pub const RELIST_INTERVAL: Duration = Duration::from_secs(60);

/// A failed step: retried after a backoff. Runtime failures were reported as the VNF's reason
/// already; link failures could not be.
#[derive(Debug)]
struct StepError(String);

impl From<AgentError> for StepError {
    fn from(e: AgentError) -> Self {
        Self(e.to_string())
    }
}

type Step = Result<(), StepError>;

impl Agent {
    pub fn new(
        host: impl Into<String>,
        runtimes: Vec<Arc<dyn Runtime>>,
        link: Arc<dyn ControlLink>,
        state_root: PathBuf,
    ) -> Self {
        Self::with_config(host, runtimes, link, state_root, AgentConfig::default())
    }

    /// [`Agent::new`] with its work queue configured.
    pub fn with_config(
        host: impl Into<String>,
        runtimes: Vec<Arc<dyn Runtime>>,
        link: Arc<dyn ControlLink>,
        state_root: PathBuf,
        config: AgentConfig,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                host: host.into(),
                runtimes: runtimes.into_iter().map(|r| (r.kind(), r)).collect(),
                link,
                state_root,
                config,
                known: Mutex::new(HashMap::new()),
                desired: std::sync::Mutex::new(HashMap::new()),
                queue: WorkQueue::new(config.workers, config.backoff),
                modules: None,
                replicas: None,
                fencing: None,
                lost: std::sync::Mutex::new(HashMap::new()),
                active_peers: std::sync::Mutex::new(HashMap::new()),
                starting: std::sync::Mutex::new(HashMap::new()),
                report_turns: std::sync::Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Fetches the uploaded modules of this host's VNFs from the controller into `cache` before
    /// starting them (an agent that does not share the controller's disk). Set before `run`.
    pub fn with_module_cache(mut self, cache: crate::node::ModuleCache) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.modules = Some(cache);
        }
        self
    }

    /// Streams the maps of this host's active instances that have a standby through
    /// `replicas`. Set before `run`.
    pub fn with_replication(mut self, replicas: Arc<Replicas>) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.replicas = Some(replicas);
        }
        self
    }

    /// Sets the gates of `fencing` from every list of assignments, and lists them anew at once
    /// when a heartbeat after a lapse asks. Set before `run`.
    pub fn with_fencing(mut self, fencing: Arc<Fencing>) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.fencing = Some(fencing);
        }
        self
    }

    /// The role and epoch this host's assignments (as of the last pass) give `vnf`.
    pub fn role(&self, vnf: &Name) -> Option<(Role, u64)> {
        self.inner
            .desired
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(vnf)
            .map(|a| (a.placement.role, a.epoch))
    }

    pub fn host(&self) -> &str {
        &self.inner.host
    }

    /// The runtime of `vnf` when this host's assignment makes it the destination of a move,
    /// and whether its descriptor has its guest sealed ([`encrypts_moves`]).
    fn incoming_runtime(&self, vnf: &Name) -> Result<(Arc<dyn Runtime>, bool), String> {
        let (kind, seals) = self
            .inner
            .desired
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(vnf)
            .filter(|a| a.incoming_from.is_some())
            .map(|a| (a.descriptor.spec.runtime, encrypts_moves(&a.descriptor)))
            .ok_or_else(|| format!("this host is not the destination of a move of {vnf}"))?;
        let runtime =
            self.inner.runtimes.get(&kind).cloned().ok_or_else(|| {
                format!("runtime {} is not available on this host", kind.as_str())
            })?;
        Ok((runtime, seals))
    }

    pub fn config(&self) -> AgentConfig {
        self.inner.config
    }

    /// Runtime kinds this agent can run, sorted.
    pub fn runtime_kinds(&self) -> Vec<RuntimeKind> {
        let mut kinds: Vec<_> = self.inner.runtimes.keys().copied().collect();
        kinds.sort_by_key(|k| k.as_str());
        kinds
    }

    /// The VNFs whose last step failed and waits for a retry, with why.
    pub async fn step_errors(&self) -> BTreeMap<Name, String> {
        self.inner
            .known
            .lock()
            .await
            .iter()
            .filter_map(|(name, k)| k.error.clone().map(|e| (name.clone(), e)))
            .collect()
    }

    /// Runs until `shutdown` turns true (or its sender is dropped): the configured number of
    /// workers take VNFs from the queue while passes fill it. Steps under way finish before it
    /// returns. Instances keep running when the agent stops: a restarted agent adopts them.
    /// An agent runs once: after `run` returns, its queue hands out nothing more.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let inner = &self.inner;
        if let Some(replicas) = &inner.replicas {
            // A stream that changed state is reported at once (a move switches once synced).
            replicas.on_state_change(Box::new(queue_when_told(inner)));
            let weak = Arc::downgrade(inner);
            replicas.on_commit_point(Arc::new(move |vnf, peer, epoch| {
                let weak = weak.clone();
                Box::pin(async move {
                    match weak.upgrade() {
                        Some(inner) => inner.commit_move(&vnf, &peer, epoch).await,
                        None => false,
                    }
                })
            }));
        }
        // An instance whose state changed by itself (a guest that arrived by a move resumed or
        // runs, a QEMU exited, a wasm instance trapped) is looked at, and reported, at once. As
        // any add, it cuts short a failed step's backoff (a crash's restart in place keeps its
        // own time).
        for runtime in inner.runtimes.values() {
            runtime.on_state_change(Arc::new(queue_when_told(inner)));
        }
        let workers: Vec<_> = (0..inner.config.workers.get())
            .map(|_| {
                let inner = Arc::clone(inner);
                tokio::spawn(async move {
                    while let Some(taken) = inner.queue.next().await {
                        inner.process(taken.key().clone()).await;
                    }
                })
            })
            .collect();
        // A change signalled (or the first pass, or the relist interval): list from the
        // controller. Otherwise, when the resync interval has passed: look at every instance
        // against the assignments held, without a call to the controller.
        let mut changed = true;
        let mut next_list = tokio::time::Instant::now();
        let mut next_check = tokio::time::Instant::now();
        loop {
            let now = tokio::time::Instant::now();
            let check = now >= next_check;
            if changed || now >= next_list {
                match inner.pass(check).await {
                    Ok(()) => next_list = now + inner.config.relist,
                    Err(e) => {
                        // Tried again a resync interval later, a second at most however long
                        // the resync (not at once: a link that is down would spin); the change
                        // that woke this pass was taken by its wait.
                        next_list = now + inner.config.resync.min(RESYNC_INTERVAL);
                        tracing::warn!(host = %inner.host, "reconcile pass failed: {e}");
                    }
                }
            } else if check {
                inner.check_all().await;
            }
            if check {
                next_check = now + inner.config.resync;
            }
            let wait = next_check.min(next_list).saturating_duration_since(now);
            let confirm = async {
                match &inner.fencing {
                    Some(f) => f.confirm_wanted().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                c = inner.link.wait_for_change(wait) => changed = c,
                // A heartbeat after a lapse: the lease holds again once the assignments say so.
                () = confirm => changed = true,
                c = shutdown.changed() => if c.is_err() { break },
            }
            if *shutdown.borrow() {
                break;
            }
        }
        inner.queue.close();
        for worker in workers {
            if let Err(e) = worker.await {
                tracing::warn!(host = %inner.host, "agent worker ended: {e}");
            }
        }
    }

    /// One full pass over every assignment and every instance the agent knows, then works the
    /// queue until nothing is ready or under way (a step waiting for a backoff retry is not
    /// waited for). Steps run concurrently up to the configured number of workers.
    pub async fn reconcile_once(&self) -> Result<(), AgentError> {
        self.inner.pass(true).await?;
        let drains: Vec<_> = (0..self.inner.config.workers.get())
            .map(|_| {
                let inner = Arc::clone(&self.inner);
                tokio::spawn(async move {
                    while let Some(taken) = inner.queue.next_until_idle().await {
                        inner.process(taken.key().clone()).await;
                    }
                })
            })
            .collect();
        for drain in drains {
            drain
                .await
                .map_err(|e| AgentError::Link(format!("reconcile worker ended: {e}")))?;
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl crate::replication::StandbyHost for Agent {
    fn role(&self, vnf: &Name) -> Option<(Role, u64)> {
        Agent::role(self, vnf)
    }

    fn active_key(&self, vnf: &Name, peer: IpAddr) -> Result<PairKey, String> {
        let peers = self
            .inner
            .active_peers
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match peers.get(vnf) {
            Some((ip, key)) if *ip == peer => Ok(key.clone()),
            Some((ip, _)) => Err(format!(
                "this host takes {vnf}'s state only from {ip}, the host of its active, not from {peer}"
            )),
            None => Err(format!(
                "this host knows no active of {vnf} to take its state from (not from {peer})"
            )),
        }
    }

    async fn expects_guest(&self, vnf: &Name, sealed: bool) -> Result<(), String> {
        // Both ends read the same descriptor; an agent that streams otherwise is refused here.
        let (runtime, seals) = self.incoming_runtime(vnf)?;
        if let Some(why) = sealing_mismatch(vnf, seals, sealed) {
            return Err(why);
        }
        match runtime.state(vnf).await {
            InstanceState::Incoming => Ok(()),
            other => Err(format!(
                "its instance here does not wait for a guest ({other:?}); try again"
            )),
        }
    }

    async fn take_guest(
        &self,
        vnf: &Name,
        stream: std::os::fd::OwnedFd,
        secret: Option<telvirt_runtime_vm::StreamSecret>,
    ) -> Result<(), String> {
        let (runtime, _) = self.incoming_runtime(vnf)?;
        runtime
            .receive_state(vnf, stream, secret)
            .await
            .map_err(|e| e.to_string())?;
        self.inner.queue.add(vnf.clone());
        Ok(())
    }

    fn hearing(&self, vnf: &Name, lost: Option<ActiveLost>) {
        let changed = {
            let mut all = self.inner.lost.lock().unwrap_or_else(|p| p.into_inner());
            match &lost {
                Some(l) => all.insert(vnf.clone(), l.clone()).as_ref() != Some(l),
                None => all.remove(vnf).is_some(),
            }
        };
        if !changed {
            return;
        }
        match &lost {
            Some(l) => tracing::warn!(vnf = %vnf, "the standby lost its active: {}", l.why),
            None => tracing::info!(vnf = %vnf, "the standby hears its active again"),
        }
        let (inner, vnf) = (Arc::clone(&self.inner), vnf.clone());
        tokio::spawn(async move {
            if let Err(e) = inner.hearing(&vnf).await {
                tracing::warn!(vnf = %vnf, "telling the controller how the standby hears its active: {e}");
            }
        });
    }
}

impl Inner {
    /// `vnf`'s assignment, when it makes this host run its standby (as of the last pass).
    fn standby_assignment(&self, vnf: &Name) -> Option<Assignment> {
        self.desired
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(vnf)
            .filter(|a| a.placement.role == Role::Standby)
            .cloned()
    }

    /// Reports this host's standby of `vnf` again, with how it hears its active now, when it
    /// was last reported running.
    async fn hearing(&self, vnf: &Name) -> Result<(), AgentError> {
        let Some(a) = self.standby_assignment(vnf) else {
            return Ok(());
        };
        self.report_with(&a, false, |last| {
            last.filter(|(phase, _)| *phase == Phase::Running)
        })
        .await
    }

    /// Reads the assignments and queues the VNFs to work on: those whose assignment is new,
    /// changed or gone, instances known but no longer assigned, and (`full`) every other one.
    async fn pass(&self, full: bool) -> Result<(), AgentError> {
        // A heartbeat after a lapse waits for assignments read after it: taken first.
        let pending = self.fencing.as_ref().and_then(|f| f.take_pending());
        let assignments = match self.link.assignments(&self.host).await {
            Ok(a) => a,
            Err(e) => {
                if let (Some(f), Some(p)) = (&self.fencing, pending) {
                    f.put_back(p);
                }
                return Err(e.into());
            }
        };
        if let Some(f) = &self.fencing {
            // Every gate as these say before the lease may hold again.
            f.assign(&assignments);
            if let Some(p) = pending {
                f.confirm(p);
                tracing::info!(host = %self.host, "the lease holds again; instances forward as the assignments say");
            }
        }
        let wanted: HashMap<Name, Assignment> = assignments
            .into_iter()
            .map(|a| (a.vnf.clone(), a))
            .collect();
        let (changed, gone) = {
            let mut desired = self.desired.lock().unwrap_or_else(|p| p.into_inner());
            let mut changed: Vec<Name> = wanted
                .iter()
                .filter(|(name, a)| desired.get(*name) != Some(*a))
                .map(|(name, _)| name.clone())
                .collect();
            changed.sort();
            let mut gone: Vec<Name> = desired
                .keys()
                .filter(|name| !wanted.contains_key(*name))
                .cloned()
                .collect();
            gone.sort();
            desired.clone_from(&wanted);
            (changed, gone)
        };
        {
            let mut peers = self.active_peers.lock().unwrap_or_else(|p| p.into_inner());
            peers.retain(|name, _| wanted.contains_key(name));
            for a in wanted.values() {
                if let (Some(ip), Some(key)) = (
                    a.active_from
                        .as_deref()
                        .and_then(|t| t.parse::<std::net::SocketAddr>().ok()),
                    &a.active_key,
                ) {
                    peers.insert(a.vnf.clone(), (ip.ip(), key.clone()));
                }
            }
        }
        self.cancel_moot_starts();
        for name in changed.into_iter().chain(gone) {
            self.queue.add(name);
        }
        let orphans: Vec<Name> = self
            .known
            .lock()
            .await
            .keys()
            .filter(|name| !wanted.contains_key(*name))
            .cloned()
            .collect();
        for name in orphans {
            self.queue.resync(name);
        }
        if full {
            let mut all: Vec<&Name> = wanted.keys().collect();
            all.sort();
            for name in all {
                self.queue.resync(name.clone());
            }
        }
        Ok(())
    }

    /// Whether a start of `vnf` is no longer wanted: its VNF is gone from this host or asked
    /// to stop (a changed descriptor or lock does not cancel a start: the next step catches up).
    fn start_is_moot(&self, vnf: &Name) -> bool {
        self.desired
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(vnf)
            .is_none_or(|a| a.desired == DesiredState::Stopped)
    }

    /// Cancels each start under way that has become moot ([`Inner::start_is_moot`]); called
    /// after every update of the desired assignments.
    fn cancel_moot_starts(&self) {
        let starting = self.starting.lock().unwrap_or_else(|p| p.into_inner());
        for (vnf, cancel) in starting.iter() {
            if self.start_is_moot(vnf) {
                tracing::info!(vnf = %vnf, "cancelling its start: the VNF is gone or stopped");
                cancel.notify_one();
            }
        }
    }

    /// Runs `runtime.start(spec)` unless it becomes moot first: then the start is dropped
    /// where it waits (a vm runtime kills the QEMU it launched) and what it left is removed.
    /// `None`: cancelled; the VNF's next step (queued by the pass that saw the change) stops
    /// or forgets it as its assignment now says.
    async fn start_unless_moot(
        &self,
        spec: &InstanceSpec,
        runtime: &dyn Runtime,
    ) -> Option<Result<(), RuntimeFailure>> {
        let cancel = Arc::new(Notify::new());
        self.starting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(spec.name.clone(), Arc::clone(&cancel));
        // Registered before this look: a pass that changed the assignment before it is seen
        // here, one after it finds the registration.
        let outcome = if self.start_is_moot(&spec.name) {
            None
        } else {
            tokio::select! {
                r = runtime.start(spec) => Some(r),
                () = cancel.notified() => None,
            }
        };
        self.starting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&spec.name);
        if outcome.is_none()
            && let Err(e) = runtime.remove(&spec.name).await
        {
            tracing::warn!(vnf = %spec.name, "removing a cancelled start: {e}");
        }
        outcome
    }

    /// Queues every VNF the agent holds an assignment for or knows an instance of, to be
    /// looked at again (a crashed instance is noticed this way), without asking the controller.
    async fn check_all(&self) {
        let mut all: Vec<Name> = self
            .desired
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect();
        all.extend(self.known.lock().await.keys().cloned());
        all.sort();
        all.dedup();
        for name in all {
            self.queue.resync(name);
        }
    }

    /// Works on one VNF taken from the queue, with its newest assignment; a failed step is
    /// kept as the VNF's error and retried after its backoff.
    async fn process(self: &Arc<Self>, name: Name) {
        let me = Arc::clone(self);
        let vnf = name.clone();
        // Its own task: a panicking step fails this VNF's step only.
        let outcome = tokio::spawn(async move { me.step(&vnf).await }).await;
        let error = match outcome {
            Ok(Ok(())) => None,
            Ok(Err(StepError(e))) => Some(e),
            Err(e) => Some(format!("reconcile step failed: {e}")),
        };
        match error {
            None => {
                self.queue.forget(&name);
                if let Some(k) = self.known.lock().await.get_mut(&name) {
                    k.error = None;
                }
            }
            Some(e) => {
                let delay = self.queue.retry(name.clone());
                tracing::warn!(vnf = %name, "{e}; retrying in {} ms", delay.as_millis());
                self.known.lock().await.entry(name).or_default().error = Some(e);
            }
        }
    }

    async fn step(&self, name: &Name) -> Step {
        let assignment = self
            .desired
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned();
        match assignment {
            Some(a) => self.reconcile_one(a).await,
            None => self.remove_unassigned(name).await,
        }
    }

    /// A wasm move's source freezes when its assignment asks for the hand-off (its stream
    /// then carries the last updates and what it queues); a hand-off no longer asked for (the
    /// move was cancelled) ends the freeze, the queued packets processed first.
    async fn follow_hand_off(
        &self,
        a: &Assignment,
        runtime: &dyn Runtime,
        state: &InstanceState,
    ) -> Step {
        let frozen = runtime.frozen(&a.vnf).is_some();
        let wanted = a.hand_off
            && a.standby.is_some()
            && a.placement.role == Role::Active
            && a.desired == DesiredState::Running
            && !a.locked;
        if wanted && !frozen && *state == InstanceState::Running {
            runtime
                .freeze(&a.vnf)
                .await
                .map_err(|e| StepError(format!("freezing for the move's hand-off: {e}")))?;
            if let Some(r) = &self.replicas {
                r.wake(&a.vnf);
                // Lets the stream's task, woken on this thread (where it would wait for this
                // pass otherwise), send the last updates first: the instance is frozen until
                // they are acknowledged.
                tokio::task::yield_now().await;
            }
            tracing::info!(vnf = %a.vnf, "frozen for its move's hand-off");
        } else if !wanted && frozen {
            runtime
                .thaw(&a.vnf)
                .await
                .map_err(|e| StepError(format!("ending the freeze: {e}")))?;
            tracing::info!(vnf = %a.vnf, "the hand-off ended without a switch: it goes on, what it queued first");
        }
        Ok(())
    }

    /// Before a handed-off instance (the switch was made) stops: what its senders sent before
    /// they rewired still arrives and is queued; once every sender rewired and what it sent is
    /// queued ([`Runtime::senders_drained`]: its links here replaced, its tunnels' end markers
    /// in), or at most [`HANDOFF_DRAIN`] after the switch, the stream passes the rest on and
    /// ends. (Until 2026-12-07 it ended after 200 ms in which nothing came: a sender host whose
    /// worker or rewiring stalled that long on a loaded machine sent on to a source gone.)
    async fn pass_on_queued(&self, name: &Name, runtime: &dyn Runtime, r: &Replicas) {
        let Some(queued) = runtime.frozen(name) else {
            return;
        };
        let started = Instant::now();
        let drained = loop {
            if runtime.senders_drained(name) {
                break true;
            }
            if started.elapsed() >= HANDOFF_DRAIN {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        if !drained {
            tracing::warn!(vnf = %name, "handing over: not every sender had rewired {} s after the switch; what they send from now on is lost", HANDOFF_DRAIN.as_secs());
        }
        let passed = r.finish(name, HANDOFF_DRAIN).await;
        let queued = runtime.frozen(name).unwrap_or(queued);
        if passed < queued {
            // Still queued here when the stream ended, or refused by the destination (it
            // counts those it took beyond its queue's bound itself): the instance's removal
            // drops them, counted as its node's drops here (`Handoff::discard`).
            tracing::warn!(vnf = %name, queued, passed, lost = queued - passed, waited_ms = started.elapsed().as_millis(), "handed over: not every packet queued since the freeze reached the destination");
        } else {
            tracing::info!(vnf = %name, queued, passed, waited_ms = started.elapsed().as_millis(), "handed over: the packets queued since the freeze went to the destination");
        }
    }

    /// Stops and forgets an instance no longer assigned to this host.
    async fn remove_unassigned(&self, name: &Name) -> Step {
        let kind = match self.known.lock().await.get(name) {
            Some(k) => k.kind,
            None => {
                if let Some(r) = &self.replicas {
                    r.stop(name);
                }
                self.drop_report_turn(name);
                return Ok(());
            }
        };
        if let Some(r) = &self.replicas {
            if let Some(runtime) = kind.and_then(|k| self.runtimes.get(&k)) {
                self.pass_on_queued(name, runtime.as_ref(), r).await;
            }
            r.stop(name);
        }
        if let Some(runtime) = kind.and_then(|k| self.runtimes.get(&k)) {
            runtime
                .stop(name)
                .await
                .map_err(|e| StepError(format!("stopping unassigned instance: {e}")))?;
            runtime
                .remove(name)
                .await
                .map_err(|e| StepError(format!("removing unassigned instance: {e}")))?;
        }
        // Assigned again meanwhile: its next step starts it afresh (with adoption tried again).
        self.known.lock().await.remove(name);
        self.drop_report_turn(name);
        Ok(())
    }

    /// Forgets `vnf`'s turn to report (it is no longer on this host), unless a report holds
    /// or waits for it.
    fn drop_report_turn(&self, vnf: &Name) {
        let mut turns = self.report_turns.lock().unwrap_or_else(|p| p.into_inner());
        if turns.get(vnf).is_some_and(|t| Arc::strong_count(t) == 1) {
            turns.remove(vnf);
        }
    }

    /// `vnf`'s turn to report: a report is built and sent while it holds its VNF's turn, so a
    /// report built before another (the pass's and a guest stream's commit point, say) is
    /// told before it, never after.
    fn report_turn(&self, vnf: &Name) -> Arc<tokio::sync::Mutex<()>> {
        let mut turns = self.report_turns.lock().unwrap_or_else(|p| p.into_inner());
        Arc::clone(turns.entry(vnf.clone()).or_default())
    }

    async fn report(
        &self,
        a: &Assignment,
        phase: Phase,
        reason: impl Into<String>,
    ) -> Result<(), AgentError> {
        self.report_as(a, phase, reason.into(), false).await
    }

    /// [`Self::report`], sent even when it repeats the last fact when `always`.
    async fn report_as(
        &self,
        a: &Assignment,
        phase: Phase,
        reason: String,
        always: bool,
    ) -> Result<(), AgentError> {
        self.report_with(a, always, |_| Some((phase, reason))).await
    }

    /// Reports `a`'s VNF with the phase and reason `say` makes of the last ones told (read
    /// once it is the VNF's turn, so a report told meanwhile is not said over); nothing when
    /// `say` gives none. Sent even when it repeats the last fact when `always`.
    async fn report_with(
        &self,
        a: &Assignment,
        always: bool,
        say: impl FnOnce(Option<(Phase, String)>) -> Option<(Phase, String)>,
    ) -> Result<(), AgentError> {
        let turn = self.report_turn(&a.vnf);
        let _turn = turn.lock().await;
        let last = self
            .known
            .lock()
            .await
            .get(&a.vnf)
            .and_then(|k| k.reported.as_ref().map(|f| (f.0, f.1.clone())));
        let Some((phase, reason)) = say(last) else {
            return Ok(());
        };
        let replication = self.replicas.as_ref().and_then(|r| r.status(&a.vnf));
        let (hardware, arrival_failed) = match self.runtimes.get(&a.descriptor.spec.runtime) {
            Some(runtime) => (
                runtime.hardware(&a.vnf).await,
                // A move's destination only: while the record of its failed arrival lasts
                // (the QEMU that took the stream is gone).
                a.incoming_from.is_some() && runtime.arrival_failure(&a.vnf).await.is_some(),
            ),
            None => (GuestHardware::default(), false),
        };
        let active_lost = match a.placement.role {
            Role::Standby => self
                .lost
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&a.vnf)
                .cloned(),
            Role::Active => None,
        };
        let fact = (
            phase,
            reason.clone(),
            a.generation,
            replication.clone(),
            active_lost.clone(),
            hardware.clone(),
            arrival_failed,
        );
        if !always {
            let known = self.known.lock().await;
            if known.get(&a.vnf).and_then(|k| k.reported.as_ref()) == Some(&fact) {
                return Ok(());
            }
        }
        self.link
            .report(
                &self.host,
                Observation {
                    machine: hardware.machine,
                    accel: hardware.accel,
                    vnf: a.vnf.clone(),
                    phase,
                    reason,
                    generation: a.generation,
                    replication,
                    active_lost,
                    resumed_at_us: hardware.resumed_at_us,
                    arrival_failed,
                },
            )
            .await?;
        // Recorded once told: a fact the link lost is told again by the retry.
        self.known
            .lock()
            .await
            .entry(a.vnf.clone())
            .or_default()
            .reported = Some(fact);
        Ok(())
    }

    /// The commit point of `vnf`'s guest move to `peer`, streamed as the active of `epoch` (its
    /// stream near its end and asking ahead, or waiting at its final copy with the guest
    /// stopped here): reports the stream's status to the controller, which from then on
    /// refuses to cancel the move, then reads this host's assignments. The move stands when
    /// they still name `peer` as the destination at that epoch: a cancel recorded first shows
    /// there as no destination. Any failure (the controller unreachable, too slow) answers
    /// `false`, and the guest runs on here.
    async fn commit_move(&self, vnf: &Name, peer: &StandbyPeer, epoch: u64) -> bool {
        let held = self
            .desired
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(vnf)
            .cloned();
        // An assignment that names this move: the destination `peer` at `epoch`.
        let names_move =
            |x: &Assignment| x.vnf == *vnf && x.epoch == epoch && x.standby.as_ref() == Some(peer);
        // Streamed for a move this host no longer knows of (cancelled, another begun): no
        // report of it may commit the one now assigned.
        let Some(a) = held.filter(|a| names_move(a)) else {
            return false;
        };
        let since = Instant::now();
        let asked = async {
            // What was last told, with the stream's status now. Sent even if it repeats one
            // (an equal report may have gone to an earlier move): the controller must record
            // this one.
            self.report_with(&a, true, |last| {
                Some(last.unwrap_or((Phase::Running, "running".to_owned())))
            })
            .await
            .ok()?;
            self.link.assignments(&self.host).await.ok()
        };
        let Ok(Some(now)) = tokio::time::timeout(COMMIT_WITHIN, asked).await else {
            tracing::warn!(vnf = %vnf, "the move's commit point got no answer in {COMMIT_WITHIN:?}: the guest runs on here");
            return false;
        };
        let stands = now.iter().any(names_move);
        let took = since.elapsed().as_millis();
        if stands {
            tracing::info!(vnf = %vnf, to = %peer.host, took_ms = took, "the guest's stream passed its commit point: the move stands, its final copy may go");
        } else {
            tracing::info!(vnf = %vnf, to = %peer.host, took_ms = took, "the move was cancelled before its commit point: the guest runs on here");
        }
        stands
    }

    async fn reconcile_one(&self, a: Assignment) -> Step {
        let kind = a.descriptor.spec.runtime;
        let Some(runtime) = self.runtimes.get(&kind).cloned() else {
            self.report(
                &a,
                Phase::Failed,
                format!("runtime {} is not available on this host", kind.as_str()),
            )
            .await?;
            return Ok(());
        };
        let spec = InstanceSpec {
            name: a.vnf.clone(),
            descriptor: a.descriptor.clone(),
            placement: a.placement.clone(),
            state_dir: self.state_root.join(a.vnf.as_str()),
            domain: a.domain.clone(),
            memory_bytes: a.memory_bytes,
        };
        let (try_adopt, failed_generation) = {
            let mut known = self.known.lock().await;
            let entry = known.entry(a.vnf.clone()).or_default();
            entry.kind = Some(kind);
            let first = !entry.adoption_tried;
            entry.adoption_tried = true;
            (first, entry.failed_generation)
        };
        if try_adopt {
            match runtime.adopt(&spec).await {
                Ok(true) => tracing::info!(vnf = %a.vnf, "adopted a running instance"),
                Ok(false) => {}
                Err(e) => tracing::warn!(vnf = %a.vnf, "could not adopt: {e}"),
            }
        }
        let state = runtime.state(&a.vnf).await;
        if let Some(r) = &self.replicas {
            // Only a running, unlocked active wasm instance with a standby streams its maps;
            // a vm's guest streams to the destination of its move (the stream that completed
            // is kept, for its figures, while the stopped copy here waits for the switch).
            match (&a.standby, a.placement.role, a.desired, &state) {
                (Some(peer), Role::Active, DesiredState::Running, InstanceState::Running)
                    if kind == RuntimeKind::Wasm && !a.locked =>
                {
                    r.ensure(&a.vnf, peer, a.epoch)
                }
                (
                    Some(peer),
                    Role::Active,
                    DesiredState::Running,
                    InstanceState::Running | InstanceState::Moved,
                ) if kind == RuntimeKind::Vm && !a.locked => r.ensure_guest(
                    &a.vnf,
                    peer,
                    a.epoch,
                    Arc::clone(&runtime),
                    encrypts_moves(&a.descriptor),
                ),
                _ => r.stop(&a.vnf),
            }
            self.follow_hand_off(&a, runtime.as_ref(), &state).await?;
        }
        if let Some(from) = a.incoming_from.clone()
            && a.desired == DesiredState::Running
        {
            match &state {
                InstanceState::Incoming => {
                    let why = format!("waiting for its guest from host {from}");
                    return Ok(self.report(&a, Phase::Starting, why).await?);
                }
                // Arrived: it goes on as any running instance (its arrival noted there).
                InstanceState::Running | InstanceState::Paused => {}
                // The stream it took ended without a guest running here (its QEMU is gone):
                // reported Failed, which ends a move past its commit point on its source (the
                // guest runs on there, resumed from the copy a completed stream left). A
                // stream that completed, the guest then broken, comes no more: nothing waits
                // for it until the assignment asks again. After one that failed short of
                // that, it waits for the source again, after a backoff.
                InstanceState::Absent | InstanceState::Stopped | InstanceState::Failed(_)
                    if let Some(failed) = runtime.arrival_failure(&a.vnf).await =>
                {
                    let why = if failed.stream_completed {
                        format!("its arrival from host {from} broke: {}", failed.why)
                    } else {
                        format!("its guest's stream from host {from} failed: {}", failed.why)
                    };
                    self.report(&a, Phase::Failed, why.clone()).await?;
                    // Told: its record goes with the dead QEMU's state, so no later move here
                    // is taken for this one. After a failed stream the step's retry, after a
                    // backoff, waits again unless the move ended on this report meanwhile
                    // (its cpus and NICs are then another's).
                    let _ = runtime.remove(&a.vnf).await;
                    return if failed.stream_completed {
                        Ok(())
                    } else {
                        Err(StepError(why))
                    };
                }
                // Not started yet, or its stream failed: it waits for the source again.
                InstanceState::Absent
                | InstanceState::Stopped
                | InstanceState::Failed(_)
                | InstanceState::Moved => {
                    return self
                        .start_incoming(&a, &spec, runtime.as_ref(), &from, &state)
                        .await;
                }
            }
        }
        let retry_allowed = failed_generation != Some(a.generation);
        match (a.desired, state) {
            (DesiredState::Running, InstanceState::Moved) => match &a.standby {
                Some(peer) => {
                    let why = format!(
                        "its guest moved to host {}; the switch to it follows",
                        peer.host
                    );
                    Ok(self.report(&a, Phase::Running, why).await?)
                }
                // Its guest broke on its arrival there (that QEMU gone): the controller ended
                // the move here, and the copy the stream left resumes.
                None if a.resume_moved_copy => match runtime.resume_moved_copy(&a.vnf).await {
                    Ok(()) => {
                        let why = "its guest did not run where it moved; it runs on here from the copy its move stopped".to_owned();
                        Ok(self.report(&a, Phase::Running, why).await?)
                    }
                    Err(e) => {
                        self.fail_retry(&a, format!("resuming the copy its move stopped here: {e}"))
                            .await
                    }
                },
                // The move ended without making the destination the active: the guest is not
                // resumed here (it may have run there).
                None => {
                    let _ = runtime.remove(&a.vnf).await;
                    let why = "its guest moved to another host, but the move ended without making that host the active; start it again to boot a new guest".to_owned();
                    Ok(self.fail(&a, why).await?)
                }
            },
            (DesiredState::Running, InstanceState::Incoming) => {
                // The active without a move: its move switched once the guest's stream
                // completed, before the guest ran here. It runs once resumed; should that
                // fail, its QEMU ends and it is restarted as any failed instance.
                let why = "its guest is arriving by its migration stream";
                Ok(self.report(&a, Phase::Starting, why).await?)
            }
            (
                DesiredState::Stopped,
                InstanceState::Running
                | InstanceState::Paused
                | InstanceState::Incoming
                | InstanceState::Moved,
            ) => {
                self.report(&a, Phase::Stopping, "stop requested").await?;
                match runtime.stop(&a.vnf).await {
                    Ok(()) => Ok(self.report(&a, Phase::Stopped, "stopped").await?),
                    Err(e) => self.fail_retry(&a, format!("stop failed: {e}")).await,
                }
            }
            (DesiredState::Stopped, _) => Ok(self.report(&a, Phase::Stopped, "stopped").await?),
            (DesiredState::Running, InstanceState::Running) if a.locked => {
                match runtime.pause(&a.vnf).await {
                    Ok(()) => Ok(self.report(&a, Phase::Locked, "paused by lock").await?),
                    Err(e) => {
                        self.fail_retry(&a, format!("pause for lock failed: {e}"))
                            .await
                    }
                }
            }
            (DesiredState::Running, InstanceState::Paused) if a.locked => {
                Ok(self.report(&a, Phase::Locked, "paused by lock").await?)
            }
            (DesiredState::Running, InstanceState::Paused) => match runtime.resume(&a.vnf).await {
                Ok(()) => Ok(self.report(&a, Phase::Running, "resumed").await?),
                Err(e) => self.fail_retry(&a, format!("resume failed: {e}")).await,
            },
            (DesiredState::Running, InstanceState::Running) => {
                self.arrived(&a, runtime.as_ref()).await;
                if let Err(why) = self.take_changes(&a, &spec, runtime.as_ref()).await {
                    return Ok(self.fail(&a, why).await?);
                }
                let reason = self.sync_devices(&a, runtime.as_ref()).await;
                let reason = self.with_note(&a, reason).await;
                Ok(self.report(&a, Phase::Running, reason).await?)
            }
            (DesiredState::Running, InstanceState::Failed(reason)) => {
                if retry_allowed && self.failure_already_reported(&a).await {
                    // The owner asked again (a new generation): clear the wreck and start over.
                    self.forget_restarts(&a.vnf).await;
                    let _ = runtime.remove(&a.vnf).await;
                    return self.start(&a, &spec, runtime.as_ref()).await;
                }
                // An instance that failed while it ran (a QEMU that exited, a worker that
                // trapped) restarts in place, backing off; one whose start failed stays Failed.
                match self.after_failure(&a, &reason).await {
                    AfterFailure::RestartNow(n) => {
                        tracing::warn!(vnf = %a.vnf, "restart {n} in place after: {reason}");
                        let _ = runtime.remove(&a.vnf).await;
                        self.start(&a, &spec, runtime.as_ref()).await
                    }
                    AfterFailure::RestartLater(wait) => {
                        self.queue.add_after(a.vnf.clone(), wait);
                        Ok(())
                    }
                    AfterFailure::Crashed { n, delay } => {
                        self.queue.add_after(a.vnf.clone(), delay);
                        let why = format!(
                            "{reason}; restarting in place in {} s (restart {n})",
                            delay.as_secs()
                        );
                        Ok(self.report(&a, Phase::Failed, why).await?)
                    }
                    AfterFailure::Stay => Ok(self.fail(&a, reason).await?),
                }
            }
            (DesiredState::Running, InstanceState::Absent | InstanceState::Stopped) => {
                if retry_allowed {
                    self.start(&a, &spec, runtime.as_ref()).await
                } else {
                    Ok(())
                }
            }
        }
    }

    /// Makes the running instance hold the assignment's devices; returns the Running reason
    /// (which names the devices held, or why the runtime refused them).
    async fn sync_devices(&self, a: &Assignment, runtime: &dyn Runtime) -> String {
        let (applied, refused) = {
            let known = self.known.lock().await;
            let k = known.get(&a.vnf);
            (
                k.and_then(|k| k.devices.clone()),
                k.and_then(|k| k.devices_refused.clone()),
            )
        };
        let held_reason = |devices: &[DeviceGrant]| {
            if devices.is_empty() {
                "running".to_owned()
            } else {
                let ids: Vec<&str> = devices.iter().map(|d| d.id.as_str()).collect();
                format!("running with devices {}", ids.join(", "))
            }
        };
        if applied.as_ref() == Some(&a.devices) {
            return held_reason(&a.devices);
        }
        if let Some((list, why)) = &refused
            && list == &a.devices
        {
            return format!("running; devices not applied: {why}");
        }
        let result = runtime.set_devices(&a.vnf, &a.devices).await;
        let mut known = self.known.lock().await;
        let entry = known.entry(a.vnf.clone()).or_default();
        match result {
            Ok(()) => {
                entry.devices = Some(a.devices.clone());
                entry.devices_refused = None;
                held_reason(&a.devices)
            }
            // Nothing granted and nothing known to be held: a runtime without devices is fine.
            Err(_) if a.devices.is_empty() && applied.as_ref().is_none_or(Vec::is_empty) => {
                entry.devices = Some(Vec::new());
                "running".to_owned()
            }
            Err(e) => {
                tracing::warn!(vnf = %a.vnf, "devices not applied: {e}");
                entry.devices_refused = Some((a.devices.clone(), e.to_string()));
                format!("running; devices not applied: {e}")
            }
        }
    }

    /// Makes the running instance take what changed in its assignment since it started (or
    /// last took a change): a new placement moves its threads (`Runtime::repin`), a wasm VNF's
    /// new config or fuel starts it again from its module (`Runtime::reconfigure`). Keeps
    /// what it did in the Running reason. A vm whose threads cannot move is stopped (`Err`
    /// with why: it fails), as its old CPUs are freed once it reports; a wasm config the
    /// module refuses leaves it running as it was, saying so. Either way the change counts as
    /// taken (it is not retried until the assignment changes again).
    async fn take_changes(
        &self,
        a: &Assignment,
        spec: &InstanceSpec,
        runtime: &dyn Runtime,
    ) -> Result<(), String> {
        let running_as = {
            let mut known = self.known.lock().await;
            let entry = known.entry(a.vnf.clone()).or_default();
            entry
                .running_as
                .replace((a.descriptor.clone(), a.placement.clone()))
        };
        let mut done = Vec::new();
        // Only its CPUs matter (a role that changes moves no thread), and only a vm's threads
        // move: a wasm instance is its core's worker.
        let moved = runtime.kind() == RuntimeKind::Vm
            && match &running_as {
                Some((_, p)) => {
                    (&p.vcpus, &p.emulator_cpus) != (&a.placement.vcpus, &a.placement.emulator_cpus)
                }
                // Adopted: make sure its threads are where the placement says.
                None => true,
            };
        if moved {
            let cpus = a
                .placement
                .vcpus
                .iter()
                .map(|c| c.iter().map(u32::to_string).collect::<Vec<_>>().join(","))
                .collect::<Vec<_>>()
                .join(" ");
            match runtime.repin(spec).await {
                Ok(()) => done.push(format!("vCPU threads on cpus {cpus}")),
                // Its old CPUs are given back once this generation is reported: it must not
                // run on them, so it stops, and says why.
                Err(e) => {
                    let _ = runtime.stop(&a.vnf).await;
                    return Err(format!(
                        "stopped: its threads could not move to cpus {cpus}: {e}"
                    ));
                }
            }
        }
        let wasm_changed = running_as.as_ref().is_some_and(|(d, _)| {
            let (was, is) = (d.spec.wasm.as_ref(), a.descriptor.spec.wasm.as_ref());
            was.map(|w| (&w.config, w.limits.fuel_per_batch))
                != is.map(|w| (&w.config, w.limits.fuel_per_batch))
        });
        if wasm_changed {
            done.push(match runtime.reconfigure(spec).await {
                Ok(()) => "reconfigured (config and fuel per batch), maps kept".to_owned(),
                Err(e) => format!("runs on with its previous config: {e}"),
            });
        }
        if !done.is_empty() {
            let mut known = self.known.lock().await;
            known.entry(a.vnf.clone()).or_default().taken = Some(done.join("; "));
        }
        Ok(())
    }

    /// `reason` followed by the runtime's note on the instance's start and what it did with
    /// the last change it took, if any.
    async fn with_note(&self, a: &Assignment, reason: String) -> String {
        let known = self.known.lock().await;
        let Some(k) = known.get(&a.vnf) else {
            return reason;
        };
        let mut reason = match k.note.as_deref() {
            Some(note) => format!("{reason}; {note}"),
            None => reason,
        };
        if let Some(taken) = &k.taken {
            reason = format!("{reason}; {taken}");
        }
        if let (n @ 1.., Some(crash)) = (k.restarts, &k.crash) {
            reason.push_str(&format!(
                "; restarted in place {n} time{} (last after: {crash})",
                if n == 1 { "" } else { "s" }
            ));
        }
        reason
    }

    async fn failure_already_reported(&self, a: &Assignment) -> bool {
        let known = self.known.lock().await;
        known
            .get(&a.vnf)
            .and_then(|k| k.reported.as_ref())
            .is_some_and(|(phase, _, generation, ..)| {
                *phase == Phase::Failed && *generation != a.generation
            })
    }

    /// What follows the failure (`reason`) of `a`'s instance: a restart in place when it failed
    /// while it ran (reported Running or Locked in this generation), or one already scheduled.
    async fn after_failure(&self, a: &Assignment, reason: &str) -> AfterFailure {
        let mut known = self.known.lock().await;
        let k = known.entry(a.vnf.clone()).or_default();
        let now = std::time::Instant::now();
        if let Some(at) = k.restart_at {
            if now < at {
                return AfterFailure::RestartLater(at - now);
            }
            k.restart_at = None;
            return AfterFailure::RestartNow(k.restarts);
        }
        let ran = k
            .reported
            .as_ref()
            .is_some_and(|(phase, _, generation, ..)| {
                matches!(phase, Phase::Running | Phase::Locked) && *generation == a.generation
            });
        if !ran {
            return AfterFailure::Stay;
        }
        k.restarts = k.restarts.saturating_add(1);
        let delay = restart_delay(k.restarts);
        k.restart_at = Some(now + delay);
        k.crash = Some(reason.to_owned());
        AfterFailure::Crashed {
            n: k.restarts,
            delay,
        }
    }

    /// Forgets `vnf`'s restarts in place (a new generation starts afresh).
    async fn forget_restarts(&self, vnf: &Name) {
        if let Some(k) = self.known.lock().await.get_mut(vnf) {
            k.restarts = 0;
            k.crash = None;
            k.restart_at = None;
        }
    }

    /// Reports the VNF Failed with `reason`; once the controller has that, its start is not
    /// retried in this generation. Marked only after the report went through: should it not
    /// (no leader during a controller's failover), the step fails and its retry tries again;
    /// marked first, the retry would find nothing to do and leave the VNF Starting for good.
    async fn fail(&self, a: &Assignment, reason: String) -> Result<(), AgentError> {
        self.report(a, Phase::Failed, reason).await?;
        let mut known = self.known.lock().await;
        known.entry(a.vnf.clone()).or_default().failed_generation = Some(a.generation);
        Ok(())
    }

    /// [`Inner::fail`] for an operation worth trying again (stop, pause, resume): the step
    /// fails, so the queue retries it after a backoff.
    async fn fail_retry(&self, a: &Assignment, reason: String) -> Step {
        self.fail(a, reason.clone()).await?;
        Err(StepError(reason))
    }

    /// Starts the destination of a move from `from`: the instance waits for its state there
    /// (a failed or stopped one is cleared first).
    async fn start_incoming(
        &self,
        a: &Assignment,
        spec: &InstanceSpec,
        runtime: &dyn Runtime,
        from: &str,
        state: &InstanceState,
    ) -> Step {
        if *state != InstanceState::Absent {
            let _ = runtime.remove(&a.vnf).await;
        }
        {
            let mut known = self.known.lock().await;
            let entry = known.entry(a.vnf.clone()).or_default();
            entry.fresh_instance();
            entry.incoming = true;
            entry.note = None;
        }
        match runtime.start_incoming(spec).await {
            Ok(()) => {
                let why = format!("waiting for its guest from host {from}");
                Ok(self.report(a, Phase::Starting, why).await?)
            }
            Err(e) => {
                self.fail_retry(
                    a,
                    format!("cannot wait for its guest from host {from}: {e}"),
                )
                .await
            }
        }
    }

    /// The destination of a move runs its guest: what the runtime says of the arrival is kept
    /// in its reason, once it has said it (it asks the guest first, after resuming it).
    async fn arrived(&self, a: &Assignment, runtime: &dyn Runtime) {
        let waiting = self
            .known
            .lock()
            .await
            .get(&a.vnf)
            .is_some_and(|k| k.incoming);
        if !waiting {
            return;
        }
        if let Some(note) = runtime.start_note(&a.vnf).await {
            let mut known = self.known.lock().await;
            let entry = known.entry(a.vnf.clone()).or_default();
            entry.note = Some(note);
            entry.incoming = false;
        }
    }

    async fn start(&self, a: &Assignment, spec: &InstanceSpec, runtime: &dyn Runtime) -> Step {
        // The module first (nothing to do when it is kept already): a retried fetch says so
        // in its reason alone, not alternating with "starting".
        if let (Some(cache), Some(wasm)) = (&self.modules, &spec.descriptor.spec.wasm)
            && let Err(e) = cache
                .ensure(self.link.as_ref(), &self.host, &wasm.module)
                .await
        {
            if let AgentError::LinkUnavailable(_) = e {
                // Not the VNF's failure: the controller may serve the module next time. Its
                // start stays under way and is tried again after the queue's backoff, as a
                // container image pull is; marked failed, the generation would never start.
                let why = format!("fetching module {}: {e}; trying again", wasm.module);
                self.report(a, Phase::Starting, why.clone()).await?;
                return Err(StepError(why));
            }
            // Refused, or bytes that are not the module, or no room to keep it: failed.
            return self
                .fail_retry(a, format!("fetching module {}: {e}", wasm.module))
                .await;
        }
        self.report(a, Phase::Starting, "starting").await?;
        self.known
            .lock()
            .await
            .entry(a.vnf.clone())
            .or_default()
            .fresh_instance();
        match self.start_unless_moot(spec, runtime).await {
            Some(Ok(())) => {}
            // Not retried until the owner asks again (a new generation).
            Some(Err(e)) => return Ok(self.fail(a, e.to_string()).await?),
            None => return Ok(()),
        }
        let note = runtime.start_note(&a.vnf).await;
        {
            let mut known = self.known.lock().await;
            let entry = known.entry(a.vnf.clone()).or_default();
            entry.note = note;
            entry.running_as = Some((a.descriptor.clone(), a.placement.clone()));
        }
        if a.locked {
            return match runtime.pause(&a.vnf).await {
                Ok(()) => {
                    let reason = self
                        .with_note(a, "started and paused by lock".to_owned())
                        .await;
                    Ok(self.report(a, Phase::Locked, reason).await?)
                }
                Err(e) => {
                    self.fail_retry(a, format!("pause for lock failed: {e}"))
                        .await
                }
            };
        }
        let reason = self.sync_devices(a, runtime).await;
        let reason = self.with_note(a, reason).await;
        Ok(self.report(a, Phase::Running, reason).await?)
    }
}

/// The networks whose final counts this host keeps, for its heartbeat to name
/// ([`crate::network::NetworkReconciler::departed_networks`]).
#[derive(Clone)]
pub struct DepartedNetworks {
    /// Their names now.
    pub names: Arc<dyn Fn() -> Vec<String> + Send + Sync>,
    /// Notified when a network left the host: a heartbeat names it at once, so `net show`
    /// asks this host for its counts from then on.
    pub changed: Arc<tokio::sync::Notify>,
}

/// Sends a heartbeat for `host` through `link` every `every` until `shutdown` turns true, so the
/// controller keeps the host Ready. A task of its own beside the agent's reconcile loop: a slow
/// runtime call never delays it. A failed heartbeat is logged and the next one is sent on time.
///
/// With `fencing`, each heartbeat the controller took renews this host's lease there (see
/// [`Fencing::renewed`]); a lapse is logged once.
pub async fn heartbeat_loop(
    host: String,
    link: Arc<dyn ControlLink>,
    every: Duration,
    fencing: Option<Arc<Fencing>>,
    departed: Option<DepartedNetworks>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut lapse_told = false;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let left = async {
            match &departed {
                Some(d) => d.changed.notified().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tick.tick() => {}
            _ = left => {}
            _ = shutdown.changed() => {}
        }
        if *shutdown.borrow() {
            break;
        }
        let beat = telvirt_api::HeartbeatRequest {
            departed: departed.as_ref().map(|d| (d.names)()),
        };
        let sent = std::time::Instant::now();
        match link.heartbeat(&host, &beat).await {
            Ok(ttl) => {
                if let Some(f) = &fencing
                    && f.renewed(sent, ttl)
                {
                    tracing::warn!(host = %host, "heartbeats go through again after the lease lapsed; instances with a standby forward again once the assignments are read");
                }
                lapse_told = false;
            }
            Err(e) => {
                tracing::warn!(host = %host, "heartbeat failed: {e}");
                if !lapse_told && fencing.as_ref().is_some_and(|f| f.lapsed()) {
                    lapse_told = true;
                    tracing::warn!(host = %host, "the lease lapsed: active instances with a standby stop forwarding unless their standby still hears them");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A destination takes a guest stream only as its own descriptor streams it: sealed or in
    /// the clear, the refusal names both ways.
    #[test]
    fn a_guest_stream_is_taken_only_sealed_as_the_vnf_says() {
        let vnf: Name = "u1".parse().unwrap();
        assert_eq!(sealing_mismatch(&vnf, true, true), None);
        assert_eq!(sealing_mismatch(&vnf, false, false), None);
        let why = sealing_mismatch(&vnf, true, false).unwrap();
        assert!(
            why.contains("streams u1's guest in the clear") && why.contains("takes it sealed"),
            "{why}"
        );
        let why = sealing_mismatch(&vnf, false, true).unwrap();
        assert!(
            why.contains("streams u1's guest sealed") && why.contains("move_encryption: none"),
            "{why}"
        );
    }

    use telvirt_api::LinkError;

    use super::*;

    /// A link whose first report waits in the link until released.
    #[derive(Default)]
    struct HeldFirstReport {
        calls: AtomicU32,
        first_in_link: Notify,
        release: Notify,
        told: std::sync::Mutex<Vec<String>>,
    }

    #[async_trait::async_trait]
    impl ControlLink for HeldFirstReport {
        async fn assignments(&self, _host: &str) -> Result<Vec<Assignment>, LinkError> {
            Ok(Vec::new())
        }
        async fn report(&self, _host: &str, o: Observation) -> Result<(), LinkError> {
            if self.calls.fetch_add(1, Ordering::SeqCst) == 0 {
                self.first_in_link.notify_one();
                self.release.notified().await;
            }
            self.told
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(o.reason);
            Ok(())
        }
        async fn wait_for_change(&self, max_wait: Duration) -> bool {
            tokio::time::sleep(max_wait).await;
            true
        }
    }

    /// A link whose first report fails as a controller that died mid-call does.
    #[derive(Default)]
    struct FirstReportLost {
        calls: AtomicU32,
        told: std::sync::Mutex<Vec<(Phase, String)>>,
    }

    #[async_trait::async_trait]
    impl ControlLink for FirstReportLost {
        async fn assignments(&self, _host: &str) -> Result<Vec<Assignment>, LinkError> {
            Ok(Vec::new())
        }
        async fn report(&self, _host: &str, o: Observation) -> Result<(), LinkError> {
            if self.calls.fetch_add(1, Ordering::SeqCst) == 0 {
                return Err(LinkError::Transport("connection reset".into()));
            }
            self.told
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((o.phase, o.reason));
            Ok(())
        }
        async fn wait_for_change(&self, max_wait: Duration) -> bool {
            tokio::time::sleep(max_wait).await;
            true
        }
    }

    /// A failed start whose Failed report did not reach the controller is not marked failed:
    /// its retry starts (and reports) again instead of doing nothing for the generation.
    #[tokio::test]
    async fn a_failure_the_controller_did_not_hear_leaves_the_start_to_be_retried() {
        let link = Arc::new(FirstReportLost::default());
        let agent = Agent::new("h1", Vec::new(), link.clone(), std::env::temp_dir());
        let a = crate::fencing::tests::assignment(Role::Active, false, 0);
        let failed = |agent: &Agent| {
            let (inner, vnf) = (Arc::clone(&agent.inner), a.vnf.clone());
            async move {
                inner
                    .known
                    .lock()
                    .await
                    .get(&vnf)
                    .and_then(|k| k.failed_generation)
            }
        };
        assert!(agent.inner.fail(&a, "module fetch".into()).await.is_err());
        assert_eq!(failed(&agent).await, None, "marked failed, nothing told");
        agent.inner.fail(&a, "module fetch".into()).await.unwrap();
        assert_eq!(failed(&agent).await, Some(a.generation));
        assert_eq!(
            *link.told.lock().unwrap(),
            [(Phase::Failed, "module fetch".to_owned())]
        );
    }

    /// A link that records what each heartbeat said.
    #[derive(Default)]
    struct Beats(std::sync::Mutex<Vec<Option<Vec<String>>>>);

    #[async_trait::async_trait]
    impl ControlLink for Beats {
        async fn assignments(&self, _host: &str) -> Result<Vec<Assignment>, LinkError> {
            Ok(Vec::new())
        }
        async fn report(&self, _host: &str, _o: Observation) -> Result<(), LinkError> {
            Ok(())
        }
        async fn wait_for_change(&self, max_wait: Duration) -> bool {
            tokio::time::sleep(max_wait).await;
            true
        }
        async fn heartbeat(
            &self,
            _host: &str,
            beat: &telvirt_api::HeartbeatRequest,
        ) -> Result<Option<Duration>, LinkError> {
            self.0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(beat.departed.clone());
            Ok(None)
        }
    }

    #[tokio::test]
    async fn a_network_that_left_the_host_is_named_by_a_heartbeat_at_once() {
        let link = Arc::new(Beats::default());
        let names = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let changed = Arc::new(tokio::sync::Notify::new());
        let departed = DepartedNetworks {
            names: {
                let names = Arc::clone(&names);
                Arc::new(move || names.lock().unwrap_or_else(|p| p.into_inner()).clone())
            },
            changed: Arc::clone(&changed),
        };
        let (stop, shutdown) = watch::channel(false);
        // A heartbeat an hour: only the first comes by the clock.
        let beats = tokio::spawn(heartbeat_loop(
            "h1".into(),
            link.clone(),
            Duration::from_secs(3600),
            None,
            Some(departed),
            shutdown,
        ));
        let said = || link.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let deadline = Instant::now() + Duration::from_secs(20);
        while said().is_empty() {
            assert!(Instant::now() < deadline, "no first heartbeat");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(said(), vec![Some(Vec::new())]);
        names
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push("n1".into());
        changed.notify_one();
        while said().len() < 2 {
            assert!(
                Instant::now() < deadline,
                "no heartbeat after the departure"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(said()[1], Some(vec!["n1".to_owned()]));
        stop.send_replace(true);
        beats.await.unwrap();
    }

    #[tokio::test]
    async fn a_vnfs_reports_are_told_in_the_order_they_were_built() {
        let link = Arc::new(HeldFirstReport::default());
        let agent = Agent::new("h1", Vec::new(), link.clone(), std::env::temp_dir());
        let a = crate::fencing::tests::assignment(Role::Active, false, 0);
        let report = |reason: &str| {
            let (inner, a, reason) = (Arc::clone(&agent.inner), a.clone(), reason.to_owned());
            tokio::spawn(async move { inner.report_as(&a, Phase::Running, reason, true).await })
        };
        let first = report("first");
        link.first_in_link.notified().await;
        // A second report of the same VNF (as a guest stream's commit point sends beside the
        // pass): it waits for its turn while the first is in the link.
        let second = report("second");
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            link.calls.load(Ordering::SeqCst),
            1,
            "the second went ahead"
        );
        link.release.notify_one();
        first.await.unwrap().unwrap();
        second.await.unwrap().unwrap();
        assert_eq!(
            *link.told.lock().unwrap(),
            ["first".to_owned(), "second".to_owned()]
        );
    }
}
