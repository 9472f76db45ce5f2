//! What a `/metrics` scrape reads: the VNFs and networks the caller may see, the counters the
//! hosts' agents report for them (one usage call per host, all hosts at once, each bounded by
//! [`SCRAPE_CALL_TIMEOUT`]), and for admin the hosts, the store's size and revision. It must
//! not encode anything (that is `metrics`) nor show an authority what another one owns.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

use telvirt_api::{NodeReply, NodeRequest, VnfUsage};

use crate::metrics::Scrape;
use crate::service::{Caller, Controller, ControllerError};

/// How long a scrape waits for a host's agent to report its VNFs' counters; a host that does
/// not answer in time shows as `telvirt_host_scrape_success 0` and its VNFs without counters.
pub const SCRAPE_CALL_TIMEOUT: Duration = Duration::from_secs(2);

type Result<T> = std::result::Result<T, ControllerError>;

impl Controller {
    /// Everything `/metrics` shows `caller` now.
    pub async fn scrape(&self, caller: &Caller) -> Result<Scrape> {
        let now = SystemTime::now();
        let vnfs = self.vnfs(caller).await?;
        let hosts = if caller.is_admin() {
            self.hosts(caller).await?
        } else {
            Vec::new()
        };
        // The hosts to ask: admin asks every host with an agent; an authority only the hosts
        // its VNFs are placed on.
        let mut asked: BTreeSet<String> = vnfs
            .iter()
            .flat_map(|v| v.placements.iter().map(|p| p.host.clone()))
            .collect();
        asked.extend(hosts.iter().map(|h| h.name.clone()));
        let mut calls = Vec::new();
        for host in asked {
            if self.agent_host(&host).await?.is_some() {
                calls.push(async move {
                    let answer = self
                        .node_call_within(&host, NodeRequest::Usage, SCRAPE_CALL_TIMEOUT)
                        .await;
                    (host, answer)
                });
            }
        }
        // A VNF's counters are its active instance's, from that instance's host only: a
        // standby, or a stale instance left on another host (after a move, or of a deleted VNF
        // whose name another authority took since), is not it.
        let active: BTreeMap<&str, &str> = vnfs
            .iter()
            .filter_map(|v| {
                let p = v
                    .placements
                    .iter()
                    .find(|p| p.role == telvirt_model::Role::Active)?;
                Some((v.name.as_str(), p.host.as_str()))
            })
            .collect();
        let mut usage: BTreeMap<String, VnfUsage> = BTreeMap::new();
        let mut host_answers = Vec::new();
        for (host, answer) in futures_util::future::join_all(calls).await {
            let ok = match answer {
                Ok(NodeReply::Usage { vnfs }) => {
                    for u in vnfs {
                        if active.get(u.vnf.as_str()) == Some(&host.as_str()) {
                            usage.insert(u.vnf.clone(), u);
                        }
                    }
                    true
                }
                Ok(other) => {
                    tracing::debug!(%host, "usage call answered {other:?}");
                    false
                }
                Err(e) => {
                    tracing::debug!(%host, "usage call failed: {e}");
                    false
                }
            };
            host_answers.push((host, ok));
        }
        let networks = futures_util::future::join_all(
            self.networks(caller)
                .await?
                .into_iter()
                // Holders only: the counts a network left on other hosts are not metrics (a
                // scrape would ask every host for every network).
                .map(|n| async move { self.network_with(caller, n.name.as_str(), false).await }),
        )
        .await
        .into_iter()
        // A network deleted since the list is simply not shown.
        .filter_map(std::result::Result::ok)
        .collect();
        let (store_bytes, store_revision) = if caller.is_admin() {
            let store = self.store_handle();
            (store.size_bytes().await?, store.current_revision().await?)
        } else {
            (None, 0)
        };
        Ok(Scrape {
            admin: caller.is_admin(),
            vnfs,
            usage,
            networks,
            hosts,
            host_answers: if caller.is_admin() {
                host_answers
            } else {
                Vec::new()
            },
            store_bytes,
            store_revision,
            now: Some(now),
        })
    }
}
