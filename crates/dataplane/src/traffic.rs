//! The built-in traffic generator and the latency sink: the generator writes UDP test frames
//! (flows, sizes, fixed rate or max speed) carrying a sequence number and a CLOCK_MONOTONIC
//! timestamp; the sink reads them back into an HDR histogram and counts loss and reordering.
//! Must not depend on what sits between them.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use hdrhistogram::Histogram;

use crate::error::{Error, Result};
use crate::hist::{Percentiles, new_histogram, record};
use crate::node::{BATCH, Node, NodeIo};
use crate::packet::{MIN_FRAME, now_ns, read_test_frame, test_frame_stream, write_stream_frame};
use crate::pool::Packet;

/// What the generator sends.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GenConfig {
    /// Number of flows (UDP source ports 1024..), packets rotate over them.
    pub flows: u32,
    /// Frame sizes in bytes, used in turn (each in MIN_FRAME..=buffer size).
    pub sizes: Vec<usize>,
    /// Packets per second; `None` sends as fast as the link accepts.
    pub rate_pps: Option<u64>,
    /// Stop after this many packets; `None` runs until stopped.
    pub count: Option<u64>,
    /// Packets per batch.
    pub batch: usize,
}

impl Default for GenConfig {
    fn default() -> Self {
        GenConfig {
            flows: 1,
            sizes: vec![64],
            rate_pps: None,
            count: None,
            batch: BATCH,
        }
    }
}

impl GenConfig {
    /// Check the configuration against a buffer size.
    pub fn validate(&self, buf_size: usize) -> Result<()> {
        if self.flows == 0 {
            return Err(Error::config("gen.flows", "must be at least 1"));
        }
        if self.sizes.is_empty() {
            return Err(Error::config("gen.sizes", "needs at least one frame size"));
        }
        if let Some(s) = self
            .sizes
            .iter()
            .find(|s| !(MIN_FRAME..=buf_size).contains(*s))
        {
            return Err(Error::config(
                "gen.sizes",
                format!("{s} is outside {MIN_FRAME}..={buf_size} bytes"),
            ));
        }
        if self.rate_pps == Some(0) {
            return Err(Error::config(
                "gen.rate_pps",
                "must be > 0 (or unset for max speed)",
            ));
        }
        if self.batch == 0 || self.batch > 4096 {
            return Err(Error::config("gen.batch", "must be in 1..=4096"));
        }
        Ok(())
    }
}

/// Progress of a generator, readable while it runs.
#[derive(Debug, Default)]
pub struct GenStats {
    /// Packets handed to the link.
    pub sent: AtomicU64,
    /// Packets the link refused (ring full) in rate mode.
    pub dropped: AtomicU64,
    /// Set once `count` packets were sent.
    pub done: AtomicBool,
    /// From the first packet written to the last, nanoseconds (set with `done`): the rate the
    /// generator really offered is `count` over it.
    pub elapsed_ns: AtomicU64,
}

/// The generator node (one port, 0 = out).
pub struct Generator {
    cfg: GenConfig,
    seq: u64,
    start_ns: Option<u64>,
    stats: Arc<GenStats>,
    batch: Vec<Packet>,
    stream: u16,
    /// Send whole batches whether or not the link has room (a load generator that can
    /// overload what it feeds).
    overfill: bool,
}

impl Generator {
    /// A generator; fails on an invalid configuration for buffers of `buf_size` bytes.
    pub fn new(cfg: GenConfig, buf_size: usize) -> Result<Self> {
        cfg.validate(buf_size)?;
        Ok(Generator {
            batch: Vec::with_capacity(cfg.batch),
            cfg,
            seq: 0,
            start_ns: None,
            stats: Arc::new(GenStats::default()),
            stream: 0,
            overfill: false,
        })
    }

    /// Offer every packet when it is due, whether or not the link has room: what does not fit
    /// is dropped and counted on the link (and in [`GenStats::dropped`]), as a traffic
    /// generator on a wire would overload a device. Without it the generator waits for room,
    /// so a slow stage delays packets instead of losing them.
    pub fn overfilling(mut self) -> Self {
        self.overfill = true;
        self
    }

    /// Mark every frame as belonging to `stream` (0 unless set), so a sink filtering on it
    /// ignores the traffic of other generators.
    pub fn with_stream(mut self, stream: u16) -> Self {
        self.stream = stream;
        self
    }

    /// Shared progress counters.
    pub fn stats(&self) -> Arc<GenStats> {
        Arc::clone(&self.stats)
    }
}

impl Node for Generator {
    fn poll(&mut self, io: &mut NodeIo<'_>) -> usize {
        if !io.is_linked(0) {
            return 0;
        }
        let mut want = self.cfg.batch as u64;
        if let Some(count) = self.cfg.count {
            if self.seq >= count {
                self.stats.done.store(true, Ordering::Release);
                return 0;
            }
            want = want.min(count - self.seq);
        }
        // Unless overfilling, never overfill the link: a full link delays packets (their
        // timestamps are taken when they are written), it does not drop them.
        if !self.overfill {
            want = want.min(io.tx_space(0) as u64);
        }
        if want == 0 {
            return 0;
        }
        let now = now_ns();
        let first = *self.start_ns.get_or_insert(now);
        if let Some(rate) = self.cfg.rate_pps {
            let start = first;
            let due = u128::from(now - start) * u128::from(rate) / 1_000_000_000;
            let due = u64::try_from(due).unwrap_or(u64::MAX);
            want = want.min(due.saturating_sub(self.seq));
            if want == 0 {
                return 0;
            }
        }
        let pool = io.pool();
        let n = io.alloc_batch(want as usize, &mut self.batch);
        let ts = now;
        let stream = self.stream;
        for p in self.batch.iter_mut() {
            let s = self.seq;
            let size = self.cfg.sizes[(s % self.cfg.sizes.len() as u64) as usize];
            let flow = (s % u64::from(self.cfg.flows)) as u32;
            pool.fill(p, |buf| write_stream_frame(buf, size, flow, s, ts, stream));
            self.seq += 1;
        }
        let sent = io.send(0, &mut self.batch);
        self.stats.sent.fetch_add(sent as u64, Ordering::Relaxed);
        self.stats
            .dropped
            .fetch_add((n - sent) as u64, Ordering::Relaxed);
        if self.cfg.count.is_some_and(|c| self.seq >= c) {
            // Up to the end of the last batch's writing.
            self.stats
                .elapsed_ns
                .store(now_ns().saturating_sub(first).max(1), Ordering::Relaxed);
            self.stats.done.store(true, Ordering::Release);
        }
        n
    }
}

/// What the sink has seen.
#[derive(Debug, Clone)]
pub struct SinkState {
    /// One-way latency of test frames, nanoseconds.
    pub latency: Histogram<u64>,
    /// Test frames received.
    pub received: u64,
    /// Bytes of all frames received.
    pub bytes: u64,
    /// Frames that were not test frames of the stream the sink listens to.
    pub foreign: u64,
    /// Test frames whose sequence number was below one already seen.
    pub reordered: u64,
    /// Highest sequence number seen plus one (0 when none).
    pub next_seq: u64,
}

impl SinkState {
    fn new() -> Self {
        SinkState {
            latency: new_histogram(),
            received: 0,
            bytes: 0,
            foreign: 0,
            reordered: 0,
            next_seq: 0,
        }
    }

    /// Account one test frame with sequence number `seq` and latency `latency_ns`.
    pub fn observe(&mut self, seq: u64, latency_ns: u64) {
        self.received += 1;
        record(&mut self.latency, latency_ns);
        if seq < self.next_seq {
            self.reordered += 1;
        } else {
            self.next_seq = seq + 1;
        }
    }

    /// Test frames missing: sequence numbers up to the highest seen that never arrived.
    pub fn lost(&self) -> u64 {
        self.next_seq.saturating_sub(self.received)
    }

    /// Serializable summary.
    pub fn summary(&self) -> SinkSummary {
        SinkSummary {
            received: self.received,
            bytes: self.bytes,
            lost: self.lost(),
            reordered: self.reordered,
            foreign: self.foreign,
            latency: Percentiles::of(&self.latency),
        }
    }
}

/// Serializable view of a [`SinkState`].
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SinkSummary {
    /// Test frames received.
    pub received: u64,
    /// Bytes received.
    pub bytes: u64,
    /// Test frames lost.
    pub lost: u64,
    /// Test frames reordered.
    pub reordered: u64,
    /// Non-test frames.
    pub foreign: u64,
    /// Latency percentiles.
    pub latency: Percentiles,
}

/// The latency sink node: receives on every port, frees every packet.
pub struct LatencySink {
    state: Arc<Mutex<SinkState>>,
    batch: usize,
    buf: Vec<Packet>,
    stream: Option<u16>,
}

impl LatencySink {
    /// A sink polling `batch` packets per port per round.
    pub fn new(batch: usize) -> Self {
        LatencySink {
            state: Arc::new(Mutex::new(SinkState::new())),
            batch: batch.max(1),
            buf: Vec::with_capacity(batch),
            stream: None,
        }
    }

    /// Count only test frames of generator stream `stream`; the rest are foreign.
    pub fn only_stream(mut self, stream: u16) -> Self {
        self.stream = Some(stream);
        self
    }

    /// The shared state (lock briefly to read it while the sink runs).
    pub fn state(&self) -> Arc<Mutex<SinkState>> {
        Arc::clone(&self.state)
    }
}

impl Node for LatencySink {
    fn poll(&mut self, io: &mut NodeIo<'_>) -> usize {
        let pool = io.pool();
        let mut total = 0;
        for port in 0..io.port_count() {
            self.buf.clear();
            if io.recv(port, &mut self.buf, self.batch) == 0 {
                continue;
            }
            total += self.buf.len();
            let now = now_ns();
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            for p in self.buf.drain(..) {
                let data = pool.data(&p);
                st.bytes += data.len() as u64;
                let ours = self
                    .stream
                    .is_none_or(|s| test_frame_stream(data) == Some(s));
                match read_test_frame(data) {
                    Some((seq, ts)) if ours => st.observe(seq, now.saturating_sub(ts)),
                    _ => st.foreign += 1,
                }
                io.free(p);
            }
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gen_config_errors_name_field() {
        let ok = GenConfig::default();
        ok.validate(2048).unwrap();
        let cases = [
            (
                GenConfig {
                    flows: 0,
                    ..ok.clone()
                },
                "gen.flows",
            ),
            (
                GenConfig {
                    sizes: vec![],
                    ..ok.clone()
                },
                "gen.sizes",
            ),
            (
                GenConfig {
                    sizes: vec![20],
                    ..ok.clone()
                },
                "gen.sizes",
            ),
            (
                GenConfig {
                    sizes: vec![4096],
                    ..ok.clone()
                },
                "gen.sizes",
            ),
            (
                GenConfig {
                    rate_pps: Some(0),
                    ..ok.clone()
                },
                "gen.rate_pps",
            ),
            (
                GenConfig {
                    batch: 0,
                    ..ok.clone()
                },
                "gen.batch",
            ),
        ];
        for (c, field) in cases {
            let e = Generator::new(c, 2048).err().unwrap().to_string();
            assert!(e.contains(field), "{e}");
        }
    }

    #[test]
    fn loss_and_reorder_accounting() {
        let mut s = SinkState::new();
        for seq in [0u64, 1, 3, 2, 5] {
            s.observe(seq, 1000 * (seq + 1));
        }
        assert_eq!((s.lost(), s.reordered), (1, 1), "seq 4 lost, seq 2 late");
        let sum = s.summary();
        assert_eq!((sum.received, sum.latency.count), (5, 5));
        assert!((sum.latency.max_us - 6.0).abs() < 0.01, "{sum:?}");
    }
}
