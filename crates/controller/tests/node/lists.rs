//! `GET /v1/vnfs` pages and label selectors on a real node, every answer checked against the
//! OpenAPI document (including the `X-Continue` header).

use crate::common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{Node, labelled, names, wasm_vnf};
use serde_json::Value;

/// Percent-encodes a query value.
fn enc(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Every page of `query` with `limit`, following continue tokens: the pages' names.
async fn pages(node: &Node, token: &str, limit: usize, query: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut next: Option<String> = None;
    loop {
        let mut q = format!("limit={limit}");
        if !query.is_empty() {
            q.push('&');
            q.push_str(query);
        }
        if let Some(t) = &next {
            q.push_str(&format!("&continue={}", enc(t)));
        }
        let (reply, token_next) = node.list_vnfs(token, &q).await;
        assert_eq!(reply.status, 200, "{q}: {}", reply.body);
        let page = names(&reply);
        assert!(page.len() <= limit, "{q}: {} > {limit}", page.len());
        out.push(page);
        match token_next {
            Some(t) => next = Some(t),
            None => return out,
        }
        assert!(out.len() < 1000, "the pages never end");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_cover_every_vnf_exactly_once_while_others_are_created() {
    let node = Node::start().await;
    let mut before = BTreeSet::new();
    for i in 0..23 {
        let name = format!("fw{i:02}");
        let r = node.create_vnf(&node.admin, &wasm_vnf(&name)).await;
        assert_eq!(r.status, 201, "{}", r.body);
        before.insert(name);
    }

    // Without a limit: everything, no token (the answer callers got before pages existed).
    let (all, next) = node.list_vnfs(&node.admin, "").await;
    assert_eq!(all.status, 200);
    assert_eq!(next, None);
    assert_eq!(names(&all), before.iter().cloned().collect::<Vec<_>>());

    // Exactly a page's worth: one page, no token pointing at an empty one.
    let (one, next) = node.list_vnfs(&node.admin, "limit=23").await;
    assert_eq!(names(&one).len(), 23);
    assert_eq!(next, None);

    // Pages of 4 while another task creates VNFs whose names sort before, among and after.
    let creator = {
        let base = node.base.clone();
        let admin = node.admin.clone();
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut made = Vec::new();
            for i in 0..15 {
                let name = match i % 3 {
                    0 => format!("a-{i}"),
                    1 => format!("fw{:02}x", i),
                    _ => format!("zz-{i}"),
                };
                let r = http
                    .post(format!("{base}/v1/vnfs"))
                    .bearer_auth(&admin)
                    .header("content-type", "application/yaml")
                    .body(wasm_vnf(&name))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status().as_u16(), 201);
                made.push(name);
            }
            made
        })
    };
    let listed = pages(&node, &node.admin, 4, "").await;
    let made = creator.await.unwrap();

    let flat: Vec<String> = listed.iter().flatten().cloned().collect();
    let unique: BTreeSet<String> = flat.iter().cloned().collect();
    assert_eq!(unique.len(), flat.len(), "a VNF was listed twice: {flat:?}");
    let mut sorted = flat.clone();
    sorted.sort();
    assert_eq!(flat, sorted, "pages are not in name order");
    for name in &before {
        assert!(
            unique.contains(name),
            "{name} existed throughout but was not listed"
        );
    }
    for name in &unique {
        assert!(
            before.contains(name) || made.contains(name),
            "{name} was never created"
        );
    }
    for page in &listed[..listed.len() - 1] {
        assert_eq!(page.len(), 4, "a page before the last is short: {listed:?}");
    }

    // Once quiet, paging yields exactly the unpaged list.
    let quiet: Vec<String> = pages(&node, &node.admin, 7, "").await.concat();
    let (whole, _) = node.list_vnfs(&node.admin, "").await;
    assert_eq!(quiet, names(&whole));
    assert_eq!(quiet.len(), 23 + 15);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn label_selectors_filter_by_each_operator_and_within_the_callers_vnfs() {
    let node = Node::start().await;
    let ent = node.create_authority("ent1").await;
    for (token, name, labels) in [
        (&node.admin, "edge-a", "role: edge, zone: a"),
        (&node.admin, "edge-b", "role: edge, zone: b"),
        (&node.admin, "core-a", "role: core, zone: a"),
        (&node.admin, "plain", ""),
        (&ent, "ent-edge", "role: edge, zone: a"),
    ] {
        let r = node.create_vnf(token, &labelled(name, labels)).await;
        assert_eq!(r.status, 201, "{name}: {}", r.body);
    }
    let select = |selector: &'static str| {
        let node = &node;
        async move {
            let (reply, next) = node
                .list_vnfs(&node.admin, &format!("labelSelector={}", enc(selector)))
                .await;
            assert_eq!(reply.status, 200, "{selector}: {}", reply.body);
            assert_eq!(next, None);
            names(&reply)
        }
    };
    assert_eq!(select("role=edge").await, ["edge-a", "edge-b", "ent-edge"]);
    assert_eq!(select("role==edge").await, ["edge-a", "edge-b", "ent-edge"]);
    assert_eq!(select("role!=edge").await, ["core-a", "plain"]);
    assert_eq!(
        select("zone").await,
        ["core-a", "edge-a", "edge-b", "ent-edge"]
    );
    assert_eq!(select("!zone").await, ["plain"]);
    assert_eq!(select("role=edge,zone=a").await, ["edge-a", "ent-edge"]);
    assert_eq!(select("role=edge, zone!=a").await, ["edge-b"]);
    assert!(select("role=none").await.is_empty());
    assert_eq!(select("").await.len(), 5);

    // An authority's selection holds only its own VNFs.
    let (r, _) = node
        .list_vnfs(&ent, &format!("labelSelector={}", enc("role=edge")))
        .await;
    assert_eq!(names(&r), ["ent-edge"]);

    // Pages of a selection skip what does not match and still end.
    let paged = pages(
        &node,
        &node.admin,
        1,
        &format!("labelSelector={}", enc("zone=a")),
    )
    .await;
    assert_eq!(paged, [vec!["core-a"], vec!["edge-a"], vec!["ent-edge"]]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_list_parameters_are_refused_naming_them() {
    let node = Node::start().await;
    let r = node.create_vnf(&node.admin, &wasm_vnf("fw1")).await;
    assert_eq!(r.status, 201, "{}", r.body);
    for (query, param) in [
        ("limit=0".to_owned(), "limit"),
        ("limit=1001".to_owned(), "limit"),
        ("limit=ten".to_owned(), "limit"),
        ("limit=".to_owned(), "limit"),
        ("limit=1&limit=2".to_owned(), "limit"),
        (format!("continue={}", enc("/vnfs/fw1")), "continue"),
        ("continue=".to_owned(), "continue"),
        (
            format!("labelSelector={}", enc("role=edge,")),
            "labelSelector",
        ),
        (
            format!("labelSelector={}", enc("role in (a)")),
            "labelSelector",
        ),
        (format!("labelSelector={}", enc("ro le=x")), "labelSelector"),
        ("selector=role".to_owned(), "selector"),
    ] {
        let (r, next) = node.list_vnfs(&node.admin, &query).await;
        assert_eq!(r.status, 422, "{query}: {}", r.body);
        assert_eq!(r.error_paths(), [param], "{query}: {}", r.body);
        assert_eq!(next, None);
    }
    // Nothing changed: the list is as before.
    assert_eq!(node.names(&node.admin).await, ["fw1"]);
}

/// Reads server-sent events from a streaming answer.
struct EventStream {
    answer: reqwest::Response,
    decoder: telvirt_model::sse::SseDecoder,
}

impl EventStream {
    async fn open(node: &Node, token: &str, query: &str) -> Result<Self, (u16, Value)> {
        let answer = reqwest::Client::new()
            .get(format!("{}/v1/watch/vnfs{query}", node.base))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        let status = answer.status().as_u16();
        if status != 200 {
            return Err((status, answer.json().await.unwrap()));
        }
        let content_type = answer.headers()["content-type"]
            .to_str()
            .unwrap()
            .to_owned();
        assert_eq!(content_type, "text/event-stream");
        Ok(Self {
            answer,
            decoder: Default::default(),
        })
    }

    /// The next event (keep-alive comments skipped): its name and its data, each checked
    /// against the OpenAPI document.
    async fn next(&mut self, node: &Node) -> (String, Value) {
        loop {
            if let Some(event) = self.decoder.next_event() {
                let data: Value = serde_json::from_str(&event.data).unwrap();
                node.check_against_openapi(
                    "GET",
                    "/v1/watch/vnfs",
                    200,
                    "text/event-stream",
                    &data,
                );
                assert_eq!(data["type"].as_str().unwrap().to_lowercase(), event.name);
                return (event.name, data);
            }
            let chunk = tokio::time::timeout(Duration::from_secs(20), self.answer.chunk())
                .await
                .expect("an event within 20 s")
                .unwrap()
                .expect("the stream goes on");
            self.decoder.push(&chunk);
        }
    }

    /// Events until the first `SYNCED`: the names shown as added.
    async fn until_synced(&mut self, node: &Node) -> Vec<String> {
        let mut added = Vec::new();
        loop {
            let (name, data) = self.next(node).await;
            match name.as_str() {
                "added" => added.push(data["name"].as_str().unwrap().to_owned()),
                "synced" => return added,
                other => panic!("{other} before synced: {data}"),
            }
        }
    }

    /// Events until one of `kind` for VNF `vnf`; every event on the way must name a VNF in
    /// `allowed`.
    async fn until(&mut self, node: &Node, kind: &str, vnf: &str, allowed: &[&str]) -> Value {
        loop {
            let (name, data) = self.next(node).await;
            let of = data["name"].as_str().unwrap_or_default();
            assert!(
                allowed.contains(&of),
                "{name} of {of}, outside the view: {data}"
            );
            if name == kind && of == vnf {
                return data;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_shows_the_callers_matching_vnfs_then_each_change_to_them() {
    let node = Node::start().await;
    let ent = node.create_authority("ent1").await;
    node.upload_firewall(&ent).await;
    for (token, name, labels) in [
        (&node.admin, "edge-a", "role: edge"),
        (&node.admin, "core-a", "role: core"),
        (&ent, "ent-edge", "role: edge"),
    ] {
        let r = node.create_vnf(token, &labelled(name, labels)).await;
        assert_eq!(r.status, 201, "{name}: {}", r.body);
    }
    let mut all = EventStream::open(&node, &node.admin, "").await.unwrap();
    let mut shown = all.until_synced(&node).await;
    shown.sort();
    assert_eq!(shown, ["core-a", "edge-a", "ent-edge"]);
    let selector = format!("?labelSelector={}", enc("role=edge"));
    let mut edges = EventStream::open(&node, &ent, &selector).await.unwrap();
    assert_eq!(edges.until_synced(&node).await, ["ent-edge"]);

    // Another authority's VNF and one of its own that does not match are not shown; one that
    // matches is, with its changes, and so is its delete.
    for (token, name, labels) in [
        (&node.admin, "edge-b", "role: edge"),
        (&ent, "ent-core", "role: core"),
        (&ent, "ent-edge2", "role: edge"),
    ] {
        let r = node.create_vnf(token, &labelled(name, labels)).await;
        assert_eq!(r.status, 201, "{name}: {}", r.body);
    }
    let allowed = ["ent-edge", "ent-edge2"];
    let added = edges.until(&node, "added", "ent-edge2", &allowed).await;
    assert_eq!(added["vnf"]["owner"], "ent1", "{added}");
    // Placed: its phase moves on from Pending.
    let changed = edges.until(&node, "modified", "ent-edge2", &allowed).await;
    assert_ne!(changed["vnf"]["phase"], "Pending", "{changed}");
    let r = node
        .call(
            "DELETE",
            "/v1/vnfs/{name}",
            Some("ent-edge2"),
            Some(&ent),
            None,
        )
        .await;
    assert!(r.status == 202 || r.status == 204, "{}", r.body);
    let deleted = edges.until(&node, "deleted", "ent-edge2", &allowed).await;
    assert!(deleted.get("vnf").is_none(), "{deleted}");
    // The admin's unfiltered watch saw the others come.
    all.until(
        &node,
        "added",
        "ent-core",
        &[
            "core-a",
            "edge-a",
            "ent-edge",
            "edge-b",
            "ent-core",
            "ent-edge2",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_watch_parameters_are_refused_naming_them() {
    let node = Node::start().await;
    for (query, path) in [
        ("?limit=5", "limit"),
        ("?labelSelector=a%3D%3D%3Db", "labelSelector"),
        ("?watch=1", "watch"),
    ] {
        let Err((status, body)) = EventStream::open(&node, &node.admin, query).await else {
            panic!("{query} was not refused");
        };
        assert_eq!(status, 422, "{query}: {body}");
        assert_eq!(body["errors"][0]["path"], path, "{query}: {body}");
    }
    let (status, _) = match EventStream::open(&node, "tvt_not-a-token", "").await {
        Err(e) => e,
        Ok(_) => panic!("a bad token was let in"),
    };
    assert_eq!(status, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_beyond_the_most_a_node_keeps_is_refused_until_one_ends() {
    let node = Node::start().await;
    let most = telvirt_controller::vnf_watch::MAX_WATCHES;
    let mut open = Vec::new();
    for _ in 0..most {
        let mut watch = EventStream::open(&node, &node.admin, "").await.unwrap();
        watch.until_synced(&node).await;
        open.push(watch);
    }
    let Err((status, body)) = EventStream::open(&node, &node.admin, "").await else {
        panic!("watch {} was let in", most + 1);
    };
    assert_eq!(status, 503, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains(&format!("{most} watches")),
        "{body}"
    );
    // One ends (its connection closes): another may begin, once the node has seen it go.
    drop(open.pop());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    loop {
        match EventStream::open(&node, &node.admin, "").await {
            Ok(_) => break,
            Err((503, _)) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err((status, body)) => panic!("no watch after one ended: {status} {body}"),
        }
    }
}

/// One authority holds at most its share of the watches (429 past it; the others still get
/// theirs), and a watch ends when the token it was opened with stops working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authority_holds_its_share_of_watches_and_each_ends_with_its_token() {
    let node = Node::start().await;
    let ent1 = node.create_authority("ent1").await;
    let share = telvirt_controller::vnf_watch::MAX_WATCHES_PER_AUTHORITY;
    let mut open = Vec::new();
    for _ in 0..share {
        let mut watch = EventStream::open(&node, &ent1, "").await.unwrap();
        watch.until_synced(&node).await;
        open.push(watch);
    }
    let Err((status, body)) = EventStream::open(&node, &ent1, "").await else {
        panic!("watch {} of one authority was let in", share + 1);
    };
    assert_eq!(status, 429, "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains("ent1 holds"),
        "{body}"
    );
    let mut admins = EventStream::open(&node, &node.admin, "").await.unwrap();
    admins.until_synced(&node).await;

    // ent1 rotates its token: every stream opened with the old one ends (the admin's goes on).
    let r = node
        .call(
            "POST",
            "/v1/authorities/{name}/token",
            Some("ent1"),
            Some(&ent1),
            None,
        )
        .await;
    assert!(r.status == 200 || r.status == 201, "{}", r.body);
    let new = r.body["token"].as_str().unwrap().to_owned();
    for mut watch in open {
        let end = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                match watch.answer.chunk().await {
                    Ok(Some(_)) => continue,
                    Ok(None) | Err(_) => return,
                }
            }
        })
        .await;
        assert!(end.is_ok(), "a watch outlived its rotated token by 20 s");
    }
    // Its slots are free again: the new token watches.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match EventStream::open(&node, &new, "").await {
            Ok(mut watch) => {
                watch.until_synced(&node).await;
                break;
            }
            Err((429, _)) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err((status, body)) => panic!("no watch with the new token: {status} {body}"),
        }
    }
    assert_eq!(
        node.create_vnf(&node.admin, &wasm_vnf("fw9")).await.status,
        201
    );
    admins.until(&node, "added", "fw9", &["fw9"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_label_change_takes_a_vnf_out_of_a_selectors_watch_and_into_anothers() {
    let node = Node::start().await;
    let r = node
        .create_vnf(&node.admin, &labelled("fw1", "tier: edge"))
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let mut edge = EventStream::open(&node, &node.admin, "?labelSelector=tier%3Dedge")
        .await
        .unwrap();
    assert_eq!(edge.until_synced(&node).await, ["fw1"]);
    let mut core = EventStream::open(&node, &node.admin, "?labelSelector=tier%3Dcore")
        .await
        .unwrap();
    assert!(core.until_synced(&node).await.is_empty());
    let new = labelled("fw1", "tier: core");
    let r = node
        .call(
            "PUT",
            "/v1/vnfs/{name}",
            Some("fw1"),
            Some(&node.admin),
            Some((new.as_bytes(), "application/yaml")),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    edge.until(&node, "deleted", "fw1", &["fw1"]).await;
    let added = core.until(&node, "added", "fw1", &["fw1"]).await;
    assert_eq!(
        added["vnf"]["descriptor"]["metadata"]["labels"]["tier"], "core",
        "{added}"
    );
}
