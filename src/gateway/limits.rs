//! Rate limits and cooldowns shared by every instance through Redis.
//!
//! Each limit (requests and tokens per minute of a provider's model, optionally per agent or
//! tenant) is a token bucket in Redis; one script call per request takes from every bucket that
//! applies, or from none and says how long to wait, using Redis's clock so instances with skewed
//! clocks agree. A candidate that keeps failing is put in a cooldown that every instance sees at
//! once (a key with a TTL, checked by the same script).
//!
//! Keys: `<prefix>:gw:bucket:{<provider/model>}:<rpm|tpm>[:<scope>:<who>]` (hash `tokens`, `ts`),
//! `<prefix>:gw:cool:{<provider/model>}` and `<prefix>:gw:fail:{<provider/model>}`; a candidate's
//! keys share a hash tag, so one script touches one Redis Cluster slot.

use redis::Script;
use serde::{Deserialize, Serialize};

use crate::store::{RedisConn, StoreError};

/// Who a limit counts per.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LimitScope {
    /// One bucket for everyone.
    #[default]
    All,
    /// One bucket per calling agent.
    Agent,
    /// One bucket per tenant.
    Tenant,
}

/// What a call does when a limit has no room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnLimit {
    /// Wait for room (up to `max_wait_ms`), then fail over.
    #[default]
    Wait,
    /// Go to the next candidate at once.
    Failover,
}

/// A limit as configured under `gateway.limits`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LimitSpec {
    pub provider: String,
    /// The provider's model name (`*` for every model of the provider).
    #[serde(default = "star")]
    pub model: String,
    /// Requests per minute.
    #[serde(default)]
    pub rpm: Option<u64>,
    /// Tokens (input + output) per minute; a request counts its estimate until its usage is known.
    #[serde(default)]
    pub tpm: Option<u64>,
    #[serde(default)]
    pub per: LimitScope,
    #[serde(default)]
    pub on_limit: OnLimit,
    /// Longest a call waits for room before failing over.
    #[serde(default = "default_max_wait_ms")]
    pub max_wait_ms: u64,
}

fn star() -> String {
    "*".into()
}
fn default_max_wait_ms() -> u64 {
    10_000
}

/// One bucket a request takes from.
#[derive(Debug, Clone, PartialEq)]
pub struct Bucket {
    pub key: String,
    pub capacity: f64,
    /// Refill per millisecond.
    pub rate: f64,
    pub cost: f64,
    /// Counts tokens (a `tpm` limit), not requests: what a failed call did not use goes back.
    pub tokens: bool,
}

/// What [`Limiter::acquire`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acquire {
    /// Taken from every bucket.
    Granted,
    /// No room: try again in this many milliseconds (nothing was taken).
    Wait(u64),
    /// The candidate is cooling down for this many more milliseconds.
    Cooling(u64),
}

const ACQUIRE: &str = r#"
-- KEYS[1..n] = buckets, KEYS[n+1] = cooldown key. ARGV[1] = n, then per bucket: capacity,
-- refill per ms, cost. Reply {0, 0} granted, {1, ms} wait, {2, ms} cooling down.
local n = tonumber(ARGV[1])
local cool = redis.call('PTTL', KEYS[n + 1])
if cool > 0 then return {2, cool} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local left, wait = {}, 0
for i = 1, n do
  local cap, rate, cost = tonumber(ARGV[i * 3 - 1]), tonumber(ARGV[i * 3]), tonumber(ARGV[i * 3 + 1])
  if cost > cap then cost = cap end
  local v = redis.call('HMGET', KEYS[i], 'tokens', 'ts')
  local tokens = tonumber(v[1] or cap) or cap
  local ts = tonumber(v[2] or now) or now
  tokens = math.min(cap, tokens + math.max(0, now - ts) * rate)
  if tokens < cost then
    wait = math.max(wait, math.ceil((cost - tokens) / rate))
  end
  left[i] = tokens - cost
end
if wait > 0 then return {1, wait} end
for i = 1, n do
  local cap, rate = tonumber(ARGV[i * 3 - 1]), tonumber(ARGV[i * 3])
  redis.call('HSET', KEYS[i], 'tokens', tostring(left[i]), 'ts', tostring(now))
  redis.call('PEXPIRE', KEYS[i], math.ceil(cap / rate) + 60000)
end
return {0, 0}
"#;

const ADJUST: &str = r#"
-- KEYS[1] = bucket; ARGV[1] = tokens to give back (negative: take more), ARGV[2] = capacity
local v = tonumber(redis.call('HGET', KEYS[1], 'tokens') or '')
if v == nil then return 0 end
local after = math.min(tonumber(ARGV[2]), v + tonumber(ARGV[1]))
redis.call('HSET', KEYS[1], 'tokens', tostring(after))
return 1
"#;

const FAILED: &str = r#"
-- KEYS[1] = failure counter, KEYS[2] = cooldown; ARGV[1] = failures before a cooldown,
-- ARGV[2] = cooldown ms, ARGV[3] = counting window ms
local n = redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
if n >= tonumber(ARGV[1]) then
  redis.call('SET', KEYS[2], '1', 'PX', ARGV[2])
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"#;

/// The shared limits and cooldowns.
pub struct Limiter {
    conn: RedisConn,
    prefix: String,
    acquire: Script,
    adjust: Script,
    failed: Script,
    overrun: Script,
    /// Candidates this instance counted a failure of since their last success: only those need
    /// their (shared) count reset when they answer, so a healthy call costs no extra round trip.
    failing: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// KEYS[1] a permit's count of over-budget calls; ARGV round, calls a round covers, ttl. Counts
/// the call (1) only while the count is still in that round; else 0 (the round was used up).
const OVERRUN: &str = r"
local n = tonumber(redis.call('GET', KEYS[1]) or '0')
if math.floor(n / tonumber(ARGV[2])) ~= tonumber(ARGV[1]) then return 0 end
redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
";

impl Limiter {
    pub fn new(conn: RedisConn, prefix: &str) -> Self {
        Limiter {
            conn,
            prefix: prefix.to_string(),
            acquire: Script::new(ACQUIRE),
            adjust: Script::new(ADJUST),
            failed: Script::new(FAILED),
            overrun: Script::new(OVERRUN),
            failing: Default::default(),
        }
    }

    fn tag(provider: &str, model: &str) -> String {
        format!(
            "{{{}/{}}}",
            provider.replace(['{', '}'], "_"),
            model.replace(['{', '}'], "_")
        )
    }

    /// The bucket key of a limit for a candidate and, for scoped limits, a caller.
    pub fn bucket_key(
        &self,
        provider: &str,
        model: &str,
        kind: &str,
        who: Option<(&str, &str)>,
    ) -> String {
        let mut k = format!(
            "{}:gw:bucket:{}:{kind}",
            self.prefix,
            Self::tag(provider, model)
        );
        if let Some((scope, name)) = who {
            k.push_str(&format!(
                ":{scope}:{}",
                crate::store::ResourceKey::new(name, "").encoded()
            ));
        }
        k
    }

    fn cool_key(&self, provider: &str, model: &str) -> String {
        format!("{}:gw:cool:{}", self.prefix, Self::tag(provider, model))
    }

    fn fail_key(&self, provider: &str, model: &str) -> String {
        format!("{}:gw:fail:{}", self.prefix, Self::tag(provider, model))
    }

    /// Takes `buckets` (all of one candidate) unless the candidate cools down or one lacks room.
    pub async fn acquire(
        &self,
        provider: &str,
        model: &str,
        buckets: &[Bucket],
    ) -> Result<Acquire, StoreError> {
        let mut inv = self.acquire.prepare_invoke();
        inv.arg(buckets.len());
        for b in buckets {
            inv.key(&b.key).arg(b.capacity).arg(b.rate).arg(b.cost);
        }
        inv.key(self.cool_key(provider, model));
        let mut c = self.conn.get().await?;
        let (status, ms): (i64, i64) = inv.invoke_async(&mut c).await?;
        Ok(match status {
            0 => Acquire::Granted,
            1 => Acquire::Wait(ms.max(1) as u64),
            _ => Acquire::Cooling(ms.max(1) as u64),
        })
    }

    /// Gives tokens back to a bucket (a request used fewer than it was counted for).
    pub async fn give_back(&self, bucket: &Bucket, tokens: f64) -> Result<(), StoreError> {
        if tokens == 0.0 {
            return Ok(());
        }
        let mut inv = self.adjust.prepare_invoke();
        inv.key(&bucket.key).arg(tokens).arg(bucket.capacity);
        let mut c = self.conn.get().await?;
        let _: i64 = inv.invoke_async(&mut c).await?;
        Ok(())
    }

    /// Counts a failed attempt of a candidate; true when this put it in a cooldown.
    pub async fn failed(
        &self,
        provider: &str,
        model: &str,
        failures: u32,
        cooldown_ms: u64,
    ) -> Result<bool, StoreError> {
        self.failing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(self.fail_key(provider, model));
        let mut inv = self.failed.prepare_invoke();
        inv.key(self.fail_key(provider, model))
            .key(self.cool_key(provider, model))
            .arg(failures.max(1))
            .arg(cooldown_ms.max(1))
            .arg(cooldown_ms.max(60_000));
        let mut c = self.conn.get().await?;
        let cooled: i64 = inv.invoke_async(&mut c).await?;
        Ok(cooled == 1)
    }

    /// A candidate answered: its failure count starts again (when this instance counted one).
    pub async fn succeeded(&self, provider: &str, model: &str) -> Result<(), StoreError> {
        let key = self.fail_key(provider, model);
        let counted = self
            .failing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&key);
        if !counted {
            return Ok(());
        }
        let mut c = self.conn.get().await?;
        redis::cmd("DEL").arg(key).query_async::<()>(&mut c).await?;
        Ok(())
    }

    /// How many over-budget calls went through under the approvals of `permit` (a task, alias and
    /// budget), across instances.
    pub async fn overrun_calls(&self, permit: &str) -> Result<u64, StoreError> {
        let mut c = self.conn.get().await?;
        let n: Option<u64> = redis::cmd("GET")
            .arg(self.overrun_key(permit))
            .query_async(&mut c)
            .await?;
        Ok(n.unwrap_or(0))
    }

    /// Counts one more over-budget call through under `permit`'s approval of `round` (`covers`
    /// calls a round), unless other calls used that round up meanwhile (then `false`: the call
    /// needs the next round's approval). The count is kept `ttl_secs` from its last call.
    pub async fn count_overrun(
        &self,
        permit: &str,
        (round, covers): (u64, u64),
        ttl_secs: u64,
    ) -> Result<bool, StoreError> {
        let mut c = self.conn.get().await?;
        let counted: i64 = self
            .overrun
            .key(self.overrun_key(permit))
            .arg(round)
            .arg(covers)
            .arg(ttl_secs)
            .invoke_async(&mut c)
            .await?;
        Ok(counted == 1)
    }

    fn overrun_key(&self, permit: &str) -> String {
        format!("{}:gateway:overrun:{{{permit}}}", self.prefix)
    }
}
