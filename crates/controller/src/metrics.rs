//! Prometheus text metrics for `/metrics`.
//!
//! Owns the counters the API and controller bump and their text exposition (format 0.0.4). It
//! must not block: counters are atomics or short critical sections.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct Metrics {
    /// (method, route, status) → count.
    requests: Mutex<BTreeMap<(String, String, u16), u64>>,
    events: AtomicU64,
    placements: AtomicU64,
}

impl Metrics {
    pub fn request(&self, method: &str, route: &str, status: u16) {
        if let Ok(mut map) = self.requests.lock() {
            *map.entry((method.to_owned(), route.to_owned(), status))
                .or_insert(0) += 1;
        }
    }

    pub fn event(&self) {
        self.events.fetch_add(1, Ordering::Relaxed);
    }

    pub fn placement(&self) {
        self.placements.fetch_add(1, Ordering::Relaxed);
    }

    /// The exposition text, with the current VNF count per phase.
    pub fn render(&self, phases: &BTreeMap<&'static str, u64>) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "# HELP telvirt_build_info telvirt version.");
        let _ = writeln!(out, "# TYPE telvirt_build_info gauge");
        let _ = writeln!(
            out,
            "telvirt_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        let _ = writeln!(
            out,
            "# HELP telvirt_http_requests_total API requests answered."
        );
        let _ = writeln!(out, "# TYPE telvirt_http_requests_total counter");
        if let Ok(map) = self.requests.lock() {
            for ((method, route, status), n) in map.iter() {
                let _ = writeln!(
                    out,
                    "telvirt_http_requests_total{{method=\"{method}\",route=\"{route}\",status=\"{status}\"}} {n}"
                );
            }
        }
        let _ = writeln!(out, "# HELP telvirt_vnfs VNFs by lifecycle phase.");
        let _ = writeln!(out, "# TYPE telvirt_vnfs gauge");
        for phase in [
            "Pending",
            "Scheduled",
            "Starting",
            "Running",
            "Locked",
            "Stopping",
            "Stopped",
            "Failed",
        ] {
            let n = phases.get(phase).copied().unwrap_or(0);
            let _ = writeln!(out, "telvirt_vnfs{{phase=\"{phase}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP telvirt_events_total Lifecycle events recorded."
        );
        let _ = writeln!(out, "# TYPE telvirt_events_total counter");
        let _ = writeln!(
            out,
            "telvirt_events_total {}",
            self.events.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP telvirt_placements_total VNFs placed by the scheduler."
        );
        let _ = writeln!(out, "# TYPE telvirt_placements_total counter");
        let _ = writeln!(
            out,
            "telvirt_placements_total {}",
            self.placements.load(Ordering::Relaxed)
        );
        out
    }
}
