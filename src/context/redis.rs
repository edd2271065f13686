//! Redis [`ContextStore`].
//!
//! Keys (all of one resource share the `{tenant/resource}` hash tag):
//! - `<prefix>:ctx:{t/r}`: hash; `_version`, one field per fact (JSON [`Fact`]) and `_v:<key>`, the
//!   version at which each fact last changed;
//! - `<prefix>:events:{t/r}`: list of recent event summaries, most recent first;
//! - `<prefix>:outcome:{t/r}:<task id>`: the task's recorded [`Outcome`] (JSON).
//!
//! The commit is one Lua script, so "record outcome + apply writes" happens once or not at all.

use redis::Script;
use serde_json::Value;
use std::collections::BTreeMap;

use super::{CommitResult, ContextConfig, ContextStore, Fact, Outcome, Snapshot};
use crate::store::{RedisConn, ResourceKey, StoreError};

const COMMIT: &str = r#"
local existing = redis.call('GET', KEYS[3])
if existing then return {0, existing} end
local n = tonumber(ARGV[6])
local version
if n > 0 then
  version = redis.call('HINCRBY', KEYS[1], '_version', 1)
  for i = 0, n - 1 do
    redis.call('HSET', KEYS[1], ARGV[7 + 2 * i], ARGV[8 + 2 * i], '_v:' .. ARGV[7 + 2 * i], version)
  end
  redis.call('EXPIRE', KEYS[1], ARGV[2])
else
  version = tonumber(redis.call('HGET', KEYS[1], '_version') or '0')
end
if ARGV[4] ~= '' then
  redis.call('LREM', KEYS[2], 0, ARGV[4])
  redis.call('LPUSH', KEYS[2], ARGV[4])
  redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[5]) - 1)
  redis.call('EXPIRE', KEYS[2], ARGV[2])
end
redis.call('SET', KEYS[3], ARGV[1], 'EX', ARGV[3])
return {1, tostring(version)}
"#;

pub struct RedisStore {
    conn: RedisConn,
    prefix: String,
    config: ContextConfig,
    commit: Script,
}

fn redis_err(e: redis::RedisError) -> StoreError {
    StoreError::Redis(e.to_string())
}

impl RedisStore {
    pub fn new(conn: RedisConn, prefix: &str, config: ContextConfig) -> Self {
        RedisStore {
            conn,
            prefix: prefix.to_string(),
            config,
            commit: Script::new(COMMIT),
        }
    }

    fn ctx_key(&self, k: &ResourceKey) -> String {
        ctx_key(&self.prefix, k)
    }
    fn events_key(&self, k: &ResourceKey) -> String {
        format!("{}:events:{}", self.prefix, k.hash_tag())
    }
    fn outcome_key(&self, k: &ResourceKey, task_id: &str) -> String {
        format!("{}:outcome:{}:{task_id}", self.prefix, k.hash_tag())
    }
}

fn ctx_key(prefix: &str, k: &ResourceKey) -> String {
    format!("{prefix}:ctx:{}", k.hash_tag())
}

/// The command that reads the context versions at which `keys` last changed on a resource (one
/// HMGET on its context hash), for a store that adds it to its own pipeline (resolve reads them with
/// its state in one round trip). Parse the reply with [`parse_key_versions`].
pub fn key_versions_cmd(prefix: &str, k: &ResourceKey, keys: &[String]) -> redis::Cmd {
    let mut c = redis::cmd("HMGET");
    c.arg(ctx_key(prefix, k));
    for key in keys {
        c.arg(format!("_v:{key}"));
    }
    c
}

/// The reply of [`key_versions_cmd`]: versions of the keys that were ever written.
pub fn parse_key_versions(
    keys: &[String],
    reply: redis::Value,
) -> Result<BTreeMap<String, u64>, StoreError> {
    let versions: Vec<Option<u64>> = redis::FromRedisValue::from_redis_value(reply)
        .map_err(|e| StoreError::corrupt("context key versions", e))?;
    Ok(keys
        .iter()
        .cloned()
        .zip(versions)
        .filter_map(|(k, v)| v.map(|v| (k, v)))
        .collect())
}

fn parse_outcome(v: Option<String>) -> Result<Option<Outcome>, StoreError> {
    v.map(|s| serde_json::from_str(&s).map_err(|e| StoreError::Corrupt(format!("outcome: {e}"))))
        .transpose()
}

fn parse_snapshot(
    fields: BTreeMap<String, String>,
    events: Vec<String>,
) -> Result<Snapshot, StoreError> {
    let mut snap = Snapshot::default();
    for (k, v) in fields {
        if k == "_version" {
            snap.version = v
                .parse()
                .map_err(|_| StoreError::Corrupt(format!("_version {v:?}")))?;
        } else if let Some(key) = k.strip_prefix("_v:") {
            let ver = v
                .parse()
                .map_err(|_| StoreError::Corrupt(format!("{k} {v:?}")))?;
            snap.key_versions.insert(key.to_string(), ver);
        } else {
            let f: Fact = serde_json::from_str(&v)
                .map_err(|e| StoreError::Corrupt(format!("fact {k}: {e}")))?;
            snap.facts.insert(k, f);
        }
    }
    snap.recent_events = events
        .iter()
        .map(|e| {
            serde_json::from_str::<Value>(e).map_err(|x| StoreError::Corrupt(format!("event: {x}")))
        })
        .collect::<Result<_, _>>()?;
    Ok(snap)
}

impl ContextStore for RedisStore {
    async fn snapshot(&self, key: &ResourceKey) -> Result<Snapshot, StoreError> {
        let mut c = self.conn.get().await?;
        let (fields, events): (BTreeMap<String, String>, Vec<String>) = redis::pipe()
            .hgetall(self.ctx_key(key))
            .lrange(self.events_key(key), 0, -1)
            .query_async(&mut c)
            .await
            .map_err(redis_err)?;
        parse_snapshot(fields, events)
    }

    async fn outcome_and_snapshot(
        &self,
        key: &ResourceKey,
        task_id: &str,
    ) -> Result<(Option<Outcome>, Snapshot), StoreError> {
        let mut c = self.conn.get().await?;
        let (outcome, fields, events): (Option<String>, BTreeMap<String, String>, Vec<String>) =
            redis::pipe()
                .get(self.outcome_key(key, task_id))
                .hgetall(self.ctx_key(key))
                .lrange(self.events_key(key), 0, -1)
                .query_async(&mut c)
                .await
                .map_err(redis_err)?;
        Ok((parse_outcome(outcome)?, parse_snapshot(fields, events)?))
    }

    async fn outcome(
        &self,
        key: &ResourceKey,
        task_id: &str,
    ) -> Result<Option<Outcome>, StoreError> {
        let mut c = self.conn.get().await?;
        let v: Option<String> = redis::cmd("GET")
            .arg(self.outcome_key(key, task_id))
            .query_async(&mut c)
            .await
            .map_err(redis_err)?;
        parse_outcome(v)
    }

    async fn commit(
        &self,
        key: &ResourceKey,
        task_id: &str,
        facts: &[(String, Fact)],
        event: Option<&Value>,
        outcome: &Outcome,
    ) -> Result<CommitResult, StoreError> {
        let mut c = self.conn.get().await?;
        let outcome_json =
            serde_json::to_string(outcome).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let mut inv = self.commit.prepare_invoke();
        inv.key(self.ctx_key(key))
            .key(self.events_key(key))
            .key(self.outcome_key(key, task_id))
            .arg(outcome_json)
            .arg(self.config.ttl_seconds)
            .arg(self.config.outcome_ttl_seconds)
            .arg(event.map(Value::to_string).unwrap_or_default())
            .arg(self.config.max_events)
            .arg(facts.len());
        for (k, f) in facts {
            let v = serde_json::to_string(f).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            inv.arg(k).arg(v);
        }
        let (applied, value): (i64, String) = inv.invoke_async(&mut c).await.map_err(redis_err)?;
        if applied == 1 {
            Ok(CommitResult::Applied {
                version: value
                    .parse()
                    .map_err(|_| StoreError::Corrupt(format!("version {value:?}")))?,
            })
        } else {
            let o: Outcome = serde_json::from_str(&value)
                .map_err(|e| StoreError::Corrupt(format!("outcome: {e}")))?;
            Ok(CommitResult::AlreadyRecorded(Box::new(o)))
        }
    }
}
