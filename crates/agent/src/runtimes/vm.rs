//! The vm runtime behind the agent's [`Runtime`] trait: maps an [`InstanceSpec`] (the
//! descriptor's `spec.vm`, the placement's vCPU and emulator CPUs, the instance's state
//! directory) onto `telvirt_runtime_vm::VmConfig` and drives `VmManager` / `VmHandle`.
//!
//! Owns that mapping, the lazily built default guest image, the accelerator decision and the
//! handles of the VMs this agent holds. It must not hold reconcile logic and must not know the
//! store: the reconcile loop decides, this adapter does.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use telvirt_model::api::{GuestStream, NicStatsView};
use telvirt_model::{Device, DeviceGrant, Name, RuntimeKind, VmSpec};
use telvirt_runtime_vm::{
    Accel, AccelChoice, AccelDecision, AccelProbe, CpuPlacement, CpuSet, DiskFormat, DiskImage,
    Error, Grant, GuestImage, HugePageSize, ImageBuilder, ImageProgress, MigrationChannel,
    MigrationProgress, MigrationTuning, Peripheral, StreamSecret, VhostUserNic, VmConfig, VmHandle,
    VmManager, VmPhase,
};
use telvirt_vhost::{NicSocket, VhostUserNode};
use tokio::sync::{Mutex, OnceCell};

use crate::dataplane::NodeDataPlane;
use crate::runtime::{
    ArrivalFailure, GuestHardware, InstanceSpec, InstanceState, Runtime, RuntimeFailure,
    StateChangeHook, StateChangeSlot, StreamProgress,
};

/// SCHED_FIFO priority of vCPU threads of a descriptor with `realtime: true`.
pub const REALTIME_PRIORITY: u8 = 50;
/// How long a start may take until the guest agent says ready (TCG on a loaded host is slow).
pub const READY_TIMEOUT: Duration = Duration::from_secs(180);
/// How long a graceful stop may take before QEMU is told to quit.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// Console lines quoted in the reason of a crashed VM.
const FAILURE_CONSOLE_LINES: usize = 3;

/// How the vm runtime is set up on this host.
#[derive(Debug, Clone)]
pub struct VmRuntimeConfig {
    /// The agent's state root: one directory per instance (`<state_root>/<name>`).
    pub state_root: PathBuf,
    /// Where the default guest image (`<cache_dir>/images`) and the accelerator probe's
    /// answer (`<cache_dir>/accel-probe.json`) are kept.
    pub cache_dir: PathBuf,
    /// The static `telvirt-guest` binary packed into the default guest.
    pub guest_binary: PathBuf,
    pub accel: AccelChoice,
    /// `qemu-system-x86_64` unless set.
    pub qemu: Option<PathBuf>,
    /// How its QEMUs are confined (ADR 044, ADR 068).
    pub confinement: telvirt_runtime_vm::Confinement,
}

/// Ready to start VMs: the default image is built and the accelerator decided.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub image: GuestImage,
    pub accel: AccelDecision,
    manager: VmManager,
}

/// The `vm` runtime.
pub struct VmRuntime {
    config: VmRuntimeConfig,
    prepared: OnceCell<Prepared>,
    /// Serialises preparation so one image build runs at a time.
    preparing: Mutex<()>,
    handles: Mutex<HashMap<Name, VmHandle>>,
    /// The data plane VMs' NICs join (`None`: VMs start without their `spec.vm.nics`).
    dataplane: Option<Arc<NodeDataPlane>>,
    /// The NIC sockets of each VM with NICs on the data plane (dropping them ends the NICs).
    nics: std::sync::Mutex<HashMap<Name, Vec<NicSocket>>>,
    /// The move destinations whose guest stream is being taken in, each with the token of
    /// the watch that follows it ([`ArrivalWatch`]).
    receiving: Arc<std::sync::Mutex<HashMap<Name, u64>>>,
    /// How the last arrival of each guest that came by a migration stream ended.
    arrivals: Arc<std::sync::Mutex<HashMap<Name, Arrival>>>,
    /// Told when an arrival ended ([`Runtime::on_state_change`]).
    state_change: StateChangeSlot,
}

/// The token of the next [`ArrivalWatch`].
static NEXT_ARRIVAL_WATCH: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// How often a watch tries to kill the QEMU of an arrival that failed before it gives up.
const KILL_TRIES: usize = 3;

/// A watch of the stream a destination took in: its name's entry in `receiving`, which goes
/// when the watch is dropped (however its task ends), unless a `remove` took it first or a
/// newer watch holds the name.
struct ArrivalWatch {
    receiving: Arc<std::sync::Mutex<HashMap<Name, u64>>>,
    name: Name,
    token: u64,
}

impl ArrivalWatch {
    /// Whether this watch still holds its name in `receiving` (that table, locked).
    fn holds(&self, receiving: &HashMap<Name, u64>) -> bool {
        receiving.get(&self.name) == Some(&self.token)
    }

    /// Ends the watch with how its arrival ended, noted in `arrivals` while the watch still
    /// holds its name (not after a `remove`, nor over a newer watch), before the name leaves
    /// `receiving` (a state read in between says `Incoming`, not a state without the note).
    /// Whether it was noted.
    fn settle(self, arrivals: &std::sync::Mutex<HashMap<Name, Arrival>>, how: Arrival) -> bool {
        // Under the table's lock: a `remove` (which clears `receiving` first) waits for it.
        let receiving = lock(&self.receiving);
        let current = self.holds(&receiving);
        if current {
            lock(arrivals).insert(self.name.clone(), how);
        }
        drop(receiving);
        current
    }
}

impl Drop for ArrivalWatch {
    fn drop(&mut self) {
        let mut receiving = lock(&self.receiving);
        if self.holds(&receiving) {
            receiving.remove(&self.name);
        }
    }
}

/// How a guest's arrival by a migration stream ended.
#[derive(Debug, Clone)]
enum Arrival {
    /// It runs here; what its start note says.
    Running(String),
    /// It did not come to run here (its QEMU killed, the stream it took then ended): why,
    /// and whether that stream had completed.
    Failed(ArrivalFailure),
}

/// A guest stream's channel over the connection `stream`: sealed with `secret`, or in the
/// clear without one.
fn channel_of(stream: OwnedFd, secret: Option<StreamSecret>) -> MigrationChannel {
    match secret {
        Some(secret) => MigrationChannel::encrypted(stream, secret),
        None => MigrationChannel::Socket(stream),
    }
}

/// How long a guest's migration stream may run, on either end, before it is given up (the
/// guest then runs on at its source).
const MOVE_STREAM_DEADLINE: Duration = Duration::from_secs(120);
/// How much longer the destination waits for the stream than the source streams: the source
/// may reach its end just as its deadline passes.
const INCOMING_GRACE: Duration = Duration::from_secs(30);

/// A migration's progress as the API reports it, with the pause limit its stream was set.
fn guest_stream(p: &MigrationProgress, downtime_limit_ms: u64) -> GuestStream {
    GuestStream {
        status: p.status.clone(),
        total_ms: p.total_ms,
        transferred_bytes: p.transferred_bytes,
        remaining_bytes: p.remaining_bytes,
        total_bytes: p.total_bytes,
        dirty_pages_per_s: p.dirty_pages_per_s,
        downtime_ms: p.downtime_ms,
        stopped_at_us: p.stopped_at_us,
        commit_point_at_us: p.commit_point_at_us,
        continued_at_us: p.continued_at_us,
        completed_at_us: p.completed_at_us,
        opened_ms: 0,
        commit_ahead: false,
        downtime_limit_ms,
    }
}

fn failure(e: impl std::fmt::Display) -> RuntimeFailure {
    RuntimeFailure::new(e)
}

/// A table's guard, also after a panic elsewhere left its lock poisoned.
fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl VmRuntime {
    pub fn new(config: VmRuntimeConfig) -> Self {
        Self {
            config,
            prepared: OnceCell::new(),
            preparing: Mutex::new(()),
            handles: Mutex::new(HashMap::new()),
            dataplane: None,
            nics: std::sync::Mutex::new(HashMap::new()),
            receiving: Arc::new(std::sync::Mutex::new(HashMap::new())),
            arrivals: Arc::new(std::sync::Mutex::new(HashMap::new())),
            state_change: StateChangeSlot::default(),
        }
    }

    /// The version (`major.minor`) of the QEMU this runtime starts, as it reports it; `None`
    /// when it cannot be run.
    pub async fn qemu_version(&self) -> Option<String> {
        let (major, minor) = self.plain_manager().qemu_version().await?;
        Some(format!("{major}.{minor}"))
    }

    /// The i440FX machine types of that QEMU, newest first (empty when it cannot be run).
    pub async fn machine_types(&self) -> Vec<String> {
        self.plain_manager().machine_types().await.versioned
    }

    /// Puts `name` in `receiving` for a new watch of the stream it takes in; `None` when
    /// one already follows a stream of it.
    fn begin_receiving(&self, name: &Name) -> Option<ArrivalWatch> {
        let mut receiving = lock(&self.receiving);
        if receiving.contains_key(name) {
            return None;
        }
        let token = NEXT_ARRIVAL_WATCH.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        receiving.insert(name.clone(), token);
        Some(ArrivalWatch {
            receiving: Arc::clone(&self.receiving),
            name: name.clone(),
            token,
        })
    }

    /// Holds `handle` as instance `name`'s QEMU and tells the agent when that QEMU exits (a
    /// crash is then reported at once, not at the agent's next look at every instance; an
    /// exit it asked for costs one more look).
    async fn hold(&self, name: &Name, handle: VmHandle) {
        let exited = handle.on_exit();
        let told = self.state_change.clone();
        let who = name.clone();
        tokio::spawn(async move {
            if exited.await.is_some() {
                told.tell(&who);
            }
        });
        self.handles.lock().await.insert(name.clone(), handle);
    }

    /// Waits (in a task) for the stream `name` takes in to end, then resumes the arrived
    /// guest here, or kills the QEMU that waited for it. `name` is in `receiving` until then
    /// (`watch`'s entry, gone however the task ends).
    fn watch_arrival(&self, watch: ArrivalWatch, handle: VmHandle) {
        let arrivals = Arc::clone(&self.arrivals);
        // Once its end is noted and the name is out of `receiving` (its state no longer
        // `Incoming`): the agent reports it now, and the move switches (or ends) at once.
        let told = self.state_change.clone();
        let name = watch.name.clone();
        tokio::spawn(async move {
            // Longer than the source's wait: this clock starts before the source's stream.
            let finishing = handle.finish_incoming(MOVE_STREAM_DEADLINE + INCOMING_GRACE);
            tokio::pin!(finishing);
            // The guest resumed here (its agent not yet asked): reported at once with when it
            // resumed, so its traffic comes here before the move switches (ADR 062).
            let finished = tokio::select! {
                finished = &mut finishing => finished,
                () = handle.arrival_resumed() => {
                    told.tell(&name);
                    finishing.await
                }
            };
            match finished {
                Ok(uptime) => {
                    // It answered: it runs here. The uptime it stated then says it was not
                    // booted again (asked no more: a guest just arrived under emulation
                    // answers slowly while its code is translated again, and the switch
                    // waits for this).
                    let uptime = uptime
                        .map(|up| format!("; its guest has been up {} s", up.as_secs()))
                        .unwrap_or_default();
                    let note = format!("arrived by a migration stream, running here{uptime}");
                    tracing::info!(vnf = %name, "{note}");
                    if watch.settle(&arrivals, Arrival::Running(note)) {
                        told.tell(&name);
                    }
                }
                // Noted only once its QEMU is gone: the report of it lets the source resume
                // the copy it kept, which must not run beside this one.
                Err(e) => {
                    let stream_completed = matches!(e, Error::ArrivalBroken { .. });
                    if stream_completed {
                        tracing::warn!(vnf = %name, "the guest broke on its arrival: {e}");
                    } else {
                        tracing::warn!(vnf = %name, "the guest's migration stream did not come in: {e}");
                    }
                    let mut killed = handle.kill().await;
                    for _ in 1..KILL_TRIES {
                        let Err(k) = &killed else { break };
                        tracing::warn!(vnf = %name, "its QEMU could not be killed: {k}; again");
                        killed = handle.kill().await;
                    }
                    match killed {
                        // Not when a `remove` ended the watch meanwhile (the instance is gone,
                        // and a later move here is not this one).
                        Ok(()) => {
                            let failed = ArrivalFailure {
                                why: e.to_string(),
                                stream_completed,
                            };
                            if watch.settle(&arrivals, Arrival::Failed(failed)) {
                                told.tell(&name);
                            }
                        }
                        Err(k) => {
                            tracing::warn!(vnf = %name, "its QEMU could not be killed: {k}; its arrival stays unsettled")
                        }
                    }
                }
            }
        });
    }

    /// VMs' `spec.vm.nics` become vhost-user NICs on `dataplane`, each a port of a panel node
    /// named after the VNF (as a wasm VNF's ports are).
    pub fn with_dataplane(mut self, dataplane: Arc<NodeDataPlane>) -> Self {
        self.dataplane = Some(dataplane);
        self
    }

    /// Opens the NICs of `spec` ([`Self::open_nics`]) into `cfg`, with the shared guest RAM
    /// their backend maps. The NICs try to connect before QEMU starts: QEMU serves their
    /// sockets and waits for them while it starts.
    fn nics_into(&self, spec: &InstanceSpec, cfg: &mut VmConfig) -> Result<(), RuntimeFailure> {
        cfg.vhost_user_nics = self.open_nics(spec)?;
        if !cfg.vhost_user_nics.is_empty() && cfg.hugepages.is_none() {
            cfg.shared_memory = true;
        }
        Ok(())
    }

    /// Opens one vhost-user socket per `spec.vm.nics` entry in the instance's state directory
    /// and puts the VM's node on the data plane (on the worker of its first emulator CPU, or
    /// the first worker); answers the NICs for QEMU's command line. Nothing is left behind on
    /// error.
    fn open_nics(&self, spec: &InstanceSpec) -> Result<Vec<VhostUserNic>, RuntimeFailure> {
        let nics = spec
            .descriptor
            .spec
            .vm
            .as_ref()
            .map(|vm| vm.nics.clone())
            .unwrap_or_default();
        if nics.is_empty() {
            return Ok(Vec::new());
        }
        let Some(dp) = &self.dataplane else {
            tracing::warn!(
                vnf = %spec.name,
                "spec.vm.nics: this host has no data plane for VMs; the vm starts without them"
            );
            return Ok(Vec::new());
        };
        self.close_nics(&spec.name);
        std::fs::create_dir_all(&spec.state_dir)
            .map_err(|e| failure(format!("creating {}: {e}", spec.state_dir.display())))?;
        let mut sockets = Vec::new();
        let mut config = Vec::new();
        for (i, nic) in nics.iter().enumerate() {
            let path = spec.state_dir.join(format!("nic-{}.sock", nic.port));
            let socket = NicSocket::open(&path, &format!("{}.{}", spec.name, nic.port))
                .map_err(|e| failure(format!("spec.vm.nics[{i}] ({}): {e}", nic.port)))?;
            config.push(VhostUserNic {
                // Port names may be longer than QEMU ids should be: the NIC's index names it.
                id: format!("nic{i}"),
                socket: path,
                mac: nic_mac(spec.name.as_str(), i),
            });
            sockets.push(socket);
        }
        let ports: Vec<&str> = nics.iter().map(|n| n.port.as_str()).collect();
        let worker = spec
            .placement
            .emulator_cpus
            .first()
            .and_then(|c| dp.worker_for_cpu(*c))
            .unwrap_or(0);
        let node = VhostUserNode::new(sockets.iter().map(NicSocket::port).collect());
        let _ = dp.remove_node(spec.name.as_str());
        dp.add_node(spec.name.as_str(), &ports, worker, Box::new(node))
            .map_err(failure)?;
        self.nic_table().insert(spec.name.clone(), sockets);
        Ok(config)
    }

    /// The counters of VM `name`'s NICs on this host, in `spec.vm.nics` order (`None`: no
    /// NICs of a VM `name` are open here).
    pub fn nic_stats(&self, name: &Name) -> Option<Vec<NicStatsView>> {
        let table = self.nic_table();
        let prefix = format!("{name}.");
        table.get(name).map(|sockets| {
            sockets
                .iter()
                .map(|nic| {
                    let c = nic.stats().snapshot();
                    NicStatsView {
                        port: nic
                            .name()
                            .strip_prefix(&prefix)
                            .unwrap_or(nic.name())
                            .to_owned(),
                        connected: nic.is_running(),
                        frames_to_guest: c.to_guest,
                        frames_from_guest: c.from_guest,
                        dropped_too_big: c.to_guest_too_big,
                        dropped_bad: c.from_guest_bad,
                        dropped_no_buffer: c.no_buffer,
                        connections: c.connections,
                    }
                })
                .collect()
        })
    }

    /// Takes VM `name`'s node off the data plane and closes its NIC sockets.
    fn close_nics(&self, name: &Name) {
        let sockets = self.nic_table().remove(name);
        if sockets.is_some()
            && let Some(dp) = &self.dataplane
        {
            let _ = dp.remove_node(name.as_str());
        }
        // Dropped outside the table's lock: each joins its accept thread.
        drop(sockets);
    }

    fn nic_table(&self) -> std::sync::MutexGuard<'_, HashMap<Name, Vec<NicSocket>>> {
        lock(&self.nics)
    }

    fn arrival_table(&self) -> std::sync::MutexGuard<'_, HashMap<Name, Arrival>> {
        lock(&self.arrivals)
    }

    /// The accelerator this runtime runs guests with, when known without a probe boot (its
    /// configured choice, or the probe's cached answer): its host reports it, so a KVM guest
    /// is not moved to a host that would emulate it.
    pub fn known_accel(&self) -> Option<Accel> {
        if let Some(p) = self.prepared.get() {
            return Some(p.accel.accel);
        }
        let mut probe = AccelProbe::new(&self.config.cache_dir);
        if let Some(q) = &self.config.qemu {
            probe = probe.qemu_binary(q);
        }
        probe.known(self.config.accel)
    }

    /// A manager for adopting, removing and reading consoles: none of that boots a guest, so
    /// it needs neither the image nor the accelerator decision.
    fn plain_manager(&self) -> VmManager {
        self.with_qemu(VmManager::new(
            &self.config.state_root,
            AccelProbe::new(&self.config.cache_dir),
        ))
    }

    /// `manager` with the configured QEMU and confinement.
    fn with_qemu(&self, manager: VmManager) -> VmManager {
        let manager = manager.confinement(self.config.confinement.clone());
        match &self.config.qemu {
            Some(q) => manager.qemu_binary(q),
            None => manager,
        }
    }

    /// Builds the default guest image (or finds it in the cache) and resolves the
    /// accelerator, once; `progress` sees the image build steps.
    pub async fn prepare(
        &self,
        progress: impl FnMut(&ImageProgress) + Send + 'static,
    ) -> Result<Prepared, RuntimeFailure> {
        if let Some(p) = self.prepared.get() {
            return Ok(p.clone());
        }
        let _one = self.preparing.lock().await;
        if let Some(p) = self.prepared.get() {
            return Ok(p.clone());
        }
        let image = build_image(
            self.config.cache_dir.clone(),
            self.config.guest_binary.clone(),
            progress,
        )
        .await?;
        let mut probe =
            AccelProbe::new(&self.config.cache_dir).with_guest(&image.kernel, &image.initrd);
        if let Some(q) = &self.config.qemu {
            probe = probe.qemu_binary(q);
        }
        let accel = probe
            .resolve(self.config.accel)
            .await
            .map_err(|e| failure(format!("choosing the accelerator: {e}")))?;
        match &accel.warning {
            Some(w) => tracing::warn!("vm runtime: {w}"),
            None => tracing::info!(
                "vm runtime: accelerator {} ({})",
                accel.accel.as_str(),
                accel.reason
            ),
        }
        let manager = self.with_qemu(VmManager::new(&self.config.state_root, probe));
        let prepared = Prepared {
            image,
            accel,
            manager,
        };
        let _ = self.prepared.set(prepared.clone());
        Ok(prepared)
    }

    /// The handle of a VM this runtime holds.
    pub async fn handle(&self, name: &Name) -> Option<VmHandle> {
        self.handles.lock().await.get(name).cloned()
    }

    /// The serial console log of an instance, whether or not it runs.
    pub fn console_log(&self, name: &Name) -> PathBuf {
        self.plain_manager().console_log(name.as_str())
    }
}

/// Builds the default guest image on a blocking thread.
pub async fn build_image(
    cache_dir: PathBuf,
    guest_binary: PathBuf,
    mut progress: impl FnMut(&ImageProgress) + Send + 'static,
) -> Result<GuestImage, RuntimeFailure> {
    tokio::task::spawn_blocking(move || {
        ImageBuilder::new(&cache_dir, &guest_binary).build(&mut progress)
    })
    .await
    .map_err(|e| failure(format!("building the default guest image: {e}")))?
    .map_err(|e| failure(format!("building the default guest image: {e}")))
}

/// The accelerator instance `spec` starts with: the one its descriptor names (a move's
/// destination is sent its source's), else this runtime's `configured` choice. A guest named
/// to KVM is refused where `host`, this runtime's decision, is TCG (its KVM did not boot the
/// probe guest, or the agent runs `--accel tcg`).
fn guest_accel(
    spec: &InstanceSpec,
    host: &AccelDecision,
    configured: AccelChoice,
) -> Result<AccelChoice, RuntimeFailure> {
    match spec.descriptor.spec.vm.as_ref().and_then(|vm| vm.accel) {
        None => Ok(configured),
        Some(Accel::Tcg) => Ok(AccelChoice::Tcg),
        Some(Accel::Kvm) if host.accel == Accel::Kvm => Ok(AccelChoice::Kvm),
        Some(Accel::Kvm) => Err(failure(format!(
            "spec.vm.accel: vnf {}'s guest runs under KVM, and this host runs guests under TCG ({}): it cannot take it",
            spec.name, host.reason
        ))),
    }
}

/// The `VmConfig` of an instance. `image` is the default guest, used when the descriptor names
/// no kernel.
pub fn vm_config(
    spec: &InstanceSpec,
    image: &GuestImage,
    accel: AccelChoice,
) -> Result<VmConfig, RuntimeFailure> {
    let vm: &VmSpec = spec.descriptor.spec.vm.as_ref().ok_or_else(|| {
        failure(format!(
            "vnf {} has runtime vm but no spec.vm block",
            spec.name
        ))
    })?;
    const MIB: u64 = 1 << 20;
    let hugepages = match vm.hugepages.map(|h| h.bytes()) {
        None => None,
        Some(b) if b == 2 * MIB => Some(HugePageSize::Size2M),
        Some(b) if b == 1 << 30 => Some(HugePageSize::Size1G),
        Some(b) => {
            return Err(failure(format!(
                "spec.vm.hugepages: {b} bytes is not 2MiB or 1GiB"
            )));
        }
    };
    let custom_kernel = vm.kernel.is_some();
    let (kernel, initrd) = match &vm.kernel {
        Some(k) => (PathBuf::from(k), vm.initrd.as_ref().map(PathBuf::from)),
        None => (image.kernel.clone(), Some(image.initrd.clone())),
    };
    let mut cfg = VmConfig::new(spec.name.as_str(), kernel, PathBuf::new());
    cfg.initrd = initrd;
    cfg.vcpus = u32::try_from(spec.placement.vcpus.len())
        .unwrap_or(u32::MAX)
        .max(spec.descriptor.spec.cpu.effective_count());
    cfg.memory_mib = vm.memory.bytes() / MIB;
    cfg.hugepages = hugepages;
    cfg.shared_memory = vm.shared_memory;
    cfg.lock_memory = vm.lock_memory;
    cfg.append = vm.cmdline.clone();
    cfg.machine = vm.machine.clone();
    cfg.cpu_model = vm.cpu_model.clone();
    cfg.disk = vm.disk.as_ref().map(|d| DiskImage {
        path: PathBuf::from(d),
        format: disk_format(d),
    });
    cfg.cpu = cpu_placement(spec)?;
    cfg.accel = accel;
    // Only the default guest carries the telvirt guest agent.
    cfg.wait_for_agent = !custom_kernel;
    cfg.state_dir = Some(spec.state_dir.clone());
    cfg.ready_timeout = READY_TIMEOUT;
    cfg.stop_timeout = STOP_TIMEOUT;
    Ok(cfg)
}

/// Where a vm VNF's threads run, as its placement says.
fn cpu_placement(spec: &InstanceSpec) -> Result<CpuPlacement, RuntimeFailure> {
    let vm = spec.descriptor.spec.vm.as_ref().ok_or_else(|| {
        failure(format!(
            "vnf {} has runtime vm but no spec.vm block",
            spec.name
        ))
    })?;
    Ok(CpuPlacement {
        vcpu_cpus: spec.placement.vcpus.iter().map(|c| cpu_set(c)).collect(),
        emulator_cpus: (!spec.placement.emulator_cpus.is_empty())
            .then(|| cpu_set(&spec.placement.emulator_cpus)),
        realtime_priority: vm.realtime.then_some(REALTIME_PRIORITY),
    })
}

fn cpu_set(cpus: &[u32]) -> CpuSet {
    CpuSet(
        cpus.iter()
            .filter_map(|&c| usize::try_from(c).ok())
            .collect(),
    )
}

fn disk_format(path: &str) -> DiskFormat {
    if path.ends_with(".qcow2") {
        DiskFormat::Qcow2
    } else {
        DiskFormat::Raw
    }
}

/// The runtime's peripheral for a granted device.
pub fn grant(device: &DeviceGrant) -> Grant {
    let peripheral = match &device.device {
        Device::Rng => Peripheral::VirtioRng,
        Device::Net { tap } => Peripheral::VirtioNet {
            tap: tap.clone(),
            mac: None,
        },
        Device::Serial { name } => Peripheral::VirtioSerial { name: name.clone() },
        Device::Blk { path, read_only } => Peripheral::VirtioBlk {
            path: PathBuf::from(path),
            format: disk_format(path),
            read_only: *read_only,
        },
    };
    Grant {
        id: device.id.to_string(),
        peripheral,
    }
}

/// A locally administered unicast MAC for NIC `index` of VM `vnf`: `52`, four bytes of a hash
/// of the name, the index.
fn nic_mac(vnf: &str, index: usize) -> String {
    // FNV-1a: stable across builds and platforms.
    let h = vnf.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    let b = h.to_be_bytes();
    format!(
        "52:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        b[0], b[1], b[2], b[3], index as u8
    )
}

fn has_vm_state(dir: &Path) -> bool {
    dir.join("vm.json").is_file()
}

#[async_trait]
impl Runtime for VmRuntime {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Vm
    }

    fn on_state_change(&self, hook: StateChangeHook) {
        self.state_change.set(hook);
    }

    async fn start(&self, spec: &InstanceSpec) -> Result<(), RuntimeFailure> {
        // The first vm VNF builds the guest image (or finds it cached) and probes the
        // accelerator; the others find both done.
        let prepared = self
            .prepare(|p| tracing::info!("guest image: [{}/{}] {}", p.step, p.total, p.message))
            .await?;
        let accel = guest_accel(spec, &prepared.accel, self.config.accel)?;
        let mut cfg = vm_config(spec, &prepared.image, accel)?;
        self.nics_into(spec, &mut cfg)?;
        let handle = match prepared.manager.start(cfg).await {
            Ok(h) => h,
            Err(e) => {
                self.close_nics(&spec.name);
                return Err(failure(e));
            }
        };
        tracing::info!(
            vnf = %spec.name,
            pid = handle.pid(),
            accel = handle.accel().as_str(),
            "vm running"
        );
        self.arrival_table().remove(&spec.name);
        self.hold(&spec.name, handle).await;
        Ok(())
    }

    async fn start_note(&self, name: &Name) -> Option<String> {
        match self.arrival_table().get(name)? {
            Arrival::Running(note) => Some(note.clone()),
            Arrival::Failed(_) => None,
        }
    }

    async fn arrival_failure(&self, name: &Name) -> Option<ArrivalFailure> {
        match self.arrival_table().get(name)? {
            Arrival::Failed(failed) => Some(failed.clone()),
            Arrival::Running(_) => None,
        }
    }

    async fn resume_moved_copy(&self, name: &Name) -> Result<(), RuntimeFailure> {
        let handle = self
            .handle(name)
            .await
            .ok_or_else(|| failure(format!("vm {name} is not held by this agent")))?;
        handle.resume_moved_copy().await.map_err(failure)
    }

    async fn hardware(&self, name: &Name) -> GuestHardware {
        let Some(handle) = self.handle(name).await else {
            return GuestHardware::default();
        };
        GuestHardware {
            // Versioned only: `pc` (its QEMU's list could not be read) says nothing to keep.
            machine: handle
                .config()
                .machine
                .clone()
                .filter(|m| telvirt_model::vnf::machine_version(m).is_some()),
            accel: Some(handle.accel()),
            // Kept by the handle (the resume that ended its arrival; none for a guest that did
            // not arrive by a stream), so the first report of it running has it.
            resumed_at_us: handle.resumed_at_us(),
        }
    }

    async fn left_stream_undone(&self, name: &Name) -> bool {
        self.handle(name)
            .await
            .is_some_and(|h| h.outgoing_stream_undone())
    }

    async fn start_incoming(&self, spec: &InstanceSpec) -> Result<(), RuntimeFailure> {
        let prepared = self
            .prepare(|p| tracing::info!("guest image: [{}/{}] {}", p.step, p.total, p.message))
            .await?;
        // Disks do not move (the controller refuses such moves). The NICs do: the incoming
        // QEMU needs the same devices and the same shared RAM as the source's (its panel node
        // stays out of every network until the switch makes this host the VM's).
        // The guest's accelerator is pinned by the move: a KVM guest is refused here when
        // this host runs guests under TCG.
        let accel = guest_accel(spec, &prepared.accel, self.config.accel)?;
        let mut cfg = vm_config(spec, &prepared.image, accel)?;
        self.nics_into(spec, &mut cfg)?;
        // The stream comes over one passed socket: multifd off on both ends (the pause limit,
        // by this QEMU's version here, matters only at the source).
        let qemu = prepared.manager.qemu_caps().await.version;
        let tuning =
            MigrationTuning::tuned(accel.or_decided(prepared.accel.accel), qemu).over_one_stream();
        let handle = match prepared.manager.launch_incoming(cfg, &tuning).await {
            Ok(h) => h,
            Err(e) => {
                self.close_nics(&spec.name);
                return Err(failure(e));
            }
        };
        tracing::info!(vnf = %spec.name, pid = handle.pid(), "vm waiting for its guest's migration stream");
        self.arrival_table().remove(&spec.name);
        self.hold(&spec.name, handle).await;
        Ok(())
    }

    async fn receive_state(
        &self,
        name: &Name,
        stream: OwnedFd,
        secret: Option<StreamSecret>,
    ) -> Result<(), RuntimeFailure> {
        let handle = self
            .handle(name)
            .await
            .filter(|h| h.phase() == VmPhase::Incoming)
            .ok_or_else(|| {
                failure(format!(
                    "vm {name} does not wait for a migration stream here"
                ))
            })?;
        let Some(watch) = self.begin_receiving(name) else {
            return Err(failure(format!(
                "vm {name} takes a migration stream already"
            )));
        };
        // Should this fail, the watch ends with it.
        handle
            .receive(&channel_of(stream, secret))
            .await
            .map_err(failure)?;
        self.watch_arrival(watch, handle);
        Ok(())
    }

    async fn send_state(
        &self,
        name: &Name,
        stream: OwnedFd,
        secret: Option<StreamSecret>,
        mut progress: StreamProgress,
        commit: Option<telvirt_runtime_vm::SwitchoverGate>,
    ) -> Result<GuestStream, RuntimeFailure> {
        let handle = self
            .handle(name)
            .await
            .ok_or_else(|| failure(format!("vm {name} is not held by this agent")))?;
        let tuning = handle.tuning().over_one_stream();
        let done = handle
            .migrate_to_gated(
                &channel_of(stream, secret),
                &tuning,
                MOVE_STREAM_DEADLINE,
                |p| progress(&guest_stream(p, tuning.downtime_limit_ms)),
                commit,
            )
            .await
            .map_err(failure)?;
        tracing::info!(
            vnf = %name,
            "guest moved: {} MiB in {} ms, stopped for {:?} ms",
            done.transferred_bytes >> 20,
            done.total_ms,
            done.downtime_ms
        );
        Ok(guest_stream(&done, tuning.downtime_limit_ms))
    }

    async fn cancel_send(&self, name: &Name) {
        if let Some(handle) = self.handle(name).await
            && let Err(e) = handle.cancel_migration().await
        {
            tracing::warn!(vnf = %name, "cancelling the guest's migration stream: {e}");
        }
    }

    async fn adopt(&self, spec: &InstanceSpec) -> Result<bool, RuntimeFailure> {
        if self.handles.lock().await.contains_key(&spec.name) || !has_vm_state(&spec.state_dir) {
            return Ok(false);
        }
        match self.plain_manager().adopt_dir(&spec.state_dir).await {
            Ok(handle) => {
                tracing::info!(vnf = %spec.name, pid = handle.pid(), "re-adopted running QEMU");
                // Its NICs connect to QEMU's sockets again: QEMU serves them and takes the new
                // connection in place of the one that ended with the previous agent.
                if let Err(e) = self.open_nics(spec) {
                    tracing::warn!(vnf = %spec.name, "its spec.vm.nics stay disconnected: {}", e.0);
                }
                // A move's destination whose stream the agent before took (not yet sending,
                // running, or completed with nobody to resume the guest): followed as that
                // agent would have, its NICs connected first. One still waiting for its stream
                // takes it as usual.
                if handle.phase() == VmPhase::Incoming && handle.incoming_stream_taken() {
                    tracing::info!(vnf = %spec.name, "following the guest stream it was taking in");
                    if let Some(watch) = self.begin_receiving(&spec.name) {
                        self.watch_arrival(watch, handle.clone());
                    }
                }
                self.hold(&spec.name, handle).await;
                Ok(true)
            }
            Err(Error::NotAdoptable { .. }) => Ok(false),
            Err(e) => Err(failure(e)),
        }
    }

    async fn stop(&self, name: &Name) -> Result<(), RuntimeFailure> {
        let Some(handle) = self.handle(name).await else {
            return Ok(());
        };
        let how = handle.stop().await.map_err(failure)?;
        tracing::info!(vnf = %name, "vm stopped ({how:?})");
        // Its NICs stop connecting to a QEMU that is gone; a start opens them again.
        self.close_nics(name);
        Ok(())
    }

    async fn repin(&self, spec: &InstanceSpec) -> Result<(), RuntimeFailure> {
        let handle = self
            .handle(&spec.name)
            .await
            .ok_or_else(|| failure(format!("vm {} is not held by this agent", spec.name)))?;
        for w in handle.repin(&cpu_placement(spec)?).await.map_err(failure)? {
            tracing::warn!(vnf = %spec.name, "{w}");
        }
        Ok(())
    }

    async fn pause(&self, name: &Name) -> Result<(), RuntimeFailure> {
        let handle = self
            .handle(name)
            .await
            .ok_or_else(|| failure(format!("vm {name} is not held by this agent")))?;
        handle.pause().await.map_err(failure)
    }

    async fn resume(&self, name: &Name) -> Result<(), RuntimeFailure> {
        let handle = self
            .handle(name)
            .await
            .ok_or_else(|| failure(format!("vm {name} is not held by this agent")))?;
        handle.resume().await.map_err(failure)
    }

    async fn state(&self, name: &Name) -> InstanceState {
        let Some(handle) = self.handle(name).await else {
            return InstanceState::Absent;
        };
        match handle.phase() {
            // The stream taken in still decides: a guest resumed after it runs here once it
            // answered, and a QEMU that ended meanwhile is noted as a failed arrival first
            // (its arrival may still break; the next read after that has the record).
            _ if lock(&self.receiving).contains_key(name) => InstanceState::Incoming,
            VmPhase::Starting | VmPhase::Running => InstanceState::Running,
            VmPhase::Paused => InstanceState::Paused,
            // A move's destination holds the guest stopped until the stream is in.
            VmPhase::Incoming => InstanceState::Incoming,
            // A move's source: the guest runs elsewhere, a stopped copy waits here.
            VmPhase::Migrated => InstanceState::Moved,
            VmPhase::Stopping | VmPhase::Stopped => InstanceState::Stopped,
            VmPhase::Failed => {
                let reason = match handle.failure() {
                    Some(f) => {
                        let tail: Vec<String> = f
                            .console_tail
                            .iter()
                            .rev()
                            .take(FAILURE_CONSOLE_LINES)
                            .rev()
                            .cloned()
                            .collect();
                        if tail.is_empty() {
                            f.reason
                        } else {
                            format!("{}; console: {}", f.reason, tail.join(" | "))
                        }
                    }
                    None => "QEMU ended".to_owned(),
                };
                InstanceState::Failed(reason)
            }
        }
    }

    async fn remove(&self, name: &Name) -> Result<(), RuntimeFailure> {
        // A later move here starts with no arrival of this one's, and a watch still following
        // this one's stream writes none (the watch first: it writes under its lock).
        lock(&self.receiving).remove(name);
        self.arrival_table().remove(name);
        let handle = self.handles.lock().await.remove(name);
        if let Some(h) = handle
            && !matches!(h.phase(), VmPhase::Stopped | VmPhase::Failed)
            && let Err(e) = h.kill().await
        {
            // Still running (its kill not done in time): tracked still, so the instance does
            // not read as absent while its QEMU holds its cores and memory.
            self.handles.lock().await.insert(name.clone(), h);
            return Err(failure(e));
        }
        self.close_nics(name);
        match self.plain_manager().remove(name.as_str()) {
            Ok(()) => Ok(()),
            // A name the runtime cannot hold was never started: nothing to remove.
            Err(Error::InvalidConfig { .. }) => Ok(()),
            Err(e) => Err(failure(e)),
        }
    }

    async fn set_devices(
        &self,
        name: &Name,
        devices: &[DeviceGrant],
    ) -> Result<(), RuntimeFailure> {
        let handle = self
            .handle(name)
            .await
            .ok_or_else(|| failure(format!("vm {name} is not held by this agent")))?;
        let wanted: Vec<Grant> = devices.iter().map(grant).collect();
        let held = handle.peripherals().await;
        for g in &held {
            if !wanted.contains(g) {
                handle
                    .detach(&g.id)
                    .await
                    .map_err(|e| failure(format!("detaching {}: {e}", g.id)))?;
            }
        }
        let held = handle.peripherals().await;
        for g in wanted {
            if !held.contains(&g) {
                let id = g.id.clone();
                handle
                    .attach(g)
                    .await
                    .map_err(|e| failure(format!("attaching {id}: {e}")))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use telvirt_model::{Format, Placement, Role, parse_vnf};

    fn spec(vm_block: &str, vcpus: Vec<Vec<u32>>, emulator: Vec<u32>) -> InstanceSpec {
        let text = format!(
            "apiVersion: telvirt/v1\nkind: Vnf\nmetadata: {{ name: upf1 }}\nspec:\n  runtime: vm\n  cpu: {{ count: {} }}\n  vm: {vm_block}\n",
            vcpus.len()
        );
        InstanceSpec {
            name: "upf1".parse().unwrap(),
            descriptor: parse_vnf(text.as_bytes(), Format::Yaml).unwrap(),
            placement: Placement {
                role: Role::Active,
                host: "h".into(),
                vcpus,
                emulator_cpus: emulator,
                held: vec![],
                numa_nodes: vec![0],
                group: None,
            },
            state_dir: PathBuf::from("/tmp/x/upf1"),
            domain: "operator".into(),
            memory_bytes: 0,
        }
    }

    fn image() -> GuestImage {
        GuestImage {
            kernel: "/img/vmlinuz".into(),
            initrd: "/img/initrd.cpio".into(),
            kernel_version: "6".into(),
            digest: "d".into(),
            modules: vec![],
            cached: true,
        }
    }

    #[test]
    fn default_guest_is_pinned_as_placed() {
        let s = spec(
            "{ memory: 256MiB, realtime: true }",
            vec![vec![1], vec![2, 3]],
            vec![0],
        );
        let c = vm_config(&s, &image(), AccelChoice::Tcg).unwrap();
        assert_eq!(c.name, "upf1");
        assert_eq!(c.vcpus, 2);
        assert_eq!(c.memory_mib, 256);
        assert_eq!(c.kernel, Some(PathBuf::from("/img/vmlinuz")));
        assert_eq!(c.initrd, Some(PathBuf::from("/img/initrd.cpio")));
        assert!(c.wait_for_agent);
        assert_eq!(c.cpu.vcpu_cpus.len(), 2);
        assert_eq!(c.cpu.vcpu_cpus[1].to_string(), "2-3");
        assert_eq!(c.cpu.emulator_cpus.as_ref().unwrap().to_string(), "0");
        assert_eq!(c.cpu.realtime_priority, Some(REALTIME_PRIORITY));
        assert_eq!(c.state_dir, Some(PathBuf::from("/tmp/x/upf1")));
        assert_eq!(c.accel, AccelChoice::Tcg);
    }

    /// A guest named to an accelerator (by its descriptor, or a move's pin) gets it; one named
    /// to KVM is refused on a host that runs guests under TCG, naming the field and why.
    #[test]
    fn a_guest_named_to_kvm_is_refused_where_the_host_runs_tcg() {
        let decided = |accel: Accel| AccelDecision {
            accel,
            warning: None,
            reason: "KVM is present but did not boot the probe guest".into(),
            from_cache: true,
        };
        let tcg_host = decided(Accel::Tcg);
        let kvm_host = decided(Accel::Kvm);
        let unnamed = spec("{ memory: 64MiB }", vec![vec![1]], vec![]);
        assert_eq!(
            guest_accel(&unnamed, &tcg_host, AccelChoice::Auto).unwrap(),
            AccelChoice::Auto
        );
        let kvm = spec("{ memory: 64MiB, accel: kvm }", vec![vec![1]], vec![]);
        assert_eq!(
            guest_accel(&kvm, &kvm_host, AccelChoice::Auto).unwrap(),
            AccelChoice::Kvm
        );
        let e = guest_accel(&kvm, &tcg_host, AccelChoice::Auto)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("spec.vm.accel") && e.contains("under TCG") && e.contains("probe guest"),
            "{e}"
        );
        let tcg = spec("{ memory: 64MiB, accel: tcg }", vec![vec![1]], vec![]);
        for host in [&tcg_host, &kvm_host] {
            assert_eq!(
                guest_accel(&tcg, host, AccelChoice::Kvm).unwrap(),
                AccelChoice::Tcg
            );
        }
    }

    #[test]
    fn own_kernel_does_not_wait_for_the_agent() {
        let s = spec(
            "{ memory: 64MiB, hugepages: 2MiB, kernel: /k, disk: /d.qcow2, cmdline: quiet }",
            vec![vec![1]],
            vec![],
        );
        let c = vm_config(&s, &image(), AccelChoice::Auto).unwrap();
        assert!(!c.wait_for_agent);
        assert_eq!(c.kernel, Some(PathBuf::from("/k")));
        assert_eq!(c.initrd, None);
        assert_eq!(c.hugepages, Some(HugePageSize::Size2M));
        assert_eq!(c.disk.unwrap().format, DiskFormat::Qcow2);
        assert_eq!(c.append.as_deref(), Some("quiet"));
        assert!(c.cpu.emulator_cpus.is_none());
    }

    #[test]
    fn devices_map_to_peripherals() {
        let g = DeviceGrant {
            id: "d0".parse().unwrap(),
            device: Device::Blk {
                path: "/x.img".into(),
                read_only: true,
            },
        };
        let p = grant(&g);
        assert_eq!(p.id, "d0");
        assert_eq!(
            p.peripheral,
            Peripheral::VirtioBlk {
                path: "/x.img".into(),
                format: DiskFormat::Raw,
                read_only: true
            }
        );
        let g = DeviceGrant {
            id: "r".parse().unwrap(),
            device: Device::Rng,
        };
        assert_eq!(grant(&g).peripheral, Peripheral::VirtioRng);
    }

    #[tokio::test]
    async fn unknown_instance_is_absent_and_refuses_changes() {
        let dir = tempfile::tempdir().unwrap();
        let rt = VmRuntime::new(VmRuntimeConfig {
            state_root: dir.path().join("instances"),
            cache_dir: dir.path().to_path_buf(),
            guest_binary: dir.path().join("missing"),
            accel: AccelChoice::Tcg,
            qemu: None,
            confinement: Default::default(),
        });
        let name: Name = "upf1".parse().unwrap();
        assert_eq!(rt.state(&name).await, InstanceState::Absent);
        assert!(rt.pause(&name).await.is_err());
        assert!(rt.set_devices(&name, &[]).await.is_err());
        assert!(rt.stop(&name).await.is_ok());
        assert!(rt.remove(&name).await.is_ok());
        // Nothing to adopt in an empty state dir.
        let s = spec("{ memory: 64MiB }", vec![vec![1]], vec![]);
        let s = InstanceSpec {
            state_dir: dir.path().join("instances/upf1"),
            ..s
        };
        assert!(!rt.adopt(&s).await.unwrap());
        // Without a guest binary the start fails and says why.
        let e = rt.start(&s).await.unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
    }
}
