//! `telvirt serve` (an all-in-one node: controller, this host's agent, embedded store) and
//! `telvirt controller` (the control plane alone; agents join with `telvirt agent`).
//!
//! Owns wiring the layers together and the process lifecycle (data dir, client config, signals).
//! It must not hold control-plane logic: that is the controller's and the agent's. The local
//! agent talks to the controller through the same protocol a remote one does (in-process link).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use telvirt_agent::ControlLink;
use telvirt_controller::health;
use telvirt_controller::{Controller, LocalLink};
use telvirt_runtime_wasm::SecurityPolicy;
use telvirt_sched::SchedConfig;
use telvirt_store::{RedbStore, StoreUrl, parse_store_url};

use crate::agent::{HostAgent, TASK_RESTART};
use crate::cli::{ControlArgs, ControllerArgs, NodeArgs, ServeArgs};
use crate::config::{CLIENT_CONFIG, ClientConfig, default_data_dir};

/// The embedded store's file in the data dir, unless `--store` names another.
pub const STORE_FILE: &str = "telvirt.redb";
/// How often Pending VNFs are tried again when nothing else woke the scheduler.
const SCHEDULE_RETRY: Duration = Duration::from_secs(2);
/// How often host liveness is checked when no lease changed (a lapsed lease wakes it at once).
const HOST_CHECK: Duration = Duration::from_secs(2);
/// How often the store's history is compacted, keeping one interval of it for watchers.
const HISTORY_COMPACTION: Duration = Duration::from_secs(300);

/// The node's data dir (flag, environment or default), created and private.
pub fn data_dir(node: &NodeArgs) -> Result<PathBuf> {
    let dir = match &node.data_dir {
        Some(d) => d.clone(),
        None => default_data_dir()?,
    };
    fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create data dir {}", dir.display()))?;
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot restrict data dir {}", dir.display()))?;
    Ok(dir)
}

/// A started control plane: the controller with its loops running, and its API's listener.
struct ControlPlane {
    controller: Arc<Controller>,
    listener: tokio::net::TcpListener,
    address: std::net::SocketAddr,
    config_path: PathBuf,
    /// The API's TLS (`None`: plain HTTP on loopback, `--plain-http`).
    tls: Option<crate::tls::ServerIdentity>,
}

impl ControlPlane {
    /// The API's base URL as a client on this machine reaches it.
    fn url(&self) -> String {
        api_url(self.tls.is_some(), self.address)
    }
}

/// `scheme://address` of an API served with or without TLS, a wildcard address made loopback.
pub fn api_url(tls: bool, address: std::net::SocketAddr) -> String {
    format!("{}://{}", crate::tls::scheme(tls), reachable(address))
}

/// How a started API is protected, for its log line: the certificate's fingerprint, or that it
/// is not.
pub fn protection(tls: Option<&crate::tls::ServerIdentity>) -> String {
    match tls {
        Some(id) => format!("TLS certificate SHA-256 {}", id.fingerprint),
        None => "plain HTTP on loopback (--plain-http)".to_owned(),
    }
}

/// Opens the embedded store, binds the API (over `tls`, from [`crate::tls::server_identity`],
/// checked before anything is written) and starts the controller on it ([`start_controller`]).
async fn start_control_plane(
    control: &ControlArgs,
    data_dir: &Path,
    policy: &SecurityPolicy,
    tls: Option<crate::tls::ServerIdentity>,
) -> Result<ControlPlane> {
    let path = match control.store.as_deref().map(parse_store_url).transpose()? {
        None => data_dir.join(STORE_FILE),
        Some(StoreUrl::Redb(path)) => path,
        Some(StoreUrl::Etcd { .. }) => bail!(
            "--store etcd://… is for `telvirt controller` (a cluster's control plane); `telvirt serve` runs the embedded store"
        ),
    };
    let store = RedbStore::open(&path)
        .context("opening the store (is another telvirt process using this data dir?)")?;
    let listener = tokio::net::TcpListener::bind(control.listen)
        .await
        .with_context(|| format!("cannot listen on {}", control.listen))?;
    let address = listener.local_addr()?;
    let anchor = tls.as_ref().map(|t| t.anchor_pem.as_str());
    let (controller, config_path) =
        start_controller(store, control, data_dir, policy, address, anchor).await?;
    Ok(ControlPlane {
        controller,
        listener,
        address,
        config_path,
        tls,
    })
}

/// Loads the controller from `store`, writes the admin's client config (pointing at
/// `address`, over TLS trusting `anchor` when there is one, else plain HTTP) and starts the supervised host-liveness and scheduling loops: what the one
/// controller of a node, or the leader of a cluster, runs.
pub async fn start_controller(
    store: Arc<dyn telvirt_store::Store>,
    control: &ControlArgs,
    data_dir: &Path,
    policy: &SecurityPolicy,
    address: std::net::SocketAddr,
    anchor: Option<&str>,
) -> Result<(Arc<Controller>, PathBuf)> {
    let controller = Controller::open(store, SchedConfig::default())
        .await
        .context("loading the control plane from the store")?;
    controller
        .set_host_lease_ttl(Duration::from_millis(control.host_lease_ttl_ms))
        .context("--host-lease-ttl-ms")?;
    controller
        .set_heal_after((!control.no_heal).then(|| Duration::from_millis(control.heal_after_ms)));
    controller.set_move_deadline(Duration::from_millis(control.move_timeout_ms));
    crate::wasm::control_wasm(&controller, data_dir, policy)?;

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
        server: api_url(anchor.is_some(), address),
        token,
        ca: anchor.map(str::to_owned),
    }
    .write(&config_path)?;

    let health = Arc::clone(controller.health());
    let monitor = controller.clone();
    health.supervise("hosts", TASK_RESTART, move || {
        Arc::clone(&monitor).host_monitor(HOST_CHECK)
    });
    // Each pass starts over from the Pending VNFs in the store: safe to restart.
    let scheduling = controller.clone();
    health.supervise(health::SCHEDULER, TASK_RESTART, move || {
        Arc::clone(&scheduling).scheduling_loop(SCHEDULE_RETRY)
    });
    // etcd's database grows with every revision until compacted (a no-op on redb).
    let compactor = controller.clone();
    health.supervise("history", TASK_RESTART, move || {
        Arc::clone(&compactor).history_compactor(HISTORY_COMPACTION)
    });
    Ok((controller, config_path))
}

/// `address` as a client on this machine reaches it: a wildcard listen address becomes
/// loopback.
pub fn reachable(address: std::net::SocketAddr) -> std::net::SocketAddr {
    let mut reach = address;
    if reach.ip().is_unspecified() {
        reach.set_ip(match reach {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    reach
}

/// Serves the API until SIGTERM or Ctrl-C, then tells the other tasks to stop.
async fn serve_api(cp: ControlPlane, shutdown: tokio::sync::watch::Sender<bool>) -> Result<()> {
    let health = Arc::clone(cp.controller.health());
    crate::tls::serve(
        cp.listener,
        cp.tls.map(|t| t.config),
        telvirt_controller::router(cp.controller),
        shutdown_signal(),
    )
    .await
    .context("serving the API")?;
    health.stopping();
    let _ = shutdown.send(true);
    Ok(())
}

pub async fn run(args: ServeArgs) -> Result<()> {
    let data_dir = data_dir(&args.node)?;
    if args.agent.heartbeat_interval_ms >= args.control.host_lease_ttl_ms {
        bail!(
            "--heartbeat-interval-ms {} must be shorter than --host-lease-ttl-ms {}, or the host would turn NotReady between two heartbeats",
            args.agent.heartbeat_interval_ms,
            args.control.host_lease_ttl_ms
        );
    }
    let inventory = crate::agent::host_records(&args.agent)?;
    let policy = crate::wasm::load_policy(args.node.security_policy.as_deref())?;
    let tls = crate::tls::server_identity(&args.control.tls, &data_dir, args.control.listen)?;
    let cp = start_control_plane(&args.control, &data_dir, &policy, tls).await?;
    let controller = cp.controller.clone();
    // The controller's module directory is this agent's too: nothing to fetch.
    let host = HostAgent::build(
        &args.agent,
        inventory,
        &data_dir,
        &data_dir.join("modules"),
        policy,
    )
    .await?;
    let local_host = host.name().to_owned();
    if host.record.runtimes.is_empty() {
        tracing::warn!("no runtime is available on this host: VNFs placed here will fail");
    }
    for record in &host.inventory {
        let name = record.spec.name.clone();
        controller
            .register_host(record.clone())
            .await
            .with_context(|| format!("registering host {name}"))?;
    }

    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let health = Arc::clone(controller.health());
    let link: Arc<dyn ControlLink> = Arc::new(LocalLink::new(controller.clone(), &local_host));
    let config = args.agent.agent_config();
    let tasks = host.start(link, &health, config, None, shutdown_rx);

    tracing::info!(
        "telvirt serving on {} (host {local_host}, data dir {}, client config {}, {}); web console at {}/ui/",
        cp.url(),
        data_dir.display(),
        cp.config_path.display(),
        protection(cp.tls.as_ref()),
        cp.url(),
    );
    serve_api(cp, shutdown_tx).await?;
    for task in tasks {
        let _ = task.await;
    }
    tracing::info!("telvirt stopped");
    Ok(())
}

/// `telvirt controller`: the API, store and scheduler, without an agent of its own. With an
/// etcd store it is one of a cluster's controllers ([`crate::ha`]).
pub async fn run_controller(args: ControllerArgs) -> Result<()> {
    let data_dir = data_dir(&args.node)?;
    let policy = crate::wasm::load_policy(args.node.security_policy.as_deref())?;
    if let Some(StoreUrl::Etcd {
        endpoints,
        namespace,
    }) = args
        .control
        .store
        .as_deref()
        .map(parse_store_url)
        .transpose()?
    {
        return crate::ha::run(&args.control, &data_dir, policy, &endpoints, &namespace).await;
    }
    let tls = crate::tls::server_identity(&args.control.tls, &data_dir, args.control.listen)?;
    let cp = start_control_plane(&args.control, &data_dir, &policy, tls).await?;
    tracing::info!(
        "telvirt controller serving on {} (data dir {}, client config {}, {}); add hosts with `telvirt host credential NAME --out FILE` and `telvirt agent --controller-ca`",
        cp.url(),
        data_dir.display(),
        cp.config_path.display(),
        protection(cp.tls.as_ref()),
    );
    let (shutdown_tx, _) = tokio::sync::watch::channel(false);
    serve_api(cp, shutdown_tx).await?;
    tracing::info!("telvirt controller stopped");
    Ok(())
}

pub async fn shutdown_signal() {
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
