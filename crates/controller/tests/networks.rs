//! Networks through the API: create, list, show, delete, isolation between authorities, and
//! every kind of bad input refused with a 4xx naming the field while nothing is stored.

mod common;

use common::{Node, wasm_vnf};

const YAML: &str = "application/yaml";

fn network(name: &str, links: &[&str]) -> String {
    let mut s = format!(
        "apiVersion: telvirt/v1\nkind: Network\nmetadata: {{ name: {name} }}\nspec:\n  nodes:\n    - {{ name: gen-{name}, kind: generator }}\n  links:\n"
    );
    for l in links {
        s.push_str(&format!("    - {l}\n"));
    }
    s
}

async fn create_vnf(node: &Node, token: &str, name: &str) {
    let body = wasm_vnf(name);
    let r = node
        .call(
            "POST",
            "/v1/vnfs",
            None,
            Some(token),
            Some((body.as_bytes(), YAML)),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
}

async fn create(node: &Node, token: &str, body: &str) -> common::Reply {
    node.call(
        "POST",
        "/v1/networks",
        None,
        Some(token),
        Some((body.as_bytes(), YAML)),
    )
    .await
}

async fn network_names(node: &Node, token: &str) -> Vec<String> {
    let r = node
        .call("GET", "/v1/networks", None, Some(token), None)
        .await;
    assert_eq!(r.status, 200);
    r.body
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].as_str().unwrap().to_owned())
        .collect()
}

/// Creates `body` and checks the refusal: status, the first error's path, nothing stored.
async fn refused(node: &Node, body: &str, status: u16, path: &str) -> String {
    let before = network_names(node, &node.admin).await;
    let r = create(node, &node.admin, body).await;
    assert_eq!(r.status, status, "{}", r.body);
    assert_eq!(r.content_type, "application/problem+json");
    assert_eq!(r.body["errors"][0]["path"], path, "{}", r.body);
    assert_eq!(
        network_names(node, &node.admin).await,
        before,
        "a refused create must store nothing"
    );
    r.body["errors"][0]["reason"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_list_show_delete_and_isolation() {
    let node = Node::start().await;
    create_vnf(&node, &node.admin, "fw1").await;
    let body = network(
        "chain",
        &["gen-chain.out -> fw1.in", "fw1.out -> host:veth9"],
    );
    let r = create(&node, &node.admin, &body).await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["owner"], "admin");
    assert_eq!(network_names(&node, &node.admin).await, ["chain"]);
    let r = node
        .call(
            "GET",
            "/v1/networks/{name}",
            Some("chain"),
            Some(&node.admin),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.body["descriptor"]["spec"]["links"][0],
        "gen-chain.out -> fw1.in"
    );
    let r = create(&node, &node.admin, &body).await;
    assert_eq!(r.status, 409, "{}", r.body);

    // Another authority sees none of it and cannot link the admin's VNF.
    let ent = node.create_authority("ent1").await;
    assert!(network_names(&node, &ent).await.is_empty());
    for method in ["GET", "DELETE"] {
        let r = node
            .call(
                method,
                "/v1/networks/{name}",
                Some("chain"),
                Some(&ent),
                None,
            )
            .await;
        assert_eq!(r.status, 404, "{method}: {}", r.body);
    }
    let r = create(&node, &ent, &network("mine", &["gen-mine.out -> fw1.in"])).await;
    assert_eq!(r.status, 422, "{}", r.body);
    assert_eq!(r.body["errors"][0]["path"], "spec.links[0].to");

    let r = node
        .call(
            "DELETE",
            "/v1/networks/{name}",
            Some("chain"),
            Some(&node.admin),
            None,
        )
        .await;
    assert_eq!(r.status, 204);
    assert!(network_names(&node, &node.admin).await.is_empty());
    let r = node
        .call(
            "GET",
            "/v1/networks/{name}",
            Some("chain"),
            Some(&node.admin),
            None,
        )
        .await;
    assert_eq!(r.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_port_is_refused() {
    let node = Node::start().await;
    create_vnf(&node, &node.admin, "fw1").await;
    let reason = refused(
        &node,
        &network("n1", &["gen-n1.out -> fw1.inn"]),
        422,
        "spec.links[0].to",
    )
    .await;
    assert!(
        reason.contains("no port `inn`") && reason.contains("in, out"),
        "{reason}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_vnf_is_refused() {
    let node = Node::start().await;
    let reason = refused(
        &node,
        &network("n1", &["gen-n1.out -> fw9.in"]),
        422,
        "spec.links[0].to",
    )
    .await;
    assert!(reason.contains("fw9"), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_linked_twice_in_one_network_is_refused() {
    let node = Node::start().await;
    create_vnf(&node, &node.admin, "fw1").await;
    let reason = refused(
        &node,
        &network(
            "n1",
            &[
                "gen-n1.out -> fw1.in",
                "fw1.out -> host:a",
                "fw1.out -> host:b",
            ],
        ),
        422,
        "spec.links[2].from",
    )
    .await;
    assert!(reason.contains("already linked out"), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_linked_by_another_network_is_refused() {
    let node = Node::start().await;
    create_vnf(&node, &node.admin, "fw1").await;
    let r = create(
        &node,
        &node.admin,
        &network("n1", &["gen-n1.out -> fw1.in"]),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let reason = refused(
        &node,
        &network("n2", &["gen-n2.out -> fw1.in"]),
        422,
        "spec.links[0].to",
    )
    .await;
    assert!(reason.contains("network n1"), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_field_is_refused() {
    let node = Node::start().await;
    let body =
        network("n1", &["gen-n1.out -> host:a"]).replace("  links:", "  colour: red\n  links:");
    let reason = refused(&node, &body, 422, "spec.colour").await;
    assert!(reason.contains("unknown field `colour`"), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_link_syntax_is_refused() {
    let node = Node::start().await;
    refused(
        &node,
        &network("n1", &["gen-n1.out => host:a"]),
        422,
        "spec.links[0]",
    )
    .await;
}
