//! The reconcile loop's decisions, driven with an in-memory runtime and link (test doubles of the
//! two traits; the real runtimes have their own tests).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use telvirt_agent::{
    Agent, ArrivalFailure, ControlLink, InstanceSpec, InstanceState, LinkError, Runtime,
    RuntimeFailure,
};
use telvirt_model::api::{Assignment, Observation};
use telvirt_model::{DesiredState, Format, Name, Phase, Placement, Role, RuntimeKind, parse_vnf};

#[derive(Default)]
struct FakeRuntime {
    /// Its kind is wasm (a vm runtime otherwise).
    wasm: bool,
    states: Mutex<HashMap<String, InstanceState>>,
    calls: Mutex<Vec<String>>,
    fail_start: Mutex<Option<String>>,
    fail_repin: Mutex<bool>,
    /// What `arrival_failure` answers.
    arrival_failure: Mutex<Option<ArrivalFailure>>,
}

impl FakeRuntime {
    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
    fn set(&self, name: &str, state: InstanceState) {
        self.states.lock().unwrap().insert(name.into(), state);
    }
    fn note(&self, call: String) {
        self.calls.lock().unwrap().push(call);
    }
}

#[async_trait]
impl Runtime for FakeRuntime {
    fn kind(&self) -> RuntimeKind {
        if self.wasm {
            RuntimeKind::Wasm
        } else {
            RuntimeKind::Vm
        }
    }
    async fn start(&self, spec: &InstanceSpec) -> Result<(), RuntimeFailure> {
        self.note(format!("start {}", spec.name));
        if let Some(reason) = self.fail_start.lock().unwrap().clone() {
            self.set(spec.name.as_str(), InstanceState::Failed(reason.clone()));
            return Err(RuntimeFailure(reason));
        }
        self.set(spec.name.as_str(), InstanceState::Running);
        Ok(())
    }
    async fn adopt(&self, spec: &InstanceSpec) -> Result<bool, RuntimeFailure> {
        self.note(format!("adopt {}", spec.name));
        Ok(false)
    }
    async fn stop(&self, name: &Name) -> Result<(), RuntimeFailure> {
        self.note(format!("stop {name}"));
        self.set(name.as_str(), InstanceState::Stopped);
        Ok(())
    }
    async fn pause(&self, name: &Name) -> Result<(), RuntimeFailure> {
        self.note(format!("pause {name}"));
        self.set(name.as_str(), InstanceState::Paused);
        Ok(())
    }
    async fn resume(&self, name: &Name) -> Result<(), RuntimeFailure> {
        self.note(format!("resume {name}"));
        self.set(name.as_str(), InstanceState::Running);
        Ok(())
    }
    async fn state(&self, name: &Name) -> InstanceState {
        self.states
            .lock()
            .unwrap()
            .get(name.as_str())
            .cloned()
            .unwrap_or(InstanceState::Absent)
    }
    async fn repin(&self, spec: &InstanceSpec) -> Result<(), RuntimeFailure> {
        self.note(format!("repin {} {:?}", spec.name, spec.placement.vcpus));
        if *self.fail_repin.lock().unwrap() {
            return Err(RuntimeFailure("sched_setaffinity: EINVAL".into()));
        }
        Ok(())
    }
    async fn remove(&self, name: &Name) -> Result<(), RuntimeFailure> {
        self.note(format!("remove {name}"));
        self.states.lock().unwrap().remove(name.as_str());
        // As the vm runtime's: a failed arrival's record goes with its instance.
        *self.arrival_failure.lock().unwrap() = None;
        Ok(())
    }
    async fn start_incoming(&self, spec: &InstanceSpec) -> Result<(), RuntimeFailure> {
        self.note(format!("start_incoming {}", spec.name));
        self.set(spec.name.as_str(), InstanceState::Incoming);
        *self.arrival_failure.lock().unwrap() = None;
        Ok(())
    }
    async fn arrival_failure(&self, _name: &Name) -> Option<ArrivalFailure> {
        self.arrival_failure.lock().unwrap().clone()
    }
    async fn resume_moved_copy(&self, name: &Name) -> Result<(), RuntimeFailure> {
        self.note(format!("resume_moved_copy {name}"));
        self.set(name.as_str(), InstanceState::Running);
        Ok(())
    }
}

#[derive(Default)]
struct FakeLink {
    assignments: Mutex<Vec<Assignment>>,
    reports: Mutex<Vec<Observation>>,
    /// The uploaded module this controller serves.
    module: Mutex<Vec<u8>>,
    /// Module fetches still to fail (as an unreachable controller's).
    module_failures: Mutex<u32>,
    /// Module fetches answer 404 (the controller keeps no such module).
    module_refused: Mutex<bool>,
}

impl FakeLink {
    fn phases(&self) -> Vec<(Phase, String)> {
        self.reports
            .lock()
            .unwrap()
            .iter()
            .map(|o| (o.phase, o.reason.clone()))
            .collect()
    }
    fn edit(&self, f: impl FnOnce(&mut Assignment)) {
        f(&mut self.assignments.lock().unwrap()[0]);
    }
}

#[async_trait]
impl ControlLink for FakeLink {
    async fn assignments(&self, _host: &str) -> Result<Vec<Assignment>, LinkError> {
        Ok(self.assignments.lock().unwrap().clone())
    }
    async fn report(&self, _host: &str, observation: Observation) -> Result<(), LinkError> {
        self.reports.lock().unwrap().push(observation);
        Ok(())
    }
    /// Cannot tell: every wait may have brought a change.
    async fn wait_for_change(&self, max_wait: Duration) -> bool {
        tokio::time::sleep(max_wait).await;
        true
    }
    async fn module(&self, _host: &str, _sha256: &str) -> Result<Option<Vec<u8>>, LinkError> {
        if *self.module_refused.lock().unwrap() {
            return Err(LinkError::Refused {
                status: 404,
                detail: "no module sha256:...".into(),
            });
        }
        let mut failures = self.module_failures.lock().unwrap();
        if *failures > 0 {
            *failures -= 1;
            return Err(LinkError::Transport("connection refused".into()));
        }
        Ok(Some(self.module.lock().unwrap().clone()))
    }
}

fn assignment(runtime: &str) -> Assignment {
    let block = if runtime == "vm" {
        "vm: { memory: 64MiB }"
    } else {
        "wasm: { module: fw.wasm }"
    };
    let text = format!(
        "apiVersion: telvirt/v1\nkind: Vnf\nmetadata: {{ name: fw1 }}\nspec:\n  runtime: {runtime}\n  {block}\n"
    );
    let descriptor = parse_vnf(text.as_bytes(), Format::Yaml).unwrap();
    Assignment {
        vnf: "fw1".parse().unwrap(),
        descriptor,
        placement: Placement {
            role: Role::Active,
            host: "h1".into(),
            vcpus: vec![vec![1]],
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

fn setup(runtime: &str) -> (Arc<FakeRuntime>, Arc<FakeLink>, Agent) {
    let rt = Arc::new(FakeRuntime::default());
    let link = Arc::new(FakeLink::default());
    link.assignments.lock().unwrap().push(assignment(runtime));
    let agent = Agent::new(
        "h1",
        vec![rt.clone() as Arc<dyn Runtime>],
        link.clone(),
        std::env::temp_dir(),
    );
    (rt, link, agent)
}

#[tokio::test]
async fn missing_runtime_fails_once_with_reason() {
    let (rt, link, agent) = setup("wasm");
    agent.reconcile_once().await.unwrap();
    agent.reconcile_once().await.unwrap();
    assert_eq!(
        link.phases(),
        vec![(
            Phase::Failed,
            "runtime wasm is not available on this host".to_owned()
        )]
    );
    assert!(rt.calls().is_empty());
}

#[tokio::test]
async fn starts_adopting_first_then_reports_running_once() {
    let (rt, link, agent) = setup("vm");
    agent.reconcile_once().await.unwrap();
    agent.reconcile_once().await.unwrap();
    assert_eq!(rt.calls(), ["adopt fw1", "start fw1"]);
    let phases: Vec<Phase> = link.phases().into_iter().map(|p| p.0).collect();
    assert_eq!(phases, [Phase::Starting, Phase::Running]);
}

#[tokio::test]
async fn lock_pauses_and_unlock_resumes() {
    let (rt, link, agent) = setup("vm");
    agent.reconcile_once().await.unwrap();
    link.edit(|a| {
        a.locked = true;
        a.generation = 2;
    });
    agent.reconcile_once().await.unwrap();
    assert_eq!(
        rt.state(&"fw1".parse().unwrap()).await,
        InstanceState::Paused
    );
    link.edit(|a| {
        a.locked = false;
        a.generation = 3;
    });
    agent.reconcile_once().await.unwrap();
    let phases: Vec<Phase> = link.phases().into_iter().map(|p| p.0).collect();
    assert_eq!(
        phases,
        [
            Phase::Starting,
            Phase::Running,
            Phase::Locked,
            Phase::Running
        ]
    );
    assert!(
        rt.calls()
            .ends_with(&["pause fw1".into(), "resume fw1".into()])
    );
}

#[tokio::test]
async fn a_new_placement_moves_the_running_instance_once_without_a_restart() {
    let (rt, link, agent) = setup("vm");
    agent.reconcile_once().await.unwrap();
    link.edit(|a| {
        a.placement.vcpus = vec![vec![2]];
        a.generation = 2;
    });
    agent.reconcile_once().await.unwrap();
    agent.reconcile_once().await.unwrap();
    assert_eq!(rt.calls(), ["adopt fw1", "start fw1", "repin fw1 [[2]]"]);
    let last = link.reports.lock().unwrap().last().cloned().unwrap();
    assert_eq!((last.phase, last.generation), (Phase::Running, 2));
    assert!(
        last.reason.contains("vCPU threads on cpus 2"),
        "{}",
        last.reason
    );
    // Only changed CPUs move it: a new generation or role alone does not.
    link.edit(|a| {
        a.generation = 3;
        a.placement.role = Role::Standby;
    });
    agent.reconcile_once().await.unwrap();
    assert_eq!(rt.calls().len(), 3, "{:?}", rt.calls());
}

#[tokio::test]
async fn an_instance_whose_threads_cannot_move_is_stopped_and_failed_not_left_on_old_cpus() {
    let (rt, link, agent) = setup("vm");
    agent.reconcile_once().await.unwrap();
    *rt.fail_repin.lock().unwrap() = true;
    link.edit(|a| {
        a.placement.vcpus = vec![vec![3]];
        a.generation = 2;
    });
    agent.reconcile_once().await.unwrap();
    assert!(
        rt.calls()
            .ends_with(&["repin fw1 [[3]]".into(), "stop fw1".into()]),
        "{:?}",
        rt.calls()
    );
    let last = link.reports.lock().unwrap().last().cloned().unwrap();
    assert_eq!((last.phase, last.generation), (Phase::Failed, 2));
    assert!(
        last.reason.contains("could not move to cpus 3"),
        "{}",
        last.reason
    );
}

#[tokio::test]
async fn desired_stopped_stops() {
    let (rt, link, agent) = setup("vm");
    agent.reconcile_once().await.unwrap();
    link.edit(|a| {
        a.desired = DesiredState::Stopped;
        a.generation = 2;
    });
    agent.reconcile_once().await.unwrap();
    let phases: Vec<Phase> = link.phases().into_iter().map(|p| p.0).collect();
    assert_eq!(
        phases,
        [
            Phase::Starting,
            Phase::Running,
            Phase::Stopping,
            Phase::Stopped
        ]
    );
    assert!(rt.calls().contains(&"stop fw1".to_owned()));
}

#[tokio::test]
async fn failed_start_is_not_retried_until_the_generation_changes() {
    let (rt, link, agent) = setup("vm");
    *rt.fail_start.lock().unwrap() = Some("qemu exited with status 1".into());
    agent.reconcile_once().await.unwrap();
    agent.reconcile_once().await.unwrap();
    let starts = |rt: &FakeRuntime| rt.calls().iter().filter(|c| c.starts_with("start")).count();
    assert_eq!(starts(&rt), 1);
    assert_eq!(
        link.phases().last().unwrap(),
        &(Phase::Failed, "qemu exited with status 1".to_owned())
    );
    *rt.fail_start.lock().unwrap() = None;
    link.edit(|a| a.generation = 2);
    agent.reconcile_once().await.unwrap();
    assert_eq!(starts(&rt), 2);
    assert_eq!(link.phases().last().unwrap().0, Phase::Running);
}

/// An agent with a module cache (returned with it) over `link`, assigned fw1 running uploaded
/// module `digest` on `rt`.
fn with_uploaded_module(
    rt: &Arc<FakeRuntime>,
    link: &Arc<FakeLink>,
    digest: &str,
) -> (Agent, tempfile::TempDir) {
    let mut a = assignment("wasm");
    a.descriptor.spec.wasm.as_mut().unwrap().module = format!("sha256:{digest}");
    link.assignments.lock().unwrap().push(a);
    let cache = tempfile::tempdir().unwrap();
    let agent = Agent::new(
        "h1",
        vec![rt.clone() as Arc<dyn Runtime>],
        link.clone(),
        std::env::temp_dir(),
    )
    .with_module_cache(telvirt_agent::ModuleCache::new(cache.path()));
    (agent, cache)
}

/// A module the controller refuses (it keeps none of that digest) fails the start: trying
/// again would not change the answer.
#[tokio::test]
async fn a_module_the_controller_refuses_fails_the_start() {
    let rt = Arc::new(FakeRuntime {
        wasm: true,
        ..FakeRuntime::default()
    });
    let link = Arc::new(FakeLink::default());
    *link.module_refused.lock().unwrap() = true;
    let (agent, _cache) = with_uploaded_module(&rt, &link, &"ab".repeat(32));
    agent.reconcile_once().await.unwrap();
    agent.reconcile_once().await.unwrap();
    let (phase, why) = link.phases().last().cloned().unwrap();
    assert_eq!(phase, Phase::Failed, "{:?}", link.phases());
    assert!(
        why.contains("404") && why.contains("fetching module"),
        "{why}"
    );
    assert!(
        rt.calls().iter().all(|c| !c.starts_with("start")),
        "{:?}",
        rt.calls()
    );
}

/// An uploaded module the controller cannot serve for a while (unreachable, failing over)
/// keeps its VNF Starting, saying why, and the start is tried again after a backoff until the
/// module comes: it is not the VNF's failure, and its generation is not given up on.
#[tokio::test]
async fn a_module_fetch_that_fails_is_tried_again_until_the_vnf_starts() {
    let rt = Arc::new(FakeRuntime {
        wasm: true,
        ..FakeRuntime::default()
    });
    let link = Arc::new(FakeLink::default());
    let bytes = b"\0asm a module's bytes".to_vec();
    let digest =
        telvirt_runtime_wasm::verify::hex(&telvirt_runtime_wasm::verify::module_hash(&bytes));
    *link.module.lock().unwrap() = bytes;
    *link.module_failures.lock().unwrap() = 2;
    let (agent, cache) = with_uploaded_module(&rt, &link, &digest);
    agent.reconcile_once().await.unwrap();
    let (phase, why) = link.phases().last().cloned().unwrap();
    assert_eq!(link.phases().len(), 1, "{:?}", link.phases());
    assert_eq!(phase, Phase::Starting);
    assert!(
        why.contains(&format!("fetching module sha256:{digest}"))
            && why.contains("connection refused")
            && why.contains("trying again"),
        "{why}"
    );
    assert!(
        !rt.calls().iter().any(|c| c.starts_with("start")),
        "{:?}",
        rt.calls()
    );
    // Retried after its backoff (a pass does not hurry it), twice: the second fetch fails too.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while link.phases().last().map(|p| p.0) != Some(Phase::Running) {
        assert!(
            std::time::Instant::now() < deadline,
            "never started: {:?}",
            link.phases()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        agent.reconcile_once().await.unwrap();
    }
    assert!(
        !link.phases().iter().any(|p| p.0 == Phase::Failed),
        "{:?}",
        link.phases()
    );
    assert_eq!(*link.module_failures.lock().unwrap(), 0);
    assert_eq!(
        rt.calls().iter().filter(|c| c.starts_with("start")).count(),
        1
    );
    assert!(cache.path().join(format!("{digest}.wasm")).is_file());
}

#[tokio::test]
async fn unassigned_instances_are_stopped_and_removed() {
    let (rt, link, agent) = setup("vm");
    agent.reconcile_once().await.unwrap();
    link.assignments.lock().unwrap().clear();
    agent.reconcile_once().await.unwrap();
    assert!(
        rt.calls()
            .ends_with(&["stop fw1".into(), "remove fw1".into()])
    );
    assert_eq!(
        rt.state(&"fw1".parse().unwrap()).await,
        InstanceState::Absent
    );
}

#[tokio::test]
async fn devices_the_runtime_refuses_keep_it_running_and_say_why_once() {
    use telvirt_model::{Device, DeviceGrant};
    let (rt, link, agent) = setup("vm");
    agent.reconcile_once().await.unwrap();
    // No devices: the default refusal of a runtime without devices is no error.
    assert_eq!(
        link.phases().last().cloned(),
        Some((Phase::Running, "running".to_owned()))
    );
    link.edit(|a| {
        a.devices = vec![DeviceGrant {
            id: "rng0".parse().unwrap(),
            device: Device::Rng,
        }];
        a.generation = 2;
    });
    agent.reconcile_once().await.unwrap();
    agent.reconcile_once().await.unwrap();
    let why = "running; devices not applied: runtime vm does not support devices".to_owned();
    assert_eq!(
        link.phases().last().cloned(),
        Some((Phase::Running, why.clone()))
    );
    let told = link.phases().iter().filter(|p| p.1 == why).count();
    assert_eq!(told, 1, "the refusal is reported once: {:?}", link.phases());
    assert_eq!(
        rt.calls(),
        ["adopt fw1", "start fw1"],
        "no restart for a device"
    );
}

#[tokio::test]
async fn an_instance_that_fails_while_it_runs_restarts_in_place_backing_off() {
    let (rt, link, agent) = setup("vm");
    agent.reconcile_once().await.unwrap();
    let starts = |rt: &FakeRuntime| rt.calls().iter().filter(|c| c.starts_with("start")).count();
    let crash = "QEMU exited without being asked (signal 9)";
    rt.set("fw1", InstanceState::Failed(crash.into()));
    let crashed_pass = std::time::Instant::now();
    agent.reconcile_once().await.unwrap();
    assert_eq!(
        link.phases().last().unwrap(),
        &(
            Phase::Failed,
            format!("{crash}; restarting in place in 1 s (restart 1)")
        )
    );
    // Not due yet: a look changes nothing (unless a loaded machine stalled this test past
    // the second, when the restart is due).
    agent.reconcile_once().await.unwrap();
    assert!(
        starts(&rt) == 1 || crashed_pass.elapsed() >= Duration::from_secs(1),
        "restarted before its second: {:?}",
        rt.calls()
    );
    // Due after a second: started again, and the reason says why.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while starts(&rt) < 2 {
        assert!(std::time::Instant::now() < deadline, "never restarted");
        tokio::time::sleep(Duration::from_millis(50)).await;
        agent.reconcile_once().await.unwrap();
    }
    assert!(
        rt.calls()
            .ends_with(&["remove fw1".into(), "start fw1".into()])
    );
    assert_eq!(
        link.phases().last().unwrap(),
        &(
            Phase::Running,
            format!("running; restarted in place 1 time (last after: {crash})")
        )
    );
    // A second crash waits twice as long.
    rt.set("fw1", InstanceState::Failed(crash.into()));
    agent.reconcile_once().await.unwrap();
    assert!(
        link.phases()
            .last()
            .unwrap()
            .1
            .ends_with("restarting in place in 2 s (restart 2)"),
        "{:?}",
        link.phases()
    );
}

/// A move's destination whose taken stream failed reports the instance failed (a move past
/// its commit point ends on that report), then waits for the guest again; one whose guest
/// broke on arrival after its stream completed reports it failed, saying why, and waits for
/// nothing (the source holds the only copy).
#[tokio::test]
async fn a_destination_whose_guest_broke_on_arrival_fails_instead_of_waiting_again() {
    let (rt, link, agent) = setup("vm");
    link.edit(|a| a.incoming_from = Some("h0".into()));
    rt.set("fw1", InstanceState::Failed("QEMU ended".into()));
    *rt.arrival_failure.lock().unwrap() = Some(ArrivalFailure {
        why: "the incoming stream ended".into(),
        stream_completed: false,
    });
    agent.reconcile_once().await.unwrap();
    let waits = |rt: &FakeRuntime| {
        rt.calls()
            .iter()
            .filter(|c| c.starts_with("start_incoming"))
            .count()
    };
    // Told, its dead instance removed; the next pass waits again.
    assert_eq!(waits(&rt), 0, "{:?}", rt.calls());
    assert_eq!(rt.calls().last().unwrap(), "remove fw1");
    assert_eq!(
        link.phases().last().unwrap(),
        &(
            Phase::Failed,
            "its guest's stream from host h0 failed: the incoming stream ended".to_owned()
        )
    );
    // The step's retry, after its backoff, waits again.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while waits(&rt) == 0 {
        assert!(std::time::Instant::now() < deadline, "never waited again");
        tokio::time::sleep(Duration::from_millis(50)).await;
        agent.reconcile_once().await.unwrap();
    }
    assert_eq!(waits(&rt), 1, "{:?}", rt.calls());
    assert_eq!(link.phases().last().unwrap().0, Phase::Starting);
    // The failure says it was the arrival's (the controller ends a committed move on it).
    let said = |phase: Phase| {
        link.reports
            .lock()
            .unwrap()
            .iter()
            .filter(|o| o.phase == phase)
            .map(|o| o.arrival_failed)
            .collect::<Vec<bool>>()
    };
    assert_eq!(said(Phase::Failed), [true]);
    assert_eq!(said(Phase::Starting), [false]);
    *rt.arrival_failure.lock().unwrap() = Some(ArrivalFailure {
        why: "the guest did not come up".into(),
        stream_completed: true,
    });
    rt.set("fw1", InstanceState::Stopped);
    link.edit(|a| a.generation = 2);
    agent.reconcile_once().await.unwrap();
    assert_eq!(waits(&rt), 1, "no second wait: {:?}", rt.calls());
    assert_eq!(
        link.phases().last().unwrap(),
        &(
            Phase::Failed,
            "its arrival from host h0 broke: the guest did not come up".to_owned()
        )
    );
    assert_eq!(said(Phase::Failed), [true, true]);
    // Told, its record goes with the instance: no later move here is taken for this one.
    assert_eq!(rt.calls().last().unwrap(), "remove fw1");
    assert_eq!(*rt.arrival_failure.lock().unwrap(), None);
}

/// A move's source holding the stopped copy of a guest that moved (`Moved`), its move ended
/// without a switch: resumed only when the assignment says so (the guest broke on arrival),
/// failed otherwise (the guest may have run where it moved).
#[tokio::test]
async fn a_moved_copy_resumes_only_when_the_assignment_says_so() {
    let (rt, link, agent) = setup("vm");
    rt.set("fw1", InstanceState::Moved);
    link.edit(|a| a.resume_moved_copy = true);
    agent.reconcile_once().await.unwrap();
    assert_eq!(rt.calls(), ["adopt fw1", "resume_moved_copy fw1"]);
    let (phase, why) = link.phases().last().unwrap().clone();
    assert_eq!(phase, Phase::Running);
    assert!(
        why.contains("runs on here from the copy its move stopped"),
        "{why}"
    );

    let (rt, link, agent) = setup("vm");
    rt.set("fw1", InstanceState::Moved);
    agent.reconcile_once().await.unwrap();
    assert_eq!(rt.calls(), ["adopt fw1", "remove fw1"]);
    assert_eq!(link.phases().last().unwrap().0, Phase::Failed);
}
