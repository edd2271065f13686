//! Agent scorecards across every instance: what each agent did (task outcomes, latency, cost, per
//! model for LLM agents) and what became of its proposals (accepted or rejected by the rules,
//! approved or declined by people, undone later by a superseding action).
//!
//! Every stage that learns something adds it to [`AgentStats`] (in memory), which adds it to Redis
//! counters about once a second in one pipeline (`<prefix>:agentstats:{agents}:<agent>:<slot>`,
//! five-minute slots kept two days): scorecards stay off the per-task path. Readers sum a sliding
//! window of slots: `switchyard status` (two hours) and [`Scoreboard`] (the last hour, for
//! `best_of` routing), which also sums the tasks each instance has in flight per agent.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock};

use crate::context::Outcome;
use crate::event::now_secs;
use crate::store::{RedisConn, StoreError};
use crate::telemetry::METRICS;

/// Length of one counter slot.
pub const SLOT_SECONDS: i64 = 300;

fn stats_key(prefix: &str, agent: &str, slot: i64) -> String {
    format!("{prefix}:agentstats:{{agents}}:{agent}:{slot}")
}

fn load_key(prefix: &str) -> String {
    format!("{prefix}:agentload:{{agents}}")
}

/// Micro-units of a cost (counters are integers).
fn micros(cost: f64) -> i64 {
    (cost * 1e6).round() as i64
}

/// Gathers scorecard counts in memory and adds them to Redis about once a second; also tracks
/// the tasks this instance has in flight per agent and publishes them with each flush.
pub struct AgentStats {
    conn: RedisConn,
    prefix: String,
    instance: String,
    pending: std::sync::Mutex<HashMap<(String, String), i64>>,
    in_flight: std::sync::Mutex<HashMap<String, Arc<AtomicI64>>>,
}

/// Decrements an agent's in-flight count when dropped.
pub struct InFlight(Arc<AtomicI64>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl AgentStats {
    pub fn new(conn: RedisConn, prefix: &str) -> Self {
        AgentStats {
            conn,
            prefix: prefix.into(),
            instance: uuid::Uuid::new_v4().simple().to_string(),
            pending: Default::default(),
            in_flight: Default::default(),
        }
    }

    /// Adds `n` to an agent's counter `field`.
    pub fn add(&self, agent: &str, field: &str, n: i64) {
        if n == 0 {
            return;
        }
        *self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((agent.to_string(), field.to_string()))
            .or_default() += n;
    }

    /// Counts a task outcome (`succeeded`, `failed`, `timed_out`, `refused`) only.
    pub fn count(&self, agent: &str, status: &str) {
        self.add(agent, status, 1);
    }

    /// Counts a task the agent ran: its outcome, time, cost, and its model's share.
    pub fn task(&self, agent: &str, o: &Outcome, cost: f64) {
        self.count(agent, &o.status);
        if o.status == "refused" {
            return;
        }
        self.add(agent, "ms", o.duration_ms as i64);
        self.add(agent, "cost_micros", micros(cost));
        if let Some(m) = &o.response.model {
            self.add(agent, &format!("model:{m}:calls"), 1);
            if o.status != "succeeded" {
                self.add(agent, &format!("model:{m}:failed"), 1);
            }
            self.add(agent, &format!("model:{m}:cost_micros"), micros(cost));
        }
    }

    /// Counts the fate of a proposal: `accepted`, `rejected`, `approval_requested` (the rules),
    /// `approved`, `declined` (people), `undone` (a later action superseded it).
    pub fn proposal(&self, agent: &str, fate: &str) {
        self.score(agent, fate);
        let label = crate::telemetry::agent_label(agent);
        if fate == "undone" {
            METRICS
                .agent_actions_undone
                .with_label_values(&[label])
                .inc();
        } else {
            METRICS
                .agent_proposals
                .with_label_values(&[label, fate])
                .inc();
        }
    }

    /// Counts the fate of a proposal on the scorecard only (shared through the store), not in this
    /// process's metrics: a person's verdict is counted there once, where
    /// [`crate::governance::approvals::Tally`] says.
    pub fn score(&self, agent: &str, fate: &str) {
        self.add(agent, fate, 1);
    }

    /// Marks a task of `agent` as running on this instance until the guard is dropped.
    pub fn start(&self, agent: &str) -> InFlight {
        let c = self
            .in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(agent.to_string())
            .or_default()
            .clone();
        c.fetch_add(1, Ordering::Relaxed);
        InFlight(c)
    }

    /// Writes the counts gathered so far and this instance's in-flight tasks; on failure the counts
    /// are kept for the next flush.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let batch = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
        let loads: Vec<(String, i64)> = self
            .in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(a, n)| (a.clone(), n.load(Ordering::Relaxed)))
            .collect();
        if batch.is_empty() && loads.is_empty() {
            return Ok(());
        }
        let now = now_secs();
        let mut pipe = redis::pipe();
        for ((agent, field), n) in &batch {
            let key = stats_key(&self.prefix, agent, now / SLOT_SECONDS);
            pipe.hincr(&key, field, *n)
                .ignore()
                .hset(&key, "last", now)
                .ignore()
                .expire(&key, 2 * 86400)
                .ignore();
        }
        if !loads.is_empty() {
            let key = load_key(&self.prefix);
            for (agent, n) in &loads {
                pipe.hset(
                    &key,
                    format!("{agent}|{}", self.instance),
                    format!("{n}:{now}"),
                )
                .ignore();
            }
            pipe.expire(&key, 3600).ignore();
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
    pub async fn run(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        loop {
            let stopped = tokio::select! {
                _ = stop.cancelled() => true,
                _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => false,
            };
            if let Err(e) = self.flush().await {
                tracing::debug!(error = %e, "Recording agent scorecards failed; kept for the next try.");
            }
            if stopped {
                return;
            }
        }
    }
}

/// One model's share of an LLM agent's tasks.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ModelCard {
    pub calls: u64,
    pub failed: u64,
    pub cost: f64,
}

/// An agent's scorecard over a window.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Scorecard {
    pub agent: String,
    pub succeeded: u64,
    pub failed: u64,
    pub timed_out: u64,
    pub refused: u64,
    /// Summed duration of the tasks it ran.
    pub total_ms: u64,
    pub cost: f64,
    pub accepted: u64,
    pub rejected: u64,
    pub approval_requested: u64,
    pub approved: u64,
    pub declined: u64,
    pub undone: u64,
    pub models: BTreeMap<String, ModelCard>,
    pub last_seen: Option<i64>,
}

impl Scorecard {
    pub fn calls(&self) -> u64 {
        self.succeeded + self.failed + self.timed_out
    }

    pub fn mean_ms(&self) -> Option<u64> {
        (self.calls() > 0).then(|| self.total_ms / self.calls())
    }

    pub fn cost_per_task(&self) -> Option<f64> {
        (self.calls() > 0).then(|| self.cost / self.calls() as f64)
    }

    /// 0–1: the smoothed share of tasks that succeeded, times (½ + ½ × the smoothed share of its
    /// proposals that were not rejected, declined or undone). An agent without data scores ½·¾.
    pub fn score(&self) -> f64 {
        let success = (self.succeeded as f64 + 1.0) / (self.calls() as f64 + 2.0);
        let good = (self.accepted + self.approved) as f64;
        let bad = (self.rejected + self.declined + self.undone) as f64;
        let fate = (good + 1.0) / (good + bad + 2.0);
        success * (0.5 + 0.5 * fate)
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

    fn absorb(&mut self, m: &BTreeMap<String, i64>) {
        let get = |k: &str| m.get(k).copied().unwrap_or(0).max(0) as u64;
        self.succeeded += get("succeeded");
        self.failed += get("failed");
        self.timed_out += get("timed_out");
        self.refused += get("refused");
        self.total_ms += get("ms");
        self.cost += get("cost_micros") as f64 / 1e6;
        self.accepted += get("accepted");
        self.rejected += get("rejected");
        self.approval_requested += get("approval_requested");
        self.approved += get("approved");
        self.declined += get("declined");
        self.undone += get("undone");
        for (k, v) in m {
            let Some((model, field)) = k.strip_prefix("model:").and_then(|r| r.rsplit_once(':'))
            else {
                continue;
            };
            let card = self.models.entry(model.to_string()).or_default();
            let v = (*v).max(0) as u64;
            match field {
                "calls" => card.calls += v,
                "failed" => card.failed += v,
                "cost_micros" => card.cost += v as f64 / 1e6,
                _ => {}
            }
        }
        if let Some(l) = m.get("last") {
            self.last_seen = Some(self.last_seen.unwrap_or(0).max(*l));
        }
    }
}

/// The scorecards of `agents` over the last `window_seconds` (whole slots, the current one
/// included). One pipelined round trip.
pub async fn scorecards(
    conn: &RedisConn,
    prefix: &str,
    agents: &[String],
    window_seconds: i64,
) -> Result<Vec<Scorecard>, StoreError> {
    let slot = now_secs() / SLOT_SECONDS;
    let slots = (window_seconds / SLOT_SECONDS).max(1);
    let mut pipe = redis::pipe();
    for a in agents {
        for s in (slot - slots + 1)..=slot {
            pipe.cmd("HGETALL").arg(stats_key(prefix, a, s));
        }
    }
    let mut c = conn.get().await?;
    let maps: Vec<BTreeMap<String, i64>> = if agents.is_empty() {
        Vec::new()
    } else {
        pipe.query_async(&mut c).await?
    };
    let mut out = Vec::with_capacity(agents.len());
    for (i, a) in agents.iter().enumerate() {
        let mut card = Scorecard {
            agent: a.clone(),
            ..Default::default()
        };
        for m in maps.iter().skip(i * slots as usize).take(slots as usize) {
            card.absorb(m);
        }
        out.push(card);
    }
    Ok(out)
}

/// Tasks in flight per agent, summed over the instances that reported in the last 5 s.
pub async fn loads(conn: &RedisConn, prefix: &str) -> Result<HashMap<String, i64>, StoreError> {
    let mut c = conn.get().await?;
    let m: HashMap<String, String> = redis::cmd("HGETALL")
        .arg(load_key(prefix))
        .query_async(&mut c)
        .await?;
    let now = now_secs();
    let mut out: HashMap<String, i64> = HashMap::new();
    for (k, v) in m {
        let (Some((agent, _)), Some((n, at))) = (k.rsplit_once('|'), v.split_once(':')) else {
            continue;
        };
        let (Ok(n), Ok(at)) = (n.parse::<i64>(), at.parse::<i64>()) else {
            continue;
        };
        if now - at <= 5 {
            *out.entry(agent.to_string()).or_default() += n.max(0);
        }
    }
    Ok(out)
}

/// What `best_of` routing knows of its candidates: scores and loads, refreshed every second.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Snapshot {
    pub scores: HashMap<String, f64>,
    pub loads: HashMap<String, i64>,
}

/// The latest [`Snapshot`] of the agents named in `best_of` groups, kept fresh in the background.
pub struct Scoreboard {
    snapshot: RwLock<Arc<Snapshot>>,
}

impl Default for Scoreboard {
    fn default() -> Self {
        Scoreboard {
            snapshot: RwLock::new(Arc::new(Snapshot::default())),
        }
    }
}

impl Scoreboard {
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn set(&self, s: Snapshot) {
        for (a, v) in &s.scores {
            METRICS.agent_score.with_label_values(&[a]).set(*v);
        }
        *self.snapshot.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(s);
    }

    /// Reads the scorecards (last hour) and loads of `agents` every second until `stop`.
    pub async fn run(
        self: Arc<Self>,
        conn: RedisConn,
        prefix: String,
        agents: Vec<String>,
        stop: tokio_util::sync::CancellationToken,
    ) {
        loop {
            let read = async {
                let cards = scorecards(&conn, &prefix, &agents, 3600).await?;
                let loads = loads(&conn, &prefix).await?;
                Ok::<_, StoreError>(Snapshot {
                    scores: cards.iter().map(|c| (c.agent.clone(), c.score())).collect(),
                    loads,
                })
            }
            .await;
            match read {
                Ok(s) => self.set(s),
                Err(e) => {
                    tracing::debug!(error = %e, "Reading agent scorecards failed; best_of keeps the last ones.")
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_and_scores() {
        let h = |s, f, t, r| Scorecard {
            agent: "a".into(),
            succeeded: s,
            failed: f,
            timed_out: t,
            refused: r,
            ..Default::default()
        };
        assert_eq!(h(0, 0, 0, 0).verdict(), "idle");
        assert_eq!(h(0, 0, 0, 3).verdict(), "refused");
        assert_eq!(h(9, 1, 0, 0).verdict(), "ok");
        assert_eq!(h(8, 1, 1, 0).verdict(), "failing");
        assert!(h(20, 0, 0, 0).score() > h(10, 10, 0, 0).score());
        let mut undone = h(20, 0, 0, 0);
        undone.accepted = 5;
        undone.undone = 5;
        let mut kept = h(20, 0, 0, 0);
        kept.accepted = 5;
        assert!(kept.score() > undone.score());
    }

    #[test]
    fn model_fields_are_read_back() {
        let mut c = Scorecard::default();
        let m: BTreeMap<String, i64> = [
            ("succeeded", 3),
            ("ms", 300),
            ("cost_micros", 1_500_000),
            ("model:gpt-4o-mini:calls", 3),
            ("model:gpt-4o-mini:failed", 1),
            ("model:gpt-4o-mini:cost_micros", 1_500_000),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        c.absorb(&m);
        assert_eq!(c.mean_ms(), Some(100));
        assert_eq!(c.cost_per_task(), Some(0.5));
        assert_eq!(
            c.models["gpt-4o-mini"],
            ModelCard {
                calls: 3,
                failed: 1,
                cost: 1.5
            }
        );
    }
}
