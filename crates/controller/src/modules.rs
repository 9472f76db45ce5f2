//! Uploaded wasm modules (`POST /v1/modules`, ADR 045): verified at upload in the uploader's
//! security domain, kept content-addressed (the bytes in the store under
//! `/module-bytes/<sha256>/` in chunks an etcd request carries, so every controller of a
//! cluster serves them, and cached in the node's module directory under their SHA-256; the
//! index under `/modules/<sha256>` with the authorities that uploaded them), and resolved when
//! a descriptor names `sha256:<hex>`.
//!
//! Owns the upload's checks (size cap, verifier verdict), the owner scoping of the index, and
//! the resolution of a descriptor's module to the maps it declares. It must not run modules:
//! the verifier is a hook ([`ModuleVerifier`]) the node installs, and agents load the bytes.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};
use telvirt_model::api::{ModuleInfo, ModuleView};
use telvirt_model::vnf::MODULE_REF_PREFIX;
use telvirt_model::vnf::limits::MAX_MODULE_BYTES;
use telvirt_model::{FieldError, VnfDescriptor, module_digest};
use telvirt_store::{Compare, Op};

use crate::records::{self, ModuleRecord, VnfRecord, module_chunk_key, module_key};

/// The bytes of a module are stored in chunks of this size: an etcd request carries at most
/// 1.5 MiB by default.
const CHUNK_BYTES: usize = 512 * 1024;
use crate::service::{Caller, Controller, ControllerError, decode, encode, now_rfc3339};

type Result<T, E = ControllerError> = std::result::Result<T, E>;

/// The node's wasm verifier, as the controller sees it.
pub trait ModuleVerifier: Send + Sync + 'static {
    /// Verifies `bytes` for security domain `domain`: the manifest's facts, or every reason it
    /// is refused. Must not echo the bytes in its reasons.
    fn verify(&self, bytes: &[u8], domain: &str) -> std::result::Result<ModuleInfo, Vec<String>>;
}

/// Where uploaded modules are kept and how they are verified.
pub struct ModuleRepository {
    dir: PathBuf,
    verifier: Arc<dyn ModuleVerifier>,
}

impl ModuleRepository {
    pub fn new(dir: impl Into<PathBuf>, verifier: Arc<dyn ModuleVerifier>) -> Self {
        Self {
            dir: dir.into(),
            verifier,
        }
    }

    /// The file holding the module with hex digest `sha256`.
    pub fn path(dir: &Path, sha256: &str) -> PathBuf {
        dir.join(format!("{sha256}.wasm"))
    }
}

/// Lower-case hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    telvirt_model::api::hex(&Sha256::digest(bytes))
}

fn invalid(path: &str, reason: impl Into<String>) -> ControllerError {
    ControllerError::Invalid(FieldError::new(path, reason))
}

fn view(record: &ModuleRecord, uploaded_at: &str) -> ModuleView {
    ModuleView {
        sha256: record.sha256.clone(),
        reference: format!("{MODULE_REF_PREFIX}{}", record.sha256),
        size: record.size,
        info: record.info.clone(),
        uploaded_at: uploaded_at.to_owned(),
    }
}

/// Writes `bytes` to `path` (creating its directory) so a reader, a crash or another upload of
/// the same module sees the whole file or none.
fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| std::io::Error::other("module path has no directory"))?;
    std::fs::create_dir_all(dir)?;
    telvirt_files::write_atomic(path, bytes)
}

/// Writes a verified module's `bytes` to its file `path` unless the file is there.
fn write_if_missing(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if path.exists() {
        return Ok(());
    }
    write_atomic(path, bytes)
}

/// [`write_if_missing`] on a blocking thread; a failure is logged (the store keeps the bytes).
async fn keep_file(path: std::path::PathBuf, bytes: Vec<u8>) {
    let kept = tokio::task::spawn_blocking(move || {
        write_if_missing(&path, &bytes).map_err(|e| format!("{}: {e}", path.display()))
    })
    .await;
    if let Ok(Err(e)) = kept {
        tracing::warn!("keeping an uploaded module's file: {e}");
    }
}

impl Controller {
    /// Installs the node's module directory and verifier (once; later calls are ignored).
    pub fn set_module_repository(&self, repo: ModuleRepository) {
        let _ = self.module_repository_cell().set(repo);
    }

    fn repository(&self) -> Result<&ModuleRepository> {
        self.module_repository_cell().get().ok_or_else(|| {
            ControllerError::Unavailable("this node keeps no uploaded modules".into())
        })
    }

    async fn module_record(&self, sha256: &str) -> Result<Option<(ModuleRecord, u64)>> {
        let key = module_key(sha256);
        match self.store_handle().get(&key).await? {
            None => Ok(None),
            Some(v) => Ok(Some((decode(&key, &v.value)?, v.mod_revision))),
        }
    }

    /// Verifies and keeps a module for the caller. Returns its view and whether the caller had
    /// not uploaded it before. Refused (422, every verifier reason; 413 over the size cap)
    /// with nothing written.
    pub async fn upload_module(
        &self,
        caller: &Caller,
        bytes: Vec<u8>,
    ) -> Result<(ModuleView, bool)> {
        let repo = self.repository()?;
        if bytes.len() as u64 > MAX_MODULE_BYTES {
            return Err(ControllerError::TooLarge(format!(
                "the module is {} bytes; the limit is {MAX_MODULE_BYTES}",
                bytes.len()
            )));
        }
        // Written only while the uploader stands as it was (not being deleted meanwhile), and
        // verified in the domain that same read of its record names.
        let (standing, domain) = match self.confining_grants(caller).await? {
            Some(g) => (Some(g.unchanged(&caller.name)), g.domain(&caller.name)),
            None => (None, self.authority_domain(&caller.name).await?),
        };
        let verifier = Arc::clone(&repo.verifier);
        let dir = repo.dir.clone();
        let (sha256, info, bytes) = tokio::task::spawn_blocking(move || {
            let info =
                verifier
                    .verify(&bytes, &domain)
                    .map_err(|reasons| ControllerError::Refused {
                        detail: format!(
                            "the module was refused by the verifier (security domain `{domain}`)"
                        ),
                        errors: reasons
                            .into_iter()
                            .map(|r| FieldError::new("module", r))
                            .collect(),
                    })?;
            let sha256 = sha256_hex(&bytes);
            write_if_missing(&ModuleRepository::path(&dir, &sha256), &bytes).map_err(|e| {
                ControllerError::Unavailable(format!("cannot keep the module: {e}"))
            })?;
            Ok::<_, ControllerError>((sha256, info, bytes))
        })
        .await
        .map_err(|e| ControllerError::Unavailable(format!("module check stopped: {e}")))??;
        // Chunks this upload wrote, as it wrote them: taken out again when it is refused.
        let mut written = Vec::new();
        let indexed = self
            .index_upload(caller, &sha256, &info, &bytes, standing, &mut written)
            .await;
        let path = ModuleRepository::path(&repo.dir, &sha256);
        match indexed {
            Ok(done) => {
                // A refused upload of the same bytes may have taken the file out after this one
                // found it (the node's own agent reads it there).
                keep_file(path, bytes).await;
                Ok(done)
            }
            Err(e) => {
                if !written.is_empty() {
                    self.discard_unindexed(&sha256, written, path, bytes).await;
                }
                Err(e)
            }
        }
    }

    /// Writes the uploaded module's chunks (unless its index says they are there) and then its
    /// index with the caller among its owners, while `standing` holds.
    async fn index_upload(
        &self,
        caller: &Caller,
        sha256: &str,
        info: &ModuleInfo,
        bytes: &[u8],
        standing: Option<Compare>,
        written: &mut Vec<Compare>,
    ) -> Result<(ModuleView, bool)> {
        let size = bytes.len() as u64;
        for _ in 0..16 {
            let existing = self.module_record(sha256).await?;
            let (mut record, rev) = existing.unwrap_or_else(|| {
                (
                    ModuleRecord {
                        sha256: sha256.to_owned(),
                        size,
                        info: info.clone(),
                        owners: Default::default(),
                        chunks: 0,
                    },
                    0,
                )
            });
            // The bytes go before the index, and the index only while they are all there (a
            // delete of the same module meanwhile removes them): an indexed module is always
            // whole in the store. Once indexed, its chunks go only with its index.
            let mut compares = Vec::new();
            if record.chunks == 0 {
                self.store_chunks(sha256, bytes, written).await?;
                compares = written.clone();
                record.chunks = u32::try_from(compares.len()).unwrap_or(u32::MAX);
            } else if let Some(at) = record.owners.get(&caller.name) {
                return Ok((view(&record, at), false));
            }
            let now = now_rfc3339();
            let new_owner = !record.owners.contains_key(&caller.name);
            let at = record
                .owners
                .entry(caller.name.clone())
                .or_insert(now)
                .clone();
            let value = encode(&record)?;
            let key = module_key(sha256);
            compares.push(Compare::ModRevision {
                key: key.clone(),
                revision: rev,
            });
            compares.extend(standing.clone());
            let put = Op::Put {
                key,
                value,
                lease: None,
            };
            if self
                .store_handle()
                .txn(compares, vec![put])
                .await?
                .succeeded
            {
                return Ok((view(&record, &at), new_owner));
            }
            if let Some(standing) = &standing {
                self.guard_holds(standing).await?;
            }
        }
        Err(ControllerError::Conflict(
            "the module's index kept changing; upload again".into(),
        ))
    }

    /// Writes `bytes` of module `sha256` to the store in chunks (one transaction each, as etcd
    /// bounds a request's size); into `written`, for each chunk written, a compare that holds
    /// while it is still as written. Content-addressed: writing them again changes nothing a
    /// reader could tell.
    async fn store_chunks(
        &self,
        sha256: &str,
        bytes: &[u8],
        written: &mut Vec<Compare>,
    ) -> Result<()> {
        written.clear();
        for (index, chunk) in bytes.chunks(CHUNK_BYTES).enumerate() {
            let index = u32::try_from(index)
                .map_err(|_| ControllerError::TooLarge("the module has too many chunks".into()))?;
            let key = module_chunk_key(sha256, index);
            let op = Op::Put {
                key: key.clone(),
                value: chunk.to_vec(),
                lease: None,
            };
            let revision = self
                .store_handle()
                .txn(Vec::new(), vec![op])
                .await?
                .revision;
            written.push(Compare::ModRevision { key, revision });
        }
        Ok(())
    }

    /// Takes out the chunks a refused upload wrote, while no index names the module and they
    /// are still as it wrote them (another upload of the same bytes that wrote them again keeps
    /// them), and the module's file at `path` with them, put back should an upload of the same
    /// bytes have been indexed since. Best effort: chunks left behind are written again by the
    /// next upload of the same bytes.
    async fn discard_unindexed(
        &self,
        sha256: &str,
        written: Vec<Compare>,
        path: std::path::PathBuf,
        bytes: Vec<u8>,
    ) {
        let ops = written
            .iter()
            .map(|Compare::ModRevision { key, .. }| Op::Delete { key: key.clone() })
            .collect();
        let mut compares = written;
        compares.push(Compare::ModRevision {
            key: module_key(sha256),
            revision: 0,
        });
        match self.store_handle().txn(compares, ops).await {
            Ok(outcome) if outcome.succeeded => {
                let _ = std::fs::remove_file(&path);
                if !matches!(self.module_record(sha256).await, Ok(None)) {
                    keep_file(path, bytes).await;
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("the chunks of refused upload sha256:{sha256} stay: {e}"),
        }
    }

    /// The bytes of module `sha256` from the store's chunks, checked against the digest.
    async fn stored_bytes(&self, sha256: &str) -> Result<Vec<u8>> {
        let reference = format!("{MODULE_REF_PREFIX}{sha256}");
        let Some((record, _)) = self.module_record(sha256).await? else {
            return Err(module_not_found(sha256));
        };
        if record.chunks == 0 {
            return Err(ControllerError::Unavailable(format!(
                "module {reference} was uploaded before modules were kept in the store, and this controller's module directory lacks it: upload it again"
            )));
        }
        let mut bytes = Vec::with_capacity(usize::try_from(record.size).unwrap_or(0));
        for index in 0..record.chunks {
            let key = module_chunk_key(sha256, index);
            let chunk = self.store_handle().get(&key).await?.ok_or_else(|| {
                ControllerError::Corrupt(format!("{key}: a chunk of module {reference} is missing"))
            })?;
            bytes.extend_from_slice(&chunk.value);
        }
        if sha256_hex(&bytes) != sha256 {
            return Err(ControllerError::Corrupt(format!(
                "the stored chunks of module {reference} do not hash to its digest"
            )));
        }
        Ok(bytes)
    }

    /// The modules the caller uploaded (the admin: all of them).
    pub async fn modules(&self, caller: &Caller) -> Result<Vec<ModuleView>> {
        let mut out = Vec::new();
        for (key, v) in self.store_handle().list(records::MODULES).await? {
            let record: ModuleRecord = decode(&key, &v.value)?;
            if let Some(at) = self.visible_upload(caller, &record) {
                out.push(view(&record, &at));
            }
        }
        Ok(out)
    }

    /// When the caller uploaded it; `None` when the caller may not see it.
    fn visible_upload(&self, caller: &Caller, record: &ModuleRecord) -> Option<String> {
        match record.owners.get(&caller.name) {
            Some(at) => Some(at.clone()),
            None if caller.is_admin() => record.owners.values().min().cloned(),
            None => None,
        }
    }

    pub async fn module(&self, caller: &Caller, sha256: &str) -> Result<ModuleView> {
        match self.module_record(sha256).await? {
            Some((record, _)) => match self.visible_upload(caller, &record) {
                Some(at) => Ok(view(&record, &at)),
                None => Err(module_not_found(sha256)),
            },
            None => Err(module_not_found(sha256)),
        }
    }

    /// The bytes of uploaded module `sha256` for the agent of `host`: only while that host is
    /// assigned a VNF running it, or an upgrade to it waits for that host's reply.
    pub async fn module_for_host(&self, host: &str, sha256: &str) -> Result<Vec<u8>> {
        let reference = format!("{MODULE_REF_PREFIX}{sha256}");
        if telvirt_model::module_digest(&reference).is_none() {
            return Err(invalid(
                "sha256",
                "must be 64 lowercase hex digits (a module's digest)",
            ));
        }
        let needed = self.node_calls().upgrade_waits(host, &reference)
            || self.assignments(host).await?.iter().any(|a| {
                a.descriptor
                    .spec
                    .wasm
                    .as_ref()
                    .is_some_and(|w| w.module == reference)
            });
        if !needed {
            return Err(ControllerError::Forbidden(format!(
                "host {host} runs no VNF with module {reference} and waits for no upgrade to it"
            )));
        }
        let path = ModuleRepository::path(&self.repository()?.dir, sha256);
        let cached = path.clone();
        let read = tokio::task::spawn_blocking(move || std::fs::read(&cached))
            .await
            .map_err(|e| ControllerError::Unavailable(format!("reading a module: {e}")))?;
        match read {
            Ok(bytes) => Ok(bytes),
            // Uploaded through another controller of the cluster: from the store, then cached.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let bytes = self.stored_bytes(sha256).await?;
                keep_file(path, bytes.clone()).await;
                Ok(bytes)
            }
            Err(e) => Err(ControllerError::Unavailable(format!(
                "module {reference} cannot be read: {e}"
            ))),
        }
    }

    /// Forgets the caller's upload; the bytes go when nobody keeps the module. Refused (409)
    /// while one of the caller's VNFs runs it, or while any VNF does and the caller is the last
    /// owner (without naming another authority's VNF).
    pub async fn delete_module(&self, caller: &Caller, sha256: &str) -> Result<()> {
        let reference = format!("{MODULE_REF_PREFIX}{sha256}");
        for _ in 0..16 {
            let Some((mut record, rev)) = self.module_record(sha256).await? else {
                return Err(module_not_found(sha256));
            };
            let owner = if record.owners.contains_key(&caller.name) {
                caller.name.clone()
            } else if caller.is_admin() {
                // The admin removes the module for everyone (also one whose uploaders were all
                // deleted while a VNF of the admin's ran it).
                String::new()
            } else {
                return Err(module_not_found(sha256));
            };
            let last = owner.is_empty() || record.owners.len() == 1;
            for (key, v) in self.store_handle().list(records::VNFS).await? {
                let vnf: VnfRecord = decode(&key, &v.value)?;
                let runs = vnf
                    .vnf
                    .descriptor
                    .spec
                    .wasm
                    .as_ref()
                    .is_some_and(|w| w.module == reference);
                if !runs {
                    continue;
                }
                if vnf.vnf.owner.as_str() == caller.name || caller.is_admin() {
                    return Err(ControllerError::Conflict(format!(
                        "vnf {} runs module {reference}; delete it or upgrade it first",
                        vnf.vnf.name
                    )));
                }
                if last {
                    return Err(ControllerError::Conflict(format!(
                        "module {reference} is in use; it stays until nothing runs it"
                    )));
                }
            }
            if !last {
                record.owners.remove(&owner);
            }
            if self.write_module_index(&record, rev, last).await? {
                return Ok(());
            }
        }
        Err(ControllerError::Conflict(
            "the module's index kept changing; try again".into(),
        ))
    }

    /// Lets go of every module authority `name` uploaded (its deletion): it is no longer among
    /// their owners, and a module nobody else uploaded goes with its bytes unless a VNF runs it
    /// (in `running`, the modules stored VNFs run; one of the admin's, who may run any): that
    /// one stays, with no owner, until the admin deletes it.
    pub(crate) async fn forget_module_owner(
        &self,
        name: &str,
        running: &std::collections::BTreeSet<String>,
    ) -> Result<()> {
        for (key, v) in self.store_handle().list(records::MODULES).await? {
            let listed: ModuleRecord = decode(&key, &v.value)?;
            if !listed.owners.contains_key(name) {
                continue;
            }
            let sha256 = listed.sha256.clone();
            let reference = format!("{MODULE_REF_PREFIX}{sha256}");
            // The listed record first; read again only after a write lost a race.
            let mut read = Some((listed, v.mod_revision));
            let mut tries = 0;
            while let Some((mut record, rev)) = read {
                if record.owners.remove(name).is_none() {
                    break;
                }
                let gone = record.owners.is_empty() && !running.contains(&reference);
                if self.write_module_index(&record, rev, gone).await? {
                    break;
                }
                tries += 1;
                if tries == 16 {
                    return Err(ControllerError::Conflict(format!(
                        "the index of module {reference} kept changing while authority {name} was being deleted; delete it again"
                    )));
                }
                read = self.module_record(&sha256).await?;
            }
        }
        Ok(())
    }

    /// Writes `record` as module `record.sha256`'s index over revision `rev`, or, when `gone`,
    /// deletes the index with the module's bytes (in the store and the node's cache); whether
    /// the index was still at `rev`.
    async fn write_module_index(
        &self,
        record: &ModuleRecord,
        rev: u64,
        gone: bool,
    ) -> Result<bool> {
        let sha256 = record.sha256.as_str();
        let key = module_key(sha256);
        let ops = if gone {
            std::iter::once(Op::Delete { key: key.clone() })
                .chain((0..record.chunks).map(|i| Op::Delete {
                    key: module_chunk_key(sha256, i),
                }))
                .collect()
        } else {
            vec![Op::Put {
                key: key.clone(),
                value: encode(record)?,
                lease: None,
            }]
        };
        let outcome = self
            .store_handle()
            .txn(vec![Compare::ModRevision { key, revision: rev }], ops)
            .await?;
        if outcome.succeeded
            && gone
            && let Ok(repo) = self.repository()
        {
            let _ = std::fs::remove_file(ModuleRepository::path(&repo.dir, sha256));
        }
        Ok(outcome.succeeded)
    }

    /// The maps of the module a descriptor runs, for its memory budget and map checks: the
    /// uploaded module's manifest for `sha256:<hex>` (which `owner` must have uploaded, unless
    /// `admin`), `None` for a path on the node (read by the agent; admin or granted only).
    pub(crate) async fn resolve_module(
        &self,
        owner: &Caller,
        module: &str,
        field: &str,
    ) -> Result<Option<ModuleInfo>> {
        let Some(sha256) = module_digest(module) else {
            return Ok(None);
        };
        let visible = self
            .module_record(sha256)
            .await?
            .filter(|(r, _)| owner.is_admin() || r.owners.contains_key(&owner.name));
        match visible {
            Some((record, _)) => Ok(Some(record.info)),
            None => Err(invalid(
                field,
                format!(
                    "no module {module} was uploaded by {}; upload it first (telvirt module \
                     upload FILE, or vnf create -f with a module path, which uploads it)",
                    owner.name
                ),
            )),
        }
    }

    /// Checks a descriptor's module against the module's manifest and returns the VNF's memory
    /// budget (`VnfDescriptor::memory_budget`).
    pub(crate) async fn checked_budget(&self, owner: &Caller, d: &VnfDescriptor) -> Result<u64> {
        let Some(wasm) = &d.spec.wasm else {
            return Ok(d.memory_budget(&[]));
        };
        match self
            .resolve_module(owner, &wasm.module, "spec.wasm.module")
            .await?
        {
            Some(info) => {
                let mismatches = d.map_mismatches(&info.maps);
                if !mismatches.is_empty() {
                    return Err(ControllerError::Descriptor(
                        telvirt_model::ModelError::Invalid(mismatches),
                    ));
                }
                Ok(d.memory_budget(&info.maps))
            }
            None => Ok(d.memory_budget(&[])),
        }
    }
}

fn module_not_found(sha256: &str) -> ControllerError {
    ControllerError::NotFound(format!("module sha256:{sha256} not found"))
}
