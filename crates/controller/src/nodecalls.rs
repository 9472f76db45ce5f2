//! Node calls: requests the controller routes to the agent of the host a VNF runs on (maps,
//! counters, module upgrades), and the agents' replies.
//!
//! Owns the per-host queue of calls waiting to be taken, the callers waiting for replies, and
//! their bounds (calls queued per host, how long a caller waits). Agents take calls by polling
//! (`GET /v1/agent/hosts/{host}/calls`, or in-process on the all-in-one node), so the controller
//! never connects to an agent. It must not decide whether a call is allowed: the controller's
//! API checks visibility, phase and locks before routing.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use telvirt_api::{NodeCall, NodeReply, NodeRequest};
use tokio::sync::{Notify, oneshot};

use crate::service::{Controller, ControllerError};

/// Calls that may wait for one host's agent at once; more are refused (503) until it catches up.
pub const MAX_QUEUED_PER_HOST: usize = 64;
/// Most bytes of calls (as JSON) one take hands an agent, unless a single call is larger (a map
/// change takes up to 8 MiB of hex); the rest waits for its next take. The agent reads at most
/// 32 MiB of an answer.
pub const MAX_TAKE_BYTES: usize = 16 << 20;

#[derive(Default)]
struct HostCalls {
    /// Not yet taken by the agent, with their size as JSON.
    queued: VecDeque<(NodeCall, usize)>,
    /// Taken or not: each call's request and the caller waiting for its reply.
    waiting: HashMap<u64, (NodeRequest, oneshot::Sender<NodeReply>)>,
    /// Signalled when a call is queued (a permit is kept when no agent waits).
    arrived: Arc<Notify>,
}

/// The calls of every host.
#[derive(Default)]
pub struct NodeCalls {
    next_id: AtomicU64,
    hosts: std::sync::Mutex<HashMap<String, HostCalls>>,
}

impl NodeCalls {
    fn hosts(&self) -> std::sync::MutexGuard<'_, HashMap<String, HostCalls>> {
        self.hosts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `request` for `host`'s agent and waits up to `timeout` for its reply.
    pub async fn call(
        &self,
        host: &str,
        request: NodeRequest,
        timeout: Duration,
    ) -> Result<NodeReply, ControllerError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = oneshot::channel();
        let call = NodeCall {
            id,
            request: request.clone(),
        };
        let size = serde_json::to_vec(&call).map_or(0, |b| b.len());
        {
            let mut hosts = self.hosts();
            let calls = hosts.entry(host.to_owned()).or_default();
            if calls.waiting.len() >= MAX_QUEUED_PER_HOST {
                return Err(ControllerError::Unavailable(format!(
                    "{MAX_QUEUED_PER_HOST} calls already wait for the agent of host {host}; try again later"
                )));
            }
            calls.waiting.insert(id, (request, tx));
            calls.queued.push_back((call, size));
            calls.arrived.notify_one();
        }
        let outcome = tokio::time::timeout(timeout, rx).await;
        let mut hosts = self.hosts();
        if let Some(calls) = hosts.get_mut(host) {
            calls.queued.retain(|(c, _)| c.id != id);
            calls.waiting.remove(&id);
        }
        match outcome {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) | Err(_) => Err(ControllerError::Unavailable(format!(
                "the agent of host {host} did not answer within {} s; see `telvirt host list`",
                timeout.as_secs()
            ))),
        }
    }

    /// The calls queued for `host`, taken; waits up to `max_wait` for one when none is.
    pub async fn take(&self, host: &str, max_wait: Duration) -> Vec<NodeCall> {
        let deadline = tokio::time::Instant::now() + max_wait;
        loop {
            let arrived = {
                let mut hosts = self.hosts();
                let calls = hosts.entry(host.to_owned()).or_default();
                if !calls.queued.is_empty() {
                    let mut taken = Vec::new();
                    let mut bytes = 0;
                    while let Some((_, size)) = calls.queued.front() {
                        if !taken.is_empty() && bytes + size > MAX_TAKE_BYTES {
                            // The rest on the next take, at once.
                            calls.arrived.notify_one();
                            break;
                        }
                        bytes += size;
                        if let Some((call, _)) = calls.queued.pop_front() {
                            taken.push(call);
                        }
                    }
                    return taken;
                }
                Arc::clone(&calls.arrived)
            };
            // A call queued since the check left a permit: this wait ends at once. So may a
            // permit left by a call an earlier take drained already: then wait on.
            if tokio::time::timeout_at(deadline, arrived.notified())
                .await
                .is_err()
            {
                return Vec::new();
            }
        }
    }

    /// Hands `reply` to whoever waits for call `id` of `host`.
    pub fn reply(&self, host: &str, id: u64, reply: NodeReply) -> Result<(), ControllerError> {
        let sender = self
            .hosts()
            .get_mut(host)
            .and_then(|c| c.waiting.remove(&id))
            .map(|(_, sender)| sender)
            .ok_or_else(|| {
                ControllerError::NotFound(format!(
                    "no call {id} of host {host} waits for a reply (answered, or its caller gave up)"
                ))
            })?;
        // The caller may have given up just now: nothing to do then.
        let _ = sender.send(reply);
        Ok(())
    }

    /// Whether an upgrade to module `reference` waits for `host`'s reply (so its agent may
    /// fetch that module).
    pub fn upgrade_waits(&self, host: &str, reference: &str) -> bool {
        self.hosts().get(host).is_some_and(|c| {
            c.waiting.values().any(|(request, _)| {
                matches!(request, NodeRequest::Upgrade { module, .. } if module == reference)
            })
        })
    }
}

impl Controller {
    /// Routes `request` to the agent of `host` and waits for its reply (at most
    /// [`telvirt_api::NODE_CALL_TIMEOUT`]).
    pub async fn node_call(
        &self,
        host: &str,
        request: NodeRequest,
    ) -> Result<NodeReply, ControllerError> {
        self.node_call_within(host, request, telvirt_api::NODE_CALL_TIMEOUT)
            .await
    }

    /// [`Controller::node_call`] waiting at most `timeout`. A host that is not Ready (no live
    /// heartbeat lease) is not asked: 503 at once, naming it.
    pub(crate) async fn node_call_within(
        &self,
        host: &str,
        request: NodeRequest,
        timeout: Duration,
    ) -> Result<NodeReply, ControllerError> {
        if !self.host_ready(host).await? {
            return Err(ControllerError::Unavailable(format!(
                "the agent of host {host} is not Ready (no live heartbeat), so nothing on that host's data plane or runtimes can answer now; see `telvirt host list`"
            )));
        }
        self.node_calls().call(host, request, timeout).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn maps(vnf: &str) -> NodeRequest {
        NodeRequest::Maps { vnf: vnf.into() }
    }

    #[tokio::test]
    async fn a_call_is_taken_by_its_hosts_agent_and_its_reply_reaches_the_caller() {
        let calls = Arc::new(NodeCalls::default());
        let caller = {
            let calls = Arc::clone(&calls);
            tokio::spawn(async move { calls.call("h1", maps("fw1"), Duration::from_secs(5)).await })
        };
        // Another host's agent sees nothing.
        assert!(calls.take("h2", Duration::from_millis(50)).await.is_empty());
        let taken = calls.take("h1", Duration::from_secs(5)).await;
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].request, maps("fw1"));
        calls
            .reply("h1", taken[0].id, NodeReply::Failed { reason: "r".into() })
            .unwrap();
        let reply = caller.await.unwrap().unwrap();
        assert_eq!(reply, NodeReply::Failed { reason: "r".into() });
        // Answered once: a second reply finds no caller.
        let again = calls.reply("h1", taken[0].id, NodeReply::Failed { reason: "x".into() });
        assert!(
            matches!(again, Err(ControllerError::NotFound(_))),
            "{again:?}"
        );
    }

    #[tokio::test]
    async fn a_call_nobody_answers_times_out_and_leaves_nothing_behind() {
        let calls = NodeCalls::default();
        let err = calls
            .call("h1", maps("fw1"), Duration::from_millis(50))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("did not answer"), "{err}");
        assert!(calls.take("h1", Duration::from_millis(10)).await.is_empty());
        assert!(!calls.upgrade_waits("h1", "x"));
    }

    #[tokio::test]
    async fn a_take_after_a_drained_call_waits_for_the_next_call_instead_of_answering_empty() {
        let calls = Arc::new(NodeCalls::default());
        // Queued while no agent waits: it leaves a wake-up behind, and the next take drains it.
        let first = {
            let calls = Arc::clone(&calls);
            tokio::spawn(async move { calls.call("h1", maps("fw1"), Duration::from_secs(5)).await })
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let taken = loop {
            let taken = calls.take("h1", Duration::from_millis(10)).await;
            if !taken.is_empty() || std::time::Instant::now() > deadline {
                break taken;
            }
        };
        assert_eq!(taken.len(), 1);
        calls
            .reply("h1", taken[0].id, NodeReply::Failed { reason: "r".into() })
            .unwrap();
        first.await.unwrap().unwrap();
        // The next take must not end on that stale wake-up: it gets the second call.
        let waiter = {
            let calls = Arc::clone(&calls);
            tokio::spawn(async move { calls.take("h1", Duration::from_secs(5)).await })
        };
        let second = {
            let calls = Arc::clone(&calls);
            tokio::spawn(async move { calls.call("h1", maps("fw2"), Duration::from_secs(5)).await })
        };
        let taken = waiter.await.unwrap();
        assert_eq!(
            taken.len(),
            1,
            "a take answered empty while a call was coming"
        );
        assert_eq!(taken[0].request, maps("fw2"));
        calls
            .reply("h1", taken[0].id, NodeReply::Failed { reason: "r".into() })
            .unwrap();
        second.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn one_take_hands_over_at_most_its_bytes_and_the_next_take_the_rest_at_once() {
        let calls = Arc::new(NodeCalls::default());
        // Three changes of ~6 MiB each: two fit one take, the third waits for the next.
        let big = |vnf: &str| NodeRequest::MapChange {
            vnf: vnf.into(),
            map: "downlink".into(),
            change: telvirt_model::api::MapChangeRequest {
                delete: vec!["00".repeat(3 << 20)],
                put: Vec::new(),
            },
        };
        let mut callers = Vec::new();
        for vnf in ["u1", "u2", "u3"] {
            let calls = Arc::clone(&calls);
            let request = big(vnf);
            callers.push(tokio::spawn(async move {
                calls.call("h1", request, Duration::from_secs(5)).await
            }));
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let mut taken = Vec::new();
        while taken.len() < 3 {
            assert!(
                std::time::Instant::now() < deadline,
                "{} taken",
                taken.len()
            );
            let got = calls.take("h1", Duration::from_millis(50)).await;
            assert!(got.len() <= 2, "{} calls in one take", got.len());
            taken.extend(got);
        }
        // A lone call larger than the budget still goes.
        let lone = {
            let calls = Arc::clone(&calls);
            let mut request = big("u4");
            if let NodeRequest::MapChange { change, .. } = &mut request {
                change.delete[0] = "00".repeat(9 << 20);
            }
            tokio::spawn(async move { calls.call("h1", request, Duration::from_secs(5)).await })
        };
        let got = calls.take("h1", Duration::from_secs(5)).await;
        assert_eq!(got.len(), 1);
        taken.extend(got);
        for t in &taken {
            calls
                .reply("h1", t.id, NodeReply::Failed { reason: "r".into() })
                .unwrap();
        }
        for c in callers {
            c.await.unwrap().unwrap();
        }
        lone.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn calls_waiting_for_one_host_are_bounded() {
        let calls = Arc::new(NodeCalls::default());
        let mut waiting = Vec::new();
        for _ in 0..MAX_QUEUED_PER_HOST {
            let calls = Arc::clone(&calls);
            waiting.push(tokio::spawn(async move {
                calls.call("h1", maps("fw1"), Duration::from_secs(5)).await
            }));
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while calls.hosts().get("h1").map_or(0, |c| c.waiting.len()) < MAX_QUEUED_PER_HOST {
            assert!(
                tokio::time::Instant::now() < deadline,
                "calls did not queue"
            );
            tokio::task::yield_now().await;
        }
        let refused = calls
            .call("h1", maps("fw1"), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(
            matches!(refused, ControllerError::Unavailable(_)),
            "{refused}"
        );
        // Another host is not held back by h1's backlog.
        let other = {
            let calls = Arc::clone(&calls);
            tokio::spawn(async move { calls.call("h2", maps("fw2"), Duration::from_secs(5)).await })
        };
        let taken = calls.take("h2", Duration::from_secs(5)).await;
        calls
            .reply("h2", taken[0].id, NodeReply::Upgraded { hash: "h".into() })
            .unwrap();
        assert!(other.await.unwrap().is_ok());
        for call in calls.take("h1", Duration::from_secs(1)).await {
            calls
                .reply("h1", call.id, NodeReply::Upgraded { hash: "h".into() })
                .unwrap();
        }
        for w in waiting {
            assert!(w.await.unwrap().is_ok());
        }
    }

    #[tokio::test]
    async fn an_upgrade_waiting_for_a_host_is_known_until_it_is_answered() {
        let calls = Arc::new(NodeCalls::default());
        let upgrade = NodeRequest::Upgrade {
            vnf: "fw1".into(),
            module: "sha256:ab".into(),
            from: None,
        };
        let caller = {
            let calls = Arc::clone(&calls);
            tokio::spawn(async move { calls.call("h1", upgrade, Duration::from_secs(5)).await })
        };
        let taken = calls.take("h1", Duration::from_secs(5)).await;
        // Taken but not answered: its module may still be fetched by h1 only.
        assert!(calls.upgrade_waits("h1", "sha256:ab"));
        assert!(!calls.upgrade_waits("h2", "sha256:ab"));
        assert!(!calls.upgrade_waits("h1", "sha256:cd"));
        calls
            .reply("h1", taken[0].id, NodeReply::Upgraded { hash: "ab".into() })
            .unwrap();
        caller.await.unwrap().unwrap();
        assert!(!calls.upgrade_waits("h1", "sha256:ab"));
    }
}
