//! Budgets: calls and currency per agent, workflow or tenant per period, reserved before every agent
//! call and checked again before an action goes out.
//!
//! A reservation is atomic across every budget that applies ([`BudgetStore::reserve`]: all or
//! none), so concurrent calls in any number of instances never overspend. A batch's reservations
//! are one script call, decided in order (each sees the ones before it). Redis keys carry the
//! `{budgets}` hash tag, so one script touches them all on one Redis Cluster slot.
//!
//! A reservation pays for one agent call. A task is reserved for only when it is about to call its
//! agent: a redelivered task whose outcome is recorded replays it without reserving, so it pays
//! again only if the agent is called again (a crash between the call and the recording), which is
//! the spend that actually happens.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use redis::Script;
use serde::{Deserialize, Serialize};

use crate::pattern::TypePattern;
use crate::store::{reply_number, RedisConn, StoreError};
use crate::telemetry::METRICS;

/// What a budget counts per.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BudgetScope {
    Agent,
    Workflow,
    Tenant,
    /// Per gateway model alias (applies to LLM calls only).
    Model,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    Hour,
    Day,
    Month,
    Total,
}

/// How long a `per: workflow`, `period: total` bucket (one per run) lives after its first charge.
pub const WORKFLOW_TOTAL_KEEP_SECONDS: u64 = 30 * 86400;

impl Period {
    /// The bucket a time falls in, and how long the bucket's key must live.
    fn bucket(self, now: i64) -> (String, u64) {
        let dt = chrono::DateTime::from_timestamp(now, 0).unwrap_or_default();
        match self {
            Period::Hour => (dt.format("%Y%m%d%H").to_string(), 2 * 3600),
            Period::Day => (dt.format("%Y%m%d").to_string(), 2 * 86400),
            Period::Month => (dt.format("%Y%m").to_string(), 62 * 86400),
            Period::Total => ("total".into(), 0),
        }
    }
}

/// A budget: calls and/or currency per agent, workflow or tenant per period.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetSpec {
    /// Unique name; the metric label.
    pub name: String,
    pub per: BudgetScope,
    /// Which agents / tenants / workflows it applies to (`*` pattern).
    #[serde(default = "star")]
    pub matches: String,
    pub period: Period,
    #[serde(default)]
    pub max_calls: Option<u64>,
    #[serde(default)]
    pub max_cost: Option<f64>,
}

fn star() -> String {
    "*".into()
}

/// Who a budget check is for.
#[derive(Debug, Clone)]
pub struct Spender<'a> {
    pub agent: &'a str,
    pub workflow: &'a str,
    pub tenant: &'a str,
    /// The model alias of an LLM call; empty for an agent call.
    pub model: &'a str,
}

/// Result of a budget operation.
#[derive(Debug, Clone, PartialEq)]
pub enum BudgetCheck {
    Ok,
    /// This budget would be (or is) exceeded.
    Exhausted {
        budget: String,
    },
}

/// An LLM call's budget reservation, to settle once its cost is known.
#[derive(Debug, Clone)]
pub struct Hold {
    pub id: String,
    lines: Vec<Line>,
    pub estimate: f64,
}

/// Spend per bucket as read at one moment ([`Budgets::view`]).
#[derive(Debug, Clone, Default)]
pub struct SpentView(HashMap<String, (u64, f64)>);

/// What one budget has spent this period, against its limits.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Standing {
    pub budget: String,
    pub calls: u64,
    pub cost: f64,
    pub max_calls: Option<u64>,
    pub max_cost: Option<f64>,
}

/// One budget bucket a reservation counts against.
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    /// The bucket's key (budget, who, period).
    pub key: String,
    /// How long the bucket lives after a write (0: forever).
    pub ttl: u64,
    pub max_calls: Option<u64>,
    pub max_cost: Option<f64>,
}

/// One reservation of a batch: `calls` and `cost` against every line, or none.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub lines: Vec<Line>,
    pub calls: u64,
    pub cost: f64,
}

/// What a reservation did.
#[derive(Debug, Clone, PartialEq)]
pub struct Reserved {
    /// Index of the line that refused (nothing was reserved), or `None` when all took it.
    pub refused_by: Option<usize>,
    /// Calls and cost spent per line after the reservation (for the budget gauges).
    pub spent: Vec<(f64, f64)>,
}

/// Where budget spend lives. Boxed futures, so it can be shared as `Arc<dyn BudgetStore>`.
pub trait BudgetStore: Send + Sync + 'static {
    /// Decides `requests` in order, atomically as a whole: each adds its calls and cost to every
    /// one of its lines, or to none when one would pass its limit.
    fn reserve<'a>(
        &'a self,
        requests: &'a [Request],
    ) -> BoxFuture<'a, Result<Vec<Reserved>, StoreError>>;

    /// Calls and cost spent so far on each key.
    fn spent<'a>(
        &'a self,
        keys: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<(u64, f64)>, StoreError>>;

    /// [`BudgetStore::reserve`] for one request, remembered as hold `id` in `holds` until settled
    /// or until `hold_ms` have passed (then [`BudgetStore::sweep`] gives its cost back).
    fn hold<'a>(
        &'a self,
        holds: &'a Holds,
        id: &'a str,
        hold_ms: u64,
        request: &'a Request,
    ) -> BoxFuture<'a, Result<Reserved, StoreError>>;

    /// Settles hold `id` at `actual`: its lines move by `actual - held` (by `actual` when the hold
    /// was swept meanwhile). Returns the change applied.
    fn settle<'a>(
        &'a self,
        holds: &'a Holds,
        id: &'a str,
        lines: &'a [Line],
        actual: f64,
    ) -> BoxFuture<'a, Result<f64, StoreError>>;

    /// Gives back the cost of up to `max` expired holds (calls that never settled: a crash).
    fn sweep<'a>(
        &'a self,
        holds: &'a Holds,
        max: usize,
    ) -> BoxFuture<'a, Result<usize, StoreError>>;
}

/// Where holds live: a sorted set of hold ids by expiry and a hash of what each holds.
#[derive(Debug, Clone)]
pub struct Holds {
    pub by_expiry: String,
    pub held: String,
    /// Holds settled in the last ten minutes (a settle tried again changes nothing).
    pub settled: String,
}

const HOLD: &str = r#"
-- KEYS[1] = holds by expiry, KEYS[2] = held, KEYS[3..] = lines. ARGV[1] = id, ARGV[2] = hold ms,
-- ARGV[3] = cost, then per line: ttl, max calls, max cost (-1 = none).
-- Reply {1, 0, spent...} held; {0, i, spent...} refused by line i; {-1, i} line i is not a number.
local n = #KEYS - 2
local cost = tonumber(ARGV[3])
local calls, spent = {}, {}
local refused = 0
for i = 1, n do
  local v = redis.call('HMGET', KEYS[i + 2], 'calls', 'cost')
  calls[i], spent[i] = tonumber(v[1] or '0'), tonumber(v[2] or '0')
  if calls[i] == nil or spent[i] == nil then return {-1, i} end
  local maxc, maxm = tonumber(ARGV[2 + i * 3]), tonumber(ARGV[3 + i * 3])
  if refused == 0 and ((maxc >= 0 and calls[i] + 1 > maxc) or (maxm >= 0 and spent[i] + cost > maxm + 1e-9)) then
    refused = i
  end
end
local out = {refused == 0 and 1 or 0, refused}
for i = 1, n do
  if refused == 0 then
    local k = KEYS[i + 2]
    local fresh = redis.call('EXISTS', k) == 0
    redis.call('HINCRBY', k, 'calls', 1)
    redis.call('HINCRBYFLOAT', k, 'cost', ARGV[3])
    local ttl = tonumber(ARGV[1 + i * 3])
    if fresh and ttl > 0 then redis.call('EXPIRE', k, ttl) end
    calls[i], spent[i] = calls[i] + 1, spent[i] + cost
  end
  out[#out + 1] = tostring(calls[i])
  out[#out + 1] = tostring(spent[i])
end
if refused == 0 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
  local keys = {}
  for i = 3, #KEYS do keys[#keys + 1] = KEYS[i] end
  redis.call('HSET', KEYS[2], ARGV[1], cjson.encode({cost = ARGV[3], keys = keys}))
end
return out
"#;

const SETTLE: &str = r#"
-- KEYS[1] = holds by expiry, KEYS[2] = held, KEYS[3] = settled, KEYS[4..] = lines. ARGV[1] = id,
-- ARGV[2] = actual. A settled hold is remembered in KEYS[3] for ten minutes, so a settle tried
-- again (its reply lost) charges nothing more; a hold the sweeper gave back is gone, and its
-- settle charges the whole actual cost.
if redis.call('ZSCORE', KEYS[3], ARGV[1]) then return '0' end
local held = redis.call('HGET', KEYS[2], ARGV[1])
local delta = tonumber(ARGV[2])
if held then
  delta = delta - tonumber(cjson.decode(held).cost)
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('HDEL', KEYS[2], ARGV[1])
end
local t = redis.call('TIME')
redis.call('ZADD', KEYS[3], tonumber(t[1]) * 1000 + 600000, ARGV[1])
if delta ~= 0 then
  for i = 4, #KEYS do
    if redis.call('EXISTS', KEYS[i]) == 1 then redis.call('HINCRBYFLOAT', KEYS[i], 'cost', tostring(delta)) end
  end
end
return tostring(delta)
"#;

const SWEEP: &str = r#"
-- KEYS[1] = holds by expiry, KEYS[2] = held, KEYS[3] = settled. ARGV[1] = most to release.
-- Reply: how many.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, id in ipairs(ids) do
  local h = redis.call('HGET', KEYS[2], id)
  if h then
    local d = cjson.decode(h)
    for _, k in ipairs(d.keys) do
      if redis.call('EXISTS', k) == 1 then redis.call('HINCRBYFLOAT', k, 'cost', tostring(-tonumber(d.cost))) end
    end
    redis.call('HDEL', KEYS[2], id)
  end
  redis.call('ZREM', KEYS[1], id)
end
return #ids
"#;

const RESERVE: &str = r#"
-- KEYS = the batch's distinct buckets. ARGV[1] = request count; then per request: calls, cost,
-- line count, and per line: bucket index (into KEYS), ttl, max calls, max cost (-1 = none).
-- Reply per request: status (1 ok, 0 refused), refusing line (1-based, 0 = none), then per line
-- calls and cost after it. {-1, i} when bucket i holds a value that is not a number.
local calls, cost, fresh, delta = {}, {}, {}, {}
for i = 1, #KEYS do
  local v = redis.call('HMGET', KEYS[i], 'calls', 'cost')
  calls[i] = tonumber(v[1] or '0')
  cost[i] = tonumber(v[2] or '0')
  if calls[i] == nil or cost[i] == nil then return {-1, i} end
  fresh[i] = v[1] == false
  delta[i] = {0, 0, 0}
end
local out = {}
local a = 2
for r = 1, tonumber(ARGV[1]) do
  local n, m, lines = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  a = a + 3
  local refused = 0
  for l = 1, lines do
    local b = a + (l - 1) * 4
    local k, maxc, maxm = tonumber(ARGV[b]), tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])
    if refused == 0 and ((maxc >= 0 and calls[k] + n > maxc) or (maxm >= 0 and cost[k] + m > maxm + 1e-9)) then
      refused = l
    end
  end
  if refused == 0 then
    for l = 1, lines do
      local b = a + (l - 1) * 4
      local k = tonumber(ARGV[b])
      calls[k] = calls[k] + n
      cost[k] = cost[k] + m
      delta[k] = {delta[k][1] + n, delta[k][2] + m, tonumber(ARGV[b + 1])}
    end
  end
  out[#out + 1] = refused == 0 and 1 or 0
  out[#out + 1] = refused
  for l = 1, lines do
    local k = tonumber(ARGV[a + (l - 1) * 4])
    out[#out + 1] = tostring(calls[k])
    out[#out + 1] = tostring(cost[k])
  end
  a = a + lines * 4
end
for i = 1, #KEYS do
  if delta[i][1] > 0 then redis.call('HINCRBY', KEYS[i], 'calls', delta[i][1]) end
  if delta[i][2] ~= 0 then redis.call('HINCRBYFLOAT', KEYS[i], 'cost', tostring(delta[i][2])) end
  if delta[i][1] > 0 and fresh[i] and delta[i][3] > 0 then redis.call('EXPIRE', KEYS[i], delta[i][3]) end
end
return out
"#;

/// Budget spend in Redis: one hash per bucket (`calls`, `cost`).
pub struct RedisBudgetStore {
    conn: RedisConn,
    reserve: Script,
    hold: Script,
    settle: Script,
    sweep: Script,
}

impl RedisBudgetStore {
    pub fn new(conn: RedisConn) -> Self {
        RedisBudgetStore {
            conn,
            reserve: Script::new(RESERVE),
            hold: Script::new(HOLD),
            settle: Script::new(SETTLE),
            sweep: Script::new(SWEEP),
        }
    }
}

impl BudgetStore for RedisBudgetStore {
    fn reserve<'a>(
        &'a self,
        requests: &'a [Request],
    ) -> BoxFuture<'a, Result<Vec<Reserved>, StoreError>> {
        Box::pin(async move {
            if requests.is_empty() {
                return Ok(Vec::new());
            }
            let mut keys: Vec<&str> = Vec::new();
            let mut index: HashMap<&str, usize> = HashMap::new();
            let mut inv = self.reserve.prepare_invoke();
            inv.arg(requests.len());
            for r in requests {
                inv.arg(r.calls).arg(r.cost).arg(r.lines.len());
                for l in &r.lines {
                    let k = *index.entry(l.key.as_str()).or_insert_with(|| {
                        keys.push(l.key.as_str());
                        keys.len()
                    });
                    inv.arg(k)
                        .arg(l.ttl)
                        .arg(l.max_calls.map(|m| m as i64).unwrap_or(-1))
                        .arg(l.max_cost.unwrap_or(-1.0));
                }
            }
            for k in &keys {
                inv.key(*k);
            }
            let mut c = self.conn.get().await?;
            // One round trip for the batch.
            let reply: Vec<redis::Value> = inv.invoke_async(&mut c).await?;
            let num = |i: usize| reply_number(reply.get(i));
            if num(0) < 0.0 {
                let bad = (num(1) as usize).saturating_sub(1);
                return Err(StoreError::Corrupt(format!(
                    "budget bucket {} holds a value that is not a number",
                    keys.get(bad).copied().unwrap_or("?")
                )));
            }
            let mut at = 0;
            let mut out = Vec::with_capacity(requests.len());
            for r in requests {
                let (status, refusing) = (num(at), num(at + 1) as usize);
                at += 2;
                let spent = (0..r.lines.len())
                    .map(|j| (num(at + 2 * j), num(at + 2 * j + 1)))
                    .collect();
                at += 2 * r.lines.len();
                out.push(Reserved {
                    refused_by: (status == 0.0).then(|| refusing.saturating_sub(1)),
                    spent,
                });
            }
            Ok(out)
        })
    }

    fn spent<'a>(
        &'a self,
        keys: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<(u64, f64)>, StoreError>> {
        Box::pin(async move {
            if keys.is_empty() {
                return Ok(Vec::new());
            }
            let mut c = self.conn.get().await?;
            let mut pipe = redis::pipe();
            for key in keys {
                pipe.cmd("HMGET").arg(key).arg("calls").arg("cost");
            }
            let spent: Vec<(Option<String>, Option<String>)> = pipe.query_async(&mut c).await?;
            spent
                .into_iter()
                .zip(keys)
                .map(|((calls, cost), key)| {
                    let bad = |v: &str| {
                        StoreError::Corrupt(format!(
                            "budget bucket {key} holds {v:?}, not a number"
                        ))
                    };
                    let calls = match calls {
                        Some(v) => v.parse::<u64>().map_err(|_| bad(&v))?,
                        None => 0,
                    };
                    let cost = match cost {
                        Some(v) => v.parse::<f64>().map_err(|_| bad(&v))?,
                        None => 0.0,
                    };
                    Ok((calls, cost))
                })
                .collect()
        })
    }
    fn hold<'a>(
        &'a self,
        holds: &'a Holds,
        id: &'a str,
        hold_ms: u64,
        request: &'a Request,
    ) -> BoxFuture<'a, Result<Reserved, StoreError>> {
        Box::pin(async move {
            let mut inv = self.hold.prepare_invoke();
            inv.key(&holds.by_expiry).key(&holds.held);
            inv.arg(id).arg(hold_ms).arg(request.cost);
            for l in &request.lines {
                inv.key(&l.key)
                    .arg(l.ttl)
                    .arg(l.max_calls.map(|m| m as i64).unwrap_or(-1))
                    .arg(l.max_cost.unwrap_or(-1.0));
            }
            let mut c = self.conn.get().await?;
            let reply: Vec<redis::Value> = inv.invoke_async(&mut c).await?;
            let num = |i: usize| reply_number(reply.get(i));
            if num(0) < 0.0 {
                return Err(StoreError::Corrupt(
                    "a budget bucket holds a value that is not a number".into(),
                ));
            }
            let spent = (0..request.lines.len())
                .map(|j| (num(2 + 2 * j), num(3 + 2 * j)))
                .collect();
            Ok(Reserved {
                refused_by: (num(0) == 0.0).then(|| (num(1) as usize).saturating_sub(1)),
                spent,
            })
        })
    }

    fn settle<'a>(
        &'a self,
        holds: &'a Holds,
        id: &'a str,
        lines: &'a [Line],
        actual: f64,
    ) -> BoxFuture<'a, Result<f64, StoreError>> {
        Box::pin(async move {
            let mut inv = self.settle.prepare_invoke();
            inv.key(&holds.by_expiry)
                .key(&holds.held)
                .key(&holds.settled);
            for l in lines {
                inv.key(&l.key);
            }
            inv.arg(id).arg(actual);
            let mut c = self.conn.get().await?;
            let delta: String = inv.invoke_async(&mut c).await?;
            delta
                .parse()
                .map_err(|_| StoreError::Corrupt(format!("settle replied {delta:?}")))
        })
    }

    fn sweep<'a>(
        &'a self,
        holds: &'a Holds,
        max: usize,
    ) -> BoxFuture<'a, Result<usize, StoreError>> {
        Box::pin(async move {
            let mut inv = self.sweep.prepare_invoke();
            inv.key(&holds.by_expiry)
                .key(&holds.held)
                .key(&holds.settled)
                .arg(max);
            let mut c = self.conn.get().await?;
            let n: usize = inv.invoke_async(&mut c).await?;
            Ok(n)
        })
    }
}

/// In-memory twin of [`RedisBudgetStore`] for unit tests (no TTLs, holds never expire): spend by
/// bucket.
#[derive(Default)]
pub struct MemoryBudgetStore {
    state: Mutex<HashMap<String, (u64, f64)>>,
    held: Mutex<HashMap<String, f64>>,
}

impl BudgetStore for MemoryBudgetStore {
    fn reserve<'a>(
        &'a self,
        requests: &'a [Request],
    ) -> BoxFuture<'a, Result<Vec<Reserved>, StoreError>> {
        Box::pin(async move {
            let mut buckets = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let mut out = Vec::with_capacity(requests.len());
            for r in requests {
                let refused_by = r.lines.iter().position(|l| {
                    let (n, c) = buckets.get(&l.key).copied().unwrap_or_default();
                    l.max_calls.is_some_and(|m| n + r.calls > m)
                        || l.max_cost.is_some_and(|m| c + r.cost > m + 1e-9)
                });
                if refused_by.is_none() {
                    for l in &r.lines {
                        let b = buckets.entry(l.key.clone()).or_default();
                        b.0 += r.calls;
                        b.1 += r.cost;
                    }
                }
                let spent = r
                    .lines
                    .iter()
                    .map(|l| {
                        let (n, c) = buckets.get(&l.key).copied().unwrap_or_default();
                        (n as f64, c)
                    })
                    .collect();
                out.push(Reserved { refused_by, spent });
            }
            Ok(out)
        })
    }

    fn spent<'a>(
        &'a self,
        keys: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<(u64, f64)>, StoreError>> {
        Box::pin(async move {
            let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            Ok(keys
                .iter()
                .map(|k| st.get(k).copied().unwrap_or_default())
                .collect())
        })
    }

    fn hold<'a>(
        &'a self,
        _holds: &'a Holds,
        id: &'a str,
        _hold_ms: u64,
        request: &'a Request,
    ) -> BoxFuture<'a, Result<Reserved, StoreError>> {
        Box::pin(async move {
            let mut r = self.reserve(std::slice::from_ref(request)).await?;
            let r = r
                .pop()
                .ok_or_else(|| StoreError::Corrupt("no reply".into()))?;
            if r.refused_by.is_none() {
                self.held
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(id.to_string(), request.cost);
            }
            Ok(r)
        })
    }

    fn settle<'a>(
        &'a self,
        _holds: &'a Holds,
        id: &'a str,
        lines: &'a [Line],
        actual: f64,
    ) -> BoxFuture<'a, Result<f64, StoreError>> {
        Box::pin(async move {
            // Nothing sweeps here: a hold not held any more was settled already.
            let Some(held) = self
                .held
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(id)
            else {
                return Ok(0.0);
            };
            let delta = actual - held;
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            for l in lines {
                if let Some(b) = st.get_mut(&l.key) {
                    b.1 += delta;
                }
            }
            Ok(delta)
        })
    }

    fn sweep<'a>(
        &'a self,
        _holds: &'a Holds,
        _max: usize,
    ) -> BoxFuture<'a, Result<usize, StoreError>> {
        Box::pin(async { Ok(0) })
    }
}

/// The budgets of the config over a store.
pub struct Budgets {
    store: Arc<dyn BudgetStore>,
    prefix: String,
    specs: Vec<BudgetSpec>,
    /// The time spend is counted at when not now (`replay`: the time of what is replayed).
    clock: crate::event::Clock,
}

impl Budgets {
    pub fn new(store: Arc<dyn BudgetStore>, prefix: &str, specs: Vec<BudgetSpec>) -> Self {
        Budgets {
            store,
            prefix: prefix.into(),
            specs,
            clock: Default::default(),
        }
    }

    /// Counts spend in the periods of `clock`'s time instead of now's.
    pub fn with_clock(mut self, clock: crate::event::Clock) -> Self {
        self.clock = clock;
        self
    }

    pub fn is_empty(&self) -> bool {
        self.specs.is_empty()
    }

    /// The budgets that apply to a spender, with their buckets.
    fn applicable(&self, s: &Spender<'_>, now: i64) -> Vec<(&BudgetSpec, Line)> {
        self.specs
            .iter()
            .filter_map(|b| {
                let who = match b.per {
                    BudgetScope::Agent => s.agent,
                    // No workflow: no run to count against (a served call without the header).
                    BudgetScope::Workflow if s.workflow.is_empty() => return None,
                    BudgetScope::Workflow => s.workflow,
                    BudgetScope::Tenant => s.tenant,
                    BudgetScope::Model if s.model.is_empty() => return None,
                    BudgetScope::Model => s.model,
                };
                if !TypePattern::new(&b.matches).matches(who) {
                    return None;
                }
                let (bucket, mut ttl) = b.period.bucket(now);
                if b.per == BudgetScope::Workflow && ttl == 0 {
                    // A run's total: one bucket per run (its workflow id), so kept only a while
                    // after its first charge — never expiring, they grew with every event.
                    ttl = WORKFLOW_TOTAL_KEEP_SECONDS;
                }
                // A run is its tenant's: a workflow id named by a caller of another tenant (the
                // served endpoint's header) is another bucket.
                let owner = match b.per {
                    // Escaped (a tenant may hold `/`): `a` + `x/r` is not `a/x` + `r`.
                    BudgetScope::Workflow => {
                        crate::store::ResourceKey::new(s.tenant, who).encoded()
                    }
                    _ => who.to_string(),
                };
                Some((
                    b,
                    Line {
                        key: format!(
                            "{}:budget:{{budgets}}:{}:{owner}:{bucket}",
                            self.prefix, b.name
                        ),
                        ttl,
                        max_calls: b.max_calls,
                        max_cost: b.max_cost,
                    },
                ))
            })
            .collect()
    }

    /// Reserves one call costing `cost` against every budget that applies to the spender, or none.
    pub async fn reserve(&self, s: &Spender<'_>, cost: f64) -> Result<BudgetCheck, StoreError> {
        let mut r = self.reserve_many(&[(s.clone(), cost)]).await?;
        Ok(r.pop().unwrap_or(BudgetCheck::Ok))
    }

    /// [`Budgets::reserve`] for a batch of calls, decided in order in one round trip.
    pub async fn reserve_many(
        &self,
        calls: &[(Spender<'_>, f64)],
    ) -> Result<Vec<BudgetCheck>, StoreError> {
        let now = self.clock.secs();
        let applies: Vec<Vec<(&BudgetSpec, Line)>> =
            calls.iter().map(|(s, _)| self.applicable(s, now)).collect();
        let requests: Vec<Request> = applies
            .iter()
            .zip(calls)
            .filter(|(apply, _)| !apply.is_empty())
            .map(|(apply, (_, cost))| Request {
                lines: apply.iter().map(|(_, l)| l.clone()).collect(),
                calls: 1,
                cost: *cost,
            })
            .collect();
        let mut reserved = self.store.reserve(&requests).await?.into_iter();
        let mut out = Vec::with_capacity(calls.len());
        for apply in &applies {
            if apply.is_empty() {
                out.push(BudgetCheck::Ok);
                continue;
            }
            let r = reserved
                .next()
                .ok_or_else(|| StoreError::Corrupt("budget reply too short".into()))?;
            for ((b, _), (calls, spent)) in apply.iter().zip(&r.spent) {
                export(b, *calls, *spent);
            }
            out.push(match r.refused_by {
                None => BudgetCheck::Ok,
                Some(i) => BudgetCheck::Exhausted {
                    budget: apply
                        .get(i)
                        .map(|(b, _)| b.name.clone())
                        .unwrap_or_default(),
                },
            });
        }
        Ok(out)
    }

    fn holds(&self) -> Holds {
        Holds {
            by_expiry: format!("{}:budget:{{budgets}}:holds", self.prefix),
            held: format!("{}:budget:{{budgets}}:held", self.prefix),
            settled: format!("{}:budget:{{budgets}}:settled", self.prefix),
        }
    }

    /// Holds `estimate` for one LLM call against every budget that applies (all or none), until
    /// [`Budgets::settle`] or, for a call that never settles (a crash), `hold_ms`. `Err(name)`
    /// names the budget that has no room.
    pub async fn hold(
        &self,
        s: &Spender<'_>,
        estimate: f64,
        hold_ms: u64,
    ) -> Result<Result<Hold, String>, StoreError> {
        self.hold_lines(s, estimate, hold_ms, true).await
    }

    /// Holds `estimate` like [`Budgets::hold`] but past every maximum: a call a person approved
    /// over its budget is still counted against it.
    pub async fn hold_over(
        &self,
        s: &Spender<'_>,
        estimate: f64,
        hold_ms: u64,
    ) -> Result<Hold, StoreError> {
        self.hold_lines(s, estimate, hold_ms, false)
            .await?
            .map_err(|b| StoreError::Corrupt(format!("budget {b} refused a hold without maximum")))
    }

    async fn hold_lines(
        &self,
        s: &Spender<'_>,
        estimate: f64,
        hold_ms: u64,
        bounded: bool,
    ) -> Result<Result<Hold, String>, StoreError> {
        let apply = self.applicable(s, self.clock.secs());
        let id = uuid::Uuid::new_v4().simple().to_string();
        let lines: Vec<Line> = apply.iter().map(|(_, l)| l.clone()).collect();
        let hold = |id, lines| Hold {
            id,
            lines,
            estimate,
        };
        if lines.is_empty() {
            return Ok(Ok(hold(id, lines)));
        }
        let request = Request {
            lines: lines
                .iter()
                .map(|l| Line {
                    max_calls: l.max_calls.filter(|_| bounded),
                    max_cost: l.max_cost.filter(|_| bounded),
                    ..l.clone()
                })
                .collect(),
            calls: 1,
            cost: estimate,
        };
        let r = self
            .store
            .hold(&self.holds(), &id, hold_ms, &request)
            .await?;
        for ((b, _), (calls, spent)) in apply.iter().zip(&r.spent) {
            export(b, *calls, *spent);
        }
        Ok(match r.refused_by {
            None => Ok(hold(id, lines)),
            Some(i) => Err(apply
                .get(i)
                .map(|(b, _)| b.name.clone())
                .unwrap_or_default()),
        })
    }

    /// Settles a hold at the actual cost; the rest of the estimate is given back.
    pub async fn settle(&self, hold: &Hold, actual: f64) -> Result<(), StoreError> {
        if hold.lines.is_empty() {
            return Ok(());
        }
        self.store
            .settle(&self.holds(), &hold.id, &hold.lines, actual)
            .await?;
        Ok(())
    }

    /// Gives back expired holds (any instance may; each hold once).
    pub async fn sweep(&self) -> Result<usize, StoreError> {
        self.store.sweep(&self.holds(), 100).await
    }

    /// What the budgets that apply to `spenders` have spent, read in one round trip: the view a
    /// batch's second checks use ([`Budgets::check_in`]).
    pub async fn view(&self, spenders: &[Spender<'_>]) -> Result<SpentView, StoreError> {
        let now = self.clock.secs();
        let mut keys: Vec<String> = spenders
            .iter()
            .flat_map(|s| self.applicable(s, now).into_iter().map(|(_, l)| l.key))
            .collect();
        keys.sort();
        keys.dedup();
        let spent = self.store.spent(&keys).await?;
        Ok(SpentView(keys.into_iter().zip(spent).collect()))
    }

    /// Each budget that applies to `s`, with what it has spent this period: (name, calls, cost,
    /// max_calls, max_cost). What the inbox shows as a proposal's cost so far.
    pub async fn standing(&self, s: &Spender<'_>) -> Result<Vec<Standing>, StoreError> {
        let apply = self.applicable(s, self.clock.secs());
        let keys: Vec<String> = apply.iter().map(|(_, l)| l.key.clone()).collect();
        let spent = self.store.spent(&keys).await?;
        Ok(apply
            .iter()
            .zip(spent)
            .map(|((b, l), (calls, cost))| Standing {
                budget: b.name.clone(),
                calls,
                cost,
                max_calls: l.max_calls,
                max_cost: l.max_cost,
            })
            .collect())
    }

    /// [`Budgets::check`] against a view read earlier in the batch (a bucket the view lacks, such
    /// as one of a period that began since, counts as unspent: the reservation is the guard).
    pub fn check_in(&self, view: &SpentView, s: &Spender<'_>) -> BudgetCheck {
        for (b, l) in self.applicable(s, self.clock.secs()) {
            let (calls, cost) = view.0.get(&l.key).copied().unwrap_or_default();
            let over_calls = b.max_calls.is_some_and(|m| calls > m);
            let over_cost = b.max_cost.is_some_and(|m| cost > m + 1e-9);
            if over_calls || over_cost {
                return BudgetCheck::Exhausted {
                    budget: b.name.clone(),
                };
            }
        }
        BudgetCheck::Ok
    }

    /// Whether any applicable budget is over its limit (the second check, before an action goes out).
    pub async fn check(&self, s: &Spender<'_>) -> Result<BudgetCheck, StoreError> {
        let apply = self.applicable(s, self.clock.secs());
        if apply.is_empty() {
            return Ok(BudgetCheck::Ok);
        }
        let keys: Vec<String> = apply.iter().map(|(_, l)| l.key.clone()).collect();
        let spent = self.store.spent(&keys).await?;
        for ((b, _), (calls, cost)) in apply.iter().zip(spent) {
            let over_calls = b.max_calls.is_some_and(|m| calls > m);
            let over_cost = b.max_cost.is_some_and(|m| cost > m + 1e-9);
            if over_calls || over_cost {
                return Ok(BudgetCheck::Exhausted {
                    budget: b.name.clone(),
                });
            }
        }
        Ok(BudgetCheck::Ok)
    }
}

/// Updates a budget's spent/remaining gauges.
fn export(b: &BudgetSpec, calls: f64, cost: f64) {
    METRICS
        .budget_spent
        .with_label_values(&[&b.name, "calls"])
        .set(calls);
    METRICS
        .budget_spent
        .with_label_values(&[&b.name, "cost"])
        .set(cost);
    if let Some(m) = b.max_calls {
        METRICS
            .budget_remaining
            .with_label_values(&[&b.name, "calls"])
            .set((m as f64 - calls).max(0.0));
    }
    if let Some(m) = b.max_cost {
        METRICS
            .budget_remaining
            .with_label_values(&[&b.name, "cost"])
            .set((m - cost).max(0.0));
    }
}

/// The contract every [`BudgetStore`] meets; run against the memory twin (unit test) and Redis
/// (integration test). `tag` keeps runs apart in a shared Redis.
#[doc(hidden)]
pub mod contract {
    use super::*;

    pub async fn run_all(store: &dyn BudgetStore, tag: &str) {
        let line = |name: &str, max_calls: Option<u64>, max_cost: Option<f64>| Line {
            key: format!("budget-contract:{{budgets}}:{tag}:{name}"),
            ttl: 3600,
            max_calls,
            max_cost,
        };
        let calls = line("calls", Some(2), None);
        let cost = line("cost", None, Some(1.0));
        let both = vec![calls.clone(), cost.clone()];
        let req = |cost_each: f64| Request {
            lines: both.clone(),
            calls: 1,
            cost: cost_each,
        };
        let r = store.reserve(&[req(0.4)]).await.expect("reserve");
        assert_eq!(r[0].refused_by, None);
        assert_eq!(r[0].spent, vec![(1.0, 0.4), (1.0, 0.4)]);
        // Over the cost limit: refused by line 1, and nothing reserved on line 0 either.
        let r = store.reserve(&[req(0.7)]).await.expect("reserve");
        assert_eq!(r[0].refused_by, Some(1));
        let spent = store
            .spent(&[calls.key.clone(), cost.key.clone()])
            .await
            .expect("spent");
        assert_eq!(spent[0].0, 1, "all or nothing");
        assert!((spent[1].1 - 0.4).abs() < 1e-9);
        // A batch is decided in order: the first fits, the second passes the calls limit.
        let r = store.reserve(&[req(0.1), req(0.1)]).await.expect("reserve");
        assert_eq!(r[0].refused_by, None);
        assert_eq!(r[0].spent[0].0, 2.0);
        assert_eq!(r[1].refused_by, Some(0));
        assert_eq!(r[1].spent[0].0, 2.0);
        let spent = store
            .spent(&[calls.key.clone(), cost.key.clone()])
            .await
            .expect("spent");
        assert_eq!(spent[0].0, 2);
        assert!((spent[1].1 - 0.5).abs() < 1e-9);
        // One bucket shared by the requests of a batch.
        let other = vec![line("other", Some(1), None)];
        let one = Request {
            lines: other,
            calls: 1,
            cost: 0.0,
        };
        let r = store.reserve(&[one.clone(), one]).await.expect("reserve");
        assert_eq!(
            r.iter().map(|r| r.refused_by).collect::<Vec<_>>(),
            [None, Some(0)]
        );
        assert_eq!(
            store
                .spent(&[format!("budget-contract:{{budgets}}:{tag}:never")])
                .await
                .expect("spent"),
            vec![(0, 0.0)]
        );
        // A hold settled twice (the first reply lost) moves its lines once.
        let holds = Holds {
            by_expiry: format!("budget-contract:{{budgets}}:{tag}:holds"),
            held: format!("budget-contract:{{budgets}}:{tag}:held"),
            settled: format!("budget-contract:{{budgets}}:{tag}:settled"),
        };
        let held = vec![line("held", None, Some(10.0))];
        let r = store
            .hold(
                &holds,
                "h1",
                60_000,
                &Request {
                    lines: held.clone(),
                    calls: 1,
                    cost: 2.0,
                },
            )
            .await
            .expect("hold");
        assert_eq!(r.refused_by, None);
        for _ in 0..2 {
            store
                .settle(&holds, "h1", &held, 3.0)
                .await
                .expect("settle");
        }
        let spent = store.spent(&[held[0].key.clone()]).await.expect("spent");
        assert!((spent[0].1 - 3.0).abs() < 1e-9, "{spent:?}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn period_buckets() {
        let t = chrono::DateTime::parse_from_rfc3339("2026-11-22T13:05:00Z")
            .unwrap()
            .timestamp();
        assert_eq!(Period::Hour.bucket(t).0, "2026112213");
        assert_eq!(Period::Day.bucket(t).0, "20261122");
        assert_eq!(Period::Month.bucket(t).0, "202611");
        assert_eq!(Period::Total.bucket(t), ("total".to_string(), 0));
    }

    #[test]
    fn a_runs_total_expires_and_an_agents_does_not() {
        let spec = |per| BudgetSpec {
            name: "b".into(),
            per,
            matches: "*".into(),
            period: Period::Total,
            max_calls: Some(10),
            max_cost: None,
        };
        let b = Budgets::new(
            Arc::new(MemoryBudgetStore::default()),
            "t",
            vec![spec(BudgetScope::Workflow), spec(BudgetScope::Agent)],
        );
        let s = Spender {
            agent: "a",
            workflow: "wf-1",
            tenant: "t",
            model: "",
        };
        let ttls: Vec<u64> = b.applicable(&s, 0).iter().map(|(_, l)| l.ttl).collect();
        assert_eq!(ttls, [WORKFLOW_TOTAL_KEEP_SECONDS, 0]);
        // A run is its tenant's: another tenant naming the same workflow id counts elsewhere;
        // no workflow, no run budget.
        let other = Spender {
            tenant: "u",
            ..s.clone()
        };
        let key = |s: &Spender<'_>| b.applicable(s, 0)[0].1.key.clone();
        assert_ne!(key(&s), key(&other));
        let slash = Spender {
            tenant: "t/x",
            workflow: "1",
            ..s.clone()
        };
        let other_slash = Spender {
            tenant: "t",
            workflow: "x/1",
            ..s.clone()
        };
        assert_ne!(key(&slash), key(&other_slash));
        let none = Spender {
            workflow: "",
            ..s.clone()
        };
        assert_eq!(b.applicable(&none, 0).len(), 1, "only the agent's budget");
    }

    #[tokio::test]
    async fn memory_store_meets_the_contract() {
        contract::run_all(&MemoryBudgetStore::default(), "mem").await;
    }

    #[tokio::test]
    async fn concurrent_reservations_never_overspend() {
        let store: Arc<dyn BudgetStore> = Arc::new(MemoryBudgetStore::default());
        let b = Arc::new(Budgets::new(
            store,
            "t",
            vec![BudgetSpec {
                name: "ten".into(),
                per: BudgetScope::Agent,
                matches: "*".into(),
                period: Period::Total,
                max_calls: Some(10),
                max_cost: None,
            }],
        ));
        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let b = b.clone();
                tokio::spawn(async move {
                    let s = Spender {
                        agent: "a",
                        workflow: "w",
                        tenant: "t",
                        model: "",
                    };
                    b.reserve(&s, 0.0).await
                })
            })
            .collect();
        let mut ok = 0;
        for t in tasks {
            if t.await.expect("join").expect("reserve") == BudgetCheck::Ok {
                ok += 1;
            }
        }
        assert_eq!(ok, 10);
    }
}
