//! Bearer tokens and security domains of management authorities.
//!
//! Owns making tokens and hashing them, and which wasm security domain an authority's modules
//! run in. It must not store or log a token: only its SHA-256 is kept, and the plain token is
//! shown once, to whoever created the authority.

use rand::RngCore;
use telvirt_model::api::{ADMIN_AUTHORITY, DEFAULT_AUTHORITY_DOMAIN, OPERATOR_DOMAIN, hex};

/// The domains of the wasm runtime's default security policy (`SecurityPolicy::default()` of
/// telvirt-runtime-wasm); `telvirt serve` replaces them by its configured policy's.
pub const DEFAULT_DOMAINS: [&str; 3] = [OPERATOR_DOMAIN, "trusted", DEFAULT_AUTHORITY_DOMAIN];

/// The security domain of authority `name` given its stored one: `admin` is always `operator`;
/// a record written before domains existed gets the default (least privileged) domain.
pub fn effective_domain<'a>(name: &str, stored: Option<&'a str>) -> &'a str {
    if name == ADMIN_AUTHORITY {
        return OPERATOR_DOMAIN;
    }
    stored.unwrap_or(DEFAULT_AUTHORITY_DOMAIN)
}

/// Prefix that makes telvirt tokens recognisable in configuration files.
pub const TOKEN_PREFIX: &str = "tvt_";

/// A new random token: the prefix and 32 random bytes in hex.
pub fn new_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("{TOKEN_PREFIX}{}", hex(&bytes))
}

/// SHA-256 of a token, hex.
pub fn token_hash(token: &str) -> String {
    crate::modules::sha256_hex(token.as_bytes())
}

/// Compares two hashes in time independent of where they differ.
pub fn hashes_equal(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_unique_and_prefixed() {
        let a = new_token();
        let b = new_token();
        assert_ne!(a, b);
        assert!(a.starts_with(TOKEN_PREFIX));
        assert_eq!(a.len(), TOKEN_PREFIX.len() + 64);
    }

    #[test]
    fn admin_is_operator_and_old_records_get_the_least_privileged_domain() {
        assert_eq!(effective_domain("admin", None), "operator");
        assert_eq!(effective_domain("admin", Some("untrusted")), "operator");
        assert_eq!(effective_domain("ent1", None), "untrusted");
        assert_eq!(effective_domain("ent1", Some("trusted")), "trusted");
    }

    #[test]
    fn hash_is_sha256_hex() {
        assert_eq!(
            token_hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(hashes_equal(&token_hash("x"), &token_hash("x")));
        assert!(!hashes_equal(&token_hash("x"), &token_hash("y")));
    }
}
