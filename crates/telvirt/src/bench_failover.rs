//! `telvirt bench failover`: a NAT under a generator stream loses its host, with real
//! controller and agent processes.
//!
//! Owns the failover benchmark: four hosts h1..h4, each a `telvirt agent` process with a tunnel
//! address on loopback; the stream goes gen -> fwa -> nat -> fwb -> sink, the firewalls and the
//! generator and sink on h3, the NAT's active and standby on h1 and h2, h4 free for a new
//! standby. SIGKILL of the active's agent, then, from the kill: the host NotReady in the API
//! (`detect_ms`, the host lease), the NAT active elsewhere in the API (`flip_ms`; a pair's
//! standby sees its active's replication connection close and flips before that), the packets
//! the sink missed
//! (`lost_packets`, and `outage_ms` = lost / rate), the sessions the new active found rather
//! than made again (`sessions_kept_pct`, from the module's `sessions_created` counter) and a new
//! standby running (`reheal_ms`). The baseline, in the same run: the same NAT without a standby,
//! placed again by the healer (heal delay 0). It must not measure anything in-process.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde::Serialize;

use crate::bench_cluster::{
    Api, Hosts, descriptor, embedded_controller, lay_out_hosts, upload_example,
};
use crate::bench_control::{ms, percentile};
use crate::bench_handover::{answer, poll_until};
use crate::cli::Output;
use crate::output;
use crate::progress::Progress;

/// How often the API is polled while a failover runs: the figures' resolution.
const POLL: Duration = Duration::from_millis(10);
/// How long the stream runs after the NAT is back before the sink is read.
const SETTLE: Duration = Duration::from_secs(1);
/// Hosts of a round: h1 and h2 hold the NAT, h3 the stream, h4 is free.
const HOSTS: u32 = 4;

#[derive(Args, Debug, Clone)]
pub struct FailoverArgs {
    /// Kills timed per set-up (each round starts a fresh set of processes)
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub rounds: u32,
    /// Packets per second of the stream
    #[arg(long, default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(100..=100_000))]
    pub rate_pps: u64,
    /// UDP flows of the stream: the NAT's sessions
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub flows: u64,
    /// The controller's --host-lease-ttl-ms (agents beat every quarter of it): the detection
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(200..=60_000))]
    pub host_lease_ttl_ms: u64,
}

/// One kill, timed from the kill.
#[derive(Debug, Clone, Serialize)]
pub struct FailoverRun {
    pub detect_ms: f64,
    pub flip_ms: f64,
    pub lost_packets: u64,
    /// lost_packets at the stream's rate.
    pub outage_ms: f64,
    pub sessions_kept_pct: f64,
    /// Until a new standby runs on a third host (`None`: the set-up has no standby).
    pub reheal_ms: Option<f64>,
}

/// One set-up's kills and their medians.
#[derive(Debug, Clone, Serialize)]
pub struct FailoverFigures {
    pub setup: &'static str,
    pub runs: Vec<FailoverRun>,
    pub detect_p50_ms: f64,
    pub flip_p50_ms: f64,
    pub outage_p50_ms: f64,
    pub outage_max_ms: f64,
    pub lost_packets_max: u64,
    pub sessions_kept_pct_min: f64,
    pub reheal_max_ms: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct FailoverReport {
    pub measured: String,
    pub rounds: u32,
    pub rate_pps: u64,
    pub flows: u64,
    pub host_lease_ttl_ms: u64,
    pub pair: FailoverFigures,
    /// Baseline: the same NAT without a standby, placed again by the healer (heal delay 0).
    pub single: FailoverFigures,
    /// pair.outage_p50_ms / single.outage_p50_ms.
    pub outage_ratio: f64,
    /// Baseline: keepalived (VRRP, `advert_int 1`) between two namespaces, its master killed:
    /// until the backup holds the virtual address (`None`: not measured here, see
    /// `vrrp_missing`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vrrp: Option<crate::bench_vrrp::VrrpFigures>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vrrp_missing: Option<String>,
    /// pair flip max / VRRP flip max.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flip_ratio_to_vrrp: Option<f64>,
    pub goal_outage_le_50_ms: bool,
    pub goal_sessions_kept_100_pct: bool,
    pub goal_reheal_le_5000_ms: bool,
}

fn nat_descriptor(name: &str, module: &str, pair: bool) -> String {
    format!(
        "apiVersion: telvirt/v1\nkind: Vnf\nmetadata: {{ name: {name} }}\nspec:\n  runtime: wasm\n  cpu: {{ policy: shared, count: 1, group: nat }}\n{}  ports: [in, out]\n  wasm:\n    module: \"{module}\"\n    limits: {{ memory: 16MiB }}\n",
        if pair {
            "  redundancy: active-standby\n"
        } else {
            ""
        }
    )
}

async fn post_yaml(api: &Api, path: &str, body: String) -> Result<serde_json::Value> {
    answer(
        api.request(reqwest::Method::POST, path)
            .header("content-type", "application/yaml")
            .body(body),
    )
    .await
}

async fn cordon(api: &Api, host: &str, on: bool) -> Result<()> {
    let what = if on { "cordon" } else { "uncordon" };
    let _: serde_json::Value =
        answer(api.request(reqwest::Method::POST, &format!("/v1/hosts/{host}/{what}"))).await?;
    Ok(())
}

/// The NAT as the API shows it now (`None` while it cannot be read).
async fn nat(api: &Api) -> Option<serde_json::Value> {
    api.json("/v1/vnfs/nat").await.ok()
}

/// The host of VNF `v`'s instance in `role`, and whether it runs (the VNF's phase for the
/// active, its standby status for the standby).
fn instance(v: &serde_json::Value, role: &str) -> Option<(String, bool)> {
    let host = v["placements"]
        .as_array()?
        .iter()
        .find(|p| p["role"] == role)?["host"]
        .as_str()?
        .to_owned();
    let running = match role {
        "active" => v["phase"] == "Running",
        _ => v["standby"]["phase"] == "Running" && v["standby"]["host"] == host.as_str(),
    };
    Some((host, running))
}

/// Packets the generator sent and the sink received, from the network's first and last link
/// (both on h3, which stays up: their counters run for the whole round).
async fn stream(api: &Api) -> Result<(u64, u64)> {
    let n = api.json("/v1/networks/stream").await?;
    let links = &n["status"]["links"];
    match (links[0]["packets"].as_u64(), links[3]["packets"].as_u64()) {
        (Some(sent), Some(received)) => Ok((sent, received)),
        _ => bail!("network stream has no counters yet: {n}"),
    }
}

async fn counter(api: &Api, vnf: &str, name: &str) -> Result<u64> {
    let s = api.json(&format!("/v1/vnfs/{vnf}/stats")).await?;
    s["counters"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == name))
        .and_then(|c| c["value"].as_u64())
        .with_context(|| format!("vnf {vnf} has no counter {name}: {s}"))
}

/// One round: a fresh controller and four agents in `dir`, the stream through the NAT (a pair
/// when `pair`), the active's agent killed and the recovery timed.
async fn round(
    args: &FailoverArgs,
    dir: &Path,
    http: &reqwest::Client,
    pair: bool,
) -> Result<FailoverRun> {
    let ttl = args.host_lease_ttl_ms.to_string();
    let (controller, api) = embedded_controller(
        dir,
        http,
        &["--host-lease-ttl-ms", &ttl, "--heal-after-ms", "0"],
    )
    .await?;
    let mut hosts = Hosts {
        dir: dir.to_owned(),
        controllers: controller.api.clone(),
        heartbeat_ms: args.host_lease_ttl_ms / 4,
        agents: Vec::new(),
        tunnels: true,
    };
    let firewall = lay_out_hosts(&api, &mut hosts, HOSTS).await?;
    let nat_module = upload_example(&api, "nat").await?;
    // The firewalls (and so the generator and the sink) on h3.
    for h in ["h1", "h2", "h4"] {
        cordon(&api, h, true).await?;
    }
    for fw in ["fwa", "fwb"] {
        post_yaml(&api, "/v1/vnfs", descriptor(fw, 1, &firewall)).await?;
    }
    // The NAT's active on h1 (and its standby on h2); h4 stays free until the kill.
    cordon(&api, "h3", true).await?;
    cordon(&api, "h1", false).await?;
    if pair {
        cordon(&api, "h2", false).await?;
    }
    post_yaml(&api, "/v1/vnfs", nat_descriptor("nat", &nat_module, pair)).await?;
    poll_until(Duration::from_secs(60), "the NAT running", || async {
        nat(&api).await.is_some_and(|v| {
            instance(&v, "active").is_some_and(|(_, r)| r)
                && (!pair || instance(&v, "standby").is_some_and(|(_, r)| r))
        })
    })
    .await?;
    let placed = nat(&api).await.context("the NAT cannot be read")?;
    let (active, _) = instance(&placed, "active").context("the NAT has no active")?;
    let standby = instance(&placed, "standby").map(|(h, _)| h);
    for h in ["h2", "h4"] {
        cordon(&api, h, false).await?;
    }
    post_yaml(
        &api,
        "/v1/networks",
        format!(
            "apiVersion: telvirt/v1\nkind: Network\nmetadata: {{ name: stream }}\nspec:\n  nodes:\n    - {{ name: gen, kind: generator, rate_pps: {}, flows: {} }}\n    - {{ name: sink, kind: sink }}\n  links:\n    - gen.out -> fwa.in\n    - fwa.out -> nat.in\n    - nat.out -> fwb.in\n    - fwb.out -> sink.in\n",
            args.rate_pps, args.flows
        ),
    )
    .await?;
    // Every flow has its session, on the standby too.
    poll_until(
        Duration::from_secs(60),
        "the stream through the NAT",
        || async {
            let sessions = api.json("/v1/vnfs/nat/maps").await.ok().and_then(|m| {
                m.as_array()?.iter().find(|m| m["name"] == "sessions")?["entries"].as_u64()
            });
            let replicated = !pair
                || api.json("/v1/vnfs/nat").await.is_ok_and(|v| {
                    v["replication"]["state"] == "synced"
                        && v["replication"]["updates"].as_u64() >= Some(2 * args.flows)
                });
            sessions == Some(args.flows)
                && replicated
                && stream(&api).await.is_ok_and(|(_, received)| received > 0)
        },
    )
    .await?;
    let (sent0, received0) = stream(&api).await?;

    let index = active
        .strip_prefix('h')
        .and_then(|n| n.parse::<usize>().ok())
        .and_then(|n| n.checked_sub(1))
        .context("the active's host is not one of h1..h4")?;
    let killed = Instant::now();
    hosts.agents[index].kill();
    let (mut detect, mut flip, mut reheal) = (None, None, None);
    while detect.is_none() || flip.is_none() || (pair && reheal.is_none()) {
        if killed.elapsed() > Duration::from_secs(60) {
            bail!("the NAT did not recover within 60 s of its host's failure");
        }
        if detect.is_none() && api.host_status(&active).await.as_deref() == Some("NotReady") {
            detect = Some(ms(killed.elapsed()));
        }
        // One read of the NAT per poll serves both figures.
        if let Some(v) = nat(&api).await {
            if flip.is_none() && instance(&v, "active").is_some_and(|(h, _)| h != active) {
                flip = Some(ms(killed.elapsed()));
            }
            if pair
                && reheal.is_none()
                && instance(&v, "standby").is_some_and(|(h, running)| {
                    running && h != active && Some(&h) != standby.as_ref()
                })
            {
                reheal = Some(ms(killed.elapsed()));
            }
        }
        tokio::time::sleep(POLL).await;
    }
    // The stream runs again through the new active; then the sink is read.
    poll_until(
        Duration::from_secs(60),
        "the stream back at the sink",
        || async {
            stream(&api)
                .await
                .is_ok_and(|(_, received)| received > received0)
        },
    )
    .await?;
    tokio::time::sleep(SETTLE).await;
    let created = counter(&api, "nat", "sessions_created").await?;
    let (sent1, received1) = stream(&api).await?;
    let lost = (sent1 - sent0).saturating_sub(received1 - received0);
    drop(hosts);
    drop(controller);
    Ok(FailoverRun {
        detect_ms: detect.unwrap_or_default(),
        flip_ms: flip.unwrap_or_default(),
        lost_packets: lost,
        outage_ms: lost as f64 * 1000.0 / args.rate_pps as f64,
        sessions_kept_pct: 100.0 * args.flows.saturating_sub(created) as f64 / args.flows as f64,
        reheal_ms: reheal,
    })
}

fn figures(setup: &'static str, runs: Vec<FailoverRun>) -> FailoverFigures {
    let sorted = |f: &dyn Fn(&FailoverRun) -> f64| {
        let mut v: Vec<f64> = runs.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v
    };
    let outage = sorted(&|r| r.outage_ms);
    FailoverFigures {
        setup,
        detect_p50_ms: percentile(&sorted(&|r| r.detect_ms), 0.5),
        flip_p50_ms: percentile(&sorted(&|r| r.flip_ms), 0.5),
        outage_p50_ms: percentile(&outage, 0.5),
        outage_max_ms: outage.last().copied().unwrap_or_default(),
        lost_packets_max: runs
            .iter()
            .map(|r| r.lost_packets)
            .max()
            .unwrap_or_default(),
        sessions_kept_pct_min: runs
            .iter()
            .map(|r| r.sessions_kept_pct)
            .fold(100.0, f64::min),
        reheal_max_ms: runs.iter().filter_map(|r| r.reheal_ms).reduce(f64::max),
        runs,
    }
}

pub async fn run_failover_bench(
    args: &FailoverArgs,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<FailoverReport> {
    let dir = crate::bench_control::scratch_dir("failover")?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let total = u64::from(2 * args.rounds + 1);
    progress(0, total);
    let result = async {
        let (mut pair, mut single) = (Vec::new(), Vec::new());
        for i in 0..args.rounds {
            // Alternating, so both set-ups see the machine alike.
            pair.push(round(args, &dir.join(format!("pair-{i}")), &http, true).await?);
            progress(u64::from(2 * i + 1), total);
            single.push(round(args, &dir.join(format!("single-{i}")), &http, false).await?);
            progress(u64::from(2 * i + 2), total);
        }
        Ok::<_, anyhow::Error>((pair, single))
    }
    .await;
    let vrrp = crate::bench_vrrp::vrrp_baseline(&dir.join("vrrp"), args.rounds);
    progress(total, total);
    let _ = std::fs::remove_dir_all(&dir);
    let (pair, single) = result?;
    let (vrrp, vrrp_missing) = match vrrp {
        Ok(v) => (Some(v), None),
        Err(e) => (None, Some(format!("{e:#}"))),
    };
    let pair = figures("active-standby NAT (state replicated)", pair);
    let single = figures("NAT without a standby, placed again", single);
    Ok(FailoverReport {
        measured: format!(
            "{HOSTS} telvirt agent processes on loopback tunnels under one telvirt controller (embedded store, --host-lease-ttl-ms {}, --heal-after-ms 0); stream gen -> fwa -> nat -> fwb -> sink at {} packets/s in {} flows, the firewalls on h3, the NAT's active on h1 or h2 (its standby on the other, h4 free); SIGKILL of the active's agent; the API polled every {} ms",
            args.host_lease_ttl_ms,
            args.rate_pps,
            args.flows,
            POLL.as_millis()
        ),
        rounds: args.rounds,
        rate_pps: args.rate_pps,
        flows: args.flows,
        host_lease_ttl_ms: args.host_lease_ttl_ms,
        outage_ratio: if single.outage_p50_ms > 0.0 {
            pair.outage_p50_ms / single.outage_p50_ms
        } else {
            0.0
        },
        flip_ratio_to_vrrp: vrrp
            .as_ref()
            .filter(|v| v.flip_max_ms > 0.0)
            .map(|v| pair.runs.iter().map(|r| r.flip_ms).fold(0.0, f64::max) / v.flip_max_ms),
        vrrp,
        vrrp_missing,
        goal_outage_le_50_ms: pair.outage_max_ms <= 50.0,
        goal_sessions_kept_100_pct: pair.sessions_kept_pct_min >= 100.0,
        goal_reheal_le_5000_ms: pair.reheal_max_ms.is_some_and(|r| r <= 5000.0),
        pair,
        single,
    })
}

pub fn failover_bench(format: Output, args: FailoverArgs) -> Result<()> {
    let progress = Progress::new(format, "failover");
    let report_progress = |d, t| progress.update(d, t);
    let bench = run_failover_bench(&args, &report_progress);
    let Some(r) = progress.run_bench(format, bench)? else {
        return Ok(());
    };
    println!("measured: {}", r.measured);
    let row = |f: &FailoverFigures| {
        vec![
            f.setup.to_owned(),
            format!("{:.0}", f.detect_p50_ms),
            format!("{:.0}", f.flip_p50_ms),
            format!("{:.0} / {:.0}", f.outage_p50_ms, f.outage_max_ms),
            format!("{}", f.lost_packets_max),
            format!("{:.0}", f.sessions_kept_pct_min),
            f.reheal_max_ms
                .map_or("-".to_owned(), |m| format!("{m:.0}")),
        ]
    };
    println!(
        "{}",
        output::table(
            &[
                "SET-UP",
                "DETECT p50 ms",
                "FLIP p50 ms",
                "OUTAGE p50/max ms",
                "LOST max",
                "SESSIONS KEPT min %",
                "REHEAL max ms",
            ],
            &[row(&r.pair), row(&r.single)],
        )
    );
    match (&r.vrrp, &r.vrrp_missing) {
        (Some(v), _) => println!(
            "baseline {} (VRRP, advert_int {} s): master SIGKILL -> backup holds the address, max {:.0} ms; telvirt's flip max / VRRP's: {:.3}",
            v.keepalived,
            v.advert_int_s,
            v.flip_max_ms,
            r.flip_ratio_to_vrrp.unwrap_or_default()
        ),
        (None, Some(why)) => println!("VRRP baseline not measured: {why}"),
        (None, None) => {}
    }
    let met = |ok: bool| if ok { "met" } else { "NOT met" };
    println!(
        "outage pair/single {:.2}; goals: outage <= 50 ms {}, sessions kept 100% {}, pair whole again <= 5 s {}",
        r.outage_ratio,
        met(r.goal_outage_le_50_ms),
        met(r.goal_sessions_kept_100_pct),
        met(r.goal_reheal_le_5000_ms)
    );
    Ok(())
}
