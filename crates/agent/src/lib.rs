//! telvirt's host agent: runs VNFs through runtimes, reconciles them with what the controller
//! wants, and discovers the host it runs on.
//!
//! The agent must not touch the store: it talks to the controller through [`ControlLink`] only,
//! so a remote host is the same code as the local one.

pub mod capture;
pub mod dataplane;
pub mod discovery;
pub mod fencing;
pub mod network;
pub mod network_sync;
pub mod node;
pub mod queue;
pub mod reconcile;
pub mod replication;
pub mod runtime;
pub mod runtimes;

pub use discovery::{HostFacts, SysRoots, budget_memory, default_memory_reserve, discover};
pub use network_sync::network_loop;
pub use node::{ModuleCache, NodeHandler, node_call_loop};
pub use queue::{Backoff, WorkQueue};
pub use reconcile::{Agent, AgentConfig, DEFAULT_WORKERS, RELIST_INTERVAL, RESYNC_INTERVAL};
pub use replication::{ReplicaState, Replicas, StandbyHost, serve_standbys};
pub use runtime::{
    ArrivalFailure, GuestHardware, InstanceSpec, InstanceState, Runtime, RuntimeFailure,
    StateChangeHook, StateChangeSlot,
};
pub use telvirt_api::{ControlLink, LinkError};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AgentError {
    #[error("host discovery: {0}")]
    Discovery(String),
    #[error("controller link: {0}")]
    Link(String),
    /// A call the controller could not serve now ([`LinkError::is_transient`]): the same
    /// call may succeed later.
    #[error("controller link: {0}")]
    LinkUnavailable(String),
    #[error("data plane: {0}")]
    DataPlane(String),
}

impl From<LinkError> for AgentError {
    fn from(e: LinkError) -> Self {
        if e.is_transient() {
            Self::LinkUnavailable(e.to_string())
        } else {
            Self::Link(e.to_string())
        }
    }
}
