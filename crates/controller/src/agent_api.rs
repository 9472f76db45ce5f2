//! The agent protocol over HTTP: the `/v1/agent/hosts/{host}/…` routes an agent process
//! (`telvirt agent`) calls with its node credential (ADR 047).
//!
//! Owns translating those calls to the controller's agent API (register, heartbeat,
//! assignments, changes, observations, node calls, module bytes) and binding each to the host of
//! the credential. It must not hold rules: what a registration, observation or reply means is
//! the controller's; and it must not accept an authority's token (nor `http.rs` a node's).

use std::collections::HashMap;
use std::time::Duration;

use axum::Router;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use telvirt_api::{
    Assignment, Changes, HeartbeatReply, HostRecord, MAX_WAIT, NetworkSet, NodeCall, NodeReply,
    Observation,
};
use telvirt_model::FieldError;
use telvirt_model::api::Problem;
use utoipa::IntoParams;

use crate::http::{ApiError, AppState, Body, WasmBytes, json};
use crate::service::ControllerError;

/// The host a request acts for: the `{host}` of its path, which its node credential must name.
pub struct NodeHost(pub String);

impl FromRequestParts<AppState> for NodeHost {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let node = state
            .controller
            .authenticate_node(crate::http::bearer(parts)?)
            .await?;
        let Path(params) = Path::<HashMap<String, String>>::from_request_parts(parts, state)
            .await
            .map_err(|e| ControllerError::NotFound(e.body_text()))?;
        let host = params.get("host").cloned().unwrap_or_default();
        node.require_host(&host)?;
        Ok(NodeHost(host))
    }
}

/// `?wait_ms=` of the polls, and `?after=` of the changes poll.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PollQuery {
    /// The revision the agent holds: the answer comes once the revision differs (changes
    /// polls only).
    #[serde(default)]
    after: Option<u64>,
    /// How long to hold the poll open, in milliseconds (default and most: 30000).
    #[serde(default)]
    wait_ms: Option<u64>,
}

impl PollQuery {
    fn wait(&self) -> Duration {
        self.wait_ms
            .map_or(MAX_WAIT, Duration::from_millis)
            .min(MAX_WAIT)
    }
}

/// Largest node reply an agent may post: the maps of a large VNF or a capture slice answer more
/// than an API request body may be.
pub const MAX_NODE_REPLY: usize = 16 << 20;

/// The agent protocol's routes (merged into the API by [`crate::http::router`]).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/agent/hosts/{host}/register", post(register))
        .route("/v1/agent/hosts/{host}/heartbeat", post(heartbeat))
        .route("/v1/agent/hosts/{host}/assignments", get(assignments))
        .route("/v1/agent/hosts/{host}/changes", get(changes))
        .route("/v1/agent/hosts/{host}/observations", post(observe))
        .route("/v1/agent/hosts/{host}/calls", get(calls))
        .route(
            "/v1/agent/hosts/{host}/calls/{id}",
            post(reply).layer(axum::extract::DefaultBodyLimit::max(MAX_NODE_REPLY)),
        )
        .route("/v1/agent/hosts/{host}/modules/{sha256}", get(module))
        .route("/v1/agent/hosts/{host}/networks", get(networks))
        .route(
            "/v1/agent/hosts/{host}/networks/changes",
            get(network_changes),
        )
}

/// A JSON body of the protocol, or 422 naming what is wrong with it.
fn parse<T: serde::de::DeserializeOwned>(body: &Body, what: &str) -> Result<T, ApiError> {
    serde_json::from_slice(&body.bytes).map_err(|e| {
        ControllerError::Invalid(FieldError::new(what, format!("not a valid {what}: {e}"))).into()
    })
}

#[utoipa::path(post, path = "/v1/agent/hosts/{host}/register", tag = "agent", security(("bearer" = [])),
    params(("host" = String, Path, description = "The agent's host: the one its node credential names")),
    request_body = HostRecord,
    responses(
        (status = 204, description = "Registered"),
        (status = 401, description = "No valid node credential (an authority token is not one)", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The credential is another host's, or an authority's token", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "The body is not a valid host record (or names another host, or a bad tunnel address)", body = Problem, content_type = "application/problem+json"),
    ),
    description = "Registers the host: its inventory, memory, huge pages, runtimes and tunnel address. Registering again replaces the record.")]
async fn register(
    State(s): State<AppState>,
    NodeHost(host): NodeHost,
    body: Body,
) -> Result<Response, ApiError> {
    let mut record: HostRecord = parse(&body, "host record")?;
    if record.spec.name != host {
        return Err(ControllerError::Invalid(FieldError::new(
            "spec.name",
            format!(
                "the record names host {}, the path {host}; an agent registers its own host",
                record.spec.name
            ),
        ))
        .into());
    }
    if let Some(t) = &record.tunnel
        && t.parse::<std::net::SocketAddr>().is_err()
    {
        return Err(ControllerError::Invalid(FieldError::new(
            "tunnel",
            format!("`{t}` is not a tunnel address: IP:PORT, e.g. 10.0.0.5:4789"),
        ))
        .into());
    }
    record.agent = true;
    s.controller.register_agent_host(record).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[utoipa::path(post, path = "/v1/agent/hosts/{host}/heartbeat", tag = "agent", security(("bearer" = [])),
    params(("host" = String, Path, description = "The agent's host: the one its node credential names")),
    responses(
        (status = 200, description = "Renewed; the lease lasts this long without another heartbeat", body = HeartbeatReply),
        (status = 401, description = "No valid node credential (an authority token is not one)", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The credential is another host's, or an authority's token", body = Problem, content_type = "application/problem+json"),
    ),
    request_body(content = telvirt_api::HeartbeatRequest, description = "Optional: the networks whose final counts the host keeps"),
    description = "Renews the host's liveness lease; the host is Ready while the lease holds.")]
async fn heartbeat(
    State(s): State<AppState>,
    NodeHost(host): NodeHost,
    body: Body,
) -> Result<Response, ApiError> {
    // An agent from before heartbeats had a body sends none: it says nothing more.
    let (beat, unread) = if body.bytes.is_empty() {
        (telvirt_api::HeartbeatRequest::default(), None)
    } else {
        match serde_json::from_slice::<telvirt_api::HeartbeatRequest>(&body.bytes) {
            Ok(beat) => (beat, None),
            Err(e) => (
                telvirt_api::HeartbeatRequest::default(),
                Some(format!("not a heartbeat body: {e}")),
            ),
        }
    };
    let body_refused = s.controller.take_heartbeat(&host, &beat, unread).await?;
    let ttl = s.controller.host_lease_ttl();
    Ok(json(
        StatusCode::OK,
        &telvirt_api::HeartbeatReply {
            lease_ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
            body_refused,
        },
    ))
}

#[utoipa::path(get, path = "/v1/agent/hosts/{host}/assignments", tag = "agent", security(("bearer" = [])),
    params(("host" = String, Path, description = "The agent's host: the one its node credential names")),
    responses(
        (status = 200, description = "The host's assignments", body = [Assignment]),
        (status = 401, description = "No valid node credential (an authority token is not one)", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The credential is another host's, or an authority's token", body = Problem, content_type = "application/problem+json"),
    ),
    description = "What the host is to run: one assignment per VNF instance placed on it.")]
async fn assignments(
    State(s): State<AppState>,
    NodeHost(host): NodeHost,
) -> Result<Response, ApiError> {
    Ok(json(
        StatusCode::OK,
        &s.controller.assignments(&host).await?,
    ))
}

/// Answers once the assignment revision differs from `after` (or after the wait): a revision
/// lower than `after` means the controller restarted, which the agent must see at once too.
#[utoipa::path(get, path = "/v1/agent/hosts/{host}/changes", tag = "agent", security(("bearer" = [])),
    params(("host" = String, Path, description = "The agent's host: the one its node credential names"), PollQuery),
    responses(
        (status = 200, description = "The current assignment revision", body = Changes),
        (status = 401, description = "No valid node credential (an authority token is not one)", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The credential is another host's, or an authority's token", body = Problem, content_type = "application/problem+json"),
    ),
    description = "Long-poll: answers once the host's assignment revision differs from `after`, or after `wait_ms`. A lower revision means the controller restarted.")]
async fn changes(
    State(s): State<AppState>,
    NodeHost(host): NodeHost,
    Query(q): Query<PollQuery>,
) -> Result<Response, ApiError> {
    let mut watch = s.controller.assignments_watch(&host);
    let after = q.after.unwrap_or(0);
    let _ = tokio::time::timeout(q.wait(), watch.wait_for(|rev| *rev != after)).await;
    let revision = *watch.borrow();
    Ok(json(StatusCode::OK, &Changes { revision }))
}

#[utoipa::path(get, path = "/v1/agent/hosts/{host}/networks", tag = "agent", security(("bearer" = [])),
    params(("host" = String, Path, description = "The agent's host: the one its node credential names")),
    responses(
        (status = 200, description = "The host's networks", body = NetworkSet),
        (status = 401, description = "No valid node credential (an authority token is not one)", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The credential is another host's, or an authority's token", body = Problem, content_type = "application/problem+json"),
    ),
    description = "The networks naming the host's VNFs, with the spans (VXLAN VNIs, peer tunnels) of those crossing hosts.")]
async fn networks(
    State(s): State<AppState>,
    NodeHost(host): NodeHost,
) -> Result<Response, ApiError> {
    Ok(json(
        StatusCode::OK,
        &s.controller.host_networks(&host).await?,
    ))
}

/// Answers once the host's network revision differs from `after` (or after the wait).
#[utoipa::path(get, path = "/v1/agent/hosts/{host}/networks/changes", tag = "agent", security(("bearer" = [])),
    params(("host" = String, Path, description = "The agent's host: the one its node credential names"), PollQuery),
    responses(
        (status = 200, description = "The current network revision", body = Changes),
        (status = 401, description = "No valid node credential (an authority token is not one)", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The credential is another host's, or an authority's token", body = Problem, content_type = "application/problem+json"),
    ),
    description = "Long-poll: answers once the host's network revision differs from `after`, or after `wait_ms`.")]
async fn network_changes(
    State(s): State<AppState>,
    NodeHost(host): NodeHost,
    Query(q): Query<PollQuery>,
) -> Result<Response, ApiError> {
    let revision = s
        .controller
        .wait_networks(&host, q.after.unwrap_or(0), q.wait())
        .await;
    Ok(json(StatusCode::OK, &Changes { revision }))
}

#[utoipa::path(post, path = "/v1/agent/hosts/{host}/observations", tag = "agent", security(("bearer" = [])),
    params(("host" = String, Path, description = "The agent's host: the one its node credential names")),
    request_body = Observation,
    responses(
        (status = 204, description = "Taken"), (status = 404, description = "No such VNF on this host", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid node credential (an authority token is not one)", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The credential is another host's, or an authority's token", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "The body is not a valid observation", body = Problem, content_type = "application/problem+json"),
    ),
    description = "Reports what the agent observed of one VNF instance (phase, reason, replication).")]
async fn observe(
    State(s): State<AppState>,
    NodeHost(host): NodeHost,
    body: Body,
) -> Result<Response, ApiError> {
    let observation: Observation = parse(&body, "observation")?;
    s.controller.observe(&host, observation).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[utoipa::path(get, path = "/v1/agent/hosts/{host}/calls", tag = "agent", security(("bearer" = [])),
    params(("host" = String, Path, description = "The agent's host: the one its node credential names"), PollQuery),
    responses(
        (status = 200, description = "Calls to answer", body = [NodeCall]),
        (status = 401, description = "No valid node credential (an authority token is not one)", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The credential is another host's, or an authority's token", body = Problem, content_type = "application/problem+json"),
    ),
    description = "Long-poll: the node calls (maps, stats, logs, upgrades, consoles, network status, probes, captures) waiting for this host, or an empty list after `wait_ms`.")]
async fn calls(
    State(s): State<AppState>,
    NodeHost(host): NodeHost,
    Query(q): Query<PollQuery>,
) -> Result<Response, ApiError> {
    let calls = s.controller.node_calls().take(&host, q.wait()).await;
    Ok(json(StatusCode::OK, &calls))
}

#[utoipa::path(post, path = "/v1/agent/hosts/{host}/calls/{id}", tag = "agent", security(("bearer" = [])),
    params(("host" = String, Path, description = "The agent's host: the one its node credential names"), ("id" = u64, Path, description = "The call's id")),
    request_body = NodeReply,
    responses(
        (status = 204, description = "Delivered to the caller"), (status = 404, description = "No such call waiting for this host (answered, or given up)", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid node credential (an authority token is not one)", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The credential is another host's, or an authority's token", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "The body is not a valid node reply", body = Problem, content_type = "application/problem+json"),
    ),
    description = "Answers node call `id`.")]
async fn reply(
    State(s): State<AppState>,
    NodeHost(host): NodeHost,
    Path((_, id)): Path<(String, u64)>,
    body: Body,
) -> Result<Response, ApiError> {
    let reply: NodeReply = parse(&body, "node reply")?;
    s.controller.node_calls().reply(&host, id, reply)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[utoipa::path(get, path = "/v1/agent/hosts/{host}/modules/{sha256}", tag = "agent", security(("bearer" = [])),
    params(("host" = String, Path, description = "The agent's host: the one its node credential names"), ("sha256" = String, Path, description = "The module's SHA-256, hex")),
    responses(
        (status = 422, description = "`sha256` is not 64 lowercase hex digits", body = Problem, content_type = "application/problem+json"),
        (status = 200, description = "The module", content_type = "application/wasm", body = WasmBytes), (status = 404, description = "No such module for this host", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid node credential (an authority token is not one)", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The credential is another host's, or an authority's token", body = Problem, content_type = "application/problem+json"),
    ),
    description = "The bytes of an uploaded wasm module the host runs or is to upgrade to.")]
async fn module(
    State(s): State<AppState>,
    NodeHost(host): NodeHost,
    Path((_, sha256)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let bytes = s.controller.module_for_host(&host, &sha256).await?;
    let mut response = (StatusCode::OK, bytes).into_response();
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/wasm"));
    Ok(response)
}
