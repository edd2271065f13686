//! Sealing audit records per batch (version 2 of the trail).
//!
//! Every decision is still one record on the audit topic, written as its decision's bytes, which
//! depend only on the input (times come from the input or the recorded outcome): a redelivered
//! input yields byte-identical records. What changed is how they are chained: a stage seals each
//! batch of records it decided from one input partition with one **seal** record (type
//! [`SEAL_TYPE`]) on the chain of that stage-partition (`<stage>/<topic>/<partition>`). A seal
//! lists each record's hash (SHA-256 of its bytes) with its resource, the Merkle root of those
//! hashes, its place in the chain (`seq`) and the hash of the seal before it (`prev`). One
//! compare-and-set of the chain's head per batch keeps the chain linear, whoever seals.
//!
//! So `audit verify` detects a removed record (a seal lists a hash nobody wrote), an altered one (its
//! bytes hash to something no seal lists), a removed or altered seal (the next seal's `prev`, the
//! root) and a fork (two seals in one place); one resource's records are listed, and proven, by the
//! seal entries that name it. A batch whose seal was lost in a crash is not committed either: its
//! inputs are redelivered and their byte-identical records sealed again. The head in Redis keeps the
//! bytes of the chain's last [`KEPT_SEALS`] seals too: a process sealing on a head it cannot vouch
//! for — written by another process (whose owner may have crashed between moving the head and
//! producing the seal), or by itself with a seal since dropped or failed — writes those seals again,
//! byte for byte, before its own: a repeat `audit verify` skips, never a gap (found by the fault
//! suite, deploy/local/faults.sh: kill -9 of one of three instances). For that to cover every seal
//! a crash can lose, a process keeps a chain's undelivered seals within [`KEPT_SEALS`]: a stage
//! waits for room in the chain (fewer than [`ROOM`] undelivered; delivered or failed, told by
//! [`crate::kafka::runtime::DeliveryWatch`]) before it decides a record — never between deciding
//! and sealing, which would hold a taken fencing token back from the topic.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use redis::Script;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::hash::{merkle_root, payload_hash};
use crate::error::ProcessError;
use crate::event::CloudEvent;
use crate::kafka::runtime::DeliveryWatch;
use crate::kafka::Output;
use crate::records::Emitter;
use crate::store::{RedisConn, StoreError};
use crate::telemetry::METRICS;

/// Event type of a batch's seal record on the audit topic.
pub const SEAL_TYPE: &str = "switchyard.audit.seal";
/// Source attribute of seal records.
pub const SEAL_SOURCE: &str = "switchyard/audit";
/// The Avro schema (in `schemas/`) seal records are written with when the audit topic is Avro: the
/// topic's own schema (`audit`) is for decisions; single-object encoding names each record's schema,
/// so readers decode both.
pub const SEAL_SCHEMA: &str = "audit_seal";
/// The previous seal schema (no `mac`): unsigned seals are written with it where it is known, so
/// readers of older builds still decode them during an upgrade.
pub const SEAL_SCHEMA_UNSIGNED: &str = "audit_seal.v1";

/// One sealed record, as its seal lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealEntry {
    /// SHA-256 of the record's payload bytes (hex).
    pub hash: String,
    /// The record's event id.
    pub id: String,
    pub tenant: String,
    pub resource: String,
}

/// `data` of a seal record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SealData {
    /// The trail's version: 2.
    pub version: u32,
    /// `<stage>/<topic>/<partition>`, or `approvals/<instance>` for decisions made through the API.
    pub chain: String,
    /// Place in the chain: 1, 2, ...
    pub seq: u64,
    /// Hash (of the payload bytes) of the chain's previous seal; none for the first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev: Option<String>,
    /// Merkle root of the entries' hashes, in order.
    pub root: String,
    pub entries: Vec<SealEntry>,
    /// `<key id>:<hex HMAC-SHA256>` of the seal's time and the rest of its data, when `audit.keys`
    /// is configured ([`super::signing`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

impl super::signing::Signable for SealData {
    fn mac(&self) -> Option<&str> {
        self.mac.as_deref()
    }

    fn unsigned(&self) -> Self {
        SealData {
            mac: None,
            ..self.clone()
        }
    }
}

/// What [`ChainStore::advance`] found.
#[derive(Debug, Clone, PartialEq)]
pub enum Advance {
    /// The head moved to the new one.
    Done,
    /// The head is not where the caller thought: it is here.
    Moved { seq: u64, hash: Option<String> },
}

/// A chain's head: its last seal's place and hash, and the encoded bytes of its last seals (at most
/// [`KEPT_SEALS`], oldest first; none before the first seal).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Head {
    pub seq: u64,
    pub hash: Option<String>,
    pub seals: Vec<(u64, Vec<u8>)>,
}

/// How many of a chain's last seals the head keeps (and a process that did not write them writes
/// again): a seal is lost unproduced only while it is among the last few of its chain (a batch in
/// flight, a revoked batch dropped, a process killed before its produce burst), so the window covers
/// several lost in a row.
pub const KEPT_SEALS: u64 = 8;

/// Where chain heads live. Boxed futures, so it can be shared as `Arc<dyn ChainStore>`.
pub trait ChainStore: Send + Sync + 'static {
    /// The chain's head; seq 0 and no hash before its first seal.
    fn head<'a>(&'a self, chain: &'a str) -> BoxFuture<'a, Result<Head, StoreError>>;

    /// Moves the chain's head from seq `expected` to `head` (seq, hash), keeping the new seal's
    /// bytes `seal`, unless it moved.
    fn advance<'a>(
        &'a self,
        chain: &'a str,
        expected: u64,
        head: (u64, &'a str),
        seal: &'a [u8],
    ) -> BoxFuture<'a, Result<Advance, StoreError>>;

    /// Sets a chain's head (recovery from the audit topic after Redis lost its state), unless
    /// the chain is already at that seal or further: a recovery run while the chain's writer goes
    /// on (`recover --force` on a running system) never moves a head back, which would make the
    /// writer seal a number twice (a fork).
    fn restore_head<'a>(
        &'a self,
        chain: &'a str,
        head: (u64, &'a str),
        seal: &'a [u8],
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Notes that the own chain `chain` (a process's, [`Sealer::own_chain`]) sealed at `now_ms`,
    /// so another process can repair it once it falls idle ([`Sealer::repair_idle_own_chains`]).
    fn note_own<'a>(
        &'a self,
        _chain: &'a str,
        _now_ms: i64,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async { Ok(()) })
    }

    /// Own chains last noted before `before_ms` (at most 100).
    fn idle_own(&self, _before_ms: i64) -> BoxFuture<'_, Result<Vec<String>, StoreError>> {
        Box::pin(async { Ok(Vec::new()) })
    }

    /// Forgets an own chain noted before `before_ms` (repaired) — not one noted since (its process
    /// sealed meanwhile: alive) — and every one noted before `stale_ms`.
    fn forget_own<'a>(
        &'a self,
        _chain: &'a str,
        _before_ms: i64,
        _stale_ms: i64,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async { Ok(()) })
    }
}

/// KEYS[1] the own chains; ARGV[1] a chain, ARGV[2] the idle cutoff, ARGV[3] the stale cutoff (ms).
/// Removes the chain unless it was noted since the cutoff, and every chain noted before the stale one.
const FORGET_OWN: &str = r"
local at = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1]) or '')
if at and at < tonumber(ARGV[2]) then redis.call('ZREM', KEYS[1], ARGV[1]) end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[3])
return 0
";

/// KEYS[1] the chain's head; ARGV seq, hash, seal. Sets the head unless it is at `seq` or further.
const RESTORE: &str = r"
local cur = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')
if cur >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'seq', ARGV[1], 'hash', ARGV[2], 'seal:' .. ARGV[1], ARGV[3])
return 1
";

const ADVANCE: &str = r#"
-- KEYS[1] = chain head (hash: seq, hash, seal:<seq> for at least the last ARGV[5] seals); KEYS[2],
-- when given = the epoch marker (on a Redis Cluster the slot marker of KEYS[1]'s slot); ARGV[1] = expected seq, ARGV[2] = new seq, ARGV[3] = new hash,
-- ARGV[4] = the new seal's bytes, ARGV[5] = seals kept
local cur = redis.call('HGET', KEYS[1], 'seq')
-- A head about to be created on a Redis without the marker (one that came back empty) is refused:
-- its chain would start again from 1, a fork. (A head that exists was created so.)
if KEYS[2] and not cur and redis.call('EXISTS', KEYS[2]) == 0 then
  return {'lost'}
end
local seq = tonumber(cur or '0')
if seq ~= tonumber(ARGV[1]) then
  return {'moved', tostring(seq), redis.call('HGET', KEYS[1], 'hash') or ''}
end
redis.call('HSET', KEYS[1], 'seq', ARGV[2], 'hash', ARGV[3], 'seal:' .. ARGV[2], ARGV[4])
-- Older seals go sixteen at a time: one HDEL every sixteenth seal, not one per seal.
local new, keep = tonumber(ARGV[2]), tonumber(ARGV[5])
if new % 16 == 0 and new > keep then
  local old = {}
  for s = math.max(1, new - keep - 15), new - keep do old[#old + 1] = 'seal:' .. s end
  redis.call('HDEL', KEYS[1], unpack(old))
end
return {'ok'}
"#;

/// Chain heads in Redis: `<prefix>:auditchain:{<chain>}` (hash: `seq`, `hash`, `seal`), one script
/// call per sealed batch.
pub struct RedisChainStore {
    conn: RedisConn,
    prefix: String,
    script: Script,
    /// Whether a head's creation checks the epoch (or slot) marker ([`RedisChainStore::guarded`]).
    guarded: bool,
}

impl RedisChainStore {
    pub fn new(conn: RedisConn, prefix: &str) -> Self {
        RedisChainStore {
            conn,
            prefix: prefix.into(),
            script: Script::new(ADVANCE),
            guarded: false,
        }
    }

    /// Creates a head only while Redis has its epoch marker: a Redis that came back empty is
    /// refused at once, not from the epoch watcher's next look a second later (a seal on an empty
    /// Redis would start its chain again from 1, a fork). A head that exists was created so, and
    /// is moved without the check (a command less per seal). A cluster keeps the marker on
    /// another slot: there the slot marker of the head's slot is checked
    /// ([`crate::store::RedisConn::guard_key`]).
    pub fn guarded(mut self) -> Self {
        self.guarded = true;
        self
    }

    fn key(&self, chain: &str) -> String {
        format!(
            "{}:auditchain:{{{}}}",
            self.prefix,
            chain.replace(['{', '}'], "_")
        )
    }
}

impl RedisChainStore {
    /// The own chains and when each last sealed (a sorted set).
    fn own_key(&self) -> String {
        format!("{}:auditchain:own", self.prefix)
    }
}

impl ChainStore for RedisChainStore {
    fn note_own<'a>(
        &'a self,
        chain: &'a str,
        now_ms: i64,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let mut c = self.conn.get().await?;
            let _: () = redis::cmd("ZADD")
                .arg(self.own_key())
                .arg(now_ms)
                .arg(chain)
                .query_async(&mut c)
                .await?;
            Ok(())
        })
    }

    fn idle_own(&self, before_ms: i64) -> BoxFuture<'_, Result<Vec<String>, StoreError>> {
        Box::pin(async move {
            let mut c = self.conn.get().await?;
            Ok(redis::cmd("ZRANGEBYSCORE")
                .arg(self.own_key())
                .arg("-inf")
                .arg(before_ms)
                .arg("LIMIT")
                .arg(0)
                .arg(100)
                .query_async(&mut c)
                .await?)
        })
    }

    fn forget_own<'a>(
        &'a self,
        chain: &'a str,
        before_ms: i64,
        stale_ms: i64,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let mut c = self.conn.get().await?;
            let _: () = redis::Script::new(FORGET_OWN)
                .key(self.own_key())
                .arg(chain)
                .arg(before_ms)
                .arg(stale_ms)
                .invoke_async(&mut c)
                .await?;
            Ok(())
        })
    }

    fn head<'a>(&'a self, chain: &'a str) -> BoxFuture<'a, Result<Head, StoreError>> {
        Box::pin(async move {
            let mut c = self.conn.get().await?;
            let fields: Vec<(String, Vec<u8>)> = redis::cmd("HGETALL")
                .arg(self.key(chain))
                .query_async(&mut c)
                .await?;
            Ok(head_of_fields(fields))
        })
    }

    fn advance<'a>(
        &'a self,
        chain: &'a str,
        expected: u64,
        head: (u64, &'a str),
        seal: &'a [u8],
    ) -> BoxFuture<'a, Result<Advance, StoreError>> {
        Box::pin(async move {
            let key = self.key(chain);
            let mut inv = self.script.prepare_invoke();
            inv.key(&key);
            if let Some(guard) = self
                .guarded
                .then(|| self.conn.guard_key(&self.prefix, &key))
                .flatten()
            {
                inv.key(guard);
            }
            inv.arg(expected)
                .arg(head.0)
                .arg(head.1)
                .arg(seal)
                .arg(KEPT_SEALS);
            let mut c = self.conn.get().await?;
            let reply: Vec<String> = inv.invoke_async(&mut c).await?;
            match reply.first().map(String::as_str) {
                Some("ok") => Ok(Advance::Done),
                Some("lost") => Err(StoreError::Lost),
                Some("moved") => Ok(Advance::Moved {
                    seq: reply
                        .get(1)
                        .and_then(|s| s.parse().ok())
                        .ok_or_else(|| StoreError::Corrupt("audit chain head seq".into()))?,
                    hash: reply.get(2).filter(|h| !h.is_empty()).cloned(),
                }),
                other => Err(StoreError::Corrupt(format!(
                    "unexpected reply from the seal script: {other:?}"
                ))),
            }
        })
    }

    fn restore_head<'a>(
        &'a self,
        chain: &'a str,
        head: (u64, &'a str),
        seal: &'a [u8],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let mut c = self.conn.get().await?;
            let _: i64 = redis::Script::new(RESTORE)
                .key(self.key(chain))
                .arg(head.0)
                .arg(head.1)
                .arg(seal)
                .invoke_async(&mut c)
                .await?;
            Ok(())
        })
    }
}

/// A head from its Redis hash's fields (`seq`, `hash`, `seal:<seq>`).
fn head_of_fields(fields: Vec<(String, Vec<u8>)>) -> Head {
    let mut head = Head::default();
    for (k, v) in fields {
        let text = || String::from_utf8_lossy(&v).into_owned();
        match k.as_str() {
            "seq" => head.seq = text().parse().unwrap_or(0),
            "hash" => head.hash = Some(text()).filter(|h| !h.is_empty()),
            _ => {
                if let Some(n) = k.strip_prefix("seal:").and_then(|n| n.parse().ok()) {
                    head.seals.push((n, v));
                }
            }
        }
    }
    // Only the last KEPT_SEALS (a field left by an older head, e.g. before a restore, is not one).
    head.seals
        .retain(|(n, _)| *n <= head.seq && n.saturating_add(KEPT_SEALS) > head.seq);
    head.seals.sort_by_key(|(n, _)| *n);
    head
}

/// In-memory twin of [`RedisChainStore`] for unit tests.
#[derive(Default)]
pub struct MemoryChainStore {
    heads: Mutex<HashMap<String, Head>>,
}

impl ChainStore for MemoryChainStore {
    fn head<'a>(&'a self, chain: &'a str) -> BoxFuture<'a, Result<Head, StoreError>> {
        Box::pin(async move {
            let heads = self.heads.lock().unwrap_or_else(|e| e.into_inner());
            Ok(heads.get(chain).cloned().unwrap_or_default())
        })
    }

    fn advance<'a>(
        &'a self,
        chain: &'a str,
        expected: u64,
        head: (u64, &'a str),
        seal: &'a [u8],
    ) -> BoxFuture<'a, Result<Advance, StoreError>> {
        Box::pin(async move {
            let mut heads = self.heads.lock().unwrap_or_else(|e| e.into_inner());
            let now = heads.get(chain).cloned().unwrap_or_default();
            if now.seq != expected {
                return Ok(Advance::Moved {
                    seq: now.seq,
                    hash: now.hash,
                });
            }
            let mut next = Self::head_of(head, seal);
            next.seals = now
                .seals
                .into_iter()
                .filter(|(n, _)| n.saturating_add(KEPT_SEALS) > head.0)
                .chain(next.seals)
                .collect();
            heads.insert(chain.to_string(), next);
            Ok(Advance::Done)
        })
    }

    fn restore_head<'a>(
        &'a self,
        chain: &'a str,
        head: (u64, &'a str),
        seal: &'a [u8],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let mut heads = self.heads.lock().unwrap_or_else(|e| e.into_inner());
            if heads.get(chain).is_none_or(|h| h.seq < head.0) {
                heads.insert(chain.to_string(), Self::head_of(head, seal));
            }
            Ok(())
        })
    }
}

impl MemoryChainStore {
    fn head_of(head: (u64, &str), seal: &[u8]) -> Head {
        Head {
            seq: head.0,
            hash: Some(head.1.to_string()),
            seals: vec![(head.0, seal.to_vec())],
        }
    }
}

/// A head this process wrote: seq, hash, and its seal's "unsent" flag.
type CachedHead = (u64, Option<String>, Arc<AtomicBool>);

/// The seal records of a batch, and the watch their writer tells of their fate (see
/// [`DeliveryWatch`]: unsent, settled).
pub struct Sealed {
    pub seals: Vec<Output>,
    pub watch: DeliveryWatch,
}

/// Heads cached beyond this many chains are forgotten (the cache is only a first guess).
const MAX_CACHED_HEADS: usize = 10_000;

/// The longest a decision waits for room in its chain ([`Sealer::wait_for_room`]).
const MAX_SEAL_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Undelivered seals of a chain at which a stage waits before deciding more ([`Sealer::wait_for_room`]):
/// half the kept window, leaving the other half for waves decided meanwhile.
pub const ROOM: u64 = KEPT_SEALS / 2;

/// A chain's seals this process made whose deliveries are not settled yet, oldest first (each its
/// watch's token, cancelled once settled).
type InFlight = std::collections::VecDeque<CancellationToken>;

/// Drops the settled seals at the front of `list`.
fn drop_settled(list: &mut InFlight) {
    while list.front().is_some_and(CancellationToken::is_cancelled) {
        list.pop_front();
    }
}

/// Seals batches of audit records into their chains (see the module documentation).
pub struct Sealer {
    store: Arc<dyn ChainStore>,
    /// Heads this process wrote, each with its seal's "unsent" flag (set when the seal was dropped
    /// or failed to be written: the head is then no longer trusted).
    heads: Mutex<HashMap<String, CachedHead>>,
    /// One seal at a time per chain in this process: the compare-and-set then only races other
    /// processes (a zombie owner of a partition, a second API instance).
    chain_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Each chain's seals this process made and has not seen settled ([`DeliveryWatch`]).
    in_flight: Mutex<HashMap<String, InFlight>>,
    /// Where audit records and seals go.
    pub topic: String,
    /// This process's chain for decisions that come from no partition (the approvals API, the CLI,
    /// the expiry sweeper).
    pub own_chain: String,
    /// The audit topic's limit as last read, and the producer's own (`message.max.bytes`): what a
    /// seal must stay under ([`Self::entries_budget`]).
    limits: crate::kafka::TopicLimits,
    producer_max: usize,
    /// When the own chain was last noted alive (ms since the epoch; see [`ChainStore::note_own`]).
    own_noted: std::sync::atomic::AtomicI64,
    /// Keys seals are signed with (`audit.keys`; none: unsigned).
    keys: super::signing::Keys,
}

impl Sealer {
    /// Notes the own chain alive, at most every 10 s (best effort: a chain not noted is only not
    /// repaired by another process after a crash).
    async fn note_own(&self) {
        let now = chrono::Utc::now().timestamp_millis();
        if now - self.own_noted.load(Ordering::Relaxed) < 10_000 {
            return;
        }
        self.own_noted.store(now, Ordering::Relaxed);
        if let Err(e) = self.store.note_own(&self.own_chain, now).await {
            tracing::debug!(error = %e, "Could not note the own audit chain.");
        }
    }

    /// Writes again the kept seals of other processes' own chains that have not sealed for
    /// `idle` (their process most likely gone), then forgets them: a process that crashed with a
    /// seal of its own chain unsent, after a later one was written, left a gap `audit verify`
    /// would report for good — nobody else seals that chain. The seals are the identical bytes (a
    /// repeat verify skips). Returns how many chains were repaired.
    pub async fn repair_idle_own_chains(
        &self,
        emitter: &Emitter,
        producer: &crate::kafka::Producer,
        idle: std::time::Duration,
    ) -> Result<usize, String> {
        let before = chrono::Utc::now().timestamp_millis() - idle.as_millis() as i64;
        let chains = self
            .store
            .idle_own(before)
            .await
            .map_err(|e| e.to_string())?;
        // Chains idle for a week are forgotten unrepaired (their seals' records are long verified
        // or gone), so a chain that can never be repaired does not stay first for ever.
        let stale = before - 7 * 24 * 3600 * 1000;
        let mut repaired = 0;
        let mut failed = Vec::new();
        for chain in chains.iter().filter(|c| **c != self.own_chain) {
            let head = match self.store.head(chain).await {
                Ok(h) => h,
                Err(e) => {
                    failed.push(format!("{chain}: {e}"));
                    continue;
                }
            };
            let seals: Vec<Output> = head
                .seals
                .into_iter()
                .map(|(_, bytes)| emitter.encoded(&self.topic, chain, bytes))
                .collect();
            if let Some(Err(e)) = producer
                .send_all(&seals)
                .await
                .into_iter()
                .find(Result::is_err)
            {
                failed.push(format!("{chain}: {e}"));
                continue;
            }
            self.store
                .forget_own(chain, before, stale)
                .await
                .map_err(|e| e.to_string())?;
            repaired += 1;
        }
        if failed.is_empty() {
            Ok(repaired)
        } else {
            Err(format!("{repaired} repaired; not: {}", failed.join("; ")))
        }
    }

    /// Seals sized by these limits: the audit topic's (read at start, refreshed) and the producer's.
    pub fn with_limits(mut self, limits: crate::kafka::TopicLimits, producer_max: usize) -> Self {
        self.limits = limits;
        self.producer_max = producer_max;
        self
    }

    /// The most one seal's entries may take (estimated), so the seal stays under what the audit
    /// topic and the producer take: three fifths of the smaller (the seal's envelope and an
    /// estimate's error aside). A wave with more is sealed in several seals.
    pub fn entries_budget(&self) -> usize {
        let limit = self
            .limits
            .of(&self.topic)
            .unwrap_or(usize::MAX)
            .min(self.producer_max);
        (limit / 5 * 3).max(4096)
    }

    pub fn new(store: Arc<dyn ChainStore>, topic: &str) -> Self {
        Sealer {
            store,
            heads: Mutex::new(HashMap::new()),
            chain_locks: Mutex::new(HashMap::new()),
            in_flight: Mutex::new(HashMap::new()),
            topic: topic.into(),
            own_chain: format!("approvals/{}", uuid::Uuid::new_v4().simple()),
            limits: Default::default(),
            producer_max: 1_000_000,
            own_noted: std::sync::atomic::AtomicI64::new(0),
            keys: Default::default(),
        }
    }

    /// Signs its seals with the first of `keys` ([`super::signing`]).
    pub fn with_keys(mut self, keys: super::signing::Keys) -> Self {
        self.keys = keys;
        self
    }

    /// The chain of a stage reading `topic`'s `partition`.
    pub fn chain(stage: &str, topic: &str, partition: i32) -> String {
        format!("{stage}/{topic}/{partition}")
    }

    /// Encodes `records` (audit events) for the audit topic and seals them as one batch of `chain`:
    /// the records' outputs and the seals' (the batch's, after the previous one written again when
    /// this process did not write it itself — see the module documentation).
    pub async fn seal(
        &self,
        stage: &'static str,
        chain: &str,
        emitter: &Emitter,
        records: &[CloudEvent],
    ) -> Result<(Vec<Output>, Sealed), ProcessError> {
        let mut outs = Vec::with_capacity(records.len());
        let mut entries = Vec::with_capacity(records.len());
        for ev in records {
            let out = emitter.emit(&self.topic, ev)?;
            entries.push(SealEntry {
                hash: payload_hash(&out.payload),
                id: ev.id.clone(),
                tenant: ev.tenant().to_string(),
                resource: ev.subject.clone().unwrap_or_default(),
            });
            outs.push(out);
        }
        let sealed = self
            .seal_entries(chain, emitter, entries)
            .await
            .map_err(|e| ProcessError::from(e).context("audit chain"))?;
        METRICS
            .audit_sealed
            .with_label_values(&[stage])
            .inc_by(outs.len() as u64);
        Ok((outs, sealed))
    }

    /// Seals already encoded entries as one batch of `chain`; returns the seal records (the
    /// previous seal written again first, when this process did not write it).
    pub async fn seal_entries(
        &self,
        chain: &str,
        emitter: &Emitter,
        entries: Vec<SealEntry>,
    ) -> Result<Sealed, StoreError> {
        let lock = self
            .chain_locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(chain.to_string())
            .or_default()
            .clone();
        let sealed = {
            let _one_at_a_time = lock.lock().await;
            self.seal_locked(chain, emitter, entries).await
        };
        let mut locks = self.chain_locks.lock().unwrap_or_else(|e| e.into_inner());
        // Only the map and this call hold it: nobody waits, forget it.
        if Arc::strong_count(&lock) == 2 {
            locks.remove(chain);
        }
        sealed
    }

    async fn seal_locked(
        &self,
        chain: &str,
        emitter: &Emitter,
        entries: Vec<SealEntry>,
    ) -> Result<Sealed, StoreError> {
        let hashes: Vec<String> = entries.iter().map(|e| e.hash.clone()).collect();
        let root = merkle_root(&hashes);
        let cached = self
            .heads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(chain)
            .filter(|h| !h.2.load(Ordering::Acquire))
            .cloned();
        // Heads this process wrote one after another share one "unsent" flag: while nobody set it,
        // each went out with its batch. Otherwise — a seal dropped or failed, a head another process
        // wrote, or one this process has not seen — the last seals the head keeps may not be on the
        // topic: they go out again with ours (the identical bytes; a repeat `audit verify` skips).
        let (mut head, mut again, mut lineage) = match cached {
            Some((seq, hash, flag)) => ((seq, hash), Vec::new(), flag),
            None => {
                let h = self.store.head(chain).await?;
                ((h.seq, h.hash), h.seals, Arc::new(AtomicBool::new(false)))
            }
        };
        let mut data = SealData {
            version: 2,
            chain: chain.to_string(),
            seq: 0,
            prev: None,
            root,
            entries,
            mac: None,
        };
        for attempt in 0..50 {
            if attempt > 3 {
                // A chain busy in another process: back off a little.
                tokio::time::sleep(std::time::Duration::from_millis(attempt * 2)).await;
            }
            data.seq = head.0 + 1;
            data.prev = head.1.clone();
            let time = Some(crate::event::now_rfc3339());
            data.mac = self.keys.sign(&self.topic, time.as_deref(), &data);
            let mut ev = CloudEvent::new(
                format!(
                    "seal-{}",
                    crate::pattern::stable_id(&[chain, &data.seq.to_string()])
                ),
                SEAL_SOURCE,
                SEAL_TYPE,
            )
            .with_subject(chain)
            .with_data(serde_json::to_value(&data).map_err(|e| StoreError::corrupt("seal", e))?);
            ev.time = time;
            let schema = if data.mac.is_none() && emitter.knows_schema(SEAL_SCHEMA_UNSIGNED) {
                SEAL_SCHEMA_UNSIGNED
            } else {
                SEAL_SCHEMA
            };
            let out = emitter
                .emit_as(&self.topic, &ev, Some(schema))
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let hash = payload_hash(&out.payload);
            match self
                .store
                .advance(chain, head.0, (data.seq, &hash), &out.payload)
                .await?
            {
                Advance::Done => {
                    self.remember(chain, (data.seq, Some(hash), lineage.clone()));
                    if chain == self.own_chain {
                        self.note_own().await;
                    }
                    let mut seals = Vec::with_capacity(again.len() + 1);
                    for (_, bytes) in again {
                        METRICS.audit_seals_rewritten.inc();
                        seals.push(emitter.encoded(&self.topic, chain, bytes));
                    }
                    seals.push(out);
                    let watch = DeliveryWatch::new(lineage);
                    self.track(chain, watch.settled());
                    return Ok(Sealed { seals, watch });
                }
                Advance::Moved { seq, .. } if seq < head.0 => {
                    // A head never goes back: Redis lost its state (the epoch watcher stops
                    // everything within a second; `switchyard recover` restores the heads). Sealing
                    // from here would fork the chain.
                    self.heads
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(chain);
                    return Err(StoreError::Redis(format!(
                        "audit chain {chain} went back from seal {} to {seq}: Redis lost its state?",
                        head.0
                    )));
                }
                Advance::Moved { .. } => {
                    // Another process sealed since: continue from its head, whose last seals go out
                    // again with ours (they may not have reached the topic).
                    let h = self.store.head(chain).await?;
                    head = (h.seq, h.hash);
                    again = h.seals;
                    lineage = Arc::new(AtomicBool::new(false));
                }
            }
        }
        Err(StoreError::Redis(
            "audit chain head kept changing; retrying".into(),
        ))
    }

    /// Says a seal of `chain` this process sealed was not written (its records' produce failed):
    /// the chain's next seal writes the last ones again.
    pub fn distrust(&self, chain: &str) {
        if let Some(h) = self
            .heads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(chain)
        {
            h.2.store(true, Ordering::Release);
        }
    }

    /// Waits until `chain` has room for more seals: fewer than [`ROOM`] of the seals this process
    /// made of it undelivered. A stage calls it before it *decides* a record (not between deciding
    /// and sealing, which would hold a decision — a fencing token taken — back from the topic while
    /// other stages write theirs: actions out of token order), so a chain's seals in flight stay
    /// within the head's kept window ([`KEPT_SEALS`]) with room for the waves decided meanwhile:
    /// a seal lost in a crash is then among those the next owner writes again.
    pub async fn wait_for_room(&self, chain: &str) {
        loop {
            let due = {
                let mut in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
                let Some(list) = in_flight.get_mut(chain) else {
                    return;
                };
                drop_settled(list);
                match list.front() {
                    Some(t) if list.len() as u64 >= ROOM => t.clone(),
                    Some(_) => return,
                    None => {
                        in_flight.remove(chain);
                        return;
                    }
                }
            };
            METRICS.audit_seal_waits.inc();
            // Bounded: a delivery takes milliseconds, or fails within librdkafka's timeout; should
            // a seal's writer hold it back longer (a bug), the stage goes on — with the gap risk
            // this wait is for, said in the log — rather than stopping.
            if tokio::time::timeout(MAX_SEAL_WAIT, due.cancelled())
                .await
                .is_err()
            {
                tracing::warn!(chain, "An earlier seal of this chain is still undelivered; going on (a crash now could leave a gap in the chain).");
                let mut in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(list) = in_flight.get_mut(chain) {
                    list.pop_front();
                }
            }
        }
    }

    /// Notes a seal of `chain` this process made, until its deliveries are settled.
    fn track(&self, chain: &str, settled: CancellationToken) {
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        let list = in_flight.entry(chain.to_string()).or_default();
        drop_settled(list);
        list.push_back(settled);
    }

    fn remember(&self, chain: &str, head: CachedHead) {
        let mut heads = self.heads.lock().unwrap_or_else(|e| e.into_inner());
        if heads.len() >= MAX_CACHED_HEADS && !heads.contains_key(chain) {
            heads.clear();
        }
        heads.insert(chain.to_string(), head);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::CloudEvent;
    use crate::records::Emitter;

    /// On an Avro audit topic an unsigned seal is written with the previous seal schema (readers of
    /// older builds decode it during an upgrade), a signed one with the current; both read back
    /// whole, and the signature checks after the Avro round trip.
    #[tokio::test]
    async fn seals_on_an_avro_topic_use_the_schema_that_fits_and_signatures_survive() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let schemas = crate::schema::SchemaRegistry::load_dir(&dir.join("schemas")).unwrap();
        let topics = crate::topics::TopicCatalog::from_texts([(
            "audit",
            "name: audit\npartitions: 1\nkey: resource\nencoding: avro\nschema: audit\n",
        )])
        .unwrap();
        let emitter = Emitter::new(schemas.clone(), topics);
        let ev = CloudEvent::new("a-1", "t", crate::records::types::AUDIT)
            .with_subject("svc")
            .with_time("2026-01-01T00:00:00Z")
            .with_data(
                serde_json::json!({"decision": "accepted", "stage": "resolve",
                "resource": "svc", "tenant": "default", "detail": {}}),
            );
        let keys = super::super::signing::Keys::of(&[("k1", "0123456789abcdef0123456789abcdef")]);
        for (signed, schema) in [(false, SEAL_SCHEMA_UNSIGNED), (true, SEAL_SCHEMA)] {
            let mut sealer = Sealer::new(Arc::new(MemoryChainStore::default()), "audit");
            if signed {
                sealer = sealer.with_keys(keys.clone());
            }
            let (_, sealed) = sealer
                .seal(
                    "resolve",
                    "resolve/p/0",
                    &emitter,
                    std::slice::from_ref(&ev),
                )
                .await
                .unwrap();
            let payload = &sealed.seals[0].payload;
            assert!(
                payload.starts_with(&schemas.get(schema).unwrap().header),
                "written with {schema}"
            );
            let back = crate::codec::decode(
                crate::codec::RecordView {
                    key: None,
                    payload,
                    headers: &[],
                },
                &schemas,
            )
            .unwrap();
            let data: SealData = serde_json::from_value(back.data.clone().unwrap()).unwrap();
            assert_eq!((data.seq, data.entries.len()), (1, 1));
            let check = keys.check("audit", back.time.as_deref(), &data);
            assert_eq!(
                check,
                if signed {
                    super::super::signing::Signature::Valid
                } else {
                    super::super::signing::Signature::Unsigned
                }
            );
        }
    }

    /// A stage waits for room before deciding: with ROOM seals of a chain undelivered, the wait
    /// lasts until the oldest is settled (delivered, failed or dropped); sealing itself never
    /// waits (it would hold a decision back from the topic). Were the process killed, the seals
    /// it loses are then among those the head keeps (and the next owner writes again).
    #[tokio::test]
    async fn a_stage_waits_for_room_in_its_chain_before_deciding() {
        let sealer = Sealer::new(Arc::new(MemoryChainStore::default()), "audit");
        let emitter = Emitter::new(Default::default(), Default::default());
        let ev = |n: u64| {
            CloudEvent::new(format!("a-{n}"), "t", crate::records::types::AUDIT)
                .with_subject("svc")
                .with_time("2026-11-28T00:00:00Z")
                .with_data(serde_json::json!({"n": n}))
        };
        let chain = "test/t/0";
        let room = || {
            tokio::time::timeout(
                std::time::Duration::from_millis(200),
                sealer.wait_for_room(chain),
            )
        };
        assert!(room().await.is_ok(), "an empty chain has room");
        let mut watches = std::collections::VecDeque::new();
        for n in 1..=ROOM {
            let (_, sealed) = sealer
                .seal("test", chain, &emitter, &[ev(n)])
                .await
                .expect("seal");
            watches.push_back(sealed.watch);
        }
        assert!(room().await.is_err(), "{ROOM} seals undelivered: no room");
        // Sealing itself does not wait (a decision taken goes out).
        let (_, sealed) = tokio::time::timeout(
            std::time::Duration::from_millis(200),
            sealer.seal("test", chain, &emitter, &[ev(ROOM + 1)]),
        )
        .await
        .expect("a seal never waits")
        .expect("seal");
        watches.push_back(sealed.watch);
        // Delivered, failed or dropped: room again once fewer than ROOM are undelivered.
        watches.pop_front().expect("seal 1").settle();
        assert!(room().await.is_err(), "still {ROOM} undelivered");
        let failed = watches.pop_front().expect("seal 2");
        failed.unsent();
        failed.settle();
        assert!(room().await.is_ok(), "room once the second settled");
        let (_, sealed) = sealer
            .seal("test", chain, &emitter, &[ev(ROOM + 2)])
            .await
            .expect("seal");
        assert_eq!(
            sealed.seals.len() as u64,
            KEPT_SEALS.min(ROOM + 1) + 1,
            "after a failed seal, the kept seals again, then the new one"
        );
        watches.push_back(sealed.watch);
        assert!(room().await.is_err());
        drop(watches.pop_front());
        assert!(room().await.is_ok(), "a dropped seal settles too");
    }
}

/// The contract every [`ChainStore`] meets; run against the memory twin (unit test) and Redis
/// (integration test). `tag` keeps runs apart in a shared Redis.
#[doc(hidden)]
pub mod contract {
    use super::*;

    pub async fn run_all(store: &dyn ChainStore, tag: &str) {
        let chain = format!("stage/topic-{tag}/0");
        assert_eq!(store.head(&chain).await.expect("head"), Head::default());
        assert_eq!(
            store
                .advance(&chain, 0, (1, "h1"), b"seal one")
                .await
                .expect("advance"),
            Advance::Done
        );
        assert_eq!(
            store.head(&chain).await.expect("head"),
            Head {
                seq: 1,
                hash: Some("h1".into()),
                seals: vec![(1, b"seal one".to_vec())]
            }
        );
        // A stale expectation: the real head, nothing changed.
        assert_eq!(
            store
                .advance(&chain, 0, (1, "x"), b"x")
                .await
                .expect("advance"),
            Advance::Moved {
                seq: 1,
                hash: Some("h1".into())
            }
        );
        assert_eq!(
            store
                .advance(&chain, 1, (2, "h2"), b"seal two")
                .await
                .expect("advance"),
            Advance::Done
        );
        assert_eq!(
            store.head(&chain).await.expect("head").seals,
            vec![(1, b"seal one".to_vec()), (2, b"seal two".to_vec())]
        );
        // Only the last KEPT_SEALS are kept.
        for n in 3..=KEPT_SEALS + 3 {
            let seal = format!("seal {n}");
            assert_eq!(
                store
                    .advance(&chain, n - 1, (n, "h"), seal.as_bytes())
                    .await
                    .expect("advance"),
                Advance::Done
            );
        }
        let kept = store.head(&chain).await.expect("head").seals;
        assert_eq!(kept.len() as u64, KEPT_SEALS);
        assert_eq!(kept.last().map(|k| k.0), Some(KEPT_SEALS + 3));
        // A restored head is where sealing continues.
        let other = format!("approvals/{tag}");
        store
            .restore_head(&other, (41, "h41"), b"seal 41")
            .await
            .expect("restore");
        assert_eq!(
            store
                .advance(&other, 0, (1, "x"), b"x")
                .await
                .expect("advance"),
            Advance::Moved {
                seq: 41,
                hash: Some("h41".into())
            }
        );
        // A chain sealed on past what a recovery read is not moved back.
        assert_eq!(
            store
                .advance(&other, 41, (42, "h42"), b"seal 42")
                .await
                .expect("advance"),
            Advance::Done
        );
        store
            .restore_head(&other, (41, "h41"), b"seal 41")
            .await
            .expect("restore");
        assert_eq!(
            store
                .advance(&other, 41, (42, "again"), b"x")
                .await
                .expect("advance"),
            Advance::Moved {
                seq: 42,
                hash: Some("h42".into())
            }
        );
    }

    #[cfg(test)]
    #[tokio::test]
    async fn memory_store_meets_the_contract() {
        run_all(&MemoryChainStore::default(), "mem").await;
    }
}
