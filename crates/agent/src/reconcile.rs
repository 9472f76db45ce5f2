//! The agent's reconcile loop: desired (the controller's assignments) against observed (what the
//! runtimes hold), one idempotent step at a time.
//!
//! Owns turning the difference into runtime calls and reporting what it observed. It must not
//! write the store or decide placement: assignments come in and observations go out through the
//! `ControlLink`, so a remote host runs exactly this code.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use telvirt_model::api::{Assignment, Observation};
use telvirt_model::{DesiredState, DeviceGrant, Name, Phase, RuntimeKind};
use tokio::sync::{Mutex, watch};

use crate::AgentError;
use crate::runtime::{InstanceSpec, InstanceState, Runtime};

/// The agent's side of the agent ↔ controller API.
#[async_trait]
pub trait ControlLink: Send + Sync + 'static {
    /// The instances the controller wants on `host`.
    async fn assignments(&self, host: &str) -> Result<Vec<Assignment>, AgentError>;

    /// Tells the controller what the agent observed.
    async fn report(&self, host: &str, observation: Observation) -> Result<(), AgentError>;

    /// Returns when assignments may have changed, or after `max_wait`.
    async fn wait_for_change(&self, max_wait: Duration);
}

#[derive(Debug, Default)]
struct Known {
    kind: Option<RuntimeKind>,
    /// Last (phase, reason, generation) reported, so unchanged facts are not re-sent.
    reported: Option<(Phase, String, u64)>,
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
}

/// One host's agent.
pub struct Agent {
    host: String,
    runtimes: HashMap<RuntimeKind, Arc<dyn Runtime>>,
    link: Arc<dyn ControlLink>,
    state_root: PathBuf,
    known: Mutex<HashMap<Name, Known>>,
}

/// How often the loop looks again when nothing told it to.
pub const RESYNC_INTERVAL: Duration = Duration::from_secs(1);

impl Agent {
    pub fn new(
        host: impl Into<String>,
        runtimes: Vec<Arc<dyn Runtime>>,
        link: Arc<dyn ControlLink>,
        state_root: PathBuf,
    ) -> Self {
        Self {
            host: host.into(),
            runtimes: runtimes.into_iter().map(|r| (r.kind(), r)).collect(),
            link,
            state_root,
            known: Mutex::new(HashMap::new()),
        }
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    /// Runtime kinds this agent can run, sorted.
    pub fn runtime_kinds(&self) -> Vec<RuntimeKind> {
        let mut kinds: Vec<_> = self.runtimes.keys().copied().collect();
        kinds.sort_by_key(|k| k.as_str());
        kinds
    }

    /// Runs until `shutdown` turns true. Instances keep running when the agent stops: a
    /// restarted agent adopts them.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        loop {
            if let Err(e) = self.reconcile_once().await {
                tracing::warn!(host = %self.host, "reconcile pass failed: {e}");
            }
            tokio::select! {
                _ = self.link.wait_for_change(RESYNC_INTERVAL) => {}
                _ = shutdown.changed() => {}
            }
            if *shutdown.borrow() {
                break;
            }
        }
    }

    /// One pass over every assignment and every instance the agent knows.
    pub async fn reconcile_once(&self) -> Result<(), AgentError> {
        let assignments = self.link.assignments(&self.host).await?;
        let wanted: HashSet<Name> = assignments.iter().map(|a| a.vnf.clone()).collect();
        for assignment in assignments {
            self.reconcile_one(assignment).await?;
        }
        let orphans: Vec<(Name, Option<RuntimeKind>)> = {
            let known = self.known.lock().await;
            known
                .iter()
                .filter(|(name, _)| !wanted.contains(*name))
                .map(|(name, k)| (name.clone(), k.kind))
                .collect()
        };
        for (name, kind) in orphans {
            if let Some(runtime) = kind.and_then(|k| self.runtimes.get(&k)) {
                if let Err(e) = runtime.stop(&name).await {
                    tracing::warn!(vnf = %name, "stopping unassigned instance: {e}");
                }
                if let Err(e) = runtime.remove(&name).await {
                    tracing::warn!(vnf = %name, "removing unassigned instance: {e}");
                }
            }
            self.known.lock().await.remove(&name);
        }
        Ok(())
    }

    async fn report(
        &self,
        a: &Assignment,
        phase: Phase,
        reason: impl Into<String>,
    ) -> Result<(), AgentError> {
        let reason = reason.into();
        let fact = (phase, reason.clone(), a.generation);
        {
            let mut known = self.known.lock().await;
            let entry = known.entry(a.vnf.clone()).or_default();
            if entry.reported.as_ref() == Some(&fact) {
                return Ok(());
            }
            entry.reported = Some(fact);
        }
        self.link
            .report(
                &self.host,
                Observation {
                    vnf: a.vnf.clone(),
                    phase,
                    reason,
                    generation: a.generation,
                },
            )
            .await
    }

    async fn reconcile_one(&self, a: Assignment) -> Result<(), AgentError> {
        let kind = a.descriptor.spec.runtime;
        let Some(runtime) = self.runtimes.get(&kind).cloned() else {
            return self
                .report(
                    &a,
                    Phase::Failed,
                    format!("runtime {} is not available on this host", kind.as_str()),
                )
                .await;
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
        let retry_allowed = failed_generation != Some(a.generation);
        match (a.desired, state) {
            (DesiredState::Stopped, InstanceState::Running | InstanceState::Paused) => {
                self.report(&a, Phase::Stopping, "stop requested").await?;
                match runtime.stop(&a.vnf).await {
                    Ok(()) => self.report(&a, Phase::Stopped, "stopped").await,
                    Err(e) => self.fail(&a, format!("stop failed: {e}")).await,
                }
            }
            (DesiredState::Stopped, _) => self.report(&a, Phase::Stopped, "stopped").await,
            (DesiredState::Running, InstanceState::Running) if a.locked => {
                match runtime.pause(&a.vnf).await {
                    Ok(()) => self.report(&a, Phase::Locked, "paused by lock").await,
                    Err(e) => self.fail(&a, format!("pause for lock failed: {e}")).await,
                }
            }
            (DesiredState::Running, InstanceState::Paused) if a.locked => {
                self.report(&a, Phase::Locked, "paused by lock").await
            }
            (DesiredState::Running, InstanceState::Paused) => match runtime.resume(&a.vnf).await {
                Ok(()) => self.report(&a, Phase::Running, "resumed").await,
                Err(e) => self.fail(&a, format!("resume failed: {e}")).await,
            },
            (DesiredState::Running, InstanceState::Running) => {
                let reason = self.sync_devices(&a, runtime.as_ref()).await;
                let reason = self.with_note(&a, reason).await;
                self.report(&a, Phase::Running, reason).await
            }
            (DesiredState::Running, InstanceState::Failed(reason)) => {
                if retry_allowed && self.failure_already_reported(&a).await {
                    // The owner asked again (a new generation): clear the wreck and start over.
                    let _ = runtime.remove(&a.vnf).await;
                    self.start(&a, &spec, runtime.as_ref()).await
                } else {
                    self.fail(&a, reason).await
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

    /// `reason` followed by the runtime's note on the instance's start, if any.
    async fn with_note(&self, a: &Assignment, reason: String) -> String {
        let known = self.known.lock().await;
        match known.get(&a.vnf).and_then(|k| k.note.as_deref()) {
            Some(note) => format!("{reason}; {note}"),
            None => reason,
        }
    }

    async fn failure_already_reported(&self, a: &Assignment) -> bool {
        let known = self.known.lock().await;
        known
            .get(&a.vnf)
            .and_then(|k| k.reported.as_ref())
            .is_some_and(|(phase, _, generation)| {
                *phase == Phase::Failed && *generation != a.generation
            })
    }

    async fn fail(&self, a: &Assignment, reason: String) -> Result<(), AgentError> {
        {
            let mut known = self.known.lock().await;
            known.entry(a.vnf.clone()).or_default().failed_generation = Some(a.generation);
        }
        self.report(a, Phase::Failed, reason).await
    }

    async fn start(
        &self,
        a: &Assignment,
        spec: &InstanceSpec,
        runtime: &dyn Runtime,
    ) -> Result<(), AgentError> {
        self.report(a, Phase::Starting, "starting").await?;
        {
            // A fresh instance holds no devices until they are applied again.
            let mut known = self.known.lock().await;
            let entry = known.entry(a.vnf.clone()).or_default();
            entry.devices = None;
            entry.devices_refused = None;
        }
        if let Err(e) = runtime.start(spec).await {
            return self.fail(a, e.to_string()).await;
        }
        let note = runtime.start_note(&a.vnf).await;
        self.known
            .lock()
            .await
            .entry(a.vnf.clone())
            .or_default()
            .note = note;
        if a.locked {
            return match runtime.pause(&a.vnf).await {
                Ok(()) => {
                    let reason = self
                        .with_note(a, "started and paused by lock".to_owned())
                        .await;
                    self.report(a, Phase::Locked, reason).await
                }
                Err(e) => self.fail(a, format!("pause for lock failed: {e}")).await,
            };
        }
        let reason = self.sync_devices(a, runtime).await;
        let reason = self.with_note(a, reason).await;
        self.report(a, Phase::Running, reason).await
    }
}
