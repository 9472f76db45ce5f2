//! Watching VNFs: the VNFs an authority may see that match a label selector, then every change
//! to them, as [`VnfWatchEvent`]s (what `GET /v1/watch/vnfs` streams and `vnf list -w` prints).
//!
//! Owns turning the store's watch of the VNF records into that authority's view: visibility and
//! the selector applied to every change, a VNF that leaves the view told as deleted, a lagging
//! or reconnected store watch answered by listing again and telling only the difference. It
//! must not write anything, and it holds at most [`MAX_WATCHES`] watches at once, at most
//! [`MAX_WATCHES_PER_AUTHORITY`] of them an authority's, each keeping only a name and a
//! revision per VNF shown. A watch ends when the token it was opened with stops working (a
//! rotation, the authority's deletion): what it shows is that token's to see.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use telvirt_model::Name;
use telvirt_model::api::{VnfWatchEvent, VnfWatchKind};
use telvirt_store::{Store, WatchEvent};
use tokio::sync::mpsc;

use crate::listing::Selector;
use crate::records::{self, VnfRecord};
use crate::service::{Caller, Controller, ControllerError, decode};

/// Watches open at once on one controller; one more is refused (503) until one ends.
pub const MAX_WATCHES: usize = 64;

/// Watches one authority may hold open at once (429 beyond): no authority takes every slot.
/// The admin is not held to it.
pub const MAX_WATCHES_PER_AUTHORITY: usize = 16;

/// Messages a watch may have waiting for a slow reader; beyond them the watch waits (and the
/// store watch behind it lags, which ends in a list-again).
const BACKLOG: usize = 256;

/// The watches open now, per authority (in all: their sum).
#[derive(Default)]
pub(crate) struct WatchSlots {
    by_authority: Mutex<HashMap<String, usize>>,
}

/// One open watch's slot, given back when it is dropped.
struct WatchSlot {
    slots: Arc<WatchSlots>,
    authority: String,
}

impl WatchSlots {
    /// A slot for one more watch of `caller`: refused (429) past its share (not the admin's),
    /// (503) when every slot is taken.
    fn take(self: &Arc<Self>, caller: &Caller) -> Result<WatchSlot, ControllerError> {
        let authority = caller.name.as_str();
        let mut by = self.by_authority.lock().unwrap_or_else(|p| p.into_inner());
        let held = by.get(authority).copied().unwrap_or(0);
        if held >= MAX_WATCHES_PER_AUTHORITY && !caller.is_admin() {
            return Err(ControllerError::TooManyRequests(format!(
                "authority {authority} holds {held} watches open, the most one authority may; end one first"
            )));
        }
        if by.values().sum::<usize>() >= MAX_WATCHES {
            return Err(ControllerError::Unavailable(format!(
                "{MAX_WATCHES} watches are open on this controller, the most it keeps; try again once one ends"
            )));
        }
        by.insert(authority.to_owned(), held + 1);
        Ok(WatchSlot {
            slots: Arc::clone(self),
            authority: authority.to_owned(),
        })
    }
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        let mut by = self
            .slots
            .by_authority
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(held) = by.get_mut(&self.authority) {
            *held -= 1;
            if *held == 0 {
                by.remove(&self.authority);
            }
        }
    }
}

impl Controller {
    /// The VNFs `caller` may see that match `selector` (`ADDED` each, then `SYNCED`), then each
    /// change to them, until the receiver is dropped or the bearer token it was asked with
    /// (`token`, as [`Controller::authenticate`] took it) stops working. Refused (503) while
    /// [`MAX_WATCHES`] are open, (429) while the caller holds [`MAX_WATCHES_PER_AUTHORITY`].
    pub async fn watch_vnfs(
        &self,
        caller: Caller,
        token: &str,
        selector: Selector,
    ) -> Result<mpsc::Receiver<VnfWatchEvent>, ControllerError> {
        let slot = self.watch_slots().take(&caller)?;
        // The token's index is watched first, then read: a token dropped after the read is
        // seen going.
        let credential = records::token_key(&crate::auth::token_hash(token));
        let token_watch = self.store_handle().watch(&credential).await?;
        if self.store_handle().get(&credential).await?.is_none() {
            return Err(ControllerError::Unauthorized);
        }
        // Watch before listing: a change made while the list is read is not missed.
        let watch = self.store_handle().watch(records::VNFS).await?;
        let (tx, rx) = mpsc::channel(BACKLOG);
        let view = View {
            store: Arc::clone(self.store_handle()),
            caller,
            selector,
            shown: HashMap::new(),
            tx,
            credential,
            _slot: slot,
        };
        tokio::spawn(view.follow(watch, token_watch));
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
    /// The index key of the token the watch was opened with.
    credential: String,
    _slot: WatchSlot,
}

impl View {
    async fn follow(mut self, mut watch: telvirt_store::Watch, mut token: telvirt_store::Watch) {
        if self.relist().await.is_err()
            || self.send(VnfWatchKind::Synced, None, None).await.is_err()
        {
            return;
        }
        loop {
            let event = tokio::select! {
                event = watch.next() => event,
                () = self.tx.closed() => return,
                // The token was dropped (rotated, its authority deleted): the stream ends. A
                // watch that fell behind (the store's changes outran it) reads the token again.
                change = token.next() => match change {
                    Some(WatchEvent::Put { .. }) => continue,
                    Some(WatchEvent::Resync) => match self.store.get(&self.credential).await {
                        Ok(Some(_)) => continue,
                        _ => return,
                    },
                    Some(WatchEvent::Delete { .. }) | None => return,
                },
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
