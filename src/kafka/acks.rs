//! Ordered acknowledgement tracking per partition.
//!
//! Records of a partition finish out of order (different resources run concurrently, deliveries complete
//! in any order). The committed position may only move past a record once it *and every record before it*
//! are done; otherwise a crash would skip the unfinished one.

use std::collections::VecDeque;

/// Tracks the offsets of one partition that were handed out but not yet released.
#[derive(Debug, Default)]
pub struct AckTracker {
    /// Offsets in the order they were tracked (strictly increasing), with their done flag.
    pending: VecDeque<(i64, bool)>,
    /// Highest offset below which everything is done, if any was released yet.
    released: Option<i64>,
}

/// Misuse of the tracker: a bug in the caller, never a broker condition.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum AckError {
    #[error("offset {offset} tracked after {last}: offsets must increase")]
    NotIncreasing { offset: i64, last: i64 },
    #[error("offset {0} completed but never tracked (or completed twice)")]
    Unknown(i64),
}

impl AckTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// The last offset handed out, if any.
    pub fn last_tracked(&self) -> Option<i64> {
        self.pending.back().map(|(o, _)| *o).or(self.released)
    }

    /// Registers an offset as handed out for processing. Offsets may have gaps (compaction, transaction
    /// markers) but must increase.
    pub fn track(&mut self, offset: i64) -> Result<(), AckError> {
        let last = self.pending.back().map(|(o, _)| *o).or(self.released);
        if let Some(last) = last {
            if offset <= last {
                return Err(AckError::NotIncreasing { offset, last });
            }
        }
        self.pending.push_back((offset, false));
        Ok(())
    }

    /// Marks an offset as done. Returns the new highest offset below which everything is done, when it
    /// moved; that is the *last processed* offset, see [`commit_position`] for what to commit.
    pub fn complete(&mut self, offset: i64) -> Result<Option<i64>, AckError> {
        let idx = self
            .pending
            .binary_search_by_key(&offset, |(o, _)| *o)
            .map_err(|_| AckError::Unknown(offset))?;
        let slot = &mut self.pending[idx];
        if slot.1 {
            return Err(AckError::Unknown(offset));
        }
        slot.1 = true;
        let mut moved = None;
        while let Some(&(o, true)) = self.pending.front() {
            self.pending.pop_front();
            moved = Some(o);
        }
        if moved.is_some() {
            self.released = moved;
        }
        Ok(moved)
    }

    /// Forgets offsets that were tracked but will not be completed (dropped on revoke). The released
    /// position does not move.
    pub fn abandon_pending(&mut self) -> usize {
        let n = self.pending.len();
        self.pending.clear();
        n
    }

    /// Highest offset below which everything is done.
    pub fn released(&self) -> Option<i64> {
        self.released
    }

    /// Number of offsets handed out and not released.
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }
}

/// The offset to commit when `last_done` is the last processed record: Kafka's committed offset names
/// the *next* record to read. This is the one place that rule lives.
pub fn commit_position(last_done: i64) -> i64 {
    last_done + 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn releases_only_contiguous_prefix() {
        let mut t = AckTracker::new();
        for o in [10, 11, 12, 13] {
            t.track(o).unwrap();
        }
        assert_eq!(t.complete(12).unwrap(), None);
        assert_eq!(t.complete(11).unwrap(), None, "10 is still open");
        assert_eq!(t.complete(10).unwrap(), Some(12));
        assert_eq!(t.released(), Some(12));
        assert_eq!(t.in_flight(), 1);
        assert_eq!(t.complete(13).unwrap(), Some(13));
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn commit_position_is_last_done_plus_one() {
        // After processing offset 41 the consumer must resume at 42, not re-read 41 nor skip 42.
        assert_eq!(commit_position(41), 42);
        assert_eq!(commit_position(0), 1);
    }

    #[test]
    fn gaps_are_allowed_and_order_enforced() {
        let mut t = AckTracker::new();
        t.track(5).unwrap();
        t.track(9).unwrap();
        assert_eq!(
            t.track(9),
            Err(AckError::NotIncreasing { offset: 9, last: 9 })
        );
        assert_eq!(t.complete(9).unwrap(), None);
        assert_eq!(t.complete(5).unwrap(), Some(9));
        assert_eq!(
            t.track(7),
            Err(AckError::NotIncreasing { offset: 7, last: 9 })
        );
    }

    #[test]
    fn unknown_and_double_completion_are_errors() {
        let mut t = AckTracker::new();
        t.track(1).unwrap();
        t.track(2).unwrap();
        assert_eq!(t.complete(3), Err(AckError::Unknown(3)));
        assert_eq!(t.complete(2).unwrap(), None);
        assert_eq!(t.complete(2), Err(AckError::Unknown(2)));
    }

    #[test]
    fn abandon_keeps_released_position() {
        let mut t = AckTracker::new();
        t.track(1).unwrap();
        t.track(2).unwrap();
        t.complete(1).unwrap();
        assert_eq!(t.abandon_pending(), 1);
        assert_eq!(t.released(), Some(1));
    }

    proptest! {
        /// Whatever order records finish in, the released position is always the largest offset whose
        /// predecessors are all done, and it never moves backwards.
        #[test]
        fn released_is_max_contiguous_done(
            gaps in proptest::collection::vec(1i64..4, 1..60),
            order_seed in proptest::collection::vec(any::<u32>(), 1..60),
        ) {
            let mut offsets = Vec::new();
            let mut o = 100;
            for g in &gaps { o += g; offsets.push(o); }
            let mut t = AckTracker::new();
            for &o in &offsets { t.track(o).unwrap(); }
            let mut order: Vec<usize> = (0..offsets.len()).collect();
            for (i, s) in order_seed.iter().enumerate().take(offsets.len()) {
                let j = (*s as usize) % offsets.len();
                order.swap(i % offsets.len(), j);
            }
            let mut done = vec![false; offsets.len()];
            let mut last_released: Option<i64> = None;
            for idx in order {
                done[idx] = true;
                t.complete(offsets[idx]).unwrap();
                let expect = done.iter().take_while(|d| **d).count();
                let expected = if expect == 0 { None } else { Some(offsets[expect - 1]) };
                prop_assert_eq!(t.released(), expected);
                prop_assert!(t.released() >= last_released);
                last_released = t.released();
            }
            prop_assert_eq!(t.released(), offsets.last().copied());
            prop_assert_eq!(t.in_flight(), 0);
        }
    }
}
