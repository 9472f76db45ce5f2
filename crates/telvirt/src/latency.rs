//! `telvirt latency ...`: the measurement tools an NFV host is qualified with.
//!
//! Owns argument shapes and printing; the measuring is done by `telvirt_dataplane::latency`.

use anyhow::Result;
use clap::{Args, Subcommand};

use crate::cli::Output;
use crate::output;
use crate::progress::Progress;

#[derive(Subcommand, Debug)]
pub enum LatencyCommand {
    /// Periodic wake-ups on one core (cyclictest-style), next to rt-tests' cyclictest on the
    /// same core in the same run
    Timer(TimerArgs),
}

#[derive(Args, Debug)]
pub struct TimerArgs {
    /// Core to measure [default: the last allowed core]
    #[arg(long)]
    pub core: Option<usize>,
    /// Wake-up period in microseconds
    #[arg(long, default_value_t = 1000)]
    pub interval_us: u64,
    /// Number of wake-ups
    #[arg(long, default_value_t = 5000)]
    pub loops: u64,
    /// SCHED_FIFO priority (1-99) for both tools
    #[arg(long)]
    pub priority: Option<i32>,
    /// Skip the cyclictest reference run
    #[arg(long)]
    pub no_cyclictest: bool,
}

pub fn run(format: Output, cmd: LatencyCommand) -> Result<()> {
    match cmd {
        LatencyCommand::Timer(args) => timer(format, args),
    }
}

fn timer(format: Output, args: TimerArgs) -> Result<()> {
    use telvirt_dataplane::latency;
    let core = match args.core {
        Some(c) => c,
        None => telvirt_dataplane::worker::allowed_cores()?
            .last()
            .copied()
            .unwrap_or(0),
    };
    let opts = latency::TimerOpts {
        core,
        interval_us: args.interval_us,
        loops: args.loops,
        priority: args.priority,
        cyclictest: !args.no_cyclictest,
    };
    let progress = Progress::new(format, "timer");
    let report = latency::timer(&opts, &mut |d, t| progress.update(d, t))?;
    progress.finish();
    if output::report(format, &report)? {
        return Ok(());
    }
    println!(
        "timer: {} wake-ups every {} µs on core {}",
        opts.loops, opts.interval_us, opts.core
    );
    let mut rows = vec![percentile_row("telvirt", &report.telvirt)];
    if let Some(c) = &report.cyclictest {
        rows.push(percentile_row("cyclictest (reference)", &c.latency));
    }
    println!(
        "{}",
        output::table(
            &[
                "TOOL",
                "SAMPLES",
                "MIN µs",
                "P50 µs",
                "P99 µs",
                "P99.9 µs",
                "MAX µs"
            ],
            &rows
        )
    );
    if let Some(ratio) = report.median_ratio {
        println!("median ratio (telvirt / cyclictest): {ratio:.3}");
    }
    println!("{}", report.histogram);
    Ok(())
}

fn percentile_row(name: &str, p: &telvirt_dataplane::hist::Percentiles) -> Vec<String> {
    vec![
        name.to_owned(),
        p.count.to_string(),
        format!("{:.1}", p.min_us),
        format!("{:.1}", p.p50_us),
        format!("{:.1}", p.p99_us),
        format!("{:.1}", p.p999_us),
        format!("{:.1}", p.max_us),
    ]
}
