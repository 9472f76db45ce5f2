//! Host ports: a socket bound to one host interface (veth, TAP, a real NIC), optionally inside
//! a named network namespace. As a [`Node`] it has one port: frames received on the interface
//! leave through it, frames arriving on it are transmitted on the interface.
//!
//! The socket is an AF_XDP one (`crate::xdp`) where the interface has zero-copy AF_XDP (or
//! where asked for, [`RxMode::Xdp`], also in copy mode); else an AF_PACKET socket receiving from
//! a TPACKET_V3 ring mapped from the kernel (read in place, no system call per batch) where the
//! socket allows it, else with `recvmmsg`, and sending with `sendmmsg`.
//! [`HostPort::rx_mode`] says which, [`HostPort::xdp_refused`] why AF_XDP was not used.
//!
//! Owns the socket; must not create interfaces or namespaces (callers and tests do). Frames
//! this socket itself transmits are not received back (`PACKET_IGNORE_OUTGOING`). Offloads
//! (TSO/GSO/GRO, checksum offload) must be off on the interface, or the kernel hands over
//! frames larger than a pool buffer or with unfinished checksums (see docs/dataplane.md).

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::error::{Error, Result};
use crate::netdev;
use crate::node::{BATCH, Node, NodeIo};
use crate::pool::Packet;
use crate::region::Mapping;
use crate::xdp::XdpSocket;

/// `PACKET_IGNORE_OUTGOING` socket option (Linux 4.20+), not in every libc version.
const PACKET_IGNORE_OUTGOING: libc::c_int = 23;

/// Counters of a host port.
#[derive(Debug, Default)]
pub struct HostPortStats {
    /// Frames received from the interface and sent into the graph.
    pub rx: AtomicU64,
    /// Frames transmitted on the interface.
    pub tx: AtomicU64,
    /// Received frames larger than a pool buffer (dropped).
    pub rx_truncated: AtomicU64,
    /// Frames the kernel refused to transmit (dropped).
    pub tx_errors: AtomicU64,
    /// Received frames dropped because the pool had no buffer.
    pub rx_no_buffer: AtomicU64,
    /// Frames the kernel dropped before the port took them (its receive ring or socket
    /// buffer full, no free frame); read from the socket every [`KERNEL_STATS_EVERY`] polls.
    pub rx_kernel_dropped: AtomicU64,
    /// On an AF_XDP port, the frames each receive queue's socket took (index: queue), read
    /// with the kernel's counters; empty otherwise.
    pub rx_per_queue: std::sync::Mutex<Vec<u64>>,
}

impl HostPortStats {
    /// Every received frame that was dropped, wherever.
    pub fn rx_dropped(&self) -> u64 {
        self.rx_truncated.load(Ordering::Relaxed)
            + self.rx_no_buffer.load(Ordering::Relaxed)
            + self.rx_kernel_dropped.load(Ordering::Relaxed)
    }
}

/// How often (in polls) a port reads the kernel's drop counters of its socket.
pub const KERNEL_STATS_EVERY: u32 = 1024;

/// How a host port receives and sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxMode {
    /// Zero-copy AF_XDP sockets where the interface's driver has them (native XDP, at most
    /// eight receive queues: one socket each), else as [`RxMode::Packet`]. Copy-mode AF_XDP (veth) is not chosen: there
    /// it measured slower than the packet ring for TCP and no faster at the no-drop rate.
    Auto,
    /// An AF_XDP socket, copy mode where the driver has no zero-copy, wherever the interface
    /// allows one; else as [`RxMode::Packet`].
    Xdp,
    /// An AF_PACKET socket: a TPACKET_V3 ring when the socket allows one, else `recvmmsg`.
    Packet,
    /// `recvmmsg` (a system call per batch).
    Syscalls,
}

/// A host port's socket on one interface: AF_XDP or AF_PACKET.
pub struct HostPort {
    /// The AF_XDP socket that receives and sends, when used.
    xdp: Option<XdpSocket>,
    /// Why AF_XDP was not used (when it was tried).
    xdp_refused: Option<String>,
    ring: Option<RxRing>,
    /// The AF_PACKET socket: receives and sends without AF_XDP; with it, only holds the
    /// interface's promiscuous mode (bound to no protocol, it receives nothing).
    fd: OwnedFd,
    ifname: String,
    stats: Arc<HostPortStats>,
    buf: Vec<Packet>,
    /// Polls until the kernel's drop counters are read again.
    until_kernel_stats: u32,
}

impl HostPort {
    /// Open `ifname` in the caller's network namespace.
    pub fn open(ifname: &str) -> Result<Self> {
        Self::open_in(ifname, None)
    }

    /// Open `ifname` inside the network namespace at `netns` (e.g. `/run/netns/blue`); the
    /// socket stays in that namespace while the calling thread's namespace is untouched (a
    /// short-lived helper thread enters the namespace).
    pub fn open_in(ifname: &str, netns: Option<&Path>) -> Result<Self> {
        Self::open_with(ifname, netns, RxMode::Auto)
    }

    /// [`HostPort::open_in`], receiving as `mode` says.
    pub fn open_with(ifname: &str, netns: Option<&Path>, mode: RxMode) -> Result<Self> {
        if ifname.is_empty() || ifname.len() > 15 {
            return Err(Error::config(
                "host_port.ifname",
                format!("{ifname:?} must be 1-15 bytes"),
            ));
        }
        let (fd, xdp) = match netns {
            None => open_sockets(ifname, mode)?,
            Some(ns) => {
                let ns = ns.to_path_buf();
                let name = ifname.to_string();
                std::thread::Builder::new()
                    .name("tv-netns".into())
                    .spawn(move || -> Result<Sockets> {
                        enter_netns(&ns)?;
                        open_sockets(&name, mode)
                    })
                    .map_err(|e| Error::io("spawn netns helper thread", e))?
                    .join()
                    .map_err(|_| Error::config("host_port", "netns helper thread panicked"))??
            }
        };
        let (xdp, xdp_refused) = match xdp {
            Ok(x) => (Some(x), None),
            Err(why) => (None, why),
        };
        // A ring the socket refuses (an old kernel, a locked-memory limit) is not an error:
        // the port receives with system calls.
        let ring = match mode {
            _ if xdp.is_some() => None,
            RxMode::Auto | RxMode::Xdp | RxMode::Packet => RxRing::map(&fd).ok(),
            RxMode::Syscalls => None,
        };
        Ok(HostPort {
            xdp,
            xdp_refused,
            ring,
            fd,
            ifname: ifname.to_string(),
            stats: Arc::new(HostPortStats::default()),
            buf: Vec::with_capacity(BATCH),
            until_kernel_stats: 0,
        })
    }

    /// Shared counters.
    pub fn stats(&self) -> Arc<HostPortStats> {
        Arc::clone(&self.stats)
    }

    /// The interface name.
    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    /// How the port receives: `af_xdp_zerocopy` or `af_xdp_copy` (an AF_XDP socket),
    /// `tpacket_v3` (a mapped ring) or `recvmmsg`.
    pub fn rx_mode(&self) -> &'static str {
        match (&self.xdp, &self.ring) {
            (Some(x), _) => x.mode(),
            (None, Some(_)) => "tpacket_v3",
            (None, None) => "recvmmsg",
        }
    }

    /// The receive queues with an AF_XDP socket of this port (`None`: not AF_XDP).
    pub fn xdp_queues(&self) -> Option<u32> {
        self.xdp.as_ref().map(|x| x.queue_count())
    }

    /// Why AF_XDP is not used, when it was tried ([`RxMode::Auto`], [`RxMode::Xdp`]) and
    /// refused.
    pub fn xdp_refused(&self) -> Option<&str> {
        self.xdp_refused.as_deref()
    }

    /// Bring [`HostPortStats::rx_kernel_dropped`] up to date from the socket.
    pub fn read_kernel_stats(&mut self) {
        if let Some(x) = &self.xdp {
            *self
                .stats
                .rx_per_queue
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = x.received_per_queue();
            // The socket's counters only grow; a failed read leaves the last value.
            if let Some(dropped) = x.kernel_rx_dropped() {
                self.stats
                    .rx_kernel_dropped
                    .store(dropped, Ordering::Relaxed);
            }
            return;
        }
        // struct tpacket_stats_v3: packets, drops, freeze count; the kernel zeroes them on
        // each read, so drops add up here.
        let mut st = [0u32; 3];
        let mut len = std::mem::size_of_val(&st) as libc::socklen_t;
        // SAFETY: valid fd; `st` is writable for `len` bytes.
        let rc = unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_STATISTICS,
                st.as_mut_ptr().cast(),
                &mut len,
            )
        };
        if rc == 0 {
            self.stats
                .rx_kernel_dropped
                .fetch_add(u64::from(st[1]), Ordering::Relaxed);
        }
    }
}

/// The sockets of a port: the AF_PACKET socket, and the AF_XDP socket or why there is none
/// (`None`: not tried).
type Sockets = (OwnedFd, std::result::Result<XdpSocket, Option<String>>);

/// Open the port's sockets in the calling thread's namespace: AF_XDP first in
/// [`RxMode::Auto`] and [`RxMode::Xdp`], with an AF_PACKET socket that only holds
/// promiscuous mode; else an AF_PACKET socket that carries the frames.
fn open_sockets(ifname: &str, mode: RxMode) -> Result<Sockets> {
    if !matches!(mode, RxMode::Auto | RxMode::Xdp) {
        return Ok((open_socket(ifname, true)?, Err(None)));
    }
    let ifindex = if_index(ifname)?;
    // In `auto`, what the driver says it can do (kernel 6.3+) spares loading a program and
    // mapping a UMEM to find out. A driver that reports no feature at all may predate the
    // reporting: it is tried, as is every driver when AF_XDP is asked for.
    if mode == RxMode::Auto
        && let Some(features) = netdev::xdp_features(ifindex).filter(|f| *f != 0)
    {
        let redirect = netdev::XDP_ACT_BASIC | netdev::XDP_ACT_REDIRECT;
        let why = if features & redirect != redirect {
            Some(format!(
                "{ifname} has no native XDP redirect (its driver's XDP features: {})",
                netdev::xdp_feature_names(features)
            ))
        } else if features & netdev::XDP_ACT_XSK_ZEROCOPY == 0 {
            Some(format!(
                "{ifname} has no zero-copy AF_XDP (its driver copies; XDP features: {})",
                netdev::xdp_feature_names(features)
            ))
        } else {
            None
        };
        if why.is_some() {
            return Ok((open_socket(ifname, true)?, Err(why)));
        }
    }
    match XdpSocket::open(ifname, ifindex, mode == RxMode::Xdp) {
        Ok(x) => Ok((open_socket(ifname, false)?, Ok(x))),
        Err(e) => Ok((open_socket(ifname, true)?, Err(Some(e.to_string())))),
    }
}

/// Move the calling thread into the network namespace at `ns`.
pub(crate) fn enter_netns(ns: &Path) -> Result<()> {
    let f = std::fs::File::open(ns)
        .map_err(|e| Error::io(format!("open network namespace {}", ns.display()), e))?;
    // SAFETY: `f` is an open namespace file; setns only changes this (helper) thread.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(Error::last_os(format!("setns({})", ns.display())));
    }
    Ok(())
}

/// The index of `ifname` in the calling thread's namespace.
fn if_index(ifname: &str) -> Result<u32> {
    let cname = CString::new(ifname)
        .map_err(|_| Error::config("host_port.ifname", "must not contain NUL"))?;
    // SAFETY: `cname` is a valid C string.
    let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    if ifindex == 0 {
        return Err(Error::last_os(format!("interface {ifname}")));
    }
    Ok(ifindex)
}

/// An AF_PACKET socket on `ifname` with the interface in promiscuous mode; bound to every
/// protocol when it `carries` the frames, else to none (it receives nothing).
fn open_socket(ifname: &str, carries: bool) -> Result<OwnedFd> {
    let ifindex = if_index(ifname)?;
    let proto = if carries {
        (libc::ETH_P_ALL as u16).to_be()
    } else {
        0
    };
    // SAFETY: plain socket(2) call with constant arguments.
    let raw = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            libc::c_int::from(proto),
        )
    };
    if raw < 0 {
        return Err(Error::last_os(format!(
            "socket(AF_PACKET) for {ifname} (needs CAP_NET_RAW)"
        )));
    }
    // SAFETY: `raw` is a fresh fd we own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let one: libc::c_int = 1;
    // SAFETY: valid fd, option value is a c_int of the size passed. Failure (old kernel) is
    // tolerated: we then also filter PACKET_OUTGOING frames on receive.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            PACKET_IGNORE_OUTGOING,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    if !carries {
        promiscuous(&fd, ifindex, ifname)?;
        return Ok(fd);
    }
    // SAFETY: an all-zero sockaddr_ll is valid; we fill the fields bind needs.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: `sll` is a valid sockaddr_ll and we pass its exact size.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(Error::last_os(format!("bind AF_PACKET to {ifname}")));
    }
    promiscuous(&fd, ifindex, ifname)?;
    Ok(fd)
}

/// Put the interface in promiscuous mode for as long as `fd` lives, so a real NIC hands over
/// frames for other MAC addresses too.
fn promiscuous(fd: &OwnedFd, ifindex: u32, ifname: &str) -> Result<()> {
    // SAFETY: an all-zero packet_mreq is valid.
    let mut mr: libc::packet_mreq = unsafe { std::mem::zeroed() };
    mr.mr_ifindex = ifindex as i32;
    mr.mr_type = libc::PACKET_MR_PROMISC as u16;
    // SAFETY: valid fd and option struct of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_ADD_MEMBERSHIP,
            (&mr as *const libc::packet_mreq).cast(),
            std::mem::size_of::<libc::packet_mreq>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(Error::last_os(format!(
            "PACKET_ADD_MEMBERSHIP promisc on {ifname}"
        )));
    }
    Ok(())
}

impl HostPort {
    /// Transmit `self.buf` with one `sendmmsg` (retrying the rest while the kernel accepts
    /// some), then free every packet.
    fn transmit(&mut self, io: &mut NodeIo<'_>) {
        let pool = io.pool();
        if let Some(x) = self.xdp.as_mut() {
            let dropped = x.transmit(self.buf.iter().map(|p| pool.data(p)));
            self.stats
                .tx_errors
                .fetch_add(dropped as u64, Ordering::Relaxed);
            // Counted as sent when the kernel hands the frame back.
            self.stats
                .tx
                .fetch_add(x.take_completed(), Ordering::Relaxed);
            io.free_all(&mut self.buf);
            return;
        }
        // `poll` receives at most BATCH packets into `buf`.
        let n = self.buf.len().min(BATCH);
        // SAFETY: all-zero iovec/mmsghdr values are valid (null pointers, zero lengths).
        let mut iov: [libc::iovec; BATCH] = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        for (i, p) in self.buf.iter().take(n).enumerate() {
            let data = pool.data(p);
            iov[i].iov_base = data.as_ptr() as *mut libc::c_void;
            iov[i].iov_len = data.len();
            msgs[i].msg_hdr.msg_iov = &mut iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
        }
        let mut done = 0usize;
        while done < n {
            // SAFETY: `msgs[done..n]` point at `iov` entries that point at packet buffers held
            // (unfreed) in `self.buf` for the duration of the call.
            let rc = unsafe {
                libc::sendmmsg(
                    self.fd.as_raw_fd(),
                    msgs[done..].as_mut_ptr(),
                    (n - done) as libc::c_uint,
                    libc::MSG_DONTWAIT,
                )
            };
            if rc <= 0 {
                // The kernel refused the next frame (queue full, too big, link down): drop it
                // and go on with the rest.
                self.stats.tx_errors.fetch_add(1, Ordering::Relaxed);
                done += 1;
            } else {
                self.stats.tx.fetch_add(rc as u64, Ordering::Relaxed);
                done += rc as usize;
            }
        }
        io.free_all(&mut self.buf);
    }

    /// Receive up to `room` frames from the mapped ring or the AF_XDP socket onto
    /// `self.buf`; returns how many.
    fn receive_ring(&mut self, io: &mut NodeIo<'_>, room: usize) -> usize {
        let before = self.buf.len();
        let (buf, stats) = (&mut self.buf, &self.stats);
        let pool = io.pool();
        let mut copy = |data: &[u8]| {
            if data.len() > pool.buf_size() {
                stats.rx_truncated.fetch_add(1, Ordering::Relaxed);
                return;
            }
            match io.alloc() {
                Some(mut p) => {
                    pool.write(&mut p, data);
                    buf.push(p);
                }
                None => {
                    stats.rx_no_buffer.fetch_add(1, Ordering::Relaxed);
                }
            }
        };
        if let Some(x) = self.xdp.as_mut() {
            x.receive(room.min(BATCH), copy);
        } else if let Some(ring) = self.ring.as_mut() {
            ring.take(room.min(BATCH), |data, pkttype| {
                if pkttype != libc::PACKET_OUTGOING {
                    copy(data);
                }
            });
        }
        self.buf.len() - before
    }

    /// Receive up to `room` frames with one `recvmmsg` onto `self.buf`; returns how many.
    fn receive(&mut self, io: &mut NodeIo<'_>, room: usize) -> usize {
        if self.ring.is_some() || self.xdp.is_some() {
            return self.receive_ring(io, room);
        }
        let pool = io.pool();
        let mut slots: Vec<Packet> = Vec::with_capacity(room);
        io.alloc_batch(room.min(BATCH), &mut slots);
        let k = slots.len();
        if k == 0 {
            return 0;
        }
        // SAFETY: all-zero iovec/mmsghdr/sockaddr_ll values are valid.
        let mut iov: [libc::iovec; BATCH] = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut from: [libc::sockaddr_ll; BATCH] = unsafe { std::mem::zeroed() };
        for (i, p) in slots.iter_mut().enumerate() {
            let (ptr, len) = pool.raw_buf(p);
            iov[i].iov_base = ptr.cast();
            iov[i].iov_len = len;
            msgs[i].msg_hdr.msg_iov = &mut iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
            msgs[i].msg_hdr.msg_name = (&mut from[i] as *mut libc::sockaddr_ll).cast();
            msgs[i].msg_hdr.msg_namelen =
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        }
        // SAFETY: `msgs[..k]` point at `iov`/`from` entries, and the iovecs at the whole
        // buffers of the `k` packets exclusively held in `slots` during the call.
        let rc = unsafe {
            libc::recvmmsg(
                self.fd.as_raw_fd(),
                msgs.as_mut_ptr(),
                k as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        let got = usize::try_from(rc).unwrap_or(0);
        let before = self.buf.len();
        for (i, mut p) in slots.into_iter().enumerate() {
            if i >= got || from[i].sll_pkttype == libc::PACKET_OUTGOING {
                io.free(p);
            } else if msgs[i].msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
                self.stats.rx_truncated.fetch_add(1, Ordering::Relaxed);
                io.free(p);
            } else {
                pool.set_len(&mut p, msgs[i].msg_len as usize);
                self.buf.push(p);
            }
        }
        self.buf.len() - before
    }
}

/// A TPACKET_V3 receive ring mapped from the kernel: frames are read in place (one copy into
/// the pool, no system call per batch); a block goes back to the kernel once every frame in it
/// was taken.
pub(crate) struct RxRing {
    map: Mapping,
    block_size: usize,
    blocks: usize,
    /// The block being read, the frame within it, and where that frame starts.
    block: usize,
    frame: u32,
    offset: usize,
}

/// Ring geometry: 64 blocks of 256 KiB (16 MiB), frames up to 2 KiB; a block is handed over
/// after 1 ms even when not full, so a trickle is not held back.
const RX_BLOCK_SIZE: u32 = 1 << 18;
const RX_BLOCKS: u32 = 64;
const RX_FRAME_SIZE: u32 = 2048;
const RX_BLOCK_TIMEOUT_MS: u32 = 1;
const TP_STATUS_KERNEL: u32 = 0;
const TP_STATUS_USER: u32 = 1;
const TPACKET_V3: libc::c_int = 2;
const PACKET_VERSION: libc::c_int = 10;
const PACKET_RX_RING: libc::c_int = 5;
/// `sizeof(struct tpacket3_hdr)` aligned to TPACKET_ALIGNMENT (16): where the frame's
/// `sockaddr_ll` starts.
const TPACKET3_HDR: usize = 48;

impl RxRing {
    /// Switch `fd` (an AF_PACKET socket not yet bound) to TPACKET_V3 with a receive ring and map
    /// it. Fails on kernels or sockets without it; the caller then receives with `recvmmsg`.
    pub(crate) fn map(fd: &OwnedFd) -> Result<RxRing> {
        let version: libc::c_int = TPACKET_V3;
        // SAFETY: valid fd, option value a c_int of the size passed.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_PACKET,
                PACKET_VERSION,
                (&version as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(Error::last_os("PACKET_VERSION TPACKET_V3"));
        }
        // struct tpacket_req3: block size, block count, frame size, frame count, block
        // timeout (ms), private area size, feature word.
        let req: [u32; 7] = [
            RX_BLOCK_SIZE,
            RX_BLOCKS,
            RX_FRAME_SIZE,
            RX_BLOCK_SIZE / RX_FRAME_SIZE * RX_BLOCKS,
            RX_BLOCK_TIMEOUT_MS,
            0,
            0,
        ];
        // SAFETY: valid fd; `req` has tpacket_req3's layout and size.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_PACKET,
                PACKET_RX_RING,
                req.as_ptr().cast(),
                std::mem::size_of_val(&req) as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(Error::last_os("PACKET_RX_RING"));
        }
        let len = (RX_BLOCK_SIZE * RX_BLOCKS) as usize;
        let map = Mapping::shared_at(fd, len, 0, "mmap of the TPACKET_V3 ring")?;
        Ok(RxRing {
            map,
            block_size: RX_BLOCK_SIZE as usize,
            blocks: RX_BLOCKS as usize,
            block: 0,
            frame: 0,
            offset: 0,
        })
    }

    fn block_ptr(&self) -> *mut u8 {
        // SAFETY: `block` < `blocks`, so the offset is inside the mapping.
        unsafe { self.map.ptr().as_ptr().add(self.block * self.block_size) }
    }

    fn read_u32(p: *const u8, at: usize) -> u32 {
        // SAFETY: callers pass pointers inside the mapping with `at + 4` within the header
        // the kernel wrote; unaligned reads are allowed.
        unsafe { std::ptr::read_unaligned(p.add(at).cast::<u32>()) }
    }

    fn block_status(&self) -> &AtomicU32 {
        // SAFETY: `block_status` is the u32 at offset 8 of the block descriptor, 4-aligned
        // (blocks are page-aligned); the kernel and this ring hand it back and forth.
        unsafe { &*self.block_ptr().add(8).cast::<AtomicU32>() }
    }

    /// Take up to `max` frames: each `copy(data, pkttype)` call gets one frame. Returns how
    /// many frames were offered to `copy`.
    pub(crate) fn take(&mut self, max: usize, mut copy: impl FnMut(&[u8], u8)) -> usize {
        let mut taken = 0;
        while taken < max {
            if self.block_status().load(Ordering::Acquire) & TP_STATUS_USER == 0 {
                break;
            }
            let block = self.block_ptr();
            let frames = Self::read_u32(block, 12);
            if self.frame == 0 {
                self.offset = Self::read_u32(block, 16) as usize;
            }
            while self.frame < frames && taken < max {
                // SAFETY: the kernel wrote a tpacket3_hdr at `offset` within this block.
                let hdr = unsafe { block.add(self.offset) };
                let next = Self::read_u32(hdr, 0) as usize;
                let snaplen = Self::read_u32(hdr, 12) as usize;
                // SAFETY: tp_mac (u16 at 24) is inside the header.
                let mac = unsafe { std::ptr::read_unaligned(hdr.add(24).cast::<u16>()) } as usize;
                // SAFETY: sll_pkttype is byte 10 of the sockaddr_ll after the header.
                let pkttype = unsafe { *hdr.add(TPACKET3_HDR + 10) };
                let fits = self.offset + mac + snaplen <= self.block_size;
                if fits {
                    // SAFETY: the frame lies within this block (checked above).
                    let data = unsafe { std::slice::from_raw_parts(hdr.add(mac), snaplen) };
                    copy(data, pkttype);
                }
                taken += 1;
                self.frame += 1;
                self.offset += next;
            }
            if self.frame >= frames {
                self.block_status()
                    .store(TP_STATUS_KERNEL, Ordering::Release);
                self.block = (self.block + 1) % self.blocks;
                self.frame = 0;
            }
        }
        taken
    }
}

impl Node for HostPort {
    fn poll(&mut self, io: &mut NodeIo<'_>) -> usize {
        if self.until_kernel_stats == 0 {
            self.read_kernel_stats();
            self.until_kernel_stats = KERNEL_STATS_EVERY;
        }
        self.until_kernel_stats -= 1;
        // Transmit what the graph sends to this port.
        self.buf.clear();
        let sent = io.recv(0, &mut self.buf, BATCH);
        if sent > 0 {
            self.transmit(io);
        } else if let Some(x) = self.xdp.as_mut().filter(|x| x.tx_pending()) {
            // Frames the kernel did not take on the last call go out now.
            x.kick();
            self.stats
                .tx
                .fetch_add(x.take_completed(), Ordering::Relaxed);
        }
        // Receive from the interface, only as much as the outgoing link can take (the kernel
        // socket buffer absorbs bursts; beyond it the kernel drops and counts).
        let room = if io.is_linked(0) {
            io.tx_space(0).min(BATCH)
        } else {
            BATCH
        };
        let r = if room > 0 { self.receive(io, room) } else { 0 };
        if r > 0 {
            self.stats.rx.fetch_add(r as u64, Ordering::Relaxed);
            io.send(0, &mut self.buf);
        }
        sent + r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_interface_and_bad_names_are_errors() {
        let e = HostPort::open("tvnosuchif0").err().unwrap().to_string();
        assert!(e.contains("tvnosuchif0"), "{e}");
        let e = HostPort::open("").err().unwrap().to_string();
        assert!(e.contains("host_port.ifname"), "{e}");
        let e = HostPort::open("a-name-that-is-too-long")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("1-15 bytes"), "{e}");
        let e = HostPort::open_in("lo", Some(Path::new("/run/netns/tv-none-such")))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("/run/netns/tv-none-such"), "{e}");
    }
}
