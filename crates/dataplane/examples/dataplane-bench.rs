//! Runs the data plane's measurements and prints one JSON object, the same functions
//! `telvirt bench` / `telvirt latency` call:
//!
//! ```text
//! cargo run --release -p telvirt-dataplane --example dataplane-bench -- ring [PACKETS]
//! cargo run --release -p telvirt-dataplane --example dataplane-bench -- chain [PACKETS]
//! cargo run --release -p telvirt-dataplane --example dataplane-bench -- timer [CORE] [LOOPS]
//! cargo run --release -p telvirt-dataplane --example dataplane-bench -- capture FILE [PACKETS]
//! ```
//!
//! `capture` writes generator frames to a nanosecond pcap file (to open in Wireshark).

use telvirt_dataplane::bench::{ChainOpts, RingOpts, chain, ring};
use telvirt_dataplane::graph::LinkSpec;
use telvirt_dataplane::latency::{TimerOpts, timer};
use telvirt_dataplane::panel::PatchPanel;
use telvirt_dataplane::pcap::PcapSink;
use telvirt_dataplane::pool::{DEFAULT_BUF_SIZE, Pool};
use telvirt_dataplane::traffic::{GenConfig, Generator};
use telvirt_dataplane::worker::WorkerConfig;

/// Generator (3 flows, 64/512/1500-byte frames) into a pcap sink; returns frames written.
fn capture(path: &std::path::Path, packets: u64) -> Result<u64, Box<dyn std::error::Error>> {
    let pool = std::sync::Arc::new(Pool::new("capture", 1024, DEFAULT_BUF_SIZE)?);
    let mut panel = PatchPanel::new(pool, vec![WorkerConfig::new("capture", None)], 256)?;
    let cfg = GenConfig {
        flows: 3,
        sizes: vec![64, 512, 1500],
        count: Some(packets),
        ..GenConfig::default()
    };
    panel.add_node(
        "gen",
        &["out"],
        0,
        Box::new(Generator::new(cfg, DEFAULT_BUF_SIZE)?),
    )?;
    let sink = PcapSink::create(path)?;
    let stats = sink.stats();
    panel.add_node("pcap", &["in"], 0, Box::new(sink))?;
    panel.apply(&[LinkSpec::parse("gen.out -> pcap.in")?])?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while stats.packets.load(std::sync::atomic::Ordering::Relaxed) < packets {
        if let Some(e) = stats.last_error() {
            return Err(e.into());
        }
        if std::time::Instant::now() > deadline {
            return Err("capture did not finish within 30 s".into());
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    panel.shutdown();
    Ok(stats.packets.load(std::sync::atomic::Ordering::Relaxed))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let num = |i: usize| args.get(i).and_then(|s| s.parse::<u64>().ok());
    let mut quiet = |_: u64, _: u64| {};
    let json = match args.first().map(String::as_str) {
        Some("ring") => {
            let mut o = RingOpts::default();
            if let Some(n) = num(1) {
                o.packets = n;
            }
            serde_json::to_string_pretty(&ring(&o, &mut quiet)?)?
        }
        Some("chain") => {
            let mut o = ChainOpts::default();
            if let Some(n) = num(1) {
                o.packets = n;
            }
            serde_json::to_string_pretty(&chain(&o, &mut quiet)?)?
        }
        Some("timer") => {
            let o = TimerOpts {
                core: num(1).unwrap_or(0) as usize,
                loops: num(2).unwrap_or(10_000),
                ..TimerOpts::default()
            };
            serde_json::to_string_pretty(&timer(&o, &mut quiet)?)?
        }
        Some("capture") => {
            let path = args.get(1).ok_or("capture needs a FILE")?;
            serde_json::to_string_pretty(&capture(path.as_ref(), num(2).unwrap_or(100))?)?
        }
        _ => return Err("usage: dataplane-bench ring|chain|timer|capture [ARGS]".into()),
    };
    println!("{json}");
    Ok(())
}
