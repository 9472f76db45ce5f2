//! The in-process agent ↔ controller link of an all-in-one node.
//!
//! Owns handing assignments to the local agent, and its observations and heartbeats back. It
//! must stay a thin adapter over the controller's agent API (`assignments`, `observe`,
//! `heartbeat`), the same calls a remote agent's link makes over the network.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use telvirt_agent::{AgentError, ControlLink};
use telvirt_model::api::{Assignment, Observation};

use crate::service::Controller;

pub struct LocalLink {
    controller: Arc<Controller>,
    /// The assignment-change counter as this link last saw it.
    changes: tokio::sync::Mutex<tokio::sync::watch::Receiver<u64>>,
}

impl LocalLink {
    pub fn new(controller: Arc<Controller>) -> Self {
        let changes = tokio::sync::Mutex::new(controller.assignments_watch());
        Self {
            controller,
            changes,
        }
    }
}

#[async_trait]
impl ControlLink for LocalLink {
    async fn assignments(&self, host: &str) -> Result<Vec<Assignment>, AgentError> {
        self.controller
            .assignments(host)
            .await
            .map_err(|e| AgentError::Link(e.to_string()))
    }

    async fn report(&self, host: &str, observation: Observation) -> Result<(), AgentError> {
        self.controller
            .observe(host, observation)
            .await
            .map_err(|e| AgentError::Link(e.to_string()))
    }

    /// Changes counted since the previous wait returned end this one at once.
    async fn wait_for_change(&self, max_wait: Duration) {
        let mut changes = self.changes.lock().await;
        // An error means the controller is gone: nothing will change any more.
        let _ = tokio::time::timeout(max_wait, changes.changed()).await;
    }

    async fn heartbeat(&self, host: &str) -> Result<(), AgentError> {
        self.controller
            .heartbeat(host)
            .await
            .map_err(|e| AgentError::Link(e.to_string()))
    }
}
