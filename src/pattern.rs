//! Small pure helpers every layer uses: `*` patterns (event types, context keys, agents, actions)
//! and deterministic ids.

use sha2::{Digest, Sha256};

/// A pattern with `*` wildcards, each matching any run of characters (`deployment.*`, `scale_*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypePattern {
    parts: Vec<String>,
}

impl TypePattern {
    pub fn new(pattern: &str) -> Self {
        TypePattern {
            parts: pattern.split('*').map(str::to_string).collect(),
        }
    }

    pub fn matches(&self, s: &str) -> bool {
        let Some((first, rest)) = self.parts.split_first() else {
            return s.is_empty();
        };
        let Some((last, middle)) = rest.split_last() else {
            return first == s;
        };
        let Some(mut tail) = s.strip_prefix(first.as_str()) else {
            return false;
        };
        for part in middle {
            match tail.find(part.as_str()) {
                Some(i) => tail = &tail[i + part.len()..],
                None => return false,
            }
        }
        tail.len() >= last.len() && tail.ends_with(last.as_str())
    }

    /// True when the pattern is a plain name (no wildcard).
    pub fn is_literal(&self) -> bool {
        self.parts.len() == 1
    }
}

/// True when `value` matches one of `patterns`.
pub fn matches_any(patterns: &[String], value: &str) -> bool {
    patterns.iter().any(|p| TypePattern::new(p).matches(value))
}

/// Short stable hash of the given parts, hex encoded (128 bits; each part length-prefixed, so
/// `["ab", "c"]` and `["a", "bc"]` differ).
pub fn stable_id(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p.as_bytes());
    }
    hex::encode(&h.finalize()[..16])
}

/// The candidate closest to `name` by edit distance, when it is close enough to be a likely typo
/// (for "did you mean" in config errors).
pub fn closest<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let limit = (name.chars().count() / 3).max(2);
    candidates
        .into_iter()
        .filter(|c| *c != name)
        .map(|c| (edit_distance(name, c), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, c)| (*d, *c))
        .map(|(_, c)| c)
}

/// Levenshtein distance over characters.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        let p = TypePattern::new("deployment.*");
        assert!(p.matches("deployment.started"));
        assert!(!p.matches("deploymentX"));
        assert!(TypePattern::new("*").matches(""));
        assert!(TypePattern::new("a*b*c").matches("aXbYc"));
        assert!(!TypePattern::new("a*b*c").matches("ac"));
        assert!(TypePattern::new("sla.breached").matches("sla.breached"));
        assert!(!TypePattern::new("sla.breached").matches("sla.breachedX"));
        assert!(TypePattern::new("*.x").matches(".x"));
        assert!(!TypePattern::new("ab*ba").matches("aba"));
    }

    #[test]
    fn did_you_mean() {
        assert_eq!(closest("rollbak", ["page", "rollback"]), Some("rollback"));
        assert_eq!(closest("nuke_everything", ["page", "rollback"]), None);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    #[test]
    fn ids_are_stable() {
        assert_eq!(stable_id(&["a", "b"]), stable_id(&["a", "b"]));
        assert_ne!(stable_id(&["a", "b"]), stable_id(&["ab", ""]));
    }
}
