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
use super::signing::{Keys, Signature};
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
    /// The Kafka timestamp (ms since the epoch), when known: the clock retention goes by.
    pub timestamp_ms: Option<i64>,
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
            timestamp_ms: None,
        }
    }

    /// With its Kafka timestamp.
    pub fn at(mut self, timestamp_ms: Option<i64>) -> Self {
        self.timestamp_ms = timestamp_ms;
        self
    }

    /// Only what [`verify`] needs of it: a version 2 decision's data (its detail, often most of
    /// its size) is dropped — its hash, type, place, id, subject and time are what is checked.
    /// Seals and version 1 records (whose data holds their chain) are kept whole.
    pub fn compact(mut self) -> Self {
        if self.event.ty != SEAL_TYPE && !is_v1(&self) {
            self.event.data = None;
        }
        self
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
    /// Gaps at the front of the trail that the topic's retention explains ([`verify_retained`]):
    /// chains that begin after their first records or seals were deleted, seals listing deleted
    /// records, records whose seal was deleted. Not problems.
    pub expired: usize,
    /// Seals whose signature was checked and matches ([`super::signing`]).
    pub signed: usize,
    /// Seals signed but not checked: the verifier was given no keys.
    pub signed_unchecked: usize,
    /// Unsigned seals and version 1 records accepted (with keys): before where
    /// `accept_unsigned_before` says.
    pub unsigned: usize,
    pub problems: Vec<ChainProblem>,
}

/// How [`verify_signed`] checks the seals' signatures ([`super::signing`]).
#[derive(Debug, Default, Clone)]
pub struct SignatureCheck {
    /// The keys seals may be signed with (`audit.keys`); none: signatures are counted, unchecked.
    pub keys: Option<Keys>,
    /// The audit topic's name, which signatures cover (a seal copied from another topic fails).
    pub topic: String,
    /// Per partition, the offset below which unsigned seals and version 1 records are accepted:
    /// the trail written before signing began (and during a rolling change of the config). Any
    /// other unsigned seal is a problem. Offsets are the broker's: nobody appends below one.
    pub accept_unsigned_before: HashMap<i32, i64>,
}

/// What retention (or `DeleteRecords`) removed from the front of an audit topic's partitions: the
/// first offset each partition still holds, where it is not 0, and the time of the latest of those
/// partitions' first retained records (the cut: what is older may have lost its neighbours).
#[derive(Default)]
struct Trim {
    starts: HashMap<i32, i64>,
    cut: Option<chrono::DateTime<chrono::Utc>>,
}

/// Records decided within this long before the cut may still be listed by a seal written after
/// it (a batch's records are sealed after they are decided).
const CUT_SLACK_SECONDS: i64 = 60;

impl Trim {
    fn new(records: &[AuditRecord], starts: &HashMap<i32, i64>) -> Self {
        let starts: HashMap<i32, i64> = starts
            .iter()
            .filter(|(_, o)| **o > 0)
            .map(|(p, o)| (*p, *o))
            .collect();
        let mut first: HashMap<i32, &AuditRecord> = HashMap::new();
        for r in records.iter().filter(|r| starts.contains_key(&r.partition)) {
            let f = first.entry(r.partition).or_insert(r);
            if r.offset < f.offset {
                *f = r;
            }
        }
        let cut = first.values().filter_map(|r| written_at(r)).max();
        Trim { starts, cut }
    }

    /// Whether records before `r` in its partition were deleted.
    fn trimmed(&self, r: &AuditRecord) -> bool {
        self.starts.contains_key(&r.partition)
    }

    /// Whether seal `seal` is old enough that records it lists may have been deleted: sealed
    /// before the cut (its time is part of its chain's hashes, so it cannot be moved unseen).
    fn sealed_before_cut(&self, seal: &AuditRecord) -> bool {
        match (self.cut, time_of(seal)) {
            (Some(cut), Some(t)) => t < self.slack(cut),
            _ => false,
        }
    }

    fn slack(&self, cut: chrono::DateTime<chrono::Utc>) -> chrono::DateTime<chrono::Utc> {
        cut + chrono::Duration::seconds(CUT_SLACK_SECONDS)
    }
}

/// Whether `r` is a version 1 record: it carries its place in its resource's chain; version 2
/// records have none (in Avro the field is there, null).
fn is_v1(r: &AuditRecord) -> bool {
    r.event
        .data
        .as_ref()
        .is_some_and(|d| d.get("seq").is_some_and(|s| !s.is_null()))
}

/// When a record was written: its Kafka timestamp (the clock retention goes by), else its own time.
fn written_at(r: &AuditRecord) -> Option<chrono::DateTime<chrono::Utc>> {
    match r.timestamp_ms {
        Some(ms) => chrono::DateTime::from_timestamp_millis(ms),
        None => time_of(r),
    }
}

fn time_of(r: &AuditRecord) -> Option<chrono::DateTime<chrono::Utc>> {
    let t = r.event.time.as_deref()?;
    chrono::DateTime::parse_from_rfc3339(t)
        .ok()
        .map(|t| t.with_timezone(&chrono::Utc))
}

/// Checks every chain of both versions; records may come in any order.
pub fn verify(records: &[AuditRecord]) -> Verification {
    verify_retained(records, &HashMap::new())
}

/// [`verify`] of a topic whose partitions may have lost their oldest records to retention:
/// `starts` holds each partition's first offset (its low watermark). Where a partition starts
/// after 0, a chain beginning after its first seal (or record, version 1) in that partition, a seal
/// listing a record missing from the topic, or a record in no seal, is counted as `expired` instead
/// of a problem when it is that old — its seal or record was in the deleted part (written before
/// the latest first retained record of the trimmed partitions, 60 s of slack). Retention deletes
/// only from the front: a gap further on, an altered or forked record, is still a problem.
pub fn verify_retained(records: &[AuditRecord], starts: &HashMap<i32, i64>) -> Verification {
    verify_signed(records, starts, &SignatureCheck::default())
}

/// [`verify_retained`] with the seals' signatures checked too. With keys, every signed seal must
/// be signed by one of them and match, and an unsigned seal or a version 1 record (no longer
/// written) is accepted only at an offset before `accept_unsigned_before` says — the trail from
/// before signing began, as the operator knows it (offsets are the broker's, so one appended later
/// cannot pose as older); the problem names each partition's first signed seal as the likely
/// place. Without keys, signed seals are only counted.
pub fn verify_signed(
    records: &[AuditRecord],
    starts: &HashMap<i32, i64>,
    check: &SignatureCheck,
) -> Verification {
    let trim = Trim::new(records, starts);
    let mut v = Verification::default();
    let (mut v1, mut v2, mut seals) = (Vec::new(), Vec::new(), Vec::new());
    for r in records {
        if r.event.ty == SEAL_TYPE {
            seals.push(r);
        } else if is_v1(r) {
            v1.push(r);
        } else {
            v2.push(r);
        }
    }
    v.records = v1.len() + v2.len();
    v.seals = seals.len();
    // Each seal's data, read once for both checks (none: not a seal's, altered).
    let seals: Vec<(&AuditRecord, Option<SealData>)> = seals
        .into_iter()
        .map(|s| {
            (
                s,
                s.event
                    .data
                    .clone()
                    .and_then(|d| serde_json::from_value(d).ok()),
            )
        })
        .collect();
    verify_signatures(&v1, &seals, check, &mut v);
    verify_v1(&v1, &trim, &mut v);
    verify_v2(&v2, &seals, &trim, &mut v);
    v
}

fn verify_signatures(
    v1: &[&AuditRecord],
    seals: &[(&AuditRecord, Option<SealData>)],
    check: &SignatureCheck,
    v: &mut Verification,
) {
    let parsed: Vec<(&AuditRecord, &SealData)> = seals
        .iter()
        .filter_map(|(s, d)| Some((*s, d.as_ref()?)))
        .collect();
    let Some(keys) = &check.keys else {
        v.signed_unchecked = parsed.iter().filter(|(_, d)| d.mac.is_some()).count();
        return;
    };
    let mut first_signed: HashMap<i32, i64> = HashMap::new();
    for (r, d) in &parsed {
        let problem = |m: String| ChainProblem {
            chain: d.chain.clone(),
            seq: d.seq,
            at: r.place(),
            message: m,
        };
        match keys.check(&check.topic, r.event.time.as_deref(), *d) {
            Signature::Valid => {
                v.signed += 1;
                let f = first_signed.entry(r.partition).or_insert(r.offset);
                *f = (*f).min(r.offset);
            }
            Signature::Unsigned => {}
            Signature::UnknownKey(id) => v.problems.push(problem(format!(
                "signed with key {id:?}, which audit.keys does not list (forged, or a key missing)"
            ))),
            Signature::Invalid => v.problems.push(problem(
                "the seal's signature does not match (forged, altered, or copied from another \
                 topic)"
                    .into(),
            )),
        }
    }
    // Unsigned seals and version 1 records are accepted only where the operator said signing had
    // not begun yet; the rest, per partition, is one problem (a trail from before signing holds
    // many).
    let accepted = |r: &AuditRecord| {
        check
            .accept_unsigned_before
            .get(&r.partition)
            .is_some_and(|o| r.offset < *o)
    };
    let mut unaccepted: BTreeMap<i32, (usize, i64, i64)> = BTreeMap::new();
    let unsigned = parsed
        .iter()
        .filter(|(_, d)| d.mac.is_none())
        .map(|(r, _)| *r)
        .chain(v1.iter().copied());
    for r in unsigned {
        if accepted(r) {
            v.unsigned += 1;
        } else {
            let e = unaccepted
                .entry(r.partition)
                .or_insert((0, r.offset, r.offset));
            *e = (e.0 + 1, e.1.min(r.offset), e.2.max(r.offset));
        }
    }
    for (p, (n, first, last)) in unaccepted {
        let hint = match first_signed.get(&p) {
            Some(f) if last < *f => format!(
                "all before the partition's first signed seal at {p}@{f}: if signing began \
                 there, accept them with --accept-unsigned-before {p}@{f}"
            ),
            Some(f) => format!(
                "some after the partition's first signed seal at {p}@{f}: inserted, or written \
                 by an instance without audit.keys"
            ),
            None => "the partition holds no signed seal".into(),
        };
        v.problems.push(ChainProblem {
            chain: format!("partition {p}"),
            seq: 0,
            at: format!("{p}@{first}..{p}@{last}"),
            message: format!("{n} unsigned seals or version 1 records ({hint})"),
        });
    }
}

fn verify_v2(
    records: &[&AuditRecord],
    seals: &[(&AuditRecord, Option<SealData>)],
    trim: &Trim,
    v: &mut Verification,
) {
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
    for (s, d) in seals {
        match d {
            Some(d) => chains
                .entry(d.chain.clone())
                .or_default()
                .push((*s, d.clone())),
            None => v.problems.push(ChainProblem {
                chain: s.event.subject.clone().unwrap_or_default(),
                seq: 0,
                at: s.place(),
                message: "a seal record whose data is not a seal (altered)".into(),
            }),
        }
    }
    v.chains += chains.len();
    // Records listed by a seal: the time of the seal.
    let mut listed: HashMap<String, Option<chrono::DateTime<chrono::Utc>>> = HashMap::new();
    let mut expired = 0;
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
                if !present.contains(e.hash.as_str()) && trim.sealed_before_cut(rec) {
                    expired += 1;
                } else if !present.contains(e.hash.as_str()) {
                    problem(format!(
                        "record {} of {}/{} that this seal lists is missing",
                        e.id, e.tenant, e.resource
                    ));
                }
                // The latest seal time that lists it (a redelivered record is sealed again).
                let t = time_of(rec);
                let at = listed.entry(e.hash.clone()).or_insert(t);
                *at = (*at).max(t);
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
                None if (seal.seq != 1 || seal.prev.is_some()) && trim.trimmed(rec) => {
                    // Its chain's seals are keyed alike (one partition): the ones before it were
                    // in the part retention deleted.
                    expired += 1;
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
    v.expired += expired;
    // Where records of each partition stop being ones whose seal retention may have deleted: the
    // first listed by a seal written after the cut. A record in no seal before that point is
    // explained by retention; one after it (appended later, whatever time it claims) is not.
    // A seal written after the cut marks its partition's place too: a partition whose records
    // after the cut are all unlisted (quiet, or written to by someone else) still has one.
    let mut boundary: HashMap<i32, i64> = HashMap::new();
    if let Some(cut) = trim.cut {
        let after_cut = records
            .iter()
            .filter(|r| {
                listed
                    .get(&r.hash)
                    .is_some_and(|t| t.is_some_and(|t| t >= trim.slack(cut)))
            })
            .chain(
                seals
                    .iter()
                    .map(|(s, _)| s)
                    .filter(|s| time_of(s).is_some_and(|t| t >= trim.slack(cut))),
            );
        for r in after_cut {
            let b = boundary.entry(r.partition).or_insert(r.offset);
            *b = (*b).min(r.offset);
        }
    }
    let mut reported = HashSet::new();
    for r in records {
        if !listed.contains_key(&r.hash) && reported.insert(r.hash.as_str()) {
            let front = boundary.get(&r.partition).is_none_or(|b| r.offset < *b);
            if trim.cut.is_some() && front {
                // Its seal may have been deleted before it.
                v.expired += 1;
                continue;
            }
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

fn verify_v1(records: &[&AuditRecord], trim: &Trim, v: &mut Verification) {
    struct Link {
        seq: u64,
        hash: String,
        prev: Option<String>,
        at: String,
        /// Records before it in its partition were deleted (retention).
        trimmed: bool,
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
                trimmed: trim.trimmed(r),
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
                None if (l.seq != 1 || l.prev.is_some()) && l.trimmed => {
                    // A resource's records share a partition: the ones before were deleted.
                    v.expired += 1;
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
        rec_at(resource, n, "2026-01-01T00:00:00Z")
    }

    fn rec_at(resource: &str, n: u64, time: &str) -> CloudEvent {
        CloudEvent::new(format!("a-{resource}-{n}"), "t", types::AUDIT)
            .with_subject(resource)
            .with_time(time)
            .with_data(json!({"decision": "accepted", "stage": "resolve", "resource": resource, "tenant": "default", "detail": {"n": n}}))
    }

    /// Three batches of a chain: records and seals as written.
    async fn written() -> Vec<Output> {
        let start = chrono::DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z").unwrap();
        written_at(start.with_timezone(&chrono::Utc)).await
    }

    /// [`written`], batch `b`'s records decided at `start` + `b` hours (seals are stamped when
    /// sealed: now).
    async fn written_at(start: chrono::DateTime<chrono::Utc>) -> Vec<Output> {
        let sealer = Sealer::new(Arc::new(MemoryChainStore::default()), "audit");
        let emitter = Emitter::new(Default::default(), Default::default());
        let mut out = Vec::new();
        for batch in 0..3 {
            let time = (start + chrono::Duration::hours(batch as i64)).to_rfc3339();
            let recs: Vec<CloudEvent> = (0..3)
                .map(|i| rec_at("svc", batch * 3 + i, &time))
                .collect();
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

    /// Whoever can write to the audit topic can append a chain of their own with correct hashes:
    /// only signed seals tell it from the real trail.
    #[tokio::test]
    async fn signed_seals_find_inserted_chains_and_forged_signatures() {
        const KEY: &str = "0123456789abcdef0123456789abcdef-k2";
        let keys = Keys::of(&[("k2", KEY), ("k1", "an-older-key-still-listed-0123456789")]);
        let emitter = Emitter::new(Default::default(), Default::default());
        let seal_with = |keys: Keys, chain: &'static str, n: u64| {
            let emitter = emitter.clone();
            async move {
                let sealer =
                    Sealer::new(Arc::new(MemoryChainStore::default()), "audit").with_keys(keys);
                let (mut o, seal) = sealer
                    .seal("resolve", chain, &emitter, &[rec("svc", n)])
                    .await
                    .unwrap();
                o.extend(seal.seals);
                o
            }
        };
        let check_on = |topic: &str, accept: &[(i32, i64)]| SignatureCheck {
            keys: Some(keys.clone()),
            topic: topic.into(),
            accept_unsigned_before: accept.iter().copied().collect(),
        };
        let check = |accept: &[(i32, i64)]| check_on("audit", accept);
        // History from before signing (unsigned: 9 records, 3 seals), then a signed chain, then
        // one signed with the older key.
        let mut outs = written().await;
        let began = outs.len() as i64;
        outs.extend(seal_with(Keys::of(&[("k2", KEY)]), "resolve/q/0", 50).await);
        let old = Keys::of(&[("k1", "an-older-key-still-listed-0123456789")]);
        outs.extend(seal_with(old, "resolve/q/1", 51).await);
        // Unless the operator says where signing began, the unsigned seals are one problem, which
        // names the partition's first signed seal (the record before it) as the likely place.
        let v = verify_signed(&read(&outs), &HashMap::new(), &check(&[]));
        assert_eq!(v.problems.len(), 1, "{:?}", v.problems);
        let hint = format!("--accept-unsigned-before 0@{}", began + 1);
        assert!(
            v.problems[0].message.contains("3 unsigned seals")
                && v.problems[0].message.contains(&hint),
            "{:?}",
            v.problems
        );
        let v = verify_signed(&read(&outs), &HashMap::new(), &check(&[(0, began + 1)]));
        assert!(v.problems.is_empty(), "{:?}", v.problems);
        assert_eq!((v.signed, v.unsigned, v.signed_unchecked), (2, 3, 0));
        // Without keys the same trail verifies, its signatures only counted.
        let v = verify(&read(&outs));
        assert!(v.problems.is_empty() && v.signed_unchecked == 2, "{v:?}");
        // Checked against another topic's name (a trail copied from another deployment that
        // shares the key): every signature fails.
        let v = verify_signed(
            &read(&outs),
            &HashMap::new(),
            &check_on("audit-b", &[(0, began + 1)]),
        );
        assert_eq!(v.problems.len(), 2, "{:?}", v.problems);
        // An inserted chain, unsigned, after signing began: found (without keys it passes).
        let mut inserted = outs.clone();
        inserted.extend(seal_with(Keys::default(), "resolve/x/0", 60).await);
        assert!(verify(&read(&inserted)).problems.is_empty());
        let v = verify_signed(&read(&inserted), &HashMap::new(), &check(&[(0, began + 1)]));
        assert!(
            v.problems.len() == 1 && v.problems[0].message.contains("1 unsigned seals"),
            "{:?}",
            v.problems
        );
        // ... unless the operator accepts unsigned seals up to past it (a rolling change).
        let n = inserted.len() as i64;
        let v = verify_signed(&read(&inserted), &HashMap::new(), &check(&[(0, n)]));
        assert!(v.problems.is_empty(), "{:?}", v.problems);
        // Signed with a guessed key under a listed id, or with a key not listed.
        for (id, key, says) in [
            ("k2", "guessed-guessed-guessed-guessed-x", "does not match"),
            ("k9", KEY, "does not list"),
        ] {
            let mut forged = outs.clone();
            forged.extend(seal_with(Keys::of(&[(id, key)]), "resolve/x/0", 61).await);
            let v = verify_signed(&read(&forged), &HashMap::new(), &check(&[(0, began + 1)]));
            assert!(
                v.problems.iter().any(|p| p.message.contains(says)),
                "{:?}",
                v.problems
            );
        }
        // A signed seal altered (its entries' resource relabelled): the signature breaks.
        let mut relabelled = outs.clone();
        let last = relabelled.len() - 1;
        relabelled[last].payload = String::from_utf8(relabelled[last].payload.clone())
            .unwrap()
            .replace("\"resource\":\"svc\"", "\"resource\":\"other\"")
            .into_bytes();
        let v = verify_signed(
            &read(&relabelled),
            &HashMap::new(),
            &check(&[(0, began + 1)]),
        );
        assert!(
            v.problems
                .iter()
                .any(|p| p.message.contains("signature does not match")),
            "{:?}",
            v.problems
        );
        // A partition with only unsigned seals: a problem too (not accepted unasked).
        let v = verify_signed(&read(&written().await), &HashMap::new(), &check(&[]));
        assert!(
            v.problems.len() == 1 && v.problems[0].message.contains("holds no signed seal"),
            "{:?}",
            v.problems
        );
    }

    /// Records on partition 1 and seals on partition 0 (offsets from 0 on each), less the first
    /// `cut` records of partition 1 and the first `cut_seals` seals: what retention leaves.
    fn spread(outs: &[Output], cut: i64, cut_seals: i64) -> Vec<AuditRecord> {
        let mut next = [0i64, 0];
        let mut out = Vec::new();
        for o in outs {
            let r = AuditRecord::new(0, 0, o.payload.clone());
            let p = usize::from(r.event.ty != SEAL_TYPE);
            let offset = next[p];
            next[p] += 1;
            if offset >= [cut_seals, cut][p] {
                out.push(AuditRecord::new(p as i32, offset, o.payload.clone()));
            }
        }
        out
    }

    fn starts(recs: &[AuditRecord]) -> HashMap<i32, i64> {
        let mut s = HashMap::new();
        for r in recs {
            let o = s.entry(r.partition).or_insert(r.offset);
            *o = (*o).min(r.offset);
        }
        s
    }

    /// Retention deletes a topic's oldest records: a chain that begins after its first seals, and
    /// a seal whose records were deleted before it, are explained by that (counted, not
    /// problems); a gap further on, or a record gone that a seal written long after the cut lists,
    /// is still a problem.
    #[tokio::test]
    async fn gaps_retention_left_at_the_front_are_not_problems() {
        // One partition, the first batch (three records and its seal) deleted.
        let outs = written().await;
        let kept: Vec<AuditRecord> = read(&outs).into_iter().skip(4).collect();
        let p = verify(&kept).problems;
        assert!(
            p.iter()
                .any(|p| p.message.contains("chain starts at seal 2")),
            "{p:?}"
        );
        let v = verify_retained(&kept, &starts(&kept));
        assert!(v.problems.is_empty(), "{:?}", v.problems);
        assert_eq!(v.expired, 1);
        // ... and the last seal removed (offsets 4-7 are batch 1 and seal 2): its records are in
        // no seal, and they are an hour newer than where the trail now starts.
        let mut holed = kept.clone();
        holed.retain(|r| r.offset != 11);
        let p = verify_retained(&holed, &starts(&holed)).problems;
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(p.iter().all(|p| p.message.contains("in no seal")), "{p:?}");
        // ... and a record appended later, in no seal, claiming a time before the cut: it is
        // past records that seals written after the cut list, so not retention's doing.
        let emitter = Emitter::new(Default::default(), Default::default());
        let forged = emitter.emit("audit", &rec("svc", 99)).unwrap();
        let mut appended = kept.clone();
        appended.push(AuditRecord::new(0, 12, forged.payload));
        let p = verify_retained(&appended, &starts(&appended)).problems;
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].message.contains("in no seal"), "{p:?}");

        // Records and seals on two partitions; the records' partition lost the first batch's
        // records, the seals' partition kept every seal. Seal 1, written with them (an hour before
        // the first retained record), lists them.
        let outs = written_at(chrono::Utc::now() - chrono::Duration::hours(1)).await;
        let kept = spread(&outs, 3, 0);
        assert_eq!(
            verify(&kept).problems.len(),
            3,
            "three records seal 1 lists"
        );
        let v = verify_retained(&kept, &starts(&kept));
        assert!(v.problems.is_empty(), "{:?}", v.problems);
        assert_eq!(v.expired, 3);
        // Both partitions trimmed (seal 1 gone too): its chain begins at seal 2.
        let kept = spread(&outs, 3, 1);
        let v = verify_retained(&kept, &starts(&kept));
        assert!(v.problems.is_empty(), "{:?}", v.problems);
        // A record in no seal appended to the seals' partition (no record there is listed by a
        // seal: only the seals written after the cut mark where retention's gaps end).
        let emitter = Emitter::new(Default::default(), Default::default());
        let forged = emitter.emit("audit", &rec("svc", 98)).unwrap();
        // (Kafka's clock says the retained part begins two hours ago; the seals say they were
        // written since.)
        let two_hours_ago = (chrono::Utc::now() - chrono::Duration::hours(2)).timestamp_millis();
        let mut appended: Vec<AuditRecord> = kept
            .iter()
            .cloned()
            .map(|r| r.at(Some(two_hours_ago)))
            .collect();
        let end = appended.iter().filter(|r| r.partition == 0).count() as i64 + 1;
        appended.push(AuditRecord::new(0, end, forged.payload).at(Some(two_hours_ago)));
        let p = verify_retained(&appended, &starts(&appended)).problems;
        assert!(p.len() == 1 && p[0].message.contains("in no seal"), "{p:?}");
        // Records decided long before the seals that list them (here: months): the cut is at the
        // first retained record, and a seal written well after it lists nothing retention took.
        let outs = written().await;
        let kept = spread(&outs, 3, 0);
        let p = verify_retained(&kept, &starts(&kept)).problems;
        assert_eq!(p.len(), 3, "{p:?}");
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
