//! `telvirt serve`: an all-in-one node (controller, this host's agent, embedded store).
//!
//! Owns wiring the layers together and the process lifecycle (data dir, client config, signals).
//! It must not hold control-plane logic: that is the controller's and the agent's.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};
use telvirt_agent::{Agent, Runtime, SysRoots, discover};
use telvirt_controller::health::{self, ComponentState};
use telvirt_controller::{Controller, HostRecord, LocalLink, Restart};
use telvirt_sched::{Inventory, SchedConfig};
use telvirt_store::RedbStore;

use crate::cli::ServeArgs;
use crate::config::{CLIENT_CONFIG, ClientConfig, default_data_dir};

/// How often Pending VNFs are tried again when nothing else woke the scheduler.
const SCHEDULE_RETRY: Duration = Duration::from_secs(2);
/// A scheduling loop that panicked starts again after this backoff.
const SCHEDULER_RESTART: Restart = Restart::Backoff {
    first: Duration::from_millis(500),
    max: Duration::from_secs(30),
};
/// How often host liveness is checked when no lease changed (a lapsed lease wakes it at once).
const HOST_CHECK: Duration = Duration::from_secs(2);
/// A data-plane worker whose polling rounds stand still this long is reported down.
const WORKER_STALL: Duration = Duration::from_secs(5);

fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// The runtimes this build can run on this host.
async fn runtimes(args: &ServeArgs, data_dir: &Path) -> Result<Vec<Arc<dyn Runtime>>> {
    let mut out = Vec::new();
    out.extend(crate::vm::vm_runtime(args, data_dir).await?);
    Ok(out)
}

/// This host's record (from the inventory file or from /sys) plus hosts without an agent that
/// the inventory names.
fn host_records(args: &ServeArgs, runtimes: &[String]) -> Result<Vec<HostRecord>> {
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
        telvirt_agent::budget_memory(&mut spec, local.memory_bytes, reserve);
        return Ok(vec![HostRecord {
            spec,
            memory_bytes: local.memory_bytes,
            hugepages: local.hugepages,
            runtimes: runtimes.to_vec(),
            agent: true,
        }]);
    };
    let text =
        fs::read(path).with_context(|| format!("cannot read inventory {}", path.display()))?;
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
                spec,
                memory_bytes: if is_local { local.memory_bytes } else { 0 },
                hugepages: if is_local {
                    local.hugepages.clone()
                } else {
                    Vec::new()
                },
                runtimes: if is_local {
                    runtimes.to_vec()
                } else {
                    Vec::new()
                },
                agent: is_local,
            }
        })
        .collect())
}

fn prepare_data_dir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create data dir {}", dir.display()))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot restrict data dir {}", dir.display()))?;
    Ok(())
}

pub async fn run(args: ServeArgs) -> Result<()> {
    let data_dir = match &args.data_dir {
        Some(d) => d.clone(),
        None => default_data_dir()?,
    };
    prepare_data_dir(&data_dir)?;
    let store = RedbStore::open(&data_dir.join("telvirt.redb"))
        .context("opening the store (is another telvirt serve using this data dir?)")?;
    let controller = Controller::open(store, SchedConfig::default())
        .await
        .context("loading the control plane from the store")?;
    let lease_ttl = Duration::from_millis(args.host_lease_ttl_ms);
    let heartbeat_every = Duration::from_millis(args.heartbeat_interval_ms);
    if heartbeat_every >= lease_ttl {
        bail!(
            "--heartbeat-interval-ms {} must be shorter than --host-lease-ttl-ms {}, or the host would turn NotReady between two heartbeats",
            args.heartbeat_interval_ms,
            args.host_lease_ttl_ms
        );
    }
    controller
        .set_host_lease_ttl(lease_ttl)
        .context("--host-lease-ttl-ms")?;

    let policy = crate::wasm::load_policy(args.security_policy.as_deref(), &controller)?;
    let mut runtimes = runtimes(&args, &data_dir).await?;
    // One data plane per node, shared by the wasm runtime and the network reconciler.
    let dataplane =
        telvirt_agent::dataplane::NodeDataPlane::new().context("starting the data plane")?;
    let wasm = crate::wasm::runtime(&data_dir, Arc::clone(&dataplane), &controller, policy)?;
    runtimes.push(wasm.clone());
    let runtime_names: Vec<String> = runtimes
        .iter()
        .map(|r| r.kind().as_str().to_owned())
        .collect();
    let hosts = host_records(&args, &runtime_names)?;
    let local_host = hosts
        .iter()
        .find(|h| h.agent)
        .map(|h| h.spec.name.clone())
        .context("no local host")?;
    for host in hosts {
        let name = host.spec.name.clone();
        controller
            .register_host(host)
            .await
            .with_context(|| format!("registering host {name}"))?;
    }
    if runtime_names.is_empty() {
        tracing::warn!("no runtime is available on this host: VNFs placed here will fail");
    }

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let address = listener.local_addr()?;

    let config_path = data_dir.join(CLIENT_CONFIG);
    let existing = ClientConfig::read(&config_path).ok();
    let token = match controller
        .ensure_admin(existing.as_ref().map(|c| c.token.as_str()))
        .await?
    {
        Some(new) => new,
        None => existing.map(|c| c.token).unwrap_or_default(),
    };
    ClientConfig {
        server: format!("http://{address}"),
        token,
    }
    .write(&config_path)?;

    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let link: Arc<dyn telvirt_agent::ControlLink> = Arc::new(LocalLink::new(controller.clone()));
    let agent = Arc::new(Agent::new(
        local_host.clone(),
        runtimes,
        Arc::clone(&link),
        data_dir.join("instances"),
    ));
    // Long-lived tasks run supervised: one that ends or panics shows in /v1/healthz.
    let health = Arc::clone(controller.health());
    let workers = Arc::clone(&dataplane);
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
    let network_task =
        crate::net::spawn_reconciler(&controller, Arc::clone(&dataplane), shutdown_rx.clone());
    health.watch("network", network_task);
    // Wasm VNFs' maps: snapshotted every interval and once more, final, at shutdown.
    let snapshot_every = Duration::from_millis(args.snapshot_interval_ms);
    let maps_shutdown = shutdown_rx.clone();
    let maps_task = health.supervise("snapshots", Restart::Never, move || {
        Arc::clone(&wasm).persist_maps(snapshot_every, maps_shutdown.clone())
    });
    // This host's liveness lease, and what a lapsed lease means for the VNFs of any host.
    let (beat_host, beat_shutdown) = (local_host.clone(), shutdown_rx.clone());
    health.supervise("heartbeat", SCHEDULER_RESTART, move || {
        telvirt_agent::reconcile::heartbeat_loop(
            beat_host.clone(),
            Arc::clone(&link),
            heartbeat_every,
            beat_shutdown.clone(),
        )
    });
    let monitor = controller.clone();
    health.supervise("hosts", SCHEDULER_RESTART, move || {
        Arc::clone(&monitor).host_monitor(HOST_CHECK)
    });
    let agent_task = health.supervise(health::AGENT, Restart::Never, move || {
        Arc::clone(&agent).run(shutdown_rx.clone())
    });
    // Each pass starts over from the Pending VNFs in the store: safe to restart.
    let scheduling = controller.clone();
    health.supervise(health::SCHEDULER, SCHEDULER_RESTART, move || {
        Arc::clone(&scheduling).scheduling_loop(SCHEDULE_RETRY)
    });

    tracing::info!(
        "telvirt serving on http://{address} (host {local_host}, data dir {}, client config {})",
        data_dir.display(),
        config_path.display()
    );
    axum::serve(listener, telvirt_controller::router(controller))
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("serving the API")?;
    health.stopping();
    let _ = shutdown_tx.send(true);
    let _ = agent_task.await;
    let _ = maps_task.await;
    tracing::info!("telvirt stopped");
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("cannot watch SIGTERM: {e}");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
