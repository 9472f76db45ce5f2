//! The benchmarks behind `telvirt bench ring` and `telvirt bench chain`, and the flood between
//! two host interfaces that `telvirt bench ports` offers to what joins them. Every figure is
//! measured next to a named baseline in the same run. Must not print: results are returned
//! (serde-serializable) and progress goes through the callback.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;

use crate::afpacket::{HostPort, RxMode};
use crate::error::{Error, Result};
use crate::firewall::{Action, Firewall, Rule};
use crate::graph::{LinkSpec, PortRef};
use crate::hist::Percentiles;
use crate::node::ProcessorNode;
use crate::panel::PatchPanel;
use crate::pool::Pool;
use crate::ring;
use crate::traffic::{GenConfig, GenStats, Generator, LatencySink, SinkState};
use crate::worker::{WorkerConfig, allowed_cores, pin_current_thread};

/// Options of `bench ring`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RingOpts {
    /// Packets moved per contender per round.
    pub packets: u64,
    /// Packets per enqueue/dequeue batch.
    pub batch: usize,
    /// Ring capacity (slots, power of two).
    pub capacity: usize,
    /// Rounds; each contender's best round counts.
    pub rounds: u32,
    /// Producer and consumer cores; `None` picks the first two allowed cores.
    pub cores: Option<(usize, usize)>,
}

impl Default for RingOpts {
    fn default() -> Self {
        RingOpts {
            packets: 50_000_000,
            batch: 32,
            capacity: 1024,
            rounds: 3,
            cores: None,
        }
    }
}

/// One contender's best round.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RingResult {
    /// `telvirt`, `crossbeam::ArrayQueue`, `rtrb` or `rtrb into a Vec`.
    pub name: String,
    /// Million packets per second.
    pub mpps: f64,
    /// Nanoseconds per packet.
    pub ns_per_packet: f64,
}

/// Result of `bench ring`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RingReport {
    /// telvirt's ring, Mpps.
    pub mpps: f64,
    /// The best peer, Mpps.
    pub baseline: f64,
    /// Which peer that was.
    pub baseline_name: String,
    /// `mpps / baseline`.
    pub ratio: f64,
    /// rtrb handing each batch over as telvirt's worker takes one (its chunk copied into a
    /// reused `Vec` before it is read, as `pop_into` fills the caller's), Mpps: the same work
    /// on both sides, where `baseline` lets rtrb read its slots in place.
    pub same_handoff_baseline: f64,
    /// `mpps / same_handoff_baseline`.
    pub same_handoff_ratio: f64,
    /// Every contender.
    pub results: Vec<RingResult>,
    /// Producer and consumer core.
    pub cores: (usize, usize),
    /// Packets per round.
    pub packets: u64,
    /// Batch size.
    pub batch: usize,
    /// Packet size the descriptors point at.
    pub packet_size: usize,
}

/// 64-byte packets the descriptors point at; the consumer reads each one it receives.
const FRAMES: usize = 1024;
const PACKET_SIZE: usize = 64;

fn frames() -> Arc<Vec<[u8; PACKET_SIZE]>> {
    Arc::new(
        (0..FRAMES)
            .map(|i| {
                let mut f = [0u8; PACKET_SIZE];
                f[..8].copy_from_slice(&(i as u64).to_le_bytes());
                f
            })
            .collect(),
    )
}

/// Which queue a round uses.
#[derive(Debug, Clone, Copy)]
enum Contender {
    Telvirt,
    ArrayQueue,
    Rtrb,
    /// rtrb whose consumer copies each chunk into a reused `Vec` before reading it.
    RtrbIntoVec,
}

impl Contender {
    fn name(self) -> &'static str {
        match self {
            Contender::Telvirt => "telvirt",
            Contender::ArrayQueue => "crossbeam::ArrayQueue",
            Contender::Rtrb => "rtrb",
            Contender::RtrbIntoVec => "rtrb into a Vec",
        }
    }
}

fn two_cores(opts_cores: Option<(usize, usize)>) -> Result<(usize, usize)> {
    let allowed = allowed_cores()?;
    let (a, b) = match opts_cores {
        Some(c) => c,
        None => (allowed[0], *allowed.get(1).unwrap_or(&allowed[0])),
    };
    for c in [a, b] {
        if !allowed.contains(&c) {
            return Err(Error::config(
                "cores",
                format!("core {c} is not allowed (allowed: {allowed:?})"),
            ));
        }
    }
    Ok((a, b))
}

/// Busy-wait politely: spin, and yield now and then (needed when both ends share one core).
fn backoff(spins: &mut u32) {
    *spins += 1;
    if (*spins).is_multiple_of(64) {
        std::thread::yield_now();
    } else {
        std::hint::spin_loop();
    }
}

/// rtrb's reader at its best taking `n` descriptors in chunks of up to `batch` (a partial
/// chunk when fewer are ready) and reading each one's frame; with `INTO_VEC`, each chunk's two
/// runs copied into a reused `Vec` first, as telvirt's `pop_into` hands a batch over. Returns
/// the frames' checksum.
fn rtrb_consume<const INTO_VEC: bool>(
    mut q: rtrb::Consumer<u64>,
    n: u64,
    batch: usize,
    frames: &[[u8; PACKET_SIZE]],
) -> u64 {
    let mut got = 0u64;
    let mut sum = 0u64;
    let mut spins = 0;
    let mut buf = Vec::with_capacity(if INTO_VEC { batch } else { 0 });
    while got < n {
        let chunk = match q.read_chunk(batch) {
            Ok(chunk) => chunk,
            Err(rtrb::chunks::ChunkError::TooFewSlots(0)) => {
                backoff(&mut spins);
                continue;
            }
            Err(rtrb::chunks::ChunkError::TooFewSlots(k)) => match q.read_chunk(k) {
                Ok(chunk) => chunk,
                Err(_) => continue,
            },
        };
        let k = chunk.len();
        if INTO_VEC {
            // Its two runs (before and after the ring's end) copied as slices, as telvirt's
            // `pop_into` copies an exact-length run.
            let (head, tail) = chunk.as_slices();
            buf.clear();
            buf.extend_from_slice(head);
            buf.extend_from_slice(tail);
            chunk.commit_all();
            for d in &buf {
                sum = sum.wrapping_add(u64::from(frames[*d as usize][0]));
            }
        } else {
            for d in chunk {
                sum = sum.wrapping_add(u64::from(frames[d as usize][0]));
            }
        }
        got += k as u64;
    }
    sum
}

/// Move `n` descriptors from a pinned producer to a pinned consumer; returns elapsed time.
fn run_round(c: Contender, opts: &RingOpts, cores: (usize, usize)) -> Result<Duration> {
    let n = opts.packets;
    let batch = opts.batch;
    let frames = frames();
    let start = Arc::new(Barrier::new(2));
    // Each contender gets a producer closure and a consumer closure.
    type Side = Box<dyn FnOnce() -> u64 + Send>;
    let (prod, cons): (Side, Side) = match c {
        Contender::Telvirt => {
            let (mut p, mut q) = ring::channel::<u64>("bench", opts.capacity)?;
            (
                Box::new(move || {
                    let mut buf = Vec::with_capacity(batch);
                    let mut i = 0u64;
                    let mut spins = 0;
                    while i < n {
                        if buf.is_empty() {
                            let m = (n - i).min(batch as u64);
                            buf.extend((i..i + m).map(|k| k % FRAMES as u64));
                            i += m;
                        }
                        while !buf.is_empty() {
                            if p.push_from(&mut buf) == 0 {
                                backoff(&mut spins);
                            }
                        }
                    }
                    0
                }),
                Box::new(move || {
                    let mut buf = Vec::with_capacity(batch);
                    let mut got = 0u64;
                    let mut sum = 0u64;
                    let mut spins = 0;
                    while got < n {
                        buf.clear();
                        let k = q.pop_into(&mut buf, batch);
                        if k == 0 {
                            backoff(&mut spins);
                            continue;
                        }
                        for d in &buf {
                            sum = sum.wrapping_add(u64::from(frames[*d as usize][0]));
                        }
                        got += k as u64;
                    }
                    sum
                }),
            )
        }
        Contender::ArrayQueue => {
            let q = Arc::new(ArrayQueue::<u64>::new(opts.capacity));
            let q2 = Arc::clone(&q);
            (
                Box::new(move || {
                    let mut i = 0u64;
                    let mut spins = 0;
                    while i < n {
                        let m = (n - i).min(batch as u64);
                        for k in i..i + m {
                            while q.push(k % FRAMES as u64).is_err() {
                                backoff(&mut spins);
                            }
                        }
                        i += m;
                    }
                    0
                }),
                Box::new(move || {
                    let mut got = 0u64;
                    let mut sum = 0u64;
                    let mut spins = 0;
                    while got < n {
                        let mut k = 0;
                        while k < batch {
                            match q2.pop() {
                                Some(d) => {
                                    sum = sum.wrapping_add(u64::from(frames[d as usize][0]));
                                    k += 1;
                                }
                                None => break,
                            }
                        }
                        if k == 0 {
                            backoff(&mut spins);
                        }
                        got += k as u64;
                    }
                    sum
                }),
            )
        }
        Contender::Rtrb | Contender::RtrbIntoVec => {
            let into_vec = matches!(c, Contender::RtrbIntoVec);
            let (mut p, q) = rtrb::RingBuffer::<u64>::new(opts.capacity);
            (
                // rtrb at its best: chunks that check the cached index first and read the
                // other side's only when it does not suffice, and a partial chunk taken when
                // fewer slots are free (as telvirt's `push_from` does).
                Box::new(move || {
                    let mut i = 0u64;
                    let mut spins = 0;
                    while i < n {
                        let want = (n - i).min(batch as u64) as usize;
                        let m = match p.write_chunk_uninit(want) {
                            Ok(chunk) => chunk.fill_from_iter((i..).map(|k| k % FRAMES as u64)),
                            Err(rtrb::chunks::ChunkError::TooFewSlots(0)) => 0,
                            Err(rtrb::chunks::ChunkError::TooFewSlots(free)) => p
                                .write_chunk_uninit(free)
                                .map_or(0, |c| c.fill_from_iter((i..).map(|k| k % FRAMES as u64))),
                        };
                        if m == 0 {
                            backoff(&mut spins);
                        }
                        i += m as u64;
                    }
                    0
                }),
                // Each consumer compiled on its own: rtrb reading in place carries no trace of
                // the copying variant.
                Box::new(move || {
                    if into_vec {
                        rtrb_consume::<true>(q, n, batch, &frames)
                    } else {
                        rtrb_consume::<false>(q, n, batch, &frames)
                    }
                }),
            )
        }
    };
    let s2 = Arc::clone(&start);
    let failed = Arc::new(AtomicBool::new(false));
    let f2 = Arc::clone(&failed);
    let producer = std::thread::Builder::new()
        .name("tv-bench-prod".into())
        .spawn(move || {
            if pin_current_thread(cores.0).is_err() {
                f2.store(true, Ordering::Relaxed);
            }
            s2.wait();
            prod()
        })
        .map_err(|e| Error::io("spawn bench producer", e))?;
    let consumer = std::thread::Builder::new()
        .name("tv-bench-cons".into())
        .spawn(move || -> Result<(Duration, u64)> {
            pin_current_thread(cores.1)?;
            start.wait();
            let t = Instant::now();
            let sum = cons();
            Ok((t.elapsed(), sum))
        })
        .map_err(|e| Error::io("spawn bench consumer", e))?;
    let _ = producer.join();
    let (elapsed, _sum) = consumer
        .join()
        .map_err(|_| Error::config("bench", "consumer thread panicked"))??;
    if failed.load(Ordering::Relaxed) {
        return Err(Error::config(
            "cores",
            format!("cannot pin to core {}", cores.0),
        ));
    }
    Ok(elapsed)
}

/// `telvirt bench ring`: telvirt's ring against crossbeam's `ArrayQueue` and `rtrb`, and
/// against rtrb handing each batch over into a `Vec` as telvirt's worker takes one, same
/// packets, batch and pinned cores, in the same run. `progress(done, total)` counts rounds.
pub fn ring(opts: &RingOpts, progress: &mut dyn FnMut(u64, u64)) -> Result<RingReport> {
    if opts.packets == 0 || opts.rounds == 0 {
        return Err(Error::config(
            "bench.packets",
            "packets and rounds must be > 0",
        ));
    }
    if opts.batch == 0 || opts.batch > opts.capacity {
        return Err(Error::config(
            "bench.batch",
            format!("{} must be in 1..=capacity ({})", opts.batch, opts.capacity),
        ));
    }
    let cores = two_cores(opts.cores)?;
    let contenders = [
        Contender::Telvirt,
        Contender::ArrayQueue,
        Contender::Rtrb,
        Contender::RtrbIntoVec,
    ];
    let mut best = [Duration::MAX; 4];
    let total = u64::from(opts.rounds) * contenders.len() as u64;
    let mut done = 0;
    progress(0, total);
    for _ in 0..opts.rounds {
        for (i, c) in contenders.iter().enumerate() {
            let d = run_round(*c, opts, cores)?;
            best[i] = best[i].min(d);
            done += 1;
            progress(done, total);
        }
    }
    let results: Vec<RingResult> = contenders
        .iter()
        .zip(best)
        .map(|(c, d)| {
            let s = d.as_secs_f64().max(1e-9);
            RingResult {
                name: c.name().to_string(),
                mpps: opts.packets as f64 / s / 1e6,
                ns_per_packet: s * 1e9 / opts.packets as f64,
            }
        })
        .collect();
    let of = |c: Contender| {
        results
            .iter()
            .find(|r| r.name == c.name())
            .expect("invariant: every contender ran")
    };
    let mpps = of(Contender::Telvirt).mpps;
    // The best peer at its own best (not the same-handoff variant, which does more work).
    let peer = [of(Contender::ArrayQueue), of(Contender::Rtrb)]
        .into_iter()
        .max_by(|a, b| a.mpps.total_cmp(&b.mpps))
        .expect("invariant: two peers");
    let same_handoff = of(Contender::RtrbIntoVec).mpps;
    Ok(RingReport {
        mpps,
        baseline: peer.mpps,
        baseline_name: peer.name.clone(),
        ratio: mpps / peer.mpps,
        same_handoff_baseline: same_handoff,
        same_handoff_ratio: mpps / same_handoff,
        results,
        cores,
        packets: opts.packets,
        batch: opts.batch,
        packet_size: PACKET_SIZE,
    })
}

/// Options of `bench chain`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChainOpts {
    /// Packets in the max-speed throughput run.
    pub packets: u64,
    /// Frame size.
    pub size: usize,
    /// Firewall rules that do not match, checked before the final allow (rule-walk cost).
    pub rules: usize,
    /// Rate of the latency runs (pinned and unpinned), packets per second.
    pub latency_rate_pps: u64,
    /// Packets in each latency run.
    pub latency_packets: u64,
    /// Ring capacity per link.
    pub ring_capacity: usize,
    /// Batch size.
    pub batch: usize,
    /// Halvings of the no-drop / partial-drop rate searches (0: no search).
    pub search_steps: u32,
    /// How long each trial of a search offers its rate, milliseconds.
    pub trial_ms: u64,
}

impl Default for ChainOpts {
    fn default() -> Self {
        ChainOpts {
            packets: 5_000_000,
            size: 64,
            rules: 10,
            latency_rate_pps: 100_000,
            latency_packets: 300_000,
            ring_capacity: 1024,
            batch: 32,
            search_steps: 8,
            trial_ms: 200,
        }
    }
}

/// Loss a partial-drop rate (PDR) may have: 0.1%, as FD.io CSIT reports it.
pub const PDR_LOSS: f64 = 0.001;

/// One trial of a rate search: a generator that overloads what it feeds offers `rate_pps` for
/// the trial's length; what did not reach the sink was lost (dropped at a full ring).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Trial {
    pub rate_pps: u64,
    /// What the generator really offered: below 95% of `rate_pps` the trial measured the
    /// generator, not the path, and fails.
    pub offered_pps: u64,
    pub sent: u64,
    pub received: u64,
    /// `(sent - received) / sent`.
    pub loss: f64,
}

/// Share of a trial's rate the generator must really offer for the trial to count.
pub const MIN_OFFERED_SHARE: f64 = 0.95;

/// The highest offered rates a path carries without loss (NDR) and with at most
/// [`PDR_LOSS`] (PDR), each found by halving an interval: NDR between 0 and twice the path's
/// max-speed rate, PDR between the NDR and that bound (a rate without loss has at most 0.1%).
/// A trial passes only when the generator really offered its rate ([`MIN_OFFERED_SHARE`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RateSearch {
    /// No-drop rate, packets per second (0: no trial passed).
    pub ndr_pps: u64,
    /// Partial-drop rate (loss ≤ 0.1%), packets per second.
    pub pdr_pps: u64,
    /// Every trial, in the order run.
    pub trials: Vec<Trial>,
}

/// Searches a path's NDR and PDR with `steps` halvings each: NDR between 0 and `hi` packets per
/// second, PDR between the NDR and `hi`. `trial(rate)` offers `rate` to the path once.
pub fn search_rates(
    steps: u32,
    hi: u64,
    trial: &mut dyn FnMut(u64) -> Result<Trial>,
) -> Result<RateSearch> {
    let passes = |t: &Trial, max_loss: f64| {
        t.loss <= max_loss && t.offered_pps as f64 >= t.rate_pps as f64 * MIN_OFFERED_SHARE
    };
    let mut trials = Vec::new();
    let mut bounds = |from: u64, to: u64, max_loss: f64, trials: &mut Vec<Trial>| -> Result<u64> {
        let (mut pass, mut fail) = (from, to);
        for _ in 0..steps {
            let mid = pass + (fail - pass) / 2;
            if mid == pass {
                break;
            }
            let t = trial(mid)?;
            if passes(&t, max_loss) {
                pass = mid;
            } else {
                fail = mid;
            }
            trials.push(t);
        }
        Ok(pass)
    };
    let ndr_pps = bounds(0, hi, 0.0, &mut trials)?;
    // A rate the NDR search saw lose more than PDR_LOSS (or not offered) already bounds the PDR
    // from above: the PDR search does not measure above it again (on a noisy host a later trial
    // there could pass and put the PDR above a rate that failed it).
    let pdr_hi = trials
        .iter()
        .filter(|t| t.rate_pps > ndr_pps && !passes(t, PDR_LOSS))
        .map(|t| t.rate_pps)
        .min()
        .unwrap_or(hi);
    let pdr_pps = bounds(ndr_pps, pdr_hi, PDR_LOSS, &mut trials)?;
    Ok(RateSearch {
        ndr_pps,
        pdr_pps,
        trials,
    })
}

/// The rate searches of `bench chain`: through the firewall, and the same generator straight
/// into the sink (the baseline), same packets, same run.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ChainSearch {
    pub chain: RateSearch,
    pub direct: RateSearch,
    /// `chain.ndr_pps / direct.ndr_pps`.
    pub ndr_ratio: f64,
    /// `chain.pdr_pps / direct.pdr_pps`.
    pub pdr_ratio: f64,
}

/// One run of the chain.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ChainRun {
    /// Workers pinned to cores?
    pub pinned: bool,
    /// Offered rate (`None` = max speed).
    pub rate_pps: Option<u64>,
    /// Packets received per second, millions.
    pub mpps: f64,
    /// The rate the generator really offered (its packets over the time it took to write
    /// them), millions per second.
    #[serde(default)]
    pub offered_mpps: f64,
    /// Packets lost.
    pub lost: u64,
    /// One-way latency gen → sink.
    pub latency: Percentiles,
}

/// Result of `bench chain`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ChainReport {
    /// Max-speed throughput, Mpps.
    pub mpps: f64,
    /// Median latency at `latency_rate_pps`, pinned, microseconds.
    pub p50_us: f64,
    /// 99th percentile, same run.
    pub p99_us: f64,
    /// 99.9th percentile, same run.
    pub p999_us: f64,
    /// Max-speed throughput of the same generator straight into the sink (no firewall stage),
    /// in the same run: the baseline, Mpps.
    pub baseline_mpps: f64,
    /// `mpps / baseline_mpps`: how much of the bare link's rate the chain with the firewall
    /// stage keeps.
    pub ratio: f64,
    /// The max-speed run.
    pub throughput: ChainRun,
    /// The max-speed run without the firewall (generator → sink).
    pub direct: ChainRun,
    /// Fixed-rate run with pinned workers.
    pub pinned: ChainRun,
    /// Fixed-rate run with unpinned workers (the jitter baseline).
    pub unpinned: ChainRun,
    /// NDR and PDR of the chain and of the direct link (absent with `search_steps` 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub search: Option<ChainSearch>,
}

/// How one chain run offers its packets.
#[derive(Clone, Copy)]
struct Offer {
    count: u64,
    rate: Option<u64>,
    pinned: bool,
    with_firewall: bool,
    /// The generator overloads the chain (a rate search's trial) instead of waiting for room.
    overfill: bool,
}

/// Polls the sink every millisecond, reporting progress, until `count` frames arrived, or the
/// generator is done and nothing arrived for `settle`, or `budget` passed since the start;
/// answers when the last frame arrived.
fn wait_for_sink(
    sink: &Mutex<SinkState>,
    generator: &GenStats,
    count: u64,
    (start, budget): (Instant, Duration),
    settle: Duration,
    progress: &mut dyn FnMut(u64, u64),
) -> Instant {
    let (mut last_rx, mut last_change) = (0, Instant::now());
    loop {
        let rx = sink.lock().map(|s| s.received).unwrap_or(0);
        if rx != last_rx {
            last_rx = rx;
            last_change = Instant::now();
            progress(rx, count);
        }
        let settled = generator.done.load(Ordering::Acquire) && last_change.elapsed() > settle;
        if rx >= count || settled || start.elapsed() > budget {
            return last_change;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn chain_run(
    opts: &ChainOpts,
    offer: Offer,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ChainRun> {
    let Offer {
        count,
        rate,
        pinned,
        with_firewall,
        overfill,
    } = offer;
    let (c0, c1) = two_cores(None)?;
    let pool = Arc::new(Pool::new("bench-chain", 8192, 2048)?);
    let mk = |name: &str, core: usize| WorkerConfig {
        busy_poll: true,
        ..WorkerConfig::new(name, pinned.then_some(core))
    };
    let mut panel = PatchPanel::new(
        Arc::clone(&pool),
        vec![mk("gen-fw", c0), mk("sink", c1)],
        opts.ring_capacity,
    )?;
    let gen_node = Generator::new(
        GenConfig {
            flows: 16,
            sizes: vec![opts.size],
            rate_pps: rate,
            count: Some(count),
            batch: opts.batch,
        },
        pool.buf_size(),
    )?;
    let gen_node = if overfill {
        gen_node.overfilling()
    } else {
        gen_node
    };
    let gstats = gen_node.stats();
    // Deny rules that agree with the generator's frames on every field but the last one
    // compared (UDP 10.0.0.1:1024.. -> 10.0.1.1:9; the rules name destination ports 1000..),
    // so each rule costs its whole comparison before it fails, as a real rule set's would.
    let mut rules: Vec<Rule> = (0..opts.rules)
        .map(|i| Rule {
            action: Action::Deny,
            proto: Some(crate::packet::proto::UDP),
            src: Some((std::net::Ipv4Addr::new(10, 0, 0, 0), 24)),
            dst: Some((std::net::Ipv4Addr::new(10, 0, 1, 0), 24)),
            src_ports: Some((1024, 1024 + 15)),
            dst_ports: Some((1000 + i as u16, 1000 + i as u16)),
        })
        .collect();
    rules.push(Rule::parse("allow proto=udp")?);
    let fw = Firewall::new(rules, Action::Deny);
    let sink = LatencySink::new(opts.batch);
    let st = sink.state();
    panel.add_node("gen", &["out"], 0, Box::new(gen_node))?;
    let links: &[&str] = if with_firewall {
        panel.add_node(
            "fw",
            &["in", "out"],
            0,
            Box::new(ProcessorNode::new(fw, opts.batch)),
        )?;
        &["gen.out -> fw.in", "fw.out -> sink.in"]
    } else {
        &["gen.out -> sink.in"]
    };
    panel.add_node("sink", &["in"], 1, Box::new(sink))?;
    let links = links
        .iter()
        .map(|s| LinkSpec::parse(s))
        .collect::<Result<Vec<_>>>()?;
    let t0 = Instant::now();
    panel.apply(&links)?;
    // Generous deadline: at least 10 s, or 20x the offered duration.
    let budget = Duration::from_secs(10).max(Duration::from_secs_f64(
        rate.map_or(0.0, |r| count as f64 / r as f64 * 20.0),
    ));
    // A trial that overloads the chain loses packets: once the generator is done, what is
    // still on the links arrives within microseconds.
    let settle = Duration::from_millis(if overfill { 50 } else { 500 });
    let last_change = wait_for_sink(&st, &gstats, count, (t0, budget), settle, progress);
    // Time until the last packet arrived (the loop polls every millisecond).
    let elapsed = last_change.duration_since(t0);
    panel.shutdown();
    let s = st
        .lock()
        .map(|s| s.summary())
        .unwrap_or_else(|p| p.into_inner().summary());
    let secs = elapsed.as_secs_f64().max(1e-6);
    let wrote_secs = gstats.elapsed_ns.load(Ordering::Relaxed) as f64 / 1e9;
    Ok(ChainRun {
        pinned,
        rate_pps: rate,
        mpps: s.received as f64 / secs / 1e6,
        offered_mpps: if wrote_secs > 0.0 {
            count as f64 / wrote_secs / 1e6
        } else {
            0.0
        },
        lost: count.saturating_sub(s.received),
        latency: s.latency,
    })
}

/// `telvirt bench chain`: gen → 5-tuple firewall → sink. A max-speed run for throughput next to
/// the same generator straight into the sink (the baseline), then the chain at a fixed rate with
/// pinned and with unpinned workers for latency and jitter (p99.9) side by side. Progress
/// counts packets received across the four runs.
pub fn chain(opts: &ChainOpts, progress: &mut dyn FnMut(u64, u64)) -> Result<ChainReport> {
    if opts.packets == 0 || opts.latency_packets == 0 || opts.latency_rate_pps == 0 {
        return Err(Error::config(
            "bench.chain",
            "packets, latency_packets and latency_rate_pps must be > 0",
        ));
    }
    if opts.search_steps > 0 && opts.trial_ms == 0 {
        return Err(Error::config(
            "bench.chain.trial_ms",
            "must be > 0 to search",
        ));
    }
    let mut total = 2 * opts.packets + 2 * opts.latency_packets;
    let mut base = 0u64;
    let mut run = |offer: Offer, base: &mut u64, total: u64| {
        let b = *base;
        let r = chain_run(opts, offer, &mut |d, _| progress(b + d, total.max(b + d)));
        *base += offer.count;
        r
    };
    let offer = |count, rate, pinned, with_firewall| Offer {
        count,
        rate,
        pinned,
        with_firewall,
        overfill: false,
    };
    let direct = run(offer(opts.packets, None, true, false), &mut base, total)?;
    let throughput = run(offer(opts.packets, None, true, true), &mut base, total)?;
    let rate = Some(opts.latency_rate_pps);
    let pinned = run(
        offer(opts.latency_packets, rate, true, true),
        &mut base,
        total,
    )?;
    let unpinned = run(
        offer(opts.latency_packets, rate, false, true),
        &mut base,
        total,
    )?;
    let search = if opts.search_steps == 0 {
        None
    } else {
        // Each trial's packets join the progress total as it starts.
        let mut search = |with_firewall: bool, max_mpps: f64| -> Result<RateSearch> {
            let hi = (max_mpps * 2e6).max(1.0) as u64;
            let mut trial = |rate: u64| -> Result<Trial> {
                let count = (rate.saturating_mul(opts.trial_ms) / 1000).max(1);
                total += count;
                let offer = Offer {
                    overfill: true,
                    ..offer(count, Some(rate), true, with_firewall)
                };
                let r = run(offer, &mut base, total)?;
                let received = count.saturating_sub(r.lost);
                Ok(Trial {
                    rate_pps: rate,
                    offered_pps: (r.offered_mpps * 1e6) as u64,
                    sent: count,
                    received,
                    loss: r.lost as f64 / count as f64,
                })
            };
            search_rates(opts.search_steps, hi, &mut trial)
        };
        let chain = search(true, throughput.mpps)?;
        let direct_search = search(false, direct.mpps)?;
        let ratio = |a: u64, b: u64| if b > 0 { a as f64 / b as f64 } else { 0.0 };
        Some(ChainSearch {
            ndr_ratio: ratio(chain.ndr_pps, direct_search.ndr_pps),
            pdr_ratio: ratio(chain.pdr_pps, direct_search.pdr_pps),
            chain,
            direct: direct_search,
        })
    };
    Ok(ChainReport {
        mpps: throughput.mpps,
        baseline_mpps: direct.mpps,
        ratio: if direct.mpps > 0.0 {
            throughput.mpps / direct.mpps
        } else {
            0.0
        },
        direct,
        p50_us: pinned.latency.p50_us,
        p99_us: pinned.latency.p99_us,
        p999_us: pinned.latency.p999_us,
        throughput,
        pinned,
        unpinned,
        search,
    })
}

/// One end of a flood: a host interface, in the named network namespace when `netns` is set
/// (e.g. `/run/netns/blue`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostEnd {
    pub netns: Option<std::path::PathBuf>,
    pub ifname: String,
}

/// One flood between two host interfaces.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FloodRun {
    /// Offered rate (`None` = as fast as the sending port takes them).
    pub rate_pps: Option<u64>,
    pub sent: u64,
    pub received: u64,
    /// Frames received per second from the first sent to the last received, millions.
    pub mpps: f64,
    /// The rate the generator really offered, millions per second.
    pub offered_mpps: f64,
    /// One-way latency from `tx` to `rx`.
    pub latency: Percentiles,
}

/// Frames a flood's generator writes: the generator's UDP test frames (16 flows, 10.0.0.1 →
/// 10.0.1.1 port 9, MAC 02:00:00:00:00:01 → 02:00:00:00:00:02), `size` bytes each.
pub const FLOOD_FLOWS: u32 = 16;

/// Sends `count` test frames of `size` bytes out of host interface `tx` at `rate_pps` (as fast
/// as the port takes them when `None`) and counts those that arrive on `rx`: whatever joins the
/// two interfaces (a kernel bridge, a VNF in another process) is what is measured. One worker
/// thread, unpinned and busy-polling, runs both ends; the generator waits for room rather than
/// dropping, so a rate it could not offer shows in `offered_mpps`, and every frame missing at
/// `rx` was lost between the interfaces. Ends 100 ms after the last frame arrived (or 10 s,
/// or twice the offered duration, after the start).
pub fn flood(
    tx: &HostEnd,
    rx: &HostEnd,
    size: usize,
    rate_pps: Option<u64>,
    count: u64,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<FloodRun> {
    let path = |panel: &mut PatchPanel| -> Result<(PortRef, PortRef)> {
        // AF_XDP (copy mode on veth): with it the kernel path forwarded the most of the
        // sockets tried (it forwards in the sender's context), so the baseline runs at its
        // best (ADR 064).
        let tx_port = HostPort::open_with(&tx.ifname, tx.netns.as_deref(), RxMode::Xdp)?;
        let rx_port = HostPort::open_with(&rx.ifname, rx.netns.as_deref(), RxMode::Xdp)?;
        let (tx_node, rx_node) = (PortRef::host("tx"), PortRef::host("rx"));
        panel.add_node(&tx_node.node, &[""], 0, Box::new(tx_port))?;
        panel.add_node(&rx_node.node, &[""], 0, Box::new(rx_port))?;
        Ok((tx_node, rx_node))
    };
    flood_through(path, size, rate_pps, count, progress)
}

/// [`flood`] through a node of the panel: the generator's frames enter `node` on port `tx`,
/// the sink counts those it sends out of port `rx` (e.g. a VM's two vhost-user NICs, with
/// the guest forwarding between them).
pub fn flood_node(
    node: Box<dyn crate::node::Node>,
    tx: &str,
    rx: &str,
    size: usize,
    rate_pps: Option<u64>,
    count: u64,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<FloodRun> {
    let path = |panel: &mut PatchPanel| -> Result<(PortRef, PortRef)> {
        panel.add_node("path", &[tx, rx], 0, node)?;
        Ok((PortRef::new("path", tx), PortRef::new("path", rx)))
    };
    flood_through(path, size, rate_pps, count, progress)
}

/// A flood whose path `path` adds to the panel, answering the port the generator feeds and
/// the port the sink reads.
fn flood_through(
    path: impl FnOnce(&mut PatchPanel) -> Result<(PortRef, PortRef)>,
    size: usize,
    rate_pps: Option<u64>,
    count: u64,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<FloodRun> {
    if count == 0 || rate_pps == Some(0) {
        return Err(Error::config("flood", "count and rate must be > 0"));
    }
    let pool = Arc::new(Pool::new("flood", 8192, 2048)?);
    let mut panel = PatchPanel::new(
        Arc::clone(&pool),
        vec![WorkerConfig {
            busy_poll: true,
            ..WorkerConfig::new("flood", None)
        }],
        4096,
    )?;
    let generator = Generator::new(
        GenConfig {
            flows: FLOOD_FLOWS,
            sizes: vec![size],
            rate_pps,
            count: Some(count),
            batch: crate::node::BATCH,
        },
        pool.buf_size(),
    )?;
    let gstats = generator.stats();
    let sink = LatencySink::new(crate::node::BATCH);
    let st = sink.state();
    panel.add_node("gen", &["out"], 0, Box::new(generator))?;
    panel.add_node("sink", &["in"], 0, Box::new(sink))?;
    let (tx_node, rx_node) = path(&mut panel)?;
    let t0 = Instant::now();
    panel.apply(&[
        LinkSpec::new(PortRef::new("gen", "out"), tx_node),
        LinkSpec::new(rx_node, PortRef::new("sink", "in")),
    ])?;
    let budget = Duration::from_secs(10).max(Duration::from_secs_f64(
        rate_pps.map_or(0.0, |r| count as f64 / r as f64 * 2.0),
    ));
    let settle = Duration::from_millis(100);
    let last_change = wait_for_sink(&st, &gstats, count, (t0, budget), settle, progress);
    let elapsed = last_change.duration_since(t0).as_secs_f64().max(1e-6);
    panel.shutdown();
    let s = st
        .lock()
        .map(|s| s.summary())
        .unwrap_or_else(|p| p.into_inner().summary());
    let sent = gstats.sent.load(Ordering::Relaxed);
    let wrote_secs = gstats.elapsed_ns.load(Ordering::Relaxed) as f64 / 1e9;
    Ok(FloodRun {
        rate_pps,
        sent,
        received: s.received,
        mpps: s.received as f64 / elapsed / 1e6,
        offered_mpps: if wrote_secs > 0.0 {
            sent as f64 / wrote_secs / 1e6
        } else {
            0.0
        },
        latency: s.latency,
    })
}

/// The NDR and PDR of the path between `tx` and `rx` ([`search_rates`] over [`flood`] trials
/// of `trial_ms` each, `steps` halvings, up to `hi_pps`).
pub fn search_flood(
    tx: &HostEnd,
    rx: &HostEnd,
    size: usize,
    steps: u32,
    trial_ms: u64,
    hi_pps: u64,
) -> Result<RateSearch> {
    search_floods(steps, trial_ms, hi_pps, &mut |rate, count| {
        flood(tx, rx, size, Some(rate), count, &mut |_, _| {})
    })
}

/// [`search_rates`] over floods of `trial_ms` each, up to `hi_pps`: `flood(rate, count)` offers
/// `count` frames at `rate` to the path once (e.g. [`flood_node`]).
pub fn search_floods(
    steps: u32,
    trial_ms: u64,
    hi_pps: u64,
    flood: &mut dyn FnMut(u64, u64) -> Result<FloodRun>,
) -> Result<RateSearch> {
    search_rates(steps, hi_pps, &mut |rate| {
        let count = (rate.saturating_mul(trial_ms) / 1000).max(1);
        let r = flood(rate, count)?;
        Ok(Trial {
            rate_pps: rate,
            offered_pps: (r.offered_mpps * 1e6) as u64,
            sent: count,
            received: r.received,
            loss: count.saturating_sub(r.received) as f64 / count as f64,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A path that carries everything up to 300 kpps, loses 0.05% up to 400 kpps and 5% above;
    /// its generator offers only 90% of anything above 700 kpps.
    fn modelled_trial(rate: u64) -> Result<Trial> {
        let sent = 100_000u64;
        let lost = match rate {
            0..=300_000 => 0,
            300_001..=400_000 => 50,
            _ => 5_000,
        };
        let offered = if rate > 700_000 { rate * 9 / 10 } else { rate };
        Ok(Trial {
            rate_pps: rate,
            offered_pps: offered,
            sent,
            received: sent - lost,
            loss: lost as f64 / sent as f64,
        })
    }

    #[test]
    fn rate_search_finds_the_no_drop_and_partial_drop_rates() {
        let s = search_rates(16, 1_000_000, &mut modelled_trial).unwrap();
        assert!(
            (299_000..=300_000).contains(&s.ndr_pps),
            "NDR {} not just under 300 kpps",
            s.ndr_pps
        );
        assert!(
            (399_000..=400_000).contains(&s.pdr_pps),
            "PDR {} not just under 400 kpps",
            s.pdr_pps
        );
        assert!(s.trials.len() <= 32, "{}", s.trials.len());
        // No trial at or above a rate that failed the PDR's loss: the PDR stays below it.
        let failed = s
            .trials
            .iter()
            .filter(|t| t.loss > PDR_LOSS)
            .map(|t| t.rate_pps)
            .min();
        assert!(failed.is_some_and(|f| s.pdr_pps < f), "{s:?}");
        // A rate the generator could not offer fails even without loss.
        let mut lossless = |rate: u64| {
            let mut t = modelled_trial(rate.min(300_000))?;
            t.rate_pps = rate;
            t.offered_pps = if rate > 700_000 { rate * 9 / 10 } else { rate };
            Ok(t)
        };
        let s = search_rates(16, 1_000_000, &mut lossless).unwrap();
        assert!((699_000..=700_000).contains(&s.ndr_pps), "{}", s.ndr_pps);
        // No steps, no trials: both rates stay 0.
        let s = search_rates(0, 1_000_000, &mut modelled_trial).unwrap();
        assert_eq!((s.ndr_pps, s.pdr_pps, s.trials.len()), (0, 0, 0));
    }

    #[test]
    fn ring_bench_reports_all_contenders_and_json_fields() {
        let opts = RingOpts {
            packets: 20_000,
            rounds: 1,
            ..RingOpts::default()
        };
        let mut calls = Vec::new();
        let r = ring(&opts, &mut |d, t| calls.push((d, t))).unwrap();
        assert_eq!(calls.last(), Some(&(4, 4)));
        assert_eq!(r.results.len(), 4);
        assert!(r.mpps > 0.0 && r.baseline > 0.0);
        assert!((r.ratio - r.mpps / r.baseline).abs() < 1e-9);
        // The best peer is one at its own best, never the variant that copies into a Vec.
        assert_ne!(r.baseline_name, "rtrb into a Vec");
        assert_eq!(r.results[3].name, "rtrb into a Vec");
        assert_eq!(r.same_handoff_baseline, r.results[3].mpps);
        assert!((r.same_handoff_ratio - r.mpps / r.same_handoff_baseline).abs() < 1e-9);
        let v = serde_json::to_value(&r).unwrap();
        for k in [
            "mpps",
            "baseline",
            "ratio",
            "same_handoff_baseline",
            "same_handoff_ratio",
        ] {
            assert!(v.get(k).is_some_and(|x| x.is_f64()), "{k}");
        }
    }

    #[test]
    fn ring_bench_rejects_bad_options() {
        let bad = RingOpts {
            batch: 4096,
            capacity: 1024,
            ..RingOpts::default()
        };
        let e = ring(&bad, &mut |_, _| {}).unwrap_err().to_string();
        assert!(e.contains("bench.batch"), "{e}");
        let bad = RingOpts {
            cores: Some((0, 100_000)),
            ..RingOpts::default()
        };
        let e = ring(&bad, &mut |_, _| {}).unwrap_err().to_string();
        assert!(e.contains("core 100000 is not allowed"), "{e}");
    }

    #[test]
    fn chain_bench_rejects_bad_options() {
        for bad in [
            ChainOpts {
                packets: 0,
                ..ChainOpts::default()
            },
            ChainOpts {
                latency_rate_pps: 0,
                ..ChainOpts::default()
            },
        ] {
            let e = chain(&bad, &mut |_, _| {}).unwrap_err().to_string();
            assert!(e.contains("bench.chain"), "{e}");
        }
        let bad = ChainOpts {
            size: 10,
            ..ChainOpts::default()
        };
        let e = chain(&bad, &mut |_, _| {}).unwrap_err().to_string();
        assert!(e.contains("gen.sizes"), "{e}");
    }

    #[test]
    fn chain_bench_searches_the_no_drop_and_partial_drop_rates_of_both_paths() {
        let opts = ChainOpts {
            packets: 20_000,
            latency_packets: 2_000,
            latency_rate_pps: 50_000,
            search_steps: 3,
            trial_ms: 20,
            ..ChainOpts::default()
        };
        let r = chain(&opts, &mut |_, _| {}).unwrap();
        let s = r.search.expect("a search with search_steps 3");
        for (path, max_mpps) in [(&s.chain, r.mpps), (&s.direct, r.baseline_mpps)] {
            assert!(path.ndr_pps <= path.pdr_pps, "{path:?}");
            assert!(
                path.trials.len() <= 6 && !path.trials.is_empty(),
                "{path:?}"
            );
            let hi = (max_mpps * 2e6) as u64;
            for t in &path.trials {
                assert!(t.rate_pps > 0 && t.rate_pps < hi, "{t:?}");
                assert!(t.offered_pps > 0, "{t:?}");
                assert_eq!(t.sent, (t.rate_pps * 20 / 1000).max(1));
                assert!(
                    t.received <= t.sent && (0.0..=1.0).contains(&t.loss),
                    "{t:?}"
                );
                // A failing trial bounds the search from above.
                if t.loss > PDR_LOSS {
                    assert!(path.pdr_pps < t.rate_pps, "{path:?}");
                }
            }
        }
        let v = serde_json::to_value(&s).unwrap();
        for k in ["ndr_ratio", "pdr_ratio"] {
            assert!(v.get(k).is_some_and(|x| x.is_f64()), "{k}");
        }
        let bad = ChainOpts {
            trial_ms: 0,
            ..opts
        };
        let e = chain(&bad, &mut |_, _| {}).unwrap_err().to_string();
        assert!(e.contains("bench.chain.trial_ms"), "{e}");
    }

    #[test]
    fn chain_bench_runs_small_and_has_json_fields() {
        let opts = ChainOpts {
            packets: 20_000,
            latency_packets: 5_000,
            latency_rate_pps: 50_000,
            search_steps: 0,
            ..ChainOpts::default()
        };
        let r = chain(&opts, &mut |_, _| {}).unwrap();
        assert_eq!((r.throughput.lost, r.direct.lost), (0, 0));
        assert!(r.baseline_mpps > 0.0 && r.ratio > 0.0, "{r:?}");
        assert!(r.pinned.latency.count > 0 && r.unpinned.latency.count > 0);
        assert!(r.p50_us <= r.p99_us && r.p99_us <= r.p999_us);
        assert!(r.search.is_none());
        let v = serde_json::to_value(&r).unwrap();
        for k in [
            "mpps",
            "baseline_mpps",
            "ratio",
            "p50_us",
            "p99_us",
            "p999_us",
        ] {
            assert!(v.get(k).is_some_and(|x| x.is_f64()), "{k}");
        }
    }
}
