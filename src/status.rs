//! `switchyard status`: per-stage consumer lag, pending approvals and per-agent health, for a person.
//!
//! Agent health comes from counters the agent stage keeps in Redis
//! (`<prefix>:agentstats:{agents}:<agent>:<hour>`, kept two days), so it covers every instance.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use crate::config::Loaded;
use crate::context::redis::RedisConn;
use crate::context::StoreError;
use crate::governance::now_secs;

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
            pipe.query_async::<()>(&mut c)
                .await
                .map_err(|e| StoreError::Redis(e.to_string()))
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
                .await
                .map_err(|e| StoreError::Redis(e.to_string()))?;
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

/// Approximate lag of a consumer group on some topics: high watermark minus committed offset, summed,
/// clamped at 0 per partition. `None` when the group has committed nothing yet.
pub fn group_lag(loaded: &Loaded, group: &str, topics: &[String]) -> Result<Option<i64>, String> {
    let mut cfg = crate::kafka::admin_config(&loaded.config.kafka);
    cfg.set("group.id", group)
        .set("enable.auto.commit", "false");
    let consumer: BaseConsumer = cfg
        .create()
        .map_err(|e| format!("cannot create consumer: {e}"))?;
    let mut tpl = TopicPartitionList::new();
    for t in topics {
        let md = consumer
            .fetch_metadata(Some(t), Duration::from_secs(5))
            .map_err(|e| format!("metadata of {t}: {e}"))?;
        for mt in md.topics().iter().filter(|m| m.name() == t) {
            for p in mt.partitions() {
                tpl.add_partition(t, p.id());
            }
        }
    }
    let committed = consumer
        .committed_offsets(tpl, Duration::from_secs(5))
        .map_err(|e| format!("committed offsets of {group}: {e}"))?;
    let mut total = 0;
    let mut any = false;
    for e in committed.elements() {
        let (_, high) = consumer
            .fetch_watermarks(e.topic(), e.partition(), Duration::from_secs(5))
            .map_err(|x| format!("watermarks of {}: {x}", e.topic()))?;
        let pos = match e.offset() {
            Offset::Offset(o) => {
                any = true;
                o
            }
            _ => 0,
        };
        total += (high - pos).max(0);
    }
    Ok(any.then_some(total))
}

/// The topics each stage consumes.
pub fn stage_topics(loaded: &Loaded) -> Vec<(&'static str, Vec<String>)> {
    let t = &loaded.config.topics;
    vec![
        ("route", t.inputs.clone()),
        ("agents", vec![t.tasks.clone()]),
        ("resolve", vec![t.proposals.clone()]),
        ("decisions", vec![t.decisions.clone()]),
    ]
}

fn ago(secs: i64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s => format!("{}h", s / 3600),
    }
}

/// The whole status report as text.
pub async fn report(
    loaded: &Loaded,
    approvals: &crate::approvals::Approvals,
    conn: &RedisConn,
) -> Result<String, String> {
    let mut out = String::new();
    let cfg = &loaded.config;
    let _ = writeln!(
        out,
        "STAGE      CONSUMER GROUP                      LAG (approx.)  TOPICS"
    );
    for (stage, topics) in stage_topics(loaded) {
        let group = format!("{}.{stage}", cfg.kafka.group_prefix);
        let (l2, g2, t2) = (loaded.clone(), group.clone(), topics.clone());
        let lag = tokio::task::spawn_blocking(move || group_lag(&l2, &g2, &t2))
            .await
            .map_err(|e| e.to_string())?;
        let lag = match lag {
            Ok(Some(n)) => n.to_string(),
            Ok(None) => "never ran".into(),
            Err(e) => format!("unknown ({e})"),
        };
        let _ = writeln!(
            out,
            "{stage:<10} {group:<35} {lag:<14} {}",
            topics.join(", ")
        );
    }
    let now = now_secs();
    let open = approvals.list_open().await.map_err(|e| e.to_string())?;
    let _ = writeln!(out);
    match (
        open.iter().map(|a| a.requested_at).min(),
        open.iter().map(|a| a.expires_at).min(),
    ) {
        (Some(oldest), Some(next)) => {
            let _ = writeln!(
                out,
                "APPROVALS  {} pending; oldest waiting {}, next expiry in {} (switchyard approvals list)",
                open.len(),
                ago(now - oldest),
                ago((next - now).max(0))
            );
        }
        _ => {
            let _ = writeln!(out, "APPROVALS  none pending");
        }
    }
    let names: Vec<String> = cfg.agents.keys().cloned().collect();
    let health = agent_health(conn, &cfg.redis.key_prefix, &names)
        .await
        .map_err(|e| e.to_string())?;
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "AGENT            HEALTH    CALLS(2h)  FAILED  TIMED OUT  REFUSED  LAST SEEN"
    );
    for h in health {
        let seen = h
            .last_seen
            .map(|t| format!("{} ago", ago(now - t)))
            .unwrap_or_else(|| "-".into());
        let _ = writeln!(
            out,
            "{:<16} {:<9} {:<10} {:<7} {:<10} {:<8} {seen}",
            h.agent,
            h.verdict(),
            h.calls(),
            h.failed,
            h.timed_out,
            h.refused
        );
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
