//! The resolve state of each resource: the only module that reads or writes it.
//!
//! Per resource: a revision (every write is a compare-and-set on it), the fencing-token counter, the
//! rules' [`ResourceState`], the last proposal offset applied per partition (fences zombie owners),
//! its approvals, each proposal's [`Decided`] record while a redelivery may need it (so a
//! redelivery emits the same records instead of deciding again), and the ids of the most recently
//! decided proposals (so a copy of one further down the topic is skipped once its record is
//! forgotten). Two indexes find approvals: the open ones by expiry, and each one's resource by id.
//!
//! [`RedisResourceStore`] keeps it in Redis: `<prefix>:res:{t/r}` (hash: `rev`, `token`, `state`,
//! `applied:<partition>` with `applied_in:<partition>` (where those offsets are from: topic and id,
//! [`crate::kafka::topic_id::source`]), `approval:<id>`, `recent`, `recent_full` once that list dropped an id, and
//! two memo slots `_dt<s>`, `_dp<s>`, `_d<s>`: a proposal's id, input and decision, see [`Place`]);
//! when no slot is free, beside it `<prefix>:res:{t/r}:d:<proposal id>` (its decision, until committed,
//! never longer than the hash; apart so that reading the resource never reads the decisions of a
//! busy resource's uncommitted proposals), `<prefix>:approvals:open` (sorted set by expiry) and
//! `<prefix>:approvals:where` (id → resource). A proposal costs one read (`HGETALL` — none when
//! this instance holds a copy of the record from its last read or write, [`Copies`] — plus
//! `HMGET` of context versions when its action has staleness keys, in one pipeline; a `GET` of a
//! decision kept apart only where one can exist: the proposal is among the recent ones and not in
//! a slot, or their list is full — see [`FullLists`]), one compare-and-set script (`HMGET`,
//! `HSET`; `SET` only for a decision kept apart; `EXPIRE` only when a sixteenth of the TTL passed
//! since it was last renewed, field `_x`) and, for a decision kept apart, a share of one `DEL` once
//! committed.
//! [`MemoryResourceStore`] is its twin for unit tests; [`contract`] runs against both.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use redis::Script;

use super::apply::{Change, Decided, StoredApproval};
use super::rules::ResourceState;
use crate::context::memory::MemoryStore;
use crate::context::ContextStore;
use crate::records::ApprovalData;
use crate::store::{memo_field, FullLists, Place, RedisConn, ResourceKey, StoreError, MEMO_SLOTS};

/// A resource's resolve record as loaded.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ResourceRecord {
    /// Revision: every write is a compare-and-set on it.
    pub rev: u64,
    /// Last fencing token handed out.
    pub token: u64,
    pub state: ResourceState,
    /// Last proposal offset applied, per proposals partition.
    pub applied: HashMap<i32, i64>,
    /// Where each of those offsets is from ([`crate::kafka::topic_id::source`]: topic and id),
    /// where noted: an offset of another topic, or of another incarnation of it, fences nothing.
    pub applied_in: HashMap<i32, String>,
    pub approvals: BTreeMap<String, StoredApproval>,
    /// Ids of the most recently decided proposals, most recent first.
    pub recent: Vec<String>,
    /// The decisions in the resource's memo slots ([`Place`]).
    pub kept: [Option<KeptDecision>; MEMO_SLOTS],
}

impl ResourceRecord {
    /// Whether a proposal from `source`'s partition `partition` at `offset` is at or below the
    /// offset applied from there: a newer owner went past it.
    pub fn applied_past(&self, partition: i32, offset: i64, source: &str) -> bool {
        self.applied.get(&partition).is_some_and(|a| *a >= offset)
            && crate::kafka::topic_id::same_source(
                self.applied_in.get(&partition).map(String::as_str),
                source,
            )
    }

    fn apply(&mut self, (p, o, source): (i32, i64, &str)) {
        self.applied.insert(p, o);
        self.applied_in.insert(p, source.to_string());
    }

    /// The decision of `proposal_id` in one of the memo slots.
    pub fn kept_decision(&self, proposal_id: Option<&str>) -> Option<&KeptDecision> {
        self.kept
            .iter()
            .flatten()
            .find(|kd| Some(kd.proposal_id.as_str()) == proposal_id)
    }
}

/// A decision kept in one of its resource's memo slots ([`Place`]): fields `_dt<s>` (proposal
/// id), `_dp<s>` (its input, `<topic>:<partition>:<offset>`) and `_d<s>` (the decision) of the
/// resource's hash, s = 1, 2.
#[derive(Debug, Clone, PartialEq)]
pub struct KeptDecision {
    pub proposal_id: String,
    pub input: String,
    /// The [`Decided`] as stored (JSON): parsed only when asked for.
    pub decided: String,
}

/// What one load returns.
#[derive(Debug, Clone, Default)]
pub struct Loaded {
    /// The stored decision of the proposal asked about (a redelivery), if any.
    pub decided: Option<Decided>,
    /// Where `decided` came from a memo slot of the resource: the input it was decided for
    /// (`<topic>:<partition>:<offset>`; [`Place::delivered_tag`] says whether this is a copy).
    pub decided_at: Option<String>,
    /// The proposal asked about was decided and its decision forgotten (its offset committed): a
    /// copy further down the topic.
    pub finished: bool,
    pub record: ResourceRecord,
    /// The context version at which each asked-for context key last changed.
    pub key_versions: BTreeMap<String, u64>,
}

/// A write: the decision's [`Change`] plus where it came from.
#[derive(Debug, Clone, Copy)]
pub struct Write<'a> {
    pub change: &'a Change,
    /// The proposal's (partition, offset, [`crate::kafka::topic_id::source`]): later loads fence
    /// anything at or below it from there.
    pub applied: Option<(i32, i64, &'a str)>,
    /// The decision to remember by proposal id.
    pub decision: Option<(&'a str, &'a Decided)>,
    /// Where the proposal's record is: the decision may be kept in a memo slot of the resource.
    pub place: Option<&'a Place>,
}

/// Where resolve state lives. Methods return boxed futures so the store can be shared as
/// `Arc<dyn ResourceStore>` by the stage, the approvals service and the CLI.
pub trait ResourceStore: Send + Sync + 'static {
    /// The record, the versions of `keys` in the resource's context, and the stored decision of
    /// `proposal_id` — in one round trip (two when the proposal may have been decided before: it is
    /// among the recent ones, or their list is full). With a `proposal_id` the record may be the
    /// store's own copy and out of date (written elsewhere since): [`ResourceStore::commit`] then
    /// returns false, and the caller loads again and asks again whether the proposal was decided.
    fn load<'a>(
        &'a self,
        k: &'a ResourceKey,
        keys: &'a [String],
        proposal_id: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Loaded, StoreError>>;

    /// Drops this instance's copy of the resource's record (see [`ResourceStore::load`]): the next
    /// load reads the store. For an answer that must not rest on a copy out of date — one that
    /// writes nothing, so no failed compare-and-set would show it was.
    fn forget_copy(&self, _k: &ResourceKey) {}

    /// Writes `w` if the record is still at revision `rev`; false when it moved (decide again).
    fn commit<'a>(
        &'a self,
        k: &'a ResourceKey,
        rev: u64,
        w: Write<'a>,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;

    /// Adds approvals to the open index (idempotent).
    fn index_open<'a>(
        &'a self,
        approvals: &'a [&'a ApprovalData],
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Removes an approval from the open index (it stays findable by id).
    fn index_close<'a>(&'a self, approval_id: &'a str) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Open approvals with their expiry, soonest first.
    fn open(&self) -> BoxFuture<'_, Result<Vec<(String, i64)>, StoreError>>;

    /// The resource an approval belongs to.
    fn locate<'a>(
        &'a self,
        approval_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<ResourceKey>, StoreError>>;

    /// [`ResourceStore::locate`] for many approvals in one round trip.
    fn locate_many<'a>(
        &'a self,
        approval_ids: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<Option<ResourceKey>>, StoreError>>;

    /// Removes from the approvals' id index up to about `count` entries whose approval is gone from
    /// its resource (dropped `keep_decided_seconds` after its decision, or the resource's record
    /// expired), going on from where the previous call stopped; returns how many it removed. The
    /// sweeper calls it, so the index does not grow with every approval ever made.
    fn prune_index(&self, count: usize) -> BoxFuture<'_, Result<usize, StoreError>>;

    /// Notes that a decision's records are about to be produced outside Kafka's redelivery (the
    /// HTTP API, the CLI, the expiry sweeper): until [`ResourceStore::outbox_done`], a sweeper
    /// produces them again, so a crash in between leaves no hole in the audit chain. An entry there
    /// already moves to `at` when that is later (never earlier): a sweeper that saw the older entry
    /// then leaves it ([`ResourceStore::outbox_done_at`]).
    fn outbox_add<'a>(
        &'a self,
        approval_id: &'a str,
        at: i64,
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// The records of this approval's decision were produced.
    fn outbox_done<'a>(&'a self, approval_id: &'a str) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Removes the entry only if it is still at `at` (as [`ResourceStore::outbox_due`] listed it):
    /// a sweeper that found nothing to produce does not take away the entry of a decision made
    /// since, which added it again.
    fn outbox_done_at<'a>(
        &'a self,
        approval_id: &'a str,
        at: i64,
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Approvals in the outbox since before `before` (seconds since the epoch), oldest first, with
    /// their times.
    fn outbox_due(&self, before: i64) -> BoxFuture<'_, Result<Vec<(String, i64)>, StoreError>>;

    /// Whether this approval's decision is in the outbox (its records not yet all produced).
    fn outbox_has<'a>(&'a self, approval_id: &'a str) -> BoxFuture<'a, Result<bool, StoreError>>;

    /// Leaves what a decision made outside a running switchyard (the CLI) counts in the metrics,
    /// for a running one to count ([`ResourceStore::tallies_take`]). At most [`MAX_TALLIES`] are
    /// kept (the oldest go first), for a day, should no instance run the sweeper.
    fn tally_add<'a>(&'a self, tally: &'a str) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Takes (removes) up to `max` tallies left by [`ResourceStore::tally_add`], oldest first;
    /// each is taken by exactly one caller.
    fn tallies_take(&self, max: usize) -> BoxFuture<'_, Result<Vec<String>, StoreError>>;

    /// Forgets the stored decisions of proposals whose offsets are committed (their records were
    /// delivered); they stay among the recent ones.
    fn forget<'a>(
        &'a self,
        decided: &'a [(ResourceKey, String)],
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Whether the store still holds switchyard's state, before an absence is believed (an
    /// approval not found is dead-lettered or answered 404): [`StoreError::Lost`] when Redis' epoch
    /// marker is gone — a Redis that came back empty, in the second before the epoch watcher
    /// notices. Then the caller waits like every other user of a lost state. (A Redis store
    /// checks only when [`RedisResourceStore::guarded`].)
    fn confirm_state(&self) -> BoxFuture<'_, Result<(), StoreError>>;
}

/// `outbox_add`: the entry at ARGV[2] unless it is there at a later time already.
const OUTBOX_LATER: &str = r"
local at = redis.call('ZSCORE', KEYS[1], ARGV[1])
if (not at) or tonumber(at) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
end
return 0
";

/// `outbox_done_at`: removes the entry only while it is at ARGV[2].
const OUTBOX_DONE_AT: &str = r"
local at = redis.call('ZSCORE', KEYS[1], ARGV[1])
if at and tonumber(at) == tonumber(ARGV[2]) then
  redis.call('ZREM', KEYS[1], ARGV[1])
end
return 0
";

const CAS: &str = r#"
-- Returns {0} when the revision moved, else {1, the recent list as stored, '1' once it dropped an id,
-- the memo slot (1, 2) the decision is kept in or ''}.
-- KEYS[1] = resource hash, KEYS[2] = the proposal's decision apart; ARGV[1] = expected rev,
-- ARGV[2] = ttl, ARGV[3] = proposal id ('' = none), ARGV[4] = its decision, ARGV[5] = proposals
-- remembered, ARGV[6] = now (unix seconds), ARGV[7] = the proposal's place
-- ('<topic>:<partition>:<offset>', '' = none), ARGV[8] = the last offset of its partition known
-- delivered (crate::store::Place), ARGV[9] = n, ARGV[10..9+n] = approvals to drop, then field,
-- value pairs; KEYS[3] (guarded) = the epoch marker (on a Redis Cluster the slot marker of KEYS[1]'s
-- slot): a record about to be created on a Redis without it (one that came back empty) is refused,
-- {-1}. (A record that exists was created so.)
local cur = redis.call('HMGET', KEYS[1], 'rev', 'recent', '_x', 'recent_full', '_dt1', '_dp1', '_dt2', '_dp2')
if KEYS[3] and not cur[1] and redis.call('EXISTS', KEYS[3]) == 0 then return {-1} end
local rev = tonumber(cur[1] or '0')
if rev ~= tonumber(ARGV[1]) then return {0} end
local set = {'rev', tostring(rev + 1)}
local drop = tonumber(ARGV[9])
for i = 10 + drop, #ARGV do set[#set + 1] = ARGV[i] end
for i = 10, 9 + drop do redis.call('HDEL', KEYS[1], 'approval:' .. ARGV[i]) end
-- The TTL is renewed when a sixteenth of it passed since it last was, or it changed (`_x` =
-- '<when>:<ttl>' of the last renewal), not on every write.
local ttl, now = tonumber(ARGV[2]), tonumber(ARGV[6])
local at, was = string.match(cur[3] or '', '^(%d+):(%d+)$')
at, was = tonumber(at), tonumber(was)
local renew = ttl > 0 and (not at or was ~= ttl or now < at or now - at >= ttl / 16)
if renew then set[#set + 1] = '_x'; set[#set + 1] = ARGV[6] .. ':' .. ARGV[2] end
local kept = ''
if ARGV[3] ~= '' then
  -- The decision goes into a memo slot of the hash (no command of its own): the first empty one,
  -- else the one holding the decision of a delivered input of the same partition with the lowest
  -- offset; with none free, into its own key.
  local slot, oldest = nil, nil
  if ARGV[7] ~= '' then
    local mine = string.match(ARGV[7], '^(.*):%-?%d+$')
    for s = 1, 2 do
      if not cur[3 + 2 * s] then slot = s; break end
      local p, o = string.match(cur[4 + 2 * s] or '', '^(.*):(%-?%d+)$')
      o = tonumber(o)
      if p ~= nil and p == mine and o <= tonumber(ARGV[8]) and (not oldest or o < oldest) then slot, oldest = s, o end
    end
  end
  if slot then
    kept = tostring(slot)
    set[#set + 1] = '_dt' .. slot; set[#set + 1] = ARGV[3]
    set[#set + 1] = '_dp' .. slot; set[#set + 1] = ARGV[7]
    set[#set + 1] = '_d' .. slot; set[#set + 1] = ARGV[4]
  elseif ttl > 0 then
    -- The decision never outlives the hash (else a reader would find no id naming it).
    local ex = ttl
    if not renew then ex = math.max(1, at + ttl - now) end
    redis.call('SET', KEYS[2], ARGV[4], 'EX', ex)
  else
    redis.call('SET', KEYS[2], ARGV[4])
  end
  local list, dropped = {ARGV[3]}, false
  if cur[2] then
    for _, x in ipairs(cjson.decode(cur[2])) do
      if x ~= ARGV[3] then
        if #list >= tonumber(ARGV[5]) then dropped = true; break end
        list[#list + 1] = x
      end
    end
  end
  set[#set + 1] = 'recent'
  set[#set + 1] = cjson.encode(list)
  -- Once an id was dropped, a decision may be stored for one the list does not name: readers
  -- ask for it (whatever the configured count is now).
  if dropped and not cur[4] then
    set[#set + 1] = 'recent_full'
    set[#set + 1] = '1'
  end
end
redis.call('HSET', KEYS[1], unpack(set))
if renew then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
-- What the writer's copy of the record needs: the list as now stored, whether it ever dropped, and
-- whether the decision went into the slot.
local recent, full = cur[2] or '', cur[4] and '1' or '0'
for i = 1, #set, 2 do
  if set[i] == 'recent' then recent = set[i + 1] elseif set[i] == 'recent_full' then full = '1' end
end
return {1, recent, full, kept}
"#;

/// Removes approvals' id index entries that still hold the value read: KEYS[1] = the index,
/// ARGV = id, value pairs. Returns how many it removed.
const UNINDEX: &str = r#"
local n = 0
for i = 1, #ARGV, 2 do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[i + 1] then
    redis.call('HDEL', KEYS[1], ARGV[i])
    n = n + 1
  end
end
return n
"#;

/// Resolve state in Redis.
pub struct RedisResourceStore {
    conn: RedisConn,
    prefix: String,
    cas: Script,
    unindex: Script,
    /// Resource hashes expire this long after their last write.
    ttl: u64,
    /// Decided proposals remembered per resource once their decisions are forgotten.
    remember: usize,
    full: FullLists,
    copies: Copies,
    /// Where [`ResourceStore::prune_index`] goes on (an `HSCAN` cursor; 0 starts a pass).
    index_cursor: std::sync::atomic::AtomicU64,
    /// Whether a record's creation checks the epoch (or slot) marker ([`RedisResourceStore::guarded`]).
    guarded: bool,
}

/// This instance's copy of the records it last read or wrote, by resource hash key, for the loads
/// of proposals ([`ResourceStore::load`] with a proposal id; the resolve stage owns their
/// resources' partitions, so the copy is almost always current). A copy is only ever a guess: the
/// commit's compare-and-set on the revision refuses a write decided on one that is out of date (an
/// approval decided elsewhere, another owner meanwhile, an expired hash), the copy is dropped and
/// the caller loads again from Redis. A copy is used only while fresh ([`Copies::FRESH`] after
/// this instance's own write of it; one only read is the base for the next write) and of
/// Redis' current [`RedisConn::generation`] (not across a Redis that lost its state and was
/// recovered, where a revision may repeat). At most [`Copies::MAX`] resources (past that an arbitrary
/// one is dropped): the copies pay off on resources that see many proposals, and each costs
/// memory (with 10,000 copies the bench's peak RSS rose by ~55 MB).
#[derive(Debug, Default)]
struct Copies(Mutex<HashMap<String, Kept>>);

#[derive(Debug, Clone)]
struct Kept {
    record: ResourceRecord,
    /// The recent list is full or ever dropped an id (see [`FullLists`]).
    full: bool,
    /// When this instance last wrote it (none: only read, not usable until written).
    wrote: Option<std::time::Instant>,
    /// [`RedisConn::generation`] when it was read.
    generation: u64,
}

impl Kept {
    /// Written by this instance within [`Copies::FRESH`], under Redis' current `generation`.
    fn usable(&self, generation: u64) -> bool {
        self.wrote.is_some_and(|t| t.elapsed() < Copies::FRESH) && self.generation == generation
    }
}

impl Copies {
    const MAX: usize = 1_024;
    /// A copy is used only this long after this instance's own last write of it: a resource's
    /// hash lives most of a day past any write (its TTL is at least a day, renewed every
    /// sixteenth), so within this time it cannot have expired and been written anew up to the
    /// copy's revision.
    const FRESH: std::time::Duration = std::time::Duration::from_secs(600);

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Kept>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The copy of `key`, if it is recent and of Redis' current `generation`.
    fn get(&self, key: &str, generation: u64) -> Option<Kept> {
        self.lock()
            .get(key)
            .filter(|c| c.usable(generation))
            .cloned()
    }

    /// Keeps what a read from Redis found, unless a newer copy is already kept.
    fn read(&self, key: &str, copy: Kept) {
        let mut m = self.lock();
        if m.get(key)
            .is_some_and(|c| c.record.rev >= copy.record.rev && c.usable(copy.generation))
        {
            return;
        }
        if m.len() >= Self::MAX && !m.contains_key(key) {
            if let Some(k) = m.keys().next().cloned() {
                m.remove(&k);
            }
        }
        m.insert(key.to_string(), copy);
    }

    /// Applies a write that moved the record from `rev` to `rev + 1`; a copy of another revision
    /// (or none) is dropped rather than guessed.
    fn wrote(
        &self,
        key: &str,
        rev: u64,
        w: &Write<'_>,
        written: (Vec<String>, bool, Option<(usize, KeptDecision)>),
    ) {
        let (recent, full, kept) = written;
        let mut m = self.lock();
        let Some(c) = m.get_mut(key).filter(|c| c.record.rev == rev) else {
            m.remove(key);
            return;
        };
        let r = &mut c.record;
        r.rev = rev + 1;
        r.token = w.change.token;
        r.state = w.change.state.clone();
        if let Some(a) = w.applied {
            r.apply(a);
        }
        for id in &w.change.forget_approvals {
            r.approvals.remove(id);
        }
        for a in &w.change.approvals {
            r.approvals
                .insert(a.approval.approval_id.clone(), a.clone());
        }
        r.recent = recent;
        if let Some((slot, kd)) = kept {
            r.kept[slot] = Some(kd);
        }
        c.full = full;
        c.wrote = Some(std::time::Instant::now());
    }

    fn discard(&self, key: &str) {
        self.lock().remove(key);
    }
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::corrupt(what, e)
}

impl RedisResourceStore {
    pub fn new(conn: RedisConn, prefix: &str, ttl: u64, remember: usize) -> Self {
        RedisResourceStore {
            conn,
            prefix: prefix.into(),
            cas: Script::new(CAS),
            unindex: Script::new(UNINDEX),
            ttl,
            remember: remember.max(1),
            full: FullLists::default(),
            copies: Copies::default(),
            index_cursor: Default::default(),
            guarded: false,
        }
    }

    /// Trusts Redis' state only while it has its epoch marker (what a running switchyard and the
    /// CLI's decisions use; `switchyard recover`, which writes before the marker, does not): a write
    /// on a single Redis that came back empty is refused at once ([`StoreError::Lost`]), not from the
    /// epoch watcher's next look a second later — a decision made on the empty state (no dedupe,
    /// no conflict seen) would be kept as the proposal's decision and emitted after the recovery,
    /// and its record would stand where recovery rebuilds. An absence
    /// (an approval not found) is believed only with the marker there, on a cluster too
    /// ([`ResourceStore::confirm_state`]). A cluster keeps the marker on another slot than a
    /// resource's: there the creation checks the slot marker of the resource's slot
    /// ([`crate::store::RedisConn::guard_key`]).
    pub fn guarded(mut self) -> Self {
        self.guarded = true;
        self
    }

    fn res_key(&self, k: &ResourceKey) -> String {
        format!("{}:res:{}", self.prefix, k.hash_tag())
    }
    /// A proposal's decision until its offset is committed (the resource's hash slot).
    fn decision_key(&self, k: &ResourceKey, proposal_id: &str) -> String {
        format!("{}:res:{}:d:{proposal_id}", self.prefix, k.hash_tag())
    }
    fn open_key(&self) -> String {
        format!("{}:approvals:open", self.prefix)
    }
    fn where_key(&self) -> String {
        format!("{}:approvals:where", self.prefix)
    }
    fn outbox_key(&self) -> String {
        format!("{}:approvals:outbox", self.prefix)
    }

    /// Runs one of the outbox's scripts on entry `approval_id` and time `at`.
    async fn outbox_script(
        &self,
        script: &str,
        approval_id: &str,
        at: i64,
    ) -> Result<(), StoreError> {
        let mut c = self.conn.get().await?;
        Ok(redis::Script::new(script)
            .key(self.outbox_key())
            .arg(approval_id)
            .arg(at)
            .invoke_async::<()>(&mut c)
            .await?)
    }
    fn tallies_key(&self) -> String {
        format!("{}:approvals:tallies", self.prefix)
    }

    async fn load_impl(
        &self,
        k: &ResourceKey,
        keys: &[String],
        proposal_id: Option<&str>,
    ) -> Result<Loaded, StoreError> {
        use redis::FromRedisValue;
        let res_key = self.res_key(k);
        // A proposal's load starts from this instance's copy when it has one ([`Copies`]): then
        // only the context versions and, where one can exist, the stored decision are read.
        let generation = self.conn.generation();
        let copy = proposal_id.and_then(|_| self.copies.get(&res_key, generation));
        let mut c = self.conn.get().await?;
        // The proposal's stored decision is asked for up front when the copy names it or its list
        // is full, or without a copy when the resource's recent list was full when last read
        // ([`FullLists`]); otherwise only if the list read names the proposal (a redelivery) or
        // turns out full, in a second round trip.
        let ask = |recent: &[String], full: bool| {
            proposal_id.is_some_and(|id| full || recent.iter().any(|r| r == id))
        };
        let in_slot = |r: &ResourceRecord| r.kept_decision(proposal_id).is_some();
        let hinted = match &copy {
            Some(cp) => ask(&cp.record.recent, cp.full) && !in_slot(&cp.record),
            None => proposal_id.is_some() && self.full.full(&res_key),
        };
        let mut pipe = redis::pipe();
        if copy.is_none() {
            pipe.hgetall(&res_key);
        }
        if hinted {
            pipe.get(self.decision_key(k, proposal_id.unwrap_or("")));
        }
        if !keys.is_empty() {
            pipe.add_command(crate::context::redis::key_versions_cmd(
                &self.prefix,
                k,
                keys,
            ));
        }
        let replies: Vec<redis::Value> = if copy.is_none() || hinted || !keys.is_empty() {
            pipe.query_async(&mut c).await?
        } else {
            Vec::new()
        };
        let mut replies = replies.into_iter();
        let mut next = || replies.next().unwrap_or(redis::Value::Nil);
        let (l, full, mut decided) = match copy {
            Some(cp) => (cp.record, cp.full, None),
            None => {
                let hash: HashMap<String, String> =
                    FromRedisValue::from_redis_value(next()).map_err(|e| corrupt("state", e))?;
                let (l, dropped, legacy) = self.parse_record(hash, proposal_id)?;
                let full = dropped || l.recent.len() >= self.remember;
                if proposal_id.is_some() {
                    self.full.note(&res_key, full);
                    self.copies.read(
                        &res_key,
                        Kept {
                            record: l.clone(),
                            full,
                            wrote: None,
                            generation,
                        },
                    );
                }
                (l, full, legacy)
            }
        };
        if hinted {
            let v: Option<String> =
                FromRedisValue::from_redis_value(next()).map_err(|e| corrupt("decision", e))?;
            if let Some(v) = v {
                decided = Some(serde_json::from_str(&v).map_err(|e| corrupt("decision", e))?);
            }
        }
        let key_versions = if keys.is_empty() {
            BTreeMap::new()
        } else {
            crate::context::redis::parse_key_versions(keys, next())?
        };
        let mut decided_at = None;
        if let Some(kd) = l.kept_decision(proposal_id).filter(|_| decided.is_none()) {
            decided = Some(serde_json::from_str(&kd.decided).map_err(|e| corrupt("decision", e))?);
            decided_at = Some(kd.input.clone());
        }
        if let Some(id) = proposal_id {
            if !hinted && decided.is_none() && ask(&l.recent, full) {
                let v: Option<String> = redis::cmd("GET")
                    .arg(self.decision_key(k, id))
                    .query_async(&mut c)
                    .await?;
                if let Some(v) = v {
                    decided = Some(serde_json::from_str(&v).map_err(|e| corrupt("decision", e))?);
                }
            }
        }
        let finished =
            decided.is_none() && proposal_id.is_some_and(|id| l.recent.iter().any(|r| r == id));
        Ok(Loaded {
            decided,
            decided_at,
            finished,
            record: l,
            key_versions,
        })
    }

    /// A resource hash as read: the record, whether its recent list ever dropped an id, and the
    /// decision of `proposal_id` where an older version kept decisions in the hash.
    fn parse_record(
        &self,
        hash: HashMap<String, String>,
        proposal_id: Option<&str>,
    ) -> Result<(ResourceRecord, bool, Option<Decided>), StoreError> {
        let mut l = ResourceRecord::default();
        let mut dropped = false;
        let mut decided = None;
        // The memo slots: proposal id, input, decision.
        let mut slots: [(Option<String>, Option<String>, Option<String>); MEMO_SLOTS] =
            Default::default();
        for (f, v) in hash {
            if let Some(i) = memo_field(&f, "_dt") {
                slots[i].0 = Some(v);
                continue;
            } else if let Some(i) = memo_field(&f, "_dp") {
                slots[i].1 = Some(v);
                continue;
            } else if let Some(i) = memo_field(&f, "_d") {
                slots[i].2 = Some(v);
                continue;
            }
            match f.as_str() {
                "recent_full" => dropped = true,
                "rev" => l.rev = v.parse().map_err(|e| corrupt("rev", e))?,
                "token" => l.token = v.parse().map_err(|e| corrupt("token", e))?,
                "state" => l.state = serde_json::from_str(&v).map_err(|e| corrupt("state", e))?,
                "recent" => {
                    l.recent = serde_json::from_str(&v).map_err(|e| corrupt("recent", e))?
                }
                _ => {
                    if let Some(p) = f.strip_prefix("applied_in:") {
                        l.applied_in
                            .insert(p.parse().map_err(|e| corrupt("applied_in", e))?, v);
                    } else if let Some(p) = f.strip_prefix("applied:") {
                        l.applied.insert(
                            p.parse().map_err(|e| corrupt("applied", e))?,
                            v.parse().map_err(|e| corrupt("applied", e))?,
                        );
                    } else if let Some(id) = f.strip_prefix("d:") {
                        // Written by versions that kept decisions in the resource hash.
                        if Some(id) == proposal_id {
                            decided =
                                Some(serde_json::from_str(&v).map_err(|e| corrupt("decision", e))?);
                        }
                    } else if let Some(id) = f.strip_prefix("approval:") {
                        l.approvals.insert(
                            id.to_string(),
                            serde_json::from_str(&v).map_err(|e| corrupt("approval", e))?,
                        );
                    }
                }
            }
        }
        for (i, (id, input, decided)) in slots.into_iter().enumerate() {
            if let Some(proposal_id) = id {
                l.kept[i] = Some(KeptDecision {
                    proposal_id,
                    input: input.unwrap_or_default(),
                    decided: decided.ok_or_else(|| StoreError::Corrupt("_dt without _d".into()))?,
                });
            }
        }
        Ok((l, dropped, decided))
    }

    async fn commit_impl(
        &self,
        k: &ResourceKey,
        rev: u64,
        w: Write<'_>,
    ) -> Result<bool, StoreError> {
        let enc = |what: &str, e: serde_json::Error| corrupt(what, e);
        let mut fields: Vec<(String, String)> = Vec::with_capacity(3 + w.change.approvals.len());
        for a in &w.change.approvals {
            fields.push((
                format!("approval:{}", a.approval.approval_id),
                serde_json::to_string(a).map_err(|e| enc("approval", e))?,
            ));
        }
        fields.push((
            "state".into(),
            serde_json::to_string(&w.change.state).map_err(|e| enc("state", e))?,
        ));
        fields.push(("token".into(), w.change.token.to_string()));
        if let Some((p, o, source)) = w.applied {
            fields.push((format!("applied:{p}"), o.to_string()));
            fields.push((format!("applied_in:{p}"), source.to_string()));
        }
        let (id, djson) = match w.decision {
            Some((id, d)) => (
                id,
                serde_json::to_string(d).map_err(|e| enc("decision", e))?,
            ),
            None => ("", String::new()),
        };
        let mut inv = self.cas.prepare_invoke();
        inv.key(self.res_key(k)).key(self.decision_key(k, id));
        if let Some(guard) = self
            .guarded
            .then(|| self.conn.guard_key(&self.prefix, &self.res_key(k)))
            .flatten()
        {
            inv.key(guard);
        }
        inv.arg(rev)
            .arg(self.ttl)
            .arg(id)
            .arg(&djson)
            .arg(self.remember)
            .arg(chrono::Utc::now().timestamp())
            .arg(w.place.map(Place::tag).unwrap_or_default())
            .arg(w.place.map_or(-1, |p| p.delivered))
            .arg(w.change.forget_approvals.len())
            .arg(&w.change.forget_approvals);
        for (f, v) in &fields {
            inv.arg(f).arg(v);
        }
        let mut c = self.conn.get().await?;
        let reply: Vec<redis::Value> = inv.invoke_async(&mut c).await?;
        let res_key = self.res_key(k);
        let text = |v: Option<&redis::Value>| -> Option<String> {
            v.and_then(|v| redis::FromRedisValue::from_redis_value_ref(v).ok())
        };
        if reply.first() == Some(&redis::Value::Int(-1)) {
            self.copies.discard(&res_key);
            return Err(StoreError::Lost);
        }
        if reply.first() != Some(&redis::Value::Int(1)) {
            self.copies.discard(&res_key);
            return Ok(false);
        }
        let recent: Vec<String> = match text(reply.get(1)).as_deref() {
            None | Some("") => Vec::new(),
            Some(v) => serde_json::from_str(v).map_err(|e| corrupt("recent", e))?,
        };
        let full = text(reply.get(2)).as_deref() == Some("1") || recent.len() >= self.remember;
        let slot = text(reply.get(3))
            .and_then(|s| s.parse::<usize>().ok())
            .filter(|s| (1..=MEMO_SLOTS).contains(s));
        let kept = match (slot, w.decision, w.place) {
            (Some(s), Some((id, _)), Some(place)) => Some((
                s - 1,
                KeptDecision {
                    proposal_id: id.to_string(),
                    input: place.tag(),
                    decided: djson,
                },
            )),
            _ => None,
        };
        self.copies.wrote(&res_key, rev, &w, (recent, full, kept));
        Ok(true)
    }
}

impl ResourceStore for RedisResourceStore {
    fn forget_copy(&self, k: &ResourceKey) {
        self.copies.discard(&self.res_key(k));
    }

    fn load<'a>(
        &'a self,
        k: &'a ResourceKey,
        keys: &'a [String],
        proposal_id: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Loaded, StoreError>> {
        Box::pin(self.load_impl(k, keys, proposal_id))
    }

    fn commit<'a>(
        &'a self,
        k: &'a ResourceKey,
        rev: u64,
        w: Write<'a>,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(self.commit_impl(k, rev, w))
    }

    fn index_open<'a>(
        &'a self,
        approvals: &'a [&'a ApprovalData],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            if approvals.is_empty() {
                return Ok(());
            }
            let mut c = self.conn.get().await?;
            let mut pipe = redis::pipe();
            for a in approvals {
                pipe.zadd(self.open_key(), &a.approval_id, a.expires_at)
                    .ignore();
                pipe.hset(
                    self.where_key(),
                    &a.approval_id,
                    ResourceKey::new(a.tenant.clone(), a.resource.clone()).encoded(),
                )
                .ignore();
            }
            Ok(pipe.query_async::<()>(&mut c).await?)
        })
    }

    fn index_close<'a>(&'a self, approval_id: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let mut c = self.conn.get().await?;
            Ok(redis::cmd("ZREM")
                .arg(self.open_key())
                .arg(approval_id)
                .query_async::<()>(&mut c)
                .await?)
        })
    }

    fn open(&self) -> BoxFuture<'_, Result<Vec<(String, i64)>, StoreError>> {
        Box::pin(async move {
            let mut c = self.conn.get().await?;
            Ok(redis::cmd("ZRANGE")
                .arg(self.open_key())
                .arg(0)
                .arg(-1)
                .arg("WITHSCORES")
                .query_async(&mut c)
                .await?)
        })
    }

    fn locate<'a>(
        &'a self,
        approval_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<ResourceKey>, StoreError>> {
        Box::pin(async move {
            let mut c = self.conn.get().await?;
            let v: Option<String> = redis::cmd("HGET")
                .arg(self.where_key())
                .arg(approval_id)
                .query_async(&mut c)
                .await?;
            Ok(v.and_then(|s| parse_where(&s)))
        })
    }

    fn locate_many<'a>(
        &'a self,
        approval_ids: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<Option<ResourceKey>>, StoreError>> {
        Box::pin(async move {
            if approval_ids.is_empty() {
                return Ok(Vec::new());
            }
            let mut c = self.conn.get().await?;
            let v: Vec<Option<String>> = redis::cmd("HMGET")
                .arg(self.where_key())
                .arg(approval_ids)
                .query_async(&mut c)
                .await?;
            Ok(v.into_iter()
                .map(|s| s.and_then(|s| parse_where(&s)))
                .collect())
        })
    }

    fn prune_index(&self, count: usize) -> BoxFuture<'_, Result<usize, StoreError>> {
        use std::sync::atomic::Ordering;
        Box::pin(async move {
            let mut c = self.conn.get().await?;
            let cursor = self.index_cursor.load(Ordering::Relaxed);
            let (next, flat): (u64, Vec<String>) = redis::cmd("HSCAN")
                .arg(self.where_key())
                .arg(cursor)
                .arg("COUNT")
                .arg(count)
                .query_async(&mut c)
                .await?;
            self.index_cursor.store(next, Ordering::Relaxed);
            // Entries whose approval is no longer in its resource's record (or that name no
            // resource at all), with the value read.
            let (readable, mut gone): (Vec<_>, Vec<_>) = flat
                .chunks_exact(2)
                .map(|kv| (&kv[0], &kv[1], parse_where(&kv[1])))
                .partition(|(_, _, k)| k.is_some());
            let there = |entries: &[(&String, &String, Option<ResourceKey>)]| {
                let mut pipe = redis::pipe();
                for (id, _, k) in entries {
                    if let Some(k) = k {
                        pipe.hexists(self.res_key(k), format!("approval:{id}"));
                    }
                }
                pipe
            };
            let found: Vec<bool> = if readable.is_empty() {
                Vec::new()
            } else {
                there(&readable).query_async(&mut c).await?
            };
            gone.extend(
                readable
                    .into_iter()
                    .zip(found)
                    .filter(|(_, f)| !f)
                    .map(|(e, _)| e),
            );
            if gone.is_empty() {
                return Ok(0);
            }
            // Deleted only where the entry still says what was read: an approval made again with
            // the same id on another resource meanwhile keeps its new entry.
            let mut inv = self.unindex.prepare_invoke();
            inv.key(self.where_key());
            for (id, v, _) in &gone {
                inv.arg(*id).arg(*v);
            }
            let mut removed: usize = inv.invoke_async(&mut c).await?;
            // An approval made again with the same id on the same resource in between is written
            // to its resource before it is indexed (with the same entry): look once more and put
            // back what is there now.
            gone.retain(|(_, _, k)| k.is_some());
            if gone.is_empty() {
                return Ok(removed);
            }
            let back: Vec<bool> = there(&gone).query_async(&mut c).await?;
            for ((id, v, _), is_back) in gone.iter().zip(back) {
                if is_back {
                    redis::cmd("HSET")
                        .arg(self.where_key())
                        .arg(*id)
                        .arg(*v)
                        .query_async::<()>(&mut c)
                        .await?;
                    removed = removed.saturating_sub(1);
                }
            }
            Ok(removed)
        })
    }

    fn outbox_add<'a>(
        &'a self,
        approval_id: &'a str,
        at: i64,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        // Only ever later (ZADD GT without needing Redis 6.2).
        Box::pin(self.outbox_script(OUTBOX_LATER, approval_id, at))
    }

    fn outbox_done_at<'a>(
        &'a self,
        approval_id: &'a str,
        at: i64,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.outbox_script(OUTBOX_DONE_AT, approval_id, at))
    }

    fn outbox_done<'a>(&'a self, approval_id: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let mut c = self.conn.get().await?;
            Ok(redis::cmd("ZREM")
                .arg(self.outbox_key())
                .arg(approval_id)
                .query_async::<()>(&mut c)
                .await?)
        })
    }

    fn outbox_has<'a>(&'a self, approval_id: &'a str) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let mut c = self.conn.get().await?;
            let at: Option<f64> = redis::cmd("ZSCORE")
                .arg(self.outbox_key())
                .arg(approval_id)
                .query_async(&mut c)
                .await?;
            Ok(at.is_some())
        })
    }

    fn outbox_due(&self, before: i64) -> BoxFuture<'_, Result<Vec<(String, i64)>, StoreError>> {
        Box::pin(async move {
            let mut c = self.conn.get().await?;
            let due: Vec<(String, f64)> = redis::cmd("ZRANGEBYSCORE")
                .arg(self.outbox_key())
                .arg("-inf")
                .arg(format!("({before}"))
                .arg("WITHSCORES")
                .query_async(&mut c)
                .await?;
            Ok(due.into_iter().map(|(id, at)| (id, at as i64)).collect())
        })
    }

    fn tally_add<'a>(&'a self, tally: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let mut c = self.conn.get().await?;
            let key = self.tallies_key();
            Ok(redis::pipe()
                .rpush(&key, tally)
                .ignore()
                .ltrim(&key, -(MAX_TALLIES as isize), -1)
                .ignore()
                .expire(&key, 86400)
                .ignore()
                .query_async::<()>(&mut c)
                .await?)
        })
    }

    fn tallies_take(&self, max: usize) -> BoxFuture<'_, Result<Vec<String>, StoreError>> {
        Box::pin(async move {
            let mut c = self.conn.get().await?;
            // LPOP with a count: atomic, so two instances never count the same tally.
            let taken: Option<Vec<String>> = redis::cmd("LPOP")
                .arg(self.tallies_key())
                .arg(max.max(1))
                .query_async(&mut c)
                .await?;
            Ok(taken.unwrap_or_default())
        })
    }

    fn forget<'a>(
        &'a self,
        decided: &'a [(ResourceKey, String)],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            if decided.is_empty() {
                return Ok(());
            }
            let pipe = self
                .conn
                .delete_keys(decided.iter().map(|(k, id)| self.decision_key(k, id)));
            let mut c = self.conn.get().await?;
            Ok(pipe.query_async::<()>(&mut c).await?)
        })
    }

    fn confirm_state(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            if !self.guarded {
                return Ok(());
            }
            match crate::store::read_epoch(&self.conn, &self.prefix).await? {
                Some(_) => Ok(()),
                None => Err(StoreError::Lost),
            }
        })
    }
}

/// An entry of the approvals' resource index. Entries written before the encoded form was used hold
/// `tenant<TAB>resource`.
fn parse_where(s: &str) -> Option<ResourceKey> {
    match s.split_once('\t') {
        Some((t, r)) => Some(ResourceKey::new(t, r)),
        None => ResourceKey::decode(s),
    }
}

/// The most tallies [`ResourceStore::tally_add`] keeps waiting to be counted.
pub const MAX_TALLIES: usize = 10_000;

/// Decided proposals the memory twin remembers per resource.
const MEMORY_REMEMBER: usize = 64;

#[derive(Default)]
struct MemoryState {
    records: HashMap<ResourceKey, ResourceRecord>,
    decisions: HashMap<(ResourceKey, String), Decided>,
    open: BTreeMap<String, i64>,
    located: HashMap<String, ResourceKey>,
    outbox: BTreeMap<String, i64>,
    tallies: std::collections::VecDeque<String>,
}

/// In-memory twin of [`RedisResourceStore`] for unit tests (no TTLs). Context key versions come
/// from the in-memory context store it is given.
#[derive(Default)]
pub struct MemoryResourceStore {
    context: Option<Arc<MemoryStore>>,
    state: Mutex<MemoryState>,
}

impl MemoryResourceStore {
    pub fn new(context: Option<Arc<MemoryStore>>) -> Self {
        MemoryResourceStore {
            context,
            state: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl ResourceStore for MemoryResourceStore {
    fn load<'a>(
        &'a self,
        k: &'a ResourceKey,
        keys: &'a [String],
        proposal_id: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Loaded, StoreError>> {
        Box::pin(async move {
            let versions = match &self.context {
                Some(ctx) if !keys.is_empty() => ctx.snapshot(k).await?.key_versions,
                _ => BTreeMap::new(),
            };
            let st = self.lock();
            let mut decided =
                proposal_id.and_then(|id| st.decisions.get(&(k.clone(), id.to_string())).cloned());
            let record = st.records.get(k).cloned().unwrap_or_default();
            let mut decided_at = None;
            if let Some(kd) = record
                .kept_decision(proposal_id)
                .filter(|_| decided.is_none())
            {
                decided =
                    Some(serde_json::from_str(&kd.decided).map_err(|e| corrupt("decision", e))?);
                decided_at = Some(kd.input.clone());
            }
            Ok(Loaded {
                finished: decided.is_none()
                    && proposal_id.is_some_and(|id| record.recent.iter().any(|r| r == id)),
                decided,
                decided_at,
                record,
                key_versions: keys
                    .iter()
                    .filter_map(|key| versions.get(key).map(|v| (key.clone(), *v)))
                    .collect(),
            })
        })
    }

    fn commit<'a>(
        &'a self,
        k: &'a ResourceKey,
        rev: u64,
        w: Write<'a>,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let mut st = self.lock();
            let remember = MEMORY_REMEMBER;
            let rec = st.records.entry(k.clone()).or_default();
            if rec.rev != rev {
                return Ok(false);
            }
            rec.rev += 1;
            rec.state = w.change.state.clone();
            rec.token = w.change.token;
            for id in &w.change.forget_approvals {
                rec.approvals.remove(id);
            }
            for a in &w.change.approvals {
                rec.approvals
                    .insert(a.approval.approval_id.clone(), a.clone());
            }
            if let Some(a) = w.applied {
                rec.apply(a);
            }
            if let Some((id, d)) = w.decision {
                rec.recent.retain(|r| r != id);
                rec.recent.insert(0, id.to_string());
                rec.recent.truncate(remember);
                // A memo slot when one is free: empty, or holding a delivered input's decision.
                let slot = w.place.and_then(|p| {
                    let i = p.pick_slot(
                        rec.kept
                            .iter()
                            .map(|kd| kd.as_ref().map(|kd| kd.input.as_str())),
                    )?;
                    Some((i, p))
                });
                match slot {
                    Some((i, p)) => {
                        rec.kept[i] = Some(KeptDecision {
                            proposal_id: id.to_string(),
                            input: p.tag(),
                            decided: serde_json::to_string(d)
                                .map_err(|e| corrupt("decision", e))?,
                        })
                    }
                    None => {
                        st.decisions.insert((k.clone(), id.to_string()), d.clone());
                    }
                }
            }
            Ok(true)
        })
    }

    fn index_open<'a>(
        &'a self,
        approvals: &'a [&'a ApprovalData],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let mut st = self.lock();
            for a in approvals {
                st.open.insert(a.approval_id.clone(), a.expires_at);
                st.located.insert(
                    a.approval_id.clone(),
                    ResourceKey::new(a.tenant.clone(), a.resource.clone()),
                );
            }
            Ok(())
        })
    }

    fn index_close<'a>(&'a self, approval_id: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            self.lock().open.remove(approval_id);
            Ok(())
        })
    }

    fn open(&self) -> BoxFuture<'_, Result<Vec<(String, i64)>, StoreError>> {
        Box::pin(async move {
            let mut v: Vec<(String, i64)> = self
                .lock()
                .open
                .iter()
                .map(|(k, e)| (k.clone(), *e))
                .collect();
            v.sort_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(&b.0)));
            Ok(v)
        })
    }

    fn locate<'a>(
        &'a self,
        approval_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<ResourceKey>, StoreError>> {
        Box::pin(async move { Ok(self.lock().located.get(approval_id).cloned()) })
    }

    fn locate_many<'a>(
        &'a self,
        approval_ids: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<Option<ResourceKey>>, StoreError>> {
        Box::pin(async move {
            let st = self.lock();
            Ok(approval_ids
                .iter()
                .map(|id| st.located.get(id).cloned())
                .collect())
        })
    }

    fn prune_index(&self, _count: usize) -> BoxFuture<'_, Result<usize, StoreError>> {
        Box::pin(async move {
            let mut guard = self.lock();
            let st = &mut *guard;
            let before = st.located.len();
            let records = &st.records;
            st.located
                .retain(|id, k| records.get(k).is_some_and(|r| r.approvals.contains_key(id)));
            Ok(before - st.located.len())
        })
    }

    fn outbox_add<'a>(
        &'a self,
        approval_id: &'a str,
        at: i64,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let mut st = self.lock();
            let e = st.outbox.entry(approval_id.to_string()).or_insert(at);
            *e = (*e).max(at);
            Ok(())
        })
    }

    fn outbox_done<'a>(&'a self, approval_id: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            self.lock().outbox.remove(approval_id);
            Ok(())
        })
    }

    fn outbox_done_at<'a>(
        &'a self,
        approval_id: &'a str,
        at: i64,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let mut st = self.lock();
            if st.outbox.get(approval_id) == Some(&at) {
                st.outbox.remove(approval_id);
            }
            Ok(())
        })
    }

    fn outbox_has<'a>(&'a self, approval_id: &'a str) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move { Ok(self.lock().outbox.contains_key(approval_id)) })
    }

    fn outbox_due(&self, before: i64) -> BoxFuture<'_, Result<Vec<(String, i64)>, StoreError>> {
        Box::pin(async move {
            let st = self.lock();
            let mut due: Vec<(String, i64)> = st
                .outbox
                .iter()
                .filter(|(_, at)| **at < before)
                .map(|(id, at)| (id.clone(), *at))
                .collect();
            due.sort_by(|a, b| (a.1, &a.0).cmp(&(b.1, &b.0)));
            Ok(due)
        })
    }

    fn tally_add<'a>(&'a self, tally: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let mut st = self.lock();
            st.tallies.push_back(tally.to_string());
            while st.tallies.len() > MAX_TALLIES {
                st.tallies.pop_front();
            }
            Ok(())
        })
    }

    fn tallies_take(&self, max: usize) -> BoxFuture<'_, Result<Vec<String>, StoreError>> {
        Box::pin(async move {
            let mut st = self.lock();
            let n = max.min(st.tallies.len());
            Ok(st.tallies.drain(..n).collect())
        })
    }

    fn forget<'a>(
        &'a self,
        decided: &'a [(ResourceKey, String)],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let mut st = self.lock();
            for (k, id) in decided {
                st.decisions.remove(&(k.clone(), id.clone()));
            }
            Ok(())
        })
    }

    fn confirm_state(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async { Ok(()) })
    }
}

/// The contract every [`ResourceStore`] meets; run against the memory twin (unit test) and Redis
/// (integration test). `tag` keeps runs apart in a shared Redis.
#[doc(hidden)]
pub mod contract {
    use super::*;
    use crate::records::ActionData;
    use crate::resolve::apply::Verdict;
    use serde_json::json;

    /// The decided proposals a store under the contract remembers per resource (the memory
    /// store's fixed count; build a Redis store with it).
    pub const REMEMBER: usize = MEMORY_REMEMBER;

    fn approval(id: &str, resource: &str, expires_at: i64) -> ApprovalData {
        ApprovalData {
            approval_id: id.into(),
            action_id: format!("act-{id}"),
            action: "rollback".into(),
            resource: resource.into(),
            tenant: "default".into(),
            status: "pending".into(),
            decided_by: None,
            why: None,
            requested_at: 1,
            expires_at,
            action_record: json!({}),
            ..Default::default()
        }
    }

    fn stored(a: &ApprovalData) -> StoredApproval {
        StoredApproval {
            approval: a.clone(),
            action: ActionData {
                action_id: a.action_id.clone(),
                action: a.action.clone(),
                resource: a.resource.clone(),
                tenant: a.tenant.clone(),
                workflow_id: "wf".into(),
                parameters: json!({"to": "v1"}),
                fencing_token: 0,
                proposals: json!([]),
                agents: json!([]),
                priority: 100,
                impact: crate::records::Impact::High,
                approved_by: None,
                reason: None,
            },
            escalated: false,
            decided_at: String::new(),
            traceparent: None,
            seen: None,
            amend: None,
            superseded: Vec::new(),
            by_release: false,
        }
    }

    /// The resource [`run_all`] keeps decisions in the memo slot of (a test reads it back through
    /// another store).
    pub fn memo_slot_resource(tag: &str) -> ResourceKey {
        ResourceKey::new("default", format!("res3-{tag}"))
    }

    /// A decision is kept in one of the resource's memo slots when one is free (empty, or holding
    /// a delivered input of the same partition), else apart; loads say which input a kept decision
    /// is for.
    async fn memo_slot(
        store: &dyn ResourceStore,
        k: &ResourceKey,
        change: &Change,
        decided: &Decided,
    ) {
        let at = |offset: i64, delivered: i64| Place {
            partition: "proposals:0".into(),
            offset,
            delivered,
            topic_id: String::new(),
        };
        fn placed<'a>(c: &'a Change, d: &'a Decided, id: &'a str, p: &'a Place) -> Write<'a> {
            Write {
                change: c,
                applied: Some((0, p.offset, "proposals")),
                decision: Some((id, d)),
                place: Some(p),
            }
        }
        let commit = |rev: u64, id: &'static str, p: Place| async move {
            assert!(store
                .commit(k, rev, placed(change, decided, id, &p))
                .await
                .expect("commit"));
        };
        // The empty slots take the first two decisions.
        commit(0, "m1", at(10, -1)).await;
        let l = store.load(k, &[], Some("m1")).await.expect("load");
        assert_eq!(l.decided.as_ref(), Some(decided));
        assert_eq!(l.decided_at.as_deref(), Some("proposals:0:10"));
        assert!(!l.finished);
        commit(1, "m2", at(11, 9)).await;
        // Neither input delivered: the next decision goes apart.
        commit(2, "m3", at(12, 9)).await;
        let l = store.load(k, &[], Some("m3")).await.expect("load");
        assert_eq!(
            (l.decided.as_ref(), l.decided_at.as_deref()),
            (Some(decided), None)
        );
        // Delivered up to 10: the slot of the decision for 10 is taken; that one is finished.
        commit(3, "m4", at(13, 10)).await;
        let l = store.load(k, &[], Some("m4")).await.expect("load");
        assert_eq!(l.decided_at.as_deref(), Some("proposals:0:13"));
        let l = store.load(k, &[], Some("m1")).await.expect("load");
        assert!(l.decided.is_none() && l.finished, "{:?}", l.decided);
        let l = store.load(k, &[], Some("m2")).await.expect("load");
        assert_eq!(
            l.decided_at.as_deref(),
            Some("proposals:0:11"),
            "still kept"
        );
        // What went apart is forgotten as before.
        store
            .forget(&[(k.clone(), "m3".to_string())])
            .await
            .expect("forget");
        let l = store.load(k, &[], Some("m3")).await.expect("load");
        assert!(l.decided.is_none() && l.finished);
    }

    pub async fn run_all(store: &dyn ResourceStore, tag: &str) {
        let k = ResourceKey::new("default", format!("res-{tag}"));
        let l = store.load(&k, &[], Some("p1")).await.expect("load");
        assert_eq!(
            l.record,
            ResourceRecord::default(),
            "a new resource is empty"
        );
        assert!(l.decided.is_none());

        // Compare-and-set: the write at rev 0 wins, a second one at rev 0 loses.
        let a = approval(&format!("apr-{tag}"), &k.resource, 100);
        let change = Change {
            state: ResourceState::default(),
            token: 3,
            approvals: vec![stored(&a)],
            forget_approvals: Vec::new(),
        };
        let decided = Decided {
            outcome: Verdict::ApprovalRequested,
            reason: None,
            rule: Some("approvals.rules[0]".into()),
            detail: "needs approval".into(),
            action: None,
            approvals: vec![a.clone()],
            into_action: None,
            superseded: vec![],
            at: "2026-01-01T00:00:00Z".into(),
        };
        let w = Write {
            change: &change,
            applied: Some((2, 41, "proposals")),
            decision: Some(("p1", &decided)),
            place: None,
        };
        assert!(store.commit(&k, 0, w).await.expect("commit"));
        assert!(!store.commit(&k, 0, w).await.expect("commit"), "stale rev");
        let l = store.load(&k, &[], Some("p1")).await.expect("load");
        assert_eq!(l.record.rev, 1);
        assert_eq!(l.record.token, 3);
        assert_eq!(l.record.applied.get(&2), Some(&41));
        // The fence is of the topic it was noted for: not another topic's (topics.proposals
        // pointed elsewhere) nor another incarnation's (the topic created again).
        assert!(l.record.applied_past(2, 41, "proposals"));
        assert!(l.record.applied_past(2, 7, "proposals~ab"));
        assert!(!l.record.applied_past(2, 42, "proposals"));
        assert!(!l.record.applied_past(2, 7, "proposals-v2"));
        assert!(!l.record.applied_past(1, 7, "proposals"));
        assert_eq!(l.record.approvals[&a.approval_id], stored(&a));
        assert_eq!(
            l.decided.as_ref(),
            Some(&decided),
            "decision kept by proposal id"
        );
        assert!(store
            .load(&k, &[], Some("p2"))
            .await
            .expect("load")
            .decided
            .is_none());
        assert_eq!(l.record.recent, ["p1"]);
        // Once its offset is committed the decision is forgotten; the proposal stays recent.
        store
            .forget(&[(k.clone(), "p1".to_string())])
            .await
            .expect("forget");
        let l = store.load(&k, &[], Some("p1")).await.expect("load");
        assert!(l.decided.is_none() && l.finished, "{:?}", l.decided);
        assert!(
            !store
                .load(&k, &[], Some("p2"))
                .await
                .expect("load")
                .finished
        );

        // More proposals than the recent list holds: a decision pushed out of it is still found
        // until its offset is committed; then only the remembered ones count as finished.
        let k2 = ResourceKey::new("default", format!("res2-{tag}"));
        let ids: Vec<String> = (0..=REMEMBER).map(|i| format!("q{i}")).collect();
        for (i, id) in ids.iter().enumerate() {
            let w = Write {
                change: &change,
                applied: Some((0, i as i64, "proposals")),
                decision: Some((id, &decided)),
                place: None,
            };
            assert!(store.commit(&k2, i as u64, w).await.expect("commit"));
        }
        for id in [&ids[0], &ids[REMEMBER]] {
            let l = store.load(&k2, &[], Some(id)).await.expect("load");
            assert_eq!(l.decided.as_ref(), Some(&decided), "{id} still stored");
            assert!(!l.finished);
        }
        let all: Vec<(ResourceKey, String)> =
            ids.iter().map(|id| (k2.clone(), id.clone())).collect();
        store.forget(&all).await.expect("forget");
        let l = store.load(&k2, &[], Some(&ids[0])).await.expect("load");
        assert!(
            l.decided.is_none() && !l.finished,
            "pushed out and forgotten"
        );
        let l = store.load(&k2, &[], Some(&ids[1])).await.expect("load");
        assert!(l.decided.is_none() && l.finished, "remembered");

        memo_slot(store, &memo_slot_resource(tag), &change, &decided).await;

        // Approval indexes.
        let b = approval(&format!("apr2-{tag}"), &k.resource, 50);
        store.index_open(&[&a, &b]).await.expect("index");
        store.index_open(&[&a]).await.expect("index twice");
        let open: Vec<String> = store
            .open()
            .await
            .expect("open")
            .into_iter()
            .map(|(id, _)| id)
            .filter(|id| id.ends_with(tag))
            .collect();
        assert_eq!(
            open,
            [b.approval_id.clone(), a.approval_id.clone()],
            "soonest expiry first"
        );
        assert_eq!(
            store.locate(&a.approval_id).await.expect("locate"),
            Some(k.clone())
        );
        store.index_close(&b.approval_id).await.expect("close");
        let open = store.open().await.expect("open");
        assert!(!open.iter().any(|(id, _)| *id == b.approval_id));
        assert_eq!(
            store.locate(&b.approval_id).await.expect("locate"),
            Some(k.clone()),
            "a closed approval stays findable"
        );
        assert_eq!(store.locate("nope").await.expect("locate"), None);
        assert_eq!(
            store
                .locate_many(&[a.approval_id.clone(), "nope".into()])
                .await
                .expect("locate many"),
            vec![Some(k.clone()), None]
        );
        // The id index lets go of approvals no longer in their resource's record: `b` was never
        // stored with it; `a` once a write drops it.
        let mut removed = 0;
        for _ in 0..4 {
            removed += store.prune_index(1000).await.expect("prune index");
        }
        assert_eq!(removed, 1, "b only");
        assert_eq!(store.locate(&b.approval_id).await.expect("locate"), None);
        assert_eq!(
            store.locate(&a.approval_id).await.expect("locate"),
            Some(k.clone())
        );
        let rev = store.load(&k, &[], None).await.expect("load").record.rev;
        let dropping = Change {
            forget_approvals: vec![a.approval_id.clone()],
            ..Change::default()
        };
        let w = Write {
            change: &dropping,
            applied: None,
            decision: None,
            place: None,
        };
        assert!(store.commit(&k, rev, w).await.expect("commit"));
        let l = store.load(&k, &[], Some("p9")).await.expect("load");
        assert!(l.record.approvals.is_empty(), "{:?}", l.record.approvals);
        for _ in 0..4 {
            store.prune_index(1000).await.expect("prune index");
        }
        assert_eq!(store.locate(&a.approval_id).await.expect("locate"), None);

        // The outbox: entries come due after their time; an add moves an entry later, never
        // earlier; done removes, done at a time only while the entry is still at it.
        let (o1, o2) = (format!("out1-{tag}"), format!("out2-{tag}"));
        store.outbox_add(&o1, 100).await.expect("add");
        store.outbox_add(&o2, 200).await.expect("add");
        let due = |v: Vec<(String, i64)>| {
            v.into_iter()
                .filter(|(id, _)| id.ends_with(tag))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            due(store.outbox_due(150).await.expect("due")),
            [(o1.clone(), 100)]
        );
        assert_eq!(
            due(store.outbox_due(300).await.expect("due")),
            [(o1.clone(), 100), (o2.clone(), 200)]
        );
        // A decision made since a sweeper listed o1 at 100 adds it again, later: the sweeper's
        // removal at 100 leaves it.
        store.outbox_add(&o1, 400).await.expect("add again");
        store.outbox_add(&o1, 50).await.expect("never earlier");
        store.outbox_done_at(&o1, 100).await.expect("done at");
        assert_eq!(
            due(store.outbox_due(500).await.expect("due")),
            [(o2.clone(), 200), (o1.clone(), 400)]
        );
        store.outbox_done_at(&o1, 400).await.expect("done at");
        store.outbox_done(&o2).await.expect("done");
        assert!(due(store.outbox_due(500).await.expect("due")).is_empty());

        // Tallies: taken oldest first, each once.
        let (t1, t2) = (format!("tally1-{tag}"), format!("tally2-{tag}"));
        store.tally_add(&t1).await.expect("tally");
        store.tally_add(&t2).await.expect("tally");
        let mut taken = store.tallies_take(1).await.expect("take");
        taken.extend(store.tallies_take(100).await.expect("take"));
        let mine = |v: Vec<String>| {
            v.into_iter()
                .filter(|t| t.ends_with(tag))
                .collect::<Vec<_>>()
        };
        assert_eq!(mine(taken), [t1, t2]);
        assert!(mine(store.tallies_take(100).await.expect("take")).is_empty());
    }

    #[cfg(test)]
    #[tokio::test]
    async fn memory_store_meets_the_contract() {
        run_all(&MemoryResourceStore::default(), "mem").await;
    }
}
