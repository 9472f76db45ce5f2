//! The agent's work queue end to end through `Agent::run`: a slow start of one VNF holds up no
//! other, a VNF is never worked on twice at once, a failing VNF stops no other and is retried
//! with backoff. Driven with in-memory runtimes and link (test doubles of the two traits); a
//! "slow VM" start waits on a gate the test opens at the end, never on a sleep.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use telvirt_agent::{
    Agent, AgentConfig, Backoff, ControlLink, InstanceSpec, InstanceState, LinkError, Runtime,
    RuntimeFailure, StateChangeHook,
};
use telvirt_model::api::{Assignment, Observation};
use telvirt_model::{DesiredState, Format, Name, Phase, Placement, Role, RuntimeKind, parse_vnf};
use tokio::sync::watch;

/// How long a test waits for something that should happen promptly. The slow start it must
/// not wait for is blocked until the test ends, so this bounds only a broken agent.
const DEADLINE: Duration = Duration::from_secs(20);

/// A runtime whose `start` of the VNFs in `slow` waits until the gate opens, and whose
/// operations fail as configured. It counts concurrent calls per VNF.
struct FakeRuntime {
    kind: RuntimeKind,
    states: Mutex<HashMap<String, InstanceState>>,
    calls: Mutex<Vec<String>>,
    slow: Vec<String>,
    gate: watch::Receiver<bool>,
    /// Calls under way per VNF, and the most seen at once.
    in_flight: Mutex<HashMap<String, usize>>,
    most_at_once: AtomicUsize,
    /// This many `pause` calls fail before pauses work.
    pause_failures: AtomicUsize,
    /// `start` of this VNF fails.
    fail_start: Option<String>,
    /// `state` calls: how often the agent looked at an instance.
    looks: AtomicUsize,
    /// What the agent registered to hear of states that change by themselves.
    state_change: Mutex<Option<StateChangeHook>>,
}

impl FakeRuntime {
    fn new(kind: RuntimeKind, slow: &[&str], gate: watch::Receiver<bool>) -> Self {
        Self {
            kind,
            states: Mutex::new(HashMap::new()),
            calls: Mutex::new(Vec::new()),
            slow: slow.iter().map(|s| (*s).to_owned()).collect(),
            gate,
            in_flight: Mutex::new(HashMap::new()),
            most_at_once: AtomicUsize::new(0),
            pause_failures: AtomicUsize::new(0),
            fail_start: None,
            looks: AtomicUsize::new(0),
            state_change: Mutex::new(None),
        }
    }
    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
    fn count(&self, call: &str) -> usize {
        self.calls().iter().filter(|c| *c == call).count()
    }
    fn set(&self, name: &str, state: InstanceState) {
        self.states.lock().unwrap().insert(name.into(), state);
    }
    /// Notes a call of `name` beginning; the returned guard notes its end.
    fn enter(&self, call: String, name: &str) -> InFlight<'_> {
        self.calls.lock().unwrap().push(call);
        let mut in_flight = self.in_flight.lock().unwrap();
        let n = in_flight.entry(name.to_owned()).or_default();
        *n += 1;
        self.most_at_once.fetch_max(*n, Ordering::SeqCst);
        InFlight {
            rt: self,
            name: name.to_owned(),
        }
    }
}

struct InFlight<'a> {
    rt: &'a FakeRuntime,
    name: String,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if let Some(n) = self.rt.in_flight.lock().unwrap().get_mut(&self.name) {
            *n -= 1;
        }
    }
}

#[async_trait]
impl Runtime for FakeRuntime {
    fn kind(&self) -> RuntimeKind {
        self.kind
    }
    fn on_state_change(&self, hook: StateChangeHook) {
        *self.state_change.lock().unwrap() = Some(hook);
    }
    async fn start(&self, spec: &InstanceSpec) -> Result<(), RuntimeFailure> {
        let name = spec.name.as_str();
        let _call = self.enter(format!("start {name}"), name);
        if self.slow.iter().any(|s| s == name) {
            let mut gate = self.gate.clone();
            gate.wait_for(|open| *open)
                .await
                .map_err(|_| RuntimeFailure::new("the gate's sender is gone"))?;
        }
        if self.fail_start.as_deref() == Some(name) {
            self.set(name, InstanceState::Failed("no such guest kernel".into()));
            return Err(RuntimeFailure::new("no such guest kernel"));
        }
        self.set(name, InstanceState::Running);
        Ok(())
    }
    async fn adopt(&self, spec: &InstanceSpec) -> Result<bool, RuntimeFailure> {
        let _call = self.enter(format!("adopt {}", spec.name), spec.name.as_str());
        Ok(false)
    }
    async fn stop(&self, name: &Name) -> Result<(), RuntimeFailure> {
        let _call = self.enter(format!("stop {name}"), name.as_str());
        self.set(name.as_str(), InstanceState::Stopped);
        Ok(())
    }
    async fn pause(&self, name: &Name) -> Result<(), RuntimeFailure> {
        let _call = self.enter(format!("pause {name}"), name.as_str());
        let failing = self
            .pause_failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if failing {
            return Err(RuntimeFailure::new("monitor socket busy"));
        }
        self.set(name.as_str(), InstanceState::Paused);
        Ok(())
    }
    async fn resume(&self, name: &Name) -> Result<(), RuntimeFailure> {
        let _call = self.enter(format!("resume {name}"), name.as_str());
        self.set(name.as_str(), InstanceState::Running);
        Ok(())
    }
    async fn state(&self, name: &Name) -> InstanceState {
        self.looks.fetch_add(1, Ordering::SeqCst);
        self.states
            .lock()
            .unwrap()
            .get(name.as_str())
            .cloned()
            .unwrap_or(InstanceState::Absent)
    }
    async fn remove(&self, name: &Name) -> Result<(), RuntimeFailure> {
        let _call = self.enter(format!("remove {name}"), name.as_str());
        self.states.lock().unwrap().remove(name.as_str());
        Ok(())
    }
}

/// A link whose assignments the test edits; every edit wakes the agent through a change
/// counter (as the controller's link does). Reports of the VNFs in `refuse` fail while it holds
/// them.
struct FakeLink {
    assignments: Mutex<Vec<Assignment>>,
    reports: Mutex<Vec<Observation>>,
    refuse: Mutex<Vec<String>>,
    refused: AtomicUsize,
    passes: AtomicUsize,
    /// Lists of the assignments that fail before they answer again.
    failing_lists: AtomicUsize,
    version: watch::Sender<u64>,
    seen: tokio::sync::Mutex<watch::Receiver<u64>>,
}

impl FakeLink {
    fn new(assignments: Vec<Assignment>) -> Self {
        let version = watch::Sender::new(0);
        let seen = tokio::sync::Mutex::new(version.subscribe());
        Self {
            assignments: Mutex::new(assignments),
            reports: Mutex::new(Vec::new()),
            refuse: Mutex::new(Vec::new()),
            refused: AtomicUsize::new(0),
            passes: AtomicUsize::new(0),
            failing_lists: AtomicUsize::new(0),
            version,
            seen,
        }
    }
    fn edit(&self, f: impl FnOnce(&mut Vec<Assignment>)) {
        f(&mut self.assignments.lock().unwrap());
        self.version.send_modify(|v| *v += 1);
    }
    fn edit_vnf(&self, vnf: &str, f: impl FnOnce(&mut Assignment)) {
        self.edit(|all| {
            let a = all
                .iter_mut()
                .find(|a| a.vnf.as_str() == vnf)
                .expect("the test edits an assigned vnf");
            f(a);
            a.generation += 1;
        });
    }
    /// The last phase and reason reported for `vnf`.
    fn last(&self, vnf: &str) -> Option<(Phase, String)> {
        self.reports
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|o| o.vnf.as_str() == vnf)
            .map(|o| (o.phase, o.reason.clone()))
    }
    fn reported(&self, vnf: &str) -> Vec<(Phase, String)> {
        self.reports
            .lock()
            .unwrap()
            .iter()
            .filter(|o| o.vnf.as_str() == vnf)
            .map(|o| (o.phase, o.reason.clone()))
            .collect()
    }
}

#[async_trait]
impl ControlLink for FakeLink {
    async fn assignments(&self, _host: &str) -> Result<Vec<Assignment>, LinkError> {
        self.passes.fetch_add(1, Ordering::SeqCst);
        let failing = self
            .failing_lists
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if failing.is_ok() {
            return Err(LinkError::Transport("the controller answered 503".into()));
        }
        Ok(self.assignments.lock().unwrap().clone())
    }
    async fn report(&self, _host: &str, observation: Observation) -> Result<(), LinkError> {
        let vnf = observation.vnf.as_str().to_owned();
        if self.refuse.lock().unwrap().contains(&vnf) {
            self.refused.fetch_add(1, Ordering::SeqCst);
            return Err(LinkError::Transport(format!(
                "controller unreachable for {vnf}"
            )));
        }
        self.reports.lock().unwrap().push(observation);
        Ok(())
    }
    async fn wait_for_change(&self, max_wait: Duration) -> bool {
        let mut seen = self.seen.lock().await;
        matches!(
            tokio::time::timeout(max_wait, seen.changed()).await,
            Ok(Ok(()))
        )
    }
}

fn assignment(name: &str, runtime: &str, cpu: u32) -> Assignment {
    let block = if runtime == "vm" {
        "vm: { memory: 64MiB }"
    } else {
        "wasm: { module: fw.wasm }"
    };
    let text = format!(
        "apiVersion: telvirt/v1\nkind: Vnf\nmetadata: {{ name: {name} }}\nspec:\n  runtime: {runtime}\n  {block}\n"
    );
    Assignment {
        vnf: name.parse().unwrap(),
        descriptor: parse_vnf(text.as_bytes(), Format::Yaml).unwrap(),
        placement: Placement {
            role: Role::Active,
            host: "h1".into(),
            vcpus: vec![vec![cpu]],
            emulator_cpus: vec![0],
            held: vec![],
            numa_nodes: vec![0],
            group: None,
        },
        desired: DesiredState::Running,
        locked: false,
        memory_bytes: 0,
        generation: 1,
        devices: Vec::new(),
        domain: "operator".into(),
        standby: None,
        epoch: 0,
        incoming_from: None,
        hand_off: false,
        resume_moved_copy: false,
        active_from: None,
        active_key: None,
    }
}

/// A config for tests: short backoff, and a resync and relist so long that only wake-ups and
/// backoff retries make the agent look again.
fn config(workers: usize) -> AgentConfig {
    AgentConfig {
        workers: NonZeroUsize::new(workers).unwrap(),
        backoff: Backoff {
            base: Duration::from_millis(10),
            max: Duration::from_millis(200),
        },
        resync: Duration::from_secs(3600),
        relist: Duration::from_secs(3600),
    }
}

struct Running {
    agent: Arc<Agent>,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    fn start(runtimes: Vec<Arc<dyn Runtime>>, link: Arc<FakeLink>, config: AgentConfig) -> Self {
        let agent = Arc::new(Agent::with_config(
            "h1",
            runtimes,
            link,
            std::env::temp_dir(),
            config,
        ));
        let (shutdown, rx) = watch::channel(false);
        let task = tokio::spawn(Arc::clone(&agent).run(rx));
        Self {
            agent,
            shutdown,
            task,
        }
    }
    async fn stop(self) {
        self.shutdown.send(true).unwrap();
        tokio::time::timeout(DEADLINE, self.task)
            .await
            .expect("the agent stops once its steps under way end")
            .unwrap();
    }
}

/// Polls `what` until it holds; panics naming `label` after the deadline.
async fn until(label: &str, mut what: impl FnMut() -> bool) {
    let end = tokio::time::Instant::now() + DEADLINE;
    while !what() {
        assert!(
            tokio::time::Instant::now() < end,
            "timed out waiting: {label}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn phase_is(link: &FakeLink, vnf: &str, phase: Phase) -> bool {
    link.last(vnf).is_some_and(|(p, _)| p == phase)
}

/// An instance whose state changes by itself (a guest that arrived by a move runs, or
/// crashed) is reported as soon as its runtime says so, not at the next look at every
/// instance (an hour away here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_the_runtime_says_changed_is_reported_at_once() {
    let (_open, gate) = watch::channel(false);
    let vm = Arc::new(FakeRuntime::new(RuntimeKind::Vm, &[], gate));
    let link = Arc::new(FakeLink::new(vec![assignment("vm1", "vm", 1)]));
    let agent = Running::start(vec![vm.clone()], link.clone(), config(2));
    until("vm1 runs", || phase_is(&link, "vm1", Phase::Running)).await;
    until("the agent registered for changes", || {
        vm.state_change.lock().unwrap().is_some()
    })
    .await;
    vm.set(
        "vm1",
        InstanceState::Failed("its QEMU exited (signal 9)".into()),
    );
    let hook = vm.state_change.lock().unwrap().clone().unwrap();
    hook(&"vm1".parse().unwrap());
    until("the change was reported", || {
        link.last("vm1")
            .is_some_and(|(p, why)| p == Phase::Failed && why.contains("signal 9"))
    })
    .await;
    agent.stop().await;
}

/// A pass whose list of the assignments failed is tried again within a second, however long
/// the resync (an hour here): the change that woke it is not lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_list_is_tried_again_within_a_second_however_long_the_resync() {
    let (_open, gate) = watch::channel(false);
    let wasm = Arc::new(FakeRuntime::new(RuntimeKind::Wasm, &[], gate));
    let link = Arc::new(FakeLink::new(vec![assignment("fw1", "wasm", 1)]));
    link.failing_lists.store(1, Ordering::SeqCst);
    let agent = Running::start(vec![wasm.clone()], link.clone(), config(2));
    until("fw1 runs after the failed list", || {
        phase_is(&link, "fw1", Phase::Running)
    })
    .await;
    assert_eq!(link.failing_lists.load(Ordering::SeqCst), 0);
    assert!(link.passes.load(Ordering::SeqCst) >= 2);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_vm_start_holds_up_no_other_vnf() {
    let (open, gate) = watch::channel(false);
    let vm = Arc::new(FakeRuntime::new(RuntimeKind::Vm, &["vm1"], gate.clone()));
    let wasm = Arc::new(FakeRuntime::new(RuntimeKind::Wasm, &[], gate));
    let link = Arc::new(FakeLink::new(vec![
        assignment("vm1", "vm", 1),
        assignment("fw3", "wasm", 2),
    ]));
    let agent = Running::start(vec![vm.clone(), wasm.clone()], link.clone(), config(4));
    until("vm1 is in its slow start", || vm.count("start vm1") == 1).await;
    until("fw3 runs", || phase_is(&link, "fw3", Phase::Running)).await;

    // Assigned while vm1 boots: runs without waiting for it.
    link.edit(|all| all.push(assignment("fw2", "wasm", 3)));
    until("fw2 runs while vm1 starts", || {
        phase_is(&link, "fw2", Phase::Running)
    })
    .await;
    // Lock and stop of another VNF go through too.
    link.edit_vnf("fw3", |a| a.locked = true);
    until("fw3 is locked while vm1 starts", || {
        phase_is(&link, "fw3", Phase::Locked)
    })
    .await;
    link.edit_vnf("fw3", |a| a.desired = DesiredState::Stopped);
    until("fw3 is stopped while vm1 starts", || {
        phase_is(&link, "fw3", Phase::Stopped)
    })
    .await;
    assert_eq!(
        link.last("vm1"),
        Some((Phase::Starting, "starting".to_owned())),
        "vm1 is still starting: the others did not wait for it"
    );
    assert!(wasm.calls().contains(&"stop fw3".to_owned()));

    open.send(true).unwrap();
    until("vm1 runs once its start ends", || {
        phase_is(&link, "vm1", Phase::Running)
    })
    .await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vnf_is_never_started_twice_at_once_and_ends_with_its_newest_assignment() {
    let (open, gate) = watch::channel(false);
    let vm = Arc::new(FakeRuntime::new(RuntimeKind::Vm, &["vm1"], gate));
    let link = Arc::new(FakeLink::new(vec![assignment("vm1", "vm", 1)]));
    let agent = Running::start(vec![vm.clone()], link.clone(), config(4));
    until("vm1 is in its slow start", || vm.count("start vm1") == 1).await;
    // Changes while it starts: each wakes a pass that queues vm1 again.
    for _ in 0..3 {
        let passes = link.passes.load(Ordering::SeqCst);
        link.edit_vnf("vm1", |a| a.memory_bytes += 1);
        until("a pass saw the change", || {
            link.passes.load(Ordering::SeqCst) > passes
        })
        .await;
    }
    // The lock comes last: the step after the start works towards it.
    link.edit_vnf("vm1", |a| a.locked = true);
    open.send(true).unwrap();
    until("vm1 ends locked", || phase_is(&link, "vm1", Phase::Locked)).await;
    agent.stop().await;
    assert_eq!(vm.count("start vm1"), 1, "calls: {:?}", vm.calls());
    assert_eq!(
        vm.most_at_once.load(Ordering::SeqCst),
        1,
        "two calls for vm1 ran at once: {:?}",
        vm.calls()
    );
    let generations: Vec<u64> = link
        .reports
        .lock()
        .unwrap()
        .iter()
        .map(|o| o.generation)
        .collect();
    assert_eq!(
        generations.last(),
        Some(&5),
        "the lock's generation is told"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_vnf_stops_no_other_and_is_retried_with_backoff() {
    let (_open, gate) = watch::channel(false);
    let vm = Arc::new(FakeRuntime::new(RuntimeKind::Vm, &[], gate));
    let link = Arc::new(FakeLink::new(vec![
        assignment("bad", "vm", 1),
        assignment("ok1", "vm", 2),
        assignment("ok2", "vm", 3),
    ]));
    // The controller refuses every report of `bad` for now.
    link.refuse.lock().unwrap().push("bad".into());
    let agent = Running::start(vec![vm.clone()], link.clone(), config(2));
    until("ok1 and ok2 run", || {
        phase_is(&link, "ok1", Phase::Running) && phase_is(&link, "ok2", Phase::Running)
    })
    .await;
    // Retried without any change of its assignment (the resync is an hour away).
    until("bad was tried three times", || {
        link.refused.load(Ordering::SeqCst) >= 3
    })
    .await;
    let errors = agent.agent.step_errors().await;
    let bad: Name = "bad".parse().unwrap();
    assert!(
        errors
            .get(&bad)
            .is_some_and(|e| e.contains("controller unreachable for bad")),
        "the failure is kept for bad: {errors:?}"
    );
    assert_eq!(errors.len(), 1, "only bad failed: {errors:?}");
    link.refuse.lock().unwrap().clear();
    until("bad runs once the controller listens", || {
        phase_is(&link, "bad", Phase::Running)
    })
    .await;
    // Its state was told from the start once the link worked: Starting was not lost.
    assert_eq!(
        link.reported("bad"),
        [
            (Phase::Starting, "starting".to_owned()),
            (Phase::Running, "running".to_owned())
        ]
    );
    // The step that told Running clears the error as it ends.
    let end = tokio::time::Instant::now() + DEADLINE;
    while !agent.agent.step_errors().await.is_empty() {
        assert!(tokio::time::Instant::now() < end, "bad's error stays");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(vm.count("start bad"), 1);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_pause_is_reported_and_retried_with_backoff_until_it_works() {
    let (_open, gate) = watch::channel(false);
    let vm = Arc::new(FakeRuntime::new(RuntimeKind::Vm, &[], gate));
    vm.pause_failures.store(3, Ordering::SeqCst);
    let link = Arc::new(FakeLink::new(vec![assignment("vm1", "vm", 1)]));
    let agent = Running::start(vec![vm.clone()], link.clone(), config(4));
    until("vm1 runs", || phase_is(&link, "vm1", Phase::Running)).await;
    link.edit_vnf("vm1", |a| a.locked = true);
    until("vm1 ends locked", || phase_is(&link, "vm1", Phase::Locked)).await;
    agent.stop().await;
    // Three refused pauses, then one that worked: retried by the backoff alone (one change).
    assert_eq!(vm.count("pause vm1"), 4, "calls: {:?}", vm.calls());
    let reported = link.reported("vm1");
    assert!(
        reported.contains(&(
            Phase::Failed,
            "pause for lock failed: monitor socket busy".to_owned()
        )),
        "the failure was the VNF's reason meanwhile: {reported:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_start_fails_only_its_vnf_and_is_not_retried_in_its_generation() {
    let (_open, gate) = watch::channel(false);
    let mut vm = FakeRuntime::new(RuntimeKind::Vm, &[], gate);
    vm.fail_start = Some("bad".into());
    let vm = Arc::new(vm);
    let link = Arc::new(FakeLink::new(vec![
        assignment("bad", "vm", 1),
        assignment("ok1", "vm", 2),
    ]));
    let agent = Running::start(vec![vm.clone()], link.clone(), config(1));
    until("bad failed and ok1 runs", || {
        phase_is(&link, "bad", Phase::Failed) && phase_is(&link, "ok1", Phase::Running)
    })
    .await;
    // A wake-up looks at every changed VNF again; bad's generation is unchanged.
    link.edit_vnf("ok1", |a| a.locked = true);
    until("ok1 is locked", || phase_is(&link, "ok1", Phase::Locked)).await;
    agent.stop().await;
    assert_eq!(vm.count("start bad"), 1);
    assert_eq!(
        link.last("bad"),
        Some((Phase::Failed, "no such guest kernel".to_owned()))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vnf_deleted_while_it_starts_has_its_start_cancelled_and_removed() {
    // The gate never opens: only a cancelled start lets the test end.
    let (_open, gate) = watch::channel(false);
    let vm = Arc::new(FakeRuntime::new(RuntimeKind::Vm, &["vm1"], gate));
    let link = Arc::new(FakeLink::new(vec![assignment("vm1", "vm", 1)]));
    let agent = Running::start(vec![vm.clone()], link.clone(), config(4));
    until("vm1 is in its slow start", || vm.count("start vm1") == 1).await;
    link.edit(Vec::clear);
    until("vm1's start is cancelled and vm1 removed", || {
        vm.count("remove vm1") >= 1 && vm.in_flight.lock().unwrap().get("vm1") == Some(&0)
    })
    .await;
    agent.stop().await;
    let calls = vm.calls();
    assert_eq!(calls.first().map(String::as_str), Some("adopt vm1"));
    assert_eq!(calls.get(1).map(String::as_str), Some("start vm1"));
    assert_eq!(
        calls.get(2).map(String::as_str),
        Some("remove vm1"),
        "the cancelled start is removed first: {calls:?}"
    );
    assert_eq!(vm.count("start vm1"), 1, "calls: {calls:?}");
    assert_eq!(vm.most_at_once.load(Ordering::SeqCst), 1);
    assert!(
        !link
            .reported("vm1")
            .iter()
            .any(|(phase, _)| *phase == Phase::Running),
        "a cancelled start never runs: {:?}",
        link.reported("vm1")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vnf_stopped_while_it_starts_is_stopped_at_once_and_starts_again_when_asked() {
    let (open, gate) = watch::channel(false);
    let vm = Arc::new(FakeRuntime::new(RuntimeKind::Vm, &["vm1"], gate));
    let link = Arc::new(FakeLink::new(vec![assignment("vm1", "vm", 1)]));
    let agent = Running::start(vec![vm.clone()], link.clone(), config(4));
    until("vm1 is in its slow start", || vm.count("start vm1") == 1).await;
    link.edit_vnf("vm1", |a| a.desired = DesiredState::Stopped);
    until("vm1 is stopped while its start never ended", || {
        phase_is(&link, "vm1", Phase::Stopped)
    })
    .await;
    assert_eq!(vm.count("remove vm1"), 1, "calls: {:?}", vm.calls());
    assert_eq!(vm.in_flight.lock().unwrap().get("vm1"), Some(&0));

    link.edit_vnf("vm1", |a| a.desired = DesiredState::Running);
    until("vm1 starts again", || vm.count("start vm1") == 2).await;
    open.send(true).unwrap();
    until("vm1 runs", || phase_is(&link, "vm1", Phase::Running)).await;
    agent.stop().await;
    assert_eq!(vm.most_at_once.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_agent_checks_its_instances_without_listing_from_the_controller() {
    let (_open, gate) = watch::channel(false);
    let wasm = Arc::new(FakeRuntime::new(RuntimeKind::Wasm, &[], gate));
    let link = Arc::new(FakeLink::new(vec![assignment("fw1", "wasm", 1)]));
    let config = AgentConfig {
        resync: Duration::from_millis(20),
        ..config(2)
    };
    let agent = Running::start(vec![wasm.clone()], link.clone(), config);
    until("fw1 runs", || phase_is(&link, "fw1", Phase::Running)).await;
    let lists = link.passes.load(Ordering::SeqCst);
    // The instance crashes; no change is signalled: a resync notices it.
    wasm.set("fw1", InstanceState::Failed("segfault".into()));
    until("the crash is reported", || {
        phase_is(&link, "fw1", Phase::Failed)
    })
    .await;
    // Several resyncs later, the controller was still not asked again (relist: an hour).
    let looks = wasm.looks.load(Ordering::SeqCst);
    until("more resyncs ran", || {
        wasm.looks.load(Ordering::SeqCst) > looks + 3
    })
    .await;
    assert_eq!(
        link.passes.load(Ordering::SeqCst),
        lists,
        "an idle agent listed its assignments from the controller"
    );
    // A signalled change is listed at once.
    link.edit(|all| all.push(assignment("fw2", "wasm", 2)));
    until("fw2 runs", || phase_is(&link, "fw2", Phase::Running)).await;
    assert!(link.passes.load(Ordering::SeqCst) > lists);
    agent.stop().await;
}
