//! Packet batches as plain slices, independent of any data plane: the caller fills a reusable
//! `PacketBatch`, the runtime copies packets into the module's linear memory at the ABI layout
//! and reads verdicts (and rewritten packets) back. No allocation after construction.

use crate::abi::{
    DESC_AREA, DESC_SIZE, HEADROOM, MAX_BATCH, MAX_EMIT, MAX_PACKET, SLOT_SIZE, VERDICT_DROP,
};
use crate::error::{Error, Result};

/// What the module decided for one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Verdict {
    Drop,
    Forward(u32),
}

/// Packets emitted by the module during one batch (`emit` host function).
pub struct Emitted {
    pub(crate) data: Box<[u8]>,
    pub(crate) items: Vec<(u32, u32)>,
}

impl Emitted {
    pub(crate) fn new() -> Self {
        Self {
            data: vec![0; MAX_EMIT * SLOT_SIZE].into_boxed_slice(),
            items: Vec::with_capacity(MAX_EMIT),
        }
    }

    /// Appends a packet; false when full or too large.
    pub(crate) fn push(&mut self, port: u32, pkt: &[u8]) -> bool {
        let i = self.items.len();
        if i >= MAX_EMIT || pkt.len() > SLOT_SIZE {
            return false;
        }
        self.data[i * SLOT_SIZE..i * SLOT_SIZE + pkt.len()].copy_from_slice(pkt);
        self.items.push((port, pkt.len() as u32));
        true
    }

    /// Number of emitted packets.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether nothing was emitted.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Emitted packet `i`: (output port, bytes).
    pub fn get(&self, i: usize) -> Option<(u32, &[u8])> {
        let (port, len) = *self.items.get(i)?;
        Some((
            port,
            &self.data[i * SLOT_SIZE..i * SLOT_SIZE + len as usize],
        ))
    }
}

/// A reusable batch of up to `MAX_BATCH` packets with their input ports and, after
/// processing, their verdicts.
pub struct PacketBatch {
    data: Box<[u8]>,
    pub(crate) lens: [u32; MAX_BATCH],
    pub(crate) ports: [u32; MAX_BATCH],
    pub(crate) verdicts: [Verdict; MAX_BATCH],
    pub(crate) count: usize,
    /// Time the module's `clock_ns` returns during this batch (trace replay); `None` = the
    /// runtime's monotonic clock.
    pub now_ns: Option<u64>,
    pub(crate) emitted: Emitted,
}

impl Default for PacketBatch {
    fn default() -> Self {
        Self::new()
    }
}

impl PacketBatch {
    /// An empty batch (allocates its fixed storage once).
    pub fn new() -> Self {
        Self {
            data: vec![0; MAX_BATCH * SLOT_SIZE].into_boxed_slice(),
            lens: [0; MAX_BATCH],
            ports: [0; MAX_BATCH],
            verdicts: [Verdict::Drop; MAX_BATCH],
            count: 0,
            now_ns: None,
            emitted: Emitted::new(),
        }
    }

    /// Empties the batch (keeps storage).
    pub fn clear(&mut self) {
        self.count = 0;
        self.emitted.items.clear();
    }

    /// Number of packets.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether the batch holds no packet.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Adds a packet received on `port`. Errors when the batch is full or the packet too large.
    pub fn push(&mut self, port: u32, pkt: &[u8]) -> Result<()> {
        if self.count >= MAX_BATCH {
            return Err(Error::Batch(format!("batch is full ({MAX_BATCH} packets)")));
        }
        if pkt.len() > MAX_PACKET {
            return Err(Error::Batch(format!(
                "packet of {} bytes exceeds the ABI maximum of {MAX_PACKET}",
                pkt.len()
            )));
        }
        let i = self.count;
        self.data[i * SLOT_SIZE..i * SLOT_SIZE + pkt.len()].copy_from_slice(pkt);
        self.lens[i] = pkt.len() as u32;
        self.ports[i] = port;
        self.verdicts[i] = Verdict::Drop;
        self.count += 1;
        Ok(())
    }

    /// Packet `i` (as rewritten by the module after processing).
    pub fn packet(&self, i: usize) -> &[u8] {
        let len = if i < self.count {
            self.lens[i] as usize
        } else {
            0
        };
        &self.data[i * SLOT_SIZE..i * SLOT_SIZE + len]
    }

    /// Input port of packet `i`.
    pub fn port(&self, i: usize) -> u32 {
        self.ports[i.min(MAX_BATCH - 1)]
    }

    /// Verdict of packet `i` (valid after processing).
    pub fn verdict(&self, i: usize) -> Verdict {
        self.verdicts[i.min(MAX_BATCH - 1)]
    }

    /// Verdicts of all packets.
    pub fn verdicts(&self) -> &[Verdict] {
        &self.verdicts[..self.count]
    }

    /// Packets the module emitted during the last batch.
    pub fn emitted(&self) -> &Emitted {
        &self.emitted
    }

    pub(crate) fn slot(&self, i: usize) -> &[u8] {
        &self.data[i * SLOT_SIZE..i * SLOT_SIZE + self.lens[i] as usize]
    }

    pub(crate) fn slot_mut(&mut self, i: usize) -> &mut [u8] {
        &mut self.data[i * SLOT_SIZE..(i + 1) * SLOT_SIZE]
    }

    pub(crate) fn drop_all(&mut self) {
        for v in &mut self.verdicts[..self.count] {
            *v = Verdict::Drop;
        }
    }

    /// Writes descriptors and packets into a batch buffer at the ABI layout.
    pub(crate) fn write_to(&self, area: &mut [u8]) {
        for i in 0..self.count {
            let pkt = self.slot(i);
            let slot = DESC_AREA + i * SLOT_SIZE;
            area[slot + HEADROOM..slot + HEADROOM + pkt.len()].copy_from_slice(pkt);
            let d = &mut area[i * DESC_SIZE..(i + 1) * DESC_SIZE];
            d[0..4].copy_from_slice(&((slot + HEADROOM) as u32).to_le_bytes());
            d[4..8].copy_from_slice(&(pkt.len() as u32).to_le_bytes());
            d[8..12].copy_from_slice(&self.ports[i].to_le_bytes());
            d[12..16].copy_from_slice(&VERDICT_DROP.to_le_bytes());
        }
    }

    /// Reads verdicts and forwarded packets back from a batch buffer. Verdicts naming a port
    /// `>= ports` and descriptors moved outside their slot become drops. Returns
    /// (forwarded, invalid).
    pub(crate) fn read_from(&mut self, area: &[u8], ports: u32) -> (u64, u64) {
        let (mut fwd, mut bad) = (0u64, 0u64);
        for i in 0..self.count {
            let d = &area[i * DESC_SIZE..(i + 1) * DESC_SIZE];
            let verdict = le32(d, 12) as i32;
            if verdict < 0 {
                self.verdicts[i] = Verdict::Drop;
                continue;
            }
            let (off, len) = (le32(d, 0) as usize, le32(d, 4) as usize);
            let slot = DESC_AREA + i * SLOT_SIZE;
            let inside = off >= slot && off.checked_add(len).is_some_and(|e| e <= slot + SLOT_SIZE);
            if verdict as u32 >= ports || !inside {
                self.verdicts[i] = Verdict::Drop;
                bad += 1;
                continue;
            }
            self.slot_mut(i)[..len].copy_from_slice(&area[off..off + len]);
            self.lens[i] = len as u32;
            self.verdicts[i] = Verdict::Forward(verdict as u32);
            fwd += 1;
        }
        (fwd, bad)
    }
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
