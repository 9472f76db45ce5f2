//! Keeps this host's data plane on the networks the controller sends it.
//!
//! Owns fetching the host's [`telvirt_api::NetworkSet`] through the [`ControlLink`] when its
//! revision moves (a long-poll, so an idle host asks nothing), and applying the last set to the
//! [`NetworkReconciler`] at once and every [`NETWORK_RESYNC`] (a VNF that started or restarted
//! gets its links within that time, without asking the controller). It must not decide which
//! networks a host holds (the controller does) nor how they are wired (the reconciler does).

use std::sync::Arc;
use std::time::Duration;

use telvirt_api::{ControlLink, NetworkSpan};
use telvirt_model::network::NetworkDescriptor;
use tokio::sync::watch;

use crate::network::NetworkReconciler;

/// How often the last networks are applied again when nothing changed.
pub const NETWORK_RESYNC: Duration = Duration::from_millis(500);
/// How long one wait for a network change lasts before it asks again.
const CHANGE_WAIT: Duration = Duration::from_secs(25);
/// Wait after a failed call (controller unreachable) before the next.
const RETRY: Duration = Duration::from_secs(1);

/// Applies `host`'s networks from `link` to `reconciler` until `shutdown` turns true.
pub async fn network_loop(
    host: String,
    link: Arc<dyn ControlLink>,
    reconciler: Arc<NetworkReconciler>,
    mut shutdown: watch::Receiver<bool>,
) {
    // The revision the controller last reported, fed by a waiter so the resync timer never
    // cuts a long-poll short.
    let (seen_tx, mut seen) = watch::channel(None::<u64>);
    let waiter = {
        let (host, link, mut shutdown) = (host.clone(), Arc::clone(&link), shutdown.clone());
        tokio::spawn(async move {
            let mut after = 0;
            loop {
                let waited = tokio::select! {
                    r = link.wait_for_networks(&host, after, CHANGE_WAIT) => r,
                    _ = shutdown.changed() => return,
                };
                match waited {
                    Ok(revision) => {
                        after = revision;
                        seen_tx.send_replace(Some(revision));
                    }
                    Err(e) => {
                        tracing::warn!(host = %host, "watching networks failed: {e}");
                        tokio::select! {
                            _ = tokio::time::sleep(RETRY) => {}
                            _ = shutdown.changed() => return,
                        }
                    }
                }
            }
        })
    };
    let mut wanted: Arc<(Vec<NetworkDescriptor>, Vec<NetworkSpan>)> =
        Arc::new((Vec::new(), Vec::new()));
    let mut fetched: Option<u64> = None;
    loop {
        let latest = *seen.borrow_and_update();
        // Fetch at start, and whenever the revision moved past what was fetched.
        if fetched.is_none() || (latest.is_some() && latest != fetched) {
            match link.networks(&host).await {
                Ok(set) => {
                    fetched = Some(set.revision);
                    wanted = Arc::new((set.networks, set.spans));
                }
                Err(e) => tracing::warn!(host = %host, "reading networks failed: {e}"),
            }
        }
        let (r, w) = (Arc::clone(&reconciler), Arc::clone(&wanted));
        if let Err(e) = tokio::task::spawn_blocking(move || r.sync_spans(&w.0, &w.1)).await {
            tracing::warn!(host = %host, "network pass failed: {e}");
        }
        tokio::select! {
            _ = seen.changed() => {}
            _ = tokio::time::sleep(NETWORK_RESYNC) => {}
            _ = shutdown.changed() => {}
        }
        if *shutdown.borrow() {
            break;
        }
    }
    waiter.abort();
}
