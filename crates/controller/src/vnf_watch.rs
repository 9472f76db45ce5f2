//! Watching VNFs: the VNFs an authority may see that match a label selector, then every change
//! to them, as [`VnfWatchEvent`]s (what `GET /v1/watch/vnfs` streams and `vnf list -w` prints).
//!
//! Owns turning the store's watch of the VNF records into that authority's view: visibility and
//! the selector applied to every change, a VNF that leaves the view told as deleted, a lagging
//! or reconnected store watch answered by listing again and telling only the difference. It
//! must not write anything, and it holds at most [`MAX_WATCHES`] watches at once, each keeping
//! only a name and a revision per VNF shown.

use std::collections::HashMap;
use std::sync::Arc;

use telvirt_model::Name;
use telvirt_model::api::{VnfWatchEvent, VnfWatchKind};
use telvirt_store::{Store, WatchEvent};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use crate::listing::Selector;
use crate::records::{self, VnfRecord};
use crate::service::{Caller, Controller, ControllerError, decode};

/// Watches open at once on one controller; one more is refused (503) until one ends.
pub const MAX_WATCHES: usize = 64;

/// Messages a watch may have waiting for a slow reader; beyond them the watch waits (and the
/// store watch behind it lags, which ends in a list-again).
const BACKLOG: usize = 256;

/// The watches open now.
pub(crate) fn watch_slots() -> Arc<Semaphore> {
    Arc::new(Semaphore::new(MAX_WATCHES))
}

impl Controller {
    /// The VNFs `caller` may see that match `selector` (`ADDED` each, then `SYNCED`), then each
    /// change to them, until the receiver is dropped. Refused (503) while [`MAX_WATCHES`] are
    /// open.
    pub async fn watch_vnfs(
        &self,
        caller: Caller,
        selector: Selector,
    ) -> Result<mpsc::Receiver<VnfWatchEvent>, ControllerError> {
        let permit = Arc::clone(self.watch_slots()).try_acquire_owned().map_err(|_| {
            ControllerError::Unavailable(format!(
                "{MAX_WATCHES} watches are open on this controller, the most it keeps; try again once one ends"
            ))
        })?;
        // Watch before listing: a change made while the list is read is not missed.
        let watch = self.store_handle().watch(records::VNFS).await?;
        let (tx, rx) = mpsc::channel(BACKLOG);
        let view = View {
            store: Arc::clone(self.store_handle()),
            caller,
            selector,
            shown: HashMap::new(),
            tx,
            _permit: permit,
        };
        tokio::spawn(view.follow(watch));
        Ok(rx)
    }
}

/// The receiver is gone: the watch ends.
struct Gone;

/// One authority's view of the VNFs, as far as it was told.
struct View {
    store: Arc<dyn Store>,
    caller: Caller,
    selector: Selector,
    /// Each VNF shown, with the revision of the record it was shown from.
    shown: HashMap<String, u64>,
    tx: mpsc::Sender<VnfWatchEvent>,
    _permit: OwnedSemaphorePermit,
}

impl View {
    async fn follow(mut self, mut watch: telvirt_store::Watch) {
        if self.relist().await.is_err()
            || self.send(VnfWatchKind::Synced, None, None).await.is_err()
        {
            return;
        }
        loop {
            let event = tokio::select! {
                event = watch.next() => event,
                () = self.tx.closed() => return,
            };
            let told = match event {
                Some(WatchEvent::Put {
                    key,
                    value,
                    revision,
                }) => self.put(&key, &value, revision).await,
                Some(WatchEvent::Delete { key, .. }) => self.forget(name_of(&key)).await,
                Some(WatchEvent::Resync) => self.relist().await,
                // The store is gone: the stream ends, the client sees it end.
                None => return,
            };
            if told.is_err() {
                return;
            }
        }
    }

    async fn send(
        &self,
        kind: VnfWatchKind,
        name: Option<Name>,
        vnf: Option<telvirt_model::Vnf>,
    ) -> Result<(), Gone> {
        self.tx
            .send(VnfWatchEvent { kind, name, vnf })
            .await
            .map_err(|_| Gone)
    }

    /// A record written at `revision`: shown if it is visible and matches, told as deleted if
    /// it no longer does.
    async fn put(&mut self, key: &str, value: &[u8], revision: u64) -> Result<(), Gone> {
        let name = name_of(key);
        if self.shown.get(name).is_some_and(|&r| r >= revision) {
            return Ok(());
        }
        let record: VnfRecord = match decode(key, value) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("watch: skipping {key}: {e}");
                return Ok(());
            }
        };
        if self.wants(&record.vnf) {
            let kind = match self.shown.insert(name.to_owned(), revision) {
                Some(_) => VnfWatchKind::Modified,
                None => VnfWatchKind::Added,
            };
            let name = record.vnf.name.clone();
            self.send(kind, Some(name), Some(record.vnf)).await
        } else {
            self.forget(name).await
        }
    }

    async fn forget(&mut self, name: &str) -> Result<(), Gone> {
        // Only what was shown is told gone, and what was shown had a valid name.
        match (self.shown.remove(name), name.parse::<Name>()) {
            (Some(_), Ok(name)) => self.send(VnfWatchKind::Deleted, Some(name), None).await,
            _ => Ok(()),
        }
    }

    fn wants(&self, vnf: &telvirt_model::Vnf) -> bool {
        self.caller.may_see(vnf) && self.selector.matches(&vnf.descriptor.metadata.labels)
    }

    /// Lists the records again and tells what differs from what was shown. A store that
    /// cannot be read ends the watch (the client sees the stream end and may watch again).
    async fn relist(&mut self) -> Result<(), Gone> {
        let all = match self.store.list(records::VNFS).await {
            Ok(all) => all,
            Err(e) => {
                tracing::warn!("watch: listing the VNFs: {e}");
                return Err(Gone);
            }
        };
        let mut present = std::collections::HashSet::new();
        for (key, v) in &all {
            present.insert(name_of(key).to_owned());
            self.put(key, &v.value, v.mod_revision).await?;
        }
        let gone: Vec<String> = self
            .shown
            .keys()
            .filter(|n| !present.contains(*n))
            .cloned()
            .collect();
        for name in gone {
            self.forget(&name).await?;
        }
        Ok(())
    }
}

fn name_of(key: &str) -> &str {
    key.strip_prefix(records::VNFS).unwrap_or(key)
}
