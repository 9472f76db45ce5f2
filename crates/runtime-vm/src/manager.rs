//! VM lifecycle: one qemu-system-x86_64 process per VM, started paused, pinned, peripherals
//! plugged, resumed, Running once the guest agent says ready; lock/unlock, graceful stop, kill,
//! crash detection, console log, re-adoption after a manager restart, attach/detach. Owns the
//! QEMU command line and the per-VM state directory; must not know descriptors or the store.
//! QEMU runs confined as `confine` decides (seccomp sandbox, unprivileged user; ADR 044): every
//! file, device or socket it needs after start reaches it as a descriptor through `periph`.
//!
//! State directory `<root>/<name>/`: `qemu.pid`, `qmp.sock`, `agent.sock`, `console.log`,
//! `qemu.log` (QEMU's own stderr), `vm.json` (config, accel), `grants.json` (peripherals).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use telvirt_guest::proto::{AGENT_PORT_NAME, Body, Health, Request};
use tokio::process::Command;
use tokio::sync::{Mutex, watch};

use crate::accel::AccelProbe;
use crate::agent::AgentClient;
#[cfg(test)]
use crate::config::VhostUserNic;
use crate::config::{Accel, CpuPlacement, Grant, VmConfig, validate_peripheral_id};
use crate::confine::{self, Applied, CapsProbe, Confinement};
use crate::error::{Error, Result};
use crate::process::ProcessHandle;
use crate::qmp::{CpuInfoFast, QmpClient, QmpEvent};
use crate::uid_lease::{LEASE_DIR, OWN_UIDS, UidLease};
use crate::{image, memory, periph, pin};

const QMP_TIMEOUT: Duration = Duration::from_secs(10);
const QMP_START_DEADLINE: Duration = Duration::from_secs(30);
const DETACH_DEADLINE: Duration = Duration::from_secs(30);
/// How long a guest that arrived by a migration stream has for its agent to answer after its
/// resume (a boot's `ready_timeout` when shorter): well within a move's deadline, so an
/// arrival that breaks this way is told while the move can still end on its source.
pub const ARRIVAL_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// In a move destination's state dir from its launch until its arrived guest is resumed;
/// it says `taken` once the destination took its stream (`migrate-incoming`), empty before.
pub(crate) const INCOMING_MARK: &str = "incoming";
/// What [`INCOMING_MARK`] holds once the stream was taken.
pub(crate) const STREAM_TAKEN: &[u8] = b"taken";
/// Console lines kept in a failure report.
pub const CONSOLE_TAIL_LINES: usize = 20;

/// Lifecycle phase of a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmPhase {
    Starting,
    /// The destination of a live migration: paused, receiving the source's stream.
    Incoming,
    /// The source of a completed live migration: the guest runs elsewhere now; this QEMU
    /// holds a stopped copy that must never be resumed, only stopped.
    Migrated,
    Running,
    /// Locked: vCPUs stopped with QMP `stop`.
    Paused,
    Stopping,
    Stopped,
    Failed,
}

/// How QEMU ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitInfo {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    /// False for adopted processes (not our child): the status cannot be read.
    pub status_known: bool,
}

impl std::fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.code, self.signal, self.status_known) {
            (Some(c), _, _) => write!(f, "exit status {c}"),
            (_, Some(s), _) => write!(f, "killed by signal {s}"),
            (_, _, false) => f.write_str("exited (status unknown: adopted process)"),
            _ => f.write_str("exited"),
        }
    }
}

/// Why a VM is Failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    pub exit: ExitInfo,
    pub reason: String,
    pub console_tail: Vec<String>,
}

/// One vCPU thread and where it may run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VcpuThread {
    pub cpu_index: u32,
    pub thread_id: i32,
}

/// Snapshot of a VM for status output.
#[derive(Debug, Clone, Serialize)]
pub struct VmStatus {
    pub name: String,
    pub phase: VmPhase,
    pub pid: i32,
    pub accel: Accel,
    pub vcpu_threads: Vec<VcpuThread>,
    pub console_log: PathBuf,
    pub peripherals: Vec<Grant>,
    pub failure: Option<Failure>,
    pub warnings: Vec<String>,
    pub adopted: bool,
    /// Sandbox and user QEMU runs with (`None` for a VM started before this was recorded).
    pub confinement: Option<Applied>,
}

/// How a graceful stop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopMethod {
    GuestAgent,
    AcpiPowerdown,
    QmpQuit,
    Killed,
    AlreadyExited,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Persisted {
    config: VmConfig,
    pid: i32,
    accel: Accel,
    /// Its QEMU's `major.minor` (from the binary's `-help` at launch), when it said.
    #[serde(default)]
    qemu_version: Option<(u32, u32)>,
    warnings: Vec<String>,
    #[serde(default)]
    confinement: Option<Applied>,
}

/// Starts and adopts VMs under one state root.
#[derive(Debug, Clone)]
pub struct VmManager {
    root: PathBuf,
    qemu: PathBuf,
    probe: AccelProbe,
    confinement: Confinement,
    caps: CapsProbe,
    /// The most bytes `console.log` and `qemu.log` hold ([`crate::logcap`]).
    log_cap: u64,
}

impl VmManager {
    /// `root` holds one directory per VM; keep it short (unix socket paths are limited to 107 bytes).
    pub fn new(root: impl Into<PathBuf>, probe: AccelProbe) -> Self {
        Self {
            root: root.into(),
            qemu: PathBuf::from("qemu-system-x86_64"),
            probe,
            confinement: Confinement::default(),
            caps: CapsProbe::default(),
            log_cap: crate::logcap::DEFAULT_LOG_CAP,
        }
    }

    /// The most bytes a VM's `console.log` and `qemu.log` hold before their last half goes to
    /// `<file>.1` (default [`crate::logcap::DEFAULT_LOG_CAP`]; at least 1 KiB).
    pub fn log_cap(mut self, bytes: u64) -> Self {
        self.log_cap = bytes.max(1024);
        self
    }

    /// The `(major, minor)` version of the QEMU this manager starts (`--version`); `None`
    /// when it cannot be run.
    pub async fn qemu_version(&self) -> Option<(u32, u32)> {
        confine::qemu_version(&self.qemu).await
    }

    /// The i440FX machine types of the QEMU this manager starts (`-machine help`).
    pub async fn machine_types(&self) -> crate::config::MachineTypes {
        confine::machine_types(&self.qemu).await
    }

    /// Use another QEMU binary (default `qemu-system-x86_64` from PATH).
    pub fn qemu_binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.qemu = path.into();
        self.caps = CapsProbe::default();
        self
    }

    /// How QEMU is confined (default: sandbox on, user `auto`; ADR 044).
    pub fn confinement(mut self, confinement: Confinement) -> Self {
        self.confinement = confinement;
        self
    }

    /// What the manager's QEMU supports (sandbox, user option), probed once.
    pub async fn qemu_caps(&self) -> confine::QemuCaps {
        self.caps.get(&self.qemu).await
    }

    /// Default state directory of a VM: `<root>/<name>`.
    pub fn state_dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// The state directory a config uses: its own `state_dir`, else `<root>/<name>`.
    pub fn dir_of(&self, cfg: &VmConfig) -> PathBuf {
        cfg.state_dir
            .clone()
            .unwrap_or_else(|| self.state_dir(&cfg.name))
    }

    /// Start a VM: validate, resolve the accelerator, launch paused, pin, plug peripherals,
    /// resume, and wait for the guest agent. Any failure kills the QEMU it started.
    pub async fn start(&self, cfg: VmConfig) -> Result<VmHandle> {
        let wait_for_agent = cfg.wait_for_agent;
        let (handle, mut guard) = self.launch(cfg, false).await?;
        handle.inner.qmp.cont().await?;
        if wait_for_agent {
            handle.attach_agent().await?;
        }
        handle.set_phase(VmPhase::Running);
        guard.armed = false;
        Ok(handle)
    }

    /// Start the destination of a live migration: the VM of `cfg` (the source's configuration,
    /// with this side's name, state dir and CPUs) launched paused with `-incoming defer`,
    /// pinned, its peripherals plugged, `tuning`'s capabilities and parameters set, and
    /// waiting for the source's stream on `from` (`migrate-incoming`; QEMU resumes the guest
    /// as the stream completes). Then
    /// [`VmHandle::finish_incoming`] waits for the stream and the guest's agent. Any failure
    /// kills the QEMU it started.
    pub async fn start_incoming(
        &self,
        cfg: VmConfig,
        from: &crate::migrate::MigrationChannel,
        tuning: &crate::migrate::MigrationTuning,
    ) -> Result<VmHandle> {
        let handle = self.launch_incoming(cfg, &from.carries(tuning)).await?;
        if let Err(e) = handle.receive(from).await {
            let _ = handle.kill().await;
            return Err(e);
        }
        Ok(handle)
    }

    /// The first half of [`VmManager::start_incoming`], for a destination whose stream has not
    /// arrived yet: QEMU launched paused with `-incoming defer`, pinned, its peripherals
    /// plugged and `tuning` set (as the channel to come carries it,
    /// [`crate::MigrationChannel::carries`]); [`VmHandle::receive`] then takes the stream.
    /// Any failure kills the QEMU it started.
    pub async fn launch_incoming(
        &self,
        cfg: VmConfig,
        tuning: &crate::migrate::MigrationTuning,
    ) -> Result<VmHandle> {
        let (handle, mut guard) = self.launch(cfg, true).await?;
        crate::migrate::prepare(handle.qmp(), tuning, false).await?;
        handle.set_phase(VmPhase::Incoming);
        guard.armed = false;
        Ok(handle)
    }

    /// Validates `cfg`, launches QEMU paused (waiting for a migration stream when `incoming`),
    /// pins its threads and plugs its peripherals; the guard kills it unless disarmed.
    async fn launch(&self, mut cfg: VmConfig, incoming: bool) -> Result<(VmHandle, KillGuard)> {
        let online = pin::online_cpus()?;
        cfg.validate(&online)?;
        let dir = self.dir_of(&cfg);
        if let Some(pid) = read_pid(&dir)
            && owns_process(pid, &cfg.name)
        {
            return Err(Error::AlreadyRunning {
                name: cfg.name.clone(),
                pid,
            });
        }
        let hugemount = match cfg.hugepages {
            Some(hp) => Some(memory::check_hugepages(hp, cfg.memory_mib)?),
            None => None,
        };
        for g in &cfg.peripherals {
            periph::precheck(g)?;
        }
        let decision = self.probe.resolve(cfg.accel).await?;
        let mut warnings = Vec::new();
        if let Some(w) = &decision.warning {
            tracing::warn!("{w}");
            warnings.push(w.clone());
        }
        let accel = decision.accel;
        let caps = self.caps.get(&self.qemu).await;
        // The versioned type, kept in the VM's record: what a move's destination must have.
        cfg.machine = Some(
            caps.machines
                .resolve(cfg.machine.as_deref())
                .map_err(|reason| Error::InvalidConfig {
                    field: "machine",
                    reason: format!("{reason} ({})", self.qemu.display()),
                })?,
        );
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        // A uid of its own for this QEMU where it can have one (else the shared user, said).
        let mut lease = None;
        if confine::wants_own_uid(&self.confinement, &caps, euid) {
            let hint = cfg.name.clone();
            let taken = tokio::task::spawn_blocking(move || {
                UidLease::take(Path::new(LEASE_DIR), OWN_UIDS, &hint)
            })
            .await
            .map_err(|e| Error::io("take a uid lease")(std::io::Error::other(e.to_string())))?;
            match taken {
                Ok(l) => lease = Some(l),
                Err(e) => warnings.push(format!(
                    "QEMU shares its user with the host's other QEMUs: no uid of its own ({e})"
                )),
            }
        }
        let own = lease.as_ref().map(UidLease::uid);
        let mut plan = confine::plan(&self.confinement, &caps, euid, confine::lookup_user, own)?;
        if plan.applied.dropped && cfg.lock_memory && !confine::memlock_liftable() {
            // Locked guest memory needs an unlimited RLIMIT_MEMLOCK once QEMU is unprivileged.
            let stay = Confinement {
                user: confine::QemuUser::Current,
                ..self.confinement.clone()
            };
            let user = if own.is_some() {
                format!("its own uid {}", plan.applied.uid)
            } else {
                format!("`{}`", plan.applied.user)
            };
            lease = None;
            plan = confine::plan(&stay, &caps, euid, confine::lookup_user, None)?;
            plan.warnings.push(format!(
                "lock_memory: telvirt cannot lift RLIMIT_MEMLOCK for QEMU (hard limit set and no CAP_SYS_RESOURCE), so QEMU keeps uid {euid} instead of {user}"
            ));
        }
        for w in &plan.warnings {
            tracing::warn!(vm = %cfg.name, "{w}");
            warnings.push(w.clone());
        }
        tracing::info!(
            vm = %cfg.name,
            user = %plan.applied.user,
            sandbox = plan.applied.sandbox.as_deref().unwrap_or("off"),
            "QEMU confinement"
        );

        std::fs::create_dir_all(&dir).map_err(Error::io(format!("create {}", dir.display())))?;
        for f in [
            "qmp.sock",
            "agent.sock",
            "qemu.pid",
            "grants.json",
            INCOMING_MARK,
        ] {
            let _ = std::fs::remove_file(dir.join(f));
        }
        if incoming {
            // Until the arrived guest is resumed: an adopter then knows a paused guest here is
            // one that came in by a stream nobody finished, not one an operator paused.
            let mark = dir.join(INCOMING_MARK);
            std::fs::write(&mark, b"").map_err(Error::io(format!("create {}", mark.display())))?;
        }
        check_socket_path(&dir.join("agent.sock"))?;
        append_console_marker(&dir, &cfg.name)?;
        let mut args = qemu_args(&cfg, &dir, accel, hugemount.as_deref());
        args.extend(plan.args.iter().cloned());
        if incoming {
            args.extend(["-incoming".to_owned(), "defer".to_owned()]);
        }
        // Emptied, then written by appending: a rotation ([`crate::logcap`]) empties it under
        // QEMU, whose next line then lands at its new end.
        std::fs::File::create(dir.join("qemu.log")).map_err(Error::io("create qemu.log"))?;
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.join("qemu.log"))
            .map_err(Error::io("open qemu.log"))?;
        let log2 = log
            .try_clone()
            .map_err(Error::io("clone qemu.log handle"))?;
        let mut std_cmd = crate::confine::child_command(&self.qemu);
        if let Some(lease) = &lease {
            // QEMU inherits the lease's lock (after `child_command` marked every descriptor
            // close-on-exec): its uid stays held while it runs, whatever becomes of this process.
            let fd = lease.fd();
            // SAFETY: the closure calls only fcntl, which is async-signal-safe.
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut std_cmd, move || {
                    if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut cmd = Command::from(std_cmd);
        cmd.args(&args)
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(log2)
            .process_group(0);
        if plan.applied.dropped && cfg.lock_memory {
            // With mem-lock=on (MCL_FUTURE) an unprivileged QEMU could map nothing more than
            // RLIMIT_MEMLOCK once it has dropped CAP_IPC_LOCK: lift the limit before exec
            // (memlock_liftable() said this is permitted).
            // SAFETY: the closure calls only setrlimit, which is async-signal-safe.
            unsafe {
                cmd.pre_exec(|| {
                    let unlimited = libc::rlimit {
                        rlim_cur: libc::RLIM_INFINITY,
                        rlim_max: libc::RLIM_INFINITY,
                    };
                    if libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd
            .spawn()
            .map_err(Error::io(format!("spawn {}", self.qemu.display())))?;
        // QEMU holds the lease now.
        drop(lease);
        let pid = child
            .id()
            .and_then(|p| i32::try_from(p).ok())
            .ok_or_else(|| Error::Qmp {
                command: "spawn".into(),
                reason: "QEMU exited before its pid was read".into(),
            })?;
        // Opened before the child can be reaped (below): the handle names this QEMU for good.
        let process = match ProcessHandle::open(pid) {
            Ok(p) => Arc::new(p),
            Err(e) => {
                // Not left running without a handle: our child still, its pid is its own.
                let _ = child.start_kill();
                let _ = child.wait().await;
                return Err(Error::io(format!("open a pidfd on QEMU {pid}"))(e));
            }
        };
        let guard = KillGuard {
            process: Arc::clone(&process),
            armed: true,
        };
        let (exit_tx, exit_rx) = watch::channel(None);
        tokio::spawn(async move {
            let info = match child.wait().await {
                Ok(st) => {
                    use std::os::unix::process::ExitStatusExt;
                    ExitInfo {
                        code: st.code(),
                        signal: st.signal(),
                        status_known: true,
                    }
                }
                Err(_) => ExitInfo {
                    code: None,
                    signal: None,
                    status_known: false,
                },
            };
            let _ = exit_tx.send(Some(info));
        });
        crate::logcap::spawn(
            dir.clone(),
            crate::logcap::BOTH_LOGS,
            self.log_cap,
            exit_rx.clone(),
        );

        std::fs::write(dir.join("qemu.pid"), pid.to_string())
            .map_err(Error::io("write qemu.pid"))?;
        let persisted = Persisted {
            config: cfg.clone(),
            pid,
            accel,
            qemu_version: caps.version,
            warnings: warnings.clone(),
            confinement: Some(plan.applied.clone()),
        };
        write_json(&dir.join("vm.json"), &persisted)?;

        let qmp = wait_for_qmp(&dir, exit_rx.clone()).await?;
        let cpus = sorted_cpus(&qmp).await?;
        warnings.extend(pin_threads(pid, &cpus, &cfg.cpu)?);
        for g in &cfg.peripherals {
            periph::plug(&qmp, &dir, g).await?;
        }
        write_json(&dir.join("grants.json"), &cfg.peripherals)?;

        let handle = VmHandle::assemble(
            dir.clone(),
            Persisted {
                warnings,
                ..persisted
            },
            Session {
                qmp,
                exit: exit_rx,
                cpus,
                process,
            },
            VmPhase::Starting,
            cfg.peripherals.clone(),
            Adopted::No,
        );
        Ok((handle, guard))
    }

    /// Re-adopt a VM started by an earlier manager from its state directory.
    pub async fn adopt(&self, name: &str) -> Result<VmHandle> {
        crate::config::validate_name(name)?;
        self.adopt_dir(&self.state_dir(name)).await
    }

    /// Re-adopt the VM whose state directory is `dir` (a `VmConfig::state_dir` of an earlier start).
    pub async fn adopt_dir(&self, dir: &Path) -> Result<VmHandle> {
        let dir = dir.to_path_buf();
        let not = |reason: String| Error::NotAdoptable {
            dir: dir.clone(),
            reason,
        };
        let persisted: Persisted = serde_json::from_slice(
            &std::fs::read(dir.join("vm.json")).map_err(|e| not(format!("vm.json: {e}")))?,
        )
        .map_err(|e| not(format!("vm.json: {e}")))?;
        let name = persisted.config.name.clone();
        let name = name.as_str();
        let process = Arc::new(open_running(&dir, name).map_err(not)?);
        let pid = process.pid();
        let qmp = QmpClient::connect(&dir.join("qmp.sock"), QMP_TIMEOUT).await?;
        let status = qmp.query_status().await?;
        let orphan = crate::migrate::end_orphaned_stream(&qmp, &status.status).await?;
        // Read again: the stream's end changes it, and so does a stream that completed between
        // the two reads (`finish-migrate`, then `postmigrate`: the guest moved).
        let status = qmp.query_status().await?;
        let cpus = sorted_cpus(&qmp).await?;
        let grants: Vec<Grant> = std::fs::read(dir.join("grants.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let (exit_tx, exit_rx) = watch::channel(None);
        let watched = Arc::clone(&process);
        tokio::spawn(async move {
            // Not this process's child: its end is seen, its status is its parent's.
            if watched.exited().await.is_err() {
                while !watched.has_exited() {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            let _ = exit_tx.send(Some(ExitInfo {
                code: None,
                signal: None,
                status_known: false,
            }));
        });
        let logs: &[&str] = if crate::logcap::appends_stderr(pid) {
            crate::logcap::BOTH_LOGS
        } else {
            &[crate::logcap::CONSOLE_LOG]
        };
        crate::logcap::spawn(dir.clone(), logs, self.log_cap, exit_rx.clone());
        let still_streaming = orphan.as_ref().is_some_and(|o| !o.ended);
        // A move's destination whose stream completed while no agent watched, paused (a guest
        // with a disk, which QEMU does not start by itself): it waits to be resumed here
        // ([`VmHandle::finish_incoming`]). A guest without one runs already.
        let arrived_unresumed = dir.join(INCOMING_MARK).exists();
        if status.status == "running" {
            // Resumed (by the agent that died before it removed the mark): an ordinary guest.
            let _ = std::fs::remove_file(dir.join(INCOMING_MARK));
        }
        let phase = match status.status.as_str() {
            // Never resumed here: the guest may run at the destination.
            _ if still_streaming => VmPhase::Migrated,
            "paused" if arrived_unresumed => VmPhase::Incoming,
            "running" => VmPhase::Running,
            "paused" => VmPhase::Paused,
            "prelaunch" => VmPhase::Starting,
            "inmigrate" => VmPhase::Incoming,
            // In its final copy, or after it: the guest is on its way to the destination or
            // runs there.
            "postmigrate" | "finish-migrate" => VmPhase::Migrated,
            _ => VmPhase::Paused,
        };
        let stream_undone = orphan.as_ref().is_some_and(|o| o.undone);
        let mut warnings = persisted.warnings.clone();
        warnings.push(format!(
            "adopted running QEMU pid {pid} (state {})",
            status.status
        ));
        if let Some(orphan) = orphan {
            tracing::warn!("vm {name}: {}", orphan.note);
            warnings.push(orphan.note);
        }
        let handle = VmHandle::assemble(
            dir,
            Persisted {
                warnings,
                ..persisted
            },
            Session {
                qmp,
                exit: exit_rx,
                cpus,
                process,
            },
            phase,
            grants,
            Adopted::Yes { stream_undone },
        );
        if phase == VmPhase::Running && handle.inner.config.wait_for_agent {
            match handle.connect_agent(Duration::from_secs(15)).await {
                Ok(a) => *handle.inner.agent.lock().await = Some(a),
                Err(e) => {
                    tracing::warn!("vm {name}: guest agent not reachable after adoption: {e}")
                }
            }
        }
        Ok(handle)
    }

    /// The console log of a VM, whether or not it runs (`telvirt vnf console NAME`).
    pub fn console_log(&self, name: &str) -> PathBuf {
        self.state_dir(name).join("console.log")
    }

    /// The last `n` console lines of a VM, whether or not it runs.
    pub fn console_tail(&self, name: &str, n: usize) -> Vec<String> {
        console_tail(&self.console_log(name), n)
    }

    /// Delete a VM's state directory (console log included); refused while its QEMU runs.
    pub fn remove(&self, name: &str) -> Result<()> {
        crate::config::validate_name(name)?;
        let dir = self.state_dir(name);
        if let Some(pid) = read_pid(&dir)
            && owns_process(pid, name)
        {
            return Err(Error::AlreadyRunning {
                name: name.to_string(),
                pid,
            });
        }
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(Error::io(format!("remove {}", dir.display()))(e))
            }
            _ => Ok(()),
        }
    }

    /// Adopt every VM whose state directory has a live QEMU; returns (name, result) pairs.
    pub async fn adopt_all(&self) -> Vec<(String, Result<VmHandle>)> {
        let mut out = Vec::new();
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return out;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if e.path().join("qemu.pid").exists() {
                let r = self.adopt(&name).await;
                out.push((name, r));
            }
        }
        out
    }
}

struct Inner {
    name: String,
    dir: PathBuf,
    /// QEMU, held by its pidfd (its pid too): every signal goes through it.
    process: Arc<ProcessHandle>,
    accel: Accel,
    qemu_version: Option<(u32, u32)>,
    config: VmConfig,
    qmp: QmpClient,
    agent: Mutex<Option<AgentClient>>,
    phase: std::sync::Mutex<VmPhase>,
    stopping: AtomicBool,
    grants: Mutex<Vec<Grant>>,
    exit: watch::Receiver<Option<ExitInfo>>,
    vcpus: Vec<VcpuThread>,
    warnings: Vec<String>,
    adopted: Adopted,
    confinement: Option<Applied>,
    /// When this QEMU resumed the guest that arrived by its incoming stream (its `RESUME`
    /// event, µs since the Unix epoch): set once, so a later unlock's resume is not taken for it.
    arrival_resumed_at: std::sync::OnceLock<u64>,
    /// Woken once the arrived guest runs here, before its agent answers
    /// ([`VmHandle::arrival_resumed`]).
    arrival_resumed: tokio::sync::Notify,
    /// On a move's destination: the guest agent's socket, connected when the stream was taken
    /// ([`VmHandle::prepare_arrival`]), for the resume to take.
    arrival_agent: Mutex<Option<AgentClient>>,
}

/// Whether a handle's QEMU was started by this process or adopted from one before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Adopted {
    No,
    /// `stream_undone`: it had an outgoing migration stream, left by the process before,
    /// that ended without moving the guest (the adoption cancelled it, or it failed): the guest
    /// runs here, and a move that stream reached the commit point of did not happen.
    Yes {
        stream_undone: bool,
    },
}

/// A running (or ended) VM. Cloning shares the same VM; dropping it leaves QEMU running.
#[derive(Clone)]
pub struct VmHandle {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for VmHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmHandle")
            .field("name", &self.inner.name)
            .field("pid", &self.inner.process.pid())
            .finish()
    }
}

/// What a live QEMU gives a handle: the QMP session, the exit watch and the vCPU threads.
struct Session {
    qmp: QmpClient,
    exit: watch::Receiver<Option<ExitInfo>>,
    cpus: Vec<CpuInfoFast>,
    process: Arc<ProcessHandle>,
}

async fn sorted_cpus(qmp: &QmpClient) -> Result<Vec<CpuInfoFast>> {
    let mut cpus = qmp.query_cpus_fast().await?;
    cpus.sort_by_key(|c| c.cpu_index);
    Ok(cpus)
}

impl VmHandle {
    fn assemble(
        dir: PathBuf,
        p: Persisted,
        s: Session,
        phase: VmPhase,
        grants: Vec<Grant>,
        adopted: Adopted,
    ) -> Self {
        let vcpus = s
            .cpus
            .iter()
            .map(|c| VcpuThread {
                cpu_index: c.cpu_index,
                thread_id: c.thread_id,
            })
            .collect();
        Self {
            inner: Arc::new(Inner {
                name: p.config.name.clone(),
                dir,
                process: s.process,
                accel: p.accel,
                qemu_version: p.qemu_version,
                config: p.config,
                qmp: s.qmp,
                agent: Mutex::new(None),
                phase: std::sync::Mutex::new(phase),
                stopping: AtomicBool::new(false),
                grants: Mutex::new(grants),
                exit: s.exit,
                vcpus,
                warnings: p.warnings,
                adopted,
                confinement: p.confinement,
                arrival_resumed_at: std::sync::OnceLock::new(),
                arrival_resumed: tokio::sync::Notify::new(),
                arrival_agent: Mutex::new(None),
            }),
        }
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }
    pub fn pid(&self) -> i32 {
        self.inner.process.pid()
    }
    pub fn accel(&self) -> Accel {
        self.inner.accel
    }
    /// telvirt's migration tuning for this VM, by its accelerator and QEMU version.
    pub fn tuning(&self) -> crate::migrate::MigrationTuning {
        crate::migrate::MigrationTuning::tuned(self.inner.accel, self.inner.qemu_version)
    }
    /// Whether it was adopted with an outgoing migration stream, left by the process before,
    /// that ended without moving the guest: the guest runs here, and a move that stream
    /// committed did not happen.
    pub fn outgoing_stream_undone(&self) -> bool {
        self.inner.adopted
            == Adopted::Yes {
                stream_undone: true,
            }
    }
    pub fn state_dir(&self) -> &Path {
        &self.inner.dir
    }
    pub fn config(&self) -> &VmConfig {
        &self.inner.config
    }
    /// The guest's serial console, appended across restarts (`telvirt vnf console NAME`).
    pub fn console_log(&self) -> PathBuf {
        self.inner.dir.join("console.log")
    }
    pub fn vcpu_threads(&self) -> &[VcpuThread] {
        &self.inner.vcpus
    }
    /// Sandbox and user QEMU runs with (ADR 044).
    pub fn confinement(&self) -> Option<&Applied> {
        self.inner.confinement.as_ref()
    }
    /// When this QEMU resumed the guest that arrived by its incoming stream (its `RESUME`
    /// event), µs since the Unix epoch by this host's clock: the end of the guest's pause in a
    /// move. `None` for a guest that did not arrive by a stream here (or was adopted after).
    pub fn resumed_at_us(&self) -> Option<u64> {
        self.inner.arrival_resumed_at.get().copied()
    }

    /// The QMP session (for migration and other commands the handle does not wrap).
    pub fn qmp(&self) -> &QmpClient {
        &self.inner.qmp
    }

    /// The last `n` lines of the console log.
    pub fn console_tail(&self, n: usize) -> Vec<String> {
        console_tail(&self.console_log(), n)
    }

    fn exit_info(&self) -> Option<ExitInfo> {
        *self.inner.exit.borrow()
    }

    pub(crate) fn set_phase(&self, p: VmPhase) {
        if let Ok(mut g) = self.inner.phase.lock() {
            *g = p;
        }
    }

    /// Current phase: QEMU's exit turns it into Stopped (asked for) or Failed (not asked for).
    pub fn phase(&self) -> VmPhase {
        match self.exit_info() {
            Some(_) if self.inner.stopping.load(Ordering::SeqCst) => VmPhase::Stopped,
            Some(_) => VmPhase::Failed,
            None => self
                .inner
                .phase
                .lock()
                .map(|g| *g)
                .unwrap_or(VmPhase::Failed),
        }
    }

    /// The failure report, when the VM is Failed.
    pub fn failure(&self) -> Option<Failure> {
        let exit = self.exit_info()?;
        if self.inner.stopping.load(Ordering::SeqCst) {
            return None;
        }
        Some(Failure {
            exit,
            reason: format!("QEMU {exit} without being asked to stop"),
            console_tail: self.console_tail(CONSOLE_TAIL_LINES),
        })
    }

    pub async fn status(&self) -> VmStatus {
        VmStatus {
            name: self.inner.name.clone(),
            phase: self.phase(),
            pid: self.pid(),
            accel: self.inner.accel,
            vcpu_threads: self.inner.vcpus.clone(),
            console_log: self.console_log(),
            peripherals: self.inner.grants.lock().await.clone(),
            failure: self.failure(),
            warnings: self.inner.warnings.clone(),
            adopted: self.inner.adopted != Adopted::No,
            confinement: self.inner.confinement.clone(),
        }
    }

    /// A future that ends when QEMU exits, with how (`None`: its watcher ended first), holding
    /// nothing of the handle but its exit watch: a task may wait on it as long as QEMU runs.
    pub fn on_exit(&self) -> impl std::future::Future<Output = Option<ExitInfo>> + Send + 'static {
        let mut rx = self.inner.exit.clone();
        async move { rx.wait_for(|v| v.is_some()).await.ok().and_then(|v| *v) }
    }

    /// Wait until QEMU has exited, at most `timeout`.
    pub async fn wait_exit(&self, timeout: Duration) -> Option<ExitInfo> {
        match tokio::time::timeout(timeout, self.on_exit()).await {
            Ok(Some(exit)) => Some(exit),
            _ => self.exit_info(),
        }
    }

    fn not_running(&self) -> Error {
        Error::NotRunning {
            name: self.inner.name.clone(),
            state: format!("{:?}", self.phase()).to_lowercase(),
        }
    }

    /// On a move's destination: whether it took its stream (`migrate-incoming` succeeded: the
    /// stream may not have sent a byte yet, run, or have completed); `false` while it still
    /// waits for one. Read from the state dir, which outlives the agent that took it (QEMU 7.2
    /// reports no status until the first bytes arrive).
    pub fn incoming_stream_taken(&self) -> bool {
        std::fs::read(self.inner.dir.join(INCOMING_MARK)).is_ok_and(|m| m == STREAM_TAKEN)
    }

    /// On a move's destination, before it takes the stream: connects to the guest agent's
    /// socket (when the configuration has one), so the guest never sees its host side closed
    /// (its port was open on the source), then, for a guest without a disk, `cont`, which
    /// QEMU takes while it waits for a stream as "resume the guest the moment the stream
    /// completes": the resume then costs the guest's pause no round trip to this process. A
    /// guest with a disk is resumed after the stream ([`VmHandle::resume_incoming`]): QEMU
    /// would take its image over from the source at once (telvirt moves no disks).
    pub(crate) async fn prepare_arrival(&self) -> Result<()> {
        // Connected and kept for the arrival; not held across the `cont`.
        drop(self.connect_arrival_agent().await?);
        if self.inner.config.disk.is_none() {
            self.inner.qmp.cont().await?;
        }
        Ok(())
    }

    /// Connects the arriving guest's agent socket (when the configuration has an agent), unless
    /// it is connected already; the connection, still held.
    async fn connect_arrival_agent(
        &self,
    ) -> Result<tokio::sync::MutexGuard<'_, Option<AgentClient>>> {
        let mut agent = self.inner.arrival_agent.lock().await;
        if agent.is_none() && self.inner.config.wait_for_agent {
            *agent = Some(AgentClient::connect(&self.inner.dir.join("agent.sock")).await?);
        }
        Ok(agent)
    }

    /// Returns once the guest that arrived by this QEMU's incoming stream runs here (resumed by
    /// [`VmHandle::finish_incoming`], before its agent answered); never for one that did not
    /// arrive. One caller at a time.
    pub async fn arrival_resumed(&self) {
        self.inner.arrival_resumed.notified().await;
    }

    /// Resumes a guest that came in by migration, unless QEMU did as the stream completed
    /// ([`VmHandle::prepare_arrival`]), with its agent's socket connected before (or now,
    /// when the stream was taken without it), then waits for the agent (when the
    /// configuration has one). Answers the guest's uptime its agent stated as it answered
    /// (none without an agent): a guest that did not boot again has been up since before the
    /// move.
    pub(crate) async fn resume_incoming(&self) -> Result<Option<Duration>> {
        let agent = self.connect_arrival_agent().await?.take();
        // QEMU resumed it itself as the stream completed when the stream was taken after
        // [`VmHandle::prepare_arrival`]: a `cont` then would add a STOP and RESUME of its own.
        crate::migrate::resume_if_stopped(&self.inner.qmp).await?;
        // QEMU sends its RESUME event before its answers (to `cont`, or to the query that
        // found the stream completed): read now, it is this one.
        if let Some(at) = self.inner.qmp.last_event_at("RESUME") {
            let _ = self.inner.arrival_resumed_at.set(at);
        }
        // The guest runs here from now on, whether or not its agent answers.
        self.set_phase(VmPhase::Running);
        self.inner.arrival_resumed.notify_one();
        let _ = std::fs::remove_file(self.inner.dir.join(INCOMING_MARK));
        if let Some(agent) = agent {
            // A guest that ran until its stream answers at once; one that does not within
            // this is taken for broken while its move may still end at its source.
            let wait = self.inner.config.ready_timeout.min(ARRIVAL_READY_TIMEOUT);
            let ready = agent.wait_ready(wait).await?;
            *self.inner.agent.lock().await = Some(agent);
            return Ok(Some(Duration::from_millis(ready.uptime_ms)));
        }
        Ok(None)
    }

    /// Connects to the guest agent and waits (the config's `ready_timeout`) until it is ready.
    pub(crate) async fn attach_agent(&self) -> Result<()> {
        let agent = self.connect_agent(self.inner.config.ready_timeout).await?;
        *self.inner.agent.lock().await = Some(agent);
        Ok(())
    }

    async fn connect_agent(&self, timeout: Duration) -> Result<AgentClient> {
        let sock = self.inner.dir.join("agent.sock");
        let mut exit = self.inner.exit.clone();
        let fut = async {
            let agent = AgentClient::connect(&sock).await?;
            agent.wait_ready(timeout).await?;
            Ok::<_, Error>(agent)
        };
        tokio::select! {
            r = fut => r,
            _ = exit.wait_for(|v| v.is_some()) => {
                let exit = self.exit_info().map(|e| e.to_string()).unwrap_or_default();
                Err(Error::QemuExited {
                    status: exit,
                    output: self.console_tail(CONSOLE_TAIL_LINES).join("\n"),
                })
            }
        }
    }

    /// Moves the running QEMU's threads to `placement` without stopping the guest: each vCPU
    /// thread (as QMP lists them now) to its CPUs, every other thread to the emulator CPUs when
    /// given. Returns warnings (realtime priority refused).
    pub async fn repin(&self, placement: &CpuPlacement) -> Result<Vec<String>> {
        if self.inner.process.has_exited() {
            return Err(self.not_running());
        }
        let cpus = sorted_cpus(&self.inner.qmp).await?;
        pin_threads(self.pid(), &cpus, placement)
    }

    /// Lock: stop the vCPUs (QMP `stop`); the guest's state and clock are kept.
    pub async fn pause(&self) -> Result<()> {
        self.switch(VmPhase::Running, VmPhase::Paused).await
    }

    /// Unlock: resume the vCPUs (QMP `cont`).
    pub async fn resume(&self) -> Result<()> {
        self.switch(VmPhase::Paused, VmPhase::Running).await
    }

    /// Move between Running and Paused; already there is fine, any other phase is an error.
    async fn switch(&self, from: VmPhase, to: VmPhase) -> Result<()> {
        let now = self.phase();
        if now == to {
            return Ok(());
        }
        if now != from {
            return Err(self.not_running());
        }
        if to == VmPhase::Paused {
            self.inner.qmp.stop().await?;
        } else {
            self.inner.qmp.cont().await?;
        }
        self.set_phase(to);
        Ok(())
    }

    /// Send a request to the guest agent.
    pub async fn agent_request(&self, request: Request, timeout: Duration) -> Result<Body> {
        if self.phase() != VmPhase::Running {
            return Err(self.not_running());
        }
        let guard = self.inner.agent.lock().await;
        let agent = guard.as_ref().ok_or_else(|| {
            Error::Agent(format!(
                "vm `{}` has no guest agent connection",
                self.inner.name
            ))
        })?;
        agent.request(request, timeout).await
    }

    /// Health as the guest agent reports it.
    pub async fn health(&self, timeout: Duration) -> Result<Health> {
        match self.agent_request(Request::Health, timeout).await? {
            Body::Health(h) => Ok(h),
            other => Err(Error::Agent(format!("unexpected reply {other:?}"))),
        }
    }

    /// Graceful stop: guest agent shutdown, else ACPI power button; QMP quit after the stop
    /// timeout; SIGKILL as the last resort.
    pub async fn stop(&self) -> Result<StopMethod> {
        if self.exit_info().is_some() {
            self.inner.stopping.store(true, Ordering::SeqCst);
            return Ok(StopMethod::AlreadyExited);
        }
        let was = self.phase();
        self.inner.stopping.store(true, Ordering::SeqCst);
        self.set_phase(VmPhase::Stopping);
        let budget = self.inner.config.stop_timeout;
        let start = Instant::now();
        let left = || budget.saturating_sub(start.elapsed());
        if was == VmPhase::Running {
            let asked = {
                let guard = self.inner.agent.lock().await;
                match guard.as_ref() {
                    Some(a) => a.shutdown(Duration::from_secs(5).min(budget)).await.is_ok(),
                    None => false,
                }
            };
            if asked && self.wait_exit(left()).await.is_some() {
                self.cleanup();
                return Ok(StopMethod::GuestAgent);
            }
            if !asked
                && self
                    .acpi_powerdown(left().min(Duration::from_secs(10)))
                    .await
            {
                self.cleanup();
                return Ok(StopMethod::AcpiPowerdown);
            }
        }
        if self.inner.qmp.quit().await.is_ok()
            && self.wait_exit(Duration::from_secs(10)).await.is_some()
        {
            self.cleanup();
            return Ok(StopMethod::QmpQuit);
        }
        self.kill().await?;
        Ok(StopMethod::Killed)
    }

    /// Press the ACPI power button, again every second (a press before the guest's button
    /// driver listens is lost), until QEMU exits or `within` passes.
    async fn acpi_powerdown(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.inner.qmp.system_powerdown().await.is_err() {
                return false;
            }
            let step = deadline
                .saturating_duration_since(Instant::now())
                .min(Duration::from_secs(1));
            if self.wait_exit(step).await.is_some() {
                return true;
            }
        }
        false
    }

    /// Kill QEMU at once (SIGKILL) and wait for it to go.
    pub async fn kill(&self) -> Result<()> {
        self.inner.stopping.store(true, Ordering::SeqCst);
        self.kill_now();
        if self.wait_exit(Duration::from_secs(10)).await.is_none() {
            return Err(Error::Timeout {
                what: format!("QEMU pid {} to exit after SIGKILL", self.pid()),
                after: Duration::from_secs(10),
            });
        }
        self.cleanup();
        Ok(())
    }

    /// SIGKILL without waiting (usable from `Drop`); a no-op once QEMU has exited.
    pub fn kill_now(&self) {
        if self.exit_info().is_none() {
            self.inner.process.kill();
        }
    }

    fn cleanup(&self) {
        for f in ["qemu.pid", "qmp.sock", "agent.sock"] {
            let _ = std::fs::remove_file(self.inner.dir.join(f));
        }
    }

    /// Peripherals currently granted.
    pub async fn peripherals(&self) -> Vec<Grant> {
        self.inner.grants.lock().await.clone()
    }

    fn check_changeable(&self) -> Result<()> {
        match self.phase() {
            VmPhase::Running => Ok(()),
            VmPhase::Paused => Err(Error::Locked {
                name: self.inner.name.clone(),
            }),
            _ => Err(self.not_running()),
        }
    }

    /// Attach a peripheral while the VM runs. Locked VM, duplicate id or a failed check:
    /// an error and nothing changed.
    pub async fn attach(&self, grant: Grant) -> Result<()> {
        validate_peripheral_id(&grant.id)?;
        let mut grants = self.inner.grants.lock().await;
        self.check_changeable()?;
        if grants.iter().any(|g| g.id == grant.id) {
            return Err(Error::DuplicatePeripheral {
                name: self.inner.name.clone(),
                id: grant.id,
            });
        }
        periph::precheck(&grant)?;
        periph::plug(&self.inner.qmp, &self.inner.dir, &grant).await?;
        grants.push(grant);
        write_json(&self.inner.dir.join("grants.json"), &*grants)
    }

    /// Detach a peripheral: device_del, wait for the guest to release it (DEVICE_DELETED),
    /// then remove its backend.
    pub async fn detach(&self, id: &str) -> Result<Grant> {
        let mut grants = self.inner.grants.lock().await;
        self.check_changeable()?;
        let Some(pos) = grants.iter().position(|g| g.id == id) else {
            return Err(Error::NoSuchPeripheral {
                name: self.inner.name.clone(),
                id: id.to_string(),
                attached: if grants.is_empty() {
                    "none".into()
                } else {
                    grants
                        .iter()
                        .map(|g| g.id.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                },
            });
        };
        let mut events = self.inner.qmp.events();
        self.inner.qmp.device_del(id).await?;
        let wait = async {
            loop {
                match events.recv().await {
                    Ok(QmpEvent::DeviceDeleted {
                        device: Some(d), ..
                    }) if d == id => return true,
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(_) => return false,
                }
            }
        };
        let released = tokio::time::timeout(DETACH_DEADLINE, wait)
            .await
            .unwrap_or(false);
        if !released {
            // The device may already be gone (event missed); ask QEMU.
            let still = self
                .inner
                .qmp
                .peripheral_ids()
                .await?
                .iter()
                .any(|d| d == id);
            if still {
                return Err(Error::PeripheralRefused {
                    id: id.to_string(),
                    reason: format!(
                        "the guest did not release the device within {DETACH_DEADLINE:?}; it stays attached"
                    ),
                });
            }
        }
        let g = grants.remove(pos);
        periph::remove_backend(&self.inner.qmp, &self.inner.dir, &g).await;
        write_json(&self.inner.dir.join("grants.json"), &*grants)?;
        Ok(g)
    }
}

/// Kills a QEMU that a failed start leaves behind.
struct KillGuard {
    process: Arc<ProcessHandle>,
    armed: bool,
}

impl Drop for KillGuard {
    fn drop(&mut self) {
        if self.armed {
            self.process.kill();
        }
    }
}

fn write_json<T: Serialize + ?Sized>(path: &Path, value: &T) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(value)
        .map_err(|e| Error::io(format!("encode {}", path.display()))(std::io::Error::other(e)))?;
    telvirt_files::write_atomic(path, &bytes)
        .map_err(Error::io(format!("write {}", path.display())))
}

/// The pid of the QEMU of VM `name` whose state directory is `dir`, while that QEMU runs.
pub fn running_pid(dir: &Path, name: &str) -> Option<i32> {
    read_pid(dir).filter(|pid| owns_process(*pid, name))
}

/// The QEMU of VM `name` whose state directory is `dir`, held by a pidfd, while it runs.
pub fn running_process(dir: &Path, name: &str) -> Option<ProcessHandle> {
    open_running(dir, name).ok()
}

/// [`running_process`], or why there is none. The handle first, then the check: a process
/// that has not exited when the check is done is the one the handle holds (a running process
/// keeps its pid), so a signal through it never reaches a process that took the number after
/// QEMU's end.
fn open_running(dir: &Path, name: &str) -> std::result::Result<ProcessHandle, String> {
    let pid = read_pid(dir).ok_or_else(|| "no qemu.pid".to_owned())?;
    let process = ProcessHandle::open(pid).map_err(|e| format!("process {pid} is gone ({e})"))?;
    if !owns_process(pid, name) || process.has_exited() {
        return Err(format!(
            "process {pid} is not the QEMU of `{name}` (it exited)"
        ));
    }
    Ok(process)
}

fn read_pid(dir: &Path) -> Option<i32> {
    std::fs::read_to_string(dir.join("qemu.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Whether `pid` is alive and is the QEMU started for VM `name`.
fn owns_process(pid: i32, name: &str) -> bool {
    if !pin::process_alive(pid) {
        return false;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let want = format!("guest={name},");
    cmdline
        .split(|&b| b == 0)
        .any(|a| a.starts_with(want.as_bytes()))
}

fn check_socket_path(p: &Path) -> Result<()> {
    if p.as_os_str().len() > 100 {
        return Err(Error::InvalidConfig {
            field: "state dir",
            reason: format!(
                "{} is too long for a unix socket path (max ~100 bytes)",
                p.display()
            ),
        });
    }
    Ok(())
}

fn append_console_marker(dir: &Path, name: &str) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("console.log"))
        .map_err(Error::io("open console.log"))?;
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    writeln!(f, "=== telvirt: starting vm {name} (unix time {secs}) ===")
        .map_err(Error::io("write console.log"))
}

/// The last `n` lines of a log file (reads at most the last 64 KiB of it), the lines of its
/// older half (`<file>.1`, [`crate::logcap`]) before them where it holds fewer.
pub fn console_tail(path: &Path, n: usize) -> Vec<String> {
    let mut lines = last_lines(path);
    if lines.len() < n {
        let mut older = last_lines(&crate::logcap::older(path));
        older.append(&mut lines);
        lines = older;
    }
    lines[lines.len().saturating_sub(n)..].to_vec()
}

/// The non-empty lines of the last 64 KiB of `path` (none when it cannot be read).
fn last_lines(path: &Path) -> Vec<String> {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf)
        .lines()
        .map(|l| l.trim_end_matches('\r').to_string())
        .filter(|l| !l.trim().is_empty())
        .collect()
}

async fn wait_for_qmp(
    dir: &Path,
    mut exit: watch::Receiver<Option<ExitInfo>>,
) -> Result<QmpClient> {
    let sock = dir.join("qmp.sock");
    let deadline = Instant::now() + QMP_START_DEADLINE;
    loop {
        if let Some(e) = *exit.borrow_and_update() {
            let out = std::fs::read_to_string(dir.join("qemu.log")).unwrap_or_default();
            return Err(Error::QemuExited {
                status: e.to_string(),
                output: out
                    .lines()
                    .rev()
                    .take(20)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<Vec<_>>()
                    .join("\n"),
            });
        }
        if sock.exists()
            && let Ok(c) = QmpClient::connect(&sock, QMP_TIMEOUT).await
        {
            return Ok(c);
        }
        if Instant::now() > deadline {
            return Err(Error::Timeout {
                what: format!("QEMU's QMP socket {}", sock.display()),
                after: QMP_START_DEADLINE,
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Pin emulator/I/O threads, then each vCPU thread; returns warnings (e.g. SCHED_FIFO refused).
fn pin_threads(pid: i32, cpus: &[CpuInfoFast], placement: &CpuPlacement) -> Result<Vec<String>> {
    // Read once: the vCPU threads are checked against them, the others pinned as emulator's.
    let threads = pin::thread_ids(pid)?;
    vcpus_of(pid, &threads, cpus)?;
    let mut warnings = Vec::new();
    if let Some(emu) = &placement.emulator_cpus {
        for &tid in &threads {
            if cpus.iter().any(|c| c.thread_id == tid) {
                continue;
            }
            if let Err(e) = pin::set_affinity(tid, emu) {
                // A thread that exited between listing and pinning is not an error.
                if pin::process_alive(pid) && Path::new(&format!("/proc/{pid}/task/{tid}")).exists()
                {
                    return Err(e);
                }
            }
        }
    }
    for (i, c) in cpus.iter().enumerate() {
        let set = match placement.vcpu_cpus.len() {
            0 => None,
            1 => placement.vcpu_cpus.first(),
            _ => placement.vcpu_cpus.get(i),
        };
        if let Some(set) = set {
            pin::set_affinity(c.thread_id, set)?;
        }
        if let Some(prio) = placement.realtime_priority
            && let Err(e) = pin::set_fifo(c.thread_id, prio)
        {
            warnings.push(format!("vCPU {} keeps normal scheduling: {e}", c.cpu_index));
        }
    }
    Ok(warnings)
}

/// Checks that each vCPU thread QMP names is one of `own`, the threads of QEMU `pid`: the ids
/// are QEMU's word, and a QEMU its guest got hold of could otherwise have the agent pin any
/// thread of the host (its own included) and raise it to real time.
fn vcpus_of(pid: i32, own: &[i32], cpus: &[CpuInfoFast]) -> Result<()> {
    match cpus
        .iter()
        .find(|c| c.thread_id <= 0 || !own.contains(&c.thread_id))
    {
        Some(c) => Err(Error::Pinning(format!(
            "QMP names thread {} for vCPU {}, which is not a thread of QEMU (pid {pid}): not pinned",
            c.thread_id, c.cpu_index
        ))),
        None => Ok(()),
    }
}

/// The QEMU command line for a VM (started paused: `-S`).
pub fn qemu_args(
    cfg: &VmConfig,
    dir: &Path,
    accel: Accel,
    hugetlbfs: Option<&Path>,
) -> Vec<String> {
    let p = |f: &str| dir.join(f).to_string_lossy().into_owned();
    let mut a: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
    let name_arg = format!("guest={},process={},debug-threads=on", cfg.name, cfg.name);
    push(&["-name", &name_arg]);
    let backend = if let Some(mount) = hugetlbfs {
        Some(format!(
            "memory-backend-file,id=tv-mem,size={}M,mem-path={},share=on,prealloc=on",
            cfg.memory_mib,
            mount.display()
        ))
    } else if cfg.shared_memory {
        Some(format!(
            "memory-backend-memfd,id=tv-mem,size={}M,share=on",
            cfg.memory_mib
        ))
    } else {
        None
    };
    let machine_type = cfg
        .machine
        .as_deref()
        .unwrap_or(crate::config::MACHINE_ALIAS);
    let machine = if backend.is_some() {
        format!(
            "{machine_type},accel={},memory-backend=tv-mem",
            accel.as_str()
        )
    } else {
        format!("{machine_type},accel={}", accel.as_str())
    };
    push(&["-machine", &machine]);
    let cpu = match (&cfg.cpu_model, accel) {
        // Under KVM a named model's features must all be there: the guest would otherwise
        // see another CPU here than on the host it moves from.
        (Some(model), Accel::Kvm) => format!("{model},enforce"),
        (Some(model), Accel::Tcg) => model.clone(),
        (None, Accel::Kvm) => "host".to_owned(),
        (None, Accel::Tcg) => "max".to_owned(),
    };
    push(&["-cpu", &cpu]);
    push(&[
        "-smp",
        &cfg.vcpus.to_string(),
        "-m",
        &format!("{}M", cfg.memory_mib),
    ]);
    if let Some(b) = &backend {
        push(&["-object", b]);
    }
    if cfg.lock_memory {
        push(&["-overcommit", "mem-lock=on"]);
    }
    push(&[
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-S",
    ]);
    if let Some(k) = &cfg.kernel {
        push(&["-kernel", &k.to_string_lossy()]);
        if let Some(i) = &cfg.initrd {
            push(&["-initrd", &i.to_string_lossy()]);
        }
        push(&[
            "-append",
            cfg.append.as_deref().unwrap_or(image::DEFAULT_APPEND),
        ]);
    }
    if let Some(d) = &cfg.disk {
        let drive = format!(
            "file={},if=none,id=tv-disk0,format={}",
            d.path.to_string_lossy().replace(',', ",,"),
            d.format.as_str()
        );
        push(&[
            "-drive",
            &drive,
            "-device",
            "virtio-blk-pci,drive=tv-disk0,id=tv-disk0-dev",
        ]);
    }
    for n in &cfg.vhost_user_nics {
        // QEMU serves the socket and the node connects: a node that restarts connects again
        // and QEMU takes it up (a client QEMU would reconnect as the user it dropped to, which
        // cannot reach the node's private data directory).
        let chardev = format!(
            "socket,id=tv-nic-{}-chr,path={},server=on,wait=off",
            n.id,
            n.socket.to_string_lossy()
        );
        let netdev = format!("vhost-user,id=tv-nic-{0},chardev=tv-nic-{0}-chr", n.id);
        let device = format!(
            "virtio-net-pci,netdev=tv-nic-{0},id=tv-nic-{0}-dev,mac={1}{2}",
            n.id,
            n.mac,
            crate::config::vhost_user_nic_options(accel)
        );
        push(&["-chardev", &chardev, "-netdev", &netdev, "-device", &device]);
    }
    let con = format!("file,id=tv-con,path={},append=on", p("console.log"));
    push(&["-chardev", &con, "-serial", "chardev:tv-con"]);
    let agent = format!(
        "socket,id=tv-agent-chr,path={},server=on,wait=off",
        p("agent.sock")
    );
    let port = format!(
        "virtserialport,bus={},chardev=tv-agent-chr,name={AGENT_PORT_NAME},id=tv-agent",
        periph::SERIAL_BUS
    );
    push(&[
        "-device",
        "virtio-serial-pci,id=tv-vser0",
        "-chardev",
        &agent,
        "-device",
        &port,
    ]);
    let qmp = format!("unix:{},server=on,wait=off", p("qmp.sock"));
    push(&["-qmp", &qmp]);
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only threads of the QEMU named are pinned: a vCPU thread id QMP gives that is another
    /// process's (or 0) is refused before any affinity changes.
    #[test]
    fn vcpu_threads_qmp_names_must_be_qemus_own() {
        let me = i32::try_from(std::process::id()).unwrap();
        let cpu = |thread_id| CpuInfoFast {
            cpu_index: 0,
            thread_id,
            target: None,
        };
        let own = pin::thread_ids(me).unwrap();
        assert!(
            vcpus_of(me, &own, &[cpu(me)]).is_ok(),
            "the main thread is this process's"
        );
        for stranger in [0, -1, 1] {
            let e = vcpus_of(me, &own, &[cpu(me), cpu(stranger)])
                .unwrap_err()
                .to_string();
            assert!(e.contains("not a thread of QEMU"), "{e}");
        }
    }

    /// A VM's record from before its QEMU's version was kept reads with none, and a TCG guest
    /// adopted from it keeps QEMU's 300 ms pause limit; a record with QEMU 10.0 gets 10 ms.
    #[test]
    fn a_record_without_the_qemu_version_keeps_the_careful_tcg_tuning() {
        let config = serde_json::to_value(VmConfig::new("fw1", "/k", "/i")).unwrap();
        let old: Persisted = serde_json::from_value(serde_json::json!({
            "config": config, "pid": 1, "accel": "tcg", "warnings": []
        }))
        .unwrap();
        assert_eq!(old.qemu_version, None);
        let tuned = |p: &Persisted| crate::migrate::MigrationTuning::tuned(p.accel, p.qemu_version);
        assert_eq!(tuned(&old).downtime_limit_ms, 300);
        let new: Persisted = serde_json::from_value(serde_json::json!({
            "config": config, "pid": 1, "accel": "tcg", "qemu_version": [10, 0], "warnings": []
        }))
        .unwrap();
        assert_eq!(tuned(&new).downtime_limit_ms, 10);
    }

    #[test]
    fn command_line_carries_name_and_resources() {
        let mut c = VmConfig::new("fw1", "/k", "/i");
        c.vcpus = 2;
        c.memory_mib = 512;
        c.shared_memory = true;
        c.lock_memory = true;
        let a = qemu_args(&c, Path::new("/run/tv/fw1"), Accel::Tcg, None);
        let j = a.join(" ");
        assert!(j.contains("-name guest=fw1,process=fw1"), "{j}");
        assert!(j.contains("-smp 2 -m 512M"), "{j}");
        assert!(
            j.contains("memory-backend-memfd,id=tv-mem,size=512M,share=on"),
            "{j}"
        );
        assert!(
            j.contains("-machine pc,accel=tcg,memory-backend=tv-mem"),
            "{j}"
        );
        assert!(j.contains("-overcommit mem-lock=on"), "{j}");
        c.machine = Some("pc-i440fx-7.1".into());
        let pinned = qemu_args(&c, Path::new("/run/tv/fw1"), Accel::Tcg, None).join(" ");
        assert!(
            pinned.contains("-machine pc-i440fx-7.1,accel=tcg,memory-backend=tv-mem"),
            "{pinned}"
        );
        c.machine = None;
        assert!(j.contains("-S"), "{j}");
        assert!(j.contains("/run/tv/fw1/qmp.sock"), "{j}");
        c.vhost_user_nics = vec![VhostUserNic {
            id: "in".into(),
            socket: "/run/tv/fw1/nic-in.sock".into(),
            mac: "52:54:00:00:00:01".into(),
        }];
        let j = qemu_args(&c, Path::new("/run/tv/fw1"), Accel::Tcg, None).join(" ");
        assert!(
            j.contains("-chardev socket,id=tv-nic-in-chr,path=/run/tv/fw1/nic-in.sock,server=on,wait=off -netdev vhost-user,id=tv-nic-in,chardev=tv-nic-in-chr -device virtio-net-pci,netdev=tv-nic-in,id=tv-nic-in-dev,mac=52:54:00:00:00:01,vectors=0"),
            "{j}"
        );
        let h = qemu_args(
            &c,
            Path::new("/d"),
            Accel::Kvm,
            Some(Path::new("/dev/hugepages")),
        );
        let j = h.join(" ");
        assert!(j.contains("memory-backend-file,id=tv-mem,size=512M,mem-path=/dev/hugepages,share=on,prealloc=on"), "{j}");
        assert!(j.contains("-cpu host"), "{j}");
        assert!(
            qemu_args(&c, Path::new("/d"), Accel::Tcg, None)
                .join(" ")
                .contains("-cpu max"),
        );
        // A named model: the same CPU on every host, enforced under KVM.
        c.cpu_model = Some("Haswell-v4".into());
        let named = |accel| qemu_args(&c, Path::new("/d"), accel, None).join(" ");
        assert!(named(Accel::Kvm).contains("-cpu Haswell-v4,enforce"));
        assert!(named(Accel::Tcg).contains("-cpu Haswell-v4 "));
    }

    #[test]
    fn console_tail_reads_last_lines() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c.log");
        std::fs::write(&p, "a\r\nb\n\nc\nd\n").unwrap();
        assert_eq!(console_tail(&p, 2), vec!["c", "d"]);
        assert_eq!(console_tail(&p, 10), vec!["a", "b", "c", "d"]);
        assert!(console_tail(&d.path().join("none"), 3).is_empty());
        // A rotated log's older half comes first where the log holds fewer lines.
        std::fs::write(crate::logcap::older(&p), "x\ny\n").unwrap();
        assert_eq!(console_tail(&p, 5), vec!["y", "a", "b", "c", "d"]);
        assert_eq!(console_tail(&p, 4), vec!["a", "b", "c", "d"]);
    }
}
