//! What every Redis-backed store shares: the connection and the resource key with its hash tag.
//!
//! Each store (context, resolve state, budgets, the audit chain head, agent stats) owns its own keys
//! behind a trait with an in-memory twin; this module owns only the connection and the naming of a
//! resource in keys.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::{Deserialize, Serialize};
use tokio::sync::OnceCell;

pub use crate::error::StoreError;

/// The `redis:` config section.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://host:port/db` (or `rediss://` for TLS). Overridden by `SWITCHYARD_REDIS_URL`.
    #[serde(default = "default_redis_url")]
    pub url: String,
    /// Prefix of every key switchyard writes.
    #[serde(default = "default_key_prefix")]
    pub key_prefix: String,
}

fn default_redis_url() -> String {
    "redis://127.0.0.1:6379/".into()
}
fn default_key_prefix() -> String {
    "switchyard".into()
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: default_redis_url(),
            key_prefix: default_key_prefix(),
        }
    }
}

/// Identifies a resource: tenant plus resource id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourceKey {
    pub tenant: String,
    pub resource: String,
}

impl ResourceKey {
    pub fn new(tenant: impl Into<String>, resource: impl Into<String>) -> Self {
        ResourceKey {
            tenant: tenant.into(),
            resource: resource.into(),
        }
    }

    /// The Redis Cluster hash tag of this resource: every key of one resource carries it, so they
    /// share a slot and a script can change them together. Injective: `{`, `}`, `/`, `%` and tab in
    /// either part are percent-encoded, so no two (tenant, resource) pairs share a tag (ids without
    /// those characters keep the plain `{tenant/resource}` form).
    pub fn hash_tag(&self) -> String {
        format!("{{{}}}", self.encoded())
    }

    /// `tenant/resource` with `{`, `}`, `/` and `%` percent-encoded in each part; [`Self::decode`]
    /// reverses it.
    pub fn encoded(&self) -> String {
        format!("{}/{}", escape(&self.tenant), escape(&self.resource))
    }

    /// The key [`Self::encoded`] made.
    pub fn decode(s: &str) -> Option<ResourceKey> {
        let (t, r) = s.split_once('/')?;
        Some(ResourceKey::new(unescape(t)?, unescape(r)?))
    }
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '%' => out.push_str("%25"),
            '/' => out.push_str("%2F"),
            '{' => out.push_str("%7B"),
            '}' => out.push_str("%7D"),
            '\t' => out.push_str("%09"),
            c => out.push(c),
        }
    }
    out
}

fn unescape(s: &str) -> Option<String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('%') {
        out.push_str(&rest[..i]);
        let code = rest.get(i + 1..i + 3)?;
        out.push(match code {
            "25" => '%',
            "2F" => '/',
            "7B" => '{',
            "7D" => '}',
            "09" => '\t',
            _ => return None,
        });
        rest = &rest[i + 3..];
    }
    out.push_str(rest);
    Some(out)
}

/// A lazily connected, self-reconnecting Redis connection shared by every store of the process.
#[derive(Clone)]
pub struct RedisConn {
    client: redis::Client,
    manager: std::sync::Arc<OnceCell<ConnectionManager>>,
}

impl RedisConn {
    pub fn new(url: &str) -> Result<Self, StoreError> {
        Ok(RedisConn {
            client: redis::Client::open(url)?,
            manager: Default::default(),
        })
    }

    /// The connection; connecting on first use. Failing to connect is an error now, a retry later.
    pub async fn get(&self) -> Result<ConnectionManager, StoreError> {
        let m = self
            .manager
            .get_or_try_init(|| async {
                let cfg = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(Duration::from_secs(2)))
                    .set_response_timeout(Some(Duration::from_secs(2)))
                    .set_number_of_retries(2)
                    .set_max_delay(Duration::from_millis(500));
                ConnectionManager::new_with_config(self.client.clone(), cfg).await
            })
            .await?;
        Ok(m.clone())
    }

    /// Whether Redis answers a PING within `timeout` (readiness).
    pub async fn ping(&self, timeout: Duration) -> bool {
        tokio::time::timeout(timeout, async {
            let mut c = self.client.get_multiplexed_async_connection().await?;
            redis::cmd("PING").query_async::<String>(&mut c).await
        })
        .await
        .is_ok_and(|r| r.is_ok())
    }
}

/// Reads an integer or numeric string out of a script reply (Lua numbers come back either way).
pub fn reply_number(v: Option<&redis::Value>) -> f64 {
    match v {
        Some(redis::Value::Int(n)) => *n as f64,
        Some(redis::Value::BulkString(b)) => std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0.0),
        Some(redis::Value::SimpleString(s)) => s.parse().unwrap_or(0.0),
        Some(redis::Value::Double(d)) => *d,
        _ => 0.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn hash_tags_never_collide() {
        // Both pairs shared one tag (and so context, resolve state and audit head) before.
        let k = |t: &str, r: &str| ResourceKey::new(t, r).hash_tag();
        assert_ne!(k("default", "p1b{1}"), k("default", "p1b_1_"));
        assert_ne!(k("a/x", "y"), k("a", "x/y"));
        assert_eq!(
            k("default", "checkout"),
            "{default/checkout}",
            "plain ids keep their keys"
        );
        assert_eq!(k("t", "a}b"), "{t/a%7Db}", "no brace ends the tag early");
    }

    proptest! {
        #[test]
        fn encoding_is_injective(t1 in ".{0,8}", r1 in ".{0,8}", t2 in ".{0,8}", r2 in ".{0,8}") {
            let (a, b) = (ResourceKey::new(&t1, &r1), ResourceKey::new(&t2, &r2));
            prop_assert_eq!(a.hash_tag() == b.hash_tag(), a == b);
            prop_assert_eq!(ResourceKey::decode(&a.encoded()), Some(a.clone()));
            let tag = a.hash_tag();
            prop_assert_eq!(tag[1..tag.len() - 1].find(['{', '}']), None);
        }
    }
}
