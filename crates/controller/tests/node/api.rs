//! The REST API end to end on a real node (store, controller, agent, HTTP), every answer checked
//! against the OpenAPI document.

use crate::common;

use common::{Node, wasm_vnf};
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_openapi_and_schema_are_public() {
    let node = Node::start().await;
    let r = node.call("GET", "/v1/healthz", None, None, None).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["status"], "ok");
    let r = node.call("GET", "/v1/openapi.json", None, None, None).await;
    assert_eq!(r.status, 200);
    assert!(r.body["openapi"].as_str().unwrap().starts_with("3."));
    let r = node.call("GET", "/v1/schema/vnf", None, None, None).await;
    assert_eq!(r.status, 200);
    // The published schema accepts a good descriptor and refuses an unknown field.
    let schema = jsonschema::options()
        .with_draft(jsonschema::Draft::Draft202012)
        .build(&r.body)
        .unwrap();
    let good: Value = yaml_serde::from_str(&wasm_vnf("fw1")).unwrap();
    assert!(
        schema.is_valid(&good),
        "{:?}",
        schema
            .iter_errors(&good)
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
    );
    let mut bad = good.clone();
    bad["spec"]["turbo"] = Value::Bool(true);
    assert!(!schema.is_valid(&bad));
    let mut bad_unit = good.clone();
    bad_unit["spec"]["wasm"]["limits"]["memory"] = Value::String("16MB".into());
    assert!(!schema.is_valid(&bad_unit));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_needs_a_valid_token() {
    let node = Node::start().await;
    for (method, path) in [
        ("GET", "/v1/vnfs"),
        ("GET", "/v1/hosts"),
        ("GET", "/v1/authorities"),
        ("POST", "/v1/vnfs/{name}/lock"),
    ] {
        let r = node.call(method, path, Some("fw1"), None, None).await;
        assert_eq!(r.status, 401, "{method} {path} without a token");
        assert_eq!(r.content_type, "application/problem+json");
        let r = node
            .call(method, path, Some("fw1"), Some("tvt_not-a-token"), None)
            .await;
        assert_eq!(r.status, 401, "{method} {path} with a wrong token");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_round_trip_with_events() {
    let node = Node::start().await;
    let admin = node.admin.clone();
    let r = node.create_vnf(&admin, &wasm_vnf("fw1")).await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["phase"], "Pending");
    // No wasm runtime in this node: scheduled, then Failed with the reason, never Running.
    let vnf = node
        .wait_vnf(&admin, "fw1", |v| v["phase"] == "Failed")
        .await;
    assert_eq!(vnf["reason"], "runtime wasm is not available on this host");
    assert_eq!(vnf["placements"][0]["host"], "h1");
    let r = node
        .call(
            "GET",
            "/v1/vnfs/{name}/events",
            Some("fw1"),
            Some(&admin),
            None,
        )
        .await;
    let phases: Vec<&str> = r
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["to"].as_str().unwrap())
        .collect();
    assert_eq!(phases, ["Pending", "Scheduled", "Failed"]);

    let r = node
        .call(
            "POST",
            "/v1/vnfs/{name}/lock",
            Some("fw1"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["lock"]["by"], "admin");
    for verb in ["start", "stop", "lock"] {
        let path = format!("/v1/vnfs/{{name}}/{verb}");
        let r = node
            .call("POST", &path, Some("fw1"), Some(&admin), None)
            .await;
        assert_eq!(r.status, 409, "{verb} on a locked VNF");
        let detail = r.body["detail"].as_str().unwrap();
        assert!(detail.contains("locked by authority admin"), "{detail}");
    }
    let r = node
        .call(
            "POST",
            "/v1/vnfs/{name}/unlock",
            Some("fw1"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(r.status, 200);
    assert!(r.body.get("lock").is_none());
    let r = node
        .call(
            "POST",
            "/v1/vnfs/{name}/unlock",
            Some("fw1"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(r.status, 409, "unlocking an unlocked VNF");
    let r = node
        .call(
            "POST",
            "/v1/vnfs/{name}/stop",
            Some("fw1"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["desired"], "Stopped");
    let r = node
        .call("DELETE", "/v1/vnfs/{name}", Some("fw1"), Some(&admin), None)
        .await;
    assert_eq!(r.status, 204);
    let r = node
        .call("GET", "/v1/vnfs/{name}", Some("fw1"), Some(&admin), None)
        .await;
    assert_eq!(r.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_vnf_can_still_be_deleted_by_its_owner() {
    let node = Node::start().await;
    let op = node.create_authority("op1").await;
    assert_eq!(node.create_vnf(&op, &wasm_vnf("fw1")).await.status, 201);
    let r = node
        .call("POST", "/v1/vnfs/{name}/lock", Some("fw1"), Some(&op), None)
        .await;
    assert_eq!(r.status, 200);
    let r = node
        .call("DELETE", "/v1/vnfs/{name}", Some("fw1"), Some(&op), None)
        .await;
    assert!(r.status == 204 || r.status == 202, "{}", r.status);
    assert!(node.names(&op).await.is_empty() || r.status == 202);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorities_are_confined_to_their_own_vnfs() {
    let node = Node::start().await;
    let op1 = node.create_authority("op1").await;
    let op2 = node.create_authority("op2").await;
    assert_eq!(node.create_vnf(&op1, &wasm_vnf("fw1")).await.status, 201);
    assert_eq!(node.create_vnf(&op2, &wasm_vnf("nat1")).await.status, 201);

    assert_eq!(node.names(&op1).await, ["fw1"]);
    assert_eq!(node.names(&op2).await, ["nat1"]);
    assert_eq!(node.names(&node.admin).await, ["fw1", "nat1"]);

    // Every verb on another authority's VNF answers 404, as if it did not exist.
    for (method, path) in [
        ("GET", "/v1/vnfs/{name}"),
        ("GET", "/v1/vnfs/{name}/events"),
        ("POST", "/v1/vnfs/{name}/start"),
        ("POST", "/v1/vnfs/{name}/stop"),
        ("POST", "/v1/vnfs/{name}/lock"),
        ("POST", "/v1/vnfs/{name}/unlock"),
        ("DELETE", "/v1/vnfs/{name}"),
    ] {
        let r = node.call(method, path, Some("fw1"), Some(&op2), None).await;
        assert_eq!(r.status, 404, "op2: {method} {path} on op1's fw1");
        let missing = node
            .call(method, path, Some("nope"), Some(&op2), None)
            .await;
        assert_eq!(
            missing.body["detail"]
                .as_str()
                .unwrap()
                .replace("nope", "X"),
            r.body["detail"].as_str().unwrap().replace("fw1", "X"),
            "a hidden VNF must look exactly like a missing one"
        );
    }
    // Nothing op2 tried changed fw1.
    let fw1 = node.wait_vnf(&op1, "fw1", |_| true).await;
    assert_eq!(fw1["generation"], 1);
    assert!(fw1.get("lock").is_none());

    // The admin sees and acts on everything.
    let r = node
        .call(
            "POST",
            "/v1/vnfs/{name}/lock",
            Some("fw1"),
            Some(&node.admin),
            None,
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["owner"], "op1");

    // Only admin creates authorities; others see only themselves.
    let body = br#"{"name":"op3"}"#;
    let r = node
        .call(
            "POST",
            "/v1/authorities",
            None,
            Some(&op1),
            Some((body, "application/json")),
        )
        .await;
    assert_eq!(r.status, 403);
    let r = node
        .call("GET", "/v1/authorities", None, Some(&op1), None)
        .await;
    let names: Vec<&str> = r
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["op1"]);
    let r = node
        .call("GET", "/v1/authorities", None, Some(&node.admin), None)
        .await;
    assert_eq!(r.body.as_array().unwrap().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_authority_is_refused() {
    let node = Node::start().await;
    node.create_authority("op1").await;
    let r = node
        .call(
            "POST",
            "/v1/authorities",
            None,
            Some(&node.admin),
            Some((br#"{"name":"op1"}"#, "application/json")),
        )
        .await;
    assert_eq!(r.status, 409);
    let r = node
        .call(
            "POST",
            "/v1/authorities",
            None,
            Some(&node.admin),
            Some((br#"{"name":"Op_1"}"#, "application/json")),
        )
        .await;
    assert_eq!(r.status, 422);
    assert_eq!(r.body["errors"][0]["path"], "name");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_show_their_core_map() {
    let node = Node::start().await;
    let admin = node.admin.clone();
    assert_eq!(node.create_vnf(&admin, &wasm_vnf("fw1")).await.status, 201);
    node.wait_vnf(&admin, "fw1", |v| v["phase"] != "Pending")
        .await;
    let r = node
        .call("GET", "/v1/hosts", None, Some(&admin), None)
        .await;
    assert_eq!(r.status, 200);
    let r = node
        .call("GET", "/v1/hosts/{name}", Some("h1"), Some(&admin), None)
        .await;
    assert_eq!(r.status, 200);
    let cpus = r.body["cpus"].as_array().unwrap();
    assert_eq!(cpus.len(), 8);
    assert_eq!(cpus[0]["use"]["state"], "shared");
    let held: Vec<&Value> = cpus.iter().filter(|c| c["use"]["state"] == "vnf").collect();
    assert_eq!(held.len(), 1);
    assert_eq!(held[0]["use"]["vnf"], "fw1");
    let r = node
        .call(
            "GET",
            "/v1/hosts/{name}/coremap",
            Some("h1"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(r.status, 200);
    assert!(r.body.as_str().unwrap().contains("fw1"));
    let r = node
        .call("GET", "/v1/hosts/{name}", Some("nope"), Some(&admin), None)
        .await;
    assert_eq!(r.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unplaceable_vnf_stays_pending_with_the_reason() {
    let node = Node::start().await;
    let admin = node.admin.clone();
    let big = wasm_vnf("big").replace("count: 1", "count: 64");
    assert_eq!(node.create_vnf(&admin, &big).await.status, 201);
    let vnf = node
        .wait_vnf(&admin, "big", |v| {
            v["reason"].as_str().is_some_and(|r| r.contains("h1"))
        })
        .await;
    assert_eq!(vnf["phase"], "Pending");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_and_phases() {
    let node = Node::start().await;
    node.call("GET", "/v1/vnfs", None, Some(&node.admin), None)
        .await;
    // The metrics name VNFs and hosts: a token is needed.
    let r = node.call("GET", "/metrics", None, None, None).await;
    assert_eq!(r.status, 401);
    let r = node
        .call("GET", "/metrics", None, Some(&node.admin), None)
        .await;
    assert_eq!(r.status, 200);
    let text = r.body.as_str().unwrap();
    assert!(
        text.contains(
            "telvirt_http_requests_total{method=\"GET\",route=\"/v1/vnfs\",status=\"200\"} 1"
        ),
        "{text}"
    );
    assert!(text.contains("telvirt_vnfs{phase=\"Running\"} 0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_answers_without_a_silent_hosts_counters_and_says_which_host() {
    let node = Node::start().await;
    // h2 holds its heartbeat lease, but no agent takes its calls.
    node.controller
        .register_host(common::host_record("h2"))
        .await
        .unwrap();
    let _beat = common::beat(&node.controller, "h2");
    node.cordon("h1").await;
    let r = node.create_vnf(&node.admin, &wasm_vnf("fw9")).await;
    assert_eq!(r.status, 201, "{}", r.body);
    node.wait_vnf(&node.admin, "fw9", |v| v["placements"][0]["host"] == "h2")
        .await;
    let r = node
        .call("GET", "/metrics", None, Some(&node.admin), None)
        .await;
    assert_eq!(r.status, 200);
    let text = r.body.as_str().unwrap();
    assert!(
        text.contains("telvirt_host_scrape_success{host=\"h2\"} 0\n"),
        "{text}"
    );
    assert!(
        text.contains(
            "telvirt_vnf_info{vnf=\"fw9\",authority=\"admin\",runtime=\"wasm\",host=\"h2\"} 1"
        ),
        "{text}"
    );
    assert!(
        !text.contains("telvirt_vnf_packets_received_total{vnf=\"fw9\"}"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_paths_and_methods_are_problems() {
    let node = Node::start().await;
    let r = node.http_raw("GET", "/v1/nothing").await;
    assert_eq!(r.0, 404);
    assert_eq!(r.1, "application/problem+json");
    let r = node.http_raw("PUT", "/v1/vnfs").await;
    assert_eq!(r.0, 405);
    assert_eq!(r.1, "application/problem+json");
}

/// The schema published in docs/ is the one the code generates (regenerate with
/// `telvirt schema > docs/schema/vnf.schema.json`).
#[test]
fn published_schema_is_current() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/schema/vnf.schema.json");
    let published: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(
        published,
        telvirt_controller::descriptor_schema(),
        "docs/schema/vnf.schema.json is stale: run `telvirt schema > docs/schema/vnf.schema.json`"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorities_have_a_security_domain_that_reaches_the_agent() {
    let node = Node::start().await;
    let create = |body: &'static str| node.create_authority_json(body);
    // An unknown domain names the field and the valid domains, and creates nothing.
    let r = create(r#"{"name":"ent1","domain":"root"}"#).await;
    assert_eq!(r.status, 422, "{}", r.body);
    assert_eq!(r.body["errors"][0]["path"], "domain");
    let detail = r.body["detail"].as_str().unwrap();
    assert!(
        detail.contains("`root`") && detail.contains("operator, trusted, untrusted"),
        "{detail}"
    );
    let r = node
        .call("GET", "/v1/authorities", None, Some(&node.admin), None)
        .await;
    assert_eq!(r.body.as_array().unwrap().len(), 1, "{}", r.body);

    // Named, default (least privilege), and admin's.
    let r = create(r#"{"name":"ent1","domain":"trusted"}"#).await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["domain"], "trusted");
    let ent1 = r.body["token"].as_str().unwrap().to_owned();
    node.upload_firewall(&ent1).await;
    let r = create(r#"{"name":"ent2"}"#).await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["domain"], "untrusted");
    let r = node
        .call("GET", "/v1/authorities", None, Some(&node.admin), None)
        .await;
    let domains: Vec<(&str, &str)> = r
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["name"].as_str().unwrap(), a["domain"].as_str().unwrap()))
        .collect();
    assert_eq!(
        domains,
        [
            ("admin", "operator"),
            ("ent1", "trusted"),
            ("ent2", "untrusted")
        ]
    );

    // The owner's domain travels with the assignment to the agent.
    assert_eq!(node.create_vnf(&ent1, &wasm_vnf("fw1")).await.status, 201);
    assert_eq!(
        node.create_vnf(&node.admin, &wasm_vnf("nat1")).await.status,
        201
    );
    node.wait_vnf(&ent1, "fw1", |v| v["phase"] != "Pending")
        .await;
    node.wait_vnf(&node.admin, "nat1", |v| v["phase"] != "Pending")
        .await;
    let assigned: Vec<(String, String)> = node
        .controller
        .assignments("h1")
        .await
        .unwrap()
        .into_iter()
        .map(|a| (a.vnf.to_string(), a.domain))
        .collect();
    assert_eq!(
        assigned,
        [
            ("fw1".to_owned(), "trusted".to_owned()),
            ("nat1".to_owned(), "operator".to_owned())
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_security_policy_without_the_needed_domains_is_refused() {
    let node = Node::start().await;
    let e = node
        .controller
        .set_security_domains(["operator".to_owned(), "trusted".to_owned()])
        .unwrap_err();
    assert!(e.to_string().contains("`untrusted`"), "{e}");
    // Nothing changed: the built-in domains still hold.
    let r = node
        .create_authority_json(r#"{"name":"ent1","domain":"untrusted"}"#)
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    // A configured policy's domains replace the built-in ones.
    node.controller
        .set_security_domains(["operator", "untrusted", "lab"].map(String::from))
        .unwrap();
    let r = node
        .create_authority_json(r#"{"name":"ent2","domain":"trusted"}"#)
        .await;
    assert_eq!(r.status, 422, "{}", r.body);
    assert!(
        r.body["detail"]
            .as_str()
            .unwrap()
            .contains("lab, operator, untrusted"),
        "{}",
        r.body
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maps_and_stats_are_read_only_from_a_running_wasm_instance_the_caller_may_see() {
    let node = Node::start().await;
    let ent = node.create_authority("ent1").await;
    assert_eq!(node.create_vnf(&ent, &wasm_vnf("fw1")).await.status, 201);
    // This node's agent runs no runtime: the VNF fails, and has no instance to read.
    node.wait_vnf(&ent, "fw1", |v| v["phase"] == "Failed").await;
    let other = node.create_authority("ent2").await;
    for (path, what) in [
        ("/v1/vnfs/{name}/maps", "maps"),
        ("/v1/vnfs/{name}/stats", "counters"),
    ] {
        let r = node.call("GET", path, Some("fw1"), Some(&ent), None).await;
        assert_eq!(r.status, 409, "{}", r.body);
        let detail = r.body["detail"].as_str().unwrap();
        assert!(
            detail.contains("is Failed") && detail.contains(what),
            "{}",
            r.body
        );
        // Another authority sees no such VNF.
        let r = node
            .call("GET", path, Some("fw1"), Some(&other), None)
            .await;
        assert_eq!(r.status, 404);
    }
}
