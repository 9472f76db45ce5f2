//! `telvirt bench wasm`: packets/s of each example VNF on one (optionally pinned) core, wasm on
//! cranelift vs the same C compiled natively on the same trace in the same run, pulley vs
//! cranelift, instantiation time from the precompiled cache, and snapshot + restore time of a
//! map with many entries. Measures only; the CLI prints.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::batch::PacketBatch;
use crate::engine::EngineKind;
use crate::error::{Error, Result};
use crate::instance::{VnfConfig, VnfInstance};
use crate::maps::{MapDef, MapKind, MapSet};
use crate::native::NativeVnf;
use crate::runtime::{InstallRequest, RuntimeConfig, WasmRuntime};
use crate::store::InstalledModule;
use crate::trace::{self, Workload};

/// What to measure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BenchOptions {
    /// Packets per throughput measurement (cranelift and native, split into 7 alternating
    /// rounds whose median is reported; pulley gets a tenth in one run).
    pub packets: u64,
    /// Packets per batch (1..=64).
    pub batch: usize,
    /// Core to pin the measuring thread to.
    pub core: Option<usize>,
    /// Entries of the map snapshotted and restored.
    pub map_entries: u32,
    /// Instantiations averaged for the instantiation time.
    pub instantiations: u32,
    /// Example VNFs to run (empty: all of firewall, nat, gtpu).
    pub vnfs: Vec<String>,
    /// Module store directory (default: a fresh directory under the system temp dir).
    pub store_dir: Option<std::path::PathBuf>,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            packets: 4_000_000,
            batch: 32,
            core: None,
            map_entries: 1_000_000,
            instantiations: 200,
            vnfs: Vec::new(),
            store_dir: None,
        }
    }
}

/// Figures of one example VNF.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VnfBenchReport {
    pub name: String,
    /// Million packets per second, wasm on cranelift.
    pub wasm_mpps: f64,
    /// Million packets per second, the same C compiled natively (baseline).
    pub native_mpps: f64,
    /// `wasm_mpps / native_mpps`.
    pub ratio: f64,
    /// Million packets per second, wasm on pulley.
    pub pulley_mpps: f64,
    /// `pulley_mpps / wasm_mpps`.
    pub pulley_vs_cranelift: f64,
    /// Mean time to instantiate from the in-memory compiled module until the instance is ready
    /// to run: store, instance (copy-on-write linear memory), exports, batch buffer. Without
    /// the VNF's maps and without `tv_init` (both below).
    pub instantiate_us: f64,
    /// Mean time of `tv_init` with the workload's config (the firewall loads 1,025 rules).
    pub init_us: f64,
    /// Mean time to create the VNF's maps, preallocated to the manifest's `max_entries`.
    pub maps_us: f64,
    /// Time to load the precompiled artifact from the store directory and instantiate (maps,
    /// instance and `tv_init` included).
    pub load_cached_us: f64,
    /// Entries in the snapshotted map.
    pub map_entries: u32,
    pub snapshot_ms: f64,
    pub restore_ms: f64,
    pub snapshot_bytes: u64,
    pub packets: u64,
    pub batch: usize,
    /// Whether outputs of wasm and native agreed on the trace (verdicts and packet bytes).
    pub outputs_match: bool,
}

fn workload(name: &str) -> Result<Workload> {
    match name {
        "firewall" => Ok(trace::firewall(1024, 8192)),
        "nat" => Ok(trace::nat(1024, 8192)),
        "gtpu" => Ok(trace::gtpu(1024, 8192)),
        other => Err(Error::config(
            "vnfs",
            format!("`{other}` is not an example VNF (firewall, nat, gtpu)"),
        )),
    }
}

trait Processor {
    fn process(&mut self, b: &mut PacketBatch) -> Result<()>;
}

impl Processor for VnfInstance {
    fn process(&mut self, b: &mut PacketBatch) -> Result<()> {
        self.process_batch(b)
    }
}

impl Processor for NativeVnf {
    fn process(&mut self, b: &mut PacketBatch) -> Result<()> {
        self.process_batch(b)
    }
}

fn fill(b: &mut PacketBatch, pkts: &[(u32, Vec<u8>)]) -> Result<()> {
    b.clear();
    for (port, p) in pkts {
        b.push(*port, p)?;
    }
    Ok(())
}

/// Runs the whole trace once; returns a digest of verdicts and output bytes.
fn run_trace(
    p: &mut dyn Processor,
    w: &Workload,
    batch: usize,
    b: &mut PacketBatch,
) -> Result<u64> {
    let mut h = crc32fast::Hasher::new();
    for chunk in w.packets.chunks(batch) {
        fill(b, chunk)?;
        p.process(b)?;
        for i in 0..b.len() {
            match b.verdict(i) {
                crate::Verdict::Drop => h.update(&[0xff]),
                crate::Verdict::Forward(port) => {
                    h.update(&port.to_le_bytes());
                    h.update(b.packet(i));
                }
            }
        }
    }
    Ok(u64::from(h.finalize()))
}

/// Packets per second over at least `packets` packets, trace replayed in batches.
fn throughput(
    p: &mut dyn Processor,
    w: &Workload,
    batch: usize,
    packets: u64,
    b: &mut PacketBatch,
) -> Result<f64> {
    let chunks: Vec<&[(u32, Vec<u8>)]> = w.packets.chunks(batch).collect();
    let mut done = 0u64;
    let start = Instant::now();
    'outer: loop {
        for c in &chunks {
            fill(b, c)?;
            p.process(b)?;
            done += c.len() as u64;
            if done >= packets {
                break 'outer;
            }
        }
    }
    Ok(done as f64 / start.elapsed().as_secs_f64())
}

fn setup_wasm(
    rt: &WasmRuntime,
    m: &InstalledModule,
    w: &Workload,
    engine: EngineKind,
) -> Result<VnfInstance> {
    let cfg = VnfConfig {
        engine,
        config: w.config.clone(),
        ports: w.ports,
        ..VnfConfig::default()
    };
    let mut inst = rt.instantiate(m, cfg)?;
    for (map, k, v) in &w.provision {
        inst.map_update(map, k, v)?;
    }
    Ok(inst)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn mean(d: Duration, n: u32) -> f64 {
    d.as_secs_f64() * 1e6 / f64::from(n.max(1))
}

/// Snapshot and restore of one map of `entries` entries shaped like the VNF's largest map.
fn snapshot_figures(defs: &[MapDef], entries: u32) -> Result<(f64, f64, u64)> {
    let base = defs
        .iter()
        .filter(|d| d.kind != MapKind::Array)
        .max_by_key(|d| d.key_size + d.value_size)
        .cloned()
        .unwrap_or(MapDef {
            name: "m".into(),
            kind: MapKind::Hash,
            key_size: 16,
            value_size: 8,
            max_entries: 1,
        });
    let def = MapDef {
        max_entries: entries.max(1),
        ..base
    };
    let defs = [def.clone()];
    let mut set = MapSet::new(&defs)?;
    let mut key = vec![0u8; def.key_size as usize];
    let mut val = vec![0u8; def.value_size as usize];
    for i in 0..entries {
        let kb = i.to_le_bytes();
        let n = kb.len().min(key.len());
        key[..n].copy_from_slice(&kb[..n]);
        let nv = n.min(val.len());
        val[..nv].copy_from_slice(&kb[..nv]);
        set.update(0, &key, &val, 0);
    }
    let t = Instant::now();
    let snap = set.snapshot();
    let snap_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    let restored = MapSet::restore(&defs, &snap)?;
    let restore_ms = t.elapsed().as_secs_f64() * 1e3;
    if restored.get(0).map(crate::maps::Map::len) != Some(entries as usize) {
        return Err(Error::Snapshot("restored map lost entries".into()));
    }
    Ok((snap_ms, restore_ms, snap.len() as u64))
}

/// Runs the benchmark. `progress(done, total)` is called after each step.
pub fn run(opts: &BenchOptions, progress: &mut dyn FnMut(u64, u64)) -> Result<Vec<VnfBenchReport>> {
    if !(1..=crate::abi::MAX_BATCH).contains(&opts.batch) {
        return Err(Error::config(
            "batch",
            format!("{} must be 1..={}", opts.batch, crate::abi::MAX_BATCH),
        ));
    }
    let names: Vec<String> = if opts.vnfs.is_empty() {
        ["firewall", "nat", "gtpu"].map(String::from).to_vec()
    } else {
        opts.vnfs.clone()
    };
    let workloads = names
        .iter()
        .map(|n| workload(n))
        .collect::<Result<Vec<_>>>()?;
    let saved = crate::worker::current_affinity();
    if let Some(core) = opts.core {
        crate::worker::pin_current_thread(core)?;
    }
    let result = run_pinned(opts, &workloads, progress);
    if opts.core.is_some() && !saved.is_empty() {
        let _ = crate::worker::set_affinity(&saved);
    }
    result
}

fn run_pinned(
    opts: &BenchOptions,
    workloads: &[Workload],
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Vec<VnfBenchReport>> {
    let dir = opts.store_dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("telvirt-bench-wasm-{}", std::process::id()))
    });
    let rt = WasmRuntime::new(RuntimeConfig::new(&dir))?;
    let total = workloads.len() as u64 * 5;
    let mut step = 0u64;
    let mut tick = |progress: &mut dyn FnMut(u64, u64)| {
        step += 1;
        progress(step, total);
    };
    let mut b = PacketBatch::new();
    let mut reports = Vec::new();
    for w in workloads {
        let m = rt.install(&InstallRequest {
            bytes: w.vnf.wasm,
            domain: "operator",
            signature: None,
            precompile: &[EngineKind::Cranelift, EngineKind::Pulley],
        })?;
        let defs = crate::instance::effective_maps(&m.manifest.maps, &[])?;
        // Native baseline and cranelift on the same trace; outputs compared.
        let mut native = NativeVnf::new(w.vnf, &defs, &w.config, w.ports)?;
        for (map, k, v) in &w.provision {
            native.map_update(map, k, v)?;
        }
        let mut wasm = setup_wasm(&rt, &m, w, EngineKind::Cranelift)?;
        let d_native = run_trace(&mut native, w, opts.batch, &mut b)?;
        let d_wasm = run_trace(&mut wasm, w, opts.batch, &mut b)?;
        // Alternate native and wasm in rounds and take each side's median, so that a burst of
        // other work on the machine does not skew one side only.
        let rounds = 7u64;
        let per_round = (opts.packets / rounds).max(1);
        let (mut nat_r, mut wasm_r) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            nat_r.push(throughput(&mut native, w, opts.batch, per_round, &mut b)?);
            wasm_r.push(throughput(&mut wasm, w, opts.batch, per_round, &mut b)?);
        }
        let native_pps = median(&mut nat_r);
        tick(progress);
        let wasm_pps = median(&mut wasm_r);
        tick(progress);
        let mut pulley = setup_wasm(&rt, &m, w, EngineKind::Pulley)?;
        run_trace(&mut pulley, w, opts.batch, &mut b)?;
        let pulley_pps = throughput(
            &mut pulley,
            w,
            opts.batch,
            (opts.packets / 10).max(1),
            &mut b,
        )?;
        tick(progress);
        // Instantiation from the compiled module in memory.
        let n = opts.instantiations.max(1);
        let mut sum = crate::instance::StartTimes::default();
        for _ in 0..n {
            let cfg = VnfConfig {
                config: w.config.clone(),
                ports: w.ports,
                ..VnfConfig::default()
            };
            let (inst, times) = rt.instantiate_timed(&m, cfg)?;
            drop(inst);
            sum.maps += times.maps;
            sum.instance += times.instance;
            sum.init += times.init;
        }
        // Load from the on-disk cache with a fresh runtime.
        let loads = 5;
        let mut load_total = Duration::ZERO;
        for _ in 0..loads {
            let fresh = WasmRuntime::new(RuntimeConfig::new(&dir))?;
            let cfg = VnfConfig {
                config: w.config.clone(),
                ports: w.ports,
                ..VnfConfig::default()
            };
            // Engine creation is per runtime, not per module: do it before timing.
            drop(fresh.instantiate(&m, cfg.clone())?);
            let fresh = WasmRuntime::new(RuntimeConfig::new(&dir))?;
            let _ = fresh.granted(&m)?;
            let t = Instant::now();
            drop(fresh.instantiate(&m, cfg)?);
            load_total += t.elapsed();
        }
        let load_us = mean(load_total, loads);
        tick(progress);
        let (snap_ms, restore_ms, snap_bytes) = snapshot_figures(&defs, opts.map_entries)?;
        tick(progress);
        reports.push(VnfBenchReport {
            name: w.vnf.name.to_string(),
            wasm_mpps: wasm_pps / 1e6,
            native_mpps: native_pps / 1e6,
            ratio: wasm_pps / native_pps,
            pulley_mpps: pulley_pps / 1e6,
            pulley_vs_cranelift: pulley_pps / wasm_pps,
            instantiate_us: mean(sum.instance, n),
            init_us: mean(sum.init, n),
            maps_us: mean(sum.maps, n),
            load_cached_us: load_us,
            map_entries: opts.map_entries,
            snapshot_ms: snap_ms,
            restore_ms,
            snapshot_bytes: snap_bytes,
            packets: opts.packets,
            batch: opts.batch,
            outputs_match: d_native == d_wasm,
        });
    }
    if opts.store_dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(reports)
}
