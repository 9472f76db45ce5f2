//! `telvirt bench vm`: boot-to-ready time of the default guest started by the manager (with
//! pinning and the guest agent) against a bare qemu-system-x86_64 command line with the same
//! kernel and initrd, in the same run, alternating, several rounds; medians, ratio, and QEMU's
//! memory overhead per VM (RSS outside guest RAM). Owns the measurement; must not print.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::accel::AccelProbe;
use crate::bare::BareBoot;
use crate::config::{AccelChoice, CpuSet, VmConfig};
use crate::error::{Error, Result};
use crate::manager::VmManager;
use crate::pin;

/// What `bench::run` measures.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub rounds: u32,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// Scratch state root (short path: unix sockets live under it).
    pub state_root: PathBuf,
    pub accel: AccelChoice,
    /// Cache dir of the accelerator probe (its answer is reused).
    pub probe_cache: PathBuf,
    pub memory_mib: u64,
    /// Core the telvirt VM's vCPU is pinned to; default: the last online CPU.
    pub vcpu_cpu: Option<usize>,
    pub qemu: PathBuf,
    /// Deadline of each boot.
    pub boot_deadline: Duration,
}

impl BenchOptions {
    pub fn new(
        kernel: impl Into<PathBuf>,
        initrd: impl Into<PathBuf>,
        state_root: impl Into<PathBuf>,
    ) -> Self {
        let state_root = state_root.into();
        Self {
            rounds: 5,
            kernel: kernel.into(),
            initrd: initrd.into(),
            probe_cache: state_root.join("cache"),
            state_root,
            accel: AccelChoice::Auto,
            memory_mib: 256,
            vcpu_cpu: None,
            qemu: PathBuf::from("qemu-system-x86_64"),
            boot_deadline: Duration::from_secs(120),
        }
    }
}

/// Result of `telvirt bench vm` (times in milliseconds).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmBenchReport {
    pub rounds: u32,
    pub accel: String,
    pub telvirt_boot_ms: f64,
    pub bare_boot_ms: f64,
    /// telvirt / bare.
    pub ratio: f64,
    /// (ratio - 1) * 100.
    pub overhead_pct: f64,
    /// Median of the per-round ratios (each round boots both, back to back): less sensitive
    /// to slow drift in host load than the ratio of medians.
    pub paired_ratio: f64,
    pub guest_ram_mib: u64,
    /// Median RSS of the telvirt-started QEMU after ready.
    pub rss_mib: f64,
    /// Median RSS outside the guest RAM mapping.
    pub rss_overhead_mib: f64,
    pub telvirt_samples_ms: Vec<f64>,
    pub bare_samples_ms: Vec<f64>,
}

/// Median of a non-empty sample (0 for empty).
pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    match s.len() {
        0 => 0.0,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// Resident memory of a process from its smaps: (total KiB, KiB outside the guest RAM
/// mapping). Guest RAM is the mapping whose size is `guest_ram_kib` (up to 4 MiB of alignment
/// more); everything else, including TCG's translation buffer, is QEMU's overhead.
pub fn rss_split(pid: i32, guest_ram_kib: u64) -> Result<(u64, u64)> {
    let path = format!("/proc/{pid}/smaps");
    let text = std::fs::read_to_string(&path).map_err(Error::io(format!("read {path}")))?;
    let (mut total, mut outside) = (0u64, 0u64);
    let mut current_is_ram = false;
    for line in text.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-')
            && let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16))
        {
            let kib = (b - a) / 1024;
            current_is_ram = kib >= guest_ram_kib && kib < guest_ram_kib.saturating_add(4096);
            continue;
        }
        if let Some(rest) = line.strip_prefix("Rss:") {
            let kib: u64 = rest
                .split_whitespace()
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            total += kib;
            if !current_is_ram {
                outside += kib;
            }
        }
    }
    Ok((total, outside))
}

/// Run the benchmark; `progress(done, total)` after every boot.
pub async fn run(opts: &BenchOptions, progress: &mut dyn FnMut(u64, u64)) -> Result<VmBenchReport> {
    if opts.rounds == 0 {
        return Err(Error::InvalidConfig {
            field: "rounds",
            reason: "must be at least 1".into(),
        });
    }
    let probe = AccelProbe::new(&opts.probe_cache)
        .with_guest(&opts.kernel, &opts.initrd)
        .qemu_binary(&opts.qemu);
    let decision = probe.resolve(opts.accel).await?;
    let online = pin::online_cpus()?;
    let vcpu_cpu = match opts.vcpu_cpu {
        Some(c) => c,
        None => online.iter().last().unwrap_or(0),
    };
    let mgr = VmManager::new(&opts.state_root, probe).qemu_binary(&opts.qemu);
    let bare = BareBoot {
        qemu: opts.qemu.clone(),
        kernel: opts.kernel.clone(),
        initrd: opts.initrd.clone(),
        accel: decision.accel,
        memory_mib: opts.memory_mib,
        dir: opts.state_root.join("bare"),
    };
    let total = u64::from(opts.rounds) * 2;
    let mut done = 0u64;
    let (mut tv, mut bm, mut rss, mut over) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..opts.rounds {
        // Alternate which side goes first so drift in host load hits both equally.
        for side in if round % 2 == 0 { [0, 1] } else { [1, 0] } {
            if side == 0 {
                bm.push(bare.boot_to_ready(opts.boot_deadline).await?.as_secs_f64() * 1000.0);
            } else {
                let (ms, total_kib, outside_kib) =
                    telvirt_boot(&mgr, opts, decision.accel, vcpu_cpu).await?;
                tv.push(ms);
                rss.push(total_kib as f64 / 1024.0);
                over.push(outside_kib as f64 / 1024.0);
            }
            done += 1;
            progress(done, total);
        }
    }
    let _ = std::fs::remove_dir_all(&bare.dir);
    let (t, b) = (median(&tv), median(&bm));
    let ratio = if b > 0.0 { t / b } else { 0.0 };
    let pairs: Vec<f64> = tv
        .iter()
        .zip(&bm)
        .filter(|(_, b)| **b > 0.0)
        .map(|(t, b)| t / b)
        .collect();
    Ok(VmBenchReport {
        rounds: opts.rounds,
        accel: decision.accel.as_str().into(),
        telvirt_boot_ms: t,
        bare_boot_ms: b,
        ratio,
        overhead_pct: (ratio - 1.0) * 100.0,
        paired_ratio: median(&pairs),
        guest_ram_mib: opts.memory_mib,
        rss_mib: median(&rss),
        rss_overhead_mib: median(&over),
        telvirt_samples_ms: tv,
        bare_samples_ms: bm,
    })
}

async fn telvirt_boot(
    mgr: &VmManager,
    opts: &BenchOptions,
    accel: crate::config::Accel,
    vcpu_cpu: usize,
) -> Result<(f64, u64, u64)> {
    let mut cfg = VmConfig::new("bench-vm", &opts.kernel, &opts.initrd);
    cfg.memory_mib = opts.memory_mib;
    cfg.accel = match accel {
        crate::config::Accel::Kvm => AccelChoice::Kvm,
        crate::config::Accel::Tcg => AccelChoice::Tcg,
    };
    cfg.ready_timeout = opts.boot_deadline;
    cfg.cpu.vcpu_cpus = vec![CpuSet::single(vcpu_cpu)];
    let start = Instant::now();
    let vm = mgr.start(cfg).await?;
    let ms = start.elapsed().as_secs_f64() * 1000.0;
    let rss = rss_split(vm.pid(), opts.memory_mib * 1024);
    vm.kill().await?;
    let (total, outside) = rss?;
    Ok((ms, total, outside))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
    }

    #[test]
    fn rss_of_this_process() {
        // A 64 MiB mapping, touched, stands in for guest RAM.
        let mut ram = vec![0u8; 64 << 20];
        for i in (0..ram.len()).step_by(4096) {
            ram[i] = 1;
        }
        let (total, outside) = rss_split(std::process::id() as i32, 64 * 1024).unwrap();
        std::hint::black_box(&ram);
        assert!(
            total >= outside + 60 * 1024,
            "total {total} outside {outside}"
        );
        let (total2, outside2) = rss_split(std::process::id() as i32, u64::MAX / 4096).unwrap();
        assert_eq!(total2, outside2);
    }
}
