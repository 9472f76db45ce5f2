//! `telvirt bench ports`: two namespaces joined through the example wasm firewall in a
//! `telvirt serve` (host ports on veths) against the same two namespaces joined through a Linux
//! bridge with an equivalent nftables rule, alternating in one run.
//!
//! Owns the topology, the serve it starts, the trials and their figures: iperf3 TCP with
//! offloads off on every veth (and the kernel once more with its default offloads), a flood of
//! 64-byte UDP frames at full speed, and the no-drop and partial-drop rates (NDR, PDR). The
//! flood's generator and sink are host ports in this process, in the two end namespaces,
//! outside both paths. It must not measure anything inside serve, and it stops the firewall
//! while the kernel is measured (a busy-polling worker would take a core from the kernel).

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use serde::Serialize;
use telvirt_dataplane::bench::{FloodRun, HostEnd, RateSearch, flood, search_flood};

use crate::bench_cluster::{Api, embedded_api_process, upload_example};
use crate::bench_control::{BenchChild, percentile};
use crate::bench_failover::post_yaml;
use crate::bench_handover::{answer, poll_until};
use crate::cli::Output;
use crate::netns::{Netns, offloads, run, veth};
use crate::output;
use crate::progress::Progress;

/// Addresses of both set-ups: the client's and the server's ends.
const CLIENT_IP: &str = "10.205.0.1";
const SERVER_IP: &str = "10.205.0.2";
/// The MACs the flood's frames carry (`telvirt_dataplane::packet::write_test_frame`), so the
/// bridge forwards them to the server's port (it learned the address) instead of flooding, and
/// the server's kernel takes them in (and drops them: 10.0.1.1 is not its address).
const CLIENT_MAC: &str = "02:00:00:00:00:01";
const SERVER_MAC: &str = "02:00:00:00:00:02";
/// iperf3's port; the deny rule of both paths names `DENIED_PORT`, which the check at the
/// start proves blocked on each path.
const TCP_PORT: u16 = 5201;
const DENIED_PORT: u16 = 5202;

#[derive(Args, Debug, Clone)]
pub struct PortsArgs {
    /// Rounds; each measures both paths, the first path alternating
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub rounds: u32,
    /// Seconds of each iperf3 TCP run
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=60))]
    pub seconds: u64,
    /// Frames of each full-speed flood
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1_000..=100_000_000))]
    pub flood_packets: u64,
    /// Bytes per flood frame as written (Ethernet, IPv4 and UDP headers and payload; no FCS)
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(64..=1514))]
    pub size: u64,
    /// Halvings of each NDR and PDR search; 0 skips the searches
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u32).range(0..=20))]
    pub search_steps: u32,
    /// How long each search trial offers its rate, in milliseconds
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(10..=60_000))]
    pub trial_ms: u64,
    /// How serve's host ports move frames (serve's `--host-port-socket`); the flood's own
    /// generator and sink ports always use AF_XDP (copy mode on veth: the kernel path forwards
    /// fastest with it)
    #[arg(long, value_enum, default_value_t = crate::cli::HostPortSocketArg::Auto)]
    pub host_port_socket: crate::cli::HostPortSocketArg,
}

/// One path in one round.
#[derive(Debug, Clone, Serialize)]
pub struct PathRun {
    /// iperf3 TCP, receiver's rate, Gbit/s.
    pub tcp_gbps: f64,
    /// The full-speed flood.
    pub flood: FloodRun,
    /// NDR and PDR (absent with `--search-steps 0`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub search: Option<RateSearch>,
}

/// Both paths in one round.
#[derive(Debug, Clone, Serialize)]
pub struct PortsRound {
    /// Which path went first (`telvirt` or `kernel`).
    pub first: &'static str,
    pub telvirt: PathRun,
    pub kernel: PathRun,
    /// iperf3 TCP through the bridge with the veths' default offloads (TSO, GSO, GRO,
    /// checksums), Gbit/s.
    pub kernel_offloads_gbps: f64,
}

/// What `bench ports` reports: medians over the rounds and their ratios telvirt / kernel.
#[derive(Debug, Clone, Serialize)]
pub struct PortsReport {
    pub telvirt_path: &'static str,
    /// How serve's host ports moved frames, as `net show` reports them (`af_xdp_copy`,
    /// `tpacket_v3`, ...).
    pub telvirt_host_port_socket: String,
    pub kernel_path: &'static str,
    pub telvirt_gbps: f64,
    pub kernel_gbps: f64,
    /// `telvirt_gbps / kernel_gbps` (offloads off on both).
    pub ratio: f64,
    pub kernel_offloads_gbps: f64,
    /// `telvirt_gbps / kernel_offloads_gbps`.
    pub ratio_to_offloads: f64,
    /// Full-speed flood, frames received per second, millions.
    pub telvirt_mpps: f64,
    pub kernel_mpps: f64,
    pub mpps_ratio: f64,
    /// NDR and PDR, millions of frames per second (0 without searches).
    pub telvirt_ndr_mpps: f64,
    pub kernel_ndr_mpps: f64,
    pub ndr_ratio: f64,
    pub telvirt_pdr_mpps: f64,
    pub kernel_pdr_mpps: f64,
    pub pdr_ratio: f64,
    pub frame_bytes: u64,
    pub goal_tcp_ratio_ge_1: bool,
    pub goal_mpps_ratio_ge_1: bool,
    pub rounds: Vec<PortsRound>,
}

/// The namespaces of both paths; deleted (with every veth) on drop.
struct Topology {
    /// telvirt's client and server; their veths' outer ends are in this namespace, named as
    /// the namespaces, where serve opens them as host ports.
    tv: [Netns; 2],
    /// The kernel's client and server, and the middle namespace with the bridge.
    k: [Netns; 2],
    km: Netns,
}

impl Topology {
    fn create(dir: &Path) -> Result<Self> {
        let tag = std::process::id() % 100_000;
        let t = Topology {
            tv: [
                Netns::create(&format!("tvpc{tag}"))?,
                Netns::create(&format!("tvps{tag}"))?,
            ],
            k: [
                Netns::create(&format!("tvkc{tag}"))?,
                Netns::create(&format!("tvks{tag}"))?,
            ],
            km: Netns::create(&format!("tvkm{tag}"))?,
        };
        for ns in &t.tv {
            veth(None, &ns.name, ns, "eth0")?;
        }
        let ip = crate::cluster::ip;
        let km = &t.km.name;
        ip(&["-n", km, "link", "add", "br0", "type", "bridge"])?;
        for (ns, port) in t.k.iter().zip(["c1", "s1"]) {
            veth(Some(&t.km), port, ns, "eth0")?;
            ip(&["-n", km, "link", "set", port, "master", "br0"])?;
        }
        ip(&["-n", km, "link", "set", "br0", "up"])?;
        for [client, server] in [&t.tv, &t.k] {
            for (ns, mac, addr) in [
                (client, CLIENT_MAC, CLIENT_IP),
                (server, SERVER_MAC, SERVER_IP),
            ] {
                ip(&["-n", &ns.name, "link", "set", "eth0", "address", mac])?;
                ip(&[
                    "-n",
                    &ns.name,
                    "addr",
                    "add",
                    &format!("{addr}/24"),
                    "dev",
                    "eth0",
                ])?;
            }
        }
        // The firewall's rule, as nftables says it: bridged IPv4 TCP to the server's port
        // DENIED_PORT is dropped, everything else crosses.
        let rules = dir.join("bridge.nft");
        std::fs::write(
            &rules,
            format!(
                "table bridge telvirt_bench {{\n  chain forward {{\n    type filter hook forward priority 0; policy accept;\n    ip daddr {SERVER_IP} tcp dport {DENIED_PORT} drop\n  }}\n}}\n"
            ),
        )?;
        let rules = rules.to_string_lossy().into_owned();
        run(&mut t.km.command("nft", &["-f", &rules]))?;
        Ok(t)
    }

    /// The kernel path's veths (both ends of both) with offloads `on` or off.
    fn kernel_offloads(&self, on: bool) -> Result<()> {
        for (ns, port) in self.k.iter().zip(["c1", "s1"]) {
            offloads(Some(&self.km), port, on)?;
            offloads(Some(ns), "eth0", on)?;
        }
        Ok(())
    }
}

/// Why `bench ports` cannot run here, if it cannot.
fn missing() -> Option<String> {
    if let Some(why) = crate::bench_failover::tcp_missing() {
        return Some(why);
    }
    let nft = std::process::Command::new("nft").arg("--version").output();
    if nft.is_err() {
        return Some("the kernel baseline needs nft (apt-get install nftables)".into());
    }
    None
}

/// A one-shot iperf3 server on `port` in `ns`, once it listens; started again should one end
/// before it listens (what it said then is in the error if none listens within 10 s).
fn iperf3_server(ns: &Netns, port: u16) -> Result<BenchChild> {
    let p = port.to_string();
    let spawn = || -> Result<BenchChild> {
        Ok(BenchChild(
            ns.command("iperf3", &["-s", "-1", "-p", &p])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .context("starting an iperf3 server")?,
        ))
    };
    let filter = format!("sport = :{port}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut child = spawn()?;
    let mut ended = String::new();
    loop {
        let listens = ns
            .command("ss", &["-ltnH", &filter])
            .output()
            .is_ok_and(|o| !o.stdout.is_empty());
        if listens {
            return Ok(child);
        }
        if let Some(status) = child.0.try_wait().context("watching the iperf3 server")? {
            let mut said = String::new();
            if let Some(mut err) = child.0.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut err, &mut said);
            }
            ended = format!(" (it ended {status}: {})", said.trim());
            child = spawn()?;
        }
        if std::time::Instant::now() >= deadline {
            bail!(
                "the iperf3 server on port {port} in {} did not listen within 10 s{ended}",
                ns.name
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// iperf3 TCP from `client` to the server for `seconds`: the receiver's Gbit/s, or the error
/// iperf3 reported.
fn iperf3_tcp(client: &Netns, port: u16, seconds: u64, connect_ms: u64) -> Result<f64> {
    let (p, t, c) = (
        port.to_string(),
        seconds.to_string(),
        connect_ms.to_string(),
    );
    let out = client
        .command(
            "iperf3",
            &[
                "-c",
                SERVER_IP,
                "-p",
                &p,
                "-t",
                &t,
                "-J",
                "--connect-timeout",
                &c,
            ],
        )
        .output()
        .context("running the iperf3 client")?;
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "iperf3 -J printed no report: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })?;
    if let Some(e) = report["error"].as_str() {
        bail!("iperf3 to {SERVER_IP}:{port}: {e}");
    }
    report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9)
        .context("the iperf3 report has no end.sum_received.bits_per_second")
}

/// Runs `fut` to completion from this blocking benchmark (it runs under `block_in_place`).
fn block_on<F: std::future::Future>(fut: F) -> F::Output {
    tokio::runtime::Handle::current().block_on(fut)
}

/// The checks before any figure: the client reaches the server (ping, which also teaches the
/// bridge both addresses) and TCP to `DENIED_PORT` is dropped, so the rule really is in the
/// path.
fn check_path(name: &str, client: &Netns, server: &Netns) -> Result<()> {
    block_on(poll_until(
        Duration::from_secs(30),
        &format!("ping through {name}"),
        || async {
            client
                .command("ping", &["-c", "1", "-W", "1", SERVER_IP])
                .output()
                .is_ok_and(|o| o.status.success())
        },
    ))?;
    let _denied = iperf3_server(server, DENIED_PORT)?;
    match iperf3_tcp(client, DENIED_PORT, 1, 1000) {
        Err(e) if e.to_string().contains("timed out") => Ok(()),
        Err(e) => bail!("TCP to the denied port through {name} failed otherwise than dropped: {e}"),
        Ok(_) => bail!(
            "TCP to the denied port {DENIED_PORT} crossed {name}: its rule is not in the path"
        ),
    }
}

/// The serve, its API and the firewall between telvirt's two namespaces.
struct Serve {
    _process: crate::bench_handover::ControllerProcess,
    api: Api,
}

impl Serve {
    fn start(dir: &Path, t: &Topology, socket: crate::cli::HostPortSocketArg) -> Result<Self> {
        let socket = socket
            .to_possible_value()
            .context("every host port socket has a name")?;
        let (process, api) = block_on(embedded_api_process(
            dir,
            &crate::bench_handover::bench_http()?.build()?,
            "serve",
            &[
                "--host-name",
                "bench-ports",
                "--runtimes",
                "wasm",
                "--host-port-socket",
                socket.get_name(),
            ],
        ))?;
        let module = block_on(upload_example(&api, "firewall"))?;
        use telvirt_runtime_wasm::vnfs::{FirewallRule, firewall_blob_hex, fw_action};
        let deny = FirewallRule {
            src: [0; 4],
            dst: [10, 205, 0, 2],
            sport: 0,
            dport: DENIED_PORT,
            proto: 6,
            action: fw_action::DROP,
        };
        let blob = firewall_blob_hex(fw_action::CROSS, &[deny]);
        block_on(post_yaml(
            &api,
            "/v1/vnfs",
            format!(
                "apiVersion: telvirt/v1\nkind: Vnf\nmetadata: {{ name: fw }}\nspec:\n  runtime: wasm\n  cpu: {{ policy: dedicated, count: 1 }}\n  ports: [in, out]\n  wasm:\n    module: \"{module}\"\n    limits: {{ memory: 16MiB }}\n    config: {{ blob_hex: \"{blob}\" }}\n    maps:\n      - {{ name: rules, kind: hash, key_size: 16, value_size: 4, max_entries: 1024 }}\n"
            ),
        ))?;
        // Running before its network exists, so serve opens the host ports on its worker at
        // once (opened earlier, they would move there on a later pass).
        block_on(poll_until(
            Duration::from_secs(60),
            "the firewall to run",
            || async {
                api.json("/v1/vnfs/fw")
                    .await
                    .is_ok_and(|v| v["phase"] == "Running")
            },
        ))?;
        let [c, s] = [&t.tv[0].name, &t.tv[1].name];
        block_on(post_yaml(
            &api,
            "/v1/networks",
            format!(
                "apiVersion: telvirt/v1\nkind: Network\nmetadata: {{ name: ports }}\nspec:\n  links:\n    - host:{c} -> fw.in\n    - fw.out -> host:{s}\n    - host:{s} -> fw.out\n    - fw.in -> host:{c}\n"
            ),
        ))?;
        let serve = Serve {
            _process: process,
            api,
        };
        serve.wait_links()?;
        Ok(serve)
    }

    /// How serve's host ports move frames: the sockets `net show` reports, joined.
    fn host_port_socket(&self) -> Result<String> {
        let v = block_on(self.api.json("/v1/networks/ports"))?;
        let mut sockets: Vec<String> = v["status"]["host_ports"]
            .as_array()
            .context("the network reports no host ports")?
            .iter()
            .filter_map(|p| p["socket"].as_str().map(str::to_owned))
            .collect();
        sockets.sort();
        sockets.dedup();
        Ok(sockets.join(","))
    }

    /// Waits until the firewall runs and the network's four links are live.
    fn wait_links(&self) -> Result<()> {
        block_on(poll_until(
            Duration::from_secs(120),
            "the firewall's four links to be live",
            || async {
                self.api.json("/v1/networks/ports").await.is_ok_and(|v| {
                    v["status"]["links"]
                        .as_array()
                        .is_some_and(|l| l.len() == 4 && l.iter().all(|l| l["active"] == true))
                })
            },
        ))
    }

    /// Stops (`false`) or starts the firewall and waits until it has.
    fn firewall(&self, running: bool) -> Result<()> {
        let action = if running { "start" } else { "stop" };
        let _: serde_json::Value = block_on(answer(
            self.api
                .request(reqwest::Method::POST, &format!("/v1/vnfs/fw/{action}")),
        ))?;
        if running {
            return self.wait_links();
        }
        block_on(poll_until(
            Duration::from_secs(60),
            "the firewall to stop",
            || async {
                self.api
                    .json("/v1/vnfs/fw")
                    .await
                    .is_ok_and(|v| v["phase"] == "Stopped")
            },
        ))
    }
}

/// One path's trials in one round.
fn measure_path(
    args: &PortsArgs,
    client: &Netns,
    server: &Netns,
    step: &mut dyn FnMut(&str),
    name: &str,
) -> Result<PathRun> {
    step(&format!("{name} TCP"));
    let tcp_gbps = {
        let _server = iperf3_server(server, TCP_PORT)?;
        iperf3_tcp(client, TCP_PORT, args.seconds, 3000)?
    };
    let tx = HostEnd {
        netns: Some(client.path()),
        ifname: "eth0".into(),
    };
    let rx = HostEnd {
        netns: Some(server.path()),
        ifname: "eth0".into(),
    };
    step(&format!("{name} flood"));
    let size = args.size as usize;
    let full = flood(&tx, &rx, size, None, args.flood_packets, &mut |_, _| {})?;
    let search = if args.search_steps == 0 {
        None
    } else {
        step(&format!("{name} NDR/PDR"));
        // Up to twice the full-speed rate, as `bench chain` searches.
        let hi = (full.mpps * 2e6).max(1.0) as u64;
        Some(search_flood(
            &tx,
            &rx,
            size,
            args.search_steps,
            args.trial_ms,
            hi,
        )?)
    };
    Ok(PathRun {
        tcp_gbps,
        flood: full,
        search,
    })
}

pub(crate) fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    percentile(&v, 0.5)
}

/// [`median`], or none when there are no values.
pub(crate) fn median_if_any(values: impl IntoIterator<Item = f64>) -> Option<f64> {
    let v: Vec<f64> = values.into_iter().collect();
    (!v.is_empty()).then(|| median(v.into_iter()))
}

pub(crate) fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { 0.0 }
}

fn run_ports(args: &PortsArgs, progress: &Progress) -> Result<PortsReport> {
    if let Some(why) = missing() {
        bail!("bench ports cannot run here: {why}");
    }
    let dir = crate::bench_control::scratch_dir("ports")?;
    let result = (|| {
        let t = Topology::create(&dir)?;
        progress.note("starting serve");
        let serve = Serve::start(&dir, &t, args.host_port_socket)?;
        let socket = serve.host_port_socket()?;
        check_path("the telvirt firewall", &t.tv[0], &t.tv[1])?;
        serve.firewall(false)?;
        check_path("the kernel bridge", &t.k[0], &t.k[1])?;
        let per_round = 2 * (2 + u64::from(args.search_steps > 0)) + 1;
        let total = u64::from(args.rounds) * per_round;
        let mut done = 0u64;
        let mut step = |what: &str| {
            progress.note(what);
            progress.update(done, total);
            done += 1;
        };
        let mut rounds = Vec::new();
        for round in 0..args.rounds {
            let telvirt_first = round % 2 == 0;
            let mut telvirt = None;
            let mut kernel = None;
            for on_telvirt in [telvirt_first, !telvirt_first] {
                if on_telvirt {
                    serve.firewall(true)?;
                    telvirt = Some(measure_path(
                        args, &t.tv[0], &t.tv[1], &mut step, "telvirt",
                    )?);
                    serve.firewall(false)?;
                } else {
                    kernel = Some(measure_path(args, &t.k[0], &t.k[1], &mut step, "kernel")?);
                }
            }
            step("kernel TCP, offloads on");
            t.kernel_offloads(true)?;
            let with_offloads = (|| {
                let _server = iperf3_server(&t.k[1], TCP_PORT)?;
                iperf3_tcp(&t.k[0], TCP_PORT, args.seconds, 3000)
            })();
            t.kernel_offloads(false)?;
            rounds.push(PortsRound {
                first: if telvirt_first { "telvirt" } else { "kernel" },
                telvirt: telvirt.context("telvirt's path was not measured")?,
                kernel: kernel.context("the kernel's path was not measured")?,
                kernel_offloads_gbps: with_offloads?,
            });
        }
        progress.update(total, total);
        Ok(report(args, socket, rounds))
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn report(args: &PortsArgs, socket: String, rounds: Vec<PortsRound>) -> PortsReport {
    let med = |f: &dyn Fn(&PortsRound) -> f64| median(rounds.iter().map(f));
    let rate = |s: &Option<RateSearch>, ndr: bool| {
        s.as_ref().map_or(0.0, |s| {
            (if ndr { s.ndr_pps } else { s.pdr_pps }) as f64 / 1e6
        })
    };
    let telvirt_gbps = med(&|r| r.telvirt.tcp_gbps);
    let kernel_gbps = med(&|r| r.kernel.tcp_gbps);
    let kernel_offloads_gbps = med(&|r| r.kernel_offloads_gbps);
    let telvirt_mpps = med(&|r| r.telvirt.flood.mpps);
    let kernel_mpps = med(&|r| r.kernel.flood.mpps);
    let telvirt_ndr_mpps = med(&|r| rate(&r.telvirt.search, true));
    let kernel_ndr_mpps = med(&|r| rate(&r.kernel.search, true));
    let telvirt_pdr_mpps = med(&|r| rate(&r.telvirt.search, false));
    let kernel_pdr_mpps = med(&|r| rate(&r.kernel.search, false));
    PortsReport {
        telvirt_path: "veth -> host port -> wasm firewall (cranelift, 1 deny rule) in telvirt serve -> host port -> veth",
        telvirt_host_port_socket: socket,
        kernel_path: "veth -> Linux bridge with an nftables bridge-family deny rule -> veth",
        ratio: ratio(telvirt_gbps, kernel_gbps),
        ratio_to_offloads: ratio(telvirt_gbps, kernel_offloads_gbps),
        mpps_ratio: ratio(telvirt_mpps, kernel_mpps),
        ndr_ratio: ratio(telvirt_ndr_mpps, kernel_ndr_mpps),
        pdr_ratio: ratio(telvirt_pdr_mpps, kernel_pdr_mpps),
        goal_tcp_ratio_ge_1: telvirt_gbps >= kernel_gbps,
        goal_mpps_ratio_ge_1: telvirt_mpps >= kernel_mpps,
        telvirt_gbps,
        kernel_gbps,
        kernel_offloads_gbps,
        telvirt_mpps,
        kernel_mpps,
        telvirt_ndr_mpps,
        kernel_ndr_mpps,
        telvirt_pdr_mpps,
        kernel_pdr_mpps,
        frame_bytes: args.size,
        rounds,
    }
}

pub fn ports_bench(format: Output, args: PortsArgs) -> Result<()> {
    let progress = Progress::new(format, "ports");
    let report = tokio::task::block_in_place(|| run_ports(&args, &progress))?;
    progress.finish();
    if output::report(format, &report)? {
        return Ok(());
    }
    let r = &report;
    println!(
        "telvirt: {} (host ports: {})",
        r.telvirt_path, r.telvirt_host_port_socket
    );
    println!("kernel (baseline): {}", r.kernel_path);
    let row = |name: &str, gbps: f64, mpps: Option<(f64, f64, f64)>| {
        let (m, n, p) = mpps.map_or(("-".into(), "-".into(), "-".into()), |(m, n, p)| {
            (format!("{m:.3}"), format!("{n:.3}"), format!("{p:.3}"))
        });
        vec![name.to_owned(), format!("{gbps:.2}"), m, n, p]
    };
    println!(
        "{}",
        output::table(
            &[
                "PATH (medians)",
                "TCP Gbit/s",
                "FLOOD Mpps",
                "NDR Mpps",
                "PDR Mpps"
            ],
            &[
                row(
                    "telvirt serve",
                    r.telvirt_gbps,
                    Some((r.telvirt_mpps, r.telvirt_ndr_mpps, r.telvirt_pdr_mpps))
                ),
                row(
                    "kernel bridge + nftables",
                    r.kernel_gbps,
                    Some((r.kernel_mpps, r.kernel_ndr_mpps, r.kernel_pdr_mpps))
                ),
                row("kernel, default offloads", r.kernel_offloads_gbps, None),
            ]
        )
    );
    let met = |ok: bool| if ok { "met" } else { "NOT met" };
    println!(
        "ratios telvirt / kernel: TCP {:.2} (to the kernel with offloads {:.2}), flood {:.2}, NDR {:.2}, PDR {:.2}; goals: TCP ratio >= 1 {}, flood ratio >= 1 {}",
        r.ratio,
        r.ratio_to_offloads,
        r.mpps_ratio,
        r.ndr_ratio,
        r.pdr_ratio,
        met(r.goal_tcp_ratio_ge_1),
        met(r.goal_mpps_ratio_ge_1)
    );
    Ok(())
}
