//! `telvirt wasm ...`: the wasm runtime's local tools, and building the wasm runtime adapter for
//! `telvirt serve`.
//!
//! Owns writing the built-in example modules out, loading the node's wasm security policy, and
//! wiring the agent's wasm adapter to the node's data plane and state dir. It must not hold
//! runtime logic (that is `telvirt-runtime-wasm`'s and the agent's).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Subcommand;
use telvirt_agent::dataplane::NodeDataPlane;
use telvirt_agent::network::NetworkReconciler;
use telvirt_agent::runtimes::wasm::WasmRuntime;

use reqwest::Method;
use telvirt_agent::NodeHandler;
use telvirt_api::{NodeReply, NodeRequest, VcpuUsage, VmUsage, VnfUsage};
use telvirt_controller::Controller;
use telvirt_controller::modules::{ModuleRepository, ModuleVerifier};
use telvirt_model::api::{
    LogLineView, MapChangeRequest, MapChangeResult, MapEntry, MapView, ModuleInfo, NicStatsView,
    VnfLogs, VnfStatsView,
};
use telvirt_model::{Name, Vnf};
use telvirt_runtime_wasm::SecurityPolicy;

use crate::cli::Output;
use crate::client::Client;

/// How long `vnf stats` waits for a vm guest's agent to give its own counters.
const GUEST_STATS_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

#[derive(Subcommand, Debug)]
pub enum WasmCommand {
    /// Write the built-in example modules (firewall.wasm, nat.wasm, gtpu.wasm) into a directory
    Examples {
        /// Directory to write into (created if missing)
        #[arg(long, default_value = "examples/vnfs")]
        out: PathBuf,
    },
    /// Verify a .wasm module offline, as the node does at upload: bytecode, manifest, and the
    /// permissions of a security domain
    Verify {
        /// The .wasm file
        file: PathBuf,
        /// Security domain to check the manifest's permissions against
        #[arg(long, default_value = telvirt_model::api::DEFAULT_AUTHORITY_DOMAIN)]
        domain: String,
        /// Security policy file (YAML or JSON) [default: the built-in policy]
        #[arg(long)]
        security_policy: Option<PathBuf>,
    },
}

pub fn run(format: Output, cmd: WasmCommand) -> Result<()> {
    match cmd {
        WasmCommand::Examples { out } => {
            let written = write_examples(&out)?;
            if !crate::output::structured(format, &written)? {
                for w in &written {
                    println!("wrote {w}");
                }
            }
        }
        WasmCommand::Verify {
            file,
            domain,
            security_policy,
        } => {
            let policy = match security_policy {
                None => SecurityPolicy::default(),
                Some(path) => read_policy(&path)?,
            };
            crate::modules::verify(format, &file, &domain, &policy)?;
        }
    }
    Ok(())
}

/// Writes every example module as `<dir>/<name>.wasm`; returns the paths written.
pub fn write_examples(dir: &Path) -> Result<Vec<String>> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut written = Vec::new();
    for (name, wasm) in telvirt_agent::runtimes::wasm::example_modules() {
        let path = dir.join(format!("{name}.wasm"));
        std::fs::write(&path, wasm).with_context(|| format!("cannot write {}", path.display()))?;
        written.push(path.display().to_string());
    }
    Ok(written)
}

/// The wasm security policy of `--security-policy FILE` (YAML or JSON), else the built-in one.
pub fn load_policy(path: Option<&Path>) -> Result<SecurityPolicy> {
    match path {
        None => Ok(SecurityPolicy::default()),
        Some(path) => read_policy(path),
    }
}

/// The controller's side of the node's wasm policy: its domains (what authorities may be
/// given), and uploads kept in `<data_dir>/modules` after the checks a start applies.
pub fn control_wasm(
    controller: &Controller,
    data_dir: &Path,
    policy: &SecurityPolicy,
) -> Result<()> {
    controller
        .set_security_domains(policy.domains.keys().cloned())
        .map_err(|e| anyhow::anyhow!("security policy: {e}"))?;
    controller.set_module_repository(ModuleRepository::new(
        data_dir.join("modules"),
        Arc::new(UploadVerifier(policy.clone())),
    ));
    Ok(())
}

/// A security policy file (YAML, or JSON by extension).
fn read_policy(path: &Path) -> Result<SecurityPolicy> {
    let text = std::fs::read(path)
        .with_context(|| format!("cannot read security policy {}", path.display()))?;
    let format = if path.extension().is_some_and(|e| e == "json") {
        telvirt_model::Format::Json
    } else {
        telvirt_model::Format::Yaml
    };
    telvirt_model::from_text(&text, format)
        .map_err(|e| anyhow::anyhow!("security policy {}: {e}", path.display()))
}

/// A host agent's wasm runtime: modules compiled under `<data_dir>/wasm`, map snapshots under
/// `<data_dir>/snapshots`, relative module paths resolved against the working directory,
/// uploaded modules read from `module_dir` (the controller's on the all-in-one node, the agent's
/// cache otherwise), VNFs placed on `dataplane`, modules checked against `policy`.
pub fn runtime(
    data_dir: &Path,
    module_dir: &Path,
    dataplane: Arc<NodeDataPlane>,
    policy: SecurityPolicy,
    fencing: Arc<telvirt_agent::fencing::Fencing>,
) -> Result<Arc<WasmRuntime>> {
    let cwd = std::env::current_dir().context("reading the working directory")?;
    let rt = WasmRuntime::with_options(
        data_dir.join("wasm"),
        cwd,
        dataplane,
        policy,
        Some(data_dir.join("snapshots")),
    )
    .map_err(|e| anyhow::anyhow!("starting the wasm runtime: {e}"))?
    .with_module_dir(module_dir)
    .with_fencing(fencing);
    Ok(Arc::new(rt))
}

/// The node's verdict on an uploaded module: the same checks a start applies.
struct UploadVerifier(SecurityPolicy);

impl ModuleVerifier for UploadVerifier {
    fn verify(&self, bytes: &[u8], domain: &str) -> Result<ModuleInfo, Vec<String>> {
        telvirt_agent::runtimes::wasm::verify_module(bytes, domain, &self.0)
    }
}

/// What answers the node calls the controller routes to this host: the wasm runtime (maps,
/// counters, upgrades), the vm instances' directory (serial consoles) and the data plane's
/// networks (status, latency probes).
pub struct HostNodeHandler {
    pub wasm: Arc<WasmRuntime>,
    /// The vm runtime, when this host offers it.
    pub vm: Option<Arc<telvirt_agent::runtimes::vm::VmRuntime>>,
    /// `<data dir>/instances`: a vm VNF's console log is `<instances>/<name>/console.log`.
    pub instances: PathBuf,
    pub networks: Arc<NetworkReconciler>,
}

impl HostNodeHandler {
    fn answer(&self, request: &NodeRequest) -> Result<NodeReply, String> {
        match request {
            NodeRequest::NetworkStatus { network } => {
                return Ok(NodeReply::NetworkStatus {
                    status: self.networks.status(network),
                });
            }
            NodeRequest::Probe { network, probe } => {
                let resolved = probe.resolve(network).map_err(|e| e.to_string())?;
                let report = self
                    .networks
                    .probe(network, &resolved)
                    .map_err(|e| e.to_string())?;
                return Ok(NodeReply::Latency { report });
            }
            NodeRequest::Capture { network, slice } => {
                let chunk = self
                    .networks
                    .capture(network, slice)
                    .map_err(|e| e.to_string())?;
                return Ok(NodeReply::Capture { chunk });
            }
            NodeRequest::Usage => return Ok(NodeReply::Usage { vnfs: self.usage() }),
            _ => {}
        }
        let vnf = request.vnf().unwrap_or_default();
        let name: Name = vnf.parse().map_err(|e| format!("{e}"))?;
        let rt = &self.wasm;
        Ok(match request {
            NodeRequest::Maps { .. } => NodeReply::Maps {
                maps: rt.map_views(&name).map_err(|e| e.to_string())?,
            },
            NodeRequest::MapChange { map, change, .. } => rt.change_map(&name, map, change),
            NodeRequest::Stats { .. } => NodeReply::Stats {
                stats: rt.stats_view(&name).map_err(|e| e.to_string())?,
            },
            NodeRequest::NicStats { .. } => NodeReply::NicStats {
                nics: self.nic_stats(&name)?,
                guest: self.guest_net(&name),
            },
            NodeRequest::Logs { after, .. } => NodeReply::Logs {
                logs: rt.logs_view(&name, *after).map_err(|e| e.to_string())?,
            },
            NodeRequest::Upgrade { module, from, .. } => NodeReply::Upgraded {
                hash: rt
                    .upgrade(&name, module, from.as_deref())
                    .map_err(|e| e.to_string())?,
            },
            NodeRequest::Console { lines, .. } => {
                let log = self.instances.join(name.as_str()).join("console.log");
                if !log.is_file() {
                    return Err(format!(
                        "vnf {name} has no console log on this host yet (its VM has not started here)"
                    ));
                }
                let n = usize::try_from(*lines).unwrap_or(usize::MAX);
                NodeReply::Console {
                    lines: telvirt_runtime_vm::manager::console_tail(&log, n),
                }
            }
            NodeRequest::NetworkStatus { .. }
            | NodeRequest::Probe { .. }
            | NodeRequest::Capture { .. }
            | NodeRequest::Usage => {
                return Err("a network call reached the VNF calls' handler".to_owned());
            }
        })
    }
}

impl HostNodeHandler {
    /// The counters of vm VNF `name`'s NICs here (none: a VM without NICs on the data plane).
    fn nic_stats(&self, name: &Name) -> Result<Vec<NicStatsView>, String> {
        if let Some(nics) = self.vm.as_ref().and_then(|vm| vm.nic_stats(name)) {
            return Ok(nics);
        }
        match telvirt_runtime_vm::manager::running_pid(
            &self.instances.join(name.as_str()),
            name.as_str(),
        ) {
            Some(_) => Ok(Vec::new()),
            None => Err(format!("vnf {name} has no running VM on this host")),
        }
    }

    /// What vm VNF `name`'s guest counts on its own interfaces, asked of its agent (`None`: no
    /// VM of that name here, or its agent did not answer within [`GUEST_STATS_WAIT`]). Runs on
    /// a blocking thread (node calls do), so it may wait for the runtime.
    fn guest_net(&self, name: &Name) -> Option<telvirt_model::api::GuestNetView> {
        let vm = self.vm.as_ref()?;
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        let health = runtime
            .block_on(async { vm.handle(name).await?.health(GUEST_STATS_WAIT).await.ok() })?;
        // A guest agent older than these counters names no interface: unknown, not zero.
        if health.nics.is_empty() {
            return None;
        }
        Some(telvirt_model::api::GuestNetView {
            nics: health
                .nics
                .into_iter()
                .map(|n| telvirt_model::api::GuestNicView {
                    name: n.name,
                    rx_packets: n.rx_packets,
                    tx_packets: n.tx_packets,
                    rx_dropped: n.rx_dropped,
                    tx_dropped: n.tx_dropped,
                    rx_errors: n.rx_errors,
                    tx_errors: n.tx_errors,
                    qdisc_dropped: n.qdisc_dropped,
                    qdisc_queued: n.qdisc_queued,
                })
                .collect(),
            backlog_dropped: health.backlog_dropped,
            kernel_drops: health
                .kernel_drops
                .map(|d| telvirt_model::api::GuestKernelDropsView {
                    untraced: d.untraced,
                    sites: d
                        .sites
                        .into_iter()
                        .map(|s| telvirt_model::api::GuestDropView {
                            function: s.function,
                            reason: s.reason,
                            count: s.count,
                        })
                        .collect(),
                    elsewhere: d.elsewhere,
                }),
        })
    }

    /// Every VNF on this host: a wasm instance's counters, a running QEMU's use of the host.
    fn usage(&self) -> Vec<VnfUsage> {
        let mut out: Vec<VnfUsage> = self
            .wasm
            .instance_names()
            .into_iter()
            .filter_map(|name| {
                Some(VnfUsage {
                    vnf: name.to_string(),
                    wasm: Some(self.wasm.stats_view(&name).ok()?),
                    vm: None,
                    nics: Vec::new(),
                })
            })
            .collect();
        for entry in std::fs::read_dir(&self.instances)
            .into_iter()
            .flatten()
            .flatten()
        {
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if let Some(u) = telvirt_runtime_vm::usage::vm_usage(&entry.path(), &name) {
                let nics = name
                    .parse::<Name>()
                    .ok()
                    .and_then(|n| self.vm.as_ref()?.nic_stats(&n))
                    .unwrap_or_default();
                out.push(VnfUsage {
                    vnf: name,
                    wasm: None,
                    nics,
                    vm: Some(VmUsage {
                        rss_bytes: u.rss_bytes,
                        cpu_ns: u.cpu_ns,
                        vcpus: u
                            .vcpus
                            .into_iter()
                            .map(|v| VcpuUsage {
                                index: v.index,
                                run_ns: v.run_ns,
                                wait_ns: v.wait_ns,
                            })
                            .collect(),
                    }),
                });
            }
        }
        out
    }
}

impl NodeHandler for HostNodeHandler {
    fn handle(&self, request: &NodeRequest) -> NodeReply {
        self.answer(request)
            .unwrap_or_else(|reason| NodeReply::Failed { reason })
    }
}

/// `telvirt vnf logs NAME [-f]`: a wasm module's log lines, or a vm VNF's console; following
/// asks for what came after the last line shown every 500 ms until interrupted (or until the
/// VNF cannot be read any more, which ends it with that error).
pub async fn logs(client: &Client, format: Output, name: &str, follow: bool) -> Result<()> {
    let vnf: telvirt_model::Vnf = client.get(&format!("/v1/vnfs/{name}")).await?;
    let wasm = vnf.descriptor.spec.runtime == telvirt_model::RuntimeKind::Wasm;
    let mut last: Option<u64> = None;
    let mut console: Vec<String> = Vec::new();
    loop {
        if wasm {
            let after = last.unwrap_or(0);
            let logs: VnfLogs = client
                .get(&format!("/v1/vnfs/{name}/logs?after={after}"))
                .await?;
            // A restarted instance counts from 1 again: show its lines from the start.
            if logs.latest < after {
                last = None;
                continue;
            }
            if !follow && crate::output::structured(format, &logs)? {
                return Ok(());
            }
            for l in &logs.lines {
                print_log_line(format, l)?;
                last = Some(l.seq);
            }
            last = last.or(Some(after));
        } else {
            let tail: Vec<String> = client
                .get(&format!("/v1/vnfs/{name}/console?lines=200"))
                .await?;
            // What is new: the lines after the last one already shown, if it is still there.
            let start = console
                .last()
                .and_then(|seen| tail.iter().rposition(|l| l == seen))
                .map_or(0, |i| i + 1);
            for line in &tail[start..] {
                match format {
                    Output::Table | Output::Wide => println!("{line}"),
                    _ => println!("{}", serde_json::json!({ "line": line })),
                }
            }
            console = tail;
        }
        if !follow {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

fn print_log_line(format: Output, l: &LogLineView) -> Result<()> {
    match format {
        Output::Table | Output::Wide => println!(
            "{:>6} {:>12.6}s L{} {}",
            l.seq,
            l.at_ns as f64 / 1e9,
            l.level,
            l.text
        ),
        _ => println!("{}", serde_json::to_string(l)?),
    }
    Ok(())
}

/// `telvirt vnf stats NAME`: a wasm VNF's counters, or a vm VNF's NICs'.
pub async fn stats(client: &Client, format: Output, name: &str) -> Result<()> {
    let view: VnfStatsView = client.get(&format!("/v1/vnfs/{name}/stats")).await?;
    if crate::output::structured(format, &view)? {
        return Ok(());
    }
    let s = match view {
        VnfStatsView::Wasm(s) => s,
        VnfStatsView::Vm(vm) => {
            print_nic_stats(name, &vm.nics);
            print_guest_net(name, vm.guest.as_ref());
            return Ok(());
        }
    };
    let mut rows: Vec<Vec<String>> = [
        ("batches", s.batches),
        ("packets_in", s.packets_in),
        ("packets_forwarded", s.packets_forwarded),
        ("packets_dropped", s.packets_dropped),
        ("batches_trapped", s.batches_trapped),
        ("batch_errors", s.batch_errors),
        ("invalid_verdicts", s.invalid_verdicts),
        ("packets_emitted", s.packets_emitted),
        ("packets_unlinked", s.packets_unlinked),
        ("restarts", u64::from(s.restarts)),
    ]
    .iter()
    .map(|(k, v)| vec!["runtime".to_owned(), (*k).to_owned(), v.to_string()])
    .collect();
    rows.extend(
        s.counters
            .iter()
            .map(|c| vec!["module".to_owned(), c.name.clone(), c.value.to_string()]),
    );
    println!(
        "{}",
        crate::output::table(&["FROM", "COUNTER", "VALUE"], &rows)
    );
    Ok(())
}

/// A vm VNF's guest's own interfaces as a table (what it dropped inside).
fn print_guest_net(name: &str, guest: Option<&telvirt_model::api::GuestNetView>) {
    let Some(g) = guest else {
        println!(
            "inside the guest: no counters (vnf {name}'s guest agent did not answer within {} s, or predates them)",
            GUEST_STATS_WAIT.as_secs()
        );
        return;
    };
    let rows: Vec<Vec<String>> = g
        .nics
        .iter()
        .map(|n| {
            vec![
                n.name.clone(),
                n.rx_packets.to_string(),
                n.tx_packets.to_string(),
                format!("{} / {}", n.rx_dropped, n.rx_errors),
                format!("{} / {}", n.tx_dropped, n.tx_errors),
                match (n.qdisc_dropped, n.qdisc_queued) {
                    (Some(d), Some(q)) => format!("{d} / {q}"),
                    _ => "-".to_owned(),
                },
            ]
        })
        .collect();
    println!(
        "Inside the guest, as its kernel counts (input backlog dropped {}):",
        g.backlog_dropped
    );
    println!(
        "{}",
        crate::output::table(
            &[
                "IF",
                "RX",
                "TX",
                "RX DROPPED / ERRORS",
                "TX DROPPED / ERRORS",
                "QDISC DROPPED / QUEUED"
            ],
            &rows
        )
    );
    print_kernel_drops(g.kernel_drops.as_ref());
}

/// Where and why a guest's kernel dropped buffers, a row per site.
fn print_kernel_drops(drops: Option<&telvirt_model::api::GuestKernelDropsView>) {
    let Some(d) = drops else {
        println!("dropped by the guest's kernel: not recorded (its guest agent predates it)");
        return;
    };
    if let Some(why) = &d.untraced {
        println!("dropped by the guest's kernel: not traced ({why})");
        return;
    }
    if d.sites.is_empty() {
        println!("dropped by the guest's kernel: nothing since its agent started");
        return;
    }
    let mut rows: Vec<Vec<String>> = d
        .sites
        .iter()
        .map(|s| vec![s.function.clone(), s.reason.clone(), s.count.to_string()])
        .collect();
    if d.elsewhere > 0 {
        rows.push(vec![
            "(elsewhere)".to_owned(),
            "-".to_owned(),
            d.elsewhere.to_string(),
        ]);
    }
    println!("Dropped by the guest's kernel since its agent started, by where and why:");
    println!(
        "{}",
        crate::output::table(&["FUNCTION", "REASON", "BUFFERS"], &rows)
    );
}

/// A vm VNF's NICs as a table, one row each.
fn print_nic_stats(name: &str, nics: &[NicStatsView]) {
    if nics.is_empty() {
        println!(
            "vnf {name} has no NICs open on its host's data plane (none in spec.vm.nics, or the host could not open them: its agent's log says why)"
        );
        return;
    }
    let rows: Vec<Vec<String>> = nics
        .iter()
        .map(|n| {
            vec![
                n.port.clone(),
                if n.connected { "yes" } else { "no" }.to_owned(),
                n.frames_to_guest.to_string(),
                n.frames_from_guest.to_string(),
                n.dropped().to_string(),
                n.connections.to_string(),
            ]
        })
        .collect();
    println!(
        "{}",
        crate::output::table(
            &[
                "NIC",
                "CONNECTED",
                "TO GUEST",
                "FROM GUEST",
                "DROPPED",
                "CONNECTIONS"
            ],
            &rows
        )
    );
}

/// `telvirt vnf maps NAME`.
pub async fn maps(client: &Client, format: Output, name: &str) -> Result<()> {
    let maps: Vec<MapView> = client.get(&format!("/v1/vnfs/{name}/maps")).await?;
    if !crate::output::structured(format, &maps)? {
        let rows: Vec<Vec<String>> = maps
            .iter()
            .map(|m| {
                vec![
                    m.name.clone(),
                    m.kind.clone(),
                    m.entries.to_string(),
                    m.max_entries.to_string(),
                ]
            })
            .collect();
        println!(
            "{}",
            crate::output::table(&["MAP", "KIND", "ENTRIES", "MAX"], &rows)
        );
    }
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct MapUpdateArgs {
    pub name: String,
    /// The map (`telvirt vnf maps NAME` lists them)
    pub map: String,
    /// An entry to insert or replace, key and value in hex (repeatable)
    #[arg(long = "put", value_name = "KEY=VALUE")]
    pub put: Vec<String>,
    /// A key to remove, in hex (repeatable; removed before the entries are put)
    #[arg(long = "delete", value_name = "KEY")]
    pub delete: Vec<String>,
    /// More of the change from a JSON or YAML file: `{"delete": [KEY...], "put": [{"key":
    /// KEY, "value": VALUE}...]}` (at most 65,536 keys and entries in all)
    #[arg(long, short = 'f', value_name = "FILE")]
    pub file: Option<std::path::PathBuf>,
}

/// `telvirt vnf map-update NAME MAP [--put KEY=VALUE]... [--delete KEY]... [-f FILE]`.
pub async fn map_update(client: &Client, format: Output, args: MapUpdateArgs) -> Result<()> {
    let mut change = match &args.file {
        Some(path) => {
            let text =
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            telvirt_model::from_text::<MapChangeRequest>(&text, telvirt_model::Format::sniff(&text))
                .with_context(|| format!("{}", path.display()))?
        }
        None => MapChangeRequest::default(),
    };
    change.delete.extend(args.delete);
    for (i, entry) in args.put.iter().enumerate() {
        let Some((key, value)) = entry.split_once('=') else {
            anyhow::bail!(
                "--put {entry} (number {}): expected KEY=VALUE, both in hex",
                i + 1
            );
        };
        change.put.push(MapEntry {
            key: key.to_owned(),
            value: value.to_owned(),
        });
    }
    let body = serde_json::to_vec(&change)?;
    let done: MapChangeResult = client
        .call(
            Method::POST,
            &format!("/v1/vnfs/{}/maps/{}/entries", args.name, args.map),
            Some((body, "application/json")),
        )
        .await?
        .json()?;
    if !crate::output::structured(format, &done)? {
        println!(
            "{}",
            crate::output::table(
                &["MAP", "DELETED", "PUT", "ENTRIES"],
                &[vec![
                    done.map.clone(),
                    done.deleted.to_string(),
                    done.put.to_string(),
                    done.entries.to_string(),
                ]],
            )
        );
    }
    Ok(())
}

/// `telvirt vnf upgrade NAME --module FILE`.
pub async fn upgrade(client: &Client, format: Output, name: &str, module: &str) -> Result<()> {
    let body = serde_json::to_vec(&serde_json::json!({ "module": module }))?;
    let vnf: Vnf = client
        .call(
            Method::POST,
            &format!("/v1/vnfs/{name}/upgrade"),
            Some((body, "application/json")),
        )
        .await?
        .json()?;
    if !crate::output::structured(format, &vnf)? {
        println!(
            "vnf/{name} upgraded: {}",
            vnf.reason.as_deref().unwrap_or("module swapped")
        );
    }
    Ok(())
}
