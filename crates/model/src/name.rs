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

/// The name of a wasm map: 1 to 64 lowercase letters, digits, `_` or `-` (the module manifest's
/// rule, so a map a module declares can always be named in a descriptor).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MapName(String);

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "'{name}' is not a valid name: {why}; a name is 1-63 lowercase letters, digits or '-', starting and ending with a letter or digit"
)]
pub struct NameError {
    pub name: String,
    pub why: &'static str,
}

/// The rule of one kind of name.
struct Rule {
    max: usize,
    too_long: &'static str,
    underscore: bool,
    bad_char: &'static str,
    /// `-` may not start or end it.
    dash_inside: bool,
}

fn check(s: &str, rule: &Rule) -> Result<String, NameError> {
    let fail = |why| {
        Err(NameError {
            name: s.to_owned(),
            why,
        })
    };
    if s.is_empty() {
        return fail("it is empty");
    }
    if s.len() > rule.max {
        return fail(rule.too_long);
    }
    if !s.bytes().all(|b| {
        b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || (rule.underscore && b == b'_')
    }) {
        return fail(rule.bad_char);
    }
    if rule.dash_inside && (s.starts_with('-') || s.ends_with('-')) {
        return fail("it starts or ends with '-'");
    }
    Ok(s.to_owned())
}

/// A string newtype that is valid by construction: parsing checks `$rule`; (de)serialised as
/// the plain string; its OpenAPI schema says the rule.
macro_rules! checked_name {
    ($ty:ident, $rule:expr, $pattern:literal, $max:literal, $desc:literal) => {
        impl $ty {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $ty {
            type Err = NameError;

            fn from_str(s: &str) -> Result<Self, NameError> {
                check(s, &$rule).map(Self)
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $ty {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = String::deserialize(d)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }

        impl utoipa::PartialSchema for $ty {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                utoipa::openapi::ObjectBuilder::new()
                    .schema_type(utoipa::openapi::schema::Type::String)
                    .pattern(Some($pattern))
                    .min_length(Some(1))
                    .max_length(Some($max))
                    .description(Some($desc))
                    .into()
            }
        }

        impl utoipa::ToSchema for $ty {}
    };
}

checked_name!(
    Name,
    Rule {
        max: 63,
        too_long: "it is longer than 63 characters",
        underscore: false,
        bad_char: "it has a character other than a-z, 0-9 or '-'",
        dash_inside: true,
    },
    "^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$",
    63,
    "A DNS label (RFC 1123)"
);

checked_name!(
    MapName,
    Rule {
        max: 64,
        too_long: "it is longer than the 64 characters of a map name",
        underscore: true,
        bad_char: "it has a character other than a-z, 0-9, '_' or '-' (a map name)",
        dash_inside: false,
    },
    "^[a-z0-9_-]{1,64}$",
    64,
    "A wasm map name: lowercase letters, digits, '_' or '-'"
);

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
