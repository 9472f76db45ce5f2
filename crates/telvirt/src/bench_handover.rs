//! `telvirt bench handover`: how long a cluster's control plane refuses writes after its
//! leading controller is killed, against how long etcd itself takes to notice (the lease
//! expiry every lease-based election waits for).
//!
//! Owns starting a loopback etcd and two real `telvirt controller` processes, killing the
//! leader with SIGKILL round after round and timing, from the kill: the leader key's deletion
//! as an etcd watch sees it (the baseline), and the first write the survivor acknowledges (a
//! node credential issued through its API). It must not measure anything in-process: both
//! controllers are the binary a user runs.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde::Serialize;
use telvirt_controller::leader::LEADER_KEY;
use telvirt_sched::SchedConfig;
use telvirt_store::local_etcd::LocalEtcd;
use telvirt_store::{EtcdStore, Store, WatchEvent};

use crate::bench_control::{BenchChild, percentile};
use crate::cli::Output;
use crate::output;
use crate::progress::Progress;

#[derive(Args, Debug)]
pub struct HandoverArgs {
    /// Leader kills to time
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub rounds: u32,
    /// The controllers' --leader-ttl-ms
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1000..=60_000))]
    pub leader_ttl_ms: u64,
}

#[derive(Debug, Serialize)]
pub struct HandoverReport {
    pub measured: String,
    pub rounds: u32,
    pub leader_ttl_ms: u64,
    /// Per round, ms from the kill until etcd deleted the leader key (the baseline).
    pub lease_expiry_ms: Vec<f64>,
    /// Per round, ms from the kill until the other controller acknowledged a write.
    pub handover_ms: Vec<f64>,
    pub lease_expiry_max_ms: f64,
    pub handover_max_ms: f64,
    pub handover_p50_ms: f64,
    /// handover_max / lease_expiry_max.
    pub ratio_max: f64,
    pub goal_handover_le_2000_ms: bool,
    /// Creates made through both controllers during the rounds, and the store checked after.
    pub chaos: ChaosReport,
}

/// A `telvirt controller` a benchmark started, SIGKILLed when dropped.
pub(crate) struct ControllerProcess {
    child: BenchChild,
    pub api: String,
    pub port: u16,
}

impl ControllerProcess {
    /// SIGKILL, and waits for it.
    pub fn kill(&mut self) {
        self.child.kill();
    }
}

/// A free TCP port on loopback.
pub(crate) fn free_port() -> Result<u16> {
    crate::cluster::free_port("127.0.0.1")
}

/// The certificate (PEM) and key every API process of this benchmark run presents, made once:
/// a client built before they start trusts them all, and the figures include TLS as an
/// operator's clients meet it.
fn bench_identity() -> Result<&'static (String, String)> {
    static IDENTITY: std::sync::OnceLock<(String, String)> = std::sync::OnceLock::new();
    if let Some(made) = IDENTITY.get() {
        return Ok(made);
    }
    let made = crate::tls::self_signed(&["127.0.0.1".to_owned(), "localhost".to_owned()])?;
    Ok(IDENTITY.get_or_init(|| made))
}

/// Where a benchmark's API processes find [`bench_identity`]'s certificate, relative to the
/// directory they work in (agents pass it as `--controller-ca`).
pub(crate) const BENCH_CERT: &str = "api.crt";
const BENCH_KEY: &str = "api.key";

/// An HTTP client builder that trusts the benchmark's API processes.
pub(crate) fn bench_http() -> Result<reqwest::ClientBuilder> {
    crate::tls::http_client(Some(&bench_identity()?.0))
}

/// `telvirt controller --data-dir control --listen 127.0.0.1:PORT <args>` working in `dir`,
/// logging to `dir/controller-PORT.log`.
pub(crate) fn spawn_controller(dir: &Path, port: u16, args: &[&str]) -> Result<ControllerProcess> {
    spawn_api_process(dir, "controller", port, args)
}

/// `telvirt SUBCOMMAND --data-dir control --listen 127.0.0.1:PORT <args>` (`controller` or
/// `serve`) working in `dir`, logging to `dir/SUBCOMMAND-PORT.log`; over TLS with
/// [`bench_identity`] unless `args` has `--plain-http`.
pub(crate) fn spawn_api_process(
    dir: &Path,
    subcommand: &str,
    port: u16,
    args: &[&str],
) -> Result<ControllerProcess> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("{subcommand}-{port}.log")))?;
    // TLS with the benchmark's certificate, unless the caller asks for the plain baseline.
    let tls = !args.contains(&"--plain-http");
    let tls_args: &[&str] = if tls {
        let (cert, key) = bench_identity()?;
        crate::tls::write_identity(&dir.join(BENCH_CERT), &dir.join(BENCH_KEY), cert, key)?;
        &["--tls-cert", BENCH_CERT, "--tls-key", BENCH_KEY]
    } else {
        &[]
    };
    // A benchmark's serve or controller runs its threads as every process does, whatever the
    // environment asks or serve's default would be (the agents' scheduling is a benchmark's
    // own option).
    let as_every_process: &[&str] = if subcommand == "serve" {
        &["--control-nice=0"]
    } else {
        &[]
    };
    let child = Command::new(std::env::current_exe()?)
        .current_dir(dir)
        .args([subcommand, "--data-dir", "control"])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(tls_args)
        .args(args)
        .args(as_every_process)
        .env_remove(crate::control_threads::PRIORITY_ENV)
        .env_remove(crate::control_threads::NICE_ENV)
        .env("TELVIRT_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("starting a controller")?;
    Ok(ControllerProcess {
        child: BenchChild(child),
        api: format!("{}://127.0.0.1:{port}", crate::tls::scheme(tls)),
        port,
    })
}

/// The role `api` reports, if it answers.
pub(crate) async fn role(http: &reqwest::Client, api: &str) -> Option<String> {
    let v: serde_json::Value = http
        .get(format!("{api}/v1/leader"))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    v["role"].as_str().map(str::to_owned)
}

/// Waits until the controller at `api` reports `wanted` as its role.
pub(crate) async fn wait_role(http: &reqwest::Client, api: &str, wanted: &str) -> Result<()> {
    poll_until(
        Duration::from_secs(20),
        &format!("{api} becoming {wanted}"),
        || async { role(http, api).await.as_deref() == Some(wanted) },
    )
    .await
}

/// Polls until `f` holds or `within` passed.
pub(crate) async fn poll_until<F, Fut>(within: Duration, what: &str, mut f: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !f().await {
        if Instant::now() > deadline {
            bail!("{what} did not happen within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// The host the chaos load places on: registered over the agent protocol, kept Ready by
/// heartbeats; no agent runs its VNFs (they stay Scheduled, holding their cores).
const CHAOS_HOST: &str = "chaos1";
/// How long the leadership stays put between two kills.
const STEADY: Duration = Duration::from_secs(2);
/// VNFs the chaos load creates at most (the host has 63 dedicated CPUs).
const CHAOS_VNFS: u32 = 60;

/// What the load created while leaders were killed, and what the store holds after.
#[derive(Debug, Default, Serialize)]
pub struct ChaosReport {
    /// Creates a controller acknowledged (201).
    pub acknowledged: u32,
    /// Creates refused or unanswered while a leader was being replaced (retried by no one).
    pub refused: u32,
    /// Acknowledged VNFs missing from the store after the last round (must be 0).
    pub lost: u32,
    /// CPUs of `chaos1` that two placements hold (must be 0).
    pub cpus_held_twice: u32,
    /// VNFs placed on `chaos1` at the end.
    pub placed: u32,
}

fn chaos_host() -> serde_json::Value {
    serde_json::json!({
        "spec": {
            "name": CHAOS_HOST,
            "topology": { "sockets": 1, "cores_per_socket": 64, "threads_per_core": 1, "numa_nodes_per_socket": 1 },
            "shared": "0"
        },
        "memory_bytes": 1u64 << 40,
        "runtimes": ["vm"],
        "agent": true
    })
}

fn chaos_vnf(n: u32) -> String {
    format!(
        "apiVersion: telvirt/v1\nkind: Vnf\nmetadata: {{ name: c{n} }}\nspec:\n  runtime: vm\n  cpu: {{ policy: dedicated, count: 1 }}\n  vm: {{ memory: 16MiB, emulator: share }}\n"
    )
}

/// Sends `request` to each controller in turn until one answers; its status.
async fn to_any(
    http: &reqwest::Client,
    apis: &[String],
    method: reqwest::Method,
    path: &str,
    token: &str,
    body: Option<(&str, String)>,
) -> Option<u16> {
    for api in apis {
        let mut r = http
            .request(method.clone(), format!("{api}{path}"))
            .bearer_auth(token);
        if let Some((kind, text)) = &body {
            r = r.header("content-type", *kind).body(text.clone());
        }
        if let Ok(answer) = r.send().await {
            let status = answer.status().as_u16();
            if status != 503 {
                return Some(status);
            }
        }
    }
    None
}

/// The JSON answer of `request`, or an error for a failed call or status.
pub(crate) async fn answer<T: serde::de::DeserializeOwned>(
    request: reqwest::RequestBuilder,
) -> Result<T> {
    Ok(request.send().await?.error_for_status()?.json().await?)
}

/// Issues the chaos host's node credential and registers the host; its credential.
async fn register_chaos_host(http: &reqwest::Client, api: &str, admin: &str) -> Result<String> {
    let credential: serde_json::Value = answer(
        http.post(format!("{api}/v1/hosts/{CHAOS_HOST}/credential"))
            .bearer_auth(admin),
    )
    .await?;
    let node = credential["token"]
        .as_str()
        .context("the credential answer has no token")?
        .to_owned();
    http.post(format!("{api}/v1/agent/hosts/{CHAOS_HOST}/register"))
        .bearer_auth(&node)
        .json(&chaos_host())
        .send()
        .await?
        .error_for_status()
        .context("registering the chaos host")?;
    Ok(node)
}

/// Keeps the chaos host Ready and creates VNFs through any controller until `stop` (one every
/// 150 ms, at most [`CHAOS_VNFS`]); the names acknowledged and the count refused.
async fn chaos_load(
    http: reqwest::Client,
    apis: Vec<String>,
    admin: String,
    node: String,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<(Vec<String>, u32)> {
    let beats = {
        let (http, apis, node, stop) = (http.clone(), apis.clone(), node.clone(), stop.clone());
        tokio::spawn(async move {
            let path = format!("/v1/agent/hosts/{CHAOS_HOST}/heartbeat");
            while !*stop.borrow() {
                let _ = to_any(&http, &apis, reqwest::Method::POST, &path, &node, None).await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let (mut acknowledged, mut refused) = (Vec::new(), 0);
    let mut n = 0;
    while !*stop.borrow() && n < CHAOS_VNFS {
        n += 1;
        let body = Some(("application/yaml", chaos_vnf(n)));
        match to_any(
            &http,
            &apis,
            reqwest::Method::POST,
            "/v1/vnfs",
            &admin,
            body,
        )
        .await
        {
            Some(201) => acknowledged.push(format!("c{n}")),
            _ => refused += 1,
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let _ = beats.await;
    Ok((acknowledged, refused))
}

/// Checks the store after the chaos: every acknowledged VNF is there (through the API), no
/// CPU is held twice (the store check of `consistency`).
async fn check_invariant(
    store: &dyn Store,
    http: &reqwest::Client,
    api: &str,
    admin: &str,
    acknowledged: &[String],
    refused: u32,
) -> Result<ChaosReport> {
    let vnfs: Vec<serde_json::Value> = answer(
        http.get(format!("{api}/v1/vnfs?limit=1000"))
            .bearer_auth(admin),
    )
    .await?;
    let names: std::collections::BTreeSet<&str> =
        vnfs.iter().filter_map(|v| v["name"].as_str()).collect();
    let lost = acknowledged
        .iter()
        .filter(|n| !names.contains(n.as_str()))
        .count();
    let placed = vnfs
        .iter()
        .flat_map(|v| v["placements"].as_array().into_iter().flatten())
        .filter(|p| p["host"] == CHAOS_HOST)
        .count();
    let store = telvirt_controller::consistency::check(store, SchedConfig::default()).await?;
    Ok(ChaosReport {
        acknowledged: u32::try_from(acknowledged.len()).unwrap_or(u32::MAX),
        refused,
        lost: u32::try_from(lost).unwrap_or(u32::MAX),
        cpus_held_twice: u32::try_from(store.cpus_held_twice.len()).unwrap_or(u32::MAX),
        placed: u32::try_from(placed).unwrap_or(u32::MAX),
    })
}

/// Opens a watch of `key` on `store`: the returned task answers when it first sees the key
/// deleted (None if the watch ends first).
pub(crate) async fn first_deletion(
    store: &dyn Store,
    key: &str,
) -> Result<tokio::task::JoinHandle<Option<Instant>>> {
    let mut watch = store.watch(key).await?;
    Ok(tokio::spawn(async move {
        while let Some(event) = watch.next().await {
            if matches!(event, WatchEvent::Delete { .. }) {
                return Some(Instant::now());
            }
        }
        None
    }))
}

/// Waits (at most 30 s) for a task of [`first_deletion`]; what it saw, or why there is nothing.
pub(crate) async fn deleted_at(
    task: tokio::task::JoinHandle<Option<Instant>>,
    what: &str,
) -> Result<Instant> {
    tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .with_context(|| format!("{what} never went"))??
        .context("the watch ended")
}

/// SIGKILLs `leader` and times, in ms from the kill: etcd's deletion of the leader key (seen
/// by a watch on `watcher`), and the first write `survivor` acknowledges (a node credential of
/// host `probe`, as `token`).
pub(crate) async fn time_leader_kill(
    http: &reqwest::Client,
    watcher: &dyn Store,
    leader: &mut ControllerProcess,
    survivor: &str,
    token: &str,
    probe: &str,
) -> Result<(f64, f64)> {
    let expired = first_deletion(watcher, LEADER_KEY).await?;
    let killed = Instant::now();
    leader.kill();
    let path = format!("{survivor}/v1/hosts/{probe}/credential");
    poll_until(
        Duration::from_secs(30),
        "a write through the survivor",
        || {
            let path = path.clone();
            async move {
                http.post(path)
                    .bearer_auth(token)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().as_u16() == 201)
            }
        },
    )
    .await?;
    let served = Instant::now();
    let expired = deleted_at(expired, "the leader key").await?;
    let ms = |t: Instant| t.duration_since(killed).as_secs_f64() * 1e3;
    Ok((ms(expired), ms(served)))
}

pub async fn run_handover_bench(
    args: &HandoverArgs,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<HandoverReport> {
    let dir = crate::bench_control::scratch_dir("handover")?;
    let result = run_in(args, &dir, progress).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn run_in(
    args: &HandoverArgs,
    dir: &Path,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<HandoverReport> {
    let etcd = LocalEtcd::start(&dir.join("etcd"), true).await?;
    let namespace = "/bench-handover";
    let url = etcd.store_url(namespace);
    let watcher: Arc<dyn Store> =
        Arc::new(EtcdStore::connect(&[etcd.endpoint()], namespace).await?);
    let http = bench_http()?.timeout(Duration::from_secs(5)).build()?;
    let ttl = args.leader_ttl_ms.to_string();
    let controller_args = ["--store", url.as_str(), "--leader-ttl-ms", ttl.as_str()];
    let mut a = spawn_controller(dir, free_port()?, &controller_args)?;
    wait_role(&http, &a.api, "leader").await?;
    let mut b = spawn_controller(dir, free_port()?, &controller_args)?;
    wait_role(&http, &b.api, "follower").await?;
    let config = crate::config::ClientConfig::read(&dir.join("control/client.toml"))?;
    // Creates through whichever controller answers while the leaders are killed.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let node = register_chaos_host(&http, &a.api, &config.token).await?;
    let load = tokio::spawn(chaos_load(
        http.clone(),
        vec![a.api.clone(), b.api.clone()],
        config.token.clone(),
        node,
        stop_rx,
    ));

    let (mut expiry, mut handover) = (Vec::new(), Vec::new());
    for round in 0..args.rounds {
        progress(u64::from(round), u64::from(args.rounds));
        let probe = format!("bench-r{round}");
        let (expired, served) = time_leader_kill(
            &http,
            watcher.as_ref(),
            &mut a,
            &b.api,
            &config.token,
            &probe,
        )
        .await?;
        expiry.push(expired);
        handover.push(served);
        // The killed controller comes back as the follower of the next round.
        let port = a.port;
        a = spawn_controller(dir, port, &controller_args)?;
        wait_role(&http, &a.api, "follower").await?;
        std::mem::swap(&mut a, &mut b);
        // Steady leadership for a while: the load's creates land.
        tokio::time::sleep(STEADY).await;
    }
    progress(u64::from(args.rounds), u64::from(args.rounds));
    let _ = stop_tx.send(true);
    let (acknowledged, refused) = load.await.context("the chaos load task")??;
    // After the last swap, `a` is the controller that took over last.
    wait_role(&http, &a.api, "leader").await?;
    let chaos = check_invariant(
        watcher.as_ref(),
        &http,
        &a.api,
        &config.token,
        &acknowledged,
        refused,
    )
    .await?;
    drop((a, b));
    drop(etcd);

    let mut sorted = handover.clone();
    sorted.sort_by(f64::total_cmp);
    let handover_max = sorted.last().copied().unwrap_or(0.0);
    let expiry_max = expiry.iter().copied().fold(0.0, f64::max);
    Ok(HandoverReport {
        measured: format!(
            "two telvirt controller processes on one loopback etcd 3.4 (heartbeat 10 ms, election 100 ms); SIGKILL of the leader, {} rounds, while VNFs are created through both controllers (one host registered over the agent protocol, no agent running its VNFs)",
            args.rounds
        ),
        rounds: args.rounds,
        leader_ttl_ms: args.leader_ttl_ms,
        lease_expiry_max_ms: expiry_max,
        handover_max_ms: handover_max,
        handover_p50_ms: percentile(&sorted, 0.5),
        ratio_max: if expiry_max > 0.0 {
            handover_max / expiry_max
        } else {
            0.0
        },
        goal_handover_le_2000_ms: handover_max <= 2000.0,
        chaos,
        lease_expiry_ms: expiry,
        handover_ms: handover,
    })
}

pub fn handover(format: Output, args: HandoverArgs) -> Result<()> {
    let progress = Progress::new(format, "handover");
    let report_progress = |d, t| progress.update(d, t);
    let bench = run_handover_bench(&args, &report_progress);
    let Some(report) = progress.run_bench(format, bench)? else {
        return Ok(());
    };
    let r = &report;
    println!("measured: {}", r.measured);
    let rounds = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.0}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!(
        "{}",
        output::table(
            &["FIGURE", "MAX ms", "ROUNDS ms", "GOAL"],
            &[
                vec![
                    "baseline: etcd deletes the dead leader's key".into(),
                    format!("{:.0}", r.lease_expiry_max_ms),
                    rounds(&r.lease_expiry_ms),
                    "-".into(),
                ],
                vec![
                    "telvirt: the survivor acknowledges a write".into(),
                    format!("{:.0}", r.handover_max_ms),
                    rounds(&r.handover_ms),
                    format!(
                        "<= 2000: {}",
                        if r.goal_handover_le_2000_ms {
                            "met"
                        } else {
                            "NOT met"
                        }
                    ),
                ],
            ],
        )
    );
    println!(
        "ratio handover/expiry (max): {:.2}; leader TTL {} ms",
        r.ratio_max, r.leader_ttl_ms
    );
    let c = &r.chaos;
    println!(
        "chaos load: {} creates acknowledged, {} refused during handovers; after: {} lost, {} CPUs held twice, {} placed",
        c.acknowledged, c.refused, c.lost, c.cpus_held_twice, c.placed
    );
    Ok(())
}
