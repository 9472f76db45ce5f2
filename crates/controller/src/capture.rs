//! `POST /v1/networks/{name}/capture`: a link of a network captured on the host that carries
//! it, streamed to the caller as one pcapng file while it runs. The controller asks the host's
//! agent for the capture in slices (node calls of at most [`CAPTURE_SLICE`]), each answering
//! the frames taken so far; the agent's tap stays armed between slices, so no frame falls
//! between two.
//!
//! Owns the order of slices and when the stream ends; must not touch the data plane (the agent
//! does) nor decide visibility beyond asking the network service.

use std::time::{Duration, Instant};

use base64::Engine;
use telvirt_api::{CAPTURE_SLICE, CaptureChunk, CaptureSlice, NodeReply, NodeRequest};
use telvirt_model::network::{CaptureRequest, NetworkDescriptor, ResolvedCapture};

use crate::service::{Caller, Controller, ControllerError};

type Result<T, E = ControllerError> = std::result::Result<T, E>;

/// A capture under way: the next slices to ask for, from the host that answered the first.
pub struct CaptureStream {
    controller: std::sync::Arc<Controller>,
    host: String,
    network: NetworkDescriptor,
    capture: ResolvedCapture,
    ends_at: Instant,
    done: bool,
}

impl Controller {
    /// Checks `req` against network `name` (visible to `caller`), starts the capture on the
    /// host that holds the link and answers the stream's first bytes with the rest to come.
    pub async fn start_capture(
        self: &std::sync::Arc<Self>,
        caller: &Caller,
        name: &str,
        req: &CaptureRequest,
    ) -> Result<(Vec<u8>, CaptureStream)> {
        let (n, _) = self.visible_network(caller, name).await?;
        let capture = req.resolve(&n.descriptor)?;
        let hosts = self.network_hosts(&n).await?;
        if hosts.is_empty() {
            return Err(ControllerError::Conflict(format!(
                "no VNF of network {name} is placed on a host with an agent yet: no data plane \
                 carries its links"
            )));
        }
        let ends_at = Instant::now() + Duration::from_millis(capture.duration_ms);
        let mut stream = CaptureStream {
            controller: std::sync::Arc::clone(self),
            host: String::new(),
            network: n.descriptor,
            capture,
            ends_at,
            done: false,
        };
        // The link is live on one host (for a link between hosts, on both: the first answers).
        let mut refusals = Vec::new();
        for host in hosts {
            stream.host = host.clone();
            match stream.slice(true).await {
                Ok(bytes) => return Ok((bytes, stream)),
                Err(ControllerError::Conflict(why) | ControllerError::Unavailable(why)) => {
                    refusals.push(format!("host {host}: {why}"));
                }
                Err(e) => return Err(e),
            }
        }
        Err(ControllerError::Conflict(format!(
            "no host can capture that link of network {name} now: {}",
            refusals.join("; ")
        )))
    }
}

impl CaptureStream {
    /// The stream's next bytes; `None` once the capture ended.
    pub async fn next_bytes(&mut self) -> Option<Result<Vec<u8>>> {
        if self.done {
            return None;
        }
        let next = self.slice(false).await;
        if let Err(e) = &next {
            // The response is under way: the caller only sees the stream end early.
            tracing::warn!(
                network = %self.network.name(),
                host = %self.host,
                "capture ended early: {e}"
            );
        }
        Some(next)
    }

    async fn slice(&mut self, first: bool) -> Result<Vec<u8>> {
        let left = self.ends_at.saturating_duration_since(Instant::now());
        let wait = left.min(CAPTURE_SLICE);
        let slice = CaptureSlice {
            link: self.capture.link,
            packets: self.capture.packets,
            snaplen: self.capture.snaplen,
            wait_ms: u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
            first,
            last: left <= CAPTURE_SLICE,
        };
        let request = NodeRequest::Capture {
            network: self.network.clone(),
            slice,
        };
        let reply = self
            .controller
            .node_call_within(&self.host, request, wait + Duration::from_secs(10))
            .await;
        let chunk: CaptureChunk = match reply {
            Ok(NodeReply::Capture { chunk }) => chunk,
            Ok(other) => {
                self.done = true;
                return Err(crate::maps::unexpected(&self.host, "capture", other));
            }
            Err(e) => {
                self.done = true;
                return Err(e);
            }
        };
        self.done = chunk.done;
        base64::engine::general_purpose::STANDARD
            .decode(chunk.pcapng.as_bytes())
            .map_err(|e| {
                self.done = true;
                ControllerError::Corrupt(format!(
                    "the agent of host {} answered a capture slice that is not base64: {e}",
                    self.host
                ))
            })
    }
}
