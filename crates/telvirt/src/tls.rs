//! TLS of the API: the server's certificate (the operator's, or one generated on first start and
//! kept in the data dir), the listener that serves the API over it, and the client side (CLI,
//! agents, peer controllers, benchmarks) that trusts only the anchor it was given.
//!
//! Owns certificates, keys and rustls configuration. It must not decide who may call what: the
//! controller's authorities and tokens do, over the channel this module protects.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::cli::TlsArgs;

/// Where a generated certificate lives, under the data dir.
pub const TLS_DIR: &str = "tls";
pub const CERT_FILE: &str = "server.crt";
pub const KEY_FILE: &str = "server.key";
/// The names a generated certificate was made for, one per line: a start that wants other
/// names makes a new certificate.
const NAMES_FILE: &str = "server.names";
/// How long a generated certificate is valid, in years.
const VALID_YEARS: i32 = 10;
/// Longest a client may take to complete its handshake before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; further connections wait in the kernel's backlog.
const MAX_HANDSHAKES: usize = 256;
/// Handshakes in progress at once from one address: more from it are closed at once, so one
/// peer cannot hold every handshake slot.
const MAX_HANDSHAKES_PER_PEER: usize = 16;

/// Handshakes in progress per peer address.
#[derive(Default)]
struct PeerHandshakes(std::sync::Mutex<HashMap<std::net::IpAddr, usize>>);

impl PeerHandshakes {
    /// Counts one more handshake from `ip`, unless it has [`MAX_HANDSHAKES_PER_PEER`] already.
    fn begin(self: &Arc<Self>, ip: std::net::IpAddr) -> Option<PeerSlot> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(ip).or_default();
        if *n >= MAX_HANDSHAKES_PER_PEER {
            return None;
        }
        *n += 1;
        Some(PeerSlot(Arc::clone(self), ip))
    }
}

/// One handshake counted against its peer; uncounted when dropped.
struct PeerSlot(Arc<PeerHandshakes>, std::net::IpAddr);

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut map = self.0.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.1);
            }
        }
    }
}

/// The API's identity: what the server presents and what its clients are told to trust.
pub struct ServerIdentity {
    pub config: Arc<rustls::ServerConfig>,
    /// The PEM certificate(s) a client must chain the server's certificate to: `--tls-ca`, else
    /// the server's own certificate (pinned).
    pub anchor_pem: String,
    /// SHA-256 of the server's certificate (DER), `AA:BB:…`, to compare in a browser.
    pub fingerprint: String,
}

/// The API's TLS as `args` ask for it on `listen`: `None` for `--plain-http` (loopback only),
/// else the operator's certificate or one generated into `<data_dir>/tls` (kept across starts
/// while it names the same hosts).
pub fn server_identity(
    args: &TlsArgs,
    data_dir: &Path,
    listen: SocketAddr,
) -> Result<Option<ServerIdentity>> {
    if args.plain_http {
        if !listen.ip().is_loopback() {
            bail!(
                "--plain-http serves the API (and every token sent to it) unencrypted, so it is allowed on a loopback \
                 address only; --listen {listen} is not one: listen on 127.0.0.1 or ::1, or drop --plain-http to serve TLS"
            );
        }
        return Ok(None);
    }
    let (chain_pem, key_pem) = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => (read(cert, "--tls-cert")?, read(key, "--tls-key")?),
        (None, None) => generated(data_dir, &names(listen, &args.tls_san))?,
        _ => bail!(
            "--tls-cert and --tls-key go together: give both, or neither for a generated certificate"
        ),
    };
    let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("--tls-cert: not PEM certificates: {e}"))?;
    let Some(leaf) = chain.first() else {
        bail!(
            "--tls-cert holds no certificate (expected PEM `BEGIN CERTIFICATE` blocks, the server's first)"
        );
    };
    let fingerprint = fingerprint(leaf);
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| anyhow::anyhow!("--tls-key: not a PEM private key: {e}"))?;
    let anchor_pem = match &args.tls_ca {
        Some(ca) => {
            let pem = read(ca, "--tls-ca")?;
            anchors(&pem).context("--tls-ca")?;
            pem
        }
        // Pinning a chain would make its intermediates trusted roots.
        None if chain.len() > 1 => bail!(
            "--tls-cert holds a chain of {} certificates: give --tls-ca FILE with the CA clients should trust \
             (without it only a single self-signed certificate is pinned)",
            chain.len()
        ),
        None => chain_pem.clone(),
    };
    check_anchor(&chain, &anchor_pem, &reachable_name(listen))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("the certificate and key do not make a TLS identity (does the key belong to the certificate?)")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(ServerIdentity {
        config: Arc::new(config),
        anchor_pem,
        fingerprint,
    }))
}

/// The name a client on this machine uses for an API listening on `listen` (what the client
/// config's `server` says).
fn reachable_name(listen: SocketAddr) -> String {
    crate::serve::reachable(listen).ip().to_string()
}

/// Refuses a certificate that does not chain to `anchor_pem` (clients would refuse every
/// call); warns when it does not name `name`, which the client config on this machine uses.
fn check_anchor(chain: &[CertificateDer<'static>], anchor_pem: &str, name: &str) -> Result<()> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in anchors(anchor_pem)? {
        roots.add(cert).context("the trust anchor")?;
    }
    let verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .context("the trust anchor")?;
    let server_name = rustls::pki_types::ServerName::try_from(name.to_owned())
        .map_err(|e| anyhow::anyhow!("{name} is not a server name: {e}"))?;
    let (leaf, intermediates) = chain.split_first().context("no certificate")?;
    match verifier.verify_server_cert(
        leaf,
        intermediates,
        &server_name,
        &[],
        rustls::pki_types::UnixTime::now(),
    ) {
        Ok(_) => Ok(()),
        Err(rustls::Error::InvalidCertificate(
            rustls::CertificateError::NotValidForName
            | rustls::CertificateError::NotValidForNameContext { .. },
        )) => {
            tracing::warn!(
                "the API's certificate does not name {name}, which the client config on this machine uses: \
                 clients there will refuse it (add the name with --tls-san, or use a certificate that names it)"
            );
            Ok(())
        }
        Err(e) => bail!(
            "the API's certificate does not verify against the anchor clients are given ({e}): \
             give --tls-ca FILE with the CA that issued --tls-cert, or a self-signed --tls-cert"
        ),
    }
}

/// The names a generated certificate is made for: loopback, this host's name, the listen
/// address when it is a specific one, and `extra`.
fn names(listen: SocketAddr, extra: &[String]) -> Vec<String> {
    let mut names = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
        crate::agent::hostname(),
    ];
    if !listen.ip().is_unspecified() {
        names.push(listen.ip().to_string());
    }
    names.extend(extra.iter().cloned());
    // Sorted and unique: the same names in another order keep the certificate.
    names.sort();
    names.dedup();
    names
}

/// The certificate and key in `<data_dir>/tls`, made now unless they exist for `names`.
fn generated(data_dir: &Path, names: &[String]) -> Result<(String, String)> {
    let dir = data_dir.join(TLS_DIR);
    let (cert, key, listed) = (
        dir.join(CERT_FILE),
        dir.join(KEY_FILE),
        dir.join(NAMES_FILE),
    );
    let wanted = names.join("\n");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    // One process at a time looks and writes: two starts on one data dir share the pair.
    let _lock = DirLock::take(&dir.join(".lock"))?;
    if std::fs::read_to_string(&listed).is_ok_and(|l| l == wanted)
        && let (Ok(c), Ok(k)) = (
            std::fs::read_to_string(&cert),
            std::fs::read_to_string(&key),
        )
    {
        return Ok((c, k));
    }
    let (c, k) = self_signed(names)?;
    // The names file goes first and comes back last: a start that finds it finds the pair it
    // describes, even after a crash half-way.
    let _ = std::fs::remove_file(&listed);
    write_identity(&cert, &key, &c, &k)?;
    telvirt_files::write_private(&listed, wanted.as_bytes())
        .with_context(|| format!("cannot write {}", listed.display()))?;
    tracing::info!(
        "generated the API's TLS certificate {} for {}",
        cert.display(),
        names.join(", ")
    );
    Ok((c, k))
}

/// An exclusive `flock` on a file, released when dropped (the descriptor closes).
struct DirLock(#[allow(dead_code)] std::fs::File);

impl DirLock {
    fn take(path: &Path) -> Result<Self> {
        use std::os::fd::AsRawFd;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: flock on a descriptor this function owns.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("cannot lock {}", path.display()));
        }
        Ok(Self(file))
    }
}

/// Writes a certificate and its key (PEM) to `cert` and `key`, readable by their owner only,
/// the key first.
pub fn write_identity(cert: &Path, key: &Path, cert_pem: &str, key_pem: &str) -> Result<()> {
    for (path, pem) in [(key, key_pem), (cert, cert_pem)] {
        telvirt_files::write_private(path, pem.as_bytes())
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

/// A new self-signed server certificate for `names` (DNS names or IP addresses) and its key,
/// both PEM: an ECDSA P-256 key, valid from a year ago for [`VALID_YEARS`].
pub fn self_signed(names: &[String]) -> Result<(String, String)> {
    let mut params = rcgen::CertificateParams::new(names.to_vec())
        .with_context(|| format!("a certificate cannot name {}", names.join(", ")))?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "telvirt API");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let year = this_year();
    params.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
    params.not_after = rcgen::date_time_ymd(year + VALID_YEARS, 1, 1);
    let key = rcgen::KeyPair::generate().context("generating the API's key")?;
    let cert = params
        .self_signed(&key)
        .context("signing the API's certificate")?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn this_year() -> i32 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    // Days since 1970 over the mean Gregorian year: exact enough for validity bounds a year
    // away from now.
    1970 + (secs / 31_556_952) as i32
}

fn read(path: &Path, flag: &str) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("{flag}: cannot read {}", path.display()))
}

/// `AA:BB:…`: the SHA-256 of a certificate's DER, as browsers show it.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    Sha256::digest(cert.as_ref())
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificates of a PEM text, at least one.
fn anchors(pem: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("not PEM certificates: {e}"))?;
    if certs.is_empty() {
        bail!("no certificate in it (expected PEM `BEGIN CERTIFICATE` blocks)");
    }
    Ok(certs)
}

/// An HTTP client builder for the API: TLS that trusts exactly `anchor_pem` (a pinned
/// certificate or a CA), or the system's roots when there is none. Plain `http://` URLs (a
/// `--plain-http` server on loopback) work as before.
pub fn http_client(anchor_pem: Option<&str>) -> Result<reqwest::ClientBuilder> {
    let mut roots = rustls::RootCertStore::empty();
    match anchor_pem {
        Some(pem) => {
            for cert in anchors(pem).context("the API's trust anchor (client config `ca`)")? {
                roots
                    .add(cert)
                    .context("the API's trust anchor (client config `ca`)")?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(reqwest::Client::builder().use_preconfigured_tls(config))
}

/// [`http_client`] trusting the PEM file at `path` (none: the system's roots).
pub fn http_client_from(path: Option<&PathBuf>) -> Result<reqwest::ClientBuilder> {
    let pem = path
        .map(|p| {
            std::fs::read_to_string(p)
                .with_context(|| format!("cannot read CA file {}", p.display()))
        })
        .transpose()?;
    http_client(pem.as_deref())
}

/// A TCP listener whose connections are served over TLS. Handshakes run concurrently (at most
/// [`MAX_HANDSHAKES`], [`MAX_HANDSHAKES_PER_PEER`] from one address, each within
/// [`HANDSHAKE_TIMEOUT`]), so a client that connects and says nothing holds up no one.
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
    acceptor: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    pub fn new(tcp: TcpListener, config: Arc<rustls::ServerConfig>) -> std::io::Result<Self> {
        let local = tcp.local_addr()?;
        let (tx, ready) = mpsc::channel(64);
        let tls = TlsAcceptor::from(config);
        let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
        let peers = Arc::new(PeerHandshakes::default());
        let acceptor = tokio::spawn(async move {
            loop {
                let Ok(permit) = Arc::clone(&handshakes).acquire_owned().await else {
                    return;
                };
                let (stream, peer) = match tcp.accept().await {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of descriptors and the like: wait rather than spin.
                        tracing::warn!("accepting an API connection: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Some(slot) = peers.begin(peer.ip()) else {
                    tracing::debug!(
                        "closing a connection from {peer}: {MAX_HANDSHAKES_PER_PEER} of its handshakes are in progress"
                    );
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let (tls, tx) = (tls.clone(), tx.clone());
                tokio::spawn(async move {
                    let _held = (permit, slot);
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            let _ = tx.send((stream, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!("TLS handshake with {peer} failed: {e}"),
                        Err(_) => tracing::debug!("TLS handshake with {peer} timed out"),
                    }
                });
            }
        });
        Ok(Self {
            ready,
            local,
            acceptor,
        })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.acceptor.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(accepted) => accepted,
            // The acceptor ends only with the listener, which then is not asked again; if it
            // ever ended otherwise the API would be silently deaf: end loudly instead.
            None => {
                tracing::error!("the API's TLS acceptor ended; exiting");
                std::process::exit(1);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// Serves `app` on `listener`, over TLS when `tls` is given, until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    app: axum::Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    match tls {
        Some(config) => {
            axum::serve(TlsListener::new(listener, config)?, app)
                .with_graceful_shutdown(shutdown)
                .await
        }
        None => {
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
        }
    }
}

/// The API's URL scheme for a listener with or without TLS.
pub fn scheme(tls: bool) -> &'static str {
    if tls { "https" } else { "http" }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(plain: bool) -> TlsArgs {
        TlsArgs {
            tls_cert: None,
            tls_key: None,
            tls_ca: None,
            tls_san: Vec::new(),
            plain_http: plain,
        }
    }

    #[test]
    fn one_peer_holds_at_most_its_share_of_handshakes() {
        let peers = Arc::new(PeerHandshakes::default());
        let (a, b) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let held: Vec<PeerSlot> = (0..MAX_HANDSHAKES_PER_PEER)
            .map(|_| peers.begin(a).unwrap())
            .collect();
        assert!(peers.begin(a).is_none());
        let other = peers.begin(b);
        assert!(other.is_some());
        drop(held);
        assert!(peers.begin(a).is_some());
        drop(other);
        // Every slot returned: nothing is left counted.
        assert!(peers.0.lock().unwrap().is_empty());
    }

    #[test]
    fn plain_http_is_allowed_on_ipv6_loopback_and_refused_on_a_mapped_address() {
        let dir = tempfile::tempdir().unwrap();
        let plain = |at: &str| server_identity(&args(true), dir.path(), at.parse().unwrap());
        assert!(plain("[::1]:7070").unwrap().is_none());
        assert!(plain("[::ffff:127.0.0.1]:7070").is_err());
    }

    #[test]
    fn an_anchor_the_certificate_does_not_chain_to_or_a_chain_without_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = self_signed(&["127.0.0.1".into()]).unwrap();
        let (other, _) = self_signed(&["127.0.0.1".into()]).unwrap();
        let chain = format!("{cert}{other}");
        for (name, text) in [
            ("c.pem", &cert),
            ("k.pem", &key),
            ("other.pem", &other),
            ("chain.pem", &chain),
        ] {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        let at = "127.0.0.1:7070".parse().unwrap();
        let mut a = args(false);
        a.tls_cert = Some(dir.path().join("c.pem"));
        a.tls_key = Some(dir.path().join("k.pem"));
        assert!(server_identity(&a, dir.path(), at).unwrap().is_some());
        a.tls_ca = Some(dir.path().join("other.pem"));
        let err = server_identity(&a, dir.path(), at)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("does not verify against the anchor"), "{err}");
        a.tls_ca = None;
        a.tls_cert = Some(dir.path().join("chain.pem"));
        let err = server_identity(&a, dir.path(), at)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("a chain of 2 certificates"), "{err}");
    }

    #[test]
    fn plain_http_is_refused_off_loopback_and_allowed_on_it() {
        let dir = tempfile::tempdir().unwrap();
        let err = server_identity(&args(true), dir.path(), "0.0.0.0:7070".parse().unwrap())
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("--plain-http") && err.contains("0.0.0.0:7070"),
            "{err}"
        );
        assert!(
            server_identity(&args(true), dir.path(), "127.0.0.1:7070".parse().unwrap())
                .unwrap()
                .is_none()
        );
        // Nothing was generated for a refused or plain start.
        assert!(!dir.path().join(TLS_DIR).exists());
    }

    #[test]
    fn a_generated_certificate_is_kept_while_it_names_the_same_hosts() {
        let dir = tempfile::tempdir().unwrap();
        let at = "127.0.0.1:7070".parse().unwrap();
        let first = server_identity(&args(false), dir.path(), at)
            .unwrap()
            .unwrap();
        let again = server_identity(&args(false), dir.path(), at)
            .unwrap()
            .unwrap();
        assert_eq!(first.fingerprint, again.fingerprint);
        assert_eq!(first.anchor_pem, again.anchor_pem);
        let mut more = args(false);
        more.tls_san = vec!["api.example.net".into()];
        let renamed = server_identity(&more, dir.path(), at).unwrap().unwrap();
        assert_ne!(first.fingerprint, renamed.fingerprint);
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.path().join(TLS_DIR).join(KEY_FILE))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn half_an_operator_identity_or_a_foreign_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, _) = self_signed(&["localhost".into()]).unwrap();
        let (_, other_key) = self_signed(&["localhost".into()]).unwrap();
        std::fs::write(dir.path().join("c.pem"), cert).unwrap();
        std::fs::write(dir.path().join("k.pem"), other_key).unwrap();
        let mut a = args(false);
        a.tls_cert = Some(dir.path().join("c.pem"));
        let at = "127.0.0.1:7070".parse().unwrap();
        let err = server_identity(&a, dir.path(), at)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("--tls-key"), "{err}");
        a.tls_key = Some(dir.path().join("k.pem"));
        let err = format!("{:#}", server_identity(&a, dir.path(), at).err().unwrap());
        assert!(err.contains("does the key belong"), "{err}");
        a.tls_key = Some(dir.path().join("c.pem"));
        let err = server_identity(&a, dir.path(), at)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("--tls-key: not a PEM private key"), "{err}");
    }

    #[test]
    fn a_client_refuses_a_trust_anchor_that_is_not_a_certificate() {
        let err = format!("{:#}", http_client(Some("not pem")).err().unwrap());
        assert!(err.contains("no certificate"), "{err}");
    }
}
