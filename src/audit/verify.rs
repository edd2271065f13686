//! Checking the audit trail read back from the topic (`switchyard audit verify`).
//!
//! Version 2 (sealed per batch, [`super::sealer`]): every chain's seals must run 1, 2, 3, ... each
//! naming the previous seal's hash and the Merkle root of its entries; every record a seal lists
//! must be on the topic (same bytes), and every record on the topic must be listed by a seal.
//! Version 1 (chained per resource, written before): every resource's chain must run 1, 2, 3, ...
//! with each record's `prev_hash` the previous record's hash and its own hash matching its content.
//! A topic may hold both.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde_json::Value;

use super::hash::{merkle_root, payload_hash, record_hash};
use super::sealer::{SealData, SEAL_TYPE};
use crate::event::CloudEvent;
use crate::records::types;

/// One record read back from an audit topic.
#[derive(Debug, Clone)]
pub struct AuditRecord {
    pub partition: i32,
    pub offset: i64,
    /// SHA-256 of the payload bytes.
    pub hash: String,
    pub event: CloudEvent,
}

impl AuditRecord {
    /// A structured-JSON record (what switchyard writes unless the audit topic is Avro).
    pub fn new(partition: i32, offset: i64, payload: Vec<u8>) -> Self {
        let event = serde_json::from_slice(&payload).unwrap_or_else(|_| {
            CloudEvent::new(format!("unreadable-{partition}-{offset}"), "?", "?")
        });
        AuditRecord::decoded(partition, offset, &payload, event)
    }

    /// A record whose event the caller decoded.
    pub fn decoded(partition: i32, offset: i64, payload: &[u8], event: CloudEvent) -> Self {
        AuditRecord {
            partition,
            offset,
            hash: payload_hash(payload),
            event,
        }
    }

    fn place(&self) -> String {
        format!("{}@{}", self.partition, self.offset)
    }
}

/// One problem found by [`verify`].
#[derive(Debug, Clone, PartialEq)]
pub struct ChainProblem {
    /// The resource (version 1) or chain (version 2) it is about.
    pub chain: String,
    pub seq: u64,
    /// `partition@offset` of the record it was found at.
    pub at: String,
    pub message: String,
}

/// Result of verifying an audit topic.
#[derive(Debug, Default)]
pub struct Verification {
    /// Decision records (both versions).
    pub records: usize,
    /// Seal records (version 2).
    pub seals: usize,
    /// Chains: per resource (version 1) and per stage-partition (version 2).
    pub chains: usize,
    /// Exact repeats (a redelivered input, a retried request) skipped.
    pub duplicates: usize,
    pub problems: Vec<ChainProblem>,
}

/// Checks every chain of both versions; records may come in any order.
pub fn verify(records: &[AuditRecord]) -> Verification {
    let mut v = Verification::default();
    let (mut v1, mut v2, mut seals) = (Vec::new(), Vec::new(), Vec::new());
    for r in records {
        if r.event.ty == SEAL_TYPE {
            seals.push(r);
        } else if r
            .event
            .data
            .as_ref()
            // A version 1 record carries its place in its resource's chain; version 2 records
            // have none (in Avro the field is there, null).
            .is_some_and(|d| d.get("seq").is_some_and(|s| !s.is_null()))
        {
            v1.push(r);
        } else {
            v2.push(r);
        }
    }
    v.records = v1.len() + v2.len();
    v.seals = seals.len();
    verify_v1(&v1, &mut v);
    verify_v2(&v2, &seals, &mut v);
    v
}

fn verify_v2(records: &[&AuditRecord], seals: &[&AuditRecord], v: &mut Verification) {
    let mut present: HashSet<&str> = HashSet::new();
    for r in records {
        if r.event.ty != types::AUDIT {
            v.problems.push(ChainProblem {
                chain: r.event.subject.clone().unwrap_or_default(),
                seq: 0,
                at: r.place(),
                message: format!("type {:?} is not an audit record", r.event.ty),
            });
        }
        if !present.insert(r.hash.as_str()) {
            v.duplicates += 1;
        }
    }
    let mut chains: BTreeMap<String, Vec<(&AuditRecord, SealData)>> = BTreeMap::new();
    for s in seals {
        match s.event.data.clone().map(serde_json::from_value::<SealData>) {
            Some(Ok(d)) => chains.entry(d.chain.clone()).or_default().push((s, d)),
            _ => v.problems.push(ChainProblem {
                chain: s.event.subject.clone().unwrap_or_default(),
                seq: 0,
                at: s.place(),
                message: "a seal record whose data is not a seal (altered)".into(),
            }),
        }
    }
    v.chains += chains.len();
    let mut listed: HashSet<String> = HashSet::new();
    for (chain, mut list) in chains {
        list.sort_by_key(|a| a.1.seq);
        let mut last: Option<&(&AuditRecord, SealData)> = None;
        for item in &list {
            let (rec, seal) = item;
            let mut problem = |m: String| {
                v.problems.push(ChainProblem {
                    chain: chain.clone(),
                    seq: seal.seq,
                    at: rec.place(),
                    message: m,
                })
            };
            let hashes: Vec<String> = seal.entries.iter().map(|e| e.hash.clone()).collect();
            if merkle_root(&hashes) != seal.root {
                problem("the seal's root is not the Merkle root of its entries (altered)".into());
            }
            for e in &seal.entries {
                if !present.contains(e.hash.as_str()) {
                    problem(format!(
                        "record {} of {}/{} that this seal lists is missing",
                        e.id, e.tenant, e.resource
                    ));
                }
                listed.insert(e.hash.clone());
            }
            match last {
                Some((prev_rec, prev)) if prev.seq == seal.seq => {
                    if prev_rec.hash == rec.hash {
                        v.duplicates += 1;
                        continue;
                    }
                    problem(format!(
                        "two different seals claim seq {} (forked)",
                        seal.seq
                    ));
                    continue;
                }
                Some((prev_rec, prev)) => {
                    if seal.seq != prev.seq + 1 {
                        problem(format!(
                            "seal {} follows {} (seals missing)",
                            seal.seq, prev.seq
                        ));
                    } else if seal.prev.as_deref() != Some(prev_rec.hash.as_str()) {
                        problem("prev is not the previous seal's hash (altered)".into());
                    }
                }
                None => {
                    if seal.seq != 1 || seal.prev.is_some() {
                        problem(format!(
                            "chain starts at seal {} (seals before it are missing, or expired)",
                            seal.seq
                        ));
                    }
                }
            }
            last = Some(item);
        }
    }
    let mut reported = HashSet::new();
    for r in records {
        if !listed.contains(&r.hash) && reported.insert(r.hash.as_str()) {
            v.problems.push(ChainProblem {
                chain: r.event.subject.clone().unwrap_or_default(),
                seq: 0,
                at: r.place(),
                message: format!(
                    "record {} is in no seal (altered, or its batch's seal is missing)",
                    r.event.id
                ),
            });
        }
    }
}

fn verify_v1(records: &[&AuditRecord], v: &mut Verification) {
    struct Link {
        seq: u64,
        hash: String,
        prev: Option<String>,
        at: String,
    }
    let mut chains: BTreeMap<(String, String), Vec<Link>> = BTreeMap::new();
    for r in records {
        let ev = &r.event;
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
                chain: resource.clone(),
                seq,
                at: r.place(),
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
                at: r.place(),
            });
    }
    v.chains += chains.len();
    for ((_, resource), mut links) in chains {
        links.sort_by_key(|l| l.seq);
        let mut last: Option<&Link> = None;
        for l in &links {
            let mut problem = |m: String| {
                v.problems.push(ChainProblem {
                    chain: resource.clone(),
                    seq: l.seq,
                    at: l.at.clone(),
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
}

/// Which resources' records a topic's seals list, per resource: (tenant, resource) → record ids,
/// in seal order — one resource's history, each record proven by its seal.
pub fn seal_index(records: &[AuditRecord]) -> HashMap<(String, String), Vec<String>> {
    let mut out: HashMap<(String, String), Vec<String>> = HashMap::new();
    let mut seals: Vec<SealData> = records
        .iter()
        .filter(|r| r.event.ty == SEAL_TYPE)
        .filter_map(|r| serde_json::from_value(r.event.data.clone()?).ok())
        .collect();
    seals.sort_by(|a, b| (&a.chain, a.seq).cmp(&(&b.chain, b.seq)));
    for s in seals {
        for e in s.entries {
            out.entry((e.tenant, e.resource)).or_default().push(e.id);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::sealer::{MemoryChainStore, Sealer};
    use crate::kafka::Output;
    use crate::records::Emitter;
    use serde_json::json;
    use std::sync::Arc;

    fn rec(resource: &str, n: u64) -> CloudEvent {
        CloudEvent::new(format!("a-{resource}-{n}"), "t", types::AUDIT)
            .with_subject(resource)
            .with_time("2026-01-01T00:00:00Z")
            .with_data(json!({"decision": "accepted", "stage": "resolve", "resource": resource, "tenant": "default", "detail": {"n": n}}))
    }

    /// Three batches of a chain: records and seals as written.
    async fn written() -> Vec<Output> {
        let sealer = Sealer::new(Arc::new(MemoryChainStore::default()), "audit");
        let emitter = Emitter::new(Default::default(), Default::default());
        let mut out = Vec::new();
        for batch in 0..3 {
            let recs: Vec<CloudEvent> = (0..3).map(|i| rec("svc", batch * 3 + i)).collect();
            let (outs, seal) = sealer
                .seal("resolve", "resolve/p/0", &emitter, &recs)
                .await
                .unwrap();
            out.extend(outs);
            out.extend(seal.seals);
        }
        out
    }

    fn read(outs: &[Output]) -> Vec<AuditRecord> {
        outs.iter()
            .enumerate()
            .map(|(i, o)| AuditRecord::new(0, i as i64, o.payload.clone()))
            .collect()
    }

    #[tokio::test]
    async fn intact_trails_verify_and_repeats_are_skipped() {
        let mut outs = written().await;
        let v = verify(&read(&outs));
        assert!(v.problems.is_empty(), "{:?}", v.problems);
        assert_eq!((v.records, v.seals, v.chains), (9, 3, 1));
        // A redelivered batch: the same bytes again, sealed again.
        outs.push(outs[0].clone());
        let v = verify(&read(&outs));
        assert!(v.problems.is_empty(), "{:?}", v.problems);
        assert_eq!(v.duplicates, 1);
        let index = seal_index(&read(&outs));
        assert_eq!(index[&("default".into(), "svc".into())].len(), 9);
    }

    #[tokio::test]
    async fn removal_alteration_and_forks_are_detected() {
        let outs = written().await;
        // A record removed.
        let mut removed = outs.clone();
        removed.remove(1);
        let p = verify(&read(&removed)).problems;
        assert!(p.iter().any(|p| p.message.contains("is missing")), "{p:?}");
        // A record altered.
        let mut altered = outs.clone();
        altered[2].payload = String::from_utf8(altered[2].payload.clone())
            .unwrap()
            .replace("accepted", "rejected")
            .into_bytes();
        let p = verify(&read(&altered)).problems;
        assert!(p.iter().any(|p| p.message.contains("in no seal")), "{p:?}");
        // A seal removed.
        let mut no_seal = outs.clone();
        no_seal.remove(7);
        let p = verify(&read(&no_seal)).problems;
        assert!(
            p.iter().any(|p| p.message.contains("seals missing")),
            "{p:?}"
        );
        // A seal altered.
        let mut bad_seal = outs.clone();
        bad_seal[3].payload = String::from_utf8(bad_seal[3].payload.clone())
            .unwrap()
            .replace("\"root\":\"", "\"root\":\"0")
            .into_bytes();
        let p = verify(&read(&bad_seal)).problems;
        assert!(!p.is_empty());
        // A fork: another chain of seals from seq 1.
        let mut forked = outs.clone();
        let other = Sealer::new(Arc::new(MemoryChainStore::default()), "audit");
        let (o, seal) = other
            .seal(
                "resolve",
                "resolve/p/0",
                &Emitter::new(Default::default(), Default::default()),
                &[rec("svc", 99)],
            )
            .await
            .unwrap();
        forked.extend(o);
        forked.extend(seal.seals);
        let p = verify(&read(&forked)).problems;
        assert!(p.iter().any(|p| p.message.contains("forked")), "{p:?}");
    }

    /// Version 1 chains (per resource) written before still verify.
    #[test]
    fn version_1_chains_still_verify() {
        use crate::audit::hash::seal;
        let mut prev: Option<String> = None;
        let mut recs = Vec::new();
        for i in 1..=4u64 {
            let s = seal(rec("old", i), i, prev.as_deref());
            prev = s
                .data
                .as_ref()
                .and_then(|d| d["hash"].as_str())
                .map(str::to_string);
            recs.push(AuditRecord::new(
                0,
                i as i64,
                serde_json::to_vec(&s).unwrap(),
            ));
        }
        assert!(verify(&recs).problems.is_empty());
        recs.remove(1);
        assert!(!verify(&recs).problems.is_empty());
    }

    #[tokio::test]
    async fn concurrent_sealers_keep_one_linear_chain() {
        let store: Arc<dyn crate::audit::ChainStore> = Arc::new(MemoryChainStore::default());
        let emitter = Emitter::new(Default::default(), Default::default());
        let sealers = [
            Arc::new(Sealer::new(store.clone(), "audit")),
            Arc::new(Sealer::new(store, "audit")),
        ];
        let mut tasks = Vec::new();
        for i in 0..40u64 {
            let (s, e) = (sealers[(i % 2) as usize].clone(), emitter.clone());
            tasks.push(tokio::spawn(async move {
                let ev = CloudEvent::new(format!("a-{i}"), "t", types::AUDIT)
                    .with_subject("svc")
                    .with_time_now()
                    .with_data(serde_json::json!({"decision": "x", "n": i}));
                s.seal("test", "test/t/0", &e, &[ev]).await
            }));
        }
        let mut written = Vec::new();
        for t in tasks {
            let (outs, seal) = t.await.expect("join").expect("seal");
            written.extend(outs);
            written.extend(seal.seals);
        }
        let records: Vec<AuditRecord> = written
            .iter()
            .enumerate()
            .map(|(i, o)| AuditRecord::new(0, i as i64, o.payload.clone()))
            .collect();
        let v = verify(&records);
        assert!(v.problems.is_empty(), "{:?}", v.problems);
        // Each sealer writes again the head the other one wrote before its own seal: 40 seals,
        // some of them twice (byte-identical).
        let distinct: std::collections::HashSet<&String> = records
            .iter()
            .filter(|r| r.event.ty == SEAL_TYPE)
            .map(|r| &r.hash)
            .collect();
        assert_eq!((v.records, distinct.len(), v.chains), (40, 40, 1));
    }

    /// The fault suite's finding: a process moves a chain's head and dies (or its batch is dropped
    /// with a revoked partition) before the seal reaches the topic. The next sealer writes that seal
    /// again before its own, so the chain has no gap; its records come back with the redelivered
    /// inputs, sealed again.
    #[tokio::test]
    async fn a_seal_lost_after_its_head_moved_is_written_again_by_the_next_sealer() {
        let store: Arc<dyn crate::audit::ChainStore> = Arc::new(MemoryChainStore::default());
        let emitter = Emitter::new(Default::default(), Default::default());
        let ev = |n: u64| {
            CloudEvent::new(format!("a-{n}"), "t", types::AUDIT)
                .with_subject("svc")
                .with_time("2026-11-27T00:00:00Z")
                .with_data(serde_json::json!({"decision": "x", "n": n}))
        };
        let chain = "test/t/0";
        let a = Sealer::new(store.clone(), "audit");
        let mut topic = Vec::new();
        let (outs, sealed) = a
            .seal("test", chain, &emitter, &[ev(1)])
            .await
            .expect("seal");
        topic.extend(outs);
        topic.extend(sealed.seals);
        // Sealed, head moved, then the process died: nothing of this batch reached the topic.
        let (lost, _) = a
            .seal("test", chain, &emitter, &[ev(2)])
            .await
            .expect("seal");
        // The next owner gets the input again and seals its byte-identical record, and more.
        let b = Sealer::new(store.clone(), "audit");
        let (outs, sealed) = b
            .seal("test", chain, &emitter, &[ev(2), ev(3)])
            .await
            .expect("seal");
        assert_eq!(outs[0].payload, lost[0].payload, "deterministic records");
        // The last seals the head keeps (1 and the lost 2), then the new one.
        assert_eq!(sealed.seals.len(), 3, "the kept seals, then the new one");
        topic.extend(outs);
        topic.extend(sealed.seals);
        // Then b's batch is dropped unsent (a revoke's drain timed out), and the next one too: b's
        // next seal writes them again with the rest it keeps.
        let (_, sealed) = b
            .seal("test", chain, &emitter, &[ev(4)])
            .await
            .expect("seal");
        sealed.watch.unsent();
        let (_, sealed) = b
            .seal("test", chain, &emitter, &[ev(4), ev(5)])
            .await
            .expect("seal");
        sealed.watch.unsent();
        let (outs, sealed) = b
            .seal("test", chain, &emitter, &[ev(4), ev(5), ev(6)])
            .await
            .expect("seal");
        // Seals 1 to 5 again (4 and 5 were dropped), then 6.
        assert_eq!(sealed.seals.len(), 6);
        topic.extend(outs);
        topic.extend(sealed.seals);
        let records: Vec<AuditRecord> = topic
            .iter()
            .enumerate()
            .map(|(i, o)| AuditRecord::new(0, i as i64, o.payload.clone()))
            .collect();
        let v = verify(&records);
        assert!(v.problems.is_empty(), "{:?}", v.problems);
        assert_eq!((v.records, v.chains), (6, 1));
        // Without the copies the chain has gaps: what `audit verify` reported before.
        let without: Vec<AuditRecord> = records
            .iter()
            .filter(|r| {
                r.event.ty != SEAL_TYPE
                    || !matches!(
                        r.event.data.as_ref().and_then(|d| d["seq"].as_u64()),
                        Some(2) | Some(4)
                    )
            })
            .cloned()
            .collect();
        assert!(verify(&without)
            .problems
            .iter()
            .any(|p| p.message.contains("seals missing")));
    }
}
