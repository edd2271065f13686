//! HTTP tools (`kind: http` under `tools:`): one endpoint, its URL a template over the arguments.
//!
//! `GET`/`DELETE` send the arguments the URL does not use as query parameters; other methods send
//! them as a JSON body. A JSON answer is the result; any other answer is its text. 4xx/5xx are
//! errors (their first 300 characters shown to the model).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::model::{capped, Call, CallCtx, Effect, Inject};
use crate::secret::{Secret, SecretRef};

/// Settings of an HTTP tool.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// What the tool does, for the model.
    pub description: String,
    /// `GET`, `POST`, `PUT`, `PATCH` or `DELETE`.
    #[serde(default = "default_method")]
    pub method: String,
    /// A minijinja template over the arguments (`{{ service }}`), URL-encoded when rendered.
    pub url: String,
    /// An environment variable that, when set, replaces `url` (a template too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_env: Option<String>,
    /// Headers sent with every call; values are secrets (`value`, `{env: VAR}` or `{file: PATH}`).
    #[serde(default)]
    pub headers: BTreeMap<String, SecretRef>,
    /// JSON schema of the arguments.
    #[serde(default = "empty_object")]
    pub parameters: Value,
    #[serde(default)]
    pub effect: Effect,
    /// Parameters switchyard fills in and hides from the model.
    #[serde(default)]
    pub inject: BTreeMap<String, Inject>,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_method() -> String {
    "POST".into()
}
fn empty_object() -> Value {
    serde_json::json!({"type": "object", "properties": {}})
}
/// The most of a tool's answer read: beyond it, the answer is cut (and the rest never read).
const MAX_READ_BYTES: usize = 1 << 20;

fn default_timeout_ms() -> u64 {
    10_000
}

impl Spec {
    /// `url`, or the value of `url_env` when that variable is set.
    pub fn effective_url(&self) -> String {
        super::model::effective_url(&self.url, self.url_env.as_deref())
    }

    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if !["GET", "POST", "PUT", "PATCH", "DELETE"].contains(&self.method.as_str()) {
            p.push(format!(
                "method {:?} is not one of GET, POST, PUT, PATCH, DELETE",
                self.method
            ));
        }
        let url = self.effective_url();
        p.extend(super::model::url_problem(&url));
        if let Err(e) = minijinja::Environment::new().template_from_str(&url) {
            p.push(format!("url is not a valid template: {e}"));
        }
        if !self.parameters.is_object() {
            p.push("parameters must be a JSON schema object".into());
        }
        if self.timeout_ms == 0 {
            p.push("timeout_ms must be at least 1".into());
        }
        p
    }
}

/// A built HTTP tool.
pub struct HttpTool {
    name: String,
    method: reqwest::Method,
    url: String,
    headers: Vec<(String, Secret)>,
    client: reqwest::Client,
}

impl HttpTool {
    pub fn new(name: &str, s: &Spec) -> Result<Self, String> {
        let method = reqwest::Method::from_bytes(s.method.as_bytes())
            .map_err(|_| format!("tools.{name}: bad method {:?}", s.method))?;
        let headers = crate::secret::resolve_headers(&s.headers, &format!("tools.{name}.headers"))?;
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(s.timeout_ms))
            // A redirect would carry the headers (credentials) to wherever it points — a model
            // choosing a GET's arguments could aim one at an open redirect.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("tools.{name}: cannot build HTTP client: {e}"))?;
        Ok(HttpTool {
            name: name.to_string(),
            method,
            url: s.effective_url(),
            headers,
            client,
        })
    }

    /// The URL with the arguments filled in, and the arguments it did not use.
    fn url(&self, args: &Map<String, Value>) -> Result<(String, Map<String, Value>), String> {
        let env = minijinja::Environment::new();
        let tmpl = env
            .template_from_str(&self.url)
            .map_err(|e| format!("tool {} has a bad url template: {e}", self.name))?;
        let used = tmpl.undeclared_variables(false);
        // Every argument is encoded before it meets the template, so a value cannot add a path
        // segment or a query parameter; a value that is a dot segment would remove one (the URL
        // parser resolves `/acme/../globex`, encoded or not), so it is refused.
        for (k, v) in args.iter().filter(|(k, _)| used.contains(k.as_str())) {
            if let Value::String(s) = v {
                if is_dot_segment(s) {
                    return Err(format!(
                        "argument {k} may not be {s:?}: it would change the URL's path"
                    ));
                }
            }
        }
        let encoded: Map<String, Value> = args
            .iter()
            .map(|(k, v)| {
                let s = match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                (k.clone(), Value::String(urlencode(&s)))
            })
            .collect();
        let url = tmpl
            .render(minijinja::value::Serde(&encoded))
            .map_err(|e| format!("cannot fill in the url of tool {}: {e}", self.name))?;
        let rest = args
            .iter()
            .filter(|(k, _)| !used.contains(k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Ok((url, rest))
    }

    pub async fn call(&self, args: &Map<String, Value>, ctx: &CallCtx) -> Result<Value, String> {
        let (url, rest) = self.url(args)?;
        let mut req = self.client.request(self.method.clone(), &url);
        for (k, v) in &self.headers {
            let mut value = reqwest::header::HeaderValue::from_str(v.expose())
                .map_err(|_| format!("tool {}: header {k} is not a valid value", self.name))?;
            value.set_sensitive(true);
            req = req.header(k, value);
        }
        if !ctx.task_id.is_empty() {
            req = req.header("x-switchyard-task-id", &ctx.task_id);
        }
        if let Some(t) = ctx.fencing_token {
            req = req.header("x-switchyard-fencing-token", t.to_string());
        }
        if let Some(a) = &ctx.action_id {
            req = req.header("idempotency-key", a);
        }
        req = if matches!(self.method, reqwest::Method::GET | reqwest::Method::DELETE) {
            let q: Vec<(String, String)> = rest
                .iter()
                .map(|(k, v)| {
                    let s = match v {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    (k.clone(), s)
                })
                .collect();
            req.query(&q)
        } else {
            req.json(&rest)
        };
        let resp = req.send().await.map_err(|e| {
            // Without the URL: its path or query may be a secret (a webhook's, from `url_env`),
            // and this text reaches the model, the tool-calls topic, the audit trail and the DLQ.
            if e.is_timeout() {
                format!("tool {} timed out", self.name)
            } else {
                format!(
                    "tool {} could not be reached: {}",
                    self.name,
                    e.without_url()
                )
            }
        })?;
        let status = resp.status();
        // At most MAX_READ_BYTES of the answer are read (a JSON answer up to that is parsed and
        // then cut to MAX_RESULT_BYTES); the rest is not read at all.
        let (body, cut) = crate::body::read_at_most(resp, MAX_READ_BYTES)
            .await
            .map_err(|e| {
                format!(
                    "tool {}: reading the answer failed: {}",
                    self.name,
                    e.without_url()
                )
            })?;
        if cut && status.is_success() {
            return Ok(serde_json::json!({
                "truncated": true,
                "bytes": format!("more than {MAX_READ_BYTES}"),
                "prefix": crate::body::utf8_prefix(&body, super::model::MAX_RESULT_BYTES),
            }));
        }
        if !status.is_success() {
            let text: String = String::from_utf8_lossy(&body).chars().take(300).collect();
            if refused(status) {
                return Err(format!(
                    "tool {} {REFUSED} (HTTP {status}): {text}",
                    self.name
                ));
            }
            return Err(format!("tool {} answered HTTP {status}: {text}", self.name));
        }
        if body.is_empty() {
            return Ok(Value::Null);
        }
        if crate::codec::check_json_depth(&body, crate::codec::MAX_DEPTH).is_ok() {
            if let Ok(v) = serde_json::from_slice::<Value>(&body) {
                return Ok(capped(v));
            }
        }
        Ok(capped(Value::String(
            String::from_utf8_lossy(&body).into_owned(),
        )))
    }
}

/// How an error names a request the tool refused (a 4xx other than 408 and 429): sending it
/// again would be refused again, or — a 409 — might be taken as a second request.
const REFUSED: &str = "refused the request";

fn refused(status: reqwest::StatusCode) -> bool {
    status.is_client_error()
        && status != reqwest::StatusCode::REQUEST_TIMEOUT
        && status != reqwest::StatusCode::TOO_MANY_REQUESTS
}

impl Call for HttpTool {
    fn retryable(&self, error: &str) -> bool {
        !error.contains(&format!(" {REFUSED} (HTTP "))
    }

    fn call<'a>(
        &'a self,
        args: &'a Map<String, Value>,
        ctx: &'a CallCtx,
    ) -> futures::future::BoxFuture<'a, Result<Value, String>> {
        Box::pin(HttpTool::call(self, args, ctx))
    }
}

/// `.` or `..`, also percent-encoded (`%2e`): what a URL parser takes as a dot segment.
fn is_dot_segment(s: &str) -> bool {
    let d = s.to_ascii_lowercase().replace("%2e", ".");
    d == "." || d == ".."
}

/// Percent-encodes everything but unreserved characters (RFC 3986).
fn urlencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_cannot_escape_their_url_segment() {
        let spec: Spec = serde_yaml::from_str(
            "description: d\nmethod: GET\nurl: 'http://h/services/{{ service }}/status'\n",
        )
        .expect("spec");
        let t = HttpTool::new("t", &spec).expect("tool");
        let args = serde_json::json!({"service": "../admin?x=1", "verbose": true});
        let (url, rest) = t.url(args.as_object().expect("object")).expect("url");
        assert_eq!(url, "http://h/services/..%2Fadmin%3Fx%3D1/status");
        assert_eq!(rest.len(), 1);
        assert!(rest.contains_key("verbose"));
        // A dot segment would remove the segment before it (an injected tenant, say): refused.
        let spec: Spec = serde_yaml::from_str(
            "description: d\nmethod: GET\nurl: 'http://h/api/{{ tenant }}/{{ kind }}/{{ id }}'\n",
        )
        .expect("spec");
        let t = HttpTool::new("t", &spec).expect("tool");
        for dots in ["..", ".", "%2e%2E", ".%2e"] {
            let args = serde_json::json!({"tenant": "acme", "kind": dots, "id": "globex"});
            let e = t
                .url(args.as_object().expect("object"))
                .expect_err("refused");
            assert!(e.contains("argument kind"), "{e}");
        }
        // Not in the URL (a query parameter): left alone.
        let args = serde_json::json!({"tenant": "acme", "kind": "k", "id": "i", "q": ".."});
        assert!(t.url(args.as_object().expect("object")).is_ok());
    }

    /// A tool answering without end is read up to MAX_READ_BYTES and cut: the rest is never read
    /// (the server's writes fail once the client let go), the result is marked truncated.
    #[tokio::test]
    async fn an_endless_answer_is_cut_not_read_whole() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let server = tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.expect("accept");
            let mut req = [0u8; 4096];
            let _ = sock.read(&mut req).await;
            let _ = sock
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n")
                .await;
            let chunk = vec![b'x'; 64 * 1024];
            let mut written = 0usize;
            // Up to 256 MiB, or until the client goes away.
            while written < 256 << 20 {
                if sock.write_all(&chunk).await.is_err() {
                    break;
                }
                written += chunk.len();
            }
            written
        });
        let spec: Spec = serde_yaml::from_str(&format!(
            "description: d\nmethod: GET\nurl: 'http://127.0.0.1:{port}/big'\n"
        ))
        .expect("spec");
        let t = HttpTool::new("big", &spec).expect("tool");
        let v = t
            .call(&Map::new(), &CallCtx::default())
            .await
            .expect("a cut answer");
        assert_eq!(v["truncated"], Value::Bool(true));
        assert!(v["prefix"]
            .as_str()
            .is_some_and(|p| p.len() <= crate::tools::MAX_RESULT_BYTES));
        let written = server.await.expect("server");
        assert!(
            written < 64 << 20,
            "the client stopped reading early: the server wrote {written} bytes"
        );
    }

    #[tokio::test]
    async fn an_unreachable_tool_s_error_does_not_show_its_url() {
        // A port nothing listens on (bound, then closed), and a secret in the path and query.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a port");
        let spec: Spec = serde_yaml::from_str(&format!(
            "description: d\nmethod: POST\nurl: 'http://127.0.0.1:{port}/hooks/T0SECRET/B1SECRET?code=k3y'\n"
        ))
        .expect("spec");
        let t = HttpTool::new("notify", &spec).expect("tool");
        let err = t
            .call(&Map::new(), &CallCtx::default())
            .await
            .expect_err("nothing listens");
        assert!(err.contains("could not be reached"), "{err}");
        assert!(!err.contains("SECRET") && !err.contains("k3y"), "{err}");
    }
}
