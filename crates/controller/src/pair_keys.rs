//! The keys replication streams are tagged with: one secret per cluster, kept in the store
//! (`/secrets/replication`, made on first need), and from it one key per stream, derived from
//! the VNF, the sending and receiving hosts and the move (ADR 066). The key of a stream is
//! given only to the agents of its two hosts, in their assignments.
//!
//! Owns the secret's record and the derivation. It must not serve the secret, nor a key to
//! anyone but the agent of one of the stream's two hosts.

use std::sync::Arc;

use rand::RngCore;
use ring::hmac;
use telvirt_model::api::PairKey;
use telvirt_store::Store;

use crate::service::ControllerError;

/// Where the cluster's replication secret is kept.
pub const REPLICATION_SECRET: &str = "/secrets/replication";

/// Bytes of the cluster's secret.
const SECRET_BYTES: usize = 32;

/// Says what a derived key is for, so it can serve nothing else.
const DERIVATION_LABEL: &[u8] = b"telvirt replication stream v1";

/// A new random secret.
fn new_secret() -> Vec<u8> {
    let mut secret = vec![0u8; SECRET_BYTES];
    rand::rng().fill_bytes(&mut secret);
    secret
}

/// The cluster's replication secret, from the store; made and stored first when there is none
/// (by whichever controller gets there first: one that loses the race reads the winner's).
pub async fn cluster_secret(store: &Arc<dyn Store>) -> Result<hmac::Key, ControllerError> {
    loop {
        if let Some(v) = store.get(REPLICATION_SECRET).await? {
            if v.value.len() != SECRET_BYTES {
                return Err(ControllerError::Corrupt(format!(
                    "{REPLICATION_SECRET}: {} bytes, expected {SECRET_BYTES}",
                    v.value.len()
                )));
            }
            return Ok(hmac::Key::new(hmac::HMAC_SHA256, &v.value));
        }
        let secret = new_secret();
        let key = hmac::Key::new(hmac::HMAC_SHA256, &secret);
        if store
            .compare_and_swap(REPLICATION_SECRET, 0, secret)
            .await?
        {
            return Ok(key);
        }
    }
}

/// Replaces the cluster's replication secret with a new random one (made when there was none),
/// on condition that it is still the one read: a rotation that raced another is refused
/// (Conflict) rather than undone by it.
pub async fn rotate_secret(store: &Arc<dyn Store>) -> Result<(), ControllerError> {
    let revision = store
        .get(REPLICATION_SECRET)
        .await?
        .map_or(0, |v| v.mod_revision);
    if store
        .compare_and_swap(REPLICATION_SECRET, revision, new_secret())
        .await?
    {
        Ok(())
    } else {
        Err(ControllerError::Conflict(
            "the replication secret changed while it was rotated (another rotation?); try again"
                .into(),
        ))
    }
}

/// The key of `vnf`'s stream from `from` (the active's host, a move's source) to `to` (the
/// standby's host, a move's destination) for move `move_id` (0: an active-standby pair's).
/// Another pair of hosts, another direction or another move gets another key.
pub fn stream_key(secret: &hmac::Key, vnf: &str, from: &str, to: &str, move_id: u64) -> PairKey {
    let mut ctx = hmac::Context::with_key(secret);
    ctx.update(DERIVATION_LABEL);
    // Each name with its length first: no two lists of names make the same bytes.
    for part in [vnf, from, to] {
        ctx.update(&(part.len() as u64).to_le_bytes());
        ctx.update(part.as_bytes());
    }
    ctx.update(&move_id.to_le_bytes());
    let tag = ctx.sign();
    let mut key = [0u8; PairKey::LEN];
    key.copy_from_slice(&tag.as_ref()[..PairKey::LEN]);
    PairKey::new(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_stream_has_its_own_key_and_both_ends_derive_the_same() {
        let secret = hmac::Key::new(hmac::HMAC_SHA256, &[7; SECRET_BYTES]);
        let key = stream_key(&secret, "nat1", "h1", "h2", 0);
        assert_eq!(key, stream_key(&secret, "nat1", "h1", "h2", 0));
        for other in [
            stream_key(&secret, "nat2", "h1", "h2", 0),
            stream_key(&secret, "nat1", "h2", "h1", 0),
            stream_key(&secret, "nat1", "h1", "h3", 0),
            stream_key(&secret, "nat1", "h1", "h2", 1),
            // The same bytes split another way between the names.
            stream_key(&secret, "nat1h", "1", "h2", 0),
            stream_key(
                &hmac::Key::new(hmac::HMAC_SHA256, &[8; SECRET_BYTES]),
                "nat1",
                "h1",
                "h2",
                0,
            ),
        ] {
            assert_ne!(key, other);
        }
    }
}
