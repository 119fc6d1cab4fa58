//! The scanner's candidate table: for each content key, the frame that
//! first showed that content (KSM's trees play this part).
//!
//! A table of its own rather than a `HashMap`, for one reason: prefetching.
//! The scanner hashes frames in batches (`Memory::scan_frames`) and then
//! looks each one up. The table holds an entry per distinct content seen,
//! megabytes for a few GiB of guests, so a lookup is a cache miss, and on
//! this host (a nested VM, where a TLB miss walks two page tables) a
//! profile of `disco bench sharing-runs` put 22 % of the scanner's CPU on
//! the one load that reads the entry. Here a key's slot is computable from
//! the key alone ([`CandidateTable::prefetch`]), so the scanner asks for
//! every slot of a batch before the first lookup and the misses overlap
//! instead of queueing.
//!
//! Open addressing with linear probing. Keys are content hashes (xxh3),
//! already uniform, so a multiply-shift of the key picks the slot. The
//! keys and the candidates live in two arrays: a probe reads only keys
//! (8 bytes a slot, eight to a cache line), and a hit reads one candidate.
//! Key 0 marks an empty slot ([`Key::new`] never makes it). Entries are
//! never removed one at a time (a stale candidate is overwritten, a gone VM
//! is dropped by [`CandidateTable::retain`], which rebuilds), so there are
//! no tombstones. The table doubles at 80 % load.

use crate::memory::{Gfn, MachinePage, VmId};

/// The candidate table's key: a content hash within a sharing domain. The
/// domain is folded into the hash (an odd multiplier maps distinct domains
/// to distinct offsets), so equal contents of two domains never share a
/// key, and a key is 8 bytes, not 16. Different contents whose keys
/// collide only cost a failed compare, as any hash collision does (so
/// folding the hash 0 onto 1, to keep 0 for empty slots, is harmless).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct Key(u64);

impl Key {
    pub(super) fn new(domain: usize, hash: u64) -> Key {
        Key((hash ^ (domain as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)).max(1))
    }
}

/// A candidate: the frame that first showed a content, and its page,
/// packed in 16 bytes (a `(VmId, Gfn, MachinePage)` takes 24).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Candidate {
    pub(super) vm: VmId,
    gfn: u32,
    index: u32,
    node: u16,
}

impl Candidate {
    pub(super) fn new((vm, gfn, page): (VmId, Gfn, MachinePage)) -> Candidate {
        Candidate {
            vm,
            // Guest frames fit 32 bits (the memmap holds them so too).
            gfn: gfn as u32,
            index: page.index,
            node: page.node,
        }
    }
    pub(super) fn frame(self) -> (VmId, Gfn, MachinePage) {
        let page = MachinePage {
            node: self.node,
            index: self.index,
        };
        (self.vm, self.gfn as Gfn, page)
    }
}

const EMPTY: u64 = 0;
/// Smallest table, in slots.
const MIN_SLOTS: usize = 1024;

/// Key -> candidate (see the module comment).
#[derive(Debug)]
pub(super) struct CandidateTable {
    /// Power-of-two many; `EMPTY` or a key.
    keys: Vec<u64>,
    candidates: Vec<Candidate>,
    len: usize,
    /// 64 - log2(slots): the multiply-shift's shift.
    shift: u32,
}

impl Default for CandidateTable {
    fn default() -> Self {
        CandidateTable::with_slots(MIN_SLOTS)
    }
}

impl CandidateTable {
    fn with_slots(slots: usize) -> CandidateTable {
        debug_assert!(slots.is_power_of_two());
        CandidateTable {
            keys: vec![EMPTY; slots],
            candidates: vec![Candidate::default(); slots],
            len: 0,
            shift: 64 - slots.trailing_zeros(),
        }
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// The slot a key's probe starts at.
    fn home(&self, key: Key) -> usize {
        (key.0.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> self.shift) as usize
    }

    fn mask(&self) -> usize {
        self.keys.len() - 1
    }

    /// The slot holding `key`, or the empty slot where it would go.
    fn find(&self, key: Key) -> (usize, bool) {
        let mask = self.mask();
        let mut i = self.home(key);
        loop {
            match self.keys[i] {
                EMPTY => return (i, false),
                k if k == key.0 => return (i, true),
                _ => i = (i + 1) & mask,
            }
        }
    }

    /// Asks the CPU to bring `key`'s first slot (its key and its candidate)
    /// into the cache, so that a lookup soon after does not wait for
    /// memory. A hint only: it changes no result.
    pub(super) fn prefetch(&self, key: Key) {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            let i = self.home(key);
            // SAFETY: prefetching never faults and reads nothing the
            // program sees; both pointers are in bounds anyway.
            unsafe {
                _mm_prefetch::<_MM_HINT_T0>(self.keys.as_ptr().add(i).cast());
                _mm_prefetch::<_MM_HINT_T0>(self.candidates.as_ptr().add(i).cast());
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = key;
    }

    pub(super) fn get(&self, key: Key) -> Option<Candidate> {
        let (i, found) = self.find(key);
        found.then(|| self.candidates[i])
    }

    /// Sets `key`'s candidate, replacing any.
    pub(super) fn insert(&mut self, key: Key, candidate: Candidate) {
        if (self.len + 1) * 5 > self.keys.len() * 4 {
            self.grow();
        }
        let (i, found) = self.find(key);
        if !found {
            self.keys[i] = key.0;
            self.len += 1;
        }
        self.candidates[i] = candidate;
    }

    fn grow(&mut self) {
        let mut bigger = CandidateTable::with_slots(self.keys.len() * 2);
        bigger.refill(self, |_| true);
        *self = bigger;
    }

    /// Inserts every entry of `from` that `keep` accepts (into a table with
    /// room for them).
    fn refill(&mut self, from: &CandidateTable, keep: impl Fn(&Candidate) -> bool) {
        for (&k, c) in from.keys.iter().zip(&from.candidates) {
            if k != EMPTY && keep(c) {
                let (i, _) = self.find(Key(k));
                self.keys[i] = k;
                self.candidates[i] = *c;
                self.len += 1;
            }
        }
    }

    /// Keeps only the candidates `keep` accepts (rebuilds the table: with
    /// linear probing a removed entry cannot simply be emptied).
    pub(super) fn retain(&mut self, keep: impl Fn(&Candidate) -> bool) {
        let all_kept = self
            .keys
            .iter()
            .zip(&self.candidates)
            .all(|(&k, c)| k == EMPTY || keep(c));
        if all_kept {
            return;
        }
        let mut kept = CandidateTable::with_slots(self.keys.len());
        kept.refill(self, keep);
        *self = kept;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn cand(vm: VmId, gfn: Gfn) -> Candidate {
        Candidate::new((
            vm,
            gfn,
            MachinePage {
                node: 1,
                index: gfn as u32 * 3,
            },
        ))
    }

    /// The table agrees with a `HashMap` through inserts, overwrites,
    /// growth and `retain`, including keys that share a home slot.
    #[test]
    fn agrees_with_a_hashmap() {
        let mut table = CandidateTable::default();
        let mut model: HashMap<Key, Candidate> = HashMap::new();
        let mut x = 0x1234_5678_9abc_def0u64;
        for step in 0..20_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Few distinct keys at first (overwrites), many later
            // (growth); small keys collide in their home slot.
            let key = Key::new((step % 3) as usize, if step < 2000 { x % 97 } else { x });
            let c = cand((step % 5) as VmId, step);
            table.insert(key, c);
            model.insert(key, c);
            if step % 4999 == 0 {
                table.retain(|c| c.vm != 2);
                model.retain(|_, c| c.vm != 2);
            }
        }
        assert_eq!(table.len(), model.len());
        for (k, c) in &model {
            assert_eq!(table.get(*k), Some(*c));
            table.prefetch(*k);
        }
        assert_eq!(table.get(Key::new(9, 42)), None);
        assert_eq!(Key::new(0, 0), Key::new(0, 1), "0 is kept for empty slots");
    }
}
