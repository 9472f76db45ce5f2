//! `telvirt bench cluster`: the control plane as a cluster runs it, with real processes.
//!
//! Owns the cluster benchmark: hosts h1..hN, each a `telvirt agent` process with the two CPUs
//! of this machine on paper, running real wasm VNFs (the example firewall in shared groups),
//! under `telvirt controller` processes. Two set-ups run in the same invocation on the same
//! agents' work: the baseline, one controller on the embedded redb store; and the cluster, two
//! controllers on a three-member etcd on loopback. Each measures creates/s and create→Running
//! (Running seen by listing every 10 ms); the cluster also measures etcd's database size,
//! leader failover (against etcd's own expiry of the dead leader's key), host-failure
//! detection (against etcd's expiry of the host's lease) and the API's first write after an
//! etcd member's kill (against a bare store client's), and checks afterwards that every
//! acknowledged create is there and the store is consistent. It must not measure anything
//! in-process: every controller and agent is the binary a user runs.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde::Serialize;
use telvirt_controller::consistency;
use telvirt_controller::records::host_lease_key;
use telvirt_store::local_etcd::LocalEtcd;
use telvirt_store::{EtcdStore, Store};

use crate::bench_control::{BenchChild, Latency, latency, ms, percentile};
use crate::bench_handover::{
    ControllerProcess, answer, deleted_at, first_deletion, free_port, poll_until, spawn_controller,
    time_leader_kill, wait_role,
};
use crate::bench_ports::ratio;
use crate::cli::Output;
use crate::output;
use crate::progress::Progress;

/// Shared groups the VNFs are spread over (each takes one core of a host, eight VNFs a core).
const GROUPS: u32 = 2;
/// How often Running is looked for.
const RUNNING_POLL: Duration = Duration::from_millis(10);
/// How long a round may take to have every VNF Running (or gone).
const ROUND_PATIENCE: Duration = Duration::from_secs(120);

#[derive(Args, Debug, Clone)]
pub struct ClusterArgs {
    /// Hosts, each a `telvirt agent` process with this machine's CPUs on paper
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=8))]
    pub hosts: u32,
    /// VNFs each round creates (shared-group wasm VNFs; a host of two CPUs holds 16)
    #[arg(long, default_value_t = 24, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub vnfs: u32,
    /// Rounds of: create every VNF, wait until all run, delete them (the last round's stay for
    /// the failure figures and the final check)
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub rounds: u32,
    /// Creates in flight at once
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub concurrency: u16,
    /// Leader kills timed on the cluster
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub failovers: u32,
    /// Agent kills timed on the cluster
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub host_failures: u32,
    /// etcd member kills timed on the cluster (members in turn)
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub etcd_failures: u32,
    /// The controllers' --host-lease-ttl-ms (agents beat every quarter of it)
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(200..=60_000))]
    pub host_lease_ttl_ms: u64,
}

/// One set-up's create figures.
#[derive(Debug, Clone, Serialize)]
pub struct CreateFigures {
    pub store: String,
    pub controllers: u32,
    /// Creates acknowledged per second, over the rounds' create bursts.
    pub creates_per_s: f64,
    pub create: Latency,
    pub create_to_running: Latency,
    /// VNFs seen Running, of `rounds × vnfs`.
    pub running: u32,
}

/// From a SIGKILL to what the figure names, per round, and the baseline measured from the
/// same kill.
#[derive(Debug, Clone, Serialize)]
pub struct KillFigures {
    /// What the baseline times.
    pub baseline: &'static str,
    /// ms from the kill until the baseline's event, per round.
    pub baseline_ms: Vec<f64>,
    /// ms from the kill until telvirt answered as the figure says, per round.
    pub telvirt_ms: Vec<f64>,
    pub baseline_max_ms: f64,
    pub telvirt_max_ms: f64,
    pub telvirt_p50_ms: f64,
    /// telvirt_max / baseline_max.
    pub ratio_max: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ClusterReport {
    pub measured: String,
    pub hosts: u32,
    pub vnfs: u32,
    pub rounds: u32,
    pub concurrency: u16,
    /// Baseline: one controller on the embedded store, the same agents and VNFs.
    pub embedded: CreateFigures,
    pub cluster: CreateFigures,
    /// cluster.creates_per_s / embedded.creates_per_s.
    pub creates_ratio: f64,
    /// cluster.create_to_running.p99 / embedded.create_to_running.p99.
    pub create_to_running_p99_ratio: f64,
    /// etcd's database file after the rounds, with the last round's VNFs held; etcd keeps
    /// every revision until compacted, and none is here, so it holds the history of every
    /// VNF created.
    pub etcd_db_bytes: u64,
    /// etcd_db_bytes / VNFs created (rounds × vnfs).
    pub etcd_db_bytes_per_vnf_created: f64,
    /// Baseline: the embedded store's file after the same rounds (redb keeps no history; its
    /// file keeps the pages it grew to).
    pub embedded_store_bytes: u64,
    /// etcd_db_bytes / embedded_store_bytes.
    pub store_size_ratio: f64,
    /// Leader killed: until the other controller acknowledged a write.
    pub leader_failover: KillFigures,
    pub host_lease_ttl_ms: u64,
    /// Agent killed: until the API showed its host NotReady.
    pub host_failure: KillFigures,
    /// etcd member killed: until the API acknowledged a write.
    pub etcd_member_failure: KillFigures,
    /// Acknowledged creates of the last round missing at the end (must be 0).
    pub lost_acknowledged: u32,
    /// The store's invariants held at the end (no allocation without its VNF, no CPU held
    /// twice, allocations replay).
    pub store_consistent: bool,
    pub goal_failover_le_2000_ms: bool,
    pub goal_host_failure_le_1000_ms: bool,
    /// The API acknowledges a write within 2 s of an etcd member's kill.
    pub goal_etcd_member_failure_le_2000_ms: bool,
}

/// What a set-up needs to start its agents again.
pub(crate) struct Hosts {
    pub dir: PathBuf,
    pub controllers: String,
    pub heartbeat_ms: u64,
    pub agents: Vec<BenchChild>,
    /// Each agent gets a tunnel address (127.0.0.N for host hN), so networks and standby
    /// replication span hosts.
    pub tunnels: bool,
    /// The agents run vm VNFs too, with the default guest image from this cache (and the
    /// hosts keep cpu 0 shared, for QEMU's other threads); `None`: wasm VNFs only.
    pub vm_image_cache: Option<PathBuf>,
    /// The QEMU the agents run vm VNFs with (`agent --qemu`); `None`: theirs on PATH.
    pub qemu: Option<PathBuf>,
    /// The agents' `--control-priority` and `--control-nice` (`None`: their own defaults,
    /// whatever the environment says).
    pub control: crate::control_threads::AgentPriorityArgs,
}

/// How the names tokio gives its threads begin (`tokio-rt-worker` for its workers here;
/// others in other versions).
const TOKIO_THREAD_NAME: &str = "tokio-";

/// The classes of [`Hosts::control_applied`] for a report's text ("not read" when none was).
pub fn classes_line(classes: &BTreeSet<String>) -> String {
    if classes.is_empty() {
        "not read".to_owned()
    } else {
        classes.iter().cloned().collect::<Vec<_>>().join(", ")
    }
}

impl Hosts {
    /// CPU time the agents' data-plane workers have run so far (their threads' `schedstat`);
    /// an error when no agent shows one (an agent gone, `/proc` unreadable).
    pub fn worker_cpu(&self) -> Result<Duration> {
        let prefix = format!(
            "{}{}",
            telvirt_dataplane::worker::THREAD_PREFIX,
            telvirt_agent::dataplane::WORKER_NAME_PREFIX
        );
        let workers: Vec<u64> = self
            .agents
            .iter()
            .filter_map(|a| i32::try_from(a.0.id()).ok())
            .flat_map(telvirt_files::proc::threads)
            .filter(|t| t.name.starts_with(&prefix))
            .map(|t| t.run_ns)
            .collect();
        if workers.is_empty() {
            bail!("no agent shows a data-plane worker thread ({prefix}N) in /proc");
        }
        Ok(Duration::from_nanos(workers.iter().sum()))
    }

    /// How the running agents' async control threads are scheduled, read from `/proc` (the
    /// class `--control-priority` or `--control-nice` asked for is what an agent applies only
    /// where the host permits it): per agent, the class the kernel favours most among its
    /// tokio threads (its workers are given the class when they first park; its blocking
    /// threads, of the same name, never are).
    pub fn control_applied(&self) -> BTreeSet<String> {
        self.agents
            .iter()
            .filter_map(|a| i32::try_from(a.0.id()).ok())
            .filter_map(|pid| {
                telvirt_files::proc::thread_classes(pid)
                    .into_iter()
                    .filter(|(name, _)| name.starts_with(TOKIO_THREAD_NAME))
                    .map(|(_, class)| class)
                    .reduce(|a, b| if b.favoured_over(&a) { b } else { a })
            })
            .map(|c| c.to_string())
            .collect()
    }

    pub fn name(i: usize) -> String {
        format!("h{}", i + 1)
    }

    /// Where host `name`'s agent logs, in the benchmark's directory `dir`.
    pub fn log_path(dir: &Path, name: &str) -> PathBuf {
        dir.join(format!("agent-{name}.log"))
    }

    /// Starts (again) host `i`'s agent; its token and inventory were written before.
    pub fn start(&mut self, i: usize) -> Result<BenchChild> {
        let name = Self::name(i);
        let tunnel = format!("127.0.0.{}:0", i + 1);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(Self::log_path(&self.dir, &name))?;
        let mut command = Command::new(std::env::current_exe()?);
        command
            .current_dir(&self.dir)
            .args(["agent", "--controller", &self.controllers])
            .args(["--controller-ca", crate::bench_handover::BENCH_CERT])
            // Several hosts on one machine: no worker takes a core for itself. Wasm VNFs only
            // unless asked: no guest image built (with its CPU) in each fresh data dir during
            // the figures.
            .arg("--no-busy-poll")
            .args(match &self.vm_image_cache {
                Some(cache) => vec![
                    "--runtimes".into(),
                    "vm,wasm".into(),
                    "--image-cache".into(),
                    cache.clone().into_os_string(),
                ],
                None => vec!["--runtimes".into(), "wasm".into()],
            })
            .args(
                self.qemu
                    .iter()
                    .flat_map(|q| [std::ffi::OsString::from("--qemu"), q.clone().into()]),
            )
            .args(["--token-file", &format!("{name}.token")])
            .args(["--data-dir", &format!("agent-{name}")])
            .args(["--inventory", &format!("inventory-{name}.yaml")])
            .args(["--host-name", &name])
            .args(["--heartbeat-interval-ms", &self.heartbeat_ms.to_string()])
            .args(if self.tunnels {
                vec!["--tunnel-address", tunnel.as_str()]
            } else {
                Vec::new()
            })
            .env("TELVIRT_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        crate::control_threads::pass_to_agent(&mut command, self.control);
        let child = command.spawn().context("starting an agent")?;
        Ok(BenchChild(child))
    }
}

/// The API client of a set-up: the leader's address and the admin's token.
#[derive(Clone)]
pub(crate) struct Api {
    pub http: reqwest::Client,
    pub base: Arc<Mutex<String>>,
    pub token: String,
}

impl Api {
    fn base(&self) -> String {
        self.base.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base()))
            .bearer_auth(&self.token)
    }

    pub async fn json(&self, path: &str) -> Result<serde_json::Value> {
        answer(self.request(reqwest::Method::GET, path)).await
    }

    /// Every VNF's name and phase.
    async fn phases(&self) -> Result<BTreeMap<String, String>> {
        let vnfs = self.json("/v1/vnfs?limit=1000").await?;
        Ok(vnfs
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| {
                Some((
                    v["name"].as_str()?.to_owned(),
                    v["phase"].as_str()?.to_owned(),
                ))
            })
            .collect())
    }

    pub async fn host_status(&self, host: &str) -> Option<String> {
        let v = self.json(&format!("/v1/hosts/{host}")).await.ok()?;
        v["status"].as_str().map(str::to_owned)
    }
}

fn inventory(name: &str, shared_cpu0: bool) -> String {
    format!(
        "# Host {name} of a benchmark: this machine's two CPUs on paper.\nhosts:\n  - name: {name}\n    topology: {{ sockets: 1, cores_per_socket: 2, threads_per_core: 1 }}\n{}",
        if shared_cpu0 {
            "    shared: \"0\"\n"
        } else {
            ""
        }
    )
}

pub(crate) fn descriptor(name: &str, group: u32, module: &str) -> String {
    format!(
        "apiVersion: telvirt/v1\nkind: Vnf\nmetadata: {{ name: {name} }}\nspec:\n  runtime: wasm\n  cpu: {{ policy: shared, count: 1, group: g{group} }}\n  ports: [in, out]\n  wasm:\n    module: \"{module}\"\n    limits: {{ memory: 16MiB }}\n    config: {{ blob_hex: \"02000000\" }}\n    maps:\n      - {{ name: rules, kind: hash, key_size: 16, value_size: 4, max_entries: 1024 }}\n"
    )
}

fn kill_figures(baseline: &'static str, base: Vec<f64>, telvirt: Vec<f64>) -> KillFigures {
    let mut sorted = telvirt.clone();
    sorted.sort_by(f64::total_cmp);
    let telvirt_max = sorted.last().copied().unwrap_or(0.0);
    let base_max = base.iter().copied().fold(0.0, f64::max);
    KillFigures {
        baseline,
        telvirt_p50_ms: percentile(&sorted, 0.5),
        telvirt_max_ms: telvirt_max,
        baseline_max_ms: base_max,
        ratio_max: if base_max > 0.0 {
            telvirt_max / base_max
        } else {
            0.0
        },
        baseline_ms: base,
        telvirt_ms: telvirt,
    }
}

/// Registers hosts h1..hN (credential, inventory), starts their agents and waits until each
/// is Ready; uploads the example firewall; the module reference.
pub(crate) async fn lay_out_hosts(api: &Api, hosts: &mut Hosts, count: u32) -> Result<String> {
    for i in 0..count as usize {
        let name = Hosts::name(i);
        let credential: serde_json::Value = answer(api.request(
            reqwest::Method::POST,
            &format!("/v1/hosts/{name}/credential"),
        ))
        .await?;
        let token = credential["token"]
            .as_str()
            .context("the credential answer has no token")?;
        crate::config::write_private(&hosts.dir.join(format!("{name}.token")), token.as_bytes())?;
        std::fs::write(
            hosts.dir.join(format!("inventory-{name}.yaml")),
            inventory(&name, hosts.vm_image_cache.is_some()),
        )?;
        let agent = hosts.start(i)?;
        hosts.agents.push(agent);
    }
    for i in 0..count as usize {
        let name = Hosts::name(i);
        poll_until(
            Duration::from_secs(60),
            &format!("host {name} Ready"),
            || async { api.host_status(&name).await.as_deref() == Some("Ready") },
        )
        .await?;
    }
    upload_example(api, "firewall").await
}

/// Uploads the built-in example module `example` (`firewall`, `nat`, `gtpu`); its reference.
pub(crate) async fn upload_example(api: &Api, example: &str) -> Result<String> {
    let wasm = telvirt_agent::runtimes::wasm::example_modules()
        .into_iter()
        .find_map(|(name, wasm)| (name == example).then_some(wasm))
        .with_context(|| format!("the example {example} is built in"))?;
    let module: serde_json::Value = answer(
        api.request(reqwest::Method::POST, "/v1/modules")
            .header("content-type", "application/wasm")
            .body(wasm.to_vec()),
    )
    .await?;
    Ok(module["reference"]
        .as_str()
        .context("the module answer has no reference")?
        .to_owned())
}

/// Creates `names` with `concurrency` in flight; each create's send time and latency.
async fn create_all(
    api: &Api,
    names: &[String],
    module: &str,
    concurrency: u16,
) -> Result<Vec<(String, Instant, f64)>> {
    let queue = Arc::new(Mutex::new(names.to_vec()));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (api, queue, module) = (api.clone(), queue.clone(), module.to_owned());
        tasks.push(tokio::spawn(async move {
            let mut done = Vec::new();
            loop {
                let Some(name) = queue.lock().unwrap_or_else(|p| p.into_inner()).pop() else {
                    return Ok::<_, anyhow::Error>(done);
                };
                let n: u32 = name[1..].parse().unwrap_or(0);
                let body = descriptor(&name, n % GROUPS, &module);
                let sent = Instant::now();
                let reply = api
                    .request(reqwest::Method::POST, "/v1/vnfs")
                    .header("content-type", "application/yaml")
                    .body(body)
                    .send()
                    .await?;
                if reply.status().as_u16() != 201 {
                    let status = reply.status();
                    bail!(
                        "creating {name}: {status} {}",
                        reply.text().await.unwrap_or_default()
                    );
                }
                done.push((name, sent, ms(sent.elapsed())));
            }
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    Ok(all)
}

/// One round: creates the VNFs, waits until each runs (its create→Running), and deletes them
/// unless `keep`. Returns (create latencies, create→Running latencies, burst seconds).
async fn round(
    api: &Api,
    round: u32,
    args: &ClusterArgs,
    module: &str,
    keep: bool,
) -> Result<(Vec<f64>, Vec<f64>, f64)> {
    let names: Vec<String> = (0..args.vnfs)
        .map(|i| format!("r{}", round * 10_000 + i))
        .collect();
    // The watcher starts first: a VNF can run before its create's answer arrives.
    let seen: Arc<Mutex<BTreeMap<String, Instant>>> = Arc::default();
    let wanted: BTreeSet<String> = names.iter().cloned().collect();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let watcher = {
        let (api, seen, wanted) = (api.clone(), seen.clone(), wanted.clone());
        tokio::spawn(async move {
            while !*stop_rx.borrow() {
                if let Ok(phases) = api.phases().await {
                    let now = Instant::now();
                    let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
                    for (name, phase) in phases {
                        if phase == "Running" && wanted.contains(&name) {
                            seen.entry(name).or_insert(now);
                        }
                    }
                }
                tokio::time::sleep(RUNNING_POLL).await;
            }
        })
    };
    let burst = Instant::now();
    let created = create_all(api, &names, module, args.concurrency).await?;
    let burst_s = burst.elapsed().as_secs_f64();
    let all_running = poll_until(ROUND_PATIENCE, "every VNF of the round Running", || {
        let seen = seen.clone();
        let n = wanted.len();
        async move { seen.lock().unwrap_or_else(|p| p.into_inner()).len() == n }
    })
    .await;
    let _ = stop_tx.send(true);
    let _ = watcher.await;
    all_running?;
    let seen = seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let mut create = Vec::new();
    let mut to_running = Vec::new();
    for (name, sent, latency) in created {
        create.push(latency);
        if let Some(at) = seen.get(&name) {
            to_running.push(ms(at.saturating_duration_since(sent)));
        }
    }
    if !keep {
        for name in &names {
            let path = format!("/v1/vnfs/{name}");
            // A pooled connection the server closed at that moment fails before an answer:
            // the delete goes once more (a 404 then means the first one applied).
            let reply = match api.request(reqwest::Method::DELETE, &path).send().await {
                Ok(reply) => reply,
                Err(e) if e.is_request() => {
                    let again = api.request(reqwest::Method::DELETE, &path).send().await?;
                    if again.status() == reqwest::StatusCode::NOT_FOUND {
                        continue;
                    }
                    again
                }
                Err(e) => return Err(e.into()),
            };
            reply.error_for_status()?;
        }
        poll_until(ROUND_PATIENCE, "every VNF of the round deleted", || async {
            api.phases()
                .await
                .is_ok_and(|p| p.keys().all(|n| !wanted.contains(n)))
        })
        .await?;
    }
    Ok((create, to_running, burst_s))
}

/// The rounds on one set-up: its create figures and the last round's names (kept).
async fn rounds(
    api: &Api,
    args: &ClusterArgs,
    module: &str,
    store: &str,
    controllers: u32,
    progress: &(dyn Fn() + Sync),
) -> Result<(CreateFigures, Vec<String>)> {
    let (mut create, mut to_running, mut seconds) = (Vec::new(), Vec::new(), 0.0);
    for r in 0..args.rounds {
        let last = r + 1 == args.rounds;
        let (c, t, s) = round(api, r, args, module, last).await?;
        create.extend(c);
        to_running.extend(t);
        seconds += s;
        progress();
    }
    let last = args.rounds - 1;
    let kept = (0..args.vnfs)
        .map(|i| format!("r{}", last * 10_000 + i))
        .collect();
    let running = u32::try_from(to_running.len()).unwrap_or(u32::MAX);
    Ok((
        CreateFigures {
            store: store.to_owned(),
            controllers,
            creates_per_s: if seconds > 0.0 {
                create.len() as f64 / seconds
            } else {
                0.0
            },
            create: latency(create),
            create_to_running: latency(to_running),
            running,
        },
        kept,
    ))
}

/// The admin's token from the client config the leading controller wrote in `dir/control`.
fn admin_token(dir: &Path) -> Result<String> {
    Ok(crate::config::ClientConfig::read(&dir.join("control/client.toml"))?.token)
}

async fn embedded(
    args: &ClusterArgs,
    dir: &Path,
    http: &reqwest::Client,
    progress: &(dyn Fn() + Sync),
) -> Result<(CreateFigures, u64)> {
    let ttl = args.host_lease_ttl_ms.to_string();
    let (controller, api) = embedded_controller(dir, http, &["--host-lease-ttl-ms", &ttl]).await?;
    let mut hosts = Hosts {
        dir: dir.to_owned(),
        controllers: controller.api.clone(),
        heartbeat_ms: args.host_lease_ttl_ms / 4,
        agents: Vec::new(),
        tunnels: false,
        vm_image_cache: None,
        qemu: None,
        control: Default::default(),
    };
    let module = lay_out_hosts(&api, &mut hosts, args.hosts).await?;
    let (figures, _) = rounds(&api, args, &module, "embedded redb", 1, progress).await?;
    let store = dir.join("control").join(crate::serve::STORE_FILE);
    let store_bytes = std::fs::metadata(&store)
        .with_context(|| format!("the embedded store {}", store.display()))?
        .len();
    drop(hosts);
    drop(controller);
    Ok((figures, store_bytes))
}

/// A `telvirt controller` process (`args`) on the embedded store in `dir`, once it answers,
/// and its API as admin.
pub(crate) async fn embedded_controller(
    dir: &Path,
    http: &reqwest::Client,
    args: &[&str],
) -> Result<(ControllerProcess, Api)> {
    embedded_api_process(dir, http, "controller", args).await
}

/// [`embedded_controller`] for `subcommand` (`controller`, or `serve`: with this host's agent).
pub(crate) async fn embedded_api_process(
    dir: &Path,
    http: &reqwest::Client,
    subcommand: &str,
    args: &[&str],
) -> Result<(ControllerProcess, Api)> {
    std::fs::create_dir_all(dir)?;
    let controller = crate::bench_handover::spawn_api_process(dir, subcommand, free_port()?, args)?;
    // A controller on the embedded store serves at once (there is no election).
    let config = dir.join("control/client.toml");
    poll_until(
        Duration::from_secs(20),
        "the controller answering",
        || async {
            config.exists()
                && http
                    .get(format!("{}/v1/healthz", controller.api))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success())
        },
    )
    .await?;
    let api = Api {
        http: http.clone(),
        base: Arc::new(Mutex::new(controller.api.clone())),
        token: admin_token(dir)?,
    };
    Ok((controller, api))
}

/// Kills the leader `failovers` times, timing the handover; `a` leads on entry and on exit.
async fn leader_failovers(
    args: &ClusterArgs,
    dir: &Path,
    api: &Api,
    watcher: &EtcdStore,
    controllers: &mut [ControllerProcess; 2],
    controller_args: &[&str],
    progress: &(dyn Fn() + Sync),
) -> Result<KillFigures> {
    let http = &api.http;
    let (mut expiry, mut handover) = (Vec::new(), Vec::new());
    for round in 0..args.failovers {
        let survivor = controllers[1].api.clone();
        let probe = format!("failover-r{round}");
        let (expired, served) = time_leader_kill(
            http,
            watcher,
            &mut controllers[0],
            &survivor,
            &api.token,
            &probe,
        )
        .await?;
        expiry.push(expired);
        handover.push(served);
        *api.base.lock().unwrap_or_else(|p| p.into_inner()) = survivor;
        // The killed controller comes back on its port as the follower; the survivor leads.
        let port = controllers[0].port;
        controllers[0] = spawn_controller(dir, port, controller_args)?;
        wait_role(http, &controllers[0].api, "follower").await?;
        controllers.swap(0, 1);
        progress();
    }
    Ok(kill_figures(
        "etcd deletes the dead leader's key",
        expiry,
        handover,
    ))
}

/// Kills agents round-robin `host_failures` times, timing until the API shows the host
/// NotReady, and starts each again.
async fn host_failures(
    args: &ClusterArgs,
    api: &Api,
    watcher: &EtcdStore,
    hosts: &mut Hosts,
    progress: &(dyn Fn() + Sync),
) -> Result<KillFigures> {
    let (mut expiry, mut detect) = (Vec::new(), Vec::new());
    for round in 0..args.host_failures {
        let i = round as usize % hosts.agents.len();
        let name = Hosts::name(i);
        // The host holds a lease now (one may have lapsed while the leaders changed).
        poll_until(
            Duration::from_secs(30),
            &format!("host {name} holding a lease"),
            || async {
                watcher
                    .get(&host_lease_key(&name))
                    .await
                    .is_ok_and(|v| v.is_some())
                    && api.host_status(&name).await.as_deref() == Some("Ready")
            },
        )
        .await?;
        let expired = first_deletion(watcher, &host_lease_key(&name)).await?;
        let killed = Instant::now();
        hosts.agents[i].kill();
        poll_until(
            Duration::from_secs(30),
            &format!("host {name} NotReady"),
            || async { api.host_status(&name).await.as_deref() == Some("NotReady") },
        )
        .await?;
        detect.push(ms(killed.elapsed()));
        let expired = deleted_at(expired, "the host's lease").await?;
        expiry.push(ms(expired.duration_since(killed)));
        hosts.agents[i] = hosts.start(i)?;
        poll_until(
            Duration::from_secs(60),
            &format!("host {name} Ready again"),
            || async { api.host_status(&name).await.as_deref() == Some("Ready") },
        )
        .await?;
        progress();
    }
    Ok(kill_figures(
        "etcd deletes the dead agent's host lease key",
        expiry,
        detect,
    ))
}

/// Kills etcd members round-robin `etcd_failures` times and times, from the kill, the first
/// write telvirt acknowledges (a node credential through the leader) against the baseline at
/// its best: a new bare store client of the surviving members only for each attempt, cut after
/// 100 ms, so it measures when etcd takes writes again; starts each member again.
async fn etcd_failures(
    args: &ClusterArgs,
    api: &Api,
    etcd: &mut LocalEtcd,
    progress: &(dyn Fn() + Sync),
) -> Result<KillFigures> {
    let (mut base, mut telvirt) = (Vec::new(), Vec::new());
    for round in 0..args.etcd_failures {
        let member = round as usize % 3;
        let mut survivors = etcd.endpoints();
        survivors.remove(member);
        let killed = Instant::now();
        etcd.kill_member(member);
        let probe = format!("/probe/{round}");
        let bare_write = async {
            loop {
                let op = telvirt_store::Op::Put {
                    key: probe.clone(),
                    value: Vec::new(),
                    lease: None,
                };
                let attempt = async {
                    let bare = EtcdStore::connect(&survivors, "/bench-cluster-bare").await?;
                    bare.txn(Vec::new(), vec![op]).await
                };
                if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(100), attempt).await {
                    return ms(killed.elapsed());
                }
            }
        };
        let path = format!("/v1/hosts/etcd-r{round}/credential");
        let api_write = async {
            loop {
                let sent = api.request(reqwest::Method::POST, &path).send().await;
                if sent.is_ok_and(|r| r.status().as_u16() == 201) {
                    return ms(killed.elapsed());
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        let timed = tokio::time::timeout(Duration::from_secs(60), async {
            tokio::join!(bare_write, api_write)
        })
        .await
        .context("no write went through within 60 s of an etcd member's kill")?;
        base.push(timed.0);
        telvirt.push(timed.1);
        etcd.spawn_member(member)?;
        etcd.wait_until_answering()
            .await
            .map_err(|e| anyhow::anyhow!("etcd member {} did not come back: {e}", member + 1))?;
        progress();
    }
    Ok(kill_figures(
        "a new etcd client of the surviving members writes",
        base,
        telvirt,
    ))
}

struct ClusterRun {
    figures: CreateFigures,
    db_bytes: u64,
    failover: KillFigures,
    etcd_failure: KillFigures,
    host_failure: KillFigures,
    lost: u32,
    consistent: bool,
}

async fn cluster(
    args: &ClusterArgs,
    dir: &Path,
    http: &reqwest::Client,
    progress: &(dyn Fn() + Sync),
) -> Result<ClusterRun> {
    std::fs::create_dir_all(dir)?;
    let mut etcd = LocalEtcd::start_members(&dir.join("etcd"), 3, true).await?;
    let namespace = "/bench-cluster";
    let url = etcd.store_url(namespace);
    let watcher = EtcdStore::connect(&etcd.endpoints(), namespace).await?;
    let ttl = args.host_lease_ttl_ms.to_string();
    let controller_args = ["--store", url.as_str(), "--host-lease-ttl-ms", ttl.as_str()];
    let first = spawn_controller(dir, free_port()?, &controller_args)?;
    wait_role(http, &first.api, "leader").await?;
    let second = spawn_controller(dir, free_port()?, &controller_args)?;
    wait_role(http, &second.api, "follower").await?;
    let mut controllers = [first, second];
    let api = Api {
        http: http.clone(),
        base: Arc::new(Mutex::new(controllers[0].api.clone())),
        token: admin_token(dir)?,
    };
    let mut hosts = Hosts {
        dir: dir.to_owned(),
        controllers: format!("{},{}", controllers[0].api, controllers[1].api),
        heartbeat_ms: args.host_lease_ttl_ms / 4,
        agents: Vec::new(),
        tunnels: false,
        vm_image_cache: None,
        qemu: None,
        control: Default::default(),
    };
    let module = lay_out_hosts(&api, &mut hosts, args.hosts).await?;
    let (figures, kept) = rounds(&api, args, &module, "etcd, 3 members", 2, progress).await?;
    let db_bytes = watcher.db_size().await?;
    let failover = leader_failovers(
        args,
        dir,
        &api,
        &watcher,
        &mut controllers,
        &controller_args,
        progress,
    )
    .await?;
    let host_failure = host_failures(args, &api, &watcher, &mut hosts, progress).await?;
    let etcd_failure = etcd_failures(args, &api, &mut etcd, progress).await?;
    let phases = api.phases().await?;
    let lost = kept.iter().filter(|n| !phases.contains_key(*n)).count();
    let report = consistency::check(&watcher, telvirt_sched::SchedConfig::default()).await?;
    drop(hosts);
    drop(controllers);
    drop(etcd);
    Ok(ClusterRun {
        figures,
        db_bytes,
        failover,
        etcd_failure,
        host_failure,
        lost: u32::try_from(lost).unwrap_or(u32::MAX),
        consistent: report.is_consistent(),
    })
}

pub async fn run_cluster_bench(
    args: &ClusterArgs,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<ClusterReport> {
    let dir = crate::bench_control::scratch_dir("cluster")?;
    let total =
        u64::from(2 * args.rounds + args.failovers + args.host_failures + args.etcd_failures);
    let done = std::sync::atomic::AtomicU64::new(0);
    let step = || {
        let d = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        progress(d, total);
    };
    progress(0, total);
    let http = crate::bench_handover::bench_http()?
        .timeout(Duration::from_secs(10))
        .build()?;
    let result = async {
        let embedded = embedded(args, &dir.join("embedded"), &http, &step).await?;
        let run = cluster(args, &dir.join("etcd"), &http, &step).await?;
        Ok::<_, anyhow::Error>((embedded, run))
    }
    .await;
    let _ = std::fs::remove_dir_all(&dir);
    let ((embedded, embedded_store_bytes), run) = result?;
    let vnfs = f64::from(args.vnfs);
    Ok(ClusterReport {
        measured: format!(
            "{} telvirt agent processes on this machine (each with its two CPUs on paper) running real wasm VNFs (the example firewall, {GROUPS} shared groups); baseline: one telvirt controller on the embedded redb store; cluster: two telvirt controller processes on a three-member etcd 3.4 on loopback; Running seen by listing every {} ms",
            args.hosts,
            RUNNING_POLL.as_millis()
        ),
        hosts: args.hosts,
        vnfs: args.vnfs,
        rounds: args.rounds,
        concurrency: args.concurrency,
        creates_ratio: ratio(run.figures.creates_per_s, embedded.creates_per_s),
        create_to_running_p99_ratio: ratio(
            run.figures.create_to_running.p99_ms,
            embedded.create_to_running.p99_ms,
        ),
        etcd_db_bytes: run.db_bytes,
        embedded_store_bytes,
        store_size_ratio: ratio(run.db_bytes as f64, embedded_store_bytes as f64),
        etcd_db_bytes_per_vnf_created: run.db_bytes as f64 / (vnfs * f64::from(args.rounds)),
        goal_failover_le_2000_ms: run.failover.telvirt_max_ms <= 2000.0,
        goal_host_failure_le_1000_ms: run.host_failure.telvirt_max_ms <= 1000.0,
        leader_failover: run.failover,
        host_lease_ttl_ms: args.host_lease_ttl_ms,
        host_failure: run.host_failure,
        goal_etcd_member_failure_le_2000_ms: run.etcd_failure.telvirt_max_ms <= 2000.0,
        etcd_member_failure: run.etcd_failure,
        lost_acknowledged: run.lost,
        store_consistent: run.consistent,
        embedded,
        cluster: run.figures,
    })
}

pub fn cluster_bench(format: Output, args: ClusterArgs) -> Result<()> {
    let progress = Progress::new(format, "cluster");
    let report_progress = |d, t| progress.update(d, t);
    let bench = run_cluster_bench(&args, &report_progress);
    let Some(report) = progress.run_bench(format, bench)? else {
        return Ok(());
    };
    let r = &report;
    println!("measured: {}", r.measured);
    let creates = |f: &CreateFigures| {
        vec![
            format!(
                "{} ({} controller{})",
                f.store,
                f.controllers,
                if f.controllers == 1 { "" } else { "s" }
            ),
            format!("{:.1}", f.creates_per_s),
            format!("{:.1} / {:.1}", f.create.p50_ms, f.create.p99_ms),
            format!(
                "{:.0} / {:.0}",
                f.create_to_running.p50_ms, f.create_to_running.p99_ms
            ),
            format!("{}", f.running),
        ]
    };
    println!(
        "{}",
        output::table(
            &[
                "STORE",
                "CREATES/S",
                "CREATE p50/p99 ms",
                "→RUNNING p50/p99 ms",
                "RUNNING"
            ],
            &[creates(&r.embedded), creates(&r.cluster)],
        )
    );
    println!(
        "ratios cluster/embedded: creates/s {:.2}, create→Running p99 {:.2}; etcd database {} bytes ({:.0} per VNF created, history not compacted) against the embedded store's {} bytes: {:.2}",
        r.creates_ratio,
        r.create_to_running_p99_ratio,
        r.etcd_db_bytes,
        r.etcd_db_bytes_per_vnf_created,
        r.embedded_store_bytes,
        r.store_size_ratio
    );
    let kills = |what: &str, k: &KillFigures, goal: String| {
        vec![
            what.to_owned(),
            format!("{:.0}", k.telvirt_max_ms),
            format!("{:.0}", k.baseline_max_ms),
            k.baseline.to_owned(),
            format!("{:.2}", k.ratio_max),
            goal,
        ]
    };
    let met = |ok: bool| if ok { "met" } else { "NOT met" };
    println!(
        "{}",
        output::table(
            &[
                "FAILURE",
                "TELVIRT MAX ms",
                "BASELINE MAX ms",
                "BASELINE",
                "RATIO",
                "GOAL"
            ],
            &[
                kills(
                    "leader controller killed: survivor acknowledges a write",
                    &r.leader_failover,
                    format!("<= 2000: {}", met(r.goal_failover_le_2000_ms)),
                ),
                kills(
                    "agent killed: host NotReady in the API",
                    &r.host_failure,
                    format!("<= 1000: {}", met(r.goal_host_failure_le_1000_ms)),
                ),
                kills(
                    "etcd member killed: the API acknowledges a write",
                    &r.etcd_member_failure,
                    format!("<= 2000: {}", met(r.goal_etcd_member_failure_le_2000_ms)),
                ),
            ],
        )
    );
    println!(
        "after the kills: {} acknowledged VNFs lost; store consistent: {}",
        r.lost_acknowledged, r.store_consistent
    );
    Ok(())
}
