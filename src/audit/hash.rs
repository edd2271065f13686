//! Hashes of audit records (pure).
//!
//! Version 2 (records sealed per batch, [`super::sealer`]): a record's hash is SHA-256 over the exact
//! bytes written ([`payload_hash`]); a batch's seal carries the Merkle root of its records' hashes
//! ([`merkle_root`]). Version 1 (records chained one by one per resource, written before): SHA-256
//! over the record's canonical JSON without `data.hash` ([`record_hash`], [`seal`]); `audit verify`
//! still checks those.

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::event::CloudEvent;

/// Hex SHA-256 of the exact bytes of a record's payload.
pub fn payload_hash(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The Merkle root of hex hashes, in order: pairs hashed up level by level (an odd last one is
/// carried up as it is); the root of one hash is that hash, of none the hash of nothing.
pub fn merkle_root(hashes: &[String]) -> String {
    if hashes.is_empty() {
        return payload_hash(b"");
    }
    let mut level: Vec<String> = hashes.to_vec();
    while level.len() > 1 {
        level = level
            .chunks(2)
            .map(|pair| match pair {
                [a, b] => {
                    let mut h = Sha256::new();
                    h.update(a.as_bytes());
                    h.update(b.as_bytes());
                    hex::encode(h.finalize())
                }
                [a] => a.clone(),
                _ => unreachable!("chunks(2) yields one or two"),
            })
            .collect();
    }
    level.remove(0)
}

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
    use serde_json::json;

    #[test]
    fn merkle_roots() {
        let h = |s: &str| payload_hash(s.as_bytes());
        let (a, b, c) = (h("a"), h("b"), h("c"));
        assert_eq!(merkle_root(std::slice::from_ref(&a)), a);
        assert_ne!(
            merkle_root(&[a.clone(), b.clone()]),
            merkle_root(&[b.clone(), a.clone()])
        );
        assert_ne!(
            merkle_root(&[a.clone(), b.clone(), c.clone()]),
            merkle_root(&[a.clone(), b.clone()])
        );
        assert_eq!(merkle_root(&[]), payload_hash(b""));
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
}
