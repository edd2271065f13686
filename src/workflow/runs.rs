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

/// Due runs the deadline sweeper reads per pass.
const SWEEP_BATCH: usize = 512;

/// A run's deadline (ms since the epoch): its start plus `deadline_seconds`.
fn deadline_ms(state: &RunState, deadline_seconds: Option<u64>) -> Option<i64> {
    let started = chrono::DateTime::parse_from_rfc3339(&state.started_at).ok()?;
    Some(started.timestamp_millis() + deadline_seconds? as i64 * 1000)
}

/// The `workflow.timed_out` record of a run timed out at `at` (the same bytes when written again).
fn timed_out_record(state: &RunState, deadline: u64, at: String) -> super::Lifecycle {
    let running: Vec<&str> = state
        .steps
        .iter()
        .filter(|(_, s)| s.status == "running")
        .map(|(n, _)| n.as_str())
        .collect();
    super::Lifecycle {
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
    }
}

/// KEYS[1] the deadline list; ARGV run id, its score as read, the new score. 1 moved, 0 not (its
/// score changed meanwhile, or it left the list).
const CLAIM: &str = r"
local s = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not s or tonumber(s) ~= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
return 1
";

/// What the deadline sweeper does with a run's place in its list.
enum Settle {
    Keep,
    Unlist,
    Move(i64),
}

/// A run the deadline sweeper ended (or whose record it hands out again), with its
/// `workflow.timed_out` record.
pub struct TimedOut {
    pub run: RunState,
    pub record: super::Lifecycle,
    /// Handed out before, its writing not confirmed: the record is written again.
    pub again: bool,
}

pub struct Runs {
    conn: RedisConn,
    prefix: String,
    cas: Script,
    claim: Script,
}

impl Runs {
    pub fn new(conn: RedisConn, prefix: &str) -> Self {
        Runs {
            conn,
            prefix: prefix.to_string(),
            cas: Script::new(CAS),
            claim: Script::new(CLAIM),
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

    /// Running runs of workflows with a `deadline_seconds`, scored by their deadline (ms): what
    /// the deadline sweeper reads ([`Self::expire`]) — only the runs that are due, however many
    /// run.
    fn deadlines_key(&self) -> String {
        format!("{}:wf:deadlines", self.prefix)
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
                // Decided before — but what follows a decision's compare-and-set may not have
                // been written (Redis failed in between): the run's listings are written again
                // where missing (not the active count, which cannot tell).
                if !created {
                    let mut c = self.conn.get().await?;
                    self.list_again(&mut c, &key, meta, &state, w.deadline_seconds)
                        .await?;
                }
                return Ok(advance(w, &mut state, f));
            }
            let was_running = state.status == "running";
            let plan = advance(w, &mut state, f);
            let mut c = self.conn.get().await?;
            if self.cas(&mut c, &key, v, &state).await? {
                // Active runs per workflow: counted from the first completion to the end.
                let ended = was_running && state.status != "running";
                let delta = i64::from(created) - i64::from(ended);
                if delta != 0 {
                    let mut p = redis::pipe();
                    p.cmd("HINCRBY")
                        .arg(self.active_key())
                        .arg(&meta.workflow)
                        .arg(delta)
                        .ignore();
                    if ended {
                        p.cmd("ZREM")
                            .arg(self.deadlines_key())
                            .arg(&meta.run_id)
                            .ignore();
                    }
                    let _: () = p.query_async(&mut c).await?;
                }
                if created {
                    let score = chrono::Utc::now().timestamp_millis();
                    // One round trip (not a transaction: on a Redis Cluster these keys are in
                    // different slots); `list_again` mends what a failure leaves out.
                    let mut p = redis::pipe();
                    p.cmd("ZADD")
                        .arg(self.index_key())
                        .arg(score)
                        .arg(&meta.run_id)
                        .ignore()
                        .cmd("ZREMRANGEBYSCORE")
                        .arg(self.index_key())
                        .arg("-inf")
                        .arg(score - (KEEP_SECONDS as i64) * 1000)
                        .ignore();
                    if let (true, Some(due)) = (
                        state.status == "running",
                        deadline_ms(&state, w.deadline_seconds),
                    ) {
                        p.cmd("ZADD")
                            .arg(self.deadlines_key())
                            .arg(due)
                            .arg(&meta.run_id)
                            .ignore();
                    }
                    p.cmd("SET")
                        .arg(self.where_key(&meta.run_id))
                        .arg(&key)
                        .arg("EX")
                        .arg(KEEP_SECONDS)
                        .ignore();
                    let _: () = p.query_async(&mut c).await?;
                }
                return Ok(plan);
            }
        }
        Err(StoreError::Redis(format!(
            "run {} kept moving under 50 attempts",
            meta.run_id
        )))
    }

    /// The run's `where` and its place in the runs' index when its `where` is missing, and
    /// (running, with a deadline) its place in the deadline list when missing: what a run decided
    /// before may lack when Redis failed right after its compare-and-set. Idempotent (`NX`).
    async fn list_again<C: redis::aio::ConnectionLike>(
        &self,
        c: &mut C,
        key: &str,
        meta: &RunState,
        state: &RunState,
        deadline_seconds: Option<u64>,
    ) -> Result<(), StoreError> {
        let listed: bool = redis::cmd("EXISTS")
            .arg(self.where_key(&meta.run_id))
            .query_async(c)
            .await?;
        let due = deadline_ms(state, deadline_seconds).filter(|_| state.status == "running");
        if listed && due.is_none() {
            return Ok(());
        }
        let mut p = redis::pipe();
        if !listed {
            // Placed in the index by when the run started, not now (a late redelivery of an old
            // run's completion must not list it as the newest).
            let started = chrono::DateTime::parse_from_rfc3339(&state.started_at).map_or_else(
                |_| chrono::Utc::now().timestamp_millis(),
                |t| t.timestamp_millis(),
            );
            p.cmd("ZADD")
                .arg(self.index_key())
                .arg("NX")
                .arg(started)
                .arg(&meta.run_id)
                .ignore()
                .cmd("SET")
                .arg(self.where_key(&meta.run_id))
                .arg(key)
                .arg("EX")
                .arg(KEEP_SECONDS)
                .ignore();
        }
        if let Some(due) = due {
            p.cmd("ZADD")
                .arg(self.deadlines_key())
                .arg("NX")
                .arg(due)
                .arg(&meta.run_id)
                .ignore();
        }
        p.query_async::<()>(c).await?;
        Ok(())
    }

    /// Ends the runs still running past their workflow's `deadline_seconds` (`timed_out`): no
    /// further step starts; steps still running finish unseen. Returns each ended run with its
    /// `workflow.timed_out` record, for the caller to produce and then confirm
    /// ([`Self::timed_out_written`]). A run whose record was not confirmed within `resend_after`
    /// (its writer failed or died) is returned again (`again`), with the same record (stored with
    /// the run); each hand-out is claimed by a compare-and-set on the run's place in the list, so
    /// one instance at a time writes it. Reads only the runs that are due (at most
    /// [`SWEEP_BATCH`] a call).
    pub async fn expire(
        &self,
        specs: &std::collections::BTreeMap<String, WorkflowSpec>,
        now: chrono::DateTime<chrono::Utc>,
        resend_after: std::time::Duration,
    ) -> Result<Vec<TimedOut>, StoreError> {
        let mut c = self.conn.get().await?;
        let now_ms = now.timestamp_millis();
        let next = now_ms + resend_after.as_millis() as i64;
        let due: Vec<(String, i64)> = redis::cmd("ZRANGEBYSCORE")
            .arg(self.deadlines_key())
            .arg("-inf")
            .arg(now_ms)
            .arg("WITHSCORES")
            .arg("LIMIT")
            .arg(0)
            .arg(SWEEP_BATCH)
            .query_async::<Vec<(String, f64)>>(&mut c)
            .await?
            .into_iter()
            .map(|(id, score)| (id, score as i64))
            .collect();
        let mut out = Vec::new();
        for (id, score) in due {
            // What becomes of its place in the list: gone (the run ended, expired or left the
            // config), a new deadline (the config changed it), or left as it is.
            let mut settle = Settle::Unlist;
            let key: Option<String> = redis::cmd("GET")
                .arg(self.where_key(&id))
                .query_async(&mut c)
                .await?;
            if let Some(key) = key {
                for attempt in 0..5 {
                    let (v, Some(mut state)) = self.load(&key).await? else {
                        break;
                    };
                    let Some(deadline) =
                        specs.get(&state.workflow).and_then(|w| w.deadline_seconds)
                    else {
                        break;
                    };
                    let Some(due) = deadline_ms(&state, Some(deadline)) else {
                        break;
                    };
                    if state.status == "timed_out" {
                        // Timed out before and still listed: its record was not confirmed.
                        settle = Settle::Keep;
                        if self.claim(&mut c, &id, score, next).await? {
                            let record = state.timed_out.clone().unwrap_or_else(|| {
                                let at = state.finished_at.clone().unwrap_or_default();
                                timed_out_record(&state, deadline, at)
                            });
                            out.push(TimedOut {
                                run: state,
                                record,
                                again: true,
                            });
                        }
                        break;
                    }
                    if state.status != "running" {
                        break;
                    }
                    if now_ms < due {
                        settle = Settle::Move(due);
                        break;
                    }
                    let at = now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
                    let record = timed_out_record(&state, deadline, at.clone());
                    state.status = "timed_out".into();
                    state.finished_at = Some(at);
                    state.timed_out = Some(record.clone());
                    if self.cas(&mut c, &key, v, &state).await? {
                        let _: () = redis::pipe()
                            .cmd("HINCRBY")
                            .arg(self.active_key())
                            .arg(&state.workflow)
                            .arg(-1)
                            .ignore()
                            // Its writer's claim: handed out again only if not confirmed by then.
                            .cmd("ZADD")
                            .arg(self.deadlines_key())
                            .arg("XX")
                            .arg(next)
                            .arg(&id)
                            .ignore()
                            .query_async(&mut c)
                            .await?;
                        settle = Settle::Keep;
                        out.push(TimedOut {
                            run: state,
                            record,
                            again: false,
                        });
                        break;
                    }
                    if attempt == 4 {
                        // The run kept moving (steps finishing): the next pass tries again.
                        settle = Settle::Keep;
                    }
                }
            } else if score > now_ms - 3_600_000 {
                // Its `where` is written before it is listed, so missing means it expired; an
                // entry due within the hour is left for the next pass all the same.
                settle = Settle::Keep;
            }
            match settle {
                Settle::Keep => {}
                Settle::Unlist => {
                    let _: () = redis::cmd("ZREM")
                        .arg(self.deadlines_key())
                        .arg(&id)
                        .query_async(&mut c)
                        .await?;
                }
                Settle::Move(due) => {
                    let _: () = redis::cmd("ZADD")
                        .arg(self.deadlines_key())
                        .arg("XX")
                        .arg(due)
                        .arg(&id)
                        .query_async(&mut c)
                        .await?;
                }
            }
        }
        Ok(out)
    }

    /// Moves run `id`'s place in the deadline list from `from` to `to` unless someone else did
    /// first: true when this caller claimed it.
    async fn claim(
        &self,
        c: &mut crate::store::Conn,
        id: &str,
        from: i64,
        to: i64,
    ) -> Result<bool, StoreError> {
        let moved: i64 = self
            .claim
            .key(self.deadlines_key())
            .arg(id)
            .arg(from)
            .arg(to)
            .invoke_async(c)
            .await?;
        Ok(moved == 1)
    }

    /// A timed-out run's record was written: the run leaves the deadline sweeper's list.
    pub async fn timed_out_written(&self, run_id: &str) -> Result<(), StoreError> {
        let mut c = self.conn.get().await?;
        let _: () = redis::cmd("ZREM")
            .arg(self.deadlines_key())
            .arg(run_id)
            .query_async(&mut c)
            .await?;
        Ok(())
    }

    /// Lists for the deadline sweeper the running runs of workflows with a deadline that are not
    /// listed yet — runs started before the list existed (an upgrade); called once when a sweeper
    /// starts. Reads the runs of the last (longest deadline + 1 day), as the sweeper once did on
    /// every pass. Returns how many it listed.
    pub async fn list_deadlines(
        &self,
        specs: &std::collections::BTreeMap<String, WorkflowSpec>,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<usize, StoreError> {
        let Some(longest) = specs.values().filter_map(|w| w.deadline_seconds).max() else {
            return Ok(0);
        };
        let mut c = self.conn.get().await?;
        let newest = now.timestamp_millis();
        let oldest = newest - (longest as i64 + 86_400) * 1000;
        let ids: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(self.index_key())
            .arg(oldest)
            .arg(newest)
            .query_async(&mut c)
            .await?;
        let mut listed = 0;
        for id in ids {
            let Some(state) = self.get(&id).await? else {
                continue;
            };
            let deadline = specs.get(&state.workflow).and_then(|w| w.deadline_seconds);
            if let (true, Some(due)) = (state.status == "running", deadline_ms(&state, deadline)) {
                let added: i64 = redis::cmd("ZADD")
                    .arg(self.deadlines_key())
                    .arg("NX")
                    .arg(due)
                    .arg(&id)
                    .query_async(&mut c)
                    .await?;
                listed += added as usize;
            }
        }
        Ok(listed)
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
