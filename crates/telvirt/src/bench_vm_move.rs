//! `telvirt bench vm-move`: a vm VNF moved between the two hosts of a cluster on this machine
//! (a controller and two agent processes with tunnel addresses on loopback), live (`vnf
//! migrate`: its guest streams from one QEMU to the other and goes on) against what an operator
//! does without live migration, a cold move (deleted, created on the other host: a new guest
//! boots), alternating in one run. With `--stream-pps` the VNF forwards a generator stream
//! between its two NICs (gen -> fwa -> the VNF -> fwb -> sink, the firewalls, generator and
//! sink on a third host that stays put) and each move also reports what it cost the stream.
//!
//! Owns the set-up, the rounds and the report. It must not time anything inside the platform:
//! the figures are the API's (total), QEMU's (how long the guest was stopped), as the move's
//! event reports them, and the stream sink's (frames lost and delayed).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde::Serialize;

use crate::bench_cluster::{Api, Hosts, embedded_controller, lay_out_hosts};
use crate::bench_control::ms;
use crate::bench_failover::{cordon, events_saying, post_yaml, stream_network};
use crate::bench_handover::{answer, poll_until};
use crate::bench_ports::{median, median_if_any, ratio};
use crate::bench_stream::{SinkReading, StreamLoss, lost_where};
use crate::cli::Output;
use crate::output;
use crate::progress::Progress;

#[derive(Args, Debug)]
pub struct VmMoveArgs {
    /// Moves of each kind, alternating
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub rounds: u32,
    /// Guest memory of the VNF, MiB
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(64..=4096))]
    pub memory_mib: u64,
    /// How the guest crosses the network when it moves (`spec.vm.move_encryption`:
    /// `encrypted`, the platform's default, or `none`)
    #[arg(long, value_enum, default_value_t = MoveEncryptionArg::Encrypted)]
    pub move_encryption: MoveEncryptionArg,
    /// The QEMU both agents run the guest with (`agent --qemu`) [default: qemu-system-x86_64
    /// on PATH]
    #[arg(long, value_name = "PATH", value_parser = crate::cli::parse_qemu)]
    pub qemu: Option<std::path::PathBuf>,
    /// Also send a stream of this many frames a second through the VNF (its two NICs:
    /// gen -> fwa -> vmm -> fwb -> sink, the firewalls, generator and sink on a third host)
    /// and report what each move cost it [default: no stream]
    #[arg(long, value_name = "PPS", value_parser = clap::value_parser!(u64).range(100..=20_000))]
    pub stream_pps: Option<u64>,
    #[command(flatten)]
    pub agents: crate::control_threads::AgentPriorityArgs,
    #[command(flatten)]
    pub image: crate::vm::ImageArgs,
}

/// `--move-encryption`: the descriptor's `spec.vm.move_encryption`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MoveEncryptionArg {
    #[value(alias = "tls")]
    Encrypted,
    None,
}

impl MoveEncryptionArg {
    fn as_str(self) -> &'static str {
        match self {
            Self::Encrypted => "encrypted",
            Self::None => "none",
        }
    }
}

/// One kind of move, every round.
#[derive(Debug, Serialize)]
pub struct VmMoveFigures {
    pub setup: &'static str,
    /// From the request until the API shows the VNF running on the other host alone, ms.
    pub total_ms: Vec<f64>,
    pub total_p50_ms: f64,
    /// How long the guest did not run, ms: for the live move, from when its source QEMU began
    /// stopping it until its destination QEMU resumed it (the earlier of `STOP` and the last
    /// byte less QEMU's downtime, and `RESUME`; one clock here), as the move's event states it; for the cold move, from the delete until the new
    /// guest runs (its agent answered).
    pub outage_ms: Vec<f64>,
    pub outage_p50_ms: f64,
    /// Live moves whose event stated no whole pause (a switch forced past the move's
    /// deadline, an agent restarted mid-move, clocks apart): left out of `outage_ms`.
    pub outage_unmeasured: u32,
    /// The live move's pause as its source QEMU measures it (`downtime`: until its last byte
    /// left, short of the destination's resume), ms.
    pub qemu_downtime_ms: Vec<f64>,
    pub qemu_downtime_p50_ms: f64,
    /// Guest memory streamed (live moves), MiB.
    pub streamed_mib: Vec<u64>,
    /// With `--stream-pps`: what each move cost the stream through the VNF.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream: Option<StreamFigures>,
}

/// What one kind of move cost the stream through the VNF, every round.
#[derive(Debug, Serialize)]
pub struct StreamFigures {
    /// Each move's loss, from just before its request until the stream ran a second again
    /// after it (a live move asked again after a broken arrival counts every try).
    pub moves: Vec<StreamLoss>,
    /// Of the moves' `outage_ms` (frames lost at the stream's rate).
    pub outage_p50_ms: f64,
    pub outage_max_ms: f64,
    /// The largest of the moves' `delay_max_us` (`None`: a frame slower than 1 s).
    pub delay_max_us: Option<u64>,
    /// For each move that lost frames: the stream network's table after it and the agents'
    /// last warnings, to see where they went.
    pub lost_where: Vec<String>,
    /// Live moves: how much longer the stream was cut than the guest was paused (its
    /// `outage_ms` less the move's whole pause), ms, of the moves whose pause was stated and
    /// that moved at their first try: the time the traffic took to follow the guest.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub beyond_pause_ms: Vec<f64>,
}

impl StreamFigures {
    fn of(runs: Vec<(StreamLoss, Option<String>)>) -> Self {
        let outage: Vec<f64> = runs.iter().map(|(l, _)| l.outage_ms).collect();
        Self {
            outage_p50_ms: median(outage.iter().copied()),
            outage_max_ms: outage.iter().copied().fold(0.0, f64::max),
            delay_max_us: runs
                .iter()
                .map(|(l, _)| l.delay_max_us)
                .collect::<Option<Vec<u64>>>()
                .and_then(|d| d.into_iter().max()),
            lost_where: runs.iter().filter_map(|(_, w)| w.clone()).collect(),
            moves: runs.into_iter().map(|(l, _)| l).collect(),
            beyond_pause_ms: Vec::new(),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct VmMoveReport {
    pub measured: String,
    /// The QEMU both agents ran (`--qemu`, or the one on PATH).
    pub qemu: String,
    pub rounds: u32,
    pub memory_mib: u64,
    /// How the guest crossed the network (`spec.vm.move_encryption`).
    pub move_encryption: MoveEncryptionArg,
    /// The agents' SCHED_FIFO priority for their async control threads (`--control-priority`);
    /// none: SCHED_OTHER.
    pub control_priority: Option<u8>,
    /// The agents' nice value for those threads when not SCHED_FIFO (`--control-nice`);
    /// none: the agents' default (-10 where permitted).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub control_nice: Option<i8>,
    /// How the agents' async control threads ran, read from `/proc` after the moves (what
    /// the options above asked for applies only where the host permits it): each class once.
    pub control_applied: std::collections::BTreeSet<String>,
    pub live: VmMoveFigures,
    pub cold: VmMoveFigures,
    /// Live over cold, of the medians.
    pub total_ratio: f64,
    pub outage_ratio: f64,
    /// The stream's rate through the VNF (`--stream-pps`), frames a second.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream_pps: Option<u64>,
    /// Live over cold, of the stream's outage medians.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream_outage_ratio: Option<f64>,
    /// Live moves whose guest broke on its arrival (it ran on at its source, QEMU 7.2's TCG
    /// delivers some guests broken, ADR 062) and were asked again, at most twice a round.
    pub arrivals_broken: u32,
    /// Where the live moves' pauses went.
    pub pause_phases: PausePhaseFigures,
    /// How long after its destination resumed the guest the controller decided each live
    /// move's switch to it (its clock against the destination's; the VNF's traffic went to
    /// the source at least that long: it follows once the agents rewire), ms, of the moves
    /// whose event states it, and its median.
    pub switched_after_resume_ms: Vec<f64>,
    pub switched_after_resume_p50_ms: Option<f64>,
    /// CPU the agents' data-plane workers used during the live moves, in cores: their CPU
    /// time over the moves' time, each from its request until it ended (with a stream, until
    /// the stream ran a second again after it): what polling the VNF's NICs, the tunnels and
    /// the stream's nodes costs the machine a guest moves on.
    pub dataplane_worker_cores: f64,
    /// How long the agents' idle workers poll on before they sleep (`--worker-idle-spin-us`,
    /// from the environment they inherit, `TELVIRT_WORKER_IDLE_SPIN_US`), µs.
    pub worker_idle_spin_us: u64,
}

/// Where each live move's whole pause went, by its QEMUs' event times as its switch event
/// states them (`telvirt_model::api::PausePhases`), ms: each part of the moves whose event
/// states it, and its median (none when no move's did).
#[derive(Debug, Serialize)]
pub struct PausePhaseFigures {
    /// From the source's stop until its commit point (QEMU stopping the guest's vCPUs).
    pub stopping_ms: Vec<f64>,
    pub stopping_p50_ms: Option<f64>,
    /// Held at the commit point until the source's agent let the final copy through.
    pub commit_point_ms: Vec<f64>,
    pub commit_point_p50_ms: Option<f64>,
    /// The final copy (device state, last dirty pages) until the source's last byte left.
    pub final_copy_ms: Vec<f64>,
    pub final_copy_p50_ms: Option<f64>,
    /// From the source's last byte until the destination resumed the guest.
    pub destination_ms: Vec<f64>,
    pub destination_p50_ms: Option<f64>,
}

const VNF: &str = "vmm";
/// What a move's event says when its guest broke on its arrival and runs on at its source.
const ARRIVAL_BROKEN: &str = "its guest did not come to run there";
/// How long the stream runs after a move before its sink is read (late frames arrive).
const STREAM_SETTLE: Duration = Duration::from_secs(1);

/// The VNF: with `nics`, two vhost-user NICs on ports n3 and n6, which the default guest
/// forwards between.
fn descriptor(memory_mib: u64, encryption: MoveEncryptionArg, nics: bool) -> String {
    let (ports, nics) = if nics {
        (
            "  ports: [n3, n6]\n",
            ", nics: [ { port: n3 }, { port: n6 } ]",
        )
    } else {
        ("", "")
    };
    format!(
        "apiVersion: telvirt/v1\nkind: Vnf\nmetadata: {{ name: {VNF} }}\nspec:\n  runtime: vm\n  cpu: {{ policy: dedicated, count: 1 }}\n{ports}  vm: {{ memory: {memory_mib}MiB, move_encryption: {}{nics} }}\n",
        encryption.as_str()
    )
}

/// Once the stream reaches the sink again (a tenth of a second of it) and ran
/// [`STREAM_SETTLE`] more: what it lost since `before`, and where when it lost any.
async fn stream_cost(
    api: &Api,
    before: &SinkReading,
    rate_pps: u64,
    dir: &std::path::Path,
    hosts: u32,
) -> Result<(StreamLoss, Option<String>)> {
    let at = SinkReading::read(api).await?.received;
    poll_until(
        Duration::from_secs(120),
        "the stream back at the sink",
        || async {
            SinkReading::read(api)
                .await
                .is_ok_and(|r| r.received > at + rate_pps / 10)
        },
    )
    .await?;
    tokio::time::sleep(STREAM_SETTLE).await;
    let after = SinkReading::read(api).await?;
    let loss = StreamLoss::between(before, &after, rate_pps);
    let lost_where = (loss.lost_packets > 0).then(|| lost_where(&after.table, dir, hosts));
    Ok((loss, lost_where))
}

/// The host the VNF runs on alone, if it runs.
async fn running_alone(api: &Api) -> Option<String> {
    let v = api.json(&format!("/v1/vnfs/{VNF}")).await.ok()?;
    let placements = v["placements"].as_array()?;
    (v["phase"] == "Running" && placements.len() == 1 && v.get("migration").is_none())
        .then(|| placements[0]["host"].as_str().map(str::to_owned))
        .flatten()
}

/// `waited` (a wait that ended without the VNF where it was expected) with what the API shows
/// of the VNF then: its phase, placements, move and stream, and its last events.
async fn with_state(api: &Api, waited: Result<()>) -> Result<()> {
    let Err(e) = waited else {
        return Ok(());
    };
    let state = match api.json(&format!("/v1/vnfs/{VNF}")).await {
        Ok(v) => {
            let pick = |k: &str| {
                v.get(k)
                    .map_or_else(|| "none".to_owned(), |x| x.to_string())
            };
            format!(
                "phase {}, reason {}, placements {}, standby {}, migration {}, replication {}",
                pick("phase"),
                pick("reason"),
                pick("placements"),
                pick("standby"),
                pick("migration"),
                pick("replication")
            )
        }
        Err(e) => format!("not readable: {e:#}"),
    };
    let events = api
        .json(&format!("/v1/vnfs/{VNF}/events"))
        .await
        .ok()
        .and_then(|all| {
            all.as_array().map(|a| {
                a.iter()
                    .rev()
                    .take(6)
                    .filter_map(|e| e["reason"].as_str().map(str::to_owned))
                    .collect::<Vec<_>>()
                    .join(" | ")
            })
        })
        .unwrap_or_default();
    Err(e.context(format!(
        "vnf {VNF}: {state}; last events, newest first: {events}"
    )))
}

fn other(host: &str) -> &'static str {
    if host == "h1" { "h2" } else { "h1" }
}

/// The reason of `vnf`'s last switch event (a move's end).
pub(crate) async fn switch_event(api: &Api, vnf: &str) -> Result<String> {
    let events = api.json(&format!("/v1/vnfs/{vnf}/events")).await?;
    events
        .as_array()
        .and_then(|all| {
            all.iter().rev().find_map(|e| {
                e["reason"]
                    .as_str()
                    .filter(|r| crate::migrate::switch_figures(r).is_some())
            })
        })
        .map(str::to_owned)
        .with_context(|| format!("the move of {vnf} left no event"))
}

/// What one live move's switch event states.
struct SwitchFigures {
    /// Guest memory streamed, MiB.
    mib: u64,
    /// The guest's stop by its source QEMU's measure (`downtime`), ms.
    qemu_downtime_ms: f64,
    /// Its whole pause, until its destination resumed it, ms, when stated.
    paused_ms: Option<f64>,
    /// Where the pause went, as far as stated.
    phases: Option<telvirt_model::api::PausePhases>,
    /// How long after the destination resumed the guest the move switched to it, ms, when
    /// stated.
    switched_after_resume_ms: Option<f64>,
}

/// The figures of the last switch event.
async fn switch_figures(api: &Api) -> Result<SwitchFigures> {
    let reason = switch_event(api, VNF).await?;
    let number_before = |suffix: &str| telvirt_model::api::figure_before(&reason, suffix);
    let mib = number_before(" MiB of guest memory")
        .with_context(|| format!("no guest memory figure in: {reason}"))?;
    let qemu_downtime_ms = reason
        .split("the guest stopped for ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no downtime in: {reason}"))?;
    Ok(SwitchFigures {
        mib: mib as u64,
        qemu_downtime_ms,
        paused_ms: number_before(" ms until its destination resumed it"),
        phases: telvirt_model::api::PausePhases::stated_in(&reason),
        switched_after_resume_ms: number_before(&format!(
            " ms {}",
            telvirt_model::api::SWITCHED_AFTER_RESUME
        )),
    })
}

/// One live move from `from`: its total ms, what its switch event states and how many tries
/// broke on their arrival before it (each asked again, three tries in all).
async fn live_move(api: &Api, from: &str) -> Result<(f64, SwitchFigures, u32)> {
    let to = other(from);
    let asked = Instant::now();
    let mut broken = 0;
    loop {
        let broken_before = events_saying(api, VNF, ARRIVAL_BROKEN).await?;
        let _: serde_json::Value = answer(
            api.request(reqwest::Method::POST, &format!("/v1/vnfs/{VNF}/migrate"))
                .json(&serde_json::json!({ "to": to })),
        )
        .await?;
        // Moved, or broken on its arrival: running on at the source after its event.
        let ended = poll_until(Duration::from_secs(240), "the vm moved", || async {
            match running_alone(api).await {
                Some(h) if h == to => true,
                Some(h) if h == from => events_saying(api, VNF, ARRIVAL_BROKEN)
                    .await
                    .is_ok_and(|n| n > broken_before),
                _ => false,
            }
        })
        .await;
        with_state(api, ended).await?;
        if running_alone(api).await.as_deref() == Some(to) {
            let total = ms(asked.elapsed());
            return Ok((total, switch_figures(api).await?, broken));
        }
        broken += 1;
        if broken == 3 {
            bail!("vnf {VNF}'s guest broke on its arrival at {to} in each of 3 moves");
        }
    }
}

async fn cold_move(api: &Api, from: &str, yaml: &str) -> Result<f64> {
    let to = other(from);
    cordon(api, from, true).await?;
    let asked = Instant::now();
    let _: serde_json::Value =
        answer(api.request(reqwest::Method::DELETE, &format!("/v1/vnfs/{VNF}"))).await?;
    let deleted = poll_until(Duration::from_secs(120), "the vm deleted", || async {
        api.json(&format!("/v1/vnfs/{VNF}")).await.is_err()
    })
    .await;
    with_state(api, deleted).await?;
    post_yaml(api, "/v1/vnfs", yaml.to_owned()).await?;
    let ran = poll_until(Duration::from_secs(240), "the new vm running", || async {
        running_alone(api).await.as_deref() == Some(to)
    })
    .await;
    let total = ms(asked.elapsed());
    cordon(api, from, false).await?;
    with_state(api, ran).await?;
    Ok(total)
}

fn figures(
    setup: &'static str,
    total: Vec<f64>,
    outage: Vec<f64>,
    qemu_downtime: Vec<f64>,
    mib: Vec<u64>,
) -> VmMoveFigures {
    VmMoveFigures {
        setup,
        total_p50_ms: median(total.iter().copied()),
        outage_p50_ms: median(outage.iter().copied()),
        qemu_downtime_p50_ms: median(qemu_downtime.iter().copied()),
        total_ms: total,
        outage_ms: outage,
        qemu_downtime_ms: qemu_downtime,
        outage_unmeasured: 0,
        streamed_mib: mib,
        stream: None,
    }
}

/// The stream's firewalls fwa and fwb running on h3 (h1 and h2 cordoned meanwhile), then h3
/// cordoned: no move goes there.
async fn place_firewalls(api: &Api, firewall: &str) -> Result<()> {
    cordon(api, "h1", true).await?;
    cordon(api, "h2", true).await?;
    for fw in ["fwa", "fwb"] {
        post_yaml(
            api,
            "/v1/vnfs",
            crate::bench_cluster::descriptor(fw, 1, firewall),
        )
        .await?;
    }
    poll_until(
        Duration::from_secs(60),
        "fwa and fwb running on h3",
        || async {
            let mut both = true;
            for fw in ["fwa", "fwb"] {
                both &= api
                    .json(&format!("/v1/vnfs/{fw}"))
                    .await
                    .is_ok_and(|v| v["phase"] == "Running" && v["placements"][0]["host"] == "h3");
            }
            both
        },
    )
    .await?;
    cordon(api, "h3", true).await?;
    cordon(api, "h1", false).await
}

pub async fn run_vm_move_bench(
    args: &VmMoveArgs,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<VmMoveReport> {
    let dir = crate::bench_control::scratch_dir("vm-move")?;
    let report = {
        // Dropped after the agents (whose processes end with `moves`), so none starts a QEMU
        // again, and before the directory goes.
        let _sweep = crate::bench_control::QemuSweep(
            ["h1", "h2"]
                .map(|h| {
                    (
                        dir.join(format!("agent-{h}/instances/{VNF}")),
                        VNF.to_owned(),
                    )
                })
                .to_vec(),
        );
        moves(&dir, args, progress).await
    };
    let _ = std::fs::remove_dir_all(&dir);
    report
}

/// The controller, both hosts and the moves, in `dir`.
async fn moves(
    dir: &std::path::Path,
    args: &VmMoveArgs,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<VmMoveReport> {
    let http = crate::bench_handover::bench_http()?
        .timeout(Duration::from_secs(30))
        .build()?;
    let cache = args.image.cache()?;
    let (controller, api) =
        embedded_controller(dir, &http, &["--host-lease-ttl-ms", "1000"]).await?;
    let mut hosts = Hosts {
        dir: dir.to_path_buf(),
        controllers: controller.api.clone(),
        heartbeat_ms: 250,
        agents: Vec::new(),
        tunnels: true,
        vm_image_cache: Some(cache),
        qemu: args.qemu.clone(),
        control: args.agents,
    };
    // With a stream, h3 holds its firewalls, generator and sink, and is cordoned for the moves.
    let host_count = if args.stream_pps.is_some() { 3 } else { 2 };
    let firewall = lay_out_hosts(&api, &mut hosts, host_count).await?;
    // An agent without its vm runtime runs none: said now, not after the VNF waited for a host.
    for host in ["h1", "h2"] {
        let v = api.json(&format!("/v1/hosts/{host}")).await?;
        let offers: Vec<&str> = v["runtimes"]
            .as_array()
            .map(|all| all.iter().filter_map(|r| r.as_str()).collect())
            .unwrap_or_default();
        if !offers.contains(&"vm") {
            // The agent's log says why (its directory goes with the benchmark's).
            let log =
                std::fs::read_to_string(Hosts::log_path(&hosts.dir, host)).unwrap_or_default();
            let said = format!("{}: ", crate::vm::VM_RUNTIME_UNAVAILABLE);
            let why = log
                .lines()
                .rev()
                .find_map(|l| l.split_once(&said).map(|(_, why)| why))
                .unwrap_or("its log says nothing about it");
            bail!(
                "host {host}'s agent offers no vm runtime (only {}): {why}",
                offers.join(", ")
            );
        }
    }
    let total_steps = 2 * u64::from(args.rounds) + 1;
    if args.stream_pps.is_some() {
        place_firewalls(&api, &firewall).await?;
    }
    cordon(&api, "h2", true).await?;
    let yaml = descriptor(
        args.memory_mib,
        args.move_encryption,
        args.stream_pps.is_some(),
    );
    post_yaml(&api, "/v1/vnfs", yaml.clone()).await?;
    let ran = poll_until(Duration::from_secs(300), "the vm running on h1", || async {
        running_alone(&api).await.as_deref() == Some("h1")
    })
    .await;
    with_state(&api, ran).await?;
    cordon(&api, "h2", false).await?;
    if let Some(rate) = args.stream_pps {
        // The generator and sink go with the firewalls, on h3.
        let through = (format!("{VNF}.n3"), format!("{VNF}.n6"));
        let network = stream_network(rate, 1, (&through.0, &through.1));
        post_yaml(&api, "/v1/networks", network).await?;
        poll_until(
            Duration::from_secs(120),
            "the stream across the vm at the sink",
            || async {
                SinkReading::read(&api)
                    .await
                    .is_ok_and(|r| r.received > rate)
            },
        )
        .await?;
    }
    let before_stream = || async {
        match args.stream_pps {
            Some(_) => SinkReading::read(&api).await.map(Some),
            None => Ok(None),
        }
    };
    let cost = |before: Option<SinkReading>| {
        let api = &api;
        async move {
            match (before, args.stream_pps) {
                (Some(before), Some(rate)) => stream_cost(api, &before, rate, dir, host_count)
                    .await
                    .map(Some),
                _ => Ok(None),
            }
        }
    };
    let (mut live_stream, mut cold_stream) = (Vec::new(), Vec::new());
    let mut beyond_pause_ms = Vec::new();
    let mut arrivals_broken = 0;
    progress(1, total_steps);
    let (mut live_total, mut live_outage, mut live_mib) = (Vec::new(), Vec::new(), Vec::new());
    let mut live_downtime = Vec::new();
    let mut unmeasured = 0;
    let mut phases: [Vec<f64>; 4] = Default::default();
    let mut switched_after_resume_ms = Vec::new();
    let (mut cold_total, mut cold_outage) = (Vec::new(), Vec::new());
    let mut at = "h1".to_owned();
    let (mut worker_cpu, mut live_time) = (Duration::ZERO, Duration::ZERO);
    for i in 0..args.rounds {
        let before = before_stream().await?;
        let (workers_from, since) = (hosts.worker_cpu()?, Instant::now());
        let (total, moved, broken) = live_move(&api, &at).await?;
        if let Some((loss, lost_where)) = cost(before).await? {
            // Only a move of one try: the loss spans every try, the pause only the last's.
            if broken == 0 {
                beyond_pause_ms.extend(moved.paused_ms.map(|p| loss.outage_ms - p));
            }
            live_stream.push((loss, lost_where));
        }
        worker_cpu += hosts.worker_cpu()?.saturating_sub(workers_from);
        live_time += since.elapsed();
        arrivals_broken += broken;
        live_total.push(total);
        match moved.paused_ms {
            Some(p) => live_outage.push(p),
            None => unmeasured += 1,
        }
        if let Some(p) = moved.phases {
            let each = [
                p.stopping_ms,
                p.commit_point_ms,
                Some(p.final_copy_ms),
                p.destination_ms,
            ];
            for (all, one) in phases.iter_mut().zip(each) {
                all.extend(one);
            }
        }
        switched_after_resume_ms.extend(moved.switched_after_resume_ms);
        live_downtime.push(moved.qemu_downtime_ms);
        live_mib.push(moved.mib);
        at = other(&at).to_owned();
        progress(2 + 2 * u64::from(i), total_steps);
        let before = before_stream().await?;
        let total = cold_move(&api, &at, &yaml).await?;
        cold_stream.extend(cost(before).await?);
        // The guest is gone from the delete until the new one runs.
        cold_total.push(total);
        cold_outage.push(total);
        at = other(&at).to_owned();
        progress(3 + 2 * u64::from(i), total_steps);
    }
    let dataplane_worker_cores =
        worker_cpu.as_secs_f64() / live_time.as_secs_f64().max(f64::EPSILON);
    let control_applied = hosts.control_applied();
    // Its agent stops the guest; the sweep kills whatever is left.
    let _ = answer::<serde_json::Value>(
        api.request(reqwest::Method::DELETE, &format!("/v1/vnfs/{VNF}")),
    )
    .await;
    let _ = poll_until(Duration::from_secs(30), "the vm deleted", || async {
        api.json(&format!("/v1/vnfs/{VNF}")).await.is_err()
    })
    .await;
    let mut live = figures(
        "live move (vnf migrate: the guest streams and goes on)",
        live_total,
        live_outage,
        live_downtime,
        live_mib,
    );
    live.outage_unmeasured = unmeasured;
    let with_stream = args.stream_pps.is_some();
    live.stream = with_stream.then(|| StreamFigures {
        beyond_pause_ms,
        ..StreamFigures::of(live_stream)
    });
    let [stopping_ms, commit_point_ms, final_copy_ms, destination_ms] = phases;
    let stated_p50 = |v: &Vec<f64>| median_if_any(v.iter().copied());
    let pause_phases = PausePhaseFigures {
        stopping_p50_ms: stated_p50(&stopping_ms),
        commit_point_p50_ms: stated_p50(&commit_point_ms),
        final_copy_p50_ms: stated_p50(&final_copy_ms),
        destination_p50_ms: stated_p50(&destination_ms),
        stopping_ms,
        commit_point_ms,
        final_copy_ms,
        destination_ms,
    };
    let mut cold = figures(
        "cold move (deleted, created on the other host: a new guest boots)",
        cold_total,
        cold_outage,
        Vec::new(),
        Vec::new(),
    );
    cold.stream = with_stream.then(|| StreamFigures::of(cold_stream));
    if live.outage_ms.is_empty() {
        bail!("no live move's whole pause was measured ({unmeasured} moves' events stated none)");
    }
    Ok(VmMoveReport {
        measured: format!(
            "the default guest (1 vCPU) moved between two agents' hosts on loopback through a controller, live against cold, alternating{}",
            args.stream_pps.map_or_else(String::new, |rate| format!(
                "; a stream of {rate} frames/s through its two vhost-user NICs (gen -> fwa -> {VNF} -> fwb -> sink on a third host h3), its loss counted by the sink from before each move until it ran {} s again",
                STREAM_SETTLE.as_secs()
            ))
        ),
        qemu: args.qemu.as_ref().map_or_else(
            || "qemu-system-x86_64 on PATH".to_owned(),
            |q| q.display().to_string(),
        ),
        rounds: args.rounds,
        memory_mib: args.memory_mib,
        move_encryption: args.move_encryption,
        control_priority: args.agents.control_priority,
        control_nice: args.agents.control_nice,
        control_applied,
        total_ratio: ratio(live.total_p50_ms, cold.total_p50_ms),
        outage_ratio: ratio(live.outage_p50_ms, cold.outage_p50_ms),
        stream_pps: args.stream_pps,
        stream_outage_ratio: live
            .stream
            .as_ref()
            .zip(cold.stream.as_ref())
            .map(|(l, c)| ratio(l.outage_p50_ms, c.outage_p50_ms)),
        arrivals_broken,
        live,
        cold,
        pause_phases,
        switched_after_resume_p50_ms: median_if_any(switched_after_resume_ms.iter().copied()),
        switched_after_resume_ms,
        dataplane_worker_cores,
        worker_idle_spin_us: std::env::var(crate::cli::WORKER_IDLE_SPIN_ENV)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(crate::cli::IDLE_SPIN_DEFAULT_US),
    })
}

pub fn vm_move_bench(format: Output, args: VmMoveArgs) -> Result<()> {
    let progress = Progress::new(format, "vm-move");
    let report_progress = |d, t| progress.update(d, t);
    let bench = run_vm_move_bench(&args, &report_progress);
    let Some(r) = progress.run_bench(format, bench)? else {
        return Ok(());
    };
    println!("measured: {}", r.measured);
    println!(
        "agents' control threads ran at: {}",
        crate::bench_cluster::classes_line(&r.control_applied)
    );
    let rows: Vec<Vec<String>> = [&r.live, &r.cold]
        .iter()
        .map(|f| {
            vec![
                f.setup.to_owned(),
                format!("{:.0}", f.total_p50_ms),
                format!("{:.1}", f.outage_p50_ms),
                if f.qemu_downtime_ms.is_empty() {
                    "-".to_owned()
                } else {
                    format!("{:.0}", f.qemu_downtime_p50_ms)
                },
            ]
        })
        .collect();
    println!(
        "{}",
        output::table(
            &[
                "SET-UP",
                "TOTAL p50 ms",
                "GUEST STOPPED p50 ms",
                "QEMU DOWNTIME p50 ms"
            ],
            &rows
        )
    );
    println!(
        "live / cold: total {:.2}, guest stopped {:.3}",
        r.total_ratio, r.outage_ratio
    );
    if let (Some(rate), Some(live), Some(cold)) =
        (r.stream_pps, r.live.stream.as_ref(), r.cold.stream.as_ref())
    {
        println!(
            "the stream at {rate} frames/s lost p50 {:.1} ms live (max {:.1}), {:.1} ms cold (max {:.1}): live / cold {:.3}",
            live.outage_p50_ms,
            live.outage_max_ms,
            cold.outage_p50_ms,
            cold.outage_max_ms,
            r.stream_outage_ratio.unwrap_or_default()
        );
        if !live.beyond_pause_ms.is_empty() {
            println!(
                "the live moves cut it {:.1} ms longer than they paused the guest (median)",
                median(live.beyond_pause_ms.iter().copied())
            );
        }
    }
    if r.arrivals_broken > 0 {
        println!(
            "{} live moves' guests broke on their arrival and were asked again",
            r.arrivals_broken
        );
    }
    let p = &r.pause_phases;
    if let Some(final_copy_ms) = p.final_copy_p50_ms {
        let median = telvirt_model::api::PausePhases {
            stopping_ms: p.stopping_p50_ms,
            commit_point_ms: p.commit_point_p50_ms,
            final_copy_ms,
            destination_ms: p.destination_p50_ms,
        };
        println!(
            "the live pause, medians of {} moves: {median}",
            p.final_copy_ms.len()
        );
    }
    if let Some(ms) = r.switched_after_resume_p50_ms {
        println!(
            "switched to the destination {ms:.1} ms after it resumed the guest (median of {} moves)",
            r.switched_after_resume_ms.len()
        );
    }
    println!(
        "the agents' data-plane workers used {:.2} cores during the live moves (idle spin {} µs)",
        r.dataplane_worker_cores, r.worker_idle_spin_us
    );
    Ok(())
}
