//! Agent health across every instance: the agent stage counts task outcomes per agent and adds them
//! to Redis counters (`<prefix>:agentstats:{agents}:<agent>:<hour>`, kept two days);
//! `switchyard status` reads them.

use std::collections::{BTreeMap, HashMap};

use crate::event::now_secs;
use crate::store::{RedisConn, StoreError};

fn stats_key(prefix: &str, agent: &str, hour: i64) -> String {
    format!("{prefix}:agentstats:{{agents}}:{agent}:{hour}")
}

/// Counts task outcomes (`succeeded`, `failed`, `timed_out`, `refused`) per agent in memory and adds
/// them to Redis about once a second (one pipeline), for `switchyard status`: health counters stay
/// off the per-task path.
pub struct AgentStats {
    conn: RedisConn,
    prefix: String,
    pending: std::sync::Mutex<HashMap<(String, String), u64>>,
}

impl AgentStats {
    pub fn new(conn: RedisConn, prefix: &str) -> Self {
        AgentStats {
            conn,
            prefix: prefix.into(),
            pending: Default::default(),
        }
    }

    pub fn count(&self, agent: &str, status: &str) {
        *self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((agent.to_string(), status.to_string()))
            .or_default() += 1;
    }

    /// Writes the counts gathered so far; on failure they are kept for the next flush.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let batch = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
        if batch.is_empty() {
            return Ok(());
        }
        let now = now_secs();
        let mut pipe = redis::pipe();
        for ((agent, status), n) in &batch {
            let key = stats_key(&self.prefix, agent, now / 3600);
            pipe.hincr(&key, status, *n)
                .ignore()
                .hset(&key, "last", now)
                .ignore()
                .expire(&key, 2 * 86400)
                .ignore();
        }
        let written = async {
            let mut c = self.conn.get().await?;
            Ok(pipe.query_async::<()>(&mut c).await?)
        }
        .await;
        if written.is_err() {
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            for (k, n) in batch {
                *pending.entry(k).or_default() += n;
            }
        }
        written
    }

    /// Flushes every second until `stop`, then once more.
    pub async fn run(self: std::sync::Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        loop {
            let stopped = tokio::select! {
                _ = stop.cancelled() => true,
                _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => false,
            };
            if let Err(e) = self.flush().await {
                tracing::debug!(error = %e, "Recording agent health failed; kept for the next try.");
            }
            if stopped {
                return;
            }
        }
    }
}

/// An agent's outcomes over the current and the previous hour.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct AgentHealth {
    pub agent: String,
    pub succeeded: u64,
    pub failed: u64,
    pub timed_out: u64,
    pub refused: u64,
    pub last_seen: Option<i64>,
}

impl AgentHealth {
    pub fn calls(&self) -> u64 {
        self.succeeded + self.failed + self.timed_out
    }

    /// `ok`, `failing` (≥ 20% of calls failed or timed out), `refused` (budget) or `idle`.
    pub fn verdict(&self) -> &'static str {
        let bad = self.failed + self.timed_out;
        if self.calls() == 0 {
            if self.refused > 0 {
                "refused"
            } else {
                "idle"
            }
        } else if bad * 5 >= self.calls() {
            "failing"
        } else {
            "ok"
        }
    }
}

pub async fn agent_health(
    conn: &RedisConn,
    prefix: &str,
    agents: &[String],
) -> Result<Vec<AgentHealth>, StoreError> {
    let hour = now_secs() / 3600;
    let mut c = conn.get().await?;
    let mut out = Vec::new();
    for a in agents {
        let mut h = AgentHealth {
            agent: a.clone(),
            ..Default::default()
        };
        for hr in [hour - 1, hour] {
            let m: BTreeMap<String, i64> = redis::cmd("HGETALL")
                .arg(stats_key(prefix, a, hr))
                .query_async(&mut c)
                .await?;
            let get = |k: &str| m.get(k).copied().unwrap_or(0).max(0) as u64;
            h.succeeded += get("succeeded");
            h.failed += get("failed");
            h.timed_out += get("timed_out");
            h.refused += get("refused");
            if let Some(l) = m.get("last") {
                h.last_seen = Some(h.last_seen.unwrap_or(0).max(*l));
            }
        }
        out.push(h);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts() {
        let h = |s, f, t, r| AgentHealth {
            agent: "a".into(),
            succeeded: s,
            failed: f,
            timed_out: t,
            refused: r,
            last_seen: None,
        };
        assert_eq!(h(0, 0, 0, 0).verdict(), "idle");
        assert_eq!(h(0, 0, 0, 3).verdict(), "refused");
        assert_eq!(h(9, 1, 0, 0).verdict(), "ok");
        assert_eq!(h(8, 1, 1, 0).verdict(), "failing");
    }
}
