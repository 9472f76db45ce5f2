//! `telvirt bench vm-move`: a vm VNF moved between the two hosts of a cluster on this machine
//! (a controller and two agent processes with tunnel addresses on loopback), live (`vnf
//! migrate`: its guest streams from one QEMU to the other and goes on) against what an operator
//! does without live migration, a cold move (deleted, created on the other host: a new guest
//! boots), alternating in one run.
//!
//! Owns the set-up, the rounds and the report. It must not time anything inside the platform:
//! the figures are the API's (total) and QEMU's (how long the guest was stopped), as the move's
//! event reports them.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde::Serialize;

use crate::bench_cluster::{Api, Hosts, embedded_controller, lay_out_hosts};
use crate::bench_control::ms;
use crate::bench_failover::{cordon, post_yaml};
use crate::bench_handover::{answer, poll_until};
use crate::bench_ports::{median, median_if_any, ratio};
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
    pub live: VmMoveFigures,
    pub cold: VmMoveFigures,
    /// Live over cold, of the medians.
    pub total_ratio: f64,
    pub outage_ratio: f64,
    /// Where the live moves' pauses went.
    pub pause_phases: PausePhaseFigures,
    /// How long after its destination resumed the guest the controller decided each live
    /// move's switch to it (its clock against the destination's; the VNF's traffic went to
    /// the source at least that long: it follows once the agents rewire), ms, of the moves
    /// whose event states it, and its median.
    pub switched_after_resume_ms: Vec<f64>,
    pub switched_after_resume_p50_ms: Option<f64>,
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

fn descriptor(memory_mib: u64, encryption: MoveEncryptionArg) -> String {
    format!(
        "apiVersion: telvirt/v1\nkind: Vnf\nmetadata: {{ name: {VNF} }}\nspec:\n  runtime: vm\n  cpu: {{ policy: dedicated, count: 1 }}\n  vm: {{ memory: {memory_mib}MiB, move_encryption: {} }}\n",
        encryption.as_str()
    )
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

/// One live move from `from`: its total ms and what its switch event states.
async fn live_move(api: &Api, from: &str) -> Result<(f64, SwitchFigures)> {
    let to = other(from);
    let asked = Instant::now();
    let _: serde_json::Value = answer(
        api.request(reqwest::Method::POST, &format!("/v1/vnfs/{VNF}/migrate"))
            .json(&serde_json::json!({ "to": to })),
    )
    .await?;
    let moved = poll_until(Duration::from_secs(240), "the vm moved", || async {
        running_alone(api).await.as_deref() == Some(to)
    })
    .await;
    with_state(api, moved).await?;
    let total = ms(asked.elapsed());
    Ok((total, switch_figures(api).await?))
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
    }
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
        control_priority: args.agents.control_priority,
    };
    lay_out_hosts(&api, &mut hosts, 2).await?;
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
    cordon(&api, "h2", true).await?;
    let yaml = descriptor(args.memory_mib, args.move_encryption);
    post_yaml(&api, "/v1/vnfs", yaml.clone()).await?;
    let ran = poll_until(Duration::from_secs(300), "the vm running on h1", || async {
        running_alone(&api).await.as_deref() == Some("h1")
    })
    .await;
    with_state(&api, ran).await?;
    cordon(&api, "h2", false).await?;
    progress(1, total_steps);
    let (mut live_total, mut live_outage, mut live_mib) = (Vec::new(), Vec::new(), Vec::new());
    let mut live_downtime = Vec::new();
    let mut unmeasured = 0;
    let mut phases: [Vec<f64>; 4] = Default::default();
    let mut switched_after_resume_ms = Vec::new();
    let (mut cold_total, mut cold_outage) = (Vec::new(), Vec::new());
    let mut at = "h1".to_owned();
    for i in 0..args.rounds {
        let (total, moved) = live_move(&api, &at).await?;
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
        let total = cold_move(&api, &at, &yaml).await?;
        // The guest is gone from the delete until the new one runs.
        cold_total.push(total);
        cold_outage.push(total);
        at = other(&at).to_owned();
        progress(3 + 2 * u64::from(i), total_steps);
    }
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
    let cold = figures(
        "cold move (deleted, created on the other host: a new guest boots)",
        cold_total,
        cold_outage,
        Vec::new(),
        Vec::new(),
    );
    if live.outage_ms.is_empty() {
        bail!("no live move's whole pause was measured ({unmeasured} moves' events stated none)");
    }
    Ok(VmMoveReport {
        measured: "the default guest (1 vCPU) moved between two agents' hosts on loopback through a controller, live against cold, alternating".into(),
        qemu: args.qemu.as_ref().map_or_else(
            || "qemu-system-x86_64 on PATH".to_owned(),
            |q| q.display().to_string(),
        ),
        rounds: args.rounds,
        memory_mib: args.memory_mib,
        move_encryption: args.move_encryption,
        control_priority: args.agents.control_priority,
        total_ratio: ratio(live.total_p50_ms, cold.total_p50_ms),
        outage_ratio: ratio(live.outage_p50_ms, cold.outage_p50_ms),
        live,
        cold,
        pause_phases,
        switched_after_resume_p50_ms: median_if_any(switched_after_resume_ms.iter().copied()),
        switched_after_resume_ms,
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
    Ok(())
}
