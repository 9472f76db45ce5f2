//! A host agent as the binary runs it: in `telvirt serve` beside the controller (in-process
//! link), or alone as `telvirt agent` against a controller over HTTP with a node credential.
//!
//! Owns building the agent's parts from its flags (host facts, runtimes, data plane) and
//! starting its supervised tasks (reconcile loop, heartbeat, node calls, map snapshots,
//! standby replication). It must not hold agent logic (the agent crate's) nor reach the
//! controller other than through the [`ControlLink`] it is given.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};
use telvirt_agent::dataplane::NodeDataPlane;
use telvirt_agent::fencing::Fencing;
use telvirt_agent::network::NetworkReconciler;
use telvirt_agent::replication::{Detection, MAX_SILENCE};
use telvirt_agent::runtimes::vm::VmRuntime;
use telvirt_agent::runtimes::wasm::WasmRuntime;
use telvirt_agent::{
    Agent, AgentConfig, ControlLink, ModuleCache, ReplicaState, Replicas, Runtime, StandbyHost,
    SysRoots, discover, node_call_loop, serve_standbys,
};
use telvirt_api::HostRecord;
use telvirt_controller::Restart;
use telvirt_controller::health::{self, ComponentState, HealthRegistry};
use telvirt_dataplane::vxlan::VxlanEndpoint;
use telvirt_sched::Inventory;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::cli::{AgentArgs, HostAgentArgs, RuntimeArg};
use crate::wasm::HostNodeHandler;

/// A task that panicked starts again after this backoff.
pub const TASK_RESTART: Restart = Restart::Backoff {
    first: Duration::from_millis(500),
    max: Duration::from_secs(30),
};
/// A data-plane worker whose polling rounds stand still this long is reported down.
const WORKER_STALL: Duration = Duration::from_secs(5);

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// One host's agent, built but not started.
pub struct HostAgent {
    /// This host, as the agent registers it.
    pub record: HostRecord,
    /// Every host of the inventory in its order, this one included: the all-in-one node
    /// registers the others (without an agent) for placement; a remote agent ignores them.
    pub inventory: Vec<HostRecord>,
    runtimes: Vec<Arc<dyn Runtime>>,
    pub dataplane: Arc<NodeDataPlane>,
    /// Applies the networks the controller sends to `dataplane`.
    networks: Arc<NetworkReconciler>,
    wasm: Arc<WasmRuntime>,
    /// The vm runtime, when this host offers it.
    vm: Option<Arc<VmRuntime>>,
    /// Where this host's standby instances receive their actives' maps (with a tunnel address).
    replication: Option<std::net::TcpListener>,
    data_dir: PathBuf,
    heartbeat_every: Duration,
    snapshot_every: Duration,
    fencing: Arc<Fencing>,
    detection: Detection,
}

impl HostAgent {
    /// This host's facts (inventory file or /sys), its runtimes and data plane. Uploaded
    /// modules are read from `module_dir`.
    pub async fn build(
        args: &HostAgentArgs,
        mut inventory: Vec<HostRecord>,
        data_dir: &Path,
        module_dir: &Path,
        policy: telvirt_runtime_wasm::SecurityPolicy,
    ) -> Result<Self> {
        let detection = Detection {
            interval: Duration::from_millis(args.pair_interval_ms),
            multiplier: args.pair_detect_multiplier,
        };
        if detection.silence() > MAX_SILENCE {
            bail!(
                "--pair-interval-ms {} times --pair-detect-multiplier {} is {} ms of silence; at most {} ms",
                args.pair_interval_ms,
                args.pair_detect_multiplier,
                detection.silence().as_millis(),
                MAX_SILENCE.as_millis()
            );
        }
        // One data plane per node, shared by the runtimes and the network reconciler.
        let dataplane =
            NodeDataPlane::new(std::time::Duration::from_micros(args.worker_idle_spin_us))
                .context("starting the data plane")?;
        let mut runtimes: Vec<Arc<dyn Runtime>> = Vec::new();
        let mut vm = None;
        if args.runtimes.contains(&RuntimeArg::Vm) {
            vm = crate::vm::vm_runtime(args, data_dir, Arc::clone(&dataplane)).await?;
            runtimes.extend(vm.clone().map(|r| r as Arc<dyn Runtime>));
        }
        if args.no_busy_poll {
            dataplane.forbid_busy_poll();
        } else {
            // A VNF whose worker busy-polls its dedicated core has that core to itself.
            dataplane.confine_housekeeping();
        }
        // Gates this host's instances: a standby never forwards, an active with a standby only
        // while this host holds its lease or the standby hears it.
        let fencing = Arc::new(Fencing::new());
        let wasm = crate::wasm::runtime(
            data_dir,
            module_dir,
            Arc::clone(&dataplane),
            policy,
            Arc::clone(&fencing),
        )?;
        // Built either way (the standby replication and snapshots hold it); offered only when
        // asked for.
        if args.runtimes.contains(&RuntimeArg::Wasm) {
            runtimes.push(wasm.clone());
        }
        let names: Vec<String> = runtimes
            .iter()
            .map(|r| r.kind().as_str().to_owned())
            .collect();
        // A vm VNF moves only to a host whose QEMU is as new as its source's ...
        let qemu = match &vm {
            Some(vm) => {
                let version = vm.qemu_version().await;
                if version.is_none() {
                    tracing::warn!(
                        "the QEMU of the vm runtime did not tell its version: vm moves to and from this host are not checked for a version match"
                    );
                }
                version
            }
            None => None,
        };
        // ... and has the machine type of the guest it takes in.
        let qemu_machines = match &vm {
            Some(vm) => vm.machine_types().await,
            None => Vec::new(),
        };
        // ... and whose guests run under KVM, when it is a KVM guest (unknown until probed).
        let accel = vm.as_ref().and_then(|vm| vm.known_accel());
        for record in inventory.iter_mut().filter(|h| h.agent) {
            record.runtimes.clone_from(&names);
            record.qemu.clone_from(&qemu);
            record.qemu_machines.clone_from(&qemu_machines);
            record.accel = accel;
        }
        let mut record = inventory
            .iter()
            .find(|h| h.agent)
            .cloned()
            .context("no local host")?;
        // Links from other hosts arrive here over UDP, standby replication over TCP, on the
        // same address and port.
        let (vxlan, replication) = match &args.tunnel_address {
            None => (None, None),
            Some(text) => {
                let address = tunnel_address(text)?;
                let pool = Arc::clone(dataplane.panel().pool());
                let (endpoint, listener) = tunnel_sockets(address, &pool)
                    .with_context(|| format!("--tunnel-address {text}"))?;
                // Read while no tunnel does, so late datagrams are counted, not left unseen.
                dataplane.add_node(
                    telvirt_dataplane::vxlan::DRAIN_NODE,
                    &[],
                    0,
                    Box::new(endpoint.drain_node()),
                )?;
                record.tunnel = Some(endpoint.local_addr().to_string());
                (Some(endpoint), Some(listener))
            }
        };
        let networks = NetworkReconciler::new(Arc::clone(&dataplane))
            .with_host(&record.spec.name, vxlan)
            .with_host_port_mode(args.host_port_socket.mode())
            .with_departures_file(data_dir.join("network-departures.json"));
        Ok(Self {
            record,
            inventory,
            runtimes,
            networks: Arc::new(networks),
            dataplane,
            wasm,
            vm,
            replication,
            data_dir: data_dir.to_owned(),
            heartbeat_every: Duration::from_millis(args.heartbeat_interval_ms),
            snapshot_every: Duration::from_millis(args.snapshot_interval_ms),
            fencing,
            detection,
        })
    }

    pub fn name(&self) -> &str {
        &self.record.spec.name
    }

    /// Starts the agent's tasks under `health`: the data plane's workers followed, map
    /// snapshots, heartbeat, node calls and the reconcile loop (whose handle is returned, with
    /// the snapshots', to wait for at shutdown). `modules`: fetch uploaded modules into it.
    pub fn start(
        self,
        link: Arc<dyn ControlLink>,
        health: &Arc<HealthRegistry>,
        config: AgentConfig,
        modules: Option<ModuleCache>,
        shutdown: watch::Receiver<bool>,
    ) -> Vec<JoinHandle<()>> {
        let host = self.record.spec.name.clone();
        let mut agent = Agent::with_config(
            host.clone(),
            self.runtimes,
            Arc::clone(&link),
            self.data_dir.join("instances"),
            config,
        );
        if let Some(cache) = &modules {
            agent = agent.with_module_cache(cache.clone());
        }
        let state: Arc<dyn ReplicaState> = self.wasm.clone();
        let mut replicas = Replicas::new(Arc::clone(&state), self.detection)
            .with_fencing(Arc::clone(&self.fencing));
        // Its standbys' hosts know it by its tunnel address: its streams leave from there.
        if let Some(ip) = self
            .record
            .tunnel
            .as_deref()
            .and_then(|t| t.parse::<std::net::SocketAddr>().ok())
        {
            replicas = replicas.with_source(ip.ip());
        }
        agent = agent
            .with_replication(Arc::new(replicas))
            .with_fencing(Arc::clone(&self.fencing));
        let agent = Arc::new(agent);
        // This host's standby instances take their actives' maps.
        if let Some(listener) = self.replication {
            match tokio::net::TcpListener::from_std(listener) {
                Ok(listener) => {
                    let listener = Arc::new(listener);
                    let standbys: Arc<dyn StandbyHost> = agent.clone();
                    health.supervise("replication", TASK_RESTART, move || {
                        serve_standbys(
                            Arc::clone(&listener),
                            Arc::clone(&state),
                            Arc::clone(&standbys),
                        )
                    });
                }
                Err(e) => tracing::warn!("standby replication cannot listen: {e}"),
            }
        }
        let workers = Arc::clone(&self.dataplane);
        health.follow(health::DATAPLANE, move || {
            let stalled = workers.stalled_workers(WORKER_STALL);
            let Some(longest) = stalled.iter().map(|(_, d)| *d).max() else {
                return ComponentState::running();
            };
            let reason = stalled
                .iter()
                .map(|(name, d)| {
                    format!(
                        "worker {name} made no polling round for {} ms",
                        d.as_millis()
                    )
                })
                .collect::<Vec<_>>()
                .join("; ");
            let now = SystemTime::now();
            ComponentState::down_since(reason, now.checked_sub(longest).unwrap_or(now))
        });
        let handler: Arc<dyn telvirt_agent::NodeHandler> = Arc::new(HostNodeHandler {
            wasm: Arc::clone(&self.wasm),
            vm: self.vm.clone(),
            instances: self.data_dir.join("instances"),
            networks: Arc::clone(&self.networks),
        });
        // The networks the controller sends this host, on its data plane.
        let (net_host, net_link, networks, net_shutdown) = (
            host.clone(),
            Arc::clone(&link),
            Arc::clone(&self.networks),
            shutdown.clone(),
        );
        health.supervise(health::NETWORK, TASK_RESTART, move || {
            telvirt_agent::network_loop(
                net_host.clone(),
                Arc::clone(&net_link),
                Arc::clone(&networks),
                net_shutdown.clone(),
            )
        });
        // Wasm VNFs' maps: snapshotted every interval and once more, final, at shutdown.
        let (wasm, every, maps_shutdown) = (self.wasm, self.snapshot_every, shutdown.clone());
        let maps_task = health.supervise("snapshots", Restart::Never, move || {
            Arc::clone(&wasm).persist_maps(every, maps_shutdown.clone())
        });
        // This host's liveness lease.
        let (beat_host, beat_link, beat_every, beat_shutdown) = (
            host.clone(),
            Arc::clone(&link),
            self.heartbeat_every,
            shutdown.clone(),
        );
        let fencing = Arc::clone(&self.fencing);
        let kept = Arc::clone(&self.networks);
        let departed = telvirt_agent::reconcile::DepartedNetworks {
            changed: kept.departed_changed(),
            names: Arc::new(move || kept.departed_networks()),
        };
        health.supervise("heartbeat", TASK_RESTART, move || {
            telvirt_agent::reconcile::heartbeat_loop(
                beat_host.clone(),
                Arc::clone(&beat_link),
                beat_every,
                Some(Arc::clone(&fencing)),
                Some(departed.clone()),
                beat_shutdown.clone(),
            )
        });
        // Calls the controller routes to this host (maps, counters, upgrades).
        let calls_shutdown = shutdown.clone();
        health.supervise("node-calls", TASK_RESTART, move || {
            node_call_loop(
                host.clone(),
                Arc::clone(&link),
                Arc::clone(&handler),
                modules.clone(),
                calls_shutdown.clone(),
            )
        });
        let agent_task = health.supervise(health::AGENT, Restart::Never, move || {
            Arc::clone(&agent).run(shutdown.clone())
        });
        vec![agent_task, maps_task]
    }
}

/// The tunnel's UDP endpoint and the replication's TCP listener on one address and port. Port 0
/// picks a port free for both: TCP first (its ephemeral ports are the busier), then UDP on the
/// same number, tried again when that one is taken.
fn tunnel_sockets(
    address: std::net::SocketAddr,
    pool: &Arc<telvirt_dataplane::pool::Pool>,
) -> Result<(Arc<VxlanEndpoint>, std::net::TcpListener)> {
    const ATTEMPTS: u32 = 32;
    let mut last = None;
    for _ in 0..if address.port() == 0 { ATTEMPTS } else { 1 } {
        let listener = std::net::TcpListener::bind(address)
            .with_context(|| format!("cannot receive standby replication on TCP {address}"))?;
        let bound = listener.local_addr()?;
        match VxlanEndpoint::bind(bound, Arc::clone(pool)) {
            Ok(endpoint) => {
                listener.set_nonblocking(true)?;
                return Ok((endpoint, listener));
            }
            Err(e) => last = Some(e),
        }
    }
    let e = last.map_or_else(|| "no attempt".to_owned(), |e| e.to_string());
    bail!("cannot receive tunnels on UDP {address}: {e}")
}

/// `--tunnel-address IP[:PORT]` (port 4789 when left out).
fn tunnel_address(text: &str) -> Result<std::net::SocketAddr> {
    let address = match text.parse::<std::net::SocketAddr>() {
        Ok(a) => a,
        Err(_) => {
            let ip: std::net::IpAddr = text.parse().map_err(|_| {
                anyhow::anyhow!(
                    "--tunnel-address {text}: not IP or IP:PORT (e.g. 10.0.0.5 or 10.0.0.5:4789)"
                )
            })?;
            std::net::SocketAddr::new(ip, telvirt_dataplane::vxlan::VXLAN_PORT)
        }
    };
    // Other hosts send to it, and know this host's replication streams by it.
    if address.ip().is_unspecified() {
        anyhow::bail!(
            "--tunnel-address {text}: an address other hosts reach this one at, not {} (e.g. 10.0.0.5 or 10.0.0.5:4789)",
            address.ip()
        );
    }
    Ok(address)
}

/// This host's record (from the inventory file or from /sys; its runtimes are filled in by
/// [`HostAgent::build`]), and the hosts without an agent the inventory names beside it. Read
/// before anything is written, so a bad `--inventory`, `--shared-cpus`, `--memory-reserve` or
/// `--qemu-user` leaves the data dir as it was.
pub fn host_records(args: &HostAgentArgs) -> Result<Vec<HostRecord>> {
    // A user every QEMU shares must exist and not be root; a host without the vm runtime
    // starts no QEMU, and does not look.
    if let telvirt_runtime_vm::QemuUser::Named(name) = &args.qemu_user
        && args.runtimes.contains(&RuntimeArg::Vm)
    {
        use telvirt_runtime_vm::confine;
        confine::named_account(name, confine::lookup_user)
            .map_err(|e| anyhow::anyhow!("--qemu-user {name}: {e}"))?;
    }
    let local = discover(
        &args.host_name.clone().unwrap_or_else(hostname),
        &SysRoots::default(),
    )
    .context("discovering this host from /sys")?;
    let reserve = args.memory_reserve.map_or_else(
        || telvirt_agent::default_memory_reserve(local.memory_bytes),
        |r| r.bytes(),
    );
    if reserve >= local.memory_bytes {
        bail!(
            "--memory-reserve {} leaves nothing of this host's {} bytes of memory for VNFs",
            args.memory_reserve
                .map(|r| r.to_string())
                .unwrap_or_default(),
            local.memory_bytes
        );
    }
    let Some(path) = &args.inventory else {
        let mut spec = local.spec;
        if let Some(shared) = &args.shared_cpus {
            let online: Vec<u32> = spec
                .sockets
                .iter()
                .flat_map(|s| &s.numa_nodes)
                .flat_map(|n| &n.cores)
                .flat_map(|c| c.cpus().iter().copied())
                .collect();
            if let Some(cpu) = shared.cpus().iter().find(|c| !online.contains(c)) {
                bail!(
                    "--shared-cpus {shared}: CPU {cpu} is not online on this host (online: {})",
                    telvirt_sched::CpuList::from_cpus(online)
                );
            }
            spec.shared = shared.clone();
        }
        telvirt_agent::budget_memory(&mut spec, local.memory_bytes, reserve);
        return Ok(vec![HostRecord {
            qemu_machines: Vec::new(),
            accel: None,
            // A KVM guest on the host's CPU moves only to a host with the same one.
            cpu: local.cpu,
            spec,
            memory_bytes: local.memory_bytes,
            hugepages: local.hugepages,
            runtimes: Vec::new(),
            agent: true,
            tunnel: None,
            qemu: None,
        }]);
    };
    let text =
        std::fs::read(path).with_context(|| format!("cannot read inventory {}", path.display()))?;
    let inventory: Inventory = telvirt_model::from_text(&text, telvirt_model::Format::Yaml)
        .map_err(|e| anyhow::anyhow!("inventory {}: {e}", path.display()))?;
    if inventory.hosts.is_empty() {
        bail!("inventory {} lists no hosts", path.display());
    }
    let local_name = args
        .host_name
        .clone()
        .unwrap_or_else(|| inventory.hosts[0].name.clone());
    if !inventory.hosts.iter().any(|h| h.name == local_name) {
        bail!(
            "inventory {} has no host named {local_name}; name this host with --host-name",
            path.display()
        );
    }
    Ok(inventory
        .hosts
        .into_iter()
        .map(|mut spec| {
            let is_local = spec.name == local_name;
            if is_local {
                telvirt_agent::budget_memory(&mut spec, local.memory_bytes, reserve);
            }
            HostRecord {
                qemu_machines: Vec::new(),
                accel: None,
                cpu: local.cpu.clone().filter(|_| is_local),
                spec,
                memory_bytes: if is_local { local.memory_bytes } else { 0 },
                hugepages: if is_local {
                    local.hugepages.clone()
                } else {
                    Vec::new()
                },
                runtimes: Vec::new(),
                agent: is_local,
                tunnel: None,
                qemu: None,
            }
        })
        .collect())
}

/// `telvirt agent`: this host's agent against a controller over HTTP. Registers the host,
/// then runs until SIGTERM or Ctrl-C; instances keep running when it stops (a restarted agent
/// adopts them).
pub async fn run(args: AgentArgs) -> Result<()> {
    let data_dir = crate::serve::data_dir(&args.node)?;
    let token = std::fs::read_to_string(&args.token_file)
        .with_context(|| format!("cannot read --token-file {}", args.token_file.display()))?
        .trim()
        .to_owned();
    if !token.starts_with(telvirt_api::NODE_TOKEN_PREFIX) {
        bail!(
            "--token-file {} does not hold a node credential (tvn_...); issue one with `telvirt host credential NAME --out FILE`",
            args.token_file.display()
        );
    }
    let inventory = host_records(&args.agent)?;
    let policy = crate::wasm::load_policy(args.node.security_policy.as_deref())?;
    let modules = ModuleCache::new(data_dir.join("modules"));
    let host = HostAgent::build(&args.agent, inventory, &data_dir, modules.dir(), policy).await?;
    if host.inventory.len() > 1 {
        tracing::warn!(
            "inventory names {} other host(s); an agent registers only its own ({})",
            host.inventory.len() - 1,
            host.name()
        );
    }
    let link = Arc::new(
        crate::agent_link::HttpLink::new(
            &args.controller,
            host.name(),
            token,
            crate::tls::http_client_from(args.controller_ca.as_ref()).context("--controller-ca")?,
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?,
    );
    register(link.as_ref(), &host.record, &args.controller).await?;
    let health = Arc::new(HealthRegistry::new());
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let name = host.name().to_owned();
    let config = args.agent.agent_config();
    let tasks = host.start(link, &health, config, Some(modules), shutdown_rx);
    tracing::info!(
        "telvirt agent of host {name} serving controller {} (data dir {})",
        args.controller,
        data_dir.display()
    );
    match args.health_listen {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on --health-listen {addr}"))?;
            tracing::info!(
                "health of the agent at http://{}/v1/healthz",
                listener.local_addr()?
            );
            axum::serve(
                listener,
                telvirt_controller::http::health_router(Arc::clone(&health)),
            )
            .with_graceful_shutdown(crate::serve::shutdown_signal())
            .await
            .context("serving the agent's health")?;
        }
        None => crate::serve::shutdown_signal().await,
    }
    health.stopping();
    let _ = shutdown_tx.send(true);
    for task in tasks {
        let _ = task.await;
    }
    tracing::info!("telvirt agent stopped");
    Ok(())
}

/// Registers the host, retrying while the controller cannot be reached (it may start after
/// the agent); a refusal (bad credential, bad record) ends the agent with its reason.
async fn register(link: &dyn ControlLink, record: &HostRecord, controller: &str) -> Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match link.register(record).await {
            Ok(()) => return Ok(()),
            Err(telvirt_api::LinkError::Transport(e)) if tokio::time::Instant::now() < deadline => {
                tracing::warn!("controller {controller} unreachable, retrying: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => bail!(
                "registering host {} with {controller}: {e}",
                record.spec.name
            ),
        }
    }
}

#[cfg(test)]
mod tunnel_address_tests {
    use super::{tunnel_address, tunnel_sockets};

    #[test]
    fn the_tunnel_and_replication_share_one_port_and_a_taken_one_is_named() {
        let pool = std::sync::Arc::new(
            telvirt_dataplane::pool::Pool::new("tunnel-test", 64, 2048).unwrap(),
        );
        // Port 0: one port free for both.
        let (endpoint, listener) = tunnel_sockets("127.0.0.1:0".parse().unwrap(), &pool).unwrap();
        assert_eq!(endpoint.local_addr(), listener.local_addr().unwrap());
        // An explicit port whose TCP side is taken: refused, naming replication.
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let err = tunnel_sockets(taken.local_addr().unwrap(), &pool)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("standby replication on TCP"), "{err}");
    }

    #[test]
    fn a_tunnel_address_is_an_ip_with_an_optional_port_and_anything_else_is_named() {
        assert_eq!(
            tunnel_address("10.0.0.5").unwrap().to_string(),
            "10.0.0.5:4789"
        );
        assert_eq!(
            tunnel_address("10.0.0.5:5000").unwrap().to_string(),
            "10.0.0.5:5000"
        );
        for bad in ["", "h1", "10.0.0.5:port", "10.0.0.256"] {
            let err = tunnel_address(bad).unwrap_err().to_string();
            assert!(
                err.contains("--tunnel-address") && err.contains("IP:PORT"),
                "{bad}: {err}"
            );
        }
        for unspecified in ["0.0.0.0", "[::]:4789"] {
            let err = tunnel_address(unspecified).unwrap_err().to_string();
            assert!(
                err.contains("other hosts reach this one at"),
                "{unspecified}: {err}"
            );
        }
    }
}
