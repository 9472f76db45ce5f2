//! The wasm runtime adapter: runs `runtime: wasm` VNFs as nodes of the agent's patch panel.
//!
//! Owns mapping a VNF descriptor onto `telvirt-runtime-wasm`'s own types (install request,
//! `VnfConfig`) and placing the instance on the data-plane worker pinned to the VNF's allocated
//! core. It must not decide placement or talk to the controller.
//!
//! Choices (ADR 033):
//! - Modules are installed into the security domain of the VNF's owning authority
//!   (`InstanceSpec::domain`, ADR 037): a manifest requesting a permission that domain does not
//!   allow is refused before anything is instantiated or placed. An upgrade stays in the domain
//!   the running module was installed into.
//! - The descriptor's `config` map is handed to `tv_init` as `key=value` lines (sorted by key,
//!   `\n`-terminated); an empty map is an empty blob.
//! - Lock stops scheduling: the node stops taking packets from its input rings between two
//!   batches (upstream sees backpressure), and the instance is locked.
//! - Instances do not survive the process (`adopt` always answers `false`), but their maps do
//!   when a snapshot dir is configured: a VNF's maps are written to `<dir>/<vnf>.maps` (the
//!   runtime's snapshot format, atomically: temp file, fsync, rename) when it is stopped or
//!   locked, every `persist_maps` interval, and once more when the node shuts down; a start
//!   restores them before the first batch if the snapshot matches the maps' layout, else says
//!   why it was not used (`start_note`). Removing a stopped VNF deletes its snapshot; removing a
//!   failed one to start it again keeps it.
//! - Packets a module `emit`s are not sent anywhere yet (counted by the instance).
//! - A move's source freezes its instance between two batches (`freeze`): the node queues what
//!   arrives for the destination ([`super::handoff`]); the destination processes the packets
//!   handed over before anything else.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use telvirt_api::NodeReply;
use telvirt_dataplane::node::{Node, NodeIo, PacketProcessor, ProcessorNode, Verdict};
use telvirt_dataplane::pool::{Packet, Pool};
use telvirt_model::api::{
    CounterView, LogLineView, MapChangeRequest, MapChangeResult, MapView, ModuleInfo, VnfLogs,
    WasmStatsView,
};
use telvirt_model::{MapSpec, Name, PollMode, RuntimeKind, WasmEngine};
use telvirt_runtime_wasm as rw;
use telvirt_runtime_wasm::{
    EngineKind, InstallRequest, MapDef, MapKind, PacketBatch, RuntimeConfig, VnfConfig,
    VnfInstance, VnfState,
};

use super::handoff::{Handoff, decode_frames, encode_frames};
use crate::dataplane::NodeDataPlane;
use crate::fencing::{Fencing, ForwardGate};
use crate::runtime::{
    InstanceSpec, InstanceState, Runtime, RuntimeFailure, StateChangeHook, StateChangeSlot,
};

/// Packets per batch a wasm node takes from one input.
pub const BATCH: usize = 32;

type Shared = Arc<Mutex<VnfInstance>>;

/// [`WasmRuntime::change_unless_frozen`] on an instance and its hand-off already looked up.
fn change_held_unless_frozen<R>(
    inst: &Shared,
    handoff: &Handoff,
    name: &Name,
    what: &str,
    f: impl FnOnce(&mut VnfInstance) -> R,
) -> Result<R, RuntimeFailure> {
    let mut i = guard(inst);
    if handoff.diverting() {
        return Err(fail(frozen_refusal(name, what)));
    }
    Ok(f(&mut i))
}

/// The instance if nobody holds it right now (a poisoned lock taken as [`guard`] takes it).
fn try_guard(inst: &Shared) -> Option<MutexGuard<'_, VnfInstance>> {
    crate::dataplane::try_lock_unpoisoned(inst)
}

fn guard(inst: &Shared) -> MutexGuard<'_, VnfInstance> {
    // A panic inside the runtime while processing leaves the instance as the runtime left it;
    // its own state (Failed) says whether it can still run.
    inst.lock().unwrap_or_else(|p| p.into_inner())
}

/// Tells the agent that instance `name` trapped (it restarted or failed: its state and
/// counters changed by themselves).
#[derive(Clone)]
struct TrapTeller {
    name: Name,
    slot: StateChangeSlot,
}

impl TrapTeller {
    fn after<T>(&self, result: &rw::Result<T>) {
        if matches!(result, Err(rw::Error::BatchTrapped { .. })) {
            self.slot.tell(&self.name);
        }
    }
}

/// One wasm VNF as a data-plane stage: copies each batch into a `PacketBatch`, runs it and
/// copies rewritten packets back.
struct WasmStage {
    inst: Shared,
    batch: Box<PacketBatch>,
    ok: Vec<bool>,
    trapped: TrapTeller,
}

impl PacketProcessor for WasmStage {
    fn process(
        &mut self,
        input: usize,
        pool: &Pool,
        pkts: &mut [Packet],
        verdicts: &mut Vec<Verdict>,
    ) {
        let port = u32::try_from(input).unwrap_or(u32::MAX);
        self.batch.clear();
        self.ok.clear();
        for p in pkts.iter() {
            self.ok.push(self.batch.push(port, pool.data(p)).is_ok());
        }
        let result = guard(&self.inst).process_batch(&mut self.batch);
        self.trapped.after(&result);
        let mut j = 0;
        for (p, ok) in pkts.iter_mut().zip(&self.ok) {
            if !*ok {
                verdicts.push(Verdict::Drop);
                continue;
            }
            let v = match (&result, self.batch.verdict(j)) {
                (Ok(()), rw::Verdict::Forward(k)) => match u16::try_from(k) {
                    Ok(k) => {
                        pool.write(p, self.batch.packet(j));
                        Verdict::Forward(k)
                    }
                    Err(_) => Verdict::Drop,
                },
                _ => Verdict::Drop,
            };
            verdicts.push(v);
            j += 1;
        }
    }
}

/// Polls the stage only while the VNF is scheduled (not locked, not failed) and its fencing
/// gate, when it has one, is open (a standby never forwards; a fenced active stops); calls its
/// `tv_tick` between batches when due.
struct GatedNode {
    scheduled: Arc<AtomicBool>,
    gate: Option<Arc<ForwardGate>>,
    inner: ProcessorNode<WasmStage>,
    ticker: Option<Ticker>,
    handoff: Arc<Handoff>,
}

impl Node for GatedNode {
    fn poll(&mut self, io: &mut NodeIo<'_>) -> usize {
        // Counted as under way until it returns: a freeze waits for this poll, not the worker.
        let poll = self.handoff.begin_poll();
        // A frozen move's source queues what arrives, whatever its gate (the switch closes it).
        if poll.diverting {
            return self.handoff.divert_poll(io);
        }
        // A divert that ended without a switch: what it queued goes before the rings' packets.
        self.handoff.requeue_if_diverted();
        // What the hand-off dropped (a queue's bound) is this node's drops.
        let lost = self.handoff.take_lost();
        if lost > 0 {
            io.count_refused(lost);
        }
        if !self.scheduled.load(Ordering::Acquire) || self.gate.as_ref().is_some_and(|g| !g.open())
        {
            return 0;
        }
        // Handed-over frames first: the node's own traffic waits in its rings behind them.
        let injected = self.handoff.inject_poll(&mut self.inner, io);
        let n = if self.handoff.injecting() {
            injected
        } else {
            injected + self.inner.poll(io)
        };
        if let Some(t) = &mut self.ticker {
            t.poll();
        }
        n
    }
}

/// When a VNF's `tv_tick` is next due (`spec.wasm.tick_ms`).
struct Ticker {
    inst: Shared,
    trapped: TrapTeller,
    every: Duration,
    next: Instant,
    /// Polls since the clock was last read.
    polls: u32,
}

impl Ticker {
    /// Polls between two readings of the clock: a poll round takes a microsecond or less busy,
    /// 50 µs idle, so a tick is late by at most a few milliseconds.
    const POLLS_PER_CLOCK: u32 = 64;

    fn new(inst: Shared, trapped: TrapTeller, every: Duration) -> Self {
        Ticker {
            inst,
            trapped,
            every,
            next: Instant::now() + every,
            polls: 0,
        }
    }

    fn poll(&mut self) {
        self.polls += 1;
        if self.polls < Self::POLLS_PER_CLOCK {
            return;
        }
        self.polls = 0;
        let now = Instant::now();
        if now < self.next {
            return;
        }
        self.next = now + self.every;
        let ticked = {
            let mut inst = guard(&self.inst);
            let clock = inst.clock_ns();
            // A trap in the tick fails or restarts the instance like a batch's (its state and
            // events say so); a module without the export is not called.
            inst.tick(clock)
        };
        self.trapped.after(&ticked);
    }
}

struct Entry {
    inst: Shared,
    scheduled: Arc<AtomicBool>,
    /// Its module, whose files are kept while the entry lives.
    module: ModulePin,
    /// Stopped: off the panel, kept until `remove`.
    stopped: bool,
    /// What the start did with the map snapshot, if there was one.
    note: Option<String>,
    /// The maps' change count and `outside_changes` when the copy last written to disk began
    /// (`None`: not since the instance started).
    saved_changes: Option<(u64, u64)>,
    /// Times its maps changed without their count moving (a standby's applied logs, an
    /// upgrade's fresh count): a save that began before one has not written it.
    outside_changes: u64,
    /// Its move's packets (queued at a frozen source, handed in at the destination).
    handoff: Arc<Handoff>,
    /// Frozen for a hand-off: no batch runs, the maps change no more.
    frozen: bool,
}

/// How many instances (running, or being made) use each installed module, by hash: a module's
/// files are removed only under this lock and only while none does, so a start that installs
/// a module never meets its removal half-way (one VNF removed while another of the same module
/// starts deleted its files under the start).
#[derive(Default)]
struct ModulePins(Mutex<BTreeMap<String, usize>>);

impl ModulePins {
    fn counts(&self) -> MutexGuard<'_, BTreeMap<String, usize>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Module `hash` is used from now until the pin is dropped.
    fn pin(self: &Arc<Self>, hash: &str) -> ModulePin {
        *self.counts().entry(hash.to_owned()).or_insert(0) += 1;
        ModulePin {
            pins: Arc::clone(self),
            hash: hash.to_owned(),
        }
    }

    /// Runs `remove` for module `hash` when nothing uses it, under the lock a new use takes.
    fn remove_if_unused<E>(
        &self,
        hash: &str,
        remove: impl FnOnce() -> Result<(), E>,
    ) -> Result<(), E> {
        let counts = self.counts();
        if counts.get(hash).is_some_and(|n| *n > 0) {
            return Ok(());
        }
        let removed = remove();
        drop(counts);
        removed
    }
}

/// One use of an installed module (see [`ModulePins`]).
struct ModulePin {
    pins: Arc<ModulePins>,
    hash: String,
}

impl Drop for ModulePin {
    fn drop(&mut self) {
        let mut counts = self.pins.counts();
        if let Some(n) = counts.get_mut(&self.hash) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&self.hash);
            }
        }
    }
}

/// The runtime's entries, locked (a panic while they were held left them as they were between
/// two changes).
fn lock_entries(entries: &Mutex<BTreeMap<Name, Entry>>) -> MutexGuard<'_, BTreeMap<Name, Entry>> {
    entries.lock().unwrap_or_else(|p| p.into_inner())
}

/// Why a VNF's maps are saved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SaveOf {
    /// Its instance stops (or is locked): written whatever it does.
    Stop,
    /// The node shuts down: every running VNF's, skipped only for an instance that is no
    /// longer the running one.
    Last,
    /// The periodic save: skipped like [`SaveOf::Last`], and given up between two slices for
    /// an instance that froze for a move (its maps change no more: the destination takes
    /// them, or, the move cancelled, the next save writes them). A freeze then waits for no
    /// more than the slice under way.
    Periodic,
}

/// Writes one VNF's map snapshot file; cloned onto the blocking thread that does it.
struct MapSaver {
    dir: PathBuf,
    files: Arc<Mutex<()>>,
    entries: Arc<Mutex<BTreeMap<Name, Entry>>>,
}

impl MapSaver {
    fn entries(&self) -> MutexGuard<'_, BTreeMap<Name, Entry>> {
        lock_entries(&self.entries)
    }

    /// Deletes `name`'s snapshot file (none: nothing to do). Under the files' lock, after the
    /// VNF's entry is gone: a periodic snapshot that saw the entry has finished writing, and
    /// any later one skips it, so nothing brings the file back.
    fn delete(&self, name: &Name) -> Result<(), RuntimeFailure> {
        let _files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        let path = snapshot_file(&self.dir, name);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(fail(format!(
                "deleting map snapshot {}: {e}",
                path.display()
            ))),
        }
    }

    /// Writes the instance's maps to its snapshot file. Skipped when no map changed since the
    /// last snapshot this process wrote, and (but for [`SaveOf::Stop`]) when the instance is
    /// no longer the running one of `name` (stopped or removed meanwhile); a periodic one is
    /// given up when the instance freezes for a move.
    fn save(&self, name: &Name, inst: &Shared, of: SaveOf) -> Result<(), RuntimeFailure> {
        let path = snapshot_file(&self.dir, name);
        let _files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        let (saved, outside, handoff) = {
            let entries = self.entries();
            let entry = entries.get(name);
            if of != SaveOf::Stop
                && !entry.is_some_and(|e| !e.stopped && Arc::ptr_eq(&e.inst, inst))
            {
                return Ok(());
            }
            (
                entry.and_then(|e| e.saved_changes),
                entry.map(|e| e.outside_changes),
                entry.map(|e| Arc::clone(&e.handoff)),
            )
        };
        // A move's freeze (its divert) ends a periodic save between two slices.
        let gives_way =
            || of == SaveOf::Periodic && handoff.as_ref().is_some_and(|h| h.diverting());
        if gives_way() {
            return Ok(());
        }
        let changes = {
            let mut i = guard(inst);
            let changes = i.maps().map(rw::MapSet::changes).zip(outside);
            if changes.is_some() && changes == saved && path.exists() {
                return Ok(());
            }
            // Copied in slices, each between two batches, the maps kept as they are now by
            // copy on write (a copy whole held the instance, and every packet behind it, for
            // 40-280 ms at 100 MiB of maps), the update log's chain left alone (a standby's
            // stream of logs goes on).
            i.begin_sliced_map_copy().map_err(fail)?;
            changes
        };
        let copied = in_slices(|| {
            if gives_way() {
                return Err(None);
            }
            guard(inst)
                .map_copy_slice(SNAPSHOT_SLICE_BYTES)
                .map_err(Some)
        });
        let bytes = match copied {
            Ok((bytes, _, _)) => bytes,
            // Given way: nothing written, the next save writes what changed.
            Err(None) => return Ok(()),
            Err(Some(e)) => return Err(fail(e)),
        };
        telvirt_files::write_atomic(&path, &bytes)
            .map_err(|e| fail(format!("writing map snapshot {}: {e}", path.display())))?;
        // Maps that changed outside their count while they were copied moved it past
        // `outside`: the next save writes them.
        if let Some(e) = self.entries().get_mut(name)
            && Arc::ptr_eq(&e.inst, inst)
        {
            e.saved_changes = changes;
        }
        Ok(())
    }
}

/// The `runtime: wasm` adapter of one agent.
pub struct WasmRuntime {
    rt: Arc<rw::WasmRuntime>,
    dataplane: Arc<NodeDataPlane>,
    /// Directory relative module paths resolve against.
    base_dir: PathBuf,
    /// Where uploaded modules are kept (`<sha256>.wasm`); `None`: `sha256:` references fail.
    module_dir: Option<PathBuf>,
    /// Where each VNF's map snapshot is kept (`<dir>/<vnf>.maps`); `None`: maps are not kept.
    snapshot_dir: Option<PathBuf>,
    /// Held while a snapshot file is written or deleted, so that a periodic snapshot cannot
    /// bring back the file of a VNF being removed. Taken before `entries`, never after.
    snapshot_files: Arc<Mutex<()>>,
    entries: Arc<Mutex<BTreeMap<Name, Entry>>>,
    modules: Arc<ModulePins>,
    /// The agent's fencing, whose gates each instance's node asks before it polls (`None`:
    /// instances always forward while scheduled).
    fencing: Option<Arc<Fencing>>,
    /// Told when an instance trapped ([`Runtime::on_state_change`]).
    state_change: StateChangeSlot,
}

fn fail(e: impl std::fmt::Display) -> RuntimeFailure {
    RuntimeFailure::new(e)
}

/// The built-in example modules (`firewall`, `nat`, `gtpu`) as (name, wasm bytes).
pub fn example_modules() -> Vec<(&'static str, &'static [u8])> {
    rw::vnfs::all().iter().map(|v| (v.name, v.wasm)).collect()
}

/// A manifest's map definitions in the descriptor's terms.
fn map_specs(defs: &[MapDef]) -> Result<Vec<MapSpec>, String> {
    defs.iter()
        .map(|d| {
            Ok(MapSpec {
                name: d
                    .name
                    .parse()
                    .map_err(|e| format!("manifest map `{}`: {e}", d.name))?,
                kind: match d.kind {
                    MapKind::Hash => telvirt_model::MapKind::Hash,
                    MapKind::Array => telvirt_model::MapKind::Array,
                    MapKind::LruHash => telvirt_model::MapKind::LruHash,
                },
                key_size: d.key_size,
                value_size: d.value_size,
                max_entries: d.max_entries,
            })
        })
        .collect()
}

/// Verifies `bytes` as a VNF module for security `domain` of `policy`, with the limits a start
/// applies: the manifest's facts, or every violation (which never quote the bytes). The node's
/// verdict on an upload and `telvirt wasm verify` both come from here.
pub fn verify_module(
    bytes: &[u8],
    domain: &str,
    policy: &rw::SecurityPolicy,
) -> Result<ModuleInfo, Vec<String>> {
    let verified = rw::verify::verify(
        bytes,
        &rw::VerifyLimits::default(),
        policy.domain(domain),
        None,
    )
    .map_err(|violations| {
        violations
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
    })?;
    let m = verified.manifest;
    let maps = map_specs(&m.maps).map_err(|e| vec![e])?;
    Ok(ModuleInfo {
        name: m.name,
        version: m.version,
        permissions: m
            .permissions
            .iter()
            .map(|p| p.as_str().to_owned())
            .collect(),
        maps,
        counters: m.counters,
    })
}

/// Config key whose value is the whole `tv_init` blob, hex-encoded (for modules that take a
/// binary configuration, like the example firewall: `blob_hex: "02000000"` = forward to port 1).
pub use telvirt_model::vnf::BLOB_HEX;

/// The `tv_init` blob of a descriptor's config map: the hex-decoded `blob_hex` value when it is
/// the only key, else sorted `key=value\n` lines (empty map: empty blob).
pub fn config_blob(config: &BTreeMap<String, String>) -> Result<Vec<u8>, RuntimeFailure> {
    if let Some(hex) = config.get(BLOB_HEX) {
        if config.len() != 1 {
            return Err(fail(format!(
                "spec.wasm.config: `{BLOB_HEX}` must be the only key"
            )));
        }
        return decode_hex(hex).ok_or_else(|| {
            fail(format!(
                "spec.wasm.config.{BLOB_HEX}: `{hex}` is not an even number of hex digits"
            ))
        });
    }
    let mut out = Vec::new();
    for (k, v) in config {
        out.extend_from_slice(k.as_bytes());
        out.push(b'=');
        out.extend_from_slice(v.as_bytes());
        out.push(b'\n');
    }
    Ok(out)
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    let s = s.as_bytes();
    if !s.len().is_multiple_of(2) {
        return None;
    }
    s.chunks(2)
        .map(|p| {
            let d = |c: u8| (c as char).to_digit(16);
            u8::try_from(d(p[0])? * 16 + d(p[1])?).ok()
        })
        .collect()
}

/// The runtime's config for a descriptor.
pub fn vnf_config(spec: &InstanceSpec) -> Result<VnfConfig, RuntimeFailure> {
    let wasm = spec
        .descriptor
        .spec
        .wasm
        .as_ref()
        .ok_or_else(|| fail("spec.wasm is missing"))?;
    let maps = wasm
        .maps
        .iter()
        .map(|m| MapDef {
            name: m.name.as_str().to_owned(),
            kind: match m.kind {
                telvirt_model::MapKind::Hash => MapKind::Hash,
                telvirt_model::MapKind::Array => MapKind::Array,
                telvirt_model::MapKind::LruHash => MapKind::LruHash,
            },
            key_size: m.key_size,
            value_size: m.value_size,
            max_entries: m.max_entries,
        })
        .collect();
    let defaults = VnfConfig::default();
    Ok(VnfConfig {
        engine: engine(wasm.engine),
        limits: rw::RunLimits {
            memory_bytes: wasm.limits.memory.bytes(),
            fuel_per_batch: wasm
                .limits
                .fuel_per_batch
                .unwrap_or(defaults.limits.fuel_per_batch),
        },
        maps,
        config: config_blob(&wasm.config)?,
        ports: u32::try_from(spec.descriptor.spec.ports.len())
            .map_err(|_| fail("spec.ports: too many ports"))?,
        ..defaults
    })
}

/// Refuses an instance whose module needs more memory than placement counted for it
/// (`spec.memory_bytes`; 0: not counted): its linear-memory limit plus the budget of every map
/// it would run with (the manifest's, capacities overridden by the descriptor's).
fn check_budget(
    spec: &InstanceSpec,
    manifest_maps: &[MapDef],
    cfg: &VnfConfig,
) -> Result<(), RuntimeFailure> {
    if spec.memory_bytes == 0 {
        return Ok(());
    }
    // The controller's formula, over the maps the module really declares.
    let needed = spec
        .descriptor
        .memory_budget(&map_specs(manifest_maps).map_err(fail)?);
    if needed > spec.memory_bytes {
        let maps = needed.saturating_sub(cfg.limits.memory_bytes);
        return Err(fail(format!(
            "the module needs {needed} bytes of memory (linear memory {} + maps and their log \
             {maps}), more than the {} bytes placement counted; name its maps in spec.wasm.maps \
             or upload the module so the controller counts them",
            cfg.limits.memory_bytes, spec.memory_bytes
        )));
    }
    Ok(())
}

fn engine(e: WasmEngine) -> EngineKind {
    match e {
        WasmEngine::Cranelift => EngineKind::Cranelift,
        WasmEngine::Pulley => EngineKind::Pulley,
    }
}

/// VNF `name`'s map snapshot file in snapshot directory `dir`.
fn snapshot_file(dir: &Path, name: &Name) -> PathBuf {
    dir.join(format!("{name}.maps"))
}

/// Reads, verifies and instantiates modules: the blocking part of a start, owned apart from the
/// runtime so that it can run on a blocking thread.
struct Loader {
    rt: Arc<rw::WasmRuntime>,
    modules: Arc<ModulePins>,
    base_dir: PathBuf,
    module_dir: Option<PathBuf>,
    snapshot_dir: Option<PathBuf>,
}

/// An instance made by [`Loader::prepare`], not yet on the data plane.
struct Prepared {
    inst: VnfInstance,
    module: ModulePin,
    note: Option<String>,
}

impl Loader {
    /// Verifies and instantiates the VNF's module (a refused module fails with the verifier's
    /// reason wherever it was placed) and restores its maps before its first batch.
    fn prepare(&self, spec: &InstanceSpec) -> Result<Prepared, RuntimeFailure> {
        let cfg = vnf_config(spec)?;
        let wasm = spec
            .descriptor
            .spec
            .wasm
            .as_ref()
            .ok_or_else(|| fail("spec.wasm is missing"))?;
        let (meta, module) = self.install(&wasm.module, cfg.engine, &spec.domain)?;
        check_budget(spec, &meta.manifest.maps, &cfg)?;
        let mut inst = self.rt.instantiate(&meta, cfg).map_err(fail)?;
        // Before the first batch: the instance is on no panel yet.
        let note = self.restore_maps(&spec.name, &mut inst);
        Ok(Prepared { inst, module, note })
    }

    /// The bytes of the module a descriptor names: an uploaded module (`sha256:<hex>`, from the
    /// node's module directory, checked against its digest) or a file (relative paths against
    /// the base directory). Either is read as a regular file of bounded size, never blocking,
    /// never echoing its content. Returns the bytes and their hash (lower-case hex SHA-256),
    /// read once.
    fn module_bytes(&self, module: &str) -> Result<(Vec<u8>, String), RuntimeFailure> {
        let Some(digest) = telvirt_model::module_digest(module) else {
            let path = self.base_dir.join(module);
            let bytes = rw::read_module_file(&path, rw::MAX_MODULE_BYTES).map_err(fail)?;
            let hash = rw::verify::hex(&rw::verify::module_hash(&bytes));
            return Ok((bytes, hash));
        };
        let dir = self.module_dir.as_ref().ok_or_else(|| {
            fail(format!(
                "{module}: this node keeps no uploaded modules (no module directory)"
            ))
        })?;
        let path = dir.join(format!("{digest}.wasm"));
        let bytes = rw::read_module_file(&path, rw::MAX_MODULE_BYTES).map_err(fail)?;
        if rw::verify::hex(&rw::verify::module_hash(&bytes)) != digest {
            return Err(fail(format!(
                "{module}: the kept file {} does not hash to its name; upload the module again",
                path.display()
            )));
        }
        Ok((bytes, digest.to_owned()))
    }

    /// Reads and installs a module file into security `domain` through the verifier and the
    /// security manager, pinned (its files kept) from before it is written. A refusal names
    /// the domain.
    fn install(
        &self,
        path: &str,
        kind: EngineKind,
        domain: &str,
    ) -> Result<(rw::InstalledModule, ModulePin), RuntimeFailure> {
        let (bytes, hash) = self.module_bytes(path)?;
        let pin = self.modules.pin(&hash);
        self.rt
            .install(&InstallRequest {
                bytes: &bytes,
                domain,
                signature: None,
                precompile: &[kind],
            })
            .map(|meta| (meta, pin))
            .map_err(|e| match e {
                rw::Error::Verification(_) => fail(format!(
                    "{e} (the owning authority's security domain is `{domain}`)"
                )),
                e => fail(e),
            })
    }

    /// Restores a new instance's maps from its snapshot, if one exists. Returns what happened,
    /// for the VNF's reason; a snapshot that is corrupt or does not match the maps' layout is
    /// not used (the maps start as `tv_init` left them).
    fn restore_maps(&self, name: &Name, inst: &mut VnfInstance) -> Option<String> {
        let path = snapshot_file(self.snapshot_dir.as_ref()?, name);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                return Some(format!(
                    "map snapshot {} not used ({e}); maps start empty",
                    path.display()
                ));
            }
        };
        match inst.restore_maps(&bytes) {
            Ok(()) => {
                let counts: Vec<String> = inst
                    .maps()
                    .map(|m| {
                        m.defs()
                            .iter()
                            .filter_map(|d| m.by_name(&d.name).map(|x| (d, x.len())))
                            .map(|(d, n)| format!("{} {n}", d.name))
                            .collect()
                    })
                    .unwrap_or_default();
                Some(format!(
                    "maps restored from snapshot ({} entries)",
                    counts.join(", ")
                ))
            }
            Err(e) => Some(format!(
                "map snapshot {} not used ({e}); maps start empty",
                path.display()
            )),
        }
    }
}

/// Entries of every map of `maps`.
fn entries_of(maps: Option<&rw::MapSet>) -> u64 {
    maps.map_or(0, |m| {
        m.defs()
            .iter()
            .filter_map(|d| m.by_name(&d.name))
            .map(|x| u64::try_from(x.len()).unwrap_or(u64::MAX))
            .sum()
    })
}

/// Why `name` cannot be `what` (changed, upgraded, ...) now: it is frozen for a move.
fn frozen_refusal(name: &Name, what: &str) -> String {
    format!("{name} is frozen for its move's hand-off; it cannot be {what} until the move ends")
}

/// Bytes of a replication snapshot or a copy for disk copied while the instance is held
/// (between two batches).
const SNAPSHOT_SLICE_BYTES: usize = 1 << 20;
/// Pause between two slices, for the worker to take the instance back.
const SNAPSHOT_SLICE_GAP: Duration = Duration::from_micros(200);

/// Takes `slice` (one slice of a sliced snapshot or copy, under the instance's lock) until it
/// gives the whole, letting the instance go between two (the worker waiting for it takes it
/// first): the bytes, how many slices, and the longest a slice held the instance.
fn in_slices<E>(
    mut slice: impl FnMut() -> Result<Option<Vec<u8>>, E>,
) -> Result<(Vec<u8>, u32, Duration), E> {
    let (mut slices, mut held_max) = (0u32, Duration::ZERO);
    loop {
        let at = Instant::now();
        let taken = slice()?;
        held_max = held_max.max(at.elapsed());
        slices += 1;
        if let Some(bytes) = taken {
            return Ok((bytes, slices, held_max));
        }
        std::thread::sleep(SNAPSHOT_SLICE_GAP);
    }
}

/// The update log since the last batch; `None` when nothing changed since.
fn take_log(i: &mut VnfInstance) -> Result<Option<Vec<u8>>, rw::Error> {
    match i.maps().and_then(rw::MapSet::logged_updates) {
        Some(0) => Ok(None),
        _ => i.take_update_log().map(Some),
    }
}

/// Why a standby's state is not applied to `vnf`'s instance here: it was made the active.
fn made_active(vnf: &Name) -> String {
    format!("{vnf}'s instance here is the active now: a standby's state is not applied to it")
}

/// Standby replication reads the active instance's maps and writes the standby's, between
/// batches (under the instance's lock, as the worker runs them).
impl crate::replication::ReplicaState for WasmRuntime {
    fn take(&self, vnf: &Name, full: bool) -> Result<Option<Vec<u8>>, String> {
        if full {
            // In slices, each between two batches: a large state never holds the instance
            // for long (copy on write keeps the snapshot as the maps were when it began).
            let started = Instant::now();
            self.with_instance(vnf, rw::VnfInstance::begin_sliced_map_snapshot)
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            // A slice that fails has ended the sliced snapshot itself.
            let (snapshot, slices, held_max) = in_slices(|| {
                self.with_instance(vnf, |i| i.map_snapshot_slice(SNAPSHOT_SLICE_BYTES))
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())
            })?;
            if slices > 1 {
                tracing::info!(
                    vnf = %vnf,
                    bytes = snapshot.len(),
                    slices,
                    held_max_us = held_max.as_micros(),
                    took_ms = started.elapsed().as_millis(),
                    "snapshot of the maps taken in slices"
                );
            }
            return Ok(Some(snapshot));
        }
        let taken = self
            .with_instance(vnf, take_log)
            .map_err(|e| e.to_string())?;
        taken.map_err(|e| e.to_string())
    }

    fn logging(&self, vnf: &Name) -> Option<bool> {
        self.try_with_instance(vnf, |i| i.maps().map(|m| m.logged_updates().is_some()))
            .ok()
            .flatten()
            .flatten()
    }

    fn take_log_at_once(
        &self,
        vnf: &Name,
        max_updates: u64,
    ) -> Option<Result<Option<Vec<u8>>, String>> {
        let taken = self.try_with_instance(vnf, |i| {
            let small = i
                .maps()
                .and_then(rw::MapSet::logged_updates)
                .is_some_and(|n| n <= max_updates);
            small.then(|| take_log(i))
        });
        match taken {
            Err(e) => Some(Err(e.to_string())),
            // `None`: held by another (a batch, a save), or a larger log: on a blocking thread.
            Ok(log) => log.flatten().map(|log| log.map_err(|e| e.to_string())),
        }
    }

    fn apply(&self, vnf: &Name, full: bool, bytes: &[u8]) -> Result<u64, String> {
        let forwards = self.forwards(vnf);
        let applied = self
            .with_instance(vnf, |i| {
                // Read under the instance's lock, which its batches take too: an instance made
                // the active after the batch was judged has forwarded nothing since.
                if forwards() {
                    return Err(made_active(vnf));
                }
                let applied = if full {
                    i.restore_maps(bytes).map(|()| entries_of(i.maps()))
                } else {
                    i.apply_update_log(bytes)
                };
                applied.map_err(|e| e.to_string())
            })
            .map_err(|e| e.to_string())?;
        // Even after a log that failed part way: what it applied is not on disk yet.
        self.maps_changed(vnf);
        applied
    }

    fn apply_log_at_once(&self, vnf: &Name, bytes: &[u8]) -> Option<Result<u64, String>> {
        let forwards = self.forwards(vnf);
        let applied = self.try_with_instance(vnf, |i| {
            if forwards() {
                return Err(made_active(vnf));
            }
            i.apply_update_log(bytes).map_err(|e| e.to_string())
        });
        match applied {
            Err(e) => Some(Err(e.to_string())),
            Ok(None) => None,
            Ok(Some(applied)) => {
                self.maps_changed(vnf);
                Some(applied)
            }
        }
    }

    fn frozen_since(&self, vnf: &Name) -> Option<Instant> {
        let entries = self.entries();
        let e = entries.get(vnf).filter(|e| e.frozen)?;
        e.handoff.diverted_since()
    }

    fn packets_passed(&self, vnf: &Name, packets: u64) {
        if let Some(e) = self.entries().get(vnf) {
            e.handoff.passed(packets);
        }
    }

    fn take_packets(&self, vnf: &Name, max_bytes: usize) -> Option<(Vec<u8>, u64)> {
        let handoff = Arc::clone(&self.entries().get(vnf)?.handoff);
        let frames = handoff.take_diverted(max_bytes);
        let n = u64::try_from(frames.len()).unwrap_or(u64::MAX);
        (n > 0).then(|| (encode_frames(&frames), n))
    }

    fn hand_in(&self, vnf: &Name, bytes: &[u8]) -> Result<u64, String> {
        let handoff = match self.entries().get(vnf) {
            Some(e) if !e.stopped => Arc::clone(&e.handoff),
            _ => return Err(format!("no instance of {vnf} runs here")),
        };
        let frames = decode_frames(bytes, self.dataplane.panel().pool().buf_size())?;
        let sent = frames.len();
        let taken = handoff.hand_in(frames);
        if taken < sent {
            let dropped = sent - taken;
            tracing::warn!(vnf = %vnf, dropped, "handed-over packets beyond the queue's bound dropped");
            self.count_refused(vnf, u64::try_from(dropped).unwrap_or(u64::MAX));
        }
        Ok(u64::try_from(taken).unwrap_or(u64::MAX))
    }
}

impl WasmRuntime {
    /// Counts `packets` of `name`'s that this host will not deliver as its node's drops (on
    /// the panel or just removed from it).
    fn count_refused(&self, name: &Name, packets: u64) {
        if !self.dataplane.panel().count_refused(name.as_str(), packets) {
            tracing::warn!(vnf = %name, packets, "lost packets not counted: the VNF was never on the panel");
        }
    }

    /// Runs `f`, a change of `name`'s module, config or maps, on its instance unless it is
    /// frozen for a hand-off (refused, saying so): checked under the instance, where a
    /// freeze's last update log is taken too, so a change either goes into that log or is
    /// refused (the divert comes first).
    fn change_unless_frozen<R>(
        &self,
        name: &Name,
        what: &str,
        f: impl FnOnce(&mut VnfInstance) -> R,
    ) -> Result<R, RuntimeFailure> {
        let (inst, handoff) = self.running_with_handoff(name)?;
        change_held_unless_frozen(&inst, &handoff, name, what, f)
    }

    /// The running instance of `name` and its hand-off.
    fn running_with_handoff(&self, name: &Name) -> Result<(Shared, Arc<Handoff>), RuntimeFailure> {
        self.running_entry(name, |e| (Arc::clone(&e.inst), Arc::clone(&e.handoff)))
    }

    /// After a change of `handoff`'s divert: waits for the instance's poll that may have read
    /// it from before (none runs most of the time; its worker's other nodes are not waited for).
    async fn poll_settled(handoff: &Arc<Handoff>) -> Result<(), RuntimeFailure> {
        let Some(mark) = handoff.poll_under_way() else {
            return Ok(());
        };
        // A poll takes microseconds: a few looks before the hop to a blocking thread.
        if handoff.poll_ended_soon(mark) {
            return Ok(());
        }
        let handoff = Arc::clone(handoff);
        tokio::task::spawn_blocking(move || handoff.wait_poll_ended(mark))
            .await
            .map_err(|e| fail(format!("waiting for the instance's poll under way: {e}")))
    }

    /// A runtime whose module store lives in `store_dir`, placing VNFs on `dataplane`; relative
    /// module paths resolve against `base_dir` (the serve process's working directory).
    pub fn new(
        store_dir: impl Into<PathBuf>,
        base_dir: impl Into<PathBuf>,
        dataplane: Arc<NodeDataPlane>,
    ) -> Result<Self, RuntimeFailure> {
        Self::with_options(
            store_dir,
            base_dir,
            dataplane,
            rw::SecurityPolicy::default(),
            None,
        )
    }

    /// [`WasmRuntime::new`] with the node's security `policy`, keeping map snapshots in
    /// `snapshot_dir` (created if missing) when given.
    pub fn with_options(
        store_dir: impl Into<PathBuf>,
        base_dir: impl Into<PathBuf>,
        dataplane: Arc<NodeDataPlane>,
        policy: rw::SecurityPolicy,
        snapshot_dir: Option<PathBuf>,
    ) -> Result<Self, RuntimeFailure> {
        let mut cfg = RuntimeConfig::new(store_dir);
        cfg.policy = policy;
        let rt = rw::WasmRuntime::new(cfg).map_err(fail)?;
        if let Some(dir) = &snapshot_dir {
            std::fs::create_dir_all(dir).map_err(|e| {
                fail(format!(
                    "cannot create the map snapshot dir {}: {e}",
                    dir.display()
                ))
            })?;
        }
        Ok(Self {
            rt: Arc::new(rt),
            dataplane,
            base_dir: base_dir.into(),
            module_dir: None,
            snapshot_dir,
            snapshot_files: Arc::new(Mutex::new(())),
            entries: Arc::new(Mutex::new(BTreeMap::new())),
            modules: Arc::default(),
            fencing: None,
            state_change: StateChangeSlot::default(),
        })
    }

    /// Gates each instance's forwarding by `fencing` (the agent's): a standby never forwards,
    /// an active with a standby only while its host holds its lease or its standby hears it.
    pub fn with_fencing(mut self, fencing: Arc<Fencing>) -> Self {
        self.fencing = Some(fencing);
        self
    }

    /// Resolves `sha256:<hex>` module references to `<dir>/<hex>.wasm` (the controller's
    /// module directory on this node).
    pub fn with_module_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.module_dir = Some(dir.into());
        self
    }

    /// Where VNF `name`'s map snapshot is kept, when snapshots are kept.
    pub fn snapshot_path(&self, name: &Name) -> Option<PathBuf> {
        self.snapshot_dir.as_ref().map(|d| snapshot_file(d, name))
    }

    /// What writes a VNF's map snapshot (`None`: maps are not kept here).
    fn map_saver(&self) -> Option<MapSaver> {
        Some(MapSaver {
            dir: self.snapshot_dir.clone()?,
            files: Arc::clone(&self.snapshot_files),
            entries: Arc::clone(&self.entries),
        })
    }

    /// [`MapSaver::save`] on a blocking thread: copying, encoding and syncing a VNF's maps
    /// (up to its memory limit) never holds an async thread, which may be the node's only
    /// control thread on a core, or one at a real-time priority (`--control-priority`).
    async fn save_maps_off_async(&self, name: &Name, inst: Shared) -> Result<(), RuntimeFailure> {
        let Some(saver) = self.map_saver() else {
            return Ok(());
        };
        let name = name.clone();
        tokio::task::spawn_blocking(move || saver.save(&name, &inst, SaveOf::Stop))
            .await
            .map_err(|e| fail(format!("writing a map snapshot: {e}")))?
    }

    /// Snapshots the maps of every running or locked VNF. With `last`, each VNF stops taking
    /// packets first, so the snapshot is its final state (the node is shutting down).
    pub fn save_all_maps(&self, last: bool) {
        let live: Vec<(Name, Shared)> = self
            .entries()
            .iter()
            .filter(|(_, e)| !e.stopped)
            .map(|(n, e)| {
                if last {
                    e.scheduled.store(false, Ordering::Release);
                }
                (n.clone(), Arc::clone(&e.inst))
            })
            .collect();
        let Some(saver) = self.map_saver() else {
            return;
        };
        let of = if last { SaveOf::Last } else { SaveOf::Periodic };
        for (name, inst) in live {
            if let Err(e) = saver.save(&name, &inst, of) {
                tracing::warn!(vnf = %name, "map snapshot: {e}");
            }
        }
    }

    /// Runs until `shutdown` turns true (or its sender is gone): snapshots every VNF's maps each
    /// `every`, and once more, final, at shutdown.
    pub async fn persist_maps(
        self: Arc<Self>,
        every: Duration,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        loop {
            let last = tokio::select! {
                _ = tokio::time::sleep(every) => *shutdown.borrow(),
                changed = shutdown.changed() => changed.is_err() || *shutdown.borrow(),
            };
            let me = Arc::clone(&self);
            if let Err(e) = tokio::task::spawn_blocking(move || me.save_all_maps(last)).await {
                tracing::warn!("map snapshots: {e}");
            }
            if last {
                return;
            }
        }
    }

    fn entries(&self) -> MutexGuard<'_, BTreeMap<Name, Entry>> {
        lock_entries(&self.entries)
    }

    /// The VNFs with an instance here that is not stopped (running, locked or failed).
    pub fn instance_names(&self) -> Vec<Name> {
        self.entries()
            .iter()
            .filter(|(_, e)| !e.stopped)
            .map(|(n, _)| n.clone())
            .collect()
    }

    fn instance(&self, name: &Name) -> Result<(Shared, Arc<AtomicBool>), RuntimeFailure> {
        self.running_entry(name, |e| (Arc::clone(&e.inst), Arc::clone(&e.scheduled)))
    }

    /// What `pick` takes from `name`'s entry while its instance is not stopped.
    fn running_entry<T>(
        &self,
        name: &Name,
        pick: impl FnOnce(&Entry) -> T,
    ) -> Result<T, RuntimeFailure> {
        let entries = self.entries();
        let e = entries
            .get(name)
            .filter(|e| !e.stopped)
            .ok_or_else(|| fail(format!("no running wasm instance {name}")))?;
        Ok(pick(e))
    }

    /// What reads, verifies and instantiates modules for this runtime, apart from it so the
    /// work runs on a blocking thread.
    fn loader(&self) -> Loader {
        Loader {
            rt: Arc::clone(&self.rt),
            modules: Arc::clone(&self.modules),
            base_dir: self.base_dir.clone(),
            module_dir: self.module_dir.clone(),
            snapshot_dir: self.snapshot_dir.clone(),
        }
    }

    /// Replaces a running VNF's module by the one in `module` (a path, relative to the base
    /// directory) between two batches; maps with the same name and layout keep their contents.
    /// When `from` is given, only while the instance runs the module of that hash (hex), checked
    /// with the swap: the controller names what it saw running, so an upgrade that came first,
    /// or a new VNF of the name, is not swapped over. On any error the old module keeps running
    /// with its maps.
    pub fn upgrade(
        &self,
        name: &Name,
        module: &str,
        from: Option<&str>,
    ) -> Result<String, RuntimeFailure> {
        let (kind, domain) = self.change_unless_frozen(name, "upgraded", |i| {
            (i.config().engine, i.module().domain.clone())
        })?;
        let (meta, pin) = self.loader().install(module, kind, &domain)?;
        self.change_unless_frozen(name, "upgraded", |i| {
            let running = &i.module().hash;
            match from {
                Some(from) if running != from => Err(format!(
                    "vnf {name} runs module {running} here, not {from}: another upgrade (or a \
                     new VNF of the name) came first"
                )),
                _ => self.rt.upgrade(i, &meta).map_err(|e| e.to_string()),
            }
        })?
        .map_err(fail)?;
        if let Some(e) = self.entries().get_mut(name) {
            e.module = pin;
            // The carried maps count on, but may be laid out anew (maps added, resized or
            // dropped) with no change counted: the next save writes them whatever the count it
            // saved last.
            e.outside_changes += 1;
        }
        Ok(meta.hash)
    }

    /// A control-plane change of map `map` of `name`'s running instance (ADR 063), applied
    /// between two batches, all or nothing: `Invalid` names the field of a change that does
    /// not fit the map, `Failed` says why none was made (no such instance, locked, frozen for
    /// a move). The update log carries it to a standby or a move's destination.
    pub fn change_map(&self, name: &Name, map: &str, change: &MapChangeRequest) -> NodeReply {
        let failed = |reason: String| NodeReply::Failed { reason };
        let (delete, put) = match change.decode() {
            Ok(decoded) => decoded,
            Err(e) => {
                return NodeReply::Invalid {
                    field: e.path,
                    reason: e.reason,
                };
            }
        };
        match self.change_unless_frozen(name, "changed by the control plane", |i| {
            i.map_change(map, &delete, &put)
        }) {
            Err(e) => failed(e.to_string()),
            Ok(Err(rw::Error::InvalidChange { field, reason })) => {
                NodeReply::Invalid { field, reason }
            }
            Ok(Err(e)) => failed(format!("vnf {name}: {e}")),
            Ok(Ok(done)) => {
                self.maps_changed(name);
                NodeReply::MapChanged {
                    result: MapChangeResult {
                        map: map.to_owned(),
                        deleted: done.deleted,
                        put: done.put,
                        entries: done.entries,
                    },
                }
            }
        }
    }

    /// The maps of a running (or locked) VNF with their entry counts, in declaration order.
    pub fn map_views(&self, name: &Name) -> Result<Vec<MapView>, RuntimeFailure> {
        self.with_instance(name, |i| {
            let Some(maps) = i.maps() else {
                return Vec::new();
            };
            maps.defs()
                .iter()
                .map(|d| MapView {
                    name: d.name.clone(),
                    kind: match d.kind {
                        MapKind::Hash => "hash",
                        MapKind::Array => "array",
                        MapKind::LruHash => "lru_hash",
                    }
                    .to_owned(),
                    entries: maps
                        .by_name(&d.name)
                        .map_or(0, |m| u64::try_from(m.len()).unwrap_or(u64::MAX)),
                    max_entries: d.max_entries,
                    key_size: d.key_size,
                    value_size: d.value_size,
                })
                .collect()
        })
    }

    /// The runtime's and the module's counters of the running instance of `name`.
    pub fn stats_view(&self, name: &Name) -> Result<WasmStatsView, RuntimeFailure> {
        let unlinked = self
            .dataplane
            .panel()
            .node_drops(name.as_str())
            .map_or(0, |d| d.unlinked);
        self.with_instance(name, |i| {
            let s = i.stats();
            WasmStatsView {
                batches: s.batches,
                packets_in: s.packets_in,
                packets_forwarded: s.packets_forwarded,
                packets_dropped: s.packets_dropped,
                batches_trapped: s.batches_trapped,
                packets_trapped: s.packets_trapped,
                batch_errors: s.batch_errors,
                packets_errored: s.packets_errored,
                invalid_verdicts: s.invalid_verdicts,
                packets_emitted: s.packets_emitted,
                packets_unlinked: unlinked,
                restarts: s.restarts,
                fuel_used: s.fuel_used,
                counters: i
                    .counters()
                    .into_iter()
                    .map(|(name, value)| CounterView { name, value })
                    .collect(),
            }
        })
    }

    /// The module's log lines with a `seq` above `after`, oldest first.
    pub fn logs_view(&self, name: &Name, after: u64) -> Result<VnfLogs, RuntimeFailure> {
        self.with_instance(name, |i| {
            let kept = i.logs();
            VnfLogs {
                latest: kept.last().map_or(0, |l| l.seq),
                lines: kept
                    .into_iter()
                    .filter(|l| l.seq > after)
                    .map(|l| LogLineView {
                        seq: l.seq,
                        at_ns: l.at_ns,
                        level: l.level,
                        text: l.text,
                    })
                    .collect(),
                dropped: i.stats().logs_dropped,
            }
        })
    }

    /// Runs `f` on a running instance between batches (tests, stats, snapshots).
    pub fn with_instance<R>(
        &self,
        name: &Name,
        f: impl FnOnce(&mut VnfInstance) -> R,
    ) -> Result<R, RuntimeFailure> {
        let (inst, _) = self.instance(name)?;
        Ok(f(&mut guard(&inst)))
    }

    /// Whether `vnf`'s instance here is assigned as the active now, by its fencing gate
    /// (whether or not its lease lets it forward at this moment); never, without fencing.
    fn forwards(&self, vnf: &Name) -> impl Fn() -> bool + use<> {
        let gate = self.fencing.as_ref().map(|f| f.gate(vnf));
        move || gate.as_ref().is_some_and(|g| g.assigned_active())
    }

    /// [`Self::with_instance`] when nobody holds the instance now (a batch, a save, a
    /// snapshot slice); `Ok(None)` when somebody does.
    fn try_with_instance<R>(
        &self,
        name: &Name,
        f: impl FnOnce(&mut VnfInstance) -> R,
    ) -> Result<Option<R>, RuntimeFailure> {
        let (inst, _) = self.instance(name)?;
        Ok(try_guard(&inst).map(|mut held| f(&mut held)))
    }

    /// `vnf`'s maps changed under its disk copy's count: the next periodic save writes them.
    fn maps_changed(&self, vnf: &Name) {
        if let Some(e) = self.entries().get_mut(vnf) {
            e.outside_changes += 1;
        }
    }

    /// Puts an instance [`Loader::prepare`] made on the data-plane worker of the VNF's CPU.
    fn place(&self, spec: &InstanceSpec, prepared: Prepared) -> Result<(), RuntimeFailure> {
        let Prepared { inst, module, note } = prepared;
        let cpu = spec
            .placement
            .vcpus
            .first()
            .and_then(|c| c.first())
            .copied()
            .ok_or_else(|| fail("the placement gives this VNF no CPU"))?;
        let worker = self.dataplane.worker_for_cpu(cpu).ok_or_else(|| {
            fail(format!(
                "no data-plane worker on cpu {cpu} (this process may run on {:?})",
                self.dataplane.cpus()
            ))
        })?;
        let inst: Shared = Arc::new(Mutex::new(inst));
        let scheduled = Arc::new(AtomicBool::new(true));
        let handoff = Arc::new(Handoff::default());
        let trapped = TrapTeller {
            name: spec.name.clone(),
            slot: self.state_change.clone(),
        };
        let ports: Vec<&str> = spec
            .descriptor
            .spec
            .ports
            .iter()
            .map(|p| p.as_str())
            .collect();
        let node = GatedNode {
            scheduled: Arc::clone(&scheduled),
            gate: self.fencing.as_ref().map(|f| f.gate(&spec.name)),
            inner: ProcessorNode::new(
                WasmStage {
                    inst: Arc::clone(&inst),
                    batch: Box::new(PacketBatch::new()),
                    ok: Vec::with_capacity(BATCH),
                    trapped: trapped.clone(),
                },
                BATCH,
            ),
            ticker: spec
                .descriptor
                .spec
                .wasm
                .as_ref()
                .and_then(|w| w.tick_interval())
                .map(|every| Ticker::new(Arc::clone(&inst), trapped, every)),
            handoff: Arc::clone(&handoff),
        };
        let mut entries = self.entries();
        if entries.get(&spec.name).is_some_and(|e| !e.stopped) {
            return Err(fail(format!("{} is already running", spec.name)));
        }
        // A stopped instance of the same name may still be on the panel.
        let _ = self.dataplane.remove_node(spec.name.as_str());
        self.dataplane
            .add_node(spec.name.as_str(), &ports, worker, Box::new(node))
            .map_err(fail)?;
        let busy = spec.descriptor.poll_mode() == Some(PollMode::Busy);
        if busy
            && !self
                .dataplane
                .set_busy_poll(spec.name.as_str(), true)
                .map_err(fail)?
        {
            tracing::warn!(
                vnf = %spec.name,
                cpu,
                "polling adaptively: this host does not busy-poll (--no-busy-poll), or busy polling would leave no core for its own threads"
            );
        }
        entries.insert(
            spec.name.clone(),
            Entry {
                inst,
                scheduled,
                module,
                stopped: false,
                note,
                saved_changes: None,
                outside_changes: 0,
                handoff,
                frozen: false,
            },
        );
        Ok(())
    }
}

#[async_trait]
impl Runtime for WasmRuntime {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Wasm
    }

    fn on_state_change(&self, hook: StateChangeHook) {
        self.state_change.set(hook);
    }

    async fn start(&self, spec: &InstanceSpec) -> Result<(), RuntimeFailure> {
        // Reading, verifying and compiling a module and reading its map snapshot block: they
        // run on a blocking thread, not on the agent's async workers.
        let loader = self.loader();
        let owned = spec.clone();
        let prepared = tokio::task::spawn_blocking(move || loader.prepare(&owned))
            .await
            .map_err(|e| fail(format!("preparing the module of {} failed: {e}", spec.name)))??;
        self.place(spec, prepared)
    }

    /// The instance starts again from its module between two batches with the descriptor's
    /// config and fuel per batch, its maps carried over; on failure it runs on as it was.
    /// It runs on a blocking thread: starting the module again runs its `tv_init` (up to 16
    /// batches' fuel), which must not hold an async worker (with `--control-priority`, a core).
    async fn reconfigure(&self, spec: &InstanceSpec) -> Result<(), RuntimeFailure> {
        let cfg = vnf_config(spec)?;
        let (inst, handoff) = self.running_with_handoff(&spec.name)?;
        let name = spec.name.clone();
        tokio::task::spawn_blocking(move || {
            change_held_unless_frozen(&inst, &handoff, &name, "reconfigured", |i| {
                i.reconfigure(cfg.config, cfg.limits.fuel_per_batch)
            })
        })
        .await
        .map_err(|e| fail(format!("reconfiguring {}: {e}", spec.name)))??
        .map_err(fail)
    }

    /// Wasm instances live in the agent process: after a restart there is nothing to adopt.
    async fn adopt(&self, _spec: &InstanceSpec) -> Result<bool, RuntimeFailure> {
        Ok(false)
    }

    async fn stop(&self, name: &Name) -> Result<(), RuntimeFailure> {
        let inst = {
            let mut entries = self.entries();
            let Some(e) = entries.get_mut(name) else {
                return Ok(());
            };
            e.scheduled.store(false, Ordering::Release);
            if e.stopped {
                return Ok(());
            }
            // Dropping the returned node drops the stage; the instance lives on in the entry
            // until `remove` (its maps can still be read).
            let _ = self.dataplane.remove_node(name.as_str());
            self.dataplane.release_links(name.as_str());
            // Off its worker: what its hand-off holds is never delivered, the node's drops.
            let left = e.handoff.discard();
            if left > 0 {
                self.count_refused(name, left);
            }
            e.stopped = true;
            e.frozen = false;
            Arc::clone(&e.inst)
        };
        // Off the panel: this is the VNF's last state until it starts again.
        self.save_maps_off_async(name, inst).await
    }

    async fn pause(&self, name: &Name) -> Result<(), RuntimeFailure> {
        if Runtime::frozen(self, name).is_some() {
            return Err(fail(frozen_refusal(name, "locked")));
        }
        let (inst, scheduled) = self.instance(name)?;
        scheduled.store(false, Ordering::Release);
        guard(&inst).lock().map_err(fail)?;
        self.save_maps_off_async(name, inst).await
    }

    async fn start_note(&self, name: &Name) -> Option<String> {
        self.entries().get(name).and_then(|e| e.note.clone())
    }

    async fn resume(&self, name: &Name) -> Result<(), RuntimeFailure> {
        let (inst, scheduled) = self.instance(name)?;
        guard(&inst).unlock().map_err(fail)?;
        scheduled.store(true, Ordering::Release);
        Ok(())
    }

    async fn freeze(&self, name: &Name) -> Result<(), RuntimeFailure> {
        let handoff = {
            let entries = self.entries();
            let e = entries
                .get(name)
                .filter(|e| !e.stopped)
                .ok_or_else(|| fail(format!("no instance of {name} runs here")))?;
            if e.frozen {
                return Ok(());
            }
            Arc::clone(&e.handoff)
        };
        // Its links stay until it stops: what its senders sent before they rewired still comes.
        self.dataplane.hold_links(name.as_str());
        handoff.divert();
        // Once the poll under way ended no batch runs, and every later poll queues.
        if let Err(e) = Self::poll_settled(&handoff).await {
            handoff.stop_divert();
            self.dataplane.release_links(name.as_str());
            return Err(e);
        }
        // The instance diverted, not one started in its place meanwhile.
        match self
            .entries()
            .get_mut(name)
            .filter(|e| !e.stopped && Arc::ptr_eq(&e.handoff, &handoff))
        {
            Some(e) => e.frozen = true,
            // Stopped (or replaced) meanwhile: nothing to freeze.
            None => self.dataplane.release_links(name.as_str()),
        }
        Ok(())
    }

    async fn thaw(&self, name: &Name) -> Result<(), RuntimeFailure> {
        let handoff = {
            let mut entries = self.entries();
            let Some(e) = entries
                .get_mut(name)
                .filter(|e| e.frozen || e.handoff.diverting())
            else {
                return Ok(());
            };
            e.frozen = false;
            Arc::clone(&e.handoff)
        };
        handoff.stop_divert();
        // No poll diverts once the one under way ended: what the divert queued is all there is
        // (the node's next poll hands it in first; this does when no poll comes).
        let waited = Self::poll_settled(&handoff).await;
        handoff.abandon_in_flight();
        handoff.requeue_if_diverted();
        self.dataplane.release_links(name.as_str());
        waited
    }

    fn frozen(&self, name: &Name) -> Option<u64> {
        self.entries()
            .get(name)
            .filter(|e| e.frozen)
            .map(|e| e.handoff.diverted_total())
    }

    /// Once the data plane says every sender rewired, the node's next poll takes what their
    /// last frames left on its rings, and finds no ring but those of the links that stay (a
    /// sender of this host whose worker has not let go of its old link yet may still send).
    fn senders_drained(&self, name: &Name) -> bool {
        let Some(handoff) = self
            .entries()
            .get(name)
            .filter(|e| e.frozen)
            .map(|e| Arc::clone(&e.handoff))
        else {
            return false;
        };
        let Some(staying) = self.dataplane.held_senders_done(name.as_str()) else {
            handoff.clear_mark();
            return false;
        };
        if !handoff.polled_since_mark() {
            return false;
        }
        if handoff.input_rings() > staying {
            handoff.clear_mark();
            return false;
        }
        true
    }

    /// The instance is looked at once the entries are let go, and on a blocking thread when
    /// someone holds it (a reconfigure restarting its module, a save of its maps): the async
    /// thread asking never waits for it, nor does anyone waiting for the entries.
    async fn state(&self, name: &Name) -> InstanceState {
        let (inst, scheduled) = {
            let entries = self.entries();
            let Some(e) = entries.get(name) else {
                return InstanceState::Absent;
            };
            if e.stopped {
                return InstanceState::Stopped;
            }
            (Arc::clone(&e.inst), Arc::clone(&e.scheduled))
        };
        let free = try_guard(&inst).map(|i| i.state().clone());
        let now = match free {
            Some(now) => now,
            None => match tokio::task::spawn_blocking(move || guard(&inst).state().clone()).await {
                Ok(now) => now,
                Err(e) => return InstanceState::Failed(format!("reading its state: {e}")),
            },
        };
        match now {
            VnfState::Running => InstanceState::Running,
            VnfState::Locked => InstanceState::Paused,
            VnfState::Failed(reason) => {
                scheduled.store(false, Ordering::Release);
                InstanceState::Failed(format!("module failed: {reason}"))
            }
        }
    }

    async fn remove(&self, name: &Name) -> Result<(), RuntimeFailure> {
        let (removed, snapshot, unused_module) = {
            let mut entries = self.entries();
            let removed = entries.remove(name);
            // A stopped (or unknown) VNF is going away: its maps go with it. One removed
            // without a stop is a failed instance cleared to start again: its snapshot stays.
            let snapshot = self
                .map_saver()
                .filter(|_| removed.as_ref().is_none_or(|e| e.stopped));
            let mut unused_module = None;
            if let Some(e) = &removed {
                e.scheduled.store(false, Ordering::Release);
                let _ = self.dataplane.remove_node(name.as_str());
                self.dataplane.release_links(name.as_str());
                if !entries.values().any(|o| o.module.hash == e.module.hash) {
                    unused_module = Some(e.module.hash.clone());
                }
            }
            (removed, snapshot, unused_module)
        };
        // Deleting files and dropping the instance (its memory, up to its limit) on a blocking
        // thread, as a save is written.
        let rt = Arc::clone(&self.rt);
        let modules = Arc::clone(&self.modules);
        let name = name.clone();
        tokio::task::spawn_blocking(move || {
            drop(removed);
            if let Some(saver) = snapshot {
                saver.delete(&name)?;
            }
            // Not if a start of the same module pinned it meanwhile (checked under the lock
            // it pins under).
            if let Some(hash) = unused_module {
                modules.remove_if_unused(&hash, || match rt.remove(&hash) {
                    Ok(()) | Err(rw::Error::NotInstalled(_)) => Ok(()),
                    Err(e) => Err(fail(e)),
                })?;
            }
            Ok(())
        })
        .await
        .map_err(|e| fail(format!("removing a wasm VNF's files: {e}")))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A module's files are removed only while nothing pins it: a start that pinned it before
    /// the removal looked keeps them, and the last pin dropped lets the removal go.
    #[test]
    fn a_pinned_module_is_not_removed() {
        let pins = Arc::new(ModulePins::default());
        let first = pins.pin("m1");
        let second = pins.pin("m1");
        let removed = std::cell::Cell::new(0);
        let remove = || -> Result<(), ()> {
            removed.set(removed.get() + 1);
            Ok(())
        };
        pins.remove_if_unused("m1", remove).unwrap();
        drop(first);
        pins.remove_if_unused("m1", remove).unwrap();
        assert_eq!(removed.get(), 0, "still pinned");
        pins.remove_if_unused("m2", remove).unwrap();
        drop(second);
        pins.remove_if_unused("m1", remove).unwrap();
        assert_eq!(removed.get(), 2, "m2 never pinned, then m1 once unpinned");
        assert!(pins.counts().is_empty());
    }

    pub(super) fn config(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn config_map_becomes_sorted_lines() {
        let blob = config_blob(&config(&[("b", "2"), ("a", "1")])).unwrap();
        assert_eq!(blob, b"a=1\nb=2\n");
        assert!(config_blob(&BTreeMap::new()).unwrap().is_empty());
    }

    #[test]
    fn blob_hex_is_the_raw_blob() {
        let blob = config_blob(&config(&[("blob_hex", "02000000")])).unwrap();
        assert_eq!(blob, [2, 0, 0, 0]);
    }

    #[test]
    fn bad_blob_hex_is_refused_naming_the_field() {
        let e = config_blob(&config(&[("blob_hex", "0g")])).unwrap_err();
        assert!(e.0.contains("spec.wasm.config.blob_hex"), "{e}");
        let e = config_blob(&config(&[("blob_hex", "020")])).unwrap_err();
        assert!(e.0.contains("even number"), "{e}");
        let e = config_blob(&config(&[("blob_hex", "02"), ("x", "1")])).unwrap_err();
        assert!(e.0.contains("only key"), "{e}");
    }
}

#[cfg(test)]
mod dataplane_tests {
    use std::time::{Duration, Instant};

    use telvirt_dataplane::graph::LinkSpec;
    use telvirt_dataplane::traffic::{GenConfig, Generator, LatencySink};
    use telvirt_model::{Format, Placement, Role, parse_vnf};

    use super::tests::config;
    use super::*;

    const FW: &str = r#"
apiVersion: telvirt/v1
kind: Vnf
metadata: { name: fw1 }
spec:
  runtime: wasm
  cpu: { policy: dedicated, count: 1 }
  ports: [in, out]
  wasm:
    module: firewall.wasm
    config: { blob_hex: "02000000" }
"#;

    fn spec(dir: &std::path::Path, cpu: u32) -> InstanceSpec {
        InstanceSpec {
            name: "fw1".parse().unwrap(),
            descriptor: parse_vnf(FW.as_bytes(), Format::Yaml).unwrap(),
            placement: Placement {
                role: Role::Active,
                host: "t".into(),
                vcpus: vec![vec![cpu]],
                emulator_cpus: Vec::new(),
                held: Vec::new(),
                numa_nodes: vec![0],
                group: None,
            },
            state_dir: dir.join("fw1"),
            domain: "operator".into(),
            memory_bytes: 0,
        }
    }

    fn until(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The firewall module in a temp dir, a data plane with one worker on this process's first
    /// CPU, the adapter, and fw1's spec placed on that CPU.
    fn setup() -> (
        tempfile::TempDir,
        Arc<NodeDataPlane>,
        WasmRuntime,
        InstanceSpec,
    ) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("firewall.wasm"), rw::vnfs::firewall().wasm).unwrap();
        let cpu = telvirt_dataplane::worker::allowed_cores().unwrap()[0];
        let dp = NodeDataPlane::with_cores(&[cpu]).unwrap();
        let rt = WasmRuntime::new(dir.path().join("store"), dir.path(), Arc::clone(&dp)).unwrap();
        let s = spec(dir.path(), u32::try_from(cpu).unwrap());
        (dir, dp, rt, s)
    }

    #[tokio::test]
    async fn a_log_is_taken_and_applied_at_once_only_when_nobody_holds_the_instance() {
        use crate::replication::ReplicaState;
        let (_d1, _dp1, src, s) = setup();
        let (_d2, _dp2, dst, _) = setup();
        src.start(&s).await.unwrap();
        dst.start(&s).await.unwrap();
        let snapshot = src.take(&s.name, true).unwrap().unwrap();
        dst.apply(&s.name, true, &snapshot).unwrap();
        let key = [9u8; 16];
        src.with_instance(&s.name, move |i| i.map_update("rules", &key, &[2, 0, 0, 0]))
            .unwrap()
            .unwrap();
        // Held (as a batch or a save holds it): not at once.
        let (inst, _) = src.instance(&s.name).unwrap();
        let held = guard(&inst);
        assert!(src.take_log_at_once(&s.name, 1024).is_none());
        drop(held);
        // A log of more updates than asked for: not at once either.
        assert!(src.take_log_at_once(&s.name, 0).is_none());
        // Free and small (the node's worker may hold it for a moment: tried until free).
        let mut log = None;
        until("the log taken at once", || {
            log = src.take_log_at_once(&s.name, 1024);
            log.is_some()
        });
        let log = log.unwrap().unwrap().expect("one update logged");
        let (inst, _) = dst.instance(&s.name).unwrap();
        let held = guard(&inst);
        assert!(dst.apply_log_at_once(&s.name, &log).is_none());
        drop(held);
        let mut applied = None;
        until("the log applied at once", || {
            applied = dst.apply_log_at_once(&s.name, &log);
            applied.is_some()
        });
        assert_eq!(applied.unwrap(), Ok(1));
        assert_eq!(dst.map_views(&s.name).unwrap()[0].entries, 1);
    }

    #[tokio::test]
    async fn handed_over_packets_it_never_processes_are_the_nodes_drops() {
        use crate::replication::ReplicaState;
        let (_d, dp, rt, s) = setup();
        rt.start(&s).await.unwrap();
        let frames = vec![(0u16, vec![0u8; 60]); super::super::handoff::MAX_QUEUED_PACKETS + 5];
        let bytes = super::super::handoff::encode_frames(&frames);
        let taken = rt.hand_in(&s.name, &bytes).unwrap();
        assert_eq!(taken, super::super::handoff::MAX_QUEUED_PACKETS as u64);
        // The rest is counted where it was lost (the queue waits for links: nothing processed).
        assert_eq!(dp.panel().node_drops(s.name.as_str()).unwrap().refused, 5);
        // The instance stops: what it did not process is its drops (what it processed went to
        // ports without links: its unlinked drops, after its wait for links).
        rt.stop(&s.name).await.unwrap();
        let drops = dp.panel().node_drops(s.name.as_str()).unwrap();
        assert_eq!(
            drops.refused + drops.unlinked,
            5 + super::super::handoff::MAX_QUEUED_PACKETS as u64
        );
        // A batch handed in after it stopped is refused (counted by the source).
        assert!(rt.hand_in(&s.name, &bytes).is_err());
    }

    #[tokio::test]
    async fn a_frozen_instance_refuses_changes_of_its_module_config_and_maps() {
        let (dir, _dp, rt, s) = setup();
        rt.start(&s).await.unwrap();
        std::fs::write(
            dir.path().join("firewall-copy.wasm"),
            rw::vnfs::firewall().wasm,
        )
        .unwrap();
        let put = MapChangeRequest {
            delete: Vec::new(),
            put: vec![telvirt_model::api::MapEntry {
                key: "09".repeat(16),
                value: "02000000".into(),
            }],
        };
        let rules = |rt: &WasmRuntime| rt.map_views(&s.name).unwrap()[0].entries;
        rt.freeze(&s.name).await.unwrap();
        let refused = |why: String| {
            assert!(
                why.contains("frozen for its move's hand-off"),
                "not refused as frozen: {why}"
            );
        };
        match rt.change_map(&s.name, "rules", &put) {
            NodeReply::Failed { reason } => refused(reason),
            other => panic!("a map change while frozen: {other:?}"),
        }
        refused(rt.reconfigure(&s).await.unwrap_err().to_string());
        refused(
            rt.upgrade(&s.name, "firewall-copy.wasm", None)
                .unwrap_err()
                .to_string(),
        );
        assert_eq!(rules(&rt), 0, "nothing changed while frozen");
        // The move cancelled: changes go again.
        rt.thaw(&s.name).await.unwrap();
        assert!(
            matches!(
                rt.change_map(&s.name, "rules", &put),
                NodeReply::MapChanged { .. }
            ),
            "a map change after the thaw"
        );
        assert_eq!(rules(&rt), 1);
        rt.reconfigure(&s).await.unwrap();
    }

    #[tokio::test]
    async fn a_module_needing_more_memory_than_was_placed_is_refused() {
        let (_dir, _dp, rt, s) = setup();
        // Placement counted the linear memory only; the firewall's maps do not fit in it.
        let linear = s
            .descriptor
            .spec
            .wasm
            .as_ref()
            .unwrap()
            .limits
            .memory
            .bytes();
        let short = InstanceSpec {
            memory_bytes: linear,
            ..s.clone()
        };
        let e = rt.start(&short).await.unwrap_err();
        assert!(e.0.contains("placement counted"), "{e}");
        assert_eq!(rt.state(&s.name).await, InstanceState::Absent);
        // What the controller would have counted is enough.
        let counted = InstanceSpec {
            memory_bytes: s.descriptor.memory_budget(&[]) + (64 << 20),
            ..s.clone()
        };
        rt.start(&counted).await.unwrap();
        rt.stop(&s.name).await.unwrap();
    }

    #[tokio::test]
    async fn a_module_whose_init_fails_is_refused_with_the_runtimes_reason() {
        let (_dir, dp, rt, mut s) = setup();
        // Six bytes: not a default action plus whole 20-byte rules, so tv_init refuses it.
        if let Some(w) = s.descriptor.spec.wasm.as_mut() {
            w.config = config(&[("blob_hex", "020000000000")]);
        }
        let e = rt.start(&s).await.unwrap_err();
        assert!(e.0.to_lowercase().contains("init"), "{e}");
        assert_eq!(rt.state(&s.name).await, InstanceState::Absent);
        assert!(
            dp.node_ports("fw1").is_none(),
            "nothing is placed on the panel"
        );
        let missing = InstanceSpec {
            descriptor: {
                let mut d = s.descriptor.clone();
                if let Some(w) = d.spec.wasm.as_mut() {
                    w.module = "nope.wasm".into();
                    w.config = BTreeMap::new();
                }
                d
            },
            ..s
        };
        let e = rt.start(&missing).await.unwrap_err();
        assert!(e.0.contains("cannot read module"), "{e}");
    }

    #[tokio::test]
    async fn a_permission_the_owners_domain_lacks_is_refused_before_anything_runs() {
        let (dir, dp, rt, s) = setup();
        // The firewall asking for `log` too (name shortened to keep the section's length).
        let mut bytes = rw::vnfs::firewall().wasm.to_vec();
        let from: &[u8] = br#""name":"firewall","version":"1.0.0","permissions":["maps.read","maps.write","counters"]"#;
        let to: &[u8] = br#""name":"fw","version":"1.0.0","permissions":["maps.read","maps.write","counters","log"]"#;
        let at = bytes.windows(from.len()).position(|w| w == from).unwrap();
        bytes[at..at + from.len()].copy_from_slice(to);
        std::fs::write(dir.path().join("logging.wasm"), bytes).unwrap();
        let mut descriptor = s.descriptor.clone();
        if let Some(w) = descriptor.spec.wasm.as_mut() {
            w.module = "logging.wasm".into();
        }
        let untrusted = InstanceSpec {
            descriptor,
            domain: "untrusted".into(),
            ..s.clone()
        };
        let e = rt.start(&untrusted).await.unwrap_err();
        assert!(e.0.contains("`log`") && e.0.contains("`untrusted`"), "{e}");
        assert_eq!(rt.state(&s.name).await, InstanceState::Absent);
        assert!(dp.node_ports("fw1").is_none(), "nothing is placed");
        // The plain firewall fits the untrusted domain; the logging one the operator's.
        rt.start(&InstanceSpec {
            domain: "untrusted".into(),
            ..s.clone()
        })
        .await
        .unwrap();
        rt.stop(&s.name).await.unwrap();
        rt.remove(&s.name).await.unwrap();
        rt.start(&InstanceSpec {
            domain: "operator".into(),
            ..untrusted
        })
        .await
        .unwrap();
        assert_eq!(rt.state(&s.name).await, InstanceState::Running);
    }

    /// Writes `firewall-v2.wasm` into `dir`: the example firewall with another manifest
    /// version (same length, same maps), so another module to upgrade to.
    fn write_firewall_v2(dir: &Path) {
        let mut v2 = rw::vnfs::firewall().wasm.to_vec();
        let needle = b"\"version\":\"1.0.0\"";
        let at = v2
            .windows(needle.len())
            .position(|w| w == needle)
            .expect("firewall manifest has version 1.0.0");
        v2[at..at + needle.len()].copy_from_slice(b"\"version\":\"1.0.1\"");
        std::fs::write(dir.join("firewall-v2.wasm"), v2).unwrap();
    }

    /// A runtime over `dir` that keeps map snapshots in `dir/snapshots`.
    fn with_snapshots(dir: &tempfile::TempDir, dp: &Arc<NodeDataPlane>) -> WasmRuntime {
        WasmRuntime::with_options(
            dir.path().join("store"),
            dir.path(),
            Arc::clone(dp),
            rw::SecurityPolicy::default(),
            Some(dir.path().join("snapshots")),
        )
        .unwrap()
    }

    /// A periodic save gives way to a move's freeze (nothing written, the freeze waits for
    /// no copy); once the move is cancelled (thawed) the next one writes what changed. The
    /// node's last save does not give way.
    #[tokio::test]
    async fn a_periodic_save_gives_way_to_a_moves_freeze() {
        let (dir, dp, _, s) = setup();
        let rt = with_snapshots(&dir, &dp);
        let file = rt.snapshot_path(&s.name).unwrap();
        rt.start(&s).await.unwrap();
        let key = [9u8; 16];
        rt.with_instance(&s.name, move |i| i.map_update("rules", &key, &[2, 0, 0, 0]))
            .unwrap()
            .unwrap();
        rt.freeze(&s.name).await.unwrap();
        rt.save_all_maps(false);
        assert!(
            !file.exists(),
            "a periodic save was written during a freeze"
        );
        rt.thaw(&s.name).await.unwrap();
        rt.save_all_maps(false);
        assert!(file.exists(), "the save after the thaw was not written");
        std::fs::remove_file(&file).unwrap();
        rt.freeze(&s.name).await.unwrap();
        rt.save_all_maps(true);
        assert!(file.exists(), "the node's last save gave way");
    }

    /// An upgrade restarts the maps' change count: the next save still writes what changed
    /// before it.
    #[tokio::test]
    async fn maps_changed_before_an_upgrade_are_saved_after_it() {
        let (dir, dp, _, s) = setup();
        let rt = with_snapshots(&dir, &dp);
        rt.start(&s).await.unwrap();
        rt.save_all_maps(false);
        let key = [9u8; 16];
        rt.with_instance(&s.name, move |i| i.map_update("rules", &key, &[2, 0, 0, 0]))
            .unwrap()
            .unwrap();
        write_firewall_v2(dir.path());
        rt.upgrade(&s.name, "firewall-v2.wasm", None).unwrap();
        rt.save_all_maps(false);
        rt.stop(&s.name).await.unwrap();
        rt.start(&s).await.unwrap();
        let note = rt.start_note(&s.name).await.unwrap();
        assert!(
            note.contains("maps restored from snapshot (rules 1 entries)"),
            "{note}"
        );
    }

    #[tokio::test]
    async fn maps_are_restored_from_a_matching_snapshot_only() {
        let (dir, dp, _, s) = setup();
        let rt = with_snapshots(&dir, &dp);
        let file = rt.snapshot_path(&s.name).unwrap();
        rt.start(&s).await.unwrap();
        assert_eq!(rt.start_note(&s.name).await, None, "no snapshot yet");
        let key = [9u8; 16];
        rt.with_instance(&s.name, move |i| i.map_update("rules", &key, &[2, 0, 0, 0]))
            .unwrap()
            .unwrap();
        // Stop writes the snapshot; the next start restores it before the first batch.
        rt.stop(&s.name).await.unwrap();
        assert!(file.exists());
        rt.start(&s).await.unwrap();
        let note = rt.start_note(&s.name).await.unwrap();
        assert!(
            note.contains("maps restored from snapshot (rules 1 entries)"),
            "{note}"
        );
        let rules = |rt: &WasmRuntime| rt.map_views(&s.name).unwrap()[0].entries;
        assert_eq!(rules(&rt), 1);

        // A corrupt snapshot is not used, and the note says why.
        rt.stop(&s.name).await.unwrap();
        let mut bytes = std::fs::read(&file).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&file, bytes).unwrap();
        rt.start(&s).await.unwrap();
        let note = rt.start_note(&s.name).await.unwrap();
        assert!(
            note.contains("not used") && note.contains("maps start empty"),
            "{note}"
        );
        assert_eq!(rules(&rt), 0);

        // So is one of another map layout (key size 8 instead of 16).
        rt.stop(&s.name).await.unwrap();
        let other = rw::MapDef {
            name: "rules".into(),
            kind: MapKind::Hash,
            key_size: 8,
            value_size: 4,
            max_entries: 16,
        };
        let bytes = rw::MapSet::new(&[other]).unwrap().snapshot();
        std::fs::write(&file, bytes).unwrap();
        rt.start(&s).await.unwrap();
        let note = rt.start_note(&s.name).await.unwrap();
        assert!(
            note.contains("not used") && note.contains("key 8"),
            "{note}"
        );

        // Removing the stopped VNF deletes its snapshot.
        rt.stop(&s.name).await.unwrap();
        assert!(file.exists());
        rt.remove(&s.name).await.unwrap();
        assert!(!file.exists());
    }

    /// A generator at 50 kpps into fw1 and fw1 into a sink, on `dp`; the sink's counts.
    fn gen_through_fw1_to_sink(
        dp: &NodeDataPlane,
    ) -> Arc<std::sync::Mutex<telvirt_dataplane::traffic::SinkState>> {
        let gen_cfg = GenConfig {
            rate_pps: Some(50_000),
            ..GenConfig::default()
        };
        let generator = Generator::new(gen_cfg, dp.panel().pool().buf_size()).unwrap();
        let sink = LatencySink::new(32);
        let seen = sink.state();
        dp.add_node("gen", &["out"], 0, Box::new(generator))
            .unwrap();
        dp.add_node("sink", &["in"], 0, Box::new(sink)).unwrap();
        let links =
            ["gen.out -> fw1.in", "fw1.out -> sink.in"].map(|l| LinkSpec::parse(l).unwrap());
        dp.panel().apply_network("t", &links).unwrap();
        seen
    }

    #[tokio::test]
    async fn packets_flow_through_a_wasm_vnf_and_lock_stops_them() {
        let (dir, dp, rt, s) = setup();
        rt.start(&s).await.unwrap();
        assert_eq!(rt.state(&s.name).await, InstanceState::Running);

        let seen = gen_through_fw1_to_sink(&dp);
        let received = || seen.lock().unwrap().received;
        until("packets through fw1", || received() > 100);
        let stats = rt.with_instance(&s.name, |i| i.stats()).unwrap();
        assert!(stats.packets_forwarded > 100, "{stats:?}");

        rt.pause(&s.name).await.unwrap();
        assert_eq!(rt.state(&s.name).await, InstanceState::Paused);
        dp.panel().barrier();
        let before = rt.with_instance(&s.name, |i| i.stats().packets_in).unwrap();
        let r0 = received();
        until("the generator to fill fw1's input", || {
            dp.panel()
                .status()
                .iter()
                .any(|l| l.counters.packets > r0 + 1000)
        });
        let after = rt.with_instance(&s.name, |i| i.stats().packets_in).unwrap();
        assert_eq!(before, after, "a locked VNF must not be scheduled");
        rt.resume(&s.name).await.unwrap();
        until("packets again after unlock", || received() > r0 + 100);

        // Upgrade between batches: a different module (manifest version changed, same length)
        // keeps the map contents, and packets keep flowing.
        let key = [7u8; 16];
        rt.with_instance(&s.name, move |i| i.map_update("rules", &key, &[2, 0, 0, 0]))
            .unwrap()
            .unwrap();
        write_firewall_v2(dir.path());
        let old = rt
            .with_instance(&s.name, |i| i.module().hash.clone())
            .unwrap();
        // Named as running another module than it does: refused, nothing swapped.
        let e = rt
            .upgrade(&s.name, "firewall-v2.wasm", Some(&"0".repeat(64)))
            .unwrap_err();
        assert!(e.to_string().contains("came first"), "{e}");
        let running = rt
            .with_instance(&s.name, |i| i.module().hash.clone())
            .unwrap();
        assert_eq!(running, old);
        let new = rt.upgrade(&s.name, "firewall-v2.wasm", Some(&old)).unwrap();
        assert_ne!(old, new, "the upgrade must run another module");
        let kept = rt
            .with_instance(&s.name, move |i| {
                i.maps()
                    .and_then(|m| m.by_name("rules"))
                    .and_then(|m| m.peek(&key).map(<[u8]>::to_vec))
            })
            .unwrap();
        assert_eq!(kept, Some(vec![2, 0, 0, 0]), "map contents must survive");
        let r1 = received();
        until("packets after the upgrade", || received() > r1 + 100);
        // A module that is refused leaves the running one in place.
        std::fs::write(dir.path().join("junk.wasm"), b"not wasm").unwrap();
        assert!(rt.upgrade(&s.name, "junk.wasm", None).is_err());
        let still = rt
            .with_instance(&s.name, |i| i.module().hash.clone())
            .unwrap();
        assert_eq!(still, new);

        rt.stop(&s.name).await.unwrap();
        assert_eq!(rt.state(&s.name).await, InstanceState::Stopped);
        rt.remove(&s.name).await.unwrap();
        assert_eq!(rt.state(&s.name).await, InstanceState::Absent);
        assert!(dp.node_ports("fw1").is_none());
    }

    #[tokio::test]
    async fn a_fenced_active_forwards_nothing_and_a_standby_never_does() {
        let (dir, dp, rt, s) = setup();
        let fencing = Arc::new(Fencing::new());
        let rt = WasmRuntime {
            fencing: Some(Arc::clone(&fencing)),
            ..rt
        };
        // fw1 is the active with a standby elsewhere, at epoch 1.
        let descriptor = s.descriptor.clone();
        let assigned = |role: Role, epoch: u64| telvirt_api::Assignment {
            vnf: s.name.clone(),
            descriptor: descriptor.clone(),
            placement: Placement {
                role,
                ..s.placement.clone()
            },
            desired: telvirt_model::DesiredState::Running,
            locked: false,
            memory_bytes: 0,
            generation: 1,
            devices: Vec::new(),
            domain: "operator".into(),
            standby: (role == Role::Active).then(|| telvirt_model::api::StandbyPeer {
                host: "h2".into(),
                address: "127.0.0.1:9".into(),
                move_id: 0,
                key: telvirt_model::api::PairKey::new([5; 32]),
            }),
            epoch,
            incoming_from: None,
            hand_off: false,
            resume_moved_copy: false,
            active_from: None,
            active_key: None,
        };
        fencing.assign(&[assigned(Role::Active, 1)]);
        rt.start(&s).await.unwrap();
        let seen = gen_through_fw1_to_sink(&dp);
        let received = || seen.lock().unwrap().received;
        until("packets through fw1", || received() > 100);

        // Its host's lease lapsed long ago and its standby acknowledges nothing: fenced.
        let long_ago = Instant::now().checked_sub(Duration::from_secs(10)).unwrap();
        fencing.renewed(long_ago, Some(Duration::from_secs(1)));
        let packets_in = || rt.with_instance(&s.name, |i| i.stats().packets_in).unwrap();
        dp.panel().barrier();
        let (before, r0) = (packets_in(), received());
        until("the generator to fill fw1's input", || {
            dp.panel()
                .status()
                .iter()
                .any(|l| l.counters.packets > r0 + 1000)
        });
        assert_eq!(packets_in(), before, "a fenced active must not be polled");
        assert_eq!(received(), r0);

        // A peer holds the pair at a higher epoch: a lease renewed in time does not bring it
        // back, nor does the stale assignment.
        let gate = fencing.gate(&s.name);
        assert!(gate.fence_below(2));
        fencing.renewed(Instant::now(), None);
        fencing.assign(&[assigned(Role::Active, 1)]);
        assert!(!gate.open());
        // The assignments say it is the standby now: it never forwards.
        fencing.assign(&[assigned(Role::Standby, 2)]);
        assert!(!gate.open());
        // Made the active again at a newer epoch: it forwards.
        fencing.assign(&[assigned(Role::Active, 3)]);
        until("packets again once active at epoch 3", || {
            received() > r0 + 100
        });
        // A standby's state that arrives now is not applied to it (a batch judged while it
        // was the standby, applied after it was made the active); as the standby it is.
        use crate::replication::ReplicaState;
        let snapshot = rt.take(&s.name, true).unwrap().unwrap();
        let err = rt.apply(&s.name, true, &snapshot).unwrap_err();
        assert!(err.contains("is the active now"), "{err}");
        fencing.assign(&[assigned(Role::Standby, 4)]);
        assert!(!gate.open());
        rt.apply(&s.name, true, &snapshot).unwrap();
        drop(dir);
    }
}
