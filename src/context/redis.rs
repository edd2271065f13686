//! Redis [`ContextStore`].
//!
//! Everything of one resource is one hash, `<prefix>:ctx:{t/r}` (the `{tenant/resource}` hash tag):
//! - `_version`, one field per fact (JSON [`Fact`]) and `_v:<key>`, the version at which each fact
//!   last changed;
//! - `_events`: recent event summaries, most recent first (a JSON array of JSON strings);
//! - `_done`: the ids of the resource's most recently finished tasks (a JSON array); `_full` once
//!   the list dropped one (an outcome may then be stored for a task it does not name).
//!
//! - `_a:<topic>:<partition>`: the highest offset of that input partition whose task was committed
//!   here (a task at or below it with no outcome kept is finished: [`Prior::at`]), and
//!   `_ai:<topic>:<partition>` the topic's id it is of ([`crate::kafka::topic_id`]; none from
//!   builds before it, or brokers without ids): an offset of another incarnation fences nothing;
//! - `_mt<s>`, `_mp<s>`, `_m<s>` (s = 1, 2): the memo slots ([`crate::store::Place`]) — a
//!   finished task's id, its input (`<topic>:<partition>:<offset>`) and its recorded [`Outcome`]
//!   (JSON).
//!
//! A finished task's outcome goes into a slot when one is free (empty, or holding the outcome of a
//! delivered input of the same partition), written by the commit's own `HSET`;
//! otherwise beside the hash, `<prefix>:ctx:{t/r}:o:<task id>` (with the context's TTL) until its
//! input is committed: apart, so that reading a busy resource's context never reads the outcomes of
//! its uncommitted tasks. So a task costs one read (`HGETALL` of the context, one pipeline for a
//! whole batch; a `GET` of an outcome kept apart only where one can exist: the task is among the
//! resource's finished ids and not in a slot, or their list is full — see
//! [`FullLists`](crate::store::FullLists)) and one commit script (`HMGET`, `HSET`; `SET NX` only
//! for an outcome kept apart; `EXPIRE` only when a sixteenth of the TTL passed since the hash's TTL
//! was last renewed, kept in its field `_x`; an apart outcome's own TTL ends with the hash's), and
//! the forgetting of an apart outcome a share of one `DEL` of all the outcomes committed at the same
//! time. What stays behind grows with resources, not with tasks.

use redis::Script;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};

use super::{CommitResult, ContextConfig, ContextStore, Fact, Outcome, Prior, Snapshot};
use crate::store::{memo_field, FullLists, Place, RedisConn, ResourceKey, StoreError, MEMO_SLOTS};

const COMMIT: &str = r#"
-- KEYS[1] = context hash, KEYS[2] = the task's outcome apart; ARGV[1] = task id, ARGV[2] = outcome,
-- ARGV[3] = ttl, ARGV[4] = event summary ('' = none), ARGV[5] = max events, ARGV[6] = tasks
-- remembered, ARGV[7] = fact count, then key, value pairs, then now (unix seconds), then the
-- input's place ('<topic>:<partition>:<offset>', '' = none) and the last offset of its partition
-- known delivered (crate::store::Place), then its topic's id ('' = unknown). Returns {1, version, '1' when the outcome is kept in one
-- of the hash's memo slots}, {0, the outcome recorded before, ''} or {2, '', ''} (finished and
-- forgotten).
local n = tonumber(ARGV[7])
local place, delivered, tid = ARGV[9 + 2 * n], tonumber(ARGV[10 + 2 * n]), ARGV[11 + 2 * n] or ''
local mine, offset = string.match(place, '^(.*):(%-?%d+)$')
offset = tonumber(offset)
local cur = redis.call('HMGET', KEYS[1], '_o:' .. ARGV[1], '_version', '_events', '_done', '_x', '_full', '_mt1', '_mp1', '_mt2', '_mp2', '_a:' .. (mine or ''), '_ai:' .. (mine or ''))
-- The applied offset is of another incarnation of the topic (both ids known and different: it
-- was deleted and created again): it fences nothing, and this task's offset replaces it.
if cur[11] and cur[12] and cur[12] ~= '' and tid ~= '' and cur[12] ~= tid then cur[11] = false end
if cur[1] then return {0, cur[1], ''} end
for s = 1, 2 do
  if cur[5 + 2 * s] == ARGV[1] then return {0, redis.call('HGET', KEYS[1], '_m' .. s), ''} end
end
if cur[4] then
  for _, t in ipairs(cjson.decode(cur[4])) do
    if t == ARGV[1] then
      -- Finished here already: recorded still (not yet committed), or a later copy.
      local recorded = redis.call('GET', KEYS[2])
      if recorded then return {0, recorded, ''} end
      return {2, '', ''}
    end
  end
end
-- Its partition's inputs were applied up to `_a:<partition>` and this one is no later, with no
-- outcome kept for it: it finished, and its records are delivered (a slot is taken only from a
-- delivered input; an outcome kept apart goes only once committed).
if offset and cur[11] and offset <= tonumber(cur[11]) then return {2, '', ''} end
local version = tonumber(cur[2] or '0')
local set = {}
local function put(k, v) set[#set + 1] = k; set[#set + 1] = v end
if n > 0 then
  version = version + 1
  put('_version', tostring(version))
  for i = 0, n - 1 do
    put(ARGV[8 + 2 * i], ARGV[9 + 2 * i])
    put('_v:' .. ARGV[8 + 2 * i], tostring(version))
  end
end
-- `first`, then `old` without it, at most `max`; and whether an id of `old` was dropped.
local function capped(first, old, max)
  local list, dropped = {first}, false
  if old then
    for _, x in ipairs(cjson.decode(old)) do
      if x ~= first then
        if #list >= max then dropped = true; break end
        list[#list + 1] = x
      end
    end
  end
  return cjson.encode(list), dropped
end
if ARGV[4] ~= '' and tonumber(ARGV[5]) > 0 then
  put('_events', (capped(ARGV[4], cur[3], tonumber(ARGV[5]))))
end
local done, dropped = capped(ARGV[1], cur[4], math.max(1, tonumber(ARGV[6])))
put('_done', done)
-- Once a finished id was dropped, a stored outcome may exist for an id the list does not name:
-- readers ask for it (`_full`, whatever the configured count is now).
if dropped and not cur[6] then put('_full', '1') end
-- The TTL is renewed when a sixteenth of it passed since it last was, or it changed (`_x` =
-- '<when>:<ttl>' of the last renewal), not on every commit.
local now, ttl = tonumber(ARGV[8 + 2 * n]), tonumber(ARGV[3])
local at, was = string.match(cur[5] or '', '^(%d+):(%d+)$')
at, was = tonumber(at), tonumber(was)
local renew = not at or was ~= ttl or now < at or now - at >= ttl / 16
if renew then put('_x', ARGV[8 + 2 * n] .. ':' .. ARGV[3]) end
-- The outcome never outlives the hash (else a reader would find no id naming it).
local ex = ttl
if not renew then ex = math.max(1, at + ttl - now) end
-- The outcome goes into a memo slot of the hash (no command of its own): the first empty one, else
-- the one holding the outcome of a delivered input of the same partition with the lowest offset;
-- with none free, or an outcome over 4 KiB (MAX_SLOT_OUTCOME_BYTES: every read of the context reads the slots), into its
-- own key. (A slot write does not look for an outcome kept apart for this id once the finished
-- list dropped it: only a zombie racing a task more than `tasks remembered` back could have
-- written one.)
local slot, oldest = nil, nil
if mine then
  put('_a:' .. mine, tostring(math.max(offset, tonumber(cur[11] or '-1'))))
  if tid ~= '' and cur[12] ~= tid then put('_ai:' .. mine, tid) end
  for s = 1, 2 do
    if #ARGV[2] > 4096 then break end
    if not cur[5 + 2 * s] then slot = s; break end
    local p, o = string.match(cur[6 + 2 * s] or '', '^(.*):(%-?%d+)$')
    o = tonumber(o)
    if p ~= nil and p == mine and o <= delivered and (not oldest or o < oldest) then slot, oldest = s, o end
  end
end
if slot then
  put('_mt' .. slot, ARGV[1]); put('_mp' .. slot, place); put('_m' .. slot, ARGV[2])
elseif not redis.call('SET', KEYS[2], ARGV[2], 'EX', ex, 'NX') then
  return {0, redis.call('GET', KEYS[2]), ''}
end
-- In slices: Lua's stack holds some 8,000 values, and unpack puts all of them on it.
for i = 1, #set, 1000 do
  redis.call('HSET', KEYS[1], unpack(set, i, math.min(i + 999, #set)))
end
if renew then redis.call('EXPIRE', KEYS[1], ARGV[3]) end
return {1, tostring(version), slot and '1' or ''}
"#;

/// KEYS[1] a resource's context hash; ARGV the version floor, the TTL for a hash made here.
const RAISE: &str = r"
local v = tonumber(redis.call('HGET', KEYS[1], '_version') or '0')
if v >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], '_version', ARGV[1])
if redis.call('TTL', KEYS[1]) < 0 then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return 1
";

pub struct RedisStore {
    conn: RedisConn,
    prefix: String,
    config: ContextConfig,
    commit: Script,
    full: FullLists,
}

fn redis_err(e: redis::RedisError) -> StoreError {
    StoreError::Redis(e.to_string())
}

impl RedisStore {
    pub fn new(conn: RedisConn, prefix: &str, config: ContextConfig) -> Self {
        RedisStore {
            conn,
            prefix: prefix.to_string(),
            config,
            commit: Script::new(COMMIT),
            full: FullLists::default(),
        }
    }

    fn ctx_key(&self, k: &ResourceKey) -> String {
        ctx_key(&self.prefix, k)
    }

    /// Raises a resource's context version to at least `floor` (its hash made when missing, with
    /// the context's TTL). A recovery writes a resource's context from the results topic into an
    /// empty Redis: its versions would start again at 1, below those of proposals still on their
    /// way to resolve, whose staleness checks (`invalidated_by`: "a key changed after the version
    /// I saw") would then pass against facts written since. From a floor above every version used
    /// before, those facts count as newer, and such a proposal is stale (conservative).
    pub async fn raise_version(&self, k: &ResourceKey, floor: u64) -> Result<(), StoreError> {
        let mut c = self.conn.get().await?;
        let _: i64 = Script::new(RAISE)
            .key(self.ctx_key(k))
            .arg(floor)
            .arg(self.config.ttl_seconds)
            .invoke_async(&mut c)
            .await?;
        Ok(())
    }

    /// A task's outcome until its input is committed (the resource's hash slot).
    fn outcome_key(&self, k: &ResourceKey, task_id: &str) -> String {
        format!("{}:o:{task_id}", ctx_key(&self.prefix, k))
    }
}

fn ctx_key(prefix: &str, k: &ResourceKey) -> String {
    format!("{prefix}:ctx:{}", k.hash_tag())
}

/// The command that reads the context versions at which `keys` last changed on a resource (one
/// HMGET on its context hash), for a store that adds it to its own pipeline (resolve reads them with
/// its state in one round trip). Parse the reply with [`parse_key_versions`].
pub fn key_versions_cmd(prefix: &str, k: &ResourceKey, keys: &[String]) -> redis::Cmd {
    let mut c = redis::cmd("HMGET");
    c.arg(ctx_key(prefix, k));
    for key in keys {
        c.arg(format!("_v:{key}"));
    }
    c
}

/// The reply of [`key_versions_cmd`]: versions of the keys that were ever written.
pub fn parse_key_versions(
    keys: &[String],
    reply: redis::Value,
) -> Result<BTreeMap<String, u64>, StoreError> {
    let versions: Vec<Option<u64>> = redis::FromRedisValue::from_redis_value(reply)
        .map_err(|e| StoreError::corrupt("context key versions", e))?;
    Ok(keys
        .iter()
        .cloned()
        .zip(versions)
        .filter_map(|(k, v)| v.map(|v| (k, v)))
        .collect())
}

/// A resource's hash as read: its context, what it says of `task_id` (an outcome kept in the hash
/// by older versions, or finished) and whether its list of finished ids is full (holds `cap` or
/// once dropped one), so that an outcome may be stored for a task it does not name.
fn parse(
    fields: HashMap<String, String>,
    task_id: &str,
    cap: usize,
) -> Result<(Prior, Snapshot, bool), StoreError> {
    let mut snap = Snapshot::default();
    let mut prior = Prior::New;
    let mut done: Vec<String> = Vec::new();
    let mut dropped = false;
    // The memo slots: task id, input, outcome.
    let mut slots: [(Option<String>, Option<String>, Option<String>); MEMO_SLOTS] =
        Default::default();
    for (k, v) in fields {
        if k == "_version" {
            snap.version = v
                .parse()
                .map_err(|_| StoreError::Corrupt(format!("_version {v:?}")))?;
        } else if k == "_events" {
            let list: Vec<String> = serde_json::from_str(&v)
                .map_err(|e| StoreError::Corrupt(format!("_events: {e}")))?;
            snap.recent_events = list
                .iter()
                .map(|e| {
                    serde_json::from_str::<Value>(e)
                        .map_err(|x| StoreError::Corrupt(format!("event: {x}")))
                })
                .collect::<Result<_, _>>()?;
        } else if k == "_full" {
            dropped = true;
        } else if let Some(slot) = memo_field(&k, "_mt") {
            slots[slot].0 = Some(v);
        } else if let Some(slot) = memo_field(&k, "_mp") {
            slots[slot].1 = Some(v);
        } else if let Some(slot) = memo_field(&k, "_m") {
            slots[slot].2 = Some(v);
        } else if k == "_done" {
            done =
                serde_json::from_str(&v).map_err(|e| StoreError::Corrupt(format!("_done: {e}")))?;
        } else if let Some(partition) = k.strip_prefix("_a:") {
            let offset = v
                .parse()
                .map_err(|_| StoreError::Corrupt(format!("{k} {v:?}")))?;
            snap.applied.insert(partition.to_string(), offset);
        } else if let Some(partition) = k.strip_prefix("_ai:") {
            snap.applied_in.insert(partition.to_string(), v);
        } else if let Some(key) = k.strip_prefix("_v:") {
            let ver = v
                .parse()
                .map_err(|_| StoreError::Corrupt(format!("{k} {v:?}")))?;
            snap.key_versions.insert(key.to_string(), ver);
        } else if let Some(task) = k.strip_prefix("_o:") {
            // Written by versions that kept outcomes in the context hash.
            if task == task_id && !task_id.is_empty() {
                prior = Prior::Recorded(Box::new(recorded(&v)?));
            }
        } else if !k.starts_with('_') {
            let f: Fact = serde_json::from_str(&v)
                .map_err(|e| StoreError::Corrupt(format!("fact {k}: {e}")))?;
            snap.facts.insert(k, f);
        }
    }
    if let Some((_, input, outcome)) = slots
        .into_iter()
        .find(|(t, _, _)| !task_id.is_empty() && t.as_deref() == Some(task_id))
        .filter(|_| prior == Prior::New)
    {
        let outcome = outcome.ok_or_else(|| StoreError::Corrupt("_mt without _m".into()))?;
        prior = Prior::Kept {
            outcome: Box::new(recorded(&outcome)?),
            input: input.unwrap_or_default(),
        };
    }
    if prior == Prior::New && !task_id.is_empty() && done.iter().any(|t| t == task_id) {
        prior = Prior::Finished;
    }
    Ok((prior, snap, dropped || done.len() >= cap))
}

fn short() -> StoreError {
    StoreError::Corrupt("context reply too short".into())
}

fn recorded(v: &str) -> Result<Outcome, StoreError> {
    serde_json::from_str(v).map_err(|e| StoreError::Corrupt(format!("outcome: {e}")))
}

/// One ask of [`RedisStore::read_many`] as its first round trip left it.
struct FirstRead {
    prior: Prior,
    snap: Snapshot,
    /// The task's stored outcome, when it was asked for.
    stored: Option<Option<String>>,
    /// Whether the resource's finished list is full ([`parse`]).
    full: bool,
}

impl RedisStore {
    async fn query(&self, pipe: redis::Pipeline) -> Result<Vec<redis::Value>, StoreError> {
        let mut c = self.conn.get().await?;
        pipe.query_async(&mut c).await.map_err(redis_err)
    }
}

impl ContextStore for RedisStore {
    async fn snapshot(&self, key: &ResourceKey) -> Result<Snapshot, StoreError> {
        Ok(self.read(key, "").await?.1)
    }

    async fn read(
        &self,
        key: &ResourceKey,
        task_id: &str,
    ) -> Result<(Prior, Snapshot), StoreError> {
        let mut r = self.read_many(&[(key.clone(), task_id.to_string())]).await;
        r.pop()
            .unwrap_or_else(|| Err(StoreError::Corrupt("no reply".into())))
    }

    async fn read_many(
        &self,
        asks: &[(ResourceKey, String)],
    ) -> Vec<Result<(Prior, Snapshot), StoreError>> {
        use redis::FromRedisValue;
        if asks.is_empty() {
            return Vec::new();
        }
        // A task's stored outcome is asked for in the first round trip only when its resource's
        // finished list was full when last read ([`FullLists`]); otherwise only if the list read
        // names the task (a redelivery) or turns out full, in a second one.
        let cap = self.config.remember_tasks.max(1);
        let keys: Vec<String> = asks.iter().map(|(k, _)| self.ctx_key(k)).collect();
        let hinted: Vec<bool> = asks
            .iter()
            .zip(&keys)
            .map(|((_, t), key)| !t.is_empty() && self.full.full(key))
            .collect();
        let mut pipe = redis::pipe();
        for (((k, t), key), &h) in asks.iter().zip(&keys).zip(&hinted) {
            pipe.hgetall(key);
            if h {
                pipe.get(self.outcome_key(k, t));
            }
        }
        let replies = match self.query(pipe).await {
            Ok(r) => r,
            Err(e) => return asks.iter().map(|_| Err(e.clone())).collect(),
        };
        let mut r = replies.into_iter();
        let mut first: Vec<Result<FirstRead, StoreError>> = asks
            .iter()
            .zip(&keys)
            .zip(&hinted)
            .map(|(((_, t), key), &h)| {
                // Both replies of the ask are taken before either is parsed (the next ask's
                // replies stay aligned whatever fails).
                let hash = r.next();
                let outcome = if h { Some(r.next()) } else { None };
                let fields: HashMap<String, String> =
                    FromRedisValue::from_redis_value(hash.ok_or_else(short)?)
                        .map_err(|e| StoreError::corrupt("context", e))?;
                let stored = match outcome {
                    Some(v) => Some(
                        FromRedisValue::from_redis_value(v.ok_or_else(short)?)
                            .map_err(|e| StoreError::corrupt("outcome", e))?,
                    ),
                    None => None,
                };
                let (prior, snap, full) = parse(fields, t, cap)?;
                if !t.is_empty() {
                    self.full.note(key, full);
                }
                Ok(FirstRead {
                    prior,
                    snap,
                    stored,
                    full,
                })
            })
            .collect();
        let second: Vec<usize> = first
            .iter()
            .enumerate()
            .filter(|(i, f)| {
                f.as_ref().is_ok_and(|f| {
                    f.stored.is_none()
                        && !asks[*i].1.is_empty()
                        && (f.prior == Prior::Finished || (f.prior == Prior::New && f.full))
                })
            })
            .map(|(i, _)| i)
            .collect();
        if !second.is_empty() {
            let mut pipe = redis::pipe();
            for &i in &second {
                pipe.get(self.outcome_key(&asks[i].0, &asks[i].1));
            }
            let got = self.query(pipe).await;
            for (n, &i) in second.iter().enumerate() {
                let stored = match &got {
                    Ok(v) => v.get(n).cloned().ok_or_else(short).and_then(|v| {
                        FromRedisValue::from_redis_value(v)
                            .map_err(|e| StoreError::corrupt("outcome", e))
                    }),
                    Err(e) => Err(e.clone()),
                };
                match stored {
                    Ok(s) => {
                        if let Ok(f) = &mut first[i] {
                            f.stored = Some(s);
                        }
                    }
                    Err(e) => first[i] = Err(e),
                }
            }
        }
        first
            .into_iter()
            .map(|f| {
                let f = f?;
                Ok(match f.stored.flatten() {
                    Some(v) => (Prior::Recorded(Box::new(recorded(&v)?)), f.snap),
                    None => (f.prior, f.snap),
                })
            })
            .collect()
    }

    async fn commit(
        &self,
        key: &ResourceKey,
        task_id: &str,
        facts: &[(String, Fact)],
        event: Option<&Value>,
        outcome: &Outcome,
        place: Option<&Place>,
    ) -> Result<CommitResult, StoreError> {
        let mut c = self.conn.get().await?;
        let outcome_json =
            serde_json::to_string(outcome).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let mut inv = self.commit.prepare_invoke();
        inv.key(self.ctx_key(key))
            .key(self.outcome_key(key, task_id))
            .arg(task_id)
            .arg(outcome_json)
            .arg(self.config.ttl_seconds)
            .arg(event.map(Value::to_string).unwrap_or_default())
            .arg(self.config.max_events)
            .arg(self.config.remember_tasks)
            .arg(facts.len());
        for (k, f) in facts {
            let v = serde_json::to_string(f).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            inv.arg(k).arg(v);
        }
        inv.arg(chrono::Utc::now().timestamp())
            .arg(place.map(Place::tag).unwrap_or_default())
            .arg(place.map_or(-1, |p| p.delivered))
            .arg(place.map(|p| p.topic_id.as_str()).unwrap_or_default());
        let (applied, value, kept): (i64, String, String) =
            inv.invoke_async(&mut c).await.map_err(redis_err)?;
        if applied == 2 {
            Ok(CommitResult::Finished)
        } else if applied == 1 {
            Ok(CommitResult::Applied {
                version: value
                    .parse()
                    .map_err(|_| StoreError::Corrupt(format!("version {value:?}")))?,
                kept: kept == "1",
            })
        } else {
            let o: Outcome = serde_json::from_str(&value)
                .map_err(|e| StoreError::Corrupt(format!("outcome: {e}")))?;
            Ok(CommitResult::AlreadyRecorded(Box::new(o)))
        }
    }

    async fn forget(&self, tasks: &[(ResourceKey, String)]) -> Result<(), StoreError> {
        if tasks.is_empty() {
            return Ok(());
        }
        let pipe = self
            .conn
            .delete_keys(tasks.iter().map(|(k, t)| self.outcome_key(k, t)));
        let mut c = self.conn.get().await?;
        pipe.query_async::<()>(&mut c).await.map_err(redis_err)
    }
}
