//! Who is calling: users with roles and tenant scopes, authenticated by bearer token.
//!
//! Users are declared under `http.users` with a token (a secret, better given through the
//! environment) or only its SHA-256 (`token_sha256`, so the config holds no secret at all). Tokens
//! are compared as SHA-256 digests in constant time, against every user, so neither the answer nor
//! its timing tells which user nearly matched. The legacy `governance.approvals.token` (or
//! `SWITCHYARD_APPROVAL_TOKEN`) is one shared user, `approvals-token`, approver of every tenant;
//! since a shared token cannot tell people apart, its callers name themselves in `by`.

use axum::http::HeaderMap;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::pattern::matches_any;
use crate::secret::{constant_time_eq, Secret};

/// What a user may do. Each role includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Sees approvals (and, where served, the inbox).
    Viewer,
    /// Also decides approvals.
    Approver,
    /// Also everything else (metrics, administration).
    Admin,
}

/// A user of the HTTP front doors, as declared in `http.users`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UserSpec {
    /// The name recorded as the approver of what this user decides.
    pub name: String,
    /// The bearer token (a secret: prefer `token_sha256`, or set it from the environment). A user
    /// who only signs in through a trusted proxy (`http.proxy_user_header`) needs none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<Secret>,
    /// Hex SHA-256 of the bearer token (`printf %s "$TOKEN" | sha256sum`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_sha256: Option<String>,
    /// Roles; the highest counts.
    #[serde(default = "default_roles")]
    pub roles: Vec<Role>,
    /// Tenants the user may see and act for (`*` patterns); empty means none.
    #[serde(default = "all_tenants")]
    pub tenants: Vec<String>,
    /// Approver groups the user belongs to (approval rules' escalation paths name them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
}

fn default_roles() -> Vec<Role> {
    vec![Role::Viewer]
}
fn all_tenants() -> Vec<String> {
    vec!["*".into()]
}

impl UserSpec {
    /// Problems of this user, as (path, message).
    pub fn problems(&self, path: &str, proxy: bool) -> Vec<(String, String)> {
        let mut p = Vec::new();
        if self.name.trim().is_empty() {
            p.push((format!("{path}.name"), "must not be empty".into()));
        }
        match (&self.token, &self.token_sha256) {
            (Some(_), Some(_)) => {
                p.push((path.into(), "give token or token_sha256, not both".into()))
            }
            (None, None) if !proxy => p.push((
                path.into(),
                "needs token or token_sha256 (or http.proxy_user_header set)".into(),
            )),
            (Some(t), None) if t.expose().len() < 16 => p.push((
                format!("{path}.token"),
                "must be at least 16 characters".into(),
            )),
            (None, Some(h)) if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) => p
                .push((
                    format!("{path}.token_sha256"),
                    "must be 64 hex digits (the SHA-256 of the token)".into(),
                )),
            _ => {}
        }
        for (i, t) in self.tenants.iter().enumerate() {
            if let Some(m) = crate::pattern::pattern_problem(t) {
                p.push((format!("{path}.tenants[{i}]"), m));
            }
        }
        p
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq)]
pub struct Identity {
    pub name: String,
    pub role: Role,
    pub tenants: Vec<String>,
    /// A token several people share: it cannot name who decided, so the caller says it (`by`).
    pub shared: bool,
    /// Approver groups (see `UserSpec::groups`); none for the shared token.
    pub groups: Vec<String>,
}

impl Identity {
    /// Whether this caller may see or act for `tenant`.
    pub fn sees(&self, tenant: &str) -> bool {
        matches_any(&self.tenants, tenant)
    }

    pub fn can(&self, role: Role) -> bool {
        self.role >= role
    }

    /// This caller as governance sees a decider (see `governance::approvals::may_decide`).
    pub fn decider(&self) -> crate::governance::approvals::Decider<'_> {
        crate::governance::approvals::Decider {
            name: &self.name,
            approver: self.can(Role::Approver),
            admin: self.can(Role::Admin),
            groups: &self.groups,
        }
    }
}

/// Why a request is not let in.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AuthError {
    #[error("no user is configured: declare http.users (or set SWITCHYARD_APPROVAL_TOKEN)")]
    Disabled,
    #[error("send exactly one Authorization header")]
    Ambiguous,
    #[error("missing or wrong bearer token")]
    Unauthenticated,
}

/// The users, with their token digests.
#[derive(Debug, Clone, Default)]
pub struct Auth {
    users: Vec<([u8; 32], Identity)>,
    /// Every declared user by name (for sessions and a trusted proxy's header).
    named: Vec<Identity>,
    /// A trusted reverse proxy's header naming the signed-in user (`http.proxy_user_header`).
    proxy_header: Option<axum::http::HeaderName>,
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl Auth {
    /// From `http.users` and the legacy shared approvals token.
    pub fn new(users: &[UserSpec], shared_token: Option<&Secret>) -> Self {
        let mut out = Vec::new();
        let named = users
            .iter()
            .map(|u| Identity {
                name: u.name.clone(),
                role: u.roles.iter().copied().max().unwrap_or(Role::Viewer),
                tenants: u.tenants.clone(),
                shared: false,
                groups: u.groups.clone(),
            })
            .collect::<Vec<_>>();
        for (u, who) in users.iter().zip(&named) {
            let d = match (&u.token, &u.token_sha256) {
                (Some(t), _) => digest(t.expose()),
                (None, Some(h)) => {
                    let mut d = [0u8; 32];
                    if hex::decode_to_slice(h, &mut d).is_err() {
                        continue;
                    }
                    d
                }
                (None, None) => continue,
            };
            out.push((d, who.clone()));
        }
        if let Some(t) = shared_token.filter(|t| !t.is_empty()) {
            out.push((
                digest(t.expose()),
                Identity {
                    name: "approvals-token".into(),
                    role: Role::Approver,
                    tenants: all_tenants(),
                    shared: true,
                    groups: Vec::new(),
                },
            ));
        }
        Auth {
            users: out,
            named,
            proxy_header: None,
        }
    }

    /// Also trusts `header` (set by a reverse proxy doing single sign-on in front) to name the
    /// user. Only for a proxy every request passes, which strips the header from clients.
    pub fn with_proxy_header(mut self, header: Option<&str>) -> Self {
        self.proxy_header = header
            .filter(|h| !h.trim().is_empty())
            .and_then(|h| axum::http::HeaderName::from_bytes(h.trim().as_bytes()).ok());
        self
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty() && (self.proxy_header.is_none() || self.named.is_empty())
    }

    /// The user `name` while its token's SHA-256 is still `digest` (hex): a session's user.
    pub fn user_with_digest(&self, name: &str, digest: &str) -> Option<Identity> {
        let mut d = [0u8; 32];
        hex::decode_to_slice(digest, &mut d).ok()?;
        self.users
            .iter()
            .find(|(want, who)| who.name == name && !who.shared && constant_time_eq(want, &d))
            .map(|(_, who)| who.clone())
    }

    /// A declared user by name (a session's, or a trusted proxy's).
    pub fn user(&self, name: &str) -> Option<Identity> {
        self.named.iter().find(|u| u.name == name).cloned()
    }

    /// The user a trusted proxy's header names: `None` when no such header is configured or the
    /// request has none; an error when it names nobody declared, or is sent twice.
    pub fn proxy_user(&self, headers: &HeaderMap) -> Option<Result<Identity, AuthError>> {
        let h = self.proxy_header.as_ref()?;
        let mut values = headers.get_all(h).iter();
        let first = values.next()?;
        if values.next().is_some() {
            return Some(Err(AuthError::Ambiguous));
        }
        let name = first.to_str().unwrap_or("").trim();
        Some(self.user(name).ok_or(AuthError::Unauthenticated))
    }

    /// The caller of a request: exactly one `Authorization: Bearer <token>` header (the scheme in
    /// any case, RFC 7235) whose token is a user's.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Identity, AuthError> {
        if let Some(who) = self.proxy_user(headers) {
            return who;
        }
        if self.users.is_empty() {
            return Err(AuthError::Disabled);
        }
        let mut values = headers.get_all(axum::http::header::AUTHORIZATION).iter();
        let (Some(v), None) = (values.next(), values.next()) else {
            return Err(
                match headers
                    .get_all(axum::http::header::AUTHORIZATION)
                    .iter()
                    .count()
                {
                    0 => AuthError::Unauthenticated,
                    _ => AuthError::Ambiguous,
                },
            );
        };
        let token = v
            .to_str()
            .ok()
            .and_then(|v| v.trim().split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, t)| t.trim())
            .filter(|t| !t.is_empty())
            .ok_or(AuthError::Unauthenticated)?;
        let d = digest(token);
        // Compare against every user, so the time does not depend on which one matched.
        let mut found = None;
        for (want, who) in &self.users {
            if constant_time_eq(want, &d) && found.is_none() {
                found = Some(who.clone());
            }
        }
        found.ok_or(AuthError::Unauthenticated)
    }
}

/// Whether a browser's request comes from this site: its `Origin` (when sent) is `public_url`'s
/// origin when one is configured (the address people use, e.g. behind a proxy that rewrites
/// `Host`), else the request's own `Host`. A request without `Origin` passes (browsers send it on
/// every cross-site POST).
pub fn same_origin(headers: &HeaderMap, public_url: Option<&str>) -> bool {
    let Some(origin) = headers
        .get(axum::http::header::ORIGIN)
        .and_then(|v| v.to_str().ok())
    else {
        return true;
    };
    let origin = origin.trim_end_matches('/');
    match public_url {
        Some(u) => {
            // scheme://host[:port] of the configured URL.
            let u = u.trim_end_matches('/');
            let end = u
                .find("://")
                .and_then(|i| u[i + 3..].find('/').map(|j| i + 3 + j))
                .unwrap_or(u.len());
            origin.eq_ignore_ascii_case(&u[..end])
        }
        None => {
            let host = headers
                .get(axum::http::header::HOST)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            origin.split_once("://").map(|(_, h)| h) == Some(host)
        }
    }
}

/// A 503 for a failure that passes (Redis or the broker out of reach, a lost state being restored,
/// contention): the JSON error with `Retry-After`, so clients and proxies know repeating the
/// request is worth it. A 503 for something only configuration changes has none.
pub fn unavailable(message: impl Into<String>) -> axum::response::Response {
    retry_later(error(axum::http::StatusCode::SERVICE_UNAVAILABLE, message))
}

/// A 503 for a failure of the store behind `what` (Redis out of reach, a script error): the detail
/// goes to the log under a short reference the answer names, never to the client — a viewer learns
/// nothing of Redis's addresses, keys or errors.
pub fn store_unavailable(what: &str, e: impl std::fmt::Display) -> axum::response::Response {
    let reference = logged(what, e);
    unavailable(format!(
        "{what} is unavailable (reference {reference} in switchyard's log); retry"
    ))
}

/// Logs a store failure of `what` under a new short reference, and returns the reference.
pub fn logged(what: &str, e: impl std::fmt::Display) -> String {
    let mut reference = uuid::Uuid::new_v4().simple().to_string();
    reference.truncate(12);
    tracing::warn!(reference, error = %e, "{what}: the store failed");
    reference
}

/// Seconds a client waits before repeating a request answered [`unavailable`].
pub const RETRY_AFTER_SECS: &str = "1";

/// `response` with `Retry-After` ([`RETRY_AFTER_SECS`]).
pub fn retry_later(mut response: axum::response::Response) -> axum::response::Response {
    response.headers_mut().insert(
        axum::http::header::RETRY_AFTER,
        axum::http::HeaderValue::from_static(RETRY_AFTER_SECS),
    );
    response
}

/// A JSON error body `{"error": message}` with `code`.
pub fn error(code: axum::http::StatusCode, message: impl Into<String>) -> axum::response::Response {
    use axum::response::IntoResponse;
    (
        code,
        axum::Json(serde_json::json!({"error": message.into()})),
    )
        .into_response()
}

/// The caller, when authenticated and allowed `role`; else the error response (401, 403, 400
/// for an ambiguous caller, 503 when no user is configured).
#[allow(clippy::result_large_err)]
pub fn authorize(
    auth: &Auth,
    headers: &HeaderMap,
    role: Role,
) -> Result<Identity, axum::response::Response> {
    use axum::http::StatusCode;
    match auth.authenticate(headers) {
        Ok(who) if who.can(role) => Ok(who),
        Ok(who) => Err(error(
            StatusCode::FORBIDDEN,
            format!("user {} may not do this (needs role {role:?})", who.name).to_lowercase(),
        )),
        Err(e @ AuthError::Disabled) => Err(error(StatusCode::SERVICE_UNAVAILABLE, e.to_string())),
        Err(e @ AuthError::Ambiguous) => Err(error(StatusCode::BAD_REQUEST, e.to_string())),
        Err(e @ AuthError::Unauthenticated) => Err(error(StatusCode::UNAUTHORIZED, e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("authorization", HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn bearer_tokens_scheme_case_and_one_header() {
        let users: Vec<UserSpec> = serde_yaml::from_str(&format!(
            "[{{name: alice, token: alice-token-0123456, roles: [approver], tenants: [acme]}},
              {{name: bob, token_sha256: {}}}]",
            hex::encode(digest("bob-token-0123456789"))
        ))
        .unwrap();
        let auth = Auth::new(&users, None);
        let alice = auth
            .authenticate(&headers(&["Bearer alice-token-0123456"]))
            .unwrap();
        assert_eq!((alice.name.as_str(), alice.role), ("alice", Role::Approver));
        assert!(alice.sees("acme") && !alice.sees("other"));
        assert_eq!(
            auth.authenticate(&headers(&["bEaReR alice-token-0123456"]))
                .unwrap()
                .name,
            "alice",
            "the scheme is case-insensitive"
        );
        let bob = auth
            .authenticate(&headers(&["Bearer bob-token-0123456789"]))
            .unwrap();
        assert_eq!((bob.role, bob.sees("anything")), (Role::Viewer, true));
        assert_eq!(
            auth.authenticate(&headers(&["Bearer alice-token-0123456", "Bearer x"])),
            Err(AuthError::Ambiguous),
            "two Authorization headers are refused, whatever the first says"
        );
        assert_eq!(
            auth.authenticate(&headers(&[])),
            Err(AuthError::Unauthenticated)
        );
        assert_eq!(
            auth.authenticate(&headers(&["Basic alice-token-0123456"])),
            Err(AuthError::Unauthenticated)
        );
        assert_eq!(
            Auth::new(&[], None).authenticate(&headers(&["Bearer x"])),
            Err(AuthError::Disabled)
        );
        let shared = Auth::new(&[], Some(&Secret::new("shared")));
        assert!(
            shared
                .authenticate(&headers(&["Bearer shared"]))
                .unwrap()
                .shared
        );
    }
}
