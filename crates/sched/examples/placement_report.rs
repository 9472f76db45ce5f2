//! Runs the `telvirt bench placement` workload (1,000 hosts, 100,000 VNFs by default) and prints
//! the JSON report: `cargo run --release -p telvirt-sched --example placement_report [HOSTS VNFS]`.

fn main() {
    let mut args = std::env::args().skip(1).map(|a| a.parse::<u32>());
    let mut cfg = telvirt_sched::bench::PlacementBenchConfig::default();
    if let Some(Ok(h)) = args.next() {
        cfg.hosts = h;
    }
    if let Some(Ok(v)) = args.next() {
        cfg.vnfs = v;
    }
    let mut last = 0;
    let report = telvirt_sched::bench::run_placement_bench(&cfg, &mut |done, total| {
        let pct = done * 10 / total.max(1);
        if pct != last {
            last = pct;
            eprintln!("{}%", pct * 10);
        }
    });
    match report {
        Ok(r) => match serde_json::to_string_pretty(&r) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("cannot encode the report: {e}"),
        },
        Err(e) => eprintln!("benchmark failed: {e}"),
    }
}
