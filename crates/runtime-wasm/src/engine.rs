//! Engine selection: wasmtime configured for cranelift (native code) or pulley (wasmtime's
//! portable interpreter), with fuel metering and a stack limit. Owns engine settings and the
//! cache key of precompiled artifacts; it does not run modules.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use wasmtime::{Config, Engine, Inlining, OptLevel};

use crate::error::{Error, Result};

/// Which wasmtime back end runs a VNF.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EngineKind {
    /// Cranelift: compiled to native code of this host.
    Cranelift,
    /// Pulley: compiled to wasmtime's portable bytecode and interpreted.
    Pulley,
}

impl EngineKind {
    /// Lower-case name, as in descriptors and cache file names.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cranelift => "cranelift",
            Self::Pulley => "pulley",
        }
    }
}

impl std::str::FromStr for EngineKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cranelift" => Ok(Self::Cranelift),
            "pulley" => Ok(Self::Pulley),
            other => Err(Error::config(
                "engine",
                format!("`{other}` is not an engine (valid: cranelift, pulley)"),
            )),
        }
    }
}

/// Settings that change generated code, hence part of the precompiled-cache key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EngineSettings {
    pub kind: EngineKind,
    /// Largest wasm stack in bytes (deep recursion traps past it).
    pub max_stack_bytes: usize,
}

/// Pulley target matching the host's pointer width.
fn pulley_target() -> &'static str {
    if cfg!(target_pointer_width = "64") {
        "pulley64"
    } else {
        "pulley32"
    }
}

/// Builds a wasmtime engine for the settings.
pub fn build(s: EngineSettings) -> Result<Engine> {
    let mut c = Config::new();
    // Linear memories never move (their 4 GiB reservation holds any 32-bit memory): the host
    // functions rely on it for their cached memory view (see `host::MemView`).
    c.consume_fuel(true)
        .memory_may_move(false)
        .max_wasm_stack(s.max_stack_bytes)
        .cranelift_opt_level(OptLevel::Speed)
        // Intra-module inlining: the call overhead of wasm-to-wasm calls (with arguments on
        // the stack past the sixth) measured up to 13% on the example NAT (ADR 036).
        .compiler_inlining(Inlining::Yes)
        .wasm_simd(true);
    if s.kind == EngineKind::Pulley {
        c.target(pulley_target())
            .map_err(|e| Error::Engine(format!("pulley target: {e}")))?;
    }
    Engine::new(&c).map_err(|e| Error::Engine(format!("{e:#}")))
}

/// Stable fingerprint of everything that makes a precompiled artifact valid for an engine
/// (wasmtime version, target, settings).
pub fn fingerprint(engine: &Engine) -> String {
    let mut h = DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut h);
    format!("{:016x}", h.finish())
}

/// Engines shared by every VNF of a runtime, created on first use.
#[derive(Default)]
pub struct Engines {
    map: Mutex<HashMap<EngineSettings, (Engine, String)>>,
}

impl Engines {
    /// The engine and its fingerprint for the settings.
    pub fn get(&self, s: EngineSettings) -> Result<(Engine, String)> {
        let mut map = self
            .map
            .lock()
            .map_err(|_| Error::Engine("engine table poisoned".into()))?;
        if let Some(e) = map.get(&s) {
            return Ok(e.clone());
        }
        let e = build(s)?;
        let fp = fingerprint(&e);
        map.insert(s, (e.clone(), fp.clone()));
        Ok((e, fp))
    }
}
