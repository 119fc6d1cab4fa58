//! The global memmap: for every machine page in use, its refcount and the
//! (vm, gfn) owners that map it (Disco's backmap). The node is part of the
//! page's name ([`MachinePage`]).

use std::collections::BTreeMap;

use super::{Gfn, MachinePage, VmId};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PageInfo {
    /// Kept separately from `owners.len()` on purpose: `verify` checks that
    /// the two agree, which catches a mapper bug that updates one only.
    pub refcount: u32,
    pub owners: Vec<(VmId, Gfn)>,
}

/// Machine pages in use. A page absent from the map is free.
#[derive(Debug, Default)]
pub struct Memmap {
    pages: BTreeMap<MachinePage, PageInfo>,
}

impl Memmap {
    pub fn get(&self, page: MachinePage) -> Option<&PageInfo> {
        self.pages.get(&page)
    }

    /// Records that `(vm, gfn)` maps `page`.
    pub fn add_owner(&mut self, page: MachinePage, vm: VmId, gfn: Gfn) {
        let info = self.pages.entry(page).or_default();
        info.refcount += 1;
        info.owners.push((vm, gfn));
    }

    /// Removes `(vm, gfn)` from `page`'s owners. Returns `true` when that was
    /// the last owner (the caller must then free the page).
    pub fn remove_owner(&mut self, page: MachinePage, vm: VmId, gfn: Gfn) -> bool {
        let info = self.pages.get_mut(&page).unwrap_or_else(|| {
            panic!("memmap: {page} has no owners, cannot remove ({vm}, {gfn:#x})")
        });
        let pos = info
            .owners
            .iter()
            .position(|&o| o == (vm, gfn))
            .unwrap_or_else(|| panic!("memmap: ({vm}, {gfn:#x}) does not own {page}"));
        info.owners.swap_remove(pos);
        info.refcount -= 1;
        if info.refcount == 0 {
            self.pages.remove(&page);
            true
        } else {
            false
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (&MachinePage, &PageInfo)> {
        self.pages.iter()
    }

    pub fn len(&self) -> usize {
        self.pages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }
}
