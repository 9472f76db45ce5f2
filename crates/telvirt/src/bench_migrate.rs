//! `telvirt bench migrate`: a wasm NAT under a generator stream moves to another host, with
//! real controller and agent processes.
//!
//! Owns the move benchmark: the hosts and stream of `bench failover` (gen -> fwa -> nat -> fwb
//! -> sink, the firewalls on h3, the NAT alone on h1), then `POST /v1/vnfs/nat/migrate {"to":
//! "h2"}`, timed from the request until the API shows the NAT active on h2 and running
//! (`total_ms`), with the frames the sink missed (`lost_packets`: the sequence numbers below
//! the highest it saw that never came, counted across the move; `outage_ms` = lost / rate),
//! the sessions the destination found rather than made again (`sessions_kept_pct`) and the
//! bytes of state the source streamed (`state_bytes`), the source's freeze as its switch event
//! reports it (`downtime_us`) and the slowest a frame of the stream was meanwhile
//! (`delay_max_us`, from the sink's latency buckets), for each count of flows (the NAT's
//! state) and once more with idle sessions loaded through the map API (ADR 063) up to 100 MiB
//! of state. The baseline, in the same run: a cold move, what an operator does without live
//! migration (the NAT deleted on h1 and created again with only h2 open to it). Where it can
//! (root, iperf3), both moves also run under an iperf3 TCP flow between two namespaces pinned to
//! h4: whether the connection survived and its longest gap. Figures are of the wasm move only
//! (`bench vm-move` moves a vm). It must not measure anything in-process.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde::Serialize;
use telvirt_model::api::FreezePhases;

use crate::bench_cluster::Api;
use crate::bench_control::{ms, percentile};
use crate::bench_failover::{
    FailoverArgs, HOSTS, TCP_KILL_AT, TCP_SECONDS, THROUGH_NAT, TcpEvent, TcpRun, cordon, instance,
    nat, nat_setup, post_yaml, settle_for, stream, stream_back, stream_network, tcp_missing,
    tcp_round,
};
use crate::bench_handover::{answer, poll_until};
use crate::bench_ports::ratio;
use crate::bench_stream::{SinkReading, StreamLoss, lost_where};
use crate::cli::Output;
use crate::output;
use crate::progress::Progress;

#[derive(Args, Debug, Clone)]
pub struct MigrateArgs {
    /// Moves timed per set-up and state size (each starts a fresh set of processes)
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub rounds: u32,
    /// Packets per second of the stream
    #[arg(long, default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(100..=100_000))]
    pub rate_pps: u64,
    /// UDP flows of the stream, one state size per value (the NAT's sessions; at most 60,000,
    /// its ports)
    #[arg(long, value_delimiter = ',', default_values_t = vec![64u64, 24_000], value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub flows: Vec<u64>,
    /// MiB of idle sessions (24 bytes each, no reverse entries: no packet of theirs comes)
    /// loaded into the NAT's session table through the map API before the move, besides the
    /// flows' own: one more state size per value, at the largest count of flows (0: none)
    #[arg(long, value_delimiter = ',', default_values_t = vec![100u64], value_parser = clap::value_parser!(u64).range(0..=256))]
    pub loaded_mib: Vec<u64>,
    #[command(flatten)]
    pub agents: crate::control_threads::AgentPriorityArgs,
}

/// Bytes of one NAT session: its 5-tuple key and its value.
const SESSION_BYTES: u64 = 16 + 8;
/// Entries one map change carries (the API's most).
const LOAD_CHUNK: u64 = 65_536;
/// The controller's host lease in this benchmark (agents beat every quarter of it).
const MOVE_HOST_LEASE_TTL_MS: u64 = 3_000;

/// One move, timed from its request.
#[derive(Debug, Clone, Serialize)]
pub struct MoveRun {
    /// How the agents' control threads ran, read from `/proc` after the move
    /// ([`crate::bench_cluster::Hosts::control_applied`]); the report states them once.
    #[serde(skip)]
    pub control_applied: std::collections::BTreeSet<String>,
    pub total_ms: f64,
    /// Frames of the stream that never reached the sink (gaps in their sequence numbers; a
    /// frame still on its way is not one).
    pub lost_packets: u64,
    /// lost_packets at the stream's rate.
    pub outage_ms: f64,
    pub sessions_kept_pct: f64,
    /// The NAT's state before the move: every map's entries times their key and value bytes
    /// (0 for a cold move, which carries none).
    pub state_bytes: u64,
    /// A live move: from the source's freeze to the destination's acknowledgement of the last
    /// map updates, on the source's clock (its switch event); no instance processes packets
    /// meanwhile. A cold move: none (it runs nothing for `outage_ms` and more).
    pub downtime_us: Option<u64>,
    /// Where that freeze went at the source, as the switch event states it (none for a cold
    /// move, or when not stated).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub freeze_phases: Option<FreezePhases>,
    /// The upper bound of the slowest latency bucket (generator to sink, one clock) a frame
    /// of the stream fell into from the move's request until the stream settled after it:
    /// what the freeze and the hand-off cost a frame that was queued. `None`: slower than
    /// the last bound (1 s).
    pub delay_max_us: Option<u64>,
    /// When frames were lost: the stream network's `net show` table after the move (each
    /// link's counters, its drops among them), to see where.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lost_where: Option<String>,
}

/// One set-up's moves at one state size, with their medians.
#[derive(Debug, Clone, Serialize)]
pub struct MoveFigures {
    pub setup: &'static str,
    pub flows: u64,
    /// MiB of idle sessions loaded besides the flows'.
    pub loaded_mib: u64,
    pub runs: Vec<MoveRun>,
    pub total_p50_ms: f64,
    pub outage_p50_ms: f64,
    pub outage_max_ms: f64,
    pub lost_packets_max: u64,
    pub sessions_kept_pct_min: f64,
    pub state_bytes_max: u64,
    /// Over the moves whose downtime was reported; `None` for a cold move (or none reported).
    pub downtime_p50_us: Option<f64>,
    pub downtime_max_us: Option<u64>,
    /// Live moves whose downtime was not reported (no goal passes on them).
    pub downtime_unreported: u64,
    /// The median of each of the freezes' phases, over the moves that stated them (`None`:
    /// none did). Medians of parts: they need not add up to `downtime_p50_us`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub freeze_phases_p50_us: Option<FreezePhaseMedians>,
    /// The largest `delay_max_us` (`None`: a frame slower than 1 s).
    pub delay_max_us: Option<u64>,
}

/// The median of each phase of the live moves' freezes (`FreezePhases`), µs.
#[derive(Debug, Clone, Serialize)]
pub struct FreezePhaseMedians {
    /// From the freeze until the source's stream began its last batch.
    pub until_batch_us: f64,
    /// Taking that batch off the instance.
    pub take_us: f64,
    /// From sending it until the destination acknowledged it.
    pub exchange_us: f64,
}

impl FreezePhaseMedians {
    /// To the nearest µs, as `FreezePhases` (to be stated in its words).
    fn rounded(&self) -> FreezePhases {
        let us = |v: f64| v.round() as u64;
        FreezePhases {
            until_batch_us: us(self.until_batch_us),
            take_us: us(self.take_us),
            exchange_us: us(self.exchange_us),
        }
    }

    /// Of the runs' stated phases; `None` when no run stated them.
    fn of(phases: impl Iterator<Item = Option<FreezePhases>>) -> Option<Self> {
        let stated: Vec<FreezePhases> = phases.flatten().collect();
        if stated.is_empty() {
            return None;
        }
        let median = |part: fn(&FreezePhases) -> u64| {
            let mut v: Vec<f64> = stated.iter().map(|p| part(p) as f64).collect();
            v.sort_by(f64::total_cmp);
            percentile(&v, 0.5)
        };
        Some(Self {
            until_batch_us: median(|p| p.until_batch_us),
            take_us: median(|p| p.take_us),
            exchange_us: median(|p| p.exchange_us),
        })
    }
}

/// Both set-ups at one state size, and the ratios live / cold.
#[derive(Debug, Clone, Serialize)]
pub struct MoveComparison {
    pub flows: u64,
    pub loaded_mib: u64,
    pub live: MoveFigures,
    /// Baseline: delete on the source, create on the destination.
    pub cold: MoveFigures,
    pub total_ratio: f64,
    pub outage_ratio: f64,
}

/// The moves under an iperf3 TCP flow, both set-ups.
#[derive(Debug, Clone, Serialize)]
pub struct TcpMoves {
    pub measured: String,
    pub live: Vec<TcpRun>,
    /// Baseline: the cold move.
    pub cold: Vec<TcpRun>,
    pub live_gap_max_ms: f64,
    pub live_survived_all: bool,
    pub cold_survived_any: bool,
    /// The live moves' freezes under the flow (`live[].downtime_us`), median and largest of
    /// those reported, and how many were not.
    pub live_downtime_p50_us: Option<f64>,
    pub live_downtime_max_us: Option<u64>,
    pub live_downtime_unreported: u64,
    /// The median of each phase of those freezes (`None`: none stated them).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub live_freeze_phases_p50_us: Option<FreezePhaseMedians>,
}

#[derive(Debug, Clone, Serialize)]
pub struct MigrateReport {
    pub measured: String,
    pub rounds: u32,
    pub rate_pps: u64,
    /// The agents' SCHED_FIFO priority for their async control threads (`--control-priority`);
    /// none: SCHED_OTHER.
    pub control_priority: Option<u8>,
    /// The agents' nice value for those threads when not SCHED_FIFO (`--control-nice`);
    /// none: the agents' default (-10 where permitted).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub control_nice: Option<i8>,
    /// How the agents' async control threads ran in the runs, read from `/proc` (what the
    /// options above asked for applies only where the host permits it): each class seen once.
    pub control_applied: std::collections::BTreeSet<String>,
    pub sizes: Vec<MoveComparison>,
    /// The same moves under an iperf3 TCP flow (`None`: not measured here, see
    /// `tcp_missing`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpMoves>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcp_missing: Option<String>,
    /// The goal for wasm: no packet lost by a move.
    pub goal_no_packet_lost: bool,
    /// The goal for wasm: every live move's downtime at most 1 ms, at the sizes of
    /// the flows' own state (up to 1 MiB by default; not those with idle sessions loaded).
    pub goal_downtime_1ms: bool,
}

/// How the NAT moves from h1 to h2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum How {
    /// `POST /v1/vnfs/nat/migrate`: the state streams, then the traffic.
    Live,
    /// Deleted on h1, created again on h2.
    Cold,
}

/// One round: a fresh controller and four agents in `dir`, the stream of `flows` flows through
/// the NAT on h1, the NAT moved to h2 as `how` says.
async fn round(
    args: &MigrateArgs,
    (flows, loaded_mib): (u64, u64),
    dir: &Path,
    http: &reqwest::Client,
    how: How,
) -> Result<MoveRun> {
    let setup_args = FailoverArgs {
        rounds: 1,
        rate_pps: args.rate_pps,
        flows,
        // A move detects no failure: a lease as short as the failover benchmark's (600 ms)
        // only lets a heartbeat delayed on a loaded machine make the host not Ready, and the
        // controller then refuses its calls (503) and heals the NAT away.
        host_lease_ttl_ms: MOVE_HOST_LEASE_TTL_MS,
        agents: args.agents,
    };
    let idle = (loaded_mib << 20) / SESSION_BYTES;
    let sessions_max = (idle > 0)
        .then(|| u32::try_from(flows + idle + LOAD_CHUNK))
        .transpose()?;
    let s = nat_setup(&setup_args, dir, http, false, &["fwa", "fwb"], sessions_max).await?;
    let api = &s.api;
    if s.active != "h1" {
        bail!("the NAT was placed on {}, not h1", s.active);
    }
    post_yaml(
        api,
        "/v1/networks",
        stream_network(args.rate_pps, flows, THROUGH_NAT),
    )
    .await?;
    poll_until(Duration::from_secs(120), "every flow's session", || async {
        let sessions = api.json("/v1/vnfs/nat/maps").await.ok().and_then(|m| {
            m.as_array()?.iter().find(|m| m["name"] == "sessions")?["entries"].as_u64()
        });
        sessions == Some(flows) && stream(api).await.is_ok_and(|(_, received)| received > 0)
    })
    .await?;
    load_idle_sessions(api, idle).await?;
    let (sent0, received0) = stream(api).await?;
    let before = SinkReading::read(api).await?;
    let state_bytes = match how {
        How::Live => map_bytes(api).await?,
        How::Cold => 0,
    };
    let asked = Instant::now();
    match how {
        How::Live => live_move(api).await?,
        How::Cold => cold_move(api, &s.nat_yaml).await?,
    }
    let total = ms(asked.elapsed());
    let settle = settle_for(flows, args.rate_pps);
    let (_, created) = stream_back(api, (sent0, received0), settle).await?;
    let after = SinkReading::read(api).await?;
    let loss = StreamLoss::between(&before, &after, args.rate_pps);
    let (downtime_us, freeze_phases) = match how {
        How::Live => freeze(api).await?,
        How::Cold => (None, None),
    };
    Ok(MoveRun {
        control_applied: s.hosts.control_applied(),
        total_ms: total,
        lost_packets: loss.lost_packets,
        outage_ms: loss.outage_ms,
        sessions_kept_pct: 100.0 * flows.saturating_sub(created) as f64 / flows as f64,
        state_bytes,
        downtime_us,
        freeze_phases,
        delay_max_us: loss.delay_max_us,
        lost_where: (loss.lost_packets > 0).then(|| lost_where(&after.table, dir, HOSTS)),
    })
}

/// Loads `count` idle sessions into the NAT's session table, 65,536 a change: keys of
/// 100.64.0.0/10 to 198.51.100.10:443 over TCP (none of the stream's flows), values a public
/// port and a zero creation time.
async fn load_idle_sessions(api: &Api, count: u64) -> Result<()> {
    let mut next = 0u64;
    while next < count {
        let end = (next + LOAD_CHUNK).min(count);
        let put: Vec<serde_json::Value> = (next..end)
            .map(|i| {
                let sport = 40_000 + (i >> 22);
                let key = format!(
                    "64{:02x}{:02x}{:02x}c633640a{sport:04x}01bb06000000",
                    64 | ((i >> 16) & 63),
                    (i >> 8) & 255,
                    i & 255
                );
                let value = format!("{:04x}000000000000", 1024 + i % 64_512);
                serde_json::json!({ "key": key, "value": value })
            })
            .collect();
        let _: serde_json::Value = answer(
            api.request(reqwest::Method::POST, "/v1/vnfs/nat/maps/sessions/entries")
                .json(&serde_json::json!({ "put": put })),
        )
        .await
        .with_context(|| format!("loading idle sessions {next}..{end}"))?;
        next = end;
    }
    Ok(())
}

/// The median and the largest of the live moves' reported downtimes (`None`: none reported),
/// and how many moves' downtimes were not reported. A cold move has none: it counts nowhere.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Downtimes {
    p50_us: Option<f64>,
    max_us: Option<u64>,
    unreported: u64,
}

impl Downtimes {
    fn of(downtimes: impl Iterator<Item = Option<u64>>, live: bool) -> Self {
        let mut reported = Vec::new();
        let mut unreported = 0;
        for d in downtimes {
            match d {
                Some(d) => reported.push(d),
                None if live => unreported += 1,
                None => {}
            }
        }
        Downtimes {
            p50_us: crate::bench_ports::median_if_any(reported.iter().map(|&d| d as f64)),
            max_us: reported.iter().copied().max(),
            unreported,
        }
    }

    /// Every live move reported, and the largest within `limit_us`.
    fn all_within(&self, limit_us: u64) -> bool {
        self.unreported == 0 && self.max_us.is_some_and(|d| d <= limit_us)
    }

    /// `p50 / max`, and how many went unreported.
    fn show(&self, unit: &str) -> String {
        let known = match (self.p50_us, self.max_us) {
            (Some(p50), Some(max)) => format!("{p50:.0} / {max}{unit}"),
            _ => "-".to_owned(),
        };
        match self.unreported {
            0 => known,
            n => format!("{known} ({n} unreported)"),
        }
    }
}

impl MoveFigures {
    /// Its downtime fields as one.
    fn downtimes(&self) -> Downtimes {
        Downtimes {
            p50_us: self.downtime_p50_us,
            max_us: self.downtime_max_us,
            unreported: self.downtime_unreported,
        }
    }
}

impl TcpMoves {
    /// Its live moves' downtime fields as one.
    fn live_downtimes(&self) -> Downtimes {
        Downtimes {
            p50_us: self.live_downtime_p50_us,
            max_us: self.live_downtime_max_us,
            unreported: self.live_downtime_unreported,
        }
    }
}

/// The source's freeze as the NAT's last switch event reports it, in microseconds (`None`:
/// the event says its time was not reported, as when a move's deadline switched it, or that
/// nothing streamed: the move is kept, its downtime unknown, so no goal passes on it), and
/// its phases when the event states them.
pub(crate) async fn freeze(api: &Api) -> Result<(Option<u64>, Option<FreezePhases>)> {
    let reason = crate::bench_vm_move::switch_event(api, "nat").await?;
    Ok((frozen_us_in(&reason)?, FreezePhases::stated_in(&reason)))
}

/// The freeze a switch event's `reason` states, µs: `None` when it says the time was not
/// reported or nothing streamed; an error for words it does not know (the event's wording
/// changed: the benchmark must say so rather than count every move unknown).
fn frozen_us_in(reason: &str) -> Result<Option<u64>> {
    if reason.contains("frozen for an unreported time") || reason.contains("(nothing streamed)") {
        return Ok(None);
    }
    reason
        .split_once("frozen for ")
        .and_then(|(_, after)| telvirt_model::api::figure_before(after, " µs"))
        .map(|us| Some(us as u64))
        .with_context(|| format!("no freeze time in: {reason}"))
}

/// Whether the NAT runs on `host` as its only instance.
fn runs_alone_on(v: &serde_json::Value, host: &str) -> bool {
    instance(v, "active").is_some_and(|(h, running)| running && h == host)
        && v["placements"].as_array().is_some_and(|p| p.len() == 1)
        && v.get("migration").is_none()
}

/// The NAT's state: every map's entries times their key and value bytes.
async fn map_bytes(api: &Api) -> Result<u64> {
    let maps = api.json("/v1/vnfs/nat/maps").await?;
    Ok(maps.as_array().map_or(0, |all| {
        all.iter()
            .map(|m| {
                let size =
                    m["key_size"].as_u64().unwrap_or(0) + m["value_size"].as_u64().unwrap_or(0);
                m["entries"].as_u64().unwrap_or(0) * size
            })
            .sum()
    }))
}

/// Moves the NAT to h2 with the API's move, until the API shows it there alone.
pub(crate) async fn live_move(api: &Api) -> Result<()> {
    let _: serde_json::Value = answer(
        api.request(reqwest::Method::POST, "/v1/vnfs/nat/migrate")
            .json(&serde_json::json!({ "to": "h2" })),
    )
    .await?;
    poll_until(Duration::from_secs(120), "the NAT moved to h2", || async {
        nat(api).await.is_some_and(|v| runs_alone_on(&v, "h2"))
    })
    .await
}

/// Moves the NAT to h2 the cold way: deleted, then created again with only h2 open to it.
pub(crate) async fn cold_move(api: &Api, nat_yaml: &str) -> Result<()> {
    for h in ["h1", "h3", "h4"] {
        cordon(api, h, true).await?;
    }
    let _: serde_json::Value = answer(api.request(reqwest::Method::DELETE, "/v1/vnfs/nat")).await?;
    poll_until(Duration::from_secs(60), "the NAT deleted", || async {
        nat(api).await.is_none()
    })
    .await?;
    post_yaml(api, "/v1/vnfs", nat_yaml.to_owned()).await?;
    let placed = poll_until(Duration::from_secs(60), "the NAT running on h2", || async {
        nat(api).await.is_some_and(|v| runs_alone_on(&v, "h2"))
    })
    .await;
    if let Err(e) = placed {
        let shown = nat(api).await.unwrap_or_default();
        bail!("the cold move: {e:#}; the NAT: {shown}");
    }
    Ok(())
}

/// One set-up's figures at one state size (`live`: its moves report a downtime).
fn figures(
    (setup, live): (&'static str, bool),
    (flows, loaded_mib): (u64, u64),
    runs: Vec<MoveRun>,
) -> MoveFigures {
    let sorted = |f: &dyn Fn(&MoveRun) -> f64| {
        let mut v: Vec<f64> = runs.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v
    };
    let outage = sorted(&|r| r.outage_ms);
    let downtimes = Downtimes::of(runs.iter().map(|r| r.downtime_us), live);
    MoveFigures {
        setup,
        flows,
        loaded_mib,
        total_p50_ms: percentile(&sorted(&|r| r.total_ms), 0.5),
        outage_p50_ms: percentile(&outage, 0.5),
        outage_max_ms: outage.last().copied().unwrap_or_default(),
        lost_packets_max: runs.iter().map(|r| r.lost_packets).max().unwrap_or(0),
        sessions_kept_pct_min: runs
            .iter()
            .map(|r| r.sessions_kept_pct)
            .fold(100.0, f64::min),
        state_bytes_max: runs.iter().map(|r| r.state_bytes).max().unwrap_or(0),
        downtime_p50_us: downtimes.p50_us,
        downtime_max_us: downtimes.max_us,
        downtime_unreported: downtimes.unreported,
        freeze_phases_p50_us: FreezePhaseMedians::of(runs.iter().map(|r| r.freeze_phases)),
        delay_max_us: runs
            .iter()
            .map(|r| r.delay_max_us)
            .collect::<Option<Vec<u64>>>()
            .and_then(|d| d.into_iter().max()),
        runs,
    }
}

pub async fn run_migrate_bench(
    args: &MigrateArgs,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<MigrateReport> {
    let dir = crate::bench_control::scratch_dir("migrate")?;
    let http = crate::bench_handover::bench_http()?
        .timeout(Duration::from_secs(10))
        .build()?;
    let tcp_missing = tcp_missing();
    let tcp_rounds = if tcp_missing.is_none() {
        args.rounds
    } else {
        0
    };
    // Each count of flows alone, then the largest with each load of idle sessions.
    let most = args.flows.iter().copied().max().unwrap_or(1);
    let sizes_asked: Vec<(u64, u64)> = args
        .flows
        .iter()
        .map(|&f| (f, 0))
        .chain(
            args.loaded_mib
                .iter()
                .filter(|&&m| m > 0)
                .map(|&m| (most, m)),
        )
        .collect();
    let total = 2 * u64::from(args.rounds) * sizes_asked.len() as u64 + 2 * u64::from(tcp_rounds);
    progress(0, total);
    let result = async {
        let mut sizes = Vec::new();
        let mut done = 0;
        let (mut tcp_live, mut tcp_cold) = (Vec::new(), Vec::new());
        // The control classes every run saw (the runs go into their figures).
        let mut applied = std::collections::BTreeSet::new();
        let setup = FailoverArgs {
            rounds: 1,
            rate_pps: args.rate_pps,
            flows: 1,
            host_lease_ttl_ms: 600,
            agents: args.agents,
        };
        for i in 0..tcp_rounds {
            let at = |set: &str| dir.join(format!("tcp-{set}-{i}"));
            tcp_live.push(tcp_round(&setup, &at("live"), &http, TcpEvent::Move).await?);
            tcp_cold.push(tcp_round(&setup, &at("cold"), &http, TcpEvent::ColdMove).await?);
            done += 2;
            progress(done, total);
        }
        for &size in &sizes_asked {
            let (flows, loaded) = size;
            let (mut live, mut cold) = (Vec::new(), Vec::new());
            for i in 0..args.rounds {
                // Alternating, so both set-ups see the machine alike.
                let at = |set: &str| dir.join(format!("{set}-{flows}-{loaded}-{i}"));
                live.push(round(args, size, &at("live"), &http, How::Live).await?);
                cold.push(round(args, size, &at("cold"), &http, How::Cold).await?);
                done += 2;
                progress(done, total);
            }
            applied.extend(
                live.iter()
                    .chain(&cold)
                    .flat_map(|r| r.control_applied.iter().cloned()),
            );
            let live = figures(
                ("live move (state streamed, then the traffic)", true),
                size,
                live,
            );
            let cold = figures(
                ("cold move (deleted, created on the destination)", false),
                size,
                cold,
            );
            sizes.push(MoveComparison {
                flows,
                loaded_mib: loaded,
                total_ratio: ratio(live.total_p50_ms, cold.total_p50_ms),
                outage_ratio: ratio(live.outage_p50_ms, cold.outage_p50_ms),
                live,
                cold,
            });
        }
        Ok::<_, anyhow::Error>((sizes, tcp_live, tcp_cold, applied))
    }
    .await;
    let _ = std::fs::remove_dir_all(&dir);
    let (sizes, tcp_live, tcp_cold, mut control_applied) = result?;
    control_applied.extend(
        tcp_live
            .iter()
            .chain(&tcp_cold)
            .flat_map(|r| r.control_applied.iter().cloned()),
    );
    let tcp_downtimes = Downtimes::of(tcp_live.iter().map(|r| r.downtime_us), true);
    let tcp = tcp_missing.is_none().then(|| TcpMoves {
        measured: format!(
            "iperf3 TCP, {TCP_SECONDS} s with 100 ms intervals, from a client namespace to a server namespace through the NAT (the namespaces' veths pinned to h4), the NAT moved from h1 to h2 {} s into the flow",
            TCP_KILL_AT.as_secs()
        ),
        live_gap_max_ms: tcp_live.iter().map(|r| r.gap_ms).fold(0.0, f64::max),
        live_survived_all: tcp_live.iter().all(|r| r.survived),
        cold_survived_any: tcp_cold.iter().any(|r| r.survived),
        live_downtime_p50_us: tcp_downtimes.p50_us,
        live_downtime_max_us: tcp_downtimes.max_us,
        live_downtime_unreported: tcp_downtimes.unreported,
        live_freeze_phases_p50_us: FreezePhaseMedians::of(tcp_live.iter().map(|r| r.freeze_phases)),
        live: tcp_live,
        cold: tcp_cold,
    });
    Ok(MigrateReport {
        measured: format!(
            "4 telvirt agent processes on loopback tunnels under one telvirt controller (embedded store); stream gen -> fwa -> nat -> fwb -> sink at {} packets/s, the firewalls on h3, the NAT alone on h1, moved to h2; the API polled every 5 ms",
            args.rate_pps
        ),
        rounds: args.rounds,
        control_priority: args.agents.control_priority,
        control_nice: args.agents.control_nice,
        control_applied,
        rate_pps: args.rate_pps,
        goal_no_packet_lost: sizes.iter().all(|s| s.live.lost_packets_max == 0),
        goal_downtime_1ms: sizes
            .iter()
            .filter(|s| s.loaded_mib == 0)
            .all(|s| s.live.downtimes().all_within(1000)),
        sizes,
        tcp,
        tcp_missing,
    })
}

pub fn migrate_bench(format: Output, args: MigrateArgs) -> Result<()> {
    let progress = Progress::new(format, "migrate");
    let report_progress = |d, t| progress.update(d, t);
    let bench = run_migrate_bench(&args, &report_progress);
    let Some(r) = progress.run_bench(format, bench)? else {
        return Ok(());
    };
    println!("measured: {}", r.measured);
    println!(
        "agents' control threads ran at: {}",
        crate::bench_cluster::classes_line(&r.control_applied)
    );
    let row = |f: &MoveFigures| {
        vec![
            f.setup.to_owned(),
            if f.loaded_mib > 0 {
                format!("{} + {} MiB idle", f.flows, f.loaded_mib)
            } else {
                f.flows.to_string()
            },
            format!("{:.0}", f.total_p50_ms),
            format!("{:.1} / {:.1}", f.outage_p50_ms, f.outage_max_ms),
            f.lost_packets_max.to_string(),
            format!("{:.0}", f.sessions_kept_pct_min),
            f.state_bytes_max.to_string(),
            f.downtimes().show(""),
            f.delay_max_us
                .map_or_else(|| "> 1 s".to_owned(), |d| format!("≤ {d}")),
        ]
    };
    let rows: Vec<Vec<String>> = r
        .sizes
        .iter()
        .flat_map(|s| [row(&s.live), row(&s.cold)])
        .collect();
    println!(
        "{}",
        output::table(
            &[
                "SET-UP",
                "FLOWS",
                "TOTAL p50 ms",
                "OUTAGE p50/max ms",
                "LOST max",
                "SESSIONS KEPT min %",
                "STATE bytes",
                "DOWNTIME p50/max µs",
                "DELAY max µs",
            ],
            &rows,
        )
    );
    for s in &r.sizes {
        println!(
            "{} flows{}: live / cold total {:.2}, outage {:.2}",
            s.flows,
            if s.loaded_mib > 0 {
                format!(" + {} MiB of idle sessions", s.loaded_mib)
            } else {
                String::new()
            },
            s.total_ratio,
            s.outage_ratio
        );
        if let Some(p) = &s.live.freeze_phases_p50_us {
            println!("  live freezes, the median of each phase: {}", p.rounded());
        }
    }
    match (&r.tcp, &r.tcp_missing) {
        (Some(t), _) => println!(
            "TCP flow (iperf3): kept across every live move: {}, longest gap {:.0} ms (0: under iperf3's 100 ms); across a cold move: {}; live moves' downtime under the flow p50 / max: {}",
            t.live_survived_all,
            t.live_gap_max_ms,
            t.cold_survived_any,
            t.live_downtimes().show(" µs")
        ),
        (None, Some(why)) => println!("TCP flow not measured: {why}"),
        (None, None) => {}
    }
    let met = |yes: bool| if yes { "met" } else { "NOT met" };
    println!(
        "goal: no packet lost by a live move {}",
        met(r.goal_no_packet_lost)
    );
    println!(
        "goal: downtime at most 1 ms in every live move {}",
        met(r.goal_downtime_1ms)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreported_downtime_is_counted_and_fails_the_goal() {
        let all = Downtimes::of([Some(300), Some(100), Some(200)].into_iter(), true);
        assert_eq!(
            (all.p50_us, all.max_us, all.unreported),
            (Some(200.0), Some(300), 0)
        );
        assert!(all.all_within(1000));
        assert!(!all.all_within(299));
        // One move unreported: the others still give their median and largest, the goal fails.
        let one = Downtimes::of([Some(300), None, Some(100), Some(200)].into_iter(), true);
        assert_eq!(
            (one.p50_us, one.max_us, one.unreported),
            (Some(200.0), Some(300), 1)
        );
        assert!(!one.all_within(1000));
        assert_eq!(one.show(""), "200 / 300 (1 unreported)");
        // A cold move has no downtime to report.
        let cold = Downtimes::of([None, None].into_iter(), false);
        assert_eq!((cold.p50_us, cold.max_us, cold.unreported), (None, None, 0));
        assert!(!cold.all_within(1000));
        assert_eq!(cold.show(""), "-");
    }

    #[test]
    fn a_switch_events_freeze_is_read_or_unknown() {
        let moved = "moved from host h3 to host h4 (9 map updates streamed, the last after the source froze; frozen for 158 µs; 64 packets it queued meanwhile passed on)";
        assert_eq!(frozen_us_in(moved).unwrap(), Some(158));
        let unreported = "moved from host h1 to host h2 (9 map updates streamed, the last after the source froze; frozen for an unreported time; 0 packets it queued meanwhile passed on)";
        assert_eq!(frozen_us_in(unreported).unwrap(), None);
        // A switch with nothing streamed: kept, its downtime unknown (the run goes on).
        let nothing = "moved from host h1 to host h2 (nothing streamed)";
        assert_eq!(frozen_us_in(nothing).unwrap(), None);
        // Words it does not know: said, not counted as unknown.
        let err = frozen_us_in("moved from host h1 to host h2 (a freeze of 158 µs)").unwrap_err();
        assert!(err.to_string().contains("no freeze time in"), "{err}");
        // The phases, as the controller states them after the freeze, and none where it
        // states none.
        assert_eq!(FreezePhases::stated_in(moved), None);
        let phases = FreezePhases {
            until_batch_us: 500,
            take_us: 30,
            exchange_us: 200,
        };
        let stated = format!(
            "moved from host h2 to host h3 (9 map updates streamed, the last after the source froze; frozen for 730 µs ({phases}); 41 packets it queued meanwhile passed on)"
        );
        assert_eq!(frozen_us_in(&stated).unwrap(), Some(730));
        assert_eq!(FreezePhases::stated_in(&stated), Some(phases));
    }

    #[test]
    fn each_freeze_phase_has_its_own_median_over_the_moves_that_stated_it() {
        let p = |until_batch_us, take_us, exchange_us| {
            Some(FreezePhases {
                until_batch_us,
                take_us,
                exchange_us,
            })
        };
        let m = FreezePhaseMedians::of(
            [p(900, 5, 100), None, p(100, 7, 300), p(300, 9, 200)].into_iter(),
        )
        .unwrap();
        assert_eq!(
            (m.until_batch_us, m.take_us, m.exchange_us),
            (300.0, 7.0, 200.0)
        );
        assert!(FreezePhaseMedians::of([None, None].into_iter()).is_none());
    }
}
