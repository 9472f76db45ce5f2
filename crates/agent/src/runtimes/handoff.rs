//! The packets of a wasm VNF's move (ADR 053, "the freeze"): at the source, a frozen
//! instance's node copies what arrives on its ports into a bounded queue instead of processing
//! it (the replication stream carries the queue to the destination after the last map
//! updates); at the destination, the packets handed over wait in another bounded queue and
//! are processed before anything else once the instance forwards and every port is linked.
//!
//! Owns both queues, their bounds and the node's part of the freeze. It must not decide when
//! an instance freezes (the agent's assignments say) nor send anything over the network.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use telvirt_dataplane::node::{NodeIo, PacketProcessor, ProcessorNode};
use telvirt_dataplane::pool::Packet;

/// Packets each queue holds at most (a second of a 64 kpps stream); what would go beyond is
/// dropped and counted as the node's refused packets.
pub const MAX_QUEUED_PACKETS: usize = 65_536;
/// Frame bytes each queue holds at most.
pub const MAX_QUEUED_BYTES: usize = 32 << 20;
/// Looks at the poll count before a wait for a poll under way yields or sleeps.
const SPINS_FOR_A_POLL: u32 = 64;
/// Shortest frame taken: an Ethernet header.
const MIN_FRAME: usize = 14;
/// Packets one poll processes from the handed-over queue at most.
const INJECT_PER_POLL: usize = 256;
/// How long handed-over packets wait for every port of the instance to be linked; then they
/// are processed anyway (a port the network leaves open drops what leaves by it, counted).
pub const LINK_WAIT: Duration = Duration::from_secs(2);

/// One frame and the port it arrived on.
pub type PortFrame = (u16, Vec<u8>);

/// A wasm instance's hand-off state, shared by its node and the runtime.
#[derive(Debug, Default)]
pub struct Handoff {
    /// Set at the source: the node queues what arrives instead of processing it.
    divert: AtomicBool,
    /// Queued at the source, oldest first.
    diverted: Mutex<FrameQueue>,
    /// Packets queued since the freeze, taken or not.
    diverted_total: AtomicU64,
    /// The divert's queue may hold frames (set and cleared under its lock).
    diverted_waiting: AtomicBool,
    /// Handed over from the source (or left by a freeze that ended): processed first.
    injected: Mutex<FrameQueue>,
    injected_waiting: AtomicBool,
    /// The ports (bit i: port i, the 64 first) of the frames handed in.
    injected_ports: AtomicU64,
    /// Since when handed-over packets wait for links (set by the node's first try).
    waiting_since: Mutex<Option<Instant>>,
    /// When the divert began (the first packet queued rather than processed).
    diverted_since: Mutex<Option<Instant>>,
    /// The node's polls begun plus those ended: odd while one runs. A change of the divert
    /// waits for the poll under way (it may have read the divert before the change), not for
    /// the node's worker to come round ([`Handoff::poll_under_way`]).
    polls: AtomicU64,
    /// Packets taken off the divert's queue for the destination whose batch it has not
    /// acknowledged yet: lost if the instance goes before it does.
    in_flight: AtomicU64,
    /// Packets the hand-off dropped (a queue's bound) not yet counted as the node's drops.
    lost: AtomicU64,
    /// The instance went ([`Handoff::discard`]): nothing is handed in any more (set under the
    /// injected queue's lock).
    closed: AtomicBool,
    /// The poll count at which the first poll begun after [`Handoff::polled_since_mark`]
    /// first asked has ended (0: no mark).
    drain_mark: AtomicU64,
    /// The rings into the node's ports as its last diverting poll left them (a removed link's
    /// ring goes once its sender let go of it and the node emptied it).
    input_rings: AtomicUsize,
}

/// One poll of the node, from [`Handoff::begin_poll`] until dropped.
pub struct PollUnderWay<'a> {
    handoff: &'a Handoff,
    /// The count once this poll began (odd).
    begun: u64,
    /// The divert as this poll read it, after it was counted as begun.
    pub diverting: bool,
}

impl Drop for PollUnderWay<'_> {
    fn drop(&mut self) {
        // Only this node's poll writes the count (one poller): a store, not another
        // read-modify-write on the poll's path.
        self.handoff
            .polls
            .store(self.begun.wrapping_add(1), Ordering::Release);
    }
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Frames in arrival order, bounded by [`MAX_QUEUED_PACKETS`] and [`MAX_QUEUED_BYTES`].
#[derive(Debug, Default)]
struct FrameQueue {
    frames: VecDeque<PortFrame>,
    bytes: usize,
}

impl FrameQueue {
    /// Appends `f` unless the queue is full; whether it did.
    fn push(&mut self, f: PortFrame) -> bool {
        if self.frames.len() >= MAX_QUEUED_PACKETS || self.bytes + f.1.len() > MAX_QUEUED_BYTES {
            return false;
        }
        self.bytes += f.1.len();
        self.frames.push_back(f);
        true
    }

    fn pop(&mut self) -> Option<PortFrame> {
        let f = self.frames.pop_front()?;
        self.bytes -= f.1.len();
        Some(f)
    }

    fn front(&self) -> Option<&PortFrame> {
        self.frames.front()
    }

    fn len(&self) -> usize {
        self.frames.len()
    }

    fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }
}

impl Handoff {
    /// The node queues what arrives from its next poll on; a poll under way may still process
    /// (wait for it with [`Handoff::poll_under_way`]).
    pub fn divert(&self) {
        self.clear_mark();
        *locked(&self.diverted_since) = Some(Instant::now());
        self.diverted_total.store(0, Ordering::Release);
        self.divert.store(true, Ordering::SeqCst);
    }

    /// The node's poll begins: counted first, then the divert read (the order a change of the
    /// divert and [`Handoff::poll_under_way`] rely on: a poll that began after the change was
    /// seen as not under way reads the change).
    pub fn begin_poll(&self) -> PollUnderWay<'_> {
        let before = self.polls.fetch_add(1, Ordering::SeqCst);
        // One node polls: two polls under way at once would look like none.
        debug_assert!(
            before.is_multiple_of(2),
            "two polls of one node under way at once"
        );
        PollUnderWay {
            handoff: self,
            begun: before.wrapping_add(1),
            diverting: self.divert.load(Ordering::SeqCst),
        }
    }

    /// After a change of the divert: the poll that may have read the divert from before it
    /// and still runs (its mark for [`Handoff::poll_ended`]), or `None` when every later poll
    /// reads the change.
    pub fn poll_under_way(&self) -> Option<u64> {
        let polls = self.polls.load(Ordering::SeqCst);
        (polls % 2 == 1).then_some(polls)
    }

    /// Whether the poll [`Handoff::poll_under_way`] marked `mark` has ended.
    pub fn poll_ended(&self, mark: u64) -> bool {
        self.polls.load(Ordering::Acquire) != mark
    }

    /// Whether the poll marked `mark` ended within a few looks (a poll takes microseconds).
    pub fn poll_ended_soon(&self, mark: u64) -> bool {
        (0..SPINS_FOR_A_POLL).any(|_| {
            std::hint::spin_loop();
            self.poll_ended(mark)
        })
    }

    /// Blocks until the poll marked `mark` ended: a few looks ([`Handoff::poll_ended_soon`]),
    /// then yields, then sleeps in steps of 10 µs (its worker may wait for a core).
    pub fn wait_poll_ended(&self, mark: u64) {
        if self.poll_ended_soon(mark) {
            return;
        }
        let mut tries = 0u32;
        while !self.poll_ended(mark) {
            tries = tries.saturating_add(1);
            if tries < 192 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(10));
            }
        }
    }

    /// Whether a poll of the node that began after the first call since the last
    /// [`Handoff::clear_mark`] has ended. A diverting poll empties every ring of the node, so
    /// once it did, everything its senders had sent by the first call is queued.
    pub fn polled_since_mark(&self) -> bool {
        let polls = self.polls.load(Ordering::SeqCst);
        // The next poll to begin ends at the count after the one under way (odd) ends.
        let ends_at = polls + 2 + polls % 2;
        // The first call since the mark was cleared sets it; later ones read it.
        let mark = self
            .drain_mark
            .compare_exchange(0, ends_at, Ordering::AcqRel, Ordering::Acquire)
            .map_or_else(|mark| mark, |_| ends_at);
        self.polls.load(Ordering::Acquire) >= mark
    }

    /// The rings into the node's ports its last diverting poll left.
    pub fn input_rings(&self) -> usize {
        self.input_rings.load(Ordering::Acquire)
    }

    /// Forgets the mark of [`Handoff::polled_since_mark`].
    pub fn clear_mark(&self) {
        self.drain_mark.store(0, Ordering::Release);
    }

    /// When the divert under way began (`None`: none is).
    pub fn diverted_since(&self) -> Option<Instant> {
        if self.diverting() {
            *locked(&self.diverted_since)
        } else {
            None
        }
    }

    /// Whether the node queues what arrives.
    pub fn diverting(&self) -> bool {
        self.divert.load(Ordering::Acquire)
    }

    /// Packets queued since the freeze.
    pub fn diverted_total(&self) -> u64 {
        self.diverted_total.load(Ordering::Acquire)
    }

    /// Ends the divert: polls process again from their next round on (the caller waits for
    /// the poll under way, [`Handoff::poll_under_way`], then hands the queue in:
    /// [`Handoff::requeue_if_diverted`]).
    pub fn stop_divert(&self) {
        self.divert.store(false, Ordering::SeqCst);
    }

    /// After a divert ended and no poll diverts any more: what it queued is processed first,
    /// as if handed over.
    fn requeue_diverted(&self) {
        let queued = {
            let mut q = locked(&self.diverted);
            self.diverted_waiting.store(false, Ordering::Release);
            std::mem::take(&mut *q)
        };
        let n = queued.len();
        let taken = self.hand_in(queued.frames.into());
        self.drop_frames(n - taken);
    }

    /// Counts `n` frames the hand-off dropped (taken as the node's drops by
    /// [`Handoff::take_lost`]).
    pub fn drop_frames(&self, n: usize) {
        if n > 0 {
            self.lost
                .fetch_add(u64::try_from(n).unwrap_or(u64::MAX), Ordering::AcqRel);
        }
    }

    /// The frames dropped since the last call (the node's poll, or the instance's removal,
    /// counts them as its drops).
    pub fn take_lost(&self) -> u64 {
        // A load first: every poll of the node asks, and almost never finds any.
        if self.lost.load(Ordering::Acquire) == 0 {
            return 0;
        }
        self.lost.swap(0, Ordering::AcqRel)
    }

    /// `n` packets taken off the divert's queue reached the destination's agent.
    pub fn passed(&self, n: u64) {
        let _ = self
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |f| {
                Some(f.saturating_sub(n))
            });
    }

    /// A divert that ended without a switch (the move cancelled): the frames taken for the
    /// destination and not acknowledged are lost (counted as the node's drops at its next poll).
    pub fn abandon_in_flight(&self) {
        let n = self.in_flight.swap(0, Ordering::AcqRel);
        self.lost.fetch_add(n, Ordering::AcqRel);
    }

    /// When the instance goes: every frame it will never deliver (still queued either way,
    /// taken for the destination and not acknowledged, dropped and not counted yet), the
    /// queues emptied.
    pub fn discard(&self) -> u64 {
        self.stop_divert();
        let diverted = std::mem::take(&mut *locked(&self.diverted)).len();
        let injected = {
            let mut q = locked(&self.injected);
            self.closed.store(true, Ordering::Release);
            std::mem::take(&mut *q).len()
        };
        self.diverted_waiting.store(false, Ordering::Release);
        self.injected_waiting.store(false, Ordering::Release);
        u64::try_from(diverted + injected).unwrap_or(u64::MAX)
            + self.in_flight.swap(0, Ordering::AcqRel)
            + self.take_lost()
    }

    /// The node's poll when it does not divert: a divert that ended (a move cancelled) left
    /// its queue, which goes before anything on the rings ([`Handoff::requeue_diverted`]).
    pub fn requeue_if_diverted(&self) {
        if self.diverted_waiting.load(Ordering::Acquire) {
            self.requeue_diverted();
        }
    }

    /// Queues one frame the node diverted; whether the bounds let it in.
    fn queue_diverted(&self, q: &mut FrameQueue, frame: PortFrame) -> bool {
        if !q.push(frame) {
            return false;
        }
        self.diverted_waiting.store(true, Ordering::Release);
        self.diverted_total.fetch_add(1, Ordering::AcqRel);
        true
    }

    /// Takes up to `max_bytes` of queued frames (at least one when any is queued).
    pub fn take_diverted(&self, max_bytes: usize) -> Vec<PortFrame> {
        let mut q = locked(&self.diverted);
        let mut out = Vec::new();
        let mut bytes = 0;
        while let Some((_, f)) = q.front() {
            if !out.is_empty() && bytes + f.len() > max_bytes {
                break;
            }
            bytes += f.len();
            out.extend(q.pop());
        }
        self.in_flight.fetch_add(
            u64::try_from(out.len()).unwrap_or(u64::MAX),
            Ordering::AcqRel,
        );
        out
    }

    /// Queues `frames` to be processed first; returns how many were taken (the rest would
    /// pass the bounds).
    pub fn hand_in(&self, frames: Vec<PortFrame>) -> usize {
        let mut q = locked(&self.injected);
        // The instance went: the caller counts them all as not taken.
        if self.closed.load(Ordering::Acquire) {
            return 0;
        }
        let mut ports = 0u64;
        let mut taken = 0;
        for f in frames {
            let port = f.0;
            if !q.push(f) {
                break;
            }
            ports |= 1u64.checked_shl(u32::from(port)).unwrap_or(0);
            taken += 1;
        }
        self.injected_ports.fetch_or(ports, Ordering::AcqRel);
        if !q.is_empty() {
            self.injected_waiting.store(true, Ordering::Release);
        }
        taken
    }

    /// Whether handed-over frames wait to be processed (the node's own traffic waits behind
    /// them).
    pub fn injecting(&self) -> bool {
        self.injected_waiting.load(Ordering::Acquire)
    }

    /// The node's poll while it diverts: every packet waiting on its ports is copied into the
    /// queue (beyond its bound, refused) and freed. Returns how many were taken off the ports.
    pub fn divert_poll(&self, io: &mut NodeIo<'_>) -> usize {
        let mut buf: Vec<Packet> = Vec::with_capacity(crate::runtimes::wasm::BATCH);
        let mut handled = 0;
        for port in 0..io.port_count() {
            let Ok(tag) = u16::try_from(port) else {
                break;
            };
            while io.recv(port, &mut buf, crate::runtimes::wasm::BATCH) > 0 {
                handled += buf.len();
                let mut q = locked(&self.diverted);
                for p in buf.drain(..) {
                    if self.queue_diverted(&mut q, (tag, io.pool().data(&p).to_vec())) {
                        io.free(p);
                    } else {
                        io.refuse(p);
                    }
                }
            }
        }
        let rings = (0..io.port_count()).map(|p| io.input_rings(p)).sum();
        self.input_rings.store(rings, Ordering::Release);
        handled
    }

    /// Processes handed-over frames through `node`, oldest first, once the ports they leave by
    /// are linked (a frame processed earlier would leave by a port with no link, and be lost;
    /// after [`LINK_WAIT`] they go anyway), as far as the links have room. Returns how many it
    /// processed.
    pub fn inject_poll<P: PacketProcessor>(
        &self,
        node: &mut ProcessorNode<P>,
        io: &mut NodeIo<'_>,
    ) -> usize {
        if !self.injected_waiting.load(Ordering::Acquire) {
            return 0;
        }
        let ports = self.injected_ports.load(Ordering::Acquire);
        let unlinked = (0..io.port_count().min(64))
            .any(|p| ports & (1 << p) != 0 && !node.output_linked(p, io));
        let mut q = locked(&self.injected);
        if unlinked {
            let mut since = locked(&self.waiting_since);
            if since.get_or_insert_with(Instant::now).elapsed() < LINK_WAIT {
                return 0;
            }
        }
        let mut handled = 0;
        let mut pkts: Vec<Packet> = Vec::new();
        while handled < INJECT_PER_POLL {
            let Some(port) = q.front().map(|(p, _)| usize::from(*p)) else {
                break;
            };
            if port >= io.port_count() {
                // Not a port of this VNF (the descriptor changed under the move): dropped,
                // counted.
                q.pop();
                io.count_refused(1);
                continue;
            }
            let room = node.room(port, io).min(INJECT_PER_POLL - handled);
            while pkts.len() < room && q.front().is_some_and(|(p, _)| usize::from(*p) == port) {
                let Some(mut pkt) = io.alloc() else {
                    break;
                };
                if let Some((_, frame)) = q.pop() {
                    io.pool().write(&mut pkt, &frame);
                }
                pkts.push(pkt);
            }
            if pkts.is_empty() {
                break;
            }
            handled += pkts.len();
            node.run(port, &mut pkts, io);
        }
        if q.is_empty() {
            self.injected_waiting.store(false, Ordering::Release);
            self.injected_ports.store(0, Ordering::Release);
            *locked(&self.waiting_since) = None;
        }
        handled
    }
}

/// Frames on the wire: for each, its port (u16) and length (u32), big-endian, then its bytes.
pub fn encode_frames(frames: &[PortFrame]) -> Vec<u8> {
    let mut out = Vec::with_capacity(frames.iter().map(|(_, f)| f.len() + 6).sum());
    for (port, f) in frames {
        out.extend_from_slice(&port.to_be_bytes());
        out.extend_from_slice(&u32::try_from(f.len()).unwrap_or(u32::MAX).to_be_bytes());
        out.extend_from_slice(f);
    }
    out
}

/// Reads [`encode_frames`]' format; `Err` says where it is malformed. A frame longer than
/// `max_frame` is refused.
pub fn decode_frames(mut bytes: &[u8], max_frame: usize) -> Result<Vec<PortFrame>, String> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        if bytes.len() < 6 {
            return Err(format!("frame {}: a header needs 6 bytes", out.len()));
        }
        let port = u16::from_be_bytes([bytes[0], bytes[1]]);
        let len = u32::from_be_bytes([bytes[2], bytes[3], bytes[4], bytes[5]]) as usize;
        if len < MIN_FRAME {
            return Err(format!(
                "frame {}: {len} bytes, below the {MIN_FRAME} of an Ethernet header",
                out.len()
            ));
        }
        if len > max_frame {
            return Err(format!(
                "frame {}: {len} bytes, above the {max_frame} a packet buffer holds",
                out.len()
            ));
        }
        let Some(frame) = bytes.get(6..6 + len) else {
            return Err(format!(
                "frame {}: {len} bytes announced, fewer sent",
                out.len()
            ));
        };
        out.push((port, frame.to_vec()));
        bytes = &bytes[6 + len..];
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_mark_is_passed_only_by_a_poll_begun_after_it() {
        let h = Handoff::default();
        // Marked while a poll runs: that poll may have emptied the rings before the senders'
        // last frames came; only the next one counts.
        let under_way = h.begin_poll();
        assert!(!h.polled_since_mark());
        drop(under_way);
        assert!(!h.polled_since_mark());
        drop(h.begin_poll());
        assert!(h.polled_since_mark());
        // Cleared: the next call marks again.
        h.clear_mark();
        assert!(!h.polled_since_mark());
        let next = h.begin_poll();
        assert!(!h.polled_since_mark(), "not ended yet");
        drop(next);
        assert!(h.polled_since_mark());
    }

    #[test]
    fn a_divert_waits_for_the_poll_under_way_only() {
        let h = Handoff::default();
        // No poll runs: every later poll reads the divert at once.
        h.divert();
        assert_eq!(h.poll_under_way(), None);
        assert!(h.begin_poll().diverting);
        h.stop_divert();
        // A poll that read the divert before the change is waited for until it returns.
        let poll = h.begin_poll();
        assert!(!poll.diverting);
        h.divert();
        let mark = h.poll_under_way().expect("a poll is under way");
        assert!(!h.poll_ended(mark));
        drop(poll);
        assert!(h.poll_ended(mark));
        h.wait_poll_ended(mark);
        assert_eq!(h.poll_under_way(), None);
        assert!(h.begin_poll().diverting);
    }

    #[test]
    fn no_batch_runs_once_the_divert_settled() {
        // A thread polls as a worker does; a batch reads a count, works a little and writes it
        // back one higher. Once a divert settled, the count stays put while polls go on.
        let h = Arc::new(Handoff::default());
        let processed = Arc::new(AtomicU64::new(0));
        let polls = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        // The polling thread stops when the test ends, also by a failed assertion.
        struct StopOnDrop(Arc<AtomicBool>);
        impl Drop for StopOnDrop {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Release);
            }
        }
        let stopping = StopOnDrop(Arc::clone(&stop));
        let worker = {
            let (h, processed, polls, stop) = (
                Arc::clone(&h),
                Arc::clone(&processed),
                Arc::clone(&polls),
                Arc::clone(&stop),
            );
            std::thread::spawn(move || {
                while !stop.load(Ordering::Acquire) {
                    let poll = h.begin_poll();
                    if !poll.diverting {
                        let n = processed.load(Ordering::Relaxed);
                        for _ in 0..200 {
                            std::hint::spin_loop();
                        }
                        processed.store(n + 1, Ordering::Relaxed);
                    }
                    drop(poll);
                    polls.fetch_add(1, Ordering::AcqRel);
                }
            })
        };
        let wait_for = |what: &str, done: &dyn Fn() -> bool| {
            let deadline = Instant::now() + Duration::from_secs(20);
            while !done() {
                assert!(Instant::now() < deadline, "{what}: not within 20 s");
                std::thread::yield_now();
            }
        };
        for round in 0..200 {
            let before = processed.load(Ordering::Acquire);
            wait_for("a batch processed", &|| {
                processed.load(Ordering::Acquire) > before
            });
            h.divert();
            if let Some(mark) = h.poll_under_way() {
                h.wait_poll_ended(mark);
            }
            let frozen_at = processed.load(Ordering::Acquire);
            let seen = polls.load(Ordering::Acquire);
            wait_for("polls while diverted", &|| {
                polls.load(Ordering::Acquire) >= seen + 50
            });
            assert_eq!(
                processed.load(Ordering::Acquire),
                frozen_at,
                "round {round}: a batch ran after the divert settled"
            );
            h.stop_divert();
            if let Some(mark) = h.poll_under_way() {
                h.wait_poll_ended(mark);
            }
        }
        drop(stopping);
        worker.join().expect("the polling thread");
    }

    #[test]
    fn frames_round_trip_and_malformed_ones_say_where() {
        let frames = vec![(0, vec![1u8; 60]), (1, vec![2u8; 1514]), (0, vec![3u8; 14])];
        assert_eq!(
            decode_frames(&encode_frames(&frames), 2048).unwrap(),
            frames
        );
        let bytes = encode_frames(&frames);
        let e = decode_frames(&bytes[..bytes.len() - 1], 2048).unwrap_err();
        assert!(e.contains("frame 2: 14 bytes announced"), "{e}");
        let e = decode_frames(&bytes, 1000).unwrap_err();
        assert!(e.contains("frame 1: 1514 bytes"), "{e}");
        assert!(
            decode_frames(&[0, 1, 0], 2048)
                .unwrap_err()
                .contains("6 bytes")
        );
        let empty = encode_frames(&[(0, Vec::new())]);
        assert!(
            decode_frames(&empty, 2048)
                .unwrap_err()
                .contains("below the 14")
        );
    }

    #[test]
    fn an_ended_divert_hands_its_queue_in_and_the_queues_are_bounded() {
        let h = Handoff::default();
        h.divert();
        for i in 0..3 {
            assert!(h.queue_diverted(&mut locked(&h.diverted), (0u16, vec![i as u8])));
        }
        let taken = h.take_diverted(1);
        assert_eq!(
            taken,
            vec![(0, vec![0])],
            "at least one, within the bytes asked"
        );
        h.stop_divert();
        // The node's first poll after the divert ended hands the queue in, before its rings.
        h.requeue_if_diverted();
        assert!(!h.diverting() && h.injecting());
        assert_eq!(locked(&h.injected).len(), 2);
        assert!(locked(&h.diverted).is_empty());
        // Once only: the next poll finds nothing left to hand in.
        h.requeue_if_diverted();
        assert_eq!(locked(&h.injected).len(), 2);
        let many = vec![(0u16, vec![0u8]); MAX_QUEUED_PACKETS];
        assert_eq!(h.hand_in(many), MAX_QUEUED_PACKETS - 2);
        assert_eq!(locked(&h.injected).len(), MAX_QUEUED_PACKETS);
        // Bytes bound the queue too.
        let big = Handoff::default();
        let frame = vec![0u8; 2048];
        let fits = MAX_QUEUED_BYTES / frame.len();
        assert_eq!(big.hand_in(vec![(0, frame); fits + 5]), fits);
    }

    #[test]
    fn frames_a_hand_off_never_delivers_are_counted_once() {
        let h = Handoff::default();
        h.divert();
        for i in 0..10 {
            assert!(h.queue_diverted(&mut locked(&h.diverted), (0u16, vec![i as u8])));
        }
        assert_eq!(h.diverted_total(), 10);
        // Six taken for the destination, four acknowledged: two in flight, four queued.
        assert_eq!(h.take_diverted(6).len(), 6);
        h.passed(4);
        assert_eq!(h.discard(), 2 + 4);
        assert_eq!(h.discard(), 0, "counted once");
        // A second divert counts from its start (an instance freezes again after a cancelled
        // move); a requeue beyond the injected queue's bound is lost.
        let h = Handoff::default();
        h.divert();
        h.queue_diverted(&mut locked(&h.diverted), (0u16, vec![1]));
        h.stop_divert();
        h.requeue_if_diverted();
        h.divert();
        assert_eq!(h.diverted_total(), 0);
        let _ = std::mem::take(&mut *locked(&h.injected));
        for _ in 0..3 {
            assert!(h.queue_diverted(&mut locked(&h.diverted), (0u16, vec![1])));
        }
        assert_eq!(
            h.hand_in(vec![(0u16, vec![0u8]); MAX_QUEUED_PACKETS - 1]),
            MAX_QUEUED_PACKETS - 1
        );
        assert_eq!(h.take_diverted(1).len(), 1);
        h.stop_divert();
        h.abandon_in_flight();
        h.requeue_if_diverted();
        assert_eq!(h.take_lost(), 1 + 1, "one in flight, one beyond the bound");
        assert_eq!(h.take_lost(), 0);
        // Handed in and never processed: lost when the instance goes; nothing is taken after.
        assert_eq!(h.discard(), MAX_QUEUED_PACKETS as u64);
        assert!(!h.diverting());
        assert_eq!(h.hand_in(vec![(0u16, vec![0u8])]), 0);
        assert_eq!(h.discard(), 0);
    }
}
