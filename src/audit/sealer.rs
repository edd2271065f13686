//! Sealing audit records into their resource's chain where they are decided, in any stage and any
//! instance.
//!
//! A [`ChainStore`] holds each chain's head (seq, hash). Sealing computes seq, prev_hash and hash
//! locally from the head this process last saw, then moves the head only if it is still where it was
//! (compare-and-set; on a conflict the store returns the real head and the records are sealed again).
//! The same call stores a memo per record id (seq, prev, time), so a record decided again after a
//! crash or redelivery gets the same place and the same hash: the verifier drops such exact repeats.
//! Several writers append to one chain, so the topic may hold a chain's records out of seq order;
//! the chain (seq, prev_hash) defines the order.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use redis::Script;
use serde::{Deserialize, Serialize};

use super::hash::{seal, sealed_hash};
use crate::error::ProcessError;
use crate::event::CloudEvent;
use crate::kafka::Output;
use crate::records::Emitter;
use crate::store::{RedisConn, ResourceKey, StoreError};
use crate::telemetry::METRICS;

/// What [`ChainStore::advance`] found.
#[derive(Debug, Clone, PartialEq)]
pub enum Advance {
    /// The head moved to the new one and every memo was stored.
    Done,
    /// The head is not where the caller thought: it is here.
    Moved { seq: u64, hash: Option<String> },
    /// Some records were sealed before: their memos (JSON), `None` for the others. Nothing changed.
    Sealed(Vec<Option<String>>),
}

/// Where chain heads and per-record memos live. Boxed futures, so it can be shared as
/// `Arc<dyn ChainStore>`.
pub trait ChainStore: Send + Sync + 'static {
    /// Unless a record of `records` (id, memo) was sealed before, moves the chain's head from seq
    /// `expected` to `head` (seq, hash) and stores each record's memo for `memo_ttl` seconds.
    fn advance<'a>(
        &'a self,
        chain: &'a ResourceKey,
        expected: u64,
        head: (u64, &'a str),
        records: &'a [(&'a str, String)],
        memo_ttl: u64,
    ) -> BoxFuture<'a, Result<Advance, StoreError>>;

    /// Sets a chain's head (recovery from the audit topic after Redis lost its state).
    fn restore_head<'a>(
        &'a self,
        chain: &'a ResourceKey,
        head: (u64, &'a str),
    ) -> BoxFuture<'a, Result<(), StoreError>>;
}

const SEAL: &str = r#"
-- KEYS[1] = chain head (hash: seq, hash); KEYS[2..] = one memo key per record.
-- ARGV[1] = expected head seq, ARGV[2] = memo ttl, ARGV[3] = new head seq, ARGV[4] = new head hash,
-- ARGV[5..] = one memo value per record.
local memos = {'memo'}
local any = false
for i = 2, #KEYS do
  local m = redis.call('GET', KEYS[i])
  if m then any = true end
  memos[#memos + 1] = m or ''
end
if any then return memos end
local seq = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')
if seq ~= tonumber(ARGV[1]) then
  return {'conflict', tostring(seq), redis.call('HGET', KEYS[1], 'hash') or ''}
end
redis.call('HSET', KEYS[1], 'seq', ARGV[3], 'hash', ARGV[4])
for i = 2, #KEYS do redis.call('SET', KEYS[i], ARGV[i + 3], 'EX', ARGV[2]) end
return {'ok'}
"#;

/// Chain heads in Redis: `<prefix>:auditchain:{t/r}` (hash: `seq`, `hash`) and
/// `<prefix>:auditmemo:{t/r}:<record id>`; one Lua script per advance.
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
            script: Script::new(SEAL),
        }
    }
}

impl ChainStore for RedisChainStore {
    fn advance<'a>(
        &'a self,
        chain: &'a ResourceKey,
        expected: u64,
        head: (u64, &'a str),
        records: &'a [(&'a str, String)],
        memo_ttl: u64,
    ) -> BoxFuture<'a, Result<Advance, StoreError>> {
        Box::pin(async move {
            let tag = chain.hash_tag();
            let mut inv = self.script.prepare_invoke();
            inv.key(format!("{}:auditchain:{tag}", self.prefix));
            for (id, _) in records {
                inv.key(format!("{}:auditmemo:{tag}:{id}", self.prefix));
            }
            inv.arg(expected)
                .arg(memo_ttl.max(1))
                .arg(head.0)
                .arg(head.1);
            for (_, m) in records {
                inv.arg(m);
            }
            let mut c = self.conn.get().await?;
            let reply: Vec<String> = inv.invoke_async(&mut c).await?;
            match reply.first().map(String::as_str) {
                Some("ok") => Ok(Advance::Done),
                Some("conflict") => Ok(Advance::Moved {
                    seq: reply
                        .get(1)
                        .and_then(|s| s.parse().ok())
                        .ok_or_else(|| StoreError::Corrupt("audit chain head seq".into()))?,
                    hash: reply.get(2).filter(|h| !h.is_empty()).cloned(),
                }),
                Some("memo") => Ok(Advance::Sealed(
                    reply
                        .into_iter()
                        .skip(1)
                        .map(|m| (!m.is_empty()).then_some(m))
                        .collect(),
                )),
                other => Err(StoreError::Corrupt(format!(
                    "unexpected reply from the seal script: {other:?}"
                ))),
            }
        })
    }

    fn restore_head<'a>(
        &'a self,
        chain: &'a ResourceKey,
        head: (u64, &'a str),
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let mut c = self.conn.get_unguarded().await?;
            Ok(redis::cmd("HSET")
                .arg(format!("{}:auditchain:{}", self.prefix, chain.hash_tag()))
                .arg("seq")
                .arg(head.0)
                .arg("hash")
                .arg(head.1)
                .query_async::<()>(&mut c)
                .await?)
        })
    }
}

/// Heads by chain, memos by (chain, record id).
type MemoryChains = (
    HashMap<ResourceKey, (u64, String)>,
    HashMap<(ResourceKey, String), String>,
);

/// In-memory twin of [`RedisChainStore`] for unit tests (memos never expire).
#[derive(Default)]
pub struct MemoryChainStore {
    state: Mutex<MemoryChains>,
}

impl ChainStore for MemoryChainStore {
    fn advance<'a>(
        &'a self,
        chain: &'a ResourceKey,
        expected: u64,
        head: (u64, &'a str),
        records: &'a [(&'a str, String)],
        _memo_ttl: u64,
    ) -> BoxFuture<'a, Result<Advance, StoreError>> {
        Box::pin(async move {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let (heads, memos) = &mut *st;
            let found: Vec<Option<String>> = records
                .iter()
                .map(|(id, _)| memos.get(&(chain.clone(), id.to_string())).cloned())
                .collect();
            if found.iter().any(Option::is_some) {
                return Ok(Advance::Sealed(found));
            }
            let (seq, hash) = heads.get(chain).cloned().unwrap_or((0, String::new()));
            if seq != expected {
                return Ok(Advance::Moved {
                    seq,
                    hash: (!hash.is_empty()).then_some(hash),
                });
            }
            heads.insert(chain.clone(), (head.0, head.1.to_string()));
            for (id, m) in records {
                memos.insert((chain.clone(), id.to_string()), m.clone());
            }
            Ok(Advance::Done)
        })
    }

    fn restore_head<'a>(
        &'a self,
        chain: &'a ResourceKey,
        head: (u64, &'a str),
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            st.0.insert(chain.clone(), (head.0, head.1.to_string()));
            Ok(())
        })
    }
}

/// Where a sealed record sits in its chain; kept per record id so a redelivery re-seals identically.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Memo {
    seq: u64,
    prev: Option<String>,
    time: Option<String>,
}

/// Heads cached beyond this many resources are forgotten (the cache is only a first guess).
const MAX_CACHED_HEADS: usize = 100_000;

/// Seals audit records into their resource's chain (see the module documentation).
pub struct Sealer {
    store: Arc<dyn ChainStore>,
    memo_ttl: u64,
    heads: Mutex<HashMap<ResourceKey, (u64, Option<String>)>>,
    /// One seal at a time per chain in this process: the compare-and-set then only races other
    /// processes, instead of every concurrent task here.
    chain_locks: Mutex<HashMap<ResourceKey, Arc<tokio::sync::Mutex<()>>>>,
    /// Where sealed records go.
    pub topic: String,
}

impl Sealer {
    pub fn new(store: Arc<dyn ChainStore>, memo_ttl: u64, topic: &str) -> Self {
        Sealer {
            store,
            memo_ttl: memo_ttl.max(1),
            heads: Mutex::new(HashMap::new()),
            chain_locks: Mutex::new(HashMap::new()),
            topic: topic.into(),
        }
    }

    fn cached(&self, k: &ResourceKey) -> (u64, Option<String>) {
        self.heads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(k)
            .cloned()
            .unwrap_or((0, None))
    }

    fn remember(&self, k: &ResourceKey, head: (u64, Option<String>)) {
        let mut heads = self.heads.lock().unwrap_or_else(|e| e.into_inner());
        if heads.len() >= MAX_CACHED_HEADS && !heads.contains_key(k) {
            heads.clear();
        }
        heads.insert(k.clone(), head);
    }

    /// Seals `records` (audit events, in decision order) and encodes them for the audit topic.
    pub async fn outputs(
        &self,
        stage: &'static str,
        emitter: &Emitter,
        records: Vec<CloudEvent>,
    ) -> Result<Vec<Output>, ProcessError> {
        let mut out = Vec::with_capacity(records.len());
        let sealed = self
            .seal_all(records)
            .await
            .map_err(|e| ProcessError::from(e).context("audit chain"))?;
        for ev in sealed {
            out.push(emitter.emit(&self.topic, &ev)?);
        }
        METRICS
            .audit_sealed
            .with_label_values(&[stage])
            .inc_by(out.len() as u64);
        Ok(out)
    }

    /// Seals records, grouped by resource (order within a resource is kept).
    pub async fn seal_all(&self, records: Vec<CloudEvent>) -> Result<Vec<CloudEvent>, StoreError> {
        let mut groups: Vec<(ResourceKey, Vec<CloudEvent>)> = Vec::new();
        for ev in records {
            let k = ResourceKey::new(ev.tenant(), ev.subject.clone().unwrap_or_default());
            match groups.iter_mut().find(|(g, _)| *g == k) {
                Some((_, v)) => v.push(ev),
                None => groups.push((k, vec![ev])),
            }
        }
        let mut out = Vec::new();
        for (k, evs) in groups {
            out.extend(self.seal_chain(&k, evs).await?);
        }
        Ok(out)
    }

    async fn seal_chain(
        &self,
        k: &ResourceKey,
        pending: Vec<CloudEvent>,
    ) -> Result<Vec<CloudEvent>, StoreError> {
        let lock = self
            .chain_locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(k.clone())
            .or_default()
            .clone();
        let sealed = {
            let _one_at_a_time = lock.lock().await;
            self.seal_chain_locked(k, pending).await
        };
        let mut locks = self.chain_locks.lock().unwrap_or_else(|e| e.into_inner());
        // Only the map and this call hold it: nobody waits, forget it.
        if Arc::strong_count(&lock) == 2 {
            locks.remove(k);
        }
        sealed
    }

    async fn seal_chain_locked(
        &self,
        k: &ResourceKey,
        mut pending: Vec<CloudEvent>,
    ) -> Result<Vec<CloudEvent>, StoreError> {
        // Ids name the memos: two records with one id would share a place in the chain.
        let mut ids: Vec<&str> = pending.iter().map(|e| e.id.as_str()).collect();
        ids.sort_unstable();
        if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
            return Err(StoreError::Corrupt(format!(
                "two audit records share the id {}",
                w[0]
            )));
        }
        let mut done = Vec::with_capacity(pending.len());
        let mut head = self.cached(k);
        let mut attempts = 0;
        while !pending.is_empty() {
            attempts += 1;
            if attempts > 50 {
                return Err(StoreError::Redis(
                    "audit chain head kept changing; retrying".into(),
                ));
            }
            if attempts > 3 {
                // A chain busy in other processes: back off, with jitter, to let them through.
                let jitter = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.subsec_nanos() % 5)
                    .unwrap_or(0);
                tokio::time::sleep(std::time::Duration::from_millis(
                    (attempts * 2 + jitter as u64).min(100),
                ))
                .await;
            }
            let mut sealed = Vec::with_capacity(pending.len());
            let mut records = Vec::with_capacity(pending.len());
            let (mut seq, mut prev) = head.clone();
            for ev in &pending {
                seq += 1;
                let s = seal(ev.clone(), seq, prev.as_deref());
                let memo = Memo {
                    seq,
                    prev: prev.clone(),
                    time: s.time.clone(),
                };
                prev = sealed_hash(&s);
                records.push((
                    ev.id.as_str(),
                    serde_json::to_string(&memo).map_err(|e| StoreError::Corrupt(e.to_string()))?,
                ));
                sealed.push(s);
            }
            let reply = self
                .store
                .advance(
                    k,
                    head.0,
                    (seq, prev.as_deref().unwrap_or("")),
                    &records,
                    self.memo_ttl,
                )
                .await?;
            match reply {
                Advance::Done => {
                    self.remember(k, (seq, prev));
                    done.extend(sealed);
                    pending.clear();
                }
                Advance::Moved { seq, hash } => {
                    head = (seq, hash);
                    self.remember(k, head.clone());
                }
                Advance::Sealed(memos) => {
                    // Sealed before (a redelivery): the same place, the same hash.
                    let mut rest = Vec::new();
                    for (ev, m) in pending.drain(..).zip(memos) {
                        let Some(m) = m else {
                            rest.push(ev);
                            continue;
                        };
                        let m: Memo = serde_json::from_str(&m)
                            .map_err(|e| StoreError::Corrupt(format!("audit memo: {e}")))?;
                        let mut ev = ev;
                        ev.time = m.time;
                        done.push(seal(ev, m.seq, m.prev.as_deref()));
                    }
                    pending = rest;
                }
            }
        }
        Ok(done)
    }
}

/// The contract every [`ChainStore`] meets; run against the memory twin (unit test) and Redis
/// (integration test). `tag` keeps runs apart in a shared Redis.
#[doc(hidden)]
pub mod contract {
    use super::*;

    pub async fn run_all(store: &dyn ChainStore, tag: &str) {
        let k = ResourceKey::new("default", format!("chain-{tag}"));
        let a = [("rec-a", "{\"seq\":1}".to_string())];
        assert_eq!(
            store
                .advance(&k, 0, (1, "h1"), &a, 60)
                .await
                .expect("advance"),
            Advance::Done
        );
        // The same record again: its memo, nothing moves.
        assert_eq!(
            store
                .advance(&k, 1, (2, "h2"), &a, 60)
                .await
                .expect("advance"),
            Advance::Sealed(vec![Some("{\"seq\":1}".to_string())])
        );
        // A stale expectation: the real head.
        let b = [("rec-b", "{\"seq\":2}".to_string())];
        assert_eq!(
            store
                .advance(&k, 0, (1, "x"), &b, 60)
                .await
                .expect("advance"),
            Advance::Moved {
                seq: 1,
                hash: Some("h1".into())
            }
        );
        assert_eq!(
            store
                .advance(&k, 1, (2, "h2"), &b, 60)
                .await
                .expect("advance"),
            Advance::Done
        );
        // A restored head is where sealing continues.
        let other = ResourceKey::new("default", format!("restored-{tag}"));
        store
            .restore_head(&other, (41, "h41"))
            .await
            .expect("restore");
        assert_eq!(
            store
                .advance(&other, 0, (1, "x"), &[("r1", String::new())], 60)
                .await
                .expect("advance"),
            Advance::Moved {
                seq: 41,
                hash: Some("h41".into())
            }
        );
        let mixed = [("rec-b", String::new()), ("rec-c", String::new())];
        assert_eq!(
            store
                .advance(&k, 2, (3, "h3"), &mixed, 60)
                .await
                .expect("advance"),
            Advance::Sealed(vec![Some("{\"seq\":2}".to_string()), None])
        );
    }

    #[cfg(test)]
    #[tokio::test]
    async fn memory_store_meets_the_contract() {
        run_all(&MemoryChainStore::default(), "mem").await;
    }

    #[cfg(test)]
    #[tokio::test]
    async fn concurrent_sealers_keep_one_gapless_chain() {
        use crate::records::types;
        let store: Arc<dyn ChainStore> = Arc::new(MemoryChainStore::default());
        let sealers = [
            Arc::new(Sealer::new(store.clone(), 60, "audit")),
            Arc::new(Sealer::new(store, 60, "audit")),
        ];
        let mut tasks = Vec::new();
        for i in 0..40 {
            let s = sealers[i % 2].clone();
            tasks.push(tokio::spawn(async move {
                let ev = CloudEvent::new(format!("a-{i}"), "t", types::AUDIT)
                    .with_subject("svc")
                    .with_data(serde_json::json!({"decision": "x", "n": i}));
                s.seal_all(vec![ev]).await
            }));
        }
        let mut sealed = Vec::new();
        for t in tasks {
            sealed.extend(t.await.expect("join").expect("seal"));
        }
        let records: Vec<(i64, CloudEvent)> = sealed.into_iter().map(|e| (0, e)).collect();
        let v = crate::audit::verify::verify(&records);
        assert!(v.problems.is_empty(), "{:?}", v.problems);
        assert_eq!(v.records, 40);
    }
}
