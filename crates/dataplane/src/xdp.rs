//! AF_XDP sockets for host ports: one socket per receive queue of the interface, each with a
//! UMEM of frames shared with the kernel, its fill and completion rings and its receive and
//! transmit rings, and the six-instruction XDP program (loaded with `bpf(2)`, attached through
//! a BPF link) that redirects every frame into the socket of the queue it arrived on.
//!
//! Owns the sockets, their mappings and the program's link (closing the port detaches the
//! program, also when the process dies). Must not choose when to use AF_XDP
//! (`afpacket::HostPort` does) nor touch the interface beyond attaching the program: it does
//! not create interfaces or change their MTU or queues.
//!
//! Only interfaces with native (driver) XDP and at most [`MAX_QUEUES`] receive queues are used
//! (12 MiB of UMEM each): generic XDP is no faster than a packet ring, and more queues would
//! pin too much memory, so both make [`XdpSocket::open`] fail and the port falls back to
//! TPACKET_V3. Frames are received from every queue (round robin, one start queue per call)
//! and sent through queue 0's socket. Zero-copy is asked for first; copy mode (veth) only when
//! the caller allows it, since on veth it measured slower than the packet ring for TCP
//! (docs/BENCHMARKS.md).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::error::{Error, Result};
use crate::region::Mapping;

const AF_XDP: libc::c_int = 44;
const SOL_XDP: libc::c_int = 283;
const XDP_MMAP_OFFSETS: libc::c_int = 1;
const XDP_RX_RING: libc::c_int = 2;
const XDP_TX_RING: libc::c_int = 3;
const XDP_UMEM_REG: libc::c_int = 4;
const XDP_UMEM_FILL_RING: libc::c_int = 5;
const XDP_UMEM_COMPLETION_RING: libc::c_int = 6;
const XDP_STATISTICS: libc::c_int = 7;
const XDP_COPY: u16 = 1 << 1;
const XDP_ZEROCOPY: u16 = 1 << 2;
const XDP_USE_NEED_WAKEUP: u16 = 1 << 3;
const XDP_RING_NEED_WAKEUP: u32 = 1;
const XDP_PGOFF_RX_RING: libc::off_t = 0;
const XDP_PGOFF_TX_RING: libc::off_t = 0x8000_0000;
const XDP_UMEM_PGOFF_FILL_RING: libc::off_t = 0x1_0000_0000;
const XDP_UMEM_PGOFF_COMPLETION_RING: libc::off_t = 0x1_8000_0000;

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_MAP_TYPE_XSKMAP: u32 = 17;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;
/// `sizeof(union bpf_attr)` as passed: larger than every field set here; the kernel accepts a
/// larger size when the bytes it does not know are zero.
const BPF_ATTR_SIZE: usize = 128;

const SIOCETHTOOL: libc::c_ulong = 0x8946;
const ETHTOOL_GCHANNELS: u32 = 0x3c;

/// Receive queues a port serves at most (one socket and UMEM each); an interface with more
/// falls back to the packet ring (`ethtool -L IF combined N` gives it fewer).
pub(crate) const MAX_QUEUES: u32 = 8;

/// UMEM geometry: 4 KiB frames (a frame up to 3,840 bytes after the kernel's headroom, so
/// one larger than a pool buffer still arrives and is counted, as on the packet ring), 2,048
/// for receiving and 1,024 for transmitting: 12 MiB per queue.
const FRAME: u64 = 4096;
const RX_FRAMES: u32 = 2048;
const TX_FRAMES: u32 = 1024;
/// The UMEM's size.
const UMEM_LEN: usize = (FRAME as usize) * (RX_FRAMES + TX_FRAMES) as usize;
/// The shortest frame sent: an Ethernet header.
const ETH_HLEN: usize = 14;

/// One ring shared with the kernel: a producer and a consumer index, a flags word and the
/// descriptors. This side either produces (fill, transmit) or consumes (receive, completion).
struct XskRing {
    /// Keeps the pointers below valid.
    _map: Mapping,
    producer: NonNull<AtomicU32>,
    consumer: NonNull<AtomicU32>,
    flags: NonNull<AtomicU32>,
    descs: NonNull<u8>,
    size: u32,
    /// This side's index (the producer's for fill/transmit, the consumer's otherwise).
    local: u32,
}

impl XskRing {
    /// Map the ring at `pgoff` of `fd` whose offsets the kernel gave as `off`
    /// (producer, consumer, desc, flags), with `size` descriptors of `desc_size` bytes.
    fn map(
        fd: &OwnedFd,
        pgoff: libc::off_t,
        off: [u64; 4],
        size: u32,
        desc_size: usize,
        producer_side: bool,
    ) -> Result<XskRing> {
        let map_len = usize::try_from(off[2])
            .ok()
            .and_then(|d| d.checked_add(size as usize * desc_size))
            .ok_or_else(|| Error::config("xdp ring", "ring offsets out of range"))?;
        // Every offset is checked before anything is mapped (nothing to unmap on an error).
        let mut at = [0usize; 4];
        for (slot, o) in at.iter_mut().zip(off) {
            *slot = usize::try_from(o)
                .ok()
                .filter(|o| o % 4 == 0 && o + 4 <= map_len)
                .ok_or_else(|| Error::config("xdp ring", "ring offsets out of range"))?;
        }
        let map = Mapping::shared_at(fd, map_len, pgoff, "mmap of an AF_XDP ring")?;
        // SAFETY: every offset is inside the mapping (checked above).
        let at = |i: usize| unsafe { map.ptr().add(at[i]) };
        let producer = at(0).cast::<AtomicU32>();
        let consumer = at(1).cast::<AtomicU32>();
        let descs = at(2);
        let flags = at(3).cast::<AtomicU32>();
        let mut ring = XskRing {
            _map: map,
            producer,
            consumer,
            flags,
            descs,
            size,
            local: 0,
        };
        ring.local = if producer_side {
            ring.producer().load(Ordering::Relaxed)
        } else {
            ring.consumer().load(Ordering::Relaxed)
        };
        Ok(ring)
    }

    fn producer(&self) -> &AtomicU32 {
        // SAFETY: a u32 the kernel placed 4-aligned inside the live mapping.
        unsafe { self.producer.as_ref() }
    }

    fn consumer(&self) -> &AtomicU32 {
        // SAFETY: as for `producer`.
        unsafe { self.consumer.as_ref() }
    }

    fn needs_wakeup(&self) -> bool {
        // SAFETY: as for `producer`.
        unsafe { self.flags.as_ref() }.load(Ordering::Relaxed) & XDP_RING_NEED_WAKEUP != 0
    }

    /// Consumer side: descriptors the kernel produced and this side has not taken.
    fn ready(&self) -> u32 {
        self.producer()
            .load(Ordering::Acquire)
            .wrapping_sub(self.local)
    }

    /// Producer side: descriptors produced but not yet consumed by the kernel.
    fn outstanding(&self) -> u32 {
        self.local
            .wrapping_sub(self.consumer().load(Ordering::Acquire))
    }

    fn slot(&self, index: u32, desc_size: usize) -> *mut u8 {
        let i = (index & (self.size - 1)) as usize;
        // SAFETY: `i < size`, so the slot lies inside the descriptor array of the mapping.
        unsafe { self.descs.as_ptr().add(i * desc_size) }
    }

    /// Consumer side: hand `n` taken descriptors back to the kernel.
    fn release(&mut self, n: u32) {
        self.local = self.local.wrapping_add(n);
        self.consumer().store(self.local, Ordering::Release);
    }

    /// Producer side: publish `n` written descriptors.
    fn submit(&mut self, n: u32) {
        self.local = self.local.wrapping_add(n);
        self.producer().store(self.local, Ordering::Release);
    }
}

/// The XDP program and its map, loaded; [`XdpProgram::attach`] turns it into the link that
/// keeps both.
struct XdpProgram {
    map: OwnedFd,
    prog: OwnedFd,
}

fn bpf(cmd: libc::c_long, attr: &mut [u8; BPF_ATTR_SIZE]) -> libc::c_long {
    // SAFETY: `attr` is a zero-padded bpf_attr of the size passed; the kernel reads (and for
    // some commands writes) only within it.
    unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), BPF_ATTR_SIZE) }
}

fn put_u32(attr: &mut [u8], at: usize, v: u32) {
    attr[at..at + 4].copy_from_slice(&v.to_ne_bytes());
}

fn put_u64(attr: &mut [u8], at: usize, v: u64) {
    attr[at..at + 8].copy_from_slice(&v.to_ne_bytes());
}

fn owned(rc: libc::c_long, op: &str) -> Result<OwnedFd> {
    let fd = libc::c_int::try_from(rc)
        .ok()
        .filter(|fd| *fd >= 0)
        .ok_or_else(|| Error::last_os(op))?;
    // SAFETY: a fresh descriptor the kernel just returned to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// One eBPF instruction: opcode, destination and source registers, offset, immediate.
fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> [u8; 8] {
    let mut i = [0u8; 8];
    i[0] = code;
    i[1] = (src << 4) | (dst & 0x0f);
    i[2..4].copy_from_slice(&off.to_ne_bytes());
    i[4..8].copy_from_slice(&imm.to_ne_bytes());
    i
}

impl XdpProgram {
    /// Load the redirect program over a fresh XSKMAP of `queues` entries. Not attached yet.
    fn load(queues: u32) -> Result<XdpProgram> {
        if cfg!(target_endian = "big") {
            // `insn` packs the register nibbles in little-endian order.
            return Err(Error::config(
                "host_port",
                "AF_XDP host ports are built for little-endian hosts only",
            ));
        }
        let mut attr = [0u8; BPF_ATTR_SIZE];
        put_u32(&mut attr, 0, BPF_MAP_TYPE_XSKMAP);
        put_u32(&mut attr, 4, 4); // key: the receive queue
        put_u32(&mut attr, 8, 4); // value: the socket
        put_u32(&mut attr, 12, queues); // one entry per receive queue
        let map = owned(
            bpf(BPF_MAP_CREATE, &mut attr),
            "bpf(BPF_MAP_CREATE, xskmap)",
        )?;
        // r2 = ctx->rx_queue_index; r1 = &map; r3 = XDP_PASS (what a queue without a socket
        // does); r0 = bpf_redirect_map(r1, r2, r3); return r0.
        let prog: Vec<u8> = [
            insn(0x61, 2, 1, 16, 0),
            insn(0x18, 1, 1, 0, map.as_raw_fd()),
            insn(0, 0, 0, 0, 0),
            insn(0xb7, 3, 0, 0, 2),
            insn(0x85, 0, 0, 0, 51),
            insn(0x95, 0, 0, 0, 0),
        ]
        .concat();
        let license = c"Apache-2.0";
        let mut log = vec![0u8; 16 * 1024];
        let mut attr = [0u8; BPF_ATTR_SIZE];
        put_u32(&mut attr, 0, BPF_PROG_TYPE_XDP);
        put_u32(&mut attr, 4, (prog.len() / 8) as u32);
        put_u64(&mut attr, 8, prog.as_ptr() as u64);
        put_u64(&mut attr, 16, license.as_ptr() as u64);
        put_u32(&mut attr, 24, 1);
        put_u32(&mut attr, 28, log.len() as u32);
        put_u64(&mut attr, 32, log.as_mut_ptr() as u64);
        attr[48..48 + 11].copy_from_slice(b"telvirt_xsk");
        put_u32(&mut attr, 68, BPF_XDP);
        let rc = bpf(BPF_PROG_LOAD, &mut attr);
        let prog = owned(rc, "bpf(BPF_PROG_LOAD)").map_err(|e| {
            let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
            let text = String::from_utf8_lossy(&log[..end]);
            match e {
                Error::Io { op, source } => Error::Io {
                    op: format!("{op} (verifier: {})", text.trim()),
                    source,
                },
                other => other,
            }
        })?;
        Ok(XdpProgram { map, prog })
    }

    /// Put `socket` into the map at `queue`.
    fn register(&self, queue: u32, socket: &OwnedFd) -> Result<()> {
        let key = queue;
        let value: u32 = socket.as_raw_fd() as u32;
        let mut attr = [0u8; BPF_ATTR_SIZE];
        put_u32(&mut attr, 0, self.map.as_raw_fd() as u32);
        put_u64(&mut attr, 8, &key as *const u32 as u64);
        put_u64(&mut attr, 16, &value as *const u32 as u64);
        if bpf(BPF_MAP_UPDATE_ELEM, &mut attr) != 0 {
            return Err(Error::last_os("bpf(BPF_MAP_UPDATE_ELEM, xskmap)"));
        }
        Ok(())
    }

    /// Attach in driver (native) mode to `ifindex` of the calling thread's namespace: the
    /// link answered holds the program (and it the map); closing it detaches the program.
    fn attach(self, ifindex: u32, ifname: &str) -> Result<OwnedFd> {
        let mut attr = [0u8; BPF_ATTR_SIZE];
        put_u32(&mut attr, 0, self.prog.as_raw_fd() as u32);
        put_u32(&mut attr, 4, ifindex);
        put_u32(&mut attr, 8, BPF_XDP);
        put_u32(&mut attr, 12, XDP_FLAGS_DRV_MODE);
        owned(
            bpf(BPF_LINK_CREATE, &mut attr),
            &format!("attach XDP (driver mode) to {ifname}"),
        )
    }
}

/// How many receive queues `ifname` has (`ETHTOOL_GCHANNELS`), in the calling thread's
/// namespace; `None` when the driver does not say.
fn rx_queues(ifname: &str) -> Option<u32> {
    // struct ethtool_channels: cmd, max_rx, max_tx, max_other, max_combined, rx_count,
    // tx_count, other_count, combined_count.
    let mut ch = [0u32; 9];
    ch[0] = ETHTOOL_GCHANNELS;
    // struct ifreq: the name (16 bytes) then a pointer to the command.
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        data: *mut libc::c_void,
        _pad: [u8; 16],
    }
    let mut req = IfReq {
        name: [0; 16],
        data: ch.as_mut_ptr().cast(),
        _pad: [0; 16],
    };
    let n = ifname.len().min(15);
    req.name[..n].copy_from_slice(&ifname.as_bytes()[..n]);
    // SAFETY: a datagram socket used only for the ioctl, closed below.
    let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if s < 0 {
        return None;
    }
    // SAFETY: `s` is fresh and owned here.
    let s = unsafe { OwnedFd::from_raw_fd(s) };
    // SAFETY: `req` is an ifreq whose data points at an ethtool_channels of the right size.
    let rc = unsafe { libc::ioctl(s.as_raw_fd(), SIOCETHTOOL, &mut req as *mut IfReq) };
    // A driver reports its queues as receive-only, combined or (veth on some kernels) both
    // for the same queue: the larger count is the number of receive queues.
    (rc == 0).then(|| ch[5].max(ch[8]))
}

/// The AF_XDP sockets of one interface, one per receive queue, and the program that
/// redirects each queue's frames into its socket.
pub(crate) struct XdpSocket {
    // Field order is drop order: the program goes first (no more frames redirected), then
    // the sockets.
    /// The attached program's link.
    _link: OwnedFd,
    /// Indexed by receive queue.
    queues: Vec<XskQueue>,
    /// The queue the next receive starts at.
    next: usize,
}

/// The AF_XDP socket of one receive queue, with its UMEM and rings.
struct XskQueue {
    // Field order is drop order: the rings, the socket, and the UMEM last.
    fill: XskRing,
    completion: XskRing,
    rx: XskRing,
    tx: XskRing,
    fd: OwnedFd,
    /// Transmit frames not in flight.
    tx_free: Vec<u64>,
    /// Transmit frames completed since [`XdpSocket::take_completed`] was last called.
    completed: u64,
    /// Frames received.
    received: u64,
    zerocopy: bool,
    umem: Mapping,
}

// SAFETY: the mappings belong to their socket alone and are only touched through `&mut self`.
unsafe impl Send for XskQueue {}

impl XdpSocket {
    /// Open an AF_XDP socket on each receive queue of `ifname` (index `ifindex`) in the
    /// calling thread's namespace and redirect the interface's frames into them. Fails (and
    /// leaves the interface as it was) where the interface has more than [`MAX_QUEUES`]
    /// receive queues, does not say how many, or has no native XDP; or, unless
    /// `copy_allowed`, where a queue has no zero-copy.
    pub(crate) fn open(ifname: &str, ifindex: u32, copy_allowed: bool) -> Result<XdpSocket> {
        let n = match rx_queues(ifname) {
            Some(n) if (1..=MAX_QUEUES).contains(&n) => n,
            Some(n) => {
                return Err(Error::config(
                    "host_port",
                    format!(
                        "{ifname} has {n} receive queues; AF_XDP serves at most {MAX_QUEUES} \
                         (ethtool -L {ifname} combined {MAX_QUEUES})"
                    ),
                ));
            }
            None => {
                return Err(Error::config(
                    "host_port",
                    format!("{ifname} does not report its receive queues"),
                ));
            }
        };
        let program = XdpProgram::load(n)?;
        let mut queues = Vec::new();
        for queue in 0..n {
            let q = XskQueue::open(ifname, ifindex, queue, copy_allowed)?;
            program.register(queue, &q.fd)?;
            queues.push(q);
        }
        let link = program.attach(ifindex, ifname)?;
        Ok(XdpSocket {
            _link: link,
            queues,
            next: 0,
        })
    }

    /// `af_xdp_zerocopy` or `af_xdp_copy`.
    pub(crate) fn mode(&self) -> &'static str {
        if self.queues.iter().all(|q| q.zerocopy) {
            "af_xdp_zerocopy"
        } else {
            "af_xdp_copy"
        }
    }

    /// The receive queues served (one socket each).
    pub(crate) fn queue_count(&self) -> u32 {
        self.queues.len() as u32
    }

    /// Frames received so far on each receive queue.
    pub(crate) fn received_per_queue(&self) -> Vec<u64> {
        self.queues.iter().map(|q| q.received).collect()
    }

    /// Take up to `max` received frames, each offered to `frame`; returns how many. Each call
    /// starts at the next queue, so a busy queue does not starve the others.
    pub(crate) fn receive(&mut self, max: usize, mut frame: impl FnMut(&[u8])) -> usize {
        let n = self.queues.len();
        let mut got = 0;
        for i in 0..n {
            if got >= max {
                break;
            }
            got += self.queues[(self.next + i) % n].receive(max - got, &mut frame);
        }
        self.next = (self.next + 1) % n;
        got
    }

    /// Queue `frames` for transmission on queue 0's socket; returns how many were dropped
    /// (see [`XskQueue::transmit`]).
    pub(crate) fn transmit<'a>(&mut self, frames: impl Iterator<Item = &'a [u8]>) -> usize {
        self.queues[0].transmit(frames)
    }

    /// Frames the kernel finished sending since the last call.
    pub(crate) fn take_completed(&mut self) -> u64 {
        self.queues.iter_mut().map(|q| q.take_completed()).sum()
    }

    /// Ask the kernel to send what the transmit rings hold.
    pub(crate) fn kick(&mut self) {
        for q in &mut self.queues {
            q.kick();
        }
    }

    /// Whether frames wait in a transmit ring.
    pub(crate) fn tx_pending(&self) -> bool {
        self.queues.iter().any(XskQueue::tx_pending)
    }

    /// Frames the kernel dropped before the sockets took them (see
    /// [`XskQueue::kernel_rx_dropped`]); `None` when the kernel did not answer for every
    /// queue (a partial sum would make the count go back).
    pub(crate) fn kernel_rx_dropped(&self) -> Option<u64> {
        self.queues.iter().map(XskQueue::kernel_rx_dropped).sum()
    }
}

impl XskQueue {
    /// The socket of receive queue `queue` of `ifname` (index `ifindex`), bound zero-copy,
    /// else (when `copy_allowed`) in copy mode.
    fn open(ifname: &str, ifindex: u32, queue: u32, copy_allowed: bool) -> Result<XskQueue> {
        // SAFETY: plain socket(2) call with constant arguments.
        let raw = unsafe { libc::socket(AF_XDP, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        let fd = owned(raw.into(), "socket(AF_XDP)")?;
        let umem = Mapping::anonymous(UMEM_LEN, "mmap of the AF_XDP UMEM")?;
        // struct xdp_umem_reg: addr, len, chunk_size, headroom, flags, tx_metadata_len.
        let mut reg = [0u8; 32];
        put_u64(&mut reg, 0, umem.ptr().as_ptr() as u64);
        put_u64(&mut reg, 8, UMEM_LEN as u64);
        put_u32(&mut reg, 16, FRAME as u32);
        setsockopt(&fd, XDP_UMEM_REG, &reg, "XDP_UMEM_REG")?;
        for (opt, n, what) in [
            (XDP_UMEM_FILL_RING, RX_FRAMES, "XDP_UMEM_FILL_RING"),
            (
                XDP_UMEM_COMPLETION_RING,
                TX_FRAMES,
                "XDP_UMEM_COMPLETION_RING",
            ),
            (XDP_RX_RING, RX_FRAMES, "XDP_RX_RING"),
            (XDP_TX_RING, TX_FRAMES, "XDP_TX_RING"),
        ] {
            setsockopt(&fd, opt, &n.to_ne_bytes(), what)?;
        }
        // struct xdp_mmap_offsets: rx, tx, fill, completion; each producer, consumer, desc,
        // flags.
        let mut off = [0u64; 16];
        let mut len = std::mem::size_of_val(&off) as libc::socklen_t;
        // SAFETY: valid fd; `off` is writable for `len` bytes.
        let rc = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                SOL_XDP,
                XDP_MMAP_OFFSETS,
                off.as_mut_ptr().cast(),
                &mut len,
            )
        };
        if rc != 0 || len as usize != std::mem::size_of_val(&off) {
            return Err(Error::last_os("getsockopt(XDP_MMAP_OFFSETS)"));
        }
        let part = |i: usize| [off[i * 4], off[i * 4 + 1], off[i * 4 + 2], off[i * 4 + 3]];
        let rx = XskRing::map(&fd, XDP_PGOFF_RX_RING, part(0), RX_FRAMES, 16, false)?;
        let tx = XskRing::map(&fd, XDP_PGOFF_TX_RING, part(1), TX_FRAMES, 16, true)?;
        let mut fill = XskRing::map(&fd, XDP_UMEM_PGOFF_FILL_RING, part(2), RX_FRAMES, 8, true)?;
        let completion = XskRing::map(
            &fd,
            XDP_UMEM_PGOFF_COMPLETION_RING,
            part(3),
            TX_FRAMES,
            8,
            false,
        )?;
        for i in 0..RX_FRAMES {
            let slot = fill.slot(fill.local.wrapping_add(i), 8);
            // SAFETY: a fill-ring slot (8-aligned) this side owns until submitted.
            unsafe { slot.cast::<u64>().write(u64::from(i) * FRAME) };
        }
        fill.submit(RX_FRAMES);
        let zerocopy = match bind(&fd, ifindex, queue, XDP_ZEROCOPY | XDP_USE_NEED_WAKEUP) {
            Ok(()) => true,
            Err(e) if !copy_allowed => {
                let what = if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
                    format!("{ifname} has no zero-copy AF_XDP (its driver copies)")
                } else {
                    format!("bind AF_XDP (zero-copy) to {ifname}")
                };
                return Err(Error::io(format!("{what}, queue {queue}"), e));
            }
            Err(_) => {
                bind(&fd, ifindex, queue, XDP_COPY | XDP_USE_NEED_WAKEUP)
                    .map_err(|e| Error::io(format!("bind AF_XDP to {ifname} queue {queue}"), e))?;
                false
            }
        };
        Ok(XskQueue {
            fill,
            completion,
            rx,
            tx,
            fd,
            tx_free: (RX_FRAMES..RX_FRAMES + TX_FRAMES)
                .map(|i| u64::from(i) * FRAME)
                .collect(),
            completed: 0,
            received: 0,
            zerocopy,
            umem,
        })
    }

    /// Take up to `max` received frames, each offered to `frame`; returns how many.
    fn receive(&mut self, max: usize, frame: &mut impl FnMut(&[u8])) -> usize {
        let n = self.rx.ready().min(max as u32);
        for i in 0..n {
            let slot = self.rx.slot(self.rx.local.wrapping_add(i), 16);
            // SAFETY: a receive descriptor (addr u64, len u32, options u32) the kernel
            // produced; 8-aligned inside the ring.
            let (addr, len) = unsafe {
                (
                    slot.cast::<u64>().read(),
                    slot.add(8).cast::<u32>().read() as usize,
                )
            };
            let base = addr & !(FRAME - 1);
            if let Some(end) = usize::try_from(addr)
                .ok()
                .and_then(|a| a.checked_add(len))
                .filter(|end| *end <= UMEM_LEN)
            {
                // SAFETY: `addr..end` lies inside the UMEM (checked), written by the kernel
                // before it published the descriptor.
                let data = unsafe {
                    std::slice::from_raw_parts(self.umem.ptr().as_ptr().add(end - len), len)
                };
                frame(data);
            }
            let fslot = self.fill.slot(self.fill.local.wrapping_add(i), 8);
            // SAFETY: the fill ring has a slot for every receive frame, so this one is free.
            unsafe { fslot.cast::<u64>().write(base) };
        }
        if n > 0 {
            self.rx.release(n);
            self.fill.submit(n);
            self.received += u64::from(n);
        } else if self.fill.needs_wakeup() {
            // SAFETY: a zero-length receive only wakes the driver up.
            unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    std::ptr::null_mut(),
                    0,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                )
            };
        }
        n as usize
    }

    /// Queue `frames` for transmission; returns how many were dropped: a frame shorter than
    /// an Ethernet header (the kernel would refuse it and never hand its UMEM frame back) or
    /// larger than a UMEM frame, or found every transmit frame in flight.
    fn transmit<'a>(&mut self, frames: impl Iterator<Item = &'a [u8]>) -> usize {
        self.reclaim();
        let (mut queued, mut dropped) = (0u32, 0usize);
        for data in frames {
            let fits = (ETH_HLEN..=FRAME as usize).contains(&data.len());
            // A free frame means a free ring slot: the ring holds only frames in flight.
            let Some(addr) = fits.then(|| self.tx_free.pop()).flatten() else {
                dropped += 1;
                continue;
            };
            // SAFETY: `addr` is a transmit frame not in flight (from `tx_free`), FRAME bytes
            // inside the UMEM, and `data` fits in it.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    data.as_ptr(),
                    self.umem.ptr().as_ptr().add(addr as usize),
                    data.len(),
                );
            }
            let slot = self.tx.slot(self.tx.local.wrapping_add(queued), 16);
            // SAFETY: a free transmit-ring slot (one per frame not in flight), 8-aligned.
            unsafe {
                slot.cast::<u64>().write(addr);
                slot.add(8).cast::<u32>().write(data.len() as u32);
                slot.add(12).cast::<u32>().write(0);
            }
            queued += 1;
        }
        if queued > 0 {
            self.tx.submit(queued);
        }
        self.kick();
        dropped
    }

    /// Frames the kernel finished sending since the last call.
    fn take_completed(&mut self) -> u64 {
        std::mem::take(&mut self.completed)
    }

    /// Ask the kernel to send what the transmit ring holds (copy mode sends only when asked;
    /// each call sends a bounded batch, so this repeats while frames are left and the kernel
    /// makes progress).
    fn kick(&mut self) {
        for _ in 0..8 {
            if self.tx.outstanding() == 0 || !self.tx.needs_wakeup() {
                break;
            }
            // SAFETY: a zero-length send only starts transmission of the ring.
            let rc = unsafe {
                libc::sendto(
                    self.fd.as_raw_fd(),
                    std::ptr::null(),
                    0,
                    libc::MSG_DONTWAIT,
                    std::ptr::null(),
                    0,
                )
            };
            if rc < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EAGAIN) {
                break;
            }
        }
        self.reclaim();
    }

    /// Whether frames wait in the transmit ring.
    fn tx_pending(&self) -> bool {
        self.tx.outstanding() > 0
    }

    /// Move completed transmit frames back to the free list.
    fn reclaim(&mut self) {
        let n = self.completion.ready();
        for i in 0..n {
            let slot = self
                .completion
                .slot(self.completion.local.wrapping_add(i), 8);
            // SAFETY: a completion descriptor the kernel produced, 8-aligned.
            let addr = unsafe { slot.cast::<u64>().read() } & !(FRAME - 1);
            // Only transmit frames were handed out; anything else is not taken back.
            if (u64::from(RX_FRAMES) * FRAME..UMEM_LEN as u64).contains(&addr) {
                self.tx_free.push(addr);
                self.completed += 1;
            }
        }
        if n > 0 {
            self.completion.release(n);
        }
    }

    /// Frames the kernel dropped before this socket took them (`XDP_STATISTICS`: no free
    /// frame on the fill ring, too large for a frame, the receive ring full); `None` when the
    /// kernel did not answer.
    fn kernel_rx_dropped(&self) -> Option<u64> {
        let mut s = [0u64; 6];
        let mut len = std::mem::size_of_val(&s) as libc::socklen_t;
        // SAFETY: valid fd; `s` is writable for `len` bytes (the kernel writes at most that).
        let rc = unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                SOL_XDP,
                XDP_STATISTICS,
                s.as_mut_ptr().cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return None;
        }
        // struct xdp_statistics: rx_dropped, rx_invalid_descs, tx_invalid_descs,
        // rx_ring_full, rx_fill_ring_empty_descs, tx_ring_empty_descs.
        Some(s[0] + s[3])
    }
}

fn setsockopt(fd: &OwnedFd, opt: libc::c_int, value: &[u8], what: &str) -> Result<()> {
    // SAFETY: valid fd; `value` is readable for its length.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            SOL_XDP,
            opt,
            value.as_ptr().cast(),
            value.len() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(Error::last_os(format!("setsockopt({what})")));
    }
    Ok(())
}

fn bind(fd: &OwnedFd, ifindex: u32, queue: u32, flags: u16) -> std::io::Result<()> {
    // struct sockaddr_xdp: family, flags, ifindex, queue id, shared UMEM fd.
    let mut sa = [0u8; 16];
    sa[0..2].copy_from_slice(&(AF_XDP as u16).to_ne_bytes());
    sa[2..4].copy_from_slice(&flags.to_ne_bytes());
    sa[4..8].copy_from_slice(&ifindex.to_ne_bytes());
    sa[8..12].copy_from_slice(&queue.to_ne_bytes());
    // SAFETY: valid fd; `sa` is a sockaddr_xdp of the size passed.
    let rc = unsafe { libc::bind(fd.as_raw_fd(), sa.as_ptr().cast(), sa.len() as u32) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instructions_encode_registers_low_nibble_destination() {
        let i = insn(0x61, 2, 1, 16, 0);
        assert_eq!(i, [0x61, 0x12, 16, 0, 0, 0, 0, 0]);
        let i = insn(0xb7, 3, 0, 0, 2);
        assert_eq!(i, [0xb7, 0x03, 0, 0, 2, 0, 0, 0]);
    }

    #[test]
    fn the_program_loads_and_a_loopback_has_its_queue_count() {
        // Needs CAP_BPF (root here); the program is loaded, not attached.
        XdpProgram::load(2).expect("load the redirect program");
        // loopback has no channels to report: AF_XDP is then not used.
        assert_eq!(rx_queues("lo"), None);
        let e = XdpSocket::open("lo", 1, true).err().expect("lo is refused");
        assert!(
            e.to_string().contains("does not report its receive queues"),
            "{e}"
        );
    }
}
