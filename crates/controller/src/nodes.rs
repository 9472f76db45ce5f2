//! Node credentials: the bearer tokens agents authenticate with.
//!
//! Owns issuing a host's credential (admin only; a new one replaces the old), and finding the
//! host a node token belongs to. Node tokens (`tvn_…`) and authority tokens (`tvt_…`) live under
//! different keys, so neither can stand in for the other. It must not store a token: only its
//! SHA-256 is kept, and the plain token is shown once, to the admin who issued it.

use serde::{Deserialize, Serialize};
use telvirt_api::NODE_TOKEN_PREFIX;
use telvirt_model::FieldError;
use utoipa::ToSchema;

use crate::auth;
use crate::service::{Caller, Controller, ControllerError, decode, encode, now_rfc3339};

/// `/node-credentials/<host>`: the hash of the host's current node token.
pub const NODE_CREDENTIALS: &str = "/node-credentials/";
/// `/node-tokens/<sha256>`: the host a node token belongs to.
pub const NODE_TOKENS: &str = "/node-tokens/";

/// The longest host name (a DNS name).
pub const MAX_HOST_NAME: usize = 253;

type Result<T, E = ControllerError> = std::result::Result<T, E>;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct NodeCredentialRecord {
    token_sha256: String,
    issued_at: String,
    issued_by: String,
}

/// A host's new node credential (`POST /v1/hosts/{name}/credential`): shown once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NodeCredential {
    pub host: String,
    /// Bearer token for `telvirt agent --token-file`; only its hash is kept.
    pub token: String,
}

/// The agent a request comes from: the host its node credential names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeCaller {
    pub host: String,
}

/// Refuses a host name that could not be a DNS name (and so could reach outside its keys).
pub fn check_host_name(host: &str) -> Result<()> {
    let ok = !host.is_empty()
        && host.len() <= MAX_HOST_NAME
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
        && !host.starts_with(['.', '-'])
        && !host.contains("..");
    if ok {
        Ok(())
    } else {
        Err(ControllerError::Invalid(FieldError::new(
            "host",
            format!(
                "'{host}' is not a host name: 1-{MAX_HOST_NAME} letters, digits, '-', '_' or '.', \
                 not starting with '.' or '-', without '..'"
            ),
        )))
    }
}

fn credential_key(host: &str) -> String {
    format!("{NODE_CREDENTIALS}{host}")
}

fn node_token_key(hash: &str) -> String {
    format!("{NODE_TOKENS}{hash}")
}

impl Controller {
    /// Issues `host`'s node credential, replacing (and so revoking) its previous one. Admin
    /// only; the host need not be registered yet (its agent registers it with this credential).
    pub async fn issue_node_credential(
        &self,
        caller: &Caller,
        host: &str,
    ) -> Result<NodeCredential> {
        if !caller.is_admin() {
            return Err(ControllerError::Forbidden(
                "only the admin authority issues node credentials".into(),
            ));
        }
        check_host_name(host)?;
        let key = credential_key(host);
        let previous = match self.store_handle().get(&key).await? {
            Some(v) => Some((
                decode::<NodeCredentialRecord>(&key, &v.value)?,
                v.mod_revision,
            )),
            None => None,
        };
        let token = format!(
            "{NODE_TOKEN_PREFIX}{}",
            &auth::new_token()[auth::TOKEN_PREFIX.len()..]
        );
        let record = NodeCredentialRecord {
            token_sha256: auth::token_hash(&token),
            issued_at: now_rfc3339(),
            issued_by: caller.name.clone(),
        };
        let won = self
            .write_token_holder(
                key,
                encode(&record)?,
                (node_token_key(&record.token_sha256), host),
                previous.map(|(old, rev)| (node_token_key(&old.token_sha256), rev)),
            )
            .await?;
        if !won {
            return Err(ControllerError::Conflict(format!(
                "host {host}'s credential was issued by someone else meanwhile; issue it again"
            )));
        }
        Ok(NodeCredential {
            host: host.to_owned(),
            token,
        })
    }

    /// The host a node token belongs to. An authority's token is refused here (403), as a node
    /// token is by [`Controller::authenticate`].
    pub async fn authenticate_node(&self, token: &str) -> Result<NodeCaller> {
        if !token.starts_with(NODE_TOKEN_PREFIX) {
            return Err(ControllerError::Forbidden(
                "the agent protocol takes a node credential (`telvirt host credential`), not an \
                 authority's token"
                    .into(),
            ));
        }
        let key = node_token_key(&auth::token_hash(token));
        let v = self
            .store_handle()
            .get(&key)
            .await?
            .ok_or(ControllerError::Unauthorized)?;
        let host = String::from_utf8(v.value)
            .map_err(|e| ControllerError::Corrupt(format!("{key}: {e}")))?;
        Ok(NodeCaller { host })
    }
}

impl NodeCaller {
    /// Refuses a call about another host than the credential's.
    pub fn require_host(&self, host: &str) -> Result<()> {
        if self.host == host {
            Ok(())
        } else {
            Err(ControllerError::Forbidden(format!(
                "this node credential is host {}'s; it cannot act for host {host}",
                self.host
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_that_could_escape_their_key_are_refused() {
        for ok in ["node-1", "h1.example.net", "a", "rack_3"] {
            assert!(check_host_name(ok).is_ok(), "{ok}");
        }
        let long = "a".repeat(MAX_HOST_NAME + 1);
        for bad in ["", "a/b", "..", "a..b", ".a", "-a", "a b", long.as_str()] {
            let err = check_host_name(bad).unwrap_err().to_string();
            assert!(err.contains("not a host name"), "{bad}: {err}");
        }
    }
}
