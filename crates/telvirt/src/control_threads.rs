//! The scheduling class of a node's async control threads (`--control-priority`,
//! `--control-nice`).
//!
//! Owns giving tokio's worker threads SCHED_FIFO or a nice value, each the first time it goes
//! idle (tokio runs that hook on its workers only, never on its blocking threads), and checking
//! up front that the host permits it. Must not touch any other thread: what a worker starts (a
//! data-plane worker, QEMU, a blocking thread) begins as SCHED_OTHER at nice 0 (reset on
//! fork).

use std::cell::Cell;

/// The environment variable that sets `--control-priority` (an agent telvirt starts is given
/// the option, or none, and must not inherit it).
pub const PRIORITY_ENV: &str = "TELVIRT_CONTROL_PRIORITY";
/// The environment variable that sets `--control-nice` (as [`PRIORITY_ENV`]).
pub const NICE_ENV: &str = "TELVIRT_CONTROL_NICE";
/// The nice value of a node's async control threads when `--control-nice` is not given and
/// the host permits it (ADR 065's addendum of 2026-12-07).
pub const DEFAULT_NICE: i8 = -10;

/// How a node's async control threads are scheduled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ControlClass {
    /// SCHED_FIFO at this priority (`--control-priority`).
    Fifo(u8),
    /// SCHED_OTHER at this nice value (`--control-nice`, or [`DEFAULT_NICE`]).
    Nice(i8),
}

impl ControlClass {
    /// Gives the calling thread this class, SCHED_RESET_ON_FORK set: what it starts begins
    /// at SCHED_OTHER, nice 0.
    fn apply(self) -> std::io::Result<()> {
        match self {
            ControlClass::Fifo(priority) => telvirt_runtime_vm::pin::sched_fifo(0, priority),
            ControlClass::Nice(nice) => sched_nice(nice),
        }
    }

    /// The option that asks for it, with its value (`--control-nice -5`).
    fn option(self) -> String {
        match self {
            ControlClass::Fifo(priority) => format!("--control-priority {priority}"),
            ControlClass::Nice(nice) => format!("--control-nice {nice}"),
        }
    }
}

/// How a node's `--control-priority` and `--control-nice` (`priority`, `nice`) schedule its
/// async control threads: SCHED_FIFO when a priority is given; else the nice value given (0:
/// as every thread), or [`DEFAULT_NICE`] for a node started at SCHED_OTHER nice 0 (one started
/// under `nice` or `chrt` keeps it). Installs the hook that gives tokio's workers the class
/// once the host was found to permit it; a class the options ask for that the host refuses is
/// the error (naming the option), the default one is only logged.
pub fn install(
    builder: &mut tokio::runtime::Builder,
    priority: Option<u8>,
    nice: Option<i8>,
) -> Result<(), String> {
    let (class, asked) = match (priority, nice) {
        (Some(priority), _) => (ControlClass::Fifo(priority), true),
        (None, Some(0)) => return Ok(()),
        (None, Some(nice)) => (ControlClass::Nice(nice), true),
        (None, None) if started_as_default() => (ControlClass::Nice(DEFAULT_NICE), false),
        (None, None) => {
            tracing::info!(
                "the node's async control threads keep the scheduling the node was started with (not SCHED_OTHER at nice 0)"
            );
            return Ok(());
        }
    };
    match check(class) {
        Ok(()) => {
            builder.on_thread_park(on_worker_park(class));
            tracing::info!("the node's async control threads run at {class}");
            Ok(())
        }
        Err(e) if asked => Err(format!("{}: {e}", class.option())),
        Err(e) => {
            tracing::info!(
                "the node's async control threads stay at nice 0 (their default {class} is not permitted here: {e})"
            );
            Ok(())
        }
    }
}

impl std::fmt::Display for ControlClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ControlClass::Fifo(priority) => write!(f, "SCHED_FIFO {priority}"),
            ControlClass::Nice(nice) => write!(f, "nice {nice}"),
        }
    }
}

/// Gives the calling thread SCHED_OTHER at `nice`, reset on fork (a negative nice is not
/// passed on to the threads and processes it starts).
fn sched_nice(nice: i8) -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: valid pointer to an initialised sched_param; thread 0 is the calling thread.
    let rc = unsafe {
        libc::sched_setscheduler(0, libc::SCHED_OTHER | libc::SCHED_RESET_ON_FORK, &param)
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a plain system call; on Linux `PRIO_PROCESS` 0 is the calling thread.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, i32::from(nice)) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The `--control-priority` and `--control-nice` a command gives the agents it starts
/// (`cluster up`, the benchmarks that start agents).
#[derive(clap::Args, Debug, Clone, Copy, Default)]
pub struct AgentPriorityArgs {
    /// The agents' `--control-priority`: their async control threads at this SCHED_FIFO
    /// priority, 1-99 (a wasm move's freeze waits for them; ADR 065) [default: SCHED_OTHER]
    #[arg(long, value_name = "PRIORITY", value_parser = clap::value_parser!(u8).range(1..=99))]
    pub control_priority: Option<u8>,
    /// The agents' `--control-nice`: their async control threads at this nice value, -20..=0
    /// (0: as every other thread) [default: the agents' own, -10 where permitted]
    #[arg(long, value_name = "NICE", allow_hyphen_values = true, value_parser = clap::value_parser!(i8).range(-20..=0))]
    pub control_nice: Option<i8>,
}

/// Gives the agent `command` starts what `args` say (none: the agent's own defaults), whatever
/// the environment it inherits says.
pub fn pass_to_agent(command: &mut std::process::Command, args: AgentPriorityArgs) {
    if let Some(p) = args.control_priority {
        command.args(["--control-priority", &p.to_string()]);
    }
    if let Some(n) = args.control_nice {
        command.arg(format!("--control-nice={n}"));
    }
    command.env_remove(PRIORITY_ENV).env_remove(NICE_ENV);
}

/// Whether the calling thread runs as threads do unless told otherwise: SCHED_OTHER at nice 0
/// (a node started under `nice`, `chrt` or a service manager's `Nice=` keeps what it was
/// given rather than take [`DEFAULT_NICE`]).
fn started_as_default() -> bool {
    // SAFETY: queries of the calling thread's own scheduling; errno is the thread's own
    // (getpriority may return -1 as a nice value: errno set to 0 before says whether it
    // failed).
    let (nice, failed) = unsafe {
        *libc::__errno_location() = 0;
        let nice = libc::getpriority(libc::PRIO_PROCESS, 0);
        (nice, *libc::__errno_location() != 0)
    };
    // SAFETY: as above.
    let policy = unsafe { libc::sched_getscheduler(0) };
    !failed && nice == 0 && policy >= 0 && policy & !libc::SCHED_RESET_ON_FORK == libc::SCHED_OTHER
}

/// Whether this host lets the node's threads run at `class`: tried on a thread of its own,
/// which then ends. The error says why not and what would do.
fn check(class: ControlClass) -> Result<(), String> {
    std::thread::spawn(move || class.apply())
        .join()
        .map_err(|_| "the thread that tried it panicked".to_owned())?
        .map_err(|e| {
            format!(
                "{class} refused: {e}; the node needs CAP_SYS_NICE (root has it), or leave the option out"
            )
        })
}

/// The hook tokio calls on a worker thread each time it is about to park (every worker parks
/// once it first runs out of work, before any wake-up): gives the thread `class` the first
/// time (checked with [`check`] first, so a refusal here is only logged, once per thread).
fn on_worker_park(class: ControlClass) -> impl Fn() + Send + Sync + 'static {
    move || {
        thread_local!(static GIVEN: Cell<bool> = const { Cell::new(false) });
        GIVEN.with(|given| {
            if !given.replace(true)
                && let Err(e) = class.apply()
            {
                tracing::warn!("a control thread stays as it was: {class}: {e}");
            }
        });
    }
}
