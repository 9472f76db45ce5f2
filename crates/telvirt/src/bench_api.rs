//! `telvirt bench api`: what TLS costs an API call, against the same call in plain HTTP.
//!
//! Owns the API transport benchmark: two `telvirt controller` processes on the embedded store,
//! one serving TLS (the benchmark's certificate, as `serve` does by default), one
//! `--plain-http` (the baseline), asked the same calls in alternation: on a kept-alive
//! connection (a small authorized list, a large document) and on a new connection per call
//! (TCP and TLS handshakes included). It must not measure the control plane's logic: both
//! processes answer the same routes from the same empty store.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde::Serialize;

use crate::bench_control::{Latency, latency, scratch_dir};
use crate::bench_handover::{ControllerProcess, bench_http};
use crate::bench_ports::ratio;
use crate::cli::Output;
use crate::output;
use crate::progress::Progress;

/// Calls made before each measured series, so a series starts on a warm connection pool.
const WARMUP_CALLS: u32 = 20;

#[derive(Args, Debug)]
pub struct ApiArgs {
    /// Calls per kept-alive series (one series per call kind, transport and round)
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub calls: u32,
    /// Calls per new-connection series (each call opens its own connection)
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub connections: u32,
    /// Rounds; in each, the plain and the TLS process take turns on every call kind
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub rounds: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct ApiFigure {
    /// The call and how its connection is used.
    pub call: String,
    /// Bytes of the answer's body.
    pub body_bytes: usize,
    /// Baseline: the same call to the `--plain-http` process.
    pub plain: Latency,
    pub tls: Latency,
    /// TLS p50 / plain p50.
    pub ratio_p50: f64,
    /// TLS p99 / plain p99.
    pub ratio_p99: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ApiReport {
    pub measured: String,
    pub rounds: u32,
    pub calls: u32,
    pub connections: u32,
    pub figures: Vec<ApiFigure>,
}

/// One kind of call: its path, whether it carries the admin's token, and whether each call
/// opens a new connection.
struct CallKind {
    name: &'static str,
    path: &'static str,
    authorized: bool,
    new_connection: bool,
}

const KINDS: [CallKind; 3] = [
    CallKind {
        name: "GET /v1/vnfs (token checked, empty list), kept-alive connection",
        path: "/v1/vnfs",
        authorized: true,
        new_connection: false,
    },
    CallKind {
        name: "GET /v1/openapi.json (large document), kept-alive connection",
        path: "/v1/openapi.json",
        authorized: false,
        new_connection: false,
    },
    CallKind {
        name: "GET /v1/vnfs, a new connection per call (handshakes included)",
        path: "/v1/vnfs",
        authorized: true,
        new_connection: true,
    },
];

/// A running API process and what calling it needs.
struct Endpoint {
    _process: ControllerProcess,
    base: String,
    token: String,
}

async fn start(dir: &Path, plain: bool) -> Result<Endpoint> {
    let args: &[&str] = if plain { &["--plain-http"] } else { &[] };
    let http = bench_http()?.timeout(Duration::from_secs(5)).build()?;
    let (process, api) =
        crate::bench_cluster::embedded_api_process(dir, &http, "controller", args).await?;
    Ok(Endpoint {
        base: process.api.clone(),
        _process: process,
        token: api.token,
    })
}

/// `n` calls of `kind` to `at` through `http`, one after another: each call's time (ms) from
/// sending to its whole body read, and the body's size.
async fn series(
    http: &reqwest::Client,
    at: &Endpoint,
    kind: &CallKind,
    n: u32,
) -> Result<(Vec<f64>, usize)> {
    let url = format!("{}{}", at.base, kind.path);
    let call = || async {
        let mut request = http.get(&url);
        if kind.authorized {
            request = request.bearer_auth(&at.token);
        }
        let answer = request.send().await.with_context(|| format!("GET {url}"))?;
        if !answer.status().is_success() {
            bail!("GET {url} answered {}", answer.status());
        }
        Ok::<_, anyhow::Error>(answer.bytes().await?.len())
    };
    for _ in 0..WARMUP_CALLS.min(n) {
        call().await?;
    }
    let (mut times, mut size) = (Vec::with_capacity(n as usize), 0);
    for _ in 0..n {
        let started = Instant::now();
        size = call().await?;
        times.push(started.elapsed().as_secs_f64() * 1e3);
    }
    Ok((times, size))
}

pub async fn run_api_bench(
    args: &ApiArgs,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<ApiReport> {
    let dir = scratch_dir("api")?;
    let result = run_in(args, &dir, progress).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn run_in(
    args: &ApiArgs,
    dir: &Path,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<ApiReport> {
    let plain = start(&dir.join("plain"), true).await?;
    let tls = start(&dir.join("tls"), false).await?;
    let kept_alive = bench_http()?.build()?;
    let fresh = bench_http()?.pool_max_idle_per_host(0).build()?;
    let total = u64::from(args.rounds) * KINDS.len() as u64 * 2;
    let mut done = 0;
    progress(done, total);
    // Per kind: (plain times, TLS times, body size).
    let mut samples: Vec<(Vec<f64>, Vec<f64>, usize)> =
        KINDS.iter().map(|_| (Vec::new(), Vec::new(), 0)).collect();
    for _ in 0..args.rounds {
        for (kind, sample) in KINDS.iter().zip(samples.iter_mut()) {
            let (http, n) = if kind.new_connection {
                (&fresh, args.connections)
            } else {
                (&kept_alive, args.calls)
            };
            let (times, size) = series(http, &plain, kind, n).await?;
            sample.0.extend(times);
            sample.2 = size;
            done += 1;
            progress(done, total);
            let (times, tls_size) = series(http, &tls, kind, n).await?;
            if tls_size != size {
                bail!(
                    "{}: the TLS process answered {tls_size} bytes, the plain one {size}: not the same call",
                    kind.name
                );
            }
            sample.1.extend(times);
            done += 1;
            progress(done, total);
        }
    }
    let figures = KINDS
        .iter()
        .zip(samples)
        .map(|(kind, (plain, tls, body_bytes))| {
            let (plain, tls) = (latency(plain), latency(tls));
            ApiFigure {
                call: kind.name.to_owned(),
                body_bytes,
                ratio_p50: ratio(tls.p50_ms, plain.p50_ms),
                ratio_p99: ratio(tls.p99_ms, plain.p99_ms),
                plain,
                tls,
            }
        })
        .collect();
    Ok(ApiReport {
        measured: format!(
            "two telvirt controller processes on the embedded store on loopback, one over TLS 1.3 (rustls, ring; an ECDSA P-256 certificate), the baseline with --plain-http; the same calls in turn from one reqwest client each way (calls one after another, each timed from sending to the whole body read), {} rounds",
            args.rounds
        ),
        rounds: args.rounds,
        calls: args.calls,
        connections: args.connections,
        figures,
    })
}

pub fn api_bench(format: Output, args: ApiArgs) -> Result<()> {
    let progress = Progress::new(format, "api");
    let report_progress = |d, t| progress.update(d, t);
    let bench = run_api_bench(&args, &report_progress);
    let Some(report) = progress.run_bench(format, bench)? else {
        return Ok(());
    };
    println!("measured: {}", report.measured);
    let rows = report
        .figures
        .iter()
        .map(|f| {
            vec![
                f.call.clone(),
                f.body_bytes.to_string(),
                format!("{:.3} / {:.3}", f.plain.p50_ms, f.plain.p99_ms),
                format!("{:.3} / {:.3}", f.tls.p50_ms, f.tls.p99_ms),
                format!("{:.2} / {:.2}", f.ratio_p50, f.ratio_p99),
            ]
        })
        .collect::<Vec<_>>();
    println!(
        "{}",
        output::table(
            &[
                "CALL",
                "BODY B",
                "PLAIN p50 / p99 ms",
                "TLS p50 / p99 ms",
                "TLS/PLAIN p50 / p99"
            ],
            &rows
        )
    );
    Ok(())
}
