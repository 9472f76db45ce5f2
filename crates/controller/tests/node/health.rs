//! `/v1/healthz` and `/v1/readyz` over the real router: 200 while every component is up, 503
//! naming a supervised task that panicked.

use crate::common;

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde_json::Value;
use telvirt_controller::{Controller, Restart, router};
use telvirt_sched::SchedConfig;
use telvirt_store::RedbStore;
use tower::ServiceExt;

async fn get(app: &axum::Router, path: &str) -> (StatusCode, String, Value) {
    let response = app
        .clone()
        .oneshot(Request::get(path).body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    (
        status,
        content_type,
        serde_json::from_slice(&bytes).unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_supervised_task_turns_healthz_503_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(&dir.path().join("store.redb")).unwrap();
    let controller = Controller::open(store, SchedConfig::default())
        .await
        .unwrap();
    let app = router(controller.clone());

    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let mut rx = Some(rx);
    controller
        .health()
        .supervise("scheduler", Restart::Never, move || {
            let rx = rx.take();
            async move {
                if let Some(rx) = rx {
                    let _ = rx.await;
                }
                panic!("scheduler exploded");
            }
        });
    for path in ["/v1/healthz", "/v1/readyz"] {
        let (status, _, body) = get(&app, path).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["status"], "ok");
        assert_eq!(body["components"]["store"]["status"], "up", "{body}");
        assert_eq!(body["components"]["scheduler"]["status"], "up", "{body}");
    }

    tx.send(()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let (content_type, body) = loop {
        let (status, content_type, body) = get(&app, "/v1/healthz").await;
        if status == StatusCode::SERVICE_UNAVAILABLE {
            break (content_type, body);
        }
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(
            Instant::now() < deadline,
            "healthz stayed 200 after the task panicked: {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(content_type, "application/problem+json");
    assert_eq!(body["status"], 503);
    assert_eq!(body["type"], "urn:telvirt:problem:unhealthy");
    let detail = body["detail"].as_str().unwrap();
    assert!(
        detail.contains("scheduler is down: panicked: scheduler exploded"),
        "{detail}"
    );
    assert!(!detail.contains("store"), "{detail}");
    assert_eq!(body["components"]["scheduler"]["status"], "down");
    assert_eq!(
        body["components"]["scheduler"]["reason"],
        "panicked: scheduler exploded"
    );
    assert!(body["components"]["scheduler"]["since"].is_string());
    assert_eq!(body["components"]["store"]["status"], "up");

    let (status, _, body) = get(&app, "/v1/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["components"]["scheduler"]["status"], "down");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unhealthy_answer_matches_the_openapi_document() {
    let node = common::Node::start().await;
    node.controller
        .health()
        .down("dataplane", "worker cpu0 made no polling round for 5 s");
    for path in ["/v1/healthz", "/v1/readyz"] {
        // `call` checks the answer against the OpenAPI document.
        let r = node.call("GET", path, None, None, None).await;
        assert_eq!(r.status, 503, "{}", r.body);
        assert_eq!(r.content_type, "application/problem+json");
        assert_eq!(
            r.body["detail"],
            "dataplane is down: worker cpu0 made no polling round for 5 s"
        );
    }
    node.controller.health().up("dataplane");
    let r = node.call("GET", "/v1/healthz", None, None, None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["components"]["dataplane"]["status"], "up");
}
