//! `best_of` routing: a route or a workflow step names interchangeable agents
//! (`select: {best_of: [a, b], explore: 0.1}`) and each task goes to one of them, chosen by their
//! scorecards ([`super::stats::Scorecard::score`]) and their current load (tasks in flight on every
//! instance over `max_concurrency`) — an ε-greedy bandit whose exploration floor keeps every
//! candidate measured. The choice is a pure function of the task id and the scoreboard snapshot:
//! a task id always gets the same draw, and agents whose effective scores are within 0.02 of the
//! best are tied and share the work by that draw.

use super::stats::Snapshot;
use crate::pattern::stable_id;
pub use crate::route::Select;

/// The score of a candidate with no scorecard yet (= an agent without data).
const UNKNOWN_SCORE: f64 = 0.375;
/// Effective scores this close to the best are tied.
const TIE: f64 = 0.02;

/// The candidate of `sel` that runs task `task_id`. `capacity` is an agent's `max_concurrency`.
pub fn pick(
    sel: &Select,
    task_id: &str,
    snap: &Snapshot,
    capacity: &dyn Fn(&str) -> usize,
) -> String {
    let n = sel.best_of.len();
    if n <= 1 {
        return sel.best_of.first().cloned().unwrap_or_default();
    }
    let h = u64::from_str_radix(&stable_id(&[task_id, "best_of"])[..16], 16).unwrap_or(0);
    let draw = (h % 1_000_000) as f64 / 1_000_000.0;
    let rest = (h / 1_000_000) as usize;
    if draw < sel.explore {
        return sel.best_of[rest % n].clone();
    }
    let effective: Vec<f64> = sel
        .best_of
        .iter()
        .map(|a| {
            let score = snap.scores.get(a).copied().unwrap_or(UNKNOWN_SCORE);
            let load = snap.loads.get(a).copied().unwrap_or(0).max(0) as f64;
            score / (1.0 + load / capacity(a).max(1) as f64)
        })
        .collect();
    let best = effective.iter().copied().fold(f64::MIN, f64::max);
    let tied: Vec<&String> = sel
        .best_of
        .iter()
        .zip(&effective)
        .filter(|(_, e)| **e >= best - TIE)
        .map(|(a, _)| a)
        .collect();
    tied[rest % tied.len()].clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sel(explore: f64) -> Select {
        Select {
            best_of: vec!["a".into(), "b".into()],
            explore,
        }
    }

    fn share_of_a(s: &Select, snap: &Snapshot) -> usize {
        (0..1000)
            .filter(|i| pick(s, &format!("task-{i}"), snap, &|_| 4) == "a")
            .count()
    }

    #[test]
    fn unknown_agents_share_and_a_better_one_takes_most() {
        let s = sel(0.1);
        let even = share_of_a(&s, &Snapshot::default());
        assert!((400..600).contains(&even), "{even}");
        let snap = Snapshot {
            scores: [("a".to_string(), 0.9), ("b".to_string(), 0.2)].into(),
            loads: Default::default(),
        };
        let most = share_of_a(&s, &snap);
        assert!(
            (930..=970).contains(&most),
            "{most}: 90% + half the 10% explored"
        );
        assert_eq!(share_of_a(&sel(0.0), &snap), 1000);
        // Same task, same snapshot: same agent.
        assert_eq!(
            pick(&s, "task-7", &snap, &|_| 4),
            pick(&s, "task-7", &snap, &|_| 4)
        );
    }

    #[test]
    fn load_moves_work_to_the_idle_agent() {
        let snap = Snapshot {
            scores: [("a".to_string(), 0.9), ("b".to_string(), 0.8)].into(),
            loads: [("a".to_string(), 8)].into(),
        };
        assert_eq!(
            share_of_a(&sel(0.0), &snap),
            0,
            "a is at twice its capacity"
        );
    }
}
