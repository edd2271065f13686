//! Signing seals (`audit.keys`): an HMAC-SHA256 of each seal, so records inserted by whoever can
//! write to the audit topic — a chain of their own, sealed with correct hashes — are found.
//!
//! Hashes alone prove that nothing was removed, altered or forked *after* a seal; they do not say
//! who wrote the seal. With keys configured, each seal carries `mac`: `<key id>:<hex HMAC>` over
//! the audit topic's name, the seal's time and its data (chain, place, previous hash, Merkle root,
//! entries), in a form
//! independent of the topic's encoding (JSON or Avro). The first key signs; every key listed is
//! accepted by `audit verify`, so a key is rotated by putting the new one first and keeping the old
//! one until the seals it signed have expired.

use std::path::PathBuf;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::secret::Secret;

/// Shortest key accepted, in bytes: an HMAC-SHA256 key shorter than its output is weaker than it.
pub const MIN_KEY_BYTES: usize = 32;

/// One key under `audit.keys`: its id and where its secret is (an environment variable or a file;
/// never the config itself, which `config show` prints and which is checked into repositories).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KeySpec {
    /// Written into each seal it signs, so `audit verify` knows which key to check with. Letters,
    /// digits, `-`, `_` and `.`.
    pub id: String,
    /// Environment variable holding the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<String>,
    /// File holding the key (a mounted secret); surrounding whitespace is ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
}

impl KeySpec {
    /// The key, from wherever the spec says; an error names the source, never the key.
    pub fn load(&self) -> Result<Secret, String> {
        let id = &self.id;
        let key = match (&self.env, &self.file) {
            (Some(var), None) => std::env::var(var)
                .ok()
                .filter(|v| !v.is_empty())
                .ok_or_else(|| {
                    format!("audit key {id:?}: environment variable {var} is not set")
                })?,
            (None, Some(path)) => std::fs::read_to_string(path)
                .map(|s| s.trim().to_string())
                .map_err(|e| format!("audit key {id:?}: cannot read {}: {e}", path.display()))?,
            _ => {
                return Err(format!(
                    "audit key {id:?}: give exactly one of env and file"
                ))
            }
        };
        if key.len() < MIN_KEY_BYTES {
            return Err(format!(
                "audit key {id:?} is {} bytes; at least {MIN_KEY_BYTES} are needed (e.g. `openssl rand -hex 32`)",
                key.len()
            ));
        }
        Ok(Secret::new(key))
    }
}

/// Checks `audit.keys` (ids well-formed and distinct, every key readable and long enough).
pub fn check(specs: &[KeySpec]) -> Vec<String> {
    let mut problems = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for s in specs {
        let well_formed = !s.id.is_empty()
            && s.id.len() <= 64
            && s.id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !well_formed {
            problems.push(format!(
                "audit key id {:?}: 1 to 64 letters, digits, '-', '_' or '.'",
                s.id
            ));
        }
        if !seen.insert(s.id.as_str()) {
            problems.push(format!("audit key id {:?} is listed twice", s.id));
        }
        if let Err(e) = s.load() {
            problems.push(e);
        }
    }
    problems
}

/// The loaded keys: the first signs, all verify.
#[derive(Clone, Default)]
pub struct Keys(Vec<(String, Secret)>);

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<&str> = self.0.iter().map(|(id, _)| id.as_str()).collect();
        write!(f, "Keys({ids:?})")
    }
}

/// What [`Keys::check`] found of one seal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signature {
    /// Signed with a known key, and the signature matches.
    Valid,
    /// No `mac`.
    Unsigned,
    /// Signed with a key id the verifier does not have.
    UnknownKey(String),
    /// The signature does not match: forged, or the seal altered.
    Invalid,
}

impl Keys {
    /// Loads every key of `audit.keys`.
    pub fn load(specs: &[KeySpec]) -> Result<Keys, String> {
        specs
            .iter()
            .map(|s| Ok((s.id.clone(), s.load()?)))
            .collect::<Result<Vec<_>, String>>()
            .map(Keys)
    }

    /// From ids and keys given directly (tests).
    pub fn of(keys: &[(&str, &str)]) -> Keys {
        Keys(
            keys.iter()
                .map(|(id, k)| (id.to_string(), Secret::new(*k)))
                .collect(),
        )
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `mac` for a seal of `data` (its own `mac` ignored) written to `topic` at `time`; none
    /// without keys.
    pub fn sign<T: Signable>(&self, topic: &str, time: Option<&str>, data: &T) -> Option<String> {
        let (id, key) = self.0.first()?;
        Some(format!("{id}:{}", hex::encode(mac(key, topic, time, data))))
    }

    /// Whether `data`'s `mac` is a valid signature of it written to `topic` at `time`.
    pub fn check<T: Signable>(&self, topic: &str, time: Option<&str>, data: &T) -> Signature {
        let Some(m) = data.mac() else {
            return Signature::Unsigned;
        };
        let (id, given) = m.split_once(':').unwrap_or((m, ""));
        let Some((_, key)) = self.0.iter().find(|(k, _)| k == id) else {
            return Signature::UnknownKey(id.to_string());
        };
        let want = hex::encode(mac(key, topic, time, data));
        if crate::secret::constant_time_eq(want.as_bytes(), given.as_bytes()) {
            Signature::Valid
        } else {
            Signature::Invalid
        }
    }
}

/// What is signed (a seal's data, [`super::sealer::SealData`]): serialisable, carrying its
/// signature in a field of its own that the signed bytes leave out.
pub trait Signable: Serialize {
    /// The signature it carries (`<key id>:<hex>`).
    fn mac(&self) -> Option<&str>;
    /// Itself without its signature: what is signed.
    fn unsigned(&self) -> Self
    where
        Self: Sized;
}

/// The signed bytes: the audit topic's name, the seal's time and its data without its `mac`, as
/// JSON with fixed field order (the struct's), so the same seal read back from JSON or Avro signs
/// alike, and a seal copied to another topic (another deployment's, sharing a key) does not.
fn mac<T: Signable>(key: &Secret, topic: &str, time: Option<&str>, data: &T) -> Vec<u8> {
    #[derive(Serialize)]
    struct Signed<'a, T> {
        purpose: &'static str,
        topic: &'a str,
        time: Option<&'a str>,
        seal: &'a T,
    }
    let bytes = serde_json::to_vec(&Signed {
        purpose: "switchyard audit seal",
        topic,
        time,
        seal: &data.unsigned(),
    })
    .unwrap_or_default();
    // A key of any length is accepted by HMAC; `new_from_slice` cannot fail for it.
    let mut m = match Hmac::<Sha256>::new_from_slice(key.expose().as_bytes()) {
        Ok(m) => m,
        Err(_) => return Vec::new(),
    };
    m.update(&bytes);
    m.finalize().into_bytes().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A seal's shape (the sealer's `SealData` lives above this module).
    #[derive(Clone, Serialize)]
    struct SealData {
        chain: String,
        seq: u64,
        prev: Option<String>,
        root: String,
        entries: Vec<Entry>,
        #[serde(skip_serializing_if = "Option::is_none")]
        mac: Option<String>,
    }

    #[derive(Clone, Serialize)]
    struct Entry {
        hash: String,
        tenant: String,
    }

    impl Signable for SealData {
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

    fn seal() -> SealData {
        SealData {
            chain: "resolve/switchyard.proposals/0".into(),
            seq: 3,
            prev: Some("ab".into()),
            root: "cd".into(),
            entries: vec![Entry {
                hash: "ef".into(),
                tenant: "acme".into(),
            }],
            mac: None,
        }
    }

    #[test]
    fn a_seal_signed_checks_and_any_change_breaks_it() {
        let keys = Keys::of(&[("k2", "new-key-0123456789abcdef0123456789"), ("k1", "old")]);
        let t = Some("2026-11-29T10:00:00Z");
        let mut s = seal();
        s.mac = keys.sign("audit", t, &s);
        assert!(s.mac.as_deref().is_some_and(|m| m.starts_with("k2:")));
        assert_eq!(keys.check("audit", t, &s), Signature::Valid);
        // Another time, chain, entry or place: invalid.
        assert_eq!(
            keys.check("audit", Some("2026-11-29T10:00:01Z"), &s),
            Signature::Invalid
        );
        let mut other = s.clone();
        other.entries[0].tenant = "globex".into();
        assert_eq!(keys.check("audit", t, &other), Signature::Invalid);
        let mut other = s.clone();
        other.seq = 4;
        assert_eq!(keys.check("audit", t, &other), Signature::Invalid);
        // Signed with the old key (listed second): still valid after a rotation.
        let old = Keys::of(&[("k1", "old")]);
        let mut s1 = seal();
        s1.mac = old.sign("audit", t, &s1);
        assert_eq!(keys.check("audit", t, &s1), Signature::Valid);
        // A key the verifier lacks, a signature by another key under a known id, none at all.
        let stranger = Keys::of(&[("k9", "x")]);
        let mut s9 = seal();
        s9.mac = stranger.sign("audit", t, &s9);
        assert_eq!(
            keys.check("audit", t, &s9),
            Signature::UnknownKey("k9".into())
        );
        let forged = Keys::of(&[("k2", "guessed")]);
        let mut sf = seal();
        sf.mac = forged.sign("audit", t, &sf);
        assert_eq!(keys.check("audit", t, &sf), Signature::Invalid);
        assert_eq!(keys.check("audit", t, &seal()), Signature::Unsigned);
        // The same seal on another topic (another deployment sharing the key): invalid.
        assert_eq!(keys.check("audit-staging", t, &s), Signature::Invalid);
        assert_eq!(Keys::default().sign("audit", t, &seal()), None);
    }

    #[test]
    fn key_specs_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let short = dir.path().join("short");
        std::fs::write(&short, "too-short\n").unwrap();
        let good = dir.path().join("good");
        std::fs::write(&good, format!("{}\n", "k".repeat(40))).unwrap();
        let spec = |id: &str, file: &std::path::Path| KeySpec {
            id: id.into(),
            env: None,
            file: Some(file.to_path_buf()),
        };
        assert!(check(&[spec("k1", &good)]).is_empty());
        let p = check(&[spec("k1", &short), spec("k1", &good), spec("a b", &good)]);
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(p[0].contains("at least 32"), "{p:?}");
        assert!(p.iter().any(|m| m.contains("listed twice")), "{p:?}");
        assert!(
            p.iter().all(|m| !m.contains("too-short")),
            "a problem never shows the key: {p:?}"
        );
        let neither = KeySpec {
            id: "k".into(),
            env: None,
            file: None,
        };
        assert!(check(&[neither])[0].contains("exactly one"));
        assert_eq!(
            Keys::load(&[spec("k1", &good)])
                .unwrap()
                .sign("audit", None, &seal())
                .map(|m| m.len()),
            Some(3 + 64)
        );
    }
}
