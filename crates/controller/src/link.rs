//! The in-process agent ↔ controller link of an all-in-one node.
//!
//! Owns handing assignments and node calls to the local agent, and its observations, heartbeats
//! and replies back. It must stay a thin adapter over the controller's agent API (`assignments`,
//! `observe`, `heartbeat`, `node_calls`, `host_networks`), the same calls a remote agent's link makes over HTTP
//! (`telvirt agent`, ADR 047).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use telvirt_api::{
    Assignment, ControlLink, LinkError, NetworkSet, NodeCall, NodeReply, Observation,
};

use crate::service::{Controller, ControllerError};

pub struct LocalLink {
    controller: Arc<Controller>,
    /// The assignment-change counter as this link last saw it.
    changes: tokio::sync::Mutex<tokio::sync::watch::Receiver<u64>>,
}

impl LocalLink {
    /// The link of `host`'s agent: its waits end on changes of that host's assignments.
    pub fn new(controller: Arc<Controller>, host: &str) -> Self {
        let changes = tokio::sync::Mutex::new(controller.assignments_watch(host));
        Self {
            controller,
            changes,
        }
    }
}

#[async_trait]
impl ControlLink for LocalLink {
    async fn assignments(&self, host: &str) -> Result<Vec<Assignment>, LinkError> {
        self.controller.assignments(host).await.map_err(refused)
    }

    async fn report(&self, host: &str, observation: Observation) -> Result<(), LinkError> {
        self.controller
            .observe(host, observation)
            .await
            .map_err(refused)
    }

    /// Changes counted since the previous wait returned end this one at once.
    async fn wait_for_change(&self, max_wait: Duration) -> bool {
        let mut changes = self.changes.lock().await;
        // An error means the controller is gone: nothing will change any more.
        matches!(
            tokio::time::timeout(max_wait, changes.changed()).await,
            Ok(Ok(()))
        )
    }

    async fn heartbeat(
        &self,
        host: &str,
        beat: &telvirt_api::HeartbeatRequest,
    ) -> Result<Option<Duration>, LinkError> {
        self.controller
            .take_heartbeat(host, beat, None)
            .await
            .map_err(refused)?;
        Ok(Some(self.controller.host_lease_ttl()))
    }

    async fn next_calls(&self, host: &str, max_wait: Duration) -> Result<Vec<NodeCall>, LinkError> {
        Ok(self.controller.node_calls().take(host, max_wait).await)
    }

    async fn reply(&self, host: &str, id: u64, reply: NodeReply) -> Result<(), LinkError> {
        self.controller
            .node_calls()
            .reply(host, id, reply)
            .map_err(refused)
    }

    async fn networks(&self, host: &str) -> Result<NetworkSet, LinkError> {
        self.controller.host_networks(host).await.map_err(refused)
    }

    async fn wait_for_networks(
        &self,
        host: &str,
        after: u64,
        max_wait: Duration,
    ) -> Result<u64, LinkError> {
        Ok(self.controller.wait_networks(host, after, max_wait).await)
    }
}

/// A controller error as the link's: what the HTTP transport would answer.
fn refused(e: ControllerError) -> LinkError {
    let (status, detail) = crate::http::status_and_detail(e);
    LinkError::Refused { status, detail }
}
