//! Copy-on-write sharing, the mapper's side: merge two frames with
//! identical content onto one machine page, and break the sharing when a
//! guest writes. Which frames to merge is the scanner's business
//! (`crate::sharing`); this module only makes it safe.
//!
//! Merging (`Memory::merge`) follows the order that makes a racing write
//! harmless: write-protect both frames first, then compare their bytes, then
//! remap the duplicate onto the kept page and free the duplicate. A guest
//! write that lands before the protection changes the bytes, so the compare
//! fails and nothing is merged; a write after it faults, and its vCPU waits
//! in the kernel until the fault handler (which needs the memory lock the
//! merge holds) gives the writer a private copy. No write is ever lost.
//!
//! Breaking (`Memory::resolve_write_fault`): the handler copies the shared
//! page into a fresh page of the writer's home node, maps the copy writable
//! for that frame only, updates pmap and memmap, and wakes the vCPU, whose
//! write then lands in the copy. When a page is down to one owner, that
//! owner becomes private again (unprotected).

use std::time::Instant;

use anyhow::{bail, Result};
use serde::Serialize;

use super::mapper::Memory;
use super::{Gfn, MachinePage, VmId};
use crate::PAGE_SIZE;

/// Counters the mapper keeps about copy-on-write.
#[derive(Debug, Default)]
pub(crate) struct CowCounters {
    merges: u64,
    compare_failures: u64,
    breaks: u64,
    /// Handler time of each break, in nanoseconds.
    break_ns: Vec<u64>,
    /// What copy-on-write and remaps cost each VM (see `GuestCosts`).
    pub(super) per_vm: std::collections::BTreeMap<VmId, GuestCosts>,
}

/// The time the mapper's interventions cost one VM's guest, as the mapper
/// sees it: copy-on-write breaks (handler time, while the writing vCPU
/// waits) and pauses for remaps (every vCPU waits).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct GuestCosts {
    pub cow_breaks: u64,
    /// Handler time of those breaks, in milliseconds.
    pub cow_break_ms: f64,
    /// Pauses of the VM for a remap (merges, replica and shared-page moves).
    pub pauses: u64,
    /// Time the VM spent paused in them, in milliseconds (pauses that timed
    /// out included: their parked vCPUs waited too).
    pub paused_ms: f64,
    /// Pauses withdrawn because a vCPU did not stop within the limit (the
    /// remap was not done).
    pub pause_timeouts: u64,
}

/// How a merge attempt ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MergeOutcome {
    /// The duplicate now maps the kept page; its own page was freed.
    Merged,
    /// The bytes differ (or changed under the protection); nothing merged.
    Differ,
    /// A frame no longer maps the page the caller saw, the two already share
    /// a page, or they are in different sharing domains; nothing done.
    Stale,
}

/// What the scanner learns about one frame.
#[derive(Clone, Copy, Debug)]
pub struct PageScan {
    pub page: MachinePage,
    /// The content hash; 0 for a hole.
    pub hash: u64,
    /// All-zero bytes (a hole is not read, and not `zero`).
    pub zero: bool,
    pub shared: bool,
    /// The page holds no data (never written since it was handed out): not
    /// read, since reading would allocate it; not worth merging, since it
    /// costs the host nothing.
    pub hole: bool,
}

/// What a write fault turned into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultOutcome {
    /// The writer got a private copy.
    Copied,
    /// The page had a single owner left: protection lifted in place.
    Unprotected,
    /// The frame was no longer protected (already resolved); just woken.
    AlreadyResolved,
    /// The address is not guest RAM of a live space; just woken.
    NotGuestMemory,
}

/// Sharing figures for reports.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SharingStats {
    /// Machine pages with more than one owner.
    pub shared_machine_pages: u64,
    /// Guest frames backed by those pages.
    pub sharing_frames: u64,
    /// Machine pages saved by sharing: frames minus machine pages.
    pub saved_pages: u64,
    pub saved_bytes: u64,
    pub merges: u64,
    pub compare_failures: u64,
    pub cow_breaks: u64,
    pub cow_break_median_us: f64,
    pub cow_break_p99_us: f64,
}

fn percentile_us(sorted_ns: &[u64], p: f64) -> f64 {
    if sorted_ns.is_empty() {
        return 0.0;
    }
    let i = ((sorted_ns.len() - 1) as f64 * p).round() as usize;
    sorted_ns[i] as f64 / 1000.0
}

/// xxh3 of a page; see ARCHITECTURE.md for why xxh3.
pub fn page_hash(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}

fn zero_page_hash() -> u64 {
    static HASH: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *HASH.get_or_init(|| page_hash(&[0u8; PAGE_SIZE]))
}

impl Memory {
    /// Hashes one frame's page (through the monitor's pool view, so the
    /// guest's mapping is not touched). `None` when the frame is unmapped
    /// or excluded from sharing.
    pub fn scan_page(&self, vm: VmId, gfn: Gfn) -> Result<Option<PageScan>> {
        let (entry, ptr) = {
            let inner = self.inner.lock();
            let space = inner.space(vm)?;
            let Some(entry) = space.pmap.get(gfn).filter(|_| space.mergeable(gfn)) else {
                return Ok(None);
            };
            let pool = &inner.pools[entry.page.node()];
            let ptr = pool.page_ptr(entry.page.index) as *const u8;
            (entry, ptr)
        };
        // The residency test and the hash run without the memory lock: the
        // scanner runs below the vCPUs' priority (see `sharing`), and a
        // fault handler must not wait for a descheduled scanner. The page may
        // be remapped or freed meanwhile; the hash is only a hint (a merge
        // compares the bytes again, under protection and the lock), and the
        // pool views stay mapped for the life of `Memory`.
        if !entry.flags.shared && !super::pool::view_page_resident(ptr) {
            return Ok(Some(PageScan {
                page: entry.page,
                hash: 0,
                zero: false,
                shared: false,
                hole: true,
            }));
        }
        // SAFETY: an in-bounds page of a pool view, mapped as long as
        // `self` lives; guests may write it concurrently, which only makes
        // the hash a stale hint.
        let bytes = unsafe { std::slice::from_raw_parts(ptr, PAGE_SIZE) };
        let hash = page_hash(bytes);
        // Only a page hashing like the zero page can be one (then check).
        let zero = hash == zero_page_hash() && bytes.iter().all(|&b| b == 0);
        Ok(Some(PageScan {
            page: entry.page,
            hash,
            zero,
            shared: entry.flags.shared,
            hole: false,
        }))
    }

    /// Merges frame `dup` onto the page of frame `keep`, if both still map
    /// the pages the caller saw and their bytes are equal under write
    /// protection. See the module comment for why the order is safe.
    pub fn merge(
        &self,
        dup: (VmId, Gfn, MachinePage),
        keep: (VmId, Gfn, MachinePage),
    ) -> Result<MergeOutcome> {
        // The duplicate's VM is paused for the remap (see `GuestPause`), and
        // paused *before* the memory lock is taken: a vCPU can take seconds
        // to stop (seen on this host's emulated guest kernel mode: a Linux
        // guest's `rep stosb` ran 2 s past every kick), and waiting for it
        // with the lock held stalled every fault of every VM meanwhile.
        let pauser = self.inner.lock().pausers.get(&dup.0).cloned();
        let started = std::time::Instant::now();
        if let Some(p) = &pauser {
            if !p.pause() {
                self.inner.lock().count_pause(dup.0, started, false);
                return Ok(MergeOutcome::Stale);
            }
        }
        let outcome = self.merge_paused(dup, keep);
        if let Some(p) = &pauser {
            p.resume();
            self.inner.lock().count_pause(dup.0, started, true);
        }
        outcome
    }

    /// [`Memory::merge`] once the duplicate's VM is paused.
    fn merge_paused(
        &self,
        (dup_vm, dup_gfn, dup_page): (VmId, Gfn, MachinePage),
        (keep_vm, keep_gfn, keep_page): (VmId, Gfn, MachinePage),
    ) -> Result<MergeOutcome> {
        let mut inner = self.inner.lock();
        let dup = inner.space(dup_vm)?.pmap.get(dup_gfn);
        let keep = inner.space(keep_vm)?.pmap.get(keep_gfn);
        let (Some(dup), Some(keep)) = (dup, keep) else {
            return Ok(MergeOutcome::Stale);
        };
        let (dup_space, keep_space) = (inner.space(dup_vm)?, inner.space(keep_vm)?);
        if dup.page != dup_page
            || keep.page != keep_page
            || dup_page == keep_page
            // A replica is placed on purpose: never merged away.
            || inner.replicas.contains(dup_page)
            || dup_space.domain != keep_space.domain
            || !dup_space.mergeable(dup_gfn)
            || !keep_space.mergeable(keep_gfn)
        {
            return Ok(MergeOutcome::Stale);
        }
        inner.require_uffd()?;
        // 1. protect both
        let was_protected = [dup.flags.write_protected, keep.flags.write_protected];
        inner.protect_frame(dup_vm, dup_gfn)?;
        inner.protect_frame(keep_vm, keep_gfn)?;
        // 2. compare
        let a = inner.pools[dup_page.node()].page_ptr(dup_page.index);
        let b = inner.pools[keep_page.node()].page_ptr(keep_page.index);
        // SAFETY: in-bounds pages of pool views, now write-protected in every
        // guest mapping, so the bytes are stable while we hold the lock.
        let equal = unsafe {
            std::slice::from_raw_parts(a as *const u8, PAGE_SIZE)
                == std::slice::from_raw_parts(b as *const u8, PAGE_SIZE)
        };
        if !equal {
            for ((vm, gfn), was) in [(dup_vm, dup_gfn), (keep_vm, keep_gfn)]
                .into_iter()
                .zip(was_protected)
            {
                if !was {
                    inner.unprotect_frame(vm, gfn)?;
                }
            }
            inner.cow.compare_failures += 1;
            return Ok(MergeOutcome::Differ);
        }
        // 3. remap the duplicate (its VM is paused: the new mapping is
        // writable until it is protected, see `GuestPause`), 4. drop (and
        // so free) its old page.
        inner.map_onto(dup_vm, dup_gfn, keep_page)?;
        inner.drop_owner(dup_page, dup_vm, dup_gfn)?;
        inner.cow.merges += 1;
        Ok(MergeOutcome::Merged)
    }

    /// Handles a userfaultfd write-protect fault at host address `addr`:
    /// gives the writer a private copy (or lifts a stale protection), then
    /// wakes the waiting thread.
    pub fn resolve_write_fault(&self, addr: usize) -> Result<FaultOutcome> {
        let started = Instant::now();
        let page_addr = addr & !(PAGE_SIZE - 1);
        let outcome = {
            let mut inner = self.inner.lock();
            let found = inner.spaces.iter().find_map(|(&vm, s)| {
                let len = s.frames() as usize * PAGE_SIZE;
                (page_addr >= s.base && page_addr < s.base + len)
                    .then(|| (vm, ((page_addr - s.base) / PAGE_SIZE) as Gfn, s.home_node))
            });
            match found {
                None => FaultOutcome::NotGuestMemory,
                Some((vm, gfn, home)) => match inner.space(vm)?.pmap.get(gfn) {
                    Some(e) if e.flags.write_protected => {
                        let owners = inner.memmap.get(e.page).map_or(0, |i| i.owners.len());
                        if owners == 1 && inner.replicas.contains(e.page) {
                            // The writer's replica has no other owner: it
                            // leaves its set and becomes the writer's page.
                            if let Some(last) = inner.replicas.leave(e.page) {
                                inner.after_owner_removed(last)?;
                            }
                            inner.replicas.write_breaks += 1;
                        }
                        if owners > 1 {
                            inner.replace_with_copy(vm, gfn, home)?;
                            inner.cow.breaks += 1;
                            let ns = started.elapsed().as_nanos() as u64;
                            inner.cow.break_ns.push(ns);
                            let c = inner.cow.per_vm.entry(vm).or_default();
                            c.cow_breaks += 1;
                            c.cow_break_ms += ns as f64 / 1e6;
                            FaultOutcome::Copied
                        } else {
                            inner.unprotect_frame(vm, gfn)?;
                            FaultOutcome::Unprotected
                        }
                    }
                    _ => FaultOutcome::AlreadyResolved,
                },
            }
        };
        match self.userfault() {
            Some(uffd) => uffd.wake(page_addr, PAGE_SIZE)?,
            None => bail!("a write fault arrived but no userfaultfd is open"),
        }
        Ok(outcome)
    }

    /// Current sharing figures (computed from the memmap).
    pub fn sharing_stats(&self) -> SharingStats {
        let inner = self.inner.lock();
        let mut s = SharingStats::default();
        for (_, info) in inner.memmap.iter() {
            if info.owners.len() > 1 {
                s.shared_machine_pages += 1;
                s.sharing_frames += info.owners.len() as u64;
                s.saved_pages += info.owners.len() as u64 - 1;
            }
        }
        s.saved_bytes = s.saved_pages * PAGE_SIZE as u64;
        s.merges = inner.cow.merges;
        s.compare_failures = inner.cow.compare_failures;
        s.cow_breaks = inner.cow.breaks;
        let mut ns = inner.cow.break_ns.clone();
        ns.sort_unstable();
        s.cow_break_median_us = percentile_us(&ns, 0.5);
        s.cow_break_p99_us = percentile_us(&ns, 0.99);
        s
    }

    /// The fault handler's time of every copy-on-write break so far, in
    /// nanoseconds, in the order they happened (benchmarks take
    /// distributions from it).
    pub fn cow_break_times_ns(&self) -> Vec<u64> {
        self.inner.lock().cow.break_ns.clone()
    }

    /// What copy-on-write breaks and remap pauses have cost VM `vm` so far.
    pub fn guest_costs(&self, vm: VmId) -> GuestCosts {
        self.inner
            .lock()
            .cow
            .per_vm
            .get(&vm)
            .copied()
            .unwrap_or_default()
    }

    /// Every guest space as `(vm, frames, sharing domain)`.
    pub fn spaces(&self) -> Vec<(VmId, u64, String)> {
        self.inner
            .lock()
            .spaces
            .iter()
            .map(|(&vm, s)| (vm, s.frames(), s.domain.clone()))
            .collect()
    }
}
