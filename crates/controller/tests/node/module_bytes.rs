//! Uploaded modules travel through the store: a controller that did not take the upload (a
//! second controller of a cluster, on another machine with its own module directory) serves
//! the exact bytes to an agent that runs them, and caches them; a module's last owner deleting
//! it removes its chunks from the store too.

use std::sync::Arc;

use telvirt_controller::modules::{ModuleRepository, sha256_hex};
use telvirt_controller::records::{MODULE_BYTES, module_chunk_key};
use telvirt_controller::{Caller, Controller};
use telvirt_model::Format;
use telvirt_sched::SchedConfig;
use telvirt_store::{RedbStore, Store};

use crate::common;
use common::{DefaultVerifier, firewall_wasm, host_record, wasm_vnf};

fn admin() -> Caller {
    Caller {
        name: "admin".into(),
    }
}

async fn controller(store: Arc<RedbStore>, modules: &std::path::Path) -> Arc<Controller> {
    let c = Controller::open(store, SchedConfig::default())
        .await
        .unwrap();
    c.set_module_repository(ModuleRepository::new(modules, Arc::new(DefaultVerifier)));
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_uploaded_through_one_controller_is_served_by_another() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(&dir.path().join("store.redb")).unwrap();
    let first = controller(store.clone(), &dir.path().join("modules-1")).await;
    first.register_host(host_record("h2")).await.unwrap();
    let bytes = firewall_wasm();
    let sha = sha256_hex(bytes);
    first.upload_module(&admin(), bytes.to_vec()).await.unwrap();
    let chunks = store.list(MODULE_BYTES).await.unwrap();
    assert_eq!(
        chunks.len(),
        bytes.len().div_ceil(512 * 1024),
        "{}",
        bytes.len()
    );
    first
        .create_vnf(&admin(), wasm_vnf("fw1").as_bytes(), Format::Yaml)
        .await
        .unwrap();
    first.schedule_pending().await.unwrap();

    // Another machine's controller: its own module directory, empty.
    let second_dir = dir.path().join("modules-2");
    let second = controller(store.clone(), &second_dir).await;
    let served = second.module_for_host("h2", &sha).await.unwrap();
    assert_eq!(served, bytes);
    assert_eq!(
        std::fs::read(ModuleRepository::path(&second_dir, &sha)).unwrap(),
        bytes,
        "the bytes were not cached"
    );

    // A chunk changed in the store is caught by the digest, not served.
    std::fs::remove_file(ModuleRepository::path(&second_dir, &sha)).unwrap();
    store
        .txn(
            Vec::new(),
            vec![telvirt_store::Op::Put {
                key: module_chunk_key(&sha, 0),
                value: b"not the module".to_vec(),
                lease: None,
            }],
        )
        .await
        .unwrap();
    let e = second.module_for_host("h2", &sha).await.unwrap_err();
    assert!(e.to_string().contains("do not hash to its digest"), "{e}");

    // Deleted by its last owner (once nothing runs it): the chunks go with the index.
    first.delete(&admin(), "fw1").await.unwrap();
    first.delete_module(&admin(), &sha).await.unwrap();
    assert!(store.list(MODULE_BYTES).await.unwrap().is_empty());
}
