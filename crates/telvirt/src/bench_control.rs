//! `telvirt bench control`: the control plane under load, in one process.
//!
//! Owns the control-plane benchmark: a controller on a redb store in a temporary directory, N
//! hosts each served by an in-process agent whose runtime is a no-op (start returns at once,
//! state reports Running), and the figures: creates/s and create latency, create→Running, list
//! latency with pagination, idle CPU, RSS and store size per VNF. The baseline, in the same run,
//! replays the access pattern of the former poll-everything loops against the same store. It
//! must not stand in for a data plane or a real runtime: the agents are fakes on purpose, and
//! the report says so.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use async_trait::async_trait;
use clap::Args;
use serde::Serialize;
use telvirt_agent::{
    Agent, AgentConfig, ControlLink, InstanceSpec, InstanceState, RELIST_INTERVAL, Runtime,
    RuntimeFailure,
};
use telvirt_controller::listing::ListQuery;
use telvirt_controller::records::{AUTHORITIES, AuthorityRecord, VNFS, VnfRecord};
use telvirt_controller::{Caller, Controller, HostRecord, LocalLink};
use telvirt_model::{Format, Name, Phase, RuntimeKind};
use telvirt_sched::{HostSpec, SchedConfig, TopologySpec};
use telvirt_store::{Op, Versioned};
use telvirt_store::{RedbStore, Store, WatchEvent};

use crate::cli::Output;
use crate::output;
use crate::progress::Progress;

/// What the report says about the agents.
pub const AGENTS_NOTE: &str = "in-process fakes (no-op runtime), each sending the default 1 s heartbeat and \
     listing on every signalled change and every 60 s; their own instance checks (on their own \
     hosts in a cluster) run at the relist interval; the subject is the control plane";
/// Creates in flight at once unless `--concurrency` says otherwise.
const CONCURRENCY: u16 = 16;
/// Items per page of the paginated list.
const PAGE: usize = 500;

#[derive(Args, Debug, Clone)]
pub struct ControlArgs {
    /// VNFs to create
    #[arg(long, default_value_t = 10_000)]
    pub vnfs: u32,
    /// Hosts, each with its own in-process agent
    #[arg(long, default_value_t = 100)]
    pub hosts: u32,
    /// Seconds of each CPU window (idle controller, then the replayed poll loop)
    #[arg(long, default_value_t = 5)]
    pub idle_secs: u64,
    /// VNFs created at a steady rate after the others, for create→Running latency under a
    /// load the node keeps up with (0: no paced phase)
    #[arg(long, default_value_t = 1_000)]
    pub paced_vnfs: u32,
    /// Creates in flight at once in the bulk phase (and in its bare-store baseline)
    #[arg(long, default_value_t = CONCURRENCY, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub concurrency: u16,
    /// Creates per second of the paced phase
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub paced_rate: u32,
}

/// Percentiles of one latency series, milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ControlReport {
    pub agents: &'static str,
    pub measured: &'static str,
    pub vnfs: u32,
    pub hosts: u32,
    pub concurrency: u16,
    pub creates_per_s: f64,
    /// Baseline: the same writes a create makes (the VNF record, its first event, its pending
    /// key, with the bytes the run stored) as bare store transactions, same concurrency.
    pub baseline_store_txns_per_s: f64,
    /// creates_per_s / baseline_store_txns_per_s.
    pub create_vs_store_ratio: f64,
    pub create: Latency,
    /// VNFs seen Running before the deadline.
    pub running: u32,
    pub create_to_running: Latency,
    /// Paced phase: VNFs created at `paced_rate_per_s` on top of the others.
    pub paced_vnfs: u32,
    pub paced_rate_per_s: u32,
    /// Paced VNFs seen Running before the deadline.
    pub paced_running: u32,
    /// create→Running of the paced VNFs.
    pub paced_create_to_running: Latency,
    /// Times the watch fell behind and Running was read from a list (an upper bound).
    pub watch_resyncs: u32,
    pub list_page_size: usize,
    pub list_pages: usize,
    pub list_page: Latency,
    pub list_paginated_total_ms: f64,
    /// Baseline: the whole list in one call.
    pub list_unpaginated_ms: f64,
    pub idle_secs: u64,
    /// CPU of the whole process (controller and the fake agents) with nothing changing, in
    /// cores (1.0 = one core busy).
    pub idle_cores: f64,
    /// The same window with the former poll loops replayed (every 1 s list and decode every
    /// VNF and authority; every 2 s list and decode every VNF).
    pub baseline_poll_cores: f64,
    /// baseline_poll_cores / idle_cores.
    pub idle_cpu_ratio: f64,
    pub rss_before_bytes: u64,
    pub rss_after_bytes: u64,
    pub rss_per_vnf_bytes: f64,
    pub store_bytes: u64,
    pub store_per_vnf_bytes: f64,
    /// Keys and values live in the store (without redb's pages and free space), per VNF.
    pub store_live_per_vnf_bytes: f64,
    /// The file per VNF after the compaction the store runs itself once idle for 30 s
    /// (`RedbStore::compact`, called here at once).
    pub store_compacted_per_vnf_bytes: f64,
    /// How long that compaction (repacking the records into full pages, then giving the free
    /// pages back) held the store: every call waits meanwhile.
    pub store_compaction_ms: f64,
    pub goals: Goals,
}

#[derive(Debug, Clone, Serialize)]
pub struct Goals {
    /// ≥ 2,000 creates/s.
    pub creates_per_s_ge_2000: bool,
    /// create→Running p99 ≤ 100 ms, at the paced rate with the bulk VNFs in place.
    pub create_to_running_p99_le_100ms: bool,
    /// Idle CPU ≤ 1% of a core.
    pub idle_cpu_le_1pct_core: bool,
    /// Store ≤ 2 KiB per VNF (the file, once compacted as an idle store is).
    pub store_le_2kib_per_vnf: bool,
}

/// A runtime that runs nothing: start succeeds at once and the instance reports Running.
#[derive(Default)]
struct NoopRuntime {
    states: std::sync::Mutex<HashMap<String, InstanceState>>,
}

impl NoopRuntime {
    fn set(&self, name: &str, state: InstanceState) {
        if let Ok(mut states) = self.states.lock() {
            states.insert(name.to_owned(), state);
        }
    }
}

#[async_trait]
impl Runtime for NoopRuntime {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Wasm
    }
    async fn start(&self, spec: &InstanceSpec) -> Result<(), RuntimeFailure> {
        self.set(spec.name.as_str(), InstanceState::Running);
        Ok(())
    }
    async fn adopt(&self, _spec: &InstanceSpec) -> Result<bool, RuntimeFailure> {
        Ok(false)
    }
    async fn stop(&self, name: &Name) -> Result<(), RuntimeFailure> {
        self.set(name.as_str(), InstanceState::Stopped);
        Ok(())
    }
    async fn pause(&self, name: &Name) -> Result<(), RuntimeFailure> {
        self.set(name.as_str(), InstanceState::Paused);
        Ok(())
    }
    async fn resume(&self, name: &Name) -> Result<(), RuntimeFailure> {
        self.set(name.as_str(), InstanceState::Running);
        Ok(())
    }
    async fn state(&self, name: &Name) -> InstanceState {
        self.states
            .lock()
            .ok()
            .and_then(|s| s.get(name.as_str()).cloned())
            .unwrap_or(InstanceState::Absent)
    }
    async fn remove(&self, name: &Name) -> Result<(), RuntimeFailure> {
        if let Ok(mut states) = self.states.lock() {
            states.remove(name.as_str());
        }
        Ok(())
    }
}

fn descriptor(name: &str) -> String {
    format!(
        "apiVersion: telvirt/v1\nkind: Vnf\nmetadata: {{ name: {name} }}\nspec:\n  runtime: wasm\n  \
         cpu: {{ policy: dedicated, count: 1 }}\n  ports: [in, out]\n  wasm:\n    module: \
         /srv/telvirt/noop.wasm\n    limits: {{ memory: 1MiB }}\n"
    )
}

fn vnf_name(i: u32) -> String {
    format!("c{i:06}")
}

/// The `p` quantile (0 to 1) of `sorted` samples, by nearest rank; 0 when there are none.
pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    let Some(last) = sorted.len().checked_sub(1) else {
        return 0.0;
    };
    sorted[((p * last as f64).round() as usize).min(last)]
}

/// p50, p99 and max of `samples` (ms).
pub(crate) fn latency(mut samples: Vec<f64>) -> Latency {
    samples.sort_by(f64::total_cmp);
    Latency {
        p50_ms: percentile(&samples, 0.5),
        p99_ms: percentile(&samples, 0.99),
        max_ms: samples.last().copied().unwrap_or(0.0),
    }
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// A process a benchmark started: SIGKILLed (and reaped) when dropped, so a benchmark that
/// fails half-way leaves nothing running.
pub(crate) struct BenchChild(pub std::process::Child);

impl BenchChild {
    /// SIGKILL, and waits for it.
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for BenchChild {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The QEMUs a benchmark started, each by its state dir and VM name: SIGKILLed when dropped if
/// they still run (QEMU runs in a process group of its own and outlives whoever started it),
/// so a benchmark that fails or is interrupted half-way leaves no guest running.
pub(crate) struct QemuSweep(pub Vec<(std::path::PathBuf, String)>);

impl Drop for QemuSweep {
    fn drop(&mut self) {
        for (dir, name) in &self.0 {
            if let Some(qemu) = telvirt_runtime_vm::manager::running_process(dir, name) {
                qemu.kill();
            }
        }
    }
}

/// User plus system CPU time of this process.
fn cpu_time() -> Result<Duration> {
    // SAFETY: getrusage writes into the zeroed struct we own; RUSAGE_SELF is always valid.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    if rc != 0 {
        bail!("getrusage: {}", std::io::Error::last_os_error());
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    Ok(tv(usage.ru_utime) + tv(usage.ru_stime))
}

/// Cores used by this process over `window`.
async fn cores_over(window: Duration) -> Result<f64> {
    let (c0, t0) = (cpu_time()?, Instant::now());
    tokio::time::sleep(window).await;
    let (c1, t1) = (cpu_time()?, Instant::now());
    Ok((c1 - c0).as_secs_f64() / (t1 - t0).as_secs_f64())
}

/// VmRSS of this process, bytes.
fn rss_bytes() -> Result<u64> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("/proc/self/status has no VmRSS line")?;
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .context("VmRSS line without a value")?
        .parse()
        .context("VmRSS value")?;
    Ok(kib * 1024)
}

/// A synthetic host with room for twice `per_host` dedicated one-core VNFs.
fn host(name: String, per_host: u32) -> HostRecord {
    HostRecord {
        qemu_machines: Vec::new(),
        accel: None,
        cpu: None,
        spec: HostSpec {
            name,
            topology: Some(TopologySpec {
                sockets: 2,
                cores_per_socket: per_host.max(32) + 8,
                threads_per_core: 1,
                numa_nodes_per_socket: 1,
                memory_per_node: None,
            }),
            shared: "0".parse().unwrap_or_default(),
            ..HostSpec::default()
        },
        memory_bytes: 1 << 40,
        hugepages: Vec::new(),
        runtimes: vec![RuntimeKind::Wasm.as_str().to_owned()],
        agent: true,
        tunnel: None,
        qemu: None,
    }
}

/// One pass of the former poll loops: list and decode every VNF (and every authority when
/// `authorities`).
async fn poll_pass(store: &Arc<RedbStore>, authorities: bool) -> Result<usize> {
    let mut n = 0;
    for (key, v) in store.list(VNFS).await? {
        let r: VnfRecord = serde_json::from_slice(&v.value).with_context(|| key.clone())?;
        n += usize::from(r.vnf.phase == Phase::Running);
    }
    if authorities {
        for (key, v) in store.list(AUTHORITIES).await? {
            let _: AuthorityRecord = serde_json::from_slice(&v.value).with_context(|| key)?;
        }
    }
    Ok(n)
}

/// `total` creates' writes (record, first event, pending key) as bare transactions on a fresh
/// store at `path`, `concurrency` in flight, each a create-if-absent as a create is; per
/// second.
async fn bare_writes(
    path: &std::path::Path,
    total: u32,
    concurrency: u16,
    record: &[u8],
    event: &[u8],
) -> Result<f64> {
    let store = RedbStore::open(path)?;
    let next = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let started = Instant::now();
    let mut writers = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (store, next) = (store.clone(), next.clone());
        let (record, event) = (record.to_vec(), event.to_vec());
        writers.spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= total {
                    return Ok::<_, anyhow::Error>(());
                }
                let name = vnf_name(i);
                let key = format!("{VNFS}{name}");
                store
                    .txn(
                        vec![telvirt_store::Compare::ModRevision {
                            key: key.clone(),
                            revision: 0,
                        }],
                        vec![
                            Op::Put {
                                key,
                                value: record.clone(),
                                lease: None,
                            },
                            Op::Put {
                                key: telvirt_controller::records::event_key(&name, 1),
                                value: event.clone(),
                                lease: None,
                            },
                            Op::Put {
                                key: telvirt_controller::records::pending_key(&name),
                                value: Vec::new(),
                                lease: None,
                            },
                        ],
                    )
                    .await?;
            }
        });
    }
    while let Some(done) = writers.join_next().await {
        done.context("a baseline writer panicked")??;
    }
    Ok(f64::from(total) / started.elapsed().as_secs_f64())
}

/// Runs the benchmark; `progress(phase, done, total)` is called as VNFs are created and run.
pub async fn run_control_bench(
    args: &ControlArgs,
    progress: &(dyn Fn(&str, u64, u64) + Sync),
) -> Result<ControlReport> {
    if args.vnfs == 0 || args.hosts == 0 || args.idle_secs == 0 {
        bail!("--vnfs, --hosts and --idle-secs must each be at least 1");
    }
    let dir = scratch_dir("control")?;
    let store_path = dir.join("store.redb");
    let result = run_in(args, &dir, &store_path, progress).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// A new empty directory under the system's temporary directory for bench `what`.
pub fn scratch_dir(what: &str) -> Result<PathBuf> {
    let base = std::env::temp_dir();
    for attempt in 0..100u32 {
        let dir = base.join(format!(
            "telvirt-bench-{what}-{}-{attempt}",
            std::process::id()
        ));
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
        }
    }
    bail!("no free temporary directory under {}", base.display())
}

async fn run_in(
    args: &ControlArgs,
    dir: &std::path::Path,
    store_path: &std::path::Path,
    progress: &(dyn Fn(&str, u64, u64) + Sync),
) -> Result<ControlReport> {
    let store = RedbStore::open(store_path)?;
    let controller = Controller::open(store.clone(), SchedConfig::default()).await?;
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    for h in 0..args.hosts {
        let name = format!("h{h:04}");
        controller
            .register_host(host(
                name.clone(),
                (args.vnfs + args.paced_vnfs).div_ceil(args.hosts),
            ))
            .await?;
        let link: Arc<dyn ControlLink> = Arc::new(LocalLink::new(controller.clone(), &name));
        let agent = Arc::new(Agent::with_config(
            name.clone(),
            vec![Arc::new(NoopRuntime::default()) as Arc<dyn Runtime>],
            Arc::clone(&link),
            dir.join("instances"),
            AgentConfig {
                resync: RELIST_INTERVAL,
                ..AgentConfig::default()
            },
        ));
        tasks.spawn(agent.run(shutdown_rx.clone()));
        tasks.spawn(telvirt_agent::reconcile::heartbeat_loop(
            name,
            link,
            Duration::from_secs(1),
            None,
            None,
            shutdown_rx.clone(),
        ));
    }
    let scheduler = tokio::spawn(
        controller
            .clone()
            .scheduling_loop(Duration::from_millis(200)),
    );
    let caller = Caller {
        name: "admin".into(),
    };
    let rss_before = rss_bytes()?;

    // Watch for Running before the first create, so no transition is missed.
    let mut watch = store.watch(VNFS).await?;
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel::<(String, Instant)>();
    let watch_store = store.clone();
    let watcher = tokio::spawn(async move {
        let mut resyncs = 0u32;
        while let Some(event) = watch.next().await {
            match event {
                WatchEvent::Put { key, value, .. } => {
                    if let Ok(r) = serde_json::from_slice::<VnfRecord>(&value)
                        && r.vnf.phase == Phase::Running
                    {
                        let name = key.strip_prefix(VNFS).unwrap_or(&key).to_owned();
                        if seen_tx.send((name, Instant::now())).is_err() {
                            break;
                        }
                    }
                }
                WatchEvent::Delete { .. } => {}
                WatchEvent::Resync => {
                    resyncs += 1;
                    let now = Instant::now();
                    if let Ok(all) = watch_store.list(VNFS).await {
                        for (key, v) in all {
                            if let Ok(r) = serde_json::from_slice::<VnfRecord>(&v.value)
                                && r.vnf.phase == Phase::Running
                            {
                                let name = key.strip_prefix(VNFS).unwrap_or(&key).to_owned();
                                let _ = seen_tx.send((name, now));
                            }
                        }
                    }
                }
            }
        }
        resyncs
    });

    // Creates, `concurrency` in flight.
    let total = args.vnfs;
    let next = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let started_at = Instant::now();
    let mut creators = tokio::task::JoinSet::new();
    for _ in 0..args.concurrency {
        let (controller, caller, next, done) = (
            controller.clone(),
            caller.clone(),
            next.clone(),
            done.clone(),
        );
        creators.spawn(async move {
            let mut out: Vec<(String, Instant, Duration)> = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= total {
                    return Ok::<_, anyhow::Error>(out);
                }
                let name = vnf_name(i);
                let text = descriptor(&name);
                let t0 = Instant::now();
                controller
                    .create_vnf(&caller, text.as_bytes(), Format::Yaml)
                    .await
                    .with_context(|| format!("creating {name}"))?;
                out.push((name, t0, t0.elapsed()));
                done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        });
    }
    let mut created: HashMap<String, Instant> = HashMap::with_capacity(total as usize);
    let mut create_lat = Vec::with_capacity(total as usize);
    let mut ticker = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            joined = creators.join_next() => {
                let Some(joined) = joined else { break };
                for (name, t0, d) in joined.context("a create task panicked")?? {
                    created.insert(name, t0);
                    create_lat.push(ms(d));
                }
            }
            _ = ticker.tick() => {
                progress("creating", done.load(std::sync::atomic::Ordering::Relaxed), u64::from(total));
            }
        }
    }
    let create_wall = started_at.elapsed();
    progress("creating", u64::from(total), u64::from(total));

    // create→Running: first time the watch saw each VNF Running.
    let deadline = Instant::now() + Duration::from_secs(60 + u64::from(total) / 100);
    let mut running_at: HashMap<String, Instant> = HashMap::with_capacity(total as usize);
    while running_at.len() < created.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match tokio::time::timeout(left.min(Duration::from_millis(100)), seen_rx.recv()).await {
            Ok(Some((name, at))) => {
                running_at.entry(name).or_insert(at);
            }
            Ok(None) => break,
            Err(_) => {}
        }
        progress("running", running_at.len() as u64, u64::from(total));
    }
    let to_running: Vec<f64> = running_at
        .iter()
        .filter_map(|(name, at)| {
            created
                .get(name)
                .map(|t0| ms(at.saturating_duration_since(*t0)))
        })
        .collect();
    let running = to_running.len() as u32;

    // List latency, paginated, then the whole list in one call.
    let mut page_lat = Vec::new();
    let mut query = ListQuery {
        limit: Some(PAGE),
        ..ListQuery::default()
    };
    let walk = Instant::now();
    let mut listed = 0usize;
    loop {
        let t0 = Instant::now();
        let page = controller.vnf_page(&caller, &query).await?;
        page_lat.push(ms(t0.elapsed()));
        listed += page.items.len();
        match page.items.last() {
            Some(last) if page.continue_token.is_some() => query.after = Some(last.name.clone()),
            _ => break,
        }
    }
    let walk_ms = ms(walk.elapsed());
    if listed != total as usize {
        bail!("the paginated list returned {listed} VNFs, {total} were created");
    }
    let t0 = Instant::now();
    let all = controller.vnfs(&caller).await?;
    let unpaginated_ms = ms(t0.elapsed());
    if all.len() != total as usize {
        bail!("the list returned {} VNFs, {total} were created", all.len());
    }
    drop(all);

    // Idle CPU: let the last steps settle, then measure with nothing changing.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let window = Duration::from_secs(args.idle_secs);
    progress("idle", 0, 2);
    let idle_cores = cores_over(window).await?;
    progress("idle", 1, 2);

    // Baseline: the former loops' access pattern against the same store, same window length.
    let replay_store = store.clone();
    let replay = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut n = 0u64;
        loop {
            tick.tick().await;
            // The agent pass: every VNF and every authority, every second.
            if let Err(e) = poll_pass(&replay_store, true).await {
                return e;
            }
            // The scheduling pass: every VNF, every two seconds.
            if n.is_multiple_of(2)
                && let Err(e) = poll_pass(&replay_store, false).await
            {
                return e;
            }
            n += 1;
        }
    });
    let baseline_cores = cores_over(window).await;
    replay.abort();
    if let Ok(Ok(e)) = tokio::time::timeout(Duration::from_secs(1), replay).await {
        return Err(e.context("the replayed poll loop failed"));
    }
    let baseline_cores = baseline_cores?;
    progress("idle", 2, 2);

    let rss_after = rss_bytes()?;
    let store_bytes = std::fs::metadata(store_path)
        .with_context(|| format!("reading the size of {}", store_path.display()))?
        .len();
    let compacting = store.clone();
    let compaction_began = Instant::now();
    tokio::task::spawn_blocking(move || compacting.compact())
        .await
        .context("compacting the store")??;
    let compaction_ms = ms(compaction_began.elapsed());
    let compacted_bytes = std::fs::metadata(store_path)
        .with_context(|| format!("reading the size of {}", store_path.display()))?
        .len();
    let live_bytes: usize = store
        .list("/")
        .await?
        .iter()
        .map(|(key, v): &(String, Versioned)| key.len() + v.value.len())
        .sum();

    // Baseline: a create's writes, with the bytes the run stored, as bare transactions.
    let first = vnf_name(0);
    let record = store
        .get(&format!("{VNFS}{first}"))
        .await?
        .context("the first VNF's record")?
        .value;
    let event = store
        .get(&telvirt_controller::records::event_key(&first, 1))
        .await?
        .context("the first VNF's first event")?
        .value;
    progress("baseline", 0, 1);
    let baseline_store_txns_per_s = bare_writes(
        &dir.join("baseline.redb"),
        total,
        args.concurrency,
        &record,
        &event,
    )
    .await?;
    progress("baseline", 1, 1);

    // Latency at a steady rate the node keeps up with, the bulk VNFs in place.
    let mut paced_created: HashMap<String, Instant> = HashMap::new();
    let mut pacer = tokio::time::interval(Duration::from_secs(1) / args.paced_rate);
    pacer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut paced_creates = tokio::task::JoinSet::new();
    for i in 0..args.paced_vnfs {
        pacer.tick().await;
        let name = vnf_name(total + i);
        paced_created.insert(name.clone(), Instant::now());
        let (controller, caller) = (controller.clone(), caller.clone());
        paced_creates.spawn(async move {
            controller
                .create_vnf(&caller, descriptor(&name).as_bytes(), Format::Yaml)
                .await
                .with_context(|| format!("creating {name}"))
        });
        progress("paced", u64::from(i), u64::from(args.paced_vnfs));
    }
    while let Some(done) = paced_creates.join_next().await {
        done.context("a paced create panicked")??;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut paced_at: HashMap<String, Instant> = HashMap::new();
    while paced_at.len() < paced_created.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match tokio::time::timeout(left.min(Duration::from_millis(100)), seen_rx.recv()).await {
            Ok(Some((name, at))) if paced_created.contains_key(&name) => {
                paced_at.entry(name).or_insert(at);
            }
            Ok(Some(_)) | Err(_) => {}
            Ok(None) => break,
        }
    }
    let paced_to_running: Vec<f64> = paced_at
        .iter()
        .filter_map(|(name, at)| {
            paced_created
                .get(name)
                .map(|t0| ms(at.saturating_duration_since(*t0)))
        })
        .collect();
    let paced_running = paced_to_running.len() as u32;
    let paced_create_to_running = latency(paced_to_running);

    let _ = shutdown_tx.send(true);
    scheduler.abort();
    while tasks.join_next().await.is_some() {}
    watcher.abort();
    let watch_resyncs = watcher.await.unwrap_or(0);

    let n = f64::from(total);
    let creates_per_s = n / create_wall.as_secs_f64();
    let create_to_running = latency(to_running);
    let store_per_vnf = store_bytes as f64 / n;
    Ok(ControlReport {
        agents: AGENTS_NOTE,
        measured: "Controller::create_vnf and vnf_page called in process (no HTTP); Running seen \
                   through a store watch",
        vnfs: total,
        hosts: args.hosts,
        concurrency: args.concurrency,
        creates_per_s,
        baseline_store_txns_per_s,
        create_vs_store_ratio: creates_per_s / baseline_store_txns_per_s,
        create: latency(create_lat),
        running,
        goals: Goals {
            creates_per_s_ge_2000: creates_per_s >= 2000.0,
            create_to_running_p99_le_100ms: args.paced_vnfs > 0
                && paced_running == args.paced_vnfs
                && paced_create_to_running.p99_ms <= 100.0,
            idle_cpu_le_1pct_core: idle_cores <= 0.01,
            store_le_2kib_per_vnf: compacted_bytes as f64 / n <= 2048.0,
        },
        create_to_running,
        paced_vnfs: args.paced_vnfs,
        paced_rate_per_s: args.paced_rate,
        paced_running,
        paced_create_to_running,
        watch_resyncs,
        list_page_size: PAGE,
        list_pages: page_lat.len(),
        list_page: latency(page_lat),
        list_paginated_total_ms: walk_ms,
        list_unpaginated_ms: unpaginated_ms,
        idle_secs: args.idle_secs,
        idle_cores,
        baseline_poll_cores: baseline_cores,
        idle_cpu_ratio: if idle_cores > 0.0 {
            baseline_cores / idle_cores
        } else {
            f64::INFINITY
        },
        rss_before_bytes: rss_before,
        rss_after_bytes: rss_after,
        rss_per_vnf_bytes: rss_after.saturating_sub(rss_before) as f64 / n,
        store_bytes,
        store_per_vnf_bytes: store_per_vnf,
        store_live_per_vnf_bytes: live_bytes as f64 / n,
        store_compacted_per_vnf_bytes: compacted_bytes as f64 / n,
        store_compaction_ms: compaction_ms,
    })
}

/// `telvirt bench control`.
pub fn control(format: Output, args: ControlArgs) -> Result<()> {
    let progress = Progress::new(format, "control");
    let report_progress = |_: &str, d, t| progress.update(d, t);
    let bench = run_control_bench(&args, &report_progress);
    let Some(report) = progress.run_bench(format, bench)? else {
        return Ok(());
    };
    let r = &report;
    println!(
        "control plane: {} VNFs on {} hosts; agents: {}",
        r.vnfs, r.hosts, r.agents
    );
    println!("measured: {}", r.measured);
    let yes = |b: bool| if b { "met" } else { "NOT met" }.to_owned();
    println!(
        "{}",
        output::table(
            &["FIGURE", "VALUE", "BASELINE", "RATIO", "GOAL"],
            &[
                vec![
                    format!("creates/s ({} in flight)", r.concurrency),
                    format!("{:.0}", r.creates_per_s),
                    "-".into(),
                    "-".into(),
                    format!(">= 2000: {}", yes(r.goals.creates_per_s_ge_2000)),
                ],
                vec![
                    format!(
                        "creates/s vs bare store writes ({} in flight)",
                        r.concurrency
                    ),
                    format!("{:.0}", r.creates_per_s),
                    format!("{:.0} (store txns/s)", r.baseline_store_txns_per_s),
                    format!("{:.2}", r.create_vs_store_ratio),
                    "-".into(),
                ],
                vec![
                    "create p50 / p99 ms".into(),
                    format!("{:.2} / {:.2}", r.create.p50_ms, r.create.p99_ms),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                ],
                vec![
                    format!(
                        "create→Running p50 / p99 ms, as fast as created ({} Running)",
                        r.running
                    ),
                    format!(
                        "{:.1} / {:.1}",
                        r.create_to_running.p50_ms, r.create_to_running.p99_ms
                    ),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                ],
                vec![
                    format!(
                        "create→Running p50 / p99 ms, {} more at {}/s ({} Running)",
                        r.paced_vnfs, r.paced_rate_per_s, r.paced_running
                    ),
                    format!(
                        "{:.1} / {:.1}",
                        r.paced_create_to_running.p50_ms, r.paced_create_to_running.p99_ms
                    ),
                    "-".into(),
                    "-".into(),
                    format!(
                        "p99 <= 100 ms: {}",
                        yes(r.goals.create_to_running_p99_le_100ms)
                    ),
                ],
                vec![
                    format!("list page of {} p50 / p99 ms", r.list_page_size),
                    format!("{:.2} / {:.2}", r.list_page.p50_ms, r.list_page.p99_ms),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                ],
                vec![
                    format!("list all, {} pages ms", r.list_pages),
                    format!("{:.1}", r.list_paginated_total_ms),
                    format!("{:.1} (one call)", r.list_unpaginated_ms),
                    format!("{:.2}", r.list_unpaginated_ms / r.list_paginated_total_ms),
                    "-".into(),
                ],
                vec![
                    format!("idle CPU, cores ({} s)", r.idle_secs),
                    format!("{:.4}", r.idle_cores),
                    format!("{:.4} (poll loops)", r.baseline_poll_cores),
                    format!("{:.1}", r.idle_cpu_ratio),
                    format!("<= 0.01: {}", yes(r.goals.idle_cpu_le_1pct_core)),
                ],
                vec![
                    "RSS per VNF bytes".into(),
                    format!("{:.0}", r.rss_per_vnf_bytes),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                ],
                vec![
                    "store file per VNF bytes (before compaction)".into(),
                    format!("{:.0}", r.store_per_vnf_bytes),
                    format!("{:.0} (live keys+values)", r.store_live_per_vnf_bytes),
                    format!("{:.2}", r.store_per_vnf_bytes / r.store_live_per_vnf_bytes),
                    "-".into(),
                ],
                vec![
                    "store file per VNF bytes (compacted, as when idle)".into(),
                    format!("{:.0}", r.store_compacted_per_vnf_bytes),
                    format!("{:.0} (live keys+values)", r.store_live_per_vnf_bytes),
                    format!(
                        "{:.2}",
                        r.store_compacted_per_vnf_bytes / r.store_live_per_vnf_bytes
                    ),
                    format!("<= 2048: {}", yes(r.goals.store_le_2kib_per_vnf)),
                ],
                vec![
                    "store compaction, ms (holds every call)".into(),
                    format!("{:.0}", r.store_compaction_ms),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                ],
            ]
        )
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn small_run_reports_every_field_and_every_vnf_runs() {
        let args = ControlArgs {
            vnfs: 200,
            hosts: 4,
            idle_secs: 1,
            paced_vnfs: 20,
            paced_rate: 100,
            concurrency: 16,
        };
        let report = run_control_bench(&args, &|_, _, _| {}).await.unwrap();
        let json = serde_json::to_value(&report).unwrap();
        for field in [
            "agents",
            "measured",
            "vnfs",
            "hosts",
            "creates_per_s",
            "create",
            "running",
            "create_to_running",
            "list_page",
            "list_paginated_total_ms",
            "list_unpaginated_ms",
            "idle_cores",
            "baseline_poll_cores",
            "idle_cpu_ratio",
            "rss_per_vnf_bytes",
            "store_bytes",
            "store_per_vnf_bytes",
            "store_live_per_vnf_bytes",
            "store_compacted_per_vnf_bytes",
            "store_compaction_ms",
            "baseline_store_txns_per_s",
            "goals",
        ] {
            assert!(json.get(field).is_some(), "missing {field}: {json}");
        }
        assert_eq!(json["agents"], AGENTS_NOTE);
        assert_eq!(report.running, 200, "{json}");
        assert_eq!(report.paced_running, 20, "{json}");
        assert!(json.get("paced_create_to_running").is_some(), "{json}");
        assert_eq!(report.list_pages, 1);
        assert!(report.store_bytes > 0);
        assert!(report.baseline_store_txns_per_s > 0.0);
        assert!(report.store_live_per_vnf_bytes > 0.0);
        assert!(
            report.store_compacted_per_vnf_bytes < report.store_per_vnf_bytes,
            "{json}"
        );
    }

    #[tokio::test]
    async fn zero_sizes_are_refused() {
        let args = ControlArgs {
            vnfs: 0,
            hosts: 4,
            idle_secs: 1,
            paced_vnfs: 0,
            paced_rate: 100,
            concurrency: 16,
        };
        let err = run_control_bench(&args, &|_, _, _| {}).await.unwrap_err();
        assert!(err.to_string().contains("--vnfs"), "{err}");
    }
}
