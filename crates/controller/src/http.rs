//! The REST API: JSON over HTTP under `/v1/`, RFC 9457 problems, the OpenAPI document and the
//! descriptor's JSON Schema, Prometheus metrics.
//!
//! Owns routes, authentication of requests, status codes and body limits. It must not hold
//! rules: every decision is the controller's, this module only translates.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, MatchedPath, Path, Request, State};
use axum::http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::Serialize;
use telvirt_model::api::{
    Authority, AuthorityToken, CreateAuthority, Health, HealthProblem, HostView, MapChangeRequest,
    MapChangeResult, MapView, MigrateRequest, ModuleView, Problem, SecretRotation, VnfWatchEvent,
    VnfWatchKind,
};
use telvirt_model::{
    DeviceGrant, Event, FieldError, Format, HostGrants, ModelError, Vnf, VnfDescriptor,
};
use utoipa::OpenApi;

use crate::agent_api;
use crate::health::HealthReport;
use crate::nodes::NodeCredential;
use crate::service::{Caller, Controller, ControllerError, Deletion};

/// Largest request body accepted.
pub const MAX_BODY: usize = 1 << 20;

pub const PROBLEM_JSON: &str = "application/problem+json";

#[derive(Clone)]
pub struct AppState {
    pub controller: Arc<Controller>,
}

/// An error answered as `application/problem+json`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    detail: String,
    errors: Vec<FieldError>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            detail: detail.into(),
            errors: Vec::new(),
        }
    }
}

/// The HTTP status and detail an error is answered with (for transports that are not HTTP).
pub(crate) fn status_and_detail(e: ControllerError) -> (u16, String) {
    let api = ApiError::from(e);
    (api.status.as_u16(), api.detail)
}

impl From<ControllerError> for ApiError {
    fn from(e: ControllerError) -> Self {
        let detail = e.to_string();
        match e {
            ControllerError::Descriptor(ModelError::Syntax(f)) => Self {
                status: StatusCode::BAD_REQUEST,
                kind: "malformed-descriptor",
                detail,
                errors: vec![f],
            },
            ControllerError::Descriptor(ModelError::Invalid(fields)) => Self {
                status: StatusCode::UNPROCESSABLE_ENTITY,
                kind: "invalid-descriptor",
                detail,
                errors: fields,
            },
            ControllerError::Invalid(f) => Self {
                status: StatusCode::UNPROCESSABLE_ENTITY,
                kind: "invalid-request",
                detail,
                errors: vec![f],
            },
            ControllerError::Unauthorized | ControllerError::WrongCredential(_) => {
                Self::new(StatusCode::UNAUTHORIZED, "unauthorized", detail)
            }
            ControllerError::Forbidden(_) => Self::new(StatusCode::FORBIDDEN, "forbidden", detail),
            ControllerError::TooLarge(_) => {
                Self::new(StatusCode::PAYLOAD_TOO_LARGE, "body-too-large", detail)
            }
            ControllerError::Refused { errors, .. } => Self {
                status: StatusCode::UNPROCESSABLE_ENTITY,
                kind: "refused",
                detail,
                errors,
            },
            ControllerError::NeedsRecreate { errors, .. } => Self {
                status: StatusCode::CONFLICT,
                kind: "needs-recreate",
                detail,
                errors,
            },
            ControllerError::CannotApply(f) => Self {
                status: StatusCode::CONFLICT,
                kind: "cannot-apply",
                detail,
                errors: vec![f],
            },
            ControllerError::NotGranted(f) => Self {
                status: StatusCode::FORBIDDEN,
                kind: "not-granted",
                detail,
                errors: vec![f],
            },

            ControllerError::NotFound(_) => Self::new(StatusCode::NOT_FOUND, "not-found", detail),
            ControllerError::Conflict(_) => Self::new(StatusCode::CONFLICT, "conflict", detail),
            ControllerError::Locked { .. } => Self::new(StatusCode::CONFLICT, "locked", detail),
            ControllerError::Unavailable(_) => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", detail)
            }
            ControllerError::TooManyRequests(_) => {
                Self::new(StatusCode::TOO_MANY_REQUESTS, "too-many-requests", detail)
            }
            ControllerError::Store(e) if e.is_unavailable() => {
                tracing::error!("{detail}");
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "store-unavailable", detail)
            }
            ControllerError::Store(_)
            | ControllerError::Corrupt(_)
            | ControllerError::Scheduler(_) => {
                tracing::error!("internal error: {detail}");
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", detail)
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let problem = Problem {
            kind: format!("urn:telvirt:problem:{}", self.kind),
            title: self.status.canonical_reason().unwrap_or("Error").to_owned(),
            status: self.status.as_u16(),
            detail: self.detail,
            errors: self.errors,
        };
        let body = serde_json::to_vec(&problem).unwrap_or_default();
        let mut response = (self.status, body).into_response();
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// The authenticated caller of a request.
pub struct Authed(pub Caller);

impl FromRequestParts<AppState> for Authed {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        Ok(Authed(state.controller.authenticate(bearer(parts)?).await?))
    }
}

/// The bearer token of a request (401 without one).
pub(crate) fn bearer(parts: &Parts) -> Result<&str, ApiError> {
    bearer_in(&parts.headers)
}

/// The bearer token in `headers` (401 without one).
fn bearer_in(headers: &axum::http::HeaderMap) -> Result<&str, ApiError> {
    headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or_else(|| ControllerError::Unauthorized.into())
}

/// A request body within [`MAX_BODY`], with the format its content type names.
pub struct Body {
    pub(crate) bytes: Bytes,
    pub(crate) format: Format,
}

impl FromRequest<AppState> for Body {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let content_type = req
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| {
                v.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_ascii_lowercase()
            });
        let format = match content_type.as_deref() {
            Some("application/json") => Some(Format::Json),
            Some("application/yaml" | "application/x-yaml" | "text/yaml") => Some(Format::Yaml),
            None => None,
            Some(other) => {
                return Err(ApiError::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "unsupported-media-type",
                    format!(
                        "content type {other} is not accepted; send application/json or application/yaml"
                    ),
                ));
            }
        };
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            let status = rejection.status();
            if status == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    status,
                    "body-too-large",
                    format!(
                        "the request body is larger than this route accepts ({MAX_BODY} bytes; {} for a map change)",
                        telvirt_model::vnf::limits::MAX_MAP_CHANGE_BYTES
                    ),
                )
            } else {
                ApiError::new(status, "unreadable-body", rejection.body_text())
            }
        })?;
        let format = format.unwrap_or_else(|| Format::sniff(&bytes));
        Ok(Body { bytes, format })
    }
}

pub(crate) fn json<T: Serialize>(status: StatusCode, value: &T) -> Response {
    (status, Json(value)).into_response()
}

/// `GET /v1/healthz` and `GET /v1/readyz` of a process that serves no API but its health (an
/// agent on its own host).
pub fn health_router(health: Arc<crate::health::HealthRegistry>) -> Router {
    let answer = move || {
        let health = Arc::clone(&health);
        async move { health_response(&health) }
    };
    Router::new()
        .route("/v1/healthz", get(answer.clone()))
        .route("/v1/readyz", get(answer))
        .fallback(not_found)
}

/// The whole API.
pub fn router(controller: Arc<Controller>) -> Router {
    let state = AppState { controller };
    Router::new()
        .route("/v1/healthz", get(healthz))
        .route("/v1/readyz", get(readyz))
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/schema/vnf", get(vnf_schema))
        .route("/v1/vnfs", get(list_vnfs).post(create_vnf))
        .route(
            "/v1/vnfs/{name}",
            get(show_vnf).put(apply_vnf).delete(delete_vnf),
        )
        .route("/v1/vnfs/{name}/events", get(vnf_events))
        .route("/v1/vnfs/{name}/start", post(start_vnf))
        .route("/v1/vnfs/{name}/stop", post(stop_vnf))
        .route("/v1/vnfs/{name}/lock", post(lock_vnf))
        .route("/v1/vnfs/{name}/unlock", post(unlock_vnf))
        .route("/v1/vnfs/{name}/upgrade", post(upgrade_vnf))
        .route("/v1/vnfs/{name}/maps", get(vnf_maps))
        .route(
            "/v1/vnfs/{name}/maps/{map}/entries",
            post(change_vnf_map).layer(axum::extract::DefaultBodyLimit::max(
                telvirt_model::vnf::limits::MAX_MAP_CHANGE_BYTES,
            )),
        )
        .route("/v1/vnfs/{name}/stats", get(vnf_stats))
        .route("/v1/vnfs/{name}/logs", get(vnf_logs))
        .route("/v1/vnfs/{name}/console", get(vnf_console))
        .route("/v1/vnfs/{name}/devices", post(attach_device))
        .route("/v1/vnfs/{name}/migrate", post(migrate_vnf))
        .route(
            "/v1/vnfs/{name}/devices/{id}",
            axum::routing::delete(detach_device),
        )
        .route("/v1/networks", get(list_networks).post(create_network))
        .route(
            "/v1/networks/{name}",
            get(show_network)
                .put(replace_network)
                .delete(delete_network),
        )
        .route(
            "/v1/networks/{name}/steering/{endpoint}",
            axum::routing::put(steer_network),
        )
        .route("/v1/networks/{name}/latency", post(network_latency))
        .route("/v1/networks/{name}/capture", post(network_capture))
        .route("/v1/hosts", get(list_hosts))
        .route("/v1/hosts/{name}", get(show_host).delete(delete_host))
        .route("/v1/hosts/{name}/cordon", post(cordon_host))
        .route("/v1/hosts/{name}/uncordon", post(uncordon_host))
        .route("/v1/hosts/{name}/drain", post(drain_host))
        .route("/v1/hosts/{name}/coremap", get(host_core_map))
        .route(
            "/v1/authorities",
            get(list_authorities).post(create_authority),
        )
        .route("/v1/authorities/{name}", delete(delete_authority))
        .route("/v1/authorities/{name}/token", post(rotate_authority_token))
        .route(
            "/v1/authorities/{name}/grants",
            get(show_grants).post(add_grants).delete(revoke_grants),
        )
        .route(
            "/v1/modules",
            get(list_modules)
                .post(upload_module)
                .layer(axum::extract::DefaultBodyLimit::max(
                    usize::try_from(telvirt_model::vnf::limits::MAX_MODULE_BYTES)
                        .unwrap_or(usize::MAX)
                        .saturating_add(1),
                )),
        )
        .route(
            "/v1/modules/{sha256}",
            get(show_module).delete(delete_module),
        )
        .route("/v1/hosts/{name}/credential", post(issue_node_credential))
        .route(
            "/v1/secrets/replication/rotate",
            post(rotate_replication_secret),
        )
        .route("/v1/watch/vnfs", get(watch_vnfs))
        .route("/metrics", get(metrics))
        .merge(crate::agent_api::routes())
        .merge(crate::web::routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .with_state(state)
}

async fn count_requests(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let method = req.method().to_string();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let started = std::time::Instant::now();
    let response = next.run(req).await;
    state.controller.metrics().request(
        &method,
        &route,
        response.status().as_u16(),
        started.elapsed(),
    );
    response
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not-found",
        "no such API path; see /v1/openapi.json",
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        "this path does not take that method; see /v1/openapi.json",
    )
}

#[utoipa::path(get, path = "/v1/healthz", tag = "node",
    responses(
        (status = 200, description = "Every component of the node is up", body = Health),
        (status = 503, description = "A component is down (store, scheduler, agent, data plane, ...): the detail names each and why", body = HealthProblem, content_type = "application/problem+json"),
    ))]
async fn healthz(State(s): State<AppState>) -> Response {
    health_answer(&s)
}

#[utoipa::path(get, path = "/v1/readyz", tag = "node",
    responses(
        (status = 200, description = "The node can take work: every component is up", body = Health),
        (status = 503, description = "Not ready: a component is down; the detail names each and why", body = HealthProblem, content_type = "application/problem+json"),
    ))]
async fn readyz(State(s): State<AppState>) -> Response {
    health_answer(&s)
}

fn health_answer(s: &AppState) -> Response {
    health_response(s.controller.health())
}

/// `/v1/healthz` as `health` reports it: 200 with every component, or 503 as a problem naming
/// each one that is down.
pub fn health_response(health: &crate::health::HealthRegistry) -> Response {
    match health.report() {
        HealthReport::Healthy(health) => json(StatusCode::OK, &health),
        HealthReport::Unhealthy(problem) => {
            let mut response = json(StatusCode::SERVICE_UNAVAILABLE, &problem);
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
            response
        }
    }
}

#[utoipa::path(get, path = "/v1/openapi.json", tag = "node",
    responses((status = 200, description = "This document", content_type = "application/json")))]
async fn openapi() -> Response {
    static DOCUMENT: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    // Built once per process: it depends on the code only (about 10 ms to build, 136 KB).
    static_json(
        DOCUMENT.get_or_init(|| serde_json::to_vec(&openapi_document()).unwrap_or_default()),
    )
}

/// A JSON body built once and served as is.
fn static_json(body: &'static [u8]) -> Response {
    (
        [(CONTENT_TYPE, HeaderValue::from_static("application/json"))],
        body,
    )
        .into_response()
}

#[utoipa::path(get, path = "/v1/schema/vnf", tag = "node",
    responses((status = 200, description = "JSON Schema (2020-12) of the VNF descriptor", content_type = "application/json")))]
async fn vnf_schema() -> Response {
    static SCHEMA: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    static_json(SCHEMA.get_or_init(|| serde_json::to_vec(&descriptor_schema()).unwrap_or_default()))
}

/// The query of a list (or, with `only`, of a route that takes that one list parameter): 400
/// when it is not form-encoded, 422 naming a bad, unknown or repeated parameter.
fn list_query(
    query: Result<
        axum::extract::Query<Vec<(String, String)>>,
        axum::extract::rejection::QueryRejection,
    >,
    only: Option<&str>,
) -> Result<crate::listing::ListQuery, ApiError> {
    let axum::extract::Query(pairs) = query.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed-query",
            format!("the query string is not form-encoded: {e}"),
        )
    })?;
    if let Some(only) = only
        && let Some((key, _)) = pairs.iter().find(|(k, _)| k != only)
    {
        return Err(ControllerError::Invalid(FieldError::new(
            key,
            format!("is not a parameter here; it takes {only}"),
        ))
        .into());
    }
    Ok(
        crate::listing::ListQuery::from_pairs(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .map_err(ControllerError::Invalid)?,
    )
}

/// The response header carrying the token of the next page of a list.
pub const CONTINUE_HEADER: &str = "x-continue";

#[utoipa::path(get, path = "/v1/vnfs", tag = "vnfs", security(("bearer" = [])),
    params(
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 1000, description = "At most this many VNFs (1 to 1000); without it, every matching VNF"),
        ("continue" = Option<String>, Query, description = "The `X-Continue` header of the previous page: this page starts after its last VNF"),
        ("labelSelector" = Option<String>, Query, description = "Comma-separated requirements on `metadata.labels`, all of which must hold: `key=value` (or `key==value`), `key!=value` (absent or another value), `key` (present), `!key` (absent)"),
    ),
    responses(
        (status = 200, description = "The VNFs the caller may see that match, in name order. When more may follow, the `X-Continue` header holds the token of the next page", body = [Vnf],
            headers(("X-Continue" = String, description = "Token of the next page: pass it as `continue`; absent on the last page"))),
        (status = 400, description = "The query string is not form-encoded", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "A bad `limit`, `continue` or `labelSelector`, or an unknown or repeated parameter; `errors` names it", body = Problem, content_type = "application/problem+json"),
    ))]
async fn list_vnfs(
    State(s): State<AppState>,
    Authed(caller): Authed,
    query: Result<
        axum::extract::Query<Vec<(String, String)>>,
        axum::extract::rejection::QueryRejection,
    >,
) -> Result<Response, ApiError> {
    let query = list_query(query, None)?;
    let page = s.controller.vnf_page(&caller, &query).await?;
    let mut response = json(StatusCode::OK, &page.items);
    if let Some(token) = page.continue_token {
        let value = HeaderValue::from_str(&token)
            .map_err(|e| ControllerError::Corrupt(format!("continue token {token:?}: {e}")))?;
        response.headers_mut().insert(CONTINUE_HEADER, value);
    }
    Ok(response)
}

#[utoipa::path(get, path = "/v1/watch/vnfs", tag = "vnfs", security(("bearer" = [])),
    params(
        ("labelSelector" = Option<String>, Query, description = "As for `GET /v1/vnfs`: only VNFs whose labels match are shown; one whose labels stop matching is told as `DELETED`"),
    ),
    responses(
        (status = 200, description = "Server-sent events, one per message: `event:` is the message's `type` in lower case, `data:` the message. First an `ADDED` for every VNF the caller may see that matches, then `SYNCED`, then every change: `ADDED`, `MODIFIED` (the new state) and `DELETED` (the name). Comments keep an idle stream open every 15 s. The stream ends when the node stops or cannot read its store (watch again), and when the token it was opened with stops working (rotated, or its authority deleted)", body = VnfWatchEvent, content_type = "text/event-stream"),
        (status = 400, description = "The query string is not form-encoded", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "A bad `labelSelector`, or another parameter; `errors` names it", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "The caller's authority holds as many watches open as one authority may (16); end one first", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "As many watches are open as the node keeps (64); try again once one ends", body = Problem, content_type = "application/problem+json"),
    ))]
async fn watch_vnfs(
    State(s): State<AppState>,
    Authed(caller): Authed,
    headers: axum::http::HeaderMap,
    query: Result<
        axum::extract::Query<Vec<(String, String)>>,
        axum::extract::rejection::QueryRejection,
    >,
) -> Result<Response, ApiError> {
    use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
    let query = list_query(query, Some("labelSelector"))?;
    // The token the caller was authenticated with (`Authed`): the watch ends when it stops
    // working.
    let token = bearer_in(&headers)?;
    let changes = s
        .controller
        .watch_vnfs(caller, token, query.selector)
        .await?;
    let events = futures_util::stream::unfold(changes, |mut changes| async move {
        let message = changes.recv().await?;
        let name = match message.kind {
            VnfWatchKind::Added => "added",
            VnfWatchKind::Modified => "modified",
            VnfWatchKind::Deleted => "deleted",
            VnfWatchKind::Synced => "synced",
        };
        let event = SseEvent::default().event(name).json_data(&message);
        Some((event, changes))
    });
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::new().interval(std::time::Duration::from_secs(15)))
        .into_response())
}

#[utoipa::path(post, path = "/v1/vnfs", tag = "vnfs", security(("bearer" = [])),
    request_body(content(
        (VnfDescriptor = "application/json"),
        (VnfDescriptor = "application/yaml"),
    ), description = "A VNF descriptor"),
    responses(
        (status = 201, description = "Accepted and stored; placement follows", body = Vnf),
        (status = 400, description = "Malformed YAML or JSON", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Names a host resource (path, interface, TAP) not granted to the authority; `errors` names the field", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The name is taken", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body over 1 MiB", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Unsupported content type", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Fields break the descriptor's rules", body = Problem, content_type = "application/problem+json"),
    ))]
async fn create_vnf(
    State(s): State<AppState>,
    Authed(caller): Authed,
    body: Body,
) -> Result<Response, ApiError> {
    let vnf = s
        .controller
        .create_vnf(&caller, &body.bytes, body.format)
        .await?;
    Ok(json(StatusCode::CREATED, &vnf))
}

/// The query of `PUT /v1/vnfs/{name}`.
#[derive(Debug, Default, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ApplyQuery {
    /// `true`: answer what the apply would do (the diff, the placement) and change nothing.
    #[serde(rename = "dryRun")]
    #[param(rename = "dryRun")]
    pub dry_run: Option<bool>,
}

#[utoipa::path(put, path = "/v1/vnfs/{name}", tag = "vnfs", security(("bearer" = [])),
    params(("name" = String, Path, description = "VNF name"), ApplyQuery),
    request_body(content(
        (VnfDescriptor = "application/json"),
        (VnfDescriptor = "application/yaml"),
    ), description = "The VNF's whole new descriptor"),
    responses(
        (status = 200, description = "Applied (or, with dryRun, what would be): the VNF and the fields that changed; a re-pin answers once the VNF's agents moved its threads (at most 30 s)", body = telvirt_model::api::VnfApplied),
        (status = 400, description = "Malformed YAML or JSON", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Names a host resource not granted to the authority; `errors` names the field", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such VNF visible to the caller", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Changes fields the VNF takes only when created (`needs-recreate`, `errors` names each with why), cores that are not free (`cannot-apply`), or the VNF is locked, being deleted or moving", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body over 1 MiB", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Unsupported content type", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Fields break the descriptor's rules, `metadata.name` is not the path's, or a bad query", body = Problem, content_type = "application/problem+json"),
    ))]
async fn apply_vnf(
    State(s): State<AppState>,
    Authed(caller): Authed,
    Path(name): Path<String>,
    query: Result<axum::extract::Query<ApplyQuery>, axum::extract::rejection::QueryRejection>,
    body: Body,
) -> Result<Response, ApiError> {
    let query = typed_query(query)?;
    let applied = s
        .controller
        .apply_vnf(
            &caller,
            &name,
            &body.bytes,
            body.format,
            query.dry_run.unwrap_or(false),
        )
        .await?;
    Ok(json(StatusCode::OK, &applied))
}

#[utoipa::path(get, path = "/v1/vnfs/{name}", tag = "vnfs", security(("bearer" = [])),
    params(("name" = String, Path, description = "VNF name")),
    responses(
        (status = 200, description = "The VNF", body = Vnf),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such VNF visible to the caller", body = Problem, content_type = "application/problem+json"),
    ))]
async fn show_vnf(
    State(s): State<AppState>,
    Authed(caller): Authed,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    Ok(json(
        StatusCode::OK,
        &s.controller.vnf(&caller, &name).await?,
    ))
}

#[utoipa::path(delete, path = "/v1/vnfs/{name}", tag = "vnfs", security(("bearer" = [])),
    params(("name" = String, Path, description = "VNF name")),
    responses(
        (status = 202, description = "Stopping; removed once stopped", body = Vnf),
        (status = 204, description = "Deleted"),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such VNF visible to the caller", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Already being deleted", body = Problem, content_type = "application/problem+json"),
    ))]
async fn delete_vnf(
    State(s): State<AppState>,
    Authed(caller): Authed,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    Ok(match s.controller.delete(&caller, &name).await? {
        Deletion::Deleted => StatusCode::NO_CONTENT.into_response(),
        Deletion::Pending(vnf) => json(StatusCode::ACCEPTED, &*vnf),
    })
}

#[utoipa::path(get, path = "/v1/vnfs/{name}/events", tag = "vnfs", security(("bearer" = [])),
    params(("name" = String, Path, description = "VNF name")),
    responses(
        (status = 200, description = "Lifecycle events, oldest first", body = [Event]),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such VNF visible to the caller", body = Problem, content_type = "application/problem+json"),
    ))]
async fn vnf_events(
    State(s): State<AppState>,
    Authed(caller): Authed,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    Ok(json(
        StatusCode::OK,
        &s.controller.events(&caller, &name).await?,
    ))
}

macro_rules! vnf_action {
    ($fn:ident, $method:ident, $path:literal, $what:literal) => {
        #[utoipa::path(post, path = $path, tag = "vnfs", security(("bearer" = [])),
            params(("name" = String, Path, description = "VNF name")),
            responses(
                (status = 200, description = $what, body = Vnf),
                (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
                (status = 404, description = "No such VNF visible to the caller", body = Problem, content_type = "application/problem+json"),
                (status = 409, description = "Locked, not locked, or being deleted", body = Problem, content_type = "application/problem+json"),
            ))]
        async fn $fn(
            State(s): State<AppState>,
            Authed(caller): Authed,
            Path(name): Path<String>,
        ) -> Result<Response, ApiError> {
            Ok(json(StatusCode::OK, &s.controller.$method(&caller, &name).await?))
        }
    };
}

vnf_action!(
    start_vnf,
    start,
    "/v1/vnfs/{name}/start",
    "Desired state is now Running"
);
vnf_action!(
    stop_vnf,
    stop,
    "/v1/vnfs/{name}/stop",
    "Desired state is now Stopped"
);
vnf_action!(
    lock_vnf,
    lock,
    "/v1/vnfs/{name}/lock",
    "Locked: paused, refusing changes"
);
vnf_action!(unlock_vnf, unlock, "/v1/vnfs/{name}/unlock", "Unlocked");

#[utoipa::path(post, path = "/v1/vnfs/{name}/migrate", tag = "vnfs", security(("bearer" = [])),
    params(("name" = String, Path, description = "VNF name")),
    request_body(content = MigrateRequest, content_type = "application/json",
        description = "`to`: the destination host (any with room when left out); `cancel: true` ends the move under way"),
    responses(
        (status = 200, description = "The move started (the destination is the VNF's standby placement and `migration` says so) or was cancelled; it ends by itself once the destination runs with the state", body = Vnf),
        (status = 400, description = "Malformed body", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such VNF visible to the caller", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Locked, being deleted, not Running, moving already (or, for a cancel, not moving), or no room", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "A vm VNF or an active-standby pair, or `to` names no host, the VNF's own host, or one that cannot receive state; `errors` names the field", body = Problem, content_type = "application/problem+json"),
    ))]
async fn migrate_vnf(
    State(s): State<AppState>,
    Authed(caller): Authed,
    Path(name): Path<String>,
    body: Body,
) -> Result<Response, ApiError> {
    let req: MigrateRequest =
        telvirt_model::from_text(&body.bytes, body.format).map_err(ControllerError::from)?;
    let vnf = s.controller.migrate(&caller, &name, &req).await?;
    Ok(json(StatusCode::OK, &vnf))
}

#[utoipa::path(post, path = "/v1/vnfs/{name}/devices", tag = "vnfs", security(("bearer" = [])),
    params(("name" = String, Path, description = "VNF name")),
    request_body(content = DeviceGrant, content_type = "application/json",
        description = "The device to grant: an id and a kind (rng, net with tap, serial with name, blk with path)"),
    responses(
        (status = 201, description = "Granted; the agent attaches it to the running VM", body = Vnf),
        (status = 400, description = "Malformed body", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Names a host resource (path, interface, TAP) not granted to the authority; `errors` names the field", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such VNF visible to the caller", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Locked, being deleted, or the id is already granted", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid grant, or a runtime without devices", body = Problem, content_type = "application/problem+json"),
    ))]
async fn attach_device(
    State(s): State<AppState>,
    Authed(caller): Authed,
    Path(name): Path<String>,
    body: Body,
) -> Result<Response, ApiError> {
    let grant: DeviceGrant =
        telvirt_model::from_text(&body.bytes, body.format).map_err(ControllerError::from)?;
    let vnf = s.controller.attach_device(&caller, &name, grant).await?;
    Ok(json(StatusCode::CREATED, &vnf))
}

#[utoipa::path(delete, path = "/v1/vnfs/{name}/devices/{id}", tag = "vnfs", security(("bearer" = [])),
    params(
        ("name" = String, Path, description = "VNF name"),
        ("id" = String, Path, description = "Device id"),
    ),
    responses(
        (status = 200, description = "Revoked; the agent detaches it from the running VM", body = Vnf),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such VNF visible to the caller, or no such device", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Locked or being deleted", body = Problem, content_type = "application/problem+json"),
    ))]
async fn detach_device(
    State(s): State<AppState>,
    Authed(caller): Authed,
    Path((name, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    Ok(json(
        StatusCode::OK,
        &s.controller.detach_device(&caller, &name, &id).await?,
    ))
}

#[utoipa::path(get, path = "/v1/hosts", tag = "hosts", security(("bearer" = [])),
    responses(
        (status = 200, description = "Hosts with their core maps; a cpu held by another authority's VNF or group shows only as in-use (admin sees every name)", body = [HostView]),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
    ))]
async fn list_hosts(
    State(s): State<AppState>,
    Authed(caller): Authed,
) -> Result<Response, ApiError> {
    Ok(json(StatusCode::OK, &s.controller.hosts(&caller).await?))
}

#[utoipa::path(get, path = "/v1/hosts/{name}", tag = "hosts", security(("bearer" = [])),
    params(("name" = String, Path, description = "Host name")),
    responses(
        (status = 200, description = "The host and its core map; a cpu held by another authority's VNF or group shows only as in-use (admin sees every name)", body = HostView),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such host", body = Problem, content_type = "application/problem+json"),
    ))]
async fn show_host(
    State(s): State<AppState>,
    Authed(caller): Authed,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    Ok(json(
        StatusCode::OK,
        &s.controller.host(&caller, &name).await?,
    ))
}

#[utoipa::path(post, path = "/v1/hosts/{name}/cordon", tag = "hosts", security(("bearer" = [])),
    params(("name" = String, Path, description = "Host name")),
    responses(
        (status = 200, description = "Cordoned: nothing new is placed on the host (`schedulable: false`); what it runs stays", body = HostView),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Only admin changes hosts", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such host", body = Problem, content_type = "application/problem+json"),
    ))]
async fn cordon_host(
    State(s): State<AppState>,
    Authed(caller): Authed,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    Ok(json(
        StatusCode::OK,
        &s.controller.cordon(&caller, &name).await?,
    ))
}

#[utoipa::path(post, path = "/v1/hosts/{name}/uncordon", tag = "hosts", security(("bearer" = [])),
    params(("name" = String, Path, description = "Host name")),
    responses(
        (status = 200, description = "Schedulable again", body = HostView),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Only admin changes hosts", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such host", body = Problem, content_type = "application/problem+json"),
    ))]
async fn uncordon_host(
    State(s): State<AppState>,
    Authed(caller): Authed,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    Ok(json(
        StatusCode::OK,
        &s.controller.uncordon(&caller, &name).await?,
    ))
}

#[utoipa::path(post, path = "/v1/hosts/{name}/drain", tag = "hosts", security(("bearer" = [])),
    params(("name" = String, Path, description = "Host name")),
    responses(
        (status = 200, description = "Cordoned, and every VNF placed there moved back to Pending (an event each) to be placed elsewhere, or to wait with the scheduler's reason", body = HostView),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Only admin changes hosts", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such host", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "A VNF kept changing while it was moved; try again", body = Problem, content_type = "application/problem+json"),
    ))]
async fn drain_host(
    State(s): State<AppState>,
    Authed(caller): Authed,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    Ok(json(
        StatusCode::OK,
        &s.controller.drain(&caller, &name).await?,
    ))
}

#[utoipa::path(delete, path = "/v1/hosts/{name}", tag = "hosts", security(("bearer" = [])),
    params(("name" = String, Path, description = "Host name")),
    responses(
        (status = 204, description = "Deleted: record, cordon, heartbeat and its place in the scheduler"),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Only admin changes hosts", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such host", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "VNFs are placed there (drain it first), or its agent still sends heartbeats", body = Problem, content_type = "application/problem+json"),
    ))]
async fn delete_host(
    State(s): State<AppState>,
    Authed(caller): Authed,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    s.controller.delete_host(&caller, &name).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[utoipa::path(post, path = "/v1/hosts/{name}/credential", tag = "hosts", security(("bearer" = [])),
    params(("name" = String, Path, description = "Host name (need not be registered yet)")),
    responses(
        (status = 201, description = "The host's new node credential, shown once; its previous one stops working. An agent (`telvirt agent --token-file`) authenticates with it on `/v1/agent/hosts/{name}/...` only", body = NodeCredential),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Only admin issues node credentials", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Not a host name", body = Problem, content_type = "application/problem+json"),
    ))]
async fn issue_node_credential(
    State(s): State<AppState>,
    Authed(caller): Authed,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    Ok(json(
        StatusCode::CREATED,
        &s.controller.issue_node_credential(&caller, &name).await?,
    ))
}

#[utoipa::path(post, path = "/v1/secrets/replication/rotate", tag = "hosts", security(("bearer" = [])),
    responses(
        (status = 200, description = "The cluster has a new replication secret: every stream between two hosts takes a new key on the connection it holds (the VNFs with a standby are listed)", body = SecretRotation),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Only admin rotates the replication secret", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "A move is under way (its stream would fail part way), or another rotation raced this one: nothing changed", body = Problem, content_type = "application/problem+json"),
    ))]
async fn rotate_replication_secret(
    State(s): State<AppState>,
    Authed(caller): Authed,
) -> Result<Response, ApiError> {
    Ok(json(
        StatusCode::OK,
        &s.controller.rotate_replication_secret(&caller).await?,
    ))
}

#[utoipa::path(get, path = "/v1/hosts/{name}/coremap", tag = "hosts", security(("bearer" = [])),
    params(("name" = String, Path, description = "Host name")),
    responses(
        (status = 200, description = "The core map as text; a cpu held by another authority's VNF or group reads `in use` (admin sees every name)", body = String, content_type = "text/plain"),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such host", body = Problem, content_type = "application/problem+json"),
    ))]
async fn host_core_map(
    State(s): State<AppState>,
    Authed(caller): Authed,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    Ok(s.controller
        .host_core_map(&caller, &name)
        .await?
        .into_response())
}

#[utoipa::path(get, path = "/v1/authorities", tag = "authorities", security(("bearer" = [])),
    responses(
        (status = 200, description = "All authorities (admin) or the caller's own", body = [Authority]),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
    ))]
async fn list_authorities(
    State(s): State<AppState>,
    Authed(caller): Authed,
) -> Result<Response, ApiError> {
    Ok(json(
        StatusCode::OK,
        &s.controller.authorities(&caller).await?,
    ))
}

#[utoipa::path(post, path = "/v1/authorities", tag = "authorities", security(("bearer" = [])),
    request_body(content = CreateAuthority, content_type = "application/json"),
    responses(
        (status = 201, description = "Created; the token is shown only now", body = AuthorityToken),
        (status = 400, description = "Malformed body", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Only admin creates authorities", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The name is taken", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid name, or a security domain the node's policy does not define (the problem lists the valid ones)", body = Problem, content_type = "application/problem+json"),
    ))]
async fn create_authority(
    State(s): State<AppState>,
    Authed(caller): Authed,
    body: Body,
) -> Result<Response, ApiError> {
    let request: CreateAuthority =
        telvirt_model::from_text(&body.bytes, body.format).map_err(ControllerError::from)?;
    let created = s.controller.create_authority(&caller, &request).await?;
    Ok(json(StatusCode::CREATED, &created))
}

#[utoipa::path(post, path = "/v1/authorities/{name}/token", tag = "authorities", security(("bearer" = [])),
    params(("name" = String, Path, description = "Authority name")),
    responses(
        (status = 200, description = "A new token, shown only now; the old one no longer works", body = AuthorityToken),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "An authority rotates only its own token (admin any)", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such authority", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The authority changed meanwhile; try again", body = Problem, content_type = "application/problem+json"),
    ))]
async fn rotate_authority_token(
    State(s): State<AppState>,
    Authed(caller): Authed,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let rotated = s.controller.rotate_authority_token(&caller, &name).await?;
    Ok(json(StatusCode::OK, &rotated))
}

#[utoipa::path(delete, path = "/v1/authorities/{name}", tag = "authorities", security(("bearer" = [])),
    params(("name" = String, Path, description = "Authority name")),
    responses(
        (status = 204, description = "Deleted with its token and grants"),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Only admin deletes authorities", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such authority", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "It still owns VNFs or networks (named), or it is admin", body = Problem, content_type = "application/problem+json"),
    ))]
async fn delete_authority(
    State(s): State<AppState>,
    Authed(caller): Authed,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    s.controller.delete_authority(&caller, &name).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[utoipa::path(get, path = "/metrics", tag = "node", security(("bearer" = [])),
    responses(
        (status = 200, description = "The metrics the caller may see (docs/metrics.md): Prometheus text format 0.0.4, or OpenMetrics when the Accept header asks for application/openmetrics-text", body = String, content_type = "text/plain"),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
    ))]
async fn metrics(
    State(s): State<AppState>,
    Authed(caller): Authed,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    let openmetrics = headers
        .get_all(ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    let scrape = s.controller.scrape(&caller).await?;
    let text = s
        .controller
        .metrics()
        .render(scrape, openmetrics)
        .map_err(|e| {
            ApiError::from(ControllerError::Unavailable(format!(
                "the metrics could not be encoded: {e}"
            )))
        })?;
    let content_type = if openmetrics {
        crate::metrics::OPENMETRICS_CONTENT_TYPE
    } else {
        prometheus_client::encoding::prometheus_text::CONTENT_TYPE
    };
    let mut response = text.into_response();
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    Ok(response)
}

struct BearerScheme;

/// A wasm module's bytes as a request or response body (a binary string, not JSON).
pub(crate) struct WasmBytes;

impl utoipa::PartialSchema for WasmBytes {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, SchemaFormat, Type};
        ObjectBuilder::new()
            .schema_type(Type::String)
            .format(Some(SchemaFormat::KnownFormat(
                utoipa::openapi::KnownFormat::Binary,
            )))
            .into()
    }
}

impl utoipa::ToSchema for WasmBytes {}

impl utoipa::Modify for BearerScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// Documents the 503 every authenticated call answers while the store is unavailable.
struct StoreUnavailable;

impl utoipa::Modify for StoreUnavailable {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
        let response = ResponseBuilder::new()
            .description("The store is unavailable (its disk is full or failing): the call did not complete; the node reopens the store by itself once the disk works again")
            .content(
                PROBLEM_JSON,
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("Problem")))
                    .build(),
            )
            .build();
        for item in openapi.paths.paths.values_mut() {
            for op in [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
            ]
            .into_iter()
            .flatten()
            {
                if op.security.is_some() {
                    op.responses
                        .responses
                        .entry("503".to_owned())
                        .or_insert_with(|| response.clone().into());
                }
            }
        }
    }
}

#[utoipa::path(get, path = "/v1/networks", tag = "networks", security(("bearer" = [])),
    responses(
        (status = 200, description = "The networks the caller may see", body = [telvirt_model::network::Network]),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
    ))]
async fn list_networks(
    State(s): State<AppState>,
    Authed(caller): Authed,
) -> Result<Response, ApiError> {
    Ok(json(StatusCode::OK, &s.controller.networks(&caller).await?))
}

#[utoipa::path(post, path = "/v1/networks", tag = "networks", security(("bearer" = [])),
    request_body(content(
        (telvirt_model::network::NetworkDescriptor = "application/json"),
        (telvirt_model::network::NetworkDescriptor = "application/yaml"),
    ), description = "A network descriptor (kind: Network)"),
    responses(
        (status = 201, description = "Stored; the node's agent wires it", body = telvirt_model::network::Network),
        (status = 400, description = "Malformed YAML or JSON", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Names a host resource (path, interface, TAP) not granted to the authority; `errors` names the field", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The name is taken", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body over 1 MiB", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Unsupported content type", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Fields break the rules (unknown port, port linked twice, ...)", body = Problem, content_type = "application/problem+json"),
    ))]
async fn create_network(
    State(s): State<AppState>,
    Authed(caller): Authed,
    body: Body,
) -> Result<Response, ApiError> {
    let network = s
        .controller
        .create_network(&caller, &body.bytes, body.format)
        .await?;
    Ok(json(StatusCode::CREATED, &network))
}

#[utoipa::path(get, path = "/v1/networks/{name}", tag = "networks", security(("bearer" = [])),
    params(("name" = String, Path, description = "Network name")),
    responses(
        (status = 200, description = "The network with its live links and counters", body = telvirt_model::network::Network),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such network visible to the caller", body = Problem, content_type = "application/problem+json"),
    ))]
async fn show_network(
    State(s): State<AppState>,
    Authed(caller): Authed,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    Ok(json(
        StatusCode::OK,
        &s.controller.network(&caller, &name).await?,
    ))
}

#[utoipa::path(delete, path = "/v1/networks/{name}", tag = "networks", security(("bearer" = [])),
    params(("name" = String, Path, description = "Network name")),
    responses(
        (status = 204, description = "Deleted; its links go, VNFs keep running"),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such network visible to the caller", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Changed meanwhile; try again", body = Problem, content_type = "application/problem+json"),
    ))]
async fn delete_network(
    State(s): State<AppState>,
    Authed(caller): Authed,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    s.controller.delete_network(&caller, &name).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[utoipa::path(put, path = "/v1/networks/{name}", tag = "networks", security(("bearer" = [])),
    params(("name" = String, Path, description = "Network name")),
    request_body(content(
        (telvirt_model::network::NetworkDescriptor = "application/json"),
        (telvirt_model::network::NetworkDescriptor = "application/yaml"),
    ), description = "The network's new descriptor (same metadata.name)"),
    responses(
        (status = 200, description = "Stored; the data plane rewires in place (unchanged links stay up)", body = telvirt_model::network::Network),
        (status = 400, description = "Malformed YAML or JSON", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Names a host resource (path, interface, TAP) not granted to the authority; `errors` names the field", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such network visible to the caller", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Changed meanwhile; try again", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body over 1 MiB", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Unsupported content type", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Fields break the rules", body = Problem, content_type = "application/problem+json"),
    ))]
async fn replace_network(
    State(s): State<AppState>,
    Authed(caller): Authed,
    Path(name): Path<String>,
    body: Body,
) -> Result<Response, ApiError> {
    let network = s
        .controller
        .replace_network(&caller, &name, &body.bytes, body.format)
        .await?;
    Ok(json(StatusCode::OK, &network))
}

#[utoipa::path(put, path = "/v1/networks/{name}/steering/{endpoint}", tag = "networks", security(("bearer" = [])),
    params(
        ("name" = String, Path, description = "Network name"),
        ("endpoint" = String, Path, description = "Steering endpoint of the network"),
    ),
    request_body(content(
        (telvirt_model::network::SteerRequest = "application/json"),
        (telvirt_model::network::SteerRequest = "application/yaml"),
    ), description = "The instance that receives the endpoint's traffic from now on"),
    responses(
        (status = 200, description = "Stored; the data plane switches in one atomic step", body = telvirt_model::network::Network),
        (status = 400, description = "Malformed body", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such network or endpoint visible to the caller", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Changed meanwhile; try again", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Not an instance of the endpoint", body = Problem, content_type = "application/problem+json"),
    ))]
async fn steer_network(
    State(s): State<AppState>,
    Authed(caller): Authed,
    Path((name, endpoint)): Path<(String, String)>,
    body: Body,
) -> Result<Response, ApiError> {
    let req: telvirt_model::network::SteerRequest =
        telvirt_model::from_text(&body.bytes, body.format).map_err(ControllerError::from)?;
    let network = s.controller.steer(&caller, &name, &endpoint, &req).await?;
    Ok(json(StatusCode::OK, &network))
}

#[utoipa::path(post, path = "/v1/networks/{name}/latency", tag = "networks", security(("bearer" = [])),
    params(("name" = String, Path, description = "Network name")),
    request_body(content(
        (telvirt_model::network::LatencyProbe = "application/json"),
        (telvirt_model::network::LatencyProbe = "application/yaml"),
    ), description = "Where to send the probe and how much (every field optional)"),
    responses(
        (status = 200, description = "The probe ran; one-way latency, loss and reordering", body = telvirt_model::network::LatencyReport),
        (status = 400, description = "Malformed body", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such network visible to the caller", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "A field breaks the rules (port not in the network, too long a probe, ...)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The data plane cannot run the probe now", body = Problem, content_type = "application/problem+json"),
    ))]
async fn network_latency(
    State(s): State<AppState>,
    Authed(caller): Authed,
    Path(name): Path<String>,
    body: Body,
) -> Result<Response, ApiError> {
    let probe: telvirt_model::network::LatencyProbe =
        if body.bytes.iter().all(u8::is_ascii_whitespace) {
            telvirt_model::network::LatencyProbe::default()
        } else {
            telvirt_model::from_text(&body.bytes, body.format).map_err(ControllerError::from)?
        };
    let report = s.controller.probe_latency(&caller, &name, &probe).await?;
    Ok(json(StatusCode::OK, &report))
}

/// Media type of a pcapng stream.
pub const PCAPNG: &str = "application/x-pcapng";

#[utoipa::path(post, path = "/v1/networks/{name}/capture", tag = "networks", security(("bearer" = [])),
    params(("name" = String, Path, description = "Network name")),
    request_body(content(
        (telvirt_model::network::CaptureRequest = "application/json"),
        (telvirt_model::network::CaptureRequest = "application/yaml"),
    ), description = "The link, and how many frames for how long"),
    responses(
        (status = 200, description = "The frames as one pcapng stream (one interface: the link), sent while the capture runs; it ends after `packets` frames or `duration_ms`, with a statistics block counting the frames the capture missed", content_type = "application/x-pcapng"),
        (status = 400, description = "Malformed body", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such network visible to the caller", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "No host carries the link now, or it is being captured already", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "A field breaks the rules (no such link, too many packets, ...)", body = Problem, content_type = "application/problem+json"),
    ))]
async fn network_capture(
    State(s): State<AppState>,
    Authed(caller): Authed,
    Path(name): Path<String>,
    body: Body,
) -> Result<Response, ApiError> {
    let req: telvirt_model::network::CaptureRequest =
        telvirt_model::from_text(&body.bytes, body.format).map_err(ControllerError::from)?;
    let (head, rest) = s.controller.start_capture(&caller, &name, &req).await?;
    let first = futures_util::stream::once(std::future::ready(Ok::<_, ControllerError>(
        Bytes::from(head),
    )));
    let rest = futures_util::stream::unfold(rest, |mut stream| async move {
        let next = stream.next_bytes().await?;
        Some((next.map(Bytes::from), stream))
    });
    let mut response =
        axum::body::Body::from_stream(futures_util::StreamExt::chain(first, rest)).into_response();
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(PCAPNG));
    Ok(response)
}

#[utoipa::path(post, path = "/v1/vnfs/{name}/upgrade", tag = "vnfs", security(("bearer" = [])),
    params(("name" = String, Path, description = "VNF name")),
    request_body(content(
        (crate::upgrade::UpgradeRequest = "application/json"),
        (crate::upgrade::UpgradeRequest = "application/yaml"),
    ), description = "The new module"),
    responses(
        (status = 200, description = "The new module runs; maps kept", body = Vnf),
        (status = 400, description = "Malformed body", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Names a host resource (path, interface, TAP) not granted to the authority; `errors` names the field", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such VNF visible to the caller", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Locked, or not Running", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "The module was refused (verifier, map layout, init); the old one keeps running", body = Problem, content_type = "application/problem+json"),
    ))]
async fn upgrade_vnf(
    State(s): State<AppState>,
    Authed(caller): Authed,
    Path(name): Path<String>,
    body: Body,
) -> Result<Response, ApiError> {
    let vnf = s
        .controller
        .upgrade_module(&caller, &name, &body.bytes, body.format)
        .await?;
    Ok(json(StatusCode::OK, &vnf))
}

#[utoipa::path(get, path = "/v1/vnfs/{name}/maps", tag = "vnfs", security(("bearer" = [])),
    params(("name" = String, Path, description = "VNF name")),
    responses(
        (status = 200, description = "The maps of the running wasm instance, with their entry counts", body = [MapView]),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such VNF visible to the caller", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Not a wasm VNF, or not Running or Locked", body = Problem, content_type = "application/problem+json"),
    ))]
async fn vnf_maps(
    State(s): State<AppState>,
    Authed(caller): Authed,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    Ok(json(
        StatusCode::OK,
        &s.controller.vnf_maps(&caller, &name).await?,
    ))
}

#[utoipa::path(post, path = "/v1/vnfs/{name}/maps/{map}/entries", tag = "vnfs", security(("bearer" = [])),
    params(("name" = String, Path, description = "VNF name"), ("map" = String, Path, description = "The map's name")),
    request_body(content = MapChangeRequest, content_type = "application/json",
        description = "`delete`: keys (hex) to remove; `put`: entries (hex key and value, of the map's sizes) to insert or replace; at most 65,536 in all, 8 MiB"),
    responses(
        (status = 200, description = "Applied between two batches, all of it; what it did and the map's entries now. A standby (or a move's destination) follows through the update log", body = MapChangeResult),
        (status = 400, description = "Malformed body", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such VNF visible to the caller", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Not a wasm VNF, not Running, locked or moving", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "A body over 8 MiB", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "A body that is not JSON (YAML is refused here: its aliases could expand it past the bounds)", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Nothing named, too many keys and entries, bad hex, no such map, a key or value not of the map's size, an array index past its end, or more entries than a hash map's max_entries; `errors` names the field. Nothing changed", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The agent of the VNF's host did not answer", body = Problem, content_type = "application/problem+json"),
    ))]
async fn change_vnf_map(
    State(s): State<AppState>,
    Authed(caller): Authed,
    Path((name, map)): Path<(String, String)>,
    body: Body,
) -> Result<Response, ApiError> {
    // JSON only: YAML's aliases could make a body within its bounds expand far past them.
    if body.format != Format::Json {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            "a map change is taken as application/json only",
        ));
    }
    let req: MapChangeRequest =
        telvirt_model::from_text(&body.bytes, body.format).map_err(ControllerError::from)?;
    Ok(json(
        StatusCode::OK,
        &s.controller.change_map(&caller, &name, &map, req).await?,
    ))
}

#[utoipa::path(get, path = "/v1/vnfs/{name}/console", tag = "vnfs", security(("bearer" = [])),
    params(("name" = String, Path, description = "VNF name"), crate::console::ConsoleQuery),
    responses(
        (status = 200, description = "The last lines of the vm VNF's serial console, oldest first, read on the host it runs on", body = Vec<String>),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such VNF (or not the caller's)", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Not a vm VNF, placed nowhere yet, or its host could not read the console", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`lines` out of range (1 to 10000) or an unknown parameter", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The agent of the VNF's host did not answer", body = Problem, content_type = "application/problem+json"),
    ))]
async fn vnf_console(
    State(s): State<AppState>,
    Authed(caller): Authed,
    Path(name): Path<String>,
    query: Result<
        axum::extract::Query<crate::console::ConsoleQuery>,
        axum::extract::rejection::QueryRejection,
    >,
) -> Result<Response, ApiError> {
    let query = typed_query(query)?;
    Ok(json(
        StatusCode::OK,
        &s.controller.vnf_console(&caller, &name, &query).await?,
    ))
}

/// A route's typed query, or 422 naming `query` with what was wrong (an unknown parameter, a
/// value of the wrong type).
fn typed_query<T>(
    query: Result<axum::extract::Query<T>, axum::extract::rejection::QueryRejection>,
) -> Result<T, ApiError> {
    query.map(|q| q.0).map_err(|e| {
        ApiError::from(ControllerError::Invalid(FieldError::new(
            "query",
            e.body_text(),
        )))
    })
}

/// The query of `GET /v1/vnfs/{name}/logs`.
#[derive(Debug, Default, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct LogsQuery {
    /// Only lines with a `seq` above this (the last one seen; default 0: every kept line).
    pub after: Option<u64>,
}

#[utoipa::path(get, path = "/v1/vnfs/{name}/logs", tag = "vnfs", security(("bearer" = [])),
    params(("name" = String, Path, description = "VNF name"), LogsQuery),
    responses(
        (status = 200, description = "The module's newest log lines (at most 64 kept), oldest first", body = telvirt_model::api::VnfLogs),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such VNF visible to the caller", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Not a wasm VNF (a vm VNF's console: /console), or not Running or Locked", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`after` not a number, or an unknown parameter", body = Problem, content_type = "application/problem+json"),
    ))]
async fn vnf_logs(
    State(s): State<AppState>,
    Authed(caller): Authed,
    Path(name): Path<String>,
    query: Result<axum::extract::Query<LogsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let query = typed_query(query)?;
    let after = query.after.unwrap_or(0);
    Ok(json(
        StatusCode::OK,
        &s.controller.vnf_logs(&caller, &name, after).await?,
    ))
}

#[utoipa::path(get, path = "/v1/vnfs/{name}/stats", tag = "vnfs", security(("bearer" = [])),
    params(("name" = String, Path, description = "VNF name")),
    responses(
        (status = 200, description = "The running instance's counters: a wasm VNF's runtime and module counters, or a vm VNF's NIC counters (`nics`)", body = telvirt_model::api::VnfStatsView),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such VNF visible to the caller", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Not Running or Locked", body = Problem, content_type = "application/problem+json"),
    ))]
async fn vnf_stats(
    State(s): State<AppState>,
    Authed(caller): Authed,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    Ok(json(
        StatusCode::OK,
        &s.controller.vnf_stats(&caller, &name).await?,
    ))
}

#[utoipa::path(get, path = "/v1/authorities/{name}/grants", tag = "authorities", security(("bearer" = [])),
    params(("name" = String, Path, description = "Authority name")),
    responses(
        (status = 200, description = "The host resources granted to the authority", body = HostGrants),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such authority visible to the caller (an authority sees only its own)", body = Problem, content_type = "application/problem+json"),
    ))]
async fn show_grants(
    State(s): State<AppState>,
    Authed(caller): Authed,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    Ok(json(
        StatusCode::OK,
        &s.controller.grants(&caller, &name).await?,
    ))
}

#[utoipa::path(post, path = "/v1/authorities/{name}/grants", tag = "authorities", security(("bearer" = [])),
    params(("name" = String, Path, description = "Authority name")),
    request_body(content = HostGrants, content_type = "application/json",
        description = "Host paths (a trailing / grants a directory), interfaces and TAPs (a trailing * grants a prefix) to add"),
    responses(
        (status = 200, description = "Granted; the authority's grants now", body = HostGrants),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Only admin grants", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such authority", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "An entry breaks the rules (relative path, `..`, bad interface name)", body = Problem, content_type = "application/problem+json"),
    ))]
async fn add_grants(
    State(s): State<AppState>,
    Authed(caller): Authed,
    Path(name): Path<String>,
    body: Body,
) -> Result<Response, ApiError> {
    let more: HostGrants =
        telvirt_model::from_text(&body.bytes, body.format).map_err(ControllerError::from)?;
    Ok(json(
        StatusCode::OK,
        &s.controller.grant(&caller, &name, &more).await?,
    ))
}

#[utoipa::path(delete, path = "/v1/authorities/{name}/grants", tag = "authorities", security(("bearer" = [])),
    params(("name" = String, Path, description = "Authority name")),
    request_body(content = HostGrants, content_type = "application/json", description = "The entries to revoke"),
    responses(
        (status = 200, description = "Revoked; the authority's grants now", body = HostGrants),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Only admin revokes", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such authority, or an entry it does not hold", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "A VNF or network of the authority uses the resource", body = Problem, content_type = "application/problem+json"),
    ))]
async fn revoke_grants(
    State(s): State<AppState>,
    Authed(caller): Authed,
    Path(name): Path<String>,
    body: Body,
) -> Result<Response, ApiError> {
    let less: HostGrants =
        telvirt_model::from_text(&body.bytes, body.format).map_err(ControllerError::from)?;
    Ok(json(
        StatusCode::OK,
        &s.controller.revoke(&caller, &name, &less).await?,
    ))
}

#[utoipa::path(get, path = "/v1/modules", tag = "modules", security(("bearer" = [])),
    responses(
        (status = 200, description = "The modules the caller uploaded (admin: all)", body = [ModuleView]),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
    ))]
async fn list_modules(
    State(s): State<AppState>,
    Authed(caller): Authed,
) -> Result<Response, ApiError> {
    Ok(json(StatusCode::OK, &s.controller.modules(&caller).await?))
}

#[utoipa::path(post, path = "/v1/modules", tag = "modules", security(("bearer" = [])),
    request_body(content = WasmBytes, content_type = "application/wasm", description = "The module's bytes (at most 16 MiB)"),
    responses(
        (status = 201, description = "Verified and kept; descriptors name it by `reference`", body = ModuleView),
        (status = 200, description = "The caller had uploaded it already", body = ModuleView),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The uploader's grants, token or standing changed while the upload was checked (send it again), or its index kept changing; nothing is kept", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Over 16 MiB", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Refused by the verifier; `errors` lists every reason", body = Problem, content_type = "application/problem+json"),
    ))]
async fn upload_module(
    State(s): State<AppState>,
    Authed(caller): Authed,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (module, new) = s.controller.upload_module(&caller, body.to_vec()).await?;
    let status = if new {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(json(status, &module))
}

#[utoipa::path(get, path = "/v1/modules/{sha256}", tag = "modules", security(("bearer" = [])),
    params(("sha256" = String, Path, description = "Hex SHA-256 of the module")),
    responses(
        (status = 200, description = "The module", body = ModuleView),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Not uploaded by the caller", body = Problem, content_type = "application/problem+json"),
    ))]
async fn show_module(
    State(s): State<AppState>,
    Authed(caller): Authed,
    Path(sha256): Path<String>,
) -> Result<Response, ApiError> {
    Ok(json(
        StatusCode::OK,
        &s.controller.module(&caller, &sha256).await?,
    ))
}

#[utoipa::path(delete, path = "/v1/modules/{sha256}", tag = "modules", security(("bearer" = [])),
    params(("sha256" = String, Path, description = "Hex SHA-256 of the module")),
    responses(
        (status = 204, description = "Forgotten (the bytes go when no authority keeps the module)"),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Not uploaded by the caller", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "A VNF runs it", body = Problem, content_type = "application/problem+json"),
    ))]
async fn delete_module(
    State(s): State<AppState>,
    Authed(caller): Authed,
    Path(sha256): Path<String>,
) -> Result<Response, ApiError> {
    s.controller.delete_module(&caller, &sha256).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(OpenApi)]
#[openapi(
    info(title = "telvirt", description = "NFV platform API: VNFs, hosts, authorities."),
    paths(
        healthz, readyz, openapi, vnf_schema, list_vnfs, watch_vnfs, create_vnf, apply_vnf, show_vnf, delete_vnf, vnf_events,
        start_vnf, stop_vnf, lock_vnf, unlock_vnf, attach_device, detach_device, migrate_vnf, list_hosts,
        show_host, host_core_map, issue_node_credential, rotate_replication_secret, cordon_host, uncordon_host, drain_host, delete_host,
        list_authorities, create_authority, rotate_authority_token, delete_authority, metrics, list_networks, create_network,
        show_network, delete_network, replace_network, steer_network, network_latency, network_capture,
        upgrade_vnf, vnf_maps, change_vnf_map, vnf_stats, vnf_logs, vnf_console, show_grants, add_grants, revoke_grants,
        list_modules, upload_module, show_module, delete_module,
        agent_api::register, agent_api::heartbeat, agent_api::assignments, agent_api::changes,
        agent_api::networks, agent_api::network_changes, agent_api::observe, agent_api::calls,
        agent_api::reply, agent_api::module
    ),
    tags((name = "agent", description = "The agent protocol (ADR 047): what a host's agent calls with its node credential (`telvirt host credential`); an authority's token is refused here, as a node credential is on every other route.")),
    modifiers(&BearerScheme, &StoreUnavailable)
)]
struct ApiDoc;

/// The OpenAPI 3.1 document of this API.
pub fn openapi_document() -> serde_json::Value {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_owned();
    serde_json::to_value(doc).unwrap_or_default()
}

/// A standalone JSON Schema (2020-12) of the VNF descriptor, built from the OpenAPI components.
pub fn descriptor_schema() -> serde_json::Value {
    let doc = openapi_document();
    let defs = doc
        .pointer("/components/schemas")
        .cloned()
        .unwrap_or_default();
    let text = serde_json::to_string(&defs)
        .unwrap_or_default()
        .replace("#/components/schemas/", "#/$defs/");
    let defs: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    serde_json::json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "urn:telvirt:schema:vnf:v1",
        "title": "telvirt VNF descriptor (telvirt/v1)",
        "$ref": "#/$defs/VnfDescriptor",
        "$defs": defs,
    })
}
