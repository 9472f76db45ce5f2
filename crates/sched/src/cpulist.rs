//! Linux CPU lists (`"0-3,8,10-11"`): the notation `taskset -c`, `/sys` and the inventory file use.
//!
//! Owns parsing and formatting of sorted, duplicate-free sets of logical CPU numbers.
//! Must not know about hosts, VNFs or placement.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A sorted set of Linux logical CPU numbers, written as a CPU list (`"0-3,8"`).
///
/// In YAML/JSON it is accepted either as a CPU-list string or as a list of numbers
/// (`[0, 1, 2, 3, 8]`); it is always written as a string.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CpuList(Vec<u32>);

/// Why a CPU-list string is not valid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuListParseError(pub String);

impl fmt::Display for CpuListParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl CpuList {
    /// The empty list.
    pub fn new() -> Self {
        CpuList(Vec::new())
    }

    /// Builds a list from any CPU numbers (sorted and de-duplicated).
    pub fn from_cpus(cpus: impl IntoIterator<Item = u32>) -> Self {
        let mut v: Vec<u32> = cpus.into_iter().collect();
        v.sort_unstable();
        v.dedup();
        CpuList(v)
    }

    /// The CPU numbers, ascending.
    pub fn cpus(&self) -> &[u32] {
        &self.0
    }

    /// Whether `cpu` is in the list.
    pub fn contains(&self, cpu: u32) -> bool {
        self.0.binary_search(&cpu).is_ok()
    }

    /// Number of CPUs.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the list is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for CpuList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut i = 0;
        let mut first = true;
        while i < self.0.len() {
            let start = self.0[i];
            let mut end = start;
            while i + 1 < self.0.len() && self.0[i + 1] == end + 1 {
                i += 1;
                end = self.0[i];
            }
            if !first {
                f.write_str(",")?;
            }
            first = false;
            if start == end {
                write!(f, "{start}")?;
            } else {
                write!(f, "{start}-{end}")?;
            }
            i += 1;
        }
        Ok(())
    }
}

/// Largest CPU number accepted (Linux's NR_CPUS upper bound is 8192).
pub const MAX_CPU: u32 = 8191;

impl FromStr for CpuList {
    type Err = CpuListParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = Vec::new();
        let trimmed = s.trim();
        if trimmed.is_empty() {
            return Ok(CpuList::new());
        }
        for part in trimmed.split(',') {
            let part = part.trim();
            let num = |t: &str| -> Result<u32, CpuListParseError> {
                let n: u32 = t.trim().parse().map_err(|_| {
                    CpuListParseError(format!(
                        "`{t}` in CPU list `{s}` is not a CPU number (expected e.g. `0-3,8`)"
                    ))
                })?;
                if n > MAX_CPU {
                    return Err(CpuListParseError(format!(
                        "CPU {n} in `{s}` is above the maximum {MAX_CPU}"
                    )));
                }
                Ok(n)
            };
            match part.split_once('-') {
                Some((a, b)) => {
                    let (a, b) = (num(a)?, num(b)?);
                    if a > b {
                        return Err(CpuListParseError(format!(
                            "range `{part}` in CPU list `{s}` runs backwards (write `{b}-{a}`)"
                        )));
                    }
                    out.extend(a..=b);
                }
                None => out.push(num(part)?),
            }
        }
        Ok(CpuList::from_cpus(out))
    }
}

impl Serialize for CpuList {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Written as a string (`"0-3,8"`); read from a string, one number or a list of numbers.
impl utoipa::PartialSchema for CpuList {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, OneOfBuilder, Type};
        let cpu = || ObjectBuilder::new().schema_type(Type::Integer);
        OneOfBuilder::new()
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .pattern(Some(r"^[0-9,\- ]*$"))
                    .description(Some(
                        "CPU numbers and ranges as Linux writes them, e.g. `0-3,8`",
                    )),
            )
            .item(cpu())
            .item(ArrayBuilder::new().items(cpu()))
            .into()
    }
}

impl utoipa::ToSchema for CpuList {}

impl<'de> Deserialize<'de> for CpuList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Text(String),
            Num(u32),
            List(Vec<u32>),
        }
        match Repr::deserialize(d)? {
            Repr::Text(t) => t.parse().map_err(serde::de::Error::custom),
            Repr::Num(n) => Ok(CpuList::from_cpus([n])),
            Repr::List(l) => {
                if let Some(bad) = l.iter().find(|&&c| c > MAX_CPU) {
                    return Err(serde::de::Error::custom(format!(
                        "CPU {bad} is above the maximum {MAX_CPU}"
                    )));
                }
                Ok(CpuList::from_cpus(l))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_formats_ranges() {
        let l: CpuList = "8, 0-3,2,10-11".parse().unwrap();
        assert_eq!(l.cpus(), &[0, 1, 2, 3, 8, 10, 11]);
        assert_eq!(l.to_string(), "0-3,8,10-11");
        assert_eq!(CpuList::new().to_string(), "");
        assert_eq!("".parse::<CpuList>().unwrap(), CpuList::new());
    }

    #[test]
    fn rejects_bad_text_with_reason() {
        let e = "3-1".parse::<CpuList>().unwrap_err();
        assert!(e.0.contains("backwards"), "{e}");
        let e = "a".parse::<CpuList>().unwrap_err();
        assert!(e.0.contains("not a CPU number"), "{e}");
        let e = "9000".parse::<CpuList>().unwrap_err();
        assert!(e.0.contains("maximum"), "{e}");
    }

    #[test]
    fn serde_accepts_string_number_and_list() {
        let a: CpuList = serde_json::from_str("\"0-2\"").unwrap();
        let b: CpuList = serde_json::from_str("[2,1,0]").unwrap();
        let c: CpuList = serde_json::from_str("4").unwrap();
        assert_eq!(a, b);
        assert_eq!(c.cpus(), &[4]);
        assert_eq!(serde_json::to_string(&a).unwrap(), "\"0-2\"");
    }
}
