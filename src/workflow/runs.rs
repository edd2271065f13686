//! Where runs live: one Redis hash per run (`<prefix>:wf:{tenant/resource}:<run id>`, the
//! resource's hash slot) holding the run's state as JSON and a version; every change is a
//! compare-and-set on the version, so two step completions racing (parallel branches, two
//! instances after a rebalance) serialise and a join fires once. An index (newest first) serves
//! `switchyard workflows list`.

use redis::Script;

use super::{advance, new_run, Finished, Plan, RunState, WorkflowSpec};
use crate::store::{RedisConn, ResourceKey, StoreError};

/// How long a run's state is kept after its last change.
const KEEP_SECONDS: u64 = 7 * 24 * 3600;

/// KEYS[1] the run; ARGV expected version, state JSON, ttl. 1 written, 0 moved.
const CAS: &str = r"
local v = tonumber(redis.call('HGET', KEYS[1], 'v') or '0')
if v ~= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'v', v + 1, 'state', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
";

pub struct Runs {
    conn: RedisConn,
    prefix: String,
    cas: Script,
}

impl Runs {
    pub fn new(conn: RedisConn, prefix: &str) -> Self {
        Runs {
            conn,
            prefix: prefix.to_string(),
            cas: Script::new(CAS),
        }
    }

    fn key(&self, tenant: &str, resource: &str, run_id: &str) -> String {
        format!(
            "{}:wf:{}:{run_id}",
            self.prefix,
            ResourceKey::new(tenant, resource).hash_tag()
        )
    }

    fn index_key(&self) -> String {
        format!("{}:wf:runs", self.prefix)
    }

    fn active_key(&self) -> String {
        format!("{}:wf:active", self.prefix)
    }

    fn where_key(&self, run_id: &str) -> String {
        format!("{}:wf:where:{run_id}", self.prefix)
    }

    /// Writes `state` if the run is still at version `v`; false when it moved.
    async fn cas(
        &self,
        c: &mut crate::store::Conn,
        key: &str,
        v: u64,
        state: &RunState,
    ) -> Result<bool, StoreError> {
        let json = serde_json::to_string(state)
            .map_err(|e| StoreError::Corrupt(format!("run state: {e}")))?;
        let written: i64 = self
            .cas
            .key(key)
            .arg(v)
            .arg(json)
            .arg(KEEP_SECONDS)
            .invoke_async(c)
            .await?;
        Ok(written == 1)
    }

    async fn load(&self, key: &str) -> Result<(u64, Option<RunState>), StoreError> {
        let mut c = self.conn.get().await?;
        let (v, state): (Option<u64>, Option<String>) = redis::cmd("HMGET")
            .arg(key)
            .arg("v")
            .arg("state")
            .query_async(&mut c)
            .await?;
        let state = match state {
            Some(s) => Some(
                serde_json::from_str(&s)
                    .map_err(|e| StoreError::Corrupt(format!("run state {key}: {e}")))?,
            ),
            None => None,
        };
        Ok((v.unwrap_or(0), state))
    }

    /// Moves the run `meta.run_id` on after a step task finished (creating the run's state from
    /// `meta` when this is its first completion); the plan says what to produce.
    pub async fn advance(
        &self,
        w: &WorkflowSpec,
        meta: &RunState,
        f: &Finished<'_>,
    ) -> Result<Plan, StoreError> {
        let key = self.key(&meta.tenant, &meta.resource, &meta.run_id);
        for _ in 0..50 {
            let (v, state) = self.load(&key).await?;
            let created = state.is_none();
            let mut state = state.unwrap_or_else(|| new_run(w, meta.clone(), f.choose));
            if state.plans.contains_key(f.task_id) {
                return Ok(advance(w, &mut state, f));
            }
            let was_running = state.status == "running";
            let plan = advance(w, &mut state, f);
            let mut c = self.conn.get().await?;
            if self.cas(&mut c, &key, v, &state).await? {
                // Active runs per workflow: counted from the first completion to the end.
                let delta =
                    i64::from(created) - i64::from(was_running && state.status != "running");
                if delta != 0 {
                    let _: () = redis::cmd("HINCRBY")
                        .arg(self.active_key())
                        .arg(&meta.workflow)
                        .arg(delta)
                        .query_async(&mut c)
                        .await?;
                }
                if created {
                    let score = chrono::Utc::now().timestamp_millis();
                    let _: () = redis::pipe()
                        .cmd("ZADD")
                        .arg(self.index_key())
                        .arg(score)
                        .arg(&meta.run_id)
                        .ignore()
                        .cmd("ZREMRANGEBYSCORE")
                        .arg(self.index_key())
                        .arg("-inf")
                        .arg(score - (KEEP_SECONDS as i64) * 1000)
                        .ignore()
                        .cmd("SET")
                        .arg(self.where_key(&meta.run_id))
                        .arg(&key)
                        .arg("EX")
                        .arg(KEEP_SECONDS)
                        .ignore()
                        .query_async(&mut c)
                        .await?;
                }
                return Ok(plan);
            }
        }
        Err(StoreError::Redis(format!(
            "run {} kept moving under 50 attempts",
            meta.run_id
        )))
    }

    /// Ends the runs still running past their workflow's `deadline_seconds` (`timed_out`): no
    /// further step starts; steps still running finish unseen. Returns each ended run with its
    /// `workflow.timed_out` record, for the caller to produce.
    pub async fn expire(
        &self,
        specs: &std::collections::BTreeMap<String, WorkflowSpec>,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<Vec<(RunState, super::Lifecycle)>, StoreError> {
        let Some(longest) = specs.values().filter_map(|w| w.deadline_seconds).max() else {
            return Ok(Vec::new());
        };
        let mut c = self.conn.get().await?;
        // Runs that can be past a deadline: started at least the shortest deadline ago, at most
        // the longest deadline plus a day ago (older ones were swept before).
        let newest = now.timestamp_millis();
        let oldest = newest - (longest as i64 + 86_400) * 1000;
        let ids: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(self.index_key())
            .arg(oldest)
            .arg(newest)
            .query_async(&mut c)
            .await?;
        let mut out = Vec::new();
        for id in ids {
            let Some(key) = redis::cmd("GET")
                .arg(self.where_key(&id))
                .query_async::<Option<String>>(&mut c)
                .await?
            else {
                continue;
            };
            for _ in 0..5 {
                let (v, Some(mut state)) = self.load(&key).await? else {
                    break;
                };
                let Some(deadline) = specs.get(&state.workflow).and_then(|w| w.deadline_seconds)
                else {
                    break;
                };
                let started = chrono::DateTime::parse_from_rfc3339(&state.started_at)
                    .map(|t| t.with_timezone(&chrono::Utc))
                    .unwrap_or(now);
                if state.status != "running"
                    || now < started + chrono::Duration::seconds(deadline as i64)
                {
                    break;
                }
                let at = now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
                state.status = "timed_out".into();
                state.finished_at = Some(at.clone());
                let running: Vec<String> = state
                    .steps
                    .iter()
                    .filter(|(_, s)| s.status == "running")
                    .map(|(n, _)| n.clone())
                    .collect();
                if self.cas(&mut c, &key, v, &state).await? {
                    let _: () = redis::cmd("HINCRBY")
                        .arg(self.active_key())
                        .arg(&state.workflow)
                        .arg(-1)
                        .query_async(&mut c)
                        .await?;
                    let record = super::Lifecycle {
                        kind: "workflow.timed_out".into(),
                        step: None,
                        agent: None,
                        task_id: None,
                        status: Some("timed_out".into()),
                        duration_ms: Some(deadline * 1000),
                        error: Some(format!(
                            "not finished within {deadline} s; still running: {}",
                            running.join(", ")
                        )),
                        cost: Some(state.steps.values().map(|s| s.cost).sum()),
                        at,
                    };
                    out.push((state, record));
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Runs started and not yet ended, per workflow (counted from a run's first step completion).
    pub async fn active(&self) -> Result<std::collections::BTreeMap<String, i64>, StoreError> {
        let mut c = self.conn.get().await?;
        Ok(redis::cmd("HGETALL")
            .arg(self.active_key())
            .query_async(&mut c)
            .await?)
    }

    /// A run's state by id.
    pub async fn get(&self, run_id: &str) -> Result<Option<RunState>, StoreError> {
        let mut c = self.conn.get().await?;
        let key: Option<String> = redis::cmd("GET")
            .arg(self.where_key(run_id))
            .query_async(&mut c)
            .await?;
        match key {
            Some(k) => Ok(self.load(&k).await?.1),
            None => Ok(None),
        }
    }

    /// The most recent runs, newest first (their first step completed).
    pub async fn list(&self, limit: usize) -> Result<Vec<RunState>, StoreError> {
        let mut c = self.conn.get().await?;
        let ids: Vec<String> = redis::cmd("ZREVRANGE")
            .arg(self.index_key())
            .arg(0)
            .arg(limit.saturating_sub(1))
            .query_async(&mut c)
            .await?;
        let mut out = Vec::new();
        for id in ids {
            if let Some(r) = self.get(&id).await? {
                out.push(r);
            }
        }
        Ok(out)
    }
}
