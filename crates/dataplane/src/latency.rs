//! The latency tools behind `telvirt latency timer` and `telvirt latency chain`.
//!
//! `timer`: cyclictest-style periodic wake-ups (absolute `clock_nanosleep` on
//! CLOCK_MONOTONIC) on a chosen core, then rt-tests' own `cyclictest` on the same core with the
//! same interval, loop count and priority, in the same run, so the two can be printed side by
//! side. `chain`: injects timestamped packets into a running patch panel and measures them at
//! the chain's exit. Must not print: reports are returned, progress goes through the callback.

use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::error::{Error, Result};
use crate::graph::{LinkSpec, PortRef};
use crate::hist::{Percentiles, new_histogram, record};
use crate::packet::now_ns;
use crate::panel::PatchPanel;
use crate::traffic::{GenConfig, GenStats, Generator, LatencySink, SinkState, SinkSummary};
use crate::worker::{allowed_cores, pin_current_thread};

/// Options of `latency timer`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TimerOpts {
    /// Core to run on (must be in the process's affinity mask).
    pub core: usize,
    /// Wake-up period, microseconds.
    pub interval_us: u64,
    /// Number of wake-ups.
    pub loops: u64,
    /// SCHED_FIFO priority (1-99) for both tools; `None` runs both as SCHED_OTHER.
    pub priority: Option<i32>,
    /// Also run rt-tests' `cyclictest` on the same core.
    pub cyclictest: bool,
}

impl Default for TimerOpts {
    fn default() -> Self {
        TimerOpts {
            core: 0,
            interval_us: 1000,
            loops: 10_000,
            priority: None,
            cyclictest: true,
        }
    }
}

/// What rt-tests' cyclictest measured (1 µs resolution).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CyclictestResult {
    /// Percentiles computed from its histogram (`-h`).
    pub latency: Percentiles,
    /// Its own min/avg/max lines.
    pub min_us: f64,
    /// Average.
    pub avg_us: f64,
    /// Maximum.
    pub max_us: f64,
    /// Samples beyond its histogram range.
    pub overflows: u64,
    /// The command line that was run.
    pub command: String,
}

/// Result of `latency timer`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TimerReport {
    /// The options used.
    pub opts: TimerOpts,
    /// telvirt's measurement.
    pub telvirt: Percentiles,
    /// Text histogram of telvirt's measurement.
    pub histogram: String,
    /// cyclictest's measurement, when it was run.
    pub cyclictest: Option<CyclictestResult>,
    /// telvirt median / cyclictest median (1.0 = equal), when both exist.
    pub median_ratio: Option<f64>,
}

fn validate_timer(opts: &TimerOpts) -> Result<()> {
    let allowed = allowed_cores()?;
    if !allowed.contains(&opts.core) {
        return Err(Error::config(
            "latency.core",
            format!("core {} is not allowed (allowed: {allowed:?})", opts.core),
        ));
    }
    if !(10..=1_000_000).contains(&opts.interval_us) {
        return Err(Error::config(
            "latency.interval_us",
            format!("{} is outside 10..=1000000", opts.interval_us),
        ));
    }
    if opts.loops == 0 {
        return Err(Error::config("latency.loops", "must be > 0"));
    }
    if let Some(p) = opts.priority
        && !(1..=99).contains(&p)
    {
        return Err(Error::config(
            "latency.priority",
            format!("{p} is outside 1..=99"),
        ));
    }
    Ok(())
}

fn set_fifo(priority: i32) -> Result<()> {
    let param = libc::sched_param {
        sched_priority: priority,
    };
    // SAFETY: `param` is a valid sched_param; 0 means the calling thread.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) } != 0 {
        return Err(Error::last_os(format!(
            "sched_setscheduler(SCHED_FIFO, {priority})"
        )));
    }
    Ok(())
}

fn timespec_of(ns: u64) -> libc::timespec {
    libc::timespec {
        tv_sec: (ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (ns % 1_000_000_000) as libc::c_long,
    }
}

/// Periodic wake-ups on the calling thread; returns the wake-up latency histogram (ns).
fn wakeups(
    interval_us: u64,
    loops: u64,
    progress: &mut dyn FnMut(u64, u64),
    total: u64,
) -> Histogram<u64> {
    let mut h = new_histogram();
    let interval = interval_us * 1000;
    let mut next = now_ns() + interval;
    for i in 0..loops {
        let ts = timespec_of(next);
        // SAFETY: `ts` is a valid timespec; remaining-time pointer may be NULL with
        // TIMER_ABSTIME.
        unsafe {
            libc::clock_nanosleep(
                libc::CLOCK_MONOTONIC,
                libc::TIMER_ABSTIME,
                &ts,
                std::ptr::null_mut(),
            )
        };
        let now = now_ns();
        record(&mut h, now.saturating_sub(next));
        next += interval;
        if now > next {
            // Overran a whole period: restart the schedule (as cyclictest does).
            next = now + interval;
        }
        if i % 256 == 0 {
            progress(i, total);
        }
    }
    h
}

/// `telvirt latency timer`. Progress counts wake-ups of both tools (cyclictest's half is
/// reported when it ends).
pub fn timer(opts: &TimerOpts, progress: &mut dyn FnMut(u64, u64)) -> Result<TimerReport> {
    validate_timer(opts)?;
    let total = if opts.cyclictest {
        opts.loops * 2
    } else {
        opts.loops
    };
    let o = opts.clone();
    let (tx, rx) = std::sync::mpsc::channel::<(u64, u64)>();
    let handle = std::thread::Builder::new()
        .name("tv-latency-timer".into())
        .spawn(move || -> Result<Histogram<u64>> {
            pin_current_thread(o.core)?;
            if let Some(p) = o.priority {
                set_fifo(p)?;
            }
            Ok(wakeups(
                o.interval_us,
                o.loops,
                &mut |d, t| {
                    let _ = tx.send((d, t));
                },
                total,
            ))
        })
        .map_err(|e| Error::io("spawn timer thread", e))?;
    for (d, t) in rx {
        progress(d, t);
    }
    let h = handle
        .join()
        .map_err(|_| Error::config("latency", "timer thread panicked"))??;
    progress(opts.loops, total);
    let cyclictest = if opts.cyclictest {
        let r = run_cyclictest(opts)?;
        progress(total, total);
        Some(r)
    } else {
        None
    };
    let telvirt = Percentiles::of(&h);
    let median_ratio = cyclictest
        .as_ref()
        .filter(|c| c.latency.p50_us > 0.0)
        .map(|c| telvirt.p50_us / c.latency.p50_us);
    Ok(TimerReport {
        opts: opts.clone(),
        telvirt,
        histogram: crate::hist::render(&h),
        cyclictest,
        median_ratio,
    })
}

/// Histogram range given to cyclictest (`-h`), microseconds.
const CYCLICTEST_HIST_US: u64 = 10_000;

fn run_cyclictest(opts: &TimerOpts) -> Result<CyclictestResult> {
    let mut args: Vec<String> = vec![
        "-q".into(),
        "-t1".into(),
        format!("-a{}", opts.core),
        format!("-i{}", opts.interval_us),
        format!("-l{}", opts.loops),
        format!("-h{CYCLICTEST_HIST_US}"),
    ];
    if let Some(p) = opts.priority {
        args.push(format!("-p{p}"));
    }
    let command = format!("cyclictest {}", args.join(" "));
    let out = Command::new("cyclictest")
        .args(&args)
        .output()
        .map_err(|e| Error::Tool {
            tool: "cyclictest",
            reason: if e.kind() == std::io::ErrorKind::NotFound {
                "not found in PATH; install the Debian package rt-tests".into()
            } else {
                format!("cannot run `{command}`: {e}")
            },
        })?;
    if !out.status.success() {
        return Err(Error::Tool {
            tool: "cyclictest",
            reason: format!(
                "`{command}` exited with {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    let mut r = parse_cyclictest(&String::from_utf8_lossy(&out.stdout))?;
    r.command = command;
    Ok(r)
}

/// Parse cyclictest's `-q -h N` output: histogram lines `LATENCY_US COUNT` and `# Min
/// Latencies:`-style summary lines.
pub fn parse_cyclictest(text: &str) -> Result<CyclictestResult> {
    let bad = |why: String| Error::Tool {
        tool: "cyclictest",
        reason: format!("unexpected output: {why}"),
    };
    let mut h = new_histogram();
    let (mut min, mut avg, mut max, mut overflows) = (None, None, None, 0u64);
    let first_number =
        |rest: &str| -> Option<f64> { rest.split_whitespace().next().and_then(|v| v.parse().ok()) };
    for line in text.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("# Min Latencies:") {
            min = first_number(rest);
        } else if let Some(rest) = line.strip_prefix("# Avg Latencies:") {
            avg = first_number(rest);
        } else if let Some(rest) = line.strip_prefix("# Max Latencies:") {
            max = first_number(rest);
        } else if let Some(rest) = line.strip_prefix("# Histogram Overflows:") {
            overflows = first_number(rest).map_or(0, |v| v as u64);
        } else if !line.starts_with('#') && !line.is_empty() {
            let mut it = line.split_whitespace();
            let (Some(us), Some(n), None) = (it.next(), it.next(), it.next()) else {
                continue;
            };
            let (Ok(us), Ok(n)) = (us.parse::<u64>(), n.parse::<u64>()) else {
                continue;
            };
            if n > 0 {
                // A bucket `us` holds latencies in [us, us+1) µs; record its middle.
                let _ = h.record_n((us * 1000 + 500).max(1), n);
            }
        }
    }
    let (Some(min), Some(avg), Some(max)) = (min, avg, max) else {
        return Err(bad(
            "no '# Min/Avg/Max Latencies' lines (was -h given?)".into()
        ));
    };
    if h.is_empty() {
        return Err(bad("empty histogram".into()));
    }
    Ok(CyclictestResult {
        latency: Percentiles::of(&h),
        min_us: min,
        avg_us: avg,
        max_us: max,
        overflows,
        command: String::new(),
    })
}

/// Options of `latency chain`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChainLatencyOpts {
    /// The chain's entry port (must have no incoming link while measuring).
    pub entry: PortRef,
    /// The chain's exit port (must have no outgoing link while measuring).
    pub exit: PortRef,
    /// Packets per second.
    pub rate_pps: u64,
    /// Packets to send.
    pub packets: u64,
    /// Frame size.
    pub size: usize,
    /// Worker index for the probe's generator and sink.
    pub worker: usize,
    /// Give up this long after the generator finished.
    pub settle: Duration,
}

/// Result of `latency chain`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ChainLatencyReport {
    /// Sent packets.
    pub sent: u64,
    /// Sent packets that did not reach the probe's sink (`sent - received`).
    pub lost: u64,
    /// What the probe sink saw (latency, loss, reordering).
    pub sink: SinkSummary,
    /// Text histogram.
    pub histogram: String,
}

/// A latency probe attached to a running panel: a generator linked into the chain's entry and
/// a sink linked from its exit, on nodes `tv:probe-gen` and `tv:probe-sink` (not DNS labels, so
/// no VNF or network node can hold those names). On a panel whose links
/// are per-network ([`PatchPanel::apply_network`]) the probe's two links are a network of their
/// own, [`ChainProbe::NETWORK`], so other networks' changes keep them; on a flat panel they are
/// added to its links. The panel is only borrowed to attach and to detach, so the caller can
/// wait without holding it.
pub struct ChainProbe {
    gen_stats: Arc<GenStats>,
    sink: Arc<Mutex<SinkState>>,
    packets: u64,
    rate_pps: u64,
    /// Whether the probe's links are the network [`ChainProbe::NETWORK`].
    as_network: bool,
}

impl ChainProbe {
    /// Node names the probe uses (they must be free on the panel).
    pub const NODES: [&'static str; 2] = ["tv:probe-gen", "tv:probe-sink"];
    /// Name of the probe's links on a per-network panel (not a DNS label, so no network
    /// descriptor can name it).
    pub const NETWORK: &'static str = "tv:probe";
    /// Generator stream of the probe's frames: the chain's own test traffic (stream 0) that
    /// reaches the probe's sink is counted as foreign, not as probe packets.
    pub const STREAM: u16 = 0x7e57;
    /// Extra time [`ChainProbe::wait`] gives a probe beyond its send time and `settle`.
    pub const SLACK: Duration = Duration::from_secs(5);

    /// Checks everything that needs no change to the panel: the generator's settings, that
    /// the probe's node names are free and that `entry` and `exit` are ports on the panel.
    pub fn check(panel: &PatchPanel, opts: &ChainLatencyOpts) -> Result<()> {
        Self::generator(panel, opts)?;
        Self::check_ports(panel, opts)
    }

    /// The probe's node names are free, and `entry` and `exit` are ports on the panel.
    fn check_ports(panel: &PatchPanel, opts: &ChainLatencyOpts) -> Result<()> {
        for n in Self::NODES {
            if panel.node_ports(n).is_some() {
                return Err(crate::Error::Graph(format!(
                    "node {n:?} is in use (another probe is running?)"
                )));
            }
        }
        for p in [&opts.entry, &opts.exit] {
            let known = panel
                .node_ports(&p.node)
                .is_some_and(|ports| ports.contains(&p.port));
            if !known {
                return Err(crate::Error::Graph(format!(
                    "{p} is not a port on the data plane"
                )));
            }
        }
        Ok(())
    }

    fn generator(panel: &PatchPanel, opts: &ChainLatencyOpts) -> Result<Generator> {
        Ok(Generator::new(
            GenConfig {
                flows: 1,
                sizes: vec![opts.size],
                rate_pps: Some(opts.rate_pps),
                count: Some(opts.packets),
                batch: 32,
            },
            panel.pool().buf_size(),
        )?
        .with_stream(Self::STREAM))
    }

    /// Attach the probe and start sending. On error the panel is left as it was.
    pub fn start(panel: &mut PatchPanel, opts: &ChainLatencyOpts) -> Result<Self> {
        let g = Self::generator(panel, opts)?;
        Self::check_ports(panel, opts)?;
        let gen_stats = g.stats();
        let sink = LatencySink::new(32).only_stream(Self::STREAM);
        let state = sink.state();
        let probe_links = [
            LinkSpec::new(PortRef::new(Self::NODES[0], "out"), opts.entry.clone()),
            LinkSpec::new(opts.exit.clone(), PortRef::new(Self::NODES[1], "in")),
        ];
        panel.add_node(Self::NODES[0], &["out"], opts.worker, Box::new(g))?;
        if let Err(e) = panel.add_node(Self::NODES[1], &["in"], opts.worker, Box::new(sink)) {
            let _ = panel.remove_node(Self::NODES[0]);
            return Err(e);
        }
        let probe = ChainProbe {
            gen_stats,
            sink: state,
            packets: opts.packets,
            rate_pps: opts.rate_pps.max(1),
            as_network: !panel.networks().is_empty(),
        };
        let wired = if probe.as_network {
            panel.apply_network(Self::NETWORK, &probe_links)
        } else {
            let mut links = panel.current_links();
            links.extend(probe_links);
            panel.apply(&links)
        };
        if let Err(e) = wired {
            probe.detach(panel);
            return Err(e);
        }
        Ok(probe)
    }

    /// Test frames received so far.
    pub fn received(&self) -> u64 {
        self.sink.lock().map(|s| s.received).unwrap_or(0)
    }

    /// The generator sent everything.
    pub fn sent_all(&self) -> bool {
        self.gen_stats.done.load(Ordering::Acquire)
    }

    /// Packets the probe sends in all.
    pub fn packets(&self) -> u64 {
        self.packets
    }

    /// Waits until every packet arrived, or `settle` passed after the generator finished with
    /// nothing more arriving, or the probe ran [`ChainProbe::SLACK`] past its send time and
    /// `settle` (a chain that stopped taking packets: the report then shows what was sent and
    /// received). `progress` gets (received, packets) on every change. Returns whether the
    /// probe ended on its deadline.
    pub fn wait(&self, settle: Duration, progress: &mut dyn FnMut(u64, u64)) -> bool {
        let send_time = Duration::from_secs_f64(self.packets as f64 / self.rate_pps as f64);
        let deadline = Instant::now() + send_time + settle + Self::SLACK;
        let mut last = (0u64, Instant::now());
        loop {
            let rx = self.received();
            if rx != last.0 {
                last = (rx, Instant::now());
                progress(rx, self.packets);
            }
            if rx >= self.packets || (self.sent_all() && last.1.elapsed() > settle) {
                return false;
            }
            if Instant::now() >= deadline {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn detach(&self, panel: &mut PatchPanel) {
        if self.as_network {
            let _ = panel.delete_network(Self::NETWORK);
        }
        for n in Self::NODES {
            let _ = panel.remove_node(n);
        }
    }

    /// Remove the probe (its links go with its nodes; the rest of the graph is untouched) and
    /// report what the sink saw.
    pub fn finish(self, panel: &mut PatchPanel) -> ChainLatencyReport {
        self.detach(panel);
        let s = self.sink.lock().unwrap_or_else(|p| p.into_inner());
        let sent = self.gen_stats.sent.load(Ordering::Relaxed);
        ChainLatencyReport {
            sent,
            lost: sent.saturating_sub(s.received),
            sink: s.summary(),
            histogram: crate::hist::render(&s.latency),
        }
    }
}

/// `telvirt latency chain` on a panel the caller owns: attach a [`ChainProbe`], wait for it
/// ([`ChainProbe::wait`]), detach it. Progress counts packets received.
pub fn chain(
    panel: &mut PatchPanel,
    opts: &ChainLatencyOpts,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ChainLatencyReport> {
    let probe = ChainProbe::start(panel, opts)?;
    probe.wait(opts.settle, progress);
    Ok(probe.finish(panel))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "# /dev/cpu_dma_latency set to 0us
000000 000000
000001 000000
000002 000010
000003 000080
000004 000010
# Total: 000000100
# Min Latencies: 00002
# Avg Latencies: 00003
# Max Latencies: 00004
# Histogram Overflows: 00000
# Histogram Overflow at cycle number:
# Thread 0:
";

    #[test]
    fn parses_cyclictest_histogram() {
        let r = parse_cyclictest(SAMPLE).unwrap();
        assert_eq!(r.latency.count, 100);
        assert!((r.latency.p50_us - 3.5).abs() < 0.05, "{:?}", r.latency);
        assert_eq!(
            (r.min_us, r.avg_us, r.max_us, r.overflows),
            (2.0, 3.0, 4.0, 0)
        );
        let e = parse_cyclictest("T: 0 ( 1) P: 0 I:1000")
            .unwrap_err()
            .to_string();
        assert!(e.contains("Min/Avg/Max"), "{e}");
    }

    #[test]
    fn bad_timer_options_are_precise() {
        let ok = TimerOpts {
            core: allowed_cores().unwrap()[0],
            ..TimerOpts::default()
        };
        let cases = [
            (
                TimerOpts {
                    core: 100_000,
                    ..ok.clone()
                },
                "latency.core",
            ),
            (
                TimerOpts {
                    interval_us: 1,
                    ..ok.clone()
                },
                "latency.interval_us",
            ),
            (
                TimerOpts {
                    loops: 0,
                    ..ok.clone()
                },
                "latency.loops",
            ),
            (
                TimerOpts {
                    priority: Some(0),
                    ..ok.clone()
                },
                "latency.priority",
            ),
        ];
        for (o, want) in cases {
            let e = timer(&o, &mut |_, _| {}).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn timer_with_fifo_priority_passes_it_to_both_tools() {
        let core = allowed_cores().unwrap()[0];
        let opts = TimerOpts {
            core,
            interval_us: 200,
            loops: 200,
            priority: Some(10),
            cyclictest: true,
        };
        let r = timer(&opts, &mut |_, _| {}).unwrap();
        assert_eq!(r.telvirt.count, 200);
        let c = r.cyclictest.unwrap();
        assert!(c.command.contains("-p10"), "{}", c.command);
        assert_eq!(c.latency.count + c.overflows, 200);
    }

    #[test]
    fn timer_measures_and_runs_cyclictest_on_the_same_core() {
        let core = *allowed_cores().unwrap().last().unwrap();
        let opts = TimerOpts {
            core,
            interval_us: 500,
            loops: 400,
            priority: None,
            cyclictest: true,
        };
        let mut last = (0, 0);
        let r = match timer(&opts, &mut |d, t| last = (d, t)) {
            Err(Error::Tool { reason, .. }) if reason.contains("rt-tests") => {
                panic!("cyclictest is missing: install the Debian package rt-tests")
            }
            other => other.unwrap(),
        };
        assert_eq!(last, (800, 800));
        assert_eq!(r.telvirt.count, 400);
        assert!(r.telvirt.min_us > 0.0 && r.telvirt.p50_us <= r.telvirt.max_us);
        let c = r.cyclictest.as_ref().unwrap();
        assert_eq!(c.latency.count + c.overflows, 400);
        assert!(c.command.contains(&format!("-a{core}")));
        assert!(r.median_ratio.is_some());
    }
}
