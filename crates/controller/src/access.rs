//! Host resources granted to authorities (ADR 045): the stored grants, the admin's grant and
//! revoke, and the checks that every host path, host interface and TAP a request names is
//! granted to its authority.
//!
//! Owns `/grants/<authority>` and the rule "nothing of the host is assumed": a non-admin request
//! naming an ungranted resource is refused (403, the field and the missing grant) before
//! anything is written. It must not open, stat or resolve anything on a node: grants are
//! lexical, like the paths they cover.

use telvirt_model::grant::{self, ResourceKind};
use telvirt_model::network::{Endpoint, NetworkDescriptor};
use telvirt_model::{Device, DeviceGrant, FieldError, HostGrants, VnfDescriptor, module_digest};
use telvirt_store::{Compare, Op};

use crate::records::{self, authority_key, grants_key};
use crate::service::{Caller, Controller, ControllerError, decode, encode};

type Result<T, E = ControllerError> = std::result::Result<T, E>;

/// An authority's grants with the revision of its record they were read at (0: no such
/// authority), so a write that relied on them can be conditioned on them not changing. The
/// authority's record stands for its grants: a grant or revoke writes the record again with
/// them, and so do a token's rotation and the start of the authority's deletion, so one
/// compare keeps a request from being written once any of these happened after its checks.
#[derive(Debug, Clone, Default)]
pub struct GrantsRead {
    pub grants: HostGrants,
    pub revision: u64,
    /// The authority's record as read (written again, unchanged, with its grants).
    record: Vec<u8>,
    /// Its deletion began.
    deleting: bool,
    /// The wasm security domain its record names (absent in records from before domains).
    domain: Option<String>,
}

impl GrantsRead {
    /// The wasm security domain of `authority`, as its record read here says.
    pub fn domain(&self, authority: &str) -> String {
        crate::auth::effective_domain(authority, self.domain.as_deref()).to_owned()
    }

    /// Whether the authority exists and its deletion has not begun.
    fn stands(&self) -> bool {
        self.revision != 0 && !self.deleting
    }

    /// The condition "the authority, its grants and its token are still what they were".
    pub fn unchanged(&self, authority: &str) -> Compare {
        Compare::ModRevision {
            key: authority_key(authority),
            revision: self.revision,
        }
    }
}

fn authority_not_found(name: &str) -> ControllerError {
    ControllerError::NotFound(format!("authority {name} not found"))
}

fn refused(field: FieldError) -> ControllerError {
    ControllerError::NotGranted(field)
}

/// The host resources a VNF descriptor names, each with its field path.
pub fn vnf_resources(d: &VnfDescriptor) -> Vec<(ResourceKind, String, String)> {
    let mut out = Vec::new();
    if let Some(vm) = &d.spec.vm {
        for (path, value) in [
            ("spec.vm.kernel", &vm.kernel),
            ("spec.vm.initrd", &vm.initrd),
            ("spec.vm.disk", &vm.disk),
        ] {
            if let Some(v) = value {
                out.push((ResourceKind::Path, path.to_owned(), v.clone()));
            }
        }
    }
    if let Some(wasm) = &d.spec.wasm
        && module_digest(&wasm.module).is_none()
    {
        out.push((
            ResourceKind::Path,
            "spec.wasm.module".to_owned(),
            wasm.module.clone(),
        ));
    }
    out
}

/// The host resource a device grant names, if any.
pub fn device_resource(g: &DeviceGrant) -> Option<(ResourceKind, &'static str, String)> {
    match &g.device {
        Device::Blk { path, .. } => Some((ResourceKind::Path, "path", path.clone())),
        Device::Net { tap } => Some((ResourceKind::Tap, "tap", tap.clone())),
        Device::Rng | Device::Serial { .. } => None,
    }
}

/// The host interfaces a network links, each with its field path.
pub fn network_resources(d: &NetworkDescriptor) -> Vec<(ResourceKind, String, String)> {
    let mut out = Vec::new();
    for (i, link) in d.parsed_links() {
        for (end, ep) in [("from", &link.from), ("to", &link.to)] {
            if let Endpoint::Host { ifname, .. } = ep {
                out.push((
                    ResourceKind::Interface,
                    format!("spec.links[{i}].{end}"),
                    ifname.clone(),
                ));
            }
        }
    }
    out
}

/// Refuses the first resource `grants` do not cover.
pub fn require_all(
    grants: &HostGrants,
    resources: &[(ResourceKind, String, String)],
) -> Result<()> {
    for (kind, path, resource) in resources {
        grant::require(grants, *kind, path, resource).map_err(refused)?;
    }
    Ok(())
}

impl Controller {
    /// The grants of `authority` as stored (none: empty), with its record's revision (read
    /// first: a grant written after it changes that revision too).
    pub async fn read_grants(&self, authority: &str) -> Result<GrantsRead> {
        let record_key = authority_key(authority);
        let Some(record) = self.store_handle().get(&record_key).await? else {
            return Ok(GrantsRead::default());
        };
        let authority_record = decode::<records::AuthorityRecord>(&record_key, &record.value)?;
        let key = grants_key(authority);
        let grants = match self.store_handle().get(&key).await? {
            None => HostGrants::default(),
            Some(v) => decode(&key, &v.value)?,
        };
        Ok(GrantsRead {
            grants,
            revision: record.mod_revision,
            record: record.value,
            deleting: authority_record.deleting,
            domain: authority_record.domain,
        })
    }

    /// The caller's grants, or `None` for the admin, who is not confined by grants. Refused
    /// (409) when the caller's authority is gone or being deleted (a request that
    /// authenticated before, or the admin acting on its object): nothing more is written for
    /// it.
    pub(crate) async fn confining_grants(&self, caller: &Caller) -> Result<Option<GrantsRead>> {
        if caller.is_admin() {
            return Ok(None);
        }
        let read = self.read_grants(&caller.name).await?;
        if !read.stands() {
            // 409 rather than 401: the caller may be the admin acting on such an authority's
            // object (a network it left), whose own token is fine.
            return Err(ControllerError::Conflict(format!(
                "authority {} is deleted or being deleted: nothing more is written on its behalf",
                caller.name
            )));
        }
        Ok(Some(read))
    }

    /// What `authority` has been granted: for the admin about anyone, for an authority about
    /// itself (others answer 404, as for a missing authority).
    pub async fn grants(&self, caller: &Caller, authority: &str) -> Result<HostGrants> {
        if !caller.is_admin() && caller.name != authority {
            return Err(authority_not_found(authority));
        }
        let read = self.read_grants(authority).await?;
        if read.revision == 0 {
            return Err(authority_not_found(authority));
        }
        Ok(read.grants)
    }

    /// Adds host resources to what `authority` may use (admin only). Bad entries are refused
    /// with their index and nothing changes.
    pub async fn grant(
        &self,
        caller: &Caller,
        authority: &str,
        more: &HostGrants,
    ) -> Result<HostGrants> {
        self.admin_only(caller, "grants host resources")?;
        if authority == telvirt_model::api::ADMIN_AUTHORITY {
            return Err(ControllerError::Invalid(FieldError::new(
                "authority",
                "the admin is not confined by grants; grant to another authority",
            )));
        }
        if let Some(first) = more.violations().into_iter().next() {
            return Err(ControllerError::Invalid(first));
        }
        if more.is_empty() {
            return Err(ControllerError::Invalid(FieldError::new(
                "paths",
                "name at least one path, interface or tap to grant",
            )));
        }
        self.change_grants(authority, |g| {
            g.add(more);
            match g.violations().into_iter().next() {
                Some(first) => Err(ControllerError::Invalid(first)),
                None => Ok(()),
            }
        })
        .await
    }

    /// Takes host resources back from `authority` (admin only). Refused (409, naming the user)
    /// while one of its VNFs or networks uses a resource only the revoked entries cover, and
    /// for entries it does not hold.
    pub async fn revoke(
        &self,
        caller: &Caller,
        authority: &str,
        less: &HostGrants,
    ) -> Result<HostGrants> {
        self.admin_only(caller, "revokes host resources")?;
        let after = self
            .change_grants(authority, |g| {
                let missing = g.remove(less);
                if let Some((kind, entry)) = missing.first() {
                    return Err(ControllerError::NotFound(format!(
                        "authority {authority} holds no {} grant `{entry}`",
                        kind.flag().trim_start_matches('-')
                    )));
                }
                Ok(())
            })
            .await?;
        // Checked after the write as well as the reads it rests on: a create that read the old
        // grants either committed before this write (found here) or fails its grants compare.
        // Undone by giving back exactly what was taken: a grant made in between stays.
        if let Err(in_use) = self.check_uses(authority, &after).await {
            self.change_grants(authority, |g| {
                g.add(less);
                Ok(())
            })
            .await?;
            return Err(in_use);
        }
        Ok(after)
    }

    pub(crate) fn admin_only(&self, caller: &Caller, what: &str) -> Result<()> {
        if caller.is_admin() {
            Ok(())
        } else {
            Err(ControllerError::Forbidden(format!(
                "only the admin authority {what}"
            )))
        }
    }

    async fn change_grants(
        &self,
        authority: &str,
        mut change: impl FnMut(&mut HostGrants) -> Result<()>,
    ) -> Result<HostGrants> {
        for _ in 0..16 {
            let read = self.read_grants(authority).await?;
            if !read.stands() {
                return Err(authority_not_found(authority));
            }
            let mut grants = read.grants.clone();
            change(&mut grants)?;
            let key = grants_key(authority);
            let op = if grants.is_empty() {
                Op::Delete { key: key.clone() }
            } else {
                Op::Put {
                    key: key.clone(),
                    value: encode(&grants)?,
                    lease: None,
                }
            };
            // The record again, unchanged: its revision moves with the grants.
            let record = Op::Put {
                key: authority_key(authority),
                value: read.record.clone(),
                lease: None,
            };
            let outcome = self
                .store_handle()
                .txn(vec![read.unchanged(authority)], vec![op, record])
                .await?;
            if outcome.succeeded {
                return Ok(grants);
            }
        }
        Err(ControllerError::Conflict(format!(
            "the grants of {authority} kept changing; try again"
        )))
    }

    /// Refuses (409) when a VNF or network of `authority` uses a host resource `grants` do not
    /// cover; the refusal names the authority's own object and field.
    async fn check_uses(&self, authority: &str, grants: &HostGrants) -> Result<()> {
        for (key, v) in self.store_handle().list(records::VNFS).await? {
            let record: records::VnfRecord = decode(&key, &v.value)?;
            let vnf = &record.vnf;
            if vnf.owner.as_str() != authority {
                continue;
            }
            let mut uses = vnf_resources(&vnf.descriptor);
            for d in &vnf.devices {
                if let Some((kind, field, resource)) = device_resource(d) {
                    uses.push((kind, format!("devices[{}].{field}", d.id), resource));
                }
            }
            if let Some((_, field, resource)) = uses
                .iter()
                .find(|(kind, _, resource)| !grants.covers(*kind, resource))
            {
                return Err(ControllerError::Conflict(format!(
                    "vnf {} uses `{resource}` ({field}); delete or change it before revoking",
                    vnf.name
                )));
            }
        }
        for n in self.all_networks().await? {
            if n.owner.as_str() != authority {
                continue;
            }
            if let Some((_, field, resource)) = network_resources(&n.descriptor)
                .iter()
                .find(|(kind, _, resource)| !grants.covers(*kind, resource))
            {
                return Err(ControllerError::Conflict(format!(
                    "network {} uses host:{resource} ({field}); delete or change it before revoking",
                    n.name
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_name_their_host_resources_with_field_paths() {
        let d = telvirt_model::parse_vnf(
            br#"
apiVersion: telvirt/v1
kind: Vnf
metadata: { name: v1 }
spec:
  runtime: vm
  vm: { memory: 64MiB, kernel: /k/vmlinuz, initrd: /k/initrd, disk: /d/a.img }
"#,
            telvirt_model::Format::Yaml,
        )
        .unwrap();
        let paths: Vec<(String, String)> = vnf_resources(&d)
            .into_iter()
            .map(|(_, p, r)| (p, r))
            .collect();
        assert_eq!(
            paths,
            [
                ("spec.vm.kernel".to_owned(), "/k/vmlinuz".to_owned()),
                ("spec.vm.initrd".to_owned(), "/k/initrd".to_owned()),
                ("spec.vm.disk".to_owned(), "/d/a.img".to_owned()),
            ]
        );
        let mut g = HostGrants::default();
        g.paths.insert("/k/".into());
        let e = require_all(&g, &vnf_resources(&d)).unwrap_err();
        match e {
            ControllerError::NotGranted(f) => assert_eq!(f.path, "spec.vm.disk"),
            other => panic!("expected NotGranted, got {other}"),
        }
    }
}
