//! Host lifecycle: registration, liveness (each agent's heartbeat kept as a store lease), cordon,
//! drain and delete, and what a NotReady host does to the phase of its VNFs.
//!
//! Owns the meaning of the host keys (`/hosts/`, `/leases/hosts/`, `/heartbeats/`, `/cordons/`)
//! and their rules: only admin changes hosts; a host is Ready while its heartbeat lease lives
//! (the store expires it, so expiry survives a restart); nothing new is placed on a cordoned
//! host; a host is deleted only when it holds no VNF and sends no heartbeat; a VNF on a NotReady
//! host shows phase Unknown until the host is back. It must not speak HTTP or start processes,
//! and places nothing itself: drained VNFs go back to Pending for the scheduling loop.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use telvirt_model::api::{HostStatus, HostView};
use telvirt_model::{Event, FieldError, Name, Phase};
use telvirt_sched::{SchedError, Scheduler};
use telvirt_store::{Compare, LeaseId, Op, Store, StoreError};

use super::{
    CAS_RETRIES, Caller, Controller, ControllerError, Result, confined, decode, encode,
    now_rfc3339, transition_ops,
};
use crate::placement::{self, HostLife};
use crate::records::{
    self, CordonRecord, HeartbeatRecord, HostRecord, VnfRecord, allocation_key, cordon_key,
    event_key, heartbeat_key, host_key, host_lease_key, vnf_key,
};

/// How long a host stays Ready after its last heartbeat, unless told otherwise.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(3);
/// How often an agent sends a heartbeat, unless told otherwise.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
/// Shortest and longest lease TTL accepted.
pub const MIN_LEASE_TTL: Duration = Duration::from_millis(100);
pub const MAX_LEASE_TTL: Duration = Duration::from_secs(3600);
/// Who the events written by the liveness check name as their actor.
const MONITOR: &str = "host-monitor";
/// How soon a liveness pass that could not heal everything due is tried again.
const HEAL_RETRY: Duration = Duration::from_millis(100);
/// How many events back a VNF's return from Unknown looks for the event that made it so.
const RESTORE_LOOKBACK: usize = 64;

/// The controller's view of host liveness: the lease TTL and the lease each host holds.
#[derive(Debug)]
pub struct Liveness {
    ttl: std::sync::Mutex<Duration>,
    /// The lease each host's heartbeat keeps alive (a cache: the lease key in the store is the
    /// truth, read again after a restart).
    leases: std::sync::Mutex<HashMap<String, LeaseId>>,
    /// The NotReady hosts the last liveness pass saw (`None`: no pass yet), so a pass reads the
    /// VNFs only when that changed or some host is NotReady.
    last_not_ready: std::sync::Mutex<Option<BTreeSet<String>>>,
    /// Per host: when its last heartbeat came, and when a heartbeat was last written to the
    /// store (unix ms). Heartbeats between two writes cost no commit.
    beats: std::sync::Mutex<HashMap<String, (u64, u64)>>,
    /// Per host record revision: whether an agent serves it, so a liveness pass decodes a host
    /// record only when it changed.
    agents: std::sync::Mutex<HashMap<String, (u64, bool)>>,
    /// When this controller started leading (opened the store).
    opened: std::time::Instant,
    /// How long a host stays NotReady before its VNFs without a standby go elsewhere
    /// (`None`: never).
    pub(super) heal_after: std::sync::Mutex<Option<Duration>>,
    /// Per NotReady host: since when this controller has seen it so (unix ms), and whether a
    /// pass after its heal delay has run (then the monitor no longer wakes for it).
    not_ready_since: std::sync::Mutex<HashMap<String, (u64, bool)>>,
    /// When the last liveness pass began (unix ms; 0: none yet).
    last_pass: AtomicU64,
    /// Per host: the networks whose final counts its last heartbeat said it keeps (a host
    /// absent here never said: its agent is older, or none came since this controller led).
    departed: std::sync::Mutex<HashMap<String, BTreeSet<String>>>,
    /// Held by a heartbeat from the time it records itself until its lease and record are
    /// written, and by whoever reads the leases to judge hosts: a reader sees a host either
    /// before that heartbeat or with its lease (one that read between judged a host that had
    /// just spoken NotReady, and its VNFs flapped Unknown after a takeover).
    lease_writes: tokio::sync::Mutex<()>,
}

/// A heartbeat is written to the store at most this often per host (the lease is kept alive at
/// every one); the age `host list` shows comes from memory, so it stays exact.
pub const HEARTBEAT_WRITE_EVERY: Duration = Duration::from_secs(60);

impl Default for Liveness {
    fn default() -> Self {
        Self {
            ttl: std::sync::Mutex::new(DEFAULT_LEASE_TTL),
            leases: std::sync::Mutex::new(HashMap::new()),
            last_not_ready: std::sync::Mutex::new(None),
            beats: std::sync::Mutex::new(HashMap::new()),
            agents: std::sync::Mutex::new(HashMap::new()),
            opened: std::time::Instant::now(),
            heal_after: std::sync::Mutex::new(Some(super::healing::DEFAULT_HEAL_AFTER)),
            not_ready_since: std::sync::Mutex::new(HashMap::new()),
            last_pass: AtomicU64::new(0),
            departed: std::sync::Mutex::new(HashMap::new()),
            lease_writes: tokio::sync::Mutex::new(()),
        }
    }
}

impl Liveness {
    /// Whether `host` may keep final counts of `network`: its last heartbeat named it, or it
    /// never said.
    fn may_keep(&self, host: &str, network: &str) -> bool {
        self.departed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(host)
            .is_none_or(|kept| kept.contains(network))
    }

    /// Whether this controller took over so recently that a lapsed host lease says nothing:
    /// it may have lapsed while no controller led, and the host's agent gets two TTLs to send
    /// its first heartbeat here before its VNFs are marked Unknown.
    fn in_takeover_grace(&self) -> bool {
        self.opened.elapsed() < self.ttl() * 2
    }

    fn ttl(&self) -> Duration {
        *self.ttl.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lease(&self, host: &str) -> Option<LeaseId> {
        self.leases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(host)
            .copied()
    }

    fn remember(&self, host: &str, lease: Option<LeaseId>) {
        let mut leases = self.leases.lock().unwrap_or_else(|p| p.into_inner());
        match lease {
            Some(l) => leases.insert(host.to_owned(), l),
            None => {
                self.beats_map().remove(host);
                self.departed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(host);
                leases.remove(host)
            }
        };
    }

    fn beats_map(&self) -> std::sync::MutexGuard<'_, HashMap<String, (u64, u64)>> {
        self.beats.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a heartbeat of `host` at `now`; whether the store's record of it is due (none
    /// written by this process yet, or the last one older than [`HEARTBEAT_WRITE_EVERY`]).
    fn beat(&self, host: &str, now: u64) -> bool {
        self.beats_map()
            .entry(host.to_owned())
            .or_insert((now, 0))
            .0 = now;
        self.write_due(host, now)
    }

    /// Whether a heartbeat of `host` at `now` is to be written to the store.
    fn write_due(&self, host: &str, now: u64) -> bool {
        let every = u64::try_from(HEARTBEAT_WRITE_EVERY.as_millis()).unwrap_or(u64::MAX);
        self.beats_map()
            .get(host)
            .is_none_or(|(_, written)| *written == 0 || now.saturating_sub(*written) >= every)
    }

    fn written(&self, host: &str, now: u64) {
        if let Some(entry) = self.beats_map().get_mut(host) {
            entry.1 = now;
        }
    }

    fn last_beat(&self, host: &str) -> Option<u64> {
        self.beats_map().get(host).map(|(at, _)| *at)
    }

    /// A heartbeat of a host this controller already heard from arrived at `now`: its agent is
    /// alive, whatever the store then does with the lease (recorded before the keep-alive, so
    /// a slow store does not make the host look silent).
    fn arrived(&self, host: &str, now: u64) {
        if let Some(entry) = self.beats_map().get_mut(host) {
            entry.0 = now;
        }
    }

    fn ttl_ms(&self) -> u64 {
        u64::try_from(self.ttl().as_millis()).unwrap_or(u64::MAX)
    }

    /// Whether `host`, heard from by this controller, sent nothing for longer than the TTL at
    /// `now`: NotReady at once, without waiting for the store to expire its lease (etcd does
    /// that in whole seconds, checked every 500 ms). A host not heard from since this
    /// controller took over is judged by its lease alone.
    fn silent(&self, host: &str, now: u64) -> bool {
        self.last_beat(host)
            .is_some_and(|at| now.saturating_sub(at) > self.ttl_ms())
    }

    fn heal_after_ms(&self) -> Option<u64> {
        self.heal_after
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    fn since_map(&self) -> std::sync::MutexGuard<'_, HashMap<String, (u64, bool)>> {
        self.not_ready_since
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Records which hosts a pass at `now` found NotReady (a host keeps the time it was first
    /// seen so; one Ready again is forgotten).
    fn track_not_ready(&self, hosts: &BTreeSet<String>, now: u64) {
        let mut since = self.since_map();
        since.retain(|h, _| hosts.contains(h));
        for h in hosts {
            since.entry(h.clone()).or_insert((now, false));
        }
    }

    /// Whether `host` has been NotReady for the heal delay at `now`.
    fn heal_due(&self, host: &str, now: u64) -> bool {
        let Some(after) = self.heal_after_ms() else {
            return false;
        };
        self.since_map()
            .get(host)
            .is_some_and(|(since, _)| now >= since.saturating_add(after))
    }

    /// A complete pass at `now` healed what it could on every host whose heal delay is over:
    /// later passes (every resync) retry what could not move, without waking for them.
    fn heal_pass_done(&self, now: u64) {
        let after = self.heal_after_ms();
        for (since, done) in self.since_map().values_mut() {
            if after.is_some_and(|a| now >= since.saturating_add(a)) {
                *done = true;
            }
        }
    }

    /// How long until the heal delay of a NotReady host is over, if one is still to come; at
    /// once for one whose delay ended after the last pass began; for one that a pass since
    /// could not heal (a conflict, a pair with no room for its standby), [`HEAL_RETRY`] (not
    /// at once: the monitor would go over every VNF again each millisecond for as long as that
    /// lasts).
    fn next_heal(&self, now: u64) -> Option<Duration> {
        let after = self.heal_after_ms()?;
        self.since_map()
            .values()
            .filter(|(_, done)| !done)
            .map(|(since, _)| since.saturating_add(after))
            .min()
            .map(|due| match due.checked_sub(now) {
                Some(wait) if wait > 0 => Duration::from_millis(wait + 1),
                _ if due > self.last_pass.load(Ordering::Relaxed) => Duration::from_millis(1),
                _ => HEAL_RETRY,
            })
    }

    /// How long until the next host that is heard from falls silent, if any.
    fn next_silence(&self, now: u64) -> Option<Duration> {
        let ttl = self.ttl_ms();
        self.beats_map()
            .values()
            .map(|(at, _)| at.saturating_add(ttl))
            .filter(|due| *due >= now)
            .min()
            .map(|due| Duration::from_millis(due - now + 1))
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// `5.2 s`: an age as people read it.
fn seconds(ms: u64) -> String {
    format!("{}.{} s", ms / 1000, (ms % 1000) / 100)
}

/// Why a host is NotReady, for its VNFs' reason.
fn not_ready_reason(host: &str, age_ms: Option<u64>) -> String {
    match age_ms {
        Some(age) => format!(
            "host {host} is NotReady (no heartbeat for {})",
            seconds(age)
        ),
        None => format!("host {host} is NotReady (no heartbeat received from it)"),
    }
}

/// Marks every cordoned host unschedulable in a scheduler rebuilt from the store.
pub(super) async fn restore_cordons(store: &dyn Store, scheduler: &mut Scheduler) -> Result<()> {
    for (key, _) in store.list(records::CORDONS).await? {
        let host = &key[records::CORDONS.len()..];
        match scheduler.set_schedulable(host, false) {
            Ok(()) | Err(SchedError::UnknownHost(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn require_admin(caller: &Caller, what: &str) -> Result<()> {
    if caller.is_admin() {
        Ok(())
    } else {
        Err(ControllerError::Forbidden(format!(
            "only the admin authority may {what} a host"
        )))
    }
}

fn no_host(name: &str) -> ControllerError {
    ControllerError::NotFound(format!("host {name} not found"))
}

impl Controller {
    /// Sets how long a host stays Ready after its last heartbeat (leases granted from now on).
    /// Refused outside 100 ms ..= 1 h.
    pub fn set_host_lease_ttl(&self, ttl: Duration) -> Result<()> {
        if !(MIN_LEASE_TTL..=MAX_LEASE_TTL).contains(&ttl) {
            return Err(ControllerError::Invalid(FieldError::new(
                "host_lease_ttl",
                format!(
                    "{} ms is out of range; a host lease lasts {} ms to {} ms",
                    ttl.as_millis(),
                    MIN_LEASE_TTL.as_millis(),
                    MAX_LEASE_TTL.as_millis()
                ),
            )));
        }
        *self.liveness.ttl.lock().unwrap_or_else(|p| p.into_inner()) = ttl;
        Ok(())
    }

    /// How long a host stays Ready after its last heartbeat.
    pub fn host_lease_ttl(&self) -> Duration {
        self.liveness.ttl()
    }

    /// [`Controller::register_host`] for a record an agent sent: checked as input (a host
    /// name that fits its keys; a spec the scheduler takes, else 422 naming why).
    pub async fn register_agent_host(&self, record: HostRecord) -> Result<()> {
        crate::nodes::check_host_name(&record.spec.name)?;
        self.register_host(record).await.map_err(|e| match e {
            ControllerError::Scheduler(e) => {
                ControllerError::Invalid(telvirt_model::FieldError::new("spec", e.to_string()))
            }
            other => other,
        })
    }

    /// Adds or updates a host and its facts. A cordon outlives a new registration.
    pub async fn register_host(&self, record: HostRecord) -> Result<()> {
        let mut scheduler = self.scheduler.lock().await;
        let name = record.spec.name.clone();
        if scheduler.host_names().contains(&name) {
            if scheduler.host_spec(&name)? != &record.spec {
                scheduler.update_host(record.spec.clone())?;
            }
        } else {
            scheduler.add_host(record.spec.clone())?;
            if self.store.get(&cordon_key(&name)).await?.is_some() {
                scheduler.set_schedulable(&name, false)?;
            }
        }
        scheduler.set_runtimes(&name, crate::placement::offered_runtimes(&record.runtimes))?;
        self.store.put(&host_key(&name), encode(&record)?).await?;
        drop(scheduler);
        self.changed();
        Ok(())
    }

    /// Every host with its status and core map as `caller` may see it (see
    /// [`Controller::host`]).
    pub async fn hosts(&self, caller: &Caller) -> Result<Vec<HostView>> {
        let mut out = Vec::new();
        for (key, v) in self.store.list(records::HOSTS).await? {
            let record: HostRecord = decode(&key, &v.value)?;
            out.push(self.view(caller, &record).await?);
        }
        Ok(out)
    }

    /// A host with its status and core map: admin sees every VNF and group by name; an
    /// authority sees its own by name and every cpu another authority holds only as in use.
    pub async fn host(&self, caller: &Caller, name: &str) -> Result<HostView> {
        let record = self.host_record(name).await?.0;
        self.view(caller, &record).await
    }

    pub(crate) async fn host_record(&self, name: &str) -> Result<(HostRecord, u64)> {
        let key = host_key(name);
        let v = self.store.get(&key).await?.ok_or_else(|| no_host(name))?;
        Ok((decode(&key, &v.value)?, v.mod_revision))
    }

    /// Whether host `name`'s heartbeat lease is live and its agent not silent (see
    /// [`Liveness::silent`]).
    pub(crate) async fn host_ready(&self, name: &str) -> Result<bool> {
        let _written = self.liveness.lease_writes.lock().await;
        Ok(!self.liveness.silent(name, now_ms())
            && self.store.get(&host_lease_key(name)).await?.is_some())
    }

    /// The hosts an agent serves whose lease is live and that may keep final counts of
    /// network `network` (their heartbeat named it, or never said which they keep), by name.
    pub(crate) async fn hosts_keeping_counts_of(&self, network: &str) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for (key, v) in self.store.list(records::HOSTS).await? {
            let record: HostRecord = decode(&key, &v.value)?;
            if record.agent
                && self.liveness.may_keep(&record.spec.name, network)
                && self.host_ready(&record.spec.name).await?
            {
                out.push(record.spec.name);
            }
        }
        Ok(out)
    }

    /// A heartbeat of `host` with its body (`unread`: why a body could not be read, `beat`
    /// then the default): the lease first, whatever the body says (a host is never made
    /// NotReady by it), then what it says of the networks whose final counts the host keeps.
    /// Returns why the body was passed over, if it was.
    pub async fn take_heartbeat(
        &self,
        host: &str,
        beat: &telvirt_api::HeartbeatRequest,
        unread: Option<String>,
    ) -> Result<Option<String>> {
        self.heartbeat(host).await?;
        let named = self.departed_named(host, beat).err().map(|e| e.to_string());
        let refused = unread.or(named);
        if let Some(why) = &refused {
            tracing::warn!(host = %host, "heartbeat body passed over: {why}");
        }
        Ok(refused)
    }

    /// What `host`'s heartbeat (just taken) says of the networks whose final counts it keeps.
    /// A body that names more than [`telvirt_api::MAX_DEPARTED_NAMED`] networks, or a name
    /// that is none, is passed over (the host is then asked for every network, as one that
    /// does not say) and the error says why: the heartbeat stands.
    fn departed_named(&self, host: &str, beat: &telvirt_api::HeartbeatRequest) -> Result<()> {
        let checked = match &beat.departed {
            Some(names) => Self::check_departed(names).map(|()| Some(names)),
            None => Ok(None),
        };
        let mut kept = self
            .liveness
            .departed
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match &checked {
            Ok(Some(names)) => {
                kept.insert(host.to_owned(), names.iter().cloned().collect());
            }
            _ => {
                kept.remove(host);
            }
        }
        checked.map(|_| ())
    }

    fn check_departed(names: &[String]) -> Result<()> {
        if names.len() > telvirt_api::MAX_DEPARTED_NAMED {
            return Err(ControllerError::Invalid(FieldError::new(
                "departed",
                format!(
                    "{} networks named; a heartbeat names at most {}",
                    names.len(),
                    telvirt_api::MAX_DEPARTED_NAMED
                ),
            )));
        }
        if let Some(bad) = names.iter().find(|n| n.parse::<Name>().is_err()) {
            return Err(ControllerError::Invalid(FieldError::new(
                "departed",
                format!("`{bad}` is not a network name"),
            )));
        }
        Ok(())
    }

    /// The record of host `name` when an agent serves it (None for an unknown host or an
    /// inventory host without an agent).
    pub(crate) async fn agent_host(&self, name: &str) -> Result<Option<HostRecord>> {
        let key = host_key(name);
        match self.store.get(&key).await? {
            Some(v) => Ok(Some(decode::<HostRecord>(&key, &v.value)?).filter(|r| r.agent)),
            None => Ok(None),
        }
    }

    /// The plain-text core map of a host, as the scheduler renders it, confined to what
    /// `caller` may see (see [`Controller::host`]).
    pub async fn host_core_map(&self, caller: &Caller, name: &str) -> Result<String> {
        let scheduler = self.scheduler.lock().await;
        let map = telvirt_sched::coremap::host_map(&scheduler, name).map_err(|_| no_host(name))?;
        drop(scheduler);
        Ok(telvirt_sched::coremap::render_host_map(&confined(
            caller, map,
        )))
    }

    async fn view(&self, caller: &Caller, record: &HostRecord) -> Result<HostView> {
        let life = self.life(&record.spec.name).await?;
        let scheduler = self.scheduler.lock().await;
        let map = telvirt_sched::coremap::host_map(&scheduler, &record.spec.name)?;
        drop(scheduler);
        Ok(placement::host_view(record, life, &confined(caller, map)))
    }

    /// A host's liveness (its lease key), cordon and heartbeat age, as the store holds them.
    async fn life(&self, name: &str) -> Result<HostLife> {
        let ready = self.host_ready(name).await?;
        let schedulable = self.store.get(&cordon_key(name)).await?.is_none();
        Ok(HostLife {
            status: if ready {
                HostStatus::Ready
            } else {
                HostStatus::NotReady
            },
            schedulable,
            heartbeat_age_ms: self.heartbeat_age_ms(name).await?,
        })
    }

    async fn heartbeat_age_ms(&self, name: &str) -> Result<Option<u64>> {
        if let Some(at) = self.liveness.last_beat(name) {
            return Ok(Some(now_ms().saturating_sub(at)));
        }
        let key = heartbeat_key(name);
        Ok(match self.store.get(&key).await? {
            Some(v) => {
                let beat: HeartbeatRecord = decode(&key, &v.value)?;
                Some(now_ms().saturating_sub(beat.at_ms))
            }
            None => None,
        })
    }

    // ----- liveness -----

    /// The agent of `host` is alive: keeps its lease (granting a new one after it expired) and
    /// records the time. Refused for a host that is not registered (deleted, or renamed).
    pub async fn heartbeat(&self, host: &str) -> Result<()> {
        // Most heartbeats: a lease this process holds for the host and no write due keep the
        // lease alive and nothing more (a deleted host's lease is forgotten with it, so its
        // next heartbeat takes the full path below and is refused).
        if let Some(l) = self.liveness.lease(host) {
            let now = now_ms();
            self.liveness.arrived(host, now);
            if !self.liveness.write_due(host, now) {
                match self.store.keep_alive(l).await {
                    Ok(()) => {
                        self.liveness.beat(host, now);
                        return Ok(());
                    }
                    Err(StoreError::NoLease(_)) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        let (_, host_rev) = self.host_record(host).await?;
        let lease_key = host_lease_key(host);
        let mut lease = self.liveness.lease(host);
        if lease.is_none() {
            // After a restart: the lease the store still holds, if it did not expire.
            lease = self.store.get(&lease_key).await?.and_then(|v| v.lease);
        }
        if let Some(l) = lease {
            match self.store.keep_alive(l).await {
                // Kept from now on: the next heartbeats take the short path above.
                Ok(()) => self.liveness.remember(host, Some(l)),
                Err(StoreError::NoLease(_)) => lease = None,
                Err(e) => return Err(e.into()),
            }
        }
        let _writing = self.liveness.lease_writes.lock().await;
        let now = now_ms();
        let write_due = self.liveness.beat(host, now);
        if lease.is_some() && !write_due {
            return Ok(());
        }
        let beat = encode(&HeartbeatRecord { at_ms: now })?;
        let mut ops = vec![Op::Put {
            key: heartbeat_key(host),
            value: beat.clone(),
            lease: None,
        }];
        let granted = match lease {
            Some(_) => None,
            None => {
                let l = self.store.grant_lease(self.liveness.ttl()).await?;
                ops.push(Op::Put {
                    key: lease_key,
                    value: beat,
                    lease: Some(l),
                });
                Some(l)
            }
        };
        let compare = Compare::ModRevision {
            key: host_key(host),
            revision: host_rev,
        };
        let done = self.store.txn(vec![compare], ops).await;
        match (done, granted) {
            (Ok(o), Some(l)) if o.succeeded => {
                tracing::info!("host {host} is Ready (heartbeat lease granted)");
                self.liveness.remember(host, Some(l));
                self.liveness.written(host, now);
                Ok(())
            }
            (Ok(o), None) if o.succeeded => {
                self.liveness.written(host, now);
                Ok(())
            }
            (done, granted) => {
                if let Some(l) = granted {
                    let _ = self.store.revoke(l).await;
                }
                done?;
                Err(ControllerError::Conflict(format!(
                    "host {host} changed while its heartbeat was recorded; the next one counts"
                )))
            }
        }
    }

    /// Runs until the process ends: marks the VNFs of hosts that went NotReady `Unknown`, gives
    /// them back their last known phase when their host is Ready again, and ends the moves
    /// past their deadline ([`Controller::check_moves`]). Woken by every
    /// lease change (expiry included), when the next host heard from would fall silent, and at
    /// least every `resync`.
    pub async fn host_monitor(self: Arc<Self>, resync: Duration) {
        let mut watch = match self.store.watch(records::HOST_LEASES).await {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!("cannot watch host leases, checking every {resync:?}: {e}");
                None
            }
        };
        loop {
            if let Err(e) = self.check_hosts().await {
                tracing::warn!("host liveness check failed: {e}");
            }
            // A move past its deadline ends even when no agent reports again (ADR 062).
            if let Err(e) = self.check_moves().await {
                tracing::warn!("the look at the moves' deadlines failed: {e}");
            }
            let now = now_ms();
            let wait = [
                self.liveness.next_silence(now),
                self.liveness.next_heal(now),
            ]
            .into_iter()
            .flatten()
            .fold(resync, Duration::min);
            match &mut watch {
                Some(w) => {
                    if let Ok(None) = tokio::time::timeout(wait, w.next()).await {
                        watch = None;
                    }
                }
                None => tokio::time::sleep(wait).await,
            }
        }
    }

    /// One liveness pass over every VNF (see [`Controller::host_monitor`]).
    pub async fn check_hosts(&self) -> Result<()> {
        let written = self.liveness.lease_writes.lock().await;
        let now = now_ms();
        self.liveness.last_pass.store(now, Ordering::Relaxed);
        let ready: BTreeSet<String> = self
            .store
            .list(records::HOST_LEASES)
            .await?
            .into_iter()
            .map(|(k, _)| k[records::HOST_LEASES.len()..].to_owned())
            .filter(|host| !self.liveness.silent(host, now))
            .collect();
        // The hosts heard from as of this same moment (a heartbeat that records itself after
        // this has its lease written after this too: the next pass sees it).
        let heard: BTreeSet<String> = self.liveness.beats_map().keys().cloned().collect();
        drop(written);
        let mut not_ready = BTreeMap::new();
        let mut with_agent = Vec::new();
        for (key, v) in self.store.list(records::HOSTS).await? {
            let host = &key[records::HOSTS.len()..];
            let cached = self
                .liveness
                .agents
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(host)
                .filter(|(rev, _)| *rev == v.mod_revision)
                .map(|(_, agent)| *agent);
            let agent = match cached {
                Some(agent) => agent,
                None => {
                    let agent = decode::<HostRecord>(&key, &v.value)?.agent;
                    self.liveness
                        .agents
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(host.to_owned(), (v.mod_revision, agent));
                    agent
                }
            };
            if agent {
                with_agent.push(host.to_owned());
            }
            // A host this controller has not heard from since it took over gets two TTLs to
            // send it a first heartbeat (its lease may have lapsed while no controller led);
            // a later pass judges it.
            let spared = !heard.contains(host) && self.liveness.in_takeover_grace();
            if !ready.contains(host) && !spared {
                let why = not_ready_reason(host, self.heartbeat_age_ms(host).await?);
                not_ready.insert(host.to_owned(), why);
            }
        }
        self.place_only_on_ready(&with_agent, &ready).await?;
        let hosts: BTreeSet<String> = not_ready.keys().cloned().collect();
        self.liveness.track_not_ready(&hosts, now);
        let seen = || {
            self.liveness
                .last_not_ready
                .lock()
                .unwrap_or_else(|p| p.into_inner())
        };
        if hosts.is_empty() && seen().as_ref() == Some(&hosts) {
            // Every host Ready, as after the last complete pass: no VNF can have become Unknown
            // or be due back (only a pass makes VNFs Unknown).
            return Ok(());
        }
        // Until this pass completes, the next one looks at every VNF however the hosts stand:
        // a pass cut short (a store error, a VNF changing under it) may have made VNFs Unknown
        // that only a later pass brings back.
        *seen() = None;
        // Hosts whose agent failed (an inventory host without one never runs anything), and
        // those whose VNFs go elsewhere now: NotReady for the heal delay.
        let all_not_ready: Vec<String> = hosts
            .iter()
            .filter(|h| with_agent.contains(h))
            .cloned()
            .collect();
        let failed: Vec<String> = all_not_ready
            .iter()
            .filter(|h| self.liveness.heal_due(h, now))
            .cloned()
            .collect();
        let mut complete = true;
        for (key, v) in self.store.list(records::VNFS).await? {
            let record: VnfRecord = decode(&key, &v.value)?;
            let vnf = &record.vnf;
            // An active whose standby is on a Ready host fails over at once; the rest waits
            // for the heal delay.
            let heal_from = if super::healing::fails_over(vnf, &all_not_ready) {
                Some(&all_not_ready)
            } else if vnf.placements.iter().any(|p| failed.contains(&p.host))
                // An active its standby still hears stays (Unknown) however long its host is
                // NotReady: it is cut off from the controller only, and forwards.
                && !super::healing::standby_hears_active(vnf, &all_not_ready)
            {
                Some(&failed)
            } else {
                None
            };
            if let Some(from) = heal_from {
                match self.heal_vnf(vnf.name.as_str(), from).await {
                    Ok(true) => continue,
                    Ok(false) | Err(ControllerError::NotFound(_)) => {}
                    Err(ControllerError::Conflict(_)) => complete = false,
                    Err(e) => return Err(e),
                }
            } else if vnf.descriptor.spec.redundancy == telvirt_model::Redundancy::ActiveStandby
                && vnf.desired == telvirt_model::DesiredState::Running
                && !record.deleting
                && vnf.migration.is_none()
                && vnf.placements.len() == 1
            {
                // A pair that lost its standby when no host could take one: whole again once
                // one can (every pass looks until then).
                match self.complete_pair(vnf.name.as_str()).await {
                    Ok(true) => continue,
                    Ok(false) | Err(ControllerError::Conflict(_)) => complete = false,
                    Err(ControllerError::NotFound(_)) => {}
                    Err(e) => return Err(e),
                }
            }
            // The VNF's phase is its active instance's: a standby on a NotReady host leaves
            // it as it is (the healer places a new standby).
            let lost = vnf
                .placements
                .iter()
                .filter(|p| p.role == telvirt_model::Role::Active)
                .find_map(|p| not_ready.get(&p.host));
            let result = match (lost, vnf.phase) {
                (Some(why), Phase::Starting | Phase::Running | Phase::Locked | Phase::Stopping) => {
                    self.mark_unknown(vnf.name.as_str(), why).await
                }
                (None, Phase::Unknown) => self.restore_known(&record).await,
                _ => Ok(()),
            };
            match result {
                Ok(()) | Err(ControllerError::NotFound(_)) => {}
                // Changing too fast: the next pass looks again.
                Err(ControllerError::Conflict(_)) => complete = false,
                Err(e) => return Err(e),
            }
        }
        if complete {
            *seen() = Some(hosts);
            self.liveness.heal_pass_done(now);
        }
        Ok(())
    }

    /// Nothing new is placed on a host whose agent stopped sending heartbeats, until it is
    /// Ready again (then the pending VNFs are looked at at once); a cordon keeps it so either
    /// way. An inventory host without an agent is left as its cordon says.
    async fn place_only_on_ready(
        &self,
        with_agent: &[String],
        ready: &BTreeSet<String>,
    ) -> Result<()> {
        // The cordons are read under the scheduler lock, which a cordon holds while it writes
        // its record and the scheduler: read before it, a cordon made meanwhile was undone.
        let mut scheduler = self.scheduler.lock().await;
        let cordoned: BTreeSet<String> = self
            .store
            .list(records::CORDONS)
            .await?
            .into_iter()
            .map(|(k, _)| k[records::CORDONS.len()..].to_owned())
            .collect();
        let mut back = false;
        for host in with_agent {
            let want = ready.contains(host) && !cordoned.contains(host);
            match scheduler.is_schedulable(host) {
                Ok(now) if now != want => {
                    scheduler.set_schedulable(host, want)?;
                    back |= want;
                }
                Ok(_) | Err(SchedError::UnknownHost(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        drop(scheduler);
        if back {
            self.wake_scheduler();
        }
        Ok(())
    }

    async fn mark_unknown(&self, name: &str, why: &str) -> Result<()> {
        self.update(name, |record| {
            if !matches!(
                record.vnf.phase,
                Phase::Starting | Phase::Running | Phase::Locked | Phase::Stopping
            ) {
                return Ok(None);
            }
            record.vnf.phase = Phase::Unknown;
            record.vnf.reason = Some(why.to_owned());
            Ok(Some((Phase::Unknown, why.to_owned(), MONITOR.to_owned())))
        })
        .await
        .map(|_| ())
    }

    /// Gives a VNF whose hosts are all Ready again the phase it had before it became Unknown
    /// (the `from` of the event that made it Unknown: events written while it stayed Unknown,
    /// an apply or a standby's word, go from Unknown to Unknown and are passed over), or
    /// Starting when that event is not found (compacted, or further back than
    /// [`RESTORE_LOOKBACK`]): never Unknown again.
    async fn restore_known(&self, record: &VnfRecord) -> Result<()> {
        let name = record.vnf.name.as_str();
        let mut back = Phase::Starting;
        let mut seq = record.last_event;
        for _ in 0..RESTORE_LOOKBACK {
            let key = event_key(name, seq);
            let Some(v) = self.store.get(&key).await? else {
                break;
            };
            let e: Event = decode(&key, &v.value)?;
            match (e.from, e.to) {
                (Some(Phase::Unknown), Phase::Unknown) if seq > 1 => seq -= 1,
                (Some(from), Phase::Unknown) if from != Phase::Unknown => {
                    back = from;
                    break;
                }
                _ => break,
            }
        }
        let hosts: Vec<&str> = record
            .vnf
            .placements
            .iter()
            .map(|p| p.host.as_str())
            .collect();
        let reason = format!(
            "host {} is Ready again; back to its last known phase {back}",
            hosts.join(", ")
        );
        let seen = record.last_event;
        self.update(name, |r| {
            if r.vnf.phase != Phase::Unknown {
                return Ok(None);
            }
            if r.last_event != seen {
                // Still Unknown, from another event than the one read: the next pass looks
                // again (returning as if done would let it stay Unknown).
                return Err(ControllerError::Conflict(format!(
                    "VNF {name} changed while its host's return was recorded"
                )));
            }
            r.vnf.phase = back;
            r.vnf.reason = Some(reason.clone());
            Ok(Some((back, reason.clone(), MONITOR.to_owned())))
        })
        .await
        .map(|_| ())
    }

    // ----- cordon, drain, delete -----

    /// Cordons a host (admin only): nothing new is placed there; what it runs stays.
    pub async fn cordon(&self, caller: &Caller, name: &str) -> Result<HostView> {
        require_admin(caller, "cordon")?;
        self.set_cordon(caller, name, Some(false)).await?;
        self.host(caller, name).await
    }

    /// Lets the scheduler place on a host again (admin only).
    pub async fn uncordon(&self, caller: &Caller, name: &str) -> Result<HostView> {
        require_admin(caller, "uncordon")?;
        self.set_cordon(caller, name, None).await?;
        self.host(caller, name).await
    }

    /// Cordons a host and moves every VNF placed there back to Pending (admin only), to be
    /// placed elsewhere, or to wait with the scheduler's reason when nothing else fits. A VNF
    /// being deleted is removed at once (its host may never report it stopped). An
    /// active-standby VNF with a role there is placed again whole.
    pub async fn drain(&self, caller: &Caller, name: &str) -> Result<HostView> {
        require_admin(caller, "drain")?;
        self.set_cordon(caller, name, Some(true)).await?;
        for (key, v) in self.store.list(records::VNFS).await? {
            let record: VnfRecord = decode(&key, &v.value)?;
            if placement::placement_on(&record.vnf, name).is_some() {
                self.evict(caller, record.vnf.name.as_str(), name).await?;
            }
        }
        self.host(caller, name).await
    }

    /// Writes (`Some(drained)`) or removes (`None`) a host's cordon, then tells the scheduler.
    async fn set_cordon(&self, caller: &Caller, name: &str, cordon: Option<bool>) -> Result<()> {
        let mut scheduler = self.scheduler.lock().await;
        self.host_record(name).await?;
        match cordon {
            Some(drained) => {
                let record = CordonRecord {
                    by: caller.name.clone(),
                    at: now_rfc3339(),
                    drained,
                };
                self.store.put(&cordon_key(name), encode(&record)?).await?;
            }
            None => {
                self.store.delete(&cordon_key(name)).await?;
            }
        }
        match scheduler.set_schedulable(name, cordon.is_none()) {
            Ok(()) | Err(SchedError::UnknownHost(_)) => {}
            Err(e) => return Err(e.into()),
        }
        drop(scheduler);
        tracing::info!(
            "host {name} {} by {}",
            match cordon {
                Some(true) => "drained",
                Some(false) => "cordoned",
                None => "uncordoned",
            },
            caller.name
        );
        self.changed();
        Ok(())
    }

    /// Moves VNF `vnf` off `host`: back to Pending without placements, its allocation dropped,
    /// with an event, in one transaction conditioned on both keys; then its cores are freed.
    async fn evict(&self, caller: &Caller, vnf: &str, host: &str) -> Result<()> {
        for _ in 0..CAS_RETRIES {
            let mut scheduler = self.scheduler.lock().await;
            let Some((record, rev)) = self.load(vnf).await? else {
                return Ok(());
            };
            if placement::placement_on(&record.vnf, host).is_none() {
                return Ok(());
            }
            if record.deleting {
                drop(scheduler);
                return match self.remove_when(vnf, |r| r.deleting).await {
                    Ok(_) | Err(ControllerError::NotFound(_)) => Ok(()),
                    Err(e) => Err(e),
                };
            }
            let alloc_rev = self
                .store
                .get(&allocation_key(vnf))
                .await?
                .map_or(0, |v| v.mod_revision);
            let mut next = record.clone();
            let from = next.vnf.phase;
            let reason = format!(
                "host {host} was drained by {}; placing it again elsewhere",
                caller.name
            );
            next.vnf.phase = Phase::Pending;
            next.vnf.placements.clear();
            next.vnf.reason = Some(reason.clone());
            next.vnf.generation += 1;
            let mut ops = transition_ops(&mut next, from, &reason, &caller.name)?;
            ops.push(Op::Delete {
                key: allocation_key(vnf),
            });
            let compares = vec![
                Compare::ModRevision {
                    key: vnf_key(vnf),
                    revision: rev,
                },
                Compare::ModRevision {
                    key: allocation_key(vnf),
                    revision: alloc_rev,
                },
            ];
            if !self.store.txn(compares, ops).await?.succeeded {
                continue;
            }
            match scheduler.release(vnf) {
                Ok(_) | Err(SchedError::UnknownVnf(_)) => {}
                Err(e) => return Err(e.into()),
            }
            drop(scheduler);
            self.metrics.event();
            self.vnf_changed(Some(&record.vnf), Some(&next.vnf));
            return Ok(());
        }
        Err(ControllerError::Conflict(format!(
            "vnf {vnf} kept changing while it was being moved off host {host}; try again"
        )))
    }

    /// Deletes a host (admin only): its record, cordon and heartbeat, and its place in the
    /// scheduler. Refused while a VNF is placed there (drain it first) and while its agent
    /// still sends heartbeats (it would only come back).
    pub async fn delete_host(&self, caller: &Caller, name: &str) -> Result<()> {
        require_admin(caller, "delete")?;
        let mut scheduler = self.scheduler.lock().await;
        let mut attempt = 0;
        let lease = loop {
            attempt += 1;
            let (_, host_rev) = self.host_record(name).await?;
            // A lease the store still holds for an agent that fell silent goes with the host.
            let lease = self.store.get(&host_lease_key(name)).await?;
            if lease.is_some() && !self.liveness.silent(name, now_ms()) {
                return Err(ControllerError::Conflict(format!(
                    "host {name} is Ready: its agent still sends heartbeats; stop that agent (or wait {} ms for its lease to expire) before deleting the host",
                    self.liveness.ttl().as_millis()
                )));
            }
            let mut held = Vec::new();
            for (key, v) in self.store.list(records::VNFS).await? {
                let record: VnfRecord = decode(&key, &v.value)?;
                if placement::placement_on(&record.vnf, name).is_some() {
                    held.push(record.vnf.name.to_string());
                }
            }
            if held.is_empty() && scheduler.host_roles(name).unwrap_or(0) > 0 {
                held.push("(allocations without a VNF)".to_owned());
            }
            if !held.is_empty() {
                return Err(ControllerError::Conflict(format!(
                    "host {name} still holds vnf {}; drain it first (telvirt host drain {name})",
                    held.join(", ")
                )));
            }
            let compares = vec![
                Compare::ModRevision {
                    key: host_key(name),
                    revision: host_rev,
                },
                Compare::ModRevision {
                    key: host_lease_key(name),
                    revision: lease.as_ref().map_or(0, |v| v.mod_revision),
                },
            ];
            let mut ops = vec![
                Op::Delete {
                    key: host_key(name),
                },
                Op::Delete {
                    key: heartbeat_key(name),
                },
                Op::Delete {
                    key: cordon_key(name),
                },
            ];
            if lease.is_some() {
                ops.push(Op::Delete {
                    key: host_lease_key(name),
                });
            }
            if self.store.txn(compares, ops).await?.succeeded {
                break lease;
            }
            // The silent agent's lease may have expired meanwhile (its key went): look again.
            if attempt == 3 {
                return Err(ControllerError::Conflict(format!(
                    "host {name} changed while it was being deleted (a heartbeat, or a new registration); try again"
                )));
            }
        };
        match scheduler.remove_host(name) {
            Ok(()) | Err(SchedError::UnknownHost(_)) => {}
            Err(e) => return Err(e.into()),
        }
        drop(scheduler);
        if let Some(id) = lease.and_then(|v| v.lease)
            && let Err(e) = self.store.revoke(id).await
        {
            // Its key is gone already; the lease itself expires by its TTL.
            tracing::debug!("revoking the lease of deleted host {name}: {e}");
        }
        self.liveness.remember(name, None);
        tracing::info!("host {name} deleted by {}", caller.name);
        self.changed();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_heal_left_to_the_next_pass_is_retried_after_a_pause_not_at_once() {
        let l = Liveness::default();
        *l.heal_after.lock().unwrap() = Some(Duration::from_millis(1_000));
        let hosts: BTreeSet<String> = ["h2".to_owned()].into();
        l.track_not_ready(&hosts, 10_000);
        // Before the delay is over: woken when it is.
        l.last_pass.store(10_400, Ordering::Relaxed);
        assert_eq!(l.next_heal(10_400), Some(Duration::from_millis(601)));
        // Over since the last pass began (a pass that straddled the end): at once.
        assert_eq!(l.next_heal(11_000), Some(Duration::from_millis(1)));
        // A pass since could not heal it: retried after a pause.
        l.last_pass.store(11_001, Ordering::Relaxed);
        assert_eq!(l.next_heal(11_002), Some(HEAL_RETRY));
        assert_eq!(l.next_heal(15_000), Some(HEAL_RETRY));
        // A complete pass healed it: nothing to wake for.
        l.heal_pass_done(15_000);
        assert_eq!(l.next_heal(15_001), None);
    }
}
