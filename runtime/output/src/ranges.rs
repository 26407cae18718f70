//! A set of sequence indices stored as sorted, disjoint, non-adjacent runs `[start, end)`.
//!
//! Packs arrive in FFD order, which scatters indices only within the packer's sliding window, so the
//! set of written indices collapses to a handful of runs however many sequences there are: 100 M
//! indices done in order are one run (16 bytes), not a 12 MB bitmap.

use std::collections::BTreeMap;
use std::ops::Bound;

/// Sorted run-length set of `u64` indices.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IndexSet {
    /// start → end (exclusive); runs never overlap nor touch.
    runs: BTreeMap<u64, u64>,
    len: u64,
}

impl IndexSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of indices in the set.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of maximal runs (memory is proportional to this, not to `len`).
    pub fn num_runs(&self) -> usize {
        self.runs.len()
    }

    pub fn contains(&self, index: u64) -> bool {
        self.runs
            .range(..=index)
            .next_back()
            .is_some_and(|(_, &end)| index < end)
    }

    /// Inserts one index; `Err(index)` if it was already present.
    pub fn insert(&mut self, index: u64) -> Result<(), u64> {
        match index.checked_add(1) {
            Some(end) => self.insert_run(index, end),
            // u64::MAX cannot start a half-open run; no real input has 2^64 sequences.
            None => Err(index),
        }
    }

    /// Inserts `[start, end)`. If any of it is already present the set is left unchanged and the
    /// smallest already-present index is returned.
    pub fn insert_run(&mut self, start: u64, end: u64) -> Result<(), u64> {
        if start >= end {
            return Ok(());
        }
        let before = self.runs.range(..=start).next_back().map(|(&s, &e)| (s, e));
        if let Some((_, e)) = before
            && e > start
        {
            return Err(start);
        }
        let after = self
            .runs
            .range((Bound::Excluded(start), Bound::Unbounded))
            .next()
            .map(|(&s, &e)| (s, e));
        if let Some((s, _)) = after
            && s < end
        {
            return Err(s);
        }
        let mut new_start = start;
        let mut new_end = end;
        if let Some((s, e)) = before
            && e == start
        {
            self.runs.remove(&s);
            new_start = s;
        }
        if let Some((s, e)) = after
            && s == end
        {
            self.runs.remove(&s);
            new_end = e;
        }
        self.runs.insert(new_start, new_end);
        self.len += end - start;
        Ok(())
    }

    /// Smallest index in `0..expected` that is missing, if any.
    pub fn first_missing(&self, expected: u64) -> Option<u64> {
        match self.runs.iter().next() {
            Some((&0, &end)) => (end < expected).then_some(end),
            _ => (expected > 0).then_some(0),
        }
    }

    /// Largest index in the set.
    pub fn max(&self) -> Option<u64> {
        self.runs.iter().next_back().map(|(_, &end)| end - 1)
    }

    /// The runs, ascending.
    pub fn runs(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.runs.iter().map(|(&s, &e)| (s, e))
    }

    /// An immutable, lock-free snapshot for membership queries from other threads.
    pub fn snapshot(&self) -> IndexSnapshot {
        IndexSnapshot {
            starts: self.runs.keys().copied().collect(),
            ends: self.runs.values().copied().collect(),
        }
    }
}

/// Frozen [`IndexSet`]: two sorted arrays and a binary search.
#[derive(Debug, Clone, Default)]
pub struct IndexSnapshot {
    starts: Vec<u64>,
    ends: Vec<u64>,
}

impl IndexSnapshot {
    pub fn contains(&self, index: u64) -> bool {
        let run = self.starts.partition_point(|&s| s <= index);
        run > 0 && index < self.ends[run - 1]
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Against a plain `BTreeSet` model: membership, length, duplicate detection, first gap,
        /// maximality of the runs, and the snapshot.
        #[test]
        fn behaves_like_a_set(ops in proptest::collection::vec((0u64..300, 1u64..6), 0..200)) {
            let mut set = IndexSet::new();
            let mut model = BTreeSet::new();
            for (start, len) in ops {
                let end = start + len;
                let clash = (start..end).find(|i| model.contains(i));
                let got = set.insert_run(start, end);
                match clash {
                    Some(i) => prop_assert_eq!(got, Err(i)),
                    None => {
                        prop_assert_eq!(got, Ok(()));
                        model.extend(start..end);
                    }
                }
            }
            prop_assert_eq!(set.len(), model.len() as u64);
            let snap = set.snapshot();
            for i in 0..320 {
                prop_assert_eq!(set.contains(i), model.contains(&i));
                prop_assert_eq!(snap.contains(i), model.contains(&i));
            }
            for expected in [0u64, 1, 50, 310] {
                let want = (0..expected).find(|i| !model.contains(i));
                prop_assert_eq!(set.first_missing(expected), want);
            }
            prop_assert_eq!(set.max(), model.iter().next_back().copied());
            let runs: Vec<_> = set.runs().collect();
            for pair in runs.windows(2) {
                // Maximal: neither overlapping nor touching.
                prop_assert!(pair[0].1 < pair[1].0);
            }
        }
    }

    #[test]
    fn in_order_indices_are_one_run() {
        let mut set = IndexSet::new();
        for i in (0..100_000u64).rev() {
            set.insert(i).expect("fresh index");
        }
        assert_eq!(set.num_runs(), 1);
        assert_eq!(set.first_missing(100_000), None);
        assert_eq!(set.first_missing(100_001), Some(100_000));
        assert_eq!(set.insert(5), Err(5));
    }
}
