//! `telvirt bench vm-migrate`: live migration of the default guest while its agent dirties
//! memory at several rates, telvirt's tuning ([`MigrationTuning::tuned`]) over telvirt's
//! channel (a connection with bounded buffers, the stream sealed by a relay at each end as the
//! cluster's agents seal it, ADR 066's last addendum) against QEMU's defaults over QEMU's own
//! connection, in the same run, alternating which goes first. Per migration: whether it converged
//! within the deadline, total time, the guest's pause (QEMU's `downtime`, the source's own
//! measure, and the whole pause the guest saw: from when the source QEMU began stopping it
//! (`pause_began_at_us`) to the destination QEMU's `RESUME`, by their own times on this
//! host's clock) and the bytes
//! sent, and whether the guest came through intact (answering on the destination with its dirtier
//! still counting: under QEMU 7.2's TCG some migrations deliver a guest that panics at once).
//! Owns the measurement; must not print.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use telvirt_guest::proto::{Body, Request, Workload};

use crate::accel::AccelProbe;
use crate::bench::{BenchOptions, median};
use crate::config::VmConfig;
use crate::error::{Error, Result};
use crate::manager::{VmHandle, VmManager};
use crate::migrate::{
    MigrationChannel, MigrationTuning, STREAM_BUFFER_BYTES, StreamEnd, stream_socket,
};
use crate::stream_seal::StreamSecret;

/// What [`run`] measures.
#[derive(Debug, Clone)]
pub struct MigrateBenchOptions {
    /// The guest, the rounds, the scratch root and the accelerator, as `bench vm` takes them
    /// (its `vcpu_cpu` and `boot_deadline` are not used here).
    pub guest: BenchOptions,
    /// Memory the guest's dirtier keeps and rewrites.
    pub dirty_mib: u64,
    /// Dirty rates to measure, MiB/s (0: an idle guest).
    pub rates: Vec<u64>,
    /// A migration not done by then is cancelled and counts as not converged.
    pub deadline: Duration,
}

/// One migration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationSample {
    /// Completed within the deadline.
    pub converged: bool,
    /// Why the stream failed before the deadline (`None`: it converged, or ran out of time).
    pub failed: Option<String>,
    /// The guest answered at the destination and its dirtier counted on (converged only).
    pub intact: bool,
    /// Why it is not intact.
    pub broken: Option<String>,
    /// QEMU's total time (converged only).
    pub total_ms: Option<f64>,
    /// QEMU's measure of the guest's pause (converged only): the source's, until its last
    /// byte left.
    pub downtime_ms: Option<f64>,
    /// The whole pause (intact only): from when the source began stopping the guest until it
    /// ran again at the destination (`pause_began_at_us`, QEMU's `RESUME` event), which
    /// includes resuming it there.
    #[serde(default)]
    pub paused_ms: Option<f64>,
    pub transferred_mib: f64,
}

/// One tuning at one rate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TuningFigures {
    /// The tuning as its channel carried it (a passed socket is one stream: no multifd).
    pub tuning: MigrationTuning,
    /// What the stream crossed.
    #[serde(default)]
    pub channel: String,
    /// Migrations that converged, of `rounds`.
    pub converged: u32,
    /// Converged migrations whose guest came through intact.
    pub intact: u32,
    /// Medians over the converged ones (0 when none did).
    pub total_ms: f64,
    pub downtime_ms: f64,
    #[serde(default)]
    pub paused_ms: f64,
    pub transferred_mib: f64,
    pub samples: Vec<MigrationSample>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RateFigures {
    pub dirty_mib_per_s: u64,
    pub telvirt: TuningFigures,
    /// Baseline: QEMU's defaults, same guest, same run.
    pub qemu_defaults: TuningFigures,
    /// telvirt / defaults of the median total (0 unless both converged in every round).
    pub total_ratio: f64,
    /// telvirt / defaults of the median downtime (0 unless both converged in every round).
    pub downtime_ratio: f64,
    /// telvirt / defaults of the median whole pause (0 unless both came through every round).
    #[serde(default)]
    pub paused_ratio: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrateBenchReport {
    pub measured: String,
    pub accel: String,
    /// Both QEMUs' `major.minor`, when read.
    pub qemu: Option<String>,
    pub rounds: u32,
    pub memory_mib: u64,
    pub dirty_mib: u64,
    pub deadline_ms: u64,
    pub rates: Vec<RateFigures>,
}

/// A loopback port of this process's and its address.
fn bound_port() -> Result<(std::net::TcpListener, SocketAddr)> {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").map_err(Error::io("bind a port"))?;
    let at = taken.local_addr().map_err(Error::io("read a bound port"))?;
    Ok((taken, at))
}

/// How a migration's stream travels: telvirt's way, a loopback TCP connection opened here with
/// the buffers the cluster's agents give a guest stream ([`STREAM_BUFFER_BYTES`]) and passed
/// to both QEMUs (one stream, as between two agents), or QEMU's own, its destination listening
/// on a loopback address and the source connecting with the kernel's own buffers (multifd
/// opening further channels when the tuning asks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Channel {
    Passed,
    QemuTcp,
}

impl Channel {
    fn describe(self) -> String {
        match self {
            Self::Passed => format!(
                "a loopback TCP connection passed to both QEMUs, {} KiB buffers asked, the stream sealed with AES-256-GCM by a relay at each end (as between two agents)",
                STREAM_BUFFER_BYTES >> 10
            ),
            Self::QemuTcp => "QEMU's own loopback TCP connection(s), the kernel's buffers".into(),
        }
    }

    /// The destination's end and the source's.
    fn open(self) -> Result<(MigrationChannel, MigrationChannel)> {
        if self == Self::QemuTcp {
            // A loopback address nobody listens on once the port is let go.
            let (_, at) = bound_port()?;
            return Ok((MigrationChannel::Tcp(at), MigrationChannel::Tcp(at)));
        }
        let (listener, at) = bound_port()?;
        let out = std::net::TcpStream::connect(at).map_err(Error::io("connect on loopback"))?;
        let mine = out
            .local_addr()
            .map_err(Error::io("read a connected port"))?;
        // The connection just made, not another that reached the port first.
        let into = loop {
            let (into, from) = listener.accept().map_err(Error::io("accept on loopback"))?;
            if from == mine {
                break into;
            }
        };
        // A key of this connection alone, both ends given it, as the agents give theirs.
        let secret = StreamSecret::random().map_err(Error::io("draw a stream's key"))?;
        Ok((
            MigrationChannel::encrypted(
                stream_socket(into, StreamEnd::Destination)
                    .map_err(Error::io("make a stream's destination socket"))?,
                secret.clone(),
            ),
            MigrationChannel::encrypted(
                stream_socket(out, StreamEnd::Source)
                    .map_err(Error::io("make a stream's source socket"))?,
                secret,
            ),
        ))
    }
}

async fn health(vm: &VmHandle) -> Result<telvirt_guest::proto::Health> {
    match vm
        .agent_request(Request::Health, Duration::from_secs(30))
        .await?
    {
        Body::Health(h) => Ok(h),
        other => Err(Error::Agent(format!("health answered {other:?}"))),
    }
}

/// Kills its guest's QEMU when dropped (QEMU runs in a process group of its own: a benchmark
/// interrupted, its future dropped, would leave it running otherwise).
struct KillOnDrop<'a>(&'a VmHandle);

impl Drop for KillOnDrop<'_> {
    fn drop(&mut self) {
        self.0.kill_now();
    }
}

/// Boots a source, dirties at `rate`, migrates it with `tuning`, checks the guest goes on at
/// the destination, stops both (also when the benchmark is dropped half way).
async fn one(
    mgr: &VmManager,
    opts: &MigrateBenchOptions,
    rate: u64,
    tuning: &MigrationTuning,
    channel: Channel,
    n: u32,
) -> Result<MigrationSample> {
    let config = |name: String| {
        let g = &opts.guest;
        let mut c = VmConfig::new(&name, &g.kernel, &g.initrd);
        c.accel = g.accel;
        c.memory_mib = g.memory_mib;
        c
    };
    let src = mgr.start(config(format!("mbs{n}"))).await?;
    let _src_killed = KillOnDrop(&src);
    let result = async {
        if rate > 0 {
            let dirty = Workload::DirtyMemory {
                size_mib: opts.dirty_mib,
                mib_per_s: rate,
            };
            match src
                .agent_request(Request::Run { workload: dirty }, Duration::from_secs(30))
                .await?
            {
                Body::Started { .. } => {}
                other => {
                    return Err(Error::Agent(format!(
                        "the dirtier did not start: {other:?}"
                    )));
                }
            }
            // Its whole set is written once before the clock starts.
            let deadline = Instant::now() + Duration::from_secs(60);
            while health(&src).await?.dirtied_mib < opts.dirty_mib {
                if Instant::now() > deadline {
                    return Err(Error::Timeout {
                        what: "the dirtier to write its set once".into(),
                        after: Duration::from_secs(60),
                    });
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let (from, to) = channel.open()?;
        let dst = mgr
            .start_incoming(config(format!("mbd{n}")), &from, tuning)
            .await?;
        // QEMU (or its sealing relay) holds its own copy of a passed socket now.
        drop(from);
        let _dst_killed = KillOnDrop(&dst);
        // The destination is killed on every path, measured or not.
        let measured = measure(&src, &dst, &to, opts, rate, tuning).await;
        let _ = dst.kill().await;
        measured
    }
    .await;
    let _ = src.kill().await;
    for name in [format!("mbs{n}"), format!("mbd{n}")] {
        let _ = mgr.remove(&name);
    }
    result
}

/// Migrates `src` to `dst` over `to` and tells what came of it.
async fn measure(
    src: &VmHandle,
    dst: &VmHandle,
    to: &MigrationChannel,
    opts: &MigrateBenchOptions,
    rate: u64,
    tuning: &MigrationTuning,
) -> Result<MigrationSample> {
    let started = Instant::now();
    // The destination waits for its stream while the source streams, as an agent's does: it
    // resumes the guest as soon as its stream completed.
    let incoming = dst.finish_incoming(opts.deadline + Duration::from_secs(30));
    tokio::pin!(incoming);
    let outgoing = src.migrate_to(to, tuning, opts.deadline, |_| {});
    tokio::pin!(outgoing);
    let mut arrived = None;
    let moved = loop {
        tokio::select! {
            moved = &mut outgoing => break moved,
            a = &mut incoming, if arrived.is_none() => arrived = Some(a),
        }
    };
    Ok(match moved {
        Ok(done) => {
            let arrived = match arrived {
                Some(a) => a,
                None => incoming.await,
            };
            let broken = match arrived {
                Ok(_) => intact(dst, rate).await,
                Err(e) => Err(e),
            }
            .err()
            .map(|e| e.to_string());
            let paused_ms = telvirt_model::api::ms_between(done.stopped_at_us, dst.resumed_at_us())
                .filter(|_| broken.is_none());
            MigrationSample {
                paused_ms,
                converged: true,
                failed: None,
                intact: broken.is_none(),
                broken,
                // QEMU's figure; `None` if it never filled it in.
                total_ms: (done.total_ms > 0).then_some(done.total_ms as f64),
                downtime_ms: done.downtime_ms.map(|d| d as f64),
                transferred_mib: done.transferred_bytes as f64 / (1 << 20) as f64,
            }
        }
        // Not converged by the deadline, or a stream that failed: told apart.
        Err(Error::Migration { reason, .. }) => MigrationSample {
            converged: false,
            failed: (started.elapsed() < opts.deadline).then_some(reason),
            intact: false,
            broken: None,
            total_ms: None,
            downtime_ms: None,
            paused_ms: None,
            transferred_mib: 0.0,
        },
        Err(e) => return Err(e),
    })
}

/// Whether the guest came through, once resumed at the destination: its agent answers there
/// and, when it was dirtying memory, its dirtier counts on.
async fn intact(dst: &VmHandle, rate: u64) -> Result<()> {
    let before = health(dst).await?;
    if rate > 0 {
        let deadline = Instant::now() + Duration::from_secs(30);
        while health(dst).await?.dirtied_mib <= before.dirtied_mib {
            if Instant::now() > deadline {
                return Err(Error::Migration {
                    vm: dst.name().to_owned(),
                    reason: "the guest's dirtier stopped counting after the move".into(),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}

fn figures(
    tuning: MigrationTuning,
    channel: Channel,
    samples: Vec<MigrationSample>,
) -> TuningFigures {
    let done: Vec<&MigrationSample> = samples.iter().filter(|s| s.converged).collect();
    // Medians over the figures QEMU gave: a missing one is left out, never counted as 0.
    let med = |f: &dyn Fn(&MigrationSample) -> Option<f64>| {
        median(&done.iter().filter_map(|s| f(s)).collect::<Vec<_>>())
    };
    TuningFigures {
        tuning,
        channel: channel.describe(),
        converged: done.len() as u32,
        intact: done.iter().filter(|s| s.intact).count() as u32,
        total_ms: med(&|s| s.total_ms),
        downtime_ms: med(&|s| s.downtime_ms),
        paused_ms: med(&|s| s.paused_ms),
        transferred_mib: med(&|s| Some(s.transferred_mib)),
        samples,
    }
}

/// Runs the benchmark; `progress(done, total)` after every migration.
pub async fn run(
    opts: &MigrateBenchOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<MigrateBenchReport> {
    let g = &opts.guest;
    if g.rounds == 0 || opts.rates.is_empty() {
        return Err(Error::InvalidConfig {
            field: "rounds",
            reason: "at least one round and one rate".into(),
        });
    }
    let probe = AccelProbe::new(&g.probe_cache)
        .with_guest(&g.kernel, &g.initrd)
        .qemu_binary(&g.qemu);
    let accel = probe.resolve(g.accel).await?.accel;
    let mgr = VmManager::new(&g.state_root, probe).qemu_binary(&g.qemu);
    let qemu = mgr.qemu_caps().await.version;
    // telvirt's tuning over telvirt's channel, as its agents move a guest; QEMU's defaults
    // over QEMU's own.
    let channels = [Channel::Passed, Channel::QemuTcp];
    let tunings = [
        MigrationTuning::tuned(accel, qemu).over_one_stream(),
        MigrationTuning::qemu_defaults(),
    ];
    let total = opts.rates.len() as u64 * u64::from(g.rounds) * 2;
    let (mut done, mut n) = (0u64, 0u32);
    let mut rates = Vec::new();
    for &rate in &opts.rates {
        let mut samples: [Vec<MigrationSample>; 2] = [Vec::new(), Vec::new()];
        for round in 0..g.rounds {
            // Alternate which goes first so drift in host load hits both alike.
            for side in if round % 2 == 0 { [0, 1] } else { [1, 0] } {
                n += 1;
                samples[side].push(one(&mgr, opts, rate, &tunings[side], channels[side], n).await?);
                done += 1;
                progress(done, total);
            }
        }
        let [ours, theirs] = samples;
        let (telvirt, qemu_defaults) = (
            figures(tunings[0].clone(), channels[0], ours),
            figures(tunings[1].clone(), channels[1], theirs),
        );
        let ratio = |a: f64, b: f64, both: bool| if both && b > 0.0 { a / b } else { 0.0 };
        // Compared only when both converged in every round: medians over the same runs.
        let both = telvirt.converged == g.rounds && qemu_defaults.converged == g.rounds;
        rates.push(RateFigures {
            dirty_mib_per_s: rate,
            total_ratio: ratio(telvirt.total_ms, qemu_defaults.total_ms, both),
            downtime_ratio: ratio(telvirt.downtime_ms, qemu_defaults.downtime_ms, both),
            paused_ratio: ratio(
                telvirt.paused_ms,
                qemu_defaults.paused_ms,
                telvirt.intact == g.rounds && qemu_defaults.intact == g.rounds,
            ),
            telvirt,
            qemu_defaults,
        });
    }
    let version = qemu.map(|(major, minor)| format!("{major}.{minor}"));
    Ok(MigrateBenchReport {
        measured: format!(
            "the default guest ({} MiB, 1 vCPU, {}) migrated between two QEMUs {} on this machine over loopback TCP, its agent dirtying {} MiB at each rate; telvirt's tuning over telvirt's channel (a connection passed to both QEMUs, as between two agents) against QEMU's defaults over QEMU's own connection in the same run, alternating; each migrated guest checked to go on at the destination (intact)",
            g.memory_mib,
            accel.as_str(),
            version
                .as_deref()
                .unwrap_or("(of a version that was not read)"),
            opts.dirty_mib
        ),
        accel: accel.as_str().to_owned(),
        qemu: version,
        rounds: g.rounds,
        memory_mib: g.memory_mib,
        dirty_mib: opts.dirty_mib,
        deadline_ms: opts.deadline.as_millis() as u64,
        rates,
    })
}
