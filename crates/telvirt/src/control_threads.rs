//! The scheduling class of a node's async control threads (`--control-priority`).
//!
//! Owns giving tokio's worker threads SCHED_FIFO, each the first time it goes idle (tokio runs
//! that hook on its workers only, never on its blocking threads), and checking up front that
//! the host permits it. Must not touch any other thread: what a worker starts (a data-plane
//! worker, QEMU, a blocking thread) begins as SCHED_OTHER (reset on fork).

use std::cell::Cell;

/// The environment variable that sets `--control-priority` (an agent telvirt starts is given
/// the option, or none, and must not inherit it).
pub const PRIORITY_ENV: &str = "TELVIRT_CONTROL_PRIORITY";

/// The `--control-priority` a command gives the agents it starts (`cluster up`, the
/// benchmarks that start agents).
#[derive(clap::Args, Debug, Clone, Copy, Default)]
pub struct AgentPriorityArgs {
    /// The agents' `--control-priority`: their async control threads at this SCHED_FIFO
    /// priority, 1-99 (a wasm move's freeze waits for them; ADR 065) [default: SCHED_OTHER]
    #[arg(long, value_name = "PRIORITY", value_parser = clap::value_parser!(u8).range(1..=99))]
    pub control_priority: Option<u8>,
}

/// Gives the agent `command` starts `priority` (none: SCHED_OTHER), whatever the
/// environment it inherits says.
pub fn pass_to_agent(command: &mut std::process::Command, priority: Option<u8>) {
    if let Some(p) = priority {
        command.args(["--control-priority", &p.to_string()]);
    }
    command.env_remove(PRIORITY_ENV);
}

/// Whether this host lets the node's threads run at SCHED_FIFO `priority`: tried on a thread
/// of its own, which then ends. The error says why not and what would do.
pub fn check(priority: u8) -> Result<(), String> {
    std::thread::spawn(move || telvirt_runtime_vm::pin::sched_fifo(0, priority))
        .join()
        .map_err(|_| "the thread that tried it panicked".to_owned())?
        .map_err(|e| {
            format!(
                "SCHED_FIFO {priority} refused: {e}; the node needs CAP_SYS_NICE (root has it), or leave the option out"
            )
        })
}

/// The hook tokio calls on a worker thread each time it is about to park (every worker parks
/// once it first runs out of work, before any wake-up): gives the thread SCHED_FIFO
/// `priority` the first time (checked with [`check`] first, so a refusal here is only
/// logged, once per thread).
pub fn on_worker_park(priority: u8) -> impl Fn() + Send + Sync + 'static {
    move || {
        thread_local!(static GIVEN: Cell<bool> = const { Cell::new(false) });
        GIVEN.with(|given| {
            if !given.replace(true)
                && let Err(e) = telvirt_runtime_vm::pin::sched_fifo(0, priority)
            {
                tracing::warn!("a control thread stays SCHED_OTHER: SCHED_FIFO {priority}: {e}");
            }
        });
    }
}
