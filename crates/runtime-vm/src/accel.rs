//! Accelerator choice: KVM only where it really runs a guest. `auto` boots the default guest
//! under KVM with a deadline once, caches the answer in a file keyed by host kernel and QEMU
//! version, and falls back to TCG with a visible warning. Owns that decision; must not start
//! VMs for any other purpose.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::bare::{BareBoot, scratch};
use crate::config::{Accel, AccelChoice};
use crate::error::{Error, Result};

/// The accelerator to use and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AccelDecision {
    pub accel: Accel,
    /// A warning to show the user (TCG fallback).
    pub warning: Option<String>,
    pub reason: String,
    /// True when the answer came from the cache file (no probe boot this time).
    #[serde(default)]
    pub from_cache: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct CacheEntry {
    key: String,
    decision: AccelDecision,
}

/// Decides between KVM and TCG; cheap to clone (the answer is shared).
#[derive(Debug, Clone)]
pub struct AccelProbe {
    cache_dir: PathBuf,
    qemu: PathBuf,
    guest: Option<(PathBuf, PathBuf)>,
    deadline: Duration,
    memo: Arc<tokio::sync::Mutex<Option<AccelDecision>>>,
}

impl AccelProbe {
    /// The answer is cached in `<cache_dir>/accel-probe.json`.
    pub fn new(cache_dir: impl Into<PathBuf>) -> Self {
        Self {
            cache_dir: cache_dir.into(),
            qemu: PathBuf::from("qemu-system-x86_64"),
            guest: None,
            deadline: Duration::from_secs(20),
            memo: Arc::new(tokio::sync::Mutex::new(None)),
        }
    }

    /// The guest the probe boots (kernel, initrd of the default image).
    pub fn with_guest(mut self, kernel: impl Into<PathBuf>, initrd: impl Into<PathBuf>) -> Self {
        self.guest = Some((kernel.into(), initrd.into()));
        self
    }

    /// How long the KVM probe boot may take before KVM counts as not working.
    pub fn deadline(mut self, d: Duration) -> Self {
        self.deadline = d;
        self
    }

    pub fn qemu_binary(mut self, p: impl Into<PathBuf>) -> Self {
        self.qemu = p.into();
        self
    }

    pub fn cache_file(&self) -> PathBuf {
        self.cache_dir.join("accel-probe.json")
    }

    fn cache_key(&self) -> String {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let qemu = crate::confine::child_command(&self.qemu)
            .arg("--version")
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_string()
            })
            .unwrap_or_default();
        format!("{}|{}", release.trim(), qemu.trim())
    }

    /// The accelerator `choice` resolves to when that is known without a probe boot: an
    /// override, or `auto`'s answer cached for this kernel and QEMU. `None` until probed.
    pub fn known(&self, choice: AccelChoice) -> Option<Accel> {
        match choice {
            AccelChoice::Tcg => Some(Accel::Tcg),
            AccelChoice::Kvm => kvm_openable().is_ok().then_some(Accel::Kvm),
            AccelChoice::Auto => self.cached(&self.cache_key()).map(|d| d.accel),
        }
    }

    /// The cache file's decision, when it was made for `key` (this kernel and QEMU).
    fn cached(&self, key: &str) -> Option<AccelDecision> {
        std::fs::read(self.cache_file())
            .ok()
            .and_then(|b| serde_json::from_slice::<CacheEntry>(&b).ok())
            .filter(|e| e.key == key)
            .map(|e| e.decision)
    }

    /// Resolve a choice: `tcg` and `kvm` are overrides; `auto` uses the memo, the cache file,
    /// or a probe boot.
    pub async fn resolve(&self, choice: AccelChoice) -> Result<AccelDecision> {
        match choice {
            AccelChoice::Tcg => Ok(AccelDecision {
                accel: Accel::Tcg,
                warning: None,
                reason: "tcg requested".into(),
                from_cache: false,
            }),
            AccelChoice::Kvm => {
                kvm_openable().map_err(|e| Error::InvalidConfig {
                    field: "accel",
                    reason: format!("kvm requested but /dev/kvm cannot be used: {e}"),
                })?;
                Ok(AccelDecision {
                    accel: Accel::Kvm,
                    warning: None,
                    reason: "kvm requested (not probed)".into(),
                    from_cache: false,
                })
            }
            AccelChoice::Auto => self.auto().await,
        }
    }

    async fn auto(&self) -> Result<AccelDecision> {
        let mut memo = self.memo.lock().await;
        if let Some(d) = memo.as_ref() {
            let mut d = d.clone();
            d.from_cache = true;
            return Ok(d);
        }
        let key = self.cache_key();
        let decision = match self.cached(&key) {
            Some(d) => AccelDecision {
                from_cache: true,
                ..d
            },
            None => {
                let d = self.probe().await;
                std::fs::create_dir_all(&self.cache_dir)
                    .map_err(Error::io(format!("create {}", self.cache_dir.display())))?;
                let entry = CacheEntry {
                    key,
                    decision: d.clone(),
                };
                let bytes = serde_json::to_vec_pretty(&entry)
                    .map_err(|e| Error::io("encode accel cache")(std::io::Error::other(e)))?;
                std::fs::write(self.cache_file(), bytes).map_err(Error::io("write accel cache"))?;
                d
            }
        };
        *memo = Some(decision.clone());
        Ok(decision)
    }

    async fn probe(&self) -> AccelDecision {
        let tcg = |warning: String, reason: &str| AccelDecision {
            accel: Accel::Tcg,
            warning: Some(warning),
            reason: reason.into(),
            from_cache: false,
        };
        if let Err(e) = kvm_openable() {
            return tcg(
                format!(
                    "KVM is not usable (/dev/kvm: {e}); VMs run under TCG emulation, much slower"
                ),
                "no usable /dev/kvm",
            );
        }
        let Some((kernel, initrd)) = &self.guest else {
            return tcg(
                "KVM was not probed (no guest image given to the probe); VMs run under TCG emulation".into(),
                "no probe guest",
            );
        };
        let boot = BareBoot {
            qemu: self.qemu.clone(),
            kernel: kernel.clone(),
            initrd: initrd.clone(),
            accel: Accel::Kvm,
            memory_mib: 128,
            dir: scratch(&self.cache_dir, "accel-probe"),
        };
        let r = boot.boot_to_ready(self.deadline).await;
        let _ = std::fs::remove_dir_all(&boot.dir);
        match r {
            Ok(t) => AccelDecision {
                accel: Accel::Kvm,
                warning: None,
                reason: format!(
                    "KVM booted the probe guest to ready in {} ms",
                    t.as_millis()
                ),
                from_cache: false,
            },
            Err(e) => tcg(
                format!(
                    "KVM is present but did not boot the probe guest ({e}); falling back to TCG emulation, much slower (override with --accel kvm)"
                ),
                "kvm probe boot failed",
            ),
        }
    }
}

fn kvm_openable() -> std::io::Result<()> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn overrides_and_cache() {
        let d = tempfile::tempdir().unwrap();
        let p = AccelProbe::new(d.path());
        assert_eq!(p.resolve(AccelChoice::Tcg).await.unwrap().accel, Accel::Tcg);
        match p.resolve(AccelChoice::Kvm).await {
            Ok(dec) => assert_eq!(dec.accel, Accel::Kvm),
            Err(e) => assert!(e.to_string().contains("/dev/kvm"), "{e}"),
        }
        // Without a probe guest, auto falls back to TCG with a warning and caches the answer.
        let first = p.resolve(AccelChoice::Auto).await.unwrap();
        assert_eq!(first.accel, Accel::Tcg);
        assert!(
            first.warning.as_deref().unwrap_or("").contains("TCG"),
            "{first:?}"
        );
        assert!(!first.from_cache);
        assert!(p.cache_file().exists());
        // A new probe object (a restarted process) reads the file instead of probing.
        let again = AccelProbe::new(d.path())
            .resolve(AccelChoice::Auto)
            .await
            .unwrap();
        assert!(again.from_cache);
        assert_eq!(again.accel, first.accel);
        assert_eq!(again.warning, first.warning);
    }
}
