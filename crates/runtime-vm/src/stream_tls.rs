//! TLS for a guest stream: QEMU's migration stream runs over TLS with a pre-shared key
//! (`tls-creds-psk`) both ends are given, so the guest's memory crosses the network encrypted
//! and a peer without the key fails the handshake (ADR 066).
//!
//! Owns the key's file for QEMU, the credentials object and the `tls-creds` parameter on one
//! end. It must not open or pass the stream's socket (`migrate` does) nor choose the key (the
//! agents derive it from their stream's key).
//!
//! QEMU reads the key from `<dir>/keys.psk` after it dropped to its unprivileged user (ADR 044),
//! which may not traverse the agent's directories: the key's directory, owned by that user,
//! is handed to QEMU as a descriptor (`add-fd`) and named to it as `/proc/self/fd/N`.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;

use crate::error::{Error, Result};
use crate::migrate::StreamEnd;
use crate::qmp::QmpClient;

/// Id of the credentials object a stream's QEMU gets.
const CREDS_ID: &str = "tv-migration-tls";
/// The PSK identity both ends use.
const PSK_USER: &str = "telvirt";
/// The fd set's note on the key directory's descriptor, to find it again.
const FDSET_NOTE: &str = "tv-migration-tls-dir";
/// Directory in the VM's state dir that holds the key for QEMU while a stream runs.
const KEY_DIR: &str = "migration-tls";
/// The Diffie-Hellman group a destination's credentials use: RFC 7919's ffdhe2048, as PKCS#3
/// (`openssl genpkey -genparam -algorithm DH -pkeyopt group:ffdhe2048`). Without a
/// `dh-params.pem` QEMU generates parameters when the credentials object is added, which
/// holds its main loop (and the move) for as long as that takes.
const DH_PARAMS: &str = "-----BEGIN DH PARAMETERS-----\n\
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz\n\
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a\n\
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7\n\
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi\n\
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD\n\
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==\n\
-----END DH PARAMETERS-----\n\
";

/// QMP deadline of one command here.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// The pre-shared key a guest stream runs over TLS with. 32 bytes; never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct StreamSecret([u8; StreamSecret::LEN]);

impl StreamSecret {
    pub const LEN: usize = 32;

    pub fn new(bytes: [u8; Self::LEN]) -> Self {
        Self(bytes)
    }

    /// The line of QEMU's `keys.psk` that holds it.
    fn psk_line(&self) -> String {
        format!("{PSK_USER}:{}\n", telvirt_model::api::hex(&self.0))
    }
}

impl std::fmt::Debug for StreamSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StreamSecret(<secret>)")
    }
}

/// Sets the QEMU of `qmp` up to run its next stream, as `end`, over TLS with `secret`: the key
/// written for its user `uid` (`None`: the user it runs as is this process's) under
/// `state_dir`, its credentials object, and `tls-creds` (with a `tls-hostname` on the source,
/// which QEMU asks for though a pre-shared key checks no name). What an earlier stream left
/// is removed first; what it set up before failing its caller removes ([`unsecure`]).
pub(crate) async fn secure(
    qmp: &QmpClient,
    state_dir: &Path,
    uid: Option<u32>,
    secret: &StreamSecret,
    end: StreamEnd,
) -> Result<()> {
    unsecure(qmp, state_dir).await;
    let dir = write_key(state_dir, uid, secret)?;
    let fd = std::fs::File::open(&dir).map_err(Error::io(format!("open {}", dir.display())))?;
    {
        use std::os::fd::AsFd;
        let held = qmp.add_fd(fd.as_fd(), None, Some(FDSET_NOTE)).await?;
        let endpoint = match end {
            StreamEnd::Source => "client",
            StreamEnd::Destination => "server",
        };
        let mut creds = json!({
            "qom-type": "tls-creds-psk",
            "id": CREDS_ID,
            "endpoint": endpoint,
            "dir": format!("/proc/self/fd/{}", held.fd),
        });
        let mut parameters = json!({ "tls-creds": CREDS_ID });
        if end == StreamEnd::Source {
            creds["username"] = PSK_USER.into();
            parameters["tls-hostname"] = PSK_USER.into();
        }
        qmp.execute_raw("object-add", Some(creds), COMMAND_TIMEOUT)
            .await?;
        // A client's credentials hold the key from here on; a server reads the file at the
        // handshake ([`forget_key`] once it is past).
        if end == StreamEnd::Source {
            forget_key(state_dir);
        }
        qmp.execute_raw("migrate-set-parameters", Some(parameters), COMMAND_TIMEOUT)
            .await?;
        Ok(())
    }
}

/// Makes the QEMU of `qmp` run its next stream in the clear again and removes what
/// [`secure`] set up (each step tried; what is not there is skipped).
pub(crate) async fn unsecure(qmp: &QmpClient, state_dir: &Path) {
    forget_key(state_dir);
    unset(qmp).await;
}

/// The QMP part of [`unsecure`]: `tls-creds` cleared, the credentials object and the key
/// directory's descriptor gone.
async fn unset(qmp: &QmpClient) {
    let cleared = qmp
        .execute_raw(
            "migrate-set-parameters",
            Some(json!({ "tls-creds": "", "tls-hostname": "" })),
            COMMAND_TIMEOUT,
        )
        .await;
    // A QEMU that does not answer (one held in a handshake, or gone) is not asked three more
    // times: each would wait out its deadline.
    if matches!(cleared, Err(Error::Timeout { .. })) {
        return;
    }
    let _ = qmp
        .execute_raw(
            "object-del",
            Some(json!({ "id": CREDS_ID })),
            COMMAND_TIMEOUT,
        )
        .await;
    if let Ok(sets) = qmp.query_fdsets().await {
        for set in sets {
            for fd in set.fds {
                if fd.opaque.as_deref() == Some(FDSET_NOTE) {
                    let _ = qmp.remove_fd(set.fdset_id, Some(fd.fd)).await;
                }
            }
        }
    }
}

/// [`unsecure`] on a task of its own, for a QEMU that streams no more (its guest moved away, or
/// arrived): the key's file goes at once, the rest when QEMU answers.
pub(crate) fn unsecure_later(qmp: &QmpClient, state_dir: &Path) {
    forget_key(state_dir);
    let qmp = qmp.clone();
    tokio::spawn(async move { unset(&qmp).await });
}

/// Writes `secret` as QEMU's `keys.psk` (and the Diffie-Hellman group, [`DH_PARAMS`]) in a
/// directory of `state_dir` that only QEMU's user `uid` may read (when this process may give it
/// away: as root); returns the directory.
fn write_key(state_dir: &Path, uid: Option<u32>, secret: &StreamSecret) -> Result<PathBuf> {
    let dir = state_dir.join(KEY_DIR);
    forget_key(state_dir);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(Error::io(format!("create {}", dir.display())))?;
    let file = dir.join("keys.psk");
    let group = dir.join("dh-params.pem");
    let write = |path: &Path, text: &str| {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o400)
            .open(path)
            .and_then(|mut f| f.write_all(text.as_bytes()))
    };
    let written = write(&file, &secret.psk_line()).and_then(|()| write(&group, DH_PARAMS));
    // The files first: once the directory is QEMU's user's, that user could put a link in a
    // file's place.
    let owned = written.and_then(|()| give_to(uid, &[&file, &group, &dir]));
    if let Err(e) = owned {
        forget_key(state_dir);
        return Err(Error::io(format!("write {}", file.display()))(e));
    }
    Ok(dir)
}

/// Makes `paths` QEMU's user `uid`'s, when that is another user and this process is root
/// (otherwise QEMU runs as this process's user, which owns them already).
fn give_to(uid: Option<u32>, paths: &[&Path]) -> std::io::Result<()> {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    match uid {
        Some(uid) if euid == 0 && uid != 0 => paths
            .iter()
            .try_for_each(|p| std::os::unix::fs::chown(p, Some(uid), None)),
        _ => Ok(()),
    }
}

/// Removes the key's file, once QEMU no longer reads it (its credentials loaded it, or its
/// stream is past the handshake) or the stream ended: where QEMU's user is shared by the
/// host's QEMUs (ADR 044, no uid of its own: ADR 068), the file is left to it no longer than
/// needed. Idempotent.
pub(crate) fn forget_key(state_dir: &Path) {
    let dir = state_dir.join(KEY_DIR);
    if let Err(e) = std::fs::remove_dir_all(&dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!("removing {}: {e}", dir.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_file_is_qemus_psk_line_readable_by_its_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let state = tempfile::tempdir().unwrap();
        let secret = StreamSecret::new([0xab; StreamSecret::LEN]);
        let dir = write_key(state.path(), None, &secret).unwrap();
        let text = std::fs::read_to_string(dir.join("keys.psk")).unwrap();
        assert_eq!(text, format!("telvirt:{}\n", "ab".repeat(32)));
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("keys.psk")), 0o400);
        // The destination's Diffie-Hellman group, so QEMU generates none.
        let group = std::fs::read_to_string(dir.join("dh-params.pem")).unwrap();
        assert!(
            group.starts_with("-----BEGIN DH PARAMETERS-----\nMIIBCAKCAQEA"),
            "{group}"
        );
        assert!(group.ends_with("-----END DH PARAMETERS-----\n"), "{group}");
        assert_eq!(format!("{secret:?}"), "StreamSecret(<secret>)");
        // Written again: the old one goes first.
        write_key(state.path(), None, &secret).unwrap();
        forget_key(state.path());
        assert!(!dir.exists());
    }
}
