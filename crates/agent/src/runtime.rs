//! The one trait every runtime (vm, wasm) is driven through.
//!
//! Owns the contract between the reconcile loop and a runtime: start, stop, pause, resume,
//! observe, adopt after a restart. It must not expose a runtime's internals: the loop never asks
//! whether it talks to QEMU or wasmtime.

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use telvirt_model::api::GuestStream;
use telvirt_model::{DeviceGrant, Name, Placement, RuntimeKind, VnfDescriptor};
use telvirt_runtime_vm::StreamSecret;

/// Everything a runtime needs to run one instance.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceSpec {
    pub name: Name,
    pub descriptor: VnfDescriptor,
    /// The CPUs the scheduler gave this instance on this host.
    pub placement: Placement,
    /// A directory that belongs to this instance alone and survives agent restarts.
    pub state_dir: PathBuf,
    /// The wasm security domain of the owning authority (the vm runtime ignores it).
    pub domain: String,
    /// The host memory placement counted for it (0: not counted); a wasm module that would
    /// need more is refused.
    pub memory_bytes: u64,
}

/// How a move's stream into an instance ended without its guest running there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArrivalFailure {
    pub why: String,
    /// The stream completed, then the guest did not come up (it broke on arrival): the
    /// source holds the only copy, and no stream comes again. Otherwise the stream itself
    /// failed, and the source may stream again.
    pub stream_completed: bool,
}

/// What a runtime sees of one instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstanceState {
    /// The runtime holds no such instance.
    Absent,
    Running,
    /// Paused (vm: QMP `stop`; wasm: not scheduled).
    Paused,
    /// It ended by itself or was stopped.
    Stopped,
    /// It crashed or could not run; the reason says why.
    Failed(String),
    /// The destination of a move: it waits for (or receives) its state from the source.
    Incoming,
    /// Its state moved to another host: a stopped copy is kept here until it is stopped.
    Moved,
}

/// Why a runtime refused or failed an operation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RuntimeFailure(pub String);

impl RuntimeFailure {
    pub fn new(reason: impl std::fmt::Display) -> Self {
        Self(reason.to_string())
    }
}

/// What [`Runtime::send_state`] tells how far the stream got.
pub type StreamProgress = Box<dyn FnMut(&GuestStream) + Send>;

/// Called with an instance's name when its state changed by itself
/// ([`Runtime::on_state_change`]).
pub type StateChangeHook = Arc<dyn Fn(&Name) + Send + Sync>;

/// Where a runtime keeps the hook the agent registered ([`Runtime::on_state_change`]); a
/// clone shares it, so the tasks and data-plane nodes that see an instance change tell the
/// hook registered by then.
#[derive(Clone, Default)]
pub struct StateChangeSlot(Arc<std::sync::Mutex<Option<StateChangeHook>>>);

impl StateChangeSlot {
    /// Registers `hook` in place of any before.
    pub fn set(&self, hook: StateChangeHook) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(hook);
    }

    /// Tells the registered hook, if any, that instance `name`'s state changed by itself.
    pub fn tell(&self, name: &Name) {
        let hook = self.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(hook) = hook {
            hook(name);
        }
    }
}

/// What an instance's guest runs on, as its runtime reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestHardware {
    /// A versioned QEMU machine type (`pc-i440fx-7.2`).
    pub machine: Option<String>,
    pub accel: Option<telvirt_model::vnf::Accelerator>,
    /// A guest that arrived by a move's stream: when it was resumed here, µs since the Unix
    /// epoch by this host's clock, so the move's switch states its whole pause (from its
    /// source's stop).
    pub resumed_at_us: Option<u64>,
}

#[async_trait]
pub trait Runtime: Send + Sync + 'static {
    fn kind(&self) -> RuntimeKind;

    /// Starts the instance and returns once it is running (vm: the guest agent said ready).
    async fn start(&self, spec: &InstanceSpec) -> Result<(), RuntimeFailure>;

    /// Registers `hook`, called with an instance's name when its state changes by itself, not
    /// by a call of the agent's (vm: a guest that arrived by a move runs, or its arrival
    /// failed, or its QEMU exited; wasm: a batch or tick trapped), so the agent reports it at
    /// once instead of at its next check of every instance. Runtimes with no such changes
    /// keep this default, which drops it.
    fn on_state_change(&self, hook: StateChangeHook) {
        drop(hook);
    }

    /// Takes over an instance that survived an agent restart. `Ok(false)`: nothing to adopt.
    async fn adopt(&self, spec: &InstanceSpec) -> Result<bool, RuntimeFailure>;

    /// Stops the instance gracefully, forcing it after the runtime's timeout.
    async fn stop(&self, name: &Name) -> Result<(), RuntimeFailure>;

    async fn pause(&self, name: &Name) -> Result<(), RuntimeFailure>;

    async fn resume(&self, name: &Name) -> Result<(), RuntimeFailure>;

    async fn state(&self, name: &Name) -> InstanceState;

    /// Forgets a stopped instance and frees what it held.
    async fn remove(&self, name: &Name) -> Result<(), RuntimeFailure>;

    /// Something the last `start` of `name` wants in the VNF's reason (e.g. whether its saved
    /// state was restored). A runtime with nothing to say keeps this default.
    async fn start_note(&self, name: &Name) -> Option<String> {
        let _ = name;
        None
    }

    /// The hardware instance `name`'s guest runs on (vm: its QEMU's versioned machine type and
    /// accelerator), reported to the controller so its restarts and moves keep it. Runtimes
    /// without a guest keep this default.
    async fn hardware(&self, name: &Name) -> GuestHardware {
        let _ = name;
        GuestHardware::default()
    }

    /// Whether instance `name` was adopted (from an agent before this one) with an outgoing
    /// move stream that ended without moving it: its guest runs here, so a move that stream
    /// reached the commit point of did not happen. Runtimes whose moves never outlive their
    /// agent keep this default.
    async fn left_stream_undone(&self, name: &Name) -> bool {
        let _ = name;
        false
    }

    /// How the last move stream instance `name` took in ended without a guest running here
    /// (its QEMU is gone by then); `None` while it goes on, once the guest runs, or after a
    /// new wait. Runtimes whose moves never end that way keep this default.
    async fn arrival_failure(&self, name: &Name) -> Option<ArrivalFailure> {
        let _ = name;
        None
    }

    /// On a move's source whose stream completed (`InstanceState::Moved`): resumes the
    /// stopped copy the stream left here. Only when the guest runs nowhere else (its arrival
    /// failed, [`Runtime::arrival_failure`] at the destination). Runtimes without such copies
    /// keep this default, which refuses.
    async fn resume_moved_copy(&self, name: &Name) -> Result<(), RuntimeFailure> {
        Err(RuntimeFailure::new(format!(
            "runtime {} keeps no stopped copy of {name} to resume",
            self.kind().as_str()
        )))
    }

    /// Starts the destination of a move: the instance waits for its state from the source
    /// (vm: QEMU paused with `-incoming defer`, pinned to the placement's CPUs) and is
    /// [`InstanceState::Incoming`] until it runs. A runtime whose instances move otherwise
    /// keeps this default, which refuses.
    async fn start_incoming(&self, spec: &InstanceSpec) -> Result<(), RuntimeFailure> {
        Err(RuntimeFailure::new(format!(
            "runtime {} cannot take {} from a migration stream",
            self.kind().as_str(),
            spec.name
        )))
    }

    /// Hands `stream`, the connection a move's source opened for `name`'s state, to the
    /// instance waiting for it ([`Runtime::start_incoming`]); the state comes encrypted with
    /// `secret`, which the source holds too (`None`: in the clear). Returns once the instance took it; the instance
    /// runs once the state is in. A runtime whose instances move otherwise keeps this default,
    /// which refuses.
    async fn receive_state(
        &self,
        name: &Name,
        stream: OwnedFd,
        secret: Option<StreamSecret>,
    ) -> Result<(), RuntimeFailure> {
        drop((stream, secret));
        Err(RuntimeFailure::new(format!(
            "runtime {} cannot take {name} from a migration stream",
            self.kind().as_str()
        )))
    }

    /// Sends the running instance's state to a move's destination over `stream`, encrypted
    /// with `secret` (the destination's too; `None`: in the clear), telling `progress` how far it got and asking `commit` (when given) at the stream's final copy
    /// whether to complete it. Returns the final figures once the state is there (the instance
    /// here is then [`InstanceState::Moved`]); on error it runs on here. A runtime whose
    /// instances move otherwise keeps this default, which refuses.
    async fn send_state(
        &self,
        name: &Name,
        stream: OwnedFd,
        secret: Option<StreamSecret>,
        progress: StreamProgress,
        commit: Option<telvirt_runtime_vm::SwitchoverGate>,
    ) -> Result<GuestStream, RuntimeFailure> {
        drop((stream, secret, progress, commit));
        Err(RuntimeFailure::new(format!(
            "runtime {} cannot send {name} over a migration stream",
            self.kind().as_str()
        )))
    }

    /// Freezes `name` for its move's hand-off and returns once no batch of it runs: what
    /// arrives on its ports is queued, not processed, and its state changes no more (the last
    /// map updates can be taken). A runtime whose instances move otherwise keeps this default,
    /// which refuses.
    async fn freeze(&self, name: &Name) -> Result<(), RuntimeFailure> {
        Err(RuntimeFailure::new(format!(
            "runtime {} cannot freeze {name} for a hand-off",
            self.kind().as_str()
        )))
    }

    /// Ends a freeze (the move was cancelled): the instance goes on, the packets queued
    /// meanwhile first.
    async fn thaw(&self, name: &Name) -> Result<(), RuntimeFailure> {
        let _ = name;
        Ok(())
    }

    /// Whether `name` is frozen for a hand-off, and how many packets arrived since.
    fn frozen(&self, name: &Name) -> Option<u64> {
        let _ = name;
        None
    }

    /// Whether frozen `name`'s senders all rewired after its move (nothing brings it frames
    /// any more) and it queued everything they sent: what it queued is all it will. A runtime
    /// that does not freeze keeps this default (never).
    fn senders_drained(&self, name: &Name) -> bool {
        let _ = name;
        false
    }

    /// Ends a [`Runtime::send_state`] under way; the instance runs on here.
    async fn cancel_send(&self, name: &Name) {
        let _ = name;
    }

    /// Moves the running instance's threads to the CPUs `spec.placement` gives, without
    /// stopping it (a re-pin of the same number of vCPUs). A runtime whose instances cannot
    /// move keeps this default, which refuses.
    async fn repin(&self, spec: &InstanceSpec) -> Result<(), RuntimeFailure> {
        Err(RuntimeFailure::new(format!(
            "runtime {} cannot move {}'s threads while it runs",
            self.kind().as_str(),
            spec.name
        )))
    }

    /// Starts the running instance again from the same code with `spec`'s configuration,
    /// keeping its state; on failure the instance keeps running as it was. A runtime that
    /// cannot keeps this default, which refuses.
    async fn reconfigure(&self, spec: &InstanceSpec) -> Result<(), RuntimeFailure> {
        Err(RuntimeFailure::new(format!(
            "runtime {} cannot reconfigure {} while it runs",
            self.kind().as_str(),
            spec.name
        )))
    }

    /// Makes a running instance hold exactly `devices`: attaches what is missing, detaches what
    /// is no longer granted. A runtime without peripherals keeps this default, which refuses.
    async fn set_devices(
        &self,
        name: &Name,
        devices: &[DeviceGrant],
    ) -> Result<(), RuntimeFailure> {
        let _ = (name, devices);
        Err(RuntimeFailure::new(format!(
            "runtime {} does not support devices",
            self.kind().as_str()
        )))
    }
}
