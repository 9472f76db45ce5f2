//! The generator stream of the move benchmarks (`bench migrate`, `bench vm-move`): what the
//! stream network's sink showed at one reading, and what a move cost the stream between two
//! readings (frames lost, their time at the stream's rate, the slowest frame meanwhile).
//!
//! It reads the API and the agents' logs only; it must not create, place or move anything.

use std::path::Path;

use anyhow::{Result, bail};
use serde::Serialize;

use crate::bench_cluster::{Api, Hosts};
use telvirt_model::network::SINK_LATENCY_BOUNDS_NS;

/// What the stream network's sink showed at one reading.
pub(crate) struct SinkReading {
    /// The frames it missed so far: sequence numbers below the highest it saw that never
    /// came (frames in flight are above it: they are not counted, unlike a difference of the
    /// links' counters).
    pub missing: u64,
    /// The test frames it received so far.
    pub received: u64,
    /// Its frames per latency bucket so far (bounds: [`SINK_LATENCY_BOUNDS_NS`]).
    pub delays: Vec<u64>,
    /// The network's `net show` table (each link's counters, its drops among them).
    pub table: String,
}

impl SinkReading {
    /// The sink of network `stream` now.
    pub async fn read(api: &Api) -> Result<Self> {
        let n = api.json("/v1/networks/stream").await?;
        let status = &n["status"];
        let sink = &status["sinks"][0];
        let (Some(missing), Some(received), Some(delays), Some(table)) = (
            sink["lost"].as_u64(),
            sink["received"].as_u64(),
            sink["latency_buckets"].as_array(),
            status["table"].as_str(),
        ) else {
            bail!("network stream shows no sink or table: {n}");
        };
        Ok(Self {
            missing,
            received,
            delays: delays.iter().map(|v| v.as_u64().unwrap_or(0)).collect(),
            table: table.to_owned(),
        })
    }
}

/// What the stream lost between two readings of its sink.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub(crate) struct StreamLoss {
    /// Frames of the stream that never reached the sink (gaps in their sequence numbers; a
    /// frame still on its way is not one).
    pub lost_packets: u64,
    /// `lost_packets` at the stream's rate: how long the stream was cut, as a generator on a
    /// wire measures a device's outage.
    pub outage_ms: f64,
    /// The upper bound of the slowest latency bucket (generator to sink, one clock) a frame
    /// fell into between the readings: what the move cost a frame that was queued rather
    /// than lost. `None`: slower than the last bound (1 s).
    pub delay_max_us: Option<u64>,
}

impl StreamLoss {
    /// Between `before` and `after`, of a stream of `rate_pps` frames a second.
    pub fn between(before: &SinkReading, after: &SinkReading, rate_pps: u64) -> Self {
        let lost = after.missing.saturating_sub(before.missing);
        let slowest = (0..after.delays.len())
            .rev()
            .find(|&i| after.delays[i] > before.delays.get(i).copied().unwrap_or(0));
        let delay_max_us = match slowest {
            Some(i) => SINK_LATENCY_BOUNDS_NS.get(i).map(|ns| ns / 1000),
            None => Some(0),
        };
        Self {
            lost_packets: lost,
            outage_ms: lost as f64 * 1000.0 / rate_pps.max(1) as f64,
            delay_max_us,
        }
    }
}

/// Where a move's lost frames may have gone: the stream network's table (each link's drops,
/// each tunnel endpoint's) and the last warnings of the agents of hosts h1..h`hosts`, whose
/// logs are in `dir`.
pub(crate) fn lost_where(table: &str, dir: &Path, hosts: u32) -> String {
    let mut out = table.to_owned();
    for i in 0..hosts as usize {
        let name = Hosts::name(i);
        let log = std::fs::read_to_string(Hosts::log_path(dir, &name)).unwrap_or_default();
        let warnings: Vec<&str> = log.lines().filter(|l| l.contains("WARN")).collect();
        for line in &warnings[warnings.len().saturating_sub(20)..] {
            out.push_str(&format!("\n{name}: {line}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(missing: u64, delays: &[u64]) -> SinkReading {
        SinkReading {
            missing,
            received: 0,
            delays: delays.to_vec(),
            table: String::new(),
        }
    }

    #[test]
    fn a_loss_counts_only_what_went_missing_between_the_readings() {
        let before = reading(5, &[10, 4, 0]);
        let after = reading(25, &[30, 4, 0]);
        let loss = StreamLoss::between(&before, &after, 1_000);
        assert_eq!(loss.lost_packets, 20);
        assert!((loss.outage_ms - 20.0).abs() < 1e-9, "{loss:?}");
        // Only the first bucket grew: the slowest frame between the readings is its bound.
        assert_eq!(loss.delay_max_us, Some(SINK_LATENCY_BOUNDS_NS[0] / 1000));
    }

    #[test]
    fn a_frame_slower_than_the_last_bound_has_no_delay_figure() {
        let bounds = SINK_LATENCY_BOUNDS_NS.len();
        let before = reading(0, &vec![0; bounds + 1]);
        let mut grown = vec![0; bounds + 1];
        grown[bounds] = 1;
        let after = reading(0, &grown);
        let loss = StreamLoss::between(&before, &after, 1_000);
        assert_eq!((loss.lost_packets, loss.delay_max_us), (0, None));
        // Nothing grew: no frame was slow.
        assert_eq!(
            StreamLoss::between(&after, &after, 1_000).delay_max_us,
            Some(0)
        );
    }
}
