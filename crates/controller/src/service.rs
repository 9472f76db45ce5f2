//! The controller: every decision about VNFs, authorities and hosts, written to the store first.
//!
//! Owns the rules (who may see and change what, when a locked VNF refuses, what a transition
//! records) and the order of work (store, then act). It must not speak HTTP (the `http` module
//! does) and must not start processes (agents do, through runtimes).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use telvirt_model::api::{
    ADMIN_AUTHORITY, Assignment, Authority, AuthorityToken, CreateAuthority,
    DEFAULT_AUTHORITY_DOMAIN, InstanceStatus, OPERATOR_DOMAIN, Observation, StandbyPeer,
};
use telvirt_model::{
    DesiredState, DeviceGrant, Event, FieldError, Format, LockInfo, ModelError, Name, Phase,
    RuntimeKind, Vnf, parse_vnf,
};
use telvirt_sched::{Allocation, SchedConfig, SchedError, Scheduler};
use telvirt_store::{Compare, Op, Store, StoreError, TxnOutcome};
use tokio::sync::{Mutex, Notify};

use crate::auth;
use crate::metrics::Metrics;
use crate::pair_keys;
use crate::placement;
use crate::records::{
    self, AuthorityRecord, HostRecord, VnfRecord, allocation_key, authority_key, event_key,
    token_key, vnf_key,
};

#[path = "apply.rs"]
pub mod apply;
#[path = "healing.rs"]
pub mod healing;
#[path = "migration.rs"]
pub mod migration;
use healing::ActiveLoss;
#[path = "hosts.rs"]
pub mod hosts;

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
}

impl Caller {
    pub fn is_admin(&self) -> bool {
        self.name == ADMIN_AUTHORITY
    }

    pub(crate) fn may_see(&self, vnf: &Vnf) -> bool {
        self.is_admin() || vnf.owner.as_str() == self.name
    }
}

impl ControllerError {
    /// VNF `name` is locked as `lock` says.
    pub(crate) fn locked(name: &str, lock: &LockInfo) -> Self {
        Self::Locked {
            vnf: name.to_owned(),
            by: lock.by.to_string(),
            since: lock.at.clone(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("{0}")]
    Descriptor(#[from] ModelError),
    #[error("{0}")]
    Invalid(FieldError),
    #[error("missing or unknown bearer token")]
    Unauthorized,
    /// A valid token of the wrong kind: a node credential on the authorities' API (401).
    #[error("{0}")]
    WrongCredential(String),
    #[error("{0}")]
    Forbidden(String),
    /// The body is larger than this request takes (413).
    #[error("{0}")]
    TooLarge(String),
    /// Refused with several reasons, e.g. a module the verifier refuses (422).
    #[error("{detail}")]
    Refused {
        detail: String,
        errors: Vec<FieldError>,
    },
    /// An apply changes fields the VNF takes only when it is created (409 naming each).
    #[error("{detail}")]
    NeedsRecreate {
        detail: String,
        errors: Vec<FieldError>,
    },
    /// An apply the VNF could take, but not now: the cores it names are not free (409).
    #[error("{0}")]
    CannotApply(FieldError),
    /// A host resource the caller's authority was not granted (403 with the field).
    #[error("{0}")]
    NotGranted(FieldError),

    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("vnf {vnf} is locked by authority {by} since {since}; unlock it first")]
    Locked {
        vnf: String,
        by: String,
        since: String,
    },
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("stored data: {0}")]
    Corrupt(String),
    #[error("scheduler: {0}")]
    Scheduler(#[from] SchedError),
    /// The node cannot do it now (no data plane, a probe that failed to attach).
    #[error("{0}")]
    Unavailable(String),
    /// The caller holds as many of something as one authority may (429).
    #[error("{0}")]
    TooManyRequests(String),
}

type Result<T, E = ControllerError> = std::result::Result<T, E>;

/// What a delete did.
#[derive(Debug, Clone, PartialEq)]
pub enum Deletion {
    /// Gone now.
    Deleted,
    /// Stopping first; removed once its agent reports it stopped.
    Pending(Box<Vnf>),
}

pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// VNFs placed under one hold of the scheduler lock, their commits sent together.
pub const PLACE_BATCH: usize = 64;

/// The least time between a scheduling pass that failed and the next.
pub const FAILED_PASS_PAUSE: Duration = Duration::from_millis(500);

/// What placing one pending VNF takes.
enum Plan {
    /// Gone, or no longer waiting for a placement.
    Nothing,
    /// Fits nowhere now: the scheduler's reason.
    Unplaceable(String),
    Place(Box<PlannedPlacement>),
}

/// A placement taken in the scheduler and the transaction that records it.
struct PlannedPlacement {
    name: String,
    before: Vnf,
    next: Vnf,
    /// Cores taken now (released if the transaction loses), not a placement the store kept.
    fresh: bool,
    compares: Vec<Compare>,
    ops: Vec<Op>,
}

/// Tells the receivers of a change counter that what it counts may have changed.
pub(crate) fn bump(sender: &tokio::sync::watch::Sender<u64>) {
    sender.send_modify(|version| *version = version.wrapping_add(1));
}

/// What an agent's assignment of `v` is made of (see `Controller::assignments`): when none of it
/// changes, no agent needs to look again.
#[allow(clippy::type_complexity)]
fn assignment_facts(
    v: &Vnf,
) -> (
    &telvirt_model::VnfDescriptor,
    &[telvirt_model::Placement],
    telvirt_model::DesiredState,
    bool,
    u64,
    &[telvirt_model::DeviceGrant],
    u64,
    bool,
) {
    (
        &v.descriptor,
        &v.placements,
        v.desired,
        v.lock.is_some(),
        v.generation,
        &v.devices,
        v.memory_bytes,
        handing_off(v),
    )
}

/// Whether the source of `v`'s move (a wasm VNF) was asked to freeze and hand its state over.
pub(crate) fn handing_off(v: &Vnf) -> bool {
    v.descriptor.spec.runtime == RuntimeKind::Wasm
        && v.migration.as_ref().is_some_and(|m| m.handoff_at.is_some())
}

/// Writes event `event` of VNF `name` and deletes the one that falls out of the
/// [`records::MAX_EVENTS_PER_VNF`] kept.
pub(crate) fn event_ops(name: &str, event: &Event) -> Result<Vec<Op>> {
    let mut ops = vec![Op::Put {
        key: event_key(name, event.seq),
        value: encode(event)?,
        lease: None,
    }];
    if let Some(old) = event.seq.checked_sub(records::MAX_EVENTS_PER_VNF)
        && old > 0
    {
        ops.push(Op::Delete {
            key: event_key(name, old),
        });
    }
    Ok(ops)
}

/// The put of VNF `name`'s allocation: `placed` for `request`.
pub(crate) fn allocation_op(
    name: &str,
    request: telvirt_sched::VnfRequest,
    placed: &telvirt_sched::Placement,
) -> Result<Op> {
    Ok(Op::Put {
        key: allocation_key(name),
        value: encode(&Allocation {
            request,
            placement: placed.clone(),
        })?,
        lease: None,
    })
}

pub(crate) fn encode<T: serde::Serialize>(value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|e| ControllerError::Corrupt(e.to_string()))
}

pub(crate) fn decode<T: serde::de::DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| ControllerError::Corrupt(format!("{key}: {e}")))
}

fn not_found(name: &str) -> ControllerError {
    ControllerError::NotFound(format!("vnf {name} not found"))
}

/// How many times a read-modify-write is retried when another writer got in between.
pub(crate) const CAS_RETRIES: usize = 16;

pub struct Controller {
    /// The node's components (store, loops, data plane) for `/v1/healthz`.
    health: Arc<crate::health::HealthRegistry>,
    store: Arc<dyn Store>,
    scheduler: Mutex<Scheduler>,
    /// Per host: a counter bumped when an assignment of that host may have changed, so an
    /// observation, or a change on another host, wakes no agent.
    host_versions: std::sync::Mutex<HashMap<String, tokio::sync::watch::Sender<u64>>>,
    /// Wakes the scheduling loop.
    schedule_wanted: Notify,
    metrics: Arc<Metrics>,
    /// Bumped on every change of a stored network: with a host's assignment counter, it makes
    /// that host's network revision (`Controller::host_networks`).
    networks_version: tokio::sync::watch::Sender<u64>,
    /// The wasm security domains an authority may be given (the node's security policy).
    security_domains: std::sync::RwLock<BTreeSet<String>>,
    /// Calls routed to the agents of the hosts VNFs run on (maps, counters, upgrades).
    node_calls: crate::nodecalls::NodeCalls,
    /// Where uploaded modules are kept and how they are verified.
    module_repository: std::sync::OnceLock<crate::modules::ModuleRepository>,
    /// Host liveness: the heartbeat lease TTL and each host's lease.
    liveness: hosts::Liveness,
    /// How long a move may take before it is cancelled.
    move_deadline: std::sync::Mutex<std::time::Duration>,
    /// The VNFs with a move under way, for the host monitor's look at their deadlines
    /// (`Controller::check_moves`).
    pub(crate) moving: migration::MovingSet,
    /// The VNF watches that may be open at once (`crate::vnf_watch`).
    watch_slots: Arc<crate::vnf_watch::WatchSlots>,
    /// The newest generation each (VNF, host) reported, for the ones an apply waits for
    /// (`apply::REPIN_CONFIRM_DEADLINE`); woken by every such report.
    observed: std::sync::Mutex<HashMap<(String, String), u64>>,
    observed_wake: Notify,
}

impl Controller {
    pub(crate) fn store_handle(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub(crate) fn watch_slots(&self) -> &Arc<crate::vnf_watch::WatchSlots> {
        &self.watch_slots
    }

    pub(crate) fn networks_version(&self) -> &tokio::sync::watch::Sender<u64> {
        &self.networks_version
    }

    /// The calls waiting for agents and their replies.
    pub fn node_calls(&self) -> &crate::nodecalls::NodeCalls {
        &self.node_calls
    }

    pub(crate) fn module_repository_cell(
        &self,
    ) -> &std::sync::OnceLock<crate::modules::ModuleRepository> {
        &self.module_repository
    }
}

impl Controller {
    /// A controller over `store`, with the scheduler rebuilt from stored hosts and allocations.
    pub async fn open(store: Arc<dyn Store>, config: SchedConfig) -> Result<Arc<Self>> {
        let mut scheduler = scheduler_with_hosts(store.as_ref(), config).await?;
        hosts::restore_cordons(store.as_ref(), &mut scheduler).await?;
        for (key, v) in store.list(records::ALLOCATIONS).await? {
            let alloc: Allocation = decode(&key, &v.value)?;
            if drop_stale_allocation(store.as_ref(), &key, &alloc, v.mod_revision).await? {
                continue;
            }
            scheduler.restore(&alloc)?;
        }
        rebuild_indexes(store.as_ref()).await?;
        let health = Arc::new(crate::health::HealthRegistry::new());
        health.follow_store(Arc::clone(&store));
        Ok(Arc::new(Self {
            health,
            store,
            scheduler: Mutex::new(scheduler),
            host_versions: std::sync::Mutex::new(HashMap::new()),
            schedule_wanted: Notify::new(),
            metrics: Arc::new(Metrics::default()),
            networks_version: tokio::sync::watch::Sender::new(0),
            node_calls: crate::nodecalls::NodeCalls::default(),
            module_repository: std::sync::OnceLock::new(),
            liveness: hosts::Liveness::default(),
            move_deadline: std::sync::Mutex::new(migration::DEFAULT_MOVE_DEADLINE),
            moving: migration::MovingSet::default(),
            watch_slots: Arc::default(),
            observed: std::sync::Mutex::new(HashMap::new()),
            observed_wake: Notify::new(),
            security_domains: std::sync::RwLock::new(
                crate::auth::DEFAULT_DOMAINS
                    .iter()
                    .map(|d| (*d).to_owned())
                    .collect(),
            ),
        }))
    }

    /// The node's health registry: components report into it, `/v1/healthz` reads it.
    pub fn health(&self) -> &Arc<crate::health::HealthRegistry> {
        &self.health
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// A receiver of `host`'s assignment-change counter: its `changed()` resolves once for
    /// every change (or batch of changes) of that host's assignments after the receiver last
    /// looked.
    pub fn assignments_watch(&self, host: &str) -> tokio::sync::watch::Receiver<u64> {
        self.host_versions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(host.to_owned())
            .or_insert_with(|| tokio::sync::watch::Sender::new(0))
            .subscribe()
    }

    /// Asks the scheduling loop for a pass soon.
    pub(crate) fn wake_scheduler(&self) {
        self.schedule_wanted.notify_one();
    }

    /// Something that may concern every host changed (a host came, went or was cordoned):
    /// wakes the scheduler and every agent.
    fn changed(&self) {
        self.schedule_wanted.notify_one();
        let versions = self.host_versions.lock().unwrap_or_else(|p| p.into_inner());
        versions.values().for_each(bump);
    }

    /// VNF `before` became `after` (`None`: did not exist / was deleted): wakes the scheduler,
    /// the networks' agents when its traffic goes to another host, and the agents of the hosts
    /// whose assignment of it changed (none for a phase report).
    pub(crate) fn vnf_changed(&self, before: Option<&Vnf>, after: Option<&Vnf>) {
        self.schedule_wanted.notify_one();
        self.moving.note(before, after);
        // Its traffic goes to another host (its active placed, moved or gone; a moved guest
        // resumed at its destination, a report that changes no assignment): hosts that hold
        // its networks rewire, those without it too (a spanning chain's other hosts, pinned
        // interfaces).
        if before.and_then(crate::maps::traffic_host) != after.and_then(crate::maps::traffic_host) {
            bump(self.networks_version());
        }
        if before.map(assignment_facts) == after.map(assignment_facts) {
            return;
        }
        let mut hosts: Vec<&str> = before
            .into_iter()
            .chain(after)
            .flat_map(|v| v.placements.iter().map(|p| p.host.as_str()))
            .collect();
        hosts.sort_unstable();
        hosts.dedup();
        let versions = self.host_versions.lock().unwrap_or_else(|p| p.into_inner());
        hosts
            .into_iter()
            .filter_map(|h| versions.get(h))
            .for_each(bump);
    }

    // ----- authorities -----

    /// Sets the security domains of the node's wasm security policy. It must hold the admin's
    /// `operator` domain and the default domain of new authorities.
    pub fn set_security_domains(&self, domains: impl IntoIterator<Item = String>) -> Result<()> {
        let domains: BTreeSet<String> = domains.into_iter().collect();
        for needed in [OPERATOR_DOMAIN, DEFAULT_AUTHORITY_DOMAIN] {
            if !domains.contains(needed) {
                return Err(ControllerError::Invalid(FieldError::new(
                    "domains",
                    format!(
                        "the security policy must define domain `{needed}` (admin's is `{OPERATOR_DOMAIN}`, new authorities default to `{DEFAULT_AUTHORITY_DOMAIN}`); it defines: {}",
                        domains.iter().cloned().collect::<Vec<_>>().join(", ")
                    ),
                )));
            }
        }
        *self
            .security_domains
            .write()
            .unwrap_or_else(|p| p.into_inner()) = domains;
        Ok(())
    }

    /// The domain a create request names, checked against the policy (default when absent).
    fn requested_domain(&self, requested: Option<&str>) -> Result<String> {
        let Some(domain) = requested else {
            return Ok(DEFAULT_AUTHORITY_DOMAIN.to_owned());
        };
        let known = self
            .security_domains
            .read()
            .unwrap_or_else(|p| p.into_inner());
        if known.contains(domain) {
            return Ok(domain.to_owned());
        }
        Err(ControllerError::Invalid(FieldError::new(
            "domain",
            format!(
                "unknown security domain `{domain}`; valid domains: {}",
                known.iter().cloned().collect::<Vec<_>>().join(", ")
            ),
        )))
    }

    /// Makes sure the `admin` authority exists and that `token` (if any) is its token. Returns a
    /// new admin token when it had to make one (first start, or the given token is not admin's).
    pub async fn ensure_admin(&self, token: Option<&str>) -> Result<Option<String>> {
        let key = authority_key(ADMIN_AUTHORITY);
        let existing = match self.store.get(&key).await? {
            Some(v) => Some((decode::<AuthorityRecord>(&key, &v.value)?, v.mod_revision)),
            None => None,
        };
        if let (Some((record, _)), Some(token)) = (&existing, token)
            && auth::hashes_equal(&record.token_sha256, &auth::token_hash(token))
        {
            return Ok(None);
        }
        let token = self
            .write_authority(ADMIN_AUTHORITY, OPERATOR_DOMAIN, existing.as_ref())
            .await?
            .ok_or_else(|| {
                ControllerError::Conflict(
                    "the admin authority changed while it was being set up; try again".into(),
                )
            })?;
        Ok(Some(token))
    }

    /// Gives authority `name` a new token: its record and the token index in one transaction,
    /// dropping the index entry of the token it replaces. `None` when `previous` is stale (or,
    /// for a new authority, when the name is taken).
    async fn write_authority(
        &self,
        name: &str,
        domain: &str,
        previous: Option<&(AuthorityRecord, u64)>,
    ) -> Result<Option<String>> {
        let token = auth::new_token();
        let record = AuthorityRecord {
            name: name.to_owned(),
            token_sha256: auth::token_hash(&token),
            // A new token is not a new authority.
            created_at: previous.map_or_else(now_rfc3339, |(old, _)| old.created_at.clone()),
            domain: Some(domain.to_owned()),
            deleting: false,
        };
        let won = self
            .write_token_holder(
                authority_key(name),
                encode(&record)?,
                (token_key(&record.token_sha256), name),
                previous.map(|(old, rev)| (token_key(&old.token_sha256), *rev)),
            )
            .await?;
        Ok(won.then_some(token))
    }

    /// Writes the record of a token's holder at `key` and the token's index (`index.0` →
    /// `index.1`, the holder's name) in one transaction, replacing the record at revision
    /// `replaced.1` and deleting the replaced token's index `replaced.0` (`None`: a new holder,
    /// the key must not exist). Whether it won the race.
    pub(crate) async fn write_token_holder(
        &self,
        key: String,
        value: Vec<u8>,
        index: (String, &str),
        replaced: Option<(String, u64)>,
    ) -> Result<bool> {
        let mut ops = vec![
            Op::Put {
                key: key.clone(),
                value,
                lease: None,
            },
            Op::Put {
                key: index.0,
                value: index.1.as_bytes().to_vec(),
                lease: None,
            },
        ];
        let revision = match replaced {
            Some((old_index, rev)) => {
                ops.push(Op::Delete { key: old_index });
                rev
            }
            None => 0,
        };
        let compare = Compare::ModRevision { key, revision };
        Ok(self.store.txn(vec![compare], ops).await?.succeeded)
    }

    /// The authority a bearer token belongs to: one lookup of the token's hash.
    pub async fn authenticate(&self, token: &str) -> Result<Caller> {
        if token.starts_with(telvirt_api::NODE_TOKEN_PREFIX) {
            return Err(ControllerError::WrongCredential(
                "a node credential acts only for its host's agent (/v1/agent/...); use an \
                 authority's token"
                    .into(),
            ));
        }
        let key = token_key(&auth::token_hash(token));
        let v = self
            .store
            .get(&key)
            .await?
            .ok_or(ControllerError::Unauthorized)?;
        let name = String::from_utf8(v.value)
            .map_err(|e| ControllerError::Corrupt(format!("{key}: {e}")))?;
        Ok(Caller { name })
    }

    /// Creates an authority in the security domain it names (default: the least privileged).
    /// An unknown domain is refused naming the valid ones, and nothing is written.
    pub async fn create_authority(
        &self,
        caller: &Caller,
        request: &CreateAuthority,
    ) -> Result<AuthorityToken> {
        if !caller.is_admin() {
            return Err(ControllerError::Forbidden(
                "only the admin authority creates authorities".into(),
            ));
        }
        let name = &request.name;
        let domain = self.requested_domain(request.domain.as_deref())?;
        let token = self
            .write_authority(name.as_str(), &domain, None)
            .await?
            .ok_or_else(|| ControllerError::Conflict(format!("authority {name} already exists")))?;
        Ok(AuthorityToken {
            name: name.clone(),
            domain,
            token,
        })
    }

    /// Gives authority `name` a new token (admin for any, an authority for itself); the old
    /// token stops working in the same transaction. Shown once, like a new authority's.
    pub async fn rotate_authority_token(
        &self,
        caller: &Caller,
        name: &str,
    ) -> Result<AuthorityToken> {
        if !caller.is_admin() && caller.name != name {
            return Err(ControllerError::Forbidden(
                "an authority rotates its own token only (admin rotates any)".into(),
            ));
        }
        let (record, revision) = self.authority_record(name).await?;
        if record.deleting {
            return Err(ControllerError::Conflict(format!(
                "authority {name} is being deleted; delete it again to finish"
            )));
        }
        let domain = auth::effective_domain(name, record.domain.as_deref()).to_owned();
        let token = self
            .write_authority(name, &domain, Some(&(record, revision)))
            .await?
            .ok_or_else(|| {
                ControllerError::Conflict(format!(
                    "authority {name} changed while its token was rotated; try again"
                ))
            })?;
        Ok(AuthorityToken {
            name: name
                .parse()
                .map_err(|e| ControllerError::Corrupt(format!("{}: {e}", authority_key(name))))?,
            domain,
            token,
        })
    }

    /// Authority `name`'s record and its revision; 404 when there is none.
    async fn authority_record(&self, name: &str) -> Result<(AuthorityRecord, u64)> {
        let key = authority_key(name);
        let v = self
            .store
            .get(&key)
            .await?
            .ok_or_else(|| ControllerError::NotFound(format!("authority {name} not found")))?;
        Ok((decode(&key, &v.value)?, v.mod_revision))
    }

    /// Deletes authority `name` with its token, its grants and its share of uploaded modules
    /// (admin only; never admin itself). Refused (409) while it owns VNFs or networks, naming
    /// them: delete those first; nothing changes when refused.
    ///
    /// In three steps, so that nothing the authority sent meanwhile outlives it: its record is
    /// marked as being deleted and its token dropped (one transaction; every write on its
    /// behalf compares the record's revision, so none checked before commits after, and none
    /// checks after); then what it owns is read (all it wrote before the mark); then its
    /// modules are let go (a module nobody else uploaded and nothing runs goes) and its record
    /// and grants deleted. A name created again later starts with nothing of the old one's. A
    /// deletion that stopped half way is finished by deleting again.
    pub async fn delete_authority(&self, caller: &Caller, name: &str) -> Result<()> {
        if !caller.is_admin() {
            return Err(ControllerError::Forbidden(
                "only the admin authority deletes authorities".into(),
            ));
        }
        if name == ADMIN_AUTHORITY {
            return Err(ControllerError::Conflict(
                "the admin authority cannot be deleted (rotate its token instead)".into(),
            ));
        }
        let changed = || {
            ControllerError::Conflict(format!(
                "authority {name} changed while it was being deleted; try again"
            ))
        };
        let (mut record, mut revision) = self.authority_record(name).await?;
        if !record.deleting {
            record.deleting = true;
            let marked = self.mark_deleting(&record, revision).await?;
            if !marked.succeeded {
                return Err(changed());
            }
            revision = marked.revision;
        }
        let free = self.owned_by(name).await.and_then(|(owned, running)| {
            if owned.is_empty() {
                return Ok(running);
            }
            Err(ControllerError::Conflict(format!(
                "authority {name} still owns {}; delete them first",
                owned.join(" and ")
            )))
        });
        let running = match free {
            Ok(running) => running,
            Err(refused) => {
                // Standing again as it was, its token with it: nothing changes when refused (a
                // mark an earlier deletion left is taken off too; its token comes back).
                record.deleting = false;
                let _ = self.mark_deleting(&record, revision).await;
                return Err(refused);
            }
        };
        self.forget_module_owner(name, &running).await?;
        let key = authority_key(name);
        let compare = Compare::ModRevision {
            key: key.clone(),
            revision,
        };
        let ops = vec![
            Op::Delete { key },
            Op::Delete {
                key: crate::records::grants_key(name),
            },
        ];
        if !self.store.txn(vec![compare], ops).await?.succeeded {
            return Err(changed());
        }
        Ok(())
    }

    /// What authority `name` owns, as "VNFs a, b" and "networks c" (empty: nothing), and the
    /// modules stored VNFs run (anyone's: the ones its deletion must keep), from one read of
    /// the VNFs.
    async fn owned_by(
        &self,
        name: &str,
    ) -> Result<(Vec<String>, std::collections::BTreeSet<String>)> {
        let mut vnfs = Vec::new();
        let mut running = std::collections::BTreeSet::new();
        for (key, v) in self.store.list(records::VNFS).await? {
            let vnf = decode::<VnfRecord>(&key, &v.value)?.vnf;
            if vnf.owner.as_str() == name {
                vnfs.push(vnf.name.as_str().to_owned());
            }
            if let Some(w) = vnf.descriptor.spec.wasm {
                running.insert(w.module);
            }
        }
        let networks: Vec<String> = self
            .all_networks()
            .await?
            .into_iter()
            .filter(|n| n.owner.as_str() == name)
            .map(|n| n.name.as_str().to_owned())
            .collect();
        let list = |what: &str, names: &[String]| {
            (!names.is_empty()).then(|| format!("{what} {}", names.join(", ")))
        };
        let owned = [list("VNFs", &vnfs), list("networks", &networks)]
            .into_iter()
            .flatten()
            .collect();
        Ok((owned, running))
    }

    /// Writes authority `record` over revision `revision`, its token's index with it: dropped
    /// when the record is marked `deleting`, put back when the mark is taken off.
    async fn mark_deleting(
        &self,
        record: &AuthorityRecord,
        revision: u64,
    ) -> Result<telvirt_store::TxnOutcome> {
        let key = authority_key(&record.name);
        let token = token_key(&record.token_sha256);
        let index = if record.deleting {
            Op::Delete { key: token }
        } else {
            Op::Put {
                key: token,
                value: record.name.as_bytes().to_vec(),
                lease: None,
            }
        };
        let put = Op::Put {
            key: key.clone(),
            value: encode(record)?,
            lease: None,
        };
        Ok(self
            .store
            .txn(
                vec![Compare::ModRevision { key, revision }],
                vec![put, index],
            )
            .await?)
    }

    /// The wasm security domain of authority `name` (as stored; admin: operator).
    pub async fn authority_domain(&self, name: &str) -> Result<String> {
        let key = authority_key(name);
        let stored = match self.store.get(&key).await? {
            Some(v) => decode::<AuthorityRecord>(&key, &v.value)?.domain,
            None => None,
        };
        Ok(auth::effective_domain(name, stored.as_deref()).to_owned())
    }

    pub async fn authorities(&self, caller: &Caller) -> Result<Vec<Authority>> {
        let mut out = Vec::new();
        for (key, v) in self.store.list(records::AUTHORITIES).await? {
            let record: AuthorityRecord = decode(&key, &v.value)?;
            if caller.is_admin() || record.name == caller.name {
                out.push(Authority {
                    name: record
                        .name
                        .parse()
                        .map_err(|e| ControllerError::Corrupt(format!("{key}: {e}")))?,
                    domain: auth::effective_domain(&record.name, record.domain.as_deref())
                        .to_owned(),
                    created_at: record.created_at,
                });
            }
        }
        Ok(out)
    }

    // ----- VNFs -----

    async fn load(&self, name: &str) -> Result<Option<(VnfRecord, u64)>> {
        let key = vnf_key(name);
        match self.store.get(&key).await? {
            Some(v) => Ok(Some((decode(&key, &v.value)?, v.mod_revision))),
            None => Ok(None),
        }
    }

    /// The VNF if `caller` may see it; otherwise the same "not found" as for a missing one.
    async fn load_visible(&self, caller: &Caller, name: &str) -> Result<(VnfRecord, u64)> {
        match self.load(name).await? {
            Some((record, rev)) if caller.may_see(&record.vnf) => Ok((record, rev)),
            _ => Err(not_found(name)),
        }
    }

    pub async fn create_vnf(&self, caller: &Caller, text: &[u8], format: Format) -> Result<Vnf> {
        let descriptor = parse_vnf(text, format)?;
        // Host resources first (403 naming the field), then the module and the budget it sets.
        let grants = self.confining_grants(caller).await?;
        if let Some(g) = &grants {
            crate::access::require_all(&g.grants, &crate::access::vnf_resources(&descriptor))?;
        }
        let memory_bytes = self.checked_budget(caller, &descriptor).await?;
        let name = descriptor.name().clone();
        let owner: Name = caller
            .name
            .parse()
            .map_err(|e| ControllerError::Corrupt(format!("authority name: {e}")))?;
        let now = now_rfc3339();
        let vnf = Vnf {
            machine: None,
            accel: None,
            resume_moved_copy: false,
            moves: 0,
            name: name.clone(),
            owner,
            descriptor,
            desired: DesiredState::Running,
            phase: Phase::Pending,
            reason: Some("waiting for a placement".into()),
            lock: None,
            placements: Vec::new(),
            devices: Vec::new(),
            memory_bytes,
            generation: 1,
            created_at: now.clone(),
            updated_at: now.clone(),
            standby: None,
            replication: None,
            migration: None,
            epoch: 0,
        };
        let event = Event {
            seq: 1,
            vnf: name.clone(),
            at: now,
            from: None,
            to: Phase::Pending,
            reason: format!("created by {}", caller.name),
            actor: caller.name.clone(),
        };
        if self.network_claiming(&vnf).await?.is_some() {
            return Err(ControllerError::Conflict(format!(
                "the name {name} is named by another authority's network (which its VNF of that name left): choose another name"
            )));
        }
        let record = VnfRecord {
            vnf: vnf.clone(),
            last_event: 1,
            deleting: false,
        };
        let outcome = self
            .store
            .txn(
                std::iter::once(Compare::ModRevision {
                    key: vnf_key(name.as_str()),
                    revision: 0,
                })
                .chain(grants.as_ref().map(|g| g.unchanged(&caller.name)))
                .collect(),
                vec![
                    Op::Put {
                        key: vnf_key(name.as_str()),
                        value: encode(&record)?,
                        lease: None,
                    },
                    Op::Put {
                        key: event_key(name.as_str(), 1),
                        value: encode(&event)?,
                        lease: None,
                    },
                    Op::Put {
                        key: records::pending_key(name.as_str()),
                        value: Vec::new(),
                        lease: None,
                    },
                ],
            )
            .await?;
        if !outcome.succeeded {
            if let Some(g) = &grants {
                self.guard_holds(&g.unchanged(&caller.name)).await?;
            }
            return Err(ControllerError::Conflict(format!(
                "the name {name} is already in use; VNF names are unique on this node"
            )));
        }
        self.metrics.event();
        self.vnf_changed(None, Some(&vnf));
        Ok(vnf)
    }

    /// Every VNF `caller` may see, in name order.
    pub async fn vnfs(&self, caller: &Caller) -> Result<Vec<Vnf>> {
        Ok(self
            .vnf_page(caller, &crate::listing::ListQuery::default())
            .await?
            .items)
    }

    /// One page of the VNFs `caller` may see that match the query's selector, in name order,
    /// starting after its continue token. The store is read in key-ordered chunks from the
    /// token, so a page reads about as many records as it returns (more when the selector or
    /// visibility skips some), never the whole list unless asked to. Pages never repeat a VNF,
    /// and every VNF that exists from the first page to the last is on one of them.
    pub async fn vnf_page(
        &self,
        caller: &Caller,
        query: &crate::listing::ListQuery,
    ) -> Result<crate::listing::Page<Vnf>> {
        /// Records read per store call when no smaller page is asked for.
        const CHUNK: usize = 512;
        let want = query.limit.unwrap_or(usize::MAX);
        let mut cursor = query.after.as_ref().map(|n| vnf_key(n.as_str()));
        let mut items: Vec<Vnf> = Vec::new();
        loop {
            // One more than the page, to learn whether another page follows.
            let chunk_len = want.saturating_add(1).min(CHUNK);
            let chunk = self
                .store
                .list_range(records::VNFS, cursor.as_deref(), chunk_len)
                .await?;
            let exhausted = chunk.len() < chunk_len;
            for (key, v) in chunk {
                let record: VnfRecord = decode(&key, &v.value)?;
                cursor = Some(key);
                let vnf = record.vnf;
                if !caller.may_see(&vnf) || !query.selector.matches(&vnf.descriptor.metadata.labels)
                {
                    continue;
                }
                if items.len() == want {
                    let continue_token = items
                        .last()
                        .map(|last| crate::listing::token_after(&last.name));
                    return Ok(crate::listing::Page {
                        items,
                        continue_token,
                    });
                }
                items.push(vnf);
            }
            if exhausted {
                return Ok(crate::listing::Page {
                    items,
                    continue_token: None,
                });
            }
        }
    }

    pub async fn vnf(&self, caller: &Caller, name: &str) -> Result<Vnf> {
        Ok(self.load_visible(caller, name).await?.0.vnf)
    }

    pub async fn events(&self, caller: &Caller, name: &str) -> Result<Vec<Event>> {
        self.load_visible(caller, name).await?;
        let mut out = Vec::new();
        for (key, v) in self.store.list(&records::events_prefix(name)).await? {
            out.push(decode(&key, &v.value)?);
        }
        Ok(out)
    }

    /// Read-modify-write of one VNF record with compare-and-swap, retried on races. `change`
    /// returns the phase transition to record as an event, if any.
    pub(crate) async fn update<F>(&self, name: &str, change: F) -> Result<Vnf>
    where
        F: FnMut(&mut VnfRecord) -> Result<Option<(Phase, String, String)>>,
    {
        self.update_guarded(name, None, change).await
    }

    /// [`Controller::update`] written only while `guard` holds too (the authority and grants a
    /// request was checked against unchanged, [`crate::access::GrantsRead::unchanged`]); when it no longer
    /// holds, nothing is written and the caller is told to send the request again.
    pub(crate) async fn update_guarded<F>(
        &self,
        name: &str,
        guard: Option<Compare>,
        mut change: F,
    ) -> Result<Vnf>
    where
        F: FnMut(&mut VnfRecord) -> Result<Option<(Phase, String, String)>>,
    {
        for _ in 0..CAS_RETRIES {
            let (mut record, rev) = self.load(name).await?.ok_or_else(|| not_found(name))?;
            let before = record.clone();
            let transition = change(&mut record)?;
            if record == before {
                return Ok(record.vnf);
            }
            let now = now_rfc3339();
            record.vnf.updated_at = now.clone();
            let mut ops = Vec::new();
            if let Some((to, reason, actor)) = transition {
                record.last_event += 1;
                let event = Event {
                    seq: record.last_event,
                    vnf: record.vnf.name.clone(),
                    at: now,
                    from: Some(before.vnf.phase),
                    to,
                    reason,
                    actor,
                };
                ops.extend(event_ops(name, &event)?);
            }
            ops.push(Op::Put {
                key: vnf_key(name),
                value: encode(&record)?,
                lease: None,
            });
            ops.extend(pending_op(records::wants_placement(&before), &record));
            let compare = Compare::ModRevision {
                key: vnf_key(name),
                revision: rev,
            };
            let compares = std::iter::once(compare).chain(guard.clone()).collect();
            if self.store.txn(compares, ops).await?.succeeded {
                if record.last_event != before.last_event {
                    self.metrics.event();
                }
                self.vnf_changed(Some(&before.vnf), Some(&record.vnf));
                return Ok(record.vnf);
            }
            if let Some(guard) = &guard {
                self.guard_holds(guard).await?;
            }
        }
        Err(ControllerError::Conflict(format!(
            "vnf {name} kept changing while it was being updated; try again"
        )))
    }

    /// `Ok` while `guard` (an authority's record at the revision a request was checked
    /// against, [`crate::access::GrantsRead::unchanged`]) still holds; otherwise the conflict
    /// to answer (nothing was written).
    pub(crate) async fn guard_holds(&self, guard: &Compare) -> Result<()> {
        let Compare::ModRevision { key, revision } = guard;
        let now = self.store.get(key).await?.map_or(0, |v| v.mod_revision);
        if now == *revision {
            return Ok(());
        }
        Err(ControllerError::Conflict(format!(
            "authority {} (the host resources granted to it, its token or its standing) changed while this request was checked; send it again",
            key.rsplit('/').next().unwrap_or(key)
        )))
    }

    /// Applies an owner's request: refused while locked unless `allowed_when_locked`.
    async fn request<F>(
        &self,
        caller: &Caller,
        name: &str,
        allowed_when_locked: bool,
        change: F,
    ) -> Result<Vnf>
    where
        F: FnMut(&mut Vnf) -> Result<()>,
    {
        self.request_guarded(caller, name, allowed_when_locked, None, change)
            .await
    }

    /// [`Controller::request`] written only while `guard` holds (see
    /// [`Controller::update_guarded`]).
    async fn request_guarded<F>(
        &self,
        caller: &Caller,
        name: &str,
        allowed_when_locked: bool,
        guard: Option<Compare>,
        mut change: F,
    ) -> Result<Vnf>
    where
        F: FnMut(&mut Vnf) -> Result<()>,
    {
        self.load_visible(caller, name).await?;
        self.update_guarded(name, guard, |record| {
            // Read again for the write: the name may have been deleted and taken by another
            // authority since the look above.
            if !caller.may_see(&record.vnf) {
                return Err(not_found(name));
            }
            if let (Some(lock), false) = (&record.vnf.lock, allowed_when_locked) {
                return Err(ControllerError::locked(name, lock));
            }
            if record.deleting {
                return Err(ControllerError::Conflict(format!(
                    "vnf {name} is being deleted"
                )));
            }
            change(&mut record.vnf)?;
            record.vnf.generation += 1;
            Ok(None)
        })
        .await
    }

    pub async fn start(&self, caller: &Caller, name: &str) -> Result<Vnf> {
        self.request(caller, name, false, |vnf| {
            vnf.desired = DesiredState::Running;
            Ok(())
        })
        .await
    }

    pub async fn stop(&self, caller: &Caller, name: &str) -> Result<Vnf> {
        self.request(caller, name, false, |vnf| {
            vnf.desired = DesiredState::Stopped;
            Ok(())
        })
        .await
    }

    pub async fn lock(&self, caller: &Caller, name: &str) -> Result<Vnf> {
        self.request(caller, name, false, |vnf| {
            vnf.lock = Some(LockInfo {
                by: caller
                    .name
                    .parse()
                    .map_err(|e| ControllerError::Corrupt(format!("authority name: {e}")))?,
                at: now_rfc3339(),
            });
            Ok(())
        })
        .await
    }

    pub async fn unlock(&self, caller: &Caller, name: &str) -> Result<Vnf> {
        self.request(caller, name, true, |vnf| {
            if vnf.lock.take().is_none() {
                return Err(ControllerError::Conflict(format!(
                    "vnf {name} is not locked"
                )));
            }
            Ok(())
        })
        .await
    }

    /// Grants a device to a VNF; its agent attaches it to the running instance. Refused while
    /// locked, for a runtime without devices, for a bad grant and for an id already granted.
    pub async fn attach_device(
        &self,
        caller: &Caller,
        name: &str,
        grant: DeviceGrant,
    ) -> Result<Vnf> {
        if let Some(first) = grant.violations().into_iter().next() {
            return Err(ControllerError::Invalid(first));
        }
        let mut guard = None;
        if let Some(g) = self.confining_grants(caller).await?
            && let Some((kind, field, resource)) = crate::access::device_resource(&grant)
        {
            telvirt_model::grant::require(&g.grants, kind, field, &resource)
                .map_err(ControllerError::NotGranted)?;
            guard = Some(g.unchanged(&caller.name));
        }
        self.request_guarded(caller, name, false, guard, |vnf| {
            if vnf.descriptor.spec.runtime != RuntimeKind::Vm {
                return Err(ControllerError::Invalid(FieldError::new(
                    "kind",
                    format!(
                        "vnf {name} runs on the {} runtime, which takes no devices; only vm VNFs do",
                        vnf.descriptor.spec.runtime.as_str()
                    ),
                )));
            }
            if vnf.devices.iter().any(|d| d.id == grant.id) {
                return Err(ControllerError::Conflict(format!(
                    "vnf {name} already has a device with id {}",
                    grant.id
                )));
            }
            if vnf.devices.len() >= telvirt_model::device::MAX_DEVICES {
                return Err(ControllerError::Conflict(format!(
                    "vnf {name} already holds {} devices, the most one VNF may hold",
                    vnf.devices.len()
                )));
            }
            vnf.devices.push(grant.clone());
            Ok(())
        })
        .await
    }

    /// Revokes a granted device; its agent detaches it from the running instance.
    pub async fn detach_device(&self, caller: &Caller, name: &str, id: &str) -> Result<Vnf> {
        self.request(caller, name, false, |vnf| {
            let Some(pos) = vnf.devices.iter().position(|d| d.id.as_str() == id) else {
                let held: Vec<&str> = vnf.devices.iter().map(|d| d.id.as_str()).collect();
                return Err(ControllerError::NotFound(format!(
                    "vnf {name} has no device {id} (granted: {})",
                    if held.is_empty() {
                        "none".to_owned()
                    } else {
                        held.join(", ")
                    }
                )));
            };
            vnf.devices.remove(pos);
            Ok(())
        })
        .await
    }

    /// Deletes a VNF. One that runs nowhere (Pending, Scheduled, Stopped, Failed) goes at once;
    /// a running one is marked for deletion and stopped first, and goes when its agent reports it
    /// stopped ([`Controller::observe`]).
    pub async fn delete(&self, caller: &Caller, name: &str) -> Result<Deletion> {
        let (record, _) = self.load_visible(caller, name).await?;
        let owner = record.vnf.owner.clone();
        if idle(&record.vnf)
            && self
                .remove_when(name, |r| r.vnf.owner == owner && idle(&r.vnf))
                .await?
        {
            return Ok(Deletion::Deleted);
        }
        let vnf = self
            .update(name, |record| {
                // Another VNF of the same name (deleted and created again meanwhile).
                if record.vnf.owner != owner {
                    return Err(not_found(name));
                }
                record.deleting = true;
                record.vnf.desired = DesiredState::Stopped;
                record.vnf.generation += 1;
                Ok(None)
            })
            .await?;
        // It stopped between the two reads: there is nothing left to wait for.
        if idle(&vnf)
            && self
                .remove_when(name, |r| r.vnf.owner == owner && r.deleting && idle(&r.vnf))
                .await?
        {
            return Ok(Deletion::Deleted);
        }
        Ok(Deletion::Pending(Box::new(vnf)))
    }

    /// Removes a VNF marked for deletion (its agent reported it stopped); a VNF already gone is
    /// not an error.
    async fn remove(&self, name: &str) -> Result<()> {
        match self.remove_when(name, |r| r.deleting).await {
            Ok(_) | Err(ControllerError::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Removes a VNF, its events and its allocation in one store transaction conditioned on the
    /// VNF record as read, then frees its cores; all under the scheduler lock, so a scheduling
    /// pass never places a VNF that is being removed. Only while `still` holds on the stored
    /// record: returns false, having changed nothing, when it does not; NotFound when the VNF
    /// is gone.
    async fn remove_when(&self, name: &str, still: impl Fn(&VnfRecord) -> bool) -> Result<bool> {
        let mut scheduler = self.scheduler.lock().await;
        for _ in 0..CAS_RETRIES {
            let (record, rev) = self.load(name).await?.ok_or_else(|| not_found(name))?;
            if !still(&record) {
                return Ok(false);
            }
            let mut ops = vec![
                Op::Delete { key: vnf_key(name) },
                Op::Delete {
                    key: allocation_key(name),
                },
                Op::Delete {
                    key: records::pending_key(name),
                },
            ];
            for host in records::placed_hosts(&record) {
                ops.push(Op::Delete {
                    key: records::assignment_key(&host, name),
                });
            }
            // Events are only written together with their VNF record, so the condition on the
            // record's revision also guarantees this list is complete.
            for (key, _) in self.store.list(&records::events_prefix(name)).await? {
                ops.push(Op::Delete { key });
            }
            let compare = Compare::ModRevision {
                key: vnf_key(name),
                revision: rev,
            };
            if !self.store.txn(vec![compare], ops).await?.succeeded {
                continue;
            }
            match scheduler.release(name) {
                Ok(_) | Err(SchedError::UnknownVnf(_)) => {}
                Err(e) => return Err(e.into()),
            }
            drop(scheduler);
            self.vnf_changed(Some(&record.vnf), None);
            return Ok(true);
        }
        Err(ControllerError::Conflict(format!(
            "vnf {name} kept changing while it was being deleted; try again"
        )))
    }

    // ----- history -----

    /// Runs until the process ends: every `every`, compacts the store's history up to the
    /// revision it had one interval before (see [`Controller::compact_history`]).
    pub async fn history_compactor(self: Arc<Self>, every: Duration) {
        let mut previous = None;
        loop {
            tokio::time::sleep(every).await;
            match self.compact_history(previous).await {
                Ok(now) => previous = Some(now),
                Err(e) => tracing::warn!("compacting the store's history: {e}"),
            }
        }
    }

    /// Compacts the store's history up to `previous` (the revision the last call answered, so
    /// a watcher always has at least one interval to catch up, as Kubernetes' API server does
    /// every 5 minutes; nothing on the first call) and answers the revision now. etcd keeps
    /// every revision of every key until compacted; the embedded store keeps none.
    pub async fn compact_history(&self, previous: Option<u64>) -> Result<u64> {
        let now = self.store.current_revision().await?;
        if let Some(revision) = previous {
            self.store.compact(revision).await?;
        }
        Ok(now)
    }

    // ----- scheduling -----

    /// Runs until the process ends: places pending VNFs when woken, and retries every `retry`.
    /// After a pass that failed, the next waits [`FAILED_PASS_PAUSE`] (or `retry`, when
    /// shorter) whatever wakes it: a store that keeps refusing a write, whose refusal asks for
    /// a pass again at once, would otherwise keep a core busy with passes.
    pub async fn scheduling_loop(self: Arc<Self>, retry: Duration) {
        loop {
            if let Err(e) = self.schedule_pending().await {
                tracing::warn!("scheduling pass failed: {e}");
                tokio::time::sleep(FAILED_PASS_PAUSE.min(retry)).await;
                continue;
            }
            let _ = tokio::time::timeout(retry, self.schedule_wanted.notified()).await;
        }
    }

    /// Places every Pending VNF it can; records why for those it cannot. Reads only the pending
    /// index (`/pending/`), never every VNF; the index is only a hint: each VNF is read again
    /// under the scheduler lock before it is placed. VNFs are placed [`PLACE_BATCH`] at a time
    /// under one hold of the lock, their transactions sent together so the store commits them
    /// as one group; one that lost a race is placed again on its own.
    pub async fn schedule_pending(&self) -> Result<()> {
        let names: Vec<String> = self
            .store
            .list(records::PENDING)
            .await?
            .into_iter()
            .filter_map(|(key, _)| key.strip_prefix(records::PENDING).map(str::to_owned))
            .collect();
        // A batch the store failed does not stop the pass: the VNFs after it are placed, and
        // the first error is reported at the end (the failed ones wait for the next pass). One
        // VNF whose write the store keeps refusing would otherwise keep every later one Pending.
        let mut first_error = None;
        for batch in names.chunks(PLACE_BATCH) {
            let lost = match self.schedule_batch(batch).await {
                Ok(lost) => lost,
                Err(e) => {
                    first_error.get_or_insert(e);
                    continue;
                }
            };
            for name in lost {
                match self.schedule_one(&name).await {
                    // Deleted meanwhile, or changing too fast: the next pass sees it as it is then.
                    Ok(()) | Err(ControllerError::NotFound(_) | ControllerError::Conflict(_)) => {}
                    Err(e) => {
                        first_error.get_or_insert(e);
                    }
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Plans the placement of every VNF of `names` under one hold of the scheduler lock and
    /// commits them together (each its own conditional transaction). Returns the VNFs whose
    /// transaction lost a race (their cores are released).
    async fn schedule_batch(&self, names: &[String]) -> Result<Vec<String>> {
        let mut scheduler = self.scheduler.lock().await;
        let mut planned = Vec::new();
        let mut unplaceable = Vec::new();
        for name in names {
            match self.plan_placement(&mut scheduler, name).await? {
                Plan::Nothing => {}
                Plan::Unplaceable(why) => unplaceable.push((name.clone(), why)),
                Plan::Place(p) => planned.push(p),
            }
        }
        let mut commits = tokio::task::JoinSet::new();
        for (i, p) in planned.iter_mut().enumerate() {
            let store = Arc::clone(&self.store);
            let (compares, ops) = (std::mem::take(&mut p.compares), std::mem::take(&mut p.ops));
            commits.spawn(async move { (i, store.txn(compares, ops).await) });
        }
        let mut outcomes: Vec<Option<Result<TxnOutcome, StoreError>>> =
            (0..planned.len()).map(|_| None).collect();
        while let Some(done) = commits.join_next().await {
            let (i, outcome) =
                done.map_err(|e| ControllerError::Unavailable(format!("a placement commit: {e}")))?;
            outcomes[i] = Some(outcome);
        }
        let mut lost = Vec::new();
        let mut failed = None;
        let mut unanswered = Vec::new();
        for (p, outcome) in planned.iter().zip(outcomes) {
            match outcome {
                Some(Ok(o)) if o.succeeded => {
                    self.metrics.placement(&p.before.updated_at);
                    self.metrics.event();
                    self.vnf_changed(Some(&p.before), Some(&p.next));
                }
                // The VNF changed in between: nothing was written (see `after_lost_race`).
                Some(Ok(_)) => {
                    self.after_lost_race(&mut scheduler, &p.name, p.fresh)
                        .await?;
                    lost.push(p.name.clone());
                }
                // The store did not say: the cores stay held (see `after_unanswered_commits`).
                Some(Err(e)) => {
                    unanswered.push(p.as_ref());
                    failed.get_or_insert(e);
                }
                None => {
                    self.after_lost_race(&mut scheduler, &p.name, p.fresh)
                        .await?;
                    lost.push(p.name.clone());
                }
            }
        }
        drop(scheduler);
        self.after_unanswered_commits(&unanswered).await;
        if let Some(e) = failed {
            return Err(e.into());
        }
        for (name, why) in unplaceable {
            match self.note_unplaceable(&name, why).await {
                Ok(()) | Err(ControllerError::NotFound(_) | ControllerError::Conflict(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(lost)
    }

    /// Places VNF `name` if it is still Pending. The allocation, the VNF's placements, phase
    /// Scheduled and its event are one store transaction conditioned on the VNF record (and the
    /// allocation key) as read under the scheduler lock; when the VNF changed or went in
    /// between, the transaction changes nothing and the cores it was given are released. The
    /// lock is held from placing until that transaction is decided, so a delete (which removes
    /// and releases under the same lock) never interleaves with it.
    async fn schedule_one(&self, name: &str) -> Result<()> {
        for _ in 0..CAS_RETRIES {
            let mut scheduler = self.scheduler.lock().await;
            let mut p = match self.plan_placement(&mut scheduler, name).await? {
                Plan::Nothing => return Ok(()),
                Plan::Unplaceable(why) => {
                    drop(scheduler);
                    return self.note_unplaceable(name, why).await;
                }
                Plan::Place(p) => p,
            };
            let outcome = self
                .store
                .txn(std::mem::take(&mut p.compares), std::mem::take(&mut p.ops))
                .await;
            match outcome {
                Ok(o) if o.succeeded => {
                    drop(scheduler);
                    self.metrics.placement(&p.before.updated_at);
                    self.metrics.event();
                    self.vnf_changed(Some(&p.before), Some(&p.next));
                    return Ok(());
                }
                // The VNF changed in between: nothing was written (see `after_lost_race`).
                // Then the VNF is read again.
                Ok(_) => self.after_lost_race(&mut scheduler, name, p.fresh).await?,
                Err(e) => {
                    drop(scheduler);
                    self.after_unanswered_commits(&[p.as_ref()]).await;
                    return Err(e.into());
                }
            }
        }
        Err(ControllerError::Conflict(format!(
            "vnf {name} kept changing while it was being placed"
        )))
    }

    /// After the store answered the transactions of `placed` with an error (a timeout, a
    /// connection lost): each may have been applied all the same. Their cores stay held (the
    /// caller did not release them): released while the store holds them for their VNF, they
    /// could be given to another (two VNFs on one core). Nothing is lost by holding them: a
    /// VNF still Pending has them reused or released by its next placement, a deleted one by
    /// its deletion. Called without the scheduler lock (a store that does not answer would
    /// hold it for its timeout per read). A VNF that reads back placed as planned had its
    /// transaction applied: its agents are told now, as after any placement, rather than at
    /// their next re-list. Any other answer asks for a scheduling pass soon; the first read
    /// that fails ends the look (the store is not answering).
    async fn after_unanswered_commits(&self, placed: &[&PlannedPlacement]) {
        for p in placed {
            match self.load(&p.name).await {
                Ok(Some((record, _)))
                    if record.vnf.phase != Phase::Pending
                        && record.vnf.placements == p.next.placements =>
                {
                    tracing::info!(vnf = %p.name, "its placement was stored although the store answered with an error");
                    self.metrics.placement(&p.before.updated_at);
                    self.metrics.event();
                    self.vnf_changed(Some(&p.before), Some(&p.next));
                }
                Ok(_) => self.schedule_wanted.notify_one(),
                Err(e) => {
                    tracing::warn!(vnf = %p.name, "cannot tell whether its placement was stored: {e}; its agents learn it at their next re-list");
                    self.schedule_wanted.notify_one();
                    return;
                }
            }
        }
    }

    /// Under the scheduler lock: what placing VNF `name` takes. A VNF gone or no longer
    /// waiting has its pending entry dropped (nothing to do); one that fits nowhere comes back
    /// with the scheduler's reason; otherwise its cores are taken (or a placement the store
    /// kept is reused) and the transaction that records them is built, not sent.
    async fn plan_placement(&self, scheduler: &mut Scheduler, name: &str) -> Result<Plan> {
        let Some((record, rev)) = self.load(name).await? else {
            self.drop_pending_entry(name, 0).await?;
            return Ok(Plan::Nothing);
        };
        if !records::wants_placement(&record) {
            self.hold_stored_allocation(scheduler, name).await;
            self.drop_pending_entry(name, rev).await?;
            return Ok(Plan::Nothing);
        }
        let request = placement::vnf_request(&record.vnf);
        let (kept, alloc_rev) = self.reusable_placement(scheduler, name, &request).await?;
        let fresh = kept.is_none();
        let placed = match kept {
            Some(p) => p,
            None => match scheduler.place(&request) {
                Ok(p) => p,
                Err(e) => return Ok(Plan::Unplaceable(e.to_string())),
            },
        };
        let placements = placement::placements(&placed, &record.vnf.descriptor);
        let hosts: Vec<String> = placements
            .iter()
            .map(|p| format!("{:?} on {} cpus {:?}", p.role, p.host, p.cpus()))
            .collect();
        let reason = format!("placed: {}", hosts.join("; ")).to_lowercase();
        let alloc = Allocation {
            request,
            placement: placed,
        };
        let mut next = record.clone();
        next.vnf.placements = placements;
        next.vnf.phase = Phase::Scheduled;
        next.vnf.reason = Some(reason.clone());
        let built = (|| -> Result<Vec<Op>> {
            let mut ops = transition_ops(&mut next, Phase::Pending, &reason, "scheduler")?;
            ops.push(Op::Put {
                key: allocation_key(name),
                value: encode(&alloc)?,
                lease: None,
            });
            Ok(ops)
        })();
        let mut ops = match built {
            Ok(ops) => ops,
            Err(e) => {
                if fresh {
                    scheduler.release(name)?;
                }
                return Err(e);
            }
        };
        let compares = placement_commit(&mut ops, None, &next, rev, alloc_rev);
        Ok(Plan::Place(Box::new(PlannedPlacement {
            name: name.to_owned(),
            before: record.vnf,
            next: next.vnf,
            fresh,
            compares,
            ops,
        })))
    }

    /// The allocation the store holds for VNF `name`, if any.
    pub(crate) async fn stored_allocation(&self, name: &str) -> Result<Option<Allocation>> {
        let key = allocation_key(name);
        self.store
            .get(&key)
            .await?
            .map(|v| decode::<Allocation>(&key, &v.value))
            .transpose()
    }

    /// Under the scheduler lock, for VNF `name` found placed by a scheduling pass: the cores
    /// its stored allocation names are held, should the scheduler not hold them. That happens
    /// when a placement's transaction was applied late, after the store had answered it with
    /// an error and its VNF had been planned again: the second plan released the cores, and
    /// its own commit lost to the late one. Held again, they are not given to another VNF;
    /// cores another VNF took meanwhile are logged (the consistency check shows them).
    async fn hold_stored_allocation(&self, scheduler: &mut Scheduler, name: &str) {
        if scheduler.placement(name).is_ok() {
            return;
        }
        let held = match self.stored_allocation(name).await {
            Ok(Some(alloc)) => scheduler.restore(&alloc).map_err(ControllerError::from),
            Ok(None) => return,
            Err(e @ ControllerError::Corrupt(_)) => Err(e),
            Err(e) => {
                tracing::warn!(vnf = %name, "cannot read its stored placement to hold its cores: {e}");
                return;
            }
        };
        match held {
            Ok(()) => {
                tracing::warn!(vnf = %name, "its stored placement's cores were not held by the scheduler; held again")
            }
            Err(e) => {
                tracing::error!(vnf = %name, "its stored placement's cores are not held and cannot be: {e}")
            }
        }
    }

    /// Under the scheduler lock, after VNF `name`'s placement transaction lost its race
    /// (nothing of it written): cores placed now (`fresh`) go back; a placement reused from
    /// the store stays, as the store still holds it. Should what won be a placement of the VNF
    /// (a transaction of its own applied late, after the store had answered it with an
    /// error), the cores the store holds for it are held again before the lock is let go:
    /// nothing else may be given them in between.
    async fn after_lost_race(
        &self,
        scheduler: &mut Scheduler,
        name: &str,
        fresh: bool,
    ) -> Result<()> {
        if fresh {
            scheduler.release(name)?;
        }
        match self.load(name).await {
            Ok(Some((record, _))) if !records::wants_placement(&record) => {
                self.hold_stored_allocation(scheduler, name).await;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(vnf = %name, "cannot read it again after its placement lost a race: {e}");
            }
        }
        Ok(())
    }

    /// Deletes the pending index entry of VNF `name`, which does not wait for a placement as
    /// read at revision `rev` (0: absent), conditioned on the VNF still being so; an entry only
    /// a store from before the index, or a crash of an older version, can leave behind.
    async fn drop_pending_entry(&self, name: &str, rev: u64) -> Result<()> {
        let key = records::pending_key(name);
        if self.store.get(&key).await?.is_none() {
            return Ok(());
        }
        let compare = Compare::ModRevision {
            key: vnf_key(name),
            revision: rev,
        };
        self.store
            .txn(vec![compare], vec![Op::Delete { key }])
            .await?;
        Ok(())
    }

    /// The placement VNF `name` already holds, if it was made for `request` (the same ask by
    /// the same owner): a crash between writing an allocation and marking its VNF Scheduled
    /// (before allocations and VNFs were written together) leaves one, which restore() read
    /// back. Any other allocation of that name, stored or in memory, is stale (made for an older
    /// VNF of the same name, or another ask): it is deleted from the store and released. Called
    /// under the scheduler lock. Returns the reusable placement and the revision of the
    /// allocation key (0: none stored).
    async fn reusable_placement(
        &self,
        scheduler: &mut Scheduler,
        name: &str,
        request: &telvirt_sched::VnfRequest,
    ) -> Result<(Option<telvirt_sched::Placement>, u64)> {
        let key = allocation_key(name);
        let stored = self.store.get(&key).await?;
        let held = scheduler.placement(name).ok();
        if let (Some(v), Some(p)) = (&stored, &held)
            && let Ok(alloc) = serde_json::from_slice::<Allocation>(&v.value)
            && alloc.request == *request
            && alloc.placement == *p
        {
            return Ok((Some(p.clone()), v.mod_revision));
        }
        if let Some(v) = &stored {
            let compare = Compare::ModRevision {
                key: key.clone(),
                revision: v.mod_revision,
            };
            let op = Op::Delete { key: key.clone() };
            if !self.store.txn(vec![compare], vec![op]).await?.succeeded {
                return Err(ControllerError::Conflict(format!(
                    "the allocation of vnf {name} changed while it was being dropped"
                )));
            }
            tracing::info!("dropped the allocation of vnf {name}: it was made for another request");
        }
        if held.is_some() {
            scheduler.release(name)?;
        }
        Ok((None, 0))
    }

    /// Records why VNF `name` cannot be placed now (once per distinct reason).
    async fn note_unplaceable(&self, name: &str, reason: String) -> Result<()> {
        self.update(name, |record| {
            if record.vnf.phase != Phase::Pending
                || record.vnf.reason.as_deref() == Some(reason.as_str())
            {
                return Ok(None);
            }
            record.vnf.reason = Some(reason.clone());
            Ok(Some((Phase::Pending, reason.clone(), "scheduler".into())))
        })
        .await
        .map(|_| ())
    }

    // ----- hosts: see hosts.rs -----

    // ----- agents -----

    /// What the agent of `host` should run.
    pub async fn assignments(&self, host: &str) -> Result<Vec<Assignment>> {
        // Reads the host's assignment index and each VNF it names, not every VNF; and the
        // records of those VNFs' owners, not every authority.
        let prefix = records::assignments_prefix(host);
        let mut domains: BTreeMap<String, String> = BTreeMap::new();
        let mut tunnels: BTreeMap<String, Option<String>> = BTreeMap::new();
        // The cluster's replication secret, read once per call when a stream needs a key
        // (never kept longer: another controller may have rotated it).
        let mut secret: Option<ring::hmac::Key> = None;
        // The machine types of this host's QEMU, read once when a vm needs them.
        let mut host_machines: Option<Vec<String>> = None;
        let mut out = Vec::new();
        for (key, _) in self.store.list(&prefix).await? {
            let Some(name) = key.strip_prefix(prefix.as_str()) else {
                continue;
            };
            // Another host's entry whose name extends this one's with a '/'.
            if name.contains('/') {
                continue;
            }
            let Some((record, rev)) = self.load(name).await? else {
                self.drop_assignment_entry(&key, name, 0).await?;
                continue;
            };
            let vnf = record.vnf;
            let Some(p) = placement::placement_on(&vnf, host) else {
                // Its placement here was cleared (a drain, a stale placement healed).
                self.drop_assignment_entry(&key, name, rev).await?;
                continue;
            };
            if vnf.phase == Phase::Pending {
                continue;
            }
            let owner = vnf.owner.as_str();
            if !domains.contains_key(owner) {
                let domain = match self.store.get(&authority_key(owner)).await? {
                    Some(v) => {
                        let a: AuthorityRecord = decode(&authority_key(owner), &v.value)?;
                        auth::effective_domain(&a.name, a.domain.as_deref()).to_owned()
                    }
                    // An owner without a record (none can be deleted today) gets the least
                    // privileged domain, never more.
                    None => DEFAULT_AUTHORITY_DOMAIN.to_owned(),
                };
                domains.insert(owner.to_owned(), domain);
            }
            // The active of a wasm pair streams its maps to its standby's host, the source of
            // a vm's move its guest to the destination (each host's tunnel address read once
            // per call).
            let vm_move = vnf
                .migration
                .as_ref()
                .filter(|_| vnf.descriptor.spec.runtime == RuntimeKind::Vm);
            let standby_host = vnf
                .placements
                .iter()
                .find(|s| s.role == telvirt_model::Role::Standby)
                .map(|s| s.host.clone())
                .filter(|s| {
                    p.role == telvirt_model::Role::Active
                        && match vnf.descriptor.spec.runtime {
                            RuntimeKind::Wasm => true,
                            RuntimeKind::Vm => vm_move.is_some_and(|m| m.to == *s),
                        }
                });
            // The destination of a vm's move waits for its guest instead of booting one.
            let incoming_from = vm_move
                .filter(|m| m.to == host && p.role == telvirt_model::Role::Standby)
                .map(|m| m.from.clone());
            let standby = match standby_host {
                Some(h) => self
                    .stream_end(&mut tunnels, &mut secret, &vnf, &h, host, &h)
                    .await?
                    .map(|(address, key, move_id)| StandbyPeer {
                        host: h,
                        address,
                        key,
                        move_id,
                    }),
                None => None,
            };
            // A standby takes its state only from its active's host.
            let active_host = vnf
                .placements
                .iter()
                .find(|a| a.role == telvirt_model::Role::Active)
                .map(|a| a.host.clone())
                .filter(|_| p.role == telvirt_model::Role::Standby);
            let (active_from, active_key) = match active_host {
                Some(h) => self
                    .stream_end(&mut tunnels, &mut secret, &vnf, &h, &h, host)
                    .await?
                    .map(|(address, key, _)| (address, key))
                    .unzip(),
                None => (None, None),
            };
            let mut descriptor = vnf.descriptor.clone();
            // The move whose destination this host is.
            let move_here = vnf.migration.as_ref().filter(|m| m.to == host);
            // A vm keeps the machine type it runs on: a move's destination takes in the guest
            // on the same hardware (the move was checked against this host's types), and a
            // start here keeps it unless the descriptor names one or this host's QEMU lacks it
            // (a VNF healed onto such a host boots on its newest type rather than not at all;
            // a host whose agent reports no types is not sent the field).
            if let (Some(vm), Some(machine)) = (descriptor.spec.vm.as_mut(), &vnf.machine) {
                let pin = if move_here.is_some() {
                    true
                } else if vm.machine.is_none() {
                    if host_machines.is_none() {
                        host_machines = Some(
                            self.agent_host(host)
                                .await?
                                .map(|h| h.qemu_machines)
                                .unwrap_or_default(),
                        );
                    }
                    host_machines
                        .as_deref()
                        .unwrap_or_default()
                        .contains(machine)
                } else {
                    false
                };
                if pin {
                    vm.machine = Some(machine.clone());
                }
            }
            // A move's destination runs the guest with its source's accelerator: the stream
            // carries a CPU of that accelerator's model (the move was checked against this
            // host's accelerator where it is known; where not, its agent refuses a KVM guest
            // it cannot run, and the move fails with the guest still at its source).
            if move_here.is_some()
                && let (Some(vm), Some(accel)) = (descriptor.spec.vm.as_mut(), vnf.accel)
                && vm.accel.is_none()
            {
                vm.accel = Some(accel);
            }
            // The destination of a move that changes the engine runs the module on the new one.
            if let Some(m) = move_here
                && let (Some(e), Some(w)) = (m.engine, descriptor.spec.wasm.as_mut())
            {
                w.engine = e;
            }
            out.push(Assignment {
                vnf: vnf.name.clone(),
                descriptor,
                placement: p.clone(),
                desired: vnf.desired,
                locked: vnf.lock.is_some(),
                memory_bytes: vnf.memory_bytes,
                generation: vnf.generation,
                devices: vnf.devices.clone(),
                domain: domains
                    .get(owner)
                    .cloned()
                    .unwrap_or_else(|| DEFAULT_AUTHORITY_DOMAIN.to_owned()),
                hand_off: p.role == telvirt_model::Role::Active
                    && standby.is_some()
                    && handing_off(&vnf),
                resume_moved_copy: p.role == telvirt_model::Role::Active
                    && standby.is_none()
                    && vnf.resume_moved_copy,
                standby,
                epoch: vnf.epoch,
                incoming_from,
                active_from,
                active_key,
            });
        }
        Ok(out)
    }

    /// For `vnf`'s stream from host `from` to host `to`, one of which is `peer`: `peer`'s
    /// tunnel address, the stream's key and its move (a move's destination: its stream serves
    /// that move alone; 0 for a pair's); `None` while `peer` has no tunnel address. `secret`
    /// keeps the cluster's replication secret once read.
    async fn stream_end(
        &self,
        tunnels: &mut BTreeMap<String, Option<String>>,
        secret: &mut Option<ring::hmac::Key>,
        vnf: &telvirt_model::Vnf,
        peer: &str,
        from: &str,
        to: &str,
    ) -> Result<Option<(String, telvirt_model::api::PairKey, u64)>> {
        let Some(address) = self.tunnel_of(tunnels, peer).await? else {
            return Ok(None);
        };
        let move_id = vnf
            .migration
            .as_ref()
            .filter(|m| m.to == to)
            .map_or(0, |m| m.id);
        let secret = match secret {
            Some(secret) => secret,
            None => secret.insert(pair_keys::cluster_secret(&self.store).await?),
        };
        let key = pair_keys::stream_key(secret, vnf.name.as_str(), from, to, move_id);
        Ok(Some((address, key, move_id)))
    }

    /// Gives the cluster a new replication secret (admin only; ADR 066's addendum): every
    /// stream between two hosts gets a new key, which both its agents take at their next read
    /// of the assignments (woken now) on the connection they hold. Refused while a move is
    /// under way, whose stream would fail part way; nothing changes then.
    pub async fn rotate_replication_secret(
        &self,
        caller: &Caller,
    ) -> Result<telvirt_model::api::SecretRotation> {
        self.admin_only(caller, "may rotate the replication secret")?;
        // Held as a move's start holds it: no move begins between the check and the new secret.
        let _moves = self.scheduler.lock().await;
        let vnfs = self.all_vnfs().await?;
        let moving: Vec<String> = vnfs
            .values()
            .filter_map(|v| {
                let m = v.migration.as_ref()?;
                Some(format!("{} ({} -> {})", v.name, m.from, m.to))
            })
            .collect();
        if !moving.is_empty() {
            return Err(ControllerError::Conflict(format!(
                "moves under way would lose their streams: {}; rotate the replication secret once they end (or `telvirt vnf migrate NAME --cancel` them)",
                moving.join(", ")
            )));
        }
        pair_keys::rotate_secret(&self.store).await?;
        tracing::info!(by = %caller.name, "the cluster's replication secret was rotated");
        // Every agent reads its assignments, and so its streams' keys, again.
        self.changed();
        // A wasm VNF with a standby streams its state (a vm's standby is a move's, refused
        // above).
        let streams = vnfs
            .values()
            .filter(|v| {
                v.descriptor.spec.runtime == RuntimeKind::Wasm
                    && v.placements
                        .iter()
                        .any(|p| p.role == telvirt_model::Role::Standby)
            })
            .map(|v| v.name.as_str().to_owned())
            .collect();
        Ok(telvirt_model::api::SecretRotation { streams })
    }

    /// The tunnel address of `host`'s agent, read once per call of [`Controller::assignments`]
    /// (`tunnels` keeps what was read).
    async fn tunnel_of(
        &self,
        tunnels: &mut BTreeMap<String, Option<String>>,
        host: &str,
    ) -> Result<Option<String>> {
        if !tunnels.contains_key(host) {
            let tunnel = self.agent_host(host).await?.and_then(|r| r.tunnel);
            tunnels.insert(host.to_owned(), tunnel);
        }
        Ok(tunnels.get(host).cloned().flatten())
    }

    /// Deletes the assignment index entry `key` of VNF `name`, which is not placed on that host
    /// as read at revision `rev` (0: absent), conditioned on the VNF still being so.
    async fn drop_assignment_entry(&self, key: &str, name: &str, rev: u64) -> Result<()> {
        let compare = Compare::ModRevision {
            key: vnf_key(name),
            revision: rev,
        };
        let op = Op::Delete {
            key: key.to_owned(),
        };
        self.store.txn(vec![compare], vec![op]).await?;
        Ok(())
    }

    /// Starts keeping the generations the agents of `hosts` report for VNF `name`, for
    /// [`Controller::wait_observed`] (which stops it).
    pub(crate) fn expect_observations(&self, name: &str, hosts: &[String]) {
        if let Ok(mut seen) = self.observed.lock() {
            for h in hosts {
                seen.insert((name.to_owned(), h.clone()), 0);
            }
        }
    }

    /// Waits until the agent of every host in `hosts` reported generation `generation` or a
    /// newer one of VNF `name`, at most `deadline`; whether they all did. Then stops keeping
    /// the reports.
    pub(crate) async fn wait_observed(
        &self,
        name: &str,
        hosts: &[String],
        generation: u64,
        deadline: Duration,
    ) -> bool {
        let until = tokio::time::Instant::now() + deadline;
        let all_seen = || {
            self.observed.lock().is_ok_and(|seen| {
                hosts.iter().all(|h| {
                    seen.get(&(name.to_owned(), h.clone()))
                        .is_some_and(|g| *g >= generation)
                })
            })
        };
        let confirmed = loop {
            let woken = self.observed_wake.notified();
            if all_seen() {
                break true;
            }
            if tokio::time::timeout_at(until, woken).await.is_err() {
                break all_seen();
            }
        };
        self.forget_observations(name, hosts);
        confirmed
    }

    /// Stops keeping what [`Controller::expect_observations`] started keeping.
    pub(crate) fn forget_observations(&self, name: &str, hosts: &[String]) {
        if let Ok(mut seen) = self.observed.lock() {
            for h in hosts {
                seen.remove(&(name.to_owned(), h.clone()));
            }
        }
    }

    /// Records what an agent observed. Observed reality is recorded even when it skips a step.
    pub async fn observe(&self, host: &str, obs: Observation) -> Result<()> {
        let name = obs.vnf.to_string();
        let expected = self.observed.lock().is_ok_and(|mut seen| {
            seen.get_mut(&(name.clone(), host.to_owned()))
                .map(|g| *g = (*g).max(obs.generation))
                .is_some()
        });
        if expected {
            self.observed_wake.notify_waiters();
        }
        let mut remove = false;
        let mut active_failed = false;
        let mut active_lost = None;
        // The host of the active, as the record read for this report says (a standby's).
        let mut active_host = None;
        let mut migrating = false;
        // A vm move's commit point (its source's stream waits at its final copy) is recorded
        // under the scheduler lock, which a cancel, the move's deadline and the healer hold
        // from their look at the record to their write: the commit and an end of the move
        // never both happen. The source lets the final copy through only once it has read
        // that the move stands.
        let commit_point = migration::at_commit_point(obs.replication.as_ref());
        let serialized = if commit_point {
            Some(self.scheduler.lock().await)
        } else {
            None
        };
        let result = self
            .update(&name, |record| {
                let vnf = &mut record.vnf;
                let Some(role) = placement::placement_on(vnf, host).map(|p| p.role) else {
                    return Ok(None);
                };
                migrating = vnf.migration.is_some();
                if role == telvirt_model::Role::Standby {
                    // A move's destination says when it resumed the guest that arrived: only
                    // past the commit point (a guest resumes there only after its final copy;
                    // a stamp before is no arrival of this move's). The first time, before the
                    // guest answered, the VNF's traffic goes there (`traffic_host`): an event.
                    let mut resumed = None;
                    if let (Some(at), Some(m)) = (
                        obs.resumed_at_us,
                        vnf.migration
                            .as_mut()
                            .filter(|m| m.to == host && m.committed_at.is_some()),
                    ) {
                        if m.resumed_at_us.is_none() && obs.phase != Phase::Running {
                            resumed = Some(format!(
                                "its guest resumed on host {host}: its traffic goes there; the move switches once the guest answers"
                            ));
                        }
                        m.resumed_at_us = Some(at);
                    }
                    active_lost.clone_from(&obs.active_lost);
                    let before = vnf
                        .standby
                        .as_ref()
                        .filter(|s| s.host == host)
                        .and_then(|s| s.active_lost.clone());
                    // The standby's own status: the VNF's phase is its active instance's.
                    vnf.standby = Some(InstanceStatus {
                        host: host.to_owned(),
                        phase: obs.phase,
                        reason: obs.reason.clone(),
                        active_lost: obs.active_lost.clone(),
                        arrival_failed: obs.arrival_failed,
                    });
                    // Losing its active, and hearing it again, are events (the phase stays).
                    active_host = crate::maps::active_host(vnf);
                    let active = active_host.clone().unwrap_or_default();
                    let event = match (&before, &obs.active_lost) {
                        (None, Some(lost)) => Some(format!(
                            "the standby on {host} lost its active on {active}: {}",
                            lost.why
                        )),
                        (Some(_), None) => Some(format!(
                            "the standby on {host} hears its active on {active} again"
                        )),
                        _ => resumed,
                    };
                    return Ok(event.map(|e| (vnf.phase, e, format!("agent/{host}"))));
                }
                // A report of another move's stream (one cancelled, its report late) is not
                // this move's: the move's own report stays until its stream reports again.
                let other_move = obs.replication.as_ref().is_some_and(|r| {
                    r.move_id != 0 && vnf.migration.as_ref().is_some_and(|m| !r.serves(m))
                });
                // Nor is one that left before the failure recorded for its stream (a commit
                // asked ahead, sent alongside): it would commit a stream that failed.
                let outdated = obs
                    .replication
                    .as_ref()
                    .zip(vnf.replication.as_ref())
                    .is_some_and(|(new, recorded)| new.outdated_by(recorded));
                let kept = other_move || outdated;
                if !kept {
                    vnf.replication = obs.replication.clone();
                }
                // The machine type its guest runs on: what its restarts and moves keep.
                if let Some(m) = obs
                    .machine
                    .as_ref()
                    .filter(|m| telvirt_model::vnf::machine_version(m).is_some())
                {
                    vnf.machine = Some(m.clone());
                }
                // And the accelerator it runs with, what its moves keep: the running active's
                // word (none from an agent that does not report it, so a guest healed onto an
                // older agent's host keeps no stale one).
                if obs.phase == Phase::Running {
                    vnf.accel = obs.accel;
                }
                // The commit point of the move's destination, with the stream that reached it:
                // a later report of an earlier stream (a stale one) does not undo it.
                let committing = obs
                    .replication
                    .as_ref()
                    .filter(|_| commit_point && !kept)
                    .and_then(|r| Some((r, r.guest.as_ref()?.opened_ms)));
                if let Some((r, opened)) = committing
                    && let Some(m) = vnf.migration.as_mut().filter(|m| r.serves(m))
                {
                    m.committed_at.get_or_insert_with(now_rfc3339);
                    // The latest stream's: a late report of an earlier one does not lower it.
                    m.committed_stream = m.committed_stream.max(Some(opened));
                }
                active_failed = obs.phase == Phase::Failed;
                if record.deleting && matches!(obs.phase, Phase::Stopped | Phase::Failed) {
                    remove = true;
                }
                if vnf.phase == obs.phase && vnf.reason.as_deref() == Some(obs.reason.as_str()) {
                    return Ok(None);
                }
                let from = vnf.phase;
                vnf.phase = obs.phase;
                vnf.reason = Some(obs.reason.clone());
                if from == obs.phase {
                    // Same phase, new reason: keep it without an event.
                    return Ok(None);
                }
                Ok(Some((
                    obs.phase,
                    obs.reason.clone(),
                    format!("agent/{host}"),
                )))
            })
            .await;
        drop(serialized);
        match result {
            Ok(_) => {}
            Err(ControllerError::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        }
        if remove {
            self.remove(&name).await?;
        } else {
            // A pair whose standby runs takes over at once when its active is surely gone (its
            // agent's connection closed, or its host's lease ran out: a host cut off from the
            // controller and its standby has fenced its active instance by then); a silent
            // active on a Ready host may only be cut off from its standby, and keeps its role.
            // The agent's report stands either way, so a takeover that could not be recorded
            // is only logged.
            let gone = match (&active_lost, &active_host) {
                (Some(lost), _) if lost.closed => true,
                (Some(_), Some(active)) => !self.host_ready(active).await?,
                _ => false,
            };
            let loss = match (&active_lost, active_failed) {
                (Some(lost), _) if gone => Some(ActiveLoss::Unreachable {
                    standby_host: host,
                    why: &lost.why,
                }),
                (Some(_), _) => None,
                (None, true) => Some(ActiveLoss::Failed {
                    host,
                    why: &obs.reason,
                }),
                (None, false) => None,
            };
            if let Some(loss) = loss
                && let Err(e) = self.hand_over(&name, &loss).await
            {
                tracing::warn!(vnf = %name, "the standby could not take over: {e}");
            }
            // A move ends once its destination runs with the state (either instance's report
            // may be the last one it waited for), or is cancelled past its deadline.
            if migrating && let Err(e) = self.advance_migration(&name).await {
                tracing::warn!(vnf = %name, "the move could not end: {e}");
            }
        }
        Ok(())
    }
}

/// Whether a VNF runs nowhere, so it can be deleted without waiting for an agent.
fn idle(vnf: &Vnf) -> bool {
    matches!(
        vnf.phase,
        Phase::Pending | Phase::Scheduled | Phase::Stopped | Phase::Failed
    )
}

/// A core map as `caller` may see it: whole for admin, other authorities' holders hidden for
/// everyone else.
fn confined(
    caller: &Caller,
    map: telvirt_sched::coremap::HostMap,
) -> telvirt_sched::coremap::HostMap {
    if caller.is_admin() {
        map
    } else {
        telvirt_sched::coremap::confine(&map, &caller.name)
    }
}

/// The write that keeps the pending index (`/pending/<vnf>`) in step with a VNF record written
/// in the same transaction: put when it now waits for a placement, deleted when it no longer
/// does; none when that did not change (`was_pending`: whether it waited before).
fn pending_op(was_pending: bool, record: &VnfRecord) -> Option<Op> {
    let key = records::pending_key(record.vnf.name.as_str());
    match (was_pending, records::wants_placement(record)) {
        (false, true) => Some(Op::Put {
            key,
            value: Vec::new(),
            lease: None,
        }),
        (true, false) => Some(Op::Delete { key }),
        _ => None,
    }
}

/// The writes of a phase transition already applied to `record` (from phase `from`): its event,
/// the record itself, with `updated_at` and `last_event` advanced, as `update` writes them, and
/// its pending index entry (put when it is now Pending, deleted when it left Pending).
fn transition_ops(
    record: &mut VnfRecord,
    from: Phase,
    reason: &str,
    actor: &str,
) -> Result<Vec<Op>> {
    let now = now_rfc3339();
    record.vnf.updated_at = now.clone();
    record.last_event += 1;
    let name = record.vnf.name.as_str();
    let event = Event {
        seq: record.last_event,
        vnf: record.vnf.name.clone(),
        at: now,
        from: Some(from),
        to: record.vnf.phase,
        reason: reason.to_owned(),
        actor: actor.to_owned(),
    };
    let mut ops = event_ops(name, &event)?;
    ops.push(Op::Put {
        key: vnf_key(name),
        value: encode(record)?,
        lease: None,
    });
    // Put even when it was Pending before: a store written before the index existed may lack
    // the entry, and a put of a present key is harmless.
    if records::wants_placement(record) {
        ops.push(Op::Put {
            key: records::pending_key(name),
            value: Vec::new(),
            lease: None,
        });
    } else if from == Phase::Pending {
        ops.push(Op::Delete {
            key: records::pending_key(name),
        });
    }
    Ok(ops)
}

/// Adds to `ops` the assignment index entries of a VNF placed as `next` (put for each of its
/// hosts, deleted for each host `before` held that `next` does not), and returns the compares
/// that condition the write on the VNF record (revision `rev`) and its allocation (revision
/// `alloc_rev`, 0: absent) as read.
pub(crate) fn placement_commit(
    ops: &mut Vec<Op>,
    before: Option<&VnfRecord>,
    next: &VnfRecord,
    rev: u64,
    alloc_rev: u64,
) -> Vec<Compare> {
    let name = next.vnf.name.as_str();
    let hosts = records::placed_hosts(next);
    for host in before.map(records::placed_hosts).unwrap_or_default() {
        if !hosts.contains(&host) {
            ops.push(Op::Delete {
                key: records::assignment_key(&host, name),
            });
        }
    }
    for host in hosts {
        ops.push(Op::Put {
            key: records::assignment_key(&host, name),
            value: Vec::new(),
            lease: None,
        });
    }
    vec![
        Compare::ModRevision {
            key: vnf_key(name),
            revision: rev,
        },
        Compare::ModRevision {
            key: allocation_key(name),
            revision: alloc_rev,
        },
    ]
}

/// Whether an allocation made for `stored` belongs to a VNF that asks for `current`: the same
/// owner, runtime, cpu request, redundancy and locality. Memory is not compared: allocations
/// written before memory budgets existed carry none.
fn made_for(stored: &telvirt_sched::VnfRequest, current: &telvirt_sched::VnfRequest) -> bool {
    let stored = telvirt_sched::VnfRequest {
        memory_per_node: current.memory_per_node,
        ..stored.clone()
    };
    stored == *current
}

/// Makes the pending index (`/pending/`) and the assignment index (`/assignments/`) hold
/// exactly what the stored VNFs say, once at open, in one pass over `/vnfs/`: a store written
/// before the indexes existed has none, and nothing else adds the entries of VNFs that were
/// already Pending or placed then. Each change is one transaction conditioned on the VNF as
/// read; one that lost a race is left to the writer that won it (every writer keeps the
/// indexes in the VNF's own transaction). Returns how many entries it changed.
async fn rebuild_indexes(store: &dyn Store) -> Result<usize> {
    // Every index key there is now, by the VNF it names.
    let mut present: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (key, _) in store.list(records::PENDING).await? {
        if let Some(name) = key.strip_prefix(records::PENDING) {
            present
                .entry(name.to_owned())
                .or_default()
                .insert(key.clone());
        }
    }
    for (key, _) in store.list(records::ASSIGNMENTS).await? {
        if let Some((_, name)) = key
            .strip_prefix(records::ASSIGNMENTS)
            .and_then(|rest| rest.rsplit_once('/'))
        {
            present
                .entry(name.to_owned())
                .or_default()
                .insert(key.clone());
        }
    }
    let mut changed = 0;
    for (key, v) in store.list(records::VNFS).await? {
        let record: VnfRecord = decode(&key, &v.value)?;
        let name = record.vnf.name.as_str();
        let have = present.remove(name).unwrap_or_default();
        let mut want = BTreeSet::new();
        if records::wants_placement(&record) {
            want.insert(records::pending_key(name));
        }
        for host in records::placed_hosts(&record) {
            want.insert(records::assignment_key(&host, name));
        }
        let mut ops: Vec<Op> = want
            .difference(&have)
            .map(|k| Op::Put {
                key: k.clone(),
                value: Vec::new(),
                lease: None,
            })
            .collect();
        ops.extend(
            have.difference(&want)
                .map(|k| Op::Delete { key: k.clone() }),
        );
        if ops.is_empty() {
            continue;
        }
        let n = ops.len();
        let compare = Compare::ModRevision {
            key,
            revision: v.mod_revision,
        };
        if store.txn(vec![compare], ops).await?.succeeded {
            changed += n;
        }
    }
    // Entries of VNFs that do not exist.
    for (name, keys) in present {
        let n = keys.len();
        let compare = Compare::ModRevision {
            key: vnf_key(&name),
            revision: 0,
        };
        let ops = keys.into_iter().map(|key| Op::Delete { key }).collect();
        if store.txn(vec![compare], ops).await?.succeeded {
            changed += n;
        }
    }
    if changed > 0 {
        tracing::info!("indexes: {changed} entries brought in step with the stored VNFs");
    }
    Ok(changed)
}

/// Heals a leak an older version left in the store, before the scheduler is rebuilt from it:
/// deletes the allocation `key` if its VNF does not exist (one transaction conditioned on the
/// VNF still being absent), or, if its VNF exists but the allocation was made for another
/// request (an older VNF of the same name, another owner), deletes it and puts the VNF back to
/// Pending to be placed afresh (one transaction conditioned on both keys, with an event).
/// Returns whether it dropped the allocation.
/// An empty scheduler over the hosts `store` holds: what allocations are restored into.
pub(crate) async fn scheduler_with_hosts(
    store: &dyn Store,
    config: SchedConfig,
) -> Result<Scheduler> {
    let mut scheduler = Scheduler::new(config)?;
    for (key, v) in store.list(records::HOSTS).await? {
        let host: HostRecord = decode(&key, &v.value)?;
        let name = host.spec.name.clone();
        scheduler.add_host(host.spec)?;
        scheduler.set_runtimes(&name, crate::placement::offered_runtimes(&host.runtimes))?;
    }
    Ok(scheduler)
}

async fn drop_stale_allocation(
    store: &dyn Store,
    key: &str,
    alloc: &Allocation,
    revision: u64,
) -> Result<bool> {
    let name = alloc.request.name.as_str();
    if key != allocation_key(name) {
        return Err(ControllerError::Corrupt(format!(
            "{key}: holds the allocation of vnf {name}"
        )));
    }
    let vnf = store.get(&vnf_key(name)).await?;
    let mut compares = vec![Compare::ModRevision {
        key: key.to_owned(),
        revision,
    }];
    let mut ops = vec![Op::Delete {
        key: key.to_owned(),
    }];
    let why = match vnf {
        None => {
            compares.push(Compare::ModRevision {
                key: vnf_key(name),
                revision: 0,
            });
            format!(
                "dropped the allocation of vnf {name}, which does not exist; its cpus are free again"
            )
        }
        Some(v) => {
            let mut record: VnfRecord = decode(&vnf_key(name), &v.value)?;
            if made_for(&alloc.request, &placement::vnf_request(&record.vnf)) {
                return Ok(false);
            }
            compares.push(Compare::ModRevision {
                key: vnf_key(name),
                revision: v.mod_revision,
            });
            let from = record.vnf.phase;
            for host in records::placed_hosts(&record) {
                ops.push(Op::Delete {
                    key: records::assignment_key(&host, name),
                });
            }
            let reason =
                "its placement was made for another VNF of the same name; placing it again"
                    .to_owned();
            record.vnf.phase = Phase::Pending;
            record.vnf.placements.clear();
            record.vnf.reason = Some(reason.clone());
            record.vnf.generation += 1;
            ops.extend(transition_ops(&mut record, from, &reason, "scheduler")?);
            format!(
                "dropped the allocation of vnf {name}: it was made for another request; the VNF is placed again"
            )
        }
    };
    let dropped = store.txn(compares, ops).await?.succeeded;
    if dropped {
        tracing::warn!("{why}");
    }
    Ok(dropped)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(seq: u64) -> Event {
        Event {
            seq,
            vnf: "fw1".parse().expect("a valid name"),
            at: now_rfc3339(),
            from: None,
            to: Phase::Running,
            reason: "r".into(),
            actor: "a".into(),
        }
    }

    fn deleted(ops: &[Op]) -> Vec<String> {
        ops.iter()
            .filter_map(|op| match op {
                Op::Delete { key } => Some(key.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn an_event_past_the_cap_deletes_the_oldest_kept() {
        let cap = records::MAX_EVENTS_PER_VNF;
        for seq in [1, 2, cap] {
            assert!(
                deleted(&event_ops("fw1", &event(seq)).unwrap()).is_empty(),
                "{seq}"
            );
        }
        assert_eq!(
            deleted(&event_ops("fw1", &event(cap + 1)).unwrap()),
            [event_key("fw1", 1)]
        );
        assert_eq!(
            deleted(&event_ops("fw1", &event(cap + 57)).unwrap()),
            [event_key("fw1", 57)]
        );
    }
}
