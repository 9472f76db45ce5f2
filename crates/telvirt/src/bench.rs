//! `telvirt bench ...`: runs each layer's benchmark and prints its figures next to the baseline
//! measured in the same run.
//!
//! Owns argument shapes and printing; the measuring is done by the crates (`sched::bench`, ...).

use anyhow::Result;
use clap::{Args, Subcommand};

use crate::cli::Output;
use crate::output;
use crate::progress::Progress;

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Place VNFs of mixed policies onto synthetic hosts, fail one host and re-place its VNFs;
    /// compared with a naive first-fit scan over the same workload
    Placement(PlacementArgs),
    /// Boot of the default vm guest to guest-agent ready through telvirt (validate, QMP, pin,
    /// cont) against a bare QEMU command line, alternating; QEMU's memory overhead
    Vm(crate::vm::VmBenchArgs),
}

#[derive(Args, Debug)]
pub struct PlacementArgs {
    /// Synthetic hosts (2 sockets x 32 cores x 2 threads each)
    #[arg(long, default_value_t = 1000)]
    pub hosts: u32,
    /// VNFs to place
    #[arg(long, default_value_t = 100_000)]
    pub vnfs: u32,
    /// Workload seed
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

pub fn run(format: Output, cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Placement(args) => placement(format, args),
        BenchCommand::Vm(args) => crate::vm::bench_vm(format, args),
    }
}

fn placement(format: Output, args: PlacementArgs) -> Result<()> {
    let cfg = telvirt_sched::bench::PlacementBenchConfig {
        hosts: args.hosts,
        vnfs: args.vnfs,
        seed: args.seed,
    };
    let progress = Progress::new(format, "placing");
    let report =
        telvirt_sched::bench::run_placement_bench(&cfg, &mut |d, t| progress.update(d, t))?;
    progress.finish();
    if format == Output::Json {
        // One JSON object on one line, as scripts expect.
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    if output::structured(format, &report)? {
        return Ok(());
    }
    let (i, b) = (&report.indexed, &report.baseline);
    println!(
        "placement: {} VNFs onto {} hosts (2 sockets x 32 cores x 2 threads)",
        report.vnfs, report.hosts
    );
    println!(
        "{}",
        output::table(
            &[
                "ENGINE",
                "PLACEMENTS/S",
                "P50 µs",
                "P99 µs",
                "PLACED",
                "CPUS USED",
                "HOST FAIL ms"
            ],
            &[
                vec![
                    "telvirt (indexed)".into(),
                    format!("{:.0}", i.placements_per_s),
                    format!("{:.2}", i.p50_us),
                    format!("{:.2}", i.p99_us),
                    i.placed.to_string(),
                    i.used_cpus.to_string(),
                    format!("{:.2}", i.replace_host_ms),
                ],
                vec![
                    "first-fit (baseline)".into(),
                    format!("{:.0}", b.placements_per_s),
                    format!("{:.2}", b.p50_us),
                    format!("{:.2}", b.p99_us),
                    b.placed.to_string(),
                    b.used_cpus.to_string(),
                    format!("{:.2}", b.replace_host_ms),
                ],
            ]
        )
    );
    println!(
        "ratio (placements/s, telvirt / first-fit): {:.2}",
        report.ratio
    );
    Ok(())
}
