//! The global memmap: for every machine page in use, its refcount and the
//! (vm, gfn) owners that map it (Disco's backmap). The node is part of the
//! page's name ([`MachinePage`]).
//!
//! Stored densely, one slot per pool page up to the highest index used, so
//! a lookup is two array indexings and recording an owner allocates nothing
//! (one owner lives inline; only shared pages spill to the heap). Migration
//! updates two entries per page moved, and with a tree map that bookkeeping
//! cost as much as the copy itself.

use std::collections::HashMap;

use super::{Gfn, MachinePage, VmId};

/// One machine page's slot: its refcount and first owner, 12 bytes. A
/// page's further owners (it is shared) live in `Memmap::more`. The memmap
/// has a slot for every pool page up to the highest used, so at 4 KiB
/// pages each byte of a slot is 0.024 % of the machine's memory: a slot
/// with a small-vector of `(VmId, Gfn)` owners was 32 bytes, the largest
/// part of the monitor's own memory (heaptrack, 4 x 256 MiB guests).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Slot {
    /// Kept separately from the owner count on purpose: `verify` checks
    /// that the two agree, which catches a mapper bug that updates one
    /// only.
    refcount: u32,
    /// The first owner's VM, `NO_VM` in a free slot.
    vm: VmId,
    /// The first owner's guest frame (guest frames fit 32 bits: 16 TiB).
    gfn: u32,
}

const NO_VM: VmId = VmId::MAX;

impl Default for Slot {
    fn default() -> Self {
        Slot {
            refcount: 0,
            vm: NO_VM,
            gfn: 0,
        }
    }
}

impl Slot {
    /// The slot describes a page in use (a free slot has no owner and a
    /// refcount of 0).
    fn in_use(&self) -> bool {
        self.refcount != 0 || self.vm != NO_VM
    }
}

/// A page in use: its refcount and owners.
#[derive(Clone, Copy, Debug)]
pub struct PageInfo<'a> {
    pub refcount: u32,
    pub owners: Owners<'a>,
}

/// The `(vm, gfn)` frames that map a page: the first, then the rest.
#[derive(Clone, Copy, Debug)]
pub struct Owners<'a> {
    first: (VmId, u32),
    more: &'a [(VmId, u32)],
}

impl<'a> Owners<'a> {
    pub fn len(&self) -> usize {
        1 + self.more.len()
    }
    pub fn is_empty(&self) -> bool {
        false
    }
    /// The first owner recorded (of a page with one owner: the owner).
    pub fn first(&self) -> (VmId, Gfn) {
        (self.first.0, self.first.1 as Gfn)
    }
    pub fn iter(&self) -> impl Iterator<Item = (VmId, Gfn)> + 'a {
        std::iter::once(self.first)
            .chain(self.more.iter().copied())
            .map(|(vm, gfn)| (vm, gfn as Gfn))
    }
    pub fn contains(&self, owner: &(VmId, Gfn)) -> bool {
        self.iter().any(|o| o == *owner)
    }
    pub fn to_vec(&self) -> Vec<(VmId, Gfn)> {
        self.iter().collect()
    }
}

/// Machine pages in use. A page with no owner is free.
#[derive(Debug, Default)]
pub struct Memmap {
    /// `nodes[node][index]`.
    nodes: Vec<Vec<Slot>>,
    /// The owners after the first of every page with more than one.
    more: HashMap<MachinePage, Vec<(VmId, u32)>, foldhash::fast::RandomState>,
    in_use: usize,
    /// Pages with two owners or more, and the owners of those pages: kept
    /// as owners come and go, so sharing figures cost nothing to read
    /// (`verify` recounts them).
    shared_pages: u64,
    sharing_frames: u64,
}

impl Memmap {
    fn info(&self, page: MachinePage, slot: &Slot) -> PageInfo<'_> {
        let more = if slot.refcount > 1 {
            self.more.get(&page).map_or(&[][..], Vec::as_slice)
        } else {
            &[]
        };
        PageInfo {
            refcount: slot.refcount,
            owners: Owners {
                first: (slot.vm, slot.gfn),
                more,
            },
        }
    }

    pub fn get(&self, page: MachinePage) -> Option<PageInfo<'_>> {
        let slot = self
            .nodes
            .get(page.node())
            .and_then(|n| n.get(page.index as usize))
            .filter(|slot| slot.in_use())?;
        Some(self.info(page, slot))
    }

    /// Records that `(vm, gfn)` maps `page`.
    pub fn add_owner(&mut self, page: MachinePage, vm: VmId, gfn: Gfn) {
        let short = u32::try_from(gfn)
            .unwrap_or_else(|_| panic!("memmap: guest frame {gfn:#x} beyond 32 bits"));
        assert_ne!(vm, NO_VM, "memmap: VM id {vm} is reserved");
        if self.nodes.len() <= page.node() {
            self.nodes.resize_with(page.node() + 1, Vec::new);
        }
        let slots = &mut self.nodes[page.node()];
        let index = page.index as usize;
        if slots.len() <= index {
            // Grow geometrically (pools hand out pages from the bottom up),
            // by a quarter: every slot is written when it is made, so the
            // slack is resident, and doubling left up to half of a 1 GiB
            // guest's memmap unused (heaptrack: 10.5 MB for 262,144 pages).
            let want = (index + 1).max(slots.len() + slots.len() / 4).max(1024);
            slots.reserve_exact(want - slots.len());
            slots.resize_with(want, Slot::default);
        }
        let slot = &mut slots[index];
        if !slot.in_use() {
            self.in_use += 1;
        }
        slot.refcount += 1;
        if slot.vm == NO_VM {
            (slot.vm, slot.gfn) = (vm, short);
        } else {
            self.more.entry(page).or_default().push((vm, short));
        }
        match slot.refcount {
            2 => {
                self.shared_pages += 1;
                self.sharing_frames += 2;
            }
            n if n > 2 => self.sharing_frames += 1,
            _ => {}
        }
    }

    /// Removes `(vm, gfn)` from `page`'s owners. Returns `true` when that was
    /// the last owner (the caller must then free the page).
    pub fn remove_owner(&mut self, page: MachinePage, vm: VmId, gfn: Gfn) -> bool {
        let owned = |slot: &Slot| slot.vm != NO_VM;
        let slot = self
            .nodes
            .get_mut(page.node())
            .and_then(|n| n.get_mut(page.index as usize))
            .filter(|slot| owned(slot))
            .unwrap_or_else(|| {
                panic!("memmap: {page} has no owners, cannot remove ({vm}, {gfn:#x})")
            });
        let owner = (vm, gfn as u32);
        fn no_owner(page: MachinePage, vm: VmId, gfn: Gfn) -> ! {
            panic!("memmap: ({vm}, {gfn:#x}) does not own {page}")
        }
        if u32::try_from(gfn).is_err() {
            no_owner(page, vm, gfn);
        }
        match slot.refcount {
            2 => {
                self.shared_pages -= 1;
                self.sharing_frames -= 2;
            }
            n if n > 2 => self.sharing_frames -= 1,
            _ => {}
        }
        if (slot.vm, slot.gfn) == owner {
            // The first owner leaves: the next one (if any) takes its place.
            match self.more.get_mut(&page) {
                Some(rest) => {
                    (slot.vm, slot.gfn) = rest.swap_remove(0);
                    if rest.is_empty() {
                        self.more.remove(&page);
                    }
                }
                None => (slot.vm, slot.gfn) = (NO_VM, 0),
            }
        } else {
            let rest = self
                .more
                .get_mut(&page)
                .unwrap_or_else(|| no_owner(page, vm, gfn));
            let pos = rest
                .iter()
                .position(|&o| o == owner)
                .unwrap_or_else(|| no_owner(page, vm, gfn));
            rest.swap_remove(pos);
            if rest.is_empty() {
                self.more.remove(&page);
            }
        }
        slot.refcount -= 1;
        if slot.refcount == 0 {
            *slot = Slot::default();
            self.in_use -= 1;
            true
        } else {
            false
        }
    }

    /// Pages in use, by node then index.
    pub fn iter(&self) -> impl Iterator<Item = (MachinePage, PageInfo<'_>)> {
        self.nodes
            .iter()
            .enumerate()
            .flat_map(move |(node, slots)| {
                slots.iter().enumerate().filter_map(move |(index, slot)| {
                    let page = MachinePage {
                        node: node as u16,
                        index: index as u32,
                    };
                    slot.in_use().then(|| (page, self.info(page, slot)))
                })
            })
    }

    pub fn len(&self) -> usize {
        self.in_use
    }

    /// Slots of `node` (one past the highest page index ever used there):
    /// the range a walk over the node's pages covers.
    pub fn extent(&self, node: usize) -> u32 {
        self.nodes.get(node).map_or(0, |n| n.len() as u32)
    }

    /// Pages in use on `node` whose index is in `indices`, in index order.
    pub fn range(
        &self,
        node: usize,
        indices: std::ops::Range<u32>,
    ) -> impl Iterator<Item = (MachinePage, PageInfo<'_>)> {
        let slots = self.nodes.get(node).map_or(&[][..], Vec::as_slice);
        let end = (indices.end as usize).min(slots.len());
        let start = (indices.start as usize).min(end);
        slots[start..end]
            .iter()
            .enumerate()
            .filter(|(_, slot)| slot.in_use())
            .map(move |(k, slot)| {
                let page = MachinePage {
                    node: node as u16,
                    index: (start + k) as u32,
                };
                (page, self.info(page, slot))
            })
    }

    /// Pages with more than one owner, and the frames that map them (kept
    /// incrementally).
    pub fn sharing(&self) -> (u64, u64) {
        (self.shared_pages, self.sharing_frames)
    }

    pub fn is_empty(&self) -> bool {
        self.in_use == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: MachinePage = MachinePage { node: 1, index: 5 };

    #[test]
    fn owners_come_and_go_in_any_order() {
        let mut memmap = Memmap::default();
        assert!(memmap.get(PAGE).is_none());
        for owner in [(1, 10), (2, 20), (3, 30)] {
            memmap.add_owner(PAGE, owner.0, owner.1);
        }
        let info = memmap.get(PAGE).unwrap();
        assert_eq!((info.refcount, info.owners.len()), (3, 3));
        assert_eq!(info.owners.to_vec(), vec![(1, 10), (2, 20), (3, 30)]);
        assert_eq!(memmap.sharing(), (1, 3));
        // The first owner leaves: another takes its place.
        assert!(!memmap.remove_owner(PAGE, 1, 10));
        let info = memmap.get(PAGE).unwrap();
        assert_eq!(info.refcount, 2);
        assert!(info.owners.contains(&(2, 20)) && info.owners.contains(&(3, 30)));
        assert_eq!(memmap.sharing(), (1, 2));
        assert!(!memmap.remove_owner(PAGE, 3, 30));
        assert_eq!(memmap.get(PAGE).unwrap().owners.first(), (2, 20));
        assert_eq!(memmap.sharing(), (0, 0));
        assert!(memmap.remove_owner(PAGE, 2, 20), "the last owner frees it");
        assert!(memmap.get(PAGE).is_none() && memmap.is_empty());
        assert!(memmap.more.is_empty(), "no list left behind");
        assert_eq!(std::mem::size_of::<Slot>(), 12);
    }

    #[test]
    #[should_panic(expected = "does not own")]
    fn removing_a_stranger_is_refused() {
        let mut memmap = Memmap::default();
        memmap.add_owner(PAGE, 1, 10);
        memmap.add_owner(PAGE, 2, 20);
        memmap.remove_owner(PAGE, 3, 30);
    }
}
