//! Stand-in for `telvirt bench wasm` until the CLI wires `bench::run`: prints one JSON object
//! per example VNF. Usage: `cargo run --release -p telvirt-runtime-wasm --example bench_wasm --
//! [packets] [core]`.

use telvirt_runtime_wasm::bench::{self, BenchOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let mut opts = BenchOptions::default();
    if let Some(p) = args.next() {
        opts.packets = p.parse()?;
    }
    if let Some(c) = args.next() {
        opts.core = Some(c.parse()?);
    }
    let reports = bench::run(&opts, &mut |done, total| {
        eprintln!("progress {done}/{total}")
    })?;
    for r in reports {
        println!("{}", serde_json::to_string(&r)?);
    }
    Ok(())
}
