//! A set of page indices kept as runs of consecutive pages.
//!
//! The pools' free sets change a run at a time: a migration frees the old
//! pages of a run and takes a run of targets, a VM's teardown frees all its
//! runs. A set of single indices (a `BTreeSet<u32>`) paid a tree insert or
//! remove per page for that, about 70 ns of the 600 ns a warm page move
//! took here; a set of runs pays one per run.

use std::collections::BTreeMap;

/// Disjoint runs `start -> length`. Invariants: every length is at least
/// 1, and no two runs touch (adjacent runs are merged on insert), so each
/// set has exactly one representation.
#[derive(Debug, Default, Clone)]
pub struct RunSet {
    runs: BTreeMap<u32, u32>,
    pages: u32,
}

impl RunSet {
    /// Pages in the set.
    pub fn len(&self) -> u32 {
        self.pages
    }

    pub fn is_empty(&self) -> bool {
        self.pages == 0
    }

    /// The run holding `index`, if any.
    fn run_at(&self, index: u32) -> Option<(u32, u32)> {
        self.runs
            .range(..=index)
            .next_back()
            .map(|(&s, &l)| (s, l))
            .filter(|&(s, l)| index - s < l)
    }

    pub fn contains(&self, index: u32) -> bool {
        self.run_at(index).is_some()
    }

    /// Whether any page of `start..start+len` is in the set.
    pub fn overlaps(&self, start: u32, len: u32) -> bool {
        len > 0
            && (self.contains(start)
                || self
                    .runs
                    .range(start..start.saturating_add(len))
                    .next()
                    .is_some())
    }

    /// Adds `start..start+len`, none of which may be in the set yet.
    pub fn insert(&mut self, start: u32, len: u32) {
        if len == 0 {
            return;
        }
        assert!(
            !self.overlaps(start, len),
            "run {start:#x}+{len} is already partly in the set"
        );
        self.pages += len;
        let (mut start, mut len) = (start, len);
        if let Some((s, l)) = self.runs.range(..start).next_back().map(|(&s, &l)| (s, l)) {
            if s + l == start {
                self.runs.remove(&s);
                (start, len) = (s, l + len);
            }
        }
        if let Some(l) = self.runs.remove(&(start + len)) {
            len += l;
        }
        self.runs.insert(start, len);
    }

    /// Removes `start..start+len`, which must lie inside one run of the
    /// set. Returns false (and changes nothing) when it does not.
    pub fn remove(&mut self, start: u32, len: u32) -> bool {
        if len == 0 {
            return true;
        }
        let Some((s, l)) = self.run_at(start) else {
            return false;
        };
        if start - s + len > l {
            return false;
        }
        self.runs.remove(&s);
        if start > s {
            self.runs.insert(s, start - s);
        }
        let end = start + len;
        if end < s + l {
            self.runs.insert(end, s + l - end);
        }
        self.pages -= len;
        true
    }

    /// The runs, ascending: `(start, len)`.
    pub fn runs(&self) -> impl DoubleEndedIterator<Item = (u32, u32)> + '_ {
        self.runs.iter().map(|(&s, &l)| (s, l))
    }

    /// Every page, ascending.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.runs().flat_map(|(s, l)| s..s + l)
    }

    /// The first run of at least `want` pages, cut to `want`; else the
    /// longest run (the first of equal ones); `(0, 0)` for an empty set.
    pub fn find_run(&self, want: u32) -> (u32, u32) {
        let mut best = (0, 0);
        for (s, l) in self.runs() {
            if l >= want {
                return (s, want);
            }
            if l > best.1 {
                best = (s, l);
            }
        }
        best
    }

    /// The last run, the one with the highest pages.
    pub fn last_run(&self) -> Option<(u32, u32)> {
        self.runs().next_back()
    }

    /// Takes up to `max` pages off the front of the first run.
    pub fn take_first(&mut self, max: u32) -> Option<(u32, u32)> {
        let (s, l) = self.runs().next()?;
        let len = l.min(max);
        self.remove(s, len);
        Some((s, len))
    }

    /// Takes up to `max` pages off the front of the set, run by run:
    /// the runs taken, ascending.
    pub fn take_runs(&mut self, max: u32) -> Vec<(u32, u32)> {
        let mut taken = Vec::new();
        let mut left = max;
        while left > 0 {
            let Some((start, len)) = self.take_first(left) else {
                break;
            };
            taken.push((start, len));
            left -= len;
        }
        taken
    }
}

/// Runs of consecutive values in `sorted` (ascending, no duplicates):
/// `(first, len)`. Pool page indices (`u32`) and guest frames (`u64`).
pub fn runs_of<T>(sorted: &[T]) -> impl Iterator<Item = (T, T)> + '_
where
    T: Copy + PartialEq + std::ops::Add<Output = T> + From<u8>,
{
    let mut i = 0;
    std::iter::from_fn(move || {
        let start = *sorted.get(i)?;
        let (mut n, mut len) = (1, T::from(1));
        while sorted.get(i + n) == Some(&(start + len)) {
            n += 1;
            len = len + T::from(1);
        }
        i += n;
        Some((start, len))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    /// The set's runs are disjoint, non-adjacent, non-empty and count
    /// exactly the model's pages.
    fn check(set: &RunSet, model: &BTreeSet<u32>) {
        let pages: Vec<u32> = set.iter().collect();
        let want: Vec<u32> = model.iter().copied().collect();
        assert_eq!(pages, want);
        assert_eq!(set.len() as usize, model.len());
        let runs: Vec<(u32, u32)> = set.runs().collect();
        for w in runs.windows(2) {
            assert!(w[0].0 + w[0].1 < w[1].0, "runs touch: {runs:?}");
        }
        assert!(runs.iter().all(|&(_, l)| l > 0));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u32, u32),
        Remove(u32, u32),
        TakeFirst(u32),
        TakeRuns(u32),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u32..200, 1u32..20).prop_map(|(s, l)| Op::Insert(s, l)),
            (0u32..200, 1u32..20).prop_map(|(s, l)| Op::Remove(s, l)),
            (1u32..20).prop_map(Op::TakeFirst),
            (1u32..40).prop_map(Op::TakeRuns),
        ]
    }

    proptest! {
        /// Random inserts and removes agree with a set of single pages.
        #[test]
        fn behaves_like_a_set_of_pages(ops in proptest::collection::vec(op(), 1..80)) {
            let mut set = RunSet::default();
            let mut model = BTreeSet::new();
            for op in ops {
                match op {
                    Op::Insert(s, l) => {
                        if (s..s + l).any(|p| model.contains(&p)) {
                            prop_assert!(set.overlaps(s, l));
                            continue;
                        }
                        prop_assert!(!set.overlaps(s, l));
                        set.insert(s, l);
                        model.extend(s..s + l);
                    }
                    Op::Remove(s, l) => {
                        let inside = set.run_at(s).is_some_and(|(rs, rl)| s - rs + l <= rl);
                        prop_assert_eq!(set.remove(s, l), inside);
                        if inside {
                            for p in s..s + l {
                                model.remove(&p);
                            }
                        }
                    }
                    Op::TakeFirst(n) => {
                        if let Some((s, l)) = set.take_first(n) {
                            prop_assert_eq!(Some(&s), model.first());
                            prop_assert!(l <= n);
                            for p in s..s + l {
                                prop_assert!(model.remove(&p));
                            }
                        } else {
                            prop_assert!(model.is_empty());
                        }
                    }
                    Op::TakeRuns(n) => {
                        let want: Vec<u32> = model.iter().take(n as usize).copied().collect();
                        let got: Vec<u32> = set
                            .take_runs(n)
                            .into_iter()
                            .flat_map(|(s, l)| s..s + l)
                            .collect();
                        prop_assert_eq!(&got, &want);
                        for p in want {
                            model.remove(&p);
                        }
                    }
                }
                check(&set, &model);
                for p in 0..230 {
                    prop_assert_eq!(set.contains(p), model.contains(&p));
                }
            }
        }
    }

    #[test]
    fn find_run_prefers_the_first_long_enough_run() {
        let mut set = RunSet::default();
        set.insert(0, 3);
        set.insert(10, 8);
        set.insert(30, 20);
        assert_eq!(set.find_run(5), (10, 5));
        assert_eq!(set.find_run(10), (30, 10));
        assert_eq!(set.find_run(50), (30, 20));
        assert_eq!(RunSet::default().find_run(4), (0, 0));
    }

    #[test]
    fn runs_of_splits_sorted_values() {
        let v = [1, 2, 3, 7, 9, 10];
        assert_eq!(runs_of(&v).collect::<Vec<_>>(), [(1, 3), (7, 1), (9, 2)]);
        assert_eq!(runs_of::<u32>(&[]).count(), 0);
    }
}
