//! The CLI's API client: one method per call, problems turned into one-line errors.
//!
//! Owns HTTP details of the client side. It must not format output: `output` does.

use anyhow::{Result, anyhow};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use telvirt_model::api::Problem;

use crate::config::ClientConfig;

pub struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
}

/// A call's answer: its status and body.
pub struct Answer {
    pub status: StatusCode,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn json<T: DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_slice(&self.body)
            .map_err(|e| anyhow!("the server's answer is not what this CLI expects: {e}"))
    }
}

impl Client {
    pub fn new(config: ClientConfig) -> Self {
        Self {
            http: reqwest::Client::new(),
            base: config.server.trim_end_matches('/').to_owned(),
            token: config.token,
        }
    }

    /// Sends a request; a non-2xx answer becomes an error with the problem's detail.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<(Vec<u8>, &str)>,
    ) -> Result<Answer> {
        let url = format!("{}{path}", self.base);
        let mut request = self.http.request(method, &url).bearer_auth(&self.token);
        if let Some((bytes, content_type)) = body {
            request = request.header("content-type", content_type).body(bytes);
        }
        let response = request
            .send()
            .await
            .map_err(|e| anyhow!("cannot reach telvirt at {}: {e}", self.base))?;
        let status = response.status();
        let body = response.bytes().await?.to_vec();
        if status.is_success() {
            return Ok(Answer { status, body });
        }
        let detail = serde_json::from_slice::<Problem>(&body)
            .map(|p| {
                // Field errors the detail does not already say (a verifier's reasons, ...).
                let mut detail = p.detail;
                for e in p.errors {
                    let line = e.to_string();
                    if !detail.contains(&line) {
                        detail.push_str(&format!("\n  {line}"));
                    }
                }
                detail
            })
            .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
        Err(anyhow!(
            "{} {}: {detail}",
            status.as_u16(),
            status.canonical_reason().unwrap_or("")
        ))
    }

    /// Whether `path` exists for the caller: true on 2xx, false on 404, an error otherwise.
    pub async fn exists(&self, path: &str) -> Result<bool> {
        let response = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| anyhow!("cannot reach telvirt at {}: {e}", self.base))?;
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

    pub async fn get_text(&self, path: &str) -> Result<String> {
        let answer = self.call(Method::GET, path, None).await?;
        Ok(String::from_utf8_lossy(&answer.body).into_owned())
    }

    pub async fn post<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.call(Method::POST, path, None).await?.json()
    }
}
