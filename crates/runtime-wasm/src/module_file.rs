//! Reading a module file named by a caller: only a regular file, at most a cap of bytes, without
//! ever blocking (FIFOs, devices) and without echoing any of its content in errors. Owns that
//! one read; it does not decide which paths a caller may name (the agent does) nor verify the
//! bytes (see `verify`).

use std::fs::OpenOptions;
use std::io::{ErrorKind, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use crate::error::{Error, Result};

/// Largest module file [`read_module_file`] reads by default: 16 MiB, twice the verifier's
/// default `VerifyLimits::max_module_bytes` (8 MiB) so a deployment may raise that limit
/// somewhat, yet small enough that reading a file as root costs little whatever the path
/// names. The VNF examples are 10 to 100 KiB.
pub const MAX_MODULE_BYTES: u64 = 16 << 20;

fn refused(path: &Path, reason: impl Into<String>) -> Error {
    Error::ModuleFile {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// The reason of an I/O error by its kind only (the OS text is not content, but the kind is
/// all a caller needs).
fn io_reason(e: &std::io::Error) -> String {
    match e.kind() {
        ErrorKind::NotFound => "no such file".to_string(),
        ErrorKind::PermissionDenied => "permission denied".to_string(),
        _ => match e.raw_os_error() {
            Some(libc::ELOOP) => "too many levels of symbolic links".to_string(),
            Some(libc::ENOTDIR) => "a component of the path is not a directory".to_string(),
            Some(libc::ENAMETOOLONG) => "path too long".to_string(),
            Some(n) => format!("OS error {n}"),
            None => format!("{:?}", e.kind()),
        },
    }
}

/// Reads the module file at `path`: opened without blocking and without becoming a controlling
/// terminal, refused unless it is a regular file of at most `max_bytes` bytes, and never read
/// past `max_bytes + 1` bytes (a file growing meanwhile is refused too). Errors
/// ([`Error::ModuleFile`]) name the path and the reason only, never any byte of the file.
pub fn read_module_file(path: &Path, max_bytes: u64) -> Result<Vec<u8>> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| refused(path, io_reason(&e)))?;
    // The type of what was opened, not of what the path named a moment before.
    let meta = file
        .metadata()
        .map_err(|e| refused(path, format!("stat failed: {}", io_reason(&e))))?;
    let ft = meta.file_type();
    if !ft.is_file() {
        let what = if ft.is_dir() {
            "a directory"
        } else if ft.is_fifo() {
            "a FIFO"
        } else if ft.is_char_device() {
            "a character device"
        } else if ft.is_block_device() {
            "a block device"
        } else if ft.is_socket() {
            "a socket"
        } else {
            "something other than a regular file"
        };
        return Err(refused(
            path,
            format!("it is {what}: a module must be a regular file"),
        ));
    }
    if meta.len() > max_bytes {
        return Err(refused(
            path,
            format!(
                "it is {} bytes, more than the {max_bytes} bytes a module may have",
                meta.len()
            ),
        ));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(max_bytes.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| refused(path, format!("read failed: {}", io_reason(&e))))?;
    if bytes.len() as u64 > max_bytes {
        return Err(refused(
            path,
            format!("it grew past the {max_bytes} bytes a module may have while being read"),
        ));
    }
    Ok(bytes)
}
