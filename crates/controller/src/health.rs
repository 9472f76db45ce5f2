//! The node's health: which of its parts (store, scheduler, agent, data plane, ...) are up, and
//! the supervision of its long-lived tasks.
//!
//! Owns the registry of named components (each up, or down with a reason and since when), set by
//! the components themselves or read from a probe when asked, and [`HealthRegistry::supervise`],
//! which runs a task, marks its component down when it returns or panics, and restarts it with
//! backoff when that is safe. It must not speak HTTP (the `http` module answers `/v1/healthz`
//! from [`HealthRegistry::report`]) nor decide anything about VNFs.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use telvirt_model::api::{ComponentHealth, Health, HealthProblem};
use telvirt_store::{Store, StoreHealth};
use tokio::task::{JoinError, JoinHandle};

/// The name of the store's component.
pub const STORE: &str = "store";
/// The scheduling loop.
pub const SCHEDULER: &str = "scheduler";
/// The local agent's reconcile loop.
pub const AGENT: &str = "agent";
/// The data-plane worker threads.
pub const DATAPLANE: &str = "dataplane";
/// The agent's loop applying networks to its data plane.
pub const NETWORK: &str = "network";

/// The state of one component.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ComponentState {
    Up {
        since: Option<SystemTime>,
        /// Restarts so far and why the last run ended, for a supervised task.
        restarts: u32,
        last_exit: Option<String>,
    },
    Down {
        reason: String,
        since: SystemTime,
        restarts: u32,
    },
}

impl ComponentState {
    /// Up since now.
    pub fn up() -> Self {
        ComponentState::Up {
            since: Some(SystemTime::now()),
            restarts: 0,
            last_exit: None,
        }
    }

    /// Up, without a known start (a probe's answer).
    pub fn running() -> Self {
        ComponentState::Up {
            since: None,
            restarts: 0,
            last_exit: None,
        }
    }

    /// Down since `since` for `reason`.
    pub fn down_since(reason: impl Into<String>, since: SystemTime) -> Self {
        ComponentState::Down {
            reason: reason.into(),
            since,
            restarts: 0,
        }
    }

    /// Down since now for `reason`.
    pub fn down(reason: impl Into<String>) -> Self {
        ComponentState::Down {
            reason: reason.into(),
            since: SystemTime::now(),
            restarts: 0,
        }
    }

    pub fn is_up(&self) -> bool {
        matches!(self, ComponentState::Up { .. })
    }

    fn view(&self) -> ComponentHealth {
        let rfc3339 = |t: &SystemTime| humantime::format_rfc3339_millis(*t).to_string();
        match self {
            ComponentState::Up {
                since,
                restarts,
                last_exit,
            } => ComponentHealth {
                status: "up".into(),
                reason: last_exit.clone(),
                since: since.as_ref().map(rfc3339),
                restarts: *restarts,
            },
            ComponentState::Down {
                reason,
                since,
                restarts,
            } => ComponentHealth {
                status: "down".into(),
                reason: Some(reason.clone()),
                since: Some(rfc3339(since)),
                restarts: *restarts,
            },
        }
    }
}

type Probe = Arc<dyn Fn() -> ComponentState + Send + Sync>;

enum Source {
    Reported(ComponentState),
    /// Asked each time the health is read.
    Probe(Probe),
}

/// The answer of `/v1/healthz`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthReport {
    Healthy(Health),
    Unhealthy(HealthProblem),
}

impl HealthReport {
    pub fn is_healthy(&self) -> bool {
        matches!(self, HealthReport::Healthy(_))
    }

    /// The problem, when a component is down.
    pub fn problem(self) -> Option<HealthProblem> {
        match self {
            HealthReport::Healthy(_) => None,
            HealthReport::Unhealthy(p) => Some(p),
        }
    }

    /// Every component's state, healthy or not.
    pub fn components(&self) -> &BTreeMap<String, ComponentHealth> {
        match self {
            HealthReport::Healthy(h) => &h.components,
            HealthReport::Unhealthy(p) => &p.components,
        }
    }
}

/// What to do when a supervised task returns or panics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restart {
    /// Leave its component down.
    Never,
    /// Start it again after `first`, doubling the wait up to `max` while it keeps failing; a run
    /// that lasted longer than `max` starts the wait over.
    Backoff { first: Duration, max: Duration },
}

/// Named components and their state.
#[derive(Default)]
pub struct HealthRegistry {
    components: Mutex<BTreeMap<String, Source>>,
    /// Set when the node shuts down: supervised tasks that end then are neither errors nor
    /// restarted.
    stopping: std::sync::atomic::AtomicBool,
}

impl HealthRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    fn table(&self) -> MutexGuard<'_, BTreeMap<String, Source>> {
        // Each entry is replaced whole: a panic elsewhere cannot leave one half-written.
        self.components.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The node is shutting down: tasks that end from now on are stopping, not failing.
    pub fn stopping(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn is_stopping(&self) -> bool {
        self.stopping.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Sets `name`'s state (registering it if new).
    pub fn set(&self, name: &str, state: ComponentState) {
        self.table()
            .insert(name.to_owned(), Source::Reported(state));
    }

    /// Marks `name` up since now.
    pub fn up(&self, name: &str) {
        self.set(name, ComponentState::up());
    }

    /// Marks `name` down since now, unless it is down already (then the first reason and time
    /// stay).
    pub fn down(&self, name: &str, reason: impl Into<String>) {
        let mut table = self.table();
        if let Some(Source::Reported(ComponentState::Down { .. })) = table.get(name) {
            return;
        }
        table.insert(
            name.to_owned(),
            Source::Reported(ComponentState::down(reason)),
        );
    }

    /// `name`'s state is whatever `probe` answers when the health is read.
    pub fn follow(&self, name: &str, probe: impl Fn() -> ComponentState + Send + Sync + 'static) {
        self.table()
            .insert(name.to_owned(), Source::Probe(Arc::new(probe)));
    }

    /// The [`STORE`] component follows `store`'s own health.
    pub fn follow_store(&self, store: Arc<dyn Store>) {
        self.follow(STORE, move || match store.health() {
            StoreHealth::Ok => ComponentState::running(),
            StoreHealth::Failing { since, error } => ComponentState::down_since(error, since),
        });
    }

    /// Every component's state now.
    pub fn states(&self) -> BTreeMap<String, ComponentState> {
        let entries: Vec<(String, Result<ComponentState, Probe>)> = self
            .table()
            .iter()
            .map(|(name, source)| {
                let state = match source {
                    Source::Reported(s) => Ok(s.clone()),
                    Source::Probe(p) => Err(Arc::clone(p)),
                };
                (name.clone(), state)
            })
            .collect();
        // Probes run outside the table's lock: they may take locks of their own.
        entries
            .into_iter()
            .map(|(name, state)| (name, state.unwrap_or_else(|probe| probe())))
            .collect()
    }

    /// Healthy when every component is up, else the problem naming each one that is down.
    pub fn report(&self) -> HealthReport {
        let states = self.states();
        let down: Vec<String> = states
            .iter()
            .filter_map(|(name, state)| match state {
                ComponentState::Down { reason, .. } => Some(format!("{name} is down: {reason}")),
                ComponentState::Up { .. } => None,
            })
            .collect();
        let components = states
            .iter()
            .map(|(name, state)| (name.clone(), state.view()))
            .collect();
        let version = env!("CARGO_PKG_VERSION").to_owned();
        if down.is_empty() {
            HealthReport::Healthy(Health {
                status: "ok".into(),
                version,
                components,
            })
        } else {
            HealthReport::Unhealthy(HealthProblem {
                kind: "urn:telvirt:problem:unhealthy".into(),
                title: "Service Unavailable".into(),
                status: 503,
                detail: down.join("; "),
                version,
                components,
            })
        }
    }

    /// Runs the future `make` builds as component `name` (up while it runs). When it returns or
    /// panics the component goes down with the panic's message; with [`Restart::Backoff`] a new
    /// future is built and run after the wait. Returns the supervisor's handle, which ends when
    /// the task is not restarted.
    pub fn supervise<F, Fut>(
        self: &Arc<Self>,
        name: &str,
        restart: Restart,
        mut make: F,
    ) -> JoinHandle<()>
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let registry = Arc::clone(self);
        let name = name.to_owned();
        registry.up(&name);
        tokio::spawn(async move {
            let mut restarts = 0u32;
            let mut wait: Option<Duration> = None;
            loop {
                let started = Instant::now();
                let outcome = tokio::spawn(make()).await;
                if registry.is_stopping() && outcome.is_ok() {
                    tracing::debug!("{name} stopped with the node");
                    registry.set(
                        &name,
                        ComponentState::down("stopped: the node is shutting down"),
                    );
                    return;
                }
                let why = exit_reason(outcome);
                let Restart::Backoff { first, max } = restart else {
                    tracing::error!("{name} stopped: {why}");
                    registry.set(
                        &name,
                        ComponentState::Down {
                            reason: why,
                            since: SystemTime::now(),
                            restarts,
                        },
                    );
                    return;
                };
                let next = match wait {
                    Some(w) if started.elapsed() <= max => (w * 2).min(max),
                    _ => first,
                };
                wait = Some(next);
                tracing::error!("{name} stopped: {why}; restarting it in {next:?}");
                registry.set(
                    &name,
                    ComponentState::Down {
                        reason: format!("{why}; restarting in {} ms", next.as_millis()),
                        since: SystemTime::now(),
                        restarts,
                    },
                );
                tokio::time::sleep(next).await;
                restarts = restarts.saturating_add(1);
                registry.set(
                    &name,
                    ComponentState::Up {
                        since: Some(SystemTime::now()),
                        restarts,
                        last_exit: Some(why),
                    },
                );
            }
        })
    }

    /// Watches an already spawned `task` as component `name`: up while it runs, down (not
    /// restarted) when it returns or panics.
    pub fn watch(self: &Arc<Self>, name: &str, task: JoinHandle<()>) -> JoinHandle<()> {
        let mut task = Some(task);
        self.supervise(name, Restart::Never, move || {
            let task = task.take();
            async move {
                if let Some(task) = task
                    && let Err(e) = task.await
                {
                    // Hand the panic on so the supervisor reports its message.
                    if e.is_panic() {
                        std::panic::resume_unwind(e.into_panic());
                    }
                }
            }
        })
    }
}

/// Why a task ended, from its join result.
fn exit_reason(outcome: Result<(), JoinError>) -> String {
    match outcome {
        Ok(()) => "the task ended".to_owned(),
        Err(e) if e.is_panic() => {
            let payload = e.into_panic();
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a non-text payload".to_owned());
            format!("panicked: {message}")
        }
        Err(_) => "the task was cancelled".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn wait_for(
        registry: &HealthRegistry,
        name: &str,
        pred: impl Fn(&ComponentState) -> bool,
    ) -> ComponentState {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(state) = registry.states().remove(name)
                && pred(&state)
            {
                return state;
            }
            assert!(
                Instant::now() < deadline,
                "{name} never reached the state: {:?}",
                registry.states()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn a_task_that_panics_goes_down_with_its_message() {
        let registry = Arc::new(HealthRegistry::new());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let mut rx = Some(rx);
        registry.supervise("loop", Restart::Never, move || {
            let rx = rx.take();
            async move {
                if let Some(rx) = rx {
                    let _ = rx.await;
                }
                panic!("lost the plot");
            }
        });
        assert!(registry.report().is_healthy());
        tx.send(()).unwrap();
        let state = wait_for(&registry, "loop", |s| !s.is_up()).await;
        assert!(
            matches!(&state, ComponentState::Down { reason, .. } if reason == "panicked: lost the plot"),
            "{state:?}"
        );
        let problem = registry.report().problem().unwrap();
        assert_eq!(problem.status, 503);
        assert!(
            problem
                .detail
                .contains("loop is down: panicked: lost the plot"),
            "{}",
            problem.detail
        );
        assert_eq!(problem.components["loop"].status, "down");
    }

    #[tokio::test]
    async fn a_restartable_task_comes_back_and_counts_its_restarts() {
        let registry = Arc::new(HealthRegistry::new());
        let runs = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let counter = Arc::clone(&runs);
        registry.supervise(
            "loop",
            Restart::Backoff {
                first: Duration::from_millis(10),
                max: Duration::from_millis(40),
            },
            move || {
                let run = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                async move {
                    if run < 2 {
                        panic!("run {run} failed");
                    }
                    std::future::pending::<()>().await;
                }
            },
        );
        let state = wait_for(&registry, "loop", |s| {
            matches!(s, ComponentState::Up { restarts: 2, .. })
        })
        .await;
        assert!(
            matches!(&state, ComponentState::Up { last_exit: Some(why), .. } if why == "panicked: run 1 failed"),
            "{state:?}"
        );
        assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 3);
        let report = registry.report();
        assert!(report.is_healthy());
        assert_eq!(report.components()["loop"].restarts, 2);
    }

    #[tokio::test]
    async fn a_watched_task_that_returns_goes_down() {
        let registry = Arc::new(HealthRegistry::new());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = rx.await;
        });
        registry.watch("reconciler", task);
        assert!(registry.states()["reconciler"].is_up());
        tx.send(()).unwrap();
        let state = wait_for(&registry, "reconciler", |s| !s.is_up()).await;
        assert!(
            matches!(&state, ComponentState::Down { reason, .. } if reason == "the task ended"),
            "{state:?}"
        );
    }

    #[tokio::test]
    async fn a_task_that_ends_at_shutdown_is_stopped_not_restarted() {
        let registry = Arc::new(HealthRegistry::new());
        let runs = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let counter = Arc::clone(&runs);
        let (tx, rx) = tokio::sync::watch::channel(false);
        let supervisor = registry.supervise(
            "agent",
            Restart::Backoff {
                first: Duration::from_millis(10),
                max: Duration::from_millis(40),
            },
            move || {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut rx = rx.clone();
                async move {
                    let _ = rx.wait_for(|stop| *stop).await;
                }
            },
        );
        registry.stopping();
        tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(10), supervisor)
            .await
            .expect("the supervisor did not end at shutdown")
            .unwrap();
        assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert!(
            matches!(&registry.states()["agent"], ComponentState::Down { reason, .. } if reason == "stopped: the node is shutting down")
        );
    }

    #[test]
    fn probes_are_read_when_asked_and_down_keeps_its_first_reason() {
        let registry = HealthRegistry::new();
        let flag = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let seen = Arc::clone(&flag);
        registry.follow("probe", move || {
            if seen.load(std::sync::atomic::Ordering::SeqCst) {
                ComponentState::up()
            } else {
                ComponentState::down("probe says no")
            }
        });
        assert!(registry.report().is_healthy());
        flag.store(false, std::sync::atomic::Ordering::SeqCst);
        let problem = registry.report().problem().unwrap();
        assert_eq!(problem.detail, "probe is down: probe says no");
        registry.down("other", "first");
        registry.down("other", "second");
        assert!(
            matches!(&registry.states()["other"], ComponentState::Down { reason, .. } if reason == "first")
        );
        registry.up("other");
        assert!(registry.states()["other"].is_up());
    }
}
