//! The boot benchmark end to end with one round (shape and sanity, not speed).

#![allow(clippy::unwrap_used)]

mod common;

use common::BOOT_SLOT;
use telvirt_runtime_vm::{AccelChoice, BenchOptions, bench};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_round_reports_medians_ratio_and_rss() {
    let _slot = BOOT_SLOT.acquire().await.unwrap();
    let img = common::image();
    let root = common::state_root();
    let mut opts = BenchOptions::new(&img.kernel, &img.initrd, root.path());
    opts.rounds = 1;
    opts.accel = AccelChoice::Tcg;
    let mut seen = Vec::new();
    let r = bench::run(&opts, &mut |d, t| seen.push((d, t)))
        .await
        .unwrap();
    assert_eq!(seen, vec![(1, 2), (2, 2)]);
    assert_eq!(r.accel, "tcg");
    assert_eq!(r.telvirt_samples_ms.len(), 1);
    assert_eq!(r.bare_samples_ms.len(), 1);
    assert!(r.telvirt_boot_ms > 0.0 && r.bare_boot_ms > 0.0, "{r:?}");
    assert!((r.ratio - r.telvirt_boot_ms / r.bare_boot_ms).abs() < 1e-9);
    assert!(
        (r.paired_ratio - r.ratio).abs() < 1e-9,
        "one round: both ratios agree"
    );
    assert!(
        r.rss_mib > r.rss_overhead_mib && r.rss_overhead_mib > 0.0,
        "{r:?}"
    );
    let json = serde_json::to_value(&r).unwrap();
    assert!(json.get("overhead_pct").is_some());
    assert!(
        std::process::Command::new("pgrep")
            .args(["-f", "guest=bench-vm"])
            .status()
            .map(|s| !s.success())
            .unwrap_or(true)
    );
}

#[tokio::test]
async fn zero_rounds_is_refused() {
    let root = common::state_root();
    let mut opts = BenchOptions::new("/k", "/i", root.path());
    opts.rounds = 0;
    let e = bench::run(&opts, &mut |_, _| {}).await.unwrap_err();
    assert!(e.to_string().contains("rounds"), "{e}");
}
