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
            yaml_within_bounds(text)?;
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

/// How much a YAML document may grow as its aliases are followed: twice its text, and at
/// least this many bytes (a node counting one byte, a scalar its length more).
const MIN_YAML_EXPANSION: u64 = 256 << 10;

/// Refuses a YAML document whose aliases expand it past [`MIN_YAML_EXPANSION`] or twice its
/// size, before any of it is built: a body within the API's bounds could otherwise repeat one
/// long string a hundred thousand times, in memory and then in the store. Walked once,
/// keeping nothing, stopping at the bound.
fn yaml_within_bounds(text: &[u8]) -> Result<(), ModelError> {
    use serde::de::DeserializeSeed;
    let bound = (text.len() as u64)
        .saturating_mul(2)
        .max(MIN_YAML_EXPANSION);
    let left = std::cell::Cell::new(bound);
    match Measured(&left).deserialize(yaml_serde::Deserializer::from_slice(text)) {
        Ok(()) => Ok(()),
        Err(_) if left.get() == 0 => Err(ModelError::Syntax(FieldError::new(
            "",
            format!(
                "the YAML expands, through its aliases, to more than {bound} bytes; write the repeated parts out, or send JSON"
            ),
        ))),
        Err(e) => Err(ModelError::Syntax(FieldError::new(
            "",
            format!("invalid YAML: {e}"),
        ))),
    }
}

/// A walk of any value that takes what it meets from a budget (one per node, a scalar's
/// length more) and fails once the budget is spent (then left at 0).
#[derive(Clone, Copy)]
struct Measured<'a>(&'a std::cell::Cell<u64>);

impl Measured<'_> {
    fn take<E: serde::de::Error>(self, n: usize) -> Result<(), E> {
        let n = (n as u64).saturating_add(1);
        match self.0.get().checked_sub(n) {
            Some(left) => {
                self.0.set(left);
                Ok(())
            }
            None => {
                self.0.set(0);
                Err(E::custom("expands past its bound"))
            }
        }
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for Measured<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Measured<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any YAML value")
    }
    fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<(), E> {
        self.take(0)
    }
    fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<(), E> {
        self.take(8)
    }
    fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<(), E> {
        self.take(8)
    }
    fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<(), E> {
        self.take(8)
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<(), E> {
        self.take(v.len())
    }
    fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<(), E> {
        self.take(v.len())
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<(), E> {
        self.take(0)
    }
    fn visit_none<E: serde::de::Error>(self) -> Result<(), E> {
        self.take(0)
    }
    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        self.take(0)?;
        d.deserialize_any(self)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        self.take(0)?;
        while seq.next_element_seed(self)?.is_some() {}
        Ok(())
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        self.take(0)?;
        while map.next_key_seed(self)?.is_some() {
            map.next_value_seed(self)?;
        }
        Ok(())
    }
    fn visit_enum<A: serde::de::EnumAccess<'de>>(self, data: A) -> Result<(), A::Error> {
        use serde::de::VariantAccess;
        let ((), variant) = data.variant_seed(self)?;
        variant.newtype_variant_seed(self)
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
