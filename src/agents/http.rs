//! HTTP agents: the task is POSTed as JSON ([`super::model::AgentRequest::to_json`]); the response body is an
//! [`crate::records::AgentResponse`]. 5xx, 429 and connection failures are retried; other 4xx are not.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use super::model::{Agent, AgentError, AgentRequest};
use crate::records::AgentResponse;
use crate::secret::{url_origin, Secret, SecretRef};

/// Settings of `kind: http`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// The endpoint the task is POSTed to. Never shown (logs, errors, records): only its scheme,
    /// host and port are, so credentials belong in `headers`.
    pub url: String,
    /// Headers sent with every task (e.g. `authorization`); values are secrets (`value`,
    /// `{env: VAR}` or `{file: PATH}`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, SecretRef>,
}

impl Spec {
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            p.push(format!(
                "url is not an http(s) URL (it reads as {})",
                url_origin(&self.url)
            ));
        }
        for (k, v) in &self.headers {
            if reqwest::header::HeaderName::from_bytes(k.as_bytes()).is_err() {
                p.push(format!("headers: {k:?} is not a valid header name"));
            }
            if let SecretRef::Value(v) = v {
                if reqwest::header::HeaderValue::from_str(v.expose()).is_err() {
                    // Never the value: it is a secret.
                    p.push(format!("headers.{k}: not a valid header value"));
                }
            }
        }
        p
    }

    pub fn build(&self, timeout: std::time::Duration) -> Result<Arc<dyn Agent>, String> {
        let headers = crate::secret::resolve_headers(&self.headers, "headers")?;
        Ok(Arc::new(HttpAgent::new(&self.url, headers, timeout)?))
    }
}

pub struct HttpAgent {
    client: reqwest::Client,
    url: String,
    /// `scheme://host:port` of `url`: what errors and logs show.
    origin: String,
    headers: Vec<(String, Secret)>,
    timeout: std::time::Duration,
}

impl HttpAgent {
    pub fn new(
        url: &str,
        headers: Vec<(String, Secret)>,
        timeout: std::time::Duration,
    ) -> Result<Self, String> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            // A redirect would carry the headers (credentials) to wherever it points.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("cannot build HTTP client: {e}"))?;
        Ok(HttpAgent {
            client,
            url: url.to_string(),
            origin: url_origin(url),
            headers,
            timeout,
        })
    }
}

impl Agent for HttpAgent {
    fn call<'a>(
        &'a self,
        req: &'a AgentRequest,
    ) -> BoxFuture<'a, Result<AgentResponse, AgentError>> {
        Box::pin(async move {
            let mut post = self
                .client
                .post(&self.url)
                .header("x-switchyard-task-id", &req.task.task_id)
                .header("x-switchyard-attempt", req.attempt.to_string());
            for (k, v) in &self.headers {
                let mut value =
                    reqwest::header::HeaderValue::from_str(v.expose()).map_err(|_| {
                        AgentError::Permanent(format!("header {k} is not a valid value"))
                    })?;
                value.set_sensitive(true);
                post = post.header(k, value);
            }
            if let Some(tp) = &req.traceparent {
                post = post.header("traceparent", tp);
            }
            let resp = post.json(&req.to_json()).send().await.map_err(|e| {
                if e.is_timeout() {
                    AgentError::Timeout(self.timeout)
                } else {
                    // Never the URL: its path or query may be a credential.
                    AgentError::Retryable(format!(
                        "POST {} failed: {}",
                        self.origin,
                        e.without_url()
                    ))
                }
            })?;
            let status = resp.status();
            let (body, cut) = crate::body::read_at_most(resp, MAX_ANSWER_BYTES)
                .await
                .map_err(|e| {
                    AgentError::Retryable(format!(
                        "reading response failed: {}",
                        crate::secret::without_urls(&e.to_string())
                    ))
                })?;
            if cut {
                return Err(AgentError::Permanent(format!(
                    "response rejected: larger than {MAX_ANSWER_BYTES} bytes"
                )));
            }
            read_reply(status, &body)
        })
    }
}

/// The most of an agent's answer read: a larger one is refused (the rest never read).
const MAX_ANSWER_BYTES: usize = 16 << 20;

/// An HTTP agent's answer: its status and body as the agent's response or the error that decides
/// whether to retry. Pure, so it is fuzzed (`fuzz/`).
pub fn read_reply(status: reqwest::StatusCode, body: &[u8]) -> Result<AgentResponse, AgentError> {
    if status.is_server_error() || status.as_u16() == 429 {
        return Err(AgentError::Retryable(format!("HTTP {status}")));
    }
    if !status.is_success() {
        let text: String = String::from_utf8_lossy(body).chars().take(200).collect();
        return Err(AgentError::Permanent(format!("HTTP {status}: {text}")));
    }
    crate::codec::check_json_depth(body, crate::codec::MAX_DEPTH)
        .map_err(|e| AgentError::Permanent(format!("response rejected: {e}")))?;
    serde_json::from_slice(body)
        .map_err(|e| AgentError::Permanent(format!("response is not an agent response: {e}")))
}
