//! Latency histograms: an HDR histogram in nanoseconds and the percentile summary every report
//! prints. Must not measure anything itself.

use hdrhistogram::Histogram;

/// Highest latency a histogram tracks (values above are clamped): 60 s.
pub const MAX_NS: u64 = 60_000_000_000;

/// A new nanosecond histogram with 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_NS, 3).expect("invariant: constant bounds 1..60s, 3 digits")
}

/// Record `ns` (clamped into the histogram's range).
pub fn record(h: &mut Histogram<u64>, ns: u64) {
    h.saturating_record(ns.clamp(1, MAX_NS));
}

/// Samples of `h` per bucket, not cumulative: entry `i` counts values above `bounds_ns[i - 1]`
/// and at most `bounds_ns[i]` (ascending bounds); one last entry counts the values above every
/// bound. An HDR histogram groups equal values within its precision (3 digits), so a value
/// within 0.1% of a bound may land on either side of it.
pub fn bucket_counts(h: &Histogram<u64>, bounds_ns: &[u64]) -> Vec<u64> {
    let mut out = vec![0; bounds_ns.len() + 1];
    for v in h.iter_recorded() {
        let i = bounds_ns.partition_point(|b| *b < v.value_iterated_to());
        out[i] += v.count_at_value();
    }
    out
}

/// Percentiles of a latency distribution, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Percentiles {
    /// Samples.
    pub count: u64,
    /// Smallest.
    pub min_us: f64,
    /// Median.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Largest.
    pub max_us: f64,
    /// Mean.
    pub mean_us: f64,
}

impl Percentiles {
    /// Summarise a nanosecond histogram (all zero when empty).
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Percentiles::default();
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        Percentiles {
            count: h.len(),
            min_us: us(h.min()),
            p50_us: us(h.value_at_quantile(0.5)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
            mean_us: h.mean() / 1000.0,
        }
    }
}

/// Text rendering of a histogram: one line per bucket of roughly doubling width, with a bar.
pub fn render(h: &Histogram<u64>) -> String {
    let mut out = String::new();
    if h.is_empty() {
        out.push_str("(no samples)\n");
        return out;
    }
    let total = h.len() as f64;
    let mut lo = 0u64;
    let mut hi = 1_000u64; // 1 us
    while lo <= h.max() {
        let n = h.count_between(lo, hi.saturating_sub(1));
        if n > 0 {
            let bar = "#".repeat(((n as f64 / total) * 50.0).ceil() as usize);
            out.push_str(&format!(
                "{:>10.1} - {:>10.1} us {:>10} {bar}\n",
                lo as f64 / 1000.0,
                hi as f64 / 1000.0,
                n
            ));
        }
        lo = hi;
        hi = hi.saturating_mul(2);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_counts_put_each_sample_under_the_first_bound_it_does_not_pass() {
        let mut h = new_histogram();
        for ns in [500, 1_000, 1_001, 40_000, 5_000_000_000] {
            record(&mut h, ns);
        }
        let b = bucket_counts(&h, &[1_000, 50_000, 1_000_000]);
        // 500 and 1000 at most the first bound; 1001 and 40 µs under the second; 5 s past all.
        assert_eq!(b, vec![2, 2, 0, 1]);
        assert_eq!(bucket_counts(&new_histogram(), &[1_000]), vec![0, 0]);
    }

    #[test]
    fn percentiles_of_known_data() {
        let mut h = new_histogram();
        for i in 1..=1000u64 {
            record(&mut h, i * 1000);
        }
        let p = Percentiles::of(&h);
        assert_eq!(p.count, 1000);
        assert!((p.p50_us - 500.0).abs() < 1.0, "{p:?}");
        assert!((p.p99_us - 990.0).abs() < 1.0, "{p:?}");
        assert!((p.max_us - 1000.0).abs() < 1.0, "{p:?}");
        assert_eq!(Percentiles::of(&new_histogram()), Percentiles::default());
        let text = render(&h);
        assert!(text.lines().count() >= 5, "{text}");
    }
}
