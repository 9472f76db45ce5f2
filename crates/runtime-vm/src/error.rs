//! The one error type of the vm runtime. Owns the wording of every failure; must not hide
//! which field or file was wrong.

use std::path::PathBuf;
use std::time::Duration;

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid vm configuration: field `{field}`: {reason}")]
    InvalidConfig { field: &'static str, reason: String },

    #[error("{field}: cannot read {}: {reason}", path.display())]
    FileUnreadable {
        field: &'static str,
        path: PathBuf,
        reason: String,
    },

    #[error(
        "huge pages: {needed} free {size} pages needed for {memory_mib} MiB, host has {free} free (of {total}); reserve more in {sysfs}"
    )]
    HugePagesShort {
        size: String,
        memory_mib: u64,
        needed: u64,
        free: u64,
        total: u64,
        sysfs: String,
    },

    #[error("huge pages: {0}")]
    HugePages(String),

    #[error("cpu pinning: {0}")]
    Pinning(String),

    #[error("vm `{name}` is already running (pid {pid})")]
    AlreadyRunning { name: String, pid: i32 },

    #[error("vm `{name}` is locked (paused): unlock it before changing its peripherals")]
    Locked { name: String },

    #[error("vm `{name}` is not running (state: {state})")]
    NotRunning { name: String, state: String },

    #[error("peripheral id `{id}` is already attached to vm `{name}`")]
    DuplicatePeripheral { name: String, id: String },

    #[error("peripheral id `{id}` is not attached to vm `{name}` (attached: {attached})")]
    NoSuchPeripheral {
        name: String,
        id: String,
        attached: String,
    },

    #[error("peripheral `{id}`: {reason}")]
    PeripheralRefused { id: String, reason: String },

    #[error("QMP {command}: {reason}")]
    Qmp { command: String, reason: String },

    #[error("QMP {command}: connection to QEMU closed")]
    QmpDisconnected { command: String },

    #[error("guest agent: {0}")]
    Agent(String),

    #[error("live migration of {vm}: {reason}")]
    Migration { vm: String, reason: String },

    /// The stream completed but the guest did not come up on the destination: its source
    /// still holds the stopped copy the stream was made from.
    #[error(
        "live migration of {vm}: the guest did not come up after its stream completed: {reason}"
    )]
    ArrivalBroken { vm: String, reason: String },

    #[error("timed out after {after:?} waiting for {what}")]
    Timeout { what: String, after: Duration },

    #[error("QEMU exited during start ({status}); last output:\n{output}")]
    QemuExited { status: String, output: String },

    #[error("no vm state in {}: {reason}", dir.display())]
    NotAdoptable { dir: PathBuf, reason: String },

    #[error("guest image: {0}")]
    Image(String),

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// Wrap an I/O error with what was being done.
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }
}
