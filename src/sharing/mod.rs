//! Transparent page sharing: the scanner that finds identical pages across
//! VMs and asks the mapper to merge them copy-on-write.
//!
//! ## Order of the scan
//! The scanner walks every guest space in turn and every frame of a space in
//! ascending order, then starts over (one *full scan*). This order reaches
//! every page once per pass, so a pass takes exactly `frames / rate` and the
//! time to find any duplicate is bounded by one pass; walking a space in
//! order also reads each pool sequentially. (VMware ESX picks pages at
//! random to avoid pathological patterns; KSM walks each process linearly
//! like this; with a bounded pass time the linear walk is the simpler
//! guarantee.) Spaces created during a pass join at the next one.
//!
//! ## Finding duplicates
//! Each page is hashed with xxh3 (through the monitor's pool view) and
//! looked up in a table keyed by (sharing domain, hash). A hit is only a
//! candidate: the mapper write-protects both frames and compares the bytes
//! before merging (`Memory::merge_batch`).
//!
//! ## Settled content
//! A private frame is merged only once its content has held still: seen
//! with the same hash on an earlier pass, at least `settle_age` (200 ms)
//! ago. KSM's rule is the same in passes (a page's checksum must not change
//! between two scans), but a pass over a few small guests takes
//! milliseconds on the build hosts (docs/host-facts.md, "Sharing
//! scanner"), so the rule is tied to time as well. Merging on first
//! sight made guests that keep rewriting their memory churn as soon as
//! merges got cheap: with batched merges, four identical 32 MiB `random`
//! writers made 96,000 merges and 72,000 copy-on-write breaks and ran over
//! 120 s instead of 1-3 s. What the scanner saw of each frame is kept
//! densely per space (8 bytes a frame). Once every guest has stopped
//! nothing changes any more, and frames merge on sight; so do the frames
//! of a VM that runs no guest code now (its vCPUs have exited, or the
//! monitor paused it: `GuestPause::still`, asked once per chunk of 64
//! frames), which took the sharing bench (guests done before the scanner
//! starts) from three passes to one.
//!
//! ## Merging in batches
//! A merge found by the scan is not issued at once: the merges of one VM's
//! aligned window of `MERGE_WINDOW` frames (2 MiB) are collected and issued
//! together (`Memory::merge_batch`) when the scan leaves the window, when a
//! batch is full, and at the end of every `step`. A batch pauses the VM
//! once, takes the memory lock once, and remaps each run of frames whose
//! kept pages are consecutive in one pool with one `mmap`, so identical VMs
//! cost a system call and a kernel mapping per run instead of per page.
//! Twins find each other's frames in order (the first copy seen is every
//! later copy's candidate); where content repeats inside a VM, the
//! candidate would be the first copy seen, so a merge that follows a merge
//! onto frame `g` of some VM prefers frame `g + 1` of that VM when it holds
//! the same content on the next pool page (`twin_picks`).
//!
//! ## A budget of kernel mappings
//! Each run a batch remaps can split a kernel mapping (VMA) in three; runs
//! are long where VMs hold equal content at equal frames, but where shared
//! pages are scattered among private ones (the worst case) every merged
//! page is a mapping of its own, and a process has `vm.max_map_count` of
//! them, each costing kernel memory and time in every `/proc/self/maps`
//! read. So each VM has a budget: one mapping per `frames_per_mapping`
//! guest frames (policy `[sharing]`, default 16; at least 16 mappings). The
//! mapper counts each VM's mappings as its pmap changes
//! (`Memory::space_mappings`, checked against `/proc/self/maps` by
//! `verify`); a batch may remap as many runs as the budget has left,
//! longest first, and beyond that only runs of at least twice
//! `frames_per_mapping` frames; the monitor's mapper holds the same budget
//! and defers any run that would take the VM over its cap
//! (`memory::budget`). Equal frames left out are `budget_deferrals`, tried
//! again on later passes; a batch with deferrals has the mapper compact its
//! window (`Memory::compact_window`: scattered pages copied into one pool
//! run when that saves mappings). Copy-on-write breaks, migrations and
//! replicas are held to the mapper's budget too (see `memory::budget`).
//!
//! ## Holes and zero pages
//! Fresh guest memory is a hole in its pool until the guest first writes
//! it. The scanner asks the pool (`mincore` on the monitor's view) before
//! reading a page and skips holes: reading one through the `MAP_SHARED`
//! view would make the host allocate it. Never-written memory costs the
//! host nothing and is reported as such, not as shared.
//!
//! A resident zero frame (a page the guest or its kernel zeroed) is not
//! merged onto a shared zero page: its page is *released*, punched out of
//! the pool in place (`Memory::release_zero_frames`), and the frame keeps
//! it. That adds no kernel mapping (a merge onto one shared page is a
//! mapping per frame: an idle 256 MiB VM merged onto the zero page left
//! 65,350 of them), and a later guest write costs the kernel's allocation
//! of a zero page in place instead of a copy-on-write break through the
//! monitor. A zeroed page usually means it is about to be used, so a zero
//! frame is released only once it has stayed zero for `zero_page_age`
//! (2 s). Released frames are holes to later passes.
//!
//! ## Volatile pages
//! Merging on first sight has one bad case: a page that is written all the
//! time but often holds content some other page holds too (counters that
//! step through the same values, a buffer refilled with the same pattern).
//! Each pass merges it, each write breaks it again: measured on a 2-vCPU
//! counter guest, 5089 merges and 4562 copy-on-write breaks in 1.4 s for 2
//! MiB of guest memory. So the scanner remembers the frames it merged; one
//! found private again (a write broke it) becomes *unstable*, and is merged
//! again only once its content hash has stayed the same over a number of
//! consecutive passes: 1 (the KSM rule) after its first break, doubling with
//! every further break up to 64. The doubling is for guests that write in
//! bursts: on a busy host a vCPU can sit descheduled for longer than a pass
//! (a pass over a few small VMs takes milliseconds), and one stable pass
//! then says little; for the same reason `n` stable passes must also span
//! `n` x `STABLE_PASS_TIME` (250 ms) of wall time. Once every guest has stopped
//! ([`Scanner::guests_quiescent`]) nothing can break a merge any more, and
//! volatile frames are merged on sight again.
//!
//! ## Rate
//! At most `pages_per_second` pages are hashed per second, host-wide, in
//! ticks of 10 ms; the pace follows the yield (`Pace`: faster while pages
//! merge, down to 1/64 of that while none do), and the thread runs at
//! nice 5 (-10 while VMs wait for memory). Its own CPU time is measured and
//! reported.

mod candidates;
mod cpu_share;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::memory::{
    Gfn, MachinePage, Memory, MergeOutcome, MergePair, PageScan, RunAllowance, VmId,
    MERGE_BATCH_MAX,
};
use candidates::{Candidate, CandidateTable, Key};
use cpu_share::CpuShare;

/// What the scanner does; from the policy's `[sharing]` section.
#[derive(Clone, Debug)]
pub struct ScannerConfig {
    pub pages_per_second: u64,
    /// Sharing domains to scan; empty means all.
    pub domains: Vec<String>,
    /// How long a resident zero frame must stay zero before its page is
    /// released (see "Zero pages" in the module doc).
    pub zero_page_age: Duration,
    /// How long a private frame's content must hold still before it is
    /// merged (see "Settled content").
    pub settle_age: Duration,
    /// Merge (and release) on first sight, without waiting for the content
    /// to settle: only for tests of the merge protocol against writers.
    pub first_sight: bool,
    /// Each VM's budget of kernel mappings: one per this many guest frames
    /// (0: no budget). See "A budget of kernel mappings".
    pub frames_per_mapping: u64,
    /// How long an unstable frame's content must hold still, per stable
    /// pass it is asked for, before it is merged again.
    pub stable_pass_time: Duration,
    /// While no host CPU is idle, the most of all CPUs' time the scanner
    /// may take (1 or more: no cap). See `cpu_share`.
    pub busy_cpu_share: f64,
}

/// The default `busy_cpu_share`: 1 % of the host's CPUs while they are all
/// busy.
pub const BUSY_CPU_SHARE: f64 = 0.01;

/// A zero frame's page is released once it has been zero this long.
pub const ZERO_PAGE_AGE: Duration = Duration::from_secs(2);
/// A private frame is merged once its content has held still this long.
pub const SETTLE_AGE: Duration = Duration::from_millis(200);
/// The default budget of kernel mappings: one per this many guest frames.
pub const FRAMES_PER_MAPPING: u64 = 16;
/// An unstable frame asked for `n` stable passes must also have held still
/// for `n` times this long.
pub const STABLE_PASS_TIME: Duration = Duration::from_millis(250);

impl ScannerConfig {
    /// A scanner of every domain at `pages_per_second`, with the default
    /// zero-page and stability times.
    pub fn new(pages_per_second: u64, domains: Vec<String>) -> ScannerConfig {
        ScannerConfig {
            pages_per_second,
            domains,
            zero_page_age: ZERO_PAGE_AGE,
            settle_age: SETTLE_AGE,
            first_sight: false,
            frames_per_mapping: FRAMES_PER_MAPPING,
            stable_pass_time: STABLE_PASS_TIME,
            busy_cpu_share: BUSY_CPU_SHARE,
        }
    }

    /// No waiting on time: frames are merged (zero frames released) when
    /// seen with the same content on two passes, and unstable frames after
    /// their stable passes, however fast the passes (for tests that drive
    /// the scanner pass by pass on stopped guests).
    pub fn without_time_rules(mut self) -> ScannerConfig {
        self.zero_page_age = Duration::ZERO;
        self.settle_age = Duration::ZERO;
        self.stable_pass_time = Duration::ZERO;
        self
    }

    /// Merges on first sight, content settled or not (with
    /// `without_time_rules`): tests that want merges to race writers.
    pub fn merging_on_first_sight(mut self) -> ScannerConfig {
        self.first_sight = true;
        self
    }
}

/// Scanner figures, for reports.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ScannerStats {
    pub pages_scanned: u64,
    /// Completed passes over every frame.
    pub full_scans: u64,
    pub merges: u64,
    /// Zero frames whose page was released to the host (punched out of its
    /// pool, see "Zero pages").
    #[serde(default)]
    pub zero_releases: u64,
    /// Merge batches issued (`Memory::merge_batch`: one pause and one lock
    /// hold each).
    #[serde(default)]
    pub merge_batches: u64,
    /// Candidates whose bytes turned out to differ.
    pub compare_failures: u64,
    /// Candidates that had changed mapping since they were seen.
    pub stale_candidates: u64,
    /// Frames skipped because their page is a hole (never written, or a
    /// released zero page: reading it would allocate it, and it costs the
    /// host nothing).
    #[serde(default)]
    pub holes_skipped: u64,
    /// Zero frames skipped because they had not been zero for
    /// `zero_page_age` yet (fresh memory about to be written).
    #[serde(default)]
    pub young_zero_skips: u64,
    /// Non-zero frames skipped because their content had not held still for
    /// `settle_age` yet (first sight, or changed since the last pass).
    #[serde(default)]
    pub unsettled_skips: u64,
    /// Of the zero and unsettled skips, those of frames seen for the first
    /// time or unchanged but not old enough yet: frames waiting, which the
    /// pace does not count as hashed in vain (frames whose content changed
    /// it does).
    #[serde(default)]
    pub settling_skips: u64,
    /// Frames skipped because they were merged, broken by a write, and
    /// changed again since the last pass (see "Volatile pages").
    #[serde(default)]
    pub unstable_skips: u64,
    /// Merges whose kept page was chosen to extend the previous merge's run
    /// (a twin's frame) instead of the first copy seen.
    #[serde(default)]
    pub twin_picks: u64,
    /// Equal frames not merged because their run was too short for a VM
    /// that had spent its budget of kernel mappings.
    #[serde(default)]
    pub budget_deferrals: u64,
    /// Most kernel mappings one VM's guest range had when a batch of it
    /// was issued.
    #[serde(default)]
    pub max_vm_mappings: u64,
    /// Mappings saved by compacting windows of VMs that had spent their
    /// budget (`Memory::compact_window`).
    #[serde(default)]
    pub compaction_saved: u64,
    /// CPU time of the scanner thread.
    pub cpu_ms: f64,
    /// The scanner's current pace, pages per second (see `Pace`).
    #[serde(default)]
    pub rate_pages_per_s: f64,
    /// Time the scanner waited because the host's CPUs were all busy and it
    /// had used its share of them (see `cpu_share`), milliseconds.
    #[serde(default)]
    pub busy_wait_ms: f64,
    pub errors: u64,
}

/// A frame whose sharing a write broke, waiting for its content to hold
/// still for `needed` consecutive passes.
#[derive(Clone, Copy, Debug)]
struct Unstable {
    hash: u64,
    stable_passes: u32,
    needed: u32,
    /// When the content was last seen to change (or the break was seen).
    since: Instant,
}

/// Most consecutive stable passes an unstable frame must show.
const MAX_STABLE_PASSES: u32 = 64;

/// Frames a merge batch covers: the scanner issues the merges and zero
/// releases it finds in aligned windows of this many frames of one VM
/// (2 MiB), one `Memory::merge_batch` per window.
pub const MERGE_WINDOW: Gfn = MERGE_BATCH_MAX as Gfn;

/// A merge found by the scan, waiting for its batch.
#[derive(Clone, Copy, Debug)]
struct Pending {
    pair: MergePair,
    key: Key,
}

/// What the scanner last saw of a frame: the low 31 bits of its content
/// hash, whether this scanner merged the frame (either side of a merge:
/// see "Volatile pages"; the top bit), and when that content was first
/// seen (milliseconds since the scanner started, plus one; 0 = not seen).
/// Eight bytes a frame, kept densely per space: 2 MiB per GiB of guest
/// memory (a hash set of merged frames cost about 30 bytes per merged
/// frame).
#[derive(Clone, Copy, Debug, Default)]
struct Seen {
    hash_and_merged: u32,
    since_ms: u32,
}

const MERGED_BIT: u32 = 1 << 31;

impl Seen {
    fn hash(&self) -> u32 {
        self.hash_and_merged & !MERGED_BIT
    }
    fn merged(&self) -> bool {
        self.hash_and_merged & MERGED_BIT != 0
    }
    fn set_merged(&mut self, merged: bool) {
        self.hash_and_merged = self.hash() | if merged { MERGED_BIT } else { 0 };
    }
    fn set_hash(&mut self, hash: u64) {
        self.hash_and_merged = (hash as u32 & !MERGED_BIT) | (self.hash_and_merged & MERGED_BIT);
    }
}

/// The scanner's state, separate from its thread so tests can drive it
/// step by step.
pub struct ScanState {
    config: ScannerConfig,
    started: Instant,
    candidates: CandidateTable,
    /// Per space, per frame: the content seen and since when (see
    /// "Settled content").
    seen: FastMap<VmId, Vec<Seen>>,
    /// Frames found private after a merge (a write broke the sharing):
    /// merged again only once their content has held still long enough.
    unstable: FastMap<(VmId, Gfn), Unstable>,
    /// How often each frame was found broken after a merge.
    breaks: FastMap<(VmId, Gfn), u32>,
    domains: Vec<String>,
    /// No guest writes any more: skip the settling and volatile-page waits.
    pub quiescent: bool,
    /// The VM and window of the pending work (see "Merging in batches").
    window: Option<(VmId, Gfn)>,
    /// Merges found and not issued yet.
    pending: Vec<Pending>,
    /// Zero frames found and not released yet.
    pending_zero: Vec<(Gfn, MachinePage)>,
    /// Frames of each space, from the last `step`.
    frames: FastMap<VmId, u64>,
    /// Position: index into the current list of spaces, and frame.
    space_index: usize,
    gfn: Gfn,
    pub stats: ScannerStats,
}

impl ScanState {
    pub fn new(config: ScannerConfig) -> ScanState {
        ScanState {
            config,
            started: Instant::now(),
            candidates: CandidateTable::default(),
            seen: FastMap::default(),
            unstable: FastMap::default(),
            breaks: FastMap::default(),
            quiescent: false,
            domains: Vec::new(),
            window: None,
            pending: Vec::new(),
            pending_zero: Vec::new(),
            frames: FastMap::default(),
            space_index: 0,
            gfn: 0,
            stats: ScannerStats::default(),
        }
    }

    fn domain_id(&mut self, name: &str) -> usize {
        match self.domains.iter().position(|d| d == name) {
            Some(i) => i,
            None => {
                self.domains.push(name.to_string());
                self.domains.len() - 1
            }
        }
    }

    /// Drops what the scanner remembers about frames of spaces that no
    /// longer exist (once per pass, so destroyed VMs leave nothing behind).
    fn forget_gone_spaces(&mut self, spaces: &[(VmId, u64, String)]) {
        let live: HashSet<VmId> = spaces.iter().map(|s| s.0).collect();
        self.seen.retain(|vm, _| live.contains(vm));
        self.unstable.retain(|f, _| live.contains(&f.0));
        self.breaks.retain(|f, _| live.contains(&f.0));
        self.candidates.retain(|c| live.contains(&c.vm));
    }

    /// Scans up to `budget` frames, continuing where the last call stopped,
    /// and issues what it found.
    pub fn step(&mut self, memory: &Memory, budget: u64) {
        let spaces: Vec<(VmId, u64, String)> = memory
            .spaces()
            .into_iter()
            .filter(|(_, _, d)| self.config.domains.is_empty() || self.config.domains.contains(d))
            .collect();
        if spaces.is_empty() {
            return;
        }
        self.frames = spaces.iter().map(|s| (s.0, s.1)).collect();
        let mut left = budget;
        let mut scans = Vec::with_capacity(SCAN_CHUNK as usize);
        while left > 0 {
            if self.space_index >= spaces.len() {
                self.space_index = 0;
                self.gfn = 0;
                self.stats.full_scans += 1;
                self.forget_gone_spaces(&spaces);
            }
            let (vm, frames, domain) = &spaces[self.space_index];
            let (vm, frames, start) = (*vm, *frames, self.gfn);
            // A chunk: within one merge window, at most SCAN_CHUNK frames.
            let window_end = (start / MERGE_WINDOW + 1) * MERGE_WINDOW;
            let end = frames.min(window_end).min(start + left.min(SCAN_CHUNK));
            left -= end - start;
            self.gfn = end;
            if self.gfn >= frames {
                self.space_index += 1;
                self.gfn = 0;
            }
            let domain = self.domain_id(domain);
            let window = (vm, start / MERGE_WINDOW);
            if self.window.is_some_and(|w| w != window) {
                self.flush(memory);
            }
            self.window = Some(window);
            self.stats.pages_scanned += end - start;
            let still = match memory.scan_frames(vm, start..end, &mut scans) {
                Ok(still) => still,
                Err(_) => continue, // the space went away during the pass
            };
            // The lookups of the batch miss the cache; start them all now
            // (see `candidates`).
            for (_, scan) in scans.iter().filter(|(_, s)| !s.hole && !s.zero) {
                self.candidates.prefetch(Key::new(domain, scan.hash));
            }
            let now = Instant::now();
            for (gfn, scan) in scans.drain(..) {
                self.scan_one(memory, vm, gfn, domain, scan, still, now);
            }
        }
        self.flush(memory);
    }

    /// Issues the pending merges and zero releases of the current window,
    /// each as one batch, and takes in the outcomes.
    fn flush(&mut self, memory: &Memory) {
        let Some((vm, _)) = self.window.take() else {
            return;
        };
        let zeros = std::mem::take(&mut self.pending_zero);
        if !zeros.is_empty() {
            match memory.release_zero_frames(vm, &zeros) {
                Ok(done) => {
                    for (&(gfn, _), released) in zeros.iter().zip(done) {
                        if released {
                            self.stats.zero_releases += 1;
                            // Its next sighting is of a hole.
                            self.forget_seen(vm, gfn);
                        }
                    }
                }
                Err(e) => {
                    self.stats.errors += 1;
                    tracing::warn!("releasing {} zero frames of vm {vm}: {e:#}", zeros.len());
                }
            }
        }
        let pending = std::mem::take(&mut self.pending);
        if pending.is_empty() {
            return;
        }
        let pairs: Vec<MergePair> = pending.iter().map(|p| p.pair).collect();
        self.stats.merge_batches += 1;
        let allowance = self.allowance(memory, vm);
        let outcomes = match memory.merge_batch_within(vm, &pairs, allowance) {
            Ok(o) => o,
            Err(e) => {
                self.stats.errors += 1;
                tracing::warn!("merging {} frames of vm {vm}: {e:#}", pairs.len());
                return;
            }
        };
        let window = pending[0].pair.dup_gfn / MERGE_WINDOW * MERGE_WINDOW;
        let deferred = outcomes.contains(&MergeOutcome::Deferred);
        for (p, outcome) in pending.into_iter().zip(outcomes) {
            let me = (vm, p.pair.dup_gfn, p.pair.dup_page);
            match outcome {
                MergeOutcome::Deferred => self.stats.budget_deferrals += 1,
                MergeOutcome::Merged => {
                    self.mark_merged(vm, p.pair.dup_gfn);
                    self.mark_merged(p.pair.keep.0, p.pair.keep.1);
                    self.stats.merges += 1;
                }
                MergeOutcome::Differ => {
                    self.stats.compare_failures += 1;
                    self.candidates.insert(p.key, Candidate::new(me));
                }
                MergeOutcome::Stale => {
                    self.stats.stale_candidates += 1;
                    self.candidates.insert(p.key, Candidate::new(me));
                }
            }
        }
        if deferred {
            // The VM has spent its budget: pages of this window scattered
            // in the pool may fit in fewer mappings (`Memory::compact`).
            let end = (window + MERGE_WINDOW).min(self.frames.get(&vm).copied().unwrap_or(0));
            match memory.compact_window(vm, window..end) {
                Ok(saved) => self.stats.compaction_saved += saved,
                Err(e) => {
                    self.stats.errors += 1;
                    tracing::warn!("compacting frames of vm {vm}: {e:#}");
                }
            }
        }
    }

    /// What a batch of `vm` may remap: as many runs as the VM's budget of
    /// kernel mappings has left (two mappings a run), and beyond that runs
    /// of at least twice the frames per mapping (see "A budget of kernel
    /// mappings"; a mapper with a budget of its own also defers every run
    /// that would take the VM over it).
    fn allowance(&mut self, memory: &Memory, vm: VmId) -> RunAllowance {
        let per = self.config.frames_per_mapping;
        if per == 0 {
            return RunAllowance::UNLIMITED;
        }
        let used = memory.space_mappings(vm).map_or(0, |(used, _)| used);
        self.stats.max_vm_mappings = self.stats.max_vm_mappings.max(used);
        let budget =
            crate::memory::budget::mapping_cap(self.frames.get(&vm).copied().unwrap_or(0), per)
                .unwrap_or(u64::MAX);
        RunAllowance {
            free_runs: (budget.saturating_sub(used) / 2) as usize,
            long_run: (2 * per) as usize,
        }
    }

    /// The dense record of `vm`'s frame `gfn` (the space may have grown
    /// since the table was made).
    fn seen_mut(&mut self, vm: VmId, gfn: Gfn) -> &mut Seen {
        let frames = self.frames.get(&vm).copied().unwrap_or(0).max(gfn + 1) as usize;
        let seen = self.seen.entry(vm).or_default();
        if seen.len() < frames {
            seen.resize(frames, Seen::default());
        }
        &mut seen[gfn as usize]
    }

    fn mark_merged(&mut self, vm: VmId, gfn: Gfn) {
        self.seen_mut(vm, gfn).set_merged(true);
    }

    /// Whether the frame was merged by this scanner, forgetting it.
    fn take_merged(&mut self, vm: VmId, gfn: Gfn) -> bool {
        let seen = self.seen_mut(vm, gfn);
        let merged = seen.merged();
        seen.set_merged(false);
        merged
    }

    fn forget_seen(&mut self, vm: VmId, gfn: Gfn) {
        if let Some(s) = self.seen.get_mut(&vm).and_then(|v| v.get_mut(gfn as usize)) {
            *s = Seen::default();
        }
    }

    /// Whether a private frame's content has held still long enough to be
    /// merged or released (see "Settled content"); records what was seen.
    fn settled(&mut self, vm: VmId, gfn: Gfn, hash: u64, zero: bool, now: Instant) -> bool {
        // Milliseconds since the start, wrapping every 49 days (ages are
        // taken modulo that too: a frame unchanged for longer may look young
        // once); 0 means "not seen".
        let now_ms = ((now - self.started).as_millis() as u32).max(1);
        let age = if zero {
            self.config.zero_page_age
        } else {
            self.config.settle_age
        };
        let s = self.seen_mut(vm, gfn);
        let first = s.since_ms == 0;
        if first || s.hash() != hash as u32 & !MERGED_BIT {
            s.set_hash(hash);
            s.since_ms = now_ms;
            // A first sighting is waiting, not churning (see `Pace`).
            self.stats.settling_skips += first as u64;
            return false;
        }
        let settled = Duration::from_millis(now_ms.wrapping_sub(s.since_ms) as u64) >= age;
        self.stats.settling_skips += !settled as u64;
        settled
    }

    /// Takes in what the scan of one frame found. `still`: the VM runs no
    /// guest code now (exited or paused), so its content cannot change
    /// under the scanner and is merged on first sight, as once every guest
    /// has stopped (`quiescent`).
    #[allow(clippy::too_many_arguments)]
    fn scan_one(
        &mut self,
        memory: &Memory,
        vm: VmId,
        gfn: Gfn,
        domain: usize,
        scan: PageScan,
        still: bool,
        now: Instant,
    ) {
        if scan.hole {
            self.stats.holes_skipped += 1;
            self.forget_seen(vm, gfn);
            return;
        }
        let frame = (vm, gfn);
        if !scan.shared && !self.quiescent && !still {
            if self.take_merged(vm, gfn) {
                // Merged before, private now: a write broke it.
                let breaks = self.breaks.entry(frame).or_default();
                *breaks += 1;
                let needed = 1u32
                    .checked_shl(*breaks - 1)
                    .unwrap_or(MAX_STABLE_PASSES)
                    .min(MAX_STABLE_PASSES);
                self.unstable.insert(
                    frame,
                    Unstable {
                        hash: scan.hash,
                        stable_passes: 0,
                        needed,
                        since: now,
                    },
                );
                self.stats.unstable_skips += 1;
                return;
            }
            if let Some(u) = self.unstable.get_mut(&frame) {
                if u.hash != scan.hash {
                    u.hash = scan.hash;
                    u.stable_passes = 0;
                    u.since = now;
                } else {
                    u.stable_passes += 1;
                }
                if u.stable_passes < u.needed
                    || now - u.since < self.config.stable_pass_time * u.needed
                {
                    self.stats.unstable_skips += 1;
                    return;
                }
                self.unstable.remove(&frame);
            }
            if !self.config.first_sight && !self.settled(vm, gfn, scan.hash, scan.zero, now) {
                if scan.zero {
                    self.stats.young_zero_skips += 1;
                } else {
                    self.stats.unsettled_skips += 1;
                }
                return;
            }
        }
        if scan.zero {
            if !scan.shared {
                self.pending_zero.push((gfn, scan.page));
            }
            return;
        }
        let key = Key::new(domain, scan.hash);
        let me = (vm, gfn, scan.page);
        let Some(candidate) = self.candidates.get(key).map(|c| c.frame()) else {
            self.candidates.insert(key, Candidate::new(me));
            return;
        };
        if candidate.2 == scan.page {
            return;
        }
        let keep = self
            .twin_of_last(memory, gfn, scan.hash)
            .unwrap_or(candidate);
        if keep != candidate {
            self.stats.twin_picks += 1;
        }
        if self.pending.len() >= MERGE_BATCH_MAX {
            let window = self.window;
            self.flush(memory);
            self.window = window;
        }
        self.pending.push(Pending {
            pair: MergePair {
                dup_gfn: gfn,
                dup_page: scan.page,
                keep,
            },
            key,
        });
    }

    /// When the previous frame of this window is about to merge onto frame
    /// `g` of some VM, the frame `g + 1` of that VM, if it holds this
    /// content on the pool page right after: keeping it extends the run of
    /// kept pages, so the two merges share one `mmap` and one kernel
    /// mapping (twin VMs hold equal content at equal frames, but repeated
    /// content inside a VM would otherwise pick the first copy seen).
    fn twin_of_last(
        &self,
        memory: &Memory,
        gfn: Gfn,
        hash: u64,
    ) -> Option<(VmId, Gfn, MachinePage)> {
        let last = self.pending.last()?;
        if last.pair.dup_gfn + 1 != gfn {
            return None;
        }
        let (vm, g, page) = last.pair.keep;
        let twin = memory.scan_page(vm, g + 1).ok()??;
        let next = MachinePage {
            node: page.node,
            index: page.index.checked_add(1)?,
        };
        (twin.page == next && !twin.hole && twin.hash == hash).then_some((vm, g + 1, next))
    }
}

/// The scanner thread.
pub struct Scanner {
    stop: Arc<AtomicBool>,
    quiescent: Arc<AtomicBool>,
    /// VMs wait for memory (see [`Scanner::memory_wanted`]).
    wanted: Arc<AtomicBool>,
    state: Arc<Mutex<ScannerStats>>,
    thread: Option<JoinHandle<()>>,
}

const TICK: Duration = Duration::from_millis(10);
/// The scanner's tables are looked up several times per frame scanned;
/// std's SipHash (built against hash flooding, which keys chosen by the
/// scanner itself do not need) was about a tenth of its CPU time.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Frames hashed per hold of the memory lock (`Memory::scan_frames`).
const SCAN_CHUNK: Gfn = 64;
/// Most pages scanned between two looks at the stop flag.
const MAX_BATCH: u64 = 2048;

fn thread_cpu_ms() -> f64 {
    crate::vm::ThreadCpu::clock().as_secs_f64() * 1e3
}

/// The scanner's nice level while guests run: 5, as Linux gives ksmd, so
/// the vCPU threads come first when the CPUs are busy. Not lower: at nice
/// 19 the scanner starved whenever the vCPUs outnumbered the CPUs (four
/// 1-vCPU guests on the 2-core build host shared almost nothing while they
/// ran), and sharing that lags the guests is memory the host must hold.
/// What keeps the scanner cheap is its pace (`Pace`) and its share of a
/// busy host (`cpu_share`). Hashing runs without the memory lock
/// (`Memory::scan_page`), so a descheduled scanner seldom holds what a
/// fault handler needs; merges do take the lock, briefly.
const NICE: i32 = 5;
/// Its nice level while VMs wait for memory (`Scanner::memory_wanted`):
/// above the vCPUs. At nice 5 against 15 busy 1-vCPU guests on 2 cores it
/// got a few percent of a CPU, and 32 x 1 GiB of overcommitted guests
/// merged nothing until the first wave had finished (about 100 s).
const NICE_MEMORY_WANTED: i32 = -10;

/// The scanner's pace: `pages_per_second` is a ceiling, not a constant.
///
/// Hashing a page costs about 2.5 us of CPU on the build hosts
/// (docs/host-facts.md, "Sharing scanner"); at the ceiling of
/// `policies/disco.toml` (100,000 pages/s) that is a quarter of a CPU, taken
/// from the guests on a host whose CPUs they keep busy, whether or not
/// there is anything to merge (a 2-vCPU, 256 MiB `random` guest ran
/// 1.4-1.6x its time without sharing on the 2-core build host). So the
/// rate follows the yield, between the ceiling / 64 and the ceiling: it
/// halves after a window of `WINDOW` hashed pages (holes are not hashed and
/// do not count, nor do frames waiting for their content to settle: seen
/// for the first time, or unchanged but younger than `settle_age`; frames
/// whose content changed do count, so constant writers still slow it) in
/// which nothing merged, and doubles as soon as 1 % of the
/// pages hashed since the last change merged (looked at every
/// `SPEEDUP_CHECK`, so a slowed scanner that finds duplicates again is back
/// at the ceiling within about a second). The first full pass runs at the
/// ceiling: it fills the candidate table, so finding nothing to merge in
/// it says nothing yet (starting slow made the sharing bench's first
/// merges wait a second). KSM's `smart_scan` skips pages that never merge;
/// this is the same bet, per window rather than per page. Once the guests
/// have stopped the ceiling applies: nothing competes any more.
struct Pace {
    ceiling: f64,
    rate: f64,
    /// Hashed pages and merges at the last change, and when it was.
    hashed: u64,
    merges: u64,
    since: Instant,
}

/// Pages hashed, without a merge, before the pace halves.
const WINDOW: u64 = 4096;
/// How often a slowed scanner checks whether it should speed up again.
const SPEEDUP_CHECK: Duration = Duration::from_millis(100);

impl Pace {
    fn new(ceiling: f64) -> Pace {
        Pace {
            ceiling,
            rate: ceiling.max(1.0),
            hashed: 0,
            merges: 0,
            since: Instant::now(),
        }
    }

    fn rate(&mut self, stats: &ScannerStats, quiescent: bool) -> f64 {
        if quiescent {
            return self.ceiling;
        }
        let hashed = stats.pages_scanned - stats.holes_skipped - stats.settling_skips;
        if stats.full_scans == 0 {
            self.hashed = hashed;
            self.merges = stats.merges + stats.zero_releases;
            return self.rate;
        }
        let found = stats.merges + stats.zero_releases;
        let (seen, merged) = (hashed - self.hashed, found - self.merges);
        let floor = (self.ceiling / 64.0).max(1.0);
        let changed = if seen > 0 && merged * 100 >= seen && self.since.elapsed() >= SPEEDUP_CHECK {
            self.rate = (self.rate * 2.0).min(self.ceiling);
            true
        } else if seen >= WINDOW && merged == 0 {
            self.rate = (self.rate / 2.0).max(floor);
            true
        } else {
            seen >= WINDOW
        };
        if changed {
            self.hashed = hashed;
            self.merges = found;
            self.since = Instant::now();
        }
        self.rate
    }
}

impl Scanner {
    /// The scanner a policy's `[sharing]` section asks for: started when
    /// sharing is enabled, `None` otherwise.
    pub fn for_policy(
        memory: Arc<Memory>,
        policy: &crate::config::SharingPolicy,
    ) -> std::io::Result<Option<Scanner>> {
        if !policy.enabled {
            return Ok(None);
        }
        let mut config = ScannerConfig::new(policy.pages_per_second, policy.domains.clone());
        config.frames_per_mapping = policy.frames_per_mapping;
        config.busy_cpu_share = policy.busy_cpu_share;
        Scanner::start(memory, config).map(Some)
    }

    pub fn start(memory: Arc<Memory>, config: ScannerConfig) -> std::io::Result<Scanner> {
        let stop = Arc::new(AtomicBool::new(false));
        let quiescent = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Mutex::new(ScannerStats::default()));
        let (flag, out) = (stop.clone(), shared.clone());
        let still = quiescent.clone();
        let wanted = Arc::new(AtomicBool::new(false));
        let want = wanted.clone();
        let thread = std::thread::Builder::new()
            .name("disco-scanner".into())
            .spawn(move || {
                crate::host_load::set_thread_nice(NICE, "scanner");
                let mut nice = NICE;
                let mut pace = Pace::new(config.pages_per_second as f64);
                let mut share = CpuShare::new(config.busy_cpu_share, thread_cpu_ms());
                let mut state = ScanState::new(config);
                let mut budget = 0.0f64;
                let mut last = Instant::now();
                while !flag.load(Ordering::Relaxed) {
                    let quiescent = still.load(Ordering::Relaxed);
                    let wanted = want.load(Ordering::Relaxed);
                    let urgent = quiescent || wanted;
                    let level = if wanted { NICE_MEMORY_WANTED } else { NICE };
                    if level != nice {
                        crate::host_load::set_thread_nice(level, "scanner");
                        nice = level;
                    }
                    if !share.may_run(thread_cpu_ms(), urgent) {
                        state.stats.busy_wait_ms = share.held_back.as_secs_f64() * 1e3;
                        *out.lock() = state.stats.clone();
                        std::thread::sleep(TICK);
                        // The pace's budget does not pile up meanwhile.
                        last = Instant::now();
                        continue;
                    }
                    let rate = pace.rate(&state.stats, urgent);
                    state.stats.rate_pages_per_s = rate;
                    let now = Instant::now();
                    // At most one second's worth after a stall, no bursts.
                    budget = (budget + rate * (now - last).as_secs_f64()).min(rate.max(1.0));
                    last = now;
                    // Bounded batches keep the stop flag and the stats fresh
                    // even at an unlimited rate.
                    let mut pages = budget.floor().min(MAX_BATCH as f64);
                    budget -= pages;
                    if quiescent {
                        // The guests are done: no one to leave CPU time to.
                        (pages, budget) = (MAX_BATCH as f64, 0.0);
                    }
                    state.quiescent = quiescent;
                    state.step(&memory, pages as u64);
                    state.stats.cpu_ms = thread_cpu_ms();
                    *out.lock() = state.stats.clone();
                    let spent = now.elapsed();
                    if !quiescent && spent < TICK && budget < 1.0 {
                        std::thread::sleep(TICK - spent);
                    }
                }
            })?;
        Ok(Scanner {
            stop,
            quiescent,
            wanted,
            state: shared,
            thread: Some(thread),
        })
    }

    pub fn stats(&self) -> ScannerStats {
        self.state.lock().clone()
    }

    /// Says whether VMs wait for memory that merges would give back: while
    /// they do, the scanner runs at its ceiling and takes what CPU it needs
    /// (the host's memory comes before the guests' CPU time).
    pub fn memory_wanted(&self, wanted: bool) {
        self.wanted.store(wanted, Ordering::Relaxed);
    }

    /// Says that no guest writes its memory any more (all have stopped):
    /// from the next batch on, frames that were volatile are merged on
    /// sight, so the final passes find every duplicate.
    pub fn guests_quiescent(&self) {
        self.quiescent.store(true, Ordering::Relaxed);
    }

    /// Stops the thread and returns the final figures.
    pub fn stop(mut self) -> ScannerStats {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.stats()
    }
}

impl Drop for Scanner {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
