//! `POST /v1/vnfs/{name}/upgrade` refusals: each changes nothing and says why. (The swap itself
//! is tested where a runtime exists: the agent's wasm adapter and `crates/telvirt/tests/wasm.rs`.)

use crate::common;

use common::{Node, wasm_vnf};

async fn setup() -> Node {
    let node = Node::start().await;
    let body = wasm_vnf("fw1");
    let r = node
        .call(
            "POST",
            "/v1/vnfs",
            None,
            Some(&node.admin),
            Some((body.as_bytes(), "application/yaml")),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    node
}

async fn upgrade(node: &Node, token: &str, body: &str) -> common::Reply {
    node.call(
        "POST",
        "/v1/vnfs/{name}/upgrade",
        Some("fw1"),
        Some(token),
        Some((body.as_bytes(), "application/json")),
    )
    .await
}

async fn module_of(node: &Node) -> String {
    let r = node
        .call(
            "GET",
            "/v1/vnfs/{name}",
            Some("fw1"),
            Some(&node.admin),
            None,
        )
        .await;
    r.body["descriptor"]["spec"]["wasm"]["module"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vnf_that_is_not_running_is_refused() {
    let node = setup().await;
    let r = upgrade(&node, &node.admin, r#"{"module": "v2.wasm"}"#).await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(
        r.body["detail"]
            .as_str()
            .unwrap()
            .contains("only a Running VNF")
    );
    assert_eq!(module_of(&node).await, common::firewall_ref());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_field_is_refused() {
    let node = setup().await;
    let r = upgrade(
        &node,
        &node.admin,
        r#"{"module": "v2.wasm", "force": true}"#,
    )
    .await;
    assert_eq!(r.status, 422, "{}", r.body);
    assert_eq!(r.body["errors"][0]["path"], "force");
    assert_eq!(module_of(&node).await, common::firewall_ref());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_authority_gets_404() {
    let node = setup().await;
    let ent = node.create_authority("ent1").await;
    let r = upgrade(&node, &ent, r#"{"module": "v2.wasm"}"#).await;
    assert_eq!(r.status, 404, "{}", r.body);
    assert_eq!(module_of(&node).await, common::firewall_ref());
}
