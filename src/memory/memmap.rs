//! The global memmap: for every machine page in use, its refcount and the
//! (vm, gfn) owners that map it (Disco's backmap). The node is part of the
//! page's name ([`MachinePage`]).
//!
//! Stored densely, one slot per pool page up to the highest index used, so
//! a lookup is two array indexings and recording an owner allocates nothing
//! (one owner lives inline; only shared pages spill to the heap). Migration
//! updates two entries per page moved, and with a tree map that bookkeeping
//! cost as much as the copy itself.
//!
//! **Clone groups.** N clones of one snapshot map frame `f` of each clone
//! onto the same machine page, so that page's owners are "frame `f` of
//! every clone on the node, minus the clones that left it" (a copy-on-write
//! break, an unmap, a remap, a removal). Such a page's slot names a
//! [`CloneGroup`] instead of a VM: its owners are `(m, f)` for each member
//! `m` that has not left frame `f`, then any owners added later (the side
//! table, as for any page). A member records the frames it left in a bitmap
//! made on its first leave (a bit per frame of the snapshot: 8 KiB for
//! 256 MiB), so 100 clones of a 65,536-page snapshot cost no record per
//! (page, clone): 12 bytes a page and a few bytes a member, where an owner
//! list per page cost 8 bytes per clone per page plus its growth slack.
//! When the last member leaves a page, the page drops the group (its bits
//! are cleared, its next owner becomes its first) and a group with no page
//! left is freed.

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
    /// The first owner's VM, `NO_VM` in a free slot, or `GROUP_TAG |
    /// group`: the members of a clone group at `gfn`.
    vm: VmId,
    /// The first owner's guest frame (guest frames fit 32 bits: 16 TiB).
    gfn: u32,
}

const NO_VM: VmId = VmId::MAX;
/// Set in a slot's `vm` when the slot names a clone group (VM ids stay
/// below it).
const GROUP_TAG: VmId = 1 << 31;

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
    /// The clone group the slot names, if it names one.
    fn group(&self) -> Option<GroupId> {
        (self.vm != NO_VM && self.vm & GROUP_TAG != 0).then_some(self.vm & !GROUP_TAG)
    }
}

/// Names a clone group in the memmap.
pub type GroupId = u32;

/// One VM of a clone group and the frames it left.
#[derive(Debug)]
struct Member {
    vm: VmId,
    /// A bit per frame of the group's snapshot, set while the member no
    /// longer maps the group's page of that frame; empty until it leaves
    /// one.
    left: Vec<u64>,
}

impl Member {
    fn has_left(&self, gfn: u32) -> bool {
        self.left
            .get(gfn as usize / 64)
            .is_some_and(|w| w & (1 << (gfn % 64)) != 0)
    }
    fn set_left(&mut self, gfn: u32, frames: u32, on: bool) {
        if on && self.left.is_empty() {
            self.left = vec![0; (frames as usize).div_ceil(64)];
        }
        if let Some(w) = self.left.get_mut(gfn as usize / 64) {
            if on {
                *w |= 1 << (gfn % 64);
            } else {
                *w &= !(1 << (gfn % 64));
            }
        }
    }
}

/// VMs whose frames map the same machine pages frame for frame (clones of
/// one snapshot on one node): see the module doc.
#[derive(Debug)]
pub struct CloneGroup {
    /// Ascending by VM.
    members: Vec<Member>,
    /// Frames of the snapshot (the size of a member's bitmap).
    frames: u32,
    /// Pages whose slot names this group.
    pages: u64,
}

impl CloneGroup {
    fn member(&self, vm: VmId) -> Option<usize> {
        self.members.binary_search_by_key(&vm, |m| m.vm).ok()
    }
    /// The members that map the group's page of `gfn`.
    fn at(&self, gfn: u32) -> impl Iterator<Item = VmId> + '_ {
        self.members
            .iter()
            .filter(move |m| !m.has_left(gfn))
            .map(|m| m.vm)
    }
    /// `vm` stops mapping the group's page of `gfn`; `false` if it did not
    /// map it as a member.
    fn leave(&mut self, vm: VmId, gfn: u32) -> bool {
        let frames = self.frames;
        match self.member(vm) {
            Some(i) if gfn < frames && !self.members[i].has_left(gfn) => {
                self.members[i].set_left(gfn, frames, true);
                true
            }
            _ => false,
        }
    }
    /// `vm` maps the group's page of `gfn` again (the sharing scanner merged
    /// its copy back); `false` if it is not a member that had left it.
    fn rejoin(&mut self, vm: VmId, gfn: u32) -> bool {
        let frames = self.frames;
        match self.member(vm) {
            Some(i) if self.members[i].has_left(gfn) => {
                self.members[i].set_left(gfn, frames, false);
                true
            }
            _ => false,
        }
    }
}

/// A page in use: its refcount and owners.
#[derive(Clone, Copy, Debug)]
pub struct PageInfo<'a> {
    pub refcount: u32,
    pub owners: Owners<'a>,
}

/// The `(vm, gfn)` frames that map a page: the first (a VM's frame, or the
/// members of a clone group still at a frame), then the rest.
#[derive(Clone, Copy, Debug)]
pub struct Owners<'a> {
    first: Option<(VmId, u32)>,
    group: Option<(&'a CloneGroup, u32)>,
    more: &'a [(VmId, u32)],
}

impl<'a> Owners<'a> {
    pub fn len(&self) -> usize {
        self.first.is_some() as usize
            + self.group.map_or(0, |(g, gfn)| g.at(gfn).count())
            + self.more.len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The first owner recorded (of a page with one owner: the owner).
    pub fn first(&self) -> (VmId, Gfn) {
        self.iter()
            .next()
            .expect("memmap: a page in use has an owner")
    }
    pub fn iter(&self) -> impl Iterator<Item = (VmId, Gfn)> + 'a {
        let group = self
            .group
            .into_iter()
            .flat_map(|(g, gfn)| g.at(gfn).map(move |vm| (vm, gfn)));
        self.first
            .into_iter()
            .chain(group)
            .chain(self.more.iter().copied())
            .map(|(vm, gfn)| (vm, gfn as Gfn))
    }
    pub fn contains(&self, owner: &(VmId, Gfn)) -> bool {
        let (vm, gfn) = *owner;
        let in_group = self.group.is_some_and(|(g, at)| {
            at as Gfn == gfn && g.member(vm).is_some_and(|i| !g.members[i].has_left(at))
        });
        in_group || self.first.map(|(v, g)| (v, g as Gfn)) == Some(*owner) || {
            self.more.iter().any(|&(v, g)| (v, g as Gfn) == *owner)
        }
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
    /// The owners after the first (or after a clone group's members) of
    /// every page with more.
    more: HashMap<MachinePage, Vec<(VmId, u32)>, foldhash::fast::RandomState>,
    /// Clone groups by id (`None`: a free id).
    groups: Vec<Option<CloneGroup>>,
    in_use: usize,
    /// Pages with two owners or more, and the owners of those pages: kept
    /// as owners come and go, so sharing figures cost nothing to read
    /// (`verify` recounts them).
    shared_pages: u64,
    sharing_frames: u64,
}

impl Memmap {
    fn info(&self, page: MachinePage, slot: &Slot) -> PageInfo<'_> {
        let group = slot.group();
        let more = if slot.refcount > 1 || group.is_some() {
            self.more.get(&page).map_or(&[][..], Vec::as_slice)
        } else {
            &[]
        };
        let group = group.map(|id| {
            let g = self.groups[id as usize]
                .as_ref()
                .unwrap_or_else(|| panic!("memmap: {page} names clone group {id}, which is gone"));
            (g, slot.gfn)
        });
        PageInfo {
            refcount: slot.refcount,
            owners: Owners {
                first: group.is_none().then_some((slot.vm, slot.gfn)),
                group,
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

    /// The slots of `node` up to `index` at least, grown by a quarter at a
    /// time (pools hand out pages from the bottom up): every slot is
    /// written when it is made, so the slack is resident, and doubling left
    /// up to half of a 1 GiB guest's memmap unused (heaptrack: 10.5 MB for
    /// 262,144 pages).
    fn slots_to(&mut self, node: usize, index: usize) -> &mut Vec<Slot> {
        if self.nodes.len() <= node {
            self.nodes.resize_with(node + 1, Vec::new);
        }
        let slots = &mut self.nodes[node];
        if slots.len() <= index {
            let want = (index + 1).max(slots.len() + slots.len() / 4).max(1024);
            slots.reserve_exact(want - slots.len());
            slots.resize_with(want, Slot::default);
        }
        slots
    }

    /// Counts one owner more on a page that had `before`.
    fn count_added(&mut self, before: u32) {
        match before {
            1 => {
                self.shared_pages += 1;
                self.sharing_frames += 2;
            }
            n if n > 1 => self.sharing_frames += 1,
            _ => {}
        }
    }

    /// Records that `(vm, gfn)` maps `page`.
    pub fn add_owner(&mut self, page: MachinePage, vm: VmId, gfn: Gfn) {
        let short = u32::try_from(gfn)
            .unwrap_or_else(|_| panic!("memmap: guest frame {gfn:#x} beyond 32 bits"));
        assert!(vm < GROUP_TAG, "memmap: VM id {vm} is reserved");
        let slot = &mut self.slots_to(page.node(), page.index as usize)[page.index as usize];
        let before = slot.refcount;
        let fresh = !slot.in_use();
        slot.refcount += 1;
        let slot = *slot;
        self.in_use += fresh as usize;
        let rejoined = slot.group().is_some_and(|id| {
            slot.gfn == short
                && self.groups[id as usize]
                    .as_mut()
                    .is_some_and(|g| g.rejoin(vm, short))
        });
        if slot.vm == NO_VM {
            let s = &mut self.nodes[page.node()][page.index as usize];
            (s.vm, s.gfn) = (vm, short);
        } else if !rejoined {
            self.more.entry(page).or_default().push((vm, short));
        }
        self.count_added(before);
    }

    /// Removes `(vm, gfn)` from `page`'s owners. Returns `true` when that was
    /// the last owner (the caller must then free the page).
    pub fn remove_owner(&mut self, page: MachinePage, vm: VmId, gfn: Gfn) -> bool {
        fn no_owner(page: MachinePage, vm: VmId, gfn: Gfn) -> ! {
            panic!("memmap: ({vm}, {gfn:#x}) does not own {page}")
        }
        let slot = *self
            .nodes
            .get(page.node())
            .and_then(|n| n.get(page.index as usize))
            .filter(|slot| slot.vm != NO_VM)
            .unwrap_or_else(|| {
                panic!("memmap: {page} has no owners, cannot remove ({vm}, {gfn:#x})")
            });
        let Ok(short) = u32::try_from(gfn) else {
            no_owner(page, vm, gfn)
        };
        let owner = (vm, short);
        let mut head = (slot.vm, slot.gfn);
        let from_group = slot.group().is_some_and(|id| {
            slot.gfn == short
                && self.groups[id as usize]
                    .as_mut()
                    .is_some_and(|g| g.leave(vm, short))
        });
        if from_group {
        } else if slot.group().is_none() && head == owner {
            // The first owner leaves: the next one (if any) takes its place.
            head = self.take_more(page, None).unwrap_or((NO_VM, 0));
        } else if self.take_more(page, Some(owner)).is_none() {
            no_owner(page, vm, gfn);
        }
        let refcount = slot.refcount - 1;
        if let Some(id) = slot.group() {
            let more = self.more.get(&page).map_or(0, Vec::len);
            if refcount as usize == more {
                // No member maps it any more: the page drops the group.
                self.release_group_page(id, slot.gfn);
                head = self.take_more(page, None).unwrap_or((NO_VM, 0));
            }
        }
        match slot.refcount {
            2 => {
                self.shared_pages -= 1;
                self.sharing_frames -= 2;
            }
            n if n > 2 => self.sharing_frames -= 1,
            _ => {}
        }
        let s = &mut self.nodes[page.node()][page.index as usize];
        if refcount == 0 {
            *s = Slot::default();
            self.in_use -= 1;
            true
        } else {
            (s.refcount, s.vm, s.gfn) = (refcount, head.0, head.1);
            false
        }
    }

    /// Takes `owner` (`None`: the first) out of `page`'s further owners.
    fn take_more(&mut self, page: MachinePage, owner: Option<(VmId, u32)>) -> Option<(VmId, u32)> {
        let rest = self.more.get_mut(&page)?;
        let pos = match owner {
            Some(o) => rest.iter().position(|&x| x == o)?,
            None => 0,
        };
        let taken = rest.swap_remove(pos);
        if rest.is_empty() {
            self.more.remove(&page);
        }
        Some(taken)
    }

    /// A page of clone group `id` at `gfn` no longer names it: every
    /// member's bit for the frame is cleared, and the group goes with its
    /// last page.
    fn release_group_page(&mut self, id: GroupId, gfn: u32) {
        let slot = &mut self.groups[id as usize];
        let g = slot.as_mut().expect("a page's clone group exists");
        for m in &mut g.members {
            m.set_left(gfn, g.frames, false);
        }
        g.pages -= 1;
        if g.pages == 0 {
            *slot = None;
        }
    }

    /// A new clone group of `vms` (at least two, distinct) over a snapshot
    /// of `frames` frames; it has no page until [`Memmap::add_group_run`].
    /// A group left without a page is freed when its members are forgotten.
    pub fn new_group(&mut self, vms: &[VmId], frames: u64) -> GroupId {
        let mut members: Vec<Member> = vms
            .iter()
            .map(|&vm| {
                assert!(vm < GROUP_TAG, "memmap: VM id {vm} is reserved");
                Member {
                    vm,
                    left: Vec::new(),
                }
            })
            .collect();
        members.sort_unstable_by_key(|m| m.vm);
        assert!(
            members.len() >= 2 && members.windows(2).all(|w| w[0].vm != w[1].vm),
            "memmap: a clone group needs two distinct VMs or more"
        );
        let group = CloneGroup {
            members,
            frames: u32::try_from(frames).expect("memmap: frames beyond 32 bits"),
            pages: 0,
        };
        match self.groups.iter().position(Option::is_none) {
            Some(id) => {
                self.groups[id] = Some(group);
                id as GroupId
            }
            None => {
                self.groups.push(Some(group));
                let id = self.groups.len() - 1;
                assert!(
                    (id as VmId) < GROUP_TAG - 1,
                    "memmap: too many clone groups"
                );
                id as GroupId
            }
        }
    }

    /// Records that every member of `group` maps pages `page.index..+n` of
    /// `page.node` at frames `gfn..gfn+n`: one slot write per page, however
    /// many members. The pages must be free in the memmap.
    pub fn add_group_run(&mut self, group: GroupId, page: MachinePage, gfn: Gfn, n: u32) {
        let g = self.groups[group as usize]
            .as_mut()
            .expect("memmap: no such clone group");
        let end = gfn + n as Gfn;
        assert!(
            end <= g.frames as Gfn,
            "memmap: frames {gfn:#x}..{end:#x} outside the clone group's {}",
            g.frames
        );
        g.pages += n as u64;
        let members = g.members.len() as u32;
        let first = page.index as usize;
        let slots = self.slots_to(page.node(), first + n as usize - 1);
        for (k, slot) in slots[first..first + n as usize].iter_mut().enumerate() {
            assert!(
                !slot.in_use(),
                "memmap: n{}:{:#x} is in use already",
                page.node,
                first + k
            );
            *slot = Slot {
                refcount: members,
                vm: GROUP_TAG | group,
                gfn: (gfn + k as Gfn) as u32,
            };
        }
        self.in_use += n as usize;
        self.shared_pages += n as u64;
        self.sharing_frames += n as u64 * members as u64;
    }

    /// `vm` joins `group`, whose pages are the runs `(first page,
    /// length)` of `runs` (all of them): one refcount increment per page.
    pub fn join_group(&mut self, group: GroupId, vm: VmId, runs: &[(MachinePage, u32)]) {
        assert!(vm < GROUP_TAG, "memmap: VM id {vm} is reserved");
        let g = self.groups[group as usize]
            .as_mut()
            .expect("memmap: no such clone group");
        let at = match g.members.binary_search_by_key(&vm, |m| m.vm) {
            Ok(_) => panic!("memmap: vm {vm} is in clone group {group} already"),
            Err(at) => at,
        };
        g.members.insert(
            at,
            Member {
                vm,
                left: Vec::new(),
            },
        );
        let mut pages = 0u64;
        for &(page, n) in runs {
            let first = page.index as usize;
            for slot in &mut self.nodes[page.node()][first..first + n as usize] {
                assert_eq!(
                    slot.vm,
                    GROUP_TAG | group,
                    "memmap: a page outside clone group {group}"
                );
                slot.refcount += 1;
            }
            pages += n as u64;
        }
        assert_eq!(
            pages, g.pages,
            "memmap: vm {vm} joins some of the group's pages only"
        );
        self.sharing_frames += pages;
    }

    /// `vm` is gone (its space destroyed, every frame's ownership removed):
    /// it leaves its clone groups, and a group left without members goes.
    pub fn forget_vm(&mut self, vm: VmId) {
        for slot in &mut self.groups {
            let Some(g) = slot else { continue };
            if let Some(i) = g.member(vm) {
                g.members.remove(i);
                if g.members.is_empty() {
                    *slot = None;
                }
            }
        }
    }

    /// Clone groups and their members, for reports and tests.
    pub fn clone_groups(&self) -> (usize, usize) {
        let live = self.groups.iter().flatten();
        (live.clone().count(), live.map(|g| g.members.len()).sum())
    }

    /// Heap bytes of the clone groups (members and their bitmaps).
    pub fn clone_group_bytes(&self) -> usize {
        self.groups
            .iter()
            .flatten()
            .map(|g| {
                std::mem::size_of::<CloneGroup>()
                    + g.members.capacity() * std::mem::size_of::<Member>()
                    + g.members
                        .iter()
                        .map(|m| m.left.capacity() * 8)
                        .sum::<usize>()
            })
            .sum()
    }

    /// `verify`'s part for clone groups: each group's page count is the
    /// number of slots naming it, each such page has a member still at its
    /// frame (else it should have dropped the group), its members are
    /// ascending, distinct and alive (`live`), and a member's bits are set
    /// only at frames where the group has a page.
    pub fn verify_groups(&self, live: impl Fn(VmId) -> bool, errors: &mut Vec<String>) {
        let mut frames_of: Vec<Vec<u64>> = self
            .groups
            .iter()
            .map(|g| vec![0; g.as_ref().map_or(0, |g| (g.frames as usize).div_ceil(64))])
            .collect();
        let mut pages = vec![0u64; self.groups.len()];
        for (page, info) in self.iter() {
            let slot = self.nodes[page.node()][page.index as usize];
            let Some(id) = slot.group() else { continue };
            let Some(Some(g)) = self.groups.get(id as usize) else {
                errors.push(format!(
                    "{page} names clone group {id}, which does not exist"
                ));
                continue;
            };
            pages[id as usize] += 1;
            if slot.gfn >= g.frames {
                errors.push(format!(
                    "{page}: frame {:#x} outside clone group {id}'s {} frames",
                    slot.gfn, g.frames
                ));
                continue;
            }
            let bits = &mut frames_of[id as usize];
            if bits[slot.gfn as usize / 64] & (1 << (slot.gfn % 64)) != 0 {
                errors.push(format!(
                    "{page}: clone group {id} has two pages at frame {:#x}",
                    slot.gfn
                ));
            }
            bits[slot.gfn as usize / 64] |= 1 << (slot.gfn % 64);
            if g.at(slot.gfn).next().is_none() {
                errors.push(format!(
                    "{page} names clone group {id} but no member maps it ({:?} do)",
                    info.owners.to_vec()
                ));
            }
        }
        for (id, g) in self.groups.iter().enumerate() {
            let Some(g) = g else { continue };
            if g.pages != pages[id] {
                errors.push(format!(
                    "clone group {id} counts {} pages, {} slots name it",
                    g.pages, pages[id]
                ));
            }
            if g.members.is_empty() || !g.members.windows(2).all(|w| w[0].vm < w[1].vm) {
                errors.push(format!(
                    "clone group {id}: members not distinct and ascending"
                ));
            }
            for m in &g.members {
                if !live(m.vm) {
                    errors.push(format!("clone group {id}: member vm {} has no space", m.vm));
                }
                let stray = m
                    .left
                    .iter()
                    .zip(&frames_of[id])
                    .any(|(left, has)| left & !has != 0);
                if stray {
                    errors.push(format!(
                        "clone group {id}: vm {} has left frames where the group has no page",
                        m.vm
                    ));
                }
            }
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

    /// Three clones on pages 100..104 of node 0 at frames 10..14.
    fn clones() -> (Memmap, GroupId) {
        let mut memmap = Memmap::default();
        let g = memmap.new_group(&[7, 3, 5], 64);
        memmap.add_group_run(
            g,
            MachinePage {
                node: 0,
                index: 100,
            },
            10,
            4,
        );
        (memmap, g)
    }

    fn page(index: u32) -> MachinePage {
        MachinePage { node: 0, index }
    }

    #[test]
    fn a_clone_group_page_lists_every_member_at_its_frame() {
        let (memmap, _) = clones();
        assert_eq!(memmap.len(), 4);
        let info = memmap.get(page(102)).unwrap();
        assert_eq!((info.refcount, info.owners.len()), (3, 3));
        assert_eq!(info.owners.to_vec(), vec![(3, 12), (5, 12), (7, 12)]);
        assert_eq!(info.owners.first(), (3, 12));
        assert!(info.owners.contains(&(5, 12)));
        assert!(!info.owners.contains(&(5, 13)) && !info.owners.contains(&(4, 12)));
        assert_eq!(memmap.sharing(), (4, 12));
        assert!(memmap.more.is_empty(), "no per-(page, clone) record");
        assert_eq!(memmap.clone_groups(), (1, 3));
    }

    #[test]
    fn members_leave_and_rejoin_and_strangers_come_and_go() {
        let (mut memmap, _) = clones();
        // A copy-on-write break of clone 5 at frame 11.
        assert!(!memmap.remove_owner(page(101), 5, 11));
        let info = memmap.get(page(101)).unwrap();
        assert_eq!(info.owners.to_vec(), vec![(3, 11), (7, 11)]);
        assert_eq!(memmap.sharing(), (4, 11));
        // Another VM merged onto it, then 5 merged back.
        memmap.add_owner(page(101), 9, 40);
        memmap.add_owner(page(101), 5, 11);
        let info = memmap.get(page(101)).unwrap();
        assert_eq!(info.refcount, 4);
        assert_eq!(
            info.owners.to_vec(),
            vec![(3, 11), (5, 11), (7, 11), (9, 40)]
        );
        assert_eq!(memmap.sharing(), (4, 13));
        assert!(
            memmap.more[&page(101)] == [(9, 40)],
            "5 rejoined by its bit"
        );
        // A member leaving twice is refused.
        assert!(!memmap.remove_owner(page(101), 5, 11));
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            memmap.remove_owner(page(101), 5, 11)
        }));
        assert!(r.is_err(), "5 no longer owns it");
    }

    #[test]
    fn a_page_drops_its_group_when_the_last_member_leaves() {
        let (mut memmap, _) = clones();
        memmap.add_owner(page(100), 9, 40);
        for vm in [3, 5] {
            assert!(!memmap.remove_owner(page(100), vm, 10));
        }
        let left = |m: &Memmap| {
            let g = m.groups[0].as_ref().unwrap();
            g.members.iter().filter(|m| m.has_left(10)).count()
        };
        assert_eq!(left(&memmap), 2);
        assert!(!memmap.remove_owner(page(100), 7, 10));
        // The stranger is its only owner, in plain form; no bit is left.
        let info = memmap.get(page(100)).unwrap();
        assert_eq!((info.refcount, info.owners.to_vec()), (1, vec![(9, 40)]));
        assert_eq!(left(&memmap), 0);
        assert!(memmap.more.is_empty());
        assert_eq!(memmap.groups[0].as_ref().unwrap().pages, 3);
        assert_eq!(memmap.sharing(), (3, 9));
        assert!(memmap.remove_owner(page(100), 9, 40));
        // Every member leaves every page: the pages are freed one by one,
        // the group with the last.
        for index in 101..104 {
            for vm in [3, 5, 7] {
                let last = memmap.remove_owner(page(index), vm, index as Gfn - 90);
                assert_eq!(last, vm == 7);
            }
        }
        assert!(memmap.is_empty() && memmap.groups[0].is_none());
        assert_eq!(memmap.sharing(), (0, 0));
        let mut errors = Vec::new();
        memmap.verify_groups(|_| true, &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
    }

    #[test]
    fn a_removed_member_is_forgotten_and_verify_sees_stray_state() {
        let (mut memmap, g) = clones();
        for index in 100..104 {
            assert!(!memmap.remove_owner(page(index), 5, index as Gfn - 90));
        }
        memmap.forget_vm(5);
        assert_eq!(memmap.clone_groups(), (1, 2));
        let mut errors = Vec::new();
        memmap.verify_groups(|vm| vm != 5, &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        // A member whose space is gone, and a bit where the group has no
        // page, are reported.
        memmap.groups[g as usize].as_mut().unwrap().members[0].set_left(60, 64, true);
        memmap.verify_groups(|vm| vm != 3, &mut errors);
        assert_eq!(errors.len(), 2, "{errors:?}");
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
