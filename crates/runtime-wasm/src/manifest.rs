//! The `telvirt.manifest` custom section: name, version, requested permissions, maps and
//! counters, as JSON. Parses and checks it; it does not verify code.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::abi;
use crate::maps::MapDef;
use crate::security::Permission;

/// Largest number of counters a module may declare.
pub const MAX_COUNTERS: usize = 64;
/// Largest number of maps a module may declare.
pub const MAX_MAPS: usize = 64;

/// The application descriptor carried inside the bytecode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// ABI version; must be 1.
    pub abi: u32,
    /// Module name (`[a-z0-9_-]`, 1..=64 bytes).
    pub name: String,
    /// Module version (free text, 1..=32 bytes, e.g. semver).
    pub version: String,
    /// Permissions the module requests; every import needs one of them.
    #[serde(default)]
    pub permissions: BTreeSet<Permission>,
    /// Maps the module uses; map id = index in this list.
    #[serde(default)]
    pub maps: Vec<MapDef>,
    /// Counter names; counter index = index in this list.
    #[serde(default)]
    pub counters: Vec<String>,
}

impl Manifest {
    /// Parses and checks a manifest; every problem is returned.
    pub fn parse(bytes: &[u8]) -> Result<Self, Vec<String>> {
        let m: Manifest = serde_json::from_slice(bytes)
            .map_err(|e| vec![format!("manifest is not valid JSON for ABI v1: {e}")])?;
        let errs = m.check();
        if errs.is_empty() { Ok(m) } else { Err(errs) }
    }

    /// Checks field values; returns every problem found.
    pub fn check(&self) -> Vec<String> {
        let mut errs = Vec::new();
        if self.abi != abi::ABI_VERSION {
            errs.push(format!(
                "manifest.abi: {} is not supported (this runtime implements ABI {})",
                self.abi,
                abi::ABI_VERSION
            ));
        }
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 64
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if !name_ok {
            errs.push(format!(
                "manifest.name: `{}` must be 1..=64 characters of [a-z0-9_-]",
                self.name
            ));
        }
        if self.version.is_empty() || self.version.len() > 32 {
            errs.push("manifest.version: must be 1..=32 bytes".into());
        }
        if self.maps.len() > MAX_MAPS {
            errs.push(format!(
                "manifest.maps: {} maps declared, at most {MAX_MAPS}",
                self.maps.len()
            ));
        }
        let mut names = BTreeSet::new();
        for (i, m) in self.maps.iter().enumerate() {
            if let Err(e) = m.check() {
                errs.push(format!("manifest.maps[{i}]: {e}"));
            }
            if !names.insert(&m.name) {
                errs.push(format!(
                    "manifest.maps[{i}]: duplicate map name `{}`",
                    m.name
                ));
            }
        }
        if self.counters.len() > MAX_COUNTERS {
            errs.push(format!(
                "manifest.counters: {} declared, at most {MAX_COUNTERS}",
                self.counters.len()
            ));
        }
        if !self.maps.is_empty()
            && !self.permissions.contains(&Permission::MapsRead)
            && !self.permissions.contains(&Permission::MapsWrite)
        {
            errs.push(
                "manifest.maps: maps declared but neither maps.read nor maps.write requested"
                    .into(),
            );
        }
        errs
    }
}
