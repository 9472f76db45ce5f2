//! Live migration of a running VM between two QEMUs: precopy over TCP. The destination QEMU
//! waits with `-incoming defer` (the source's configuration, its own state dir and CPUs;
//! [`crate::VmManager::start_incoming`]), the source streams its RAM and device state, and both
//! ends set the same capabilities and parameters over QMP, each only when the installed QEMU
//! offers it (probed, never assumed). A migration that fails or is cancelled leaves the guest
//! running on its source.
//!
//! It must not choose hosts or cores: the controller places the destination, the agents ask.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::error::{Error, Result};
use crate::manager::{VmHandle, VmPhase};
use crate::qmp::{QmpClient, QmpEvent};
use crate::stream_seal::{self, OneStreamKey, StreamSecret};

/// How often a running migration is asked how far it got, at most: a change of its status
/// (QEMU's `MIGRATION` event) has it asked at once ([`next_status_change`]).
const POLL: Duration = Duration::from_millis(20);

/// QEMU's capability that sends a `MIGRATION` event at each change of a stream's status.
const EVENTS: &str = "events";

/// QMP deadline of one migration command.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the final copy may take once let through its commit point (device state and the
/// last dirty pages; a destination gone mid-copy would otherwise hold the guest stopped until
/// TCP gives up).
const FINAL_COPY_LIMIT: Duration = Duration::from_secs(30);

/// Waits for QEMU's next `MIGRATION` event, at most [`POLL`]: a loop that follows a stream
/// looks again at once when its status changes (the source reaching its commit point or
/// completing, the destination's stream completing), not up to a poll later, while the guest
/// stands stopped. Lost events (a lagging receiver) end the wait too.
async fn next_status_change(events: &mut tokio::sync::broadcast::Receiver<QmpEvent>) {
    use tokio::sync::broadcast::error::RecvError;
    let changed = async {
        loop {
            match events.recv().await {
                Ok(QmpEvent::Migration { .. }) | Err(RecvError::Lagged(_)) => return,
                Ok(_) => {}
                // The connection ended: the poll's own wait ends this one.
                Err(RecvError::Closed) => std::future::pending::<()>().await,
            }
        }
    };
    let _ = tokio::time::timeout(POLL, changed).await;
}

/// QEMU's capability that holds a stream at its final copy until `migrate-continue`.
const PAUSE_BEFORE_SWITCHOVER: &str = "pause-before-switchover";

/// Name under which a passed socket is handed to QEMU for a migration stream.
const STREAM_FD: &str = "tv-migration";

/// The send and receive buffers a guest stream's sockets ask for (the kernel doubles each, up
/// to its `net.core.wmem_max` / `rmem_max`, and no longer grows them): the cluster's agents
/// give them to the sockets they pass ([`MigrationChannel::Socket`]). QEMU counts a byte as
/// sent once its socket took it: what the two buffers still hold when the source completes,
/// the destination reads before it can resume the guest, so the kernel's own growth (to 4 and
/// 6 MiB) lengthened the guest's pause (A/B runs of `telvirt bench vm-move`, BENCHMARKS). With
/// Linux's default 208 KiB caps a socket gets about 416 KiB, which still fills a 10 Gbit/s link
/// up to about 0.3 ms of round trip; a longer one caps the stream at that per round trip.
pub const STREAM_BUFFER_BYTES: u32 = 512 << 10;

/// Which end of a guest stream a socket is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEnd {
    Source,
    Destination,
}

/// A connected TCP socket made a guest stream's, to hand to QEMU with
/// [`MigrationChannel::Socket`] (or to a sealing relay with [`MigrationChannel::Encrypted`]):
/// no Nagle delay (the final copy's last bytes go at once), the buffer that end fills bounded
/// to [`STREAM_BUFFER_BYTES`] (the source's send buffer, the destination's receive buffer), and
/// blocking, as QEMU's stream and the relay expect (QEMU makes any descriptor it receives over
/// its monitor blocking anyway). The cluster's agents and `telvirt bench vm-migrate` make their
/// streams' sockets with it.
pub fn stream_socket(
    stream: std::net::TcpStream,
    end: StreamEnd,
) -> std::io::Result<std::os::fd::OwnedFd> {
    stream.set_nodelay(true)?;
    let socket = socket2::SockRef::from(&stream);
    let bytes = STREAM_BUFFER_BYTES as usize;
    match end {
        StreamEnd::Source => socket.set_send_buffer_size(bytes)?,
        StreamEnd::Destination => socket.set_recv_buffer_size(bytes)?,
    }
    stream.set_nonblocking(false)?;
    Ok(stream.into())
}

/// Where a migration stream goes (on the source) or comes from (on the destination).
#[derive(Debug)]
pub enum MigrationChannel {
    /// A TCP address: the destination's QEMU listens on it, the source's connects.
    Tcp(SocketAddr),
    /// A connected stream socket (TCP or unix) handed to QEMU with `getfd`: the stream then
    /// crosses a connection its owner opened (the agents' own port), and no QEMU listens on
    /// the network.
    Socket(std::os::fd::OwnedFd),
    /// A passed socket whose stream a relay process this process starts seals with the secret
    /// ([`stream_seal`]): QEMU is handed a socket pair's end in its place and streams into it in
    /// the clear; the network sees the stream encrypted, and a peer without the secret opens
    /// none of it. Made with [`MigrationChannel::encrypted`]; it carries one stream.
    Encrypted(std::os::fd::OwnedFd, OneStreamKey),
}

impl std::fmt::Display for MigrationChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp(at) => write!(f, "tcp:{at}"),
            Self::Socket(_) => f.write_str("a passed socket"),
            Self::Encrypted(..) => f.write_str("a passed socket, sealed (AES-256-GCM)"),
        }
    }
}

impl MigrationChannel {
    /// A passed socket whose stream is sealed with `secret` (the key of this one stream).
    pub fn encrypted(socket: std::os::fd::OwnedFd, secret: StreamSecret) -> Self {
        Self::Encrypted(socket, OneStreamKey::new(secret))
    }

    /// `tuning` as this channel can carry it: a passed socket is one stream (QEMU opens
    /// multifd's further channels itself, to an address), so multifd is off there.
    pub fn carries(&self, tuning: &MigrationTuning) -> MigrationTuning {
        match self {
            Self::Tcp(_) => tuning.clone(),
            Self::Socket(_) | Self::Encrypted(..) => tuning.over_one_stream(),
        }
    }

    /// The URI QEMU takes for this channel, as the `end` of the stream of the VM `vm`,
    /// handing it the socket first when there is one (for an encrypted one, the end of a
    /// socket pair whose other end the relay process it starts seals onto the connection).
    pub(crate) async fn uri(&self, vm: &VmHandle, end: StreamEnd) -> Result<String> {
        use std::os::fd::AsFd;
        let qmp = vm.qmp();
        match self {
            Self::Tcp(at) => Ok(format!("tcp:{at}")),
            Self::Socket(fd) => {
                qmp.getfd(STREAM_FD, fd.as_fd()).await?;
                Ok(format!("fd:{STREAM_FD}"))
            }
            Self::Encrypted(fd, key) => {
                // As its QEMU's own uid, where QEMU has one (ADR 068; its gid is the same).
                let run_as = vm.confinement().filter(|c| c.own_uid).map(|c| c.uid);
                let relayed = key
                    .take()
                    .and_then(|secret| stream_seal::relay(fd, &secret, end, vm.name(), run_as))
                    .map_err(Error::io("start a guest stream's sealing relay"))?;
                qmp.getfd(STREAM_FD, relayed.as_fd()).await?;
                Ok(format!("fd:{STREAM_FD}"))
            }
        }
    }
}

/// The commit point of a migration ([`VmHandle::migrate_to_gated`]): asked once the stream
/// reached its final copy, the guest stopped on the source and its device state not yet sent
/// (QEMU's `pre-switchover`). `true` lets the copy complete (the guest then runs only at the
/// destination); `false` cancels the stream and the guest runs on at the source.
pub type SwitchoverGate =
    Box<dyn FnMut() -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send>> + Send>;

/// How a migration is asked to behave; both ends get the same.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationTuning {
    /// Longest pause of the guest allowed for the final copy, ms; QEMU stops the source only
    /// once it expects to copy the rest within it (QEMU's default: 300).
    pub downtime_limit_ms: u64,
    /// Bytes per second the stream may use (`None`: QEMU's default, 128 MiB/s in 7.2).
    pub max_bandwidth: Option<u64>,
    /// Parallel TCP channels for RAM (`multifd`); 0: one stream, as QEMU does by default.
    pub multifd_channels: u8,
    /// Throttle the vCPUs when the guest dirties memory faster than the stream copies it, so
    /// the migration converges (QEMU's default: off).
    pub auto_converge: bool,
}

impl MigrationTuning {
    /// What QEMU does when asked nothing: the baseline telvirt's tuning is measured against.
    pub fn qemu_defaults() -> Self {
        Self {
            downtime_limit_ms: 300,
            max_bandwidth: None,
            multifd_channels: 0,
            auto_converge: false,
        }
    }
}

/// The first QEMU version (`major.minor`) whose TCG guests telvirt moves with a 10 ms pause
/// limit: the one measured to deliver guests that dirty memory intact (QEMU 7.2 did not; the
/// versions between were not measured).
pub const TCG_TIGHT_FROM: (u32, u32) = (10, 0);

impl MigrationTuning {
    /// This tuning over a single stream (a passed socket): multifd off.
    pub fn over_one_stream(&self) -> Self {
        Self {
            multifd_channels: 0,
            ..self.clone()
        }
    }

    /// telvirt's tuning for a guest on `accel` whose source runs QEMU `qemu` (`major.minor`,
    /// when known): the link unthrottled (10 GiB/s), two channels, auto-converge, and a 10 ms
    /// pause. Under TCG before QEMU [`TCG_TIGHT_FROM`] the pause limit stays QEMU's 300 ms:
    /// with QEMU 7.2's TCG, a guest dirtying 20 MiB/s migrated with a 10 or 30 ms limit (more
    /// precopy passes) came up corrupted on the destination (a kernel panic on list corruption
    /// in an interrupt, or a hung agent) in most tries, and in none of 7 at 300 ms; at 50 MiB/s
    /// guests break at 300 ms too. QEMU 10.0's TCG delivered every one intact, at 10 ms, up to
    /// 200 MiB/s (`telvirt bench vm-migrate --qemu`, ADR 062).
    pub fn tuned(accel: crate::config::Accel, qemu: Option<(u32, u32)>) -> Self {
        let tight = accel == crate::config::Accel::Kvm || qemu >= Some(TCG_TIGHT_FROM);
        Self {
            downtime_limit_ms: if tight { 10 } else { 300 },
            max_bandwidth: Some(10 << 30),
            multifd_channels: 2,
            auto_converge: true,
        }
    }
}

/// Where a migration is, as the source's QEMU reports it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MigrationProgress {
    /// QEMU's status: `setup`, `active`, `device`, `completed`, `failed`, `cancelled`, ...
    pub status: String,
    /// Since the migration started, ms.
    pub total_ms: u64,
    /// RAM bytes sent so far.
    pub transferred_bytes: u64,
    /// RAM bytes still to send (dirty or never sent).
    pub remaining_bytes: u64,
    /// Guest RAM.
    pub total_bytes: u64,
    /// Pages the guest dirties per second, as QEMU last measured.
    pub dirty_pages_per_s: u64,
    /// Passes over the dirty bitmap so far.
    pub dirty_syncs: u64,
    /// How long the source was stopped for the final copy, ms (once completed): QEMU's own
    /// measure, until its last byte left; the destination resumes the guest later.
    pub downtime_ms: Option<u64>,
    /// When the source's QEMU began stopping the guest, µs since the Unix epoch by this host's
    /// clock (once completed; [`pause_began_at_us`]): the start of the guest's whole pause,
    /// which ends when the destination resumes it ([`crate::VmHandle::resumed_at_us`]).
    #[serde(default)]
    pub stopped_at_us: Option<u64>,
    /// When it reached its commit point (`pre-switchover`), was let through it (`device`) and
    /// its last byte left (`completed`): QEMU's `MIGRATION` event times, µs since the Unix
    /// epoch by this host's clock (once completed; the first two only with a commit point).
    #[serde(default)]
    pub commit_point_at_us: Option<u64>,
    #[serde(default)]
    pub continued_at_us: Option<u64>,
    #[serde(default)]
    pub completed_at_us: Option<u64>,
}

/// When a stream's source began stopping its guest, µs: the earlier of its `STOP` event
/// (`stop`) and its last byte (`completed`, QEMU's `COMPLETED` event) less QEMU's own
/// downtime. QEMU starts its downtime clock before it pauses the vCPUs and runs the run-state
/// handlers, and emits `STOP` only after them, so a pause counted from the event alone could
/// read shorter than QEMU's own measure; counted from the earlier, it never does. QEMU 9.0 and
/// later read the downtime's end before emitting `COMPLETED`, so this is within QEMU's whole
/// ms of its clock's start; older ones (7.2) read it after, once the main lock is theirs, so
/// there the start may come that much early and the pause read longer than it was (never
/// shorter). Without the downtime or the last byte, the event.
pub fn pause_began_at_us(
    stop: Option<u64>,
    completed: Option<u64>,
    downtime_ms: Option<u64>,
) -> Option<u64> {
    let by_downtime = completed
        .zip(downtime_ms)
        .map(|(done, ms)| done.saturating_sub(ms.saturating_mul(1000)));
    match (stop, by_downtime) {
        (Some(stop), Some(began)) => Some(stop.min(began)),
        (stop, _) => stop,
    }
}

impl MigrationProgress {
    fn from_query(v: &Value) -> Self {
        let n = |v: &Value| v.as_u64().unwrap_or(0);
        let ram = &v["ram"];
        Self {
            status: v["status"].as_str().unwrap_or("none").to_owned(),
            total_ms: n(&v["total-time"]),
            transferred_bytes: n(&ram["transferred"]),
            remaining_bytes: n(&ram["remaining"]),
            total_bytes: n(&ram["total"]),
            dirty_pages_per_s: n(&ram["dirty-pages-rate"]),
            dirty_syncs: n(&ram["dirty-sync-count"]),
            downtime_ms: v["downtime"].as_u64(),
            stopped_at_us: None,
            commit_point_at_us: None,
            continued_at_us: None,
            completed_at_us: None,
        }
    }

    /// Whether the stream has ended (`completed`, `failed`, `cancelled`), or none runs.
    fn ended(&self) -> bool {
        ["completed", "failed", "cancelled", "none"].contains(&self.status.as_str())
    }
}

/// How long [`stream_end`] waits.
const STREAM_END_WAIT: Duration = Duration::from_secs(10);

/// Waits (up to [`STREAM_END_WAIT`]) for this QEMU's outgoing stream to end: its last figures
/// once QEMU says it ended ([`MigrationProgress::ended`]), `None` while it still runs.
async fn stream_end(qmp: &QmpClient) -> Option<MigrationProgress> {
    let until = Instant::now() + STREAM_END_WAIT;
    while Instant::now() < until {
        if let Ok(v) = qmp
            .execute_raw("query-migrate", None, COMMAND_TIMEOUT)
            .await
        {
            let now = MigrationProgress::from_query(&v);
            if now.ended() {
                return Some(now);
            }
        }
        tokio::time::sleep(POLL).await;
    }
    None
}

/// Ends an outgoing stream of a QEMU being adopted, whose run state is `run_state`: the agent
/// that started it (and would have followed it to its end, or let it through its commit
/// point) is gone, so nobody would. A stream short of its final copy is cancelled (the guest
/// runs on here, resumed if the commit point had stopped it; a move that still stands streams
/// anew); one in its final copy (`device`, past the commit point) is let finish (the guest then
/// moved: `postmigrate`). Either is waited for ([`stream_end`]): a stream that has not ended
/// by then leaves the guest as it is, never resumed here (it may run at the destination):
/// `ended` false. Returns what was done, for the handle's warnings (`None`: no stream ran). A
/// destination's incoming stream is left alone.
pub(crate) async fn end_orphaned_stream(
    qmp: &QmpClient,
    run_state: &str,
) -> Result<Option<OrphanStream>> {
    if run_state == "inmigrate" {
        return Ok(None);
    }
    let was = MigrationProgress::from_query(
        &qmp.execute_raw("query-migrate", None, COMMAND_TIMEOUT)
            .await?,
    );
    if was.ended() {
        return Ok(None);
    }
    let was = was.status;
    if was != "device" {
        let _ = qmp
            .execute_raw("migrate_cancel", None, COMMAND_TIMEOUT)
            .await;
    }
    let Some(end) = stream_end(qmp).await else {
        return Ok(Some(OrphanStream {
            note: format!(
                "its outgoing migration stream, left by the agent that started it, was {was} and still runs after {} s: the guest is not resumed here",
                STREAM_END_WAIT.as_secs()
            ),
            ended: false,
            undone: false,
        }));
    };
    let undone = end.status != "completed";
    if undone {
        resume_if_stopped(qmp).await?;
    }
    let done = if was == "device" {
        "let finish"
    } else {
        "cancelled"
    };
    Ok(Some(OrphanStream {
        note: format!(
            "its outgoing migration stream ({was}) was left by the agent that started it: {done}, it ended {}",
            end.status
        ),
        ended: true,
        undone,
    }))
}

/// `cont` a guest that is stopped (at a commit point, after a cancelled stream).
pub(crate) async fn resume_if_stopped(qmp: &QmpClient) -> Result<()> {
    if !qmp.query_status().await?.running {
        qmp.cont().await?;
    }
    Ok(())
}

/// What [`end_orphaned_stream`] did.
pub(crate) struct OrphanStream {
    pub note: String,
    /// Whether the stream ended (else it still runs, and the guest is not to be resumed here).
    pub ended: bool,
    /// Whether it ended without moving the guest (failed or cancelled): the guest runs here.
    pub undone: bool,
}

/// The capabilities this QEMU offers, by name.
async fn offered(qmp: &QmpClient) -> Result<Vec<String>> {
    let caps = qmp
        .execute_raw("query-migrate-capabilities", None, COMMAND_TIMEOUT)
        .await?;
    Ok(caps
        .as_array()
        .map(|list| {
            list.iter()
                .filter_map(|c| c["capability"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default())
}

/// Sets `tuning` on one end: the capabilities it asks for that this QEMU offers, then the
/// parameters. Both ends must be prepared alike before the stream starts (multifd on one end
/// only fails the migration). `commit_point` asks for the source's own
/// `pause-before-switchover` (set off otherwise, so an earlier gated stream's setting does not
/// outlive it); returns whether this QEMU holds the stream there.
pub(crate) async fn prepare(
    qmp: &QmpClient,
    tuning: &MigrationTuning,
    commit_point: bool,
) -> Result<bool> {
    let offered = offered(qmp).await?;
    let wanted = [
        ("multifd", tuning.multifd_channels > 0),
        ("auto-converge", tuning.auto_converge),
        (PAUSE_BEFORE_SWITCHOVER, commit_point),
        (EVENTS, true),
    ];
    let capabilities: Vec<Value> = wanted
        .iter()
        .filter(|(name, _)| offered.iter().any(|o| o == name))
        .map(|(name, on)| json!({ "capability": name, "state": on }))
        .collect();
    qmp.execute_raw(
        "migrate-set-capabilities",
        Some(json!({ "capabilities": capabilities })),
        COMMAND_TIMEOUT,
    )
    .await?;
    // No QEMU TLS: a sealed stream is sealed by its relay (`stream_seal`), and a QEMU adopted
    // from an agent that still set `tls-creds` would otherwise run TLS its peer does not.
    let mut parameters = json!({ "downtime-limit": tuning.downtime_limit_ms, "tls-creds": "" });
    if let Some(bandwidth) = tuning.max_bandwidth {
        parameters["max-bandwidth"] = bandwidth.into();
    }
    if tuning.multifd_channels > 0 && offered.iter().any(|o| o == "multifd") {
        parameters["multifd-channels"] = tuning.multifd_channels.into();
    }
    qmp.execute_raw("migrate-set-parameters", Some(parameters), COMMAND_TIMEOUT)
        .await?;
    Ok(commit_point && offered.iter().any(|o| o == PAUSE_BEFORE_SWITCHOVER))
}

impl VmHandle {
    /// Migrates this running VM to the destination listening on `to` (started with
    /// [`crate::VmManager::start_incoming`] and the same `tuning`), reporting progress to
    /// `progress` about every 20 ms. Answers the final report once QEMU says `completed`: the
    /// guest then waits, stopped, on this side (`postmigrate`) until it is stopped here; it
    /// runs there ([`VmHandle::finish_incoming`]). When the stream fails, or `deadline`
    /// passes (the migration is cancelled then), the guest goes on running here and the error
    /// says why.
    pub async fn migrate_to(
        &self,
        to: &MigrationChannel,
        tuning: &MigrationTuning,
        deadline: Duration,
        progress: impl FnMut(&MigrationProgress),
    ) -> Result<MigrationProgress> {
        self.migrate_to_gated(to, tuning, deadline, progress, None)
            .await
    }

    /// [`VmHandle::migrate_to`] with a commit point: when this QEMU offers
    /// `pause-before-switchover`, the stream waits at its final copy (the guest stopped here)
    /// for `gate`'s answer, which lets it complete or cancels it (the guest then runs on here).
    /// The wait counts in the guest's downtime. A QEMU without the capability streams as
    /// [`VmHandle::migrate_to`] does and `gate` is never asked.
    pub async fn migrate_to_gated(
        &self,
        to: &MigrationChannel,
        tuning: &MigrationTuning,
        deadline: Duration,
        mut progress: impl FnMut(&MigrationProgress),
        mut gate: Option<SwitchoverGate>,
    ) -> Result<MigrationProgress> {
        if self.phase() != VmPhase::Running {
            return Err(Error::Migration {
                vm: self.name().to_owned(),
                reason: format!(
                    "only a running VM moves; this one is {}",
                    format!("{:?}", self.phase()).to_lowercase()
                ),
            });
        }
        let qmp = self.qmp();
        if !prepare(qmp, &to.carries(tuning), gate.is_some()).await? {
            gate = None;
        }
        let mut events = qmp.events();
        let begun = async {
            let uri = to.uri(self, StreamEnd::Source).await?;
            qmp.execute_raw("migrate", Some(json!({ "uri": uri })), COMMAND_TIMEOUT)
                .await
        };
        if let Err(e) = begun.await {
            // QEMU would hold the stream's socket (or its relay's end) until a next stream.
            let _ = qmp.closefd(STREAM_FD).await;
            return Err(e);
        }
        let started = Instant::now();
        let mut last = MigrationProgress::default();
        // When it was let through its commit point: from then on only the final copy's own
        // limit ends it (the move's deadline no longer does).
        let mut continued: Option<Instant> = None;
        let ended = loop {
            let now = match qmp
                .execute_raw("query-migrate", None, COMMAND_TIMEOUT)
                .await
            {
                Ok(v) => MigrationProgress::from_query(&v),
                // QEMU did not answer in time: the stream may go on; end it and see how.
                Err(e) => break Err(format!("QEMU stopped answering ({e})")),
            };
            progress(&now);
            match now.status.as_str() {
                "completed" => break Ok(now),
                "failed" | "cancelled" => break Err(self.why_failed(&now).await),
                "pre-switchover" => {
                    if let Some(mut ask) = gate.take() {
                        if !ask().await {
                            break Err("it was cancelled at its commit point (the final copy was not let through)".to_owned());
                        }
                        if let Err(e) = qmp
                            .execute_raw(
                                "migrate-continue",
                                Some(json!({ "state": "pre-switchover" })),
                                COMMAND_TIMEOUT,
                            )
                            .await
                        {
                            break Err(format!("QEMU did not go on past the commit point ({e})"));
                        }
                        continued = Some(Instant::now());
                    }
                }
                _ => {}
            }
            if let Some(at) = continued
                && at.elapsed() > FINAL_COPY_LIMIT
            {
                break Err(format!(
                    "its final copy did not complete within {FINAL_COPY_LIMIT:?} of its commit point"
                ));
            }
            if continued.is_none() && started.elapsed() > deadline {
                break Err(format!(
                    "not done within {deadline:?} ({} of {} bytes left, {} pages dirtied per second)",
                    now.remaining_bytes, now.total_bytes, now.dirty_pages_per_s
                ));
            }
            last = now;
            next_status_change(&mut events).await;
        };
        match ended {
            Ok(done) => Ok(self.moved_away(done).await),
            Err(why) => self.settle_failed(to, &why, &last).await,
        }
    }

    /// After a stream to `to` that ended with `why` (last seen at `last`): cancels what may
    /// still run and waits until QEMU says how it ended. A stream that completed meanwhile did
    /// move the guest (resuming it here would run it twice): its figures; otherwise the guest
    /// runs on here and the error says why.
    async fn settle_failed(
        &self,
        to: &MigrationChannel,
        why: &str,
        last: &MigrationProgress,
    ) -> Result<MigrationProgress> {
        match self.settle().await {
            Some(done) => Ok(self.moved_away(done).await),
            None => {
                self.keep_running_here().await?;
                Err(Error::Migration {
                    vm: self.name().to_owned(),
                    reason: format!(
                        "the stream to {to} ended: {why}; the guest runs on here (last seen: {} of {} bytes left)",
                        last.remaining_bytes, last.total_bytes
                    ),
                })
            }
        }
    }

    /// Asks QEMU to end the outgoing stream under way: [`VmHandle::migrate_to`] then answers
    /// its error and the guest runs on here (or, had the stream completed first, it moved).
    pub async fn cancel_migration(&self) -> Result<()> {
        self.qmp()
            .execute_raw("migrate_cancel", None, COMMAND_TIMEOUT)
            .await
            .map(|_| ())
    }

    /// QEMU's reason for a failed stream, else its status.
    async fn why_failed(&self, now: &MigrationProgress) -> String {
        self.qmp()
            .execute_raw("query-migrate", None, COMMAND_TIMEOUT)
            .await
            .ok()
            .and_then(|v| v["error-desc"].as_str().map(str::to_owned))
            .unwrap_or_else(|| now.status.clone())
    }

    /// Cancels the stream if it still runs and waits (up to 10 s) until QEMU reports it ended:
    /// `Some` with the figures when it completed after all, `None` when it failed or was
    /// cancelled (or QEMU does not say).
    async fn settle(&self) -> Option<MigrationProgress> {
        let qmp = self.qmp();
        let _ = qmp
            .execute_raw("migrate_cancel", None, COMMAND_TIMEOUT)
            .await;
        stream_end(qmp)
            .await
            .filter(|end| end.status == "completed")
    }

    /// The guest now runs elsewhere: this QEMU holds a stopped copy (`Migrated`) until it is
    /// stopped; the completed stream's figures.
    async fn moved_away(&self, done: MigrationProgress) -> MigrationProgress {
        self.set_phase(VmPhase::Migrated);
        let mut done = self.final_figures(done).await;
        let qmp = self.qmp();
        let stop = qmp.last_event_at("STOP");
        // Times before this stream's stop are an earlier stream's (one cancelled at its
        // commit point): not this one's.
        let since_stop = |status| {
            qmp.last_migration_at(status)
                .filter(|&at| stop.is_some_and(|stop| at >= stop))
        };
        done.commit_point_at_us = since_stop("pre-switchover");
        done.continued_at_us = since_stop("device");
        done.completed_at_us = since_stop("completed");
        done.stopped_at_us = pause_began_at_us(stop, done.completed_at_us, done.downtime_ms);
        done
    }

    /// The completed migration's figures: QEMU may say `completed` a moment before it has
    /// filled in the times, so ask again (briefly) until they are there.
    async fn final_figures(&self, mut done: MigrationProgress) -> MigrationProgress {
        for _ in 0..25 {
            if done.total_ms > 0 {
                break;
            }
            tokio::time::sleep(POLL).await;
            match self
                .qmp()
                .execute_raw("query-migrate", None, COMMAND_TIMEOUT)
                .await
            {
                Ok(v) => done = MigrationProgress::from_query(&v),
                Err(_) => break,
            }
        }
        done
    }

    /// After a failed or cancelled migration: the guest runs on this side (QEMU resumes a guest
    /// that ran before the stream itself; this resumes it should QEMU not have).
    async fn keep_running_here(&self) -> Result<()> {
        resume_if_stopped(self.qmp()).await?;
        self.set_phase(VmPhase::Running);
        Ok(())
    }

    /// On a destination launched with [`crate::VmManager::launch_incoming`]: takes the stream
    /// from `from` (`migrate-incoming`). Called once; [`VmHandle::finish_incoming`] then waits
    /// for it to complete.
    pub async fn receive(&self, from: &MigrationChannel) -> Result<()> {
        if self.phase() != VmPhase::Incoming {
            return Err(Error::Migration {
                vm: self.name().to_owned(),
                reason: "not waiting for a migration stream".to_owned(),
            });
        }
        // Before QEMU holds the stream's socket: should this fail, the socket closes with its
        // owner and the source sees its stream fail at once.
        self.prepare_arrival().await?;
        let taken = async {
            let uri = from.uri(self, StreamEnd::Destination).await?;
            self.qmp()
                .execute_raw(
                    "migrate-incoming",
                    Some(json!({ "uri": uri })),
                    COMMAND_TIMEOUT,
                )
                .await
        };
        if let Err(e) = taken.await {
            let _ = self.qmp().closefd(STREAM_FD).await;
            return Err(e);
        }
        // An agent that adopts this QEMU later follows the stream it took.
        let mark = self.state_dir().join(crate::manager::INCOMING_MARK);
        if let Err(e) = std::fs::write(&mark, crate::manager::STREAM_TAKEN) {
            tracing::warn!(
                vm = self.name(),
                "cannot note in {} that the stream was taken: {e}; an agent restarted before the guest runs will not resume it",
                mark.display()
            );
        }
        Ok(())
    }

    /// On the destination: waits up to `deadline` for the incoming stream to complete, then
    /// resumes the guest here unless QEMU did as it completed, and waits for its agent (when
    /// the configuration has one). Answers the guest's uptime as its agent stated it then
    /// (none without an agent).
    pub async fn finish_incoming(&self, deadline: Duration) -> Result<Option<Duration>> {
        if self.phase() != VmPhase::Incoming {
            return Err(Error::Migration {
                vm: self.name().to_owned(),
                reason: "not waiting for a migration stream".to_owned(),
            });
        }
        let qmp = self.qmp();
        let started = Instant::now();
        let mut events = qmp.events();
        loop {
            let v = qmp
                .execute_raw("query-migrate", None, COMMAND_TIMEOUT)
                .await?;
            match v["status"].as_str().unwrap_or("none") {
                "completed" => break,
                "failed" | "cancelled" => {
                    return Err(Error::Migration {
                        vm: self.name().to_owned(),
                        reason: format!(
                            "the incoming stream ended: {}",
                            v["error-desc"].as_str().unwrap_or("failed")
                        ),
                    });
                }
                _ => {}
            }
            if started.elapsed() > deadline {
                return Err(Error::Timeout {
                    what: format!("the migration stream into {}", self.name()),
                    after: deadline,
                });
            }
            next_status_change(&mut events).await;
        }
        self.resume_incoming()
            .await
            .map_err(|e| Error::ArrivalBroken {
                vm: self.name().to_owned(),
                reason: format!(
                    "{e}; its console ends: {}",
                    self.console_tail(3).join(" | ")
                ),
            })
    }

    /// On the source of a completed stream (`Migrated`): resumes the stopped copy it kept, as
    /// the guest was when it stopped for its final copy. Only for a guest that runs nowhere
    /// else: its arrival broke ([`Error::ArrivalBroken`]) and the destination's QEMU is gone;
    /// a guest resumed here while it also ran there would run twice.
    pub async fn resume_moved_copy(&self) -> Result<()> {
        if self.phase() != VmPhase::Migrated {
            return Err(Error::Migration {
                vm: self.name().to_owned(),
                reason: format!(
                    "only a copy left by a completed stream resumes here; this one is {}",
                    format!("{:?}", self.phase()).to_lowercase()
                ),
            });
        }
        self.qmp().cont().await?;
        self.set_phase(VmPhase::Running);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On the paused test clock: how long (virtual) one wait took.
    async fn waited(events: &mut tokio::sync::broadcast::Receiver<QmpEvent>) -> Duration {
        let at = tokio::time::Instant::now();
        next_status_change(events).await;
        at.elapsed()
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_status_change_ends_the_wait_and_other_events_do_not() {
        let (tx, mut rx) = tokio::sync::broadcast::channel(4);
        // Nothing arrives: the poll's own wait.
        assert_eq!(waited(&mut rx).await, POLL);
        // Another event first, then a status change: over at once.
        tx.send(QmpEvent::Stop).unwrap();
        tx.send(QmpEvent::Migration {
            status: "completed".into(),
        })
        .unwrap();
        assert_eq!(waited(&mut rx).await, Duration::ZERO);
        // Events lost to a full channel may have held one: over at once too.
        for _ in 0..6 {
            tx.send(QmpEvent::Resume).unwrap();
        }
        assert_eq!(waited(&mut rx).await, Duration::ZERO);
        // The connection gone: neither a spin nor a hang, the poll's wait.
        while rx.try_recv().is_ok() {}
        drop(tx);
        assert_eq!(waited(&mut rx).await, POLL);
    }

    #[test]
    fn progress_reads_qemus_answer_and_survives_missing_members() {
        let v = json!({
            "status": "completed", "total-time": 812, "downtime": 7,
            "ram": {"transferred": 100, "remaining": 0, "total": 300,
                    "dirty-pages-rate": 42, "dirty-sync-count": 3}
        });
        let p = MigrationProgress::from_query(&v);
        assert_eq!(p.status, "completed");
        assert_eq!((p.total_ms, p.downtime_ms), (812, Some(7)));
        assert_eq!(
            (p.transferred_bytes, p.remaining_bytes, p.total_bytes),
            (100, 0, 300)
        );
        assert_eq!((p.dirty_pages_per_s, p.dirty_syncs), (42, 3));
        let empty = MigrationProgress::from_query(&json!({}));
        assert_eq!(empty.status, "none");
        assert_eq!(empty.downtime_ms, None);
    }

    #[test]
    fn a_pause_begins_when_qemu_began_stopping_the_guest() {
        // As seen in a run under load: STOP stamped at 10 s, the last byte 74.9 ms later, QEMU's
        // downtime 80 ms: its clock began 5.1 ms before the event.
        let stop = 10_000_000;
        let done = stop + 74_900;
        assert_eq!(
            pause_began_at_us(Some(stop), Some(done), Some(80)),
            Some(stop - 5_100)
        );
        // QEMU's whole ms fall short of the event: the event.
        assert_eq!(
            pause_began_at_us(Some(stop), Some(done), Some(74)),
            Some(stop)
        );
        assert_eq!(pause_began_at_us(Some(stop), None, Some(80)), Some(stop));
        assert_eq!(pause_began_at_us(Some(stop), Some(done), None), Some(stop));
        assert_eq!(pause_began_at_us(None, Some(done), Some(80)), None);
    }

    #[test]
    fn a_passed_socket_carries_one_stream() {
        use crate::config::Accel;
        let tuned = MigrationTuning::tuned(Accel::Kvm, None);
        let tcp = MigrationChannel::Tcp("127.0.0.1:1".parse().unwrap());
        assert_eq!(tcp.carries(&tuned), tuned);
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let socket = MigrationChannel::Socket(a.into());
        let carried = socket.carries(&tuned);
        assert_eq!(carried.multifd_channels, 0);
        assert_eq!(carried.downtime_limit_ms, tuned.downtime_limit_ms);
        assert_eq!(socket.to_string(), "a passed socket");
    }

    #[test]
    fn telvirt_tunes_tighter_than_qemus_defaults() {
        use crate::config::Accel;
        let theirs = MigrationTuning::qemu_defaults();
        let (kvm, tcg, tcg_next, tcg_unknown) = (
            MigrationTuning::tuned(Accel::Kvm, Some((7, 2))),
            MigrationTuning::tuned(Accel::Tcg, Some((7, 2))),
            MigrationTuning::tuned(Accel::Tcg, Some((10, 0))),
            MigrationTuning::tuned(Accel::Tcg, None),
        );
        assert_eq!(kvm.downtime_limit_ms, 10);
        // TCG keeps QEMU's limit before the first version measured to move guests intact.
        assert_eq!(tcg.downtime_limit_ms, theirs.downtime_limit_ms);
        assert_eq!(tcg_unknown.downtime_limit_ms, theirs.downtime_limit_ms);
        assert_eq!(tcg_next.downtime_limit_ms, 10);
        assert_eq!(
            MigrationTuning::tuned(Accel::Tcg, Some((11, 3))).downtime_limit_ms,
            10
        );
        for ours in [kvm, tcg, tcg_next] {
            assert!(ours.auto_converge && !theirs.auto_converge);
            assert!(ours.multifd_channels > theirs.multifd_channels);
        }
    }
}
