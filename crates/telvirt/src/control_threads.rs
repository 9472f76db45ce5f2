//! The scheduling class of a node's async control threads (`--control-priority`).
//!
//! Owns giving tokio's worker threads SCHED_FIFO, each the first time it wakes (tokio runs
//! that hook on its workers only, never on its blocking threads), and checking up front that
//! the host permits it. Must not touch any other thread: what a worker starts (a data-plane
//! worker, QEMU, a blocking thread) begins as SCHED_OTHER (reset on fork).

use std::cell::Cell;

/// The environment variable that sets `--control-priority` (an agent telvirt starts is given
/// the option, or none, and must not inherit it).
pub const PRIORITY_ENV: &str = "TELVIRT_CONTROL_PRIORITY";

/// The arguments that start an agent with `priority` (none: none).
pub fn agent_args(priority: Option<u8>) -> Vec<String> {
    priority
        .map(|p| vec!["--control-priority".to_owned(), p.to_string()])
        .unwrap_or_default()
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

/// The hook tokio calls on a worker thread each time it wakes: gives the thread SCHED_FIFO
/// `priority` the first time (checked with [`check`] first, so a refusal here is only
/// logged, once per thread).
pub fn on_worker_wake(priority: u8) -> impl Fn() + Send + Sync + 'static {
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
