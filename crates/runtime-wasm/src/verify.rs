//! Install-time verifier: full wasm validation (wasmparser), manifest, ABI export signatures,
//! every import an ABI host function that the manifest requests and the security domain allows,
//! signature policy and size limits. Reports every violation with its reason; runs nothing.
//! Reasons never quote the input's raw bytes: the header is checked here before wasmparser sees
//! the module, and wasmparser's messages are scrubbed of byte values (`parser_error`).

use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use wasmparser::{
    ExternalKind, FuncType, Parser, Payload, TypeRef, ValType, Validator, WasmFeatures,
};

use crate::abi::{self, ValKind};
use crate::manifest::Manifest;
use crate::security::{DomainPolicy, ModuleSignature, Permission};

/// What kind of rule a module broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ViolationKind {
    InvalidBinary,
    ModuleTooLarge,
    TooManyFunctions,
    MemoryTooLarge,
    DataSegmentTooLarge,
    MissingManifest,
    InvalidManifest,
    MissingExport,
    WrongExportSignature,
    UnknownImport,
    WrongImportSignature,
    ImportNotDeclared,
    PermissionDenied,
    SignatureRequired,
    SignatureInvalid,
    UnknownDomain,
}

/// One broken rule, with its reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Violation {
    pub kind: ViolationKind,
    pub reason: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.reason)
    }
}

/// Install-time size limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyLimits {
    /// Largest module in bytes.
    pub max_module_bytes: usize,
    /// Largest number of functions (defined + imported).
    pub max_functions: u32,
    /// Largest declared initial linear memory in bytes.
    pub max_memory_bytes: u64,
    /// Largest total bytes of data segments.
    pub max_data_bytes: u64,
}

impl Default for VerifyLimits {
    fn default() -> Self {
        Self {
            max_module_bytes: 8 << 20,
            max_functions: 10_000,
            max_memory_bytes: 64 << 20,
            max_data_bytes: 4 << 20,
        }
    }
}

/// A module that passed verification.
#[derive(Debug, Clone)]
pub struct Verified {
    pub manifest: Manifest,
    pub hash: [u8; 32],
    /// Host functions the module imports, with the permission each needs.
    pub imports: Vec<(String, Permission)>,
}

/// SHA-256 of module bytes.
pub fn module_hash(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Lower-case hex of a hash.
pub fn hex(hash: &[u8]) -> String {
    hash.iter().map(|b| format!("{b:02x}")).collect()
}

fn kinds(v: &[ValType]) -> Option<Vec<ValKind>> {
    v.iter()
        .map(|t| match t {
            ValType::I32 => Some(ValKind::I32),
            ValType::I64 => Some(ValKind::I64),
            _ => None,
        })
        .collect()
}

fn sig_eq(ft: &FuncType, params: &[ValKind], results: &[ValKind]) -> bool {
    kinds(ft.params()).as_deref() == Some(params) && kinds(ft.results()).as_deref() == Some(results)
}

fn sig_str(params: &[ValKind], results: &[ValKind]) -> String {
    let f = |v: &[ValKind]| {
        v.iter()
            .map(|k| match k {
                ValKind::I32 => "i32",
                ValKind::I64 => "i64",
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!("({}) -> ({})", f(params), f(results))
}

/// The `\0asm` magic every WebAssembly binary starts with.
const WASM_MAGIC: [u8; 4] = *b"\0asm";
/// The core module binary version this runtime accepts.
const WASM_VERSION: u32 = 1;

/// Checks the 8-byte header (magic, version) without quoting any other byte of the input.
fn check_header(bytes: &[u8]) -> Result<(), String> {
    if bytes.len() < 4 || bytes[..4] != WASM_MAGIC {
        return Err(
            "not a WebAssembly module: the file does not start with the \\0asm magic".into(),
        );
    }
    let Some(v) = bytes.get(4..8) else {
        return Err(format!(
            "not a WebAssembly module: {} bytes, shorter than the 8-byte header",
            bytes.len()
        ));
    };
    let version = u32::from_le_bytes([v[0], v[1], v[2], v[3]]);
    if version != WASM_VERSION {
        return Err(format!(
            "unsupported wasm version {version} (this runtime accepts core modules of version {WASM_VERSION}; components are not supported)"
        ));
    }
    Ok(())
}

/// A wasmparser error as a reason: its message with every hexadecimal literal and bracketed
/// list (how wasmparser quotes input bytes, e.g. `actual=[0x72, ...]` or `(0x7f)`) replaced by
/// `…`, and the offset.
fn parser_error(e: &wasmparser::BinaryReaderError) -> String {
    let msg = e.message();
    let mut out = String::with_capacity(msg.len());
    let mut it = msg.chars().peekable();
    while let Some(c) = it.next() {
        match c {
            '[' => {
                for c in it.by_ref() {
                    if c == ']' {
                        break;
                    }
                }
                out.push('…');
            }
            '0' if it.peek().is_some_and(|n| *n == 'x' || *n == 'X') => {
                it.next();
                while it.peek().is_some_and(char::is_ascii_hexdigit) {
                    it.next();
                }
                out.push('…');
            }
            c => out.push(c),
        }
    }
    format!("{out} (at byte offset {})", e.offset())
}

/// Wasm features accepted: WebAssembly 2.0 without threads or multiple memories.
pub fn features() -> WasmFeatures {
    WasmFeatures::WASM2
}

/// Verifies a module for a domain. `Err` lists every violation found.
pub fn verify(
    bytes: &[u8],
    limits: &VerifyLimits,
    domain: Result<&DomainPolicy, String>,
    signature: Option<&ModuleSignature>,
) -> Result<Verified, Vec<Violation>> {
    let mut v = Vec::new();
    let mut push = |kind, reason: String| v.push(Violation { kind, reason });
    let hash = module_hash(bytes);
    if bytes.len() > limits.max_module_bytes {
        push(
            ViolationKind::ModuleTooLarge,
            format!(
                "module is {} bytes, the limit is {}",
                bytes.len(),
                limits.max_module_bytes
            ),
        );
    }
    if let Err(reason) = check_header(bytes) {
        push(ViolationKind::InvalidBinary, reason);
        return Err(v);
    }
    if let Err(e) = Validator::new_with_features(features()).validate_all(bytes) {
        push(
            ViolationKind::InvalidBinary,
            format!("wasm validation failed: {}", parser_error(&e)),
        );
        return Err(v);
    }
    // Structure pass (the binary is valid, so parsing succeeds).
    let mut types: Vec<Option<FuncType>> = Vec::new();
    let mut func_types: Vec<u32> = Vec::new();
    let mut imports: Vec<(String, String, TypeRef)> = Vec::new();
    let mut exports: Vec<(String, ExternalKind, u32)> = Vec::new();
    let mut manifest_bytes: Option<Vec<u8>> = None;
    let mut memories = Vec::new();
    let mut data_total: u64 = 0;
    let mut largest_segment: u64 = 0;
    let mut manifest_sections = 0;
    for payload in Parser::new(0).parse_all(bytes) {
        let Ok(payload) = payload else {
            push(
                ViolationKind::InvalidBinary,
                "module could not be parsed".into(),
            );
            return Err(v);
        };
        match payload {
            Payload::TypeSection(r) => {
                for g in r.into_iter() {
                    let Ok(g) = g else { continue };
                    for st in g.into_types() {
                        types.push(match st.composite_type.inner {
                            wasmparser::CompositeInnerType::Func(f) => Some(f),
                            _ => None,
                        });
                    }
                }
            }
            Payload::ImportSection(r) => {
                for imp in r.into_imports().flatten() {
                    if let TypeRef::Func(t) = imp.ty {
                        func_types.push(t);
                    }
                    imports.push((imp.module.to_string(), imp.name.to_string(), imp.ty));
                }
            }
            Payload::FunctionSection(r) => func_types.extend(r.into_iter().flatten()),
            Payload::MemorySection(r) => memories.extend(r.into_iter().flatten()),
            Payload::ExportSection(r) => {
                for e in r.into_iter().flatten() {
                    exports.push((e.name.to_string(), e.kind, e.index));
                }
            }
            Payload::DataSection(r) => {
                for d in r.into_iter().flatten() {
                    let n = d.data.len() as u64;
                    data_total += n;
                    largest_segment = largest_segment.max(n);
                }
            }
            Payload::CustomSection(c) if c.name() == abi::MANIFEST_SECTION => {
                manifest_sections += 1;
                manifest_bytes = Some(c.data().to_vec());
            }
            _ => {}
        }
    }
    let ft = |func: u32| -> Option<&FuncType> {
        types
            .get(*func_types.get(func as usize)? as usize)?
            .as_ref()
    };
    if func_types.len() as u64 > u64::from(limits.max_functions) {
        push(
            ViolationKind::TooManyFunctions,
            format!(
                "module has {} functions, the limit is {}",
                func_types.len(),
                limits.max_functions
            ),
        );
    }
    for m in &memories {
        let initial = m.initial.saturating_mul(65536);
        if initial > limits.max_memory_bytes {
            push(
                ViolationKind::MemoryTooLarge,
                format!(
                    "memory declares {} initial pages ({initial} bytes), the limit is {} bytes",
                    m.initial, limits.max_memory_bytes
                ),
            );
        }
    }
    if data_total > limits.max_data_bytes {
        push(
            ViolationKind::DataSegmentTooLarge,
            format!(
                "data segments total {data_total} bytes (largest {largest_segment}), the limit is {} bytes",
                limits.max_data_bytes
            ),
        );
    }
    // Manifest.
    let manifest = match (&manifest_bytes, manifest_sections) {
        (None, _) => {
            push(
                ViolationKind::MissingManifest,
                format!("no `{}` custom section", abi::MANIFEST_SECTION),
            );
            None
        }
        (Some(_), n) if n > 1 => {
            push(
                ViolationKind::InvalidManifest,
                format!(
                    "{n} `{}` sections; exactly one allowed",
                    abi::MANIFEST_SECTION
                ),
            );
            None
        }
        (Some(b), _) => match Manifest::parse(b) {
            Ok(m) => Some(m),
            Err(errs) => {
                for e in errs {
                    push(ViolationKind::InvalidManifest, e);
                }
                None
            }
        },
    };
    // Exports.
    let has_memory = exports
        .iter()
        .any(|(n, k, _)| n == abi::EXPORT_MEMORY && *k == ExternalKind::Memory);
    if !has_memory {
        push(
            ViolationKind::MissingExport,
            format!("linear memory must be exported as `{}`", abi::EXPORT_MEMORY),
        );
    }
    for want in abi::EXPORTS {
        match exports.iter().find(|(n, _, _)| n == want.name) {
            None if want.required => push(
                ViolationKind::MissingExport,
                format!(
                    "required export `{}` {} is missing",
                    want.name,
                    sig_str(want.params, want.results)
                ),
            ),
            None => {}
            Some((_, kind, idx)) => {
                let ok = *kind == ExternalKind::Func
                    && ft(*idx).is_some_and(|f| sig_eq(f, want.params, want.results));
                if !ok {
                    push(
                        ViolationKind::WrongExportSignature,
                        format!(
                            "export `{}` must be a function {}",
                            want.name,
                            sig_str(want.params, want.results)
                        ),
                    );
                }
            }
        }
    }
    // Imports.
    let (policy, domain_err) = match domain {
        Ok(p) => (Some(p), None),
        Err(e) => (None, Some(e)),
    };
    if let Some(e) = domain_err {
        push(ViolationKind::UnknownDomain, e);
    }
    let mut granted_imports = Vec::new();
    for (module, name, ty) in &imports {
        let what = format!("import `{module}.{name}`");
        let host = (module == abi::IMPORT_MODULE)
            .then(|| abi::import(name))
            .flatten();
        let Some(host) = host else {
            push(
                ViolationKind::UnknownImport,
                format!(
                    "{what} is not an ABI v1 host function (module `{}`: {})",
                    abi::IMPORT_MODULE,
                    abi::IMPORTS
                        .iter()
                        .map(|i| i.name)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
            continue;
        };
        let sig_ok = match ty {
            TypeRef::Func(t) => types
                .get(*t as usize)
                .and_then(Option::as_ref)
                .is_some_and(|f| sig_eq(f, host.params, host.results)),
            _ => false,
        };
        if !sig_ok {
            push(
                ViolationKind::WrongImportSignature,
                format!(
                    "{what} must be a function {}",
                    sig_str(host.params, host.results)
                ),
            );
        }
        if let Some(m) = &manifest
            && !m.permissions.contains(&host.permission)
        {
            push(
                ViolationKind::ImportNotDeclared,
                format!(
                    "{what} needs permission `{}`, which the manifest does not request: the manifest does not match the code",
                    host.permission
                ),
            );
        }
        granted_imports.push((name.clone(), host.permission));
    }
    if let (Some(m), Some(p)) = (&manifest, policy) {
        for perm in &m.permissions {
            if !p.allowed.contains(perm) {
                push(
                    ViolationKind::PermissionDenied,
                    format!(
                        "manifest requests permission `{perm}`, which the security domain does not allow"
                    ),
                );
            }
        }
    }
    if let Some(p) = policy
        && let Err(e) = p.check_signature(&hash, signature)
    {
        let kind = if signature.is_none() {
            ViolationKind::SignatureRequired
        } else {
            ViolationKind::SignatureInvalid
        };
        push(kind, e);
    }
    match manifest {
        Some(manifest) if v.is_empty() => Ok(Verified {
            manifest,
            hash,
            imports: granted_imports,
        }),
        _ => Err(v),
    }
}
