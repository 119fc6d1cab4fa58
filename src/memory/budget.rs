//! A budget of kernel mappings (VMAs) per VM, held by the mapper.
//!
//! Every guest space is a row of kernel mappings: one per maximal run of
//! frames that map consecutive pages of one pool (the pmap counts them as
//! entries change: `Pmap::mappings`, checked against `/proc/self/maps` by
//! `verify`). A remap that puts a frame on a page that is not next to its
//! neighbours' pages splits a mapping. With a budget set
//! ([`Memory::set_frames_per_mapping`], the policy's `[sharing]
//! frames_per_mapping`), each VM may hold at most [`mapping_cap`] of them,
//! and every operation that can add mappings asks first:
//!
//! * **merges** (`merge_batch`): runs are remapped longest first while the
//!   VM stays within its cap; the rest are `Deferred`;
//! * **copy-on-write breaks** (`break_within_budget`): the copy goes to the
//!   page right after the left neighbour's (or right before the right
//!   neighbour's) when that page is free, which adds no mapping (usually the
//!   frame's own page from before the merge, punched then and free since);
//!   else to any page if the VM stays within its cap; else the break
//!   *unshares a unit*: every frame of the written frame's mapping within
//!   its aligned window of [`UNSHARE_UNIT`] frames gets a private copy in one
//!   contiguous pool run (next to a neighbour when free), so the mapping is
//!   replaced, not split. A unit that is a whole mapping adds nothing; one
//!   that is cut by the window's edges adds at most one mapping per edge,
//!   and a window's edge can be cut that way only once (the frames beyond it
//!   are private afterwards): [`overrun_reserve`] bounds what breaks can take
//!   a VM over its cap;
//! * **migrations** (`move_pages`): a piece of private frames moves only if
//!   the VM stays within its cap (a piece that moves a whole mapping always
//!   does); the rest stay, reported failed as deferred;
//! * **shared-page moves and replicas**: an owner whose VM would go over its
//!   cap stays on its page (correct, only less local);
//! * **compaction** ([`Memory::compact`]): a VM's frames whose pages lie
//!   scattered in a pool are copied into one contiguous pool run and every
//!   owner of those pages remapped onto it, when that saves mappings in all.
//!
//! So a VM holds at most `cap + overrun_reserve` mappings at any time, and
//! `vm.max_map_count` is raised to the sum of that over the VMs, plus the
//! worst an operation in flight adds ([`MAP_COUNT_IN_FLIGHT`]) and the
//! process's own margin ([`map_count_needed`]); without a budget (0 frames
//! per mapping) to one mapping per guest page, as before.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::ops::Range;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::mapper::{Inner, Memory, MAP_COUNT_MARGIN};
use super::pmap::{PageFlags, PmapEntry};
use super::{Gfn, MachinePage, NodeId, VmId};
use crate::PAGE_SIZE;

/// Every VM may hold at least this many mappings, however small.
pub const MIN_MAPPINGS: u64 = 16;
/// The most frames a copy-on-write break over budget unshares (2 MiB): the
/// written frame's mapping within the aligned window of this many frames.
pub const UNSHARE_UNIT: Gfn = 512;
/// Frames per window [`Memory::compact_window`] tries to make one mapping.
pub const COMPACT_WINDOW: Gfn = 64;
/// Mappings one mapper operation may hold beyond its end state while it
/// runs: an `mmap(MAP_FIXED)` inside a mapping splits it in three before
/// the userfaultfd registration lets the kernel join the pieces again, and
/// `move_pages` registers a detached run apart from its neighbours. One
/// operation runs at a time (the memory lock); 16 leaves room.
pub const MAP_COUNT_IN_FLIGHT: u64 = 16;

/// A VM's cap on mappings: one per `frames_per_mapping` guest frames, at
/// least [`MIN_MAPPINGS`]; `None` without a budget (0).
pub fn mapping_cap(frames: u64, frames_per_mapping: u64) -> Option<u64> {
    (frames_per_mapping > 0).then(|| (frames / frames_per_mapping).max(MIN_MAPPINGS))
}

/// What copy-on-write breaks may add beyond the cap (see the module docs):
/// two per window of [`UNSHARE_UNIT`] frames, and two more for a unit cut
/// by the edge of a range kept out of sharing.
pub fn overrun_reserve(frames: u64) -> u64 {
    2 * (frames.div_ceil(UNSHARE_UNIT) + 2)
}

/// The most mappings a space of `frames` frames can hold: its cap plus the
/// reserve with a budget, and two for each run armed for a page sample
/// (`mapper::MAX_ARMED_FRAMES`), one per frame without (never more than
/// that).
pub fn mapping_bound(frames: u64, frames_per_mapping: u64) -> u64 {
    let per_page = frames + 1;
    match mapping_cap(frames, frames_per_mapping) {
        Some(cap) => {
            (cap + overrun_reserve(frames) + 2 * super::mapper::MAX_ARMED_FRAMES).min(per_page)
        }
        None => per_page,
    }
}

/// The `vm.max_map_count` that guest spaces of these frame counts need:
/// each space's [`mapping_bound`], one operation in flight
/// ([`MAP_COUNT_IN_FLIGHT`]) and the process's own mappings
/// (`MAP_COUNT_MARGIN`: libraries, thread stacks, pool views).
pub fn map_count_needed(frames: impl IntoIterator<Item = u64>, frames_per_mapping: u64) -> u64 {
    frames
        .into_iter()
        .map(|f| mapping_bound(f, frames_per_mapping))
        .sum::<u64>()
        + MAP_COUNT_IN_FLIGHT
        + MAP_COUNT_MARGIN
}

/// What the budget did, for reports.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BudgetStats {
    /// The budget in force: one mapping per this many frames (0: none).
    pub frames_per_mapping: u64,
    /// Copy-on-write breaks whose copy went next to a neighbour's page, so
    /// no mapping was added.
    pub breaks_joined: u64,
    /// Breaks over budget that unshared their unit instead, and the frames
    /// those units held.
    pub unit_breaks: u64,
    pub unit_frames: u64,
    /// Breaks that took a VM over its cap anyway (into the reserve).
    pub overruns: u64,
    /// Merge runs left out because their VM had spent its cap.
    pub deferred_merge_runs: u64,
    /// Frames whose migration was left out because their VM had spent its
    /// cap.
    pub deferred_moves: u64,
    /// Owners left on their page by a shared-page move or a replica for
    /// the same reason.
    pub deferred_remaps: u64,
    /// Compactions done, the frames they moved, and the mappings they saved
    /// over all VMs.
    pub compactions: u64,
    pub compacted_frames: u64,
    pub compaction_saved: u64,
}

/// The mapper's budget state.
#[derive(Debug, Default)]
pub(crate) struct Budget {
    pub(crate) frames_per_mapping: u64,
    pub(crate) stats: BudgetStats,
}

/// A page no frame's neighbour can be next to: for planning a copy whose
/// target is not known yet.
fn far_page() -> Option<PmapEntry> {
    Some(PmapEntry {
        page: MachinePage {
            node: u16::MAX,
            index: u32::MAX / 2,
        },
        flags: PageFlags::default(),
    })
}

fn page_at(start: MachinePage, i: u64) -> MachinePage {
    MachinePage {
        node: start.node,
        index: start.index + i as u32,
    }
}

impl Memory {
    /// Sets the budget of kernel mappings: each VM holds at most one per
    /// `frames_per_mapping` guest frames ([`mapping_cap`]; 0: no budget),
    /// and makes sure `vm.max_map_count` covers the spaces that exist under
    /// it (a change to no budget may need a raise).
    pub fn set_frames_per_mapping(&self, frames_per_mapping: u64) -> Result<()> {
        let mut inner = self.inner.lock();
        inner.budget.frames_per_mapping = frames_per_mapping;
        inner.budget.stats.frames_per_mapping = frames_per_mapping;
        let needed = inner.map_count_for(&[]);
        crate::leftovers::ensure_map_count(needed, &mut inner.map_count)
    }

    /// The budget in force (0: none).
    pub fn frames_per_mapping(&self) -> u64 {
        self.inner.lock().budget.frames_per_mapping
    }

    /// VM `vm`'s kernel mappings now (from its pmap, which `verify` checks
    /// against the kernel's) and its cap (`None` without a budget).
    pub fn space_mappings(&self, vm: VmId) -> Result<(u64, Option<u64>)> {
        let inner = self.inner.lock();
        let space = inner.space(vm)?;
        Ok((
            space.pmap.mappings(),
            mapping_cap(space.frames(), inner.budget.frames_per_mapping),
        ))
    }

    /// Every space's kernel mappings now (see [`Memory::space_mappings`]).
    pub fn mappings_by_space(&self) -> BTreeMap<VmId, u64> {
        let inner = self.inner.lock();
        inner
            .spaces
            .iter()
            .map(|(&vm, s)| (vm, s.pmap.mappings()))
            .collect()
    }

    pub fn budget_stats(&self) -> BudgetStats {
        self.inner.lock().budget.stats.clone()
    }

    /// Copies the pages of `vm`'s frames `range` into one contiguous pool
    /// run and remaps every owner of those pages onto it (each VM paused, as
    /// a merge pauses, so a shared page's new mapping is never writable),
    /// if that saves mappings: in `vm` and in all VMs together, with no
    /// other VM going over its cap. Every frame must be mapped, mergeable,
    /// not released, not a replica, on one node, each page once. Returns
    /// the mappings saved, `None` when nothing was done.
    pub fn compact(&self, vm: VmId, range: Range<Gfn>) -> Result<Option<u64>> {
        self.inner.lock().compact(vm, range)
    }

    /// [`Memory::compact`] on each aligned window of [`COMPACT_WINDOW`]
    /// frames in `range` that holds three mappings or more, on the stretch of
    /// it whose frames qualify. Returns the mappings saved.
    pub fn compact_window(&self, vm: VmId, range: Range<Gfn>) -> Result<u64> {
        let mut saved = 0;
        let mut w = range.start / COMPACT_WINDOW * COMPACT_WINDOW;
        while w < range.end {
            let end = (w + COMPACT_WINDOW).min(range.end);
            let mut inner = self.inner.lock();
            if let Some(stretch) = inner.compactable_stretch(vm, w.max(range.start)..end)? {
                saved += inner.compact(vm, stretch)?.unwrap_or(0);
            }
            drop(inner);
            w += COMPACT_WINDOW;
        }
        Ok(saved)
    }
}

impl Inner {
    /// What `vm.max_map_count` must be for the spaces that exist and new
    /// ones of `extra` frames each (see [`map_count_needed`]).
    pub(super) fn map_count_for(&self, extra: &[u64]) -> u64 {
        let frames = self.spaces.values().map(|s| s.frames());
        map_count_needed(
            frames.chain(extra.iter().copied()),
            self.budget.frames_per_mapping,
        )
    }

    fn cap_of(&self, vm: VmId) -> Option<u64> {
        let space = self.spaces.get(&vm)?;
        mapping_cap(space.frames(), self.budget.frames_per_mapping)
    }

    /// Whether setting `changes` (sorted by frame) in `vm`'s pmap keeps the
    /// VM within its cap, or adds no mapping.
    pub(super) fn fits_budget(&self, vm: VmId, changes: &[(Gfn, Option<PmapEntry>)]) -> bool {
        let (Some(cap), Some(space)) = (self.cap_of(vm), self.spaces.get(&vm)) else {
            return true;
        };
        let delta = space.pmap.mappings_delta(changes);
        delta <= 0 || space.pmap.mappings() as i64 + delta <= cap as i64
    }

    /// Whether mapping `vm`'s frame `gfn` onto `page` keeps the VM within
    /// its cap; counts a deferred remap when it does not.
    pub(super) fn remap_fits(&mut self, vm: VmId, gfn: Gfn, page: MachinePage) -> bool {
        let entry = Some(PmapEntry {
            page,
            flags: PageFlags::default(),
        });
        let fits = self.fits_budget(vm, &[(gfn, entry)]);
        if !fits {
            self.budget.stats.deferred_remaps += 1;
        }
        fits
    }

    /// Whether moving `vm`'s frames `first..first+len` onto consecutive
    /// pages from `start` keeps the VM within its cap; counts the frames as
    /// deferred when it does not.
    pub(super) fn move_fits(&mut self, vm: VmId, first: Gfn, len: u64, start: MachinePage) -> bool {
        let changes: Vec<(Gfn, Option<PmapEntry>)> = (0..len)
            .map(|i| {
                let page = page_at(start, i);
                (
                    first + i,
                    Some(PmapEntry {
                        page,
                        flags: PageFlags::default(),
                    }),
                )
            })
            .collect();
        let fits = self.fits_budget(vm, &changes);
        if !fits {
            self.budget.stats.deferred_moves += len;
        }
        fits
    }

    /// [`Inner::move_fits`] for a run whose target is not known yet (as
    /// if its pages were next to no neighbour's): asked before the run is
    /// taken from the guest.
    pub(super) fn move_fits_anywhere(&mut self, vm: VmId, first: Gfn, len: u64) -> bool {
        let far = far_page().expect("a page").page;
        self.move_fits(vm, first, len, far)
    }

    /// Whether remapping a merge run of `vm` (frames from `first` onto `len`
    /// consecutive pages from `page`) keeps the VM within its cap; counts a
    /// deferred run when it does not.
    pub(super) fn merge_run_fits(
        &mut self,
        vm: VmId,
        first: Gfn,
        page: MachinePage,
        len: usize,
    ) -> bool {
        let flags = PageFlags {
            shared: true,
            write_protected: true,
            released: false,
        };
        let changes: Vec<(Gfn, Option<PmapEntry>)> = (0..len as u64)
            .map(|i| {
                (
                    first + i,
                    Some(PmapEntry {
                        page: page_at(page, i),
                        flags,
                    }),
                )
            })
            .collect();
        let fits = self.fits_budget(vm, &changes);
        if !fits {
            self.budget.stats.deferred_merge_runs += 1;
        }
        fits
    }

    /// Takes pool pages for `vm`'s frames `range` right after the page of
    /// the frame before it, or right before the page of the frame after it,
    /// when those are free: a copy there joins that neighbour's mapping.
    fn take_near(&mut self, vm: VmId, range: &Range<Gfn>) -> Option<MachinePage> {
        let len = (range.end - range.start) as u32;
        let space = self.spaces.get(&vm)?;
        let left = range
            .start
            .checked_sub(1)
            .and_then(|g| space.pmap.get(g))
            .and_then(|e| e.page.index.checked_add(1).map(|i| (e.page.node, i)));
        let right = space
            .pmap
            .get(range.end)
            .filter(|_| range.end < space.frames())
            .and_then(|e| e.page.index.checked_sub(len).map(|i| (e.page.node, i)));
        for (node, index) in [left, right].into_iter().flatten() {
            if self.pools[node as usize].take_exact_for_copy(index, len) {
                return Some(MachinePage { node, index });
            }
        }
        None
    }

    /// Takes `len` consecutive pool pages for a copy, on `node` if it has
    /// them, else on any node that does.
    fn take_run(&mut self, node: NodeId, len: u64) -> Option<MachinePage> {
        let nodes = std::iter::once(node).chain((0..self.pools.len()).filter(|&n| n != node));
        for n in nodes {
            if (self.pools[n].available() as u64) < len {
                continue;
            }
            let Ok((start, got, _)) = self.pools[n].alloc_run_for_copy(len as u32) else {
                continue;
            };
            if got as u64 == len {
                return Some(MachinePage {
                    node: n as u16,
                    index: start,
                });
            }
            let mut back: Vec<u32> = (start..start + got).collect();
            if let Err(e) = self.pools[n].free_many(&mut back) {
                tracing::warn!("giving back a short run: {e:#}");
            }
        }
        None
    }

    fn give_back(&mut self, start: MachinePage, len: u64) -> Result<()> {
        let mut pages: Vec<u32> = (start.index..start.index + len as u32).collect();
        self.pools[start.node()].free_many(&mut pages)
    }

    /// Gives `vm`'s frames `range` (all mapped) private copies of their
    /// pages in the pool run from `target` (taken already; given back on
    /// failure): one copy per run of source pages, one `mmap`. Shared
    /// frames leave their pages to the other owners; private frames' old
    /// pages are freed (kept warm). Private frames are write-protected
    /// while their pages are copied, so a guest write waits in the fault
    /// handler (which needs the lock held here) and lands in the copy.
    /// Returns the copies of shared pages made (new pages in use: a
    /// private frame's old page is freed).
    fn relocate_own(&mut self, vm: VmId, range: Range<Gfn>, target: MachinePage) -> Result<u64> {
        let len = range.end - range.start;
        let space = self.space(vm)?;
        let mut olds = Vec::with_capacity(len as usize);
        for gfn in range.clone() {
            match space.pmap.get(gfn) {
                Some(e) => olds.push(e),
                None => {
                    self.give_back(target, len)?;
                    anyhow::bail!("frame {gfn:#x} of vm {vm} is not mapped");
                }
            }
        }
        let addr = space.addr(range.start);
        let first_gfn = range.start;
        let writable: Vec<Gfn> = range
            .clone()
            .zip(&olds)
            .filter(|(_, e)| !e.flags.write_protected)
            .map(|(g, _)| g)
            .collect();
        let uffd = self.uffd.clone();
        let hold = |on: bool| -> Result<()> {
            if let Some(u) = &uffd {
                let offsets: Vec<Gfn> = writable.iter().map(|g| g - first_gfn).collect();
                protect_runs(u, addr, &offsets, on)
                    .context("holding writers of frames being copied")?;
            }
            Ok(())
        };
        if let Err(e) = hold(true) {
            self.give_back(target, len)?;
            return Err(e);
        }
        let pages: Vec<MachinePage> = olds.iter().map(|e| e.page).collect();
        let copied = self
            .copy_to_run(&pages, target.node(), target.index, false)
            .and_then(|()| self.map_run(addr, target.node(), target.index, len as usize, true));
        if let Err(e) = copied {
            hold(false)?;
            self.give_back(target, len)?;
            return Err(e);
        }
        let copies = olds
            .iter()
            .filter(|e| self.memmap.get(e.page).is_some_and(|i| i.owners.len() > 1))
            .count() as u64;
        let mut dropped = Vec::with_capacity(len as usize);
        for (i, (gfn, old)) in range.zip(&olds).enumerate() {
            let page = page_at(target, i as u64);
            self.space_mut(vm)?.pmap.set(
                gfn,
                Some(PmapEntry {
                    page,
                    flags: PageFlags::default(),
                }),
            );
            self.memmap.add_owner(page, vm, gfn);
            dropped.push((old.page, vm, gfn));
        }
        dropped.sort_unstable();
        self.drop_owners(&dropped, true)?;
        Ok(copies)
    }

    /// A copy-on-write break of `vm`'s shared frame `gfn` within the VM's
    /// budget (see the module docs): next to a neighbour's page, else any
    /// page of `home` if the cap allows, else the unit unshared. Returns
    /// the copies of shared pages made (one, or a unit's shared frames).
    pub(super) fn break_within_budget(&mut self, vm: VmId, gfn: Gfn, home: NodeId) -> Result<u64> {
        let single = gfn..gfn + 1;
        if self.budget.frames_per_mapping > 0 {
            if let Some(target) = self.take_near(vm, &single) {
                let copies = self.relocate_own(vm, single, target)?;
                self.budget.stats.breaks_joined += 1;
                return Ok(copies);
            }
        }
        if self.fits_budget(vm, &[(gfn, far_page())]) {
            self.replace_with_copy(vm, gfn, home)?;
            return Ok(1);
        }
        let unit = self.unshare_unit(vm, gfn)?;
        let len = unit.end - unit.start;
        let Some(target) = self
            .take_near(vm, &unit)
            .or_else(|| self.take_run(home, len))
        else {
            // No run that long anywhere: the single copy, over the cap.
            self.budget.stats.overruns += 1;
            self.replace_with_copy(vm, gfn, home)?;
            return Ok(1);
        };
        let changes: Vec<(Gfn, Option<PmapEntry>)> = unit
            .clone()
            .map(|g| {
                let page = page_at(target, g - unit.start);
                (
                    g,
                    Some(PmapEntry {
                        page,
                        flags: PageFlags::default(),
                    }),
                )
            })
            .collect();
        if !self.fits_budget(vm, &changes) {
            self.budget.stats.overruns += 1;
        }
        let copies = self.relocate_own(vm, unit, target)?;
        self.budget.stats.unit_breaks += 1;
        self.budget.stats.unit_frames += len;
        Ok(copies)
    }

    /// The frames a break of `gfn` over budget unshares: its mapping,
    /// within its aligned window of [`UNSHARE_UNIT`] frames and the
    /// mergeable frames around it (the frames kept out of sharing, such as
    /// a micro-guest's page tables, are never moved under a running guest).
    fn unshare_unit(&self, vm: VmId, gfn: Gfn) -> Result<Range<Gfn>> {
        let space = self.space(vm)?;
        let mut lo = gfn / UNSHARE_UNIT * UNSHARE_UNIT;
        let mut hi = (lo + UNSHARE_UNIT).min(space.frames());
        for r in &space.unmergeable {
            if r.end <= gfn {
                lo = lo.max(r.end);
            } else if r.start > gfn {
                hi = hi.min(r.start);
            }
        }
        Ok(space.pmap.mapping_around(gfn, lo..hi))
    }

    /// Within `range` of `vm`, the longest stretch of frames `compact` would
    /// take, if it holds three mappings or more.
    fn compactable_stretch(&self, vm: VmId, range: Range<Gfn>) -> Result<Option<Range<Gfn>>> {
        let space = self.space(vm)?;
        let ok = |g: Gfn| {
            space.mergeable(g)
                && space
                    .pmap
                    .get(g)
                    .is_some_and(|e| !e.flags.released && !self.replicas.contains(e.page))
        };
        let mut best: Option<Range<Gfn>> = None;
        let mut g = range.start;
        while g < range.end {
            if !ok(g) {
                g += 1;
                continue;
            }
            let start = g;
            while g < range.end && ok(g) {
                g += 1;
            }
            if best.as_ref().is_none_or(|b| g - start > b.end - b.start) {
                best = Some(start..g);
            }
        }
        let Some(best) = best else { return Ok(None) };
        let splits = (best.start + 1..best.end)
            .filter(|&g| {
                let (a, b) = (space.pmap.get(g - 1), space.pmap.get(g));
                !matches!((a, b), (Some(a), Some(b)) if a.page.node == b.page.node && a.page.index + 1 == b.page.index)
            })
            .count();
        Ok((splits >= 2).then_some(best))
    }

    /// [`Memory::compact`] under the lock.
    pub(super) fn compact(&mut self, vm: VmId, range: Range<Gfn>) -> Result<Option<u64>> {
        let len = range.end.saturating_sub(range.start);
        let space = self.space(vm)?;
        ensure_frames(range.end <= space.frames(), vm, &range)?;
        if len < 2 {
            return Ok(None);
        }
        let mut pages = Vec::with_capacity(len as usize);
        for gfn in range.clone() {
            let Some(e) = space.pmap.get(gfn) else {
                return Ok(None);
            };
            if !space.mergeable(gfn) || e.flags.released || self.replicas.contains(e.page) {
                return Ok(None);
            }
            pages.push(e.page);
        }
        let node = pages[0].node();
        let distinct: HashSet<MachinePage> = pages.iter().copied().collect();
        if distinct.len() != pages.len() || pages.iter().any(|p| p.node() != node) {
            return Ok(None);
        }
        let owners: Vec<Vec<(VmId, Gfn)>> = pages
            .iter()
            .map(|&p| {
                self.memmap
                    .get(p)
                    .map(|i| i.owners.to_vec())
                    .unwrap_or_default()
            })
            .collect();
        let Some(target) = self.take_near(vm, &range).or_else(|| {
            // Only on the pages' node: compaction does not migrate.
            let got = self.take_run(node, len)?;
            Some(got)
        }) else {
            return Ok(None);
        };
        if target.node() != node {
            self.give_back(target, len)?;
            return Ok(None);
        }
        // Every owner's frames onto the new run: what that does to each VM.
        let mut changes: BTreeMap<VmId, Vec<(Gfn, Option<PmapEntry>)>> = BTreeMap::new();
        for (i, list) in owners.iter().enumerate() {
            let shared = list.len() > 1;
            let flags = PageFlags {
                shared,
                write_protected: shared,
                released: false,
            };
            for &(v, g) in list {
                let page = page_at(target, i as u64);
                changes
                    .entry(v)
                    .or_default()
                    .push((g, Some(PmapEntry { page, flags })));
            }
        }
        let mut total = 0i64;
        let mut mine = 0i64;
        let mut fits = true;
        for (v, list) in changes.iter_mut() {
            list.sort_unstable_by_key(|c| c.0);
            let delta = self.space(*v)?.pmap.mappings_delta(list);
            total += delta;
            if *v == vm {
                mine = delta;
            }
            fits &= self.fits_budget(*v, list);
        }
        if mine >= 0 || total >= 0 || !fits {
            self.give_back(target, len)?;
            return Ok(None);
        }
        // Pause every VM whose shared frames are remapped (the new mapping
        // of a shared page is writable until protected).
        let pause: BTreeSet<VmId> = owners
            .iter()
            .filter(|l| l.len() > 1)
            .flat_map(|l| l.iter().map(|&(v, _)| v))
            .collect();
        let mut paused: Vec<(VmId, std::sync::Arc<dyn super::GuestPause>)> = Vec::new();
        let started = std::time::Instant::now();
        for &v in &pause {
            if let Some(p) = self.pausers.get(&v).cloned() {
                if !p.pause() {
                    self.count_pause(v, started, false);
                    for (v, p) in paused {
                        p.resume();
                        self.count_pause(v, started, true);
                    }
                    self.give_back(target, len)?;
                    return Ok(None);
                }
                paused.push((v, p));
            }
        }
        let done = self.compact_paused(vm, &range, &pages, &owners, target);
        for (v, p) in paused {
            p.resume();
            self.count_pause(v, started, true);
        }
        done?;
        let saved = (-total) as u64;
        self.budget.stats.compactions += 1;
        self.budget.stats.compacted_frames += len;
        self.budget.stats.compaction_saved += saved;
        Ok(Some(saved))
    }

    /// The remaps of a compaction, every VM concerned paused.
    fn compact_paused(
        &mut self,
        vm: VmId,
        range: &Range<Gfn>,
        pages: &[MachinePage],
        owners: &[Vec<(VmId, Gfn)>],
        target: MachinePage,
    ) -> Result<()> {
        let len = range.end - range.start;
        let addr = self.space(vm)?.addr(range.start);
        let uffd = self.require_uffd()?.clone();
        // Writers of the private frames wait while their pages are copied
        // (shared frames are write-protected already).
        let private: Vec<Gfn> = (0..len)
            .filter(|&i| owners[i as usize].len() == 1)
            .collect();
        let shared: Vec<Gfn> = (0..len).filter(|&i| owners[i as usize].len() > 1).collect();
        protect_runs(&uffd, addr, &private, true)
            .context("holding writers of frames being compacted")?;
        let copied = self
            .copy_to_run(pages, target.node(), target.index, false)
            .and_then(|()| self.map_run(addr, target.node(), target.index, len as usize, true));
        if let Err(e) = copied {
            protect_runs(&uffd, addr, &private, false)?;
            self.give_back(target, len)?;
            return Err(e);
        }
        protect_runs(&uffd, addr, &shared, true)
            .context("write-protecting compacted shared frames")?;
        let mut olds = Vec::new();
        for (i, list) in owners.iter().enumerate() {
            let page = page_at(target, i as u64);
            let shared = list.len() > 1;
            let gfn = range.start + i as Gfn;
            let flags = PageFlags {
                shared,
                write_protected: shared,
                released: false,
            };
            self.space_mut(vm)?
                .pmap
                .set(gfn, Some(PmapEntry { page, flags }));
            self.memmap.add_owner(page, vm, gfn);
            olds.push((pages[i], vm, gfn));
            for &(v, g) in list.iter().filter(|&&o| o != (vm, gfn)) {
                self.map_onto(v, g, page)?;
                olds.push((pages[i], v, g));
            }
        }
        olds.sort_unstable();
        self.drop_owners(&olds, false)
    }
}

/// Sets or lifts userfaultfd write-protection on the frames at `offsets`
/// (sorted) from the host address `addr`, one call per run.
fn protect_runs(
    uffd: &crate::faults::uffd::Userfault,
    addr: usize,
    offsets: &[Gfn],
    on: bool,
) -> std::io::Result<()> {
    for (first, n) in super::runs::runs_of(offsets) {
        uffd.write_protect(
            addr + first as usize * PAGE_SIZE,
            n as usize * PAGE_SIZE,
            on,
        )?;
    }
    Ok(())
}

fn ensure_frames(ok: bool, vm: VmId, range: &Range<Gfn>) -> Result<()> {
    anyhow::ensure!(ok, "frames {range:?} are outside vm {vm}");
    Ok(())
}
