//! The agent protocol over HTTP, the agent's side: a [`ControlLink`] that calls a controller's
//! `/v1/agent/hosts/{host}/…` routes with the host's node credential (ADR 047).
//!
//! Owns the HTTP details (bearer token, long-poll timeouts, bounded answers, problems turned
//! into [`LinkError`]s). It must not decide anything: the agent does.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use reqwest::Method;
use serde::Serialize;
use serde::de::DeserializeOwned;
use telvirt_api::{
    Assignment, Changes, ControlLink, HostRecord, LinkError, NetworkSet, NodeCall, NodeReply,
    Observation, paths,
};
use telvirt_model::api::Problem;

/// Longest time a plain call may take (a long poll adds its wait to it).
const CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// Largest answer read from the controller (assignments of a full host; a module is 16 MiB).
const MAX_ANSWER: usize = 32 << 20;

pub struct HttpLink {
    http: reqwest::Client,
    /// The controllers' API addresses; calls go to `bases[current]` and move to the next when
    /// it cannot be reached.
    bases: Vec<String>,
    current: AtomicUsize,
    /// The host whose node credential `token` is: the link acts for it only.
    host: String,
    token: String,
    /// The assignment revision the last changes poll returned.
    revision: Mutex<Option<u64>>,
}

impl HttpLink {
    /// A link to the controller at `bases` (`https://host:port`, comma-separated for several
    /// controllers of one cluster) for `host`, whose node credential is `token`, through
    /// `http` (which trusts the controllers' certificates).
    pub fn new(
        bases: &str,
        host: &str,
        token: String,
        http: reqwest::ClientBuilder,
    ) -> Result<Self, LinkError> {
        let http = http
            .connect_timeout(Duration::from_secs(2))
            .build()
            .map_err(|e| LinkError::Transport(e.to_string()))?;
        let bases: Vec<String> = bases
            .split(',')
            .map(|b| b.trim().trim_end_matches('/').to_owned())
            .filter(|b| !b.is_empty())
            .collect();
        if bases.is_empty() {
            return Err(LinkError::Transport(
                "--controller names no controller address".to_owned(),
            ));
        }
        Ok(Self {
            http,
            bases,
            current: AtomicUsize::new(0),
            host: host.to_owned(),
            token,
            revision: Mutex::new(None),
        })
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        wait: Duration,
    ) -> Result<Vec<u8>, LinkError> {
        let at = self.current.load(Ordering::Relaxed) % self.bases.len();
        let base = &self.bases[at];
        let mut request = self
            .http
            .request(method, format!("{base}{path}"))
            .bearer_auth(&self.token)
            .timeout(CALL_TIMEOUT + wait);
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body);
        }
        let mut response = match request.send().await {
            Ok(r) => r,
            Err(e) => {
                // This controller is gone: the next call tries the next one.
                let _ = self.current.compare_exchange(
                    at,
                    (at + 1) % self.bases.len(),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
                return Err(LinkError::Transport(format!("{base}: {e}")));
            }
        };
        let status = response.status();
        let mut bytes = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| LinkError::Transport(e.to_string()))?
        {
            if bytes.len() + chunk.len() > MAX_ANSWER {
                return Err(LinkError::Transport(format!(
                    "the controller's answer to {path} is larger than {MAX_ANSWER} bytes"
                )));
            }
            bytes.extend_from_slice(&chunk);
        }
        if status.is_success() {
            return Ok(bytes);
        }
        let detail = serde_json::from_slice::<Problem>(&bytes)
            .map(|p| p.detail)
            .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).chars().take(500).collect());
        Err(LinkError::Refused {
            status: status.as_u16(),
            detail,
        })
    }

    async fn get<T: DeserializeOwned>(&self, path: &str, wait: Duration) -> Result<T, LinkError> {
        let bytes = self.send(Method::GET, path, None, wait).await?;
        serde_json::from_slice(&bytes)
            .map_err(|e| LinkError::Transport(format!("the controller's answer to {path}: {e}")))
    }

    /// Posts `body` as JSON; the answer's bytes.
    async fn post<T: Serialize>(&self, path: &str, body: &T) -> Result<Vec<u8>, LinkError> {
        let body = serde_json::to_vec(body).map_err(|e| LinkError::Transport(e.to_string()))?;
        self.send(Method::POST, path, Some(body), Duration::ZERO)
            .await
    }
}

#[async_trait]
impl ControlLink for HttpLink {
    async fn register(&self, record: &HostRecord) -> Result<(), LinkError> {
        self.post(&paths::register(&record.spec.name), record)
            .await
            .map(drop)
    }

    async fn assignments(&self, host: &str) -> Result<Vec<Assignment>, LinkError> {
        self.get(&paths::assignments(host), Duration::ZERO).await
    }

    async fn report(&self, host: &str, observation: Observation) -> Result<(), LinkError> {
        self.post(&paths::observations(host), &observation)
            .await
            .map(drop)
    }

    async fn heartbeat(
        &self,
        host: &str,
        beat: &telvirt_api::HeartbeatRequest,
    ) -> Result<Option<Duration>, LinkError> {
        let bytes = self.post(&paths::heartbeat(host), beat).await?;
        // A controller that answers without a body does not say how long its lease lasts.
        let reply = serde_json::from_slice::<telvirt_api::HeartbeatReply>(&bytes).ok();
        if let Some(why) = reply.as_ref().and_then(|r| r.body_refused.as_deref()) {
            tracing::warn!(host = %host, "the controller passed over what the heartbeat said: {why}");
        }
        Ok(reply.map(|r| Duration::from_millis(r.lease_ttl_ms)))
    }

    async fn wait_for_change(&self, max_wait: Duration) -> bool {
        let host = &self.host;
        let after = *self.revision.lock().unwrap_or_else(|p| p.into_inner());
        let path = match after {
            // First wait: learn the revision now; a change, as far as the agent knows.
            None => format!("{}?wait_ms=0", paths::changes(host)),
            Some(r) => format!(
                "{}?after={r}&wait_ms={}",
                paths::changes(host),
                max_wait.as_millis()
            ),
        };
        match self.get::<Changes>(&path, max_wait).await {
            Ok(changes) => {
                *self.revision.lock().unwrap_or_else(|p| p.into_inner()) = Some(changes.revision);
                after != Some(changes.revision)
            }
            Err(e) => {
                tracing::warn!("watching assignments failed: {e}");
                tokio::time::sleep(max_wait.min(Duration::from_secs(1))).await;
                // Changes may have been missed meanwhile.
                true
            }
        }
    }

    async fn next_calls(&self, host: &str, max_wait: Duration) -> Result<Vec<NodeCall>, LinkError> {
        let path = format!("{}?wait_ms={}", paths::calls(host), max_wait.as_millis());
        self.get(&path, max_wait).await
    }

    async fn reply(&self, host: &str, id: u64, reply: NodeReply) -> Result<(), LinkError> {
        self.post(&paths::reply(host, id), &reply).await.map(drop)
    }

    async fn module(&self, host: &str, sha256: &str) -> Result<Option<Vec<u8>>, LinkError> {
        self.send(
            Method::GET,
            &paths::module(host, sha256),
            None,
            Duration::ZERO,
        )
        .await
        .map(Some)
    }

    async fn networks(&self, host: &str) -> Result<NetworkSet, LinkError> {
        self.get(&paths::networks(host), Duration::ZERO).await
    }

    async fn wait_for_networks(
        &self,
        host: &str,
        after: u64,
        max_wait: Duration,
    ) -> Result<u64, LinkError> {
        let path = format!(
            "{}?after={after}&wait_ms={}",
            paths::network_changes(host),
            max_wait.as_millis()
        );
        Ok(self.get::<Changes>(&path, max_wait).await?.revision)
    }
}
