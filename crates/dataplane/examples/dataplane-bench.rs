//! Runs the data plane's measurements and prints one JSON object, the same functions
//! `telvirt bench` / `telvirt latency` call:
//!
//! ```text
//! cargo run --release -p telvirt-dataplane --example dataplane-bench -- ring [PACKETS]
//! cargo run --release -p telvirt-dataplane --example dataplane-bench -- chain [PACKETS]
//! cargo run --release -p telvirt-dataplane --example dataplane-bench -- timer [CORE] [LOOPS]
//! ```

use telvirt_dataplane::bench::{ChainOpts, RingOpts, chain, ring};
use telvirt_dataplane::latency::{TimerOpts, timer};

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
        _ => return Err("usage: dataplane-bench ring|chain|timer [N]".into()),
    };
    println!("{json}");
    Ok(())
}
