//! `telvirt controller --store etcd://…`: one of several controllers sharing an etcd store.
//!
//! Owns the process around the election: the API listener bound at once, campaigning for the
//! leader key, starting the controller on a fenced store once elected (scheduler and host
//! liveness run on the leader only), and, while following, forwarding every request to the
//! leader's API unchanged, so authorities, the CLI and agents may use any controller. A leader
//! that cannot renew its key exits: it must not act beside a new leader (its writes are fenced
//! meanwhile). It must not hold control-plane logic: the controller does.

use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{Context, Result};
use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderName, StatusCode, header};
use axum::response::{IntoResponse, Response};
use telvirt_controller::ControllerError;
use telvirt_controller::http::ApiError;
use telvirt_controller::leader::{Election, FencedStore, LeaderRecord};
use telvirt_runtime_wasm::SecurityPolicy;
use telvirt_store::{EtcdStore, Store};
use tower::ServiceExt;

use crate::cli::ControlArgs;

/// Largest request body forwarded to the leader (a module upload is at most 16 MiB).
const MAX_FORWARDED_BODY: usize = 32 << 20;
/// Where a controller says who leads (answered by every controller itself).
const LEADER_PATH: &str = "/v1/leader";

/// What this controller does with a request now.
#[derive(Clone)]
enum Role {
    /// Not leading: forward to whoever leads.
    Following,
    /// Leading: the controller's API.
    Leading(Router),
}

#[derive(Clone)]
struct Dispatch {
    role: Arc<RwLock<Role>>,
    store: Arc<dyn Store>,
    me: LeaderRecord,
    http: reqwest::Client,
}

impl Dispatch {
    fn role(&self) -> Role {
        self.role.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Refuses an `--advertise` URL that would send tokens where this controller's own transport
/// would not: `https://` with TLS, and plain `http://` only to a loopback address with
/// `--plain-http` (the others forward every request, bearer token included, to it).
fn check_advertise(advertise: &str, tls: bool) -> Result<()> {
    let url = reqwest::Url::parse(advertise).map_err(|e| {
        anyhow::anyhow!("--advertise {advertise}: not a URL ({e}); e.g. https://10.0.0.1:7070")
    })?;
    match (url.scheme(), tls) {
        ("https", true) => Ok(()),
        ("http", false) => {
            let host = url.host_str().unwrap_or("");
            let loopback = host == "localhost"
                || host
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback());
            if loopback {
                Ok(())
            } else {
                anyhow::bail!(
                    "--advertise {advertise}: with --plain-http this controller is reached over loopback only; give http://127.0.0.1:PORT"
                )
            }
        }
        (scheme, true) => anyhow::bail!(
            "--advertise {advertise}: this controller serves TLS, so the others must reach it over https://, not {scheme}://"
        ),
        (scheme, false) => anyhow::bail!(
            "--advertise {advertise}: with --plain-http this controller serves http://, not {scheme}://"
        ),
    }
}

/// Runs one controller of a cluster until SIGTERM or Ctrl-C (a leader resigns then, so the next
/// leads at once).
pub async fn run(
    control: &ControlArgs,
    data_dir: &Path,
    policy: SecurityPolicy,
    endpoints: &[String],
    namespace: &str,
) -> Result<()> {
    let tls = crate::tls::server_identity(&control.tls, data_dir, control.listen)?;
    if let Some(advertise) = &control.advertise {
        check_advertise(advertise, tls.is_some())?;
    }
    if tls.is_some() && control.tls.tls_cert.is_none() {
        tracing::warn!(
            "this controller generated its own certificate: the other controllers of the cluster forward to it only \
             if they trust it too (give every controller one certificate, or certificates of one CA with --tls-ca)"
        );
    }
    let store: Arc<dyn Store> = Arc::new(
        EtcdStore::connect(endpoints, namespace)
            .await
            .context("connecting to the etcd store")?,
    );
    let listener = tokio::net::TcpListener::bind(control.listen)
        .await
        .with_context(|| format!("cannot listen on {}", control.listen))?;
    let address = listener.local_addr()?;
    let api = control
        .advertise
        .clone()
        .unwrap_or_else(|| crate::serve::api_url(tls.is_some(), address));
    let anchor = tls.as_ref().map(|t| t.anchor_pem.clone());
    let me = LeaderRecord {
        id: format!("{}-{}", crate::agent::hostname(), std::process::id()),
        api: api.trim_end_matches('/').to_owned(),
    };
    let ttl = Duration::from_millis(control.leader_ttl_ms);
    let election = Arc::new(Election::new(Arc::clone(&store), me.clone(), ttl));
    let dispatch = Dispatch {
        role: Arc::new(RwLock::new(Role::Following)),
        store: Arc::clone(&store),
        me: me.clone(),
        // The leader is another controller of this cluster: its certificate chains to the
        // anchor this one gives its clients (one certificate or one CA for all of them).
        http: crate::tls::http_client(anchor.as_deref())?
            .https_only(tls.is_some())
            .connect_timeout(Duration::from_secs(2))
            .build()
            .context("building the forwarding client")?,
    };
    let app = Router::new()
        .route(LEADER_PATH, axum::routing::get(leader_info))
        .fallback(dispatch_request)
        .with_state(dispatch.clone());
    tracing::info!(
        "telvirt controller {} on {api}: campaigning for leadership in etcd at {} (following meanwhile; {})",
        me.id,
        endpoints.join(","),
        crate::serve::protection(tls.as_ref())
    );

    let (held_tx, held_rx) = tokio::sync::watch::channel(None);
    let leading = {
        let (election, dispatch, control) =
            (Arc::clone(&election), dispatch.clone(), control.clone());
        let data_dir = data_dir.to_owned();
        tokio::spawn(async move {
            let held = election.campaign().await;
            let _ = held_tx.send(Some(held));
            let fenced: Arc<dyn Store> = Arc::new(FencedStore::new(Arc::clone(&store), held));
            match crate::serve::start_controller(
                fenced,
                &control,
                &data_dir,
                &policy,
                address,
                anchor.as_deref(),
            )
            .await
            {
                Ok((controller, _)) => {
                    *dispatch.role.write().unwrap_or_else(|p| p.into_inner()) =
                        Role::Leading(telvirt_controller::router(controller));
                    tracing::info!("controller {} leads", election.me().id);
                }
                Err(e) => {
                    tracing::error!("elected, but the controller did not start: {e:#}");
                    election.resign(held).await;
                    std::process::exit(1);
                }
            }
            let lost = election.hold(held).await;
            tracing::error!("leadership lost ({lost}); exiting so no two leaders act");
            std::process::exit(1);
        })
    };

    crate::tls::serve(
        listener,
        tls.map(|t| t.config),
        app,
        crate::serve::shutdown_signal(),
    )
    .await
    .context("serving the API")?;
    leading.abort();
    if let Some(held) = *held_rx.borrow() {
        election.resign(held).await;
        tracing::info!("resigned leadership");
    }
    tracing::info!("telvirt controller stopped");
    Ok(())
}

/// `GET /v1/leader`: who leads, and what this controller is.
async fn leader_info(State(d): State<Dispatch>) -> Response {
    let leader = telvirt_controller::leader::read_leader(d.store.as_ref()).await;
    let role = match d.role() {
        Role::Leading(_) => "leader",
        Role::Following => "follower",
    };
    match leader {
        Ok(leader) => (
            StatusCode::OK,
            axum::Json(serde_json::json!({ "self": d.me, "role": role, "leader": leader })),
        )
            .into_response(),
        Err(e) => unavailable(&format!("reading the leader from the store: {e}")),
    }
}

async fn dispatch_request(State(d): State<Dispatch>, request: Request) -> Response {
    match d.role() {
        Role::Leading(router) => match router.oneshot(request).await {
            Ok(response) => response,
            Err(never) => match never {},
        },
        Role::Following => forward(&d, request).await,
    }
}

/// Sends `request` to the leader's API and answers what it answered.
async fn forward(d: &Dispatch, request: Request) -> Response {
    let leader = match telvirt_controller::leader::read_leader(d.store.as_ref()).await {
        Ok(Some(l)) if l.id != d.me.id => l,
        Ok(Some(_)) => {
            return unavailable("this controller was just elected and is starting; retry");
        }
        Ok(None) => {
            return unavailable("no controller leads yet (an election is under way); retry");
        }
        Err(e) => return unavailable(&format!("reading the leader from the store: {e}")),
    };
    let (parts, body) = request.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let bytes = match axum::body::to_bytes(body, MAX_FORWARDED_BODY).await {
        Ok(b) => b,
        Err(e) => {
            return (
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body not forwarded: {e}"),
            )
                .into_response();
        }
    };
    let mut out = d
        .http
        .request(parts.method, format!("{}{path}", leader.api))
        .body(bytes);
    for (name, value) in &parts.headers {
        if !hop_by_hop(name) {
            out = out.header(name, value);
        }
    }
    let answer = match out.send().await {
        Ok(a) => a,
        Err(e) => {
            return unavailable(&format!(
                "the leader {} at {} did not answer: {e}",
                leader.id, leader.api
            ));
        }
    };
    let status = answer.status();
    let headers = answer.headers().clone();
    let body = match answer.bytes().await {
        Ok(b) => b,
        Err(e) => return unavailable(&format!("reading the leader's answer: {e}")),
    };
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    for (name, value) in &headers {
        if !hop_by_hop(name) {
            response.headers_mut().append(name, value.clone());
        }
    }
    response
}

/// Headers that belong to one connection, not to the request or answer forwarded.
fn hop_by_hop(name: &HeaderName) -> bool {
    [
        header::HOST,
        header::CONNECTION,
        header::CONTENT_LENGTH,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::TE,
        header::TRAILER,
    ]
    .contains(name)
        || name.as_str() == "keep-alive"
        || name.as_str() == "proxy-connection"
}

/// A 503 problem in the API's format.
fn unavailable(detail: &str) -> Response {
    ApiError::from(ControllerError::Unavailable(detail.to_owned())).into_response()
}

#[cfg(test)]
mod tests {
    use super::check_advertise;

    #[test]
    fn advertise_matches_the_transport() {
        assert!(check_advertise("https://10.0.0.1:7070", true).is_ok());
        assert!(check_advertise("http://127.0.0.1:7070", false).is_ok());
        assert!(check_advertise("http://[::1]:7070", false).is_ok());
        for (url, tls, needle) in [
            ("http://10.0.0.1:7070", true, "over https://"),
            ("http://10.0.0.1:7070", false, "loopback only"),
            ("https://127.0.0.1:7070", false, "serves http://"),
            ("10.0.0.1:7070", true, "https://"),
            ("not a url", true, "not a URL"),
        ] {
            let err = check_advertise(url, tls).unwrap_err().to_string();
            assert!(err.contains(needle), "{url}: {err}");
        }
    }
}
