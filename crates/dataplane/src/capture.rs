//! Packet capture on live links: a [`LinkTap`] armed on a link copies the frames its sender
//! puts on it (up to a snap length, as many as asked), and [`PcapngWriter`] writes them as
//! pcapng (one interface per link, nanosecond timestamps) that tcpdump and Wireshark read.
//!
//! Owns the tap's bounded queue and the file format; must not slow a link that is not being
//! captured (one relaxed load per batch) nor hold the sending worker back while it is (an
//! uncontended lock and a copy per frame; a full queue counts the frame as missed instead of
//! waiting).

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crossbeam_queue::ArrayQueue;

use crate::pool::{Packet, Pool};

/// Frames a tap holds until its reader takes them; more are counted as missed.
pub const TAP_QUEUE: usize = 8192;
/// Largest snap length (and the default): whole frames.
pub const MAX_SNAPLEN: u32 = 65535;
/// Smallest snap length: Ethernet, IPv4 and TCP headers.
pub const MIN_SNAPLEN: u32 = 64;

/// One captured frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// When the sender put it on the link (Unix epoch nanoseconds).
    pub ts_ns: u64,
    /// Its length on the link.
    pub orig_len: u32,
    /// Its first bytes, at most the tap's snap length.
    pub data: Vec<u8>,
}

/// A capture of one link: the sending worker offers each batch, the reader takes frames.
#[derive(Debug)]
pub struct LinkTap {
    frames: ArrayQueue<Frame>,
    snaplen: usize,
    /// Frames still wanted; the tap takes nothing once it is 0.
    wanted: AtomicU64,
    /// Frames wanted but not taken because the queue was full (the reader fell behind).
    missed: AtomicU64,
}

impl LinkTap {
    /// A tap that takes the next `packets` frames, each cut to `snaplen` bytes (clamped to
    /// [`MIN_SNAPLEN`]..=[`MAX_SNAPLEN`]).
    pub fn new(packets: u64, snaplen: u32) -> Arc<Self> {
        Arc::new(LinkTap {
            frames: ArrayQueue::new(TAP_QUEUE),
            snaplen: snaplen.clamp(MIN_SNAPLEN, MAX_SNAPLEN) as usize,
            wanted: AtomicU64::new(packets),
            missed: AtomicU64::new(0),
        })
    }

    /// Copy what is still wanted of `pkts` (called by the link's sender, before it enqueues).
    pub(crate) fn offer(&self, pool: &Pool, pkts: &[Packet]) {
        let wanted = self.wanted.load(Ordering::Acquire);
        if wanted == 0 {
            return;
        }
        let n = pkts
            .len()
            .min(usize::try_from(wanted).unwrap_or(usize::MAX));
        let ts_ns = crate::pcap::realtime_ns();
        for p in &pkts[..n] {
            let data = pool.data(p);
            let frame = Frame {
                ts_ns,
                orig_len: u32::try_from(data.len()).unwrap_or(u32::MAX),
                data: data[..data.len().min(self.snaplen)].to_vec(),
            };
            if self.frames.push(frame).is_err() {
                self.missed.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.wanted.fetch_sub(n as u64, Ordering::AcqRel);
    }

    /// Move frames taken so far onto `out` until it holds `max` frames; returns how many were
    /// moved.
    pub fn take(&self, out: &mut Vec<Frame>, max: usize) -> usize {
        let before = out.len();
        while out.len() < max {
            let Some(f) = self.frames.pop() else { break };
            out.push(f);
        }
        out.len() - before
    }

    /// Whether frames wait to be taken.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Frames still wanted.
    pub fn wanted(&self) -> u64 {
        self.wanted.load(Ordering::Acquire)
    }

    /// Frames not taken because the reader fell behind.
    pub fn missed(&self) -> u64 {
        self.missed.load(Ordering::Relaxed)
    }

    /// The snap length in force.
    pub fn snaplen(&self) -> u32 {
        self.snaplen as u32
    }
}

/// Where a link's sender finds its tap: empty unless a capture runs.
#[derive(Debug, Default)]
pub struct TapSlot {
    armed: AtomicBool,
    tap: Mutex<Option<Arc<LinkTap>>>,
}

impl TapSlot {
    /// Arm `tap`; refused (returns false) while another tap is armed.
    pub fn arm(&self, tap: Arc<LinkTap>) -> bool {
        let mut slot = self.tap.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_some() {
            return false;
        }
        *slot = Some(tap);
        self.armed.store(true, Ordering::Release);
        true
    }

    /// Disarm `tap` if it is the one armed.
    pub fn disarm(&self, tap: &Arc<LinkTap>) {
        let mut slot = self.tap.lock().unwrap_or_else(|p| p.into_inner());
        if slot.as_ref().is_some_and(|t| Arc::ptr_eq(t, tap)) {
            *slot = None;
            self.armed.store(false, Ordering::Release);
        }
    }

    /// Whether a tap is armed (one relaxed load).
    pub(crate) fn is_armed(&self) -> bool {
        self.armed.load(Ordering::Relaxed)
    }

    /// Offer `pkts` to the armed tap, if there is one.
    pub(crate) fn offer(&self, pool: &Pool, pkts: &[Packet]) {
        if !self.is_armed() {
            return;
        }
        let slot = self.tap.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = slot.as_ref() {
            t.offer(pool, pkts);
        }
    }
}

const SHB: u32 = 0x0A0D_0D0A;
const IDB: u32 = 1;
const ISB: u32 = 5;
const EPB: u32 = 6;
const BYTE_ORDER_MAGIC: u32 = 0x1A2B_3C4D;
const LINKTYPE_ETHERNET: u16 = 1;
const OPT_END: u16 = 0;
const IF_NAME: u16 = 2;
const IF_TSRESOL: u16 = 9;
const ISB_IFDROP: u16 = 5;

/// Writes pcapng: a section with one Ethernet interface (the link, nanosecond timestamps),
/// its frames, and optionally a closing statistics block with the frames the capture missed.
pub struct PcapngWriter<W: Write> {
    out: W,
    written: u64,
}

impl<W: Write> PcapngWriter<W> {
    /// Start a file: the section header and the interface named `link`.
    pub fn new(mut out: W, link: &str, snaplen: u32) -> std::io::Result<Self> {
        let mut shb = Vec::with_capacity(16);
        shb.extend_from_slice(&BYTE_ORDER_MAGIC.to_le_bytes());
        shb.extend_from_slice(&1u16.to_le_bytes());
        shb.extend_from_slice(&0u16.to_le_bytes());
        shb.extend_from_slice(&(-1i64).to_le_bytes());
        write_block(&mut out, SHB, &shb)?;
        let mut idb = Vec::with_capacity(32 + link.len());
        idb.extend_from_slice(&LINKTYPE_ETHERNET.to_le_bytes());
        idb.extend_from_slice(&0u16.to_le_bytes());
        idb.extend_from_slice(&snaplen.to_le_bytes());
        push_option(&mut idb, IF_NAME, link.as_bytes());
        push_option(&mut idb, IF_TSRESOL, &[9]);
        push_option(&mut idb, OPT_END, &[]);
        write_block(&mut out, IDB, &idb)?;
        Ok(PcapngWriter { out, written: 0 })
    }

    /// Continue a file whose header was written elsewhere (a later part of a stream).
    pub fn continuing(out: W) -> Self {
        PcapngWriter { out, written: 0 }
    }

    /// Append one frame.
    pub fn write_frame(&mut self, f: &Frame) -> std::io::Result<()> {
        let mut epb = Vec::with_capacity(20 + f.data.len() + 3);
        epb.extend_from_slice(&0u32.to_le_bytes());
        push_ts(&mut epb, f.ts_ns);
        epb.extend_from_slice(
            &u32::try_from(f.data.len())
                .unwrap_or(u32::MAX)
                .to_le_bytes(),
        );
        epb.extend_from_slice(&f.orig_len.to_le_bytes());
        epb.extend_from_slice(&f.data);
        pad(&mut epb);
        write_block(&mut self.out, EPB, &epb)?;
        self.written += 1;
        Ok(())
    }

    /// Append the interface's statistics: `missed` frames the capture could not take.
    pub fn write_missed(&mut self, missed: u64) -> std::io::Result<()> {
        let mut isb = Vec::with_capacity(32);
        isb.extend_from_slice(&0u32.to_le_bytes());
        push_ts(&mut isb, crate::pcap::realtime_ns());
        push_option(&mut isb, ISB_IFDROP, &missed.to_le_bytes());
        push_option(&mut isb, OPT_END, &[]);
        write_block(&mut self.out, ISB, &isb)
    }

    /// Frames written by this writer.
    pub fn frames_written(&self) -> u64 {
        self.written
    }

    /// The underlying writer.
    pub fn into_inner(self) -> W {
        self.out
    }
}

fn push_ts(b: &mut Vec<u8>, ts_ns: u64) {
    b.extend_from_slice(&((ts_ns >> 32) as u32).to_le_bytes());
    b.extend_from_slice(&(ts_ns as u32).to_le_bytes());
}

fn push_option(b: &mut Vec<u8>, code: u16, value: &[u8]) {
    b.extend_from_slice(&code.to_le_bytes());
    b.extend_from_slice(&u16::try_from(value.len()).unwrap_or(u16::MAX).to_le_bytes());
    b.extend_from_slice(value);
    pad(b);
}

fn pad(b: &mut Vec<u8>) {
    while !b.len().is_multiple_of(4) {
        b.push(0);
    }
}

fn write_block(out: &mut impl Write, kind: u32, body: &[u8]) -> std::io::Result<()> {
    let total = u32::try_from(12 + body.len()).unwrap_or(u32::MAX);
    out.write_all(&kind.to_le_bytes())?;
    out.write_all(&total.to_le_bytes())?;
    out.write_all(body)?;
    out.write_all(&total.to_le_bytes())
}

/// Counts the frames (enhanced packet blocks) in a pcapng byte stream read in pieces, for a
/// reader that reports what it received.
#[derive(Debug, Default)]
pub struct PcapngFrameCounter {
    pending: Vec<u8>,
    frames: u64,
    missed: u64,
    broken: bool,
}

/// Largest block the counter accepts: a frame of the largest snap length and its header.
const MAX_BLOCK: usize = 64 + MAX_SNAPLEN as usize + 4;

impl PcapngFrameCounter {
    /// Feed the next bytes of the stream.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.broken {
            return;
        }
        self.pending.extend_from_slice(bytes);
        let mut at = 0;
        while self.pending.len() >= at + 8 {
            let word = |i: usize| {
                u32::from_le_bytes([
                    self.pending[i],
                    self.pending[i + 1],
                    self.pending[i + 2],
                    self.pending[i + 3],
                ])
            };
            let (kind, len) = (word(at), word(at + 4) as usize);
            if len < 12 || !len.is_multiple_of(4) || len > MAX_BLOCK {
                // Not a pcapng stream (or a corrupt one): stop counting, keep nothing.
                self.broken = true;
                self.pending.clear();
                return;
            }
            if self.pending.len() < at + len {
                break;
            }
            match kind {
                EPB => self.frames += 1,
                // The statistics block's first option is the drop count (as written above).
                ISB if len >= 36 => {
                    let o = at + 20;
                    if u16::from_le_bytes([self.pending[o], self.pending[o + 1]]) == ISB_IFDROP {
                        let mut v = [0u8; 8];
                        v.copy_from_slice(&self.pending[o + 4..o + 12]);
                        self.missed += u64::from_le_bytes(v);
                    }
                }
                _ => {}
            }
            at += len;
        }
        self.pending.drain(..at);
    }

    /// Frames seen so far.
    pub fn frames(&self) -> u64 {
        self.frames
    }

    /// Frames the capture reported missing so far.
    pub fn missed(&self) -> u64 {
        self.missed
    }

    /// Whether the bytes fed so far were not a pcapng stream (counting stopped).
    pub fn is_broken(&self) -> bool {
        self.broken
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(i: u8, len: usize) -> Frame {
        Frame {
            ts_ns: 1_700_000_000_123_456_789 + u64::from(i),
            orig_len: len as u32,
            data: vec![i; len],
        }
    }

    #[test]
    fn a_file_is_blocks_of_stated_length_and_the_counter_reads_it_back_in_pieces() {
        let mut w = PcapngWriter::new(Vec::new(), "fw1.out -> nat1.in", 65535).unwrap();
        for (i, len) in [(1u8, 60usize), (2, 61), (3, 1514)] {
            w.write_frame(&frame(i, len)).unwrap();
        }
        w.write_missed(7).unwrap();
        assert_eq!(w.frames_written(), 3);
        let bytes = w.into_inner();
        // Every block's leading and trailing lengths agree and blocks tile the file.
        let mut at = 0;
        let mut kinds = Vec::new();
        while at < bytes.len() {
            let len = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap()) as usize;
            assert_eq!(len % 4, 0);
            let trail =
                u32::from_le_bytes(bytes[at + len - 4..at + len].try_into().unwrap()) as usize;
            assert_eq!(len, trail);
            kinds.push(u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()));
            at += len;
        }
        assert_eq!(at, bytes.len());
        assert_eq!(kinds, vec![SHB, IDB, EPB, EPB, EPB, ISB]);
        let mut c = PcapngFrameCounter::default();
        for piece in bytes.chunks(5) {
            c.feed(piece);
        }
        assert_eq!((c.frames(), c.missed()), (3, 7));
        assert!(!c.is_broken());
        // A block length that no pcapng writer makes: counting stops and nothing is kept.
        let mut bad = PcapngFrameCounter::default();
        bad.feed(&[6, 0, 0, 0, 7, 0, 0, 0]);
        bad.feed(&bytes);
        assert!(bad.is_broken() && bad.frames() == 0 && bad.pending.is_empty());
    }

    #[test]
    fn a_tap_takes_only_what_is_wanted_and_counts_what_its_queue_could_not_hold() {
        let pool = Pool::new("tap", 64, 2048).unwrap();
        let mut pkts = Vec::new();
        for i in 0..10u8 {
            let mut p = pool.alloc().unwrap();
            pool.write(&mut p, &[i; 100]);
            pkts.push(p);
        }
        let tap = LinkTap::new(4, 70);
        let slot = TapSlot::default();
        slot.offer(&pool, &pkts);
        assert!(slot.arm(Arc::clone(&tap)));
        assert!(!slot.arm(LinkTap::new(1, 70)), "a second tap on one link");
        slot.offer(&pool, &pkts[..3]);
        slot.offer(&pool, &pkts[3..]);
        let mut got = Vec::new();
        assert_eq!(tap.take(&mut got, 3), 3, "at most as many as asked");
        assert_eq!(tap.take(&mut got, 10), 1);
        assert_eq!(tap.wanted(), 0);
        assert_eq!(got[3].data, vec![3u8; 70]);
        assert_eq!(got[3].orig_len, 100);
        slot.disarm(&tap);
        assert!(slot.arm(LinkTap::new(1, 70)));
        // A reader that never takes: the queue holds TAP_QUEUE frames, the rest are missed.
        let slow = LinkTap::new(u64::MAX, 64);
        for _ in 0..(TAP_QUEUE / 10 + 1) {
            slow.offer(&pool, &pkts);
        }
        assert_eq!(
            slow.missed(),
            (TAP_QUEUE / 10 + 1) as u64 * 10 - TAP_QUEUE as u64
        );
        for p in pkts {
            pool.free(p);
        }
    }
}
