//! Single-producer single-consumer packet rings with batched enqueue/dequeue, living in a
//! memfd-backed [`Region`] so the ring can later be mapped by another process.
//!
//! Owns the index protocol (see ADR 020); must not own packet memory (the [`crate::pool`] does)
//! nor decide what happens when a ring is full (the caller counts the drop).
//!
//! Layout of the region (all offsets in bytes, every index on its own 128-byte block so the
//! producer's and the consumer's lines never share a cache line nor an adjacent-line prefetch
//! pair):
//!
//! | offset | field | written by |
//! |---|---|---|
//! | 0   | `head: u64`, next slot the producer will fill | producer |
//! | 128 | `tail: u64`, next slot the consumer will read | consumer |
//! | 256 | `closed: u64`, non-zero once the producer is gone | producer |
//! | 264 | `capacity: u64` (power of two) | creator, before sharing |
//! | 384 | `slots: [u64; capacity]` | producer writes, consumer reads |
//!
//! Indices grow monotonically (wrapping at 2^64, which never happens in practice) and are
//! masked to find a slot. Each side keeps a private copy of the other side's index and
//! re-reads the shared one only when the copy says the ring is full (producer) or empty
//! (consumer), so a batch costs two shared-cache-line touches, not two per packet.

use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::error::{Error, Result};
#[cfg(not(feature = "loom"))]
use crate::region::Region;

#[cfg(not(feature = "loom"))]
const HEAD_OFF: usize = 0;
#[cfg(not(feature = "loom"))]
const TAIL_OFF: usize = 128;
#[cfg(not(feature = "loom"))]
const CLOSED_OFF: usize = 256;
#[cfg(not(feature = "loom"))]
const CAP_OFF: usize = 264;
#[cfg(not(feature = "loom"))]
const SLOTS_OFF: usize = 384;

/// Largest accepted ring capacity (slots).
pub const MAX_CAPACITY: usize = 1 << 24;

/// A value that travels through a ring as 64 bits.
///
/// # Safety
/// `from_bits(into_bits(x))` must give back `x`, and `from_bits` is only ever called on a value
/// produced by `into_bits` (the ring guarantees this); a type whose values are unique tokens
/// (like [`crate::pool::Packet`]) stays unique because each slot is read exactly once.
pub unsafe trait RingItem: Send {
    /// Encode.
    fn into_bits(self) -> u64;
    /// Decode.
    ///
    /// # Safety
    /// `bits` must come from `into_bits` of a value that has not been decoded since.
    unsafe fn from_bits(bits: u64) -> Self;
}

// SAFETY: identity encoding.
unsafe impl RingItem for u64 {
    fn into_bits(self) -> u64 {
        self
    }
    unsafe fn from_bits(bits: u64) -> Self {
        bits
    }
}

#[cfg(not(feature = "loom"))]
use std::sync::atomic::AtomicU64;

/// The ring's memory: header words and slots in a memfd region (see the module docs).
#[cfg(not(feature = "loom"))]
struct Shared {
    region: Region,
    mask: u64,
}

#[cfg(not(feature = "loom"))]
impl Shared {
    fn new(name: &str, capacity: usize) -> Result<Self> {
        let region = Region::new(&format!("ring-{name}"), SLOTS_OFF + 8 * capacity)?;
        let shared = Shared {
            region,
            mask: capacity as u64 - 1,
        };
        shared
            .atomic(CAP_OFF)
            .store(capacity as u64, Ordering::Relaxed);
        Ok(shared)
    }
    fn atomic(&self, off: usize) -> &AtomicU64 {
        // SAFETY: `off` is one of the 8-byte aligned header offsets, inside the region (which is
        // at least SLOTS_OFF bytes and page aligned); the region lives as long as `self`, and
        // every access to these words goes through atomics.
        unsafe { AtomicU64::from_ptr(self.region.as_ptr().add(off).cast::<u64>()) }
    }
    fn head(&self) -> &AtomicU64 {
        self.atomic(HEAD_OFF)
    }
    fn tail(&self) -> &AtomicU64 {
        self.atomic(TAIL_OFF)
    }
    fn closed(&self) -> &AtomicU64 {
        self.atomic(CLOSED_OFF)
    }
    fn slot(&self, index: u64) -> *mut u64 {
        // `index & mask` < capacity, and the region holds SLOTS_OFF + 8 * capacity bytes.
        let i = usize::try_from(index & self.mask).expect("masked ring index fits usize");
        // SAFETY: in bounds by the comment above.
        unsafe { self.region.as_ptr().add(SLOTS_OFF).cast::<u64>().add(i) }
    }
    /// # Safety
    /// Only the producer calls this, on a slot the consumer has released (index < tail + cap).
    unsafe fn write_slot(&self, index: u64, v: u64) {
        // SAFETY: in bounds (`slot`), and exclusive by the caller's contract.
        unsafe { self.slot(index).write(v) }
    }
    /// # Safety
    /// Only the consumer calls this, on a slot the producer has published (index < head).
    unsafe fn read_slot(&self, index: u64) -> u64 {
        // SAFETY: in bounds (`slot`), published by a Release store the caller Acquired.
        unsafe { self.slot(index).read() }
    }
    /// Write `items` to consecutive slots from `start`, with the slot base and mask held in
    /// locals (a write through the mapping could otherwise alias `self` for the optimiser).
    ///
    /// # Safety
    /// Only the producer calls this, and the slots `start..start + items.len()` are free.
    unsafe fn write_run(&self, start: u64, items: impl Iterator<Item = u64>) {
        let base = self.slot(0);
        let mask = self.mask;
        let mut i = start;
        for v in items {
            // SAFETY: the masked index is < capacity; exclusive by the caller's contract.
            unsafe { base.add((i & mask) as usize).write(v) };
            i = i.wrapping_add(1);
        }
    }
    /// Read `n` consecutive slots from `start` onto `out`, converted by `f`.
    ///
    /// # Safety
    /// Only the consumer calls this, on slots the producer has published.
    unsafe fn read_run<T>(&self, start: u64, n: usize, out: &mut Vec<T>, f: impl Fn(u64) -> T) {
        let base = self.slot(0);
        let mask = self.mask;
        out.extend((0..n as u64).map(|k| {
            // SAFETY: the masked index is < capacity; published per the caller's contract.
            f(unsafe { base.add((start.wrapping_add(k) & mask) as usize).read() })
        }));
    }
    fn capacity(&self) -> u64 {
        self.mask + 1
    }
}

#[cfg(feature = "loom")]
use loom::sync::atomic::AtomicU64;

/// Under the `loom` feature the same protocol runs on loom's atomics and cells (heap memory),
/// so loom can explore every interleaving and detect unsynchronised slot access.
#[cfg(feature = "loom")]
struct Shared {
    head: AtomicU64,
    tail: AtomicU64,
    closed: AtomicU64,
    slots: Box<[loom::cell::UnsafeCell<u64>]>,
    mask: u64,
}

// SAFETY: a slot is only written by the single producer before publication and only read by
// the single consumer after it; this is exactly what the loom model checks.
#[cfg(feature = "loom")]
unsafe impl Sync for Shared {}
// SAFETY: as above; the cells hold plain u64 values.
#[cfg(feature = "loom")]
unsafe impl Send for Shared {}

#[cfg(feature = "loom")]
impl Shared {
    fn new(_name: &str, capacity: usize) -> Result<Self> {
        Ok(Shared {
            head: AtomicU64::new(0),
            tail: AtomicU64::new(0),
            closed: AtomicU64::new(0),
            slots: (0..capacity)
                .map(|_| loom::cell::UnsafeCell::new(0))
                .collect(),
            mask: capacity as u64 - 1,
        })
    }
    fn head(&self) -> &AtomicU64 {
        &self.head
    }
    fn tail(&self) -> &AtomicU64 {
        &self.tail
    }
    fn closed(&self) -> &AtomicU64 {
        &self.closed
    }
    unsafe fn write_slot(&self, index: u64, v: u64) {
        let cell = &self.slots[(index & self.mask) as usize];
        // SAFETY: exclusive by the caller's contract; loom checks it.
        cell.with_mut(|p| unsafe { p.write(v) })
    }
    unsafe fn read_slot(&self, index: u64) -> u64 {
        let cell = &self.slots[(index & self.mask) as usize];
        // SAFETY: published by the caller's contract; loom checks it.
        cell.with(|p| unsafe { p.read() })
    }
    unsafe fn write_run(&self, start: u64, items: impl Iterator<Item = u64>) {
        let mut i = start;
        for v in items {
            // SAFETY: forwarded contract.
            unsafe { self.write_slot(i, v) };
            i = i.wrapping_add(1);
        }
    }
    unsafe fn read_run<T>(&self, start: u64, n: usize, out: &mut Vec<T>, f: impl Fn(u64) -> T) {
        for k in 0..n as u64 {
            // SAFETY: forwarded contract.
            out.push(f(unsafe { self.read_slot(start.wrapping_add(k)) }));
        }
    }
    fn capacity(&self) -> u64 {
        self.mask + 1
    }
}

/// The writing end of a ring. Exactly one exists per ring. Aligned to 128 bytes so that its
/// private indices never share a cache line with the consumer's.
#[repr(align(128))]
pub struct Producer<T: RingItem> {
    shared: Arc<Shared>,
    head: u64,
    cached_tail: u64,
    _t: PhantomData<T>,
}

/// The reading end of a ring. Exactly one exists per ring (128-byte aligned, as the producer).
#[repr(align(128))]
pub struct Consumer<T: RingItem> {
    shared: Arc<Shared>,
    tail: u64,
    cached_head: u64,
    _t: PhantomData<T>,
}

/// Create a ring of `capacity` slots (a power of two, 2..=[`MAX_CAPACITY`]) in a new memfd
/// region named `name`.
pub fn channel<T: RingItem>(name: &str, capacity: usize) -> Result<(Producer<T>, Consumer<T>)> {
    if !(2..=MAX_CAPACITY).contains(&capacity) || !capacity.is_power_of_two() {
        return Err(Error::config(
            "ring.capacity",
            format!("{capacity} is not a power of two in 2..={MAX_CAPACITY}"),
        ));
    }
    let shared = Arc::new(Shared::new(name, capacity)?);
    let producer = Producer {
        shared: Arc::clone(&shared),
        head: 0,
        cached_tail: 0,
        _t: PhantomData,
    };
    let consumer = Consumer {
        shared,
        tail: 0,
        cached_head: 0,
        _t: PhantomData,
    };
    Ok((producer, consumer))
}

impl<T: RingItem> Producer<T> {
    /// Slots that can be filled right now (refreshes the view of the consumer's index).
    pub fn free_space(&mut self) -> usize {
        self.cached_tail = self.shared.tail().load(Ordering::Acquire);
        self.free_cached()
    }

    fn free_cached(&self) -> usize {
        let used = self.head.wrapping_sub(self.cached_tail);
        usize::try_from(self.shared.capacity() - used).expect("ring free space fits usize")
    }

    /// Reserve up to `want` slots, re-reading the consumer index only when needed.
    fn reserve(&mut self, want: usize) -> usize {
        let mut free = self.free_cached();
        if free < want {
            free = self.free_space();
        }
        free.min(want)
    }

    /// Enqueue one item, or give it back when the ring is full.
    pub fn push(&mut self, item: T) -> Result<(), T> {
        if self.reserve(1) == 0 {
            return Err(item);
        }
        // SAFETY: the slot at `head` is free (reserve said so: the consumer's tail is past it)
        // and only this producer writes slots.
        unsafe { self.shared.write_slot(self.head, item.into_bits()) };
        self.head = self.head.wrapping_add(1);
        self.shared.head().store(self.head, Ordering::Release);
        Ok(())
    }

    /// Enqueue as many items from the front of `items` as fit, in order, with one publication
    /// of the head index. Returns how many were enqueued; those are removed from `items`, the
    /// rest stay.
    pub fn push_from(&mut self, items: &mut Vec<T>) -> usize {
        let n = self.reserve(items.len());
        if n == 0 {
            return 0;
        }
        let h = self.head;
        // SAFETY: the `n` slots from `head` are free (reserve) and only we write slots.
        unsafe {
            self.shared
                .write_run(h, items.drain(..n).map(RingItem::into_bits))
        };
        let h = h.wrapping_add(n as u64);
        self.head = h;
        self.shared.head().store(h, Ordering::Release);
        n
    }

    /// Ring capacity in slots.
    pub fn capacity(&self) -> usize {
        usize::try_from(self.shared.capacity()).expect("capacity fits usize")
    }

    /// The region holding the ring, to share it with another process.
    #[cfg(not(feature = "loom"))]
    pub fn region(&self) -> &Region {
        &self.shared.region
    }
}

impl<T: RingItem> Drop for Producer<T> {
    fn drop(&mut self) {
        self.shared.closed().store(1, Ordering::Release);
    }
}

impl<T: RingItem> Consumer<T> {
    /// Items ready to read right now.
    pub fn len(&mut self) -> usize {
        self.cached_head = self.shared.head().load(Ordering::Acquire);
        usize::try_from(self.cached_head.wrapping_sub(self.tail)).expect("ring length fits usize")
    }

    /// True when no item is ready.
    pub fn is_empty(&mut self) -> bool {
        self.len() == 0
    }

    /// True when the producer published items since this end last read its index: work a
    /// worker about to sleep must not sleep through. Items that sat there already (a reader
    /// held back by a full link downstream) do not count.
    pub fn has_new_items(&mut self) -> bool {
        let head = self.shared.head().load(Ordering::Acquire);
        let new = head != self.cached_head;
        self.cached_head = head;
        new
    }

    /// True once the producer has been dropped (items may still be queued).
    pub fn is_closed(&self) -> bool {
        self.shared.closed().load(Ordering::Acquire) != 0
    }

    /// True once the producer has been dropped and every item it enqueued has been read: the
    /// ring can be discarded without losing anything.
    pub fn is_finished(&mut self) -> bool {
        // Read `closed` first: if it is set, the producer's last head store happened before it.
        let closed = self.shared.closed().load(Ordering::Acquire) != 0;
        closed && self.is_empty()
    }

    fn available(&mut self, want: usize) -> usize {
        let mut avail =
            usize::try_from(self.cached_head.wrapping_sub(self.tail)).expect("fits usize");
        if avail < want {
            avail = self.len();
        }
        avail.min(want)
    }

    /// Dequeue one item.
    pub fn pop(&mut self) -> Option<T> {
        if self.available(1) == 0 {
            return None;
        }
        // SAFETY: the slot at `tail` was published by the producer's Release store of head,
        // which our Acquire load observed; it is read exactly once.
        let item = unsafe { T::from_bits(self.shared.read_slot(self.tail)) };
        self.tail = self.tail.wrapping_add(1);
        self.shared.tail().store(self.tail, Ordering::Release);
        Some(item)
    }

    /// Dequeue up to `max` items (in order) onto the end of `out`, with one publication of the
    /// tail index. Returns how many.
    pub fn pop_into(&mut self, out: &mut Vec<T>, max: usize) -> usize {
        let n = self.available(max);
        if n == 0 {
            return 0;
        }
        // SAFETY: each `b` was produced by `into_bits` and is decoded once (each slot is read
        // once).
        let decode = |b| unsafe { T::from_bits(b) };
        // SAFETY: as in `pop`: these `n` slots were published and are read once each.
        unsafe { self.shared.read_run(self.tail, n, out, decode) };
        let t = self.tail.wrapping_add(n as u64);
        self.tail = t;
        self.shared.tail().store(t, Ordering::Release);
        n
    }

    /// Ring capacity in slots.
    pub fn capacity(&self) -> usize {
        usize::try_from(self.shared.capacity()).expect("capacity fits usize")
    }
}

#[cfg(all(test, feature = "loom"))]
mod loom_tests {
    use super::*;

    /// Every interleaving of a producer pushing 3 items in batches through a 2-slot ring and a
    /// consumer popping them: items arrive once, in order, and no slot is read while written.
    #[test]
    fn loom_spsc_batches_are_exact_and_race_free() {
        loom::model(|| {
            let (mut p, mut c) = channel::<u64>("loom", 2).unwrap();
            let t = loom::thread::spawn(move || {
                let mut items = vec![1u64, 2, 3];
                while !items.is_empty() {
                    if p.push_from(&mut items) == 0 {
                        loom::thread::yield_now();
                    }
                }
            });
            let mut got = Vec::new();
            while got.len() < 3 {
                if c.pop_into(&mut got, 2) == 0 {
                    loom::thread::yield_now();
                }
            }
            t.join().unwrap();
            assert_eq!(got, vec![1, 2, 3]);
            assert!(c.is_finished());
        });
    }
}

#[cfg(all(test, not(feature = "loom")))]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_capacity() {
        for cap in [0usize, 1, 3, 1000, MAX_CAPACITY * 2] {
            let e = channel::<u64>("bad", cap).err().unwrap();
            assert!(e.to_string().contains("ring.capacity"), "{cap}: {e}");
        }
    }

    #[test]
    fn fifo_batches_and_full_ring() {
        let (mut p, mut c) = channel::<u64>("fifo", 8).unwrap();
        let mut items: Vec<u64> = (0..10).collect();
        assert_eq!(p.push_from(&mut items), 8);
        assert_eq!(items, vec![8, 9]);
        assert_eq!(p.push(99), Err(99));
        let mut out = Vec::new();
        assert_eq!(c.pop_into(&mut out, 3), 3);
        assert_eq!(out, vec![0, 1, 2]);
        assert_eq!(p.push_from(&mut items), 2);
        out.clear();
        assert_eq!(c.pop_into(&mut out, 100), 7);
        assert_eq!(out, vec![3, 4, 5, 6, 7, 8, 9]);
        assert_eq!(c.pop(), None);
    }

    #[test]
    fn finished_only_after_close_and_drain() {
        let (mut p, mut c) = channel::<u64>("close", 4).unwrap();
        p.push(1).unwrap();
        assert!(!c.is_finished());
        drop(p);
        assert!(!c.is_finished(), "one item still queued");
        assert_eq!(c.pop(), Some(1));
        assert!(c.is_finished());
    }

    #[test]
    fn two_threads_transfer_everything_in_order() {
        const N: u64 = 200_000;
        let (mut p, mut c) = channel::<u64>("threads", 64).unwrap();
        let t = std::thread::spawn(move || {
            let mut next = 0u64;
            let mut batch = Vec::with_capacity(32);
            while next < N {
                while batch.len() < 32 && next < N {
                    batch.push(next);
                    next += 1;
                }
                p.push_from(&mut batch);
                while !batch.is_empty() {
                    p.push_from(&mut batch);
                    std::hint::spin_loop();
                }
            }
        });
        let mut expect = 0u64;
        let mut out = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while expect < N {
            out.clear();
            c.pop_into(&mut out, 32);
            for v in &out {
                assert_eq!(*v, expect);
                expect += 1;
            }
            assert!(std::time::Instant::now() < deadline, "stalled at {expect}");
        }
        t.join().unwrap();
        assert!(c.is_finished());
    }
}
