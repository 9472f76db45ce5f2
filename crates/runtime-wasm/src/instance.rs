//! A running VNF instance: one wasmtime store with its host state, the per-batch path (copy
//! packets in at the ABI layout, call `tv_process` under a fuel budget, read verdicts back),
//! trap containment, restart policy, lock/unlock, upgrade with maps carried over, and map
//! snapshots. It does not verify or store modules (see `runtime`).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use wasmtime::{Engine, InstancePre, Linker, Memory, Module, Store, Trap, TypedFunc};

use crate::abi::{self, BUFFER_SIZE};
use crate::batch::PacketBatch;
use crate::engine::EngineKind;
use crate::error::{Error, FailureReason, Result};
use crate::host::{self, HostState, LogLine};
use crate::maps::{MapDef, MapSet};
use crate::security::Permission;
use crate::store::InstalledModule;

/// Largest `RunLimits::memory_bytes`: 4 GiB, all a wasm32 linear memory can address.
pub const MAX_MEMORY_BYTES: u64 = 4 << 30;

/// Run-time limits of one VNF.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunLimits {
    /// Linear-memory cap in bytes (growth past it traps; a larger initial memory fails to
    /// start); at most [`MAX_MEMORY_BYTES`].
    pub memory_bytes: u64,
    /// Fuel (roughly wasm instructions) per batch and per `tv_tick`; `tv_init` gets 16 times it.
    pub fuel_per_batch: u64,
}

impl RunLimits {
    /// Checks the limits; the error names the field (`limits.memory_bytes`) and the valid range.
    pub fn check(&self) -> Result<()> {
        if self.memory_bytes > MAX_MEMORY_BYTES {
            return Err(Error::config(
                "limits.memory_bytes",
                format!(
                    "{} bytes is more than a wasm32 linear memory can address: at most {MAX_MEMORY_BYTES} (4 GiB)",
                    self.memory_bytes
                ),
            ));
        }
        Ok(())
    }
}

impl Default for RunLimits {
    fn default() -> Self {
        Self {
            memory_bytes: 16 << 20,
            fuel_per_batch: 10_000_000,
        }
    }
}

/// How long the steps of starting an instance took (`telvirt bench wasm` reports them).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StartTimes {
    /// Creating the VNF's maps, preallocated to their `max_entries`.
    pub maps: Duration,
    /// Store, instance (linear memory mapped from the module's copy-on-write image), exports
    /// resolved and the batch buffer obtained: ready to run, before `tv_init`.
    pub instance: Duration,
    /// `tv_init` with the config blob.
    pub init: Duration,
}

/// What happens when a batch traps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RestartPolicy {
    /// The VNF goes to Failed.
    Never,
    /// Re-instantiate with the maps kept, up to `max_restarts` times, then Failed.
    OnFailure { max_restarts: u32 },
}

/// Configuration of one VNF instance (the agent maps the descriptor onto this).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VnfConfig {
    pub engine: EngineKind,
    pub limits: RunLimits,
    /// Capacity overrides of manifest maps, by name (same layout required).
    #[serde(default)]
    pub maps: Vec<MapDef>,
    /// Blob passed to `tv_init` (at most `abi::BUFFER_SIZE` bytes).
    #[serde(default)]
    pub config: Vec<u8>,
    /// Number of output ports; verdicts and emits to ports `>= ports` are dropped.
    pub ports: u32,
    pub restart: RestartPolicy,
    /// Seed of the `random` host function (`None`: from the clock).
    #[serde(default)]
    pub random_seed: Option<u64>,
}

impl Default for VnfConfig {
    fn default() -> Self {
        Self {
            engine: EngineKind::Cranelift,
            limits: RunLimits::default(),
            maps: Vec::new(),
            config: Vec::new(),
            ports: 2,
            restart: RestartPolicy::Never,
            random_seed: None,
        }
    }
}

/// Scheduling state of an instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VnfState {
    Running,
    Locked,
    Failed(FailureReason),
}

/// Counters of one instance.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VnfStats {
    pub batches: u64,
    pub packets_in: u64,
    pub packets_forwarded: u64,
    pub packets_dropped: u64,
    /// Batches dropped because the module trapped.
    pub batches_trapped: u64,
    /// Packets of those batches (counted in `packets_dropped` too).
    pub packets_trapped: u64,
    /// Batches for which `tv_process` returned a negative status (all packets dropped).
    pub batch_errors: u64,
    /// Packets of those batches (counted in `packets_dropped` too).
    pub packets_errored: u64,
    /// Verdicts naming a port `>= ports`, or descriptors moved outside their slot (dropped).
    pub invalid_verdicts: u64,
    pub packets_emitted: u64,
    pub restarts: u32,
    pub logs_dropped: u64,
    /// Fuel the module's batches and ticks used (about one unit per wasm instruction, plus
    /// what host calls charge): the CPU the VNF's own code took.
    pub fuel_used: u64,
}

/// Resolved exports of one wasm instance.
struct Live {
    store: Store<HostState>,
    memory: Memory,
    process: TypedFunc<(i32, i32), i32>,
    tick: Option<TypedFunc<i64, ()>>,
    buf: usize,
}

/// One VNF: a module instance plus its runtime-owned maps.
pub struct VnfInstance {
    module: InstalledModule,
    engine: Engine,
    pre: InstancePre<HostState>,
    cfg: VnfConfig,
    live: Option<Live>,
    /// Maps of a failed instance (kept so they can be snapshotted or restarted).
    parked: Option<HostState>,
    state: VnfState,
    stats: VnfStats,
    stack_bytes: usize,
}

/// Checks that every import of the module is granted and builds the linker with exactly the
/// granted host functions.
pub(crate) fn prepare(
    engine: &Engine,
    module: &Module,
    meta: &InstalledModule,
    granted: &BTreeSet<Permission>,
) -> Result<InstancePre<HostState>> {
    for (name, perm) in &meta.imports {
        if !granted.contains(perm) {
            return Err(Error::NotGranted {
                import: name.clone(),
                permission: *perm,
                domain: meta.domain.clone(),
            });
        }
    }
    let mut linker = Linker::new(engine);
    host::link(&mut linker, granted).map_err(|e| Error::Instantiate(format!("{e:#}")))?;
    linker
        .instantiate_pre(module)
        .map_err(|e| Error::Instantiate(format!("{e:#}")))
}

/// Effective map definitions: the manifest's, with capacity overrides from the config.
pub(crate) fn effective_maps(
    manifest_maps: &[MapDef],
    overrides: &[MapDef],
) -> Result<Vec<MapDef>> {
    let mut defs = manifest_maps.to_vec();
    for (i, o) in overrides.iter().enumerate() {
        let Some(d) = defs.iter_mut().find(|d| d.name == o.name) else {
            return Err(Error::config(
                format!("maps[{i}].name"),
                format!(
                    "`{}` is not a map of the module (declared: {})",
                    o.name,
                    manifest_maps
                        .iter()
                        .map(|d| d.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        };
        if !d.layout_eq(o) {
            return Err(Error::config(
                format!("maps[{i}]"),
                format!(
                    "map `{}` must keep the manifest's kind {:?}, key_size {} and value_size {}",
                    d.name, d.kind, d.key_size, d.value_size
                ),
            ));
        }
        o.check()
            .map_err(|e| Error::config(format!("maps[{i}]"), e))?;
        d.max_entries = o.max_entries;
    }
    Ok(defs)
}

fn classify(
    store: &mut Store<HostState>,
    e: &wasmtime::Error,
    cfg: &VnfConfig,
    stack: usize,
) -> FailureReason {
    if let Some(req) = store.data_mut().limiter.hit.take() {
        return FailureReason::MemoryLimit {
            cap_bytes: cfg.limits.memory_bytes,
            requested_bytes: req,
        };
    }
    match e.downcast_ref::<Trap>() {
        Some(Trap::OutOfFuel) => FailureReason::CpuLimit {
            fuel_per_batch: cfg.limits.fuel_per_batch,
        },
        Some(Trap::StackOverflow) => FailureReason::StackOverflow {
            max_stack_bytes: stack,
        },
        Some(t) => FailureReason::Trap(t.to_string()),
        None => FailureReason::Trap(format!("{e:#}")),
    }
}

/// Starts one wasm instance on `state`: instantiate, find exports, get the batch buffer, run
/// `tv_init`. On failure the host state (maps) is handed back with the error.
fn start(
    engine: &Engine,
    pre: &InstancePre<HostState>,
    cfg: &VnfConfig,
    stack: usize,
    mut state: HostState,
    times: &mut StartTimes,
) -> std::result::Result<Live, Box<(Error, HostState)>> {
    let t0 = Instant::now();
    // Nothing of a previous store may be used by host functions of this one.
    state.memory = None;
    state.reset_view();
    // The tables of a previous store went with it.
    state.limiter.table_elements = 0;
    let mut store = Store::new(engine, state);
    store.limiter(|s| &mut s.limiter);
    let init_fuel = cfg.limits.fuel_per_batch.saturating_mul(16);
    if let Err(e) = store.set_fuel(init_fuel) {
        return Err(Box::new((
            Error::Engine(format!("{e:#}")),
            store.into_data(),
        )));
    }
    macro_rules! fail {
        ($err:expr) => {{
            let err = $err;
            return Err(Box::new((err, store.into_data())));
        }};
    }
    let instance = match pre.instantiate(&mut store) {
        Ok(i) => i,
        Err(e) => {
            let r = classify(&mut store, &e, cfg, stack);
            fail!(Error::Instantiate(r.to_string()))
        }
    };
    let Some(memory) = instance.get_memory(&mut store, abi::EXPORT_MEMORY) else {
        fail!(Error::Instantiate("module exports no memory".into()))
    };
    store.data_mut().memory = Some(memory);
    store.data_mut().reset_view();
    let funcs = (
        instance.get_typed_func::<i32, i32>(&mut store, "tv_buffer"),
        instance.get_typed_func::<(i32, i32), i32>(&mut store, "tv_init"),
        instance.get_typed_func::<(i32, i32), i32>(&mut store, "tv_process"),
    );
    let (Ok(buffer), Ok(init), Ok(process)) = funcs else {
        fail!(Error::Instantiate("ABI exports missing or mistyped".into()))
    };
    let tick = instance
        .get_typed_func::<i64, ()>(&mut store, "tv_tick")
        .ok();
    let buf = match buffer.call(&mut store, BUFFER_SIZE as i32) {
        Ok(b) => b as u32 as usize,
        Err(e) => {
            let r = classify(&mut store, &e, cfg, stack);
            fail!(Error::Failed(r))
        }
    };
    let mem_len = memory.data_size(&store);
    if buf == 0 || buf.checked_add(BUFFER_SIZE).is_none_or(|end| end > mem_len) {
        fail!(Error::Instantiate(format!(
            "tv_buffer({BUFFER_SIZE}) returned {buf:#x}: not a buffer of {BUFFER_SIZE} bytes inside the {mem_len}-byte linear memory"
        )))
    }
    if cfg.config.len() > BUFFER_SIZE {
        fail!(Error::config(
            "config",
            format!("{} bytes, at most {BUFFER_SIZE}", cfg.config.len())
        ))
    }
    times.instance = t0.elapsed();
    let t1 = Instant::now();
    memory.data_mut(&mut store)[buf..buf + cfg.config.len()].copy_from_slice(&cfg.config);
    let rc = init.call(&mut store, (buf as i32, cfg.config.len() as i32));
    times.init = t1.elapsed();
    match rc {
        Ok(0) => {}
        Ok(rc) => fail!(Error::Failed(FailureReason::InitFailed(rc))),
        Err(e) => {
            let r = classify(&mut store, &e, cfg, stack);
            fail!(Error::Failed(r))
        }
    }
    Ok(Live {
        store,
        memory,
        process,
        tick,
        buf,
    })
}

impl VnfInstance {
    pub(crate) fn new(
        module: InstalledModule,
        engine: Engine,
        pre: InstancePre<HostState>,
        cfg: VnfConfig,
        maps: MapSet,
        stack: usize,
        times: &mut StartTimes,
    ) -> Result<Self> {
        if cfg.ports == 0 {
            return Err(Error::config("ports", "at least one output port is needed"));
        }
        cfg.limits.check()?;
        let seed = cfg.random_seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0x5eed, |d| d.as_nanos() as u64)
        });
        let state = HostState::new(
            maps,
            cfg.limits.memory_bytes,
            module.manifest.counters.len(),
            cfg.ports,
            seed,
        );
        let live = start(&engine, &pre, &cfg, stack, state, times).map_err(|b| b.0)?;
        Ok(Self {
            module,
            engine,
            pre,
            cfg,
            live: Some(live),
            parked: None,
            state: VnfState::Running,
            stats: VnfStats::default(),
            stack_bytes: stack,
        })
    }

    fn stack(&self) -> usize {
        self.stack_bytes
    }

    /// The installed module this instance runs.
    pub fn module(&self) -> &InstalledModule {
        &self.module
    }

    /// The configuration.
    pub fn config(&self) -> &VnfConfig {
        &self.cfg
    }

    /// Scheduling state.
    pub fn state(&self) -> &VnfState {
        &self.state
    }

    /// Counters.
    pub fn stats(&self) -> VnfStats {
        let mut s = self.stats.clone();
        s.logs_dropped = self.host().map_or(0, |h| h.logs_dropped);
        s
    }

    fn host(&self) -> Option<&HostState> {
        self.live
            .as_ref()
            .map(|l| l.store.data())
            .or(self.parked.as_ref())
    }

    fn host_mut(&mut self) -> Option<&mut HostState> {
        match self.live.as_mut() {
            Some(l) => Some(l.store.data_mut()),
            None => self.parked.as_mut(),
        }
    }

    /// The VNF's maps (read-only view).
    pub fn maps(&self) -> Option<&MapSet> {
        self.host().map(|h| &h.maps)
    }

    /// Module counters by manifest name.
    pub fn counters(&self) -> Vec<(String, u64)> {
        let vals = self.host().map(|h| h.counters.clone()).unwrap_or_default();
        self.module
            .manifest
            .counters
            .iter()
            .cloned()
            .zip(vals)
            .collect()
    }

    /// The last (up to 64) log lines of the module.
    pub fn logs(&self) -> Vec<LogLine> {
        self.host()
            .map(|h| h.logs.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Stops scheduling: batches are refused with `Error::Locked` until `unlock`.
    pub fn lock(&mut self) -> Result<()> {
        match self.state {
            VnfState::Failed(ref r) => Err(Error::Failed(r.clone())),
            _ => {
                self.state = VnfState::Locked;
                Ok(())
            }
        }
    }

    /// Resumes scheduling.
    pub fn unlock(&mut self) -> Result<()> {
        match self.state {
            VnfState::Failed(ref r) => Err(Error::Failed(r.clone())),
            _ => {
                self.state = VnfState::Running;
                Ok(())
            }
        }
    }

    fn check_running(&self) -> Result<()> {
        match &self.state {
            VnfState::Running => Ok(()),
            VnfState::Locked => Err(Error::Locked),
            VnfState::Failed(r) => Err(Error::Failed(r.clone())),
        }
    }

    /// Processes one batch: verdicts (and rewritten packets) are written back into `batch`.
    /// A trap drops the batch (all verdicts `Drop`), counts it, and fails or restarts the VNF;
    /// the caller's process and other VNFs are unaffected.
    pub fn process_batch(&mut self, batch: &mut PacketBatch) -> Result<()> {
        self.check_running()?;
        let stack = self.stack();
        let n = batch.count;
        let ports = self.cfg.ports;
        let fuel = self.cfg.limits.fuel_per_batch;
        let Some(live) = self.live.as_mut() else {
            return Err(Error::Failed(FailureReason::Trap(
                "instance not running".into(),
            )));
        };
        let buf = live.buf;
        batch.write_to(&mut live.memory.data_mut(&mut live.store)[buf..buf + BUFFER_SIZE]);
        {
            let st = live.store.data_mut();
            st.now_ns = batch.now_ns;
            st.logs_this_batch = 0;
            batch.emitted.items.clear();
            std::mem::swap(&mut st.emitted, &mut batch.emitted);
        }
        let result = live
            .store
            .set_fuel(fuel)
            .and_then(|()| live.process.call(&mut live.store, (buf as i32, n as i32)));
        self.stats.fuel_used += fuel.saturating_sub(live.store.get_fuel().unwrap_or(0));
        std::mem::swap(&mut live.store.data_mut().emitted, &mut batch.emitted);
        self.stats.batches += 1;
        self.stats.packets_in += n as u64;
        match result {
            Err(e) => {
                let reason = classify(&mut live.store, &e, &self.cfg, stack);
                batch.drop_all();
                batch.emitted.items.clear();
                self.stats.batches_trapped += 1;
                self.stats.packets_trapped += n as u64;
                self.stats.packets_dropped += n as u64;
                let restarted = self.handle_failure(reason.clone());
                Err(Error::BatchTrapped { reason, restarted })
            }
            Ok(rc) if rc < 0 => {
                batch.drop_all();
                batch.emitted.items.clear();
                self.stats.batch_errors += 1;
                self.stats.packets_errored += n as u64;
                self.stats.packets_dropped += n as u64;
                Ok(())
            }
            Ok(_) => {
                let area = &live.memory.data(&live.store)[buf..buf + BUFFER_SIZE];
                let (fwd, bad) = batch.read_from(area, ports);
                self.stats.packets_forwarded += fwd;
                self.stats.invalid_verdicts += bad;
                self.stats.packets_dropped += n as u64 - fwd;
                self.stats.packets_emitted += batch.emitted.len() as u64;
                Ok(())
            }
        }
    }

    /// The instance's clock, as `clock_ns` reads it outside a replayed batch: nanoseconds since
    /// it started (0 when it does not run).
    pub fn clock_ns(&self) -> u64 {
        self.live.as_ref().map_or(0, |l| {
            u64::try_from(l.store.data().clock_base.elapsed().as_nanos()).unwrap_or(u64::MAX)
        })
    }

    /// Calls the optional `tv_tick` export under the batch fuel budget.
    pub fn tick(&mut self, now_ns: u64) -> Result<()> {
        self.check_running()?;
        let stack = self.stack();
        let fuel = self.cfg.limits.fuel_per_batch;
        let Some(live) = self.live.as_mut() else {
            return Ok(());
        };
        let Some(tick) = live.tick.clone() else {
            return Ok(());
        };
        {
            // A tick has its own log budget, as a batch has.
            let st = live.store.data_mut();
            st.now_ns = Some(now_ns);
            st.logs_this_batch = 0;
        }
        let r = live
            .store
            .set_fuel(fuel)
            .and_then(|()| tick.call(&mut live.store, now_ns as i64));
        self.stats.fuel_used += fuel.saturating_sub(live.store.get_fuel().unwrap_or(0));
        if let Err(e) = r {
            let reason = classify(&mut live.store, &e, &self.cfg, stack);
            let restarted = self.handle_failure(reason.clone());
            return Err(Error::BatchTrapped { reason, restarted });
        }
        Ok(())
    }

    /// After a trap: restart per policy (maps kept) or go to Failed. Returns whether restarted.
    fn handle_failure(&mut self, reason: FailureReason) -> bool {
        let Some(live) = self.live.take() else {
            return false;
        };
        let mut state = live.store.into_data();
        let allowed = match self.cfg.restart {
            RestartPolicy::Never => false,
            RestartPolicy::OnFailure { max_restarts } => self.stats.restarts < max_restarts,
        };
        if allowed {
            state.memory = None;
            state.reset_view();
            state.limiter.hit = None;
            match start(
                &self.engine,
                &self.pre,
                &self.cfg,
                self.stack(),
                state,
                &mut StartTimes::default(),
            ) {
                Ok(l) => {
                    self.live = Some(l);
                    self.stats.restarts += 1;
                    return true;
                }
                Err(b) => state = b.1,
            }
        }
        self.parked = Some(state);
        self.state = VnfState::Failed(reason);
        false
    }

    /// Snapshot of every map (see `snapshot`); starts the update log from this point.
    pub fn snapshot_maps(&mut self) -> Result<Vec<u8>> {
        let h = self
            .host_mut()
            .ok_or_else(|| Error::Snapshot("instance has no state".into()))?;
        Ok(h.maps.snapshot())
    }

    /// [`MapSet::begin_sliced_snapshot`] of this instance's maps (the update log restarted);
    /// [`VnfInstance::map_snapshot_slice`] copies it slice by slice.
    pub fn begin_sliced_map_snapshot(&mut self) -> Result<()> {
        self.host_mut()
            .ok_or_else(|| Error::Snapshot("instance has no state".into()))?
            .maps
            .begin_sliced_snapshot();
        Ok(())
    }

    /// [`MapSet::snapshot_slice`] of this instance's maps: the snapshot once complete.
    pub fn map_snapshot_slice(&mut self, max_bytes: usize) -> Result<Option<Vec<u8>>> {
        self.host_mut()
            .ok_or_else(|| Error::Snapshot("instance has no state".into()))?
            .maps
            .snapshot_slice(max_bytes)
    }

    /// [`MapSet::begin_sliced_copy`] of this instance's maps (a copy for disk, the update
    /// log's chain left alone); [`VnfInstance::map_copy_slice`] copies it slice by slice.
    pub fn begin_sliced_map_copy(&mut self) -> Result<()> {
        self.host_mut()
            .ok_or_else(|| Error::Snapshot("instance has no state".into()))?
            .maps
            .begin_sliced_copy();
        Ok(())
    }

    /// [`MapSet::copy_slice`] of this instance's maps: the copy once complete.
    pub fn map_copy_slice(&mut self, max_bytes: usize) -> Result<Option<Vec<u8>>> {
        self.host_mut()
            .ok_or_else(|| Error::Snapshot("instance has no state".into()))?
            .maps
            .copy_slice(max_bytes)
    }

    /// Updates since the last snapshot or taken log.
    pub fn take_update_log(&mut self) -> Result<Vec<u8>> {
        let h = self
            .host_mut()
            .ok_or_else(|| Error::Snapshot("instance has no state".into()))?;
        h.maps.take_log()
    }

    /// Replaces every map with a snapshot's content (between batches). Nothing changes on error.
    pub fn restore_maps(&mut self, snapshot: &[u8]) -> Result<()> {
        let h = self
            .host_mut()
            .ok_or_else(|| Error::Snapshot("instance has no state".into()))?;
        let defs = h.maps.defs();
        h.maps = MapSet::restore(&defs, snapshot)?;
        Ok(())
    }

    /// Applies an update log (standby replication). Returns the number of updates applied.
    pub fn apply_update_log(&mut self, log: &[u8]) -> Result<u64> {
        let h = self
            .host_mut()
            .ok_or_else(|| Error::Snapshot("instance has no state".into()))?;
        h.maps.apply_log(log)
    }

    /// Starts this instance again from its module with a new config blob (handed to
    /// `tv_init`) and fuel per batch, between batches, the maps carried over; on failure it
    /// keeps running exactly as it was.
    pub fn reconfigure(&mut self, config: Vec<u8>, fuel_per_batch: u64) -> Result<()> {
        let mut cfg = self.cfg.clone();
        cfg.config = config;
        cfg.limits.fuel_per_batch = fuel_per_batch;
        let old = std::mem::replace(&mut self.cfg, cfg);
        let (module, pre) = (self.module.clone(), self.pre.clone());
        match self.upgrade_to(module, pre) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.cfg = old;
                Err(e)
            }
        }
    }

    /// Swaps in a new module version between batches, carrying the maps over (same name and
    /// layout). On any error the running version and its maps are unchanged. A locked VNF
    /// refuses; a failed one may be upgraded (that is how it is repaired).
    pub(crate) fn upgrade_to(
        &mut self,
        module: InstalledModule,
        pre: InstancePre<HostState>,
    ) -> Result<()> {
        if self.state == VnfState::Locked {
            return Err(Error::Locked);
        }
        let new_defs = effective_maps(&module.manifest.maps, &self.cfg.maps)
            .map_err(|e| Error::Upgrade(e.to_string()))?;
        let ports = self.cfg.ports;
        let mem_cap = self.cfg.limits.memory_bytes;
        let stack = self.stack();
        let host = self
            .host_mut()
            .ok_or_else(|| Error::Upgrade("instance has no state".into()))?;
        host.maps
            .check_carry_over(&new_defs)
            .map_err(|e| Error::Upgrade(e.to_string()))?;
        let old_defs = host.maps.defs();
        let rng = host.rng;
        let (mut carried, leftovers) = MapSet::carry_over(host.maps.take_maps(), &new_defs)
            .map_err(|e| Error::Upgrade(e.to_string()))?;
        carried.count_changes_on_from(&host.maps);
        // What the new version's `tv_init` writes must not stay if it then fails.
        carried.keep_originals();
        let mut new_state =
            HostState::new(carried, mem_cap, module.manifest.counters.len(), ports, rng);
        new_state.maps.base = host.maps.base;
        match start(
            &self.engine,
            &pre,
            &self.cfg,
            stack,
            new_state,
            &mut StartTimes::default(),
        ) {
            Ok(l) => {
                self.live = Some(l);
                if let Some(host) = self.host_mut() {
                    host.maps.forget_originals();
                }
                self.parked = None;
                self.pre = pre;
                self.module = module;
                if matches!(self.state, VnfState::Failed(_)) {
                    self.state = VnfState::Running;
                }
                Ok(())
            }
            Err(b) => {
                let (e, st) = *b;
                // Put the maps back into the untouched old instance, as they were handed over
                // (what `tv_init` changed undone), those it copied from where they stayed.
                let mut pool = st.maps.into_originals();
                pool.extend(leftovers);
                let back = MapSet::exactly(pool, &old_defs);
                if let Some(host) = self.host_mut() {
                    match back {
                        Ok(maps) => host.maps.maps = maps,
                        Err(err) => {
                            return Err(Error::Upgrade(format!(
                                "new version failed to start ({e}) and maps could not be restored: {err}"
                            )));
                        }
                    }
                }
                Err(Error::Upgrade(format!("new version failed to start: {e}")))
            }
        }
    }

    /// Control-plane update of a map by name (e.g. provisioning a rule or a bearer), between
    /// batches. Logged like module updates.
    pub fn map_update(&mut self, map: &str, key: &[u8], value: &[u8]) -> Result<()> {
        if self.state == VnfState::Locked {
            return Err(Error::Locked);
        }
        let h = self
            .host_mut()
            .ok_or_else(|| Error::Map("instance has no state".into()))?;
        crate::native::map_update_by_name(&mut h.maps, map, key, value)
    }

    /// A control-plane change of map `map` between batches, all or nothing (see
    /// [`MapSet::change`]); refused while the VNF is locked.
    pub fn map_change(
        &mut self,
        map: &str,
        delete: &[Vec<u8>],
        put: &[(Vec<u8>, Vec<u8>)],
    ) -> Result<crate::maps::MapChanged> {
        if self.state == VnfState::Locked {
            return Err(Error::Locked);
        }
        self.host_mut()
            .ok_or_else(|| Error::Map("instance has no state".into()))?
            .maps
            .change(map, delete, put)
    }

    /// Map definitions in effect.
    pub fn map_defs(&self) -> Vec<MapDef> {
        self.host().map(|h| h.maps.defs()).unwrap_or_default()
    }
}
