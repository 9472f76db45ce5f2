//! Sizes with binary units (`512MiB`, `2MiB`, `1GiB`).
//!
//! Owns parsing and canonical formatting of byte sizes used in descriptors. It must not accept
//! ambiguous decimal units (`MB`) or zero: a descriptor size always means a positive number of bytes.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A positive number of bytes, written with a binary unit suffix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(u64);

const UNITS: [(&str, u64); 5] = [
    ("TiB", 1 << 40),
    ("GiB", 1 << 30),
    ("MiB", 1 << 20),
    ("KiB", 1 << 10),
    ("B", 1),
];

/// Why a size string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ByteSizeError {
    #[error("empty size; expected a number with a binary unit such as 512MiB")]
    Empty,
    #[error("'{0}' has no number; expected a number with a binary unit such as 512MiB")]
    NoNumber(String),
    #[error("'{0}' has unit '{1}'; valid units are B, KiB, MiB, GiB, TiB")]
    UnknownUnit(String, String),
    #[error("'{0}' is zero; a size must be positive")]
    Zero(String),
    #[error("'{0}' is negative; a size must be positive")]
    Negative(String),
    #[error("'{0}' does not fit in 64 bits")]
    Overflow(String),
}

impl ByteSize {
    /// Builds a size from bytes; zero is refused.
    pub fn from_bytes(bytes: u64) -> Result<Self, ByteSizeError> {
        if bytes == 0 {
            return Err(ByteSizeError::Zero("0".to_owned()));
        }
        Ok(Self(bytes))
    }

    /// 1 MiB multiplied by `n`, for constants in code; `n` must be positive.
    pub const fn mib(n: u64) -> Self {
        assert!(n > 0, "ByteSize::mib needs a positive count");
        Self(n << 20)
    }

    pub const fn bytes(self) -> u64 {
        self.0
    }
}

impl FromStr for ByteSize {
    type Err = ByteSizeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let text = s.trim();
        if text.is_empty() {
            return Err(ByteSizeError::Empty);
        }
        if text.starts_with('-') {
            return Err(ByteSizeError::Negative(s.to_owned()));
        }
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (digits, unit) = text.split_at(split);
        if digits.is_empty() {
            return Err(ByteSizeError::NoNumber(s.to_owned()));
        }
        let unit = unit.trim();
        let multiplier = if unit.is_empty() {
            1
        } else {
            UNITS
                .iter()
                .find(|(name, _)| *name == unit)
                .map(|(_, m)| *m)
                .ok_or_else(|| ByteSizeError::UnknownUnit(s.to_owned(), unit.to_owned()))?
        };
        let number: u64 = digits
            .parse()
            .map_err(|_| ByteSizeError::Overflow(s.to_owned()))?;
        if number == 0 {
            return Err(ByteSizeError::Zero(s.to_owned()));
        }
        number
            .checked_mul(multiplier)
            .map(ByteSize)
            .ok_or_else(|| ByteSizeError::Overflow(s.to_owned()))
    }
}

impl fmt::Display for ByteSize {
    /// The largest unit that divides the size exactly: `2097152` prints as `2MiB`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (name, m) in UNITS {
            if self.0.is_multiple_of(m) {
                return write!(f, "{}{}", self.0 / m, name);
            }
        }
        write!(f, "{}B", self.0)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size with a binary unit such as 512MiB")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ByteSize, E> {
                v.parse().map_err(E::custom)
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<ByteSize, E> {
                ByteSize::from_bytes(v).map_err(E::custom)
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<ByteSize, E> {
                if v < 0 {
                    return Err(E::custom(ByteSizeError::Negative(v.to_string())));
                }
                self.visit_u64(v.unsigned_abs())
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<ByteSize, E> {
                Err(E::custom(format!(
                    "{v} is not a whole number of bytes; use a binary unit such as 512MiB"
                )))
            }
        }
        d.deserialize_any(Visitor)
    }
}

impl utoipa::PartialSchema for ByteSize {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .pattern(Some("^[1-9][0-9]*(B|KiB|MiB|GiB|TiB)?$"))
            .description(Some("A positive size with a binary unit, e.g. 512MiB"))
            .examples([serde_json::json!("512MiB")])
            .into()
    }
}

impl utoipa::ToSchema for ByteSize {}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_binary_units() {
        assert_eq!("512MiB".parse::<ByteSize>().unwrap().bytes(), 512 << 20);
        assert_eq!("2MiB".parse::<ByteSize>().unwrap().bytes(), 2 << 20);
        assert_eq!("1GiB".parse::<ByteSize>().unwrap().bytes(), 1 << 30);
        assert_eq!("4096".parse::<ByteSize>().unwrap().bytes(), 4096);
        assert_eq!("16KiB".parse::<ByteSize>().unwrap().bytes(), 16 << 10);
    }

    #[test]
    fn refuses_decimal_units() {
        let err = "512MB".parse::<ByteSize>().unwrap_err();
        assert!(matches!(err, ByteSizeError::UnknownUnit(_, ref u) if u == "MB"));
        assert!(err.to_string().contains("valid units are"));
    }

    #[test]
    fn refuses_zero_negative_and_empty() {
        assert!(matches!(
            "0MiB".parse::<ByteSize>(),
            Err(ByteSizeError::Zero(_))
        ));
        assert!(matches!(
            "-1GiB".parse::<ByteSize>(),
            Err(ByteSizeError::Negative(_))
        ));
        assert!(matches!("".parse::<ByteSize>(), Err(ByteSizeError::Empty)));
        assert!(matches!(
            "MiB".parse::<ByteSize>(),
            Err(ByteSizeError::NoNumber(_))
        ));
    }

    #[test]
    fn refuses_overflow() {
        assert!(matches!(
            "99999999999TiB".parse::<ByteSize>(),
            Err(ByteSizeError::Overflow(_))
        ));
    }

    #[test]
    fn formats_with_largest_exact_unit() {
        assert_eq!(ByteSize::mib(2048).to_string(), "2GiB");
        assert_eq!(ByteSize::from_bytes(1536).unwrap().to_string(), "1536B");
    }

    proptest! {
        #[test]
        fn display_round_trips(bytes in 1u64..u64::MAX) {
            let size = ByteSize::from_bytes(bytes).unwrap();
            prop_assert_eq!(size.to_string().parse::<ByteSize>().unwrap(), size);
        }
    }
}
