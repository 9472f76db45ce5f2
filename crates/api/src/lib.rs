//! The agent protocol: everything a host agent and the controller say to each other.
//!
//! Owns the messages (registration, assignments, observations, node calls and their replies),
//! the HTTP paths they travel on, and the [`ControlLink`] trait an agent talks through, so the
//! controller, the agent and the CLI share one definition and the controller needs nothing of the
//! agent's crate. It must not hold behaviour: no I/O, no decisions; transports implement
//! [`ControlLink`] elsewhere (in-process in the controller crate, HTTP in the binary).

use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use telvirt_model::api::{
    HugePageView, MapChangeRequest, MapChangeResult, MapView, NicStatsView, VnfLogs, WasmStatsView,
};
use telvirt_model::network::{LatencyProbe, LatencyReport, NetworkDescriptor, NetworkStatus};
use telvirt_sched::HostSpec;
use utoipa::ToSchema;

pub use telvirt_model::api::{Assignment, Observation};

/// Prefix of node credentials; an authority token has `tvt_` (the controller's `TOKEN_PREFIX`).
pub const NODE_TOKEN_PREFIX: &str = "tvn_";

/// The longest a watch or call poll may wait before it answers empty (a client asking more is
/// answered after this).
pub const MAX_WAIT: Duration = Duration::from_secs(30);

/// Console lines a node call may ask for at most.
pub const MAX_CONSOLE_LINES: u32 = 10_000;

/// How long the controller waits for an agent to answer a node call before it gives up (503).
pub const NODE_CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// How long the controller waits for a latency probe's answer: the longest probe
/// ([`telvirt_model::network::MAX_PROBE_SECONDS`]) plus its settling time and a margin.
pub const PROBE_CALL_TIMEOUT: Duration =
    Duration::from_secs(telvirt_model::network::MAX_PROBE_SECONDS + 30);

/// Longest one slice of a capture waits for frames on the agent before it answers.
pub const CAPTURE_SLICE: Duration = Duration::from_secs(1);
/// How long an agent keeps a capture armed after answering a slice, waiting for the next; a
/// capture whose caller went away ends then.
pub const CAPTURE_KEEP: Duration = Duration::from_secs(3);

/// One slice of a capture of a network's link ([`NodeRequest::Capture`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CaptureSlice {
    /// Index of the link in the descriptor's `spec.links`.
    pub link: usize,
    /// Frames the whole capture takes (read by the first slice).
    pub packets: u64,
    /// Bytes kept of each frame (read by the first slice).
    pub snaplen: u32,
    /// Longest this slice waits for frames, in milliseconds.
    pub wait_ms: u64,
    /// The first slice: arms the tap and starts the pcapng stream with its header.
    pub first: bool,
    /// The last slice: the capture ends after it whether or not every frame came.
    pub last: bool,
}

/// What one capture slice took: a piece of a pcapng stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CaptureChunk {
    /// The pcapng bytes (base64): the header on the first slice, then the frames, and the
    /// statistics block (frames missed) on the slice that ends the capture.
    pub pcapng: String,
    /// Frames in this chunk.
    pub frames: u64,
    /// The capture ended with this chunk.
    pub done: bool,
}

/// The HTTP paths of the protocol; each takes a node credential as its bearer token, bound to
/// the host named in the path.
pub mod paths {
    /// `POST` a [`super::HostRecord`]: the agent's inventory and runtimes.
    pub fn register(host: &str) -> String {
        format!("/v1/agent/hosts/{host}/register")
    }
    /// `POST` (no body): renews the host's liveness lease.
    pub fn heartbeat(host: &str) -> String {
        format!("/v1/agent/hosts/{host}/heartbeat")
    }
    /// `GET`: the host's [`super::Assignment`]s.
    pub fn assignments(host: &str) -> String {
        format!("/v1/agent/hosts/{host}/assignments")
    }
    /// `GET ?after=R&wait_ms=W`: a [`super::Changes`] once the assignment revision passes `R`
    /// (or after `W` ms).
    pub fn changes(host: &str) -> String {
        format!("/v1/agent/hosts/{host}/changes")
    }
    /// `POST` an [`super::Observation`].
    pub fn observations(host: &str) -> String {
        format!("/v1/agent/hosts/{host}/observations")
    }
    /// `GET ?wait_ms=W`: the [`super::NodeCall`]s waiting for this host (empty after `W` ms).
    pub fn calls(host: &str) -> String {
        format!("/v1/agent/hosts/{host}/calls")
    }
    /// `POST` a [`super::NodeReply`] to call `id`.
    pub fn reply(host: &str, id: u64) -> String {
        format!("/v1/agent/hosts/{host}/calls/{id}")
    }
    /// `GET`: the bytes of uploaded module `sha256` (hex), for a host that runs or upgrades to it.
    pub fn module(host: &str, sha256: &str) -> String {
        format!("/v1/agent/hosts/{host}/modules/{sha256}")
    }
    /// `GET`: the [`super::NetworkSet`] this host's data plane should hold.
    pub fn networks(host: &str) -> String {
        format!("/v1/agent/hosts/{host}/networks")
    }
    /// `GET ?after=R&wait_ms=W`: a [`super::Changes`] once the host's network revision differs
    /// from `R` (or after `W` ms).
    pub fn network_changes(host: &str) -> String {
        format!("/v1/agent/hosts/{host}/networks/changes")
    }
}

/// A host as its agent registers it and the controller stores it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HostRecord {
    pub spec: HostSpec,
    pub memory_bytes: u64,
    #[serde(default)]
    pub hugepages: Vec<HugePageView>,
    /// Runtimes its agent runs; empty for a host without an agent.
    #[serde(default)]
    pub runtimes: Vec<String>,
    /// Whether an agent serves this host.
    pub agent: bool,
    /// The QEMU version (`major.minor`) of its vm runtime; none without one. A vm VNF moves
    /// to a host whose QEMU is as new and has its machine type (`qemu_machines`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qemu: Option<String>,
    /// The i440FX machine types its QEMU has (`pc-i440fx-X.Y`, newest first): a vm VNF moves
    /// to a host whose QEMU has its machine type and is no older than its source's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub qemu_machines: Vec<String>,
    /// The accelerator its vm runtime runs guests with, when known at its agent's start (its
    /// `--accel`, or a probe boot's cached answer): a KVM guest does not move to a TCG host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accel: Option<telvirt_model::vnf::Accelerator>,
    /// Its CPU as a KVM guest on the host's CPU sees it (vendor, family/model/stepping and
    /// model name): such a guest moves only to a host with the same one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<String>,
    /// Where this host's data plane receives the VXLAN tunnels of links from other hosts
    /// (`IP:PORT`); none: links between this host and another wait.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel: Option<String>,
}

/// Networks whose final counts a heartbeat names at most ([`HeartbeatRequest::departed`]).
pub const MAX_DEPARTED_NAMED: usize = 256;

/// What a heartbeat says beside "alive" (its body; an empty body says nothing more). Fields a
/// controller does not know are passed over: a heartbeat is never refused for its body.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HeartbeatRequest {
    /// The networks whose final counts the host keeps (networks that left it): `net show`
    /// asks a host that no longer holds a network only when it names it here (none: the host
    /// does not say, and is asked for every network). At most [`MAX_DEPARTED_NAMED`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub departed: Option<Vec<String>>,
}

/// The controller's answer to a heartbeat: how long the host's lease lasts from now. An agent
/// that heard nothing for this long counts its host as NotReady in the controller's eyes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HeartbeatReply {
    pub lease_ttl_ms: u64,
    /// Why the controller passed over what the heartbeat's body said (the lease is renewed
    /// all the same).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_refused: Option<String>,
}

/// The answer of a changes poll: the assignment revision now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Changes {
    pub revision: u64,
}

/// The networks a host's data plane should hold: every stored network naming a VNF placed on
/// that host. Links whose ends are on other hosts wait there (links between hosts are not
/// carried yet).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct NetworkSet {
    /// Grows whenever the stored networks or this host's assignments change.
    pub revision: u64,
    pub networks: Vec<NetworkDescriptor>,
    /// For each of those networks held by several hosts: which host each of its nodes is on
    /// and how to reach the others.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub spans: Vec<NetworkSpan>,
}

/// A network whose nodes are on several hosts: each host wires the links with both ends on it,
/// and carries a link between two hosts over a VXLAN tunnel to the other host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NetworkSpan {
    pub network: String,
    /// The network's first VXLAN network identifier (0: none was given, its links between
    /// hosts wait); descriptor link `i` travels with `vni + i`.
    pub vni: u32,
    /// How many identifiers from `vni` the network holds: a link at or beyond it waits.
    #[serde(default)]
    pub vnis: u32,
    /// The host of each node the network names, by node name: a VNF's is its active
    /// instance's; a built-in node's, a steering endpoint's and a host interface's (`host:IF`)
    /// is that of the first VNF linked to it.
    pub hosts: std::collections::BTreeMap<String, String>,
    /// The tunnel address (`IP:PORT`) of each host holding the network that has one.
    pub tunnels: std::collections::BTreeMap<String, String>,
}

/// A call the controller routes to the agent of the host a VNF runs on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct NodeCall {
    /// Unique per controller process; the reply names it.
    pub id: u64,
    pub request: NodeRequest,
}

/// What a node call asks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "call", rename_all = "snake_case", deny_unknown_fields)]
pub enum NodeRequest {
    /// The maps of a running wasm VNF.
    Maps { vnf: String },
    /// A control-plane change of map `map` of a running wasm VNF (its keys and values hex,
    /// as the API took them; bounded there).
    MapChange {
        vnf: String,
        map: String,
        change: MapChangeRequest,
    },
    /// The counters of a running wasm VNF.
    Stats { vnf: String },
    /// The NIC counters of a running vm VNF.
    NicStats { vnf: String },
    /// The log lines of a running wasm VNF with a `seq` above `after`.
    Logs { vnf: String, after: u64 },
    /// Swap a running wasm VNF's module for `module` (`sha256:<hex>` or a path on the node);
    /// refused unless the instance runs the module whose SHA-256 (hex) is `from`, when given
    /// (another upgrade, or a new VNF of the name, came first).
    Upgrade {
        vnf: String,
        module: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        from: Option<String>,
    },
    /// The last `lines` lines of a vm VNF's serial console.
    Console { vnf: String, lines: u32 },
    /// The live state (links, counters, steering) of `network` on this host's data plane.
    NetworkStatus { network: NetworkDescriptor },
    /// A latency probe through `network` as this host's data plane holds it now.
    Probe {
        network: NetworkDescriptor,
        probe: LatencyProbe,
    },
    /// A slice of a capture of one of `network`'s links on this host's data plane.
    Capture {
        network: NetworkDescriptor,
        slice: CaptureSlice,
    },
    /// What every VNF on this host counts and uses now (a metrics scrape).
    Usage,
}

/// What one VNF on a host counts and uses, for a metrics scrape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VnfUsage {
    pub vnf: String,
    /// A wasm VNF's counters (not for a vm VNF).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wasm: Option<WasmStatsView>,
    /// A vm VNF's QEMU process (not for a wasm VNF).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<VmUsage>,
    /// A vm VNF's vhost-user NICs (none for a wasm VNF).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nics: Vec<NicStatsView>,
}

/// A vm VNF's QEMU process as the host sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VmUsage {
    /// Resident memory, bytes.
    pub rss_bytes: u64,
    /// CPU time of all its threads, nanoseconds.
    pub cpu_ns: u64,
    pub vcpus: Vec<VcpuUsage>,
}

/// One vCPU thread of a vm VNF.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VcpuUsage {
    pub index: u32,
    /// Time it ran, nanoseconds.
    pub run_ns: u64,
    /// Time it was runnable but waited for a host CPU (the guest's steal), nanoseconds.
    pub wait_ns: u64,
}

impl NetworkSpan {
    /// The VXLAN network identifier descriptor link `link` travels with between hosts, if the
    /// network holds one for it. Each link has its own, so two links in the same direction
    /// between the same two hosts stay apart.
    pub fn link_vni(&self, link: usize) -> Option<u32> {
        let link = u32::try_from(link).ok()?;
        if self.vni == 0 || link >= self.vnis.max(1) {
            return None;
        }
        self.vni.checked_add(link)
    }
}

impl NodeRequest {
    /// The VNF the call is about; `None` for a call about a network.
    pub fn vnf(&self) -> Option<&str> {
        match self {
            Self::Maps { vnf }
            | Self::MapChange { vnf, .. }
            | Self::Stats { vnf }
            | Self::NicStats { vnf }
            | Self::Logs { vnf, .. }
            | Self::Upgrade { vnf, .. }
            | Self::Console { vnf, .. } => Some(vnf),
            Self::NetworkStatus { .. }
            | Self::Probe { .. }
            | Self::Capture { .. }
            | Self::Usage => None,
        }
    }
}

/// An agent's answer to a [`NodeCall`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "outcome", rename_all = "snake_case", deny_unknown_fields)]
pub enum NodeReply {
    Maps {
        maps: Vec<MapView>,
    },
    MapChanged {
        result: MapChangeResult,
    },
    Stats {
        stats: WasmStatsView,
    },
    NicStats {
        nics: Vec<NicStatsView>,
        /// The guest's own counters, when its agent answered.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        guest: Option<telvirt_model::api::GuestNetView>,
    },
    Logs {
        logs: VnfLogs,
    },
    /// The module now running: its hash.
    Upgraded {
        hash: String,
    },
    /// Console lines, oldest first.
    Console {
        lines: Vec<String>,
    },
    /// The network's state here; `None` while this host's data plane has not applied it.
    NetworkStatus {
        status: Option<NetworkStatus>,
    },
    Latency {
        report: LatencyReport,
    },
    Capture {
        chunk: CaptureChunk,
    },
    /// Every VNF on the host with what it counts and uses.
    Usage {
        vnfs: Vec<VnfUsage>,
    },
    /// The node refused or failed; the reason is for the caller.
    Failed {
        reason: String,
    },
    /// The node refused the call's input: which field of it, and why (nothing changed).
    Invalid {
        field: String,
        reason: String,
    },
}

/// Why a link call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    /// The controller could not be reached or answered garbage.
    #[error("controller unreachable: {0}")]
    Transport(String),
    /// The controller refused the call (its status and problem detail).
    #[error("controller refused ({status}): {detail}")]
    Refused { status: u16, detail: String },
}

impl LinkError {
    /// Whether the same call may succeed later: the controller could not be reached, or said
    /// it cannot serve now (408, 429, 5xx: no leader during a failover, a store unavailable).
    /// A refusal of the call itself (any other 4xx) stands.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Transport(_) => true,
            Self::Refused { status, .. } => matches!(status, 408 | 429 | 500..=599),
        }
    }
}

/// The agent's side of the protocol: every call an agent makes to its controller.
#[async_trait]
pub trait ControlLink: Send + Sync + 'static {
    /// Tells the controller this host exists, with its inventory and runtimes. A link whose
    /// host was registered another way keeps this default.
    async fn register(&self, _record: &HostRecord) -> Result<(), LinkError> {
        Ok(())
    }

    /// The instances the controller wants on `host`.
    async fn assignments(&self, host: &str) -> Result<Vec<Assignment>, LinkError>;

    /// Tells the controller what the agent observed.
    async fn report(&self, host: &str, observation: Observation) -> Result<(), LinkError>;

    /// Tells the controller the agent of `host` is alive (its liveness lease), and what else
    /// `beat` says; returns how long the lease lasts from when the controller took this
    /// heartbeat (`None`: the controller did not say). A link that carries no liveness keeps
    /// this default.
    async fn heartbeat(
        &self,
        _host: &str,
        _beat: &HeartbeatRequest,
    ) -> Result<Option<Duration>, LinkError> {
        Ok(None)
    }

    /// Returns `true` when assignments may have changed since the previous call of this link's
    /// `wait_for_change` returned (at once when they did meanwhile: a change made while the
    /// agent was busy is not lost), or `false` after `max_wait` without a change. A link that
    /// cannot tell answers `true`.
    async fn wait_for_change(&self, max_wait: Duration) -> bool;

    /// The node calls waiting for `host`; empty after `max_wait` when none came. A link that
    /// carries no node calls keeps this default: no call ever comes, so it never returns.
    async fn next_calls(
        &self,
        _host: &str,
        _max_wait: Duration,
    ) -> Result<Vec<NodeCall>, LinkError> {
        std::future::pending().await
    }

    /// Answers node call `id`.
    async fn reply(&self, _host: &str, _id: u64, _reply: NodeReply) -> Result<(), LinkError> {
        Ok(())
    }

    /// The bytes of uploaded module `sha256` (hex). `None`: this link's host reads the
    /// controller's module directory itself (the all-in-one node).
    async fn module(&self, _host: &str, _sha256: &str) -> Result<Option<Vec<u8>>, LinkError> {
        Ok(None)
    }

    /// The networks `host`'s data plane should hold. A link whose host runs no data plane
    /// keeps this default: none, ever.
    async fn networks(&self, _host: &str) -> Result<NetworkSet, LinkError> {
        Ok(NetworkSet::default())
    }

    /// The host's network revision once it differs from `after`, or as it is after
    /// `max_wait`. A link without networks keeps this default: nothing ever changes.
    async fn wait_for_networks(
        &self,
        _host: &str,
        _after: u64,
        _max_wait: Duration,
    ) -> Result<u64, LinkError> {
        std::future::pending().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_link_of_a_span_has_its_own_vni_within_the_network_block() {
        let span = |vni, vnis| NetworkSpan {
            vni,
            vnis,
            ..NetworkSpan::default()
        };
        assert_eq!(span(100, 3).link_vni(0), Some(100));
        assert_eq!(span(100, 3).link_vni(2), Some(102));
        assert_eq!(span(100, 3).link_vni(3), None);
        // A network stored when each had one identifier holds just that one.
        assert_eq!(span(7, 0).link_vni(0), Some(7));
        assert_eq!(span(7, 0).link_vni(1), None);
        assert_eq!(span(0, 4).link_vni(0), None);
    }

    #[test]
    fn node_calls_and_replies_have_a_tagged_wire_form_and_refuse_unknown_fields() {
        let call = NodeCall {
            id: 7,
            request: NodeRequest::Upgrade {
                vnf: "fw1".into(),
                module: "sha256:ab".into(),
                from: None,
            },
        };
        let text = serde_json::to_string(&call).unwrap();
        assert_eq!(
            text,
            r#"{"id":7,"request":{"call":"upgrade","vnf":"fw1","module":"sha256:ab"}}"#
        );
        assert_eq!(serde_json::from_str::<NodeCall>(&text).unwrap(), call);
        let from =
            r#"{"id":7,"request":{"call":"upgrade","vnf":"fw1","module":"sha256:ab","from":"cd"}}"#;
        assert!(matches!(
            serde_json::from_str::<NodeCall>(from).unwrap().request,
            NodeRequest::Upgrade { from: Some(f), .. } if f == "cd"
        ));
        let reply: NodeReply =
            serde_json::from_str(r#"{"outcome":"failed","reason":"no such vnf"}"#).unwrap();
        assert_eq!(
            reply,
            NodeReply::Failed {
                reason: "no such vnf".into()
            }
        );
        assert!(
            serde_json::from_str::<NodeReply>(r#"{"outcome":"upgraded","hash":"x","extra":1}"#)
                .is_err()
        );
        assert!(serde_json::from_str::<NodeReply>(r#"{"outcome":"rebooted"}"#).is_err());
    }

    #[test]
    fn every_path_names_its_host() {
        for path in [
            paths::register("h1"),
            paths::heartbeat("h1"),
            paths::assignments("h1"),
            paths::changes("h1"),
            paths::observations("h1"),
            paths::calls("h1"),
            paths::reply("h1", 3),
            paths::module("h1", "ab"),
            paths::networks("h1"),
            paths::network_changes("h1"),
        ] {
            assert!(path.starts_with("/v1/agent/hosts/h1/"), "{path}");
        }
    }
}
