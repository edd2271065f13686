//! The hash of an audit record and sealing it into a chain (pure).

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::event::CloudEvent;

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

/// The `hash` a sealed audit event carries.
pub fn sealed_hash(ev: &CloudEvent) -> Option<String> {
    ev.data
        .as_ref()
        .and_then(|d| d.get("hash"))
        .and_then(Value::as_str)
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::verify;
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
