//! Budgets: calls and currency per agent, workflow or tenant per period, reserved before every agent
//! call and checked again before an action goes out.
//!
//! A reservation is atomic across every budget that applies ([`BudgetStore::reserve`]: all or
//! none), so concurrent calls in any number of instances never overspend. Redis keys carry the
//! `{budgets}` hash tag, so one script touches them all on one Redis Cluster slot.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use redis::Script;
use serde::{Deserialize, Serialize};

use crate::event::now_secs;
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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    Hour,
    Day,
    Month,
    Total,
}

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
    /// Adds `calls` and `cost` to every line, or to none when one would pass its limit. Keyed by
    /// `hold` (e.g. the task id): a second reservation with the same hold within `hold_ttl` seconds
    /// changes nothing and succeeds (a redelivery pays nothing twice).
    fn reserve<'a>(
        &'a self,
        hold: &'a str,
        hold_ttl: u64,
        lines: &'a [Line],
        calls: u64,
        cost: f64,
    ) -> BoxFuture<'a, Result<Reserved, StoreError>>;

    /// Calls and cost spent so far on each key.
    fn spent<'a>(
        &'a self,
        keys: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<(u64, f64)>, StoreError>>;
}

const RESERVE: &str = r#"
-- KEYS[1] = hold marker, KEYS[2..] = budget hashes
-- ARGV[1] = marker ttl, ARGV[2] = calls, ARGV[3] = cost, then per budget: ttl, max_calls, max_cost (-1 = none)
-- Reply: {status, index, calls1, cost1, ...}; status 1 ok, 0 refused by budget <index>,
-- -1 budget <index> holds a value that is not a number.
local function values(ok, idx)
  local out = {ok, idx}
  for i = 2, #KEYS do
    out[#out + 1] = redis.call('HGET', KEYS[i], 'calls') or '0'
    out[#out + 1] = redis.call('HGET', KEYS[i], 'cost') or '0'
  end
  return out
end
if redis.call('EXISTS', KEYS[1]) == 1 then return values(1, 0) end
for i = 2, #KEYS do
  local b = 4 + (i - 2) * 3
  local calls = tonumber(redis.call('HGET', KEYS[i], 'calls') or '0')
  local cost = tonumber(redis.call('HGET', KEYS[i], 'cost') or '0')
  if calls == nil or cost == nil then return {-1, i - 1} end
  local maxc, maxm = tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2])
  if maxc >= 0 and calls + tonumber(ARGV[2]) > maxc then return values(0, i - 1) end
  if maxm >= 0 and cost + tonumber(ARGV[3]) > maxm + 1e-9 then return values(0, i - 1) end
end
for i = 2, #KEYS do
  local b = 4 + (i - 2) * 3
  redis.call('HINCRBY', KEYS[i], 'calls', ARGV[2])
  redis.call('HINCRBYFLOAT', KEYS[i], 'cost', ARGV[3])
  if tonumber(ARGV[b]) > 0 then redis.call('EXPIRE', KEYS[i], ARGV[b]) end
end
redis.call('SET', KEYS[1], '1', 'EX', ARGV[1])
return values(1, 0)
"#;

/// Budget spend in Redis: one hash per bucket (`calls`, `cost`), one marker per hold.
pub struct RedisBudgetStore {
    conn: RedisConn,
    prefix: String,
    reserve: Script,
}

impl RedisBudgetStore {
    pub fn new(conn: RedisConn, prefix: &str) -> Self {
        RedisBudgetStore {
            conn,
            prefix: prefix.into(),
            reserve: Script::new(RESERVE),
        }
    }
}

impl BudgetStore for RedisBudgetStore {
    fn reserve<'a>(
        &'a self,
        hold: &'a str,
        hold_ttl: u64,
        lines: &'a [Line],
        calls: u64,
        cost: f64,
    ) -> BoxFuture<'a, Result<Reserved, StoreError>> {
        Box::pin(async move {
            let mut inv = self.reserve.prepare_invoke();
            inv.key(format!("{}:budget:{{budgets}}:task:{hold}", self.prefix))
                .arg(hold_ttl.max(1))
                .arg(calls)
                .arg(cost);
            for l in lines {
                inv.key(&l.key)
                    .arg(l.ttl)
                    .arg(l.max_calls.map(|m| m as i64).unwrap_or(-1))
                    .arg(l.max_cost.unwrap_or(-1.0));
            }
            let mut c = self.conn.get().await?;
            // One round trip: the script answers with every budget's spend after the reservation.
            let reply: Vec<redis::Value> = inv.invoke_async(&mut c).await?;
            let num = |i: usize| reply_number(reply.get(i));
            let (status, idx) = (num(0) as i64, num(1) as i64);
            let index = (idx - 1).max(0) as usize;
            if status < 0 {
                return Err(StoreError::Corrupt(format!(
                    "budget bucket {} holds a value that is not a number",
                    lines.get(index).map(|l| l.key.as_str()).unwrap_or("?")
                )));
            }
            Ok(Reserved {
                refused_by: (status == 0).then_some(index),
                spent: (0..lines.len())
                    .map(|j| (num(2 + 2 * j), num(3 + 2 * j)))
                    .collect(),
            })
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
}

/// Spend by bucket, and the holds seen.
type MemoryBudgets = (
    HashMap<String, (u64, f64)>,
    std::collections::HashSet<String>,
);

/// In-memory twin of [`RedisBudgetStore`] for unit tests (no TTLs).
#[derive(Default)]
pub struct MemoryBudgetStore {
    state: Mutex<MemoryBudgets>,
}

impl BudgetStore for MemoryBudgetStore {
    fn reserve<'a>(
        &'a self,
        hold: &'a str,
        _hold_ttl: u64,
        lines: &'a [Line],
        calls: u64,
        cost: f64,
    ) -> BoxFuture<'a, Result<Reserved, StoreError>> {
        Box::pin(async move {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let (buckets, holds) = &mut *st;
            let spent_now = |b: &HashMap<String, (u64, f64)>| {
                lines
                    .iter()
                    .map(|l| {
                        let (n, c) = b.get(&l.key).copied().unwrap_or_default();
                        (n as f64, c)
                    })
                    .collect::<Vec<_>>()
            };
            if holds.contains(hold) {
                return Ok(Reserved {
                    refused_by: None,
                    spent: spent_now(buckets),
                });
            }
            for (i, l) in lines.iter().enumerate() {
                let (n, c) = buckets.get(&l.key).copied().unwrap_or_default();
                let over_calls = l.max_calls.is_some_and(|m| n + calls > m);
                let over_cost = l.max_cost.is_some_and(|m| c + cost > m + 1e-9);
                if over_calls || over_cost {
                    return Ok(Reserved {
                        refused_by: Some(i),
                        spent: spent_now(buckets),
                    });
                }
            }
            for l in lines {
                let b = buckets.entry(l.key.clone()).or_default();
                b.0 += calls;
                b.1 += cost;
            }
            holds.insert(hold.to_string());
            Ok(Reserved {
                refused_by: None,
                spent: spent_now(buckets),
            })
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
                .map(|k| st.0.get(k).copied().unwrap_or_default())
                .collect())
        })
    }
}

/// How long a reservation's hold is remembered (a redelivered task within it pays nothing twice).
const HOLD_TTL: u64 = 7 * 86400;

/// The budgets of the config over a store.
pub struct Budgets {
    store: Arc<dyn BudgetStore>,
    prefix: String,
    specs: Vec<BudgetSpec>,
}

impl Budgets {
    pub fn new(store: Arc<dyn BudgetStore>, prefix: &str, specs: Vec<BudgetSpec>) -> Self {
        Budgets {
            store,
            prefix: prefix.into(),
            specs,
        }
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
                    BudgetScope::Workflow => s.workflow,
                    BudgetScope::Tenant => s.tenant,
                };
                if !TypePattern::new(&b.matches).matches(who) {
                    return None;
                }
                let (bucket, ttl) = b.period.bucket(now);
                Some((
                    b,
                    Line {
                        key: format!(
                            "{}:budget:{{budgets}}:{}:{who}:{bucket}",
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

    /// Reserves one call costing `cost` for `task_id` against every applicable budget, or none. A
    /// second reservation for the same task is a no-op (redelivery pays nothing twice).
    pub async fn reserve(
        &self,
        task_id: &str,
        s: &Spender<'_>,
        cost: f64,
    ) -> Result<BudgetCheck, StoreError> {
        let apply = self.applicable(s, now_secs());
        if apply.is_empty() {
            return Ok(BudgetCheck::Ok);
        }
        let lines: Vec<Line> = apply.iter().map(|(_, l)| l.clone()).collect();
        let r = self
            .store
            .reserve(task_id, HOLD_TTL, &lines, 1, cost)
            .await?;
        for ((b, _), (calls, spent)) in apply.iter().zip(&r.spent) {
            export(b, *calls, *spent);
        }
        Ok(match r.refused_by {
            None => BudgetCheck::Ok,
            Some(i) => BudgetCheck::Exhausted {
                budget: apply
                    .get(i)
                    .map(|(b, _)| b.name.clone())
                    .unwrap_or_default(),
            },
        })
    }

    /// Whether any applicable budget is over its limit (the second check, before an action goes out).
    pub async fn check(&self, s: &Spender<'_>) -> Result<BudgetCheck, StoreError> {
        let apply = self.applicable(s, now_secs());
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
        let both = [calls.clone(), cost.clone()];
        let r = store
            .reserve(&format!("{tag}-a"), 60, &both, 1, 0.4)
            .await
            .expect("reserve");
        assert_eq!(r.refused_by, None);
        assert_eq!(r.spent, vec![(1.0, 0.4), (1.0, 0.4)]);
        // The same hold again pays nothing.
        let r = store
            .reserve(&format!("{tag}-a"), 60, &both, 1, 0.4)
            .await
            .expect("reserve");
        assert_eq!(r.refused_by, None);
        assert_eq!(r.spent[1], (1.0, 0.4));
        // Over the cost limit: refused by line 1, and nothing reserved on line 0 either.
        let r = store
            .reserve(&format!("{tag}-b"), 60, &both, 1, 0.7)
            .await
            .expect("reserve");
        assert_eq!(r.refused_by, Some(1));
        let spent = store
            .spent(&[calls.key.clone(), cost.key.clone()])
            .await
            .expect("spent");
        assert_eq!(spent[0].0, 1, "all or nothing");
        assert!((spent[1].1 - 0.4).abs() < 1e-9);
        // Over the calls limit.
        store
            .reserve(&format!("{tag}-c"), 60, &both, 1, 0.1)
            .await
            .expect("reserve");
        let r = store
            .reserve(&format!("{tag}-d"), 60, &both, 1, 0.1)
            .await
            .expect("reserve");
        assert_eq!(r.refused_by, Some(0));
        assert_eq!(
            store
                .spent(&[format!("budget-contract:{{budgets}}:{tag}:never")])
                .await
                .expect("spent"),
            vec![(0, 0.0)]
        );
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
            .map(|i| {
                let b = b.clone();
                tokio::spawn(async move {
                    let s = Spender {
                        agent: "a",
                        workflow: "w",
                        tenant: "t",
                    };
                    b.reserve(&format!("task-{i}"), &s, 0.0).await
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
