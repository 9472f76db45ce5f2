//! The installed-module store: a directory the caller names, holding module bytes, manifest
//! and metadata per module hash, and precompiled artifacts keyed by module hash, engine kind
//! and engine fingerprint. Owns file layout and atomic writes; it does not verify or run.
//!
//! ```text
//! <dir>/modules/<sha256>/module.wasm
//! <dir>/modules/<sha256>/meta.json
//! <dir>/cache/<sha256>-<engine>-<fingerprint>.cwasm
//! ```

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::engine::EngineKind;
use crate::error::{Error, Result};
use crate::manifest::Manifest;
use crate::security::{ModuleSignature, Permission};

/// Metadata kept beside an installed module.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstalledModule {
    /// SHA-256 of the module bytes, lower-case hex.
    pub hash: String,
    pub manifest: Manifest,
    /// Security domain the module was installed into.
    pub domain: String,
    pub signature: Option<ModuleSignature>,
    /// Host functions the module imports and the permission each needs.
    pub imports: Vec<(String, Permission)>,
    /// Module size in bytes.
    pub size: usize,
}

/// Directory-backed module store.
#[derive(Debug, Clone)]
pub struct ModuleStore {
    dir: PathBuf,
}

fn check_hash(hash: &str) -> Result<()> {
    if hash.len() == 64
        && hash
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        Ok(())
    } else {
        Err(Error::config(
            "module hash",
            format!("`{hash}` is not 64 lower-case hex digits"),
        ))
    }
}

pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    telvirt_files::write_atomic(path, bytes).map_err(|e| Error::io(path, e))
}

impl ModuleStore {
    /// Opens (creating if needed) a store in `dir`.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self> {
        let dir = dir.into();
        for sub in ["modules", "cache"] {
            let p = dir.join(sub);
            fs::create_dir_all(&p).map_err(|e| Error::io(&p, e))?;
        }
        Ok(Self { dir })
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn module_dir(&self, hash: &str) -> PathBuf {
        self.dir.join("modules").join(hash)
    }

    /// Path of the precompiled artifact for a module, engine and fingerprint.
    pub fn artifact_path(&self, hash: &str, engine: EngineKind, fingerprint: &str) -> PathBuf {
        self.dir
            .join("cache")
            .join(format!("{hash}-{}-{fingerprint}.cwasm", engine.as_str()))
    }

    /// Stores module bytes and metadata (idempotent for the same bytes).
    pub fn put(&self, bytes: &[u8], meta: &InstalledModule) -> Result<()> {
        check_hash(&meta.hash)?;
        let d = self.module_dir(&meta.hash);
        fs::create_dir_all(&d).map_err(|e| Error::io(&d, e))?;
        write_atomic(&d.join("module.wasm"), bytes)?;
        let json = serde_json::to_vec_pretty(meta)
            .map_err(|e| Error::config("metadata", e.to_string()))?;
        write_atomic(&d.join("meta.json"), &json)
    }

    /// Metadata of an installed module.
    pub fn get(&self, hash: &str) -> Result<InstalledModule> {
        check_hash(hash)?;
        let p = self.module_dir(hash).join("meta.json");
        let b = match fs::read(&p) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::NotInstalled(hash.to_string()));
            }
            Err(e) => return Err(Error::io(&p, e)),
        };
        serde_json::from_slice(&b)
            .map_err(|e| Error::config(p.display().to_string(), format!("corrupt metadata: {e}")))
    }

    /// Bytes of an installed module.
    pub fn bytes(&self, hash: &str) -> Result<Vec<u8>> {
        check_hash(hash)?;
        let p = self.module_dir(hash).join("module.wasm");
        fs::read(&p).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::NotInstalled(hash.to_string())
            } else {
                Error::io(&p, e)
            }
        })
    }

    /// Every installed module, sorted by hash.
    pub fn list(&self) -> Result<Vec<InstalledModule>> {
        let d = self.dir.join("modules");
        let mut out = Vec::new();
        for e in fs::read_dir(&d).map_err(|e| Error::io(&d, e))? {
            let e = e.map_err(|e| Error::io(&d, e))?;
            if let Some(name) = e.file_name().to_str()
                && check_hash(name).is_ok()
            {
                out.push(self.get(name)?);
            }
        }
        out.sort_by(|a, b| a.hash.cmp(&b.hash));
        Ok(out)
    }

    /// Removes a module and every precompiled artifact of it.
    pub fn remove(&self, hash: &str) -> Result<()> {
        check_hash(hash)?;
        let d = self.module_dir(hash);
        if !d.exists() {
            return Err(Error::NotInstalled(hash.to_string()));
        }
        let cache = self.dir.join("cache");
        for e in fs::read_dir(&cache).map_err(|e| Error::io(&cache, e))? {
            let e = e.map_err(|e| Error::io(&cache, e))?;
            if e.file_name().to_str().is_some_and(|n| n.starts_with(hash)) {
                fs::remove_file(e.path()).map_err(|err| Error::io(e.path(), err))?;
            }
        }
        fs::remove_dir_all(&d).map_err(|e| Error::io(&d, e))
    }
}
