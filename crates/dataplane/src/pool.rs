//! Fixed-size packet buffers carved from one memfd-backed [`Region`], and the [`Packet`] token
//! that owns one buffer while it travels through rings.
//!
//! Owns buffer memory and its free list; must not know about ports or links. A [`Packet`] is a
//! unique, non-copyable token (pool id, buffer index, length) that fits in 64 bits so it can
//! travel through a [`crate::ring`]; only its holder can reach the buffer's bytes, which is what
//! makes [`Pool::data_mut`] sound.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::error::{Error, Result};
use crate::region::Region;
use crate::ring::RingItem;

/// Default buffer size: a full Ethernet frame (1514 bytes) plus headroom.
pub const DEFAULT_BUF_SIZE: usize = 2048;
/// Largest buffer count one pool can hold (the index has 24 bits).
pub const MAX_BUFFERS: usize = 1 << 24;

static NEXT_POOL_ID: AtomicU32 = AtomicU32::new(1);

/// One packet buffer owned by its holder. Dropping a `Packet` without [`Pool::free`] leaks the
/// buffer (never unsafe); workers free every packet they drop.
#[derive(Debug, PartialEq, Eq)]
pub struct Packet {
    bits: u64,
}

impl Packet {
    fn new(pool: u32, index: u32, len: u16) -> Self {
        Packet {
            bits: (u64::from(pool) << 40) | (u64::from(len) << 24) | u64::from(index),
        }
    }
    fn pool_id(&self) -> u32 {
        (self.bits >> 40) as u32
    }
    fn index(&self) -> u32 {
        (self.bits & 0xff_ffff) as u32
    }
    /// Bytes of packet data.
    pub fn len(&self) -> usize {
        ((self.bits >> 24) & 0xffff) as usize
    }
    /// True for an empty packet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn with_len(&mut self, len: u16) {
        self.bits = (self.bits & !(0xffff << 24)) | (u64::from(len) << 24);
    }
}

// SAFETY: the encoding is the token itself; a ring reads each slot once, so the token stays
// unique.
unsafe impl RingItem for Packet {
    fn into_bits(self) -> u64 {
        self.bits
    }
    unsafe fn from_bits(bits: u64) -> Self {
        Packet { bits }
    }
}

/// Buffers a [`PoolCache`] moves to or from the pool in one lock.
pub const CACHE_CHUNK: usize = 64;

/// A pool of `count` buffers of `buf_size` bytes in one shared-memory region. Safe to use from
/// many threads (`Arc<Pool>`): the free list is a mutex-protected stack, and hot paths go
/// through a per-thread [`PoolCache`] that takes and returns [`CACHE_CHUNK`] buffers per lock
/// (ADR 020: a shared lock-free queue touched per packet from two cores was the bottleneck).
pub struct Pool {
    id: u32,
    region: Region,
    buf_size: usize,
    count: usize,
    free: Mutex<Vec<u32>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("id", &self.id)
            .field("buf_size", &self.buf_size)
            .field("count", &self.count)
            .field("free", &self.available())
            .finish()
    }
}

impl Pool {
    /// Create a pool of `count` buffers (1..=[`MAX_BUFFERS`]) of `buf_size` bytes (64..=65535,
    /// a multiple of 64 so buffers start on cache lines).
    pub fn new(name: &str, count: usize, buf_size: usize) -> Result<Self> {
        if !(1..=MAX_BUFFERS).contains(&count) {
            return Err(Error::config(
                "pool.count",
                format!("{count} is outside 1..={MAX_BUFFERS}"),
            ));
        }
        if !(64..=65535).contains(&buf_size) || !buf_size.is_multiple_of(64) {
            return Err(Error::config(
                "pool.buf_size",
                format!("{buf_size} must be a multiple of 64 in 64..=65535"),
            ));
        }
        let id = NEXT_POOL_ID.fetch_add(1, Ordering::Relaxed);
        if id >= 1 << 24 {
            return Err(Error::config(
                "pool",
                "more than 16M pools created in this process",
            ));
        }
        let region = Region::new(&format!("pool-{name}"), count * buf_size)?;
        // Reversed so that the first allocations get the lowest indices.
        let free = (0..count)
            .rev()
            .map(|i| u32::try_from(i).expect("index < 2^24"))
            .collect();
        Ok(Pool {
            id,
            region,
            buf_size,
            count,
            free: Mutex::new(free),
        })
    }

    /// Size of each buffer.
    pub fn buf_size(&self) -> usize {
        self.buf_size
    }

    /// Total buffers.
    pub fn capacity(&self) -> usize {
        self.count
    }

    /// Buffers currently in the shared free list (buffers held in caches are not counted).
    pub fn available(&self) -> usize {
        self.stack().len()
    }

    fn stack(&self) -> std::sync::MutexGuard<'_, Vec<u32>> {
        // The stack is valid after any panic (pushes and pops are atomic with respect to it).
        self.free.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn take_indices(&self, n: usize, out: &mut Vec<u32>) -> usize {
        let mut st = self.stack();
        let k = n.min(st.len());
        let from = st.len() - k;
        out.extend(st.drain(from..));
        k
    }

    fn give_indices(&self, idx: impl Iterator<Item = u32>) {
        self.stack().extend(idx);
    }

    /// The backing region (to share the buffers with another process).
    pub fn region(&self) -> &Region {
        &self.region
    }

    /// Take a free buffer (length 0).
    pub fn alloc(&self) -> Result<Packet> {
        self.stack()
            .pop()
            .map(|i| Packet::new(self.id, i, 0))
            .ok_or(Error::PoolExhausted {
                capacity: self.count,
            })
    }

    /// Take up to `n` free buffers onto `out` (one lock); returns how many.
    pub fn alloc_batch(&self, n: usize, out: &mut Vec<Packet>) -> usize {
        let mut st = self.stack();
        let k = n.min(st.len());
        let from = st.len() - k;
        out.extend(st.drain(from..).map(|i| Packet::new(self.id, i, 0)));
        k
    }

    /// Return a buffer to the pool.
    pub fn free(&self, pkt: Packet) {
        self.check(&pkt);
        self.stack().push(pkt.index());
    }

    /// Return every packet in `pkts` (which is left empty), with one lock.
    pub fn free_all(&self, pkts: &mut Vec<Packet>) {
        for p in pkts.iter() {
            self.check(p);
        }
        self.give_indices(pkts.drain(..).map(|p| p.index()));
    }

    fn check(&self, pkt: &Packet) {
        assert!(
            pkt.pool_id() == self.id && (pkt.index() as usize) < self.count,
            "invariant: a packet is only used with the pool that allocated it"
        );
    }

    fn buf_ptr(&self, pkt: &Packet) -> *mut u8 {
        self.check(pkt);
        // SAFETY: index < count (checked), so the buffer lies inside the region.
        unsafe {
            self.region
                .as_ptr()
                .add(pkt.index() as usize * self.buf_size)
        }
    }

    /// The packet's bytes.
    pub fn data<'a>(&'a self, pkt: &'a Packet) -> &'a [u8] {
        let p = self.buf_ptr(pkt);
        // SAFETY: the buffer is reachable only through its unique token `pkt`, borrowed shared
        // here for the slice's lifetime; len <= buf_size by construction (set_len checks).
        unsafe { std::slice::from_raw_parts(p, pkt.len()) }
    }

    /// The packet's bytes, writable.
    pub fn data_mut<'a>(&'a self, pkt: &'a mut Packet) -> &'a mut [u8] {
        let len = pkt.len();
        let p = self.buf_ptr(pkt);
        // SAFETY: `pkt` is the buffer's unique token, borrowed exclusively for the slice's
        // lifetime, so no other reference to these bytes exists.
        unsafe { std::slice::from_raw_parts_mut(p, len) }
    }

    /// Fill the packet: `f` gets the whole buffer and returns the new length (clamped to the
    /// buffer size).
    pub fn fill(&self, pkt: &mut Packet, f: impl FnOnce(&mut [u8]) -> usize) {
        let p = self.buf_ptr(pkt);
        // SAFETY: as in `data_mut`, for the whole buffer.
        let buf = unsafe { std::slice::from_raw_parts_mut(p, self.buf_size) };
        let len = f(buf).min(self.buf_size);
        pkt.with_len(u16::try_from(len).expect("buf_size <= 65535"));
    }

    /// The packet's whole buffer as a raw pointer and its size, to hand to the kernel (e.g.
    /// `recvmmsg`). Writing through it is sound while `pkt` is held exclusively; follow with
    /// [`Pool::set_len`].
    pub(crate) fn raw_buf(&self, pkt: &mut Packet) -> (*mut u8, usize) {
        (self.buf_ptr(pkt), self.buf_size)
    }

    /// Set the packet's length (clamped to the buffer size).
    pub(crate) fn set_len(&self, pkt: &mut Packet, len: usize) {
        let len = len.min(self.buf_size);
        pkt.with_len(u16::try_from(len).expect("buf_size <= 65535"));
    }

    /// Copy `bytes` into the packet (truncated to the buffer size); returns the new length.
    pub fn write(&self, pkt: &mut Packet, bytes: &[u8]) -> usize {
        self.fill(pkt, |buf| {
            let n = bytes.len().min(buf.len());
            buf[..n].copy_from_slice(&bytes[..n]);
            n
        });
        pkt.len()
    }
}

/// A per-thread stash of free buffers in front of a [`Pool`]: allocation and freeing touch
/// only this thread's memory, and the shared free list is locked once per [`CACHE_CHUNK`]
/// buffers. Call [`PoolCache::flush`] before dropping it, or its buffers stay out of the pool.
#[derive(Debug, Default)]
pub struct PoolCache {
    idx: Vec<u32>,
}

impl PoolCache {
    /// An empty cache.
    pub fn new() -> Self {
        PoolCache {
            idx: Vec::with_capacity(3 * CACHE_CHUNK),
        }
    }

    /// Take up to `n` buffers onto `out`; returns how many.
    pub fn alloc_batch(&mut self, pool: &Pool, n: usize, out: &mut Vec<Packet>) -> usize {
        if self.idx.len() < n {
            pool.take_indices(n.max(CACHE_CHUNK), &mut self.idx);
        }
        let k = n.min(self.idx.len());
        let from = self.idx.len() - k;
        out.extend(self.idx.drain(from..).map(|i| Packet::new(pool.id, i, 0)));
        k
    }

    /// Take one buffer.
    pub fn alloc(&mut self, pool: &Pool) -> Option<Packet> {
        if self.idx.is_empty() {
            pool.take_indices(CACHE_CHUNK, &mut self.idx);
        }
        self.idx.pop().map(|i| Packet::new(pool.id, i, 0))
    }

    /// Return one buffer.
    pub fn free(&mut self, pool: &Pool, pkt: Packet) {
        pool.check(&pkt);
        self.idx.push(pkt.index());
        if self.idx.len() >= 2 * CACHE_CHUNK {
            let from = self.idx.len() - CACHE_CHUNK;
            pool.give_indices(self.idx.drain(from..));
        }
    }

    /// Return every packet in `pkts` (left empty).
    pub fn free_all(&mut self, pool: &Pool, pkts: &mut Vec<Packet>) {
        for p in pkts.drain(..) {
            self.free(pool, p);
        }
    }

    /// Give every cached buffer back to the pool.
    pub fn flush(&mut self, pool: &Pool) {
        pool.give_indices(self.idx.drain(..));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_write_read_free() {
        let pool = Pool::new("t", 4, 128).unwrap();
        let mut a = pool.alloc().unwrap();
        assert_eq!(pool.write(&mut a, b"hello"), 5);
        assert_eq!(pool.data(&a), b"hello");
        pool.data_mut(&mut a)[0] = b'j';
        assert_eq!(pool.data(&a), b"jello");
        assert_eq!(pool.write(&mut a, &[1u8; 500]), 128, "truncated to buffer");
        assert_eq!(pool.available(), 3);
        pool.free(a);
        assert_eq!(pool.available(), 4);
    }

    #[test]
    fn exhaustion_is_an_error_and_batch_alloc_is_partial() {
        let pool = Pool::new("t", 3, 64).unwrap();
        let mut v = Vec::new();
        assert_eq!(pool.alloc_batch(5, &mut v), 3);
        assert!(matches!(
            pool.alloc(),
            Err(Error::PoolExhausted { capacity: 3 })
        ));
        pool.free_all(&mut v);
        assert_eq!(pool.available(), 3);
    }

    #[test]
    #[should_panic(expected = "only used with the pool that allocated it")]
    fn foreign_packet_is_refused() {
        let a = Pool::new("a", 2, 64).unwrap();
        let b = Pool::new("b", 2, 64).unwrap();
        let p = a.alloc().unwrap();
        let _ = b.data(&p);
    }

    #[test]
    fn bad_config_names_field() {
        assert!(
            Pool::new("x", 0, 128)
                .unwrap_err()
                .to_string()
                .contains("pool.count")
        );
        assert!(
            Pool::new("x", 1, 100)
                .unwrap_err()
                .to_string()
                .contains("pool.buf_size")
        );
    }

    #[test]
    fn cache_batches_the_shared_list_and_flush_returns_everything() {
        let pool = Pool::new("c", 4 * CACHE_CHUNK, 64).unwrap();
        let mut c = PoolCache::new();
        let mut v = Vec::new();
        assert_eq!(c.alloc_batch(&pool, 10, &mut v), 10);
        assert_eq!(pool.available(), 3 * CACHE_CHUNK, "one chunk taken");
        let one = c.alloc(&pool).unwrap();
        c.free(&pool, one);
        c.free_all(&pool, &mut v);
        assert!(v.is_empty());
        assert_eq!(pool.available(), 3 * CACHE_CHUNK, "still cached");
        c.flush(&pool);
        assert_eq!(pool.available(), 4 * CACHE_CHUNK);
        // Exhaustion through the cache is partial, not an error.
        let mut all = Vec::new();
        assert_eq!(
            c.alloc_batch(&pool, 5 * CACHE_CHUNK, &mut all),
            4 * CACHE_CHUNK
        );
        assert!(c.alloc(&pool).is_none());
        c.free_all(&pool, &mut all);
        c.flush(&pool);
        assert_eq!(pool.available(), 4 * CACHE_CHUNK);
    }

    #[test]
    fn packets_travel_through_a_ring() {
        let pool = Pool::new("r", 8, 64).unwrap();
        let (mut p, mut c) = crate::ring::channel::<Packet>("pkts", 8).unwrap();
        let mut pk = pool.alloc().unwrap();
        pool.write(&mut pk, &[9, 8, 7]);
        p.push(pk).unwrap();
        let got = c.pop().unwrap();
        assert_eq!(pool.data(&got), &[9, 8, 7]);
        pool.free(got);
    }
}
