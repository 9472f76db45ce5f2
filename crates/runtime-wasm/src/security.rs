//! Security manager: permissions, security domains and their policies, ed25519 module
//! signatures. Decides what a module may hold; it does not link or run anything.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

/// A capability a module may request in its manifest; each host function needs one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Permission {
    #[serde(rename = "maps.read")]
    MapsRead,
    #[serde(rename = "maps.write")]
    MapsWrite,
    #[serde(rename = "clock")]
    Clock,
    #[serde(rename = "log")]
    Log,
    #[serde(rename = "random")]
    Random,
    #[serde(rename = "emit")]
    Emit,
    #[serde(rename = "counters")]
    Counters,
}

impl Permission {
    /// Every permission of ABI v1.
    pub const ALL: [Permission; 7] = [
        Self::MapsRead,
        Self::MapsWrite,
        Self::Clock,
        Self::Log,
        Self::Random,
        Self::Emit,
        Self::Counters,
    ];

    /// The manifest spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MapsRead => "maps.read",
            Self::MapsWrite => "maps.write",
            Self::Clock => "clock",
            Self::Log => "log",
            Self::Random => "random",
            Self::Emit => "emit",
            Self::Counters => "counters",
        }
    }
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What one security domain allows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DomainPolicy {
    /// Permissions a module of this domain may request.
    pub allowed: BTreeSet<Permission>,
    /// Whether an ed25519 signature over the module's SHA-256 by one of `trusted_keys` is required.
    #[serde(default)]
    pub require_signature: bool,
    /// Accepted ed25519 public keys (32 bytes each).
    #[serde(default)]
    pub trusted_keys: Vec<[u8; 32]>,
}

/// Security domains by name (`operator`, `trusted`, `untrusted` by default).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecurityPolicy {
    pub domains: BTreeMap<String, DomainPolicy>,
}

impl Default for SecurityPolicy {
    /// `operator`: every permission; `trusted`: all but `emit`; `untrusted`: maps, counters and
    /// clock only. No signatures required (configure `require_signature` + `trusted_keys`).
    fn default() -> Self {
        let all: BTreeSet<_> = Permission::ALL.into_iter().collect();
        let trusted: BTreeSet<_> = all
            .iter()
            .copied()
            .filter(|p| *p != Permission::Emit)
            .collect();
        let untrusted: BTreeSet<_> = [
            Permission::MapsRead,
            Permission::MapsWrite,
            Permission::Counters,
            Permission::Clock,
        ]
        .into_iter()
        .collect();
        let mk = |allowed| DomainPolicy {
            allowed,
            require_signature: false,
            trusted_keys: Vec::new(),
        };
        let mut domains = BTreeMap::new();
        domains.insert("operator".to_string(), mk(all));
        domains.insert("trusted".to_string(), mk(trusted));
        domains.insert("untrusted".to_string(), mk(untrusted));
        Self { domains }
    }
}

/// A detached ed25519 signature over the module's SHA-256 digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleSignature {
    /// Signer's public key.
    pub public_key: [u8; 32],
    /// Signature bytes (64), over the 32-byte SHA-256 of the module bytes.
    pub signature: Vec<u8>,
}

impl SecurityPolicy {
    /// The policy of `domain`, or a precise error listing the known domains.
    pub fn domain(&self, domain: &str) -> Result<&DomainPolicy, String> {
        self.domains.get(domain).ok_or_else(|| {
            format!(
                "unknown security domain `{domain}` (known: {})",
                self.domains.keys().cloned().collect::<Vec<_>>().join(", ")
            )
        })
    }
}

impl DomainPolicy {
    /// Checks the signature requirement. `Ok(())` when no signature is required and none given.
    pub fn check_signature(
        &self,
        module_hash: &[u8; 32],
        sig: Option<&ModuleSignature>,
    ) -> Result<(), String> {
        let Some(sig) = sig else {
            return if self.require_signature {
                Err(
                    "the domain requires an ed25519 signature over the module hash; none given"
                        .into(),
                )
            } else {
                Ok(())
            };
        };
        if self.require_signature && !self.trusted_keys.contains(&sig.public_key) {
            return Err("signature key is not among the domain's trusted keys".into());
        }
        let key = VerifyingKey::from_bytes(&sig.public_key)
            .map_err(|e| format!("signature public key is invalid: {e}"))?;
        let bytes: [u8; 64] = sig
            .signature
            .as_slice()
            .try_into()
            .map_err(|_| format!("signature must be 64 bytes, got {}", sig.signature.len()))?;
        key.verify(module_hash, &Signature::from_bytes(&bytes))
            .map_err(|_| "signature does not verify over the module hash".to_string())
    }
}
