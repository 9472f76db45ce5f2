//! The agent's side of node calls, and the uploaded modules it fetches from its controller.
//!
//! Owns taking the calls the controller routes to this host (maps, counters, module upgrades),
//! running each through a [`NodeHandler`] off the async threads, and replying; and keeping a
//! local copy of each uploaded module this host runs (checked against its digest before it is
//! kept). It must not decide whether a call is allowed: the controller checked that before
//! routing it here.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use telvirt_api::{ControlLink, NodeCall, NodeReply, NodeRequest};
use telvirt_runtime_wasm as rw;
use tokio::sync::watch;

use crate::AgentError;

/// What answers node calls on this host (the binary implements it over the wasm runtime).
/// Called off the async threads: it may block (an upgrade compiles a module).
pub trait NodeHandler: Send + Sync + 'static {
    fn handle(&self, request: &NodeRequest) -> NodeReply;
}

/// How long one poll for calls waits before it asks again.
const POLL_WAIT: Duration = Duration::from_secs(25);
/// Wait after a failed poll (controller unreachable) before the next.
const POLL_RETRY: Duration = Duration::from_secs(1);

/// Where the uploaded modules this host runs are kept, as `<sha256>.wasm` (the wasm runtime's
/// module directory).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleCache {
    dir: PathBuf,
}

impl ModuleCache {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Makes module `reference` present when it is an uploaded one (`sha256:<hex>`): kept
    /// already with the right digest, or fetched from the controller through `link`, checked
    /// (size, digest) and written whole. A path reference, or a link that serves no modules
    /// (the all-in-one node reads the controller's directory), leaves nothing to do.
    pub async fn ensure(
        &self,
        link: &dyn ControlLink,
        host: &str,
        reference: &str,
    ) -> Result<(), AgentError> {
        let Some(digest) = telvirt_model::module_digest(reference) else {
            return Ok(());
        };
        let path = self.dir.join(format!("{digest}.wasm"));
        let kept = path.clone();
        let digest_owned = digest.to_owned();
        let present = tokio::task::spawn_blocking(move || {
            rw::read_module_file(&kept, rw::MAX_MODULE_BYTES)
                .is_ok_and(|b| rw::verify::hex(&rw::verify::module_hash(&b)) == digest_owned)
        })
        .await
        .unwrap_or(false);
        if present {
            return Ok(());
        }
        let Some(bytes) = link.module(host, digest).await? else {
            return Ok(());
        };
        if u64::try_from(bytes.len()).unwrap_or(u64::MAX) > rw::MAX_MODULE_BYTES {
            return Err(AgentError::Link(format!(
                "the controller sent {} bytes for module {reference}, more than the {} a module may have",
                bytes.len(),
                rw::MAX_MODULE_BYTES
            )));
        }
        if rw::verify::hex(&rw::verify::module_hash(&bytes)) != digest {
            return Err(AgentError::Link(format!(
                "the controller sent bytes for module {reference} that do not hash to it"
            )));
        }
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&dir)?;
            telvirt_files::write_atomic(&path, &bytes)
        })
        .await
        .map_err(|e| AgentError::Link(format!("keeping module {reference}: {e}")))?
        .map_err(|e| AgentError::Link(format!("keeping module {reference}: {e}")))
    }
}

/// Takes this host's node calls through `link` and answers each through `handler` until
/// `shutdown` turns true. Calls run concurrently; an upgrade's module is fetched first.
pub async fn node_call_loop(
    host: String,
    link: Arc<dyn ControlLink>,
    handler: Arc<dyn NodeHandler>,
    modules: Option<ModuleCache>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let calls = tokio::select! {
            calls = link.next_calls(&host, POLL_WAIT) => calls,
            _ = shutdown.changed() => return,
        };
        if *shutdown.borrow() {
            return;
        }
        match calls {
            Ok(calls) => {
                for call in calls {
                    let (host, link, handler, modules) = (
                        host.clone(),
                        Arc::clone(&link),
                        Arc::clone(&handler),
                        modules.clone(),
                    );
                    tokio::spawn(async move {
                        answer(&host, link.as_ref(), handler, modules.as_ref(), call).await;
                    });
                }
            }
            Err(e) => {
                tracing::warn!(host = %host, "taking node calls failed: {e}");
                tokio::select! {
                    _ = tokio::time::sleep(POLL_RETRY) => {}
                    _ = shutdown.changed() => return,
                }
            }
        }
    }
}

async fn answer(
    host: &str,
    link: &dyn ControlLink,
    handler: Arc<dyn NodeHandler>,
    modules: Option<&ModuleCache>,
    call: NodeCall,
) {
    let NodeCall { id, request } = call;
    let fetched = match (&request, modules) {
        (NodeRequest::Upgrade { module, .. }, Some(cache)) => {
            cache.ensure(link, host, module).await
        }
        _ => Ok(()),
    };
    let reply = match fetched {
        Err(e) => NodeReply::Failed {
            reason: e.to_string(),
        },
        Ok(()) => tokio::task::spawn_blocking(move || handler.handle(&request))
            .await
            .unwrap_or_else(|e| NodeReply::Failed {
                reason: format!("the node's handler failed: {e}"),
            }),
    };
    if let Err(e) = link.reply(host, id, reply).await {
        tracing::warn!(host = %host, call = id, "replying to a node call failed: {e}");
    }
}
