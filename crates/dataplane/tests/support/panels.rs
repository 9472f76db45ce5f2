//! What the panel tests share: a two-worker panel on the cores that exist and polling with a
//! deadline.

use std::sync::Arc;
use std::time::{Duration, Instant};

use telvirt_dataplane::panel::PatchPanel;
use telvirt_dataplane::pool::Pool;
use telvirt_dataplane::worker::{WorkerConfig, allowed_cores};

pub fn wait_for(what: &str, secs: u64, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Two workers on the cores that exist (both on the same core when there is only one).
pub fn panel(pool: &Arc<Pool>) -> PatchPanel {
    let cores = allowed_cores().unwrap();
    let c0 = cores[0];
    let c1 = *cores.get(1).unwrap_or(&c0);
    PatchPanel::new(
        Arc::clone(pool),
        vec![
            WorkerConfig::new("a", Some(c0)),
            WorkerConfig::new("b", Some(c1)),
        ],
        1024,
    )
    .unwrap()
}
