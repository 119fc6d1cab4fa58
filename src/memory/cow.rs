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
//! `Memory::merge_batch` does the same for many frames of one VM at once,
//! each step over the whole batch (ranged protection, compares, one remap
//! per run of frames onto consecutive kept pages, frees), so the argument
//! holds for each frame; `merge` is a batch of one. The batch pauses the
//! duplicates' VM for its remaps (`GuestPause`); while it is paused no
//! vCPU of it can write (a vCPU blocked in a fault waits for the memory
//! lock the batch holds, and the monitor's own writes to guest memory take
//! that lock too), so its frames skip the protection and only the kept
//! frames, whose VMs run on, are protected before the compare. In the
//! sharing bench's scattered layout (runs of one or two frames) that saved
//! one `UFFDIO_WRITEPROTECT`, with its MMU-notifier round through every
//! KVM VM of the process, per run.
//!
//! Breaking (`Memory::resolve_write_fault`): the handler copies the shared
//! page into a fresh page of the writer's home node, maps the copy writable
//! for that frame only, updates pmap and memmap, and wakes the vCPU, whose
//! write then lands in the copy. When a page is down to one owner, that
//! owner becomes private again (unprotected).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;

use super::mapper::{Inner, Memory};
use super::pmap::PmapEntry;
use super::{Gfn, MachinePage, VmId};
use crate::PAGE_SIZE;

/// Counters the mapper keeps about copy-on-write.
#[derive(Debug, Default)]
pub(crate) struct CowCounters {
    merges: u64,
    compare_failures: u64,
    breaks: u64,
    /// Zero pages punched out of their pools (`release_zero_frames`).
    zero_releases: u64,
    /// Handler time of the breaks, in nanoseconds: a histogram of bounded
    /// size (3 significant digits, 1 ns to 1 hour), so a monitor that runs
    /// for months does not grow with its breaks.
    break_ns: BreakTimes,
    /// What copy-on-write and remaps cost each VM (see `GuestCosts`).
    pub(super) per_vm: std::collections::BTreeMap<VmId, GuestCosts>,
    /// VMs whose copy-on-write break found every pool full (overcommitted
    /// guests wrote more than sharing had saved), for the monitor to stop:
    /// see [`Memory::take_starved`].
    pub(super) starved: std::collections::BTreeSet<VmId>,
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
    /// Equal, but its run of frames onto consecutive kept pages was left
    /// out by the batch's [`RunAllowance`] (the VM has spent its budget of
    /// kernel mappings); nothing done.
    Deferred,
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
    /// No pool had a page for the writer's copy: the VM is starved (the
    /// monitor stops it); the vCPU is woken and faults again meanwhile.
    PoolsFull,
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
    /// Copies copy-on-write made: one per break, and one per shared frame
    /// of a unit a break over the mapping budget unshared (`budget.rs`).
    pub cow_breaks: u64,
    pub cow_break_median_us: f64,
    pub cow_break_p99_us: f64,
    /// Zero pages released to the host so far (`Memory::release_zero_frames`).
    #[serde(default)]
    pub zero_releases: u64,
    /// Frames whose zero page is released now (as of the scanner's last
    /// look: a guest touch allocates a page without telling the monitor).
    #[serde(default)]
    pub released_zero_frames: u64,
}

impl SharingStats {
    /// Host pages sharing and released zero pages save.
    pub fn pages_saved_in_all(&self) -> u64 {
        self.saved_pages + self.released_zero_frames
    }
}

/// Copy-on-write break times (see `CowCounters::break_ns`).
#[derive(Debug)]
struct BreakTimes(hdrhistogram::Histogram<u64>);

impl Default for BreakTimes {
    fn default() -> Self {
        BreakTimes(
            hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000_000, 3)
                .expect("valid histogram bounds"),
        )
    }
}

/// The `q` quantile of a histogram of nanoseconds, in microseconds (0 when
/// empty).
pub fn quantile_us(h: &hdrhistogram::Histogram<u64>, q: f64) -> f64 {
    if h.is_empty() {
        0.0
    } else {
        h.value_at_quantile(q) as f64 / 1000.0
    }
}

/// xxh3 of a page; see ARCHITECTURE.md for why xxh3.
pub fn page_hash(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}

fn all_zero(bytes: &[u8]) -> bool {
    bytes.iter().all(|&b| b == 0)
}

/// Per frame of `frames` (in order), whether its pool page holds data.
/// Shared pages hold data by construction and are not asked. The private
/// pages of each pool are asked with one `mincore` over the span from the
/// lowest to the highest of them (a frame the guest got in a run sits next
/// to its neighbours in the pool, and the pages between cost a byte each),
/// or page by page when they are spread wider than `RESIDENCY_SPAN`: per
/// call, `mincore` costs a system call, a VMA lookup and a kernel page for
/// its vector, and asked once per page it took 40 % of the scanner's CPU
/// in the sharing bench's steady state, where shared frames sit between
/// private ones.
fn residency(frames: &[(Gfn, PmapEntry, *const u8)]) -> Vec<bool> {
    let mut resident = vec![true; frames.len()];
    let mut nodes: Vec<u16> = frames
        .iter()
        .filter(|(_, e, _)| !e.flags.shared)
        .map(|(_, e, _)| e.page.node)
        .collect();
    nodes.sort_unstable();
    nodes.dedup();
    let mut answers = Vec::new();
    for node in nodes {
        let private = || {
            frames
                .iter()
                .enumerate()
                .filter(move |(_, (_, e, _))| !e.flags.shared && e.page.node == node)
        };
        let (low, high) = private().fold((u32::MAX, 0), |(lo, hi), (_, (_, e, _))| {
            (lo.min(e.page.index), hi.max(e.page.index))
        });
        let span = (high - low) as usize + 1;
        if span <= RESIDENCY_SPAN {
            // The frame whose page is `low` gives the view address of the span.
            let (_, (_, e0, p0)) = private()
                .find(|(_, (_, e, _))| e.page.index == low)
                .expect("the lowest page is one of them");
            debug_assert_eq!(e0.page.index, low);
            answers.clear();
            super::pool::view_pages_resident(*p0, span, &mut answers);
            for (i, (_, e, _)) in private() {
                resident[i] = answers[(e.page.index - low) as usize];
            }
        } else {
            for (i, (_, _, ptr)) in private() {
                answers.clear();
                super::pool::view_pages_resident(*ptr, 1, &mut answers);
                resident[i] = answers[0];
            }
        }
    }
    resident
}

/// Widest span of pool pages `residency` asks in one `mincore`.
const RESIDENCY_SPAN: usize = 4096;

fn zero_page_hash() -> u64 {
    static HASH: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *HASH.get_or_init(|| page_hash(&[0u8; PAGE_SIZE]))
}

impl Memory {
    /// Hashes one frame's page (through the monitor's pool view, so the
    /// guest's mapping is not touched). `None` when the frame is unmapped
    /// or excluded from sharing. A [`Memory::scan_frames`] of one frame.
    pub fn scan_page(&self, vm: VmId, gfn: Gfn) -> Result<Option<PageScan>> {
        let mut out = Vec::with_capacity(1);
        self.scan_frames(vm, gfn..gfn + 1, &mut out)?;
        Ok(out.pop().map(|(_, scan)| scan))
    }

    /// Hashes the pages of `vm`'s frames `gfns` into `out` (cleared first),
    /// one `(gfn, scan)` per mapped, mergeable frame, and says whether the
    /// VM is still (no vCPU runs guest code: `GuestPause::still`).
    ///
    /// One hold of the memory lock for the run, and one `mincore` per run
    /// of consecutive pool pages: per page, the lock, the `mincore` system
    /// call (which also allocates and frees a kernel page per call) and a
    /// clock read were about half of the scanner's CPU time (perf, the
    /// sharing bench's quick run), the hash itself a small part.
    pub fn scan_frames(
        &self,
        vm: VmId,
        gfns: std::ops::Range<Gfn>,
        out: &mut Vec<(Gfn, PageScan)>,
    ) -> Result<bool> {
        out.clear();
        let (still, mut frames) = {
            let inner = self.inner.lock();
            let space = inner.space(vm)?;
            let still = inner.pausers.get(&vm).is_some_and(|p| p.still());
            let end = gfns.end.min(space.pmap.frames());
            let frames: Vec<(Gfn, PmapEntry, *const u8)> = (gfns.start..end)
                .filter(|&gfn| space.mergeable(gfn))
                .filter_map(|gfn| space.pmap.get(gfn).map(|e| (gfn, e)))
                .map(|(gfn, e)| {
                    let ptr = inner.pools[e.page.node()].page_ptr(e.page.index) as *const u8;
                    (gfn, e, ptr)
                })
                .collect();
            (still, frames)
        };
        // The residency test and the hash run without the memory lock: the
        // scanner runs below the vCPUs' priority (see `sharing`), and a
        // fault handler must not wait for a descheduled scanner. A page may
        // be remapped or freed meanwhile; the hash is only a hint (a merge
        // compares the bytes again, under protection and the lock), and the
        // pool views stay mapped for the life of `Memory`.
        let resident = residency(&frames);
        let mut touched_released = Vec::new();
        for ((gfn, entry, ptr), resident) in frames.drain(..).zip(resident) {
            if !entry.flags.shared && !resident {
                let hole = PageScan {
                    page: entry.page,
                    hash: 0,
                    zero: false,
                    shared: false,
                    hole: true,
                };
                out.push((gfn, hole));
                continue;
            }
            if entry.flags.released {
                touched_released.push((gfn, entry.page));
            }
            // SAFETY: an in-bounds page of a pool view, mapped as long as
            // `self` lives; guests may write it concurrently, which only
            // makes the hash a stale hint.
            let bytes = unsafe { std::slice::from_raw_parts(ptr, PAGE_SIZE) };
            let hash = page_hash(bytes);
            // Only a page hashing like the zero page can be one (then check).
            let zero = hash == zero_page_hash() && all_zero(bytes);
            let scan = PageScan {
                page: entry.page,
                hash,
                zero,
                shared: entry.flags.shared,
                hole: false,
            };
            out.push((gfn, scan));
        }
        if !touched_released.is_empty() {
            // The guest touched its released zero pages again.
            let mut inner = self.inner.lock();
            let space = inner.space_mut(vm)?;
            for (gfn, page) in touched_released {
                if let Some(mut e) = space.pmap.get(gfn).filter(|e| e.page == page) {
                    e.flags.released = false;
                    space.pmap.set(gfn, Some(e));
                }
            }
        }
        Ok(still)
    }

    /// Merges frame `dup` onto the page of frame `keep`, if both still map
    /// the pages the caller saw and their bytes are equal under write
    /// protection. See the module comment for why the order is safe. A
    /// batch of one (`merge_batch`).
    pub fn merge(
        &self,
        dup: (VmId, Gfn, MachinePage),
        keep: (VmId, Gfn, MachinePage),
    ) -> Result<MergeOutcome> {
        let pair = MergePair {
            dup_gfn: dup.1,
            dup_page: dup.2,
            keep,
        };
        Ok(self.merge_batch(dup.0, &[pair])?[0])
    }

    /// Merges many frames of one VM (`dup_vm`), each onto the page of its
    /// `keep` frame, with the protocol of a single merge (protect, compare,
    /// remap, free; see the module comment) done once for the batch: one
    /// pause of `dup_vm`, one hold of the memory lock, one userfaultfd
    /// write-protect per run of consecutive frames, and one `mmap` +
    /// registration + write-protect per run of merged frames whose kept
    /// pages are consecutive in one pool (the kernel then keeps such a run
    /// in one mapping, where single merges leave a mapping per page). Pages
    /// left without an owner are freed together (one hole per run).
    ///
    /// Returns the outcome of each pair, in order. A pair is `Stale` as in
    /// `merge`, and also when its duplicate frame came earlier in the batch
    /// or its kept frame is a duplicate of this batch. At most
    /// [`MERGE_BATCH_MAX`] pairs (the lock is held for the whole batch).
    pub fn merge_batch(&self, dup_vm: VmId, pairs: &[MergePair]) -> Result<Vec<MergeOutcome>> {
        self.merge_batch_within(dup_vm, pairs, RunAllowance::UNLIMITED)
    }

    /// [`Memory::merge_batch`] within an allowance of remapped runs (runs
    /// of frames onto consecutive kept pages): the `free_runs` longest runs
    /// are remapped, and beyond them only runs of at least `long_run`
    /// frames; the equal pairs of the other runs are `Deferred`. A run
    /// inside a mapping splits it in three, so a run costs at most two
    /// kernel mappings: the scanner gives a VM the runs its budget of
    /// mappings has left, spent on the longest runs first.
    pub fn merge_batch_within(
        &self,
        dup_vm: VmId,
        pairs: &[MergePair],
        allowance: RunAllowance,
    ) -> Result<Vec<MergeOutcome>> {
        ensure!(
            pairs.len() <= MERGE_BATCH_MAX,
            "a merge batch holds at most {MERGE_BATCH_MAX} pairs, not {}",
            pairs.len()
        );
        if pairs.is_empty() {
            return Ok(Vec::new());
        }
        // The duplicate's VM is paused for the remap (see `GuestPause`), and
        // paused *before* the memory lock is taken: a vCPU can take seconds
        // to stop (seen on the build hosts' emulated guest kernel mode,
        // docs/host-facts.md "KVM": a Linux
        // guest's `rep stosb` ran 2 s past every kick), and waiting for it
        // with the lock held stalled every fault of every VM meanwhile.
        let pauser = self.inner.lock().pausers.get(&dup_vm).cloned();
        let started = std::time::Instant::now();
        if let Some(p) = &pauser {
            if !p.pause() {
                self.inner.lock().count_pause(dup_vm, started, false);
                return Ok(vec![MergeOutcome::Stale; pairs.len()]);
            }
        }
        let outcomes =
            self.inner
                .lock()
                .merge_batch_paused(dup_vm, pairs, allowance, pauser.is_some());
        if let Some(p) = &pauser {
            p.resume();
            self.inner.lock().count_pause(dup_vm, started, true);
        }
        outcomes
    }
    /// Releases the pages of zero frames of `vm` to the host: each frame
    /// that still maps the page the caller saw, privately (one owner, not
    /// protected, not a replica) and still holds only zeros keeps its
    /// machine page, but the page is punched out of its pool, so it costs no
    /// host memory until the guest touches it again; the kernel then
    /// allocates a zero page in place without involving the monitor. Unlike
    /// a merge onto a shared zero page this adds no kernel mapping (VMA),
    /// and a later write costs a page allocation instead of a copy-on-write
    /// break. Returns, in order, whether each frame was released.
    ///
    /// Safe against racing guest writes without pausing the VM: the frames
    /// are write-protected before the zero check, so a write after it waits
    /// in the fault handler (for the memory lock held here) and, once woken,
    /// lands in the fresh page; a write before it fails the check.
    pub fn release_zero_frames(
        &self,
        vm: VmId,
        frames: &[(Gfn, MachinePage)],
    ) -> Result<Vec<bool>> {
        let mut inner = self.inner.lock();
        let mut released = vec![false; frames.len()];
        let mut live: Vec<(usize, Gfn, MachinePage)> = Vec::new();
        {
            let space = inner.space(vm)?;
            for (i, &(gfn, page)) in frames.iter().enumerate() {
                let ok = space.pmap.get(gfn).is_some_and(|e| {
                    e.page == page
                        && !e.flags.shared
                        && !e.flags.write_protected
                        && !e.flags.released
                        && space.mergeable(gfn)
                });
                if ok && !inner.replicas.contains(page) {
                    live.push((i, gfn, page));
                }
            }
        }
        if live.is_empty() {
            return Ok(released);
        }
        let uffd = inner.require_uffd()?.clone();
        live.sort_unstable_by_key(|l| l.1);
        live.dedup_by_key(|l| l.1);
        let gfns: Vec<Gfn> = live.iter().map(|l| l.1).collect();
        let base = inner.space(vm)?.base;
        let runs: Vec<(Gfn, Gfn)> = super::runs::runs_of(&gfns).collect();
        let protect_runs = |protect: bool| -> Result<()> {
            for &(first, len) in &runs {
                let (addr, bytes) = (base + first as usize * PAGE_SIZE, len as usize * PAGE_SIZE);
                uffd.write_protect(addr, bytes, protect).with_context(|| {
                    format!("setting write protection {protect} on zero frames")
                })?;
            }
            Ok(())
        };
        protect_runs(true)?;
        let mut zero_pages: BTreeMap<usize, Vec<u32>> = BTreeMap::new();
        for &(i, gfn, page) in &live {
            let ptr = inner.pools[page.node()].page_ptr(page.index) as *const u8;
            // SAFETY: an in-bounds page of a pool view; write-protected in
            // the guest's mapping, so its bytes hold still under the lock.
            let bytes = unsafe { std::slice::from_raw_parts(ptr, PAGE_SIZE) };
            if all_zero(bytes) {
                zero_pages.entry(page.node()).or_default().push(page.index);
                released[i] = true;
                let space = inner.space_mut(vm)?;
                let mut e = space.pmap.get(gfn).expect("a live frame");
                e.flags.released = true;
                space.pmap.set(gfn, Some(e));
            }
        }
        let mut failure = None;
        for (node, mut pages) in zero_pages {
            pages.sort_unstable();
            if let Err(e) = inner.pools[node].discard(&pages) {
                failure.get_or_insert(e);
            }
        }
        // The punched pages keep the write-protect marker; lifting it
        // clears the marker too, so the next touch simply allocates.
        protect_runs(false)?;
        // (Lifting the protection also woke any writer that faulted meanwhile.)
        inner.cow.zero_releases += released.iter().filter(|&&r| r).count() as u64;
        match failure {
            Some(e) => Err(e.context("releasing zero pages")),
            None => Ok(released),
        }
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
                        if owners > 1 && !inner.pools.iter().any(|p| p.available() > 0) {
                            inner.cow.starved.insert(vm);
                            FaultOutcome::PoolsFull
                        } else if owners > 1 {
                            // A unit unshared over budget makes a copy per
                            // shared frame: each counts as a break.
                            let copies = inner.break_within_budget(vm, gfn, home)?;
                            inner.cow.breaks += copies;
                            let ns = started.elapsed().as_nanos() as u64;
                            inner.cow.break_ns.0.saturating_record(ns.max(1));
                            let c = inner.cow.per_vm.entry(vm).or_default();
                            c.cow_breaks += copies;
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

    /// VMs starved since the last call: a write of theirs to a shared page
    /// found no free page in any pool for its copy (see
    /// [`FaultOutcome::PoolsFull`]).
    pub fn take_starved(&self) -> Vec<VmId> {
        std::mem::take(&mut self.inner.lock().cow.starved)
            .into_iter()
            .collect()
    }

    /// Current sharing figures (kept incrementally: reading them costs the
    /// same at any memory size).
    pub fn sharing_stats(&self) -> SharingStats {
        let inner = self.inner.lock();
        let mut s = SharingStats::default();
        (s.shared_machine_pages, s.sharing_frames) = inner.memmap.sharing();
        s.saved_pages = s.sharing_frames - s.shared_machine_pages;
        s.saved_bytes = s.saved_pages * PAGE_SIZE as u64;
        s.merges = inner.cow.merges;
        s.compare_failures = inner.cow.compare_failures;
        s.cow_breaks = inner.cow.breaks;
        s.cow_break_median_us = quantile_us(&inner.cow.break_ns.0, 0.5);
        s.cow_break_p99_us = quantile_us(&inner.cow.break_ns.0, 0.99);
        s.zero_releases = inner.cow.zero_releases;
        s.released_zero_frames = inner.spaces.values().map(|sp| sp.pmap.released()).sum();
        s
    }

    /// The fault handler's times of the copy-on-write breaks so far, in
    /// nanoseconds (benchmarks subtract two of these to get the
    /// distribution of a phase).
    pub fn cow_break_histogram(&self) -> hdrhistogram::Histogram<u64> {
        self.inner.lock().cow.break_ns.0.clone()
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

    /// Whether VM `vm` runs no guest code now: its vCPUs have all exited,
    /// or it is paused (`GuestPause::still`). False for a VM without a
    /// pauser (memory driven directly, as in tests).
    pub fn guest_still(&self, vm: VmId) -> bool {
        self.inner
            .lock()
            .pausers
            .get(&vm)
            .is_some_and(|p| p.still())
    }
}

/// One candidate of [`Memory::merge_batch`]: frame `dup_gfn` of the
/// batch's VM, seen mapping `dup_page`, and the frame `(vm, gfn, page)`
/// whose page it should map instead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MergePair {
    pub dup_gfn: Gfn,
    pub dup_page: MachinePage,
    pub keep: (VmId, Gfn, MachinePage),
}

/// How many runs a merge batch may remap (see
/// [`Memory::merge_batch_within`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunAllowance {
    /// Runs remapped whatever their length, longest first.
    pub free_runs: usize,
    /// Beyond those, runs of at least this many frames.
    pub long_run: usize,
}

impl RunAllowance {
    /// Every run.
    pub const UNLIMITED: RunAllowance = RunAllowance {
        free_runs: usize::MAX,
        long_run: 1,
    };
}

/// Most pairs one [`Memory::merge_batch`] takes (2 MiB of frames).
pub const MERGE_BATCH_MAX: usize = 512;

impl Inner {
    /// `merge_batch` once `dup_vm` is paused, under the lock. `dup_paused`:
    /// its vCPUs are held outside `KVM_RUN` (or blocked in a fault that
    /// waits for this lock), so nothing writes its frames until the batch
    /// ends and they need no write protection for the compare (see the
    /// module comment); without a pauser they are protected like the kept
    /// frames.
    fn merge_batch_paused(
        &mut self,
        dup_vm: VmId,
        pairs: &[MergePair],
        allowance: RunAllowance,
        dup_paused: bool,
    ) -> Result<Vec<MergeOutcome>> {
        let mut outcomes = vec![MergeOutcome::Stale; pairs.len()];
        let live = self.live_pairs(dup_vm, pairs)?;
        if live.is_empty() {
            return Ok(outcomes);
        }
        self.require_uffd()?;
        let dup_frame = |p: &MergePair| (dup_vm, p.dup_gfn);
        let keep_frame = |p: &MergePair| (p.keep.0, p.keep.1);

        // 1. protect every frame of the live pairs (the duplicates only if
        // their VM is not paused), remembering which were protected already
        // (those stay protected whatever happens).
        let mut was_protected: HashMap<(VmId, Gfn), bool> = HashMap::new();
        let mut by_vm: BTreeMap<VmId, Vec<Gfn>> = BTreeMap::new();
        for &i in &live {
            let dup = (!dup_paused).then(|| dup_frame(&pairs[i]));
            for (vm, gfn) in dup.into_iter().chain([keep_frame(&pairs[i])]) {
                let protected = self.space(vm)?.pmap.get(gfn).expect("a live frame");
                was_protected.insert((vm, gfn), protected.flags.write_protected);
                by_vm.entry(vm).or_default().push(gfn);
            }
        }
        for (vm, gfns) in &by_vm {
            self.protect_frames(*vm, gfns)?;
        }

        // 2. compare
        let mut equal = Vec::with_capacity(live.len());
        for &i in &live {
            let p = &pairs[i];
            if self.pages_equal(p.dup_page, p.keep.2) {
                equal.push(i);
            } else {
                outcomes[i] = MergeOutcome::Differ;
                self.cow.compare_failures += 1;
            }
        }

        // 3. remap the duplicates (their VM is paused: a new mapping is
        // writable until it is protected, see `GuestPause`): one `mmap` per
        // run of consecutive frames onto consecutive pages of one pool.
        equal.sort_unstable_by_key(|&i| pairs[i].dup_gfn);
        // The runs: (start in `equal`, length).
        let mut runs = Vec::new();
        let mut at = 0;
        while at < equal.len() {
            let first = &pairs[equal[at]];
            let mut len = 1;
            while let Some(&next) = equal.get(at + len) {
                let next = &pairs[next];
                let (gfn, page) = (next.dup_gfn, next.keep.2);
                if gfn != first.dup_gfn + len as Gfn
                    || page.node != first.keep.2.node
                    || page.index != first.keep.2.index + len as u32
                {
                    break;
                }
                len += 1;
            }
            runs.push((at, len));
            at += len;
        }
        // The allowance goes to the longest runs; beyond it only long runs.
        let mut by_length: Vec<usize> = (0..runs.len()).collect();
        by_length.sort_by_key(|&r| std::cmp::Reverse(runs[r].1));
        // Remapped longest first, so the mapper's own cap (`budget.rs`),
        // checked on the pmap as it is after the runs before, goes to them.
        let mut merged = Vec::with_capacity(equal.len());
        let mut failure = None;
        for (rank, &r) in by_length.iter().enumerate() {
            let (at, len) = runs[r];
            let first = &pairs[equal[at]];
            let allowed = rank < allowance.free_runs || len >= allowance.long_run;
            if !allowed || !self.merge_run_fits(dup_vm, first.dup_gfn, first.keep.2, len) {
                for &i in &equal[at..at + len] {
                    outcomes[i] = MergeOutcome::Deferred;
                }
                continue;
            }
            if let Err(e) = self.map_onto_run(dup_vm, first.dup_gfn, first.keep.2, len) {
                failure = Some(e);
                break;
            }
            merged.extend_from_slice(&equal[at..at + len]);
        }

        // 4. frames of pairs not merged get back the protection they had,
        // unless a merged pair needs it (a kept frame shared by several).
        let needed: HashSet<(VmId, Gfn)> = merged
            .iter()
            .flat_map(|&i| [dup_frame(&pairs[i]), keep_frame(&pairs[i])])
            .collect();
        let mut unprotect: BTreeMap<VmId, Vec<Gfn>> = BTreeMap::new();
        for (&frame, &was) in &was_protected {
            if !was && !needed.contains(&frame) {
                unprotect.entry(frame.0).or_default().push(frame.1);
            }
        }
        for (vm, gfns) in &unprotect {
            self.unprotect_frames(*vm, gfns)?;
        }

        // 5. drop (and so free) the duplicates' old pages, in page order so
        // that frees of consecutive pages punch one hole.
        let mut olds: Vec<(MachinePage, VmId, Gfn)> = merged
            .iter()
            .map(|&i| (pairs[i].dup_page, dup_vm, pairs[i].dup_gfn))
            .collect();
        olds.sort_unstable();
        self.drop_owners(&olds, false)?;
        self.cow.merges += merged.len() as u64;
        for &i in &merged {
            outcomes[i] = MergeOutcome::Merged;
        }
        match failure {
            Some(e) => Err(e.context("remapping merged frames")),
            None => Ok(outcomes),
        }
    }

    /// The pairs of a batch that may still merge (their indices): both
    /// frames map the pages the caller saw, distinct pages, same sharing
    /// domain, both mergeable, the duplicate not a replica (a replica is
    /// placed on purpose); a duplicate frame named twice, or named as the
    /// kept frame of another pair, counts only once, as a duplicate.
    fn live_pairs(&self, dup_vm: VmId, pairs: &[MergePair]) -> Result<Vec<usize>> {
        let dup_space = self.space(dup_vm)?;
        let dups: HashSet<Gfn> = pairs.iter().map(|p| p.dup_gfn).collect();
        let mut seen = HashSet::new();
        let mut live = Vec::new();
        for (i, p) in pairs.iter().enumerate() {
            let (keep_vm, keep_gfn, keep_page) = p.keep;
            let Ok(keep_space) = self.space(keep_vm) else {
                continue;
            };
            let (Some(dup), Some(keep)) =
                (dup_space.pmap.get(p.dup_gfn), keep_space.pmap.get(keep_gfn))
            else {
                continue;
            };
            if !seen.insert(p.dup_gfn)
                || (keep_vm == dup_vm && dups.contains(&keep_gfn))
                || dup.page != p.dup_page
                || keep.page != keep_page
                || p.dup_page == keep_page
                || self.replicas.contains(p.dup_page)
                || dup_space.domain != keep_space.domain
                || !dup_space.mergeable(p.dup_gfn)
                || !keep_space.mergeable(keep_gfn)
            {
                continue;
            }
            live.push(i);
        }
        Ok(live)
    }

    /// Whether two pages hold the same bytes (through the pool views).
    fn pages_equal(&self, a: MachinePage, b: MachinePage) -> bool {
        let a = self.pools[a.node()].page_ptr(a.index);
        let b = self.pools[b.node()].page_ptr(b.index);
        // SAFETY: in-bounds pages of pool views. Under a merge they are
        // write-protected in every guest mapping, so the bytes are stable
        // while the lock is held.
        unsafe {
            std::slice::from_raw_parts(a as *const u8, PAGE_SIZE)
                == std::slice::from_raw_parts(b as *const u8, PAGE_SIZE)
        }
    }
}
