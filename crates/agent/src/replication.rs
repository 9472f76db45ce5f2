//! Standby replication of wasm VNFs' maps between two hosts' agents: the active's agent takes
//! a full snapshot of the instance's maps, then its update log every interval, and sends each
//! batch to the standby's agent over TCP at the standby host's tunnel address; the standby's
//! agent applies it to its (running, unlinked) standby instance and acknowledges. Batches are
//! ordered on one connection and chained by checksum (ADR 031): a standby that missed one asks
//! for a full snapshot again.
//!
//! The stream is also the pair's failure detector (ADR 054): the active sends every interval
//! (a keepalive when nothing changed) and says how long a silence means it is lost (interval
//! times multiplier); the standby tells its agent when the active fell silent or its host
//! closed the connection, and when it hears it again. Every batch carries the sender's epoch:
//! a host that holds the pair at a higher one answers that the sender is stale, which fences
//! the sender's instance.
//!
//! A standby's host takes a VNF's batches (and a moving vm's guest stream) only from the IP
//! address its assignment names as the active's (`active_from`); the sender connects from its
//! own tunnel address for that. And only when they are tagged with the stream's key
//! (`active_key`, [`PairKey`]; ADR 066): every connection opens with the receiver's random
//! challenge and the sender's random salt, and each batch carries an HMAC-SHA256 tag of its
//! header (checked before its body is read) over both and the batch's number on the connection,
//! so a batch from anyone without the key, or replayed from another connection or out of order,
//! is refused. Its body is encrypted and authenticated (AES-256-GCM, ADR 067) with a key made
//! from the stream's key and that header tag, so a batch's key is its own: a VNF's sessions and
//! counters do not cross the underlay readable. The answer to a tagged batch is tagged too; a
//! sender believes a "taken", "resync" or "stale" answer only tagged.
//!
//! Owns the wire format, the bounds on what a peer may send, the sending task per replicated
//! VNF and its status. It must not decide which instance is active (the controller's
//! assignments say) nor touch an instance other than through [`ReplicaState`].

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use ring::{aead, hmac};
use telvirt_model::api::{ActiveLost, FreezePhases, PairKey, ReplicationStatus, StandbyPeer};
use telvirt_model::{Name, Role};
use telvirt_runtime_vm::{StreamEnd, StreamSecret};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::fencing::{Fencing, ForwardGate};
use crate::runtime::Runtime;

/// How the active's agent sends its batches and how long its standby waits for the next one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Detection {
    /// How often the active sends the updates since the last batch (a keepalive when none).
    pub interval: Duration,
    /// Intervals without a batch after which the standby takes its active for lost.
    pub multiplier: u32,
}

impl Detection {
    /// How long a standby waits for the next batch before it takes its active for lost.
    pub fn silence(&self) -> Duration {
        self.interval.saturating_mul(self.multiplier)
    }
}

/// 10 ms times 3, as BFD is commonly run between telecom nodes.
pub const DEFAULT_DETECTION: Detection = Detection {
    interval: Duration::from_millis(10),
    multiplier: 3,
};
/// Bounds on the silence an active may ask its standby to wait for.
pub const MIN_SILENCE: Duration = Duration::from_millis(1);
pub const MAX_SILENCE: Duration = Duration::from_secs(60);
/// Largest batch a standby accepts: larger states cannot be replicated (the active reports it).
pub const MAX_BATCH_BYTES: u32 = 256 << 20;
/// Longest VNF name on the wire.
const MAX_NAME_BYTES: u16 = 255;
/// How long a peer may take to send or answer one batch before the connection is dropped.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
const MAGIC: &[u8; 4] = b"TVR4";
/// Random bytes of the challenge a host serving a connection sends first, and of the salt the
/// connecting host answers it with.
const NONCE_BYTES: usize = 16;
/// Bytes of a batch's header tag and of an answer's.
const TAG_BYTES: usize = 32;
/// A body is encrypted and written (read and opened) in pieces of at most this size, each with
/// its own authentication tag: a large snapshot is sealed between writes, not in one stretch
/// that holds the task's thread, and a receiver uses no byte of a piece before its tag checked.
const PIECE_BYTES: usize = 256 << 10;
/// Bytes of a piece's authentication tag (AES-256-GCM's).
const SEAL_BYTES: usize = 16;
/// What each tag or key derived from the stream's key is for, so one can never pass for another.
const HEAD_LABEL: &[u8] = b"telvirt replication head";
const BODY_LABEL: &[u8] = b"telvirt replication v4 body key";
const GUEST_SEAL_LABEL: &[u8] = b"telvirt guest stream seal key";
const ACK_LABEL: &[u8] = b"telvirt replication ack";
const KIND_SNAPSHOT: u8 = 1;
const KIND_LOG: u8 = 2;
/// Nothing changed since the last batch: the active is alive.
const KIND_KEEPALIVE: u8 = 3;
/// The connection carries a moving vm's guest (QEMU's migration stream) in the clear once
/// acknowledged (`spec.vm.move_encryption: none`).
const KIND_GUEST: u8 = 4;
/// As [`KIND_GUEST`], the stream sealed by the two agents (`stream_seal`): a kind of its own so
/// that two agents that would stream it differently (a VNF's ends that disagree, an agent from
/// before the agents sealed it) refuse it at its opening, saying why.
const KIND_GUEST_SEALED: u8 = 6;
/// Packets a frozen move's source queued, for the destination's instance to process first.
const KIND_PACKETS: u8 = 5;
/// Bytes of queued packets one batch carries at most.
const PACKET_BATCH_BYTES: usize = 1 << 20;
/// Largest packet batch a host accepts: the frames' bytes and their headers.
const MAX_PACKET_BATCH_BYTES: u32 = 2 << 20;
/// How often a frozen source sends its batch (its last updates, then what it queued).
const FROZEN_INTERVAL: Duration = Duration::from_millis(1);
/// A log batch up to this size is applied on the connection's own task when nobody holds the
/// instance: the hop to a blocking thread (a wake-up on a busy machine) would cost more than
/// the work, and a frozen move's last log waits on it.
const APPLY_INLINE_BYTES: usize = 64 << 10;
/// A frozen instance's last log of up to this many updates is taken on the stream's task
/// (when nobody holds the instance), for the same reason.
const TAKE_INLINE_UPDATES: u64 = 1024;
/// How long a move's source waits before it opens a guest stream again.
const GUEST_RETRY: Duration = Duration::from_secs(1);
/// How often a guest stream's progress is told to the agent (and so reported) at most.
const GUEST_PROGRESS_EVERY: Duration = Duration::from_millis(500);
/// Acknowledgement statuses.
const ACK_OK: u8 = 0;
const ACK_RESYNC: u8 = 1;
const ACK_REFUSED: u8 = 2;
/// The receiver holds the pair at a higher epoch than the sender: the sender is stale.
const ACK_STALE: u8 = 3;

/// The maps of this host's wasm instances, as replication reads and writes them.
pub trait ReplicaState: Send + Sync + 'static {
    /// From the active instance of `vnf`: a snapshot of its maps (`full`; restarts its update
    /// log) or the update log since the last batch. `Ok(None)`: not `full` and nothing
    /// changed since the last batch (the chain untouched).
    fn take(&self, vnf: &Name, full: bool) -> Result<Option<Vec<u8>>, String>;

    /// Applies a snapshot (`full`) or an update log to the standby instance of `vnf`; returns
    /// the updates applied (entries, for a snapshot). Nothing changes on error.
    fn apply(&self, vnf: &Name, full: bool, bytes: &[u8]) -> Result<u64, String>;

    /// `Some(false)` when the active instance of `vnf` logs no updates now, so only a full
    /// snapshot carries its state on (a new version of its module reshaped its maps; the
    /// snapshot starts the log again); `None` when that cannot be told at once.
    fn logging(&self, vnf: &Name) -> Option<bool> {
        let _ = vnf;
        None
    }

    /// [`ReplicaState::take`] of the update log when it can be had at once, without waiting:
    /// nobody holds the instance and its log holds at most `max_updates` updates. `None`
    /// otherwise (the caller takes it on a blocking thread).
    fn take_log_at_once(
        &self,
        vnf: &Name,
        max_updates: u64,
    ) -> Option<Result<Option<Vec<u8>>, String>> {
        let _ = (vnf, max_updates);
        None
    }

    /// [`ReplicaState::apply`] of an update log when nobody holds the standby instance; `None`
    /// otherwise (the caller applies it on a blocking thread).
    fn apply_log_at_once(&self, vnf: &Name, bytes: &[u8]) -> Option<Result<u64, String>> {
        let _ = (vnf, bytes);
        None
    }

    /// Since when the active instance of `vnf` is frozen for its move's hand-off (its maps
    /// change no more: the next batch taken is the last); `None` while it is not.
    fn frozen_since(&self, vnf: &Name) -> Option<Instant> {
        let _ = vnf;
        None
    }

    /// From a frozen instance of `vnf`: up to `max_bytes` of the packets it queued (at least
    /// one), encoded, and how many; `None` when none waits.
    fn take_packets(&self, vnf: &Name, max_bytes: usize) -> Option<(Vec<u8>, u64)> {
        let _ = (vnf, max_bytes);
        None
    }

    /// `packets` taken by [`ReplicaState::take_packets`] reached the destination's agent (those
    /// taken and never acknowledged are the instance's drops when it goes).
    fn packets_passed(&self, vnf: &Name, packets: u64) {
        let _ = (vnf, packets);
    }

    /// Hands packets a move's source queued to this host's instance of `vnf`, which processes
    /// them before anything else; returns how many it took.
    fn hand_in(&self, vnf: &Name, bytes: &[u8]) -> Result<u64, String> {
        let _ = bytes;
        Err(format!("this host takes no packets of {vnf}"))
    }
}

/// What a standby answered to one batch.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Ack {
    seq: u64,
    status: u8,
    updates: u64,
    /// The epoch the receiver holds the pair at (0: it holds no role of it).
    epoch: u64,
    message: String,
    /// As read: it came tagged (checked against the stream's key when read by a [`Link`]).
    tagged: bool,
}

impl Ack {
    fn new(seq: u64, status: u8, message: String) -> Self {
        Self {
            seq,
            status,
            updates: 0,
            epoch: 0,
            message,
            tagged: false,
        }
    }
}

/// One batch's header, as sent and as read.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Header {
    vnf: Name,
    kind: u8,
    seq: u64,
    /// The sender's epoch of the pair.
    epoch: u64,
    /// How long the standby should wait for the next batch before it takes the sender for lost.
    silence: Duration,
}

/// Header `h` of a batch whose body is `len` bytes (before encryption), as it goes on the wire
/// (its tag covers these bytes; the receiver makes them again from what it read).
fn encode_head(h: &Header, len: u32) -> Vec<u8> {
    let name = h.vnf.as_str().as_bytes();
    let silence_ms = u32::try_from(h.silence.as_millis()).unwrap_or(u32::MAX);
    let mut head = Vec::with_capacity(4 + 1 + 2 + name.len() + 8 + 8 + 4 + 4 + TAG_BYTES);
    head.extend_from_slice(MAGIC);
    head.push(h.kind);
    head.extend_from_slice(&(name.len() as u16).to_le_bytes());
    head.extend_from_slice(name);
    head.extend_from_slice(&h.seq.to_le_bytes());
    head.extend_from_slice(&h.epoch.to_le_bytes());
    head.extend_from_slice(&silence_ms.to_le_bytes());
    head.extend_from_slice(&len.to_le_bytes());
    head
}

/// Where one batch stands: its connection's challenge (the receiver's), salt (the sender's)
/// and its number on that connection (from 1). Its tags cover all three, so a batch copied
/// from another connection, or replayed or reordered on its own, matches nothing; and since
/// the sender draws the salt, no two batches' bodies are ever encrypted with the same key,
/// even for a receiver (or someone on the path) that sends an old challenge again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Place {
    nonce: [u8; NONCE_BYTES],
    salt: [u8; NONCE_BYTES],
    n: u64,
}

/// A tag under way for what `label` names of the batch at `at`, over `first` so far.
fn tag_context(key: &hmac::Key, label: &[u8], at: Place, first: &[u8]) -> hmac::Context {
    let mut ctx = hmac::Context::with_key(key);
    ctx.update(label);
    ctx.update(&at.nonce);
    ctx.update(&at.salt);
    ctx.update(&at.n.to_le_bytes());
    ctx.update(first);
    ctx
}

/// The tag of a batch's header `head` (as [`encode_head`] makes it) at `at`.
fn head_tag(key: &hmac::Key, at: Place, head: &[u8]) -> hmac::Tag {
    tag_context(key, HEAD_LABEL, at, head).sign()
}

/// One batch's body cipher: AES-256-GCM under a key of that batch alone (made from the stream's
/// key over the batch's place and its header's tag, which binds the body to its header), each
/// piece of the body ([`PIECE_BYTES`]) sealed under the next nonce (its index), so pieces
/// cannot be reordered, dropped or taken from another batch.
struct BodyCipher {
    key: aead::LessSafeKey,
    piece: u64,
}

impl BodyCipher {
    /// The cipher of the body of the batch at `at` whose header's tag is `head_tag`.
    fn new(key: &hmac::Key, at: Place, head_tag: &[u8]) -> std::io::Result<Self> {
        let secret = tag_context(key, BODY_LABEL, at, head_tag).sign();
        let key = aead::UnboundKey::new(&aead::AES_256_GCM, secret.as_ref())
            .map_err(|_| std::io::Error::other("no AES-256-GCM key from a body's secret"))?;
        Ok(Self {
            key: aead::LessSafeKey::new(key),
            piece: 0,
        })
    }

    /// The next piece's nonce: its index in the body.
    fn next_nonce(&mut self) -> aead::Nonce {
        let mut nonce = [0u8; aead::NONCE_LEN];
        nonce[..8].copy_from_slice(&self.piece.to_le_bytes());
        self.piece += 1;
        aead::Nonce::assume_unique_for_key(nonce)
    }

    /// Encrypts the next piece in place; its authentication tag.
    fn seal(&mut self, piece: &mut [u8]) -> std::io::Result<aead::Tag> {
        let nonce = self.next_nonce();
        self.key
            .seal_in_place_separate_tag(nonce, aead::Aad::empty(), piece)
            .map_err(|_| std::io::Error::other("a body piece too large to seal"))
    }

    /// Decrypts the next piece in place when `tag` proves it was sealed as this piece of
    /// this batch; false (the piece's bytes are then not to be used) otherwise.
    fn open(&mut self, piece: &mut [u8], tag: [u8; SEAL_BYTES]) -> bool {
        let nonce = self.next_nonce();
        self.key
            .open_in_place_separate_tag(nonce, aead::Aad::empty(), aead::Tag::from(tag), piece, 0..)
            .is_ok()
    }
}

/// A batch's body `bytes` as it goes on the wire after `out` (which may hold its header):
/// each piece sealed by `cipher` and followed by its tag; `out` is written to `stream`
/// whenever it holds a piece or more, and what is left of it at the end.
async fn write_sealed(
    stream: &mut TcpStream,
    cipher: &mut BodyCipher,
    mut out: Vec<u8>,
    bytes: &[u8],
) -> std::io::Result<()> {
    for piece in bytes.chunks(PIECE_BYTES) {
        let start = out.len();
        out.extend_from_slice(piece);
        let tag = cipher.seal(&mut out[start..])?;
        out.extend_from_slice(tag.as_ref());
        if out.len() >= PIECE_BYTES {
            stream.write_all(&out).await?;
            out.clear();
        }
    }
    if !out.is_empty() {
        stream.write_all(&out).await?;
    }
    stream.flush().await
}

/// The key a guest stream is sealed with on the connection its opening at `at` began: made
/// from its stream's `key` (under a label of its own) over the connection's challenge and salt,
/// so each connection's is its own and the source, which draws the salt, never seals two with
/// one key.
fn guest_secret(key: &hmac::Key, at: Place) -> StreamSecret {
    let tag = tag_context(key, GUEST_SEAL_LABEL, at, &[]).sign();
    let mut secret = [0u8; StreamSecret::LEN];
    secret.copy_from_slice(&tag.as_ref()[..StreamSecret::LEN]);
    StreamSecret::new(secret)
}

/// Whether two tags are equal, in a time that does not say where they differ.
fn tags_match(made: &[u8], sent: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    made.len() == sent.len() && bool::from(made.ct_eq(sent))
}

/// `key` for making and checking tags.
fn tag_key(key: &PairKey) -> hmac::Key {
    hmac::Key::new(hmac::HMAC_SHA256, key.bytes())
}

/// The bytes after a header of a batch whose body is `len` bytes: the body's pieces, each
/// with its tag (nothing when there is no body).
fn wire_body_len(len: u32) -> u64 {
    u64::from(len) + u64::from(len).div_ceil(PIECE_BYTES as u64) * SEAL_BYTES as u64
}

/// Fresh random bytes for a connection's challenge or salt (`what`).
fn fresh_nonce(what: &str) -> std::io::Result<[u8; NONCE_BYTES]> {
    let mut nonce = [0u8; NONCE_BYTES];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce)
        .map_err(|_| std::io::Error::other(format!("no random bytes for a {what}")))?;
    Ok(nonce)
}

/// Writes a fresh challenge on a connection this host serves (its first bytes); returns it.
async fn write_challenge(stream: &mut TcpStream) -> std::io::Result<[u8; NONCE_BYTES]> {
    let nonce = fresh_nonce("challenge")?;
    let mut out = Vec::with_capacity(MAGIC.len() + NONCE_BYTES);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&nonce);
    stream.write_all(&out).await?;
    Ok(nonce)
}

/// Answers the challenge of the host serving this connection with a fresh salt of this host's
/// (its first bytes); returns it.
async fn write_salt(stream: &mut TcpStream) -> std::io::Result<[u8; NONCE_BYTES]> {
    let salt = fresh_nonce("salt")?;
    stream.write_all(&salt).await?;
    Ok(salt)
}

/// The salt the connecting host answered this host's challenge with.
async fn read_salt(stream: &mut TcpStream) -> std::io::Result<[u8; NONCE_BYTES]> {
    let mut salt = [0u8; NONCE_BYTES];
    stream.read_exact(&mut salt).await?;
    Ok(salt)
}

/// The challenge a host serving this connection sent.
async fn read_challenge(stream: &mut TcpStream) -> std::io::Result<[u8; NONCE_BYTES]> {
    let mut magic = [0; 4];
    stream.read_exact(&mut magic).await?;
    if &magic != MAGIC {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("the peer speaks no replication protocol this host knows (magic {magic:?})"),
        ));
    }
    let mut nonce = [0u8; NONCE_BYTES];
    stream.read_exact(&mut nonce).await?;
    Ok(nonce)
}

/// The sending end of one replication connection: the stream's key, the receiver's challenge,
/// this host's salt and how many batches went.
struct Link {
    stream: TcpStream,
    key: hmac::Key,
    nonce: [u8; NONCE_BYTES],
    salt: [u8; NONCE_BYTES],
    sent: u64,
}

impl Link {
    /// Connects to `address` from `source` ([`connect_from`]), reads the receiver's challenge
    /// and answers it with a salt.
    async fn open(source: Option<IpAddr>, address: &str, key: &PairKey) -> std::io::Result<Self> {
        let mut stream = connect_from(source, address).await?;
        let _ = stream.set_nodelay(true);
        notice_dead_peer(&stream);
        let nonce = read_challenge(&mut stream).await?;
        let salt = write_salt(&mut stream).await?;
        Ok(Self {
            stream,
            key: tag_key(key),
            nonce,
            salt,
            sent: 0,
        })
    }

    /// Where the next batch (`ahead` 1) or the last sent (0) stands on this connection.
    fn place(&self, ahead: u64) -> Place {
        Place {
            nonce: self.nonce,
            salt: self.salt,
            n: self.sent + ahead,
        }
    }

    /// Sends one batch: its header and header tag, then (when it has one) its body, encrypted
    /// piece by piece, each piece with its tag.
    async fn send(&mut self, h: &Header, bytes: &[u8]) -> std::io::Result<()> {
        let len =
            u32::try_from(bytes.len()).map_err(|_| std::io::Error::other("batch too large"))?;
        let at = self.place(1);
        self.sent += 1;
        let mut out = encode_head(h, len);
        let tag = head_tag(&self.key, at, &out);
        out.extend_from_slice(tag.as_ref());
        if bytes.is_empty() {
            self.stream.write_all(&out).await?;
            return self.stream.flush().await;
        }
        let mut cipher = BodyCipher::new(&self.key, at, tag.as_ref())?;
        write_sealed(&mut self.stream, &mut cipher, out, bytes).await
    }

    /// The answer to the last batch sent. One tagged is checked against the stream's key
    /// (a tag that does not match fails the connection); one that says the batch was taken or
    /// asks for a snapshot must be tagged, since only the stream's receiver can say so. An
    /// untagged refusal or stale answer is read as it is (`tagged` false): its sender may
    /// not hold the key, and the caller does not act on what it claims.
    async fn read_ack(&mut self) -> std::io::Result<Ack> {
        let at = self.place(0);
        let ack = read_ack(&mut self.stream, Some((&self.key, at))).await?;
        if !ack.tagged && [ACK_OK, ACK_RESYNC].contains(&ack.status) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "an acknowledgement that takes the batch (or asks for a snapshot) without the stream's tag",
            ));
        }
        Ok(ack)
    }
}

/// One answer; its tag, when it comes with one, checked against the stream's key at the
/// batch's place when `seal` gives them (one that does not match fails the read).
async fn read_ack(
    stream: &mut TcpStream,
    seal: Option<(&hmac::Key, Place)>,
) -> std::io::Result<Ack> {
    let mut fixed = [0u8; 8 + 1 + 8 + 8 + 2];
    stream.read_exact(&mut fixed).await?;
    let word = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&fixed[at..at + 8]);
        u64::from_le_bytes(b)
    };
    let (seq, status, updates, epoch) = (word(0), fixed[8], word(9), word(17));
    let len = u16::from_le_bytes([fixed[25], fixed[26]]);
    let mut message = vec![0; usize::from(len)];
    stream.read_exact(&mut message).await?;
    let tagged = stream.read_u8().await? != 0;
    if tagged {
        let mut tag = [0u8; TAG_BYTES];
        stream.read_exact(&mut tag).await?;
        if let Some((key, at)) = seal {
            let mut made = tag_context(key, ACK_LABEL, at, &fixed);
            made.update(&message);
            if !tags_match(made.sign().as_ref(), &tag) {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "an acknowledgement whose tag was not made with the stream's key",
                ));
            }
        }
    }
    Ok(Ack {
        seq,
        status,
        updates,
        epoch,
        message: String::from_utf8_lossy(&message).into_owned(),
        tagged,
    })
}

/// Writes `ack`, tagged with the stream's key at the batch's place when `seal` gives them (the
/// batch it answers was tagged with that key), untagged otherwise.
async fn write_ack(
    stream: &mut TcpStream,
    ack: &Ack,
    seal: Option<(&hmac::Key, Place)>,
) -> std::io::Result<()> {
    let message = ack.message.as_bytes();
    let message = &message[..message.len().min(1024)];
    let mut out = Vec::with_capacity(8 + 1 + 8 + 8 + 2 + message.len() + 1 + TAG_BYTES);
    out.extend_from_slice(&ack.seq.to_le_bytes());
    out.push(ack.status);
    out.extend_from_slice(&ack.updates.to_le_bytes());
    out.extend_from_slice(&ack.epoch.to_le_bytes());
    out.extend_from_slice(&(message.len() as u16).to_le_bytes());
    out.extend_from_slice(message);
    match seal {
        Some((key, at)) => {
            let tag = tag_context(key, ACK_LABEL, at, &out).sign();
            out.push(1);
            out.extend_from_slice(tag.as_ref());
        }
        None => out.push(0),
    }
    stream.write_all(&out).await?;
    stream.flush().await
}

/// One batch's header as a standby read it: the header, the length of the body that follows
/// and the header's tag.
struct Head {
    h: Header,
    len: u32,
    tag: [u8; TAG_BYTES],
}

/// One batch's header as a standby reads it, with its tag. Every length is checked before
/// anything is allocated for it; the body is read (or passed over) once the batch is judged
/// ([`read_body`], [`skip_body`]).
async fn read_header(stream: &mut TcpStream) -> std::io::Result<Head> {
    let bad = |why: String| std::io::Error::new(std::io::ErrorKind::InvalidData, why);
    let mut magic = [0; 4];
    stream.read_exact(&mut magic).await?;
    if &magic != MAGIC {
        return Err(bad(format!("not a replication batch (magic {magic:?})")));
    }
    let kind = stream.read_u8().await?;
    if ![
        KIND_SNAPSHOT,
        KIND_LOG,
        KIND_KEEPALIVE,
        KIND_GUEST,
        KIND_PACKETS,
        KIND_GUEST_SEALED,
    ]
    .contains(&kind)
    {
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
    let epoch = stream.read_u64_le().await?;
    let silence = Duration::from_millis(u64::from(stream.read_u32_le().await?));
    if !(MIN_SILENCE..=MAX_SILENCE).contains(&silence) {
        return Err(bad(format!(
            "a silence of {} ms (the standby waits {}..={} ms)",
            silence.as_millis(),
            MIN_SILENCE.as_millis(),
            MAX_SILENCE.as_millis()
        )));
    }
    let len = stream.read_u32_le().await?;
    let max = if kind == KIND_PACKETS {
        MAX_PACKET_BATCH_BYTES
    } else {
        MAX_BATCH_BYTES
    };
    if len > max || ([KIND_KEEPALIVE, KIND_GUEST, KIND_GUEST_SEALED].contains(&kind) && len > 0) {
        return Err(bad(format!(
            "a batch of {len} bytes (kind {kind}) exceeds what a standby accepts ({max}; a keepalive or a guest stream's opening carries none)"
        )));
    }
    let mut tag = [0u8; TAG_BYTES];
    stream.read_exact(&mut tag).await?;
    let h = Header {
        vnf: name,
        kind,
        seq,
        epoch,
        silence,
    };
    Ok(Head { h, len, tag })
}

/// The body of the batch `head` at `at`, decrypted, once its header's tag proved the sender
/// holds `key`; `None` when a piece of it does not open under its tag (nothing of the body may
/// be used then; the rest of it is still read, so the connection's framing goes on).
async fn read_body(
    stream: &mut (impl tokio::io::AsyncRead + Unpin),
    head: &Head,
    at: Place,
    key: &hmac::Key,
) -> std::io::Result<Option<Vec<u8>>> {
    if head.len == 0 {
        return Ok(Some(Vec::new()));
    }
    let mut bytes = vec![0; head.len as usize];
    let mut cipher = BodyCipher::new(key, at, &head.tag)?;
    let mut whole = true;
    for piece in bytes.chunks_mut(PIECE_BYTES) {
        stream.read_exact(piece).await?;
        let mut tag = [0u8; SEAL_BYTES];
        stream.read_exact(&mut tag).await?;
        whole = whole && cipher.open(piece, tag);
    }
    Ok(whole.then_some(bytes))
}

/// Reads past the body (its pieces and their tags) of a refused batch whose body is `len`
/// bytes without keeping them, so the connection's framing goes on and nothing is allocated
/// for a sender that may not send.
async fn skip_body(stream: &mut TcpStream, len: u32) -> std::io::Result<()> {
    let len = wire_body_len(len);
    let skipped = tokio::io::copy(&mut (&mut *stream).take(len), &mut tokio::io::sink()).await?;
    if skipped < len {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// What the standby side asks of its agent.
#[async_trait::async_trait]
pub trait StandbyHost: Send + Sync + 'static {
    /// The role and epoch this host's assignments give `vnf`, if it is assigned here.
    fn role(&self, vnf: &Name) -> Option<(Role, u64)>;
    /// Whether this host's standby of `vnf` hears its active: `Some` when it fell silent or its
    /// host closed the connection, `None` once a batch arrived. Called on every batch; the
    /// agent acts on changes only.
    fn hearing(&self, vnf: &Name, lost: Option<ActiveLost>);
    /// The key of `vnf`'s stream into this host when `peer` may send its state, guest or
    /// packets here (the address of its active's host as the assignments name it); `Err` says
    /// why not. A host that takes nothing keeps this default, which refuses.
    fn active_key(&self, vnf: &Name, peer: IpAddr) -> Result<PairKey, String> {
        Err(format!("this host takes nothing of {vnf} from {peer}"))
    }
    /// Whether this host's instance of `vnf` waits for its guest's migration stream now (the
    /// destination of a vm's move), `sealed` or in the clear as its source streams it; `Err`
    /// says why not. A host that takes no guests keeps this default, which refuses.
    async fn expects_guest(&self, vnf: &Name, sealed: bool) -> Result<(), String> {
        let _ = sealed;
        Err(format!("this host takes no guest of {vnf}"))
    }
    /// Hands `stream`, a connection that carries `vnf`'s guest from here on, sealed with
    /// `secret` (in the clear without), to the instance waiting for it.
    async fn take_guest(
        &self,
        vnf: &Name,
        stream: OwnedFd,
        secret: Option<StreamSecret>,
    ) -> Result<(), String> {
        drop((stream, secret));
        Err(format!("this host takes no guest of {vnf}"))
    }
}

/// Silence assumed on a connection before its first batch says how long to wait.
const FIRST_SILENCE: Duration = Duration::from_secs(1);
/// How long a connection may stay open without a batch this host accepts: one that brings
/// none by then is closed (it holds a task and a descriptor).
const UNANSWERED_CONNECTION: Duration = IO_TIMEOUT;
/// Connections served at once; more are closed as they come (a peer opening thousands would
/// take the agent's descriptors). Each replicated VNF takes one from its active's host.
pub const MAX_CONNECTIONS: usize = 512;

/// Accepts batches for this host's standby instances until the listener fails: each is
/// applied when this host runs `vnf`'s standby and the batch comes from its active's address,
/// refused otherwise (as stale when this host holds the pair at a higher epoch); queued
/// packets of a move's hand-off are taken for an instance in either role, from that address. A connection that sends anything malformed is dropped.
/// The host is told when a connection that carried a VNF's batches falls silent (and when it
/// speaks again) or ends.
pub async fn serve_standbys(
    listener: Arc<TcpListener>,
    state: Arc<dyn ReplicaState>,
    host: Arc<dyn StandbyHost>,
) {
    serve_at_most(listener, state, host, MAX_CONNECTIONS).await;
}

/// [`serve_standbys`] with `cap` connections at once.
async fn serve_at_most(
    listener: Arc<TcpListener>,
    state: Arc<dyn ReplicaState>,
    host: Arc<dyn StandbyHost>,
    cap: usize,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(cap));
    let mut told_full = false;
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("replication listener: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            if !std::mem::replace(&mut told_full, true) {
                tracing::warn!(
                    "replication listener: {cap} connections open; closing the one from {peer} (and more, unsaid, while it stays full)"
                );
            }
            continue;
        };
        told_full = false;
        let (state, host) = (Arc::clone(&state), Arc::clone(&host));
        tokio::spawn(async move {
            let _slot = slot;
            let mut conn = StandbyConnection {
                peer: peer.to_string(),
                peer_ip: peer.ip().to_canonical(),
                seen: std::collections::BTreeSet::new(),
                silence: FIRST_SILENCE,
                silent: false,
                accepted_at: tokio::time::Instant::now(),
                answered: false,
                heard_at: tokio::time::Instant::now(),
                nonce: [0; NONCE_BYTES],
                salt: [0; NONCE_BYTES],
                received: 0,
            };
            let mut stream = stream;
            let ended = match conn.serve(&mut stream, state, host.as_ref()).await {
                // The connection carries a guest from now on: it leaves the batches' framing.
                Ok(Some((guest, at))) => {
                    return take_guest(stream, &guest, at, host.as_ref()).await;
                }
                Ok(None) => Ok(()),
                Err(e) => Err(e),
            };
            // A connection its peer closed (or reset): the active's agent is gone (its kernel
            // closed the socket; an active never closes it while it is one, however long it
            // waits). One that failed on this side may be a cut path: it counts as silent.
            let closed = matches!(
                &ended,
                Err(e) if matches!(
                    e.kind(),
                    std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
                )
            );
            let why = match &ended {
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    format!("its host {peer} closed the replication connection")
                }
                Err(e) => format!("the replication connection from {peer} failed: {e}"),
                Ok(()) => format!("the replication connection from {peer} ended"),
            };
            conn.tell(host.as_ref(), Some(ActiveLost { why, closed }));
        });
    }
}

/// Answers a connection that opened `vnf`'s guest stream with header `head` at `at`:
/// acknowledged when this host's instance of the VNF waits for its guest (as its standby at
/// the sender's epoch or above) and the header is tagged with the stream's key, and the
/// instance then takes the connection; refused (and closed) otherwise.
async fn take_guest(mut stream: TcpStream, head: &Head, at: Place, host: &dyn StandbyHost) {
    let (h, vnf) = (&head.h, &head.h.vnf);
    let from = match stream.peer_addr() {
        Ok(a) => authentic(host, head, at, a.ip().to_canonical()),
        Err(e) => Err(format!("the stream's peer is unknown: {e}")),
    };
    // The stream's key when the header was tagged with it; why it is refused otherwise.
    let (key, refusal) = match from {
        Err(why) => (None, Some(why)),
        Ok(key) => {
            let refusal = match host.role(vnf) {
                Some((Role::Standby, mine)) if h.epoch >= mine => host
                    .expects_guest(vnf, h.kind == KIND_GUEST_SEALED)
                    .await
                    .err(),
                Some((_, mine)) if mine > h.epoch => Some(format!(
                    "this host holds {vnf} at epoch {mine}, above the sender's {}",
                    h.epoch
                )),
                _ => Some(format!("this host runs no destination of {vnf}")),
            };
            (Some(key), refusal)
        }
    };
    let ack = match &refusal {
        None => Ack::new(h.seq, ACK_OK, String::new()),
        Some(why) => Ack::new(h.seq, ACK_REFUSED, why.clone()),
    };
    let seal = key.as_ref().map(|k| (k, at));
    match tokio::time::timeout(IO_TIMEOUT, write_ack(&mut stream, &ack, seal)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return tracing::warn!(vnf = %vnf, "answering a guest stream: {e}"),
        Err(_) => return tracing::warn!(vnf = %vnf, "answering a guest stream timed out"),
    }
    let key = match (refusal, key) {
        (None, Some(key)) => key,
        (Some(why), _) => return tracing::info!(vnf = %vnf, "refused a guest stream: {why}"),
        (None, None) => return,
    };
    let taken = match guest_socket(stream, StreamEnd::Destination) {
        Ok(fd) => {
            let secret = (h.kind == KIND_GUEST_SEALED).then(|| guest_secret(&key, at));
            host.take_guest(vnf, fd, secret).await
        }
        Err(e) => Err(format!("the guest stream's socket: {e}")),
    };
    match taken {
        Ok(()) => tracing::info!(vnf = %vnf, "its guest streams in"),
        // The connection closed with the fd: the source sees its stream fail.
        Err(why) => tracing::warn!(vnf = %vnf, "could not take the guest stream: {why}"),
    }
}

/// `stream` as the guest stream's socket QEMU is handed (`getfd`): bounded buffers, no Nagle
/// delay, blocking ([`telvirt_runtime_vm::stream_socket`]).
fn guest_socket(stream: TcpStream, end: StreamEnd) -> std::io::Result<OwnedFd> {
    telvirt_runtime_vm::stream_socket(stream.into_std()?, end)
}

/// The key of `head`'s stream into this host when `peer` may send it and its header is tagged
/// with that key at `at`; why not otherwise.
fn authentic(
    host: &dyn StandbyHost,
    head: &Head,
    at: Place,
    peer: IpAddr,
) -> Result<hmac::Key, String> {
    let vnf = &head.h.vnf;
    let key = tag_key(&host.active_key(vnf, peer)?);
    let made = head_tag(&key, at, &encode_head(&head.h, head.len));
    if !tags_match(made.as_ref(), &head.tag) {
        return Err(format!(
            "the batch from {peer} is not tagged with the key of {vnf}'s stream into this host"
        ));
    }
    Ok(key)
}

/// A batch refused on its header: the answer, and the stream's key when the header was
/// tagged with it (the answer is tagged then).
struct Refusal {
    ack: Ack,
    key: Option<hmac::Key>,
}

/// One active's connection as its standby's host serves it.
struct StandbyConnection {
    peer: String,
    peer_ip: IpAddr,
    /// The VNFs it carried batches of.
    seen: std::collections::BTreeSet<Name>,
    /// How long the sender asked to be waited for (its last batch's word).
    silence: Duration,
    /// It has been silent for longer than that, and the host was told.
    silent: bool,
    /// When it was accepted.
    accepted_at: tokio::time::Instant,
    /// A batch of it was accepted (judged allowed) here.
    answered: bool,
    /// When it last brought a batch this host took: its silence counts from then, not from
    /// its last byte (batches refused, say under a key this host does not hold yet, are not
    /// its active heard).
    heard_at: tokio::time::Instant,
    /// The challenge this host sent on it.
    nonce: [u8; NONCE_BYTES],
    /// The salt its sender answered the challenge with.
    salt: [u8; NONCE_BYTES],
    /// Batches read on it.
    received: u64,
}

impl StandbyConnection {
    /// Tells the host about every VNF this connection carried that it runs the standby of.
    fn tell(&self, host: &dyn StandbyHost, lost: Option<ActiveLost>) {
        for vnf in &self.seen {
            if matches!(host.role(vnf), Some((Role::Standby, _))) {
                host.hearing(vnf, lost.clone());
            }
        }
    }

    /// Sends the connection's challenge and reads its sender's salt (both within
    /// [`UNANSWERED_CONNECTION`] of its acceptance), then serves batches until the connection
    /// ends or fails, or opens a guest stream (its header, and where it stands, are returned
    /// for the connection to be answered and handed over).
    async fn serve(
        &mut self,
        stream: &mut TcpStream,
        state: Arc<dyn ReplicaState>,
        host: &dyn StandbyHost,
    ) -> std::io::Result<Option<(Head, Place)>> {
        let _ = stream.set_nodelay(true);
        notice_dead_peer(stream);
        let opened_by = self.accepted_at + UNANSWERED_CONNECTION;
        self.nonce = tokio::time::timeout_at(opened_by, write_challenge(stream))
            .await
            .map_err(|_| std::io::Error::other("sending the challenge timed out"))??;
        self.salt = tokio::time::timeout_at(opened_by, read_salt(stream))
            .await
            .map_err(|_| std::io::Error::other("no salt answered the challenge in time"))??;
        let mut probe = [0u8; 1];
        loop {
            // Checked at every batch, refused ones too: a peer without the stream's key that
            // keeps sending well-formed batches must not hold a connection slot for good.
            if !self.answered && self.accepted_at.elapsed() >= UNANSWERED_CONNECTION {
                return Err(std::io::Error::other(format!(
                    "no batch this host accepts in {} s",
                    UNANSWERED_CONNECTION.as_secs()
                )));
            }
            // Batches keep coming, none taken since the silence ran out: silent all the same.
            if self.answered && !self.silent && self.heard_at.elapsed() >= self.silence {
                self.fell_silent(host);
            }
            // Only the wait for a batch's first byte is timed: a batch is then read whole (a
            // read given up half-way would lose the stream's framing). Once the host was told
            // of the silence, the wait is for the next byte, however long (no timer runs).
            let first_byte = if self.silent {
                Ok(stream.peek(&mut probe).await)
            } else if !self.answered {
                tokio::time::timeout(self.silence, stream.peek(&mut probe)).await
            } else {
                let until = self.heard_at + self.silence;
                tokio::time::timeout_at(until, stream.peek(&mut probe)).await
            };
            match first_byte {
                // The top of the loop ends a connection unanswered for too long.
                Err(_) if !self.answered => continue,
                Err(_) => {
                    self.fell_silent(host);
                    continue;
                }
                Ok(Ok(0)) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e),
            }
            let head = tokio::time::timeout(IO_TIMEOUT, read_header(stream))
                .await
                .map_err(|_| std::io::Error::other("a batch took too long to arrive"))??;
            self.received += 1;
            let at = Place {
                nonce: self.nonce,
                salt: self.salt,
                n: self.received,
            };
            let (h, len) = (&head.h, head.len);
            if [KIND_GUEST, KIND_GUEST_SEALED].contains(&h.kind) {
                return Ok(Some((head, at)));
            }
            // Judged on its header: a refused batch is answered at once and its body passed
            // over, never held in memory; only an accepted one's sender sets the silence.
            let judged = self.judge(&head, at, host);
            let (ack, key) = match judged {
                Ok((first_role, key)) => {
                    let body = tokio::time::timeout(IO_TIMEOUT, read_body(stream, &head, at, &key))
                        .await
                        .map_err(|_| std::io::Error::other("a batch took too long to arrive"))??;
                    let ack = match body {
                        None => Ack::new(
                            h.seq,
                            ACK_REFUSED,
                            format!(
                                "the body of batch {} of {} does not open under its tags",
                                h.seq, h.vnf
                            ),
                        ),
                        Some(bytes) => {
                            self.silence = h.silence;
                            self.answered = true;
                            self.heard_at = tokio::time::Instant::now();
                            // Judged again once a body is here (it may take seconds to
                            // arrive): a standby promoted meanwhile takes no more of its former
                            // active's state.
                            let role = if len == 0 {
                                Ok(first_role)
                            } else {
                                self.judge(&head, at, host).map(|(role, _)| role)
                            };
                            match role {
                                Ok(role) => self.receive(h, role, bytes, &state, host).await,
                                Err(refused) => refused.ack,
                            }
                        }
                    };
                    (ack, key)
                }
                Err(refused) => {
                    let seal = refused.key.as_ref().map(|k| (k, at));
                    tokio::time::timeout(IO_TIMEOUT, write_ack(stream, &refused.ack, seal))
                        .await
                        .map_err(|_| std::io::Error::other("acknowledgement timed out"))??;
                    tokio::time::timeout(IO_TIMEOUT, skip_body(stream, len))
                        .await
                        .map_err(|_| std::io::Error::other("a batch took too long to arrive"))??;
                    continue;
                }
            };
            // Its header was tagged with the stream's key: so is the answer.
            tokio::time::timeout(IO_TIMEOUT, write_ack(stream, &ack, Some((&key, at))))
                .await
                .map_err(|_| std::io::Error::other("acknowledgement timed out"))??;
        }
    }

    /// Whether batch `head` at `at` may be taken here, judged on its header: the role this
    /// host's instance of the VNF has and the stream's key; the refusal to answer otherwise.
    /// State (a snapshot, a log, a keepalive) goes to a standby at the sender's epoch or above
    /// (a sender below it is told it is stale, and fences itself) from its active's address,
    /// tagged with the stream's key; packets of a move's hand-off to an instance in either
    /// role, from that address with that key.
    ///
    /// A refusal comes with the stream's key when the header was tagged with it (its answer is
    /// tagged then): a stale answer is believed only so.
    fn judge(
        &self,
        head: &Head,
        at: Place,
        host: &dyn StandbyHost,
    ) -> Result<(Role, hmac::Key), Box<Refusal>> {
        let (h, vnf) = (&head.h, &head.h.vnf);
        let refusal = |ack, key| Box::new(Refusal { ack, key });
        let refused = |why| refusal(Ack::new(h.seq, ACK_REFUSED, why), None);
        if h.kind == KIND_PACKETS {
            let key = authentic(host, head, at, self.peer_ip).map_err(refused)?;
            return match host.role(vnf) {
                Some((role, _)) => Ok((role, key)),
                None => Err(refusal(
                    Ack::new(
                        h.seq,
                        ACK_REFUSED,
                        format!("this host runs no instance of {vnf}"),
                    ),
                    Some(key),
                )),
            };
        }
        match host.role(vnf) {
            Some((Role::Standby, mine)) if h.epoch >= mine => {}
            Some((_, mine)) if mine > h.epoch => {
                let mut ack = Ack::new(
                    h.seq,
                    ACK_STALE,
                    format!(
                        "this host holds {vnf} at epoch {mine}, above the sender's {}",
                        h.epoch
                    ),
                );
                ack.epoch = mine;
                // Tagged when this host still holds the stream's key (the former standby
                // keeps its former active's while the VNF is assigned here).
                return Err(refusal(ack, authentic(host, head, at, self.peer_ip).ok()));
            }
            _ => {
                return Err(refused(format!("this host runs no standby of {vnf}")));
            }
        }
        let key = authentic(host, head, at, self.peer_ip).map_err(refused)?;
        Ok((Role::Standby, key))
    }

    /// Applies one batch [`judged`](Self::judge) allowed for this host's instance in `role`;
    /// its acknowledgement.
    async fn receive(
        &mut self,
        h: &Header,
        role: Role,
        bytes: Vec<u8>,
        state: &Arc<dyn ReplicaState>,
        host: &dyn StandbyHost,
    ) -> Ack {
        let vnf = &h.vnf;
        if h.kind == KIND_PACKETS {
            return self.receive_packets(h, role, bytes, state, host).await;
        }
        self.heard(vnf, host);
        if h.kind == KIND_KEEPALIVE {
            return Ack::new(h.seq, ACK_OK, String::new());
        }
        let full = h.kind == KIND_SNAPSHOT;
        let at_once = (!full && bytes.len() <= APPLY_INLINE_BYTES)
            .then(|| state.apply_log_at_once(vnf, &bytes))
            .flatten();
        let applied = match at_once {
            Some(applied) => Ok(applied),
            None => {
                let (state, name) = (Arc::clone(state), vnf.clone());
                tokio::task::spawn_blocking(move || state.apply(&name, full, &bytes)).await
            }
        };
        match applied {
            Ok(Ok(updates)) => {
                let mut ack = Ack::new(h.seq, ACK_OK, String::new());
                ack.updates = updates;
                ack
            }
            // A missing or reordered log, or no instance yet: a full snapshot sets it right.
            Ok(Err(e)) => Ack::new(h.seq, ACK_RESYNC, e),
            Err(e) => Ack::new(h.seq, ACK_RESYNC, format!("applying the batch failed: {e}")),
        }
    }

    /// Tells the host that this connection's sender fell silent: no batch taken for its
    /// silence.
    fn fell_silent(&mut self, host: &dyn StandbyHost) {
        self.silent = true;
        let why = format!(
            "nothing from {} for {} ms (no batch taken)",
            self.peer,
            self.silence.as_millis()
        );
        self.tell(host, Some(ActiveLost { why, closed: false }));
    }

    /// Its active spoke of `vnf`, whose standby this host runs: the host hears it.
    fn heard(&mut self, vnf: &Name, host: &dyn StandbyHost) {
        self.seen.insert(vnf.clone());
        self.silent = false;
        host.hearing(vnf, None);
    }

    /// Hands the packets of one batch to this host's instance of the VNF, standby or (once the
    /// switch was made) active, whatever the sender's epoch: they are traffic for the VNF, not
    /// its state, and the instance's queue bounds them.
    async fn receive_packets(
        &mut self,
        h: &Header,
        role: Role,
        bytes: Vec<u8>,
        state: &Arc<dyn ReplicaState>,
        host: &dyn StandbyHost,
    ) -> Ack {
        let vnf = &h.vnf;
        if role == Role::Standby {
            self.heard(vnf, host);
        }
        let (state, name) = (Arc::clone(state), vnf.clone());
        match tokio::task::spawn_blocking(move || state.hand_in(&name, &bytes)).await {
            Ok(Ok(n)) => {
                let mut ack = Ack::new(h.seq, ACK_OK, String::new());
                ack.updates = n;
                ack
            }
            Ok(Err(e)) => Ack::new(h.seq, ACK_REFUSED, e),
            Err(e) => Ack::new(
                h.seq,
                ACK_REFUSED,
                format!("handing the packets in failed: {e}"),
            ),
        }
    }
}

/// One stream's status, shared by its sending task and [`Replicas::status`]; the agent is told
/// of every change of its state.
#[derive(Clone)]
struct StreamStatus {
    status: Arc<Mutex<ReplicationStatus>>,
    vnf: Name,
    changed: Arc<OnceLock<StateChanged>>,
}

impl StreamStatus {
    fn new(
        vnf: &Name,
        peer: &StandbyPeer,
        state: &str,
        changed: &Arc<OnceLock<StateChanged>>,
    ) -> Self {
        Self {
            status: Arc::new(Mutex::new(ReplicationStatus {
                standby_host: peer.host.clone(),
                state: state.into(),
                move_id: peer.move_id,
                ..Default::default()
            })),
            vnf: vnf.clone(),
            changed: Arc::clone(changed),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ReplicationStatus> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn read(&self) -> ReplicationStatus {
        self.lock().clone()
    }

    /// Tells the agent the stream changed.
    fn tell(&self) {
        if let Some(tell) = self.changed.get() {
            tell(&self.vnf);
        }
    }

    /// Changes the status with `f`; a change of its state is told at once (a move waits for
    /// `synced`).
    fn set(&self, f: &dyn Fn(&mut ReplicationStatus)) {
        let changed = {
            let mut s = self.lock();
            let before = s.state.clone();
            f(&mut s);
            s.state != before
        };
        if changed {
            self.tell();
        }
    }
}

/// The sending side of one replicated VNF.
struct Sender {
    peer: StandbyPeer,
    /// The stream's key, which its task reads before each batch: a new one (the cluster's
    /// secret rotated) is taken on the same connection, which the standby's host would take
    /// for proof that the active is gone were it closed.
    key: tokio::sync::watch::Sender<PairKey>,
    epoch: u64,
    status: StreamStatus,
    /// Set when a handed-off instance is going: the task ends once nothing it queued waits.
    finish: Arc<AtomicBool>,
    /// Cuts the task's wait short (its instance just froze: the last batch goes at once).
    wake: Arc<tokio::sync::Notify>,
    task: tokio::task::JoinHandle<()>,
}

/// The sending side of one moving vm's guest stream.
struct GuestSender {
    peer: StandbyPeer,
    epoch: u64,
    status: StreamStatus,
    /// Set when the stream is no longer wanted: the task cancels it and ends.
    stop: Arc<AtomicBool>,
    runtime: Arc<dyn Runtime>,
    task: tokio::task::JoinHandle<()>,
}

impl GuestSender {
    /// Whether its stream was told to end.
    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Ends the stream (the guest runs on here unless it moved already); once.
    fn stop(&self, vnf: &Name) {
        if self.stop.swap(true, Ordering::AcqRel) {
            return;
        }
        // Without a tokio runtime (the agent ending) nothing can ask QEMU to end its stream.
        if !self.task.is_finished()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            let (runtime, vnf) = (Arc::clone(&self.runtime), vnf.clone());
            rt.spawn(async move { runtime.cancel_send(&vnf).await });
        }
    }
}

/// The replication tasks of this host's active instances that have a standby.
pub struct Replicas {
    state: Arc<dyn ReplicaState>,
    detection: Detection,
    /// The agent's fencing: a standby's acknowledgement keeps an instance forwarding, a stale
    /// answer fences it (`None`: nothing is gated).
    fencing: Option<Arc<Fencing>>,
    senders: Mutex<HashMap<Name, Sender>>,
    /// The guest streams of this host's moving vm instances.
    guests: Mutex<HashMap<Name, GuestSender>>,
    /// Told when a stream's state changes (its VNF's name).
    changed: Arc<OnceLock<StateChanged>>,
    /// Asked at a guest stream's commit point whether its move stands.
    commit: Arc<OnceLock<Arc<MoveCommit>>>,
    /// The address streams connect from (this host's tunnel address), for standbys to know
    /// their active by it (`None`: the kernel chooses).
    source: Option<IpAddr>,
}

impl Replicas {
    pub fn new(state: Arc<dyn ReplicaState>, detection: Detection) -> Self {
        Self {
            state,
            detection,
            fencing: None,
            senders: Mutex::new(HashMap::new()),
            guests: Mutex::new(HashMap::new()),
            changed: Arc::new(OnceLock::new()),
            commit: Arc::new(OnceLock::new()),
            source: None,
        }
    }

    /// Streams connect from `source` (this host's tunnel address, which its standbys'
    /// assignments name).
    pub fn with_source(mut self, source: IpAddr) -> Self {
        self.source = Some(source);
        self
    }

    /// Calls `tell` with the VNF's name whenever a stream's state changes (resyncing, synced,
    /// failing, fenced). Set once; later calls are ignored.
    pub fn on_state_change(&self, tell: StateChanged) {
        let _ = self.changed.set(tell);
    }

    /// Asks `commit` (the VNF's name, its move's destination and the stream's epoch) at each guest stream's commit
    /// point whether the move still stands; without it a guest stream has no commit point.
    /// Set once; later calls are ignored.
    pub fn on_commit_point(&self, commit: Arc<MoveCommit>) {
        let _ = self.commit.set(commit);
    }

    /// Tells the gates of `fencing` what the standbys answer.
    pub fn with_fencing(mut self, fencing: Arc<Fencing>) -> Self {
        self.fencing = Some(fencing);
        self
    }

    fn senders(&self) -> std::sync::MutexGuard<'_, HashMap<Name, Sender>> {
        self.senders.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes `vnf`'s maps stream to `peer` as the active of `epoch` (a new peer or epoch starts
    /// over with a full snapshot).
    pub fn ensure(&self, vnf: &Name, peer: &StandbyPeer, epoch: u64) {
        let mut senders = self.senders();
        if let Some(s) = senders.get_mut(vnf)
            && s.epoch == epoch
            && !s.task.is_finished()
        {
            if s.peer == *peer {
                return;
            }
            // Only its key changed: the running stream takes it.
            let rekeyed = StandbyPeer {
                key: peer.key.clone(),
                ..s.peer.clone()
            };
            if rekeyed == *peer {
                s.key.send_replace(peer.key.clone());
                s.peer = peer.clone();
                return;
            }
        }
        if let Some(old) = senders.remove(vnf) {
            old.task.abort();
        }
        let status = StreamStatus::new(vnf, peer, "resyncing", &self.changed);
        let finish = Arc::new(AtomicBool::new(false));
        let wake = Arc::new(tokio::sync::Notify::new());
        let (key, key_now) = tokio::sync::watch::channel(peer.key.clone());
        let task = tokio::spawn(send_loop(
            SendTo {
                vnf: vnf.clone(),
                address: peer.address.clone(),
                key: key_now,
                epoch,
                detection: self.detection,
                gate: self.fencing.as_ref().map(|f| f.gate(vnf)),
                finish: Arc::clone(&finish),
                wake: Arc::clone(&wake),
                source: self.source,
            },
            Arc::clone(&self.state),
            status.clone(),
        ));
        senders.insert(
            vnf.clone(),
            Sender {
                peer: peer.clone(),
                key,
                epoch,
                status,
                finish,
                wake,
                task,
            },
        );
    }

    /// Sends `vnf`'s next batch now rather than at its interval (its instance just froze for
    /// a hand-off: the sooner its last updates go, the shorter the freeze).
    pub fn wake(&self, vnf: &Name) {
        if let Some(s) = self.senders().get(vnf) {
            s.wake.notify_one();
        }
    }

    fn guests(&self) -> std::sync::MutexGuard<'_, HashMap<Name, GuestSender>> {
        self.guests.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes `vnf`'s guest (a vm of `runtime`) stream to the destination `peer` of its move,
    /// as the active of `epoch`, sealed when it `encrypts` (`spec.vm.move_encryption`),
    /// until it is there (a stream that completed is not sent
    /// again; a new peer or epoch starts over). A failed stream is tried again: the guest
    /// runs on here meanwhile.
    pub fn ensure_guest(
        &self,
        vnf: &Name,
        peer: &StandbyPeer,
        epoch: u64,
        runtime: Arc<dyn Runtime>,
        encrypts: bool,
    ) {
        let mut guests = self.guests();
        if let Some(g) = guests.get(vnf) {
            if g.peer == *peer && g.epoch == epoch && !g.stopping() {
                return;
            }
            // QEMU runs one migration at a time: the old stream ends before a new one starts
            // (a later step starts it).
            if !g.task.is_finished() {
                return g.stop(vnf);
            }
            guests.remove(vnf);
        }
        let status = StreamStatus::new(vnf, peer, "streaming", &self.changed);
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(send_guest(
            GuestTo {
                vnf: vnf.clone(),
                epoch,
                stop: Arc::clone(&stop),
                runtime: Arc::clone(&runtime),
                source: self.source,
                commit: self.commit.get().cloned(),
                peer: peer.clone(),
                encrypts,
            },
            status.clone(),
        ));
        guests.insert(
            vnf.clone(),
            GuestSender {
                peer: peer.clone(),
                epoch,
                status,
                stop,
                runtime,
                task,
            },
        );
    }

    /// Lets a handed-off `vnf`'s stream pass on what its instance still queues and end once
    /// nothing waits, within `within` (then it is stopped). Returns the packets the
    /// destination took.
    pub async fn finish(&self, vnf: &Name, within: Duration) -> u64 {
        let deadline = Instant::now() + within;
        if let Some(s) = self.senders().get(vnf) {
            s.finish.store(true, Ordering::Release);
        }
        loop {
            let done = self.senders().get(vnf).is_none_or(|s| s.task.is_finished());
            if done || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(FROZEN_INTERVAL).await;
        }
        let passed = self
            .senders()
            .get(vnf)
            .map_or(0, |s| s.status.read().packets_passed);
        self.stop(vnf);
        passed
    }

    /// Stops streaming `vnf`'s maps or guest (no longer active, no standby or move, or gone);
    /// a guest stream under way is cancelled, the guest runs on here.
    pub fn stop(&self, vnf: &Name) {
        if let Some(s) = self.senders().remove(vnf) {
            s.task.abort();
        }
        let mut guests = self.guests();
        if let Some(g) = guests.get(vnf) {
            if g.task.is_finished() {
                guests.remove(vnf);
            } else {
                // Kept until its task ended, so no new stream starts meanwhile.
                g.stop(vnf);
            }
        }
    }

    /// Where `vnf`'s replication (or its guest's stream) stands, if there is one.
    pub fn status(&self, vnf: &Name) -> Option<ReplicationStatus> {
        if let Some(s) = self.senders().get(vnf) {
            return Some(s.status.read());
        }
        self.guests()
            .get(vnf)
            .filter(|g| !g.stopping())
            .map(|g| g.status.read())
    }
}

impl Drop for Replicas {
    fn drop(&mut self) {
        for (_, s) in self.senders().drain() {
            s.task.abort();
        }
        for (vnf, g) in self.guests().drain() {
            g.stop(&vnf);
        }
    }
}

/// Where and as what one moving vm's guest is sent.
struct GuestTo {
    vnf: Name,
    epoch: u64,
    stop: Arc<AtomicBool>,
    runtime: Arc<dyn Runtime>,
    source: Option<IpAddr>,
    /// Asked at the stream's commit point.
    commit: Option<Arc<MoveCommit>>,
    /// The move's destination (its replication port at `peer.address`).
    peer: StandbyPeer,
    /// Whether the stream is sealed (`spec.vm.move_encryption`); each connection's key is
    /// made from the stream's key when it opens.
    encrypts: bool,
}

/// What [`Replicas::on_commit_point`] asks: whether the move of the VNF (its name) to the
/// destination (its peer), streamed as the active of an epoch, still stands, once its guest's stream waits at its final copy. Its
/// answer `true` must make the move one that can no longer be cancelled.
pub type MoveCommit = dyn Fn(Name, StandbyPeer, u64) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send>>
    + Send
    + Sync;

/// How long before its final copy (by the stream's own rate so far) a guest stream asks to
/// pass its commit point: long enough for the controller's answer to be back when QEMU
/// stops the guest, so the round trip does not pause it.
const COMMIT_AHEAD_LEAD_MS: u64 = 50;
/// How long the final copy waits for an ahead ask still under way (the guest stopped).
const COMMIT_AHEAD_ANSWER_WITHIN: Duration = Duration::from_secs(2);
/// Streams whose pause limit is above this (ms) commit at their final copy: the round trip is
/// small against such a pause, and asking ahead of a long final copy would hold the move
/// uncancellable longer (QEMU 7.2's 300 ms under TCG).
const COMMIT_AHEAD_UP_TO_LIMIT_MS: u64 = 50;
/// How long a stream committed ahead may stream on before its final copy: past it the stream
/// is cancelled (the guest runs on here, the failed stream makes the move cancellable again)
/// and the move's later streams commit at their final copy.
const COMMIT_AHEAD_WITHIN: Duration = Duration::from_secs(5);

/// Whether stream `p` is near its final copy: QEMU streams, and what is left would go within
/// twice its pause limit and [`COMMIT_AHEAD_LEAD_MS`] more at the rate it streamed so far, or
/// at the rate what is left fell since the sample `before` (its `total_ms` and
/// `remaining_bytes`) (QEMU stops the guest once it
/// expects the rest to go within the limit, by its own recent rate, which may be higher than
/// the average; and pages of zeros leave the count of what is left far faster than bytes are
/// sent: an idle guest's 112 MB fell to 20 MB between two 22 ms samples).
fn near_final_copy(p: &telvirt_model::api::GuestStream, before: Option<(u64, u64)>) -> bool {
    if p.downtime_limit_ms > COMMIT_AHEAD_UP_TO_LIMIT_MS {
        return false;
    }
    let falling = before
        .filter(|&(total_ms, _)| total_ms < p.total_ms)
        .map_or(0, |(total_ms, remaining)| {
            remaining
                .saturating_sub(p.remaining_bytes)
                .saturating_mul(1000)
                / (p.total_ms - total_ms)
        });
    let rate = (p.transferred_bytes.saturating_mul(1000) / p.total_ms.max(1)).max(falling);
    let lead_ms = p
        .downtime_limit_ms
        .saturating_mul(2)
        .saturating_add(COMMIT_AHEAD_LEAD_MS);
    p.status == "active"
        && p.transferred_bytes > 0
        && p.remaining_bytes <= rate.saturating_mul(lead_ms) / 1000
}

/// A future of the agent's own, boxed.
type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

/// Where a stream asked ahead stands: waiting for its final copy, reached it, given up by the
/// [`COMMIT_AHEAD_WITHIN`] limit, or ended otherwise. Changed once, from waiting.
const AHEAD_WAITING: u8 = 0;
const AHEAD_REACHED: u8 = 1;
const AHEAD_GAVE_UP: u8 = 2;
const AHEAD_ENDED: u8 = 3;

/// One guest stream's commit point asked ahead of its final copy: the ask goes once the
/// stream is near its end ([`near_final_copy`]); at the final copy the stream takes its
/// answer (waiting for it if needed) instead of asking then, while the guest stands stopped.
/// A stream whose final copy has not come [`COMMIT_AHEAD_WITHIN`] after a yes is cancelled;
/// the final copy and that limit race for one state change, so a final copy let through is
/// never cancelled by the limit, and one that comes after it gave up does not go.
struct CommitAhead {
    asked: AtomicBool,
    state: std::sync::atomic::AtomicU8,
    answer: tokio::sync::watch::Sender<Option<bool>>,
}

impl CommitAhead {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            asked: AtomicBool::new(false),
            state: std::sync::atomic::AtomicU8::new(AHEAD_WAITING),
            answer: tokio::sync::watch::channel(None).0,
        })
    }

    /// Whether the stream's reports ask for the commit point: asked, and not answered no
    /// nor given up (a report after a no must not commit the move at the controller).
    fn wants_commit(&self) -> bool {
        self.asked.load(Ordering::Acquire)
            && *self.answer.borrow() != Some(false)
            && self.state.load(Ordering::Acquire) != AHEAD_GAVE_UP
    }

    /// The stream ended (its `send_state` returned): the limit no longer cancels anything.
    fn end(&self) {
        let _ = self.state.compare_exchange(
            AHEAD_WAITING,
            AHEAD_ENDED,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }

    /// Asks `ask` once (true when this call asked), in a task: its answer is kept for the
    /// final copy; a yes arms the [`COMMIT_AHEAD_WITHIN`] limit, past which, unless the stream
    /// reached its final copy or ended first, `gave_up` is called and `cancel` ends the stream.
    fn ask(
        self: &Arc<Self>,
        ask: BoxFuture<bool>,
        cancel: impl FnOnce() -> BoxFuture<()> + Send + 'static,
        gave_up: impl FnOnce() + Send + 'static,
    ) -> bool {
        if self.asked.swap(true, Ordering::AcqRel) {
            return false;
        }
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let stands = ask.await;
            me.answer.send_replace(Some(stands));
            if !stands {
                return;
            }
            tokio::time::sleep(COMMIT_AHEAD_WITHIN).await;
            let won = me.state.compare_exchange(
                AHEAD_WAITING,
                AHEAD_GAVE_UP,
                Ordering::AcqRel,
                Ordering::Acquire,
            );
            if won.is_ok() {
                gave_up();
                cancel().await;
            }
        });
        true
    }

    /// At the final copy: the ahead answer when asked (awaited up to `within`; none in time,
    /// or the limit gave up first: `false`), `None` when it was not asked.
    async fn answer_at_final_copy(&self, within: Duration) -> Option<bool> {
        if !self.asked.load(Ordering::Acquire) {
            return None;
        }
        let mut rx = self.answer.subscribe();
        let answered = tokio::time::timeout(within, rx.wait_for(Option::is_some)).await;
        let stands = matches!(answered, Ok(Ok(a)) if *a == Some(true));
        // Reached, unless the limit gave up first (its cancel is on its way).
        let reached = self
            .state
            .compare_exchange(
                AHEAD_WAITING,
                AHEAD_REACHED,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok();
        Some(stands && reached)
    }
}

/// Opens a guest stream to the destination at `to.peer.address` and hands it to the runtime, again
/// after each failure, until the guest is there or the stream is no longer wanted.
async fn send_guest(to: GuestTo, status: StreamStatus) {
    let set = |f: &dyn Fn(&mut ReplicationStatus)| status.set(f);
    // When each stream opened (the controller tells a late report of an earlier one by it):
    // strictly later than the one before even should the clock step back.
    let mut opened_ms: u64 = 0;
    let next_opened = |before: u64| {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        now_ms.max(before.saturating_add(1))
    };
    // Whether this move's streams ask for their commit point ahead (not after one such
    // stream failed to reach its final copy in time).
    let ahead_allowed = Arc::new(AtomicBool::new(true));
    while !to.stop.load(Ordering::Acquire) {
        let (stream, secret) = match open_guest_stream(&to, to.epoch).await {
            Ok(opened) => opened,
            Err(why) => {
                // Said once, before this agent's first stream: its adoption of the guest
                // ended the stream the agent before it left, without moving the guest.
                let undone =
                    status.lock().guest.is_none() && to.runtime.left_stream_undone(&to.vnf).await;
                if undone {
                    opened_ms = next_opened(opened_ms);
                }
                set(&|s| open_failed(s, why.clone(), undone.then_some(opened_ms)));
                tokio::time::sleep(GUEST_RETRY).await;
                continue;
            }
        };
        opened_ms = next_opened(opened_ms);
        set(&|s| {
            s.state = "streaming".into();
            s.error = None;
        });
        let ahead = CommitAhead::new();
        let progress = {
            let (status, stop, runtime, vnf) = (
                status.clone(),
                Arc::clone(&to.stop),
                Arc::clone(&to.runtime),
                to.vnf.clone(),
            );
            let (ahead, ahead_allowed) = (Arc::clone(&ahead), Arc::clone(&ahead_allowed));
            let (commit, peer, epoch) = (to.commit.clone(), to.peer.clone(), to.epoch);
            let mut told = (String::new(), Instant::now());
            let mut cancelled = false;
            // The last sample's time and bytes left.
            let mut before: Option<(u64, u64)> = None;
            move |p: &telvirt_model::api::GuestStream| {
                // Near its end: the commit point is asked now (the report below says so), its
                // answer taken at the final copy.
                let asking = commit.is_some()
                    && ahead_allowed.load(Ordering::Acquire)
                    && near_final_copy(p, before)
                    && !ahead.asked.load(Ordering::Acquire);
                before = Some((p.total_ms, p.remaining_bytes));
                {
                    let mut s = status.lock();
                    s.bytes = p.transferred_bytes;
                    s.guest = Some(telvirt_model::api::GuestStream {
                        opened_ms,
                        commit_ahead: asking || ahead.wants_commit(),
                        ..p.clone()
                    });
                }
                if asking && let Some(commit) = &commit {
                    let (runtime, cancelled_vnf) = (Arc::clone(&runtime), vnf.clone());
                    let (allowed, late_vnf) = (Arc::clone(&ahead_allowed), vnf.clone());
                    ahead.ask(
                        commit(vnf.clone(), peer.clone(), epoch),
                        move || Box::pin(async move { runtime.cancel_send(&cancelled_vnf).await }),
                        move || {
                            allowed.store(false, Ordering::Release);
                            tracing::warn!(vnf = %late_vnf, "the stream committed ahead did not reach its final copy within {COMMIT_AHEAD_WITHIN:?}: cancelled (the guest runs on here; the move's next stream commits at its final copy)");
                        },
                    );
                }
                if told.0 != p.status || told.1.elapsed() >= GUEST_PROGRESS_EVERY {
                    told = (p.status.clone(), Instant::now());
                    status.tell();
                }
                // No longer wanted while it runs: QEMU is told to end it.
                if stop.load(Ordering::Acquire) && !cancelled {
                    cancelled = true;
                    let (runtime, vnf) = (Arc::clone(&runtime), vnf.clone());
                    tokio::spawn(async move { runtime.cancel_send(&vnf).await });
                }
            }
        };
        let gate = to.commit.clone().map(|commit| {
            let (vnf, peer, epoch) = (to.vnf.clone(), to.peer.clone(), to.epoch);
            let ahead = Arc::clone(&ahead);
            Box::new(move || {
                let (commit, vnf, peer, ahead) =
                    (Arc::clone(&commit), vnf.clone(), peer.clone(), Arc::clone(&ahead));
                Box::pin(async move {
                    match ahead.answer_at_final_copy(COMMIT_AHEAD_ANSWER_WITHIN).await {
                        Some(stands) => {
                            tracing::info!(vnf = %vnf, to = %peer.host, stands, "the guest's stream reached its final copy committed ahead");
                            stands
                        }
                        None => commit(vnf, peer, epoch).await,
                    }
                }) as BoxFuture<bool>
            }) as telvirt_runtime_vm::SwitchoverGate
        });
        let sent = to
            .runtime
            .send_state(&to.vnf, stream, secret, Box::new(progress), gate)
            .await;
        ahead.end();
        match sent {
            Ok(done) => {
                return set(&|s| {
                    s.state = "synced".into();
                    s.bytes = done.transferred_bytes;
                    s.guest = Some(telvirt_model::api::GuestStream {
                        opened_ms,
                        ..done.clone()
                    });
                    s.error = None;
                });
            }
            // The guest runs on here: the last stream's status says it ended (not where it
            // stood when last polled, which may have been its commit point).
            Err(e) => set(&|s| {
                fail(s, e.to_string());
                if let Some(g) = s.guest.as_mut() {
                    g.status = "failed".into();
                }
            }),
        }
        tokio::time::sleep(GUEST_RETRY).await;
    }
}

/// Connects to the destination at `address` and opens `vnf`'s guest stream as the active of
/// `epoch`; once acknowledged, the connection is the stream's (a blocking socket), with the
/// key it is sealed with when the stream is.
async fn open_guest_stream(
    to: &GuestTo,
    epoch: u64,
) -> Result<(OwnedFd, Option<StreamSecret>), String> {
    let (vnf, address) = (&to.vnf, to.peer.address.as_str());
    let opened = async {
        let mut conn = Link::open(to.source, address, &to.peer.key).await?;
        let header = Header {
            vnf: vnf.clone(),
            kind: if to.encrypts {
                KIND_GUEST_SEALED
            } else {
                KIND_GUEST
            },
            seq: 1,
            epoch,
            silence: FIRST_SILENCE,
        };
        conn.send(&header, &[]).await?;
        let ack = conn.read_ack().await?;
        let secret = to.encrypts.then(|| guest_secret(&conn.key, conn.place(0)));
        Ok::<_, std::io::Error>((conn.stream, ack, secret))
    };
    let (conn, ack, secret) = match tokio::time::timeout(IO_TIMEOUT, opened).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return Err(format!("opening the guest stream to {address}: {e}")),
        Err(_) => return Err(format!("opening the guest stream to {address} timed out")),
    };
    if ack.status != ACK_OK {
        return Err(format!(
            "the destination refused the guest stream: {}",
            ack.message
        ));
    }
    guest_socket(conn, StreamEnd::Source)
        .map(|fd| (fd, secret))
        .map_err(|e| format!("the guest stream's socket: {e}"))
}

/// Where and as what one VNF's maps are sent.
struct SendTo {
    vnf: Name,
    address: String,
    /// The stream's key: every batch is tagged with the one it holds when the batch goes.
    key: tokio::sync::watch::Receiver<PairKey>,
    epoch: u64,
    detection: Detection,
    /// The instance's gate: kept open by acknowledgements, closed by a stale answer.
    gate: Option<Arc<ForwardGate>>,
    /// A handed-off stream ends once nothing queued waits.
    finish: Arc<AtomicBool>,
    /// Ends a wait between batches early.
    wake: Arc<tokio::sync::Notify>,
    source: Option<IpAddr>,
}

/// How long a replication connection may go without its peer's kernel answering (data
/// unacknowledged, or keepalive probes of an idle connection unanswered) before it ends.
pub const DEAD_PEER_AFTER: Duration = Duration::from_secs(20);

/// Has the kernel end `stream` once its peer is gone without a word (its host lost power, a
/// link cut): keepalive probes after 5 s idle, every 3 s, and [`DEAD_PEER_AFTER`] without an
/// answer ends it. Otherwise a sender with nothing in flight, or a standby waiting for the
/// next batch of a silent active, waits for good (a slot of the listener held with it).
fn notice_dead_peer(stream: &TcpStream) {
    let socket = socket2::SockRef::from(stream);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(5))
        .with_interval(Duration::from_secs(3))
        .with_retries(4);
    let set = socket
        .set_tcp_keepalive(&keepalive)
        .and_then(|()| socket.set_tcp_user_timeout(Some(DEAD_PEER_AFTER)));
    if let Err(e) = set {
        tracing::warn!("replication connection: a dead peer may go unnoticed: {e}");
    }
}

/// A connection to `address` (`IP:PORT`) from `source` (any port; the kernel's choice of
/// address when `None`).
async fn connect_from(source: Option<IpAddr>, address: &str) -> std::io::Result<TcpStream> {
    let to: SocketAddr = address
        .parse()
        .map_err(|e| std::io::Error::other(format!("{address} is not IP:PORT: {e}")))?;
    let socket = match to {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    if let Some(ip) = source {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    socket.connect(to).await
}

/// What [`Replicas::on_state_change`] calls.
pub type StateChanged = Box<dyn Fn(&Name) + Send + Sync>;

/// Sends `to.vnf`'s maps to the standby at `to.address` every interval until aborted: a full
/// snapshot first (and whenever the standby asks), then the update log.
async fn send_loop(to: SendTo, state: Arc<dyn ReplicaState>, status: StreamStatus) {
    let SendTo {
        vnf,
        address,
        key,
        epoch,
        detection,
        gate,
        finish,
        wake,
        source,
    } = &to;
    // Acknowledgements keep the instance forwarding for half the standby's silence: a standby
    // that stopped hearing it has the instance's gate closed (unless its lease holds) before
    // it says so.
    let window = detection.silence() / 2;
    let set = |f: &dyn Fn(&mut ReplicationStatus)| status.set(f);
    let mut stream: Option<Link> = None;
    let mut full = true;
    let mut seq = 0u64;
    // The instance froze for its move and its last updates were acknowledged: from then on
    // only the packets it queues go (a keepalive when none wait).
    let mut handed_off = false;
    // The last batch was acknowledged: a frozen instance's next one goes at once.
    let mut acked = false;
    // Full snapshots sent (or taken) in a row that were not taken: the next waits longer.
    let mut fulls_not_taken = 0u32;
    // The key as this loop last took it: a new one is taken on the connection held.
    let mut key = key.clone();
    loop {
        if key.has_changed().unwrap_or(false)
            && let Some(conn) = stream.as_mut()
        {
            conn.key = tag_key(&key.borrow_and_update());
        }
        if stream.is_none() {
            let key = key.borrow_and_update().clone();
            match tokio::time::timeout(IO_TIMEOUT, Link::open(*source, address, &key)).await {
                Ok(Ok(s)) => {
                    stream = Some(s);
                    // A handed-off stream only passes packets on (the receiver takes them at
                    // any epoch); any other starts over with a snapshot.
                    full = !handed_off;
                }
                Ok(Err(e)) => set(&|s| fail(s, format!("connecting to {address}: {e}"))),
                Err(_) => set(&|s| fail(s, format!("connecting to {address} timed out"))),
            }
        }
        let frozen_since = state.frozen_since(vnf);
        let frozen = frozen_since.is_some();
        let mut header = Header {
            vnf: vnf.clone(),
            kind: KIND_PACKETS,
            seq: seq + 1,
            epoch: *epoch,
            silence: detection.silence(),
        };
        if let Some(conn) = stream.as_mut()
            && handed_off
            && !full
        {
            // Read before the pass: a frame queued before the instance was told it is going
            // is then seen by this pass or a later one, never left behind by the return.
            let finishing = finish.load(Ordering::Acquire);
            let pause = match pass_packets(&state, conn, header).await {
                // Nothing waited: a handed-off instance that is going has passed on all.
                Ok(()) if finishing => return,
                Ok(()) => {
                    seq += 1;
                    FROZEN_INTERVAL
                }
                Err(SendError::Io(e)) => {
                    set(&|s| s.error = Some(e.clone()));
                    stream = None;
                    detection.interval
                }
                Err(SendError::Take(e)) => {
                    seq += 1;
                    set(&|s| s.error = Some(e.clone()));
                    detection.interval
                }
                Err(SendError::Passed(n)) => {
                    seq += 1;
                    set(&|s| s.packets_passed += n);
                    FROZEN_INTERVAL
                }
            };
            tokio::time::sleep(pause).await;
            continue;
        }
        if let Some(conn) = stream.as_mut() {
            // Not logging (an upgrade restarted its maps): a snapshot, not a failed log take.
            if !full && state.logging(vnf) == Some(false) {
                full = true;
            }
            header.kind = if full { KIND_SNAPSHOT } else { KIND_LOG };
            let slow = |why: String| set(&|s| fail(s, why.clone()));
            let sending_full = full;
            let sent = send_one(&state, conn, header, frozen, &slow).await;
            let taken = matches!(&sent, Ok((ack, _, _)) if ack.status == ACK_OK);
            fulls_not_taken = match (taken, sending_full) {
                (true, _) => 0,
                (false, true) => fulls_not_taken.saturating_add(1),
                (false, false) => fulls_not_taken,
            };
            match sent {
                // The instance could not give a batch (e.g. its update log overflowed): a full
                // snapshot next, on the same connection (closing it would tell the standby its
                // active is lost).
                Err(SendError::Take(e)) => {
                    set(&|s| fail(s, e.clone()));
                    full = true;
                }
                Ok((ack, sent_bytes, (taken, ready))) => {
                    seq += 1;
                    if ack.status == ACK_OK
                        && let Some(g) = gate
                    {
                        g.acknowledged(window);
                    }
                    // A stale answer fences the instance only when its sender holds the stream's
                    // key (anyone could claim an epoch; the lease closes the gate otherwise).
                    if ack.status == ACK_STALE
                        && ack.tagged
                        && let Some(g) = gate
                        && g.fence_below(ack.epoch)
                    {
                        tracing::warn!(vnf = %vnf, "fenced: {}", ack.message);
                    }
                    // Taken after the freeze: the last updates are there.
                    let now_handed_off = !handed_off && frozen && ack.status == ACK_OK;
                    handed_off |= now_handed_off;
                    acked = ack.status == ACK_OK;
                    let phases = frozen_since
                        .filter(|_| now_handed_off)
                        .map(|at| freeze_phases(at, taken, ready, Instant::now()));
                    let frozen_us = phases.map(|p| p.total_us());
                    if let Some(p) = phases {
                        tracing::info!(vnf = %vnf, frozen_us = p.total_us(), until_batch_us = p.until_batch_us, take_us = p.take_us, exchange_us = p.exchange_us, "handed off: the destination acknowledged the last updates");
                    }
                    match ack.status {
                        ACK_OK => set(&|s| {
                            s.state = if handed_off { "handed-off" } else { "synced" }.into();
                            if frozen_us.is_some() {
                                s.frozen_us = frozen_us;
                                s.freeze_phases = phases;
                            }
                            s.lag_us =
                                u64::try_from(taken.elapsed().as_micros()).unwrap_or(u64::MAX);
                            s.updates += ack.updates;
                            s.bytes += sent_bytes;
                            s.snapshots += u64::from(full);
                            s.error = None;
                        }),
                        ACK_STALE if ack.tagged => set(&|s| {
                            s.state = "fenced".into();
                            s.error = Some(ack.message.clone());
                        }),
                        ACK_STALE => set(&|s| {
                            s.state = "resyncing".into();
                            s.error = Some(format!(
                                "an answer without the stream's tag says: {} (not taken)",
                                ack.message
                            ));
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
                Err(SendError::Passed(_)) => {}
            }
        }
        let pause = if frozen && acked {
            FROZEN_INTERVAL
        } else if frozen {
            detection.interval
        } else {
            full_retry_pause(detection.interval, fulls_not_taken)
        };
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = wake.notified() => {}
        }
    }
}

/// Longest wait before a full snapshot goes again after the ones before were not taken.
const FULL_RETRY_MAX: Duration = Duration::from_secs(2);

/// The wait before the next batch after `not_taken` full snapshots in a row were not taken
/// (refused, unanswered, or too large to send): the pair's `interval` until the second, then
/// doubling up to [`FULL_RETRY_MAX`]. A standby that is not ready yet, or a state too large,
/// would otherwise cost a whole snapshot of the maps every interval.
fn full_retry_pause(interval: Duration, not_taken: u32) -> Duration {
    match not_taken {
        0 | 1 => interval,
        n => interval
            .saturating_mul(1 << (n - 1).min(16))
            .min(FULL_RETRY_MAX)
            .max(interval),
    }
}

/// Sends the packets the frozen instance queued (a keepalive when none wait); `Passed(n)`
/// when the destination took `n` of them.
async fn pass_packets(
    state: &Arc<dyn ReplicaState>,
    conn: &mut Link,
    mut header: Header,
) -> Result<(), SendError> {
    let (st, name) = (Arc::clone(state), header.vnf.clone());
    let taken = tokio::task::spawn_blocking(move || st.take_packets(&name, PACKET_BATCH_BYTES))
        .await
        .map_err(|e| SendError::Take(format!("taking queued packets failed: {e}")))?;
    let (bytes, n) = taken.unwrap_or_default();
    if n == 0 {
        header.kind = KIND_KEEPALIVE;
    }
    let ack = exchange(conn, &header, &bytes, &|_| {}).await?;
    match (n, ack.status) {
        (0, _) => Ok(()),
        (_, ACK_OK) => {
            if ack.updates < n {
                tracing::warn!(vnf = %header.vnf, dropped = n - ack.updates, "the destination's queue took only part of the packets handed over");
            }
            // Passed on: what the destination's queue could not take it counts as its own
            // node's drops.
            state.packets_passed(&header.vnf, n);
            Err(SendError::Passed(n))
        }
        _ => {
            tracing::warn!(vnf = %header.vnf, packets = n, "the destination refused the packets handed over: {}", ack.message);
            Err(SendError::Take(format!(
                "the destination refused {n} queued packets: {}",
                ack.message
            )))
        }
    }
}

fn fail(s: &mut ReplicationStatus, why: String) {
    s.state = "failing".into();
    s.error = Some(why);
}

/// A guest stream that could not be opened. `undone_at`: this agent's adoption of the guest
/// ended the stream the agent before it left without moving the guest (the guest runs here),
/// no stream of this agent went since, and this try was at that time: said as a stream
/// `failed` then, later than any stream before the restart, a move that stream committed
/// becomes one that may be cancelled again, instead of waiting for a destination that will not
/// run.
fn open_failed(s: &mut ReplicationStatus, why: String, undone_at: Option<u64>) {
    fail(s, why);
    if let Some(attempt_ms) = undone_at {
        s.guest = Some(telvirt_model::api::GuestStream {
            status: "failed".into(),
            opened_ms: attempt_ms,
            ..Default::default()
        });
    }
}

/// Why one batch did not go (or, for queued packets, how many went).
enum SendError {
    /// The instance gave no batch; the connection is fine.
    Take(String),
    /// The connection failed: it is dropped.
    Io(String),
    /// The destination took this many of the packets handed over.
    Passed(u64),
}

/// Takes one batch off the active instance and sends it with `header` (a snapshot when its
/// kind says so; a keepalive when nothing changed), telling `slow` while the acknowledgement
/// keeps it waiting. Returns the acknowledgement, the bytes sent and when the batch was taken.
async fn send_one(
    state: &Arc<dyn ReplicaState>,
    conn: &mut Link,
    mut header: Header,
    frozen: bool,
    slow: &(dyn Fn(String) + Sync),
) -> Result<(Ack, u64, (Instant, Instant)), SendError> {
    let taken = Instant::now();
    let full = header.kind == KIND_SNAPSHOT;
    // A frozen instance's last log holds what changed since the previous batch, and no batch
    // of it contends for its maps: taken here when small and free, not behind a blocking
    // thread's wake-up.
    let at_once = (frozen && !full)
        .then(|| state.take_log_at_once(&header.vnf, TAKE_INLINE_UPDATES))
        .flatten();
    let batch = match at_once {
        Some(batch) => batch,
        None => {
            let (st, name) = (Arc::clone(state), header.vnf.clone());
            tokio::task::spawn_blocking(move || st.take(&name, full))
                .await
                .map_err(|e| SendError::Take(format!("taking a batch failed: {e}")))?
        }
    };
    let bytes = match batch {
        Ok(Some(bytes)) => bytes,
        Ok(None) => {
            header.kind = KIND_KEEPALIVE;
            Vec::new()
        }
        Err(e) => return Err(SendError::Take(format!("taking a batch: {e}"))),
    };
    if bytes.len() > MAX_BATCH_BYTES as usize {
        return Err(SendError::Take(format!(
            "a batch of {} bytes is more than the {} MiB a standby takes: its state cannot be replicated",
            bytes.len(),
            MAX_BATCH_BYTES >> 20
        )));
    }
    let sent = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
    let ready = Instant::now();
    let ack = exchange(conn, &header, &bytes, slow).await?;
    Ok((ack, sent, (taken, ready)))
}

/// Where a freeze from `frozen` went, the last batch begun at `taken`, ready to send at
/// `ready` and acknowledged at `acked`: the phases add up to the whole freeze (a batch begun
/// before the freeze, which cannot be its last, counts from the freeze).
fn freeze_phases(frozen: Instant, taken: Instant, ready: Instant, acked: Instant) -> FreezePhases {
    let us = |from: Instant, to: Instant| {
        u64::try_from(to.saturating_duration_since(from).as_micros()).unwrap_or(u64::MAX)
    };
    let (taken, ready) = (taken.max(frozen), ready.max(frozen));
    FreezePhases {
        until_batch_us: us(frozen, taken),
        take_us: us(taken, ready),
        exchange_us: us(ready, acked),
    }
}

/// Sends one batch and reads its acknowledgement, telling `slow` while it keeps waiting.
async fn exchange(
    conn: &mut Link,
    header: &Header,
    bytes: &[u8],
    slow: &(dyn Fn(String) + Sync),
) -> Result<Ack, SendError> {
    let seq = header.seq;
    let exchange = async {
        conn.send(header, bytes).await?;
        conn.read_ack().await
    };
    tokio::pin!(exchange);
    // A slow standby (or a cut path) is waited for on the same connection: an active closes
    // it only when it stops being one or its process dies, so a close is proof to the standby.
    let ack = loop {
        match tokio::time::timeout(IO_TIMEOUT, &mut exchange).await {
            Ok(r) => break r.map_err(|e| SendError::Io(format!("sending to the standby: {e}")))?,
            Err(_) => slow(format!(
                "the standby has not acknowledged batch {seq} for {} s",
                IO_TIMEOUT.as_secs()
            )),
        }
    };
    if ack.seq != seq {
        return Err(SendError::Io(format!(
            "the standby acknowledged batch {} for batch {seq}",
            ack.seq
        )));
    }
    Ok(ack)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn a_freezes_phases_make_it_up_from_the_freeze_on() {
        let frozen = Instant::now();
        let at = |us| frozen + Duration::from_micros(us);
        let p = freeze_phases(frozen, at(400), at(410), at(650));
        assert_eq!((p.until_batch_us, p.take_us, p.exchange_us), (400, 10, 240));
        assert_eq!(p.total_us(), 650);
        // A batch begun before the freeze counts from it.
        let early = freeze_phases(at(100), frozen, at(150), at(300));
        assert_eq!(
            (early.until_batch_us, early.take_us, early.exchange_us),
            (0, 50, 150)
        );
    }

    #[test]
    fn a_stream_reports_the_move_it_serves() {
        let peer = StandbyPeer {
            host: "h3".into(),
            address: "127.0.0.1:9".into(),
            move_id: 7,
            key: test_key(),
        };
        let status = StreamStatus::new(
            &"u1".parse().unwrap(),
            &peer,
            "streaming",
            &Arc::new(OnceLock::new()),
        );
        let read = status.read();
        assert_eq!((read.standby_host.as_str(), read.move_id), ("h3", 7));
    }

    #[test]
    fn a_stream_is_near_its_final_copy_within_its_pause_limit_and_a_lead_at_its_rate() {
        // 100 MiB in 1 s: 100 MiB/s; twice a 10 ms limit and the 50 ms lead: 7 MiB.
        let at = |remaining: u64, status: &str| telvirt_model::api::GuestStream {
            status: status.into(),
            total_ms: 1000,
            transferred_bytes: 100 << 20,
            remaining_bytes: remaining,
            downtime_limit_ms: 10,
            ..Default::default()
        };
        assert!(near_final_copy(&at(7 << 20, "active"), None));
        assert!(!near_final_copy(&at((7 << 20) + (1 << 20), "active"), None));
        // Only while QEMU streams, and once it has a rate.
        assert!(!near_final_copy(&at(1 << 20, "setup"), None));
        assert!(!near_final_copy(&at(0, "pre-switchover"), None));
        assert!(!near_final_copy(
            &telvirt_model::api::GuestStream {
                transferred_bytes: 0,
                ..at(0, "active")
            },
            None
        ));
        // A long pause limit commits at the final copy.
        assert!(!near_final_copy(
            &telvirt_model::api::GuestStream {
                downtime_limit_ms: 300,
                ..at(0, "active")
            },
            None
        ));
        // What is left fell by 92 MiB in the last 20 ms (pages of zeros): at that rate the
        // 20 MiB left go within the lead, though at the average rate they would not.
        let after_zeros = at(20 << 20, "active");
        let before = telvirt_model::api::GuestStream {
            total_ms: 980,
            remaining_bytes: 112 << 20,
            ..after_zeros.clone()
        };
        assert!(!near_final_copy(&after_zeros, None));
        assert!(near_final_copy(
            &after_zeros,
            Some((before.total_ms, before.remaining_bytes))
        ));
        // A count that grew (the guest dirtied more), or a sample from no later, adds nothing.
        let grew = telvirt_model::api::GuestStream {
            remaining_bytes: 10 << 20,
            ..before.clone()
        };
        assert!(!near_final_copy(
            &after_zeros,
            Some((grew.total_ms, grew.remaining_bytes))
        ));
        let same_time = telvirt_model::api::GuestStream {
            total_ms: 1000,
            ..before
        };
        assert!(!near_final_copy(
            &after_zeros,
            Some((same_time.total_ms, same_time.remaining_bytes))
        ));
    }

    /// A commit asked ahead, answered `answer` (never, for `None`), and what the final copy
    /// and the limit then do: (the final copy's answer, whether the stream was cancelled).
    async fn ahead(answer: Option<bool>, reach: bool, end: bool) -> (Option<bool>, bool) {
        let ahead = CommitAhead::new();
        let cancelled = Arc::new(AtomicBool::new(false));
        let (c, g) = (Arc::clone(&cancelled), Arc::new(AtomicBool::new(false)));
        let ask: BoxFuture<bool> = match answer {
            Some(a) => Box::pin(async move { a }),
            None => Box::pin(std::future::pending()),
        };
        let gave_up = Arc::clone(&g);
        assert!(ahead.ask(
            ask,
            move || Box::pin(async move { c.store(true, Ordering::Release) }),
            move || gave_up.store(true, Ordering::Release),
        ));
        // Asked once per stream.
        assert!(!ahead.ask(Box::pin(async { true }), || Box::pin(async {}), || {}));
        tokio::task::yield_now().await;
        if end {
            ahead.end();
        }
        let at_final = if reach {
            ahead.answer_at_final_copy(COMMIT_AHEAD_ANSWER_WITHIN).await
        } else {
            None
        };
        tokio::time::sleep(COMMIT_AHEAD_WITHIN + Duration::from_millis(1)).await;
        let cancelled = cancelled.load(Ordering::Acquire);
        assert_eq!(cancelled, g.load(Ordering::Acquire));
        if cancelled {
            // A final copy after the limit gave up does not go, and reports no longer ask.
            assert_eq!(
                ahead.answer_at_final_copy(COMMIT_AHEAD_ANSWER_WITHIN).await,
                Some(false)
            );
            assert!(!ahead.wants_commit());
        }
        (at_final, cancelled)
    }

    #[tokio::test(start_paused = true)]
    async fn a_commit_asked_ahead_answers_the_final_copy_and_cancels_a_stream_that_never_gets_there()
     {
        // Answered yes: the final copy goes at once; yes and no final copy in time: cancelled.
        assert_eq!(ahead(Some(true), true, false).await, (Some(true), false));
        assert_eq!(ahead(Some(true), false, false).await, (None, true));
        // A stream that ended otherwise (failed, completed) is not cancelled later.
        assert_eq!(ahead(Some(true), false, true).await, (None, false));
        // No: the final copy does not go, nothing is cancelled by the limit, and the stream's
        // reports no longer ask (they would commit the move at the controller).
        assert_eq!(ahead(Some(false), true, false).await, (Some(false), false));
        let refused = CommitAhead::new();
        refused.ask(Box::pin(async { false }), || Box::pin(async {}), || {});
        assert!(refused.wants_commit(), "asked, not yet answered");
        tokio::task::yield_now().await;
        assert!(!refused.wants_commit());
        // No answer by the time the final copy waits out its limit: it does not go.
        assert_eq!(ahead(None, true, false).await, (Some(false), false));
        // Not asked ahead: the final copy asks itself.
        let fresh = CommitAhead::new();
        assert_eq!(
            fresh.answer_at_final_copy(COMMIT_AHEAD_ANSWER_WITHIN).await,
            None
        );
    }

    /// A restarted source whose adoption undid the stream its agent left says its first failed
    /// try as a failed stream opened then, which the controller orders after the stream that
    /// committed the move (so the move may be cancelled: `telvirt-controller --lib
    /// a_committed_move`); later tries keep it; otherwise no stream is said.
    #[test]
    fn a_restarted_source_that_cannot_open_a_stream_says_its_guest_stream_failed() {
        let mut fresh = ReplicationStatus::default();
        open_failed(&mut fresh, "refused".into(), Some(1_000));
        assert_eq!(fresh.state, "failing");
        let g = fresh.guest.clone().unwrap();
        assert_eq!((g.status.as_str(), g.opened_ms), ("failed", 1_000));
        // A later try keeps the first one's time.
        open_failed(&mut fresh, "refused again".into(), None);
        assert_eq!(fresh.guest.as_ref().unwrap().opened_ms, 1_000);
        assert_eq!(fresh.error.as_deref(), Some("refused again"));
        // No stream undone by the adoption (the guest moved, its stream still runs, or the
        // destination is not ready yet on a first move): no stream is said.
        let mut moved = ReplicationStatus::default();
        open_failed(&mut moved, "refused".into(), None);
        assert_eq!(
            (moved.state.as_str(), moved.guest.is_none()),
            ("failing", true)
        );
    }

    /// A state of named counters: the "maps" are one u64 per VNF; a log carries the new value.
    /// Frozen, it gives the bytes of `queued` as packets of one byte each; `handed` gets the
    /// packets handed in.
    #[derive(Default)]
    struct Counters {
        values: Mutex<HashMap<String, (u64, bool)>>,
        frozen: Mutex<Option<Instant>>,
        queued: Mutex<Vec<u8>>,
        handed: Mutex<Vec<u8>>,
        /// No update log (as after a module upgrade) until the next full take.
        not_logging: AtomicBool,
        /// Log takes refused for want of a log.
        refused_log_takes: AtomicU64,
    }

    impl Counters {
        /// A state holding `vnf` at `value`, changed since the last batch.
        fn holding(vnf: &str, value: u64) -> Arc<Self> {
            let c = Arc::new(Self::default());
            c.values.lock().unwrap().insert(vnf.into(), (value, true));
            c
        }
    }

    impl ReplicaState for Counters {
        fn take(&self, vnf: &Name, full: bool) -> Result<Option<Vec<u8>>, String> {
            if full {
                self.not_logging.store(false, Ordering::SeqCst);
            } else if self.not_logging.load(Ordering::SeqCst) {
                self.refused_log_takes.fetch_add(1, Ordering::SeqCst);
                return Err("no update log: take a snapshot first to start logging".into());
            }
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

        fn frozen_since(&self, _vnf: &Name) -> Option<Instant> {
            *self.frozen.lock().unwrap()
        }

        fn logging(&self, _vnf: &Name) -> Option<bool> {
            Some(!self.not_logging.load(Ordering::SeqCst))
        }

        fn take_packets(&self, _vnf: &Name, max_bytes: usize) -> Option<(Vec<u8>, u64)> {
            let mut q = self.queued.lock().unwrap();
            let n = q.len().min(max_bytes);
            (n > 0).then(|| (q.drain(..n).collect(), n as u64))
        }

        fn hand_in(&self, _vnf: &Name, bytes: &[u8]) -> Result<u64, String> {
            self.handed.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len() as u64)
        }
    }

    /// A host holding the roles in `roles` (the standby of `nat1` at epoch 0 unless told
    /// otherwise), noting what its standbys hear.
    struct Standbys {
        roles: Mutex<HashMap<String, (Role, u64)>>,
        heard: Mutex<Vec<(String, Option<ActiveLost>)>>,
        /// The only address state may come from (`None`: any), with [`test_key`].
        active_from: Mutex<Option<IpAddr>>,
        /// The stream's key when not [`test_key`].
        key: Mutex<Option<PairKey>>,
    }

    /// The key of every stream in these tests.
    fn test_key() -> PairKey {
        PairKey::new([5; PairKey::LEN])
    }

    /// A pair's standby on host h2 at `address`, its stream tagged with `key`.
    fn standby_at(address: String, key: PairKey) -> StandbyPeer {
        StandbyPeer {
            host: "h2".into(),
            address,
            move_id: 0,
            key,
        }
    }

    impl Default for Standbys {
        fn default() -> Self {
            Self {
                roles: Mutex::new(HashMap::from([("nat1".into(), (Role::Standby, 0))])),
                heard: Mutex::new(Vec::new()),
                active_from: Mutex::new(None),
                key: Mutex::new(None),
            }
        }
    }

    impl Standbys {
        /// The losses it was told of.
        fn lost(&self) -> Vec<(String, ActiveLost)> {
            self.heard
                .lock()
                .unwrap()
                .iter()
                .filter_map(|(v, l)| l.clone().map(|l| (v.clone(), l)))
                .collect()
        }
    }

    #[async_trait::async_trait]
    impl StandbyHost for Standbys {
        fn role(&self, vnf: &Name) -> Option<(Role, u64)> {
            self.roles.lock().unwrap().get(vnf.as_str()).copied()
        }

        fn active_key(&self, _vnf: &Name, peer: IpAddr) -> Result<PairKey, String> {
            match *self.active_from.lock().unwrap() {
                Some(ip) if ip != peer => Err(format!("only from {ip}, not from {peer}")),
                _ => Ok(self.key.lock().unwrap().clone().unwrap_or_else(test_key)),
            }
        }

        fn hearing(&self, vnf: &Name, lost: Option<ActiveLost>) {
            let mut heard = self.heard.lock().unwrap();
            // Changes only, as the agent acts on them.
            let last = heard.iter().rev().find(|(v, _)| v == vnf.as_str());
            if last.map(|(_, l)| l) != Some(&lost) && (last.is_some() || lost.is_some()) {
                heard.push((vnf.to_string(), lost));
            }
        }
    }

    /// Detection for tests: 5 ms batches, lost after 2 s of silence (a machine busy compiling
    /// on both cores delayed a batch by more than 200 ms; a test that stays idle for two
    /// silences must not see a stall of one as a loss).
    const TEST_DETECTION: Detection = Detection {
        interval: Duration::from_millis(5),
        multiplier: 400,
    };

    async fn standby_host(host: Arc<Standbys>) -> (String, Arc<Counters>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let standby = Arc::new(Counters::default());
        tokio::spawn(serve_standbys(Arc::new(listener), standby.clone(), host));
        (address, standby)
    }

    async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Active and standby states of `nat1` (held at 7 by the active), the standby served on
    /// a host of `host`'s roles, and its maps streaming there: the replicas, the two states,
    /// the VNF's name and the standby's peer.
    async fn replicating_nat1(
        host: &Arc<Standbys>,
    ) -> (Replicas, Arc<Counters>, Arc<Counters>, Name, StandbyPeer) {
        let (address, standby) = standby_host(host.clone()).await;
        let active = Counters::holding("nat1", 7);
        let replicas = Replicas::new(active.clone(), TEST_DETECTION);
        let nat1: Name = "nat1".parse().unwrap();
        let peer = standby_at(address, test_key());
        replicas.ensure(&nat1, &peer, 0);
        (replicas, active, standby, nat1, peer)
    }

    /// A sender whose batches this host refuses (here: under a key it does not hold yet) is
    /// silent all the same once its silence ran out since the last batch taken: refused
    /// batches are not its active heard (they would hide a lost active from its controller).
    /// It is heard again once a batch is taken.
    #[tokio::test]
    async fn batches_refused_count_as_silence() {
        let host = Arc::new(Standbys::default());
        let (replicas, active, standby, nat1, peer) = replicating_nat1(&host).await;
        let value = |s: &Counters| s.values.lock().unwrap().get("nat1").map(|v| v.0);
        wait_for("the snapshot", || value(&standby) == Some(7)).await;
        let key = PairKey::new([8; PairKey::LEN]);
        replicas.ensure(
            &nat1,
            &StandbyPeer {
                key: key.clone(),
                ..peer
            },
            0,
        );
        wait_for("silence while refused batches arrive", || {
            host.lost()
                .iter()
                .any(|(v, l)| v == "nat1" && !l.closed && l.why.contains("no batch taken"))
        })
        .await;
        *host.key.lock().unwrap() = Some(key);
        active
            .values
            .lock()
            .unwrap()
            .insert("nat1".into(), (9, true));
        wait_for("a batch taken again", || value(&standby) == Some(9)).await;
        let last_word = || {
            let heard = host.heard.lock().unwrap();
            heard
                .iter()
                .rev()
                .find(|(v, _)| v == "nat1")
                .map(|(_, l)| l.is_none())
        };
        wait_for("heard again", || last_word() == Some(true)).await;
    }

    /// A stream whose key changes (the cluster's secret rotated) takes the new one on the
    /// connection it holds: the standby's host never sees that connection close (which it
    /// would take for proof that its active is gone), and batches are taken again once both
    /// ends hold the new key.
    #[tokio::test]
    async fn a_new_key_is_taken_on_the_connection_the_stream_holds() {
        let host = Arc::new(Standbys::default());
        let (replicas, active, standby, nat1, peer) = replicating_nat1(&host).await;
        let value = |s: &Counters| s.values.lock().unwrap().get("nat1").map(|v| v.0);
        wait_for("the snapshot", || value(&standby) == Some(7)).await;
        let key = PairKey::new([8; PairKey::LEN]);
        *host.key.lock().unwrap() = Some(key.clone());
        replicas.ensure(&nat1, &StandbyPeer { key, ..peer }, 0);
        active
            .values
            .lock()
            .unwrap()
            .insert("nat1".into(), (9, true));
        wait_for("an update under the new key", || value(&standby) == Some(9)).await;
        wait_for("synced", || {
            replicas.status(&nat1).unwrap().state == "synced"
        })
        .await;
        let lost = host.lost();
        assert!(lost.iter().all(|(_, l)| !l.closed), "{lost:?}");
    }

    /// An active whose update log stopped (a new version of its module reshaped its maps)
    /// sends a snapshot next, without a failed log take on the way.
    #[tokio::test]
    async fn an_active_without_an_update_log_sends_a_snapshot_not_a_failure() {
        let host = Arc::new(Standbys::default());
        let (_replicas, active, standby, _nat1, _peer) = replicating_nat1(&host).await;
        let value = |s: &Counters| s.values.lock().unwrap().get("nat1").map(|v| v.0);
        wait_for("the snapshot", || value(&standby) == Some(7)).await;
        {
            let mut values = active.values.lock().unwrap();
            active.not_logging.store(true, Ordering::SeqCst);
            values.insert("nat1".into(), (11, true));
        }
        wait_for("the state after the upgrade", || {
            value(&standby) == Some(11)
        })
        .await;
        assert_eq!(active.refused_log_takes.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn batches_reach_the_standby_in_order_and_other_vnfs_are_refused() {
        let host = Arc::new(Standbys::default());
        let (replicas, active, standby, nat1, peer) = replicating_nat1(&host).await;
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
        // The standby applies before it answers, and the active counts on the answer: the
        // status catches up a moment after the value arrived.
        wait_for("the update's acknowledgement never counted", || {
            replicas.status(&nat1).is_some_and(|s| s.updates >= 2)
        })
        .await;
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
        replicas.ensure(&fw9, &peer, 0);
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
        tokio::time::sleep(TEST_DETECTION.silence() * 2).await;
        assert!(host.lost().is_empty(), "{:?}", host.heard.lock().unwrap());
        assert_eq!(replicas.status(&nat1).unwrap().state, "synced");

        // The active's side goes (its process died, say): its standby hears at once, and only
        // of the VNF it stands by for.
        replicas.stop(&nat1);
        replicas.stop(&fw9);
        assert!(replicas.status(&nat1).is_none());
        wait_for("the standby never noticed", || !host.lost().is_empty()).await;
        let lost = host.lost();
        assert_eq!(lost.len(), 1, "{lost:?}");
        assert_eq!(lost[0].0, "nat1");
        // Closed either way: a FIN, or a reset when the active's socket closed with an
        // acknowledgement still unread.
        assert!(
            lost[0].1.closed
                && (lost[0].1.why.contains("closed the replication connection")
                    || lost[0].1.why.contains("reset by peer")),
            "{lost:?}"
        );
    }

    #[tokio::test]
    async fn a_frozen_active_hands_over_its_last_update_then_what_it_queues_until_it_finishes() {
        let host = Arc::new(Standbys::default());
        let (replicas, active, standby, nat1, _) = replicating_nat1(&host).await;
        let state = || replicas.status(&nat1).unwrap();
        wait_for("synced", || state().state == "synced").await;

        // Frozen with a last change and three packets queued: the change goes first, and the
        // stream says handed-off only once it was acknowledged.
        active
            .values
            .lock()
            .unwrap()
            .insert("nat1".into(), (9, true));
        active.queued.lock().unwrap().extend([1, 2, 3]);
        let froze = Instant::now();
        *active.frozen.lock().unwrap() = Some(froze);
        wait_for("handed-off", || state().state == "handed-off").await;
        // The freeze lasted from the instance's freeze to that acknowledgement.
        let frozen_us = state()
            .frozen_us
            .expect("a handed-off stream says how long");
        assert!(
            frozen_us > 0 && u128::from(frozen_us) <= froze.elapsed().as_micros(),
            "{frozen_us} µs"
        );
        let value = |s: &Counters| s.values.lock().unwrap().get("nat1").map(|v| v.0);
        assert_eq!(value(&standby), Some(9), "the last update is there");
        wait_for("the queued packets handed in", || {
            *standby.handed.lock().unwrap() == [1, 2, 3]
        })
        .await;

        // The switch: the standby's host holds the VNF as its active at a higher epoch. What
        // still arrives at the frozen source (sent before its senders rewired) follows.
        host.roles
            .lock()
            .unwrap()
            .insert("nat1".into(), (Role::Active, 1));
        active.queued.lock().unwrap().push(4);
        wait_for("the straggler handed in", || {
            *standby.handed.lock().unwrap() == [1, 2, 3, 4]
        })
        .await;
        assert_eq!(state().state, "handed-off", "stale answers change nothing");
        active.queued.lock().unwrap().push(5);
        assert_eq!(replicas.finish(&nat1, Duration::from_secs(10)).await, 5);
        assert_eq!(*standby.handed.lock().unwrap(), [1, 2, 3, 4, 5]);
        assert!(replicas.status(&nat1).is_none(), "the stream ended");
    }

    #[tokio::test]
    async fn a_freeze_sends_the_last_batch_at_once_not_at_the_next_interval() {
        let host = Arc::new(Standbys::default());
        let (address, _standby) = standby_host(host.clone()).await;
        let active = Counters::holding("nat1", 7);
        // Batches every 15 s (a silence of 45 s, within MAX_SILENCE): the first (the
        // snapshot) goes at once, the next only when woken, well within `wait_for`'s 10 s.
        let slow = Detection {
            interval: Duration::from_secs(15),
            multiplier: 3,
        };
        let replicas = Replicas::new(active.clone(), slow);
        let nat1: Name = "nat1".parse().unwrap();
        let peer = standby_at(address, test_key());
        replicas.ensure(&nat1, &peer, 0);
        let state = || replicas.status(&nat1).unwrap();
        wait_for("synced", || state().state == "synced").await;
        *active.frozen.lock().unwrap() = Some(Instant::now());
        replicas.wake(&nat1);
        wait_for("handed-off well before the next interval", || {
            state().state == "handed-off"
        })
        .await;
    }

    #[tokio::test]
    async fn a_standby_takes_state_only_from_its_actives_address() {
        let host = Arc::new(Standbys::default());
        let active_ip: IpAddr = "127.0.0.3".parse().unwrap();
        *host.active_from.lock().unwrap() = Some(active_ip);
        let (address, standby) = standby_host(host.clone()).await;
        let nat1: Name = "nat1".parse().unwrap();
        let peer = standby_at(address, test_key());
        // From the kernel's choice of address (127.0.0.1): refused, nothing applied.
        let stranger = Replicas::new(Counters::holding("nat1", 7), TEST_DETECTION);
        stranger.ensure(&nat1, &peer, 0);
        wait_for("the refusal", || {
            stranger.status(&nat1).unwrap().error.as_deref()
                == Some("only from 127.0.0.3, not from 127.0.0.1")
        })
        .await;
        stranger.stop(&nat1);
        assert!(standby.values.lock().unwrap().is_empty());
        // From the active's own address: taken.
        let active =
            Replicas::new(Counters::holding("nat1", 7), TEST_DETECTION).with_source(active_ip);
        active.ensure(&nat1, &peer, 0);
        wait_for("synced from the active's address", || {
            active.status(&nat1).unwrap().state == "synced"
        })
        .await;
        assert_eq!(
            standby.values.lock().unwrap().get("nat1").map(|v| v.0),
            Some(7)
        );
    }

    /// A connection to the host at `address` tagging with [`test_key`].
    async fn link(address: &str) -> Link {
        Link::open(None, address, &test_key()).await.unwrap()
    }

    /// A keepalive of `vnf` at `epoch` asking for `silence`.
    fn keepalive_of(vnf: &str, epoch: u64, silence: Duration) -> Header {
        Header {
            vnf: vnf.parse().unwrap(),
            kind: KIND_KEEPALIVE,
            seq: 1,
            epoch,
            silence,
        }
    }

    /// Both ends of a sealed guest stream make the same key from the stream's key and the
    /// opening's place; another connection (another challenge or salt), another stream's key
    /// or another use of the same key makes another.
    #[test]
    fn a_guest_streams_key_is_its_connections_alone() {
        let key = tag_key(&test_key());
        let at = Place {
            nonce: [1; NONCE_BYTES],
            salt: [2; NONCE_BYTES],
            n: 1,
        };
        let secret = guest_secret(&key, at);
        assert_eq!(secret, guest_secret(&tag_key(&test_key()), at));
        for other in [
            Place {
                nonce: [3; NONCE_BYTES],
                ..at
            },
            Place {
                salt: [3; NONCE_BYTES],
                ..at
            },
            Place { n: 2, ..at },
        ] {
            assert_ne!(secret, guest_secret(&key, other), "{other:?}");
        }
        let another = tag_key(&PairKey::new([0x42; 32]));
        assert_ne!(secret, guest_secret(&another, at));
        // Not the key a batch body at the same place would be sealed with.
        let body = tag_context(&key, BODY_LABEL, at, &[]).sign();
        let mut same = [0u8; StreamSecret::LEN];
        same.copy_from_slice(&body.as_ref()[..StreamSecret::LEN]);
        assert_ne!(secret, StreamSecret::new(same));
    }

    /// A stream whose key is not the one the standby's host holds for it is refused on its
    /// first header, from the active's own address: nothing applied, nothing heard.
    #[tokio::test]
    async fn a_stream_without_its_key_is_refused() {
        let host = Arc::new(Standbys::default());
        let (address, standby) = standby_host(host.clone()).await;
        let nat1: Name = "nat1".parse().unwrap();
        let peer = standby_at(address, PairKey::new([6; PairKey::LEN]));
        let stranger = Replicas::new(Counters::holding("nat1", 7), TEST_DETECTION);
        stranger.ensure(&nat1, &peer, 0);
        wait_for("the refusal", || {
            stranger.status(&nat1).unwrap().error.is_some_and(|e| {
                e.contains("is not tagged with the key of nat1's stream into this host")
            })
        })
        .await;
        stranger.stop(&nat1);
        assert!(standby.values.lock().unwrap().is_empty(), "nothing applied");
        assert!(host.heard.lock().unwrap().is_empty(), "nothing heard");
    }

    /// A batch tagged for another connection (its challenge), one whose number on its
    /// connection is not the next (a replay), and one whose body is not the one its tags were
    /// made over are each refused and change nothing; the connection goes on.
    #[tokio::test]
    async fn a_batch_copied_replayed_or_changed_is_refused() {
        let host = Arc::new(Standbys::default());
        let (address, standby) = standby_host(host.clone()).await;
        let snapshot = |seq: u64| Header {
            vnf: "nat1".parse().unwrap(),
            kind: KIND_SNAPSHOT,
            seq,
            epoch: 0,
            silence: Duration::from_secs(5),
        };
        let value = || standby.values.lock().unwrap().get("nat1").map(|v| v.0);
        let other = link(&address).await;
        let mut conn = link(&address).await;
        // Tagged over the other connection's challenge.
        let own = conn.nonce;
        conn.nonce = other.nonce;
        conn.send(&snapshot(1), &9u64.to_le_bytes()).await.unwrap();
        let ack = conn.read_ack().await.unwrap();
        assert_eq!(ack.status, ACK_REFUSED, "{ack:?}");
        assert!(
            ack.message.contains("is not tagged with the key"),
            "{ack:?}"
        );
        conn.nonce = own;
        // Its own: taken.
        conn.send(&snapshot(2), &7u64.to_le_bytes()).await.unwrap();
        assert_eq!(conn.read_ack().await.unwrap().status, ACK_OK);
        assert_eq!(value(), Some(7));
        // The batch before, sent again at its number: a replay.
        conn.sent -= 1;
        conn.send(&snapshot(3), &6u64.to_le_bytes()).await.unwrap();
        let ack = read_ack(&mut conn.stream, None).await.unwrap();
        assert_eq!(ack.status, ACK_REFUSED, "{ack:?}");
        assert!(
            ack.message.contains("is not tagged with the key"),
            "{ack:?}"
        );
        assert_eq!(value(), Some(7));
        conn.sent += 1;
        // Its header tagged right, its body changed on the way (one bit of its ciphertext).
        let head = encode_head(&snapshot(4), 8);
        let at = conn.place(1);
        conn.sent += 1;
        let tag = head_tag(&conn.key, at, &head);
        let mut cipher = BodyCipher::new(&conn.key, at, tag.as_ref()).unwrap();
        let mut body = 5u64.to_le_bytes();
        let seal = cipher.seal(&mut body).unwrap();
        body[0] ^= 1;
        let mut out = head;
        out.extend_from_slice(tag.as_ref());
        out.extend_from_slice(&body);
        out.extend_from_slice(seal.as_ref());
        conn.stream.write_all(&out).await.unwrap();
        let ack = conn.read_ack().await.unwrap();
        assert_eq!(ack.status, ACK_REFUSED, "{ack:?}");
        assert!(
            ack.message.contains("does not open under its tags"),
            "{ack:?}"
        );
        assert_eq!(value(), Some(7), "nothing of them applied");
        // The connection's framing held: the next batch is taken.
        conn.send(&snapshot(5), &8u64.to_le_bytes()).await.unwrap();
        assert_eq!(conn.read_ack().await.unwrap().status, ACK_OK);
        assert_eq!(value(), Some(8));
    }

    /// A batch's body crosses the wire encrypted: what a listener on the path reads holds none
    /// of it (600 KiB of a repeated session line: three pieces), yet the stream's receiver
    /// opens it whole; its pieces swapped, or the batch opened at another place, open to
    /// nothing.
    #[tokio::test]
    async fn a_body_crosses_the_wire_encrypted_in_pieces_that_open_only_in_order() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let capture = tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.unwrap();
            let nonce = write_challenge(&mut conn).await.unwrap();
            let salt = read_salt(&mut conn).await.unwrap();
            let head = read_header(&mut conn).await.unwrap();
            let mut wire = vec![0; wire_body_len(head.len) as usize];
            conn.read_exact(&mut wire).await.unwrap();
            let mut after = Vec::new();
            conn.read_to_end(&mut after).await.unwrap();
            assert!(after.is_empty(), "{} bytes after the body", after.len());
            (head, Place { nonce, salt, n: 1 }, wire)
        });
        let body: Vec<u8> = b"session 10.0.0.1:4242 "
            .iter()
            .copied()
            .cycle()
            .take(600 << 10)
            .collect();
        let header = Header {
            vnf: "nat1".parse().unwrap(),
            kind: KIND_SNAPSHOT,
            seq: 1,
            epoch: 0,
            silence: Duration::from_secs(5),
        };
        let mut conn = link(&address).await;
        conn.send(&header, &body).await.unwrap();
        drop(conn);
        let (head, at, wire) = capture.await.unwrap();
        assert_eq!(head.len as usize, body.len());
        assert_eq!(
            wire.len(),
            body.len() + 3 * SEAL_BYTES,
            "three pieces, each tagged"
        );
        assert!(
            !wire.windows(8).any(|w| w == b"session "),
            "the body crossed the wire readable"
        );
        let key = tag_key(&test_key());
        let opened = read_body(&mut &wire[..], &head, at, &key).await.unwrap();
        assert!(
            opened.as_deref() == Some(&body[..]),
            "the receiver opens it whole"
        );
        // The first two pieces (both full) swapped: the body does not open.
        let piece = PIECE_BYTES + SEAL_BYTES;
        let mut swapped = wire.clone();
        swapped[..piece].copy_from_slice(&wire[piece..2 * piece]);
        swapped[piece..2 * piece].copy_from_slice(&wire[..piece]);
        let opened = read_body(&mut &swapped[..], &head, at, &key).await.unwrap();
        assert!(opened.is_none(), "pieces swapped opened");
        // The same bytes read as another batch of the connection: nothing opens.
        let elsewhere = Place { n: 2, ..at };
        let opened = read_body(&mut &wire[..], &head, elsewhere, &key)
            .await
            .unwrap();
        assert!(opened.is_none(), "a batch opened at another place");
        // Or on a connection with another salt (the same challenge sent again): nothing opens.
        let salted = Place {
            salt: [1; NONCE_BYTES],
            ..at
        };
        let opened = read_body(&mut &wire[..], &head, salted, &key)
            .await
            .unwrap();
        assert!(opened.is_none(), "a batch opened under another salt");
    }

    /// A refused batch's body of several pieces is passed over exactly: the next batch on the
    /// connection is read as one, and taken.
    #[tokio::test]
    async fn a_refused_body_of_several_pieces_is_passed_over_exactly() {
        let host = Arc::new(Standbys::default());
        let (address, standby) = standby_host(host.clone()).await;
        let snapshot = |vnf: &str| Header {
            vnf: vnf.parse().unwrap(),
            kind: KIND_SNAPSHOT,
            seq: 1,
            epoch: 0,
            silence: Duration::from_secs(5),
        };
        let mut conn = link(&address).await;
        conn.send(&snapshot("nat2"), &vec![3; 600 << 10])
            .await
            .unwrap();
        let ack = conn.read_ack().await.unwrap();
        assert_eq!(ack.status, ACK_REFUSED, "{ack:?}");
        assert!(ack.message.contains("runs no standby of nat2"), "{ack:?}");
        conn.send(&snapshot("nat1"), &7u64.to_le_bytes())
            .await
            .unwrap();
        assert_eq!(conn.read_ack().await.unwrap().status, ACK_OK);
        assert_eq!(
            standby.values.lock().unwrap().get("nat1").map(|v| v.0),
            Some(7)
        );
    }

    /// A header not tagged with the stream's key, from the active's own address, is refused
    /// before its body (announced at 256 MiB) is sent: nothing is held for a sender without
    /// the key.
    #[tokio::test]
    async fn a_header_without_the_key_is_refused_before_its_body() {
        let host = Arc::new(Standbys::default());
        let (address, standby) = standby_host(host.clone()).await;
        let mut conn = Link::open(None, &address, &PairKey::new([6; PairKey::LEN]))
            .await
            .unwrap();
        let at = conn.place(1);
        conn.sent += 1;
        let mut head = raw_header(KIND_SNAPSHOT, MAX_BATCH_BYTES - 1, 30);
        let tag = head_tag(&conn.key, at, &head);
        head.extend_from_slice(tag.as_ref());
        conn.stream.write_all(&head).await.unwrap();
        let ack = tokio::time::timeout(Duration::from_secs(5), read_ack(&mut conn.stream, None))
            .await
            .expect("no answer before the body")
            .unwrap();
        assert_eq!(ack.status, ACK_REFUSED, "{ack:?}");
        assert!(
            ack.message.contains("is not tagged with the key"),
            "{ack:?}"
        );
        assert!(
            !ack.tagged,
            "a refusal of a sender without the key is not tagged"
        );
        assert!(standby.values.lock().unwrap().is_empty());
    }

    /// A "taken" answer without the stream's tag (from anyone on the path, or a host that does
    /// not hold the key) is not believed: the stream does not say synced, and keeps trying.
    #[tokio::test]
    async fn an_answer_without_the_streams_tag_is_not_believed() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        // A receiver that answers every batch "taken", untagged.
        tokio::spawn(async move {
            loop {
                let (mut conn, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    write_challenge(&mut conn).await.unwrap();
                    read_salt(&mut conn).await.unwrap();
                    while let Ok(head) = read_header(&mut conn).await {
                        skip_body(&mut conn, head.len).await.unwrap();
                        let ok = Ack::new(head.h.seq, ACK_OK, String::new());
                        write_ack(&mut conn, &ok, None).await.unwrap();
                    }
                });
            }
        });
        let nat1: Name = "nat1".parse().unwrap();
        let replicas = Replicas::new(Counters::holding("nat1", 7), TEST_DETECTION);
        replicas.ensure(&nat1, &standby_at(address, test_key()), 0);
        wait_for("the untagged answer refused", || {
            replicas.status(&nat1).unwrap().error.is_some_and(|e| {
                e.contains("takes the batch (or asks for a snapshot) without the stream's tag")
            })
        })
        .await;
        let st = replicas.status(&nat1).unwrap();
        assert_ne!(st.state, "synced", "{st:?}");
        assert_eq!(st.updates, 0, "{st:?}");
    }

    /// An old active of nat1 at epoch 2, its gate open (no lease kept), streaming to a host of
    /// `host`'s roles that took nat1 over at epoch 3: the replicas, its gate, the VNF's name and
    /// the receiving host's state.
    async fn stale_sender(
        host: &Arc<Standbys>,
    ) -> (
        Replicas,
        Arc<crate::fencing::ForwardGate>,
        Name,
        Arc<Counters>,
    ) {
        host.roles
            .lock()
            .unwrap()
            .insert("nat1".into(), (Role::Active, 3));
        let (address, standby) = standby_host(host.clone()).await;
        let fencing = Arc::new(Fencing::new());
        let replicas = Replicas::new(Counters::holding("nat1", 7), TEST_DETECTION)
            .with_fencing(Arc::clone(&fencing));
        let nat1: Name = "nat1".parse().unwrap();
        let gate = fencing.gate(&nat1);
        let mut old = crate::fencing::tests::assignment(Role::Active, true, 2);
        old.vnf = nat1.clone();
        fencing.assign(&[old]);
        assert!(gate.open());
        replicas.ensure(&nat1, &standby_at(address, test_key()), 2);
        (replicas, gate, nat1, standby)
    }

    /// A stale answer from a host that does not hold the stream's key (untagged) does not fence
    /// the sender: anyone could claim an epoch; the lease closes its gate otherwise.
    #[tokio::test]
    async fn an_untagged_stale_answer_does_not_fence() {
        let host = Arc::new(Standbys::default());
        // This host takes nat1's stream only from elsewhere: it holds no key for this sender.
        *host.active_from.lock().unwrap() = Some("10.9.9.9".parse().unwrap());
        let (replicas, gate, nat1, _) = stale_sender(&host).await;
        wait_for("the stale answer read", || {
            replicas
                .status(&nat1)
                .unwrap()
                .error
                .is_some_and(|e| e.contains("(not taken)"))
        })
        .await;
        assert!(gate.open(), "not fenced by an answer without the key");
        assert_ne!(replicas.status(&nat1).unwrap().state, "fenced");
    }

    /// Writes one keepalive of `vnf` at `epoch` on `conn` asking for `silence`, and reads its
    /// acknowledgement.
    async fn keepalive(conn: &mut Link, vnf: &str, epoch: u64, silence: Duration) -> Ack {
        conn.send(&keepalive_of(vnf, epoch, silence), &[])
            .await
            .unwrap();
        conn.read_ack().await.unwrap()
    }

    #[tokio::test]
    async fn a_silent_active_is_lost_until_it_speaks_and_its_close_is_proof() {
        let host = Arc::new(Standbys::default());
        let (address, _) = standby_host(host.clone()).await;
        let mut conn = link(&address).await;
        let silence = Duration::from_millis(50);
        assert_eq!(
            keepalive(&mut conn, "nat1", 0, silence).await.status,
            ACK_OK
        );
        // Nothing more: lost after the silence the active asked for, not closed.
        wait_for("the silence was never noticed", || !host.lost().is_empty()).await;
        let lost = host.lost();
        assert!(
            !lost[0].1.closed && lost[0].1.why.contains("for 50 ms"),
            "{lost:?}"
        );
        // It speaks again: heard (any time after the keepalive: lost again 50 ms later, the
        // last entry may already say so when a loaded machine looks late).
        let before = host.heard.lock().unwrap().len();
        assert_eq!(
            keepalive(&mut conn, "nat1", 0, silence).await.status,
            ACK_OK
        );
        wait_for("never heard again", || {
            host.heard.lock().unwrap()[before..]
                .iter()
                .any(|(_, l)| l.is_none())
        })
        .await;
        // Silent again, then the connection ends: its host closed it (an active never does
        // while it is one), so the active is gone.
        wait_for("the second silence was never noticed", || {
            host.lost().len() == 2
        })
        .await;
        drop(conn);
        wait_for("the end was never noticed", || host.lost().len() == 3).await;
        let lost = host.lost();
        assert!(lost[2].1.closed, "{lost:?}");
    }

    #[tokio::test]
    async fn a_host_holding_the_pair_at_a_higher_epoch_fences_the_sender() {
        let host = Arc::new(Standbys::default());
        let (replicas, gate, nat1, standby) = stale_sender(&host).await;
        wait_for("the sender was never fenced", || !gate.open()).await;
        let st = replicas.status(&nat1).unwrap();
        assert_eq!(st.state, "fenced", "{st:?}");
        assert!(
            st.error
                .as_deref()
                .is_some_and(|e| e.contains("at epoch 3, above the sender's 2")),
            "{st:?}"
        );
        assert!(standby.values.lock().unwrap().is_empty(), "nothing applied");
        assert!(host.heard.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_silence_outside_the_bounds_is_refused() {
        let host = Arc::new(Standbys::default());
        let (address, _) = standby_host(host).await;
        let mut conn = link(&address).await;
        let header = keepalive_of("nat1", 0, MAX_SILENCE + Duration::from_secs(1));
        conn.send(&header, &[]).await.unwrap();
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), conn.stream.read(&mut buf))
            .await
            .expect("the standby kept the connection open")
            .unwrap_or(0);
        assert_eq!(n, 0, "no acknowledgement, the connection dropped");
    }

    /// A connection to `address` whose challenge was read and answered with a salt: its
    /// bytes, and where its first batch stands.
    async fn raw_connection(address: &str) -> (TcpStream, Place) {
        let mut conn = TcpStream::connect(address).await.unwrap();
        let nonce = read_challenge(&mut conn).await.unwrap();
        let salt = write_salt(&mut conn).await.unwrap();
        (conn, Place { nonce, salt, n: 1 })
    }

    /// The header of a batch of `kind` for nat1 announcing `len` bytes (a silence of `silence`),
    /// without its tag.
    fn raw_header(kind: u8, len: u32, silence_ms: u32) -> Vec<u8> {
        let mut head = Vec::new();
        head.extend_from_slice(MAGIC);
        head.push(kind);
        head.extend_from_slice(&4u16.to_le_bytes());
        head.extend_from_slice(b"nat1");
        head.extend_from_slice(&1u64.to_le_bytes());
        head.extend_from_slice(&0u64.to_le_bytes());
        head.extend_from_slice(&silence_ms.to_le_bytes());
        head.extend_from_slice(&len.to_le_bytes());
        head
    }

    /// A batch from an address that may not send is refused on its header: answered before
    /// its body (announced at 256 MiB) is even sent, so nothing is held for it; the
    /// connection's framing goes on past the body.
    #[tokio::test]
    async fn a_batch_from_a_peer_that_may_not_send_is_refused_before_its_body() {
        let host = Arc::new(Standbys::default());
        *host.active_from.lock().unwrap() = Some("10.9.9.9".parse().unwrap());
        let (address, standby) = standby_host(host.clone()).await;
        let (mut conn, _) = raw_connection(&address).await;
        let mut head = raw_header(KIND_SNAPSHOT, MAX_BATCH_BYTES - 1, 30);
        head.extend_from_slice(&[0; TAG_BYTES]);
        conn.write_all(&head).await.unwrap();
        let ack = tokio::time::timeout(Duration::from_secs(5), read_ack(&mut conn, None))
            .await
            .expect("no answer before the body")
            .unwrap();
        assert_eq!(ack.status, ACK_REFUSED, "{ack:?}");
        assert!(ack.message.contains("only from 10.9.9.9"), "{ack:?}");
        // A small refused batch's body is passed over: the next header is read as one.
        drop(conn);
        let (mut conn, _) = raw_connection(&address).await;
        let mut two = raw_header(KIND_LOG, 3, 30);
        two.extend_from_slice(&[0; TAG_BYTES]);
        two.extend_from_slice(&[1, 2, 3]);
        two.extend_from_slice(&[0; SEAL_BYTES]);
        two.extend_from_slice(&raw_header(KIND_KEEPALIVE, 0, 30));
        two.extend_from_slice(&[0; TAG_BYTES]);
        conn.write_all(&two).await.unwrap();
        for _ in 0..2 {
            assert_eq!(read_ack(&mut conn, None).await.unwrap().status, ACK_REFUSED);
        }
        assert!(standby.values.lock().unwrap().is_empty(), "nothing applied");
        assert!(host.heard.lock().unwrap().is_empty());
    }

    /// A standby promoted while a batch's body is on its way takes none of it: the batch is
    /// judged again once it has arrived.
    #[tokio::test]
    async fn a_batch_whose_standby_was_promoted_while_it_arrived_is_not_applied() {
        let host = Arc::new(Standbys::default());
        let (address, standby) = standby_host(host.clone()).await;
        let (mut conn, at) = raw_connection(&address).await;
        let key = tag_key(&test_key());
        let mut head = raw_header(KIND_SNAPSHOT, 4, 30);
        let tag = head_tag(&key, at, &head);
        head.extend_from_slice(tag.as_ref());
        conn.write_all(&head).await.unwrap();
        // The header is judged (nat1's standby here, at epoch 0) while the body is held back;
        // then nat1 is promoted. (Were the header not judged yet, the first judgement refuses
        // instead: the outcome is the same, so the pause cannot make the test fail falsely;
        // without the second judgement it fails.)
        tokio::time::sleep(Duration::from_millis(100)).await;
        host.roles
            .lock()
            .unwrap()
            .insert("nat1".into(), (Role::Active, 1));
        let mut rest = vec![1, 2, 3, 4];
        let seal = BodyCipher::new(&key, at, tag.as_ref())
            .unwrap()
            .seal(&mut rest)
            .unwrap();
        rest.extend_from_slice(seal.as_ref());
        conn.write_all(&rest).await.unwrap();
        let ack = read_ack(&mut conn, None).await.unwrap();
        assert_eq!(ack.status, ACK_STALE, "{ack:?}");
        assert!(standby.values.lock().unwrap().is_empty(), "nothing applied");
    }

    /// A connection that brings no batch this host accepts is closed after a while, and a
    /// refused batch's silence is not taken (a 1 ms one would wake the standby every ms).
    #[tokio::test(start_paused = true)]
    async fn a_connection_without_an_accepted_batch_is_closed() {
        let host = Arc::new(Standbys::default());
        *host.active_from.lock().unwrap() = Some("10.9.9.9".parse().unwrap());
        let (address, _) = standby_host(host.clone()).await;
        let (mut idle, _) = raw_connection(&address).await;
        let (mut refused, _) = raw_connection(&address).await;
        let mut head = raw_header(KIND_KEEPALIVE, 0, 1);
        head.extend_from_slice(&[0; TAG_BYTES]);
        refused.write_all(&head).await.unwrap();
        assert_eq!(
            read_ack(&mut refused, None).await.unwrap().status,
            ACK_REFUSED
        );
        // One that never finishes its salt: closed once the connection is that old.
        let mut unsalted = TcpStream::connect(&address).await.unwrap();
        read_challenge(&mut unsalted).await.unwrap();
        unsalted.write_all(&[7; NONCE_BYTES - 1]).await.unwrap();
        let mut buf = [0u8; 1];
        let within = UNANSWERED_CONNECTION + Duration::from_secs(1);
        let n = tokio::time::timeout(within, unsalted.read(&mut buf))
            .await
            .expect("the standby waited longer than a connection may stay unanswered")
            .unwrap_or(0);
        assert_eq!(n, 0, "closed");
        for conn in [&mut idle, &mut refused] {
            let mut buf = [0u8; 1];
            let n = tokio::time::timeout(UNANSWERED_CONNECTION * 2, conn.read(&mut buf))
                .await
                .expect("the standby kept a connection nobody may use open")
                .unwrap_or(0);
            assert_eq!(n, 0, "closed");
        }
        // One that keeps sending refused batches, each before the wait for the next ran out:
        // closed all the same (before, it held its connection, and with 512 of them every
        // slot of the listener).
        let (mut busy, _) = raw_connection(&address).await;
        let opened = tokio::time::Instant::now();
        loop {
            let mut head = raw_header(KIND_KEEPALIVE, 0, 1000);
            head.extend_from_slice(&[0; TAG_BYTES]);
            if busy.write_all(&head).await.is_err() {
                break;
            }
            match read_ack(&mut busy, None).await {
                Ok(ack) => assert_eq!(ack.status, ACK_REFUSED, "{ack:?}"),
                Err(_) => break,
            }
            assert!(
                opened.elapsed() < UNANSWERED_CONNECTION + Duration::from_secs(2),
                "a peer sending refused batches kept its connection"
            );
            tokio::time::sleep(Duration::from_millis(900)).await;
        }
        assert!(host.heard.lock().unwrap().is_empty());
    }

    /// A replication connection's kernel ends it once its peer is gone without a word:
    /// keepalive probes on, and [`DEAD_PEER_AFTER`] without an answer.
    #[tokio::test]
    async fn a_replication_connection_notices_a_dead_peer() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        notice_dead_peer(&stream);
        let socket = socket2::SockRef::from(&stream);
        assert!(socket.keepalive().unwrap());
        assert_eq!(socket.tcp_user_timeout().unwrap(), Some(DEAD_PEER_AFTER));
        assert_eq!(socket.tcp_keepalive_time().unwrap(), Duration::from_secs(5));
    }

    /// Full snapshots that are not taken go again at the pair's interval, then less and less
    /// often, never slower than every 2 s.
    #[test]
    fn full_snapshots_not_taken_go_again_less_often() {
        let ten = Duration::from_millis(10);
        let waits: Vec<u128> = (0..12)
            .map(|n| full_retry_pause(ten, n).as_millis())
            .collect();
        assert_eq!(
            waits,
            [10, 10, 20, 40, 80, 160, 320, 640, 1280, 2000, 2000, 2000]
        );
        assert_eq!(
            full_retry_pause(Duration::from_secs(3), 5),
            Duration::from_secs(3)
        );
    }

    /// Beyond the cap ([`MAX_CONNECTIONS`] in an agent) open at once, a new connection is
    /// closed as it comes.
    #[tokio::test]
    async fn connections_beyond_the_cap_are_closed_at_once() {
        const CAP: usize = 8;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let host = Arc::new(Standbys::default());
        tokio::spawn(serve_at_most(
            Arc::new(listener),
            Arc::new(Counters::default()),
            host,
            CAP,
        ));
        let mut open = Vec::new();
        for _ in 0..CAP {
            open.push(link(&address).await);
        }
        // Every one of them served: each answers a keepalive.
        let last = open.last_mut().unwrap();
        assert_eq!(
            keepalive(last, "nat1", 0, Duration::from_secs(5))
                .await
                .status,
            ACK_OK
        );
        let mut extra = TcpStream::connect(&address).await.unwrap();
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), extra.read(&mut buf))
            .await
            .expect("a connection beyond the cap was kept")
            .unwrap_or(0);
        assert_eq!(n, 0, "closed");
        // One goes: a new one is served again.
        drop(open.pop());
        let mut again = None;
        for _ in 0..100 {
            // Closed at once while the slot is not yet free: no challenge comes.
            if let Ok(mut conn) = Link::open(None, &address, &test_key()).await {
                let header = keepalive_of("nat1", 0, Duration::from_secs(5));
                conn.send(&header, &[]).await.unwrap();
                again = Some(conn.read_ack().await.unwrap());
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(again.map(|a| a.status), Some(ACK_OK));
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
        let (mut conn, _) = raw_connection(&address.to_string()).await;
        let mut head = Vec::new();
        head.extend_from_slice(MAGIC);
        head.push(KIND_LOG);
        head.extend_from_slice(&4u16.to_le_bytes());
        head.extend_from_slice(b"nat1");
        head.extend_from_slice(&1u64.to_le_bytes());
        head.extend_from_slice(&0u64.to_le_bytes());
        head.extend_from_slice(&30u32.to_le_bytes());
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
