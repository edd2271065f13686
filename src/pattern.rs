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

/// Why a pattern (an event type, context key, agent or action name with `*` wildcards) cannot be
/// used, or `None` when it is fine. Only `*` is a wildcard: glob or regex syntax would silently match
/// nothing, so it is refused.
pub fn pattern_problem(p: &str) -> Option<String> {
    if p.is_empty() {
        return Some(
            "is empty (it would match nothing; leave the list out to match anything)".into(),
        );
    }
    if let Some(c) = p
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || "[](){}?+^$|\\".contains(*c))
    {
        return Some(format!(
            "{p:?} contains {c:?}; patterns support only `*` as a wildcard"
        ));
    }
    if p.contains("**") {
        return Some(format!(
            "{p:?} has `**`; one `*` already matches any run of characters"
        ));
    }
    if p.contains("..") || p.starts_with('.') || p.ends_with('.') {
        return Some(format!("{p:?} has an empty dotted segment"));
    }
    None
}

/// Why a reference to one of `known` (agents, actions, context keys; `*` allowed) does not resolve,
/// or `None` when it does: a plain name must be one of them (with a "did you mean" when one is
/// close), a pattern must match at least one. `what` names the kind in the message ("an action any
/// agent declares").
pub fn reference_problem(reference: &str, known: &[&str], what: &str) -> Option<String> {
    if let Some(m) = pattern_problem(reference) {
        return Some(m);
    }
    let p = TypePattern::new(reference);
    if known.iter().any(|k| p.matches(k)) {
        return None;
    }
    if p.is_literal() {
        let hint = closest(reference, known.iter().copied())
            .map(|c| format!("; did you mean {c:?}?"))
            .unwrap_or_default();
        Some(format!("{reference:?} is not {what}{hint}"))
    } else {
        Some(format!("{reference:?} matches nothing that is {what}"))
    }
}

/// True when `patterns` is empty (meaning any) or `value` matches one of them.
pub fn matches_any_or_empty(patterns: &[String], value: &str) -> bool {
    patterns.is_empty() || matches_any(patterns, value)
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
    fn bad_patterns_are_named() {
        for bad in [
            "",
            "sla.[breached",
            "**..**",
            "a**",
            "sla..breached",
            ".x",
            "a b",
            "x?",
        ] {
            assert!(pattern_problem(bad).is_some(), "{bad:?} accepted");
        }
        for good in [
            "sla.breached",
            "deployment.*",
            "*",
            "scale_*",
            "com.example/x:y-1",
        ] {
            assert_eq!(pattern_problem(good), None, "{good:?} refused");
        }
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
