//! The web console's files at `/ui`: one page, its script and its stylesheet, compiled into the
//! binary and served as they are. They hold no data and need no token: the script asks the API
//! for everything with the token the operator signs in with, so the console shows exactly what
//! that authority may see (ADR 060). It must not answer anything but these files.

use axum::Router;
use axum::http::header;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;

const PAGE: &str = include_str!("../ui/index.html");
const SCRIPT: &str = include_str!("../ui/console.js");
const STYLE: &str = include_str!("../ui/console.css");

/// Only this origin's scripts, styles, images and API; no framing.
const POLICY: &str = "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'";

fn file(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// The console's routes, for the API's router.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/ui", get(|| async { Redirect::permanent("/ui/") }))
        .route(
            "/ui/",
            get(|| async { file("text/html; charset=utf-8", PAGE) }),
        )
        .route(
            "/ui/console.js",
            get(|| async { file("text/javascript; charset=utf-8", SCRIPT) }),
        )
        .route(
            "/ui/console.css",
            get(|| async { file("text/css; charset=utf-8", STYLE) }),
        )
}
