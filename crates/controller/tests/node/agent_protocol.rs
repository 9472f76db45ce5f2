//! The agent protocol over HTTP (`/v1/agent/hosts/{host}/…`), driven as a remote agent would:
//! node credentials and what they may not do, registration, the assignments watch,
//! observations, module fetches and node calls routed to the host a VNF runs on.

use crate::common;

use std::time::Duration;

use common::{Node, firewall_ref, firewall_wasm, wasm_vnf};
use serde_json::{Value, json};
use telvirt_controller::modules::sha256_hex;

/// The OpenAPI path template of a concrete agent-protocol path.
fn agent_template(path: &str) -> String {
    let path = path.split('?').next().unwrap_or(path);
    let mut segments: Vec<&str> = path.split('/').collect();
    assert!(
        segments.len() > 5 && segments[..4] == ["", "v1", "agent", "hosts"],
        "{path} is not an agent path"
    );
    segments[4] = "{host}";
    match segments[5..] {
        ["calls", _] => segments[6] = "{id}",
        ["modules", _] => segments[6] = "{sha256}",
        _ => {}
    }
    segments.join("/")
}

/// A raw call of the agent protocol with `token`: (status, body as JSON or text), the answer
/// checked against the OpenAPI document.
async fn agent_call(
    node: &Node,
    method: &str,
    path: &str,
    token: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = reqwest::Client::new()
        .request(method.parse().unwrap(), format!("{}{path}", node.base))
        .bearer_auth(token);
    if let Some(body) = body {
        req = req.json(&body);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let content_type = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().split(';').next().unwrap().to_owned())
        .unwrap_or_default();
    let bytes = resp.bytes().await.unwrap();
    let body = if content_type.contains("json") {
        serde_json::from_slice(&bytes).unwrap()
    } else if bytes.is_empty() {
        Value::String(String::new())
    } else {
        Value::String(format!("{} bytes: {}", bytes.len(), sha256_hex(&bytes)))
    };
    node.check_against_openapi(method, &agent_template(path), status, &content_type, &body);
    (status, body)
}

/// Plays host `host`'s agent for one node call: takes it (long-poll), checks its request is
/// `expected`, answers `reply`; returns the call's id and the answer's status.
fn answer_one_call(
    node: &Node,
    host: &str,
    token: &str,
    expected: Value,
    reply: Value,
) -> tokio::task::JoinHandle<(u64, u16)> {
    let (base, host, token) = (node.base.clone(), host.to_owned(), token.to_owned());
    tokio::spawn(async move {
        let http = reqwest::Client::new();
        let calls: Value = http
            .get(format!("{base}/v1/agent/hosts/{host}/calls?wait_ms=20000"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let call = &calls.as_array().unwrap()[0];
        assert_eq!(call["request"], expected);
        let id = call["id"].as_u64().unwrap();
        let status = http
            .post(format!("{base}/v1/agent/hosts/{host}/calls/{id}"))
            .bearer_auth(&token)
            .json(&reply)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16();
        (id, status)
    })
}

/// A node with host h2 registered over the agent protocol and Ready (one heartbeat; its
/// credential returned) and the local host h1 cordoned, so new VNFs land on h2.
async fn node_with_remote_h2() -> (Node, String) {
    remote_h2_on(Node::start().await).await
}

/// [`node_with_remote_h2`] on `node`.
async fn remote_h2_on(node: Node) -> (Node, String) {
    let h2 = credential(&node, "h2").await;
    let (status, body) = agent_call(
        &node,
        "POST",
        "/v1/agent/hosts/h2/register",
        &h2,
        Some(host_record("h2")),
    )
    .await;
    assert_eq!(status, 204, "{body}");
    let (status, body) = agent_call(&node, "POST", "/v1/agent/hosts/h2/heartbeat", &h2, None).await;
    // The answer says how long the lease lasts: the agent fences its actives by it.
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["lease_ttl_ms"].as_u64(),
        Some(u64::try_from(node.controller.host_lease_ttl().as_millis()).unwrap()),
        "{body}"
    );
    node.cordon("h1").await;
    (node, h2)
}

async fn credential(node: &Node, host: &str) -> String {
    let r = node
        .call(
            "POST",
            "/v1/hosts/{name}/credential",
            Some(host),
            Some(&node.admin),
            None,
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["host"], host);
    let token = r.body["token"].as_str().unwrap().to_owned();
    assert!(token.starts_with("tvn_"), "{token}");
    token
}

fn host_record(name: &str) -> Value {
    json!({
        "spec": {
            "name": name,
            "topology": { "sockets": 1, "cores_per_socket": 4, "threads_per_core": 1, "numa_nodes_per_socket": 1 },
            "shared": "0"
        },
        "memory_bytes": 1u64 << 30,
        "runtimes": ["wasm", "vm"],
        "agent": true
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_admin_issues_node_credentials_and_only_for_host_names() {
    let node = Node::start().await;
    let ent = node.create_authority("ent1").await;
    let r = node
        .call(
            "POST",
            "/v1/hosts/{name}/credential",
            Some("h2"),
            Some(&ent),
            None,
        )
        .await;
    assert_eq!(r.status, 403, "{}", r.body);
    let r = node
        .call(
            "POST",
            "/v1/hosts/{name}/credential",
            Some("a..b"),
            Some(&node.admin),
            None,
        )
        .await;
    assert_eq!(r.status, 422, "{}", r.body);
    assert_eq!(r.error_paths(), ["host"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_and_authority_tokens_do_not_stand_in_for_each_other() {
    let node = Node::start().await;
    let h2 = credential(&node, "h2").await;
    // A node credential is not an authority.
    let r = node.call("GET", "/v1/vnfs", None, Some(&h2), None).await;
    assert_eq!(r.status, 401, "{}", r.body);
    assert!(
        r.body["detail"]
            .as_str()
            .unwrap()
            .contains("node credential"),
        "{}",
        r.body
    );
    // An authority's token (even admin's) is not a node.
    let (status, body) = agent_call(
        &node,
        "GET",
        "/v1/agent/hosts/h2/assignments",
        &node.admin,
        None,
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains("node credential"),
        "{body}"
    );
    // A node acts for its own host only.
    let (status, body) =
        agent_call(&node, "GET", "/v1/agent/hosts/h1/assignments", &h2, None).await;
    assert_eq!(status, 403, "{body}");
    let (status, _) = agent_call(&node, "POST", "/v1/agent/hosts/h1/heartbeat", &h2, None).await;
    assert_eq!(status, 403);
    // An unknown node token, and a replaced one, are nobody's.
    let (status, _) = agent_call(
        &node,
        "GET",
        "/v1/agent/hosts/h2/assignments",
        "tvn_0000",
        None,
    )
    .await;
    assert_eq!(status, 401);
    let rotated = credential(&node, "h2").await;
    let (status, _) = agent_call(&node, "GET", "/v1/agent/hosts/h2/assignments", &h2, None).await;
    assert_eq!(status, 401);
    let (status, body) = agent_call(
        &node,
        "GET",
        "/v1/agent/hosts/h2/assignments",
        &rotated,
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_for_another_host_of_garbage_or_with_a_bad_tunnel_is_refused_and_registers_nothing()
 {
    let node = Node::start().await;
    let h2 = credential(&node, "h2").await;
    let (status, body) = agent_call(
        &node,
        "POST",
        "/v1/agent/hosts/h2/register",
        &h2,
        Some(host_record("h3")),
    )
    .await;
    assert_eq!(status, 422, "{body}");
    assert!(body["detail"].as_str().unwrap().contains("h3"), "{body}");
    let (status, body) = agent_call(
        &node,
        "POST",
        "/v1/agent/hosts/h2/register",
        &h2,
        Some(json!({"spec": 1})),
    )
    .await;
    assert_eq!(status, 422, "{body}");
    // A tunnel address that is not IP:PORT names the field.
    let mut bad_tunnel = host_record("h2");
    bad_tunnel["tunnel"] = json!("10.0.0.5");
    let (status, body) = agent_call(
        &node,
        "POST",
        "/v1/agent/hosts/h2/register",
        &h2,
        Some(bad_tunnel),
    )
    .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["errors"][0]["path"], "tunnel", "{body}");
    let r = node
        .call("GET", "/v1/hosts", None, Some(&node.admin), None)
        .await;
    let names: Vec<&str> = r
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["h1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_agent_registers_watches_fetches_its_module_reports_and_answers_calls() {
    let (node, h2) = node_with_remote_h2().await;

    let (_, changes) = agent_call(
        &node,
        "GET",
        "/v1/agent/hosts/h2/changes?wait_ms=0",
        &h2,
        None,
    )
    .await;
    let before = changes["revision"].as_u64().unwrap();
    // Before anything is assigned, h2 may not fetch the module.
    let sha = sha256_hex(firewall_wasm());
    let module_path = format!("/v1/agent/hosts/h2/modules/{sha}");
    let (status, body) = agent_call(&node, "GET", &module_path, &h2, None).await;
    assert_eq!(status, 403, "{body}");

    let r = node.create_vnf(&node.admin, &wasm_vnf("fw1")).await;
    assert_eq!(r.status, 201, "{}", r.body);
    // The watch answers once the assignment revision moves past what the agent saw.
    let (status, changes) = agent_call(
        &node,
        "GET",
        &format!("/v1/agent/hosts/h2/changes?after={before}&wait_ms=20000"),
        &h2,
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_ne!(changes["revision"].as_u64().unwrap(), before, "{changes}");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let assignment = loop {
        let (_, list) = agent_call(&node, "GET", "/v1/agent/hosts/h2/assignments", &h2, None).await;
        if let Some(a) = list.as_array().unwrap().iter().find(|a| a["vnf"] == "fw1") {
            break a.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "fw1 was never assigned to h2"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        assignment["descriptor"]["spec"]["wasm"]["module"],
        firewall_ref()
    );
    // Assigned now: h2 fetches the module's exact bytes.
    let (status, body) = agent_call(&node, "GET", &module_path, &h2, None).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.as_str().unwrap().ends_with(&sha), "{body}");
    let (status, _) =
        agent_call(&node, "GET", "/v1/agent/hosts/h2/modules/nothex", &h2, None).await;
    assert_eq!(status, 422);

    report_running(&node, &h2, &assignment["generation"]).await;

    // A maps read is routed to h2's agent, which takes the call and replies: a reply larger
    // than an API request body may be (a VNF with many maps) still reaches the caller.
    let mut maps =
        vec![json!({"name": "blocked", "kind": "hash", "entries": 3, "max_entries": 16})];
    maps.extend((0..15_000).map(|i| {
        json!({"name": format!("m{i:05}-{}", "x".repeat(40)), "kind": "array", "entries": 0, "max_entries": 1})
    }));
    assert!(serde_json::to_vec(&maps).unwrap().len() > 1 << 20);
    let agent = answer_one_call(
        &node,
        "h2",
        &h2,
        json!({"call": "maps", "vnf": "fw1"}),
        json!({"outcome": "maps", "maps": maps}),
    );
    let r = node
        .call(
            "GET",
            "/v1/vnfs/{name}/maps",
            Some("fw1"),
            Some(&node.admin),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body[0]["name"], "blocked");
    assert_eq!(r.body[0]["entries"], 3);
    assert_eq!(r.body.as_array().map(Vec::len), Some(15_001));
    let (id, status) = agent.await.unwrap();
    assert_eq!(status, 204);
    // Answered: a second reply, and a reply that is not one, are refused.
    let (status, _) = agent_call(
        &node,
        "POST",
        &format!("/v1/agent/hosts/h2/calls/{id}"),
        &h2,
        Some(json!({"outcome": "failed", "reason": "late"})),
    )
    .await;
    assert_eq!(status, 404);
    let (status, _) = agent_call(
        &node,
        "POST",
        &format!("/v1/agent/hosts/h2/calls/{id}"),
        &h2,
        Some(json!({"outcome": "rebooted"})),
    )
    .await;
    assert_eq!(status, 422);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_console_is_read_on_its_host_and_bad_requests_for_it_are_refused() {
    let (node, h2) = node_with_remote_h2().await;
    let vm = "apiVersion: telvirt/v1\nkind: Vnf\nmetadata: { name: vm1 }\nspec:\n  runtime: vm\n  vm: { memory: 64MiB }\n";
    assert_eq!(node.create_vnf(&node.admin, vm).await.status, 201);
    node.wait_vnf(&node.admin, "vm1", |v| v["placements"][0]["host"] == "h2")
        .await;

    let console = |query: &'static str| {
        let node = &node;
        async move {
            node.call(
                "GET",
                &format!("/v1/vnfs/{{name}}/console{query}"),
                Some("vm1"),
                Some(&node.admin),
                None,
            )
            .await
        }
    };
    for bad in ["?lines=0", "?lines=10001", "?lines=many", "?tail=3"] {
        let r = console(bad).await;
        assert_eq!(r.status, 422, "{bad}: {}", r.body);
    }
    // h2's agent takes the call and answers with the lines.
    let agent = answer_one_call(
        &node,
        "h2",
        &h2,
        json!({"call": "console", "vnf": "vm1", "lines": 2}),
        json!({"outcome": "console", "lines": ["booting", "ready"]}),
    );
    let r = console("?lines=2").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body, json!(["booting", "ready"]));
    assert_eq!(agent.await.unwrap().1, 204);

    // A wasm VNF has no serial console.
    let r = node.create_vnf(&node.admin, &wasm_vnf("fw9")).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let r = node
        .call(
            "GET",
            "/v1/vnfs/{name}/console",
            Some("fw9"),
            Some(&node.admin),
            None,
        )
        .await;
    assert_eq!(r.status, 409, "{}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn net_show_asks_a_host_that_holds_no_part_of_a_network_only_when_its_heartbeat_names_it() {
    let (node, h2) = node_with_remote_h2().await;
    let net = "apiVersion: telvirt/v1\nkind: Network\nmetadata: { name: n2 }\nspec:\n  nodes:\n    - { name: gen, kind: generator }\n    - { name: sink, kind: sink }\n  links:\n    - gen.out -> sink.in\n";
    let r = node.create_network(&node.admin, net).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let beat = |departed: Value| {
        agent_call(
            &node,
            "POST",
            "/v1/agent/hosts/h2/heartbeat",
            &h2,
            Some(json!({ "departed": departed })),
        )
    };
    let show = || {
        node.call(
            "GET",
            "/v1/networks/{name}",
            Some("n2"),
            Some(&node.admin),
            None,
        )
    };
    // A body the controller cannot use is passed over, saying why; the heartbeat stands (a
    // host is never made NotReady by what its heartbeat's body says).
    let many: Vec<String> = (0..=telvirt_api::MAX_DEPARTED_NAMED)
        .map(|i| format!("n{i}"))
        .collect();
    for (departed, why) in [
        (json!(many), "at most 256"),
        (json!(["bad name!"]), "not a network name"),
        (json!("n2"), "not a heartbeat body"),
    ] {
        let (status, body) = beat(departed).await;
        assert_eq!(status, 200, "{body}");
        assert!(body["lease_ttl_ms"].as_u64() > Some(0), "{body}");
        assert!(
            body["body_refused"].as_str().unwrap().contains(why),
            "{body}"
        );
    }
    // h2 keeps the counts of no network: `net show` does not ask it.
    let (status, body) = beat(json!([])).await;
    assert_eq!(status, 200, "{body}");
    // (h2's calls read while `net show` runs: a call to h2 would wait there.)
    let (r, (status, calls)) = tokio::join!(
        show(),
        agent_call(
            &node,
            "GET",
            "/v1/agent/hosts/h2/calls?wait_ms=1000",
            &h2,
            None,
        )
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!((status, calls), (200, json!([])));
    // It keeps n2's: asked, and what it kept is shown.
    let (status, body) = beat(json!(["n2"])).await;
    assert_eq!(status, 200, "{body}");
    let descriptor = r.body["descriptor"].clone();
    let agent = answer_one_call(
        &node,
        "h2",
        &h2,
        json!({"call": "network_status", "network": descriptor}),
        json!({"outcome": "network_status", "status": {
            "links": [],
            "table": "",
            "departed": [{
                "host": "h2",
                "left_at": "2999-01-01T00:00:00.000Z",
                "links": [{"link": "gen.out -> sink.in", "active": false, "packets": 7, "bytes": 448, "drops": 0}],
                "node_drops": [{"node": "gen", "unlinked": 3, "refused": 0}]
            }]
        }}),
    );
    let r = show().await;
    assert_eq!(agent.await.unwrap().1, 204);
    assert_eq!(r.status, 200, "{}", r.body);
    let departed = r.body["status"]["departed"].clone();
    assert_eq!(departed[0]["host"], "h2", "{}", r.body);
    assert_eq!(departed[0]["links"][0]["packets"], 7, "{}", r.body);
    assert!(
        r.body["status"]["table"]
            .as_str()
            .unwrap()
            .contains("host h2, which the network left at"),
        "{}",
        r.body
    );
    // A heartbeat without a body (an agent from before they had one) does not say: asked.
    let (status, body) = agent_call(&node, "POST", "/v1/agent/hosts/h2/heartbeat", &h2, None).await;
    assert_eq!(status, 200, "{body}");
    let agent = answer_one_call(
        &node,
        "h2",
        &h2,
        json!({"call": "network_status", "network": descriptor}),
        json!({"outcome": "network_status", "status": null}),
    );
    let r = show().await;
    assert_eq!(agent.await.unwrap().1, 204);
    assert_eq!(r.status, 200, "{}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_gets_the_networks_naming_its_vnfs_and_answers_their_status_and_probes() {
    let (node, h2) = node_with_remote_h2().await;
    let r = node.create_vnf(&node.admin, &wasm_vnf("fw1")).await;
    assert_eq!(r.status, 201, "{}", r.body);
    node.wait_vnf(&node.admin, "fw1", |v| v["placements"][0]["host"] == "h2")
        .await;
    let (status, set) = agent_call(&node, "GET", "/v1/agent/hosts/h2/networks", &h2, None).await;
    assert_eq!(status, 200, "{set}");
    assert_eq!(set["networks"], json!([]));
    let before = set["revision"].as_u64().unwrap();
    // The agent waits for a change of its networks.
    let waiter = {
        let (base, h2) = (node.base.clone(), h2.clone());
        tokio::spawn(async move {
            let changes: Value = reqwest::Client::new()
                .get(format!(
                    "{base}/v1/agent/hosts/h2/networks/changes?after={before}&wait_ms=20000"
                ))
                .bearer_auth(&h2)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            changes["revision"].as_u64().unwrap()
        })
    };
    let net = "apiVersion: telvirt/v1\nkind: Network\nmetadata: { name: n1 }\nspec:\n  nodes:\n    - { name: gen, kind: generator }\n    - { name: sink, kind: sink }\n  links:\n    - gen.out -> fw1.in\n    - fw1.out -> sink.in\n";
    let r = node.create_network(&node.admin, net).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let after = tokio::time::timeout(Duration::from_secs(20), waiter)
        .await
        .expect("the network change never ended the agent's wait")
        .unwrap();
    assert_ne!(after, before);
    let (_, set) = agent_call(&node, "GET", "/v1/agent/hosts/h2/networks", &h2, None).await;
    let networks = set["networks"].as_array().unwrap();
    assert_eq!(networks.len(), 1, "{set}");
    assert_eq!(networks[0]["metadata"]["name"], "n1");
    // Another host's credential does not read h2's networks.
    let h3 = credential(&node, "h3").await;
    let (status, _) = agent_call(&node, "GET", "/v1/agent/hosts/h2/networks", &h3, None).await;
    assert_eq!(status, 403);

    // `net show` asks h2's data plane: its counters are what h2 answers.
    let agent = answer_one_call(
        &node,
        "h2",
        &h2,
        json!({"call": "network_status", "network": networks[0]}),
        json!({"outcome": "network_status", "status": {
            "links": [
                {"link": "gen.out -> fw1.in", "active": true, "packets": 5, "bytes": 320, "drops": 0},
                {"link": "fw1.out -> sink.in", "active": true, "packets": 4, "bytes": 256, "drops": 1}
            ],
            "table": "gen -> fw1 -> sink"
        }}),
    );
    let r = node
        .call(
            "GET",
            "/v1/networks/{name}",
            Some("n1"),
            Some(&node.admin),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["status"]["links"][0]["packets"], 5, "{}", r.body);
    assert_eq!(r.body["status"]["links"][1]["drops"], 1, "{}", r.body);
    assert_eq!(agent.await.unwrap().1, 204);

    // A bad probe is refused before any host is asked; a good one runs on h2.
    let probe = |body: &'static [u8]| {
        node.call(
            "POST",
            "/v1/networks/{name}/latency",
            Some("n1"),
            Some(&node.admin),
            Some((body, "application/json")),
        )
    };
    let r = probe(br#"{"rate_pps": 0}"#).await;
    assert_eq!(r.status, 422, "{}", r.body);
    assert!(r.body.to_string().contains("rate_pps"), "{}", r.body);
    let agent = answer_one_call(
        &node,
        "h2",
        &h2,
        json!({"call": "probe", "network": networks[0], "probe": {"packets": 100}}),
        json!({"outcome": "failed", "reason": "network n1 is not applied on this node's data plane yet; try again"}),
    );
    let r = probe(br#"{"packets": 100}"#).await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.body.to_string().contains("not applied"), "{}", r.body);
    assert_eq!(agent.await.unwrap().1, 204);

    // Deleted: h2's networks move on and hold nothing.
    let r = node
        .call(
            "DELETE",
            "/v1/networks/{name}",
            Some("n1"),
            Some(&node.admin),
            None,
        )
        .await;
    assert!(r.status < 300, "{}", r.body);
    let (_, set) = agent_call(&node, "GET", "/v1/agent/hosts/h2/networks", &h2, None).await;
    assert_eq!(set["networks"], json!([]));
    assert_ne!(set["revision"].as_u64().unwrap(), after);
}

/// Plays h2's agent: reports fw1 Running at `generation`, and waits until the node says so.
async fn report_running(node: &Node, h2: &str, generation: &Value) {
    let observation =
        json!({ "vnf": "fw1", "phase": "Running", "reason": "running", "generation": generation });
    let path = "/v1/agent/hosts/h2/observations";
    let (status, body) = agent_call(node, "POST", path, h2, Some(observation)).await;
    assert_eq!(status, 204, "{body}");
    node.wait_vnf(&node.admin, "fw1", |v| v["phase"] == "Running")
        .await;
}

/// Plays h2's agent: takes its next node call (long-poll) and checks its request is `expected`;
/// returns the call's id.
async fn take_call(node: &Node, h2: &str, expected: Value) -> u64 {
    let (status, calls) = agent_call(
        node,
        "GET",
        "/v1/agent/hosts/h2/calls?wait_ms=20000",
        h2,
        None,
    )
    .await;
    assert_eq!(status, 200, "{calls}");
    let call = calls
        .as_array()
        .and_then(|c| c.first())
        .unwrap_or_else(|| panic!("no call came for h2, {expected} awaited: {calls}"));
    assert_eq!(call["request"], expected);
    call["id"].as_u64().unwrap()
}

async fn answer_call(node: &Node, h2: &str, id: u64, reply: Value) {
    let path = format!("/v1/agent/hosts/h2/calls/{id}");
    let (status, body) = agent_call(node, "POST", &path, h2, Some(reply)).await;
    assert_eq!(status, 204, "{body}");
}

/// An upgrade to a granted host path whose grant the admin revokes while h2 swaps: the revoke
/// finds nothing in use (the record still names the uploaded module), so the upgrade may not
/// record the path. It asks h2 to swap the previous module back and answers 409; with the
/// grant standing, the same upgrade is recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_whose_grant_is_revoked_during_the_swap_is_swapped_back_and_refused() {
    let (node, h2) = node_with_remote_h2().await;
    let alice = node.create_authority("alice").await;
    let grants = |method: &'static str| {
        let node = &node;
        async move {
            let r = node
                .call(
                    method,
                    "/v1/authorities/{name}/grants",
                    Some("alice"),
                    Some(&node.admin),
                    Some((
                        br#"{"paths":["/srv/modules/"]}"#.as_slice(),
                        "application/json",
                    )),
                )
                .await;
            assert_eq!(r.status, 200, "{method}: {}", r.body);
        }
    };
    grants("POST").await;
    let r = node.create_vnf(&alice, &wasm_vnf("fw1")).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let v = node
        .wait_vnf(&alice, "fw1", |v| v["placements"][0]["host"] == "h2")
        .await;
    report_running(&node, &h2, &v["generation"]).await;

    let v2 = "/srv/modules/v2.wasm";
    let upgrade = || {
        let (base, alice) = (node.base.clone(), alice.clone());
        tokio::spawn(async move {
            let resp = reqwest::Client::new()
                .post(format!("{base}/v1/vnfs/fw1/upgrade"))
                .bearer_auth(&alice)
                .json(&json!({ "module": v2 }))
                .send()
                .await
                .unwrap();
            (resp.status().as_u16(), resp.json::<Value>().await.unwrap())
        })
    };
    let module_of = || async {
        let v = node.wait_vnf(&alice, "fw1", |_| true).await;
        v["descriptor"]["spec"]["wasm"]["module"].clone()
    };
    // Each swap names the module it swaps over (the host refuses if another runs).
    let swap = |module: &str, from: &str| json!({"call": "upgrade", "vnf": "fw1", "module": module, "from": from});
    let (firewall, v2_hash) = (sha256_hex(firewall_wasm()), "2".repeat(64));
    let swapped = json!({"outcome": "upgraded", "hash": v2_hash});

    let sent = upgrade();
    let id = take_call(&node, &h2, swap(v2, &firewall)).await;
    grants("DELETE").await;
    answer_call(&node, &h2, id, swapped.clone()).await;
    // Not recorded: the module that ran before is swapped back, over the one swapped in.
    let id = take_call(&node, &h2, swap(&firewall_ref(), &v2_hash)).await;
    let back = json!({"outcome": "upgraded", "hash": firewall});
    answer_call(&node, &h2, id, back).await;
    let (status, body) = sent.await.unwrap();
    assert_eq!(status, 409, "{body}");
    assert!(
        body.to_string()
            .contains("changed while this request was checked"),
        "{body}"
    );
    assert_eq!(module_of().await, json!(firewall_ref()));

    // Granted again and left alone: recorded.
    grants("POST").await;
    let sent = upgrade();
    let id = take_call(&node, &h2, swap(v2, &firewall)).await;
    answer_call(&node, &h2, id, swapped).await;
    let (status, body) = sent.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(module_of().await, json!(v2));
}

/// An upgrade whose record write was applied but not answered (an etcd call that timed out
/// after its commit) reads the record back: recorded, 200, nothing swapped back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_whose_record_write_went_unanswered_reads_it_back() {
    let (node, store) = Node::start_hooked().await;
    let (node, h2) = remote_h2_on(node).await;
    let r = node.create_vnf(&node.admin, &wasm_vnf("fw1")).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let v = node
        .wait_vnf(&node.admin, "fw1", |v| v["placements"][0]["host"] == "h2")
        .await;
    report_running(&node, &h2, &v["generation"]).await;

    let v2 = "/srv/modules/v2.wasm";
    let sent = {
        let (base, admin) = (node.base.clone(), node.admin.clone());
        tokio::spawn(async move {
            let resp = reqwest::Client::new()
                .post(format!("{base}/v1/vnfs/fw1/upgrade"))
                .bearer_auth(&admin)
                .json(&json!({ "module": v2 }))
                .send()
                .await
                .unwrap();
            (resp.status().as_u16(), resp.json::<Value>().await.unwrap())
        })
    };
    let swap =
        json!({"call": "upgrade", "vnf": "fw1", "module": v2, "from": sha256_hex(firewall_wasm())});
    let id = take_call(&node, &h2, swap).await;
    // The next write is the upgrade's record.
    store
        .unanswered_txn
        .store(true, std::sync::atomic::Ordering::SeqCst);
    answer_call(
        &node,
        &h2,
        id,
        json!({"outcome": "upgraded", "hash": "2".repeat(64)}),
    )
    .await;
    let (status, body) = sent.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(
        !store
            .unanswered_txn
            .load(std::sync::atomic::Ordering::SeqCst),
        "the record's write was the one left unanswered"
    );
    let v = node.wait_vnf(&node.admin, "fw1", |_| true).await;
    assert_eq!(v["descriptor"]["spec"]["wasm"]["module"], v2);
}
