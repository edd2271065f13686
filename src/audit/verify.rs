//! Checking audit chains read back from the topic: every resource's chain must run 1, 2, 3, ... with
//! each record's `prev_hash` the previous record's hash and its own hash matching its content.

use std::collections::BTreeMap;

use serde_json::Value;

use super::hash::record_hash;
use crate::event::CloudEvent;

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
