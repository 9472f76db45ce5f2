//! `telvirt latency ...`: the measurement tools an NFV host is qualified with.
//!
//! Owns argument shapes and printing; the measuring is done by `telvirt_dataplane::latency`.

use anyhow::Result;
use clap::{Args, Subcommand};

use reqwest::Method;
use telvirt_model::network::{LatencyProbe, LatencyReport};

use crate::cli::Output;
use crate::client::Client;
use crate::output;
use crate::progress::Progress;

#[derive(Subcommand, Debug)]
pub enum LatencyCommand {
    /// Periodic wake-ups on one core (cyclictest-style), next to rt-tests' cyclictest on the
    /// same core in the same run
    Timer(TimerArgs),
    /// One-way packet latency through a running network: a probe sends timestamped frames
    /// into the chain's entry port and measures them at its exit (through `telvirt serve`)
    Chain(ChainArgs),
}

#[derive(Args, Debug)]
pub struct ChainArgs {
    /// Network to probe
    pub network: String,
    /// Port the probe sends into [default: the port the network's generator or host port
    /// feeds]
    #[arg(long)]
    pub from: Option<String>,
    /// Port the probe receives from [default: the port that feeds the network's sink or host
    /// port]
    #[arg(long)]
    pub to: Option<String>,
    /// Packets per second
    #[arg(long, default_value_t = 10_000)]
    pub rate: u64,
    /// Packets to send
    #[arg(long, default_value_t = 20_000)]
    pub packets: u64,
    /// Frame size in bytes
    #[arg(long, default_value_t = 64)]
    pub size: u32,
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

pub async fn run(client: Option<&Client>, format: Output, cmd: LatencyCommand) -> Result<()> {
    match cmd {
        LatencyCommand::Timer(args) => timer(format, args),
        LatencyCommand::Chain(args) => match client {
            Some(c) => chain(c, format, args).await,
            None => anyhow::bail!("latency chain needs a telvirt server"),
        },
    }
}

async fn chain(client: &Client, format: Output, args: ChainArgs) -> Result<()> {
    let probe = LatencyProbe {
        from: args.from,
        to: args.to,
        rate_pps: Some(args.rate),
        packets: Some(args.packets),
        size: Some(args.size),
    };
    let body = serde_json::to_vec(&probe)?;
    let path = format!("/v1/networks/{}/latency", args.network);
    // The server answers when the probe is done; the bar shows time against the send time.
    let expected_ms = (args.packets.saturating_mul(1000) / args.rate.max(1)).max(1);
    let progress = Progress::new(format, "probe");
    let call = client.call(Method::POST, &path, Some((body, "application/json")));
    tokio::pin!(call);
    let start = std::time::Instant::now();
    let answer = loop {
        tokio::select! {
            a = &mut call => break a,
            _ = tokio::time::sleep(std::time::Duration::from_millis(100)) => {
                let ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
                progress.update(ms.min(expected_ms), expected_ms);
            }
        }
    };
    progress.finish();
    let report: LatencyReport = answer?.json()?;
    if output::report(format, &report)? {
        return Ok(());
    }
    println!(
        "chain {}: {} -> {}, {} packets at {} pps",
        report.network, report.from, report.to, report.sent, report.rate_pps
    );
    if !report.displaced.is_empty() {
        println!("paused while probing: {}", report.displaced.join(", "));
    }
    println!(
        "{}",
        output::table(
            &[
                "RECEIVED",
                "LOST",
                "REORDERED",
                "P50 µs",
                "P99 µs",
                "P99.9 µs",
                "MAX µs"
            ],
            &[vec![
                report.received.to_string(),
                report.lost.to_string(),
                report.reordered.to_string(),
                format!("{:.1}", report.p50_us),
                format!("{:.1}", report.p99_us),
                format!("{:.1}", report.p999_us),
                format!("{:.1}", report.max_us),
            ]]
        )
    );
    println!("{}", report.histogram);
    Ok(())
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
