//! The element a worker runs: a [`Node`] with numbered ports, polled in batches through
//! [`NodeIo`]; and the [`PacketProcessor`] trait (batch in, one [`Verdict`] per packet) that VNF
//! stages (plain Rust here, wasm modules in the agent) implement.
//!
//! Owns per-port link ends and link counters; must not decide the wiring (the
//! [`crate::panel`] does) nor pin threads (the [`crate::worker`] does).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::doorbell::Doorbell;
use crate::pool::{Packet, Pool, PoolCache};
use crate::ring::{Consumer, Producer};

/// Default packets per batch.
pub const BATCH: usize = 32;

/// What to do with one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Free the packet.
    Drop,
    /// Send it out of port `k` of the same node.
    Forward(u16),
}

/// A packet-processing stage: receives a batch that arrived on port `input` and pushes exactly
/// one verdict per packet onto `verdicts` (which is empty on entry). Missing verdicts count as
/// [`Verdict::Drop`]. May rewrite packet bytes through `pool`.
pub trait PacketProcessor: Send {
    /// Process one batch.
    fn process(
        &mut self,
        input: usize,
        pool: &Pool,
        pkts: &mut [Packet],
        verdicts: &mut Vec<Verdict>,
    );

    /// If every packet of the next batch from `input` will go to one known port, that port.
    /// The worker then takes from `input` only as many packets as that port's link has room
    /// for (backpressure instead of drops). `None` (the default) means "any port": the worker
    /// then uses the smallest free space over all linked ports.
    fn next_output(&mut self, input: usize) -> Option<u16> {
        let _ = input;
        None
    }
}

/// Counters of one link, shared between the sending worker and readers (`net show`), and the
/// slot where a capture arms its tap. They only grow: the panel hands the same counters to a
/// link that is removed and made again between the same ports (a probe, a re-apply, a
/// restarted VNF).
#[derive(Debug, Default)]
pub struct LinkCounters {
    /// Packets enqueued on the link.
    pub packets: AtomicU64,
    /// Bytes enqueued on the link.
    pub bytes: AtomicU64,
    /// Packets dropped because the link's ring was full.
    pub drops: AtomicU64,
    /// When these counters started from zero (Unix epoch milliseconds; 0: not recorded).
    pub since_unix_ms: u64,
    /// The capture of this link, while one runs.
    pub tap: crate::capture::TapSlot,
}

/// A point-in-time copy of [`LinkCounters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct CounterSnapshot {
    /// Packets enqueued.
    pub packets: u64,
    /// Bytes enqueued.
    pub bytes: u64,
    /// Packets dropped (ring full).
    pub drops: u64,
    /// When the counters started from zero (Unix epoch milliseconds).
    pub since_unix_ms: u64,
}

impl LinkCounters {
    /// Counters at zero, starting now.
    pub fn starting_now() -> Self {
        LinkCounters {
            since_unix_ms: crate::pcap::realtime_ns() / 1_000_000,
            ..LinkCounters::default()
        }
    }

    /// Copy the counters.
    pub fn snapshot(&self) -> CounterSnapshot {
        CounterSnapshot {
            packets: self.packets.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            drops: self.drops.load(Ordering::Relaxed),
            since_unix_ms: self.since_unix_ms,
        }
    }
}

/// Packets a node lost without any link seeing them, shared by all of the node's ports.
#[derive(Debug, Default)]
pub struct NodeCounters {
    /// Sent to a port that had no link.
    pub unlinked: AtomicU64,
    /// Dropped by the node itself: a drop verdict (a firewall's deny, a VNF's drop, a verdict
    /// naming no port), a batch the stage failed (a trapping wasm module's), or a frame a VM's
    /// NIC could not pass (no buffer posted or left, too large, malformed).
    pub refused: AtomicU64,
}

/// A point-in-time copy of [`NodeCounters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct NodeDrops {
    /// Sent to a port that had no link.
    pub unlinked: u64,
    /// Dropped by the node's own verdict.
    pub refused: u64,
}

impl NodeCounters {
    /// Copy the counters.
    pub fn snapshot(&self) -> NodeDrops {
        NodeDrops {
            unlinked: self.unlinked.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
        }
    }
}

/// The sending end of a link, held by the source port.
pub struct TxLink {
    /// Ring producer.
    pub ring: Producer<Packet>,
    /// The link's counters.
    pub counters: Arc<LinkCounters>,
    /// The doorbell of the worker that polls the link's receiving end, rung after each push;
    /// `None` when that is the sending worker itself (awake while it sends).
    pub bell: Option<Arc<Doorbell>>,
}

/// One port's link ends: at most one outgoing link, and incoming rings (more than one only
/// while a replaced link drains).
#[derive(Default)]
pub struct PortIo {
    pub(crate) tx: Option<TxLink>,
    pub(crate) rx: Vec<RxLink>,
    /// The node's drop counters (shared by all ports of a node).
    pub(crate) node_drops: Arc<NodeCounters>,
    /// The outgoing link was removed from the graph but is kept until the node's incoming
    /// rings with these link serials (removed in the same change) are drained (ADR 022).
    pub(crate) retiring: Option<Vec<u64>>,
}

/// The receiving end of a link, tagged with the link's serial number.
pub(crate) struct RxLink {
    pub(crate) serial: u64,
    pub(crate) ring: Consumer<Packet>,
}

/// What a node sees while it is polled.
pub struct NodeIo<'a> {
    pub(crate) pool: &'a Pool,
    pub(crate) cache: &'a mut PoolCache,
    pub(crate) ports: &'a mut [PortIo],
}

impl<'a> NodeIo<'a> {
    /// A standalone `NodeIo` over `ports` (for tests and for embedding nodes elsewhere); the
    /// caller flushes `cache` when done.
    pub fn new(pool: &'a Pool, cache: &'a mut PoolCache, ports: &'a mut [PortIo]) -> Self {
        NodeIo { pool, cache, ports }
    }

    /// The packet pool (for reading and writing packet bytes).
    pub fn pool(&self) -> &'a Pool {
        self.pool
    }

    /// Take up to `n` buffers onto `out` through this worker's cache; returns how many.
    pub fn alloc_batch(&mut self, n: usize, out: &mut Vec<Packet>) -> usize {
        self.cache.alloc_batch(self.pool, n, out)
    }

    /// Take one buffer through this worker's cache.
    pub fn alloc(&mut self) -> Option<Packet> {
        self.cache.alloc(self.pool)
    }

    /// Free one packet through this worker's cache.
    pub fn free(&mut self, pkt: Packet) {
        self.cache.free(self.pool, pkt);
    }

    /// Free every packet in `pkts` (left empty).
    pub fn free_all(&mut self, pkts: &mut Vec<Packet>) {
        self.cache.free_all(self.pool, pkts);
    }

    /// Number of ports.
    pub fn port_count(&self) -> usize {
        self.ports.len()
    }

    /// Receive up to `max` packets that arrived on `port` onto `out`; returns how many.
    /// Incoming rings whose producer is gone and that are drained are discarded here.
    pub fn recv(&mut self, port: usize, out: &mut Vec<Packet>, max: usize) -> usize {
        let Some(p) = self.ports.get_mut(port) else {
            return 0;
        };
        let mut got = 0;
        let mut finished = false;
        for c in p.rx.iter_mut().map(|l| &mut l.ring) {
            if got >= max {
                break;
            }
            let n = c.pop_into(out, max - got);
            if n == 0 && c.is_finished() {
                finished = true;
            }
            got += n;
        }
        if finished {
            p.rx.retain_mut(|l| !l.ring.is_finished());
        }
        got
    }

    /// Free slots on `port`'s outgoing link (0 when unlinked).
    pub fn tx_space(&mut self, port: usize) -> usize {
        match self.ports.get_mut(port).and_then(|p| p.tx.as_mut()) {
            Some(tx) => tx.ring.free_space(),
            None => 0,
        }
    }

    /// Free `pkt`, counted as dropped by the node's own verdict.
    pub fn refuse(&mut self, pkt: Packet) {
        self.count_refused(1);
        self.cache.free(self.pool, pkt);
    }

    /// Count `n` frames the node dropped that never had a pool buffer (a guest's malformed
    /// frame, one the pool had no buffer for), as [`refuse`](Self::refuse) counts.
    pub fn count_refused(&mut self, n: u64) {
        if let Some(p) = self.ports.first() {
            p.node_drops.refused.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// True when a link sends into `port` (or one removed still has frames on its ring).
    pub fn has_input(&self, port: usize) -> bool {
        self.input_rings(port) > 0
    }

    /// The rings into `port`: its link's, and a removed link's until its sender let go of it
    /// and it is empty.
    pub fn input_rings(&self, port: usize) -> usize {
        self.ports.get(port).map_or(0, |p| p.rx.len())
    }

    /// True when `port` has an outgoing link.
    pub fn is_linked(&self, port: usize) -> bool {
        self.ports.get(port).is_some_and(|p| p.tx.is_some())
    }

    /// Send every packet in `pkts` out of `port` (left empty). What does not fit, or has no
    /// link, is freed and counted as a drop. Returns how many were enqueued.
    pub fn send(&mut self, port: usize, pkts: &mut Vec<Packet>) -> usize {
        if pkts.is_empty() {
            return 0;
        }
        let Some(p) = self.ports.get_mut(port) else {
            self.cache.free_all(self.pool, pkts);
            return 0;
        };
        let Some(tx) = p.tx.as_mut() else {
            p.node_drops
                .unlinked
                .fetch_add(pkts.len() as u64, Ordering::Relaxed);
            self.cache.free_all(self.pool, pkts);
            return 0;
        };
        if tx.counters.tap.is_armed() {
            // Only what the ring takes was carried: the rest is dropped below, not captured.
            let fits = pkts.len().min(tx.ring.free_space());
            tx.counters.tap.offer(self.pool, &pkts[..fits]);
        }
        let bytes: usize = pkts.iter().map(Packet::len).sum();
        let total = pkts.len();
        let sent = tx.ring.push_from(pkts);
        if sent > 0
            && let Some(bell) = &tx.bell
        {
            bell.ring();
        }
        let sent_bytes = if sent == total {
            bytes
        } else {
            bytes - pkts.iter().map(Packet::len).sum::<usize>()
        };
        tx.counters
            .packets
            .fetch_add(sent as u64, Ordering::Relaxed);
        tx.counters
            .bytes
            .fetch_add(sent_bytes as u64, Ordering::Relaxed);
        if !pkts.is_empty() {
            tx.counters
                .drops
                .fetch_add(pkts.len() as u64, Ordering::Relaxed);
            self.cache.free_all(self.pool, pkts);
        }
        sent
    }
}

/// Anything a worker can poll: VNF stages, ports, generators, sinks.
pub trait Node: Send {
    /// Do one round of work (about one batch per port); returns the packets handled, 0 when
    /// idle (the worker then backs off).
    fn poll(&mut self, io: &mut NodeIo<'_>) -> usize;
}

/// Runs a [`PacketProcessor`] as a [`Node`]: for each input port, receive a batch, process it,
/// and send each packet where its verdict says.
pub struct ProcessorNode<P> {
    processor: P,
    batch: usize,
    inbuf: Vec<Packet>,
    verdicts: Vec<Verdict>,
    out: Vec<Vec<Packet>>,
}

impl<P: PacketProcessor> ProcessorNode<P> {
    /// Wrap `processor`, polling up to `batch` packets per input port per round.
    pub fn new(processor: P, batch: usize) -> Self {
        ProcessorNode {
            processor,
            batch: batch.max(1),
            inbuf: Vec::with_capacity(batch),
            verdicts: Vec::with_capacity(batch),
            out: Vec::new(),
        }
    }
}

impl<P: PacketProcessor> ProcessorNode<P> {
    /// How many packets of `input` the processor can take now: as many as the link its
    /// packets leave by has room for (a batch when that port is unlinked: it drops, counted),
    /// or the least room of the linked ports when any port may be chosen.
    pub fn room(&mut self, input: usize, io: &mut NodeIo<'_>) -> usize {
        let room = match self.processor.next_output(input) {
            Some(k) if !io.is_linked(usize::from(k)) => self.batch,
            Some(k) => io.tx_space(usize::from(k)),
            None => {
                let mut room = self.batch;
                for k in 0..io.port_count() {
                    if io.is_linked(k) {
                        room = room.min(io.tx_space(k));
                    }
                }
                room
            }
        };
        room.min(self.batch)
    }

    /// Whether packets of `input` can leave: the port they leave by is linked (any port is,
    /// when the processor may choose any).
    pub fn output_linked(&mut self, input: usize, io: &NodeIo<'_>) -> bool {
        match self.processor.next_output(input) {
            Some(k) => io.is_linked(usize::from(k)),
            None => (0..io.port_count()).any(|k| io.is_linked(k)),
        }
    }

    /// Processes `pkts` (left empty) as packets that arrived on `input` and sends each where
    /// its verdict says (a refused packet is freed and counted).
    pub fn run(&mut self, input: usize, pkts: &mut Vec<Packet>, io: &mut NodeIo<'_>) {
        let nports = io.port_count();
        if self.out.len() < nports {
            self.out.resize_with(nports, Vec::new);
        }
        self.verdicts.clear();
        self.processor
            .process(input, io.pool(), pkts, &mut self.verdicts);
        let mut verdicts = self.verdicts.iter();
        for pkt in pkts.drain(..) {
            match verdicts.next() {
                Some(Verdict::Forward(k)) if usize::from(*k) < nports => {
                    self.out[usize::from(*k)].push(pkt)
                }
                _ => io.refuse(pkt),
            }
        }
        for (k, q) in self.out.iter_mut().enumerate() {
            if !q.is_empty() {
                io.send(k, q);
            }
        }
    }
}

impl<P: PacketProcessor> Node for ProcessorNode<P> {
    fn poll(&mut self, io: &mut NodeIo<'_>) -> usize {
        let mut handled = 0;
        let mut inbuf = std::mem::take(&mut self.inbuf);
        for input in 0..io.port_count() {
            inbuf.clear();
            let want = self.room(input, io);
            if want == 0 || io.recv(input, &mut inbuf, want) == 0 {
                continue;
            }
            handled += inbuf.len();
            self.run(input, &mut inbuf, io);
        }
        self.inbuf = inbuf;
        handled
    }
}
