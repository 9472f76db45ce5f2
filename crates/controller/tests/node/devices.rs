//! Device grants through the API: `POST /v1/vnfs/{name}/devices` and
//! `DELETE /v1/vnfs/{name}/devices/{id}`. Every refusal has its status, names its reason, and
//! leaves the VNF's grants as they were. Answers are checked against the OpenAPI document.

use crate::common;

use common::{Node, wasm_vnf};
use serde_json::Value;
use telvirt_controller::Caller;

const ADD: &str = "/v1/vnfs/{name}/devices";
const REMOVE: &str = "/v1/vnfs/{name}/devices/{id}";

fn vm_vnf(name: &str) -> String {
    format!(
        "apiVersion: telvirt/v1\nkind: Vnf\nmetadata: {{ name: {name} }}\nspec:\n  runtime: vm\n  cpu: {{ policy: dedicated, count: 1 }}\n  vm: {{ memory: 256MiB }}\n"
    )
}

async fn grants(node: &Node, name: &str) -> Vec<String> {
    let r = node
        .call(
            "GET",
            "/v1/vnfs/{name}",
            Some(name),
            Some(&node.admin),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.body["devices"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|d| d["id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

async fn attach(node: &Node, name: &str, body: &str) -> (u16, Value) {
    let r = node
        .call(
            "POST",
            ADD,
            Some(name),
            Some(&node.admin),
            Some((body.as_bytes(), "application/json")),
        )
        .await;
    (r.status, r.body)
}

/// The request is refused with `status`, its detail or first field error mentions `what`, and
/// the VNF's grants are unchanged.
async fn refused(node: &Node, name: &str, body: &str, status: u16, what: &str) {
    let before = grants(node, name).await;
    let (got, answer) = attach(node, name, body).await;
    assert_eq!(got, status, "{body}: {answer}");
    let text = answer.to_string();
    assert!(text.contains(what), "{body}: expected '{what}' in {text}");
    assert_eq!(
        grants(node, name).await,
        before,
        "{body}: nothing may change"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_are_added_refused_precisely_and_removed() {
    let node = Node::start().await;
    assert_eq!(
        node.create_vnf(&node.admin, &vm_vnf("vm1")).await.status,
        201
    );
    assert_eq!(
        node.create_vnf(&node.admin, &wasm_vnf("fw1")).await.status,
        201
    );

    let (status, body) = attach(&node, "vm1", r#"{"id":"rng0","kind":"rng"}"#).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(grants(&node, "vm1").await, ["rng0"]);
    let generation = body["generation"].as_u64().unwrap_or(0);
    assert!(
        generation > 1,
        "a grant is a change the agent must see: {body}"
    );

    // Each kind of bad input, each with its own reason.
    refused(
        &node,
        "vm1",
        r#"{"id":"rng0","kind":"rng"}"#,
        409,
        "already has",
    )
    .await;
    refused(
        &node,
        "vm1",
        r#"{"id":"tv-x","kind":"rng"}"#,
        422,
        "reserved",
    )
    .await;
    refused(
        &node,
        "vm1",
        r#"{"id":"0x","kind":"rng"}"#,
        422,
        "start with a letter",
    )
    .await;
    refused(
        &node,
        "vm1",
        r#"{"id":"n0","kind":"net"}"#,
        422,
        "needs the field `tap`",
    )
    .await;
    refused(
        &node,
        "vm1",
        r#"{"id":"n0","kind":"net","tap":""}"#,
        422,
        "tap",
    )
    .await;
    refused(
        &node,
        "vm1",
        r#"{"id":"b0","kind":"blk","path":"d.img"}"#,
        422,
        "absolute",
    )
    .await;
    refused(&node, "vm1", r#"{"id":"x","kind":"gpu"}"#, 422, "gpu").await;
    refused(
        &node,
        "vm1",
        r#"{"id":"x","kind":"rng","tap":"t"}"#,
        422,
        "does not apply",
    )
    .await;
    refused(&node, "vm1", r#"{"id":"x","kind":"rng""#, 400, "JSON").await;
    refused(
        &node,
        "fw1",
        r#"{"id":"r","kind":"rng"}"#,
        422,
        "takes no devices",
    )
    .await;

    // Unknown VNF and unknown device id: 404.
    let (status, _) = attach(&node, "nope", r#"{"id":"r","kind":"rng"}"#).await;
    assert_eq!(status, 404);
    let r = node
        .call("DELETE", REMOVE, Some("vm1"), Some(&node.admin), None)
        .await;
    assert_eq!(
        r.status, 404,
        "the literal id {{id}} is not granted: {}",
        r.body
    );
    assert_eq!(grants(&node, "vm1").await, ["rng0"]);

    // Locked: both verbs refused with 409, nothing changed.
    let r = node
        .call(
            "POST",
            "/v1/vnfs/{name}/lock",
            Some("vm1"),
            Some(&node.admin),
            None,
        )
        .await;
    assert_eq!(r.status, 200);
    refused(&node, "vm1", r#"{"id":"rng1","kind":"rng"}"#, 409, "locked").await;
    let admin = Caller {
        name: "admin".into(),
    };
    let e = node
        .controller
        .detach_device(&admin, "vm1", "rng0")
        .await
        .unwrap_err();
    assert!(e.to_string().contains("locked"), "{e}");
    assert_eq!(grants(&node, "vm1").await, ["rng0"]);
    let r = node
        .call(
            "POST",
            "/v1/vnfs/{name}/unlock",
            Some("vm1"),
            Some(&node.admin),
            None,
        )
        .await;
    assert_eq!(r.status, 200);

    // Another authority sees neither the VNF nor its devices.
    let other = node.create_authority("ent1").await;
    let r = node
        .call(
            "POST",
            ADD,
            Some("vm1"),
            Some(&other),
            Some((br#"{"id":"r","kind":"rng"}"#, "application/json")),
        )
        .await;
    assert_eq!(r.status, 404);

    let vnf = node
        .controller
        .detach_device(&admin, "vm1", "rng0")
        .await
        .unwrap();
    assert!(vnf.devices.is_empty());
    assert!(grants(&node, "vm1").await.is_empty());
}
