//! The placement benchmark behind `telvirt bench placement`: synthetic hosts and a mixed
//! workload, placed by the indexed engine and by a naive first-fit scan in the same run.
//!
//! Exception to the crate rule "no clocks, no randomness": this module is the single place that
//! reads `std::time::Instant` (to time placements), and it draws its workload from a fixed-seed
//! pseudo-random sequence (deterministic: the same seed gives the same workload). It must not
//! do any other I/O; progress goes through the caller's callback.

use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::error::SchedError;
use crate::inventory::HostSpec;
use crate::request::{
    CpuPolicy, CpuRequest, EmulatorPolicy, Redundancy, Runtime, ThreadPolicy, VnfRequest,
};
use crate::scheduler::{SchedConfig, Scheduler, Search};

/// Benchmark size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementBenchConfig {
    /// Synthetic hosts (2 sockets × 32 cores × 2 threads each).
    pub hosts: u32,
    /// VNFs to place.
    pub vnfs: u32,
    /// Workload seed.
    pub seed: u64,
}

impl Default for PlacementBenchConfig {
    fn default() -> Self {
        PlacementBenchConfig {
            hosts: 1000,
            vnfs: 100_000,
            seed: 1,
        }
    }
}

/// One engine's figures.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EngineFigures {
    /// Placement calls per second (accepted and refused).
    pub placements_per_s: f64,
    /// Median time of one `place` call, µs.
    pub p50_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
    /// Slowest call, µs.
    pub max_us: f64,
    /// VNFs placed.
    pub placed: u32,
    /// VNFs refused.
    pub refused: u32,
    /// Dedicated cpus in use after placing (density: same workload, fewer is denser).
    pub used_cpus: u64,
    /// Hosts holding at least one role.
    pub hosts_used: u32,
    /// Time to fail one host and re-place its roles, ms.
    pub replace_host_ms: f64,
    /// Roles that were on the failed host.
    pub replaced_roles: u32,
    /// Roles that could not be re-placed.
    pub replace_failed: u32,
}

/// The report (`telvirt bench placement -o json`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PlacementBenchReport {
    /// Hosts.
    pub hosts: u32,
    /// VNFs offered.
    pub vnfs: u32,
    /// Indexed engine: placements per second.
    pub placements_per_s: f64,
    /// Indexed engine: median µs per placement.
    pub p50_us: f64,
    /// Indexed engine: p99 µs per placement.
    pub p99_us: f64,
    /// Indexed engine: ms to re-place one failed host's roles.
    pub replace_host_ms: f64,
    /// First-fit baseline: placements per second.
    pub baseline_placements_per_s: f64,
    /// `placements_per_s / baseline_placements_per_s`.
    pub ratio: f64,
    /// The indexed engine placed at least as many VNFs on at most as many hosts as first fit.
    pub packs_at_least_as_densely: bool,
    /// Indexed engine details.
    pub indexed: EngineFigures,
    /// First-fit baseline details.
    pub baseline: EngineFigures,
}

/// Deterministic pseudo-random numbers (splitmix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// `n` synthetic hosts `host-0000`…: 2 sockets × 32 cores × 2 threads, core 0 of each socket
/// shared, zones `z0`…`z3` round robin, racks of 20.
pub fn synthetic_hosts(n: u32) -> Vec<HostSpec> {
    (0..n)
        .map(|i| {
            let mut h = HostSpec::synthetic(format!("host-{i:04}"), 2, 32, 2);
            h.labels.insert("zone".into(), format!("z{}", i % 4));
            h.labels.insert("rack".into(), format!("r{}", i / 20));
            h
        })
        .collect()
}

/// A mixed workload of `n` VNFs: mostly shared-group and small dedicated VNFs, some isolate,
/// require, pinned, NUMA/NIC-local, isolated-emulator and active-standby ones.
pub fn synthetic_workload(n: u32, seed: u64) -> Vec<VnfRequest> {
    let mut rng = Rng(seed);
    (0..n)
        .map(|i| {
            let authority = format!("auth{}", rng.below(20));
            let roll = rng.below(100);
            let mut cpu = CpuRequest::default();
            let mut redundancy = Redundancy::None;
            let mut runtime = if rng.below(2) == 0 {
                Runtime::Vm
            } else {
                Runtime::Wasm
            };
            let mut emulator = EmulatorPolicy::Share;
            match roll {
                0..50 => {
                    cpu.policy = CpuPolicy::Shared;
                    cpu.count = 1 + rng.below(2) as u32;
                    cpu.group = Some(format!("g{}", rng.below(4)));
                }
                50..80 => {
                    cpu.count = [1, 1, 1, 1, 2, 4][rng.below(6) as usize];
                    if rng.below(10) == 0 {
                        cpu.numa_node = Some(rng.below(2) as u32);
                    } else if rng.below(10) == 0 {
                        cpu.near_nic = Some(format!("nic{}", rng.below(2)));
                    }
                    if runtime == Runtime::Vm && rng.below(10) == 0 {
                        emulator = EmulatorPolicy::Isolate;
                    }
                }
                80..83 => {
                    cpu.count = 1;
                    cpu.thread_policy = ThreadPolicy::Isolate;
                }
                83..86 => {
                    cpu.count = 2;
                    cpu.thread_policy = ThreadPolicy::Require;
                }
                86..90 => {
                    cpu.policy = CpuPolicy::Pinned;
                    let base = 1 + rng.below(31) as u32;
                    let socket = rng.below(2) as u32 * 32;
                    cpu.cores = vec![socket + base];
                    runtime = Runtime::Wasm;
                }
                _ => {
                    cpu.count = 1;
                    redundancy = Redundancy::ActiveStandby;
                }
            }
            VnfRequest {
                name: format!("vnf-{i:06}"),
                authority,
                runtime,
                cpu,
                redundancy,
                zone_anti_affinity: false,
                emulator,
                memory_per_node: 0,
            }
        })
        .collect()
}

fn percentile(sorted_ns: &[u64], p: f64) -> f64 {
    if sorted_ns.is_empty() {
        return 0.0;
    }
    let i = ((sorted_ns.len() - 1) as f64 * p).round() as usize;
    sorted_ns[i] as f64 / 1000.0
}

fn run_engine(
    search: Search,
    hosts: &[HostSpec],
    work: &[VnfRequest],
    done: &mut u64,
    total: u64,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<EngineFigures, SchedError> {
    let mut s = Scheduler::new(SchedConfig {
        search,
        ..SchedConfig::default()
    })?;
    for h in hosts {
        s.add_host(h.clone())?;
    }
    let mut lat = Vec::with_capacity(work.len());
    let (mut placed, mut refused) = (0u32, 0u32);
    let start = Instant::now();
    for r in work {
        let t0 = Instant::now();
        let ok = s.place(r).is_ok();
        lat.push(t0.elapsed().as_nanos() as u64);
        if ok {
            placed += 1;
        } else {
            refused += 1;
        }
        *done += 1;
        if (*done).is_multiple_of(1024) {
            progress(*done, total);
        }
    }
    let secs = start.elapsed().as_secs_f64();
    lat.sort_unstable();
    let stats = s.stats();
    // Fail the host holding the most roles (ties: the first such host).
    let victim = s
        .host_names()
        .into_iter()
        .enumerate()
        .max_by_key(|(i, n)| (s.host_roles(n).unwrap_or(0), std::cmp::Reverse(*i)))
        .map(|(_, n)| n);
    let (mut replace_host_ms, mut replaced_roles, mut replace_failed) = (0.0, 0, 0);
    if let Some(v) = victim {
        let t0 = Instant::now();
        let out = s.fail_host(&v)?;
        replace_host_ms = t0.elapsed().as_secs_f64() * 1000.0;
        replaced_roles = out.len() as u32;
        replace_failed = out.iter().filter(|r| r.result.is_err()).count() as u32;
    }
    *done += 1;
    progress(*done, total);
    Ok(EngineFigures {
        placements_per_s: work.len() as f64 / secs.max(1e-9),
        p50_us: percentile(&lat, 0.50),
        p99_us: percentile(&lat, 0.99),
        max_us: percentile(&lat, 1.0),
        placed,
        refused,
        used_cpus: stats.dedicated_cpus - stats.free_cpus,
        hosts_used: stats.hosts_used,
        replace_host_ms,
        replaced_roles,
        replace_failed,
    })
}

/// Runs the placement benchmark: the indexed engine, then the first-fit baseline, on the same
/// hosts and workload. `progress(done, total)` is called every 1024 placements and at the end.
pub fn run_placement_bench(
    cfg: &PlacementBenchConfig,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<PlacementBenchReport, SchedError> {
    let hosts = synthetic_hosts(cfg.hosts);
    let work = synthetic_workload(cfg.vnfs, cfg.seed);
    let total = 2 * (cfg.vnfs as u64 + 1);
    let mut done = 0;
    let indexed = run_engine(Search::Indexed, &hosts, &work, &mut done, total, progress)?;
    let baseline = run_engine(Search::FirstFit, &hosts, &work, &mut done, total, progress)?;
    Ok(PlacementBenchReport {
        hosts: cfg.hosts,
        vnfs: cfg.vnfs,
        placements_per_s: indexed.placements_per_s,
        p50_us: indexed.p50_us,
        p99_us: indexed.p99_us,
        replace_host_ms: indexed.replace_host_ms,
        baseline_placements_per_s: baseline.placements_per_s,
        ratio: indexed.placements_per_s / baseline.placements_per_s.max(1e-9),
        packs_at_least_as_densely: indexed.placed >= baseline.placed
            && indexed.hosts_used <= baseline.hosts_used,
        indexed,
        baseline,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_bench_runs_and_reports_progress() {
        let cfg = PlacementBenchConfig {
            hosts: 8,
            vnfs: 600,
            seed: 7,
        };
        let mut calls = Vec::new();
        let r = run_placement_bench(&cfg, &mut |d, t| calls.push((d, t))).unwrap();
        assert_eq!(r.indexed.placed + r.indexed.refused, 600);
        assert_eq!(r.baseline.placed + r.baseline.refused, 600);
        assert!(r.indexed.placed > 0 && r.baseline.placed > 0);
        assert_eq!(calls.last(), Some(&(1202, 1202)));
        assert!(calls.windows(2).all(|w| w[0].0 < w[1].0));
        let json = serde_json::to_value(r).unwrap();
        for k in [
            "placements_per_s",
            "p99_us",
            "replace_host_ms",
            "baseline_placements_per_s",
            "ratio",
        ] {
            assert!(json.get(k).is_some(), "missing {k}");
        }
    }

    #[test]
    fn workload_is_deterministic_and_valid() {
        let a = synthetic_workload(500, 3);
        assert_eq!(a, synthetic_workload(500, 3));
        assert_ne!(a, synthetic_workload(500, 4));
        for r in &a {
            r.validate(8).unwrap();
        }
    }
}
