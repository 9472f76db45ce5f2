//! Standby replication of wasm VNFs' maps between two hosts' agents: the active's agent takes
//! a full snapshot of the instance's maps, then its update log every interval, and sends each
//! batch to the standby's agent over TCP at the standby host's tunnel address; the standby's
//! agent applies it to its (running, unlinked) standby instance and acknowledges. Batches are
//! ordered on one connection and chained by checksum (ADR 031): a standby that missed one asks
//! for a full snapshot again.
//!
//! Owns the wire format, the bounds on what a peer may send, the sending task per replicated
//! VNF and its status. It must not decide which instance is active (the controller's
//! assignments say) nor touch an instance other than through [`ReplicaState`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use telvirt_model::Name;
use telvirt_model::api::{ReplicationStatus, StandbyPeer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How often the active's agent sends the updates since the last batch, unless told otherwise.
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(10);
/// Largest batch a standby accepts: larger states cannot be replicated (the active reports it).
pub const MAX_BATCH_BYTES: u32 = 256 << 20;
/// Longest VNF name on the wire.
const MAX_NAME_BYTES: u16 = 255;
/// How long a peer may take to send or answer one batch before the connection is dropped.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
const MAGIC: &[u8; 4] = b"TVR1";
const KIND_SNAPSHOT: u8 = 1;
const KIND_LOG: u8 = 2;
/// Nothing changed since the last batch: the active is alive.
const KIND_KEEPALIVE: u8 = 3;
/// A standby that hears nothing from its active this long (no batch, no keepalive) takes the
/// active for lost; so does one whose connection the active's host closed.
pub const SILENCE: Duration = Duration::from_millis(500);
/// Acknowledgement statuses.
const ACK_OK: u8 = 0;
const ACK_RESYNC: u8 = 1;
const ACK_REFUSED: u8 = 2;

/// The maps of this host's wasm instances, as replication reads and writes them.
pub trait ReplicaState: Send + Sync + 'static {
    /// From the active instance of `vnf`: a snapshot of its maps (`full`; restarts its update
    /// log) or the update log since the last batch. `Ok(None)`: not `full` and nothing
    /// changed since the last batch (the chain untouched).
    fn take(&self, vnf: &Name, full: bool) -> Result<Option<Vec<u8>>, String>;

    /// Applies a snapshot (`full`) or an update log to the standby instance of `vnf`; returns
    /// the updates applied (entries, for a snapshot). Nothing changes on error.
    fn apply(&self, vnf: &Name, full: bool, bytes: &[u8]) -> Result<u64, String>;
}

/// What a standby answered to one batch.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Ack {
    seq: u64,
    status: u8,
    updates: u64,
    message: String,
}

async fn write_batch(
    stream: &mut TcpStream,
    vnf: &Name,
    kind: u8,
    seq: u64,
    bytes: &[u8],
) -> std::io::Result<()> {
    let name = vnf.as_str().as_bytes();
    let len = u32::try_from(bytes.len()).map_err(|_| std::io::Error::other("batch too large"))?;
    let mut head = Vec::with_capacity(4 + 1 + 2 + name.len() + 8 + 4);
    head.extend_from_slice(MAGIC);
    head.push(kind);
    head.extend_from_slice(&(name.len() as u16).to_le_bytes());
    head.extend_from_slice(name);
    head.extend_from_slice(&seq.to_le_bytes());
    head.extend_from_slice(&len.to_le_bytes());
    stream.write_all(&head).await?;
    stream.write_all(bytes).await?;
    stream.flush().await
}

async fn read_ack(stream: &mut TcpStream) -> std::io::Result<Ack> {
    let seq = stream.read_u64_le().await?;
    let status = stream.read_u8().await?;
    let updates = stream.read_u64_le().await?;
    let len = stream.read_u16_le().await?;
    let mut message = vec![0; usize::from(len)];
    stream.read_exact(&mut message).await?;
    Ok(Ack {
        seq,
        status,
        updates,
        message: String::from_utf8_lossy(&message).into_owned(),
    })
}

async fn write_ack(stream: &mut TcpStream, ack: &Ack) -> std::io::Result<()> {
    let message = ack.message.as_bytes();
    let message = &message[..message.len().min(1024)];
    let mut out = Vec::with_capacity(8 + 1 + 8 + 2 + message.len());
    out.extend_from_slice(&ack.seq.to_le_bytes());
    out.push(ack.status);
    out.extend_from_slice(&ack.updates.to_le_bytes());
    out.extend_from_slice(&(message.len() as u16).to_le_bytes());
    out.extend_from_slice(message);
    stream.write_all(&out).await?;
    stream.flush().await
}

/// One batch as a standby reads it: (vnf, kind, seq, bytes). Every length is checked before
/// anything is allocated for it.
async fn read_batch(stream: &mut TcpStream) -> std::io::Result<(Name, u8, u64, Vec<u8>)> {
    let bad = |why: String| std::io::Error::new(std::io::ErrorKind::InvalidData, why);
    let mut magic = [0; 4];
    stream.read_exact(&mut magic).await?;
    if &magic != MAGIC {
        return Err(bad(format!("not a replication batch (magic {magic:?})")));
    }
    let kind = stream.read_u8().await?;
    if ![KIND_SNAPSHOT, KIND_LOG, KIND_KEEPALIVE].contains(&kind) {
        return Err(bad(format!("unknown batch kind {kind}")));
    }
    let name_len = stream.read_u16_le().await?;
    if name_len == 0 || name_len > MAX_NAME_BYTES {
        return Err(bad(format!(
            "a VNF name of {name_len} bytes (1..={MAX_NAME_BYTES})"
        )));
    }
    let mut name = vec![0; usize::from(name_len)];
    stream.read_exact(&mut name).await?;
    let name: Name = String::from_utf8(name)
        .map_err(|_| bad("a VNF name that is not UTF-8".into()))?
        .parse()
        .map_err(|e| bad(format!("VNF name: {e}")))?;
    let seq = stream.read_u64_le().await?;
    let len = stream.read_u32_le().await?;
    if len > MAX_BATCH_BYTES || (kind == KIND_KEEPALIVE && len > 0) {
        return Err(bad(format!(
            "a batch of {len} bytes (kind {kind}) exceeds what a standby accepts ({MAX_BATCH_BYTES}; a keepalive carries none)"
        )));
    }
    let mut bytes = vec![0; len as usize];
    stream.read_exact(&mut bytes).await?;
    Ok((name, kind, seq, bytes))
}

/// What the standby side asks of its agent.
pub trait StandbyHost: Send + Sync + 'static {
    /// Whether this host runs `vnf`'s standby (its assignments say so).
    fn runs_standby(&self, vnf: &Name) -> bool;
    /// The active of `vnf`, which this host runs the standby of, is lost (`why`): its
    /// connection closed or fell silent for [`SILENCE`].
    fn active_lost(&self, vnf: &Name, why: String);
}

/// Accepts batches for this host's standby instances until the listener fails: each is
/// applied when this host runs `vnf`'s standby, refused otherwise. A connection that sends
/// anything malformed is dropped. When a connection that carried a VNF's batches ends or falls
/// silent, the host is told its active is lost.
pub async fn serve_standbys(
    listener: Arc<TcpListener>,
    state: Arc<dyn ReplicaState>,
    host: Arc<dyn StandbyHost>,
) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("replication listener: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (state, host) = (Arc::clone(&state), Arc::clone(&host));
        tokio::spawn(async move {
            let mut seen = std::collections::BTreeSet::new();
            let ended = standby_connection(stream, state, host.as_ref(), &mut seen).await;
            let why = match ended {
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    format!("its host {peer} closed the replication connection")
                }
                Err(e) => format!("the replication connection from {peer} failed: {e}"),
                Ok(()) => format!("nothing from {peer} for {} ms", SILENCE.as_millis()),
            };
            for vnf in seen {
                if host.runs_standby(&vnf) {
                    host.active_lost(&vnf, why.clone());
                }
            }
        });
    }
}

/// Serves one active's connection; `Ok` when it fell silent for [`SILENCE`]. `seen`: the VNFs
/// it carried batches of.
async fn standby_connection(
    mut stream: TcpStream,
    state: Arc<dyn ReplicaState>,
    host: &dyn StandbyHost,
    seen: &mut std::collections::BTreeSet<Name>,
) -> std::io::Result<()> {
    let _ = stream.set_nodelay(true);
    loop {
        let Ok(batch) = tokio::time::timeout(SILENCE, read_batch(&mut stream)).await else {
            return Ok(());
        };
        let (vnf, kind, seq, bytes) = batch?;
        let ack = if !host.runs_standby(&vnf) {
            Ack {
                seq,
                status: ACK_REFUSED,
                updates: 0,
                message: format!("this host runs no standby of {vnf}"),
            }
        } else if kind == KIND_KEEPALIVE {
            seen.insert(vnf);
            Ack {
                seq,
                status: ACK_OK,
                updates: 0,
                message: String::new(),
            }
        } else {
            seen.insert(vnf.clone());
            let state = Arc::clone(&state);
            let full = kind == KIND_SNAPSHOT;
            let applied =
                tokio::task::spawn_blocking(move || state.apply(&vnf, full, &bytes)).await;
            match applied {
                Ok(Ok(updates)) => Ack {
                    seq,
                    status: ACK_OK,
                    updates,
                    message: String::new(),
                },
                // A missing or reordered log, or no instance yet: a full snapshot sets it right.
                Ok(Err(e)) => Ack {
                    seq,
                    status: ACK_RESYNC,
                    updates: 0,
                    message: e,
                },
                Err(e) => Ack {
                    seq,
                    status: ACK_RESYNC,
                    updates: 0,
                    message: format!("applying the batch failed: {e}"),
                },
            }
        };
        tokio::time::timeout(IO_TIMEOUT, write_ack(&mut stream, &ack))
            .await
            .map_err(|_| std::io::Error::other("acknowledgement timed out"))??;
    }
}

/// The sending side of one replicated VNF.
struct Sender {
    peer: StandbyPeer,
    status: Arc<Mutex<ReplicationStatus>>,
    task: tokio::task::JoinHandle<()>,
}

/// The replication tasks of this host's active instances that have a standby.
pub struct Replicas {
    state: Arc<dyn ReplicaState>,
    interval: Duration,
    senders: Mutex<HashMap<Name, Sender>>,
}

impl Replicas {
    pub fn new(state: Arc<dyn ReplicaState>, interval: Duration) -> Self {
        Self {
            state,
            interval,
            senders: Mutex::new(HashMap::new()),
        }
    }

    fn senders(&self) -> std::sync::MutexGuard<'_, HashMap<Name, Sender>> {
        self.senders.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes `vnf`'s maps stream to `peer` (a new peer starts over with a full snapshot).
    pub fn ensure(&self, vnf: &Name, peer: &StandbyPeer) {
        let mut senders = self.senders();
        if let Some(s) = senders.get(vnf)
            && s.peer == *peer
            && !s.task.is_finished()
        {
            return;
        }
        if let Some(old) = senders.remove(vnf) {
            old.task.abort();
        }
        let status = Arc::new(Mutex::new(ReplicationStatus {
            standby_host: peer.host.clone(),
            state: "resyncing".into(),
            lag_us: 0,
            updates: 0,
            snapshots: 0,
            bytes: 0,
            error: None,
        }));
        let task = tokio::spawn(send_loop(
            Arc::clone(&self.state),
            vnf.clone(),
            peer.address.clone(),
            self.interval,
            Arc::clone(&status),
        ));
        senders.insert(
            vnf.clone(),
            Sender {
                peer: peer.clone(),
                status,
                task,
            },
        );
    }

    /// Stops streaming `vnf`'s maps (no longer active, no standby, or gone).
    pub fn stop(&self, vnf: &Name) {
        if let Some(s) = self.senders().remove(vnf) {
            s.task.abort();
        }
    }

    /// Where `vnf`'s replication stands, if it is replicated.
    pub fn status(&self, vnf: &Name) -> Option<ReplicationStatus> {
        self.senders()
            .get(vnf)
            .map(|s| s.status.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

impl Drop for Replicas {
    fn drop(&mut self) {
        for (_, s) in self.senders().drain() {
            s.task.abort();
        }
    }
}

/// Sends `vnf`'s maps to the standby at `address` every `interval` until aborted: a full
/// snapshot first (and whenever the standby asks), then the update log.
async fn send_loop(
    state: Arc<dyn ReplicaState>,
    vnf: Name,
    address: String,
    interval: Duration,
    status: Arc<Mutex<ReplicationStatus>>,
) {
    let set = |f: &dyn Fn(&mut ReplicationStatus)| {
        f(&mut status.lock().unwrap_or_else(|p| p.into_inner()));
    };
    let mut stream: Option<TcpStream> = None;
    let mut full = true;
    let mut seq = 0u64;
    loop {
        if stream.is_none() {
            match tokio::time::timeout(IO_TIMEOUT, TcpStream::connect(&address)).await {
                Ok(Ok(s)) => {
                    let _ = s.set_nodelay(true);
                    stream = Some(s);
                    full = true;
                }
                Ok(Err(e)) => set(&|s| fail(s, format!("connecting to {address}: {e}"))),
                Err(_) => set(&|s| fail(s, format!("connecting to {address} timed out"))),
            }
        }
        if let Some(conn) = stream.as_mut() {
            match send_one(&state, &vnf, conn, full, seq + 1).await {
                // The instance could not give a batch (e.g. its update log overflowed): a full
                // snapshot next, on the same connection (closing it would tell the standby its
                // active is lost).
                Err(SendError::Take(e)) => {
                    set(&|s| fail(s, e.clone()));
                    full = true;
                }
                Ok((ack, sent_bytes, taken)) => {
                    seq += 1;
                    match ack.status {
                        ACK_OK => set(&|s| {
                            s.state = "synced".into();
                            s.lag_us =
                                u64::try_from(taken.elapsed().as_micros()).unwrap_or(u64::MAX);
                            s.updates += ack.updates;
                            s.bytes += sent_bytes;
                            s.snapshots += u64::from(full);
                            s.error = None;
                        }),
                        _ => set(&|s| {
                            s.state = "resyncing".into();
                            s.error = Some(ack.message.clone());
                        }),
                    }
                    full = ack.status != ACK_OK;
                }
                Err(SendError::Io(e)) => {
                    set(&|s| fail(s, e.clone()));
                    stream = None;
                    full = true;
                }
            }
        }
        tokio::time::sleep(interval).await;
    }
}

fn fail(s: &mut ReplicationStatus, why: String) {
    s.state = "failing".into();
    s.error = Some(why);
}

/// Why one batch did not go.
enum SendError {
    /// The instance gave no batch; the connection is fine.
    Take(String),
    /// The connection failed: it is dropped.
    Io(String),
}

/// Takes one batch off the active instance and sends it (a keepalive when nothing changed).
/// Returns the acknowledgement, the bytes sent and when the batch was taken.
async fn send_one(
    state: &Arc<dyn ReplicaState>,
    vnf: &Name,
    conn: &mut TcpStream,
    full: bool,
    seq: u64,
) -> Result<(Ack, u64, Instant), SendError> {
    let taken = Instant::now();
    let (st, name) = (Arc::clone(state), vnf.clone());
    let batch = tokio::task::spawn_blocking(move || st.take(&name, full))
        .await
        .map_err(|e| SendError::Take(format!("taking a batch failed: {e}")))?;
    let (kind, bytes) = match batch {
        Ok(Some(bytes)) if full => (KIND_SNAPSHOT, bytes),
        Ok(Some(bytes)) => (KIND_LOG, bytes),
        Ok(None) => (KIND_KEEPALIVE, Vec::new()),
        Err(e) => return Err(SendError::Take(format!("taking a batch: {e}"))),
    };
    let sent = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
    let exchange = async {
        write_batch(conn, vnf, kind, seq, &bytes).await?;
        read_ack(conn).await
    };
    let ack = tokio::time::timeout(IO_TIMEOUT, exchange)
        .await
        .map_err(|_| {
            SendError::Io(format!(
                "the standby did not acknowledge within {IO_TIMEOUT:?}"
            ))
        })?
        .map_err(|e| SendError::Io(format!("sending to the standby: {e}")))?;
    if ack.seq != seq {
        return Err(SendError::Io(format!(
            "the standby acknowledged batch {} for batch {seq}",
            ack.seq
        )));
    }
    Ok((ack, sent, taken))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A state of named counters: the "maps" are one u64 per VNF; a log carries the new value.
    #[derive(Default)]
    struct Counters {
        values: Mutex<HashMap<String, (u64, bool)>>,
    }

    impl ReplicaState for Counters {
        fn take(&self, vnf: &Name, full: bool) -> Result<Option<Vec<u8>>, String> {
            let mut v = self.values.lock().unwrap();
            let (value, dirty) = v.get_mut(vnf.as_str()).ok_or("no such instance")?;
            if !full && !*dirty {
                return Ok(None);
            }
            *dirty = false;
            Ok(Some(value.to_le_bytes().to_vec()))
        }

        fn apply(&self, vnf: &Name, _full: bool, bytes: &[u8]) -> Result<u64, String> {
            let value = u64::from_le_bytes(bytes.try_into().map_err(|_| "bad batch")?);
            self.values
                .lock()
                .unwrap()
                .insert(vnf.as_str().to_owned(), (value, false));
            Ok(1)
        }
    }

    /// A standby host running the standby of `nat1` only, noting the actives it lost.
    #[derive(Default)]
    struct Standbys {
        lost: Mutex<Vec<(String, String)>>,
    }

    impl StandbyHost for Standbys {
        fn runs_standby(&self, vnf: &Name) -> bool {
            vnf.as_str() == "nat1"
        }

        fn active_lost(&self, vnf: &Name, why: String) {
            self.lost.lock().unwrap().push((vnf.to_string(), why));
        }
    }

    #[tokio::test]
    async fn batches_reach_the_standby_in_order_and_other_vnfs_are_refused() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let standby = Arc::new(Counters::default());
        let host = Arc::new(Standbys::default());
        tokio::spawn(serve_standbys(
            Arc::new(listener),
            standby.clone(),
            host.clone(),
        ));

        let active = Arc::new(Counters::default());
        active
            .values
            .lock()
            .unwrap()
            .insert("nat1".into(), (7, true));
        let replicas = Replicas::new(active.clone(), Duration::from_millis(5));
        let nat1: Name = "nat1".parse().unwrap();
        let peer = StandbyPeer {
            host: "h2".into(),
            address: address.clone(),
        };
        replicas.ensure(&nat1, &peer);
        let deadline = Instant::now() + Duration::from_secs(10);
        let value = |s: &Counters| s.values.lock().unwrap().get("nat1").map(|v| v.0);
        while value(&standby) != Some(7) {
            assert!(Instant::now() < deadline, "the snapshot never arrived");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        active
            .values
            .lock()
            .unwrap()
            .insert("nat1".into(), (9, true));
        while value(&standby) != Some(9) {
            assert!(Instant::now() < deadline, "the update never arrived");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let st = replicas.status(&nat1).unwrap();
        assert_eq!(st.state, "synced", "{st:?}");
        assert_eq!((st.snapshots, st.updates), (1, 2), "{st:?}");

        // A VNF whose standby is not on that host is refused, and says so.
        let fw9: Name = "fw9".parse().unwrap();
        active
            .values
            .lock()
            .unwrap()
            .insert("fw9".into(), (1, true));
        replicas.ensure(&fw9, &peer);
        loop {
            let st = replicas.status(&fw9).unwrap();
            if st.error.as_deref() == Some("this host runs no standby of fw9") {
                assert_eq!(st.state, "resyncing");
                break;
            }
            assert!(Instant::now() < deadline, "{st:?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(standby.values.lock().unwrap().get("fw9").is_none());

        // Idle for longer than the silence: keepalives say the active lives.
        tokio::time::sleep(SILENCE + Duration::from_millis(200)).await;
        assert!(host.lost.lock().unwrap().is_empty());
        assert_eq!(replicas.status(&nat1).unwrap().state, "synced");

        // The active's side goes (its process died, say): its standby hears at once, and only
        // of the VNF it stands by for.
        replicas.stop(&nat1);
        replicas.stop(&fw9);
        assert!(replicas.status(&nat1).is_none());
        while host.lost.lock().unwrap().is_empty() {
            assert!(Instant::now() < deadline, "the standby never noticed");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let lost = host.lost.lock().unwrap().clone();
        assert_eq!(lost.len(), 1, "{lost:?}");
        assert_eq!(lost[0].0, "nat1");
        assert!(
            lost[0].1.contains("closed the replication connection"),
            "{lost:?}"
        );
    }

    #[tokio::test]
    async fn a_batch_larger_than_allowed_is_refused_before_it_is_read() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let standby = Arc::new(Counters::default());
        tokio::spawn(serve_standbys(
            Arc::new(listener),
            standby,
            Arc::new(Standbys::default()),
        ));
        let mut conn = TcpStream::connect(address).await.unwrap();
        let mut head = Vec::new();
        head.extend_from_slice(MAGIC);
        head.push(KIND_LOG);
        head.extend_from_slice(&4u16.to_le_bytes());
        head.extend_from_slice(b"nat1");
        head.extend_from_slice(&1u64.to_le_bytes());
        head.extend_from_slice(&(MAX_BATCH_BYTES + 1).to_le_bytes());
        conn.write_all(&head).await.unwrap();
        // The standby drops the connection instead of waiting for 256 MiB.
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
            .await
            .expect("the standby kept the connection open")
            .unwrap_or(0);
        assert_eq!(n, 0);
    }
}
