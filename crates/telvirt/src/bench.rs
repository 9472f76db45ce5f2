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
    /// Example VNFs as wasm (cranelift, pulley) against the same C compiled natively, on one
    /// pinned core; instantiation; snapshot and restore of a large map
    Wasm(WasmArgs),
    /// Packet ring between two pinned threads against crossbeam ArrayQueue and rtrb
    Ring(RingArgs),
    /// Generator → firewall → sink chain: throughput, latency percentiles, pinned vs unpinned
    Chain(ChainArgs),
    /// Boot of the default vm guest to guest-agent ready through telvirt (validate, QMP, pin,
    /// cont) against a bare QEMU command line, alternating; QEMU's memory overhead
    Vm(crate::vm::VmBenchArgs),
    /// The control plane with N simulated hosts (in-process agents, no-op runtime): creates/s,
    /// create→Running, paginated list, idle CPU, RSS and store per VNF; against a replay of the
    /// former poll-everything loops
    Control(crate::bench_control::ControlArgs),
    /// Two real controllers on a loopback etcd: SIGKILL the leader, time until the other
    /// acknowledges a write; against etcd's own expiry of the leader key
    Handover(crate::bench_handover::HandoverArgs),
    /// Real controller and agent processes (hosts on this machine) running wasm VNFs, on a
    /// three-member etcd against one controller on the embedded store: creates/s,
    /// create→Running, etcd size, leader failover and host-failure detection against etcd's own
    /// lease expiry; acknowledged writes and store invariants checked after the kills
    Cluster(crate::bench_cluster::ClusterArgs),
    /// A NAT under a generator stream loses its host (SIGKILL of the active's agent), with real
    /// controller and agent processes: detection, failover, packets lost, sessions kept and a
    /// new standby, against the same NAT without a standby placed again by the healer
    Failover(crate::bench_failover::FailoverArgs),
    /// A wasm NAT under a generator stream moves to another host (`vnf migrate`), with real
    /// controller and agent processes: time, packets lost, sessions kept and state streamed,
    /// against a cold move (deleted, created on the destination)
    Migrate(crate::bench_migrate::MigrateArgs),
    /// Two namespaces joined through the wasm firewall in `telvirt serve` (host ports) against
    /// a Linux bridge with an equivalent nftables rule, alternating: iperf3 TCP, a 64-byte
    /// flood, NDR and PDR (root, iperf3, ethtool, nftables)
    Ports(crate::bench_ports::PortsArgs),
    /// Frames through the default guest over its vhost-user NICs against the same guest on
    /// TAP NICs, alternating in one run (root; builds the guest image if needed)
    Vhost(crate::bench_vhost::VhostArgs),
    /// Live migration of the default guest between two QEMUs while it dirties memory at
    /// several rates: telvirt's tuning against QEMU's defaults, alternating (converged, total,
    /// downtime, bytes sent)
    VmMigrate(crate::vm::VmMigrateBenchArgs),
    /// A vm VNF moves between two hosts of a cluster (a controller and two agent processes on
    /// this machine): live (`vnf migrate`, the guest streams and goes on) against a cold move
    /// (deleted, created on the other host), alternating: total and how long the guest stopped
    VmMove(crate::bench_vm_move::VmMoveArgs),
    /// What TLS costs an API call: the same calls to a TLS and a --plain-http controller, in
    /// turn, on kept-alive connections and on a new connection per call
    Api(crate::bench_api::ApiArgs),
}

#[derive(Args, Debug)]
pub struct WasmArgs {
    /// Packets per throughput measurement
    #[arg(long, default_value_t = 4_000_000)]
    pub packets: u64,
    /// Core to pin the measuring thread to [default: the last allowed core]
    #[arg(long)]
    pub core: Option<usize>,
    /// Entries of the map snapshotted and restored
    #[arg(long, default_value_t = 1_000_000)]
    pub map_entries: u32,
    /// Example VNFs to run (firewall, nat, gtpu) [default: all]
    #[arg(long = "vnf")]
    pub vnfs: Vec<String>,
}

#[derive(Args, Debug)]
pub struct RingArgs {
    /// Packets moved per contender per round
    #[arg(long, default_value_t = 50_000_000)]
    pub packets: u64,
    /// Rounds; each contender's best round counts
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
}

#[derive(Args, Debug)]
pub struct ChainArgs {
    /// Packets in the max-speed throughput run
    #[arg(long, default_value_t = 5_000_000)]
    pub packets: u64,
    /// Offered rate of the latency runs, packets per second
    #[arg(long, default_value_t = 100_000)]
    pub rate: u64,
    /// Packets in each latency run
    #[arg(long, default_value_t = 300_000)]
    pub latency_packets: u64,
    /// Halvings of the no-drop (NDR) and partial-drop (PDR, ≤ 0.1% loss) rate searches, for
    /// the chain and for the direct link; 0 skips them
    #[arg(long, default_value_t = 8)]
    pub search_steps: u32,
    /// How long each search trial offers its rate, in milliseconds
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub trial_ms: u64,
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
        BenchCommand::Wasm(args) => wasm(format, args),
        BenchCommand::Ring(args) => ring(format, args),
        BenchCommand::Chain(args) => chain(format, args),
        BenchCommand::Vm(args) => crate::vm::bench_vm(format, args),
        BenchCommand::Control(args) => crate::bench_control::control(format, args),
        BenchCommand::Handover(args) => crate::bench_handover::handover(format, args),
        BenchCommand::Cluster(args) => crate::bench_cluster::cluster_bench(format, args),
        BenchCommand::Failover(args) => crate::bench_failover::failover_bench(format, args),
        BenchCommand::Migrate(args) => crate::bench_migrate::migrate_bench(format, args),
        BenchCommand::Ports(args) => crate::bench_ports::ports_bench(format, args),
        BenchCommand::Vhost(args) => crate::bench_vhost::vhost_bench(format, args),
        BenchCommand::Api(args) => crate::bench_api::api_bench(format, args),
        BenchCommand::VmMigrate(args) => crate::vm::bench_vm_migrate(format, args),
        BenchCommand::VmMove(args) => crate::bench_vm_move::vm_move_bench(format, args),
    }
}

fn wasm(format: Output, args: WasmArgs) -> Result<()> {
    use telvirt_runtime_wasm::bench;
    let opts = bench::BenchOptions {
        packets: args.packets,
        core: args.core.or_else(|| {
            telvirt_dataplane::worker::allowed_cores()
                .ok()?
                .last()
                .copied()
        }),
        map_entries: args.map_entries,
        vnfs: args.vnfs,
        ..bench::BenchOptions::default()
    };
    let progress = Progress::new(format, "wasm");
    let reports = bench::run(&opts, &mut |d, t| progress.update(d, t))?;
    progress.finish();
    if format == Output::Json {
        for r in &reports {
            println!("{}", serde_json::to_string(r)?);
        }
        return Ok(());
    }
    if output::structured(format, &reports)? {
        return Ok(());
    }
    let rows: Vec<Vec<String>> = reports
        .iter()
        .map(|r| {
            vec![
                r.name.clone(),
                format!("{:.2}", r.wasm_mpps),
                format!("{:.2}", r.native_mpps),
                format!("{:.2}", r.ratio),
                format!("{:.2}", r.pulley_mpps),
                format!("{:.1}", r.instantiate_us),
                format!("{:.1}", r.init_us),
                format!("{:.1}", r.maps_us),
                format!("{:.1} / {:.1}", r.snapshot_ms, r.restore_ms),
                r.outputs_match.to_string(),
            ]
        })
        .collect();
    println!(
        "wasm VNFs: {} packets of 64 bytes, batches of {}, core {:?}",
        opts.packets, opts.batch, opts.core
    );
    println!(
        "{}",
        output::table(
            &[
                "VNF",
                "WASM Mpps",
                "NATIVE Mpps",
                "RATIO",
                "PULLEY Mpps",
                "INSTANTIATE µs",
                "TV_INIT µs",
                "MAPS µs",
                "SNAPSHOT/RESTORE ms",
                "SAME OUTPUT",
            ],
            &rows
        )
    );
    Ok(())
}

fn ring(format: Output, args: RingArgs) -> Result<()> {
    use telvirt_dataplane::bench;
    let opts = bench::RingOpts {
        packets: args.packets,
        rounds: args.rounds,
        ..bench::RingOpts::default()
    };
    let progress = Progress::new(format, "ring");
    let report = bench::ring(&opts, &mut |d, t| progress.update(d, t))?;
    progress.finish();
    if output::report(format, &report)? {
        return Ok(());
    }
    println!(
        "ring: 64-byte packets, batch {}, producer/consumer on cores {:?}",
        opts.batch, report.cores
    );
    let rows: Vec<Vec<String>> = report
        .results
        .iter()
        .map(|r| {
            vec![
                r.name.clone(),
                format!("{:.1}", r.mpps),
                format!("{:.2}", r.ns_per_packet),
            ]
        })
        .collect();
    println!("{}", output::table(&["QUEUE", "Mpps", "ns/packet"], &rows));
    println!(
        "ratio (telvirt / best peer {}): {:.2}",
        report.baseline_name, report.ratio
    );
    println!(
        "ratio (telvirt / rtrb handing its batch over the same way, into a Vec): {:.2}",
        report.same_handoff_ratio
    );
    Ok(())
}

fn chain(format: Output, args: ChainArgs) -> Result<()> {
    use telvirt_dataplane::bench;
    let opts = bench::ChainOpts {
        packets: args.packets,
        latency_rate_pps: args.rate,
        latency_packets: args.latency_packets,
        search_steps: args.search_steps,
        trial_ms: args.trial_ms,
        ..bench::ChainOpts::default()
    };
    let progress = Progress::new(format, "chain");
    let report = bench::chain(&opts, &mut |d, t| progress.update(d, t))?;
    progress.finish();
    if output::report(format, &report)? {
        return Ok(());
    }
    println!("chain: generator → firewall ({} rules) → sink", opts.rules);
    let row = |name: &str, run: &bench::ChainRun| {
        vec![
            name.to_owned(),
            run.rate_pps.map_or("max".into(), |r| r.to_string()),
            format!("{:.2}", run.mpps),
            run.lost.to_string(),
            format!("{:.2}", run.latency.p50_us),
            format!("{:.2}", run.latency.p99_us),
            format!("{:.2}", run.latency.p999_us),
            format!("{:.2}", run.latency.max_us),
        ]
    };
    println!(
        "{}",
        output::table(
            &[
                "RUN",
                "RATE pps",
                "Mpps",
                "LOST",
                "P50 µs",
                "P99 µs",
                "P99.9 µs",
                "MAX µs"
            ],
            &[
                row("throughput (pinned)", &report.throughput),
                row("no firewall: gen → sink (baseline)", &report.direct),
                row("latency, pinned", &report.pinned),
                row("latency, unpinned (baseline)", &report.unpinned),
            ]
        )
    );
    println!(
        "ratio {:.2}: the chain with the firewall keeps {:.0}% of the bare link's {:.2} Mpps",
        report.ratio,
        report.ratio * 100.0,
        report.baseline_mpps
    );
    if let Some(s) = &report.search {
        let mpps = |pps: u64| format!("{:.3}", pps as f64 / 1e6);
        println!(
            "{}",
            output::table(
                &["SEARCH", "NDR Mpps", "PDR Mpps (≤0.1% loss)", "TRIALS"],
                &[
                    vec![
                        "chain".to_owned(),
                        mpps(s.chain.ndr_pps),
                        mpps(s.chain.pdr_pps),
                        s.chain.trials.len().to_string(),
                    ],
                    vec![
                        "no firewall: gen → sink (baseline)".to_owned(),
                        mpps(s.direct.ndr_pps),
                        mpps(s.direct.pdr_pps),
                        s.direct.trials.len().to_string(),
                    ],
                ]
            )
        );
        println!(
            "NDR ratio {:.2}, PDR ratio {:.2} (chain / direct link)",
            s.ndr_ratio, s.pdr_ratio
        );
    }
    Ok(())
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
    if output::report(format, &report)? {
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
