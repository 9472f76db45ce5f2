//! The model's one error type and the field-path errors every layer reports.
//!
//! Owns how a refused descriptor is described: which field (a dotted path with `[i]` indices),
//! why, and what would be valid. It must not format for a transport (HTTP, CLI): callers do that.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// One refused field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FieldError {
    /// Dotted path of the field, e.g. `spec.cpu.count` or `spec.wasm.maps[1].name`.
    pub path: String,
    /// Why it was refused and what would be valid.
    pub reason: String,
}

impl FieldError {
    pub fn new(path: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.reason)
        } else {
            write!(f, "{}: {}", self.path, self.reason)
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    /// The text is not well-formed YAML or JSON.
    #[error("{0}")]
    Syntax(FieldError),
    /// Well-formed, but one or more fields break the descriptor's rules.
    #[error("{}", join(.0))]
    Invalid(Vec<FieldError>),
}

impl ModelError {
    /// The field errors behind this error (one for a syntax error).
    pub fn fields(&self) -> &[FieldError] {
        match self {
            ModelError::Syntax(f) => std::slice::from_ref(f),
            ModelError::Invalid(v) => v,
        }
    }
}

fn join(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}
