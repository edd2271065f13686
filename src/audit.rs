//! The audit trail: every decision is one record on `switchyard.audit`, hash-chained per resource.
//!
//! The stage that makes a decision seals its audit record at once ([`Sealer`]): each record gets
//! `seq` (1, 2, ... per resource), `prev_hash` (the previous record's hash) and `hash` = SHA-256 of
//! the record's canonical JSON (keys sorted, no whitespace) without `hash`. A missing, altered or
//! forked record breaks the chain; [`verify`] finds it.
//!
//! Sealing is at-least-once without gaps: the chain head moves in Redis before the record is
//! produced, and the input that caused it is committed only after the record is acknowledged, so a
//! crash in between redelivers the input, and its audit record is sealed again identically (same
//! seq, same hash, from a memo): the verifier drops exact repeats.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use redis::Script;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::context::redis::RedisConn;
use crate::context::{ResourceKey, StoreError};
use crate::event::CloudEvent;
use crate::kafka::runtime::ProcessError;
use crate::kafka::Output;
use crate::records::Emitter;
use crate::telemetry::METRICS;

/// JSON with object keys sorted and no whitespace.
pub fn canonical_json(v: &Value) -> String {
    let mut out = Vec::with_capacity(512);
    write_canonical(&mut out, v);
    // Only JSON text was written: always valid UTF-8.
    String::from_utf8(out).unwrap_or_default()
}

/// Writes `v` canonically into one buffer (no intermediate strings: this runs for every sealed record).
fn write_canonical(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort_unstable();
            out.push(b'{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                // Writing a string or a scalar into a Vec cannot fail.
                let _ = serde_json::to_writer(&mut *out, k);
                out.push(b':');
                write_canonical(out, &m[k]);
            }
            out.push(b'}');
        }
        Value::Array(a) => {
            out.push(b'[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(out, x);
            }
            out.push(b']');
        }
        other => {
            let _ = serde_json::to_writer(&mut *out, other);
        }
    }
}

/// The hash of a sealed audit event: SHA-256 over its canonical JSON without `data.hash`.
pub fn record_hash(ev: &CloudEvent) -> String {
    let mut v = serde_json::to_value(ev).unwrap_or(Value::Null);
    if let Some(d) = v.get_mut("data").and_then(Value::as_object_mut) {
        d.remove("hash");
    }
    hex::encode(Sha256::digest(canonical_json(&v).as_bytes()))
}

/// Seals `ev` as record `seq` after `prev`.
pub fn seal(mut ev: CloudEvent, seq: u64, prev: Option<&str>) -> CloudEvent {
    if let Some(Value::Object(d)) = ev.data.as_mut() {
        d.insert("seq".into(), Value::from(seq));
        match prev {
            Some(p) => d.insert("prev_hash".into(), Value::String(p.to_string())),
            None => d.remove("prev_hash"),
        };
        d.remove("hash");
    }
    let h = record_hash(&ev);
    if let Some(Value::Object(d)) = ev.data.as_mut() {
        d.insert("hash".into(), Value::String(h));
    }
    ev
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

/// Where a sealed record sits in its chain; kept per record id so a redelivery re-seals identically.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Memo {
    seq: u64,
    prev: Option<String>,
    time: Option<String>,
}

/// Heads cached beyond this many resources are forgotten (the cache is only a first guess).
const MAX_CACHED_HEADS: usize = 100_000;

/// Seals audit records into their resource's chain where they are decided, in any stage and any
/// instance.
///
/// Redis holds each chain's head (`<prefix>:auditchain:{t/r}`: `seq`, `hash`). Sealing computes
/// seq, prev_hash and hash locally from the head this process last saw, then one Lua script moves the
/// head only if it is still where it was (compare-and-set; on a conflict it returns the real head and
/// the records are sealed again). The same script stores a memo per record id (seq, prev, time), so a
/// record decided again after a crash or redelivery gets the same place and the same hash: the
/// verifier drops such exact repeats. Several writers append to one chain, so the topic may hold a
/// chain's records out of seq order; the chain (seq, prev_hash) defines the order.
pub struct Sealer {
    conn: RedisConn,
    prefix: String,
    script: Script,
    memo_ttl: u64,
    heads: Mutex<HashMap<ResourceKey, (u64, Option<String>)>>,
    /// One seal at a time per chain in this process: the compare-and-set then only races other
    /// processes, instead of every concurrent task here.
    chain_locks: Mutex<HashMap<ResourceKey, Arc<tokio::sync::Mutex<()>>>>,
    /// Where sealed records go.
    pub topic: String,
}

impl Sealer {
    pub fn new(conn: RedisConn, prefix: &str, memo_ttl: u64, topic: &str) -> Self {
        Sealer {
            conn,
            prefix: prefix.into(),
            script: Script::new(SEAL),
            memo_ttl: memo_ttl.max(1),
            heads: Mutex::new(HashMap::new()),
            chain_locks: Mutex::new(HashMap::new()),
            topic: topic.into(),
        }
    }

    fn head_key(&self, k: &ResourceKey) -> String {
        format!("{}:auditchain:{}", self.prefix, k.hash_tag())
    }

    /// Audit record ids are deterministic per decision (event, task, proposal or approval id plus
    /// the decision), so the id names the record's place across redeliveries.
    fn memo_key(&self, k: &ResourceKey, ev: &CloudEvent) -> String {
        format!("{}:auditmemo:{}:{}", self.prefix, k.hash_tag(), ev.id)
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
        for ev in self.seal_all(records).await.map_err(|e| match e {
            StoreError::Corrupt(d) => ProcessError::Poison {
                reason: "corrupt_state",
                detail: format!("audit chain: {d}"),
            },
            e => ProcessError::Transient(format!("audit chain: {e}")),
        })? {
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
        let redis_err = |e: redis::RedisError| StoreError::Redis(e.to_string());
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
            let mut memos = Vec::with_capacity(pending.len());
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
                memos.push(
                    serde_json::to_string(&memo).map_err(|e| StoreError::Corrupt(e.to_string()))?,
                );
                sealed.push(s);
            }
            let mut inv = self.script.prepare_invoke();
            inv.key(self.head_key(k));
            for ev in &pending {
                inv.key(self.memo_key(k, ev));
            }
            inv.arg(head.0)
                .arg(self.memo_ttl)
                .arg(seq)
                .arg(prev.as_deref().unwrap_or(""));
            for m in &memos {
                inv.arg(m);
            }
            let mut c = self.conn.get().await?;
            let reply: Vec<String> = inv.invoke_async(&mut c).await.map_err(redis_err)?;
            match reply.first().map(String::as_str) {
                Some("ok") => {
                    self.remember(k, (seq, prev));
                    done.extend(sealed);
                    pending.clear();
                }
                Some("conflict") => {
                    let hseq = reply
                        .get(1)
                        .and_then(|s| s.parse().ok())
                        .ok_or_else(|| StoreError::Corrupt("audit chain head seq".into()))?;
                    let hhash = reply.get(2).filter(|h| !h.is_empty()).cloned();
                    head = (hseq, hhash);
                    self.remember(k, head.clone());
                }
                Some("memo") => {
                    // Sealed before (a redelivery): the same place, the same hash.
                    let mut rest = Vec::new();
                    for (ev, m) in pending.drain(..).zip(reply.iter().skip(1)) {
                        if m.is_empty() {
                            rest.push(ev);
                            continue;
                        }
                        let m: Memo = serde_json::from_str(m)
                            .map_err(|e| StoreError::Corrupt(format!("audit memo: {e}")))?;
                        let mut ev = ev;
                        ev.time = m.time;
                        done.push(seal(ev, m.seq, m.prev.as_deref()));
                    }
                    pending = rest;
                }
                other => {
                    return Err(StoreError::Corrupt(format!(
                        "unexpected reply from the seal script: {other:?}"
                    )))
                }
            }
        }
        Ok(done)
    }
}

fn sealed_hash(ev: &CloudEvent) -> Option<String> {
    ev.data
        .as_ref()
        .and_then(|d| d.get("hash"))
        .and_then(Value::as_str)
        .map(str::to_string)
}

/// One problem found by [`verify`].
#[derive(Debug, Clone, PartialEq)]
pub struct ChainProblem {
    pub resource: String,
    pub seq: u64,
    pub offset: i64,
    pub message: String,
}

/// Result of verifying a set of audit records.
#[derive(Debug, Default)]
pub struct Verification {
    pub records: usize,
    pub chains: usize,
    pub duplicates: usize,
    pub problems: Vec<ChainProblem>,
}

/// Checks every resource's chain. Records may come in any order (several stages append to a chain,
/// so the topic can hold them out of seq order); `offset` is only reported with problems.
pub fn verify(records: &[(i64, CloudEvent)]) -> Verification {
    struct Link {
        seq: u64,
        hash: String,
        prev: Option<String>,
        offset: i64,
    }
    let mut v = Verification {
        records: records.len(),
        ..Default::default()
    };
    let mut chains: BTreeMap<(String, String), Vec<Link>> = BTreeMap::new();
    for (offset, ev) in records {
        let resource = ev.subject.clone().unwrap_or_default();
        let d = ev.data.as_ref();
        let seq = d
            .and_then(|d| d.get("seq"))
            .and_then(Value::as_u64)
            .unwrap_or(0);
        let hash = d
            .and_then(|d| d.get("hash"))
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        if record_hash(ev) != hash {
            v.problems.push(ChainProblem {
                resource: resource.clone(),
                seq,
                offset: *offset,
                message: "hash does not match the record's content (altered)".into(),
            });
        }
        let prev = d
            .and_then(|d| d.get("prev_hash"))
            .and_then(Value::as_str)
            .map(str::to_string);
        chains
            .entry((ev.tenant().to_string(), resource))
            .or_default()
            .push(Link {
                seq,
                hash,
                prev,
                offset: *offset,
            });
    }
    v.chains = chains.len();
    for ((_, resource), mut links) in chains {
        links.sort_by_key(|l| l.seq);
        let mut last: Option<&Link> = None;
        for l in &links {
            let mut problem = |m: String| {
                v.problems.push(ChainProblem {
                    resource: resource.clone(),
                    seq: l.seq,
                    offset: l.offset,
                    message: m,
                })
            };
            match last {
                Some(p) if p.seq == l.seq && p.hash == l.hash => {
                    v.duplicates += 1;
                    continue;
                }
                Some(p) if p.seq == l.seq => {
                    problem(format!(
                        "two different records claim seq {} (forked)",
                        l.seq
                    ));
                    continue;
                }
                Some(p) => {
                    if l.seq != p.seq + 1 {
                        problem(format!("seq {} follows {} (records missing)", l.seq, p.seq));
                    }
                    if l.prev.as_deref() != Some(p.hash.as_str()) {
                        problem("prev_hash is not the previous record's hash".into());
                    }
                }
                None => {
                    if l.seq != 1 || l.prev.is_some() {
                        problem(format!(
                            "chain starts at seq {} (records before it are missing)",
                            l.seq
                        ));
                    }
                }
            }
            last = Some(l);
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::types;
    use serde_json::json;

    fn rec(resource: &str, n: u64) -> CloudEvent {
        CloudEvent::new(format!("a-{resource}-{n}"), "t", types::AUDIT)
            .with_subject(resource)
            .with_data(json!({"decision": "accepted", "stage": "resolve", "resource": resource, "tenant": "default", "detail": {"n": n}}))
    }

    fn chain(resource: &str, n: u64) -> Vec<CloudEvent> {
        let mut prev: Option<String> = None;
        (1..=n)
            .map(|i| {
                let s = seal(rec(resource, i), i, prev.as_deref());
                prev = s
                    .data
                    .as_ref()
                    .and_then(|d| d["hash"].as_str())
                    .map(str::to_string);
                s
            })
            .collect()
    }

    fn numbered(v: Vec<CloudEvent>) -> Vec<(i64, CloudEvent)> {
        v.into_iter()
            .enumerate()
            .map(|(i, e)| (i as i64, e))
            .collect()
    }

    #[test]
    fn canonical_json_sorts_keys() {
        assert_eq!(
            canonical_json(&json!({"b": 1, "a": [true, {"d": null, "c": "x"}]})),
            r#"{"a":[true,{"c":"x","d":null}],"b":1}"#
        );
        // Escapes, unicode and numbers are written as serde_json writes them, so hashes of records
        // sealed before this writer existed still verify.
        let v = json!({"z": "quote \" back \\ nl \n tab \t ctl \u{1} é 😀", "n": [1, -2, 2.5, 1e300, 0.1],
                       "o": {"y": {}, "x": []}});
        assert_eq!(canonical_json(&v), serde_json::to_string(&v).unwrap());
    }

    #[test]
    fn intact_chains_verify_and_repeats_are_skipped() {
        let mut all = chain("a", 5);
        all.extend(chain("b", 3));
        let dup = all[2].clone();
        all.insert(3, dup);
        let v = verify(&numbered(all));
        assert!(v.problems.is_empty(), "{:?}", v.problems);
        assert_eq!((v.chains, v.duplicates), (2, 1));
    }

    #[test]
    fn removal_alteration_and_reordering_are_detected() {
        let mut removed = chain("a", 5);
        removed.remove(2);
        assert!(!verify(&numbered(removed)).problems.is_empty());
        let mut altered = chain("a", 5);
        altered[3].data.as_mut().unwrap()["decision"] = json!("rejected");
        let p = verify(&numbered(altered)).problems;
        assert_eq!(p.len(), 1);
        assert!(p[0].message.contains("altered"));
        let mut first_gone = chain("a", 3);
        first_gone.remove(0);
        assert!(!verify(&numbered(first_gone)).problems.is_empty());
        // Several writers append to a chain, so topic order may differ from seq order: fine.
        let mut swapped = chain("a", 4);
        swapped.swap(1, 2);
        assert!(verify(&numbered(swapped)).problems.is_empty());
        // Two different records in one place: a fork.
        let mut forked = chain("a", 3);
        let mut other = rec("a", 99);
        other = seal(other, 2, forked[0].data.as_ref().unwrap()["hash"].as_str());
        forked.push(other);
        let p = verify(&numbered(forked)).problems;
        assert!(p.iter().any(|p| p.message.contains("forked")), "{p:?}");
    }
}
