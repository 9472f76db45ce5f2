//! The in-process agent link keeps a wake-up that arrives while its agent is not waiting (busy
//! in a pass): the next `wait_for_change` returns at once instead of after its full wait.

use std::time::Duration;

use telvirt_agent::ControlLink;
use telvirt_controller::{Caller, Controller, LocalLink};
use telvirt_model::Format;
use telvirt_sched::SchedConfig;
use telvirt_store::RedbStore;

/// Far longer than the test may take: a wait that lasts this long means the wake-up was lost.
const FOREVER: Duration = Duration::from_secs(3600);
const DEADLINE: Duration = Duration::from_secs(20);

#[tokio::test]
async fn a_change_made_while_the_agent_is_busy_ends_its_next_wait_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(&dir.path().join("store.redb")).unwrap();
    let controller = Controller::open(store, SchedConfig::default())
        .await
        .unwrap();
    let link = LocalLink::new(controller.clone());
    // Nothing changed yet: a wait lasts its full time and says so.
    assert!(!link.wait_for_change(Duration::from_millis(1)).await);

    // The agent is "in a pass" (not waiting) while a VNF is created.
    let admin = Caller {
        name: telvirt_model::api::ADMIN_AUTHORITY.into(),
    };
    let text = "apiVersion: telvirt/v1\nkind: Vnf\nmetadata: { name: fw1 }\nspec:\n  runtime: vm\n  vm: { memory: 64MiB }\n";
    controller
        .create_vnf(&admin, text.as_bytes(), Format::Yaml)
        .await
        .unwrap();

    let changed = tokio::time::timeout(DEADLINE, link.wait_for_change(FOREVER))
        .await
        .expect("the change made before the wait ends it at once");
    assert!(changed, "a wait ended by a change says so");
    // Seen once: the wait after it lasts again.
    let again = tokio::time::timeout(Duration::from_millis(50), link.wait_for_change(FOREVER));
    assert!(again.await.is_err(), "one change woke the link twice");
}
