//! Reading descriptors from YAML or JSON text.
//!
//! Owns turning bytes into a validated descriptor, with the path of the first structural error
//! (unknown field, wrong type, bad unit) or every semantic violation. It must not read files: the
//! caller hands it bytes.

use serde::de::DeserializeOwned;

use crate::error::{FieldError, ModelError};
use crate::vnf::VnfDescriptor;

/// The text format of a descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Yaml,
}

impl Format {
    /// The media type the API takes this format as.
    pub fn media_type(self) -> &'static str {
        match self {
            Format::Json => "application/json",
            Format::Yaml => "application/yaml",
        }
    }

    /// Guesses from the first non-blank byte: `{` is JSON, anything else YAML.
    pub fn sniff(text: &[u8]) -> Self {
        match text.iter().find(|b| !b.is_ascii_whitespace()) {
            Some(b'{') => Format::Json,
            _ => Format::Yaml,
        }
    }
}

/// Deserializes any strict descriptor type, naming the path of a structural error.
pub fn from_text<T: DeserializeOwned>(text: &[u8], format: Format) -> Result<T, ModelError> {
    match format {
        Format::Json => {
            let mut de = serde_json::Deserializer::from_slice(text);
            let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
                let inner = e.inner();
                let syntax = inner.is_syntax() || inner.is_eof();
                let reason = if syntax {
                    format!("invalid JSON: {inner}")
                } else {
                    inner.to_string()
                };
                field_error(e.path(), reason, syntax)
            })?;
            de.end().map_err(|e| {
                ModelError::Syntax(FieldError::new("", format!("invalid JSON: {e}")))
            })?;
            Ok(value)
        }
        Format::Yaml => {
            if text.iter().all(u8::is_ascii_whitespace) {
                return Err(ModelError::Syntax(FieldError::new(
                    "",
                    "the descriptor is empty",
                )));
            }
            // A first pass for well-formedness, so syntax errors are not reported as type errors.
            yaml_serde::from_slice::<yaml_serde::Value>(text).map_err(|e| {
                ModelError::Syntax(FieldError::new("", format!("invalid YAML: {e}")))
            })?;
            let de = yaml_serde::Deserializer::from_slice(text);
            serde_path_to_error::deserialize(de).map_err(|e| {
                let path = e.path().to_string();
                let reason = e.inner().to_string();
                // yaml_serde repeats the path in front of its message.
                let reason = reason
                    .strip_prefix(&format!("{path}: "))
                    .map_or(reason.clone(), str::to_owned);
                field_error(e.path(), reason, false)
            })
        }
    }
}

fn field_error(path: &serde_path_to_error::Path, reason: String, syntax: bool) -> ModelError {
    let path = path.to_string();
    // "." is the root and "?" an unknown position: neither names a field.
    let path = if path == "." || path == "?" || syntax {
        String::new()
    } else {
        path
    };
    let error = FieldError::new(path, reason);
    if syntax {
        ModelError::Syntax(error)
    } else {
        ModelError::Invalid(vec![error])
    }
}

/// Parses and validates a VNF descriptor.
pub fn parse_vnf(text: &[u8], format: Format) -> Result<VnfDescriptor, ModelError> {
    let descriptor: VnfDescriptor = from_text(text, format)?;
    let violations = descriptor.violations();
    if violations.is_empty() {
        Ok(descriptor)
    } else {
        Err(ModelError::Invalid(violations))
    }
}
