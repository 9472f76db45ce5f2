//! Request handling inside the guest: health from /proc, the memory dirtier and the timer
//! latency probe. Owns the workloads' threads; must not open ports or power the guest off
//! (the binary does that after [`Agent::handle`] answers `Shutdown`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::drops::DropTrace;
use crate::proto::{
    Body, GuestNic, Health, KernelDrops, MAX_TIMER_PROBE_US, PROTOCOL_VERSION, Ready, Request,
    TimerStats, Workload,
};

const PAGE: usize = 4096;
const MIB: u64 = 1024 * 1024;

struct Background {
    name: String,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// State of the agent: the running background workload and its counters.
pub struct Agent {
    background: Option<Background>,
    dirtied_bytes: Arc<AtomicU64>,
    /// The kernel's drop record, or why there is none.
    drop_trace: Result<DropTrace, String>,
}

impl Default for Agent {
    fn default() -> Self {
        Self::new()
    }
}

impl Agent {
    pub fn new() -> Self {
        Self {
            background: None,
            dirtied_bytes: Arc::new(AtomicU64::new(0)),
            drop_trace: Err("the agent was started without drop tracing".into()),
        }
    }

    /// Reports the kernel's drops from `trace` (or why they cannot be traced).
    pub fn with_drop_trace(mut self, trace: Result<DropTrace, String>) -> Self {
        self.drop_trace = trace;
        self
    }

    /// The announcement sent when the port opens and as the answer to `hello`.
    pub fn ready(&self) -> Body {
        Body::Ready(Ready {
            protocol: PROTOCOL_VERSION,
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_ms: uptime_ms(),
        })
    }

    /// Answer one request. `Shutdown` only answers; the caller powers off.
    pub fn handle(&mut self, request: Request) -> Body {
        match request {
            Request::Hello => self.ready(),
            Request::Health => Body::Health(self.health()),
            Request::Run { workload } => self.run(workload),
            Request::StopWorkload => Body::Stopped {
                workload: self.stop_background(),
            },
            Request::Shutdown => {
                self.stop_background();
                Body::ShuttingDown
            }
        }
    }

    fn health(&self) -> Health {
        let (load1, load5, load15) = loadavg();
        let (total, avail) = meminfo();
        Health {
            uptime_ms: uptime_ms(),
            load1,
            load5,
            load15,
            mem_total_kib: total,
            mem_available_kib: avail,
            workload: self.background.as_ref().map(|b| b.name.clone()),
            dirtied_mib: self.dirtied_bytes.load(Ordering::Relaxed) / MIB,
            nics: guest_nics(std::path::Path::new("/sys/class/net")),
            backlog_dropped: backlog_dropped(
                &std::fs::read_to_string("/proc/net/softnet_stat").unwrap_or_default(),
            ),
            kernel_drops: Some(match &self.drop_trace {
                Ok(trace) => trace.read(),
                Err(why) => KernelDrops {
                    untraced: Some(why.clone()),
                    ..KernelDrops::default()
                },
            }),
        }
    }

    fn run(&mut self, workload: Workload) -> Body {
        match workload {
            Workload::DirtyMemory {
                size_mib,
                mib_per_s,
            } => {
                if size_mib == 0 || mib_per_s == 0 {
                    return Body::Error {
                        message: "dirty_memory: size_mib and mib_per_s must be at least 1".into(),
                    };
                }
                let (total, avail) = meminfo();
                if total > 0 && size_mib * 1024 > avail {
                    return Body::Error {
                        message: format!(
                            "dirty_memory: size_mib {size_mib} exceeds available guest memory {} MiB",
                            avail / 1024
                        ),
                    };
                }
                self.stop_background();
                let stop = Arc::new(AtomicBool::new(false));
                let counter = Arc::clone(&self.dirtied_bytes);
                counter.store(0, Ordering::Relaxed);
                let stop2 = Arc::clone(&stop);
                let name = format!("dirty_memory {size_mib} MiB at {mib_per_s} MiB/s");
                let thread = std::thread::spawn(move || {
                    dirty_loop(size_mib, mib_per_s, &stop2, &counter);
                });
                self.background = Some(Background {
                    name: name.clone(),
                    stop,
                    thread: Some(thread),
                });
                Body::Started { workload: name }
            }
            Workload::TimerLatency { interval_us, count } => {
                if interval_us == 0 || count == 0 {
                    return Body::Error {
                        message: "timer_latency: interval_us and count must be at least 1".into(),
                    };
                }
                if interval_us.saturating_mul(count) > MAX_TIMER_PROBE_US {
                    return Body::Error {
                        message: format!(
                            "timer_latency: interval_us * count must be at most {MAX_TIMER_PROBE_US} (got {})",
                            interval_us.saturating_mul(count)
                        ),
                    };
                }
                Body::TimerResult(timer_probe(interval_us, count))
            }
        }
    }

    fn stop_background(&mut self) -> Option<String> {
        let mut bg = self.background.take()?;
        bg.stop.store(true, Ordering::Relaxed);
        if let Some(t) = bg.thread.take() {
            let _ = t.join();
        }
        Some(bg.name)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop_background();
    }
}

/// Size of `struct input_event` on x86-64 (timeval, type, code, value).
pub const INPUT_EVENT_SIZE: usize = 24;
const EV_KEY: u16 = 1;
const KEY_POWER: u16 = 116;

/// Whether one `struct input_event` is a press of the power key (what the ACPI power button
/// driver reports when the host sends `system_powerdown`).
pub fn is_power_button_press(ev: &[u8; INPUT_EVENT_SIZE]) -> bool {
    let kind = u16::from_ne_bytes([ev[16], ev[17]]);
    let code = u16::from_ne_bytes([ev[18], ev[19]]);
    let value = i32::from_ne_bytes([ev[20], ev[21], ev[22], ev[23]]);
    kind == EV_KEY && code == KEY_POWER && value == 1
}

fn dirty_loop(size_mib: u64, mib_per_s: u64, stop: &AtomicBool, counter: &AtomicU64) {
    let size = usize::try_from(size_mib * MIB).unwrap_or(usize::MAX);
    let mut buf = vec![0u8; size];
    let tick = Duration::from_millis(10);
    let pages_per_tick = ((mib_per_s * MIB) as usize / PAGE / 100).max(1);
    let npages = (size / PAGE).max(1);
    let mut page = 0usize;
    let mut value = 1u8;
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        for _ in 0..pages_per_tick {
            if let Some(b) = buf.get_mut(page * PAGE) {
                *b = value;
            }
            page += 1;
            if page >= npages {
                page = 0;
                value = value.wrapping_add(1);
            }
        }
        counter.fetch_add((pages_per_tick * PAGE) as u64, Ordering::Relaxed);
        next += tick;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else {
            next = now;
        }
    }
    std::hint::black_box(&buf);
}

fn timer_probe(interval_us: u64, count: u64) -> TimerStats {
    let interval = Duration::from_micros(interval_us);
    let (mut min, mut max, mut sum) = (u64::MAX, 0u64, 0u64);
    for _ in 0..count {
        let target = Instant::now() + interval;
        std::thread::sleep(interval);
        let late = Instant::now().saturating_duration_since(target).as_micros() as u64;
        min = min.min(late);
        max = max.max(late);
        sum += late;
    }
    TimerStats {
        count,
        min_us: min,
        avg_us: sum / count,
        max_us: max,
    }
}

fn uptime_ms() -> u64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .map(|s| (s * 1000.0) as u64)
        .unwrap_or(0)
}

fn loadavg() -> (f64, f64, f64) {
    let s = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut it = s
        .split_whitespace()
        .map(|v| v.parse::<f64>().unwrap_or(0.0));
    (
        it.next().unwrap_or(0.0),
        it.next().unwrap_or(0.0),
        it.next().unwrap_or(0.0),
    )
}

/// The interfaces under `sys_class_net` (but loopback), sorted by name, with their counters
/// (0 where one cannot be read).
fn guest_nics(sys_class_net: &std::path::Path) -> Vec<GuestNic> {
    let Ok(dir) = std::fs::read_dir(sys_class_net) else {
        return Vec::new();
    };
    let qdisc = crate::qdisc::root_counts();
    let mut nics: Vec<GuestNic> = dir
        .flatten()
        // Interfaces are directories (links to them); a file such as `bonding_masters` is not.
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| name != "lo")
        .map(|name| {
            let stat = |what: &str| {
                std::fs::read_to_string(sys_class_net.join(&name).join("statistics").join(what))
                    .ok()
                    .and_then(|s| s.trim().parse::<u64>().ok())
                    .unwrap_or(0)
            };
            let ifindex = std::fs::read_to_string(sys_class_net.join(&name).join("ifindex"))
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok());
            let root = ifindex.and_then(|i| qdisc.get(&i));
            GuestNic {
                qdisc_dropped: root.map(|q| q.dropped),
                qdisc_queued: root.map(|q| q.queued),
                rx_packets: stat("rx_packets"),
                tx_packets: stat("tx_packets"),
                rx_dropped: stat("rx_dropped"),
                tx_dropped: stat("tx_dropped"),
                rx_errors: stat("rx_errors"),
                tx_errors: stat("tx_errors"),
                name,
            }
        })
        .collect();
    nics.sort_by(|a, b| a.name.cmp(&b.name));
    nics
}

/// The second column of `/proc/net/softnet_stat` (hexadecimal, one line per CPU), summed: the
/// frames each CPU's input backlog was too full to take.
fn backlog_dropped(softnet_stat: &str) -> u64 {
    softnet_stat
        .lines()
        .filter_map(|l| u64::from_str_radix(l.split_whitespace().nth(1)?, 16).ok())
        .sum()
}

fn meminfo() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (field("MemTotal:"), field("MemAvailable:"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nic_counters_and_backlog_drops_are_read() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("bonding_masters"), "\n").unwrap();
        for (nic, rx, dropped) in [
            ("eth1", "7\n", "2\n"),
            ("eth0", "40\n", "0\n"),
            ("lo", "9\n", "0\n"),
        ] {
            let s = dir.path().join(nic).join("statistics");
            std::fs::create_dir_all(&s).unwrap();
            std::fs::write(s.join("rx_packets"), rx).unwrap();
            std::fs::write(s.join("rx_dropped"), dropped).unwrap();
        }
        let nics = guest_nics(dir.path());
        let seen: Vec<(&str, u64, u64, u64)> = nics
            .iter()
            .map(|n| (n.name.as_str(), n.rx_packets, n.rx_dropped, n.tx_packets))
            .collect();
        // Sorted, loopback left out, a counter that is not there read as 0.
        assert_eq!(seen, [("eth0", 40, 0, 0), ("eth1", 7, 2, 0)]);
        let softnet = "0000a1b2 00000003 00000000\n00000010 0000000a 00000001\n";
        assert_eq!(backlog_dropped(softnet), 13);
        assert_eq!(backlog_dropped(""), 0);
    }

    #[test]
    fn power_key_press_is_recognised() {
        let mut ev = [0u8; INPUT_EVENT_SIZE];
        ev[16..18].copy_from_slice(&EV_KEY.to_ne_bytes());
        ev[18..20].copy_from_slice(&KEY_POWER.to_ne_bytes());
        ev[20..24].copy_from_slice(&1i32.to_ne_bytes());
        assert!(is_power_button_press(&ev));
        ev[20..24].copy_from_slice(&0i32.to_ne_bytes());
        assert!(!is_power_button_press(&ev), "release is not a press");
        ev[18..20].copy_from_slice(&30u16.to_ne_bytes());
        ev[20..24].copy_from_slice(&1i32.to_ne_bytes());
        assert!(!is_power_button_press(&ev), "another key");
    }

    #[test]
    fn hello_and_health() {
        let mut a = Agent::new();
        match a.handle(Request::Hello) {
            Body::Ready(r) => assert_eq!(r.protocol, PROTOCOL_VERSION),
            other => panic!("unexpected {other:?}"),
        }
        match a.handle(Request::Health) {
            Body::Health(h) => {
                assert!(h.uptime_ms > 0);
                assert!(h.mem_total_kib > 0);
                assert_eq!(h.workload, None);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn dirtier_starts_counts_and_stops() {
        let mut a = Agent::new();
        let started = a.handle(Request::Run {
            workload: Workload::DirtyMemory {
                size_mib: 4,
                mib_per_s: 200,
            },
        });
        assert!(matches!(started, Body::Started { .. }), "{started:?}");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let Body::Health(h) = a.handle(Request::Health) else {
                panic!("health")
            };
            assert!(h.workload.is_some());
            if h.dirtied_mib >= 2 {
                break;
            }
            assert!(Instant::now() < deadline, "dirtier made no progress");
            std::thread::sleep(Duration::from_millis(20));
        }
        match a.handle(Request::StopWorkload) {
            Body::Stopped { workload: Some(_) } => {}
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(
            a.handle(Request::StopWorkload),
            Body::Stopped { workload: None }
        );
    }

    #[test]
    fn bad_workloads_are_refused() {
        let mut a = Agent::new();
        for w in [
            Workload::DirtyMemory {
                size_mib: 0,
                mib_per_s: 1,
            },
            Workload::DirtyMemory {
                size_mib: u64::MAX / 4096,
                mib_per_s: 1,
            },
            Workload::TimerLatency {
                interval_us: 0,
                count: 1,
            },
            Workload::TimerLatency {
                interval_us: 1_000_000,
                count: 61,
            },
        ] {
            let r = a.handle(Request::Run {
                workload: w.clone(),
            });
            assert!(matches!(r, Body::Error { .. }), "{w:?} gave {r:?}");
        }
    }

    #[test]
    fn timer_probe_reports_stats() {
        let mut a = Agent::new();
        match a.handle(Request::Run {
            workload: Workload::TimerLatency {
                interval_us: 1000,
                count: 5,
            },
        }) {
            Body::TimerResult(t) => {
                assert_eq!(t.count, 5);
                assert!(t.min_us <= t.avg_us && t.avg_us <= t.max_us);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
