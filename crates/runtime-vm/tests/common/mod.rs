//! Shared test support: builds the static guest agent and the default guest image once per
//! test binary, limits concurrent guests, and kills every QEMU a test starts (Drop guards).

#![allow(clippy::unwrap_used)]
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use telvirt_runtime_vm::image::{GuestImage, ImageBuilder};

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// Shared cache for kernel and initramfs across test runs (outside any repository path).
pub fn cache_dir() -> PathBuf {
    std::env::var_os("TELVIRT_TEST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("telvirt-test-cache"))
}

/// The static telvirt-guest binary: `TELVIRT_GUEST_BIN`, or built here with crt-static into a
/// separate target dir (the outer cargo holds the lock on the main one while tests run).
pub fn guest_binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("TELVIRT_GUEST_BIN") {
            return PathBuf::from(p);
        }
        let tdir = target_dir().join("guest-static");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo)
            .current_dir(workspace_root())
            .args([
                "rustc",
                "-q",
                "-p",
                "telvirt-guest",
                "--release",
                "--bin",
                "telvirt-guest",
                "--",
                "-C",
                "target-feature=+crt-static",
                "-C",
                "strip=debuginfo",
            ])
            .env("CARGO_TARGET_DIR", &tdir)
            .status()
            .expect("run cargo to build the static guest agent");
        assert!(status.success(), "building the static guest agent failed");
        tdir.join("release/telvirt-guest")
    })
    .clone()
}

/// The default guest image, built (or found in the cache) once per test binary.
pub fn image() -> GuestImage {
    static IMG: OnceLock<GuestImage> = OnceLock::new();
    IMG.get_or_init(|| {
        ImageBuilder::new(cache_dir(), guest_binary())
            .build(&mut |_| {})
            .expect("build the default guest image")
    })
    .clone()
}

use telvirt_runtime_vm::{AccelChoice, AccelProbe, VmConfig, VmHandle, VmManager};

/// At most one guest boots at a time in this test binary (2-core machines, shared).
pub static BOOT_SLOT: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);

/// Kills the VM's QEMU when the test ends, passed or failed.
pub struct VmGuard(pub VmHandle);

impl Drop for VmGuard {
    fn drop(&mut self) {
        self.0.kill_now();
    }
}

/// Kills a QEMU by pid when the test ends.
pub struct PidGuard(pub i32);

impl Drop for PidGuard {
    fn drop(&mut self) {
        if std::path::Path::new(&format!("/proc/{}", self.0)).exists() {
            // SAFETY: plain syscall on a pid this test started.
            unsafe { libc::kill(self.0, libc::SIGKILL) };
        }
    }
}

/// A short state root (unix socket paths are limited).
pub fn state_root() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("tv")
        .tempdir_in("/tmp")
        .expect("create a state root in /tmp")
}

/// This package's relay binary, as a sealed stream's relay program.
pub fn relay_program() -> telvirt_runtime_vm::stream_seal::RelayProgram {
    telvirt_runtime_vm::stream_seal::RelayProgram {
        program: env!("CARGO_BIN_EXE_telvirt-stream-relay").into(),
        args: Vec::new(),
    }
}

/// A manager whose probe never boots KVM (tests run under TCG).
pub fn manager(root: &Path) -> VmManager {
    // A sealed stream's relay runs as this package's relay binary.
    telvirt_runtime_vm::stream_seal::set_relay_program(relay_program());
    VmManager::new(root, AccelProbe::new(root.join("cache")))
}

/// 1 vCPU, 256 MiB, TCG, the default image.
pub fn config(name: &str) -> VmConfig {
    let img = image();
    let mut c = VmConfig::new(name, img.kernel, img.initrd);
    c.accel = AccelChoice::Tcg;
    c
}

/// Poll `f` until it is true or `secs` pass.
pub async fn poll_until(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while std::time::Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    f()
}
