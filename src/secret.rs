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
