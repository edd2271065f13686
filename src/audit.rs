//! The audit trail: every decision is one record on `switchyard.audit`, hash-chained per resource.
//!
//! Stages write decisions unsealed to the audit log topic (`topics.audit_log`, keyed by resource). The
//! audit stage owns each resource through that topic's partitions and seals records in order: each
//! gets `seq` (1, 2, ...), `prev_hash` (the previous record's hash) and `hash` =
//! SHA-256 of the record's canonical JSON (keys sorted, no whitespace) without `hash`. A missing,
//! reordered or altered record breaks the chain; [`verify`] finds it.
//!
//! Sealing is at-least-once without gaps: the sealed record is produced and acknowledged before the
//! chain head in Redis moves, and a redelivered record is sealed again identically (same seq, same
//! hash), so the verifier can drop exact repeats.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::codec;
use crate::context::redis::RedisConn;
use crate::context::{ResourceKey, StoreError};
use crate::event::CloudEvent;
use crate::kafka::runtime::{ProcessError, Processor};
use crate::kafka::{Input, Output, Producer};
use crate::records::{types, Emitter};
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

/// Chain heads in Redis: `<prefix>:auditchain:{t/r}` = hash {seq, hash, prev, src}.
pub struct ChainStore {
    conn: RedisConn,
    prefix: String,
}

#[derive(Debug, Default, Clone, PartialEq)]
pub struct Head {
    pub seq: u64,
    pub hash: Option<String>,
    pub prev: Option<String>,
    /// `<partition>:<offset>` of the unsealed record sealed last.
    pub src: Option<(i32, i64)>,
}

impl ChainStore {
    pub fn new(conn: RedisConn, prefix: &str) -> Self {
        ChainStore {
            conn,
            prefix: prefix.into(),
        }
    }

    fn key(&self, k: &ResourceKey) -> String {
        format!("{}:auditchain:{}", self.prefix, k.hash_tag())
    }

    pub async fn head(&self, k: &ResourceKey) -> Result<Head, StoreError> {
        let mut c = self.conn.get().await?;
        let (seq, hash, prev, src): (Option<u64>, Option<String>, Option<String>, Option<String>) =
            redis::cmd("HMGET")
                .arg(self.key(k))
                .arg("seq")
                .arg("hash")
                .arg("prev")
                .arg("src")
                .query_async(&mut c)
                .await
                .map_err(|e| StoreError::Redis(e.to_string()))?;
        let src = src.and_then(|s| {
            let (p, o) = s.split_once(':')?;
            Some((p.parse().ok()?, o.parse().ok()?))
        });
        Ok(Head {
            seq: seq.unwrap_or(0),
            hash,
            prev: prev.filter(|p| !p.is_empty()),
            src,
        })
    }

    pub async fn advance(&self, k: &ResourceKey, h: &Head) -> Result<(), StoreError> {
        let mut c = self.conn.get().await?;
        let src = h.src.map(|(p, o)| format!("{p}:{o}")).unwrap_or_default();
        redis::cmd("HSET")
            .arg(self.key(k))
            .arg("seq")
            .arg(h.seq)
            .arg("hash")
            .arg(h.hash.as_deref().unwrap_or(""))
            .arg("prev")
            .arg(h.prev.as_deref().unwrap_or(""))
            .arg("src")
            .arg(src)
            .query_async::<()>(&mut c)
            .await
            .map_err(|e| StoreError::Redis(e.to_string()))
    }
}

/// The audit stage: seals records of the audit log into `switchyard.audit`.
pub struct AuditStage {
    pub chains: ChainStore,
    pub producer: Producer,
    pub emitter: Emitter,
    pub audit_topic: String,
}

impl Processor for AuditStage {
    fn stage(&self) -> &'static str {
        "audit"
    }

    fn lane(&self, rec: &Input) -> u64 {
        rec.key_lane()
    }

    async fn process(&self, rec: Arc<Input>) -> Result<Vec<Output>, ProcessError> {
        let ev =
            codec::decode(rec.view(), &self.emitter.schemas).map_err(|e| ProcessError::Poison {
                reason: e.reason(),
                detail: e.to_string(),
            })?;
        if ev.ty != types::AUDIT {
            return Err(ProcessError::Poison {
                reason: "not_an_audit_record",
                detail: format!("type {:?}", ev.ty),
            });
        }
        let key = ResourceKey::new(ev.tenant(), ev.subject.clone().unwrap_or_default());
        let t = |e: StoreError| ProcessError::Transient(format!("audit chain: {e}"));
        let head = self.chains.head(&key).await.map_err(t)?;
        let this = (rec.partition, rec.offset);
        let (seq, prev, advance) = match head.src {
            // Redelivery of the record sealed last: seal it again identically.
            Some(src) if src == this => (head.seq, head.prev.clone(), false),
            // Sealed (and produced) before a later one: nothing to do.
            Some((p, o)) if p == rec.partition && o > rec.offset => return Ok(Vec::new()),
            _ => (head.seq + 1, head.hash.clone(), true),
        };
        let sealed = seal(ev, seq, prev.as_deref());
        let out = self.emitter.emit(&self.audit_topic, &sealed)?;
        // Produce and wait before moving the head: the head never points past a record that is not
        // in the topic.
        self.producer
            .send(&out)
            .await
            .map_err(|e| ProcessError::Transient(format!("producing sealed audit record: {e}")))?;
        if advance {
            let hash = sealed
                .data
                .as_ref()
                .and_then(|d| d.get("hash"))
                .and_then(Value::as_str)
                .map(str::to_string);
            self.chains
                .advance(
                    &key,
                    &Head {
                        seq,
                        hash,
                        prev,
                        src: Some(this),
                    },
                )
                .await
                .map_err(t)?;
        }
        METRICS.audit_sealed.with_label_values(&["audit"]).inc();
        Ok(Vec::new())
    }
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

/// Checks every resource's chain in records given in topic order (per partition by offset).
pub fn verify(records: &[(i64, CloudEvent)]) -> Verification {
    let mut v = Verification {
        records: records.len(),
        ..Default::default()
    };
    let mut heads: BTreeMap<(String, String), (u64, String)> = BTreeMap::new();
    for (offset, ev) in records {
        let resource = ev.subject.clone().unwrap_or_default();
        let key = (ev.tenant().to_string(), resource.clone());
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
        let prev = d
            .and_then(|d| d.get("prev_hash"))
            .and_then(Value::as_str)
            .map(str::to_string);
        let mut problem = |m: String| {
            v.problems.push(ChainProblem {
                resource: resource.clone(),
                seq,
                offset: *offset,
                message: m,
            })
        };
        if record_hash(ev) != hash {
            problem("hash does not match the record's content (altered)".into());
        }
        match heads.get(&key) {
            Some((hseq, hhash)) if *hseq == seq && *hhash == hash => {
                v.duplicates += 1;
                continue;
            }
            Some((hseq, hhash)) => {
                if seq != hseq + 1 {
                    problem(format!(
                        "seq {seq} follows {hseq} (records missing or reordered)"
                    ));
                }
                if prev.as_deref() != Some(hhash.as_str()) {
                    problem("prev_hash is not the previous record's hash".into());
                }
            }
            None => {
                if seq != 1 || prev.is_some() {
                    problem(format!(
                        "chain starts at seq {seq} (records before it are missing)"
                    ));
                }
            }
        }
        heads.insert(key, (seq, hash));
    }
    v.chains = heads.len();
    v
}

#[cfg(test)]
mod tests {
    use super::*;
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
        let mut swapped = chain("a", 4);
        swapped.swap(1, 2);
        assert!(!verify(&numbered(swapped)).problems.is_empty());
    }
}
