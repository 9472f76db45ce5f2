//! `telvirt bench failover`, at its smallest, reports every figure from real processes: the NAT
//! pair keeps every session across the kill of its active's agent and gets a new standby, the
//! baseline NAT without a standby makes every session again; keepalived's VRRP, the classic
//! baseline, is timed beside them where it can run, and so is an iperf3 TCP flow through each.

mod common;
use serde_json::Value;

/// The benchmarks run one at a time: each starts a controller and four agents, which two of
/// them at once on two cores would starve.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn bench_failover_reports_every_figure() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let out = std::process::Command::new(common::BIN)
        .args(["bench", "failover", "--rounds", "1", "--flows", "8"])
        .args(["--rate-pps", "2000", "-o", "json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", common::stderr(&out));
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    for setup in ["pair", "single"] {
        let run = &r[setup]["runs"][0];
        assert!(run["detect_ms"].as_f64().unwrap() > 0.0, "{r}");
        assert!(run["flip_ms"].as_f64().unwrap() > 0.0, "{r}");
        assert!(run["outage_ms"].as_f64().unwrap() > 0.0, "{r}");
    }
    assert_eq!(r["pair"]["sessions_kept_pct_min"], 100.0, "{r}");
    assert_eq!(r["single"]["sessions_kept_pct_min"], 0.0, "{r}");
    assert!(r["pair"]["reheal_max_ms"].as_f64().unwrap() > 0.0, "{r}");
    assert!(r["single"]["reheal_max_ms"].is_null(), "{r}");
    assert!(r["outage_ratio"].as_f64().unwrap() > 0.0, "{r}");
    // No class asked: the agents' own (nice -10 where permitted), as read from /proc.
    let applied = r["control_applied"].as_array().unwrap();
    assert!(
        !applied.is_empty()
            && applied
                .iter()
                .all(|c| c.as_str().is_some_and(|c| c.starts_with("nice "))),
        "{r}"
    );
    // The VRRP baseline (keepalived, advert_int 1 s) runs where namespaces can be made: its
    // backup cannot take over before missing three adverts; elsewhere the report says why not.
    match r["vrrp"]["flip_max_ms"].as_f64() {
        Some(flip) => {
            assert!(flip > 2000.0, "{r}");
            assert!(r["flip_ratio_to_vrrp"].as_f64().unwrap() > 0.0, "{r}");
        }
        None => assert!(r["vrrp_missing"].as_str().unwrap().contains("root"), "{r}"),
    }
    // An iperf3 TCP flow through the NAT: the pair keeps the connection (its sessions were
    // replicated), the NAT without a standby loses it; where namespaces cannot be made, the
    // report says why not.
    match r["tcp"]["pair_survived_all"].as_bool() {
        Some(survived) => {
            assert!(survived, "{r}");
            assert_eq!(r["tcp"]["single_survived_any"], false, "{r}");
            assert!(
                r["tcp"]["pair"][0]["flip_ms"].as_f64().unwrap() > 0.0,
                "{r}"
            );
        }
        None => assert!(r["tcp_missing"].as_str().is_some(), "{r}"),
    }
}

/// `telvirt bench migrate`, at its smallest: the live move carries every session and the NAT's
/// state, the cold move (deleted, created on the destination) makes every session again.
#[test]
fn bench_migrate_reports_every_figure() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let out = std::process::Command::new(common::BIN)
        .args([
            "bench",
            "migrate",
            "--rounds",
            "1",
            "--flows",
            "8",
            "--loaded-mib",
            "1",
        ])
        .args([
            "--rate-pps",
            "2000",
            "--control-priority",
            "2",
            "-o",
            "json",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", common::stderr(&out));
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    // Its agents ran their control threads at the priority asked (refused at their start
    // otherwise: the benchmark would have failed).
    assert_eq!(r["control_priority"], 2, "{r}");
    // And /proc says so: every agent's most favoured threads ran at it.
    assert_eq!(
        r["control_applied"],
        serde_json::json!(["SCHED_FIFO 2"]),
        "{r}"
    );
    let size = &r["sizes"][0];
    assert_eq!(size["flows"], 8, "{r}");
    for setup in ["live", "cold"] {
        assert!(size[setup]["total_p50_ms"].as_f64().unwrap() > 0.0, "{r}");
    }
    assert_eq!(size["live"]["sessions_kept_pct_min"], 100.0, "{r}");
    assert_eq!(size["cold"]["sessions_kept_pct_min"], 0.0, "{r}");
    // 8 sessions and their reverse entries at least, in bytes.
    assert!(
        size["live"]["state_bytes_max"].as_u64().unwrap() >= 8 * (24 + 20),
        "{r}"
    );
    assert_eq!(size["cold"]["state_bytes_max"], 0, "{r}");
    assert!(r["goal_no_packet_lost"].is_boolean(), "{r}");
    // The live move's freeze, from its switch event; a cold move has none.
    assert!(size["live"]["downtime_max_us"].as_u64() > Some(0), "{r}");
    assert!(size["cold"]["downtime_max_us"].is_null(), "{r}");
    assert!(r["goal_downtime_1ms"].is_boolean(), "{r}");
    // Then with 1 MiB of idle sessions loaded through the map API: they move too.
    let loaded = &r["sizes"][1];
    assert_eq!(
        (loaded["flows"].as_u64(), loaded["loaded_mib"].as_u64()),
        (Some(8), Some(1)),
        "{r}"
    );
    assert!(
        loaded["live"]["state_bytes_max"].as_u64().unwrap() >= 1 << 20,
        "{r}"
    );
    assert_eq!(loaded["live"]["sessions_kept_pct_min"], 100.0, "{r}");
    // A TCP flow through the NAT survives the live move (its session moved with it), not the
    // cold one; where namespaces cannot be made, the report says why not.
    match r["tcp"]["live_survived_all"].as_bool() {
        Some(survived) => {
            assert!(survived, "{r}");
            assert_eq!(r["tcp"]["cold_survived_any"], false, "{r}");
            // The live move's freeze under the flow, from its switch event; none for a cold one.
            assert!(r["tcp"]["live"][0]["downtime_us"].as_u64() > Some(0), "{r}");
            assert!(r["tcp"]["live_downtime_max_us"].as_u64() > Some(0), "{r}");
            assert!(r["tcp"]["cold"][0].get("downtime_us").is_none(), "{r}");
        }
        None => assert!(r["tcp_missing"].as_str().is_some(), "{r}"),
    }
}
