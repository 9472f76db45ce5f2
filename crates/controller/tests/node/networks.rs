//! Networks through the API: create, list, show, delete, isolation between authorities, and
//! every kind of bad input refused with a 4xx naming the field while nothing is stored.

use crate::common;

use std::time::Duration;

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
    let r = node.create_network(&node.admin, body).await;
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
    let r = node.create_network(&node.admin, &body).await;
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
    let r = node.create_network(&node.admin, &body).await;
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
    let r = node
        .create_network(&ent, &network("mine", &["gen-mine.out -> fw1.in"]))
        .await;
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
    let r = node
        .create_network(&node.admin, &network("n1", &["gen-n1.out -> fw1.in"]))
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

/// A network whose steering endpoint `fw` stands for fw1 and fw2.
fn steered(name: &str) -> String {
    format!(
        "apiVersion: telvirt/v1\nkind: Network\nmetadata: {{ name: {name} }}\nspec:\n  nodes:\n    - {{ name: gen-{name}, kind: generator }}\n    - {{ name: sink-{name}, kind: sink }}\n  steering:\n    - {{ name: fw, instances: [fw1, fw2] }}\n  links:\n    - gen-{name}.out -> fw.in\n    - fw.out -> sink-{name}.in\n"
    )
}

async fn show(node: &Node, token: &str, name: &str) -> common::Reply {
    node.call("GET", "/v1/networks/{name}", Some(name), Some(token), None)
        .await
}

async fn replace(node: &Node, token: &str, name: &str, body: &str) -> common::Reply {
    node.call(
        "PUT",
        "/v1/networks/{name}",
        Some(name),
        Some(token),
        Some((body.as_bytes(), YAML)),
    )
    .await
}

async fn steer(node: &Node, token: &str, name: &str, endpoint: &str, body: &str) -> common::Reply {
    node.call_at(
        "PUT",
        "/v1/networks/{name}/steering/{endpoint}",
        &[("name", name), ("endpoint", endpoint)],
        Some(token),
        Some((body.as_bytes(), "application/json")),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replace_rewrites_the_descriptor_and_refusals_change_nothing() {
    let node = Node::start().await;
    create_vnf(&node, &node.admin, "fw1").await;
    create_vnf(&node, &node.admin, "nat1").await;
    let v1 = network("chain", &["gen-chain.out -> fw1.in"]);
    assert_eq!(node.create_network(&node.admin, &v1).await.status, 201);
    let v2 = network("chain", &["gen-chain.out -> fw1.in", "fw1.out -> nat1.in"]);
    let r = replace(&node, &node.admin, "chain", &v2).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let links = |r: &common::Reply| r.body["descriptor"]["spec"]["links"].clone();
    assert_eq!(links(&r).as_array().unwrap().len(), 2);
    let stored = links(&show(&node, &node.admin, "chain").await);

    // Each refusal names its field and leaves the stored descriptor as it was.
    for (body, status, path) in [
        (
            v2.replace("name: chain", "name: other"),
            422,
            "metadata.name",
        ),
        (
            network("chain", &["gen-chain.out -> fw1.inn"]),
            422,
            "spec.links[0].to",
        ),
        (
            v2.replace("  links:", "  colour: red\n  links:"),
            422,
            "spec.colour",
        ),
    ] {
        let r = replace(&node, &node.admin, "chain", &body).await;
        assert_eq!(r.status, status, "{}", r.body);
        assert_eq!(r.body["errors"][0]["path"], path, "{}", r.body);
        assert_eq!(links(&show(&node, &node.admin, "chain").await), stored);
    }
    let r = replace(&node, &node.admin, "nosuch", &v2.replace("chain", "nosuch")).await;
    assert_eq!(r.status, 404, "{}", r.body);
    // Another authority cannot see, so cannot replace, the admin's network.
    let ent = node.create_authority("ent1").await;
    let r = replace(&node, &ent, "chain", &v1).await;
    assert_eq!(r.status, 404, "{}", r.body);
    assert_eq!(links(&show(&node, &node.admin, "chain").await), stored);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steering_switches_are_stored_and_bad_ones_refused() {
    let node = Node::start().await;
    create_vnf(&node, &node.admin, "fw1").await;
    create_vnf(&node, &node.admin, "fw2").await;
    let r = node.create_network(&node.admin, &steered("s1")).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let active = |r: &common::Reply| r.body["descriptor"]["spec"]["steering"][0]["active"].clone();
    assert_eq!(active(&r), serde_json::Value::Null);

    let r = steer(&node, &node.admin, "s1", "fw", r#"{"active":"fw2"}"#).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(active(&r), "fw2");
    assert_eq!(active(&show(&node, &node.admin, "s1").await), "fw2");

    let r = steer(&node, &node.admin, "s1", "fw", r#"{"active":"fw3"}"#).await;
    assert_eq!(r.status, 422, "{}", r.body);
    assert_eq!(r.body["errors"][0]["path"], "active");
    assert!(
        r.body["errors"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("fw1, fw2"),
        "{}",
        r.body
    );
    let r = steer(&node, &node.admin, "s1", "lb", r#"{"active":"fw1"}"#).await;
    assert_eq!(r.status, 404, "{}", r.body);
    assert!(
        r.body["detail"].as_str().unwrap().contains("fw"),
        "{}",
        r.body
    );
    for (body, status, path) in [
        (r#"{"active":"fw1","x":1}"#, 422, "x"),
        (r#"{"active":"FW1"}"#, 422, "active"),
        (r#"{"active":"#, 400, ""),
    ] {
        let r = steer(&node, &node.admin, "s1", "fw", body).await;
        assert_eq!(r.status, status, "{body}: {}", r.body);
        assert_eq!(r.body["errors"][0]["path"], path, "{body}: {}", r.body);
    }
    let ent = node.create_authority("ent1").await;
    let r = steer(&node, &ent, "s1", "fw", r#"{"active":"fw1"}"#).await;
    assert_eq!(r.status, 404, "{}", r.body);
    // None of the refusals moved the endpoint.
    assert_eq!(active(&show(&node, &node.admin, "s1").await), "fw2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steering_instances_must_be_owned_vnfs_with_the_ports_used() {
    let node = Node::start().await;
    create_vnf(&node, &node.admin, "fw1").await;
    let reason = refused(&node, &steered("s1"), 422, "spec.steering[0].instances[1]").await;
    assert!(reason.contains("fw2"), "{reason}");
    create_vnf(&node, &node.admin, "fw2").await;
    let body = steered("s1").replace("fw.out -> sink-s1.in", "fw.egress -> sink-s1.in");
    let reason = refused(&node, &body, 422, "spec.steering[0].instances[0]").await;
    assert!(reason.contains("no port `egress`"), "{reason}");
    let body = steered("s1").replace(
        "instances: [fw1, fw2]",
        "instances: [fw1, fw2], active: fw9",
    );
    refused(&node, &body, 422, "spec.steering[0].active").await;
    // An instance port already wired by another network is refused at the instance.
    assert_eq!(
        node.create_network(&node.admin, &network("n1", &["gen-n1.out -> fw2.in"]))
            .await
            .status,
        201
    );
    let reason = refused(&node, &steered("s2"), 422, "spec.steering[0].instances[1]").await;
    assert!(reason.contains("network n1"), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_latency_probe_checks_its_fields_and_needs_a_data_plane() {
    let node = Node::start().await;
    create_vnf(&node, &node.admin, "fw1").await;
    let body = network(
        "chain",
        &["gen-chain.out -> fw1.in", "fw1.out -> host:veth9"],
    );
    assert_eq!(node.create_network(&node.admin, &body).await.status, 201);
    let probe = |token: &str, body: &str| {
        let body = body.to_owned();
        let token = token.to_owned();
        let node = &node;
        async move {
            node.call(
                "POST",
                "/v1/networks/{name}/latency",
                Some("chain"),
                Some(&token),
                Some((body.as_bytes(), "application/json")),
            )
            .await
        }
    };
    let admin = node.admin.clone();
    let r = probe(&admin, r#"{"rate_pps":0,"size":20}"#).await;
    assert_eq!(r.status, 422, "{}", r.body);
    assert_eq!(r.error_paths(), ["rate_pps", "size"], "{}", r.body);
    let r = probe(&admin, r#"{"from":"nat1.in"}"#).await;
    assert_eq!(r.status, 422, "{}", r.body);
    assert_eq!(r.body["errors"][0]["path"], "from");
    let r = probe(&admin, r#"{"colour":"red"}"#).await;
    assert_eq!(r.status, 422, "{}", r.body);
    assert_eq!(r.body["errors"][0]["path"], "colour", "{}", r.body);
    // A valid probe on a node without a data plane is refused as unavailable, not run.
    let r = probe(&admin, "").await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(
        r.body["detail"].as_str().unwrap().contains("data plane"),
        "{}",
        r.body
    );
    let ent = node.create_authority("ent1").await;
    let r = probe(&ent, "{}").await;
    assert_eq!(r.status, 404, "{}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_endpoints_sharing_an_instance_are_refused() {
    let node = Node::start().await;
    for v in ["fw1", "fw2", "fw3"] {
        create_vnf(&node, &node.admin, v).await;
    }
    let body = "apiVersion: telvirt/v1\nkind: Network\nmetadata: { name: s1 }\nspec:\n  nodes:\n    - { name: gen-s1, kind: generator }\n    - { name: gen-s2, kind: generator }\n  steering:\n    - { name: fw, instances: [fw1, fw2] }\n    - { name: lb, instances: [fw2, fw3] }\n  links:\n    - gen-s1.out -> fw.in\n    - gen-s2.out -> lb.in\n";
    let reason = refused(&node, body, 422, "spec.steering[1].instances[0]").await;
    assert!(
        reason.contains("fw2.in") && reason.contains("spec.steering[0].instances[1]"),
        "{reason}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_network_holds_a_block_of_vnis_one_per_link() {
    let node = Node::start().await;
    for vnf in ["fw1", "nat1", "fw2", "nat2"] {
        create_vnf(&node, &node.admin, vnf).await;
    }
    let vnis = |r: &common::Reply| {
        (
            r.body["vni"].as_u64().unwrap(),
            r.body["vnis"].as_u64().unwrap(),
        )
    };
    let a = network("a", &["gen-a.out -> fw1.in", "fw1.out -> nat1.in"]);
    let r = node.create_network(&node.admin, &a).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let (a_first, a_count) = vnis(&r);
    assert!(a_first > 0);
    assert_eq!(a_count, 2);
    let r = node
        .create_network(&node.admin, &network("b", &["gen-b.out -> fw2.in"]))
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(vnis(&r), (a_first + 2, 1), "blocks must not overlap");

    // Fewer links keep the block; more links than it holds take a new one after every other.
    let fewer = network("a", &["gen-a.out -> fw1.in"]);
    let r = replace(&node, &node.admin, "a", &fewer).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(vnis(&r), (a_first, 2));
    let more = network(
        "a",
        &[
            "gen-a.out -> fw1.in",
            "fw1.out -> nat1.in",
            "nat1.out -> nat2.in",
        ],
    );
    let r = replace(&node, &node.admin, "a", &more).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(vnis(&r), (a_first + 3, 3));
    assert_eq!(vnis(&show(&node, &node.admin, "a").await), (a_first + 3, 3));
}

/// Once the VNI counter wraps (after 2^24 - 1 VNIs given out), a new block goes where no live
/// network's is: two networks never share a VNI, which would join their links between hosts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_vni_counter_wraps_no_two_networks_share_a_vni() {
    let node = Node::start().await;
    for vnf in ["fw1", "nat1", "fw2"] {
        create_vnf(&node, &node.admin, vnf).await;
    }
    let vnis = |r: &common::Reply| {
        (
            r.body["vni"].as_u64().unwrap(),
            r.body["vnis"].as_u64().unwrap(),
        )
    };
    let r = node
        .create_network(
            &node.admin,
            &network("a", &["gen-a.out -> fw1.in", "fw1.out -> nat1.in"]),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let (a_first, a_count) = vnis(&r);
    // The counter at the last VNI: the next block starts again from 1.
    node.store
        .put("/counters/vni", ((1u32 << 24) - 1).to_string().into_bytes())
        .await
        .unwrap();
    let r = node
        .create_network(&node.admin, &network("b", &["gen-b.out -> fw2.in"]))
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let (b_first, _) = vnis(&r);
    assert!(
        b_first < a_first || b_first >= a_first + a_count,
        "b's VNI {b_first} is in a's block {a_first}+{a_count}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_network_with_more_links_than_allowed_is_refused() {
    let node = Node::start().await;
    let links: Vec<String> = (0..=telvirt_model::network::MAX_NETWORK_LINKS)
        .map(|i| format!("gen-big.out -> v{i}.in"))
        .collect();
    let links: Vec<&str> = links.iter().map(String::as_str).collect();
    let reason = refused(&node, &network("big", &links), 422, "spec.links").await;
    assert!(
        reason.contains("1025 links") && reason.contains("1024"),
        "{reason}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_interface_pinned_to_a_host_stays_there_and_a_standby_holds_no_network() {
    let node = Node::start().await;
    // h1 (the node's own host) cordoned: the pair lands on h2 and h3; h4 holds the interfaces.
    node.cordon("h1").await;
    for h in ["h2", "h3", "h4"] {
        let mut record = common::host_record(h);
        record.tunnel = Some(format!("127.0.0.{}:4789", &h[1..]));
        node.controller.register_host(record).await.unwrap();
    }
    let pair = wasm_vnf("p1").replace("  ports:", "  redundancy: active-standby\n  ports:");
    assert_eq!(node.create_vnf(&node.admin, &pair).await.status, 201);
    let p1 = node
        .wait_vnf(&node.admin, "p1", |v| common::role_hosts(v).len() == 2)
        .await;
    let role = |r: &str| {
        common::role_hosts(&p1)
            .into_iter()
            .find(|(role, _)| role == r)
            .unwrap()
            .1
    };
    let (act, sby) = (role("active"), role("standby"));
    assert!(!["h1", "h4"].contains(&act.as_str()) && !["h1", "h4"].contains(&sby.as_str()));

    // An interface pinned to a host that does not exist: refused, naming the end.
    let nowhere = "apiVersion: telvirt/v1\nkind: Network\nmetadata: { name: edge }\nspec:\n  links: [host:vc0@h9 -> p1.in, p1.out -> host:vs0@h4]\n";
    let reason = refused(&node, nowhere, 422, "spec.links[0].from").await;
    assert!(reason.contains("there is no host h9"), "{reason}");
    let bad = nowhere.replace("host:vc0@h9", "host:vc0@");
    let reason = refused(&node, &bad, 422, "spec.links[0]").await;
    assert!(reason.contains("the host after '@'"), "{reason}");

    let edge = nowhere.replace("@h9", "@h4");
    assert_eq!(node.create_network(&node.admin, &edge).await.status, 201);
    // The interfaces' host and the active's hold the network, spanning both; the standby's
    // host holds none of it.
    for (host, holds) in [(act.as_str(), true), ("h4", true), (sby.as_str(), false)] {
        let set = node.controller.host_networks(host).await.unwrap();
        assert_eq!(set.networks.len(), usize::from(holds), "{host}: {set:?}");
        if holds {
            let span = &set.spans[0];
            assert_eq!(span.hosts["host:vc0"], "h4", "{span:?}");
            assert_eq!(span.hosts["host:vs0"], "h4", "{span:?}");
            assert_eq!(span.hosts["p1"], act, "{span:?}");
            assert!(span.tunnels.contains_key("h4") && span.tunnels.contains_key(&act));
        }
    }
    let shown = node
        .call(
            "GET",
            "/v1/networks/{name}",
            Some("edge"),
            Some(&node.admin),
            None,
        )
        .await;
    assert!(
        shown.body.to_string().contains("host:vc0@h4 -> p1.in"),
        "{}",
        shown.body
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_holding_a_network_rewire_when_a_vnf_it_names_is_placed_or_goes() {
    let node = Node::start().await;
    node.cordon("h1").await;
    for h in ["h2", "h3"] {
        let mut record = common::host_record(h);
        record.tunnel = Some(format!("127.0.0.{}:4789", &h[1..]));
        node.controller.register_host(record).await.unwrap();
    }
    node.cordon("h2").await;
    node.cordon("h3").await;
    // h3 holds the network through its pinned interface while p1 waits for a host.
    let edge = "apiVersion: telvirt/v1\nkind: Network\nmetadata: { name: edge }\nspec:\n  links: [host:vc0@h3 -> p1.in]\n";
    create_vnf(&node, &node.admin, "p1").await;
    let rev = || {
        node.controller
            .wait_networks("h3", u64::MAX, Duration::ZERO)
    };
    assert_eq!(node.create_network(&node.admin, edge).await.status, 201);
    let before = rev().await;
    node.uncordon("h2").await;
    node.wait_vnf(&node.admin, "p1", |v| common::role_hosts(v).len() == 1)
        .await;
    // p1 placed on h2: h3, which holds none of p1, sees a new revision and the span.
    let placed = rev().await;
    assert_ne!(placed, before, "h3 was not told p1 was placed");
    let set = node.controller.host_networks("h3").await.unwrap();
    assert_eq!(set.spans[0].hosts["p1"], "h2", "{set:?}");
    // p1 deleted: told again.
    let r = node
        .call(
            "DELETE",
            "/v1/vnfs/{name}",
            Some("p1"),
            Some(&node.admin),
            None,
        )
        .await;
    assert!(r.status < 300, "{}", r.body);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while rev().await == placed {
        assert!(
            std::time::Instant::now() < deadline,
            "h3 was not told p1 went"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A name another authority's network still names (its VNF of that name deleted) is not free
/// to anyone its owner may not wire: that VNF's traffic would be wired into the network, and
/// captured or steered by its owner. The network's owner may take the name again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_another_authoritys_network_names_is_not_free() {
    let node = Node::start().await;
    let ent = node.create_authority("ent1").await;
    let other = node.create_authority("ent2").await;
    node.upload_firewall(&ent).await;
    node.upload_firewall(&other).await;
    create_vnf(&node, &ent, "fw1").await;
    let r = node
        .create_network(&ent, &network("anet", &["gen-anet.out -> fw1.in"]))
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let r = node
        .call("DELETE", "/v1/vnfs/{name}", Some("fw1"), Some(&ent), None)
        .await;
    assert!(r.status == 202 || r.status == 204, "{}", r.body);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while node.names(&node.admin).await.iter().any(|n| n == "fw1") {
        assert!(std::time::Instant::now() < deadline, "fw1 never went");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for token in [&other, &node.admin] {
        let r = node.create_vnf(token, &wasm_vnf("fw1")).await;
        assert_eq!(r.status, 409, "{}", r.body);
        assert!(
            r.body.to_string().contains("another authority's network"),
            "{}",
            r.body
        );
    }
    create_vnf(&node, &ent, "fw1").await;
}
