//! VXLAN tunnels (RFC 7348): a link whose two ends are on different hosts carries Ethernet
//! frames inside UDP datagrams. A [`VxlanEndpoint`] owns one non-blocking UDP socket per data
//! plane (default port 4789, the IANA VXLAN port, so packet analysers decode it); every
//! [`VxlanTunnel`] of that data plane shares it. A tunnel is a [`Node`] with one port, like a
//! host port: frames arriving on its port are encapsulated and sent to the remote endpoint,
//! datagrams received from (remote IP, VNI) leave through its port.
//!
//! Owns the header format, the socket, the (source IP, VNI) demultiplexing and per-tunnel
//! counters. Must not create namespaces or addresses, nor decide which tunnels exist (callers
//! do), nor learn MAC addresses (a tunnel is a point-to-point link, not a bridge).
//!
//! Who reads the shared socket: whichever tunnel's `poll` runs first. Each poll tries the
//! endpoint's receive lock without waiting; the holder drains the socket (`recvmmsg`, up to
//! [`RECV_ROUNDS`] batches of [`BATCH`]) and pushes every datagram, already decapsulated into a
//! pool buffer, onto the bounded queue of the tunnel registered for its (source IP, VNI). Then
//! every tunnel forwards its own queue out of its port, only as much as the port's link has
//! room for. A poll that finds the lock taken skips receiving (another worker is doing it).
//! Holding the lock across receive and dispatch keeps each tunnel's datagrams in arrival order
//! under several worker threads; the queues are lock-free and multi-producer. Nothing is lost
//! silently: a full queue counts `rx_queue_full`, a datagram for no tunnel `unknown_tunnel`, a
//! datagram that is not VXLAN `malformed`, an oversized one `rx_too_big`. A datagram whose
//! tunnel does not exist yet is held for up to [`EARLY_WAIT`] (at most [`EARLY_CAPACITY`] of
//! them, the oldest dropped first) and delivered first when that tunnel is made: when a link
//! moves to another host, the two hosts rewire independently, and a sender that rewired first
//! does not lose what it sends before the receiver's tunnel is there (`early_held`,
//! `early_delivered`; what expires or is pushed out counts `unknown_tunnel`). While the
//! endpoint has no tunnel at all, its [`EndpointDrain`] node reads the socket in their place,
//! so what still arrives for a tunnel gone is held and counted like that, not left unseen in
//! the kernel's buffer. While no tunnel is polled, the kernel's socket buffer ([`RECV_BUFFER`] asked for) holds datagrams; what
//! overflows it the kernel drops and counts ([`VxlanEndpoint::kernel_drops`]). Every drop that
//! names a VNI is also kept per VNI for the life of the endpoint ([`VxlanEndpoint::vni_drops`]):
//! the datagrams for no tunnel, what a tunnel still queued when it was removed, and a removed
//! tunnel's own drops, so a link's drop count does not shrink when its tunnel goes. The tunnel map
//! is copy-on-write behind an `RwLock<Arc<_>>`: a receive round takes one `Arc` clone;
//! registering a tunnel (rare) builds a new map.
//!
//! A sender's end: when the last link into a tunnel's port is gone and its ring drained, the
//! tunnel sends its remote an end marker after its last frame, [`END_MARKERS`] times (an
//! 8-byte header with [`FLAG_END`] and no inner frame, in which an RFC 7348 receiver finds no
//! frame to deliver). The receiving tunnel counts the datagrams it queued and where and when
//! the marker came among them (any later datagram of the sender undoes it), so
//! [`VxlanTunnelStats::sender_done_since`] says when everything the sender sent has left its
//! port: a VNF's frozen source, still receiving after its move, knows its senders rewired
//! (ADR 053) instead of guessing from a quiet spell.
//!
//! Both directions use `recvmmsg`/`sendmmsg` with two-part iovecs (header, pool buffer), so
//! frames are not copied in user space. All tunnels of an endpoint and the panel polling them
//! must share the endpoint's [`Pool`] (packets cross between tunnels through the queues).

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, TryLockError};
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;

use crate::afpacket::enter_netns;
use crate::error::{Error, Result};
use crate::graph::PortRef;
use crate::node::{BATCH, Node, NodeIo};
use crate::pool::{Packet, Pool};

/// The IANA-assigned VXLAN UDP port.
pub const VXLAN_PORT: u16 = 4789;
/// Bytes of the VXLAN header.
pub const HEADER_LEN: usize = 8;
/// The I flag: the VNI field is valid. The only flag RFC 7348 defines.
pub const FLAG_VNI: u8 = 0x08;
/// A reserved flag bit telvirt's endpoints set on a sender's end marker (see the module's
/// comment): a header with it and no inner frame.
pub const FLAG_END: u8 = 0x01;
/// End markers a tunnel sends when the link into it went, [`END_MARKER_GAP`] apart: the
/// remote's kernel may drop one, and a repeat changes nothing there.
pub const END_MARKERS: u8 = 3;
/// Time between two of them.
pub const END_MARKER_GAP: Duration = Duration::from_millis(20);
/// Largest VNI (24 bits).
pub const MAX_VNI: u32 = 0x00ff_ffff;
/// Bytes of an Ethernet header: the smallest inner frame a datagram may carry.
pub const ETH_HEADER_LEN: usize = 14;
/// Largest UDP payload over IPv4 (65535 - 20 bytes IP - 8 bytes UDP).
pub const MAX_DATAGRAM: usize = 65_507;
/// Largest inner frame one datagram can carry.
pub const MAX_INNER_FRAME: usize = MAX_DATAGRAM - HEADER_LEN;
/// Datagrams each tunnel can hold between the receive round and its own poll.
pub const QUEUE_CAPACITY: usize = 512;
/// Datagrams for a tunnel not made yet an endpoint holds at most (see the module's comment).
pub const EARLY_CAPACITY: usize = 1024;
/// The share of the pool an endpoint's tunnels may hold in their queues and early at once
/// (1/4, at least one tunnel's [`QUEUE_CAPACITY`]): past it a tunnel keeps taking datagrams
/// only up to its fair part of that, so stuck tunnels (unlinked, or their VNF stalled) and
/// whoever floods them hold at most about half the pool, never the buffers every VNF and port
/// of the host allocates from.
pub const HELD_SHARE_OF_POOL: usize = 4;
/// How long such a datagram is held for its tunnel.
pub const EARLY_WAIT: Duration = Duration::from_millis(500);
/// Receive batches one poll takes from the shared socket at most.
pub const RECV_ROUNDS: usize = 4;
/// Receive buffer the endpoint asks for (the kernel caps it at `net.core.rmem_max`): room for
/// bursts while workers are busy elsewhere.
pub const RECV_BUFFER: usize = 4 << 20;
/// `SO_MEMINFO` socket option (asm-generic value; Linux 4.6+), not exported by every libc
/// version.
const SO_MEMINFO: libc::c_int = 55;
/// Name of an endpoint's [`EndpointDrain`] node on the panel.
pub const DRAIN_NODE: &str = "vxlan:drain";
/// Prefix of tunnel node names on the panel (`tun:NAME`).
pub const TUNNEL_PREFIX: &str = "tun:";
/// The single port of a tunnel node.
pub const TUNNEL_PORT: &str = "io";

/// The 8-byte header for `vni`: flags 0x08, 3 reserved bytes, 24-bit VNI, 1 reserved byte.
/// Only the low 24 bits of `vni` are used.
pub fn header(vni: u32) -> [u8; HEADER_LEN] {
    let v = (vni & MAX_VNI).to_be_bytes();
    [FLAG_VNI, 0, 0, 0, v[1], v[2], v[3], 0]
}

/// The VNI of a valid header, or why it is not one.
fn parse_header(h: &[u8; HEADER_LEN]) -> std::result::Result<u32, String> {
    if h[0] & FLAG_VNI == 0 {
        return Err(format!(
            "flags byte is {:#04x}: the I flag ({FLAG_VNI:#04x}) must be set",
            h[0]
        ));
    }
    // Reserved bits are ignored on receipt (RFC 7348, section 5).
    Ok(u32::from_be_bytes([0, h[4], h[5], h[6]]))
}

/// The VNI of a valid header (fast path, no message).
fn header_vni(h: &[u8; HEADER_LEN]) -> Option<u32> {
    (h[0] & FLAG_VNI != 0).then(|| u32::from_be_bytes([0, h[4], h[5], h[6]]))
}

/// The end marker for `vni`: the header with [`FLAG_END`] set.
pub fn end_marker(vni: u32) -> [u8; HEADER_LEN] {
    let mut h = header(vni);
    h[0] |= FLAG_END;
    h
}

/// One datagram: the header for `vni` followed by `inner`.
pub fn encap(vni: u32, inner: &[u8]) -> Result<Vec<u8>> {
    if vni > MAX_VNI {
        return Err(Error::config(
            "vxlan.vni",
            format!("{vni} is above {MAX_VNI} (a VNI has 24 bits)"),
        ));
    }
    if inner.len() > MAX_INNER_FRAME {
        return Err(Error::config(
            "vxlan.inner_frame",
            format!(
                "{} bytes do not fit one datagram (at most {MAX_INNER_FRAME})",
                inner.len()
            ),
        ));
    }
    let mut out = Vec::with_capacity(HEADER_LEN + inner.len());
    out.extend_from_slice(&header(vni));
    out.extend_from_slice(inner);
    Ok(out)
}

/// The VNI and inner frame of `datagram`. Refuses datagrams shorter than the header plus an
/// Ethernet header, and headers without the I flag.
pub fn decap(datagram: &[u8]) -> Result<(u32, &[u8])> {
    if datagram.len() < HEADER_LEN + ETH_HEADER_LEN {
        return Err(Error::Malformed {
            what: "VXLAN datagram",
            reason: format!(
                "{} bytes is too short (at least {HEADER_LEN} bytes header + {ETH_HEADER_LEN} \
                 bytes Ethernet header)",
                datagram.len()
            ),
        });
    }
    let mut h = [0u8; HEADER_LEN];
    h.copy_from_slice(&datagram[..HEADER_LEN]);
    let vni = parse_header(&h).map_err(|reason| Error::Malformed {
        what: "VXLAN header",
        reason,
    })?;
    Ok((vni, &datagram[HEADER_LEN..]))
}

/// The node name of tunnel `name` on the panel (`tun:NAME`).
pub fn tunnel_node(name: &str) -> String {
    format!("{TUNNEL_PREFIX}{name}")
}

/// The port of tunnel `name` that links attach to (`tun:NAME.io`).
pub fn tunnel_port(name: &str) -> PortRef {
    PortRef::new(&tunnel_node(name), TUNNEL_PORT)
}

/// Counters of an endpoint's shared socket.
#[derive(Debug, Default)]
pub struct VxlanEndpointStats {
    /// Datagrams received on the socket (whatever became of them).
    pub datagrams: AtomicU64,
    /// Datagrams whose (source IP, VNI) has no tunnel (dropped, after being held for
    /// [`EARLY_WAIT`] or pushed out of the [`EARLY_CAPACITY`] held).
    pub unknown_tunnel: AtomicU64,
    /// Datagrams held because their tunnel did not exist yet.
    pub early_held: AtomicU64,
    /// Held datagrams delivered to their tunnel once it was made.
    pub early_delivered: AtomicU64,
    /// Datagrams that are not VXLAN: too short, or the I flag missing (dropped).
    pub malformed: AtomicU64,
    /// Datagrams still queued for a tunnel when it was removed (dropped).
    pub removed_queued: AtomicU64,
    /// `recvmmsg` failures other than "nothing to read".
    pub rx_errors: AtomicU64,
    /// Senders' end markers received (for a tunnel here or not).
    pub end_markers: AtomicU64,
    /// Polls that skipped receiving because the polling panel's pool is not the endpoint's
    /// (a wiring mistake: the endpoint must be built with the panel's pool).
    pub pool_mismatch: AtomicU64,
}

/// Counters of one tunnel. Byte counts are inner-frame bytes (without the VXLAN, UDP and IP
/// headers).
#[derive(Debug, Default)]
pub struct VxlanTunnelStats {
    /// Frames received from the remote end and sent out of the tunnel's port.
    pub rx_packets: AtomicU64,
    /// Bytes of those frames.
    pub rx_bytes: AtomicU64,
    /// Frames encapsulated and accepted by the kernel for sending.
    pub tx_packets: AtomicU64,
    /// Bytes of those frames.
    pub tx_bytes: AtomicU64,
    /// Frames the kernel refused to send (socket buffer full, no route, ...): dropped.
    pub tx_errors: AtomicU64,
    /// Frames arriving on the port too large for one datagram: dropped.
    pub tx_too_big: AtomicU64,
    /// Datagrams for this tunnel larger than a pool buffer: dropped.
    pub rx_too_big: AtomicU64,
    /// Datagrams for this tunnel dropped because its queue was full.
    pub rx_queue_full: AtomicU64,
    /// Datagrams queued for the port (received, or held early and delivered), in arrival
    /// order.
    pub queued: AtomicU64,
    /// Where the last end marker came: one more than `queued` when it arrived (0: none came,
    /// or a datagram came after it, whatever became of that datagram).
    pub end_marker_at: AtomicU64,
    /// When the last end marker came (CLOCK_MONOTONIC nanoseconds, [`crate::packet::now_ns`];
    /// 0: none came).
    pub end_marker_ns: AtomicU64,
    /// End markers this tunnel sent (its sender's link went).
    pub end_markers_sent: AtomicU64,
}

impl VxlanTunnelStats {
    /// Every frame or datagram this tunnel dropped, whatever the reason.
    pub fn drops(&self) -> u64 {
        [
            &self.tx_errors,
            &self.tx_too_big,
            &self.rx_too_big,
            &self.rx_queue_full,
        ]
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .sum()
    }

    /// The remote sender's link into this tunnel ended (its end marker came after its last
    /// datagram) and everything queued before it left the port: nothing more comes out unless
    /// the sender links again. False while no marker came.
    pub fn sender_done(&self) -> bool {
        self.sender_done_since(0)
    }

    /// [`VxlanTunnelStats::sender_done`], by an end marker that came at or after `since_ns`
    /// (CLOCK_MONOTONIC nanoseconds): one from before (a link replaced, a VNF restarted) does
    /// not say the sender ended since.
    pub fn sender_done_since(&self, since_ns: u64) -> bool {
        // `queued` first: a datagram after the marker makes it pass the marker's place.
        let queued = self.queued.load(Ordering::Acquire);
        let end = self.end_marker_at.load(Ordering::Acquire);
        end == queued + 1
            && self.end_marker_ns.load(Ordering::Acquire) >= since_ns
            && self.rx_packets.load(Ordering::Acquire) >= queued
    }
}

/// VNIs whose drops [`VniDrops`] keeps apart; past them, drops of further VNIs are kept in
/// one sum (a sender of random VNIs cannot grow the table).
pub const VNI_DROPS_TRACKED: usize = 4096;

/// Drops per VNI for the life of an endpoint (see the module's comment).
#[derive(Debug, Default)]
struct VniDrops {
    by_vni: Mutex<HashMap<u32, u64>>,
    /// Drops of VNIs beyond [`VNI_DROPS_TRACKED`].
    untracked: AtomicU64,
}

impl VniDrops {
    fn add(&self, vni: u32, n: u64) {
        if n == 0 {
            return;
        }
        let mut m = self.by_vni.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = m.get_mut(&vni) {
            *c += n;
        } else if m.len() < VNI_DROPS_TRACKED {
            m.insert(vni, n);
        } else {
            self.untracked.fetch_add(n, Ordering::Relaxed);
        }
    }

    fn of(&self, vni: u32) -> u64 {
        let m = self.by_vni.lock().unwrap_or_else(|p| p.into_inner());
        m.get(&vni).copied().unwrap_or(0)
    }
}

/// What the receive round shares with one tunnel.
struct TunnelShared {
    queue: ArrayQueue<Packet>,
    stats: Arc<VxlanTunnelStats>,
    pool: Arc<Pool>,
    vni: u32,
    endpoint_stats: Arc<VxlanEndpointStats>,
    vni_drops: Arc<VniDrops>,
}

impl Drop for TunnelShared {
    /// The last holder (the tunnel, or a receive round that still had it in its map) returns
    /// what is still queued to the pool, counted, and leaves the tunnel's drops with its VNI.
    fn drop(&mut self) {
        let mut queued = 0;
        while let Some(p) = self.queue.pop() {
            self.pool.free(p);
            queued += 1;
        }
        self.endpoint_stats
            .removed_queued
            .fetch_add(queued, Ordering::Relaxed);
        self.vni_drops.add(self.vni, queued + self.stats.drops());
    }
}

impl Drop for VxlanEndpoint {
    fn drop(&mut self) {
        for (_, _, p) in self.early().drain(..) {
            self.pool.free(p);
        }
    }
}

type TunnelKey = (IpAddr, u32);
type TunnelMap = HashMap<TunnelKey, Arc<TunnelShared>>;

/// One UDP socket shared by every tunnel of a data plane.
pub struct VxlanEndpoint {
    socket: UdpSocket,
    local: SocketAddr,
    pool: Arc<Pool>,
    tunnels: RwLock<Arc<TunnelMap>>,
    rx_lock: Mutex<()>,
    stats: Arc<VxlanEndpointStats>,
    /// Datagrams whose tunnel does not exist yet, oldest first (decapsulated, with when they
    /// came); `early_len` mirrors its length so a receive round skips the lock when empty.
    early: Mutex<VecDeque<(TunnelKey, Instant, Packet)>>,
    early_len: AtomicUsize,
    vni_drops: Arc<VniDrops>,
}

impl std::fmt::Debug for VxlanEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VxlanEndpoint")
            .field("local", &self.local)
            .field("tunnels", &self.map().len())
            .finish()
    }
}

/// IPv4-mapped IPv6 addresses as IPv4, so a dual-stack socket demultiplexes like a v4 one.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

impl VxlanEndpoint {
    /// Bind the shared socket to `local` (port 0 picks a free port; use [`VXLAN_PORT`] in
    /// production). Received frames are placed in buffers of `pool`, which must be the pool of
    /// the panel the tunnels run on.
    pub fn bind(local: SocketAddr, pool: Arc<Pool>) -> Result<Arc<Self>> {
        Self::bind_in(local, None, pool)
    }

    /// [`VxlanEndpoint::bind`] inside the network namespace at `netns` (e.g.
    /// `/run/netns/blue`): the socket stays in that namespace while the calling thread's
    /// namespace is untouched (a short-lived thread enters the namespace and binds).
    pub fn bind_in(local: SocketAddr, netns: Option<&Path>, pool: Arc<Pool>) -> Result<Arc<Self>> {
        let bind = move || {
            UdpSocket::bind(local)
                .map_err(|e| Error::io(format!("bind VXLAN socket to {local}"), e))
        };
        let socket = match netns {
            None => bind()?,
            Some(ns) => {
                let ns = ns.to_path_buf();
                std::thread::Builder::new()
                    .name("tv-netns".into())
                    .spawn(move || -> Result<UdpSocket> {
                        enter_netns(&ns).map_err(|e| match e {
                            Error::Io { op, source } => Error::Io {
                                op: format!("{op} to bind VXLAN socket {local}"),
                                source,
                            },
                            other => other,
                        })?;
                        bind()
                    })
                    .map_err(|e| Error::io("spawn netns thread", e))?
                    .join()
                    .map_err(|_| Error::config("vxlan.netns", "netns thread panicked"))??
            }
        };
        socket
            .set_nonblocking(true)
            .map_err(|e| Error::io(format!("make VXLAN socket {local} non-blocking"), e))?;
        let one_buffer = libc::c_int::try_from(RECV_BUFFER).unwrap_or(libc::c_int::MAX);
        // SAFETY: valid fd, option value is a c_int of the size passed. Best effort: the
        // kernel caps the size at net.core.rmem_max, and the default still works.
        unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                (&one_buffer as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        let local = socket
            .local_addr()
            .map_err(|e| Error::io(format!("local address of VXLAN socket {local}"), e))?;
        Ok(Arc::new(VxlanEndpoint {
            socket,
            local,
            pool,
            tunnels: RwLock::new(Arc::new(HashMap::new())),
            rx_lock: Mutex::new(()),
            stats: Arc::new(VxlanEndpointStats::default()),
            early: Mutex::new(VecDeque::new()),
            early_len: AtomicUsize::new(0),
            vni_drops: Arc::new(VniDrops::default()),
        }))
    }

    /// Drops `p`, a datagram for the tunnel `key` that does not exist (counted).
    fn drop_unknown(&self, key: TunnelKey, p: Packet) {
        self.stats.unknown_tunnel.fetch_add(1, Ordering::Relaxed);
        self.vni_drops.add(key.1, 1);
        self.pool.free(p);
    }

    fn early(&self) -> std::sync::MutexGuard<'_, VecDeque<(TunnelKey, Instant, Packet)>> {
        self.early.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Holds `p`, a datagram for the tunnel `key` that does not exist yet; the oldest held one
    /// goes when [`EARLY_CAPACITY`] are held.
    fn hold_early(&self, key: TunnelKey, p: Packet) {
        let mut early = self.early();
        if early.len() >= EARLY_CAPACITY
            && let Some((k, _, old)) = early.pop_front()
        {
            self.drop_unknown(k, old);
        }
        early.push_back((key, Instant::now(), p));
        self.stats.early_held.fetch_add(1, Ordering::Relaxed);
        self.early_len.store(early.len(), Ordering::Release);
    }

    /// Drops the held datagrams older than [`EARLY_WAIT`] (counted `unknown_tunnel`).
    fn expire_early(&self) {
        if self.early_len.load(Ordering::Acquire) == 0 {
            return;
        }
        let mut early = self.early();
        while early
            .front()
            .is_some_and(|(_, at, _)| at.elapsed() > EARLY_WAIT)
        {
            if let Some((k, _, old)) = early.pop_front() {
                self.drop_unknown(k, old);
            }
        }
        self.early_len.store(early.len(), Ordering::Release);
    }

    /// Moves the held datagrams of `key` onto `shared`'s queue, in arrival order.
    fn deliver_early(&self, key: &TunnelKey, shared: &TunnelShared) {
        if self.early_len.load(Ordering::Acquire) == 0 {
            return;
        }
        let mut early = self.early();
        let mut kept = VecDeque::with_capacity(early.len());
        for (k, at, p) in early.drain(..) {
            if k != *key {
                kept.push_back((k, at, p));
            } else if at.elapsed() > EARLY_WAIT {
                self.drop_unknown(k, p);
            } else if let Err(p) = shared.queue.push(p) {
                shared.stats.rx_queue_full.fetch_add(1, Ordering::Relaxed);
                self.pool.free(p);
            } else {
                shared.stats.queued.fetch_add(1, Ordering::Release);
                self.stats.early_delivered.fetch_add(1, Ordering::Relaxed);
            }
        }
        *early = kept;
        self.early_len.store(early.len(), Ordering::Release);
    }

    /// The address the socket is bound to (with the port the kernel chose for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Shared counters.
    pub fn stats(&self) -> Arc<VxlanEndpointStats> {
        Arc::clone(&self.stats)
    }

    /// The pool received frames are placed in.
    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// Datagrams the kernel dropped on this socket before they were read (receive buffer
    /// full while no tunnel was polled fast enough, bad UDP checksum), from `SO_MEMINFO`.
    pub fn kernel_drops(&self) -> Result<u64> {
        let mut info = [0u32; 16];
        let mut len = std::mem::size_of_val(&info) as libc::socklen_t;
        // SAFETY: valid fd; `info` is writable for `len` bytes and the kernel writes at most
        // that many.
        let rc = unsafe {
            libc::getsockopt(
                self.socket.as_raw_fd(),
                libc::SOL_SOCKET,
                SO_MEMINFO,
                info.as_mut_ptr().cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(Error::last_os(format!(
                "getsockopt(SO_MEMINFO) on VXLAN socket {}",
                self.local
            )));
        }
        let drops = libc::SK_MEMINFO_DROPS as usize;
        if (len as usize) < (drops + 1) * std::mem::size_of::<u32>() {
            return Err(Error::Io {
                op: format!("getsockopt(SO_MEMINFO) on VXLAN socket {}", self.local),
                source: std::io::Error::other(format!(
                    "the kernel returned {len} bytes, without the drop counter"
                )),
            });
        }
        Ok(u64::from(info[drops]))
    }

    /// Every datagram or frame of VNI `vni` this endpoint dropped outside its live tunnels'
    /// own counters: datagrams for no tunnel (`unknown_tunnel`), what a tunnel still queued
    /// when it was removed (`removed_queued`), and the drops of removed tunnels. With the live
    /// tunnel's [`VxlanTunnelStats::drops`], a link's drops on this host for the endpoint's life.
    pub fn vni_drops(&self, vni: u32) -> u64 {
        self.vni_drops.of(vni)
    }

    /// VNIs whose drops are kept apart now (at most [`VNI_DROPS_TRACKED`]).
    pub fn vni_drops_tracked(&self) -> usize {
        self.vni_drops
            .by_vni
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// Forgets the drops of the VNIs `keep` refuses (VNIs no network here holds any more, or
    /// never held: a sender of stray VNIs), so the table has room for the VNIs to come.
    pub fn forget_vni_drops(&self, keep: impl Fn(u32) -> bool) {
        self.vni_drops
            .by_vni
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|vni, _| keep(*vni));
    }

    /// Number of registered tunnels.
    pub fn tunnel_count(&self) -> usize {
        self.tunnels.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// The node that reads this endpoint's socket while it has no tunnel (place it on the
    /// panel whose pool the endpoint uses, with no port).
    pub fn drain_node(self: &Arc<Self>) -> EndpointDrain {
        EndpointDrain {
            endpoint: Arc::clone(self),
            last: None,
        }
    }

    fn map(&self) -> Arc<TunnelMap> {
        Arc::clone(&self.tunnels.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// A tunnel to the endpoint at `remote` carrying VNI `vni`. Datagrams from `remote`'s IP
    /// address with that VNI (from any source port) are delivered to it. Refuses a VNI above 24
    /// bits, an unspecified remote address or port 0, a remote of another address family
    /// than the socket, and a second tunnel for the same (remote IP, VNI).
    pub fn tunnel(self: &Arc<Self>, remote: SocketAddr, vni: u32) -> Result<VxlanTunnel> {
        if vni > MAX_VNI {
            return Err(Error::config(
                "vxlan.vni",
                format!("{vni} is above {MAX_VNI} (a VNI has 24 bits)"),
            ));
        }
        if remote.ip().is_unspecified() || remote.port() == 0 {
            return Err(Error::config(
                "vxlan.remote",
                format!("{remote} must name a host address and a non-zero port"),
            ));
        }
        let dest = match (self.local, remote) {
            (SocketAddr::V4(_), SocketAddr::V6(r)) => match r.ip().to_ipv4_mapped() {
                Some(v4) => SocketAddr::new(IpAddr::V4(v4), r.port()),
                None => {
                    return Err(Error::config(
                        "vxlan.remote",
                        format!(
                            "{remote} is IPv6 but the endpoint is bound to IPv4 address {}",
                            self.local
                        ),
                    ));
                }
            },
            (SocketAddr::V6(_), SocketAddr::V4(r)) => {
                SocketAddr::new(IpAddr::V6(r.ip().to_ipv6_mapped()), r.port())
            }
            _ => remote,
        };
        let key = (canonical(remote.ip()), vni);
        let shared = Arc::new(TunnelShared {
            queue: ArrayQueue::new(QUEUE_CAPACITY),
            stats: Arc::new(VxlanTunnelStats::default()),
            pool: Arc::clone(&self.pool),
            vni,
            endpoint_stats: Arc::clone(&self.stats),
            vni_drops: Arc::clone(&self.vni_drops),
        });
        {
            // No receive round runs while the tunnel is registered and its held datagrams are
            // queued: they stay ahead of what arrives after.
            let _rx = self.rx_lock.lock().unwrap_or_else(|p| p.into_inner());
            let mut guard = self.tunnels.write().unwrap_or_else(|p| p.into_inner());
            if guard.contains_key(&key) {
                return Err(Error::config(
                    "vxlan.remote",
                    format!(
                        "endpoint {} already has a tunnel to {} with VNI {vni}; one tunnel per \
                         (remote address, VNI)",
                        self.local, key.0
                    ),
                ));
            }
            let mut next = TunnelMap::clone(&guard);
            next.insert(key, Arc::clone(&shared));
            *guard = Arc::new(next);
            drop(guard);
            self.deliver_early(&key, &shared);
        }
        let (dest_addr, dest_len) = sockaddr(dest);
        Ok(VxlanTunnel {
            endpoint: Arc::clone(self),
            shared,
            key,
            remote,
            header: header(vni),
            dest_addr,
            dest_len,
            buf: Vec::with_capacity(BATCH),
            fed: false,
            ends_left: 0,
            next_end: None,
        })
    }

    fn unregister(&self, key: &TunnelKey, shared: &Arc<TunnelShared>) {
        // No receive round holds the old map meanwhile: the tunnel's shared part goes with the
        // tunnel, its queue and drops counted with its VNI before the removal returns.
        let _rx = self.rx_lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut guard = self.tunnels.write().unwrap_or_else(|p| p.into_inner());
        if guard.get(key).is_some_and(|s| Arc::ptr_eq(s, shared)) {
            let mut next = TunnelMap::clone(&guard);
            next.remove(key);
            *guard = Arc::new(next);
        }
    }

    /// Drain the socket into the tunnels' queues, unless another poll is doing it now.
    /// Returns the datagrams received.
    fn receive(&self, io: &mut NodeIo<'_>) -> usize {
        if !std::ptr::eq(io.pool(), Arc::as_ptr(&self.pool)) {
            self.stats.pool_mismatch.fetch_add(1, Ordering::Relaxed);
            return 0;
        }
        let _guard = match self.rx_lock.try_lock() {
            Ok(g) => g,
            Err(TryLockError::WouldBlock) => return 0,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
        };
        self.expire_early();
        let map = self.map();
        // Counted once a round has datagrams to place (an idle poll reads no tunnel's queue).
        let mut held = None;
        let mut total = 0;
        for _ in 0..RECV_ROUNDS {
            let got = self.receive_batch(io, &map, &mut held);
            total += got;
            if got < BATCH {
                break;
            }
        }
        total
    }

    /// One `recvmmsg` of up to [`BATCH`] datagrams, each dispatched to its tunnel's queue.
    fn receive_batch(
        &self,
        io: &mut NodeIo<'_>,
        map: &TunnelMap,
        held: &mut Option<Held>,
    ) -> usize {
        let pool = io.pool();
        let mut slots: Vec<Packet> = Vec::with_capacity(BATCH);
        let k = io.alloc_batch(BATCH, &mut slots);
        if k == 0 {
            // Pool exhausted: the kernel keeps the datagrams until buffers come back.
            return 0;
        }
        let mut headers = [[0u8; HEADER_LEN]; BATCH];
        // SAFETY: all-zero iovec/mmsghdr/sockaddr_storage values are valid.
        let mut iov: [libc::iovec; 2 * BATCH] = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut from: [libc::sockaddr_storage; BATCH] = unsafe { std::mem::zeroed() };
        // Raw pointers taken once, so no later borrow of the arrays invalidates them.
        let (hdr_base, iov_base, from_base) =
            (headers.as_mut_ptr(), iov.as_mut_ptr(), from.as_mut_ptr());
        for (i, p) in slots.iter_mut().enumerate() {
            let (ptr, len) = pool.raw_buf(p);
            // SAFETY: i < k <= BATCH, so every offset stays inside its array.
            unsafe {
                let v = iov_base.add(2 * i);
                (*v).iov_base = hdr_base.add(i).cast();
                (*v).iov_len = HEADER_LEN;
                (*v.add(1)).iov_base = ptr.cast();
                (*v.add(1)).iov_len = len;
                msgs[i].msg_hdr.msg_iov = v;
                msgs[i].msg_hdr.msg_name = from_base.add(i).cast();
            }
            msgs[i].msg_hdr.msg_iovlen = 2;
            msgs[i].msg_hdr.msg_namelen =
                std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        }
        // SAFETY: `msgs[..k]` point at `iov`/`from` entries; the iovecs point at `headers` and
        // at the whole buffers of the `k` packets held exclusively in `slots` during the call.
        let rc = unsafe {
            libc::recvmmsg(
                self.socket.as_raw_fd(),
                msgs.as_mut_ptr(),
                k as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        let got = match usize::try_from(rc) {
            Ok(n) => n,
            Err(_) => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::WouldBlock {
                    self.stats.rx_errors.fetch_add(1, Ordering::Relaxed);
                }
                0
            }
        };
        if got == 0 {
            io.free_all(&mut slots);
            return 0;
        }
        self.stats
            .datagrams
            .fetch_add(got as u64, Ordering::Relaxed);
        let held = held.get_or_insert_with(|| {
            Held::of(map, self.early_len.load(Ordering::Acquire), &self.pool)
        });
        for (i, mut p) in slots.into_iter().enumerate() {
            if i >= got {
                io.free(p);
                continue;
            }
            let n = msgs[i].msg_len as usize;
            let src = source_ip(&from[i]);
            if n == HEADER_LEN && headers[i][0] & FLAG_END != 0 {
                // A sender's end: it goes after what its tunnel queued so far.
                if let Some(t) = header_vni(&headers[i])
                    .zip(src)
                    .and_then(|(v, s)| map.get(&(s, v)))
                {
                    let at = t.stats.queued.load(Ordering::Acquire) + 1;
                    let now = crate::packet::now_ns().max(1);
                    t.stats.end_marker_ns.store(now, Ordering::Release);
                    t.stats.end_marker_at.store(at, Ordering::Release);
                }
                self.stats.end_markers.fetch_add(1, Ordering::Relaxed);
                io.free(p);
                continue;
            }
            let vni = if n < HEADER_LEN + ETH_HEADER_LEN {
                None
            } else {
                header_vni(&headers[i])
            };
            let (Some(vni), Some(src)) = (vni, src) else {
                self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                io.free(p);
                continue;
            };
            let Some(t) = map.get(&(src, vni)) else {
                if msgs[i].msg_hdr.msg_flags & libc::MSG_TRUNC != 0 || held.full() {
                    self.drop_unknown((src, vni), p);
                } else {
                    pool.set_len(&mut p, n - HEADER_LEN);
                    self.hold_early((src, vni), p);
                    held.count += 1;
                }
                continue;
            };
            // The sender sends again: its end is over, whether this datagram is queued or not.
            if t.stats.end_marker_at.load(Ordering::Relaxed) != 0 {
                t.stats.end_marker_at.store(0, Ordering::Release);
            }
            if msgs[i].msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
                t.stats.rx_too_big.fetch_add(1, Ordering::Relaxed);
                io.free(p);
                continue;
            }
            pool.set_len(&mut p, n - HEADER_LEN);
            if held.full() && t.queue.len() >= held.fair_part {
                t.stats.rx_queue_full.fetch_add(1, Ordering::Relaxed);
                io.free(p);
                continue;
            }
            match t.queue.push(p) {
                Ok(()) => {
                    t.stats.queued.fetch_add(1, Ordering::Release);
                    held.count += 1;
                }
                Err(p) => {
                    t.stats.rx_queue_full.fetch_add(1, Ordering::Relaxed);
                    io.free(p);
                }
            }
        }
        got
    }
}

/// The pool buffers an endpoint's tunnels hold (queued, and early), as a receive round counts
/// them: at its start, plus what it queued since (what tunnels took meanwhile is not taken
/// off: the count errs high).
struct Held {
    count: usize,
    /// [`HELD_SHARE_OF_POOL`] of the pool.
    budget: usize,
    /// A tunnel's part of the budget.
    fair_part: usize,
}

impl Held {
    fn of(map: &TunnelMap, early: usize, pool: &Pool) -> Held {
        let budget = (pool.capacity() / HELD_SHARE_OF_POOL).max(QUEUE_CAPACITY);
        Held {
            count: map.values().map(|t| t.queue.len()).sum::<usize>() + early,
            budget,
            fair_part: (budget / map.len().max(1)).max(1),
        }
    }

    /// The budget is spent.
    fn full(&self) -> bool {
        self.count >= self.budget
    }
}

/// The socket address `a` as a `sockaddr_storage` and its length.
fn sockaddr(a: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: an all-zero sockaddr_storage is valid.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match a {
        SocketAddr::V4(v4) => {
            // SAFETY: sockaddr_storage is large and aligned enough for any sockaddr type.
            let sin = unsafe {
                &mut *(&mut ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>()
            };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = v4.port().to_be();
            sin.sin_addr.s_addr = u32::from_ne_bytes(v4.ip().octets());
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            // SAFETY: as above.
            let sin6 = unsafe {
                &mut *(&mut ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = v6.port().to_be();
            sin6.sin6_flowinfo = v6.flowinfo();
            sin6.sin6_addr.s6_addr = v6.ip().octets();
            sin6.sin6_scope_id = v6.scope_id();
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

/// The (canonical) IP address in a received `sockaddr_storage`.
fn source_ip(ss: &libc::sockaddr_storage) -> Option<IpAddr> {
    match libc::c_int::from(ss.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let sin =
                unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(IpAddr::V4(Ipv4Addr::from(
                sin.sin_addr.s_addr.to_ne_bytes(),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let sin6 =
                unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(canonical(IpAddr::V6(Ipv6Addr::from(
                sin6.sin6_addr.s6_addr,
            ))))
        }
        _ => None,
    }
}

/// A point-to-point link to one remote endpoint and VNI, as a [`Node`] with one port
/// ([`TUNNEL_PORT`]). Dropping it (removing the node) unregisters it from the endpoint.
pub struct VxlanTunnel {
    endpoint: Arc<VxlanEndpoint>,
    shared: Arc<TunnelShared>,
    key: TunnelKey,
    remote: SocketAddr,
    header: [u8; HEADER_LEN],
    dest_addr: libc::sockaddr_storage,
    dest_len: libc::socklen_t,
    buf: Vec<Packet>,
    /// A link sends into the port (as the last poll found it).
    fed: bool,
    /// End markers still to send since the link into the port went (a datagram the remote's
    /// kernel drops under load is not the only one).
    ends_left: u8,
    /// When the next of them goes.
    next_end: Option<Instant>,
}

impl std::fmt::Debug for VxlanTunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VxlanTunnel")
            .field("local", &self.endpoint.local)
            .field("remote", &self.remote)
            .field("vni", &self.key.1)
            .finish()
    }
}

impl VxlanTunnel {
    /// Shared counters.
    pub fn stats(&self) -> Arc<VxlanTunnelStats> {
        Arc::clone(&self.shared.stats)
    }

    /// The remote endpoint.
    pub fn remote(&self) -> SocketAddr {
        self.remote
    }

    /// The VNI.
    pub fn vni(&self) -> u32 {
        self.key.1
    }

    /// The endpoint whose socket this tunnel uses.
    pub fn endpoint(&self) -> &Arc<VxlanEndpoint> {
        &self.endpoint
    }

    /// Sends the end marker (see the module's comment); whether the kernel took it.
    fn send_end_marker(&self) -> bool {
        let marker = end_marker(self.key.1);
        // SAFETY: `marker` and the destination address outlive the call; the kernel only
        // reads them.
        let rc = unsafe {
            libc::sendto(
                self.endpoint.socket.as_raw_fd(),
                marker.as_ptr().cast(),
                HEADER_LEN,
                libc::MSG_DONTWAIT,
                (&self.dest_addr as *const libc::sockaddr_storage).cast(),
                self.dest_len,
            )
        };
        let sent = usize::try_from(rc).is_ok_and(|n| n == HEADER_LEN);
        if sent {
            self.shared
                .stats
                .end_markers_sent
                .fetch_add(1, Ordering::Relaxed);
        }
        sent
    }

    /// Send `self.buf` (at most [`BATCH`] frames) with `sendmmsg`, then free every packet.
    fn transmit(&mut self, io: &mut NodeIo<'_>) {
        let pool = io.pool();
        let stats = &self.shared.stats;
        let n = self.buf.len().min(BATCH);
        // SAFETY: all-zero iovec/mmsghdr values are valid (null pointers, zero lengths).
        let mut iov: [libc::iovec; 2 * BATCH] = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        let mut lens = [0usize; BATCH];
        let mut m = 0;
        for p in self.buf.iter().take(n) {
            if p.len() > MAX_INNER_FRAME {
                stats.tx_too_big.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let data = pool.data(p);
            iov[2 * m].iov_base = self.header.as_ptr() as *mut libc::c_void;
            iov[2 * m].iov_len = HEADER_LEN;
            iov[2 * m + 1].iov_base = data.as_ptr() as *mut libc::c_void;
            iov[2 * m + 1].iov_len = data.len();
            lens[m] = data.len();
            m += 1;
        }
        // Raw pointers taken after the last write to `iov`, so they stay valid for the call.
        let iov_base = iov.as_mut_ptr();
        let dest = (&self.dest_addr as *const libc::sockaddr_storage).cast_mut();
        for (j, msg) in msgs.iter_mut().take(m).enumerate() {
            // SAFETY: j < m <= BATCH, so the offset stays inside `iov`.
            msg.msg_hdr.msg_iov = unsafe { iov_base.add(2 * j) };
            msg.msg_hdr.msg_iovlen = 2;
            msg.msg_hdr.msg_name = dest.cast();
            msg.msg_hdr.msg_namelen = self.dest_len;
        }
        let mut done = 0usize;
        while done < m {
            // SAFETY: `msgs[done..m]` point at `iov` entries that point at the header, the
            // destination address and packet buffers held (unfreed) in `self.buf` during the
            // call; the kernel only reads them.
            let rc = unsafe {
                libc::sendmmsg(
                    self.endpoint.socket.as_raw_fd(),
                    msgs[done..].as_mut_ptr(),
                    (m - done) as libc::c_uint,
                    libc::MSG_DONTWAIT,
                )
            };
            match usize::try_from(rc) {
                Ok(k) if k > 0 => {
                    let bytes: usize = lens[done..done + k].iter().sum();
                    stats.tx_packets.fetch_add(k as u64, Ordering::Relaxed);
                    stats.tx_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
                    done += k;
                }
                _ => {
                    let e = std::io::Error::last_os_error();
                    let full = matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::ENOBUFS));
                    // A full socket buffer will not drain within this call: drop the rest of
                    // the batch. Any other error concerns the next frame only: drop it.
                    let dropped = if full { m - done } else { 1 };
                    stats.tx_errors.fetch_add(dropped as u64, Ordering::Relaxed);
                    done += dropped;
                }
            }
        }
        io.free_all(&mut self.buf);
    }
}

/// How often an [`EndpointDrain`] reads at most: it only counts what no tunnel takes, so a
/// read per worker round (a system call and a batch of buffers taken and given back) would
/// cost an idle host CPU time for nothing.
pub const DRAIN_EVERY: Duration = Duration::from_millis(1);

/// Reads an endpoint's socket while the endpoint has no tunnel (when it has one, its tunnels
/// read), every [`DRAIN_EVERY`] at most: a datagram is held for the tunnel it names, then
/// counted `unknown_tunnel`, as when a tunnel reads it.
pub struct EndpointDrain {
    endpoint: Arc<VxlanEndpoint>,
    last: Option<Instant>,
}

impl Node for EndpointDrain {
    fn poll(&mut self, io: &mut NodeIo<'_>) -> usize {
        if self.endpoint.tunnel_count() > 0
            || self.last.is_some_and(|at| at.elapsed() < DRAIN_EVERY)
        {
            return 0;
        }
        self.last = Some(Instant::now());
        self.endpoint.receive(io)
    }
}

impl Drop for VxlanTunnel {
    fn drop(&mut self) {
        // Removed while a link still sent into it: nothing more comes from here either.
        if self.fed || self.ends_left > 0 {
            self.send_end_marker();
        }
        self.endpoint.unregister(&self.key, &self.shared);
    }
}

impl Node for VxlanTunnel {
    fn poll(&mut self, io: &mut NodeIo<'_>) -> usize {
        // Encapsulate and send what the graph sends to this port.
        self.buf.clear();
        let sent = io.recv(0, &mut self.buf, BATCH);
        if sent > 0 {
            self.transmit(io);
        }
        // The link into the port went and its ring is drained: the remote hears it after the
        // last frame, [`END_MARKERS`] times [`END_MARKER_GAP`] apart.
        let fed = io.has_input(0);
        if self.fed && !fed {
            (self.ends_left, self.next_end) = (END_MARKERS, None);
        }
        self.fed = fed;
        if fed {
            self.ends_left = 0;
        } else if self.ends_left > 0 {
            let now = Instant::now();
            if self.next_end.is_none_or(|at| now >= at) && self.send_end_marker() {
                self.ends_left -= 1;
                self.next_end = Some(now + END_MARKER_GAP);
            }
        }
        // Drain the shared socket into every tunnel's queue (unless another poll does).
        let received = self.endpoint.receive(io);
        // Forward this tunnel's queue, only as much as the outgoing link has room for (the
        // rest waits in the queue). Unlinked, it waits too: a tunnel is placed before the
        // link out of it, and what arrives in between (a VNF that moved here, say) is kept.
        let room = if io.is_linked(0) {
            io.tx_space(0).min(BATCH)
        } else {
            0
        };
        self.buf.clear();
        while self.buf.len() < room {
            match self.shared.queue.pop() {
                Some(p) => self.buf.push(p),
                None => break,
            }
        }
        let delivered = self.buf.len();
        if delivered > 0 {
            let bytes: usize = self.buf.iter().map(Packet::len).sum();
            io.send(0, &mut self.buf);
            // Counted once on the link ([`VxlanTunnelStats::sender_done`] relies on it).
            let stats = &self.shared.stats;
            stats.rx_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
            stats
                .rx_packets
                .fetch_add(delivered as u64, Ordering::Release);
        }
        sent + received + delivered
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::node::{LinkCounters, PortIo, RxLink, TxLink};
    use crate::pool::PoolCache;
    use crate::ring::{self, Consumer, Producer};

    const LOCAL: &str = "127.0.0.1:0";

    #[test]
    fn header_encap_and_decap_are_exact() {
        assert_eq!(header(0x12_3456), [0x08, 0, 0, 0, 0x12, 0x34, 0x56, 0]);
        assert_eq!(header(0), [0x08, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(header(MAX_VNI), [0x08, 0, 0, 0, 0xff, 0xff, 0xff, 0]);
        let inner: Vec<u8> = (0..20u8).collect();
        let d = encap(0xab_cdef, &inner).unwrap();
        let mut want = vec![0x08, 0, 0, 0, 0xab, 0xcd, 0xef, 0];
        want.extend_from_slice(&inner);
        assert_eq!(d, want);
        let (vni, got) = decap(&d).unwrap();
        assert_eq!(vni, 0xab_cdef);
        assert_eq!(got, &inner[..]);
        // Reserved bits are ignored on receipt.
        let mut r = d.clone();
        r[0] = 0xff;
        r[1] = 0x55;
        r[7] = 0x99;
        assert_eq!(decap(&r).unwrap().0, 0xab_cdef);
    }

    #[test]
    fn decap_refuses_short_datagrams_and_a_missing_i_flag() {
        let short = [0x08u8, 0, 0, 0, 0, 0, 1, 0, 1, 2, 3];
        let e = decap(&short).unwrap_err().to_string();
        assert!(e.contains("11 bytes is too short"), "{e}");
        let e = decap(&[]).unwrap_err().to_string();
        assert!(e.contains("0 bytes is too short"), "{e}");
        let mut d = encap(7, &[0u8; 14]).unwrap();
        d[0] = 0x00;
        let e = decap(&d).unwrap_err().to_string();
        assert!(e.contains("I flag") && e.contains("0x00"), "{e}");
        let e = encap(MAX_VNI + 1, &[0u8; 14]).unwrap_err().to_string();
        assert!(e.contains("vxlan.vni") && e.contains("16777216"), "{e}");
        let big = vec![0u8; MAX_INNER_FRAME + 1];
        let e = encap(1, &big).unwrap_err().to_string();
        assert!(e.contains("vxlan.inner_frame"), "{e}");
    }

    /// One tunnel's port driven by hand: frames pushed into `into` arrive on the port, frames
    /// the port sends are read from `out`.
    struct Harness {
        pool: Arc<Pool>,
        cache: PoolCache,
        ports: Vec<PortIo>,
        into: Producer<Packet>,
        out: Consumer<Packet>,
    }

    impl Harness {
        fn new(pool: &Arc<Pool>, out_capacity: usize) -> Self {
            let (into, rx) = ring::channel::<Packet>("vxlan-in", 1024).unwrap();
            let (tx, out) = ring::channel::<Packet>("vxlan-out", out_capacity).unwrap();
            let port = PortIo {
                tx: Some(TxLink {
                    ring: tx,
                    counters: Arc::new(LinkCounters::default()),
                    bell: None,
                }),
                rx: vec![RxLink {
                    serial: 1,
                    ring: rx,
                }],
                ..PortIo::default()
            };
            Harness {
                pool: Arc::clone(pool),
                cache: PoolCache::new(),
                ports: vec![port],
                into,
                out,
            }
        }

        fn poll(&mut self, node: &mut dyn Node) -> usize {
            let mut io = NodeIo::new(&self.pool, &mut self.cache, &mut self.ports);
            node.poll(&mut io)
        }

        fn put(&mut self, bytes: &[u8]) {
            let mut p = self.pool.alloc().unwrap();
            self.pool.write(&mut p, bytes);
            assert!(self.into.push(p).is_ok(), "input ring full");
        }

        /// Frames the port sent, as bytes (their buffers freed).
        fn take(&mut self) -> Vec<Vec<u8>> {
            let mut out = Vec::new();
            while let Some(p) = self.out.pop() {
                out.push(self.pool.data(&p).to_vec());
                self.pool.free(p);
            }
            out
        }

        /// The link into the port goes (its ring finishes once drained).
        fn end_input(&mut self) {
            let (spare, _) = ring::channel::<Packet>("vxlan-in-gone", 2).unwrap();
            drop(std::mem::replace(&mut self.into, spare));
        }

        /// A new link into the port.
        fn link_input(&mut self) {
            let (into, rx) = ring::channel::<Packet>("vxlan-in-again", 1024).unwrap();
            self.ports[0].rx.push(RxLink {
                serial: 2,
                ring: rx,
            });
            self.into = into;
        }

        fn finish(mut self) {
            self.take();
            self.cache.flush(&self.pool);
        }
    }

    fn frame(i: usize) -> Vec<u8> {
        let len = [60, 64, 128, 1500, 1514][i % 5];
        (0..len).map(|k| (k * 7 + i) as u8).collect()
    }

    fn wait_until(what: &str, mut step: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !step() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::yield_now();
        }
    }

    #[test]
    fn frames_cross_between_two_endpoints_in_order_with_counters() {
        let pool = Arc::new(Pool::new("vxlan-cross", 2048, 2048).unwrap());
        let ea = VxlanEndpoint::bind(LOCAL.parse().unwrap(), Arc::clone(&pool)).unwrap();
        let eb = VxlanEndpoint::bind(LOCAL.parse().unwrap(), Arc::clone(&pool)).unwrap();
        assert_ne!(ea.local_addr().port(), 0);
        let mut ta = ea.tunnel(eb.local_addr(), 42).unwrap();
        let mut tb = eb.tunnel(ea.local_addr(), 42).unwrap();
        let (sa, sb) = (ta.stats(), tb.stats());
        let mut ha = Harness::new(&pool, 1024);
        let mut hb = Harness::new(&pool, 1024);

        const N: usize = 300;
        let sent: Vec<Vec<u8>> = (0..N).map(frame).collect();
        let total: usize = sent.iter().map(Vec::len).sum();
        let mut got = Vec::new();
        let mut next = 0;
        wait_until("300 frames through the tunnel", || {
            // Feed a batch at a time so the receiving socket buffer never overflows.
            if next < N && ha.into.free_space() > 0 && got.len() + BATCH >= next {
                for f in &sent[next..(next + BATCH).min(N)] {
                    ha.put(f);
                }
                next = (next + BATCH).min(N);
            }
            ha.poll(&mut ta);
            hb.poll(&mut tb);
            got.extend(hb.take());
            got.len() >= N
        });
        assert_eq!(got.len(), N);
        for (i, (g, s)) in got.iter().zip(&sent).enumerate() {
            assert_eq!(g, s, "frame {i} differs");
        }
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        assert_eq!(load(&sa.tx_packets), N as u64);
        assert_eq!(load(&sa.tx_bytes), total as u64);
        assert_eq!(load(&sb.rx_packets), N as u64);
        assert_eq!(load(&sb.rx_bytes), total as u64);
        assert_eq!((sa.drops(), sb.drops()), (0, 0));
        assert_eq!(load(&eb.stats().datagrams), N as u64);

        // And back the other way.
        hb.put(&frame(3));
        hb.put(&frame(4));
        let mut back = Vec::new();
        wait_until("2 frames back", || {
            hb.poll(&mut tb);
            ha.poll(&mut ta);
            back.extend(ha.take());
            back.len() >= 2
        });
        assert_eq!(back, vec![frame(3), frame(4)]);
        assert_eq!(load(&sb.tx_packets), 2);
        assert_eq!(load(&sa.rx_packets), 2);
        let es = eb.stats();
        assert_eq!((load(&es.unknown_tunnel), load(&es.malformed)), (0, 0));

        drop((ta, tb));
        ha.finish();
        hb.finish();
        assert_eq!(pool.available(), pool.capacity(), "buffers leaked");
    }

    #[test]
    fn a_sender_whose_link_went_says_so_after_its_last_frame() {
        let pool = Arc::new(Pool::new("vxlan-end", 512, 2048).unwrap());
        let ea = VxlanEndpoint::bind(LOCAL.parse().unwrap(), Arc::clone(&pool)).unwrap();
        let eb = VxlanEndpoint::bind(LOCAL.parse().unwrap(), Arc::clone(&pool)).unwrap();
        let mut ta = ea.tunnel(eb.local_addr(), 42).unwrap();
        let mut tb = eb.tunnel(ea.local_addr(), 42).unwrap();
        let (sa, sb) = (ta.stats(), tb.stats());
        let mut ha = Harness::new(&pool, 1024);
        // B's port passes 4 frames at a time: the rest wait in its queue.
        let mut hb = Harness::new(&pool, 4);
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        for i in 0..10 {
            ha.put(&frame(i));
        }
        wait_until("10 frames sent", || {
            ha.poll(&mut ta);
            load(&sa.tx_packets) == 10
        });
        // The link into A's port goes: its markers, after the frames, a few apart.
        ha.end_input();
        let ended = Instant::now();
        wait_until("the end markers sent", || {
            ha.poll(&mut ta);
            load(&sa.end_markers_sent) == u64::from(END_MARKERS)
        });
        assert!(ended.elapsed() >= END_MARKER_GAP * u32::from(END_MARKERS - 1));
        std::thread::sleep(END_MARKER_GAP * 2);
        ha.poll(&mut ta);
        assert_eq!(
            load(&sa.end_markers_sent),
            u64::from(END_MARKERS),
            "so many per end"
        );
        // B hears the end only once every frame before it left its port.
        let mut got = Vec::new();
        wait_until("B done with A's frames", || {
            hb.poll(&mut tb);
            let done = sb.sender_done();
            assert!(
                !done || got.len() + hb.out.len() == 10,
                "done with {} of 10 frames out",
                got.len() + hb.out.len()
            );
            got.extend(hb.take());
            done
        });
        got.extend(hb.take());
        assert_eq!(got, (0..10).map(frame).collect::<Vec<_>>());
        // The repeats change nothing; a marker from before a given time does not count.
        wait_until("every marker at B", || {
            hb.poll(&mut tb);
            load(&eb.stats().end_markers) == u64::from(END_MARKERS)
        });
        assert!(sb.sender_done());
        assert!(!sb.sender_done_since(crate::packet::now_ns()));
        // A datagram after the end that B cannot queue (larger than a pool buffer) still says
        // the sender sends again.
        let raw = UdpSocket::bind(LOCAL).unwrap();
        raw.send_to(&encap(42, &vec![1u8; 3000]).unwrap(), eb.local_addr())
            .unwrap();
        wait_until("the big datagram refused at B", || {
            hb.poll(&mut tb);
            load(&sb.rx_too_big) == 1
        });
        assert!(!sb.sender_done());
        // The sender links again and sends: its end is over.
        ha.link_input();
        ha.put(&frame(10));
        wait_until("the frame after the end queued at B", || {
            ha.poll(&mut ta);
            hb.poll(&mut tb);
            load(&sb.queued) == 11
        });
        assert!(!sb.sender_done());
        assert_eq!(load(&sa.end_markers_sent), u64::from(END_MARKERS));
        assert_eq!(load(&eb.stats().malformed), 0);
        drop((ta, tb));
        ha.finish();
        hb.finish();
        assert_eq!(pool.available(), pool.capacity(), "buffers leaked");
    }

    #[test]
    fn other_vni_other_source_and_malformed_datagrams_are_counted_not_delivered() {
        let pool = Arc::new(Pool::new("vxlan-unknown", 512, 2048).unwrap());
        let eb = VxlanEndpoint::bind(LOCAL.parse().unwrap(), Arc::clone(&pool)).unwrap();
        let mut tb = eb.tunnel("127.0.0.1:4789".parse().unwrap(), 42).unwrap();
        let mut hb = Harness::new(&pool, 1024);
        let from_a = UdpSocket::bind("127.0.0.1:0").unwrap();
        // Another source address (all of 127/8 is local on Linux).
        let from_other = UdpSocket::bind("127.0.0.2:0").unwrap();
        let to = eb.local_addr();
        let inner = frame(0);
        from_a.send_to(&encap(43, &inner).unwrap(), to).unwrap();
        from_other.send_to(&encap(42, &inner).unwrap(), to).unwrap();
        let mut no_flag = encap(42, &inner).unwrap();
        no_flag[0] = 0;
        from_a.send_to(&no_flag, to).unwrap();
        from_a.send_to(&header(42), to).unwrap();
        // One valid datagram, delivered.
        from_a.send_to(&encap(42, &inner).unwrap(), to).unwrap();
        let es = eb.stats();
        let mut got = Vec::new();
        wait_until("all 5 datagrams", || {
            hb.poll(&mut tb);
            got.extend(hb.take());
            es.datagrams.load(Ordering::Relaxed) == 5 && !got.is_empty()
        });
        assert_eq!(got, vec![inner]);
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        assert_eq!(load(&es.datagrams), 5);
        // The other VNI and the other source are held for a tunnel that may still come.
        assert_eq!((load(&es.early_held), load(&es.unknown_tunnel)), (2, 0));
        assert_eq!(load(&es.malformed), 2);
        assert_eq!(load(&tb.stats().rx_packets), 1);
        assert_eq!(tb.stats().drops(), 0);
        drop(tb);
        hb.finish();
        // The endpoint returns what it held when it goes.
        drop(eb);
        assert_eq!(pool.available(), pool.capacity(), "buffers leaked");
    }

    #[test]
    fn a_datagram_before_its_tunnel_is_delivered_first_once_the_tunnel_is_made() {
        let pool = Arc::new(Pool::new("vxlan-early", 512, 2048).unwrap());
        let eb = VxlanEndpoint::bind(LOCAL.parse().unwrap(), Arc::clone(&pool)).unwrap();
        // A tunnel of another VNI polls the shared socket meanwhile.
        let mut other = eb.tunnel("127.0.0.1:4789".parse().unwrap(), 1).unwrap();
        let mut h_other = Harness::new(&pool, 1024);
        let src = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = eb.local_addr();
        let (first, second, stale) = (frame(1), frame(2), frame(3));
        // VNI 8 never gets a tunnel: what came for it is dropped after EARLY_WAIT.
        src.send_to(&encap(8, &stale).unwrap(), to).unwrap();
        src.send_to(&encap(7, &first).unwrap(), to).unwrap();
        let es = eb.stats();
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        wait_until("two datagrams held", || {
            h_other.poll(&mut other);
            load(&es.early_held) == 2
        });
        let mut tb = eb.tunnel("127.0.0.1:4789".parse().unwrap(), 7).unwrap();
        src.send_to(&encap(7, &second).unwrap(), to).unwrap();
        let mut hb = Harness::new(&pool, 1024);
        let mut got = Vec::new();
        wait_until("both frames of VNI 7", || {
            hb.poll(&mut tb);
            got.extend(hb.take());
            got.len() == 2
        });
        assert_eq!(got, vec![first, second], "the held frame comes first");
        assert_eq!(load(&es.early_delivered), 1);
        assert_eq!(load(&es.unknown_tunnel), 0);
        wait_until("the frame of VNI 8 expired", || {
            h_other.poll(&mut other);
            load(&es.unknown_tunnel) == 1
        });
        assert_eq!(
            (eb.vni_drops(8), eb.vni_drops(7)),
            (1, 0),
            "the expired datagram is VNI 8's drop"
        );
        // A VNI no network holds any more is forgotten when asked.
        assert_eq!(eb.vni_drops_tracked(), 1);
        eb.forget_vni_drops(|v| v != 8);
        assert_eq!((eb.vni_drops(8), eb.vni_drops_tracked()), (0, 0));
        drop((tb, other));
        hb.finish();
        h_other.finish();
        drop(eb);
        assert_eq!(pool.available(), pool.capacity(), "buffers leaked");
    }

    #[test]
    fn a_full_queue_counts_drops_and_keeps_the_rest_in_order() {
        let pool = Arc::new(Pool::new("vxlan-full", 2048, 2048).unwrap());
        let eb = VxlanEndpoint::bind(LOCAL.parse().unwrap(), Arc::clone(&pool)).unwrap();
        let mut tb = eb.tunnel("127.0.0.1:4789".parse().unwrap(), 9).unwrap();
        let stats = tb.stats();
        // Nobody reads the output link: 32 frames fill it, QUEUE_CAPACITY wait in the queue.
        let mut hb = Harness::new(&pool, 32);
        let src = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = eb.local_addr();
        let total = 32 + QUEUE_CAPACITY + 56;
        let es = eb.stats();
        for chunk in 0..total.div_ceil(32) {
            for i in chunk * 32..(chunk * 32 + 32).min(total) {
                let mut inner = frame(0);
                inner[..8].copy_from_slice(&(i as u64).to_be_bytes());
                src.send_to(&encap(9, &inner).unwrap(), to).unwrap();
            }
            let want = ((chunk + 1) * 32).min(total) as u64;
            wait_until("a chunk received", || {
                hb.poll(&mut tb);
                es.datagrams.load(Ordering::Relaxed) == want
            });
        }
        assert_eq!(stats.rx_queue_full.load(Ordering::Relaxed), 56);
        assert_eq!(stats.drops(), 56);
        assert_eq!(stats.rx_packets.load(Ordering::Relaxed), 32);
        // Now read the link: the queued frames follow, in order, nothing else is lost.
        let mut got = Vec::new();
        wait_until("the queued frames", || {
            hb.poll(&mut tb);
            got.extend(hb.take());
            got.len() >= 32 + QUEUE_CAPACITY
        });
        let seqs: Vec<u64> = got
            .iter()
            .map(|f| u64::from_be_bytes(f[..8].try_into().unwrap()))
            .collect();
        let want: Vec<u64> = (0..(32 + QUEUE_CAPACITY) as u64).collect();
        assert_eq!(seqs, want);
        drop(tb);
        hb.finish();
        assert_eq!(pool.available(), pool.capacity(), "buffers leaked");
    }

    /// Eight tunnels nobody drains (unlinked, or their VNF stalled), flooded: together they
    /// hold about half the pool at most, and a tunnel that forwards still gets its datagrams
    /// (before, they took every buffer and the whole endpoint stopped receiving).
    #[test]
    fn stuck_tunnels_cannot_take_the_pool() {
        let pool = Arc::new(Pool::new("vxlan-stuck", 4096, 2048).unwrap());
        let eb = VxlanEndpoint::bind(LOCAL.parse().unwrap(), Arc::clone(&pool)).unwrap();
        let peer: SocketAddr = "127.0.0.1:4789".parse().unwrap();
        let stuck: Vec<VxlanTunnel> = (1..=8).map(|vni| eb.tunnel(peer, vni).unwrap()).collect();
        let mut live = eb.tunnel(peer, 9).unwrap();
        let mut hb = Harness::new(&pool, 1024);
        let src = UdpSocket::bind("127.0.0.1:0").unwrap();
        let es = eb.stats();
        let mut sent = 0u64;
        for round in 0..600 / 4 {
            for vni in 1..=8u32 {
                for _ in 0..4 {
                    src.send_to(&encap(vni, &frame(round)).unwrap(), eb.local_addr())
                        .unwrap();
                    sent += 1;
                }
            }
            wait_until("the flood read", || {
                hb.poll(&mut live);
                es.datagrams.load(Ordering::Relaxed) == sent
            });
        }
        assert!(
            pool.available() >= pool.capacity() / 2 - 2 * BATCH,
            "the stuck tunnels hold {} of {} buffers",
            pool.capacity() - pool.available(),
            pool.capacity()
        );
        let full: u64 = stuck
            .iter()
            .map(|t| t.stats().rx_queue_full.load(Ordering::Relaxed))
            .sum();
        assert!(full > 0, "what they could not hold is counted");
        for i in 0..10 {
            src.send_to(&encap(9, &frame(i)).unwrap(), eb.local_addr())
                .unwrap();
        }
        let mut got = 0;
        wait_until("the forwarding tunnel's datagrams", || {
            hb.poll(&mut live);
            got += hb.take().len();
            got == 10
        });
        drop(stuck);
        drop(live);
        hb.finish();
        assert_eq!(pool.available(), pool.capacity(), "buffers leaked");
    }

    #[test]
    fn dropping_a_tunnel_with_queued_frames_returns_them_to_the_pool() {
        let pool = Arc::new(Pool::new("vxlan-drop", 256, 2048).unwrap());
        let eb = VxlanEndpoint::bind(LOCAL.parse().unwrap(), Arc::clone(&pool)).unwrap();
        let mut t1 = eb.tunnel("127.0.0.1:4789".parse().unwrap(), 1).unwrap();
        let t2 = eb.tunnel("127.0.0.1:4789".parse().unwrap(), 2).unwrap();
        let mut h = Harness::new(&pool, 32);
        let src = UdpSocket::bind("127.0.0.1:0").unwrap();
        for _ in 0..10 {
            src.send_to(&encap(2, &frame(1)).unwrap(), eb.local_addr())
                .unwrap();
        }
        // t1's poll receives for t2, which is never polled.
        let es = eb.stats();
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        wait_until("10 datagrams", || {
            h.poll(&mut t1);
            es.datagrams.load(Ordering::Relaxed) == 10
        });
        assert_eq!(t2.shared.queue.len(), 10);
        assert_eq!(eb.tunnel_count(), 2);
        // A queue-full drop of t2's own is kept with its VNI once t2 goes.
        t2.stats().rx_queue_full.fetch_add(1, Ordering::Relaxed);
        assert_eq!((eb.vni_drops(2), load(&es.removed_queued)), (0, 0));
        drop(t2);
        assert_eq!(eb.tunnel_count(), 1);
        assert_eq!(
            (load(&es.removed_queued), eb.vni_drops(2), eb.vni_drops(1)),
            (10, 11, 0),
            "the frames t2 still queued are counted dropped, with its own drops, for VNI 2"
        );
        drop(t1);
        assert_eq!(eb.tunnel_count(), 0);
        h.finish();
        assert_eq!(pool.available(), pool.capacity(), "buffers leaked");
    }

    #[test]
    fn an_endpoint_without_tunnels_is_drained_and_what_it_holds_is_counted() {
        let pool = Arc::new(Pool::new("vxlan-drain", 256, 2048).unwrap());
        let eb = VxlanEndpoint::bind(LOCAL.parse().unwrap(), Arc::clone(&pool)).unwrap();
        let mut drain = eb.drain_node();
        let mut h = Harness::new(&pool, 32);
        let src = UdpSocket::bind("127.0.0.1:0").unwrap();
        src.send_to(&encap(5, &frame(1)).unwrap(), eb.local_addr())
            .unwrap();
        let es = eb.stats();
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        wait_until("the datagram held", || {
            h.poll(&mut drain);
            load(&es.early_held) == 1
        });
        // No tunnel of VNI 5 comes: the held datagram is dropped and counted.
        let deadline = Instant::now() + EARLY_WAIT * 4;
        while load(&es.unknown_tunnel) == 0 {
            assert!(Instant::now() < deadline, "the held datagram never expired");
            h.poll(&mut drain);
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!((eb.vni_drops(5), load(&es.datagrams)), (1, 1));
        // With a tunnel, the tunnel reads: the drain leaves the socket alone.
        let t = eb.tunnel("127.0.0.1:4789".parse().unwrap(), 6).unwrap();
        src.send_to(&encap(6, &frame(2)).unwrap(), eb.local_addr())
            .unwrap();
        for _ in 0..100 {
            assert_eq!(h.poll(&mut drain), 0);
        }
        assert_eq!(load(&es.datagrams), 1);
        drop(t);
        h.finish();
        drop(eb);
        assert_eq!(pool.available(), pool.capacity(), "buffers leaked");
    }

    #[test]
    fn datagrams_the_kernel_drops_are_counted() {
        let pool = Arc::new(Pool::new("vxlan-kdrop", 512, 2048).unwrap());
        let eb = VxlanEndpoint::bind(LOCAL.parse().unwrap(), Arc::clone(&pool)).unwrap();
        let mut tb = eb.tunnel("127.0.0.1:4789".parse().unwrap(), 3).unwrap();
        let mut hb = Harness::new(&pool, 1024);
        assert_eq!(eb.kernel_drops().unwrap(), 0);
        // Nobody polls: the socket's receive buffer overflows.
        let src = UdpSocket::bind("127.0.0.1:0").unwrap();
        let d = encap(3, &frame(3)).unwrap();
        let mut sent = 0u64;
        while eb.kernel_drops().unwrap() == 0 {
            assert!(sent < 1_000_000, "no drop after {sent} datagrams");
            src.send_to(&d, eb.local_addr()).unwrap();
            sent += 1;
        }
        let drops = eb.kernel_drops().unwrap();
        let es = eb.stats();
        let mut got = 0;
        wait_until("every datagram read or counted", || {
            hb.poll(&mut tb);
            got += hb.take().len() as u64;
            es.datagrams.load(Ordering::Relaxed) + drops == sent
        });
        wait_until("the queue delivered", || {
            hb.poll(&mut tb);
            got += hb.take().len() as u64;
            got + drops == sent
        });
        assert_eq!(tb.stats().drops(), 0);
        drop(tb);
        hb.finish();
        assert_eq!(pool.available(), pool.capacity(), "buffers leaked");
    }

    #[test]
    fn bad_tunnel_requests_are_precise() {
        let pool = Arc::new(Pool::new("vxlan-bad", 64, 2048).unwrap());
        let e = VxlanEndpoint::bind(LOCAL.parse().unwrap(), Arc::clone(&pool)).unwrap();
        let remote: SocketAddr = "127.0.0.1:4789".parse().unwrap();
        let t = e.tunnel(remote, 5).unwrap();
        let err = e.tunnel(remote, 5).unwrap_err().to_string();
        assert!(
            err.contains("already has a tunnel to 127.0.0.1 with VNI 5"),
            "{err}"
        );
        // Another source port of the same host is the same tunnel key.
        let err = e
            .tunnel("127.0.0.1:5000".parse().unwrap(), 5)
            .unwrap_err()
            .to_string();
        assert!(err.contains("already has a tunnel"), "{err}");
        let err = e.tunnel(remote, MAX_VNI + 1).unwrap_err().to_string();
        assert!(
            err.contains("vxlan.vni") && err.contains("24 bits"),
            "{err}"
        );
        let err = e
            .tunnel("0.0.0.0:4789".parse().unwrap(), 1)
            .unwrap_err()
            .to_string();
        assert!(err.contains("vxlan.remote"), "{err}");
        let err = e
            .tunnel("127.0.0.1:0".parse().unwrap(), 1)
            .unwrap_err()
            .to_string();
        assert!(err.contains("non-zero port"), "{err}");
        let err = e
            .tunnel("[2001:db8::1]:4789".parse().unwrap(), 1)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("is IPv6 but the endpoint is bound to IPv4"),
            "{err}"
        );
        drop(t);
        assert!(
            e.tunnel(remote, 5).is_ok(),
            "a dropped tunnel's key is free again"
        );
        let taken = e.local_addr();
        let err = VxlanEndpoint::bind(taken, pool).unwrap_err().to_string();
        assert!(
            err.contains(&format!("bind VXLAN socket to {taken}")),
            "{err}"
        );
        assert_eq!(tunnel_node("x"), "tun:x");
        assert_eq!(tunnel_port("x").to_string(), "tun:x.io");
    }
}
