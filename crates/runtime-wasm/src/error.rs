//! The crate's one error type. Owns error reporting only; no logic.

use std::fmt;
use std::path::PathBuf;

use crate::security::Permission;
use crate::verify::Violation;

/// Why a running VNF was stopped (or its batch dropped).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "detail")]
pub enum FailureReason {
    /// The batch used up its fuel (CPU budget per batch).
    CpuLimit { fuel_per_batch: u64 },
    /// The module tried to grow its linear memory past the cap.
    MemoryLimit {
        cap_bytes: u64,
        requested_bytes: u64,
    },
    /// The wasm stack exceeded the configured maximum (e.g. runaway recursion).
    StackOverflow { max_stack_bytes: usize },
    /// Any other wasm trap (unreachable, out-of-bounds access, division by zero, ...).
    Trap(String),
    /// `tv_init` returned a non-zero status.
    InitFailed(i32),
}

impl fmt::Display for FailureReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::CpuLimit { fuel_per_batch } => {
                write!(
                    f,
                    "CPU limit: batch exceeded its fuel budget of {fuel_per_batch}"
                )
            }
            Self::MemoryLimit {
                cap_bytes,
                requested_bytes,
            } => write!(
                f,
                "memory limit: linear memory growth to {requested_bytes} bytes exceeds the cap of {cap_bytes} bytes"
            ),
            Self::StackOverflow { max_stack_bytes } => {
                write!(
                    f,
                    "stack limit: wasm stack exceeded {max_stack_bytes} bytes"
                )
            }
            Self::Trap(s) => write!(f, "trap: {s}"),
            Self::InitFailed(code) => write!(f, "tv_init returned error code {code}"),
        }
    }
}

/// Every error of `telvirt-runtime-wasm`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The verifier refused the module; every violation is listed.
    #[error("module refused: {}", Violations(.0))]
    Verification(Vec<Violation>),
    /// A configuration value is invalid.
    #[error("invalid configuration: {field}: {reason}")]
    Config { field: String, reason: String },
    /// A host function the module imports is not granted, so it is not linked.
    #[error(
        "host function telvirt.{import} is not granted to this module (needs permission `{permission}` in domain `{domain}`): not linked, instantiation refused"
    )]
    NotGranted {
        import: String,
        permission: Permission,
        domain: String,
    },
    /// Instantiation failed (linking, start, memory cap, ...).
    #[error("instantiation failed: {0}")]
    Instantiate(String),
    /// The VNF has failed; it must be restarted or removed.
    #[error("VNF failed: {0}")]
    Failed(FailureReason),
    /// A batch trapped: it was dropped; `restarted` tells whether the restart policy revived the VNF.
    #[error("batch dropped: {reason} (restarted: {restarted})")]
    BatchTrapped {
        reason: FailureReason,
        restarted: bool,
    },
    /// The VNF is locked: it is not scheduled until unlocked.
    #[error("VNF is locked: unlock it before processing or changing it")]
    Locked,
    /// A map operation or definition is invalid.
    #[error("map: {0}")]
    Map(String),
    /// A control-plane change of a map was refused before anything changed: which field of
    /// the change, and why.
    #[error("{field}: {reason}")]
    InvalidChange { field: String, reason: String },
    /// A snapshot or update log could not be decoded or applied.
    #[error("snapshot: {0}")]
    Snapshot(String),
    /// An upgrade was refused; the running version is unchanged.
    #[error("upgrade refused: {0}")]
    Upgrade(String),
    /// No module with this hash is installed.
    #[error("module {0} is not installed")]
    NotInstalled(String),
    /// A packet batch is malformed (too many packets, packet too large).
    #[error("batch: {0}")]
    Batch(String),
    /// The wasmtime engine could not be configured or compile the module.
    #[error("engine: {0}")]
    Engine(String),
    /// A module file was refused or could not be read; the reason never quotes its content.
    #[error("cannot read module {path}: {reason}")]
    ModuleFile { path: PathBuf, reason: String },
    /// File system error in the module store.
    #[error("I/O on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The worker thread is gone.
    #[error("worker: {0}")]
    Worker(String),
}

struct Violations<'a>(&'a [Violation]);

impl fmt::Display for Violations<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} violation(s)", self.0.len())?;
        for v in self.0 {
            write!(f, "; {v}")?;
        }
        Ok(())
    }
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn config(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Config {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
