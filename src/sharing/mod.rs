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
//! looked up in a table keyed by (sharing domain, hash); zero pages are keyed
//! by (domain, node) instead, so all-zero pages collapse onto one shared
//! zero page per node and domain (once old enough: see below); other
//! duplicates are merged on first sight. A hit is only a candidate: the mapper
//! write-protects both frames and compares the bytes before merging
//! (`Memory::merge`). Non-zero pages are merged on first sight (KSM waits
//! for every page's checksum to be stable over two passes); a page that
//! changes soon after costs one copy-on-write break.
//!
//! ## Holes and zero pages
//! Fresh guest memory is a hole in its pool until the guest first writes
//! it. The scanner asks the pool (`mincore` on the monitor's view) before
//! reading a page and skips holes: reading one through the `MAP_SHARED`
//! view would make the host allocate it, and merging it onto a zero page
//! would only buy a copy-on-write break at the guest's first write. That
//! was most of the cost of sharing for a guest filling its memory: a
//! 64 MiB, 2-vCPU `fill` ran 1.48 s with sharing against 0.31 s without,
//! with 4,098 zero merges and 4,084 breaks, all undone by the guest.
//!
//! A resident zero page is a page the guest (or its kernel) zeroed, which
//! usually means it is about to be used: a zero frame is merged only once it
//! has stayed zero for `ZERO_PAGE_AGE` (2 s), whatever the pass time (the
//! older rule, "still zero at the next pass", meant milliseconds when a
//! pass over a small guest takes milliseconds). Zero merges count as merges
//! for the volatile-page rule below: a zero frame broken by a write waits
//! like any other.
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
//! nice 5. Its own CPU time is measured and reported.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::memory::{Gfn, MachinePage, Memory, MergeOutcome, NodeId, VmId};

/// What the scanner does; from the policy's `[sharing]` section.
#[derive(Clone, Debug)]
pub struct ScannerConfig {
    pub pages_per_second: u64,
    /// Sharing domains to scan; empty means all.
    pub domains: Vec<String>,
    /// How long a resident zero frame must stay zero before it is merged
    /// (see "Zero pages" in the module doc).
    pub zero_page_age: Duration,
    /// How long an unstable frame's content must hold still, per stable
    /// pass it is asked for, before it is merged again.
    pub stable_pass_time: Duration,
}

/// A zero frame is merged once it has been zero this long.
pub const ZERO_PAGE_AGE: Duration = Duration::from_secs(2);
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
            stable_pass_time: STABLE_PASS_TIME,
        }
    }

    /// No waiting on time: zero frames are merged when seen zero twice and
    /// unstable frames after their stable passes, however fast the passes
    /// (for tests that drive the scanner pass by pass on stopped guests).
    pub fn without_time_rules(mut self) -> ScannerConfig {
        self.zero_page_age = Duration::ZERO;
        self.stable_pass_time = Duration::ZERO;
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
    /// Of `merges`, those onto a shared zero page.
    pub zero_merges: u64,
    /// Candidates whose bytes turned out to differ.
    pub compare_failures: u64,
    /// Candidates that had changed mapping since they were seen.
    pub stale_candidates: u64,
    /// Frames skipped because their page is a hole (never written: reading
    /// it would allocate it, and it costs the host nothing).
    #[serde(default)]
    pub holes_skipped: u64,
    /// Zero frames skipped because they had not been zero for
    /// `ZERO_PAGE_AGE` yet (fresh memory about to be written).
    #[serde(default)]
    pub young_zero_skips: u64,
    /// Frames skipped because they were merged, broken by a write, and
    /// changed again since the last pass (see "Volatile pages").
    #[serde(default)]
    pub unstable_skips: u64,
    /// CPU time of the scanner thread.
    pub cpu_ms: f64,
    /// The scanner's current pace, pages per second (see `Pace`).
    #[serde(default)]
    pub rate_pages_per_s: f64,
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

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Key {
    Content { domain: usize, hash: u64 },
    Zero { domain: usize, node: NodeId },
}

/// The scanner's state, separate from its thread so tests can drive it
/// step by step.
pub struct ScanState {
    config: ScannerConfig,
    candidates: HashMap<Key, (VmId, Gfn, MachinePage)>,
    /// Zero frames and when they were first seen zero, waiting to be old
    /// enough (`ScannerConfig::zero_page_age`) and seen again.
    young_zero: HashMap<(VmId, Gfn), Instant>,
    /// Frames this scanner merged (either side of a merge).
    merged: HashSet<(VmId, Gfn)>,
    /// Frames found private after a merge (a write broke the sharing):
    /// merged again only once their content has held still long enough.
    unstable: HashMap<(VmId, Gfn), Unstable>,
    /// How often each frame was found broken after a merge.
    breaks: HashMap<(VmId, Gfn), u32>,
    domains: Vec<String>,
    /// No guest writes any more: skip the volatile-page wait.
    pub quiescent: bool,
    /// Position: index into the current list of spaces, and frame.
    space_index: usize,
    gfn: Gfn,
    pub stats: ScannerStats,
}

impl ScanState {
    pub fn new(config: ScannerConfig) -> ScanState {
        ScanState {
            config,
            candidates: HashMap::new(),
            young_zero: HashMap::new(),
            merged: Default::default(),
            unstable: HashMap::new(),
            breaks: HashMap::new(),
            quiescent: false,
            domains: Vec::new(),
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
        self.young_zero.retain(|f, _| live.contains(&f.0));
        self.merged.retain(|f| live.contains(&f.0));
        self.unstable.retain(|f, _| live.contains(&f.0));
        self.breaks.retain(|f, _| live.contains(&f.0));
    }

    /// Scans up to `budget` frames, continuing where the last call stopped.
    pub fn step(&mut self, memory: &Memory, budget: u64) {
        let spaces: Vec<(VmId, u64, String)> = memory
            .spaces()
            .into_iter()
            .filter(|(_, _, d)| self.config.domains.is_empty() || self.config.domains.contains(d))
            .collect();
        if spaces.is_empty() {
            return;
        }
        for _ in 0..budget {
            if self.space_index >= spaces.len() {
                self.space_index = 0;
                self.gfn = 0;
                self.stats.full_scans += 1;
                self.forget_gone_spaces(&spaces);
            }
            let (vm, frames, domain) = &spaces[self.space_index];
            let (vm, gfn) = (*vm, self.gfn);
            self.gfn += 1;
            if self.gfn >= *frames {
                self.space_index += 1;
                self.gfn = 0;
            }
            let domain = self.domain_id(domain);
            self.scan_one(memory, vm, gfn, domain);
        }
    }

    fn scan_one(&mut self, memory: &Memory, vm: VmId, gfn: Gfn, domain: usize) {
        self.stats.pages_scanned += 1;
        let scan = match memory.scan_page(vm, gfn) {
            Ok(Some(s)) if s.hole => {
                self.stats.holes_skipped += 1;
                self.young_zero.remove(&(vm, gfn));
                return;
            }
            Ok(Some(s)) => s,
            Ok(None) => return,
            Err(_) => return, // the space went away during the pass
        };
        let frame = (vm, gfn);
        let now = Instant::now();
        if !scan.shared && !self.quiescent {
            if self.merged.remove(&frame) {
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
        }
        if scan.zero && !scan.shared && !self.quiescent {
            let first_seen = *self.young_zero.entry(frame).or_insert(now);
            if first_seen == now || now - first_seen < self.config.zero_page_age {
                self.stats.young_zero_skips += 1;
                return;
            }
        }
        self.young_zero.remove(&frame);
        let key = if scan.zero {
            Key::Zero {
                domain,
                node: scan.page.node(),
            }
        } else {
            Key::Content {
                domain,
                hash: scan.hash,
            }
        };
        let me = (vm, gfn, scan.page);
        let Some(&candidate) = self.candidates.get(&key) else {
            self.candidates.insert(key, me);
            return;
        };
        if candidate.2 == scan.page {
            return;
        }
        match memory.merge(me, candidate) {
            Ok(MergeOutcome::Merged) => {
                self.merged.insert(frame);
                self.merged.insert((candidate.0, candidate.1));
                self.stats.merges += 1;
                if scan.zero {
                    self.stats.zero_merges += 1;
                }
            }
            Ok(MergeOutcome::Differ) => {
                self.stats.compare_failures += 1;
                self.candidates.insert(key, me);
            }
            Ok(MergeOutcome::Stale) => {
                self.stats.stale_candidates += 1;
                self.candidates.insert(key, me);
            }
            Err(e) => {
                self.stats.errors += 1;
                tracing::warn!("merging vm {vm} frame {gfn:#x}: {e:#}");
            }
        }
    }
}

/// The scanner thread.
pub struct Scanner {
    stop: Arc<AtomicBool>,
    quiescent: Arc<AtomicBool>,
    state: Arc<Mutex<ScannerStats>>,
    thread: Option<JoinHandle<()>>,
}

const TICK: Duration = Duration::from_millis(10);
/// Most pages scanned between two looks at the stop flag.
const MAX_BATCH: u64 = 16384;

fn thread_cpu_ms() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 * 1e3 + ts.tv_nsec as f64 / 1e6
}

/// Puts the calling thread at nice 5, as Linux does for ksmd: the vCPU
/// threads come first when the CPUs are busy. Not lower: at nice 19 the
/// scanner starved whenever the vCPUs outnumbered the CPUs (four 1-vCPU
/// guests on the 2-core build host shared almost nothing while they ran),
/// and sharing that lags the guests is memory the host must hold. What
/// keeps the scanner cheap is its pace (`Pace`). Hashing runs without the
/// memory lock (`Memory::scan_page`), so a descheduled scanner seldom holds
/// what a fault handler needs; merges do take the lock, briefly.
fn low_priority() {
    // SAFETY: setpriority on the calling thread (tid 0 = caller) has no
    // memory-safety preconditions.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 5) } != 0 {
        tracing::debug!(
            "scanner: setpriority(5): {}",
            std::io::Error::last_os_error()
        );
    }
}

/// The scanner's pace: `pages_per_second` is a ceiling, not a constant.
///
/// Hashing a page costs about 2.5 us of CPU here; at the ceiling of
/// `policies/disco.toml` (100,000 pages/s) that is a quarter of a CPU, taken
/// from the guests on a host whose CPUs they keep busy, whether or not
/// there is anything to merge (a 2-vCPU, 256 MiB `random` guest ran
/// 1.4-1.6x its time without sharing on the 2-core build host). So the
/// rate follows the yield, between the ceiling / 64 and the ceiling: it
/// halves after a window of `WINDOW` hashed pages (holes are not hashed and
/// do not count) in which nothing merged, and doubles as soon as 1 % of the
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
        let hashed = stats.pages_scanned - stats.holes_skipped;
        if stats.full_scans == 0 {
            self.hashed = hashed;
            self.merges = stats.merges;
            return self.rate;
        }
        let (seen, merged) = (hashed - self.hashed, stats.merges - self.merges);
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
            self.merges = stats.merges;
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
        let config = ScannerConfig::new(policy.pages_per_second, policy.domains.clone());
        Scanner::start(memory, config).map(Some)
    }

    pub fn start(memory: Arc<Memory>, config: ScannerConfig) -> std::io::Result<Scanner> {
        let stop = Arc::new(AtomicBool::new(false));
        let quiescent = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Mutex::new(ScannerStats::default()));
        let (flag, out) = (stop.clone(), shared.clone());
        let still = quiescent.clone();
        let thread = std::thread::Builder::new()
            .name("disco-scanner".into())
            .spawn(move || {
                low_priority();
                let mut pace = Pace::new(config.pages_per_second as f64);
                let mut state = ScanState::new(config);
                let mut budget = 0.0f64;
                let mut last = Instant::now();
                while !flag.load(Ordering::Relaxed) {
                    let quiescent = still.load(Ordering::Relaxed);
                    let rate = pace.rate(&state.stats, quiescent);
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
            state: shared,
            thread: Some(thread),
        })
    }

    pub fn stats(&self) -> ScannerStats {
        self.state.lock().clone()
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
