//! The host API the agent calls: install (verify, store, precompile) → instantiate → upgrade →
//! remove, over a module store directory and a security policy. Owns the module life cycle;
//! per-instance behaviour lives in `instance`.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Instant;

use wasmtime::{InstancePre, Module};

use crate::engine::{EngineKind, EngineSettings, Engines};
use crate::error::{Error, Result};
use crate::host::HostState;
use crate::instance::{self, StartTimes, VnfConfig, VnfInstance};
use crate::maps::MapSet;
use crate::security::{ModuleSignature, Permission, SecurityPolicy};
use crate::store::{InstalledModule, ModuleStore};
use crate::verify::{self, VerifyLimits};

/// Configuration of a runtime (one per agent).
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Directory of the installed-module store (created if missing).
    pub store_dir: PathBuf,
    pub policy: SecurityPolicy,
    pub verify_limits: VerifyLimits,
    /// Largest wasm stack in bytes (engine setting, part of the cache key).
    pub max_stack_bytes: usize,
}

impl RuntimeConfig {
    /// Defaults with the given store directory.
    pub fn new(store_dir: impl Into<PathBuf>) -> Self {
        Self {
            store_dir: store_dir.into(),
            policy: SecurityPolicy::default(),
            verify_limits: VerifyLimits::default(),
            max_stack_bytes: 256 << 10,
        }
    }
}

/// An install request.
#[derive(Debug, Clone)]
pub struct InstallRequest<'a> {
    pub bytes: &'a [u8],
    /// Security domain to install into (e.g. `operator`, `trusted`, `untrusted`).
    pub domain: &'a str,
    pub signature: Option<ModuleSignature>,
    /// Engines to precompile for now (others compile on first use).
    pub precompile: &'a [EngineKind],
}

/// The wasm runtime of one host.
pub struct WasmRuntime {
    cfg: RuntimeConfig,
    store: ModuleStore,
    engines: Engines,
    loaded: Mutex<HashMap<(String, EngineKind), Module>>,
    /// Linked, ready-to-instantiate modules (grants are fixed per runtime: same policy, same
    /// manifest for a hash).
    pres: Mutex<HashMap<(String, EngineKind), InstancePre<HostState>>>,
}

impl WasmRuntime {
    /// Opens the module store and prepares (lazily) the engines.
    pub fn new(cfg: RuntimeConfig) -> Result<Self> {
        if cfg.max_stack_bytes < 16 << 10 || cfg.max_stack_bytes > 8 << 20 {
            return Err(Error::config(
                "max_stack_bytes",
                format!("{} must be between 16 KiB and 8 MiB", cfg.max_stack_bytes),
            ));
        }
        Ok(Self {
            store: ModuleStore::open(&cfg.store_dir)?,
            cfg,
            engines: Engines::default(),
            loaded: Mutex::new(HashMap::new()),
            pres: Mutex::new(HashMap::new()),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &RuntimeConfig {
        &self.cfg
    }

    /// The module store.
    pub fn module_store(&self) -> &ModuleStore {
        &self.store
    }

    fn settings(&self, kind: EngineKind) -> EngineSettings {
        EngineSettings {
            kind,
            max_stack_bytes: self.cfg.max_stack_bytes,
        }
    }

    /// Verifies a module, stores it with its manifest and precompiles it for the requested
    /// engines. Refusals list every violation; nothing is stored then.
    pub fn install(&self, req: &InstallRequest<'_>) -> Result<InstalledModule> {
        let verified = verify::verify(
            req.bytes,
            &self.cfg.verify_limits,
            self.cfg.policy.domain(req.domain),
            req.signature.as_ref(),
        )
        .map_err(Error::Verification)?;
        let meta = InstalledModule {
            hash: verify::hex(&verified.hash),
            manifest: verified.manifest,
            domain: req.domain.to_string(),
            signature: req.signature.clone(),
            imports: verified.imports,
            size: req.bytes.len(),
        };
        // Compile before storing so a module wasmtime cannot compile is never installed.
        let mut artifacts = Vec::new();
        for kind in req.precompile {
            let (engine, fp) = self.engines.get(self.settings(*kind))?;
            let art = engine
                .precompile_module(req.bytes)
                .map_err(|e| Error::Engine(format!("{} compile: {e:#}", kind.as_str())))?;
            artifacts.push((self.store.artifact_path(&meta.hash, *kind, &fp), art));
        }
        self.store.put(req.bytes, &meta)?;
        for (path, art) in artifacts {
            crate::store::write_atomic(&path, &art)?;
        }
        Ok(meta)
    }

    /// Metadata of an installed module by hash.
    pub fn installed(&self, hash: &str) -> Result<InstalledModule> {
        self.store.get(hash)
    }

    /// Every installed module.
    pub fn list(&self) -> Result<Vec<InstalledModule>> {
        self.store.list()
    }

    /// Removes an installed module and its precompiled artifacts (running instances keep their
    /// loaded code).
    pub fn remove(&self, hash: &str) -> Result<()> {
        self.store.remove(hash)?;
        if let Ok(mut l) = self.loaded.lock() {
            l.retain(|(h, _), _| h != hash);
        }
        if let Ok(mut p) = self.pres.lock() {
            p.retain(|(h, _), _| h != hash);
        }
        Ok(())
    }

    /// The compiled module for an engine: from memory, else from the precompiled cache, else
    /// compiled now and cached.
    pub fn load(&self, meta: &InstalledModule, kind: EngineKind) -> Result<Module> {
        let key = (meta.hash.clone(), kind);
        if let Some(m) = self.loaded.lock().ok().and_then(|l| l.get(&key).cloned()) {
            return Ok(m);
        }
        let (engine, fp) = self.engines.get(self.settings(kind))?;
        let path = self.store.artifact_path(&meta.hash, kind, &fp);
        let module = if path.exists() {
            // SAFETY: the artifact was produced by `Engine::precompile_module` of an engine with
            // the same fingerprint and written atomically into the runtime-owned store
            // directory; wasmtime additionally checks its header for compatibility.
            unsafe { Module::deserialize_file(&engine, &path) }
                .map_err(|e| Error::Engine(format!("loading {}: {e:#}", path.display())))?
        } else {
            let bytes = self.store.bytes(&meta.hash)?;
            let art = engine
                .precompile_module(&bytes)
                .map_err(|e| Error::Engine(format!("{} compile: {e:#}", kind.as_str())))?;
            crate::store::write_atomic(&path, &art)?;
            // SAFETY: `art` was just produced by `precompile_module` of this same engine.
            unsafe { Module::deserialize(&engine, &art) }
                .map_err(|e| Error::Engine(format!("{e:#}")))?
        };
        if let Ok(mut l) = self.loaded.lock() {
            l.insert(key, module.clone());
        }
        Ok(module)
    }

    /// Permissions the module holds now: requested by its manifest and allowed by its domain's
    /// current policy.
    pub fn granted(&self, meta: &InstalledModule) -> Result<BTreeSet<Permission>> {
        let policy = self
            .cfg
            .policy
            .domain(&meta.domain)
            .map_err(|e| Error::config("domain", e))?;
        Ok(meta
            .manifest
            .permissions
            .iter()
            .copied()
            .filter(|p| policy.allowed.contains(p))
            .collect())
    }

    /// Creates and initialises an instance (`tv_init` with the config blob) with empty maps.
    pub fn instantiate(&self, meta: &InstalledModule, cfg: VnfConfig) -> Result<VnfInstance> {
        self.instantiate_timed(meta, cfg).map(|(inst, _)| inst)
    }

    /// [`Self::instantiate`], also reporting how long its steps took.
    pub fn instantiate_timed(
        &self,
        meta: &InstalledModule,
        cfg: VnfConfig,
    ) -> Result<(VnfInstance, StartTimes)> {
        let mut times = StartTimes::default();
        // Before anything is allocated for the instance.
        cfg.limits.check()?;
        let t = Instant::now();
        let defs = instance::effective_maps(&meta.manifest.maps, &cfg.maps)?;
        let maps = MapSet::new(&defs)?;
        times.maps = t.elapsed();
        let (engine, pre) = self.pre(meta, cfg.engine)?;
        let inst = VnfInstance::new(
            meta.clone(),
            engine,
            pre,
            cfg,
            maps,
            self.cfg.max_stack_bytes,
            &mut times,
        )?;
        Ok((inst, times))
    }

    /// Upgrades an instance to another installed module between batches, maps carried over.
    pub fn upgrade(&self, inst: &mut VnfInstance, meta: &InstalledModule) -> Result<()> {
        let (_, pre) = self.pre(meta, inst.config().engine)?;
        inst.upgrade_to(meta.clone(), pre)
    }

    /// The engine and the linked module (cached), checking grants first.
    fn pre(
        &self,
        meta: &InstalledModule,
        kind: EngineKind,
    ) -> Result<(wasmtime::Engine, InstancePre<HostState>)> {
        let (engine, _) = self.engines.get(self.settings(kind))?;
        let key = (meta.hash.clone(), kind);
        if let Some(p) = self.pres.lock().ok().and_then(|p| p.get(&key).cloned()) {
            return Ok((engine, p));
        }
        let module = self.load(meta, kind)?;
        let pre = instance::prepare(&engine, &module, meta, &self.granted(meta)?)?;
        if let Ok(mut p) = self.pres.lock() {
            p.insert(key, pre.clone());
        }
        Ok((engine, pre))
    }
}
