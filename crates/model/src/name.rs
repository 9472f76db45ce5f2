//! Names of VNFs, ports, groups, maps and authorities.
//!
//! Owns the DNS-label rule (RFC 1123): 1 to 63 characters, lowercase letters, digits and `-`,
//! starting and ending with a letter or digit. It must not normalise input: `Fw1` is refused,
//! not lowered, so what the operator wrote is what is stored.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A validated DNS label.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Name(String);

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "'{name}' is not a valid name: {why}; a name is 1-63 lowercase letters, digits or '-', starting and ending with a letter or digit"
)]
pub struct NameError {
    pub name: String,
    pub why: &'static str,
}

impl Name {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Name {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, NameError> {
        let fail = |why| {
            Err(NameError {
                name: s.to_owned(),
                why,
            })
        };
        if s.is_empty() {
            return fail("it is empty");
        }
        if s.len() > 63 {
            return fail("it is longer than 63 characters");
        }
        if !s
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return fail("it has a character other than a-z, 0-9 or '-'");
        }
        if s.starts_with('-') || s.ends_with('-') {
            return fail("it starts or ends with '-'");
        }
        Ok(Self(s.to_owned()))
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for Name {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Serialize for Name {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl utoipa::PartialSchema for Name {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .pattern(Some("^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"))
            .min_length(Some(1))
            .max_length(Some(63))
            .description(Some("A DNS label (RFC 1123)"))
            .into()
    }
}

impl utoipa::ToSchema for Name {}

/// The name of a wasm map: 1 to 64 lowercase letters, digits, `_` or `-` (the module manifest's
/// rule, so a map a module declares can always be named in a descriptor).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MapName(String);

impl MapName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for MapName {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, NameError> {
        let fail = |why| {
            Err(NameError {
                name: s.to_owned(),
                why,
            })
        };
        if s.is_empty() {
            return fail("it is empty");
        }
        if s.len() > 64 {
            return fail("it is longer than the 64 characters of a map name");
        }
        if !s
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        {
            return fail("it has a character other than a-z, 0-9, '_' or '-' (a map name)");
        }
        Ok(Self(s.to_owned()))
    }
}

impl fmt::Display for MapName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for MapName {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for MapName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl utoipa::PartialSchema for MapName {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .pattern(Some("^[a-z0-9_-]{1,64}$"))
            .min_length(Some(1))
            .max_length(Some(64))
            .description(Some(
                "A wasm map name: lowercase letters, digits, '_' or '-'",
            ))
            .into()
    }
}

impl utoipa::ToSchema for MapName {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_dns_labels() {
        for ok in ["fw1", "a", "nat-gw-2", &"x".repeat(63)] {
            assert_eq!(ok.parse::<Name>().unwrap().as_str(), ok);
        }
    }

    #[test]
    fn refuses_bad_labels_with_reason() {
        let cases = [
            ("", "empty"),
            ("Fw1", "character"),
            ("fw_1", "character"),
            ("-fw", "starts or ends"),
            ("fw-", "starts or ends"),
            (&"x".repeat(64), "longer than 63"),
        ];
        for (bad, why) in cases {
            let err = bad.parse::<Name>().unwrap_err();
            assert!(err.to_string().contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn map_names_take_underscores_as_manifests_do() {
        assert_eq!(
            "next_port".parse::<MapName>().unwrap().as_str(),
            "next_port"
        );
        assert!("Next".parse::<MapName>().is_err());
        assert!("".parse::<MapName>().is_err());
        assert!("x".repeat(65).parse::<MapName>().is_err());
    }
}
