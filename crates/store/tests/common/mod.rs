//! Helpers shared by the store's integration tests.

use std::time::{Duration, Instant};

use telvirt_store::{LeaseId, Op, Store, StoreError};

/// Commits `ops(lease)` under a new lease of `ttl`; returns the lease. A short lease may expire
/// between its grant and the write's commit when the test stalls on a loaded machine (the store
/// then refuses the write, as it must): another lease is granted and the write sent again.
pub async fn txn_leased<S: Store + ?Sized>(
    store: &S,
    ttl: Duration,
    ops: impl Fn(LeaseId) -> Vec<Op>,
) -> LeaseId {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let lease = store.grant_lease(ttl).await.unwrap();
        match store.txn(vec![], ops(lease)).await {
            Ok(outcome) => {
                assert!(outcome.succeeded, "a write without compares commits");
                return lease;
            }
            Err(StoreError::NoLease(_)) if Instant::now() < deadline => {}
            Err(e) => panic!("a leased write failed: {e}"),
        }
    }
}

/// `key` = `value`, under `lease` when given.
pub fn put(key: &str, value: &[u8], lease: Option<LeaseId>) -> Op {
    Op::Put {
        key: key.into(),
        value: value.to_vec(),
        lease,
    }
}
