//! `telvirt cluster up|down`: a cluster laid out on this one machine.
//!
//! Owns starting and stopping what such a cluster is made of: a loopback etcd, several
//! `telvirt controller` processes sharing it, and per host a network namespace (joined to a
//! bridge in the root namespace by a veth pair) with its own inventory, node credential and
//! `telvirt agent`. Everything it creates is recorded in `<dir>/cluster.json` as it goes, so
//! `down` (or a failed `up` undoing itself) removes exactly that. It must not hold
//! control-plane logic: the processes it starts are ordinary `telvirt controller` and
//! `telvirt agent` processes, reached through the public API like any other.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Subcommand, ValueEnum};
use reqwest::Method;
use serde::{Deserialize, Serialize};
use telvirt_model::api::HostView;
use telvirt_sched::{CpuList, HostSpec, Inventory, NumaNodeSpec, SocketSpec, TopologySpec};
use telvirt_store::local_etcd::LocalEtcd;

use crate::cli::Output;
use crate::client::Client;
use crate::config::{CLIENT_CONFIG, ClientConfig};
use crate::progress::Progress;

/// The record of a cluster in its directory: what `down` removes.
const RECORD: &str = "cluster.json";
/// Hosts' subnets are `10.77.<k>.0/24`, one free `k` per cluster.
const SUBNET_PREFIX: &str = "10.77";
/// Where each agent serves its health, on its namespace's address.
const AGENT_HEALTH_PORT: u16 = 7071;
/// How long the controllers may take to elect a leader.
const LEADER_PATIENCE: Duration = Duration::from_secs(30);
/// How long the hosts may take to turn Ready.
const READY_PATIENCE: Duration = Duration::from_secs(60);
/// How long a process may take to exit after SIGTERM (then SIGKILL), and after SIGKILL.
const STOP_PATIENCE: Duration = Duration::from_secs(10);
/// How often starting processes are polled.
const POLL: Duration = Duration::from_millis(100);
/// How long a process's command line may read empty while it execs before it counts as
/// another program's.
const EXEC_PATIENCE: Duration = Duration::from_secs(2);
/// Environment variables that would send the cluster's own loopback and bridge traffic to a
/// proxy: removed from the processes `up` starts.
const PROXY_VARS: [&str; 6] = [
    "http_proxy",
    "HTTP_PROXY",
    "https_proxy",
    "HTTPS_PROXY",
    "all_proxy",
    "ALL_PROXY",
];

#[derive(Subcommand, Debug)]
pub enum ClusterCommand {
    /// Start etcd, the controllers and one agent per host (a network namespace)
    Up(UpArgs),
    /// Stop and remove everything `cluster up` created
    Down(DownArgs),
}

#[derive(Args, Debug)]
pub struct UpArgs {
    /// Hosts to lay out (h1..hN), each a network namespace with its own agent
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub hosts: u32,
    /// Controllers sharing the etcd store (one leads, the others forward to it)
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=7))]
    pub controllers: u32,
    /// Where the cluster keeps its record, data and logs [default: <data dir>/cluster]
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Each host's inventory: `slice` gives each host a share of this machine's CPUs (and pins
    /// its agent there); `fake` gives each a made-up 4-core topology (placement on paper)
    #[arg(long, value_enum, default_value_t = InventoryMode::Slice)]
    pub inventory_mode: InventoryMode,
    /// How long a host stays Ready after its agent's last heartbeat, in milliseconds (the
    /// controllers' --host-lease-ttl-ms; the leader notices a silent agent by its own clock, so
    /// it may be shorter than etcd's one-second lease; agents send a heartbeat every quarter
    /// of it)
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(200..=600_000))]
    pub host_lease_ttl_ms: u64,
    #[command(flatten)]
    pub agents: crate::control_threads::AgentPriorityArgs,
}

#[derive(Args, Debug)]
pub struct DownArgs {
    /// The cluster's directory, as given to `up` [default: <data dir>/cluster]
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Also delete the directory: data, logs, credentials
    #[arg(long)]
    pub purge: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InventoryMode {
    Slice,
    Fake,
}

/// A process `up` started.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ProcessRecord {
    pid: u32,
    log: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct EtcdRecord {
    endpoint: String,
    #[serde(flatten)]
    process: ProcessRecord,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ControllerRecord {
    url: String,
    #[serde(flatten)]
    process: ProcessRecord,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct HostEntry {
    name: String,
    namespace: String,
    /// The veth's end in the root namespace (its peer lives in the namespace).
    veth: String,
    /// The host's address inside its namespace.
    address: String,
    inventory: PathBuf,
    inventory_kind: InventoryMode,
    /// The CPUs its inventory lists.
    cpus: String,
    token_file: PathBuf,
    data_dir: PathBuf,
    log: PathBuf,
    /// The agent's health endpoint.
    health: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pid: Option<u32>,
}

/// Everything a cluster is made of, written to `<dir>/cluster.json` as it is created.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ClusterRecord {
    id: String,
    dir: PathBuf,
    /// `starting` while `up` runs (or when it was interrupted), then `up`.
    state: String,
    subnet: String,
    /// The bridge joining the hosts' veths in the root namespace, when created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    bridge: Option<String>,
    /// The bridge's address: where the controllers listen.
    bridge_address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    etcd: Option<EtcdRecord>,
    controllers: Vec<ControllerRecord>,
    client_config: PathBuf,
    hosts: Vec<HostEntry>,
}

impl ClusterRecord {
    fn save(&self) -> Result<()> {
        Ok(telvirt_files::write_atomic(
            &self.dir.join(RECORD),
            &serde_json::to_vec_pretty(self)?,
        )?)
    }

    fn read(path: &Path) -> Result<Self> {
        let bytes = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        serde_json::from_slice(&bytes)
            .with_context(|| format!("{} is not a cluster record", path.display()))
    }
}

/// What `up` prints with `-o json`.
#[derive(Serialize)]
struct UpView<'a> {
    #[serde(flatten)]
    record: &'a ClusterRecord,
    leader: String,
    note: String,
}

/// What taking a cluster down did, item by item.
#[derive(Debug, Default, Serialize)]
struct Removal {
    /// Stopped or deleted now.
    removed: Vec<String>,
    /// Recorded, but already gone (exited, deleted by hand, or never created by a failed `up`).
    gone: Vec<String>,
    /// Still there: it could not be stopped or deleted, with the reason.
    failed: Vec<String>,
}

/// What `down` prints with `-o json`.
#[derive(Serialize)]
struct DownView {
    dir: PathBuf,
    #[serde(flatten)]
    removal: Removal,
}

pub async fn run(command: ClusterCommand, format: Output) -> Result<()> {
    match command {
        ClusterCommand::Up(args) => up(args, format).await,
        ClusterCommand::Down(args) => down(args, format).await,
    }
}

/// `--dir`, else `<data dir>/cluster`, as an absolute path.
fn cluster_dir(dir: Option<PathBuf>) -> Result<PathBuf> {
    let dir = match dir {
        Some(d) => d,
        None => match std::env::var_os("TELVIRT_DATA_DIR").filter(|v| !v.is_empty()) {
            Some(d) => PathBuf::from(d).join("cluster"),
            None => crate::config::default_data_dir()?.join("cluster"),
        },
    };
    std::path::absolute(&dir).with_context(|| format!("--dir {}", dir.display()))
}

pub(crate) fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

async fn up(args: UpArgs, format: Output) -> Result<()> {
    let dir = cluster_dir(args.dir)?;
    let record_path = dir.join(RECORD);
    if record_path.exists() {
        bail!(
            "a cluster is up in {} ({} records it); take it down first with `telvirt cluster down --dir {}`",
            dir.display(),
            record_path.display(),
            dir.display()
        );
    }
    if !is_root() {
        bail!(
            "telvirt cluster up must run as root: it creates network namespaces, a bridge and veth pairs (CAP_SYS_ADMIN, CAP_NET_ADMIN)"
        );
    }
    if !Path::new(telvirt_store::local_etcd::ETCD).exists() {
        bail!(
            "{} is missing: install Debian's etcd-server package (scripts/deps.sh does)",
            telvirt_store::local_etcd::ETCD
        );
    }
    let exe = std::env::current_exe().context("finding the telvirt binary")?;
    let cpus = online_cpus()?;
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot restrict {}", dir.display()))?;
    let (id, k) = choose_id_and_subnet()?;
    let mut record = ClusterRecord {
        id: id.clone(),
        dir: dir.clone(),
        state: "starting".into(),
        subnet: format!("{SUBNET_PREFIX}.{k}.0/24"),
        bridge: None,
        bridge_address: format!("{SUBNET_PREFIX}.{k}.1"),
        etcd: None,
        controllers: Vec::new(),
        client_config: dir.join("control").join(CLIENT_CONFIG),
        hosts: Vec::new(),
    };
    record.save()?;
    let progress = Progress::new(format, "cluster up");
    let plan = Plan {
        exe,
        hosts: args.hosts,
        controllers: args.controllers,
        mode: args.inventory_mode,
        host_lease_ttl_ms: args.host_lease_ttl_ms,
        control: args.agents,
        cpus,
    };
    let started = tokio::select! {
        started = bring_up(&mut record, &plan, &progress) => started,
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
    };
    progress.finish();
    let leader = match started {
        Ok(leader) => leader,
        Err(e) => {
            let removal = teardown(&record).await;
            let undone = if removal.failed.is_empty() {
                let _ = fs::remove_file(&record_path);
                "everything it had started was removed".to_owned()
            } else {
                format!(
                    "could not remove {}; `telvirt cluster down --dir {}` tries again",
                    removal.failed.join("; "),
                    record.dir.display()
                )
            };
            return Err(e.context(format!("cluster up failed ({undone})")));
        }
    };
    record.state = "up".into();
    record.save()?;
    let note = inventory_note(&plan, &record);
    let view = UpView {
        record: &record,
        leader: leader.clone(),
        note,
    };
    if !crate::output::report(format, &view)? {
        print_up(&view);
    }
    Ok(())
}

/// What `up` was asked for.
struct Plan {
    exe: PathBuf,
    hosts: u32,
    controllers: u32,
    mode: InventoryMode,
    host_lease_ttl_ms: u64,
    /// The agents' `--control-priority` and `--control-nice`.
    control: crate::control_threads::AgentPriorityArgs,
    /// This machine's online CPUs.
    cpus: Vec<u32>,
}

/// A process started by `up`, with what tells it failed.
struct Started {
    child: Child,
    what: String,
    log: PathBuf,
}

impl Started {
    /// An error naming the process and its log when it has exited.
    fn check(&mut self) -> Result<()> {
        if let Ok(Some(status)) = self.child.try_wait() {
            bail!(
                "{} exited ({status}); its log {}:\n{}",
                self.what,
                self.log.display(),
                telvirt_files::last_lines(&self.log, 20)
            );
        }
        Ok(())
    }
}

/// Starts everything, recording each piece as it is created; the leader's URL.
async fn bring_up(record: &mut ClusterRecord, plan: &Plan, progress: &Progress) -> Result<String> {
    let steps = 4 + u64::from(plan.hosts);
    let mut done = 0;
    progress.update(done, steps);
    let dir = record.dir.clone();

    // etcd, outliving this command (in a session of its own).
    let etcd = LocalEtcd::start(&dir.join("etcd"), false).await;
    let etcd = etcd.map_err(|e| anyhow!("{e}"))?;
    let endpoint = etcd.endpoint();
    let store = etcd.store_url("/telvirt");
    let pid = etcd
        .detach()
        .context("etcd exited as soon as it answered")?;
    record.etcd = Some(EtcdRecord {
        endpoint,
        process: ProcessRecord {
            pid,
            log: dir.join("etcd").join("etcd.log"),
        },
    });
    record.save()?;
    done += 1;
    progress.update(done, steps);

    // The bridge the hosts' veths join; the controllers listen on its address.
    let bridge = format!("tv{}br", record.id);
    ip(&["link", "add", &bridge, "type", "bridge"])?;
    record.bridge = Some(bridge.clone());
    record.save()?;
    ip(&[
        "addr",
        "add",
        &format!("{}/24", record.bridge_address),
        "dev",
        &bridge,
    ])?;
    ip(&["link", "set", &bridge, "up"])?;
    done += 1;
    progress.update(done, steps);

    // The controllers.
    let control = dir.join("control");
    fs::create_dir_all(&control).with_context(|| format!("cannot create {}", control.display()))?;
    // One certificate for every controller (they all listen on the bridge's address): clients,
    // agents and the controllers forwarding to their leader pin it.
    let (cert, key) = cluster_certificate(&control, &record.bridge_address)?;
    let mut started = Vec::new();
    for c in 1..=plan.controllers {
        let port = free_port(&record.bridge_address)?;
        let listen = format!("{}:{port}", record.bridge_address);
        let log = dir.join(format!("controller{c}.log"));
        let mut command = Command::new(&plan.exe);
        command
            .arg("controller")
            .args(["--store", &store])
            .args(["--listen", &listen])
            .arg("--tls-cert")
            .arg(&cert)
            .arg("--tls-key")
            .arg(&key)
            .args(["--host-lease-ttl-ms", &plan.host_lease_ttl_ms.to_string()])
            .arg("--data-dir")
            .arg(&control)
            .env("TELVIRT_LOG", "info");
        let child = spawn_detached(command, &log, None)?;
        record.controllers.push(ControllerRecord {
            url: format!("https://{listen}"),
            process: ProcessRecord {
                pid: child.id(),
                log: log.clone(),
            },
        });
        record.save()?;
        started.push(Started {
            child,
            what: format!("controller {c} (https://{listen})"),
            log,
        });
    }
    let leader = wait_for_leader(record, &mut started).await?;
    let config = ClientConfig::read(&record.client_config)?;
    let client = Client::new(config)?;
    done += 1;
    progress.update(done, steps);

    // The hosts.
    let controllers = record
        .controllers
        .iter()
        .map(|c| c.url.as_str())
        .collect::<Vec<_>>()
        .join(",");
    for i in 1..=plan.hosts {
        let host = add_host(record, plan, &client, &controllers, i).await?;
        started.push(host);
        done += 1;
        progress.update(done, steps);
    }
    wait_until_ready(record, &client, &mut started).await?;
    progress.update(steps, steps);
    Ok(leader)
}

/// Lays out host `h<i>`: namespace, veth, credential, inventory, agent.
async fn add_host(
    record: &mut ClusterRecord,
    plan: &Plan,
    client: &Client,
    controllers: &str,
    i: u32,
) -> Result<Started> {
    let name = format!("h{i}");
    let namespace = format!("tv-{}-{name}", record.id);
    let veth = format!("tv{}{name}", record.id);
    let peer = format!("{veth}n");
    let address = format!(
        "{}.{}",
        record
            .bridge_address
            .rsplit_once('.')
            .map_or("", |(n, _)| n),
        i + 1
    );
    let host_dir = record.dir.join(&name);
    fs::create_dir_all(&host_dir)
        .and_then(|()| fs::set_permissions(&host_dir, fs::Permissions::from_mode(0o700)))
        .with_context(|| format!("cannot create {}", host_dir.display()))?;
    let (inventory_text, cpus) = inventory(plan, i, &name)?;
    let entry = HostEntry {
        name: name.clone(),
        namespace: namespace.clone(),
        veth: veth.clone(),
        address: address.clone(),
        inventory: host_dir.join("inventory.yaml"),
        inventory_kind: plan.mode,
        cpus: CpuList::from_cpus(cpus.iter().copied()).to_string(),
        token_file: host_dir.join("token"),
        data_dir: host_dir.join("data"),
        log: host_dir.join("agent.log"),
        health: format!("http://{address}:{AGENT_HEALTH_PORT}/v1/healthz"),
        pid: None,
    };

    ip(&["netns", "add", &namespace])?;
    record.hosts.push(entry.clone());
    record.save()?;
    ip(&[
        "link", "add", &veth, "type", "veth", "peer", "name", &peer, "netns", &namespace,
    ])?;
    ip(&[
        "link",
        "set",
        &veth,
        "master",
        record.bridge.as_deref().unwrap_or(""),
        "up",
    ])?;
    ip(&["-n", &namespace, "link", "set", "lo", "up"])?;
    ip(&[
        "-n",
        &namespace,
        "addr",
        "add",
        &format!("{address}/24"),
        "dev",
        &peer,
    ])?;
    ip(&["-n", &namespace, "link", "set", &peer, "up"])?;

    let issued: telvirt_controller::nodes::NodeCredential = client
        .call(Method::POST, &format!("/v1/hosts/{name}/credential"), None)
        .await
        .with_context(|| format!("issuing host {name}'s node credential"))?
        .json()?;
    crate::config::write_private(&entry.token_file, format!("{}\n", issued.token).as_bytes())?;
    fs::write(&entry.inventory, inventory_text)
        .with_context(|| format!("cannot write {}", entry.inventory.display()))?;

    let mut command = Command::new("ip");
    command
        .args(["netns", "exec", &namespace])
        .arg(&plan.exe)
        .arg("agent")
        .args(["--controller", controllers])
        .arg("--controller-ca")
        .arg(
            record
                .client_config
                .with_file_name(crate::tls::TLS_DIR)
                .join(crate::tls::CERT_FILE),
        )
        // The hosts share this machine's cores: no worker takes one for itself.
        .arg("--no-busy-poll")
        .arg("--token-file")
        .arg(&entry.token_file)
        .args(["--host-name", &name])
        .arg("--inventory")
        .arg(&entry.inventory)
        .arg("--data-dir")
        .arg(&entry.data_dir)
        .args(["--health-listen", &format!("{address}:{AGENT_HEALTH_PORT}")])
        .args(["--tunnel-address", &address.to_string()])
        .args([
            "--heartbeat-interval-ms",
            &(plan.host_lease_ttl_ms / 4).to_string(),
        ])
        .env("TELVIRT_LOG", "info");
    crate::control_threads::pass_to_agent(&mut command, plan.control);
    let pin = (plan.mode == InventoryMode::Slice).then_some(cpus.as_slice());
    let child = spawn_detached(command, &entry.log, pin)?;
    if let Some(h) = record.hosts.last_mut() {
        h.pid = Some(child.id());
    }
    record.save()?;
    Ok(Started {
        child,
        what: format!("the agent of host {name} (namespace {namespace})"),
        log: entry.log,
    })
}

/// The controllers' certificate and key in `<control>/tls`, made for `address` (and loopback).
fn cluster_certificate(control: &Path, address: &str) -> Result<(PathBuf, PathBuf)> {
    let tls = control.join(crate::tls::TLS_DIR);
    fs::create_dir_all(&tls).with_context(|| format!("cannot create {}", tls.display()))?;
    let (cert_pem, key_pem) = crate::tls::self_signed(&[
        address.to_owned(),
        "127.0.0.1".to_owned(),
        "localhost".to_owned(),
    ])?;
    let (cert, key) = (
        tls.join(crate::tls::CERT_FILE),
        tls.join(crate::tls::KEY_FILE),
    );
    crate::tls::write_identity(&cert, &key, &cert_pem, &key_pem)?;
    Ok((cert, key))
}

/// Polls every controller's `GET /v1/leader` until one leads; its URL.
async fn wait_for_leader(record: &ClusterRecord, started: &mut [Started]) -> Result<String> {
    let cert = record
        .client_config
        .with_file_name(crate::tls::TLS_DIR)
        .join(crate::tls::CERT_FILE);
    let http = crate::tls::http_client_from(Some(&cert))?
        .no_proxy()
        .timeout(Duration::from_secs(2))
        .build()?;
    let deadline = Instant::now() + LEADER_PATIENCE;
    loop {
        for s in started.iter_mut() {
            s.check()?;
        }
        for c in &record.controllers {
            let answer = http.get(format!("{}/v1/leader", c.url)).send().await;
            if let Ok(answer) = answer
                && let Ok(v) = answer.json::<serde_json::Value>().await
                && v["role"] == "leader"
            {
                return Ok(c.url.clone());
            }
        }
        if Instant::now() >= deadline {
            bail!(
                "no controller led within {}s; see their logs ({})",
                LEADER_PATIENCE.as_secs(),
                record
                    .controllers
                    .iter()
                    .map(|c| c.process.log.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Polls `GET /v1/hosts` until every host of `record` is Ready.
async fn wait_until_ready(
    record: &ClusterRecord,
    client: &Client,
    started: &mut [Started],
) -> Result<()> {
    let deadline = Instant::now() + READY_PATIENCE;
    loop {
        for s in started.iter_mut() {
            s.check()?;
        }
        let ready: BTreeSet<String> = match client.get::<Vec<HostView>>("/v1/hosts").await {
            Ok(hosts) => hosts
                .into_iter()
                .filter(|h| h.ready)
                .map(|h| h.name)
                .collect(),
            Err(_) => BTreeSet::new(),
        };
        let waiting: Vec<&HostEntry> = record
            .hosts
            .iter()
            .filter(|h| !ready.contains(&h.name))
            .collect();
        if waiting.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "hosts not Ready after {}s: {}",
                READY_PATIENCE.as_secs(),
                waiting
                    .iter()
                    .map(|h| format!("{} (log {})", h.name, h.log.display()))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Host `h<i>`'s inventory (YAML, checked by the scheduler) and the CPUs it lists.
fn inventory(plan: &Plan, i: u32, name: &str) -> Result<(String, Vec<u32>)> {
    let spec = match plan.mode {
        InventoryMode::Fake => HostSpec {
            name: name.to_owned(),
            topology: Some(TopologySpec {
                sockets: 1,
                cores_per_socket: 4,
                threads_per_core: 1,
                numa_nodes_per_socket: 1,
                memory_per_node: None,
            }),
            ..HostSpec::default()
        },
        InventoryMode::Slice => {
            let cpus = slice(&plan.cpus, plan.hosts, i);
            HostSpec {
                name: name.to_owned(),
                sockets: vec![SocketSpec {
                    id: 0,
                    numa_nodes: vec![NumaNodeSpec {
                        id: 0,
                        memory: None,
                        cores: cpus.iter().map(|c| CpuList::from_cpus([*c])).collect(),
                    }],
                }],
                ..HostSpec::default()
            }
        }
    };
    let cpus: Vec<u32> = spec
        .expanded_sockets()
        .map_err(|e| anyhow!("{e}"))?
        .iter()
        .flat_map(|s| s.numa_nodes.iter())
        .flat_map(|n| n.cores.iter())
        .flat_map(|c| c.cpus().to_vec())
        .collect();
    telvirt_sched::Scheduler::new(telvirt_sched::SchedConfig::default())
        .and_then(|mut s| s.add_host(spec.clone()))
        .map_err(|e| anyhow!("the inventory of host {name} is not accepted: {e}"))?;
    let header = match plan.mode {
        InventoryMode::Slice => format!(
            "# Host {name} of a cluster laid out by `telvirt cluster up`: its share of this machine's CPUs.\n"
        ),
        InventoryMode::Fake => format!(
            "# Host {name} of a cluster laid out by `telvirt cluster up`: a made-up 4-core topology (placement on paper).\n"
        ),
    };
    let yaml = yaml_serde::to_string(&Inventory { hosts: vec![spec] })?;
    Ok((format!("{header}{yaml}"), cpus))
}

/// Host `i`'s (1-based) share of `cpus` among `hosts`: contiguous and disjoint when there are
/// enough CPUs, otherwise one CPU each, shared round-robin.
fn slice(cpus: &[u32], hosts: u32, i: u32) -> Vec<u32> {
    let (n, hosts, i) = (cpus.len(), hosts as usize, i as usize - 1);
    if n == 0 {
        return Vec::new();
    }
    if hosts > n {
        return vec![cpus[i % n]];
    }
    let (base, extra) = (n / hosts, n % hosts);
    let start = i * base + i.min(extra);
    let len = base + usize::from(i < extra);
    cpus[start..start + len].to_vec()
}

/// This machine's online CPUs.
fn online_cpus() -> Result<Vec<u32>> {
    let path = "/sys/devices/system/cpu/online";
    let text = fs::read_to_string(path).with_context(|| format!("cannot read {path}"))?;
    let list: CpuList = text.trim().parse().map_err(|e| anyhow!("{path}: {e}"))?;
    Ok(list.cpus().to_vec())
}

/// What the inventories mean here, said once in the output.
fn inventory_note(plan: &Plan, record: &ClusterRecord) -> String {
    let n = plan.cpus.len();
    match plan.mode {
        InventoryMode::Slice if plan.hosts as usize > n => format!(
            "this machine has {n} CPU(s) for {} hosts: hosts share CPUs (each host's inventory lists one CPU, round-robin), so two hosts may both hand out the same CPU; each agent is pinned to its host's CPUs; all hosts share this machine's memory",
            record.hosts.len()
        ),
        InventoryMode::Slice => format!(
            "this machine's {n} CPU(s) are split among the hosts (disjoint); each agent is pinned to its host's CPUs; all hosts share this machine's memory"
        ),
        InventoryMode::Fake => format!(
            "each host has a made-up 4-core inventory: placement is on paper; the data-plane workers still run on this machine's {n} real CPU(s), and a wasm VNF placed on a CPU this machine does not have does not start"
        ),
    }
}

fn print_up(view: &UpView<'_>) {
    let r = view.record;
    println!(
        "cluster {} is up in {} (hosts on {} behind bridge {} at {})",
        r.id,
        r.dir.display(),
        r.subnet,
        r.bridge.as_deref().unwrap_or("-"),
        r.bridge_address
    );
    if let Some(etcd) = &r.etcd {
        println!(
            "etcd         {} (pid {}, log {})",
            etcd.endpoint,
            etcd.process.pid,
            etcd.process.log.display()
        );
    }
    println!(
        "controllers  listen on the bridge address {}: reachable from this namespace and every host's, not from other machines",
        r.bridge_address
    );
    let rows: Vec<Vec<String>> = r
        .controllers
        .iter()
        .map(|c| {
            vec![
                c.url.clone(),
                if c.url == view.leader {
                    "leader"
                } else {
                    "follower"
                }
                .to_owned(),
                c.process.pid.to_string(),
                c.process.log.display().to_string(),
            ]
        })
        .collect();
    println!(
        "{}",
        crate::output::table(&["URL", "ROLE", "PID", "LOG"], &rows)
    );
    println!();
    let rows: Vec<Vec<String>> = r
        .hosts
        .iter()
        .map(|h| {
            vec![
                h.name.clone(),
                h.namespace.clone(),
                h.address.clone(),
                format!("{:?}", h.inventory_kind).to_lowercase(),
                h.cpus.clone(),
                h.pid.map_or("-".into(), |p| p.to_string()),
                h.log.display().to_string(),
            ]
        })
        .collect();
    println!(
        "{}",
        crate::output::table(
            &[
                "HOST",
                "NAMESPACE",
                "ADDRESS",
                "INVENTORY",
                "CPUS",
                "PID",
                "LOG"
            ],
            &rows
        )
    );
    println!();
    println!("note: {}", view.note);
    println!(
        "agents' health: http://<ADDRESS>:{AGENT_HEALTH_PORT}/v1/healthz; a shell on a host: ip netns exec <NAMESPACE> bash"
    );
    println!();
    println!("export TELVIRT_CONFIG={}", r.client_config.display());
    println!("telvirt host list");
    println!(
        "take it down: telvirt cluster down --dir {}",
        r.dir.display()
    );
}

async fn down(args: DownArgs, format: Output) -> Result<()> {
    let dir = cluster_dir(args.dir)?;
    let record_path = dir.join(RECORD);
    let mut view = DownView {
        dir: dir.clone(),
        removal: Removal::default(),
    };
    if record_path.exists() {
        if !is_root() {
            bail!("telvirt cluster down must run as root: it deletes network namespaces and links");
        }
        let record = ClusterRecord::read(&record_path)?;
        view.removal = teardown(&record).await;
        // A record naming what is still there stays, for another `down`.
        if view.removal.failed.is_empty() {
            fs::remove_file(&record_path)
                .with_context(|| format!("cannot remove {}", record_path.display()))?;
            view.removal.removed.push(record_path.display().to_string());
        }
    }
    if args.purge && dir.exists() && view.removal.failed.is_empty() {
        fs::remove_dir_all(&dir).with_context(|| format!("cannot remove {}", dir.display()))?;
        view.removal
            .removed
            .push(format!("{} (purged)", dir.display()));
    }
    let failed = view.removal.failed.len();
    if !crate::output::report(format, &view)? {
        let view = &view.removal;
        if view.removed.is_empty() && view.gone.is_empty() && view.failed.is_empty() {
            println!(
                "no cluster is recorded in {} (no {RECORD}): nothing to take down",
                dir.display()
            );
        } else {
            println!("removed:");
            for r in &view.removed {
                println!("  {r}");
            }
        }
        if !view.gone.is_empty() {
            println!("already gone:");
            for s in &view.gone {
                println!("  {s}");
            }
        }
        if !view.failed.is_empty() {
            println!("still there:");
            for s in &view.failed {
                println!("  {s}");
            }
        }
        if !args.purge && dir.exists() {
            println!("kept {} (data and logs; --purge deletes it)", dir.display());
        }
    }
    if failed > 0 {
        bail!(
            "{failed} part(s) of the cluster could not be removed (listed above); {} still records them",
            record_path.display()
        );
    }
    Ok(())
}

/// Stops the recorded processes (agents, then controllers, then etcd) and deletes the
/// namespaces, veths and bridge.
async fn teardown(record: &ClusterRecord) -> Removal {
    let mut r = Removal::default();
    // Every process `up` starts names a path below the directory on its command line.
    let marker = format!("{}/", record.dir.display());
    let agents: Vec<(String, u32)> = record
        .hosts
        .iter()
        .filter_map(|h| h.pid.map(|p| (format!("agent of {} (pid {p})", h.name), p)))
        .collect();
    let controllers: Vec<(String, u32)> = record
        .controllers
        .iter()
        .map(|c| {
            (
                format!("controller {} (pid {})", c.url, c.process.pid),
                c.process.pid,
            )
        })
        .collect();
    let etcd: Vec<(String, u32)> = record
        .etcd
        .iter()
        .map(|e| {
            (
                format!("etcd {} (pid {})", e.endpoint, e.process.pid),
                e.process.pid,
            )
        })
        .collect();
    for group in [&agents, &controllers, &etcd] {
        stop(group, &marker, &mut r).await;
    }
    // What they left in their sessions (each was started in one of its own): a child an
    // agent had forked but not yet turned into its program when the agent died still carries
    // the agent's command line; a child that outlived its agent names a path of its host.
    let sessions: Vec<u32> = [&agents, &controllers, &etcd]
        .iter()
        .flat_map(|group| group.iter().map(|(_, pid)| *pid))
        .collect();
    let left: Vec<(String, u32)> = left_in_sessions(&sessions, &marker)
        .into_iter()
        // A recorded process still there (it outlived SIGKILL) was counted already.
        .filter(|(pid, _)| !sessions.contains(pid))
        .map(|(pid, command)| (format!("process {pid} ({command})"), pid))
        .collect();
    stop(&left, &marker, &mut r).await;
    // Deleting the root end of a veth deletes its peer at once (deleting the namespace does it
    // later, in the kernel's own time): the veth goes first, then the namespace.
    let namespaces = existing_namespaces();
    for h in &record.hosts {
        delete(
            &mut r,
            &format!("veth {}", h.veth),
            link_exists(&h.veth),
            &["link", "del", &h.veth],
        );
        delete(
            &mut r,
            &format!("namespace {}", h.namespace),
            namespaces.contains(&h.namespace),
            &["netns", "del", &h.namespace],
        );
    }
    if let Some(bridge) = &record.bridge {
        delete(
            &mut r,
            &format!("bridge {bridge}"),
            link_exists(bridge),
            &["link", "del", bridge],
        );
    }
    r
}

/// Runs `ip ARGS` to delete `what` when it `exists`, noting the outcome in `r`.
fn delete(r: &mut Removal, what: &str, exists: bool, args: &[&str]) {
    if !exists {
        r.gone.push(what.to_owned());
        return;
    }
    match ip(args) {
        Ok(_) => r.removed.push(what.to_owned()),
        Err(e) => r.failed.push(format!("{what}: {e}")),
    }
}

/// SIGTERM to each running process of `group` that is still the one recorded (its command
/// line names the cluster's directory), SIGKILL to those still there after [`STOP_PATIENCE`].
async fn stop(group: &[(String, u32)], marker: &str, r: &mut Removal) {
    let mut running = Vec::new();
    for (what, pid) in group {
        if ours(*pid, marker) {
            signal(*pid, libc::SIGTERM);
            running.push((what.clone(), *pid));
        } else {
            r.gone.push(what.clone());
        }
    }
    for sig in [Some(libc::SIGKILL), None] {
        let deadline = Instant::now() + STOP_PATIENCE;
        while running.iter().any(|(_, p)| ours(*p, marker)) && Instant::now() < deadline {
            tokio::time::sleep(POLL).await;
        }
        let Some(sig) = sig else { break };
        for (what, pid) in &mut running {
            if ours(*pid, marker) {
                signal(*pid, sig);
                what.push_str(", killed after SIGTERM");
            }
        }
    }
    for (what, pid) in running {
        if ours(pid, marker) {
            r.failed
                .push(format!("{what}: still running after SIGKILL"));
        } else {
            r.removed.push(what);
        }
    }
}

/// Every running process in one of `sessions` whose command line contains `marker`, with
/// that line.
fn left_in_sessions(sessions: &[u32], marker: &str) -> Vec<(u32, String)> {
    telvirt_files::proc::pids()
        .into_iter()
        .filter_map(|id| {
            let pid = u32::try_from(id).ok()?;
            let (state, session) = telvirt_files::proc::state_and_session(id)?;
            let in_one = u32::try_from(session).is_ok_and(|s| sessions.contains(&s));
            if !in_one || !telvirt_files::proc::runs(state) {
                return None;
            }
            let command = command_line_past_exec(id)?;
            command.contains(marker).then_some((pid, command))
        })
        .collect()
}

fn signal(pid: u32, sig: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill has no memory-safety preconditions; `pid` is positive.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

/// Whether `pid` runs (not a zombie) with `marker` in its command line: the process recorded,
/// not another that got its pid since.
fn ours(pid: u32, marker: &str) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    command_line_past_exec(pid).is_some_and(|c| c.contains(marker))
}

/// Process `pid`'s command line while it runs, waiting up to [`EXEC_PATIENCE`] while it
/// reads empty (an agent's `ip netns exec` turning into telvirt): taken for another process it
/// would be left running.
fn command_line_past_exec(pid: i32) -> Option<String> {
    telvirt_files::proc::running_command_line(pid, EXEC_PATIENCE)
}

/// Starts `command` in a session of its own (it outlives `up` and its terminal), with stdin
/// closed and stdout/stderr appended to `log`; pinned to `cpus` when given.
fn spawn_detached(mut command: Command, log: &Path, cpus: Option<&[u32]>) -> Result<Child> {
    let file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("cannot open {}", log.display()))?;
    // Built before fork: the child only hands it to the kernel.
    // SAFETY: cpu_set_t is plain data; zeroed is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let pin = cpus.is_some();
    for &cpu in cpus.unwrap_or(&[]) {
        if (cpu as usize) < libc::CPU_SETSIZE as usize {
            // SAFETY: bounds checked above.
            unsafe { libc::CPU_SET(cpu as usize, &mut set) };
        }
    }
    for var in PROXY_VARS {
        command.env_remove(var);
    }
    command
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file);
    // SAFETY: the closure runs in the child between fork and exec and calls only setsid and
    // sched_setaffinity, which are async-signal-safe, on data prepared before the fork.
    unsafe {
        command.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if pin && libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let program = command.get_program().to_string_lossy().into_owned();
    command
        .spawn()
        .with_context(|| format!("cannot start {program}"))
}

/// Runs `ip ARGS`; its output, or its error output on failure.
pub(crate) fn ip(args: &[&str]) -> Result<String> {
    crate::netns::output(Command::new("ip").args(args))
}

fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// The named network namespaces (`ip netns list`).
fn existing_namespaces() -> BTreeSet<String> {
    Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// A cluster id (4 hex digits, no namespace or bridge using it yet) and a `k` of
/// `10.77.<k>.0/24` no address or route on this machine is in.
fn choose_id_and_subnet() -> Result<(String, u8)> {
    let addresses = Command::new("ip")
        .args(["-o", "-4", "addr", "show"])
        .output()
        .context("cannot run ip (iproute2)")?;
    let routes = Command::new("ip")
        .args(["-4", "route", "show", "table", "all"])
        .output()
        .context("cannot run ip (iproute2)")?;
    let used = format!(
        "{}\n{}",
        String::from_utf8_lossy(&addresses.stdout),
        String::from_utf8_lossy(&routes.stdout)
    );
    let k = (1..=254u8)
        .find(|k| {
            let prefix = format!("{SUBNET_PREFIX}.{k}.");
            !used
                .split_whitespace()
                .any(|word| word.starts_with(&prefix))
        })
        .context("every 10.77.<k>.0/24 is in use on this machine")?;
    let namespaces = existing_namespaces();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
        ^ std::process::id().rotate_left(16);
    for attempt in 0..64u32 {
        let id = format!(
            "{:04x}",
            (seed.wrapping_add(attempt.wrapping_mul(40503))) & 0xffff
        );
        let prefix = format!("tv-{id}-");
        if !namespaces.iter().any(|n| n.starts_with(&prefix)) && !link_exists(&format!("tv{id}br"))
        {
            return Ok((id, k));
        }
    }
    bail!("no free cluster id found")
}

/// A free TCP port on `address`.
pub(crate) fn free_port(address: &str) -> Result<u16> {
    let listener = std::net::TcpListener::bind((address, 0))
        .with_context(|| format!("finding a free port on {address}"))?;
    Ok(listener.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A child the stopped process left in its session, naming the cluster's directory, is
    /// found and stopped; a process of another session naming it too is left alone.
    #[tokio::test]
    async fn what_a_stopped_process_left_in_its_session_is_stopped_too() {
        let dir = tempfile::tempdir().unwrap();
        let marker = format!("{}/", dir.path().display());
        let log = dir.path().join("log");
        fs::write(&log, "").unwrap();
        let mut leader = Command::new("sh");
        leader.args([
            "-c",
            "tail -f \"$0\" & echo started; exec tail -f \"$0\"",
            log.to_str().unwrap(),
        ]);
        let mut leader = spawn_detached(leader, &dir.path().join("out"), None).unwrap();
        let mut outsider = Command::new("tail").arg("-f").arg(&log).spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let session = [leader.id()];
        while left_in_sessions(&session, &marker).len() < 2 {
            assert!(Instant::now() < deadline, "the leader's child never ran");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut r = Removal::default();
        stop(&[("leader".to_owned(), leader.id())], &marker, &mut r).await;
        let _ = leader.wait();
        let left = left_in_sessions(&session, &marker);
        assert_eq!(left.len(), 1, "{left:?}");
        assert!(left[0].1.starts_with("tail -f "), "{left:?}");
        let left: Vec<(String, u32)> = left.into_iter().map(|(p, c)| (c, p)).collect();
        stop(&left, &marker, &mut r).await;
        assert!(left_in_sessions(&session, &marker).is_empty());
        assert_eq!(r.removed.len(), 2, "{r:?}");
        assert!(
            ours(outsider.id(), &marker),
            "a process of another session was stopped"
        );
        outsider.kill().unwrap();
        let _ = outsider.wait();
    }

    #[test]
    fn slices_are_disjoint_when_there_are_enough_cpus() {
        let cpus: Vec<u32> = (0..5).collect();
        let all: Vec<Vec<u32>> = (1..=2).map(|i| slice(&cpus, 2, i)).collect();
        assert_eq!(all, vec![vec![0, 1, 2], vec![3, 4]]);
    }

    #[test]
    fn slices_share_cpus_round_robin_when_hosts_outnumber_them() {
        let cpus = vec![0, 1];
        let all: Vec<Vec<u32>> = (1..=3).map(|i| slice(&cpus, 3, i)).collect();
        assert_eq!(all, vec![vec![0], vec![1], vec![0]]);
    }

    #[test]
    fn both_inventory_kinds_are_accepted_by_the_scheduler() {
        for mode in [InventoryMode::Slice, InventoryMode::Fake] {
            let plan = Plan {
                exe: PathBuf::new(),
                hosts: 3,
                controllers: 1,
                mode,
                host_lease_ttl_ms: 1000,
                control: Default::default(),
                cpus: vec![0, 1],
            };
            let (yaml, cpus) = inventory(&plan, 3, "h3").unwrap();
            let parsed: Inventory = yaml_serde::from_str(&yaml).unwrap();
            assert_eq!(parsed.hosts[0].name, "h3");
            match mode {
                InventoryMode::Slice => assert_eq!(cpus, vec![0]),
                InventoryMode::Fake => assert_eq!(cpus, vec![0, 1, 2, 3]),
            }
        }
    }
}
