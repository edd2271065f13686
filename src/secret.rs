//! Secrets (tokens, API keys, passwords) as their own type: redacted in `Debug` and when the
//! effective config is printed, compared in constant time, and never logged.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// What a secret looks like wherever it is shown.
pub const REDACTED: &str = "<redacted>";

/// A secret string. `Debug`, `Display` and `Serialize` show [`REDACTED`]; read it with
/// [`Secret::expose`] only where it is sent to its destination.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    /// The secret itself, for the one place that needs it (an HTTP header, a client setting).
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Compares with `candidate` in time independent of where they differ.
    pub fn matches(&self, candidate: &str) -> bool {
        constant_time_eq(self.0.as_bytes(), candidate.as_bytes())
    }
}

/// Equality in time that depends only on the lengths, not on where the bytes differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b) {
        diff |= x ^ y;
    }
    // Keep the compiler from turning the loop into an early exit.
    std::hint::black_box(diff) == 0
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(REDACTED)
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Secret(String::deserialize(d)?))
    }
}

/// A secret given in the config as the value itself, or as where to find it: `{env: VAR}` (an
/// environment variable) or `{file: PATH}` (a mounted secret; surrounding whitespace ignored).
/// Shown redacted; read with [`SecretRef::resolve`] where it is sent.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum SecretRef {
    Value(Secret),
    Env { env: String },
    File { file: std::path::PathBuf },
}

impl SecretRef {
    /// The secret; an error names its source, never its value.
    pub fn resolve(&self) -> Result<Secret, String> {
        match self {
            SecretRef::Value(s) => Ok(s.clone()),
            SecretRef::Env { env } => std::env::var(env)
                .map(Secret::new)
                .map_err(|_| format!("environment variable {env} is not set")),
            SecretRef::File { file } => std::fs::read_to_string(file)
                .map(|s| Secret::new(s.trim().to_string()))
                .map_err(|e| format!("cannot read {}: {e}", file.display())),
        }
    }
}

/// Resolves configured headers' secrets (`what` names them in an error: `tools.x.headers`).
pub fn resolve_headers(
    headers: &std::collections::BTreeMap<String, SecretRef>,
    what: &str,
) -> Result<Vec<(String, Secret)>, String> {
    headers
        .iter()
        .map(|(k, v)| {
            v.resolve()
                .map(|v| (k.clone(), v))
                .map_err(|e| format!("{what}.{k}: {e}"))
        })
        .collect()
}

/// Whether a free-form setting name (a librdkafka passthrough key, a header name) holds a secret.
pub fn is_secret_name(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    [
        "password",
        "secret",
        "token",
        "jaas",
        "credential",
        "api.key",
        "api_key",
        "apikey",
        "authorization",
        "oauthbearer.config",
        "ssl.key.pem",
        "private",
    ]
    .iter()
    .any(|w| n.contains(w))
}

/// `scheme://user:password@host` → `scheme://user:<redacted>@host`, and secret-looking query
/// parameters (`?pass=`, `?token=`, `?api_key=`, `?sig=`…) → `<redacted>`; None when there is
/// nothing to hide. A comma-separated list (a cluster's seed nodes) is redacted URL by URL.
pub fn redact_url(s: &str) -> Option<String> {
    // A list only when every part is a URL (a query's commas belong to its URL).
    if s.contains(',') && s.split(',').all(|p| p.contains("://")) {
        let parts: Vec<(Option<String>, &str)> = s.split(',').map(|p| (redact_one(p), p)).collect();
        if parts.iter().all(|(r, _)| r.is_none()) {
            return None;
        }
        return Some(
            parts
                .into_iter()
                .map(|(r, p)| r.unwrap_or_else(|| p.to_string()))
                .collect::<Vec<_>>()
                .join(","),
        );
    }
    redact_one(s)
}

fn redact_one(s: &str) -> Option<String> {
    let (scheme, rest) = s.split_once("://")?;
    // The authority ends at the path, query or fragment; its user info at its last `@` (as URL
    // parsers read it: a raw `@` in a password belongs to the password).
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    if !authority.contains('@') {
        if let Some(at) = rest.rfind('@') {
            // Not a well-formed URL (a password with an unescaped `/`, `?` or `#`): all before
            // the last `@` is hidden, as a client might read it as user info.
            let user = rest[..at].split_once(':').map(|(u, _)| u).unwrap_or("");
            if !user.contains(['/', '?', '#']) && rest[..at].contains(':') {
                return Some(format!("{scheme}://{user}:{REDACTED}@{}", &rest[at + 1..]));
            }
        }
    }
    let (host, hid_user) = match authority.rfind('@') {
        Some(at) => {
            let user = authority[..at]
                .split_once(':')
                .map(|(u, _)| u)
                .unwrap_or("");
            (format!("{user}:{REDACTED}@{}", &authority[at + 1..]), true)
        }
        None => (authority.to_string(), false),
    };
    let (path, query) = match tail.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (tail, None),
    };
    let mut hid_query = false;
    let query = query.map(|q| {
        let (q, frag) = match q.split_once('#') {
            Some((q, f)) => (q, Some(f)),
            None => (q, None),
        };
        let mut params: Vec<String> = Vec::new();
        for kv in q.split('&') {
            let name = kv.split_once('=').map(|(k, _)| k).unwrap_or(kv);
            if kv.contains('=') && secret_param(name) {
                hid_query = true;
                params.push(format!("{name}={REDACTED}"));
            } else {
                params.push(kv.to_string());
            }
        }
        let mut q = params.join("&");
        if let Some(f) = frag {
            q.push('#');
            q.push_str(f);
        }
        q
    });
    if !hid_user && !hid_query {
        return None;
    }
    let mut out = format!("{scheme}://{host}{path}");
    if let Some(q) = query {
        out.push('?');
        out.push_str(&q);
    }
    Some(out)
}

/// A URL query parameter whose value is a credential.
fn secret_param(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    is_secret_name(&n)
        || [
            "pass",
            "pwd",
            "key",
            "sig",
            "signature",
            "auth",
            "code",
            "access_token",
        ]
        .iter()
        .any(|w| n == *w || n.ends_with(&format!("_{w}")) || n.ends_with(&format!("-{w}")))
}

/// Where a URL points, never what it carries: `scheme://host:port` (no user info, path or query,
/// any of which may be a credential), or `<not a URL>`. For logs and config problems.
pub fn url_origin(s: &str) -> String {
    match reqwest::Url::parse(s) {
        Ok(u) => match (u.host_str(), u.port_or_known_default()) {
            (Some(h), Some(p)) => format!("{}://{h}:{p}", u.scheme()),
            (Some(h), None) => format!("{}://{h}", u.scheme()),
            (None, _) => format!("{}:", u.scheme()),
        },
        Err(_) => "<not a URL>".into(),
    }
}

/// `text` with every URL in it (`http://…`, `https://…`, up to a space, quote or closing bracket)
/// replaced by `<url>`: for errors of clients that quote the URL they failed on, where its path
/// or query may be a secret (a webhook's, from an environment variable).
pub fn without_urls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = ["http://", "https://"]
        .iter()
        .filter_map(|scheme| rest.find(scheme))
        .min()
    {
        out.push_str(&rest[..at]);
        out.push_str("<url>");
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| c.is_whitespace() || matches!(c, ')' | ']' | '"' | '\'' | '>'))
            .unwrap_or(tail.len());
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_redacted_whatever_their_shape() {
        for (url, want) in [
            (
                "redis://:hunter2@host:6379/0",
                Some("redis://:<redacted>@host:6379/0"),
            ),
            ("redis://host:6379/0", None),
            (
                "redis://:p@ss@host:6379",
                Some("redis://:<redacted>@host:6379"),
            ),
            (
                "unix:///run/redis.sock?db=1&pass=hunter2&user=u",
                Some("unix:///run/redis.sock?db=1&pass=<redacted>&user=u"),
            ),
            (
                "https://a.example/run?api_key=k&x=1#f",
                Some("https://a.example/run?api_key=<redacted>&x=1#f"),
            ),
            ("https://a.example/run?x=1", None),
            (
                "https://h/x?ids=1,2&token=T",
                Some("https://h/x?ids=1,2&token=<redacted>"),
            ),
            (
                "redis://:ab#cd@host:6379",
                Some("redis://:<redacted>@host:6379"),
            ),
            (
                "redis://:ab/cd@host:6379",
                Some("redis://:<redacted>@host:6379"),
            ),
            (
                "redis://:pw@a:6379,redis://:pw@b:6379",
                Some("redis://:<redacted>@a:6379,redis://:<redacted>@b:6379"),
            ),
        ] {
            assert_eq!(redact_url(url).as_deref(), want, "{url}");
        }
        assert_eq!(
            url_origin("https://u:pw@h.example/p?token=t"),
            "https://h.example:443"
        );
        assert_eq!(url_origin("not a url pw"), "<not a URL>");
    }

    #[test]
    fn urls_leave_error_texts() {
        assert_eq!(
            without_urls(
                "error sending request for url (https://hooks.example/T0SECRET?code=k): refused"
            ),
            "error sending request for url (<url>): refused"
        );
        assert_eq!(without_urls("a http://x/y b https://z"), "a <url> b <url>");
        assert_eq!(without_urls("nothing here"), "nothing here");
    }

    #[test]
    fn never_shown() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?} {s}"), "<redacted> <redacted>");
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"<redacted>\"");
        assert!(s.matches("hunter2"));
        assert!(!s.matches("hunter3"));
        assert!(!s.matches("hunter"));
        assert!(is_secret_name("sasl.password"));
        assert!(!is_secret_name("bootstrap.servers"));
    }
}
