//! Circuit breakers shared by every instance: an agent whose failure rate over a sliding window
//! passes its threshold is skipped (its `fallback` runs instead) for `open_seconds`, then one
//! task probes it (half-open): a success closes the circuit, a failure opens it again.
//!
//! State per agent in Redis, one hash slot (`<prefix>:cb:{<agent>}:…`): 10-second slots of calls
//! and failures, the open state with its end, and the probe's claim. Two scripts, each one round
//! trip: [`Breakers::admit`] before a call, [`Breakers::record`] after it. Redis's clock decides.

use redis::Script;
use serde::{Deserialize, Serialize};

use crate::store::{RedisConn, StoreError};
use crate::telemetry::METRICS;

/// `circuit:` of an agent.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CircuitSpec {
    /// Failed (or timed out) calls over calls in the window at which the circuit opens.
    #[serde(default = "default_rate")]
    pub failure_rate: f64,
    /// Calls in the window before the rate counts.
    #[serde(default = "default_min_calls")]
    pub min_calls: u64,
    #[serde(default = "default_window")]
    pub window_seconds: u64,
    /// How long an open circuit skips the agent before a probe.
    #[serde(default = "default_open")]
    pub open_seconds: u64,
}

fn default_rate() -> f64 {
    0.5
}
fn default_min_calls() -> u64 {
    10
}
fn default_window() -> u64 {
    60
}
fn default_open() -> u64 {
    30
}

impl CircuitSpec {
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if !(self.failure_rate > 0.0 && self.failure_rate <= 1.0) {
            p.push("circuit.failure_rate must be in (0, 1]".into());
        }
        if self.min_calls == 0 || self.window_seconds < 10 || self.open_seconds == 0 {
            p.push(
                "circuit: min_calls ≥ 1, window_seconds ≥ 10 and open_seconds ≥ 1 are needed"
                    .into(),
            );
        }
        p
    }
}

/// What the breaker says about a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Closed: call.
    Call,
    /// Half-open and this call is the probe.
    Probe,
    /// Open: skip the agent.
    Open,
}

const SLOT_SECONDS: u64 = 10;

/// KEYS[1] state, KEYS[2] probe; ARGV[1] open ms. 0 call, 1 probe, 2 open.
const ADMIT: &str = r"
local till = redis.call('HGET', KEYS[1], 'until')
if not till then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if now < tonumber(till) then return 2 end
if redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[1]) then return 1 end
return 2
";

/// KEYS[1] state, KEYS[2] probe, KEYS[3..] window slots (current first); ARGV ok, probe,
/// min calls, rate, open ms, slot ttl. Returns 1 when the circuit is (now) open, 2 when this
/// call closed it, 0 closed.
const RECORD: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ok = ARGV[1] == '1'
if ARGV[2] == '1' then
  redis.call('DEL', KEYS[2])
  if ok then
    redis.call('DEL', KEYS[1])
    for i = 3, #KEYS do redis.call('DEL', KEYS[i]) end
    return 2
  end
  redis.call('HSET', KEYS[1], 'until', now + tonumber(ARGV[5]))
  return 1
end
redis.call('HINCRBY', KEYS[3], 'calls', 1)
if not ok then redis.call('HINCRBY', KEYS[3], 'failures', 1) end
redis.call('EXPIRE', KEYS[3], ARGV[6])
if redis.call('EXISTS', KEYS[1]) == 1 then return 1 end
local calls, fails = 0, 0
for i = 3, #KEYS do
  local v = redis.call('HMGET', KEYS[i], 'calls', 'failures')
  calls = calls + tonumber(v[1] or '0')
  fails = fails + tonumber(v[2] or '0')
end
if calls >= tonumber(ARGV[3]) and fails / calls >= tonumber(ARGV[4]) then
  redis.call('HSET', KEYS[1], 'until', now + tonumber(ARGV[5]))
  return 1
end
return 0
";

pub struct Breakers {
    conn: RedisConn,
    prefix: String,
    admit: Script,
    record: Script,
}

impl Breakers {
    pub fn new(conn: RedisConn, prefix: &str) -> Self {
        Breakers {
            conn,
            prefix: prefix.to_string(),
            admit: Script::new(ADMIT),
            record: Script::new(RECORD),
        }
    }

    fn key(&self, agent: &str, what: &str) -> String {
        format!("{}:cb:{{{agent}}}:{what}", self.prefix)
    }

    pub async fn admit(&self, agent: &str, c: &CircuitSpec) -> Result<Admit, StoreError> {
        let mut conn = self.conn.get().await?;
        let r: i64 = self
            .admit
            .key(self.key(agent, "state"))
            .key(self.key(agent, "probe"))
            .arg(c.open_seconds * 1000)
            .invoke_async(&mut conn)
            .await?;
        Ok(match r {
            0 => Admit::Call,
            1 => Admit::Probe,
            _ => Admit::Open,
        })
    }

    /// Counts a call's result; opens the circuit when the window's failure rate passes the
    /// threshold, or (for a probe) closes or reopens it.
    pub async fn record(
        &self,
        agent: &str,
        c: &CircuitSpec,
        ok: bool,
        probe: bool,
    ) -> Result<(), StoreError> {
        let slot = crate::event::now_secs() as u64 / SLOT_SECONDS;
        let slots = c.window_seconds.div_ceil(SLOT_SECONDS);
        let mut inv = self.record.prepare_invoke();
        inv.key(self.key(agent, "state"))
            .key(self.key(agent, "probe"));
        for s in 0..slots {
            inv.key(self.key(agent, &format!("slot:{}", slot.saturating_sub(s))));
        }
        inv.arg(u8::from(ok))
            .arg(u8::from(probe))
            .arg(c.min_calls)
            .arg(c.failure_rate)
            .arg(c.open_seconds * 1000)
            .arg(c.window_seconds + SLOT_SECONDS);
        let mut conn = self.conn.get().await?;
        let r: i64 = inv.invoke_async(&mut conn).await?;
        let gauge = METRICS.agent_circuit_open.with_label_values(&[agent]);
        match r {
            1 => {
                if gauge.get() == 0 {
                    tracing::warn!(agent, seconds = c.open_seconds, "Circuit opened: the agent is skipped (its fallback runs) until a probe succeeds.");
                }
                gauge.set(1);
            }
            2 => {
                tracing::info!(agent, "Circuit closed: the probe succeeded.");
                gauge.set(0);
            }
            _ => {}
        }
        Ok(())
    }
}
