//! `telvirt vnf migrate`: starts (or cancels) the move of a VNF to another host and
//! follows it to its end with a progress bar (quiet with `-o json`).
//!
//! Owns the command's flags, its request and how it reports the move. It must not decide
//! anything about the move: the controller does, the agents carry it out.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use clap::Args;
use reqwest::Method;
use telvirt_model::api::{MigrateRequest, ReplicationStatus};
use telvirt_model::{Event, Role, Vnf, WasmEngine};

use crate::cli::Output;
use crate::client::Client;
use crate::output;
use crate::progress::Progress;

#[derive(Args, Debug)]
pub struct MigrateArgs {
    pub name: String,
    /// The destination host [default: another host with room and a tunnel address whose
    /// agent can run the guest: for a vm, its accelerator, a QEMU no older, the machine type]
    #[arg(long, conflicts_with = "cancel")]
    pub to: Option<String>,
    /// The engine the destination runs the module on (the maps' snapshot does not depend on
    /// it)
    #[arg(long, value_enum, conflicts_with = "cancel")]
    pub engine: Option<EngineArg>,
    /// End the move under way; the VNF stays where it runs
    #[arg(long)]
    pub cancel: bool,
    /// Return once the move started, without following it
    #[arg(long, conflicts_with = "cancel")]
    pub no_wait: bool,
    /// How long to follow the move before giving up following (the move goes on), in seconds
    #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub timeout: u64,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy)]
pub enum EngineArg {
    Cranelift,
    Pulley,
}

impl From<EngineArg> for WasmEngine {
    fn from(e: EngineArg) -> Self {
        match e {
            EngineArg::Cranelift => WasmEngine::Cranelift,
            EngineArg::Pulley => WasmEngine::Pulley,
        }
    }
}

/// One line on how far the state's stream got: a guest's phase, sent, left and dirty rate;
/// a wasm VNF's bytes.
fn stream_note(r: &ReplicationStatus) -> String {
    const MIB: u64 = 1 << 20;
    match &r.guest {
        Some(g) => format!(
            "{} (guest {}): {} of {} MiB sent, {} MiB left, {} pages dirtied/s",
            r.state,
            g.status,
            g.transferred_bytes / MIB,
            g.total_bytes / MIB,
            g.remaining_bytes / MIB,
            g.dirty_pages_per_s
        ),
        None if r.packets_passed > 0 => format!(
            "{} {} B, {} queued packets passed on",
            r.state, r.bytes, r.packets_passed
        ),
        None => format!("{} {} B", r.state, r.bytes),
    }
}

/// The figures of a move's switch event (`moved from host A to host B (FIGURES)`): what
/// streamed, and how long the VNF stood still; `None` for another event.
pub(crate) fn switch_figures(reason: &str) -> Option<&str> {
    let rest = reason.strip_prefix("moved from host ")?;
    let (_, figures) = rest.split_once(" (")?;
    figures.rfind(')').map(|end| &figures[..end])
}

fn active_host(v: &Vnf) -> Option<&str> {
    v.placements
        .iter()
        .find(|p| p.role == Role::Active)
        .map(|p| p.host.as_str())
}

pub async fn migrate(client: &Client, format: Output, args: MigrateArgs) -> Result<()> {
    let name = &args.name;
    let request = MigrateRequest {
        to: args.to.clone(),
        engine: args.engine.map(Into::into),
        cancel: args.cancel,
    };
    let started: Vnf = client
        .call(
            Method::POST,
            &format!("/v1/vnfs/{name}/migrate"),
            Some((serde_json::to_vec(&request)?, "application/json")),
        )
        .await?
        .json()?;
    let Some(m) = started.migration.clone().filter(|_| !args.no_wait) else {
        if !output::structured(format, &started)? {
            match (&started.migration, args.cancel) {
                (_, true) => println!("vnf/{name}: the move was cancelled"),
                (Some(m), _) => println!("vnf/{name} moving from {} to {}", m.from, m.to),
                (None, _) => println!("vnf/{name} is not moving"),
            }
        }
        return Ok(());
    };
    let progress = Progress::new(format, "placed");
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    let path = format!("/v1/vnfs/{name}");
    let ended = loop {
        let v: Vnf = client.get(&path).await?;
        if v.migration.is_none() {
            break v;
        }
        match &v.replication {
            Some(r) => {
                let step = match r.state.as_str() {
                    "synced" => 2,
                    "handed-off" => 3,
                    _ => 1,
                };
                progress.update(step, 4);
                progress.note(&stream_note(r));
            }
            None => progress.update(1, 4),
        }
        if Instant::now() >= deadline {
            progress.finish();
            bail!(
                "vnf {name} was still moving to {} after {} s; the move goes on (`telvirt vnf show {name}`; `--cancel` ends it)",
                m.to,
                args.timeout
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    progress.finish();
    if active_host(&ended) != Some(m.to.as_str()) {
        // Why the controller ended it (its event), rather than the VNF's reason now, which
        // its source's next report may have replaced already.
        let events: Vec<Event> = client
            .get(&format!("/v1/vnfs/{name}/events"))
            .await
            .unwrap_or_default();
        let prefix = format!("the move to host {} ", m.to);
        let why = events
            .iter()
            .rev()
            // This move's (both times are the controller's, in one format).
            .find(|e| e.at >= m.started_at && e.reason.starts_with(&prefix))
            .map(|e| e.reason.as_str())
            .or(ended.reason.as_deref())
            .unwrap_or("the move ended without a switch");
        bail!("vnf {name} did not move to {}: {why}", m.to);
    }
    if !output::structured(format, &ended)? {
        println!("vnf/{name} moved from {} to {}", m.from, m.to);
        // What its switch event says it took (the event is written with the switch).
        let events: Vec<Event> = client.get(&format!("/v1/vnfs/{name}/events")).await?;
        if let Some(figures) = events.iter().rev().find_map(|e| switch_figures(&e.reason)) {
            println!("  {figures}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::switch_figures;

    #[test]
    fn a_switch_events_figures_are_what_its_parentheses_hold() {
        assert_eq!(
            switch_figures(
                "moved from host h1 to host h2 (107 MiB of guest memory streamed in 583 ms, the guest stopped for 5 ms by its source's measure, 8.4 ms until its destination resumed it (the two hosts' clocks: 1.1 ms stopping, 0.7 ms at the commit point, 1.9 ms final copy, 4.7 ms at the destination))"
            ),
            Some(
                "107 MiB of guest memory streamed in 583 ms, the guest stopped for 5 ms by its source's measure, 8.4 ms until its destination resumed it (the two hosts' clocks: 1.1 ms stopping, 0.7 ms at the commit point, 1.9 ms final copy, 4.7 ms at the destination)"
            )
        );
        // With when it switched after the resume: that too.
        assert_eq!(
            switch_figures(
                "moved from host h1 to host h2 (107 MiB of guest memory streamed in 583 ms, the guest stopped for 5 ms by its source's measure, 8.4 ms until its destination resumed it (the two hosts' clocks); switched 3.1 ms after its destination resumed it (the controller's clock))"
            ),
            Some(
                "107 MiB of guest memory streamed in 583 ms, the guest stopped for 5 ms by its source's measure, 8.4 ms until its destination resumed it (the two hosts' clocks); switched 3.1 ms after its destination resumed it (the controller's clock)"
            )
        );
        assert_eq!(
            switch_figures(
                "moved from host h1 to host h2, now on engine pulley (12 map updates streamed); host h2 had not reported the guest running by the move's deadline"
            ),
            Some("12 map updates streamed")
        );
        assert_eq!(
            switch_figures("moving to host h2 (cpus 1): its state streams"),
            None
        );
    }
}
