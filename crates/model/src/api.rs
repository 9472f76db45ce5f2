//! Shapes exchanged over the API that are not descriptors: authorities, hosts, problems, and the
//! agent ↔ controller protocol.
//!
//! Owns the wire shapes only. It must not hold behaviour beyond small constructors.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::FieldError;
use crate::lifecycle::{DesiredState, Phase, Placement, Role};
use crate::name::Name;
use crate::vnf::VnfDescriptor;

/// The name of the authority that sees and may act on everything.
pub const ADMIN_AUTHORITY: &str = "admin";

/// The wasm security domain of the `admin` authority (every permission by default).
pub const OPERATOR_DOMAIN: &str = "operator";
/// The security domain of a new authority that names none: the least privileged built-in one
/// (ADR 037).
pub const DEFAULT_AUTHORITY_DOMAIN: &str = "untrusted";

/// A management authority (operator, enterprise, ...).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Authority {
    pub name: Name,
    /// The wasm security domain its modules are installed into (what they may be granted).
    pub domain: String,
    /// RFC 3339.
    pub created_at: String,
}

/// Body of `POST /v1/authorities`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateAuthority {
    pub name: Name,
    /// Wasm security domain of the authority's modules, one of the node's security policy
    /// (`operator`, `trusted`, `untrusted` by default). Default: `untrusted`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
}

/// The answer to creating an authority: the only time the token is shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AuthorityToken {
    pub name: Name,
    /// The wasm security domain it was given.
    pub domain: String,
    pub token: String,
}

/// What the verifier read from an uploaded module's manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ModuleInfo {
    /// The manifest's module name.
    pub name: String,
    pub version: String,
    /// Permissions it requests (`maps.read`, `counters`, ...).
    pub permissions: Vec<String>,
    /// Its maps, with their declared capacities.
    pub maps: Vec<crate::vnf::MapSpec>,
    /// Counter names, in manifest order.
    #[serde(default)]
    pub counters: Vec<String>,
}

/// An uploaded, verified wasm module (`POST /v1/modules`), as its owner sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ModuleView {
    /// SHA-256 of its bytes, lowercase hex.
    pub sha256: String,
    /// What a descriptor writes in `spec.wasm.module`: `sha256:<hex>`.
    pub reference: String,
    pub size: u64,
    #[serde(flatten)]
    pub info: ModuleInfo,
    /// RFC 3339, when the caller first uploaded it.
    pub uploaded_at: String,
}

/// One map of a running wasm VNF (`GET /v1/vnfs/{name}/maps`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MapView {
    pub name: String,
    /// `hash`, `array` or `lru_hash`.
    pub kind: String,
    /// Entries it holds now (an array map: always `max_entries`).
    pub entries: u64,
    pub max_entries: u32,
    /// Bytes of each entry's key and value.
    #[serde(default)]
    pub key_size: u32,
    #[serde(default)]
    pub value_size: u32,
}

/// `POST /v1/vnfs/{name}/maps/{map}/entries`: a control-plane change of one map of a running
/// wasm VNF (a firewall rule, a UPF's bearer), applied between two batches, all or nothing:
/// the keys of `delete` go, then the entries of `put` are inserted or replaced. Keys and
/// values are hex, of the map's exact sizes (an array's key: its little-endian index).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MapChangeRequest {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub delete: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub put: Vec<MapEntry>,
}

/// One entry of a map, key and value in hex.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MapEntry {
    pub key: String,
    pub value: String,
}

/// The keys and entries of a [`MapChangeRequest`], decoded.
pub type DecodedMapChange = (Vec<Vec<u8>>, Vec<(Vec<u8>, Vec<u8>)>);

impl MapChangeRequest {
    /// Its keys and entries as bytes, once it names something, at most
    /// [`MAX_MAP_CHANGE_ENTRIES`](crate::vnf::limits::MAX_MAP_CHANGE_ENTRIES) of them, each
    /// valid hex of at most 1 KiB (the wasm runtime's largest key or value). The map's own
    /// sizes are checked where it runs.
    pub fn decode(&self) -> Result<DecodedMapChange, FieldError> {
        use crate::vnf::limits::{MAX_KEY_SIZE, MAX_MAP_CHANGE_ENTRIES, MAX_VALUE_SIZE};
        let field = if self.put.is_empty() { "delete" } else { "put" };
        let named = self.delete.len() + self.put.len();
        if named == 0 {
            return Err(FieldError::new(
                field,
                "the change names no key to delete and no entry to put",
            ));
        }
        if named > MAX_MAP_CHANGE_ENTRIES {
            return Err(FieldError::new(
                field,
                format!(
                    "{named} keys and entries; one change takes at most {MAX_MAP_CHANGE_ENTRIES}: split it"
                ),
            ));
        }
        let delete = self
            .delete
            .iter()
            .enumerate()
            .map(|(i, k)| hex_bytes(&format!("delete[{i}]"), k, MAX_KEY_SIZE))
            .collect::<Result<_, _>>()?;
        let put = self
            .put
            .iter()
            .enumerate()
            .map(|(i, e)| {
                Ok((
                    hex_bytes(&format!("put[{i}].key"), &e.key, MAX_KEY_SIZE)?,
                    hex_bytes(&format!("put[{i}].value"), &e.value, MAX_VALUE_SIZE)?,
                ))
            })
            .collect::<Result<_, FieldError>>()?;
        Ok((delete, put))
    }
}

/// `bytes` as lower-case hex digits, two per byte.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(2 * bytes.len()), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// `text` as bytes: pairs of hex digits, 1 to `max` bytes.
fn hex_bytes(field: &str, text: &str, max: u32) -> Result<Vec<u8>, FieldError> {
    let max = usize::try_from(max).unwrap_or(usize::MAX);
    if let Some((at, c)) = text
        .chars()
        .enumerate()
        .find(|(_, c)| !c.is_ascii_hexdigit())
    {
        return Err(FieldError::new(
            field,
            format!("`{c}` at character {at} is not a hex digit"),
        ));
    }
    if text.is_empty() || !text.len().is_multiple_of(2) || text.len() / 2 > max {
        return Err(FieldError::new(
            field,
            format!(
                "{} hex digits; expected an even number from 2 to {} (1 to {max} bytes)",
                text.len(),
                2 * max
            ),
        ));
    }
    let digit = |c: u8| (c as char).to_digit(16).unwrap_or(0);
    Ok(text
        .as_bytes()
        .chunks(2)
        .map(|pair| u8::try_from(digit(pair[0]) * 16 + digit(pair[1])).unwrap_or(0))
        .collect())
}

/// What a change of a map did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MapChangeResult {
    pub map: String,
    /// Keys removed (those of `delete` the map held).
    pub deleted: u64,
    /// Entries inserted or replaced.
    pub put: u64,
    /// Entries the map holds now (an array: always its `max_entries`).
    pub entries: u64,
}

/// One line a wasm module logged (`GET /v1/vnfs/{name}/logs`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LogLineView {
    /// 1 for the first line since the instance (re)started, one more per line: ask for the
    /// lines `after` the last one seen. A restart starts again from 1.
    pub seq: u64,
    /// The instance's clock when it was logged: ns since it started.
    pub at_ns: u64,
    /// The level the module gave (its own scale).
    pub level: i32,
    pub text: String,
}

/// A running wasm VNF's log (`GET /v1/vnfs/{name}/logs`): the newest lines its instance keeps
/// (at most 64), oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VnfLogs {
    pub lines: Vec<LogLineView>,
    /// The `seq` of the newest line the instance keeps (0: none yet). Below the `after` asked
    /// for, the instance restarted and counts from 1 again.
    pub latest: u64,
    /// Lines the module tried to log beyond 16 per batch or with a bad pointer (lost).
    pub dropped: u64,
}

/// A running VNF's counters (`GET /v1/vnfs/{name}/stats`): a wasm VNF's, or a vm VNF's NICs'.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum VnfStatsView {
    Wasm(WasmStatsView),
    Vm(VmStatsView),
}

/// A running vm VNF's counters: its vhost-user NICs as the host's data plane counts them, and
/// the guest's own interfaces as its kernel counts them (what the guest drops inside shows
/// there, not on the host's side).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VmStatsView {
    /// One per `spec.vm.nics` entry, in its order (empty: the VM has none on the data plane).
    pub nics: Vec<NicStatsView>,
    /// The guest's view, from its agent (`None`: the guest agent did not answer in time, or is
    /// older than these counters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest: Option<GuestNetView>,
}

/// A guest's network counters as its own kernel keeps them, read by the guest agent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct GuestNetView {
    /// Its interfaces but loopback, by name.
    pub nics: Vec<GuestNicView>,
    /// Frames its CPUs' input backlogs were too full to take (`/proc/net/softnet_stat`).
    pub backlog_dropped: u64,
    /// Every buffer its kernel dropped, by where and why, since its agent first started
    /// (`None`: a guest agent older than this record).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_drops: Option<GuestKernelDropsView>,
}

/// The buffers a guest's kernel freed as dropped, as its `skb:kfree_skb` tracepoint counts them:
/// also the drops no interface or queue counter shows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct GuestKernelDropsView {
    /// Why its drops are not traced (tracefs or histogram triggers unavailable in its kernel).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub untraced: Option<String>,
    /// Where and why, most first (at most 16).
    #[serde(default)]
    pub sites: Vec<GuestDropView>,
    /// Drops at the sites beyond those listed.
    #[serde(default)]
    pub elsewhere: u64,
}

/// The buffers one function of a guest's kernel dropped for one reason.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct GuestDropView {
    /// The kernel function that freed them (its module in brackets when not built in).
    pub function: String,
    /// The kernel's drop reason (`NOT_SPECIFIED` where its code gives none).
    pub reason: String,
    pub count: u64,
}

/// One interface inside a guest (`/sys/class/net/IF/statistics`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct GuestNicView {
    pub name: String,
    pub rx_packets: u64,
    pub tx_packets: u64,
    pub rx_dropped: u64,
    pub tx_dropped: u64,
    /// Frames received with an error (length, CRC, frame, FIFO, missed).
    #[serde(default)]
    pub rx_errors: u64,
    /// Frames that failed to be sent.
    #[serde(default)]
    pub tx_errors: u64,
    /// Frames its root queue discipline dropped before the device took them (`None`: it has
    /// none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qdisc_dropped: Option<u64>,
    /// Frames its root queue discipline holds now, waiting for the device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qdisc_queued: Option<u64>,
}

/// One vhost-user NIC of a vm VNF.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NicStatsView {
    /// The VNF port the NIC is.
    pub port: String,
    /// Whether QEMU is connected and the guest's driver has set its queues up.
    pub connected: bool,
    /// Frames written into the guest's receive queue.
    pub frames_to_guest: u64,
    /// Frames the guest sent, passed on to the port's link.
    pub frames_from_guest: u64,
    /// Frames for the guest larger than the buffer it offered (dropped).
    pub dropped_too_big: u64,
    /// Guest frames that were empty, too large or unreadable, and buffer chains the guest
    /// posted that name a descriptor beyond their queue or have more than 64 descriptors
    /// (dropped; a frame for such a receive buffer too).
    pub dropped_bad: u64,
    /// Frames dropped for want of a buffer on the host's side.
    pub dropped_no_buffer: u64,
    /// Connections to QEMU so far (more than one: QEMU or the host's agent restarted).
    pub connections: u64,
}

impl NicStatsView {
    /// Every frame the NIC dropped on the host's side.
    pub fn dropped(&self) -> u64 {
        self.dropped_too_big + self.dropped_bad + self.dropped_no_buffer
    }
}

/// A running wasm VNF's counters (`GET /v1/vnfs/{name}/stats`): the runtime's own, and the
/// module's (named by its manifest, e.g. the firewall's `allowed`, `denied`, `non_ip`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct WasmStatsView {
    pub batches: u64,
    pub packets_in: u64,
    pub packets_forwarded: u64,
    pub packets_dropped: u64,
    /// Batches dropped because the module trapped.
    pub batches_trapped: u64,
    /// Packets of the trapped batches (part of `packets_dropped`).
    #[serde(default)]
    pub packets_trapped: u64,
    /// Batches for which the module returned an error (all their packets dropped).
    pub batch_errors: u64,
    /// Packets of those batches (part of `packets_dropped`).
    #[serde(default)]
    pub packets_errored: u64,
    /// Verdicts naming a port the VNF does not have, or descriptors moved outside their slot.
    pub invalid_verdicts: u64,
    pub packets_emitted: u64,
    /// Packets the VNF forwarded to a port with no link (lost on the data plane).
    #[serde(default)]
    pub packets_unlinked: u64,
    /// Restarts of the instance after a failure (per its restart policy).
    pub restarts: u32,
    /// Fuel the module's code used (about one unit per wasm instruction): its CPU time.
    #[serde(default)]
    pub fuel_used: u64,
    /// The module's counters, in manifest order (from zero again after a module upgrade).
    pub counters: Vec<CounterView>,
}

/// One module counter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CounterView {
    pub name: String,
    pub value: u64,
}

/// What one logical CPU of a host is used for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase", tag = "state")]
pub enum CpuUse {
    /// In the dedicated set and not allocated.
    Free,
    /// Kept for the host OS; never handed out.
    Reserved,
    /// The shared set: host OS, agents, shared emulator threads.
    Shared,
    /// In no set.
    Unassigned,
    /// Held by one VNF instance exclusively.
    Vnf {
        vnf: String,
        role: Role,
        /// `vcpu N`, `emulator`, or `held` (an SMT sibling kept empty).
        purpose: String,
    },
    /// A core of a shared group.
    Group {
        group: String,
        authority: String,
        /// vCPUs on this core.
        vcpus: u32,
    },
    /// Held by another authority's VNF or shared group; who and what for is not shown.
    #[serde(rename = "in-use")]
    InUse,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CpuView {
    /// Linux logical CPU number.
    pub cpu: u32,
    /// Physical core id within its socket.
    pub core: u32,
    pub socket: u32,
    pub numa_node: u32,
    #[serde(rename = "use")]
    pub usage: CpuUse,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HugePageView {
    /// Page size in bytes.
    pub size: u64,
    pub total: u64,
    pub free: u64,
}

/// Whether a host's agent is alive: its heartbeat lease is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum HostStatus {
    /// The agent's heartbeat lease is alive.
    Ready,
    /// No heartbeat within the lease's TTL (or never one: a host without an agent, or a host
    /// record left behind by a renamed host). Its VNFs show phase `Unknown`.
    NotReady,
}

impl HostStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            HostStatus::Ready => "Ready",
            HostStatus::NotReady => "NotReady",
        }
    }
}

/// A host as the API shows it, with its core map.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HostView {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// `status == Ready`.
    pub ready: bool,
    /// Liveness from the agent's heartbeat lease.
    pub status: HostStatus,
    /// `false` once cordoned (or drained): nothing new is placed here (shown as
    /// `Ready,SchedulingDisabled`); what it holds stays until drained.
    pub schedulable: bool,
    /// Milliseconds since the last heartbeat; absent when none was ever received.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat_age_ms: Option<u64>,
    pub sockets: u32,
    pub numa_nodes: u32,
    pub memory_bytes: u64,
    #[serde(default)]
    pub hugepages: Vec<HugePageView>,
    /// Runtimes this host's agent can run (`vm`, `wasm`).
    #[serde(default)]
    pub runtimes: Vec<String>,
    /// The QEMU version (`major.minor`) of its vm runtime, when it has one: a vm VNF moves
    /// to a host whose QEMU is as new as its source's and has its machine type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qemu: Option<String>,
    /// The i440FX machine types that QEMU has (`pc-i440fx-X.Y`), newest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub qemu_machines: Vec<String>,
    /// The accelerator its vm runtime runs guests with, when known at its agent's start (its
    /// `--accel`, or a probe boot's cached answer): a KVM guest does not move to a TCG host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accel: Option<crate::vnf::Accelerator>,
    /// Its CPU as a KVM guest on the host's CPU sees it (vendor, family/model/stepping and
    /// model name): such a guest (no `spec.vm.cpu_model`) moves only to a host with the same
    /// one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<String>,
    /// Where this host's data plane takes links from other hosts (VXLAN over UDP) and its
    /// standbys their actives' state (TCP): `IP:PORT`, when its agent has a tunnel address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel: Option<String>,
    pub cpus: Vec<CpuView>,
}

/// An RFC 9457 problem document (`application/problem+json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Problem {
    /// A URI naming the problem type.
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    /// The refused fields, when the problem is about input.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
}

/// Body of `GET /v1/healthz` and `GET /v1/readyz`: `status` is `ok` when every component is
/// up. When one is down the answer is a 503 problem document with the same `components`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Health {
    pub status: String,
    pub version: String,
    /// Each part of the node by name: `store`, `scheduler`, `agent`, `dataplane`, ...
    #[serde(default)]
    pub components: BTreeMap<String, ComponentHealth>,
}

/// The state of one part of the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ComponentHealth {
    /// `up` or `down`.
    pub status: String,
    /// Why it is down; for a task that is up again after a restart, why its last run ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// RFC 3339, since when it is in this state (unset: since the node started).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// How many times a supervised task was restarted after it ended or panicked.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub restarts: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Body of a 503 from `GET /v1/healthz` or `GET /v1/readyz` (`application/problem+json`): an
/// RFC 9457 problem whose `detail` names each component that is down and why, with every
/// component's state in `components`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HealthProblem {
    /// `urn:telvirt:problem:unhealthy`.
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    pub version: String,
    pub components: BTreeMap<String, ComponentHealth>,
}

/// What the controller asks one host's agent to run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Assignment {
    pub vnf: Name,
    pub descriptor: VnfDescriptor,
    pub placement: Placement,
    pub desired: DesiredState,
    /// Locked VNFs are kept paused.
    pub locked: bool,
    /// The host memory placement counted for it (`Vnf::memory_bytes`; 0: not counted). A wasm
    /// instance whose module would need more is refused by the agent.
    #[serde(default)]
    pub memory_bytes: u64,
    pub generation: u64,
    /// Peripherals the instance should hold.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<crate::device::DeviceGrant>,
    /// The wasm security domain of the owning authority (wasm modules are installed into it;
    /// vm VNFs ignore it).
    pub domain: String,
    /// For the active instance of an active-standby wasm VNF: where its standby runs, to
    /// replicate its maps to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub standby: Option<StandbyPeer>,
    /// The pair's fencing token (`Vnf::epoch`): the active instance forwards only while no
    /// peer holds a higher one.
    #[serde(default)]
    pub epoch: u64,
    /// For the destination of a vm VNF's move: the host its guest comes from. The instance
    /// waits for the guest's migration stream (QEMU paused with `-incoming defer`) instead of
    /// booting; the source's assignment names this host as its `standby`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incoming_from: Option<String>,
    /// For the source of a wasm VNF's move, once its stream is synced and the destination
    /// runs: freeze the instance between two batches (packets that arrive are queued, not
    /// processed), send the last map updates to the standby and report the stream
    /// `handed-off`; the queued packets follow the maps to the destination, which processes
    /// them first. Cleared (the move cancelled): the instance goes on, its queue first.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hand_off: bool,
    /// For the source of a vm VNF's move whose guest broke on its arrival at the destination
    /// (that QEMU gone): resume the stopped copy its completed stream left here (QEMU's
    /// `postmigrate`) instead of failing it. Set only by the controller's end of such a move.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub resume_moved_copy: bool,
    /// For a standby instance (a pair's, or a move's destination): the tunnel address
    /// (`IP:PORT`) of the host its active runs on. This host's replication port takes the
    /// VNF's state, guest stream and queued packets only from that IP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_from: Option<String>,
    /// With `active_from`: the key of the stream from there ([`StandbyPeer::key`]); a batch
    /// whose tag was not made with it is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub active_key: Option<PairKey>,
}

/// What an agent observed of one VNF.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Observation {
    pub vnf: Name,
    pub phase: Phase,
    pub reason: String,
    /// The generation of the assignment this observation answers.
    pub generation: u64,
    /// How the active instance's state reaches its standby (an active with a standby only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication: Option<ReplicationStatus>,
    /// From the standby's host: its active is lost (its replication connection closed, or
    /// fell silent); the controller may make the standby the active. Sent with every report of
    /// the standby while it holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_lost: Option<ActiveLost>,
    /// The QEMU machine type a vm instance runs on (`pc-i440fx-7.2`; none for wasm, or
    /// before its QEMU started).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<String>,
    /// The accelerator a vm instance's QEMU runs with (none for wasm, or before it started).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accel: Option<crate::vnf::Accelerator>,
    /// A vm instance whose guest arrived by a migration stream: when its QEMU resumed the
    /// guest, µs since the Unix epoch by this host's clock (the end of the guest's pause).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed_at_us: Option<u64>,
    /// A move's destination whose instance took the move's stream and is gone without the
    /// guest running there (its QEMU killed): the controller ends such a move past its commit
    /// point on its source, whose stopped copy (or running guest) is then the only one.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub arrival_failed: bool,
}

/// How a standby lost its active.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ActiveLost {
    /// What the standby saw.
    pub why: String,
    /// The active's host closed the connection: the active's agent is gone (its kernel closed
    /// the socket), so no instance of it forwards any more. Otherwise it fell silent, which a
    /// cut path between the two hosts looks like too.
    pub closed: bool,
}

/// The secret the two ends of one replication stream share (a pair's active and standby, a
/// move's source and destination): every batch on the stream carries a tag made with it, and
/// the receiving host takes none whose tag does not match (ADR 066). The controller derives it
/// from the cluster's secret, the VNF, both hosts and the move; only the agents of those two
/// hosts are given it. 32 bytes, as 64 hex digits on the wire; never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct PairKey([u8; PairKey::LEN]);

impl PairKey {
    pub const LEN: usize = 32;

    pub fn new(bytes: [u8; Self::LEN]) -> Self {
        Self(bytes)
    }

    pub fn bytes(&self) -> &[u8; Self::LEN] {
        &self.0
    }
}

impl std::fmt::Debug for PairKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PairKey(<secret>)")
    }
}

impl Serialize for PairKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex(&self.0))
    }
}

impl<'de> Deserialize<'de> for PairKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let bytes = hex_bytes("key", &text, Self::LEN as u32)
            .map_err(|e| serde::de::Error::custom(e.to_string()))?;
        let bytes: [u8; Self::LEN] = bytes.try_into().map_err(|b: Vec<u8>| {
            serde::de::Error::custom(format!(
                "key: {} bytes; a pair key is {} bytes ({} hex digits)",
                b.len(),
                Self::LEN,
                2 * Self::LEN
            ))
        })?;
        Ok(Self(bytes))
    }
}

/// Where the standby instance of an active-standby VNF runs, for the agent of its active to
/// stream the instance's state to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct StandbyPeer {
    pub host: String,
    /// The standby host's replication address: its tunnel address (`IP:PORT`), over TCP.
    pub address: String,
    /// The stream's key: its batches are tagged with it.
    #[schema(value_type = String)]
    pub key: PairKey,
    /// For the source of a move: the move's id ([`Migration::id`]), which its stream's
    /// reports carry (`ReplicationStatus::move_id`). A new move is a new peer, even to the
    /// same host: its stream starts over. 0 for the standby of an active-standby pair.
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub move_id: u64,
}

/// How an active instance's state reaches its standby or the destination of its move. A wasm
/// instance's maps: a full snapshot, then the update log in ordered, acknowledged batches. A
/// moving vm's guest: QEMU's migration stream (`guest` says how far it got).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ReplicationStatus {
    pub standby_host: String,
    /// `synced` (the last batch was acknowledged; a guest's stream completed), `resyncing` (a
    /// full snapshot is due or on its way), `streaming` (a guest's stream runs), `handed-off`
    /// (a moving source froze and its last batch was acknowledged) or `failing` (the last
    /// attempt failed; see `error`).
    pub state: String,
    /// From taking the last acknowledged batch off the active instance to its
    /// acknowledgement by the standby, in microseconds: how far the standby may lag behind.
    pub lag_us: u64,
    /// Map updates the standby acknowledged since replication to it started.
    pub updates: u64,
    /// Full snapshots sent, the first one included.
    pub snapshots: u64,
    /// Bytes the standby acknowledged (a guest's stream: RAM bytes sent).
    pub bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// A moving vm's stream, as the source's QEMU last reported it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest: Option<GuestStream>,
    /// Packets a frozen source passed on to the destination (its move's hand-off), taken by
    /// the destination's agent (what its queue could not hold it counts as its VNF's drops).
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub packets_passed: u64,
    /// A wasm move's downtime, on the source's clock: from its freeze (the divert: what
    /// arrives from then on is queued, not processed; a batch under way finishes) to the
    /// destination's acknowledgement of the last map updates, in microseconds. Meanwhile no instance processes the VNF's packets: they
    /// queue at the source and pass on to the destination after it. Set with `handed-off`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frozen_us: Option<u64>,
    /// Where that freeze went, by the source's agent (set with `frozen_us`, which it adds up
    /// to).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freeze_phases: Option<FreezePhases>,
    /// The move this stream serves (its peer's `move_id`): the controller takes a report for
    /// the move it names only. 0 for a pair's standby, or from an agent that does not say.
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub move_id: u64,
}

impl ReplicationStatus {
    /// Whether this report is of a stream of move `m`: to its destination, and of this move
    /// rather than an earlier one to the same host (one cancelled, whose report came late).
    /// A report or record without an id (0, from before moves had one) is taken by its host.
    pub fn serves(&self, m: &Migration) -> bool {
        self.standby_host == m.to && (self.move_id == m.id || self.move_id == 0 || m.id == 0)
    }

    /// Whether this report of a guest's stream left its agent before the failure `recorded`
    /// for the same stream (same destination, move and `opened_ms`): a stream that failed
    /// stays failed, its source opens the next one later. Reports without an `opened_ms`
    /// (from before streams had one) are never outdated.
    pub fn outdated_by(&self, recorded: &ReplicationStatus) -> bool {
        let opened = |r: &ReplicationStatus| r.guest.as_ref().map(|g| g.opened_ms);
        recorded.state == "failing"
            && self.state != "failing"
            && self.standby_host == recorded.standby_host
            && self.move_id == recorded.move_id
            && opened(self).is_some_and(|o| o != 0)
            && opened(self) == opened(recorded)
    }
}

fn is_zero_u64(n: &u64) -> bool {
    *n == 0
}

/// Where a vm guest's migration stream is, as the source's QEMU reports it (`query-migrate`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct GuestStream {
    /// QEMU's status: `setup`, `active`, `pre-switchover` (at the move's commit point, the guest
    /// stopped), `device`, `completed`, `failed`, `cancelled`.
    pub status: String,
    /// Since the stream started, ms.
    pub total_ms: u64,
    /// RAM bytes sent so far.
    pub transferred_bytes: u64,
    /// RAM bytes still to send (dirty or never sent).
    pub remaining_bytes: u64,
    /// Guest RAM.
    pub total_bytes: u64,
    /// Pages the guest dirties per second, as QEMU last measured.
    pub dirty_pages_per_s: u64,
    /// How long the guest was stopped for the final copy, ms (once completed): the source
    /// QEMU's measure, until its last byte left (the destination resumes the guest later).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<u64>,
    /// When the source's QEMU began stopping the guest for the final copy, µs since the Unix
    /// epoch by the source host's clock (once completed): the start of the guest's whole
    /// pause, the earlier of its `STOP` event and its last byte less its own downtime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped_at_us: Option<u64>,
    /// When the source's QEMU reached the move's commit point with the guest stopped
    /// (`pre-switchover`), µs since the Unix epoch by the source host's clock (once completed;
    /// none for a stream without a commit point).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_point_at_us: Option<u64>,
    /// When its agent let the final copy through the commit point (QEMU's `device`), µs, the
    /// source host's clock (once completed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub continued_at_us: Option<u64>,
    /// When the source's last byte left (QEMU's `completed`), µs, the source host's clock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at_us: Option<u64>,
    /// When the source's agent opened this stream, ms since the Unix epoch: each stream of a
    /// move opens later than the one before (a failed stream is opened again), also across a
    /// restart of the agent, so the controller orders the streams by it.
    #[serde(default)]
    pub opened_ms: u64,
    /// The source asks to pass the move's commit point ahead of its final copy: the stream is
    /// near its end (QEMU still streams, the guest still runs there). Recorded as a report at
    /// the commit point (`pre-switchover`) is, so the final copy need not wait for it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub commit_ahead: bool,
    /// The pause limit the stream was set, ms: QEMU stops the guest for the final copy once it
    /// expects to send the rest within it.
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub downtime_limit_ms: u64,
}

/// ms from `earlier_us` until `later_us` (µs since the Unix epoch, perhaps by two hosts'
/// clocks, e.g. a moved guest's whole pause: from its source QEMU's stop until its
/// destination QEMU's resume); `None` when either is unknown, or the clocks disagree so far
/// that it would be negative.
pub fn ms_between(earlier_us: Option<u64>, later_us: Option<u64>) -> Option<f64> {
    let (from, to) = (earlier_us?, later_us?);
    (to >= from).then(|| (to - from) as f64 / 1000.0)
}

/// The words after the figure of a vm move's switch event that says how long after its
/// destination resumed the guest the move switched to it (`; switched 2.1 ms after its
/// destination resumed it (the controller's clock)`).
pub const SWITCHED_AFTER_RESUME: &str = "after its destination resumed it";

/// Where a moved guest's whole pause went, ms, by its QEMUs' event times (the source's for
/// the first three, the destination's resume for the last: two hosts' clocks).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PausePhases {
    /// From the source's stop until it reached the move's commit point (QEMU stopping the
    /// guest's vCPUs); none for a stream without a commit point.
    pub stopping_ms: Option<f64>,
    /// Held at the commit point until its agent let the final copy through.
    pub commit_point_ms: Option<f64>,
    /// The final copy: the device state and the last dirty pages, until the source's last
    /// byte left (from the stop, for a stream without a commit point).
    pub final_copy_ms: f64,
    /// From the source's last byte until the destination resumed the guest: the destination
    /// reading what was still in flight and loading the device state. Two hosts' clocks: none
    /// when the resume is unknown or would come before the last byte left.
    pub destination_ms: Option<f64>,
}

impl PausePhases {
    /// The phases of `g`'s pause, its destination having resumed the guest at
    /// `resumed_at_us`; `None` when the source's stop or last byte is unknown or out of order
    /// (a commit point of an earlier stream is left out, not taken).
    pub fn of(g: &GuestStream, resumed_at_us: Option<u64>) -> Option<Self> {
        let (stop, done) = (g.stopped_at_us?, g.completed_at_us?);
        if stop > done {
            return None;
        }
        let ms = |from: u64, to: u64| (to - from) as f64 / 1000.0;
        let gate = match (g.commit_point_at_us, g.continued_at_us) {
            (Some(at), Some(on)) if stop <= at && at <= on && on <= done => Some((at, on)),
            _ => None,
        };
        Some(Self {
            stopping_ms: gate.map(|(at, _)| ms(stop, at)),
            commit_point_ms: gate.map(|(at, on)| ms(at, on)),
            final_copy_ms: ms(gate.map_or(stop, |(_, on)| on), done),
            destination_ms: ms_between(Some(done), resumed_at_us),
        })
    }

    /// The phases a text states in [`PausePhases`]'s own words (a switch event's reason):
    /// `None` unless it states the final copy; the others as stated.
    pub fn stated_in(text: &str) -> Option<Self> {
        let figure = |label: &str| figure_before(text, &format!(" ms {label}"));
        Some(Self {
            stopping_ms: figure(PHASE_STOPPING),
            commit_point_ms: figure(PHASE_COMMIT_POINT),
            final_copy_ms: figure(PHASE_FINAL_COPY)?,
            destination_ms: figure(PHASE_DESTINATION),
        })
    }
}

/// Where a wasm move's freeze went at its source, µs, by its agent's clock: until its stream
/// began the last batch (the divert, the instance's poll the freeze waits for, the stream's
/// task waking; a batch under way finishes first), taking that batch off the instance, and
/// from sending it until the destination acknowledged it (the crossing, the destination's
/// check and apply, the answer).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FreezePhases {
    pub until_batch_us: u64,
    pub take_us: u64,
    pub exchange_us: u64,
}

/// The words [`FreezePhases`] states each phase in, after its figure and " µs ".
const FREEZE_UNTIL_BATCH: &str = "until its last batch began";
const FREEZE_TAKE: &str = "taking it";
const FREEZE_EXCHANGE: &str = "until the destination acknowledged it";

impl FreezePhases {
    /// The whole freeze they make up, µs.
    pub fn total_us(&self) -> u64 {
        self.until_batch_us
            .saturating_add(self.take_us)
            .saturating_add(self.exchange_us)
    }

    /// The phases a text states in [`FreezePhases`]'s own words (a switch event's reason);
    /// `None` unless it states all three.
    pub fn stated_in(text: &str) -> Option<Self> {
        let figure = |label: &str| figure_before(text, &format!(" µs {label}")).map(|f| f as u64);
        Some(Self {
            until_batch_us: figure(FREEZE_UNTIL_BATCH)?,
            take_us: figure(FREEZE_TAKE)?,
            exchange_us: figure(FREEZE_EXCHANGE)?,
        })
    }
}

impl std::fmt::Display for FreezePhases {
    /// `412 µs until its last batch began, 9 µs taking it, 230 µs until the destination
    /// acknowledged it`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} µs {FREEZE_UNTIL_BATCH}, {} µs {FREEZE_TAKE}, {} µs {FREEZE_EXCHANGE}",
            self.until_batch_us, self.take_us, self.exchange_us
        )
    }
}

/// The number `text` states right before the first `suffix` (`7.1` in `… resumed (7.1 ms
/// until …`), as the controller's events word their figures; `None` without one there.
pub fn figure_before(text: &str, suffix: &str) -> Option<f64> {
    let (head, _) = text.split_once(suffix)?;
    head.rsplit([' ', '(']).next()?.parse().ok()
}

/// The words [`PausePhases`] states each phase in, after its figure and " ms ".
const PHASE_STOPPING: &str = "stopping";
const PHASE_COMMIT_POINT: &str = "at the commit point";
const PHASE_FINAL_COPY: &str = "final copy";
const PHASE_DESTINATION: &str = "at the destination";

impl std::fmt::Display for PausePhases {
    /// `1.1 ms stopping, 0.7 ms at the commit point, 1.9 ms final copy, 3.3 ms at the
    /// destination` (the first two only when the stream had a commit point).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let (Some(stopping), Some(held)) = (self.stopping_ms, self.commit_point_ms) {
            write!(
                f,
                "{stopping:.1} ms {PHASE_STOPPING}, {held:.1} ms {PHASE_COMMIT_POINT}, "
            )?;
        }
        write!(f, "{:.1} ms {PHASE_FINAL_COPY}", self.final_copy_ms)?;
        if let Some(destination) = self.destination_ms {
            write!(f, ", {destination:.1} ms {PHASE_DESTINATION}")?;
        }
        Ok(())
    }
}

/// What a rotation of the cluster's replication secret did (`POST
/// /v1/secrets/replication/rotate`): the VNFs whose streams (a standby's) take a new key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SecretRotation {
    pub streams: Vec<String>,
}

/// A move of a VNF to another host (`POST /v1/vnfs/{name}/migrate`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Migration {
    /// The move's id: the VNF's count of moves (`Vnf::moves`) once it began. The source's assignment names it
    /// (`StandbyPeer::move_id`) and its stream's reports carry it, so a report of an earlier
    /// move's stream to the same host is not taken for this one's. 0 in a record from before
    /// moves had one.
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub id: u64,
    /// The destination host: the VNF's standby placement until the move ends.
    pub to: String,
    pub from: String,
    pub started_at: String,
    /// Who asked.
    pub by: String,
    /// The engine the destination runs the module on, when the move changes it (the maps'
    /// snapshot does not depend on it: a stand-in for a move to another CPU architecture).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<crate::vnf::WasmEngine>,
    /// When the source of a wasm VNF's move was asked to freeze and hand its last updates
    /// over (its stream synced, the destination running); the switch follows its report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handoff_at: Option<String>,
    /// When the source of a vm VNF's move reported its guest's stream waiting at its commit
    /// point (the guest stopped for the final copy): from then on the move is not cancelled,
    /// and the source lets the final copy through only once it has read that the move stands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub committed_at: Option<String>,
    /// The latest stream (its `replication.guest.opened_ms`) whose commit point was recorded:
    /// a failure reported for an earlier stream (a report that left before) does not undo it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub committed_stream: Option<u64>,
    /// When the destination of a vm VNF's move resumed the guest, µs since the Unix epoch by
    /// its host's clock (its agent's report): with the stream's `stopped_at_us`, the guest's
    /// whole pause, as the move's switch event states it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed_at_us: Option<u64>,
}

/// What `PUT /v1/vnfs/{name}` did, or with `dryRun` would do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VnfApplied {
    /// The VNF as it is now (with `dryRun`: as it would be, its placement included).
    pub vnf: crate::lifecycle::Vnf,
    /// The fields that changed, with their old and new values; empty when the descriptor was
    /// the one the VNF has (nothing was written).
    pub changes: Vec<crate::change::FieldChange>,
    /// Nothing was written.
    pub dry_run: bool,
}

/// `POST /v1/vnfs/{name}/migrate`: where to (when left out, a host with room that can take
/// the VNF: a running agent with a tunnel address and, for a vm, the guest's accelerator, a
/// QEMU no older and the guest's machine type), or `cancel`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// The engine to run the module on at the destination (`cranelift` or `pulley`); the
    /// VNF's descriptor says so once it moved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<crate::vnf::WasmEngine>,
    /// Ends the move under way; the VNF stays where it runs.
    #[serde(default)]
    pub cancel: bool,
}

/// What the agent of a standby instance's host last observed of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct InstanceStatus {
    pub host: String,
    pub phase: Phase,
    pub reason: String,
    /// The standby no longer hears its active (as its host last reported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_lost: Option<ActiveLost>,
    /// A move's destination whose arrival failed ([`Observation::arrival_failed`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub arrival_failed: bool,
}

/// What one message of a VNF watch (`GET /v1/watch/vnfs`) says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum VnfWatchKind {
    /// A VNF the watcher had not been shown (from the first list, or created since).
    Added,
    /// A VNF already shown changed (`vnf` is its new state).
    Modified,
    /// A VNF shown before is gone, or no longer matches the selector (`name` only).
    Deleted,
    /// Every VNF that matched when the watch began has been sent: what follows are changes.
    Synced,
}

/// One message of a VNF watch: the `data:` of one server-sent event, whose `event:` is `type`
/// in lower case.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VnfWatchEvent {
    #[serde(rename = "type")]
    pub kind: VnfWatchKind,
    /// The VNF's name (every type but `SYNCED`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<Name>,
    /// The VNF as it is now (`ADDED` and `MODIFIED`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vnf: Option<crate::lifecycle::Vnf>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a_move(id: u64) -> Migration {
        Migration {
            id,
            to: "h3".into(),
            from: "h2".into(),
            started_at: String::new(),
            by: "admin".into(),
            engine: None,
            handoff_at: None,
            committed_at: None,
            committed_stream: None,
            resumed_at_us: None,
        }
    }

    fn stream(state: &str, move_id: u64, opened_ms: u64) -> ReplicationStatus {
        ReplicationStatus {
            standby_host: "h3".into(),
            state: state.into(),
            move_id,
            guest: Some(GuestStream {
                status: "active".into(),
                opened_ms,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_pause_splits_at_its_qemus_event_times_and_times_out_of_order_are_left_out() {
        let t0 = 1_800_000_000_000_000;
        let g = GuestStream {
            stopped_at_us: Some(t0),
            commit_point_at_us: Some(t0 + 1_100),
            continued_at_us: Some(t0 + 1_800),
            completed_at_us: Some(t0 + 3_700),
            ..Default::default()
        };
        let p = PausePhases::of(&g, Some(t0 + 7_000)).unwrap();
        assert_eq!(p.stopping_ms, Some(1.1));
        assert_eq!(p.commit_point_ms, Some(0.7));
        assert_eq!(p.final_copy_ms, 1.9);
        assert_eq!(p.destination_ms, Some(3.3));
        let said = p.to_string();
        assert_eq!(
            said,
            "1.1 ms stopping, 0.7 ms at the commit point, 1.9 ms final copy, 3.3 ms at the destination"
        );
        // Read back from a text that states them, as a switch event does.
        assert_eq!(
            PausePhases::stated_in(&format!("moved (7.0 ms in all (clocks: {said}))")),
            Some(p)
        );
        assert_eq!(PausePhases::stated_in("moved (nothing streamed)"), None);
        // Not resumed yet, or resumed before its last byte left (the two hosts' clocks
        // apart): the source's phases still, the destination's not.
        for resumed in [None, Some(t0 + 3_000)] {
            let p = PausePhases::of(&g, resumed).unwrap();
            assert_eq!((p.final_copy_ms, p.destination_ms), (1.9, None));
            assert_eq!(
                p.to_string(),
                "1.1 ms stopping, 0.7 ms at the commit point, 1.9 ms final copy"
            );
        }
        // A last byte before the stop is no stream's.
        let odd = GuestStream {
            completed_at_us: Some(t0 - 1),
            ..g.clone()
        };
        assert_eq!(PausePhases::of(&odd, Some(t0 + 7_000)), None);
        // A commit point before the stop is an earlier stream's: the final copy counts from
        // the stop.
        let earlier = GuestStream {
            commit_point_at_us: Some(t0 - 5_000_000),
            ..g.clone()
        };
        let p = PausePhases::of(&earlier, Some(t0 + 7_000)).unwrap();
        assert_eq!((p.stopping_ms, p.commit_point_ms), (None, None));
        assert_eq!(p.final_copy_ms, 3.7);
        assert_eq!(
            p.to_string(),
            "3.7 ms final copy, 3.3 ms at the destination"
        );
        let read = PausePhases::stated_in(&p.to_string()).unwrap();
        assert_eq!((read.stopping_ms, read.final_copy_ms), (None, 3.7));
    }

    #[test]
    fn a_report_serves_its_own_move_to_its_host_and_one_without_an_id_serves_any() {
        let r = stream("streaming", 2, 1_000);
        assert!(r.serves(&a_move(2)));
        assert!(!r.serves(&a_move(1)), "an earlier move to the same host");
        assert!(!r.serves(&Migration {
            to: "h4".into(),
            ..a_move(2)
        }));
        // From before moves had ids: a report or a record without one.
        assert!(stream("streaming", 0, 1_000).serves(&a_move(2)));
        assert!(r.serves(&a_move(0)));
    }

    #[test]
    fn a_report_that_left_before_its_streams_failure_is_outdated_and_a_later_stream_is_not() {
        let failed = stream("failing", 2, 1_000);
        assert!(stream("streaming", 2, 1_000).outdated_by(&failed));
        // Another stream (opened later), another move, another host, or no stream time.
        assert!(!stream("streaming", 2, 2_000).outdated_by(&failed));
        assert!(!stream("streaming", 3, 1_000).outdated_by(&failed));
        assert!(!stream("streaming", 2, 0).outdated_by(&stream("failing", 2, 0)));
        let elsewhere = ReplicationStatus {
            standby_host: "h4".into(),
            ..stream("streaming", 2, 1_000)
        };
        assert!(!elsewhere.outdated_by(&failed));
        // A failure again, or a report after one that did not fail, is taken.
        assert!(!stream("failing", 2, 1_000).outdated_by(&failed));
        assert!(!stream("streaming", 2, 1_000).outdated_by(&stream("streaming", 2, 1_000)));
    }

    fn entry(key: &str, value: &str) -> MapEntry {
        MapEntry {
            key: key.into(),
            value: value.into(),
        }
    }

    #[test]
    fn a_map_change_decodes_hex_and_names_the_field_it_refuses() {
        let ok = MapChangeRequest {
            delete: vec!["0A000002".into()],
            put: vec![entry("0a000001", "01ff")],
        };
        assert_eq!(
            ok.decode().unwrap(),
            (
                vec![vec![10, 0, 0, 2]],
                vec![(vec![10, 0, 0, 1], vec![1, 255])]
            )
        );
        let refused = |r: MapChangeRequest| r.decode().unwrap_err().to_string();
        assert!(refused(MapChangeRequest::default()).contains("names no key"));
        let e = refused(MapChangeRequest {
            delete: vec![],
            put: vec![entry("0a", "0g")],
        });
        assert!(
            e.starts_with("put[0].value: `g` at character 1 is not a hex digit"),
            "{e}"
        );
        let e = refused(MapChangeRequest {
            delete: vec!["abc".into()],
            put: vec![],
        });
        assert!(
            e.starts_with("delete[0]: 3 hex digits; expected an even number"),
            "{e}"
        );
        let e = refused(MapChangeRequest {
            delete: vec![],
            put: vec![entry(&"00".repeat(1025), "00")],
        });
        assert!(e.starts_with("put[0].key: 2050 hex digits"), "{e}");
        let e = refused(MapChangeRequest {
            delete: vec!["00".into(); crate::vnf::limits::MAX_MAP_CHANGE_ENTRIES + 1],
            put: vec![],
        });
        assert!(
            e.starts_with("delete: 65537 keys and entries; one change takes at most 65536"),
            "{e}"
        );
        let e = refused(MapChangeRequest {
            delete: vec!["0a00é1".into()],
            put: vec![],
        });
        assert!(
            e.starts_with("delete[0]: `é` at character 4 is not a hex digit"),
            "{e}"
        );
    }
}
