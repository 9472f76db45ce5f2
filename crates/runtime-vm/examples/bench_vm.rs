//! Run the vm boot benchmark outside the CLI and print the report as JSON:
//! `cargo run --release -p telvirt-runtime-vm --example bench_vm -- GUEST_BIN CACHE_DIR [ROUNDS] [auto|kvm|tcg]`
//! (GUEST_BIN: a static telvirt-guest; CACHE_DIR: where the image is built).

use telvirt_runtime_vm::{AccelChoice, BenchOptions, ImageBuilder, bench};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(guest), Some(cache)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: bench_vm GUEST_BIN CACHE_DIR [ROUNDS] [auto|kvm|tcg]");
        std::process::exit(2);
    };
    let rounds: u32 = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(5);
    let accel: AccelChoice = args
        .get(4)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(AccelChoice::Auto);
    let img = ImageBuilder::new(cache, guest)
        .build(&mut |p| eprintln!("[{}/{}] {}", p.step, p.total, p.message))?;
    let root = tempfile::Builder::new().prefix("tvb").tempdir_in("/tmp")?;
    let mut opts = BenchOptions::new(&img.kernel, &img.initrd, root.path());
    opts.rounds = rounds;
    opts.accel = accel;
    opts.probe_cache = std::path::PathBuf::from(cache);
    let report = bench::run(&opts, &mut |d, t| eprintln!("boot {d}/{t}")).await?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
