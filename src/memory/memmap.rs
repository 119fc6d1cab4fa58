//! The global memmap: for every machine page in use, its refcount and the
//! (vm, gfn) owners that map it (Disco's backmap). The node is part of the
//! page's name ([`MachinePage`]).
//!
//! Stored densely, one slot per pool page up to the highest index used, so
//! a lookup is two array indexings and recording an owner allocates nothing
//! (one owner lives inline; only shared pages spill to the heap). Migration
//! updates two entries per page moved, and with a tree map that bookkeeping
//! cost as much as the copy itself.

use smallvec::SmallVec;

use super::{Gfn, MachinePage, VmId};

/// The (vm, gfn) frames that map a page; one inline.
pub type Owners = SmallVec<[(VmId, Gfn); 1]>;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PageInfo {
    /// Kept separately from `owners.len()` on purpose: `verify` checks that
    /// the two agree, which catches a mapper bug that updates one only.
    pub refcount: u32,
    pub owners: Owners,
}

impl PageInfo {
    /// The slot describes a page in use (a free slot is all zero).
    fn in_use(&self) -> bool {
        self.refcount != 0 || !self.owners.is_empty()
    }
}

/// Machine pages in use. A page with no owner is free.
#[derive(Debug, Default)]
pub struct Memmap {
    /// `nodes[node][index]`; a slot with refcount 0 and no owners is free.
    nodes: Vec<Vec<PageInfo>>,
    in_use: usize,
    /// Pages with two owners or more, and the owners of those pages: kept
    /// as owners come and go, so sharing figures cost nothing to read
    /// (`verify` recounts them).
    shared_pages: u64,
    sharing_frames: u64,
}

impl Memmap {
    pub fn get(&self, page: MachinePage) -> Option<&PageInfo> {
        self.nodes
            .get(page.node())
            .and_then(|n| n.get(page.index as usize))
            .filter(|info| info.in_use())
    }

    /// Records that `(vm, gfn)` maps `page`.
    pub fn add_owner(&mut self, page: MachinePage, vm: VmId, gfn: Gfn) {
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
            slots.resize_with(want, PageInfo::default);
        }
        let info = &mut slots[index];
        if !info.in_use() {
            self.in_use += 1;
        }
        info.refcount += 1;
        info.owners.push((vm, gfn));
        match info.owners.len() {
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
        let info = self
            .nodes
            .get_mut(page.node())
            .and_then(|n| n.get_mut(page.index as usize))
            .filter(|info| !info.owners.is_empty())
            .unwrap_or_else(|| {
                panic!("memmap: {page} has no owners, cannot remove ({vm}, {gfn:#x})")
            });
        let pos = info
            .owners
            .iter()
            .position(|&o| o == (vm, gfn))
            .unwrap_or_else(|| panic!("memmap: ({vm}, {gfn:#x}) does not own {page}"));
        match info.owners.len() {
            2 => {
                self.shared_pages -= 1;
                self.sharing_frames -= 2;
            }
            n if n > 2 => self.sharing_frames -= 1,
            _ => {}
        }
        info.owners.swap_remove(pos);
        info.refcount -= 1;
        if info.refcount == 0 {
            // Back to an empty slot (a shared page's heap list goes too).
            *info = PageInfo::default();
            self.in_use -= 1;
            true
        } else {
            false
        }
    }

    /// Pages in use, by node then index.
    pub fn iter(&self) -> impl Iterator<Item = (MachinePage, &PageInfo)> {
        self.nodes.iter().enumerate().flat_map(|(node, slots)| {
            slots.iter().enumerate().filter_map(move |(index, info)| {
                info.in_use().then_some((
                    MachinePage {
                        node: node as u16,
                        index: index as u32,
                    },
                    info,
                ))
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
    ) -> impl Iterator<Item = (MachinePage, &PageInfo)> {
        let slots = self.nodes.get(node).map_or(&[][..], Vec::as_slice);
        let end = (indices.end as usize).min(slots.len());
        let start = (indices.start as usize).min(end);
        slots[start..end]
            .iter()
            .enumerate()
            .filter(|(_, info)| info.in_use())
            .map(move |(k, info)| {
                (
                    MachinePage {
                        node: node as u16,
                        index: (start + k) as u32,
                    },
                    info,
                )
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
