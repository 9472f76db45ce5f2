//! `PUT /v1/vnfs/{name}`: labels change in place, the same descriptor changes nothing, a dry run shows the change and writes nothing,
//! a pinned VNF moves to free cores with the new ones held beside the old until its agent
//! reports, and every field a VNF takes only when created is refused with 409 naming it, with
//! nothing changed.

use crate::common;

use common::{Node, labelled, names, wasm_vnf};
use serde_json::Value;

async fn apply(node: &Node, token: &str, name: &str, yaml: &str, dry_run: bool) -> common::Reply {
    let template = if dry_run {
        "/v1/vnfs/{name}?dryRun=true"
    } else {
        "/v1/vnfs/{name}"
    };
    node.call(
        "PUT",
        template,
        Some(name),
        Some(token),
        Some((yaml.as_bytes(), "application/yaml")),
    )
    .await
}

fn pinned_vm(name: &str, cores: &str) -> String {
    format!(
        "apiVersion: telvirt/v1\nkind: Vnf\nmetadata: {{ name: {name} }}\nspec:\n  runtime: vm\n  cpu: {{ policy: pinned, cores: [{cores}] }}\n  vm: {{ memory: 64MiB }}\n"
    )
}

fn paths(body: &Value) -> Vec<String> {
    body["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["path"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn labels_change_in_place_and_the_same_descriptor_changes_nothing() {
    let node = Node::start().await;
    let r = node
        .create_vnf(&node.admin, &labelled("fw1", "tier: edge"))
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let before = node.vnf_json("fw1").await;

    // Unchanged: 200, no change, nothing written.
    let r = apply(
        &node,
        &node.admin,
        "fw1",
        &labelled("fw1", "tier: edge"),
        false,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(paths(&r.body).is_empty(), "{}", r.body);
    assert_eq!(
        node.vnf_json("fw1").await["generation"],
        before["generation"]
    );

    // A dry run answers the change and writes nothing.
    let new = labelled("fw1", "tier: core, site: paris");
    let r = apply(&node, &node.admin, "fw1", &new, true).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["dry_run"], true);
    assert_eq!(
        paths(&r.body),
        ["metadata.labels.site", "metadata.labels.tier"]
    );
    assert_eq!(
        r.body["vnf"]["descriptor"]["metadata"]["labels"]["tier"],
        "core"
    );
    let after_dry = node.vnf_json("fw1").await;
    assert_eq!(after_dry["descriptor"], before["descriptor"]);
    assert_eq!(after_dry["generation"], before["generation"]);

    // Applied: the labels change, an event says what changed, selectors follow.
    let r = apply(&node, &node.admin, "fw1", &new, false).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["dry_run"], false);
    assert_eq!(r.body["changes"][1]["old"], "edge");
    assert_eq!(r.body["changes"][1]["new"], "core");
    let now = node.vnf_json("fw1").await;
    assert_eq!(now["descriptor"]["metadata"]["labels"]["site"], "paris");
    assert_eq!(
        now["generation"].as_u64().unwrap(),
        before["generation"].as_u64().unwrap() + 1
    );
    let events = node.events("fw1").await;
    let last = events.last().unwrap();
    assert!(
        last["reason"]
            .as_str()
            .unwrap()
            .contains("metadata.labels.tier: edge → core"),
        "{last}"
    );
    assert_eq!(last["actor"], "admin");
    for (selector, want) in [("tier%3Dcore", vec!["fw1"]), ("tier%3Dedge", vec![])] {
        let (r, _) = node
            .list_vnfs(&node.admin, &format!("labelSelector={selector}"))
            .await;
        assert_eq!(names(&r), want, "{selector}");
    }
}

#[tokio::test]
async fn fields_taken_only_at_creation_are_refused_naming_each_and_nothing_changes() {
    let node = Node::start().await;
    node.create_vnf(&node.admin, &wasm_vnf("fw1")).await;
    let before = node.vnf_json("fw1").await;
    let new = wasm_vnf("fw1")
        .replace("count: 1", "count: 2")
        .replace("memory: 16MiB", "memory: 32MiB")
        .replace(
            "metadata: { name: fw1 }",
            "metadata: { name: fw1, labels: { a: b } }",
        );
    for dry_run in [true, false] {
        let r = apply(&node, &node.admin, "fw1", &new, dry_run).await;
        assert_eq!(r.status, 409, "{}", r.body);
        assert_eq!(r.body["type"], "urn:telvirt:problem:needs-recreate");
        assert_eq!(
            r.error_paths(),
            ["spec.cpu.count", "spec.wasm.limits.memory"],
            "{}",
            r.body
        );
        assert!(
            r.body["detail"]
                .as_str()
                .unwrap()
                .contains("spec.cpu.count"),
            "{}",
            r.body
        );
    }
    let now = node.vnf_json("fw1").await;
    assert_eq!(
        now["descriptor"], before["descriptor"],
        "the label was not taken either"
    );
    assert_eq!(now["generation"], before["generation"]);

    // Another name in the body than in the path: 422 naming metadata.name.
    let r = apply(&node, &node.admin, "fw1", &wasm_vnf("fw2"), false).await;
    assert_eq!(r.status, 422, "{}", r.body);
    assert_eq!(r.error_paths(), ["metadata.name"]);
    // Another authority's VNF is not there for it; a locked one refuses.
    let other = node.create_authority("tenant").await;
    let r = apply(&node, &other, "fw1", &labelled("fw1", "a: b"), false).await;
    assert_eq!(r.status, 404, "{}", r.body);
    let r = node.vnf_action(&node.admin, "fw1", "lock").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = apply(&node, &node.admin, "fw1", &labelled("fw1", "a: b"), false).await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert_eq!(r.body["type"], "urn:telvirt:problem:locked");
    assert_eq!(
        node.vnf_json("fw1").await["descriptor"],
        before["descriptor"]
    );
}

/// The CPUs VNF `name` holds on host h1, as the host's view shows them.
async fn held_cpus(node: &Node, name: &str) -> Vec<u64> {
    let r = node
        .call(
            "GET",
            "/v1/hosts/{name}",
            Some("h1"),
            Some(&node.admin),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let mut cpus: Vec<u64> = r.body["cpus"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["use"]["vnf"] == name)
        .map(|c| c["cpu"].as_u64().unwrap())
        .collect();
    cpus.sort_unstable();
    cpus
}

#[tokio::test]
async fn a_pinned_vnf_moves_to_free_cores_and_never_onto_anothers() {
    let node = Node::start().await;
    for (name, cores) in [("v1", "2"), ("v2", "4")] {
        let r = node.create_vnf(&node.admin, &pinned_vm(name, cores)).await;
        assert_eq!(r.status, 201, "{}", r.body);
        node.wait_vnf(&node.admin, name, |v| {
            v["placements"][0]["vcpus"].is_array()
        })
        .await;
    }
    assert_eq!(held_cpus(&node, "v1").await, [2]);

    // A dry run shows the placement it would get and moves nothing.
    let r = apply(&node, &node.admin, "v1", &pinned_vm("v1", "3"), true).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(paths(&r.body), ["spec.cpu.cores"]);
    assert_eq!(
        r.body["vnf"]["placements"][0]["vcpus"],
        serde_json::json!([[3]])
    );
    assert_eq!(held_cpus(&node, "v1").await, [2]);

    // Onto v2's core: refused naming the field, nothing moves.
    let r = apply(&node, &node.admin, "v1", &pinned_vm("v1", "4"), false).await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert_eq!(r.body["type"], "urn:telvirt:problem:cannot-apply");
    assert_eq!(r.error_paths(), ["spec.cpu.cores"]);
    assert_eq!(held_cpus(&node, "v1").await, [2]);
    assert_eq!(held_cpus(&node, "v2").await, [4]);
    // More cores than vCPUs it runs: needs a re-create.
    let r = apply(&node, &node.admin, "v1", &pinned_vm("v1", "3, 5"), false).await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert_eq!(r.body["type"], "urn:telvirt:problem:needs-recreate");

    // Onto a free core: answered once the agent reported the new generation; the old core
    // is free then, and the event names old → new.
    let r = apply(&node, &node.admin, "v1", &pinned_vm("v1", "3"), false).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.body["vnf"]["placements"][0]["vcpus"],
        serde_json::json!([[3]])
    );
    assert_eq!(held_cpus(&node, "v1").await, [3]);
    let events = node.events("v1").await;
    let reason = events.last().unwrap()["reason"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(reason.contains("spec.cpu.cores: [2] → [3]"), "{reason}");
    // Core 2 can be had again.
    let r = node.create_vnf(&node.admin, &pinned_vm("v3", "2")).await;
    assert_eq!(r.status, 201, "{}", r.body);
    node.wait_vnf(&node.admin, "v3", |v| {
        v["placements"][0]["vcpus"] == serde_json::json!([[2]])
    })
    .await;
}
