//! The crate's single error type. Owns every failure the data plane reports; must not carry
//! descriptor or store concepts.

use std::io;

/// Everything that can go wrong in the data plane.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A system call failed.
    #[error("{op}: {source}")]
    Io {
        /// What was being done, e.g. `memfd_create(telvirt-ring)`.
        op: String,
        /// The underlying OS error.
        #[source]
        source: io::Error,
    },
    /// A configuration value is out of range.
    #[error("invalid {field}: {reason}")]
    InvalidConfig {
        /// Which field (e.g. `ring.capacity`).
        field: &'static str,
        /// Why it is invalid and what would be valid.
        reason: String,
    },
    /// The link graph does not validate.
    #[error("link graph: {0}")]
    Graph(String),
    /// A steering request names something that does not exist.
    #[error("steering: {0}")]
    Steering(String),
    /// A file (pcap) is malformed.
    #[error("{path}: {reason}")]
    Format {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// An external tool needed for a measurement is missing or failed.
    #[error("{tool}: {reason}")]
    Tool {
        /// The tool (e.g. `cyclictest`).
        tool: &'static str,
        /// What went wrong, including the apt package when it is missing.
        reason: String,
    },
    /// Received bytes do not follow the format they must (a VXLAN datagram).
    #[error("malformed {what}: {reason}")]
    Malformed {
        /// What was parsed, e.g. `VXLAN header`.
        what: &'static str,
        /// What is wrong, with the valid form.
        reason: String,
    },
    /// The buffer pool has no free buffer.
    #[error("buffer pool exhausted ({capacity} buffers in use)")]
    PoolExhausted {
        /// Total buffers in the pool.
        capacity: usize,
    },
}

impl Error {
    /// An I/O error from the last OS error, tagged with the operation.
    pub(crate) fn last_os(op: impl Into<String>) -> Self {
        Error::Io {
            op: op.into(),
            source: io::Error::last_os_error(),
        }
    }

    /// An I/O error tagged with the operation.
    pub(crate) fn io(op: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            op: op.into(),
            source,
        }
    }

    pub(crate) fn config(field: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidConfig {
            field,
            reason: reason.into(),
        }
    }
}

/// Result alias for the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
