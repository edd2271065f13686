//! Governance on every action: access policy, budgets, and the approval gate.
//!
//! Access and approval rules are pure; budgets live in Redis (one Lua script reserves against every
//! matching budget at once, or against none).

use std::time::{SystemTime, UNIX_EPOCH};

use redis::Script;
use serde::{Deserialize, Serialize};

use crate::agents::Impact;
use crate::context::redis::RedisConn;
use crate::context::StoreError;
use crate::route::TypePattern;

fn any_match(patterns: &[String], value: &str) -> bool {
    patterns.is_empty() || patterns.iter().any(|p| TypePattern::new(p).matches(value))
}

/// One access rule: these agents may cause these actions on these resources of these tenants.
/// Empty lists mean "any"; entries are `*` patterns.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AccessRule {
    #[serde(default)]
    pub tenants: Vec<String>,
    #[serde(default)]
    pub agents: Vec<String>,
    #[serde(default)]
    pub actions: Vec<String>,
    #[serde(default)]
    pub resources: Vec<String>,
}

/// What needs a person: an action matching `actions` with at least `min_impact` or `min_cost`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalRule {
    #[serde(default)]
    pub actions: Vec<String>,
    #[serde(default)]
    pub min_impact: Option<Impact>,
    #[serde(default)]
    pub min_cost: Option<f64>,
}

/// What happens when nobody decides in time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnTimeout {
    #[default]
    Reject,
    /// Re-announce the request as `escalated` once, with a second timeout, then reject.
    Escalate,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalsConfig {
    /// Bearer token the approvals API requires. `SWITCHYARD_APPROVAL_TOKEN` overrides. Without a token
    /// the API refuses every request.
    #[serde(default)]
    pub token: Option<String>,
    /// A request not decided within this time is expired (rejected or escalated).
    #[serde(default = "default_approval_timeout")]
    pub timeout_seconds: u64,
    #[serde(default)]
    pub on_timeout: OnTimeout,
    #[serde(default)]
    pub rules: Vec<ApprovalRule>,
}

fn default_approval_timeout() -> u64 {
    900
}

impl Default for ApprovalsConfig {
    fn default() -> Self {
        ApprovalsConfig {
            token: None,
            timeout_seconds: default_approval_timeout(),
            on_timeout: OnTimeout::Reject,
            rules: Vec::new(),
        }
    }
}

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

/// The `governance:` config section.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GovernanceConfig {
    /// Access rules; when empty every agent may cause every declared action.
    #[serde(default)]
    pub access: Vec<AccessRule>,
    #[serde(default)]
    pub budgets: Vec<BudgetSpec>,
    #[serde(default)]
    pub approvals: ApprovalsConfig,
}

impl GovernanceConfig {
    /// Every problem, as (item, message).
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut p = Vec::new();
        for (i, b) in self.budgets.iter().enumerate() {
            let item = format!("governance.budgets[{i}] ({})", b.name);
            if b.max_calls.is_none() && b.max_cost.is_none() {
                p.push((item.clone(), "needs max_calls or max_cost".into()));
            }
            if self.budgets[..i].iter().any(|o| o.name == b.name) {
                p.push((item, "name is used by an earlier budget".into()));
            }
        }
        if self.approvals.timeout_seconds == 0 {
            p.push((
                "governance.approvals.timeout_seconds".into(),
                "must be at least 1".into(),
            ));
        }
        p
    }

    /// Whether `agent` may cause `action` on `resource` of `tenant`.
    pub fn allows(&self, tenant: &str, agent: &str, action: &str, resource: &str) -> bool {
        self.access.is_empty()
            || self.access.iter().any(|r| {
                any_match(&r.tenants, tenant)
                    && any_match(&r.agents, agent)
                    && any_match(&r.actions, action)
                    && any_match(&r.resources, resource)
            })
    }

    /// Whether an action needs a person, and the rule that says so.
    pub fn needs_approval(&self, action: &str, impact: Impact, cost: Option<f64>) -> Option<usize> {
        self.approvals.rules.iter().position(|r| {
            any_match(&r.actions, action)
                && r.min_impact.is_none_or(|m| impact >= m)
                && r.min_cost.is_none_or(|m| cost.unwrap_or(0.0) >= m)
        })
    }
}

/// Who a budget check is for.
#[derive(Debug, Clone)]
pub struct Spender<'a> {
    pub agent: &'a str,
    pub workflow: &'a str,
    pub tenant: &'a str,
}

const RESERVE: &str = r#"
-- KEYS[1] = reservation marker (task id), KEYS[2..] = budget hashes
-- ARGV[1] = marker ttl, ARGV[2] = calls, ARGV[3] = cost, then per budget: ttl, max_calls, max_cost (-1 = none)
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

/// Result of a budget operation.
#[derive(Debug, Clone, PartialEq)]
pub enum BudgetCheck {
    Ok,
    /// This budget would be (or is) exceeded.
    Exhausted {
        budget: String,
    },
}

/// Budgets in Redis. Every key carries the `{budgets}` hash tag, so a reservation across several budgets
/// is one atomic script on one Redis Cluster slot.
pub struct Budgets {
    conn: RedisConn,
    prefix: String,
    specs: Vec<BudgetSpec>,
    reserve: Script,
}

pub fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Budgets {
    pub fn new(conn: RedisConn, prefix: &str, specs: Vec<BudgetSpec>) -> Self {
        Budgets {
            conn,
            prefix: prefix.into(),
            specs,
            reserve: Script::new(RESERVE),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.specs.is_empty()
    }

    /// The budgets that apply to a spender, with their Redis keys and bucket lifetimes.
    fn applicable(&self, s: &Spender<'_>, now: i64) -> Vec<(&BudgetSpec, String, u64)> {
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
                    format!(
                        "{}:budget:{{budgets}}:{}:{who}:{bucket}",
                        self.prefix, b.name
                    ),
                    ttl,
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
        let now = now_secs();
        let apply = self.applicable(s, now);
        if apply.is_empty() {
            return Ok(BudgetCheck::Ok);
        }
        let mut inv = self.reserve.prepare_invoke();
        inv.key(format!("{}:budget:{{budgets}}:task:{task_id}", self.prefix))
            .arg(7 * 86400)
            .arg(1)
            .arg(cost);
        for (b, key, ttl) in &apply {
            inv.key(key)
                .arg(*ttl)
                .arg(b.max_calls.map(|m| m as i64).unwrap_or(-1))
                .arg(b.max_cost.unwrap_or(-1.0));
        }
        let mut c = self.conn.get().await?;
        // One round trip: the script answers with every budget's spend after the reservation.
        let reply: Vec<redis::Value> = inv
            .invoke_async(&mut c)
            .await
            .map_err(|e| StoreError::Redis(e.to_string()))?;
        let num = |i: usize| -> f64 {
            match reply.get(i) {
                Some(redis::Value::Int(n)) => *n as f64,
                Some(redis::Value::BulkString(b)) => std::str::from_utf8(b)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0.0),
                Some(redis::Value::SimpleString(s)) => s.parse().unwrap_or(0.0),
                _ => 0.0,
            }
        };
        let (ok, idx) = (num(0) as i64, num(1) as i64);
        for (j, (b, _, _)) in apply.iter().enumerate() {
            export(b, num(2 + 2 * j), num(3 + 2 * j));
        }
        if ok == 1 {
            Ok(BudgetCheck::Ok)
        } else {
            let name = apply
                .get((idx - 1).max(0) as usize)
                .map(|(b, _, _)| b.name.clone())
                .unwrap_or_default();
            Ok(BudgetCheck::Exhausted { budget: name })
        }
    }

    /// Whether any applicable budget is over its limit (the second check, before an action goes out).
    pub async fn check(&self, s: &Spender<'_>) -> Result<BudgetCheck, StoreError> {
        let apply = self.applicable(s, now_secs());
        if apply.is_empty() {
            return Ok(BudgetCheck::Ok);
        }
        let mut c = self.conn.get().await?;
        let mut pipe = redis::pipe();
        for (_, key, _) in &apply {
            pipe.cmd("HMGET").arg(key).arg("calls").arg("cost");
        }
        let spent: Vec<(Option<u64>, Option<f64>)> = pipe
            .query_async(&mut c)
            .await
            .map_err(|e| StoreError::Redis(e.to_string()))?;
        for ((b, _, _), (calls, cost)) in apply.iter().zip(spent) {
            let over_calls = b.max_calls.is_some_and(|m| calls.unwrap_or(0) > m);
            let over_cost = b.max_cost.is_some_and(|m| cost.unwrap_or(0.0) > m + 1e-9);
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
    use crate::telemetry::METRICS;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_rules_default_allow_and_patterns() {
        let mut g = GovernanceConfig::default();
        assert!(g.allows("t", "a", "rollback", "svc"));
        g.access.push(AccessRule {
            agents: vec!["sla-*".into()],
            actions: vec!["rollback".into(), "page".into()],
            ..Default::default()
        });
        g.access.push(AccessRule {
            tenants: vec!["acme".into()],
            agents: vec!["cost-guard".into()],
            actions: vec!["scale_*".into()],
            resources: vec!["web-*".into()],
        });
        assert!(g.allows("x", "sla-responder", "rollback", "svc"));
        assert!(!g.allows("x", "sla-responder", "scale_down", "svc"));
        assert!(g.allows("acme", "cost-guard", "scale_down", "web-1"));
        assert!(!g.allows("acme", "cost-guard", "scale_down", "db-1"));
        assert!(!g.allows("other", "cost-guard", "scale_down", "web-1"));
    }

    #[test]
    fn approval_rules() {
        let mut g = GovernanceConfig::default();
        g.approvals.rules.push(ApprovalRule {
            actions: vec!["rollback".into()],
            min_impact: Some(Impact::High),
            min_cost: None,
        });
        g.approvals.rules.push(ApprovalRule {
            actions: vec![],
            min_impact: None,
            min_cost: Some(100.0),
        });
        assert_eq!(g.needs_approval("rollback", Impact::High, None), Some(0));
        assert_eq!(g.needs_approval("rollback", Impact::Medium, None), None);
        assert_eq!(g.needs_approval("page", Impact::Low, Some(150.0)), Some(1));
        assert_eq!(g.needs_approval("page", Impact::Low, Some(10.0)), None);
    }

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
}
