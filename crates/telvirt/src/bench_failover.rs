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
//! placed again by the healer (heal delay 0). Where it can (root, iperf3), each round also
//! kills the active under an iperf3 TCP flow between two namespaces whose interfaces are pinned
//! to h4, both set-ups: whether the connection survived and its longest gap. It must not measure
//! anything in-process.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde::Serialize;

use crate::bench_cluster::{
    Api, Hosts, descriptor, embedded_controller, lay_out_hosts, upload_example,
};
use crate::bench_control::{ms, percentile};
use crate::bench_handover::{ControllerProcess, answer, poll_until};
use crate::bench_ports::ratio;
use crate::cli::Output;
use crate::netns::Netns;
use crate::output;
use crate::progress::Progress;

/// How often the API is polled while a failover runs: the figures' resolution.
const POLL: Duration = Duration::from_millis(10);
/// How long the stream runs after the NAT is back before the sink is read.
const SETTLE: Duration = Duration::from_secs(1);
/// Hosts of a round: h1 and h2 hold the NAT, h3 the stream, h4 is free.
pub(crate) const HOSTS: u32 = 4;

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
    #[command(flatten)]
    pub agents: crate::control_threads::AgentPriorityArgs,
}

/// One kill, timed from the kill.
#[derive(Debug, Clone, Serialize)]
pub struct FailoverRun {
    /// How the agents' control threads ran, read from `/proc` before the event
    /// ([`crate::bench_cluster::Hosts::control_applied`]); the report states them once.
    #[serde(skip)]
    pub control_applied: std::collections::BTreeSet<String>,
    pub detect_ms: f64,
    pub flip_ms: f64,
    pub lost_packets: u64,
    /// lost_packets at the stream's rate.
    pub outage_ms: f64,
    pub sessions_kept_pct: f64,
    /// Until a new standby runs on a third host (`None`: the set-up has no standby).
    pub reheal_ms: Option<f64>,
    /// Times the standby reported its live active silent before the kill (false detections
    /// of the pair's 10 ms x 3 heartbeat under this load; they move nothing).
    pub silences_before_kill: u64,
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
    /// An iperf3 TCP flow through the NAT (its own set-up per kill), both set-ups (`None`: not
    /// measured here, see `tcp_missing`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpFigures>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcp_missing: Option<String>,
    pub goal_outage_le_50_ms: bool,
    pub goal_sessions_kept_100_pct: bool,
    pub goal_reheal_le_5000_ms: bool,
}

/// The NAT's descriptor; `sessions_max` raises its session table's capacity (the module's
/// manifest says 65,536).
fn nat_descriptor(name: &str, module: &str, pair: bool, sessions_max: Option<u32>) -> String {
    format!(
        "apiVersion: telvirt/v1\nkind: Vnf\nmetadata: {{ name: {name} }}\nspec:\n  runtime: wasm\n  cpu: {{ policy: shared, count: 1, group: nat }}\n{}  ports: [in, out]\n  wasm:\n    module: \"{module}\"\n    limits: {{ memory: 16MiB }}\n{}",
        if pair {
            "  redundancy: active-standby\n"
        } else {
            ""
        },
        sessions_max.map_or_else(String::new, |max| format!(
            "    maps:\n      - {{ name: sessions, kind: hash, key_size: 16, value_size: 8, max_entries: {max} }}\n"
        ))
    )
}

pub(crate) async fn post_yaml(api: &Api, path: &str, body: String) -> Result<serde_json::Value> {
    answer(
        api.request(reqwest::Method::POST, path)
            .header("content-type", "application/yaml")
            .body(body),
    )
    .await
}

pub(crate) async fn cordon(api: &Api, host: &str, on: bool) -> Result<()> {
    let what = if on { "cordon" } else { "uncordon" };
    let _: serde_json::Value =
        answer(api.request(reqwest::Method::POST, &format!("/v1/hosts/{host}/{what}"))).await?;
    Ok(())
}

/// Network `stream`: gen -> fwa -> `through` -> fwb -> sink at `rate_pps` in `flows` flows,
/// where `through` is the VNF between the firewalls as its (in, out) ports, e.g.
/// `("nat.in", "nat.out")`.
pub(crate) fn stream_network(rate_pps: u64, flows: u64, through: (&str, &str)) -> String {
    let (into, out_of) = through;
    format!(
        "apiVersion: telvirt/v1\nkind: Network\nmetadata: {{ name: stream }}\nspec:\n  nodes:\n    - {{ name: gen, kind: generator, rate_pps: {rate_pps}, flows: {flows} }}\n    - {{ name: sink, kind: sink }}\n  links:\n    - gen.out -> fwa.in\n    - fwa.out -> {into}\n    - {out_of} -> fwb.in\n    - fwb.out -> sink.in\n"
    )
}

/// The NAT's ports, for [`stream_network`].
pub(crate) const THROUGH_NAT: (&str, &str) = ("nat.in", "nat.out");

/// The NAT as the API shows it now (`None` while it cannot be read).
pub(crate) async fn nat(api: &Api) -> Option<serde_json::Value> {
    api.json("/v1/vnfs/nat").await.ok()
}

/// The host of VNF `v`'s instance in `role`, and whether it runs (the VNF's phase for the
/// active, its standby status for the standby).
pub(crate) fn instance(v: &serde_json::Value, role: &str) -> Option<(String, bool)> {
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
pub(crate) async fn stream(api: &Api) -> Result<(u64, u64)> {
    let n = api.json("/v1/networks/stream").await?;
    let links = &n["status"]["links"];
    match (links[0]["packets"].as_u64(), links[3]["packets"].as_u64()) {
        (Some(sent), Some(received)) => Ok((sent, received)),
        _ => bail!("network stream has no counters yet: {n}"),
    }
}

/// How long the stream runs once it is back before the NAT's new sessions are counted: long
/// enough for the generator to send on every one of `flows` flows at `rate_pps` (it takes them
/// in turn), at least `SETTLE`.
pub(crate) fn settle_for(flows: u64, rate_pps: u64) -> Duration {
    SETTLE.max(Duration::from_millis(flows * 1000 / rate_pps.max(1) + 500))
}

/// Once the stream reaches the sink again (and ran `settle` more): the packets lost since `at`
/// (sent, received then) and the sessions the NAT made.
pub(crate) async fn stream_back(api: &Api, at: (u64, u64), settle: Duration) -> Result<(u64, u64)> {
    let (sent0, received0) = at;
    poll_until(
        Duration::from_secs(60),
        "the stream back at the sink",
        || async {
            stream(api)
                .await
                .is_ok_and(|(_, received)| received > received0)
        },
    )
    .await?;
    tokio::time::sleep(settle).await;
    // The NAT's counters once its (new) instance answers for them.
    let deadline = Instant::now() + Duration::from_secs(60);
    let created = loop {
        match counter(api, "nat", "sessions_created").await {
            Ok(created) => break created,
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let (sent1, received1) = stream(api).await?;
    Ok((
        (sent1 - sent0).saturating_sub(received1 - received0),
        created,
    ))
}

async fn counter(api: &Api, vnf: &str, name: &str) -> Result<u64> {
    let s = api.json(&format!("/v1/vnfs/{vnf}/stats")).await?;
    s["counters"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == name))
        .and_then(|c| c["value"].as_u64())
        .with_context(|| format!("vnf {vnf} has no counter {name}: {s}"))
}

/// A round's processes with the NAT placed: its active on h1 or h2, its standby (a pair) on
/// the other; h3 and h4 open for what the round places next.
pub(crate) struct NatSetup {
    /// Dropped first: the agents stop before their controller.
    pub hosts: Hosts,
    /// Held until the round ends.
    _controller: ControllerProcess,
    pub api: Api,
    pub active: String,
    pub standby: Option<String>,
    /// The NAT's descriptor as created.
    pub nat_yaml: String,
}

/// A fresh controller and four agents in `dir`, the NAT (a pair when `pair`) placed and
/// running; `before`: VNFs to create on h3 first (the others cordoned).
pub(crate) async fn nat_setup(
    args: &FailoverArgs,
    dir: &Path,
    http: &reqwest::Client,
    pair: bool,
    before: &[&str],
    sessions_max: Option<u32>,
) -> Result<NatSetup> {
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
        vm_image_cache: None,
        qemu: None,
        control: args.agents,
    };
    let firewall = lay_out_hosts(&api, &mut hosts, HOSTS).await?;
    let nat_module = upload_example(&api, "nat").await?;
    for h in ["h1", "h2", "h4"] {
        cordon(&api, h, true).await?;
    }
    for vnf in before {
        post_yaml(&api, "/v1/vnfs", descriptor(vnf, 1, &firewall)).await?;
    }
    // The NAT's active on h1 (and its standby on h2); h4 stays free until the kill.
    cordon(&api, "h3", true).await?;
    cordon(&api, "h1", false).await?;
    if pair {
        cordon(&api, "h2", false).await?;
    }
    let nat_yaml = nat_descriptor("nat", &nat_module, pair, sessions_max);
    post_yaml(&api, "/v1/vnfs", nat_yaml.clone()).await?;
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
    for h in ["h2", "h3", "h4"] {
        cordon(&api, h, false).await?;
    }
    Ok(NatSetup {
        hosts,
        _controller: controller,
        api,
        active,
        standby,
        nat_yaml,
    })
}

/// What a kill of the active's agent took, from the kill (ms).
struct Recovery {
    detect: f64,
    flip: f64,
    reheal: Option<f64>,
    /// Times the standby said it lost its live active before the kill: false detections of
    /// the pair's heartbeat (`--pair-interval-ms` x `--pair-detect-multiplier`) on this machine.
    silences: u64,
}

/// VNF `vnf`'s events whose reason contains `what`.
pub(crate) async fn events_saying(api: &Api, vnf: &str, what: &str) -> Result<u64> {
    let events = api.json(&format!("/v1/vnfs/{vnf}/events")).await?;
    Ok(events.as_array().map_or(0, |all| {
        all.iter()
            .filter(|e| e["reason"].as_str().is_some_and(|r| r.contains(what)))
            .count() as u64
    }))
}

/// Kills the agent of the NAT's active (`s.active`) and times its recovery: the host NotReady,
/// the NAT active elsewhere, and (a pair) a new standby running on a third host.
async fn kill_active(s: &mut NatSetup, pair: bool) -> Result<Recovery> {
    let index = s
        .active
        .strip_prefix('h')
        .and_then(|n| n.parse::<usize>().ok())
        .and_then(|n| n.checked_sub(1))
        .context("the active's host is not one of h1..h4")?;
    let silences = events_saying(&s.api, "nat", "lost its active on").await?;
    let killed = Instant::now();
    s.hosts.agents[index].kill();
    let (mut detect, mut flip, mut reheal) = (None, None, None);
    while detect.is_none() || flip.is_none() || (pair && reheal.is_none()) {
        if killed.elapsed() > Duration::from_secs(60) {
            bail!("the NAT did not recover within 60 s of its host's failure");
        }
        if detect.is_none() && s.api.host_status(&s.active).await.as_deref() == Some("NotReady") {
            detect = Some(ms(killed.elapsed()));
        }
        // One read of the NAT per poll serves both figures.
        if let Some(v) = nat(&s.api).await {
            if flip.is_none() && instance(&v, "active").is_some_and(|(h, _)| h != s.active) {
                flip = Some(ms(killed.elapsed()));
            }
            if pair
                && reheal.is_none()
                && instance(&v, "standby").is_some_and(|(h, running)| {
                    running && h != s.active && Some(&h) != s.standby.as_ref()
                })
            {
                reheal = Some(ms(killed.elapsed()));
            }
        }
        tokio::time::sleep(POLL).await;
    }
    Ok(Recovery {
        detect: detect.unwrap_or_default(),
        flip: flip.unwrap_or_default(),
        reheal,
        silences,
    })
}

/// One round: a fresh controller and four agents in `dir`, the stream through the NAT (a pair
/// when `pair`), the active's agent killed and the recovery timed.
async fn round(
    args: &FailoverArgs,
    dir: &Path,
    http: &reqwest::Client,
    pair: bool,
) -> Result<FailoverRun> {
    // The firewalls (and so the generator and the sink) on h3.
    let mut s = nat_setup(args, dir, http, pair, &["fwa", "fwb"], None).await?;
    let api = &s.api;
    post_yaml(
        api,
        "/v1/networks",
        stream_network(args.rate_pps, args.flows, THROUGH_NAT),
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
                && stream(api).await.is_ok_and(|(_, received)| received > 0)
        },
    )
    .await?;
    let (sent0, received0) = stream(api).await?;
    let control_applied = s.hosts.control_applied();
    let recovery = kill_active(&mut s, pair).await?;
    let settle = settle_for(args.flows, args.rate_pps);
    let (lost, created) = stream_back(&s.api, (sent0, received0), settle).await?;
    Ok(FailoverRun {
        control_applied,
        detect_ms: recovery.detect,
        flip_ms: recovery.flip,
        lost_packets: lost,
        outage_ms: lost as f64 * 1000.0 / args.rate_pps as f64,
        sessions_kept_pct: 100.0 * args.flows.saturating_sub(created) as f64 / args.flows as f64,
        reheal_ms: recovery.reheal,
        silences_before_kill: recovery.silences,
    })
}

/// How long the TCP flow of a round runs; the active's agent dies `TCP_KILL_AT` into it.
pub(crate) const TCP_SECONDS: u64 = 6;
pub(crate) const TCP_KILL_AT: Duration = Duration::from_secs(2);

/// One kill (`bench failover`) or move (`bench migrate`) under the TCP flow.
#[derive(Debug, Clone, Serialize)]
pub struct TcpRun {
    /// How the agents' control threads ran, read from `/proc` before the event
    /// ([`crate::bench_cluster::Hosts::control_applied`]); the report states them once.
    #[serde(skip)]
    pub control_applied: std::collections::BTreeSet<String>,
    pub flip_ms: f64,
    /// As in [`FailoverRun`].
    pub silences_before_kill: u64,
    /// The longest run of iperf3's 100 ms intervals that moved no data, in ms (0: the gap was
    /// shorter than the resolution).
    pub gap_ms: f64,
    /// The connection carried data to its end (iperf3 succeeded, its last second moved data).
    pub survived: bool,
    /// Segments TCP sent again over the whole flow.
    pub retransmits: u64,
    /// Throughput over the flow, Mbit/s.
    pub mbps: f64,
    /// A live move's freeze under the flow, from its switch event (`bench migrate`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub downtime_us: Option<u64>,
    /// Where that freeze went, as the switch event states it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub freeze_phases: Option<telvirt_model::api::FreezePhases>,
    /// What iperf3 said when it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The TCP flow's kills, both set-ups.
#[derive(Debug, Clone, Serialize)]
pub struct TcpFigures {
    pub measured: String,
    pub pair: Vec<TcpRun>,
    /// Baseline: the same NAT without a standby, placed again by the healer.
    pub single: Vec<TcpRun>,
    pub pair_gap_max_ms: f64,
    pub pair_survived_all: bool,
    pub single_survived_any: bool,
}

/// The client and server namespaces of the TCP flow, each with a veth whose other end stays in
/// this namespace, where h4's agent opens it as a host interface; deleted on drop.
struct TcpEnds {
    /// Client, server.
    ns: [Netns; 2],
}

impl TcpEnds {
    /// Client 10.204.0.1, server 192.0.2.2 behind the NAT's default public address 192.0.2.1.
    /// The NAT forwards IPv4 TCP/UDP only (no ARP): each side knows the other's MAC.
    fn create() -> Result<Self> {
        use crate::cluster::ip;
        let tag = std::process::id() % 100_000;
        let ends = TcpEnds {
            ns: [
                Netns::create(&format!("tvfc{tag}"))?,
                Netns::create(&format!("tvfs{tag}"))?,
            ],
        };
        // The NAT rewrites addresses with incremental checksum updates: full packets (the
        // veth's offloads are off).
        for ns in &ends.ns {
            crate::netns::veth(None, &ns.name, ns, "eth0")?;
        }
        let [client, server] = [&ends.ns[0].name, &ends.ns[1].name];
        let mac = |ns: &str| -> Result<String> {
            let out = ip(&["-n", ns, "-o", "link", "show", "eth0"])?;
            out.split_whitespace()
                .skip_while(|w| *w != "link/ether")
                .nth(1)
                .map(str::to_owned)
                .with_context(|| format!("no MAC address on eth0 in {ns}: {out}"))
        };
        let (mac_c, mac_s) = (mac(client)?, mac(server)?);
        ip(&["-n", client, "addr", "add", "10.204.0.1/24", "dev", "eth0"])?;
        ip(&["-n", client, "route", "add", "192.0.2.0/24", "dev", "eth0"])?;
        ip(&[
            "-n",
            client,
            "neigh",
            "add",
            "192.0.2.2",
            "lladdr",
            &mac_s,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ])?;
        ip(&["-n", server, "addr", "add", "192.0.2.2/24", "dev", "eth0"])?;
        ip(&[
            "-n",
            server,
            "neigh",
            "add",
            "192.0.2.1",
            "lladdr",
            &mac_c,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ])?;
        Ok(ends)
    }
}

/// Why the TCP flow cannot be measured here, if it cannot.
pub(crate) fn tcp_missing() -> Option<String> {
    if !crate::cluster::is_root() {
        return Some("the TCP flow needs root (network namespaces)".into());
    }
    for tool in ["iperf3", "ethtool"] {
        let found = std::process::Command::new(tool)
            .arg("--version")
            .output()
            .is_ok();
        if !found {
            return Some(format!(
                "the TCP flow needs {tool} (scripts/deps.sh installs it)"
            ));
        }
    }
    None
}

/// The figures of one iperf3 `-J` report with 100 ms intervals.
fn tcp_figures(report: &serde_json::Value) -> (f64, bool, u64, f64) {
    let intervals: Vec<u64> = report["intervals"]
        .as_array()
        .map(|all| {
            all.iter()
                .map(|i| i["sum"]["bytes"].as_u64().unwrap_or(0))
                .collect()
        })
        .unwrap_or_default();
    let (mut run, mut longest) = (0u64, 0u64);
    for bytes in &intervals {
        run = if *bytes == 0 { run + 1 } else { 0 };
        longest = longest.max(run);
    }
    let last_second: u64 = intervals.iter().rev().take(10).sum();
    let end = &report["end"];
    let ok = report["error"].is_null() && last_second > 0;
    (
        longest as f64 * 100.0,
        ok,
        end["sum_sent"]["retransmits"].as_u64().unwrap_or(0),
        end["sum_received"]["bits_per_second"]
            .as_f64()
            .unwrap_or(0.0)
            / 1e6,
    )
}

/// What happens to the NAT `TCP_KILL_AT` into a TCP flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TcpEvent {
    /// SIGKILL of its active's agent (a pair when `pair`).
    Kill { pair: bool },
    /// A live move to h2 (`vnf migrate`).
    Move,
    /// A cold move to h2 (deleted, created there).
    ColdMove,
}

/// One round under a TCP flow: the NAT between a client and a server namespace whose
/// interfaces are pinned to h4, iperf3 for `TCP_SECONDS`, `event` `TCP_KILL_AT` into it.
pub(crate) async fn tcp_round(
    args: &FailoverArgs,
    dir: &Path,
    http: &reqwest::Client,
    event: TcpEvent,
) -> Result<TcpRun> {
    let pair = event == TcpEvent::Kill { pair: true };
    let mut s = nat_setup(args, dir, http, pair, &[], None).await?;
    let ends = TcpEnds::create()?;
    let [client, server] = &ends.ns;
    let (client_if, server_if) = (&client.name, &server.name);
    post_yaml(
        &s.api,
        "/v1/networks",
        format!(
            "apiVersion: telvirt/v1\nkind: Network\nmetadata: {{ name: tcp }}\nspec:\n  links:\n    - host:{client_if}@h4 -> nat.in\n    - nat.out -> host:{server_if}@h4\n    - host:{server_if}@h4 -> nat.out\n    - nat.in -> host:{client_if}@h4\n"
        ),
    )
    .await?;
    let _server = crate::bench_control::BenchChild(
        server
            .command("iperf3", &["-s", "-p", "5201"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("starting the iperf3 server")?,
    );
    // The path works once a short transfer goes through.
    poll_until(Duration::from_secs(60), "TCP through the NAT", || async {
        let probe = client.command("iperf3", &["-c", "192.0.2.2", "-p", "5201", "-n", "64K"]);
        tokio::task::spawn_blocking(move || {
            let mut probe = probe;
            probe.output().is_ok_and(|o| o.status.success())
        })
        .await
        .unwrap_or(false)
    })
    .await?;
    let seconds = TCP_SECONDS.to_string();
    let mut flow = client.command(
        "iperf3",
        &[
            "-c",
            "192.0.2.2",
            "-p",
            "5201",
            "-t",
            &seconds,
            "-i",
            "0.1",
            "-J",
            // A connection whose data goes unacknowledged this long is broken: iperf3 says so
            // instead of waiting for TCP to give up (minutes).
            "--snd-timeout",
            "3000",
        ],
    );
    let flow = flow
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("starting the iperf3 client")?;
    let pid = libc::pid_t::try_from(flow.id()).context("the iperf3 client's pid")?;
    let mut flow = tokio::task::spawn_blocking(move || flow.wait_with_output());
    tokio::time::sleep(TCP_KILL_AT).await;
    let (mut downtime_us, mut freeze_phases) = (None, None);
    let control_applied = s.hosts.control_applied();
    let recovery = match event {
        TcpEvent::Kill { pair } => kill_active(&mut s, pair).await?,
        TcpEvent::Move | TcpEvent::ColdMove => {
            let asked = Instant::now();
            if event == TcpEvent::Move {
                crate::bench_migrate::live_move(&s.api).await?;
            } else {
                crate::bench_migrate::cold_move(&s.api, &s.nat_yaml).await?;
            }
            let flip = ms(asked.elapsed());
            if event == TcpEvent::Move {
                (downtime_us, freeze_phases) = crate::bench_migrate::freeze(&s.api).await?;
            }
            Recovery {
                detect: 0.0,
                flip,
                reheal: None,
                silences: 0,
            }
        }
    };
    let out = match tokio::time::timeout(Duration::from_secs(TCP_SECONDS + 30), &mut flow).await {
        Ok(out) => out??,
        Err(_) => {
            // Still waiting on a dead connection: it did not survive.
            // SAFETY: `pid` is our own child, not yet reaped (its waiter still waits for it).
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let _ = flow.await;
            return Ok(TcpRun {
                control_applied,
                flip_ms: recovery.flip,
                silences_before_kill: recovery.silences,
                gap_ms: (TCP_SECONDS * 1000) as f64,
                survived: false,
                retransmits: 0,
                mbps: 0.0,
                downtime_us,
                freeze_phases,
                error: Some(
                    "the client had not ended 30 s after the flow: the connection hung".into(),
                ),
            });
        }
    };
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "iperf3 -J printed no report: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })?;
    let (gap_ms, survived, retransmits, mbps) = tcp_figures(&report);
    Ok(TcpRun {
        control_applied,
        flip_ms: recovery.flip,
        silences_before_kill: recovery.silences,
        gap_ms,
        survived: survived && out.status.success(),
        retransmits,
        mbps,
        downtime_us,
        freeze_phases,
        error: report["error"].as_str().map(str::to_owned),
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
    let http = crate::bench_handover::bench_http()?
        .timeout(Duration::from_secs(10))
        .build()?;
    let tcp_missing = tcp_missing();
    let per_round = if tcp_missing.is_none() { 4 } else { 2 };
    let total = u64::from(per_round * args.rounds + 1);
    progress(0, total);
    let result = async {
        let (mut pair, mut single) = (Vec::new(), Vec::new());
        let (mut tcp_pair, mut tcp_single) = (Vec::new(), Vec::new());
        let mut done = 0;
        for i in 0..args.rounds {
            // Alternating, so both set-ups see the machine alike.
            pair.push(round(args, &dir.join(format!("pair-{i}")), &http, true).await?);
            single.push(round(args, &dir.join(format!("single-{i}")), &http, false).await?);
            done += 2;
            progress(done, total);
            if tcp_missing.is_none() {
                let at = |set: &str| dir.join(format!("tcp-{set}-{i}"));
                let kill = |pair| TcpEvent::Kill { pair };
                tcp_pair.push(tcp_round(args, &at("pair"), &http, kill(true)).await?);
                tcp_single.push(tcp_round(args, &at("single"), &http, kill(false)).await?);
                done += 2;
                progress(done, total);
            }
        }
        Ok::<_, anyhow::Error>((pair, single, tcp_pair, tcp_single))
    }
    .await;
    let vrrp = crate::bench_vrrp::vrrp_baseline(&dir.join("vrrp"), args.rounds);
    progress(total, total);
    let _ = std::fs::remove_dir_all(&dir);
    let (pair, single, tcp_pair, tcp_single) = result?;
    let control_applied = pair
        .iter()
        .chain(&single)
        .flat_map(|r| r.control_applied.iter().cloned())
        .chain(
            tcp_pair
                .iter()
                .chain(&tcp_single)
                .flat_map(|r| r.control_applied.iter().cloned()),
        )
        .collect();
    let tcp = tcp_missing.is_none().then(|| TcpFigures {
        measured: format!(
            "iperf3 TCP, {TCP_SECONDS} s with 100 ms intervals, from a client namespace to a server namespace through the NAT (the namespaces' veths pinned to h4 as host:IFNAME@h4, the NAT's roles on h1 and h2); SIGKILL of the active's agent {} s into the flow",
            TCP_KILL_AT.as_secs()
        ),
        pair_gap_max_ms: tcp_pair.iter().map(|r| r.gap_ms).fold(0.0, f64::max),
        pair_survived_all: tcp_pair.iter().all(|r| r.survived),
        single_survived_any: tcp_single.iter().any(|r| r.survived),
        pair: tcp_pair,
        single: tcp_single,
    });
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
        control_priority: args.agents.control_priority,
        control_nice: args.agents.control_nice,
        control_applied,
        outage_ratio: ratio(pair.outage_p50_ms, single.outage_p50_ms),
        flip_ratio_to_vrrp: vrrp
            .as_ref()
            .filter(|v| v.flip_max_ms > 0.0)
            .map(|v| pair.runs.iter().map(|r| r.flip_ms).fold(0.0, f64::max) / v.flip_max_ms),
        vrrp,
        vrrp_missing,
        tcp,
        tcp_missing,
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
    println!(
        "agents' control threads ran at: {}",
        crate::bench_cluster::classes_line(&r.control_applied)
    );
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
    match (&r.tcp, &r.tcp_missing) {
        (Some(t), _) => println!(
            "TCP flow (iperf3): pair survived every kill: {}, longest gap {:.0} ms (0: under iperf3's 100 ms); without a standby it survived: {}",
            t.pair_survived_all, t.pair_gap_max_ms, t.single_survived_any
        ),
        (None, Some(why)) => println!("TCP flow not measured: {why}"),
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
