//! The wasm runtime adapter: runs `runtime: wasm` VNFs as nodes of the agent's patch panel.
//!
//! Owns mapping a VNF descriptor onto `telvirt-runtime-wasm`'s own types (install request,
//! `VnfConfig`) and placing the instance on the data-plane worker pinned to the VNF's allocated
//! core. It must not decide placement or talk to the controller.
//!
//! Choices (ADR 033):
//! - Modules are installed into the `operator` security domain: every VNF of this node is owned
//!   by its admin today (the owning authority is not part of `InstanceSpec` yet). The verifier
//!   still refuses any import the module's own manifest does not grant.
//! - The descriptor's `config` map is handed to `tv_init` as `key=value` lines (sorted by key,
//!   `\n`-terminated); an empty map is an empty blob.
//! - Lock stops scheduling: the node stops taking packets from its input rings between two
//!   batches (upstream sees backpressure), and the instance is locked.
//! - Nothing survives the process: `adopt` always answers `false`.
//! - Packets a module `emit`s are not sent anywhere yet (counted by the instance).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use telvirt_dataplane::node::{Node, NodeIo, PacketProcessor, ProcessorNode, Verdict};
use telvirt_dataplane::pool::{Packet, Pool};
use telvirt_model::{Name, RuntimeKind, WasmEngine};
use telvirt_runtime_wasm as rw;
use telvirt_runtime_wasm::{
    EngineKind, InstallRequest, MapDef, MapKind, PacketBatch, RuntimeConfig, VnfConfig,
    VnfInstance, VnfState,
};

use crate::dataplane::NodeDataPlane;
use crate::runtime::{InstanceSpec, InstanceState, Runtime, RuntimeFailure};

/// Security domain node-admin VNFs are installed into.
pub const DOMAIN: &str = "operator";
/// Packets per batch a wasm node takes from one input.
pub const BATCH: usize = 32;

type Shared = Arc<Mutex<VnfInstance>>;

fn guard(inst: &Shared) -> MutexGuard<'_, VnfInstance> {
    // A panic inside the runtime while processing leaves the instance as the runtime left it;
    // its own state (Failed) says whether it can still run.
    inst.lock().unwrap_or_else(|p| p.into_inner())
}

/// One wasm VNF as a data-plane stage: copies each batch into a `PacketBatch`, runs it and
/// copies rewritten packets back.
struct WasmStage {
    inst: Shared,
    batch: Box<PacketBatch>,
    ok: Vec<bool>,
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

/// Polls the stage only while the VNF is scheduled (not locked, not failed).
struct GatedNode {
    scheduled: Arc<AtomicBool>,
    inner: ProcessorNode<WasmStage>,
}

impl Node for GatedNode {
    fn poll(&mut self, io: &mut NodeIo<'_>) -> usize {
        if !self.scheduled.load(Ordering::Acquire) {
            return 0;
        }
        self.inner.poll(io)
    }
}

struct Entry {
    inst: Shared,
    scheduled: Arc<AtomicBool>,
    module_hash: String,
    /// Stopped: off the panel, kept until `remove`.
    stopped: bool,
}

/// The `runtime: wasm` adapter of one agent.
pub struct WasmRuntime {
    rt: Arc<rw::WasmRuntime>,
    dataplane: Arc<NodeDataPlane>,
    /// Directory relative module paths resolve against.
    base_dir: PathBuf,
    entries: Mutex<BTreeMap<Name, Entry>>,
}

fn fail(e: impl std::fmt::Display) -> RuntimeFailure {
    RuntimeFailure::new(e)
}

/// The built-in example modules (`firewall`, `nat`, `gtpu`) as (name, wasm bytes).
pub fn example_modules() -> Vec<(&'static str, &'static [u8])> {
    rw::vnfs::all().iter().map(|v| (v.name, v.wasm)).collect()
}

/// Config key whose value is the whole `tv_init` blob, hex-encoded (for modules that take a
/// binary configuration, like the example firewall: `blob_hex: "02000000"` = forward to port 1).
pub const BLOB_HEX: &str = "blob_hex";

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

fn engine(e: WasmEngine) -> EngineKind {
    match e {
        WasmEngine::Cranelift => EngineKind::Cranelift,
        WasmEngine::Pulley => EngineKind::Pulley,
    }
}

impl WasmRuntime {
    /// A runtime whose module store lives in `store_dir`, placing VNFs on `dataplane`; relative
    /// module paths resolve against `base_dir` (the serve process's working directory).
    pub fn new(
        store_dir: impl Into<PathBuf>,
        base_dir: impl Into<PathBuf>,
        dataplane: Arc<NodeDataPlane>,
    ) -> Result<Self, RuntimeFailure> {
        let rt = rw::WasmRuntime::new(RuntimeConfig::new(store_dir)).map_err(fail)?;
        Ok(Self {
            rt: Arc::new(rt),
            dataplane,
            base_dir: base_dir.into(),
            entries: Mutex::new(BTreeMap::new()),
        })
    }

    fn entries(&self) -> MutexGuard<'_, BTreeMap<Name, Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn instance(&self, name: &Name) -> Result<(Shared, Arc<AtomicBool>), RuntimeFailure> {
        let entries = self.entries();
        let e = entries
            .get(name)
            .filter(|e| !e.stopped)
            .ok_or_else(|| fail(format!("no running wasm instance {name}")))?;
        Ok((Arc::clone(&e.inst), Arc::clone(&e.scheduled)))
    }

    /// Reads and installs a module file through the verifier and the security manager.
    fn install(&self, path: &str, kind: EngineKind) -> Result<rw::InstalledModule, RuntimeFailure> {
        let path = self.base_dir.join(path);
        let bytes = std::fs::read(&path)
            .map_err(|e| fail(format!("cannot read module {}: {e}", path.display())))?;
        self.rt
            .install(&InstallRequest {
                bytes: &bytes,
                domain: DOMAIN,
                signature: None,
                precompile: &[kind],
            })
            .map_err(fail)
    }

    /// Replaces a running VNF's module by the one in `module` (a path, relative to the base
    /// directory) between two batches; maps with the same name and layout keep their contents.
    /// On any error the old module keeps running with its maps.
    pub fn upgrade(&self, name: &Name, module: &str) -> Result<String, RuntimeFailure> {
        let (inst, _) = self.instance(name)?;
        let kind = guard(&inst).config().engine;
        let meta = self.install(module, kind)?;
        self.rt.upgrade(&mut guard(&inst), &meta).map_err(fail)?;
        if let Some(e) = self.entries().get_mut(name) {
            e.module_hash = meta.hash.clone();
        }
        Ok(meta.hash)
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

    fn start_blocking(&self, spec: &InstanceSpec) -> Result<(), RuntimeFailure> {
        let cfg = vnf_config(spec)?;
        let wasm = spec
            .descriptor
            .spec
            .wasm
            .as_ref()
            .ok_or_else(|| fail("spec.wasm is missing"))?;
        // Verify and instantiate first: a refused module fails with the verifier's reason
        // wherever it was placed.
        let meta = self.install(&wasm.module, cfg.engine)?;
        let inst = self.rt.instantiate(&meta, cfg).map_err(fail)?;
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
        let ports: Vec<&str> = spec
            .descriptor
            .spec
            .ports
            .iter()
            .map(|p| p.as_str())
            .collect();
        let node = GatedNode {
            scheduled: Arc::clone(&scheduled),
            inner: ProcessorNode::new(
                WasmStage {
                    inst: Arc::clone(&inst),
                    batch: Box::new(PacketBatch::new()),
                    ok: Vec::with_capacity(BATCH),
                },
                BATCH,
            ),
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
        entries.insert(
            spec.name.clone(),
            Entry {
                inst,
                scheduled,
                module_hash: meta.hash,
                stopped: false,
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

    async fn start(&self, spec: &InstanceSpec) -> Result<(), RuntimeFailure> {
        // Compiling a module takes milliseconds; the reconcile loop handles one VNF at a time.
        self.start_blocking(spec)
    }

    /// Wasm instances live in the agent process: after a restart there is nothing to adopt.
    async fn adopt(&self, _spec: &InstanceSpec) -> Result<bool, RuntimeFailure> {
        Ok(false)
    }

    async fn stop(&self, name: &Name) -> Result<(), RuntimeFailure> {
        let mut entries = self.entries();
        let Some(e) = entries.get_mut(name) else {
            return Ok(());
        };
        e.scheduled.store(false, Ordering::Release);
        if !e.stopped {
            // Dropping the returned node drops the stage; the instance lives on in the entry
            // until `remove` (its maps can still be read).
            let _ = self.dataplane.remove_node(name.as_str());
            e.stopped = true;
        }
        Ok(())
    }

    async fn pause(&self, name: &Name) -> Result<(), RuntimeFailure> {
        let (inst, scheduled) = self.instance(name)?;
        scheduled.store(false, Ordering::Release);
        guard(&inst).lock().map_err(fail)
    }

    async fn resume(&self, name: &Name) -> Result<(), RuntimeFailure> {
        let (inst, scheduled) = self.instance(name)?;
        guard(&inst).unlock().map_err(fail)?;
        scheduled.store(true, Ordering::Release);
        Ok(())
    }

    async fn state(&self, name: &Name) -> InstanceState {
        let entries = self.entries();
        let Some(e) = entries.get(name) else {
            return InstanceState::Absent;
        };
        if e.stopped {
            return InstanceState::Stopped;
        }
        let inst = guard(&e.inst);
        match inst.state() {
            VnfState::Running => InstanceState::Running,
            VnfState::Locked => InstanceState::Paused,
            VnfState::Failed(reason) => {
                e.scheduled.store(false, Ordering::Release);
                InstanceState::Failed(format!("module failed: {reason}"))
            }
        }
    }

    async fn remove(&self, name: &Name) -> Result<(), RuntimeFailure> {
        let removed = {
            let mut entries = self.entries();
            let removed = entries.remove(name);
            if let Some(e) = &removed {
                e.scheduled.store(false, Ordering::Release);
                let _ = self.dataplane.remove_node(name.as_str());
                if entries.values().any(|o| o.module_hash == e.module_hash) {
                    return Ok(());
                }
            }
            removed
        };
        if let Some(e) = removed {
            self.rt.remove(&e.module_hash).map_err(fail)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    async fn packets_flow_through_a_wasm_vnf_and_lock_stops_them() {
        let (dir, dp, rt, s) = setup();
        rt.start(&s).await.unwrap();
        assert_eq!(rt.state(&s.name).await, InstanceState::Running);

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
        let mut v2 = rw::vnfs::firewall().wasm.to_vec();
        let needle = b"\"version\":\"1.0.0\"";
        let at = v2
            .windows(needle.len())
            .position(|w| w == needle)
            .expect("firewall manifest has version 1.0.0");
        v2[at..at + needle.len()].copy_from_slice(b"\"version\":\"1.0.1\"");
        std::fs::write(dir.path().join("firewall-v2.wasm"), v2).unwrap();
        let old = rt
            .with_instance(&s.name, |i| i.module().hash.clone())
            .unwrap();
        let new = rt.upgrade(&s.name, "firewall-v2.wasm").unwrap();
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
        assert!(rt.upgrade(&s.name, "junk.wasm").is_err());
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
}
