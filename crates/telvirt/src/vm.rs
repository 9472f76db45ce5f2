//! The vm runtime in the binary: building it for `telvirt serve` (guest agent binary, image
//! cache, accelerator), `telvirt image build`, `telvirt bench vm`, and the vm verbs of the CLI
//! (`vnf console`, `vnf attach`, `vnf detach`).
//!
//! Owns finding the static guest agent and the image cache, argument shapes of those commands
//! and printing their results. It must not hold runtime logic: `telvirt_agent::runtimes::vm`
//! and `telvirt_runtime_vm` do the work.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use reqwest::Method;
use telvirt_agent::runtimes::vm::{VmRuntime, VmRuntimeConfig, build_image};
use telvirt_model::{Device, Vnf};
use telvirt_runtime_vm::{AccelChoice, BenchOptions, GuestImage, bench};

use crate::cli::{HostAgentArgs, Output};
use crate::client::Client;
use crate::config::default_data_dir;
use crate::output;
use crate::progress::Progress;

/// Name of the static guest agent binary, looked for next to `telvirt`.
pub const GUEST_BIN: &str = "telvirt-guest";

/// `--accel` of `serve` and `bench vm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum AccelArg {
    /// KVM when a probe guest boots under it, else TCG with a warning
    #[default]
    Auto,
    Kvm,
    Tcg,
}

impl From<AccelArg> for AccelChoice {
    fn from(a: AccelArg) -> Self {
        match a {
            AccelArg::Auto => AccelChoice::Auto,
            AccelArg::Kvm => AccelChoice::Kvm,
            AccelArg::Tcg => AccelChoice::Tcg,
        }
    }
}

/// The static guest agent: `TELVIRT_GUEST_BIN`, else `telvirt-guest` next to this executable.
pub fn guest_binary() -> Result<PathBuf> {
    let path = match std::env::var_os("TELVIRT_GUEST_BIN").filter(|v| !v.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => std::env::current_exe()
            .context("cannot find this executable to look for telvirt-guest next to it")?
            .with_file_name(GUEST_BIN),
    };
    if !path.is_file() {
        bail!(
            "the static guest agent {} does not exist; build it with `make build` (or `cargo rustc -p telvirt-guest --release --bin telvirt-guest -- -C target-feature=+crt-static` and copy it next to telvirt), or set TELVIRT_GUEST_BIN",
            path.display()
        );
    }
    telvirt_runtime_vm::image::check_static(&path, "guest agent")
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(path)
}

/// Whether `program` is an executable file on PATH.
fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

/// Where the default guest image and the accelerator answer are cached.
fn image_cache(explicit: Option<&Path>, data_dir: &Path) -> PathBuf {
    explicit.map_or_else(|| data_dir.to_path_buf(), Path::to_path_buf)
}

/// How an agent's log begins the warning that it runs without its vm runtime.
pub const VM_RUNTIME_UNAVAILABLE: &str = "vm runtime unavailable";

/// The vm runtime of `telvirt serve`, or `None` (with a warning saying why, after
/// [`VM_RUNTIME_UNAVAILABLE`]) when this host cannot run it. The default image is built and the
/// accelerator resolved when the first vm VNF starts (a host that runs only wasm VNFs never
/// spends a CPU on either).
pub async fn vm_runtime(
    args: &HostAgentArgs,
    data_dir: &Path,
    dataplane: Arc<telvirt_agent::dataplane::NodeDataPlane>,
) -> Result<Option<Arc<VmRuntime>>> {
    // A `--qemu` path was checked at parse (a file).
    if args.qemu.is_none() && !on_path("qemu-system-x86_64") {
        tracing::warn!(
            "{VM_RUNTIME_UNAVAILABLE}: qemu-system-x86_64 is not on PATH (Debian: apt-get install qemu-system-x86)"
        );
        return Ok(None);
    }
    let guest = match guest_binary() {
        Ok(g) => g,
        Err(e) => {
            tracing::warn!("{VM_RUNTIME_UNAVAILABLE}: {e:#}");
            return Ok(None);
        }
    };
    let runtime = Arc::new(
        VmRuntime::new(VmRuntimeConfig {
            state_root: data_dir.join("instances"),
            cache_dir: image_cache(args.image_cache.as_deref(), data_dir),
            guest_binary: guest,
            accel: args.accel.into(),
            qemu: args.qemu.clone(),
            confinement: telvirt_runtime_vm::Confinement {
                sandbox: !args.no_qemu_sandbox,
                user: args.qemu_user.clone(),
            },
        })
        .with_dataplane(dataplane),
    );
    Ok(Some(runtime))
}

// ----- telvirt image -----

#[derive(Subcommand, Debug)]
pub enum ImageCommand {
    /// Build the default vm guest image (Debian cloud kernel, virtio modules, busybox, the
    /// static guest agent) into <cache>/images; a second build with the same inputs is a no-op
    Build(ImageArgs),
}

#[derive(Args, Debug)]
pub struct ImageArgs {
    /// Data dir of the node whose image to build [default: $XDG_DATA_HOME/telvirt or ~/.local/share/telvirt]
    #[arg(long, env = "TELVIRT_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Image cache directory [default: the data dir]
    #[arg(long, env = "TELVIRT_IMAGE_CACHE")]
    pub image_cache: Option<PathBuf>,
}

impl ImageArgs {
    /// The image cache these flags name: `--image-cache`, else the data dir.
    pub fn cache(&self) -> Result<PathBuf> {
        let data_dir = match &self.data_dir {
            Some(d) => d.clone(),
            None => default_data_dir()?,
        };
        Ok(image_cache(self.image_cache.as_deref(), &data_dir))
    }
}

async fn image_for(format: Output, args: &ImageArgs) -> Result<GuestImage> {
    let cache = args.cache()?;
    let guest = guest_binary()?;
    let progress = Arc::new(Progress::new(format, "image"));
    let bar = progress.clone();
    let image = build_image(cache, guest, move |p| bar.update(p.step, p.total)).await;
    progress.finish();
    image.map_err(|e| anyhow::anyhow!("{e}"))
}

pub async fn image(format: Output, cmd: ImageCommand) -> Result<()> {
    match cmd {
        ImageCommand::Build(args) => {
            let image = image_for(format, &args).await?;
            if format == Output::Json {
                println!("{}", serde_json::to_string(&image)?);
                return Ok(());
            }
            if output::structured(format, &image)? {
                return Ok(());
            }
            println!(
                "guest image {} ({})",
                image.digest,
                if image.cached {
                    "already built"
                } else {
                    "built"
                }
            );
            println!(
                "kernel  {} ({})",
                image.kernel.display(),
                image.kernel_version
            );
            println!("initrd  {}", image.initrd.display());
            println!("modules {}", image.modules.join(" "));
        }
    }
    Ok(())
}

// ----- telvirt bench vm -----

#[derive(Args, Debug)]
pub struct VmBenchArgs {
    /// Rounds; each boots the default guest once through telvirt and once with a bare QEMU
    #[arg(long, default_value_t = 5)]
    pub rounds: u32,
    #[arg(long, value_enum, default_value_t = AccelArg::Auto)]
    pub accel: AccelArg,
    /// Guest RAM in MiB
    #[arg(long, default_value_t = 256)]
    pub memory_mib: u64,
    #[command(flatten)]
    pub image: ImageArgs,
}

#[derive(Args, Debug)]
pub struct VmMigrateBenchArgs {
    /// Rounds; each migrates the guest once with telvirt's tuning and once with QEMU's defaults
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub rounds: u32,
    #[arg(long, value_enum, default_value_t = AccelArg::Auto)]
    pub accel: AccelArg,
    /// Guest RAM in MiB
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u64).range(128..=65_536))]
    pub memory_mib: u64,
    /// Memory the guest's agent keeps dirtying, MiB (less than the guest's RAM)
    #[arg(long, default_value_t = 256)]
    pub dirty_mib: u64,
    /// Dirty rates to measure, MiB/s, comma-separated (0: an idle guest)
    #[arg(long, value_delimiter = ',', default_values_t = [0, 50, 200])]
    pub rates: Vec<u64>,
    /// A migration not done within this many seconds is cancelled and counts as not converged
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub deadline_s: u64,
    /// The QEMU both ends run (telvirt's tuning follows its version) [default:
    /// qemu-system-x86_64 on PATH]
    #[arg(long, value_name = "PATH", value_parser = crate::cli::parse_qemu)]
    pub qemu: Option<PathBuf>,
    #[command(flatten)]
    pub image: ImageArgs,
}

/// A ratio, or `-` when there is none (0: the two sides were not comparable).
fn ratio_cell(ratio: f64) -> String {
    if ratio > 0.0 {
        format!("{ratio:.2}")
    } else {
        "-".to_owned()
    }
}

/// `telvirt bench vm-migrate` (called from the synchronous bench dispatcher).
pub fn bench_vm_migrate(format: Output, args: VmMigrateBenchArgs) -> Result<()> {
    if args.dirty_mib >= args.memory_mib {
        anyhow::bail!(
            "--dirty-mib {} must be less than --memory-mib {} (the guest's kernel needs some of its RAM)",
            args.dirty_mib,
            args.memory_mib
        );
    }
    use telvirt_runtime_vm::migrate_bench::{MigrateBenchOptions, run};
    let (_scratch, mut guest) = bench_guest_blocking(
        format,
        &args.image,
        (args.rounds, args.accel, args.memory_mib),
    )?;
    if let Some(q) = &args.qemu {
        guest.qemu.clone_from(q);
    }
    let opts = MigrateBenchOptions {
        guest,
        dirty_mib: args.dirty_mib,
        rates: args.rates.clone(),
        deadline: std::time::Duration::from_secs(args.deadline_s),
    };
    let progress = Progress::new(format, "migrating");
    let bench = async {
        run(&opts, &mut |d, t| progress.update(d, t))
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))
    };
    let Some(report) = progress.run_bench(format, bench)? else {
        return Ok(());
    };
    println!("measured: {}", report.measured);
    let side = |f: &telvirt_runtime_vm::migrate_bench::TuningFigures| {
        vec![
            format!("{}/{}", f.converged, report.rounds),
            format!("{}/{}", f.intact, f.converged),
            format!("{:.0}", f.total_ms),
            format!("{:.0}", f.downtime_ms),
            format!("{:.1}", f.paused_ms),
            format!("{:.0}", f.transferred_mib),
        ]
    };
    let mut rows = Vec::new();
    for r in &report.rates {
        for (who, f) in [
            ("telvirt", &r.telvirt),
            ("QEMU defaults (baseline)", &r.qemu_defaults),
        ] {
            let mut row = vec![format!("{} MiB/s", r.dirty_mib_per_s), who.to_owned()];
            row.extend(side(f));
            rows.push(row);
        }
        rows.push(vec![
            String::new(),
            "ratio telvirt / defaults".into(),
            String::new(),
            String::new(),
            ratio_cell(r.total_ratio),
            ratio_cell(r.downtime_ratio),
            ratio_cell(r.paused_ratio),
            String::new(),
        ]);
    }
    println!(
        "{}",
        output::table(
            &[
                "DIRTY",
                "TUNING",
                "CONVERGED",
                "INTACT",
                "TOTAL ms",
                "DOWNTIME ms",
                "PAUSED ms",
                "SENT MiB"
            ],
            &rows
        )
    );
    Ok(())
}

/// `telvirt bench vm` (called from the synchronous bench dispatcher). Interrupted, the
/// guests it started stop and its scratch directory goes.
pub fn bench_vm(format: Output, args: VmBenchArgs) -> Result<()> {
    let (_scratch, opts) = bench_guest_blocking(
        format,
        &args.image,
        (args.rounds, args.accel, args.memory_mib),
    )?;
    let progress = Progress::new(format, "booting");
    let bench = async {
        bench::run(&opts, &mut |d, t| progress.update(d, t))
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))
    };
    let Some(report) = progress.run_bench(format, bench)? else {
        return Ok(());
    };
    print_boot_report(&report)
}

/// [`bench_guest`] from the synchronous bench dispatcher, in a scratch root of its own (gone
/// when the returned directory is dropped), with the rounds, accelerator and RAM (MiB) given.
fn bench_guest_blocking(
    format: Output,
    image: &ImageArgs,
    (rounds, accel, memory_mib): (u32, AccelArg, u64),
) -> Result<(tempfile::TempDir, BenchOptions)> {
    let scratch = scratch_dir("tvb")?;
    let opts = tokio::task::block_in_place(|| {
        tokio::runtime::Handle::current().block_on(bench_guest(
            format,
            image,
            scratch.path(),
            rounds,
            accel,
            memory_mib,
        ))
    })?;
    Ok((scratch, opts))
}

/// The guest a vm benchmark boots (the default image, built or found), its rounds,
/// accelerator and RAM, in the scratch root `scratch`.
pub(crate) async fn bench_guest(
    format: Output,
    image: &ImageArgs,
    scratch: &std::path::Path,
    rounds: u32,
    accel: AccelArg,
    memory_mib: u64,
) -> Result<BenchOptions> {
    let built = image_for(format, image).await?;
    let mut opts = BenchOptions::new(&built.kernel, &built.initrd, scratch);
    opts.rounds = rounds;
    opts.accel = accel.into();
    opts.memory_mib = memory_mib;
    opts.probe_cache = image.cache()?;
    Ok(opts)
}

/// `bench vm`'s table.
fn print_boot_report(report: &bench::VmBenchReport) -> Result<()> {
    println!(
        "vm boot to guest-agent ready: {} rounds, {}, {} MiB guest",
        report.rounds, report.accel, report.guest_ram_mib
    );
    println!(
        "{}",
        output::table(
            &["START", "MEDIAN ms", "SAMPLES ms"],
            &[
                vec![
                    "telvirt (validate, QMP, pin, cont)".into(),
                    format!("{:.0}", report.telvirt_boot_ms),
                    samples(&report.telvirt_samples_ms),
                ],
                vec![
                    "bare qemu (baseline)".into(),
                    format!("{:.0}", report.bare_boot_ms),
                    samples(&report.bare_samples_ms),
                ],
            ]
        )
    );
    println!(
        "ratio telvirt / bare: {:.2} (paired {:.2}, overhead {:+.1} %)",
        report.ratio, report.paired_ratio, report.overhead_pct
    );
    println!(
        "QEMU RSS after ready: {:.0} MiB, of which {:.0} MiB outside guest RAM",
        report.rss_mib, report.rss_overhead_mib
    );
    Ok(())
}

fn samples(v: &[f64]) -> String {
    v.iter()
        .map(|s| format!("{s:.0}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A short scratch dir in /tmp named `prefix...` (unix socket paths under it are limited to
/// ~100 bytes), new and for this user alone (a name another user could have made first would
/// let them plant sockets and links in it); removed when dropped.
pub(crate) fn scratch_dir(prefix: &str) -> Result<tempfile::TempDir> {
    use std::os::unix::fs::PermissionsExt;
    tempfile::Builder::new()
        .prefix(prefix)
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir()
        .context("cannot create a scratch dir")
}

// ----- telvirt vnf console / attach / detach -----

#[derive(Args, Debug)]
pub struct ConsoleArgs {
    pub name: String,
    /// Last lines to show (1 to 10000)
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub lines: u32,
}

/// Shows a vm VNF's serial console, read on the host it runs on (through its agent).
pub async fn console(client: &Client, format: Output, args: ConsoleArgs) -> Result<()> {
    let lines: Vec<String> = client
        .get(&format!(
            "/v1/vnfs/{}/console?lines={}",
            args.name, args.lines
        ))
        .await?;
    let value = serde_json::json!({ "name": args.name, "lines": lines });
    if !output::structured(format, &value)? {
        for line in lines {
            println!("{line}");
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeviceKind {
    Rng,
    Net,
    Serial,
    Blk,
}

#[derive(Args, Debug)]
pub struct AttachArgs {
    /// The VNF
    #[arg(value_name = "NAME")]
    pub vnf: String,
    /// Device id, unique per VNF
    #[arg(long)]
    pub id: String,
    #[arg(long, value_enum)]
    pub kind: DeviceKind,
    /// Host TAP device (--kind net)
    #[arg(long, required_if_eq("kind", "net"))]
    pub tap: Option<String>,
    /// Port name in the guest (--kind serial)
    #[arg(long = "name", required_if_eq("kind", "serial"))]
    pub port_name: Option<String>,
    /// Backing file on the node (--kind blk)
    #[arg(long, required_if_eq("kind", "blk"))]
    pub path: Option<PathBuf>,
    /// Read-only disk (--kind blk)
    #[arg(long)]
    pub read_only: bool,
}

fn device_body(args: &AttachArgs) -> Result<serde_json::Value> {
    let device = match args.kind {
        DeviceKind::Rng => Device::Rng,
        DeviceKind::Net => Device::Net {
            tap: args.tap.clone().context("--kind net needs --tap")?,
        },
        DeviceKind::Serial => Device::Serial {
            name: args
                .port_name
                .clone()
                .context("--kind serial needs --name")?,
        },
        DeviceKind::Blk => {
            let path = args.path.clone().context("--kind blk needs --path")?;
            let path = std::path::absolute(&path)
                .with_context(|| format!("cannot make {} absolute", path.display()))?;
            Device::Blk {
                path: path.to_string_lossy().into_owned(),
                read_only: args.read_only,
            }
        }
    };
    // The id is checked by the server (its answer names the rule); send it as typed.
    let mut body = serde_json::to_value(&device)?;
    if let Some(map) = body.as_object_mut() {
        map.insert("id".into(), serde_json::Value::String(args.id.clone()));
    }
    Ok(body)
}

pub async fn attach(client: &Client, format: Output, args: AttachArgs) -> Result<()> {
    let body = serde_json::to_vec(&device_body(&args)?)?;
    let vnf: Vnf = client
        .call(
            Method::POST,
            &format!("/v1/vnfs/{}/devices", args.vnf),
            Some((body, "application/json")),
        )
        .await?
        .json()?;
    if !output::structured(format, &vnf)? {
        println!(
            "vnf/{} device {} granted; the agent attaches it to the running VM",
            vnf.name, args.id
        );
    }
    Ok(())
}

pub async fn detach(client: &Client, format: Output, name: &str, id: &str) -> Result<()> {
    let vnf: Vnf = client
        .call(
            Method::DELETE,
            &format!("/v1/vnfs/{name}/devices/{id}"),
            None,
        )
        .await?
        .json()?;
    if !output::structured(format, &vnf)? {
        println!("vnf/{name} device {id} revoked; the agent detaches it from the running VM");
    }
    Ok(())
}
