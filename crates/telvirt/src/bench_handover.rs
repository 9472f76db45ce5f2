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
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde::Serialize;
use telvirt_controller::leader::LEADER_KEY;
use telvirt_store::local_etcd::LocalEtcd;
use telvirt_store::{EtcdStore, Store, WatchEvent};

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
}

/// A `telvirt controller` of the bench.
struct ControllerProcess {
    child: Child,
    api: String,
    port: u16,
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn spawn_controller(dir: &Path, store: &str, port: u16, ttl_ms: u64) -> Result<ControllerProcess> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("controller-{port}.log")))?;
    let child = Command::new(std::env::current_exe()?)
        .current_dir(dir)
        .args(["controller", "--data-dir", "control", "--store", store])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--leader-ttl-ms", &ttl_ms.to_string()])
        .env("TELVIRT_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("starting a controller")?;
    Ok(ControllerProcess {
        child,
        api: format!("http://127.0.0.1:{port}"),
        port,
    })
}

/// The role `api` reports, if it answers.
async fn role(http: &reqwest::Client, api: &str) -> Option<String> {
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
async fn wait_role(http: &reqwest::Client, api: &str, wanted: &str) -> Result<()> {
    poll_until(
        Duration::from_secs(20),
        &format!("{api} becoming {wanted}"),
        || async { role(http, api).await.as_deref() == Some(wanted) },
    )
    .await
}

/// Polls until `f` holds or `within` passed.
async fn poll_until<F, Fut>(within: Duration, what: &str, mut f: F) -> Result<()>
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

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let at = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(at).copied().unwrap_or(0.0)
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
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    let ttl = args.leader_ttl_ms;
    let mut a = spawn_controller(dir, &url, free_port()?, ttl)?;
    wait_role(&http, &a.api, "leader").await?;
    let mut b = spawn_controller(dir, &url, free_port()?, ttl)?;
    wait_role(&http, &b.api, "follower").await?;
    let config = crate::config::ClientConfig::read(&dir.join("control/client.toml"))?;

    let (mut expiry, mut handover) = (Vec::new(), Vec::new());
    for round in 0..args.rounds {
        progress(u64::from(round), u64::from(args.rounds));
        let mut watch = watcher.watch(LEADER_KEY).await?;
        let killed = Instant::now();
        a.child.kill()?;
        let _ = a.child.wait();
        let expired = tokio::spawn(async move {
            while let Some(event) = watch.next().await {
                if matches!(event, WatchEvent::Delete { .. }) {
                    return Some(Instant::now());
                }
            }
            None
        });
        let path = format!("{}/v1/hosts/bench-r{round}/credential", b.api);
        poll_until(
            Duration::from_secs(30),
            "a write through the survivor",
            || {
                let (http, path, token) = (&http, path.clone(), config.token.clone());
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
        let expired = tokio::time::timeout(Duration::from_secs(30), expired)
            .await
            .context("the leader key never went")??
            .context("the watch ended")?;
        let ms = |t: Instant| t.duration_since(killed).as_secs_f64() * 1e3;
        expiry.push(ms(expired));
        handover.push(ms(served));
        // The killed controller comes back as the follower of the next round.
        let port = a.port;
        a = spawn_controller(dir, &url, port, ttl)?;
        wait_role(&http, &a.api, "follower").await?;
        std::mem::swap(&mut a, &mut b);
    }
    progress(u64::from(args.rounds), u64::from(args.rounds));
    for c in [&mut a, &mut b] {
        let _ = c.child.kill();
        let _ = c.child.wait();
    }
    drop(etcd);

    let mut sorted = handover.clone();
    sorted.sort_by(f64::total_cmp);
    let handover_max = sorted.last().copied().unwrap_or(0.0);
    let expiry_max = expiry.iter().copied().fold(0.0, f64::max);
    Ok(HandoverReport {
        measured: format!(
            "two telvirt controller processes on one loopback etcd 3.4 (heartbeat 10 ms, election 100 ms), no VNFs stored; SIGKILL of the leader, {} rounds",
            args.rounds
        ),
        rounds: args.rounds,
        leader_ttl_ms: ttl,
        lease_expiry_max_ms: expiry_max,
        handover_max_ms: handover_max,
        handover_p50_ms: percentile(&sorted, 0.5),
        ratio_max: if expiry_max > 0.0 {
            handover_max / expiry_max
        } else {
            0.0
        },
        goal_handover_le_2000_ms: handover_max <= 2000.0,
        lease_expiry_ms: expiry,
        handover_ms: handover,
    })
}

pub fn handover(format: Output, args: HandoverArgs) -> Result<()> {
    let progress = Progress::new(format, "handover");
    let report = tokio::task::block_in_place(|| {
        tokio::runtime::Handle::current()
            .block_on(run_handover_bench(&args, &|d, t| progress.update(d, t)))
    })?;
    progress.finish();
    if output::report(format, &report)? {
        return Ok(());
    }
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
    Ok(())
}
