//! Every kind of bad input is refused with a 4xx problem naming the field, and stores nothing.

use crate::common;

use common::{Node, wasm_vnf};

/// Sends `body` as a create and checks the refusal: status, the first error's path (if any),
/// and that nothing was stored.
async fn refused(node: &Node, body: &[u8], content_type: &str, status: u16, path: Option<&str>) {
    let before = node.names(&node.admin).await;
    let r = node
        .call(
            "POST",
            "/v1/vnfs",
            None,
            Some(&node.admin),
            Some((body, content_type)),
        )
        .await;
    assert_eq!(r.status, status, "{}", r.body);
    assert_eq!(r.content_type, "application/problem+json");
    assert!(!r.body["detail"].as_str().unwrap().is_empty());
    if let Some(path) = path {
        assert_eq!(r.body["errors"][0]["path"], path, "{}", r.body);
        assert!(!r.body["errors"][0]["reason"].as_str().unwrap().is_empty());
    }
    assert_eq!(
        node.names(&node.admin).await,
        before,
        "a refused create must store nothing"
    );
}

fn edit(from: &str, to: &str) -> Vec<u8> {
    let base = wasm_vnf("fw1");
    assert!(base.contains(from), "test edit target missing: {from}");
    base.replacen(from, to, 1).into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_yaml() {
    let node = Node::start().await;
    refused(
        &node,
        b"apiVersion: telvirt/v1\n  kind: : Vnf\n\t- [",
        "application/yaml",
        400,
        None,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_json() {
    let node = Node::start().await;
    refused(
        &node,
        b"{\"apiVersion\": \"telvirt/v1\",",
        "application/json",
        400,
        None,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_field() {
    let node = Node::start().await;
    refused(
        &node,
        &edit("    limits:", "    turbo: true\n    limits:"),
        "application/yaml",
        422,
        Some("spec.wasm.turbo"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_unit() {
    let node = Node::start().await;
    refused(
        &node,
        &edit("memory: 16MiB", "memory: 16MB"),
        "application/yaml",
        422,
        Some("spec.wasm.limits.memory"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_budget_out_of_range() {
    let node = Node::start().await;
    for budget in ["0", "1000000001", "-5"] {
        refused(
            &node,
            &edit(
                "memory: 16MiB",
                &format!("memory: 16MiB, fuel_per_batch: {budget}"),
            ),
            "application/yaml",
            422,
            Some("spec.wasm.limits.fuel_per_batch"),
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_size() {
    let node = Node::start().await;
    refused(
        &node,
        &edit("memory: 16MiB", "memory: 0MiB"),
        "application/yaml",
        422,
        Some("spec.wasm.limits.memory"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negative_size() {
    let node = Node::start().await;
    refused(
        &node,
        &edit("memory: 16MiB", "memory: -16MiB"),
        "application/yaml",
        422,
        Some("spec.wasm.limits.memory"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_count() {
    let node = Node::start().await;
    refused(
        &node,
        &edit("count: 1", "count: 0"),
        "application/yaml",
        422,
        Some("spec.cpu.count"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_runtime() {
    let node = Node::start().await;
    refused(
        &node,
        &edit("runtime: wasm", "runtime: docker"),
        "application/yaml",
        422,
        Some("spec.runtime"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_name() {
    let node = Node::start().await;
    refused(
        &node,
        &edit("name: fw1", "name: FW_1"),
        "application/yaml",
        422,
        Some("metadata.name"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_name() {
    let node = Node::start().await;
    assert_eq!(
        node.create_vnf(&node.admin, &wasm_vnf("fw1")).await.status,
        201
    );
    let before = node
        .call(
            "GET",
            "/v1/vnfs/{name}",
            Some("fw1"),
            Some(&node.admin),
            None,
        )
        .await;
    refused(
        &node,
        wasm_vnf("fw1").as_bytes(),
        "application/yaml",
        409,
        None,
    )
    .await;
    let after = node
        .call(
            "GET",
            "/v1/vnfs/{name}",
            Some("fw1"),
            Some(&node.admin),
            None,
        )
        .await;
    assert_eq!(
        before.body["created_at"], after.body["created_at"],
        "the first VNF is untouched"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_body() {
    let node = Node::start().await;
    let mut body = wasm_vnf("fw1").into_bytes();
    body.extend(std::iter::repeat_n(b'#', 1 << 20));
    refused(&node, &body, "application/yaml", 413, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_content_type() {
    let node = Node::start().await;
    refused(&node, wasm_vnf("fw1").as_bytes(), "text/csv", 415, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn semantic_violations_are_all_reported() {
    let node = Node::start().await;
    let body = wasm_vnf("fw1")
        .replace("count: 1", "count: 0")
        .replace("ports: [in, out]", "ports: [in, in]");
    let r = node
        .call(
            "POST",
            "/v1/vnfs",
            None,
            Some(&node.admin),
            Some((body.as_bytes(), "application/yaml")),
        )
        .await;
    assert_eq!(r.status, 422);
    assert_eq!(r.error_paths(), ["spec.cpu.count", "spec.ports[1]"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_map_change_is_refused_before_it_reaches_a_host() {
    let node = Node::start().await;
    let created = node
        .call(
            "POST",
            "/v1/vnfs",
            None,
            Some(&node.admin),
            Some((wasm_vnf("fw1").as_bytes(), "application/yaml")),
        )
        .await;
    assert_eq!(created.status, 201, "{}", created.body);
    let change = |body: &'static [u8], content_type: &'static str| {
        let node = &node;
        async move {
            node.call_at(
                "POST",
                "/v1/vnfs/{name}/maps/{map}/entries",
                &[("name", "fw1"), ("map", "rules")],
                Some(&node.admin),
                Some((body, content_type)),
            )
            .await
        }
    };
    // YAML (whose aliases could expand past the bounds) is not taken here.
    let r = change(b"put: [{key: '00', value: '00'}]", "application/yaml").await;
    assert_eq!(r.status, 415, "{}", r.body);
    // Bad hex names its field; an empty change says so.
    let r = change(
        br#"{"put": [{"key": "0x01", "value": "00"}]}"#,
        "application/json",
    )
    .await;
    assert_eq!(r.status, 422, "{}", r.body);
    assert_eq!(r.body["errors"][0]["path"], "put[0].key", "{}", r.body);
    let r = change(br#"{}"#, "application/json").await;
    assert_eq!(r.status, 422, "{}", r.body);
    // A VNF that is not running (no host took it here) has no maps to change.
    let r = change(br#"{"delete": ["00"]}"#, "application/json").await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(
        r.body["detail"]
            .as_str()
            .unwrap()
            .contains("only a Running instance's maps are changed"),
        "{}",
        r.body
    );
}
