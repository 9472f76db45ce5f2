//! The CLI's API client: one method per call, problems turned into one-line errors.
//!
//! Owns HTTP details of the client side. It must not format output: `output` does.

use anyhow::{Result, anyhow, bail};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use telvirt_model::api::Problem;
use telvirt_model::sse::SseDecoder;

use crate::config::ClientConfig;

pub struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
}

/// A call's answer: its status, headers and body.
pub struct Answer {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: Vec<u8>,
}

/// The API refused a request: its status and the problem's detail (with the field errors it
/// did not say already). The binary's exit code follows the status (see [`exit_code`]).
#[derive(Debug)]
pub struct RequestFailed {
    pub status: u16,
    pub detail: String,
    /// The problem document the API answered (`None`: the answer was not one).
    pub problem: Option<Problem>,
}

impl std::fmt::Display for RequestFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let reason = reqwest::StatusCode::from_u16(self.status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("");
        write!(f, "{} {reason}: {}", self.status, self.detail)
    }
}

impl std::error::Error for RequestFailed {}

/// The exit code of a failed command: 2 for input the API refused (400, 413, 415, 422), 3 for
/// a caller it does not let do this (401, 403), 4 for something that does not exist (404), 5
/// for a conflict with the current state (409, 412), 1 for anything else (the API unreachable
/// or failing, a local error).
pub fn exit_code(e: &anyhow::Error) -> i32 {
    match e.downcast_ref::<RequestFailed>().map(|r| r.status) {
        Some(400 | 413 | 415 | 422) => 2,
        Some(401 | 403) => 3,
        Some(404) => 4,
        Some(409 | 412) => 5,
        _ => 1,
    }
}

/// A failed command as an RFC 9457 problem document (what `-o json` prints on stderr): the
/// API's own problem when it refused the request, else one of type
/// `urn:telvirt:problem:client` (the API unreachable, a local error) without a `status`. Both
/// carry the members `exit_code` and `error` (the error and its causes on one line).
pub fn problem_json(e: &anyhow::Error, one_line: &str) -> serde_json::Value {
    let mut doc = match e.downcast_ref::<RequestFailed>() {
        Some(RequestFailed {
            problem: Some(p), ..
        }) => serde_json::to_value(p).unwrap_or_default(),
        Some(r) => serde_json::json!({
            "type": "about:blank",
            "title": reqwest::StatusCode::from_u16(r.status)
                .ok()
                .and_then(|s| s.canonical_reason())
                .unwrap_or("Error"),
            "status": r.status,
            "detail": r.detail,
        }),
        None => serde_json::json!({
            "type": "urn:telvirt:problem:client",
            "title": "The command failed before or outside the API",
            "detail": one_line,
        }),
    };
    if let Some(members) = doc.as_object_mut() {
        members.insert("exit_code".into(), exit_code(e).into());
        members.insert("error".into(), one_line.into());
    }
    doc
}

/// A request that got no answer, with every cause (a refused connection, a certificate the
/// client does not trust, …): reqwest's own text names none of them.
fn unreachable(base: &str, e: &reqwest::Error) -> anyhow::Error {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    anyhow!("cannot reach telvirt at {base}: {text}")
}

impl Answer {
    pub fn json<T: DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_slice(&self.body)
            .map_err(|e| anyhow!("the server's answer is not what this CLI expects: {e}"))
    }
}

impl Client {
    pub fn new(config: ClientConfig) -> Result<Self> {
        Ok(Self {
            http: config.http()?.build()?,
            base: config.server.trim_end_matches('/').to_owned(),
            token: config.token,
        })
    }

    /// Sends a request; a non-2xx answer becomes a [`RequestFailed`] with the problem's detail.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<(Vec<u8>, &str)>,
    ) -> Result<Answer> {
        let response = self.open(method, path, body).await?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.bytes().await?.to_vec();
        Ok(Answer {
            status,
            headers,
            body,
        })
    }

    /// Sends a request and answers the response with its body still to read (a stream); a
    /// non-2xx answer becomes a [`RequestFailed`] with the problem's detail.
    pub async fn open(
        &self,
        method: Method,
        path: &str,
        body: Option<(Vec<u8>, &str)>,
    ) -> Result<reqwest::Response> {
        let url = format!("{}{path}", self.base);
        let mut request = self.http.request(method, &url).bearer_auth(&self.token);
        if let Some((bytes, content_type)) = body {
            request = request.header("content-type", content_type).body(bytes);
        }
        let response = request
            .send()
            .await
            .map_err(|e| unreachable(&self.base, &e))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let body = response.bytes().await?.to_vec();
        let problem = serde_json::from_slice::<Problem>(&body).ok();
        let detail = problem
            .as_ref()
            .map(|p| {
                // Field errors the detail does not already say (a verifier's reasons, ...).
                let mut detail = p.detail.clone();
                for e in &p.errors {
                    let line = e.to_string();
                    if !detail.contains(&line) {
                        detail.push_str(&format!("\n  {line}"));
                    }
                }
                detail
            })
            .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
        Err(RequestFailed {
            status: status.as_u16(),
            detail,
            problem,
        }
        .into())
    }

    /// Opens a stream of server-sent events at `path` (GET).
    pub async fn events(&self, path: &str) -> Result<EventStream> {
        Ok(EventStream {
            response: self.open(Method::GET, path, None).await?,
            decoder: SseDecoder::default(),
        })
    }

    /// Whether `path` exists for the caller: true on 2xx, false on 404, an error otherwise.
    pub async fn exists(&self, path: &str) -> Result<bool> {
        let response = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| unreachable(&self.base, &e))?;
        match response.status() {
            StatusCode::NOT_FOUND => Ok(false),
            s if s.is_success() => Ok(true),
            s => Err(anyhow!(
                "{} {}",
                s.as_u16(),
                s.canonical_reason().unwrap_or("")
            )),
        }
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.call(Method::GET, path, None).await?.json()
    }

    /// Every item of a paged list at `path` (a path without a query string), asking `query`
    /// (already encoded `name=value` pairs) and following the server's `X-Continue` tokens
    /// to the last page.
    pub async fn get_all_pages<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<Vec<T>> {
        let mut items = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut pairs: Vec<String> = query
                .iter()
                .map(|(k, v)| format!("{k}={}", encode_query_value(v)))
                .collect();
            if let Some(t) = &token {
                pairs.push(format!("continue={}", encode_query_value(t)));
            }
            let url = if pairs.is_empty() {
                path.to_owned()
            } else {
                format!("{path}?{}", pairs.join("&"))
            };
            let answer = self.call(Method::GET, &url, None).await?;
            let page: Vec<T> = answer.json()?;
            items.extend(page);
            let next = match answer.headers.get("x-continue") {
                Some(v) => Some(
                    v.to_str()
                        .map_err(|_| anyhow!("the server's continue token is not text"))?
                        .to_owned(),
                ),
                None => None,
            };
            match next {
                // A token that does not move on would loop for ever.
                Some(t) if token.as_deref() == Some(t.as_str()) => {
                    return Err(anyhow!(
                        "the server gave the same continue token {t:?} twice; stopping"
                    ));
                }
                Some(t) => token = Some(t),
                None => return Ok(items),
            }
        }
    }

    pub async fn get_text(&self, path: &str) -> Result<String> {
        let answer = self.call(Method::GET, path, None).await?;
        Ok(String::from_utf8_lossy(&answer.body).into_owned())
    }

    pub async fn post<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.call(Method::POST, path, None).await?.json()
    }
}

/// Percent-encodes a query value (everything but unreserved characters).
pub(crate) fn encode_query_value(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Server-sent events read from a streaming answer (see [`telvirt_model::sse`]).
pub struct EventStream {
    response: reqwest::Response,
    decoder: SseDecoder,
}

/// Largest event the CLI accepts (a VNF record is far smaller): past it the stream is refused.
const MAX_EVENT_BYTES: usize = 4 << 20;

impl EventStream {
    /// The next event's name and data; `None` once the server ended the stream.
    pub async fn next(&mut self) -> Result<Option<(String, String)>> {
        loop {
            if let Some(event) = self.decoder.next_event() {
                return Ok(Some((event.name, event.data)));
            }
            if self.decoder.buffered() > MAX_EVENT_BYTES {
                bail!("the server sent an event over {MAX_EVENT_BYTES} bytes");
            }
            match self.response.chunk().await? {
                Some(chunk) => self.decoder.push(&chunk),
                None => return Ok(None),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(
            super::encode_query_value("role=edge,!zone,a b"),
            "role%3Dedge%2C%21zone%2Ca%20b"
        );
        assert_eq!(super::encode_query_value("fw-1.x_y"), "fw-1.x_y");
    }
}
