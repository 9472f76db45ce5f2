//! `telvirt bench vhost`: frames through the default guest over its vhost-user NICs (the data
//! plane's copies straight into and out of the guest's shared memory) against the same guest
//! on two TAP NICs (virtio-net on QEMU's tap backend, host ports on the TAPs), in one run,
//! alternating which goes first.
//!
//! Owns the two guests, the TAPs it creates and the trials. Both paths carry the same frames
//! from the same generator to the same sink (a flood in this process, `flood_node` and
//! `flood`) and cross the same bridge inside the same guest image; only the transport between
//! the panel and the guest differs. While one guest is measured the other is paused. It must
//! not leave a TAP or a QEMU behind.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use clap::Args;
use serde::Serialize;
use telvirt_dataplane::bench::{FloodRun, HostEnd, RateSearch, flood, flood_node, search_floods};
use telvirt_runtime_vm::{
    AccelProbe, Grant, Peripheral, VhostUserNic, VmConfig, VmHandle, VmManager,
};
use telvirt_vhost::{NicSocket, VhostUserNode};

use crate::bench_handover::poll_until;
use crate::bench_ports::{median, ratio};
use crate::cli::Output;
use crate::output;
use crate::progress::Progress;
use crate::vm::{AccelArg, ImageArgs};

#[derive(Args, Debug)]
pub struct VhostArgs {
    /// Rounds; each floods both guests once, the first alternating
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub rounds: u32,
    /// Frames of each flood
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1_000..=10_000_000))]
    pub frames: u64,
    /// Bytes per frame as written (Ethernet, IPv4 and UDP headers and payload; no FCS)
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(64..=1514))]
    pub size: u64,
    /// Halvings of each NDR and PDR search; 0 skips the searches
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(0..=20))]
    pub search_steps: u32,
    /// How long each search trial offers its rate, in milliseconds (long: frames a link's
    /// ring holds when a trial ends still arrive and count, at most 4,352 a trial on the
    /// vhost-user path, whose back-pressure keeps them, against none on the TAP path)
    #[arg(long, default_value_t = 2_000, value_parser = clap::value_parser!(u64).range(10..=60_000))]
    pub trial_ms: u64,
    /// The highest rate the searches try, frames per second
    #[arg(long, default_value_t = 200_000, value_parser = clap::value_parser!(u64).range(1_000..=100_000_000))]
    pub search_max_pps: u64,
    #[arg(long, value_enum, default_value_t = AccelArg::Auto)]
    pub accel: AccelArg,
    /// Guest RAM of each guest, MiB
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(128..=4096))]
    pub memory_mib: u64,
    #[command(flatten)]
    pub image: ImageArgs,
}

/// One path in one round: the full-speed flood and the rate search.
#[derive(Debug, Serialize)]
pub struct PathRun {
    pub flood: FloodRun,
    /// NDR and PDR (absent with `--search-steps 0`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub search: Option<RateSearch>,
}

/// One transport, every round.
#[derive(Debug, Serialize)]
pub struct TransportFigures {
    pub setup: &'static str,
    pub runs: Vec<PathRun>,
    /// Full speed: frames received per second at the sink, millions, each round.
    pub mpps: Vec<f64>,
    pub mpps_p50: f64,
    /// Full speed: frames sent and not received, each round.
    pub lost: Vec<u64>,
    /// No-drop and partial-drop (≤ 0.1%) rates, medians, millions of frames per second (0
    /// without searches).
    pub ndr_mpps: f64,
    pub pdr_mpps: f64,
}

impl TransportFigures {
    fn new(setup: &'static str, runs: Vec<PathRun>) -> Self {
        let mpps: Vec<f64> = runs.iter().map(|r| r.flood.mpps).collect();
        let searched = |f: fn(&RateSearch) -> u64| {
            median(
                runs.iter()
                    .filter_map(|r| r.search.as_ref())
                    .map(|s| f(s) as f64 / 1e6),
            )
        };
        TransportFigures {
            setup,
            mpps_p50: median(mpps.iter().copied()),
            lost: runs
                .iter()
                .map(|r| r.flood.sent.saturating_sub(r.flood.received))
                .collect(),
            ndr_mpps: searched(|s| s.ndr_pps),
            pdr_mpps: searched(|s| s.pdr_pps),
            mpps,
            runs,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct VhostReport {
    pub measured: String,
    pub accel: String,
    pub rounds: u32,
    pub frames: u64,
    pub size: u64,
    pub vhost_user: TransportFigures,
    pub tap: TransportFigures,
    /// `vhost_user.mpps_p50 / tap.mpps_p50`.
    pub mpps_ratio: f64,
    /// `vhost_user.ndr_mpps / tap.ndr_mpps` (0 without searches).
    pub ndr_ratio: f64,
    /// `vhost_user.pdr_mpps / tap.pdr_mpps` (0 without searches).
    pub pdr_ratio: f64,
}

/// Two TAP devices, deleted on drop.
struct Taps(Vec<String>);

impl Taps {
    fn create(names: &[String]) -> Result<Taps> {
        let mut taps = Taps(Vec::new());
        for name in names {
            crate::cluster::ip(&["tuntap", "add", "dev", name, "mode", "tap"])?;
            taps.0.push(name.clone());
            crate::cluster::ip(&["link", "set", name, "up"])?;
        }
        Ok(taps)
    }
}

impl Drop for Taps {
    fn drop(&mut self) {
        for name in &self.0 {
            let _ = Command::new("ip").args(["link", "del", name]).output();
        }
    }
}

/// `telvirt bench vhost` (called from the synchronous bench dispatcher).
pub fn vhost_bench(format: Output, args: VhostArgs) -> Result<()> {
    if !crate::cluster::is_root() {
        bail!("bench vhost creates TAP devices: run it as root");
    }
    let progress = Progress::new(format, "vhost");
    let Some(report) = progress.run_bench(format, run(format, &args, &progress))? else {
        return Ok(());
    };
    println!("{}", report.measured);
    let row = |f: &TransportFigures| {
        vec![
            f.setup.to_owned(),
            format!("{:.4}", f.mpps_p50),
            format!("{:.4}", f.ndr_mpps),
            format!("{:.4}", f.pdr_mpps),
            f.mpps
                .iter()
                .map(|m| format!("{m:.4}"))
                .collect::<Vec<_>>()
                .join(" "),
            f.lost
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(" "),
        ]
    };
    println!(
        "{}",
        output::table(
            &[
                "NICS",
                "FLOOD Mpps",
                "NDR Mpps",
                "PDR Mpps",
                "ROUNDS Mpps",
                "LOST"
            ],
            &[row(&report.vhost_user), row(&report.tap)]
        )
    );
    println!(
        "vhost-user / TAP: flood {:.2}, NDR {:.2}, PDR {:.2} ({} frames of {} bytes per flood, {})",
        report.mpps_ratio,
        report.ndr_ratio,
        report.pdr_ratio,
        report.frames,
        report.size,
        report.accel
    );
    Ok(())
}

async fn run(format: Output, args: &VhostArgs, progress: &Progress) -> Result<VhostReport> {
    // A fresh directory only this user may enter: the node connects to the sockets in it.
    let scratch = crate::vm::scratch_dir("tvbv")?;
    measure(format, args, scratch.path(), progress).await
}

async fn measure(
    format: Output,
    args: &VhostArgs,
    scratch: &Path,
    progress: &Progress,
) -> Result<VhostReport> {
    let guest = crate::vm::bench_guest(
        format,
        &args.image,
        scratch,
        args.rounds,
        args.accel,
        args.memory_mib,
    )
    .await?;
    let probe = AccelProbe::new(&guest.probe_cache)
        .with_guest(&guest.kernel, &guest.initrd)
        .qemu_binary(&guest.qemu);
    let accel = probe
        .resolve(guest.accel)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .accel;
    let mgr = VmManager::new(&guest.state_root, probe).qemu_binary(&guest.qemu);
    let config = |name: &str| {
        let mut c = VmConfig::new(name, &guest.kernel, &guest.initrd);
        c.accel = guest.accel;
        c.memory_mib = guest.memory_mib;
        c
    };

    let id = std::process::id() % 100_000;
    let tap_names = [format!("tvbv{id}a"), format!("tvbv{id}b")];
    let _taps = Taps::create(&tap_names)?;
    let sockets = [scratch.join("n0.sock"), scratch.join("n1.sock")];
    let nics = [
        NicSocket::open(&sockets[0], "bench.n0")?,
        NicSocket::open(&sockets[1], "bench.n1")?,
    ];

    let mut vhost_cfg = config("tvb-vhu");
    vhost_cfg.shared_memory = true;
    vhost_cfg.vhost_user_nics = (0..2)
        .map(|i| VhostUserNic {
            id: format!("nic{i}"),
            socket: sockets[i].clone(),
            mac: format!("52:54:00:00:01:0{i}"),
        })
        .collect();
    let mut tap_cfg = config("tvb-tap");
    tap_cfg.peripherals = (0..2)
        .map(|i| Grant {
            id: format!("tap{i}"),
            peripheral: Peripheral::VirtioNet {
                tap: tap_names[i].clone(),
                mac: Some(format!("52:54:00:00:02:0{i}")),
            },
        })
        .collect();

    // Whatever happens next (an error, an interrupt), neither guest outlives the benchmark.
    let _sweep = crate::bench_control::QemuSweep(
        ["tvb-vhu", "tvb-tap"]
            .map(|n| (mgr.state_dir(n), n.to_owned()))
            .to_vec(),
    );
    progress.note("booting the two guests");
    let vhost_vm = mgr
        .start(vhost_cfg)
        .await
        .map_err(|e| anyhow::anyhow!("the vhost-user guest: {e}"))?;
    let guests = async {
        let tap_vm = mgr
            .start(tap_cfg)
            .await
            .map_err(|e| anyhow::anyhow!("the TAP guest: {e}"))?;
        let r = trials(args, progress, &nics, &tap_names, &vhost_vm, &tap_vm).await;
        let _ = tap_vm.kill().await;
        r
    }
    .await;
    let _ = vhost_vm.kill().await;
    let (vhost_runs, tap_runs) = guests?;

    let vhost_user = TransportFigures::new(
        "vhost-user NICs (the data plane in the guest's shared memory)",
        vhost_runs,
    );
    let tap = TransportFigures::new(
        "TAP NICs (QEMU's tap backend, host ports on the TAPs)",
        tap_runs,
    );
    let mpps_ratio = ratio(vhost_user.mpps_p50, tap.mpps_p50);
    let ndr_ratio = ratio(vhost_user.ndr_mpps, tap.ndr_mpps);
    let pdr_ratio = ratio(vhost_user.pdr_mpps, tap.pdr_mpps);
    Ok(VhostReport {
        measured: format!(
            "{} frames of {} bytes, as fast as each path takes them, from a generator to a sink in this process through the default guest's bridge ({} MiB, 1 vCPU, {}), its NICs vhost-user against TAP, alternating, the other guest paused",
            args.frames,
            args.size,
            guest.memory_mib,
            accel.as_str()
        ),
        accel: accel.as_str().to_owned(),
        rounds: args.rounds,
        frames: args.frames,
        size: args.size,
        vhost_user,
        tap,
        mpps_ratio,
        ndr_ratio,
        pdr_ratio,
    })
}

/// One path's flood: `(rate, count)` → a run (rate `None`: as fast as the path takes them).
type PathFlood<'a> = dyn FnMut(Option<u64>, u64) -> telvirt_dataplane::Result<FloodRun> + 'a;

/// Floods a few frames until the path carries one: a guest just booted may not forward yet
/// (seen on the TAP guest for its first seconds under TCG). Each path gets the same warm-up.
fn until_it_carries(what: &str, path: &mut PathFlood<'_>) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let r = path(Some(1_000), 64).map_err(|e| anyhow::anyhow!("flood: {e}"))?;
        if r.received > 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{what} forwarded no frame within 90 s of its boot");
        }
    }
}

/// One round of one path: the flood at full speed, then the NDR/PDR search.
fn one_path(args: &VhostArgs, path: &mut PathFlood<'_>) -> Result<PathRun> {
    let flood = path(None, args.frames).map_err(|e| anyhow::anyhow!("flood: {e}"))?;
    let search = if args.search_steps > 0 {
        Some(
            search_floods(
                args.search_steps,
                args.trial_ms,
                args.search_max_pps,
                &mut |rate, count| path(Some(rate), count),
            )
            .map_err(|e| anyhow::anyhow!("rate search: {e}"))?,
        )
    } else {
        None
    };
    Ok(PathRun { flood, search })
}

/// The rounds: each measures both guests, pausing the one not measured.
async fn trials(
    args: &VhostArgs,
    progress: &Progress,
    nics: &[NicSocket; 2],
    taps: &[String; 2],
    vhost_vm: &VmHandle,
    tap_vm: &VmHandle,
) -> Result<(Vec<PathRun>, Vec<PathRun>)> {
    // The guest's driver posts its receive buffers (a kick) once it is up.
    poll_until(
        Duration::from_secs(60),
        "the vhost-user guest taking its NICs' queues",
        || async { nics.iter().all(NicSocket::is_running) },
    )
    .await?;
    let size = usize::try_from(args.size).unwrap_or(64);
    let mut vhost_path = |rate: Option<u64>, count: u64| {
        let node = VhostUserNode::new(vec![nics[0].port(), nics[1].port()]);
        flood_node(
            Box::new(node),
            "n0",
            "n1",
            size,
            rate,
            count,
            &mut |_, _| {},
        )
    };
    let end = |i: usize| HostEnd {
        netns: None,
        ifname: taps[i].clone(),
    };
    let (tap_in, tap_out) = (end(0), end(1));
    let mut tap_path =
        |rate: Option<u64>, count: u64| flood(&tap_in, &tap_out, size, rate, count, &mut |_, _| {});
    until_it_carries("the vhost-user guest", &mut vhost_path)?;
    until_it_carries("the TAP guest", &mut tap_path)?;
    let (mut vhost_runs, mut tap_runs) = (Vec::new(), Vec::new());
    let total = u64::from(args.rounds) * 2;
    let mut done = 0;
    for round in 0..args.rounds {
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for side in order {
            let (measured, paused) = if side == 0 {
                (vhost_vm, tap_vm)
            } else {
                (tap_vm, vhost_vm)
            };
            paused
                .pause()
                .await
                .map_err(|e| anyhow::anyhow!("pausing {}: {e}", paused.name()))?;
            measured
                .resume()
                .await
                .map_err(|e| anyhow::anyhow!("resuming {}: {e}", measured.name()))?;
            if side == 0 {
                vhost_runs.push(one_path(args, &mut vhost_path)?);
            } else {
                tap_runs.push(one_path(args, &mut tap_path)?);
            }
            done += 1;
            progress.update(done, total);
        }
    }
    Ok((vhost_runs, tap_runs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use telvirt_dataplane::bench::Trial;
    use telvirt_dataplane::hist::Percentiles;

    fn run(mpps: f64, lost: u64, ndr_pps: u64) -> PathRun {
        PathRun {
            flood: FloodRun {
                rate_pps: None,
                sent: 1000,
                received: 1000 - lost,
                mpps,
                offered_mpps: mpps,
                latency: Percentiles::default(),
            },
            search: Some(RateSearch {
                ndr_pps,
                pdr_pps: ndr_pps + 1000,
                trials: Vec::<Trial>::new(),
            }),
        }
    }

    #[test]
    fn figures_are_the_medians_of_the_rounds() {
        let f = TransportFigures::new(
            "t",
            vec![
                run(0.3, 0, 20_000),
                run(0.1, 5, 10_000),
                run(0.2, 1, 30_000),
            ],
        );
        assert_eq!(f.mpps_p50, 0.2);
        assert_eq!(f.lost, vec![0, 5, 1]);
        assert_eq!(f.ndr_mpps, 0.02);
        assert_eq!(f.pdr_mpps, 0.021);
    }
}
