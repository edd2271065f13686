//! `best_of` routing: a route or a workflow step names interchangeable agents
//! (`select: {best_of: [a, b], explore: 0.1}`) and each task goes to one of them, chosen by their
//! scorecards ([`super::stats::Scorecard::score`]) and their current load (tasks in flight on every
//! instance over `max_concurrency`) — an ε-greedy bandit whose exploration floor keeps every
//! candidate measured. The choice is a pure function of the task id and the scoreboard snapshot:
//! a task id always gets the same draw, and agents whose effective scores are within 0.02 of the
//! best are tied and share the work by that draw.

use super::stats::Snapshot;
use crate::pattern::stable_id;
pub use crate::route::Select;

/// The score of a candidate with no scorecard yet (= an agent without data).
const UNKNOWN_SCORE: f64 = 0.375;
/// Effective scores this close to the best are tied.
const TIE: f64 = 0.02;

/// The candidate of `sel` that runs task `task_id`. `capacity` is an agent's `max_concurrency`.
pub fn pick(
    sel: &Select,
    task_id: &str,
    snap: &Snapshot,
    capacity: &dyn Fn(&str) -> usize,
) -> String {
    let n = sel.best_of.len();
    if n <= 1 {
        return sel.best_of.first().cloned().unwrap_or_default();
    }
    let h = u64::from_str_radix(&stable_id(&[task_id, "best_of"])[..16], 16).unwrap_or(0);
    let draw = (h % 1_000_000) as f64 / 1_000_000.0;
    let rest = (h / 1_000_000) as usize;
    if draw < sel.explore {
        return sel.best_of[rest % n].clone();
    }
    let effective: Vec<f64> = sel
        .best_of
        .iter()
        .map(|a| {
            let score = snap.scores.get(a).copied().unwrap_or(UNKNOWN_SCORE);
            let load = snap.loads.get(a).copied().unwrap_or(0).max(0) as f64;
            score / (1.0 + load / capacity(a).max(1) as f64)
        })
        .collect();
    let best = effective.iter().copied().fold(f64::MIN, f64::max);
    let tied: Vec<&String> = sel
        .best_of
        .iter()
        .zip(&effective)
        .filter(|(_, e)| **e >= best - TIE)
        .map(|(a, _)| a)
        .collect();
    tied[rest % tied.len()].clone()
}

/// The first pick of a task is kept ("pinned"), so a redelivered event routes its `best_of` task
/// to the same agent however the scores moved meanwhile: its task record and its route's audit
/// record come out byte for byte as the first time (the audit chain then lists what reached the
/// topic), and the result names the agent the audit says was picked.
pub struct PickStore {
    conn: crate::store::RedisConn,
    prefix: String,
    script: redis::Script,
}

/// KEYS[1] the task's pick; ARGV the pick made now, ttl. Returns the pick kept (the first one).
const PIN: &str = r"
local v = redis.call('GET', KEYS[1])
if v then return v end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return ARGV[1]
";

/// How long a pick is kept when its event's commit does not forget it (it normally goes with
/// the commit, seconds later).
const PICK_KEEP_SECONDS: u64 = 7 * 24 * 3600;

impl PickStore {
    pub fn new(conn: crate::store::RedisConn, prefix: &str) -> Self {
        PickStore {
            conn,
            prefix: prefix.into(),
            script: redis::Script::new(PIN),
        }
    }

    /// The key of task `task_id`'s pick (in the task's own slot).
    pub fn key(&self, task_id: &str) -> String {
        format!(
            "{}:pick:{{{}}}",
            self.prefix,
            task_id.replace(['{', '}'], "_")
        )
    }

    /// Pins `picks` (task id, agent) unless pinned before: the picks kept, by task id.
    pub async fn pin(
        &self,
        picks: &[(String, String)],
    ) -> Result<std::collections::HashMap<String, String>, crate::store::StoreError> {
        let mut c = self.conn.get().await?;
        let mut kept = std::collections::HashMap::new();
        for (task, agent) in picks {
            let v: String = self
                .script
                .key(self.key(task))
                .arg(agent)
                .arg(PICK_KEEP_SECONDS)
                .invoke_async(&mut c)
                .await?;
            kept.insert(task.clone(), v);
        }
        Ok(kept)
    }

    /// Forgets the picks of committed events (best effort: they expire anyway).
    pub async fn forget(&self, keys: &[String]) {
        let Ok(mut c) = self.conn.get().await else {
            return;
        };
        let mut pipe = redis::pipe();
        for k in keys {
            pipe.cmd("DEL").arg(k).ignore();
        }
        if let Err(e) = pipe.query_async::<()>(&mut c).await {
            tracing::debug!(error = %e, "Could not forget committed best_of picks; they expire.");
        }
    }
}

/// A chooser that answers the picks it knows (pinned before) and notes the ones it makes.
pub struct Pinning<'a> {
    live: &'a dyn crate::workflow::Chooser,
    known: std::collections::HashMap<String, String>,
    made: std::sync::Mutex<Vec<(String, String)>>,
}

impl<'a> Pinning<'a> {
    pub fn new(
        live: &'a dyn crate::workflow::Chooser,
        known: std::collections::HashMap<String, String>,
    ) -> Self {
        Pinning {
            live,
            known,
            made: Default::default(),
        }
    }

    /// The picks made (task id, agent), in order.
    pub fn made(self) -> Vec<(String, String)> {
        self.made.into_inner().unwrap_or_else(|e| e.into_inner())
    }
}

impl crate::workflow::Chooser for Pinning<'_> {
    fn pick(&self, select: &Select, task_id: &str) -> String {
        // A pinned agent that left the group (a config change) is not picked again.
        let agent = match self.known.get(task_id) {
            Some(a) if select.best_of.contains(a) => a.clone(),
            _ => self.live.pick(select, task_id),
        };
        self.made
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((task_id.to_string(), agent.clone()));
        agent
    }

    fn may_delegate(
        &self,
        supervisor: &str,
        agent: &str,
        run: &crate::workflow::RunState,
    ) -> Result<(), String> {
        self.live.may_delegate(supervisor, agent, run)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sel(explore: f64) -> Select {
        Select {
            best_of: vec!["a".into(), "b".into()],
            explore,
        }
    }

    fn share_of_a(s: &Select, snap: &Snapshot) -> usize {
        (0..1000)
            .filter(|i| pick(s, &format!("task-{i}"), snap, &|_| 4) == "a")
            .count()
    }

    #[test]
    fn unknown_agents_share_and_a_better_one_takes_most() {
        let s = sel(0.1);
        let even = share_of_a(&s, &Snapshot::default());
        assert!((400..600).contains(&even), "{even}");
        let snap = Snapshot {
            scores: [("a".to_string(), 0.9), ("b".to_string(), 0.2)].into(),
            loads: Default::default(),
        };
        let most = share_of_a(&s, &snap);
        assert!(
            (930..=970).contains(&most),
            "{most}: 90% + half the 10% explored"
        );
        assert_eq!(share_of_a(&sel(0.0), &snap), 1000);
        // Same task, same snapshot: same agent.
        assert_eq!(
            pick(&s, "task-7", &snap, &|_| 4),
            pick(&s, "task-7", &snap, &|_| 4)
        );
    }

    #[test]
    fn load_moves_work_to_the_idle_agent() {
        let snap = Snapshot {
            scores: [("a".to_string(), 0.9), ("b".to_string(), 0.8)].into(),
            loads: [("a".to_string(), 8)].into(),
        };
        assert_eq!(
            share_of_a(&sel(0.0), &snap),
            0,
            "a is at twice its capacity"
        );
    }
}
