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
//! inputs are redelivered and their byte-identical records sealed again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use redis::Script;
use serde::{Deserialize, Serialize};

use super::hash::{merkle_root, payload_hash};
use crate::error::ProcessError;
use crate::event::CloudEvent;
use crate::kafka::Output;
use crate::records::Emitter;
use crate::store::{RedisConn, StoreError};
use crate::telemetry::METRICS;

/// Event type of a batch's seal record on the audit topic.
pub const SEAL_TYPE: &str = "switchyard.audit.seal";
/// Source attribute of seal records.
pub const SEAL_SOURCE: &str = "switchyard/audit";

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
}

/// What [`ChainStore::advance`] found.
#[derive(Debug, Clone, PartialEq)]
pub enum Advance {
    /// The head moved to the new one.
    Done,
    /// The head is not where the caller thought: it is here.
    Moved { seq: u64, hash: Option<String> },
}

/// Where chain heads live. Boxed futures, so it can be shared as `Arc<dyn ChainStore>`.
pub trait ChainStore: Send + Sync + 'static {
    /// The chain's head: (seq, hash of that seal); (0, None) before its first seal.
    fn head<'a>(
        &'a self,
        chain: &'a str,
    ) -> BoxFuture<'a, Result<(u64, Option<String>), StoreError>>;

    /// Moves the chain's head from seq `expected` to `head` (seq, hash), unless it moved.
    fn advance<'a>(
        &'a self,
        chain: &'a str,
        expected: u64,
        head: (u64, &'a str),
    ) -> BoxFuture<'a, Result<Advance, StoreError>>;

    /// Sets a chain's head (recovery from the audit topic after Redis lost its state).
    fn restore_head<'a>(
        &'a self,
        chain: &'a str,
        head: (u64, &'a str),
    ) -> BoxFuture<'a, Result<(), StoreError>>;
}

const ADVANCE: &str = r#"
-- KEYS[1] = chain head (hash: seq, hash); ARGV[1] = expected seq, ARGV[2] = new seq, ARGV[3] = new hash
local seq = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')
if seq ~= tonumber(ARGV[1]) then
  return {'moved', tostring(seq), redis.call('HGET', KEYS[1], 'hash') or ''}
end
redis.call('HSET', KEYS[1], 'seq', ARGV[2], 'hash', ARGV[3])
return {'ok'}
"#;

/// Chain heads in Redis: `<prefix>:auditchain:{<chain>}` (hash: `seq`, `hash`), one script call per
/// sealed batch.
pub struct RedisChainStore {
    conn: RedisConn,
    prefix: String,
    script: Script,
}

impl RedisChainStore {
    pub fn new(conn: RedisConn, prefix: &str) -> Self {
        RedisChainStore {
            conn,
            prefix: prefix.into(),
            script: Script::new(ADVANCE),
        }
    }

    fn key(&self, chain: &str) -> String {
        format!(
            "{}:auditchain:{{{}}}",
            self.prefix,
            chain.replace(['{', '}'], "_")
        )
    }
}

impl ChainStore for RedisChainStore {
    fn head<'a>(
        &'a self,
        chain: &'a str,
    ) -> BoxFuture<'a, Result<(u64, Option<String>), StoreError>> {
        Box::pin(async move {
            let mut c = self.conn.get().await?;
            let (seq, hash): (Option<u64>, Option<String>) = redis::cmd("HMGET")
                .arg(self.key(chain))
                .arg("seq")
                .arg("hash")
                .query_async(&mut c)
                .await?;
            Ok((seq.unwrap_or(0), hash.filter(|h| !h.is_empty())))
        })
    }

    fn advance<'a>(
        &'a self,
        chain: &'a str,
        expected: u64,
        head: (u64, &'a str),
    ) -> BoxFuture<'a, Result<Advance, StoreError>> {
        Box::pin(async move {
            let mut inv = self.script.prepare_invoke();
            inv.key(self.key(chain))
                .arg(expected)
                .arg(head.0)
                .arg(head.1);
            let mut c = self.conn.get().await?;
            let reply: Vec<String> = inv.invoke_async(&mut c).await?;
            match reply.first().map(String::as_str) {
                Some("ok") => Ok(Advance::Done),
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
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let mut c = self.conn.get().await?;
            Ok(redis::cmd("HSET")
                .arg(self.key(chain))
                .arg("seq")
                .arg(head.0)
                .arg("hash")
                .arg(head.1)
                .query_async::<()>(&mut c)
                .await?)
        })
    }
}

/// In-memory twin of [`RedisChainStore`] for unit tests.
#[derive(Default)]
pub struct MemoryChainStore {
    heads: Mutex<HashMap<String, (u64, String)>>,
}

impl ChainStore for MemoryChainStore {
    fn head<'a>(
        &'a self,
        chain: &'a str,
    ) -> BoxFuture<'a, Result<(u64, Option<String>), StoreError>> {
        Box::pin(async move {
            let heads = self.heads.lock().unwrap_or_else(|e| e.into_inner());
            Ok(heads
                .get(chain)
                .map(|(s, h)| (*s, Some(h.clone())))
                .unwrap_or((0, None)))
        })
    }

    fn advance<'a>(
        &'a self,
        chain: &'a str,
        expected: u64,
        head: (u64, &'a str),
    ) -> BoxFuture<'a, Result<Advance, StoreError>> {
        Box::pin(async move {
            let mut heads = self.heads.lock().unwrap_or_else(|e| e.into_inner());
            let (seq, hash) = heads.get(chain).cloned().unwrap_or((0, String::new()));
            if seq != expected {
                return Ok(Advance::Moved {
                    seq,
                    hash: (!hash.is_empty()).then_some(hash),
                });
            }
            heads.insert(chain.to_string(), (head.0, head.1.to_string()));
            Ok(Advance::Done)
        })
    }

    fn restore_head<'a>(
        &'a self,
        chain: &'a str,
        head: (u64, &'a str),
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            self.heads
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(chain.to_string(), (head.0, head.1.to_string()));
            Ok(())
        })
    }
}

/// Heads cached beyond this many chains are forgotten (the cache is only a first guess).
const MAX_CACHED_HEADS: usize = 10_000;

/// Seals batches of audit records into their chains (see the module documentation).
pub struct Sealer {
    store: Arc<dyn ChainStore>,
    heads: Mutex<HashMap<String, (u64, Option<String>)>>,
    /// One seal at a time per chain in this process: the compare-and-set then only races other
    /// processes (a zombie owner of a partition, a second API instance).
    chain_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Where audit records and seals go.
    pub topic: String,
    /// This process's chain for decisions that come from no partition (the approvals API, the CLI,
    /// the expiry sweeper).
    pub own_chain: String,
}

impl Sealer {
    pub fn new(store: Arc<dyn ChainStore>, topic: &str) -> Self {
        Sealer {
            store,
            heads: Mutex::new(HashMap::new()),
            chain_locks: Mutex::new(HashMap::new()),
            topic: topic.into(),
            own_chain: format!("approvals/{}", uuid::Uuid::new_v4().simple()),
        }
    }

    /// The chain of a stage reading `topic`'s `partition`.
    pub fn chain(stage: &str, topic: &str, partition: i32) -> String {
        format!("{stage}/{topic}/{partition}")
    }

    /// Encodes `records` (audit events) for the audit topic and seals them as one batch of `chain`:
    /// the records' outputs and the seal's.
    pub async fn seal(
        &self,
        stage: &'static str,
        chain: &str,
        emitter: &Emitter,
        records: &[CloudEvent],
    ) -> Result<(Vec<Output>, Output), ProcessError> {
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
        let seal = self
            .seal_entries(chain, emitter, entries)
            .await
            .map_err(|e| ProcessError::from(e).context("audit chain"))?;
        METRICS
            .audit_sealed
            .with_label_values(&[stage])
            .inc_by(outs.len() as u64);
        Ok((outs, seal))
    }

    /// Seals already encoded entries as one batch of `chain`; returns the seal record.
    pub async fn seal_entries(
        &self,
        chain: &str,
        emitter: &Emitter,
        entries: Vec<SealEntry>,
    ) -> Result<Output, StoreError> {
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
    ) -> Result<Output, StoreError> {
        let hashes: Vec<String> = entries.iter().map(|e| e.hash.clone()).collect();
        let root = merkle_root(&hashes);
        let cached = self
            .heads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(chain)
            .cloned();
        let mut head = match cached {
            Some(h) => h,
            None => self.store.head(chain).await?,
        };
        let mut data = SealData {
            version: 2,
            chain: chain.to_string(),
            seq: 0,
            prev: None,
            root,
            entries,
        };
        for attempt in 0..50 {
            if attempt > 3 {
                // A chain busy in another process: back off a little.
                tokio::time::sleep(std::time::Duration::from_millis(attempt * 2)).await;
            }
            data.seq = head.0 + 1;
            data.prev = head.1.clone();
            let ev = CloudEvent::new(
                format!(
                    "seal-{}",
                    crate::pattern::stable_id(&[chain, &data.seq.to_string()])
                ),
                SEAL_SOURCE,
                SEAL_TYPE,
            )
            .with_subject(chain)
            .with_time_now()
            .with_data(serde_json::to_value(&data).map_err(|e| StoreError::corrupt("seal", e))?);
            let out = emitter
                .emit(&self.topic, &ev)
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let hash = payload_hash(&out.payload);
            match self.store.advance(chain, head.0, (data.seq, &hash)).await? {
                Advance::Done => {
                    self.remember(chain, (data.seq, Some(hash)));
                    return Ok(out);
                }
                Advance::Moved { seq, hash } => head = (seq, hash),
            }
        }
        Err(StoreError::Redis(
            "audit chain head kept changing; retrying".into(),
        ))
    }

    fn remember(&self, chain: &str, head: (u64, Option<String>)) {
        let mut heads = self.heads.lock().unwrap_or_else(|e| e.into_inner());
        if heads.len() >= MAX_CACHED_HEADS && !heads.contains_key(chain) {
            heads.clear();
        }
        heads.insert(chain.to_string(), head);
    }
}

/// The contract every [`ChainStore`] meets; run against the memory twin (unit test) and Redis
/// (integration test). `tag` keeps runs apart in a shared Redis.
#[doc(hidden)]
pub mod contract {
    use super::*;

    pub async fn run_all(store: &dyn ChainStore, tag: &str) {
        let chain = format!("stage/topic-{tag}/0");
        assert_eq!(store.head(&chain).await.expect("head"), (0, None));
        assert_eq!(
            store.advance(&chain, 0, (1, "h1")).await.expect("advance"),
            Advance::Done
        );
        assert_eq!(
            store.head(&chain).await.expect("head"),
            (1, Some("h1".into()))
        );
        // A stale expectation: the real head, nothing changed.
        assert_eq!(
            store.advance(&chain, 0, (1, "x")).await.expect("advance"),
            Advance::Moved {
                seq: 1,
                hash: Some("h1".into())
            }
        );
        assert_eq!(
            store.advance(&chain, 1, (2, "h2")).await.expect("advance"),
            Advance::Done
        );
        // A restored head is where sealing continues.
        let other = format!("approvals/{tag}");
        store
            .restore_head(&other, (41, "h41"))
            .await
            .expect("restore");
        assert_eq!(
            store.advance(&other, 0, (1, "x")).await.expect("advance"),
            Advance::Moved {
                seq: 41,
                hash: Some("h41".into())
            }
        );
    }

    #[cfg(test)]
    #[tokio::test]
    async fn memory_store_meets_the_contract() {
        run_all(&MemoryChainStore::default(), "mem").await;
    }
}
