//! `telvirt module ...` and the CLI's module uploads: a descriptor (or an upgrade) that names a
//! module file is sent with the file uploaded first and the path replaced by the module's
//! `sha256:` reference, so `vnf create -f` works from any directory and a module the verifier
//! refuses fails the create. `telvirt wasm verify FILE` gives the node's verdict offline.
//!
//! Owns the client side of uploads and the offline verdict. It must not verify on its own
//! terms: the verdict is the agent's `verify_module`, the same one the node applies.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use reqwest::Method;
use telvirt_model::api::ModuleView;
use telvirt_model::vnf::limits::MAX_MODULE_BYTES;
use telvirt_model::{Format, module_digest};

use crate::cli::Output;
use crate::client::Client;

#[derive(Subcommand, Debug)]
pub enum ModuleCommand {
    /// Upload a .wasm module; the node verifies it in your security domain and keeps it under
    /// its SHA-256 (descriptors name it `sha256:<hex>`)
    Upload {
        /// The .wasm file
        file: PathBuf,
    },
    /// List the modules you uploaded
    List,
    /// Show one uploaded module: manifest name, version, permissions, maps
    Show {
        /// Its SHA-256 (hex), or `sha256:<hex>`
        sha256: String,
    },
    /// Forget an uploaded module (refused while a VNF runs it)
    Delete {
        /// Its SHA-256 (hex), or `sha256:<hex>`
        sha256: String,
    },
}

fn digest_arg(s: &str) -> &str {
    s.strip_prefix(telvirt_model::vnf::MODULE_REF_PREFIX)
        .unwrap_or(s)
}

pub async fn run(client: &Client, format: Output, cmd: ModuleCommand) -> Result<()> {
    match cmd {
        ModuleCommand::Upload { file } => {
            let module = upload(client, &file).await?;
            if !crate::output::structured(format, &module)? {
                println!(
                    "module {} {} uploaded as {}",
                    module.info.name, module.info.version, module.reference
                );
            }
        }
        ModuleCommand::List => {
            let list: Vec<ModuleView> = client.get("/v1/modules").await?;
            if !crate::output::structured(format, &list)? {
                let rows: Vec<Vec<String>> = list
                    .iter()
                    .map(|m| {
                        vec![
                            m.reference.clone(),
                            m.info.name.clone(),
                            m.info.version.clone(),
                            m.size.to_string(),
                            m.uploaded_at.clone(),
                        ]
                    })
                    .collect();
                println!(
                    "{}",
                    crate::output::table(
                        &["MODULE", "NAME", "VERSION", "BYTES", "UPLOADED"],
                        &rows
                    )
                );
            }
        }
        ModuleCommand::Show { sha256 } => {
            let m: ModuleView = client
                .get(&format!("/v1/modules/{}", digest_arg(&sha256)))
                .await?;
            if !crate::output::structured(format, &m)? {
                println!("module:      {}", m.reference);
                println!("name:        {} {}", m.info.name, m.info.version);
                println!("bytes:       {}", m.size);
                println!("permissions: {}", m.info.permissions.join(", "));
                for map in &m.info.maps {
                    println!(
                        "map:         {} ({:?}, key {} B, value {} B, {} entries)",
                        map.name, map.kind, map.key_size, map.value_size, map.max_entries
                    );
                }
            }
        }
        ModuleCommand::Delete { sha256 } => {
            let sha256 = digest_arg(&sha256);
            client
                .call(Method::DELETE, &format!("/v1/modules/{sha256}"), None)
                .await?;
            let value = serde_json::json!({ "sha256": sha256, "deleted": true });
            if !crate::output::structured(format, &value)? {
                println!("module sha256:{sha256} deleted");
            }
        }
    }
    Ok(())
}

/// Reads a module file the way the node does (a regular file within the size cap).
fn read_module(file: &Path) -> Result<Vec<u8>> {
    telvirt_runtime_wasm::read_module_file(file, MAX_MODULE_BYTES)
        .map_err(|e| anyhow::anyhow!("{e}"))
}

/// Uploads `file`; the node answers with its reference (also when it had it already).
pub async fn upload(client: &Client, file: &Path) -> Result<ModuleView> {
    let bytes = read_module(file)?;
    client
        .call(
            Method::POST,
            "/v1/modules",
            Some((bytes, "application/wasm")),
        )
        .await
        .with_context(|| format!("uploading {}", file.display()))?
        .json()
}

/// What a descriptor's `spec.wasm.module` (or an upgrade's `--module`) means on this side:
/// a reference or a server-side path to send as it is, or a local file to upload first.
fn local_module(module: &str, base: &Path) -> Result<Option<PathBuf>> {
    if module_digest(module).is_some() {
        return Ok(None);
    }
    let path = base.join(module);
    if path.is_file() {
        return Ok(Some(path));
    }
    if Path::new(module).is_absolute() {
        // Not here: a path on the node (the admin's, or one granted to the authority).
        return Ok(None);
    }
    bail!(
        "module {module} not found (resolved against {}); give a path to the .wasm file or a \
         sha256: reference of an uploaded module",
        base.display()
    )
}

/// The descriptor to send for `vnf create|apply -f FILE`: when `spec.wasm.module` names a local
/// file (relative paths against the descriptor's directory), that file is uploaded (or, with
/// [`Upload::DigestOnly`], only named) and the descriptor sent with its reference instead.
pub async fn resolve_descriptor(
    client: &Client,
    file: &Path,
    bytes: Vec<u8>,
    format: Format,
    upload_it: Upload,
) -> Result<(Vec<u8>, Format)> {
    let Ok(mut doc) = telvirt_model::from_text::<serde_json::Value>(&bytes, format) else {
        // Let the server explain what is wrong with it.
        return Ok((bytes, format));
    };
    let Some(module) = doc
        .pointer("/spec/wasm/module")
        .and_then(|m| m.as_str())
        .map(str::to_owned)
    else {
        return Ok((bytes, format));
    };
    let base = if file.as_os_str() == "-" {
        std::env::current_dir().context("reading the working directory")?
    } else {
        file.parent()
            .map(Path::to_path_buf)
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or_else(|| PathBuf::from("."))
    };
    let Some(path) = local_module(&module, &base)? else {
        return Ok((bytes, format));
    };
    let reference = match upload_it {
        Upload::Yes => upload(client, &path).await?.reference,
        // The reference the node would give it: content-addressed, the same bytes' digest.
        Upload::DigestOnly => format!(
            "sha256:{}",
            telvirt_controller::modules::sha256_hex(&read_module(&path)?)
        ),
    };
    // Keep the operator's text (so the server's line and column numbers point into their
    // file) when the module's path stands in it once; else send the edited document as JSON.
    if let Ok(text) = std::str::from_utf8(&bytes)
        && text.matches(module.as_str()).count() == 1
    {
        let replaced = text.replacen(module.as_str(), &reference, 1);
        if telvirt_model::from_text::<serde_json::Value>(replaced.as_bytes(), format).is_ok_and(
            |d| d.pointer("/spec/wasm/module").and_then(|m| m.as_str()) == Some(reference.as_str()),
        ) {
            return Ok((replaced.into_bytes(), format));
        }
    }
    if let Some(slot) = doc.pointer_mut("/spec/wasm/module") {
        *slot = serde_json::Value::String(reference);
    }
    Ok((serde_json::to_vec(&doc)?, Format::Json))
}

/// Whether [`resolve_descriptor`] uploads a local module file, or only names it by its digest
/// (a dry run, which must not change the node's modules).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upload {
    Yes,
    DigestOnly,
}

/// The module to send for `vnf upgrade --module M`: a local file is uploaded first (relative
/// paths against the working directory).
pub async fn resolve_upgrade(client: &Client, module: &str) -> Result<String> {
    let cwd = std::env::current_dir().context("reading the working directory")?;
    match local_module(module, &cwd)? {
        Some(path) => Ok(upload(client, &path).await?.reference),
        None => Ok(module.to_owned()),
    }
}

/// `telvirt wasm verify FILE`: the verdict the node would give an upload, offline.
pub fn verify(
    format: Output,
    file: &Path,
    domain: &str,
    policy: &telvirt_runtime_wasm::SecurityPolicy,
) -> Result<()> {
    let bytes = read_module(file)?;
    match telvirt_agent::runtimes::wasm::verify_module(&bytes, domain, policy) {
        Ok(info) => {
            let value = serde_json::json!({
                "file": file.display().to_string(),
                "sha256": telvirt_controller::modules::sha256_hex(&bytes),
                "domain": domain,
                "verdict": "accepted",
                "module": info,
            });
            if !crate::output::structured(format, &value)? {
                println!(
                    "{}: accepted in security domain {domain} ({} {}, permissions: {}, maps: {})",
                    file.display(),
                    info.name,
                    info.version,
                    info.permissions.join(", "),
                    info.maps
                        .iter()
                        .map(|m| m.name.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            Ok(())
        }
        Err(reasons) => {
            if !format.is_table() {
                let value = serde_json::json!({
                    "file": file.display().to_string(),
                    "domain": domain,
                    "verdict": "refused",
                    "reasons": reasons,
                });
                crate::output::structured(format, &value)?;
            }
            bail!(
                "{}: refused in security domain {domain}: {}",
                file.display(),
                reasons.join("; ")
            )
        }
    }
}
